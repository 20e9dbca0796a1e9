//! The control plane at scale: groups × instances loaded through the admin
//! API, on one node and on three (a measurement tool, not a test).
//!
//! ```text
//!   cargo run --release -p integration --example scale -- [--groups 10000[,…]] [--nodes 1,3] …
//! ```
//!
//! For each cluster size in `--nodes` (default `1,3`), starts a cluster of
//! real `edgelb` processes on loopback (the harness's [`Cluster`], same
//! profile) and ten HTTP backends, then:
//! 1. **Load**: `--writers` (16) concurrent writers create `--groups`
//!    groups (10,000) and attach `--instances` (10) instances to each, one
//!    admin request per write, writer `w` through node `w mod nodes` (the
//!    leader and the followers, which forward). Groups share `--ports` (50)
//!    HTTP ports by domain (`s00042.edgelb.local` on port `8000 + 42 mod 50`).
//!    Per tranche of groups (`--tranches`, 10): writes/s, p50/p99 of the
//!    write latency (sent → 2xx), each node's RSS when the tranche was
//!    done and the CPU time each node spent per write of the tranche (what
//!    grows with the state shows there, whatever else shares the CPUs). The load stops at `--max-secs` (the report says how far it got)
//!    or after 50 failed writes.
//!
//!    **Churn**: a second cluster of the same size is loaded with
//!    `--compare-groups` groups (100 × 10 = 1,000 instances), then both
//!    take the same attach/detach writes (16 writers) in `--rounds` (10)
//!    rounds of one `--window` (5 s) on each, the order alternating (small
//!    then loaded, loaded then small, …). The write rate at the full
//!    state (100,000 instances by default) against the small one is the
//!    median of the rounds' ratios (each round's loaded window against the
//!    small window next to it in time):
//!    the machine drifts through a run (its other tenants, the page cache)
//!    by as much as the effect measured, and a drift moves both windows of
//!    a round alike. The ratio of the two clusters' median windows, which
//!    compares windows minutes apart, is printed beside it.
//! 2. `GET /metrics` on node 1 as text and gzip-compressed (as Prometheus
//!    asks for it), each read as it streams: bytes on the wire and the time
//!    to the last byte; then gzip-compressed again (the next scrape, which
//!    reuses what did not change); `GET /v1/services`: bytes and time.
//! 3. **Restart to ready**: SIGTERM to a node (a follower when there are
//!    several), start it again, until `/readyz` answers 200 and it serves a
//!    request to the last group. Then **after a crash**: 2 s of the churn's
//!    writes, SIGKILL to the same node as soon as the last is acknowledged
//!    (its files unsealed, so redb repairs them at the next open; its last
//!    rows not flushed yet, so they are applied again from the log), start
//!    it again, the same wait.
//! 4. **Join**: a new node joins; time until `/readyz` is 200 and it serves
//!    a request to the last group (a joining node is ready once it applied
//!    the log as it stood when it joined: every group), then the time until
//!    `GET /v1/services` on it lists every group (each step's time is
//!    printed too).
//!
//! With `--wan-ms D` (and `--wan-loss F`) both clusters run behind the
//! link emulator, and after the load, the churn and the scrapes every link
//! of the loaded one is delayed D ms one way (± D/10) and drops F of its
//! datagrams: the restarts (the crash's burst of writes included) and the
//! join then cross a WAN.
//!
//! Prints markdown tables (also as progress on stderr while it runs).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use http::Method;
use integration::client::HttpConn;
use integration::cluster::{Cluster, ClusterOptions, attach, get_once};
use integration::link::Link;
use integration::{AdminClient, load, poll};
use serde_json::json;

