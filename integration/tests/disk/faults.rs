//! Seeded storage faults (ENOSPC and EIO on writes, resizes and fsyncs,
//! torn writes) under in-process nodes, through raft-store's fault-injecting
//! redb backend: on one node, and on a follower of a three-node cluster.
//!
//! Each run arms a plan drawn from its seed, writes, and then holds the node
//! to what the issue asks: a write that failed was answered in plain words;
//! an injected fault stops the Raft core and shows in `/healthz`, `/readyz`
//! and `edgelb_storage_failed` (the binary then exits 74, which the test
//! plays by restarting the node on its data dir); after that restart every
//! acknowledged write is there and the node writes again. So no run ends
//! with a node alive but unable to write, or a lost acknowledged write.
//!
//! The normal suite runs a few seeds; `EDGELB_FAULT_RUNS=1000` (and
//! `EDGELB_FAULT_SEED` for the first seed) runs more:
//! `EDGELB_FAULT_RUNS=1000 cargo test --release -p integration --test disk faults`.

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
use raft_store::faults::{Faults, Plan};
use serde_json::{Value, json};

/// Writes per run.
const WRITES: usize = 5;
/// A plan's fault comes after up to this many matching operations.
const MAX_AFTER: u64 = 12;

fn runs(default: u64) -> (u64, u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    (
        env("EDGELB_FAULT_SEED").unwrap_or(0),
        env("EDGELB_FAULT_RUNS").unwrap_or(default),
    )
}

/// A data dir in memory where there is one (fsyncs cost nothing there),
/// removed on drop.
struct Dir(PathBuf);

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
struct Member {
    config: Config,
    faults: Arc<Faults>,
    handle: Option<NodeHandle>,
    client: AdminClient,
    _dir: Dir,
}

