//! What the data plane does with a client's request head before an
//! instance sees it: the `Host` checks, routing by host (and by TLS SNI),
//! the redirect target, and the rewritten head.
//!
//! hyper parses the bytes; this target builds the request from a
//! hyper-like head (`METHOD TARGET VERSION`, then `name: value` lines) so
//! that libFuzzer works on what is ours.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::header::{
    CONNECTION, FORWARDED, HOST, LOCATION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version};
use tokio_util::sync::CancellationToken;

use super::fixture;
use crate::dataplane::{ConnInfo, DataPlane, IpNet, Settings};
use crate::http::conn::Conn;
use crate::http::forward::checked_host;
use crate::http::headers::{X_FORWARDED_FOR, is_upgrade, prepare_request};
use crate::http::redirect;
use crate::routing::normalize_host;

/// A request head on every port of the fixture: checks, routing and
/// redirects never panic; a redirect points at the host the client named
/// and nowhere else; the head sent on carries one `Host`, no hop-by-hop
/// headers and the node's own `X-Forwarded-For`.
pub fn head(data: &[u8]) {
    for conn in conns() {
        check_lean(data, conn);
    }
    let Some(req) = parse(data) else {
        return;
    };
    let table = fixture::routes();
    // The SNI a TLS client would send is the host it addresses.
    let sni = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    if let Some(route) = table.port(443) {
        let _ = route.key_for(sni.as_deref());
        let _ = route.route(sni.as_deref());
    }
    let Ok(host) = checked_host(&req) else {
        return;
    };
    let host_str = host.as_ref().and_then(|h| h.to_str().ok());
    for port in table.ports() {
        let target = port.route(host_str);
        if port.redirect {
            if let Some(target) = target {
                check_redirect(&req, host.as_ref(), target.destination_port);
            }
        } else if port.http && target.is_some() {
            for conn in conns() {
                check_prepared(&req, conn, host.clone());
            }
        }
    }
}

/// Parses `METHOD TARGET VERSION` and header lines, as hyper would hand
/// the request over; `None` for what hyper would refuse.
fn parse(data: &[u8]) -> Option<Request<()>> {
    let text = std::str::from_utf8(data).ok()?;
    let head = text.split("\r\n\r\n").next().unwrap_or(text);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = Method::from_bytes(first.next()?.as_bytes()).ok()?;
    let uri = first.next()?.parse::<Uri>().ok()?;
    let version = match first.next()? {
        "HTTP/1.0" => Version::HTTP_10,
        "HTTP/1.1" => Version::HTTP_11,
        "HTTP/2" => Version::HTTP_2,
        _ => return None,
    };
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(version)
        .body(())
        .ok()?;
    for line in lines.take(64) {
        let (name, value) = line.split_once(':')?;
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = HeaderValue::from_str(value.trim_matches([' ', '\t'])).ok()?;
        req.headers_mut().append(name, value);
    }
    Some(req)
}

/// A client that is not a trusted proxy, and one that is.
fn conns() -> &'static [Conn; 2] {
    static CONNS: OnceLock<[Conn; 2]> = OnceLock::new();
    CONNS.get_or_init(|| {
        let dp = Arc::new(DataPlane::new(Settings {
            trusted_proxies: vec!["10.0.0.0/8".parse::<IpNet>().expect("a CIDR block")],
            ..Settings::default()
        }));
        // The lean path routes by the connection's own table.
        dp.routes.store(fixture::routes_shared().clone());
        let conn = |peer: &str| {
            let info = ConnInfo {
                peer: peer.parse::<SocketAddr>().expect("an address"),
                port: 8080,
                tls: false,
                accepted: crate::dataplane::Accepted::now(),
            };
            Conn::new(info, dp.clone(), CancellationToken::new())
        };
        [conn("192.0.2.1:40000"), conn("10.1.2.3:40000")]
    })
}

fn check_redirect(req: &Request<()>, host: Option<&HeaderValue>, port: u16) {
    let Ok(resp) = redirect::response(req, host, port) else {
        return;
    };
    let location = resp
        .headers()
        .get(LOCATION)
        .expect("a redirect has a Location");
    let location = location
        .to_str()
        .expect("Location is ASCII")
        .parse::<Uri>()
        .expect("Location is a URI");
    assert_eq!(location.scheme_str(), Some("https"));
    let named = normalize_host(host.and_then(|h| h.to_str().ok()).expect("a host"));
    assert_eq!(location.host(), Some(named.as_ref()), "{location}");
    assert_eq!(
        location.port_u16(),
        (port != 443).then_some(port),
        "{location}"
    );
    assert!(location.path().starts_with('/'), "{location}");
}

fn check_prepared(req: &Request<()>, conn: &Conn, host: Option<HeaderValue>) {
    let mut req = req.clone();
    let upgrade = is_upgrade(&req);
    // Headers the client's `Connection` names: they go, unless the proxy
    // sets them itself.
    let named: Vec<HeaderName> = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(ADDED.contains(n) || upgrade && n == UPGRADE))
        .collect();
    prepare_request(&mut req, conn, host.clone(), upgrade);
    assert_eq!(req.version(), Version::HTTP_11);
    assert!(req.uri().scheme().is_none() && req.uri().authority().is_none());
    let headers = req.headers();
    assert!(headers.get_all(HOST).iter().count() <= 1);
    if host.is_some() {
        assert!(headers.contains_key(HOST));
    }
    for name in HOP_BY_HOP.iter().chain(&named) {
        assert!(!headers.contains_key(name), "{name} was forwarded");
    }
    if upgrade {
        assert_eq!(headers.get_all(CONNECTION).iter().count(), 1);
        assert!(headers.contains_key(UPGRADE));
    } else {
        assert!(!headers.contains_key(CONNECTION) && !headers.contains_key(UPGRADE));
    }
    let xff: Vec<&HeaderValue> = headers.get_all(X_FORWARDED_FOR).iter().collect();
    assert_eq!(xff.len(), 1);
    if conn.trusted {
        assert!(xff[0].as_bytes().ends_with(conn.client_ip.as_bytes()));
    } else {
        assert_eq!(xff[0], conn.client_ip);
        assert!(!headers.contains_key(FORWARDED) && !headers.contains_key("x-real-ip"));
    }
}

