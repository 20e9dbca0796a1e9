//! The admin HTTP API (HTTP/1.1, JSON; SPEC §6) and the `/metrics`,
//! `/healthz` and `/readyz` endpoints.
//!
//! ```text
//!  request ─▶ size check (413) ─▶ route ─┬─ /healthz /readyz            (no token)
//!                                        ├─ /metrics  (metrics_token or admin token, when configured)
//!                                        └─ /v1/… ─▶ bearer token (401) ─▶ handler
//!  handler ─▶ read state ─────────────────────────────────────────▶ 200 envelope
//!          └▶ build Command ─▶ Store::propose ─▶ Applied / StoreError ─▶ envelope
//! ```
//!
//! Reads come from the local state (`Store::state`); with
//! `?consistent=true` a read first confirms with the leader that this node
//! has applied everything committed before the request
//! (`Store::linearize`). Writes answer once `Store::propose` has returned, with the
//! status of the refusal if there was one (400, 404, 409, 503).
//!
//! Every `/v1` route needs `Authorization: Bearer <token>`; an empty
//! configured token admits nobody. Request bodies are limited to 1 MiB
//! (`Content-Length` checked before routing, and the read itself is
//! bounded); request headers to 64 KiB (431) and 10 s from accept or from
//! the first byte of a next keep-alive request (then the connection
//! closes); a kept-alive connection idle for 60 s closes (`timed`).
//! At most `admin_max_connections` connections are open at once, a
//! half of them from one address; further ones are closed as soon as
//! they are accepted.
//! The `/v1/cluster` routes show and change the Raft membership.

mod backoff;
pub(crate) mod certificates;
mod cluster;
pub(crate) mod groups;
mod guard;
mod instances;
mod names;
mod reply;
mod request;
mod scrape;
pub(crate) mod starting;
#[cfg(test)]
mod tests;
mod timed;
mod tls;

use std::convert::Infallible;
use std::fmt::{self, Debug};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dataplane::DataPlane;
use crate::gossip::Gossip;
use crate::metrics::Metrics;
use crate::store::Store;
use reply::{ApiError, Reply, text};
use request::{Flags, check_header_size, check_length};

pub use backoff::AuthBackoff;
pub use edgelb_client::tls::client_config;
pub use timed::{IDLE_TIMEOUT, Timeouts};
pub use tls::AdminCert;

/// From accept (or the first byte of a next keep-alive request) until the
/// request header block is complete (`timed`).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header block.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long `serve` waits for open connections after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the admin API serves from.
pub struct Admin {
    pub store: Arc<Store>,
    pub dataplane: Arc<DataPlane>,
    pub metrics: Arc<Metrics>,
    /// The peers' load reports (instance and cluster views, metrics).
    pub gossip: Arc<Gossip>,
    /// The admin token; `/v1` requests must present it as a bearer token.
    pub token: String,
    /// When set, `GET /metrics` needs it (or the admin token) as a bearer
    /// token; otherwise `/metrics` is open (SPEC §6).
    pub metrics_token: Option<String>,
    /// Groups created without domains get `<name>.<cluster_domain>`.
    pub cluster_domain: String,
    /// `/readyz` answers 200 while this has no problem (state loaded,
    /// listeners bound).
    pub ready: Arc<crate::listeners::Readiness>,
    /// Whether the node can write: `/healthz` and `/readyz` answer 503
    /// with the reason while it cannot.
    pub health: Arc<crate::health::Health>,
    /// How long the node certificates this node signs for joining nodes
    /// are valid (`node_cert_lifetime`).
    pub node_cert_lifetime: Duration,
    /// The token check with its per-address back-off.
    pub(crate) guard: Arc<guard::Guard>,
    /// Serve over TLS with this certificate (`admin_tls`); plain HTTP when
    /// `None`.
    pub tls: Option<Arc<AdminCert>>,
    /// Its connections' header and idle timeouts.
    pub timeouts: Timeouts,
}

impl Admin {
    /// The token check for an admin API whose series are in `metrics`,
    /// with the back-off `settings` (the `guard` field).
    pub(crate) fn auth_guard(settings: AuthBackoff, metrics: &Metrics) -> Arc<guard::Guard> {
        Arc::new(guard::Guard::new(settings, metrics.registry()))
    }
}

impl Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("token", &"<redacted>")
            .field("cluster_domain", &self.cluster_domain)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// Serves the admin API on `listener` until `shutdown` is cancelled; then
