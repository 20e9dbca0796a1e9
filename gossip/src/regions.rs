//! Gossip across regions: full reports inside a region, one aggregated
//! report per region across regions, so that a node's inbound grows with
//! its own region and the number of regions, not with the fleet.
//!
//! ```text
//!  region A: a1 a2 a3          region B: b1 b2
//!   a1 ⇄ a2 ⇄ a3 (own reports)  b1 ⇄ b2 (own reports)
//!   a_i sums its own report and its region peers' latest ones into
//!   region A's aggregate, and sends it to the B nodes assigned to it:
//!     a1 ─▶ b1, a2 ─▶ b2        b1 ─▶ a1, a3;  b2 ─▶ a2
//! ```
//!
//! [`plan`] decides, from the membership alone, whom a node sends what:
//! its own reports to every other member of its region, and its region's
//! aggregate to the members of other regions assigned to it. Members of
//! each other region are assigned round-robin (by id) over this region's
//! members (by id), so the cost of aggregating is spread; a member that
//! looks dead to this node (no fresh report) is skipped and the next one
//! covers its share, so a crashed aggregator costs its receivers one TTL
//! at most. Every member of a region computes the same plan from the same
//! membership; while two disagree (a membership change, a node that only
//! some see as dead), a receiver may hear two aggregates of one region and
//! keeps the latest only (the receiver's side is in the node crate).
//!
//! A receiver takes any report from a member of another region as that
//! region's aggregate: no flag on the wire, and a report in the name of
//! its sender as always (the certificate check is unchanged).
//!
//! **Large regions gossip as cells.** A region's own reports grow with
//! its size: at 100 members × 1,000 busy instances, 99 streams of deltas
//! and full reports (one at least every `gossip_interval`) are some
//! 50 MB/s into each node. [`cells`] therefore splits a region of more
//! than [`CELL_MAX`] members into `⌈n / CELL_MAX⌉` cells of nearly equal
//! size (members by id, dealt round-robin), and the plan treats each cell
//! as a region of its own: own reports inside a cell, one aggregate per
//! other cell. A node's inbound is then its cell's members plus one
//! stream per other cell and region (100 in one region: 13–14 + 6). The
//! price is the aggregates' staleness (their coalescing, see the node's
//! aggregator) between cells of one region. Every member computes the
//! same cells from the same membership; a region of up to [`CELL_MAX`]
//! members is one cell under its own name.
//!
//! [`aggregate`] sums reports: in-flight and long-lived counts and pick
//! rates add up; the mean service time is the pick-rate-weighted mean,
//! which is what the estimator's `τ(p)` of the sum is (SPEC §3 "Stale
//! load": a peer's expected new picks are `R·τ·(1 − e^(−a/τ))`).

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::Entry;

/// The most members a region has before it is split into cells.
pub const CELL_MAX: usize = 16;

/// The gossip group of every member of `members` (`(node id, region)`,
/// a member listed twice counts once): its region when the region has at
/// most [`CELL_MAX`] members, else `"{region}#{k}"`, one of the region's
/// `⌈n / CELL_MAX⌉` cells, the members (by id) dealt to them in turn.
/// [`plan`] takes these groups for regions.
pub fn cells<'a>(members: impl IntoIterator<Item = (u64, &'a str)>) -> BTreeMap<u64, String> {
    let members: BTreeMap<u64, &str> = members.into_iter().collect();
    let mut regions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (&id, &r) in &members {
        regions.entry(r).or_default().push(id);
    }
    let mut out = BTreeMap::new();
    for (region, ids) in regions {
        let n = ids.len().div_ceil(CELL_MAX);
        for (rank, id) in ids.into_iter().enumerate() {
            let group = if n <= 1 {
                region.to_owned()
            } else {
                format!("{region}#{}", rank % n)
            };
            out.insert(id, group);
        }
    }
    out
}

/// Whom a node sends what.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Members of this node's region (itself excluded): its own reports.
    pub own: BTreeSet<u64>,
    /// Members of other regions: its region's aggregate.
    pub aggregate: BTreeSet<u64>,
}

impl Plan {
    /// What goes to `peer`, if anything.
    pub fn stream(&self, peer: u64) -> Option<Stream> {
        if self.own.contains(&peer) {
            Some(Stream::Own)
        } else if self.aggregate.contains(&peer) {
            Some(Stream::Aggregate)
        } else {
            None
        }
    }
}

