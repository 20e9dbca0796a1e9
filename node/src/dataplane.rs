//! What every connection handler shares: the current routing table, the
//! data-plane settings, and the instances tried in turn ([`Attempts`]), the
//! same for a TCP connection and an HTTP request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
pub use ipnet::IpNet;
use prometheus::{IntCounterVec, IntGauge};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::balancer::{Lease, Pick};
use crate::routing::{RoutingTable, Target};
use crate::upstream::{ConnectError, Pool};

/// Most instances tried for one TCP connection or HTTP request.
pub(crate) const MAX_ATTEMPTS: usize = 3;

/// Limits and timeouts of the data plane (see the README's table).
#[derive(Clone, Debug)]
pub struct Settings {
    /// From accept (or the first byte of a next keep-alive request) until the
    /// request header block is complete; then 408 and close.
    pub header_timeout: Duration,
    /// Largest request header block; larger gets 431.
    pub max_header_bytes: usize,
    /// Connecting to an instance; a timeout marks it down and tries another.
    pub connect_timeout: Duration,
    /// Waiting for an instance's response headers; then 504.
    pub upstream_timeout: Duration,
    /// An idle client keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    /// An HTTP/1 connection idle between requests for this long gives its
    /// buffers back (hyper's read and write buffers, 16 KiB): only the
    /// socket and a few hundred bytes stay until the client sends again.
    /// Zero: at once, as HAProxy and NGINX do (about 5 % more CPU per
    /// kept-alive request under full load: hyper's connection is built
    /// again for each). Idle upstream connections in the pools park after
    /// this too, but not before a second.
    pub park_after: Duration,
    /// A client that takes no part of a response for this long (its
    /// socket stays full) is disconnected.
    pub send_timeout: Duration,
    /// An upgraded connection (WebSocket) with no traffic either way is
    /// closed after this.
    pub tunnel_idle_timeout: Duration,
    /// Clients whose `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are
    /// kept (proxies in front of this node); everyone else's are replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// A TCP-mode connection with no traffic either way is closed after this.
    pub tcp_idle_timeout: Duration,
    /// Published ports whose connections start with a PROXY protocol
    /// header (v1 or v2) from a load balancer in front of the node; its
    /// client address stands for the connection's (see
    /// `crate::proxy_protocol`).
    pub accept_proxy_protocol: Vec<u16>,
    /// How long a detached instance's in-flight work may finish.
    pub drain_timeout: Duration,
    /// Open client connections per node, all ports together.
    pub max_connections: usize,
    /// Open admin API connections; further ones are closed at once, so
    /// that the admin port cannot use up the descriptors the data plane
    /// needs (the admin API's limit, budgeted with the data plane's).
    pub admin_max_connections: usize,
    /// Idle upstream connections kept per instance, port and worker.
    pub pool_max_idle: usize,
    /// An idle upstream connection older than this is not reused.
    pub pool_idle_timeout: Duration,
    /// TLS handshake deadline.
    pub tls_handshake_timeout: Duration,
    /// Data-plane threads, each with its own runtime and its own listener
    /// per published port (see `crate::workers`).
    pub workers: usize,
    /// Published ports this node binds at most, all groups together: each
    /// takes two descriptors per worker (its listener and the copy kept
    /// for an upgrade), budgeted with the connections (`crate::limits`).
    pub max_published_ports: usize,
}

impl Settings {
    /// How long idle upstream connections are kept, and how many.
    pub(crate) fn idle_limits(&self) -> crate::upstream::IdleLimits {
        crate::upstream::IdleLimits {
            max_idle: self.pool_max_idle,
            idle_timeout: self.pool_idle_timeout,
            park_after: self.park_after,
        }
    }

    /// Whether `ip` is one of `trusted_proxies` (an IPv4-mapped IPv6
    /// address as the IPv4 address it maps).
    pub(crate) fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(3),
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            park_after: Duration::from_millis(250),
            send_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(3600),
            trusted_proxies: Vec::new(),
            tcp_idle_timeout: Duration::from_secs(3600),
            accept_proxy_protocol: Vec::new(),
            drain_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            admin_max_connections: 256,
            pool_max_idle: 256,
            pool_idle_timeout: Duration::from_secs(50),
            tls_handshake_timeout: Duration::from_secs(10),
            workers: crate::workers::default_count(),
            max_published_ports: 1024,
        }
    }
}

/// Shared by every listener and connection.
#[derive(Debug)]
pub struct DataPlane {
    pub routes: Arc<ArcSwap<RoutingTable>>,
    pub settings: Settings,
    /// `edgelb_http_parked_connections`: HTTP/1 client connections idle
    /// between requests that hold no buffers (see `Settings::park_after`).
    pub parked: IntGauge,
    /// `edgelb_proxy_protocol_errors_total{reason}`: connections closed on
    /// an `accept_proxy_protocol` port for want of a valid header.
    pub proxy_protocol_errors: IntCounterVec,
    /// The client connections the node's shutdown must reach.
    pub(crate) open: Arc<OpenConns>,
    /// One line per request and connection, when configured.
    pub access_log: Option<crate::access_log::AccessLog>,
    /// The drain is a soft one ([`DataPlane::drain_softly`]).
    soft_drain: std::sync::atomic::AtomicBool,
}

