//! Auth, probes, routing, size limits.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use super::{AuthBackoff, Server, TOKEN};
use crate::patience::patient;

#[tokio::test]
async fn v1_needs_the_token_and_probes_do_not() {
    let s = Server::start().await;
    let a = s.request(Method::GET, "/v1/services", None, None).await;
    a.assert_error(401);
    assert_eq!(
        a.headers.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    s.request(Method::GET, "/v1/services", Some("wrong"), None)
        .await
        .assert_error(401);
    s.request(Method::GET, "/v1/services", Some("s3cret-token-"), None)
        .await
        .assert_error(401);
    s.request(Method::POST, "/v1/services", None, Some("{}".into()))
        .await
        .assert_error(401);
    // Unknown /v1 routes do not reveal themselves without the token either.
    s.request(Method::GET, "/v1/cluster", None, None)
        .await
        .assert_error(401);
    assert_eq!(
        s.get("/v1/services").await.data()["service_groups"],
        json!([])
    );

    let m = s.request(Method::GET, "/metrics", None, None).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.body.contains("# HELP edgelb_groups"), "{}", m.body);
    assert_eq!(
        s.request(Method::GET, "/healthz", None, None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        s.request(Method::GET, "/readyz", None, None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    s.admin.ready.set_loaded();
    assert_eq!(
        s.request(Method::GET, "/readyz", None, None).await.status,
        StatusCode::OK
    );
    // A published port that cannot be bound keeps the node unready, named;
    // /healthz (the node can write) is not concerned.
    s.admin.ready.set_unbound(&crate::listeners::Unbound {
        failed: vec![8443, 9000],
        over: (10_000..10_030).collect(),
    });
    let r = s.request(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(
        r.body.contains("port 8443, 9000 cannot be bound"),
        "{}",
        r.body
    );
    // Many ports are not all listed.
    assert!(
        r.body
            .contains("10018, 10019 and 10 more not bound: more ports than max_published_ports"),
        "{}",
        r.body
    );
    assert_eq!(
        s.request(Method::GET, "/healthz", None, None).await.status,
        StatusCode::OK
    );
    s.admin
        .ready
        .set_unbound(&crate::listeners::Unbound::default());
    assert_eq!(
        s.request(Method::GET, "/readyz", None, None).await.status,
        StatusCode::OK
    );
    s.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let s = Server::start().await;
    s.get("/v1/nothing").await.assert_error(404);
    s.get("/v1/cluster/nodes/1/extra").await.assert_error(404);
    s.get("/v1/services/").await.assert_error(404);
    s.get("/nothing").await.assert_error(404);
    let a = s
        .request(Method::PUT, "/v1/services", Some(TOKEN), Some("{}".into()))
        .await;
    a.assert_error(405);
    assert_eq!(
        a.headers.get("allow").map(|v| v.as_bytes()),
        Some(&b"GET, POST"[..])
    );
    s.request(Method::POST, "/healthz", None, None)
        .await
        .assert_error(405);
    s.request(Method::GET, "/v1/services/x/instances/y", Some(TOKEN), None)
        .await
        .assert_error(405);
    s.get("/v1/services?force=maybe").await.assert_error(400);
    s.stop().await;
}

#[tokio::test]
async fn bodies_over_one_mib_are_413() {
    let s = Server::start().await;
    // Declared: refused from the headers alone, the body is never sent.
    let head = format!(
        "POST /v1/services HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        (1 << 20) + 1
    );
    let answer = s.raw(head.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""status":413"#), "{answer}");

    // Chunked: refused while reading.
    let mut raw = format!(
        "POST /v1/services HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..17 {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(&chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = s.raw(raw).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Exactly 1 MiB is fine as far as size goes (and then not JSON).
    let body = " ".repeat(1 << 20);
    s.request(Method::POST, "/v1/services", Some(TOKEN), Some(body))
        .await
        .assert_error(400);
    s.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let s = Server::start().await;
    let raw = format!(
        "GET /healthz HTTP/1.1\r\nhost: admin\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = s.raw(raw.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.contains(r#""errors":[{"status":431,"#), "{answer}");
    // Past hyper's buffer hyper answers itself: the envelope all the same.
    let raw = format!(
        "GET /healthz HTTP/1.1\r\nhost: admin\r\nx-big: {}\r\n\r\n",
        "a".repeat(600 * 1024)
    );
    let answer = s.raw(raw.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        answer.ends_with(r#""errors":[{"status":431,"message":"request header fields too large (at most 64 KiB)"}]}"#),
        "the error envelope: {answer}"
    );
    s.stop().await;
}

/// A head hyper cannot parse gets the error envelope too, also after a
/// kept-alive request, and the node goes on serving.
#[tokio::test]
async fn a_malformed_request_gets_the_error_envelope() {
    let s = Server::start().await;
    let answer = s
        .raw(b"GET / HTTP/1.1 bogus\r\n\x01\r\n\r\n".to_vec())
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("content-type: application/json"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            r#""errors":[{"status":400,"message":"malformed request line or header field"}]}"#
        ),
        "{answer}"
    );
    let answer = s
        .raw(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1 bogus\r\n\r\n".to_vec())
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\n\r\nok\n"), "{answer}");
    assert!(
        answer.ends_with(r#""status":400,"message":"malformed request line or header field"}]}"#),
        "{answer}"
    );
    assert_eq!(
        s.request(Method::GET, "/healthz", None, None).await.status,
        StatusCode::OK
    );
    s.stop().await;
}

#[tokio::test]
async fn cluster_routes_show_and_guard_the_membership() {
    let s = Server::start().await;
    let c = s.get("/v1/cluster").await.data()["cluster"].clone();
    assert_eq!(c["node_id"], 1, "{c}");
    assert_eq!(c["leader_id"], 1, "{c}");
    assert!(c["term"].as_u64() >= Some(1), "{c}");
    assert!(c["applied_index"].as_u64() >= Some(2), "{c}");
    assert_eq!(c["commit_index"], c["applied_index"], "{c}");
    let nodes = c["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{c}");
    assert_eq!(nodes[0]["role"], "voter", "{c}");
    assert_eq!(nodes[0]["is_leader"], true, "{c}");
    // A linearizable read goes through the leader (this node) and answers.
    s.get("/v1/services?consistent=true").await.data();

    s.send(Method::POST, "/v1/cluster/nodes", &json!({}))
        .await
        .assert_error(400);
    let bad_addr = json!({"node_id": 2, "cluster_addr": "nope", "admin_addr": "127.0.0.1:1"});
    let msg = s
        .send(Method::POST, "/v1/cluster/nodes", &bad_addr)
        .await
        .assert_error(400);
    assert!(msg.contains("cluster_addr"), "{msg}");
    let bad_csr = json!({"node_id": 2, "cluster_addr": "127.0.0.1:1", "admin_addr": "127.0.0.1:2", "csr": "garbage"});
    s.send(Method::POST, "/v1/cluster/nodes", &bad_csr)
        .await
        .assert_error(400);
    s.request(Method::DELETE, "/v1/cluster/nodes/abc", Some(TOKEN), None)
        .await
        .assert_error(400);
    s.request(Method::DELETE, "/v1/cluster/nodes/99", Some(TOKEN), None)
        .await
        .assert_error(404);
    let msg = s
        .request(Method::DELETE, "/v1/cluster/nodes/1", Some(TOKEN), None)
        .await
        .assert_error(400);
    assert!(msg.contains("last voter"), "{msg}");
    // Still one healthy voter afterwards.
    let c = s.get("/v1/cluster").await.data()["cluster"].clone();
    assert_eq!(c["nodes"].as_array().map(Vec::len), Some(1), "{c}");
    s.stop().await;
}

/// Repeated wrong tokens from one address hold that address back: its
/// wrong tokens are still answered 401 (SPEC §6), each after
/// `SLOW_ANSWER`; other addresses and the probes are not affected; the
/// period ends by itself; and a right token from the address is served
/// during one (after the same wait), the admin token clearing the record.
#[tokio::test]
async fn repeated_wrong_tokens_slow_that_address_only() {
    use crate::admin::guard::SLOW_ANSWER;
    let backoff = AuthBackoff {
        failures: 3,
        window: Duration::from_secs(60),
        block: Duration::from_secs(4),
        block_max: Duration::from_secs(60),
    };
    let s = Server::start_backoff(Some("metrics-0123456789abcdef"), backoff).await;
    let guesser: IpAddr = "127.0.0.2".parse().unwrap();
    let other: IpAddr = "127.0.0.3".parse().unwrap();
    let get = |from, path, token| s.request_from(Some(from), Method::GET, path, token, None);
    let held_back = |n: u32| async move {
        let m = get(other, "/metrics", Some(TOKEN)).await;
        let line = format!("edgelb_admin_auth_blocked_addresses {n}\n");
        (m.body.contains(&line), m.body)
    };
    let guesses = |n: usize| async move {
        for _ in 0..n {
            get(guesser, "/v1/services", Some("a-wrong-guess"))
                .await
                .assert_error(401);
        }
    };
    // No token at all is not a guess: never counted.
    for _ in 0..5 {
        get(guesser, "/v1/services", None).await.assert_error(401);
    }
    guesses(2).await;
    let (none, body) = held_back(0).await;
    assert!(none, "{body}");
    // /metrics guesses count too; this third one holds the address back.
    get(guesser, "/metrics", Some("guess-3"))
        .await
        .assert_error(401);
    let started = Instant::now();
    let (one, body) = held_back(1).await;
    assert!(one, "{body}");
    for path in ["/v1/services", "/metrics"] {
        let asked = Instant::now();
        let message = get(guesser, path, Some("guess-4")).await.assert_error(401);
        assert!(message.contains("wrong admin token"), "{message}");
        assert!(
            asked.elapsed() >= SLOW_ANSWER,
            "{path}: {:?}",
            asked.elapsed()
        );
    }
    assert_eq!(get(guesser, "/healthz", None).await.status, StatusCode::OK);
    // Another address is answered as always.
    get(other, "/v1/services", Some(TOKEN)).await.data();
    let (_, body) = held_back(1).await;
    assert!(
        body.contains("edgelb_admin_auth_failures_total 5"),
        "{body}"
    );
    assert!(!body.contains("code=\"429\""), "{body}");
    // The period ends by itself.
    let patience = patient(Duration::from_secs(15));
    while !held_back(0).await.0 {
        assert!(
            started.elapsed() < patience,
            "still held back after {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Held back again: the right tokens are served, after the same wait
    // as a wrong one (a quick answer would tell a right guess). The
    // metrics token does not clear the record (it opens /metrics only); the
    // admin token does.
    guesses(3).await;
    let (one, body) = held_back(1).await;
    assert!(one, "{body}");
    let asked = Instant::now();
    let scrape = get(guesser, "/metrics", Some("metrics-0123456789abcdef")).await;
    assert_eq!(scrape.status, StatusCode::OK, "{}", scrape.body);
    assert!(asked.elapsed() >= SLOW_ANSWER, "{:?}", asked.elapsed());
    let (one, body) = held_back(1).await;
    assert!(one, "{body}");
    let asked = Instant::now();
    get(guesser, "/v1/services", Some(TOKEN)).await.data();
    assert!(asked.elapsed() >= SLOW_ANSWER, "{:?}", asked.elapsed());
    let (none, body) = held_back(0).await;
    assert!(none, "{body}");
    s.stop().await;
}

/// A kept-alive admin connection waits for its next request longer than
/// the header timeout (hyper's ran from the end of the previous response,
/// so a request sent 10 s after the last one raced the close), and closes
/// after the idle timeout (both shortened here).
#[tokio::test]
async fn a_kept_alive_connection_outlasts_the_header_timeout_between_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn answer(conn: &mut tokio::net::TcpStream) -> String {
        let mut buf = [0_u8; 1024];
        let read = tokio::time::timeout(patient(Duration::from_secs(5)), conn.read(&mut buf));
        let n = read.await.expect("an answer or a close").expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
    let timeouts = super::super::Timeouts {
        header: Duration::from_millis(300),
        idle: Duration::from_millis(1500),
    };
    let s = Server::start_timeouts(timeouts).await;
    let mut conn = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let request = b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n";
    conn.write_all(request).await.expect("write");
    assert!(answer(&mut conn).await.starts_with("HTTP/1.1 200"));
    // Idle for twice the header timeout, then a head sent slowly within it.
    tokio::time::sleep(timeouts.header * 2).await;
    conn.write_all(&request[..10]).await.expect("write");
    tokio::time::sleep(timeouts.header / 2).await;
    conn.write_all(&request[10..]).await.expect("write");
    let second = answer(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second:?}");
    // A head that stalls past the header timeout from its first byte (the
    // idle timeout would come later).
    conn.write_all(&request[..10]).await.expect("write");
    let started = Instant::now();
    assert_eq!(answer(&mut conn).await, "", "closed");
    assert!(
        started.elapsed() < timeouts.header * 3,
        "{:?}",
        started.elapsed()
    );
    // Nothing sent: closed after the idle timeout, not the header timeout.
    let mut idle = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    // Taken before the request: the server arms the idle timer after it.
    let started = Instant::now();
    idle.write_all(request).await.expect("write");
    assert!(answer(&mut idle).await.starts_with("HTTP/1.1 200"));
    assert_eq!(answer(&mut idle).await, "", "closed when idle");
    assert!(
        started.elapsed() >= timeouts.idle,
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
}

/// One address holding connections that send nothing gets at most a
/// half of `admin_max_connections` (128 of 256); others still get in.
#[tokio::test]
async fn one_address_cannot_take_every_admin_connection() {
    use tokio::io::AsyncReadExt;
    let s = Server::start().await;
    let mut held = Vec::new();
    for _ in 0..128 {
        held.push(
            tokio::net::TcpStream::connect(s.addr)
                .await
                .expect("connect"),
        );
    }
    // The 129th from the same address is closed at once, not after the
    // header timeout (10 s).
    let mut over = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let mut buf = [0_u8; 16];
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "closed, not held: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Another address is served.
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    let r = s
        .request_from(Some(other), Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // A connection given back makes room for the same address.
    drop(held.pop());
    let r = tokio::time::timeout(patient(Duration::from_secs(5)), async {
        loop {
            let mut c = tokio::net::TcpStream::connect(s.addr)
                .await
                .expect("connect");
            use tokio::io::AsyncWriteExt;
            c.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0_u8; 64];
            if let Ok(n) = c.read(&mut buf).await
                && n > 0
            {
                break String::from_utf8_lossy(&buf[..n]).into_owned();
            }
        }
    })
    .await
    .expect("served once a slot is free");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(held);
    s.stop().await;
}
