//! TCP mode: one balanced upstream connection per client connection.
//!
//! The instance is picked when the client connects (after TLS termination on
//! `tls` ports, where SNI chooses among groups sharing the port) and counts
//! in flight until either side closes. A connect failure before any byte was
//! sent marks the instance down and tries another, at most three attempts.
//! Bytes are spliced both ways; a connection idle in both directions for
//! `tcp_idle_timeout` is closed, and so is one to an instance whose drain
//! timeout has passed after it was detached.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::dataplane::{Attempts, ConnInfo, DataPlane};
use crate::routing::Target;
use crate::upstream::{CountingIo, idle};

/// Proxies one client connection to an instance of `target`'s group.
pub async fn proxy<I>(mut client: I, conn: ConnInfo, target: Target, dp: Arc<DataPlane>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut tries = Attempts::new(&target);
    let (lease, upstream) = loop {
        let (lease, pool) = match tries.next() {
            Ok(next) => next,
            Err(why) => {
                debug!(peer = %conn.peer, group = %target.group.name, ?why, "no instance for the connection; closing");
                return;
            }
        };
        match pool.dial(dp.settings.connect_timeout).await {
            Ok(s) => break (lease, s),
            Err(error) => tries.failed(lease, error),
        }
    };
    lease.mark_up();
    let backend = lease.backend().clone();
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let mut upstream = CountingIo::new(upstream, &backend.metrics, Some(activity.clone()));
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
}
