//! TCP mode: one balanced upstream connection per client connection.
//!
//! The instance is picked when the client connects (after TLS termination on
//! `tls` ports, where SNI chooses among groups sharing the port) and counts
//! in flight until either side closes. A connect failure before any byte was
//! sent marks the instance down and tries another, at most three attempts.
//! Bytes are moved both ways: between two plain sockets by [`pump`] (copied
//! through the stack at first, spliced in the kernel while a direction that
//! has moved 64 KiB carries a bulk stream), out of a TLS session by tokio's
//! `copy_bidirectional`. A
//! connection idle in both directions for `tcp_idle_timeout` is closed, and
//! so is one to an instance whose drain timeout has passed after it was
//! detached.

pub(crate) mod pump;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::access_log::{Client, Entry, client_ip};
use crate::balancer::{Backend, Lease};
use crate::dataplane::{Attempts, ConnInfo, DataPlane, Unserved};
use crate::routing::Target;
use crate::upstream::{CountingIo, Traffic, idle};

/// Proxies one plain TCP client connection to an instance of `target`'s
/// group.
pub async fn proxy_plain(client: TcpStream, conn: ConnInfo, target: Target, dp: Arc<DataPlane>) {
    let mut log = Logged::new(&conn, &target, &dp);
    // A syscall: only for a group that sends the PROXY header.
    let local = target
        .group
        .send_proxy_protocol
        .and_then(|_| client.local_addr().ok());
    let Some((lease, upstream)) = connect(&conn, &target, &dp, &mut log, local).await else {
        return;
    };
    let backend = lease.backend().clone();
    backend.metrics.connections.inc();
    let traffic = Arc::new(Traffic::default());
    let metrics = &backend.metrics;
    let pumping = pump::both_ways(
        client,
        upstream,
        &metrics.bytes_tx,
        &metrics.bytes_rx,
        &traffic,
    );
    serve(pumping, lease, &backend, traffic.clone(), &dp, log).await;
}

/// Proxies one client connection (a TLS session) to an instance of
/// `target`'s group.
///
/// `local` is the published address the client connected to, for a PROXY
/// protocol header to the instance (`None` when the group sends none).
pub async fn proxy<I>(
    mut client: I,
    conn: ConnInfo,
    target: Target,
    dp: Arc<DataPlane>,
    local: Option<std::net::SocketAddr>,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut log = Logged::new(&conn, &target, &dp);
    let Some((lease, upstream)) = connect(&conn, &target, &dp, &mut log, local).await else {
        return;
    };
    let backend = lease.backend().clone();
    let traffic = Arc::new(Traffic::default());
    let mut upstream = CountingIo::new(upstream, &backend.metrics, Some(traffic.clone()));
    let copying = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    serve(copying, lease, &backend, traffic, &dp, log).await;
}

/// Picks and connects an instance (at most three attempts); with the
/// group's `send_proxy_protocol`, the header goes first (a failure to send
/// it is a failed connect).
async fn connect(
    conn: &ConnInfo,
    target: &Target,
    dp: &DataPlane,
    log: &mut Logged<'_>,
    local: Option<std::net::SocketAddr>,
) -> Option<(Lease, TcpStream)> {
    let mut tries = Attempts::new(target);
    loop {
        let (lease, pool) = match tries.next() {
            Ok(next) => next,
            Err(why) => {
                debug!(peer = %conn.peer, group = %target.group.name, ?why, "no instance for the connection; closing");
                let origin = match why {
                    Unserved::Failed(_) => "upstream",
                    _ => "internal",
                };
                log.attempts = tries.made();
                log.end(None, (0, 0), Some((origin, &why)), Instant::now());
                return None;
            }
        };
        let dialing = log.timing().then(Instant::now);
        let dialed = match pool.dial(dp.settings.connect_timeout).await {
            Ok(s) => match target.group.send_proxy_protocol {
                Some(version) => {
                    let header = crate::proxy_protocol::header(
                        version,
                        conn.peer,
                        local.unwrap_or(conn.peer),
                    );
                    send_header(s, &header, dp.settings.connect_timeout).await
                }
                None => Ok(s),
            },
            Err(e) => Err(e),
        };
        match dialed {
            Ok(s) => {
                lease.mark_up();
                log.attempts = tries.made();
                log.connect = dialing.map(|t| t.elapsed());
                return Some((lease, s));
            }
            Err(error) => tries.failed(lease, error),
        }
    }
}

