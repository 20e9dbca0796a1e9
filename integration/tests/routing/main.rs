//! A write answers once the node that answered routes by it (SPEC §5): the
//! very next request to that node sees the change, with nothing waited for
//! but the admin API's answer; and instances attached and detached as fast
//! as the API answers cost no request under load.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use integration::client;
use integration::cluster::{attach, get_once};
use integration::{AdminClient, Cluster, HttpBackend, TestNode, load, wait_until};

const WEB_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;

/// The default fqdn of group `name` in a [`Cluster`].
fn host(name: &str) -> String {
    format!("{name}.edgelb.local")
}

async fn detach(admin: &AdminClient, group: &str, name: &str) -> anyhow::Result<()> {
    let (status, v) = admin
        .delete(&format!("/v1/services/{group}/instances/{name}"))
        .await?;
    ensure!(status.is_success(), "detaching {name}: {status} {v}");
    Ok(())
}

/// Holds one `GET /slow` on `backend` through `addr`, so that the node
/// counts one request in flight to it; returns once the backend holds it.
async fn hold(
    addr: SocketAddr,
    host: &str,
    backend: &HttpBackend,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let before = backend.held();
    let host = host.to_owned();
    let task = tokio::spawn(async move {
        let _ = client::get(addr, &host, "/slow").await;
    });
    wait_until(
        "the base instance to hold a request",
        Duration::from_secs(10),
        || async { backend.held() == before + 1 },
    )
    .await?;
    Ok(task)
}

/// Through a follower of three nodes, 200 rounds: attach an instance, and
/// the next request to that follower reaches it; detach it, and the next
/// request never does. The group keeps a `base` instance with one request
/// held in flight, so a new instance (none in flight) is the only least
/// loaded one the moment the follower routes by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_follower_the_next_request_sees_each_attach_and_detach() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .context("no follower")?;
    let admin = cluster.admin(follower);
    let backends = cluster
        .http_backends(&["base", "fresh"], BACKEND_PORT)
        .await?;
    let (base, fresh) = (&backends[0], &backends[1]);
    let group = cluster
        .http_group(follower, "web", WEB_PORT, BACKEND_PORT, &backends[..1])
        .await?;
    let addr = cluster.data_addr(follower, WEB_PORT);
    let web = host("web");

    let mut held = hold(addr, &web, base).await?;
    for round in 0..200 {
        // A held request ends at the upstream timeout (60 s): renew it
        // well before.
        if round % 50 == 49 {
            base.release();
            held.await?;
            held = hold(addr, &web, base).await?;
        }
        let name = format!("r{round}");
        attach(&admin, &group.uuid, &name, fresh.addr().ip()).await?;
        let answer = get_once(addr, &web).await?;
        ensure!(
            answer == (200, Some("fresh".to_owned())),
            "round {round}: the request after attaching {name} was answered {answer:?}"
        );
        detach(&admin, &group.uuid, &name).await?;
        let answer = get_once(addr, &web).await?;
        ensure!(
            answer == (200, Some("base".to_owned())),
            "round {round}: the request after detaching {name} was answered {answer:?}"
        );
    }
    base.release();
    held.await?;
    Ok(())
}

/// The `instance_name` labels of every per-instance series in a scrape.
async fn instance_series(node: &TestNode) -> anyhow::Result<BTreeSet<String>> {
    let scrape = node.scrape().await?;
    Ok(scrape
        .samples
        .iter()
        .filter(|s| s.name.starts_with("edgelb_instance_"))
        .filter_map(|s| s.labels.get("instance_name").cloned())
        .collect())
}

/// One node, keep-alive and connection-close load on a group of four
/// instances, while a loop attaches and detaches a fifth as fast as the
/// admin API answers: not one request fails, the fifth takes part, and
/// afterwards the per-instance metric series are those of the four again.
/// `EDGELB_CHURN_SECS` sets the churn time (default 12; the README's figure
/// is 180 in a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_under_load_fails_no_request_and_leaves_no_series() -> anyhow::Result<()> {
    let churn_for = Duration::from_secs(
        std::env::var("EDGELB_CHURN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    );
    let node = TestNode::start().await?;
    let names = ["c1", "c2", "c3", "c4"];
    let backends = node.http_backends(&names, BACKEND_PORT).await?;
    let fifth = node.http_backends(&["fifth"], BACKEND_PORT).await?;
    let group = node
        .http_group("churn", WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    let addr = node.addr(WEB_PORT);
    let host = "churn.test".to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(load::Tally::default());
    let loops = load::mixed(addr, &host, 3, || node.subnet.next_ip(), &stop, &tally);

    let started = Instant::now();
    // RSS (of this process: node, backends and clients) at six points.
    let every = churn_for / 6;
    let mut rss = vec![(Duration::ZERO, load::rss_kib(None))];
    let mut pairs = 0_u64;
    while started.elapsed() < churn_for {
        let name = format!("x{pairs}");
        node.attach(&group, &name, fifth[0].addr().ip()).await?;
        node.detach(&group, &name).await?;
        pairs += 1;
        let (last, _) = rss[rss.len() - 1];
        if started.elapsed() >= last + every {
            rss.push((started.elapsed(), load::rss_kib(None)));
        }
    }
    let churned = started.elapsed();
    load::stop(&stop, loops).await?;
    rss.push((started.elapsed(), load::rss_kib(None)));
    let rss: Vec<String> = rss
        .iter()
        .map(|(at, kib)| format!("{:.0}s {} MiB", at.as_secs_f64(), kib / 1024))
        .collect();

    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "{pairs} attach/detach pairs in {churned:.1?} ({:.0}/s); {ok} requests ok, {failed} failed; \
         the fifth answered {}; RSS {}",
        pairs as f64 / churned.as_secs_f64(),
        fifth[0].requests(),
        rss.join(", "),
    );
    ensure!(
        failed == 0,
        "{failed} of {} requests failed, first: {:?}",
        ok + failed,
        tally.failures()
    );
    ensure!(
        ok > 0 && pairs > 0,
        "no load or no churn: {ok} requests, {pairs} pairs"
    );
    ensure!(
        fifth[0].requests() > 0,
        "the churned instance never took a request: the test did not overlap churn and load"
    );
    let want: BTreeSet<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let series = instance_series(&node).await?;
    ensure!(
        series == want,
        "per-instance series after the churn: {series:?}, want {want:?}"
    );
    node.stop().await
}
