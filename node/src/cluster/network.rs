//! openraft's network over the [`Transport`]: [`Network`] makes a
//! [`PeerNetwork`] per target, which sends each Raft RPC as one
//! [`Transport::call`] to the target's `cluster_addr`.
//!
//! Errors are mapped so openraft reacts well:
//!
//! | transport | openraft |
//! | --- | --- |
//! | no connection, connection lost, transport closed | `Unreachable` (back off) |
//! | timeout | `Timeout` |
//! | append batch over the frame limit | `PayloadTooLarge` (smaller batches) |
//! | reset stream, bad reply, peer error | `NetworkError` |
//! | the peer's Raft refused | `RemoteError` |
//!
//! **Empty appends of a replication stream do not wait.** openraft 0.9
//! keeps one call in flight per follower, and after each commit it sends
//! the follower the new commit index as an append with no entries: on a
//! slow link the next write's append waits a round trip behind it. A
//! replication stream's empty append (the client sent entries before,
//! which only a replication stream does) is therefore sent in the
//! background and answered `Success` at once. openraft 0.9.25 does nothing
//! with that answer but note it (its matching index stays where it was;
//! the send time feeds only the `millis_since_quorum_ack` metric), so
//! nothing is assumed that the follower did not confirm before. The
//! follower commits from it as from any append. Should the follower
//! refuse one (a higher vote, logs that part), the next empty append waits
//! for its answer, so that openraft sees the refusal and acts on it; the
//! leader's heartbeats (`election::heartbeat`) ask for one at once.
//! Linearizable reads are not affected: openraft confirms leadership with
//! fresh clients that never sent entries, so their empty appends are
//! awaited.
//!
//! **An append carries what the link sends in a round trip.** openraft
//! sends up to `max_payload_entries` entries per append and gives the call
//! its RPC limit (¾ T, 750 ms), after which it sends the same entries
//! again. A follower 150 ms away behind a burst of writes was sent 64
//! batch entries, about 400 KB, per append; across 1 % loss QUIC's window
//! stays near its floor (64 KiB), so no such append crossed within the
//! limit, every retry timed out too, and the follower stayed behind until
//! a snapshot overtook it (for good, once the writes stopped). So an append
//! with more than one entry is cut to the entries that the connection's
//! congestion window sends in the round trips the call's limit leaves
//! room for, besides a lost packet's resend ([`append_budget`]: one window
//! on a 300 ms link, several on a fast one; at least [`APPEND_FLOOR`], at
//! most [`APPEND_CEILING`]). The follower's `Success` is then told to
//! openraft as `PartialSuccess` up to the last entry sent, and openraft
//! sends the rest next. The first entry always goes whole; the leader's
//! batches stay under [`APPEND_FLOOR`] (`store::batch`), so only a single
//! command is larger than a budget (a certificate, a group with thousands
//! of domains).
//!
//! **An append of one entry larger than its budget goes on past the
//! limit.** openraft gives every append the same limit and, when it runs
//! out, sends the same entry again from the start: a 900 KB command to a
//! follower 150 ms away across 1 % loss did not cross in 30 s. Such an
//! append is sent by a task of its own, allowed as long as a snapshot
//! chunk ([`LONG_APPEND_LIMIT`]); the call waits for it within its limit
//! and, when that runs out, answers `Timeout` as before, and openraft's
//! next appends of the same entry (same leader's vote, same previous
//! entry) wait on the same task instead of sending it again, whatever
//! their budget has become (the sending itself grows the window). An
//! append of other entries, or the stream's end, drops the task, and the
//! transport resets the stream of a call dropped before its answer; empty
//! appends leave it going.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{
    AnyError, LogId, OptionalSend, RPCTypes, Snapshot, StorageError, StorageIOError, Vote,
};
use raft_store::{ClusterNode, NodeId, TypeConfig};
use tokio_util::task::AbortOnDropHandle;
use tracing::info;

use super::rpc::{Rpc, RpcReply};
use super::transport::{Transport, TransportError};

/// Told when the network sends a vote request of this node's candidacy:
/// the election task's campaign, which counts its wait for the answers
/// from then.
pub trait VoteSink: Send + Sync + std::fmt::Debug {
    fn votes_sent(&self);
}

