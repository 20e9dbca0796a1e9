//! One chaos run: a cluster behind the link emulator, the clients, the
//! seeded faults one after another, then the final state and the checker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde_json::json;

use super::history::{Excluded, Outcome, Verdict, Write, WriteKind, check};
use super::schedule::{Fault, Step, Target, plan, wan_delay};
use super::workload::{
    BACKEND_PORT, LEDGER, LEDGER_PORT, Node, Recorder, WEB, WEB_PORT, Workload, keys, outcome,
};
use crate::cluster::{Cluster, ClusterOptions, wait_serving};
use crate::link::Link;
use crate::poll;
use crate::relay::Relay;

/// How one run goes.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub run: usize,
    pub seed: u64,
    pub nodes: usize,
    pub faults: usize,
    /// Fault kinds by name (all when empty).
    pub kinds: Vec<String>,
    /// Every link delayed 50–150 ms one way for the whole run.
    pub wan: bool,
    pub writers: usize,
    /// Print a line per phase and per fault as the run goes.
    pub verbose: bool,
}

/// What one run measured and what the checker found (saved and read back
/// by `chaos --save` and `--merge`, the nodes' logs left out).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub run: usize,
    pub seed: u64,
    pub nodes: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    pub verdict: Verdict,
    /// From the leader's loss (kill, cut) to a new leader on the majority.
    pub elections: Vec<Duration>,
    /// Elections that did not happen within 20 s.
    pub no_leader: usize,
    /// From a heal, or a restart (the process started again), to the node
    /// having applied the leader's commit index.
    pub catchups: Vec<Duration>,
    /// Catch-ups not done within 30 s.
    pub catchup_missed: usize,
    /// Writes sent to a node cut off from the majority: how long until the
    /// answer, and whether it was refused (as it must be).
    pub isolated_writes: Vec<(Duration, bool)>,
    /// Every SIGTERM: node, time to exit, exit code (`None`: did not exit
    /// within 30 s, or killed by a signal).
    pub sigterms: Vec<(u64, Duration, Option<i32>)>,
    /// The run could not be carried out (harness failure), with why.
    pub error: Option<String>,
    /// Every node's stderr over the run.
    #[serde(skip)]
    pub logs: String,
}

/// Carries out one run; failures of the harness land in
/// [`RunReport::error`].
pub async fn run(o: &RunOptions) -> RunReport {
    let mut report = RunReport {
        run: o.run,
        seed: o.seed,
        nodes: o.nodes,
        ..RunReport::default()
    };
    let mut cluster = None;
    if let Err(e) = run_inner(o, &mut report, &mut cluster).await {
        report.error = Some(format!("{e:#}"));
    }
    if let Some(c) = &mut cluster {
        report.logs = c.take_logs();
    }
    report
}