/// stops accepting, lets open connections finish their current request and
/// waits for them up to [`SHUTDOWN_GRACE`].
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API listening");
    }
    let acceptor = admin.tls.as_ref().map(AdminCert::acceptor);
    let mut conns = JoinSet::new();
    let limits = Limits::new(admin.dataplane.settings.admin_max_connections);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(held) = limits.admit(peer) else {
                        continue;
                    };
                    debug!(%peer, "admin connection");
                    let _ = stream.set_nodelay(true);
                    let (admin, shutdown) = (admin.clone(), shutdown.clone());
                    let accepted = tokio::time::Instant::now();
                    let conn = Accepted { peer, accepted, _held: held };
                    match acceptor.clone() {
                        None => conns.spawn(connection(stream, conn, admin, shutdown)),
                        Some(tls) => conns.spawn(async move {
                            // The header timeout runs from accept, so it
                            // bounds the handshake too.
                            match tokio::time::timeout(admin.timeouts.header, tls.accept(stream)).await {
                                Ok(Ok(stream)) => connection(stream, conn, admin, shutdown).await,
                                Ok(Err(e)) => debug!(%peer, error = %e, "admin TLS handshake failed"),
                                Err(_) => debug!(%peer, "admin TLS handshake timed out"),
                            }
                        }),
                    };
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = conns.len(),
            "admin connections still open at shutdown; closing them"
        );
    }
}

/// An accepted admin connection: who, when, and its places under the
/// limits.
struct Accepted {
    peer: SocketAddr,
    accepted: tokio::time::Instant,
    _held: Held,
}

/// The admin port's connection limits (the admin API's and, while the
/// node starts, [`starting`]'s): `max` at once, half of them per client
/// address ([`PerClient`]).
#[derive(Clone, Debug)]
struct Limits {
    total: Arc<Semaphore>,
    per_client: PerClient,
}

impl Limits {
    fn new(max: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max)),
            per_client: PerClient::new(max),
        }
    }

    /// Places under both limits for a connection from `peer`; `None`
    /// (logged) when either is full. Such a connection is closed at once:
    /// it must not hold a descriptor the data plane needs.
    fn admit(&self, peer: SocketAddr) -> Option<Held> {
        let Ok(permit) = Arc::clone(&self.total).try_acquire_owned() else {
            debug!(%peer, "admin connection limit reached; closing");
            return None;
        };
        let Some(slot) = self.per_client.take(peer.ip()) else {
            debug!(%peer, "admin connections of this address at their limit; closing");
            return None;
        };
        Some(Held {
            _permit: permit,
            _slot: slot,
        })
    }
}

/// A connection's places under [`Limits`], given back on drop.
struct Held {
    _permit: OwnedSemaphorePermit,
    _slot: ClientSlot,
}

/// Open admin connections per client address, at most half of
/// `admin_max_connections` each (automation writing in parallel from one
/// host, 64 requests at once, still fits): one address that opens connections and
/// sends nothing (each held for the header timeout) cannot take every
/// slot, so probes and operators from elsewhere still get in.
#[derive(Clone, Debug)]
struct PerClient {
    max: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

impl PerClient {
    fn new(max_connections: usize) -> Self {
        Self {
            max: (max_connections / 2).max(1),
            open: Arc::default(),
        }
    }

    /// A slot for a connection from `ip`, unless its address (its /64
    /// for IPv6, as the token back-off counts) has `max` open.
    fn take(&self, ip: IpAddr) -> Option<ClientSlot> {
        let ip = backoff::key(ip);
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            ip,
            of: self.clone(),
        })
    }
}

/// One connection's place among its address's; given back on drop.
#[derive(Debug)]
struct ClientSlot {
    ip: IpAddr,
    of: PerClient,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .of
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn connection<S>(
    stream: S,
    accepted: Accepted,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        peer,
        accepted,
        _held,
    } = accepted;
    let activity = Arc::default();
    let stream = timed::TimedIo::new(stream, Arc::clone(&activity), accepted, admin.timeouts);
    let service = service_fn(move |req: Request<Incoming>| {
        let active = timed::Active::new(&activity);
        if http_body::Body::is_end_stream(req.body()) {
            active.body_read();
        }
        let admin = admin.clone();
        async move {
            let reply = handle(&admin, peer.ip(), req).await;
            // A body the handler took is read by now.
            active.body_read();
            Ok::<_, Infallible>(reply.map(|body| timed::Guarded::new(body, active)))
        }
    });
    let mut builder = http1::Builder::new();
    // The header and idle timeouts are `timed`'s: hyper's header timeout
    // runs from the end of the previous response.
    builder
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "admin connection ended");
    }
}

