//! A cluster of real `edgelb` processes on loopback, and the faults the
//! tests inject into it (kill -9, SIGTERM, restart from the data dir).
//!
//! ```text
//!   Cluster ─┬─ node 1  founder         127.A.a.1:7070 admin, :7071 QUIC, published ports
//!            ├─ node 2  --join http://127.A.a.1:7070   127.A.b.1:…
//!            ├─ …       (joins run concurrently)
//!            └─ backends: HttpBackends on their own /24 (Cluster::backend_ip)
//! ```
//!
//! Every member owns a [`Subnet`], so the fixed admin ([`ADMIN_PORT`]),
//! cluster ([`CLUSTER_PORT`]) and published ports never collide with another
//! test's, and a restarted member comes back on the same addresses. Node ids
//! are `1..=n` in start order; node 1 founds the cluster.
//!
//! With [`ClusterOptions::relay`], the members' cluster traffic goes
//! through a [`Relay`] (link emulator): each node advertises its relay
//! address (`--advertise-cluster-addr`, `.253` of its subnet, kept across
//! restarts since the membership records it) and the test shapes every
//! directed link through [`Cluster::relay`].
//!
//! Only processes started here are signalled. Dropping the [`Cluster`]
//! kills (SIGKILL) every member still running, also when the test panics,
//! and prints the tail of each member's stderr (shown for failing tests).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgelb_api::cluster::ClusterView;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::json;

use crate::addr::{Subnet, TempDir};
use crate::admin::{AdminClient, Group};
use crate::backend::HttpBackend;
use crate::link::Link;
use crate::process::Process;
use crate::relay::Relay;
use crate::{client, poll, within};

/// The admin API port of every member (each on its own address).
pub const ADMIN_PORT: u16 = 7070;
/// The cluster (QUIC) port of every member.
pub const CLUSTER_PORT: u16 = 7071;

/// How a [`Cluster`]'s members are started.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The cluster's admin token.
    pub token: String,
    /// `--max-voters` (the node's default, 5, when `None`).
    pub max_voters: Option<usize>,
    /// `--drain-timeout`: short, so that SIGTERM never waits long on a
    /// client connection a test left open.
    pub drain_timeout: String,
    /// `--log`: `EDGELB_TEST_LOG` when set, else `warn`.
    pub log: String,
    /// `--leave-on-exit`: leave the membership on SIGTERM.
    pub leave_on_exit: bool,
    /// Run the members behind a [`Relay`] seeded with this (see
    /// [`Cluster::relay`]); `None`: nodes dial each other directly.
    pub relay: Option<u64>,
    /// Behind the relay: the shape of every link from the start (and of
    /// links to nodes added later), e.g. a WAN delay.
    pub link: Link,
    /// `--region` of node `id` (the node's default, `local`, when `None`).
    pub region: Option<fn(u64) -> String>,
    /// Keys for a TOML file every member is started with (`--config`),
    /// e.g. `gossip_estimator = "local"`; none when empty.
    pub config: String,
    /// The binary new members run (e.g. an earlier release's, see
    /// [`crate::compat`]); `None`: the workspace's `edgelb`.
    pub binary: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        let token = rand::rng()
            .sample_iter(Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        Self {
            token,
            max_voters: None,
            drain_timeout: "2s".into(),
            log: std::env::var("EDGELB_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            leave_on_exit: false,
            relay: None,
            link: Link::default(),
            region: None,
            config: String::new(),
            binary: None,
        }
    }
}

/// One member: its addresses, data dir and (while running) its process.
#[derive(Debug)]
struct Member {
    id: u64,
    subnet: Subnet,
    data: TempDir,
    /// `--join` URL; ignored by the node once its data dir has an identity.
    join: Option<String>,
    /// `--advertise-cluster-addr` (the relay's address for this node).
    advertise: Option<SocketAddr>,
    /// The binary it runs: [`ClusterOptions::binary`] until
    /// [`Cluster::set_binary`]; `None` is the workspace's `edgelb`.
    binary: Option<PathBuf>,
    process: Option<Process>,
}

