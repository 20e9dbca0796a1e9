//! The load table: the newest report of every peer, and the merge rules.
//!
//! - A report replaces the peer's previous one when its `(incarnation, seq)`
//!   is greater; reports carry absolute counts, so the newest one is all
//!   there is to know and a newer incarnation (a restarted peer) replaces the
//!   old counts entirely. An older or equal one is ignored and counted as
//!   stale (reordered or duplicated in transit).
//! - A report is dated by its age at the sender ([`Arrival`]): its receive
//!   time less the one-way delay, since time in transit counts (SPEC §5;
//!   across regions it is tens of milliseconds).
//! - A report is used while it is at most `ttl` old by that dating; after that the peer counts for nothing until it reports
//!   again, so a dead node's load fades out. An expired report no longer
//!   guards its `(incarnation, seq)`: the peer's next report replaces it
//!   whatever its version, so a peer that restarts with a lower incarnation
//!   (its clock stepped back) is heard again after one `ttl`, not never.
//! - A removed peer is forgotten, with its sequence numbers.
//!
//! No clock and no I/O: every query takes `now`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{Entry, Report};

/// When and how a report arrived: what dates it.
///
/// A report's counts were true when the sender sampled them, which is one
/// transit earlier than its receipt. The receiver takes the transit as half
/// the round-trip time that the transport measures on the peer's
/// connection (QUIC keeps a smoothed RTT, refreshed by its keep-alives even
/// on a one-way gossip connection), or as what the two wall clocks say,
/// when that is longer ([`Arrival::with_sender_clock`]).
///
/// RTT/2 alone misses every delay that is not on the path of the
/// keep-alives: a report waiting for the sender's or the receiver's CPU, a
/// queue in front of a busy link, the smoothing of an RTT that moved. Six
/// nodes on one loaded 2-core machine behind the link emulator (20 / 50 /
/// 80 ms one way between regions) received reports 20–95 ms older than
/// RTT/2 said, and counts taken for fresher than they are herd. The wall clocks see
/// those delays, but they are only as good as their agreement: a sender
/// clock that is ahead makes the transit look short (RTT/2 stays the floor),
/// one that is behind makes its reports look old (capped, so a peer with a
/// bad clock is discounted towards the steady state of its load, never
/// dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// When the report was received.
    pub received: Instant,
    /// Estimated one-way delay from the sender.
    pub one_way: Duration,
}

impl Arrival {
    /// A report received at `received` on a connection with round-trip
    /// time `rtt`: one way is half of it.
    pub fn with_rtt(received: Instant, rtt: Duration) -> Self {
        Self {
            received,
            one_way: rtt / 2,
        }
    }

    /// This arrival, with the transit that the wall clocks give when it is
    /// longer than the estimate so far: the report was stamped `sent_at_ms`
    /// by the sender's wall clock and received at `received_ms` by this
    /// node's (both in ms since the Unix epoch). The clocks add at most
    /// `cap` to the estimate. A stamp of 0 (none) changes nothing.
    pub fn with_sender_clock(self, sent_at_ms: u64, received_ms: u64, cap: Duration) -> Self {
        if sent_at_ms == 0 {
            return self;
        }
        let transit = Duration::from_millis(received_ms.saturating_sub(sent_at_ms));
        Self {
            received: self.received,
            one_way: self.one_way.max(transit.min(self.one_way + cap)),
        }
    }

    /// When the report's counts were true: receipt less the one-way delay.
    pub fn as_of(self) -> Instant {
        self.received
            .checked_sub(self.one_way)
            .unwrap_or(self.received)
    }
}

/// A report taken to be as old as `at` (no transit).
impl From<Instant> for Arrival {
    fn from(at: Instant) -> Self {
        Self {
            received: at,
            one_way: Duration::ZERO,
        }
    }
}

/// Newest report per peer. A clone shares the reports (one `Arc` clone
/// per peer): a copy to read at leisure, outside the lock that guards the
/// table.
#[derive(Clone, Debug)]
pub struct LoadTable {
    ttl: Duration,
    peers: BTreeMap<u64, Arc<PeerReport>>,
    counters: Counters,
    /// Version of the last accepted report.
    version: u64,
}

/// What [`LoadTable::insert`] did with a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// The report is now the peer's newest.
    Accepted,
    /// The table already has a report at least as new; this one was dropped.
    Stale,
}

/// Reports merged into a [`LoadTable`] since it was created (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reports that became their peer's newest.
    pub accepted: u64,
    /// Reports dropped as older than or equal to the newest one.
    pub stale: u64,
}

