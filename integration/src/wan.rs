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
//! [`compare`] runs one such cluster per [`Mode`] side by side: the
//! estimator, `gossip_estimator = "local"` (each node compares its own
//! counts only), or for comparison raw or decayed counts. Every arrival goes
//! to the same node of every cluster at the same instant and one sampler
//! reads all their backends at the same ticks, so whatever else the machine
//! is doing (a 2-core CI runner, say) weighs on every mode alike: run one
//! after the other, a busy spell during one of them shows up as a
//! difference of a few hundredths, as large as the one measured.
//! `tests/gossip` runs a comparison and `examples/wan_balance` longer ones
//! for the figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::HttpBackend;
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
    /// Peers' reported counts as they are (`gossip_estimator = "raw"`):
    /// herds when reports are old; for comparison.
    Raw,
    /// Reported counts decayed, no predicted picks (`gossip_estimator =
    /// "decay"`); for comparison.
    Decay,
}

impl Mode {
    /// The nodes' configuration for this mode.
    fn config(self) -> &'static str {
        match self {
            Self::Local => "gossip_estimator = \"local\"\n",
            Self::Estimator => "",
            Self::Raw => "gossip_estimator = \"raw\"\n",
            Self::Decay => "gossip_estimator = \"decay\"\n",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "local" => Self::Local,
            "predictive" => Self::Estimator,
            "raw" => Self::Raw,
            "decay" => Self::Decay,
            other => anyhow::bail!("no mode {other:?} (local, predictive, raw, decay)"),
        })
    }
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

/// Starts one cluster of six nodes per mode of `modes`, runs the arrival
/// schedule against all of them at once and measures each. Bounded: every
/// request by 5 s, the load by its length plus 60 s (the clusters' start
/// by the harness's own deadlines).
pub async fn compare(modes: &[Mode], opts: &Options) -> anyhow::Result<Vec<Outcome>> {
    let mut setups = Vec::new();
    for &mode in modes {
        setups.push(start(mode, opts).await?);
    }
    let bound = opts.warmup + opts.measure + Duration::from_secs(60);
    tokio::time::timeout(bound, measure(modes, &mut setups, opts))
        .await
        .context("the WAN run took too long")?
}

/// One mode's cluster, serving the group.
struct Setup {
    /// Kept for its processes.
    _cluster: Cluster,
    backends: Vec<HttpBackend>,
    addrs: Vec<SocketAddr>,
}

async fn start(mode: Mode, opts: &Options) -> anyhow::Result<Setup> {
    let nodes = SHARES.len() as u64;
    let cluster = Cluster::start_with(
        usize::try_from(nodes)?,
        ClusterOptions {
            relay: Some(opts.seed),
            region: Some(region),
            config: mode.config().to_owned(),
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
    let backends = cluster.http_backends(&names, BACKEND_PORT).await?;
    cluster
        .http_group(1, "wan", PORT, BACKEND_PORT, &backends)
        .await?;
    for id in 2..=nodes {
        wait_serving(cluster.data_addr(id, PORT), HOST, &names).await?;
    }
    let addrs = (1..=nodes).map(|id| cluster.data_addr(id, PORT)).collect();
    Ok(Setup {
        _cluster: cluster,
        backends,
        addrs,
    })
}

/// Time sums of one cluster's samples.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    ratio: f64,
    mean: f64,
    n: u64,
}

impl Sums {
    fn add(&mut self, backends: &[HttpBackend]) {
        let counts: Vec<usize> = backends.iter().map(HttpBackend::busy).collect();
        let total: usize = counts.iter().sum();
        if total == 0 {
            return;
        }
        let mean = total as f64 / counts.len() as f64;
        let max = counts.iter().copied().max().unwrap_or(0) as f64;
        self.ratio += max / mean;
        self.mean += mean;
        self.n += 1;
    }
}

async fn measure(
    modes: &[Mode],
    setups: &mut [Setup],
    opts: &Options,
) -> anyhow::Result<Vec<Outcome>> {
    let backends: Arc<Vec<Vec<HttpBackend>>> = Arc::new(
        setups
            .iter_mut()
            .map(|s| std::mem::take(&mut s.backends))
            .collect(),
    );
    let arrivals = schedule(opts);
    let failed: Arc<Vec<AtomicU64>> = Arc::new(modes.iter().map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let sampler = {
        let backends = Arc::clone(&backends);
        let (warmup, end) = (opts.warmup, opts.warmup + opts.measure);
        tokio::spawn(async move {
            let mut sums = vec![Sums::default(); backends.len()];
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
                for (sum, backends) in sums.iter_mut().zip(backends.iter()) {
                    sum.add(backends);
                }
            }
            sums
        })
    };
    for a in &arrivals {
        tokio::time::sleep_until(start + a.at).await;
        let path = format!("/sleep/{}", a.ms);
        for (i, setup) in setups.iter().enumerate() {
            let addr = setup.addrs[(a.node - 1) as usize];
            let failed = Arc::clone(&failed);
            let path = path.clone();
            tasks.spawn(async move {
                let reply =
                    tokio::time::timeout(Duration::from_secs(5), client::get(addr, HOST, &path))
                        .await;
                if !matches!(reply, Ok(Ok(r)) if r.status.is_success()) {
                    failed[i].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Reap finished ones as we go.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let sums = sampler.await?;
    modes
        .iter()
        .zip(sums)
        .enumerate()
        .map(|(i, (&mode, sum))| {
            ensure!(sum.n > 0, "{mode:?}: no sample had anything in flight");
            Ok(Outcome {
                mode,
                max_over_mean: sum.ratio / sum.n as f64,
                mean_inflight: sum.mean / sum.n as f64,
                requests: arrivals.len() as u64,
                failed: failed[i].load(Ordering::Relaxed),
            })
        })
        .collect()
}
