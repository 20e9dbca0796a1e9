//! Who votes: joining, and promoting learners to voters.
//!
//! ```text
//!  joining node                         member (any)               leader
//!  POST /v1/cluster/nodes {csr} ──────▶ signs the certificate
//!  binds its cluster endpoint, starts Raft (empty)
//!  POST /v1/cluster/nodes ────────────▶ Forward::AddLearner ─────▶ add learner
//!                                                                  wait until it answered
//!                                                                  replication up to the entry
//!                                                                  promote (policy below)
//!  ◀──────────────────────────────────── log_index of the last change
//!  waits until it applied log_index ─▶ /readyz 200 (a member; a voter if promoted)
//! ```
//!
//! The node's endpoint is up before it is added, so the leader's first
//! replication RPC finds it listening.
//!
//! **Promotion policy** ([`promotions`]): the leader promotes caught-up
//! learners while there are fewer than `max_voters` voters, and keeps the
//! number of voters odd: one voter and one learner stay so (two voters are
//! less available than one), a second learner makes both voters at once
//! (1 → 3 → 5). A learner is caught up when it has answered replication
//! within the election timeout and its matched index has reached the
//! leader's commit index of a moment ago and trails the current one by no
//! more than a learner that keeps up does ([`lag_allowed`]); a learner
//! that never answered never is. The
//! leader applies the policy when a node is added (waiting up to the
//! election timeout for the live learners it would promote to catch up),
//! after a node is removed, on a change of role, and every
//! [`PROMOTE_EVERY`] (for learners that catch up later, a raised
//! `max_voters`, or a removed voter).
//!
//! Every membership change on a node is made by its [`Reconciler`], one at
//! a time: openraft refuses a change while another is being committed.

use std::collections::BTreeMap;
use std::time::Duration;

use raft_store::types::{NodeId, Raft};
use tracing::info;

use crate::cluster::{ForwardError, Transport};

mod reconciler;
pub use reconciler::Reconciler;

/// How long adding a node waits for it to answer replication before it
/// answers without promoting it (within a write's 5 s).
const CATCH_UP_WAIT: Duration = Duration::from_secs(3);

/// How often the leader applies the policy when nothing asked it to.
pub const PROMOTE_EVERY: Duration = Duration::from_millis(500);

/// What the leader promotes by.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// `max_voters`.
    pub max_voters: usize,
    /// A learner counts as caught up only if it answered within this long
    /// (the election timeout).
    pub alive_within: Duration,
}

/// On the leader: adds `id` as a learner through the reconciler, waits
/// until it answered replication up to that entry, and has the policy
/// applied at once. Returns the index of the membership in force then (the
/// joining node is ready once it applied it).
pub(crate) async fn add_learner(
    raft: &Raft,
    reconciler: &Reconciler,
    id: NodeId,
    node: raft_store::types::ClusterNode,
) -> Result<u64, ForwardError> {
    let added = reconciler.add(id, node).await?;
    // A node added before it runs (`edgectl cluster add-node`, own PKI)
    // does not answer: it stays a learner, promoted later by a pass.
    match tokio::time::timeout(CATCH_UP_WAIT, wait_replicated(raft, id, added)).await {
        Ok(r) => r.map_err(ForwardError::Failed)?,
        Err(_) => {
            info!(node_id = id, "added as a learner; it has not answered yet");
            return Ok(added);
        }
    }
    Ok(reconciler.settle().await?.max(added))
}

/// Which of the caught-up learners `caught_up` (in promotion order) to
/// promote when there are `voters` voters and at most `max_voters` may be:
/// as many as fit, leaving the number of voters odd.
pub fn promotions(voters: usize, max_voters: usize, caught_up: &[NodeId]) -> Vec<NodeId> {
    let fit = max_voters.saturating_sub(voters).min(caught_up.len());
    let k = (0..=fit).rev().find(|k| (voters + k) % 2 == 1).unwrap_or(0);
    caught_up[..k].to_vec()
}

/// The leader's commit index (it applies what it commits: its applied
/// index, give or take the entry being applied).
fn committed(raft: &Raft) -> u64 {
    raft.metrics().borrow().last_applied.map_or(0, |l| l.index)
}

/// The learners the leader knows to be caught up, lowest id first: alive
/// (answered within `alive_within`), holding every entry up to `reached`,
/// an index the leader had committed a moment ago (not its current one:
/// while writes go on, a learner a long round trip away never holds that),
/// and trailing the leader's commit index by at most [`lag_allowed`] at
/// the leader's commit `rate` (entries a second).
fn caught_up(
    raft: &Raft,
    transport: &Transport,
    alive_within: Duration,
    reached: u64,
    rate: f64,
) -> Vec<NodeId> {
    let m = raft.metrics().borrow().clone();
    let committed = m.last_applied.map_or(0, |l| l.index);
    let matched: BTreeMap<NodeId, u64> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter_map(|(id, l)| l.map(|l| (*id, l.index)))
                .collect()
        })
        .unwrap_or_default();
    m.membership_config
        .membership()
        .learner_ids()
        .filter(|id| {
            let lag = lag_allowed(rate, transport.rtt(*id));
            let floor = reached.max(committed.saturating_sub(lag));
            matched.get(id).is_some_and(|&i| i >= floor)
        })
        .filter(|id| transport.answered_within(*id, alive_within))
        .collect()
}