/// The least an append with more than one entry may carry, in bytes of
/// entries' JSON: the least congestion window a cluster connection keeps
/// (`congestion::FLOOR`), hence one flight on any link.
const APPEND_FLOOR: usize = super::congestion::FLOOR as usize;
/// The most an append may carry whatever the window (a fast link's window
/// grows without bound in practice): 4 MiB. The log store reads at most
/// 1 MiB for one (`raft_store::log_store::REPLICATION_READ_BYTES`), so an
/// append of several entries stays under that in any case.
const APPEND_CEILING: usize = 4 * 1024 * 1024;
/// Kept free of a call's time beyond its last round trip: a lost packet's
/// resend (QUIC's probe timeout, about a round trip and 45 ms more) and
/// the follower's fsync.
const APPEND_SLACK: Duration = Duration::from_millis(100);

/// How many bytes of entries an append to a peer may carry (module docs):
/// what the connection's congestion window `window` sends in the round
/// trips of `rtt` that fit the call's `deadline` besides one more round
/// trip and [`APPEND_SLACK`]; at least one window. So a 300 ms link with a
/// 750 ms limit gets one window, and a fast link several, which keeps
/// QUIC's window growing (an append smaller than the window leaves the
/// connection application-limited, and Cubic grows no window then). Before
/// a connection exists, [`APPEND_FLOOR`].
fn append_budget(window: Option<u64>, rtt: Option<Duration>, deadline: Duration) -> usize {
    let (Some(window), Some(rtt)) = (window, rtt) else {
        return APPEND_FLOOR;
    };
    let spare = deadline.saturating_sub(rtt + APPEND_SLACK);
    let rounds = spare.as_micros() / rtt.as_micros().max(1);
    let rounds = usize::try_from(rounds.clamp(1, 64)).unwrap_or(1);
    usize::try_from(window)
        .unwrap_or(usize::MAX)
        .saturating_mul(rounds)
        .clamp(APPEND_FLOOR, APPEND_CEILING)
}

/// How long an append of one entry larger than its budget may go on
/// (module docs): a snapshot chunk's limit, the longest a call takes (a
/// connection that is retired stays open that long for the calls on it).
/// A megabyte crosses a 300 ms link in it at the least window QUIC keeps.
const LONG_APPEND_LIMIT: Duration = Duration::from_millis(super::SNAPSHOT_CHUNK_TIMEOUT_MS);

/// Calls of the first unanswered chunk that may fail in a row (timeout,
/// network, unreachable) before the snapshot's send gives up (openraft
/// then sends a fresh one): openraft's own loop's count.
const SNAPSHOT_CHUNK_TRIES: u32 = 5;

/// How many bytes of snapshot chunks may be in flight at once to a peer:
/// what the connection's congestion window `window` sends in the round
/// trips of `rtt` that fit half a chunk's call `limit` (none
/// before a connection exists: one chunk at a time). Each chunk is a round
/// trip, so one at a time leaves a long link idle between chunks (an 11 MB
/// snapshot across 150 ms links: 7.2 s in 1 MiB chunks one at a time, 3.8
/// s four at a time); but chunks in flight share the link, and the last
/// one sent waits for those before it within its own limit, so a window
/// that loss keeps small (64 KiB per 300 ms round trip: 2.4 MB in a
/// chunk's 11.25 s) carries one at a time. At most
/// [`MAX_CHUNKS_IN_FLIGHT`] whatever the window.
fn chunk_budget(window: Option<u64>, rtt: Option<Duration>, limit: Duration) -> u64 {
    let (Some(window), Some(rtt)) = (window, rtt) else {
        return 0;
    };
    let rounds = (limit / 2).as_micros() / rtt.as_micros().max(1);
    window.saturating_mul(u64::try_from(rounds.clamp(1, 64)).unwrap_or(1))
}

/// Snapshot chunks in flight at most: 4 MiB on `edgelb-raft/2`.
pub(super) const MAX_CHUNKS_IN_FLIGHT: usize = 4;

