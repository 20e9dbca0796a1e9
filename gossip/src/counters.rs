//! The sender's per-instance counters: plain atomics that the data plane
//! bumps on every pick and release, without a lock, and that the
//! [`Tracker`](crate::Tracker) samples when it builds a report.
//!
//! ```text
//!  pick ──start(now)──▶ (picks, inflight) += (1, 1); ring[epoch(now)] += 1
//!  release ─finish(started, now)─▶ inflight −= 1, ring[started.epoch] −= 1,
//!                                  and if it took ≤ long_after:
//!                                  (completions, service_us) += (1, took)
//!  report ──Tracker──▶ deltas of picks/completions/service_us since the last
//!                      report; young = Σ ring slots since now − threshold;
//!                      long-lived = inflight − young
//! ```
//!
//! A pick is two atomic operations (one `fetch_add` and one compare-and-swap
//! on its ring slot), a release three: pairs that change together share a
//! word. `flight` holds picks (high 32 bits, wrapping) over the in-flight
//! count (low 32 bits, which never borrow: every release follows its pick);
//! `done` holds short completions (high 20 bits) over their total service
//! time in µs (low 44 bits), both wrapping. The tracker reads differences
//! between samples, which decode exactly while fewer than 2^32 picks and
//! 2^20 short completions (each at most `long_after`) fall between two
//! samples of the same instance; it samples at every report, heartbeats
//! included.
//!
//! The ring holds, per start-time epoch, how much of the work started in
//! that epoch is still in flight. Each slot is one `u64`: the epoch's low 32
//! bits tagged on top of a 32-bit count, updated with compare-and-swap. A
//! pick that lands on a slot still tagged with an older epoch (one ring
//! length ago) takes it over: whatever that old epoch still has in flight is
//! long-lived by then and counted as `inflight − young`, and its releases,
//! finding another tag, leave the slot alone. So work may stay in flight
//! for hours without a timer, a fold, or a lock, and the ring stays a fixed
//! [`EPOCHS`] words per instance. The ring is allocated by the first pick:
//! an instance that never carried work costs a few words, not 512 bytes.
//!
//! Epochs are `long_after / (EPOCHS − 3)` long, rounded up to a power of two
//! nanoseconds (at least 2^20 ns, about 1 ms) so that a pick finds its epoch
//! with a shift: the ring spans the longest long-lived threshold with room
//! for the epoch in progress and one started by a pick whose `now` is a
//! little ahead of the sampler's. Thresholds are rounded up to whole epochs
//! (2^24 ns, about 16.8 ms, with the default `long_after` of 1 s).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Start-time epochs in the ring of each instance.
pub const EPOCHS: usize = 64;

/// Shortest epoch: 2^20 ns (about 1 ms).
const MIN_SHIFT: u32 = 20;

/// Lock-free load counters of one instance on the sending node.
#[derive(Debug)]
pub struct LoadCounters {
    base: Instant,
    /// An epoch is 2^shift ns.
    shift: u32,
    /// Picks (high 32 bits, wrapping) and work in flight (low 32 bits).
    flight: AtomicU64,
    /// Short completions (high 20 bits) and their service time in µs (low
    /// 44 bits), wrapping.
    done: AtomicU64,
    /// Work that took longer than this (µs, `long_after`) was long-lived: it
    /// is not counted as a completion of short work.
    short_limit_us: u64,
    /// Allocated by the first pick.
    ring: OnceLock<Box<[AtomicU64; EPOCHS]>>,
}

/// When a piece of work started, as [`LoadCounters::finish`] needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    at: Instant,
    /// `None` when the ring could not record it (see [`LoadCounters::start`]).
    epoch: Option<u64>,
}

impl Started {
    /// When the work started.
    pub fn at(&self) -> Instant {
        self.at
    }
}

/// Cumulative counts as the counters hold them (wrapping), read by the
/// tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    picks: u32,
    done: u64,
}

/// What happened between two [`Totals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) picks: u64,
    pub(crate) completions: u64,
    pub(crate) service_us: u64,
}

impl Totals {
    /// The picks and short completions since `earlier`.
    pub(crate) fn since(self, earlier: Self) -> Delta {
        let done = self.done.wrapping_sub(earlier.done);
        Delta {
            picks: u64::from(self.picks.wrapping_sub(earlier.picks)),
            completions: done >> DONE_SHIFT,
            service_us: done & SERVICE_MASK,
        }
    }
}

/// One pick in `flight`.
const PICK: u64 = 1 << 32;
/// The in-flight count in `flight`.
const INFLIGHT_MASK: u64 = u32::MAX as u64;
/// One completion in `done`.
const DONE_SHIFT: u32 = 44;
/// The service time in `done`.
const SERVICE_MASK: u64 = (1 << DONE_SHIFT) - 1;

const COUNT_MASK: u64 = u32::MAX as u64;

/// How far (in epochs) a slot's tag may be ahead of a pick's epoch and
/// still be taken as a concurrent pick's: a few ring lengths.
const AHEAD: i32 = 4 * EPOCHS as i32;

fn tag_of(slot: u64) -> u32 {
    (slot >> 32) as u32
}

