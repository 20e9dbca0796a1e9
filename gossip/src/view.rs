//! The refresh's incremental form of the estimator: one [`GroupView`] per
//! group turns a [`LoadTable::snapshot`] into fixed-point peer loads, for
//! selection and for admission.
//!
//! ```text
//!  LoadTable::snapshot (brief lock: one Arc clone per peer)
//!      │ per peer: new report? ──yes──▶ rebuild its terms for this group
//!      ▼                                (a merge of two sorted lists)
//!  per tick: decay every term by the report's age (no lookups)
//!      │ D(i) = Σ_p decayed(p,i)
//!      │ pour the peers' expected new picks onto D (water level L)
//!      ▼
//!  select(i) = max(D(i), L)                     (Estimator docs)
//!  admit(i)  = Σ_{p heard within silence} decayed(p,i)
//! ```
//!
//! **Fractional.** The estimate is kept in fixed point ([`LOAD_ONE`] = 1)
//! down to the balancer's keys: rounding each instance's peer load to a
//! whole count made instances a fraction apart look equal, and equal ones
//! a whole request apart. With reports of age 0 nothing is poured and
//! nothing decays: `select(i)` is the exact sum of the reported counts, in
//! whole units, so selection is exactly the rule over local + reported
//! counts (SPEC §3 (a)), ties and all.
//!
//! **Not this node's own counts.** Pouring the peers' picks onto `own + D`
//! (the load they balanced against) was measured in the simulator with this
//! node's current counts, with its last reported counts, and with either
//! weighted by how much of the peers' picks are recent: every variant is
//! worse than local counts alone once reports are older than a couple of
//! service times (3 nodes 70/20/10, 20 ms one-way: 1.32–1.35× central
//! against 1.14× for local only), because the water then fills whatever
//! this node happens to have little on and erases its own exact counts, and
//! none is measurably better with fresh reports (`docs/gossip-sim.md`).
//!
//! **Admission** (`hard_limit`) counts only what peers reported, decayed,
//! and only from peers heard within [`GroupView::silence`]: a crashed
//! peer's predicted picks go on growing in the selection estimate until its
//! report expires, and they must not turn into refusals.
//!
//! Cost per tick: a multiply-add per reported (peer, instance) pair of the
//! group, one `exp` per peer and distinct mean service time (bucketed to
//! 0.5 %), and a sort of the group's instances for the water level; rebuilding a
//! peer's terms (a merge of its sorted entries with the group's sorted
//! instances) happens only when its report changed. No lock is held: the
//! caller owns the view.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::estimator::{Estimator, survival, water_level};
use crate::state::PeerReport;

/// Fractional bits of a fixed-point load.
pub const LOAD_FRAC_BITS: u32 = 16;
/// A load of 1 in fixed point.
pub const LOAD_ONE: u64 = 1 << LOAD_FRAC_BITS;

/// `x` (≥ 0) in fixed point; whole numbers exactly.
pub fn to_fixed(x: f64) -> u64 {
    // `as` saturates and maps NaN to 0; every input is finite and ≥ 0.
    (x * LOAD_ONE as f64).round() as u64
}

/// One group's estimate, kept between refreshes.
#[derive(Debug)]
pub struct GroupView {
    /// `(instance, slot)`, by instance: merged with a report's entries,
    /// which are in the same order.
    index: Vec<([u8; 16], u32)>,
    len: usize,
    /// Each peer's terms for this group, by the report they came from.
    peers: HashMap<u64, PeerTerms>,
    /// Scratch, per slot.
    decayed: Vec<f64>,
    admit: Vec<f64>,
}

/// Mean service times are grouped into buckets by the top `TAU_BITS` bits
/// of their mantissa, so that a tick takes one `exp` per bucket rather than
/// per term: buckets under 0.8 % wide, τ off by at most 0.4 %, far below
/// what an estimate resolves.
const TAU_BITS: u32 = 7;