/// First wait after a peer was unreachable; doubles up to [`BACKOFF_MAX`],
/// kept short so that replication resumes within a second of a peer
/// coming back (a handshake attempt is itself bounded, see `peers.rs`).
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// An RPC's own deadline: openraft's limit for the kind (sized for the
/// slowest link the cluster is configured for), shortened on a link whose
/// round trip is measured to a few round trips plus room for the peer's
/// fsync, so that a peer that died is noticed quickly on a fast link.
pub fn rpc_deadline(limit: Duration, rtt: Option<Duration>) -> Duration {
    const FLOOR: Duration = Duration::from_millis(300);
    match rtt {
        Some(rtt) => (rtt * 4 + Duration::from_millis(200)).clamp(FLOOR.min(limit), limit),
        None => limit,
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, ClusterNode, RaftError<NodeId, E>>>;

/// openraft's [`RaftNetworkFactory`] over a [`Transport`].
#[derive(Clone, Debug)]
pub struct Network {
    transport: Arc<Transport>,
    campaign: Arc<dyn VoteSink>,
}

impl Network {
    /// A network that calls peers through `transport`, telling `campaign`
    /// when this node's vote requests go out.
    pub fn new(transport: Arc<Transport>, campaign: Arc<dyn VoteSink>) -> Self {
        Self {
            transport,
            campaign,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &ClusterNode) -> PeerNetwork {
        PeerNetwork {
            transport: Arc::clone(&self.transport),
            campaign: Arc::clone(&self.campaign),
            target,
            node: node.clone(),
            replicates: false,
            long: None,
        }
    }
}

/// The connection to one peer as openraft sees it.
#[derive(Debug)]
pub struct PeerNetwork {
    transport: Arc<Transport>,
    campaign: Arc<dyn VoteSink>,
    target: NodeId,
    node: ClusterNode,
    /// Whether this client sent entries: it is a replication stream's.
    replicates: bool,
    /// The append of one large entry going on past openraft's limit.
    long: Option<LongAppend>,
}

/// An append of one entry larger than its budget, sent by a task of its
/// own (module docs); aborted when dropped.
#[derive(Debug)]
struct LongAppend {
    /// Which append it is: the leader's vote, the entry before, the entry.
    key: (Vote<NodeId>, Option<LogId<NodeId>>, LogId<NodeId>),
    task: AbortOnDropHandle<Result<RpcReply, TransportError>>,
}

impl LongAppend {
    /// Whether `rpc` starts with the entry it sends, after the same entry
    /// and under the same vote.
    fn sends(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        rpc.entries
            .first()
            .is_some_and(|first| (rpc.vote, rpc.prev_log_id, first.log_id) == self.key)
    }

    /// Its answer if it comes within `wait`.
    async fn wait(&mut self, wait: Duration) -> Option<Result<RpcReply, TransportError>> {
        let done = tokio::time::timeout(wait, &mut self.task).await.ok()?;
        Some(
            done.unwrap_or_else(|e| {
                Err(TransportError::Protocol(format!("the append's task: {e}")))
            }),
        )
    }
}

impl PeerNetwork {
    /// Sends `rpc`, waiting at most `ttl` for the answer.
    async fn call(&self, rpc: Rpc, action: RPCTypes, ttl: Duration) -> Result<RpcReply, Failed> {
        let entries = match &rpc {
            Rpc::AppendEntries(r) => r.entries.len(),
            _ => 0,
        };
        self.transport
            .call(self.target, &self.node.cluster_addr, rpc, ttl)
            .await
            .map_err(|e| {
                self.note(&e);
                self.failed(e, action, ttl, entries)
            })
    }

    /// The snapshot bytes the next `InstallSnapshot` call carries, and how
    /// many bytes of chunks may be in flight to the peer at once, by the
    /// version of the connection. On `edgelb-raft/1` or without a
    /// connection: `configured` (openraft's chunk, [`super::SNAPSHOT_CHUNK`],
    /// 256 KiB), one chunk at a time (version 1 frames a chunk as JSON
    /// numbers, 3.3 times its bytes). On `edgelb-raft/2`: four times that,
    /// at most what that version takes ([`super::CHUNK_DATA_LIMIT`], 1 MiB),
    /// deflated to about half on the wire, and [`chunk_budget`] in flight
    /// (which counts a chunk's bytes, more than it sends). A chunk is a
    /// round trip: a node joining a cluster of 100,000 instances (an 11 MB
    /// snapshot) across 150 ms ± 15 ms links was ready after 19–28 s in
    /// 256 KiB chunks, and 12.5 s in chunks of 1 MiB.
    fn chunking(&self, configured: usize, limit: Duration) -> (u64, u64) {
        match self.transport.version(self.target) {
            Some(super::frame::Version::V2) => {
                let size = configured.saturating_mul(4).min(super::CHUNK_DATA_LIMIT);
                let budget = chunk_budget(
                    self.transport.window(self.target),
                    self.transport.rtt(self.target),
                    limit,
                );
                (size as u64, budget)
            }
            Some(super::frame::Version::V1) | None => (configured as u64, 0),
        }
    }

    /// Sends one snapshot chunk. A chunk carries up to a megabyte: its
    /// call's limit is openraft's for a chunk, not one of round trips, but
    /// inside it (`soft_ttl` in `hard_ttl`), so that a chunk that times out
    /// is sent again where it was, not the whole snapshot.
    async fn send_chunk(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: &RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let reply = self
            .call(
                Rpc::InstallSnapshot(rpc),
                RPCTypes::InstallSnapshot,
                option.soft_ttl(),
            )
            .await
            .map_err(Failed::into_rpc_error)?;
        match reply {
            RpcReply::InstallSnapshot(r) => r.map_err(|e| self.remote(e).into()),
            other => Err(unexpected(&other)),
        }
    }

    /// Notes that the peer is out of reach when `error` says so.
    fn note(&self, error: &TransportError) {
        if error.is_unreachable() || matches!(error, TransportError::Timeout(_)) {
            self.transport
                .note_unreachable(self.target, &error.to_string());
        }
    }

    /// `error` of a call limited to `ttl`, as openraft is to be told it.
    fn failed(
        &self,
        error: TransportError,
        action: RPCTypes,
        ttl: Duration,
        entries: usize,
    ) -> Failed {
        Failed {
            error,
            action,
            from: self.transport.node_id(),
            target: self.target,
            ttl,
            entries,
        }
    }

    /// Starts sending `rpc`, an append of one entry (`entry`, `bytes` of
    /// JSON) larger than the link carries within its call's limit (module
    /// docs), by a task
    /// allowed [`LONG_APPEND_LIMIT`], in place of any earlier one.
    fn send_long(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        entry: LogId<NodeId>,
        bytes: usize,
    ) -> &mut LongAppend {
        let key = (rpc.vote, rpc.prev_log_id, entry);
        let (transport, target) = (Arc::clone(&self.transport), self.target);
        let addr = self.node.cluster_addr.clone();
        info!(
            target,
            index = entry.index,
            bytes,
            limit_ms = LONG_APPEND_LIMIT.as_millis(),
            "an entry larger than the link carries within an append's limit goes on past it"
        );
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            let rpc = Rpc::AppendEntries(rpc);
            transport.call(target, &addr, rpc, LONG_APPEND_LIMIT).await
        }));
        self.long.insert(LongAppend { key, task })
    }

    /// What waiting `wait` for the long append gave: its answer (it is
    /// done), or `Timeout` while it goes on.
    fn long_answer(
        &mut self,
        done: Option<Result<RpcReply, TransportError>>,
        wait: Duration,
    ) -> Result<RpcReply, Failed> {
        let Some(done) = done else {
            // openraft sends this entry again, and finds it going on (not
            // a sign that the peer is out of reach).
            let timeout = TransportError::Timeout(wait);
            return Err(self.failed(timeout, RPCTypes::AppendEntries, wait, 1));
        };
        self.long = None;
        done.map_err(|e| {
            self.note(&e);
            self.failed(e, RPCTypes::AppendEntries, LONG_APPEND_LIMIT, 1)
        })
    }

    /// Sends an empty append without waiting for its answer (module
    /// docs): a refusal is recorded for the next one.
    fn send_in_background(&self, rpc: AppendEntriesRequest<TypeConfig>, ttl: Duration) {
        let (transport, target) = (Arc::clone(&self.transport), self.target);
        let addr = self.node.cluster_addr.clone();
        let ttl = rpc_deadline(ttl, transport.rtt(target));
        tokio::spawn(async move {
            match transport
                .call(target, &addr, Rpc::AppendEntries(rpc), ttl)
                .await
            {
                Ok(RpcReply::AppendEntries(Ok(
                    AppendEntriesResponse::HigherVote(_) | AppendEntriesResponse::Conflict,
                ))) => transport.heartbeat_refused(target),
                Ok(_) => {}
                Err(e) => {
                    if e.is_unreachable() || matches!(e, TransportError::Timeout(_)) {
                        transport.note_unreachable(target, &e.to_string());
                    }
                }
            }
        });
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RemoteError<NodeId, ClusterNode, RaftError<NodeId, E>> {
        RemoteError::new_with_node(self.target, self.node.clone(), e)
    }
}

/// A failed call, with what is needed to map it to an [`RPCError`].
struct Failed {
    error: TransportError,
    action: RPCTypes,
    from: NodeId,
    target: NodeId,
    ttl: Duration,
    entries: usize,
}

impl Failed {
    fn into_rpc_error<E: std::error::Error>(self) -> RPCError<NodeId, ClusterNode, E> {
        match &self.error {
            e if e.is_unreachable() => RPCError::Unreachable(Unreachable::new(e)),
            TransportError::Timeout(_) => RPCError::Timeout(Timeout {
                action: self.action,
                id: self.from,
                target: self.target,
                timeout: self.ttl,
            }),
            TransportError::TooLarge { .. }
                if self.action == RPCTypes::AppendEntries && self.entries > 1 =>
            {
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(
                    (self.entries / 2) as u64,
                ))
            }
            e => RPCError::Network(NetworkError::new(e)),
        }
    }
}

