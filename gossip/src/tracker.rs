//! The sender's side: what a node has in flight per instance and what its
//! peers need to extrapolate it (see [`Report`] and the estimator).
//!
//! The balancer tells the tracker of every pick and every release; the
//! transport asks it for a [`Report`] when one is due. Per instance it keeps:
//!
//! - the in-flight count, split by start time into buckets of a few ms, so
//!   that the long-lived part is known without a timer per request: work in
//!   flight for more than [`LONG_FACTOR`] times the instance's mean service
//!   time (at least [`LONG_FLOOR`], at most `long_after`) is long-lived, and
//!   its buckets are folded into one counter when a report is built;
//! - the pick rate, an exponentially weighted average over `rate_window`
//!   (bias-corrected while the node is younger than that);
//! - the mean in-flight time of work that was not long-lived when it ended,
//!   a moving average over the last ~32 completions, falling back to the
//!   node-wide average for an instance that has not seen enough.
//!
//! The threshold follows the service time because what receivers need is
//! the split between work that completes at the short-request rate and work
//! that does not: with 10 ms requests, one still in flight after 80 ms is
//! almost surely long-lived, while with 100 ms requests it is not. A fixed
//! threshold of 1 s lets a 2 s request count as short, and decay in the
//! peers' estimates, for half its life (see `docs/gossip-sim.md`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::Config;
use crate::codec::{Entry, Report};

/// Weight of each completion in the moving average of service times.
const SERVICE_WEIGHT: f64 = 1.0 / 32.0;
/// Work in flight for longer than this many mean service times of its
/// instance is long-lived.
pub(crate) const LONG_FACTOR: f64 = 8.0;
/// Shortest long-lived threshold.
pub(crate) const LONG_FLOOR: Duration = Duration::from_millis(20);
/// Start-time buckets per [`LONG_FLOOR`].
const BUCKETS: u32 = 8;
/// Completions before an instance's own mean service time is used.
const MIN_COMPLETIONS: u32 = 8;

/// A node's own load, as it reports it to its peers.
#[derive(Debug)]
pub struct Tracker {
    node_id: u64,
    incarnation: u64,
    seq: u64,
    /// Ceiling of the long-lived threshold, in s.
    long_after: f64,
    rate_window: f64,
    /// Width of a start-time bucket, in ns (≥ 1).
    bucket_ns: u128,
    epoch: Instant,
    /// Node-wide mean service time in s, 0 until the first completion.
    service: f64,
    instances: BTreeMap<[u8; 16], InstanceLoad>,
}

#[derive(Debug)]
struct InstanceLoad {
    inflight: u32,
    /// Work started in buckets below `folded_below`: long-lived.
    long: u32,
    folded_below: u64,
    /// (bucket, count) of younger work, increasing by bucket, no zero counts.
    young: VecDeque<(u64, u32)>,
    /// Picks per second, as of `rate_at`.
    rate: f64,
    rate_at: Instant,
    /// Mean service time in s, and how many completions it has seen.
    service: f64,
    completions: u32,
}

impl Tracker {
    /// A tracker for node `node_id` in its `incarnation` (a value that grows
    /// with every start, e.g. the start time in ms), created at `now`.
    pub fn new(node_id: u64, incarnation: u64, config: &Config, now: Instant) -> Self {
        let bucket = (config.long_after.min(LONG_FLOOR) / BUCKETS).max(Duration::from_millis(1));
        Self {
            node_id,
            incarnation,
            seq: 0,
            long_after: config.long_after.as_secs_f64(),
            rate_window: config.rate_window.as_secs_f64().max(1e-3),
            bucket_ns: bucket.as_nanos().max(1),
            epoch: now,
            service: 0.0,
            instances: BTreeMap::new(),
        }
    }

    /// Records a pick of `instance` at `now`.
    pub fn picked(&mut self, instance: [u8; 16], now: Instant) {
        let bucket = self.bucket(now);
        let window = self.rate_window;
        let load = self
            .instances
            .entry(instance)
            .or_insert_with(|| InstanceLoad {
                inflight: 0,
                long: 0,
                folded_below: 0,
                young: VecDeque::new(),
                rate: 0.0,
                rate_at: now,
                service: 0.0,
                completions: 0,
            });
        load.inflight = load.inflight.saturating_add(1);
        if bucket < load.folded_below {
            load.long = load.long.saturating_add(1);
        } else {
            match load.young.binary_search_by_key(&bucket, |&(b, _)| b) {
                Ok(i) => load.young[i].1 = load.young[i].1.saturating_add(1),
                Err(i) => load.young.insert(i, (bucket, 1)),
            }
        }
        load.rate = load.rate_now(now, window) + 1.0 / window;
        load.rate_at = now;
    }

