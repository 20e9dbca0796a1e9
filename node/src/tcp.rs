//! TCP mode: one balanced upstream connection per client connection.
//!
//! The instance is picked when the client connects (after TLS termination on
//! `tls` ports, where SNI chooses among groups sharing the port) and counts
//! in flight until either side closes. A connect failure before any byte was
//! sent marks the instance down and tries another, at most three attempts.
//! Bytes are moved both ways: between two plain sockets by [`pump`] (copied
//! through the stack at first, spliced in the kernel once a direction has
//! moved 64 KiB), out of a TLS session by tokio's `copy_bidirectional`. A
//! connection idle in both directions for `tcp_idle_timeout` is closed, and
//! so is one to an instance whose drain timeout has passed after it was
//! detached.

pub(crate) mod pump;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::balancer::{Backend, Lease};
use crate::dataplane::{Attempts, ConnInfo, DataPlane};
use crate::routing::Target;
use crate::upstream::{CountingIo, idle};

/// Proxies one plain TCP client connection to an instance of `target`'s
/// group.
pub async fn proxy_plain(client: TcpStream, conn: ConnInfo, target: Target, dp: Arc<DataPlane>) {
    let Some((lease, upstream)) = connect(&conn, &target, &dp).await else {
        return;
    };
    let backend = lease.backend().clone();
    backend.metrics.connections.inc();
    let activity = Arc::new(AtomicU64::new(0));
    let metrics = &backend.metrics;
    let pumping = pump::both_ways(
        client,
        upstream,
        &metrics.bytes_tx,
        &metrics.bytes_rx,
        &activity,
    );
    serve(pumping, lease, &backend, activity.clone(), &dp).await;
}

/// Proxies one client connection (a TLS session) to an instance of
/// `target`'s group.
pub async fn proxy<I>(mut client: I, conn: ConnInfo, target: Target, dp: Arc<DataPlane>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Some((lease, upstream)) = connect(&conn, &target, &dp).await else {
        return;
    };
    let backend = lease.backend().clone();
    let activity = Arc::new(AtomicU64::new(0));
    let mut upstream = CountingIo::new(upstream, &backend.metrics, Some(activity.clone()));
    let copying = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    serve(copying, lease, &backend, activity, &dp).await;
}

/// Picks and connects an instance (at most three attempts).
async fn connect(conn: &ConnInfo, target: &Target, dp: &DataPlane) -> Option<(Lease, TcpStream)> {
    let mut tries = Attempts::new(target);
    loop {
        let (lease, pool) = match tries.next() {
            Ok(next) => next,
            Err(why) => {
                debug!(peer = %conn.peer, group = %target.group.name, ?why, "no instance for the connection; closing");
                return None;
            }
        };
        match pool.dial(dp.settings.connect_timeout).await {
            Ok(s) => {
                lease.mark_up();
                return Some((lease, s));
            }
            Err(error) => tries.failed(lease, error),
        }
    }
}

/// Runs `moving` until it ends, the connection is idle for
/// `tcp_idle_timeout` or the instance is drained; then ends the lease.
async fn serve(
    moving: impl Future<Output = io::Result<(u64, u64)>>,
    lease: Lease,
    backend: &Backend,
    activity: Arc<AtomicU64>,
    dp: &DataPlane,
) {
    let started = Instant::now();
    let drained = backend.drain_token();
    tokio::select! {
        r = moving => {
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
}
