//! Seeded runs of appends and applies under injected storage faults
//! ([`crate::faults`]): what was acknowledged survives a reopen, and every
//! injected fault surfaces as an error in plain words.

use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use super::{TempDir, group, normal};
use crate::command::Command;
use crate::faults::{Faults, Plan};
use crate::model::ServiceGroup;
use crate::{LogStore, StateMachineStore};

/// Runs in the normal suite; `EDGELB_FAULT_RUNS` asks for more (1000).
fn runs() -> u64 {
    std::env::var("EDGELB_FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// Entries written per run, at most.
const WRITES: u64 = 8;

/// One run: writes until the first error, then reopens without faults and
/// checks what was acknowledged. Returns whether a fault was injected.
async fn run(seed: u64) -> bool {
    let dir = TempDir::in_memory();
    let faults = Faults::new();
    let plan = Plan::from_seed(seed, 3 * WRITES);
    let mut acked = Vec::new();
    let mut failure = None;
    let injected;
    {
        let mut log = LogStore::open_with(dir.path(), Some(&faults)).unwrap();
        let mut sm = StateMachineStore::open_with(dir.path(), Some(&faults)).unwrap();
        // The rows are written behind the applies; here at seeded points
        // (between writes) instead of on a timer, so that a seed replays.
        sm.set_flush_after(std::time::Duration::from_secs(3600));
        let mut flushes = SmallRng::seed_from_u64(seed);
        faults.arm(plan.clone());
        for i in 1..=WRITES {
            let entry = normal(
                i,
                Command::CreateGroup {
                    group: ServiceGroup {
                        uuid: Uuid::from_u128(u128::from(i)),
                        ..group(&format!("g{i}"))
                    },
                },
            );
            let result = match log.blocking_append([entry.clone()]).await {
                Ok(()) => sm.apply([entry]).await.map(|r| {
                    assert!(matches!(r[0].result, Some(Ok(_))), "seed {seed}: {r:?}");
                }),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => acked.push(i),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
            if flushes.random_bool(0.5)
                && let Err(e) = sm.flush().await
            {
                failure = Some(e.cause());
                break;
            }
        }
        // What the writes met; faults the close meets (redb writes its
        // allocator state then) surface in the node's log only.
        injected = faults.injected();
    }
    let context = format!(
        "seed {seed}: {plan:?}, injected {injected:?}, acked {acked:?}, failure {failure:?}"
    );
    if let Some(message) = &failure {
        assert!(
            !injected.is_empty(),
            "{context}: an error without a fault: {message}"
        );
        assert!(
            !message.contains("::"),
            "{context}: a type path in {message:?}"
        );
        let plain = [
            "no space left on device",
            "input/output error",
            "earlier write",
        ];
        assert!(
            plain.iter().any(|p| message.contains(p)),
            "{context}: the cause in plain words: {message:?}"
        );
    } else {
        assert!(
            injected.is_empty(),
            "{context}: a fault that surfaced nowhere"
        );
    }

    // Reopened as after a restart: every acknowledged write is in the
    // state, or in the log after the state's last applied entry, where
    // openraft re-applies it before the node serves (the state machine's
    // commits become durable a flush period after they answer).
    faults.clear();
    let mut log = LogStore::open(dir.path()).unwrap_or_else(|e| panic!("{context}: {e}"));
    let sm = StateMachineStore::open(dir.path()).unwrap_or_else(|e| panic!("{context}: {e}"));
    let state = sm.current();
    let applied = sm.last_applied().map_or(0, |l| l.index);
    // A consistent prefix: the rows of exactly the entries up to the last
    // applied one the file names.
    let mut groups: Vec<String> = state.groups().map(|g| g.name.clone()).collect();
    groups.sort();
    let mut want: Vec<String> = (1..=applied).map(|i| format!("g{i}")).collect();
    want.sort();
    assert_eq!(
        groups, want,
        "{context}: rows of another index than {applied}"
    );
    let logged = log.try_get_log_entries(1..=WRITES).await.unwrap();
    for i in &acked {
        let in_state = state.group(&format!("g{i}")).is_some();
        let to_reapply = *i > applied && logged.iter().any(|e| e.log_id.index == *i);
        assert!(
            in_state || to_reapply,
            "{context}: acknowledged write {i} lost (state applied up to {applied})"
        );
    }
    assert!(
        logged.len() >= acked.len(),
        "{context}: {} entries logged, {} acknowledged",
        logged.len(),
        acked.len()
    );
    let _ = log.get_log_state().await.unwrap();
    !injected.is_empty()
}

#[tokio::test]
async fn acknowledged_writes_survive_injected_faults() {
    let n = runs();
    let mut faulted = 0;
    for seed in 0..n {
        faulted += u64::from(run(seed).await);
    }
    // The plans are drawn so that most runs hit their fault.
    assert!(faulted * 2 > n, "{faulted} of {n} runs injected a fault");
    eprintln!("{n} seeded runs, {faulted} with an injected fault");
}
