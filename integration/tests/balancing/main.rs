//! Balancing end to end: least in-flight requests, uniformly at random among
//! the instances tied at the minimum (SPEC §3), over real sockets.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::ensure;
use http::StatusCode;
use integration::client::{self, HttpConn};
use integration::stats::{chi_square_uniform, critical_1e4, tally};
use integration::{HttpBackend, NodeOptions, TestNode, wait_until};
use serde_json::json;

const PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;
const NAMES: [&str; 4] = ["b1", "b2", "b3", "b4"];

/// `n` sequential quick requests on one keep-alive connection; the backend
/// that answered each.
async fn quick_picks(conn: &mut HttpConn, n: usize) -> anyhow::Result<Vec<String>> {
    let mut picks = Vec::with_capacity(n);
    for i in 0..n {
        let r = conn.get("lb.test", "/").await?;
        ensure!(
            r.status == StatusCode::OK,
            "request {i}: {} {}",
            r.status,
            r.text()
        );
        let backend = r.backend().map(str::to_owned);
        ensure!(
            backend.as_deref() == Some(r.text().as_str()),
            "request {i}: x-backend {backend:?} vs body {:?}",
            r.text()
        );
        picks.push(r.text());
    }
    Ok(picks)
}

fn total_held(backends: &[HttpBackend]) -> usize {
    backends.iter().map(HttpBackend::held).sum()
}

