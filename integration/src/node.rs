//! An in-process edgelb node on its own loopback address, and its admin
//! client.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, ensure};
use edgelb::app::NodeHandle;
use edgelb::config::Config;
use edgelb::dataplane::Settings;
use http::{Method, StatusCode};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};

use crate::addr::{Subnet, TempDir};
use crate::admin::AdminClient;
pub use crate::admin::Group;
use crate::backend::HttpBackend;
use crate::client::Reply;
use crate::metrics::Scrape;
use crate::{wait_until, within};

/// How to start a [`TestNode`].
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Data-plane settings; the defaults are shortened so that a test never
    /// waits long on a timeout it does not test.
    pub settings: Settings,
    /// The admin token.
    pub token: String,
    /// The data dir; a fresh temp dir (removed with the node) when `None`.
    pub data_dir: Option<std::path::PathBuf>,
    /// `data_dir_min_free`; the node's default when `None`.
    pub data_dir_min_free: Option<edgelb::health::MinFree>,
    /// Opens the node's storage through this fault-injecting backend.
    pub storage_faults: Option<std::sync::Arc<raft_store::faults::Faults>>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        let settings = Settings {
            header_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(5),
            ..Settings::default()
        };
        let token = rand::rng()
            .sample_iter(Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        Self {
            settings,
            token,
            data_dir: None,
            data_dir_min_free: None,
            storage_faults: None,
        }
    }
}

/// A running in-process node.
#[derive(Debug)]
pub struct TestNode {
    /// The node binds `.1`; backends take [`Subnet::next_ip`].
    pub subnet: Subnet,
    pub admin_addr: SocketAddr,
    pub token: String,
    handle: Option<NodeHandle>,
    // Dropped last: the node may still write state while shutting down.
    _data_dir: Option<TempDir>,
}

