//! Group commit on the leader: concurrent writes share one log entry.
//!
//! openraft 0.9 appends each `client_write` as its own entry, with its own
//! fsync, one after the other inside the Raft core; replication, the
//! followers' appends and the state machine's persist are paid per entry
//! too. Every write proposed on this node (its own and those forwarded by
//! followers) is therefore queued here, and one task proposes what has
//! queued as one [`Command::Batch`] entry:
//!
//! ```text
//!  write ─┐                 ┌─ wait for a free slot (≤ IN_FLIGHT entries proposed, not answered)
//!  write ─┼─▶ queue ─▶ task ┼─ drain the queue (≤ MAX_COMMANDS, ≤ MAX_BYTES)
//!  write ─┘                 └─ client_write_ff(Batch) ─▶ waiter: answers each caller its own result
//! ```
//!
//! While entries are in flight the queue fills, so the busier the node the
//! larger the batches; an idle node proposes each write at once, alone.
//! Commands apply in queue order, each on its own: a refused command is
//! answered its error and the others still apply. The task never waits for
//! an entry to commit before proposing the next (up to `IN_FLIGHT`), so
//! entries pipeline through append, replication and apply.
//!
//! Nodes older than batching cannot read a batch entry, so during a rolling
//! upgrade the leader proposes batches only once every member has said it
//! reads them ([`Forward::Features`], asked once per member and again
//! every [`ASK_AGAIN`] while one says no or has not answered yet; a yes
//! stands while the member does not answer); until then each write is its
//! own entry, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use raft_store::command::Command;
use raft_store::state::{Applied, ApplyError};
use raft_store::types::{ClusterNode, Raft, Request};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use crate::cluster::{Forward, ForwardError, ForwardReply, Rpc, RpcReply, Transport};
use crate::health::Health;

/// What a write answers: the index of its entry and what applying it did.
pub(crate) type Outcome = Result<(u64, Result<Applied, ApplyError>), ForwardError>;

/// Entries proposed and not yet answered, at most.
const IN_FLIGHT: usize = 2;
/// Commands in one entry, at most.
const MAX_COMMANDS: usize = 64;
/// Encoded commands in one entry, at most (a larger command goes alone):
/// under the least a cluster connection sends in a round trip (64 KiB,
/// less the entry's and the frame's own bytes), so that a batch crosses a
/// slow, lossy link within a call's limit (`cluster::network`: appends
/// are cut to what the link carries, but one entry always goes whole).
const MAX_BYTES: usize = 60 * 1024;
/// How often a member that does not (yet) read batches is asked again.
const ASK_AGAIN: Duration = Duration::from_secs(2);
/// How long asking a member may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// One queued write.
struct Pending {
    cmd: Command,
    size: usize,
    reply: oneshot::Sender<Outcome>,
}

