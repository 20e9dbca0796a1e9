//! Storage and snapshot formats: migration from format 1, refusal of newer
//! formats, one row per change, and what older releases read.

use proptest::prelude::*;
use serde::Deserialize;

use super::*;
use crate::model::{ClusterSecrets, Instance};

/// A state machine record in the form earlier releases stored it (format
/// 1: no `format` field, the whole state in one record): groups `api` (one instance) and `web`, certificate
/// `edge`, the cluster secrets, applied up to index 9.
const FORMAT_1_RECORD: &str = include_str!("format-1-record.json");

/// The `state_machine`/`"current"` value in `dir`.
fn current_row(dir: &Path) -> Vec<u8> {
    let db = Database::create(dir.join(state_machine::FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(rows::STATE_MACHINE).unwrap();
    let row = table.get(rows::CURRENT).unwrap().unwrap();
    row.value().to_vec()
}

/// The record as an earlier release decodes it: no `format` field.
#[derive(Deserialize)]
struct OldRecord {
    last_applied: Option<LogId>,
    #[allow(dead_code)]
    membership: StoredMembership,
    state: State,
}

fn secrets() -> ClusterSecrets {
    ClusterSecrets {
        ca_cert_pem: "-----BEGIN CERTIFICATE-----".into(),
        ca_key_pem: String::new(),
        token_sha256: "0".repeat(64),
    }
}

fn instance(n: u128) -> Instance {
    Instance {
        uuid: Uuid::from_u128(1000 + n),
        name: format!("i{n}"),
        address: "10.0.0.1".into(),
    }
}

#[tokio::test]
async fn format_1_file_is_migrated_to_rows() {
    let dir = TempDir::new();
    set_current_row(dir.path(), FORMAT_1_RECORD.as_bytes());
    let old: OldRecord = serde_json::from_str(FORMAT_1_RECORD).unwrap();

    let (_log, mut sm) = open(dir.path());
    let state = sm.current();
    assert_eq!(*state, old.state);
    assert_eq!(state.groups().count(), 2);
    assert_eq!(state.group("api").unwrap().instances.len(), 1);
    assert!(state.certificate("edge").is_some());
    assert!(state.cluster().is_some());
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, old.last_applied);
    assert!(membership.membership().get_node(&1).is_some());
    drop((_log, sm));

    // The record became a marker that earlier releases refuse to decode,
    // rather than start from an empty state.
    let marker = current_row(dir.path());
    let json: serde_json::Value = serde_json::from_slice(&marker).unwrap();
    assert_eq!(json["format"], rows::FORMAT);
    assert!(serde_json::from_slice::<OldRecord>(&marker).is_err());

    // Opened again, the rows are read as they are.
    let (_log, sm) = open(dir.path());
    assert_eq!(*sm.current(), old.state);
    assert_eq!(sm.last_applied(), old.last_applied);
}

#[tokio::test]
async fn format_1_snapshot_moves_into_a_file_and_strays_are_removed() {
    let dir = TempDir::new();
    set_current_row(dir.path(), FORMAT_1_RECORD.as_bytes());
    let old: OldRecord = serde_json::from_str(FORMAT_1_RECORD).unwrap();
    let meta = crate::types::SnapshotMeta {
        last_log_id: old.last_applied,
        last_membership: serde_json::from_str::<serde_json::Value>(FORMAT_1_RECORD)
            .map(|v| serde_json::from_value(v["membership"].clone()).unwrap())
            .unwrap(),
        snapshot_id: "snapshot-1-1-9".into(),
    };
    {
        // Format 1 kept the snapshot's bytes in the `snapshot` table.
        let db = Database::create(dir.path().join(state_machine::FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        let mut table = txn.open_table(crate::snapshot::SNAPSHOT).unwrap();
        let meta = serde_json::to_vec(&meta).unwrap();
        table.insert("meta", meta.as_slice()).unwrap();
        table.insert("data", FORMAT_1_RECORD.as_bytes()).unwrap();
        drop(table);
        txn.commit().unwrap();
    }
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    std::fs::write(snapshots.join("receiving.tmp"), b"half").unwrap();
    std::fs::write(snapshots.join("snapshot-0-0-1.json"), b"{}").unwrap();

    let (_log, mut sm) = open(dir.path());
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, meta);
    assert_eq!(bytes_of(current.snapshot).await, FORMAT_1_RECORD.as_bytes());
    let names = file_names(&snapshots);
    assert_eq!(names, ["snapshot-1-1-9.json"]);
    // The snapshot installs elsewhere like any other.
    let other = TempDir::new();
    let (_flog, mut fsm) = open(other.path());
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    fsm.install_snapshot(&current.meta, current.snapshot)
        .await
        .unwrap();
    assert_eq!(*fsm.current(), old.state);
}

/// A node of an earlier release that installed a snapshot from this one
/// stored its record, `format` field included, as its format-1 record.
#[tokio::test]
async fn format_1_record_from_a_new_snapshot_is_migrated() {
    let dir = TempDir::new();
    let mut record: serde_json::Value = serde_json::from_str(FORMAT_1_RECORD).unwrap();
    record["format"] = 1.into();
    set_current_row(dir.path(), &serde_json::to_vec(&record).unwrap());
    let old: OldRecord = serde_json::from_value(record).unwrap();
    let (_log, sm) = open(dir.path());
    assert_eq!(*sm.current(), old.state);
    assert_eq!(sm.last_applied(), old.last_applied);
}

#[test]
fn newer_storage_format_is_refused() {
    let dir = TempDir::new();
    drop(StateMachineStore::open(dir.path()).unwrap());
    set_current_row(dir.path(), br#"{"format": 3, "layout": "?"}"#);
    let err = StateMachineStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerFormat {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("format 3"), "{err}");
}

#[tokio::test]
async fn snapshots_carry_their_format_and_earlier_releases_read_them() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    sm.apply(history()).await.unwrap();
    let snapshot = build(&mut sm).await;
    let bytes = bytes_of(snapshot.snapshot).await;
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["format"], 1);
    let old: OldRecord = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(old.state, *sm.current());

    // A snapshot from a newer release is refused before it is read.
    let other = TempDir::new();
    let (_flog, mut fsm) = open(other.path());
    let mut newer: serde_json::Value = json.clone();
    newer["format"] = 2.into();
    newer["state"] = serde_json::json!("something else");
    let data = received(&mut fsm, &serde_json::to_vec(&newer).unwrap()).await;
    let err = fsm
        .install_snapshot(&snapshot.meta, data)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("format 2"), "{err}");
    assert_eq!(fsm.applied_state().await.unwrap().0, None);

    // One without a format (an earlier release's) installs.
    let mut older = json;
    older.as_object_mut().unwrap().remove("format");
    let data = received(&mut fsm, &serde_json::to_vec(&older).unwrap()).await;
    fsm.install_snapshot(&snapshot.meta, data).await.unwrap();
    assert_eq!(*fsm.current(), *sm.current());
    drop((_flog, fsm));
    let (_flog, fsm) = open(other.path());
    assert_eq!(*fsm.current(), *sm.current());
}