/// What a link carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The node's own reports.
    Own,
    /// Its region's aggregate.
    Aggregate,
}

/// The plan of node `me` in a membership of `(node id, region)` (`me`
/// included; a member listed twice counts once), where `alive(id)` says
/// whether a member of `me`'s region looks alive to `me` (`me` always
/// does).
pub fn plan<'a>(
    me: u64,
    members: impl IntoIterator<Item = (u64, &'a str)>,
    alive: impl Fn(u64) -> bool,
) -> Plan {
    let members: BTreeMap<u64, &str> = members.into_iter().collect();
    let Some(&mine) = members.get(&me) else {
        return Plan::default();
    };
    let region: Vec<u64> = members
        .iter()
        .filter(|&(_, r)| *r == mine)
        .map(|(&id, _)| id)
        .collect();
    let mut others: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (&id, &r) in &members {
        if r != mine {
            others.entry(r).or_default().push(id);
        }
    }
    let up: Vec<bool> = region.iter().map(|&id| id == me || alive(id)).collect();
    let mut plan = Plan {
        own: region.iter().copied().filter(|&id| id != me).collect(),
        aggregate: BTreeSet::new(),
    };
    let k = region.len();
    for targets in others.values() {
        for (j, &target) in targets.iter().enumerate() {
            // The first live member from the target's slot on.
            let sender = (0..k)
                .map(|t| (j + t) % k)
                .find(|&i| up[i])
                .map(|i| region[i]);
            if sender == Some(me) {
                plan.aggregate.insert(target);
            }
        }
    }
    plan
}

/// One instance's sums over several reports.
#[derive(Debug, Default)]
struct Sum {
    inflight: u64,
    long: u64,
    rate: u64,
    /// Σ rate × service time, for the rate-weighted mean.
    weighted: f64,
    /// Σ service time and how many reports knew one, for instances no
    /// report has a rate for.
    plain: f64,
    known: u32,
}

