//! Why a proxied request failed, where the failure came from, whether
//! another instance may be tried, and the short plain-text answer.

use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use tracing::debug;

use super::body::ProxyBody;
use crate::balancer::Lease;
use crate::dataplane::Unserved;
use crate::upstream::ConnectError;

/// Who caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
    Internal,
}

impl Side {
    /// As the access log's `error_origin` says it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
        }
    }
}

/// A request that gets an error answer instead of an instance's response.
///
/// Only [`ConnectError`]s are retried (on another instance), and only while
/// attempts remain; everything else is answered at once.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no service for this host")]
    NoRoute,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A request the node does not implement (a transfer coding).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("no instances")]
    NoInstances,
    #[error("every instance is at its hard limit")]
    Overloaded,
    #[error("every attempt failed: {0}")]
    Connect(#[from] ConnectError),
    #[error("upstream failed: {0}")]
    Upstream(hyper::Error),
    /// The lean path's own exchange failed (`super::lean`).
    #[error("upstream failed: {0}")]
    UpstreamIo(std::io::Error),
    /// The client's request body failed (client went away mid-upload).
    #[error("client request body failed: {0}")]
    ClientBody(hyper::Error),
    #[error("upstream sent an unexpected 101")]
    UnexpectedUpgrade,
    #[error("upstream response headers timed out")]
    Timeout,
    /// A broken invariant of the proxy itself.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Why no instance could be tried (`crate::dataplane::Attempts`).
impl From<Unserved> for ProxyError {
    fn from(why: Unserved) -> Self {
        match why {
            Unserved::NoInstances => Self::NoInstances,
            Unserved::Overloaded => Self::Overloaded,
            Unserved::NoPool => Self::Internal("selected instance has no pool"),
            Unserved::Failed(error) => Self::Connect(error),
        }
    }
}

impl ProxyError {
    /// The error of a request the instance failed before its response
    /// head (picked at `start`): counted in its status class and duration,
    /// and logged.
    pub(crate) fn counted(self, lease: &Lease, start: Instant) -> Self {
        let backend = lease.backend();
        backend.metrics.observe_status(self.status().as_u16());
        backend
            .metrics
            .duration
            .observe(start.elapsed().as_secs_f64());
        debug!(instance = %backend.name, error = %self, "upstream failed");
        self
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BadRequest(_) | Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::NoInstances | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect(_)
            | Self::Upstream(_)
            | Self::UpstreamIo(_)
            | Self::UnexpectedUpgrade => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn side(&self) -> Side {
        match self {
            Self::NoRoute
            | Self::BadRequest(_)
            | Self::ClientBody(_)
            | Self::MethodNotAllowed
            | Self::NotImplemented(_) => Side::Client,
            Self::NoInstances | Self::Overloaded | Self::Internal(_) => Side::Internal,
            Self::Connect(_)
            | Self::Upstream(_)
            | Self::UpstreamIo(_)
            | Self::UnexpectedUpgrade
            | Self::Timeout => Side::Upstream,
        }
    }

    fn body(&self) -> &'static str {
        match self {
            Self::NoRoute => "service not found",
            Self::BadRequest(_) | Self::ClientBody(_) => "bad request",
            Self::MethodNotAllowed => "method not allowed",
            Self::NotImplemented(_) => "not implemented",
            Self::NoInstances => "no instances",
            Self::Overloaded => "overloaded",
            Self::Connect(_)
            | Self::Upstream(_)
            | Self::UpstreamIo(_)
            | Self::UnexpectedUpgrade => "bad gateway",
            Self::Timeout => "gateway timeout",
            Self::Internal(_) => "internal error",
        }
    }

    /// The answer to the client.
    pub(crate) fn response(&self) -> Response<ProxyBody> {
        let mut resp = text_response(self.status(), self.body());
        if matches!(self, Self::Overloaded) {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A short `text/plain` response.
pub(crate) fn text_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies() {
        let r = ProxyError::Overloaded.response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        assert_eq!(r.headers()[CONTENT_LENGTH], "10");
        assert_eq!(
            ProxyError::NoRoute.response().headers()[CONTENT_TYPE],
            "text/plain"
        );
        assert_eq!(ProxyError::Timeout.status(), 504);
        assert_eq!(ProxyError::Connect(ConnectError::Timeout).status(), 502);
        assert_eq!(ProxyError::Timeout.side(), Side::Upstream);
    }
}
