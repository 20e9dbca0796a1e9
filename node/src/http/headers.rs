//! Header rewriting between client and instance: hop-by-hop headers out,
//! `X-Forwarded-*` in, HTTP/2 requests turned into HTTP/1.1 ones.
//!
//! A client's own `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are
//! claims anyone can make: they are replaced (`X-Forwarded-For` names the
//! connecting address only) or removed, unless the client is a trusted
//! proxy (`trusted_proxies`), whose headers are kept and whose
//! `X-Forwarded-For` is appended to.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{
    CONNECTION, COOKIE, FORWARDED, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::uri::Uri;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Version};

use super::conn::Conn;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection and are not forwarded (RFC 9110
/// §7.6.1), besides those that `Connection` names.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// Whether `value` is a valid `Host` field value, or request authority
/// (RFC 9110 §7.2: `uri-host [ ":" port ]`; RFC 9112 §3.2 answers any
/// other with 400): an IPv6 literal in brackets, or a reg-name (unreserved
/// characters, percent-escapes and sub-delims, possibly empty), then
/// optionally `:` and a port of at most 65535.
pub(crate) fn valid_host_field(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => {
            let Some(end) = value.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = std::str::from_utf8(&value[1..end])
                .is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
            if !literal {
                return false;
            }
            (&value[..0], &value[end + 1..])
        }
        _ => match value.iter().position(|&b| b == b':') {
            Some(colon) => value.split_at(colon),
            None => (value, &value[value.len()..]),
        },
    };
    let mut bytes = host.iter();
    while let Some(&b) = bytes.next() {
        let ok = match b {
            b'%' => {
                bytes.next().is_some_and(u8::is_ascii_hexdigit)
                    && bytes.next().is_some_and(u8::is_ascii_hexdigit)
            }
            _ => b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b),
        };
        if !ok {
            return false;
        }
    }
    match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| {
                        if d.is_empty() {
                            Some(0)
                        } else {
                            d.parse::<u32>().ok()
                        }
                    })
                    .is_some_and(|p| p <= 65535)
        }
        Some(_) => false,
    }
}

/// Whether `name` (any case) is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// Which of [`HOP_BY_HOP`] `headers` holds, one bit each (bit `i` for
/// `HOP_BY_HOP[i]`).
fn hop_by_hop_present(headers: &HeaderMap) -> u16 {
    headers.keys().fold(0, |present, name| {
        HOP_BY_HOP
            .iter()
            .position(|h| h == name)
            .map_or(present, |i| present | 1 << i)
    })
}

/// The request asks for a protocol switch (`Connection: upgrade` and an
/// `Upgrade` header, HTTP/1.1).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers and those named by `Connection`. With
/// `upgrade`, `Upgrade` stays and `Connection` becomes `upgrade`.
///
/// Only the hop-by-hop headers present are removed (a removal hashes the
/// name), and a `Connection` token that names one of them, or `close`,
/// is not parsed: a response's `Connection: keep-alive` costs one
/// removal.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let present = hop_by_hop_present(headers);
    if present == 0 {
        return;
    }
    // Tokens that are not hop-by-hop already are rare: allocate only then.
    let mut named: Vec<HeaderName> = Vec::new();
    for token in connection_tokens(headers) {
        if token.eq_ignore_ascii_case("close")
            || HOP_BY_HOP
                .iter()
                .any(|h| token.eq_ignore_ascii_case(h.as_str()))
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            named.push(name);
        }
    }
    for name in named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0 || (upgrade && (name == CONNECTION || name == UPGRADE)) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Rewrites a client request for the instance: HTTP/1.1 in origin form with
/// `Host`, no hop-by-hop headers, `X-Forwarded-*` added. `host` is the host
/// the client addressed (already taken from `Host` or the authority).
pub(crate) fn prepare_request<B>(
    req: &mut Request<B>,
    conn: &Conn,
    host: Option<HeaderValue>,
    upgrade: bool,
) {
    let h2 = req.version() == Version::HTTP_2;
    *req.version_mut() = Version::HTTP_11;
    let uri = req.uri();
    let absolute = uri.scheme().is_some() || uri.authority().is_some();
    if absolute {
        let origin = match uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') || pq.as_str() == "*" => Uri::from(pq.clone()),
            _ => Uri::from_static("/"),
        };
        *req.uri_mut() = origin;
    }
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    if h2 {
        merge_cookies(headers);
    }
    match &host {
        // An absolute-form target or an HTTP/2 authority names the host.
        Some(h) if absolute || !headers.contains_key(HOST) => {
            headers.insert(HOST, h.clone());
        }
        _ => {}
    }
    if conn.trusted {
        append_forwarded_for(headers, &conn.client_ip);
    } else {
        headers.insert(X_FORWARDED_FOR, conn.client_ip.clone());
        headers.remove(FORWARDED);
        headers.remove(X_REAL_IP);
    }
    headers.insert(X_FORWARDED_PROTO, conn.proto.clone());
    match host {
        Some(h) => headers.insert(X_FORWARDED_HOST, h),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// `X-Forwarded-For: <existing>, <client ip>`.
fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    let mut values = headers.get_all(X_FORWARDED_FOR).iter();
    let Some(first) = values.next() else {
        headers.insert(X_FORWARDED_FOR, ip.clone());
        return;
    };
    let mut buf = BytesMut::with_capacity(first.len() + ip.len() + 16);
    buf.put_slice(first.as_bytes());
    for v in values {
        buf.put_slice(b", ");
        buf.put_slice(v.as_bytes());
    }
    buf.put_slice(b", ");
    buf.put_slice(ip.as_bytes());
    let joined = HeaderValue::from_maybe_shared(buf.freeze()).unwrap_or_else(|_| ip.clone());
    headers.insert(X_FORWARDED_FOR, joined);
}

