//! A small HTTP/1.1 client of the admin API (`http://`, or `https://` with
//! `--cacert`, see [`crate::tls`]): one connection per request, the bearer
//! token, the JSON envelope unwrapped.
//!
//! ```text
//!  ApiUrl::parse(--api) ─▶ Client::get/post/delete(path)
//!      ─▶ TCP connect (5 s) [─▶ TLS handshake] ─▶ request ─▶ 2xx: envelope.data
//!                                      └▶ 4xx/5xx: Failure::Api{status, envelope.message}
//!      connect error ─▶ Failure::Connect{url, "connection refused"}
//!      TLS failure   ─▶ Failure::Tls{url, "its certificate is not signed by …"}
//! ```

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use raft_store::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::error::{Failure, Outcome};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take once connected (writes answer within 5 s or
/// fail with 503; membership changes may take longer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed `--api` URL: `http[s]://HOST[:PORT][/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiUrl {
    /// `https://`.
    tls: bool,
    host: String,
    port: u16,
    prefix: String,
    /// As shown in messages: `http[s]://host:port[/prefix]`.
    display: String,
}

impl ApiUrl {
    /// Parses an admin URL; a missing scheme means `http://`, a missing
    /// port 80 (443 with `https://`).
    pub fn parse(url: &str) -> Outcome<Self> {
        let bad = |why: &str| Failure::usage(format!("--api {url:?} {why}"));
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some(_) => return Err(bad("is not an http:// or https:// URL")),
            None => (false, url),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("has an unclosed [ in its host"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(bad("has junk after its IPv6 host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("has a bad port"))?,
        };
        let shown_host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let scheme = if tls { "https" } else { "http" };
        Ok(Self {
            display: format!("{scheme}://{shown_host}:{port}{prefix}"),
            tls,
            host: host.to_owned(),
            port,
            prefix: prefix.to_owned(),
        })
    }

    /// Whether the URL is `https://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for ApiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// A client of one node's admin API.
#[derive(Clone, Debug)]
pub struct Client {
    url: ApiUrl,
    token: Option<String>,
    /// For `https://`: the config and the `--cacert` it trusts.
    tls: Option<(Arc<ClientConfig>, PathBuf)>,
}

/// A raw answer: status and body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
}

impl Client {
    /// A client of `url` presenting `token` (none: no `Authorization`).
    pub fn new(url: ApiUrl, token: Option<String>) -> Self {
        Self {
            url,
            token,
            tls: None,
        }
    }

    /// Speaks TLS with `config`, which trusts the CA in `cacert`.
    pub fn with_tls(mut self, config: Arc<ClientConfig>, cacert: PathBuf) -> Self {
        self.tls = Some((config, cacert));
        self
    }

    /// The admin URL.
    pub fn url(&self) -> &ApiUrl {
        &self.url
    }

    /// `GET path` → the envelope's `data`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Outcome<T> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body → the envelope's `data`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Outcome<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `DELETE path` → the envelope's `data`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Outcome<T> {
        self.call(Method::DELETE, path, None).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Outcome<T> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let answer = self.request(method, path, body).await?;
        if answer.status == 401 {
            return Err(Failure::Api {
                status: 401,
                message: format!(
                    "{} refused the admin token: pass the cluster's token with --token or EDGELB_TOKEN",
                    self.url
                ),
            });
        }
        if !(200..300).contains(&answer.status) {
            return Err(api_failure(answer.status, &answer.body));
        }
        let envelope: Value = serde_json::from_slice(&answer.body).map_err(|e| Failure::Api {
            status: answer.status,
            message: format!("unreadable answer from {} ({e})", self.url),
        })?;
        let data = envelope.get("data").cloned().unwrap_or(Value::Null);
        serde_json::from_value(data).map_err(|e| Failure::Api {
            status: answer.status,
            message: format!("unexpected answer from {}: {e}", self.url),
        })
    }

    /// One request; any status is an `Ok` answer. Connection problems are
    /// [`Failure::Connect`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Outcome<Answer> {
        let connect_failure = |reason: String| Failure::Connect {
            url: self.url.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.url.host.as_str(), self.url.port)),
        )
        .await
        .map_err(|_| connect_failure(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| connect_failure(io_reason(&e)))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => self.exchange(stream, method, path, body).await,
            Some((config, cacert)) => {
                let tls_failure = |reason: String| Failure::Tls {
                    url: self.url.to_string(),
                    reason,
                };
                let name = ServerName::try_from(self.url.host.clone())
                    .map_err(|e| Failure::usage(format!("--api {}: {e}", self.url)))?;
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    TlsConnector::from(config.clone()).connect(name, stream),
                )
                .await
                .map_err(|_| tls_failure(format!("no TLS handshake within {CONNECT_TIMEOUT:?}")))?
                .map_err(|e| tls_failure(crate::tls::reason(&e, cacert, &self.url.host)))?;
                self.exchange(stream, method, path, body).await
            }
        }
    }

    /// One request on a connected `stream`.
    async fn exchange<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Outcome<Answer>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connect_failure = |reason: String| Failure::Connect {
            url: self.url.to_string(),
            reason,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_failure(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url.prefix))
            .header(http::header::HOST, self.url.authority())
            .header(
                http::header::USER_AGENT,
                concat!("edgectl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Failure::usage(format!("building the request for {path}: {e}")))?;
        let work = async {
            let resp = sender.send_request(req).await.map_err(|e| {
                let hint = if self.url.tls {
                    ""
                } else {
                    " (if the admin API serves TLS, use https:// and --cacert)"
                };
                connect_failure(format!("the connection failed: {e}{hint}"))
            })?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| connect_failure(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| connect_failure(format!("no answer within {REQUEST_TIMEOUT:?}")))?;
        conn.abort();
        answer
    }
}

/// The error envelope's message, or a one-line summary of another body.
pub fn api_failure(status: u16, body: &[u8]) -> Failure {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) if !e.message.is_empty() => e.message,
        _ => {
            let text = String::from_utf8_lossy(body);
            let line = text.lines().map(str::trim).find(|l| !l.is_empty());
            match line {
                Some(l) if l.chars().count() > 200 => {
                    format!("{}…", l.chars().take(200).collect::<String>())
                }
                Some(l) => l.to_owned(),
                None => "the admin API answered with an error".to_owned(),
            }
        }
    };
    Failure::Api { status, message }
}

