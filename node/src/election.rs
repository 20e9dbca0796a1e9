//! Heartbeats and elections, timed by this node rather than by openraft.
//!
//! openraft (0.9) ties three things to one `heartbeat_interval`: how often
//! the leader sends heartbeats, how long a replication RPC may take, and
//! the granularity of its election timer; and a follower that saw a leader
//! waits `lease + election timeout` before campaigning. On a 300 ms round
//! trip the RPC limit must be several hundred ms, which would make
//! heartbeats sparse and elections take seconds. So openraft's own
//! heartbeat and election timers are switched off and this task drives
//! both ([`Timing`]):
//!
//! ```text
//!  leader:   every heartbeat_interval ─▶ an empty append to each member
//!            beside openraft's replication ([`heartbeat`])
//!  voter:    no leader heard for a random time in [T, 1.1 T)
//!              ─▶ pre-vote: ask every voter "would you vote for me?"
//!                   (granted only by a voter that has not heard a leader
//!                    for T either, and whose log is not ahead of ours)
//!              ─▶ a quorum of every config granted ─▶ raft.trigger().elect()
//!              ─▶ otherwise wait a short random time and look again
//! ```
//!
//! Two voters that lose their leader together must not split the vote: in a
//! three-node cluster with one node dead, a split costs a whole retry
//! (another pre-vote and vote, two round trips more). A voter that is
//! campaigning itself ([`Campaign`]) therefore refuses a pre-vote to a
//! candidate whose log is only as good as its own: while its own pre-vote
//! round runs, when the requester's id is higher (of two concurrent rounds
//! exactly one wins), and while its own vote requests are out (from the
//! won pre-vote until its campaign retry), whatever the id. A voter that
//! granted a pre-vote backs that candidate for T/2: it grants no other
//! whose log is no better, except one with a lower id and the same log,
//! and starts no round of its own (with five voters, two concurrent rounds
//! could otherwise both find a quorum). A voter that grants a pre-vote
//! while its own round runs drops that round, won or not. So of any set of
//! concurrent candidates with equal logs, the one with the lowest id
//! gathers every grant and the others stand down: without the exception,
//! three rounds could each hold a voter another needs (4 promised to 3, 3
//! yielding only to 1, 1 refusing 3) and all fail, twice in a row. A
//! requester whose log is ahead is always granted, and the refusals end
//! with the round, the campaign or the promise, so no pair of voters can
//! block each other.
//!
//! The pre-vote (Raft thesis §9.6) is what keeps a node that was only cut
//! off from deposing a healthy leader when it comes back: while cut off it
//! cannot gather pre-votes, so it never raises its term, and once back its
//! peers refuse because they hear the leader. openraft's leader lease
//! (`election_timeout_max` = T) still guards the real vote the same way.
//!
//! [`grant_pre_vote`] and [`quorum`] are plain decisions with no I/O.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{LogId, ServerState};
use raft_store::LogStore;
use raft_store::types::{ClusterNode, NodeId, Raft};
use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::cluster::{PreVote, Rpc, RpcReply, Transport};

mod heartbeat;

/// The cluster's Raft timing (`raft_heartbeat_interval`, `election_timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The leader sends a heartbeat this often.
    pub heartbeat_interval: Duration,
    /// T: a voter that hears no leader for a random time in [T, 1.1 T)
    /// starts an election; a voter that heard one within T refuses to vote.
    pub election_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_secs(1),
        }
    }
}

impl Timing {
    /// The longest a replication RPC may take: three quarters of T,
    /// 750 ms by default, which covers a 300 ms round trip, the peer's
    /// fsync and a lost packet's retransmission.
    pub fn rpc_limit(&self) -> Duration {
        self.election_timeout * 3 / 4
    }

    /// The longest a vote RPC may take, counted from when it is sent: just
    /// under T (openraft's vote limit must stay below its leader lease,
    /// which is T). A vote costs the voter an fsync, which on a busy disk
    /// took most of a second, and a round ends at its first quorum, so a
    /// dead voter's longer wait delays nothing.
    pub fn vote_limit(&self) -> Duration {
        self.election_timeout
            .saturating_sub(Duration::from_millis(1))
            .max(self.rpc_limit() + Duration::from_millis(1))
    }