async fn run_inner(
    o: &RunOptions,
    report: &mut RunReport,
    slot: &mut Option<Cluster>,
) -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(o.seed);
    let cluster = slot.insert(
        Cluster::start_with(
            o.nodes,
            ClusterOptions {
                relay: Some(o.seed),
                ..ClusterOptions::default()
            },
        )
        .await?,
    );
    let relay = cluster.relay().context("no relay")?.clone();
    if o.wan {
        draw_wan(&relay, &mut rng);
    }
    let leader = cluster.leader().await?;
    let backends = cluster.http_backends(&["b1", "b2"], BACKEND_PORT).await?;
    cluster
        .http_group(leader, WEB, WEB_PORT, BACKEND_PORT, &backends)
        .await?;
    cluster
        .admin(leader)
        .create_group(&json!({
            "name": LEDGER,
            "services": [{"port": LEDGER_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        }))
        .await?;
    let host = format!("{WEB}.edgelb.local");
    let mut nodes = Vec::new();
    for id in cluster.ids() {
        let data = cluster.data_addr(id, WEB_PORT);
        wait_serving(data, &host, &["b1", "b2"]).await?;
        nodes.push(Node {
            id,
            admin: cluster.admin(id),
            data,
            paused: Arc::new(AtomicBool::new(false)),
            inflight: Arc::new(AtomicUsize::new(0)),
        });
    }

    let rec = Recorder::new();
    let steps = plan(&mut rng, o.faults, &o.kinds);
    let budget = Duration::from_secs(60) + Duration::from_secs(30) * steps.len() as u32;
    let workload = Workload::start(&rec, &nodes, o.run, o.writers, o.seed, budget);
    let mut ctx = Ctx {
        cluster: &mut *cluster,
        relay: &relay,
        nodes: &nodes,
        rec: &rec,
        rng: &mut rng,
        report,
        o,
        isolated: 0,
    };
    // Let the clients write a little before the first fault.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for step in steps {
        let at = rec.now();
        let wall = utc_time_of_day();
        let desc = format!("{:?} for {:.1}s", step.fault, step.hold.as_secs_f64());
        let seen = (ctx.report.elections.len(), ctx.report.catchups.len());
        if let Err(e) = ctx.step(step).await {
            // Stop injecting; the history so far is still checked.
            ctx.report.error = Some(format!("{desc}: {e:#}"));
            break;
        }
        if o.verbose {
            let r = &ctx.report;
            println!(
                "  [{:>6.1}s, {wall} UTC] {desc}: new leader after {:?}, caught up after {:?}; done in {:.1}s",
                at.as_secs_f64(),
                r.elections.get(seen.0),
                r.catchups.get(seen.1),
                (rec.now() - at).as_secs_f64()
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    workload.stop().await;
    if o.verbose {
        println!("  [{:>6.1}s] clients stopped", rec.now().as_secs_f64());
    }

    // The end: every link healed, every node running and caught up; read
    // each node, then stop each with SIGTERM.
    let finals = match finish(cluster, &relay, &nodes, report).await {
        Ok(f) => f,
        Err(e) => {
            let e = format!("final state: {e:#}");
            report.error = Some(match report.error.take() {
                Some(first) => format!("{first}; {e}"),
                None => e,
            });
            BTreeMap::new()
        }
    };
    if o.verbose {
        println!("  [{:>6.1}s] finished", rec.now().as_secs_f64());
    }
    let history = rec.with(|h| {
        h.finals = finals;
        h.clone()
    });
    report.verdict = check(&history);
    Ok(())
}

/// Heals, restarts what is down, waits until every node has applied the
/// leader's commit index, reads every node's keys, then SIGTERMs each
/// (timed).
async fn finish(
    cluster: &mut Cluster,
    relay: &Relay,
    nodes: &[Node],
    report: &mut RunReport,
) -> anyhow::Result<BTreeMap<u64, Vec<String>>> {
    relay.heal_all();
    let running = cluster.running();
    let down: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|i| !running.contains(i))
        .collect();
    cluster.restart_all(&down).await?;
    let leader = cluster.leader().await?;
    let commit = cluster.status(leader).await?.commit_index;
    for id in cluster.ids() {
        cluster.wait_applied(id, commit).await?;
    }
    let mut finals = BTreeMap::new();
    for n in nodes {
        let groups = n.admin.groups(false).await?;
        let k = keys(&groups).context("unreadable group listing")?;
        finals.insert(n.id, k);
    }
    for id in cluster.ids() {
        let (took, status) = cluster.terminate_timed(id, Duration::from_secs(30)).await?;
        report
            .sigterms
            .push((id, took, status.and_then(|s| s.code())));
    }
    Ok(finals)
}

/// Every pair of nodes gets its own 50–150 ms one-way delay (both ways).
fn draw_wan(relay: &Relay, rng: &mut SmallRng) {
    let ids = relay.ids();
    for (i, &a) in ids.iter().enumerate() {
        for &b in &ids[i + 1..] {
            let d = wan_delay(rng);
            let link = Link::delayed(d, d / 10);
            relay.update(a, b, |l| {
                *l = Link {
                    up: l.up,
                    loss: l.loss,
                    ..link
                }
            });
            relay.update(b, a, |l| {
                *l = Link {
                    up: l.up,
                    loss: l.loss,
                    ..link
                }
            });
        }
    }
}

struct Ctx<'a> {
    cluster: &'a mut Cluster,
    relay: &'a Relay,
    nodes: &'a [Node],
    rec: &'a Arc<Recorder>,
    rng: &'a mut SmallRng,
    report: &'a mut RunReport,
    o: &'a RunOptions,
    /// Writes sent to cut-off nodes so far (for unique names).
    isolated: usize,
}

impl Ctx<'_> {
    fn resolve(&mut self, t: Target, leader: u64) -> u64 {
        match t {
            Target::Leader => leader,
            Target::Follower => {
                let others: Vec<u64> = self
                    .cluster
                    .ids()
                    .into_iter()
                    .filter(|i| *i != leader)
                    .collect();
                others.choose(self.rng).copied().unwrap_or(leader)
            }
        }
    }

    fn node(&self, id: u64) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    async fn step(&mut self, step: Step) -> anyhow::Result<()> {
        let leader = self.cluster.leader().await?;
        let ids = self.cluster.ids();
        *self
            .report
            .faults
            .entry(step.fault.name().to_owned())
            .or_default() += 1;
        let from = self.rec.now();
        let began = Instant::now();
        // Nodes off the majority during the fault, and whether they need
        // a restart at the end.
        let (cut, restart) = match step.fault {
            Fault::Kill(t) => {
                let id = self.resolve(t, leader);
                self.cluster.kill9(id).await?;
                (vec![id], true)
            }
            Fault::Term(t) => {
                let id = self.resolve(t, leader);
                self.sigterm(id).await?;
                (vec![id], true)
            }
            Fault::Isolate(t) => {
                let id = self.resolve(t, leader);
                self.relay.isolate(id);
                (vec![id], false)
            }
            Fault::Split { leader_in_minority } => {
                let mut others: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
                others.shuffle(self.rng);
                let size = ids.len() / 2;
                let mut minority: Vec<u64> = if leader_in_minority {
                    std::iter::once(leader).chain(others).take(size).collect()
                } else {
                    others.into_iter().take(size).collect()
                };
                minority.sort_unstable();
                let majority: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|i| !minority.contains(i))
                    .collect();
                self.relay.partition(&[&minority, &majority]);
                (minority, false)
            }
            Fault::OneWayLoss { from: t, loss } => {
                let a = self.resolve(t, leader);
                let peers: Vec<u64> = ids.iter().copied().filter(|i| *i != a).collect();
                let b = *peers.choose(self.rng).context("a peer")?;
                self.relay.update(a, b, |l| l.loss = loss);
                (Vec::new(), false)
            }
            Fault::Flap { node: t, .. } => (vec![self.resolve(t, leader)], false),
            Fault::Wan => {
                draw_wan(self.relay, self.rng);
                (Vec::new(), false)
            }
        };
        let majority: Vec<u64> = ids.iter().copied().filter(|i| !cut.contains(i)).collect();

        if let Fault::Flap { period, .. } = step.fault {
            let id = cut[0];
            while began.elapsed() < step.hold {
                self.relay.isolate(id);
                tokio::time::sleep(period).await;
                self.relay.heal_all();
                tokio::time::sleep(period).await;
            }
        } else {
            let leader_lost = cut.contains(&leader);
            let partitioned = !restart && !cut.is_empty();
            let cut_write = if partitioned {
                self.isolated += 1;
                let key = format!("g-{}-iso-{}", self.o.run, self.isolated);
                Some((cut[0], self.node(cut[0])?.admin.clone(), key))
            } else {
                None
            };
            let rec = self.rec.clone();
            let cluster: &Cluster = self.cluster;
            let (elected, written) = tokio::join!(
                async {
                    if leader_lost {
                        Some(new_leader(cluster, &majority, leader).await)
                    } else {
                        None
                    }
                },
                async {
                    match cut_write {
                        Some((id, admin, key)) => Some(isolated_write(&rec, id, &admin, key).await),
                        None => None,
                    }
                }
            );
            match elected {
                Some(Some(t)) => self.report.elections.push(t),
                Some(None) => self.report.no_leader += 1,
                None => {}
            }
            if let Some((took, refused)) = written {
                self.report.isolated_writes.push((took, refused));
            }
            let left = step.hold.saturating_sub(began.elapsed());
            tokio::time::sleep(left).await;
        }

        // Heal.
        let healed = Instant::now();
        if self.o.verbose {
            println!(
                "  [{:>6.1}s, {} UTC] heal/restart: cut {cut:?}, leader was {leader}",
                self.rec.now().as_secs_f64(),
                utc_time_of_day()
            );
        }
        self.relay.heal_all();
        if matches!(step.fault, Fault::Wan) && !self.o.wan {
            self.relay.set_all(Link::default());
        }
        if restart {
            self.cluster.restart(cut[0]).await?;
            self.node(cut[0])?.paused.store(false, Ordering::Relaxed);
            if self.o.verbose {
                // Where a restart's catch-up goes: the process starting
                // (until its admin API answers) or the cluster reaching it.
                println!(
                    "  [{:>6.1}s, {} UTC] node {} serves its admin API again, {:?} after the restart began",
                    self.rec.now().as_secs_f64(),
                    utc_time_of_day(),
                    cut[0],
                    healed.elapsed()
                );
            }
        }
        if !cut.is_empty() {
            let commit = leader_commit(self.cluster, &majority).await?;
            let mut all = true;
            for &id in &cut {
                all &= caught_up(self.cluster, id, commit).await;
            }
            if all {
                self.report.catchups.push(healed.elapsed());
            } else {
                self.report.catchup_missed += 1;
            }
        }
        let to = self.rec.now();
        self.rec.with(|h| {
            for &node in &cut {
                h.excluded.push(Excluded { node, from, to });
            }
        });
        Ok(())
    }

    /// SIGTERM with nothing in flight on the node's data plane.
    async fn sigterm(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?.clone();
        node.paused.store(true, Ordering::Relaxed);
        let drained = poll(
            "the node's requests to finish",
            Duration::from_secs(5),
            || async {
                ensure!(node.inflight.load(Ordering::SeqCst) == 0, "in flight");
                Ok(())
            },
        )
        .await;
        drained?;
        let (took, status) = self
            .cluster
            .terminate_timed(id, Duration::from_secs(30))
            .await?;
        self.report
            .sigterms
            .push((id, took, status.and_then(|s| s.code())));
        Ok(())
    }
}