/// The lean path (`crate::http::lean`) reads the bytes themselves: when
/// it takes a request, it takes no more than there is, and the instance
/// gets one HTTP/1.1 head with one `Host`, no hop-by-hop fields and the
/// node's own `X-Forwarded-For` last, then exactly the body the
/// client's `Content-Length` gave.
fn check_lean(data: &[u8], conn: &Conn) {
    let Some((taken, sent)) = crate::http::lean::taken(data, conn) else {
        return;
    };
    assert!(taken <= data.len());
    // What the client sent: one head, framed by one plain length or none.
    let mut client_fields = [httparse::EMPTY_HEADER; 128];
    let mut client = httparse::Request::new(&mut client_fields);
    let Ok(httparse::Status::Complete(client_head)) = client.parse(data) else {
        panic!("taken without a whole head");
    };
    assert!(values(client.headers, "transfer-encoding").is_empty());
    let client_body = body_length(client.headers, "taken with");
    assert_eq!(taken, client_head + client_body, "the bytes taken");
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut head = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(head_len)) = head.parse(&sent) else {
        panic!("the head sent on does not parse: {sent:?}");
    };
    assert_eq!(head.version, Some(1));
    let named = |name: &str| values(head.headers, name);
    assert_eq!(named("host").len(), 1);
    for gone in HOP_BY_HOP
        .iter()
        .map(HeaderName::as_str)
        .chain(["connection", "upgrade"])
    {
        assert!(named(gone).is_empty(), "{gone} was sent on");
    }
    let xff = named("x-forwarded-for");
    assert_eq!(xff.len(), 1);
    assert!(xff[0].ends_with(conn.client_ip.as_bytes()));
    let body_len = body_length(head.headers, "sent on with");
    assert_eq!(body_len, client_body, "the length sent on");
    assert_eq!(sent.len() - head_len, body_len, "the body sent on");
    assert_eq!(&sent[head_len..], &data[client_head..taken]);
}

/// The values of the fields named `name` (any case).
fn values<'a>(fields: &[httparse::Header<'a>], name: &str) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .map(|f| f.value)
        .collect()
}

/// The body length a head's fields give: none, or one `Content-Length`
/// of digits only (`what` names the head in the panic otherwise).
fn body_length(fields: &[httparse::Header<'_>], what: &str) -> usize {
    match values(fields, "content-length").as_slice() {
        [] => 0,
        [one] => std::str::from_utf8(one)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("{what} a length that is not plain digits")),
        more => panic!("{what} {} lengths", more.len()),
    }
}

/// Hop-by-hop headers that never reach an instance.
const HOP_BY_HOP: [HeaderName; 7] = [
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Headers the proxy writes itself.
const ADDED: [HeaderName; 5] = [
    HOST,
    CONNECTION,
    X_FORWARDED_FOR,
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
];

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    const LINES: &[&str] = &[
        "GET / HTTP/1.1",
        "HEAD /h HTTP/1.1",
        "POST /p?q=1 HTTP/1.1",
        "PUT /u HTTP/1.1",
        "DELETE /d HTTP/1.1",
        "CONNECT api.example.com:443 HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET http://api.example.com/abs HTTP/1.1",
        "GET / HTTP/1.0",
        "GET /#frag HTTP/1.1",
    ];
    const FIELDS: &[&str] = &[
        "host: api.example.com",
        "Host: API.example.com:8080",
        "host: www.example.com",
        "content-length: 3",
        "Content-Length: 0",
        "content-length: 03",
        "content-length: 3, 3",
        "content-length: +3",
        "content-length: 99999999999999999999999",
        "transfer-encoding: chunked",
        "connection: keep-alive",
        "connection: close",
        "connection: x-a",
        "x-a: 1",
        "te: trailers",
        "upgrade: websocket",
        "expect: 100-continue",
        "keep-alive: timeout=5",
        "proxy-authorization: basic x",
        "x-forwarded-for: 10.0.0.9",
        "forwarded: for=10.0.0.9",
        "x-real-ip: 10.0.0.9",
        "cookie: a=1",
    ];
    /// What may follow a head: a body, a next request, or less.
    const AFTER: &[&str] = &[
        "",
        "abc",
        "ab",
        "abcdef",
        "GET /next HTTP/1.1\r\nhost: api.example.com\r\n\r\n",
        "\r\n",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Requests put together from HTTP's pieces hold what the fuzz
        /// target asserts, on hyper's path and the lean one (on stable,
        /// beside the corpus replay).
        #[test]
        fn requests_of_http_pieces(
            line in 0..LINES.len(),
            fields in proptest::collection::vec(0..FIELDS.len(), 0..6),
            after in proptest::collection::vec(0..AFTER.len(), 0..3),
            routed in any::<bool>(),
        ) {
            let mut data = format!("{}\r\n", LINES[line]);
            if routed {
                data.push_str("host: api.example.com\r\n");
            }
            for f in fields {
                data.push_str(FIELDS[f]);
                data.push_str("\r\n");
            }
            data.push_str("\r\n");
            data.extend(after.iter().map(|&a| AFTER[a]));
            super::head(data.as_bytes());
        }
    }
}
