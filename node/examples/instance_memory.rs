//! What one attached instance costs in memory, by part, measured in
//! process as growth of the resident set (Linux `/proc/self/statm`).
//!
//! `cargo run --release -p edgelb --example instance_memory [-- INSTANCES]`
//! (default 100000; groups of 10 sharing 50 HTTP ports, as in the scale
//! benchmark).
//!
//! Parts: the replicated `State` (the state machine's copy), the routing
//! table (group runtimes, backends with their metric counters, balancers,
//! port routes), one `GET /metrics` (gzip; transient), and upstream pools
//! if every instance got traffic on its port (pools are created on first
//! use, so an idle instance has none).

#[path = "../benches/support/scale.rs"]
mod scale;

use arc_swap::ArcSwap;
use edgelb::metrics::Metrics;
use edgelb::routing::{RoutingTable, publish};
use edgelb::tls::CertCache;
use flate2::Compression;
use flate2::write::GzEncoder;

/// Resident set size in bytes (Linux), 0 elsewhere.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn main() {
    let instances: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let per = |bytes: usize| bytes as f64 / instances as f64;
    let rss0 = rss();
    let state = scale::state(instances);
    let rss1 = rss();
    println!(
        "state:          {:>6.0} B/instance RSS",
        per(rss1.saturating_sub(rss0))
    );

    let certs = CertCache::default();
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    publish(&routes, &state, &scale::cx(&certs));
    let rss2 = rss();
    println!(
        "routing table:  {:>6.0} B/instance RSS (backends, metric counters, balancers, routes)",
        per(rss2.saturating_sub(rss1))
    );

    let metrics = Metrics::new();
    let table = routes.load_full();
    let started = std::time::Instant::now();
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    metrics.render_to(&table, &mut gz).expect("render");
    let body = gz.finish().expect("gzip");
    let took = started.elapsed();
    let started = std::time::Instant::now();
    let mut text = Vec::new();
    metrics.render_to(&table, &mut text).expect("render");
    let plain = started.elapsed();
    println!(
        "scrape:         {} bytes gzip in {took:.2?}, {} bytes text in {plain:.2?}",
        body.len(),
        text.len(),
    );
    drop((body, text));
    let rss3 = rss();
    println!(
        "after a scrape: {:>6.0} B/instance RSS (state + table; freed buffers may stay resident)",
        per(rss3.saturating_sub(rss0))
    );

    let pools: Vec<_> = table
        .groups()
        .flat_map(|g| g.backends.values())
        .map(|b| b.pool(9000))
        .collect();
    println!(
        "pools if used:  {:>6.0} B/instance RSS (one destination port, no connection)",
        per(rss().saturating_sub(rss3))
    );
    drop(pools);
    println!("total RSS:      {} MiB", rss() / (1 << 20));
    drop(state);
}
