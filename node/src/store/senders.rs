//! Who may ask what on the Raft ALPN.
//!
//! The transport has already checked that the client certificate chains to
//! the cluster CA and names `from` (`cluster/server.rs`). A certificate
//! outlives a membership, though, and a member's certificate proves only
//! its own id. So, before a request reaches openraft or the leader's
//! batcher:
//!
//! - forwarded writes, membership changes and linearizable reads come only
//!   from current members (voters or learners) of this node's membership;
//! - a Raft message speaks only for its sender: the leader id of an append
//!   or snapshot chunk, and the candidate of a vote, must be `from`;
//! - a pre-vote (whose candidate is `from` itself) comes only from a voter
//!   of this node's membership: a granted one binds the voter for a while
//!   (`election::Campaign::promise`), which a removed node or a learner
//!   must not be able to make it do.
//!
//! Appends, votes and snapshot chunks are not checked against the
//! membership: a node being added hears its leader before its own log names
//! anyone, and openraft itself ignores votes and appends of lower terms.

use raft_store::types::Raft;

use crate::cluster::{Forward, Rpc};

/// Why `rpc` from node `from` is refused, or `None` when it may be handled.
pub(super) fn refusal(raft: &Raft, from: u64, rpc: &Rpc) -> Option<String> {
    let speaks_for = match rpc {
        Rpc::AppendEntries(r) => Some(("append", r.vote.leader_id().voted_for())),
        Rpc::InstallSnapshot(r) => Some(("snapshot", r.vote.leader_id().voted_for())),
        Rpc::Vote(r) => Some(("vote", r.vote.leader_id().voted_for())),
        Rpc::PreVote(_) | Rpc::Forward(_) => None,
    };
    if let Some((what, id)) = speaks_for
        && id != Some(from)
    {
        return Some(format!(
            "node {from} sent a {what} for node {}",
            id.map_or_else(|| "none".to_owned(), |i| i.to_string())
        ));
    }
    // What the leader is asked to do for the sender; `Features` only asks
    // what this binary reads.
    let needs_member = matches!(rpc, Rpc::Forward(f) if !matches!(f, Forward::Features));
    let member = || {
        raft.metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&from)
            .is_some()
    };
    if needs_member && !member() {
        return Some(format!("node {from} is not a member"));
    }
    if matches!(rpc, Rpc::PreVote(_)) {
        let voter = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == from);
        if !voter {
            return Some(format!("node {from} is not a voter"));
        }
    }
    None
}