/// The queue of writes this node proposes (see the module's doc); cheap to
/// clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
    raft: Raft,
    readers: Arc<Readers>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the proposing task of node `me`; it ends when every clone of
    /// the returned handle is dropped.
    pub(crate) fn start(
        raft: Raft,
        me: u64,
        transport: Weak<Transport>,
        health: Arc<Health>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let readers = Arc::new(Readers {
            me,
            transport,
            known: Mutex::new(HashMap::new()),
        });
        tokio::spawn(run(raft.clone(), rx, readers.clone(), health));
        tokio::spawn(learn(raft.clone(), Arc::downgrade(&readers)));
        Self { tx, raft, readers }
    }

    /// Queues `cmd` now (so that writes queued one after the other apply in
    /// that order) and returns its answer to await. A node that does not
    /// lead answers [`ForwardError::NotLeader`].
    ///
    /// A write that uses group options is queued only once every member
    /// has said it reads them (asked, on the leader, in the caller's task,
    /// so that the queue never waits for the answers); otherwise it is
    /// answered 409 naming the member, unqueued.
    pub(crate) fn submit(&self, cmd: Command) -> impl Future<Output = Outcome> + use<> {
        let size = raft_store::encoded_len(&cmd).unwrap_or(usize::MAX);
        let leads = self.raft.metrics().borrow().current_leader == Some(self.readers.me);
        // A request to apply once goes wrapped only while every member
        // reads the wrapper: decided now when this node knows, else once
        // the members it has no answer from answered (a leader elected a
        // moment ago, when a retry comes). Gated like group options, and
        // whether or not the metrics say this node leads yet (they may
        // lag its election by a moment; a follower submits only while it
        // knows no leader).
        let once =
            matches!(cmd, Command::Once { .. }) && !self.readers.all_read(&self.raft, |f| f.once);
        let gated = once || (leads && cmd.uses_group_options());
        let tx = self.tx.clone();
        let queue = move |cmd| {
            let (reply, answer) = oneshot::channel();
            tx.send(Pending { cmd, size, reply }).ok().map(|()| answer)
        };
        // Not gated: queued now, before the caller awaits anything.
        let queued = if gated { Err(cmd) } else { Ok(queue(cmd)) };
        let (raft, readers) = (self.raft.clone(), self.readers.clone());
        async move {
            let answer = match queued {
                Ok(answer) => answer,
                Err(mut cmd) => {
                    if cmd.uses_group_options()
                        && let Err(why) = readers.all_read_group_options(&raft).await
                    {
                        return Ok((0, Err(ApplyError::Conflict(why))));
                    }
                    if once && !readers.all_read_once(&raft).await {
                        // Some member does not read it (an older release,
                        // or one that does not answer): proposed bare.
                        cmd = cmd.unwrapped().clone();
                    }
                    queue(cmd)
                }
            };
            match answer {
                Some(answer) => answer.await.unwrap_or_else(|_| Err(stopped())),
                None => Err(stopped()),
            }
        }
    }
}

impl Batcher {
    /// Whether this node holds an answer (or an ask under way) from
    /// member `id`.
    #[cfg(test)]
    pub(crate) fn knows(&self, id: u64) -> bool {
        self.readers
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&id)
    }

    /// Member `id` said it reads everything this release proposes.
    #[cfg(test)]
    pub(crate) fn heard(&self, id: u64) {
        let all = Features {
            batches: true,
            group_options: true,
            once: true,
        };
        self.readers
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Known {
                    said: Some(all),
                    last: Ask::Answered(Instant::now()),
                },
            );
    }

    /// `cmd` wrapped in [`Command::Once`] under a new request uuid, when it
    /// is one that a retry could apply twice. Wherever it goes, the
    /// wrapper is dropped for a reader that does not read it: by
    /// [`Batcher::for_leader`] before it is forwarded, by
    /// [`Batcher::submit`] before this node proposes it.
    pub(crate) fn once(cmd: Command) -> Command {
        if cmd.applies_once() {
            Command::Once {
                request: uuid::Uuid::new_v4(),
                command: Box::new(cmd),
            }
        } else {
            cmd
        }
    }

    /// `cmd` as it may be forwarded to leader `id` at `node`: without a
    /// [`Command::Once`] wrapper unless that node said it reads it (asked,
    /// and waited for within [`ASK_TIMEOUT`], when this node has no answer
    /// from it: a leader elected a moment ago).
    pub(crate) async fn for_leader(&self, cmd: &Command, id: u64, node: &ClusterNode) -> Command {
        match cmd {
            Command::Once { command, .. }
                if !self.readers.reads_once_asked(id, node, |f| f.once).await =>
            {
                Command::clone(command)
            }
            cmd => cmd.clone(),
        }
    }
}