/// `rpc` cut to the entries whose JSON fits `budget` bytes (the first
/// always kept), with the id of the last entry kept if any were cut, and
/// the first entry's id and length when it alone is over the budget (a
/// long append, module docs). Entries are measured only where a budget could
/// cut them: the log store reads at most
/// [`raft_store::log_store::REPLICATION_READ_BYTES`] for an append of
/// several entries, so a budget of that much (a fast link's) takes them
/// whole unmeasured.
fn within_budget(mut rpc: AppendEntriesRequest<TypeConfig>, budget: usize) -> Within {
    if rpc.entries.len() > 1 && budget >= raft_store::log_store::REPLICATION_READ_BYTES {
        return Within {
            rpc,
            cut: None,
            over: None,
        };
    }
    let mut used = 0;
    let mut over = None;
    let keep = rpc
        .entries
        .iter()
        .enumerate()
        .position(|(i, entry)| {
            // An entry that does not serialise fails the call's own
            // encoding anyway.
            let len = raft_store::encoded_len(entry).unwrap_or(0);
            if i == 0 && len > budget {
                over = Some((entry.log_id, len));
            }
            used += len;
            used > budget
        })
        .map_or(rpc.entries.len(), |over| over.max(1));
    if keep == rpc.entries.len() {
        return Within {
            rpc,
            cut: None,
            over,
        };
    }
    rpc.entries.truncate(keep);
    let cut = rpc.entries.last().map(|e| e.log_id);
    Within { rpc, cut, over }
}