impl TestNode {
    /// Starts a node with [`NodeOptions::default`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(NodeOptions::default()).await
    }

    /// Starts a node with `opts` and waits until it is ready.
    pub async fn start_with(opts: NodeOptions) -> anyhow::Result<Self> {
        let subnet = Subnet::allocate();
        let temp = opts.data_dir.is_none().then(|| TempDir::new("node"));
        let ip = subnet.node_ip();
        let mut config = Config::embedded_default();
        config.data_dir = opts
            .data_dir
            .clone()
            .or_else(|| temp.as_ref().map(|t| t.path().to_owned()))
            .unwrap_or_default();
        if let Some(m) = opts.data_dir_min_free {
            config.data_dir_min_free = m;
        }
        config.storage_faults = opts.storage_faults.clone();
        config.admin_addr = SocketAddr::new(ip, 0);
        config.cluster_addr = SocketAddr::new(ip, 0);
        config.listen_ip = ip;
        config.token = Some(opts.token.clone());
        config.settings = opts.settings;
        let mut handle = edgelb::app::start(config)
            .await
            .context("starting the node")?;
        within(
            "the node to become ready",
            Duration::from_secs(10),
            handle.ready(),
        )
        .await?;
        Ok(Self {
            subnet,
            admin_addr: handle.admin_addr,
            token: handle.token.clone(),
            handle: Some(handle),
            _data_dir: temp,
        })
    }

    /// The address published ports are bound on.
    pub fn ip(&self) -> IpAddr {
        self.subnet.node_ip()
    }

    /// A published port's address.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(), port)
    }

    /// The node's handle (store, data plane, metrics).
    ///
    /// # Panics
    /// After [`TestNode::stop`] (which consumes the node, so never).
    pub fn handle(&self) -> &NodeHandle {
        self.handle.as_ref().expect("node is running")
    }

    /// Graceful shutdown, bounded.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(h) = self.handle.take() {
            within(
                "the node to shut down",
                Duration::from_secs(30),
                h.shutdown(),
            )
            .await?;
        }
        Ok(())
    }

    /// A client of this node's admin API.
    pub fn client(&self) -> AdminClient {
        AdminClient::new(self.admin_addr, &self.token)
    }

    /// One admin API request with the node's token.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Reply> {
        self.client().request(method, path, body).await
    }

    /// One admin API request with `token` (none: no `Authorization` header).
    pub async fn admin_as(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> anyhow::Result<Reply> {
        self.client().request_as(method, path, body, token).await
    }

    /// `GET path` → status and JSON body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.client().get(path).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        self.client().post(path, body).await
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        self.client().patch(path, body).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.client().delete(path).await
    }

    /// Creates a group from a `POST /v1/services` body.
    pub async fn create_group(&self, body: &Value) -> anyhow::Result<Group> {
        self.client().create_group(body).await
    }

    /// Attaches `address` as instance `name`. The answer means the data
    /// plane selects it: nothing to wait for.
    pub async fn attach(&self, group: &Group, name: &str, address: IpAddr) -> anyhow::Result<()> {
        let body = json!({"name": name, "address": address.to_string()});
        let (status, v) = self
            .post(&format!("/v1/services/{}/instances", group.uuid), &body)
            .await?;
        ensure!(status.is_success(), "attaching {name}: {status} {v}");
        Ok(())
    }

    /// Detaches instance `name`. The answer means the data plane no longer
    /// selects it: nothing to wait for.
    pub async fn detach(&self, group: &Group, name: &str) -> anyhow::Result<()> {
        let (status, v) = self
            .delete(&format!("/v1/services/{}/instances/{name}", group.uuid))
            .await?;
        ensure!(status.is_success(), "detaching {name}: {status} {v}");
        Ok(())
    }

    /// `data.instances` of `GET /v1/services/{id}/instances`.
    pub async fn instances(&self, group: &Group) -> anyhow::Result<Vec<Value>> {
        let (status, v) = self
            .get(&format!("/v1/services/{}/instances", group.uuid))
            .await?;
        ensure!(status == StatusCode::OK, "listing instances: {status} {v}");
        v["data"]["instances"]
            .as_array()
            .cloned()
            .context("data.instances is not a list")
    }

    /// `load.local` of every instance by name.
    pub async fn local_loads(&self, group: &Group) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for i in self.instances(group).await? {
            let name = i["name"]
                .as_str()
                .context("instance without name")?
                .to_owned();
            let local = i["load"]["local"]
                .as_u64()
                .with_context(|| format!("instance without load.local: {i}"))?;
            out.push((name, local));
        }
        out.sort();
        Ok(out)
    }

    /// Waits until every instance of `group` has nothing in flight here.
    pub async fn wait_idle(&self, group: &Group) -> anyhow::Result<()> {
        wait_until(
            "every instance to be idle",
            Duration::from_secs(10),
            || async {
                self.local_loads(group)
                    .await
                    .is_ok_and(|l| l.iter().all(|(_, n)| *n == 0))
            },
        )
        .await
    }

    /// Waits until published `port` accepts connections. On a TCP-mode port
    /// the probe is proxied like any connection: follow with
    /// [`TestNode::wait_idle`].
    pub async fn wait_port(&self, port: u16) -> anyhow::Result<()> {
        let addr = self.addr(port);
        wait_until(
            &format!("{addr} to accept"),
            Duration::from_secs(10),
            || async { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await
    }

    /// Scrapes `GET /metrics`.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        self.client().scrape().await
    }

    /// Starts `names.len()` HTTP backends on fresh addresses of this node's
    /// subnet, all on `port`.
    pub async fn http_backends(
        &self,
        names: &[&str],
        port: u16,
    ) -> anyhow::Result<Vec<HttpBackend>> {
        let mut out = Vec::new();
        for name in names {
            out.push(HttpBackend::start(name, SocketAddr::new(self.subnet.next_ip(), port)).await?);
        }
        Ok(out)
    }

    /// Creates a group publishing `port` in HTTP mode to `destination_port`
    /// and attaches `backends` under their names. Once the answers are in,
    /// the port is bound and routes to them.
    pub async fn http_group(
        &self,
        name: &str,
        port: u16,
        destination_port: u16,
        backends: &[HttpBackend],
    ) -> anyhow::Result<Group> {
        let group = self
            .create_group(&json!({
                "name": name,
                "services": [{"port": port, "destination_port": destination_port, "handlers": ["http"]}],
            }))
            .await?;
        for b in backends {
            self.attach(&group, b.name(), b.addr().ip()).await?;
        }
        Ok(group)
    }
}
