//! `edgectl`'s admin API client: the one in `edgelb-api`
//! ([`edgelb_client::Client`]) with the `--cacert` it trusts, its failures
//! worded for the operator with their exit codes.
//!
//! ```text
//!  ApiUrl::parse(--api) ─▶ Client::get/post/delete(path) ─▶ edgelb_client::Client ─▶ 2xx: envelope.data
//!      4xx/5xx       ─▶ Failure::Api{status, envelope.message}                 (exit 1)
//!      connect error ─▶ Failure::Connect{url, "connection refused"}            (exit 3)
//!      TLS failure   ─▶ Failure::Tls{url, "its certificate is not signed by …"} (exit 3)
//! ```

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use edgelb_client::client::{Answer, Error, UrlError};
use http::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rustls::ClientConfig;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use edgelb_client::ApiUrl;

use crate::error::{Failure, Outcome};

/// What `edgectl` says it is.
const USER_AGENT: &str = concat!("edgectl/", env!("CARGO_PKG_VERSION"));

/// A client of one node's admin API.
#[derive(Clone, Debug)]
pub struct Client {
    inner: edgelb_client::Client,
    /// For `https://`: the `--cacert` the TLS config trusts, named in
    /// messages.
    cacert: Option<PathBuf>,
}

impl Client {
    /// A client of `url` presenting `token` (none: no `Authorization`).
    pub fn new(url: ApiUrl, token: Option<String>) -> Self {
        let mut inner = edgelb_client::Client::new(url).with_user_agent(USER_AGENT);
        if let Some(token) = token {
            inner = inner.with_token(token);
        }
        Self {
            inner,
            cacert: None,
        }
    }

    /// Speaks TLS with `config`, which trusts the CA in `cacert`.
    pub fn with_tls(self, config: Arc<ClientConfig>, cacert: PathBuf) -> Self {
        Self {
            inner: self.inner.with_tls(config),
            cacert: Some(cacert),
        }
    }

    /// The admin URL.
    pub fn url(&self) -> &ApiUrl {
        self.inner.url()
    }

    /// `GET path` → the envelope's `data`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Outcome<T> {
        self.inner.get(path).await.map_err(|e| self.failure(e))
    }

    /// `POST path` with a JSON body → the envelope's `data`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Outcome<T> {
        self.inner
            .post(path, body)
            .await
            .map_err(|e| self.failure(e))
    }

    /// `PATCH path` with a JSON body → the envelope's `data`.
    pub async fn patch<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Outcome<T> {
        self.inner
            .call(Method::PATCH, path, Some(body))
            .await
            .map_err(|e| self.failure(e))
    }

    /// `DELETE path` → the envelope's `data`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Outcome<T> {
        self.inner.delete(path).await.map_err(|e| self.failure(e))
    }

    /// One request; any status is an `Ok` answer. Connection problems are
    /// [`Failure::Connect`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Outcome<Answer> {
        self.inner
            .send(method, path, body)
            .await
            .map_err(|e| self.failure(e))
    }

    /// The operator's line for `e`.
    fn failure(&self, e: Error) -> Failure {
        let url = self.url();
        let connect = |reason: String| Failure::Connect {
            url: url.to_string(),
            reason,
        };
        let tls = |reason: String| Failure::Tls {
            url: url.to_string(),
            reason,
        };
        match e {
            Error::Api { status, .. } if status == StatusCode::UNAUTHORIZED => Failure::Api {
                status: status.as_u16(),
                message: format!(
                    "{url} refused the admin token: pass the cluster's token with --token or EDGELB_TOKEN"
                ),
            },
            Error::Api { status, message } => Failure::Api {
                status: status.as_u16(),
                message,
            },
            Error::Decode { status, source, .. } => Failure::Api {
                status: status.as_u16(),
                message: format!("unexpected answer from {url}: {source}"),
            },
            Error::Connect { source, .. } => connect(io_reason(&source)),
            Error::ConnectTimeout { after, .. } => {
                connect(format!("no connection within {after:?}"))
            }
            Error::TlsTimeout { after, .. } => tls(format!("no TLS handshake within {after:?}")),
            Error::Tls { source, .. } => {
                let cacert = self.cacert.clone().unwrap_or_default();
                tls(crate::tls::reason(&source, &cacert, url.host()))
            }
            Error::Http { source, .. } => {
                let hint = if url.is_tls() {
                    ""
                } else {
                    " (if the admin API serves TLS, use https:// and --cacert)"
                };
                connect(format!("the connection failed: {source}{hint}"))
            }
            Error::Timeout { after, .. } => connect(format!("no complete answer within {after:?}")),
            Error::TooLarge { status, limit, .. } => Failure::Api {
                status: status.as_u16(),
                message: format!(
                    "unexpected answer from {url}: larger than {limit} bytes (is --api an edgelb \
                     admin API?)"
                ),
            },
            Error::ServerName { .. } | Error::NoTlsConfig { .. } => {
                Failure::usage(format!("--api {url}: {e}"))
            }
            other => Failure::usage(other),
        }
    }
}

impl From<UrlError> for Failure {
    fn from(e: UrlError) -> Self {
        Self::usage(format!("--api {e}"))
    }
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
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn a_bad_url_is_a_usage_error() {
        for bad in ["ftp://x", "http://:7070", "http://x:0", "http://[::1"] {
            let e = Failure::from(ApiUrl::parse(bad).unwrap_err());
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "--api {bad:?} {}",
                    match bad {
                        "ftp://x" => "is not an http:// or https:// URL",
                        "http://:7070" => "has no host",
                        "http://x:0" => "has a bad port",
                        _ => "has an unclosed [ in its host",
                    }
                )
            );
        }
    }

    #[tokio::test]
    async fn failures_keep_their_exit_codes() {
        // A port nobody listens on (bound, then closed).
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = ApiUrl::parse(&format!("http://{}", closed.local_addr().unwrap())).unwrap();
        drop(closed);
        let e = Client::new(url.clone(), None)
            .get::<Value>("/v1/services")
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert_eq!(
            e.to_string(),
            format!(
                "cannot reach the admin API at {url}: connection refused (is edgelb running? set --api or EDGELB_API)"
            )
        );
    }
}
