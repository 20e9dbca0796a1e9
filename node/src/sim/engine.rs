//! The discrete-event loop behind [`super::run`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gossip::{Estimator, LoadTable, Tracker};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use super::{Outcome, Scenario, Strategy};
use crate::balancer::{Backend, GroupBalancer, Lease, Pick};
use crate::metrics::InstanceMetrics;

/// How often the in-flight counts are sampled for the metrics.
const SAMPLE: Duration = Duration::from_millis(1);

/// Simulated time in ns since the start.
type Ns = u64;

fn ns(d: Duration) -> Ns {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn secs(t: Ns) -> f64 {
    t as f64 / 1e9
}

/// An exponential draw with mean 1.
fn exp1(rng: &mut SmallRng) -> f64 {
    -(1.0 - rng.random::<f64>()).ln()
}

enum Event {
    Arrival { node: usize },
    Done { job: usize },
    Send { node: usize },
    Deliver { to: usize, payload: Rc<[u8]> },
    Refresh { node: usize },
    Sample,
}

/// An event at a time; `seq` keeps simultaneous events in schedule order.
struct Timed {
    at: Ns,
    seq: u64,
    event: Event,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Node {
    /// Poisson arrival rate, per second.
    rate: f64,
    balancer: Arc<GroupBalancer>,
    /// Index = instance.
    backends: Vec<Arc<Backend>>,
    tracker: Tracker,
    table: LoadTable,
    arrivals: SmallRng,
}

#[derive(Default)]
struct Instance {
    busy: usize,
    queue: VecDeque<usize>,
    /// Queued plus in service: the true global in-flight count.
    inflight: u64,
}

struct Job {
    arrival: Ns,
    instance: usize,
    /// Service time at this instance, in ns.
    work: Ns,
    long: bool,
    /// Held until the job is done, as the data plane holds it.
    lease: Lease,
}

pub(super) struct Sim<'a> {
    sc: &'a Scenario,
    strategy: &'a Strategy,
    base: Instant,
    now: Ns,
    seq: u64,
    events: BinaryHeap<Reverse<Timed>>,
    nodes: Vec<Node>,
    instances: Vec<Instance>,
    ids: Vec<[u8; 16]>,
    speeds: Vec<f64>,
    jobs: Vec<Option<Job>>,
    free: Vec<usize>,
    picks: SmallRng,
    net: SmallRng,
    // Metrics.
    latencies: Vec<f32>,
    samples: u64,
    ratio_sum: f64,
    inflight_sum: f64,
    error_sum: f64,
    completed: u64,
    reports: u64,
    report_bytes: u64,
}

/// `n` backends whose load counters count time from `base`, the simulated
/// clock's zero.
fn backends(n: usize, base: Instant) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new_at(
                Uuid::from_u128(i as u128),
                format!("i-{i}"),
                format!("10.0.0.{i}"),
                InstanceMetrics::unregistered(),
                base,
            ))
        })
        .collect()
}

fn group(backends: &[Arc<Backend>]) -> Arc<GroupBalancer> {
    let group = Arc::new(GroupBalancer::new(u32::MAX));
    group.set_backends(backends.to_vec());
    group
}

impl<'a> Sim<'a> {
    pub(super) fn new(sc: &'a Scenario, strategy: &'a Strategy) -> Self {
        let k = sc.instances.max(1);
        let speeds: Vec<f64> = (0..k)
            .map(|i| {
                let x = if k == 1 {
                    0.5
                } else {
                    i as f64 / (k - 1) as f64
                };
                1.0 + sc.speed_spread * (2.0 * x - 1.0)
            })
            .collect();
        let mean_work = (1.0 - sc.long_fraction) * sc.mean_service.as_secs_f64()
            + sc.long_fraction * sc.long_mean.as_secs_f64();
        let capacity: f64 = speeds.iter().map(|s| s * sc.servers as f64).sum::<f64>() / mean_work;
        let total_rate = sc.utilization * capacity;
        let share_sum: f64 = sc.shares.iter().sum();
        let config = gossip::Config::default();
        let base = Instant::now();
        let central = match strategy {
            Strategy::Central => {
                let b = backends(k, base);
                Some((group(&b), b))
            }
            _ => None,
        };
        let nodes = sc
            .shares
            .iter()
            .enumerate()
            .map(|(n, share)| {
                let (balancer, backends) = match &central {
                    Some((g, b)) => (Arc::clone(g), b.clone()),
                    None => {
                        let b = backends(k, base);
                        (group(&b), b)
                    }
                };
                Node {
                    rate: total_rate * share / share_sum,
                    balancer,
                    backends,
                    tracker: Tracker::new(n as u64, 1, &config, base),
                    table: LoadTable::new(config.ttl),
                    arrivals: SmallRng::seed_from_u64(sc.seed ^ (0xa11 + n as u64) << 20),
                }
            })
            .collect();
        Self {
            sc,
            strategy,
            base,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            nodes,
            instances: (0..k).map(|_| Instance::default()).collect(),
            ids: (0..k)
                .map(|i| Uuid::from_u128(i as u128).into_bytes())
                .collect(),
            speeds,
            jobs: Vec::new(),
            free: Vec::new(),
            picks: SmallRng::seed_from_u64(sc.seed ^ 0x9e37_79b9_7f4a_7c15),
            net: SmallRng::seed_from_u64(sc.seed ^ 0x6a09_e667_f3bc_c909),
            latencies: Vec::new(),
            samples: 0,
            ratio_sum: 0.0,
            inflight_sum: 0.0,
            error_sum: 0.0,
            completed: 0,
            reports: 0,
            report_bytes: 0,
        }
    }

