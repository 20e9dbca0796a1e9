//! Redirect ports: every request gets `308 Permanent Redirect` to the same
//! host, path and query over HTTPS on the group's TLS port.

use http::header::{CONTENT_LENGTH, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::body::ProxyBody;
use super::error::ProxyError;
use crate::routing::normalize_host;

/// `https://<host>[:<port> unless 443]<path>[?<query>]`, or `None` when the
/// host is not a plain host name or IP literal (it would otherwise let a
/// client choose where the redirect points).
pub(crate) fn location(host: &str, port: u16, path_and_query: &str) -> Option<String> {
    let host = normalize_host(host);
    if !valid_host(&host) {
        return None;
    }
    let path = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        "/"
    };
    let mut loc = String::with_capacity(8 + host.len() + 6 + path.len());
    loc.push_str("https://");
    loc.push_str(&host);
    if port != 443 {
        loc.push(':');
        loc.push_str(&port.to_string());
    }
    // A target may carry bytes a URI may not (hyper passes UTF-8 and
    // other non-ASCII bytes through): those are percent-encoded, so that
    // `Location` is the URI it must be (RFC 9110 §10.2.2).
    loc.extend(utf8_percent_encode(path, NOT_IN_URI));
    Some(loc)
}

/// What a target may carry that a URI may not: controls and space (and,
/// always, non-ASCII).
const NOT_IN_URI: &AsciiSet = &CONTROLS.add(b' ');

fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // Hex digits and colons alone may be no address (`[::::]`), and
        // then no URI either.
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// The redirect for `req` on a redirect port whose TLS port is `port`.
pub(crate) fn response<B>(
    req: &Request<B>,
    host: Option<&HeaderValue>,
    port: u16,
) -> Result<Response<ProxyBody>, ProxyError> {
    let host = host
        .and_then(|h| h.to_str().ok())
        .ok_or(ProxyError::BadRequest("no host to redirect to"))?;
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let loc = location(host, port, path).ok_or(ProxyError::BadRequest("invalid host"))?;
    let loc = HeaderValue::from_str(&loc).map_err(|_| ProxyError::BadRequest("invalid target"))?;
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(LOCATION, loc);
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            location("Example.com:80", 443, "/a/b?x=1&y").as_deref(),
            Some("https://example.com/a/b?x=1&y")
        );
        assert_eq!(
            location("example.com", 8443, "/").as_deref(),
            Some("https://example.com:8443/")
        );
        assert_eq!(
            location("[::1]:80", 443, "/p").as_deref(),
            Some("https://[::1]/p")
        );
        assert_eq!(
            location("example.com", 443, "*").as_deref(),
            Some("https://example.com/")
        );
        assert_eq!(location("evil.com/x", 443, "/"), None);
        // Found by fuzzing (`fuzz/regressions/http_head`): brackets around
        // what is no IPv6 address made a Location that is not a URI.
        assert_eq!(location("[::::::]", 443, "/"), None);
        assert_eq!(location("[1:2:3:4:5:6:7:8:9]", 443, "/"), None);
        assert_eq!(
            location("[::ffff:10.0.0.1]", 443, "/").as_deref(),
            Some("https://[::ffff:10.0.0.1]/")
        );
        // Found by fuzzing (`fuzz/regressions/http_head`): non-ASCII in
        // the target made a Location that is not a URI.
        assert_eq!(
            location("example.com", 443, "/a?b\u{dc} c").as_deref(),
            Some("https://example.com/a?b%C3%9C%20c")
        );
        assert_eq!(location("a@b", 443, "/"), None);
        assert_eq!(location("", 443, "/"), None);
    }
}
