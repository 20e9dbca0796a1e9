//! The `/v1/cluster` routes' bodies (SPEC §6) and what the cluster knows
//! about a member ([`ClusterNode`], stored in Raft's membership entries).
//!
//! ```text
//!  GET    /v1/cluster              ─▶ data: ClusterData { cluster: ClusterView { …, nodes: [NodeView] } }
//!  POST   /v1/cluster/nodes        AddNodeRequest ─▶ data: AddNodeData
//!         (with `csr`: the first step of `edgelb --join`, a certificate; without: added as a learner)
//!  DELETE /v1/cluster/nodes/{id}   ─▶ data: RemovedNodes { nodes: [RemovedNode] }
//!  GET    /v1/cluster/backup       ─▶ data: BackupData { backup: Backup }
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// What the cluster knows about a member: enough to reach it and to place it.
///
/// Stored in membership log entries, so every node learns the addresses of
/// every other from the log.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node's region.
    pub region: String,
    /// The node's QUIC endpoint (Raft and gossip), `host:port`.
    pub cluster_addr: String,
    /// The node's admin API, `host:port`.
    pub admin_addr: String,
}

impl fmt::Display for ClusterNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cluster={} admin={}",
            self.region, self.cluster_addr, self.admin_addr
        )
    }
}

/// `data` of `GET /v1/cluster`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterData {
    /// The answering node's view of the cluster.
    pub cluster: ClusterView,
}

/// One node's view of the cluster: its Raft progress and the members.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// The node that answered.
    pub node_id: u64,
    /// The leader it knows of.
    pub leader_id: Option<u64>,
    /// Its Raft term.
    pub term: u64,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied on the answering node.
    pub applied_index: u64,
    /// The members.
    pub nodes: Vec<NodeView>,
}

impl ClusterView {
    /// How many members vote.
    pub fn voters(&self) -> usize {
        self.count(Role::Voter)
    }

    /// How many members are learners.
    pub fn learners(&self) -> usize {
        self.count(Role::Learner)
    }

    fn count(&self, role: Role) -> usize {
        self.nodes.iter().filter(|n| n.role == role).count()
    }
}

/// One member as the answering node sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Its id.
    pub node_id: u64,
    /// Its region.
    pub region: String,
    /// Its QUIC address.
    pub cluster_addr: String,
    /// Its admin API address.
    pub admin_addr: String,
    /// Voter or learner.
    pub role: Role,
    /// Whether it leads.
    pub is_leader: bool,
    /// Age of the newest load report from this node; null for the
    /// answering node itself and until its first report arrives.
    #[serde(default)]
    pub last_gossip_age_ms: Option<u64>,
}

/// A member's role in the Raft membership: `voter` or `learner`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Votes and counts towards the quorum.
    Voter,
    /// Replicates the log without voting.
    Learner,
}

impl Role {
    /// `voter` or `learner`, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Voter => "voter",
            Self::Learner => "learner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/cluster/nodes` body: a node asking to be added (with a CSR
/// when it wants a certificate from the cluster CA).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    /// The node's id (at least 1).
    pub node_id: u64,
    /// Its QUIC address, `IP:PORT`.
    pub cluster_addr: String,
    /// Its admin API address, `IP:PORT`.
    pub admin_addr: String,
    /// Its region; `local` when omitted.
    #[serde(default = "default_region")]
    pub region: String,
    /// A PEM certificate request for the node's name, to be signed by the
    /// cluster CA instead of adding the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

fn default_region() -> String {
    "local".into()
}

/// `data` of the answer to `POST /v1/cluster/nodes`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AddNodeData {
    /// The member as recorded.
    pub node: ClusterNode,
    /// Its id.
    pub node_id: u64,
    /// The signed node certificate (PEM), when the request had a `csr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The cluster CA's certificate (PEM), with `certificate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
    /// When the node was added: the index of the last membership change
    /// (its addition, and its promotion when the leader made one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_index: Option<u64>,
}

/// `data` of the answer to `DELETE /v1/cluster/nodes/{id}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RemovedNodes {
    /// The node removed.
    pub nodes: Vec<RemovedNode>,
}

