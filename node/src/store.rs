//! The one door through which the node's replicated state changes.
//!
//! Every change is a [`Command`] handed to [`Store::propose`], which appends
//! it to the Raft log (openraft). Once committed, every node's state machine
//! applies it with `State::apply` and publishes the new state on a watch
//! channel that the data plane and the admin API read; the data plane never
//! waits on consensus.
//!
//! ```text
//!  admin API ─Command─▶ Store::propose ─▶ leader? ─yes─▶ raft.client_write ─▶ log ─▶ quorum
//!                              │                                                 │
//!                              └─no─▶ Forward::Write over QUIC to the leader ───┘
//!                                                                                ▼
//!  data plane ◀─watch─ State (every node applies the committed entry)
//! ```
//!
//! A write answers after it is committed, applied on this node **and** its
//! data plane routes by it: the routing table was rebuilt from a state at or
//! past the entry's index ([`Store::route_by`]). So the next request to the
//! node that answered sees the change. Without a quorum it fails with 503
//! within 5 s (its work stops 100 ms earlier, leaving room for the answer);
//! it never hangs. Once the node stops ([`Store::stop`]), writes, reads and
//! membership changes still waiting answer 503 at once, so that none holds
//! the exit.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::ServerState;
use openraft::error::RaftError;
use raft_store::AppliedState;
use raft_store::command::Command;
use raft_store::state::{Applied, ApplyError, State};
use raft_store::types::{ClusterNode, Raft};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, info, warn};

use crate::cluster::{
    Forward, ForwardError, ForwardReply, HandlerFuture, RaftHandler, Rpc, RpcReply, Transport,
};
use crate::health::{Health, Refusal};
use crate::membership::{Policy, Reconciler};

mod batch;
mod senders;
pub use batch::Batcher;
/// A node's role in the Raft membership, as `GET /v1/cluster` shows it.
pub use edgelb_api::cluster::Role;

/// Now in RFC 3339, whole seconds, UTC (the times the API writes into the
/// state and backups).
pub(crate) fn now_rfc3339() -> Result<String, time::error::Format> {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
}

/// The backup of `state`, applied up to `index` on node `node_id`
/// (`GET /v1/cluster/backup`, and `crate::restore` from a survivor's data
/// dir); `None` before the cluster is founded (no CA to keep).
pub fn backup_of(state: &State, index: u64, node_id: u64) -> Option<edgelb_api::cluster::Backup> {
    Some(edgelb_api::cluster::Backup {
        format: edgelb_api::cluster::BACKUP_FORMAT,
        taken_at: now_rfc3339().unwrap_or_default(),
        node_id,
        applied_index: index,
        cluster: state.cluster()?.clone(),
        groups: state.groups().cloned().collect(),
        certificates: state.certificates().cloned().collect(),
    })
}

#[cfg(test)]
mod tests;

/// Why a proposal failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The command was refused by the state machine's rules.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// No quorum or no leader: the change was not committed and applied
    /// within the write promise (503).
    #[error(
        "no quorum: the change was not committed and applied within {} s",
        WRITE_PROMISE.as_secs()
    )]
    NoQuorum,
    /// The node is stopping, or its Raft core stopped: the reason its
    /// health recorded (a storage failure names the data dir) (503).
    #[error("{0}")]
    Stopped(String),
    /// A call to the leader failed (503).
    #[error(transparent)]
    Cluster(#[from] ForwardError),
    /// openraft failed to answer (503).
    #[error("{0}")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The data plane stopped before it routed by the change (503).
    #[error("the data plane stopped before it routed by the change")]
    NotRouted,
    /// The change was committed, but this node's data plane did not route
    /// by it within the write promise (the node had not applied it, or had
    /// not published the routing table): it will, and sending the change
    /// again may find it done (503).
    #[error(
        "the change was committed (log index {index}) but this node does not route by it \
         within {} s; it will once it has applied it",
        WRITE_PROMISE.as_secs()
    )]
    NotYetApplied { index: u64 },
    /// The data dir of this node (or of the leader) is below its
    /// free-space floor: refused before it reached the log (507). The
    /// leader's refusal arrives as its text.
    #[error("{0}")]
    DiskFull(String),
}