/// Asks ahead of the first write, so that it goes as a request to apply
/// once already: a voter asks every member (all of them apply what a
/// leader proposes, and a voter may lead next), a learner only the leader
/// (the one node its writes go to, over the connection it already has).
/// Again when the leader or the membership changes, and every
/// [`ASK_AGAIN`] while one has not said it reads [`Command::Once`]. Ends
/// with the Raft core.
async fn learn(raft: Raft, readers: Weak<Readers>) {
    let mut metrics = raft.metrics();
    loop {
        let (seen, leader, all) = {
            let Some(r) = readers.upgrade() else { return };
            let m = metrics.borrow().clone();
            let seen = m.membership_config.log_id().to_owned();
            r.forget_others(&m.membership_config);
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|id| id == r.me);
            let all = match m.current_leader {
                // A voter may lead next, perhaps during the fault that
                // makes clients send their writes again: it asks every
                // member while they answer.
                Some(_) if voter => r.all_read(&raft, |f| f.once),
                Some(id) => match membership.get_node(&id) {
                    Some(node) => r.reads(id, node, |f| f.once),
                    None => true,
                },
                None => true,
            };
            (seen, m.current_leader, all)
        };
        let again = tokio::time::sleep(ASK_AGAIN);
        tokio::pin!(again);
        loop {
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let m = metrics.borrow();
                    if m.membership_config.log_id() != &seen || m.current_leader != leader {
                        break;
                    }
                }
                () = &mut again, if !all => break,
            }
        }
    }
}

fn stopped() -> ForwardError {
    ForwardError::Failed("the node's Raft is stopping".into())
}

async fn run(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    readers: Arc<Readers>,
    health: Arc<Health>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Writes queue while every slot is taken: the next entry carries them.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].size;
        let mut next = None;
        while batch.len() < MAX_COMMANDS {
            let Ok(p) = rx.try_recv() else { break };
            if bytes.saturating_add(p.size) > MAX_BYTES {
                next = Some(p);
                break;
            }
            bytes = bytes.saturating_add(p.size);
            batch.push(p);
        }
        // Callers that gave up (their deadline passed) are not proposed.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            drop(slot);
        } else if batch.len() > 1 && readers.all_read_batches(&raft) {
            propose_batch(&raft, batch, slot, &health).await;
        } else {
            propose_each(&raft, batch, slot, &health).await;
        }
        if let Some(p) = next {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            propose_each(&raft, vec![p], slot, &health).await;
        }
    }
}

/// Proposes `batch` as one entry and answers each caller its own result.
async fn propose_batch(
    raft: &Raft,
    batch: Vec<Pending>,
    slot: OwnedSemaphorePermit,
    health: &Health,
) {
    let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<Outcome>>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let n = commands.len();
    let cmd = Command::Batch { commands };
    match raft.client_write_ff(Request::from(cmd)).await {
        Err(fatal) => {
            let e = ForwardError::Failed(health.storage_failure(&fatal));
            for r in replies {
                let _ = r.send(Err(e.clone()));
            }
        }
        Ok(answer) => {
            tokio::spawn(async move {
                let outcome = answer.await;
                drop(slot);
                let outcomes = match outcome {
                    Ok(Ok(resp)) => split(resp.log_id.index, resp.data.result, n),
                    Ok(Err(e)) => vec![Err(ForwardError::from(RaftError::APIError(e))); n],
                    Err(_) => vec![Err(stopped()); n],
                };
                for (r, o) in replies.into_iter().zip(outcomes) {
                    let _ = r.send(o);
                }
            });
        }
    }
}

/// The answer of each of a batch's `n` commands, from the entry's.
fn split(index: u64, result: Option<Result<Applied, ApplyError>>, n: usize) -> Vec<Outcome> {
    match result {
        Some(Ok(Applied::Batch(results))) if results.len() == n => {
            results.into_iter().map(|r| Ok((index, r))).collect()
        }
        other => {
            let e = ApplyError::Invalid(format!("a batch of {n} answered {other:?}"));
            vec![Ok((index, Err(e))); n]
        }
    }
}

/// Proposes each write as its own entry, in order.
async fn propose_each(
    raft: &Raft,
    batch: Vec<Pending>,
    slot: OwnedSemaphorePermit,
    health: &Health,
) {
    let mut answers = Vec::with_capacity(batch.len());
    for p in batch {
        match raft.client_write_ff(Request::from(p.cmd)).await {
            Ok(answer) => answers.push((answer, p.reply)),
            Err(fatal) => {
                let _ = p
                    .reply
                    .send(Err(ForwardError::Failed(health.storage_failure(&fatal))));
            }
        }
    }
    tokio::spawn(async move {
        for (answer, reply) in answers {
            let outcome = match answer.await {
                Ok(Ok(resp)) => Ok((
                    resp.log_id.index,
                    resp.data
                        .result
                        .unwrap_or_else(|| Err(ApplyError::Invalid("entry had no outcome".into()))),
                )),
                Ok(Err(e)) => Err(ForwardError::from(
                    RaftError::<u64, ClientWriteError<_, _>>::APIError(e),
                )),
                Err(_) => Err(stopped()),
            };
            let _ = reply.send(outcome);
        }
        drop(slot);
    });
}