/// One removed node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RemovedNode {
    /// Its id.
    pub node_id: u64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cluster_view_json() {
        let view = ClusterData {
            cluster: ClusterView {
                node_id: 1,
                leader_id: Some(1),
                term: 3,
                commit_index: 9,
                applied_index: 8,
                nodes: vec![
                    NodeView {
                        node_id: 1,
                        region: "fra".into(),
                        cluster_addr: "10.0.0.1:7071".into(),
                        admin_addr: "10.0.0.1:7070".into(),
                        role: Role::Voter,
                        is_leader: true,
                        last_gossip_age_ms: None,
                    },
                    NodeView {
                        node_id: 2,
                        region: "ams".into(),
                        cluster_addr: "10.0.0.2:7071".into(),
                        admin_addr: "10.0.0.2:7070".into(),
                        role: Role::Learner,
                        is_leader: false,
                        last_gossip_age_ms: Some(42),
                    },
                ],
            },
        };
        let json = json!({"cluster": {
        "node_id": 1, "leader_id": 1, "term": 3, "commit_index": 9, "applied_index": 8,
        "nodes": [
            {"node_id": 1, "region": "fra", "cluster_addr": "10.0.0.1:7071", "admin_addr": "10.0.0.1:7070",
             "role": "voter", "is_leader": true, "last_gossip_age_ms": null},
            {"node_id": 2, "region": "ams", "cluster_addr": "10.0.0.2:7071", "admin_addr": "10.0.0.2:7070",
             "role": "learner", "is_leader": false, "last_gossip_age_ms": 42},
        ]}});
        assert_eq!(serde_json::to_value(&view).ok(), Some(json.clone()));
        let back: Option<ClusterData> = serde_json::from_value(json).ok();
        assert_eq!(back.as_ref(), Some(&view));
        assert_eq!(view.cluster.voters(), 1);
        assert_eq!(view.cluster.learners(), 1);
    }

    #[test]
    fn add_node_bodies() {
        let req: Option<AddNodeRequest> = serde_json::from_value(json!({
            "node_id": 2, "cluster_addr": "127.0.0.2:7071", "admin_addr": "127.0.0.2:7070"
        }))
        .ok();
        assert_eq!(req.as_ref().map(|r| r.region.as_str()), Some("local"));
        assert_eq!(
            req.and_then(|r| serde_json::to_value(r).ok()),
            Some(json!({
                "node_id": 2, "cluster_addr": "127.0.0.2:7071", "admin_addr": "127.0.0.2:7070",
                "region": "local"
            }))
        );
        let typo = json!({"node_id": 2, "cluster_addr": "a", "admin_addr": "b", "regoin": "x"});
        assert!(serde_json::from_value::<AddNodeRequest>(typo).is_err());
        let data = AddNodeData {
            node: ClusterNode {
                region: "local".into(),
                cluster_addr: "127.0.0.2:7071".into(),
                admin_addr: "127.0.0.2:7070".into(),
            },
            node_id: 2,
            certificate: None,
            ca_certificate: None,
            log_index: Some(7),
        };
        assert_eq!(
            serde_json::to_value(&data).ok(),
            Some(json!({
                "node": {"region": "local", "cluster_addr": "127.0.0.2:7071", "admin_addr": "127.0.0.2:7070"},
                "node_id": 2, "log_index": 7
            }))
        );
        assert_eq!(
            serde_json::to_value(RemovedNodes {
                nodes: vec![RemovedNode { node_id: 3 }]
            })
            .ok(),
            Some(json!({"nodes": [{"node_id": 3}]}))
        );
    }
}

/// `GET /v1/cluster/backup`'s `data`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackupData {
    /// The backup.
    pub backup: Backup,
}

/// The format of a [`Backup`] this release writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// The replicated state at one applied log index: what `edgelb --restore`
/// founds a new cluster with. It holds the cluster CA's private key and
/// the stored certificates' keys: keep it as secret as the data dir.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Backup {
    /// [`BACKUP_FORMAT`] when written; a newer one is refused.
    pub format: u32,
    /// When it was taken (RFC 3339, UTC).
    pub taken_at: String,
    /// The node it was taken from.
    pub node_id: u64,
    /// The last log index applied to the state it holds.
    pub applied_index: u64,
    /// The cluster CA and the admin token's hash.
    pub cluster: crate::model::ClusterSecrets,
    /// Every service group, with its instances.
    pub groups: Vec<crate::model::ServiceGroup>,
    /// Every stored certificate, keys included.
    pub certificates: Vec<crate::model::Certificate>,
}

impl fmt::Debug for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backup")
            .field("format", &self.format)
            .field("taken_at", &self.taken_at)
            .field("node_id", &self.node_id)
            .field("applied_index", &self.applied_index)
            .field("groups", &self.groups.len())
            .field("certificates", &self.certificates.len())
            .finish_non_exhaustive()
    }
}
