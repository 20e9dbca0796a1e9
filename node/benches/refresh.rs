//! Cost of one refresh tick at scale: 100 nodes (99 peers) × 1 000 busy
//! instances in one group, every peer reporting every instance.
//!
//! `cargo bench -p edgelb --bench refresh`
//!
//! A tick is what the refresh task does: take the load table's snapshot
//! (the only time it holds the table's lock), run the group's
//! `gossip::GroupView` (decay, predicted picks, water level), and hand the
//! fixed-point loads to the balancer (`set_peer_loads`, batched locks).
//!
//! - `aging`: no new report since the last tick, only the ages move;
//! - `new_reports/N`: N peers' reports replaced before the tick (at 200
//!   reports/s per peer, a 1 ms tick sees ~20 of the 99).
//! - `intake`: building and merging one 1 000-entry report into the table
//!   (what a report costs the receiving task; not part of the tick).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgelb::balancer::{Backend, GroupBalancer};
use edgelb::series::InstanceMetrics;
use gossip::{Entry, GroupView, LoadTable, Report};
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
    view: GroupView,
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
    Setup {
        table,
        view: GroupView::new(&ids_in_slot_order),
        group,
        backends,
        ids,
        config,
        seq: 1,
    }
}

impl Setup {
    fn tick(&mut self, now: Instant, out: &mut Vec<gossip::PeerLoad>) {
        let peers = self.table.snapshot();
        self.view.estimate(&self.config, &peers, now, out);
        let loads = self
            .backends
            .iter()
            .map(AsRef::as_ref)
            .zip(out.iter().copied());
        self.group.set_peer_loads(loads);
    }
}

fn refresh(c: &mut Criterion) {
    let mut bench = c.benchmark_group("refresh");
    let start = Instant::now();
    let mut s = setup(start);
    let mut out = Vec::new();
    let mut now = start;
    s.tick(now, &mut out);
    bench.bench_function("aging", |b| {
        b.iter(|| {
            // Ages move by 1 µs a tick and wrap well within the TTL.
            now += Duration::from_micros(1);
            if now > start + Duration::from_millis(500) {
                now = start;
            }
            s.tick(black_box(now), &mut out);
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
                    s.tick(start + Duration::from_millis(3), &mut out);
                    total += t.elapsed();
                }
                total
            });
        });
    }
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