    /// openraft's settings for this timing.
    pub fn openraft(&self) -> openraft::Config {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let rpc = ms(self.rpc_limit()).max(1);
        let vote = ms(self.vote_limit()).max(rpc + 1);
        openraft::Config {
            // openraft's timers are off (see the module docs); what remains
            // of these is the RPC limit (`heartbeat_interval`), the vote
            // RPC limit (`election_timeout_min`) and the leader lease
            // (`election_timeout_max`).
            enable_heartbeat: false,
            enable_elect: false,
            heartbeat_interval: rpc,
            election_timeout_min: vote,
            election_timeout_max: ms(self.election_timeout).max(vote + 1),
            ..Default::default()
        }
    }

    /// A fresh random election deadline after silence began at `since`:
    /// [T, 1.1 T). The spread is small because campaigns part by the
    /// pre-vote rule rather than by chance (module docs); it only keeps
    /// voters from asking in lockstep.
    fn deadline(&self, since: Instant, rng: &mut impl Rng) -> Instant {
        let t = self.election_timeout;
        since + t + t.mul_f64(rng.random_range(0.0..0.1))
    }

    /// How long to wait before looking again after a pre-vote failed.
    fn retry(&self, rng: &mut impl Rng) -> Duration {
        self.heartbeat_interval.mul_f64(rng.random_range(1.0..3.0))
    }

    /// How long a candidate waits, from when its vote requests went out,
    /// before campaigning again (a split vote, or votes lost): the vote
    /// limit and [0, 0.3 T) more, random so that two candidates part. Timed
    /// from the sending, not from the decision to campaign: the candidate
    /// writes its vote to disk first, which took 0.7 s on a busy disk, and
    /// a retry timed from the decision gave up on answers still coming.
    fn campaign_retry(&self, rng: &mut impl Rng) -> Duration {
        self.vote_limit() + self.election_timeout.mul_f64(rng.random_range(0.0..0.3))
    }

    /// How long a candidate waits for its vote requests to go out (its
    /// own vote's fsync) before it campaigns again anyway.
    fn vote_send_limit(&self) -> Duration {
        self.election_timeout * 2
    }
}

/// What this node's own campaign is doing; read when a pre-vote request
/// arrives, so that two campaigns part (module docs).
#[derive(Debug)]
pub struct Campaign {
    state: std::sync::Mutex<Campaigning>,
    /// Pre-vote rounds this node started: each one a voter that heard no
    /// leader for T (a leader lost, or a link that drops its heartbeats).
    /// In the node's registry once [`Campaign::count_in`] put it there.
    pre_votes: prometheus::IntCounter,
    promise: std::sync::Mutex<Option<Promise>>,
    /// While an election was asked for and its vote requests have not gone
    /// out yet: how long to wait for answers once they do
    /// ([`Timing::campaign_retry`]).
    awaiting_send: std::sync::Mutex<Option<Duration>>,
}

/// A pre-vote this voter granted lately: until `until` it grants no other
/// candidate whose log is not better than `log`, so that two concurrent
/// campaigns do not both win pre-votes from the voters between them (in a
/// five-node cluster each could find a quorum) and then split the vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promise {
    pub to: NodeId,
    pub log: Option<LogId<NodeId>>,
    until: Instant,
}

/// A voter's own campaign, as [`grant_pre_vote`] weighs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Campaigning {
    /// Not campaigning.
    #[default]
    No,
    /// Its own pre-vote round is running.
    PreVoting,
    /// It won a pre-vote and its vote requests are out, until this time.
    Electing(Instant),
}

