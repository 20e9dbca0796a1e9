//! Storage tests: openraft's conformance suite over a temp dir, restart,
//! corruption and snapshot round trips.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite, log_id};
use openraft::{EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder};
use redb::{Database, ReadableTable};
use uuid::Uuid;

use crate::command::Command;
use crate::model::{DEFAULT_HARD_LIMIT, Domain, Handler, Service, ServiceGroup};
use crate::state::{Applied, ApplyError, State};
use crate::types::{
    ClusterNode, Entry, LogId, Request, Response, StorageError, StoredMembership, TypeConfig, Vote,
};
use crate::{LogStore, StateMachineStore, StoreError, log_store, rows, state_machine};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        Self::under(std::env::temp_dir())
    }

    /// In memory (`/dev/shm`) where there is one: fsyncs cost nothing
    /// there, for tests that run many seeds.
    fn in_memory() -> Self {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Self::under(shm.to_owned())
        } else {
            Self::new()
        }
    }

    fn under(base: PathBuf) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!(
            "edgelb-raft-store-{}-{n}-{}",
            std::process::id(),
            Uuid::new_v4().simple()
        ));
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &Path) -> (LogStore, StateMachineStore) {
    (
        LogStore::open(dir).unwrap(),
        StateMachineStore::open(dir).unwrap(),
    )
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new();
        let (log, sm) = open(dir.path());
        Ok((dir, log, sm))
    }
}

mod formats;

/// A file holding `bytes`, as openraft hands a received snapshot over.
async fn received(sm: &mut StateMachineStore, bytes: &[u8]) -> Box<tokio::fs::File> {
    use tokio::io::AsyncWriteExt;
    let mut file = sm.begin_receiving_snapshot().await.unwrap();
    file.write_all(bytes).await.unwrap();
    file.flush().await.unwrap();
    file
}

/// The names of the files in `dir`.
fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// A snapshot built now.
async fn build(sm: &mut StateMachineStore) -> crate::types::Snapshot {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

/// The bytes of a snapshot's file.
async fn bytes_of(mut file: Box<tokio::fs::File>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await.unwrap();
    bytes
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap_or_else(|e| panic!("{e}"));
}

fn group(name: &str) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(7),
        name: name.into(),
        domains: vec![Domain {
            fqdn: format!("{name}.edgelb.local"),
            certificate: None,
        }],
        services: vec![Service {
            port: 8080,
            destination_port: 80,
            handlers: vec![Handler::Http],
        }],
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: vec![],
        created_at: "2024-01-01T00:00:00Z".into(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    }
}

fn node(n: u64) -> ClusterNode {
    ClusterNode {
        region: "eu".into(),
        cluster_addr: format!("127.0.0.{n}:7000"),
        admin_addr: format!("127.0.0.{n}:8000"),
    }
}

fn normal(index: u64, command: Command) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Request { command }),
    }
}

fn membership(index: u64) -> Entry {
    let nodes = BTreeMap::from([(1, node(1))]);
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1])], nodes)),
    }
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Blank,
    }
}

/// blank, membership, create "web", another create of "web" (refused).
fn history() -> Vec<Entry> {
    vec![
        blank(1),
        membership(2),
        normal(
            3,
            Command::CreateGroup {
                group: group("web"),
            },
        ),
        normal(
            4,
            Command::CreateGroup {
                group: another("web"),
            },
        ),
    ]
}

/// A group named `name` created by another request (another uuid).
fn another(name: &str) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(8),
        ..group(name)
    }
}

