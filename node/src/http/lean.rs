//! The lean path: the plainest HTTP/1.1 requests proxied without hyper.
//!
//! Most requests an edge proxy sees are `GET`s and `HEAD`s without a body
//! (or small `POST`s) on a kept-alive connection. For those, hyper's server
//! and client (a `Request` and a `Response` built and taken apart, a header
//! map filled and hashed twice, a dispatcher and a channel on each side)
//! cost more than the rest of the request's user-space work together. This
//! path reads such a request's head (and body) straight from the bytes the
//! connection already holds, writes the instance both in one buffer, and passes
//! the answer back as it comes, its head rewritten and its body as sent
//! (a body that ends at the connection's close is sent chunked).
//!
//! It takes a request only when all of this holds, and otherwise hands the
//! connection, its bytes untouched, to hyper (`crate::http::serve_h1`),
//! which serves everything:
//!
//! - the whole head is already read, within `max_header_bytes` and 100
//!   fields; any method but `CONNECT`, HTTP/1.1, origin-form target;
//! - exactly one `Host`; no body, or one whose `Content-Length` (one
//!   value) says it is already read whole with the head (a small `POST`,
//!   say: no `Transfer-Encoding`); no `Upgrade`, no `Expect`;
//!   `Connection` absent or `keep-alive`;
//! - the port proxies (not a redirect) and routes the host to a group;
//! - the connection is not closing.
//!
//! The request means the same either way: hop-by-hop fields are dropped,
//! `X-Forwarded-For`/`-Proto`/`-Host` set, `Forwarded` and `X-Real-IP`
//! removed (a trusted proxy's kept, its `X-Forwarded-For` added to), the
//! same instance selection, retries of connections that fail before
//! anything is sent, timeouts, metrics, access log lines and error
//! answers. A
//! connection from the pool that turns out to be closed is replaced by a
//! new one and the request sent again only when nothing of it could be
//! written (SPEC §3: nothing is retried once a request byte has reached
//! an instance), as hyper's path does.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

pub(super) mod stream;

use super::conn::{ActiveGuard, Conn, TimedIo};
use super::error::ProxyError;
use super::headers::is_hop_by_hop;
use super::log::{Log, Record};
use super::reply::{CLIENT_LEFT, Done, Framing, MAX_READ, Progress, READ_CHUNK};
use crate::balancer::Lease;
use crate::dataplane::Attempts;
use crate::routing::Target;
use crate::upstream::{ParkedConn, Pool};

/// Header fields a head may have, request or response (hyper's limit).
const MAX_FIELDS: usize = 100;

/// Largest response head read from an instance (hyper's client allows as
/// much).
const MAX_RESPONSE_HEAD: usize = 8 * 1024 + 100 * 4096;

/// What became of the connection's next request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lean {
    /// Answered; the connection can take the next request.
    Served,
    /// Not one for this path: hyper takes the connection, bytes unread.
    Hyper,
    /// The response could not be completed: the connection must close.
    Close,
}

/// Serves the request at the front of `io`'s unread bytes, if it is one
/// this path takes.
pub(crate) async fn serve<I>(io: &mut TimedIo<I>, conn: &Arc<Conn>) -> Lean
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // A closing connection's last answer says so: hyper's path writes it.
    if closing(conn) {
        return Lean::Hyper;
    }
    let Some(req) = Request::parse(io.unread_bytes(), conn) else {
        return Lean::Hyper;
    };
    // A park asked for while the connection waited is stale now.
    conn.take_park();
    let mut log = req.record(io.unread_bytes(), conn);
    io.consume_unread(req.len);
    let guard = ActiveGuard::new(conn);
    io.follow_requests();
    // Pinned here and lent: a future passed by value would be stored twice
    // in this one (the argument and the pinned copy), and moved.
    let served = {
        let proxying = std::pin::pin!(proxy(io, conn, &req, &mut log));
        within_drain(conn, proxying).await
    };
    drop(guard);
    io.follow_requests();
    match served {
        Ok(keep_open) => match io.flush().await {
            Ok(()) if keep_open => Lean::Served,
            _ => Lean::Close,
        },
        Err(Cut) => Lean::Close,
    }
}