    fn at(&mut self, at: Ns, event: Event) {
        self.seq += 1;
        self.events.push(Reverse(Timed {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn gossip(&self) -> Option<(Estimator, Duration)> {
        match self.strategy {
            Strategy::Gossip {
                estimator,
                interval,
                ..
            } => Some((*estimator, *interval)),
            _ => None,
        }
    }

    fn long_split(&self) -> bool {
        !matches!(
            self.strategy,
            Strategy::Gossip {
                long_split: false,
                ..
            }
        )
    }

    pub(super) fn run(mut self) -> Outcome {
        for node in 0..self.nodes.len() {
            let first = self.next_arrival(node);
            self.at(first, Event::Arrival { node });
            if let Some((_, interval)) = self.gossip() {
                let phase = self.net.random_range(0..ns(interval).max(1));
                self.at(phase, Event::Send { node });
                let phase = self.net.random_range(0..ns(self.sc.refresh).max(1));
                self.at(phase, Event::Refresh { node });
            }
        }
        self.at(ns(self.sc.warmup), Event::Sample);
        let end = ns(self.sc.duration);
        while let Some(Reverse(Timed { at, event, .. })) = self.events.pop() {
            if at > end {
                break;
            }
            self.now = at;
            match event {
                Event::Arrival { node } => self.arrival(node),
                Event::Done { job } => self.done(job),
                Event::Send { node } => self.send(node),
                Event::Deliver { to, payload } => self.deliver(to, &payload),
                Event::Refresh { node } => {
                    self.refresh(node);
                    self.at(
                        self.now + ns(self.sc.refresh).max(1),
                        Event::Refresh { node },
                    );
                }
                Event::Sample => {
                    self.sample();
                    self.at(self.now + ns(SAMPLE), Event::Sample);
                }
            }
        }
        self.outcome()
    }

    fn next_arrival(&mut self, node: usize) -> Ns {
        let n = &mut self.nodes[node];
        let gap = exp1(&mut n.arrivals) / n.rate.max(1e-9);
        self.now + (gap * 1e9) as Ns
    }

    fn arrival(&mut self, node: usize) {
        let next = self.next_arrival(node);
        self.at(next, Event::Arrival { node });
        let now = self.instant();
        let n = &mut self.nodes[node];
        // Request size and kind come from the node's arrival stream, drawn
        // before the pick, so that every strategy sees the same requests.
        let long = n
            .arrivals
            .random_bool(self.sc.long_fraction.clamp(0.0, 1.0));
        let size = exp1(&mut n.arrivals);
        let lease = match n.balancer.pick(now, &mut self.picks) {
            Pick::Selected(lease) => lease,
            // hard_limit is u32::MAX and every group has instances.
            Pick::NoInstances | Pick::Overloaded => return,
        };
        let instance = usize::try_from(lease.backend().uuid.as_u128()).unwrap_or(0);
        let mean = if long {
            self.sc.long_mean
        } else {
            self.sc.mean_service
        };
        let work = (size * mean.as_secs_f64() / self.speeds[instance] * 1e9) as Ns;
        let job = Job {
            arrival: self.now,
            instance,
            work,
            long,
            lease,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.jobs[id] = Some(job);
                id
            }
            None => {
                self.jobs.push(Some(job));
                self.jobs.len() - 1
            }
        };
        let inst = &mut self.instances[instance];
        inst.inflight += 1;
        if inst.busy < self.sc.servers {
            inst.busy += 1;
            self.at(self.now + work, Event::Done { job: id });
        } else {
            inst.queue.push_back(id);
        }
    }

    fn done(&mut self, id: usize) {
        let Some(job) = self.jobs[id].take() else {
            return;
        };
        self.free.push(id);
        self.completed += 1;
        if !job.long && job.arrival >= ns(self.sc.warmup) {
            self.latencies.push(secs(self.now - job.arrival) as f32);
        }
        // The release records the service time on the backend's counters.
        job.lease.release(self.instant());
        let inst = &mut self.instances[job.instance];
        inst.inflight -= 1;
        match inst.queue.pop_front() {
            Some(next) => {
                let work = self.jobs[next].as_ref().map_or(0, |j| j.work);
                self.at(self.now + work, Event::Done { job: next });
            }
            None => inst.busy -= 1,
        }
    }

    fn send(&mut self, node: usize) {
        let Some((_, interval)) = self.gossip() else {
            return;
        };
        let jitter = self.sc.interval_jitter.clamp(0.0, 1.0);
        let next = ns(interval) as f64 * self.net.random_range(1.0 - jitter..=1.0 + jitter);
        self.at(self.now + (next as Ns).max(1), Event::Send { node });
        let now = self.instant();
        let n = &mut self.nodes[node];
        let counters = n
            .backends
            .iter()
            .map(|b| (b.uuid.into_bytes(), b.counters()));
        let mut report = n.tracker.report(now, self.now / 1_000_000, counters);
        if !self.long_split() {
            for entry in &mut report.entries {
                entry.long_inflight = 0;
            }
        }
        let Ok(bytes) = gossip::encode(&report) else {
            return;
        };
        let payload: Rc<[u8]> = bytes.into();
        for to in (0..self.nodes.len()).filter(|&to| to != node) {
            let jitter = ns(self.sc.delay_jitter) as f64;
            let delay = ns(self.sc.delay) as f64 + self.net.random_range(-jitter..=jitter);
            self.reports += 1;
            self.report_bytes += payload.len() as u64;
            self.at(
                self.now + delay.max(0.0) as Ns,
                Event::Deliver {
                    to,
                    payload: Rc::clone(&payload),
                },
            );
        }
    }

    fn deliver(&mut self, to: usize, payload: &[u8]) {
        let Ok(report) = gossip::decode(payload) else {
            return;
        };
        // The receiver knows the delay only on average (RTT / 2).
        let as_of = self
            .instant()
            .checked_sub(self.sc.delay)
            .unwrap_or(self.base);
        self.nodes[to].table.insert(report, as_of);
        self.refresh(to);
    }

    fn refresh(&mut self, node: usize) {
        let Some((estimator, _)) = self.gossip() else {
            return;
        };
        let now = self.instant();
        let n = &self.nodes[node];
        let loads = estimator.peer_loads(&n.table, &self.ids, now);
        for (backend, load) in n.backends.iter().zip(loads) {
            n.balancer.set_peer_load(backend, load);
        }
    }

    fn sample(&mut self) {
        let k = self.instances.len() as f64;
        let total: u64 = self.instances.iter().map(|i| i.inflight).sum();
        let max = self.instances.iter().map(|i| i.inflight).max().unwrap_or(0);
        let mean = total as f64 / k;
        self.samples += 1;
        self.inflight_sum += mean;
        self.ratio_sum += if total == 0 { 1.0 } else { max as f64 / mean };
        let mut error = 0.0;
        for node in &self.nodes {
            for (backend, inst) in node.backends.iter().zip(&self.instances) {
                let view = backend.local_inflight() + backend.peer_load();
                error += view.abs_diff(inst.inflight) as f64;
            }
        }
        self.error_sum += error / (k * self.nodes.len() as f64);
    }

    fn outcome(mut self) -> Outcome {
        let samples = self.samples.max(1) as f64;
        let n = self.latencies.len();
        let mean_latency =
            self.latencies.iter().map(|&l| f64::from(l)).sum::<f64>() / n.max(1) as f64;
        let p99_latency = if n == 0 {
            0.0
        } else {
            let rank = (n * 99 / 100).min(n - 1);
            let (_, p99, _) = self.latencies.select_nth_unstable_by(rank, f32::total_cmp);
            f64::from(*p99)
        };
        let stale_reports = self.nodes.iter().map(|n| n.table.counters().stale).sum();
        Outcome {
            max_mean: self.ratio_sum / samples,
            mean_latency,
            p99_latency,
            view_error: self.error_sum / samples,
            mean_inflight: self.inflight_sum / samples,
            completed: self.completed,
            reports: self.reports,
            report_bytes: self.report_bytes,
            stale_reports,
        }
    }
}
