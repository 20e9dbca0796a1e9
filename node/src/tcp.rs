//! TCP mode: one balanced upstream connection per client connection.
//!
//! The instance is picked when the client connects (after TLS termination on
//! `tls` ports, where SNI chooses among groups sharing the port) and counts
//! in flight until either side closes. A connect failure before any byte was
//! sent marks the instance down and tries another, at most three attempts.
//! Bytes are spliced both ways; a connection idle in both directions for
//! `tcp_idle_timeout` is closed, and so is one to an instance whose drain
//! timeout has passed after it was detached.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::balancer::Pick;
use crate::dataplane::{ConnInfo, DataPlane};
use crate::routing::Target;

/// Most instances tried for one connection.
const MAX_ATTEMPTS: usize = 3;

/// Connects to `address:port` (an IP literal or a host name) within `timeout`.
pub async fn connect(address: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        let stream = match address.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect((ip, port)).await?,
            Err(_) => TcpStream::connect((address, port)).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
}

/// Proxies one client connection to an instance of `target`'s group.
pub async fn proxy<I>(mut client: I, conn: ConnInfo, target: Arc<Target>, dp: Arc<DataPlane>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let balancer = &target.group.balancer;
    for _ in 0..MAX_ATTEMPTS {
        let lease = match balancer.pick(Instant::now(), &mut rand::rng()) {
            Pick::Selected(lease) => lease,
            Pick::NoInstances | Pick::Overloaded => {
                debug!(peer = %conn.peer, group = %target.group.name, "no instance available; closing");
                return;
            }
        };
        let backend = lease.backend().clone();
        let upstream = match connect(
            &backend.address,
            target.destination_port,
            dp.settings.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(instance = %backend.name, error = %e, "connect failed");
                backend.metrics.connect_errors.inc();
                balancer.mark_down(&backend, Instant::now());
                continue;
            }
        };
        balancer.mark_up(&backend);
        backend.metrics.connections.inc();
        let started = Instant::now();
        let activity = Arc::new(AtomicU64::new(0));
        let mut upstream = Counted {
            inner: upstream,
            rx: backend.metrics.bytes_rx.clone(),
            tx: backend.metrics.bytes_tx.clone(),
            activity: activity.clone(),
        };
        let drained = backend.drain_token();
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    debug!(instance = %backend.name, error = %e, "tcp splice ended");
                }
            }
            () = idle(activity, dp.settings.tcp_idle_timeout) => {
                debug!(instance = %backend.name, "tcp connection idle; closing");
            }
            () = drained.cancelled() => {
                debug!(instance = %backend.name, "instance drained; closing");
            }
        }
        let now = Instant::now();
        backend
            .metrics
            .duration
            .observe(now.saturating_duration_since(started).as_secs_f64());
        lease.release(now);
        return;
    }
    debug!(peer = %conn.peer, group = %target.group.name, "every attempt failed; closing");
}

/// Resolves once `activity` has not moved for a whole `timeout`.
async fn idle(activity: Arc<AtomicU64>, timeout: Duration) {
    let mut seen = activity.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(timeout).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// The upstream side of a splice: counts bytes per direction and activity.
struct Counted<S> {
    inner: S,
    rx: IntCounter,
    tx: IntCounter,
    activity: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.rx.inc_by(n);
            self.activity.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.inc_by(n as u64);
            self.activity.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