/// `fut`, given up (a cut) when the connection is asked to close (the node
/// shuts down) and has not finished within the drain timeout, as hyper's
/// graceful shutdown in `super::drive` is.
async fn within_drain<F>(conn: &Conn, mut fut: Pin<&mut F>) -> Result<bool, Cut>
where
    F: Future<Output = Result<bool, Cut>>,
{
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| {
        conn.set_waker(cx.waker());
        if let Poll::Ready(res) = fut.as_mut().poll(cx) {
            return Poll::Ready(res);
        }
        if deadline.is_none() && conn.close_requested() {
            deadline = Some(Box::pin(tokio::time::sleep(conn.dp.settings.drain_timeout)));
        }
        if let Some(d) = deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            debug!("graceful shutdown timed out");
            return Poll::Ready(Err(Cut));
        }
        Poll::Pending
    })
    .await
}

/// A request this path takes, ready for an instance.
struct Request {
    /// Bytes of the client's head and body.
    len: usize,
    /// Bytes of the body.
    body_len: usize,
    method: Method,
    /// The head sent to the instance, and the body after it.
    upstream_head: Vec<u8>,
    target: Target,
    /// The target, checked as hyper checks it; for the access log.
    path: PathAndQuery,
    /// Where the `Host` value is in the client's head, for the access log.
    host: Range<usize>,
}

/// Request fields the node sets or removes, besides the hop-by-hop ones
/// (see `super::headers`).
const REWRITTEN: [&str; 6] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
    "host",
];

