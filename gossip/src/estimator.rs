//! Peers' part of each instance's load, estimated from their last reports.
//!
//! A report of age `a` (from its receipt to `now`) says what the peer had in
//! flight then. Since then its short work has been completing and it has been
//! picking more. [`Estimator::Predictive`] models both, per peer `p` and
//! instance `i` of the group:
//!
//! ```text
//!   decayed(p,i) = long(p,i) + short(p,i) · e^(−a/τ(p,i))
//!   new(p)       = R(p) · τ(p) · (1 − e^(−a/τ(p)))       (R(p)·a when τ unknown)
//! ```
//!
//! `short` is the reported in-flight count less its long-lived part, `τ` the
//! peer's mean in-flight time of short work on that instance (so `1/τ` is the
//! completion rate of each piece of it), `R(p)` the peer's pick rate summed
//! over the group and `τ(p)` the rate-weighted mean of its `τ(p,i)`; `new(p)`
//! counts the picks made since the report that are still in flight. The
//! long-lived part never decays: it counts for as long as the peer reports
//! it, however short the mean request is.
//!
//! The peers pick by the same least-load rule, so their new picks land on the
//! least loaded instances: the sum of all `new(p)` is poured like water onto
//! `Σ_p decayed(p,i)`, raising the lowest instances to a common level, and
//! the peers' part of instance `i` is `Σ_p decayed(p,i)` plus the water it
//! holds (in fixed point for selection, see `GroupView`; rounded to whole
//! counts by [`Estimator::peer_loads`]).
//!
//! This node's own counts are deliberately not part of the ground the water
//! is poured on, though the peers saw them (as of this node's last report)
//! when they picked. Its current counts would let the water absorb its own
//! recent picks: an instance below the level would look no fuller after a
//! pick, and the node would spread its picks at random over everything below
//! the level. Its last reported counts are stale by the time they matter and
//! bias the node against instances it happened to use little back then. In
//! the simulator both are measurably worse than local counts alone when one
//! node carries most of the traffic; without them the estimate is never
//! worse than local-only and has the smallest view error.
//!
//! As `a → 0` the estimate is exactly the reported counts, so fresh reports
//! give exactly the rule over local + reported counts. As `a` grows it tends
//! to the peer's steady state `long + R·τ` spread where the load is lowest,
//! which is no worse a guide than local counts alone.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::state::LoadTable;

/// How a node turns its peers' reports into their part of an instance's load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Estimator {
    /// Reported counts as they are: the naive reading of the rule. Herds when
    /// reports are old relative to how fast counts change; kept for
    /// comparison.
    Raw,
    /// Reported counts less the expected completions since the report (the
    /// long-lived part kept), without the peers' new picks.
    Decay,
    /// Decay plus the peers' expected new picks since the report, placed on
    /// the least loaded instances (see the module docs). The default.
    #[default]
    Predictive,
}

impl Estimator {
    /// The peers' part of the load of each of a group's `instances` (in
    /// that order), from the fresh reports in `table` at `now`.
    pub fn peer_loads(self, table: &LoadTable, instances: &[[u8; 16]], now: Instant) -> Vec<u64> {
        let (peer, _) = self.estimate(table, instances, now, None);
        peer.iter().map(|&p| whole(p)).collect()
    }

    /// [`Estimator::peer_loads`] split by peer: for each of `instances`,
    /// every fresh peer's part (0 included), summing exactly to what
    /// `peer_loads` gives. A peer's part is what it reported, decayed, plus
    /// its share of the new picks poured onto the instance (in proportion
    /// to how many it was expected to make); whole counts are apportioned
    /// by largest remainder.
    pub fn peer_parts(
        self,
        table: &LoadTable,
        instances: &[[u8; 16]],
        now: Instant,
    ) -> Vec<BTreeMap<u64, u64>> {
        self.split(table, instances, None, now)
    }

    /// `totals` (whole counts, one per instance: e.g. the peer loads that
    /// selection uses) split among the fresh peers in proportion to their
    /// parts as [`Estimator::peer_parts`] estimates them.
    pub fn split_by_peer(
        self,
        table: &LoadTable,
        instances: &[[u8; 16]],
        totals: &[u64],
        now: Instant,
    ) -> Vec<BTreeMap<u64, u64>> {
        self.split(table, instances, Some(totals), now)
    }

