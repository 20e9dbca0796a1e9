//! Response bodies sent to clients: short fixed answers, and instances'
//! bodies streamed through [`UpstreamBody`], which finishes the request's
//! bookkeeping when the body ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tracing::debug;

use super::conn::{ActiveGuard, Conn};
use super::reply::{CLIENT_LEFT, Done, Framing, MAX_READ, Progress, READ_CHUNK};
use crate::upstream::{IdleLimits, ParkedConn, PooledConn};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the node sends.
#[derive(Debug)]
pub(crate) struct ProxyBody {
    kind: Kind,
    /// Keeps the request active on its client connection (idle timer).
    guard: Option<ActiveGuard>,
}

// Nearly every body is an instance's (`Lean`, or `Upstream` through hyper's
// client): neither is boxed, which would cost an allocation per proxied
// response.
#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
    Lean(LeanBody),
}

impl ProxyBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        let bytes = (!bytes.is_empty()).then_some(bytes);
        Self {
            kind: Kind::Full(bytes),
            guard: None,
        }
    }

    pub(crate) fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub(super) fn lean(body: LeanBody) -> Self {
        Self {
            kind: Kind::Lean(body),
            guard: None,
        }
    }

    pub(crate) fn upstream(body: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream(body),
            guard: None,
        }
    }

    /// The bytes of a fixed answer (none for an instance's body).
    pub(crate) fn into_full(self) -> Bytes {
        match self.kind {
            Kind::Full(bytes) => bytes.unwrap_or_default(),
            Kind::Upstream(_) | Kind::Lean(_) => Bytes::new(),
        }
    }

    pub(crate) fn guarded(mut self, guard: ActiveGuard) -> Self {
        self.guard = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Lean(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Lean(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
            Kind::Lean(body) => body.size_hint(),
        }
    }
}

/// The instance's body was cut off because the instance was detached and
/// its drain timeout passed.
#[derive(Debug, thiserror::Error)]
#[error("instance drained")]
pub(crate) struct Drained;

/// An instance's response body on its way to the client.
///
/// It drives the upstream connection while it is read (see
/// [`PooledConn`]). When it ends (or is dropped because the client went
/// away) it records the request's status class and duration, returns the
/// connection to its pool if the body was read completely, and drops the
/// [`Lease`], which ends the request's in-flight count.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    complete: bool,
    finish: Option<Finish>,
}

#[derive(Debug)]
struct Finish {
    conn: PooledConn,
    /// How long the connection may wait in the pool once its response
    /// was read completely; `None` for connections that are not reused.
    reuse: Option<IdleLimits>,
    done: Done,
}

impl UpstreamBody {
    /// The body of an instance's response; `done` ends the request, and
    /// `reuse` (none for a connection made for an upgrade) is how long the
    /// connection may wait in the pool after it.
    pub(super) fn new(
        inner: Incoming,
        conn: PooledConn,
        done: Done,
        reuse: Option<IdleLimits>,
    ) -> Self {
        Self {
            inner,
            complete: false,
            finish: Some(Finish { conn, reuse, done }),
        }
    }

