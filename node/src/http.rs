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
//! again. Once a request byte reached an instance nothing is retried: a
//! request is sent again on a new connection only when none of its bytes
//! could be written to a pooled one the instance had closed.

mod body;
pub(crate) mod conn;
mod error;
pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod lean;
pub(crate) mod log;
pub(crate) mod redirect;
pub(crate) mod reply;
mod streams;
mod upgrade;

#[cfg(test)]
mod tests;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
/// then it closes. `held` (the listener's connection slot) is dropped when
/// the connection ends.
///
/// Not an `async fn`: one would keep its own copy of the arguments beside
/// `serve`'s for as long as the connection is open.
pub fn serve_connection<I, H>(
    io: I,
    conn: ConnInfo,
    dp: Arc<DataPlane>,
    shutdown: CancellationToken,
    held: H,
) -> impl Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Send + 'static,
{
    let span = tracing::debug_span!("http", peer = %conn.peer, port = conn.port, tls = conn.tls);
    serve(io, conn, dp, shutdown, held).instrument(span)
}

async fn serve<I, H>(
    io: I,
    info: ConnInfo,
    dp: Arc<DataPlane>,
    shutdown: CancellationToken,
    _held: H,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn::new(info, dp.clone(), shutdown.clone()));
    // The node's shutdown asks it to close (see `OpenConns`).
    let _open = dp.open.register(&conn, &shutdown);
    let mut io = TimedIo::new(io, conn.clone());
    // Counted in `edgelb_http_parked_connections` while waiting parked.
    let mut parked = false;
    let end = loop {
        // Parked (or new): nothing but the socket is held until the client
        // sends.
        if !io.has_unread() {
            let read = read_some(&mut io, &conn, &mut parked).await;
            if std::mem::take(&mut parked) {
                dp.parked.dec();
            }
            match read {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(Ended::Io(e)),
            }
        }
        // Boxed, both: while parked, the task holds neither (a future is
        // as large as its largest state).
        if io.h2() {
            break Box::pin(serve_h2(io, &conn)).await;
        }
        // Boxed, as hyper's are below: a waiting connection holds neither.
        match Box::pin(lean::serve(&mut io, &conn)).await {
            lean::Lean::Served => continue,
            lean::Lean::Close => break Ok(()),
            lean::Lean::Hyper => {}
        }
        match Box::pin(serve_h1(io, &conn)).await {
            H1::Parked(back) => {
                io = back;
                if !io.has_unread() {
                    parked = true;
                    dp.parked.inc();
                }
            }
            H1::Ended(end) => break end,
        }
    };
    match end {
        Ok(()) => {}
        Err(Ended::Io(error)) => debug!(%error, "connection ended with an error"),
        Err(Ended::Http(error)) => debug!(%error, "connection ended with an error"),
        Err(Ended::DrainTimedOut) => debug!("graceful shutdown timed out"),
    }
}

/// Why a connection ended other than by closing cleanly.
enum Ended {
    Io(std::io::Error),
    Http(hyper::Error),
    DrainTimedOut,
}

/// How an HTTP/1 connection left hyper.
enum H1<I> {
    /// Idle for `park_after`: the I/O, holding any bytes already read of a
    /// next request, for the next round.
    Parked(TimedIo<I>),
    Ended(Result<(), Ended>),
}

/// Waits for the client's next bytes without holding a buffer (a stack
/// buffer is used for the read itself) and leaves them unread in `io`;
/// false at the end of the stream or when the connection should close
/// (idle timeout, shutdown). A connection still waiting when it has been
/// idle for `park_after` (after a request of the lean path) is counted as
/// parked from then on: `parked` is set and the gauge raised.
async fn read_some<I>(io: &mut TimedIo<I>, conn: &Conn, parked: &mut bool) -> std::io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    poll_fn(|cx| {
        conn.set_waker(cx.waker());
        if conn.close_requested() {
            return Poll::Ready(Ok(false));
        }
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); PARKED_READ];
        let mut read = ReadBuf::uninit(&mut buf);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(())) => {
                let bytes = Bytes::copy_from_slice(read.filled());
                io.unread(bytes);
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The idle timeout asks for the close inside the read.
            Poll::Pending if conn.close_requested() => Poll::Ready(Ok(false)),
            Poll::Pending => {
                if conn.take_park() && !*parked {
                    *parked = true;
                    conn.dp.parked.inc();
                }
                Poll::Pending
            }
        }
    })
    .await
}

/// The stack buffer of a parked connection's read: most request heads fit,
/// and hyper reads the rest.
const PARKED_READ: usize = 4096;

