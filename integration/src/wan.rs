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
//! One cluster runs per [`Mode`]: the estimator, `gossip_estimator =
//! "local"` (each node compares its own counts only), or for comparison raw
//! or decayed counts. [`interleave`] gives the clusters turns at the same
//! arrivals in short rounds, one cluster busy at a time; [`compare`] sends
//! every arrival to all of them at the same instant. Either way a [`Paired`]
//! comparison sets two modes against each other block by block (round by
//! round, or second by second), so that whatever else the machine is doing
//! (a 2-core CI runner, say) weighs on both sides of each pair nearly alike,
//! and says how far apart they are in standard errors of the blocks'
//! differences. Runs of one mode after the other cannot do that: a busy
//! spell during one of them moves its figure by a few hundredths, as much
//! as the difference measured. `tests/gossip` runs an interleaved
//! comparison, `examples/wan_balance` longer ones for the figures.

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
    /// Share of the arrivals at each node (1…6).
    pub shares: [f64; 6],
    /// Arrivals per second, all nodes together.
    pub rate: f64,
    /// Share of the requests that take 1 s (the others 100 ms).
    pub long_share: f64,
    /// Instances of the group.
    pub instances: usize,
    /// [`compare`] only: arrivals before the measurement starts, and the
    /// measurement's length ([`interleave`] takes [`Rounds`]).
    pub warmup: Duration,
    pub measure: Duration,
    /// Seeds the arrival schedule (the same for every mode).
    pub seed: u64,
}

/// A request that has no answer by then failed. Far above the longest
/// request (1 s): on a 2-core machine busy with other work a process can
/// stall for seconds, which costs the measurement nothing (both sides of a
/// pair see it) but would count as a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the backends' in-flight counts are read.
pub const SAMPLE: Duration = Duration::from_millis(5);

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
    /// Why the first failed request failed.
    pub first_failure: Option<String>,
    /// Every sample's (max, mean) in-flight count over the instances, at
    /// the same instants of the arrival schedule in every mode.
    pub samples: Vec<(f64, f64)>,
    /// Samples per block of a [`Paired`] comparison: one round of
    /// [`interleave`], a second of [`compare`].
    pub block: usize,
}

impl Outcome {
    /// Σ max / Σ mean over each block of [`Outcome::block`] samples (0 for
    /// a block with nothing in flight).
    pub fn blocks(&self) -> Vec<f64> {
        self.samples
            .chunks(self.block.max(1))
            .map(|c| {
                let (max, mean) = c
                    .iter()
                    .fold((0.0, 0.0), |(a, b), (max, mean)| (a + max, b + mean));
                if mean > 0.0 { max / mean } else { 0.0 }
            })
            .collect()
    }

    fn new(mode: Mode, samples: Vec<(f64, f64)>, block: usize, log: &Log) -> anyhow::Result<Self> {
        let busy: Vec<&(f64, f64)> = samples.iter().filter(|(_, mean)| *mean > 0.0).collect();
        ensure!(
            !busy.is_empty(),
            "{mode:?}: no sample had anything in flight"
        );
        let n = busy.len() as f64;
        Ok(Self {
            mode,
            max_over_mean: busy.iter().map(|(max, mean)| max / mean).sum::<f64>() / n,
            mean_inflight: busy.iter().map(|(_, mean)| mean).sum::<f64>() / n,
            requests: log.sent.load(Ordering::Relaxed),
            failed: log.failed.load(Ordering::Relaxed),
            first_failure: log.first_failure.get().cloned(),
            samples,
            block,
        })
    }
}

/// Two modes of one run set against each other block by block: the same
/// arrivals, read at the same instants of the schedule, so what the
/// machine does meanwhile weighs on both blocks of a pair nearly alike.
#[derive(Clone, Debug)]
pub struct Paired {
    /// Mean over the blocks of `other − base` (their Σ max / Σ mean).
    pub mean: f64,
    /// Its standard error (the blocks' differences taken as independent).
    pub stderr: f64,
    pub blocks: usize,
}