impl Member {
    fn ip(&self) -> IpAddr {
        self.subnet.node_ip()
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), ADMIN_PORT)
    }

    fn args(&self, opts: &ClusterOptions) -> Vec<String> {
        let ip = self.ip();
        let mut args = vec![
            "--node-id".to_owned(),
            self.id.to_string(),
            "--data-dir".to_owned(),
            self.data.path().to_string_lossy().into_owned(),
            "--admin-addr".to_owned(),
            self.admin_addr().to_string(),
            "--cluster-addr".to_owned(),
            SocketAddr::new(ip, CLUSTER_PORT).to_string(),
            "--listen-ip".to_owned(),
            ip.to_string(),
            "--token".to_owned(),
            opts.token.clone(),
            "--drain-timeout".to_owned(),
            opts.drain_timeout.clone(),
            "--log".to_owned(),
            opts.log.clone(),
        ];
        if let Some(m) = opts.max_voters {
            args.extend(["--max-voters".to_owned(), m.to_string()]);
        }
        if opts.leave_on_exit {
            args.push("--leave-on-exit".to_owned());
        }
        if let Some(url) = &self.join {
            args.extend(["--join".to_owned(), url.clone()]);
        }
        if let Some(a) = self.advertise {
            args.extend(["--advertise-cluster-addr".to_owned(), a.to_string()]);
        }
        if let Some(region) = opts.region {
            args.extend(["--region".to_owned(), region(self.id)]);
        }
        if !opts.config.is_empty() {
            args.extend([
                "--config".to_owned(),
                self.config_file().to_string_lossy().into_owned(),
            ]);
        }
        args
    }

    /// Where [`ClusterOptions::config`] is written for this member.
    fn config_file(&self) -> PathBuf {
        self.data.path().join("edgelb-test.toml")
    }

    /// Spawns the process (without waiting for it to come up).
    async fn launch(&mut self, opts: &ClusterOptions) -> anyhow::Result<()> {
        self.launch_with(opts, &[]).await
    }

    /// [`Member::launch`] with `extra` arguments.
    async fn launch_with(&mut self, opts: &ClusterOptions, extra: &[String]) -> anyhow::Result<()> {
        ensure!(
            self.process.is_none(),
            "node {} is already running",
            self.id
        );
        if !opts.config.is_empty() {
            std::fs::create_dir_all(self.data.path())?;
            std::fs::write(self.config_file(), &opts.config)?;
        }
        let mut args = self.args(opts);
        args.extend(extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.process = Some(match &self.binary {
            Some(bin) => Process::spawn_bin(bin, &args, self.data.path()).await?,
            None => Process::spawn(&args, self.data.path()).await?,
        });
        Ok(())
    }

    /// Waits until the launched process serves its admin API (after
    /// joining, for a new member).
    async fn started(&mut self) -> anyhow::Result<()> {
        let id = self.id;
        let p = self.process.as_mut().context("node is not running")?;
        p.wait_stdout("admin API on http://", Duration::from_secs(60))
            .await
            .with_context(|| format!("node {id} did not start"))?;
        Ok(())
    }

    fn stderr(&self) -> String {
        self.process
            .as_ref()
            .map(Process::stderr)
            .unwrap_or_default()
    }
}

/// A running cluster of `edgelb` processes.
#[derive(Debug)]
pub struct Cluster {
    opts: ClusterOptions,
    members: BTreeMap<u64, Member>,
    backends: Subnet,
    relay: Option<Relay>,
    /// stderr of processes that were killed or stopped, for the failure
    /// report.
    past_logs: Vec<(u64, String)>,
}

