//! Snapshots: the whole state machine as one JSON document.
//!
//! A snapshot's bytes are one JSON record,
//! `{"last_applied": …, "membership": …, "state": …}`: the [`State`], the
//! last applied log id and the membership as of it. The state machine
//! persists itself in the same format, so installing a snapshot writes its
//! bytes as they came.
//! `State` serialises deterministically (ordered maps), so two snapshots with
//! the same last log id hold the same bytes on every node, and the id is
//! derived from that log id.
//!
//! The current snapshot (meta and bytes) lives in the `snapshot` table of the
//! state machine's file and is written with `Durability::Immediate`: the log
//! is purged behind it, and a lagging or new node is sent it after a restart.

use std::io::Cursor;
use std::sync::Arc;

use openraft::{ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::db::{self, StoreError};
use crate::state::State;
use crate::types::{LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

pub(crate) const SNAPSHOT: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");
const META: &str = "meta";
const DATA: &str = "data";

/// The state machine as stored and as sent in a snapshot. `S` is `&State`
/// when writing and `State` when reading.
#[derive(Serialize, Deserialize)]
pub(crate) struct SmRecord<S> {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: S,
}

/// The snapshot id for a snapshot up to `last`.
pub(crate) fn snapshot_id(last: Option<LogId>) -> String {
    match last {
        Some(id) => format!("snapshot-{id}"),
        None => "snapshot-empty".to_owned(),
    }
}

/// Writes `meta` and `data` as the current snapshot, inside `txn`.
pub(crate) fn write(
    txn: &WriteTransaction,
    meta: &SnapshotMeta,
    data: &[u8],
) -> Result<(), StoreError> {
    let meta = db::encode(meta, "snapshot meta")?;
    let mut table = txn.open_table(SNAPSHOT)?;
    table.insert(META, meta.as_slice())?;
    table.insert(DATA, data)?;
    Ok(())
}

/// The current snapshot's meta, if there is one.
fn read_meta(txn: &WriteTransaction) -> Result<Option<SnapshotMeta>, StoreError> {
    let table = txn.open_table(SNAPSHOT)?;
    let meta = match table.get(META)? {
        Some(v) => Some(db::decode(v.value(), "snapshot meta")?),
        None => None,
    };
    Ok(meta)
}

/// The current snapshot, if there is one.
pub(crate) fn read(db: &Database) -> Result<Option<Snapshot>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (table.get(META)?, table.get(DATA)?) else {
        return Ok(None);
    };
    let meta: SnapshotMeta = db::decode(meta.value(), "snapshot meta")?;
    Ok(Some(Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data.value().to_vec())),
    }))
}

/// Builds a snapshot of the state machine as it was when the builder was
/// taken; applying goes on meanwhile.
pub struct SnapshotBuilder {
    pub(crate) db: Arc<Database>,
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
        let stored = meta.clone();
        let signature = meta.signature();
        let data = db::blocking(&self.db, move |db| {
            let record = SmRecord {
                last_applied: stored.last_log_id,
                membership: stored.last_membership.clone(),
                state: &*state,
            };
            let data = db::encode(&record, "snapshot")?;
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            // A snapshot installed meanwhile may be newer: keep it.
            let newer = read_meta(&txn)?.is_some_and(|m| m.last_log_id > stored.last_log_id);
            if newer {
                txn.abort()?;
            } else {
                write(&txn, &stored, &data)?;
                txn.commit()?;
            }
            Ok(data)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Snapshot(Some(signature)), ErrorVerb::Write))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
