//! What every connection handler shares: the current routing table and the
//! data-plane settings.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
pub use ipnet::IpNet;

use crate::routing::RoutingTable;

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
    /// How long a detached instance's in-flight work may finish.
    pub drain_timeout: Duration,
    /// Open client connections per node, all ports together.
    pub max_connections: usize,
    /// Open admin API connections; further ones are closed at once, so
    /// that the admin port cannot use up the descriptors the data plane
    /// needs (the admin API's limit, budgeted with the data plane's).
    pub admin_max_connections: usize,
    /// Idle upstream connections kept per instance and port.
    pub pool_max_idle: usize,
    /// An idle upstream connection older than this is not reused.
    pub pool_idle_timeout: Duration,
    /// TLS handshake deadline.
    pub tls_handshake_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(3),
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(3600),
            trusted_proxies: Vec::new(),
            tcp_idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            admin_max_connections: 256,
            pool_max_idle: 256,
            pool_idle_timeout: Duration::from_secs(50),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Shared by every listener and connection.
#[derive(Debug)]
pub struct DataPlane {
    pub routes: Arc<ArcSwap<RoutingTable>>,
    pub settings: Settings,
}

impl DataPlane {
    pub fn new(settings: Settings) -> Self {
        Self {
            routes: Arc::new(ArcSwap::from_pointee(RoutingTable::default())),
            settings,
        }
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
}
