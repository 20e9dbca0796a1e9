//! The openraft type configuration for edgelb: who the nodes are, what a log
//! entry carries and what applying it answers.

use serde::{Deserialize, Serialize};

pub use edgelb_api::cluster::ClusterNode;

use crate::command::Command;
use crate::state::{Applied, ApplyError};

/// A Raft node id: the `node_id` of the node's config.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// edgelb's Raft types: [`Request`]s in, [`Response`]s out, members
    /// described by [`ClusterNode`], snapshots as JSON files.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = ClusterNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle the node runs.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (leader's term and node, index).
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Cluster membership as of a log id.
pub type StoredMembership = openraft::StoredMembership<NodeId, ClusterNode>;
/// A snapshot's id, last log id and membership.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, ClusterNode>;
/// A snapshot: its meta and its bytes.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// What the storage layer answers openraft when the disk fails or its
/// contents do not decode; openraft stops the node on it.
pub type StorageError = openraft::StorageError<NodeId>;

/// The application data of a normal log entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The change to apply.
    pub command: Command,
}

impl From<Command> for Request {
    fn from(command: Command) -> Self {
        Self { command }
    }
}

/// What applying one log entry answered.
///
/// A refused command ([`ApplyError`]) is a normal, replicated outcome: every
/// node refuses it the same way and the log moves on. It is not a Raft error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The outcome of [`State::apply`](crate::State::apply) for a
    /// [`Request`]; `None` for blank and membership entries.
    pub result: Option<Result<Applied, ApplyError>>,
}

impl Response {
    /// The response to an entry that carries no command.
    pub(crate) fn none() -> Self {
        Self { result: None }
    }
}