    /// Ends the request: `complete` when the body was read to its end,
    /// else who cut it off and why (for the access log).
    fn finish(&mut self, complete: bool, cut: Option<(&'static str, &dyn std::fmt::Display)>) {
        let Some(f) = self.finish.take() else { return };
        let Finish { conn, reuse, done } = f;
        done.end_with(if complete { None } else { cut }, |pool, now| {
            // A connection still sending the request body (the instance
            // answered before reading it all) is not reused: dropping it
            // drops the body, whose rest is then discarded (see
            // `crate::upstream::ClientBody`).
            if complete
                && let Some(limits) = reuse
                && conn.sender.is_ready()
            {
                pool.checkin(conn, limits, now);
            }
        });
    }

    fn on_frame(
        &mut self,
        frame: Option<Result<Frame<Bytes>, hyper::Error>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match frame {
            Some(Ok(frame)) => {
                if let Some(record) = self.finish.as_mut().and_then(|f| f.done.log.as_mut())
                    && let Some(data) = frame.data_ref()
                {
                    record.bytes_out += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.finish(false, Some(("upstream", &e)));
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.complete = true;
                self.finish(true, None);
                Poll::Ready(None)
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(f) = this.finish.as_mut() else {
            return Poll::Ready(None);
        };
        if f.conn.driver.aborted() {
            // The instance was detached and its drain timeout passed.
            this.finish(false, Some(("internal", &Drained)));
            return Poll::Ready(Some(Err(Drained.into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return this.on_frame(frame);
        }
        // Let the connection read more of the body, then look again.
        f.conn.driver.poll_drive(cx);
        if f.conn.driver.aborted() {
            this.finish(false, Some(("internal", &Drained)));
            return Poll::Ready(Some(Err(Drained.into())));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        this.on_frame(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.finish.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // hyper does not poll a body that reports its end up front (HEAD,
        // 204, 304, empty bodies): that still counts as read completely.
        let complete = self.complete || self.inner.is_end_stream();
        self.finish(
            complete,
            Some(("client", &"the client went away before the response ended")),
        );
    }
}

/// An instance's response body, read from its socket as hyper asks.
#[derive(Debug)]
pub(super) struct LeanBody {
    /// `None` once the body ended.
    up: Option<ParkedConn>,
    /// Read and not yet handed on.
    pending: BytesMut,
    body: Progress,
    keep_alive: bool,
    done: Option<Done>,
    conn: Arc<Conn>,
    /// How much the next read asks for: doubled, up to [`MAX_READ`], after
    /// each read that fills it.
    read_size: usize,
}

impl LeanBody {
    /// The body of the answer whose head came on `up`: `pending` was read
    /// after the head, `progress` follows its framing, `done` ends the
    /// request.
    pub(super) fn new(
        up: ParkedConn,
        pending: BytesMut,
        progress: Progress,
        keep_alive: bool,
        done: Done,
        conn: Arc<Conn>,
    ) -> Self {
        Self {
            up: Some(up),
            pending,
            body: progress,
            keep_alive,
            done: Some(done),
            conn,
            read_size: READ_CHUNK,
        }
    }

    /// The next data in `pending`, if any.
    fn next_data(&mut self) -> Result<Option<Bytes>, &'static str> {
        let (framing, n) = self.body.next_data(&self.pending)?;
        self.pending.advance(framing);
        Ok((n > 0).then(|| self.pending.split_to(n).freeze()))
    }

    /// Ends the request: `cut` says who broke the body off and why.
    fn finish(&mut self, cut: Option<(&'static str, &'static str)>) {
        let Some(done) = self.done.take() else { return };
        let up = self.up.take();
        let reusable = cut.is_none() && self.keep_alive && self.pending.is_empty();
        done.end(&self.conn, up.filter(|_| reusable), self.body.sent, cut);
    }

    /// Ends the request, the instance having broken the body off (`why`).
    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finish(Some(("upstream", why)));
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for LeanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done.is_none() {
                return Poll::Ready(None);
            }
            match this.next_data() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(why) => return this.fail(why),
            }
            if this.body.done() {
                this.finish(None);
                return Poll::Ready(None);
            }
            let Some(up) = this.up.as_mut() else {
                return Poll::Ready(None);
            };
            if up.poll_aborted(cx) {
                this.finish(Some(("internal", "instance drained")));
                return Poll::Ready(Some(Err(Drained.into())));
            }
            if this.pending.capacity() - this.pending.len() < 512 {
                this.pending.reserve(this.read_size);
            }
            let room = this.pending.capacity() - this.pending.len();
            match tokio_util::io::poll_read_buf(Pin::new(up.io()), cx, &mut this.pending) {
                Poll::Ready(Ok(0)) => {
                    if let Err(why) = this.body.closed() {
                        return this.fail(why);
                    }
                }
                Poll::Ready(Ok(n)) => {
                    // A read that filled the room asks for more (a bulk body).
                    if n == room && this.read_size < MAX_READ {
                        this.read_size *= 2;
                    }
                }
                Poll::Ready(Err(error)) => {
                    debug!(%error, "upstream body failed");
                    return this.fail("reading the body failed");
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Bytes after the end (a 304 with a body, say) are not the body's:
        // they only keep the connection from being reused.
        self.done.is_none() || self.body.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.body.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.body.left),
            Framing::Chunked | Framing::Close => SizeHint::default(),
        }
    }
}

impl Drop for LeanBody {
    fn drop(&mut self) {
        // hyper does not poll a body that reports its end up front (HEAD,
        // 204, 304, empty bodies): that still counts as read whole.
        let whole = self.body.done();
        self.finish((!whole).then_some(CLIENT_LEFT));
    }
}