/// One peer's newest report, indexed by instance. Shared with
/// [`LoadTable::snapshot`], so the refresh reads it without the table.
#[derive(Debug)]
pub struct PeerReport {
    incarnation: u64,
    seq: u64,
    /// Distinct for every report a table accepts (caches key on it).
    pub(crate) version: u64,
    /// When the counts were true, as far as the receiver knows.
    pub(crate) as_of: Instant,
    /// Strictly increasing by instance.
    pub(crate) entries: Vec<Entry>,
}

impl PeerReport {
    /// When its counts were true, as far as the receiver knows.
    pub fn as_of(&self) -> Instant {
        self.as_of
    }

    /// The entry of `instance`, if the peer reported one. O(log n).
    pub(crate) fn get(&self, instance: &[u8; 16]) -> Option<&Entry> {
        let i = self
            .entries
            .binary_search_by(|e| e.instance.cmp(instance))
            .ok()?;
        self.entries.get(i)
    }
}

impl LoadTable {
    /// An empty table that uses reports for `ttl` after they arrive.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            peers: BTreeMap::new(),
            counters: Counters::default(),
            version: 0,
        }
    }

    /// The incarnation of `peer`'s newest report, if one is kept.
    pub fn incarnation(&self, peer: u64) -> Option<u64> {
        self.peers.get(&peer).map(|p| p.incarnation)
    }

    /// Merges `report`, dated by its [`Arrival`] (an `Instant` dates it
    /// at that instant).
    pub fn insert(&mut self, report: Report, arrival: impl Into<Arrival>) -> Merge {
        let as_of = arrival.into().as_of();
        let version = (report.incarnation, report.seq);
        if let Some(old) = self.peers.get(&report.node_id)
            && (old.incarnation, old.seq) >= version
            && as_of.saturating_duration_since(old.as_of) <= self.ttl
        {
            self.counters.stale += 1;
            return Merge::Stale;
        }
        // The codec guarantees strictly increasing instances; a report built
        // in memory is put in order, the last of duplicates winning.
        let mut entries = report.entries;
        if !entries.is_sorted_by(|a, b| a.instance < b.instance) {
            entries.reverse();
            entries.sort_by_key(|e| e.instance);
            entries.dedup_by_key(|e| e.instance);
        }
        self.version += 1;
        self.peers.insert(
            report.node_id,
            Arc::new(PeerReport {
                incarnation: report.incarnation,
                seq: report.seq,
                version: self.version,
                as_of,
                entries,
            }),
        );
        self.counters.accepted += 1;
        Merge::Accepted
    }

    /// Forgets `node_id` (removed from the cluster).
    pub fn remove_peer(&mut self, node_id: u64) {
        self.peers.remove(&node_id);
    }

    /// Keeps only the peers for which `keep` is true (membership changed).
    pub fn retain_peers(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.peers.retain(|&id, _| keep(id));
    }

    /// Sum of the in-flight counts that fresh peers report for `instance`,
    /// as they are (no estimate of what changed since).
    pub fn reported(&self, instance: &[u8; 16], now: Instant) -> u64 {
        self.fresh(now)
            .filter_map(|(_, p)| p.get(instance))
            .map(|e| u64::from(e.inflight))
            .sum()
    }

    /// In-flight counts of `instance` per fresh peer, as reported; peers that
    /// report nothing for it are left out.
    pub fn peers(&self, instance: &[u8; 16], now: Instant) -> BTreeMap<u64, u64> {
        self.fresh(now)
            .filter_map(|(id, p)| Some((id, u64::from(p.get(instance)?.inflight))))
            .collect()
    }

    /// Age of the newest report of `peer`, fresh or not; `None` when the peer
    /// has never reported (or was removed).
    pub fn last_report_age(&self, peer: u64, now: Instant) -> Option<Duration> {
        let p = self.peers.get(&peer)?;
        Some(now.saturating_duration_since(p.as_of))
    }

    /// Every known peer with the age of its newest report.
    pub fn report_ages(&self, now: Instant) -> impl Iterator<Item = (u64, Duration)> + '_ {
        self.peers
            .iter()
            .map(move |(&id, p)| (id, now.saturating_duration_since(p.as_of)))
    }

    /// How many instances `peer`'s newest report lists (fresh or not);
    /// `None` when none is kept.
    pub fn entry_count(&self, peer: u64) -> Option<usize> {
        self.peers.get(&peer).map(|p| p.entries.len())
    }

    /// Whether a fresh peer reports anything at `now`: only then can the
    /// peers' part of any load differ from 0 (or change as reports age).
    pub fn fresh_load(&self, now: Instant) -> bool {
        self.fresh(now).any(|(_, p)| !p.entries.is_empty())
    }

    /// How many peers have a report at most `ttl` old at `now`.
    pub fn fresh_peers(&self, now: Instant) -> usize {
        self.fresh(now).count()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Every kept report, fresh or not, by peer: O(peers), and the
    /// reports are shared, not copied, so the refresh holds the table's
    /// lock only for this and estimates without it.
    pub fn snapshot(&self) -> Vec<(u64, Arc<PeerReport>)> {
        self.peers
            .iter()
            .map(|(&id, p)| (id, Arc::clone(p)))
            .collect()
    }

    /// Peers whose newest report is at most `ttl` old at `now`.
    pub(crate) fn fresh(&self, now: Instant) -> impl Iterator<Item = (u64, &PeerReport)> {
        self.peers
            .iter()
            .filter(move |(_, p)| now.saturating_duration_since(p.as_of) <= self.ttl)
            .map(|(&id, p)| (id, p.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: [u8; 16] = [1; 16];
    const B: [u8; 16] = [2; 16];

    fn report(node_id: u64, incarnation: u64, seq: u64, counts: &[([u8; 16], u32)]) -> Report {
        Report {
            node_id,
            incarnation,
            seq,
            sent_at_ms: 0,
            entries: counts
                .iter()
                .map(|&(instance, inflight)| Entry {
                    instance,
                    inflight,
                    ..Entry::default()
                })
                .collect(),
        }
    }

    #[test]
    fn newest_report_per_peer_wins() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        assert_eq!(
            table.insert(report(1, 1, 5, &[(A, 3)]), t0),
            Merge::Accepted
        );
        assert_eq!(
            table.insert(report(2, 1, 1, &[(A, 4), (B, 1)]), t0),
            Merge::Accepted
        );
        assert_eq!(table.reported(&A, t0), 7);
        assert_eq!(table.reported(&B, t0), 1);
        // Older and equal sequence numbers are dropped.
        assert_eq!(table.insert(report(1, 1, 4, &[(A, 100)]), t0), Merge::Stale);
        assert_eq!(table.insert(report(1, 1, 5, &[(A, 100)]), t0), Merge::Stale);
        assert_eq!(table.reported(&A, t0), 7);
        // Absolute counts: a newer report replaces, instances it omits are 0.
        assert_eq!(
            table.insert(report(2, 1, 2, &[(A, 1)]), t0),
            Merge::Accepted
        );
        assert_eq!(table.reported(&B, t0), 0);
        assert_eq!(table.peers(&A, t0), BTreeMap::from([(1, 3), (2, 1)]));
        assert_eq!(table.peers(&B, t0), BTreeMap::new());
        assert_eq!(
            table.counters(),
            Counters {
                accepted: 3,
                stale: 2
            }
        );
    }

    #[test]
    fn new_incarnation_replaces_whatever_its_seq() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        table.insert(report(1, 1, 900, &[(A, 3), (B, 2)]), t0);
        assert_eq!(
            table.insert(report(1, 2, 1, &[(B, 1)]), t0),
            Merge::Accepted
        );
        assert_eq!(table.reported(&A, t0), 0);
        assert_eq!(table.reported(&B, t0), 1);
        // The old incarnation is gone for good.
        assert_eq!(table.insert(report(1, 1, 901, &[(A, 3)]), t0), Merge::Stale);
    }

    #[test]
    fn an_expired_report_does_not_guard_its_version() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut table = LoadTable::new(ttl);
        table.insert(report(1, 500, 9, &[(A, 3)]), t0);
        // Within the TTL a lower incarnation is stale.
        assert_eq!(
            table.insert(report(1, 400, 1, &[(A, 1)]), t0 + ttl),
            Merge::Stale
        );
        // After it, it is heard (the peer restarted with its clock behind).
        let later = t0 + ttl + Duration::from_millis(1);
        assert_eq!(
            table.insert(report(1, 400, 1, &[(A, 1)]), later),
            Merge::Accepted
        );
        assert_eq!(table.reported(&A, later), 1);
    }

    #[test]
    fn reports_expire_after_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut table = LoadTable::new(ttl);
        table.insert(report(1, 1, 1, &[(A, 3)]), t0);
        table.insert(report(2, 1, 1, &[(A, 4)]), t0 + Duration::from_millis(500));
        assert_eq!(table.reported(&A, t0 + ttl), 7);
        let later = t0 + ttl + Duration::from_millis(1);
        assert_eq!(table.reported(&A, later), 4);
        assert_eq!(table.peers(&A, later), BTreeMap::from([(2, 4)]));
        // Ages are still known for the API and metrics.
        assert_eq!(
            table.last_report_age(1, later),
            Some(ttl + Duration::from_millis(1))
        );
        assert_eq!(table.last_report_age(3, later), None);
        // A report from the past (clock skew in the caller) counts as age 0.
        assert_eq!(table.last_report_age(2, t0), Some(Duration::ZERO));
    }

    #[test]
    fn time_in_transit_counts() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut table = LoadTable::new(ttl);
        // Sampled at t0, received 50 ms later on a 100 ms round trip.
        let arrival = Arrival::with_rtt(t0 + Duration::from_millis(50), Duration::from_millis(100));
        assert_eq!(arrival.as_of(), t0);
        table.insert(report(1, 1, 1, &[(A, 3)]), arrival);
        let received = t0 + Duration::from_millis(50);
        assert_eq!(
            table.last_report_age(1, received),
            Some(Duration::from_millis(50))
        );
        // It expires a transit earlier than a report dated at receipt.
        table.insert(report(2, 1, 1, &[(A, 4)]), received);
        let at = received + ttl - Duration::from_millis(10);
        assert_eq!(table.reported(&A, at), 4);
        assert_eq!(table.fresh_peers(at), 1);
    }

    #[test]
    fn the_wall_clocks_lengthen_the_transit_within_a_cap() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let cap = ms(500);
        // RTT/2 says 10 ms; the report waited 70 ms in all.
        let rtt = Arrival::with_rtt(t0 + ms(100), ms(20));
        let clocks = rtt.with_sender_clock(1_000, 1_070, cap);
        assert_eq!(clocks.one_way, ms(70));
        assert_eq!(clocks.as_of(), t0 + ms(30));
        // A sender clock ahead of ours: RTT/2 stays the floor.
        assert_eq!(rtt.with_sender_clock(1_100, 1_070, cap), rtt);
        // One far behind: at most `cap` more than RTT/2.
        assert_eq!(rtt.with_sender_clock(1_000, 90_000, cap).one_way, ms(510));
        // No stamp: nothing to go by.
        assert_eq!(rtt.with_sender_clock(0, 1_070, cap), rtt);
    }

    #[test]
    fn removed_peer_is_forgotten() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        table.insert(report(1, 1, 7, &[(A, 3)]), t0);
        table.insert(report(2, 1, 7, &[(A, 1)]), t0);
        table.remove_peer(1);
        assert_eq!(table.reported(&A, t0), 1);
        assert_eq!(table.last_report_age(1, t0), None);
        // Sequence numbers are forgotten too: a re-added peer starts over.
        assert_eq!(
            table.insert(report(1, 1, 1, &[(A, 2)]), t0),
            Merge::Accepted
        );
        table.retain_peers(|id| id != 2);
        assert_eq!(
            table.report_ages(t0).map(|(id, _)| id).collect::<Vec<_>>(),
            [1]
        );
    }

    proptest! {
        /// Whatever order reports arrive in, the table holds the newest one
        /// of each peer, and every other one was counted as stale.
        #[test]
        fn order_does_not_matter(
            reports in prop::collection::vec((0u64..3, 0u64..3, 0u64..20, 0u32..50), 1..40),
        ) {
            let t0 = Instant::now();
            let mut table = LoadTable::new(Duration::from_secs(1));
            for &(node, inc, seq, n) in &reports {
                table.insert(report(node, inc, seq, &[(A, n)]), t0);
            }
            let mut newest: BTreeMap<u64, (u64, u64, u32)> = BTreeMap::new();
            for &(node, inc, seq, n) in &reports {
                let e = newest.entry(node).or_insert((inc, seq, n));
                if (inc, seq) > (e.0, e.1) {
                    *e = (inc, seq, n);
                }
            }
            let expect: BTreeMap<u64, u64> =
                newest.iter().map(|(&id, &(_, _, n))| (id, u64::from(n))).collect();
            prop_assert_eq!(table.peers(&A, t0), expect);
            let c = table.counters();
            prop_assert_eq!(c.accepted + c.stale, reports.len() as u64);
        }
    }
}
