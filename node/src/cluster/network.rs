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

use std::sync::Arc;
use std::time::Duration;

use openraft::RPCTypes;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use raft_store::{ClusterNode, NodeId, TypeConfig};

use super::rpc::{Rpc, RpcReply};
use super::transport::{Transport, TransportError};

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
}

impl Network {
    /// A network that calls peers through `transport`.
    pub fn new(transport: Arc<Transport>) -> Self {
        Self { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &ClusterNode) -> PeerNetwork {
        PeerNetwork {
            transport: Arc::clone(&self.transport),
            target,
            node: node.clone(),
        }
    }
}

/// The connection to one peer as openraft sees it.
#[derive(Debug)]
pub struct PeerNetwork {
    transport: Arc<Transport>,
    target: NodeId,
    node: ClusterNode,
}

impl PeerNetwork {
    async fn call(&self, rpc: Rpc, action: RPCTypes, ttl: Duration) -> Result<RpcReply, Failed> {
        let entries = match &rpc {
            Rpc::AppendEntries(r) => r.entries.len(),
            _ => 0,
        };
        let ttl = match action {
            // A snapshot chunk carries megabytes: keep openraft's limit.
            RPCTypes::InstallSnapshot => ttl,
            _ => rpc_deadline(ttl, self.transport.rtt(self.target)),
        };
        self.transport
            .call(self.target, &self.node.cluster_addr, rpc, ttl)
            .await
            .inspect_err(|e| {
                if e.is_unreachable() || matches!(e, TransportError::Timeout(_)) {
                    self.transport.note_unreachable(self.target, &e.to_string());
                }
            })
            .map_err(|e| Failed {
                error: e,
                action,
                from: self.transport.node_id(),
                target: self.target,
                ttl,
                entries,
            })
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
        let reply = self
            .call(
                Rpc::AppendEntries(rpc),
                RPCTypes::AppendEntries,
                option.hard_ttl(),
            )
            .await
            .map_err(Failed::into_rpc_error)?;
        match reply {
            RpcReply::AppendEntries(r) => r.map_err(|e| self.remote(e).into()),
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let reply = self
            .call(
                Rpc::InstallSnapshot(rpc),
                RPCTypes::InstallSnapshot,
                option.hard_ttl(),
            )
            .await
            .map_err(Failed::into_rpc_error)?;
        match reply {
            RpcReply::InstallSnapshot(r) => r.map_err(|e| self.remote(e).into()),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
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
