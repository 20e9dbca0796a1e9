//! HTTP mode of the data plane: per-request balancing over pooled HTTP/1.1
//! upstream connections.
//!
//! ```text
//!  client ──h1/h2──▶ TimedIo ──▶ hyper server ──▶ forward::handle
//!   (408/idle timeouts)                              │ route (one table load)
//!                                                    │ 404 / 308 redirect
//!                                                    │ pick ─▶ 503
//!                                                    ▼
//!                                     Pool (per instance and port) ──h1──▶ instance
//!                                      idle keep-alive senders, ≤ 3 attempts
//!                                                    │
//!  client ◀── ProxyBody(UpstreamBody) ◀─────────────┘ response streams back;
//!             body end: metrics, connection back to the pool, lease released
//! ```
//!
//! A request counts in flight from selection until its response body has
//! been fully handed to the client (or the client went away); an upgraded
//! connection (WebSocket) counts as one request for as long as it is open.
//! Connect failures (refused, timed out) mark the instance down and select
//! again; nothing is retried once a request byte reached an instance.

mod body;
pub(crate) mod conn;
mod error;
pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod redirect;
mod upgrade;

#[cfg(test)]
mod tests;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use crate::dataplane::{ConnInfo, DataPlane};

use self::conn::{ActiveGuard, Conn, TimedIo};

/// Serves one accepted (and, on TLS ports, decrypted) client connection in
/// HTTP mode until it closes.
///
/// HTTP/1.1 and HTTP/2 (ALPN or prior knowledge) are told apart by the
/// client preface. When `shutdown` fires the connection shuts down
/// gracefully: in-flight requests finish (bounded by the drain timeout),
/// then it closes.
pub async fn serve_connection<I>(
    io: I,
    conn: ConnInfo,
    dp: Arc<DataPlane>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::debug_span!("http", peer = %conn.peer, port = conn.port, tls = conn.tls);
    serve(io, conn, dp, shutdown).instrument(span).await;
}

async fn serve<I>(io: I, info: ConnInfo, dp: Arc<DataPlane>, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &dp.settings;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timeout closes without a response and runs from
    // the end of the previous response; TimedIo implements ours.
    builder
        .http1()
        .max_buf_size(settings.max_header_bytes.max(MIN_H1_BUF))
        .header_read_timeout(None)
        // A proxy forwards the instance's Date; it does not add one.
        .auto_date_header(false);
    builder
        .http2()
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .auto_date_header(false);
    let drain_timeout = settings.drain_timeout;

    let conn = Arc::new(Conn::new(info, dp.clone(), shutdown.clone()));
    let io = TimedIo::new(io, conn.clone());
    let svc_conn = conn.clone();
    let service = service_fn(move |req| forward::handle(req, ActiveGuard::new(&svc_conn)));
    let serving = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(serving);

    // The shutdown token is polled by its own task: polling it from this
    // one would take the token's lock on every wake of every connection.
    let watcher = tokio::spawn({
        let conn = conn.clone();
        async move {
            shutdown.cancelled().await;
            conn.request_close();
        }
    });
    let mut deadline: Option<Pin<Box<Sleep>>> = None;
    let res = poll_fn(|cx| {
        // Registered before the checks below, so that a wake between them
        // and `Pending` is not lost.
        conn.set_waker(cx.waker());
        loop {
            if deadline.is_none() && conn.close_requested() {
                serving.as_mut().graceful_shutdown();
                deadline = Some(Box::pin(tokio::time::sleep(drain_timeout)));
            }
            if let Poll::Ready(res) = serving.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            if deadline.is_none() && conn.close_requested() {
                continue;
            }
            break;
        }
        if let Some(d) = deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    watcher.abort();
    match res {
        Some(Ok(())) => {}
        Some(Err(error)) => debug!(%error, "connection ended with an error"),
        None => debug!("graceful shutdown timed out"),
    }
}

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;