#[tokio::test]
async fn apply_answers_outcomes_and_publishes_state() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    let mut rx = sm.subscribe();
    assert_eq!(rx.borrow_and_update().state.groups().count(), 0);

    let responses = sm.apply(history()).await.unwrap();
    assert_eq!(responses.len(), 4);
    assert_eq!(responses[0], Response { result: None });
    assert_eq!(responses[1], Response { result: None });
    assert!(matches!(responses[2].result, Some(Ok(Applied::Group(_)))));
    assert!(matches!(
        responses[3].result,
        Some(Err(ApplyError::Conflict(_)))
    ));

    assert!(rx.has_changed().unwrap());
    let published = rx.borrow_and_update().clone();
    assert!(published.state.group("web").is_some());
    assert_eq!(published.index, 4);
    assert!(sm.current().group("web").is_some());
    let (applied, mem) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1, 4)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 1, 2)));

    // A batch that changes nothing in the state moves the published index
    // and keeps sharing the same state.
    let refused = Command::CreateGroup {
        group: another("web"),
    };
    let responses = sm.apply([blank(5), normal(6, refused)]).await.unwrap();
    assert!(matches!(responses[1].result, Some(Err(_))));
    assert!(rx.has_changed().unwrap());
    let after = rx.borrow_and_update().clone();
    assert_eq!(after.index, 6);
    assert!(Arc::ptr_eq(&after.state, &published.state));
    assert_eq!(sm.last_applied(), Some(log_id(1, 1, 6)));
}

#[tokio::test]
async fn reopen_restores_vote_log_and_state() {
    let dir = TempDir::new();
    let vote = Vote::new_committed(3, 1);
    {
        let (mut log, mut sm) = open(dir.path());
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(history()).await.unwrap();
        log.save_committed(Some(log_id(1, 1, 4))).await.unwrap();
        sm.apply(history()).await.unwrap();
    }

    let (mut log, mut sm) = open(dir.path());
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.committed_index().load(Ordering::Relaxed), 0);
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 1, 4)));
    // The commit index reported is the stored one from the start.
    assert_eq!(log.committed_index().load(Ordering::Relaxed), 4);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, None);
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 4)));
    let entries = log.try_get_log_entries(1..5).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.log_id).collect::<Vec<_>>(),
        (1..5).map(|i| log_id(1, 1, i)).collect::<Vec<_>>()
    );
    assert_eq!(entries[2].payload, history()[2].payload);

    let (applied, mem) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1, 4)));
    assert_eq!(mem.membership().get_node(&1), Some(&node(1)));
    assert!(sm.current().group("web").is_some());
    assert!(sm.subscribe().borrow().state.group("web").is_some());
}

#[tokio::test]
async fn purge_and_truncate_survive_reopen() {
    let dir = TempDir::new();
    {
        let (mut log, _sm) = open(dir.path());
        log.blocking_append((1..=6).map(blank)).await.unwrap();
        log.purge(log_id(1, 1, 2)).await.unwrap();
        log.truncate(log_id(1, 1, 5)).await.unwrap();
    }
    let (mut log, _sm) = open(dir.path());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 4)));
    let entries = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        [3, 4]
    );
    let reversed = (Bound::Included(4), Bound::Excluded(3));
    assert!(log.try_get_log_entries(reversed).await.unwrap().is_empty());
}

/// Replication's reads stop once past `REPLICATION_READ_BYTES` (openraft
/// reads the rest of a range again after each partial success), and always
/// return at least one entry of a non-empty range.
#[tokio::test]
async fn replication_reads_are_bounded_in_bytes() {
    let dir = TempDir::new();
    let (mut log, _sm) = open(dir.path());
    // Ten entries of about 300 KB.
    let big = |index| {
        normal(
            index,
            Command::DetachInstance {
                group: "g".repeat(300_000),
                instance: format!("i{index}"),
            },
        )
    };
    log.blocking_append((1..=10).map(big)).await.unwrap();
    let limited = log.limited_get_log_entries(1, 11).await.unwrap();
    let indexes: Vec<u64> = limited.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, [1, 2, 3]);
    // From where openraft goes on, and one entry however large.
    let next = log.limited_get_log_entries(4, 11).await.unwrap();
    assert_eq!(next.first().map(|e| e.log_id.index), Some(4));
    assert_eq!(next.len(), 3);
    let huge = normal(
        11,
        Command::DetachInstance {
            group: "g".repeat(2 * log_store::REPLICATION_READ_BYTES),
            instance: "i".into(),
        },
    );
    log.blocking_append([huge]).await.unwrap();
    assert_eq!(log.limited_get_log_entries(11, 12).await.unwrap().len(), 1);
    // Other reads are whole.
    assert_eq!(log.try_get_log_entries(1..12).await.unwrap().len(), 11);
}

/// `encoded_len` is the length of the row an entry is stored as.
#[test]
fn encoded_len_is_the_stored_length() {
    for entry in history() {
        let row = crate::db::encode(&entry, "entry").unwrap();
        assert_eq!(crate::encoded_len(&entry), Some(row.len()));
    }
}