#[derive(Clone, Debug, Parser)]
#[command(about = "Load groups × instances through the admin API and measure the control plane")]
struct Args {
    /// Groups to create; several sizes (`1000,2000`) run one after the
    /// other, each on fresh clusters.
    #[arg(long = "groups", value_delimiter = ',', default_values_t = [10_000_usize])]
    sizes: Vec<usize>,
    /// The size being run (one of `--groups`).
    #[arg(skip)]
    groups: usize,
    /// Instances attached to each group.
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Cluster sizes to measure, one after the other.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 3])]
    nodes: Vec<usize>,
    /// Report rows: the groups are cut into this many tranches.
    #[arg(long, default_value_t = 10)]
    tranches: usize,
    /// HTTP ports the groups share (by domain).
    #[arg(long, default_value_t = 50)]
    ports: u16,
    /// Bound of the load phase per cluster, in seconds.
    #[arg(long, default_value_t = 3600)]
    max_secs: u64,
    /// Print what the joining node logged (its level is `EDGELB_TEST_LOG`'s).
    #[arg(long)]
    join_log: bool,
    /// Groups of the comparison cluster (0: no comparison). After the load,
    /// a second cluster of the same size is loaded with this many groups
    /// (100 × 10 = 1,000 instances), then both take the same churn of
    /// attach/detach writes in interleaved windows, so the write rate at
    /// the full state and at the small one is measured side by side.
    #[arg(long, default_value_t = 100)]
    compare_groups: usize,
    /// Churn windows per cluster in the comparison (rounds).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Length of one churn window, in seconds.
    #[arg(long, default_value_t = 5)]
    window: u64,
    /// After the load and the churn, every cluster link is delayed this
    /// many ms one way (± a tenth, so datagrams reorder) for the restarts
    /// and the join: a node catching up, or joining with the whole state
    /// as a snapshot, across a WAN. 0: links stay as loopback makes them.
    #[arg(long, default_value_t = 0)]
    wan_ms: u64,
    /// With `--wan-ms`: each datagram's delay is drawn from `D ± this`
    /// (ms; default D/10), which reorders datagrams sent close together.
    #[arg(long, requires = "wan_ms")]
    wan_jitter_ms: Option<u64>,
    /// With `--wan-ms`: the fraction of datagrams each link drops.
    #[arg(long, default_value_t = 0.0, requires = "wan_ms")]
    wan_loss: f64,
    /// Write every node's log (its level is `EDGELB_TEST_LOG`'s) to
    /// `<DIR>/<nodes>-nodes.log` once the cluster's measurements are done.
    #[arg(long, value_name = "DIR")]
    logs: Option<std::path::PathBuf>,
}

/// First published port; group `g` publishes `FIRST_PORT + g mod ports`.
const FIRST_PORT: u16 = 8000;
/// Port of every backend (the instances' `destination_port`).
const BACKEND_PORT: u16 = 9000;
/// Backends behind every group (instance `i` is backend `i mod BACKENDS`).
const BACKENDS: usize = 10;
/// The load stops after this many failed writes.
const MAX_FAILURES: usize = 50;

/// One acknowledged write.
#[derive(Clone, Copy, Debug)]
struct Sample {
    group: usize,
    sent: Instant,
    took: Duration,
}

/// What one cluster size measured.
#[derive(Debug, Default)]
struct Report {
    nodes: usize,
    rows: Vec<Row>,
    groups_done: usize,
    failures: Vec<String>,
    load_time: Duration,
    /// Bytes, time to the last byte and the node's CPU time meanwhile.
    metrics: Option<(usize, Duration, Duration)>,
    metrics_gzip: Option<(usize, Duration, Duration)>,
    /// The next gzip-compressed scrape, nothing having changed meanwhile
    /// (as Prometheus scrapes every interval): time and CPU time.
    metrics_gzip_next: Option<(Duration, Duration)>,
    services: Option<(usize, Duration)>,
    restart: Option<(u64, Duration)>,
    /// The same node killed (SIGKILL) right after a burst of writes, then
    /// started again: its files unsealed, the last rows not yet flushed.
    crash_restart: Option<Duration>,
    join: Option<(u64, Duration, f64)>,
    /// After the join: the time until the new node listed every group.
    listed: Option<Duration>,
    /// The churn comparison: the small cluster's windows, then the loaded one's.
    churn: Option<(Churn, Churn)>,
}

/// Churn windows on one cluster: groups in its state, each window's rate
/// and every write's latency.
#[derive(Debug, Default)]
struct Churn {
    groups: usize,
    rates: Vec<f64>,
    took: Vec<Duration>,
}

impl Churn {
    fn median_rate(&self) -> f64 {
        median(&self.rates)
    }
}

