//! One request: route, select, forward, stream the answer back.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http::header::{HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::upgrade::OnUpgrade;
use tracing::debug;

use super::body::{ProxyBody, UpstreamBody};
use super::conn::{ActiveGuard, Conn};
use super::error::ProxyError;
use super::headers;
use super::lean;
use super::log::{Log, Record};
use super::redirect;
use super::reply::Done;
use super::upgrade;
use crate::balancer::Lease;
use crate::dataplane::{Attempts, Settings};
use crate::routing::Target;
use crate::upstream::{ClientBody, ConnectError, Pool, PooledConn};

/// How long a pooled connection may take to become ready for its next
/// request before a new connection is opened instead.
const POOLED_READY_WAIT: Duration = Duration::from_millis(100);

/// The service of a client connection: always answers, errors included.
pub(crate) async fn handle(
    req: Request<Incoming>,
    guard: ActiveGuard,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut log = Record::start(&req, guard.conn());
    let h1 = req.version() < Version::HTTP_2;
    let (mut resp, error) = match proxy(req, guard.conn(), &mut log).await {
        Ok(resp) => (resp, None),
        Err(error) => {
            debug!(%error, side = ?error.side(), status = error.status().as_u16(), "request failed");
            (error.response(), Some(error))
        }
    };
    // Still here: an answer of the node's own (an error, a redirect); an
    // instance's response took the record along.
    if let Some(mut record) = log {
        record.bytes_out = resp.body().size_hint().exact().unwrap_or(0);
        let why = error
            .as_ref()
            .map(|e| (e.side().name(), e as &dyn std::fmt::Display));
        record.end(resp.status().as_u16(), why, Instant::now());
    }
    if h1
        && guard.conn().closes_after_response()
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp.map(|body| body.guarded(guard)))
}

/// The host the client addressed ([`request_host`]) once the request has
/// passed the `Host` checks and its transfer codings are understood.
pub(crate) fn checked_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, ProxyError> {
    // RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host. Two would
    // make routing on a shared port ambiguous whatever the version (HTTP/1.0
    // may leave Host out, but is forwarded as HTTP/1.1).
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(ProxyError::BadRequest("more than one Host header")),
        (Some(host), None) if !headers::valid_host_field(host.as_bytes()) => {
            return Err(ProxyError::BadRequest("invalid Host header"));
        }
        (None, _) if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            return Err(ProxyError::BadRequest("missing Host header"));
        }
        _ => {}
    }
    // An absolute-form target's or HTTP/2's authority is the host too
    // (`request_host`), and may not carry what a Host may not (`user@`).
    if let Some(authority) = req.uri().authority()
        && !headers::valid_host_field(authority.as_str().as_bytes())
    {
        return Err(ProxyError::BadRequest("invalid authority"));
    }
    // RFC 9112 §6.1: a transfer coding the node does not understand is
    // 501, and chunked applied twice is 400. hyper decodes one chunked
    // (last, or the request is refused) and the field is hop-by-hop, so a
    // `gzip, chunked` body went on as if it were not compressed. Empty
    // list elements do not count (RFC 9110 §5.6.1).
    let codings = req.headers().get_all(TRANSFER_ENCODING).iter();
    let mut chunked = 0;
    for token in codings.flat_map(|v| v.as_bytes().split(|&b| b == b',')) {
        match token.trim_ascii() {
            b"" => {}
            t if t.eq_ignore_ascii_case(b"chunked") => chunked += 1,
            _ => return Err(ProxyError::NotImplemented("transfer coding")),
        }
    }
    if chunked > 1 {
        return Err(ProxyError::BadRequest("chunked applied more than once"));
    }
    Ok(headers::request_host(req))
}

