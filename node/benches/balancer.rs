//! Selection cost: one pick plus the release of a lease, at 10, 1 000 and
//! 100 000 instances under a random background load.
//!
//! `cargo bench -p edgelb --bench balancer` (add `-- --quick` for a short run).
//!
//! - `pick_release`: pick and release at once, so the tree returns to the
//!   same state each iteration. The release is `Lease::release(now)`, as
//!   the data plane ends its work with the clock reading it takes for the
//!   duration histogram anyway (dropping a lease reads the clock itself,
//!   ~23 ns more on the development machine).
//! - `churn`: a window of leases in flight, each iteration picks one and
//!   releases the oldest (two different paths rewritten).
//! - `contended`: up to 4 threads (one per core) doing `pick_release` on the
//!   same group; wall time per operation over all threads (the per-group
//!   lock under contention).

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgelb::balancer::{Backend, GroupBalancer, Lease, Pick};
use edgelb::series::InstanceMetrics;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// A group of `n` instances with random peer loads (0..16) and `n / 4` local
/// leases in flight, so the minimum set is a small, scattered fraction.
fn loaded_group(n: usize, rng: &mut SmallRng) -> (Arc<GroupBalancer>, Vec<Lease>) {
    let metrics = InstanceMetrics::new();
    let backends: Vec<Arc<Backend>> = (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                Uuid::new_v4(),
                format!("i-{i}"),
                format!("10.0.{}.{}", i / 256 % 256, i % 256),
                metrics.clone(),
            ))
        })
        .collect();
    let group = Arc::new(GroupBalancer::new(u32::MAX));
    group.set_backends(backends.clone());
    for b in &backends {
        group.set_peer_load(b, rng.random_range(0..16));
    }
    let now = Instant::now();
    let held = (0..n / 4)
        .filter_map(|_| match group.pick(now, rng) {
            Pick::Selected(lease) => Some(lease),
            Pick::NoInstances | Pick::Overloaded => None,
        })
        .collect();
    (group, held)
}

/// Ends the work of a pick at `now`.
fn release(pick: Pick, now: Instant) {
    if let Pick::Selected(lease) = pick {
        lease.release(now);
    }
}

fn pick_release(c: &mut Criterion) {
    let mut bench = c.benchmark_group("pick_release");
    for n in SIZES {
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let (group, _held) = loaded_group(n, &mut rng);
        let now = Instant::now();
        bench.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| release(black_box(group.pick(now, &mut rng)), now));
        });
    }
    bench.finish();
}

fn churn(c: &mut Criterion) {
    let mut bench = c.benchmark_group("churn");
    for n in SIZES {
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let (group, _held) = loaded_group(n, &mut rng);
        let now = Instant::now();
        let window = n.min(1_024);
        let mut in_flight: VecDeque<Pick> = VecDeque::with_capacity(window + 1);
        bench.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                in_flight.push_back(group.pick(now, &mut rng));
                if in_flight.len() > window
                    && let Some(pick) = in_flight.pop_front()
                {
                    release(black_box(pick), now);
                }
            });
        });
    }
    bench.finish();
}

fn contended(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get().min(4)) as u64;
    let mut bench = c.benchmark_group("contended");
    for n in SIZES {
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let (group, _held) = loaded_group(n, &mut rng);
        bench.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(threads);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let group = &group;
                        s.spawn(move || {
                            let mut rng = SmallRng::seed_from_u64(t);
                            let now = Instant::now();
                            for _ in 0..per_thread {
                                release(black_box(group.pick(now, &mut rng)), now);
                            }
                        });
                    }
                });
                // Wall time per operation across all threads.
                let total = start.elapsed();
                total.mul_f64(iters as f64 / (per_thread * threads) as f64)
            });
        });
    }
    bench.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = pick_release, churn, contended
}
criterion_main!(benches);
