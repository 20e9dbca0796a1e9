//! Multi-node acceptance tests (SPEC §5, §6 cluster routes, §9): real
//! `edgelb` processes that replicate their state with Raft, and the faults
//! a production cluster sees — a leader killed with SIGKILL, a node
//! restarted from its data dir, the whole cluster restarted, a lost quorum,
//! a node joining late, more nodes than voters, and an outsider on the
//! cluster port.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use edgelb::cluster::Forward;
use edgelb_api::cluster::Role;
use http::StatusCode;
use integration::cluster::{attach, get_once, tally, wait_serving};
use integration::quic::{ClientCert, Outcome, frame_request, try_raft_stream};
use integration::stats::{chi_square_uniform, critical_1e4};
use integration::{AdminClient, Cluster, ClusterOptions, poll};
use raft_store::command::Command;
use serde_json::{Value, json};

/// The port published by the groups that carry test traffic.
const WEB_PORT: u16 = 8080;
/// A port shared (by `Host`) by the many small groups a test writes.
const SHARED_PORT: u16 = 8081;
/// Where backends listen.
const BACKEND_PORT: u16 = 9000;

/// The default fqdn of group `name` (`cluster_domain` is `edgelb.local`).
fn host(name: &str) -> String {
    format!("{name}.edgelb.local")
}

