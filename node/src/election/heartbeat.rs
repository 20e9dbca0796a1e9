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
//!
//! **An idle cluster heartbeats less.** Only voters campaign, and a voter
//! campaigns only after hearing no leader for T (`election_timeout`). So
//! each member has its own period ([`Heartbeats::period`]):
//! `heartbeat_interval` for a voter while the log moved within the last T
//! (the default, 100 ms), T/3 for a voter once it has not, and T/2 for a
//! learner while the cluster has fewer voters
//! than `max_voters`: a learner never campaigns and needs an answered call
//! within T only to count as alive for promotion (`membership::caught_up`).
//! With all voters in place no learner can be promoted, and it hears one
//! every 2 T until it is **settled**: it accepted a heartbeat that told it
//! the leader's commit index as it still is and a previous log id that is
//! the leader's last entry (it holds the whole log), and has not connected
//! to the leader since (`Transport::arrivals`). A settled learner is sent
//! nothing until the log moves, so what an idle leader sends does not grow
//! with its learners; its Raft connection, made without keep-alives
//! (`cluster::tls`), lapses after the idle timeout, and the next write's
//! append makes a fresh one. A learner that restarts connects to the
//! leader (or, not knowing it, to every voter) until it hears from the
//! leader (`election::run`): its process may have lost the commit index
//! (saved without an fsync), and the leader, seeing it back, tells it
//! again. The settling heartbeat is also what makes up for a lost commit
//! notice: openraft's notice of a new commit index to a learner is sent
//! without waiting for its answer (`cluster::network`), and a learner is
//! settled only once it accepted a heartbeat carrying that index. Once a
//! voter leaves, the learners are back at T/2 from the
//! leader's next look, so the promotion that follows waits at most about
//! T more for a learner's answer (a handshake more for a settled one).
//!
//! An idle voter's T/3 leaves room for one lost packet on a 300 ms round
//! trip. With one heartbeat in flight, QUIC resends a lost call or reply
//! after its probe timeout (about the round trip plus 45 ms: four RTT
//! variations and the peer's 25 ms acknowledgement delay), so a lost call
//! reaches the voter about T/3 + 345 ms after the previous heartbeat, and
//! a lost reply holds the next call back until 300 + 345 ms after the
//! previous one: about 680 ms of silence either way, against T = 1 s. Two
//! losses of one heartbeat (the resend's timeout doubles) exceed T at any
//! period down to 100 ms; they cost a pre-vote that the other voters
//! refuse while they hear the leader. On
//! a 300 ms round trip nothing changes for
//! a voter: with one heartbeat in flight per member it hears one per round
//! trip either way. Election timing (T, the pre-vote, the lease) is
//! untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{RaftMetrics, ServerState};
use raft_store::types::{ClusterNode, LogId, NodeId, Raft};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Timing;
use crate::cluster::{Rpc, RpcReply, Transport, TransportError};

/// A member as its heartbeat period sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Voter,
    /// `promotable`: the cluster has fewer voters than it keeps.
    Learner {
        promotable: bool,
    },
}

/// The heartbeats in flight, one per member at most: a member that has not
/// answered the last one is not sent another until it does or the call
/// times out.
#[derive(Debug, Default)]
pub(super) struct Heartbeats {
    in_flight: HashMap<NodeId, JoinHandle<()>>,
    /// When each member was last sent one.
    sent: HashMap<NodeId, Instant>,
    /// The last log index seen, and since when.
    log: Option<(Option<u64>, Instant)>,
    /// What each member accepted in its last answered heartbeat (filled in
    /// by the calls' tasks).
    told: Arc<Mutex<HashMap<NodeId, Told>>>,
    /// The voters this node, while leading, found too far for T
    /// ([`Distance`]), and when it last warned of each.
    far: HashMap<NodeId, Far>,
}

/// A voter found too far for T.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Far {
    /// Over T/3 since it was last under T/4.
    now: bool,
    /// Warned of since then.
    said: bool,
    /// When this node last warned of it.
    warned: Option<Instant>,
}

