//! Seeded storage faults (ENOSPC and EIO on writes, resizes and fsyncs,
//! torn writes) under in-process nodes, through raft-store's fault-injecting
//! redb backend: on one node, and on a follower of a three-node cluster.
//!
//! Each run arms a plan drawn from its seed, writes, and then holds the node
//! to what the issue asks: a write that failed was answered in plain words;
//! an injected fault stops the Raft core and shows in `/healthz`, `/readyz`
//! and `edgelb_storage_failed` (the binary then exits 74, which the test
//! plays by restarting the node on its data dir); after that restart every
//! acknowledged write is there once the node caught up, and the node
//! writes again. So no run ends
//! with a node alive but unable to write, or a lost acknowledged write.
//!
//! The normal suite runs a few seeds; `EDGELB_FAULT_RUNS=1000` (and
//! `EDGELB_FAULT_SEED` for the first seed) runs more:
//! `EDGELB_FAULT_RUNS=1000 cargo test --release -p integration --test disk faults`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::ensure;
use http::{Method, StatusCode};
use integration::{AdminClient, wait_until};
use raft_store::faults::Plan;

use crate::harness::{Member, cluster, group};

/// Writes per run.
const WRITES: usize = 5;
/// A plan's fault comes after up to this many matching operations.
const MAX_AFTER: u64 = 12;

fn runs(default: u64) -> (u64, u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    (
        env("EDGELB_FAULT_SEED").unwrap_or(0),
        env("EDGELB_FAULT_RUNS").unwrap_or(default),
    )
}

/// Writes `WRITES` groups through `via`; returns those acknowledged. A
/// refused write must be a 503 in plain words.
async fn write(via: &AdminClient, seed: u64, context: &str) -> anyhow::Result<Vec<String>> {
    let mut acked = Vec::new();
    for i in 0..WRITES {
        let name = format!("s{seed}-{i}");
        let r = via
            .request(Method::POST, "/v1/services", Some(&group(&name)))
            .await?;
        if r.status.is_success() {
            acked.push(name);
            continue;
        }
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        ensure!(
            r.status == StatusCode::SERVICE_UNAVAILABLE && !message.contains("::"),
            "{context}: write {name} answered {} {message:?}",
            r.status
        );
        break;
    }
    Ok(acked)
}

/// One node: seeded faults, writes, and the checks of the module's doc.
async fn one_node(first: u64, n: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut node = Member::start(1, "fault-token-one-node", None).await?;
    let mut acked_all = BTreeSet::new();
    let mut faulted = 0;
    for seed in first..first + n {
        let plan = Plan::from_seed(seed, MAX_AFTER);
        let context = format!("one node, seed {seed} ({plan:?})");
        let before = node.faults.injected().len();
        node.faults.arm(plan);
        let acked = write(&node.client, seed, &context).await?;
        let injected = node.faults.injected().len() > before;
        if injected {
            faulted += 1;
            node.assert_failure_surfaced(&context).await?;
            node.restart().await?;
        } else {
            node.faults.clear();
            ensure!(
                acked.len() == WRITES,
                "{context}: a write failed with no fault"
            );
        }
        acked_all.extend(acked);
        // Every acknowledged write is there once the node caught up. A
        // restarted node serves at once what its state machine file and
        // the log's saved commit index hold; a write acknowledged in the
        // fault's last moments (its rows not yet written, its commit not
        // yet durable) comes back when the node, its own leader, commits
        // its log again (docs/storage.md).
        let lost = || async {
            node.groups()
                .await
                .map(|s| acked_all.difference(&s).cloned().collect::<Vec<_>>())
                .unwrap_or_else(|e| vec![e.to_string()])
        };
        if let Err(e) = wait_until(
            &format!("{context}: every acknowledged write"),
            Duration::from_secs(10),
            || async { lost().await.is_empty() },
        )
        .await
        {
            anyhow::bail!("{e}; acknowledged writes lost: {:?}", lost().await);
        }
        // Not alive and unable to write: the next write works.
        let probe = write(&node.client, seed + 1_000_000, &context).await?;
        ensure!(
            probe.len() == WRITES,
            "{context}: the node no longer writes"
        );
        acked_all.extend(probe);
    }
    eprintln!(
        "one node: {n} seeded runs from {first}, {faulted} with an injected fault, {} writes acknowledged and kept, {:?}",
        acked_all.len(),
        started.elapsed()
    );
    node.stop().await
}

/// A three-node cluster whose node 3 (a follower) meets the faults; writes
/// go through node 1.
async fn follower(first: u64, n: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut nodes = cluster(3, "fault-token-three-nodes").await?;
    let mut acked_all = BTreeSet::new();
    let mut faulted = 0;
    for seed in first..first + n {
        let plan = Plan::from_seed(seed, MAX_AFTER);
        let context = format!("follower, seed {seed} ({plan:?})");
        let before = nodes[2].faults.injected().len();
        nodes[2].faults.arm(plan);
        let acked = write(&nodes[0].client, seed, &context).await?;
        let injected = nodes[2].faults.injected().len() > before;
        if injected {
            faulted += 1;
            nodes[2].assert_failure_surfaced(&context).await?;
            nodes[2].restart().await?;
        } else {
            nodes[2].faults.clear();
        }
        acked_all.extend(acked);
        // Every node, the restarted follower included, has every
        // acknowledged write once it caught up.
        for (i, node) in nodes.iter().enumerate() {
            let missing = || async {
                node.groups()
                    .await
                    .map(|s| acked_all.difference(&s).count())
                    .unwrap_or(usize::MAX)
            };
            wait_until(
                &format!("{context}: node {} to hold every acknowledged write", i + 1),
                Duration::from_secs(20),
                || async { missing().await == 0 },
            )
            .await?;
        }
        // The follower writes again (through itself: forwarded, committed,
        // applied on it).
        let probe = write(&nodes[2].client, seed + 1_000_000, &context).await?;
        ensure!(probe.len() == WRITES, "{context}: node 3 no longer writes");
        acked_all.extend(probe);
    }
    eprintln!(
        "follower of 3: {n} seeded runs from {first}, {faulted} with an injected fault, {} writes acknowledged and kept, {:?}",
        acked_all.len(),
        started.elapsed()
    );
    for node in nodes.iter_mut().rev() {
        node.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_storage_faults_on_one_node_lose_no_acknowledged_write() -> anyhow::Result<()> {
    let (first, n) = runs(6);
    one_node(first, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_storage_faults_on_a_follower_lose_no_acknowledged_write() -> anyhow::Result<()> {
    let (first, n) = runs(4);
    follower(first, n).await
}
