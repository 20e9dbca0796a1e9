//! Backends that tests attach as instances.
//!
//! [`HttpBackend`] is a small hyper HTTP/1.1 server that answers with its own
//! name (body and `x-backend` header; `x-target` echoes the request
//! target), records what it was sent, counts accepted TCP connections, and
//! can hold requests:
//!
//! | path | answer |
//! | --- | --- |
//! | `/slow` | waits until the test calls [`HttpBackend::release`] |
//! | `/sleep/<ms>` | waits that long |
//! | `/stream` | body `first\n` at once, `last\n` after a release |
//! | `/upload` | reads the body, counting bytes as they arrive; answers the total |
//! | `/big/<n>` | `n` bytes of `x` |
//! | `/upgrade` | `101` to the requested `Upgrade`, then line echo tagged with the name |
//! | `/early/<status>` | that status at once, before reading the request body, which it then reads and discards (nginx's `return`) |
//! | `/refuse/<status>` | that status at once; the request body is left unread (the connection stays open) until a release |
//! | anything else | the name at once |
//!
//! [`EchoBackend`] is a line-based TCP echo server that prefixes every reply
//! with its name.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Channel, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What an [`HttpBackend`] was sent.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    /// The TCP peer (the node's upstream connection).
    pub peer: SocketAddr,
}

#[derive(Debug)]
struct HttpShared {
    name: String,
    connections: AtomicUsize,
    open: AtomicUsize,
    requests: AtomicUsize,
    held: AtomicUsize,
    /// Requests whose handler runs right now (`/sleep/<ms>` ones included).
    busy: AtomicUsize,
    /// Request body bytes received on `/upload`.
    uploaded: AtomicUsize,
    /// Upgraded connections open.
    upgraded: AtomicUsize,
    /// Bumped by `release`; a held request waits for a bump after its arrival.
    gate: watch::Sender<u64>,
    /// The newest [`SEEN_KEPT`] requests.
    seen: Mutex<VecDeque<Seen>>,
    /// The status `/healthz` answers (200 until set).
    health: std::sync::atomic::AtomicU16,
}

/// How many requests an [`HttpBackend`] remembers (so that load runs do not
/// grow the test's memory).
pub const SEEN_KEPT: usize = 10_000;

/// An HTTP/1.1 backend on a fixed address.
#[derive(Debug)]
pub struct HttpBackend {
    shared: Arc<HttpShared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl HttpBackend {
    /// Serves on `addr` as `name`.
    pub async fn start(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with_idle_close(name, addr, None).await
    }

    /// Like [`HttpBackend::start`], but closes keep-alive connections that
    /// wait `idle_close` for their next request (as servers with a
    /// keep-alive timeout do).
    pub async fn start_with_idle_close(
        name: &str,
        addr: SocketAddr,
        idle_close: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding backend {name} on {addr}"))?;
        let shared = Arc::new(HttpShared {
            name: name.to_owned(),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            uploaded: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            gate: watch::Sender::new(0),
            seen: Mutex::new(VecDeque::new()),
            health: std::sync::atomic::AtomicU16::new(200),
        });
        let accept = tokio::spawn(http_accept_loop(listener, shared.clone(), idle_close));
        Ok(Self {
            shared,
            addr,
            accept,
        })
    }

    /// Its name (also its answer).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// TCP connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests in progress right now (until their answer's headers are
    /// sent): the instance's true in-flight count.
    pub fn busy(&self) -> usize {
        self.shared.busy.load(Ordering::SeqCst)
    }

    /// Requests being held right now (`/slow`).
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Request body bytes received on `/upload` so far (counted as they
    /// arrive, before the body is complete).
    pub fn uploaded(&self) -> usize {
        self.shared.uploaded.load(Ordering::SeqCst)
    }

    /// Upgraded (`/upgrade`) connections open right now.
    pub fn upgraded(&self) -> usize {
        self.shared.upgraded.load(Ordering::SeqCst)
    }

    /// Lets every request held right now answer.
    pub fn release(&self) {
        self.shared.gate.send_modify(|g| *g += 1);
    }

    /// Every request received (the newest [`SEEN_KEPT`]), oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The newest request received.
    pub fn last_seen(&self) -> Option<Seen> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .back()
            .cloned()
    }

    /// Makes `/healthz` answer `status` from now on.
    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// Stops accepting (existing connections stay).
    pub fn stop_accepting(&self) {
        self.accept.abort();
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.accept.abort();
        // Held requests must not outlive the test's assertions.
        self.release();
    }
}

async fn http_accept_loop(
    listener: TcpListener,
    shared: Arc<HttpShared>,
    idle_close: Option<Duration>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _open = Held::new(&shared.open);
            let per_request = shared.clone();
            let svc = service_fn(move |req| answer(req, peer, per_request.clone()));
            let mut builder = hyper::server::conn::http1::Builder::new();
            if let Some(idle) = idle_close {
                // hyper's header read timeout also runs while a keep-alive
                // connection waits for its next request.
                builder.timer(TokioTimer::new()).header_read_timeout(idle);
            }
            let _ = builder
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

async fn answer(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<HttpShared>,
) -> Result<Response<Body>, Infallible> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let _busy = Held::new(&shared.busy);
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    {
        let mut seen = shared.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= SEEN_KEPT {
            seen.pop_front();
        }
        seen.push_back(Seen {
            method: req.method().clone(),
            target: target.clone(),
            headers: req.headers().clone(),
            peer,
        });
    }
    let path = req.uri().path().to_owned();
    let body = match path.as_str() {
        "/healthz" => {
            let code = shared.health.load(Ordering::SeqCst);
            let mut resp = Response::new(full(format!("{code}\n")));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            return Ok(resp);
        }
        "/slow" => {
            let mut gate = shared.gate.subscribe();
            let arrived = *gate.borrow_and_update();
            let _held = Held::new(&shared.held);
            let _ = gate.wait_for(|g| *g > arrived).await;
            full(shared.name.clone())
        }
        "/stream" => stream_body(&shared),
        "/upload" => {
            let mut total = 0_usize;
            let mut body = req.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    shared.uploaded.fetch_add(data.len(), Ordering::SeqCst);
                }
            }
            full(total.to_string())
        }
        "/upgrade" => return Ok(upgrade(&mut req, &shared)),
        p if p.starts_with("/early/") || p.starts_with("/refuse/") => {
            let (_, code) = p[1..].split_once('/').unwrap_or_default();
            let status = code
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::UNAUTHORIZED);
            let mut body = req.into_body();
            let discard = p.starts_with("/early/");
            let mut gate = shared.gate.subscribe();
            let arrived = *gate.borrow_and_update();
            tokio::spawn(async move {
                if discard {
                    while let Some(Ok(_)) = body.frame().await {}
                } else {
                    let _ = gate.wait_for(|g| *g > arrived).await;
                    drop(body);
                }
            });
            let mut resp = Response::new(full(status.as_str().to_owned()));
            *resp.status_mut() = status;
            return Ok(resp);
        }
        p if p.starts_with("/big/") => {
            let n = p["/big/".len()..].parse::<usize>().unwrap_or(0);
            full(vec![b'x'; n])
        }
        p => {
            if let Some(ms) = p
                .strip_prefix("/sleep/")
                .and_then(|ms| ms.parse::<u64>().ok())
            {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            full(shared.name.clone())
        }
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&shared.name) {
        h.insert("x-backend", v);
    }
    if let Ok(v) = HeaderValue::from_str(&target) {
        h.insert("x-target", v);
    }
    Ok(resp)
}