/// A connect error in a few words.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut => "connection timed out".to_owned(),
        io::ErrorKind::AddrNotAvailable => "address not available".to_owned(),
        _ => e.to_string(),
    }
}

/// A path segment with everything but unreserved characters
/// percent-encoded (names and uuids pass unchanged).
pub fn segment(s: &str) -> String {
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// RFC 3986's unreserved characters pass; every other byte is encoded.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_encode_all_but_unreserved() {
        assert_eq!(segment("web-1.a_b~c"), "web-1.a_b~c");
        assert_eq!(segment("a b/c?d%\u{e9}"), "a%20b%2Fc%3Fd%25%C3%A9");
    }

    #[test]
    fn urls() {
        let u = ApiUrl::parse("http://127.0.0.1:7070").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:7070");
        assert_eq!(u.authority(), "127.0.0.1:7070");
        let u = ApiUrl::parse("127.0.0.11:7070/").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.11:7070");
        let u = ApiUrl::parse("http://[::1]:7070/edge/").unwrap();
        assert_eq!(u.to_string(), "http://[::1]:7070/edge");
        assert_eq!(u.host, "::1");
        assert_eq!(u.prefix, "/edge");
        let u = ApiUrl::parse("http://lb.example").unwrap();
        assert_eq!(u.port, 80);
        let u = ApiUrl::parse("https://127.0.0.1").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.to_string(), "https://127.0.0.1:443");
        for bad in [
            "ftp://x",
            "http://:7070",
            "http://x:0",
            "http://x:port",
            "http://[::1",
        ] {
            let e = ApiUrl::parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn error_bodies() {
        let body = br#"{"status":"error","message":"service group \"x\" not found","errors":[{"status":404,"message":"service group \"x\" not found"}]}"#;
        assert_eq!(
            api_failure(404, body).to_string(),
            "service group \"x\" not found (HTTP 404)"
        );
        assert_eq!(
            api_failure(502, b"\n  bad gateway\nmore").to_string(),
            "bad gateway (HTTP 502)"
        );
        assert_eq!(
            api_failure(500, b"").to_string(),
            "the admin API answered with an error (HTTP 500)"
        );
    }

    #[test]
    fn segments() {
        assert_eq!(segment("web-1"), "web-1");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}