/// A voter whose round trip keeps crossing the band between T/4 and T/3 is
/// warned of at most this often.
const WARN_AGAIN: Duration = Duration::from_secs(600);

/// What a voter's round trip from the leader means for the election
/// timeout T: at most T/3 (the README's table) a lost packet still fits in
/// T (module docs). Over it, a voter that misses a heartbeat or two may
/// campaign, and an election needs two round trips more: the leader warns
/// once, until the round trip is back under T/4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Distance {
    /// Over T/3: warn, if not yet warned.
    TooFar,
    /// Under T/4: a warning given is over.
    Near,
    /// Between the two: as it was.
    Unchanged,
}

impl Distance {
    fn of(rtt: Duration, t: Duration) -> Self {
        if rtt * 3 > t {
            Self::TooFar
        } else if rtt * 4 < t {
            Self::Near
        } else {
            Self::Unchanged
        }
    }
}

/// What a heartbeat told a member that accepted it, and the member's
/// arrivals (`Transport::arrivals`) when it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Told {
    /// The log id the member was known to hold (the heartbeat's previous
    /// log id, which it accepted).
    holds: Option<LogId>,
    /// The commit index the heartbeat carried.
    commit: Option<LogId>,
    arrivals: u64,
}

impl Heartbeats {
    /// How often a member is sent a heartbeat (module docs): its `role`,
    /// and whether the log moved within the last T (`active`).
    pub(super) fn period(timing: Timing, role: Role, active: bool) -> Duration {
        let t = timing.election_timeout;
        let every = match (role, active) {
            (Role::Voter, true) => return timing.heartbeat_interval,
            (Role::Voter, false) => t / 3,
            (Role::Learner { promotable: true }, _) => t / 2,
            (Role::Learner { promotable: false }, _) => t * 2,
        };
        every.max(timing.heartbeat_interval)
    }

