//! The applied state in redb: [`StateMachineStore`].
//!
//! One file, `<data_dir>/state-machine.redb`: the applied state as rows
//! (one per group and per certificate, plus the last applied log id, the
//! membership and the cluster secrets; see [`rows`](crate::rows) for the
//! layout and its versions) and table `snapshot` the current snapshot's
//! meta; its bytes are a file in `<data_dir>/snapshots/`.
//!
//! After each batch of committed entries, `apply` writes the rows the batch
//! changed and the last applied log id in one transaction with
//! `Durability::Immediate` (one fsync per batch) and only then publishes
//! the state and answers. So a node that restarts, even alone and without
//! a quorum, serves the state it last applied at once instead of an older
//! snapshot; openraft re-applies only what was committed but not yet
//! applied. A batch costs what it changed: attaching an instance rewrites
//! one group row, whatever the number of groups.
//!
//! Entries:
//! - `Normal` runs [`State::apply`]; its `Ok` or [`ApplyError`](crate::ApplyError)
//!   is the entry's [`Response`]. A refused command changes nothing.
//! - `Blank` only moves the last applied log id.
//! - `Membership` is stored as the last membership.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend};
use redb::{Database, Durability};
use tokio::sync::watch;

use crate::changes::{Changed, History, Rows};
use crate::db::{self, StoreError};
use crate::rows;
use crate::snapshot::{Files, SNAPSHOT, SnapshotBuilder};
use crate::state::State;
use crate::types::{
    Entry, LogId, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// File name of the state machine database inside the data dir.
pub(crate) const FILE: &str = "state-machine.redb";

/// What the state machine publishes after every batch it applies: the state
/// and the index of the last log entry applied to it (entries that change
/// nothing, such as a refused command or a membership change, still move
/// the index). Readers that act on the state (the data plane) can say which
/// index they act on.
#[derive(Clone, Debug, Default)]
pub struct AppliedState {
    /// Index of the last applied log entry (0 before any).
    pub index: u64,
    pub state: Arc<State>,
    /// The changes of the last batches, for [`changed_since`](Self::changed_since).
    changes: History,
}

impl AppliedState {
    /// A state applied up to `index` with no history: `changed_since`
    /// answers `None` for every index but `index` itself.
    pub fn new(index: u64, state: Arc<State>) -> Self {
        Self {
            index,
            state,
            changes: History::starting_at(index),
        }
    }

    /// What changed since the state applied at index `since` (≤ self.index). `None` when `since`
    /// is older than the history kept (for example after a snapshot install): rebuild everything.
    pub fn changed_since(&self, since: u64) -> Option<Changed> {
        self.changes.since(since, self.index)
    }
}

/// The replicated [`State`] as applied from the log, persisted in redb and
/// published on a watch channel.
pub struct StateMachineStore {
    db: Arc<Database>,
    /// The snapshots' bytes.
    files: Arc<Files>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Holds the current state; receivers see every batch's result.
    state: watch::Sender<AppliedState>,
}

impl fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("last_applied", &self.last_applied)
            .finish_non_exhaustive()
    }
}

