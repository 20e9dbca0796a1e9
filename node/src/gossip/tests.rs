//! Two in-process nodes gossiping over real QUIC on 127.0.0.1: one node's
//! leases reach the other's balancer, fade out after the TTL, and a new
//! incarnation replaces the old counts at once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_store::model::{Domain, Handler, Instance, Service, ServiceGroup};
use raft_store::{Command, State};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Gossip, GossipTasks, Peer, Peers, Wiring, spawn};
use crate::balancer::{Backend, Lease, LoadChanged, Pick};
use crate::cluster::{
    CaBundle, HandlerFuture, NodeTls, RaftHandler, Rpc, RpcReply, Transport, generate_ca,
    issue_node_cert,
};
use crate::dataplane::{DataPlane, Settings};
use crate::metrics::Metrics;
use crate::routing::{BuildContext, GroupRuntime, publish};
use crate::tls::CertCache;

/// Patience for conditions that should hold quickly.
fn patience() -> Duration {
    crate::patience::patient(Duration::from_secs(10))
}

/// No Raft in these tests.
struct NoRaft;

impl RaftHandler for NoRaft {
    fn handle(&self, _from: u64, _rpc: Rpc) -> HandlerFuture<'_> {
        Box::pin(async { RpcReply::Error("no raft here".into()) })
    }
}

/// One group with four instances of fixed uuids, as every node has it.
fn state() -> State {
    let group = ServiceGroup {
        uuid: Uuid::from_u128(0xfeed),
        name: "web".into(),
        domains: vec![Domain {
            fqdn: "web.edgelb.local".into(),
            certificate: None,
        }],
        services: vec![Service {
            port: 8080,
            destination_port: 9000,
            handlers: vec![Handler::Http],
        }],
        hard_limit: 65535,
        instances: (1..=4u8)
            .map(|i| Instance {
                uuid: Uuid::from_u128(u128::from(i)),
                name: format!("i-{i}"),
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)).to_string(),
            })
            .collect(),
        created_at: "2025-01-01T00:00:00Z".into(),
        persistent: false,
        health_check: None,
        send_proxy_protocol: None,
    };
    let mut state = State::default();
    state
        .apply(&Command::CreateGroup { group })
        .expect("valid group");
    state
}

/// A data plane routing [`state`], its balancers raising `changed`.
fn routed(changed: &Arc<LoadChanged>) -> Arc<DataPlane> {
    let dataplane = Arc::new(DataPlane::new(Settings::default()));
    let certs = CertCache::default();
    let cx = BuildContext {
        certs: &certs,
        drain_timeout: Duration::from_secs(1),
        load_changed: Some(changed),
    };
    publish(&dataplane.routes, &state(), &cx);
    dataplane
}

/// Fast heartbeats; the reported counts taken as they are, since these
/// tests are about the plumbing (the estimators are tested in the gossip
/// crate and chosen with the simulator): the default estimator would also
/// count the picks a peer is expected to have made since its report.
fn config(ttl: Duration) -> ::gossip::Config {
    ::gossip::Config {
        ttl,
        interval: Duration::from_millis(50),
        min_interval: Duration::from_millis(5),
        estimator: ::gossip::Estimator::Raw,
        ..::gossip::Config::default()
    }
}

struct TestNode {
    id: u64,
    transport: Arc<Transport>,
    gossip: Arc<Gossip>,
    dataplane: Arc<DataPlane>,
    metrics: Arc<Metrics>,
    changed: Arc<LoadChanged>,
    peers: watch::Sender<Peers>,
    tasks: Option<GossipTasks>,
    region: &'static str,
}