/// Answers one request and counts it.
async fn handle(admin: &Admin, peer: IpAddr, req: Request<Incoming>) -> Reply {
    let reply = route(admin, peer, req).await.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            warn!(status = %e.status(), error = ?e, "admin request failed");
        }
        e.into_reply()
    });
    admin.metrics.admin_request(reply.status().as_u16());
    reply
}

async fn route(admin: &Admin, peer: IpAddr, req: Request<Incoming>) -> Result<Reply, ApiError> {
    check_header_size(req.uri(), req.headers(), MAX_HEADER_BYTES)?;
    check_length(req.headers())?;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let not_allowed = |allow| ApiError::method(method, path, allow);
    match segments.as_slice() {
        // Both tell when the node cannot write (SPEC §6).
        ["healthz" | "readyz"] if method == Method::GET => {
            if let Some(problem) = admin.health.problem() {
                return Ok(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{problem}\n"),
                ));
            }
            Ok(match segments[0] {
                "healthz" => text(StatusCode::OK, "ok\n"),
                _ => match admin.ready.problem() {
                    None => text(StatusCode::OK, "ready\n"),
                    Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                },
            })
        }
        ["metrics"] if method == Method::GET => {
            if let Some(t) = &admin.metrics_token {
                admin
                    .guard
                    .check(peer, &parts.headers, &admin.token, Some(t))
                    .await?;
            }
            Ok(scrape::metrics(admin, &parts.headers))
        }
        ["healthz" | "readyz" | "metrics"] => Err(not_allowed("GET")),
        ["v1", rest @ ..] => {
            admin
                .guard
                .check(peer, &parts.headers, &admin.token, None)
                .await?;
            if rest.iter().any(|s| s.is_empty()) {
                return Err(ApiError::no_route(path));
            }
            let flags = Flags::parse(parts.uri.query())?;
            if flags.consistent && method == Method::GET {
                admin.store.linearize().await?;
            }
            match (rest, method) {
                (["services"], &Method::POST) => groups::create(admin, body).await,
                (["services"], &Method::GET) => groups::list(admin).await,
                (["services"], _) => Err(not_allowed("GET, POST")),
                (["services", id], &Method::GET) => groups::get(admin, id),
                (["services", id], &Method::PATCH) => groups::patch(admin, id, body).await,
                (["services", id], &Method::DELETE) => groups::delete(admin, id, flags.force).await,
                (["services", _], _) => Err(not_allowed("GET, PATCH, DELETE")),
                (["services", id, "instances"], &Method::POST) => {
                    instances::attach(admin, id, body).await
                }
                (["services", id, "instances"], &Method::GET) => instances::list(admin, id),
                (["services", _, "instances"], _) => Err(not_allowed("GET, POST")),
                (["services", id, "instances", instance], &Method::DELETE) => {
                    instances::detach(admin, id, instance).await
                }
                (["services", _, "instances", _], _) => Err(not_allowed("DELETE")),
                (["certificates"], &Method::POST) => certificates::create(admin, body).await,
                (["certificates"], &Method::GET) => Ok(certificates::list(admin)),
                (["certificates"], _) => Err(not_allowed("GET, POST")),
                (["cluster"], &Method::GET) => Ok(cluster::status(admin)),
                (["cluster"], _) => Err(not_allowed("GET")),
                (["cluster", "backup"], &Method::GET) => cluster::backup(admin).await,
                (["cluster", "backup"], _) => Err(not_allowed("GET")),
                (["cluster", "nodes"], &Method::POST) => cluster::add(admin, body).await,
                (["cluster", "nodes"], _) => Err(not_allowed("POST")),
                (["cluster", "nodes", id], &Method::DELETE) => cluster::remove(admin, id).await,
                (["cluster", "nodes", _], _) => Err(not_allowed("DELETE")),
                _ => Err(ApiError::no_route(path)),
            }
        }
        _ => Err(ApiError::no_route(path)),
    }
}

/// 500 for a proposal answered with the wrong kind of [`Applied`]
/// (a bug: each command has one kind of answer).
///
/// [`Applied`]: raft_store::state::Applied
fn unexpected(applied: &impl Debug) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected result of the proposal: {applied:?}"),
    )
}