impl Request {
    /// The request at the front of `bytes`, when this path takes it.
    fn parse(bytes: &[u8], conn: &Conn) -> Option<Self> {
        if bytes.is_empty() {
            return None;
        }
        // Left uninitialized: only what the parser fills is read.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut []);
        let Ok(httparse::Status::Complete(head_len)) =
            req.parse_with_uninit_headers(bytes, &mut fields)
        else {
            return None;
        };
        if head_len > conn.dp.settings.max_header_bytes || req.version != Some(1) {
            return None;
        }
        let method = req.method?;
        if method == "CONNECT" {
            return None;
        }
        let path = req.path?;
        // What hyper would refuse (400) or cut (a fragment) is hyper's.
        if !path.starts_with('/') || path.contains('#') {
            return None;
        }
        let checked_path = PathAndQuery::try_from(path).ok()?;
        let mut host = None;
        let mut body_len: Option<usize> = None;
        for field in req.headers.iter() {
            let name = field.name;
            if name.eq_ignore_ascii_case("host") {
                if host.is_some() {
                    return None;
                }
                // An invalid one is hyper's path's to refuse (400).
                if !super::headers::valid_host_field(field.value) {
                    return None;
                }
                host = Some(std::str::from_utf8(field.value).ok()?);
            } else if name.eq_ignore_ascii_case("content-length") {
                // One value, digits only (anything else is hyper's to judge).
                let value = std::str::from_utf8(field.value).ok()?;
                if body_len.is_some()
                    || value.is_empty()
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                body_len = Some(value.parse().ok()?);
            } else if name.eq_ignore_ascii_case("connection") {
                if !field.value.eq_ignore_ascii_case(b"keep-alive") {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case("expect")
            {
                return None;
            }
        }
        let host = host?;
        let body_len = body_len.unwrap_or(0);
        // The body must be here already, whole: it goes out with the head.
        if bytes.len() - head_len < body_len {
            return None;
        }
        let target = {
            let table = conn.dp.routes.load();
            let port = table.port(conn.info.port)?;
            if port.redirect {
                return None;
            }
            table.target(port, Some(host))?
        };
        let mut head = Vec::with_capacity(head_len + body_len + 128);
        head.extend_from_slice(method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(host.as_bytes());
        head.extend_from_slice(b"\r\n");
        // A trusted proxy's claims are kept, its X-Forwarded-For added to.
        let mut claimed: Option<Vec<u8>> = None;
        for field in req.headers.iter() {
            let name = field.name;
            if conn.trusted {
                if name.eq_ignore_ascii_case("x-forwarded-for") {
                    let list = claimed.get_or_insert_with(Vec::new);
                    if !list.is_empty() {
                        list.extend_from_slice(b", ");
                    }
                    list.extend_from_slice(field.value);
                    continue;
                }
                if name.eq_ignore_ascii_case("forwarded") || name.eq_ignore_ascii_case("x-real-ip")
                {
                    put_field(&mut head, name.as_bytes(), field.value);
                    continue;
                }
            }
            if is_hop_by_hop(name) || REWRITTEN.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                continue;
            }
            put_field(&mut head, name.as_bytes(), field.value);
        }
        match claimed {
            Some(mut list) => {
                list.extend_from_slice(b", ");
                list.extend_from_slice(conn.client_ip.as_bytes());
                put_field(&mut head, b"x-forwarded-for", &list);
            }
            None => put_field(&mut head, b"x-forwarded-for", conn.client_ip.as_bytes()),
        }
        put_field(&mut head, b"x-forwarded-proto", conn.proto.as_bytes());
        put_field(&mut head, b"x-forwarded-host", host.as_bytes());
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&bytes[head_len..head_len + body_len]);
        Some(Self {
            len: head_len + body_len,
            body_len,
            method: Method::from_bytes(method.as_bytes()).ok()?,
            upstream_head: head,
            target,
            path: checked_path,
            host: range_in(bytes, host.as_bytes()),
        })
    }

    /// `HEAD`: the response has no body, whatever its head says.
    fn head_only(&self) -> bool {
        self.method == Method::HEAD
    }

    /// The request's access log record, when the log samples it; `bytes`
    /// is the client's head.
    fn record(&self, bytes: &[u8], conn: &Arc<Conn>) -> Log {
        let path = Some(self.path.clone());
        let mut record =
            Record::start_with(conn, self.method.clone(), Version::HTTP_11, path, false)?;
        record.bytes_in = self.body_len as u64;
        record.host = HeaderValue::from_bytes(&bytes[self.host.clone()]).ok();
        record.group = Some(self.target.group.clone());
        Some(record)
    }
}

/// What this path would send an instance for the request at the front of
/// `bytes` on `conn`, if it takes it: the bytes it takes (head and body)
/// and what the instance gets (head, then body). For the fuzz target.
#[doc(hidden)]
pub(crate) fn taken(bytes: &[u8], conn: &Conn) -> Option<(usize, Vec<u8>)> {
    Request::parse(bytes, conn).map(|req| (req.len, req.upstream_head))
}

/// Where `part`, a slice of `whole`, is in it.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// Appends `name: value` (the name lowercased, as hyper sends it).
fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let start = out.len();
    out.extend_from_slice(name);
    out[start..].make_ascii_lowercase();
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The response to the client broke off: the connection must close.
struct Cut;

async fn proxy<I>(
    io: &mut TimedIo<I>,
    conn: &Arc<Conn>,
    req: &Request,
    log: &mut Log,
) -> Result<bool, Cut>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let exchanged = {
        let exchanging = std::pin::pin!(exchange(conn, &req.target, &req.upstream_head, log));
        until_client_leaves(io, exchanging).await
    };
    match exchanged {
        Some(Ok(got)) => respond(io, conn, req, got).await,
        Some(Err(error)) => answer_error(io, conn, &error, req.head_only(), log.take()).await,
        // Dropping the exchange ends the request's in-flight count.
        None => Err(Cut),
    }
}

