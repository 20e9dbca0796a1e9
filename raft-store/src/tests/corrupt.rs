//! Damaged files in the data dir: each stops the open with the file named
//! ([`StoreError::Corrupt`]), and a corrupt state machine or snapshot is
//! rebuilt from what the node holds without losing an applied entry
//! ([`StateMachineStore::open_rebuilding`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::log_id;
use uuid::Uuid;

use super::{TempDir, blank, build, group, membership, normal, open};
use crate::command::Command;
use crate::faults::damage;
use crate::model::ServiceGroup;
use crate::types::Entry;
use crate::{LogStore, RebuiltFrom, StateMachineStore, StoreError, log_store, state_machine};

fn named(i: u64) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(1000 + u128::from(i)),
        ..group(&format!("grp-{i:04}"))
    }
}

/// Entry `index`: blank at 1, the membership at 2, then a new group each.
fn entry(index: u64) -> Entry {
    match index {
        1 => blank(1),
        2 => membership(2),
        i => normal(i, Command::CreateGroup { group: named(i) }),
    }
}

/// A data dir whose log holds entries 1..=`last`, whose state machine
/// applied them all, with a snapshot at `snapshot_at` (none at 0).
async fn written(dir: &Path, last: u64, snapshot_at: u64) -> BTreeSet<String> {
    let (mut log, mut sm) = open(dir);
    log.blocking_append((1..=last).map(entry)).await.unwrap();
    if snapshot_at > 0 {
        sm.apply((1..=snapshot_at).map(entry)).await.unwrap();
        build(&mut sm).await;
    }
    sm.apply((snapshot_at + 1..=last).map(entry)).await.unwrap();
    names(&sm)
}

fn names(sm: &StateMachineStore) -> BTreeSet<String> {
    sm.current().groups().map(|g| g.name.clone()).collect()
}

/// What openraft does at start: re-applies the log after the state
/// machine's last applied entry, up to `committed`.
async fn reapply(log: &mut LogStore, sm: &mut StateMachineStore, committed: u64) {
    let from = sm.applied_state().await.unwrap().0.map_or(0, |l| l.index) + 1;
    let entries = log.try_get_log_entries(from..=committed).await.unwrap();
    assert_eq!(
        entries.len() as u64,
        committed + 1 - from,
        "a hole in the log"
    );
    sm.apply(entries).await.unwrap();
}

fn garble(path: &Path, needle: &str) {
    damage::garble_pages(path, needle).unwrap();
}

fn truncate(path: &Path, to: impl FnOnce(u64) -> u64) {
    damage::truncate(path, to).unwrap();
}

/// A named way to damage a file.
type Damage = (&'static str, fn(&Path));

fn corrupt_path(err: &StoreError) -> PathBuf {
    match err {
        StoreError::Corrupt { path, .. } => path.clone(),
        other => panic!("not a corrupt file: {other}"),
    }
}

#[tokio::test]
async fn a_damaged_or_truncated_log_does_not_open() {
    let cases: [Damage; 3] = [
        ("garbage", |p| garble(p, "grp-0030")),
        ("half", |p| truncate(p, |l| l / 2)),
        ("empty", |p| truncate(p, |_| 0)),
    ];
    for (case, damage) in cases {
        let dir = TempDir::new();
        written(dir.path(), 60, 0).await;
        let file = dir.path().join(log_store::FILE);
        damage(&file);
        let err = LogStore::open(dir.path()).expect_err(case);
        eprintln!("{case}: {err}");
        assert_eq!(corrupt_path(&err), file, "{case}: {err}");
        if case == "empty" {
            assert!(err.to_string().contains("empty"), "{err}");
        }
    }
}

#[tokio::test]
async fn a_damaged_state_machine_is_rebuilt_from_the_snapshot_and_the_log() {
    let cases: [Damage; 3] = [
        ("garbage", |p| garble(p, "grp-0035")),
        ("half", |p| truncate(p, |l| l / 2)),
        ("empty", |p| truncate(p, |_| 0)),
    ];
    for (case, damage) in cases {
        let dir = TempDir::new();
        let before = written(dir.path(), 40, 20).await;
        let file = dir.path().join(state_machine::FILE);
        damage(&file);
        let err = StateMachineStore::open(dir.path()).expect_err(case);
        eprintln!("{case}: {err}");
        assert_eq!(corrupt_path(&err), file, "{case}: {err}");

        let mut log = LogStore::open(dir.path()).unwrap();
        let purged = log.last_purged().unwrap();
        let (mut sm, rebuilt) =
            StateMachineStore::open_rebuilding(dir.path(), None, purged).unwrap();
        let rebuilt = rebuilt.expect("rebuilt");
        assert_eq!(rebuilt.corrupt, file);
        assert_eq!(rebuilt.from, RebuiltFrom::Snapshot(Some(log_id(1, 1, 20))));
        let aside = &rebuilt.moved_aside[0];
        assert!(aside.exists(), "{case}: {aside:?}");
        assert!(
            aside
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("state-machine.redb.corrupt-"),
            "{aside:?}"
        );
        // The snapshot's state, its meta kept for new members; then the
        // log after it, as openraft re-applies it.
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 1, 20)));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 1, 20)));
        reapply(&mut log, &mut sm, 40).await;
        assert_eq!(names(&sm), before, "{case}");
        drop((log, sm));
        // Durable: an ordinary open finds the rebuilt state.
        let (_log, sm) = open(dir.path());
        assert_eq!(names(&sm), before, "{case}: after a reopen");
    }
}

