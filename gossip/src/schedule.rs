//! When a node sends its report and when it recomputes its peers' loads:
//! the timers of the gossip tasks as plain state machines, driven with
//! `now` and a seeded RNG, so that the node's tasks and the simulator run
//! the same schedule.
//!
//! Sending (SPEC §5):
//!
//! ```text
//!  counts change ──▶ coalesced(now): no earlier than last + min_interval·(1…1+J)
//!  nothing changes ─▶ heartbeat(): last + interval·(1±J),
//!                     but after a delta no later than last_full + interval
//!  a report with short work in flight ─▶ look again within LONG_FLOOR·(1±J)
//!  an empty report (idle node) ─▶ the next multiple of idle_interval on the
//!                     wall clock (not jittered); after two empty ones in
//!                     a row, the next multiple of quiet_interval; with at
//!                     most FEW_TARGETS peers, of interval
//!  full_due(now): the report built now must be full, not a delta:
//!                     now ≥ last_full + interval − min_interval·(1 + J),
//!                     or none sent yet
//! ```
//!
//! A report may be a delta (only the instances whose entries changed)
//! provided a full report follows at least every `interval` (SPEC §5): the
//! heartbeat is capped at `last_full + interval` while the node has
//! anything to report.
//!
//! **An idle node in a large fleet is quiet.** A node that reports to at
//! most [`FEW_TARGETS`] peers heartbeats every `interval` whatever it
//! reports, as SPEC §5 says (an empty report on the wall clock's multiples
//! of `interval`, for the reasons below). Beyond that, an idle node's
//! report is empty, which is also what an expired report counts as, so
//! repeating it every `interval` tells its peers nothing. It is repeated every [`SendSchedule::idle_interval`] (a
//! third of the TTL, at least `interval`) so that peers still see the node
//! as fresh (admin views, report-age metrics) and one lost heartbeat does
//! not let it expire; and at multiples of that period on the wall clock
//! rather than jittered, so that a node hears all its idle peers in one
//! burst and wakes once for them (and once for the acknowledgements)
//! instead of once per peer. Idle reports carry no load: aligning them
//! cannot herd. Once it has sent two empty reports in a row (the second
//! repairs a lost first, which would leave its last load counted until it
//! expires), it repeats them only every [`SendSchedule::quiet_interval`]
//! (the TTL): they then only say that the node is there, and a receiver
//! counts a peer whose last report was empty as present for
//! [`quiet_alive`] (three of those periods) rather than the TTL. The first
//! report that lists anything goes out as soon as `min_interval` allows.
//!
//! The re-check exists because short work in flight becomes long-lived
//! (counted by peers without decay) within [`LONG_FLOOR`] of crossing its
//! threshold, which is no count change: without it a slow request would
//! fade from the peers' estimates for a whole heartbeat (SPEC §3 (c)).
//!
//! Refreshing: right after a report is merged and every [`REFRESH`] while
//! any peer is fresh, but never sooner than a gap after the previous one
//! ends: at least [`MIN_GAP`], and long enough that refreshing takes at
//! most 1/[`MAX_SHARE`] of a core when reports arrive faster than refreshes
//! complete.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::Config;
use crate::codec::Report;
use crate::tracker::LONG_FLOOR;

/// Report timers are drawn from `interval × (1 ± JITTER)`: aligned timers
/// across nodes are the worst case for herding.
pub const JITTER: f64 = 0.2;

/// Recompute the peer loads at least this often while a peer is fresh.
pub const REFRESH: Duration = Duration::from_millis(5);
/// Shortest pause between the end of one refresh and the start of the next.
pub const MIN_GAP: Duration = Duration::from_millis(1);
/// A refresh may take at most 1/`MAX_SHARE` of the time.
pub const MAX_SHARE: u32 = 5;

/// `interval` jittered by ±[`JITTER`].
pub fn jittered<R: Rng + ?Sized>(interval: Duration, rng: &mut R) -> Duration {
    interval.mul_f64(rng.random_range(1.0 - JITTER..=1.0 + JITTER))
}

