//! A deterministic, seeded queueing simulation of a cluster's balancing,
//! where the gossip estimator is chosen and proven (SPEC §3, "Stale load").
//!
//! It drives the real selection code, one [`GroupBalancer`] per node fed
//! through [`GroupBalancer::set_peer_load`], and the real gossip code: picks
//! and releases bump each backend's [`gossip::LoadCounters`] as in the data
//! plane, each node's [`gossip::Tracker`] samples them into reports, which
//! are encoded, delayed, decoded and merged into the receiver's
//! [`gossip::LoadTable`], and an [`gossip::Estimator`] turns them into peer
//! loads.
//!
//! # Model
//!
//! ```text
//!  node n: Poisson arrivals, rate share(n)·λ
//!     │ pick (GroupBalancer: least local + peer load, random tie-break)
//!     ▼
//!  instance i: c servers, FIFO queue; work ~ Exp(mean) / speed(i)
//!     │ done: Lease::release (LoadCounters::finish)
//!     ▼
//!  on a count change, coalesced to min_interval, else a heartbeat
//!  (gossip::SendSchedule, as the node's sender): Tracker::report (samples
//!  the counters) → encode → each peer after `delay` (± jitter), or lost →
//!  decode → LoadTable::insert dated by gossip::Arrival (receipt less RTT/2);
//!  on each report and every REFRESH, throttled (gossip::RefreshSchedule):
//!  the estimator → set_peer_load
//! ```
//!
//! Each instance is a `c`-server queue (an upstream with `c` workers and a
//! backlog), with a speed factor spread evenly over `1 ± speed_spread`, and
//! `λ` is set so that the cluster runs at `utilization` of its capacity. In
//! flight counts work queued or in service at the instance, so a badly
//! balanced instance shows up twice: as a high in-flight count and as
//! queueing delay. An optional fraction of requests is long-lived (slow
//! requests holding a worker for `long_mean` on average).
//!
//! Metrics, after a warm-up: mean and p99 latency (queueing plus service) of
//! the short requests; the time-averaged ratio of the maximum to the mean
//! in-flight count over the instances (1.0 is perfect; sampled every ms);
//! and the mean error of a node's view (`local + peer load`) against the
//! true global count per instance.
//!
//! Strategies: one central balancer shared by every node (the ideal), local
//! counts only, and gossip with each [`gossip::Estimator`] at a given report
//! interval; and [`oracle`]s, which read the peers' true counts of a given
//! age at every pick, to show what reports of that age allow. Arrival
//! times, request sizes and network jitter come from their own seeded
//! streams, so every strategy sees the same traffic.
//!
//! `cargo run --release -p edgelb-sim` runs [`suite`] and writes
//! `docs/gossip-sim.md` ([`report`]) and `docs/gossip-sim.png` ([`plot`]).
//! The simulator is its own crate so that only it links the plotting
//! libraries; it reaches into `edgelb` for the balancer and the per-instance
//! metrics it drives.
//!
//! [`GroupBalancer`]: edgelb::balancer::GroupBalancer
//! [`GroupBalancer::set_peer_load`]: edgelb::balancer::GroupBalancer::set_peer_load

mod engine;
pub mod grid;
mod node;
pub mod oracle;
pub mod plot;
pub mod report;
pub mod suite;

#[cfg(test)]
mod tests;

use std::time::Duration;

use gossip::Estimator;
use oracle::Knows;

/// A cluster and its traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: String,
    /// Share of the traffic arriving at each node (normalised).
    pub shares: Vec<f64>,
    pub instances: usize,
    /// Workers per instance (`c`).
    pub servers: usize,
    /// Instance speeds spread evenly over `1 ± speed_spread`.
    pub speed_spread: f64,
    /// Mean work of a short request at speed 1.
    pub mean_service: Duration,
    /// Offered load as a fraction of the cluster's capacity.
    pub utilization: f64,
    /// Fraction of requests that are long-lived.
    pub long_fraction: f64,
    /// Mean work of a long-lived request at speed 1.
    pub long_mean: Duration,
    /// One-way gossip delay, uniformly jittered by `± delay_jitter`.
    pub delay: Duration,
    pub delay_jitter: Duration,
    /// Share of reports lost in transit.
    pub loss: f64,
    /// Groups the instances are split into (instance `i` in group
    /// `i % groups`); each request goes to a group drawn uniformly.
    pub groups: usize,
    /// Every group's `hard_limit`.
    pub hard_limit: u32,
    /// Crashes, restarts and membership changes, at simulated times.
    pub faults: Vec<(Duration, Fault)>,
    pub duration: Duration,
    pub warmup: Duration,
    pub seed: u64,
}

impl Scenario {
    /// The scenario with its duration scaled by `scale` (at least a second
    /// after the warm-up).
    pub fn scaled(mut self, scale: f64) -> Self {
        self.duration = self
            .duration
            .mul_f64(scale)
            .max(self.warmup + Duration::from_secs(1));
        self
    }

    /// SPEC §3's reference: 3 nodes with 70/20/10 % of the traffic, 8
    /// instances, 10 ms mean service, at 80 % utilization.
    pub fn reference() -> Self {
        Self {
            name: "3 nodes 70/20/10, 8 instances × 4 workers, 10 ms".into(),
            shares: vec![0.7, 0.2, 0.1],
            instances: 8,
            servers: 4,
            speed_spread: 0.4,
            mean_service: Duration::from_millis(10),
            utilization: 0.8,
            long_fraction: 0.0,
            long_mean: Duration::from_secs(2),
            delay: Duration::from_millis(1),
            delay_jitter: Duration::from_micros(500),
            loss: 0.0,
            groups: 1,
            hard_limit: u32::MAX,
            faults: Vec::new(),
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(1),
            seed: 1,
        }
    }