/// `fut`, or `None` if the client closes its connection (or it fails)
/// first, as hyper gives up a request whose client is gone. Bytes the
/// client sends meanwhile (its next request) stay unread.
async fn until_client_leaves<I, F>(io: &mut TimedIo<I>, mut fut: Pin<&mut F>) -> Option<F::Output>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Future,
{
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if io.has_unread() {
            return Poll::Pending;
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); 1024];
        let mut read = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                io.unread(Bytes::copy_from_slice(read.filled()));
                Poll::Pending
            }
            Poll::Ready(_) => {
                debug!("the client went away before the response");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// An instance's response head, and what the response needs to go on.
struct Exchanged {
    head: Head,
    up: ParkedConn,
    /// What was read from the instance: the head and what followed it.
    buf: Vec<u8>,
    /// What ends the request (the access log record taken along).
    done: Done,
}

/// Picks an instance, sends the request and reads the response head,
/// trying other instances while connecting fails. A pooled connection
/// that turns out closed is replaced by a new one and the request sent
/// again only when none of it could be written: nothing is retried once
/// a request byte has reached an instance (SPEC §3), a `GET` included.
async fn exchange(
    conn: &Conn,
    target: &Target,
    upstream_head: &[u8],
    log: &mut Log,
) -> Result<Exchanged, ProxyError> {
    let settings = &conn.dp.settings;
    let mut tries = Attempts::new(target);
    loop {
        let (lease, pool) = tries.next().map_err(ProxyError::from)?;
        let start = Instant::now();
        let backend = lease.backend();
        if let Some(record) = log.as_deref_mut() {
            record.attempts = tries.made();
            record.instance = Some(backend.clone());
            record.connect = None;
        }
        let idle =
            poll_fn(|cx| Poll::Ready(pool.checkout_socket(settings.pool_idle_timeout, start, cx)))
                .await;
        let mut reused = idle.is_some();
        let mut up = match idle {
            Some(up) => up,
            None => match connect(&pool, &lease, conn, log).await {
                Ok(up) => up,
                Err(error) => {
                    tries.failed(lease, error);
                    continue;
                }
            },
        };
        let mut buf = Vec::with_capacity(READ_CHUNK);
        // The connection's own timer: one per request would be put into the
        // timer wheel and taken out again each time.
        let mut deadline = up.take_deadline();
        let head = loop {
            deadline.disarm();
            // Whether any of the request left: then it may have reached
            // the instance.
            let mut left = false;
            let sent = {
                let mut sending = std::pin::pin!(async {
                    write_up(&mut up, upstream_head, &mut left).await?;
                    read_head(&mut up, &mut buf).await
                });
                poll_fn(|cx| match sending.as_mut().poll(cx) {
                    Poll::Ready(res) => Poll::Ready(Some(res)),
                    Poll::Pending => deadline.poll(cx, settings.upstream_timeout).map(|()| None),
                })
                .await
            };
            match sent {
                Some(Ok(head)) => break Ok(head),
                // An idle connection the instance had closed before any of
                // the request left: sent again on a new one.
                Some(Err(UpErr::Closed)) if reused && buf.is_empty() && !left => {
                    debug!(instance = %backend.name, "pooled connection closed; reconnecting");
                    reused = false;
                    match connect(&pool, &lease, conn, log).await {
                        Ok(fresh) => up = fresh,
                        Err(error) => break Err(error),
                    }
                }
                Some(Err(error)) => return Err(error.into_proxy().counted(&lease, start)),
                None => return Err(ProxyError::Timeout.counted(&lease, start)),
            }
        };
        match head {
            Ok(head) => {
                up.keep_deadline(deadline);
                if let Some(record) = log.as_deref_mut() {
                    let waited = start.elapsed();
                    record.response =
                        Some(waited.saturating_sub(record.connect.unwrap_or_default()));
                }
                let done = Done {
                    lease,
                    pool,
                    start,
                    status: head.status,
                    log: log.take(),
                };
                return Ok(Exchanged {
                    head,
                    up,
                    buf,
                    done,
                });
            }
            Err(error) => tries.failed(lease, error),
        }
    }
}

/// A new connection to `lease`'s instance, which is marked up; the time
/// it took goes to the access log.
async fn connect(
    pool: &Pool,
    lease: &Lease,
    conn: &Conn,
    log: &mut Log,
) -> Result<ParkedConn, crate::upstream::ConnectError> {
    let backend = lease.backend();
    let began = Instant::now();
    // Boxed: connecting is the rare path and its future is large.
    let up = Box::pin(pool.connect_socket(
        &backend.name,
        &backend.metrics,
        backend.drain_token(),
        conn.dp.settings.connect_timeout,
    ))
    .await?;
    lease.mark_up();
    if let Some(record) = log.as_deref_mut() {
        record.connect = Some(began.elapsed());
    }
    Ok(up)
}

/// Writes the node's own answer for `error`.
async fn answer_error<I>(
    io: &mut TimedIo<I>,
    conn: &Conn,
    error: &ProxyError,
    head_only: bool,
    log: Log,
) -> Result<bool, Cut>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    debug!(%error, side = ?error.side(), status = error.status().as_u16(), "request failed");
    let resp = error.response();
    let mut out = Vec::with_capacity(256);
    put_status_line(&mut out, resp.status().as_u16(), "");
    for (name, value) in resp.headers() {
        put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    let keep_open = !closing(conn);
    if !keep_open {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let body = resp.into_body().into_full();
    // The answer to HEAD has the length of its body, not the body.
    if !head_only {
        out.extend_from_slice(&body);
    }
    if let Some(mut record) = log {
        record.bytes_out = body.len() as u64;
        let why = (error.side().name(), error as &dyn std::fmt::Display);
        record.end(error.status().as_u16(), Some(why), Instant::now());
    }
    io.write_all(&out).await.map_err(|_| Cut)?;
    Ok(keep_open)
}

/// Whether the connection is to close after the response being written:
/// the node shuts down, or drains softly (as hyper's graceful shutdown and
/// `super::forward::handle` say `Connection: close`).
fn closing(conn: &Conn) -> bool {
    conn.close_requested() || conn.closes_after_response()
}

fn put_status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    // The instance's own phrase, as hyper writes it back; else the code's.
    let canonical = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason());
    let reason = if reason.is_empty() {
        canonical.unwrap_or("")
    } else {
        reason
    };
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A status code's three digits.
fn itoa3(n: u16) -> [u8; 3] {
    [
        b'0' + (n / 100 % 10) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// How an exchange with an instance failed.
#[derive(Debug)]
pub(crate) enum UpErr {
    /// The connection ended before a whole response head.
    Closed,
    Io(io::Error),
    /// The instance's answer is not one a proxy can pass on.
    Invalid(&'static str),
    /// The instance answered 101 to a request that asked for no upgrade.
    Upgrade,
    /// The instance was detached and its drain timeout passed.
    Drained,
}

impl UpErr {
    fn into_proxy(self) -> ProxyError {
        match self {
            Self::Closed => ProxyError::UpstreamIo(io::ErrorKind::UnexpectedEof.into()),
            Self::Io(e) => ProxyError::UpstreamIo(e),
            Self::Invalid(why) => {
                ProxyError::UpstreamIo(io::Error::new(io::ErrorKind::InvalidData, why))
            }
            Self::Upgrade => ProxyError::UnexpectedUpgrade,
            Self::Drained => ProxyError::UpstreamIo(io::Error::other("instance drained")),
        }
    }
}

impl std::fmt::Display for UpErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("the instance closed the connection"),
            Self::Io(e) => write!(f, "{e}"),
            Self::Invalid(why) => f.write_str(why),
            Self::Upgrade => f.write_str("unexpected 101"),
            Self::Drained => f.write_str("instance drained"),
        }
    }
}

/// Writes all of `bytes` to the instance; `left` is set as soon as any of
/// them did.
async fn write_up(up: &mut ParkedConn, mut bytes: &[u8], left: &mut bool) -> Result<(), UpErr> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| {
            if up.poll_aborted(cx) {
                return Poll::Ready(Err(UpErr::Drained));
            }
            Pin::new(up.io())
                .poll_write(cx, bytes)
                .map_err(closed_or_io)
        })
        .await?;
        if n == 0 {
            return Err(UpErr::Closed);
        }
        *left = true;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// A write or read error that means the instance had closed the
