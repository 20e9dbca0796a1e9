//! The discrete-event loop behind [`super::run`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gossip::Estimator;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use super::node::{SimNode, backends, balancers};
use super::oracle::{History, Knows};
use super::{Fault, Outcome, Scenario, Strategy};
use edgelb::balancer::{Lease, LoadChanged, Pick};

/// How often the in-flight counts are sampled for the metrics.
const SAMPLE: Duration = Duration::from_millis(1);

/// Simulated time in ns since the start.
pub(crate) type Ns = u64;

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
    Arrival {
        node: usize,
    },
    Done {
        job: usize,
    },
    /// The sender's timer (void unless `gen` is the node's current one).
    Send {
        node: usize,
        generation: u64,
    },
    Deliver {
        to: usize,
        payload: Rc<[u8]>,
    },
    Refresh {
        node: usize,
        generation: u64,
    },
    Fault(Fault),
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

/// A node: its traffic stream and its state (rebuilt on restart).
struct Node {
    /// Poisson arrival rate, per second.
    rate: f64,
    arrivals: SmallRng,
    state: SimNode,
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
    node: usize,
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
    refused: u64,
    reports: u64,
    report_bytes: u64,
    lost_reports: u64,
    config: gossip::Config,
    /// An oracle's view of the true counts, and what it knows.
    oracle: Option<(History, Knows, Ns)>,
}