/// The median (the mean of the middle two of an even count; 0 for none).
/// Runs printed before it was shared took the upper of the middle two for
/// a cluster's median window.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Each round's loaded window against its small window (the two ran next
/// to each other in time): a drift of the machine through the run moves
/// both windows of a round alike, where it can move the two clusters'
/// medians apart.
fn round_ratios(small: &Churn, big: &Churn) -> Vec<f64> {
    small
        .rates
        .iter()
        .zip(&big.rates)
        .map(|(s, b)| b / s.max(1e-9))
        .collect()
}

/// One tranche of groups.
#[derive(Debug)]
struct Row {
    groups: usize,
    writes: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    rss_mib: Vec<f64>,
    /// CPU ms each node spent per write of the tranche.
    cpu_ms: Vec<f64>,
}

/// When a tranche was done: groups done, each node's RSS (MiB) and CPU time.
type Mark = (usize, Vec<f64>, Vec<Duration>);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    ensure!(args.writers >= 1, "need writers");
    ensure!(
        args.tranches >= 1 && args.ports >= 1 && args.ports <= 1000,
        "bad --tranches/--ports"
    );
    let mut out = String::new();
    for groups in args.sizes.clone() {
        ensure!(groups >= 1, "--groups takes sizes of at least 1");
        args.groups = groups;
        let mut reports = Vec::new();
        for &n in &args.nodes {
            ensure!(
                (1..=5).contains(&n),
                "--nodes takes cluster sizes of 1 to 5"
            );
            let report = run(&args, n)
                .await
                .with_context(|| format!("{n} node(s)"))?;
            eprintln!("{}", render(&args, std::slice::from_ref(&report)));
            reports.push(report);
        }
        out.push_str(&render(&args, &reports));
    }
    println!("{out}");
    Ok(())
}

fn group_name(g: usize) -> String {
    format!("s{g:05}")
}

fn host(g: usize) -> String {
    format!("{}.edgelb.local", group_name(g))
}

fn port(ports: u16, g: usize) -> u16 {
    // `g mod ports` < ports ≤ 1000, so it fits.
    FIRST_PORT + u16::try_from(g % usize::from(ports)).unwrap_or(0)
}