    /// 10 nodes with uneven traffic (30 % down to 2 %), 20 instances, 100 ms
    /// mean service.
    pub fn ten_nodes() -> Self {
        Self {
            name: "10 nodes 30…2 %, 20 instances × 4 workers, 100 ms".into(),
            shares: vec![0.30, 0.20, 0.12, 0.10, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02],
            instances: 20,
            mean_service: Duration::from_millis(100),
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(5),
            ..Self::reference()
        }
    }

    /// An edge fleet: 10 nodes with uneven traffic, 16 instances, 100 ms
    /// requests at 90 % utilization, 5 ms one-way between nodes.
    pub fn edge_fleet() -> Self {
        Self {
            name:
                "edge fleet: 10 nodes 30…2 %, 16 instances × 4 workers, 100 ms, ρ 0.9, 5 ms apart"
                    .into(),
            instances: 16,
            utilization: 0.9,
            delay: Duration::from_millis(5),
            delay_jitter: Duration::from_millis(1),
            duration: Duration::from_secs(30),
            ..Self::ten_nodes()
        }
    }

    /// 10 nodes as in [`Scenario::ten_nodes`], 10 ms requests plus 0.5 %
    /// long-lived ones (1 s mean) at 70 % utilization: the long-lived ones
    /// bring a third of the work and ~40 % of the in-flight count, while
    /// short requests set the decay rate. Requirement (c).
    pub fn long_lived() -> Self {
        Self {
            name: "10 nodes 30…2 %, 20 instances × 4 workers, 10 ms + 0.5 % of 1 s".into(),
            mean_service: Duration::from_millis(10),
            long_fraction: 0.005,
            long_mean: Duration::from_secs(1),
            utilization: 0.7,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            ..Self::ten_nodes()
        }
    }
}

/// Something that happens to a node during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The node's process dies: it stops reporting, its peers keep its last
    /// report until the TTL, and its traffic goes to the next node up.
    Crash(usize),
    /// The node starts again with a new incarnation and empty counters.
    Restart(usize),
    /// The node leaves the membership: it stops, and its peers forget it.
    Leave(usize),
    /// The node (absent until then) joins and starts.
    Join(usize),
}

/// How nodes combine their own and their peers' counts.
#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// One balancer shared by every node: the ideal.
    Central,
    /// Own counts only, no gossip.
    Local,
    /// Own counts plus the estimated peer loads from gossip.
    Gossip {
        estimator: Estimator,
        /// `gossip_min_interval`: under load, counts change all the time
        /// and a report goes out about this often (jittered upwards, by up to
        /// 20 %).
        interval: Duration,
        /// Whether reports carry the long-lived part; without it every
        /// in-flight count decays (to show requirement (c)).
        long_split: bool,
    },
    /// No gossip: at every pick, the peers' true counts `age` ago, read by
    /// the estimator's formula, with what else it [`Knows`] (see
    /// [`oracle`]). Not something a node can have; a bound. One group, no
    /// long-lived requests, no faults (see [`oracle`]).
    Oracle { knows: Knows, age: Duration },
}

impl Strategy {
    /// Gossip with `estimator`, `gossip_min_interval` = `interval_ms`,
    /// reports as specified.
    pub fn gossip(estimator: Estimator, interval_ms: u64) -> Self {
        Self::Gossip {
            estimator,
            interval: Duration::from_millis(interval_ms),
            long_split: true,
        }
    }

    /// The nodes' gossip settings: the defaults, with the strategy's
    /// estimator and `min_interval` (the heartbeat no shorter than it).
    pub fn config(&self) -> gossip::Config {
        let mut config = gossip::Config::default();
        if let Self::Gossip {
            estimator,
            interval,
            ..
        } = self
        {
            config.estimator = *estimator;
            config.min_interval = *interval;
            config.interval = config.interval.max(*interval);
        }
        config
    }

    /// Short name for tables.
    pub fn label(&self) -> String {
        match self {
            Self::Central => "central".into(),
            Self::Local => "local only".into(),
            Self::Gossip {
                estimator,
                interval,
                long_split,
            } => {
                let name = match estimator {
                    Estimator::Raw => "naive",
                    Estimator::Decay => "decay",
                    Estimator::Predictive => "predictive",
                };
                let split = if *long_split { "" } else { ", no long split" };
                format!("{name} @{} ms{split}", interval.as_millis())
            }
            Self::Oracle { knows, age } => {
                format!("oracle, {} ms old, {}", age.as_millis(), knows.label())
            }
        }
    }
}

/// What a run measured (after the warm-up).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Time average of max/mean in-flight over the instances.
    pub max_mean: f64,
    /// Mean latency of short requests, in seconds.
    pub mean_latency: f64,
    /// 99th percentile latency of short requests, in seconds.
    pub p99_latency: f64,
    /// Mean |local + peer load − true global count| per node and instance.
    pub view_error: f64,
    /// Mean true in-flight count per instance.
    pub mean_inflight: f64,
    /// Requests completed (short and long).
    pub completed: u64,
    /// Requests refused by `hard_limit` (after the warm-up).
    pub refused: u64,
    /// Reports sent (to each peer) and their encoded bytes.
    pub reports: u64,
    pub report_bytes: u64,
    /// Reports lost in transit.
    pub lost_reports: u64,
    /// Reports dropped as stale by receivers (reordered in transit).
    pub stale_reports: u64,
}

/// Runs `strategy` on `scenario`. Deterministic for a given scenario seed.
pub fn run(scenario: &Scenario, strategy: &Strategy) -> Outcome {
    engine::Sim::new(scenario, strategy).run()
}