/// A node that reports to at most this many peers heartbeats every
/// `interval` when idle too, as SPEC §5 says: at 10 a second to each, that
/// is at most 40 datagrams a second out, and about as many in. Beyond it an
/// idle node slows down (the module docs): an idle fleet must not cost a
/// share of a core per node.
pub const FEW_TARGETS: usize = 4;

/// The sender's timers.
#[derive(Clone, Debug)]
pub struct SendSchedule {
    min_interval: Duration,
    interval: Duration,
    idle_interval: Duration,
    quiet_interval: Duration,
    /// It reports to at most [`FEW_TARGETS`] peers: no idle schedule.
    few: bool,
    /// Empty reports built in a row, up to 2.
    empty_run: u8,
    /// When the last report was built.
    last: Option<Instant>,
    /// When the last full report was built.
    last_full: Option<Instant>,
    /// When a report is due even if nothing changes.
    heartbeat: Instant,
}

impl SendSchedule {
    /// A schedule whose first heartbeat is at `now`.
    pub fn new(config: &Config, now: Instant) -> Self {
        Self {
            min_interval: config.min_interval,
            interval: config.interval,
            idle_interval: Self::idle_interval(config),
            quiet_interval: Self::quiet_interval(config),
            few: false,
            empty_run: 0,
            last: None,
            last_full: None,
            heartbeat: now,
        }
    }

    /// How often an idle node (empty report) repeats it: a third of the
    /// TTL (so that one lost report does not let it expire), at least
    /// `interval`.
    pub fn idle_interval(config: &Config) -> Duration {
        (config.ttl / 3).max(config.interval)
    }

    /// How often a node that has sent two empty reports in a row repeats
    /// them: the TTL, at least [`SendSchedule::idle_interval`].
    pub fn quiet_interval(config: &Config) -> Duration {
        config.ttl.max(Self::idle_interval(config))
    }

    /// The number of peers the reports go to now: with at most
    /// [`FEW_TARGETS`], an empty report is repeated every `interval`, as
    /// SPEC §5 says, on the wall clock's multiples of it; with more, on the
    /// idle grid's longer periods. Until it is told, the schedule counts as
    /// having many.
    pub fn set_targets(&mut self, targets: usize) {
        self.few = targets <= FEW_TARGETS;
    }

    /// Whether the report built at `now` must be a full one.
    pub fn full_due(&self, now: Instant) -> bool {
        // The report after this one is at most min_interval·(1 + J) later
        // (a change) or at the heartbeat, which is capped at last_full +
        // interval once a delta went out: a full one goes out within the
        // interval either way, and not much sooner (fulls are most of the
        // bytes of a busy node).
        let margin = self.min_interval.mul_f64(1.0 + JITTER);
        self.last_full
            .is_none_or(|t| now + margin >= t + self.interval)
    }

    /// When the next report is due if nothing changes.
    pub fn heartbeat(&self) -> Instant {
        self.heartbeat
    }

    /// When a report may go out for counts that changed at `now`: at once,
    /// or `min_interval` after the last one, jittered upwards only: at most
    /// one report per peer every `min_interval` (SPEC §5; heartbeats keep
    /// that gap too, see [`SendSchedule::sampled`]).
    pub fn coalesced<R: Rng + ?Sized>(&self, now: Instant, rng: &mut R) -> Instant {
        self.last.map_or(now, |last| {
            let gap = self
                .min_interval
                .mul_f64(rng.random_range(1.0..=1.0 + JITTER));
            (last + gap).max(now)
        })
    }