async fn run(args: &Args, n: usize) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut cluster = start(args, n, 1).await?;
    let ids = cluster.ids();
    eprintln!("{n} node(s) up in {:.1?}", started.elapsed());
    let names: Vec<String> = (0..BACKENDS).map(|i| format!("b{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let backends = cluster.http_backends(&names, BACKEND_PORT).await?;
    let addrs: Arc<Vec<IpAddr>> = Arc::new(backends.iter().map(|b| b.addr().ip()).collect());

    let (samples, rss, groups_done, failures, load_time) = load(args, &cluster, &addrs).await?;
    let mut report = Report {
        nodes: n,
        rows: rows(args, &samples, &rss),
        groups_done,
        failures,
        load_time,
        ..Report::default()
    };
    ensure!(
        groups_done > 0,
        "no group was created: {:?}",
        report.failures
    );
    let last = groups_done - 1;

    // The churn (and the crash's burst of writes) attaches instances at it.
    let big_addr = big_backend(&cluster, groups_done).await?;
    if args.compare_groups > 0 && args.rounds > 0 {
        report.churn = Some(compare(args, &cluster, groups_done, big_addr).await?);
    }

    let admin = cluster.admin(ids[0]);
    let pid = cluster.pid(ids[0]);
    report.metrics = Some(scrape(&admin, pid, false).await?);
    report.metrics_gzip = Some(scrape(&admin, pid, true).await?);
    let (_, took, cpu) = scrape(&admin, pid, true).await?;
    report.metrics_gzip_next = Some((took, cpu));
    report.services = Some(timed_get(&admin, "/v1/services").await?);

    if let Some(relay) = cluster.relay().filter(|_| args.wan_ms > 0) {
        let delay = Duration::from_millis(args.wan_ms);
        relay.set_all(Link {
            delay,
            jitter: args.wan_jitter_ms.map_or(delay / 10, Duration::from_millis),
            loss: args.wan_loss,
            ..Link::default()
        });
        eprintln!(
            "cluster links now {} ms one way (jitter {:?} ms), {} loss",
            args.wan_ms, args.wan_jitter_ms, args.wan_loss
        );
    }
    let leader = cluster.leader().await?;
    let restarted = ids.iter().copied().find(|&i| i != leader).unwrap_or(leader);
    cluster.stop(restarted).await?;
    let took = restart_to_ready(args, &mut cluster, restarted, last).await?;
    report.restart = Some((restarted, took));
    eprintln!("node {restarted} restarted to ready in {took:.2?}");

    // A crash: a burst of writes, then SIGKILL as soon as the last is
    // acknowledged, so that the files are not sealed (redb repairs them
    // at the next open) and the last rows are still to be flushed (the
    // log holds them; they are applied again before the node is ready).
    let burst = Duration::from_secs(2);
    churn_window(args, &cluster, groups_done, big_addr, 0, burst).await?;
    cluster.kill9(restarted).await?;
    let took = restart_to_ready(args, &mut cluster, restarted, last).await?;
    report.crash_restart = Some(took);
    eprintln!("node {restarted} killed after writes, restarted to ready in {took:.2?}");

    let t = Instant::now();
    let joined = cluster.add_members(1).await?;
    let id = *joined.first().context("no node was added")?;
    eprintln!(
        "node {id} started (its admin API answers) at {:.2?}",
        t.elapsed()
    );
    ready_and_serving(args, &cluster, id, last).await?;
    let took = t.elapsed();
    // Ready means it applied the log as it stood when it joined: every group.
    report.listed = Some(lists_every_group(&cluster, id, groups_done).await?);
    if args.join_log {
        eprintln!("--- node {id} logged ---\n{}", cluster.stderr(id));
    }
    let rss = mib(load::rss_kib(cluster.pid(id)));
    report.join = Some((id, took, rss));
    eprintln!("node {id} joined and serves every group in {took:.2?}");
    if let Some(dir) = &args.logs {
        let path = dir.join(format!("{n}-nodes.log"));
        std::fs::write(&path, cluster.take_logs())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// A cluster of `n` nodes, behind the link emulator (seeded with `seed`)
/// when the later phases run across a WAN (`--wan-ms`): both clusters of
/// the churn comparison, so that they pay for the relay alike.
async fn start(args: &Args, n: usize, seed: u64) -> anyhow::Result<Cluster> {
    Cluster::start_with(
        n,
        ClusterOptions {
            relay: (args.wan_ms > 0).then_some(seed),
            ..ClusterOptions::default()
        },
    )
    .await
}

/// Loads a second cluster of the same size with `--compare-groups` groups,
/// then runs `--rounds` churn windows on each cluster, alternating which
/// goes first, so both see the same machine.
async fn compare(
    args: &Args,
    big: &Cluster,
    big_groups: usize,
    big_addr: IpAddr,
) -> anyhow::Result<(Churn, Churn)> {
    let n = big.ids().len();
    let small = start(args, n, 2).await?;
    let names: Vec<String> = (0..BACKENDS).map(|i| format!("b{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let backends = small.http_backends(&names, BACKEND_PORT).await?;
    let small_addrs: Arc<Vec<IpAddr>> = Arc::new(backends.iter().map(|b| b.addr().ip()).collect());
    let small_args = Args {
        groups: args.compare_groups,
        ..args.clone()
    };
    let (_, _, small_groups, failures, _) = load(&small_args, &small, &small_addrs).await?;
    ensure!(
        small_groups == args.compare_groups,
        "the comparison cluster got {small_groups} of {} groups: {failures:?}",
        args.compare_groups
    );
    let small_addr = small_addrs[0];
    let mut a = Churn {
        groups: small_groups,
        ..Churn::default()
    };
    let mut b = Churn {
        groups: big_groups,
        ..Churn::default()
    };
    for round in 0..args.rounds {
        for second in [false, true] {
            let on_small = (round % 2 == 0) != second;
            let (cluster, churn, addr) = if on_small {
                (&small, &mut a, small_addr)
            } else {
                (big, &mut b, big_addr)
            };
            let window = Duration::from_secs(args.window);
            let (rate, took) =
                churn_window(args, cluster, churn.groups, addr, round, window).await?;
            eprintln!(
                "churn round {round}: {} groups, {rate:.0} writes/s",
                churn.groups
            );
            churn.rates.push(rate);
            churn.took.extend(took);
        }
    }
    a.took.sort();
    b.took.sort();
    Ok((a, b))
}

/// The address of the loaded cluster's first instance (the churn attaches
/// another instance at it).
async fn big_backend(cluster: &Cluster, groups: usize) -> anyhow::Result<IpAddr> {
    let admin = cluster.admin(cluster.ids()[0]);
    let instances = admin.instances(&group_name(groups - 1)).await?;
    let first = instances
        .first()
        .context("the last group has no instance")?;
    first
        .address
        .parse()
        .with_context(|| format!("instance address {}", first.address))
}

/// One churn window on `cluster`: every writer attaches an instance of its
/// own to a group and detaches it again, over the groups in turn, through
/// node `w mod n`, for `window` (a started pair is finished).
/// The write rate and every write's latency.
async fn churn_window(
    args: &Args,
    cluster: &Cluster,
    groups: usize,
    addr: IpAddr,
    round: usize,
    window: Duration,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let ids = cluster.ids();
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let admin = cluster.admin(ids[w % ids.len()]);
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let name = format!("churn{w}");
            // Writers start apart and step by a prime, so they spread.
            let mut g = (w * groups / 16 + round * 7) % groups;
            while Instant::now() < deadline {
                let group = group_name(g);
                let sent = Instant::now();
                attach(&admin, &group, &name, addr).await?;
                took.push(sent.elapsed());
                let sent = Instant::now();
                let path = format!("/v1/services/{group}/instances/{name}");
                let (status, v) = admin.delete(&path).await?;
                ensure!(status.is_success(), "detaching {name}: {status} {v}");
                took.push(sent.elapsed());
                g = (g + 7_919) % groups;
            }
            anyhow::Ok(took)
        }));
    }
    let mut took = Vec::new();
    for t in tasks {
        took.extend(t.await.context("a churn writer panicked")??);
    }
    let span = started.elapsed().as_secs_f64().max(1e-9);
    Ok((took.len() as f64 / span, took))
}

type Loaded = (Vec<Sample>, Vec<Mark>, usize, Vec<String>, Duration);

/// The load phase: every group created and its instances attached.
async fn load(args: &Args, cluster: &Cluster, addrs: &Arc<Vec<IpAddr>>) -> anyhow::Result<Loaded> {
    let ids = cluster.ids();
    let pids: Vec<Option<u32>> = ids.iter().map(|&i| cluster.pid(i)).collect();
    let per_tranche = args.groups.div_ceil(args.tranches);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let rss = Arc::new(Mutex::new(vec![(0, Vec::new(), cpu_times(&pids))]));
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let admin = cluster.admin(ids[w % ids.len()]);
        let ctx = Writer {
            groups: args.groups,
            instances: args.instances,
            ports: args.ports,
            addrs: addrs.clone(),
            next: next.clone(),
            stop: stop.clone(),
            failures: failures.clone(),
            deadline,
        };
        let (done, rss, pids) = (done.clone(), rss.clone(), pids.clone());
        let groups = args.groups;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while let Some(g) = ctx.claim() {
                if ctx.group(&admin, g, &mut samples).await {
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d.is_multiple_of(per_tranche) || d == groups {
                        let at: Vec<f64> = pids.iter().map(|&p| mib(load::rss_kib(p))).collect();
                        eprintln!(
                            "{d} groups done at {:.1?}, RSS MiB {at:?}",
                            started.elapsed()
                        );
                        rss.lock().unwrap_or_else(PoisonError::into_inner).push((
                            d,
                            at,
                            cpu_times(&pids),
                        ));
                    }
                }
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.context("a writer panicked")?);
    }
    let load_time = started.elapsed();
    let failures = std::mem::take(&mut *failures.lock().unwrap_or_else(PoisonError::into_inner));
    let rss = std::mem::take(&mut *rss.lock().unwrap_or_else(PoisonError::into_inner));
    Ok((
        samples,
        rss,
        done.load(Ordering::Relaxed),
        failures,
        load_time,
    ))
}