impl DataPlane {
    /// Makes the coming drain a soft one: HTTP/1 connections close after
    /// their next response rather than at once when idle. Set before the
    /// shutdown, by a node that handed its sockets to a new process (whose
    /// clients must not see a close race their request).
    pub fn drain_softly(&self) {
        self.soft_drain
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn drains_softly(&self) -> bool {
        self.soft_drain.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn new(settings: Settings) -> Self {
        Self {
            routes: Arc::new(ArcSwap::from_pointee(RoutingTable::default())),
            settings,
            parked: IntGauge::new(
                "edgelb_http_parked_connections",
                "HTTP/1 client connections idle between requests that hold no buffers (parked).",
            )
            .expect("a valid metric name and help text"),
            proxy_protocol_errors: IntCounterVec::new(
                prometheus::Opts::new(
                    "edgelb_proxy_protocol_errors_total",
                    "Connections closed on a PROXY protocol port for want of a valid header, by reason.",
                ),
                &["reason"],
            )
            .expect("a valid metric name and help text"),
            open: Arc::default(),
            access_log: None,
            soft_drain: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The data plane with an access log.
    #[must_use]
    pub fn with_access_log(mut self, log: crate::access_log::AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// The access log, when this request or connection is one it logs
    /// (`access_log_sample`).
    pub(crate) fn access_log_sampled(&self) -> Option<&crate::access_log::AccessLog> {
        self.access_log.as_ref().filter(|l| l.sampled())
    }

    /// Registers the data plane's own series (the per-instance ones are
    /// rendered from the routing table).
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.parked.clone()))?;
        if !self.settings.accept_proxy_protocol.is_empty() {
            registry.register(Box::new(self.proxy_protocol_errors.clone()))?;
        }
        if let Some(log) = &self.access_log {
            log.register(registry)?;
        }
        Ok(())
    }
}

/// Who is on the other end of a client connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    /// The published port the client connected to.
    pub port: u16,
    /// TLS was terminated by us.
    pub tls: bool,
    /// When the connection was accepted: the header timeout of its first
    /// request runs from here, through a PROXY header and a TLS handshake.
    pub accepted: Accepted,
}

/// When a connection was accepted, to the millisecond: 4 bytes in every
/// connection's task where an `Instant` takes 16 (with one, a plain HTTP
/// connection's task grew by 24 bytes; with this, by 8).
#[derive(Clone, Copy, Debug)]
pub struct Accepted(u32);

impl Accepted {
    pub fn now() -> Self {
        Self(millis(tokio::time::Instant::now()))
    }

    /// The time it names; right for 49 days (the count wraps).
    pub fn instant(self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now - Duration::from_millis(u64::from(millis(now).wrapping_sub(self.0)))
    }
}

/// Milliseconds since the first call, modulo 2³².
fn millis(t: tokio::time::Instant) -> u32 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let since = t.saturating_duration_since(*EPOCH.get_or_init(tokio::time::Instant::now));
    // Truncated on purpose: the count wraps.
    since.as_millis() as u32
}

/// Why no instance served a connection or request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unserved {
    /// The group has no instance to pick.
    #[error("no instances")]
    NoInstances,
    /// Every instance is at its hard limit.
    #[error("every instance is at its hard limit")]
    Overloaded,
    /// The picked instance has no pool in the table: a broken invariant
    /// (a table's balancer offers only instances of its own group).
    #[error("selected instance has no pool")]
    NoPool,
    /// [`MAX_ATTEMPTS`] instances failed to connect; the last one's error.
    #[error("every attempt failed: {0}")]
    Failed(ConnectError),
}

/// The instances tried for one TCP connection or HTTP request: each
/// [`Attempts::next`] picks one of `target`'s group with its pool for the
/// target's destination port; one that could not be reached goes back
/// through [`Attempts::failed`] (a connect error counted, the instance
/// marked down), at most [`MAX_ATTEMPTS`] times.
pub(crate) struct Attempts<'a> {
    target: &'a Target,
    made: usize,
    last: Option<ConnectError>,
}

impl<'a> Attempts<'a> {
    pub(crate) fn new(target: &'a Target) -> Self {
        Self {
            target,
            made: 0,
            last: None,
        }
    }