impl Default for Campaign {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::default(),
            pre_votes: prometheus::IntCounter::new(
                "edgelb_raft_pre_votes_total",
                "Pre-vote rounds this node started: each one a voter that heard no leader \
                 for election_timeout.",
            )
            .expect("a static metric definition is valid"),
            promise: std::sync::Mutex::default(),
            awaiting_send: std::sync::Mutex::default(),
        }
    }
}

impl Campaign {
    /// Exports the pre-vote count (`edgelb_raft_pre_votes_total`) in
    /// `registry`.
    ///
    /// # Panics
    /// Never: the series is registered once per node's registry (a second
    /// campaign on one registry would be a bug).
    pub fn count_in(&self, registry: &prometheus::Registry) {
        registry
            .register(Box::new(self.pre_votes.clone()))
            .expect("one campaign per registry");
    }

    fn set(&self, c: Campaigning) {
        *self.awaiting_send.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// An election was asked for: the vote requests go out once the vote
    /// is on disk; until then (at most `send_limit`) and for `wait` after,
    /// the candidate waits for answers.
    fn electing(&self, send_limit: Duration, wait: Duration) {
        self.set(Campaigning::Electing(Instant::now() + send_limit));
        *self.awaiting_send.lock().unwrap_or_else(|p| p.into_inner()) = Some(wait);
    }

    /// The network sent a vote request for this node's candidacy: the
    /// wait for answers counts from now (the first request of a round
    /// sets it).
    pub fn votes_sent(&self) {
        let Some(wait) = self
            .awaiting_send
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Campaigning::Electing(_) = *state {
            *state = Campaigning::Electing(Instant::now() + wait);
        }
    }

    /// When this node's election round is over (its retry time), if one
    /// was started, whether or not that time has passed.
    fn electing_until(&self) -> Option<Instant> {
        match *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            Campaigning::Electing(until) => Some(until),
            _ => None,
        }
    }

    /// The campaign now (an election whose time is up counts as none).
    pub fn now(&self) -> Campaigning {
        match *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            Campaigning::Electing(until) if Instant::now() >= until => Campaigning::No,
            c => c,
        }
    }

    /// Records a granted pre-vote, binding for `window`.
    fn promise(&self, to: NodeId, log: Option<LogId<NodeId>>, window: Duration) {
        *self.promise.lock().unwrap_or_else(|p| p.into_inner()) = Some(Promise {
            to,
            log,
            until: Instant::now() + window,
        });
    }

    /// Whether this node, `me`, granted another candidate's pre-vote while
    /// its own round ran (no promise binds when a round starts): it yields,
    /// and starts no election even if its round won.
    pub fn yielded(&self, me: NodeId) -> bool {
        self.promised().is_some_and(|p| p.to != me)
    }

    /// The pre-vote promise still binding, if any.
    pub fn promised(&self) -> Option<Promise> {
        self.promise
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|p| Instant::now() < p.until)
    }
}

/// What a voter knows when a pre-vote request arrives.
#[derive(Clone, Copy, Debug)]
pub struct VoterView {
    pub id: NodeId,
    pub campaign: Campaigning,
    /// A pre-vote granted lately to another candidate.
    pub promised: Option<Promise>,
    pub is_leader: bool,
    /// Whether this node knows a leader of its current term.
    pub leader_known: bool,
    /// How long ago it last heard that leader (or changed its vote).
    pub since_leader: Option<Duration>,
    pub last_log_id: Option<LogId<NodeId>>,
}

/// Whether a voter in `view` grants a pre-vote to `candidate` whose log
/// ends at `candidate_log`: the rule openraft applies to the real vote (so
/// that a granted pre-vote means the vote can be won), and a voter that
/// campaigns itself yields only to a better log or, while both are in a
/// pre-vote round, to a lower id.
pub fn grant_pre_vote(
    view: &VoterView,
    candidate: NodeId,
    candidate_log: Option<&LogId<NodeId>>,
    lease: Duration,
) -> bool {
    if view.is_leader {
        return false;
    }
    let lease_holds = view.leader_known && view.since_leader.is_some_and(|s| s <= lease);
    let own = view.last_log_id.as_ref();
    if lease_holds || candidate_log < own {
        return false;
    }
    let yields = match view.campaign {
        Campaigning::No => true,
        Campaigning::PreVoting => candidate_log > own || candidate < view.id,
        Campaigning::Electing(_) => candidate_log > own,
    };
    // A promise yields to a lower id with the same log, as a round does:
    // of any set of concurrent candidates the lowest can then gather every
    // grant (three rounds could otherwise each hold one voter another
    // needs), and the higher ones that granted it drop their own rounds
    // (`Campaign::yielded`).
    let bound = view.promised.is_some_and(|p| {
        let log = p.log.as_ref();
        p.to != candidate && (candidate_log < log || (candidate_log == log && candidate > p.to))
    });
    yields && !bound
}