impl Cluster {
    /// Starts `n` nodes with [`ClusterOptions::default`]; see
    /// [`Cluster::start_with`].
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        Self::start_with(n, ClusterOptions::default()).await
    }

    /// Starts the founder, then `n - 1` joining nodes concurrently, and
    /// waits until every node agrees on the leader and the membership holds
    /// `min(n, max_voters)` voters and the rest learners.
    pub async fn start_with(n: usize, opts: ClusterOptions) -> anyhow::Result<Self> {
        ensure!(n >= 1, "a cluster needs a node");
        let mut cluster = Self {
            members: BTreeMap::new(),
            backends: Subnet::allocate(),
            relay: opts.relay.map(|seed| {
                let r = Relay::new(seed);
                r.set_all(opts.link);
                r
            }),
            past_logs: Vec::new(),
            opts,
        };
        cluster.add_members(1).await?;
        cluster.add_members(n - 1).await?;
        let voters = expected_voters(n, cluster.opts.max_voters.unwrap_or(5));
        cluster.wait_converged(voters, n - voters).await?;
        Ok(cluster)
    }

    /// Starts `count` new nodes (ids after the highest so far) that join
    /// through the first running member, concurrently, and waits until each
    /// serves its admin API. Membership changes (promotion) are not waited
    /// for: see [`Cluster::wait_converged`]. With no member yet, the first
    /// new node founds the cluster.
    pub async fn add_members(&mut self, count: usize) -> anyhow::Result<Vec<u64>> {
        let via = self.running().first().copied();
        self.add_members_via(via, count).await
    }

    /// [`Cluster::add_members`] joining through member `via` (none: the
    /// first new node founds the cluster).
    pub async fn add_members_via(
        &mut self,
        via: Option<u64>,
        count: usize,
    ) -> anyhow::Result<Vec<u64>> {
        let ids = self.launch_members_via(via, count).await?;
        for &id in &ids {
            self.wait_started(id).await?;
        }
        Ok(ids)
    }

    /// Waits until node `id`, launched by
    /// [`Cluster::launch_members_via`], serves its admin API.
    pub async fn wait_started(&mut self, id: u64) -> anyhow::Result<()> {
        let started = self.member_mut(id)?.started().await;
        started.with_context(|| self.logs())
    }

    /// [`Cluster::add_members_via`] without waiting for the new nodes to
    /// start: their ids.
    pub async fn launch_members_via(
        &mut self,
        via: Option<u64>,
        count: usize,
    ) -> anyhow::Result<Vec<u64>> {
        let join = match via {
            Some(id) => Some(format!("http://{}", self.member_mut(id)?.admin_addr())),
            None => None,
        };
        let first = self.members.keys().next_back().map_or(1, |id| id + 1);
        let ids: Vec<u64> = (first..).take(count).collect();
        for &id in &ids {
            let subnet = Subnet::allocate();
            let advertise = match &self.relay {
                Some(r) => Some(
                    r.add_node(
                        id,
                        SocketAddr::new(subnet.node_ip(), CLUSTER_PORT),
                        SocketAddr::new(subnet.ip(253), CLUSTER_PORT),
                        subnet.ip(254),
                    )
                    .await
                    .with_context(|| format!("relay sockets for node {id}"))?,
                ),
                None => None,
            };
            let mut m = Member {
                id,
                subnet,
                data: TempDir::new(&format!("cluster-n{id}")),
                join: join.clone(),
                advertise,
                binary: self.opts.binary.clone(),
                process: None,
            };
            // The founder must be up before anyone joins; joiners go
            // together.
            m.launch(&self.opts).await?;
            self.members.insert(id, m);
        }
        Ok(ids)
    }

    fn member_mut(&mut self, id: u64) -> anyhow::Result<&mut Member> {
        self.members
            .get_mut(&id)
            .with_context(|| format!("no node {id}"))
    }

    /// The cluster's admin token.
    pub fn token(&self) -> &str {
        &self.opts.token
    }

    /// Every member's id, running or not.
    pub fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// The ids of the members whose process runs.
    pub fn running(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.process.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// Node `id`'s admin API.
    ///
    /// # Panics
    /// For an id that is not a member.
    pub fn admin(&self, id: u64) -> AdminClient {
        AdminClient::new(self.members[&id].admin_addr(), &self.opts.token)
    }

    /// Node `id`'s address (admin, cluster and published ports).
    ///
    /// # Panics
    /// For an id that is not a member.
    pub fn ip(&self, id: u64) -> IpAddr {
        self.members[&id].ip()
    }

    /// Published `port` on node `id`.
    pub fn data_addr(&self, id: u64, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(id), port)
    }

    /// Node `id`'s data dir.
    ///
    /// # Panics
    /// For an id that is not a member.
    pub fn data_dir(&self, id: u64) -> &std::path::Path {
        self.members[&id].data.path()
    }

    /// The pid of node `id`'s process, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.members.get(&id)?.process.as_ref().map(Process::pid)
    }

    /// Node `id`'s admin address.
    ///
    /// # Panics
    /// For an id that is not a member.
    pub fn admin_addr(&self, id: u64) -> SocketAddr {
        self.members[&id].admin_addr()
    }

    /// Node `id`'s cluster (QUIC) address, as bound.
    pub fn cluster_addr(&self, id: u64) -> SocketAddr {
        SocketAddr::new(self.ip(id), CLUSTER_PORT)
    }

    /// The link emulator between the members, when the cluster runs behind
    /// one ([`ClusterOptions::relay`]).
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// A fresh address for a backend (outside every node's subnet, so that
    /// no fault on a node touches it).
    pub fn backend_ip(&self) -> IpAddr {
        self.backends.next_ip()
    }

    /// HTTP backends named `names`, all on `port`, on fresh addresses.
    pub async fn http_backends(
        &self,
        names: &[&str],
        port: u16,
    ) -> anyhow::Result<Vec<HttpBackend>> {
        let mut out = Vec::new();
        for name in names {
            out.push(HttpBackend::start(name, SocketAddr::new(self.backend_ip(), port)).await?);
        }
        Ok(out)
    }

    /// `GET /v1/cluster` on node `id`.
    pub async fn status(&self, id: u64) -> anyhow::Result<ClusterView> {
        let (status, v) = self.admin(id).get("/v1/cluster").await?;
        ensure!(status.is_success(), "GET /v1/cluster on {id}: {status} {v}");
        serde_json::from_value(v["data"]["cluster"].clone())
            .with_context(|| format!("data.cluster of node {id}: {v}"))
    }

    /// Every running member's view, or why not.
    async fn views(&self) -> anyhow::Result<Vec<ClusterView>> {
        let mut out = Vec::new();
        for id in self.running() {
            out.push(self.status(id).await?);
        }
        Ok(out)
    }

    /// Waits until every running member names the same running leader,
    /// and returns it.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        self.wait_leader(|_| true).await
    }

    /// Waits until every running member names the same running leader that
    /// satisfies `ok`, and returns it.
    pub async fn wait_leader(&self, ok: impl Fn(u64) -> bool) -> anyhow::Result<u64> {
        let running = self.running();
        let found = poll(
            "the running nodes to agree on a leader",
            Duration::from_secs(30),
            || async {
                let views = self.views().await?;
                agreed_leader(&views)
                    .filter(|l| running.contains(l) && ok(*l))
                    .with_context(|| summary(&views))
            },
        )
        .await;
        found.with_context(|| self.logs())
    }

    /// Waits until every running member names the same running leader and
    /// reports `voters` voters and `learners` learners; returns the leader.
    ///
    /// A joint configuration (the first half of a promotion) already counts
    /// the new voter, and `GET /v1/cluster` does not tell it apart, so a
    /// membership change right after this may still find one in progress.
    pub async fn wait_converged(&self, voters: usize, learners: usize) -> anyhow::Result<u64> {
        let running = self.running();
        let found = poll(
            &format!("{voters} voters and {learners} learners with one leader"),
            Duration::from_secs(60),
            || async {
                let views = self.views().await?;
                let shaped = views
                    .iter()
                    .all(|v| v.voters() == voters && v.learners() == learners);
                agreed_leader(&views)
                    .filter(|l| shaped && running.contains(l))
                    .with_context(|| summary(&views))
            },
        )
        .await;
        found.with_context(|| self.logs())
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) -> anyhow::Result<()> {
        let reached = poll(
            &format!("node {id} to apply index {index}"),
            Duration::from_secs(30),
            || async {
                let applied = self.status(id).await?.applied_index;
                ensure!(applied >= index, "applied index {applied}");
                Ok(())
            },
        )
        .await;
        reached.with_context(|| self.logs())
    }

    /// One sample of `name` (no labels) from node `id`'s `/metrics`.
    pub async fn metric(&self, id: u64, name: &str) -> anyhow::Result<f64> {
        let scrape = self.admin(id).scrape().await?;
        scrape
            .select(name, &[])
            .next()
            .map(|s| s.value)
            .with_context(|| format!("node {id} has no {name}"))
    }

    /// Kills node `id` with SIGKILL, as a crash would. Its data dir stays.
    pub async fn kill9(&mut self, id: u64) -> anyhow::Result<()> {
        let m = self.member_mut(id)?;
        let mut p = m.process.take().context("node is not running")?;
        p.kill9().await?;
        self.past_logs.push((id, p.stderr()));
        Ok(())
    }

    /// Sends SIGTERM to node `id` and waits until it has drained and exited
    /// with 0. Its data dir stays.
    pub async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        let m = self.member_mut(id)?;
        let mut p = m.process.take().context("node is not running")?;
        p.terminate().await?;
        let status = p.wait(Duration::from_secs(30)).await;
        let stderr = p.stderr();
        self.past_logs.push((id, stderr.clone()));
        let status = status.with_context(|| format!("node {id} after SIGTERM: {stderr}"))?;
        ensure!(
            status.success(),
            "node {id} exited with {status} after SIGTERM; stderr:\n{stderr}"
        );
        Ok(())
    }

    /// Sends SIGTERM to node `id` and waits up to `bound` for it to exit:
    /// how long that took and its exit status (`None`: still running at
    /// `bound`, then killed with SIGKILL). Its data dir stays.
    pub async fn terminate_timed(
        &mut self,
        id: u64,
        bound: Duration,
    ) -> anyhow::Result<(Duration, Option<std::process::ExitStatus>)> {
        let m = self.member_mut(id)?;
        let mut p = m.process.take().context("node is not running")?;
        let sent = std::time::Instant::now();
        p.terminate().await?;
        let status = p.wait(bound).await.ok();
        let took = sent.elapsed();
        if status.is_none() {
            p.kill9().await?;
        }
        self.past_logs.push((id, p.stderr()));
        Ok((took, status))
    }

    /// A zero-downtime upgrade of node `id` (SIGUSR2): returns once the
    /// process it starts serves and the old one has exited with 0 (see
    /// [`Process::upgrade`]); the member is the new process from then on.
    /// Returns its pid.
    pub async fn upgrade(&mut self, id: u64) -> anyhow::Result<u32> {
        let m = self.member_mut(id)?;
        let p = m.process.as_mut().context("node is not running")?;
        p.upgrade(Duration::from_secs(60))
            .await
            .with_context(|| format!("upgrading node {id}"))
    }

    /// Makes node `id` run `binary` (`None`: the workspace's `edgelb`)
    /// from its next start on, e.g. to upgrade it while it is stopped.
    pub fn set_binary(&mut self, id: u64, binary: Option<PathBuf>) -> anyhow::Result<()> {
        self.member_mut(id)?.binary = binary;
        Ok(())
    }

    /// Runs node `id`'s command line with `binary` while the node is
    /// stopped, to completion (bounded): for a binary expected to refuse
    /// the data dir and exit.
    pub async fn run_stopped(
        &self,
        id: u64,
        binary: &std::path::Path,
        timeout: Duration,
    ) -> anyhow::Result<crate::process::Finished> {
        let m = self.stopped(id)?;
        let args = m.args(&self.opts);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::process::run_bin(binary, &args, m.data.path(), timeout).await
    }

    /// Runs node `id`'s command line with `--token token` instead of the
    /// cluster's, while the node is stopped, to completion (bounded): for a
    /// node expected to refuse that token and exit.
    pub async fn run_stopped_with_token(
        &self,
        id: u64,
        token: &str,
        timeout: Duration,
    ) -> anyhow::Result<crate::process::Finished> {
        let m = self.stopped(id)?;
        let opts = ClusterOptions {
            token: token.to_owned(),
            ..self.opts.clone()
        };
        let args = m.args(&opts);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::process::run(&args, m.data.path(), timeout).await
    }

    /// Runs node `id`'s command line, changed by `edit`, while the node is
    /// stopped, to completion (bounded): for a start expected to refuse
    /// the data dir and exit.
    pub async fn run_stopped_with(
        &self,
        id: u64,
        edit: impl FnOnce(&mut Vec<String>),
        timeout: Duration,
    ) -> anyhow::Result<crate::process::Finished> {
        let m = self.stopped(id)?;
        let mut args = m.args(&self.opts);
        edit(&mut args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::process::run(&args, m.data.path(), timeout).await
    }

    /// Starts node `id` again with `extra` arguments on this start only
    /// (e.g. a one-off repair flag), and waits until it serves its admin
    /// API.
    pub async fn restart_with(&mut self, id: u64, extra: &[&str]) -> anyhow::Result<()> {
        let opts = self.opts.clone();
        let extra: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
        self.member_mut(id)?.launch_with(&opts, &extra).await?;
        let started = self.member_mut(id)?.started().await;
        started.with_context(|| self.logs())
    }

    /// Moves stopped node `id`'s data dir into the returned directory
    /// (removed on drop) and leaves an empty one in its place, as the
    /// rejoin procedure does.
    pub fn move_data_dir_aside(&self, id: u64) -> anyhow::Result<TempDir> {
        let m = self.stopped(id)?;
        let aside = TempDir::new(&format!("aside-n{id}"));
        std::fs::rename(m.data.path(), aside.path().join("data"))?;
        std::fs::create_dir_all(m.data.path())?;
        Ok(aside)
    }

    /// Member `id`, which must not be running.
    fn stopped(&self, id: u64) -> anyhow::Result<&Member> {
        let m = self
            .members
            .get(&id)
            .with_context(|| format!("no node {id}"))?;
        ensure!(m.process.is_none(), "node {id} is running");
        Ok(m)
    }

    /// Starts node `id` again with the same command line and data dir, and
    /// waits until it serves its admin API.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.restart_all(&[id]).await
    }

    /// Starts the nodes `ids` again together (a whole cluster needs its
    /// peers to elect a leader), and waits until each serves its admin API.
    pub async fn restart_all(&mut self, ids: &[u64]) -> anyhow::Result<()> {
        let opts = self.opts.clone();
        for &id in ids {
            self.member_mut(id)?.launch(&opts).await?;
        }
        for &id in ids {
            let started = self.member_mut(id)?.started().await;
            started.with_context(|| self.logs())?;
        }
        Ok(())
    }

    /// Everything node `id`'s current process wrote to stderr.
    ///
    /// # Panics
    /// For an id that is not a member.
    pub fn stderr(&self, id: u64) -> String {
        self.members[&id].stderr()
    }

    /// Everything every member wrote to stderr (stopped processes too),
    /// which the drop then no longer prints.
    pub fn take_logs(&mut self) -> String {
        let mut out = String::new();
        let current: Vec<(u64, String)> =
            self.members.values().map(|m| (m.id, m.stderr())).collect();
        for (id, text) in self.past_logs.drain(..).chain(current) {
            for l in text.lines() {
                let _ = writeln!(out, "node {id}: {l}");
            }
        }
        for m in self.members.values_mut() {
            if let Some(p) = &mut m.process {
                p.clear_stderr();
            }
        }
        out
    }

    /// Fails with every ERROR line the members logged (stopped processes
    /// too), for tests of a path that must log none.
    pub fn ensure_no_errors(&self) -> anyhow::Result<()> {
        let current = self.members.values().map(|m| (m.id, m.stderr()));
        let mut found = String::new();
        for (id, text) in self.past_logs.iter().cloned().chain(current) {
            for l in text.lines().filter(|l| l.contains("ERROR")) {
                let _ = writeln!(found, "node {id}: {l}");
            }
        }
        ensure!(found.is_empty(), "ERROR logged:\n{found}");
        Ok(())
    }

    /// The tail of every member's stderr, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let current = self.members.values().map(|m| (m.id, m.stderr()));
        for (id, text) in self.past_logs.iter().cloned().chain(current) {
            if text.trim().is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            let _ = writeln!(out, "--- node {id} stderr (last {} lines) ---", tail.len());
            for l in tail {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }

    /// Creates an HTTP-mode group publishing `port` (to `destination_port`)
    /// through node `via`, and attaches `backends` under their names.
    pub async fn http_group(
        &self,
        via: u64,
        name: &str,
        port: u16,
        destination_port: u16,
        backends: &[HttpBackend],
    ) -> anyhow::Result<Group> {
        let admin = self.admin(via);
        let group = admin
            .create_group(&json!({
                "name": name,
                "services": [{"port": port, "destination_port": destination_port, "handlers": ["http"]}],
            }))
            .await?;
        for b in backends {
            attach(&admin, &group.uuid, b.name(), b.addr().ip()).await?;
        }
        Ok(group)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes are killed by their own drop (kill_on_drop); only the
        // report is left. Output is captured per test and shown on failure.
        let logs = self.logs();
        if !logs.is_empty() {
            eprintln!("{logs}");
        }
    }
}

