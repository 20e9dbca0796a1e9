//! A rolling upgrade of a 3-node cluster from the format-1 binary to the
//! current one, one node at a time, under client traffic on every node and
//! a continuous stream of attach/detach writes.
//!
//! ```text
//!   start   o o o            (o: old binary, n: current; L: leader)
//!   step 1  L stopped; ≥ 600 entries written → the old leader snapshots and
//!           purges; L comes back n and installs the old leader's snapshot
//!   step 2  the leader (o) stopped; comes back n (an election among o and n)
//!   step 3  the last o stopped; ≥ 600 entries → a new leader snapshots; it
//!           comes back o once more and installs the new leader's snapshot;
//!           then it is stopped and comes back n
//!   after every step: a write through every node is read on every node
//! ```
//!
//! What is allowed: requests to a node between its SIGTERM and its
//! `/readyz` answering 200 again may fail at the transport (connection
//! refused or closed: the node is down or draining); they are counted and
//! reported. Everything else is a failure: any answer other than 200 from
//! any node at any time, any transport error from a node that is not
//! restarting, and any write not acknowledged within [`WRITE_BOUND`] (writes
//! are retried through another node until acknowledged; a retry answered
//! 409 for an attach or 404 for a detach means an earlier attempt was
//! committed). At the end every node holds exactly the instances the
//! acknowledged writes leave.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use http::StatusCode;
use integration::client::{self, HttpConn};
use integration::cluster::wait_serving;
use integration::{AdminClient, Cluster, ClusterOptions, poll, within};
use serde_json::json;

use super::{BACKEND_PORT, SHARED_PORT, WEB_PORT, host, old_binary, wait_ready};

/// How long one write may take to be acknowledged, retries included.
const WRITE_BOUND: Duration = Duration::from_secs(60);
/// Requests per load loop at most (a loop sends one every [`PACE`]).
const MAX_REQUESTS: u64 = 40_000;
const PACE: Duration = Duration::from_millis(10);
/// Background writes at most.
const MAX_WRITES: usize = 5_000;
/// Log entries per round of bulk writes (attach + detach pairs).
const BULK_WRITERS: usize = 8;
const BULK_PAIRS: usize = 40;
/// The snapshot policy of format 1: every 500 entries, 100 kept behind.
const SNAPSHOT_MARGIN: u64 = 150;
const NODES: u64 = 3;

/// Which nodes are being restarted, and the stop flag of the loops.
#[derive(Debug, Default)]
struct Flags {
    stop: AtomicBool,
    /// Index `id - 1`.
    restarting: [AtomicBool; NODES as usize],
}

impl Flags {
    fn restarting(&self, id: u64) -> bool {
        self.restarting[(id - 1) as usize].load(Ordering::SeqCst)
    }

