//! The Raft log and vote in redb: [`LogStore`].
//!
//! One file, `<data_dir>/raft-log.redb`, with two tables:
//!
//! ```text
//!  logs: u64 index ──▶ JSON Entry          (purged ..= last_purged, truncated from a conflict)
//!  meta: "vote"        ──▶ JSON Vote
//!        "committed"   ──▶ JSON Option<LogId> (hint for re-applying at startup)
//!        "last_purged" ──▶ JSON LogId
//! ```
//!
//! Purging is lazy: `purge` records `last_purged` and removes at most
//! [`PURGE_CHUNK`] rows; every `append` removes up to as many more of the
//! rows at or below it in its own transaction. Openraft runs `purge` inline
//! in its core, and a snapshot purges everything applied since the last
//! one (thousands of entries at a large state, hundreds of milliseconds of
//! redb work): done at once, that stalled this node's appends and votes
//! past the RPC limit, on every member at the same moment. The rows left
//! at or below `last_purged` are out of the log already: reads start after
//! it and the log's last id is never below it.
//!
//! Each operation is one redb write transaction, so a crash leaves the log
//! as it was before or after it, never in between (no holes). `append`,
//! `truncate`, `purge` and `save_vote` commit with `Durability::Immediate`
//! (fsync) before they return, and `append` calls openraft's flush callback
//! only after that commit: a vote or an entry this node acknowledged is on
//! disk. `save_committed` commits with `Durability::None`; the next durable
//! commit carries it, and losing it costs only a re-apply that openraft does
//! anyway once the leader repeats the commit index. redb recovers to a
//! prefix of the commit sequence, so a saved `committed` never points past
//! the durable log.
//!
//! redb is blocking: every call runs on tokio's blocking pool
//! (`spawn_blocking`), so an fsync never stalls the runtime's workers, which
//! the Raft core shares with the data plane. Raft calls the store one
//! operation at a time (`&mut self`), so writes stay in order.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::db::{self, StoreError};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// File name of the log database inside the data dir.
pub(crate) const FILE: &str = "raft-log.redb";

pub(crate) const LOGS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The most purged rows one transaction removes: a few milliseconds of
/// redb work at most, however far a snapshot moved `last_purged`.
pub(crate) const PURGE_CHUNK: u64 = 32;

/// The Raft log, vote and commit hint, stored in redb.
///
/// Cheap to clone; clones share the database and serve as openraft's log
/// reader (redb read transactions see the last commit and do not block
/// writers).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The last commit index openraft reported (0 before any), for
    /// `GET /v1/cluster` and metrics.
    committed: Arc<AtomicU64>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

/// A [`LogStore`] that does not keep the file open: once every
/// [`LogStore`] is dropped (Raft stopped), the file closes and another
/// process may open it.
#[derive(Clone, Debug)]
pub struct WeakLogStore {
    db: std::sync::Weak<Database>,
    committed: Arc<AtomicU64>,
}

impl WeakLogStore {
    /// The log store, while the file is open.
    pub fn upgrade(&self) -> Option<LogStore> {
        Some(LogStore {
            db: self.db.upgrade()?,
            committed: Arc::clone(&self.committed),
        })
    }
}

impl LogStore {
    /// A handle that does not keep the file open.
    pub fn downgrade(&self) -> WeakLogStore {
        WeakLogStore {
            db: Arc::downgrade(&self.db),
            committed: Arc::clone(&self.committed),
        }
    }

