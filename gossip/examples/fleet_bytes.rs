//! Inbound gossip of one node in a fleet of 100 with 1,000 busy instances
//! (a measurement tool, not a test).
//!
//! ```text
//!   cargo run --release -p gossip --example fleet_bytes [-- SECONDS [REGIONS,…]]
//! ```
//!
//! Drives the real code in virtual time: every node's per-instance
//! [`LoadCounters`], its [`Tracker`], [`SendSchedule`] and
//! [`DeltaEncoder`]; region aggregates built with [`aggregate`] from what
//! a [`Reassembler`] made of the region's reports, sent by the member that
//! [`plan`] assigns; and the wire encodings. Each node picks instances
//! uniformly at `RATE` picks/s (Poisson), each pick in flight for an
//! exponential time of mean 100 ms, so every instance has work in flight
//! at every node and its counts change several times a second. Node 1 is
//! the receiver: the table gives the report bytes per second it receives
//! from its gossip group's members (own reports) and from the other
//! groups (one aggregate each; a group is a region, or a cell of a region
//! larger than `gossip::CELL_MAX`, see `gossip::cells`), against what it received before deltas and
//! regions (a full report from each of the 99 others at the same
//! moments). Transit is not modelled; the aggregation's own cost in
//! staleness is: when an aggregate is built, how old are the reports it
//! sums (its region peers' latest, and the aggregator's own), on average
//! and at the 99th percentile, plus how long a change waits for the
//! aggregate to go out.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use gossip::{
    Config, DeltaEncoder, Entry, LoadCounters, Reassembler, Report, SendSchedule, Started, Tracker,
    aggregate, cells, decode_wire, plan,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const NODES: usize = 100;
const INSTANCES: usize = 1_000;
const SERVICE: f64 = 0.100;
const STEP: Duration = Duration::from_millis(1);
const WARMUP: Duration = Duration::from_secs(1);
/// The region aggregates' coalescing, as the node's aggregator does it.
const AGGREGATE_MIN_INTERVAL: Duration = Duration::from_millis(20);
/// The receiving node.
const RECEIVER: u64 = 1;

fn id(i: usize) -> [u8; 16] {
    let mut b = [0; 16];
    b[8..].copy_from_slice(&(i as u64).to_be_bytes());
    b
}

/// A sender of a report stream: its schedule and encoder.
struct Stream {
    schedule: SendSchedule,
    encoder: DeltaEncoder,
    changed: bool,
    due: Option<Instant>,
}

impl Stream {
    fn new(config: &Config, now: Instant) -> Self {
        Self {
            schedule: SendSchedule::new(config, now),
            encoder: DeltaEncoder::new(),
            changed: false,
            due: None,
        }
    }

    /// Whether a report is due at `now` (the sender's loop, in virtual time).
    fn due(&mut self, now: Instant, rng: &mut SmallRng) -> bool {
        if self.changed && self.due.is_none() {
            self.due = Some(self.schedule.coalesced(now, rng));
        }
        self.due.is_some_and(|d| now >= d) || now >= self.schedule.heartbeat()
    }

    /// Encodes `report` as the sender would; returns (what a link that
    /// follows the chain sends with compact full reports, the size of what
    /// it sends with version-1 full reports, the version-1 full report's
    /// size).
    fn send(
        &mut self,
        report: &Report,
        now: Instant,
        wall: u64,
        rng: &mut SmallRng,
    ) -> (Vec<u8>, usize, usize) {
        let full = self.schedule.full_due(now);
        self.schedule.sampled(now, wall, Some((report, full)), rng);
        self.changed = false;
        self.due = None;
        let e = self.encoder.next(report, full).expect("valid report");
        let len = e.full.len();
        match e.delta {
            Some((_, d)) => {
                let d_len = d.len();
                (d, d_len, len)
            }
            None => (e.compact, len, len),
        }
    }
}

struct Node {
    region: usize,
    counters: Vec<LoadCounters>,
    tracker: Tracker,
    stream: Stream,
    next_pick: Instant,
    latest: Vec<Entry>,
    latest_at: Instant,
}