/// connection.
fn closed_or_io(e: io::Error) -> UpErr {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => UpErr::Closed,
        _ => UpErr::Io(e),
    }
}

/// Reads from the instance, appending to `buf`; 0 at its end.
async fn read_up(up: &mut ParkedConn, buf: &mut Vec<u8>) -> Result<usize, UpErr> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(READ_CHUNK);
    }
    poll_fn(|cx| {
        if up.poll_aborted(cx) {
            return Poll::Ready(Err(UpErr::Drained));
        }
        tokio_util::io::poll_read_buf(Pin::new(up.io()), cx, buf).map_err(closed_or_io)
    })
    .await
}

/// A response head from an instance, parsed.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    /// Bytes of the head at the front of the read buffer.
    pub(crate) len: usize,
    pub(crate) framing: Framing,
    /// The instance closes the connection after this response.
    close: bool,
    /// The instance's reason phrase, when it is not the status code's
    /// own.
    reason: Option<Vec<u8>>,
    /// The fields passed on (not hop-by-hop, nor those `Connection`
    /// names, nor the framing fields of an encoded body): where their names
    /// and values are in the read buffer.
    fields: Vec<(Range<usize>, Range<usize>)>,
}

impl Head {
    /// The fields passed on, as names and values in `buf` (the buffer the
    /// head was parsed from).
    pub(crate) fn fields<'a>(
        &'a self,
        buf: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        self.fields
            .iter()
            .map(|(name, value)| (&buf[name.clone()], &buf[value.clone()]))
    }

    /// The head written to an HTTP/1.1 client: the fields passed on, and
    /// `Transfer-Encoding: chunked` for a body sent chunked.
    pub(crate) fn client_head(&self, buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len + 32);
        let reason = self.reason.as_deref().unwrap_or_default();
        // Not UTF-8 (obs-text): the code's own phrase instead.
        put_status_line(
            &mut out,
            self.status,
            std::str::from_utf8(reason).unwrap_or(""),
        );
        for (name, value) in self.fields(buf) {
            put_field(&mut out, name, value);
        }
        if matches!(self.framing, Framing::Chunked | Framing::Close) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Whether the connection can carry another request once a body
    /// framed as `framing` (this head's, or none for `HEAD`) was read.
    fn keeps_open(&self, framing: Framing) -> bool {
        !self.close && framing != Framing::Close
    }
}