    /// Opens the log in `dir` (creating `dir` and the file if needed).
    ///
    /// Blocks on file I/O; call it at startup or from `spawn_blocking`. A
    /// file already opened by another `LogStore` (in this or another
    /// process) is refused.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, None)
    }

    /// [`LogStore::open`], through a fault-injecting backend when `faults`
    /// is given (tests: [`crate::faults`]).
    pub fn open_with(
        dir: &Path,
        faults: Option<&Arc<crate::faults::Faults>>,
    ) -> Result<Self, StoreError> {
        let db = db::open(dir, FILE, faults)?;
        let path = dir.join(FILE);
        db::guarded(&path, || {
            let txn = db.begin_write()?;
            txn.open_table(LOGS)?;
            txn.open_table(META)?;
            txn.commit()?;
            verify(&db)
        })?;
        Ok(Self {
            db,
            committed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The id of the last purged log entry: the log holds nothing at or
    /// below it (a state machine rebuilt here must start at or after it).
    /// Blocking.
    pub fn last_purged(&self) -> Result<Option<LogId>, StoreError> {
        read_meta(&self.db, LAST_PURGED)
    }

    /// Readies the file for the process's exit ([`crate::Seal`]).
    pub fn seal(&self) -> crate::Seal {
        crate::Seal::new(&self.db)
    }

    /// A live view of the commit index (0 before the first commit).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    async fn get_meta<T>(&self, key: &'static str) -> Result<Option<T>, StoreError>
    where
        T: DeserializeOwned + Send + 'static,
    {
        db::blocking(&self.db, move |db| read_meta(db, key)).await
    }

    async fn put_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let bytes = db::encode(value, key)?;
        db::blocking(&self.db, move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability);
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    meta_value(&txn.open_table(META)?, key)
}

fn meta_value<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match table.get(key)? {
        Some(v) => db::decode(v.value(), key).map(Some),
        None => Ok(None),
    }
}

/// Reads the whole log once, at open: every meta value and every entry
/// after `last_purged` decodes, each row holds the entry of its index, and
/// the indexes follow each other from `last_purged`. A damaged page found
/// here stops the start, with the file named, instead of failing the Raft
/// core later on the first read that meets it (a follower lagging behind,
/// a restart's re-apply).
fn verify(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let _: Option<Vote> = meta_value(&meta, VOTE)?;
    let _: Option<Option<LogId>> = meta_value(&meta, COMMITTED)?;
    let purged: Option<LogId> = meta_value(&meta, LAST_PURGED)?;
    let mut expected = purged.map(|p| p.index.saturating_add(1));
    for row in txn.open_table(LOGS)?.iter()? {
        let (k, v) = row?;
        let index = k.value();
        if purged.is_some_and(|p| index <= p.index) {
            continue;
        }
        if let Some(want) = expected
            && index != want
        {
            return Err(StoreError::Inconsistent(format!(
                "the log jumps from entry {} to entry {index}",
                want.saturating_sub(1)
            )));
        }
        decode_entry(index, v.value())?;
        expected = Some(index.saturating_add(1));
    }
    Ok(())
}

/// Removes up to [`PURGE_CHUNK`] of the rows at or below `last_purged`
/// inside `txn`, oldest first.
fn remove_purged(txn: &WriteTransaction, last_purged: Option<LogId>) -> Result<(), StoreError> {
    let Some(purged) = last_purged else {
        return Ok(());
    };
    let mut table = txn.open_table(LOGS)?;
    let first = match table.first()? {
        Some((k, _)) => k.value(),
        None => return Ok(()),
    };
    if first > purged.index {
        return Ok(());
    }
    let end = purged.index.min(first.saturating_add(PURGE_CHUNK - 1));
    table.retain_in(first..=end, |_, _| false)?;
    Ok(())
}

/// Decodes the entry stored at `index`, checking that it claims that index.
fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StoreError> {
    let entry: Entry = db::decode(bytes, format_args!("log entry {index}"))?;
    if entry.log_id.index != index {
        return Err(StoreError::Inconsistent(format!(
            "log row {index} holds entry {}",
            entry.log_id
        )));
    }
    Ok(entry)
}

/// `[start, end)` of a range of indexes; `end` `None` means unbounded.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i.checked_add(1),
        Bound::Excluded(&i) => Some(i),
        Bound::Unbounded => None,
    };
    (start, end)
}

