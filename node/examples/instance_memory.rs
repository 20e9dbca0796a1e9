//! What one attached instance costs in memory, by part, measured in
//! process as growth of the resident set (Linux `/proc/self/statm`).
//!
//! `cargo run --release -p edgelb --example instance_memory [-- INSTANCES]`
//! (default 100000; groups of 10 sharing 50 HTTP ports, as in the scale
//! benchmark).
//!
//! Parts: the replicated `State` (the state machine's copy), the routing
//! table (group runtimes, backends with their metric counters, balancers,
//! port routes), one `GET /metrics` body (gzip and text: time and CPU), and
//! upstream pools if every instance got traffic on its port (pools are
//! created on first use, so an idle instance has none).

#[path = "../benches/support/scale.rs"]
mod scale;

use arc_swap::ArcSwap;
use edgelb::metrics::Metrics;
use edgelb::routing::{RoutingTable, publish};
use edgelb::tls::CertCache;

/// Resident set size in bytes (Linux), 0 elsewhere.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Counts what is written to it.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// CPU time (user + system) this process used so far, from
/// `/proc/self/stat` (clock ticks of 10 ms); zero elsewhere.
fn cpu() -> std::time::Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    std::time::Duration::from_millis(ticks * 10)
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
    let (started, cpu0) = (std::time::Instant::now(), cpu());
    let mut body = Vec::new();
    metrics.render_gzip_to(&table, &mut body).expect("render");
    let (took, cpu1) = (started.elapsed(), cpu());
    // Again, as the next scrape of unchanged counters: every compressed
    // block reused.
    let mut again = Counted(0);
    metrics.render_gzip_to(&table, &mut again).expect("render");
    let (warm, cpu2) = (started.elapsed() - took, cpu());
    // As `/metrics` streams it: chunk by chunk, never whole.
    let mut text = Counted(0);
    metrics.render_to(&table, &mut text).expect("render");
    let (plain, cpu3) = (started.elapsed() - took - warm, cpu());
    println!(
        "scrape gzip:    {} bytes in {took:.2?} ({:?} CPU); again, unchanged: {warm:.2?} ({:?} CPU)",
        body.len(),
        cpu1 - cpu0,
        cpu2 - cpu1
    );
    println!(
        "scrape text:    {} bytes in {plain:.2?} ({:?} CPU)",
        text.0,
        cpu3 - cpu2
    );
    drop(body);
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
