//! Upstream HTTP/1.1 connections: one [`Pool`] of idle keep-alive
//! connections per instance and destination port.
//!
//! A connection is checked out for one request and goes back only after its
//! response body has been read completely; closed and stale ones are
//! discarded. Each connection's driver task ends it when the instance's
//! drain timeout passes or when it has sat idle in the pool for the idle
//! timeout. The pool's lock is its own and is never held across an await.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use super::error::ConnectError;
use crate::balancer::Backend;
use crate::dataplane::Settings;

/// Idle upstream connections to one instance on one port.
#[derive(Debug)]
pub struct Pool {
    address: String,
    port: u16,
    /// `address` parsed, when it is an IP literal (no resolver needed).
    ip: Option<IpAddr>,
    idle: Mutex<VecDeque<Idle>>,
}

#[derive(Debug)]
struct Idle {
    conn: PooledConn,
    since: Instant,
}

impl Pool {
    /// A pool for the instance at `address` (IP or host name), `port`.
    pub fn new(address: &str, port: u16) -> Self {
        let ip = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok();
        Self {
            address: address.to_owned(),
            port,
            ip,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// The instance's address as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Idle connections now held.
    pub fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// The most recently used idle connection that is still open and not
    /// older than `max_age`.
    pub(crate) fn checkout(&self, max_age: Duration) -> Option<PooledConn> {
        let mut stale = VecDeque::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut found = None;
            while let Some(entry) = idle.pop_back() {
                if entry.since.elapsed() > max_age {
                    // Everything older is staler still.
                    stale = std::mem::take(&mut *idle);
                    stale.push_back(entry);
                    break;
                }
                if !entry.conn.sender.is_closed() && entry.conn.slot.claim() {
                    found = Some(entry.conn);
                    break;
                }
            }
            found
        };
        drop(stale);
        found
    }

    /// Returns a connection whose response was read completely.
    pub(crate) fn checkin(&self, conn: PooledConn, max_idle: usize) {
        if max_idle == 0 || conn.sender.is_closed() || !conn.slot.release() {
            return;
        }
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let evicted = if idle.len() >= max_idle { idle.pop_front() } else { None };
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
            evicted
        };
        drop(evicted);
    }

    /// Opens a new connection to the instance. `upgrades` makes a dedicated
    /// connection that can switch protocols (never pooled).
    pub(crate) async fn connect(
        &self,
        backend: &Backend,
        settings: &Settings,
        upgrades: bool,
    ) -> Result<PooledConn, ConnectError> {
        let connecting = async {
            match self.ip {
                Some(ip) => TcpStream::connect(SocketAddr::new(ip, self.port)).await,
                None => TcpStream::connect((self.address.as_str(), self.port)).await,
            }
        };
        let stream = tokio::time::timeout(settings.connect_timeout, connecting)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        stream.set_nodelay(true)?;
        let metrics = &backend.metrics;
        metrics.connections.inc();
        let io = TokioIo::new(CountingIo {
            inner: stream,
            rx: metrics.bytes_rx.clone(),
            tx: metrics.bytes_tx.clone(),
        });
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        let slot = Arc::new(Slot::default());
        let drain = backend.drain_token();
        let span = tracing::debug_span!("upstream", instance = %backend.name);
        if upgrades {
            tokio::spawn(drive_upgradable(conn, drain).instrument(span));
        } else {
            let idle_timeout = settings.pool_idle_timeout;
            tokio::spawn(drive(conn, drain, slot.clone(), idle_timeout).instrument(span));
        }
        Ok(PooledConn { sender, slot })
    }
}

/// One upstream HTTP/1.1 connection's request side.
#[derive(Debug)]
pub(crate) struct PooledConn {
    pub(crate) sender: http1::SendRequest<Incoming>,
    slot: Arc<Slot>,
}

/// Whether a connection is idle in its pool, shared with its driver task so
/// that exactly one of "check out" and "close as idle too long" wins.
///
/// The value is a generation counter times two, plus one while idle;
/// [`CLOSED`] once the driver has closed it.
#[derive(Debug, Default)]
struct Slot(AtomicU64);

const CLOSED: u64 = u64::MAX;

impl Slot {
    /// Idle → busy; false if the driver closed it.
    fn claim(&self) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        cur != CLOSED
            && cur & 1 == 1
            && self
                .0
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Busy → idle (a new generation); false if closed.
    fn release(&self) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        cur != CLOSED
            && cur & 1 == 0
            && self
                .0
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Runs a pooled connection until it fails, its senders are gone, the
/// instance drains, or it sat idle through a whole `idle_timeout` tick.
async fn drive(
    conn: http1::Connection<TokioIo<CountingIo>, Incoming>,
    drain: CancellationToken,
    slot: Arc<Slot>,
    idle_timeout: Duration,
) {
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(idle_timeout.max(Duration::from_millis(10)));
    tick.tick().await;
    let mut last = slot.0.load(Ordering::Acquire);
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(error) = res {
                    debug!(%error, "upstream connection failed");
                }
                return;
            }
            () = drain.cancelled() => {
                debug!("upstream connection closed: instance drained");
                return;
            }
            _ = tick.tick() => {
                let cur = slot.0.load(Ordering::Acquire);
                if cur == last
                    && cur & 1 == 1
                    && slot.0.compare_exchange(cur, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok()
                {
                    debug!("idle upstream connection closed");
                    return;
                }
                last = cur;
            }
        }
    }
}

/// Runs a dedicated connection that may be upgraded; once upgraded, the
/// tunnel owns the socket and ends it on drain.
async fn drive_upgradable(conn: http1::Connection<TokioIo<CountingIo>, Incoming>, drain: CancellationToken) {
    tokio::select! {
        res = conn.with_upgrades() => {
            if let Err(error) = res {
                debug!(%error, "upstream connection failed");
            }
        }
        () = drain.cancelled() => debug!("upstream connection closed: instance drained"),
    }
}

/// A TCP stream to an instance that counts the bytes both ways.
#[derive(Debug)]
pub(crate) struct CountingIo {
    inner: TcpStream,
    rx: IntCounter,
    tx: IntCounter,
}

impl AsyncRead for CountingIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.rx.inc_by(n as u64);
        }
        res
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.tx.inc_by(n as u64);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.tx.inc_by(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_claim_release_close() {
        let s = Slot::default();
        assert!(!s.claim(), "a new connection is busy");
        assert!(s.release());
        assert!(!s.release());
        assert!(s.claim());
        assert!(s.release());
        let idle = s.0.load(Ordering::Acquire);
        assert!(s.0.compare_exchange(idle, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok());
        assert!(!s.claim());
        assert!(!s.release());
    }

    #[test]
    fn pool_parses_ip_literals() {
        assert_eq!(Pool::new("10.0.0.1", 80).ip, Some(IpAddr::from([10, 0, 0, 1])));
        assert!(Pool::new("::1", 80).ip.is_some());
        assert!(Pool::new("[::1]", 80).ip.is_some());
        assert_eq!(Pool::new("backend.internal", 80).ip, None);
        assert_eq!(Pool::new("backend.internal", 80).address(), "backend.internal");
    }
}