impl TestNode {
    fn new(ca: &CaBundle, id: u64, config: ::gossip::Config) -> Self {
        let (cert_pem, key_pem) = issue_node_cert(ca, id).unwrap();
        let tls = NodeTls {
            ca_cert_pem: ca.cert_pem.clone(),
            cert_pem,
            key_pem,
        };
        let transport = Arc::new(
            Transport::bind("127.0.0.1:0".parse().unwrap(), &tls, id, Arc::new(NoRaft)).unwrap(),
        );
        let metrics = Arc::new(Metrics::new());
        let changed = Arc::new(LoadChanged::default());
        let dataplane = routed(&changed);
        let gossip = Arc::new(Gossip::new(id, config, dataplane.clone(), metrics.clone()));
        Self {
            id,
            transport,
            gossip,
            dataplane,
            metrics,
            changed,
            peers: watch::channel(Peers::new()).0,
            tasks: None,
            region: "local",
        }
    }

    fn addr(&self) -> String {
        self.transport.local_addr().unwrap().to_string()
    }

    /// Gossips with `peers` from now on (the membership changed).
    fn set_peers(&self, peers: &[&Self]) {
        let peers: Peers = peers
            .iter()
            .map(|p| {
                let region = p.region.to_owned();
                (
                    p.id,
                    Peer {
                        addr: p.addr(),
                        region,
                    },
                )
            })
            .collect();
        self.peers.send_replace(peers);
    }

    /// Starts gossiping with `peers` in `incarnation`.
    fn start(&mut self, incarnation: u64, peers: &[&Self]) {
        self.set_peers(peers);
        let wiring = Wiring {
            transport: self.transport.clone(),
            peers: self.peers.subscribe(),
            load_changed: self.changed.clone(),
            incarnation,
            region: self.region.to_owned(),
        };
        self.tasks = Some(spawn(self.gossip.clone(), wiring, CancellationToken::new()));
    }

    async fn stop(&mut self) {
        if let Some(tasks) = self.tasks.take() {
            tasks.stop().await;
        }
    }

    fn group(&self) -> Arc<GroupRuntime> {
        self.dataplane
            .routes
            .load()
            .group(&Uuid::from_u128(0xfeed))
            .cloned()
            .unwrap()
    }

    fn backend(&self, i: u8) -> Arc<Backend> {
        self.group().backends[&Uuid::from_u128(u128::from(i))].clone()
    }

    /// `n` picks, held until the leases drop.
    fn pick(&self, n: usize) -> Vec<Lease> {
        let group = self.group();
        (0..n)
            .map(
                |_| match group.balancer.pick(Instant::now(), &mut rand::rng()) {
                    Pick::Selected(lease) => lease,
                    other => panic!("no pick: {other:?}"),
                },
            )
            .collect()
    }

    /// Each instance's peer load as the balancer sees it (1..=4).
    fn peer_loads(&self) -> Vec<u64> {
        (1..=4).map(|i| self.backend(i).peer_load()).collect()
    }

    /// Each instance's local in-flight count.
    fn local(&self) -> Vec<u64> {
        (1..=4).map(|i| self.backend(i).local_inflight()).collect()
    }
}

/// Nodes 1 to `n` (not started) with `ttl`: node 1 alone in region a,
/// the others in region b.
fn two_regions(ttl: Duration, n: u64) -> Vec<TestNode> {
    let ca = generate_ca("test").unwrap();
    let mut nodes: Vec<TestNode> = (1..=n)
        .map(|id| TestNode::new(&ca, id, config(ttl)))
        .collect();
    nodes[0].region = "a";
    for n in &mut nodes[1..] {
        n.region = "b";
    }
    nodes
}

/// Starts each of `nodes` with all the others as its peers.
fn start_together(nodes: &mut [TestNode]) {
    for i in 0..nodes.len() {
        let (before, rest) = nodes.split_at_mut(i);
        let (me, after) = rest.split_first_mut().unwrap();
        let peers: Vec<&TestNode> = before.iter().chain(after.iter()).collect();
        me.start(1, &peers);
    }
}

/// Starts node 1 (`nodes[0]`) with all the others, already running, as
/// its peers, and gives it to them as a peer.
fn start_first_after_the_others(nodes: &mut [TestNode]) {
    for n in &nodes[1..] {
        let peers: Vec<&TestNode> = nodes.iter().filter(|p| p.id != n.id).collect();
        n.set_peers(&peers);
    }
    let (first, rest) = nodes.split_first_mut().unwrap();
    first.start(1, &rest.iter().collect::<Vec<_>>());
}