    fn told_mut(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Told>> {
        self.told.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn told(&self, id: NodeId) -> Option<Told> {
        self.told_mut().get(&id).copied()
    }

    /// Sends a heartbeat to every other member that has none in flight and
    /// whose period ran out at `now`, when `m` (this node's metrics) says
    /// it leads; the cluster keeps `max_voters` voters. Returns when the
    /// next one is due.
    pub(super) fn send(
        &mut self,
        raft: &Raft,
        transport: &Arc<Transport>,
        m: &RaftMetrics<NodeId, ClusterNode>,
        (timing, max_voters): (Timing, usize),
        now: Instant,
    ) -> Instant {
        let membership = m.membership_config.membership();
        // As the promotion policy sees it: with an even number of free
        // seats, one learner alone cannot be promoted (voters stay odd).
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let promotable =
            !crate::membership::promotions(membership.voter_ids().count(), max_voters, &learners)
                .is_empty();
        let members: Vec<(NodeId, String, Role)> = membership
            .nodes()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, n)| {
                let role = if membership.voter_ids().any(|v| v == *id) {
                    Role::Voter
                } else {
                    Role::Learner { promotable }
                };
                (*id, n.cluster_addr.clone(), role)
            })
            .collect();
        self.in_flight
            .retain(|id, call| !call.is_finished() && members.iter().any(|(m, ..)| m == id));
        self.sent
            .retain(|id, _| members.iter().any(|(m, ..)| m == id));
        self.told_mut()
            .retain(|id, _| members.iter().any(|(m, ..)| m == id));
        self.far.retain(|id, _| {
            members
                .iter()
                .any(|(m, _, role)| m == id && *role == Role::Voter)
        });
        let moved = match self.log {
            Some((index, since)) if index == m.last_log_index => since,
            _ => {
                self.log = Some((m.last_log_index, now));
                now
            }
        };
        let active = now < moved + timing.election_timeout;
        if m.state != ServerState::Leader || !m.vote.is_committed() {
            self.sent.clear();
            self.told_mut().clear();
            return now + timing.heartbeat_interval;
        }
        // Looked at again within a voter's period: the log may move, which
        // shortens it.
        let mut next = now + Self::period(timing, Role::Voter, active);
        let matched = m.replication.as_ref();
        for (id, addr, role) in members {
            if role == Role::Voter
                && let Some(rtt) = transport.rtt(id)
            {
                self.weigh_distance(id, rtt, timing.election_timeout, now);
            }
            let holds = matched.and_then(|r| r.get(&id).copied().flatten());
            let told = Told {
                holds,
                commit: m.last_applied,
                arrivals: transport.arrivals(id),
            };
            if settled(role, told, m.last_log_index, self.told(id)) {
                continue;
            }
            let period = Self::period(timing, role, active);
            if let Some(&at) = self.sent.get(&id)
                && now < at + period
            {
                next = next.min(at + period);
                continue;
            }
            if self.in_flight.contains_key(&id) {
                // Looked at again once its call may have ended.
                next = next.min(now + timing.heartbeat_interval);
                continue;
            }
            self.sent.insert(id, now);
            next = next.min(now + period);
            let req = AppendEntriesRequest {
                vote: m.vote,
                // What the member was last known to hold (None before its
                // first append of this term): it accepts it again, which
                // lets it commit up to there.
                prev_log_id: holds,
                // Applied on the leader, so committed.
                leader_commit: m.last_applied,
                entries: Vec::new(),
            };
            let (raft, transport) = (raft.clone(), Arc::clone(transport));
            let told_to = Arc::clone(&self.told);
            let call = tokio::spawn(async move {
                let deadline = crate::cluster::rpc_deadline(timing.rpc_limit(), transport.rtt(id));
                match transport
                    .call(id, &addr, Rpc::AppendEntries(req), deadline)
                    .await
                {
                    Ok(RpcReply::AppendEntries(Ok(AppendEntriesResponse::Success))) => {
                        told_to
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(id, told);
                    }
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
        next
    }

    /// Warns of voter `id` whose round trip `rtt` is too long for the
    /// election timeout `t` ([`Distance`]) when it becomes so (at most every
    /// [`WARN_AGAIN`]), and says when it is back near after a warning.
    /// Returns whether it logged.
    fn weigh_distance(&mut self, id: NodeId, rtt: Duration, t: Duration, now: Instant) -> bool {
        let rtt_ms = rtt.as_millis();
        let election_timeout_ms = t.as_millis();
        let far = self.far.entry(id).or_default();
        match Distance::of(rtt, t) {
            Distance::TooFar if !far.now => {
                far.now = true;
                far.said = far.warned.is_none_or(|at| now >= at + WARN_AGAIN);
                if !far.said {
                    return false;
                }
                far.warned = Some(now);
                warn!(
                    voter = id,
                    rtt_ms,
                    election_timeout_ms,
                    "the round trip to voter {id} ({rtt_ms} ms) is over a third of \
                     election_timeout ({election_timeout_ms} ms): a lost heartbeat or two can \
                     start an election; set election_timeout to at least 3 × the longest round \
                     trip between voters"
                );
                true
            }
            Distance::Near if far.now => {
                far.now = false;
                // Said only after a warning of this stretch.
                if !std::mem::take(&mut far.said) {
                    return false;
                }
                info!(
                    voter = id,
                    rtt_ms,
                    election_timeout_ms,
                    "the round trip to voter {id} ({rtt_ms} ms) is back under a quarter of \
                     election_timeout"
                );
                true
            }
            _ => false,
        }
    }
}

/// Whether a member needs no heartbeat now (module docs): a learner that
/// cannot be promoted, that holds the leader's last entry (`last_index`),
/// and that accepted a heartbeat (`before`) telling it what it would be
/// told `now`, with no connection of its own to the leader since.
fn settled(role: Role, now: Told, last_index: Option<u64>, before: Option<Told>) -> bool {
    role == (Role::Learner { promotable: false })
        && now.holds.map(|l| l.index) == last_index
        && before == Some(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_spare_learner_told_everything_and_not_back_since_is_left_alone() {
        let id = |index| {
            Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            ))
        };
        let told = Told {
            holds: id(7),
            commit: id(7),
            arrivals: 1,
        };
        let spare = Role::Learner { promotable: false };
        assert!(settled(spare, told, Some(7), Some(told)));
        // Never told, or told before the log or the commit moved.
        assert!(!settled(spare, told, Some(7), None));
        assert!(!settled(spare, told, Some(8), Some(told)));
        let earlier = Told {
            commit: id(6),
            ..told
        };
        assert!(!settled(spare, told, Some(7), Some(earlier)));
        let behind = Told {
            holds: id(6),
            ..told
        };
        assert!(!settled(spare, behind, Some(7), Some(behind)));
        // Back since (a restart may have lost the commit index).
        assert!(!settled(
            spare,
            Told {
                arrivals: 2,
                ..told
            },
            Some(7),
            Some(told)
        ));
        // A voter, or a learner that may be promoted, is heartbeated anyway.
        assert!(!settled(Role::Voter, told, Some(7), Some(told)));
        let promotable = Role::Learner { promotable: true };
        assert!(!settled(promotable, told, Some(7), Some(told)));
    }

    #[test]
    fn a_voter_further_than_a_third_of_t_is_warned_of_once() {
        let t = Timing::default().election_timeout;
        let ms = Duration::from_millis;
        // The README's table: the default T holds up to 300 ms.
        assert_eq!(Distance::of(ms(300), t), Distance::Unchanged);
        assert_eq!(Distance::of(ms(240), t), Distance::Near);
        assert_eq!(Distance::of(ms(334), t), Distance::TooFar);
        let mut h = Heartbeats::default();
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        assert!(h.weigh_distance(2, ms(400), t, at(0)));
        assert!(!h.weigh_distance(2, ms(400), t, at(1)), "warned twice");
        // Between T/4 and T/3 nothing changes; under T/4 it is said once.
        assert!(!h.weigh_distance(2, ms(300), t, at(2)));
        assert!(h.weigh_distance(2, ms(200), t, at(3)));
        assert!(!h.weigh_distance(2, ms(200), t, at(4)));
        // A round trip that keeps crossing the band is warned of again
        // only after WARN_AGAIN, and its returns are said only after a
        // warning.
        assert!(!h.weigh_distance(2, ms(400), t, at(5)));
        assert!(!h.weigh_distance(2, ms(200), t, at(6)));
        assert!(h.weigh_distance(2, ms(400), t, at(600)));
        assert!(h.weigh_distance(2, ms(200), t, at(601)));
        // Each voter on its own.
        assert!(h.weigh_distance(3, ms(400), t, at(601)));
        assert!(!h.weigh_distance(3, ms(400), t, at(602)));
    }

    #[test]
    fn idle_members_hear_heartbeats_no_more_often_than_their_role_needs() {
        let t = Timing::default();
        let period = |role, active| Heartbeats::period(t, role, active);
        let ms = Duration::from_millis;
        assert_eq!(period(Role::Voter, true), ms(100));
        // An idle voter's silence after one lost call (resent after the
        // probe timeout, about the round trip plus 45 ms) or one lost reply
        // (the next call waits for it) on a 300 ms round trip: within 70 %
        // of T (module docs).
        assert_eq!(period(Role::Voter, false), t.election_timeout / 3);
        let (rtt, pto) = (ms(300), ms(345));
        let silence = period(Role::Voter, false).max(rtt) + pto;
        assert!(silence <= t.election_timeout * 7 / 10, "{silence:?}");
        // A promotable learner answers within T; one that cannot be
        // promoted needs nothing.
        let learner = Role::Learner { promotable: true };
        assert_eq!(
            (period(learner, true), period(learner, false)),
            (ms(500), ms(500))
        );
        assert!(period(learner, false) + t.rpc_limit() / 2 < t.election_timeout);
        let spare = Role::Learner { promotable: false };
        assert_eq!(period(spare, true), ms(2000));
        // Never more often than the configured interval.
        let slow = Timing {
            heartbeat_interval: ms(300),
            election_timeout: ms(900),
        };
        assert_eq!(Heartbeats::period(slow, Role::Voter, false), ms(300));
    }
}