    /// The counters were sampled at `now`, when the wall clock read
    /// `wall_ms` (ms since the Unix epoch), into `report` (sent in full or
    /// as a delta), or not at all when there is nobody to send it to: the
    /// next heartbeat is an `interval` (jittered) away, but no later than a
    /// full report is due; sooner when `report` has short work in flight
    /// that may turn long-lived before then; on the idle grid when `report`
    /// is empty.
    pub fn sampled<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        wall_ms: u64,
        report: Option<(&Report, bool)>,
        rng: &mut R,
    ) {
        self.last = Some(now);
        if let Some((report, full)) = report {
            if full {
                self.last_full = Some(now);
            }
            if report.entries.is_empty() {
                self.empty_run = (self.empty_run + 1).min(2);
                let period = if self.few {
                    self.interval
                } else if self.empty_run >= 2 {
                    self.quiet_interval
                } else {
                    self.idle_interval
                };
                // The grid point after the next when the next is closer
                // than `min_interval`: never two reports closer than that.
                let mut wait = until_grid(period, wall_ms);
                if wait < self.min_interval {
                    wait += period;
                }
                self.heartbeat = now + wait;
                return;
            }
            self.empty_run = 0;
        }
        self.heartbeat = now + jittered(self.interval, rng);
        // Once a delta went out, the next full report is due within the
        // interval of the last one (after a full report, the heartbeat
        // keeps its jitter either way).
        if let Some(full) = self.last_full
            && full != now
        {
            self.heartbeat = self.heartbeat.min(full + self.interval);
        }
        if report.is_some_and(|(r, _)| has_short_work(r)) {
            self.heartbeat = self.heartbeat.min(now + jittered(LONG_FLOOR, rng));
        }
        // A `min_interval` configured close to `interval`, or above the
        // re-check's: never two reports closer than that.
        self.heartbeat = self.heartbeat.max(now + self.min_interval);
    }
}

/// How long a receiver counts a peer whose newest report is empty as
/// present (for the gossip plan and the aggregates): three of its quiet
/// periods, so that two lost heartbeats in a row change nothing. A peer
/// whose newest report lists load is present for the TTL, as its load is.
pub fn quiet_alive(config: &Config) -> Duration {
    SendSchedule::quiet_interval(config) * 3
}

/// From `wall_ms` to the next multiple of `period` on the wall clock (a
/// whole period when it is on one).
fn until_grid(period: Duration, wall_ms: u64) -> Duration {
    let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(period_ms - wall_ms % period_ms)
}

/// Whether some of the work in `report` is not long-lived yet.
fn has_short_work(report: &Report) -> bool {
    report.entries.iter().any(|e| e.inflight > e.long_inflight)
}

/// The refresh task's timers.
#[derive(Clone, Debug)]
pub struct RefreshSchedule {
    /// No refresh starts before this (the gap after the last one).
    earliest: Instant,
    /// The timer's next refresh, while a peer is fresh.
    timer: Option<Instant>,
}

impl RefreshSchedule {
    /// A schedule that may refresh from `now` on, with no timer running.
    pub fn new(now: Instant) -> Self {
        Self {
            earliest: now,
            timer: None,
        }
    }

    /// When the refresh that a report merged at `now` asks for runs.
    pub fn on_report(&self, now: Instant) -> Instant {
        now.max(self.earliest)
    }

    /// The next refresh of the timer, if it runs (some peer was fresh at
    /// the last refresh). Never before [`RefreshSchedule::earliest`].
    pub fn timer(&self) -> Option<Instant> {
        self.timer
    }

    /// No refresh starts before this.
    pub fn earliest(&self) -> Instant {
        self.earliest
    }