    /// Records the end of work on `instance` that was picked at `started`.
    /// A release that matches no pick is ignored.
    pub fn finished(&mut self, instance: [u8; 16], started: Instant, now: Instant) {
        let bucket = self.bucket(started);
        let Some(load) = self.instances.get_mut(&instance) else {
            return;
        };
        if bucket < load.folded_below {
            if load.long == 0 {
                return;
            }
            load.long -= 1;
        } else {
            let Ok(i) = load.young.binary_search_by_key(&bucket, |&(b, _)| b) else {
                return;
            };
            load.young[i].1 -= 1;
            if load.young[i].1 == 0 {
                load.young.remove(i);
            }
        }
        load.inflight = load.inflight.saturating_sub(1);
        let took = now.saturating_duration_since(started).as_secs_f64();
        if took <= load.threshold(self.service, self.long_after) {
            load.completions = load.completions.saturating_add(1);
            // The first completions average plainly, then exponentially.
            let weight = (1.0 / f64::from(load.completions)).max(SERVICE_WEIGHT);
            load.service += (took - load.service) * weight;
            self.service = if self.service == 0.0 {
                took
            } else {
                self.service + (took - self.service) * SERVICE_WEIGHT
            };
        }
    }

    /// This node's in-flight count on `instance`.
    pub fn inflight(&self, instance: &[u8; 16]) -> u32 {
        self.instances.get(instance).map_or(0, |l| l.inflight)
    }

    /// The next report, as of `now`, stamped with the wall clock
    /// `sent_at_ms`. Idle instances are left out (and forgotten).
    pub fn report(&mut self, now: Instant, sent_at_ms: u64) -> Report {
        self.seq += 1;
        let window = self.rate_window;
        // The averages start at 0 when the node starts: scale them up by the
        // part of the window that has passed since (bias correction).
        let since = now.saturating_duration_since(self.epoch).as_secs_f64();
        let warmup = (1.0 - (-since / window).exp()).max(0.05);
        let (fallback, ceiling) = (self.service, self.long_after);
        let (epoch, bucket_ns) = (self.epoch, self.bucket_ns);
        let mut entries = Vec::new();
        self.instances.retain(|&instance, load| {
            let threshold = Duration::try_from_secs_f64(load.threshold(fallback, ceiling))
                .unwrap_or(Duration::MAX);
            let cutoff = now
                .checked_sub(threshold)
                .map_or(0, |t| bucket(epoch, bucket_ns, t));
            load.fold(cutoff);
            let rate_milli = (load.rate_now(now, window) / warmup * 1000.0).round() as u32;
            if load.inflight == 0 && rate_milli == 0 {
                return false;
            }
            entries.push(Entry {
                instance,
                inflight: load.inflight,
                long_inflight: load.long,
                arrival_rate_milli: rate_milli,
                mean_service_us: (load.mean_service(fallback) * 1e6).round() as u32,
            });
            true
        });
        Report {
            node_id: self.node_id,
            incarnation: self.incarnation,
            seq: self.seq,
            sent_at_ms,
            entries,
        }
    }

    fn bucket(&self, at: Instant) -> u64 {
        bucket(self.epoch, self.bucket_ns, at)
    }
}

/// Index of the start-time bucket of `at`.
fn bucket(epoch: Instant, bucket_ns: u128, at: Instant) -> u64 {
    let ns = at.saturating_duration_since(epoch).as_nanos() / bucket_ns;
    u64::try_from(ns).unwrap_or(u64::MAX)
}

impl InstanceLoad {
    /// Mean service time in s: the instance's own once it has seen a few
    /// completions, else the node-wide one (0: unknown).
    fn mean_service(&self, node_wide: f64) -> f64 {
        if self.completions >= MIN_COMPLETIONS {
            self.service
        } else {
            node_wide
        }
    }

    /// Age in s after which work on this instance is long-lived.
    fn threshold(&self, node_wide: f64, ceiling: f64) -> f64 {
        let service = self.mean_service(node_wide);
        if service > 0.0 {
            (LONG_FACTOR * service)
                .max(LONG_FLOOR.as_secs_f64())
                .min(ceiling)
        } else {
            ceiling
        }
    }