/// Polls `cond` until it holds or [`patience`] runs out.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience();
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_leases_reach_the_balancer_and_fade_after_the_ttl() {
    let ca = generate_ca("test").unwrap();
    let ttl = Duration::from_millis(400);
    let mut one = TestNode::new(&ca, 1, config(ttl));
    let mut two = TestNode::new(&ca, 2, config(ttl));
    one.start(1, &[&two]);
    two.start(1, &[&one]);

    // Three picks on node 1 land on three distinct instances.
    let leases = one.pick(3);
    let local = one.local();
    assert_eq!(local.iter().sum::<u64>(), 3);
    eventually("node 2 to see node 1's leases", || {
        two.peer_loads() == local
    })
    .await;
    // What selection compares on node 2: its own (none) plus node 1's.
    for i in 1..=4 {
        let b = two.backend(i);
        assert_eq!(two.group().balancer.load(&b), local[usize::from(i) - 1]);
    }
    // The admin view's split: all of it is node 1's.
    let parts = two.gossip.peer_parts(&two.group(), Instant::now());
    for i in 1..=4u8 {
        let want = BTreeMap::from([(1, local[usize::from(i) - 1])]);
        assert_eq!(parts[&Uuid::from_u128(u128::from(i))], want);
    }
    // Node 2 now steers its own picks to the idle instance.
    let idle = local.iter().position(|&n| n == 0).unwrap();
    let mine = two.pick(1);
    assert_eq!(mine[0].backend().uuid, Uuid::from_u128(idle as u128 + 1));
    // And node 1 hears about it.
    eventually("node 1 to see node 2's lease", || {
        one.peer_loads().iter().sum::<u64>() == 1
    })
    .await;

    let m = &two.metrics.gossip;
    assert!(m.received.get() > 0);
    assert!(m.sent.get() > 0 && m.bytes_tx.get() > 0 && m.bytes_rx.get() > 0);
    let age = two.gossip.last_report_age(1, Instant::now()).unwrap();
    assert!(age < ttl, "{age:?}");
    assert_eq!(two.gossip.last_report_age(2, Instant::now()), None);

    // Releases travel too.
    drop(leases);
    eventually("node 2 to see node 1's releases", || {
        two.peer_loads() == [0; 4]
    })
    .await;
    let leases = one.pick(2);
    let local = one.local();
    eventually("node 2 to see new leases", || two.peer_loads() == local).await;

    // Node 1 stops gossiping (its leases still held): its load fades out
    // once its last report is older than the TTL.
    one.stop().await;
    let stopped = Instant::now();
    eventually("node 1's load to fade", || two.peer_loads() == [0; 4]).await;
    let faded = stopped.elapsed();
    assert!(
        faded <= ttl + crate::patience::patient(Duration::from_secs(2)),
        "faded after {faded:?}"
    );
    assert_eq!(
        one.local().iter().sum::<u64>(),
        2,
        "node 1 still holds them"
    );
    drop(leases);
    two.stop().await;
}

