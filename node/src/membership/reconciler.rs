//! The one owner of membership changes on the leader.
//!
//! openraft refuses (and logs at ERROR) a change while another is being
//! committed, so every change this node makes goes through one task, one
//! at a time, each awaited before the next:
//!
//! ```text
//!  join (add a learner) ──┐
//!  remove a node ─────────┼─▶ queue ─▶ task: the change asked for, then passes
//!  settle (a join waits) ─┘             of the promotion policy until nothing
//!  every PROMOTE_EVERY, a role change ──▶ is left to change (one change per pass)
//! ```
//!
//! A pass acts only when this node leads and the membership in force is
//! committed: a new leader first commits what its predecessor left, and a
//! joint configuration left half-done is finished before anything else.
//! Each change is bounded by [`CHANGE_TIMEOUT`]: without a quorum it is
//! given up (the entry stays in the log; a later pass finds it committed
//! or still pending), so the task never stops for good.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

use openraft::{ChangeMembers, Membership, ServerState};
use raft_store::types::{ClusterNode, NodeId, Raft};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info};

use super::{CommitHistory, PROMOTE_EVERY, Policy, caught_up, committed, promotions};
use crate::cluster::{ForwardError, Transport};

/// How long one membership change may take before it is given up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Changes one pass may make in a row (a joint configuration to finish,
/// then promotions).
const MAX_CHANGES: usize = 4;
/// How often the membership in force is looked at while a new leader
/// commits it.
const COMMIT_POLL: Duration = Duration::from_millis(20);

type Reply = oneshot::Sender<Result<u64, ForwardError>>;

enum Job {
    /// Add a learner; answers the index of the entry that added it.
    Add {
        id: NodeId,
        node: ClusterNode,
        reply: Reply,
    },
    /// Remove a node (voter or learner); answers the index of the change.
    Remove { id: NodeId, reply: Reply },
    /// Run the promotion policy now, waiting a little for live learners
    /// to catch up; answers the index of the membership in force after.
    Settle { reply: Reply },
}

/// The handle to this node's membership task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Reconciler {
    tx: mpsc::UnboundedSender<Job>,
}

impl Reconciler {
    /// Starts the task; it ends when Raft stops.
    pub(crate) fn start(raft: Raft, transport: Weak<Transport>, policy: Policy) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            raft,
            transport,
            policy,
            history: std::sync::Mutex::default(),
        };
        tokio::spawn(task.run(rx));
        Self { tx }
    }

    /// On the leader: adds `id` as a learner (nothing to do if it is a
    /// member already). Answers the index of the membership that holds it.
    pub(crate) async fn add(&self, id: NodeId, node: ClusterNode) -> Result<u64, ForwardError> {
        self.ask(|reply| Job::Add { id, node, reply }).await
    }

    /// On the leader: removes `id` from the membership.
    pub(crate) async fn remove(&self, id: NodeId) -> Result<u64, ForwardError> {
        self.ask(|reply| Job::Remove { id, reply }).await
    }

    /// On the leader: applies the promotion policy now, and answers the
    /// index of the membership in force once nothing is left to change.
    pub(crate) async fn settle(&self) -> Result<u64, ForwardError> {
        self.ask(|reply| Job::Settle { reply }).await
    }

    async fn ask(&self, job: impl FnOnce(Reply) -> Job) -> Result<u64, ForwardError> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(job(reply)).is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> ForwardError {
    ForwardError::Failed("the node's Raft is stopping".into())
}

/// What the leader's Raft holds as its membership.
struct View {
    membership: Membership<NodeId, ClusterNode>,
    /// Index of the entry that holds it.
    index: u64,
}

struct Task {
    raft: Raft,
    transport: Weak<Transport>,
    policy: Policy,
    /// The leader's commit index at each pass while it leads: what a
    /// learner must hold to count as caught up (`caught_up`).
    history: std::sync::Mutex<CommitHistory>,
}