impl StoreError {
    /// HTTP status for the admin API.
    pub fn status(&self) -> u16 {
        match self {
            Self::Apply(e) => e.status(),
            Self::NoQuorum
            | Self::Stopped(_)
            | Self::Cluster(_)
            | Self::Raft(_)
            | Self::NotRouted
            | Self::NotYetApplied { .. } => 503,
            Self::DiskFull(_) => 507,
        }
    }
}

impl From<Refusal> for StoreError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::DiskFull(full) => Self::DiskFull(full.to_string()),
            Refusal::Failed(reason) => Self::Stopped(reason),
        }
    }
}

/// One member as `GET /v1/cluster` shows it.
#[derive(Clone, Debug)]
pub struct Member {
    pub node_id: u64,
    pub node: ClusterNode,
    pub role: Role,
    pub is_leader: bool,
}

/// A snapshot of this node's Raft view.
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    /// Last log index covered by this node's snapshot (built or installed).
    pub snapshot_index: u64,
    pub is_leader: bool,
    pub members: Vec<Member>,
}

/// The node's replicated state, behind Raft.
pub struct Store {
    node_id: u64,
    raft: Raft,
    transport: Arc<Transport>,
    state: watch::Receiver<AppliedState>,
    /// The index the data plane's routing table was built from, once a data
    /// plane serves this store.
    routed: std::sync::OnceLock<watch::Receiver<u64>>,
    committed: Arc<AtomicU64>,
    /// Who makes this node's membership changes when it leads.
    reconciler: Reconciler,
    /// Where this node's writes are proposed when it leads.
    batcher: Batcher,
    /// Cancelled when the node stops: what still waits answers 503.
    stopping: tokio_util::sync::CancellationToken,
    /// Whether this node can write: checked before every proposal.
    health: Arc<Health>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// How long a forwarded write waits for the leader's answer before it looks
/// again at who leads: short, so that a leader that died (its QUIC
/// connection silent, not closed) costs one such wait, and the write goes
/// to the newly elected leader within its 5 s (a leader elected just after
/// a look costs two). While the same node leads, the call goes on
/// ([`Forwarding`]) rather than being sent again.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Kept between a forwarded write's call's own limit and the write's end.
const FORWARD_ROOM: Duration = Duration::from_millis(100);

/// A forwarded write's call to `leader`, allowed the write's time:
/// a write whose answer takes longer than [`FORWARD_TIMEOUT`] (a large
/// command across a far link, a leader whose quorum is slow) is waited for
/// again while `leader` still leads, instead of being sent again whole
/// (a 900 KB group through a node 150 ms from the leader, whose commit
/// waited for that node, crossed twice). Aborted when dropped, which
/// resets its stream.
struct Forwarding {
    leader: u64,
    task: AbortOnDropHandle<Result<ForwardReply, ForwardError>>,
}

impl Store {
    /// The store of node `node_id`; its writes go through the batcher and
    /// reconciler that [`RaftRpc::set`] started, while `health` allows them.
    pub fn new(
        node_id: u64,
        raft: Raft,
        transport: Arc<Transport>,
        state: watch::Receiver<AppliedState>,
        committed: Arc<AtomicU64>,
        (batcher, reconciler): (Batcher, Reconciler),
        health: Arc<Health>,
    ) -> Self {
        Self {
            node_id,
            raft,
            transport,
            state,
            routed: std::sync::OnceLock::new(),
            committed,
            reconciler,
            batcher,
            stopping: tokio_util::sync::CancellationToken::new(),
            health,
        }
    }

    /// The node is stopping: writes, linearizable reads and membership
    /// changes waiting on a quorum answer 503 now, and later ones at once
    /// (a node leaving the membership at exit still removes itself).
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    /// `work`, unless the node stops first.
    async fn unless_stopping<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::select! {
            biased;
            () = self.stopping.cancelled() => Err(StoreError::Stopped(
                self.health.failure().unwrap_or_else(|| "the node is shutting down".into()),
            )),
            r = work => r,
        }
    }