async fn serve_h1<I>(io: TimedIo<I>, conn: &Arc<Conn>) -> H1<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &conn.dp.settings;
    let mut builder = http1::Builder::new();
    // hyper's own header timeout closes without a response and runs from
    // the end of the previous response; TimedIo implements ours.
    builder
        .max_buf_size(settings.max_header_bytes.max(MIN_H1_BUF))
        .header_read_timeout(None)
        // A proxy forwards the instance's Date; it does not add one.
        .auto_date_header(false);
    let svc_conn = conn.clone();
    let service = service_fn(move |req| forward::handle(req, ActiveGuard::new(&svc_conn)));
    let mut serving = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let driven = drive(
        conn,
        Pin::new(&mut serving),
        |c| c.graceful_shutdown(),
        true,
    )
    .await;
    conn.set_parking(false);
    match driven {
        Driven::Parked => match serving.into_parts() {
            Some(parts) => {
                let mut io = parts.io.into_inner();
                if !parts.read_buf.is_empty() {
                    // Copied: a slice of hyper's read buffer would keep
                    // all of its 8 KiB alive.
                    io.unread(Bytes::copy_from_slice(&parts.read_buf));
                }
                H1::Parked(io)
            }
            // Upgraded meanwhile: the tunnel has the socket.
            None => H1::Ended(Ok(())),
        },
        Driven::Ended(end) => H1::Ended(end),
    }
}

async fn serve_h2<I>(io: TimedIo<I>, conn: &Arc<Conn>) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &conn.dp.settings;
    let (spawner, started) = streams::queue();
    let mut builder = http2::Builder::new(spawner);
    builder
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .auto_date_header(false);
    let svc_conn = conn.clone();
    // Boxed: hyper moves each stream's future several times on its way
    // to the executor, and a box moves as a pointer (callgrind, 20,000
    // requests over 16 × 32 streams: 54,679 → 52,134 instructions per
    // request on the worker, a quarter of the copying gone). HTTP/1 keeps
    // its future in place, in a slot of hyper's.
    let service =
        service_fn(move |req| Box::pin(forward::handle(req, ActiveGuard::new(&svc_conn))));
    let serving = std::pin::pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut serving = std::pin::pin!(streams::Streams::new(serving, started));
    match drive(
        conn,
        serving.as_mut(),
        |s| s.get_mut().conn.as_mut().graceful_shutdown(),
        false,
    )
    .await
    {
        Driven::Ended(end) => end,
        // Never asked for: HTTP/2 connections are not parked.
        Driven::Parked => Ok(()),
    }
}

/// How [`drive`] ended.
enum Driven {
    /// hyper ended its part of an idle HTTP/1 connection that was parked.
    Parked,
    Ended(Result<(), Ended>),
}

/// Polls hyper's connection until it ends. A close request (idle timeout,
/// node shutdown) starts its graceful shutdown, which has the drain timeout
/// to finish; with `parkable`, a park request ends it at once (hyper is
/// between requests and answers nothing), without shutting the socket down.
/// `parkable` is HTTP/1's mark: an HTTP/2 connection (not parkable) also
/// closes on a soft drain at once, where HTTP/1 answers its next request
/// with `Connection: close` first.
async fn drive<F>(
    conn: &Conn,
    mut serving: Pin<&mut F>,
    graceful_shutdown: impl Fn(Pin<&mut F>),
    parkable: bool,
) -> Driven
where
    F: Future<Output = hyper::Result<()>>,
{
    let drain = conn.dp.settings.drain_timeout;
    let mut deadline: Option<Pin<Box<Sleep>>> = None;
    let mut parking = false;
    // A soft drain closes an HTTP/2 connection as any close does (GOAWAY
    // lets the client finish and retry safely); an HTTP/1 one (the
    // parkable kind) answers its next request first.
    let closing = || conn.close_requested() || (!parkable && conn.closes_after_response());
    let res = poll_fn(|cx| {
        // Registered before the checks below, so that a wake between them
        // and `Pending` is not lost.
        conn.set_waker(cx.waker());
        loop {
            if deadline.is_none() && closing() {
                graceful_shutdown(serving.as_mut());
                deadline = Some(Box::pin(tokio::time::sleep(drain)));
            } else if parkable && !parking && deadline.is_none() && conn.take_park() {
                parking = true;
                conn.set_parking(true);
                graceful_shutdown(serving.as_mut());
            }
            if let Poll::Ready(res) = serving.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            if deadline.is_none() && (closing() || (parkable && !parking && conn.park_requested()))
            {
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
    match res {
        Some(Ok(())) if parking && deadline.is_none() => Driven::Parked,
        Some(Ok(())) => Driven::Ended(Ok(())),
        Some(Err(e)) => Driven::Ended(Err(Ended::Http(e))),
        None => Driven::Ended(Err(Ended::DrainTimedOut)),
    }
}

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;