/// One peer's report restricted to a group.
#[derive(Debug, Default)]
struct PeerTerms {
    version: u64,
    /// Per reported instance of the group, by τ bucket.
    terms: Vec<Term>,
    /// Runs of `terms` with one τ bucket: (end of the run, 1/τ in 1/s; 0
    /// when τ is unknown: no decay).
    runs: Vec<(usize, f64)>,
    /// Picks per second over the group, and Σ rate × τ.
    rate: f64,
    rate_tau: f64,
}

#[derive(Clone, Copy, Debug)]
struct Term {
    slot: u32,
    /// τ's bucket ([`bucket_of`]).
    bucket: u32,
    long: f64,
    /// In flight less the long-lived part.
    short: f64,
}

/// What a refresh computed for one instance, in fixed point
/// ([`LOAD_ONE`] = 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerLoad {
    /// The peers' part of the load, for selection.
    pub select: u64,
    /// The peers' part of the load, for admission.
    pub admit: u64,
}

impl GroupView {
    /// A view of the group of `instances` (in slot order).
    pub fn new(instances: &[[u8; 16]]) -> Self {
        let n = instances.len();
        Self {
            index: {
                let mut index: Vec<([u8; 16], u32)> = instances
                    .iter()
                    .enumerate()
                    .map(|(slot, id)| (*id, u32::try_from(slot).unwrap_or(u32::MAX)))
                    .collect();
                index.sort_unstable();
                index
            },
            len: n,
            peers: HashMap::new(),
            decayed: vec![0.0; n],
            admit: vec![0.0; n],
        }
    }

    /// Peers not heard from for this long are left out of admission: a
    /// live peer reports at least every `interval` (3 of them, so that a
    /// lost report or two do not count).
    pub fn silence(config: &crate::Config) -> Duration {
        config.interval * 3
    }

    /// The estimate at `now` by `config.estimator` from `peers` (a
    /// [`LoadTable::snapshot`]: reports older than `config.ttl` are left
    /// out); writes one [`PeerLoad`] per slot into `out`. Whether any peer
    /// was fresh.
    ///
    /// [`LoadTable::snapshot`]: crate::LoadTable::snapshot
    pub fn estimate(
        &mut self,
        config: &crate::Config,
        peers: &[(u64, Arc<PeerReport>)],
        now: Instant,
        out: &mut Vec<PeerLoad>,
    ) -> bool {
        let (estimator, silence) = (config.estimator, Self::silence(config));
        self.peers
            .retain(|id, _| peers.iter().any(|(p, _)| p == id));
        self.decayed.iter_mut().for_each(|d| *d = 0.0);
        self.admit.iter_mut().for_each(|d| *d = 0.0);
        let mut pour = 0.0f64;
        let mut fresh = false;
        for (id, report) in peers {
            let age = now.saturating_duration_since(report.as_of);
            if age > config.ttl {
                continue;
            }
            fresh = true;
            let terms = self.peers.entry(*id).or_default();
            if terms.version != report.version || terms.version == 0 {
                terms.rebuild(&self.index, report);
            }
            let heard = age <= silence;
            let a = age.as_secs_f64();
            let raw = estimator == Estimator::Raw;
            let mut start = 0;
            for &(end, inv_tau) in &terms.runs {
                let factor = if raw { 1.0 } else { (-a * inv_tau).exp() };
                for t in terms.terms.get(start..end).unwrap_or_default() {
                    let add = t.long + t.short * factor;
                    let slot = t.slot as usize;
                    self.decayed[slot] += add;
                    if heard {
                        self.admit[slot] += add;
                    }
                }
                start = end;
            }
            if estimator == Estimator::Predictive && terms.rate > 0.0 {
                let tau = terms.rate_tau / terms.rate;
                pour += if tau > 0.0 {
                    terms.rate * tau * (1.0 - survival(a, tau))
                } else {
                    terms.rate * a
                };
            }
        }
        out.clear();
        let level = if pour > 0.0 && self.len > 0 {
            water_level(&self.decayed, pour)
        } else {
            0.0
        };
        out.extend(
            self.decayed
                .iter()
                .zip(&self.admit)
                .map(|(&d, &a)| PeerLoad {
                    select: to_fixed(d.max(level)),
                    admit: to_fixed(a),
                }),
        );
        fresh
    }
}