/// The aggregator that tells the receiver about one other region.
struct Aggregator {
    node: u64,
    members: Vec<u64>,
    peers: Reassembler,
    /// When each member's latest report was built.
    at: BTreeMap<u64, Instant>,
    stream: Stream,
    seq: u64,
    changed_at: Option<Instant>,
}

#[derive(Default)]
struct Tally {
    /// Regions and cells.
    groups: usize,
    own: u64,
    aggregates: u64,
    /// `own + aggregates` with version-1 full reports.
    v1: u64,
    before: u64,
    ages: Vec<f64>,
    waits: Vec<f64>,
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .map_or(3, |a| a.parse().expect("SECONDS"));
    let counts: Vec<usize> = std::env::args().nth(2).map_or(vec![1, 10, 20], |a| {
        a.split(',').map(|r| r.parse().expect("REGIONS")).collect()
    });
    println!(
        "{NODES} nodes, {INSTANCES} instances, {secs} s measured after {} s; inbound report bytes/s at node {RECEIVER}",
        WARMUP.as_secs()
    );
    println!(
        "| regions × nodes | gossip groups | picks/s per node | before: 99 × full | own reports (group) | aggregates (other groups) | total | total with version-1 fulls | aggregate age mean / p99 | change → aggregate sent mean / p99 |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for rate in [2_000.0, 10_000.0] {
        for &regions in &counts {
            let t = run(regions, rate, Duration::from_secs(secs));
            let s = secs as f64;
            let mb = |b: u64| format!("{:.2} MB/s", b as f64 / s / 1e6);
            println!(
                "| {regions} × {} | {} | {rate:.0} | {} | {} | {} | **{}** | {} | {} | {} |",
                NODES / regions,
                t.groups,
                mb(t.before),
                mb(t.own),
                mb(t.aggregates),
                mb(t.own + t.aggregates),
                mb(t.v1),
                pair(&t.ages),
                pair(&t.waits),
            );
        }
    }
}

fn pair(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)];
    format!("{:.1} / {:.1} ms", mean * 1e3, p99 * 1e3)
}