/// Whether `granted` holds a majority of every config in `joint`.
pub fn quorum(joint: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !joint.is_empty()
        && joint
            .iter()
            .all(|c| c.intersection(granted).count() * 2 > c.len())
}

/// This node's answer to a pre-vote request from `from`.
pub async fn answer_pre_vote(
    raft: &Raft,
    log: &LogStore,
    campaign: &Campaign,
    from: NodeId,
    req: &PreVote,
    lease: Duration,
) -> bool {
    let Ok((view, _)) = voter_view(raft, log, campaign).await else {
        return false;
    };
    let granted = grant_pre_vote(&view, from, req.last_log_id.as_ref(), lease);
    if granted {
        // Long enough for the candidate to finish its round and send its
        // vote requests on the slowest link the timing is made for.
        campaign.promise(from, req.last_log_id, lease / 2);
    }
    debug!(granted, candidate = from, candidate_log = ?req.last_log_id, ?view, "pre-vote");
    granted
}

/// This node's view, and when it last heard a leader (or changed its
/// vote); `Err` when its Raft or log storage stopped.
async fn voter_view(
    raft: &Raft,
    log: &LogStore,
    campaign: &Campaign,
) -> Result<(VoterView, Option<Instant>), ()> {
    // openraft does not export its last log id with the term; the log
    // store has it.
    let last_log_id = log
        .clone()
        .get_log_state()
        .await
        .map_err(|_| ())?
        .last_log_id;
    let promised = campaign.promised();
    let campaign = campaign.now();
    let id = raft.metrics().borrow().id;
    raft.with_raft_state(move |st| {
        let heard = st.vote_last_modified();
        let view = VoterView {
            id,
            campaign,
            promised,
            is_leader: st.server_state == ServerState::Leader,
            leader_known: st.vote_ref().is_committed(),
            since_leader: heard.map(|t| Instant::now().saturating_duration_since(t)),
            last_log_id,
        };
        (view, heard)
    })
    .await
    .map_err(|_| ())
}