impl Paired {
    pub fn new(base: &Outcome, other: &Outcome) -> Self {
        let diffs: Vec<f64> = base
            .blocks()
            .iter()
            .zip(other.blocks())
            .map(|(b, o)| o - b)
            .collect();
        let n = diffs.len() as f64;
        let mean = diffs.iter().sum::<f64>() / n.max(1.0);
        let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Self {
            mean,
            stderr: (var / n.max(1.0)).sqrt(),
            blocks: diffs.len(),
        }
    }

    /// How many standard errors `other` is above `base` (negative: below).
    pub fn z(&self) -> f64 {
        if self.stderr > 0.0 {
            self.mean / self.stderr
        } else {
            0.0
        }
    }
}

/// One arrival: when (from the start of its schedule), at which node, how
/// long.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    at: Duration,
    node: u64,
    ms: u64,
}

/// Poisson arrivals from 0 to `end`, seeded by `seed`.
fn schedule(opts: &Options, seed: u64, end: Duration) -> Vec<Arrival> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        at += Duration::from_secs_f64(-rng.random::<f64>().ln() / opts.rate);
        if at >= end {
            return out;
        }
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut node = opts.shares.len() as u64;
        for (i, share) in opts.shares.iter().enumerate() {
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
/// request by [`REQUEST_TIMEOUT`], the load by its length plus 60 s (the clusters' start
/// by the harness's own deadlines).
pub async fn compare(modes: &[Mode], opts: &Options) -> anyhow::Result<Vec<Outcome>> {
    let mut setups = Vec::new();
    for &mode in modes {
        setups.push(start(mode, opts).await?);
    }
    let bound = opts.warmup + opts.measure + Duration::from_secs(60);
    tokio::time::timeout(bound, side_by_side(modes, &setups, opts))
        .await
        .context("the WAN run took too long")?
}

/// Interleaved rounds (see [`interleave`]).
#[derive(Clone, Debug)]
pub struct Rounds {
    pub count: u64,
    /// Arrivals of one round, in one mode.
    pub length: Duration,
    /// From a round's start to its first sample: in-flight counts build up
    /// from nothing meanwhile.
    pub settle: Duration,
}

/// Starts one cluster of six nodes per mode of `modes` and runs `rounds`
/// rounds: in each, the modes take turns (in the reverse order every other
/// round) at the same arrival schedule (a new one per round, from
/// `opts.seed`), each cluster measured during its own turn only. Only one
/// cluster has work at a time, so the machine carries one cluster's load,
/// and a pair of turns is a few seconds apart, so a busy spell of the
/// machine weighs on both turns of a round nearly alike; each cluster
/// starts its turn empty (its requests of the previous turn ended while the
/// other modes had theirs) once rounds are longer than the longest
/// request. Bounded: every request by [`REQUEST_TIMEOUT`], the load by its length plus
/// 60 s.
pub async fn interleave(
    modes: &[Mode],
    opts: &Options,
    rounds: &Rounds,
) -> anyhow::Result<Vec<Outcome>> {
    let mut setups = Vec::new();
    for &mode in modes {
        setups.push(start(mode, opts).await?);
    }
    let length = rounds.length * u32::try_from(rounds.count * modes.len() as u64)?;
    let bound = length + Duration::from_secs(60);
    tokio::time::timeout(bound, turns(modes, &setups, opts, rounds))
        .await
        .context("the WAN run took too long")?
}

/// One mode's cluster, serving the group.
struct Setup {
    /// Kept for its processes.
    _cluster: Cluster,
    backends: Arc<Vec<HttpBackend>>,
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
        backends: Arc::new(backends),
        addrs,
    })
}

/// One sample of a cluster: (max, mean) of its backends' in-flight counts.
fn sample(backends: &[HttpBackend]) -> (f64, f64) {
    let counts: Vec<usize> = backends.iter().map(HttpBackend::busy).collect();
    let total: usize = counts.iter().sum();
    let mean = total as f64 / counts.len().max(1) as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    (max, mean)
}

/// One mode's requests: how many were sent, how many failed and why the
/// first did.
#[derive(Debug, Default)]
struct Log {
    sent: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::OnceLock<String>,
}