/// What of an append goes out within its budget ([`within_budget`]).
struct Within {
    rpc: AppendEntriesRequest<TypeConfig>,
    /// The last entry kept, if any were cut.
    cut: Option<LogId<NodeId>>,
    /// The first entry's id and length, when it alone is over the budget.
    over: Option<(LogId<NodeId>, usize)>,
}

fn unexpected<E: std::error::Error>(reply: &RpcReply) -> RPCError<NodeId, ClusterNode, E> {
    let e = TransportError::Protocol(format!("unexpected reply {reply:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        if rpc.entries.is_empty() {
            if self.replicates && !self.transport.take_heartbeat_refused(self.target) {
                self.send_in_background(rpc, option.hard_ttl());
                return Ok(AppendEntriesResponse::Success);
            }
        } else {
            self.replicates = true;
        }
        let rtt = self.transport.rtt(self.target);
        let deadline = rpc_deadline(option.hard_ttl(), rtt);
        // The entry a long append is sending goes on with it, whatever the
        // budget now (the sending itself grows the window).
        let (reply, cut) = if let Some(long) = self.long.as_mut().filter(|l| l.sends(&rpc)) {
            let cut = (rpc.entries.len() > 1).then_some(long.key.2);
            let done = long.wait(deadline).await;
            (self.long_answer(done, deadline), cut)
        } else {
            let budget = append_budget(self.transport.window(self.target), rtt, deadline);
            let Within { rpc, cut, over } = within_budget(rpc, budget);
            let reply = if let Some((entry, bytes)) = over {
                let done = self.send_long(rpc, entry, bytes).wait(deadline).await;
                self.long_answer(done, deadline)
            } else {
                if !rpc.entries.is_empty() {
                    self.long = None;
                }
                self.call(Rpc::AppendEntries(rpc), RPCTypes::AppendEntries, deadline)
                    .await
            };
            (reply, cut)
        };
        let reply = reply.map_err(Failed::into_rpc_error)?;
        match reply {
            RpcReply::AppendEntries(Ok(AppendEntriesResponse::Success)) if cut.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(cut))
            }
            RpcReply::AppendEntries(r) => r.map_err(|e| self.remote(e).into()),
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.send_chunk(rpc, &option).await
    }

    /// The snapshot's chunks, each as large as the connection's version
    /// carries and several in flight ([`Self::chunking`]), in place of openraft's loop of one chunk at a
    /// time in one size. The follower (openraft's `receive_snapshot`,
    /// every release) starts a snapshot's file at its first chunk and
    /// writes each later one at its offset, in whatever order they come,
    /// and installs the file at the chunk marked `done`; so the first chunk
    /// goes alone, the middle ones overlap, and the last goes once every
    /// earlier one is acknowledged. After a failed chunk the calls still
    /// out are dropped and the send resumes at the first chunk not yet
    /// acknowledged (a chunk written twice is written the same).
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        mut snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        use std::io::SeekFrom;
        use tokio::io::{AsyncReadExt, AsyncSeekExt};

        let signature = snapshot.meta.signature();
        let read_error = |e: std::io::Error| {
            StorageError::from(StorageIOError::read_snapshot(Some(signature.clone()), &e))
        };
        let end = snapshot
            .snapshot
            .seek(SeekFrom::End(0))
            .await
            .map_err(read_error)?;
        // openraft passes the chunk it is configured with, this one.
        let configured = option
            .snapshot_chunk_size()
            .unwrap_or(super::SNAPSHOT_CHUNK as usize);
        let this = &*self;
        let mut cancel = std::pin::pin!(cancel);
        let mut calls = FuturesUnordered::new();
        // The chunks sent and not yet acknowledged: offset → bytes.
        let mut unacknowledged = std::collections::BTreeMap::new();
        let mut next = 0;
        let mut failures = 0;
        let mut backoff = None;
        loop {
            while calls.len() < MAX_CHUNKS_IN_FLIGHT {
                let (size, budget) = this.chunking(configured, option.soft_ttl());
                let done = next + size >= end;
                if !calls.is_empty() {
                    // The first chunk starts the follower's file, and the
                    // last installs it: each waits for every chunk before it.
                    let in_flight: u64 = unacknowledged.values().sum();
                    if next == 0 || done || in_flight + size > budget {
                        break;
                    }
                }
                snapshot
                    .snapshot
                    .seek(SeekFrom::Start(next))
                    .await
                    .map_err(read_error)?;
                let mut data = Vec::with_capacity(size as usize);
                (&mut snapshot.snapshot)
                    .take(size)
                    .read_to_end(&mut data)
                    .await
                    .map_err(read_error)?;
                let (offset, sent) = (next, data.len() as u64);
                let request = InstallSnapshotRequest {
                    vote,
                    meta: snapshot.meta.clone(),
                    offset,
                    data,
                    done,
                };
                let option = option.clone();
                calls.push(async move {
                    let call = this.send_chunk(request, &option);
                    let answer = tokio::time::timeout(option.hard_ttl(), call).await;
                    (offset, done, answer)
                });
                unacknowledged.insert(offset, sent);
                next += sent;
                if offset == 0 || done {
                    break;
                }
            }
            let (offset, done, answer) = tokio::select! {
                closed = cancel.as_mut() => return Err(closed.into()),
                Some(answered) = calls.next() => answered,
            };
            let error = match answer {
                // openraft sends a fresh snapshot after its own limit.
                Err(_) => {
                    let e = AnyError::error("InstallSnapshot call outlasted its limit");
                    return Err(NetworkError::new(&e).into());
                }
                Ok(Ok(reply)) => {
                    if done || reply.vote > vote {
                        return Ok(SnapshotResponse::new(reply.vote));
                    }
                    // Failures count in a row at the front: a later chunk
                    // answered while the first one unanswered keeps failing
                    // is no progress.
                    if unacknowledged.keys().next() == Some(&offset) {
                        failures = 0;
                        backoff = None;
                    }
                    unacknowledged.remove(&offset);
                    continue;
                }
                Ok(Err(e)) => e,
            };
            // The calls still out are dropped (their streams reset): the
            // send resumes at the first chunk not acknowledged.
            calls.clear();
            next = unacknowledged.keys().next().copied().unwrap_or(offset);
            unacknowledged.clear();
            let transient: StreamingError<TypeConfig, Fatal<NodeId>> = match error {
                RPCError::RemoteError(RemoteError {
                    target,
                    target_node,
                    source: RaftError::Fatal(fatal),
                }) => {
                    return Err(RemoteError {
                        target,
                        target_node,
                        source: fatal,
                    }
                    .into());
                }
                // The follower holds another snapshot's chunks: from the
                // start.
                RPCError::RemoteError(RemoteError {
                    source: RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
                    ..
                }) => {
                    info!(target = self.target, mismatch = %m, "snapshot sent again from its start");
                    next = 0;
                    failures = 0;
                    continue;
                }
                RPCError::PayloadTooLarge(p) => {
                    return Err(NetworkError::new(&AnyError::error(p.to_string())).into());
                }
                RPCError::Timeout(e) => e.into(),
                RPCError::Network(e) => e.into(),
                RPCError::Unreachable(e) => e.into(),
            };
            failures += 1;
            if failures >= SNAPSHOT_CHUNK_TRIES {
                return Err(transient);
            }
            let wait = backoff
                .get_or_insert_with(|| self.backoff())
                .next()
                .unwrap_or(BACKOFF_MAX);
            tokio::select! {
                closed = cancel.as_mut() => return Err(closed.into()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        // The candidate's vote is on disk now: its round's wait for
        // answers starts (`election`). A vote needs the voter's fsync, and
        // a candidate is elected at its first quorum, so a dead voter's
        // longer wait delays nothing, while a live but slow one's timeout
        // cost a round: openraft's vote limit (`Timing::vote_limit`), from
        // the send, not one of round trips.
        self.campaign.votes_sent();
        let reply = self
            .call(Rpc::Vote(rpc), RPCTypes::Vote, option.hard_ttl())
            .await
            .map_err(Failed::into_rpc_error)?;
        match reply {
            RpcReply::Vote(r) => r.map_err(|e| self.remote(e).into()),
            other => Err(unexpected(&other)),
        }
    }

    fn backoff(&self) -> Backoff {
        let mut next = BACKOFF_START;
        Backoff::new(std::iter::from_fn(move || {
            let now = next;
            next = (next * 2).min(BACKOFF_MAX);
            Some(now)
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, Vote};
    use raft_store::types::{Entry, Request};

    use super::*;

    /// An append of `sizes.len()` entries, each one whose command is about
    /// `size` bytes of JSON.
    fn append(sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
        let entries = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(3, 1), 10 + i as u64),
                payload: EntryPayload::Normal(Request {
                    command: raft_store::Command::DetachInstance {
                        group: "x".repeat(size),
                        instance: "i".into(),
                    },
                }),
            })
            .collect();
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 9)),
            entries,
            leader_commit: None,
        }
    }

    /// What snapshot chunks may be in flight: what the window sends in half
    /// a chunk's limit, in whole round trips (at least one, at most 64);
    /// nothing more than the one chunk before a connection exists.
    #[test]
    fn snapshot_chunks_in_flight_are_what_the_window_sends_in_half_their_limit() {
        let limit = Duration::from_millis(11_250);
        let ms = Duration::from_millis;
        // The floor's 64 KiB per 300 ms round trip: 18 round trips, about
        // 1.2 MB, one 1 MiB chunk and not two.
        let floor = chunk_budget(Some(64 * 1024), Some(ms(300)), limit);
        assert_eq!(floor, 18 * 64 * 1024);
        assert!(floor < 2 * 1024 * 1024);
        // A window of 1 MB on the same link: all four chunks.
        assert!(chunk_budget(Some(1 << 20), Some(ms(300)), limit) >= 4 << 20);
        // A round trip longer than half the limit still counts one.
        assert_eq!(chunk_budget(Some(1000), Some(ms(9_000)), limit), 1000);
        // Loopback: at most 64 round trips, and no overflow.
        assert_eq!(
            chunk_budget(Some(256 * 1024), Some(Duration::from_micros(50)), limit),
            64 * 256 * 1024
        );
        assert_eq!(
            chunk_budget(Some(u64::MAX), Some(Duration::ZERO), limit),
            u64::MAX
        );
        assert_eq!(chunk_budget(None, Some(ms(300)), limit), 0);
        assert_eq!(chunk_budget(Some(1 << 20), None, limit), 0);
    }

    #[test]
    fn an_append_carries_the_entries_that_fit_its_budget_and_at_least_one() {
        // Four 40 KB entries against 100 KB: two go, and openraft is told
        // the second is the last sent.
        let Within { rpc, cut, .. } = within_budget(append(&[40_000; 4]), 100_000);
        assert_eq!(rpc.entries.len(), 2);
        assert_eq!(cut.map(|l| l.index), Some(11));
        // What fits goes whole, without a cut.
        let Within { rpc, cut, .. } = within_budget(append(&[40_000; 4]), 1_000_000);
        assert_eq!((rpc.entries.len(), cut), (4, None));
        // An entry larger than the budget still goes, alone, and is said
        // to be over it.
        let Within { rpc, cut, over } = within_budget(append(&[200_000, 10]), 100_000);
        assert_eq!(rpc.entries.len(), 1);
        assert_eq!(cut.map(|l| l.index), Some(10));
        assert!(over.is_some_and(|(id, len)| id.index == 10 && len > 200_000));
        let Within { rpc, cut, .. } = within_budget(append(&[200_000]), 100_000);
        assert_eq!((rpc.entries.len(), cut), (1, None));
        // The rest of the request is untouched.
        assert_eq!(rpc.prev_log_id.map(|l| l.index), Some(9));
        // 64 small entries fit the floor.
        let Within { rpc, cut, .. } = within_budget(append(&[300; 64]), APPEND_FLOOR);
        assert_eq!((rpc.entries.len(), cut), (64, None));
        // A budget of what the log store reads for an append at most takes
        // several entries whole, unmeasured.
        let read = raft_store::log_store::REPLICATION_READ_BYTES;
        let Within { rpc, cut, over } = within_budget(append(&[300_000; 4]), read);
        assert_eq!((rpc.entries.len(), cut, over), (4, None, None));
    }

    #[test]
    fn an_append_gets_the_windows_its_call_has_round_trips_for() {
        let ms = Duration::from_millis;
        let window = Some(256 * 1024);
        // 300 ms with the default limit (750 ms): one window.
        assert_eq!(append_budget(window, Some(ms(300)), ms(750)), 256 * 1024);
        // 50 ms (a limit of 400 ms): five round trips and the slack.
        assert_eq!(append_budget(window, Some(ms(50)), ms(400)), 5 * 256 * 1024);
        // Loopback: the ceiling.
        let fast = Some(Duration::from_micros(200));
        assert_eq!(append_budget(window, fast, ms(300)), APPEND_CEILING);
        // A link slower than its limit: still one window, and never under
        // the floor; before a connection, the floor.
        assert_eq!(append_budget(window, Some(ms(900)), ms(750)), 256 * 1024);
        assert_eq!(
            append_budget(Some(1_000), Some(ms(10)), ms(300)),
            APPEND_FLOOR
        );
        assert_eq!(append_budget(None, None, ms(750)), APPEND_FLOOR);
        assert_eq!(append_budget(window, None, ms(750)), APPEND_FLOOR);
    }
}