    fn split(
        self,
        table: &LoadTable,
        instances: &[[u8; 16]],
        totals: Option<&[u64]>,
        now: Instant,
    ) -> Vec<BTreeMap<u64, u64>> {
        let mut parts = Vec::new();
        let (levelled, base) = self.estimate(table, instances, now, Some(&mut parts));
        let pour: f64 = parts.iter().map(|p| p.pour).sum();
        (0..instances.len())
            .map(|i| {
                let water = (levelled[i] - base[i]).max(0.0);
                let shares: Vec<(u64, f64)> = parts
                    .iter()
                    .map(|p| {
                        let poured = if pour > 0.0 {
                            water * p.pour / pour
                        } else {
                            0.0
                        };
                        (p.node_id, p.decayed[i] + poured)
                    })
                    .collect();
                let total = totals.map_or_else(|| whole(levelled[i]), |t| t[i]);
                apportion(total, &shares)
            })
            .collect()
    }

    /// Per instance, the peers' load after pouring and before it (the sum
    /// of the decayed reports); with `parts`, each peer's contribution.
    fn estimate(
        self,
        table: &LoadTable,
        instances: &[[u8; 16]],
        now: Instant,
        mut parts: Option<&mut Vec<PeerPart>>,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut peer = vec![0.0f64; instances.len()];
        let mut pour = 0.0f64;
        for (node_id, report) in table.fresh(now) {
            let mut decayed = parts.as_ref().map(|_| vec![0.0f64; instances.len()]);
            let age = now.saturating_duration_since(report.as_of).as_secs_f64();
            let (mut rate, mut rate_tau) = (0.0f64, 0.0f64);
            for (i, (load, instance)) in peer.iter_mut().zip(instances).enumerate() {
                let Some(e) = report.get(instance) else {
                    continue;
                };
                let inflight = f64::from(e.inflight);
                let add = if self == Self::Raw {
                    inflight
                } else {
                    let long = f64::from(e.long_inflight.min(e.inflight));
                    let tau = f64::from(e.mean_service_us) / 1e6;
                    let r = f64::from(e.arrival_rate_milli) / 1000.0;
                    rate += r;
                    rate_tau += r * tau;
                    long + (inflight - long) * survival(age, tau)
                };
                *load += add;
                if let Some(d) = decayed.as_mut() {
                    d[i] = add;
                }
            }
            let mut mine = 0.0;
            if self == Self::Predictive && rate > 0.0 {
                let tau = rate_tau / rate;
                mine = if tau > 0.0 {
                    rate * tau * (1.0 - survival(age, tau))
                } else {
                    rate * age
                };
                pour += mine;
            }
            if let (Some(parts), Some(decayed)) = (parts.as_deref_mut(), decayed) {
                parts.push(PeerPart {
                    node_id,
                    decayed,
                    pour: mine,
                });
            }
        }
        let base = peer.clone();
        if pour > 0.0 {
            let level = water_level(&peer, pour);
            for p in &mut peer {
                *p = p.max(level);
            }
        }
        (peer, base)
    }
}

/// One fresh peer's contribution to a group's estimate.
struct PeerPart {
    node_id: u64,
    /// Its decayed report, per instance.
    decayed: Vec<f64>,
    /// The new picks it is expected to have made since.
    pour: f64,
}

/// An estimate as a whole count. Rounding keeps fresh estimates exact; `as`
/// saturates (and maps NaN to 0), and every term is finite and ≥ 0.
fn whole(x: f64) -> u64 {
    x.round() as u64
}

/// Splits `total` into whole parts close to `shares` (largest remainder,
/// ties to the lower node id), one per share.
fn apportion(total: u64, shares: &[(u64, f64)]) -> BTreeMap<u64, u64> {
    let mut out: BTreeMap<u64, u64> = shares
        .iter()
        .map(|&(id, share)| (id, share.max(0.0).floor() as u64))
        .collect();
    let given: u64 = out.values().sum();
    let mut left = total.saturating_sub(given);
    let mut by_remainder: Vec<(u64, f64)> = shares
        .iter()
        .map(|&(id, share)| (id, share.max(0.0) - share.max(0.0).floor()))
        .collect();
    by_remainder.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (id, _) in by_remainder.iter().cycle().take(shares.len() * 2) {
        if left == 0 {
            break;
        }
        if let Some(part) = out.get_mut(id) {
            *part += 1;
            left -= 1;
        }
    }
    // Floors never exceed the rounded total (Σ⌊x⌋ ≤ ⌊Σx⌋), and the
    // remainders add at most one per peer; anything else would be a bug in
    // the arithmetic above, so the last peer absorbs it rather than the sum
    // drifting from `peer_loads`.
    let sum: u64 = out.values().sum();
    if sum != total
        && let Some((_, last)) = out.iter_mut().next_back()
    {
        *last = (*last + total).saturating_sub(sum);
    }
    out
}

/// Probability that work with mean remaining time `tau` (exponential) is
/// still in flight after `age`; 1 when `tau` is unknown (0).
pub(crate) fn survival(age: f64, tau: f64) -> f64 {
    if tau > 0.0 { (-age / tau).exp() } else { 1.0 }
}