/// Sends `a` to `addr` (its node's published port); bounded by
/// [`REQUEST_TIMEOUT`].
fn fire(tasks: &mut tokio::task::JoinSet<()>, addr: SocketAddr, a: Arrival, log: &Arc<Log>) {
    let log = Arc::clone(log);
    log.sent.fetch_add(1, Ordering::Relaxed);
    tasks.spawn(async move {
        let path = format!("/sleep/{}", a.ms);
        let sent = Instant::now();
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, client::get(addr, HOST, &path)).await;
        let why = match reply {
            Ok(Ok(r)) if r.status.is_success() => return,
            Ok(Ok(r)) => format!("status {}", r.status),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
        };
        log.failed.fetch_add(1, Ordering::Relaxed);
        let _ = log.first_failure.set(format!(
            "{why} (node {}, after {:?})",
            a.node,
            sent.elapsed()
        ));
    });
    // Reap finished ones as we go.
    while tasks.try_join_next().is_some() {}
}

/// `n` samples of `backends`, every [`SAMPLE`] from `from`.
async fn sampler(backends: Arc<Vec<HttpBackend>>, from: Instant, n: usize) -> Vec<(f64, f64)> {
    tokio::time::sleep_until(from).await;
    let mut tick = tokio::time::interval(SAMPLE);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        tick.tick().await;
        out.push(sample(&backends));
    }
    out
}

async fn side_by_side(
    modes: &[Mode],
    setups: &[Setup],
    opts: &Options,
) -> anyhow::Result<Vec<Outcome>> {
    let arrivals = schedule(opts, opts.seed, opts.warmup + opts.measure);
    let logs: Vec<Arc<Log>> = modes.iter().map(|_| Arc::default()).collect();
    let start = Instant::now();
    let n = (opts.measure.as_millis() / SAMPLE.as_millis()) as usize;
    let samplers: Vec<_> = setups
        .iter()
        .map(|s| tokio::spawn(sampler(Arc::clone(&s.backends), start + opts.warmup, n)))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for a in &arrivals {
        tokio::time::sleep_until(start + a.at).await;
        for (setup, log) in setups.iter().zip(&logs) {
            fire(&mut tasks, setup.addrs[(a.node - 1) as usize], *a, log);
        }
    }
    while tasks.join_next().await.is_some() {}
    let per_second = (1000 / SAMPLE.as_millis()) as usize;
    let mut out = Vec::new();
    for ((&mode, sampler), log) in modes.iter().zip(samplers).zip(&logs) {
        let samples = sampler.await?;
        out.push(Outcome::new(mode, samples, per_second, log)?);
    }
    Ok(out)
}

async fn turns(
    modes: &[Mode],
    setups: &[Setup],
    opts: &Options,
    rounds: &Rounds,
) -> anyhow::Result<Vec<Outcome>> {
    let logs: Vec<Arc<Log>> = modes.iter().map(|_| Arc::default()).collect();
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    let n = (rounds.length.saturating_sub(rounds.settle).as_millis() / SAMPLE.as_millis()) as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..rounds.count {
        let arrivals = schedule(
            opts,
            opts.seed.wrapping_mul(1000).wrapping_add(round),
            rounds.length,
        );
        let mut order: Vec<usize> = (0..modes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let start = Instant::now();
            let sampler = tokio::spawn(sampler(
                Arc::clone(&setups[i].backends),
                start + rounds.settle,
                n,
            ));
            for a in &arrivals {
                tokio::time::sleep_until(start + a.at).await;
                fire(
                    &mut tasks,
                    setups[i].addrs[(a.node - 1) as usize],
                    *a,
                    &logs[i],
                );
            }
            tokio::time::sleep_until(start + rounds.length).await;
            samples[i].extend(sampler.await?);
        }
    }
    while tasks.join_next().await.is_some() {}
    modes
        .iter()
        .zip(samples)
        .zip(&logs)
        .map(|((&mode, samples), log)| Outcome::new(mode, samples, n, log))
        .collect()
}
