//! The batcher on a one-node store: concurrent writes share entries, each
//! caller gets its own answer, order holds, and a cluster with a member that
//! does not say it reads batches gets one entry per write; what a write
//! answers when it committed but is not routed by in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use raft_store::command::Command;
use raft_store::model::{Domain, Instance, Service, ServiceGroup};
use raft_store::state::{Applied, ApplyError};
use raft_store::types::ClusterNode;
use uuid::Uuid;

use super::{Batcher, Store, StoreError};

/// A data dir removed on drop.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn store() -> (Arc<Store>, Dir) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("edgelb-batch-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (store, _transport) = crate::raft::one_node_store(&dir)
        .await
        .expect("one-node store");
    (Arc::new(store), Dir(dir))
}

/// Proposes every command from its own task, started in order (so queued
/// in order), and returns the answers in that order.
async fn propose_all(store: &Arc<Store>, cmds: &[Command]) -> Vec<Result<Applied, StoreError>> {
    let tasks: Vec<_> = cmds
        .iter()
        .map(|c| {
            let (store, c) = (Arc::clone(store), c.clone());
            tokio::spawn(async move { store.propose(c).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("write task"));
    }
    out
}

fn create(name: &str) -> Command {
    Command::CreateGroup {
        group: ServiceGroup {
            uuid: Uuid::new_v4(),
            name: name.into(),
            domains: vec![Domain {
                fqdn: format!("{name}.test"),
                certificate: None,
            }],
            services: vec![Service {
                port: 8080,
                destination_port: 80,
                handlers: vec![raft_store::model::Handler::Http],
            }],
            hard_limit: 10,
            instances: vec![],
            created_at: "2026-01-01T00:00:00Z".into(),
            persistent: true,
            health_check: None,
            send_proxy_protocol: None,
        },
    }
}

fn attach(group: &str, name: &str) -> Command {
    Command::AttachInstance {
        group: group.into(),
        instance: Instance {
            uuid: Uuid::new_v4(),
            name: name.into(),
            address: "10.0.0.1".into(),
        },
    }
}

fn attached(r: &Result<Applied, StoreError>) -> Option<(&str, &str)> {
    match r {
        Ok(Applied::Attached { group, instance }) => Some((group, &instance.name)),
        _ => None,
    }
}

#[tokio::test]
async fn concurrent_writes_share_entries_and_each_caller_gets_its_answer() {
    let (store, _dir) = store().await;
    store.propose(create("web")).await.expect("create");
    let before = store.status().last_log_index;
    // Good and refused commands mixed: unknown group, taken name.
    let cmds: Vec<Command> = (0..32)
        .map(|i| match i % 4 {
            3 => attach("nope", &format!("i{i}")),
            2 if i > 2 => attach("web", &format!("i{}", i - 2)),
            _ => attach("web", &format!("i{i}")),
        })
        .collect();
    let results = propose_all(&store, &cmds).await;
    for (i, r) in results.iter().enumerate() {
        match i % 4 {
            3 => assert!(
                matches!(r, Err(StoreError::Apply(ApplyError::NotFound(_)))),
                "write {i}: {r:?}"
            ),
            2 if i > 2 => assert!(
                matches!(r, Err(StoreError::Apply(ApplyError::Conflict(_)))),
                "write {i}: {r:?}"
            ),
            _ => assert_eq!(
                attached(r),
                Some(("web", format!("i{i}").as_str())),
                "write {i}: {r:?}"
            ),
        }
    }
    let instances = store.state().group("web").map_or(0, |g| g.instances.len());
    assert_eq!(instances, 32 / 4 * 2 + 1);
    let entries = store.status().last_log_index - before;
    assert!(entries < 8, "32 concurrent writes took {entries} entries");
}

#[tokio::test]
async fn writes_queued_in_order_apply_in_order() {
    let (store, _dir) = store().await;
    // Queued before the batcher runs: one entry, applied in queue order.
    let answers: Vec<_> = [
        create("a"),
        attach("a", "x"),
        Command::DeleteGroup {
            id: "a".into(),
            force: true,
        },
        attach("a", "y"),
        create("a"),
        attach("a", "z"),
    ]
    .into_iter()
    .map(|c| store.batcher.submit(c))
    .collect();
    let mut results: Vec<Result<Applied, ApplyError>> = Vec::new();
    for a in answers {
        results.push(a.await.expect("written").1);
    }
    assert!(matches!(results[0], Ok(Applied::Group(_))), "{results:?}");
    assert!(
        matches!(results[1], Ok(Applied::Attached { .. })),
        "{results:?}"
    );
    assert!(matches!(results[2], Ok(Applied::Deleted(_))), "{results:?}");
    assert!(
        matches!(results[3], Err(ApplyError::NotFound(_))),
        "{results:?}"
    );
    assert!(matches!(results[4], Ok(Applied::Group(_))), "{results:?}");
    assert!(
        matches!(results[5], Ok(Applied::Attached { .. })),
        "{results:?}"
    );
    let names: Vec<String> = store
        .state()
        .group("a")
        .map(|g| g.instances.iter().map(|i| i.name.clone()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["z"]);
}

/// Adds learner 2 at an address nobody answers on: it never says what it
/// reads (learners do not count for the quorum, so writes still commit).
async fn add_silent_learner(store: &Store) -> ClusterNode {
    let silent = ClusterNode {
        region: "test".into(),
        cluster_addr: "127.0.0.1:9".into(),
        admin_addr: "127.0.0.1:9".into(),
    };
    store
        .raft()
        .add_learner(2, silent.clone(), false)
        .await
        .expect("add learner");
    silent
}

#[tokio::test]
async fn a_member_that_does_not_read_batches_gets_one_entry_per_write() {
    let (store, _dir) = store().await;
    store.propose(create("web")).await.expect("create");
    // A learner nobody answers for: it never says it reads batches (learners
    // do not count for the quorum, so writes still commit).
    add_silent_learner(&store).await;
    let before = store.status().last_log_index;
    let cmds: Vec<Command> = (0..8).map(|i| attach("web", &format!("i{i}"))).collect();
    let results = propose_all(&store, &cmds).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            attached(r),
            Some(("web", format!("i{i}").as_str())),
            "{r:?}"
        );
    }
    assert_eq!(store.status().last_log_index - before, 8);
}

fn set_limit(group: &str, limit: u32) -> Command {
    Command::PatchGroup {
        id: group.into(),
        patch: raft_store::command::Patch::HardLimit(limit),
    }
}

/// A patch (or certificate) goes as a request to apply once; a leader
/// drops the wrapper while a member does not say it reads it, and a
/// follower drops it before forwarding to a leader that does not.
#[tokio::test]
async fn a_patch_goes_once_only_to_nodes_that_read_it() {
    let (store, _dir) = store().await;
    store.propose(create("web")).await.expect("create");
    // A patch is wrapped, other writes are not.
    let wire = Batcher::once(set_limit("web", 5));
    let Command::Once { request, command } = &wire else {
        panic!("not wrapped: {wire:?}");
    };
    assert_eq!(**command, set_limit("web", 5));
    let attach = attach("web", "a");
    assert_eq!(Batcher::once(attach.clone()), attach);
    // Alone, this node reads it: proposed wrapped, remembered.
    let (_, applied) = store.batcher.submit(wire.clone()).await.expect("submit");
    assert!(matches!(applied, Ok(Applied::Group(g)) if g.hard_limit == 5));
    assert!(store.state().applied_request(request));
    // A patch proposed the usual way is remembered too.
    let before = store.state().requests_remembered();
    store.propose(set_limit("web", 6)).await.expect("patch");
    assert_eq!(store.state().requests_remembered(), before + 1);

    // A learner nobody answers for never says it reads it.
    let silent = add_silent_learner(&store).await;
    let request = Uuid::new_v4();
    let wrapped = Command::Once {
        request,
        command: Box::new(set_limit("web", 8)),
    };
    let (_, applied) = store.batcher.submit(wrapped.clone()).await.expect("submit");
    assert!(matches!(applied, Ok(Applied::Group(g)) if g.hard_limit == 8));
    assert!(
        !store.state().applied_request(&request),
        "proposed with the wrapper the learner cannot read"
    );
    // Were it the leader, a write forwarded to it would go bare; to this
    // node (which reads it), wrapped.
    assert_eq!(
        store.batcher.for_leader(&wrapped, 2, &silent).await,
        set_limit("web", 8)
    );
    assert_eq!(
        store.batcher.for_leader(&wrapped, 1, &silent).await,
        wrapped
    );
}

/// A member's yes stands while it does not answer: a member that is down
/// during the fault that makes a client send a patch again still counts,
/// so the patch goes as a request to apply once and writes still share
/// entries. A write that uses group options is the exception: it needs an
/// answer to its own ask from every member.
#[tokio::test]
async fn a_members_yes_stands_while_it_does_not_answer() {
    let (store, _dir) = store().await;
    store.propose(create("web")).await.expect("create");
    // Learner 2 said yes, then went down: nobody answers at its address.
    add_silent_learner(&store).await;
    store.batcher.heard(2);
    let options = Command::PatchGroup {
        id: "web".into(),
        patch: raft_store::command::Patch::SendProxyProtocol(None),
    };
    let (_, applied) = store
        .batcher
        .submit(Batcher::once(options))
        .await
        .expect("submit");
    match applied {
        Err(ApplyError::Conflict(why)) => assert!(why.contains("member 2 did not say"), "{why}"),
        other => panic!("group options with member 2 down: {other:?}"),
    }
    // That write asked member 2 and got no answer; its yes still stands.
    let request = Uuid::new_v4();
    let wrapped = Command::Once {
        request,
        command: Box::new(set_limit("web", 4)),
    };
    let (_, applied) = store.batcher.submit(wrapped).await.expect("submit");
    assert!(matches!(applied, Ok(Applied::Group(g)) if g.hard_limit == 4));
    assert!(
        store.state().applied_request(&request),
        "proposed bare while member 2 does not answer"
    );
    let before = store.status().last_log_index;
    let cmds: Vec<Command> = (0..32).map(|i| attach("web", &format!("i{i}"))).collect();
    for r in propose_all(&store, &cmds).await {
        assert!(attached(&r).is_some(), "{r:?}");
    }
    let entries = store.status().last_log_index - before;
    assert!(entries < 8, "32 concurrent writes took {entries} entries");
}

/// What a member said it reads is forgotten once it leaves the
/// membership, so a node that joins again under its id (perhaps running
/// another release) is asked afresh.
#[tokio::test]
async fn a_removed_member_is_asked_afresh() {
    let (store, _dir) = store().await;
    store.propose(create("web")).await.expect("create");
    add_silent_learner(&store).await;
    // A wrapped write makes the leader ask it (and wait for the answer).
    let (_, applied) = store
        .batcher
        .submit(Batcher::once(set_limit("web", 3)))
        .await
        .expect("submit");
    assert!(applied.is_ok(), "{applied:?}");
    assert!(store.batcher.knows(2));
    store.remove_node(2).await.expect("remove the learner");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.batcher.knows(2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "member 2's answer kept after its removal"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Once its Raft core stopped (a node stopping, or handing over to a new
/// process while its endpoint still answers), a call is answered without
/// reaching openraft, which would log it as an error.
#[tokio::test]
async fn a_stopped_raft_answers_calls_without_reaching_the_core() {
    let (store, _dir) = store().await;
    store.raft().shutdown().await.expect("shutdown");
    let heartbeat = openraft::raft::AppendEntriesRequest {
        vote: openraft::Vote::new_committed(2, 2),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };
    let reply = store
        .transport()
        .handler()
        .handle(2, crate::cluster::Rpc::AppendEntries(heartbeat))
        .await;
    assert!(
        matches!(&reply, crate::cluster::RpcReply::Error(e) if e == "raft stopped"),
        "{reply:?}"
    );
}

/// A write that committed but that this node's data plane does not route
/// by within the write promise answers 503 saying so, with its log index,
/// not "no quorum": sending it again may find it done. One the state
/// machine refused answers its refusal.
#[tokio::test]
async fn a_committed_write_the_data_plane_has_not_routed_says_it_committed() {
    let (store, _dir) = store().await;
    // A data plane that never publishes a new routing table.
    let (_routed, stuck) = tokio::sync::watch::channel(0);
    store.route_by(stuck);
    let e = store.propose(create("late")).await.unwrap_err();
    let StoreError::NotYetApplied { index } = e else {
        panic!("{e}");
    };
    assert_eq!(e.status(), 503);
    assert!(
        e.to_string()
            .contains(&format!("committed (log index {index})")),
        "{e}"
    );
    // Committed and applied indeed.
    assert!(store.state().group("late").is_some());
    // A write the state machine refuses changes nothing: its refusal is
    // the answer.
    let e = store.propose(create("late")).await.unwrap_err();
    assert!(matches!(e, StoreError::Apply(_)), "{e}");
    assert_eq!(e.status(), 409);
}

/// A removal sent again after an attempt that may have committed, and that
/// finds its target gone, answers what it removed before the first try,
/// whichever way it was sent again (forwarded, or through this node's own
/// log once it leads); any other answer stands.
#[test]
fn a_removal_sent_again_that_finds_its_target_gone_answers_what_it_removed() {
    use super::settle;

    let Command::CreateGroup { group } = create("gone") else {
        unreachable!()
    };
    let removed = Some(Applied::Deleted(group.clone()));
    let gone = || {
        Err(ApplyError::NotFound(
            "service group \"gone\" not found".into(),
        ))
    };
    assert_eq!(
        settle(gone(), &removed, true),
        Ok(Applied::Deleted(group.clone()))
    );
    // Sent once: the answer stands.
    assert!(settle(gone(), &removed, false).is_err());
    // Not a removal seen before the first try.
    assert!(settle(gone(), &None, true).is_err());
    let conflict = Err(ApplyError::Conflict("in use".into()));
    assert_eq!(settle(conflict.clone(), &removed, true), conflict);
}