/// Drives heartbeats (as leader) and elections (as a voter) until Raft
/// stops; the cluster keeps `max_voters` voters (learners beyond them
/// hear heartbeats less often, see [`heartbeat`]).
pub async fn run(
    raft: Raft,
    log: LogStore,
    transport: Arc<Transport>,
    campaign: Arc<Campaign>,
    (timing, max_voters): (Timing, usize),
) {
    let started = Instant::now();
    let tick = (timing.heartbeat_interval / 2).max(Duration::from_millis(10));
    // A voter looks at its voters' connections this often between
    // deadlines (a restarted peer's was replaced by the peer itself).
    let warm_every = timing.election_timeout / 2;
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_rng(&mut rand::rng());
    let mut next_heartbeat = Instant::now();
    // The silence being timed, and when it ends in an election attempt.
    let mut silence: Option<(Option<Instant>, Instant)> = None;
    // Changes of role, vote or membership wake the task early.
    let mut server = raft.server_metrics();
    let mut wake = Instant::now() + tick;
    let mut heartbeats = heartbeat::Heartbeats::default();
    let mut announced = false;
    loop {
        // An idle node wakes at its deadlines only: a follower about
        // twice per T, a leader at its heartbeats.
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            changed = server.changed() => if changed.is_err() {
                return;
            },
        }
        let now = Instant::now();
        wake = now + tick;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == m.id);
        let other_voters: BTreeSet<NodeId> =
            membership.voter_ids().filter(|v| *v != m.id).collect();
        // A voter keeps its connections to the other voters open (votes
        // must not wait for a handshake); nothing else is kept.
        transport.keep_open(if voter {
            other_voters.clone()
        } else {
            BTreeSet::new()
        });
        if !announced && membership.learner_ids().any(|l| l == m.id) {
            // A learner that (re)starts connects to the leader until it hears
            // from it, so that the leader, which stops heartbeating a learner
            // that holds the whole log and its commit index, sees it back
            // and tells it the commit index again (this process may have
            // lost it). The first attempt may fail (the leader unreachable
            // for a moment): it tries again at its next look.
            let heard = raft
                .with_raft_state(|st| st.vote_last_modified())
                .await
                .ok()
                .flatten();
            if heard.is_some_and(|t| t > started) {
                announced = true;
            } else {
                match m.current_leader.filter(|l| *l != m.id) {
                    Some(leader) => warm(&transport, membership, [leader]),
                    None => warm(&transport, membership, other_voters.iter().copied()),
                }
            }
        }
        if m.state == ServerState::Leader {
            silence = None;
            if now >= next_heartbeat {
                next_heartbeat = heartbeats.send(&raft, &transport, &m, (timing, max_voters), now);
            }
            wake = next_heartbeat;
            continue;
        }
        if !voter {
            silence = None;
            wake = now + warm_every;
            continue;
        }
        warm(&transport, membership, other_voters);
        if membership.voter_ids().count() == 1 {
            // The only voter needs nobody's leave.
            if m.state != ServerState::Candidate && raft.trigger().elect().await.is_err() {
                return;
            }
            continue;
        }
        // A candidate waits for its round's answers; the round's end moves
        // when its vote requests go out, so it looks again soon.
        let round_end = if m.state == ServerState::Candidate {
            campaign.electing_until()
        } else {
            None
        };
        if let Some(end) = round_end
            && now < end
        {
            wake = end.min(now + tick);
            continue;
        }
        // Before the deadline timed from the silence last seen, nothing is
        // due: had a leader been heard since, the deadline would be later.
        if let Some((_, d)) = silence
            && round_end.is_none()
            && now < d
        {
            wake = d.min(now + warm_every);
            continue;
        }
        let Ok((view, heard)) = voter_view(&raft, &log, &campaign).await else {
            return;
        };
        let now = Instant::now();
        let deadline = match silence {
            // Campaigning: retry once the round's answers are overdue (a
            // split vote, or votes lost) rather than after another
            // election timeout.
            Some((_, d)) if m.state == ServerState::Candidate => round_end.unwrap_or(d),
            Some((h, d)) if h == heard => d,
            _ => {
                let d = timing.deadline(heard.unwrap_or(started), &mut rng);
                silence = Some((heard, d));
                d
            }
        };
        if now < deadline {
            wake = deadline.min(now + warm_every);
            continue;
        }
        if campaign.promised().is_some() {
            // This voter backs another candidate's round just now; its own
            // would compete with it.
            let retry = Instant::now() + timing.retry(&mut rng);
            silence = Some((heard, retry));
            wake = retry;
            continue;
        }
        campaign.set(Campaigning::PreVoting);
        campaign.pre_votes.inc();
        let won = pre_vote(&transport, membership, m.id, &view, timing).await;
        // A leader may have been elected while the round ran (this node
        // then heard it, or voted for it): campaigning now would depose it.
        let unchanged = raft.metrics().borrow().vote == m.vote;
        let retry = if won && unchanged && !campaign.yielded(m.id) {
            campaign.electing(timing.vote_send_limit(), timing.campaign_retry(&mut rng));
            info!(term = m.current_term, "pre-vote won; starting an election");
            if raft.trigger().elect().await.is_err() {
                return;
            }
            // As a candidate, the round's own end (in the campaign) is
            // what counts; this only bounds the wait should the candidacy
            // never show.
            timing.vote_send_limit()
        } else {
            campaign.set(Campaigning::No);
            timing.retry(&mut rng)
        };
        // Until the next look the vote may change (our own candidacy);
        // the retry time stands for that.
        let (_, heard) = voter_view(&raft, &log, &campaign)
            .await
            .unwrap_or((view, heard));
        silence = Some((heard, Instant::now() + retry));
        wake = Instant::now() + retry.min(tick);
    }
}