async fn proxy(
    req: Request<Incoming>,
    conn: &Arc<Conn>,
    log: &mut Log,
) -> Result<Response<ProxyBody>, ProxyError> {
    // From here on, a body dropped unread is discarded, not left hanging.
    let mut req = ClientBody::wrap(req, conn, log.as_ref().and_then(|r| r.body_in.clone()));
    let host = checked_host(&req)?;
    if let Some(record) = log.as_deref_mut() {
        record.host.clone_from(&host);
    }
    let (target, redirect) = {
        // The one routing-table read of this request.
        let table = conn.dp.routes.load();
        let port = table.port(conn.info.port).ok_or(ProxyError::NoRoute)?;
        let target = table.target(port, host.as_ref().and_then(|h| h.to_str().ok()));
        (target.ok_or(ProxyError::NoRoute)?, port.redirect)
    };
    if let Some(record) = log.as_deref_mut() {
        record.group = Some(target.group.clone());
    }
    if redirect {
        return redirect::response(&req, host.as_ref(), target.destination_port);
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    let client_upgrade = headers::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    headers::prepare_request(&mut req, conn, host, client_upgrade.is_some());
    if lean::stream::takes(&req, client_upgrade.is_some()) {
        return lean::stream::forward(req, &target, conn, log).await;
    }
    // Boxed: hyper's client makes this future the largest of all, and every
    // request's future (the lean ones too) would carry and move it.
    Box::pin(forward(req, &target, conn, client_upgrade, log)).await
}

/// What [`exchange`] produced.
enum Exchange {
    Response(Response<Incoming>, PooledConn),
    /// Nothing was sent: this instance failed, another may be tried.
    NotSent(Request<ClientBody>, ConnectError),
    /// The request (or part of it) reached the instance: no retry.
    Failed(ProxyError),
}

async fn forward(
    mut req: Request<ClientBody>,
    target: &Target,
    conn: &Arc<Conn>,
    client_upgrade: Option<OnUpgrade>,
    log: &mut Log,
) -> Result<Response<ProxyBody>, ProxyError> {
    let settings = &conn.dp.settings;
    let mut tries = Attempts::new(target);
    loop {
        let (lease, pool) = tries.next().map_err(ProxyError::from)?;
        if let Some(record) = log.as_deref_mut() {
            record.attempts = tries.made();
            record.instance = Some(lease.backend().clone());
            record.connect = None;
        }
        let start = Instant::now();
        let upgrade = client_upgrade.is_some();
        match exchange(req, &pool, &lease, settings, upgrade, start, log).await {
            Exchange::Response(resp, up) => {
                if let Some(record) = log.as_deref_mut() {
                    let waited = start.elapsed();
                    record.response =
                        Some(waited.saturating_sub(record.connect.unwrap_or_default()));
                }
                return respond(resp, up, lease, &pool, start, conn, client_upgrade, log);
            }
            Exchange::NotSent(back, error) => {
                tries.failed(lease, error);
                req = back;
            }
            Exchange::Failed(error) => return Err(error.counted(&lease, start)),
        }
    }
}

/// Sends `req` on a pooled connection or a new one and waits (bounded by
/// `upstream_timeout`) for the response headers. A pooled connection found
/// closed before the request was written is replaced by a new one.
async fn exchange(
    mut req: Request<ClientBody>,
    pool: &Pool,
    lease: &Lease,
    settings: &Settings,
    upgrade: bool,
    now: Instant,
    log: &mut Log,
) -> Exchange {
    let backend = lease.backend();
    let mut pooled = if upgrade {
        None
    } else {
        pool.checkout(settings.pool_idle_timeout, now)
    };
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(mut up) => {
                // Usually ready at once. A connection still busy sending a
                // request body that the instance answered early is given
                // up, and so is one the instance closed while idle.
                if up.ready(POOLED_READY_WAIT).await {
                    up
                } else {
                    continue;
                }
            }
            // Boxed: connecting is the rare path and its future is large;
            // every request's future would carry (and move) it otherwise.
            None => match Box::pin(timed(
                log.as_deref_mut().map(|r| &mut r.connect),
                pool.connect(
                    &backend.name,
                    &backend.metrics,
                    backend.drain_token(),
                    settings.connect_timeout,
                    upgrade,
                ),
            ))
            .await
            {
                Ok(up) => {
                    lease.mark_up();
                    up
                }
                Err(error) => return Exchange::NotSent(req, error),
            },
        };
        match send(&mut up, req, settings.upstream_timeout).await {
            Some(Ok(resp)) => return Exchange::Response(resp, up),
            Some(Err(mut e)) => match e.take_message() {
                Some(back) if reused => {
                    debug!(instance = %backend.name, error = %e.error(), "pooled connection closed; reconnecting");
                    req = back;
                }
                Some(back) => return Exchange::NotSent(back, ConnectError::Closed(e.into_error())),
                None => {
                    let error = e.into_error();
                    // Only an error from the client's own request body is the
                    // client's fault (hyper reports it as a user error with
                    // the body's error as its cause). Anything else, such as
                    // the connection torn down when a detached instance's
                    // drain timeout passes, is the upstream's.
                    let client_body = error.is_user()
                        && std::error::Error::source(&error).is_some()
                        && !backend.is_draining();
                    return Exchange::Failed(if client_body {
                        ProxyError::ClientBody(error)
                    } else {
                        ProxyError::Upstream(error)
                    });
                }
            },
            None => return Exchange::Failed(ProxyError::Timeout),
        }
    }
}