fn pack(epoch: u64, count: u64) -> u64 {
    ((epoch as u32 as u64) << 32) | count.min(COUNT_MASK)
}

/// `a − b` on the 32-bit epoch tags, as a signed distance.
fn tag_diff(a: u32, b: u32) -> i32 {
    a.wrapping_sub(b) as i32
}

impl LoadCounters {
    /// Counters whose epochs are counted from `base`, sized for a
    /// long-lived threshold of at most `long_after`.
    pub fn new(base: Instant, long_after: Duration) -> Self {
        let span = u64::try_from(long_after.as_nanos()).unwrap_or(u64::MAX);
        let epoch_ns = span.div_ceil(EPOCHS as u64 - 3);
        // ⌈log2⌉, at least MIN_SHIFT; at most 63 (epochs of 292 years).
        let shift = (u64::BITS - epoch_ns.saturating_sub(1).leading_zeros()).clamp(MIN_SHIFT, 63);
        Self {
            base,
            shift,
            flight: AtomicU64::new(0),
            done: AtomicU64::new(0),
            short_limit_us: u64::try_from(long_after.as_micros()).unwrap_or(u64::MAX),
            ring: OnceLock::new(),
        }
    }

    /// Where the epochs are counted from.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Length of one start-time epoch.
    pub fn epoch_len(&self) -> Duration {
        Duration::from_nanos(1 << self.shift)
    }

    /// Whether any work was ever picked. Counters that never were have
    /// nothing to report (no load, no rate, no service time), so a report
    /// skips them without sampling: most of a large table's instances.
    pub fn used(&self) -> bool {
        // The ring is made at the first pick.
        self.ring.get().is_some()
    }

    /// Work in flight now.
    pub fn inflight(&self) -> u64 {
        self.flight.load(Relaxed) & INFLIGHT_MASK
    }