    fn set_restarting(&self, id: u64, on: bool) {
        self.restarting[(id - 1) as usize].store(on, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What the requests to one node met.
#[derive(Debug, Default)]
struct NodeTraffic {
    ok: AtomicU64,
    /// Transport errors while the node restarted (allowed).
    while_restarting: AtomicU64,
    /// Everything else that was not a 200.
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl NodeTraffic {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if f.len() < 10 {
            f.push(what);
        }
    }
}

/// Requests to node `id` until the stop flag, one every [`PACE`], on one
/// kept-alive connection (`keep_alive`) or a fresh connection each.
async fn request_loop(
    id: u64,
    addr: SocketAddr,
    keep_alive: bool,
    flags: Arc<Flags>,
    traffic: Arc<NodeTraffic>,
) {
    let host = host("traffic");
    let mut conn: Option<HttpConn> = None;
    let mut pace = tokio::time::interval(PACE);
    for _ in 0..MAX_REQUESTS {
        if flags.stopped() {
            break;
        }
        pace.tick().await;
        let restarting_before = flags.restarting(id);
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            if !keep_alive {
                return client::get(addr, &host, "/").await;
            }
            if conn.as_ref().is_none_or(HttpConn::is_closed) {
                conn = Some(HttpConn::connect(addr).await?);
            }
            match conn.as_mut() {
                Some(c) => c.get(&host, "/").await,
                None => bail!("no connection"),
            }
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 5 s")));
        match reply {
            Ok(r) if r.status == StatusCode::OK => {
                traffic.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r) => traffic.fail(format!("node {id}: {} {}", r.status, r.text())),
            Err(e) => {
                conn = None;
                if restarting_before || flags.restarting(id) {
                    traffic.while_restarting.fetch_add(1, Ordering::SeqCst);
                } else {
                    traffic.fail(format!("node {id}: {e:#}"));
                }
            }
        }
    }
}

/// One write of the history.
#[derive(Debug, Clone)]
struct Write {
    instance: String,
    attach: bool,
    /// Attempts until acknowledged (1: the first).
    attempts: usize,
}

/// The background writer's history and failures.
#[derive(Debug, Default)]
struct Writes {
    acked: Mutex<Vec<Write>>,
    /// Writes not acknowledged within [`WRITE_BOUND`].
    lost: Mutex<Vec<String>>,
}

impl Writes {
    fn acked(&self) -> Vec<Write> {
        self.acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Attaches (`attach`) or detaches `instance` of group "traffic" through
/// the running nodes in turn until acknowledged; the number of attempts,
/// or why it never was.
async fn write_once(
    admins: &[AdminClient],
    flags: &Flags,
    instance: &str,
    attach: bool,
    address: &str,
    turn: &mut usize,
) -> anyhow::Result<usize> {
    let started = Instant::now();
    let mut attempts = 0;
    let mut last = String::new();
    while started.elapsed() < WRITE_BOUND {
        *turn += 1;
        let id = (*turn as u64 % NODES) + 1;
        if flags.restarting(id) {
            continue;
        }
        attempts += 1;
        let admin = &admins[(id - 1) as usize];
        let answer = if attach {
            let body = json!({"name": instance, "address": address});
            admin.post("/v1/services/traffic/instances", &body).await
        } else {
            admin
                .delete(&format!("/v1/services/traffic/instances/{instance}"))
                .await
        };
        match answer {
            Ok((s, _)) if s.is_success() => return Ok(attempts),
            // An earlier attempt was committed after all.
            Ok((StatusCode::CONFLICT, _)) if attach && attempts > 1 => return Ok(attempts),
            Ok((StatusCode::NOT_FOUND, _)) if !attach && attempts > 1 => return Ok(attempts),
            Ok((s, v)) => last = format!("node {id}: {s} {v}"),
            Err(e) => last = format!("node {id}: {e:#}"),
        }
        // A bounded pause before the retry (an election takes ~1 s).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{instance} (attach: {attach}) not acknowledged in {WRITE_BOUND:?}: {last}")
}

/// Attaches `w-k` for k = 0, 1, … and detaches `w-(k-3)`, until the stop
/// flag.
async fn writer(admins: Vec<AdminClient>, address: String, flags: Arc<Flags>, writes: Arc<Writes>) {
    let mut turn = 0;
    for k in 0..MAX_WRITES {
        if flags.stopped() {
            break;
        }
        let mut ops = vec![(format!("w-{k}"), true)];
        if k >= 3 {
            ops.push((format!("w-{}", k - 3), false));
        }
        for (instance, attach) in ops {
            match write_once(&admins, &flags, &instance, attach, &address, &mut turn).await {
                Ok(attempts) => writes
                    .acked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Write {
                        instance,
                        attach,
                        attempts,
                    }),
                Err(e) => {
                    writes
                        .lost
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!("{e:#}"));
                    return;
                }
            }
        }
    }
}

/// The instances of group "traffic" the acknowledged writes leave, with
/// the stable ones.
fn expected_instances(acked: &[Write], stable: &[&str]) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = stable.iter().map(|s| (*s).to_owned()).collect();
    for w in acked {
        if w.attach {
            set.insert(w.instance.clone());
        } else {
            set.remove(&w.instance);
        }
    }
    set
}

/// The instance names of group "traffic" in node `admin`'s local state.
async fn traffic_instances(admin: &AdminClient) -> anyhow::Result<BTreeSet<String>> {
    Ok(admin
        .instances("traffic")
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect())
}

/// One bulk write, retried (5 tries) while it fails: only the log entries
/// matter here, and on a loaded machine a write may take longer than the
/// 5 s a node gives it (503). `done` (409 for an attach, 404 for a detach)
/// means an earlier try, or the first forward of this one (a follower
/// retries a forward that timed out), was committed: counted as repeated.
async fn bulk_write<F, Fut>(name: &str, done: StatusCode, mut send: F) -> anyhow::Result<usize>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<(StatusCode, serde_json::Value)>>,
{
    let mut last = String::new();
    for _ in 0..5 {
        match send().await {
            Ok((s, _)) if s.is_success() => return Ok(0),
            Ok((s, _)) if s == done => return Ok(1),
            Ok((s, v)) => last = format!("{s} {v}"),
            Err(e) => last = format!("{e:#}"),
        }
        // A bounded pause before the retry.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("bulk write {name} failed 5 times: {last}")
}

/// `BULK_WRITERS × BULK_PAIRS` attach/detach pairs on group "bulk" through
/// `via`, until the leader's snapshot is [`SNAPSHOT_MARGIN`] entries past
/// `index`: a node whose log ends at `index` then needs a snapshot.
async fn write_past_snapshot(
    cluster: &Cluster,
    via: &[u64],
    leader: u64,
    index: u64,
    ip: std::net::IpAddr,
    round_tag: &str,
) -> anyhow::Result<f64> {
    for round in 0..4 {
        let mut tasks = Vec::new();
        for w in 0..BULK_WRITERS {
            let admin = cluster.admin(via[w % via.len()]);
            let tag = format!("{round_tag}-{round}-{w}");
            tasks.push(tokio::spawn(async move {
                let mut repeated = 0_usize;
                for j in 0..BULK_PAIRS {
                    let name = format!("{tag}-{j}");
                    let body = json!({"name": name, "address": ip.to_string()});
                    repeated += bulk_write(&name, StatusCode::CONFLICT, || {
                        admin.post("/v1/services/bulk/instances", &body)
                    })
                    .await?;
                    let path = format!("/v1/services/bulk/instances/{name}");
                    repeated +=
                        bulk_write(&name, StatusCode::NOT_FOUND, || admin.delete(&path)).await?;
                }
                anyhow::Ok(repeated)
            }));
        }
        let mut repeated = 0;
        for t in tasks {
            repeated += t.await??;
        }
        if repeated > 0 {
            eprintln!(
                "{round_tag}: {repeated} bulk writes answered as already done (a retried forward)"
            );
        }
        let snapshot = cluster.metric(leader, "edgelb_raft_snapshot_index").await?;
        if snapshot >= (index + SNAPSHOT_MARGIN) as f64 {
            return Ok(snapshot);
        }
    }
    bail!("the leader did not snapshot past index {index}")
}

/// A group created through every running node is read on every running
/// node: old and new nodes replicate each other's writes, whichever leads.
async fn replicate_across(
    cluster: &Cluster,
    versions: &BTreeMap<u64, &str>,
    label: &str,
) -> anyhow::Result<String> {
    let leader = cluster.leader().await?;
    let mut names = Vec::new();
    for id in cluster.running() {
        let name = format!("probe-{label}-via-{id}");
        let admin = cluster.admin(id);
        poll(
            &format!("a write through node {id}"),
            Duration::from_secs(20),
            || async {
                let (s, v) = admin
                    .post(
                        "/v1/services",
                        &json!({"name": name, "services": [{"port": SHARED_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}]}),
                    )
                    .await?;
                ensure!(s.is_success() || s == StatusCode::CONFLICT, "{s} {v}");
                Ok(())
            },
        )
        .await?;
        names.push(name);
    }
    for id in cluster.running() {
        let admin = cluster.admin(id);
        poll(
            &format!("node {id} ({}) to read {names:?}", versions[&id]),
            Duration::from_secs(20),
            || async {
                let have: BTreeSet<String> = admin
                    .groups(false)
                    .await?
                    .iter()
                    .filter_map(|g| g["name"].as_str().map(ToOwned::to_owned))
                    .collect();
                let missing: Vec<_> = names.iter().filter(|n| !have.contains(*n)).collect();
                ensure!(missing.is_empty(), "missing {missing:?}");
                Ok(())
            },
        )
        .await
        .with_context(|| cluster.logs())?;
    }
    let shape: Vec<String> = cluster
        .running()
        .iter()
        .map(|id| {
            format!(
                "{id}:{}{}",
                versions[id],
                if *id == leader { "*" } else { "" }
            )
        })
        .collect();
    Ok(format!("{label}: [{}] replicated", shape.join(" ")))
}

/// Stops node `id` (SIGTERM), optionally writes until a snapshot leaves it
/// behind, starts it on `binary` and waits until it is ready and caught up.
/// Whether it installed a snapshot.
async fn replace(
    cluster: &mut Cluster,
    flags: &Flags,
    id: u64,
    binary: Option<PathBuf>,
    snapshot: Option<(std::net::IpAddr, &str)>,
) -> anyhow::Result<bool> {
    flags.set_restarting(id, true);
    cluster.stop(id).await?;
    let leader = cluster.wait_leader(|l| l != id).await?;
    if let Some((ip, tag)) = snapshot {
        let index = cluster.status(leader).await?.commit_index;
        let via: Vec<u64> = cluster.running();
        write_past_snapshot(cluster, &via, leader, index, ip, tag).await?;
    }
    cluster.set_binary(id, binary)?;
    cluster.restart(id).await?;
    wait_ready(cluster, id).await?;
    let commit = cluster.status(leader).await?.commit_index;
    cluster.wait_applied(id, commit).await?;
    flags.set_restarting(id, false);
    Ok(cluster.stderr(id).contains("install_full_snapshot"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_from_format1_loses_no_write_and_no_request() -> anyhow::Result<()> {
    let Some(old) = old_binary()? else {
        return Ok(());
    };
    let started = Instant::now();
    let opts = ClusterOptions {
        binary: Some(old.clone()),
        // openraft's follower says when it installs a snapshot.
        log: "warn,openraft::engine::handler::following_handler=info".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start_with(NODES as usize, opts).await?;
    let mut versions: BTreeMap<u64, &str> = cluster.ids().iter().map(|&id| (id, "old")).collect();
    let stable = ["s1", "s2"];
    let backends = cluster
        .http_backends(&["s1", "s2", "churn"], BACKEND_PORT)
        .await?;
    let churn_ip = backends[2].addr().ip();
    cluster
        .http_group(1, "traffic", WEB_PORT, BACKEND_PORT, &backends[..2])
        .await?;
    cluster
        .admin(1)
        .create_group(&json!({"name": "bulk", "services": [{"port": SHARED_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}]}))
        .await?;
    for id in cluster.ids() {
        wait_serving(cluster.data_addr(id, WEB_PORT), &host("traffic"), &stable).await?;
    }

    let flags = Arc::new(Flags::default());
    let traffic: Vec<Arc<NodeTraffic>> = cluster
        .ids()
        .iter()
        .map(|_| Arc::new(NodeTraffic::default()))
        .collect();
    let mut loops = Vec::new();
    for id in cluster.ids() {
        for keep_alive in [true, false] {
            loops.push(tokio::spawn(request_loop(
                id,
                cluster.data_addr(id, WEB_PORT),
                keep_alive,
                flags.clone(),
                traffic[(id - 1) as usize].clone(),
            )));
        }
    }
    let writes = Arc::new(Writes::default());
    let admins: Vec<AdminClient> = cluster.ids().iter().map(|&id| cluster.admin(id)).collect();
    loops.push(tokio::spawn(writer(
        admins,
        churn_ip.to_string(),
        flags.clone(),
        writes.clone(),
    )));
    poll(
        "traffic and writes to run",
        Duration::from_secs(20),
        || async {
            ensure!(traffic.iter().all(|t| t.ok.load(Ordering::SeqCst) >= 20));
            ensure!(writes.acked().len() >= 6);
            Ok(())
        },
    )
    .await?;

    let mut report = vec![replicate_across(&cluster, &versions, "start").await?];
    let new: Option<PathBuf> = None;
    // Step 1: the leader, caught up by a snapshot of an old leader.
    let first = cluster.leader().await?;
    let installed = replace(
        &mut cluster,
        &flags,
        first,
        new.clone(),
        Some((churn_ip, "snap1")),
    )
    .await?;
    ensure!(
        installed,
        "node {first} (new) did not install the old leader's snapshot:\n{}",
        cluster.stderr(first)
    );
    versions.insert(first, "new");
    report.push(replicate_across(&cluster, &versions, "step1").await?);

    // Step 2: the leader now (old), through an election among old and new.
    let second = cluster.wait_leader(|l| l != first).await?;
    replace(&mut cluster, &flags, second, new.clone(), None).await?;
    versions.insert(second, "new");
    report.push(replicate_across(&cluster, &versions, "step2").await?);

    // Step 3: the last old node, caught up once more as old by a new
    // leader's snapshot, then upgraded.
    let last = *versions
        .iter()
        .find(|(_, v)| **v == "old")
        .context("no old node left")?
        .0;
    let installed = replace(
        &mut cluster,
        &flags,
        last,
        Some(old),
        Some((churn_ip, "snap3")),
    )
    .await?;
    ensure!(
        installed,
        "node {last} (old) did not install the new leader's snapshot:\n{}",
        cluster.stderr(last)
    );
    report.push(replicate_across(&cluster, &versions, "step3-old-again").await?);
    replace(&mut cluster, &flags, last, new, None).await?;
    versions.insert(last, "new");
    report.push(replicate_across(&cluster, &versions, "step3").await?);

    within("the loops to stop", Duration::from_secs(30), async {
        flags.stop.store(true, Ordering::SeqCst);
        for l in loops {
            let _ = l.await;
        }
    })
    .await?;

    // No acknowledged write lost: every node holds exactly what the
    // history leaves, and a linearizable read agrees.
    let lost = writes
        .lost
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    ensure!(lost.is_empty(), "writes never acknowledged: {lost:?}");
    let acked = writes.acked();
    let want = expected_instances(&acked, &stable);
    for id in cluster.ids() {
        let admin = cluster.admin(id);
        poll(
            &format!("node {id} to hold the acknowledged instances"),
            Duration::from_secs(20),
            || async {
                let have = traffic_instances(&admin).await?;
                ensure!(have == want, "have {have:?}, want {want:?}");
                Ok(())
            },
        )
        .await?;
    }
    let (s, v) = cluster
        .admin(1)
        .get("/v1/services/traffic?consistent=true")
        .await?;
    ensure!(s == StatusCode::OK, "consistent read: {s} {v}");
    let consistent: BTreeSet<String> = v["data"]["service_groups"][0]["instances"]
        .as_array()
        .context("instances")?
        .iter()
        .filter_map(|i| i["name"].as_str().map(ToOwned::to_owned))
        .collect();
    ensure!(
        consistent == want,
        "consistent read {consistent:?}, want {want:?}"
    );

    // No request failed on a node that was not restarting.
    let mut failures = Vec::new();
    for (i, t) in traffic.iter().enumerate() {
        failures.extend(
            t.failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        );
        eprintln!(
            "node {}: {} requests answered 200, {} failed, {} refused while it restarted",
            i + 1,
            t.ok.load(Ordering::SeqCst),
            t.failed.load(Ordering::SeqCst),
            t.while_restarting.load(Ordering::SeqCst)
        );
    }
    let retried = acked.iter().filter(|w| w.attempts > 1).count();
    eprintln!(
        "{} writes acknowledged ({retried} after a retry) during the roll; {}; took {:?}",
        acked.len(),
        report.join("; "),
        started.elapsed()
    );
    ensure!(
        traffic.iter().all(|t| t.failed.load(Ordering::SeqCst) == 0),
        "requests failed outside a node's own restart: {failures:?}"
    );
    drop(backends);
    Ok(())
}