impl<'a> Sim<'a> {
    pub(super) fn new(sc: &'a Scenario, strategy: &'a Strategy) -> Self {
        let k = sc.instances.max(1);
        let groups = sc.groups.clamp(1, k);
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
        let config = strategy.config();
        let base = Instant::now();
        let joining: Vec<usize> = sc
            .faults
            .iter()
            .filter_map(|(_, f)| match f {
                Fault::Join(n) => Some(*n),
                _ => None,
            })
            .collect();
        let nodes: Vec<Node> = sc
            .shares
            .iter()
            .enumerate()
            .map(|(n, share)| {
                let mut state = SimNode::new(n as u64, 1, &config, groups, k, sc.hard_limit, base);
                state.up = !joining.contains(&n);
                Node {
                    rate: total_rate * share / share_sum,
                    arrivals: SmallRng::seed_from_u64(sc.seed ^ (0xa11 + n as u64) << 20),
                    state,
                }
            })
            .collect();
        let mut sim = Self {
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
            refused: 0,
            reports: 0,
            report_bytes: 0,
            lost_reports: 0,
            config,
            oracle: match *strategy {
                Strategy::Oracle { knows, age } => Some((
                    History::new(sc.shares.len(), k, ns(age), sc.mean_service.as_secs_f64()),
                    knows,
                    ns(age),
                )),
                _ => None,
            },
        };
        if *strategy == Strategy::Central {
            // One set of backends and balancers shared by every node.
            let changed = Arc::new(LoadChanged::default());
            let shared = backends(k, base);
            let groups = balancers(&shared, groups, sc.hard_limit, &changed);
            for node in &mut sim.nodes {
                node.state.backends.clone_from(&shared);
                node.state.groups.clone_from(&groups);
            }
        }
        sim
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

    fn ns_of(&self, at: Instant) -> Ns {
        ns(at.saturating_duration_since(self.base))
    }

    fn estimator(&self) -> Option<Estimator> {
        match self.strategy {
            Strategy::Gossip { estimator, .. } => Some(*estimator),
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
        let gossip = self.estimator().is_some();
        for node in 0..self.nodes.len() {
            let first = self.next_arrival(node);
            self.at(first, Event::Arrival { node });
            if gossip && self.nodes[node].state.up {
                // Start the senders out of phase.
                let phase = self.net.random_range(0..ns(self.config.interval).max(1));
                self.at(
                    phase,
                    Event::Send {
                        node,
                        generation: 0,
                    },
                );
            }
        }
        for (at, fault) in self.sc.faults.clone() {
            self.at(ns(at), Event::Fault(fault));
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
                Event::Send { node, generation } => self.send(node, generation),
                Event::Deliver { to, payload } => self.deliver(to, &payload),
                Event::Refresh { node, generation } => self.refresh(node, generation),
                Event::Fault(fault) => self.fault(fault),
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

    /// The node that serves traffic arriving at `node`: itself while up,
    /// else the next one up (clients fail over).
    fn serving(&self, node: usize) -> Option<usize> {
        let n = self.nodes.len();
        (0..n)
            .map(|d| (node + d) % n)
            .find(|&m| self.nodes[m].state.up)
    }

    fn arrival(&mut self, node: usize) {
        let next = self.next_arrival(node);
        self.at(next, Event::Arrival { node });
        let now = self.instant();
        let groups = self.nodes[node].state.groups.len();
        let a = &mut self.nodes[node].arrivals;
        // Request size, kind and group come from the node's arrival stream,
        // drawn before the pick, so that every strategy sees the same
        // requests.
        let long = a.random_bool(self.sc.long_fraction.clamp(0.0, 1.0));
        let size = exp1(a);
        let group = if groups > 1 {
            a.random_range(0..groups)
        } else {
            0
        };
        let Some(at) = self.serving(node) else {
            return;
        };
        self.consult_oracle(at);
        let lease = match self.nodes[at].state.groups[group].pick(now, &mut self.picks) {
            Pick::Selected(lease) => lease,
            Pick::Overloaded => {
                if self.now >= ns(self.sc.warmup) {
                    self.refused += 1;
                }
                return;
            }
            Pick::NoInstances => return,
        };
        self.changed(at);
        let instance = usize::try_from(lease.backend().uuid.as_u128()).unwrap_or(0);
        let mean = if long {
            self.sc.long_mean
        } else {
            self.sc.mean_service
        };
        let work = (size * mean.as_secs_f64() / self.speeds[instance] * 1e9) as Ns;
        let job = Job {
            arrival: self.now,
            node: at,
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
        if let Some((history, ..)) = &mut self.oracle {
            history.picked(at, instance, self.now);
        }
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
        if let Some((history, ..)) = &mut self.oracle {
            history.completed(job.node, job.instance, self.now, job.arrival);
        }
        self.changed(job.node);
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

    /// Under an oracle, sets the peers' part of the load on `node`'s
    /// balancers from the true counts, just before it picks.
    fn consult_oracle(&self, node: usize) {
        let Some((history, knows, age)) = &self.oracle else {
            return;
        };
        let rates: Vec<f64> = self.nodes.iter().map(|n| n.rate).collect();
        let up: Vec<bool> = self.nodes.iter().map(|n| n.state.up).collect();
        let loads = history.peer_loads(node, self.now, *age, *knows, &rates, &up);
        let state = &self.nodes[node].state;
        // Any of the node's balancers routes each backend to its own group.
        if let Some(group) = state.groups.first() {
            group.set_peer_loads(state.backends.iter().zip(&loads).map(|(b, &l)| {
                let fixed = gossip::to_fixed(l.max(0.0));
                let load = gossip::PeerLoad {
                    select: fixed,
                    admit: fixed,
                };
                (b.as_ref(), load)
            }));
        }
    }

    /// A pick or release at `node`: its sender wakes on the changed flag.
    fn changed(&mut self, node: usize) {
        if self.estimator().is_none() || !self.nodes[node].state.up {
            return;
        }
        let now = self.instant();
        let state = &mut self.nodes[node].state;
        if let Some(at) = state.on_change(now, &mut self.net) {
            let generation = state.send_gen;
            let at = self.ns_of(at);
            self.at(at, Event::Send { node, generation });
        }
    }

    fn send(&mut self, node: usize, generation: u64) {
        let state = &self.nodes[node].state;
        if !state.up || generation != state.send_gen || self.estimator().is_none() {
            return;
        }
        let now = self.instant();
        let targets = (self.nodes.iter().enumerate())
            .filter(|&(to, n)| to != node && n.state.up)
            .count();
        let state = &mut self.nodes[node].state;
        let (mut report, heartbeat) = state.build(now, targets, &mut self.net);
        let generation = state.send_gen;
        let heartbeat = self.ns_of(heartbeat);
        self.at(heartbeat, Event::Send { node, generation });
        if !self.long_split() {
            for entry in &mut report.entries {
                entry.long_inflight = 0;
            }
        }
        let Ok(bytes) = gossip::encode(&report) else {
            return;
        };
        let payload: Rc<[u8]> = bytes.into();
        let jitter = ns(self.sc.delay_jitter) as f64;
        let loss = self.sc.loss.clamp(0.0, 1.0);
        for to in (0..self.nodes.len()).filter(|&to| to != node) {
            if !self.nodes[to].state.up {
                continue;
            }
            self.reports += 1;
            self.report_bytes += payload.len() as u64;
            if self.net.random_bool(loss) {
                self.lost_reports += 1;
                continue;
            }
            let delay = ns(self.sc.delay) as f64 + self.net.random_range(-jitter..=jitter);
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
        if !self.nodes[to].state.up {
            return;
        }
        // The transport's smoothed RTT over a symmetric path.
        let rtt = self.sc.delay * 2;
        let now = self.instant();
        if let Some(at) = self.nodes[to].state.receive(report, now, rtt) {
            let generation = self.nodes[to].state.refresh_gen;
            let at = self.ns_of(at);
            self.at(
                at,
                Event::Refresh {
                    node: to,
                    generation,
                },
            );
        }
    }

    fn refresh(&mut self, node: usize, generation: u64) {
        if self.estimator().is_none() {
            return;
        }
        let state = &self.nodes[node].state;
        if !state.up || generation != state.refresh_gen {
            return;
        }
        let now = self.instant();
        let config = self.config.clone();
        let state = &mut self.nodes[node].state;
        state.refresh_at = None;
        let active = state.refresh(&config, now);
        // The simulator's refreshes take no simulated time.
        state.refresh.refreshed(now, now, active);
        if let Some(timer) = state.refresh.timer()
            && let Some(at) = state.schedule_refresh(timer)
        {
            let generation = state.refresh_gen;
            let at = self.ns_of(at);
            self.at(at, Event::Refresh { node, generation });
        }
    }

    fn fault(&mut self, fault: Fault) {
        let now = self.instant();
        match fault {
            // Its process is gone: no more reports, and its traffic goes to
            // the next node. Work in flight goes on at the instances.
            Fault::Crash(node) | Fault::Leave(node) => {
                self.nodes[node].state.up = false;
                if matches!(fault, Fault::Leave(_)) {
                    // The others forget it at once (membership changed).
                    let id = self.nodes[node].state.id;
                    for n in &mut self.nodes {
                        n.state.table.remove_peer(id);
                    }
                }
            }
            // A new process: new incarnation, empty counters and table.
            Fault::Restart(node) | Fault::Join(node) => {
                let old = &self.nodes[node].state;
                let (id, incarnation) = (old.id, old.incarnation + 1);
                let groups = old.groups.len();
                let mut state = SimNode::new(
                    id,
                    incarnation,
                    &self.config,
                    groups,
                    self.ids.len(),
                    self.sc.hard_limit,
                    now,
                );
                if *self.strategy == Strategy::Central {
                    state.backends.clone_from(&old.backends);
                    state.groups.clone_from(&old.groups);
                }
                // Events of the old process stay void.
                state.send_gen = old.send_gen + 1;
                state.refresh_gen = old.refresh_gen + 1;
                let generation = state.send_gen;
                self.nodes[node].state = state;
                if self.estimator().is_some() {
                    self.at(self.now, Event::Send { node, generation });
                }
            }
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
        let mut up = 0;
        for node in self.nodes.iter().filter(|n| n.state.up) {
            up += 1;
            for (backend, inst) in node.state.backends.iter().zip(&self.instances) {
                let peer = backend.peer_load_fixed() as f64 / gossip::LOAD_ONE as f64;
                let view = backend.local_inflight() as f64 + peer;
                error += (view - inst.inflight as f64).abs();
            }
        }
        self.error_sum += error / (k * f64::from(up.max(1)));
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
        let stale_reports = self
            .nodes
            .iter()
            .map(|n| n.state.table.counters().stale)
            .sum();
        Outcome {
            max_mean: self.ratio_sum / samples,
            mean_latency,
            p99_latency,
            view_error: self.error_sum / samples,
            mean_inflight: self.inflight_sum / samples,
            completed: self.completed,
            refused: self.refused,
            reports: self.reports,
            report_bytes: self.report_bytes,
            lost_reports: self.lost_reports,
            stale_reports,
        }
    }
}
