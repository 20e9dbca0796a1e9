//! TLS termination end to end: SNI routing and certificates, HTTP/2 by
//! ALPN, and TLS in front of a TCP-mode port.

use anyhow::{Context, ensure};
use http::StatusCode;
use integration::backend::EchoClient;
use integration::client::RawConn;
use integration::client::{H2Conn, HttpConn};
use integration::{EchoBackend, TestNode, tls};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TLS_PORT: u16 = 8443;
const BACKEND_PORT: u16 = 9000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_group_and_its_certificate() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let mut certs = Vec::new();
    let names = [
        ("alpha", "alpha.example.test"),
        ("bravo", "bravo.example.test"),
        ("wild", "*.wild.example.test"),
    ];
    let mut backends = Vec::new();
    for (name, fqdn) in names {
        let b = node
            .http_backends(&[&format!("{name}-1")], BACKEND_PORT)
            .await?;
        let group = node
            .create_group(&json!({
                "name": name,
                "domains": [{"name": fqdn}],
                "services": [{"port": TLS_PORT, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]}],
            }))
            .await?;
        node.attach(&group, b[0].name(), b[0].addr().ip()).await?;
        backends.extend(b);
    }

    for (name, domain) in names {
        // The wildcard's domain is reached with any one label in front.
        let fqdn = domain.replace('*', "any");
        let fqdn = fqdn.as_str();
        let conn = tls::connect(node.addr(TLS_PORT), fqdn, &[b"http/1.1"]).await?;
        assert!(
            conn.cert_names(domain),
            "certificate served for SNI {fqdn} does not name {domain}"
        );
        for (_, other) in names.iter().filter(|(n, _)| *n != name) {
            assert!(
                !conn.cert_names(other),
                "certificate served for SNI {fqdn} names {other}"
            );
        }
        certs.push(conn.cert.clone());
        let mut http = HttpConn::over(conn.stream).await?;
        let r = http.get(fqdn, "/").await?;
        assert_eq!(
            (r.status, r.text()),
            (StatusCode::OK, format!("{name}-1")),
            "SNI/Host {fqdn}"
        );
    }
    assert_ne!(certs[0], certs[1], "two domains got the same certificate");
    assert_ne!(certs[1], certs[2], "two domains got the same certificate");

    // X-Forwarded-Proto says the client spoke TLS.
    let seen = backends[0].last_seen().context("alpha saw no request")?;
    assert_eq!(
        seen.headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok()),
        Some("https")
    );
    node.stop().await
}

