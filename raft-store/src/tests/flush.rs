//! The state machine's rows: written a flush period behind the batches
//! that changed them, not by each batch (`state_machine` module docs).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::time::Instant;
use uuid::Uuid;

use super::{TempDir, build, group, normal, open};
use crate::command::Command;
use crate::faults::{Fault, Faults, Op, Plan};
use crate::model::ServiceGroup;
use crate::{StateMachineStore, rows, state_machine};

/// The paused clock's step around a deadline: timers due at the same
/// instant fire in no set order.
const TICK: Duration = Duration::from_millis(1);

fn create(index: u64) -> crate::types::Entry {
    normal(
        index,
        Command::CreateGroup {
            group: ServiceGroup {
                uuid: Uuid::from_u128(u128::from(index)),
                ..group(&format!("g{index}"))
            },
        },
    )
}

/// The state machine as a crash would leave it now: its file as the kernel
/// holds it (what a killed process leaves behind), copied and opened alone.
/// Returns the last applied index it holds and its groups' names, sorted.
fn after_a_crash(dir: &Path) -> (u64, Vec<String>) {
    let image = TempDir::new();
    let snapshots = image.path().join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    std::fs::copy(
        dir.join(state_machine::FILE),
        image.path().join(state_machine::FILE),
    )
    .unwrap();
    if let Ok(files) = std::fs::read_dir(dir.join("snapshots")) {
        for f in files {
            let f = f.unwrap();
            std::fs::copy(f.path(), snapshots.join(f.file_name())).unwrap();
        }
    }
    let sm = StateMachineStore::open(image.path()).unwrap();
    let applied = sm.last_applied().map_or(0, |l| l.index);
    let mut names: Vec<String> = sm.current().groups().map(|g| g.name.clone()).collect();
    names.sort();
    (applied, names)
}

/// `g1`…`gN`, sorted as strings.
fn names(n: u64) -> Vec<String> {
    let mut v: Vec<String> = (1..=n).map(|i| format!("g{i}")).collect();
    v.sort();
    v
}

/// A store in `dir` that flushes `after` a batch, whose every write to
/// its file fails from now on (until the faults are cleared).
fn failing_writes(dir: &TempDir, after: Duration) -> (Arc<Faults>, StateMachineStore) {
    let faults = Faults::new();
    let mut sm = StateMachineStore::open_with(dir.path(), Some(&faults)).unwrap();
    sm.set_flush_after(after);
    faults.arm(Plan {
        op: Op::Write,
        fault: Fault::Io,
        after: 0,
        times: None,
        file: Some(state_machine::FILE.into()),
    });
    (faults, sm)
}

#[tokio::test]
async fn batches_answer_without_touching_the_file_and_the_seal_writes_them() {
    let dir = TempDir::new();
    // A batch that wrote the file would fail.
    let (faults, mut sm) = failing_writes(&dir, Duration::from_secs(3600));
    for i in 1..=20 {
        let r = sm.apply([create(i)]).await.unwrap();
        assert!(matches!(r[0].result, Some(Ok(_))), "{r:?}");
    }
    assert!(faults.injected().is_empty(), "{:?}", faults.injected());
    assert_eq!(sm.current().groups().count(), 20);
    assert_eq!(after_a_crash(dir.path()), (0, vec![]));

    faults.clear();
    sm.seal().seal().await.unwrap();
    assert_eq!(after_a_crash(dir.path()), (20, names(20)));
}

#[tokio::test]
async fn a_snapshot_is_built_only_once_the_rows_up_to_it_are_written() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    sm.set_flush_after(Duration::from_secs(3600));
    for i in 1..=5 {
        sm.apply([create(i)]).await.unwrap();
    }
    let snapshot = build(&mut sm).await;
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(5));
    // openraft purges the log behind it now: the file holds what it held.
    assert_eq!(after_a_crash(dir.path()), (5, names(5)));
}

