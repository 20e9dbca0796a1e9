//! The admin API over real sockets: a server on port 0 in front of an
//! in-memory store, and a hyper client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Admin, AuthBackoff, serve};
use crate::dataplane::{DataPlane, Settings};
use crate::gossip::Gossip;
use crate::metrics::Metrics;
use crate::patience::patient;
use crate::routing::{BuildContext, publish};
use crate::tls::CertCache;

mod groups;
mod instances;
mod metrics;
mod server;

const TOKEN: &str = "s3cret-token";

struct Server {
    addr: SocketAddr,
    dir: std::path::PathBuf,
    admin: Arc<Admin>,
    certs: CertCache,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// Asserts the error envelope with `status`.
    #[track_caller]
    fn assert_error(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        let v = self.json();
        assert_eq!(v["status"], "error", "{v}");
        assert_eq!(v["errors"][0]["status"], status, "{v}");
        let message = v["message"].as_str().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{v}");
        assert_eq!(v["errors"][0]["message"], message.as_str(), "{v}");
        message
    }

    /// Asserts 200 with the success envelope and returns `data`.
    #[track_caller]
    fn data(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        let v = self.json();
        assert_eq!(v["status"], "success", "{v}");
        v["data"].clone()
    }
}

impl Server {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A server whose `/metrics` needs `metrics_token`, when given.
    async fn start_with(metrics_token: Option<&str>) -> Self {
        Self::start_backoff(metrics_token, AuthBackoff::default()).await
    }

    /// [`Server::start_with`] with the token back-off `backoff`.
    async fn start_backoff(metrics_token: Option<&str>, backoff: AuthBackoff) -> Self {
        Self::start_full(metrics_token, backoff, super::Timeouts::default()).await
    }

    /// A server with the connection timeouts `timeouts`.
    async fn start_timeouts(timeouts: super::Timeouts) -> Self {
        Self::start_full(None, AuthBackoff::default(), timeouts).await
    }

    async fn start_full(
        metrics_token: Option<&str>,
        backoff: AuthBackoff,
        timeouts: super::Timeouts,
    ) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("edgelb-admin-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, _transport) = crate::raft::one_node_store(&dir)
            .await
            .expect("one-node store");
        let dataplane = Arc::new(DataPlane::new(Settings::default()));
        let metrics = Arc::new(Metrics::new());
        let gossip = Arc::new(Gossip::new(
            1,
            ::gossip::Config::default(),
            dataplane.clone(),
            metrics.clone(),
        ));
        let guard = Admin::auth_guard(backoff, &metrics);
        let health = store.health().clone();
        let admin = Arc::new(Admin {
            store: Arc::new(store),
            health,
            dataplane,
            metrics,
            gossip,
            token: TOKEN.to_owned(),
            metrics_token: metrics_token.map(str::to_owned),
            cluster_domain: "edgelb.local".to_owned(),
            ready: Arc::default(),
            node_cert_lifetime: crate::cluster::pki::DEFAULT_NODE_LIFETIME,
            guard,
            tls: None,
            timeouts,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, admin.clone(), shutdown.clone()));
        Self {
            addr,
            dir,
            admin,
            certs: CertCache::default(),
            shutdown,
            task,
        }
    }

    /// Rebuilds the data plane's routing table from the store's state, as
    /// the node does on every state change.
    fn rebuild(&self) {
        let state = self.admin.store.state();
        let cx = BuildContext {
            certs: &self.certs,
            drain_timeout: Duration::from_secs(1),
            load_changed: None,
        };
        publish(&self.admin.dataplane.routes, &state, &cx);
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        self.request_from(None, method, path, token, body).await
    }

    /// [`Server::request`] from the loopback address `from` (any when
    /// `None`).
    async fn request_from(
        &self,
        from: Option<std::net::IpAddr>,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let stream = match from {
            None => TcpStream::connect(self.addr).await.expect("connect"),
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
                socket.connect(self.addr).await.expect("connect")
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        let resp = sender.send_request(req).await.expect("send");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, Some(TOKEN), None).await
    }

    async fn send(&self, method: Method, path: &str, body: &Value) -> Answer {
        self.request(method, path, Some(TOKEN), Some(body.to_string()))
            .await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.request(Method::DELETE, path, Some(TOKEN), None).await
    }

    /// Creates a group named `name` with one HTTP port.
    async fn create(&self, name: &str) -> Value {
        let body = json!({"name": name, "services": [{"port": 8080, "destination_port": 80, "handlers": ["http"]}]});
        let data = self.send(Method::POST, "/v1/services", &body).await.data();
        data["service_groups"][0].clone()
    }

    async fn attach(&self, group: &str, name: &str, address: &str) -> Value {
        let path = format!("/v1/services/{group}/instances");
        let body = json!({"name": name, "address": address});
        let data = self.send(Method::POST, &path, &body).await.data();
        data["instances"][0].clone()
    }

    /// Sends `raw` on a fresh connection and reads until the server closes
    /// it or a whole response has arrived.
    async fn raw(&self, raw: Vec<u8>) -> String {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        // The server may answer and close before it has read everything.
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&raw).await;
            wr
        });
        let mut out = Vec::new();
        let mut buf = [0_u8; 4096];
        let deadline = Instant::now() + patient(Duration::from_secs(10));
        loop {
            let n = tokio::time::timeout_at(deadline.into(), rd.read(&mut buf))
                .await
                .expect("response in time");
            match n {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
        writer.abort();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(patient(Duration::from_secs(10)), self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task");
        let _ = self.admin.store.raft().shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_service() -> Value {
    json!([{"port": 8080, "destination_port": 80, "handlers": ["http"]}])
}

/// The per-address connection limit counts an IPv6 client by its /64, as
/// the token back-off does, and an IPv4-mapped address as the IPv4 one.
#[test]
fn the_per_address_limit_counts_ipv6_by_its_64() {
    let limit = super::PerClient::new(4); // 2 per address
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("an address") };
    let a = limit.take(ip("2001:db8:0:1::1")).expect("a first slot");
    let b = limit.take(ip("2001:db8:0:1::2")).expect("a second slot");
    assert!(
        limit.take(ip("2001:db8:0:1:ffff::3")).is_none(),
        "a third address of the same /64"
    );
    let other = limit.take(ip("2001:db8:0:2::1")).expect("another /64");
    drop(a);
    let c = limit
        .take(ip("2001:db8:0:1::9"))
        .expect("a slot given back");
    let v4 = limit.take(ip("192.0.2.7")).expect("IPv4");
    let mapped = limit
        .take(ip("::ffff:192.0.2.7"))
        .expect("the same IPv4, mapped");
    assert!(limit.take(ip("192.0.2.7")).is_none(), "IPv4 at its limit");
    drop((b, c, other, v4, mapped));
}