/// The header timeout runs from the accept (SPEC §9), through the TLS
/// handshake: a client that took most of it to shake hands has only the
/// rest for its request's head (the timeout began anew after the
/// handshake before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_runs_from_the_accept_through_the_handshake() -> anyhow::Result<()> {
    let mut opts = integration::NodeOptions::default();
    opts.settings.header_timeout = Duration::from_secs(3);
    let node = TestNode::start_with(opts).await?;
    let b = node.http_backends(&["slow-1"], BACKEND_PORT).await?;
    let group = node
        .create_group(&json!({
            "name": "slow",
            "domains": [{"name": "slow.example.test"}],
            "services": [{"port": TLS_PORT, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]}],
        }))
        .await?;
    node.attach(&group, b[0].name(), b[0].addr().ip()).await?;
    // A request in time is served.
    let conn = tls::connect(node.addr(TLS_PORT), "slow.example.test", &[b"http/1.1"]).await?;
    let mut raw = RawConn::new(conn.stream);
    raw.write(b"GET / HTTP/1.1\r\nhost: slow.example.test\r\n\r\n")
        .await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    ensure!(r.status == StatusCode::OK, "{}: {}", r.status, r.text());

    // Two of the three seconds pass before the handshake, then part of a
    // head and nothing more.
    let began = Instant::now();
    let tcp = integration::client::tcp_connect(node.addr(TLS_PORT), None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let conn = tls::handshake(tcp, "slow.example.test", &[b"http/1.1"]).await?;
    let mut raw = RawConn::new(conn.stream);
    raw.write(b"GET / HTTP/1.1\r\nhost: slow.exa").await?;
    let answer = raw.closed(Duration::from_secs(10)).await?;
    let took = began.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 408"), "answered: {answer:?}");
    // 3 s from the accept; 5 s when it ran from the handshake.
    ensure!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4200),
        "closed {took:?} after the accept"
    );
    ensure!(
        b[0].requests() == 1,
        "only the first request reached the instance"
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_negotiated_by_alpn_and_serves_concurrent_streams() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["h2-a", "h2-b"], BACKEND_PORT).await?;
    let group = node
        .create_group(&json!({
            "name": "hq",
            "domains": [{"name": "hq.test"}],
            "services": [{"port": TLS_PORT, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]}],
        }))
        .await?;
    for b in &backends {
        node.attach(&group, b.name(), b.addr().ip()).await?;
    }

    let conn = tls::connect(node.addr(TLS_PORT), "hq.test", &[b"h2", b"http/1.1"]).await?;
    assert_eq!(
        conn.alpn.as_deref(),
        Some(&b"h2"[..]),
        "ALPN did not choose h2"
    );
    let h2 = H2Conn::over(conn.stream).await?;
    let mut streams = Vec::new();
    for _ in 0..10 {
        let mut s = h2.stream();
        streams.push(tokio::spawn(async move { s.get("hq.test", "/").await }));
    }
    for s in streams {
        let r = s.await??;
        assert_eq!(r.status, StatusCode::OK);
        ensure!(
            ["h2-a", "h2-b"].contains(&r.text().as_str()),
            "unexpected answer {:?}",
            r.text()
        );
    }
    // The instances speak HTTP/1.1 behind the edge.
    let seen = backends
        .iter()
        .filter_map(|b| b.last_seen())
        .next()
        .context("no backend saw a request")?;
    assert_eq!(
        seen.headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok()),
        Some("https")
    );
    drop(h2);
    node.wait_idle(&group).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_in_front_of_a_tcp_mode_port() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let mut echoes = Vec::new();
    for name in ["echo-a", "echo-b"] {
        echoes.push(
            EchoBackend::start(name, SocketAddr::new(node.subnet.next_ip(), BACKEND_PORT)).await?,
        );
    }
    let group = node
        .create_group(&json!({
            "name": "secure-echo",
            "domains": [{"name": "echo.example.test"}],
            "services": [{"port": 9443, "destination_port": BACKEND_PORT, "handlers": ["tls"]}],
        }))
        .await?;
    for e in &echoes {
        node.attach(&group, e.name(), e.addr().ip()).await?;
    }
    node.wait_idle(&group).await?;

    let conn = tls::connect(node.addr(9443), "echo.example.test", &[]).await?;
    assert!(conn.cert_names("echo.example.test"));
    assert_eq!(conn.alpn, None, "a TCP-mode port offered ALPN");
    let mut first = EchoClient::new(conn.stream);
    let a = first.who("hello over tls").await?;
    // A second connection goes to the other (idle) instance.
    let conn = tls::connect(node.addr(9443), "echo.example.test", &[]).await?;
    let mut second = EchoClient::new(conn.stream);
    let b = second.who("again").await?;
    assert_ne!(
        a, b,
        "two concurrent TLS connections went to the same instance"
    );
    assert_eq!(first.who("still there").await?, a);
    drop((first, second));
    node.wait_idle(&group).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_tls_port_routes_http2_by_authority_and_404s_unknown_names() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let mut backends = Vec::new();
    for name in ["alpha", "bravo"] {
        let b = node
            .http_backends(&[&format!("{name}-1")], BACKEND_PORT)
            .await?;
        let group = node
            .create_group(&json!({
                "name": name,
                "domains": [{"name": format!("{name}.example.test")}],
                "services": [{"port": TLS_PORT, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]}],
            }))
            .await?;
        node.attach(&group, b[0].name(), b[0].addr().ip()).await?;
        backends.extend(b);
    }

    // HTTP/2 has no Host header: :authority routes.
    for name in ["alpha", "bravo"] {
        let fqdn = format!("{name}.example.test");
        let conn = tls::connect(node.addr(TLS_PORT), &fqdn, &[b"h2"]).await?;
        assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
        let mut h2 = H2Conn::over(conn.stream).await?;
        let r = h2.get(&fqdn, "/").await?;
        assert_eq!(
            (r.status, r.text()),
            (StatusCode::OK, format!("{name}-1")),
            "h2 to {fqdn}"
        );
    }

    // An unknown name still completes the handshake and gets 404 over TLS.
    let conn = tls::connect(node.addr(TLS_PORT), "nobody.example.test", &[b"http/1.1"]).await?;
    let mut http = HttpConn::over(conn.stream).await?;
    let r = http.get("nobody.example.test", "/").await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text().contains("service not found"), "{:?}", r.text());
    node.stop().await
}
