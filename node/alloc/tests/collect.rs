//! With mimalloc as the allocator, as in the `edgelb` binary: memory a
//! thread freed stays resident until that thread works in the allocator
//! again, and `collect` gives it back without any.

use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: edgelb_alloc::MiMalloc = edgelb_alloc::MiMalloc;

/// The process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[test]
fn collect_returns_what_a_burst_freed_on_a_quiet_thread() {
    // A burst: 64 MiB in connection-buffer-sized blocks, written so that
    // every page is resident, then freed.
    let before = rss_kib();
    let blocks: Vec<Vec<u8>> = (0..8192).map(|i| vec![i as u8; 8192]).collect();
    let peak = rss_kib();
    assert!(
        peak >= before + 48 * 1024,
        "the burst is resident: {before} -> {peak} KiB"
    );
    drop(blocks);
    let freed = rss_kib();
    assert!(
        freed > before + 32 * 1024,
        "mimalloc keeps freed pages for its purge delay: {before} -> {freed} KiB"
    );
    // Quiet: nothing allocates. Within a few purge delays, collect has
    // given the pages back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        edgelb_alloc::collect();
        let now = rss_kib();
        if now < before + 8 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {now} KiB resident 30 s after the burst (before it: {before} KiB)"
        );
        std::thread::park_timeout(Duration::from_millis(100));
    }
}
