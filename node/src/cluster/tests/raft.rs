//! openraft clusters in-process over the QUIC transport: redb storage in
//! temp dirs, [`Network`], and a [`RaftHandler`] that dispatches to the Raft
//! handle the way the node does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};
use raft_store::model::{DEFAULT_HARD_LIMIT, Domain, Instance, Service, ServiceGroup};
use raft_store::types::Raft;
use raft_store::{
    Applied, AppliedState, ClusterNode, Command, LogStore, Request, State, StateMachineStore,
};
use tokio::sync::watch;
use tokio::time::timeout;
use uuid::Uuid;

use super::{loopback, node_tls, patience};
use crate::cluster::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "edgelb-cluster-{}-{}",
            std::process::id(),
            Uuid::new_v4().simple()
        ));
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct TestNode {
    id: u64,
    raft: Raft,
    transport: Arc<Transport>,
    state: watch::Receiver<AppliedState>,
    _dir: TempDir,
}

impl TestNode {
    async fn start(ca: &CaBundle, id: u64, config: &Arc<Config>) -> Self {
        let dir = TempDir::new();
        let log = LogStore::open(dir.path()).unwrap();
        let sm = StateMachineStore::open(dir.path()).unwrap();
        let state = sm.subscribe();
        let dispatch = Arc::new(crate::store::RaftRpc::new(
            Default::default(),
            crate::membership::Policy {
                max_voters: 5,
                alive_within: Duration::from_secs(1),
            },
            crate::health::Health::new(
                dir.path(),
                crate::health::MinFree::Bytes(0),
                &prometheus::Registry::new(),
            ),
        ));
        let handler: Arc<dyn RaftHandler> = dispatch.clone();
        let transport =
            Arc::new(Transport::bind(loopback(), &node_tls(ca, id), id, handler).unwrap());
        let network = Network::new(Arc::clone(&transport), dispatch.campaign());
        let raft = Raft::new(id, Arc::clone(config), network, log.clone(), sm)
            .await
            .unwrap();
        dispatch.set(raft.clone(), log, &transport);
        Self {
            id,
            raft,
            transport,
            state,
            _dir: dir,
        }
    }

    fn member(&self) -> ClusterNode {
        ClusterNode {
            region: "test".into(),
            cluster_addr: self.transport.local_addr().unwrap().to_string(),
            admin_addr: "127.0.0.1:1".into(),
        }
    }

    /// Waits until this node has applied a state satisfying `cond`.
    async fn applied(&mut self, what: &str, mut cond: impl FnMut(&Arc<State>) -> bool) {
        timeout(patience(), self.state.wait_for(|a| cond(&a.state)))
            .await
            .unwrap_or_else(|_| panic!("node {}: timed out waiting for {what}", self.id))
            .unwrap();
    }

    async fn stop(self) {
        self.raft.shutdown().await.unwrap();
        self.transport.close().await;
    }
}

fn config(extra: impl FnOnce(&mut Config)) -> Arc<Config> {
    let mut c = Config {
        cluster_name: "test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        ..Config::default()
    };
    extra(&mut c);
    Arc::new(c.validate().unwrap())
}

fn db_group() -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(1),
        name: "db".into(),
        domains: vec![Domain {
            fqdn: "db.edgelb.local".into(),
            certificate: None,
        }],
        services: vec![Service {
            port: 5432,
            destination_port: 5432,
            handlers: vec![],
        }],
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: vec![],
        created_at: "2024-01-01T00:00:00Z".into(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    }
}

fn attach(n: u128) -> Command {
    Command::AttachInstance {
        group: "db".into(),
        instance: Instance {
            uuid: Uuid::from_u128(100 + n),
            name: format!("db-{n}"),
            address: "10.0.0.1".into(),
        },
    }
}