/// Which members read batch entries, as far as this node has asked.
struct Readers {
    me: u64,
    transport: Weak<Transport>,
    known: Mutex<HashMap<u64, Known>>,
}

/// What this node knows of one member's release.
#[derive(Clone, Copy, Debug)]
struct Known {
    /// What it said it reads when it last answered. A yes stands while it
    /// is a member, also while it does not answer: a member down now comes
    /// back with the same release or a newer one (rolling one back in
    /// place is not supported, docs/compatibility.md), and a leader
    /// elected during a fault still knows what the members it cannot
    /// reach read.
    said: Option<Features>,
    /// The last ask.
    last: Ask,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// Under way.
    Under,
    /// Answered at this time.
    Answered(Instant),
    /// Not answered (failed or timed out) at this time.
    Silent(Instant),
}

impl Known {
    /// Whether it said it reads what `reads` picks.
    fn reads(&self, reads: fn(&Features) -> bool) -> bool {
        self.said.as_ref().is_some_and(reads)
    }

    /// Whether an ask is under way and nothing it said yet answers `reads`.
    fn awaited(known: Option<&Self>, reads: fn(&Features) -> bool) -> bool {
        known.is_none_or(|k| k.last == Ask::Under && !k.reads(reads))
    }
}

/// What a member said it reads ([`ForwardReply::Features`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Features {
    batches: bool,
    group_options: bool,
    once: bool,
}

impl Readers {
    /// Whether every member of the membership this node knows reads
    /// batches; asks those it does not know about (without waiting).
    fn all_read_batches(self: &Arc<Self>, raft: &Raft) -> bool {
        self.all_read(raft, |f| f.batches)
    }

    /// Whether every member of the membership this node knows reads what
    /// `reads` picks from its features; asks those it does not know about
    /// (without waiting).
    fn all_read(self: &Arc<Self>, raft: &Raft, reads: fn(&Features) -> bool) -> bool {
        let membership = raft.metrics().borrow().membership_config.clone();
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all = true;
        for (&id, node) in membership.membership().nodes() {
            all &= self.reads_locked(&mut known, id, node, reads);
        }
        all
    }

    /// Whether member `id` at `node` reads what `reads` picks; asks it
    /// when this node does not know (without waiting).
    fn reads(self: &Arc<Self>, id: u64, node: &ClusterNode, reads: fn(&Features) -> bool) -> bool {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        self.reads_locked(&mut known, id, node, reads)
    }