    /// Records a pick at `now`; hand the result to [`LoadCounters::finish`]
    /// when the work ends.
    pub fn start(&self, now: Instant) -> Started {
        self.flight.fetch_add(PICK + 1, Relaxed);
        let epoch = self.epoch(now);
        let ring = self
            .ring
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        let slot = &ring[self.index(epoch)];
        let tag = epoch as u32;
        let mut current = slot.load(Relaxed);
        loop {
            let next = match tag_diff(tag_of(current), tag) {
                0 => pack(epoch, (current & COUNT_MASK) + 1),
                // The slot holds an older epoch: its work is long-lived now.
                // (So does one that looks far ahead: its 32-bit tag wrapped
                // after a year or more without a pick in this slot.)
                d if !(0..=AHEAD).contains(&d) => pack(epoch, 1),
                // A pick with a later `now` got here first, a ring length
                // ahead (this thread stalled for a whole ring span): leave
                // its count alone; this work counts as long-lived at once.
                _ => {
                    return Started {
                        at: now,
                        epoch: None,
                    };
                }
            };
            match slot.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => {
                    return Started {
                        at: now,
                        epoch: Some(epoch),
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Records the end, at `now`, of work that [`LoadCounters::start`]
    /// recorded as `started`. Call it once per start.
    pub fn finish(&self, started: Started, now: Instant) {
        // Each finish follows its start, so this never borrows from picks.
        self.flight.fetch_sub(1, Relaxed);
        // A recorded epoch means the ring exists.
        if let (Some(epoch), Some(ring)) = (started.epoch, self.ring.get()) {
            let slot = &ring[self.index(epoch)];
            let tag = epoch as u32;
            let mut current = slot.load(Relaxed);
            // A slot taken over by a later epoch no longer counts this work.
            while tag_of(current) == tag && current & COUNT_MASK > 0 {
                match slot.compare_exchange_weak(current, current - 1, Relaxed, Relaxed) {
                    Ok(_) => break,
                    Err(seen) => current = seen,
                }
            }
        }
        let took = now.saturating_duration_since(started.at);
        let took_us = took
            .as_secs()
            .saturating_mul(1_000_000)
            .saturating_add(u64::from(took.subsec_micros()));
        if took_us <= self.short_limit_us {
            self.done
                .fetch_add((1 << DONE_SHIFT) + took_us.min(SERVICE_MASK), Relaxed);
        }
    }

    /// The cumulative counts.
    pub(crate) fn totals(&self) -> Totals {
        Totals {
            picks: (self.flight.load(Relaxed) >> 32) as u32,
            done: self.done.load(Relaxed),
        }
    }

    /// Work in flight that started at or after the epoch of
    /// `now − threshold`: the part that is not long-lived. Thresholds beyond
    /// the ring's span are cut to it.
    pub(crate) fn young(&self, now: Instant, threshold: Duration) -> u64 {
        let Some(ring) = self.ring.get() else {
            return 0;
        };
        let current = self.epoch(now);
        let cutoff = now.checked_sub(threshold).map_or(0, |t| self.epoch(t));
        let span = current.saturating_sub(cutoff).min(EPOCHS as u64 - 2);
        // From one epoch ahead (a pick whose `now` is later than ours) back
        // to the cutoff.
        let mut young = 0;
        for back in 0..=span + 1 {
            let Some(epoch) = (current + 1).checked_sub(back) else {
                break;
            };
            let slot = ring[self.index(epoch)].load(Relaxed);
            if tag_of(slot) == epoch as u32 {
                young += slot & COUNT_MASK;
            }
        }
        young
    }

    fn epoch(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.base);
        let ns = since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()));
        ns >> self.shift
    }

    fn index(&self, epoch: u64) -> usize {
        (epoch % EPOCHS as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn epochs_cover_long_after() {
        let t0 = Instant::now();
        let c = LoadCounters::new(t0, Duration::from_secs(1));
        assert!(c.epoch_len() * (EPOCHS as u32 - 3) >= Duration::from_secs(1));
        assert_eq!(c.epoch_len(), Duration::from_nanos(1 << 24));
        let short = LoadCounters::new(t0, ms(10));
        assert_eq!(short.epoch_len(), Duration::from_nanos(1 << 20));
    }

    #[test]
    fn young_and_long_lived_work() {
        let t0 = Instant::now();
        let c = LoadCounters::new(t0, ms(500));
        let e = c.epoch_len(); // 2^23 ns, about 8.4 ms
        let half = e / 2;
        let a = c.start(t0);
        let b = c.start(t0 + half);
        let _d = c.start(t0 + e * 9 + half);
        assert_eq!(c.inflight(), 3);
        let now = t0 + e * 10 + half;
        // All three started within the last 10.5 epochs; two more than 5
        // epochs ago.
        assert_eq!(c.young(now, e * 10 + half), 3);
        assert_eq!(c.young(now, e * 5), 1);
        // Thresholds round up to the start of the cutoff's epoch.
        assert_eq!(c.young(now, e * 10), 3);
        c.finish(a, now);
        assert_eq!(c.young(now, e * 10 + half), 2);
        // Far later, everything left is long-lived, whatever the threshold.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(c.young(later, e * 60), 0);
        assert_eq!(c.inflight(), 2);
        // A new pick in the same ring slot as `b` takes the slot over;
        // `b`'s release then leaves the new count alone.
        let slot_mate = t0 + half + e * EPOCHS as u32;
        let f = c.start(slot_mate);
        c.finish(b, slot_mate);
        assert_eq!(c.young(slot_mate, e), 1);
        c.finish(f, slot_mate);
        assert_eq!(c.young(slot_mate, e), 0);
        assert_eq!(c.inflight(), 1);
    }

    #[test]
    fn completions_of_short_work_only() {
        let t0 = Instant::now();
        let c = LoadCounters::new(t0, ms(50));
        for i in 0..4 {
            let s = c.start(t0 + ms(i));
            c.finish(s, t0 + ms(i + 10));
        }
        let slow = c.start(t0);
        c.finish(slow, t0 + ms(51));
        let t = c.totals().since(Totals::default());
        assert_eq!((t.picks, t.completions, t.service_us), (5, 4, 40_000));
        assert_eq!(c.inflight(), 0);
    }

    #[test]
    fn deltas_decode_across_wrapping() {
        let early = Totals {
            picks: u32::MAX - 1,
            done: u64::MAX - 5,
        };
        // 3 picks; 2 completions taking 7 µs together.
        let late = Totals {
            picks: early.picks.wrapping_add(3),
            done: early.done.wrapping_add((2 << DONE_SHIFT) + 7),
        };
        let d = late.since(early);
        assert_eq!((d.picks, d.completions, d.service_us), (3, 2, 7));
    }

    #[test]
    fn a_pick_from_the_past_does_not_clobber_a_newer_slot() {
        let t0 = Instant::now();
        let c = LoadCounters::new(t0, ms(500));
        let late = t0 + c.epoch_len() * EPOCHS as u32;
        let new = c.start(late);
        let stalled = c.start(t0); // same slot, one ring length earlier
        assert_eq!(c.young(late, ms(10)), 1);
        c.finish(stalled, late);
        assert_eq!(c.young(late, ms(10)), 1);
        c.finish(new, late);
        assert_eq!((c.young(late, ms(10)), c.inflight()), (0, 0));

        // A slot left alone for so long that its tag wrapped past half the
        // 32-bit range is stale, not ahead.
        let c = LoadCounters::new(t0, ms(10)); // 2^20 ns epochs
        let _old = c.start(t0);
        let much_later = t0 + c.epoch_len() * ((1 << 31) + EPOCHS as u32);
        let _new = c.start(much_later);
        assert_eq!(c.young(much_later, ms(5)), 1);
    }

    #[test]
    fn concurrent_picks_and_releases_balance() {
        let t0 = Instant::now();
        let c = Arc::new(LoadCounters::new(t0, ms(100)));
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let at = t0 + Duration::from_micros(i * 7 + k);
                        let s = c.start(at);
                        c.finish(s, at + Duration::from_micros(50));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.inflight(), 0);
        assert_eq!(c.totals().since(Totals::default()).picks, 40_000);
        let end = t0 + ms(80);
        assert_eq!(c.young(end, ms(100)), 0);
    }
}
