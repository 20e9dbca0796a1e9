//! Cost of one refresh tick at scale: 100 nodes (99 peers) × 1 000 busy
//! instances in one group, every peer reporting every instance.
//!
//! `cargo bench -p edgelb --bench refresh`
//!
//! A tick is what the refresh task does: take the load table's snapshot
//! (the only time it holds the table's lock), run the group's
//! `gossip::ViewSet` (decay, predicted picks, water level), and hand the
//! fixed-point loads to the balancer (`set_peer_loads`, batched locks).
//!
//! - `aging`: no new report since the last tick, only the ages move;
//! - `new_reports/N`: N peers' reports replaced before the tick (at 200
//!   reports/s per peer, a 1 ms tick sees ~20 of the 99).
//! - `many_groups`: 10,000 groups of 10 instances, 20 peers each reporting
//!   1,000 busy instances (one in every tenth group), every report new at
//!   each tick (peers report every 5 ms while their counts move);
//! - `intake`: building and merging one 1 000-entry report into the table
//!   (what a report costs the receiving task; not part of the tick).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgelb::balancer::{Backend, GroupBalancer};
use edgelb::series::InstanceMetrics;
use gossip::{Entry, LoadTable, Report, ViewSet};
use uuid::Uuid;

const PEERS: u64 = 99;
const INSTANCES: usize = 1_000;

fn report(peer: u64, seq: u64, ids: &[[u8; 16]]) -> Report {
    Report {
        node_id: peer,
        incarnation: 1,
        seq,
        sent_at_ms: 0,
        entries: ids
            .iter()
            .enumerate()
            .map(|(i, &instance)| Entry {
                instance,
                inflight: 1 + ((i as u64 + peer + seq) % 5) as u32,
                long_inflight: ((i as u64 + seq) % 2) as u32,
                arrival_rate_milli: 2_000 + (i as u32 % 7) * 100,
                mean_service_us: 50_000 + (i as u32 % 11) * 1_000,
            })
            .collect(),
    }
}

struct Setup {
    table: LoadTable,
    views: ViewSet<usize>,
    group: Arc<GroupBalancer>,
    backends: Vec<Arc<Backend>>,
    ids: Vec<[u8; 16]>,
    config: gossip::Config,
    seq: u64,
}

fn setup(start: Instant) -> Setup {
    let backends: Vec<Arc<Backend>> = (0..INSTANCES)
        .map(|i| {
            Arc::new(Backend::new(
                Uuid::from_u128(i as u128 + 1),
                format!("i-{i}"),
                format!("10.0.{}.{}", i / 256, i % 256),
                InstanceMetrics::new(),
            ))
        })
        .collect();
    let mut ids: Vec<[u8; 16]> = backends.iter().map(|b| b.uuid.into_bytes()).collect();
    ids.sort_unstable();
    let group = Arc::new(GroupBalancer::new(u32::MAX));
    group.set_backends(backends.clone());
    let config = gossip::Config::default();
    let mut table = LoadTable::new(config.ttl);
    for peer in 1..=PEERS {
        table.insert(report(peer, 1, &ids), start);
    }
    let ids_in_slot_order: Vec<[u8; 16]> = backends.iter().map(|b| b.uuid.into_bytes()).collect();
    let mut views = ViewSet::default();
    views.set_group(0, &ids_in_slot_order);
    Setup {
        table,
        views,
        group,
        backends,
        ids,
        config,
        seq: 1,
    }
}

impl Setup {
    fn tick(&mut self, now: Instant) {
        let peers = self.table.snapshot();
        let (group, backends) = (&self.group, &self.backends);
        self.views.refresh(&self.config, &peers, now, |_, loads| {
            let loads = backends
                .iter()
                .map(AsRef::as_ref)
                .zip(loads.iter().copied());
            group.set_peer_loads(loads);
        });
    }
}

/// Groups, instances per group, peers and busy instances per peer report
/// of `many_groups`.
const GROUPS: usize = 10_000;
const PER_GROUP: usize = 10;
const MANY_PEERS: u64 = 20;
const BUSY: usize = 1_000;

/// One group's part of a node: its balancer and backends.
struct Group {
    balancer: Arc<GroupBalancer>,
    backends: Vec<Arc<Backend>>,
}

