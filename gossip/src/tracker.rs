//! The sender's side: turns samples of each instance's [`LoadCounters`]
//! into a [`Report`] of what this node has in flight and what its peers
//! need to extrapolate it.
//!
//! The data plane only bumps atomics ([`LoadCounters::start`] and
//! [`LoadCounters::finish`]); everything else happens here, when a report
//! is built, from the differences between this sample and the last one:
//!
//! - the long-lived part of the in-flight count: work in flight for more
//!   than [`LONG_FACTOR`] times the instance's mean service time (at least
//!   [`LONG_FLOOR`], at most `long_after`), read off the counters' ring of
//!   start-time epochs;
//! - the pick rate, an exponentially weighted average over `rate_window`
//!   of the picks since the last sample (taken as spread evenly over the
//!   interval), bias-corrected while the node is younger than the window;
//! - the mean in-flight time of work that ended within `long_after`, a
//!   moving average over the last ~32 completions, falling back to the
//!   node-wide average for an instance that has not seen enough. Only work
//!   that outlasts `long_after` is left out, not work that outlasts the
//!   threshold: the threshold follows the mean, and a mean learnt from a
//!   few instant requests (20 ms threshold) would then never see the 100 ms
//!   ones that followed; every one of them would be reported long-lived
//!   and none would decay in the peers' estimates (measured end to end:
//!   the estimator then herds like raw counts, see `integration::wan`).
//!
//! The threshold follows the service time because what receivers need is
//! the split between work that completes at the short-request rate and work
//! that does not: with 10 ms requests, one still in flight after 80 ms is
//! almost surely long-lived, while with 100 ms requests it is not. A fixed
//! threshold of 1 s lets a 2 s request count as short, and decay in the
//! peers' estimates, for half its life (see `docs/gossip-sim.md`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Config;
use crate::codec::{Entry, Report};
use crate::counters::{LoadCounters, Totals};

/// Completions the moving average of service times spans.
const SERVICE_SPAN: u64 = 32;
/// Work in flight for longer than this many mean service times of its
/// instance is long-lived.
pub(crate) const LONG_FACTOR: f64 = 8.0;
/// Shortest long-lived threshold.
pub const LONG_FLOOR: Duration = Duration::from_millis(20);
/// Completions before an instance's own mean service time is used.
const MIN_COMPLETIONS: u64 = 8;

/// A node's own load, as it reports it to its peers.
#[derive(Debug)]
pub struct Tracker {
    node_id: u64,
    incarnation: u64,
    seq: u64,
    /// Ceiling of the long-lived threshold, in s.
    long_after: f64,
    rate_window: f64,
    epoch: Instant,
    /// Node-wide mean service time.
    service: Mean,
    instances: HashMap<[u8; 16], InstanceState>,
}

/// A moving average of service times in s: the plain mean of the first
/// [`SERVICE_SPAN`] completions, then exponential with weight
/// `1 / SERVICE_SPAN` per completion.
#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    value: f64,
    count: u64,
}

impl Mean {
    /// Takes in `count` completions that took `total` s together, as if
    /// each had taken their mean.
    fn absorb(&mut self, count: u64, total: f64) {
        if count == 0 {
            return;
        }
        let batch = total / count as f64;
        let (n, after) = (self.count, self.count.saturating_add(count));
        // What is left of the old mean after `count` updates with weights
        // max(1/k, 1/SPAN) for the k-th completion: the plain part
        // telescopes to n / min(after, SPAN), the rest is (1 − 1/SPAN)^m.
        let plain = if n < SERVICE_SPAN {
            n as f64 / after.min(SERVICE_SPAN) as f64
        } else {
            1.0
        };
        let decayed = after.saturating_sub(n.max(SERVICE_SPAN));
        let keep = plain
            * (1.0 - 1.0 / SERVICE_SPAN as f64).powi(i32::try_from(decayed).unwrap_or(i32::MAX));
        self.value = batch + (self.value - batch) * keep;
        self.count = after;
    }
}

#[derive(Debug)]
struct InstanceState {
    /// Sequence number of the last report that sampled it.
    seen: u64,
    /// The counters sampled (by their base), and their last sample.
    base: Instant,
    last: Totals,
    /// When `last` was sampled (or the counters started).
    at: Instant,
    /// Picks per second, as of `at`.
    rate: f64,
    service: Mean,
}