/// The indexes of the rows in the log file of `dir`, purged or not.
fn log_rows(dir: &Path) -> Vec<u64> {
    let db = Database::create(dir.join(log_store::FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(log_store::LOGS).unwrap();
    table
        .iter()
        .unwrap()
        .map(|r| r.unwrap().0.value())
        .collect()
}

async fn indexes(log: &mut LogStore) -> Vec<u64> {
    let entries = log.try_get_log_entries(..).await.unwrap();
    entries.iter().map(|e| e.log_id.index).collect()
}

#[tokio::test]
async fn a_long_purge_is_removed_a_chunk_per_append() {
    let chunk = log_store::PURGE_CHUNK;
    let last = 3 * chunk + 7;
    let dir = TempDir::new();
    let (mut log, sm) = open(dir.path());
    log.blocking_append((1..=last).map(blank)).await.unwrap();
    log.purge(log_id(1, 1, last - 2)).await.unwrap();
    // Out of the log at once, whatever rows are left.
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, last - 2)));
    assert_eq!(state.last_log_id, Some(log_id(1, 1, last)));
    assert_eq!(indexes(&mut log).await, [last - 1, last]);
    assert!(
        log.try_get_log_entries(1..=last - 2)
            .await
            .unwrap()
            .is_empty()
    );
    // All of it purged: the last id is the purged one.
    log.purge(log_id(1, 1, last)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 1, last)));
    assert!(indexes(&mut log).await.is_empty());
    drop((log, sm));
    // Each purge removed one chunk, the oldest rows.
    assert_eq!(
        log_rows(dir.path()),
        (2 * chunk + 1..=last).collect::<Vec<_>>()
    );

    let (mut log, sm) = open(dir.path());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, last)));
    assert_eq!(state.last_log_id, Some(log_id(1, 1, last)));
    assert!(indexes(&mut log).await.is_empty());
    // Each append removes up to a chunk more: two take the rest.
    log.blocking_append([blank(last + 1)]).await.unwrap();
    log.blocking_append([blank(last + 2)]).await.unwrap();
    assert_eq!(indexes(&mut log).await, [last + 1, last + 2]);
    drop((log, sm));
    assert_eq!(log_rows(dir.path()), [last + 1, last + 2]);
}

/// Overwrites the value of log row `index` in the log file of `dir`.
fn corrupt_log_row(dir: &Path, index: u64, bytes: &[u8]) {
    let db = Database::create(dir.join(log_store::FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(log_store::LOGS)
        .unwrap()
        .insert(index, bytes)
        .unwrap();
    txn.commit().unwrap();
}

#[tokio::test]
async fn a_damaged_log_row_stops_the_open_naming_the_file() {
    let dir = TempDir::new();
    {
        let (mut log, _sm) = open(dir.path());
        log.blocking_append((1..=3).map(blank)).await.unwrap();
    }
    corrupt_log_row(dir.path(), 2, b"{\"log_id\": not json");
    let err = LogStore::open(dir.path()).unwrap_err();
    let StoreError::Corrupt { path, problem } = &err else {
        panic!("{err}");
    };
    assert_eq!(path, &dir.path().join(log_store::FILE));
    assert!(problem.contains("log entry 2"), "{err}");
}

#[tokio::test]
async fn log_row_with_wrong_index_is_an_error() {
    let dir = TempDir::new();
    {
        let (mut log, _sm) = open(dir.path());
        log.blocking_append((1..=2).map(blank)).await.unwrap();
    }
    let other = serde_json::to_vec(&blank(9)).unwrap();
    corrupt_log_row(dir.path(), 2, &other);
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { problem, .. } if problem.contains("log row 2")),
        "{err}"
    );
}

/// Sets `state_machine`/`"current"` in the state machine file of `dir`,
/// creating both if needed.
fn set_current_row(dir: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    let db = Database::create(dir.join(state_machine::FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(rows::STATE_MACHINE)
        .unwrap()
        .insert(rows::CURRENT, bytes)
        .unwrap();
    txn.commit().unwrap();
}

#[test]
fn corrupt_state_machine_record_is_an_open_error() {
    let dir = TempDir::new();
    drop(StateMachineStore::open(dir.path()).unwrap());
    set_current_row(dir.path(), b"{\"state\": 1}");
    let err = StateMachineStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { path, .. } if path.ends_with(state_machine::FILE)),
        "{err}"
    );
}

