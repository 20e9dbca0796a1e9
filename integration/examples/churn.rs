//! Attach/detach churn under load against one `edgelb` process (a
//! measurement tool, not a test).
//!
//! ```text
//!   cargo run -p integration --example churn [--release] [-- SECONDS]
//! ```
//!
//! Starts one node (the harness's [`Cluster`], same profile), a group of
//! four HTTP instances, three kept-alive and three one-request-per-connection
//! load loops, and attaches and detaches a fifth instance as fast as the
//! admin API answers for `SECONDS` (default 180). Prints the pairs done, the
//! requests answered and failed, the node process's RSS at seven points, and
//! the instances that still have metric series (the four, when nothing
//! leaks). Exits non-zero on a failed request.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use integration::cluster::{Cluster, attach};
use integration::load;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args().nth(1).map_or(Ok(180), |a| a.parse())?;
    let churn_for = Duration::from_secs(secs);
    let cluster = Cluster::start(1).await?;
    let pid = cluster.pid(1).context("node 1 is not running")?;
    let names = ["c1", "c2", "c3", "c4"];
    let backends = cluster.http_backends(&names, 9000).await?;
    let fifth = cluster.http_backends(&["fifth"], 9000).await?;
    let group = cluster
        .http_group(1, "churn", 8080, 9000, &backends)
        .await?;
    let admin = cluster.admin(1);
    let addr = cluster.data_addr(1, 8080);
    let host = "churn.edgelb.local".to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(load::Tally::default());
    let loops = load::mixed(addr, &host, 3, || cluster.backend_ip(), &stop, &tally);

    let started = Instant::now();
    let every = churn_for / 6;
    let mut rss = vec![(Duration::ZERO, load::rss_kib(Some(pid)))];
    let mut pairs = 0_u64;
    while started.elapsed() < churn_for {
        let name = format!("x{pairs}");
        attach(&admin, &group.uuid, &name, fifth[0].addr().ip()).await?;
        let (status, v) = admin
            .delete(&format!("/v1/services/{}/instances/{name}", group.uuid))
            .await?;
        ensure!(status.is_success(), "detaching {name}: {status} {v}");
        pairs += 1;
        let (last, _) = rss[rss.len() - 1];
        if started.elapsed() >= last + every {
            rss.push((started.elapsed(), load::rss_kib(Some(pid))));
        }
    }
    let churned = started.elapsed();
    load::stop(&stop, loops).await?;
    rss.push((started.elapsed(), load::rss_kib(Some(pid))));

    let scrape = admin.scrape().await?;
    let series: BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.name.starts_with("edgelb_instance_"))
        .filter_map(|s| s.labels.get("instance_name").map(String::as_str))
        .collect();
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "{profile}: {pairs} attach/detach pairs in {churned:.1?} ({:.0}/s); \
         {ok} requests ok, {failed} failed; the fifth answered {}",
        pairs as f64 / churned.as_secs_f64(),
        fifth[0].requests(),
    );
    let rss: Vec<String> = rss
        .iter()
        .map(|(at, kib)| format!("{:.0}s {:.1} MiB", at.as_secs_f64(), *kib as f64 / 1024.0))
        .collect();
    println!("node RSS: {}", rss.join(", "));
    println!("instances with metric series: {series:?}");
    ensure!(failed == 0, "failures: {:?}", tally.failures());
    Ok(())
}