    /// A refresh ran from `started` to `ended`; `active`: some peer was
    /// fresh (the estimates move with the reports' age).
    pub fn refreshed(&mut self, started: Instant, ended: Instant, active: bool) {
        let took = ended.saturating_duration_since(started);
        self.earliest = ended + (took * (MAX_SHARE - 1)).max(MIN_GAP);
        self.timer = active.then(|| self.earliest + REFRESH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Entry;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A report of one instance with long-lived work in flight.
    fn busy() -> Report {
        Report {
            entries: vec![Entry {
                inflight: 1,
                long_inflight: 1,
                ..Entry::default()
            }],
            ..Report::default()
        }
    }

    fn within(at: Instant, base: Instant, d: Duration) -> bool {
        at >= base + d.mul_f64(1.0 - JITTER) && at <= base + d.mul_f64(1.0 + JITTER)
    }

    #[test]
    fn changes_are_coalesced_and_heartbeats_follow() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut s = SendSchedule::new(&config, t0);
        assert_eq!(s.heartbeat(), t0);
        // Nothing sent yet: a change goes out at once.
        assert_eq!(s.coalesced(t0, &mut rng), t0);
        s.sampled(t0, 0, None, &mut rng);
        assert!(within(s.heartbeat(), t0, config.interval));
        // A change 1 ms later waits for min_interval, never less; one much
        // later does not.
        for _ in 0..1_000 {
            let at = s.coalesced(t0 + ms(1), &mut rng);
            assert!(within(at, t0, config.min_interval), "{at:?}");
            assert!(at >= t0 + config.min_interval, "{at:?}");
        }
        assert_eq!(s.coalesced(t0 + ms(50), &mut rng), t0 + ms(50));
    }

    #[test]
    fn short_work_in_flight_is_looked_at_again_soon() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(2);
        let mut s = SendSchedule::new(&Config::default(), t0);
        let entry = |inflight, long| Entry {
            inflight,
            long_inflight: long,
            ..Entry::default()
        };
        let mut report = Report {
            entries: vec![entry(3, 3)],
            ..Report::default()
        };
        s.sampled(t0, 0, Some((&report, true)), &mut rng);
        assert!(s.heartbeat() > t0 + LONG_FLOOR * 2, "all long-lived");
        report.entries.push(entry(2, 1));
        s.sampled(t0, 0, Some((&report, true)), &mut rng);
        assert!(within(s.heartbeat(), t0, LONG_FLOOR));
    }