    fn rate_now(&self, now: Instant, window: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.rate_at).as_secs_f64();
        self.rate * (-elapsed / window).exp()
    }

    /// Moves work started in buckets below `cutoff` to the long-lived count.
    fn fold(&mut self, cutoff: u64) {
        while let Some(&(bucket, count)) = self.young.front() {
            if bucket >= cutoff {
                break;
            }
            self.long = self.long.saturating_add(count);
            self.young.pop_front();
        }
        self.folded_below = self.folded_below.max(cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    const A: [u8; 16] = [1; 16];
    const B: [u8; 16] = [2; 16];

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config() -> Config {
        Config {
            long_after: ms(160),
            rate_window: Duration::from_secs(1),
            ..Config::default()
        }
    }

    #[test]
    fn counts_and_long_lived_part() {
        let t0 = Instant::now();
        let mut t = Tracker::new(9, 4, &config(), t0);
        t.picked(A, t0);
        t.picked(A, t0);
        t.picked(B, t0 + ms(100));
        let r = t.report(t0 + ms(100), 1234);
        assert_eq!(
            (r.node_id, r.incarnation, r.seq, r.sent_at_ms),
            (9, 4, 1, 1234)
        );
        assert_eq!(r.entries.len(), 2);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (2, 0));
        // 200 ms on, A's two are long-lived, B's is not.
        let r = t.report(t0 + ms(200), 0);
        assert_eq!(r.seq, 2);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (2, 2));
        assert_eq!((r.entries[1].inflight, r.entries[1].long_inflight), (1, 0));
        // Releases find their bucket whether or not it was folded.
        t.finished(A, t0, t0 + ms(210));
        t.finished(B, t0 + ms(100), t0 + ms(210));
        assert_eq!(t.inflight(&A), 1);
        assert_eq!(t.inflight(&B), 0);
        let r = t.report(t0 + ms(400), 0);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (1, 1));
        // A release that matches no pick changes nothing.
        t.finished(B, t0, t0 + ms(400));
        t.finished([3; 16], t0, t0 + ms(400));
        assert_eq!(t.inflight(&B), 0);
        // Reports are valid wire reports.
        let r = t.report(t0 + ms(400), 0);
        assert_eq!(decode(&encode(&r).unwrap()).unwrap(), r);
    }

    #[test]
    fn rate_and_service_time() {
        let t0 = Instant::now();
        let mut t = Tracker::new(1, 1, &config(), t0);
        // 500 picks/s for 2 s, each in flight for 4 ms.
        for i in 0..1000u64 {
            let at = t0 + ms(2 * i);
            t.picked(A, at);
            t.finished(A, at, at + ms(4));
        }
        let r = t.report(t0 + ms(2000), 0);
        let e = r.entries[0];
        assert!((480_000..=510_000).contains(&e.arrival_rate_milli), "{e:?}");
        assert_eq!(e.mean_service_us, 4000);
        assert_eq!(e.inflight, 0);
        // Work in flight for more than 8 × 4 ms is long-lived.
        t.picked(A, t0 + ms(2000));
        let r = t.report(t0 + ms(2020), 0);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (1, 0));
        let r = t.report(t0 + ms(2040), 0);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (1, 1));
        t.finished(A, t0 + ms(2000), t0 + ms(2040));
        // Long-lived work does not count as service time.
        t.picked(A, t0 + ms(2000));
        t.finished(A, t0 + ms(2000), t0 + ms(3000));
        assert_eq!(t.report(t0 + ms(3000), 0).entries[0].mean_service_us, 4000);
        // An idle instance is dropped once its rate has faded.
        let r = t.report(t0 + Duration::from_secs(60), 0);
        assert!(r.entries.is_empty());
    }

    #[test]
    fn new_instance_uses_node_wide_service_time() {
        let t0 = Instant::now();
        let mut t = Tracker::new(1, 1, &config(), t0);
        for i in 0..10 {
            t.picked(A, t0 + ms(i));
            t.finished(A, t0 + ms(i), t0 + ms(i + 10));
        }
        t.picked(B, t0 + ms(20));
        let r = t.report(t0 + ms(20), 0);
        assert_eq!(r.entries[1].instance, B);
        assert_eq!(r.entries[1].mean_service_us, 10_000);
    }
}
