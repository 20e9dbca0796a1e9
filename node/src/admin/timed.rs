//! An admin connection's timeouts (SPEC §9): a request's header block must
//! be complete within [`HEADER_TIMEOUT`] of accept, or of the first byte of
//! a next keep-alive request; a kept-alive connection with no request for
//! [`IDLE_TIMEOUT`] is closed.
//!
//! hyper's own header timeout starts when the previous response ends, so a
//! client that paused 8 s between two requests had 2 s left for the next
//! head, and a scrape every 10 s raced it. Here the wrapper under hyper
//! times the reads instead, told by the service which requests it took:
//!
//! ```text
//!   accept ─▶ Head ──request dispatched──▶ Busy ──response body dropped──▶ Idle
//!              │ HEADER_TIMEOUT              ▲  │                             │ first byte
//!              ▼                             │  │ bytes once its body is read │
//!          read error: hyper closes          │  ▼ (a next head, pipelined)    │
//!                                            │  Busy, next head since t ──▶ Head from t
//!                                            └──────── Head ◀─────────────────┘
//!                                                            IDLE_TIMEOUT: read error
//! ```
//!
//! While a request is served, bytes read before its body is read whole
//! are its body; bytes read after (the service says when: at once for a
//! request without one) begin the next request, whose header timeout runs
//! from them.
//!
//! The wrapper also gives hyper's answers to a head it cannot parse (a
//! malformed request line or field 400, a target too long 414, a header
//! block over 64 KiB 431, all without a body) the error envelope every
//! other admin error has, as the data plane's wrapper gives them a plain
//! body (`crate::http::conn`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::HEADER_TIMEOUT;
use crate::http::conn::{hyper_parse_error, only_buffer, poll_answer};

/// hyper's bodiless answer of status `status` as the error envelope.
fn enveloped(status: u16) -> &'static [u8] {
    fn answer(status: u16, reason: &str, message: &str) -> Vec<u8> {
        let body =
            serde_json::to_vec(&edgelb_api::envelope::error(status, message)).unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
    static BAD_REQUEST: LazyLock<Vec<u8>> =
        LazyLock::new(|| answer(400, "Bad Request", "malformed request line or header field"));
    static URI_TOO_LONG: LazyLock<Vec<u8>> =
        LazyLock::new(|| answer(414, "URI Too Long", "request target too long"));
    static HEADERS_TOO_LARGE: LazyLock<Vec<u8>> = LazyLock::new(|| {
        answer(
            431,
            "Request Header Fields Too Large",
            "request header fields too large (at most 64 KiB)",
        )
    });
    match status {
        400 => &BAD_REQUEST,
        414 => &URI_TOO_LONG,
        _ => &HEADERS_TOO_LARGE,
    }
}

/// How long a kept-alive admin connection may wait for its next request
/// (the data plane's `idle_timeout` default, NGINX's `keepalive_timeout`
/// is 75 s): longer than a scrape interval, so that Prometheus keeps its
/// connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The two timeouts (tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For a request head: [`HEADER_TIMEOUT`].
    pub header: Duration,
    /// For a next request: [`IDLE_TIMEOUT`].
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header: HEADER_TIMEOUT,
            idle: IDLE_TIMEOUT,
        }
    }
}

/// What the service tells the connection's reads: requests taken, and
/// those whose response is not done.
#[derive(Debug, Default)]
pub(super) struct Activity {
    dispatched: AtomicU64,
    /// Dispatched requests whose body was read whole (or that had none).
    bodies_read: AtomicU64,
    active: AtomicUsize,
    /// The read that waited while a request was served: woken when the
    /// last response is done, to arm the idle timer.
    reader: AtomicWaker,
}

/// One request taken by the service, until its response body is dropped.
#[derive(Debug)]
pub(super) struct Active(Arc<Activity>, std::sync::atomic::AtomicBool);

impl Active {
    pub(super) fn new(activity: &Arc<Activity>) -> Self {
        activity.dispatched.fetch_add(1, Ordering::SeqCst);
        activity.active.fetch_add(1, Ordering::SeqCst);
        Self(activity.clone(), false.into())
    }

    /// The request's body is read whole, or it had none: bytes read from
    /// now on begin the next request. Once per request.
    pub(super) fn body_read(&self) {
        if !self.1.swap(true, Ordering::SeqCst) {
            self.0.bodies_read.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        // Not said: nothing more is read for it.
        self.body_read();
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.reader.wake();
        }
    }
}

