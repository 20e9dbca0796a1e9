//! A zero-downtime upgrade of a running node (SIGUSR2, `edgelb --upgrade`)
//! in a 3-node cluster 50 ms apart, under `wrk` load on the upgraded node:
//! HTTP keep-alive, a new connection per request, and TCP mode. Not one
//! request may fail (no refused connection, no reset, no error status),
//! the node upgrades twice (the new process is upgraded in turn), and a
//! write through it commits and is routed by every node after each
//! upgrade.
//!
//! Without `wrk` the test prints why and passes, unless
//! `EDGELB_REQUIRE_WRK=1` (CI).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use integration::cluster::{attach, wait_serving};
use integration::link::Link;
use integration::{Cluster, ClusterOptions, poll};
use serde_json::json;

/// The group's HTTP-mode and TCP-mode ports.
const HTTP_PORT: u16 = 8100;
const TCP_PORT: u16 = 8101;
const BACKEND_PORT: u16 = 9100;
/// How long each `wrk` runs: both upgrades fall inside it.
const LOAD_SECS: u64 = 14;

fn wrk() -> anyhow::Result<Option<&'static str>> {
    let found = std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok();
    if found {
        return Ok(Some("wrk"));
    }
    if std::env::var("EDGELB_REQUIRE_WRK").as_deref() == Ok("1") {
        bail!("wrk is not installed (EDGELB_REQUIRE_WRK=1)");
    }
    eprintln!("wrk is not installed: the upgrade-under-load test is skipped");
    Ok(None)
}

/// One `wrk` run: its output once it ends.
fn load(
    wrk: &str,
    addr: SocketAddr,
    close: bool,
) -> tokio::task::JoinHandle<anyhow::Result<String>> {
    let mut cmd = tokio::process::Command::new(wrk);
    cmd.args(["-t1", "-c6", &format!("-d{LOAD_SECS}s"), "--timeout", "5s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/")).kill_on_drop(true);
    tokio::spawn(async move {
        let out = cmd.output().await.context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "wrk failed: {text}");
        Ok(text)
    })
}

/// The requests a `wrk` report counts, after checking it saw no error:
/// `Socket errors` (connect, read, write, timeout) and `Non-2xx or 3xx
/// responses` are printed only when not zero.
fn no_errors(what: &str, report: &str) -> anyhow::Result<u64> {
    ensure!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "{what}: requests failed during the upgrades:\n{report}"
    );
    report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{what}: no request count in {report}"))
}

/// A write through node `id` (an instance attached), then served by every
/// node.
async fn write_through(
    cluster: &Cluster,
    id: u64,
    backend: &integration::HttpBackend,
) -> anyhow::Result<()> {
    attach(
        &cluster.admin(id),
        "web",
        backend.name(),
        backend.addr().ip(),
    )
    .await?;
    for n in cluster.ids() {
        wait_serving(cluster.data_addr(n, HTTP_PORT), "web", &[backend.name()]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_wrk_load_fails_no_request() -> anyhow::Result<()> {
    let Some(wrk) = wrk()? else {
        return Ok(());
    };
    let mut cluster = Cluster::start_with(
        3,
        ClusterOptions {
            relay: Some(16),
            link: Link::delayed(Duration::from_millis(25), Duration::from_millis(5)),
            ..ClusterOptions::default()
        },
    )
    .await?;
    let backends = cluster
        .http_backends(&["a", "b", "c"], BACKEND_PORT)
        .await?;
    let admin = cluster.admin(1);
    admin
        .create_group(&json!({
            "name": "web",
            "services": [
                {"port": HTTP_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]},
                {"port": TCP_PORT, "destination_port": BACKEND_PORT, "handlers": []},
            ],
        }))
        .await?;
    attach(&admin, "web", backends[0].name(), backends[0].addr().ip()).await?;
    for n in cluster.ids() {
        wait_serving(cluster.data_addr(n, HTTP_PORT), "web", &["a"]).await?;
    }

    // The leader: its upgrade stops the cluster's leader for a moment.
    let id = cluster.leader().await?;
    let runs = [
        (
            "HTTP keep-alive",
            load(wrk, cluster.data_addr(id, HTTP_PORT), false),
        ),
        (
            "HTTP, a connection per request",
            load(wrk, cluster.data_addr(id, HTTP_PORT), true),
        ),
        (
            "TCP mode, a connection per request",
            load(wrk, cluster.data_addr(id, TCP_PORT), true),
        ),
    ];
    // The load reaches the node before the first upgrade.
    poll(
        "wrk's requests to reach the node",
        Duration::from_secs(10),
        || async {
            let served = cluster.metric(id, "edgelb_instance_selected_total").await?;
            ensure!(served >= 100.0, "{served} so far");
            Ok(())
        },
    )
    .await?;

    let first = cluster.upgrade(id).await?;
    write_through(&cluster, id, &backends[1]).await?;
    let second = cluster.upgrade(id).await?;
    ensure!(first != second, "the second upgrade made a new process");
    for (what, run) in &runs {
        ensure!(
            !run.is_finished(),
            "{what}: the load ended before the second upgrade did (LOAD_SECS is too short here)"
        );
    }
    write_through(&cluster, id, &backends[2]).await?;
    // Still a voter: the new processes are the same member.
    let view = cluster.status(id).await?;
    ensure!(
        view.nodes
            .iter()
            .any(|n| n.node_id == id && n.role == edgelb_api::cluster::Role::Voter),
        "node {id} is no longer a voter: {view:?}"
    );

    for (what, run) in runs {
        let report = run.await??;
        let requests = no_errors(what, &report)?;
        ensure!(
            requests >= 100,
            "{what}: only {requests} requests:\n{report}"
        );
        eprintln!("{what}: {requests} requests, none failed");
    }
    cluster.ensure_no_errors()?;
    Ok(())
}
