//! Reading requests: the bearer token, the body size limit, JSON bodies and
//! query flags.

use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{HeaderMap, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::reply::ApiError;

/// Largest request body accepted (1 MiB); larger answers 413.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// Whether `headers` carry `Authorization: Bearer <token>`.
///
/// The token is compared in constant time (its length is not secret). An
/// empty configured token authorises nobody.
pub(crate) fn authorized(headers: &HeaderMap, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let Some(value) = headers.get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, presented)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ")
        && bool::from(presented.trim_ascii().ct_eq(token.as_bytes()))
}

/// 431 when the request line and headers together exceed `max` bytes.
///
/// hyper's read-buffer limit only trips on a header block that is still
/// incomplete when the buffer is full; one that arrives whole in a larger
/// read passes it, so the size is checked here as well.
pub(crate) fn check_header_size(
    uri: &Uri,
    headers: &HeaderMap,
    max: usize,
) -> Result<(), ApiError> {
    // `METHOD URI HTTP/1.1` and `name: value` per field, with line ends.
    let request_line = uri.path_and_query().map_or(1, |pq| pq.as_str().len()) + 20;
    let size = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .fold(request_line, usize::saturating_add);
    if size > max {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers are larger than {max} bytes"),
        ));
    }
    Ok(())
}

/// 413 when the declared `Content-Length` is over [`MAX_BODY`]. Checked
/// before routing, so no handler starts on a body it will refuse.
pub(crate) fn check_length(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_BODY as u64 => Err(ApiError::too_large(MAX_BODY)),
        _ => Ok(()),
    }
}

/// Reads at most [`MAX_BODY`] bytes (also when the length is not declared,
/// as with chunked bodies) and parses them as `T`.
pub(crate) async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, ApiError> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ApiError::too_large(MAX_BODY)
            } else {
                ApiError::invalid(format!("reading request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// The query flags the admin API knows; others are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags {
    /// `?force=true`: delete a group with instances attached.
    pub(crate) force: bool,
    /// `?consistent=true`: a linearizable read: leadership is confirmed
    /// with a quorum (through the leader) and this node catches up to the
    /// read index before it answers from its local state.
    pub(crate) consistent: bool,
}

impl Flags {
    /// Parses `force` and `consistent`: `true`, `false`, or bare (= true).
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut flags = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
            let slot = match key {
                "force" => &mut flags.force,
                "consistent" => &mut flags.consistent,
                _ => continue,
            };
            *slot = match value {
                "true" | "1" | "" => true,
                "false" | "0" => false,
                other => {
                    return Err(ApiError::invalid(format!(
                        "query parameter {key}={other:?}: expected true or false"
                    )));
                }
            };
        }
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn bearer_token() {
        assert!(authorized(&auth("Bearer s3cret"), "s3cret"));
        assert!(authorized(&auth("bearer s3cret"), "s3cret"));
        assert!(!authorized(&auth("Bearer s3cre"), "s3cret"));
        assert!(!authorized(&auth("Bearer s3cretx"), "s3cret"));
        assert!(!authorized(&auth("Basic s3cret"), "s3cret"));
        assert!(!authorized(&auth("Bearer"), "s3cret"));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
        assert!(!authorized(&auth("Bearer "), ""));
    }

    #[test]
    fn flags() {
        assert_eq!(Flags::parse(None).ok(), Some(Flags::default()));
        let f = Flags::parse(Some("force=true&consistent")).ok();
        assert_eq!(
            f,
            Some(Flags {
                force: true,
                consistent: true
            })
        );
        assert_eq!(
            Flags::parse(Some("force=false&x=y")).ok(),
            Some(Flags::default())
        );
        assert!(Flags::parse(Some("force=yes")).is_err());
    }
}