#[test]
fn second_open_of_one_dir_is_an_error() {
    let dir = TempDir::new();
    let _log = LogStore::open(dir.path()).unwrap();
    assert!(matches!(
        LogStore::open(dir.path()),
        Err(StoreError::Open { .. })
    ));
}

/// Entries from index 5 on, each a `set` of `web`'s hard limit applied
/// once under request `n` (for `n` in `requests`).
fn patches_once(requests: impl IntoIterator<Item = u128>) -> Vec<Entry> {
    requests
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let command = Command::Once {
                request: Uuid::from_u128(n),
                command: Box::new(Command::PatchGroup {
                    id: "web".into(),
                    patch: crate::command::Patch::HardLimit(n as u32 + 1),
                }),
            };
            normal(5 + i as u64, command)
        })
        .collect()
}

/// The requests applied once are rows too: a reopened node, and one that
/// installed a snapshot, still tells a retry apart, and the rows of those
/// forgotten past the limit are gone.
#[tokio::test]
async fn requests_applied_once_survive_reopen_and_snapshots() {
    let dir = TempDir::new();
    let kept = crate::state::REQUESTS_KEPT as u128;
    {
        let (_log, mut sm) = open(dir.path());
        sm.apply(history()).await.unwrap();
        // Two more than are kept: requests 0 and 1 are forgotten.
        sm.apply(patches_once(0..kept + 2)).await.unwrap();
    }
    let (_log, mut sm) = open(dir.path());
    let state = sm.current();
    assert!(!state.applied_request(&Uuid::from_u128(0)));
    assert!(!state.applied_request(&Uuid::from_u128(1)));
    assert!(state.applied_request(&Uuid::from_u128(2)));
    assert!(state.applied_request(&Uuid::from_u128(kept + 1)));
    assert_eq!(state.requests().count(), kept as usize);
    // After the reopen and another write, the newest sent again changes
    // nothing.
    let index = 5 + kept as u64 + 2;
    let set = Command::PatchGroup {
        id: "web".into(),
        patch: crate::command::Patch::HardLimit(1),
    };
    let mut again = patches_once([kept + 1]);
    again[0].log_id = log_id(1, 1, index + 1);
    sm.apply([normal(index, set)].into_iter().chain(again))
        .await
        .unwrap();
    assert_eq!(sm.current().group("web").map(|g| g.hard_limit), Some(1));

    let snapshot = build(&mut sm).await;
    let follower = TempDir::new();
    let (_flog, mut fsm) = open(follower.path());
    fsm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(fsm.current().requests().count(), kept as usize);
    drop((_flog, fsm));
    let (_flog, fsm) = open(follower.path());
    assert!(fsm.current().applied_request(&Uuid::from_u128(kept + 1)));
    assert!(!fsm.current().applied_request(&Uuid::from_u128(1)));
}

#[tokio::test]
async fn snapshot_survives_reopen_and_installs_elsewhere() {
    let leader = TempDir::new();
    let meta = {
        let (_log, mut sm) = open(leader.path());
        sm.apply(history()).await.unwrap();
        let snapshot = build(&mut sm).await;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 1, 4)));
        snapshot.meta
    };
    let (_log, mut sm) = open(leader.path());
    let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snapshot.meta, meta);

    let follower = TempDir::new();
    let (_flog, mut fsm) = open(follower.path());
    let mut rx = fsm.subscribe();
    fsm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert!(rx.has_changed().unwrap());
    let installed = rx.borrow_and_update().clone();
    assert!(installed.state.group("web").is_some());
    assert_eq!(installed.index, 4);
    assert_eq!(fsm.applied_state().await.unwrap().0, Some(log_id(1, 1, 4)));
    drop((_flog, fsm));

    let (_flog, mut fsm) = open(follower.path());
    assert!(fsm.current().group("web").is_some());
    let current = fsm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, meta);
}