    /// The next instance to try, or why there is none.
    pub(crate) fn next(&mut self) -> Result<(Lease, Arc<Pool>), Unserved> {
        if self.made == MAX_ATTEMPTS {
            // Every attempt so far failed, which sets `last`.
            return Err(self
                .last
                .take()
                .map_or(Unserved::NoInstances, Unserved::Failed));
        }
        let lease = match self
            .target
            .group
            .balancer
            .pick(Instant::now(), &mut rand::rng())
        {
            Pick::Selected(lease) => lease,
            Pick::NoInstances => return Err(Unserved::NoInstances),
            Pick::Overloaded => return Err(Unserved::Overloaded),
        };
        let Some(pool) = self.target.pool(lease.backend()) else {
            warn!(instance = %lease.backend().name, "selected instance has no pool");
            return Err(Unserved::NoPool);
        };
        self.made += 1;
        Ok((lease, pool))
    }

    /// Instances picked so far.
    pub(crate) fn made(&self) -> u32 {
        self.made as u32
    }

    /// Connecting to `lease`'s instance failed before anything reached it.
    pub(crate) fn failed(&mut self, lease: Lease, error: ConnectError) {
        let backend = lease.backend();
        debug!(instance = %backend.name, attempt = self.made, %error, "connect failed");
        backend.metrics.connect_errors.inc();
        lease.mark_down(Instant::now());
        self.last = Some(error);
    }
}

/// A client connection that can be asked to close gracefully.
pub(crate) trait Close: Send + Sync {
    fn close(&self);
}

/// The open client connections, told to close when the node shuts down.
///
/// One task waits for the shutdown for all of them: a task per connection
/// would cost every idle connection a second task (a few hundred bytes
/// each) and a registration on the shutdown token, whose lock all workers
/// share. A connection is in one of a few shards (by worker) from
/// [`OpenConns::register`] until its guard drops.
pub(crate) struct OpenConns {
    shards: [Mutex<HashMap<usize, Weak<dyn Close>>>; SHARDS],
    /// The task that waits for the shutdown has been started.
    watching: Once,
}

const SHARDS: usize = 8;

impl Default for OpenConns {
    fn default() -> Self {
        Self {
            shards: Default::default(),
            watching: Once::new(),
        }
    }
}

impl std::fmt::Debug for OpenConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConns")
            .field("len", &self.len())
            .finish()
    }
}

impl OpenConns {
    /// Registers `conn` until the guard drops. When `shutdown` fires, it is
    /// told to close, and at once if it already has. The first
    /// registration starts the task that waits for `shutdown`: a data
    /// plane has one shutdown, the node's.
    pub(crate) fn register<C: Close + 'static>(
        self: &Arc<Self>,
        conn: &Arc<C>,
        shutdown: &CancellationToken,
    ) -> Registered<'_> {
        self.watching.call_once(|| {
            let (open, shutdown) = (Arc::downgrade(self), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                if let Some(open) = open.upgrade() {
                    open.close_all();
                }
            });
        });
        let key = Arc::as_ptr(conn).cast::<()>() as usize;
        let shard = &self.shards[crate::workers::current() % SHARDS];
        let weak: Weak<dyn Close> = Arc::downgrade(conn) as Weak<dyn Close>;
        lock(shard).insert(key, weak);
        // After the insert: a shutdown that fired before it was seen by
        // the sweep or is seen here.
        if shutdown.is_cancelled() {
            conn.close();
        }
        Registered { shard, key }
    }

    fn close_all(&self) {
        for shard in &self.shards {
            let conns: Vec<_> = lock(shard).values().filter_map(Weak::upgrade).collect();
            for conn in conns {
                conn.close();
            }
        }
    }

    /// Connections registered.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connection's place in [`OpenConns`]; dropping it leaves.
pub(crate) struct Registered<'a> {
    shard: &'a Mutex<HashMap<usize, Weak<dyn Close>>>,
    key: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(self.shard).remove(&self.key);
    }
}

#[cfg(test)]
mod open_conns_tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Close for Flag {
        fn close(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Flag {
        fn closed(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn the_shutdown_reaches_open_connections_and_only_those() {
        let open = Arc::new(OpenConns::default());
        let shutdown = CancellationToken::new();
        let (a, b, gone) = (
            Arc::new(Flag::default()),
            Arc::new(Flag::default()),
            Arc::new(Flag::default()),
        );
        let _a = open.register(&a, &shutdown);
        let _b = open.register(&b, &shutdown);
        drop(open.register(&gone, &shutdown));
        assert_eq!(open.len(), 2, "a guard that dropped left");
        assert!(!a.closed() && !b.closed());
        shutdown.cancel();
        let both = async {
            while !(a.closed() && b.closed()) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(crate::patience::patient(Duration::from_secs(5)), both)
            .await
            .expect("the shutdown reaches both connections");
        assert!(!gone.closed(), "a connection that ended is not told");
        // One that registers after the shutdown is told at once.
        let late = Arc::new(Flag::default());
        let _late = open.register(&late, &shutdown);
        assert!(late.closed());
    }
}
