//! Snapshots: the whole state machine as one JSON document.
//!
//! A snapshot's bytes are one JSON record,
//! `{"format": 1, "last_applied": …, "membership": …, "state": …}`: the
//! [`State`] in its serialised form, the last applied log id and the
//! membership as of it. `State` serialises deterministically (ordered
//! maps), so two snapshots with the same last log id hold the same bytes
//! on every node, and the id is derived from that log id.
//!
//! Versions: `format` is the snapshot format, [`SNAPSHOT_FORMAT`]. A record
//! without it is format 1 as written by earlier releases, which is the same
//! document; earlier releases ignore the field, so snapshots pass both ways
//! during a rolling upgrade. A record of a newer format is refused with
//! [`StoreError::NewerFormat`] before its state is read. A change that an
//! earlier release would misread must raise the format *and* be sent only
//! once every member reads it.
//!
//! Building streams the JSON from an O(1) clone of the state, taken when
//! openraft asks for a builder, into a file on the blocking pool, while
//! applying goes on. Installing copies the received bytes into a file,
//! decodes the state from it and writes its rows (see
//! [`rows`](crate::rows)) and the snapshot's meta in one transaction.
//!
//! The current snapshot's meta lives in the `snapshot` table of the state
//! machine's file and its bytes in `<data_dir>/snapshots/` ([`files`]),
//! both durable before openraft is told: the log is purged behind it, and
//! a lagging or new node is sent it after a restart.

pub(crate) mod files;

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use openraft::{ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::db::{self, StoreError};
use crate::state::State;
use crate::types::{LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

pub(crate) const SNAPSHOT: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");
pub(crate) const META: &str = "meta";
/// Format-1 data dirs kept the snapshot's bytes here; moved to a file.
const DATA: &str = "data";

pub(crate) use files::Files;

/// The snapshot format this release writes and the newest it reads.
pub(crate) const SNAPSHOT_FORMAT: u32 = 1;

/// The state machine as sent in a snapshot (and as stored in format 1).
/// `S` is `&State` when writing and `State` when reading.
#[derive(Serialize, Deserialize)]
pub(crate) struct SmRecord<S> {
    /// Absent in records of earlier releases: format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) format: Option<u32>,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: S,
}

impl SmRecord<State> {
    /// A state machine that applied nothing.
    pub(crate) fn empty() -> Self {
        Self {
            format: None,
            last_applied: None,
            membership: StoredMembership::default(),
            state: State::default(),
        }
    }
}

/// Only the format of a record, read before the rest.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    format: Option<u32>,
}

/// Decodes a snapshot from `data`, refusing a format newer than this
/// release reads before decoding the state.
pub(crate) fn decode<R: Read + Seek>(mut data: R) -> Result<SmRecord<State>, StoreError> {
    let what = "received snapshot";
    let fail = |source| StoreError::Decode {
        what: what.into(),
        source,
    };
    let head: Head = serde_json::from_reader(&mut data).map_err(fail)?;
    let found = head.format.unwrap_or(1);
    if found > SNAPSHOT_FORMAT {
        return Err(StoreError::NewerFormat {
            what: "the received snapshot".into(),
            found,
            supported: SNAPSHOT_FORMAT,
        });
    }
    data.seek(SeekFrom::Start(0))
        .map_err(|source| StoreError::Io {
            what: what.into(),
            source,
        })?;
    serde_json::from_reader(data).map_err(fail)
}

/// The fewest log entries between two snapshots.
pub const MIN_SNAPSHOT_INTERVAL: u64 = 500;

/// How many log entries to apply between two snapshots of `state`.
///
/// A snapshot costs O(state) (serialising and writing every group) while
/// the applied state is persisted row by row, so snapshots only bound the
/// log's length and what a new or far-behind node replays. Spacing them by
/// a tenth of the state's rows (groups + instances), at least
/// [`MIN_SNAPSHOT_INTERVAL`], keeps their cost per write constant: every
/// 500 entries for a small state, every 11,000 at 10,000 groups of 10
/// instances (about 25 MB of JSON, built off the apply path).
pub fn snapshot_interval(state: &State) -> u64 {
    let rows = state.group_count() + state.instance_count();
    MIN_SNAPSHOT_INTERVAL.max(u64::try_from(rows / 10).unwrap_or(u64::MAX))
}

/// The snapshot id for a snapshot up to `last`.
pub(crate) fn snapshot_id(last: Option<LogId>) -> String {
    match last {
        Some(id) => format!("snapshot-{id}"),
        None => "snapshot-empty".to_owned(),
    }
}

/// Builds a snapshot of the state machine as it was when the builder was
/// taken; applying goes on meanwhile.
pub struct SnapshotBuilder {
    pub(crate) db: Arc<Database>,
    /// Flushed before the meta commits: openraft purges the log behind the
    /// snapshot once it is built, so the file must hold the rows up to it.
    pub(crate) flusher: Arc<crate::state_machine::Flusher>,
    pub(crate) files: Arc<Files>,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: Arc<State>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: snapshot_id(self.last_applied),
        };
        let state = Arc::clone(&self.state);
        let files = Arc::clone(&self.files);
        let stored = meta.clone();
        let signature = meta.signature();
        let started = std::time::Instant::now();
        let flusher = Arc::clone(&self.flusher);
        let file = db::blocking(&self.db, move |db| {
            flusher.flush()?;
            files.build(db, &stored, &state)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Snapshot(Some(signature)), ErrorVerb::Write))?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or_default();
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            took_ms = started.elapsed().as_millis(),
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{inst, state, web};

    #[test]
    fn interval_grows_with_the_state() {
        assert_eq!(snapshot_interval(&state()), MIN_SNAPSHOT_INTERVAL);
        let mut big = web();
        big.instances = (0..20_000u128)
            .map(|i| inst(10_000 + i, &format!("i{i}")))
            .collect();
        let s = State::from_parts([big], [], None).unwrap();
        assert_eq!(snapshot_interval(&s), 2_000);
    }
}
