//! Active health checks end to end (README: Active health checks): an
//! instance whose check answers 500 leaves selection within fall × interval
//! and comes back after rise × interval, and no client request reaches it
//! in between; the state shows in `GET …/instances` and the metrics; a bad
//! check is refused; removing the check gives the instance back.

use std::time::{Duration, Instant};

use anyhow::Context;
use http::StatusCode;
use integration::client::HttpConn;
use integration::{HttpBackend, TestNode, patient, poll};
use serde_json::json;

const PORT: u16 = 8090;
const BACKEND_PORT: u16 = 9090;
const INTERVAL: Duration = Duration::from_millis(200);
const RISE: u32 = 2;
const FALL: u32 = 3;

/// Requests `b` received other than its health checks.
fn client_requests(b: &HttpBackend) -> usize {
    b.seen().iter().filter(|s| s.target != "/healthz").count()
}

async fn state_of(node: &TestNode, group: &str, name: &str) -> anyhow::Result<String> {
    let (status, v) = node.get(&format!("/v1/services/{group}/instances")).await?;
    anyhow::ensure!(status == StatusCode::OK, "{status} {v}");
    let instances = v["data"]["instances"].as_array().context("instances")?;
    let i = instances
        .iter()
        .find(|i| i["name"] == name)
        .with_context(|| format!("no {name} in {v}"))?;
    Ok(i["state"].as_str().unwrap_or_default().to_owned())
}