/// HTTP/2 may split `cookie` into several fields; HTTP/1.1 wants one
/// (RFC 9113 §8.2.3).
fn merge_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut buf = BytesMut::with_capacity(first.len() * 2);
    for (i, v) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            buf.put_slice(b"; ");
        }
        buf.put_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(buf)) {
        headers.insert(COOKIE, v);
    }
}

/// The host the client addressed: the authority of an absolute-form or
/// HTTP/2 target, else `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    req.headers().get(HOST).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn host_fields_are_uri_host_and_port() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "a,b",
            "xn--bcher-kva.example",
            "a_b.example",
            "",
            "host:",
        ] {
            assert!(valid_host_field(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a b", "user@a", "a/b", "a?b", "a#b", "::::", "[::1", "[zz]", "a:80x", "a:8:0", "a\tb",
            "a\"b", "[::1]x",
        ] {
            assert!(!valid_host_field(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "basic x"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    /// What `strip_hop_by_hop` must do, written plainly: every
    /// hop-by-hop header and every header `Connection` names goes (with
    /// `upgrade`, `Upgrade` stays and `Connection` becomes `upgrade`, the
    /// case of a request that asks for an upgrade and so has one).
    fn strip_reference(headers: &HeaderMap, upgrade: bool) -> HeaderMap {
        let named: Vec<String> = connection_tokens(headers)
            .map(str::to_ascii_lowercase)
            .collect();
        let mut out = HeaderMap::new();
        for (name, value) in headers {
            let hop = HOP_BY_HOP.contains(name) || named.iter().any(|n| n == name.as_str());
            let kept = upgrade && name == UPGRADE;
            if !hop || kept {
                out.append(name.clone(), value.clone());
            }
        }
        if upgrade && headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
            out.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn strips_what_the_plain_rule_strips(
            fields in proptest::collection::vec((0usize..12, 0usize..6), 0..10),
            upgrade: bool,
        ) {
            const NAMES: [&str; 12] = [
                "connection", "keep-alive", "te", "transfer-encoding", "upgrade",
                "proxy-authorization", "trailer", "x-secret", "x-kept", "host",
                "content-length", "proxy-connection",
            ];
            const VALUES: [&str; 6] = [
                "keep-alive", "close", "Upgrade", "x-secret, keep-alive", "X-Kept", "a b",
            ];
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(
                    HeaderName::from_static(NAMES[n]),
                    HeaderValue::from_static(VALUES[v]),
                );
            }
            let want = strip_reference(&h, upgrade);
            strip_hop_by_hop(&mut h, upgrade);
            proptest::prop_assert_eq!(h, want);
        }
    }

    /// The lean path's check by name is [`HOP_BY_HOP`] in any case, and no
    /// other name.
    #[test]
    fn hop_by_hop_names_are_the_lists() {
        for h in &HOP_BY_HOP {
            assert!(is_hop_by_hop(h.as_str()), "{h}");
            assert!(is_hop_by_hop(&h.as_str().to_ascii_uppercase()), "{h}");
        }
        for other in [
            "host",
            "content-length",
            "date",
            "server",
            "content-type",
            "tE",
            "teh",
            "t",
            "trailers",
            "upgrade-insecure-requests",
            "connectiom",
            "keep-alivE2",
            "proxy-connectio",
            "transfer-encodinh",
            "x-forwarded-proto",
            "proxy-authorizatioN1",
            "",
        ] {
            let hop = HOP_BY_HOP
                .iter()
                .any(|h| other.eq_ignore_ascii_case(h.as_str()));
            assert_eq!(is_hop_by_hop(other), hop, "{other}");
        }
    }

    #[test]
    fn upgrade_keeps_upgrade_and_connection() {
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("te", "x"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn forwarded_for_appends() {
        let ip = HeaderValue::from_static("10.1.2.3");
        let mut h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
    }

    #[test]
    fn cookies_merge() {
        let mut h = headers(&[("cookie", "a=1"), ("cookie", "b=2")]);
        merge_cookies(&mut h);
        assert_eq!(h.get_all(COOKIE).iter().count(), 1);
        assert_eq!(h[COOKIE], "a=1; b=2");
    }

    #[test]
    fn detects_upgrade() {
        let req = Request::builder()
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let req = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&req));
    }
}
