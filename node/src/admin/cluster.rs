//! `/v1/cluster`: this node's Raft view, adding and removing nodes.
//!
//! `POST /v1/cluster/nodes` adds a node as a learner; the leader answers once
//! the node has answered replication and was promoted if the policy allows
//! (`membership.rs`); `data.log_index` is the last change's index. With a
//! `csr` in the body (the first step of `edgelb --join`) the answering
//! member only signs the node's certificate with the cluster CA from the
//! replicated state, so any member can admit nodes; the node then adds
//! itself with a second call once its cluster endpoint listens. A
//! certificate is issued only for a node id that is not a member (409
//! otherwise): the token cannot mint a member's identity; a lost node is
//! removed first, then joins again.

use edgelb_api::cluster::{
    AddNodeData, AddNodeRequest, BackupData, ClusterData, ClusterNode, ClusterView, NodeView,
    RemovedNode, RemovedNodes,
};
use hyper::StatusCode;
use hyper::body::Incoming;

use super::Admin;
use super::reply::{ApiError, Reply, success};
use super::request::read_json;
use crate::cluster::pki::{self, CaBundle};

/// `GET /v1/cluster`
pub(crate) fn status(admin: &Admin) -> Reply {
    let s = admin.store.status();
    let now = std::time::Instant::now();
    let nodes = s
        .members
        .into_iter()
        .map(|m| NodeView {
            last_gossip_age_ms: (m.node_id != s.node_id)
                .then(|| admin.gossip.last_report_age(m.node_id, now))
                .flatten()
                .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            node_id: m.node_id,
            region: m.node.region,
            cluster_addr: m.node.cluster_addr,
            admin_addr: m.node.admin_addr,
            role: m.role,
            is_leader: m.is_leader,
        })
        .collect();
    success(ClusterData {
        cluster: ClusterView {
            node_id: s.node_id,
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            nodes,
        },
    })
}

/// `GET /v1/cluster/backup`: the replicated state as this node applied it
/// (with `?consistent=true`, after a linearizable read: nothing committed
/// before the request is missing), encoded on the blocking pool.
pub(crate) async fn backup(admin: &Admin) -> Result<Reply, ApiError> {
    let applied = admin.store.subscribe().borrow().clone();
    let node_id = admin.store.status().node_id;
    tokio::task::spawn_blocking(move || {
        let backup =
            crate::store::backup_of(&applied.state, applied.index, node_id).ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the cluster is not founded yet: nothing to back up",
                )
            })?;
        Ok(success(BackupData { backup }))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("building the backup: {e}"),
        )
    })?
}

/// `POST /v1/cluster/nodes`
pub(crate) async fn add(admin: &Admin, body: Incoming) -> Result<Reply, ApiError> {
    let req: AddNodeRequest = read_json(body).await?;
    if req.node_id == 0 {
        return Err(ApiError::invalid("node_id must be at least 1"));
    }
    for (field, addr) in [
        ("cluster_addr", &req.cluster_addr),
        ("admin_addr", &req.admin_addr),
    ] {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ApiError::invalid(format!(
                "{field} {addr:?} is not IP:PORT"
            )));
        }
    }
    if req.region.is_empty() || req.region.len() > 63 {
        return Err(ApiError::invalid("region must be 1 to 63 characters"));
    }
    let node = ClusterNode {
        region: req.region.clone(),
        cluster_addr: req.cluster_addr.clone(),
        admin_addr: req.admin_addr.clone(),
    };
    let status = admin.store.status();
    let member = status.members.iter().find(|m| m.node_id == req.node_id);
    if member.is_some() && req.csr.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "node {id} is already a member: certificates are issued only to nodes that are not members; \
                 to replace a lost node, remove it first (DELETE /v1/cluster/nodes/{id}), then let it join again",
                id = req.node_id
            ),
        ));
    }
    if member.is_some_and(|m| m.node != node) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "node {} is already a member with other addresses",
                req.node_id
            ),
        ));
    }
    let (certificate, ca_certificate) = match &req.csr {
        None => (None, None),
        Some(csr) => {
            let state = admin.store.state();
            let secrets = state.cluster().ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the cluster is not initialised yet",
                )
            })?;
            if secrets.ca_key_pem.is_empty() {
                return Err(ApiError::invalid(
                    "this cluster runs its own PKI: members cannot sign certificates; start the node with --ca-cert, --node-cert and --node-key",
                ));
            }
            let ca = CaBundle {
                cert_pem: secrets.ca_cert_pem.clone(),
                key_pem: secrets.ca_key_pem.clone(),
            };
            let cert = pki::sign_node_csr_for(&ca, csr, req.node_id, admin.node_cert_lifetime)
                .map_err(|e| ApiError::invalid(format!("csr: {e}")))?;
            (Some(cert), Some(secrets.ca_cert_pem.clone()))
        }
    };
    let log_index = match certificate {
        Some(_) => None,
        None => Some(admin.store.add_learner(req.node_id, node.clone()).await?),
    };
    Ok(success(AddNodeData {
        node,
        node_id: req.node_id,
        certificate,
        ca_certificate,
        log_index,
    }))
}

/// `DELETE /v1/cluster/nodes/{id}`
pub(crate) async fn remove(admin: &Admin, id: &str) -> Result<Reply, ApiError> {
    let node_id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("node id {id:?} is not a number")))?;
    if !admin
        .store
        .status()
        .members
        .iter()
        .any(|m| m.node_id == node_id)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("node {node_id} is not a member"),
        ));
    }
    admin.store.remove_node(node_id).await?;
    Ok(success(RemovedNodes {
        nodes: vec![RemovedNode { node_id }],
    }))
}