/// How many of `n` nodes the leader makes voters: as many as `max_voters`
/// allows, odd (the promotion policy keeps the count of voters odd).
pub fn expected_voters(n: usize, max_voters: usize) -> usize {
    let v = n.min(max_voters).max(1);
    if v.is_multiple_of(2) { v - 1 } else { v }
}

fn agreed_leader(views: &[ClusterView]) -> Option<u64> {
    let first = views.first()?.leader_id?;
    views
        .iter()
        .all(|v| v.leader_id == Some(first))
        .then_some(first)
}

fn summary(views: &[ClusterView]) -> String {
    views
        .iter()
        .map(|v| {
            format!(
                "node {}: leader {:?} term {} applied {} voters {} learners {}",
                v.node_id,
                v.leader_id,
                v.term,
                v.applied_index,
                v.voters(),
                v.learners()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Attaches `address` as instance `name` to the group `group` (uuid or
/// name) through `admin`.
pub async fn attach(
    admin: &AdminClient,
    group: &str,
    name: &str,
    address: IpAddr,
) -> anyhow::Result<()> {
    let body = json!({"name": name, "address": address.to_string()});
    let (status, v) = admin
        .post(&format!("/v1/services/{group}/instances"), &body)
        .await?;
    ensure!(status.is_success(), "attaching {name}: {status} {v}");
    Ok(())
}

/// One `GET /` with `Host: host` to `addr` on a fresh connection, bounded:
/// the status and the backend that answered.
pub async fn get_once(addr: SocketAddr, host: &str) -> anyhow::Result<(u16, Option<String>)> {
    let reply = within(
        &format!("an answer from {addr}"),
        Duration::from_secs(5),
        client::get(addr, host, "/"),
    )
    .await??;
    Ok((
        reply.status.as_u16(),
        reply.backend().map(ToOwned::to_owned),
    ))
}

/// Waits until `addr` answers `Host: host` with 200 from one of `backends`.
pub async fn wait_serving(addr: SocketAddr, host: &str, backends: &[&str]) -> anyhow::Result<()> {
    poll(
        &format!("{addr} to serve {host}"),
        Duration::from_secs(20),
        || async {
            match get_once(addr, host).await? {
                (200, Some(b)) if backends.contains(&b.as_str()) => Ok(()),
                other => bail!("answered {other:?}"),
            }
        },
    )
    .await
}

/// Sends `n` sequential requests to `addr` and counts 200s per backend;
/// any other answer fails.
pub async fn tally(
    addr: SocketAddr,
    host: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        match get_once(addr, host).await? {
            (200, Some(b)) => *counts.entry(b).or_insert(0) += 1,
            other => bail!("{addr} answered {other:?} for {host}"),
        }
    }
    Ok(counts)
}