/// `first\n` at once, then `last\n` once the test releases the gate.
fn stream_body(shared: &Arc<HttpShared>) -> Body {
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(2);
    let shared = shared.clone();
    let mut gate = shared.gate.subscribe();
    let arrived = *gate.borrow_and_update();
    tokio::spawn(async move {
        let _held = Held::new(&shared.held);
        if tx.send_data(Bytes::from_static(b"first\n")).await.is_err() {
            return;
        }
        let _ = gate.wait_for(|g| *g > arrived).await;
        let _ = tx.send_data(Bytes::from_static(b"last\n")).await;
    });
    body.boxed()
}

/// `101 Switching Protocols` to the requested protocol, then line echo on
/// the upgraded connection.
fn upgrade(req: &mut Request<Incoming>, shared: &Arc<HttpShared>) -> Response<Body> {
    let Some(proto) = req.headers().get(UPGRADE).cloned() else {
        let mut resp = Response::new(full("upgrade header missing"));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return resp;
    };
    let on_upgrade = hyper::upgrade::on(req);
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let _open = Held::new(&shared.upgraded);
            let _ = echo(TokioIo::new(upgraded), &shared.name).await;
        }
    });
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut().insert(UPGRADE, proto);
    resp
}

/// Counts a held request (or an open upgraded connection) until it ends.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct EchoShared {
    name: String,
    accepted: AtomicUsize,
    open: AtomicUsize,
}

/// A TCP echo backend: every line `l` is answered with `<name> <l>`.
#[derive(Debug)]
pub struct EchoBackend {
    shared: Arc<EchoShared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl EchoBackend {
    /// Serves on `addr` as `name`.
    pub async fn start(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding echo {name} on {addr}"))?;
        let shared = Arc::new(EchoShared {
            name: name.to_owned(),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(echo_accept_loop(listener, shared.clone()));
        Ok(Self {
            shared,
            addr,
            accept,
        })
    }

    /// Its name (the tag on its replies).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn echo_accept_loop(listener: TcpListener, shared: Arc<EchoShared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = echo(stream, &shared.name).await;
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn echo<S: AsyncRead + AsyncWrite>(stream: S, name: &str) -> std::io::Result<()> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await? {
        wr.write_all(format!("{name} {line}\n").as_bytes()).await?;
    }
    Ok(())
}

/// A line-oriented client for [`EchoBackend`]s (through the node).
#[derive(Debug)]
pub struct EchoClient<S> {
    lines: tokio::io::Lines<BufReader<tokio::io::ReadHalf<S>>>,
    wr: tokio::io::WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite> EchoClient<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        Self {
            lines: BufReader::new(rd).lines(),
            wr,
        }
    }

    /// Sends `line` and returns the name of the backend that echoed it.
    pub async fn who(&mut self, line: &str) -> anyhow::Result<String> {
        self.wr.write_all(format!("{line}\n").as_bytes()).await?;
        self.wr.flush().await?;
        let reply = crate::within(
            "an echo reply",
            Duration::from_secs(5),
            self.lines.next_line(),
        )
        .await??
        .context("connection closed instead of echoing")?;
        let (name, echoed) = reply.split_once(' ').context("untagged echo reply")?;
        anyhow::ensure!(echoed == line, "echo of {line:?} came back as {echoed:?}");
        Ok(name.to_owned())
    }

    /// Waits until the other side closes the connection (EOF or reset).
    pub async fn closed(&mut self, timeout: Duration) -> anyhow::Result<()> {
        crate::within("the connection to close", timeout, async {
            while let Ok(Some(_)) = self.lines.next_line().await {}
        })
        .await
    }
}
