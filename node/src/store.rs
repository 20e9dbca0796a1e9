//! The one door through which the node's replicated state changes.
//!
//! Every change is a [`Command`] handed to [`Store::propose`]; the store
//! applies it with [`State::apply`] and publishes the new state on a watch
//! channel that the data plane and the admin API read. Nothing else mutates
//! the state, so putting a consensus log behind `propose` changes no caller.
//!
//! ```text
//!  admin API ──Command──▶ Store::propose ──apply──▶ State ──watch──▶ data plane
//! ```
//!
//! This store keeps the state in memory and writes a JSON snapshot of it to
//! `state.json` in the data dir after every applied command (write to a
//! temporary file, fsync, rename), so a restart keeps every group.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft_store::command::Command;
use raft_store::state::{ApplyError, Applied, State};
use tokio::sync::{Mutex, watch};

/// Why a proposal failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The command was refused by the state machine's rules.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The state could not be made durable or no quorum is reachable (503).
    #[error("state unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// HTTP status for the admin API.
    pub fn status(&self) -> u16 {
        match self {
            Self::Apply(e) => e.status(),
            Self::Unavailable(_) => 503,
        }
    }
}

/// The node's copy of the replicated state.
#[derive(Debug)]
pub struct Store {
    tx: watch::Sender<Arc<State>>,
    /// Serialises proposals: apply + persist happen one at a time.
    write: Mutex<()>,
    path: Option<PathBuf>,
}

impl Store {
    /// An in-memory store (tests).
    pub fn in_memory(initial: State) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(initial)),
            write: Mutex::new(()),
            path: None,
        }
    }

    /// Opens the store kept in `data_dir`, loading `state.json` if present.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::Unavailable(format!("{} is corrupt: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "reading {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(Self {
            tx: watch::Sender::new(Arc::new(state)),
            write: Mutex::new(()),
            path: Some(path),
        })
    }

    /// Applies `cmd` and answers once the new state is durable and published.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, StoreError> {
        let _write = self.write.lock().await;
        let mut next = State::clone(&self.tx.borrow());
        let applied = next.apply(&cmd)?;
        if let Some(path) = &self.path {
            persist(path, &next).await?;
        }
        self.tx.send_replace(Arc::new(next));
        Ok(applied)
    }

    /// The current state.
    pub fn state(&self) -> Arc<State> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every published state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }
}

async fn persist(path: &Path, state: &State) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(state)
        .map_err(|e| StoreError::Unavailable(format!("encoding state: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("persist task: {e}")))?
    .map_err(|e| StoreError::Unavailable(format!("writing state: {e}")))
}