/// Between full reports a busy node sends only what changed, and the
/// receiver still sees its exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_travel_as_deltas_between_full_reports() {
    let ca = generate_ca("test").unwrap();
    let ttl = Duration::from_secs(1);
    let mut one = TestNode::new(&ca, 1, config(ttl));
    let mut two = TestNode::new(&ca, 2, config(ttl));
    one.start(1, &[&two]);
    two.start(1, &[&one]);
    // Work on every instance: a full report lists all four.
    let _held = one.pick(4);
    let full = ::gossip::HEADER_LEN + 4 * ::gossip::ENTRY_LEN;
    eventually("node 2 to see node 1's leases", || {
        two.peer_loads() == one.local()
    })
    .await;
    let m = &one.metrics.gossip;
    let (sent, bytes) = (m.sent.get(), m.bytes_tx.get());
    // One instance at a time changes.
    for _ in 0..20 {
        let lease = one.pick(1);
        let local = one.local();
        eventually("node 2 to see the pick", || two.peer_loads() == local).await;
        drop(lease);
        let local = one.local();
        eventually("node 2 to see the release", || two.peer_loads() == local).await;
    }
    let (sent, bytes) = (m.sent.get() - sent, m.bytes_tx.get() - bytes);
    let mean = bytes as f64 / sent as f64;
    assert!(sent >= 40, "{sent} reports");
    // Deltas of one instance are about 50 bytes, full reports 166; a full
    // one goes out at least every gossip_interval.
    assert!(
        mean < 0.7 * full as f64,
        "{mean:.0} bytes per report of {sent}"
    );
    // A delta whose base was lost (a datagram dropped under load) is
    // dropped and repaired by the next full report: the loop above saw
    // every count arrive exactly either way.
    eprintln!(
        "{sent} reports, {mean:.0} bytes each, {} gaps",
        two.metrics.gossip.dropped_count("gap")
    );
    one.stop().await;
    two.stop().await;
}