impl Task {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        // Role and membership changes wake the task early.
        let mut server = self.raft.server_metrics();
        let mut next_pass = Instant::now() + PROMOTE_EVERY;
        loop {
            let mut jobs = Vec::new();
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => jobs.push(job),
                    None => return,
                },
                changed = server.changed() => if changed.is_err() {
                    return;
                },
                () = tokio::time::sleep_until(next_pass) => {}
            }
            if self.raft.metrics().borrow().running_state.is_err() {
                return;
            }
            while let Ok(job) = rx.try_recv() {
                jobs.push(job);
            }
            let mut settles = Vec::new();
            for job in jobs {
                match job {
                    Job::Add { id, node, reply } if !reply.is_closed() => {
                        let _ = reply.send(self.add(id, node).await);
                    }
                    Job::Remove { id, reply } if !reply.is_closed() => {
                        let _ = reply.send(self.remove(id).await);
                    }
                    Job::Settle { reply } => settles.push(reply),
                    // The caller gave up waiting.
                    Job::Add { .. } | Job::Remove { .. } => {}
                }
            }
            let settled = self.settle(!settles.is_empty()).await;
            for reply in settles {
                let _ = reply.send(settled.clone());
            }
            next_pass = Instant::now() + PROMOTE_EVERY;
        }
    }

    /// The membership in force, once this node leads and it is committed
    /// (a new leader commits its predecessor's last change first).
    async fn view(&self) -> Result<View, ForwardError> {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        loop {
            let seen = self
                .raft
                .with_raft_state(|st| {
                    let effective = st.membership_state.effective();
                    (
                        st.server_state == ServerState::Leader,
                        effective.log_id() == st.membership_state.committed().log_id(),
                        View {
                            membership: effective.membership().clone(),
                            index: effective.log_id().map_or(0, |l| l.index),
                        },
                    )
                })
                .await
                .map_err(|e| ForwardError::Failed(e.to_string()))?;
            match seen {
                (false, ..) => return Err(self.not_leader()),
                (true, true, view) => return Ok(view),
                (true, false, view) if Instant::now() >= deadline => {
                    return Err(ForwardError::Busy(format!(
                        "the membership change at index {} is not committed yet",
                        view.index
                    )));
                }
                _ => tokio::time::sleep(COMMIT_POLL).await,
            }
        }
    }

    fn not_leader(&self) -> ForwardError {
        let m = self.raft.metrics().borrow().clone();
        let leader_id = m.current_leader.filter(|&l| l != m.id);
        let leader = leader_id.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        ForwardError::NotLeader { leader_id, leader }
    }

    /// Makes one change and waits until it is committed, within
    /// [`CHANGE_TIMEOUT`].
    async fn change(
        &self,
        change: ChangeMembers<NodeId, ClusterNode>,
        retain: bool,
    ) -> Result<u64, ForwardError> {
        let work = self.raft.change_membership(change, retain);
        match tokio::time::timeout(CHANGE_TIMEOUT, work).await {
            Ok(r) => Ok(r?.log_id.index),
            Err(_) => Err(ForwardError::NoQuorum(format!(
                "the membership change was not committed within {CHANGE_TIMEOUT:?}"
            ))),
        }
    }

    async fn add(&self, id: NodeId, node: ClusterNode) -> Result<u64, ForwardError> {
        let view = self.finished_view().await?;
        if view.membership.get_node(&id) == Some(&node) {
            return Ok(view.index);
        }
        info!(node_id = id, "adding a learner");
        let added = self.raft.add_learner(id, node, false);
        match tokio::time::timeout(CHANGE_TIMEOUT, added).await {
            Ok(r) => Ok(r?.log_id.index),
            Err(_) => Err(ForwardError::NoQuorum(format!(
                "adding node {id} was not committed within {CHANGE_TIMEOUT:?}"
            ))),
        }
    }

    async fn remove(&self, id: NodeId) -> Result<u64, ForwardError> {
        let view = self.finished_view().await?;
        let m = &view.membership;
        if m.voter_ids().any(|v| v == id) {
            if m.voter_ids().all(|v| v == id) {
                return Err(ForwardError::Membership(
                    "cannot remove the last voter".into(),
                ));
            }
            info!(node_id = id, "removing a voter");
            return self
                .change(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await;
        }
        if m.get_node(&id).is_none() {
            return Err(ForwardError::Membership(format!(
                "node {id} is not a member"
            )));
        }
        info!(node_id = id, "removing a learner");
        self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
    }

    /// The membership in force, after finishing a joint configuration a
    /// previous leader (or a change given up) left behind.
    async fn finished_view(&self) -> Result<View, ForwardError> {
        let view = self.view().await?;
        let configs = view.membership.get_joint_config();
        let Some(last) = configs.last().filter(|_| configs.len() > 1) else {
            return Ok(view);
        };
        info!(voters = ?last, "finishing a joint membership");
        self.change(ChangeMembers::ReplaceAllVoters(last.clone()), true)
            .await?;
        self.view().await
    }

    /// Passes of the promotion policy until one changes nothing; answers
    /// the index of the membership in force then. With `wait`, a pass
    /// waits (up to the policy's `alive_within`) for live learners it
    /// would promote to catch up, as a join does.
    async fn settle(&self, wait: bool) -> Result<u64, ForwardError> {
        if !wait && self.raft.metrics().borrow().state != ServerState::Leader {
            // Samples from before a time this node did not lead would
            // tell of a commit index older than their time.
            self.history().clear();
            return Err(self.not_leader());
        }
        for _ in 0..MAX_CHANGES {
            let view = self.finished_view().await?;
            let Some(ids) = self.promotable(&view, wait).await else {
                return Ok(view.index);
            };
            let voters = view.membership.voter_ids().count();
            info!(
                ?ids,
                voters,
                max_voters = self.policy.max_voters,
                "promoting caught-up learners to voters"
            );
            self.change(ChangeMembers::AddVoterIds(ids), true).await?;
        }
        Ok(self.view().await?.index)
    }

    /// The learners to promote now, if any.
    async fn promotable(&self, view: &View, wait: bool) -> Option<BTreeSet<NodeId>> {
        let transport = self.transport.upgrade()?;
        let Policy {
            max_voters,
            alive_within,
        } = self.policy;
        let voters = view.membership.voter_ids().count();
        let now_committed = committed(&self.raft);
        self.history().record(Instant::now(), now_committed);
        // Adding a node: what is committed as the wait begins, a target
        // that stays put.
        let target = if wait { now_committed } else { 0 };
        if wait {
            // The live learners the policy would take, were they caught up.
            let alive: Vec<NodeId> = view
                .membership
                .learner_ids()
                .filter(|id| transport.answered_within(*id, alive_within))
                .collect();
            let want = promotions(voters, max_voters, &alive);
            if !want.is_empty() {
                let waited = self
                    .raft
                    .wait(Some(alive_within))
                    .metrics(
                        |m| {
                            want.iter().all(|id| {
                                m.replication
                                    .as_ref()
                                    .and_then(|r| r.get(id).copied().flatten())
                                    .is_some_and(|l| l.index >= target)
                            })
                        },
                        "learners to promote caught up",
                    )
                    .await;
                if waited.is_err() {
                    debug!(?want, "not every learner to promote caught up in time");
                }
            }
        }
        let ids = promotions(
            voters,
            max_voters,
            &caught_up(
                &self.raft,
                &transport,
                alive_within,
                target,
                &self.history(),
            ),
        );
        (!ids.is_empty()).then(|| ids.into_iter().collect())
    }

    fn history(&self) -> std::sync::MutexGuard<'_, CommitHistory> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