/// Sends `GET /slow` in the background and waits until a backend holds it.
async fn hold_one(
    node: &TestNode,
    backends: &[HttpBackend],
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<client::Reply>>> {
    let before = total_held(backends);
    let addr = node.addr(PORT);
    let slow = tokio::spawn(async move { client::get(addr, "lb.test", "/slow").await });
    wait_until(
        "a backend to hold the slow request",
        Duration::from_secs(5),
        || async { total_held(backends) == before + 1 },
    )
    .await?;
    Ok(slow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_share_sequential_requests_uniformly() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&NAMES, BACKEND_PORT).await?;
    node.http_group("uniform", PORT, BACKEND_PORT, &backends)
        .await?;

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let picks = quick_picks(&mut conn, 400).await?;
    let counts = tally(NAMES, &picks);
    ensure!(
        counts.len() == 4,
        "answers from unknown backends: {counts:?}"
    );
    let values: Vec<usize> = counts.values().copied().collect();
    let chi = chi_square_uniform(&values);
    assert!(
        chi < critical_1e4(3),
        "400 picks over 4 idle instances are not uniform: {counts:?}, chi-square {chi:.1} >= {}",
        critical_1e4(3)
    );

    // The node's own count agrees with what the backends answered.
    let scrape = node.scrape().await?;
    for (name, n) in &counts {
        let selected = scrape.sum(
            "edgelb_instance_selected_total",
            &[("service", "uniform"), ("instance_name", name)],
        );
        assert_eq!(
            selected, *n as f64,
            "edgelb_instance_selected_total of {name}"
        );
    }
    drop(conn);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_keeps_its_instance_out_of_quick_picks() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&NAMES, BACKEND_PORT).await?;
    node.http_group("held", PORT, BACKEND_PORT, &backends)
        .await?;

    let slow = hold_one(&node, &backends).await?;
    let holder = backends
        .iter()
        .find(|b| b.held() == 1)
        .map(|b| b.name().to_owned());
    let holder = holder.ok_or_else(|| anyhow::anyhow!("no backend holds the slow request"))?;

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let picks = quick_picks(&mut conn, 300).await?;
    let hits = picks.iter().filter(|p| **p == holder).count();
    assert_eq!(
        hits, 0,
        "{hits} quick requests went to {holder}, which has a request in flight"
    );
    let others: Vec<&str> = NAMES.iter().copied().filter(|n| *n != holder).collect();
    let counts = tally(others.iter().copied(), &picks);
    let values: Vec<usize> = counts.values().copied().collect();
    let chi = chi_square_uniform(&values);
    assert!(
        chi < critical_1e4(2),
        "300 picks over the 3 idle instances are not uniform: {counts:?}, chi-square {chi:.1}"
    );

    for b in &backends {
        b.release();
    }
    let r = slow.await??;
    assert_eq!((r.status, r.text()), (StatusCode::OK, holder));
    drop(conn);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_spread_then_quick_ones_go_to_the_idle_instance() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&NAMES, BACKEND_PORT).await?;
    let group = node
        .http_group("spread", PORT, BACKEND_PORT, &backends)
        .await?;

    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(hold_one(&node, &backends).await?);
    }
    let holding: Vec<usize> = backends.iter().map(HttpBackend::held).collect();
    assert!(
        holding.iter().all(|h| *h <= 1),
        "3 slow requests did not land on 3 distinct instances: held per instance {holding:?}"
    );
    let idle = backends
        .iter()
        .find(|b| b.held() == 0)
        .map(|b| b.name().to_owned());
    let idle = idle.ok_or_else(|| anyhow::anyhow!("no idle instance: {holding:?}"))?;

    // The admin API shows the same in-flight counts.
    let loads = node.local_loads(&group).await?;
    for (name, local) in &loads {
        let want = u64::from(*name != idle);
        assert_eq!(
            *local, want,
            "load.local of {name} with 3 slow requests in flight: {loads:?}"
        );
    }

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let picks = quick_picks(&mut conn, 50).await?;
    let elsewhere: Vec<&String> = picks.iter().filter(|p| **p != idle).collect();
    assert!(
        elsewhere.is_empty(),
        "quick requests skipped the only idle instance {idle}: {elsewhere:?}"
    );

    for b in &backends {
        b.release();
    }
    let mut answered = BTreeSet::new();
    for s in slow {
        let r = s.await??;
        assert_eq!(r.status, StatusCode::OK);
        answered.insert(r.text());
    }
    assert_eq!(answered.len(), 3, "slow requests answered by {answered:?}");
    assert!(!answered.contains(&idle));
    drop(conn);
    node.wait_idle(&group).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_instance_leaves_selection_and_finishes_in_flight_work() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&NAMES, BACKEND_PORT).await?;
    let group = node
        .http_group("detach", PORT, BACKEND_PORT, &backends)
        .await?;

    let slow = hold_one(&node, &backends).await?;
    let holder = backends
        .iter()
        .find(|b| b.held() == 1)
        .map(|b| b.name().to_owned());
    let holder = holder.ok_or_else(|| anyhow::anyhow!("no backend holds the slow request"))?;
    let before = node.scrape().await?;
    assert!(
        before.mentions("instance_name", &holder),
        "no series for {holder} before detaching"
    );

    node.detach(&group, &holder).await?;
    // Listed as draining, with its one request in flight, while that lasts.
    let instances = node.instances(&group).await?;
    let listed: Vec<_> = instances
        .iter()
        .filter(|i| i["name"] == json!(holder))
        .map(|i| (i["state"].clone(), i["load"]["local"].clone()))
        .collect();
    assert_eq!(
        listed,
        [(json!("draining"), json!(1))],
        "detached {holder} with a request in flight: {instances:?}"
    );
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let picks = quick_picks(&mut conn, 100).await?;
    assert!(
        !picks.contains(&holder),
        "a request went to detached {holder}"
    );

    wait_until(
        &format!("the series of detached {holder} to disappear"),
        Duration::from_secs(5),
        || async {
            node.scrape()
                .await
                .is_ok_and(|s| !s.mentions("instance_name", &holder))
        },
    )
    .await?;

    // The request in flight to the detached instance still completes.
    for b in &backends {
        b.release();
    }
    let r = slow.await??;
    assert_eq!(
        (r.status, r.text()),
        (StatusCode::OK, holder.clone()),
        "in-flight request to the detached instance"
    );
    let after = node.scrape().await?;
    assert!(
        !after.mentions("instance_name", &holder),
        "series of detached {holder} came back after its last request finished"
    );
    // Its last request over, it is gone from the list.
    wait_until(
        &format!("drained {holder} to leave the instance list"),
        Duration::from_secs(5),
        || async {
            node.instances(&group)
                .await
                .is_ok_and(|list| list.iter().all(|i| i["name"] != json!(holder)))
        },
    )
    .await?;
    drop(conn);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_retried_elsewhere_and_502_when_all_refuse() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node
        .http_backends(&["up1", "up2", "up3"], BACKEND_PORT)
        .await?;
    let group = node
        .http_group("partly", PORT, BACKEND_PORT, &backends)
        .await?;
    // Nothing listens on this address.
    node.attach(&group, "dead", node.subnet.next_ip()).await?;

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let picks = quick_picks(&mut conn, 100).await?;
    let counts = tally(["up1", "up2", "up3"], &picks);
    assert_eq!(
        counts.len(),
        3,
        "answers from unexpected backends: {counts:?}"
    );
    let scrape = node.scrape().await?;
    let dead_state = node.instances(&group).await?;
    let dead_state = dead_state
        .iter()
        .find(|i| i["name"] == "dead")
        .map(|i| i["state"].clone());
    assert_eq!(
        dead_state,
        Some(json!("down")),
        "state of the refusing instance right after it refused"
    );
    assert_eq!(
        scrape.sum(
            "edgelb_instance_up",
            &[("service", "partly"), ("instance_name", "dead")]
        ),
        0.0
    );
    assert_eq!(
        scrape.sum(
            "edgelb_instance_up",
            &[("service", "partly"), ("instance_name", "up1")]
        ),
        1.0
    );
    let errors = scrape.sum(
        "edgelb_instance_connect_errors_total",
        &[("service", "partly"), ("instance_name", "dead")],
    );
    assert!(
        errors >= 1.0,
        "the refusing instance was never tried (connect errors {errors}); the test proves nothing"
    );

    let dead = node
        .create_group(&json!({
            "name": "all-dead",
            "services": [{"port": PORT + 1, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        }))
        .await?;
    node.attach(&dead, "gone1", node.subnet.next_ip()).await?;
    node.attach(&dead, "gone2", node.subnet.next_ip()).await?;
    for i in 0..3 {
        let r = client::get(node.addr(PORT + 1), "x.test", "/").await?;
        assert_eq!(
            r.status,
            StatusCode::BAD_GATEWAY,
            "request {i} with every instance refusing: {}",
            r.text()
        );
    }
    drop(conn);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_request_stops_counting_in_flight() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["ab1", "ab2"], BACKEND_PORT).await?;
    let group = node
        .http_group("abort", PORT, BACKEND_PORT, &backends)
        .await?;

    let slow = hold_one(&node, &backends).await?;
    let loads = node.local_loads(&group).await?;
    assert_eq!(loads.iter().map(|(_, n)| n).sum::<u64>(), 1, "{loads:?}");
    // The client gives up: its connection closes with the request in flight.
    slow.abort();
    let _ = slow.await;
    node.wait_idle(&group).await?;

    // Both instances are selectable again: the picks are not all on one.
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let picks: BTreeSet<String> = quick_picks(&mut conn, 40).await?.into_iter().collect();
    assert_eq!(
        picks.len(),
        2,
        "after the abort, 40 picks used only {picks:?}"
    );
    drop(conn);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_outliving_the_drain_timeout_is_cut_with_a_5xx() -> anyhow::Result<()> {
    let drain = Duration::from_secs(1);
    let mut opts = NodeOptions::default();
    opts.settings.drain_timeout = drain;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["cut1", "cut2"], BACKEND_PORT).await?;
    let group = node
        .http_group("cut", PORT, BACKEND_PORT, &backends)
        .await?;

    let slow = hold_one(&node, &backends).await?;
    let holder = backends
        .iter()
        .find(|b| b.held() == 1)
        .map(|b| b.name().to_owned());
    let holder = holder.ok_or_else(|| anyhow::anyhow!("no backend holds the slow request"))?;
    node.detach(&group, &holder).await?;
    let detached = Instant::now();
    let answer =
        integration::within("the cut request", drain + Duration::from_secs(5), slow).await??;
    let waited = detached.elapsed();
    assert!(
        waited >= drain.mul_f64(0.9),
        "request ended after {waited:?}, before the drain timeout"
    );
    // The client did nothing wrong: it sees a gateway error or a closed
    // connection, never a 4xx.
    if let Ok(r) = &answer {
        assert!(
            r.status.is_server_error(),
            "a request cut by the drain timeout of instance {holder} was answered {} {:?}",
            r.status,
            r.text()
        );
    }
    node.wait_idle(&group).await?;
    node.stop().await
}