#[tokio::test]
async fn a_batch_writes_only_the_rows_it_changed() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    let mut other = group("other");
    other.uuid = Uuid::from_u128(8);
    other.services[0].port = 8081;
    let create = |group| Command::CreateGroup { group };
    sm.apply([normal(1, create(group("web"))), normal(2, create(other))])
        .await
        .unwrap();
    sm.flush().await.unwrap();
    let sentinel = b"not rewritten".as_slice();
    rows::put_group_row(sm.db(), Uuid::from_u128(8), sentinel);

    let attach = Command::AttachInstance {
        group: "web".into(),
        instance: instance(1),
    };
    sm.apply([normal(3, attach)]).await.unwrap();
    sm.flush().await.unwrap();
    let row = rows::group_row(sm.db(), Uuid::from_u128(7)).unwrap();
    let web: ServiceGroup = serde_json::from_slice(&row).unwrap();
    assert_eq!(web.instances, [instance(1)]);
    let untouched = rows::group_row(sm.db(), Uuid::from_u128(8)).unwrap();
    assert_eq!(untouched, sentinel);
}

#[tokio::test]
async fn reopen_loads_every_kind_of_row() {
    let dir = TempDir::new();
    let before = {
        let (_log, mut sm) = open(dir.path());
        let mut other = group("other");
        other.uuid = Uuid::from_u128(8);
        other.services[0].port = 8081;
        let cmds = [
            Command::InitCluster { secrets: secrets() },
            Command::CreateGroup {
                group: group("web"),
            },
            Command::CreateGroup { group: other },
            Command::AttachInstance {
                group: "web".into(),
                instance: instance(1),
            },
            Command::PutCertificate {
                certificate: crate::state::fixtures::cert("edge"),
            },
            Command::DeleteGroup {
                id: "other".into(),
                force: false,
            },
        ];
        for (i, cmd) in cmds.into_iter().enumerate() {
            let r = sm.apply([normal(i as u64 + 1, cmd)]).await.unwrap();
            assert!(matches!(r[0].result, Some(Ok(_))), "{r:?}");
        }
        sm.current()
    };
    let (_log, sm) = open(dir.path());
    assert_eq!(*sm.current(), *before);
    assert!(sm.current().group("other").is_none());
    assert_eq!(sm.last_applied(), Some(log_id(1, 1, 6)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// After random commands applied in random batches, the rows read back
    /// on reopen are the state held in memory.
    #[test]
    fn rows_hold_what_memory_holds(
        cmds in prop::collection::vec(crate::state::proptests::command(), 0..30),
        cuts in prop::collection::vec(1usize..5, 30),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = TempDir::new();
        let mut memory = State::default();
        for cmd in &cmds {
            let _ = memory.apply(cmd);
        }
        rt.block_on(async {
            let (_log, mut sm) = open(dir.path());
            let mut entries = cmds.iter().cloned().enumerate()
                .map(|(i, c)| normal(i as u64 + 1, c)).peekable();
            let mut cuts = cuts.iter();
            while entries.peek().is_some() {
                let n = cuts.next().copied().unwrap_or(1);
                let batch: Vec<_> = entries.by_ref().take(n).collect();
                sm.apply(batch).await.unwrap();
            }
            assert_eq!(*sm.current(), memory);
        });
        let (_log, sm) = open(dir.path());
        prop_assert_eq!(&*sm.current(), &memory);
    }
}