async fn leader_of(raft: &Raft) -> u64 {
    let m = raft
        .wait(Some(patience()))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    m.current_leader.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_replicate_a_write() {
    let ca = generate_ca("test").unwrap();
    let config = config(|_| {});
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(TestNode::start(&ca, id, &config).await);
    }
    let members: BTreeMap<u64, ClusterNode> = nodes.iter().map(|n| (n.id, n.member())).collect();
    nodes[0].raft.initialize(members).await.unwrap();

    let leader = leader_of(&nodes[0].raft).await;
    let li = (leader - 1) as usize;
    let written = nodes[li]
        .raft
        .client_write(Request {
            command: Command::CreateGroup { group: db_group() },
        })
        .await
        .unwrap();
    assert!(matches!(written.data.result, Some(Ok(Applied::Group(_)))));
    for n in &mut nodes {
        n.applied("group db", |s| s.group("db").is_some()).await;
    }

    // A follower's forwarded write: the leader applies it and answers.
    let fi = (li + 1) % 3;
    let follower = nodes[fi].id;
    let leader_addr = nodes[li].member().cluster_addr;
    let reply = nodes[fi]
        .transport
        .call(
            leader,
            &leader_addr,
            Rpc::Forward(Forward::Write(attach(1))),
            patience(),
        )
        .await
        .unwrap();
    match reply {
        RpcReply::Forward(Ok(ForwardReply::Written { log_index, result })) => {
            assert!(log_index > written.log_id.index);
            assert!(matches!(result, Ok(Applied::Attached { .. })), "{result:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Sent to a follower instead, it says who leads.
    let follower_addr = nodes[fi].member().cluster_addr;
    let reply = nodes[li]
        .transport
        .call(
            follower,
            &follower_addr,
            Rpc::Forward(Forward::Write(attach(2))),
            patience(),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            &reply,
            RpcReply::Forward(Err(ForwardError::NotLeader { leader_id: Some(l), leader: Some(_) }))
                if *l == leader
        ),
        "{reply:?}"
    );
    for n in &mut nodes {
        n.applied("instance db-1", |s| {
            s.group("db").is_some_and(|g| g.instances.len() == 1)
        })
        .await;
    }
    for n in nodes {
        n.stop().await;
    }
}

/// A config for a leader that snapshots only when told and purges its
/// whole log behind, in small chunks, so that a snapshot crosses in several
/// InstallSnapshot RPCs (1 KiB on `edgelb-raft/2`: four times openraft's
/// chunk); and node 1 started with it, leading a cluster of itself.
async fn snapshotting_founder(ca: &CaBundle) -> (Arc<Config>, TestNode) {
    let config = config(|c| {
        c.snapshot_policy = SnapshotPolicy::Never;
        c.max_in_snapshot_log_to_keep = 0;
        c.purge_batch_size = 1;
        c.snapshot_max_chunk_size = 256;
        // A chunk's call is allowed what the node allows it, not
        // openraft's 200 ms (a link in these tests may be 70 ms long).
        c.install_snapshot_timeout = SNAPSHOT_CHUNK_TIMEOUT_MS;
    });
    let one = TestNode::start(ca, 1, &config).await;
    one.raft
        .initialize(BTreeMap::from([(1, one.member())]))
        .await
        .unwrap();
    assert_eq!(leader_of(&one.raft).await, 1);
    (config, one)
}

/// Has `node` take a snapshot and purge its log up to `last` behind it.
async fn snapshot_and_purge(node: &TestNode, last: openraft::LogId<u64>) {
    node.raft.trigger().snapshot().await.unwrap();
    node.raft
        .wait(Some(patience()))
        .purged(Some(last), "log purged behind the snapshot")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_catches_up_from_a_snapshot() {
    let ca = generate_ca("test").unwrap();
    let (config, one) = snapshotting_founder(&ca).await;
    let mut last = one
        .raft
        .client_write(Request::from(Command::CreateGroup { group: db_group() }))
        .await
        .unwrap()
        .log_id;
    for n in 1..=3 {
        last = one
            .raft
            .client_write(Request::from(attach(n)))
            .await
            .unwrap()
            .log_id;
    }
    snapshot_and_purge(&one, last).await;

    let mut two = TestNode::start(&ca, 2, &config).await;
    one.raft.add_learner(2, two.member(), true).await.unwrap();
    two.applied("three instances", |s| {
        s.group("db").is_some_and(|g| g.instances.len() == 3)
    })
    .await;
    two.raft
        .wait(Some(patience()))
        .metrics(|m| m.snapshot == Some(last), "the snapshot installed")
        .await
        .unwrap();
    assert!(two.transport.stats().requests_served > 1);
    one.stop().await;
    two.stop().await;
}

/// A learner gets a snapshot of 240 instances in chunks of 1 KiB, several
/// in flight at once, across a link of 20 ms ± 15 ms each way (datagrams
/// sent within 30 ms of each other arrive in any order, so later chunks
/// often come before earlier ones): openraft writes each at its offset,
/// and the state it installs is the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_installs_a_snapshot_whose_chunks_a_link_reorders() {
    let ca = generate_ca("test").unwrap();
    let (config, one) = snapshotting_founder(&ca).await;
    one.raft
        .client_write(Request::from(Command::CreateGroup { group: db_group() }))
        .await
        .unwrap();
    let batch = Command::Batch {
        commands: (1..=240).map(attach).collect(),
    };
    let last = one
        .raft
        .client_write(Request::from(batch))
        .await
        .unwrap()
        .log_id;
    snapshot_and_purge(&one, last).await;

    let mut two = TestNode::start(&ca, 2, &config).await;
    let link = super::Forwarder::jittered(
        two.transport.local_addr().unwrap(),
        Duration::from_millis(20),
        Duration::from_millis(15),
    )
    .await;
    let mut member = two.member();
    member.cluster_addr = link.addr.to_string();
    one.raft.add_learner(2, member, true).await.unwrap();
    two.raft
        .wait(Some(patience()))
        .metrics(|m| m.snapshot == Some(last), "the snapshot installed")
        .await
        .unwrap();
    two.applied("the leader's state", |s| {
        s.group("db").is_some_and(|g| g.instances.len() == 240)
    })
    .await;
    let (a, b) = (
        one.state.borrow().state.clone(),
        two.state.borrow().state.clone(),
    );
    assert_eq!(*a, *b);
    one.stop().await;
    two.stop().await;
}
