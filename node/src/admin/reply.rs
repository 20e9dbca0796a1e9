//! Responses: the JSON envelope, plain text, and [`ApiError`].

use bytes::Bytes;
use edgelb_api::envelope;
use http::header::{ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{Either, Full};
use raft_store::state::ApplyError;
use serde::Serialize;

use crate::store::StoreError;

/// An admin response: a complete body, or one streamed as it is produced
/// (`/metrics`).
pub(crate) type Reply = Response<Either<Full<Bytes>, Chunks>>;

/// A body streamed in chunks from a channel; it ends when the sender is
/// dropped.
#[derive(Debug)]
pub(crate) struct Chunks(pub(crate) tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// An answer other than success, rendered as the error envelope with the
/// same HTTP status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// `Allow` for 405.
    allow: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            allow: None,
        }
    }

    /// 400.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a path that names no route.
    pub(crate) fn no_route(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no route for {path}"))
    }

    /// 405, listing the methods the path has.
    pub(crate) fn method(method: &Method, path: &str, allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed on {path}; allowed: {allow}"),
            )
        }
    }

    /// 401.
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: send Authorization: Bearer <token>",
        )
    }

    /// 413.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn into_reply(self) -> Reply {
        let mut reply = json(
            self.status,
            &envelope::error(self.status.as_u16(), self.message),
        );
        if let Some(allow) = self.allow {
            reply
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            reply
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        reply
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        Self::new(status(e.status()), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::new(status(e.status()), e.to_string())
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// 200 with `{"status":"success","data":data}`.
pub(crate) fn success<T: Serialize>(data: T) -> Reply {
    json(StatusCode::OK, &envelope::success(data))
}

/// `body` as JSON.
pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_type(status, "application/json", bytes),
        // Our response types serialise infallibly (no maps with non-string
        // keys, no failing Serialize impls); answer 500 rather than panic.
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding response: {e}\n"),
        ),
    }
}

/// `body` as plain text.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    with_type(status, "text/plain; charset=utf-8", body)
}

pub(crate) fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Reply {
    let mut reply = Response::new(Either::Left(Full::new(body.into())));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}
