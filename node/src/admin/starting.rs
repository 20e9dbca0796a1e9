//! The admin port while the node starts: from the moment its listener is
//! bound (or taken over from the process it replaces) until the admin API
//! serves, which waits for the storage to open and, on a joining node, for
//! the join to be applied (minutes, for a large state over a slow link).
//! Probes and operators get an answer instead of a connection that nobody
//! reads:
//!
//! - `GET /healthz`: 503 `starting: <step>` until the Raft core runs, then
//!   200 `ok` (the process is up and can write: a liveness probe does not
//!   restart a node that is joining); 503 with the problem when its storage
//!   fails, as later;
//! - `GET /readyz`: 503 `starting: <step>`;
//! - `/v1/…`: 401 without the admin token (with the API's per-address
//!   back-off), else 503 in the envelope, `Retry-After: 1`;
//! - anything else, `/metrics` included: 503.
//!
//! One request per connection, at most [`MAX_CONNECTIONS`] at once (or
//! `admin_max_connections` when lower; half of them per client address), each done within the header timeout from
//! its accept (a TLS handshake included). The listener goes back to the admin API when it starts
//! ([`Early::stop`]); connections already accepted finish here.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use super::guard::Guard;
use super::reply::{ApiError, Reply, text};
use super::{AdminCert, Limits, MAX_HEADER_BYTES, Timeouts};
use crate::health::Health;
use crate::metrics::Metrics;

/// Connections answered at once, at most (fewer when
/// `admin_max_connections` is lower); more are closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 32;

/// What a starting node tells of itself.
pub(crate) struct Starting {
    step: Mutex<String>,
    raft_running: AtomicBool,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    guard: Arc<Guard>,
    token: String,
    timeouts: Timeouts,
    /// [`MAX_CONNECTIONS`], or `admin_max_connections` when lower.
    max_connections: usize,
}

impl Starting {
    pub(crate) fn new(
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        guard: Arc<Guard>,
        token: String,
        timeouts: Timeouts,
        admin_max_connections: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            step: Mutex::new("opening storage".into()),
            raft_running: AtomicBool::new(false),
            health,
            metrics,
            guard,
            token,
            timeouts,
            max_connections: MAX_CONNECTIONS.min(admin_max_connections).max(1),
        })
    }

    /// What the start does now (`/readyz` says it).
    pub(crate) fn step(&self, step: impl Into<String>) {
        *self.step.lock().unwrap_or_else(PoisonError::into_inner) = step.into();
    }

    /// The Raft core runs: `/healthz` answers 200 from now on (unless the
    /// storage fails).
    pub(crate) fn raft_running(&self) {
        self.raft_running.store(true, Ordering::Relaxed);
    }

    async fn reply(&self, peer: IpAddr, req: &Request<Incoming>) -> Reply {
        let step = self
            .step
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let path = req.uri().path();
        let get = req.method() == Method::GET;
        let starting = || {
            retry_soon(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("starting: {step}\n"),
            ))
        };
        let reply = match path {
            "/healthz" | "/readyz" if get => match self.health.problem() {
                Some(problem) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")),
                None if path == "/healthz" && self.raft_running.load(Ordering::Relaxed) => {
                    text(StatusCode::OK, "ok\n")
                }
                None => starting(),
            },
            _ if path == "/v1" || path.starts_with("/v1/") => {
                match self
                    .guard
                    .check(peer, req.headers(), &self.token, None)
                    .await
                {
                    Err(e) => e.into_reply(),
                    Ok(()) => retry_soon(
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("the node is starting ({step}); try again"),
                        )
                        .into_reply(),
                    ),
                }
            }
            _ => starting(),
        };
        self.metrics.admin_request(reply.status().as_u16());
        reply
    }
}

/// `reply` with `Retry-After: 1`: the start moves on.
fn retry_soon(mut reply: Reply) -> Reply {
    reply
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    reply
}

/// The admin port served by [`serve`], until [`Early::stop`].
pub(crate) struct Early {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<TcpListener>>,
}

impl Early {
    /// Stops accepting and gives the listener back.
    pub(crate) async fn stop(mut self) -> std::io::Result<TcpListener> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("stopped once");
        task.await.map_err(std::io::Error::other)
    }
}

