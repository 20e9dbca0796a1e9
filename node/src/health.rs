//! Whether this node can write, and what `/healthz` and `/readyz` say
//! when it cannot.
//!
//! Two things stop a node's writes:
//!
//! ```text
//!  free space of the data dir's file system < data_dir_min_free
//!      ─▶ writes refused up front: 507, naming the data dir, the free space and the key
//!         (checked on every write and every health probe: writes resume as soon as space is back)
//!  the Raft core stopped on a storage error (a full disk, EIO, a failed fsync)
//!      ─▶ 503 with the cause; the node stops like on SIGTERM and exits with 74
//!         (EX_IOERR) so that its service manager restarts it with its storage reopened
//! ```
//!
//! While either holds, `/healthz` and `/readyz` answer 503 with the reason
//! (SPEC §6: a node never looks healthy while it cannot write); the data
//! plane serves the last applied state and gossip goes on. A storage error
//! is never retried in place: redb, like the kernel after a failed fsync,
//! trusts nothing written after an I/O error until the file is opened
//! again, and a restart is what opens it again (and repairs it).

mod disk;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::error::Fatal;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use raft_store::types::{NodeId, Raft};
use tokio::sync::watch;
use tracing::error;

pub(crate) use disk::is_disk_full;
pub use disk::{DiskFull, MinFree};

/// Exit code of a node whose storage failed (EX_IOERR).
pub const EXIT_STORAGE: u8 = 74;

/// Exit code of a node that does not start because a file of its data dir
/// is corrupt (EX_DATAERR); the message names the file and the way out. A
/// restart does not help: the service manager should not retry.
pub const EXIT_CORRUPT: u8 = 65;

/// This node's ability to write (see the module's doc); shared by the store,
/// the cluster handler and the admin API.
#[derive(Debug)]
pub struct Health {
    data_dir: PathBuf,
    min_free: Mutex<MinFree>,
    /// Why the Raft core or storage stopped, once it did.
    failed: watch::Sender<Option<String>>,
    gauges: Gauges,
}

#[derive(Debug)]
struct Gauges {
    free: IntGauge,
    min_free: IntGauge,
    below: IntGauge,
    failed: IntGauge,
    refused: IntCounterVec,
}

/// `reason` label values of `edgelb_writes_refused_total`.
pub const REFUSAL_REASONS: [&str; 2] = ["disk_full", "storage_failed"];

impl Health {
    /// The health of a node whose data dir is `data_dir`, with its series in
    /// `registry`.
    ///
    /// # Panics
    /// Never: the series are valid constants registered once per registry
    /// (a second `Health` on one registry would be a bug).
    pub fn new(data_dir: &Path, min_free: MinFree, registry: &Registry) -> Arc<Self> {
        const OK: &str = "static metric definitions are valid and unique";
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect(OK);
            registry.register(Box::new(g.clone())).expect(OK);
            g
        };
        let refused = IntCounterVec::new(
            Opts::new(
                "edgelb_writes_refused_total",
                "Writes this node refused before they reached the Raft log, by reason \
                 (disk_full: below data_dir_min_free; storage_failed: the Raft core stopped).",
            ),
            &["reason"],
        )
        .expect(OK);
        registry.register(Box::new(refused.clone())).expect(OK);
        for r in REFUSAL_REASONS {
            refused.with_label_values(&[r]);
        }
        let gauges = Gauges {
            free: gauge(
                "edgelb_data_dir_free_bytes",
                "Free space of the data dir's file system, as of the last write or probe.",
            ),
            min_free: gauge(
                "edgelb_data_dir_min_free_bytes",
                "The free-space floor (data_dir_min_free) in bytes: below it writes are refused.",
            ),
            below: gauge(
                "edgelb_data_dir_below_min_free",
                "1 while the data dir's free space is below data_dir_min_free (writes refused).",
            ),
            failed: gauge(
                "edgelb_storage_failed",
                "1 once the Raft core stopped on a storage error (the node is exiting).",
            ),
            refused,
        };
        let health = Arc::new(Self {
            data_dir: data_dir.to_owned(),
            min_free: Mutex::new(min_free),
            failed: watch::Sender::new(None),
            gauges,
        });
        let _ = health.disk();
        health
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Changes the floor (tests; a configuration reload would call it).
    /// Takes effect at the next write or probe.
    pub fn set_min_free(&self, min_free: MinFree) {
        *self.min_free.lock().unwrap_or_else(PoisonError::into_inner) = min_free;
    }

    /// Checks the free space now; `Err` while it is below the floor.
    fn disk(&self) -> Result<(), DiskFull> {
        let min_free = *self.min_free.lock().unwrap_or_else(PoisonError::into_inner);
        let space = disk::measure(&self.data_dir, min_free);
        if let Some(s) = &space {
            self.gauges.free.set(clamp(s.free));
            self.gauges.min_free.set(clamp(s.floor));
        }
        let full = space.and_then(|s| s.full(&self.data_dir));
        self.gauges.below.set(i64::from(full.is_some()));
        full.map_or(Ok(()), Err)
    }