impl PeerTerms {
    /// Rebuilds the terms from `report`: a merge of two sorted lists, the
    /// group's instances and the report's entries, O(n + m).
    fn rebuild(&mut self, index: &[([u8; 16], u32)], report: &PeerReport) {
        self.version = report.version;
        self.terms.clear();
        self.rate = 0.0;
        self.rate_tau = 0.0;
        let (mut slots, mut entries) = (index.iter().peekable(), report.entries.iter().peekable());
        while let (Some(&&(id, slot)), Some(&&e)) = (slots.peek(), entries.peek()) {
            match id.cmp(&e.instance) {
                std::cmp::Ordering::Less => {
                    slots.next();
                    continue;
                }
                std::cmp::Ordering::Greater => {
                    entries.next();
                    continue;
                }
                std::cmp::Ordering::Equal => {
                    slots.next();
                    entries.next();
                }
            }
            let tau = f64::from(e.mean_service_us) / 1e6;
            let rate = f64::from(e.arrival_rate_milli) / 1000.0;
            self.rate += rate;
            self.rate_tau += rate * tau;
            let long = e.long_inflight.min(e.inflight);
            self.terms.push(Term {
                slot,
                bucket: bucket_of(e.mean_service_us),
                long: f64::from(long),
                short: f64::from(e.inflight - long),
            });
        }
        self.terms.sort_unstable_by_key(|t| t.bucket);
        self.runs.clear();
        for (i, t) in self.terms.iter().enumerate() {
            match self.runs.last_mut() {
                Some((end, _)) if self.terms[i - 1].bucket == t.bucket => *end = i + 1,
                _ => self.runs.push((i + 1, inv_tau_of(t.bucket))),
            }
        }
    }
}

/// The bucket of a mean service time in µs: the top bits of the float
/// (exponent and [`TAU_BITS`] of mantissa), which order like τ. 0 is τ
/// unknown.
fn bucket_of(tau_us: u32) -> u32 {
    // A u32 as f64 has a biased exponent ≤ 1054 (11 bits): the key fits.
    (f64::from(tau_us).to_bits() >> (52 - TAU_BITS)) as u32
}

