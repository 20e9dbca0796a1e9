//! The applied state in redb: [`StateMachineStore`].
//!
//! One file, `<data_dir>/state-machine.redb`: the applied state as rows
//! (one per group and per certificate, plus the last applied log id, the
//! membership and the cluster secrets; see [`rows`](crate::rows) for the
//! layout and its versions) and table `snapshot` the current snapshot's
//! meta; its bytes are a file in `<data_dir>/snapshots/`.
//!
//! Each batch of committed entries is applied in memory, published and
//! answered; `apply` does no I/O. The rows the batches changed are written
//! behind them: a flush, within [`FLUSH_AFTER`] of the first batch not
//! yet written, writes the rows changed since the last flush as they are
//! in the newest applied state, with the last applied log id and the
//! membership, in one durable transaction (one fsync per period under a
//! write load, whatever the number of batches, as etcd commits its backend
//! in batches). A row changed by many batches in a period is written once,
//! and a flush costs what changed, whatever the number of groups.
//!
//! Nothing acknowledged depends on the flush: every applied entry is in
//! the Raft log, fsync'd before it was committed, and each flush leaves
//! the file a consistent prefix of the log (rows and last applied log id
//! together). After a crash the file is as of its last flush, and openraft
//! re-applies the entries up to the committed index the log store saved
//! before the node serves (`get_initial_state`), so a node that restarts
//! alone and without a quorum still serves the state it last applied, less
//! at most the entries committed in its last moments, which the leader's
//! next commit index brings. The log is never purged past what is written
//! here: a snapshot's build flushes before its meta commits, and openraft
//! purges only behind that. Installing a snapshot writes every row (and
//! drops what was pending); the exit's [`seal`](StateMachineStore::seal)
//! and dropping the store flush. A flush that fails (a full disk) writes
//! nothing more, is told at once to [`write_failures`](StateMachineStore::write_failures)
//! (the node's health), and fails every later apply with its cause, so
//! openraft stops the node, as a failed apply always did.
//!
//! Entries:
//! - `Normal` runs [`State::apply`]; its `Ok` or [`ApplyError`](crate::ApplyError)
//!   is the entry's [`Response`]. A refused command changes nothing.
//! - `Blank` only moves the last applied log id.
//! - `Membership` is stored as the last membership.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

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

/// The longest an applied batch's rows wait to be written (module docs).
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);

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
    /// Writes the batches' rows behind them ([`Self::flush_soon`]).
    flusher: Arc<Flusher>,
    /// [`FLUSH_AFTER`], or what a test sets.
    flush_after: Duration,
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
        let flusher = Arc::new(Flusher::new(&db));
        Ok(Self {
            db,
            files,
            last_applied: record.last_applied,
            membership: record.membership,
            state: watch::Sender::new(AppliedState::new(
                record.last_applied.map_or(0, |l| l.index),
                Arc::new(record.state),
            )),
            flusher,
            flush_after: FLUSH_AFTER,
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

    /// Tells of the first failed write of the rows (they are written
    /// behind the batches, module docs): from then on every apply fails
    /// with it, and the node should stop as on a failed apply, even while
    /// no batch comes to fail.
    pub fn write_failures(&self) -> watch::Receiver<Option<Arc<StoreError>>> {
        self.flusher.failure.subscribe()
    }

    /// Readies the file for the process's exit ([`crate::Seal`]). Take it
    /// before handing the store to `Raft::new`.
    pub fn seal(&self) -> crate::Seal {
        crate::Seal::flushing(&self.db, &self.flusher)
    }

    /// The current applied state.
    pub fn current(&self) -> Arc<State> {
        Arc::clone(&self.state.borrow().state)
    }

    /// Sets how long a batch's rows may wait to be written, for tests.
    #[cfg(test)]
    pub(crate) fn set_flush_after(&mut self, after: Duration) {
        self.flush_after = after;
    }

    /// Writes the rows still pending now, as a flush does (module docs).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let flusher = Arc::clone(&self.flusher);
        db::blocking(&self.db, move |_| flusher.flush()).await
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

    /// The voters of the last applied membership.
    pub fn voters(&self) -> Vec<crate::NodeId> {
        self.membership.membership().voter_ids().collect()
    }

    /// Writes what is pending `flush_after` from now, unless a flush is
    /// already on its way: one that starts after this call writes what
    /// this call's batch left pending.
    fn flush_soon(&self) {
        if self.flusher.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let flusher = Arc::clone(&self.flusher);
        let after = self.flush_after;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            // Cleared before the flush takes what is pending: a batch
            // applied from now on schedules the next one.
            flusher.scheduled.store(false, Ordering::Release);
            let f = Arc::clone(&flusher);
            if let Err(e) = tokio::task::spawn_blocking(move || f.flush()).await {
                flusher.failed(StoreError::Task(e.to_string()));
            }
        });
    }
}

