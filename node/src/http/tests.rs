//! HTTP mode against real loopback sockets: an in-process edge (the
//! module's `serve_connection` behind a test accept loop) in front of tiny
//! backends.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use raft_store::command::Command;
use raft_store::model::{Domain, Handler, Instance, Service, ServiceGroup};
use raft_store::state::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::serve_connection;
use crate::balancer::Backend;
use crate::dataplane::{ConnInfo, DataPlane, Settings};
use crate::metrics::Metrics;
use crate::routing::{BuildContext, publish};
use crate::tls::CertCache;

/// Patience for conditions on a slow machine.
fn patience() -> Duration {
    crate::patience::patient(Duration::from_secs(10))
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + patience();
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(patience(), fut)
        .await
        .expect("timed out")
}

// ---------------------------------------------------------------- model

fn http_port(port: u16, dest: u16) -> Service {
    Service {
        port,
        destination_port: dest,
        handlers: vec![Handler::Http],
    }
}

fn group(
    name: &str,
    domain: &str,
    services: Vec<Service>,
    instances: &[(&str, IpAddr)],
) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::new_v4(),
        name: name.into(),
        domains: vec![Domain {
            fqdn: domain.into(),
            certificate: None,
        }],
        services,
        hard_limit: 65535,
        instances: instances
            .iter()
            .map(|(n, ip)| Instance {
                uuid: Uuid::new_v4(),
                name: (*n).into(),
                address: ip.to_string(),
            })
            .collect(),
        created_at: "2025-01-01T00:00:00Z".into(),
        persistent: false,
        health_check: None,
        send_proxy_protocol: None,
    }
}

// ---------------------------------------------------------------- edge

const PORT: u16 = 80;

struct Edge {
    addr: SocketAddr,
    dp: Arc<DataPlane>,
    shutdown: CancellationToken,
    _metrics: Metrics,
}

impl Edge {
    async fn start(groups: Vec<ServiceGroup>, settings: Settings) -> Self {
        Self::start_logged(groups, DataPlane::new(settings)).await
    }