/// 1/τ in 1/s at the middle of `bucket` (0 for τ unknown).
fn inv_tau_of(bucket: u32) -> f64 {
    if bucket == 0 {
        return 0.0;
    }
    let mid = (u64::from(bucket) << (52 - TAU_BITS)) | (1 << (51 - TAU_BITS));
    1e6 / f64::from_bits(mid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ids, report};
    use crate::{Config, LoadTable};
    use proptest::prelude::*;

    fn run(
        view: &mut GroupView,
        config: &Config,
        table: &LoadTable,
        now: Instant,
    ) -> Vec<PeerLoad> {
        let mut out = Vec::new();
        view.estimate(config, &table.snapshot(), now, &mut out);
        out
    }

    #[test]
    fn tau_buckets_are_narrow_and_ordered() {
        let mut last = 0;
        for tau_us in (1..2_000_000u32).step_by(997) {
            let b = bucket_of(tau_us);
            assert!(b >= last);
            last = b;
            let tau = 1e6 / inv_tau_of(b);
            let err = (tau - f64::from(tau_us)).abs() / f64::from(tau_us);
            assert!(err <= 0.004, "{tau_us} µs in a bucket of {tau} µs");
        }
        assert_eq!(inv_tau_of(bucket_of(0)), 0.0);
    }

    #[test]
    fn fresh_reports_are_exact_whole_counts() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut table = LoadTable::new(config.ttl);
        table.insert(report(1, 1, &[(3, 1), (0, 0), (5, 0)], 800.0, 10), t0);
        table.insert(report(2, 1, &[(1, 0), (2, 2)], 50.0, 0), t0);
        let mut view = GroupView::new(&ids(3));
        let out = run(&mut view, &config, &table, t0);
        let select: Vec<u64> = out.iter().map(|l| l.select).collect();
        assert_eq!(select, [4 * LOAD_ONE, 2 * LOAD_ONE, 5 * LOAD_ONE]);
        assert!(out.iter().all(|l| l.admit == l.select));
    }

    #[test]
    fn only_a_new_report_changes_a_peers_terms() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut table = LoadTable::new(config.ttl);
        table.insert(report(1, 1, &[(3, 3), (1, 1)], 0.0, 10), t0);
        let mut view = GroupView::new(&ids(2));
        assert_eq!(run(&mut view, &config, &table, t0)[0].select, 3 * LOAD_ONE);
        table.insert(report(1, 2, &[(0, 0), (2, 2)], 0.0, 10), t0);
        let out = run(&mut view, &config, &table, t0);
        assert_eq!((out[0].select, out[1].select), (0, 2 * LOAD_ONE));
        // A removed peer counts for nothing.
        table.remove_peer(1);
        assert_eq!(run(&mut view, &config, &table, t0)[1].select, 0);
    }

    /// A peer that picked 1000/s and then fell silent (crashed): its
    /// predicted picks keep counting for selection until its report
    /// expires, never for admission; its reported work counts for admission
    /// until it has been silent for 3 heartbeats.
    #[test]
    fn admission_counts_no_predicted_picks_and_no_silent_peer() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut table = LoadTable::new(config.ttl);
        table.insert(report(1, 1, &[(4, 4), (0, 0)], 500.0, 100), t0);
        let mut view = GroupView::new(&ids(2));
        let early = run(&mut view, &config, &table, t0 + Duration::from_millis(100));
        assert!(early[1].select > 10 * LOAD_ONE, "{early:?}");
        assert_eq!(early[1].admit, 0);
        assert_eq!(early[0].admit, 4 * LOAD_ONE);
        let silent = t0 + GroupView::silence(&config) + Duration::from_millis(1);
        let late = run(&mut view, &config, &table, silent);
        assert!(late[1].select > 10 * LOAD_ONE, "{late:?}");
        assert_eq!((late[0].admit, late[1].admit), (0, 0));
    }

    proptest! {
        /// The incremental view gives the full estimator's peer loads, up
        /// to their rounding to whole counts (and τ's bucketing), at any
        /// age and after any sequence of reports.
        #[test]
        fn matches_the_estimator(
            rounds in prop::collection::vec(
                (0u64..4, prop::collection::vec((0u32..40, 0u32..40), 1..8), 0.0f64..5000.0, 0u32..500, 0u64..1200),
                1..6,
            ),
            estimator in prop::sample::select(vec![Estimator::Raw, Estimator::Decay, Estimator::Predictive]),
        ) {
            let t0 = Instant::now();
            let config = Config { estimator, ..Config::default() };
            let mut table = LoadTable::new(config.ttl);
            let mut view = GroupView::new(&ids(8));
            // The newest counts each node reported, per instance.
            let mut latest = HashMap::new();
            for (seq, (node, counts, rate, tau, age_ms)) in rounds.iter().enumerate() {
                let counts: Vec<_> = counts.iter().map(|&(a, b)| (a.max(b), a.min(b))).collect();
                table.insert(report(*node, seq as u64 + 1, &counts, *rate, *tau), t0);
                latest.insert(*node, counts.clone());
                let now = t0 + Duration::from_millis(*age_ms);
                let out = run(&mut view, &config, &table, now);
                let full = estimator.peer_loads(&table, &ids(8), now);
                for (i, (load, whole)) in out.iter().zip(full).enumerate() {
                    let x = load.select as f64 / LOAD_ONE as f64;
                    // τ in 0.5 % buckets moves a count c decayed by
                    // e^(-a/τ) by at most c · (a/τ) e^(-a/τ) · 0.5 % < 0.2 %
                    // of the count *reported* (not of the estimate, which
                    // decay has made smaller).
                    let reported: u32 = latest
                        .values()
                        .map(|c: &Vec<(u32, u32)>| c.get(i).map_or(0, |e| e.0))
                        .sum();
                    let slack = 0.5 + 0.002 * f64::from(reported.max(whole as u32)) + 1e-6;
                    prop_assert!((x - whole as f64).abs() <= slack, "{x} vs {whole}");
                    prop_assert!(load.admit <= load.select + 1);
                }
            }
        }
    }
}