/// Across regions a node hears one aggregated report per other region,
/// which carries the sum of that region's load (a starting member waits to
/// hear its region before it sends one: the next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_hears_one_report_per_other_region() {
    let mut nodes = two_regions(Duration::from_secs(1), 4);
    // Region b first, on its own. A member that has not heard another yet
    // counts it as down in its plan, and its links look at the plan again
    // only every second (links::REPLAN): started together, node 1 would
    // hear region b's aggregate from more than one member for a while.
    // Node 1 joins once every member has heard the others' loads, so the
    // plan it joins gives it one sender of the sum.
    start_together(&mut nodes[1..]);
    let _two = nodes[1].pick(2);
    let _three = nodes[2].pick(1);
    let sum: Vec<u64> = (0..4)
        .map(|i| nodes[1].local()[i] + nodes[2].local()[i])
        .collect();
    let region_total = |n: &TestNode| -> Vec<u64> {
        let (local, peers) = (n.local(), n.peer_loads());
        (0..4).map(|i| local[i] + peers[i]).collect()
    };
    eventually("region b's members to hear each other's loads", || {
        nodes[1..].iter().all(|n| region_total(n) == sum)
    })
    .await;
    start_first_after_the_others(&mut nodes);
    let heard = |n: &TestNode| -> Vec<u64> {
        n.gossip
            .report_ages(Instant::now())
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    let one = &nodes[0];
    eventually("node 1 to see region b's sum from one member", || {
        one.peer_loads() == sum && heard(one).len() == 1
    })
    .await;
    // It keeps one report for region b, from one of its members.
    for _ in 0..20 {
        let h = heard(one);
        assert!(
            h.len() == 1 && (2..=4).contains(&h[0]),
            "node 1 heard {h:?}"
        );
        assert_eq!(one.peer_loads(), sum);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Inside region b, every member hears the others' own reports, and
    // region a's (node 1's) aggregate.
    let _first = one.pick(1);
    let local = one.local();
    let all: Vec<u64> = (0..4).map(|i| sum[i] + local[i]).collect();
    let four = &nodes[3];
    eventually("node 4 to see nodes 1, 2 and 3", || {
        heard(four) == [1, 2, 3] && four.peer_loads() == all
    })
    .await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// A member that starts after its region's others sends no aggregate
/// before it has heard them: its sum would leave their load out, and the
/// other regions take the latest aggregate of a region for all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_member_sends_its_regions_sum_only_once_it_has_heard_the_region() {
    // Nodes 2, 3 and, later, 4 in region b.
    let mut nodes = two_regions(Duration::from_secs(2), 4);
    start_together(&mut nodes[..3]);
    let _two = nodes[1].pick(2);
    let _three = nodes[2].pick(1);
    let sum: Vec<u64> = (0..4)
        .map(|i| nodes[1].local()[i] + nodes[2].local()[i])
        .collect();
    eventually("node 1 to see region b's sum", || {
        nodes[0].peer_loads() == sum
    })
    .await;

    // Node 4 joins region b. Node 1 learns of it at once; nodes 2 and 3 a
    // moment later (membership reaches nodes at different times), so for
    // that moment node 4 hears nobody in its region and counts them down.
    let (known, four) = nodes.split_at_mut(3);
    let four = &mut four[0];
    known[0].set_peers(&[&known[1], &known[2], &*four]);
    four.start(1, &[&known[0], &known[1], &known[2]]);
    let watch = |what: &str, until: Instant| {
        let one = &known[0];
        let what = what.to_owned();
        let sum = sum.clone();
        async move {
            while Instant::now() < until {
                assert_eq!(one.peer_loads(), sum, "node 1's view of region b {what}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    watch(
        "while node 4 hears nobody",
        Instant::now() + Duration::from_millis(300),
    )
    .await;
    known[1].set_peers(&[&known[0], &known[2], &*four]);
    known[2].set_peers(&[&known[0], &known[1], &*four]);
    eventually("node 4 to hear its region", || four.peer_loads() == sum).await;
    // Its links look at the plan again within a second (`links::REPLAN`).
    watch(
        "once node 4 has heard it",
        Instant::now() + Duration::from_millis(1_200),
    )
    .await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// An idle node that reports to more than `gossip::FEW_TARGETS` peers
/// (its own reports and its region's aggregate together) repeats its
/// empty reports on the idle grid, whichever stream they are on: a member
/// of a large region sends the aggregate to one or two peers of another
/// region, and counted alone that stream went out every
/// `gossip_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_regions_aggregate_keeps_the_idle_pace() {
    let ttl = Duration::from_secs(1);
    // Node 1 alone in region a, nodes 2 to 7 in region b: each of them
    // reports to five region peers, and one of them sends region b's
    // aggregate to node 1.
    let mut nodes = two_regions(ttl, 7);
    // Region b first, until its members have heard each other, so that
    // node 1 joins a settled plan with one sender of the aggregate (as in
    // `a_node_hears_one_report_per_other_region`).
    start_together(&mut nodes[1..]);
    eventually("region b's members to hear each other", || {
        nodes[1..]
            .iter()
            .all(|n| n.gossip.report_ages(Instant::now()).len() == 5)
    })
    .await;
    start_first_after_the_others(&mut nodes);
    let one = &nodes[0];
    eventually("node 1 to hear region b", || {
        !one.gossip.report_ages(Instant::now()).is_empty()
    })
    .await;
    // Nothing is in flight anywhere: idle reports follow a third of the
    // TTL, then the TTL. Every `gossip_interval` (50 ms here) would be 60
    // in 3 s.
    let before = one.metrics.gossip.received.get();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let heard = one.metrics.gossip.received.get() - before;
    assert!(
        heard <= 12,
        "node 1 took {heard} reports of idle region b in {window:?}"
    );
    for n in &mut nodes {
        n.stop().await;
    }
}

/// An idle node of a small cluster in two regions (3 + 3) reports to
/// three peers, two region peers and one of the other region: its own
/// reports and its aggregate both keep SPEC §5's heartbeat every
/// `gossip_interval` (50 ms here), as in a one-region cluster of that
/// size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_cluster_in_two_regions_heartbeats_every_interval_when_idle() {
    let ca = generate_ca("test").unwrap();
    let mut nodes: Vec<TestNode> = (1..=6)
        .map(|id| TestNode::new(&ca, id, config(Duration::from_secs(1))))
        .collect();
    for n in &mut nodes[3..] {
        n.region = "b";
    }
    start_together(&mut nodes);
    // Each member hears its two region peers and one aggregate of the
    // other region, once the plans have settled (links look again every
    // second).
    eventually("every node to hear three peers", || {
        nodes
            .iter()
            .all(|n| n.gossip.report_ages(Instant::now()).len() == 3)
    })
    .await;
    // Over a second, no peer's newest report at node 2 gets older than
    // a few intervals; on the idle grid (a third of the TTL, then the
    // TTL) it would reach 333 ms and more.
    let two = &nodes[1];
    let mut oldest = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        for (peer, age) in two.gossip.report_ages(Instant::now()) {
            let max = oldest.entry(peer).or_insert(Duration::ZERO);
            *max = (*max).max(age);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A region's aggregate from another member once the plan moves.
    assert!(oldest.len() >= 3, "node 2 heard {oldest:?}");
    assert!(
        oldest.values().all(|&age| age < Duration::from_millis(300)),
        "oldest report per peer at node 2: {oldest:?}"
    );
    for n in &mut nodes {
        n.stop().await;
    }
}

/// A region peer that is down from the start holds back a starting
/// member's aggregate until that peer's TTL has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_region_peer_holds_the_aggregate_back_until_its_ttl() {
    let ttl = Duration::from_millis(500);
    // Node 3, in region b with node 2, never starts.
    let mut nodes = two_regions(ttl, 3);
    let started = Instant::now();
    {
        let [one, two, down] = &mut nodes[..] else {
            unreachable!()
        };
        one.start(1, &[&*two, &*down]);
        two.start(1, &[&*one, &*down]);
    }
    let (one, two) = (&nodes[0], &nodes[1]);
    let _held = two.pick(3);
    let local = two.local();
    eventually("node 1 to see node 2's region", || {
        one.peer_loads() == local
    })
    .await;
    assert!(
        started.elapsed() >= ttl,
        "an aggregate went out {:?} after the start, before the silent peer's TTL",
        started.elapsed()
    );
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_incarnation_replaces_the_old_counts() {
    let ca = generate_ca("test").unwrap();
    // A TTL far longer than the test: only the incarnation can explain
    // old counts going away.
    let ttl = Duration::from_secs(60);
    let mut one = TestNode::new(&ca, 1, config(ttl));
    let mut two = TestNode::new(&ca, 2, config(ttl));
    two.start(1, &[&one]);
    one.start(1_000, &[&two]);
    let held = one.pick(3);
    let before = one.local();
    eventually("node 2 to see the first incarnation", || {
        two.peer_loads() == before
    })
    .await;

    // Node 1 "restarts": its reports stop, its old leases vanish with the
    // process, and a new incarnation (a later start) picks elsewhere.
    one.stop().await;
    std::mem::forget(held); // the old process never released them
    let mut restarted = TestNode::new(&ca, 1, config(ttl));
    restarted.transport = one.transport.clone();
    let _new = restarted.pick(1);
    let after = restarted.local();
    restarted.start(2_000, &[&two]);
    eventually("node 2 to replace the old counts", || {
        two.peer_loads() == after
    })
    .await;
    assert_eq!(two.metrics.gossip.dropped_count("stale"), 0);

    // A report of the old incarnation arriving late is stale.
    restarted.stop().await;
    let mut zombie = TestNode::new(&ca, 1, config(ttl));
    zombie.transport = one.transport.clone();
    let _old = zombie.pick(4);
    zombie.start(1_000, &[&two]);
    eventually("the old incarnation's report to be dropped", || {
        two.metrics.gossip.dropped_count("stale") > 0
    })
    .await;
    assert_eq!(two.peer_loads(), after);
    zombie.stop().await;
    two.stop().await;
}

/// A report is dated by its age at the sender: received now over a path
/// with a 100 ms round trip, its counts are 50 ms old, and it expires 50 ms
/// sooner than one dated at receipt.
#[test]
fn time_in_transit_counts() {
    use crate::cluster::GossipHandler;

    let ttl = Duration::from_millis(400);
    let dataplane = Arc::new(DataPlane::new(Settings::default()));
    let gossip = Gossip::new(2, config(ttl), dataplane, Arc::new(Metrics::new()));
    gossip.set_peers(&member(1));
    let report = ::gossip::Report {
        node_id: 1,
        incarnation: 1,
        seq: 1,
        sent_at_ms: 0,
        entries: Vec::new(),
    };
    let received = Instant::now();
    let rtt = Duration::from_millis(100);
    gossip.report(
        ::gossip::Wire::Full(report),
        38,
        ::gossip::Arrival::with_rtt(received, rtt),
    );
    assert_eq!(
        gossip.last_report_age(1, received),
        Some(Duration::from_millis(50))
    );
    assert_eq!(gossip.lock().fresh_peers(received + ttl - rtt / 2), 1);
    assert_eq!(gossip.lock().fresh_peers(received + ttl - rtt / 4), 0);
}

/// A region's aggregate sums the instances of this node's groups only: a
/// region peer listing made-up instances, more than a report may carry,
/// leaves the sum (and so the aggregate, which can still be encoded) as it
/// would be without them.
#[test]
fn a_region_sum_leaves_out_instances_of_no_group() {
    let dataplane = routed(&Arc::new(LoadChanged::default()));
    let gossip = Gossip::new(
        2,
        config(Duration::from_secs(1)),
        dataplane,
        Arc::new(Metrics::new()),
    );
    let entry = |instance: [u8; 16], inflight| ::gossip::Entry {
        instance,
        inflight,
        long_inflight: 0,
        arrival_rate_milli: 0,
        mean_service_us: 0,
    };
    let known = Uuid::from_u128(1).into_bytes();
    let mut entries: Vec<::gossip::Entry> = (0..=::gossip::MAX_ENTRIES as u128)
        .map(|i| entry(Uuid::from_u128((1 << 64) + i).into_bytes(), 1))
        .collect();
    entries.push(entry(known, 3));
    entries.sort_by_key(|e| e.instance);
    let report = ::gossip::Report {
        node_id: 1,
        incarnation: 1,
        seq: 1,
        sent_at_ms: 0,
        entries,
    };
    super::locked(&gossip.chains)
        .apply(::gossip::Wire::Full(report))
        .expect("a full report");
    let sum = gossip.region_sum(&[1]);
    assert_eq!(sum, [entry(known, 3)]);
    let aggregate = ::gossip::Report {
        node_id: 2,
        incarnation: 1,
        seq: 1,
        sent_at_ms: 0,
        entries: sum,
    };
    assert!(::gossip::encode(&aggregate).is_ok());
}

/// `id` as the one peer, in this node's region (a `Gossip` made with
/// `new` has the empty one).
fn member(id: u64) -> Peers {
    let peer = Peer {
        addr: "127.0.0.1:1".into(),
        region: String::new(),
    };
    [(id, peer)].into_iter().collect()
}

/// Reports from a node that is not a member (removed, its certificate
/// still valid) are dropped and counted, and leave no load behind.
#[test]
fn a_report_from_a_node_that_is_not_a_member_counts_for_nothing() {
    use crate::cluster::GossipHandler;

    let dataplane = Arc::new(DataPlane::new(Settings::default()));
    let metrics = Arc::new(Metrics::new());
    let gossip = Gossip::new(
        2,
        config(Duration::from_secs(1)),
        dataplane,
        metrics.clone(),
    );
    gossip.set_peers(&member(1));
    let report = |node_id| ::gossip::Report {
        node_id,
        incarnation: 1,
        seq: 1,
        sent_at_ms: 0,
        entries: vec![::gossip::Entry {
            instance: Uuid::from_u128(1).into_bytes(),
            inflight: 2,
            long_inflight: 0,
            arrival_rate_milli: 0,
            mean_service_us: 0,
        }],
    };
    let now = Instant::now();
    gossip.report(::gossip::Wire::Full(report(3)), 60, now.into());
    assert_eq!(metrics.gossip.dropped_count("member"), 1);
    assert_eq!(gossip.last_report_age(3, now), None);
    gossip.report(::gossip::Wire::Full(report(1)), 60, now.into());
    assert_eq!(metrics.gossip.dropped_count("member"), 1);
    assert!(gossip.last_report_age(1, now).is_some());
    // Removed: its next report is dropped too.
    gossip.set_peers(&Peers::new());
    let mut next = report(1);
    next.seq = 2;
    gossip.report(::gossip::Wire::Full(next), 60, now.into());
    assert_eq!(metrics.gossip.dropped_count("member"), 2);
    assert_eq!(gossip.last_report_age(1, now), None);
}