    /// An edge whose data plane is `dp` (an access log, say).
    async fn start_logged(groups: Vec<ServiceGroup>, dp: DataPlane) -> Self {
        let settings = dp.settings.clone();
        let mut state = State::default();
        for g in groups {
            state
                .apply(&Command::CreateGroup { group: g })
                .expect("valid group");
        }
        let metrics = Metrics::new();
        let certs = CertCache::default();
        let cx = BuildContext {
            certs: &certs,
            drain_timeout: settings.drain_timeout,
            load_changed: None,
        };
        let dp = Arc::new(dp);
        publish(&dp.routes, &state, &cx);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let (dp2, sd) = (dp.clone(), shutdown.clone());
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let info = ConnInfo {
                    peer,
                    port: PORT,
                    tls: false,
                    accepted: crate::dataplane::Accepted::now(),
                };
                tokio::spawn(serve_connection(stream, info, dp2.clone(), sd.clone(), ()));
            }
        });
        Self {
            addr,
            dp,
            shutdown,
            _metrics: metrics,
        }
    }

    fn backend(&self, name: &str) -> Arc<Backend> {
        let table = self.dp.routes.load();
        table
            .groups()
            .flat_map(|g| g.backends.values())
            .find(|b| b.name == name)
            .cloned()
            .expect("backend")
    }

    async fn client(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let stream = TcpStream::connect(self.addr).await.expect("connect edge");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Connections park as soon as they are idle, so that every test also
/// takes an HTTP/1 connection out of hyper and back between requests.
fn settings() -> Settings {
    Settings {
        park_after: Duration::ZERO,
        header_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        upstream_timeout: Duration::from_secs(5),
        ..Settings::default()
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    within(async {
        sender.ready().await.expect("ready");
        let resp = sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
}

fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

// ---------------------------------------------------------------- backends

/// Loopback IPs that all have `port` free, so instances of one group (which
/// share a destination port) can run side by side.
async fn listeners(n: u8) -> (u16, Vec<(IpAddr, TcpListener)>) {
    loop {
        let first = TcpListener::bind("127.0.0.2:0").await.expect("bind");
        let port = first.local_addr().expect("addr").port();
        let mut all = vec![(IpAddr::from([127, 0, 0, 2]), first)];
        for i in 1..n {
            let ip = IpAddr::from([127, 0, 0, 2 + i]);
            match TcpListener::bind((ip, port)).await {
                Ok(l) => all.push((ip, l)),
                Err(_) => break,
            }
        }
        if all.len() == usize::from(n) {
            return (port, all);
        }
    }
}

/// An edge whose group `app` (`app.example.com`) has one instance, `a`,
/// served by `backend` on its listener: the edge, what `backend` returned,
/// and the instance.
async fn app_edge<T>(backend: impl FnOnce(TcpListener) -> T) -> (Edge, T, Arc<Backend>) {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let served = backend(l);
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let edge = Edge::start(vec![g], settings()).await;
    let a = edge.backend("a");
    (edge, served, a)
}

/// An address on `port` where nothing listens.
fn refused(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200 + i))
}

#[derive(Clone, Default)]
struct Counters {
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// A backend that answers every request with `x-backend: <name>` and a body
/// listing the request line and headers it received.
fn echo_backend(listener: TcpListener, name: &'static str) -> Counters {
    let counters = Counters::default();
    let c = counters.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.conns.fetch_add(1, Ordering::SeqCst);
            let requests = c.requests.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                requests.fetch_add(1, Ordering::SeqCst);
                async move {
                    let mut text = format!("{} {}\n", req.method(), req.uri());
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    if let Ok(body) = body.as_ref()
                        && !body.is_empty()
                    {
                        text.push_str(&format!("body: {}\n", String::from_utf8_lossy(body)));
                    }
                    let resp = Response::builder()
                        .header("x-backend", name)
                        .header("connection", "x-private")
                        .header("x-private", "1")
                        .header("keep-alive", "timeout=30")
                        .body(Full::new(Bytes::from(text)))
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    counters
}

/// A backend that reads requests and never answers.
fn silent_backend(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
}

/// A backend whose response body is fed chunk by chunk from the test: each
/// request hands the test the sender of its body.
fn streaming_backend(listener: TcpListener) -> mpsc::UnboundedReceiver<mpsc::Sender<Bytes>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let svc = service_fn(move |_req: Request<Incoming>| {
                let (chunks_tx, chunks_rx) = mpsc::channel(4);
                let _ = tx.send(chunks_tx);
                async move { Ok::<_, Infallible>(Response::new(ChannelBody(chunks_rx))) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    rx
}

/// A body that ends when its sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// A backend that answers 101 to anything and then echoes bytes.
fn upgrade_backend(listener: TcpListener) -> oneshot::Receiver<String> {
    let (head_tx, head_rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let head = read_head(&mut stream).await;
        let _ = head_tx.send(head);
        let _ = stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
            )
            .await;
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    head_rx
}

/// Connects to `addr`, sends `request` as it is and reads the answer's
/// head; the stream for what follows.
async fn raw_request(addr: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let head = within(read_head(&mut stream)).await;
    (stream, head)
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Writes raw bytes to the edge and reads until it closes.
async fn raw_exchange(edge: &Edge, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(edge.addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = within(stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_are_balanced_over_reused_connections() {
    let (port, mut ls) = listeners(2).await;
    let (ip_b, lb) = ls.pop().expect("b");
    let (ip_a, la) = ls.pop().expect("a");
    let a = echo_backend(la, "a");
    let b = echo_backend(lb, "b");
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip_a), ("b", ip_b)],
    );
    let edge = Edge::start(vec![g], settings()).await;

    let mut client = edge.client().await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..40 {
        let r = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(r.status, 200);
        let name = r.headers["x-backend"].to_str().expect("ascii").to_owned();
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both instances used: {seen:?}");
    let requests = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    let conns = a.conns.load(Ordering::SeqCst) + b.conns.load(Ordering::SeqCst);
    assert_eq!(requests, 40);
    assert!(
        conns < 10,
        "upstream connections are reused: {conns} for 40 requests"
    );
    let (ba, bb) = (edge.backend("a"), edge.backend("b"));
    eventually("nothing in flight", || {
        ba.local_inflight() == 0 && bb.local_inflight() == 0
    })
    .await;
    assert_eq!(
        ba.metrics.requests[1].get() + bb.metrics.requests[1].get(),
        40
    );
    assert!(ba.metrics.bytes_rx.get() > 0 && ba.metrics.bytes_tx.get() > 0);
    assert_eq!(
        ba.metrics.connections.get() + bb.metrics.connections.get(),
        u64::try_from(conns).expect("small")
    );
}

#[tokio::test]
async fn forwarded_headers_added_and_hop_by_hop_removed() {
    let (edge, _, _) = app_edge(|l| echo_backend(l, "a")).await;

    let mut client = edge.client().await;
    let req = Request::get("/path?q=1")
        .header("host", "App.Example.com")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eA==")
        .header("x-forwarded-for", "192.0.2.7")
        .header("x-forwarded-proto", "https")
        .header("x-kept", "yes")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = send(&mut client, req).await;
    assert_eq!(r.status, 200);
    let seen = r.body.to_ascii_lowercase();
    assert!(seen.starts_with("get /path?q=1\n"), "{seen}");
    assert!(seen.contains("\nhost: app.example.com\n"), "{seen}");
    // The client is no trusted proxy: its X-Forwarded-For is replaced.
    assert!(seen.contains("\nx-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("\nx-forwarded-proto: http\n"), "{seen}");
    assert!(
        seen.contains("\nx-forwarded-host: app.example.com\n"),
        "{seen}"
    );
    assert!(seen.contains("\nx-kept: yes\n"), "{seen}");
    for gone in [
        "x-hop",
        "keep-alive",
        "te:",
        "proxy-authorization",
        "connection",
    ] {
        assert!(!seen.contains(gone), "{gone} forwarded: {seen}");
    }
    assert!(
        !r.headers.contains_key("x-private"),
        "response hop-by-hop removed"
    );
    assert!(!r.headers.contains_key("keep-alive"));
    assert_eq!(r.headers["x-backend"], "a");
}

#[tokio::test]
async fn redirect_port_answers_308() {
    let tls_http = |port, dest| Service {
        port,
        destination_port: dest,
        handlers: vec![Handler::Tls, Handler::Http],
    };
    let redirect = |port, dest| Service {
        port,
        destination_port: dest,
        handlers: vec![Handler::Http, Handler::Redirect],
    };
    let ip = refused(0);
    let g1 = group(
        "one",
        "one.example.com",
        vec![tls_http(443, 8080), redirect(PORT, 443)],
        &[("a", ip)],
    );
    let g2 = group(
        "two",
        "two.example.com",
        vec![tls_http(8443, 8080), redirect(PORT, 8443)],
        &[("b", ip)],
    );
    let edge = Edge::start(vec![g1, g2], settings()).await;
    let mut client = edge.client().await;

    let r = send(&mut client, get("one.example.com", "/a/b?x=1&y=2")).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers["location"], "https://one.example.com/a/b?x=1&y=2");

    let r = send(&mut client, get("two.example.com:80", "/")).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers["location"], "https://two.example.com:8443/");

    let r = send(&mut client, get("three.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        edge.backend("a").metrics.selected.get(),
        0,
        "no balancing on redirects"
    );
}

#[tokio::test]
async fn unknown_host_on_shared_port_is_404() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "a");
    let g1 = group(
        "one",
        "one.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let g2 = group(
        "two",
        "*.two.example.com",
        vec![http_port(PORT, port)],
        &[("b", ip)],
    );
    let edge = Edge::start(vec![g1, g2], settings()).await;
    let mut client = edge.client().await;

    let r = send(&mut client, get("nope.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body, "service not found");
    assert_eq!(r.headers["content-type"], "text/plain");
    assert_eq!(r.headers["content-length"], "17");

    let r = send(&mut client, get("x.two.example.com", "/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-backend"], "a");
}

#[tokio::test]
async fn no_instances_is_503() {
    let g = group("app", "app.example.com", vec![http_port(PORT, 8080)], &[]);
    let edge = Edge::start(vec![g], settings()).await;
    let mut client = edge.client().await;
    let r = send(&mut client, get("app.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, "no instances");
}

#[tokio::test]
async fn overloaded_is_503_with_retry_after() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let mut streams = streaming_backend(l);
    let mut g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    g.hard_limit = 1;
    let edge = Edge::start(vec![g], settings()).await;

    let mut first = edge.client().await;
    let held = tokio::spawn(async move {
        let resp = first
            .send_request(get("app.example.com", "/"))
            .await
            .expect("response");
        resp.into_body().collect().await.map(|b| b.to_bytes())
    });
    let chunks = within(streams.recv())
        .await
        .expect("request reached the backend");
    let mut second = edge.client().await;
    let r = send(&mut second, get("app.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    drop(chunks);
    within(held).await.expect("join").expect("body");
}

#[tokio::test]
async fn refused_instance_costs_no_client_error() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "up");
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("down", refused(1)), ("up", ip)],
    );
    let edge = Edge::start(vec![g], settings()).await;
    let down = edge.backend("down");
    let mut client = edge.client().await;
    for _ in 0..64 {
        let r = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-backend"], "up");
        if down.metrics.connect_errors.get() > 0 {
            break;
        }
    }
    assert!(
        down.metrics.connect_errors.get() > 0,
        "the refused instance was tried"
    );
    assert_eq!(down.local_inflight(), 0);
}

#[tokio::test]
async fn every_attempt_refused_is_502() {
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, 1)],
        &[("x", refused(2)), ("y", refused(3))],
    );
    let edge = Edge::start(vec![g], settings()).await;
    let mut client = edge.client().await;
    let r = send(&mut client, get("app.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.body, "bad gateway");
    let (x, y) = (edge.backend("x"), edge.backend("y"));
    assert_eq!(
        x.metrics.connect_errors.get() + y.metrics.connect_errors.get(),
        3
    );
}

#[tokio::test]
async fn silent_instance_is_504() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    silent_backend(l);
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let edge = Edge::start(
        vec![g],
        Settings {
            upstream_timeout: Duration::from_millis(300),
            ..settings()
        },
    )
    .await;
    let mut client = edge.client().await;
    let r = send(&mut client, get("app.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.body, "gateway timeout");
    let a = edge.backend("a");
    assert_eq!(a.metrics.requests[4].get(), 1);
    assert_eq!(a.local_inflight(), 0);
}

#[tokio::test]
async fn oversized_header_block_is_431() {
    let g = group("app", "app.example.com", vec![http_port(PORT, 1)], &[]);
    let edge = Edge::start(vec![g], settings()).await;
    let mut req = b"GET / HTTP/1.1\r\nhost: app.example.com\r\nx-big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 * 1024));
    req.extend(b"\r\n\r\n");
    let reply = raw_exchange(&edge, &req).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert!(
        reply.ends_with("\r\n\r\nrequest header fields too large"),
        "a short plain body: {reply}"
    );
}

/// A response's last piece reads exactly as hyper's bodiless 400 and is
/// written after hyper dropped the body (the request's count already
/// ended): it is the instance's body, passed on as sent, not replaced.
#[tokio::test]
async fn a_body_ending_like_an_error_answer_is_passed_on_as_sent() {
    const TAIL: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = l.accept().await {
            tokio::spawn(async move {
                while !read_head(&mut stream).await.is_empty() {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\nfirst ",
                        6 + TAIL.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = stream.write_all(TAIL).await;
                }
            });
        }
    });
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let edge = Edge::start(vec![g], settings()).await;
    // Through hyper (a chunked upload) and through the lean path (a GET).
    for request in [
        &b"POST / HTTP/1.1\r\nhost: app.example.com\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            [..],
        &b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n"[..],
    ] {
        let mut s = TcpStream::connect(edge.addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.as_bytes(), [&b"first "[..], TAIL].concat(), "{body:?}");
    }
}

/// RFC 9112 §3.2: a Host that is no `uri-host [":" port]` is answered 400
/// and not forwarded, on a port of one group too (no routing needs it),
/// through the lean path (a GET) and hyper's (an upload).
#[tokio::test]
async fn an_invalid_host_is_400_and_not_forwarded() {
    let (edge, counters) =
        scripted_edge(|_, _| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()).await;
    // The authority of an absolute-form target is refused alike.
    let (_, head) = raw_request(
        edge.addr,
        b"GET http://user@app.example.com/ HTTP/1.1\r\nhost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    for host in ["a b", "user@a", "a/b", "::::", "[v a@b/c]"] {
        for request in [
            format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n"),
            format!(
                "POST / HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ] {
            let (_, head) = raw_request(edge.addr, request.as_bytes()).await;
            assert!(head.starts_with("HTTP/1.1 400"), "{host:?}: {head}");
        }
    }
    assert_eq!(counters.requests.load(Ordering::SeqCst), 0);
    // A valid one of another name still reaches the port's one group.
    let reply = raw_exchange(
        &edge,
        b"GET / HTTP/1.1\r\nhost: other.example:8080\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// RFC 9112 §6.1: a transfer coding the node does not understand is 501,
/// not dropped (the instance got a gzip body as if it were plain).
#[tokio::test]
async fn an_unknown_transfer_coding_is_501() {
    let (edge, counters) =
        scripted_edge(|_, _| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()).await;
    // Refused ones first: the instance sees none of them.
    for (coding, status) in [
        ("gzip, chunked", "501"),
        ("chunked, chunked", "400"),
        // An empty list element is nothing; the coding's case neither.
        (", chunked", "200"),
        ("Chunked", "200"),
    ] {
        let request = format!(
            "POST / HTTP/1.1\r\nhost: app.example.com\r\ntransfer-encoding: {coding}\r\n\r\n0\r\n\r\n"
        );
        let (_, head) = raw_request(edge.addr, request.as_bytes()).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{coding:?}: {head}"
        );
        if status != "200" {
            assert_eq!(counters.requests.load(Ordering::SeqCst), 0);
        }
    }
}

#[tokio::test]
async fn a_target_too_long_is_414_with_a_body() {
    let g = group("app", "app.example.com", vec![http_port(PORT, 1)], &[]);
    // A target longer than 65,534 bytes (hyper's and the `http` crate's
    // limit) inside a header block within the limit.
    let edge = Edge::start(
        vec![g],
        Settings {
            max_header_bytes: 128 * 1024,
            ..settings()
        },
    )
    .await;
    let mut req = b"GET /".to_vec();
    req.extend(std::iter::repeat_n(b'a', 70 * 1024));
    req.extend(b" HTTP/1.1\r\nhost: app.example.com\r\n\r\n");
    let reply = raw_exchange(&edge, &req).await;
    assert!(reply.starts_with("HTTP/1.1 414"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nuri too long"), "{reply}");
}

#[tokio::test]
async fn stalled_client_gets_408_and_close() {
    let g = group("app", "app.example.com", vec![http_port(PORT, 1)], &[]);
    let edge = Edge::start(
        vec![g],
        Settings {
            header_timeout: Duration::from_millis(300),
            ..settings()
        },
    )
    .await;
    // Part of a header block, then nothing.
    let reply = raw_exchange(&edge, b"GET / HTTP/1.1\r\nhost: app.exa").await;
    assert!(
        reply.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{reply}"
    );
    assert!(reply.ends_with("request timeout"), "{reply}");
    // Nothing at all after accept.
    let reply = raw_exchange(&edge, b"").await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
}

#[tokio::test]
async fn header_timeout_restarts_with_next_keep_alive_request() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "a");
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let edge = Edge::start(
        vec![g],
        Settings {
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(30),
            ..settings()
        },
    )
    .await;
    let mut stream = TcpStream::connect(edge.addr).await.expect("connect");
    let req = b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n";
    stream.write_all(req).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = within(stream.read(&mut buf)).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Idle for longer than the header timeout: still open (idle timeout).
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream.write_all(req).await.expect("write");
    let n = within(stream.read(&mut buf)).await.expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // The next one stalls after its first byte.
    stream.write_all(b"G").await.expect("write");
    let reply = read_to_close(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "a");
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let edge = Edge::start(
        vec![g],
        Settings {
            idle_timeout: Duration::from_millis(300),
            ..settings()
        },
    )
    .await;
    let reply = raw_exchange(&edge, b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn malformed_request_is_400_and_the_node_keeps_serving() {
    let (edge, _, _) = app_edge(|l| echo_backend(l, "a")).await;
    let reply = raw_exchange(&edge, b"GET / HTTP/1.1 bogus\r\n\x01\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nbad request"), "{reply}");
    // The same after a kept-alive request: the first is answered as
    // usual, the second gets the 400 with its body, then the close.
    let reply = raw_exchange(
        &edge,
        b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\nGET / HTTP/1.1 bogus\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 2, "{reply}");
    assert!(reply.ends_with("\r\n\r\nbad request"), "{reply}");
    let mut client = edge.client().await;
    let r = send(&mut client, get("app.example.com", "/")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_tunnels_bytes_and_counts_one_in_flight() {
    let (edge, head, a) = app_edge(upgrade_backend).await;

    let (mut stream, resp) = raw_request(
        edge.addr,
        b"GET /ws HTTP/1.1\r\nhost: app.example.com\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    let resp = resp.to_ascii_lowercase();
    assert!(resp.starts_with("http/1.1 101"), "{resp}");
    assert!(resp.contains("upgrade: echo"), "{resp}");
    let head = within(head)
        .await
        .expect("upstream saw the request")
        .to_ascii_lowercase();
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");

    for msg in [&b"ping"[..], b"pong and more"] {
        stream.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        within(stream.read_exact(&mut buf)).await.expect("echo");
        assert_eq!(buf, msg);
        assert_eq!(
            a.local_inflight(),
            1,
            "an open tunnel is one request in flight"
        );
    }
    drop(stream);
    eventually("tunnel released", || a.local_inflight() == 0).await;
    assert_eq!(a.metrics.requests[0].get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_counts_in_flight_until_fully_sent() {
    let (edge, mut streams, a) = app_edge(streaming_backend).await;

    let mut client = edge.client().await;
    let resp = tokio::spawn(async move {
        client.ready().await?;
        client.send_request(get("app.example.com", "/")).await
    });
    let chunks = within(streams.recv())
        .await
        .expect("request reached the backend");
    chunks.send(Bytes::from("first ")).await.expect("send");
    let resp = within(resp).await.expect("join").expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = within(body.frame()).await.expect("frame").expect("ok");
    assert_eq!(first.into_data().expect("data"), "first ");
    for _ in 0..3 {
        assert_eq!(a.local_inflight(), 1, "body not finished yet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    chunks.send(Bytes::from("last")).await.expect("send");
    drop(chunks);
    let rest = within(body.collect()).await.expect("rest").to_bytes();
    assert_eq!(rest, "last");
    eventually("request released", || a.local_inflight() == 0).await;
    assert_eq!(a.metrics.requests[1].get(), 1);
    assert_eq!(a.metrics.duration.get_sample_count(), 1);
}

#[tokio::test]
async fn drained_instance_aborts_streaming_body() {
    let (edge, mut streams, a) = app_edge(streaming_backend).await;

    let mut client = edge.client().await;
    let resp = tokio::spawn(async move {
        client.ready().await?;
        client.send_request(get("app.example.com", "/")).await
    });
    let chunks = within(streams.recv())
        .await
        .expect("request reached the backend");
    chunks.send(Bytes::from("partial")).await.expect("send");
    let resp = within(resp).await.expect("join").expect("response");
    crate::balancer::start_drain(&a, Duration::from_millis(50));
    let res = within(resp.into_body().collect()).await;
    assert!(res.is_err(), "the body ends with an error");
    eventually("request released", || a.local_inflight() == 0).await;
    drop(chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_uses_authority_as_host() {
    let (edge, _, _) = app_edge(|l| echo_backend(l, "a")).await;

    let mut sender = h2_client(&edge).await;
    for _ in 0..3 {
        let req = Request::get("http://app.example.com/h2?x=1")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = within(sender.send_request(req)).await.expect("response");
        assert_eq!(resp.status(), 200);
        let body = within(resp.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        let seen = String::from_utf8_lossy(&body).to_ascii_lowercase();
        assert!(seen.starts_with("get /h2?x=1\n"), "{seen}");
        assert!(seen.contains("\nhost: app.example.com\n"), "{seen}");
        assert!(seen.contains("\ncookie: a=1; b=2\n"), "{seen}");
    }
}

#[tokio::test]
async fn shutdown_finishes_in_flight_request() {
    let (edge, mut streams, _) = app_edge(streaming_backend).await;

    let mut client = edge.client().await;
    let resp = tokio::spawn(async move {
        let resp = client.send_request(get("app.example.com", "/")).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((client, body))
    });
    let chunks = within(streams.recv())
        .await
        .expect("request reached the backend");
    edge.shutdown.cancel();
    chunks.send(Bytes::from("done")).await.expect("send");
    drop(chunks);
    let (client, body) = within(resp).await.expect("join").expect("response");
    assert_eq!(body, "done");
    eventually("connection closed after the drain", || client.is_closed()).await;
}

#[tokio::test]
async fn request_bodies_stream_to_the_instance() {
    let (edge, _, _) = app_edge(|l| echo_backend(l, "a")).await;
    let mut client = edge.client().await;
    let req = Request::post("/upload")
        .header("host", "app.example.com")
        .body(Full::new(Bytes::from("hello world")))
        .expect("request");
    let r = send(&mut client, req).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\ncontent-length: 11\n"), "{}", r.body);
    assert!(r.body.ends_with("body: hello world\n"), "{}", r.body);

    // Chunked in, chunked out to the instance (Transfer-Encoding is
    // per hop, so the node re-frames it).
    let reply = raw_exchange(
        &edge,
        b"POST /c HTTP/1.1\r\nhost: app.example.com\r\ntransfer-encoding: chunked\r\n\
          connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("transfer-encoding: chunked\n"), "{reply}");
    assert!(reply.contains("body: hello world\n"), "{reply}");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (edge, _, _) = app_edge(|l| echo_backend(l, "a")).await;
    let reply = raw_exchange(
        &edge,
        b"GET /one HTTP/1.1\r\nhost: app.example.com\r\n\r\n\
          GET /two HTTP/1.1\r\nhost: app.example.com\r\nconnection: close\r\n\r\n",
    )
    .await;
    let one = reply.find("GET /one").expect("first answered");
    let two = reply.find("GET /two").expect("second answered");
    assert!(one < two, "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 2, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connection_is_closed_gracefully() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "a");
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let edge = Edge::start(
        vec![g],
        Settings {
            idle_timeout: Duration::from_millis(300),
            ..settings()
        },
    )
    .await;
    let (mut sender, driver) = h2_connect(&edge).await;
    let req = Request::get("http://app.example.com/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within(sender.send_request(req)).await.expect("response");
    within(resp.into_body().collect()).await.expect("body");
    within(driver)
        .await
        .expect("join")
        .expect("closed with GOAWAY, not an error");
}

#[tokio::test]
async fn drained_instance_closes_tunnel() {
    let (edge, _head, a) = app_edge(upgrade_backend).await;
    let (mut stream, resp) = raw_request(
        edge.addr,
        b"GET / HTTP/1.1\r\nhost: app.example.com\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    assert_eq!(a.local_inflight(), 1);
    crate::balancer::start_drain(&a, Duration::from_millis(50));
    read_to_close(&mut stream).await;
    eventually("tunnel released", || a.local_inflight() == 0).await;
}

/// One echo instance "a" behind an edge with `settings`; its counters and
/// its port.
async fn one_instance_edge(settings: Settings) -> (Edge, Counters, u16) {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let counters = echo_backend(l, "a");
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    (Edge::start(vec![g], settings).await, counters, port)
}

/// One instance behind an edge whose connections park after `park_after`.
async fn parking_edge(park_after: Duration, idle_timeout: Duration) -> Edge {
    let settings = Settings {
        park_after,
        idle_timeout,
        ..settings()
    };
    one_instance_edge(settings).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_parks_and_serves_its_next_request() {
    let edge = parking_edge(Duration::from_millis(100), Duration::from_secs(30)).await;
    let mut client = edge.client().await;
    let first = send(&mut client, get("app.example.com", "/one")).await;
    assert_eq!(first.status, StatusCode::OK);
    // Busy connections are not parked: only once idle for `park_after`.
    assert_eq!(edge.dp.parked.get(), 0);
    eventually("the idle connection to park", || edge.dp.parked.get() == 1).await;
    // The same client connection: hyper is set up again from the socket.
    let second = send(&mut client, get("app.example.com", "/two")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.body.starts_with("GET /two"), "{}", second.body);
    assert_eq!(edge.dp.parked.get(), 0, "unparked while serving");
    eventually("the connection to park again", || edge.dp.parked.get() == 1).await;
}

/// An edge over one echo instance whose upstream connection served one
/// request and parked (`park_after` 100 ms: a pool parks after a second).
async fn parked_upstream(
    pool_idle_timeout: Duration,
) -> (Edge, Counters, Arc<crate::upstream::Pool>) {
    let settings = Settings {
        park_after: Duration::from_millis(100),
        pool_idle_timeout,
        ..settings()
    };
    let (edge, counters, port) = one_instance_edge(settings).await;
    let pool = edge.backend("a").pool(port);
    let mut client = edge.client().await;
    let first = send(&mut client, get("app.example.com", "/one")).await;
    assert_eq!(first.status, StatusCode::OK);
    eventually("the upstream connection to park", || pool.parked_len() == 1).await;
    (edge, counters, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connection_parks_and_carries_the_next_request() {
    let (edge, counters, pool) = parked_upstream(settings().pool_idle_timeout).await;
    // Another client: the parked socket gets a new hyper connection.
    let mut other = edge.client().await;
    let second = send(&mut other, get("app.example.com", "/two")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.body.starts_with("GET /two"), "{}", second.body);
    let conns = counters.conns.load(Ordering::SeqCst);
    assert_eq!(conns, 1, "one upstream connection for both");
    eventually("the connection to park again", || pool.parked_len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_upstream_connection_closes_at_the_pool_idle_timeout() {
    let (edge, counters, pool) = parked_upstream(Duration::from_millis(2500)).await;
    // All parked: the sweeper next looks when the connection is to close.
    eventually("the parked connection to close", || pool.idle_len() == 0).await;
    let mut client = edge.client().await;
    let second = send(&mut client, get("app.example.com", "/two")).await;
    assert_eq!(second.status, StatusCode::OK);
    let conns = counters.conns.load(Ordering::SeqCst);
    assert_eq!(conns, 2, "a new upstream connection");
}

/// A client connection that got one answer (head and body) and then
/// parked.
async fn parked_connection(edge: &Edge) -> TcpStream {
    let (mut stream, head) = raw_request(
        edge.addr,
        b"GET /first HTTP/1.1\r\nhost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = vec![0; length];
    within(stream.read_exact(&mut body)).await.expect("body");
    eventually("the connection to park", || edge.dp.parked.get() == 1).await;
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_head_split_around_a_park_is_served() {
    let edge = parking_edge(Duration::ZERO, Duration::from_secs(30)).await;
    let mut stream = parked_connection(&edge).await;
    // Half a head wakes the parked connection; the rest comes later.
    stream
        .write_all(b"GET /second HTTP/1.1\r\nho")
        .await
        .expect("write");
    eventually("the connection to unpark", || edge.dp.parked.get() == 0).await;
    stream
        .write_all(b"st: app.example.com\r\n\r\n")
        .await
        .expect("write");
    let head = within(read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = vec![0; 12];
    within(stream.read_exact(&mut body)).await.expect("body");
    assert_eq!(&body, b"GET /second\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connection_closes_at_the_idle_timeout_and_on_shutdown() {
    let edge = parking_edge(Duration::ZERO, Duration::from_millis(300)).await;
    let mut stream = parked_connection(&edge).await;
    // The idle timeout still runs while parked: the edge closes.
    let rest = read_to_close(&mut stream).await;
    assert!(rest.is_empty(), "nothing more was sent: {rest}");
    eventually("the closed connection to leave the gauge", || {
        edge.dp.parked.get() == 0
    })
    .await;

    let edge = parking_edge(Duration::ZERO, Duration::from_secs(30)).await;
    let mut stream = parked_connection(&edge).await;
    edge.shutdown.cancel();
    read_to_close(&mut stream).await;
    eventually("the closed connection to leave the gauge", || {
        edge.dp.parked.get() == 0
    })
    .await;
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_with_its_fields() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "a");
    let app = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let gone = group(
        "gone",
        "gone.example.com",
        vec![http_port(PORT, 1)],
        &[("x", refused(4)), ("y", refused(5))],
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, path) = json_access_log(dir.path());
    let edge = Edge::start_logged(
        vec![app, gone],
        DataPlane::new(settings()).with_access_log(log),
    )
    .await;
    let mut client = edge.client().await;
    let req = Request::post("/upload?x=1")
        .header("host", "app.example.com")
        .body(Full::new(Bytes::from("hello world")))
        .expect("request");
    let ok = send(&mut client, req).await;
    assert_eq!(ok.status, 200);
    let r = send(&mut client, get("nope.example.com", "/")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(&mut client, get("gone.example.com", "/g")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // Two Hosts: refused before routing, so the line names none.
    let two = Request::get("/two")
        .header("host", "app.example.com")
        .header("host", "gone.example.com")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = send(&mut client, two).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let lines = log_lines(&path, 4, "four access log lines").await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (ok_line, not_found, bad_gateway, two_hosts) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    assert_served_on_a_new_connection(ok_line, "POST", "/upload?x=1", 11, ok.body.len());
    assert_eq!(ok_line["port"], PORT);
    assert!(ok_line["duration_ms"].as_f64().is_some());
    let client_addr = ok_line["client"].as_str().expect("client");
    assert!(client_addr.starts_with("127.0.0.1:"), "{client_addr}");

    assert_eq!(not_found["status"], 404);
    assert_eq!(not_found["host"], "nope.example.com", "the host routed on");
    assert!(not_found["group"].is_null() && not_found["instance"].is_null());
    assert_eq!(not_found["error_origin"], "client");
    assert_eq!(not_found["bytes_out"], "service not found".len());
    assert_eq!(not_found["attempts"], 0);

    assert_eq!(bad_gateway["status"], 502);
    assert_eq!(bad_gateway["group"], "gone");
    assert_eq!(bad_gateway["attempts"], 3);
    assert_eq!(bad_gateway["error_origin"], "upstream");
    let why = bad_gateway["error"].as_str().expect("error");
    assert!(why.starts_with("every attempt failed"), "{why}");

    assert_eq!(two_hosts["status"], 400);
    assert_eq!(two_hosts["path"], "/two");
    assert!(two_hosts["host"].is_null(), "{two_hosts}");
    assert_eq!(two_hosts["error_origin"], "client");
}

#[tokio::test]
async fn a_client_gone_before_the_response_is_logged_as_499() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    silent_backend(l);
    let (edge, _dir, path) = logged_edge(port, ip, settings()).await;
    let mut s = TcpStream::connect(edge.addr).await.expect("connect");
    s.write_all(b"GET /wait HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        .await
        .expect("write");
    let backend = edge.backend("a");
    eventually("the request in flight", || backend.local_inflight() == 1).await;
    drop(s);
    let line = first_log_line(&path, "a line for the abandoned request").await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["path"], "/wait");
    assert_eq!(line["instance"], "a");
    assert_eq!(line["error_origin"], "client");
}

#[tokio::test]
async fn a_response_cut_by_the_drain_timeout_is_counted_and_logged_with_its_status() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let mut streams = streaming_backend(l);
    let settings = Settings {
        drain_timeout: Duration::from_millis(300),
        ..settings()
    };
    let (edge, _dir, path) = logged_edge(port, ip, settings).await;
    let (mut s, head) = raw_request(
        edge.addr,
        b"GET /long HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let chunks = within(streams.recv())
        .await
        .expect("request reached the backend");
    chunks.send(Bytes::from("part")).await.expect("send");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("part") {
        let mut buf = [0u8; 256];
        let n = within(s.read(&mut buf)).await.expect("read");
        assert!(n > 0, "closed before the first part");
        got.extend_from_slice(&buf[..n]);
    }
    // The body never ends: the drain timeout cuts it off.
    edge.shutdown.cancel();
    within(read_to_close(&mut s)).await;
    let backend = edge.backend("a");
    eventually("the request ended", || backend.local_inflight() == 0).await;
    assert_eq!(backend.metrics.requests[1].get(), 1, "counted as a 2xx");
    let line = first_log_line(&path, "a line for the cut response").await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["instance"], "a");
    assert_eq!(line["error_origin"], "internal", "{line}");
    drop(chunks);
}

/// The lines of the JSON access log at `path`, once there are `n`.
async fn log_lines(path: &std::path::Path, n: usize, what: &str) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    eventually(what, || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect();
        lines.len() >= n
    })
    .await;
    lines
}

/// The access log line of an HTTP/1.1 request to `app.example.com` that
/// instance `a` answered 200 on a new connection, at the first attempt.
fn assert_served_on_a_new_connection(
    line: &serde_json::Value,
    method: &str,
    path: &str,
    bytes_in: u64,
    bytes_out: usize,
) {
    assert_eq!(line["method"], method);
    assert_eq!(line["path"], path);
    assert_eq!(line["host"], "app.example.com");
    assert_eq!(line["proto"], "HTTP/1.1");
    assert_eq!(line["group"], "app");
    assert_eq!(line["instance"], "a");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], bytes_in);
    assert_eq!(line["bytes_out"], bytes_out);
    assert_eq!(line["attempts"], 1);
    assert!(
        line["connect_ms"].as_f64().is_some(),
        "a new connection: {line}"
    );
    assert!(line["response_ms"].as_f64().is_some());
    assert!(line["error_origin"].is_null());
}

/// The first line of the JSON access log at `path`, once written.
async fn first_log_line(path: &std::path::Path, what: &str) -> serde_json::Value {
    log_lines(path, 1, what).await.swap_remove(0)
}

/// The size of the future `make` would return (it is never called).
pub(crate) fn future_size<F>(_make: &dyn Fn() -> F) -> usize {
    size_of::<F>()
}

/// An edge with group `app` on the instance `a` at `ip`:`port`, writing a
/// JSON access log to the returned path (in the returned directory).
async fn logged_edge(
    port: u16,
    ip: IpAddr,
    settings: Settings,
) -> (Edge, tempfile::TempDir, std::path::PathBuf) {
    let app = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, path) = json_access_log(dir.path());
    let edge = Edge::start_logged(vec![app], DataPlane::new(settings).with_access_log(log)).await;
    (edge, dir, path)
}

/// An access log writing JSON to `access.log` in `dir`, and that path.
fn json_access_log(dir: &std::path::Path) -> (crate::access_log::AccessLog, std::path::PathBuf) {
    let path = dir.join("access.log");
    let log = crate::access_log::AccessLog::open(&crate::access_log::Options {
        target: crate::access_log::Target::File(path.clone()),
        format: crate::access_log::Format::Json,
        sample: 1.0,
    })
    .expect("open the access log");
    (log, path)
}

// ------------------------------------------------- the lean HTTP/1 path

/// A backend that answers the `n`th request head of each of its
/// connections (both counted from 0) with `answer(conn, n)`, and closes
/// the connection after an answer ending in `CLOSE`.
fn scripted_backend(listener: TcpListener, answer: fn(usize, usize) -> Vec<u8>) -> Counters {
    let counters = Counters::default();
    let c = counters.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let conn = c.conns.fetch_add(1, Ordering::SeqCst);
            let requests = c.requests.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    if read_head(&mut stream).await.is_empty() {
                        return;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let mut reply = answer(conn, n);
                    let close = reply.ends_with(CLOSE);
                    if close {
                        reply.truncate(reply.len() - CLOSE.len());
                    }
                    if stream.write_all(&reply).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    counters
}

/// Marks a scripted answer after which the backend closes.
const CLOSE: &[u8] = b"<close>";

async fn scripted_edge(answer: fn(usize, usize) -> Vec<u8>) -> (Edge, Counters) {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let counters = scripted_backend(l, answer);
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    (Edge::start(vec![g], settings()).await, counters)
}

#[tokio::test]
async fn a_body_that_ends_at_close_is_sent_chunked_on_a_kept_connection() {
    let (edge, counters) = scripted_edge(|conn, _| {
        format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody {conn}<close>").into_bytes()
    })
    .await;
    let mut client = edge.client().await;
    for expected in ["body 0", "body 1"] {
        let reply = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, expected);
        assert_eq!(reply.headers["transfer-encoding"], "chunked");
        assert!(!reply.headers.contains_key("connection"));
    }
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_chunked_answer_is_passed_on_and_its_connection_reused() {
    let (edge, counters) = scripted_edge(|_, n| {
        format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n\
             3;x=1\r\nreq\r\n2\r\n {n}\r\n0\r\nx-trailer: t\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let (mut stream, head) = raw_request(
        edge.addr,
        b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(!head.contains("connection"), "{head}");
    // The client gets the chunks as sent, trailer included; and the same
    // connections serve a second request.
    let body = b"3;x=1\r\nreq\r\n2\r\n 0\r\n0\r\nx-trailer: t\r\n\r\n";
    let mut got = vec![0u8; body.len()];
    within(stream.read_exact(&mut got)).await.expect("body");
    assert_eq!(got, body);
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n")
        .await
        .expect("write");
    let head = within(read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let mut got = vec![0u8; body.len()];
    within(stream.read_exact(&mut got)).await.expect("body");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(body).replace(" 0", " 1")
    );
    assert_eq!(
        counters.conns.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
}

#[tokio::test]
async fn bytes_after_an_answer_are_not_taken_for_the_next_one() {
    // The instance sends a second, unasked answer right behind the first
    // (as a 408 when its keep-alive timeout ends): that connection must
    // not carry the next request.
    let (edge, counters) = scripted_edge(|conn, _| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {conn}\
             HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let mut client = edge.client().await;
    for expected in ["conn 0", "conn 1"] {
        let reply = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, expected);
    }
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_instance_closed_is_replaced() {
    let (edge, counters) = scripted_edge(|conn, _| {
        format!("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {conn}<close>").into_bytes()
    })
    .await;
    let mut client = edge.client().await;
    for expected in ["conn 0", "conn 1", "conn 2"] {
        let reply = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.body, expected);
    }
    assert_eq!(counters.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_pooled_connection_times_out_each_request_from_its_own_start() {
    // Every connection answers its first request and keeps silent on its
    // second: that one waits on a pooled connection whose timer served the
    // first.
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let counters = scripted_backend(l, |conn, n| match n {
        0 => format!("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {conn}").into_bytes(),
        _ => Vec::new(),
    });
    let g = group(
        "app",
        "app.example.com",
        vec![http_port(PORT, port)],
        &[("a", ip)],
    );
    let timeout = Duration::from_millis(300);
    let settings = Settings {
        upstream_timeout: timeout,
        ..settings()
    };
    let edge = Edge::start(vec![g], settings).await;
    let mut client = edge.client().await;
    for conn in 0..2 {
        let reply = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.body, format!("conn {conn}"));
        // Long after the first request began: the wait counts from the
        // second request's start.
        tokio::time::sleep(timeout).await;
        let began = std::time::Instant::now();
        let reply = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.body);
        assert!(
            began.elapsed() >= timeout,
            "timed out after {:?}",
            began.elapsed()
        );
    }
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
    assert_eq!(edge.backend("a").local_inflight(), 0);
}

/// Reads one response framed by its `content-length`: its head and body.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let head = within(read_head(stream)).await;
    let len = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0u8; len];
    within(stream.read_exact(&mut body)).await.expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn small_bodies_that_came_with_their_heads_go_out_with_them() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    let counters = echo_backend(l, "a");
    let (edge, _dir, path) = logged_edge(port, ip, settings()).await;
    // Three requests in one write: two with a body, pipelined.
    let mut s = TcpStream::connect(edge.addr).await.expect("connect");
    s.write_all(
        b"POST /form HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\n\r\ndata\
          PUT /two HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 3\r\n\r\nabc\
          GET /three HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
    )
    .await
    .expect("write");
    for (line, body) in [
        ("POST /form", Some("data")),
        ("PUT /two", Some("abc")),
        ("GET /three", None),
    ] {
        let (head, text) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(text.starts_with(line), "{text}");
        assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
        match body {
            Some(body) => {
                assert!(text.contains(&format!("body: {body}\n")), "{text}");
                assert!(
                    text.contains(&format!("content-length: {}\n", body.len())),
                    "{text}"
                );
            }
            None => assert!(!text.contains("body:"), "{text}"),
        }
    }
    assert_eq!(counters.conns.load(Ordering::SeqCst), 1);
    let lines = log_lines(&path, 3, "three access log lines").await;
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[0]["bytes_in"], 4);
    assert_eq!(lines[1]["method"], "PUT");
    assert_eq!(lines[1]["bytes_in"], 3);
    assert_eq!(lines[2]["bytes_in"], 0);
}

#[tokio::test]
async fn no_request_is_sent_again_once_it_reached_an_instance_that_closed() {
    // Each connection answers its first request and closes on the next
    // without answering, after the edge wrote it.
    let (edge, counters) = scripted_edge(|conn, n| match n {
        0 => format!("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {conn}").into_bytes(),
        _ => b"<close>".to_vec(),
    })
    .await;
    let mut s = TcpStream::connect(edge.addr).await.expect("connect");
    let get = b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n";
    let post = b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 1\r\n\r\nx";
    let mut replies = Vec::new();
    for req in [&get[..], &post[..], &get[..], &get[..]] {
        s.write_all(req).await.expect("write");
        let (head, body) = read_response(&mut s).await;
        replies.push((head[9..12].to_owned(), body));
    }
    assert_eq!(replies[0], ("200".to_owned(), "conn 0".to_owned()));
    // The POST reached the instance, which closed without an answer: it
    // may have acted on it, so it is not sent again (SPEC §3).
    assert_eq!(replies[1].0, "502", "{replies:?}");
    assert_eq!(replies[2], ("200".to_owned(), "conn 1".to_owned()));
    // The same for a GET: the instance saw it once.
    assert_eq!(replies[3].0, "502", "{replies:?}");
    assert_eq!(counters.requests.load(Ordering::SeqCst), 4);
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn head_answers_and_interim_ones_carry_no_body() {
    let (edge, _) = scripted_edge(|_, n| match n {
        // The answer to HEAD: its length, not its body.
        0 => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
        _ => b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
               HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"
            .to_vec(),
    })
    .await;
    let mut client = edge.client().await;
    let head = Request::head("/")
        .header("host", "app.example.com")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let reply = send(&mut client, head).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-length"], "5");
    assert_eq!(reply.body, "");
    let reply = send(&mut client, get("app.example.com", "/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "final");
}

#[tokio::test]
async fn answers_a_proxy_cannot_pass_on_are_502() {
    // Each answer ends its connection: the next request gets the next one.
    let (edge, counters) = scripted_edge(|conn, _| match conn {
        0 => b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n".to_vec(),
        1 => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n".to_vec(),
        2 => b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        3 => b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
        // A chunked body broken in its first bytes: nothing was sent yet.
        _ => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\nHTTP/1.1 200 OK\r\n\r\n"
            .to_vec(),
    })
    .await;
    let mut client = edge.client().await;
    for i in 0..5 {
        let reply = send(&mut client, get("app.example.com", "/")).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "answer {i}");
        assert_eq!(reply.body, "bad gateway");
    }
    assert_eq!(counters.conns.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn an_error_answer_to_head_has_no_body() {
    let g = group(
        "gone",
        "gone.example.com",
        vec![http_port(PORT, 1)],
        &[("x", refused(4))],
    );
    let edge = Edge::start(vec![g], settings()).await;
    let mut client = edge.client().await;
    let head = Request::head("/")
        .header("host", "gone.example.com")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let reply = send(&mut client, head).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.headers["content-length"], "11");
    // The same connection answers the next request as its own: no body
    // of the HEAD's answer was left on it.
    let reply = send(&mut client, get("gone.example.com", "/")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.body, "bad gateway");
}

#[tokio::test]
async fn a_client_gone_in_the_middle_of_a_body_ends_its_request() {
    // Half a body, then nothing: the request ends only if the client's
    // leaving is seen.
    let (edge, _) = scripted_edge(|_, _| {
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec()
    })
    .await;
    let a = edge.backend("a");
    let (mut stream, head) = raw_request(
        edge.addr,
        b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let mut part = [0u8; 10];
    within(stream.read_exact(&mut part))
        .await
        .expect("the first chunk");
    assert_eq!(a.local_inflight(), 1);
    drop(stream);
    eventually("the request to end", || a.local_inflight() == 0).await;
}

#[tokio::test]
async fn requests_left_to_hyper_share_the_connection_with_lean_ones() {
    let (edge, counters, _) = one_instance_edge(settings()).await;
    let mut client = edge.client().await;
    let post = Request::post("/upload")
        .header("host", "app.example.com")
        .body(Full::new(Bytes::from_static(b"data")))
        .expect("request");
    let forwarded_by_client = Request::get("/claims")
        .header("host", "app.example.com")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("connection", "keep-alive")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .expect("request");
    for (req, line) in [
        (get("app.example.com", "/one"), "GET /one"),
        (post, "POST /upload"),
        (get("app.example.com", "/two"), "GET /two"),
        (forwarded_by_client, "GET /claims"),
    ] {
        let reply = send(&mut client, req).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.starts_with(line), "{}", reply.body);
        assert!(
            reply.body.contains("x-forwarded-for: 127.0.0.1\n"),
            "{}",
            reply.body
        );
        assert!(
            reply.body.contains("x-forwarded-proto: http\n"),
            "{}",
            reply.body
        );
        assert!(
            reply.body.contains("x-forwarded-host: app.example.com\n"),
            "{}",
            reply.body
        );
        for gone in ["forwarded:", "x-real-ip:", "connection:", "te:"] {
            assert!(!reply.body.contains(gone), "{gone} in {}", reply.body);
        }
        // The instance's hop-by-hop fields stay behind.
        assert_eq!(reply.headers["x-backend"], "a");
        assert!(!reply.headers.contains_key("x-private"));
        assert!(!reply.headers.contains_key("keep-alive"));
    }
    assert!(counters.conns.load(Ordering::SeqCst) <= 2);
}

/// 1 MiB of letters.
fn big_body() -> String {
    (0..1 << 20)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect()
}

/// 1 MiB by its length, then 1 MiB ended by the instance's close.
fn big_answers(_conn: usize, n: usize) -> Vec<u8> {
    let body = big_body();
    match n {
        0 => format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
        _ => format!("HTTP/1.1 200 OK\r\n\r\n{body}<close>"),
    }
    .into_bytes()
}

#[tokio::test]
async fn a_large_answer_arrives_whole_by_length_and_by_close() {
    let (edge, counters) = scripted_edge(big_answers).await;
    let mut client = edge.client().await;
    for framing in ["content-length", "transfer-encoding"] {
        let reply = send(&mut client, get("app.example.com", "/big")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.headers.contains_key(framing), "{:?}", reply.headers);
        assert!(
            reply.body == big_body(),
            "{framing}: {} bytes",
            reply.body.len()
        );
    }
    assert_eq!(counters.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn lean_requests_are_logged_with_their_fields() {
    let (port, mut ls) = listeners(1).await;
    let (ip, l) = ls.pop().expect("listener");
    echo_backend(l, "a");
    let (edge, _dir, path) = logged_edge(port, ip, settings()).await;
    let mut client = edge.client().await;
    let first = send(&mut client, get("app.example.com", "/lean?q=1")).await;
    let second = send(&mut client, get("app.example.com", "/again")).await;
    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );

    let lines = log_lines(&path, 2, "two access log lines").await;
    let (one, two) = (&lines[0], &lines[1]);
    assert_served_on_a_new_connection(one, "GET", "/lean?q=1", 0, first.body.len());
    assert_eq!(two["path"], "/again");
    assert!(two["connect_ms"].is_null(), "a pooled connection: {two}");
    assert_eq!(two["bytes_out"], second.body.len());
}

/// An HTTP/2 connection to `edge` (prior knowledge).
async fn h2_client(edge: &Edge) -> H2Sender {
    h2_connect(edge).await.0
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 connection to `edge` (prior knowledge), and the task driving
/// it: the connection closes when the task is aborted, and the task ends
/// with the connection.
async fn h2_connect(edge: &Edge) -> (H2Sender, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = TcpStream::connect(edge.addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

/// One request on an HTTP/2 connection: the answer's head, and its body
/// read whole.
async fn h2_exchange(
    sender: &mut H2Sender,
    method: Method,
    uri: &str,
) -> (http::response::Parts, Bytes) {
    within(sender.ready()).await.expect("ready");
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within(sender.send_request(req)).await.expect("response");
    let (head, body) = resp.into_parts();
    let got = within(body.collect()).await.expect("body").to_bytes();
    (head, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_are_decoded_from_every_framing() {
    let (edge, counters) = scripted_edge(|conn, n| match n {
        0 => b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\n\r\nlength"
            .to_vec(),
        1 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nchu\r\n4;x=y\r\nnked\r\n0\r\nx-t: 1\r\n\r\n"
            .to_vec(),
        2 => b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        _ => format!("HTTP/1.1 200 OK\r\n\r\nclose {conn}<close>").into_bytes(),
    })
    .await;
    let a = edge.backend("a");
    let mut sender = h2_client(&edge).await;
    for (status, body) in [
        (StatusCode::OK, "length"),
        (StatusCode::OK, "chunked"),
        (StatusCode::NO_CONTENT, ""),
        (StatusCode::OK, "close 0"),
        (StatusCode::OK, "length"),
    ] {
        let (resp, got) = h2_exchange(&mut sender, Method::GET, "http://app.example.com/").await;
        assert_eq!(resp.status, status);
        assert!(!resp.headers.contains_key("x-hop"));
        assert!(!resp.headers.contains_key("transfer-encoding"));
        assert_eq!(String::from_utf8_lossy(&got), body);
    }
    // One connection for the first four answers (the fourth ends at its
    // close), a new one for the fifth.
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
    eventually("requests to end", || a.local_inflight() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_large_answers_arrive_whole() {
    let (edge, _) = scripted_edge(big_answers).await;
    let mut sender = h2_client(&edge).await;
    for _ in 0..2 {
        let (resp, got) = h2_exchange(&mut sender, Method::GET, "http://app.example.com/big").await;
        assert_eq!(resp.status, StatusCode::OK);
        assert!(got == big_body().as_bytes(), "{} bytes", got.len());
    }
}

/// Answers without a body, one per upstream connection but the last two:
/// a 304 with bytes after it, a HEAD's, and a status with its own phrase.
fn bodiless_answers(conn: usize, n: usize) -> Vec<u8> {
    match (conn, n) {
        (0, _) => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
        (_, 0) => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
        _ => b"HTTP/1.1 299 Custom Thing\r\ncontent-length: 2\r\n\r\nok".to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_without_a_body_end_at_their_head() {
    let (edge, counters) = scripted_edge(bodiless_answers).await;
    let a = edge.backend("a");
    let mut sender = h2_client(&edge).await;
    for (method, status, length, body) in [
        (Method::GET, 304, Some("5"), ""),
        (Method::HEAD, 200, Some("5"), ""),
        (Method::GET, 299, Some("2"), "ok"),
    ] {
        let (resp, got) = h2_exchange(&mut sender, method.clone(), "http://app.example.com/").await;
        assert_eq!(resp.status, status, "{method}");
        let got_length = resp
            .headers
            .get("content-length")
            .map(|v| v.to_str().expect("ascii").to_owned());
        assert_eq!(got_length.as_deref(), length, "{method} {status}");
        assert_eq!(String::from_utf8_lossy(&got), body);
    }
    // The bytes after the 304 cost its connection; the HEAD's was reused.
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
    eventually("requests to end", || a.local_inflight() == 0).await;
}

#[tokio::test]
async fn http1_answers_without_a_body_end_at_their_head() {
    let (edge, counters) = scripted_edge(bodiless_answers).await;
    let (mut stream, head) = raw_request(
        edge.addr,
        b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{head}");
    stream
        .write_all(b"HEAD / HTTP/1.1\r\nhost: app.example.com\r\n\r\n")
        .await
        .expect("write");
    let head = within(read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n")
        .await
        .expect("write");
    // Nothing of the 304's extra bytes, nor a HEAD body, came before it.
    let head = within(read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 299 Custom Thing\r\n"), "{head}");
    let mut body = [0u8; 2];
    within(stream.read_exact(&mut body)).await.expect("body");
    assert_eq!(&body, b"ok");
    assert_eq!(counters.conns.load(Ordering::SeqCst), 2);
}

/// An HTTP/2 connection's streams run in its task: all of them at once,
/// each answer streaming on its own, and the instance counts each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_of_one_connection_are_served_at_once() {
    const STREAMS: usize = 8;
    let (edge, mut heads, a) = app_edge(streaming_backend).await;
    let sender = h2_client(&edge).await;
    let mut answers = Vec::new();
    for i in 0..STREAMS {
        let mut sender = sender.clone();
        answers.push(tokio::spawn(async move {
            let req = Request::get(format!("http://app.example.com/{i}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let resp = sender.send_request(req).await.expect("response");
            resp.into_body().collect().await.expect("body").to_bytes()
        }));
    }
    // Every request reached the instance before any answer ended.
    let mut bodies = Vec::new();
    for _ in 0..STREAMS {
        bodies.push(
            within(heads.recv())
                .await
                .expect("request reached the backend"),
        );
    }
    assert_eq!(a.local_inflight(), STREAMS as u64);
    // Ended last to first: each stream's answer stands alone.
    for (n, chunks) in bodies.into_iter().enumerate().rev() {
        chunks
            .send(Bytes::from(format!("answer {n}")))
            .await
            .expect("send");
    }
    let mut got = Vec::new();
    for answer in answers {
        got.push(String::from_utf8_lossy(&within(answer).await.expect("join")).into_owned());
    }
    got.sort();
    let want: Vec<String> = (0..STREAMS).map(|n| format!("answer {n}")).collect();
    assert_eq!(got, want);
    eventually("requests to end", || a.local_inflight() == 0).await;
}

/// A request whose HTTP/2 connection ends mid-answer is dropped with it:
/// the instance's count and its upstream connection are released at once,
/// not when the instance finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_end_with_their_connection() {
    let (edge, mut heads, a) = app_edge(streaming_backend).await;
    let (mut sender, driver) = h2_connect(&edge).await;
    let req = Request::get("http://app.example.com/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within(sender.send_request(req)).await.expect("head");
    let chunks = within(heads.recv())
        .await
        .expect("request reached the backend");
    chunks.send(Bytes::from("part")).await.expect("send");
    assert_eq!(a.local_inflight(), 1);
    // The client goes away: its socket closes with the driver.
    driver.abort();
    drop((sender, resp));
    eventually("request released", || a.local_inflight() == 0).await;
    within(chunks.closed()).await;
}

/// One HTTP/2 frame: its 9-byte header, then `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// An HPACK field without indexing, named by static table index (< 15).
fn hpack_field(index: u8, value: &str) -> Vec<u8> {
    let mut field = vec![index, u8::try_from(value.len()).expect("short value")];
    field.extend(value.as_bytes());
    field
}

/// Streams that hyper accepts in the poll that ends their connection are
/// never started, and they must not outlive it: each holds a clone of the
/// executor that queued it. A `CONNECT` with a body ends the connection in
/// hyper's accept loop, just after the `GET` sent before it was accepted.
#[tokio::test]
async fn http2_streams_queued_as_their_connection_ends_are_freed() {
    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    let (edge, _heads, a) = app_edge(streaming_backend).await;
    // The accept loop's and the test's own: no connection open.
    let idle = Arc::strong_count(&edge.dp);

    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // GET http://app.example.com/ (static entries 2, 6 and 4, then the
    // authority, index 1).
    let mut get = vec![0x82, 0x86, 0x84];
    get.extend(hpack_field(1, "app.example.com"));
    out.extend(h2_frame(HEADERS, END_STREAM | END_HEADERS, 1, &get));
    // CONNECT app.example.com:443 with `content-length: 5` (index 28,
    // past the 4-bit prefix: 15 + 13).
    let mut connect = hpack_field(2, "CONNECT");
    connect.extend(hpack_field(1, "app.example.com:443"));
    connect.extend([0x0f, 0x0d, 1, b'5']);
    out.extend(h2_frame(HEADERS, END_HEADERS, 3, &connect));

    let mut client = TcpStream::connect(edge.addr).await.expect("connect");
    client.write_all(&out).await.expect("write");
    // The node ends the connection.
    let mut rest = Vec::new();
    within(client.read_to_end(&mut rest)).await.expect("read");
    eventually("the connection's state to be freed", || {
        Arc::strong_count(&edge.dp) <= idle
    })
    .await;
    assert_eq!(a.local_inflight(), 0);
}
