//! Clients that misbehave on purpose (issue 12): duplicate `Host` headers,
//! forged forwarding headers, readers that never read, idle tunnels, and
//! uploads that the instance answers before it has read them.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::{HeaderMap, StatusCode};
use integration::client::{RawConn, raw_exchange, tcp_connect};
use integration::{NodeOptions, TestNode, patient, wait_until, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BACKEND_PORT, PORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_with_two_hosts_gets_400() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["old"], BACKEND_PORT).await?;
    node.http_group("old", PORT, BACKEND_PORT, &backends)
        .await?;
    let raw = b"GET / HTTP/1.0\r\nHost: old.test\r\nHost: other.test\r\n\r\n";
    let r = raw_exchange(node.addr(PORT), raw.to_vec(), Duration::from_secs(5)).await?;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "HTTP/1.0 with two Host headers answered by {:?}",
        r.backend()
    );
    assert_eq!(
        backends[0].requests(),
        0,
        "the request reached the instance"
    );
    // One Host, or none, is still fine for HTTP/1.0.
    let raw = b"GET / HTTP/1.0\r\nHost: old.test\r\n\r\n";
    let r = raw_exchange(node.addr(PORT), raw.to_vec(), Duration::from_secs(5)).await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "old"));
    node.stop().await
}

const FORGED: &str = "GET / HTTP/1.1\r\nHost: fwd.test\r\nForwarded: for=192.0.2.1;proto=https\r\n\
X-Real-IP: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n";

