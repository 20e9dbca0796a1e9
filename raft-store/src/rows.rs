//! The applied state as rows in redb, and the versions of its layout.
//!
//! Storage format 2 (this release), in `<data_dir>/state-machine.redb`:
//!
//! | table | key | value (JSON) |
//! |---|---|---|
//! | `sm_groups` | group uuid (`u128`) | the [`ServiceGroup`] |
//! | `sm_certificates` | certificate name | the [`Certificate`] |
//! | `sm_meta` | `last_applied`, `membership`, `cluster` | log id, membership, [`ClusterSecrets`] |
//! | `sm_requests` | sequence number (`u64`) | a request uuid (`u128`) applied lately under `Command::Once` |
//! | `state_machine` | `"current"` | the version marker `{"format": 2, …}` |
//!
//! An applied batch writes the rows its commands changed plus the two
//! small meta rows, in one transaction: its cost follows the change, not
//! the state. `sm_requests` came later within format 2: a file without it
//! reads as remembering no request, and a release before it leaves the
//! table alone (it never applies `Command::Once`, which it cannot read).
//!
//! Format 1 (releases before rows) kept the whole state machine as one JSON
//! record (`{"last_applied", "membership", "state"}`, the snapshot form)
//! under `state_machine`/`"current"`. [`load`] migrates such a file to
//! format 2 in one transaction the first time it opens it. The marker that
//! replaces the record lacks the fields a format-1 reader needs, so an
//! older binary started on a migrated data dir stops with a decode error
//! instead of serving an empty state; a file whose marker names a format
//! newer than [`FORMAT`] is refused the same way here.

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::changes::Rows;
use crate::db::{self, StoreError};
use crate::model::{Certificate, ClusterSecrets, ServiceGroup};
use crate::snapshot::SmRecord;
use crate::state::State;
use crate::types::{LogId, StoredMembership};

/// The storage format this release writes and reads (and every older one
/// it migrates from).
pub(crate) const FORMAT: u32 = 2;

/// Holds the format marker; in format 1 it held the whole record.
pub(crate) const STATE_MACHINE: TableDefinition<'_, &str, &[u8]> =
    TableDefinition::new("state_machine");
pub(crate) const CURRENT: &str = "current";
const GROUPS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("sm_groups");
const CERTIFICATES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sm_certificates");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sm_meta");
const REQUESTS: TableDefinition<'_, u64, u128> = TableDefinition::new("sm_requests");
const LAST_APPLIED: &str = "last_applied";
const MEMBERSHIP: &str = "membership";
const CLUSTER: &str = "cluster";

/// The value of `state_machine`/`"current"` from format 2 on.
#[derive(Serialize, Deserialize)]
struct Marker {
    format: u32,
    #[serde(default)]
    layout: String,
}

/// What [`load`] read.
pub(crate) struct Loaded {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: State,
    /// The file was format 1 and is now format 2.
    pub(crate) migrated: bool,
}

/// Reads the applied state, migrating a format-1 file and initialising an
/// empty one; refuses a newer format. Blocking; at startup.
pub(crate) fn load(db: &Database) -> Result<Loaded, StoreError> {
    let txn = db.begin_write()?;
    let current = txn
        .open_table(STATE_MACHINE)?
        .get(CURRENT)?
        .map(|v| v.value().to_vec());
    let loaded = match current {
        None => {
            // A new file, or one that never applied anything.
            let empty = SmRecord::empty();
            write_all(&txn, &empty.state, empty.last_applied, &empty.membership)?;
            txn.commit()?;
            Loaded {
                last_applied: None,
                membership: empty.membership,
                state: empty.state,
                migrated: false,
            }
        }
        Some(bytes) => match format_of(&bytes)? {
            FORMAT => {
                drop(txn);
                read_all(db)?
            }
            1 => {
                let record: SmRecord<State> = db::decode(&bytes, "state machine (format 1)")?;
                write_all(&txn, &record.state, record.last_applied, &record.membership)?;
                txn.commit()?;
                Loaded {
                    last_applied: record.last_applied,
                    membership: record.membership,
                    state: record.state,
                    migrated: true,
                }
            }
            found => {
                return Err(StoreError::NewerFormat {
                    what: "the state machine".into(),
                    found,
                    supported: FORMAT,
                });
            }
        },
    };
    Ok(loaded)
}

/// The format of a `state_machine`/`"current"` value: the marker's, or 1
/// for a whole record. A record may itself say `"format": 1` (the snapshot
/// format, when an earlier release stored a snapshot of a later one as its
/// record): that is format 1 too, as storage formats start their markers
/// at 2.
fn format_of(bytes: &[u8]) -> Result<u32, StoreError> {
    if let Ok(marker) = serde_json::from_slice::<Marker>(bytes) {
        return Ok(marker.format);
    }
    // Not a marker: it must be a format-1 record (decoded by the caller).
    Ok(1)
}