/// Reads the response head (skipping interim 1xx answers) into `buf`.
async fn read_head(up: &mut ParkedConn, buf: &mut Vec<u8>) -> Result<Head, UpErr> {
    loop {
        if let Some(head) = parse_head(buf)? {
            if (100..200).contains(&head.status) && head.status != 101 {
                buf.drain(..head.len);
                continue;
            }
            if head.status == 101 {
                return Err(UpErr::Upgrade);
            }
            return Ok(head);
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(UpErr::Invalid("response head too large"));
        }
        if read_up(up, buf).await? == 0 {
            return Err(UpErr::Closed);
        }
    }
}

/// The response head at the front of `buf`, once whole.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<Head>, UpErr> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialized: only what the parser fills is read.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpErr::Invalid("malformed response head")),
    };
    let status = resp.code.ok_or(UpErr::Invalid("no status"))?;
    let version = resp.version.ok_or(UpErr::Invalid("no version"))?;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    // Fields that `Connection` names are hop-by-hop too; rare.
    let mut named: Vec<&str> = Vec::new();
    for field in resp.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("connection") {
            let value =
                std::str::from_utf8(field.value).map_err(|_| UpErr::Invalid("bad Connection"))?;
            for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    // HTTP/1.0's keep-alive; any `close` wins.
                    keep_alive_token = true;
                } else {
                    named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            let value = std::str::from_utf8(field.value)
                .map_err(|_| UpErr::Invalid("bad Transfer-Encoding"))?;
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9110 §8.6: a list of one value repeated is that value.
            for value in field.value.split(|&b| b == b',') {
                // Trimmed as the value passed on is (`fields` below).
                let value = Some(value.trim_ascii())
                    .filter(|v| !v.is_empty() && v.iter().all(u8::is_ascii_digit))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                    .ok_or(UpErr::Invalid("bad Content-Length"))?;
                if length.is_some_and(|l| l != value) {
                    return Err(UpErr::Invalid("conflicting Content-Length"));
                }
                length = Some(value);
            }
        }
    }
    if version == 0 && !keep_alive_token {
        close = true;
    }
    if status < 100 {
        return Err(UpErr::Invalid("status code below 100"));
    }
    if version == 0 && encoded {
        // RFC 9112 §6.1: faulty framing from an HTTP/1.0 sender.
        return Err(UpErr::Invalid("Transfer-Encoding in an HTTP/1.0 response"));
    }
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    let reason = resp
        .reason
        .filter(|r| {
            let canonical = StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason());
            !r.is_empty() && canonical != Some(*r)
        })
        .map(|r| r.as_bytes().to_vec());
    let mut length_kept = false;
    let no_length = status == 204 || (100..200).contains(&status);
    let mut fields = Vec::with_capacity(resp.headers.len());
    fields.extend(
        resp.headers
            .iter()
            .filter(|field| {
                let name = field.name;
                let is_length = name.eq_ignore_ascii_case("content-length");
                // `Transfer-Encoding` is hop-by-hop (an encoded body goes on
                // chunked, or decoded), and with it a `Content-Length` means
                // nothing. A length said again (checked the same above) is
                // passed on once, and kept even if `Connection` names it: the
                // body is framed by it. A 1xx or 204 has none (RFC 9110
                // §8.6: never sent with those), as hyper's path drops it.
                let keep = !(is_hop_by_hop(name)
                    || (!is_length && named.iter().any(|h| name.eq_ignore_ascii_case(h)))
                    || (is_length && (encoded || length_kept || no_length)));
                length_kept |= keep && is_length;
                keep
            })
            .map(|field| {
                let value = if field.name.eq_ignore_ascii_case("content-length") {
                    // Its one value, not the list.
                    let first = field.value.split(|&b| b == b',').next().unwrap_or_default();
                    first.trim_ascii()
                } else {
                    field.value
                };
                (range_in(buf, field.name.as_bytes()), range_in(buf, value))
            }),
    );
    Ok(Some(Head {
        status,
        len,
        framing,
        close,
        reason,
        fields,
    }))
}