#[tokio::test]
async fn an_installed_snapshot_drops_the_rows_still_pending() {
    let source = TempDir::new();
    let (_slog, mut leader) = open(source.path());
    for i in 1..=3 {
        leader.apply([create(i)]).await.unwrap();
    }
    let snapshot = build(&mut leader).await;

    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    sm.set_flush_after(Duration::from_secs(3600));
    // Pending when the snapshot arrives: a group the snapshot lacks.
    sm.apply([normal(
        1,
        Command::CreateGroup {
            group: ServiceGroup {
                uuid: Uuid::from_u128(99),
                ..group("stale")
            },
        },
    )])
    .await
    .unwrap();
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    sm.seal().seal().await.unwrap();
    assert_eq!(after_a_crash(dir.path()), (3, names(3)));
}

/// On the paused clock: the flush `after` the first batch fails, the
/// failure is told then, and every apply from then on fails with it.
#[tokio::test(start_paused = true)]
async fn a_failed_write_fails_the_next_apply_in_plain_words() {
    let dir = TempDir::new();
    let after = Duration::from_millis(10);
    let (faults, mut sm) = failing_writes(&dir, after);
    sm.apply([create(1)]).await.unwrap();
    // Until the flush nothing is written, and applies answer.
    tokio::time::sleep(after - TICK).await;
    sm.apply([create(2)]).await.unwrap();
    assert!(faults.injected().is_empty(), "{:?}", faults.injected());
    assert!(sm.write_failures().borrow().is_none());
    // Just past it: the flush has failed.
    tokio::time::sleep(2 * TICK).await;
    assert!(!faults.injected().is_empty());
    // Told at once to whoever watches (the node's health), with the cause.
    let told = sm
        .write_failures()
        .borrow()
        .clone()
        .expect("a failure told");
    assert!(told.cause().contains("input/output error"), "{told}");
    let next = 3;
    let error = sm.apply([create(next)]).await.unwrap_err().to_string();
    assert!(
        error.contains("input/output error") && !error.contains("::"),
        "{error}"
    );
    // Nothing is written after the failed flush, whatever comes: the file
    // never claims entries whose rows it lacks.
    faults.clear();
    assert!(sm.seal().seal().await.is_err());
    assert!(sm.apply([create(next + 1)]).await.is_err());
    drop(sm);
    let (applied, groups) = after_a_crash(dir.path());
    assert_eq!(groups, names(applied));
    assert!(
        applied < next,
        "the file claims {applied}, applied {}",
        next - 1
    );
}

/// On the paused clock: the rows of batches applied over most of a flush
/// period are in the file one period after the first of them, not before
/// (later batches do not put the flush off).
#[tokio::test(start_paused = true)]
async fn the_rows_are_written_within_the_flush_period() {
    let dir = TempDir::new();
    let (_log, mut sm) = open(dir.path());
    let after = Duration::from_millis(50);
    sm.set_flush_after(after);
    // The last applied index and the groups in the file; read from the open
    // file (a copy could catch a commit midway): every commit of the flush
    // is durable.
    let written = |sm: &StateMachineStore| {
        let written = rows::load(sm.db()).unwrap();
        let mut groups: Vec<String> = written.state.groups().map(|g| g.name.clone()).collect();
        groups.sort();
        (written.last_applied.map_or(0, |l| l.index), groups)
    };
    let spacing = Duration::from_millis(10);
    for round in 0..2u64 {
        let first = 5 * round + 1;
        let last = first + 4;
        let began = Instant::now();
        for i in first..=last {
            sm.apply([create(i)]).await.unwrap();
            if i < last {
                tokio::time::sleep(spacing).await;
            }
        }
        tokio::time::sleep_until(began + after - TICK).await;
        assert_eq!(
            written(&sm),
            (first - 1, names(first - 1)),
            "round {round}, just before the period is up"
        );
        tokio::time::sleep_until(began + after + TICK).await;
        assert_eq!(
            written(&sm),
            (last, names(last)),
            "round {round}, just after the period is up"
        );
    }
}