/// The level `L` with `Σ max(0, L − base[i]) = amount`: pouring `amount` onto
/// `base` raises the lowest entries to `L`. `amount > 0`, `base` non-empty
/// for a meaningful result (an empty `base` gives 0).
pub fn water_level(base: &[f64], amount: f64) -> f64 {
    let mut sorted = base.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut filled = 0.0; // sum of the `n` lowest entries
    for (n, &b) in sorted.iter().enumerate() {
        // With the `n` lowest under water, reaching `b` costs n·b − filled.
        if n > 0 && (n as f64) * b - filled >= amount {
            return (amount + filled) / n as f64;
        }
        filled += b;
    }
    (amount + filled) / sorted.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ids, report};
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn water_level_fills_the_lowest() {
        assert_eq!(water_level(&[0.0, 0.0], 2.0), 1.0);
        assert_eq!(water_level(&[0.0, 4.0], 2.0), 2.0);
        assert_eq!(water_level(&[0.0, 1.0, 5.0], 3.0), 2.0);
        assert_eq!(water_level(&[3.0, 1.0, 5.0], 12.0), 7.0);
        assert_eq!(water_level(&[2.0], 0.5), 2.5);
        assert_eq!(water_level(&[], 1.0), 1.0);
    }

    #[test]
    fn fresh_reports_are_taken_as_they_are() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        table.insert(report(1, 1, &[(3, 1), (0, 0), (5, 0)], 800.0, 10), t0);
        table.insert(report(2, 1, &[(1, 0), (2, 2)], 50.0, 0), t0);
        for est in [Estimator::Raw, Estimator::Decay, Estimator::Predictive] {
            assert_eq!(est.peer_loads(&table, &ids(3), t0), [4, 2, 5], "{est:?}");
        }
    }

    #[test]
    fn short_work_decays_long_work_stays() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        // 20 short, 6 long on instance 0; the peer picks nothing any more.
        table.insert(report(1, 1, &[(26, 6)], 0.0, 10), t0);
        let later = t0 + Duration::from_millis(100); // ten mean service times
        assert_eq!(Estimator::Raw.peer_loads(&table, &ids(1), later), [26]);
        assert_eq!(Estimator::Decay.peer_loads(&table, &ids(1), later), [6]);
        assert_eq!(
            Estimator::Predictive.peer_loads(&table, &ids(1), later),
            [6]
        );
        // Until the report expires.
        let expired = t0 + Duration::from_millis(1001);
        assert_eq!(
            Estimator::Predictive.peer_loads(&table, &ids(1), expired),
            [0]
        );
    }

    #[test]
    fn new_picks_go_where_the_load_is_lowest() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        // Peer 1 picks 1000/s in all (250/s per instance), τ = 10 ms: in its
        // steady state it has 10 in flight. It reported none (it just started).
        table.insert(report(1, 1, &[(0, 0); 4], 250.0, 10), t0);
        // Peer 2 holds long-lived work and picks nothing.
        table.insert(
            report(2, 1, &[(0, 0), (2, 2), (8, 8), (20, 20)], 0.0, 10),
            t0,
        );
        let later = t0 + Duration::from_millis(200);
        let peer = Estimator::Predictive.peer_loads(&table, &ids(4), later);
        // 10 poured onto [0, 2, 8, 20]: level 6.
        assert_eq!(peer, [6, 6, 8, 20]);
        // Early on, only part of it: 10·(1 − e^−0.5) ≈ 3.9, level ≈ 2.97.
        let early = t0 + Duration::from_millis(5);
        assert_eq!(
            Estimator::Predictive.peer_loads(&table, &ids(4), early),
            [3, 3, 8, 20]
        );
        assert_eq!(
            Estimator::Decay.peer_loads(&table, &ids(4), later),
            [0, 2, 8, 20]
        );
    }

    #[test]
    fn unknown_service_time_does_not_decay() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        table.insert(report(1, 1, &[(4, 0), (0, 0)], 10.0, 0), t0);
        let later = t0 + Duration::from_millis(100);
        // 4 kept; 2 instances × 10/s × 0.1 s = 2 new picks, both on the idle one.
        assert_eq!(
            Estimator::Predictive.peer_loads(&table, &ids(2), later),
            [4, 2]
        );
    }

    #[test]
    fn parts_split_the_estimate_by_peer() {
        let t0 = Instant::now();
        let mut table = LoadTable::new(Duration::from_secs(1));
        // Peer 1 picks 1000/s over 4 instances with τ = 10 ms; peer 2 holds
        // long-lived work and picks nothing (as in the test above).
        table.insert(report(1, 1, &[(0, 0); 4], 250.0, 10), t0);
        table.insert(
            report(2, 1, &[(0, 0), (2, 2), (8, 8), (20, 20)], 0.0, 10),
            t0,
        );
        let later = t0 + Duration::from_millis(200);
        let parts = Estimator::Predictive.peer_parts(&table, &ids(4), later);
        let by_peer: Vec<Vec<u64>> = parts
            .iter()
            .map(|m| m.values().copied().collect())
            .collect();
        // Level 6: peer 1's water on the first two, topping up peer 2's 2.
        assert_eq!(by_peer, [vec![6, 0], vec![4, 2], vec![0, 8], vec![0, 20]]);
        // Fresh reports: the parts are the reported counts.
        let parts = Estimator::Predictive.peer_parts(&table, &ids(4), t0);
        assert_eq!(parts[2], BTreeMap::from([(1, 0), (2, 8)]));
        // Expired peers are left out.
        let expired = t0 + Duration::from_millis(1001);
        assert!(Estimator::Raw.peer_parts(&table, &ids(2), expired)[0].is_empty());
    }

    #[test]
    fn apportion_keeps_the_total() {
        let m = apportion(3, &[(1, 1.4), (2, 1.4)]);
        assert_eq!(m, BTreeMap::from([(1, 2), (2, 1)]));
        let m = apportion(0, &[(1, 0.2), (2, 0.2)]);
        assert_eq!(m, BTreeMap::from([(1, 0), (2, 0)]));
        let m = apportion(2, &[(5, 0.6), (3, 0.7), (4, 0.5)]);
        assert_eq!(m, BTreeMap::from([(3, 1), (4, 0), (5, 1)]));
    }

    proptest! {
        /// The parts of every estimator add up to its peer load exactly.
        #[test]
        fn parts_sum_to_peer_loads(
            peers in prop::collection::vec(
                (prop::collection::vec((0u32..40, 0u32..40), 1..8), 0.0f64..5000.0, 0u32..500),
                0..5,
            ),
            age_ms in 0u64..1000,
        ) {
            let t0 = Instant::now();
            let mut table = LoadTable::new(Duration::from_secs(1));
            for (node, (counts, rate, tau)) in peers.iter().enumerate() {
                let counts: Vec<_> = counts.iter().map(|&(a, b)| (a.max(b), a.min(b))).collect();
                table.insert(report(node as u64, 1, &counts, *rate, *tau), t0);
            }
            let now = t0 + Duration::from_millis(age_ms);
            for est in [Estimator::Raw, Estimator::Decay, Estimator::Predictive] {
                let loads = est.peer_loads(&table, &ids(8), now);
                let parts = est.peer_parts(&table, &ids(8), now);
                for (load, part) in loads.iter().zip(&parts) {
                    prop_assert_eq!(*load, part.values().sum::<u64>());
                    prop_assert_eq!(part.len(), peers.len());
                }
            }
        }

        /// Requirement (a): at age 0 every estimator is the reported sum.
        #[test]
        fn age_zero_is_exact(
            peers in prop::collection::vec(
                (prop::collection::vec((0u32..40, 0u32..40), 1..8), 0.0f64..5000.0, 0u32..500),
                0..4,
            ),
        ) {
            let t0 = Instant::now();
            let mut table = LoadTable::new(Duration::from_secs(1));
            for (node, (counts, rate, tau)) in peers.iter().enumerate() {
                let counts: Vec<_> = counts.iter().map(|&(a, b)| (a.max(b), a.min(b))).collect();
                table.insert(report(node as u64, 1, &counts, *rate, *tau), t0);
            }
            let raw: Vec<u64> = ids(8).iter().map(|i| table.reported(i, t0)).collect();
            for est in [Estimator::Raw, Estimator::Decay, Estimator::Predictive] {
                prop_assert_eq!(est.peer_loads(&table, &ids(8), t0), raw.clone());
            }
        }

        /// The long-lived part is a floor at any age within the TTL, and
        /// decay never adds load.
        #[test]
        fn long_lived_is_a_floor(
            counts in prop::collection::vec((0u32..40, 0u32..40), 1..8),
            rate in 0.0f64..5000.0,
            tau in 0u32..500,
            age_ms in 0u64..1000,
        ) {
            let t0 = Instant::now();
            let mut table = LoadTable::new(Duration::from_secs(1));
            let counts: Vec<_> = counts.iter().map(|&(a, b)| (a.max(b), a.min(b))).collect();
            table.insert(report(1, 1, &counts, rate, tau), t0);
            let now = t0 + Duration::from_millis(age_ms);
            let n = counts.len();
            let decay = Estimator::Decay.peer_loads(&table, &ids(n), now);
            let predictive = Estimator::Predictive.peer_loads(&table, &ids(n), now);
            for (i, &(inflight, long)) in counts.iter().enumerate() {
                prop_assert!(decay[i] >= u64::from(long));
                prop_assert!(decay[i] <= u64::from(inflight));
                prop_assert!(predictive[i] >= decay[i]);
            }
        }
    }
}
