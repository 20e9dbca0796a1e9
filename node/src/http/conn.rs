//! One client connection: the context its requests share, and the I/O
//! wrapper that enforces the header timeout (408), the keep-alive idle
//! timeout and the send timeout.
//!
//! hyper's own `header_read_timeout` closes without answering and starts
//! when the previous response ends, so the timeouts live here instead, in
//! front of hyper, driven by how many requests are active:
//!
//! ```text
//!   accept ─▶ Head ──request handled──▶ Busy ──last response body done──▶ Idle
//!              │ header_timeout           ▲                                 │ first byte
//!              ▼                          └──────────────── Head ◀──────────┘
//!         write 408, EOF                                     idle_timeout: graceful close
//! ```
//!
//! The send timeout costs nothing while writes make progress: a write that
//! finds the client's socket full notes when that stall began (one clock
//! read) and polls a timer made at the connection's first stall; a write
//! that goes through forgets the stall. The timer is moved only when it
//! fires for an earlier stall, so a slow reader that keeps taking bytes
//! resets it at most once per `send_timeout`. A stall that outlasts
//! `send_timeout` fails the write, which ends the connection and with it
//! the request's in-flight count. Upgraded connections have
//! `tunnel_idle_timeout` instead.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::dataplane::{ConnInfo, DataPlane};
use crate::upstream::Activity;

/// What every request of one client connection shares.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) dp: Arc<DataPlane>,
    pub(crate) info: ConnInfo,
    /// The client's IP, as appended to `X-Forwarded-For`.
    pub(crate) client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub(crate) proto: HeaderValue,
    /// The client is a trusted proxy (`trusted_proxies`): its forwarding
    /// headers are kept.
    pub(crate) trusted: bool,
    /// The node is shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Requests being handled (service called, response body not finished).
    active: AtomicUsize,
    /// The connection was upgraded: no more HTTP timeouts.
    tunnel: AtomicBool,
    /// `TimedIo` waits on a read while busy and must be woken when idle.
    parked: AtomicBool,
    /// Idle timeout passed or the node shuts down: close gracefully.
    close: AtomicBool,
    /// The node drains softly (an upgrade): an HTTP/1 connection answers
    /// its next request with `Connection: close` and closes after it.
    close_after_response: AtomicBool,
    /// An HTTP/1 connection has been idle for `park_after`: the serving
    /// task hands it back from hyper, releasing hyper's buffers.
    park: AtomicBool,
    /// The connection is being parked: hyper's end of it must not shut the
    /// socket down.
    parking: AtomicBool,
    /// The task serving the connection, woken for `parked` and `close`.
    waker: AtomicWaker,
}

impl Conn {
    pub(crate) fn new(info: ConnInfo, dp: Arc<DataPlane>, shutdown: CancellationToken) -> Self {
        let ip = info.peer.ip().to_canonical();
        let trusted = dp.settings.trusts(ip);
        let ip = crate::access_log::client_ip(ip);
        Self {
            trusted,
            dp,
            info,
            // An IP address is always a valid header value.
            client_ip: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            proto: HeaderValue::from_static(if info.tls { "https" } else { "http" }),
            shutdown,
            active: AtomicUsize::new(0),
            tunnel: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            close: AtomicBool::new(false),
            close_after_response: AtomicBool::new(false),
            park: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// The connection has been upgraded: its I/O passes through untimed.
    pub(crate) fn set_tunnel(&self) {
        self.tunnel.store(true, Ordering::SeqCst);
    }

    /// Whether the connection should close gracefully (idle or shutdown).
    pub(crate) fn close_requested(&self) -> bool {
        self.close.load(Ordering::SeqCst)
    }

    /// Whether the connection has been idle long enough to be parked (and
    /// forgets the request).
    pub(crate) fn take_park(&self) -> bool {
        self.park.swap(false, Ordering::SeqCst)
    }

    /// Whether the connection has been idle long enough to be parked.
    pub(crate) fn park_requested(&self) -> bool {
        self.park.load(Ordering::SeqCst)
    }

    /// While set, shutting the I/O down does nothing: hyper ends its part
    /// of a parked connection with a shutdown.
    pub(crate) fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::SeqCst);
    }

