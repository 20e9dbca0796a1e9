//! The admin API client: `edgectl`, a node joining a cluster and the tests
//! all speak to a node through it.
//!
//! One HTTP/1.1 connection per request (plain, or TLS with a
//! [`client_config`](crate::tls::client_config)), the bearer token, and the
//! [`envelope`](edgelb_api::envelope) unwrapped:
//!
//! ```text
//!  ApiUrl::parse("http[s]://host[:port][/prefix]") ─▶ Client::new(url).with_token(t)[.with_tls(cfg)]
//!  Client::get/post/delete(path) ─▶ TCP connect ─▶ [TLS handshake] ─▶ request ─┬─ 2xx: Success<T>.data
//!     each step bounded (connect, handshake: 5 s; answer: 30 s)               └─ else: Error::Api {status, message}
//!  Client::send(method, path, body) ─▶ Answer {status, headers, body}, whatever the status
//! ```
//!
//! Every failure is an [`Error`] that keeps its cause as its source (the
//! I/O error of a refused connection, rustls' reason for a refused
//! certificate, serde's for an unexpected answer), so callers word it for
//! their users; [`Error::is_retryable`] tells a caller that waits for a
//! node to come up whether to try again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::{InvalidDnsNameError, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use edgelb_api::envelope::{Success, error_message};

mod url;

pub use url::{ApiUrl, UrlError};