#[tokio::test]
async fn a_missing_state_machine_above_a_purged_log_is_rebuilt_from_the_snapshot() {
    let dir = TempDir::new();
    let before = written(dir.path(), 40, 20).await;
    let mut log = LogStore::open(dir.path()).unwrap();
    log.purge(log_id(1, 1, 10)).await.unwrap();
    let purged = log.last_purged().unwrap();
    std::fs::remove_file(dir.path().join(state_machine::FILE)).unwrap();
    let (mut sm, rebuilt) = StateMachineStore::open_rebuilding(dir.path(), None, purged).unwrap();
    let rebuilt = rebuilt.expect("rebuilt");
    assert_eq!(rebuilt.from, RebuiltFrom::Snapshot(Some(log_id(1, 1, 20))));
    assert!(rebuilt.moved_aside.is_empty());
    reapply(&mut log, &mut sm, 40).await;
    assert_eq!(names(&sm), before);
}

#[tokio::test]
async fn without_a_snapshot_an_unpurged_log_is_replayed_whole() {
    let dir = TempDir::new();
    let before = written(dir.path(), 30, 0).await;
    garble(&dir.path().join(state_machine::FILE), "grp-0012");
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.last_purged().unwrap(), None);
    let (mut sm, rebuilt) = StateMachineStore::open_rebuilding(dir.path(), None, None).unwrap();
    assert_eq!(rebuilt.unwrap().from, RebuiltFrom::Empty);
    assert_eq!(sm.applied_state().await.unwrap().0, None);
    reapply(&mut log, &mut sm, 30).await;
    assert_eq!(names(&sm), before);
}

#[tokio::test]
async fn a_log_purged_past_every_readable_snapshot_refuses_the_rebuild() {
    // No snapshot at all, and one that ends before the purge.
    for snapshot_at in [0, 20] {
        let dir = TempDir::new();
        written(dir.path(), 40, snapshot_at).await;
        let mut log = LogStore::open(dir.path()).unwrap();
        log.purge(log_id(1, 1, 30)).await.unwrap();
        let purged = log.last_purged().unwrap();
        drop(log);
        let file = dir.path().join(state_machine::FILE);
        garble(&file, "grp-0035");
        let err = StateMachineStore::open_rebuilding(dir.path(), None, purged).unwrap_err();
        let StoreError::CannotRebuild { path, why } = &err else {
            panic!("{err}");
        };
        assert_eq!(path, &file);
        assert!(why.contains("purged up to index 30"), "{why}");
        // Nothing was moved: the operator's next step starts from the
        // same files.
        assert!(file.exists());
        assert!(
            !std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("corrupt-")),
            "a file was moved aside"
        );
    }
}

#[tokio::test]
async fn a_damaged_snapshot_file_is_dropped_and_the_state_machine_kept() {
    let cases: [Damage; 3] = [
        ("garbage", |p| garble(p, "grp-0010")),
        ("half", |p| truncate(p, |l| l / 2)),
        ("empty", |p| truncate(p, |_| 0)),
    ];
    let parses: Damage = ("a name changed, still JSON", |p| {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(text.contains("grp-0010"));
        std::fs::write(p, text.replace("grp-0010", "grp-9999")).unwrap();
    });
    for (case, damage) in cases.into_iter().chain([parses]) {
        let dir = TempDir::new();
        let before = written(dir.path(), 40, 20).await;
        let snapshot = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "json"))
            .expect("a snapshot file");
        damage(&snapshot);
        let err = StateMachineStore::open(dir.path()).expect_err(case);
        eprintln!("{case}: {err}");
        assert_eq!(corrupt_path(&err), snapshot, "{case}: {err}");

        let (mut sm, rebuilt) = StateMachineStore::open_rebuilding(dir.path(), None, None).unwrap();
        assert_eq!(rebuilt.unwrap().from, RebuiltFrom::StateMachine, "{case}");
        assert_eq!(names(&sm), before, "{case}");
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 1, 40)));
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        // A new one builds, and an ordinary open accepts it.
        build(&mut sm).await;
        drop(sm);
        let sm = StateMachineStore::open(dir.path()).unwrap();
        assert_eq!(names(&sm), before);
    }
}

#[tokio::test]
async fn an_intact_store_opens_as_it_is_when_asked_to_rebuild() {
    let dir = TempDir::new();
    let before = written(dir.path(), 30, 10).await;
    let (sm, rebuilt) = StateMachineStore::open_rebuilding(dir.path(), None, None).unwrap();
    assert_eq!(rebuilt, None);
    assert_eq!(names(&sm), before);
}