    /// Asks the serving task to close the connection gracefully.
    pub(crate) fn request_close(&self) {
        self.close.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Remembers the serving task's waker (at each of its polls: a
    /// wake takes it).
    pub(crate) fn set_waker(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Wakes the serving task.
    fn wake(&self) {
        self.waker.wake();
    }
}

impl Conn {
    /// Whether the next response says `Connection: close` (a soft drain).
    pub(crate) fn closes_after_response(&self) -> bool {
        self.close_after_response.load(Ordering::SeqCst)
    }
}

impl crate::dataplane::Close for Conn {
    /// The node's drain. A soft one (an upgrade, as HAProxy's
    /// `idle-close-on-response`) leaves an idle HTTP/1 connection open, so
    /// that a request the client is sending on it at this moment is
    /// answered rather than met with a close: the next response says
    /// `Connection: close`, and the idle timeout still closes a connection
    /// that sends nothing.
    fn close(&self) {
        if self.dp.drains_softly() {
            self.close_after_response.store(true, Ordering::SeqCst);
            // An HTTP/2 connection's `drive` closes on it.
            self.wake();
        } else {
            self.request_close();
        }
    }
}

/// Counts one request as active on its connection until dropped (with the
/// response body).
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Conn>);

impl ActiveGuard {
    pub(crate) fn new(conn: &Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::SeqCst);
        Self(conn.clone())
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Conn {
    fn leave(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1
            && self.parked.swap(false, Ordering::SeqCst)
        {
            // Wakes the connection task so that the reader starts the idle
            // timer.
            self.wake();
        }
    }
}

impl Activity for Conn {
    fn enter(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    fn leave(&self) {
        Self::leave(self);
    }

    fn wake(&self) {
        Self::wake(self);
    }
}

/// The HTTP/1 answer to a client too slow to send its header block.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n\
content-length: 15\r\nconnection: close\r\n\r\nrequest timeout";

/// hyper answers a request head it cannot take (malformed, a target or a
/// header block over its limits) without a body and closes; these are
/// those answers with the short plain body every error answer has.
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\
content-length: 11\r\nconnection: close\r\n\r\nbad request";
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain\r\n\
content-length: 12\r\nconnection: close\r\n\r\nuri too long";
const HEADERS_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-type: text/plain\r\ncontent-length: 31\r\nconnection: close\r\n\r\n\
request header fields too large";

/// The status of hyper's bodiless answer to a head it could not parse,
/// when `bytes` are exactly one (what hyper writes, byte for byte, with or
/// without its `Date`): 400, 414 or 431. (A response an instance sent could read the same only as
/// an empty answer of one of these statuses that closes the connection.)
pub(crate) fn hyper_parse_error(bytes: &[u8]) -> Option<u16> {
    const LINES: &[(&[u8], u16)] = &[
        (b"HTTP/1.1 400 Bad Request\r\n", 400),
        (b"HTTP/1.1 414 URI Too Long\r\n", 414),
        (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", 431),
    ];
    const FIELDS: &[u8] = b"connection: close\r\ncontent-length: 0\r\n";
    // With hyper's Date (the admin API's server sends one): 29 characters.
    const DATE: usize = b"date: \r\n".len() + 29;
    let &(line, status) = LINES.iter().find(|(line, _)| bytes.starts_with(line))?;
    let rest = bytes[line.len()..].strip_prefix(FIELDS)?;
    let date =
        rest.len() == DATE + 2 && rest.starts_with(b"date: ") && rest[DATE - 2..].eq(b"\r\n\r\n");
    (rest == b"\r\n" || date).then_some(status)
}

/// Writes `answer` from `*sent` on, then flushes and shuts the write side
/// down: an answer a connection wrapper gives instead of hyper's, after
/// which the connection closes. An error ends it as well.
pub(crate) fn poll_answer<W: AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut Context<'_>,
    answer: &[u8],
    sent: &mut usize,
) -> Poll<()> {
    while *sent < answer.len() {
        match ready!(Pin::new(&mut *io).poll_write(cx, &answer[*sent..])) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(n) => *sent += n,
        }
    }
    let _ = ready!(Pin::new(&mut *io).poll_flush(cx));
    let _ = ready!(Pin::new(&mut *io).poll_shutdown(cx));
    Poll::Ready(())
}

/// The buffer a vectored write writes, when it writes exactly one (as
/// hyper writes an answer of its own).
pub(crate) fn only_buffer<'a>(bufs: &'a [io::IoSlice<'_>]) -> Option<&'a [u8]> {
    let mut written = bufs.iter().filter(|b| !b.is_empty());
    match (written.next(), written.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// Which of the answers above replaces hyper's answer `bytes`.
fn with_body(bytes: &[u8]) -> Option<&'static [u8]> {
    match hyper_parse_error(bytes)? {
        400 => Some(BAD_REQUEST),
        414 => Some(URI_TOO_LONG),
        _ => Some(HEADERS_TOO_LARGE),
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request header block.
    Head,
    /// A request is being handled.
    Busy,
    /// Between keep-alive requests.
    Idle,
    /// Writing an answer of this wrapper's own (a 408, or one of hyper's
    /// error answers with a body); the `usize` is how much has been
    /// written.
    Reject(&'static [u8], usize),
    /// Reads end and writes are dropped (after such an answer).
    Closed,
    /// Upgraded, or idle-expired and closing gracefully: no more timers.
    Passthrough,
}

/// The client I/O with header and idle timeouts.
#[derive(Debug)]
pub(crate) struct TimedIo<I> {
    inner: I,
    conn: Arc<Conn>,
    phase: Phase,
    /// When the current phase times out; `None` until the phase first has
    /// to wait (most requests arrive whole and never do). The timer is
    /// moved there only then.
    deadline: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    seen_bytes: bool,
    h2: bool,
    /// The current idle phase has not asked for the connection to be
    /// parked yet: its first wait is `park_after` (none when that is zero).
    park_pending: bool,
    /// Bytes already read (and timed) but not yet taken by hyper: a parked
    /// connection's first bytes, or what hyper had buffered when it let the
    /// connection go. Reads return them first.
    unread: Bytes,
    /// When the current write stall began (`None` while writes go through).
    stalled_since: Option<Instant>,
    /// The send timer, made at the connection's first stall.
    send_timer: Option<Pin<Box<Sleep>>>,
    /// Nothing was written since a flush completed with no request
    /// active: a write now begins an answer, not the rest of a response
    /// whose body hyper already dropped.
    quiet: bool,
}

impl<I> TimedIo<I> {
    pub(crate) fn new(inner: I, conn: Arc<Conn>) -> Self {
        // The first request's header timeout runs from the accept.
        let deadline = conn.info.accepted.instant() + conn.dp.settings.header_timeout;
        let timer = Box::pin(tokio::time::sleep_until(deadline));
        Self {
            inner,
            conn,
            phase: Phase::Head,
            deadline: Some(deadline),
            timer,
            seen_bytes: false,
            h2: false,
            park_pending: false,
            unread: Bytes::new(),
            stalled_since: None,
            send_timer: None,
            quiet: true,
        }
    }

    /// A write found the client's socket full: ready once the stall has
    /// lasted `send_timeout` (never in a tunnel).
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.conn.tunnel.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        let deadline = since + self.conn.dp.settings.send_timeout;
        let timer = self
            .send_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.is_elapsed() && timer.deadline() < deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // It fired for an earlier stall.
            timer.as_mut().reset(deadline);
        }
    }

    /// Notes the outcome of a write: progress forgets a stall; a stall
    /// that outlasted the send timeout becomes an error.
    fn on_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        res: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if res.is_ready() {
            self.stalled_since = None;
            return res;
        }
        if self.poll_stall(cx).is_ready() {
            debug!("send timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client took no bytes for the send timeout",
            )));
        }
        Poll::Pending
    }