/// Sends [`FORGED`] from a fresh client address through a node started
/// with `opts`; returns that address and the headers the instance saw.
async fn forged(opts: NodeOptions) -> anyhow::Result<(IpAddr, HeaderMap)> {
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["fwd"], BACKEND_PORT).await?;
    node.http_group("fwd", PORT, BACKEND_PORT, &backends)
        .await?;
    let client_ip = node.subnet.next_ip();
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), Some(client_ip)).await?);
    raw.write(FORGED.as_bytes()).await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    anyhow::ensure!(r.status == StatusCode::OK, "{}: {}", r.status, r.text());
    let seen = backends[0].last_seen().context("backend saw nothing")?;
    node.stop().await?;
    Ok((client_ip, seen.headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_clients_are_not_trusted() -> anyhow::Result<()> {
    let (client_ip, seen) = forged(NodeOptions::default()).await?;
    let h = |name: &str| {
        seen.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        h("forwarded"),
        Vec::<String>::new(),
        "Forwarded passed through"
    );
    assert_eq!(
        h("x-real-ip"),
        Vec::<String>::new(),
        "X-Real-IP passed through"
    );
    assert_eq!(
        h("x-forwarded-for"),
        vec![client_ip.to_string()],
        "X-Forwarded-For must name the connecting client only"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_trusted_proxies_are_kept() -> anyhow::Result<()> {
    let mut opts = NodeOptions::default();
    // Every test address is on loopback.
    opts.settings.trusted_proxies = vec!["127.0.0.0/8".parse()?];
    let (client_ip, seen) = forged(opts).await?;
    let h = |name: &str| seen.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        h("x-forwarded-for"),
        Some(format!("192.0.2.1, {client_ip}").as_str())
    );
    assert_eq!(h("forwarded"), Some("for=192.0.2.1;proto=https"));
    assert_eq!(h("x-real-ip"), Some("192.0.2.1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_cut_after_the_send_timeout() -> anyhow::Result<()> {
    let send_timeout = Duration::from_secs(1);
    let mut opts = NodeOptions::default();
    opts.settings.send_timeout = send_timeout;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["bulk"], BACKEND_PORT).await?;
    let group = node
        .create_group(&serde_json::json!({
            "name": "bulk",
            "hard_limit": 1,
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        }))
        .await?;
    node.attach(&group, "bulk", backends[0].addr().ip()).await?;

    // Far more than socket buffers hold; the client never reads.
    let mut stalled = tcp_connect(node.addr(PORT), None).await?;
    stalled
        .write_all(b"GET /big/67108864 HTTP/1.1\r\nHost: bulk.test\r\n\r\n")
        .await?;
    wait_until(
        "the request to be in flight",
        Duration::from_secs(5),
        || async {
            node.local_loads(&group)
                .await
                .is_ok_and(|l| l == [("bulk".to_owned(), 1)])
        },
    )
    .await?;
    let started = Instant::now();
    // hard_limit 1: while the stalled request holds the instance, others
    // get 503; once the send timeout passes it must be released.
    node.wait_idle(&group).await.with_context(|| {
        format!(
            "the stalled response still in flight after {:?}",
            started.elapsed()
        )
    })?;
    let r = integration::client::get(node.addr(PORT), "bulk.test", "/").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The stalled connection is closed: reading drains what was buffered
    // and then ends.
    let mut sink = vec![0_u8; 1 << 20];
    within(
        "the stalled connection to close",
        patient(Duration::from_secs(10)),
        async {
            loop {
                match stalled.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        },
    )
    .await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_makes_progress_is_served_in_full() -> anyhow::Result<()> {
    let send_timeout = Duration::from_secs(2);
    let mut opts = NodeOptions::default();
    opts.settings.send_timeout = send_timeout;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["trickle"], BACKEND_PORT).await?;
    node.http_group("trickle", PORT, BACKEND_PORT, &backends)
        .await?;
    let size: usize = 24 << 20;
    let mut conn = tcp_connect(node.addr(PORT), None).await?;
    conn.write_all(format!("GET /big/{size} HTTP/1.1\r\nHost: trickle.test\r\n\r\n").as_bytes())
        .await?;
    // Reads 256 KiB every 100 ms: the whole body takes several send
    // timeouts, but no wait between reads comes near one.
    let started = Instant::now();
    let mut got = 0_usize;
    let mut chunk = vec![0_u8; 256 << 10];
    let deadline = started + patient(Duration::from_secs(60));
    while got < size {
        anyhow::ensure!(Instant::now() < deadline, "read {got} of {size} bytes");
        let n = within(
            "more of the body",
            Duration::from_secs(5),
            conn.read(&mut chunk),
        )
        .await??;
        anyhow::ensure!(n > 0, "connection closed after {got} bytes (head included)");
        got += n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() > send_timeout * 2,
        "the body arrived in {:?}: too fast to test a slow reader",
        started.elapsed()
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_the_tunnel_idle_timeout() -> anyhow::Result<()> {
    let idle = Duration::from_secs(1);
    let mut opts = NodeOptions::default();
    opts.settings.tunnel_idle_timeout = idle;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["ws"], BACKEND_PORT).await?;
    let group = node.http_group("ws", PORT, BACKEND_PORT, &backends).await?;
    let upgrade =
        b"GET /upgrade HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";

    // A busy tunnel outlives the timeout...
    let mut busy = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    busy.write(upgrade).await?;
    assert_eq!(
        busy.reply(Duration::from_secs(5)).await?.status,
        StatusCode::SWITCHING_PROTOCOLS
    );
    let until = Instant::now() + idle * 3;
    while Instant::now() < until {
        busy.write(b"ping\n").await?;
        assert_eq!(busy.line(Duration::from_secs(5)).await?, "ws ping");
        tokio::time::sleep(idle / 4).await;
    }
    drop(busy);
    node.wait_idle(&group).await?;

    // ...an idle one is closed and stops counting in flight.
    let mut quiet = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    quiet.write(upgrade).await?;
    assert_eq!(
        quiet.reply(Duration::from_secs(5)).await?.status,
        StatusCode::SWITCHING_PROTOCOLS
    );
    quiet.write(b"hello\n").await?;
    assert_eq!(quiet.line(Duration::from_secs(5)).await?, "ws hello");
    let started = Instant::now();
    quiet.closed(patient(Duration::from_secs(10))).await?;
    assert!(
        started.elapsed() >= idle.mul_f64(0.9),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
    node.wait_idle(&group).await?;
    wait_until(
        "the instance's tunnel to close",
        Duration::from_secs(5),
        || async { backends[0].upgraded() == 0 },
    )
    .await?;
    node.stop().await
}

/// An upload that the instance answers before reading it: the client gets
/// the answer and its upload does not hang (it either completes, drained
/// by the node, or fails at once).
async fn early_answer(path: &str, status: u16) -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["early"], BACKEND_PORT).await?;
    node.http_group("early", PORT, BACKEND_PORT, &backends)
        .await?;
    let size: usize = 64 << 20;
    let stream = tcp_connect(node.addr(PORT), None).await?;
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: early.test\r\nContent-Length: {size}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let started = Instant::now();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 << 10];
        let mut sent = 0;
        while sent < size {
            if wr.write_all(&chunk).await.is_err() {
                return sent;
            }
            sent += chunk.len();
        }
        sent
    });
    let r = within(
        "the early answer",
        Duration::from_secs(5),
        integration::client::read_reply(&mut rd),
    )
    .await??;
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    let sent = within(
        "the upload to end after the early answer",
        patient(Duration::from_secs(10)),
        upload,
    )
    .await??;
    println!(
        "{status}: upload ended after {sent} bytes in {:?}",
        started.elapsed()
    );
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_with_401_does_not_hang() -> anyhow::Result<()> {
    // The instance reads and discards the rest, as nginx's `return` does.
    early_answer("/early/401", 401).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_with_413_does_not_hang() -> anyhow::Result<()> {
    // The instance stops reading but keeps the connection open.
    early_answer("/refuse/413", 413).await
}

/// A v2 PROXY header (TCP over IPv4) naming `client`.
fn proxy_v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[10, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80_u16.to_be_bytes());
    h
}

/// A node whose group `pp` (one instance) is on an
/// `accept_proxy_protocol` port, with `header_timeout`.
async fn proxy_protocol_node(
    header_timeout: Duration,
) -> anyhow::Result<(TestNode, Vec<integration::HttpBackend>)> {
    let mut opts = NodeOptions::default();
    opts.settings.accept_proxy_protocol = vec![PORT];
    opts.settings.header_timeout = header_timeout;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["pp"], BACKEND_PORT).await?;
    node.http_group("pp", PORT, BACKEND_PORT, &backends).await?;
    Ok((node, backends))
}

/// On an `accept_proxy_protocol` port the header timeout runs from the
/// accept (SPEC §9) through the PROXY header: a request head begun after
/// a slow header has only what is left (it began anew after the header
/// before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_runs_from_the_accept_through_a_proxy_header() -> anyhow::Result<()> {
    let (node, backends) = proxy_protocol_node(Duration::from_secs(3)).await?;
    let began = Instant::now();
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    raw.write(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: pp")
        .await?;
    let answer = raw.closed(Duration::from_secs(10)).await?;
    let took = began.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    anyhow::ensure!(answer.starts_with("HTTP/1.1 408"), "answered: {answer:?}");
    // 3 s from the accept; 5 s when it ran from the header.
    anyhow::ensure!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4200),
        "closed {took:?} after the accept"
    );
    anyhow::ensure!(backends[0].requests() == 0);
    node.stop().await
}