/// A response body that holds its request's [`Active`].
#[derive(Debug)]
pub(super) struct Guarded<B> {
    inner: B,
    _active: Active,
}

impl<B> Guarded<B> {
    pub(super) fn new(inner: B, active: Active) -> Self {
        Self {
            inner,
            _active: active,
        }
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// For the rest of a request head: since accept or its first byte.
    Head,
    /// For a next request.
    Idle,
    /// Neither armed: a request is being served, or has just been.
    Unarmed,
}

/// The admin connection's I/O, with the header and idle timeouts on reads.
#[derive(Debug)]
pub(super) struct TimedIo<S> {
    inner: S,
    activity: Arc<Activity>,
    /// `activity.dispatched` when last looked at.
    seen: u64,
    wait: Wait,
    timer: Pin<Box<Sleep>>,
    timeouts: Timeouts,
    /// Nothing was written since a flush completed with no request
    /// active: a write now is not the rest of a response.
    quiet: bool,
    /// The envelope given instead of hyper's answer, if any.
    answer: Answer,
    /// When the first byte of a next request was read while one was
    /// served (pipelined): its header timeout runs from then.
    next_head: Option<Instant>,
}

/// The envelope in place of hyper's answer to a head it could not parse.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// None given (hyper's writes go through).
    Not,
    /// Being written: the envelope and how much of it is.
    Writing(&'static [u8], usize),
    /// Written (or the client is gone): hyper's writes are dropped.
    Given,
}

impl<S> TimedIo<S> {
    /// `inner`, accepted at `accepted` (the header timeout runs from then,
    /// a TLS handshake included).
    pub(super) fn new(
        inner: S,
        activity: Arc<Activity>,
        accepted: Instant,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            inner,
            activity,
            seen: 0,
            wait: Wait::Head,
            timer: Box::pin(tokio::time::sleep_until(accepted + timeouts.header)),
            timeouts,
            quiet: true,
            answer: Answer::Not,
            next_head: None,
        }
    }

    fn arm(&mut self, wait: Wait, after: Duration) {
        self.arm_from(wait, Instant::now(), after);
    }