/// The most bytes of stored entries one read for replication returns (at
/// least one entry): openraft reads an append's whole range, up to
/// `max_payload_entries`, and after each partial success (the node cuts
/// an append to what the link carries) it reads the rest of that range
/// again, so an unbounded read decoded the same entries over and over on
/// a slow link.
pub const REPLICATION_READ_BYTES: usize = 1024 * 1024;

fn read_entries(db: &Database, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
    read_entries_within(db, start, end, usize::MAX)
}

/// [`read_entries`], stopping once the rows read pass `max_bytes` (the
/// first always read).
fn read_entries_within(
    db: &Database,
    start: u64,
    end: Option<u64>,
    max_bytes: usize,
) -> Result<Vec<Entry>, StoreError> {
    let txn = db.begin_read()?;
    // Rows at or below `last_purged` not removed yet are not in the log.
    let purged: Option<LogId> = meta_value(&txn.open_table(META)?, LAST_PURGED)?;
    let start = purged.map_or(start, |p| start.max(p.index.saturating_add(1)));
    let table = txn.open_table(LOGS)?;
    let rows = match end {
        Some(end) if end <= start => return Ok(Vec::new()),
        Some(end) => table.range(start..end)?,
        None => table.range(start..)?,
    };
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    for row in rows {
        let (k, v) = row?;
        if !entries.is_empty() && bytes.saturating_add(v.value().len()) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(v.value().len());
        entries.push(decode_entry(k.value(), v.value())?);
    }
    Ok(entries)
}

fn log_state(db: &Database) -> Result<LogState<TypeConfig>, StoreError> {
    let txn = db.begin_read()?;
    let last_purged: Option<LogId> = meta_value(&txn.open_table(META)?, LAST_PURGED)?;
    let table = txn.open_table(LOGS)?;
    let last = match table.last()? {
        // A row left at or below `last_purged` (all of the log purged).
        Some((k, _)) if last_purged.is_some_and(|p| k.value() <= p.index) => last_purged,
        Some((k, v)) => Some(decode_entry(k.value(), v.value())?.log_id),
        None => last_purged,
    };
    Ok(LogState {
        last_purged_log_id: last_purged,
        last_log_id: last,
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        db::blocking(&self.db, move |db| read_entries(db, start, end))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }

    /// At most [`REPLICATION_READ_BYTES`] of `[start, end)` (at least one
    /// entry of a non-empty range).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        db::blocking(&self.db, move |db| {
            read_entries_within(db, start, Some(end), REPLICATION_READ_BYTES)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        db::blocking(&self.db, log_state)
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote, Durability::Immediate)
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        self.put_meta(COMMITTED, &committed, Durability::None)
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        // Stored as `Option<LogId>`: `Some(None)` is a saved "nothing yet".
        let committed: Option<Option<LogId>> = self
            .get_meta(COMMITTED)
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Read))?;
        let committed = committed.flatten();
        // Openraft reads it once at startup and saves it again only at the
        // next commit: until then the index it read is the one reported (a
        // lone voter that restarts commits nothing before its next write).
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = |e: StoreError| e.into_storage(ErrorSubject::Logs, ErrorVerb::Write);
        let rows = entries
            .into_iter()
            .map(|e| {
                let index = e.log_id.index;
                db::encode(&e, format_args!("log entry {index}")).map(|bytes| (index, bytes))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(write)?;
        let res = db::blocking(&self.db, move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            {
                let mut table = txn.open_table(LOGS)?;
                for (index, bytes) in &rows {
                    table.insert(index, bytes.as_slice())?;
                }
            }
            let purged = meta_value(&txn.open_table(META)?, LAST_PURGED)?;
            remove_purged(&txn, purged)?;
            txn.commit()?;
            Ok(())
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncate log");
        db::blocking(&self.db, move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            txn.open_table(LOGS)?
                .retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purge log");
        let purged = db::encode(&log_id, LAST_PURGED)
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete))?;
        db::blocking(&self.db, move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            txn.open_table(META)?
                .insert(LAST_PURGED, purged.as_slice())?;
            remove_purged(&txn, Some(log_id))?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}