impl Drop for Early {
    /// A start that failed: the listener closes with the task.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Answers on `listener` (over TLS with `tls`) as [`Starting`] says until
/// stopped.
pub(crate) fn serve(
    listener: TcpListener,
    tls: Option<Arc<AdminCert>>,
    starting: Arc<Starting>,
) -> Early {
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let acceptor = tls.as_ref().map(AdminCert::acceptor);
        let limits = Limits::new(starting.max_connections);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                _ = &mut stopped => return listener,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed while starting");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(held) = limits.admit(peer) else {
                continue;
            };
            let (starting, acceptor) = (starting.clone(), acceptor.clone());
            let deadline = Instant::now() + starting.timeouts.header;
            tokio::spawn(tokio::time::timeout_at(deadline, async move {
                let _held = held;
                match acceptor {
                    None => answer(stream, peer, starting).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => answer(stream, peer, starting).await,
                        Err(e) => debug!(%peer, error = %e, "admin TLS handshake failed"),
                    },
                }
            }));
        }
    });
    Early {
        stop: Some(stop),
        task: Some(task),
    }
}

/// Answers one request on `stream`.
async fn answer<S>(stream: S, peer: SocketAddr, starting: Arc<Starting>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let starting = starting.clone();
        async move { Ok::<_, Infallible>(starting.reply(peer.ip(), &req).await) }
    });
    let conn = http1::Builder::new()
        // The caller's timeout bounds the whole exchange.
        .header_read_timeout(None)
        .keep_alive(false)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        debug!(%peer, error = %e, "admin connection ended while starting");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::admin::{Admin, AuthBackoff};
    use crate::health::MinFree;

    const TOKEN: &str = "starting-test-token-0123";
    const LIMIT: Duration = Duration::from_secs(10);

    /// One request on `io` (which the server closes after its answer):
    /// the whole answer as text.
    async fn ask(mut io: impl AsyncRead + AsyncWrite + Unpin, path: &str, token: bool) -> String {
        let auth = if token {
            format!("authorization: Bearer {TOKEN}\r\n")
        } else {
            String::new()
        };
        let request = format!("GET {path} HTTP/1.1\r\nhost: admin.test\r\n{auth}\r\n");
        io.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(LIMIT, io.read_to_end(&mut answer))
            .await
            .expect("an answer in time")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The starting server on a fresh port, over TLS with `tls`.
    async fn started(tls: Option<Arc<AdminCert>>) -> (SocketAddr, Arc<Starting>, Early) {
        let dir = std::env::temp_dir();
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(&dir, MinFree::Bytes(0), metrics.registry());
        let guard = Admin::auth_guard(AuthBackoff::default(), &metrics);
        let starting = Starting::new(
            health,
            metrics,
            guard,
            TOKEN.into(),
            Timeouts::default(),
            64,
        );
        starting.step("joining the cluster");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        (addr, starting.clone(), serve(listener, tls, starting))
    }

    /// What every probe and API call answers while the node starts.
    async fn answers<F, Fut, S>(connect: F, starting: &Starting)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = S>,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ready = ask(connect().await, "/readyz", false).await;
        assert!(
            ready.starts_with("HTTP/1.1 503") && ready.contains("starting: joining the cluster"),
            "{ready}"
        );
        let health = ask(connect().await, "/healthz", false).await;
        assert!(health.starts_with("HTTP/1.1 503"), "{health}");
        let anonymous = ask(connect().await, "/v1/services", false).await;
        assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
        let api = ask(connect().await, "/v1/services", true).await;
        assert!(
            api.starts_with("HTTP/1.1 503")
                && api.to_ascii_lowercase().contains("retry-after: 1")
                && api.contains("\"status\":\"error\""),
            "{api}"
        );
        starting.raft_running();
        let health = ask(connect().await, "/healthz", false).await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }

    #[tokio::test]
    async fn it_answers_in_plain_http() {
        let (addr, starting, early) = started(None).await;
        let connect = || async move { TcpStream::connect(addr).await.expect("connect") };
        answers(connect, &starting).await;
        early.stop().await.expect("the listener back");
    }

    #[tokio::test]
    async fn it_answers_over_tls_with_the_admin_certificate() {
        let ck = rcgen::generate_simple_self_signed(vec!["admin.test".into()]).expect("rcgen");
        let cert = AdminCert::new(&ck.cert.pem(), &ck.key_pair.serialize_pem()).expect("a pair");
        let (addr, starting, early) = started(Some(cert)).await;
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ck.cert.der().to_vec()))
            .expect("a root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = TlsConnector::from(Arc::new(client));
        let connect = || {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let name = ServerName::try_from("admin.test").expect("a name");
                connector.connect(name, tcp).await.expect("a TLS handshake")
            }
        };
        answers(connect, &starting).await;
        // Plain HTTP on the TLS port gets no answer in plain.
        let plain = TcpStream::connect(addr).await.expect("connect");
        let answer = ask(plain, "/readyz", false).await;
        assert!(!answer.contains("HTTP/1.1"), "{answer}");
        early.stop().await.expect("the listener back");
    }
}
