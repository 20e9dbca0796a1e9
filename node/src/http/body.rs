//! Response bodies sent to clients: short fixed answers, and instances'
//! bodies streamed through [`UpstreamBody`], which finishes the request's
//! bookkeeping when the body ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::conn::ActiveGuard;
use super::upstream::{Pool, PooledConn};
use crate::balancer::Lease;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the node sends.
#[derive(Debug)]
pub(crate) struct ProxyBody {
    kind: Kind,
    /// Keeps the request active on its client connection (idle timer).
    guard: Option<ActiveGuard>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
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

    pub(crate) fn upstream(body: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream(body),
            guard: None,
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

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
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
/// When it ends (or is dropped because the client went away) it records the
/// request's status class and duration, returns the upstream connection to
/// its pool if the body was read completely, and drops the [`Lease`], which
/// ends the request's in-flight count.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    complete: bool,
    finish: Option<Finish>,
}

#[derive(Debug)]
struct Finish {
    lease: Lease,
    start: Instant,
    status: u16,
    /// Where the connection goes back when the body was read completely;
    /// `None` for connections that are not reused.
    reuse: Option<(PooledConn, Arc<Pool>, usize)>,
}

impl UpstreamBody {
    /// `reuse`: the connection, its pool and the pool's idle limit.
    pub(crate) fn new(
        inner: Incoming,
        lease: Lease,
        start: Instant,
        status: u16,
        reuse: Option<(PooledConn, Arc<Pool>, usize)>,
    ) -> Self {
        Self {
            inner,
            complete: false,
            finish: Some(Finish {
                lease,
                start,
                status,
                reuse,
            }),
        }
    }

    fn drained(&self) -> bool {
        self.finish
            .as_ref()
            .is_some_and(|f| f.lease.backend().drain_token().is_cancelled())
    }

    fn finish(&mut self, complete: bool) {
        let Some(f) = self.finish.take() else { return };
        let metrics = &f.lease.backend().metrics;
        metrics.observe_status(f.status);
        metrics.duration.observe(f.start.elapsed().as_secs_f64());
        if complete {
            if let Some((conn, pool, max_idle)) = f.reuse {
                pool.checkin(conn, max_idle);
            }
        }
        // Dropping the lease ends the in-flight count.
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.finish.is_none() {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(e)) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            None if this.drained() => {
                // The drained connection was torn down under the body.
                this.finish(false);
                Poll::Ready(Some(Err(Drained.into())))
            }
            None => {
                this.complete = true;
                this.finish(true);
                Poll::Ready(None)
            }
        }
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
        self.finish(complete);
    }
}
