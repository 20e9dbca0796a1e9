//! A peer connected to this node: its certificate, the node id it has
//! proven, and what the connection is to this node.

use std::sync::{Arc, OnceLock};

use quinn::Connection;
use raft_store::NodeId;
use rustls::pki_types::CertificateDer;
use tracing::warn;

use super::{Shared, bump, codes};
use crate::cluster::tls::{peer_leaf, verify_peer_id};

/// What a connection is to this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// A gossip connection a peer opened.
    Gossip,
    /// A Raft connection a peer opened: once the peer is known, this
    /// node's calls to it may use it as well.
    Inbound,
    /// A Raft connection this node opened, on which the peer may call.
    Own,
}

/// A connected peer: its certificate, and the node id it has proven.
pub(crate) struct Peer {
    pub(crate) conn: Connection,
    pub(crate) leaf: CertificateDer<'static>,
    proven: OnceLock<NodeId>,
    role: Role,
}

impl Peer {
    /// The peer of `conn`; `None` (and the connection closed) when it
    /// presented no certificate.
    pub(crate) fn of(shared: &Shared, conn: &Connection, role: Role) -> Option<Self> {
        // rustls required and verified a client certificate; a connection
        // without one cannot get here, but is refused rather than trusted.
        let Some(leaf) = peer_leaf(conn) else {
            bump(&shared.stats.identity_refused);
            conn.close(codes::IDENTITY, b"no client certificate");
            return None;
        };
        Some(Self {
            conn: conn.clone(),
            leaf,
            proven: OnceLock::new(),
            role,
        })
    }

    /// Whether the certificate is valid for node `id`. The first proof on
    /// a connection the peer opened tells the transport that `id` reaches
    /// this node (a peer that restarted, or a link that healed): a pending
    /// handshake of its own to `id` starts afresh
    /// (`Shared::peer_connected`).
    pub(crate) fn proves(&self, shared: &Arc<Shared>, id: NodeId) -> bool {
        if self.proven.get() == Some(&id) {
            return true;
        }
        if let Err(e) = verify_peer_id(&self.leaf, id) {
            warn!(claimed = id, error = %e, "peer claims an id its certificate does not name");
            return false;
        }
        if self.proven.set(id).is_ok() && self.role != Role::Own {
            shared.peer_connected(id);
        }
        true
    }
}