impl Member {
    async fn start(id: u64, token: &str, join: Option<SocketAddr>) -> anyhow::Result<Self> {
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

    async fn boot(&mut self) -> anyhow::Result<()> {
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

    fn handle(&self) -> anyhow::Result<&NodeHandle> {
        self.handle.as_ref().context("the node is stopped")
    }

    /// What `edgelb` does once its storage failed (stop, exit 74) and
    /// systemd then (start again), with the disk fixed.
    async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(h) = self.handle.take() {
            within(
                "the node to stop",
                patient(Duration::from_secs(30)),
                h.shutdown(),
            )
            .await?;
        }
        self.faults.clear();
        self.boot().await
    }

    /// Group names in this node's state.
    async fn groups(&self) -> anyhow::Result<BTreeSet<String>> {
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
    async fn assert_failure_surfaced(&self, context: &str) -> anyhow::Result<()> {
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
        let metrics = self.client.request(Method::GET, "/metrics", None).await?;
        ensure!(
            metrics.text().contains("edgelb_storage_failed 1"),
            "{context}: edgelb_storage_failed is not 1"
        );
        Ok(())
    }
}

/// A start that failed on what a just-stopped node still holds.
fn busy(error: &str) -> bool {
    error.contains("already open") || error.contains("Address already in use")
}

/// The body of a group named `name`.
fn group(name: &str) -> Value {
    json!({"name": name, "services": [{"port": 8080, "destination_port": 9000, "handlers": ["http"]}]})
}

/// Writes `WRITES` groups through `via`; returns those acknowledged. A
/// refused write must be a 503 in plain words.
async fn write(via: &AdminClient, seed: u64, context: &str) -> anyhow::Result<Vec<String>> {
    let mut acked = Vec::new();
    for i in 0..WRITES {
        let name = format!("s{seed}-{i}");
        let r = via
            .request(Method::POST, "/v1/services", Some(&group(&name)))
            .await?;
        if r.status.is_success() {
            acked.push(name);
            continue;
        }
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        ensure!(
            r.status == StatusCode::SERVICE_UNAVAILABLE && !message.contains("::"),
            "{context}: write {name} answered {} {message:?}",
            r.status
        );
        break;
    }
    Ok(acked)
}

/// One node: seeded faults, writes, and the checks of the module's doc.
async fn one_node(first: u64, n: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut node = Member::start(1, "fault-token-one-node", None).await?;
    let mut acked_all = BTreeSet::new();
    let mut faulted = 0;
    for seed in first..first + n {
        let plan = Plan::from_seed(seed, MAX_AFTER);
        let context = format!("one node, seed {seed} ({plan:?})");
        let before = node.faults.injected().len();
        node.faults.arm(plan);
        let acked = write(&node.client, seed, &context).await?;
        let injected = node.faults.injected().len() > before;
        if injected {
            faulted += 1;
            node.assert_failure_surfaced(&context).await?;
            node.restart().await?;
        } else {
            node.faults.clear();
            ensure!(
                acked.len() == WRITES,
                "{context}: a write failed with no fault"
            );
        }
        acked_all.extend(acked);
        let stored = node.groups().await?;
        let lost: Vec<_> = acked_all.difference(&stored).collect();
        ensure!(
            lost.is_empty(),
            "{context}: acknowledged writes lost: {lost:?}"
        );
        // Not alive and unable to write: the next write works.
        let probe = write(&node.client, seed + 1_000_000, &context).await?;
        ensure!(
            probe.len() == WRITES,
            "{context}: the node no longer writes"
        );
        acked_all.extend(probe);
    }
    eprintln!(
        "one node: {n} seeded runs from {first}, {faulted} with an injected fault, {} writes acknowledged and kept, {:?}",
        acked_all.len(),
        started.elapsed()
    );
    if let Some(h) = node.handle.take() {
        h.shutdown().await;
    }
    Ok(())
}

/// A three-node cluster whose node 3 (a follower) meets the faults; writes
/// go through node 1.
async fn follower(first: u64, n: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let token = "fault-token-three-nodes";
    let leader = Member::start(1, token, None).await?;
    let mut nodes = vec![leader];
    for id in 2..=3 {
        let join = nodes[0].config.admin_addr;
        nodes.push(Member::start(id, token, Some(join)).await?);
    }
    let mut acked_all = BTreeSet::new();
    let mut faulted = 0;
    for seed in first..first + n {
        let plan = Plan::from_seed(seed, MAX_AFTER);
        let context = format!("follower, seed {seed} ({plan:?})");
        let before = nodes[2].faults.injected().len();
        nodes[2].faults.arm(plan);
        let acked = write(&nodes[0].client, seed, &context).await?;
        let injected = nodes[2].faults.injected().len() > before;
        if injected {
            faulted += 1;
            nodes[2].assert_failure_surfaced(&context).await?;
            nodes[2].restart().await?;
        } else {
            nodes[2].faults.clear();
        }
        acked_all.extend(acked);
        // Every node, the restarted follower included, has every
        // acknowledged write once it caught up.
        for (i, node) in nodes.iter().enumerate() {
            let missing = || async {
                node.groups()
                    .await
                    .map(|s| acked_all.difference(&s).count())
                    .unwrap_or(usize::MAX)
            };
            wait_until(
                &format!("{context}: node {} to hold every acknowledged write", i + 1),
                Duration::from_secs(20),
                || async { missing().await == 0 },
            )
            .await?;
        }
        // The follower writes again (through itself: forwarded, committed,
        // applied on it).
        let probe = write(&nodes[2].client, seed + 1_000_000, &context).await?;
        ensure!(probe.len() == WRITES, "{context}: node 3 no longer writes");
        acked_all.extend(probe);
    }
    eprintln!(
        "follower of 3: {n} seeded runs from {first}, {faulted} with an injected fault, {} writes acknowledged and kept, {:?}",
        acked_all.len(),
        started.elapsed()
    );
    for mut node in nodes.into_iter().rev() {
        if let Some(h) = node.handle.take() {
            h.shutdown().await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_storage_faults_on_one_node_lose_no_acknowledged_write() -> anyhow::Result<()> {
    let (first, n) = runs(6);
    one_node(first, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_storage_faults_on_a_follower_lose_no_acknowledged_write() -> anyhow::Result<()> {
    let (first, n) = runs(4);
    follower(first, n).await
}