    fn arm_from(&mut self, wait: Wait, from: Instant, after: Duration) {
        self.wait = wait;
        self.timer.as_mut().reset(from + after);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.activity.reader.register(cx.waker());
        let dispatched = this.activity.dispatched.load(Ordering::SeqCst);
        let busy = this.activity.active.load(Ordering::SeqCst) > 0;
        if dispatched != this.seen {
            // A request was taken since: its head is done, the bytes read
            // ahead of it among them.
            this.next_head = None;
        }
        if dispatched != this.seen || busy {
            this.seen = dispatched;
            this.wait = Wait::Unarmed;
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if busy {
            // A body, hyper looking for a close, or (once every body is
            // read) a next head: no timer of ours while it is served.
            let more = matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before;
            if more
                && this.next_head.is_none()
                && this.activity.bodies_read.load(Ordering::SeqCst) == dispatched
            {
                this.next_head = Some(Instant::now());
            }
            return read;
        }
        match read {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.wait != Wait::Head {
                    this.arm(Wait::Head, this.timeouts.header);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if this.wait == Wait::Unarmed {
            match this.next_head.take() {
                Some(first) => this.arm_from(Wait::Head, first, this.timeouts.header),
                None => this.arm(Wait::Idle, this.timeouts.idle),
            }
        }
        ready!(this.timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            match this.wait {
                Wait::Head => "the request head took longer than the header timeout",
                _ => "no request within the idle timeout",
            },
        )))
    }
}

impl<S: AsyncWrite + Unpin> TimedIo<S> {
    /// A write of `bytes`, when this wrapper answers instead: hyper's
    /// bodiless answer to a head it could not parse (the first write after
    /// a flush with no request active) is replaced by the envelope, and
    /// what hyper writes after it is dropped, as hyper closes next.
    fn poll_own_answer(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if let Answer::Not = self.answer {
            if !self.quiet || self.activity.active.load(Ordering::SeqCst) > 0 {
                return None;
            }
            self.answer = Answer::Writing(enveloped(hyper_parse_error(bytes)?), 0);
        }
        if let Answer::Writing(answer, mut sent) = self.answer {
            let done = poll_answer(&mut self.inner, cx, answer, &mut sent);
            self.answer = Answer::Writing(answer, sent);
            if done.is_pending() {
                return Some(Poll::Pending);
            }
            self.answer = Answer::Given;
        }
        Some(Poll::Ready(Ok(bytes.len())))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
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
        Pin::new(&mut this.inner).poll_write(cx, buf)
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
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(res, Poll::Ready(Ok(()))) && this.activity.active.load(Ordering::SeqCst) == 0 {
            this.quiet = true;
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    fn timed() -> (DuplexStream, TimedIo<DuplexStream>, Arc<Activity>) {
        let (client, server) = tokio::io::duplex(1024);
        let activity = Arc::new(Activity::default());
        let io = TimedIo::new(
            server,
            activity.clone(),
            Instant::now(),
            Timeouts::default(),
        );
        (client, io, activity)
    }

    /// Reads what is there, or the error the timeouts give, within `limit`
    /// of (paused) time; `None` if still waiting then.
    async fn read_within(
        io: &mut TimedIo<DuplexStream>,
        limit: Duration,
    ) -> Option<io::Result<usize>> {
        let mut buf = [0u8; 64];
        tokio::time::timeout(limit, io.read(&mut buf)).await.ok()
    }

    fn timed_out(r: Option<io::Result<usize>>) -> bool {
        matches!(r, Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut)
    }

    /// A request served: dispatched, its response body dropped.
    fn serve_one(activity: &Arc<Activity>) {
        drop(Guarded::new((), Active::new(activity)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_has_the_header_timeout_from_accept() {
        let (mut client, mut io, _) = timed();
        assert!(read_within(&mut io, Duration::from_secs(9)).await.is_none());
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(
            read_within(&mut io, Duration::ZERO).await.unwrap().unwrap(),
            8
        );
        // From accept, not from the first byte.
        assert!(timed_out(
            read_within(&mut io, Duration::from_secs(2)).await
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_next_head_has_the_header_timeout_from_its_first_byte() {
        let (mut client, mut io, activity) = timed();
        serve_one(&activity);
        // 8 s idle between the requests no longer count against the head.
        assert!(read_within(&mut io, Duration::from_secs(8)).await.is_none());
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(
            read_within(&mut io, Duration::ZERO).await.unwrap().unwrap(),
            8
        );
        assert!(
            read_within(&mut io, Duration::from_millis(9_900))
                .await
                .is_none()
        );
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        assert_eq!(
            read_within(&mut io, Duration::ZERO).await.unwrap().unwrap(),
            8
        );
        // The rest of the head does not restart it.
        assert!(timed_out(
            read_within(&mut io, Duration::from_millis(200)).await
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_kept_alive_connection_closes_after_the_idle_timeout() {
        let (_client, mut io, activity) = timed();
        serve_one(&activity);
        assert!(
            read_within(&mut io, IDLE_TIMEOUT - Duration::from_millis(10))
                .await
                .is_none()
        );
        assert!(timed_out(
            read_within(&mut io, Duration::from_millis(20)).await
        ));
    }

    /// A next head's first bytes, read while a request is served once its
    /// body was read (pipelined), start that head's timeout.
    #[tokio::test(start_paused = true)]
    async fn a_next_head_read_while_a_request_is_served_times_from_its_first_byte() {
        let (mut client, mut io, activity) = timed();
        let active = Active::new(&activity);
        client.write_all(b"body").await.unwrap();
        assert_eq!(
            read_within(&mut io, Duration::ZERO).await.unwrap().unwrap(),
            4
        );
        active.body_read();
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(
            read_within(&mut io, Duration::ZERO).await.unwrap().unwrap(),
            8
        );
        // Served for 6 s: no timeout meanwhile.
        assert!(read_within(&mut io, Duration::from_secs(6)).await.is_none());
        drop(Guarded::new((), active));
        // 4 s of the head's 10 are left, not the idle timeout's 60.
        assert!(
            read_within(&mut io, Duration::from_millis(3_900))
                .await
                .is_none()
        );
        assert!(timed_out(
            read_within(&mut io, Duration::from_millis(200)).await
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_being_served_has_no_timeout() {
        let (mut client, mut io, activity) = timed();
        let active = Active::new(&activity);
        // A slow body, or hyper watching for a close, while it is served.
        assert!(read_within(&mut io, IDLE_TIMEOUT * 2).await.is_none());
        client.write_all(b"body").await.unwrap();
        assert_eq!(
            read_within(&mut io, Duration::ZERO).await.unwrap().unwrap(),
            4
        );
        assert!(read_within(&mut io, IDLE_TIMEOUT * 2).await.is_none());
        drop(active);
        // Served: now idle.
        assert!(timed_out(
            read_within(&mut io, IDLE_TIMEOUT + Duration::from_millis(10)).await
        ));
    }
}