    #[test]
    fn a_full_report_at_least_every_interval() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(3);
        let config = Config::default();
        let mut s = SendSchedule::new(&config, t0);
        let busy = busy();
        let mut now = t0;
        let mut last_full: Option<Instant> = None;
        // Reports every 5 ms for 2 s, full when due: fulls are never more
        // than `interval` apart, and at most `min_interval`·(1 + J) closer.
        for _ in 0..400 {
            let full = s.full_due(now);
            if full {
                if let Some(prev) = last_full {
                    let gap = now - prev;
                    assert!((ms(94)..=ms(100)).contains(&gap), "{gap:?}");
                }
                last_full = Some(now);
            }
            s.sampled(now, 0, Some((&busy, full)), &mut rng);
            assert!(full || last_full.is_some_and(|f| s.heartbeat() <= f + config.interval));
            now += ms(5);
        }
        // With nothing changing, heartbeats keep their jitter, and a full
        // one goes out at least every interval once a delta went out.
        let mut last_full = now;
        for _ in 0..50 {
            let before = now;
            now = s.heartbeat();
            let gap = now - before;
            assert!(gap <= ms(120), "{gap:?}");
            let full = s.full_due(now);
            if full {
                last_full = now;
            }
            s.sampled(now, 0, Some((&busy, full)), &mut rng);
            // After a delta, the next (full) one within the interval.
            assert!(full || s.heartbeat() <= last_full + config.interval);
        }
    }

    /// With `min_interval` configured close to `interval` (or above the
    /// re-check's 20 ms), heartbeats keep that gap too.
    #[test]
    fn no_report_comes_sooner_than_min_interval() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(5);
        let config = Config {
            min_interval: ms(90),
            interval: ms(100),
            ..Config::default()
        };
        let short = Report {
            entries: vec![Entry {
                inflight: 1,
                ..Entry::default()
            }],
            ..Report::default()
        };
        let mut s = SendSchedule::new(&config, t0);
        for report in [busy(), short].iter().cycle().take(200) {
            s.sampled(t0, 0, Some((report, true)), &mut rng);
            assert!(s.heartbeat() >= t0 + ms(90), "{:?}", s.heartbeat() - t0);
            assert!(s.coalesced(t0, &mut rng) >= t0 + ms(90));
        }
    }

    #[test]
    fn an_idle_node_is_quiet_and_aligned() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(4);
        let config = Config::default();
        assert_eq!(
            SendSchedule::idle_interval(&config),
            Duration::from_nanos(333_333_333)
        );
        let empty = Report::default();
        let busy = busy();
        let next = |s: &SendSchedule, wall: u64| {
            wall + u64::try_from((s.heartbeat() - t0).as_millis()).unwrap()
        };
        // The first idle heartbeat after load falls on the wall clock's
        // multiples of 333 ms, whenever the last report was, but never
        // within min_interval of it (332: not at 333, at 666).
        let min = u64::try_from(config.min_interval.as_millis()).unwrap();
        for wall in [0, 1, 100, 329, 332, 333, 1000, 1_700_000_000_123] {
            let mut s = SendSchedule::new(&config, t0);
            s.sampled(t0, wall, Some((&busy, true)), &mut rng);
            s.sampled(t0, wall, Some((&empty, true)), &mut rng);
            let at = next(&s, wall);
            assert_eq!(at % 333, 0, "{wall}");
            assert!((wall + min..wall + min + 333).contains(&at), "{wall}: {at}");
            // From the second empty one in a row on: multiples of the TTL.
            for _ in 0..3 {
                s.sampled(t0, wall, Some((&empty, true)), &mut rng);
                let at = next(&s, wall);
                assert_eq!(at % 1000, 0, "{wall}");
                assert!((wall + 1..=wall + 1000).contains(&at), "{wall}: {at}");
            }
            // Load again, then empty: the short period first.
            s.sampled(t0, wall, Some((&busy, true)), &mut rng);
            s.sampled(t0, wall, Some((&empty, true)), &mut rng);
            assert_eq!(next(&s, wall) % 333, 0, "{wall}");
        }
        assert_eq!(quiet_alive(&config), Duration::from_secs(3));
        // An idle interval below the heartbeat's is raised to it.
        let tight = Config {
            ttl: ms(150),
            ..Config::default()
        };
        assert_eq!(SendSchedule::idle_interval(&tight), tight.interval);
    }

    /// With few peers to report to, an idle node heartbeats every
    /// `interval` as SPEC §5 says, on the wall clock's multiples of it (an
    /// empty report cannot herd; aligned, a node hears its idle peers in
    /// one burst); with one more peer, it goes quiet.
    #[test]
    fn an_idle_node_with_few_peers_heartbeats_every_interval() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(5);
        let config = Config::default();
        let empty = Report::default();
        let min = u64::try_from(config.min_interval.as_millis()).unwrap();
        for start in [0, 1, 57, 96, 99, 100, 1_700_000_000_123] {
            let mut s = SendSchedule::new(&config, t0);
            s.set_targets(FEW_TARGETS);
            let (mut now, mut wall) = (t0, start);
            for _ in 0..10 {
                s.sampled(now, wall, Some((&empty, true)), &mut rng);
                let wait = u64::try_from((s.heartbeat() - now).as_millis()).unwrap();
                assert_eq!((wall + wait) % 100, 0, "{start}: {wall} + {wait}");
                assert!((min..min + 100).contains(&wait), "{start}: {wall} + {wait}");
                (now, wall) = (s.heartbeat(), wall + wait);
            }
            s.set_targets(FEW_TARGETS + 1);
            s.sampled(now, wall, Some((&empty, true)), &mut rng);
            s.sampled(now, wall, Some((&empty, true)), &mut rng);
            assert!(s.heartbeat() > now + config.interval * 2, "quiet");
        }
    }

    #[test]
    fn refreshes_are_throttled() {
        let t0 = Instant::now();
        let mut s = RefreshSchedule::new(t0);
        assert_eq!((s.on_report(t0), s.timer()), (t0, None));
        // A quick refresh: the next one at least MIN_GAP later, the timer
        // REFRESH after that.
        s.refreshed(t0, t0 + Duration::from_micros(10), true);
        let gap_end = t0 + Duration::from_micros(10) + MIN_GAP;
        assert_eq!(s.on_report(t0 + Duration::from_micros(20)), gap_end);
        assert_eq!(s.timer(), Some(gap_end + REFRESH));
        // A slow one (4 ms): four times as long before the next.
        s.refreshed(t0, t0 + ms(4), false);
        assert_eq!(s.earliest(), t0 + ms(20));
        assert_eq!(s.timer(), None, "nobody fresh: no timer");
        assert_eq!(s.on_report(t0 + ms(30)), t0 + ms(30));
    }
}