    /// Whether the first bytes were HTTP/2's preface.
    pub(crate) fn h2(&self) -> bool {
        self.h2
    }

    /// Puts `bytes` back in front of what reads return next.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        self.unread = if self.unread.is_empty() {
            bytes
        } else {
            [bytes, std::mem::take(&mut self.unread)].concat().into()
        };
    }

    /// The bytes waiting to be read again.
    pub(crate) fn unread_bytes(&self) -> &[u8] {
        &self.unread
    }

    /// Drops the first `n` unread bytes (taken by the lean path).
    pub(crate) fn consume_unread(&mut self, n: usize) {
        let _ = self.unread.split_to(n.min(self.unread.len()));
        if self.unread.is_empty() {
            self.unread = Bytes::new();
        }
    }

    /// Follows the connection's active count now, as reads do: the lean
    /// path starts and ends a request without reading through here.
    pub(crate) fn follow_requests(&mut self) {
        self.update_phase();
    }

    /// Whether bytes are waiting to be read again.
    pub(crate) fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// Starts a new phase: its timeout counts from its first wait.
    fn rearm(&mut self) {
        self.deadline = None;
        self.park_pending = self.phase == Phase::Idle
            && !self.h2
            && self.conn.dp.settings.park_after < self.conn.dp.settings.idle_timeout;
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let settings = &self.conn.dp.settings;
        let after = if self.phase == Phase::Head {
            settings.header_timeout
        } else if self.park_pending {
            settings.park_after
        } else {
            settings.idle_timeout
        };
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + after);
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx)
    }

    /// Follows the connection's active count.
    fn update_phase(&mut self) {
        if self.conn.tunnel.load(Ordering::SeqCst) {
            self.phase = Phase::Passthrough;
            return;
        }
        let busy = self.conn.active.load(Ordering::SeqCst) > 0;
        match (self.phase, busy) {
            (Phase::Head | Phase::Idle | Phase::Busy, true) => self.phase = Phase::Busy,
            (Phase::Busy, false) => {
                self.phase = Phase::Idle;
                self.rearm();
            }
            _ => {}
        }
    }

    /// Asks for the connection to be parked as soon as it is idle, when
    /// `park_after` is zero (no timer then).
    fn park_now(&mut self) -> bool {
        let now = self.phase == Phase::Idle
            && self.park_pending
            && self.conn.dp.settings.park_after.is_zero();
        if now {
            self.request_park();
        }
        now
    }

    /// The idle phase has lasted `park_after`: asks the serving task to
    /// park the connection (right after this poll). The idle timeout still
    /// counts from the start of the phase.
    fn request_park(&mut self) {
        self.park_pending = false;
        let settings = &self.conn.dp.settings;
        let (park, idle) = (settings.park_after, settings.idle_timeout);
        self.deadline = self.deadline.map(|d| d - park + idle);
        self.conn.park.store(true, Ordering::SeqCst);
    }

    fn on_bytes(&mut self, bytes: &[u8]) {
        if !self.seen_bytes {
            self.seen_bytes = true;
            let n = bytes.len().min(H2_PREFACE.len());
            if bytes[..n] == H2_PREFACE[..n] {
                // HTTP/2 frames its own headers; only the idle timeout applies.
                self.h2 = true;
                if self.phase == Phase::Head {
                    self.phase = Phase::Idle;
                    self.rearm();
                }
            }
        } else if self.phase == Phase::Idle && !self.h2 {
            self.phase = Phase::Head;
            self.rearm();
        }
    }
}

