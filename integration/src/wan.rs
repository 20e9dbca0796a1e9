//! Balance across regions, end to end: 3 regions × 2 real nodes behind the
//! link emulator, one-way delays of 20, 50 and 80 ms between the regions,
//! uneven arrivals, 100 ms and 1 s requests; the true global in-flight
//! count of every instance is read from the backends.
//!
//! ```text
//!   r0: nodes 1, 2 ──20 ms── r1: nodes 3, 4
//!          └────50 ms── r2: nodes 5, 6 ──80 ms──┘
//!   arrivals (Poisson, one seeded schedule for every run):
//!     40 / 25 / 15 / 10 / 6 / 4 % to nodes 1…6, each GET /sleep/100
//!     or (a share) /sleep/1000 on the node's published port
//!   every 5 ms: max / mean of the backends' requests in progress
//! ```
//!
//! [`run`] does one run with gossip (the estimator) or without
//! (`gossip_estimator = "local"`: each node compares its own counts only);
//! `tests/gossip` runs a short comparison and `examples/wan_balance` the
//! longer one for the figure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::client;
use crate::cluster::{Cluster, ClusterOptions, wait_serving};

/// Nodes per region.
pub const PER_REGION: u64 = 2;
/// Share of the arrivals at each node (1…6).
pub const SHARES: [f64; 6] = [0.40, 0.25, 0.15, 0.10, 0.06, 0.04];
const PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;
const HOST: &str = "wan.edgelb.local";

/// Node `id`'s region: `r0` for nodes 1 and 2, `r1` for 3 and 4, `r2` for
/// 5 and 6.
pub fn region(id: u64) -> String {
    format!("r{}", region_index(id))
}

fn region_index(id: u64) -> u64 {
    (id - 1) / PER_REGION
}

/// One-way delay between nodes `a` and `b`: none inside a region; 20 ms
/// between r0 and r1, 50 ms between r0 and r2, 80 ms between r1 and r2.
pub fn delay(a: u64, b: u64) -> Duration {
    let ms = match (
        region_index(a).min(region_index(b)),
        region_index(a).max(region_index(b)),
    ) {
        (x, y) if x == y => 0,
        (0, 1) => 20,
        (0, _) => 50,
        _ => 80,
    };
    Duration::from_millis(ms)
}

/// How the nodes use their peers' load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Own counts only (`gossip_estimator = "local"`).
    Local,
    /// The default estimator.
    Estimator,
}

/// A run's shape.
#[derive(Clone, Debug)]
pub struct Options {
    /// Arrivals per second, all nodes together.
    pub rate: f64,
    /// Share of the requests that take 1 s (the others 100 ms).
    pub long_share: f64,
    /// Instances of the group.
    pub instances: usize,
    /// Arrivals before the measurement starts.
    pub warmup: Duration,
    pub measure: Duration,
    /// Seeds the arrival schedule (the same for every mode).
    pub seed: u64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub mode: Mode,
    /// Time average of max / mean in-flight over the instances (samples
    /// with nothing in flight left out).
    pub max_over_mean: f64,
    /// Mean in-flight count per instance.
    pub mean_inflight: f64,
    pub requests: u64,
    pub failed: u64,
}

/// One arrival: when (from the start), at which node, how long.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    at: Duration,
    node: u64,
    ms: u64,
}

fn schedule(opts: &Options) -> Vec<Arrival> {
    let mut rng = SmallRng::seed_from_u64(opts.seed);
    let end = opts.warmup + opts.measure;
    let mut out = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        at += Duration::from_secs_f64(-rng.random::<f64>().ln() / opts.rate);
        if at >= end {
            return out;
        }
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut node = SHARES.len() as u64;
        for (i, share) in SHARES.iter().enumerate() {
            acc += share;
            if u < acc {
                node = i as u64 + 1;
                break;
            }
        }
        let ms = if rng.random::<f64>() < opts.long_share {
            1000
        } else {
            100
        };
        out.push(Arrival { at, node, ms });
    }
}

/// Starts the six nodes in `mode`, runs the arrival schedule and measures.
/// Bounded: every request by 5 s, the whole run by its length plus 60 s.
pub async fn run(mode: Mode, opts: &Options) -> anyhow::Result<Outcome> {
    let bound = opts.warmup + opts.measure + Duration::from_secs(60);
    tokio::time::timeout(bound, run_inner(mode, opts))
        .await
        .context("the WAN run took too long")?
}

async fn run_inner(mode: Mode, opts: &Options) -> anyhow::Result<Outcome> {
    let nodes = SHARES.len() as u64;
    let config = match mode {
        Mode::Local => "gossip_estimator = \"local\"\n".to_owned(),
        Mode::Estimator => String::new(),
    };
    let cluster = Cluster::start_with(
        usize::try_from(nodes)?,
        ClusterOptions {
            relay: Some(opts.seed),
            region: Some(region),
            config,
            ..ClusterOptions::default()
        },
    )
    .await?;
    let relay = cluster.relay().context("behind the relay")?;
    relay.update_all(|from, to, link| {
        link.delay = delay(from, to);
        link.jitter = Duration::from_millis(1).min(link.delay);
    });
    let names: Vec<String> = (1..=opts.instances).map(|i| format!("w{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let backends = Arc::new(cluster.http_backends(&names, BACKEND_PORT).await?);
    cluster
        .http_group(1, "wan", PORT, BACKEND_PORT, &backends)
        .await?;
    for id in 2..=nodes {
        wait_serving(cluster.data_addr(id, PORT), HOST, &names).await?;
    }
    let addrs: Vec<SocketAddr> = (1..=nodes).map(|id| cluster.data_addr(id, PORT)).collect();

    let arrivals = schedule(opts);
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let sampler = {
        let backends = Arc::clone(&backends);
        let (warmup, end) = (opts.warmup, opts.warmup + opts.measure);
        tokio::spawn(async move {
            let (mut sum, mut mean_sum, mut n) = (0.0, 0.0, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                let t = start.elapsed();
                if t >= end {
                    break;
                }
                if t < warmup {
                    continue;
                }
                let counts: Vec<usize> = backends.iter().map(|b| b.busy()).collect();
                let total: usize = counts.iter().sum();
                if total == 0 {
                    continue;
                }
                let mean = total as f64 / counts.len() as f64;
                let max = counts.iter().copied().max().unwrap_or(0) as f64;
                sum += max / mean;
                mean_sum += mean;
                n += 1;
            }
            (sum, mean_sum, n)
        })
    };
    for a in &arrivals {
        tokio::time::sleep_until(start + a.at).await;
        let addr = addrs[(a.node - 1) as usize];
        let failed = Arc::clone(&failed);
        let path = format!("/sleep/{}", a.ms);
        tasks.spawn(async move {
            let reply =
                tokio::time::timeout(Duration::from_secs(5), client::get(addr, HOST, &path)).await;
            if !matches!(reply, Ok(Ok(r)) if r.status.is_success()) {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Reap finished ones as we go.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let (sum, mean_sum, n) = sampler.await?;
    ensure!(n > 0, "no sample had anything in flight");
    Ok(Outcome {
        mode,
        max_over_mean: sum / n as f64,
        mean_inflight: mean_sum / n as f64,
        requests: arrivals.len() as u64,
        failed: failed.load(Ordering::Relaxed),
    })
}
