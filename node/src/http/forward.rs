//! One request: route, select, forward, stream the answer back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tracing::debug;

use super::body::{ProxyBody, UpstreamBody};
use super::conn::{ActiveGuard, Conn};
use super::error::{ConnectError, ProxyError};
use super::headers;
use super::redirect;
use super::upgrade;
use super::upstream::{Pool, PooledConn};
use crate::balancer::{Backend, GroupBalancer, Lease, Pick};
use crate::dataplane::Settings;
use crate::routing::Target;

/// Most instances tried for one request.
const MAX_ATTEMPTS: usize = 3;

/// The service of a client connection: always answers, errors included.
pub(crate) async fn handle(req: Request<Incoming>, guard: ActiveGuard) -> Result<Response<ProxyBody>, Infallible> {
    let resp = match proxy(req, guard.conn()).await {
        Ok(resp) => resp,
        Err(error) => {
            debug!(%error, side = ?error.side(), status = error.status().as_u16(), "request failed");
            error.response()
        }
    };
    Ok(resp.map(|body| body.guarded(guard)))
}

/// The host the client addressed: the authority of an absolute-form or
/// HTTP/2 target, else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    req.headers().get(HOST).cloned()
}

async fn proxy(mut req: Request<Incoming>, conn: &Arc<Conn>) -> Result<Response<ProxyBody>, ProxyError> {
    let host = request_host(&req);
    let (target, redirect) = {
        // The one routing-table read of this request.
        let table = conn.dp.routes.load();
        let port = table.port(conn.info.port).ok_or(ProxyError::NoRoute)?;
        let target = port.route(host.as_ref().and_then(|h| h.to_str().ok()));
        (target.cloned().ok_or(ProxyError::NoRoute)?, port.redirect)
    };
    if redirect {
        return redirect::response(&req, host.as_ref(), target.destination_port);
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    let client_upgrade = headers::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    headers::prepare_request(&mut req, conn, host, client_upgrade.is_some());
    forward(req, &target, conn, client_upgrade).await
}

/// What [`exchange`] produced.
enum Exchange {
    Response(Response<Incoming>, PooledConn),
    /// Nothing was sent: this instance failed, another may be tried.
    NotSent(Request<Incoming>, ConnectError),
    /// The request (or part of it) reached the instance: no retry.
    Failed(ProxyError),
}

async fn forward(
    mut req: Request<Incoming>,
    target: &Target,
    conn: &Arc<Conn>,
    client_upgrade: Option<OnUpgrade>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let settings = &conn.dp.settings;
    let balancer = &target.group.balancer;
    let mut last = ConnectError::Timeout;
    for attempt in 1..=MAX_ATTEMPTS {
        // A statement of its own: the thread-local RNG must not live across
        // an await.
        let pick = balancer.pick(Instant::now(), &mut rand::rng());
        let lease = match pick {
            Pick::Selected(lease) => lease,
            Pick::NoInstances => return Err(ProxyError::NoInstances),
            Pick::Overloaded => return Err(ProxyError::Overloaded),
        };
        let start = Instant::now();
        let backend = lease.backend();
        let Some(pool) = target.pool(backend) else {
            // The group's instance set changed after this table was built.
            debug!(instance = %backend.name, attempt, "instance not in this routing table");
            continue;
        };
        let upgrade = client_upgrade.is_some();
        match exchange(req, pool, backend, balancer, settings, upgrade).await {
            Exchange::Response(resp, up) => {
                return respond(resp, up, lease, pool, start, conn, client_upgrade);
            }
            Exchange::NotSent(back, error) => {
                debug!(instance = %backend.name, attempt, %error, "connect failed");
                backend.metrics.connect_errors.inc();
                balancer.mark_down(backend, Instant::now());
                req = back;
                last = error;
            }
            Exchange::Failed(error) => {
                backend.metrics.observe_status(error.status().as_u16());
                backend.metrics.duration.observe(start.elapsed().as_secs_f64());
                debug!(instance = %backend.name, %error, "upstream failed");
                return Err(error);
            }
        }
    }
    Err(ProxyError::Connect(last))
}

/// Sends `req` on a pooled connection or a new one and waits (bounded by
/// `upstream_timeout`) for the response headers. A pooled connection found
/// closed before the request was written is replaced by a new one.
async fn exchange(
    mut req: Request<Incoming>,
    pool: &Pool,
    backend: &Backend,
    balancer: &GroupBalancer,
    settings: &Settings,
    upgrade: bool,
) -> Exchange {
    let mut pooled = if upgrade { None } else { pool.checkout(settings.pool_idle_timeout) };
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(mut up) => {
                // The previous response may still be settling in the
                // connection's task.
                match tokio::time::timeout(settings.connect_timeout, up.sender.ready()).await {
                    Ok(Ok(())) => up,
                    _ => continue,
                }
            }
            None => match pool.connect(backend, settings, upgrade).await {
                Ok(up) => {
                    balancer.mark_up(backend);
                    up
                }
                Err(error) => return Exchange::NotSent(req, error),
            },
        };
        match tokio::time::timeout(settings.upstream_timeout, up.sender.try_send_request(req)).await {
            Ok(Ok(resp)) => return Exchange::Response(resp, up),
            Ok(Err(mut e)) => match e.take_message() {
                Some(back) if reused => {
                    debug!(instance = %backend.name, error = %e.error(), "pooled connection closed; reconnecting");
                    req = back;
                }
                Some(back) => return Exchange::NotSent(back, ConnectError::Closed(e.into_error())),
                None => return Exchange::Failed(ProxyError::Upstream(e.into_error())),
            },
            Err(_) => return Exchange::Failed(ProxyError::Timeout),
        }
    }
}

fn respond(
    resp: Response<Incoming>,
    up: PooledConn,
    lease: Lease,
    pool: &Arc<Pool>,
    start: Instant,
    conn: &Arc<Conn>,
    client_upgrade: Option<OnUpgrade>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            lease.backend().metrics.observe_status(502);
            return Err(ProxyError::UnexpectedUpgrade);
        };
        return Ok(upgrade::tunnel(resp, up, client, lease, start, conn));
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    parts.version = Version::HTTP_11;
    // Upgrade connections are dedicated; a refused upgrade ends with its
    // response.
    let reuse = client_upgrade
        .is_none()
        .then(|| (up, pool.clone(), conn.dp.settings.pool_max_idle));
    let body = UpstreamBody::new(body, lease, start, status.as_u16(), reuse);
    Ok(Response::from_parts(parts, ProxyBody::upstream(body)))
}
