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

pub mod upstream;

mod body;
mod conn;
mod error;
mod forward;
mod headers;
mod redirect;
mod upgrade;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
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
pub async fn serve_connection<I>(io: I, conn: ConnInfo, dp: Arc<DataPlane>, shutdown: CancellationToken)
where
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
        .header_read_timeout(None);
    builder
        .http2()
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let drain_timeout = settings.drain_timeout;

    let conn = Arc::new(Conn::new(info, dp.clone(), shutdown.clone()));
    let io = TimedIo::new(io, conn.clone());
    let svc_conn = conn.clone();
    let service = service_fn(move |req| forward::handle(req, ActiveGuard::new(&svc_conn)));
    let serving = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(serving);

    let finished = tokio::select! {
        res = serving.as_mut() => Some(res),
        () = shutdown.cancelled() => None,
        () = conn.idle_expired() => None,
    };
    let res = match finished {
        Some(res) => res,
        None => {
            serving.as_mut().graceful_shutdown();
            match tokio::time::timeout(drain_timeout, serving.as_mut()).await {
                Ok(res) => res,
                Err(_) => {
                    debug!("graceful shutdown timed out");
                    return;
                }
            }
        }
    };
    if let Err(error) = res {
        debug!(%error, "connection ended with an error");
    }
}

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;