fn run(regions: usize, rate: f64, measure: Duration) -> Tally {
    let mut rng = SmallRng::seed_from_u64(7);
    let config = Config::default();
    let agg_config = Config {
        min_interval: config.min_interval.max(AGGREGATE_MIN_INTERVAL),
        ..config.clone()
    };
    let t0 = Instant::now();
    let names: Vec<String> = (0..regions).map(|r| format!("r{r}")).collect();
    // Gossip groups: the regions, or cells of a region larger than
    // gossip::CELL_MAX, as the node computes them.
    let groups = cells((1..=NODES as u64).map(|n| (n, names[(n as usize - 1) % regions].as_str())));
    let group_names: Vec<&String> = groups
        .values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let region_of = |n: u64| {
        group_names
            .iter()
            .position(|g| **g == groups[&n])
            .expect("every node has a group")
    };
    let members: Vec<(u64, &str)> = groups.iter().map(|(&n, g)| (n, g.as_str())).collect();
    let mut nodes: Vec<Node> = (1..=NODES as u64)
        .map(|n| Node {
            region: region_of(n),
            counters: (0..INSTANCES)
                .map(|_| LoadCounters::new(t0, config.long_after))
                .collect(),
            tracker: Tracker::new(n, 1, &config, t0),
            stream: Stream::new(&config, t0),
            next_pick: t0,
            latest: Vec::new(),
            latest_at: t0,
        })
        .collect();
    // Who tells the receiver about each other region.
    let mut aggregators: BTreeMap<usize, Aggregator> = BTreeMap::new();
    for &(n, _) in &members {
        let p = plan(n, members.iter().copied(), |_| true);
        if p.aggregate.contains(&RECEIVER) {
            let r = region_of(n);
            aggregators.insert(
                r,
                Aggregator {
                    node: n,
                    members: members
                        .iter()
                        .map(|m| m.0)
                        .filter(|&m| region_of(m) == r)
                        .collect(),
                    peers: Reassembler::new(),
                    at: BTreeMap::new(),
                    stream: Stream::new(&agg_config, t0),
                    seq: 0,
                    changed_at: None,
                },
            );
        }
    }
    assert_eq!(
        aggregators.len(),
        group_names.len() - 1,
        "one aggregate per other region or cell"
    );
    let mut inflight: BinaryHeap<Reverse<(Instant, usize, usize, u64)>> = BinaryHeap::new();
    let mut started: Vec<Option<Started>> = Vec::new();
    let mut tally = Tally {
        groups: group_names.len(),
        ..Tally::default()
    };
    let end = t0 + WARMUP + measure;
    let mut now = t0;
    while now < end {
        now += STEP;
        let measuring = now > t0 + WARMUP;
        let wall = (now - t0).as_millis() as u64;
        for (i, node) in nodes.iter_mut().enumerate() {
            while node.next_pick <= now {
                let at = node.next_pick;
                let inst = rng.random_range(0..INSTANCES);
                let s = node.counters[inst].start(at);
                let done = at + Duration::from_secs_f64(-rng.random::<f64>().ln() * SERVICE);
                started.push(Some(s));
                inflight.push(Reverse((done, i, inst, started.len() as u64 - 1)));
                node.stream.changed = true;
                node.next_pick = at + Duration::from_secs_f64(-rng.random::<f64>().ln() / rate);
            }
        }
        while let Some(&Reverse((done, i, inst, k))) = inflight.peek() {
            if done > now {
                break;
            }
            inflight.pop();
            if let Some(s) = started[k as usize].take() {
                nodes[i].counters[inst].finish(s, done);
                nodes[i].stream.changed = true;
            }
        }
        // Reports.
        for (i, node) in nodes.iter_mut().enumerate() {
            let n = i as u64 + 1;
            if !node.stream.due(now, &mut rng) {
                continue;
            }
            let counters = node.counters.iter().enumerate().map(|(k, c)| (id(k), c));
            let report = node.tracker.report(now, wall, counters);
            let (bytes, v1_len, full_len) = node.stream.send(&report, now, wall, &mut rng);
            let changed = node.latest != report.entries;
            node.latest.clone_from(&report.entries);
            node.latest_at = now;
            if n == RECEIVER {
                continue;
            }
            if measuring {
                tally.before += full_len as u64;
                if node.region == region_of(RECEIVER) {
                    tally.own += bytes.len() as u64;
                    tally.v1 += v1_len as u64;
                }
            }
            if let Some(a) = aggregators.get_mut(&node.region) {
                if a.node != n {
                    let wire = decode_wire(&bytes).expect("decodes");
                    a.peers.apply(wire).expect("follows the chain");
                }
                a.at.insert(n, now);
                if changed {
                    a.stream.changed = true;
                    a.changed_at.get_or_insert(now);
                }
            }
        }
        for a in aggregators.values_mut() {
            if !a.stream.due(now, &mut rng) {
                continue;
            }
            let own = &nodes[(a.node - 1) as usize].latest;
            let held = a
                .members
                .iter()
                .filter(|&&m| m != a.node)
                .filter_map(|&m| a.peers.held(m));
            a.seq += 1;
            let report = Report {
                node_id: a.node,
                incarnation: 1,
                seq: a.seq,
                sent_at_ms: wall,
                entries: aggregate(std::iter::once(own.as_slice()).chain(held)),
            };
            let (bytes, v1_len, _) = a.stream.send(&report, now, wall, &mut rng);
            if measuring {
                tally.aggregates += bytes.len() as u64;
                tally.v1 += v1_len as u64;
                for at in a.at.values() {
                    tally.ages.push((now - *at).as_secs_f64());
                }
                if let Some(c) = a.changed_at.take() {
                    tally.waits.push((now - c).as_secs_f64());
                }
            } else {
                a.changed_at = None;
            }
        }
    }
    tally
}