/// Passes the response on to the client and ends the request.
async fn respond<I>(
    io: &mut TimedIo<I>,
    conn: &Conn,
    req: &Request,
    got: Exchanged,
) -> Result<bool, Cut>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Exchanged {
        head,
        mut up,
        mut buf,
        mut done,
    } = got;
    let framing = if req.head_only() {
        Framing::Empty
    } else {
        head.framing
    };
    let mut body = Progress::new(framing);
    // The head and what came with it, in one write.
    let instance_keeps_open = head.keeps_open(framing);
    let mut out = head.client_head(&buf);
    let keep_open = !closing(conn);
    if !keep_open {
        // Before the head's final CRLF.
        out.truncate(out.len() - 2);
        out.extend_from_slice(b"connection: close\r\n\r\n");
    }
    if let Err(why) = body.take(&buf[head.len..], &mut out) {
        // Nothing was sent yet: answered as a failed exchange is.
        let error = ProxyError::UpstreamIo(io::Error::new(io::ErrorKind::InvalidData, why));
        let error = error.counted(&done.lease, done.start);
        let log = done.log.take();
        drop((up, done));
        return answer_error(io, conn, &error, req.head_only(), log).await;
    }
    // Ends the request however this future ends: dropped in the middle of
    // the body (a drain that outlasted its timeout), it is logged with its
    // status, as hyper's path logs a body it drops.
    let mut ending = Ending {
        done: Some(done),
        conn,
        sent: body.sent,
    };
    // Who cut the response off, and why.
    let mut outcome: Result<(), (&'static str, &'static str)> = Ok(());
    if io.write_all(&out).await.is_err() {
        outcome = Err(CLIENT_LEFT);
    }
    while outcome.is_ok() && !body.done() {
        // What was written goes out before waiting on the instance (TLS
        // holds it otherwise).
        if io.flush().await.is_err() {
            outcome = Err(CLIENT_LEFT);
            break;
        }
        // A read that filled the buffer asks for a larger one (a bulk body).
        if buf.len() == buf.capacity() && buf.capacity() < MAX_READ {
            buf.reserve(buf.capacity());
        }
        buf.clear();
        let read = {
            let reading = std::pin::pin!(read_up(&mut up, &mut buf));
            until_client_leaves(io, reading).await
        };
        let Some(read) = read else {
            outcome = Err(CLIENT_LEFT);
            break;
        };
        let n = match read {
            Ok(n) => n,
            Err(UpErr::Drained) => {
                outcome = Err(("internal", "instance drained"));
                break;
            }
            Err(error) => {
                debug!(%error, "upstream body failed");
                outcome = Err(("upstream", "reading the body failed"));
                break;
            }
        };
        let piece = if n == 0 {
            out.clear();
            body.at_close(&mut out).map(|()| &out[..])
        } else if body.passes_through() {
            // Written from the read buffer itself: no copy.
            body.measure(&buf).map(|used| &buf[..used])
        } else {
            out.clear();
            body.take(&buf, &mut out).map(|_| &out[..])
        };
        match piece {
            Ok(piece) => {
                if io.write_all(piece).await.is_err() {
                    outcome = Err(CLIENT_LEFT);
                }
            }
            Err(why) => outcome = Err(("upstream", why)),
        }
        ending.sent = body.sent;
    }
    let reusable = outcome.is_ok() && instance_keeps_open && body.left_over == 0;
    let cut = outcome.as_ref().err().copied();
    if let Some(done) = ending.done.take() {
        done.end(conn, reusable.then_some(up), body.sent, cut);
    }
    match outcome {
        Ok(()) => Ok(keep_open),
        Err((side, why)) => {
            debug!(side, why, "response cut off");
            Err(Cut)
        }
    }
}

