//! The client's request body on its way to an instance.
//!
//! An instance may answer before it has read the whole body (a 401 or 413
//! on an upload, nginx's `return`). The answer is forwarded at once; the
//! upstream connection, still busy with the body, is not reused but
//! dropped, and with it this body. An HTTP/1 body dropped before its end is
//! then read and discarded by a task of its own, bounded by
//! [`DRAIN_LIMIT`], so that the client's upload completes and its
//! connection stays usable, rather than blocking until a timeout or being
//! reset with the answer unread. HTTP/2 needs none of this: hyper resets
//! the stream of a dropped body.
//!
//! While a body is still coming in, it keeps its request active on the
//! client connection (a [`BodyGuard`]), so that the bytes still arriving
//! are not taken for the start of the next request.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{Instrument, debug};

/// Longest time spent discarding what is left of a body after an early
/// answer (as nginx's `lingering_time`); then the connection closes.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// A client's request body, drained when dropped unfinished (HTTP/1).
#[derive(Debug)]
pub(crate) struct ClientBody {
    /// `None` only while being dropped.
    inner: Option<Incoming>,
    /// Set for HTTP/1 bodies that are not empty, until their end.
    guard: Option<BodyGuard>,
    /// Counts the body's bytes, for the access log.
    counted: Option<Arc<AtomicU64>>,
}

impl ClientBody {
    /// Wraps the body of `req`, a request of the client connection `conn`;
    /// its bytes are added to `counted`.
    pub(crate) fn wrap<A: Activity + 'static>(
        req: Request<Incoming>,
        conn: &Arc<A>,
        counted: Option<Arc<AtomicU64>>,
    ) -> Request<Self> {
        let h1 = req.version() < Version::HTTP_2;
        req.map(|inner| {
            // Most requests have no body: no guard, nothing to drain.
            let guard = (h1 && !inner.is_end_stream()).then(|| BodyGuard::new(conn.clone()));
            Self {
                inner: Some(inner),
                guard,
                counted,
            }
        })
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(c), Some(data)) = (&this.counted, f.data_ref()) {
                    c.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            // The end, or an error that ends the client connection.
            _ => this.guard = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let Some(inner) = self.inner.take() else {
            return;
        };
        if inner.is_end_stream() {
            return;
        }
        // Outside a runtime (the process is ending) the body just goes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(inner, guard).instrument(tracing::Span::current()));
        }
    }
}

/// Reads and discards the rest of a body, for at most [`DRAIN_LIMIT`].
async fn drain(mut body: Incoming, guard: BodyGuard) {
    let mut bytes = 0_u64;
    let read = tokio::time::timeout(DRAIN_LIMIT, async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        bytes += data.len() as u64;
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => debug!(bytes, "rest of the request body discarded"),
        Ok(Err(error)) => debug!(bytes, %error, "request body ended while discarded"),
        Err(_) => debug!(
            bytes,
            "request body still coming after the drain limit; closing"
        ),
    }
    drop(body);
    // An HTTP/1 connection task waits on a read without a timer while a
    // request is active: wake it to start the idle timer.
    guard.end_and_wake();
}

/// What a [`BodyGuard`] needs of its client connection. A trait object:
/// request bodies are part of the upstream pools' types, which the data
/// plane (and so the connection) contains, and naming the connection's type
/// here would make the types recursive.
pub(crate) trait Activity: Send + Sync + std::fmt::Debug {
    /// Starts one request's activity.
    fn enter(&self);
    /// Ends one request's activity.
    fn leave(&self);
    /// Wakes the task serving the connection.
    fn wake(&self);
}

/// Keeps a request active on its client connection while its body is still
/// coming in after the response.
#[derive(Debug)]
pub(crate) struct BodyGuard(Arc<dyn Activity>);

impl BodyGuard {
    pub(crate) fn new(conn: Arc<dyn Activity>) -> Self {
        conn.enter();
        Self(conn)
    }

    /// Ends the guard and wakes the connection's task (for a guard dropped
    /// outside it).
    pub(crate) fn end_and_wake(self) {
        let conn = self.0.clone();
        drop(self);
        conn.wake();
    }
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}