/// Entries a learner may trail the leader's commit index by and still be
/// promoted, whatever the leader commits: a voter that trails by more
/// holds up every commit until it has caught up.
const MIN_LAG_ALLOWED: u64 = 128;
/// What a learner that keeps up trails by besides two round trips: the
/// follower's write of an append, the leader's read of the next, jitter.
const LAG_SLACK: Duration = Duration::from_millis(200);

/// How many entries a learner `rtt` away may trail the leader's commit
/// index by when the leader commits `rate` entries a second, and still
/// count as caught up: what the leader commits in two round trips and
/// [`LAG_SLACK`]. openraft keeps one append in flight per follower, so a
/// learner that keeps up trails by the entries of the append in flight and
/// of those written since it was sent; measured in entries alone (128), a
/// learner 300 ms away under 400 entries a second trailed by 130–290, and
/// never counted as caught up while the writes went on. At least
/// [`MIN_LAG_ALLOWED`]; at most two full appends (more, and the appends
/// are full: the learner falls behind).
fn lag_allowed(rate: f64, rtt: Option<Duration>) -> u64 {
    let window = rtt.unwrap_or_default() * 2 + LAG_SLACK;
    let entries = (rate.max(0.0) * window.as_secs_f64()).ceil();
    // Saturating: a rate too large for u64 is capped below anyway.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let entries = entries as u64;
    entries.clamp(MIN_LAG_ALLOWED, 2 * crate::cluster::MAX_PAYLOAD_ENTRIES)
}

/// Waits until the leader's replication to learner `id` has matched
/// `index` (the learner answered and holds the entry that added it).
pub async fn wait_replicated(raft: &Raft, id: NodeId, index: u64) -> Result<(), String> {
    raft.wait(None)
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .is_some_and(|l| l.index >= index)
            },
            "learner answered replication",
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{MIN_LAG_ALLOWED, lag_allowed, promotions};

    #[test]
    fn voters_stay_odd_and_within_max() {
        // One voter, one learner: promoting it would make two voters.
        assert_eq!(promotions(1, 5, &[2]), Vec::<u64>::new());
        // A second learner: both at once.
        assert_eq!(promotions(1, 5, &[2, 3]), vec![2, 3]);
        assert_eq!(promotions(1, 5, &[2, 3, 4]), vec![2, 3]);
        assert_eq!(promotions(1, 5, &[2, 3, 4, 5]), vec![2, 3, 4, 5]);
        assert_eq!(promotions(3, 5, &[4, 5, 6]), vec![4, 5]);
        assert_eq!(promotions(3, 5, &[4]), Vec::<u64>::new());
        // An even count is made odd by one.
        assert_eq!(promotions(2, 5, &[3]), vec![3]);
        assert_eq!(promotions(4, 5, &[6, 7]), vec![6]);
        // Full, or nobody to promote.
        assert_eq!(promotions(5, 5, &[6, 7]), Vec::<u64>::new());
        assert_eq!(promotions(1, 5, &[]), Vec::<u64>::new());
        // An even max_voters acts as one less.
        assert_eq!(promotions(3, 4, &[4]), Vec::<u64>::new());
        assert_eq!(promotions(1, 4, &[2, 3, 4]), vec![2, 3]);
        assert_eq!(promotions(1, 1, &[2, 3]), Vec::<u64>::new());
    }

    #[test]
    fn a_learner_may_trail_by_what_is_committed_in_two_round_trips() {
        let ms = Duration::from_millis;
        // Quiet, or near: the floor.
        assert_eq!(lag_allowed(0.0, Some(ms(300))), MIN_LAG_ALLOWED);
        assert_eq!(lag_allowed(400.0, Some(ms(1))), MIN_LAG_ALLOWED);
        assert_eq!(lag_allowed(400.0, None), MIN_LAG_ALLOWED);
        // 400 entries a second, 300 ms away: 2 × 300 ms and 200 ms.
        assert_eq!(lag_allowed(400.0, Some(ms(300))), 320);
        // Never more than two full appends, nor less for a bad rate.
        assert_eq!(lag_allowed(5_000.0, Some(ms(300))), 512);
        assert_eq!(lag_allowed(f64::INFINITY, Some(ms(300))), 512);
        assert_eq!(lag_allowed(f64::NAN, Some(ms(300))), MIN_LAG_ALLOWED);
        assert_eq!(lag_allowed(-1.0, Some(ms(300))), MIN_LAG_ALLOWED);
    }
}