/// A response on its way to the client, ended when dropped before its
/// end (the node cut the client's connection off: a drain that outlasted
/// its timeout): counted, its in-flight count ended and logged with its
/// status.
struct Ending<'a> {
    done: Option<Done>,
    conn: &'a Conn,
    /// Body bytes passed on so far.
    sent: u64,
}

/// The access log's reason for a response the node cut off.
const CUT_OFF: (&str, &str) = (
    "internal",
    "the node closed the connection before the response ended",
);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done.end(self.conn, None, self.sent, Some(CUT_OFF));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::future_size;

    /// Each request's future is allocated and moved as it is built: a
    /// future lent to a wrapper is held once, not again as its argument.
    #[test]
    #[expect(unreachable_code, reason = "the futures are measured, not made")]
    fn the_request_future_holds_its_parts_once() {
        type S = tokio::net::TcpStream;
        let serve = future_size(&|| serve::<S>(unreachable!(), unreachable!()));
        let proxy = future_size(&|| {
            proxy::<S>(
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
            )
        });
        assert!(serve < proxy + 512, "serve {serve}, proxy {proxy}");
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields_and_keep_their_framing() {
        let bytes = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
              Content-Length: 3\r\nServer: s\r\n\r\nok\n";
        let head = parse_head(bytes).ok().flatten().expect("whole");
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.keeps_open(head.framing));
        assert_eq!(
            String::from_utf8(head.client_head(bytes)).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nserver: s\r\n\r\n"
        );
        let bytes = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nServer: s\r\n\r\n";
        let head = parse_head(bytes).ok().flatten().expect("whole");
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(
            String::from_utf8(head.client_head(bytes)).unwrap(),
            "HTTP/1.1 204 No Content\r\nserver: s\r\n\r\n",
            "a 204 carries no Content-Length"
        );
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let head = parse_head(bytes).ok().flatten().expect("whole");
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(
            String::from_utf8(head.client_head(bytes)).unwrap(),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let head = parse_head(b"HTTP/1.0 200 OK\r\n\r\n")
            .ok()
            .flatten()
            .expect("whole");
        assert_eq!(head.framing, Framing::Close);
        assert!(!head.keeps_open(head.framing));
        let head = parse_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")
            .ok()
            .flatten()
            .expect("whole");
        assert_eq!(head.framing, Framing::Empty);
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n").is_err());
        // Not ASCII white space: not a length.
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\xc2\xa0\r\n\r\n").is_err());
        // The length frames the body even when `Connection` names it.
        let bytes = b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok";
        let head = parse_head(bytes).ok().flatten().expect("whole");
        assert_eq!(head.framing, Framing::Length(2));
        assert_eq!(
            String::from_utf8(head.client_head(bytes)).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        );
        // One length said again, as a list or as two fields: passed on once.
        for bytes in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5 , 5\r\n\r\nhello"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"[..],
        ] {
            let head = parse_head(bytes).ok().flatten().expect("whole");
            assert_eq!(head.framing, Framing::Length(5));
            assert_eq!(
                String::from_utf8(head.client_head(bytes)).unwrap(),
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
            );
        }
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-"),
            Ok(None)
        ));
    }
}