/// Replaces every row with `state`, `last_applied` and `membership` (a
/// migration or a snapshot install), inside `txn`.
pub(crate) fn write_all(
    txn: &WriteTransaction,
    state: &State,
    last_applied: Option<LogId>,
    membership: &StoredMembership,
) -> Result<(), StoreError> {
    txn.delete_table(GROUPS)?;
    txn.delete_table(CERTIFICATES)?;
    txn.delete_table(META)?;
    txn.delete_table(REQUESTS)?;
    {
        let mut requests = txn.open_table(REQUESTS)?;
        for (seq, uuid) in state.requests() {
            requests.insert(seq, uuid.as_u128())?;
        }
        let mut groups = txn.open_table(GROUPS)?;
        for g in state.groups() {
            let bytes = db::encode(g, format_args!("group {}", g.uuid))?;
            groups.insert(g.uuid.as_u128(), bytes.as_slice())?;
        }
        let mut certs = txn.open_table(CERTIFICATES)?;
        for c in state.certificates() {
            let bytes = db::encode(c, format_args!("certificate {:?}", c.name))?;
            certs.insert(c.name.as_str(), bytes.as_slice())?;
        }
    }
    let cluster = Rows {
        cluster: true,
        ..Rows::default()
    };
    write_changed(txn, &cluster, state, last_applied, membership)?;
    let marker = Marker {
        format: FORMAT,
        layout: "rows in sm_groups, sm_certificates, sm_meta, sm_requests".into(),
    };
    let marker = db::encode(&marker, "format marker")?;
    txn.open_table(STATE_MACHINE)?
        .insert(CURRENT, marker.as_slice())?;
    Ok(())
}

/// Writes the rows named in `rows` as they are in `state` (removing those
/// it no longer holds) and the meta rows, inside `txn`.
pub(crate) fn write_changed(
    txn: &WriteTransaction,
    rows: &Rows,
    state: &State,
    last_applied: Option<LogId>,
    membership: &StoredMembership,
) -> Result<(), StoreError> {
    let mut groups = txn.open_table(GROUPS)?;
    for uuid in &rows.groups {
        match state.group_by_uuid(uuid) {
            Some(g) => {
                let bytes = db::encode(&**g, format_args!("group {uuid}"))?;
                groups.insert(uuid.as_u128(), bytes.as_slice())?;
            }
            None => {
                groups.remove(uuid.as_u128())?;
            }
        }
    }
    let mut certs = txn.open_table(CERTIFICATES)?;
    for name in &rows.certificates {
        match state.certificate(name) {
            Some(c) => {
                let bytes = db::encode(c, format_args!("certificate {name:?}"))?;
                certs.insert(name.as_str(), bytes.as_slice())?;
            }
            None => {
                certs.remove(name.as_str())?;
            }
        }
    }
    if !rows.requests.is_empty() {
        let mut requests = txn.open_table(REQUESTS)?;
        for &seq in &rows.requests {
            match state.request_at(seq) {
                Some(uuid) => {
                    requests.insert(seq, uuid.as_u128())?;
                }
                None => {
                    requests.remove(seq)?;
                }
            }
        }
    }
    let mut meta = txn.open_table(META)?;
    if rows.cluster {
        match state.cluster() {
            Some(c) => {
                meta.insert(CLUSTER, db::encode(c, "cluster secrets")?.as_slice())?;
            }
            None => {
                meta.remove(CLUSTER)?;
            }
        }
    }
    meta.insert(
        LAST_APPLIED,
        db::encode(&last_applied, "last applied")?.as_slice(),
    )?;
    meta.insert(MEMBERSHIP, db::encode(membership, "membership")?.as_slice())?;
    Ok(())
}

/// Reads every row of a format-2 file.
fn read_all(db: &Database) -> Result<Loaded, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(meta.get(key)?.map(|v| v.value().to_vec()))
    };
    let last_applied: Option<LogId> = match get(LAST_APPLIED)? {
        Some(b) => db::decode(&b, "last applied")?,
        None => None,
    };
    let membership: StoredMembership = match get(MEMBERSHIP)? {
        Some(b) => db::decode(&b, "membership")?,
        None => StoredMembership::default(),
    };
    let cluster: Option<ClusterSecrets> = match get(CLUSTER)? {
        Some(b) => Some(db::decode(&b, "cluster secrets")?),
        None => None,
    };
    let mut groups = Vec::new();
    for row in txn.open_table(GROUPS)?.iter()? {
        let (key, value) = row?;
        let uuid = Uuid::from_u128(key.value());
        let g: ServiceGroup = db::decode(value.value(), format_args!("group row {uuid}"))?;
        if g.uuid != uuid {
            return Err(StoreError::Inconsistent(format!(
                "group row {uuid} holds group {}",
                g.uuid
            )));
        }
        groups.push(g);
    }
    let mut certificates = Vec::new();
    for row in txn.open_table(CERTIFICATES)?.iter()? {
        let (key, value) = row?;
        let name = key.value();
        let c: Certificate = db::decode(value.value(), format_args!("certificate row {name:?}"))?;
        certificates.push(c);
    }
    let mut requests = Vec::new();
    // A file written before the table has none.
    match txn.open_table(REQUESTS) {
        Ok(table) => {
            for row in table.iter()? {
                let (seq, uuid) = row?;
                requests.push((seq.value(), Uuid::from_u128(uuid.value())));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let state = State::from_parts(groups, certificates, cluster)
        .and_then(|s| s.with_request_rows(requests))
        .map_err(StoreError::Inconsistent)?;
    Ok(Loaded {
        last_applied,
        membership,
        state,
        migrated: false,
    })
}

/// Overwrites a group row, for tests.
#[cfg(test)]
pub(crate) fn put_group_row(db: &Database, uuid: Uuid, bytes: &[u8]) {
    let txn = db.begin_write().unwrap();
    txn.open_table(GROUPS)
        .unwrap()
        .insert(uuid.as_u128(), bytes)
        .unwrap();
    txn.commit().unwrap();
}

/// A group row as stored, for tests.
#[cfg(test)]
pub(crate) fn group_row(db: &Database, uuid: Uuid) -> Option<Vec<u8>> {
    let txn = db.begin_read().ok()?;
    let table = txn.open_table(GROUPS).ok()?;
    let row = table.get(uuid.as_u128()).ok()??;
    Some(row.value().to_vec())
}