/// Waits until `name` shows `want`; how long that took.
async fn until_state(node: &TestNode, name: &str, want: &str) -> anyhow::Result<Duration> {
    let began = Instant::now();
    poll(
        &format!("{name} to be {want}"),
        Duration::from_secs(20),
        || async {
            let s = state_of(node, "hc", name).await?;
            anyhow::ensure!(s == want, "{name} is {s}");
            Ok(())
        },
    )
    .await?;
    Ok(began.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_leaves_selection_and_comes_back() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["good", "sick"], BACKEND_PORT).await?;
    let check = json!({
        "type": "http", "path": "/healthz", "expect": "200-299",
        "interval_ms": INTERVAL.as_millis() as u64, "timeout_ms": 150,
        "rise": RISE, "fall": FALL,
    });
    // Refused: a bad check.
    let (status, v) = node
        .post(
            "/v1/services",
            &json!({"name": "bad", "services": [{"port": PORT + 1, "destination_port": 80, "handlers": ["http"]}],
                    "health_check": {"type": "http", "interval_ms": 5}}),
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("interval_ms"),
        "{v}"
    );
    let group = node
        .create_group(&json!({
            "name": "hc",
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
            "health_check": check,
        }))
        .await?;
    for b in &backends {
        node.attach(&group, b.name(), b.addr().ip()).await?;
    }
    let (_, v) = node.get("/v1/services/hc").await?;
    assert_eq!(
        v["data"]["service_groups"][0]["health_check"]["path"], "/healthz",
        "{v}"
    );
    let (good, sick) = (&backends[0], &backends[1]);
    // Both are checked and both serve.
    poll(
        "both instances checked",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(good.seen().iter().any(|s| s.target == "/healthz"));
            anyhow::ensure!(sick.seen().iter().any(|s| s.target == "/healthz"));
            Ok(())
        },
    )
    .await?;
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    for _ in 0..20 {
        conn.get("hc.test", "/").await?;
    }
    assert!(client_requests(sick) > 0 && client_requests(good) > 0);

    // Its check fails: out of selection within fall × interval (one more
    // interval for the phase of the first failing check).
    sick.set_health(500);
    let took = until_state(&node, "sick", "down").await?;
    let bound = patient(INTERVAL * (FALL + 1) + Duration::from_millis(500));
    assert!(took <= bound, "down after {took:?}, bound {bound:?}");
    let before = client_requests(sick);
    for i in 0..50 {
        let r = conn.get("hc.test", "/").await?;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        assert_eq!(r.backend(), Some("good"), "request {i}");
    }
    let scrape = node.scrape().await?;
    assert_eq!(
        scrape.sum(
            "edgelb_instance_up",
            &[("service", "hc"), ("instance_name", "sick")]
        ),
        0.0
    );
    assert_eq!(
        scrape.sum("edgelb_health_check_transitions_total", &[("to", "down")]),
        1.0
    );
    assert!(scrape.sum("edgelb_health_checks_total", &[("result", "fail")]) >= f64::from(FALL));

    // It passes again: back after rise × interval; nothing reached it
    // while it was down.
    let during = client_requests(sick);
    sick.set_health(200);
    let took = until_state(&node, "sick", "up").await?;
    let bound = patient(INTERVAL * (RISE + 1) + Duration::from_millis(500));
    assert!(took <= bound, "up after {took:?}, bound {bound:?}");
    assert_eq!(
        during, before,
        "client requests reached the instance while it was down"
    );
    poll(
        "a request on the instance back up",
        Duration::from_secs(10),
        || async {
            conn_get(&node).await?;
            anyhow::ensure!(client_requests(sick) > during, "none yet");
            Ok(())
        },
    )
    .await?;

    // The check removed: a failing instance is no longer taken out.
    let (status, v) = node
        .patch(
            "/v1/services/hc",
            &json!({"prop": "health_check", "op": "del", "value": null}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(
        v["data"]["service_groups"][0].get("health_check").is_none(),
        "{v}"
    );
    sick.set_health(500);
    let checks = sick
        .seen()
        .iter()
        .filter(|s| s.target == "/healthz")
        .count();
    // Watched for as long as the check would need to take it down, and
    // more: it stays up, and no check (but one already under way) comes.
    let watch = INTERVAL * (FALL + 2);
    let began = Instant::now();
    while began.elapsed() < watch {
        assert_eq!(state_of(&node, "hc", "sick").await?, "up");
        conn_get(&node).await?;
    }
    let after = sick
        .seen()
        .iter()
        .filter(|s| s.target == "/healthz")
        .count();
    assert!(
        after <= checks + 1,
        "checks go on after the check was removed: {checks} → {after}"
    );
    node.stop().await
}

/// One request on a new connection, answered 200.
async fn conn_get(node: &TestNode) -> anyhow::Result<()> {
    let r = integration::client::get(node.addr(PORT), "hc.test", "/").await?;
    anyhow::ensure!(r.status == StatusCode::OK, "{}", r.status);
    Ok(())
}

/// Group options (a health check, a PROXY header to instances) are not
/// readable by older releases, so the leader proposes them only once every
/// member has said it reads them: with a member down the write is refused
/// (409, naming it), and goes through once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_options_wait_until_every_member_reads_them() -> anyhow::Result<()> {
    let mut cluster = integration::Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let down = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .context("a follower")?;
    cluster.kill9(down).await?;
    let body = json!({
        "name": "gated",
        "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        "health_check": {"type": "tcp"},
    });
    let (status, v) = cluster.admin(leader).post("/v1/services", &body).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("member {down}")), "{message}");
    // Writes without options go on.
    let (status, v) = cluster
        .admin(leader)
        .post(
            "/v1/services",
            &json!({"name": "plain", "services": [{"port": PORT + 2, "destination_port": 80, "handlers": ["http"]}]}),
        )
        .await?;
    assert!(status.is_success(), "{status} {v}");
    cluster.restart(down).await?;
    poll(
        "the gated write once every member answers",
        Duration::from_secs(30),
        || async {
            let (status, v) = cluster.admin(leader).post("/v1/services", &body).await?;
            anyhow::ensure!(status.is_success(), "{status} {v}");
            Ok(())
        },
    )
    .await?;
    let (status, v) = cluster
        .admin(down)
        .get("/v1/services/gated?consistent=true")
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["data"]["service_groups"][0]["health_check"]["type"],
        "tcp"
    );
    cluster.ensure_no_errors()
}