impl<I: AsyncWrite + Unpin> TimedIo<I> {
    /// A write of `bytes`, when this wrapper answers instead: hyper's
    /// bodiless answer to a head it could not parse (the first write after
    /// a flush with no request active: a response's last piece, written
    /// after hyper dropped its body, is not one) is replaced by one with a
    /// body, and what hyper writes after such an answer is dropped, as
    /// hyper closes the connection next.
    fn poll_own_answer(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        match self.phase {
            Phase::Head | Phase::Busy | Phase::Idle
                if self.quiet
                    && !self.h2
                    && bytes.len() < 128
                    && self.conn.active.load(Ordering::SeqCst) == 0 =>
            {
                self.phase = Phase::Reject(with_body(bytes)?, 0);
            }
            Phase::Reject(..) | Phase::Closed => {}
            _ => return None,
        }
        if let Phase::Reject(answer, sent) = self.phase {
            if self.poll_reject(cx, answer, sent).is_pending() {
                return Some(Poll::Pending);
            }
            self.phase = Phase::Closed;
        }
        Some(Poll::Ready(Ok(bytes.len())))
    }

    /// hyper flushes after the last response body frame, but does not read
    /// again until woken: start the idle timer here.
    fn after_write(&mut self, cx: &mut Context<'_>) {
        if self.phase == Phase::Busy && !self.h2 && self.conn.active.load(Ordering::SeqCst) == 0 {
            self.update_phase();
            if self.phase == Phase::Idle && !self.park_now() {
                // Registers the waker; the deadline is in the future.
                let _ = self.poll_timer(cx);
            }
        }
    }