/// On an `accept_proxy_protocol` port the header's client is the one the
/// instance hears of (`X-Forwarded-For`); a connection without a valid
/// header, or with none in time, is closed unanswered and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_port_takes_the_client_from_the_header() -> anyhow::Result<()> {
    let (node, backends) = proxy_protocol_node(Duration::from_secs(1)).await?;
    let request = b"GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n";
    let xff = |what: &str| -> anyhow::Result<String> {
        let seen = backends[0].last_seen().context("backend saw nothing")?;
        let v = seen
            .headers
            .get("x-forwarded-for")
            .with_context(|| format!("{what}: no X-Forwarded-For"))?;
        Ok(v.to_str()?.to_owned())
    };

    // Version 1, the header and the request in one write.
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(&[&b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n"[..], request].concat())
        .await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(xff("v1")?, "203.0.113.7");

    // Version 2, the header split over two writes, then the request.
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    let header = proxy_v2([198, 51, 100, 9], 4444);
    raw.write(&header[..10]).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.write(&[&header[10..], &request[..]].concat()).await?;
    let r = raw.reply(Duration::from_secs(5)).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(xff("v2")?, "198.51.100.9");

    // No header: closed unanswered.
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(request).await?;
    let answer = raw.closed(Duration::from_secs(5)).await?;
    assert!(
        answer.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // Nothing at all: closed at the header timeout.
    let began = Instant::now();
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    let answer = raw.closed(Duration::from_secs(10)).await?;
    assert!(answer.is_empty());
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(backends[0].requests(), 2, "only the two proxied requests");
    let scrape = node.scrape().await?;
    for reason in ["malformed", "timeout"] {
        assert_eq!(
            scrape.sum("edgelb_proxy_protocol_errors_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    node.stop().await?;

    // With trusted_proxies set, only those may send a header at all.
    let mut opts = NodeOptions::default();
    opts.settings.accept_proxy_protocol = vec![PORT];
    opts.settings.trusted_proxies = vec!["192.0.2.0/24".parse()?];
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["pp"], BACKEND_PORT).await?;
    node.http_group("pp", PORT, BACKEND_PORT, &backends).await?;
    let mut raw = RawConn::new(tcp_connect(node.addr(PORT), None).await?);
    raw.write(&[&b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n"[..], request].concat())
        .await?;
    let answer = raw.closed(Duration::from_secs(5)).await?;
    assert!(
        answer.is_empty(),
        "a header from an untrusted address was used"
    );
    assert_eq!(backends[0].requests(), 0);
    let scrape = node.scrape().await?;
    assert_eq!(
        scrape.sum(
            "edgelb_proxy_protocol_errors_total",
            &[("reason", "untrusted")]
        ),
        1.0
    );
    node.stop().await
}
