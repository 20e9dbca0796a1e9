//! The cluster endpoint's side of load gossip: the transport itself is
//! `gossip::transport` (the sending link, the receiving loop, their limits
//! and codes); this gives it an accepted connection's proven peer and
//! counts what it hands over in the transport's stats.

use std::sync::Arc;

use ::gossip::transport::{self, Dropped, GossipHandler};
use ::gossip::{Arrival, Wire};
use quinn::Connection;
use raft_store::NodeId;

use super::peer::{Peer, Role};
use super::{Shared, bump};

/// Serves an incoming gossip connection until it closes.
pub(super) async fn serve(shared: Arc<Shared>, conn: Connection) {
    bump(&shared.stats.gossip_connections_accepted);
    let Some(peer) = Peer::of(&shared, &conn, Role::Gossip) else {
        return;
    };
    let node_id = shared.node_id;
    let proven = Proven {
        shared: Arc::clone(&shared),
        peer,
    };
    transport::serve(conn, node_id, proven, Counted(shared)).await;
}

/// The peer of a gossip connection: its certificate decides which node's
/// reports it may send.
struct Proven {
    shared: Arc<Shared>,
    peer: Peer,
}

impl transport::Peer for Proven {
    fn proves(&self, id: NodeId) -> bool {
        let proven = self.peer.proves(&self.shared, id);
        if !proven {
            bump(&self.shared.stats.identity_refused);
        }
        proven
    }
}

/// Counts the transport's reports and drops, then hands them to the
/// node's handler (once set).
struct Counted(Arc<Shared>);

impl GossipHandler for Counted {
    fn report(&self, report: Wire, bytes: usize, arrival: Arrival) {
        bump(&self.0.stats.gossip_reports);
        match self.0.gossip.get() {
            Some(handler) => handler.report(report, bytes, arrival),
            None => tracing::debug!("gossip report before the handler was set"),
        }
    }

    fn dropped(&self, reason: Dropped, bytes: usize) {
        bump(&self.0.stats.gossip_dropped);
        if let Some(handler) = self.0.gossip.get() {
            handler.dropped(reason, bytes);
        }
    }
}