/// The CPU time each process has used so far.
fn cpu_times(pids: &[Option<u32>]) -> Vec<Duration> {
    pids.iter()
        .map(|p| p.map_or(Duration::ZERO, load::cpu_time))
        .collect()
}

/// What every writer shares.
struct Writer {
    groups: usize,
    instances: usize,
    ports: u16,
    addrs: Arc<Vec<IpAddr>>,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    deadline: Instant,
}

impl Writer {
    /// The next group to create, until all are claimed, the time is up or
    /// too many writes failed.
    fn claim(&self) -> Option<usize> {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return None;
        }
        let g = self.next.fetch_add(1, Ordering::Relaxed);
        (g < self.groups).then_some(g)
    }

    /// Creates group `g` and attaches its instances; whether every write
    /// succeeded.
    async fn group(&self, admin: &AdminClient, g: usize, samples: &mut Vec<Sample>) -> bool {
        let body = json!({
            "name": group_name(g),
            "services": [{"port": port(self.ports, g), "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        });
        let sent = Instant::now();
        let created = admin.create_group(&body).await.map(|_| ());
        if !self.record(g, sent, created, samples) {
            return false;
        }
        for i in 0..self.instances {
            let sent = Instant::now();
            let addr = self.addrs[i % self.addrs.len()];
            let attached = attach(admin, &group_name(g), &format!("i{i}"), addr).await;
            if !self.record(g, sent, attached, samples) {
                return false;
            }
        }
        true
    }

    fn record(
        &self,
        group: usize,
        sent: Instant,
        outcome: anyhow::Result<()>,
        samples: &mut Vec<Sample>,
    ) -> bool {
        match outcome {
            Ok(()) => {
                samples.push(Sample {
                    group,
                    sent,
                    took: sent.elapsed(),
                });
                true
            }
            Err(e) => {
                let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
                f.push(format!("group {group}: {e:#}"));
                if f.len() >= MAX_FAILURES {
                    self.stop.store(true, Ordering::Relaxed);
                }
                false
            }
        }
    }
}

/// One row per tranche of groups: the writes to those groups.
fn rows(args: &Args, samples: &[Sample], marks: &[Mark]) -> Vec<Row> {
    let mut marks = marks.to_vec();
    marks.sort_by_key(|(d, ..)| *d);
    let per = args.groups.div_ceil(args.tranches);
    let mut out = Vec::new();
    for t in 0..args.tranches {
        let range = t * per..((t + 1) * per).min(args.groups);
        let mut took: Vec<Duration> = Vec::new();
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        for s in samples.iter().filter(|s| range.contains(&s.group)) {
            took.push(s.took);
            first = Some(first.map_or(s.sent, |f| f.min(s.sent)));
            let end = s.sent + s.took;
            last = Some(last.map_or(end, |l| l.max(end)));
        }
        let (Some(first), Some(last)) = (first, last) else {
            break;
        };
        took.sort();
        let span = (last - first).as_secs_f64().max(1e-9);
        // Marks are pushed as tranches finish, in any order between writers.
        let mark = |at: usize| marks.iter().find(|(d, ..)| *d >= at).or(marks.last());
        let rss_mib = mark(range.end)
            .map(|(_, r, _)| r.clone())
            .unwrap_or_default();
        let cpu_ms = match (mark(range.start), mark(range.end)) {
            (Some((_, _, from)), Some((_, _, to))) => from
                .iter()
                .zip(to)
                .map(|(f, t)| ms(t.saturating_sub(*f)) / took.len().max(1) as f64)
                .collect(),
            _ => Vec::new(),
        };
        out.push(Row {
            groups: range.end,
            writes: took.len(),
            rate: took.len() as f64 / span,
            p50: quantile(&took, 0.5),
            p99: quantile(&took, 0.99),
            rss_mib,
            cpu_ms,
        });
    }
    out
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// [`timed_scrape`], and the CPU time that the node `pid` used meanwhile.
async fn scrape(
    admin: &AdminClient,
    pid: Option<u32>,
    gzip: bool,
) -> anyhow::Result<(usize, Duration, Duration)> {
    let cpu = cpu_times(&[pid])[0];
    let (bytes, took) = timed_scrape(admin, gzip).await?;
    Ok((bytes, took, cpu_times(&[pid])[0].saturating_sub(cpu)))
}

/// `GET /metrics` on `admin`, asking for gzip when `gzip`, read as it
/// streams and dropped: the bytes on the wire and the time to the last one.
async fn timed_scrape(admin: &AdminClient, gzip: bool) -> anyhow::Result<(usize, Duration)> {
    use http_body_util::BodyExt as _;
    let t = Instant::now();
    let mut req = http::Request::new(
        http_body_util::Empty::<bytes::Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *req.uri_mut() = http::Uri::from_static("/metrics");
    let h = req.headers_mut();
    h.insert(http::header::HOST, admin.addr.to_string().parse()?);
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {}", admin.token).parse()?,
    );
    if gzip {
        h.insert(http::header::ACCEPT_ENCODING, "gzip".parse()?);
    }
    let read = async {
        let mut conn = HttpConn::connect(admin.addr).await?;
        let resp = conn.start(req).await?;
        ensure!(
            resp.status().is_success(),
            "GET /metrics: {}",
            resp.status()
        );
        let encoded = resp.headers().get(http::header::CONTENT_ENCODING).is_some();
        ensure!(
            encoded == gzip,
            "GET /metrics: gzip asked {gzip}, answered {encoded}"
        );
        let mut body = resp.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                bytes += data.len();
            }
        }
        anyhow::Ok(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .context("GET /metrics took over 120 s")??;
    Ok((bytes, t.elapsed()))
}

/// `GET path` on `admin`: the body's size and the time to the whole answer.
async fn timed_get(admin: &AdminClient, path: &str) -> anyhow::Result<(usize, Duration)> {
    let t = Instant::now();
    let reply = admin.request(Method::GET, path, None).await?;
    let took = t.elapsed();
    ensure!(reply.status.is_success(), "GET {path}: {}", reply.status);
    Ok((reply.body.len(), took))
}

/// How long the restart and join steps may take.
const LIMIT: Duration = Duration::from_secs(300);

/// Starts the stopped node `id` again: the time until it is ready and
/// serves a request to group `last`.
async fn restart_to_ready(
    args: &Args,
    cluster: &mut Cluster,
    id: u64,
    last: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    cluster.restart(id).await?;
    ready_and_serving(args, cluster, id, last).await?;
    Ok(t.elapsed())
}

/// Waits until node `id` answers `/readyz` with 200 and serves a request
/// to group `last`.
async fn ready_and_serving(
    args: &Args,
    cluster: &Cluster,
    id: u64,
    last: usize,
) -> anyhow::Result<()> {
    let admin = cluster.admin(id);
    let t = Instant::now();
    poll(&format!("node {id} to be ready"), LIMIT, || async {
        let r = admin.request_as(Method::GET, "/readyz", None, None).await?;
        ensure!(r.status.is_success(), "/readyz: {} {}", r.status, r.text());
        Ok(())
    })
    .await?;
    eprintln!("node {id}: ready after {:.2?}", t.elapsed());
    let addr = cluster.data_addr(id, port(args.ports, last));
    poll(
        &format!("node {id} to serve {}", host(last)),
        LIMIT,
        || async {
            match get_once(addr, &host(last)).await? {
                (200, Some(_)) => Ok(()),
                other => bail!("answered {other:?}"),
            }
        },
    )
    .await?;
    eprintln!("node {id}: serves {} after {:.2?}", host(last), t.elapsed());
    Ok(())
}

/// Waits until node `id` lists `want` groups (`GET /v1/services`); how
/// long that took.
async fn lists_every_group(cluster: &Cluster, id: u64, want: usize) -> anyhow::Result<Duration> {
    let admin = cluster.admin(id);
    let t = Instant::now();
    poll(
        &format!("node {id} to list {want} groups"),
        LIMIT,
        || async {
            let asked = Instant::now();
            let have = admin.groups(false).await?.len();
            eprintln!("node {id}: listed {have} groups in {:.2?}", asked.elapsed());
            ensure!(have >= want, "{have} groups");
            Ok(())
        },
    )
    .await?;
    Ok(t.elapsed())
}

fn render(args: &Args, reports: &[Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} groups × {} instances, {} writers, {} shared ports\n",
        args.groups, args.instances, args.writers, args.ports
    );
    let _ = writeln!(
        s,
        "| nodes | groups | instances | writes | writes/s | p50 ms | p99 ms | RSS MiB per node | CPU ms per write per node |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for r in reports {
        for row in &r.rows {
            let rss: Vec<String> = row.rss_mib.iter().map(|m| format!("{m:.0}")).collect();
            let cpu: Vec<String> = row.cpu_ms.iter().map(|m| format!("{m:.2}")).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |",
                r.nodes,
                row.groups,
                row.groups * args.instances,
                row.writes,
                row.rate,
                ms(row.p50),
                ms(row.p99),
                rss.join(" / "),
                cpu.join(" / ")
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| nodes | groups done | load s | /metrics text MB | ms (CPU) | /metrics gzip MB | ms (CPU) | next ms (CPU) | GET /v1/services MB | ms | restart to ready s | after SIGKILL s | join and serve s | then lists all s | joined RSS MiB |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in reports {
        let scrape = |m: Option<(usize, Duration, Duration)>| {
            m.map_or((0.0, 0.0, 0.0), |(b, t, c)| (b as f64 / 1e6, ms(t), ms(c)))
        };
        let (mb, mms, mcpu) = scrape(r.metrics);
        let (gb, gms, gcpu) = scrape(r.metrics_gzip);
        let (next, ncpu) = r
            .metrics_gzip_next
            .map_or((0.0, 0.0), |(t, c)| (ms(t), ms(c)));
        let (sb, sms) = r
            .services
            .map_or((0.0, 0.0), |(b, t)| (b as f64 / 1e6, ms(t)));
        let restart = r.restart.map_or(0.0, |(_, t)| t.as_secs_f64());
        let crash = r.crash_restart.map_or(0.0, |t| t.as_secs_f64());
        let (join, join_rss) = r.join.map_or((0.0, 0.0), |(_, t, m)| (t.as_secs_f64(), m));
        let listed = r.listed.map_or(0.0, |t| t.as_secs_f64());
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {mb:.1} | {mms:.0} ({mcpu:.0}) | {gb:.1} | {gms:.0} ({gcpu:.0}) | {next:.0} ({ncpu:.0}) | {sb:.1} | {sms:.0} | {restart:.2} | {crash:.2} | {join:.2} | {listed:.2} | {join_rss:.0} |",
            r.nodes,
            r.groups_done,
            r.load_time.as_secs_f64(),
        );
    }
    let compared: Vec<&Report> = reports.iter().filter(|r| r.churn.is_some()).collect();
    if !compared.is_empty() {
        let _ = writeln!(
            s,
            "\nChurn (attach/detach, {} writers, {} windows of {} s per cluster, interleaved):\n",
            args.writers, args.rounds, args.window
        );
        let _ = writeln!(
            s,
            "| nodes | instances | writes | writes/s per window (median) | p50 ms | p99 ms | rate vs the small state: median of the rounds | ratio of the medians |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---|---:|---:|---:|---:|");
        // Each round's ratio, printed after the table.
        let mut rounds = String::new();
        for r in compared {
            let Some((small, big)) = &r.churn else {
                continue;
            };
            let base = small.median_rate().max(1e-9);
            let ratios = round_ratios(small, big);
            let paired_median = median(&ratios);
            for (c, paired) in [(small, 1.0), (big, paired_median)] {
                let rates: Vec<String> = c.rates.iter().map(|r| format!("{r:.0}")).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} ({:.0}) | {:.1} | {:.1} | {paired:.2}× | {:.2}× |",
                    r.nodes,
                    c.groups * args.instances,
                    c.took.len(),
                    rates.join(", "),
                    c.median_rate(),
                    ms(quantile(&c.took, 0.5)),
                    ms(quantile(&c.took, 0.99)),
                    c.median_rate() / base
                );
            }
            let shown: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
            let _ = writeln!(
                rounds,
                "{} node(s), each round's loaded window against its small one: {} (median {:.2}×)",
                r.nodes,
                shown.join(", "),
                paired_median
            );
        }
        let _ = write!(s, "\n{rounds}");
    }
    for r in reports.iter().filter(|r| !r.failures.is_empty()) {
        let _ = writeln!(
            s,
            "\n{} node(s): {} failed writes, first: {}",
            r.nodes,
            r.failures.len(),
            r.failures[0]
        );
    }
    s
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
