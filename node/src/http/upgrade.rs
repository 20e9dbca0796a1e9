//! Upgraded connections (WebSocket and other `Upgrade` protocols): after the
//! instance answers 101, client and instance bytes are spliced both ways.
//! The tunnel counts as one request in flight until either side closes, no
//! byte has moved either way for `tunnel_idle_timeout`, the instance's
//! drain timeout passes, or the node's shutdown drain ends.

use std::sync::Arc;
use std::time::Instant;

use http::Response;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug};

use super::body::ProxyBody;
use super::conn::Conn;
use super::headers;
use super::log::Log;
use crate::balancer::Lease;
use crate::upstream::{PooledConn, idle};

/// Answers the client's upgrade request with the instance's 101 and starts
/// the tunnel.
pub(crate) fn tunnel(
    mut resp: Response<Incoming>,
    up: PooledConn,
    client: OnUpgrade,
    lease: Lease,
    start: Instant,
    conn: &Arc<Conn>,
    log: Log,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, true);
    conn.set_tunnel();
    let shutdown = conn.shutdown.clone();
    let drain_timeout = conn.dp.settings.drain_timeout;
    let idle_timeout = conn.dp.settings.tunnel_idle_timeout;
    let activity = up.activity.clone();
    // The client's connection lives on in the tunnel once hyper's ends:
    // counted for the worker's memory collector until the tunnel closes.
    let counted = crate::workers::Connection::new(());
    let task = async move {
        let _counted = counted;
        let drained = lease.backend().drain_token();
        let traffic = activity.clone();
        let splice = async {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(both) => both,
                Err(error) => {
                    debug!(%error, "upgrade failed");
                    return;
                }
            };
            // The sender is no longer needed once the socket is handed over.
            drop(up);
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((to_instance, to_client)) => debug!(to_instance, to_client, "tunnel closed"),
                Err(error) => debug!(%error, "tunnel failed"),
            }
        };
        let stop = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain_timeout).await;
        };
        let idle = async {
            match activity {
                Some(activity) => idle(activity, idle_timeout).await,
                // Every upgradable connection counts its bytes.
                None => std::future::pending().await,
            }
        };
        // The splice runs in a task of its own so that the tokens (whose
        // polls take a lock) are polled only when they fire, not on every
        // chunk.
        let mut splice = tokio::spawn(splice.in_current_span());
        let closed: Option<&'static str> = tokio::select! {
            _ = &mut splice => None,
            () = drained.cancelled() => Some("instance drained"),
            () = stop => Some("shutdown"),
            () = idle => Some("idle timeout"),
        };
        if let Some(why) = closed {
            debug!("tunnel closed: {why}");
        }
        splice.abort();
        let metrics = &lease.backend().metrics;
        metrics.observe_status(101);
        let now = Instant::now();
        metrics
            .duration
            .observe(now.saturating_duration_since(start).as_secs_f64());
        lease.release(now);
        if let Some(mut record) = log {
            // The tunnel's bytes, both ways, as TCP mode logs them.
            let (to_instance, to_client) = traffic.map(|t| t.moved()).unwrap_or_default();
            record.bytes_in = to_instance;
            record.bytes_out = to_client;
            record.end(
                101,
                closed
                    .as_ref()
                    .map(|why| ("internal", why as &dyn std::fmt::Display)),
                now,
            );
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    Response::from_parts(parts, ProxyBody::empty())
}