/// Asks every other voter for a pre-vote; true when a quorum of every
/// config (this node included) grants it.
/// Opens this node's connections to `ids` (members of `membership`) if
/// they are not open.
fn warm(
    transport: &Transport,
    membership: &openraft::Membership<NodeId, ClusterNode>,
    ids: impl IntoIterator<Item = NodeId>,
) {
    for id in ids {
        if let Some(node) = membership.get_node(&id) {
            transport.warm(id, &node.cluster_addr);
        }
    }
}

async fn pre_vote(
    transport: &Arc<Transport>,
    membership: &openraft::Membership<NodeId, ClusterNode>,
    me: NodeId,
    view: &VoterView,
    timing: Timing,
) -> bool {
    let req = PreVote {
        last_log_id: view.last_log_id,
    };
    let voters: Vec<(NodeId, String)> = membership
        .voter_ids()
        .filter(|id| *id != me)
        .filter_map(|id| {
            membership
                .get_node(&id)
                .map(|n| (id, n.cluster_addr.clone()))
        })
        .collect();
    let limit = timing.rpc_limit();
    let mut asks = tokio::task::JoinSet::new();
    for (id, addr) in voters {
        let req = req.clone();
        let transport = Arc::clone(transport);
        // The whole limit: the round ends at its first quorum, so a dead
        // voter's wait delays nothing, while a slow one's timeout would
        // cost a round.
        asks.spawn(async move {
            match transport.call(id, &addr, Rpc::PreVote(req), limit).await {
                Ok(RpcReply::PreVote(granted)) => granted.then_some(id),
                Ok(_) | Err(_) => None,
            }
        });
    }
    let joint = membership.get_joint_config();
    let mut granted = BTreeSet::from([me]);
    // Done at the first quorum: a dead voter's answer is not waited for.
    while !quorum(joint, &granted)
        && let Some(answer) = asks.join_next().await
    {
        granted.extend(answer.ok().flatten());
    }
    let won = quorum(joint, &granted);
    debug!(?granted, won, "pre-vote round");
    won
}

