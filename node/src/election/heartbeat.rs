//! The leader's heartbeats, sent beside openraft's replication rather than
//! through it.
//!
//! openraft 0.9 keeps one call in flight per follower, and its heartbeat is
//! such a call: on a 300 ms round trip with a heartbeat every 100 ms, one
//! is nearly always on the wire, and a write waits for it to come back
//! before its own append goes out (up to a round trip more). So the leader
//! does not ask openraft for heartbeats; it sends its own, each to one
//! member on a stream of its own, and openraft's replication streams carry
//! only entries (and the new commit index, which openraft sends as soon as
//! it moves), so a write's append leaves at once.
//!
//! A heartbeat is an append with no entries and no previous log id, under
//! the leader's vote, carrying its commit index. A member handles it as any
//! append from its leader: the vote refreshes its leader lease (it does
//! not campaign, and refuses votes, while it hears the leader); with no
//! previous log id nothing is checked or truncated; and the member commits
//! no further than what it accepted from this leader's own appends, so the
//! commit index is safe to carry and lets a member that missed a commit
//! notice catch up. A member of an earlier release handles it the same way
//! (it is an ordinary append). A member with a higher vote answers so; the
//! leader then asks openraft for one heartbeat of its own, whose answer
//! makes it step down.
//!
//! Linearizable reads are unaffected: openraft confirms leadership for them
//! with calls of its own.

use std::collections::HashMap;
use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{RaftMetrics, ServerState};
use raft_store::types::{ClusterNode, NodeId, Raft};
use tokio::task::JoinHandle;
use tracing::debug;

use super::Timing;
use crate::cluster::{Rpc, RpcReply, Transport, TransportError};

/// The heartbeats in flight, one per member at most: a member that has not
/// answered the last one is not sent another until it does or the call
/// times out.
#[derive(Debug, Default)]
pub(super) struct Heartbeats {
    in_flight: HashMap<NodeId, JoinHandle<()>>,
}

impl Heartbeats {
    /// Sends a heartbeat to every other member that has none in flight,
    /// when `m` (this node's metrics) says it leads.
    pub(super) fn send(
        &mut self,
        raft: &Raft,
        transport: &Arc<Transport>,
        m: &RaftMetrics<NodeId, ClusterNode>,
        timing: Timing,
    ) {
        let members: Vec<(NodeId, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, n)| (*id, n.cluster_addr.clone()))
            .collect();
        self.in_flight
            .retain(|id, call| !call.is_finished() && members.iter().any(|(m, _)| m == id));
        if m.state != ServerState::Leader || !m.vote.is_committed() {
            return;
        }
        let matched = m.replication.as_ref();
        for (id, addr) in members {
            if self.in_flight.contains_key(&id) {
                continue;
            }
            let req = AppendEntriesRequest {
                vote: m.vote,
                // What the member was last known to hold (None before its
                // first append of this term): it accepts it again, which
                // lets it commit up to there.
                prev_log_id: matched.and_then(|r| r.get(&id).copied().flatten()),
                // Applied on the leader, so committed.
                leader_commit: m.last_applied,
                entries: Vec::new(),
            };
            let (raft, transport) = (raft.clone(), Arc::clone(transport));
            let call = tokio::spawn(async move {
                let deadline = crate::cluster::rpc_deadline(timing.rpc_limit(), transport.rtt(id));
                match transport
                    .call(id, &addr, Rpc::AppendEntries(req), deadline)
                    .await
                {
                    Ok(RpcReply::AppendEntries(Ok(
                        r
                        @ (AppendEntriesResponse::HigherVote(_) | AppendEntriesResponse::Conflict),
                    ))) => {
                        debug!(member = id, reply = %r, "a heartbeat was refused");
                        // openraft's own heartbeat, awaited, meets the same
                        // answer and acts on it (steps down; finds where the
                        // logs part).
                        transport.heartbeat_refused(id);
                        let _ = raft.trigger().heartbeat().await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if e.is_unreachable() || matches!(e, TransportError::Timeout(_)) {
                            transport.note_unreachable(id, &e.to_string());
                        }
                    }
                }
            });
            self.in_flight.insert(id, call);
        }
    }
}
