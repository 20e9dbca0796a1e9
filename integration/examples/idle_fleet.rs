//! What an idle fleet costs: CPU and cluster datagrams per node while
//! nothing changes (a measurement tool, not a test).
//!
//! ```text
//!   cargo run --release -p integration --example idle_fleet -- [NODES] [SECONDS] [REGIONS]
//! ```
//!
//! Starts `NODES` (default 30) real `edgelb` processes on loopback behind
//! the link emulator (no delay, no loss; it counts every datagram per
//! directed link), spread round-robin over `REGIONS` regions (default 1),
//! and one HTTP group of 8 instances that no request ever reaches. Once every
//! node has applied the group, it waits 3 s and then measures for `SECONDS`
//! (default 10): each node's CPU time (`/proc/<pid>/stat`), the UDP
//! datagrams it received and sent, and the gossip reports it received.
//! The Raft leader is shown apart (it heartbeats every member, gossip or
//! not), and the other voters apart from the learners. The whole run is bounded by 5 minutes.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use edgelb_api::cluster::Role;
use integration::cluster::{Cluster, ClusterOptions};
use integration::load::cpu_time;

/// Instances of the one group.
const INSTANCES: usize = 8;
/// From the group applied everywhere to the start of the measurement.
const SETTLE: Duration = Duration::from_secs(3);
/// The whole run.
const BOUND: Duration = Duration::from_secs(300);

/// Regions are assigned round-robin: node `id` is in `r{(id - 1) % REGIONS}`.
static REGIONS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn region(id: u64) -> String {
    let regions = REGIONS.get().copied().unwrap_or(1).max(1);
    format!("r{}", (id - 1) % regions)
}

/// One node's figures over the measurement.
#[derive(Debug)]
struct Figures {
    id: u64,
    cpu: f64,
    rx: f64,
    tx: f64,
    reports: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: u64| -> anyhow::Result<u64> {
        std::env::args()
            .nth(i)
            .map_or(Ok(default), |a| a.parse().context("not a number"))
    };
    let (nodes, secs, regions) = (arg(1, 30)?, arg(2, 10)?, arg(3, 1)?);
    ensure!(
        nodes >= 1 && regions >= 1,
        "NODES and REGIONS must be at least 1"
    );
    REGIONS.get_or_init(|| regions);
    tokio::time::timeout(BOUND, run(nodes, Duration::from_secs(secs), regions))
        .await
        .context("the run took more than 5 minutes")?
}

async fn run(nodes: u64, measure: Duration, regions: u64) -> anyhow::Result<()> {
    let n = usize::try_from(nodes)?;
    let started = Instant::now();
    let cluster = Cluster::start_with(
        n,
        ClusterOptions {
            relay: Some(1),
            region: Some(region),
            ..ClusterOptions::default()
        },
    )
    .await?;
    let names: Vec<String> = (1..=INSTANCES).map(|i| format!("i{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let backends = cluster.http_backends(&names, 9000).await?;
    cluster.http_group(1, "idle", 8080, 9000, &backends).await?;
    let index = cluster.status(1).await?.commit_index;
    for id in cluster.ids() {
        cluster.wait_applied(id, index).await?;
    }
    let leader = cluster.leader().await?;
    println!(
        "{nodes} nodes in {regions} region(s) up and applied in {:.1} s; leader {leader}",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;

    let relay = cluster
        .relay()
        .context("the cluster runs behind the relay")?;
    let ids = cluster.ids();
    let sample = async || -> anyhow::Result<Vec<(Duration, u64, u64, f64)>> {
        let mut out = Vec::new();
        for &id in &ids {
            let pid = cluster.pid(id).context("a node stopped")?;
            let rx = ids.iter().map(|&p| relay.stats(p, id).delivered).sum();
            let tx = ids.iter().map(|&p| relay.stats(id, p).delivered).sum();
            let reports = cluster
                .metric(id, "edgelb_gossip_reports_received_total")
                .await?;
            out.push((cpu_time(pid), rx, tx, reports));
        }
        Ok(out)
    };
    // Every directed link's count, for where the leader's datagrams go.
    let links = || -> std::collections::HashMap<(u64, u64), u64> {
        ids.iter()
            .flat_map(|&a| ids.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a != b)
            .map(|(a, b)| ((a, b), relay.stats(a, b).delivered))
            .collect()
    };
    let t0 = Instant::now();
    let before = sample().await?;
    let links_before = links();
    tokio::time::sleep(measure).await;
    let after = sample().await?;
    let links_after = links();
    let elapsed = t0.elapsed().as_secs_f64();
    let figures: Vec<Figures> = ids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(&id, (b, a))| Figures {
            id,
            cpu: (a.0 - b.0).as_secs_f64() / elapsed * 100.0,
            rx: (a.1 - b.1) as f64 / elapsed,
            tx: (a.2 - b.2) as f64 / elapsed,
            reports: (a.3 - b.3) / elapsed,
        })
        .collect();
    let view = cluster.status(leader).await?;
    let voter = |id: u64| {
        view.nodes
            .iter()
            .any(|n| n.node_id == id && n.role == Role::Voter)
    };
    let (others, lead): (Vec<&Figures>, Vec<&Figures>) =
        figures.iter().partition(|f| f.id != leader);
    let (voters, learners): (Vec<&Figures>, Vec<&Figures>) =
        others.iter().partition(|f| voter(f.id));
    println!(
        "measured {elapsed:.1} s; per node: CPU % of a core, UDP datagrams/s received and sent, gossip reports/s received"
    );
    print_row("leader", &lead);
    print_row("voters", &voters);
    print_row("learners", &learners);
    print_row("others", &others);
    print_row("all", &figures.iter().collect::<Vec<_>>());
    let link = |from: u64, to: u64| {
        (links_after[&(from, to)] - links_before[&(from, to)]) as f64 / elapsed
    };
    for (label, set) in [("voters", &voters), ("learners", &learners)] {
        if set.is_empty() {
            continue;
        }
        let n = set.len() as f64;
        let rx: f64 = set.iter().map(|f| link(f.id, leader)).sum();
        let tx: f64 = set.iter().map(|f| link(leader, f.id)).sum();
        println!(
            "  leader's links to the {label}: {:.2} datagrams/s in and {:.2} out per peer ({rx:.1} and {tx:.1} in all)",
            rx / n,
            tx / n
        );
    }
    Ok(())
}

fn print_row(label: &str, rows: &[&Figures]) {
    if rows.is_empty() {
        return;
    }
    let stat = |f: fn(&Figures) -> f64| {
        let mean = rows.iter().map(|r| f(r)).sum::<f64>() / rows.len() as f64;
        let max = rows.iter().map(|r| f(r)).fold(0.0, f64::max);
        format!("{mean:.2} (max {max:.2})")
    };
    println!(
        "{label:>8} ({} nodes): cpu {} %  rx {}  tx {}  reports {}",
        rows.len(),
        stat(|f| f.cpu),
        stat(|f| f.rx),
        stat(|f| f.tx),
        stat(|f| f.reports),
    );
}