/// What the file lacks: the rows changed since the last flush, as they
/// are in the newest applied state.
struct Pending {
    rows: Rows,
    state: Arc<State>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// Writes the applied batches' rows behind them (module docs).
pub(crate) struct Flusher {
    /// The store's database while the store is open. Every write of rows
    /// holds this lock (a flush, a snapshot install), so that they never
    /// interleave; the store's drop clears it after its last flush, and
    /// the file then closes with the store.
    db: Mutex<Weak<Database>>,
    pending: Mutex<Option<Pending>>,
    /// A flush is on its way.
    scheduled: AtomicBool,
    /// Why the first flush that failed did: every later apply and flush
    /// answers it (redb takes no more writes after an I/O error either).
    failure: watch::Sender<Option<Arc<StoreError>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flusher {
    fn new(db: &Arc<Database>) -> Self {
        Self {
            db: Mutex::new(Arc::downgrade(db)),
            pending: Mutex::new(None),
            scheduled: AtomicBool::new(false),
            failure: watch::Sender::new(None),
        }
    }

    /// The failure every write answers once a flush failed.
    fn failure(&self) -> Option<StoreError> {
        self.failure.borrow().clone().map(StoreError::Earlier)
    }

    /// Notes a batch: the rows it changed and what the state is after it.
    fn note(
        &self,
        rows: Rows,
        state: Arc<State>,
        last_applied: Option<LogId>,
        membership: StoredMembership,
    ) {
        let mut pending = lock(&self.pending);
        let rows = match pending.take() {
            Some(older) => older.rows.merged(rows),
            None => rows,
        };
        *pending = Some(Pending {
            rows,
            state,
            last_applied,
            membership,
        });
    }

    /// Writes what is pending in one durable transaction. Blocks on file
    /// I/O.
    ///
    /// After a failure it writes nothing and answers that failure: rows
    /// written after rows that were not would leave the file claiming
    /// entries it lacks.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        let open = lock(&self.db);
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let Some(db) = open.upgrade() else {
            return Ok(());
        };
        let Some(p) = lock(&self.pending).take() else {
            return Ok(());
        };
        let written = (|| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            rows::write_changed(&txn, &p.rows, &p.state, p.last_applied, &p.membership)?;
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = written {
            // Still pending: the newest state holds them.
            let mut pending = lock(&self.pending);
            *pending = Some(match pending.take() {
                Some(newer) => Pending {
                    rows: p.rows.merged(newer.rows),
                    ..newer
                },
                None => p,
            });
            return Err(self.failed(e));
        }
        Ok(())
    }

    /// Records `e` as the failure, unless one is recorded: answers the one
    /// recorded.
    fn failed(&self, e: StoreError) -> StoreError {
        let e = Arc::new(e);
        let first = self.failure.send_if_modified(|f| {
            let first = f.is_none();
            if first {
                *f = Some(Arc::clone(&e));
            }
            first
        });
        if first {
            tracing::error!(cause = %e.cause(), "writing the state machine failed");
        }
        self.failure().unwrap_or(StoreError::Earlier(e))
    }
}

impl Drop for StateMachineStore {
    fn drop(&mut self) {
        if let Err(e) = self.flusher.flush() {
            tracing::error!(cause = %e.cause(), "writing the state machine at close failed");
        }
        *lock(&self.flusher.db) = Weak::new();
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
        if let Some(e) = self.flusher.failure() {
            return Err(e.into_storage(ErrorSubject::StateMachine, ErrorVerb::Write));
        }
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
        self.flusher
            .note(rows, Arc::clone(&state), last_applied, membership.clone());
        self.flush_soon();
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
            flusher: Arc::clone(&self.flusher),
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
        let flusher = Arc::clone(&self.flusher);
        let stored = meta.clone();
        let record = db::blocking(&self.db, move |db| {
            // Every row is written from the snapshot: what was pending is
            // older, and no flush may land after it.
            let _writing = lock(&flusher.db);
            let record = files.install(db, &stored, data)?;
            lock(&flusher.pending).take();
            Ok(record)
        })
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
