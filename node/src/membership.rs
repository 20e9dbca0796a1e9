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
//! leader's commit index of two round trips to it and a little more ago
//! ([`trail_allowed`]: what a learner that keeps up holds); a learner that
//! never answered never is. The
//! leader applies the policy when a node is added (waiting up to the
//! election timeout for the live learners it would promote to catch up),
//! after a node is removed, on a change of role, and every
//! [`PROMOTE_EVERY`] (for learners that catch up later, a raised
//! `max_voters`, or a removed voter).
//!
//! Every membership change on a node is made by its [`Reconciler`], one at
//! a time: openraft refuses a change while another is being committed.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use raft_store::types::{NodeId, Raft};
use tokio::time::Instant;
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
    committed_in(&raft.metrics().borrow())
}

/// [`committed`] as `m` tells it.
fn committed_in(m: &openraft::RaftMetrics<NodeId, raft_store::ClusterNode>) -> u64 {
    m.last_applied.map_or(0, |l| l.index)
}

/// The learners the leader knows to be caught up, lowest id first: alive
/// (answered within `alive_within`), holding every entry up to `target`,
/// and holding what the leader had committed [`trail_allowed`] ago
/// (`history`; not its current commit index: while writes go on, a
/// learner a long round trip away never holds that).
fn caught_up(
    raft: &Raft,
    transport: &Transport,
    alive_within: Duration,
    target: u64,
    history: &CommitHistory,
) -> Vec<NodeId> {
    let m = raft.metrics().borrow().clone();
    let committed = committed_in(&m);
    let now = Instant::now();
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
            let then = history.at(now, committed, trail_allowed(transport.rtt(*id)));
            matched.get(id).is_some_and(|&i| i >= target.max(then))
        })
        .filter(|id| transport.answered_within(*id, alive_within))
        .collect()
}

/// What a learner that keeps up trails the leader by besides two round
/// trips: the follower's write of an append, the leader's read of the
/// next, jitter.
const TRAIL_SLACK: Duration = Duration::from_millis(200);

/// How far behind the leader, in time, a learner `rtt` away may be and
/// still count as caught up: two round trips and [`TRAIL_SLACK`] (without
/// a measured round trip, the slack alone). openraft keeps one append in
/// flight per follower, so a learner that keeps up holds what the leader
/// had committed when the append in flight was sent, up to two round
/// trips ago. Measured in entries instead (at most 128 behind), learners
/// 300 ms away under 400 entries a second trailed by 130–290 and were
/// promoted in 1 run of 4 while the writes went on. A voter that trails by
/// more holds up every commit until it has caught up; one that falls
/// behind (its appends carry less than the leader commits) soon trails by
/// more than this.
fn trail_allowed(rtt: Option<Duration>) -> Duration {
    rtt.unwrap_or_default()
        .saturating_mul(2)
        .saturating_add(TRAIL_SLACK)
}

/// The leader's commit index over the last few seconds, sampled at each
/// pass of the policy: what it had committed a while ago.
#[derive(Debug, Default)]
pub(crate) struct CommitHistory {
    /// (when, commit index), oldest first; commit indexes never go down.
    samples: VecDeque<(Instant, u64)>,
}

impl CommitHistory {
    /// Samples older than this are dropped (but the newest of them).
    const KEEP: Duration = Duration::from_secs(4);

    /// Notes that the leader had committed `committed` at `now`.
    pub(crate) fn record(&mut self, now: Instant, committed: u64) {
        self.samples.push_back((now, committed));
        while self
            .samples
            .get(1)
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= Self::KEEP)
        {
            self.samples.pop_front();
        }
    }

    /// Forgets every sample (this node stopped leading).
    pub(crate) fn clear(&mut self) {
        self.samples.clear();
    }

    /// What the leader had committed `ago` before `now`, when it commits
    /// `committed` now: interpolated between the samples around that time
    /// (so at least the index of the sample before it, at most that of the
    /// one after), or the oldest sample's when none is that old (stricter:
    /// a later index), or `committed` without samples.
    pub(crate) fn at(&self, now: Instant, committed: u64, ago: Duration) -> u64 {
        let Some(t) = now.checked_sub(ago) else {
            return self.samples.front().map_or(committed, |&(_, c)| c);
        };
        let mut after = (now, committed);
        for &(at, c) in self.samples.iter().rev() {
            if at <= t {
                let span = after.0.saturating_duration_since(at).as_nanos();
                let into = t.saturating_duration_since(at).as_nanos();
                let grew = after.1.saturating_sub(c);
                if span == 0 {
                    return c;
                }
                let part = u128::from(grew).saturating_mul(into) / span;
                return c + u64::try_from(part).map_or(grew, |p| p.min(grew));
            }
            after = (at, c);
        }
        after.1
    }
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

    use tokio::time::Instant;

    use super::{CommitHistory, promotions, trail_allowed};

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
    fn a_learner_may_trail_by_two_round_trips() {
        let ms = Duration::from_millis;
        assert_eq!(trail_allowed(None), ms(200));
        assert_eq!(trail_allowed(Some(ms(1))), ms(202));
        assert_eq!(trail_allowed(Some(ms(300))), ms(800));
        assert_eq!(trail_allowed(Some(Duration::MAX)), Duration::MAX);
    }

    #[test]
    fn the_history_tells_what_was_committed_a_while_ago() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut h = CommitHistory::default();
        // Nothing sampled: what is committed now.
        assert_eq!(h.at(t0, 50, ms(800)), 50);
        // 100 entries a second, sampled every 500 ms.
        for i in 0..=8u64 {
            h.record(t0 + ms(500) * u32::try_from(i).unwrap(), 100 * i / 2);
        }
        let now = t0 + ms(4_100);
        // 800 ms before 4.1 s is 3.3 s: between the samples at 3.0 s (300)
        // and 3.5 s (350), interpolated.
        assert_eq!(h.at(now, 410, ms(800)), 330);
        // Between the last sample (4.0 s, 400) and now.
        assert_eq!(h.at(now, 410, ms(50)), 405);
        assert_eq!(h.at(now, 410, Duration::ZERO), 410);
        // Older than every sample kept: the oldest (stricter).
        let oldest = h.samples.front().copied().unwrap();
        assert!(now.duration_since(oldest.0) >= CommitHistory::KEEP);
        assert_eq!(h.at(now, 410, ms(60_000)), oldest.1);
        assert_eq!(h.at(now, 410, Duration::MAX), oldest.1);
        // A burst between two samples: never below the earlier sample's
        // index nor above the later one's.
        let mut b = CommitHistory::default();
        b.record(t0, 10);
        b.record(t0 + ms(500), 1_010);
        let v = b.at(t0 + ms(500), 1_010, ms(400));
        assert!((10..=1_010).contains(&v), "{v}");
        assert_eq!(v, 210);
        // Forgotten when this node stops leading.
        b.clear();
        assert_eq!(b.at(t0 + ms(600), 1_020, ms(400)), 1_020);
    }
}