    /// [`Readers::reads`], having asked member `id` first (and waited,
    /// within [`ASK_TIMEOUT`]) when this node has no answer from it.
    async fn reads_once_asked(
        self: &Arc<Self>,
        id: u64,
        node: &ClusterNode,
        reads: fn(&Features) -> bool,
    ) -> bool {
        let unanswered = id != self.me
            && Known::awaited(
                self.known
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&id),
                reads,
            );
        if unanswered {
            Arc::clone(self).ask(id, node.clone()).await;
        }
        self.reads(id, node, reads)
    }

    fn reads_locked(
        self: &Arc<Self>,
        known: &mut HashMap<u64, Known>,
        id: u64,
        node: &ClusterNode,
        reads: fn(&Features) -> bool,
    ) -> bool {
        if id == self.me {
            return true;
        }
        let said = match known.get(&id) {
            Some(k) if k.reads(reads) => return true,
            // One that does not read it (an older release, which may be
            // upgraded since) or did not answer is asked again later.
            Some(k) => match k.last {
                Ask::Under => return false,
                Ask::Answered(at) | Ask::Silent(at) if at.elapsed() < ASK_AGAIN => return false,
                Ask::Answered(_) | Ask::Silent(_) => k.said,
            },
            None => None,
        };
        known.insert(
            id,
            Known {
                said,
                last: Ask::Under,
            },
        );
        tokio::spawn(Arc::clone(self).ask(id, node.clone()));
        false
    }

    /// Drops what members that left `membership` said: one that joins
    /// again (perhaps running another release) is asked afresh.
    fn forget_others(&self, membership: &openraft::StoredMembership<u64, ClusterNode>) {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| membership.membership().get_node(id).is_some());
    }

    async fn ask(self: Arc<Self>, id: u64, node: ClusterNode) {
        let reads = match self.transport.upgrade() {
            Some(t) => {
                let rpc = Rpc::Forward(Forward::Features);
                match t.call(id, &node.cluster_addr, rpc, ASK_TIMEOUT).await {
                    Ok(RpcReply::Forward(Ok(ForwardReply::Features {
                        batches,
                        group_options,
                        once,
                    }))) => Some(Features {
                        batches,
                        group_options,
                        once,
                    }),
                    _ => None,
                }
            }
            None => None,
        };
        debug!(node = id, ?reads, "asked what a member reads");
        let now = Instant::now();
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let said = known.get(&id).and_then(|k| k.said);
        let k = match reads {
            Some(f) => Known {
                said: Some(f),
                last: Ask::Answered(now),
            },
            // What it said before stands.
            None => Known {
                said,
                last: Ask::Silent(now),
            },
        };
        known.insert(id, k);
    }

    /// Asks every other member of `membership` for which `ask` says so,
    /// given what this node knows of it, and waits for their answers (each
    /// within [`ASK_TIMEOUT`]).
    async fn ask_and_wait(
        self: &Arc<Self>,
        membership: &openraft::StoredMembership<u64, ClusterNode>,
        ask: impl Fn(Option<&Known>) -> bool,
    ) {
        let mut asks = Vec::new();
        {
            let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            for (&id, node) in membership.membership().nodes() {
                let ask = id != self.me && ask(known.get(&id));
                if ask {
                    asks.push(Arc::clone(self).ask(id, node.clone()));
                }
            }
        }
        let mut asking = tokio::task::JoinSet::new();
        for ask in asks {
            asking.spawn(ask);
        }
        while asking.join_next().await.is_some() {}
    }

    /// Whether every member reads [`Command::Once`], asking (and waiting
    /// for) those this node has no answer from yet; one that said no or
    /// did not answer is asked again in the background ([`learn`]), not
    /// waited for.
    async fn all_read_once(self: &Arc<Self>, raft: &Raft) -> bool {
        let membership = raft.metrics().borrow().membership_config.clone();
        self.ask_and_wait(&membership, |known| Known::awaited(known, |f| f.once))
            .await;
        self.all_read(raft, |f| f.once)
    }

    /// Whether every member reads group options, asking (and waiting for)
    /// those this node does not know about; the error names a member that
    /// does not, or did not answer.
    async fn all_read_group_options(self: &Arc<Self>, raft: &Raft) -> Result<(), String> {
        let membership = raft.metrics().borrow().membership_config.clone();
        // Every member is asked again (a member down now is not vouched
        // for by an earlier answer; such writes are rare), but one that
        // did not answer lately.
        self.ask_and_wait(&membership, |known| match known.map(|k| k.last) {
            Some(Ask::Silent(at)) => at.elapsed() >= ASK_AGAIN,
            Some(Ask::Answered(_) | Ask::Under) | None => true,
        })
        .await;
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for &id in membership.membership().nodes().map(|(id, _)| id) {
            if id == self.me {
                continue;
            }
            // Only an answer to this write's ask vouches for a member here.
            match known
                .get(&id)
                .filter(|k| matches!(k.last, Ask::Answered(_)))
            {
                Some(k) if k.reads(|f| f.group_options) => {}
                Some(_) => {
                    return Err(format!(
                        "member {id} runs an older release that does not read health checks or \
                         PROXY protocol settings: upgrade every node first"
                    ));
                }
                _ => {
                    return Err(format!(
                        "member {id} did not say whether it reads health checks and PROXY \
                         protocol settings (it may be down or older): try again once every \
                         member answers"
                    ));
                }
            }
        }
        Ok(())
    }
}