impl crate::cluster::VoteSink for Campaign {
    fn votes_sent(&self) {
        Self::votes_sent(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn view(leader_known: bool, since_ms: Option<u64>, last: Option<LogId<NodeId>>) -> VoterView {
        VoterView {
            id: 1,
            campaign: Campaigning::No,
            promised: None,
            is_leader: false,
            leader_known,
            since_leader: since_ms.map(Duration::from_millis),
            last_log_id: last,
        }
    }

    const LEASE: Duration = Duration::from_secs(1);

    #[test]
    fn a_voter_that_hears_its_leader_refuses() {
        let v = view(true, Some(200), log(2, 10));
        assert!(!grant_pre_vote(&v, 2, log(2, 10).as_ref(), LEASE));
        assert!(!grant_pre_vote(&v, 2, log(3, 50).as_ref(), LEASE));
    }

    #[test]
    fn a_voter_whose_leader_went_silent_grants_an_up_to_date_candidate() {
        let v = view(true, Some(1200), log(2, 10));
        assert!(grant_pre_vote(&v, 2, log(2, 10).as_ref(), LEASE));
        assert!(grant_pre_vote(&v, 2, log(3, 1).as_ref(), LEASE));
        // A candidate whose log is behind never gets it.
        assert!(!grant_pre_vote(&v, 2, log(2, 9).as_ref(), LEASE));
        assert!(!grant_pre_vote(&v, 2, log(1, 99).as_ref(), LEASE));
        assert!(!grant_pre_vote(&v, 2, None, LEASE));
    }

    #[test]
    fn without_a_known_leader_only_the_log_counts() {
        let v = view(false, Some(10), log(2, 10));
        assert!(grant_pre_vote(&v, 2, log(2, 10).as_ref(), LEASE));
        let fresh = view(false, None, None);
        assert!(grant_pre_vote(&fresh, 2, None, LEASE));
    }

    #[test]
    fn of_two_concurrent_pre_vote_rounds_with_equal_logs_exactly_one_wins() {
        // Voters 1 and 2 lost their leader together and both ask.
        let mut one = view(true, Some(1200), log(2, 10));
        one.campaign = Campaigning::PreVoting;
        let mut two = one;
        two.id = 2;
        assert!(!grant_pre_vote(&one, 2, log(2, 10).as_ref(), LEASE));
        assert!(grant_pre_vote(&two, 1, log(2, 10).as_ref(), LEASE));
        // A better log is granted whatever the ids.
        assert!(grant_pre_vote(&one, 2, log(2, 11).as_ref(), LEASE));
        assert!(!grant_pre_vote(&two, 1, log(2, 9).as_ref(), LEASE));
    }

    #[test]
    fn a_voter_whose_vote_requests_are_out_yields_only_to_a_better_log() {
        let until = Instant::now() + Duration::from_millis(400);
        let mut v = view(false, Some(10), log(2, 10));
        v.id = 3;
        v.campaign = Campaigning::Electing(until);
        assert!(!grant_pre_vote(&v, 1, log(2, 10).as_ref(), LEASE));
        assert!(!grant_pre_vote(&v, 5, log(2, 10).as_ref(), LEASE));
        assert!(grant_pre_vote(&v, 5, log(3, 1).as_ref(), LEASE));
    }

    #[test]
    fn a_voter_that_granted_one_candidate_refuses_another_for_a_while() {
        // Five voters, one dead: 1 and 2 ask 3 at the same time. Had 3
        // granted both, each could reach a quorum of pre-votes and the
        // real vote would split.
        let c = Campaign::default();
        c.promise(1, log(2, 10), Duration::from_secs(60));
        let mut v = view(false, Some(10), log(2, 10));
        v.id = 3;
        v.promised = c.promised();
        assert!(!grant_pre_vote(&v, 2, log(2, 10).as_ref(), LEASE));
        assert!(
            grant_pre_vote(&v, 1, log(2, 10).as_ref(), LEASE),
            "the same again"
        );
        assert!(
            grant_pre_vote(&v, 2, log(2, 11).as_ref(), LEASE),
            "a better log"
        );
        c.promise(1, log(2, 10), Duration::ZERO);
        assert_eq!(c.promised(), None, "the promise lapsed");
    }

    #[test]
    fn of_three_concurrent_rounds_the_lowest_id_gathers_every_grant() {
        // Five voters, two cut off; 1, 3 and 4 ask at once. 4 granted 3
        // first (3 is lower); 3 and 4 are in rounds of their own.
        let c4 = Campaign::default();
        c4.promise(3, log(2, 10), Duration::from_secs(60));
        let mut four = view(false, Some(10), log(2, 10));
        four.id = 4;
        four.campaign = Campaigning::PreVoting;
        four.promised = c4.promised();
        let mut three = four;
        three.id = 3;
        three.promised = None;
        let mut one = three;
        one.id = 1;
        assert!(grant_pre_vote(&four, 1, log(2, 10).as_ref(), LEASE));
        assert!(grant_pre_vote(&three, 1, log(2, 10).as_ref(), LEASE));
        assert!(!grant_pre_vote(&one, 3, log(2, 10).as_ref(), LEASE));
        // A lower id with a shorter log does not break the promise.
        assert!(!grant_pre_vote(&four, 1, log(2, 9).as_ref(), LEASE));
    }

    #[test]
    fn a_voter_that_granted_during_its_own_round_yields() {
        let c = Campaign::default();
        assert!(!c.yielded(3));
        c.promise(1, log(2, 10), Duration::from_secs(60));
        assert!(c.yielded(3));
        assert!(!c.yielded(1));
    }

    #[test]
    fn a_campaign_ends_with_its_round_or_its_retry_time() {
        let c = Campaign::default();
        assert_eq!(c.now(), Campaigning::No);
        c.set(Campaigning::PreVoting);
        assert_eq!(c.now(), Campaigning::PreVoting);
        let until = Instant::now() + Duration::from_secs(60);
        c.set(Campaigning::Electing(until));
        assert_eq!(c.now(), Campaigning::Electing(until));
        c.set(Campaigning::Electing(Instant::now()));
        assert_eq!(c.now(), Campaigning::No, "the retry time is up");
    }

    #[test]
    fn a_candidates_wait_for_answers_counts_from_when_its_requests_went_out() {
        let c = Campaign::default();
        let wait = Duration::from_secs(60);
        c.electing(Duration::from_secs(1), wait);
        let before = c.electing_until().unwrap();
        assert!(before <= Instant::now() + Duration::from_secs(1));
        // Its vote was on disk late: the wait starts at the first request.
        c.votes_sent();
        let after = c.electing_until().unwrap();
        assert!(after >= Instant::now() + wait - Duration::from_secs(1));
        // The other requests of the round do not move it again.
        c.votes_sent();
        assert_eq!(c.electing_until(), Some(after));
        // Outside an election (a round lost since), nothing moves.
        c.set(Campaigning::No);
        c.votes_sent();
        assert_eq!(c.electing_until(), None);
        let t = Timing::default();
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(7);
        for _ in 0..100 {
            let r = t.campaign_retry(&mut rng);
            assert!(r >= t.vote_limit() && r < t.vote_limit() + t.election_timeout * 3 / 10);
        }
    }

    #[test]
    fn a_leader_never_grants() {
        let mut v = view(true, Some(5000), log(2, 10));
        v.is_leader = true;
        assert!(!grant_pre_vote(&v, 2, log(9, 99).as_ref(), LEASE));
    }

    #[test]
    fn quorum_needs_a_majority_of_every_config() {
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<_>>();
        let one = vec![set(&[1, 2, 3])];
        assert!(quorum(&one, &set(&[1, 3])));
        assert!(!quorum(&one, &set(&[2])));
        let joint = vec![set(&[1]), set(&[1, 2, 3])];
        assert!(quorum(&joint, &set(&[1, 2])));
        assert!(
            !quorum(&joint, &set(&[2, 3])),
            "the old config {{1}} is not granted"
        );
        assert!(!quorum(&[], &set(&[1])));
    }

    #[test]
    fn timing_keeps_openraft_valid_and_the_rpc_limit_fits_a_wan_round_trip() {
        let t = Timing::default();
        let c = t.openraft().validate().unwrap();
        assert!(!c.enable_heartbeat && !c.enable_elect);
        assert_eq!(c.election_timeout_max, 1000, "the lease is T");
        assert_eq!(t.rpc_limit(), Duration::from_millis(750));
        assert!(t.rpc_limit() > Duration::from_millis(300) * 2);
        // openraft's vote limit is its election_timeout_min: just under
        // the lease.
        assert_eq!(c.election_timeout_min, 999);
        assert_eq!(t.vote_limit(), Duration::from_millis(999));
        for ms in [4, 10, 300, 3000] {
            let short = Timing {
                heartbeat_interval: Duration::from_millis(1),
                election_timeout: Duration::from_millis(ms),
            };
            let c = short.openraft().validate().unwrap();
            assert!(c.election_timeout_min > c.heartbeat_interval);
            assert!(c.election_timeout_min < c.election_timeout_max);
        }
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(7);
        let now = Instant::now();
        for _ in 0..100 {
            let d = t.deadline(now, &mut rng) - now;
            assert!(d >= t.election_timeout && d < t.election_timeout * 11 / 10);
        }
    }
}
