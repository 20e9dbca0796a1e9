//! Raft write latency and throughput of a local 3-node cluster (a
//! measurement tool, not a test).
//!
//! ```text
//!   cargo run -p integration --example raft_latency [--release] [-- WRITES [WRITERS]]
//! ```
//!
//! Starts three `edgelb` processes of the same profile on loopback (the
//! harness's [`Cluster`]), then:
//! 1. `WRITES` (default 200) sequential writes through the leader, then as
//!    many through a follower (forwarded to the leader). For each: the
//!    *ack* latency (request sent → 2xx, i.e. committed and applied on the
//!    answering node) and the *replication* latency (2xx → every node's
//!    `applied_index` has reached the answering node's, polled every
//!    millisecond over `GET /v1/cluster`, so it has ~1–2 ms resolution).
//! 2. Throughput: `WRITERS` (default 8) concurrent writers, `WRITES` × 2
//!    writes in all, first all through the leader, then spread over every
//!    node.
//!
//! Every write is a `PATCH` of one group's `hard_limit`: one log entry each,
//! and a state that does not grow while measuring.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use integration::cluster::Cluster;
use integration::{AdminClient, Group};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let writes: usize = args.next().map_or(Ok(200), |a| a.parse())?;
    let writers: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };

    let started = Instant::now();
    let cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .context("no follower")?;
    println!(
        "3-node cluster ({profile} build) up in {:?}; leader is node {leader}",
        started.elapsed()
    );
    let group = cluster
        .admin(leader)
        .create_group(&json!({
            "name": "latency",
            "services": [{"port": 8080, "destination_port": 9000, "handlers": ["http"]}],
        }))
        .await?;
    let limit = Arc::new(AtomicUsize::new(1));

    for (label, via) in [("leader", leader), ("follower", follower)] {
        let mut ack = Vec::with_capacity(writes);
        let mut everywhere = Vec::with_capacity(writes);
        let admin = cluster.admin(via);
        for _ in 0..writes {
            let sent = Instant::now();
            write(&admin, &group, &limit).await?;
            let acked = Instant::now();
            ack.push(acked - sent);
            let index = cluster.status(via).await?.applied_index;
            for id in cluster.ids() {
                wait_applied(&cluster.admin(id), index).await?;
            }
            everywhere.push(acked.elapsed());
        }
        println!("{writes} sequential writes through the {label} (node {via}):");
        println!(
            "  ack (committed + applied on node {via}): {}",
            summary(&mut ack)
        );
        println!(
            "  ack → applied on every node:          {}",
            summary(&mut everywhere)
        );
    }

    for (label, vias) in [
        ("through the leader", vec![leader]),
        ("spread over every node", cluster.ids()),
    ] {
        let total = writes * 2;
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let admin = cluster.admin(vias[w % vias.len()]);
            let (group, limit, next) = (group.clone(), limit.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    write(&admin, &group, &limit).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let took = started.elapsed();
        println!(
            "throughput, {writers} concurrent writers {label}: {total} writes in {took:.2?} = {:.0} writes/s",
            total as f64 / took.as_secs_f64()
        );
    }
    Ok(())
}

/// One log entry: sets the group's `hard_limit` to the next value.
async fn write(admin: &AdminClient, group: &Group, limit: &AtomicUsize) -> anyhow::Result<()> {
    let value = limit.fetch_add(1, Ordering::Relaxed) % 60_000 + 1;
    let (status, v) = admin
        .patch(
            &format!("/v1/services/{}", group.uuid),
            &json!({"prop": "hard_limit", "op": "set", "value": value}),
        )
        .await?;
    ensure!(status.is_success(), "write answered {status}: {v}");
    Ok(())
}

/// Polls `admin`'s `applied_index` every millisecond until it reaches
/// `index` (bounded).
async fn wait_applied(admin: &AdminClient, index: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = admin.get("/v1/cluster").await?;
        ensure!(status.is_success(), "GET /v1/cluster: {status} {v}");
        if v["data"]["cluster"]["applied_index"].as_u64() >= Some(index) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} stuck below index {index}: {v}",
            admin.addr
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `p50 … p99 … max` of `samples` (sorted in place).
fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().unwrap_or_default()
    };
    format!(
        "p50 {:.2?}  p90 {:.2?}  p99 {:.2?}  max {:.2?}",
        at(0.5),
        at(0.9),
        at(0.99),
        samples.last().copied().unwrap_or_default()
    )
}