    fn poll_reject(
        &mut self,
        cx: &mut Context<'_>,
        answer: &'static [u8],
        mut sent: usize,
    ) -> Poll<()> {
        let done = poll_answer(&mut self.inner, cx, answer, &mut sent);
        self.phase = Phase::Reject(answer, sent);
        done
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            if this.unread.is_empty() {
                // Lets the buffer go rather than an empty view of it.
                this.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.phase {
                Phase::Passthrough => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Phase::Closed => return Poll::Ready(Ok(())),
                Phase::Reject(answer, sent) => {
                    ready!(this.poll_reject(cx, answer, sent));
                    this.phase = Phase::Closed;
                    continue;
                }
                Phase::Head | Phase::Busy | Phase::Idle => {}
            }
            this.update_phase();
            if this.phase == Phase::Passthrough {
                continue;
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    let filled = buf.filled();
                    if filled.len() > before {
                        this.on_bytes(&filled[before..]);
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if this.phase == Phase::Busy {
                if !this.h2 {
                    // An HTTP/1 request ends inside hyper's connection task,
                    // which flushes right after: `after_write` sees it (or
                    // in a body drain, which wakes this task itself).
                    return Poll::Pending;
                }
                this.conn.parked.store(true, Ordering::SeqCst);
                if this.conn.active.load(Ordering::SeqCst) > 0 {
                    return Poll::Pending;
                }
                // The last request ended meanwhile: start the idle timer.
                this.conn.parked.store(false, Ordering::SeqCst);
                continue;
            }
            if this.park_now() {
                continue;
            }
            if this.poll_timer(cx).is_pending() {
                return Poll::Pending;
            }
            if this.phase == Phase::Idle && this.park_pending {
                this.request_park();
                continue;
            }
            if this.phase == Phase::Head && !this.h2 {
                debug!("header timeout");
                this.phase = Phase::Reject(REQUEST_TIMEOUT, 0);
                continue;
            }
            debug!("idle timeout");
            this.phase = Phase::Passthrough;
            // Seen by the serving task right after this poll: hyper closes
            // on the graceful shutdown it starts.
            this.conn.close.store(true, Ordering::SeqCst);
            return Poll::Pending;
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(own) = this.poll_own_answer(cx, buf) {
            return own;
        }
        this.quiet = false;
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(own) = only_buffer(bufs).and_then(|only| this.poll_own_answer(cx, only)) {
            return own;
        }
        this.quiet = false;
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        let res = this.on_write(cx, res);
        // Looked at only after a write (hyper flushes every response).
        if !this.quiet
            && matches!(res, Poll::Ready(Ok(())))
            && this.conn.active.load(Ordering::SeqCst) == 0
        {
            this.quiet = true;
        }
        this.after_write(cx);
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.parking.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
