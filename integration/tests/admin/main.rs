//! The admin API end to end: authentication, input limits, error envelopes
//! and group lifecycle, with traffic flowing throughout.

use std::time::Duration;

use http::{Method, StatusCode};
use integration::client::{self, Reply, raw_exchange};
use integration::{TestNode, wait_until};
use serde_json::{Value, json};

mod files;
mod limits;

const PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;

fn assert_envelope(r: &Reply, status: StatusCode) {
    assert_eq!(r.status, status, "body: {}", r.text());
    let v: Value = r.json();
    assert_eq!(v["status"], "error", "not an error envelope: {}", r.text());
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {v}"
    );
    assert_eq!(
        v["errors"][0]["status"],
        json!(status.as_u16()),
        "errors[0].status: {v}"
    );
}

fn raw_post(node: &TestNode, path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n{extra_headers}Connection: close\r\n\r\n",
        node.admin_addr, node.token
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_requests_get_error_envelopes_and_traffic_flows_on() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["steady"], BACKEND_PORT).await?;
    node.http_group("steady", PORT, BACKEND_PORT, &backends)
        .await?;
    let serving = || async {
        let r = client::get(node.addr(PORT), "steady.test", "/").await?;
        anyhow::ensure!(
            r.status == StatusCode::OK,
            "traffic: {} {}",
            r.status,
            r.text()
        );
        Ok(())
    };

    // Invalid JSON.
    let req = raw_post(&node, "/v1/services", "Content-Length: 9\r\n", b"{not json");
    assert_envelope(
        &raw_exchange(node.admin_addr, req, Duration::from_secs(5)).await?,
        StatusCode::BAD_REQUEST,
    );
    // Valid JSON, invalid group.
    let r = node
        .admin(
            Method::POST,
            "/v1/services",
            Some(&json!({"name": "Bad Name!", "services": []})),
        )
        .await?;
    assert_envelope(&r, StatusCode::BAD_REQUEST);

    // No token, wrong token.
    let r = node
        .admin_as(Method::GET, "/v1/services", None, None)
        .await?;
    assert_envelope(&r, StatusCode::UNAUTHORIZED);
    let r = node
        .admin_as(
            Method::GET,
            "/v1/services",
            None,
            Some("not-the-token-at-all"),
        )
        .await?;
    assert_envelope(&r, StatusCode::UNAUTHORIZED);
    let wrong_length = format!("{}x", node.token);
    let r = node
        .admin_as(Method::GET, "/v1/services", None, Some(&wrong_length))
        .await?;
    assert_envelope(&r, StatusCode::UNAUTHORIZED);
    let r = node
        .admin_as(Method::POST, "/v1/services", Some(&json!({"name": "sneaky", "services": [{"port": 8090, "destination_port": 1, "handlers": ["http"]}]})), None)
        .await?;
    assert_envelope(&r, StatusCode::UNAUTHORIZED);
    assert_eq!(
        node.get("/v1/services/sneaky").await?.0,
        StatusCode::NOT_FOUND,
        "an unauthorised write was applied"
    );

    // Bodies over 1 MiB, declared and chunked.
    let big = vec![b' '; (1 << 20) + 1];
    let req = raw_post(
        &node,
        "/v1/services",
        &format!("Content-Length: {}\r\n", big.len()),
        &big,
    );
    assert_envelope(
        &raw_exchange(node.admin_addr, req, Duration::from_secs(10)).await?,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let mut chunked = Vec::new();
    for _ in 0..17 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 64 * 1024));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let req = raw_post(
        &node,
        "/v1/services",
        "Transfer-Encoding: chunked\r\n",
        &chunked,
    );
    assert_envelope(
        &raw_exchange(node.admin_addr, req, Duration::from_secs(10)).await?,
        StatusCode::PAYLOAD_TOO_LARGE,
    );

    // Unknown group.
    let r = node
        .admin(Method::GET, "/v1/services/no-such-group", None)
        .await?;
    assert_envelope(&r, StatusCode::NOT_FOUND);

    // Health needs no token; the node still serves traffic and the API.
    let r = node.admin_as(Method::GET, "/healthz", None, None).await?;
    assert_eq!(r.status, StatusCode::OK);
    serving().await?;
    let (status, v) = node.get("/v1/services").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "success");
    assert!(
        v["data"]["service_groups"]
            .as_array()
            .is_some_and(|g| g.len() == 1),
        "exactly the one good group exists: {v}"
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_lifecycle_conflicts_and_forced_delete_releases_the_port() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["life"], BACKEND_PORT).await?;
    let group = node
        .http_group("life", PORT, BACKEND_PORT, &backends)
        .await?;

    let (status, v) = node.get("/v1/services/life").await?;
    assert_eq!(status, StatusCode::OK);
    let g = &v["data"]["service_groups"][0];
    assert_eq!(g["uuid"], json!(group.uuid));
    assert_eq!(g["instances"][0]["name"], "life");
    assert_eq!(
        g["domains"][0]["fqdn"], "life.edgelb.local",
        "default domain"
    );
    assert_eq!(g["hard_limit"], 65535);

    let (status, v) = node
        .post("/v1/services", &json!({"name": "life", "services": [{"port": PORT + 1, "destination_port": 1, "handlers": ["http"]}]}))
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "duplicate name: {v}");

    let (status, v) = node
        .post(
            "/v1/services/life/instances",
            &json!({"name": "life", "address": "127.0.0.1"}),
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "duplicate instance name: {v}");
    let (status, v) = node.delete("/v1/services/life/instances/nobody").await?;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "detaching an unknown instance: {v}"
    );

    let (status, v) = node.delete("/v1/services/life").await?;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "delete with an instance attached: {v}"
    );
    assert_eq!(
        client::get(node.addr(PORT), "life.test", "/").await?.status,
        StatusCode::OK
    );

    let (status, v) = node
        .delete(&format!("/v1/services/{}?force=true", group.uuid))
        .await?;
    assert_eq!(status, StatusCode::OK, "forced delete: {v}");
    assert_eq!(v["status"], "success");
    wait_until(
        "the published port to be released",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(node.addr(PORT))
                .await
                .is_err()
        },
    )
    .await?;
    let (status, _) = node.get("/v1/services/life").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let scrape = node.scrape().await?;
    assert!(
        !scrape.mentions("service", "life"),
        "series of the deleted group remain"
    );
    node.stop().await
}