/// Writes a PROXY protocol header to a new connection to an instance,
/// within `timeout`.
async fn send_header(
    mut s: TcpStream,
    header: &[u8],
    timeout: Duration,
) -> Result<TcpStream, crate::upstream::ConnectError> {
    use tokio::io::AsyncWriteExt;
    match tokio::time::timeout(timeout, s.write_all(header)).await {
        Ok(Ok(())) => Ok(s),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(crate::upstream::ConnectError::Timeout),
    }
}

/// Runs `moving` until it ends, the connection is idle for
/// `tcp_idle_timeout` or the instance is drained; then ends the lease.
async fn serve(
    moving: impl Future<Output = io::Result<(u64, u64)>>,
    lease: Lease,
    backend: &Backend,
    traffic: Arc<Traffic>,
    dp: &DataPlane,
    log: Logged<'_>,
) {
    let started = Instant::now();
    let drained = backend.drain_token();
    let mut io_error = None;
    let ended: Option<&'static str> = tokio::select! {
        r = moving => {
            if let Err(e) = r {
                debug!(instance = %backend.name, error = %e, "tcp splice ended");
                io_error = Some(e);
            }
            None
        }
        () = idle(traffic.clone(), dp.settings.tcp_idle_timeout) => {
            debug!(instance = %backend.name, "tcp connection idle; closing");
            Some("idle timeout")
        }
        () = drained.cancelled() => {
            debug!(instance = %backend.name, "instance drained; closing");
            Some("instance drained")
        }
    };
    let now = Instant::now();
    backend
        .metrics
        .duration
        .observe(now.saturating_duration_since(started).as_secs_f64());
    lease.release(now);
    let error = match (&io_error, &ended) {
        (Some(e), _) => Some(("io", e as &dyn std::fmt::Display)),
        (None, Some(why)) => Some(("internal", why as &dyn std::fmt::Display)),
        (None, None) => None,
    };
    log.end(Some(&backend.name), traffic.moved(), error, now);
}

/// A TCP connection's access log line, while it is open (nothing when
/// the access log is off or this connection is not in its sample).
struct Logged<'a> {
    /// The access log and when the connection began, when it is logged.
    log: Option<(&'a crate::access_log::AccessLog, Instant)>,
    conn: &'a ConnInfo,
    group: &'a str,
    attempts: u32,
    connect: Option<Duration>,
}

impl<'a> Logged<'a> {
    fn new(conn: &'a ConnInfo, target: &'a Target, dp: &'a DataPlane) -> Self {
        Self {
            log: dp.access_log_sampled().map(|log| (log, Instant::now())),
            conn,
            group: &target.group.name,
            attempts: 0,
            connect: None,
        }
    }

    /// Whether the connection is logged (its times are read).
    fn timing(&self) -> bool {
        self.log.is_some()
    }

    /// Writes the line: the instance, bytes to it and to the client; the
    /// connection ended at `now`.
    fn end(
        &self,
        instance: Option<&str>,
        (to_instance, to_client): (u64, u64),
        error: Option<(&'static str, &dyn std::fmt::Display)>,
        now: Instant,
    ) {
        let Some((log, began)) = self.log else {
            return;
        };
        // One line per connection: its client's IP is made here.
        let ip = client_ip(self.conn.peer.ip());
        log.write(&Entry {
            began,
            ended: now,
            client: Some(Client {
                ip: ip.as_bytes(),
                port: self.conn.peer.port(),
            }),
            port: self.conn.port,
            tls: self.conn.tls,
            proto: "TCP",
            group: self.group,
            instance: instance.unwrap_or(""),
            bytes_in: to_instance,
            bytes_out: to_client,
            attempts: self.attempts,
            connect: self.connect,
            error,
            // No request, so no method, host, path, status or response.
            method: "",
            host: b"",
            path: "",
            status: 0,
            response: None,
        });
    }
}
