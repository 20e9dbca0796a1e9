//! HTTP mode end to end (SPEC §2 redirect, §4): forwarding headers,
//! keep-alive, error answers, timeouts and limits.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Channel};
use integration::client::{
    self, HttpConn, RawConn, get_request, raw_exchange, read_reply, read_to_close, tcp_connect,
};
use integration::{NodeOptions, TestNode, patient, wait_until};
use serde_json::json;
use tokio::io::AsyncWriteExt;

mod hardening;

const PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_port_answers_308_to_the_tls_port() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    node.create_group(&json!({
        "name": "web",
        "domains": [{"name": "web.test"}],
        "services": [
            {"port": 8443, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]},
            {"port": 8081, "destination_port": 8443, "handlers": ["http", "redirect"]},
            {"port": 443, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]},
            {"port": 8082, "destination_port": 443, "handlers": ["http", "redirect"]},
        ],
    }))
    .await?;

    let r = client::get(node.addr(8081), "web.test", "/p?q=1").await?;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT, "{}", r.text());
    assert_eq!(r.header("location"), Some("https://web.test:8443/p?q=1"));

    // The client's port in Host is replaced by the TLS port.
    let r = client::get(node.addr(8081), "web.test:8081", "/a/b").await?;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.header("location"), Some("https://web.test:8443/a/b"));

    // Port 443 is left out of the Location.
    let r = client::get(node.addr(8082), "web.test", "/p?q=1").await?;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.header("location"), Some("https://web.test/p?q=1"));
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_reach_the_backend_and_hop_by_hop_ones_do_not() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["fwd"], BACKEND_PORT).await?;
    node.http_group("fwd", PORT, BACKEND_PORT, &backends)
        .await?;

    let client_ip = node.subnet.next_ip();
    let mut conn = HttpConn::connect_from(node.addr(PORT), Some(client_ip)).await?;
    let mut req = get_request("fwd.test:8080", "/h?x=1");
    req.headers_mut()
        .insert("connection", HeaderValue::from_static("x-hop"));
    req.headers_mut()
        .insert("x-hop", HeaderValue::from_static("1"));
    req.headers_mut()
        .insert("x-end-to-end", HeaderValue::from_static("kept"));
    let r = conn.send(req).await?;
    assert_eq!(r.status, StatusCode::OK);

    let seen = backends[0]
        .last_seen()
        .ok_or_else(|| anyhow::anyhow!("backend saw nothing"))?;
    let h = |name: &str| {
        seen.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(seen.target, "/h?x=1");
    assert_eq!(
        h("x-forwarded-for"),
        Some(client_ip.to_string()),
        "headers: {:?}",
        seen.headers
    );
    assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(h("x-forwarded-host").as_deref(), Some("fwd.test:8080"));
    assert_eq!(h("x-end-to-end").as_deref(), Some("kept"));
    assert_eq!(
        h("x-hop"),
        None,
        "a header named by Connection was forwarded"
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["pool"], BACKEND_PORT).await?;
    node.http_group("pool", PORT, BACKEND_PORT, &backends)
        .await?;
    let before = backends[0].connections();

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    for _ in 0..20 {
        assert_eq!(conn.get("pool.test", "/").await?.status, StatusCode::OK);
    }
    // Separate client connections share the same upstream pool.
    for _ in 0..10 {
        assert_eq!(
            client::get(node.addr(PORT), "pool.test", "/").await?.status,
            StatusCode::OK
        );
    }
    let opened = backends[0].connections() - before;
    assert!(
        opened <= 5,
        "30 sequential requests opened {opened} upstream connections; keep-alive is not reused"
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_node_keeps_serving() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["sane"], BACKEND_PORT).await?;
    node.http_group("sane", PORT, BACKEND_PORT, &backends)
        .await?;
    let requests_before = backends[0].requests();

    let bad: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: sane.test\r\nthis line has no colon\r\n\r\n",
        b"NOT A REQUEST LINE AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: sane.test\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    ];
    for raw in bad {
        let r = raw_exchange(node.addr(PORT), raw.to_vec(), Duration::from_secs(5)).await?;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "for {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(
        backends[0].requests(),
        requests_before,
        "a malformed request reached the backend"
    );
    let r = client::get(node.addr(PORT), "sane.test", "/").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "sane"));
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_block_gets_431() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["big"], BACKEND_PORT).await?;
    node.http_group("big", PORT, BACKEND_PORT, &backends)
        .await?;

    let mut raw = b"GET / HTTP/1.1\r\nHost: big.test\r\nX-Big: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 100 * 1024));
    raw.extend_from_slice(b"\r\n\r\n");
    let r = raw_exchange(node.addr(PORT), raw, Duration::from_secs(5)).await?;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.text(), "request header fields too large");
    assert_eq!(backends[0].requests(), 0);

    // Headers just under the limit still pass.
    let mut ok = HttpConn::connect(node.addr(PORT)).await?;
    let mut req = get_request("big.test", "/");
    req.headers_mut()
        .insert("x-fits", HeaderValue::from_str(&"b".repeat(16 * 1024))?);
    assert_eq!(ok.send(req).await?.status, StatusCode::OK);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_gets_408_after_the_header_timeout() -> anyhow::Result<()> {
    let header_timeout = Duration::from_secs(1);
    let mut opts = NodeOptions::default();
    opts.settings.header_timeout = header_timeout;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["stall"], BACKEND_PORT).await?;
    node.http_group("stall", PORT, BACKEND_PORT, &backends)
        .await?;

    let mut stream = tcp_connect(node.addr(PORT), None).await?;
    let started = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: stall.test\r\nX-Half: ")
        .await?;
    let r = integration::within(
        "a 408",
        header_timeout + Duration::from_secs(5),
        read_reply(&mut stream),
    )
    .await??;
    let waited = started.elapsed();
    assert_eq!(r.status, StatusCode::REQUEST_TIMEOUT);
    assert!(
        waited >= header_timeout.mul_f64(0.9),
        "408 after {waited:?}, before the header timeout of {header_timeout:?}"
    );
    // ...and the connection is closed.
    read_to_close(&mut stream, Duration::from_secs(5)).await?;
    assert_eq!(backends[0].requests(), 0);

    // An idle keep-alive connection is not a stalled header: between requests
    // the idle timeout applies, not the header timeout.
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    assert_eq!(conn.get("stall.test", "/").await?.status, StatusCode::OK);
    let idle = header_timeout.mul_f64(1.5);
    // Expected to time out: the connection must stay open for all of `idle`.
    let _ = wait_until("the idle connection to be closed", idle, || async {
        conn.is_closed()
    })
    .await;
    assert!(
        !conn.is_closed(),
        "idle keep-alive connection closed within {:?} (header timeout {header_timeout:?}, idle timeout 15s)",
        patient(idle)
    );
    let r = conn.get("stall.test", "/").await?;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "second request on the idle connection: {}",
        r.text()
    );

    // The next request on a keep-alive connection gets the header timeout
    // from its first byte.
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(b"GET / HTTP/1.1\r\nHost: stall.test\r\n\r\n")
        .await?;
    assert_eq!(
        raw.reply(Duration::from_secs(5)).await?.status,
        StatusCode::OK
    );
    raw.write(b"GET /second HTTP/1.1\r\nHost: sta").await?;
    let started = Instant::now();
    let r = raw.reply(header_timeout + Duration::from_secs(5)).await?;
    assert_eq!(
        r.status,
        StatusCode::REQUEST_TIMEOUT,
        "stalled second request"
    );
    assert!(started.elapsed() >= header_timeout.mul_f64(0.9));
    raw.closed(Duration::from_secs(5)).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_on_a_shared_port_gets_404() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let groups = [
        ("alpha", "alpha.test"),
        ("bravo", "bravo.test"),
        ("wild", "*.wild.test"),
    ];
    let mut backends = Vec::new();
    for (name, domain) in groups {
        let b = node
            .http_backends(&[&format!("{name}-1")], BACKEND_PORT)
            .await?;
        let group = node
            .create_group(&json!({
                "name": name,
                "domains": [{"name": domain}],
                "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
            }))
            .await?;
        node.attach(&group, b[0].name(), b[0].addr().ip()).await?;
        backends.extend(b);
    }

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    for (host, want) in [
        ("alpha.test", "alpha-1"),
        ("bravo.test", "bravo-1"),
        ("ALPHA.test:8080", "alpha-1"),
        ("alpha.test.", "alpha-1"),
        ("x.wild.test", "wild-1"),
        ("Other.Wild.Test", "wild-1"),
    ] {
        let r = conn.get(host, "/").await?;
        assert_eq!(
            (r.status, r.text().as_str()),
            (StatusCode::OK, want),
            "Host: {host}"
        );
    }
    for host in [
        "charlie.test",
        "wild.test",
        "a.b.wild.test",
        "alpha.test.evil",
    ] {
        let r = conn.get(host, "/").await?;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "Host: {host} answered by {:?}",
            r.backend()
        );
        assert!(
            r.text().contains("service not found"),
            "404 body: {:?}",
            r.text()
        );
    }
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_without_instances_gets_503() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    node.create_group(&json!({
        "name": "empty",
        "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
    }))
    .await?;
    let r = client::get(node.addr(PORT), "empty.test", "/").await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_limit_reached_gets_503_with_retry_after() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["limited"], BACKEND_PORT).await?;
    let group = node
        .create_group(&json!({
            "name": "limited",
            "hard_limit": 1,
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        }))
        .await?;
    node.attach(&group, "limited", backends[0].addr().ip())
        .await?;

    let addr = node.addr(PORT);
    let slow = tokio::spawn(async move { client::get(addr, "limited.test", "/slow").await });
    wait_until(
        "the slow request to be held",
        Duration::from_secs(5),
        || async { backends[0].held() == 1 },
    )
    .await?;
    let received = backends[0].requests();

    let r = client::get(addr, "limited.test", "/").await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let retry_after = r.header("retry-after").map(str::to_owned);
    ensure!(
        retry_after
            .as_deref()
            .is_some_and(|v| v.trim().parse::<u64>().is_ok()),
        "503 at the hard limit without a numeric Retry-After: {retry_after:?}"
    );
    assert_eq!(
        backends[0].requests(),
        received,
        "the refused request reached the instance"
    );

    backends[0].release();
    assert_eq!(slow.await??.status, StatusCode::OK);
    node.wait_idle(&group).await?;
    assert_eq!(
        client::get(addr, "limited.test", "/").await?.status,
        StatusCode::OK
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504() -> anyhow::Result<()> {
    let mut opts = NodeOptions::default();
    opts.settings.upstream_timeout = Duration::from_secs(1);
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["sloth"], BACKEND_PORT).await?;
    node.http_group("sloth", PORT, BACKEND_PORT, &backends)
        .await?;
    let started = Instant::now();
    let r = client::get(node.addr(PORT), "sloth.test", "/sleep/4000").await?;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "504 only after {:?}",
        started.elapsed()
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node
        .http_backends(&["pipe-a", "pipe-b"], BACKEND_PORT)
        .await?;
    node.http_group("pipe", PORT, BACKEND_PORT, &backends)
        .await?;

    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(
        b"GET /sleep/300 HTTP/1.1\r\nHost: pipe.test\r\n\r\n\
          GET /second HTTP/1.1\r\nHost: pipe.test\r\n\r\n\
          GET /third HTTP/1.1\r\nHost: pipe.test\r\n\r\n",
    )
    .await?;
    for want in ["/sleep/300", "/second", "/third"] {
        let r = raw.reply(Duration::from_secs(5)).await?;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("x-target"),
            Some(want),
            "pipelined answers out of order"
        );
    }
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_in_both_directions() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["flow"], BACKEND_PORT).await?;
    node.http_group("flow", PORT, BACKEND_PORT, &backends)
        .await?;
    let backend = &backends[0];

    // Response: the first part arrives while the backend still holds the rest.
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let resp = conn
        .start(get_request("flow.test", "/stream").map(BodyExt::boxed))
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < b"first\n".len() {
        let frame = integration::within(
            "the first part of a streamed response",
            Duration::from_secs(5),
            body.frame(),
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("response ended after {got:?}"))??;
        if let Some(d) = frame.data_ref() {
            got.extend_from_slice(d);
        }
    }
    assert_eq!(got, b"first\n");
    assert_eq!(
        backend.held(),
        1,
        "the backend finished its body before the client read the first part"
    );
    backend.release();
    let rest = body.collect().await?.to_bytes();
    assert_eq!(&rest[..], b"last\n");

    // Request: the backend sees the first part before the client sends the rest.
    let (mut tx, upload) = Channel::<Bytes, Infallible>::new(4);
    let mut req = Request::post("/upload").body(upload.boxed())?;
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_static("flow.test"));
    let answer = tokio::spawn(async move {
        let resp = conn.start(req).await?;
        anyhow::Ok((resp.status(), resp.into_body().collect().await?.to_bytes()))
    });
    tx.send_data(Bytes::from_static(b"part-one")).await?;
    wait_until(
        "the backend to receive the first part of the upload",
        Duration::from_secs(5),
        || async { backend.uploaded() >= 8 },
    )
    .await?;
    tx.send_data(Bytes::from_static(b"part-two")).await?;
    drop(tx);
    let (status, total) =
        integration::within("the upload answer", Duration::from_secs(5), answer).await???;
    assert_eq!((status, &total[..]), (StatusCode::OK, &b"16"[..]));
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_tunnelled_and_count_in_flight_while_open() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["up-a", "up-b"], BACKEND_PORT).await?;
    let group = node.http_group("up", PORT, BACKEND_PORT, &backends).await?;

    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(
        b"GET /upgrade HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    assert_eq!(r.status, StatusCode::SWITCHING_PROTOCOLS, "{}", r.text());
    assert_eq!(r.header("upgrade"), Some("echo"));
    raw.write(b"ping\n").await?;
    let line = raw.line(Duration::from_secs(5)).await?;
    let (tunnel, echoed) = line
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("untagged echo {line:?}"))?;
    assert_eq!(echoed, "ping");
    let tunnel = tunnel.to_owned();

    let loads = node.local_loads(&group).await?;
    for (name, local) in &loads {
        assert_eq!(
            *local,
            u64::from(*name == tunnel),
            "load.local of {name} with a tunnel open to {tunnel}: {loads:?}"
        );
    }
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    for _ in 0..20 {
        let r = conn.get("up.test", "/").await?;
        assert_ne!(
            r.text(),
            tunnel,
            "a request went to the instance with an open tunnel"
        );
    }
    raw.write(b"still open\n").await?;
    assert_eq!(
        raw.line(Duration::from_secs(5)).await?,
        format!("{tunnel} still open")
    );

    drop(raw);
    node.wait_idle(&group).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_in_flight_requests() -> anyhow::Result<()> {
    let mut opts = NodeOptions::default();
    opts.settings.drain_timeout = Duration::from_secs(10);
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["drain"], BACKEND_PORT).await?;
    node.http_group("drain", PORT, BACKEND_PORT, &backends)
        .await?;
    let addr = node.addr(PORT);
    let slow = tokio::spawn(async move { client::get(addr, "drain.test", "/slow").await });
    wait_until(
        "the slow request to be held",
        Duration::from_secs(5),
        || async { backends[0].held() == 1 },
    )
    .await?;

    let stopping = tokio::spawn(node.stop());
    wait_until(
        "the published port to stop accepting",
        Duration::from_secs(5),
        || async { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await?;
    assert!(
        !stopping.is_finished(),
        "shutdown finished with a request in flight"
    );
    backends[0].release();
    let r = integration::within("the in-flight request", Duration::from_secs(5), slow).await???;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "drain"));
    integration::within("shutdown after the drain", Duration::from_secs(5), stopping).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_closed_while_idle_is_not_reused() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let idle_close = Duration::from_millis(200);
    let addr = std::net::SocketAddr::new(node.subnet.next_ip(), BACKEND_PORT);
    let backend =
        integration::HttpBackend::start_with_idle_close("brisk", addr, Some(idle_close)).await?;
    let backends = [backend];
    node.http_group("brisk", PORT, BACKEND_PORT, &backends)
        .await?;
    let backend = &backends[0];

    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    for round in 0..3 {
        let r = conn.get("brisk.test", "/").await?;
        assert_eq!(r.status, StatusCode::OK, "round {round}: {}", r.text());
        // The backend closes the idle pooled connection...
        wait_until(
            "the backend to close its idle connection",
            Duration::from_secs(5),
            || async { backend.open_connections() == 0 },
        )
        .await?;
    }
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_pass_through_intact() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["bulk"], BACKEND_PORT).await?;
    node.http_group("bulk", PORT, BACKEND_PORT, &backends)
        .await?;
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;

    let size = 4 << 20;
    let r = conn.get("bulk.test", &format!("/big/{size}")).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), size);
    assert!(r.body.iter().all(|b| *b == b'x'));

    let mut req = get_request("bulk.test", "/upload");
    *req.method_mut() = http::Method::POST;
    *req.body_mut() = http_body_util::Full::new(Bytes::from(vec![b'y'; size]));
    let r = conn.send(req).await?;
    assert_eq!((r.status, r.text()), (StatusCode::OK, size.to_string()));
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_counts_in_flight_until_its_body_is_sent() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["long"], BACKEND_PORT).await?;
    let group = node
        .http_group("long", PORT, BACKEND_PORT, &backends)
        .await?;
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;

    // More than loopback socket buffers hold, so the node cannot have sent
    // it all while the client reads nothing.
    let size = 32 << 20;
    let resp = conn
        .start(get_request("long.test", &format!("/big/{size}")).map(BodyExt::boxed))
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let loads = node.local_loads(&group).await?;
    assert_eq!(
        loads,
        vec![("long".to_owned(), 1)],
        "in flight while the response body is being sent"
    );
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(body.len(), size);
    node.wait_idle(&group).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_expect_continue_and_http10_requests() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["misc"], BACKEND_PORT).await?;
    node.http_group("misc", PORT, BACKEND_PORT, &backends)
        .await?;

    // HEAD: the length of the body that GET would send, no body, and the
    // connection stays usable.
    let mut conn = HttpConn::connect(node.addr(PORT)).await?;
    let mut req = get_request("misc.test", "/big/1000");
    *req.method_mut() = http::Method::HEAD;
    let r = conn.send(req).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert!(r.body.is_empty());
    assert_eq!(conn.get("misc.test", "/").await?.text(), "misc");

    // Expect: 100-continue gets a 100 before the client sends its body.
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(b"POST /upload HTTP/1.1\r\nHost: misc.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await?;
    let interim = raw.reply(Duration::from_secs(5)).await?;
    assert_eq!(
        interim.status,
        StatusCode::CONTINUE,
        "no 100 Continue before the body"
    );
    raw.write(b"hello").await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "5"));

    // HTTP/1.0 without Host, on a port with one group: served, then closed.
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(b"GET / HTTP/1.0\r\n\r\n").await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "misc"));
    raw.closed(Duration::from_secs(5)).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_refused() -> anyhow::Result<()> {
    let mut opts = NodeOptions::default();
    opts.settings.max_connections = 2;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["few"], BACKEND_PORT).await?;
    node.http_group("few", PORT, BACKEND_PORT, &backends)
        .await?;

    // Earlier probe connections may still hold a slot for a moment.
    let a = served_connection(&node).await?;
    let mut b = served_connection(&node).await?;
    let third = client::get(node.addr(PORT), "few.test", "/").await;
    assert!(
        third.is_err(),
        "a third connection was served with max_connections = 2: {third:?}"
    );
    drop(a);
    wait_until("a slot to free up", Duration::from_secs(5), || async {
        client::get(node.addr(PORT), "few.test", "/")
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await?;
    assert_eq!(b.get("few.test", "/").await?.status, StatusCode::OK);
    node.stop().await
}

/// A keep-alive connection to `PORT` that has been served one request,
/// retried until the node accepts it (bounded).
async fn served_connection(node: &TestNode) -> anyhow::Result<HttpConn> {
    let deadline = Instant::now() + patient(Duration::from_secs(5));
    loop {
        if let Ok(mut conn) = HttpConn::connect(node.addr(PORT)).await
            && conn
                .get("few.test", "/")
                .await
                .is_ok_and(|r| r.status == StatusCode::OK)
        {
            return Ok(conn);
        }
        ensure!(Instant::now() < deadline, "no connection was served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_requests_need_exactly_one_host() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["hosted"], BACKEND_PORT).await?;
    node.http_group("hosted", PORT, BACKEND_PORT, &backends)
        .await?;

    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without
    // a Host header or with more than one, even where one group takes every
    // host name.
    let bad: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: hosted.test\r\nHost: other.test\r\n\r\n",
    ];
    for raw in bad {
        let r = raw_exchange(node.addr(PORT), raw.to_vec(), Duration::from_secs(5)).await?;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "for {:?} (answered by {:?})",
            String::from_utf8_lossy(raw),
            r.backend()
        );
    }
    assert_eq!(
        backends[0].requests(),
        0,
        "a request without exactly one Host reached the instance"
    );
    node.stop().await
}