    /// Whether a write may be proposed now: `Err` says why not (the Raft
    /// core stopped, or the disk is below its floor), counted in
    /// `edgelb_writes_refused_total`.
    pub fn writable(&self) -> Result<(), Refusal> {
        self.check().inspect_err(|r| {
            let reason = match r {
                Refusal::Failed(_) => "storage_failed",
                Refusal::DiskFull(_) => "disk_full",
            };
            self.gauges.refused.with_label_values(&[reason]).inc();
        })
    }

    /// What `/healthz` and `/readyz` answer 503 with, if anything.
    pub fn problem(&self) -> Option<String> {
        self.check().err().map(|r| r.to_string())
    }

    /// The Raft core's failure first, then the free space.
    fn check(&self) -> Result<(), Refusal> {
        if let Some(reason) = self.failure() {
            return Err(Refusal::Failed(reason));
        }
        self.disk().map_err(Refusal::DiskFull)
    }

    /// Why the Raft core or storage stopped, once it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// Waits until the Raft core or storage stops, and says why.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_default(),
            // The sender lives in `self`: not reached while borrowed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Records that the Raft core stopped because of `fatal`.
    pub(crate) fn fail(&self, fatal: &Fatal<NodeId>) {
        self.fail_because(format!(
            "the Raft core stopped: {}; the node exits so that its service manager restarts it",
            self.storage_failure(fatal)
        ));
    }

    /// Records that the state machine's rows, written behind the applied
    /// batches, could not be written (`cause` in plain words): the next
    /// batch's apply would stop the Raft core with it.
    pub(crate) fn fail_writing_state(&self, cause: &str) {
        self.fail_because(format!(
            "the state machine could not be written: storage failure in {}: writing the state machine: {cause}; the node exits so that its service manager restarts it",
            self.data_dir.display()
        ));
    }

    /// Records the first failure, `reason`.
    fn fail_because(&self, reason: String) {
        let first = self.failed.send_if_modified(|f| {
            let first = f.is_none();
            if first {
                *f = Some(reason.clone());
            }
            first
        });
        if first {
            self.gauges.failed.set(1);
            error!(data_dir = %self.data_dir.display(), %reason, "storage failed");
        }
    }

    /// `fatal` in plain words, naming the data dir: `storage failure in
    /// /var/lib/edgelb: appending to the Raft log: no space left on device`.
    pub(crate) fn storage_failure(&self, fatal: &Fatal<NodeId>) -> String {
        match fatal {
            Fatal::StorageError(_) => format!(
                "storage failure in {}: {}",
                self.data_dir.display(),
                fatal_cause(fatal)
            ),
            other => fatal_cause(other),
        }
    }
}

/// Why a write was refused before it reached the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// Below the free-space floor (507).
    #[error(transparent)]
    DiskFull(DiskFull),
    /// The Raft core stopped (503).
    #[error("{0}")]
    Failed(String),
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What openraft's fatal error says, without its own framing (`when Write
/// Logs: `) or type paths: the storage's message is already plain words
/// (`appending to the Raft log: no space left on device`).
pub(crate) fn fatal_cause(fatal: &Fatal<NodeId>) -> String {
    match fatal {
        Fatal::StorageError(openraft::StorageError::IO { source }) => {
            std::error::Error::source(source).map_or_else(|| source.to_string(), |s| s.to_string())
        }
        Fatal::StorageError(other) => other.to_string(),
        Fatal::Panicked => "the Raft core panicked".into(),
        Fatal::Stopped => "the node's Raft is stopping".into(),
    }
}

/// Watches the state machine's writes (`write_failures`) until its store
/// closes; a failed one marks `health` failed.
pub(crate) async fn watch_state_machine(
    mut failures: watch::Receiver<Option<Arc<raft_store::StoreError>>>,
    health: Arc<Health>,
) {
    if let Ok(failure) = failures.wait_for(Option::is_some).await
        && let Some(e) = failure.as_ref()
    {
        health.fail_writing_state(&e.cause());
    }
}

/// Watches `raft` until it stops; a stop on an error (not a shutdown) marks
/// `health` failed.
pub(crate) async fn watch_raft(raft: Raft, health: Arc<Health>) {
    let mut metrics = raft.metrics();
    loop {
        let fatal = match &metrics.borrow_and_update().running_state {
            Ok(()) => None,
            Err(Fatal::Stopped) => return,
            Err(f) => Some(f.clone()),
        };
        if let Some(f) = fatal {
            health.fail(&f);
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