impl StateMachineStore {
    /// Opens the state machine in `dir` (creating `dir` and the file if
    /// needed) and loads the last applied state.
    ///
    /// Blocks on file I/O; call it at startup or from `spawn_blocking`.
    /// Stored bytes that do not decode are an error, and so is a file of a
    /// newer format ([`StoreError::NewerFormat`]); a file of format 1 is
    /// migrated.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, None)
    }

    /// [`StateMachineStore::open`], through a fault-injecting backend when
    /// `faults` is given (tests: [`crate::faults`]).
    pub fn open_with(
        dir: &Path,
        faults: Option<&Arc<crate::faults::Faults>>,
    ) -> Result<Self, StoreError> {
        let db = db::open(dir, FILE, faults)?;
        let record = db::guarded(&dir.join(FILE), || {
            let txn = db.begin_write()?;
            txn.open_table(SNAPSHOT)?;
            txn.commit()?;
            rows::load(&db)
        })?;
        let files = db::guarded(&dir.join(FILE), || Files::open(dir, &db))?;
        files.verify(&db)?;
        let files = Arc::new(files);
        if record.migrated {
            tracing::info!(
                path = %dir.join(FILE).display(),
                groups = record.state.group_count(),
                format = rows::FORMAT,
                "migrated the state machine from format 1"
            );
        }
        tracing::debug!(last_applied = ?record.last_applied, "state machine loaded");
        Ok(Self {
            db,
            files,
            last_applied: record.last_applied,
            membership: record.membership,
            state: watch::Sender::new(AppliedState::new(
                record.last_applied.map_or(0, |l| l.index),
                Arc::new(record.state),
            )),
        })
    }

    /// A receiver of the applied state. It holds the current state at once
    /// and is told after every applied batch (a slow receiver sees the
    /// latest, skipping intermediate ones); the `Arc<State>` is the same
    /// while nothing changed it.
    ///
    /// Take it before handing the store to `Raft::new`.
    pub fn subscribe(&self) -> watch::Receiver<AppliedState> {
        self.state.subscribe()
    }

    /// Readies the file for the process's exit ([`crate::Seal`]). Take it
    /// before handing the store to `Raft::new`.
    pub fn seal(&self) -> crate::Seal {
        crate::Seal::new(&self.db)
    }

    /// The current applied state.
    pub fn current(&self) -> Arc<State> {
        Arc::clone(&self.state.borrow().state)
    }

    /// The database, for tests.
    #[cfg(test)]
    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.db
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Option<LogId> {
        self.last_applied
    }

    /// Writes the changed `rows` of `state` and the meta rows in one
    /// durable transaction.
    async fn persist(
        &self,
        rows: Rows,
        last_applied: Option<LogId>,
        membership: StoredMembership,
        state: Arc<State>,
    ) -> Result<(), StoreError> {
        db::blocking(&self.db, move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            rows::write_changed(&txn, &rows, &state, last_applied, &membership)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut last_applied = self.last_applied;
        let mut membership = self.membership.clone();
        // Copied on the first command; the published state is never mutated.
        let mut working: Option<State> = None;
        let mut rows = Rows::default();
        let mut responses = Vec::new();
        for entry in entries {
            last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::none(),
                EntryPayload::Normal(request) => {
                    let state = working.get_or_insert_with(|| (*self.current()).clone());
                    let result = state.apply_noting(&request.command, &mut rows);
                    if let Err(e) = &result {
                        tracing::debug!(log_id = %entry.log_id, error = %e, "command refused");
                    }
                    Response {
                        result: Some(result),
                    }
                }
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::none()
                }
            };
            responses.push(response);
        }
        if last_applied == self.last_applied {
            return Ok(responses);
        }

        // A refused command leaves the state as it was: keep sharing it.
        let state = match working {
            Some(s) if !rows.is_empty() => Arc::new(s),
            _ => self.current(),
        };
        let changed = rows.changed();
        self.persist(rows, last_applied, membership.clone(), Arc::clone(&state))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::StateMachine, ErrorVerb::Write))?;
        self.last_applied = last_applied;
        self.membership = membership;
        let index = last_applied.map_or(0, |l| l.index);
        let changes = self.state.borrow().changes.push(index, changed);
        self.state.send_replace(AppliedState {
            index,
            state,
            changes,
        });
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            files: Arc::clone(&self.files),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state: self.current(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let files = Arc::clone(&self.files);
        let file = db::blocking(&self.db, move |_| files.receiving())
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let signature = meta.signature();
        let fail = |e: StoreError| {
            e.into_storage(
                ErrorSubject::Snapshot(Some(signature.clone())),
                ErrorVerb::Write,
            )
        };
        let data = snapshot.into_std().await;
        let files = Arc::clone(&self.files);
        let stored = meta.clone();
        let record = db::blocking(&self.db, move |db| files.install(db, &stored, data))
            .await
            .map_err(fail)?;
        tracing::info!(snapshot = %meta.snapshot_id, groups = record.state.group_count(), "installed snapshot");
        self.last_applied = record.last_applied;
        self.membership = record.membership;
        self.state.send_replace(AppliedState::new(
            record.last_applied.map_or(0, |l| l.index),
            Arc::new(record.state),
        ));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let files = Arc::clone(&self.files);
        let current = db::blocking(&self.db, move |db| files.current(db))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}
