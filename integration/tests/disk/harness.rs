//! In-process nodes restarted on their data dir and addresses, as a
//! service manager would after the exit 74, with their storage behind a
//! fault-injecting backend.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use edgelb::app::NodeHandle;
use edgelb::config::Config;
use edgelb::health::MinFree;
use http::{Method, StatusCode};
use integration::node::NodeOptions;
use integration::{AdminClient, Subnet, patient, wait_until, within};
use raft_store::faults::Faults;
use serde_json::{Value, json};

/// A data dir in memory where there is one (fsyncs cost nothing there),
/// removed on drop.
pub(crate) struct Dir(PathBuf);

impl Dir {
    fn new(label: &str) -> Self {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let n = next_dir();
        Self(base.join(format!("edgelb-faults-{label}-{}-{n}", std::process::id())))
    }
}

fn next_dir() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-process node whose storage goes through `faults`, restarted on
/// its data dir and addresses as a service manager would.
pub(crate) struct Member {
    pub(crate) config: Config,
    pub(crate) faults: Arc<Faults>,
    pub(crate) handle: Option<NodeHandle>,
    pub(crate) client: AdminClient,
    _dir: Dir,
}

impl Member {
    pub(crate) async fn start(
        id: u64,
        token: &str,
        join: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let subnet = Subnet::allocate();
        let ip = subnet.node_ip();
        let dir = Dir::new(&format!("n{id}"));
        let faults = Faults::new();
        let mut config = Config::embedded_default();
        config.node_id = id;
        config.data_dir = dir.0.clone();
        config.admin_addr = SocketAddr::new(ip, 7070);
        config.cluster_addr = SocketAddr::new(ip, 7071);
        config.listen_ip = ip;
        config.token = Some(token.to_owned());
        config.join = join.map(|a| format!("http://{a}"));
        config.settings = NodeOptions::default().settings;
        // The floor is another test's business.
        config.data_dir_min_free = MinFree::Bytes(0);
        config.storage_faults = Some(faults.clone());
        let client = AdminClient::new(config.admin_addr, token);
        let mut m = Self {
            config,
            faults,
            handle: None,
            client,
            _dir: dir,
        };
        m.boot().await?;
        Ok(m)
    }

    pub(crate) async fn boot(&mut self) -> anyhow::Result<()> {
        // In one process the stopped node's last storage handles (a seal,
        // a task ending) and its cluster endpoint may outlive its shutdown
        // by a moment; the files stay locked and the port bound until then.
        let deadline = Instant::now() + patient(Duration::from_secs(10));
        let mut handle = loop {
            let started = within(
                "the node to start",
                patient(Duration::from_secs(30)),
                edgelb::app::start(self.config.clone()),
            )
            .await?;
            match started {
                Ok(h) => break h,
                Err(e) if busy(&e.to_string()) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e).context("starting the node"),
            }
        };
        within(
            "the node to become ready",
            patient(Duration::from_secs(30)),
            handle.ready(),
        )
        .await?;
        self.handle = Some(handle);
        Ok(())
    }

    pub(crate) fn handle(&self) -> anyhow::Result<&NodeHandle> {
        self.handle.as_ref().context("the node is stopped")
    }

    /// What `edgelb` does once its storage failed (stop, exit 74) and
    /// systemd then (start again), with the disk fixed.
    pub(crate) async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.faults.clear();
        self.boot().await
    }

    /// Stops the node (as on SIGTERM).
    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(h) = self.handle.take() {
            within(
                "the node to stop",
                patient(Duration::from_secs(30)),
                h.shutdown(),
            )
            .await?;
        }
        Ok(())
    }

    /// Group names in this node's state.
    pub(crate) async fn groups(&self) -> anyhow::Result<BTreeSet<String>> {
        let (status, v) = self.client.get("/v1/services").await?;
        ensure!(status == StatusCode::OK, "listing groups: {status} {v}");
        Ok(v["data"]["service_groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// After an injected fault: the Raft core stopped, and health, metrics
    /// and the probes say so, naming the data dir.
    pub(crate) async fn assert_failure_surfaced(&self, context: &str) -> anyhow::Result<()> {
        let health = self.handle()?.health.clone();
        wait_until(
            &format!("{context}: the fault to stop the Raft core"),
            Duration::from_secs(10),
            || {
                let health = health.clone();
                async move { health.failure().is_some() }
            },
        )
        .await?;
        let dir = self.config.data_dir.to_string_lossy().into_owned();
        for probe in ["/healthz", "/readyz"] {
            let r = self.client.request(Method::GET, probe, None).await?;
            ensure!(
                r.status == StatusCode::SERVICE_UNAVAILABLE && r.text().contains(&dir),
                "{context}: {probe} answered {} {:?}",
                r.status,
                r.text()
            );
        }
        // Reads go on from the last applied state.
        self.groups()
            .await
            .with_context(|| format!("{context}: reading while failed"))?;
        let metrics = self.client.request(Method::GET, "/metrics", None).await?;
        ensure!(
            metrics.text().contains("edgelb_storage_failed 1"),
            "{context}: edgelb_storage_failed is not 1"
        );
        Ok(())
    }
}

/// A start that failed on what a just-stopped node still holds.
pub(crate) fn busy(error: &str) -> bool {
    error.contains("already open") || error.contains("Address already in use")
}

/// The body of a group named `name`.
pub(crate) fn group(name: &str) -> Value {
    json!({"name": name, "services": [{"port": 8080, "destination_port": 9000, "handlers": ["http"]}]})
}

/// Nodes 1 (founding) to `n` (joining through node 1).
pub(crate) async fn cluster(n: u64, token: &str) -> anyhow::Result<Vec<Member>> {
    let mut nodes = vec![Member::start(1, token, None).await?];
    for id in 2..=n {
        let join = nodes[0].config.admin_addr;
        nodes.push(Member::start(id, token, Some(join)).await?);
    }
    Ok(nodes)
}