impl Tracker {
    /// A tracker for node `node_id` in its `incarnation` (a value that grows
    /// with every start, e.g. the start time in ms), created at `now`.
    pub fn new(node_id: u64, incarnation: u64, config: &Config, now: Instant) -> Self {
        Self {
            node_id,
            incarnation,
            seq: 0,
            long_after: config.long_after.as_secs_f64(),
            rate_window: config.rate_window.as_secs_f64().max(1e-3),
            epoch: now,
            service: Mean::default(),
            instances: HashMap::new(),
        }
    }

    /// The next report, as of `now`, stamped with the wall clock
    /// `sent_at_ms`, from the counters of every instance this node serves
    /// (`(uuid, counters)`; an instance listed twice counts once). Idle
    /// instances are left out, and instances no longer listed are
    /// forgotten.
    pub fn report<'a, I>(&mut self, now: Instant, sent_at_ms: u64, instances: I) -> Report
    where
        I: IntoIterator<Item = ([u8; 16], &'a LoadCounters)>,
    {
        self.seq += 1;
        let (seq, window, epoch) = (self.seq, self.rate_window, self.epoch);
        // Instances never picked have nothing to tell: leaving them out
        // keeps a report's cost to the instances that carried work, not
        // every instance the node routes to (100,000 on a large table,
        // sorted and looked up at every heartbeat).
        let mut sampled: Vec<([u8; 16], &LoadCounters)> = instances
            .into_iter()
            .filter(|(_, counters)| counters.used())
            .collect();
        sampled.sort_unstable_by_key(|(id, _)| *id);
        sampled.dedup_by_key(|(id, _)| *id);

        // Rates and service times from the counts since the last sample.
        let (mut completions, mut service) = (0u64, 0.0f64);
        for &(id, counters) in &sampled {
            let totals = counters.totals();
            let state = self.instances.entry(id).or_insert_with(|| InstanceState {
                seen: seq,
                base: counters.base(),
                last: Totals::default(),
                at: counters.base().max(epoch),
                rate: 0.0,
                service: Mean::default(),
            });
            // Other counters under the same id (a new backend) start over.
            if state.base != counters.base() {
                state.base = counters.base();
                state.last = Totals::default();
            }
            let delta = totals.since(state.last);
            let (picks, done) = (delta.picks, delta.completions);
            let took = delta.service_us as f64 / 1e6;
            let elapsed = now.saturating_duration_since(state.at).as_secs_f64();
            let decay = (-elapsed / window).exp();
            // Picks spread evenly over the interval weigh on average
            // (1 − decay)·window/elapsed each.
            let spread = if elapsed > 0.0 {
                (1.0 - decay) * window / elapsed
            } else {
                1.0
            };
            state.rate = state.rate * decay + picks as f64 / window * spread;
            state.service.absorb(done, took);
            state.last = totals;
            state.at = now;
            state.seen = seq;
            completions += done;
            service += took;
        }
        self.service.absorb(completions, service);

        // The averages start at 0 when the node starts: scale them up by the
        // part of the window that has passed since (bias correction).
        let since = now.saturating_duration_since(epoch).as_secs_f64();
        let warmup = (1.0 - (-since / window).exp()).max(0.05);
        let (fallback, ceiling) = (self.service, self.long_after);
        let mut entries = Vec::new();
        for &(id, counters) in &sampled {
            let Some(state) = self.instances.get(&id) else {
                continue;
            };
            let mean = state.mean_service(fallback);
            let threshold =
                Duration::try_from_secs_f64(threshold(mean, ceiling)).unwrap_or(Duration::MAX);
            let inflight = counters.inflight();
            let young = counters.young(now, threshold);
            let rate_milli = (state.rate / warmup * 1000.0).round() as u32;
            let inflight = u32::try_from(inflight).unwrap_or(u32::MAX);
            if inflight == 0 && rate_milli == 0 {
                continue;
            }
            let young = u32::try_from(young).unwrap_or(u32::MAX);
            entries.push(Entry {
                instance: id,
                inflight,
                long_inflight: inflight.saturating_sub(young),
                arrival_rate_milli: rate_milli,
                mean_service_us: (mean * 1e6).round() as u32,
            });
        }
        self.instances.retain(|_, s| s.seen == seq);
        Report {
            node_id: self.node_id,
            incarnation: self.incarnation,
            seq,
            sent_at_ms,
            entries,
        }
    }
}

impl InstanceState {
    /// Mean service time in s: the instance's own once it has seen a few
    /// completions, else the node-wide one (0: unknown).
    fn mean_service(&self, node_wide: Mean) -> f64 {
        if self.service.count >= MIN_COMPLETIONS {
            self.service.value
        } else {
            node_wide.value
        }
    }
}

/// Age in s after which work with mean service time `service` is
/// long-lived.
fn threshold(service: f64, ceiling: f64) -> f64 {
    if service > 0.0 {
        (LONG_FACTOR * service)
            .max(LONG_FLOOR.as_secs_f64())
            .min(ceiling)
    } else {
        ceiling
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

    fn counters(t0: Instant) -> (LoadCounters, LoadCounters) {
        let c = config();
        (
            LoadCounters::new(t0, c.long_after),
            LoadCounters::new(t0, c.long_after),
        )
    }

    #[test]
    fn counts_and_long_lived_part() {
        let t0 = Instant::now();
        let (a, b) = counters(t0);
        let mut t = Tracker::new(9, 4, &config(), t0);
        let a1 = a.start(t0);
        let _a2 = a.start(t0);
        let b1 = b.start(t0 + ms(100));
        let r = t.report(t0 + ms(100), 1234, [(B, &b), (A, &a)]);
        assert_eq!(
            (r.node_id, r.incarnation, r.seq, r.sent_at_ms),
            (9, 4, 1, 1234)
        );
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[0].instance, A, "sorted by instance");
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (2, 0));
        // 200 ms on, A's two are long-lived (no service time known: the
        // threshold is long_after), B's is not.
        let r = t.report(t0 + ms(200), 0, [(A, &a), (B, &b)]);
        assert_eq!(r.seq, 2);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (2, 2));
        assert_eq!((r.entries[1].inflight, r.entries[1].long_inflight), (1, 0));
        a.finish(a1, t0 + ms(210));
        b.finish(b1, t0 + ms(210));
        let r = t.report(t0 + ms(400), 0, [(A, &a), (B, &b)]);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (1, 1));
        // Reports are valid wire reports; a duplicate listing counts once.
        let r = t.report(t0 + ms(400), 0, [(A, &a), (B, &b), (A, &a)]);
        assert_eq!(decode(&encode(&r).unwrap()).unwrap(), r);
        // An instance no longer listed is left out.
        let r = t.report(t0 + ms(400), 0, [(B, &b)]);
        assert!(r.entries.iter().all(|e| e.instance == B));
    }

    #[test]
    fn instances_never_picked_are_not_sampled_or_tracked() {
        let t0 = Instant::now();
        let c = config();
        let idle: Vec<LoadCounters> = (0..1000)
            .map(|_| LoadCounters::new(t0, c.long_after))
            .collect();
        let (a, _) = counters(t0);
        let _work = a.start(t0);
        let mut t = Tracker::new(1, 1, &c, t0);
        let listed = idle
            .iter()
            .enumerate()
            .map(|(i, k)| ((i as u128 + 100).to_be_bytes(), k))
            .chain([(A, &a)]);
        let r = t.report(t0 + ms(10), 0, listed);
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.entries[0].instance, A);
        assert_eq!(t.instances.len(), 1, "only the instance that carried work");
        // Once picked, an instance is sampled from then on.
        let w = idle[7].start(t0 + ms(20));
        idle[7].finish(w, t0 + ms(30));
        let r = t.report(t0 + ms(40), 0, [(B, &idle[7]), (A, &a)]);
        assert_eq!(t.instances.len(), 2);
        assert!(
            r.entries
                .iter()
                .any(|e| e.instance == B && e.arrival_rate_milli > 0)
        );
    }

    #[test]
    fn rate_and_service_time() {
        let t0 = Instant::now();
        let (a, _) = counters(t0);
        let mut t = Tracker::new(1, 1, &config(), t0);
        // 500 picks/s for 2 s, each in flight for 4 ms, reported every 50 ms.
        for i in 0..1000u64 {
            let at = t0 + ms(2 * i);
            let s = a.start(at);
            a.finish(s, at + ms(4));
            if i % 25 == 24 {
                let _ = t.report(at + ms(1), 0, [(A, &a)]);
            }
        }
        let r = t.report(t0 + ms(2000), 0, [(A, &a)]);
        let e = r.entries[0];
        assert!((480_000..=510_000).contains(&e.arrival_rate_milli), "{e:?}");
        assert_eq!(e.mean_service_us, 4000);
        assert_eq!(e.inflight, 0);
        // Work in flight for more than 8 × 4 ms is long-lived.
        let s = a.start(t0 + ms(2000));
        let r = t.report(t0 + ms(2020), 0, [(A, &a)]);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (1, 0));
        let r = t.report(t0 + ms(2060), 0, [(A, &a)]);
        assert_eq!((r.entries[0].inflight, r.entries[0].long_inflight), (1, 1));
        // Work that ends within long_after counts as service time, long-lived
        // or not (weight 1/32 in the moving average)...
        a.finish(s, t0 + ms(2060));
        let r = t.report(t0 + ms(2060), 0, [(A, &a)]);
        assert_eq!(r.entries[0].mean_service_us, 5750);
        // ...work that outlasts long_after does not.
        let s = a.start(t0 + ms(2060));
        a.finish(s, t0 + ms(3000));
        assert_eq!(
            t.report(t0 + ms(3000), 0, [(A, &a)]).entries[0].mean_service_us,
            5750
        );
        // An idle instance is left out once its rate has faded.
        let r = t.report(t0 + Duration::from_secs(60), 0, [(A, &a)]);
        assert!(r.entries.is_empty());
    }

    #[test]
    fn service_time_is_learnt_after_fast_first_requests() {
        // A few instant requests first (health checks, say), then only
        // 100 ms ones. Counting only work shorter than 8 × the mean so far
        // (20 ms) would never see the 100 ms requests: they would all be
        // reported long-lived and never decay in the peers' estimates.
        let t0 = Instant::now();
        let config = Config::default();
        let a = LoadCounters::new(t0, config.long_after);
        let mut t = Tracker::new(1, 1, &config, t0);
        for i in 0..10 {
            let s = a.start(t0 + ms(i));
            a.finish(s, t0 + ms(i + 1));
        }
        let _ = t.report(t0 + ms(20), 0, [(A, &a)]);
        let mut at = t0 + ms(20);
        for _ in 0..200 {
            let s = a.start(at);
            a.finish(s, at + ms(100));
            at += ms(10);
            let _ = t.report(at + ms(100), 0, [(A, &a)]);
        }
        let e = t.report(at + ms(100), 0, [(A, &a)]).entries[0];
        assert!((95_000..=101_000).contains(&e.mean_service_us), "{e:?}");
        // Work 200 ms old is not long-lived at that pace (8 × 100 ms).
        let s = a.start(at + ms(100));
        let e = t.report(at + ms(300), 0, [(A, &a)]).entries[0];
        assert_eq!((e.inflight, e.long_inflight), (1, 0));
        a.finish(s, at + ms(300));
    }

    #[test]
    fn new_instance_uses_node_wide_service_time() {
        let t0 = Instant::now();
        let (a, b) = counters(t0);
        let mut t = Tracker::new(1, 1, &config(), t0);
        for i in 0..10 {
            let s = a.start(t0 + ms(i));
            a.finish(s, t0 + ms(i + 10));
        }
        let _b = b.start(t0 + ms(20));
        let r = t.report(t0 + ms(20), 0, [(A, &a), (B, &b)]);
        assert_eq!(r.entries[1].instance, B);
        assert_eq!(r.entries[1].mean_service_us, 10_000);
    }

    #[test]
    fn batched_mean_matches_one_by_one() {
        let mut one = Mean::default();
        let mut batched = Mean::default();
        let mut pending = (0u64, 0.0f64);
        for i in 0..200u64 {
            let took = if i < 50 { 0.010 } else { 0.020 };
            one.absorb(1, took);
            pending = (pending.0 + 1, pending.1 + took);
            // Batches of 7 with equal values inside each batch only
            // approximately; flush at value changes to compare exactly.
            if i % 7 == 6 || i == 49 || i == 199 {
                batched.absorb(pending.0, pending.1);
                pending = (0, 0.0);
            }
        }
        assert_eq!(one.count, batched.count);
        assert!(
            (one.value - batched.value).abs() < 1e-12,
            "{one:?} {batched:?}"
        );
        assert!((one.value - 0.020).abs() < 0.001);
    }
}