/// A write on node `id`, cut off from the majority: it must be refused
/// within 5 s. Recorded in the history like any write; returns how long
/// the answer took and whether it was a refusal.
async fn isolated_write(
    rec: &Recorder,
    id: u64,
    admin: &crate::admin::AdminClient,
    key: String,
) -> (Duration, bool) {
    let body = json!({
        "name": key,
        "services": [{"port": LEDGER_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
    });
    let start = rec.now();
    let began = Instant::now();
    let outcome = outcome(
        admin
            .request(http::Method::POST, "/v1/services", Some(&body))
            .await,
    );
    let took = began.elapsed();
    let end = rec.now();
    rec.with(|h| {
        h.writes.push(Write {
            key,
            kind: WriteKind::CreateGroup,
            node: id,
            start,
            end,
            outcome,
        });
    });
    (took, outcome == Outcome::Refused)
}

/// Waits (20 s at most) until every node of `majority` names the same
/// leader among them other than `old`; how long that took.
async fn new_leader(cluster: &Cluster, majority: &[u64], old: u64) -> Option<Duration> {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(20) {
        let mut leaders = Vec::new();
        for &id in majority {
            leaders.push(cluster.status(id).await.ok().and_then(|v| v.leader_id));
        }
        if let Some(Some(l)) = leaders.first()
            && *l != old
            && majority.contains(l)
            && leaders.iter().all(|x| *x == Some(*l))
        {
            return Some(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// After a heal: the commit index of the leader that `majority` names
/// (waiting for one; any member may lead again).
async fn leader_commit(cluster: &Cluster, majority: &[u64]) -> anyhow::Result<u64> {
    poll(
        "a leader after the heal",
        Duration::from_secs(30),
        || async {
            for &id in majority {
                let v = cluster.status(id).await?;
                if let Some(l) = v.leader_id {
                    return Ok(cluster.status(l).await?.commit_index);
                }
            }
            bail!("no leader named by {majority:?}")
        },
    )
    .await
}

/// Waits (30 s at most) until node `id` has applied `commit`, looking
/// every 5 ms (the catch-up is timed to that).
async fn caught_up(cluster: &Cluster, id: u64, commit: u64) -> bool {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(30) {
        if cluster
            .status(id)
            .await
            .is_ok_and(|v| v.applied_index >= commit)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// The time of day in UTC, `HH:MM:SS.mmm`, as the nodes' logs show it, so
/// that a verbose run's faults can be found in them.
fn utc_time_of_day() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}