/// A node's refresh over many small groups, as the refresh task runs it:
/// one view per group, each tick the groups some peer reports load on.
struct ManyGroups {
    table: LoadTable,
    views: ViewSet<usize>,
    groups: Vec<Group>,
    /// The busy instances, one in every tenth group, sorted.
    busy: Vec<[u8; 16]>,
    config: gossip::Config,
    seq: u64,
}

impl ManyGroups {
    fn new(start: Instant) -> Self {
        let groups: Vec<Group> = (0..GROUPS)
            .map(|g| {
                let backends: Vec<Arc<Backend>> = (0..PER_GROUP)
                    .map(|i| {
                        // Spread over the id space, as random uuids are.
                        let id = Uuid::from_u128(
                            ((g * PER_GROUP + i) as u128)
                                .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                        );
                        Arc::new(Backend::new(
                            id,
                            format!("i-{i}"),
                            "10.0.0.1".into(),
                            InstanceMetrics::new(),
                        ))
                    })
                    .collect();
                let balancer = Arc::new(GroupBalancer::new(u32::MAX));
                balancer.set_backends(backends.clone());
                Group { balancer, backends }
            })
            .collect();
        let mut views = ViewSet::default();
        for (g, group) in groups.iter().enumerate() {
            let ids: Vec<[u8; 16]> = group.backends.iter().map(|b| b.uuid.into_bytes()).collect();
            views.set_group(g, &ids);
        }
        let mut busy: Vec<[u8; 16]> = groups
            .iter()
            .step_by(GROUPS / BUSY)
            .map(|g| g.backends[0].uuid.into_bytes())
            .collect();
        busy.sort_unstable();
        let mut m = Self {
            table: LoadTable::new(gossip::Config::default().ttl),
            views,
            groups,
            busy,
            config: gossip::Config::default(),
            seq: 1,
        };
        for peer in 1..=MANY_PEERS {
            m.table.insert(m.report(peer), start);
        }
        m
    }

    fn report(&self, peer: u64) -> Report {
        report(peer, self.seq, &self.busy)
    }

    fn tick(&mut self, now: Instant) {
        let peers = self.table.snapshot();
        let groups = &self.groups;
        self.views.refresh(&self.config, &peers, now, |&g, loads| {
            let group = &groups[g];
            let loads = group
                .backends
                .iter()
                .map(AsRef::as_ref)
                .zip(loads.iter().copied());
            group.balancer.set_peer_loads(loads);
        });
    }
}

fn refresh(c: &mut Criterion) {
    let mut bench = c.benchmark_group("refresh");
    let start = Instant::now();
    let mut s = setup(start);
    let mut now = start;
    s.tick(now);
    bench.bench_function("aging", |b| {
        b.iter(|| {
            // Ages move by 1 µs a tick and wrap well within the TTL.
            now += Duration::from_micros(1);
            if now > start + Duration::from_millis(500) {
                now = start;
            }
            s.tick(black_box(now));
        });
    });
    for fresh in [1u64, 20] {
        let mut s = setup(start);
        let mut peer = 0;
        bench.bench_with_input(BenchmarkId::new("new_reports", fresh), &fresh, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Intake is not part of the tick.
                    for _ in 0..n {
                        peer = peer % PEERS + 1;
                        s.seq += 1;
                        s.table.insert(report(peer, s.seq, &s.ids), start);
                    }
                    let t = Instant::now();
                    s.tick(start + Duration::from_millis(3));
                    total += t.elapsed();
                }
                total
            });
        });
    }
    let mut m = ManyGroups::new(start);
    let mut tick_at = start;
    bench.bench_function("many_groups", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Intake is not part of the tick.
                m.seq += 1;
                for peer in 1..=MANY_PEERS {
                    m.table.insert(m.report(peer), start);
                }
                tick_at += Duration::from_micros(1);
                let t = Instant::now();
                m.tick(tick_at);
                total += t.elapsed();
            }
            total
        });
    });
    let mut s = setup(start);
    bench.bench_function("intake", |b| {
        b.iter(|| {
            s.seq += 1;
            s.table.insert(black_box(report(1, s.seq, &s.ids)), start);
        });
    });
    bench.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = refresh
}
criterion_main!(benches);