    /// Whether this node can write.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The cluster transport.
    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The current state (this node's applied copy).
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().state.clone()
    }

    /// A receiver that sees every applied state with its index.
    pub fn subscribe(&self) -> watch::Receiver<AppliedState> {
        self.state.clone()
    }

    /// From now on writes answer once `routed` (the index of the state the
    /// data plane routes by) reaches them, not merely once applied. Set
    /// once, by the task that publishes routing tables; later calls are
    /// ignored.
    pub fn route_by(&self, routed: watch::Receiver<u64>) {
        let _ = self.routed.set(routed);
    }

    /// Commits `cmd` through the leader and answers once this node's data
    /// plane routes by it.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, StoreError> {
        self.health.writable()?;
        self.unless_stopping(async {
            let deadline = Instant::now() + WRITE_TIMEOUT;
            // A forwarded write whose answer was lost (a connection lost, a
            // leader that changed while it waited) is sent again, and may
            // have committed the first time. Creating a group or attaching
            // an instance carries the uuid chosen for this request, so the
            // state machine answers the retry as applied; a detach or delete
            // finds its target gone instead, and answers what it removed as
            // this node saw it before the first try (`settle`); a patch's
            // `add` or `del` finds its change done, and is judged against
            // the state it committed into, once this node routes by it.
            let before = match &cmd {
                Command::DetachInstance { .. } | Command::DeleteGroup { .. } => {
                    self.state().check(&cmd).ok()
                }
                _ => None,
            };
            // A patch or a certificate goes as a request to apply once,
            // so that a retry whose first try committed changes nothing.
            let wire = Batcher::once(cmd.clone());
            let written = self.write(&wire, deadline);
            let result = tokio::time::timeout_at(deadline, written).await;
            let Written {
                index,
                result,
                sent_again,
            } = result.map_err(|_| StoreError::NoQuorum)??;
            let result = settle(result, &before, sent_again);
            match (self.wait_routed(index, deadline).await, result) {
                (Ok(()), Err(refused)) if sent_again => {
                    match self.state().shows_patch(&cmd, &refused) {
                        Some(applied) => {
                            info!("a patch sent again found its change done");
                            Ok(applied)
                        }
                        None => Err(StoreError::Apply(refused)),
                    }
                }
                (Ok(()), result) => result.map_err(StoreError::Apply),
                // Such a refusal cannot be judged before this node applied
                // it: committed, not known to be done.
                (Err(StoreError::NotYetApplied { index }), Err(refused))
                    if sent_again && State::refused_as_done(&cmd, &refused) =>
                {
                    Err(StoreError::NotYetApplied { index })
                }
                // Refused by the state machine: nothing changed, and the
                // refusal is the answer.
                (Err(StoreError::NotYetApplied { .. }), Err(refused)) => {
                    Err(StoreError::Apply(refused))
                }
                (Err(e), _) => Err(e),
            }
        })
        .await
    }

    /// Commits `cmd` (through the leader), by `deadline`: its log index,
    /// what the state machine answered, and whether it was sent again.
    async fn write(&self, cmd: &Command, deadline: Instant) -> Result<Written, StoreError> {
        let mut backoff = Duration::from_millis(20);
        let mut lost = false;
        let mut forwarding: Option<Forwarding> = None;
        loop {
            // A follower that knows the leader forwards at once; the leader
            // (or a node that does not know) queues the write in its
            // batcher, which answers who leads when it does not.
            let known = self.known_leader();
            if let Some(f) = &forwarding
                && known.as_ref().is_none_or(|(id, _)| *id != f.leader)
            {
                // Sent to a node that no longer leads: dropped (its stream
                // reset), though it may have committed.
                forwarding = None;
                lost = true;
            }
            let leader = match known {
                Some(leader) => Some(leader),
                None => match self.batcher.submit(cmd.clone()).await {
                    Ok((log_index, result)) => {
                        return Ok(Written {
                            index: log_index,
                            result,
                            sent_again: lost,
                        });
                    }
                    Err(ForwardError::NotLeader { leader_id, leader }) => leader_id.zip(leader),
                    Err(e) => return Err(self.refused(e)),
                },
            };
            if let Some((id, node)) = leader {
                let call = match &mut forwarding {
                    Some(f) => f,
                    slot => {
                        let f = Forward::Write(self.batcher.for_leader(cmd, id, &node).await);
                        let (transport, addr) = (Arc::clone(&self.transport), node.cluster_addr);
                        // Ending a moment before the write does, so that a
                        // call that timed out is the transport's to judge
                        // (a connection the leader no longer serves is
                        // dropped for the next write).
                        let limit = deadline
                            .saturating_duration_since(Instant::now())
                            .saturating_sub(FORWARD_ROOM)
                            .max(FORWARD_ROOM);
                        let task = AbortOnDropHandle::new(tokio::spawn(
                            async move { forward_to(&transport, id, &addr, f, limit).await }
                                .in_current_span(),
                        ));
                        slot.insert(Forwarding { leader: id, task })
                    }
                };
                let Ok(answer) = tokio::time::timeout(FORWARD_TIMEOUT, &mut call.task).await else {
                    debug!(
                        leader = id,
                        "no answer to the forwarded write yet; who leads?"
                    );
                    continue;
                };
                forwarding = None;
                let answer = answer.unwrap_or_else(|e| {
                    Err(ForwardError::Failed(format!(
                        "the forwarded write's task: {e}"
                    )))
                });
                match answer {
                    Ok(ForwardReply::Written { log_index, result }) => {
                        return Ok(Written {
                            index: log_index,
                            result,
                            sent_again: lost,
                        });
                    }
                    Ok(other) => {
                        lost = true;
                        warn!(?other, "unexpected reply to a forwarded write");
                    }
                    Err(ForwardError::Failed(msg)) if crate::health::is_disk_full(&msg) => {
                        return Err(StoreError::DiskFull(msg));
                    }
                    Err(e) => {
                        lost = true;
                        debug!(leader = id, error = %e, "forwarding the write failed; retrying");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
        }
    }

    /// A local write's failure as the client sees it: once the Raft core
    /// stopped, why it did (naming the data dir).
    fn refused(&self, e: ForwardError) -> StoreError {
        match &self.raft.metrics().borrow().running_state {
            Err(f @ openraft::error::Fatal::StorageError(_)) => {
                StoreError::Stopped(self.health.storage_failure(f))
            }
            _ => StoreError::Cluster(e),
        }
    }

    /// The leader this node's Raft names, when it is another node.
    fn known_leader(&self) -> Option<(u64, ClusterNode)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader.filter(|&id| id != self.node_id)?;
        if m.state == ServerState::Leader {
            return None;
        }
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    async fn forward(
        &self,
        leader: u64,
        node: &ClusterNode,
        f: Forward,
    ) -> Result<ForwardReply, ForwardError> {
        // Adding a node waits for it to catch up and be promoted: several
        // round trips, so it may take what is left of the write's time.
        let limit = match f {
            Forward::AddLearner { .. } => WRITE_TIMEOUT,
            _ => FORWARD_TIMEOUT,
        };
        forward_to(&self.transport, leader, &node.cluster_addr, f, limit).await
    }

    /// What the membership this node has applied records for it (its
    /// region and addresses), when it is a member. Asked of Raft itself,
    /// not of its metrics: right after start the metrics may not show the
    /// membership loaded from disk yet (and a restarted member would then
    /// go through the join again).
    pub async fn recorded_self(&self) -> Option<ClusterNode> {
        let id = self.node_id;
        self.raft
            .with_raft_state(move |st| {
                st.membership_state
                    .effective()
                    .membership()
                    .get_node(&id)
                    .cloned()
            })
            .await
            .ok()
            .flatten()
    }

    /// Whether this node is in the membership it has applied.
    pub async fn is_member(&self) -> bool {
        self.recorded_self().await.is_some()
    }

    /// Waits until this node applied `index`, for at most `limit`.
    pub async fn wait_applied_within(&self, index: u64, limit: Duration) -> Result<(), StoreError> {
        self.raft
            .wait(Some(limit))
            .applied_index_at_least(Some(index), "applied the join")
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Raft(Box::new(e)))
    }

    /// Where every write waits before it answers: until the data plane
    /// routes by `index` (applied on this node, when no data plane serves
    /// the store), bounded by `deadline`.
    async fn wait_routed(&self, index: u64, deadline: Instant) -> Result<(), StoreError> {
        let Some(routed) = self.routed.get() else {
            return match self.wait_applied(index, deadline).await {
                Err(StoreError::NoQuorum) => Err(StoreError::NotYetApplied { index }),
                r => r,
            };
        };
        let mut routed = routed.clone();
        match tokio::time::timeout_at(deadline, routed.wait_for(|r| *r >= index)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::NotRouted),
            Err(_) => Err(StoreError::NotYetApplied { index }),
        }
    }

    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), StoreError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "applied on this node")
            .await
            .map(|_| ())
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => StoreError::NoQuorum,
                openraft::metrics::WaitError::ShuttingDown => {
                    StoreError::Stopped("the node's Raft core is shutting down".into())
                }
            })
    }

    /// Makes the next local read linearizable: confirms leadership with a
    /// quorum (through the leader when this node is not it) and waits until
    /// this node has applied up to the read index.
    pub async fn linearize(&self) -> Result<(), StoreError> {
        self.unless_stopping(self.linearize_now()).await
    }

    async fn linearize_now(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        let read = async {
            loop {
                match self.raft.ensure_linearizable().await {
                    Ok(log_id) => return Ok(log_id.map_or(0, |l| l.index)),
                    Err(RaftError::APIError(
                        openraft::error::CheckIsLeaderError::ForwardToLeader(f),
                    )) => {
                        if let Some((id, node)) = f.leader_id.zip(f.leader_node)
                            && let Ok(ForwardReply::Linearized { read_index }) =
                                self.forward(id, &node, Forward::Linearize).await
                        {
                            return Ok(read_index);
                        }
                    }
                    Err(e) => return Err(StoreError::Raft(Box::new(e))),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let index = tokio::time::timeout_at(deadline, read)
            .await
            .map_err(|_| StoreError::NoQuorum)??;
        self.wait_applied(index, deadline).await
    }

    /// Adds a node as a learner (through the leader). It is promoted to voter
    /// by the leader once caught up while there are fewer than `max_voters`.
    pub async fn add_learner(&self, id: u64, node: ClusterNode) -> Result<u64, StoreError> {
        self.membership(Forward::AddLearner { node_id: id, node })
            .await
    }

    /// Removes a node from the membership (voter or learner).
    pub async fn remove_node(&self, id: u64) -> Result<u64, StoreError> {
        self.membership(Forward::RemoveNode { node_id: id }).await
    }

    async fn membership(&self, f: Forward) -> Result<u64, StoreError> {
        // A node leaving the membership at exit removes itself after the
        // stop.
        if matches!(f, Forward::RemoveNode { node_id } if node_id == self.node_id) {
            return self.change_membership(f).await;
        }
        self.health.writable()?;
        self.unless_stopping(self.change_membership(f)).await
    }

    async fn change_membership(&self, f: Forward) -> Result<u64, StoreError> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        let work = async {
            loop {
                let leader = match execute_membership(&self.raft, &self.reconciler, &f).await {
                    Ok(index) => return Ok(index),
                    Err(ForwardError::NotLeader { leader_id, leader }) => leader_id.zip(leader),
                    Err(ForwardError::Membership(msg)) => {
                        return Err(StoreError::Apply(ApplyError::Invalid(msg)));
                    }
                    Err(ForwardError::Busy(msg)) => {
                        debug!(%msg, "another membership change is in progress; retrying");
                        None
                    }
                    Err(e) => return Err(StoreError::Cluster(e)),
                };
                if let Some((id, node)) = leader {
                    match self.forward(id, &node, f.clone()).await {
                        Ok(ForwardReply::Done { log_index }) => return Ok(log_index),
                        Ok(other) => {
                            warn!(?other, "unexpected reply to a forwarded membership change")
                        }
                        Err(ForwardError::Membership(msg)) => {
                            return Err(StoreError::Apply(ApplyError::Invalid(msg)));
                        }
                        Err(e) => {
                            debug!(error = %e, "forwarding the membership change failed; retrying")
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let index = tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| StoreError::NoQuorum)??;
        // A node removing itself is not sent the entry that removes it:
        // the leader's commit is the answer.
        let leaving = matches!(f, Forward::RemoveNode { node_id } if node_id == self.node_id);
        if !leaving {
            self.wait_routed(index, deadline).await?;
        }
        Ok(index)
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                node_id: *id,
                node: node.clone(),
                role: if voters.contains(id) {
                    Role::Voter
                } else {
                    Role::Learner
                },
                is_leader: m.current_leader == Some(*id),
            })
            .collect();
        let applied_index = m.last_applied.map_or(0, |l| l.index);
        ClusterStatus {
            node_id: self.node_id,
            leader_id: m.current_leader,
            term: m.current_term,
            // What is applied was committed (an installed snapshot can put
            // it past the commit index this node has heard of).
            commit_index: self.committed.load(Ordering::Relaxed).max(applied_index),
            applied_index,
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            is_leader: m.state == ServerState::Leader,
            members,
        }
    }
}

/// A committed write.
struct Written {
    /// Its log index.
    index: u64,
    /// What the state machine answered.
    result: Result<Applied, ApplyError>,
    /// It was sent again after a try that may have committed.
    sent_again: bool,
}

/// What a write answers: the state machine's `result`, except that a
/// removal sent again after an attempt that may have committed (`lost`)
/// and that found its target gone answers what it removed as this node saw
/// it before the first try (`before`).
fn settle(
    result: Result<Applied, ApplyError>,
    before: &Option<Applied>,
    lost: bool,
) -> Result<Applied, ApplyError> {
    match (result, before) {
        (Err(ApplyError::NotFound(_)), Some(applied)) if lost => {
            debug!("a retried removal found its target gone");
            Ok(applied.clone())
        }
        (result, _) => result,
    }
}

/// Sends `f` to `leader` at `addr`, waiting at most `limit`.
async fn forward_to(
    transport: &Transport,
    leader: u64,
    addr: &str,
    f: Forward,
    limit: Duration,
) -> Result<ForwardReply, ForwardError> {
    match transport.call(leader, addr, Rpc::Forward(f), limit).await {
        Ok(RpcReply::Forward(r)) => r,
        Ok(other) => Err(ForwardError::Failed(format!("unexpected reply {other:?}"))),
        Err(e) => Err(ForwardError::Failed(e.to_string())),
    }
}

/// A write (or linearizable read) without a quorum fails within this.
const WRITE_PROMISE: Duration = Duration::from_secs(5);
/// Room left in [`WRITE_PROMISE`] to send the 503.
const ANSWER_ROOM: Duration = Duration::from_millis(100);
/// How long a write's (or linearizable read's) work may take: what is
/// promised is an answer within 5 s, so the work stops a little earlier.
const WRITE_TIMEOUT: Duration = WRITE_PROMISE.saturating_sub(ANSWER_ROOM);

/// Runs a membership change on this node, which must be the leader,
/// through its reconciler.
pub(crate) async fn execute_membership(
    raft: &Raft,
    reconciler: &Reconciler,
    f: &Forward,
) -> Result<u64, ForwardError> {
    match f {
        Forward::AddLearner { node_id, node } => {
            // A member asking again (a joiner once caught up) is sent no
            // snapshot: none is built for it.
            let member = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(node_id)
                == Some(node);
            if !member {
                fresh_snapshot(raft).await;
            }
            crate::membership::add_learner(raft, reconciler, *node_id, node.clone()).await
        }
        Forward::RemoveNode { node_id } => reconciler.remove(*node_id).await,
        other => Err(ForwardError::Failed(format!(
            "not a membership change: {other:?}"
        ))),
    }
}

/// What [`RaftRpc::set`] starts, and the handler answers with.
struct Started {
    raft: Raft,
    /// Weak: the handler outlives Raft (it answers "stopped" then), and
    /// must not keep the log's file open after it (an upgrade's new
    /// process opens it).
    log: raft_store::WeakLogStore,
    batcher: Batcher,
    reconciler: Reconciler,
}

/// Entries applied since the last snapshot past which a node is added only
/// after a fresh snapshot.
const JOIN_SNAPSHOT_AFTER: u64 = 1_000;

/// How long adding a node waits for that snapshot.
const JOIN_SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// Before the leader adds a node: a snapshot of what it applied, when the
/// last one is more than [`JOIN_SNAPSHOT_AFTER`] entries old. A new node
/// is sent the leader's snapshot and then the log after it, one entry
/// after another; snapshots are taken every
/// [`raft_store::snapshot_interval`] entries (11,000 at 100,000
/// instances), so without this a joining node could replay that many
/// entries (seconds) before it serves. Building one costs O(state) once
/// per join, on the blocking pool while writes go on; if it is not built
/// in time the node is added anyway.
async fn fresh_snapshot(raft: &Raft) {
    let (applied, snapshot) = {
        let m = raft.metrics();
        let m = m.borrow();
        (
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map_or(0, |l| l.index),
        )
    };
    if applied.saturating_sub(snapshot) <= JOIN_SNAPSHOT_AFTER
        || raft.trigger().snapshot().await.is_err()
    {
        return;
    }
    let built = raft
        .wait(Some(JOIN_SNAPSHOT_WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|l| l.index >= applied),
            "a fresh snapshot for a joining node",
        )
        .await;
    debug!(
        applied,
        snapshot,
        built = built.is_ok(),
        "snapshot before adding a node"
    );
}

/// The server side of the cluster RPCs: hands Raft messages to openraft,
/// answers pre-votes and runs forwarded client requests when this node
/// leads.
pub struct RaftRpc {
    raft: std::sync::OnceLock<Started>,
    timing: crate::election::Timing,
    policy: Policy,
    campaign: Arc<crate::election::Campaign>,
    health: Arc<Health>,
}

impl std::fmt::Debug for RaftRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftRpc")
            .field("started", &self.raft.get().is_some())
            .finish()
    }
}

impl RaftRpc {
    /// A handler for a cluster with this Raft timing.
    pub fn new(timing: crate::election::Timing, policy: Policy, health: Arc<Health>) -> Self {
        Self {
            raft: std::sync::OnceLock::new(),
            timing,
            policy,
            campaign: Arc::default(),
            health,
        }
    }

    /// This node's own campaign, which the election task drives and the
    /// pre-vote answer reads.
    pub fn campaign(&self) -> Arc<crate::election::Campaign> {
        Arc::clone(&self.campaign)
    }

    /// Connects the handler to its Raft once it exists (the transport has to
    /// be bound before Raft is built), and starts the batcher that proposes
    /// this node's writes and those forwarded to it, and the reconciler
    /// that makes its membership changes: the [`Store`] of the node works
    /// through the ones returned.
    pub fn set(
        &self,
        raft: Raft,
        log: raft_store::LogStore,
        transport: &Arc<Transport>,
    ) -> (Batcher, Reconciler) {
        let set = self.raft.get_or_init(|| {
            let me = raft.metrics().borrow().id;
            let batcher = Batcher::start(
                raft.clone(),
                me,
                Arc::downgrade(transport),
                Arc::clone(&self.health),
            );
            let reconciler =
                Reconciler::start(raft.clone(), Arc::downgrade(transport), self.policy);
            Started {
                raft,
                log: log.downgrade(),
                batcher,
                reconciler,
            }
        });
        (set.batcher.clone(), set.reconciler.clone())
    }
}

impl RaftRpc {
    /// Below the free-space floor (or once the Raft core stopped) this
    /// node takes no entries, snapshots or writes that would reach its
    /// disk: the leader retries the appends as to an unreachable node, so
    /// the Raft core never meets the full disk and catches up once space is
    /// back. Heartbeats and votes go on.
    fn disk_refusal(&self, rpc: &Rpc) -> Option<ForwardError> {
        let writes = match rpc {
            Rpc::AppendEntries(r) => !r.entries.is_empty(),
            Rpc::InstallSnapshot(_) | Rpc::Forward(Forward::Write(_)) => true,
            _ => false,
        };
        if !writes {
            return None;
        }
        let node = self.raft.get().map(|s| s.raft.metrics().borrow().id);
        self.health.writable().err().map(|r| match r {
            Refusal::DiskFull(full) => ForwardError::Failed(match node {
                Some(id) => format!("node {id}: {full}"),
                None => full.to_string(),
            }),
            Refusal::Failed(reason) => ForwardError::Failed(reason),
        })
    }
}

impl RaftHandler for RaftRpc {
    fn handle(&self, from: u64, rpc: Rpc) -> HandlerFuture<'_> {
        Box::pin(async move {
            let Some(Started {
                raft,
                log,
                batcher,
                reconciler,
            }) = self.raft.get()
            else {
                return RpcReply::Error("raft is starting".into());
            };
            // A core that stopped (the node stops, or hands over to a new
            // process, and its endpoint still answers for a moment) is not
            // called: openraft would log each call as an error.
            if raft.metrics().borrow().running_state.is_err() {
                return RpcReply::Error("raft stopped".into());
            }
            if let Some(why) = senders::refusal(raft, from, &rpc) {
                warn!(from, reason = %why, "refused a cluster request");
                return RpcReply::Error(why);
            }
            if let Some(why) = self.disk_refusal(&rpc) {
                debug!(from, reason = %why, "refused a cluster request");
                return match rpc {
                    Rpc::Forward(_) => RpcReply::Forward(Err(why)),
                    _ => RpcReply::Error(why.to_string()),
                };
            }
            match rpc {
                Rpc::AppendEntries(r) => {
                    // Each append as this member saw it (debug; how a
                    // catch-up after a heal or restart went shows here).
                    let began = std::time::Instant::now();
                    let (vote, prev, entries, commit) =
                        (r.vote, r.prev_log_id, r.entries.len(), r.leader_commit);
                    let reply = raft.append_entries(r).await;
                    debug!(
                        from,
                        %vote,
                        ?prev,
                        entries,
                        ?commit,
                        ?reply,
                        took_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "append handled"
                    );
                    RpcReply::AppendEntries(reply)
                }
                Rpc::Vote(r) => RpcReply::Vote(raft.vote(r).await),
                Rpc::PreVote(r) => match log.upgrade() {
                    Some(log) => RpcReply::PreVote(
                        crate::election::answer_pre_vote(
                            raft,
                            &log,
                            &self.campaign,
                            from,
                            &r,
                            self.timing.election_timeout,
                        )
                        .await,
                    ),
                    None => RpcReply::Error("raft stopped".into()),
                },
                Rpc::InstallSnapshot(r) => {
                    RpcReply::InstallSnapshot(raft.install_snapshot(r).await)
                }
                Rpc::Forward(Forward::Write(command)) => RpcReply::Forward(
                    batcher
                        .submit(command)
                        .await
                        .map(|(log_index, result)| ForwardReply::Written { log_index, result }),
                ),
                Rpc::Forward(Forward::Features) => RpcReply::Forward(Ok(ForwardReply::Features {
                    batches: true,
                    group_options: true,
                    once: true,
                })),
                Rpc::Forward(Forward::Linearize) => {
                    RpcReply::Forward(match raft.ensure_linearizable().await {
                        Ok(l) => Ok(ForwardReply::Linearized {
                            read_index: l.map_or(0, |l| l.index),
                        }),
                        Err(e) => Err(e.into()),
                    })
                }
                Rpc::Forward(f) => RpcReply::Forward(
                    execute_membership(raft, reconciler, &f)
                        .await
                        .map(|log_index| ForwardReply::Done { log_index }),
                ),
            }
        })
    }
}