/// `POST /v1/services` body of an HTTP group on [`SHARED_PORT`].
fn shared_group(name: &str) -> Value {
    json!({
        "name": name,
        "services": [{"port": SHARED_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
    })
}

/// What a node's local state holds: group name → its instances'
/// `(name, address)`.
type Contents = BTreeMap<String, BTreeSet<(String, String)>>;

fn contents(groups: &[Value]) -> anyhow::Result<Contents> {
    let mut out = Contents::new();
    for g in groups {
        let name = g["name"].as_str().context("group without name")?;
        let mut instances = BTreeSet::new();
        for i in g["instances"].as_array().into_iter().flatten() {
            instances.insert((
                i["name"]
                    .as_str()
                    .context("instance without name")?
                    .to_owned(),
                i["address"]
                    .as_str()
                    .context("instance without address")?
                    .to_owned(),
            ));
        }
        out.insert(name.to_owned(), instances);
    }
    Ok(out)
}

/// Node's local (non-linearizable) contents.
async fn local_contents(admin: &AdminClient) -> anyhow::Result<Contents> {
    contents(&admin.groups(false).await?)
}

/// Waits until `admin`'s local state equals `want`.
async fn wait_contents(admin: &AdminClient, want: &Contents) -> anyhow::Result<()> {
    poll(
        &format!("{} to hold the expected groups", admin.addr),
        Duration::from_secs(30),
        || async {
            let have = local_contents(admin).await?;
            if &have == want {
                return Ok(());
            }
            let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
                .map(|(k, _)| k)
                .collect();
            let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
            bail!("missing {missing:?}, different {differ:?}, unexpected {extra:?}")
        },
    )
    .await
}

/// Waits until `admin`'s local state has every group of `names`.
async fn wait_has_groups(admin: &AdminClient, names: &[String]) -> anyhow::Result<()> {
    poll(
        &format!("{} to hold {} groups", admin.addr, names.len()),
        Duration::from_secs(30),
        || async {
            let have = local_contents(admin).await?;
            let missing: Vec<_> = names.iter().filter(|n| !have.contains_key(*n)).collect();
            ensure!(missing.is_empty(), "missing {missing:?}");
            Ok(())
        },
    )
    .await
}

/// Asserts that sequential requests to `addr` were spread over every one of
/// `backends`, uniformly (chi-square, wrong once in 10,000 runs).
async fn assert_balanced(
    addr: std::net::SocketAddr,
    host: &str,
    backends: &[&str],
    n: usize,
) -> anyhow::Result<()> {
    let counts = tally(addr, host, n).await?;
    let per: Vec<usize> = backends
        .iter()
        .map(|b| counts.get(*b).copied().unwrap_or(0))
        .collect();
    ensure!(
        per.iter().sum::<usize>() == n,
        "{addr}: answers from unknown backends: {counts:?}"
    );
    let chi = chi_square_uniform(&per);
    ensure!(
        per.iter().all(|&c| c > 0) && chi < critical_1e4(backends.len() - 1),
        "{addr}: not balanced over {backends:?}: {counts:?} (chi-square {chi:.1})"
    );
    Ok(())
}

/// The other ids of `ids`.
fn others(ids: &[u64], not: &[u64]) -> Vec<u64> {
    ids.iter().copied().filter(|i| !not.contains(i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_writes_sent_to_a_follower() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let follower = others(&cluster.ids(), &[leader])[0];
    let backends = cluster
        .http_backends(&["a", "b", "c"], BACKEND_PORT)
        .await?;
    let names = ["a", "b", "c"];
    let group = cluster
        .http_group(follower, "web", WEB_PORT, BACKEND_PORT, &backends)
        .await?;

    // The follower answered after applying: its own read has it at once.
    let mine = local_contents(&cluster.admin(follower)).await?;
    assert_eq!(
        mine.get("web").map(BTreeSet::len),
        Some(3),
        "the follower acknowledged writes it had not applied: {mine:?}"
    );

    // A linearizable read on the other follower sees it without waiting.
    let other = others(&cluster.ids(), &[leader, follower])[0];
    let theirs = contents(&cluster.admin(other).groups(true).await?)?;
    assert_eq!(
        theirs, mine,
        "?consistent=true on node {other} missed the write"
    );

    let want = mine;
    for id in cluster.ids() {
        let admin = cluster.admin(id);
        wait_contents(&admin, &want).await?;
        let (status, v) = admin.get(&format!("/v1/services/{}", group.uuid)).await?;
        assert_eq!(status, StatusCode::OK, "node {id}: {v}");
        assert_eq!(v["data"]["service_groups"][0]["name"], "web", "node {id}");
        let addr = cluster.data_addr(id, WEB_PORT);
        // The follower that answered routes by the writes already.
        if id != follower {
            wait_serving(addr, &host("web"), &names).await?;
        }
        assert_balanced(addr, &host("web"), &names, 60).await?;
    }
    Ok(())
}

/// Counts of a background loop.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicUsize,
    failed: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() < 10 {
            f.push(what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_elects_a_new_leader_and_loses_no_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let old = cluster.leader().await?;
    let followers = others(&cluster.ids(), &[old]);
    let backends = cluster.http_backends(&["t1", "t2"], BACKEND_PORT).await?;
    let traffic_backends = ["t1", "t2"];
    cluster
        .http_group(followers[0], "traffic", WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    let data_planes: Vec<_> = followers
        .iter()
        .map(|&f| cluster.data_addr(f, WEB_PORT))
        .collect();
    // followers[0] answered the writes and routes by them already.
    wait_serving(data_planes[1], &host("traffic"), &traffic_backends).await?;

    // K acknowledged groups with an instance each, through every node.
    let instance_ip = backends[0].addr().ip();
    let mut acked = Vec::new();
    for i in 0..6 {
        let via = cluster.admin(cluster.ids()[i % 3]);
        let name = format!("acked-{i}");
        let g = via.create_group(&shared_group(&name)).await?;
        attach(&via, &g.uuid, "i", instance_ip).await?;
        acked.push(name);
    }

    // Client traffic through both followers' data planes, for the whole
    // scenario.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Counts::default());
    let traffic_task = tokio::spawn({
        let (stop, counts, addrs) = (stop.clone(), traffic.clone(), data_planes.clone());
        async move {
            let mut n = 0_usize;
            while !stop.load(Ordering::SeqCst) {
                let addr = addrs[n % addrs.len()];
                n += 1;
                match get_once(addr, "traffic.edgelb.local").await {
                    Ok((200, Some(_))) => {
                        counts.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => counts.fail(format!("{addr}: {other:?}")),
                }
            }
        }
    });
    // Writes through a surviving follower, also while the leader dies.
    let writes = Arc::new(Counts::default());
    let written = Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let writer_task = tokio::spawn({
        let (stop, counts, written) = (stop.clone(), writes.clone(), written.clone());
        let admin = cluster.admin(followers[0]);
        async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("during-{i}");
                i += 1;
                match admin.post("/v1/services", &shared_group(&name)).await {
                    Ok((s, _)) if s.is_success() => {
                        counts.ok.fetch_add(1, Ordering::SeqCst);
                        written
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((name, Instant::now()));
                    }
                    // Unacknowledged: may or may not be there.
                    other => counts.fail(format!("{name}: {other:?}")),
                }
            }
        }
    });
    poll(
        "traffic and writes to run",
        Duration::from_secs(20),
        || async {
            ensure!(
                traffic.ok.load(Ordering::SeqCst) >= 20 && writes.ok.load(Ordering::SeqCst) >= 3
            );
            Ok(())
        },
    )
    .await?;

    let killed_at = Instant::now();
    cluster.kill9(old).await?;
    let new = cluster.wait_leader(|l| l != old).await?;
    let elected_in = killed_at.elapsed();

    // Writes resume: retried until one is acknowledged (409: an earlier
    // attempt that timed out was committed after all).
    let via = cluster.admin(followers[1]);
    poll(
        "a write after the kill",
        Duration::from_secs(20),
        || async {
            let (s, v) = via
                .post("/v1/services", &shared_group("after-kill"))
                .await?;
            ensure!(
                s.is_success() || s == StatusCode::CONFLICT,
                "answered {s} {v}"
            );
            Ok(())
        },
    )
    .await?;
    acked.push("after-kill".to_owned());
    let resumed_in = killed_at.elapsed();
    let traffic_at_election = traffic.ok.load(Ordering::SeqCst);
    poll(
        "the background writer and the traffic to go on after the election",
        Duration::from_secs(20),
        || async {
            let late_write = written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|(_, at)| *at > killed_at + elected_in);
            ensure!(late_write, "no write acknowledged since the election");
            ensure!(traffic.ok.load(Ordering::SeqCst) >= traffic_at_election + 20);
            Ok(())
        },
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    integration::within("the loops to stop", Duration::from_secs(15), async {
        let _ = traffic_task.await;
        let _ = writer_task.await;
    })
    .await?;

    acked.extend(
        written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(n, _)| n.clone()),
    );
    eprintln!(
        "leader {old} killed; node {new} elected after {elected_in:?}, writes resumed after \
         {resumed_in:?}; {} writes acknowledged, {} not; {} requests served",
        writes.ok.load(Ordering::SeqCst),
        writes.failed.load(Ordering::SeqCst),
        traffic.ok.load(Ordering::SeqCst),
    );
    // Linearizable on one survivor, then every survivor's own copy.
    let consistent = contents(&cluster.admin(new).groups(true).await?)?;
    let lost: Vec<_> = acked
        .iter()
        .filter(|n| !consistent.contains_key(*n))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {lost:?}\n{}",
        cluster.logs()
    );
    for id in cluster.running() {
        wait_has_groups(&cluster.admin(id), &acked).await?;
        let have = local_contents(&cluster.admin(id)).await?;
        for name in acked.iter().filter(|n| n.starts_with("acked-")) {
            assert_eq!(have[name].len(), 1, "node {id}: {name} lost its instance");
        }
    }
    let failures = traffic
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert_eq!(
        traffic.failed.load(Ordering::SeqCst),
        0,
        "the data plane failed requests while the leader died: {failures:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_restarts_and_catches_up() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let old = cluster.leader().await?;
    let backends = cluster.http_backends(&["k1"], BACKEND_PORT).await?;
    let ip = backends[0].addr().ip();
    for i in 0..3 {
        let admin = cluster.admin(old);
        let g = admin
            .create_group(&shared_group(&format!("before-{i}")))
            .await?;
        attach(&admin, &g.uuid, "k1", ip).await?;
    }

    cluster.kill9(old).await?;
    let new = cluster.wait_leader(|l| l != old).await?;
    let survivor = cluster.admin(others(&cluster.running(), &[new])[0]);
    // The first write after the election may need a retry (409: it was
    // committed after all).
    poll(
        "a write after the kill",
        Duration::from_secs(20),
        || async {
            let (s, v) = survivor
                .post("/v1/services", &shared_group("down-0"))
                .await?;
            ensure!(
                s.is_success() || s == StatusCode::CONFLICT,
                "answered {s} {v}"
            );
            Ok(())
        },
    )
    .await?;
    attach(&survivor, "down-0", "k1", ip).await?;
    for i in 1..20 {
        let g = survivor
            .create_group(&shared_group(&format!("down-{i}")))
            .await?;
        attach(&survivor, &g.uuid, "k1", ip).await?;
    }
    let want = local_contents(&survivor).await?;

    cluster.restart(old).await?;
    let target = cluster.status(new).await?.commit_index;
    cluster.wait_applied(old, target).await?;
    let admin = cluster.admin(old);
    wait_contents(&admin, &want).await?;
    cluster.wait_converged(3, 0).await?;
    let view = cluster.status(old).await?;
    assert!(view.applied_index >= target, "{view:?}");
    for name in ["before-0", "down-0", "down-19"] {
        wait_serving(cluster.data_addr(old, SHARED_PORT), &host(name), &["k1"]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_state() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let backends = cluster.http_backends(&["r1", "r2"], BACKEND_PORT).await?;
    let names = ["r1", "r2"];
    cluster
        .http_group(1, "web", WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    for i in 0..5 {
        let admin = cluster.admin(u64::try_from(i % 3 + 1)?);
        let g = admin.create_group(&shared_group(&format!("g-{i}"))).await?;
        attach(&admin, &g.uuid, names[i % 2], backends[i % 2].addr().ip()).await?;
    }
    let leader = cluster.leader().await?;
    let want = contents(&cluster.admin(leader).groups(true).await?)?;
    assert_eq!(want.len(), 6, "{want:?}");

    for id in cluster.ids() {
        cluster.stop(id).await?;
    }
    cluster.restart_all(&cluster.ids()).await?;
    cluster.wait_converged(3, 0).await?;

    for id in cluster.ids() {
        wait_contents(&cluster.admin(id), &want).await?;
        let web = cluster.data_addr(id, WEB_PORT);
        wait_serving(web, &host("web"), &names).await?;
        assert_balanced(web, &host("web"), &names, 30).await?;
        for i in 0..5 {
            let (status, backend) =
                get_once(cluster.data_addr(id, SHARED_PORT), &host(&format!("g-{i}"))).await?;
            assert_eq!(
                (status, backend.as_deref()),
                (200, Some(names[i % 2])),
                "node {id}, g-{i}"
            );
        }
    }
    // And the restarted cluster takes writes.
    cluster
        .admin(cluster.ids()[2])
        .create_group(&shared_group("after-restart"))
        .await?;
    Ok(())
}

/// A lone voter that restarts commits nothing until its next write: its
/// status goes on reporting the commit index it stopped at, never one below
/// what it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_lone_node_reports_the_commit_index_it_stopped_at() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    cluster
        .admin(1)
        .create_group(&shared_group("before"))
        .await?;
    let before = cluster.status(1).await?;
    assert_eq!(before.commit_index, before.applied_index, "{before:?}");
    cluster.stop(1).await?;
    cluster.restart(1).await?;
    cluster.wait_applied(1, before.applied_index).await?;
    let after = cluster.status(1).await?;
    assert_eq!(
        (after.commit_index, after.applied_index),
        (before.commit_index, before.applied_index),
        "{after:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_quorum_write_fails_fast_and_data_plane_keeps_serving() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let backends = cluster.http_backends(&["q1", "q2"], BACKEND_PORT).await?;
    let names = ["q1", "q2"];
    cluster
        .http_group(leader, "web", WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    // The survivor is a follower: cut off from the leader and from a quorum.
    let survivor = others(&cluster.ids(), &[leader])[0];
    let addr = cluster.data_addr(survivor, WEB_PORT);
    wait_serving(addr, &host("web"), &names).await?;

    for id in others(&cluster.ids(), &[survivor]) {
        cluster.stop(id).await?;
    }
    let admin = cluster.admin(survivor);

    let started = Instant::now();
    let r = admin
        .request(
            http::Method::POST,
            "/v1/services",
            Some(&shared_group("no-quorum")),
        )
        .await?;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(took < Duration::from_secs(6), "the write took {took:?}");
    let v = r.json();
    assert_eq!(v["status"], "error", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v["errors"][0]["status"], 503, "{v}");

    // A linearizable read cannot be served either, and fails as fast.
    let started = Instant::now();
    let (status, v) = admin.get("/v1/services?consistent=true").await?;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(took < Duration::from_secs(6), "the read took {took:?}");

    // The data plane and local reads go on.
    let counts = tally(addr, &host("web"), 20).await?;
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    let ready = admin.request(http::Method::GET, "/readyz", None).await?;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    let groups = local_contents(&admin).await?;
    assert!(
        groups.contains_key("web") && !groups.contains_key("no-quorum"),
        "{groups:?}"
    );

    // With its peers back the cluster takes writes again; the refused one
    // never had a leader to reach and stays absent.
    cluster
        .restart_all(&others(&cluster.ids(), &[survivor]))
        .await?;
    cluster.wait_converged(3, 0).await?;
    admin.create_group(&shared_group("quorum-again")).await?;
    let groups = contents(&admin.groups(true).await?)?;
    assert!(
        groups.contains_key("quorum-again") && !groups.contains_key("no-quorum"),
        "{groups:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_through_a_snapshot() -> anyhow::Result<()> {
    // openraft's follower says when it installs a snapshot; the rest stays
    // at warn.
    let opts = ClusterOptions {
        log: "warn,openraft::engine::handler::following_handler=info".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start_with(1, opts).await?;
    let backends = cluster.http_backends(&["s1", "s2"], BACKEND_PORT).await?;
    let admin = cluster.admin(1);
    let group = cluster
        .http_group(1, "churn", WEB_PORT, BACKEND_PORT, &[])
        .await?;

    // Rounds of 8 writers × 16 attach/detach pairs until the leader has
    // snapshotted (every 500 log entries) and so purged the log behind its
    // snapshot. Concurrent writes share log entries, so how many writes
    // that takes depends on how they were batched. Bounded: 32 rounds.
    let started = Instant::now();
    for round in 0.. {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let (admin, group, ip) = (admin.clone(), group.clone(), cluster.backend_ip());
            tasks.push(tokio::spawn(async move {
                for j in 0..16 {
                    let name = format!("w{w}-{round}-{j}");
                    attach(&admin, &group.uuid, &name, ip).await?;
                    let (s, v) = admin
                        .delete(&format!("/v1/services/{}/instances/{name}", group.uuid))
                        .await?;
                    ensure!(s.is_success(), "detaching {name}: {s} {v}");
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let at = cluster.metric(1, "edgelb_raft_snapshot_index").await?;
        if at >= 500.0 {
            break;
        }
        ensure!(
            round < 32,
            "no snapshot after {} rounds of writes (edgelb_raft_snapshot_index {at})",
            round + 1
        );
    }
    for b in &backends {
        attach(&admin, &group.uuid, b.name(), b.addr().ip()).await?;
    }
    let wrote_in = started.elapsed();
    let founder = cluster.status(1).await?;
    let founder_snapshot = poll(
        "the founder to snapshot",
        Duration::from_secs(20),
        || async {
            let at = cluster.metric(1, "edgelb_raft_snapshot_index").await?;
            ensure!(at >= 500.0, "edgelb_raft_snapshot_index {at}");
            Ok(at)
        },
    )
    .await?;

    let want = local_contents(&admin).await?;
    let joined = cluster.add_members(1).await?[0];
    // One voter and one learner: two voters would be less available.
    cluster.wait_converged(1, 1).await?;
    cluster.wait_applied(joined, founder.commit_index).await?;
    wait_contents(&cluster.admin(joined), &want).await?;
    let snapshot = cluster.metric(joined, "edgelb_raft_snapshot_index").await?;
    assert!(
        snapshot > 0.0,
        "node {joined} caught up without a snapshot (edgelb_raft_snapshot_index {snapshot})"
    );
    let log = cluster.stderr(joined);
    assert!(
        log.contains("install_full_snapshot"),
        "node {joined} did not install a snapshot; its log:\n{log}"
    );
    eprintln!(
        "{} entries written in {wrote_in:?}; founder snapshot at {founder_snapshot}, \
         the joiner's at {snapshot}",
        founder.commit_index
    );
    let addr = cluster.data_addr(joined, WEB_PORT);
    wait_serving(addr, &host("churn"), &["s1", "s2"]).await?;
    assert_balanced(addr, &host("churn"), &["s1", "s2"], 30).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_nodes_make_five_voters_and_two_learners() -> anyhow::Result<()> {
    let cluster = Cluster::start(7).await?;
    // Six nodes joined at once: their promotions were made one at a time.
    cluster.ensure_no_errors()?;
    let mut leaders = 0.0;
    for id in cluster.ids() {
        let view = cluster.status(id).await?;
        assert_eq!(
            (view.voters(), view.learners(), view.nodes.len()),
            (5, 2, 7),
            "node {id}: {view:?}"
        );
        let scrape = cluster.admin(id).scrape().await?;
        assert_eq!(scrape.sum("edgelb_raft_voters", &[]), 5.0, "node {id}");
        assert_eq!(scrape.sum("edgelb_raft_learners", &[]), 2.0, "node {id}");
        leaders += scrape.sum("edgelb_raft_is_leader", &[]);
    }
    assert_eq!(leaders, 1.0, "edgelb_raft_is_leader summed over the nodes");
    // Written through a learner, served by everyone.
    let view = cluster.status(1).await?;
    let learner = view
        .nodes
        .iter()
        .find(|n| n.role == Role::Learner)
        .map(|n| n.node_id)
        .context("no learner")?;
    let backends = cluster.http_backends(&["v1", "v2"], BACKEND_PORT).await?;
    cluster
        .http_group(learner, "web", WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    // The learner answered, so it routes by the writes at once.
    for id in cluster.ids() {
        if id != learner {
            wait_serving(cluster.data_addr(id, WEB_PORT), &host("web"), &["v1", "v2"]).await?;
        }
        assert_balanced(
            cluster.data_addr(id, WEB_PORT),
            &host("web"),
            &["v1", "v2"],
            20,
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_cluster_certificate_cannot_speak_raft() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let admin = cluster.admin(1);
    admin.create_group(&shared_group("victim")).await?;
    let term = cluster.metric(1, "edgelb_raft_term").await?;

    // What a member could ask: the leader deletes a group for it; and a
    // vote request that would depose the leader if it were heard.
    let delete = serde_json::to_value(Forward::Write(Command::DeleteGroup {
        id: "victim".into(),
        force: true,
    }))?;
    let vote = json!({
        "vote": {"leader_id": {"term": 1000, "node_id": 9}, "committed": false},
        "last_log_id": {"leader_id": {"term": 1000, "node_id": 9}, "index": 1_000_000},
    });
    let attempts: [(&str, Option<ClientCert>, u64); 3] = [
        ("no client certificate", None, 1),
        (
            "a self-signed certificate for node-9.cluster.edgelb",
            Some(ClientCert::self_signed("node-9.cluster.edgelb")?),
            9,
        ),
        (
            "a certificate for node-1.cluster.edgelb from another CA",
            Some(ClientCert::from_foreign_ca("node-1.cluster.edgelb")?),
            1,
        ),
    ];
    let node = cluster.cluster_addr(1);
    let name = "node-1.cluster.edgelb";
    for (what, cert, from) in &attempts {
        for (rpc, body) in [("forward", &delete), ("vote", &vote)] {
            let cert = cert.as_ref().map(ClientCert::duplicate);
            let request = frame_request(*from, rpc, body);
            let source = cluster.backend_ip();
            match try_raft_stream(node, source, name, cert, &request).await? {
                Outcome::Refused(why) => eprintln!("{what}, {rpc}: refused: {why}"),
                other => panic!("{what}: the node did not refuse a {rpc} RPC: {other:?}"),
            }
        }
    }

    // The same client with the node's own credentials is heard (a harmless
    // request), so the refusals above were the certificates' doing.
    let tls = cluster.data_dir(1).join("tls");
    let member = ClientCert::from_pem_files(&tls.join("node.pem"), &tls.join("node.key"))?;
    let linearize = serde_json::to_value(Forward::Linearize)?;
    let request = frame_request(1, "forward", &linearize);
    let source = cluster.backend_ip();
    match try_raft_stream(node, source, name, Some(member), &request).await? {
        Outcome::Answered(reply) => {
            let text = String::from_utf8_lossy(reply.get(4..).unwrap_or_default()).into_owned();
            assert!(text.contains("linearized"), "{text}");
        }
        other => panic!("a member's certificate was not heard: {other:?}"),
    }

    // The node is unharmed: the group is there, the term unchanged, and a
    // write succeeds.
    let groups = contents(&admin.groups(true).await?)?;
    assert!(groups.contains_key("victim"), "{groups:?}");
    assert_eq!(cluster.metric(1, "edgelb_raft_term").await?, term);
    admin.create_group(&shared_group("after")).await?;
    assert_eq!(cluster.status(1).await?.leader_id, Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_as_the_leader_dies_lands_on_the_new_leader() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let old = cluster.leader().await?;
    let follower = others(&cluster.ids(), &[old])[0];
    let admin = cluster.admin(follower);
    // The follower has a connection to the leader.
    admin.create_group(&shared_group("before")).await?;

    let killed_at = Instant::now();
    cluster.kill9(old).await?;
    let write = tokio::spawn({
        let admin = admin.clone();
        async move { admin.post("/v1/services", &shared_group("in-flight")).await }
    });
    let new = cluster.wait_leader(|l| l != old).await?;
    let elected_in = killed_at.elapsed();
    let (status, v) = write.await??;
    let answered_in = killed_at.elapsed();
    assert!(
        status.is_success(),
        "a write sent to node {follower} as leader {old} died answered {status} after \
         {answered_in:?}, though node {new} was elected after {elected_in:?}: {v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_through_a_follower_concurrently() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let follower = others(&cluster.ids(), &[leader])[0];
    let joined = cluster.add_members_via(Some(follower), 2).await?;
    cluster.wait_converged(5, 0).await?;
    let backends = cluster.http_backends(&["j1"], BACKEND_PORT).await?;
    cluster
        .http_group(joined[1], "web", WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    for id in cluster.ids() {
        // The node that answered routes by the writes at once.
        if id != joined[1] {
            wait_serving(cluster.data_addr(id, WEB_PORT), &host("web"), &["j1"]).await?;
        }
        assert_eq!(
            get_once(cluster.data_addr(id, WEB_PORT), &host("web")).await?,
            (200, Some("j1".to_owned())),
            "node {id}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_with_leave_on_exit_removes_the_node_and_without_it_keeps_it() -> anyhow::Result<()>
{
    let opts = ClusterOptions {
        leave_on_exit: true,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start_with(3, opts).await?;
    cluster.wait_converged(3, 0).await?;
    let leader = cluster.leader().await?;
    let follower = others(&cluster.ids(), &[leader])[0];
    cluster.stop(follower).await?;
    let survivor = others(&cluster.ids(), &[follower])[0];
    poll(
        "the leaving node to be out of the membership",
        Duration::from_secs(10),
        || async {
            let view = cluster.status(survivor).await?;
            let gone = view.nodes.iter().all(|n| n.node_id != follower);
            ensure!(gone && view.voters() == 2, "membership: {view:?}");
            Ok(())
        },
    )
    .await?;
    // The two that stay still make a quorum: writes go on.
    let (status, body) = cluster
        .admin(survivor)
        .post(
            "/v1/services",
            &json!({"name": "after-leave", "services": [{"port": 18990, "destination_port": 80, "handlers": []}]}),
        )
        .await?;
    ensure!(
        status == StatusCode::OK,
        "write after a clean leave: {status} {body}"
    );
    Ok(())
}

/// Three nodes started one after another; the leader is killed the moment
/// the third answers `/readyz` 200. The third is a voter by then (the
/// leader promotes the two joiners together), so the other two elect a new
/// leader, within the `chaos` binary's limit doubled for a debug build on
/// a busy machine, as the suite's chaos subset allows (4 s; README: at
/// most 1.4 s on loopback, and 1.01–1.11 s in 18 rounds here, but a round
/// needed 2.03 s once under the suite's load). `EDGELB_READY_KILL_ROUNDS`
/// sets the number of rounds (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_as_the_third_node_turns_ready_leaves_a_quorum() -> anyhow::Result<()> {
    const LIMIT: Duration = Duration::from_secs(4);
    let rounds: usize = std::env::var("EDGELB_READY_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut took = Vec::new();
    for round in 0..rounds {
        let mut cluster = Cluster::start(1).await?;
        cluster.add_members(1).await?;
        let third = cluster.add_members(1).await?[0];
        let admin = cluster.admin(third);
        poll(
            "the third node's /readyz",
            Duration::from_secs(10),
            || async {
                let (status, body) = admin.get("/readyz").await?;
                ensure!(status == StatusCode::OK, "{status}: {body}");
                Ok(())
            },
        )
        .await?;
        let view = cluster.status(third).await?;
        let leader = view.leader_id.context("the third node knows no leader")?;
        ensure!(
            view.voters() == 3,
            "round {round}: node {third} answered /readyz with {} voter(s): {view:?}",
            view.voters()
        );
        cluster.kill9(leader).await?;
        let killed_at = Instant::now();
        let survivors = cluster.running();
        let elected = poll("a new leader", Duration::from_secs(10), || async {
            let mut agreed = None;
            for id in &survivors {
                let v = cluster.status(*id).await?;
                let l = v
                    .leader_id
                    .filter(|l| *l != leader && survivors.contains(l));
                ensure!(
                    l.is_some() && (agreed.is_none() || agreed == l),
                    "node {id}: {v:?}"
                );
                agreed = l;
            }
            agreed.context("no survivor")
        })
        .await
        .with_context(|| cluster.logs())?;
        let t = killed_at.elapsed();
        eprintln!("round {round}: node {elected} leads {t:?} after node {leader} was killed");
        if t > LIMIT / 2 {
            eprintln!("{}", cluster.logs());
        }
        took.push(t);
    }
    let worst = took.iter().max().copied().unwrap_or_default();
    assert!(worst <= LIMIT, "new leader after {took:?}");
    Ok(())
}

/// SPEC §5: a joining node that will be a voter is one before it is ready,
/// also when it catches up slower than the leader waits before answering
/// its join (3 s). One voter and one learner; the third node joins with its
/// cluster links cut, and they stay cut for 4 s after the leader has added
/// it (the fault's length: past the leader's wait). It turns ready as a
/// voter, and serves with three voters in its view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_that_catches_up_late_is_a_voter_before_it_is_ready() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(
        2,
        ClusterOptions {
            relay: Some(11),
            // The line that says in which role the node joined.
            log: "warn,edgelb::app=info".into(),
            ..ClusterOptions::default()
        },
    )
    .await?;
    let leader = cluster.leader().await?;
    let relay = cluster.relay().context("relay")?.clone();
    let third = cluster.ids().iter().max().copied().unwrap_or(0) + 1;
    let cut = integration::Link {
        up: false,
        ..integration::Link::default()
    };
    for id in cluster.ids() {
        relay.set(id, third, cut);
        relay.set(third, id, cut);
    }
    let admin = cluster.admin(leader);
    let heal = tokio::spawn(async move {
        poll(
            "the leader to add the third node",
            Duration::from_secs(30),
            || async {
                let view: edgelb_api::cluster::ClusterData =
                    serde_json::from_value(admin.get("/v1/cluster").await?.1["data"].clone())?;
                ensure!(
                    view.cluster.nodes.iter().any(|n| n.node_id == third),
                    "{view:?}"
                );
                Ok(())
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        relay.heal_all();
        anyhow::Ok(())
    });
    let joined = cluster.add_members(1).await?[0];
    heal.await??;
    assert_eq!(joined, third);
    // Its role as it turned ready (read later, the view could already show
    // a promotion by the leader's periodic pass).
    let log = cluster.stderr(third);
    assert!(
        log.contains("joined the cluster as a voter"),
        "node {third}'s log:\n{log}"
    );
    let view = cluster.status(third).await?;
    assert_eq!(view.voters(), 3, "node {third} serves with {view:?}");
    Ok(())
}

/// SIGTERM ends the node promptly when its peers are gone: once with
/// nothing pending, once while a write waits for a quorum that cannot come
/// (and a promotion may be under way). Nothing is in flight on the data
/// plane, so each exits 0 within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_promptly_when_the_peers_are_gone() -> anyhow::Result<()> {
    for pending_write in [false, true] {
        let mut cluster = Cluster::start(3).await?;
        let leader = cluster.leader().await?;
        for id in others(&cluster.ids(), &[leader]) {
            cluster.kill9(id).await?;
        }
        let write = pending_write.then(|| {
            let admin = cluster.admin(leader);
            tokio::spawn(async move {
                admin
                    .post(
                        "/v1/services",
                        &json!({"name": "late", "services": [{"port": 9001, "destination_port": 9000, "handlers": ["http"]}]}),
                    )
                    .await
            })
        });
        let (took, status) = cluster
            .terminate_timed(leader, Duration::from_secs(30))
            .await?;
        let code = status.and_then(|s| s.code());
        eprintln!("pending write {pending_write}: exit {code:?} after {took:?}");
        assert_eq!(
            code,
            Some(0),
            "pending write {pending_write}: {}",
            cluster.logs()
        );
        assert!(
            took <= integration::patient(Duration::from_secs(1)),
            "pending write {pending_write}: SIGTERM took {took:?}"
        );
        if let Some(w) = write {
            // A write that reached the node before the signal waits on a
            // quorum that cannot come: the stop answers it 503 at once
            // rather than holding the exit. One that came later found the
            // admin API closed.
            if let Ok(Ok((status, body))) = w.await {
                assert_eq!(
                    status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the pending write: {body}"
                );
            }
        }
    }
    Ok(())
}

/// Sleeps until the wall clock is half-way between two whole seconds, at
/// least 100 ms from now.
async fn mid_second() {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    let mut wait = (1500 - ms) % 1000;
    if wait < 100 {
        wait += 1000;
    }
    tokio::time::sleep(Duration::from_millis(u64::from(wait))).await;
}

/// An idle leader does not heartbeat a learner that holds the whole log and
/// the commit index (one voter, two learners, behind the link emulator).
/// After a write the leader heartbeats a learner that cannot be promoted
/// every 2 s until one heartbeat has settled it; once the leader is seen to
/// leave it alone for 3 s (one such period and more), it sends the learner,
/// over 12 s without writes, no more than one learner sends the other
/// (gossip only, which both links carry alike; learners never call each
/// other). The learners' Raft connections lapse meanwhile (10 s idle
/// timeout, no keep-alives to learners), yet the next write reaches both,
/// and so does one after a learner is killed and restarted, with the links
/// then 150 ms each way. (The count is taken without delay: over a
/// 300 ms round trip the gossip links' counts vary by as much as the
/// heartbeats add.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_leader_leaves_settled_learners_alone_and_they_still_get_every_write()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(
        3,
        ClusterOptions {
            max_voters: Some(1),
            relay: Some(7),
            ..ClusterOptions::default()
        },
    )
    .await?;
    let leader = cluster.leader().await?;
    let learners = others(&cluster.ids(), &[leader]);
    let backends = cluster
        .http_backends(&["q1", "q2", "q3"], BACKEND_PORT)
        .await?;
    let admin = cluster.admin(leader);
    let group = cluster
        .http_group(leader, "quiet", WEB_PORT, BACKEND_PORT, &backends[..1])
        .await?;
    // Applied everywhere, with no request sent: every gossip report is the
    // empty one, on both links compared.
    let index = cluster.status(leader).await?.commit_index;
    for id in cluster.ids() {
        cluster.wait_applied(id, index).await?;
    }
    let relay = cluster.relay().context("behind the relay")?;
    let (a, b) = (learners[0], learners[1]);
    let count = || {
        (
            relay.stats(leader, a).delivered,
            relay.stats(a, b).delivered,
        )
    };
    // The write's last datagrams, and the heartbeats that settle the
    // learner, come after the write is applied: at most 2 s apart until
    // one settles it (the first may go before its answer to the write is
    // in), later when a call times out on a loaded machine. So the count
    // starts once the leader has sent the learner nothing beyond gossip
    // for 3 s. Counts are read half-way between whole seconds, as idle
    // nodes gossip on whole seconds of the wall clock
    // (gossip::SendSchedule): no read falls between a report sent on one
    // link and its like on the other, or its acknowledgement.
    let settled_by = Instant::now() + integration::patient(Duration::from_secs(30));
    let mut marks = std::collections::VecDeque::new();
    let before = loop {
        mid_second().await;
        marks.push_back(count());
        if marks.len() > 4 {
            marks.pop_front();
        }
        if let (4, Some(first), Some(last)) = (marks.len(), marks.front(), marks.back())
            && last.0 - first.0 == last.1 - first.1
        {
            break *last;
        }
        ensure!(
            Instant::now() < settled_by,
            "the idle leader never left learner {a} alone for 3 s: {marks:?} \
             (leader to it, learner to learner)"
        );
    };
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(11_500)).await;
    mid_second().await;
    let after = count();
    let window = start.elapsed();
    let (to_learner, between_learners) = (after.0 - before.0, after.1 - before.1);
    eprintln!(
        "over {window:?}: leader to learner {to_learner} datagrams, learner to learner {between_learners}"
    );
    // Gossip alike on both links: a heartbeat (its call, and the
    // acknowledgement of its answer) adds 2, so one every 2 s (the period
    // of a learner that cannot be promoted) about 12; what is allowed is
    // the links' own noise on a loaded machine (a QUIC probe or keep-alive
    // more on one of them: up to 3 was seen under load), less than three
    // heartbeats.
    ensure!(
        to_learner <= between_learners + 5,
        "the idle leader kept calling a settled learner: {to_learner} datagrams to it, \
         {between_learners} between the learners, over {window:?}"
    );

    relay.delay_all(Duration::from_millis(150), Duration::from_millis(5));
    attach(&admin, &group.uuid, "q2", backends[1].addr().ip()).await?;
    for id in cluster.ids() {
        wait_serving(
            cluster.data_addr(id, WEB_PORT),
            &host("quiet"),
            &["q1", "q2"],
        )
        .await?;
    }
    cluster.kill9(a).await?;
    cluster.restart(a).await?;
    // Before any further write: what it served before the kill (its file,
    // or the commit index the leader tells it again once it is back).
    wait_serving(
        cluster.data_addr(a, WEB_PORT),
        &host("quiet"),
        &["q1", "q2"],
    )
    .await?;
    attach(&admin, &group.uuid, "q3", backends[2].addr().ip()).await?;
    for id in cluster.ids() {
        wait_serving(
            cluster.data_addr(id, WEB_PORT),
            &host("quiet"),
            &["q1", "q2", "q3"],
        )
        .await?;
    }
    Ok(())
}

/// A node joining while the leader cannot reach it answers on its admin
/// port while it waits (nothing answered there before the join was
/// applied, so a probe hung until its own timeout): `/healthz` 200 once
/// its Raft core runs, `/readyz` 503 saying that it is joining, `/v1` 401
/// without the token and 503 with it. Once the link heals it joins and
/// turns ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_answers_its_probes_while_it_waits() -> anyhow::Result<()> {
    let opts = ClusterOptions {
        relay: Some(31),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start_with(1, opts).await?;
    let founder = cluster.leader().await?;
    // What the founder sends to the joiner is lost until healed.
    let joiner = founder + 1;
    let relay = cluster.relay().context("relay")?;
    relay.update(founder, joiner, |l| l.up = false);
    let ids = cluster.launch_members_via(Some(founder), 1).await?;
    ensure!(ids == [joiner], "launched {ids:?}");
    let admin = cluster.admin(joiner);
    poll(
        "/readyz to say that the node is joining",
        Duration::from_secs(30),
        || async {
            let r = admin.request(http::Method::GET, "/readyz", None).await?;
            ensure!(
                r.status == StatusCode::SERVICE_UNAVAILABLE
                    && r.text().contains("joining the cluster"),
                "{}: {}",
                r.status,
                r.text()
            );
            Ok(())
        },
    )
    .await?;
    let r = admin.request(http::Method::GET, "/healthz", None).await?;
    ensure!(
        r.status == StatusCode::OK,
        "/healthz: {}: {}",
        r.status,
        r.text()
    );
    let r = admin
        .request_as(http::Method::GET, "/v1/services", None, None)
        .await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "no token: {}",
        r.status
    );
    let r = admin
        .request(http::Method::GET, "/v1/services", None)
        .await?;
    ensure!(
        r.status == StatusCode::SERVICE_UNAVAILABLE
            && r.text().contains("\"status\":\"error\"")
            && r.headers.contains_key(http::header::RETRY_AFTER),
        "with the token: {}: {:?} {}",
        r.status,
        r.headers,
        r.text()
    );

    cluster
        .relay()
        .context("relay")?
        .update(founder, joiner, |l| l.up = true);
    cluster.wait_started(joiner).await?;
    poll("/readyz to answer 200", Duration::from_secs(20), || async {
        let r = admin.request(http::Method::GET, "/readyz", None).await?;
        ensure!(r.status == StatusCode::OK, "{}: {}", r.status, r.text());
        Ok(())
    })
    .await?;
    let (status, _) = admin.get("/v1/services").await?;
    ensure!(
        status == StatusCode::OK,
        "/v1/services once joined: {status}"
    );
    Ok(())
}