/// How long connecting, and then the TLS handshake, may take by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take once connected, by default (writes answer
/// within 5 s or fail with 503; membership changes may take longer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read, so that a wrong `--api` that streams without
/// end cannot fill the caller's memory: far above what an admin API gives
/// (the group list of 100,000 instances is about 11 MB; a backup grows by
/// about 6 KB per stored certificate, 512 MiB at some 90,000 of them).
pub const MAX_ANSWER: usize = 512 << 20;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TCP connection failed (refused, unreachable, no such host).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The admin URL.
        url: ApiUrl,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// The host is not a name TLS can check (`https://` only).
    #[error("{host:?} is not a TLS server name: {source}")]
    ServerName {
        /// The URL's host.
        host: String,
        /// rustls' reason.
        #[source]
        source: InvalidDnsNameError,
    },
    /// An `https://` URL, but the client has no TLS config.
    #[error("{url} is https: the client needs the CA that signed its certificate")]
    NoTlsConfig {
        /// The admin URL.
        url: ApiUrl,
    },
    /// The TLS handshake failed; the source's inner error is rustls' when
    /// the server's certificate was refused.
    #[error("TLS handshake with {url} failed: {source}")]
    Tls {
        /// The admin URL.
        url: ApiUrl,
        /// The handshake's error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting took longer than allowed.
    #[error("no connection to {url} within {after:?}")]
    ConnectTimeout {
        /// The admin URL.
        url: ApiUrl,
        /// The bound.
        after: Duration,
    },
    /// The TLS handshake took longer than allowed.
    #[error("no TLS handshake with {url} within {after:?}")]
    TlsTimeout {
        /// The admin URL.
        url: ApiUrl,
        /// The bound.
        after: Duration,
    },
    /// The request could not be built (a path that is not a URI path).
    #[error("bad request for {path:?}: {source}")]
    Request {
        /// The path as given.
        path: String,
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The request body does not serialise.
    #[error("encoding the request body: {0}")]
    Encode(#[source] serde_json::Error),
    /// The connection failed while the request was sent or its answer read.
    #[error("the connection to {url} failed: {source}")]
    Http {
        /// The admin URL.
        url: ApiUrl,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The answer's body is larger than [`MAX_ANSWER`]: not an admin API.
    #[error("the answer from {url} is larger than {limit} bytes")]
    TooLarge {
        /// The admin URL.
        url: ApiUrl,
        /// The answer's status.
        status: StatusCode,
        /// The bound.
        limit: usize,
    },
    /// No complete answer within the request timeout.
    #[error("no complete answer from {url} within {after:?}")]
    Timeout {
        /// The admin URL.
        url: ApiUrl,
        /// The bound.
        after: Duration,
    },
    /// The API answered with an error status.
    #[error("{message} (HTTP {})", status.as_u16())]
    Api {
        /// The status.
        status: StatusCode,
        /// The error envelope's message, or a summary of a body that is not
        /// one ([`error_message`]).
        message: String,
    },
    /// A success answer that is not the envelope with the expected data.
    #[error("unexpected answer from {url} (HTTP {}): {source}", status.as_u16())]
    Decode {
        /// The admin URL.
        url: ApiUrl,
        /// The status.
        status: StatusCode,
        /// serde's reason.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Whether the same request may succeed later: the node could not be
    /// reached, the connection broke, or it answered 503 (starting, no
    /// leader yet, storage unavailable). Not for refusals, bad URLs, or
    /// answers that do not parse.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Tls { .. }
            | Self::ConnectTimeout { .. }
            | Self::TlsTimeout { .. }
            | Self::Http { .. }
            | Self::Timeout { .. } => true,
            Self::Api { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            _ => false,
        }
    }

    /// The status the API answered with, for [`Error::Api`] and
    /// [`Error::Decode`].
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } | Self::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A whole answer, whatever its status.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// A client of one node's admin API. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    url: ApiUrl,
    token: Option<String>,
    tls: Option<Arc<ClientConfig>>,
    user_agent: &'static str,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_answer: usize,
}

impl Client {
    /// A client of `url` without a token; [`CONNECT_TIMEOUT`] and
    /// [`REQUEST_TIMEOUT`].
    pub fn new(url: ApiUrl) -> Self {
        Self {
            url,
            token: None,
            tls: None,
            user_agent: concat!("edgelb-client/", env!("CARGO_PKG_VERSION")),
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            max_answer: MAX_ANSWER,
        }
    }

    /// Presents `token` as a bearer token.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Speaks TLS with `config` to an `https://` URL.
    #[must_use]
    pub fn with_tls(mut self, config: Arc<ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Sends `User-Agent: agent`.
    #[must_use]
    pub fn with_user_agent(mut self, agent: &'static str) -> Self {
        self.user_agent = agent;
        self
    }

    /// Bounds connecting (and the TLS handshake) by `connect` and each
    /// exchange after it by `request`.
    #[must_use]
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Self {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// Reads answers of at most `limit` bytes ([`MAX_ANSWER`] by default).
    #[must_use]
    pub fn with_max_answer(mut self, limit: usize) -> Self {
        self.max_answer = limit;
        self
    }

    /// The admin URL.
    pub fn url(&self) -> &ApiUrl {
        &self.url
    }

    /// `GET path` → the envelope's `data`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with `body` as JSON → the envelope's `data`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, Error> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `DELETE path` → the envelope's `data`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// `method path` with `body` as JSON → the envelope's `data`; a status
    /// other than 2xx is [`Error::Api`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, Error> {
        let body = match body {
            Some(b) => Some(Bytes::from(serde_json::to_vec(b).map_err(Error::Encode)?)),
            None => None,
        };
        let answer = self.send(method, path, body).await?;
        if !answer.status.is_success() {
            return Err(Error::Api {
                status: answer.status,
                message: error_message(&answer.body),
            });
        }
        serde_json::from_slice::<Success<T>>(&answer.body)
            .map(|s| s.data)
            .map_err(|source| Error::Decode {
                url: self.url.clone(),
                status: answer.status,
                source,
            })
    }

    /// One request with a JSON `body` (already encoded); any status is an
    /// answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, Error> {
        let url = &self.url;
        let connect = TcpStream::connect((url.host(), url.port()));
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| Error::ConnectTimeout {
                url: url.clone(),
                after: self.connect_timeout,
            })?
            .map_err(|source| Error::Connect {
                url: url.clone(),
                source,
            })?;
        // Small requests: nothing to gain from Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        if !url.is_tls() {
            return self.exchange(stream, method, path, body).await;
        }
        let config = self
            .tls
            .clone()
            .ok_or_else(|| Error::NoTlsConfig { url: url.clone() })?;
        let name =
            ServerName::try_from(url.host().to_owned()).map_err(|source| Error::ServerName {
                host: url.host().to_owned(),
                source,
            })?;
        let handshake = TlsConnector::from(config).connect(name, stream);
        let stream = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| Error::TlsTimeout {
                url: url.clone(),
                after: self.connect_timeout,
            })?
            .map_err(|source| Error::Tls {
                url: url.clone(),
                source,
            })?;
        self.exchange(stream, method, path, body).await
    }

    /// One request on a connected `stream`, bounded by the request timeout.
    async fn exchange<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let req = self.request(method, path, body)?;
        let http = |source| Error::Http {
            url: self.url.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let work = async {
            let resp = sender.send_request(req).await.map_err(http)?;
            let (parts, body) = resp.into_parts();
            let body = match Limited::new(body, self.max_answer).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return Err(match e.downcast::<hyper::Error>() {
                        Ok(e) => http(*e),
                        Err(_) => Error::TooLarge {
                            url: self.url.clone(),
                            status: parts.status,
                            limit: self.max_answer,
                        },
                    });
                }
            };
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let answer = tokio::time::timeout(self.request_timeout, work).await;
        // One request per connection: done with it, whatever happened.
        conn.abort();
        answer.map_err(|_| Error::Timeout {
            url: self.url.clone(),
            after: self.request_timeout,
        })?
    }

    /// The request: the URL's prefix before `path`, `Host`, the token, and
    /// a JSON content type with a body.
    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, Error> {
        let bad = |source| Error::Request {
            path: path.to_owned(),
            source,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url.prefix()))
            .header(http::header::HOST, self.url.authority())
            .header(
                http::header::USER_AGENT,
                HeaderValue::from_static(self.user_agent),
            );
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        req.body(Full::new(body.unwrap_or_default())).map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers one connection with `status` and `body` and
    /// hands back the request it read.
    async fn answer_once(
        status: &'static str,
        body: &'static str,
    ) -> (ApiUrl, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = ApiUrl::http(listener.local_addr().unwrap());
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn an_answer_without_end_is_cut_at_the_limit() {
        // A wrong --api that streams: chunks for as long as it is read.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = ApiUrl::http(listener.local_addr().unwrap());
        let streamer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
            // Bounded: 64 MiB at most, far past the client's limit.
            for _ in 0..1024 {
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let client = Client::new(url).with_max_answer(1 << 20);
        let got: Result<serde_json::Value, Error> = client.get("/v1/services").await;
        match got {
            Err(Error::TooLarge { status, limit, .. }) => {
                assert_eq!((status, limit), (StatusCode::OK, 1 << 20));
            }
            other => panic!("{other:?}"),
        }
        streamer.abort();
    }

    #[tokio::test]
    async fn data_comes_out_of_the_envelope_and_the_request_carries_the_token() {
        let (url, seen) = answer_once("200 OK", r#"{"status":"success","data":{"n":1}}"#).await;
        let client = Client::new(url.clone()).with_token("t0k");
        let data: serde_json::Value = client
            .post("/v1/x", &serde_json::json!({"a": 1}))
            .await
            .unwrap();
        assert_eq!(data, serde_json::json!({"n": 1}));
        let req = seen.await.unwrap().to_ascii_lowercase();
        assert!(req.starts_with("post /v1/x http/1.1\r\n"), "{req}");
        assert!(req.contains("authorization: bearer t0k\r\n"), "{req}");
        assert!(req.contains("content-type: application/json\r\n"), "{req}");
        assert!(
            req.contains(&format!("host: {}\r\n", url.authority())),
            "{req}"
        );
        assert!(req.ends_with(r#"{"a":1}"#), "{req}");
    }

    #[tokio::test]
    async fn error_answers_and_refused_connections_are_typed() {
        let body = r#"{"status":"error","message":"no leader","errors":[{"status":503,"message":"no leader"}]}"#;
        let (url, _seen) = answer_once("503 Service Unavailable", body).await;
        let e = Client::new(url)
            .get::<serde_json::Value>("/v1/cluster")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Api { status, message } if *status == StatusCode::SERVICE_UNAVAILABLE && message == "no leader"),
            "{e:?}"
        );
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "no leader (HTTP 503)");

        let (url, _seen) = answer_once("200 OK", "nope").await;
        let e = Client::new(url)
            .get::<serde_json::Value>("/v1/cluster")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e:?}");
        assert!(!e.is_retryable());

        // A port nobody listens on (bound, then closed).
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = ApiUrl::http(closed.local_addr().unwrap());
        drop(closed);
        let e = Client::new(url)
            .send(Method::GET, "/readyz", None)
            .await
            .unwrap_err();
        let Error::Connect { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(e.is_retryable());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = ApiUrl::parse(&format!("https://{}", listener.local_addr().unwrap())).unwrap();
        let e = Client::new(https)
            .send(Method::GET, "/", None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoTlsConfig { .. }), "{e:?}");
    }
}
