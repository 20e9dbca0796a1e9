//! The messages of the Raft ALPN: what a node asks a peer ([`Rpc`]) and what
//! it answers ([`RpcReply`]), and the server-side hook ([`RaftHandler`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use openraft::LogId;
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InstallSnapshotError, RaftError,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use raft_store::command::Command;
use raft_store::state::{Applied, ApplyError};
use raft_store::{ClusterNode, NodeId, TypeConfig};
use serde::{Deserialize, Serialize};

/// One request to a peer; each travels on its own QUIC stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rpc {
    /// Raft log replication and heartbeats (leader → follower).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election (candidate → voter).
    Vote(VoteRequest<NodeId>),
    /// Would the voter grant a vote now? Asked before an election, so a
    /// node that cannot win never raises its term (`election.rs`).
    PreVote(PreVote),
    /// One chunk of a snapshot (leader → lagging follower).
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A request a follower forwards to the leader.
    Forward(Forward),
}

/// A pre-vote request: the candidate's last log id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVote {
    /// The last entry in the candidate's log.
    pub last_log_id: Option<LogId<NodeId>>,
}

/// What a follower asks the leader to do on its behalf.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forward {
    /// Propose a command (`client_write`).
    Write(Command),
    /// Add a node as a learner.
    AddLearner {
        /// The new node's id.
        node_id: NodeId,
        /// Its addresses and region.
        node: ClusterNode,
    },
    /// Remove a node from the membership.
    RemoveNode {
        /// The node's id.
        node_id: NodeId,
    },
    /// Confirm leadership and tell the index a linearizable read must wait
    /// for.
    Linearize,
    /// What log entries the node reads: the leader asks every member before
    /// it proposes batch entries (a node older than them resets the stream,
    /// as it does for anything it cannot decode).
    Features,
}

/// The answer to one [`Rpc`]; the variant matches the request's.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcReply {
    /// What `Raft::append_entries` answered.
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// What `Raft::vote` answered.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Whether the pre-vote is granted.
    PreVote(bool),
    /// What `Raft::install_snapshot` answered.
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// What the leader did with a [`Forward`].
    Forward(Result<ForwardReply, ForwardError>),
    /// The peer could not handle the request at all (e.g. its Raft is not
    /// running yet). [`Transport::call`](super::Transport::call) turns it
    /// into [`TransportError::Remote`](super::TransportError::Remote).
    Error(String),
}

/// What a forwarded request did on the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardReply {
    /// The command was committed at `log_index` and applied on the leader
    /// with this result.
    Written {
        /// Index of the command's log entry.
        log_index: u64,
        /// What applying it answered.
        result: Result<Applied, ApplyError>,
    },
    /// The membership change was committed at `log_index`.
    Done {
        /// Index of the membership log entry.
        log_index: u64,
    },
    /// The leader confirmed its leadership; a linearizable read on the
    /// follower may proceed once it has applied `read_index`.
    Linearized {
        /// The log index to wait for.
        read_index: u64,
    },
    /// The answer to [`Forward::Features`].
    Features {
        /// The node reads `Command::Batch` entries.
        batches: bool,
        /// The node reads group options (`health_check`,
        /// `send_proxy_protocol`). Absent (false) from older nodes, which
        /// ignore it in turn.
        #[serde(default)]
        group_options: bool,
        /// The node reads `Command::Once` entries. Absent (false) from
        /// older nodes.
        #[serde(default)]
        once: bool,
    },
}

/// Why the leader did not do a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ForwardError {
    /// The node asked is not (or no longer) the leader; retry at `leader` if
    /// one is known.
    #[error("not the leader (leader: {leader_id:?})")]
    NotLeader {
        /// The leader's id, if known.
        leader_id: Option<NodeId>,
        /// The leader's addresses, if known.
        leader: Option<ClusterNode>,
    },
    /// The leader could not confirm its leadership with a quorum.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// A membership change was refused (one in progress, unknown node, …).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Another membership change is still being committed: try again.
    #[error("membership change in progress: {0}")]
    Busy(String),
    /// The leader's Raft stopped, or another failure. A leader below its
    /// free-space floor answers a forwarded write with this too, its
    /// message starting as [`crate::health::is_disk_full`] recognises
    /// (a variant of its own would change the frames of `edgelb-raft/1`
    /// and `/2`, which older nodes would not decode: docs/compatibility.md).
    #[error("{0}")]
    Failed(String),
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, ClusterNode>>> for ForwardError {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, ClusterNode>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Self::NotLeader {
                leader_id: f.leader_id,
                leader: f.leader_node,
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                m @ ChangeMembershipError::InProgress(_),
            )) => Self::Busy(m.to_string()),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
                Self::Membership(m.to_string())
            }
            RaftError::Fatal(f) => Self::Failed(crate::health::fatal_cause(&f)),
        }
    }
}

impl From<RaftError<NodeId, CheckIsLeaderError<NodeId, ClusterNode>>> for ForwardError {
    fn from(e: RaftError<NodeId, CheckIsLeaderError<NodeId, ClusterNode>>) -> Self {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => Self::NotLeader {
                leader_id: f.leader_id,
                leader: f.leader_node,
            },
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                Self::NoQuorum(q.to_string())
            }
            RaftError::Fatal(f) => Self::Failed(crate::health::fatal_cause(&f)),
        }
    }
}

/// The kind of an [`Rpc`]: travels in the stream's header frame so the
/// server picks the body's size limit before reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RpcKind {
    AppendEntries,
    Vote,
    PreVote,
    InstallSnapshot,
    Forward,
}

impl fmt::Display for RpcKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AppendEntries => "append_entries",
            Self::Vote => "vote",
            Self::PreVote => "pre_vote",
            Self::InstallSnapshot => "install_snapshot",
            Self::Forward => "forward",
        })
    }
}

impl Rpc {
    pub(crate) fn kind(&self) -> RpcKind {
        match self {
            Self::AppendEntries(_) => RpcKind::AppendEntries,
            Self::Vote(_) => RpcKind::Vote,
            Self::PreVote(_) => RpcKind::PreVote,
            Self::InstallSnapshot(_) => RpcKind::InstallSnapshot,
            Self::Forward(_) => RpcKind::Forward,
        }
    }
}

impl RpcReply {
    /// The request kind this reply answers; `None` for [`RpcReply::Error`].
    pub(crate) fn kind(&self) -> Option<RpcKind> {
        match self {
            Self::AppendEntries(_) => Some(RpcKind::AppendEntries),
            Self::Vote(_) => Some(RpcKind::Vote),
            Self::PreVote(_) => Some(RpcKind::PreVote),
            Self::InstallSnapshot(_) => Some(RpcKind::InstallSnapshot),
            Self::Forward(_) => Some(RpcKind::Forward),
            Self::Error(_) => None,
        }
    }
}

/// The future a [`RaftHandler`] returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = RpcReply> + Send + 'a>>;

/// What the server side of the transport calls for every request a peer
/// sends. `from` is the peer's node id, proven by its certificate.
///
/// The node implements it over its Raft handle: `AppendEntries`, `Vote` and
/// `InstallSnapshot` go to `Raft::append_entries`, `vote` and
/// `install_snapshot`; `Forward` runs `client_write`, `add_learner`,
/// `change_membership` or `ensure_linearizable` when this node leads.
pub trait RaftHandler: Send + Sync + 'static {
    /// Handles one request and answers it; the reply kind must match the
    /// request's ([`RpcReply::Error`] is always allowed).
    fn handle(&self, from: NodeId, rpc: Rpc) -> HandlerFuture<'_>;
}