/// The sum of several reports' entries (each sorted by instance), sorted
/// by instance.
pub fn aggregate<'a>(reports: impl IntoIterator<Item = &'a [Entry]>) -> Vec<Entry> {
    let mut sums: BTreeMap<[u8; 16], Sum> = BTreeMap::new();
    for entries in reports {
        for e in entries {
            let s = sums.entry(e.instance).or_default();
            s.inflight += u64::from(e.inflight);
            s.long += u64::from(e.long_inflight);
            s.rate += u64::from(e.arrival_rate_milli);
            s.weighted += f64::from(e.arrival_rate_milli) * f64::from(e.mean_service_us);
            if e.mean_service_us > 0 {
                s.plain += f64::from(e.mean_service_us);
                s.known += 1;
            }
        }
    }
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    sums.into_iter()
        .map(|(instance, s)| {
            let service = if s.rate > 0 {
                s.weighted / s.rate as f64
            } else if s.known > 0 {
                s.plain / f64::from(s.known)
            } else {
                0.0
            };
            let inflight = clamp(s.inflight);
            Entry {
                instance,
                inflight,
                long_inflight: clamp(s.long).min(inflight),
                arrival_rate_milli: clamp(s.rate),
                mean_service_us: service.round() as u32,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(regions: &[(&'static str, &[u64])]) -> Vec<(u64, &'static str)> {
        regions
            .iter()
            .flat_map(|&(r, ids)| ids.iter().map(move |&id| (id, r)))
            .collect()
    }

    #[test]
    fn each_node_hears_its_region_and_one_aggregate_per_other_region() {
        let members = fleet(&[("a", &[1, 2, 3]), ("b", &[4, 5]), ("c", &[6, 7, 8, 9])]);
        let plans: BTreeMap<u64, Plan> = members
            .iter()
            .map(|&(id, _)| (id, plan(id, members.iter().copied(), |_| true)))
            .collect();
        let region = |id: u64| members.iter().find(|m| m.0 == id).unwrap().1;
        for &(receiver, r) in &members {
            let mut own = BTreeSet::new();
            let mut aggregates: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for (&sender, p) in &plans {
                match p.stream(receiver) {
                    Some(Stream::Own) => {
                        own.insert(sender);
                    }
                    Some(Stream::Aggregate) => {
                        aggregates.entry(region(sender)).or_default().push(sender)
                    }
                    None => {}
                }
            }
            let peers: BTreeSet<u64> = members
                .iter()
                .filter(|m| m.1 == r && m.0 != receiver)
                .map(|m| m.0)
                .collect();
            assert_eq!(own, peers, "node {receiver}");
            assert_eq!(aggregates.len(), 2, "node {receiver}: {aggregates:?}");
            assert!(aggregates.values().all(|s| s.len() == 1), "{aggregates:?}");
            assert!(!aggregates.contains_key(r));
        }
        // The work is spread: region c's 4 members share regions a and b's
        // 5 nodes.
        let sent: Vec<usize> = [6, 7, 8, 9]
            .iter()
            .map(|id| plans[id].aggregate.len())
            .collect();
        assert_eq!(sent.iter().sum::<usize>(), 5);
        assert!(sent.iter().all(|&n| n <= 2), "{sent:?}");
    }

    #[test]
    fn a_dead_aggregator_is_covered_by_the_next_member() {
        let members = fleet(&[("a", &[1, 2]), ("b", &[3, 4])]);
        let all = plan(1, members.iter().copied(), |_| true);
        assert_eq!(all.aggregate, BTreeSet::from([3]));
        let two_dead = plan(1, members.iter().copied(), |id| id != 2);
        assert_eq!(two_dead.aggregate, BTreeSet::from([3, 4]));
        assert_eq!(two_dead.own, BTreeSet::from([2]), "still told its own");
        // One region: everyone hears everyone, nobody aggregates.
        let one = fleet(&[("local", &[1, 2, 3])]);
        let p = plan(2, one.iter().copied(), |_| true);
        assert_eq!(
            (p.own, p.aggregate),
            (BTreeSet::from([1, 3]), BTreeSet::new())
        );
        // Not a member (yet): nothing to send.
        assert_eq!(plan(9, one.iter().copied(), |_| true), Plan::default());
    }

    #[test]
    fn a_large_region_is_split_into_cells_of_at_most_cell_max() {
        let small: Vec<(u64, &str)> = (1..=CELL_MAX as u64).map(|id| (id, "a")).collect();
        let c = cells(small.iter().copied().chain([(99, "b")]));
        assert!(small.iter().all(|&(id, _)| c[&id] == "a"), "{c:?}");
        assert_eq!(c[&99], "b");
        // 100 members of one region: 7 cells of 14 or 15.
        let big: Vec<(u64, &str)> = (1..=100).map(|id| (id * 3, "big")).collect();
        let c = cells(big.iter().copied());
        let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
        for g in c.values() {
            *sizes.entry(g.as_str()).or_default() += 1;
        }
        assert_eq!(sizes.len(), 7, "{sizes:?}");
        assert!(sizes.values().all(|&n| (14..=15).contains(&n)), "{sizes:?}");
        assert!(sizes.keys().all(|g| g.starts_with("big#")));
        // The plan on cells: 100 nodes hear their cell and 6 aggregates.
        let groups: Vec<(u64, &str)> = c.iter().map(|(&id, g)| (id, g.as_str())).collect();
        let plans: BTreeMap<u64, Plan> = groups
            .iter()
            .map(|&(id, _)| (id, plan(id, groups.iter().copied(), |_| true)))
            .collect();
        for &(receiver, g) in &groups {
            let own = plans.values().filter(|p| p.own.contains(&receiver)).count();
            let aggregates = plans
                .values()
                .filter(|p| p.aggregate.contains(&receiver))
                .count();
            assert_eq!(own, sizes[g] - 1, "node {receiver}");
            assert_eq!(aggregates, 6, "node {receiver}");
        }
    }

    #[test]
    fn aggregates_add_up_with_a_rate_weighted_service_time() {
        let e = |id: u8, inflight, long, rate, service| Entry {
            instance: [id; 16],
            inflight,
            long_inflight: long,
            arrival_rate_milli: rate,
            mean_service_us: service,
        };
        let a = [e(1, 3, 1, 1000, 10_000), e(2, 1, 0, 0, 0)];
        let b = [e(1, 2, 2, 3000, 20_000), e(3, 4, 0, 0, 5000)];
        let sum = aggregate([&a[..], &b[..]]);
        assert_eq!(
            sum,
            [
                e(1, 5, 3, 4000, 17_500),
                e(2, 1, 0, 0, 0),
                e(3, 4, 0, 0, 5000)
            ]
        );
        assert!(aggregate([]).is_empty());
    }
}