/// SPEC §6: `/readyz` is 200 when the listeners are bound. A published port
/// another process holds keeps it at 503, naming the port, from the answer
/// to the write that published it; the port is retried, and once free it is
/// bound and served and the node is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_cannot_be_bound_keeps_the_node_unready_until_it_is() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let busy = std::net::TcpListener::bind(node.addr(PORT))?;
    let backends = node.http_backends(&["held"], BACKEND_PORT).await?;
    node.http_group("held", PORT, BACKEND_PORT, &backends)
        .await?;

    let r = node.admin_as(Method::GET, "/readyz", None, None).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(
        r.text().contains(&format!("port {PORT} cannot be bound")),
        "{}",
        r.text()
    );
    // The node can still write: only readiness is concerned.
    let r = node.admin_as(Method::GET, "/healthz", None, None).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    drop(busy);
    // Writes that change nothing (a create of a name that exists, refused
    // as it is applied) keep coming, faster than the retry: they must not
    // put it off.
    let again = json!({
        "name": "held",
        "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
    });
    wait_until("/readyz to answer 200", Duration::from_secs(10), || async {
        let (status, v) = node.post("/v1/services", &again).await.unwrap_or_default();
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
        node.admin_as(Method::GET, "/readyz", None, None)
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await?;
    let r = client::get(node.addr(PORT), "held.test", "/").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    node.stop().await
}

/// A write that would make the cluster publish more ports than this node
/// binds (`max_published_ports`, each port taking descriptors on every
/// worker) is refused with 409, so one write cannot leave every node with
/// that limit unready; within it, ports may be added and swapped. (Ports
/// past the limit, from nodes configured apart, wait unbound: the
/// listeners' unit test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_max_published_ports_are_refused() -> anyhow::Result<()> {
    let mut opts = integration::NodeOptions::default();
    opts.settings.max_published_ports = 2;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["many"], BACKEND_PORT).await?;
    let group = node
        .http_group("many", PORT, BACKEND_PORT, &backends)
        .await?;
    let path = format!("/v1/services/{}", group.uuid);
    let service =
        |port: u16| json!({"port": port, "destination_port": BACKEND_PORT, "handlers": ["http"]});
    let add = |ports: Vec<u16>| json!({"prop": "services", "op": "add", "value": ports.into_iter().map(service).collect::<Vec<_>>()});
    let (status, v) = node.patch(&path, &add(vec![PORT + 1, PORT + 2])).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v.to_string()
            .contains("would publish 3 ports; this node binds at most 2"),
        "{v}"
    );
    let (status, v) = node
        .post(
            "/v1/services",
            &json!({"name": "more", "services": [service(PORT + 3), service(PORT + 4)]}),
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = node.patch(&path, &add(vec![PORT + 1])).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    // At the limit a set that swaps a port keeps the count.
    let (status, v) = node
        .patch(
            &path,
            &json!({"prop": "services", "op": "set", "value": [service(PORT), service(PORT + 2)]}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let r = node.admin_as(Method::GET, "/readyz", None, None).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for port in [PORT, PORT + 2] {
        let r = client::get(node.addr(port), "many.test", "/").await?;
        assert_eq!(r.status, StatusCode::OK, "port {port}: {}", r.text());
    }
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patching_ports_binds_and_releases_them() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let r = node.admin_as(Method::GET, "/readyz", None, None).await?;
    assert_eq!(r.status, StatusCode::OK, "readyz: {}", r.text());
    let backends = node.http_backends(&["patchy"], BACKEND_PORT).await?;
    let group = node
        .http_group("patchy", PORT, BACKEND_PORT, &backends)
        .await?;
    let path = format!("/v1/services/{}", group.uuid);

    let extra = PORT + 1;
    let (status, v) = node
        .patch(
            &path,
            &json!({"prop": "services", "op": "add", "value": [{"port": extra, "destination_port": BACKEND_PORT, "handlers": ["http"]}]}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        client::get(node.addr(extra), "patchy.test", "/")
            .await?
            .text(),
        "patchy"
    );

    let (status, v) = node
        .patch(
            &path,
            &json!({"prop": "services", "op": "del", "value": [extra]}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_until(
        "the removed port to be released",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(node.addr(extra))
                .await
                .is_err()
        },
    )
    .await?;
    assert_eq!(
        client::get(node.addr(PORT), "patchy.test", "/")
            .await?
            .status,
        StatusCode::OK
    );

    let (status, v) = node
        .patch(
            &path,
            &json!({"prop": "hard_limit", "op": "set", "value": 7}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, v) = node.get(&path).await?;
    assert_eq!(v["data"]["service_groups"][0]["hard_limit"], 7);

    let (status, v) = node
        .patch(&path, &json!({"prop": "colour", "op": "set", "value": 1}))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "unknown prop: {v}");
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_groups_are_refused_with_400() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let http = |port: u16| json!({"port": port, "destination_port": 9000, "handlers": ["http"]});
    let cases = [
        ("no services", json!({"name": "a", "services": []})),
        (
            "name starts with a digit",
            json!({"name": "1a", "services": [http(8080)]}),
        ),
        (
            "name too long",
            json!({"name": "a".repeat(64), "services": [http(8080)]}),
        ),
        (
            "upper-case name",
            json!({"name": "Web", "services": [http(8080)]}),
        ),
        (
            "unknown field",
            json!({"name": "a", "services": [http(8080)], "colour": "blue"}),
        ),
        (
            "unknown handler",
            json!({"name": "a", "services": [{"port": 8080, "destination_port": 9000, "handlers": ["gzip"]}]}),
        ),
        (
            "redirect without http",
            json!({"name": "a", "services": [
            {"port": 8443, "destination_port": 9000, "handlers": ["tls", "http"]},
            {"port": 8080, "destination_port": 8443, "handlers": ["redirect"]}]}),
        ),
        (
            "redirect with tls",
            json!({"name": "a", "services": [
            {"port": 8443, "destination_port": 9000, "handlers": ["tls", "http"]},
            {"port": 8080, "destination_port": 8443, "handlers": ["tls", "http", "redirect"]}]}),
        ),
        (
            "redirect to a port that is not TLS",
            json!({"name": "a", "services": [
            http(8000),
            {"port": 8080, "destination_port": 8000, "handlers": ["http", "redirect"]}]}),
        ),
        (
            "redirect to an unpublished port",
            json!({"name": "a", "services": [
            {"port": 8080, "destination_port": 8443, "handlers": ["http", "redirect"]}]}),
        ),
        ("port 0", json!({"name": "a", "services": [http(0)]})),
        (
            "same port twice",
            json!({"name": "a", "services": [http(8080), http(8080)]}),
        ),
        (
            "bad domain",
            json!({"name": "a", "domains": [{"name": "not a domain"}], "services": [http(8080)]}),
        ),
        (
            "hard limit 0",
            json!({"name": "a", "hard_limit": 0, "services": [http(8080)]}),
        ),
    ];
    for (what, body) in &cases {
        let r = node.admin(Method::POST, "/v1/services", Some(body)).await?;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{what}: {body} → {}",
            r.text()
        );
    }
    let (_, v) = node.get("/v1/services").await?;
    assert_eq!(
        v["data"]["service_groups"],
        json!([]),
        "an invalid group was created"
    );
    node.stop().await
}