/// Sends `req` and drives the connection until the response headers are
/// in; `None` when they take longer than `timeout`.
async fn send(
    up: &mut PooledConn,
    req: Request<ClientBody>,
    timeout: Duration,
) -> Option<Result<Response<Incoming>, TrySendError<Request<ClientBody>>>> {
    let PooledConn {
        sender,
        driver,
        deadline,
        ..
    } = up;
    deadline.disarm();
    let response = sender.try_send_request(req);
    tokio::pin!(response);
    poll_fn(|cx| {
        let alive = driver.poll_drive(cx);
        match response.as_mut().poll(cx) {
            Poll::Ready(res) => Poll::Ready(Some(res)),
            // An ended connection has failed (or handed back) the request
            // by now; poll once more to collect that.
            Poll::Pending if !alive => response.as_mut().poll(cx).map(Some),
            Poll::Pending => deadline.poll(cx, timeout).map(|()| None),
        }
    })
    .await
}

#[expect(
    clippy::too_many_arguments,
    reason = "one request's parts, each used once"
)]
fn respond(
    resp: Response<Incoming>,
    up: PooledConn,
    lease: Lease,
    pool: &Arc<Pool>,
    start: Instant,
    conn: &Arc<Conn>,
    client_upgrade: Option<OnUpgrade>,
    log: &mut Log,
) -> Result<Response<ProxyBody>, ProxyError> {
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            lease.backend().metrics.observe_status(502);
            // Logged as every error is, by `handle`.
            return Err(ProxyError::UnexpectedUpgrade);
        };
        return Ok(upgrade::tunnel(
            resp,
            up,
            client,
            lease,
            start,
            conn,
            log.take(),
        ));
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    parts.version = Version::HTTP_11;
    // Upgrade connections are dedicated; a refused upgrade ends with its
    // response.
    let reuse = client_upgrade
        .is_none()
        .then(|| conn.dp.settings.idle_limits());
    let done = Done {
        lease,
        pool: pool.clone(),
        start,
        status: status.as_u16(),
        log: log.take(),
    };
    let body = UpstreamBody::new(body, up, done, reuse);
    Ok(Response::from_parts(parts, ProxyBody::upstream(body)))
}

/// `fut`, its time written to `took` (when the request is logged).
async fn timed<F: Future>(took: Option<&mut Option<Duration>>, fut: F) -> F::Output {
    let began = Instant::now();
    let out = fut.await;
    if let Some(t) = took {
        *t = Some(began.elapsed());
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::http::tests::future_size;

    /// Every request's future is allocated, and moved as it is built: the
    /// common requests' (lean) must not carry hyper client's state, nor
    /// hold a future it awaits twice.
    #[test]
    #[expect(unreachable_code, reason = "the futures are measured, not made")]
    fn a_lean_request_future_does_not_carry_the_hyper_client_path() {
        let handle = future_size(&|| super::handle(unreachable!(), unreachable!()));
        let proxy = future_size(&|| super::proxy(unreachable!(), unreachable!(), unreachable!()));
        let hyper_path = future_size(&|| {
            super::forward(
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
            )
        });
        let lean = future_size(&|| {
            super::lean::stream::forward::<hyper::body::Incoming>(
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
            )
        });
        assert!(
            proxy < hyper_path,
            "proxy {proxy} holds forward {hyper_path}"
        );
        assert!(
            proxy < lean + 1024,
            "proxy {proxy}, its lean exchange {lean}"
        );
        assert!(handle < proxy + 1024, "handle {handle}, proxy {proxy}");
    }
}
