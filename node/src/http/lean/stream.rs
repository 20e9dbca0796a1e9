//! The lean path's exchange for requests hyper serves: HTTP/2 streams, and
//! HTTP/1 requests the lean path leaves to hyper. A request without a body
//! (`GET` or `HEAD`, no upgrade) goes to the instance as the lean path's
//! do, over a pooled socket with its head in one write, and its answer is
//! handed to hyper as a `Response` whose body reads the socket: hyper's
//! client (its dispatcher, the channel to it, its own parse into a header
//! map) is left out.
//!
//! The answer means what it means through hyper's client: hop-by-hop
//! fields (and those `Connection` names) dropped, the body decoded from
//! its framing, the
//! connection back in the pool only after the body was read whole, and
//! the request's metrics, in-flight count and access log line ended with
//! the body, or when hyper drops it (the client went away).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::Body as HttpBody;
use tracing::debug;

use super::super::body::{LeanBody, ProxyBody};
use super::super::conn::Conn;
use super::super::error::ProxyError;
use super::super::log::Log;
use super::super::reply::{Framing, Progress};
use super::{Head, exchange, put_field};
use crate::routing::Target;

/// Whether `req` (prepared for the instance) can be sent this way.
pub(crate) fn takes<B: HttpBody>(req: &http::Request<B>, upgrade: bool) -> bool {
    !upgrade
        && (req.method() == Method::GET || req.method() == Method::HEAD)
        && req.body().is_end_stream()
}

/// Sends `req`, prepared for the instance (`super::super::headers`), to
/// one of `target`'s instances; the response's body reads the instance's
/// socket.
///
/// The request's head is written out before the future is made, so that
/// the future does not hold the request.
pub(crate) fn forward<'a, B>(
    req: http::Request<B>,
    target: &'a Target,
    conn: &'a Arc<Conn>,
    log: &'a mut Log,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
    let head_only = req.method() == Method::HEAD;
    let upstream_head = request_head(&req);
    drop(req);
    send(upstream_head, head_only, target, conn, log)
}

async fn send(
    upstream_head: Vec<u8>,
    head_only: bool,
    target: &Target,
    conn: &Arc<Conn>,
    log: &mut Log,
) -> Result<Response<ProxyBody>, ProxyError> {
    let got = exchange(conn, target, &upstream_head, log).await?;
    let status = StatusCode::from_u16(got.head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    // The bytes read, split without a copy: the head, whose values the
    // header map shares, and what followed it, the body's first bytes.
    let mut pending = Bytes::from(got.buf)
        .try_into_mut()
        .unwrap_or_else(|read| BytesMut::from(&read[..]));
    let headers = header_map(&got.head, &pending.split_to(got.head.len).freeze());
    let framing = if head_only {
        Framing::Empty
    } else {
        got.head.framing
    };
    let body = LeanBody::new(
        got.up,
        pending,
        Progress::new(framing),
        got.head.keeps_open(framing),
        got.done,
        conn.clone(),
    );
    let mut resp = Response::new(ProxyBody::lean(body));
    *resp.status_mut() = status;
    *resp.version_mut() = Version::HTTP_11;
    *resp.headers_mut() = headers;
    // hyper's HTTP/1 server writes an instance's own reason phrase back.
    if let Some(reason) = got
        .head
        .reason
        .as_deref()
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok())
    {
        resp.extensions_mut().insert(reason);
    }
    Ok(resp)
}

/// The request's head in HTTP/1.1, as the instance gets it.
fn request_head<B>(req: &http::Request<B>) -> Vec<u8> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(req.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        put_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The fields of `head` (parsed from `buf`) that hyper passes on; a field
/// that is not a valid header (none that the parser let through) is left
/// out.
fn header_map(head: &Head, shared: &Bytes) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(head.fields.len());
    // Values shared out of the head: a value made from a slice is a copy
    // (an allocation) of its own.
    for (name, value) in &head.fields {
        match (
            HeaderName::from_bytes(&shared[name.clone()]),
            HeaderValue::from_maybe_shared(shared.slice(value.clone())),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => debug!("response field left out: not a valid header"),
        }
    }
    headers
}