/// Each snapshot received goes into a file of its own: one started while
/// another's bytes wait for their install does not truncate them, and
/// neither leaves a file behind in the snapshot directory.
#[tokio::test]
async fn a_snapshot_received_next_does_not_touch_the_one_before() {
    let leader = TempDir::new();
    let (_log, mut sm) = open(leader.path());
    sm.apply(history()).await.unwrap();
    let snapshot = build(&mut sm).await;
    let bytes = bytes_of(snapshot.snapshot).await;

    let follower = TempDir::new();
    let (_flog, mut fsm) = open(follower.path());
    let first = received(&mut fsm, &bytes).await;
    let _next = received(&mut fsm, b"{").await;
    fsm.install_snapshot(&snapshot.meta, first).await.unwrap();
    assert!(fsm.current().group("web").is_some());
    let names = file_names(&follower.path().join("snapshots"));
    assert!(!names.iter().any(|n| n == "receiving.tmp"), "{names:?}");
}

#[tokio::test]
async fn bad_snapshot_is_an_error_and_changes_nothing() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    let last = Some(log_id(2, 1, 9));
    let meta = crate::types::SnapshotMeta {
        last_log_id: last,
        last_membership: StoredMembership::default(),
        snapshot_id: "x".into(),
    };
    let garbage = received(&mut sm, b"\x00not json").await;
    assert!(sm.install_snapshot(&meta, garbage).await.is_err());

    // Decodes, but is not what the meta claims.
    let record = serde_json::json!({
        "last_applied": Option::<LogId>::None,
        "membership": StoredMembership::default(),
        "state": State::default(),
    });
    let mismatched = received(&mut sm, &serde_json::to_vec(&record).unwrap()).await;
    let err = sm.install_snapshot(&meta, mismatched).await.unwrap_err();
    assert!(err.to_string().contains("inconsistent"), "{err}");

    assert_eq!(sm.applied_state().await.unwrap().0, None);
    assert!(sm.get_current_snapshot().await.unwrap().is_none());
}

#[tokio::test]
async fn state_is_shared_not_copied_per_reader() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    sm.apply(history()).await.unwrap();
    assert!(Arc::ptr_eq(&sm.current(), &sm.subscribe().borrow().state));
}

#[tokio::test]
async fn changed_since_names_what_each_batch_changed() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    let rx = sm.subscribe();
    sm.apply(history()).await.unwrap();
    let at4 = rx.borrow().clone();
    let web = Uuid::from_u128(7);
    let only_web = crate::Changed {
        groups: BTreeSet::from([web]),
        ..Default::default()
    };
    assert_eq!(at4.changed_since(0), Some(only_web.clone()));
    assert_eq!(at4.changed_since(4), Some(crate::Changed::default()));
    assert_eq!(at4.changed_since(5), None);

    // A refused command and a blank change nothing.
    let refused = Command::CreateGroup {
        group: another("web"),
    };
    sm.apply([blank(5), normal(6, refused)]).await.unwrap();
    let at6 = rx.borrow().clone();
    assert_eq!(at6.changed_since(4), Some(crate::Changed::default()));
    assert_eq!(at6.changed_since(2), Some(only_web.clone()));

    let delete = Command::DeleteGroup {
        id: "web".into(),
        force: false,
    };
    let put = Command::PutCertificate {
        certificate: crate::state::fixtures::cert("c"),
    };
    sm.apply([normal(7, delete), normal(8, put)]).await.unwrap();
    let at8 = rx.borrow().clone();
    let web_and_certs = crate::Changed {
        certificates: ["c".to_owned()].into(),
        ..only_web.clone()
    };
    assert_eq!(at8.changed_since(6), Some(web_and_certs.clone()));
    assert_eq!(at8.changed_since(0), Some(web_and_certs));
    // Older published states keep their own answers.
    assert_eq!(at6.changed_since(4), Some(crate::Changed::default()));

    // A restarted store knows nothing before what it loaded.
    drop((_log, sm));
    let (_log, sm) = open(dir.path());
    let loaded = sm.subscribe().borrow().clone();
    assert_eq!(loaded.index, 8);
    assert_eq!(loaded.changed_since(8), Some(crate::Changed::default()));
    assert_eq!(loaded.changed_since(7), None);
}

mod corrupt;
mod faults;
mod flush;
