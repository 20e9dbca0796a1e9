//! The refresh's incremental form of the estimator: a [`ViewSet`] keeps
//! every group's view and turns a [`LoadTable::snapshot`] into fixed-point
//! peer loads, for selection and for admission; a [`GroupView`] is the
//! same for one group.
//!
//! ```text
//!  LoadTable::snapshot (brief lock: one Arc clone per peer)
//!      │ per peer: new report? ──yes──▶ resolve it once into terms
//!      ▼                      (instance → group and position: an index)
//!  per tick: decay every term by the report's age (no lookups)
//!      │ D(i) = Σ_p decayed(p,i)
//!      │ pour the peers' expected new picks onto D (water level L)
//!      ▼
//!  select(i) = max(D(i), L)                     (Estimator docs)
//!  admit(i)  = Σ_{p heard within silence} decayed(p,i)
//! ```
//!
//! [`LoadTable::snapshot`]: crate::LoadTable::snapshot
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
//! **Layout.** A tick streams each peer's terms, one flat list per peer,
//! into one flat list of sums for every group's slots (a group's slots at
//! its own offset), and then pours and calls back only the groups that
//! some peer's terms touch (and, once, a group just set or one that lost
//! its last terms). Cost per tick: a multiply-add per term, one
//! `exp` per peer and distinct τ bucket (decay) and per distinct mean τ of
//! a group's picks (the pour), and a sort of each touched group's slots for
//! the water level. Terms are rebuilt only when a peer's report changed,
//! and an instance's place is looked up in the index only when the report
//! before did not list it. No lock is held: the caller owns the set.
//! Keeping each peer's terms per group instead (a map of peers per group,
//! two small vectors each) made a tick over 1,000 touched groups walk some
//! 4 MB of scattered memory: 2–5 ms per tick, against 0.5–1 ms this way
//! (`benches/refresh.rs`, `many_groups`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

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

/// Mean service times are grouped into buckets by the top `TAU_BITS` bits
/// of their mantissa, so that a tick takes one `exp` per bucket rather than
/// per term: buckets under 0.8 % wide, τ off by at most 0.4 %, far below
/// what an estimate resolves.
const TAU_BITS: u32 = 7;

/// What a refresh computed for one instance, in fixed point
/// ([`LOAD_ONE`] = 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerLoad {
    /// The peers' part of the load, for selection.
    pub select: u64,
    /// The peers' part of the load, for admission.
    pub admit: u64,
}

/// One group's estimate, kept between refreshes: a [`ViewSet`] of that
/// group alone.
#[derive(Debug)]
pub struct GroupView {
    set: ViewSet<()>,
    len: usize,
}

impl GroupView {
    /// A view of the group of `instances` (in slot order).
    pub fn new(instances: &[[u8; 16]]) -> Self {
        let mut set = ViewSet::default();
        set.set_group((), instances);
        Self {
            set,
            len: instances.len(),
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
        let mut called = false;
        let fresh = self.set.refresh(config, peers, now, |(), loads| {
            out.clear();
            out.extend_from_slice(loads);
            called = true;
        });
        // Not called back: no peer has terms in the group now or had at
        // the refresh before, whose estimate was then all zero.
        if !called {
            out.clear();
            out.resize(self.len, PeerLoad::default());
        }
        fresh
    }
}

/// The views of all of a node's groups, keyed by `K`, as the refresh keeps
/// them. A peer's report lists its busy instances of every group; each new
/// one is resolved once into terms, each at its instance's place in the
/// sums (see the module's docs), and a tick estimates only the groups some
/// peer's terms touch (and a group once after it lost its last, or was
/// set). Searching every new report once per group instead cost 1.33 s per
/// tick at 10,000 groups and 20 peers (`benches/refresh.rs`,
/// `many_groups`).
#[derive(Debug)]
pub struct ViewSet<K> {
    /// Key → index in `held`.
    keys: HashMap<K, usize>,
    /// The groups, in the order they were set (a refresh calls back in
    /// index order, run after run: the simulator's runs repeat); `None`
    /// where one was removed, for the next to take.
    held: Vec<Option<Held<K>>>,
    /// Indexes of `held` that are `None`.
    free: Vec<usize>,
    /// Per index of `held`: where its slots' sums start, and how many it
    /// has room for (kept when a group is removed, for the next there,
    /// until the sums are packed).
    ranges: Vec<(u32, u32)>,
    /// Instance → its group's index and its slot.
    owner: FxHashMap<[u8; 16], (u32, u32)>,
    /// The groups' instances, all told (what packed sums would hold).
    live: u64,
    /// Per peer by id: its last report's terms.
    peers: Vec<(u64, PeerTerms)>,
    /// Counts changes of groups: terms resolved before one are stale.
    epoch: u64,
    /// Per slot of every group (at its range): decayed sum, and the
    /// admitted part (side by side: a term touches one cache line).
    /// Scratch of a tick.
    sums: Vec<[f64; 2]>,
    /// Scratch: a group's decayed sums, for the water level.
    decayed: Vec<f64>,
    /// Per group index: the peers' expected new picks. Scratch of a tick.
    pour: Vec<f64>,
    /// Per group index, a bit: a peer's terms touch it at this tick.
    touched: Vec<u64>,
    /// Per group index, a bit: to call back at the next tick even if no
    /// term touches it (it had some, or it was just set).
    pending: Vec<u64>,
    /// Scratch of resolving a report.
    resolve: Resolve,
    /// Scratch of a tick, per peer: its decay factors by τ bucket and its
    /// survivals by mean τ.
    factors: Vec<f64>,
    survivals: Vec<f64>,
    out: Vec<PeerLoad>,
}

#[derive(Debug)]
struct Held<K> {
    key: K,
    /// Its instances in slot order (for the index).
    ids: Vec<[u8; 16]>,
}

/// One peer's report, resolved against the groups.
#[derive(Debug, Default)]
struct PeerTerms {
    /// The report it was built from (0: build again).
    version: u64,
    /// The epoch of the groups `places` was resolved in.
    epoch: u64,
    /// Each instance of the report (sorted, as reports are) and its place:
    /// group index and position in the sums, or [`NOWHERE`].
    places: Vec<([u8; 16], (u32, u32))>,
    terms: Vec<Term>,
    /// 1/τ in 1/s of each distinct τ bucket of the terms (0: τ unknown).
    inv_taus: Vec<f64>,
    /// One per group the report has terms in.
    segs: Vec<Seg>,
    /// Each distinct mean τ (s) of the segments.
    seg_taus: Vec<f64>,
}

/// Not an instance of any group.
const NOWHERE: (u32, u32) = (u32::MAX, u32::MAX);

#[derive(Clone, Copy, Debug)]
struct Term {
    /// Position in the sums.
    pos: u32,
    /// Index of its τ bucket in [`PeerTerms::inv_taus`].
    k: u32,
    long: f64,
    /// In flight less the long-lived part.
    short: f64,
}

/// A peer's picks over one group.
#[derive(Clone, Copy, Debug)]
struct Seg {
    at: u32,
    /// Picks per second over the group, and Σ rate × τ.
    rate: f64,
    rate_tau: f64,
    /// Index of its mean τ in [`PeerTerms::seg_taus`].
    k: u32,
}

/// Scratch of resolving a report, kept to reuse its allocations.
#[derive(Debug, Default)]
struct Resolve {
    places: Vec<([u8; 16], (u32, u32))>,
    buckets: FxHashMap<u32, u32>,
    taus: FxHashMap<u64, u32>,
    /// Per group index: (stamp, index in the segments); a stale stamp is
    /// no segment yet.
    seg_of: Vec<(u64, u32)>,
    stamp: u64,
}

impl<K> Default for ViewSet<K> {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            held: Vec::new(),
            free: Vec::new(),
            ranges: Vec::new(),
            owner: FxHashMap::default(),
            live: 0,
            peers: Vec::new(),
            epoch: 0,
            sums: Vec::new(),
            decayed: Vec::new(),
            pour: Vec::new(),
            touched: Vec::new(),
            pending: Vec::new(),
            resolve: Resolve::default(),
            factors: Vec::new(),
            survivals: Vec::new(),
            out: Vec::new(),
        }
    }
}

/// Sets bit `at`; whether it was clear.
fn set_bit(bits: &mut [u64], at: usize) -> bool {
    let (word, bit) = (at / 64, 1u64 << (at % 64));
    let clear = bits[word] & bit == 0;
    bits[word] |= bit;
    clear
}

fn clear_bit(bits: &mut [u64], at: usize) {
    if let Some(word) = bits.get_mut(at / 64) {
        *word &= !(1u64 << (at % 64));
    }
}

impl<K: Clone + Eq + Hash> ViewSet<K> {
    /// Sets group `key` to `instances` (in slot order), new or replacing
    /// the one of that key: estimated at the next refresh, which resolves
    /// every peer's report anew (a write is rare beside reports). An
    /// instance belongs to one group (the state machine refuses a uuid
    /// attached twice): a group set later takes an id from one set before.
    pub fn set_group(&mut self, key: K, instances: &[[u8; 16]]) {
        self.remove_group(&key);
        self.epoch += 1;
        let at = match self.free.pop() {
            Some(at) => at,
            None => {
                self.held.push(None);
                self.ranges.push((0, 0));
                self.pour.push(0.0);
                self.resolve.seg_of.push((0, 0));
                if self.held.len() > self.touched.len() * 64 {
                    self.touched.push(0);
                    self.pending.push(0);
                }
                self.held.len() - 1
            }
        };
        let len = u32::try_from(instances.len()).unwrap_or(u32::MAX);
        if self.ranges[at].1 < len {
            self.make_room(at, len);
        }
        for (slot, id) in instances.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            self.owner.insert(*id, (at as u32, slot));
        }
        self.keys.insert(key.clone(), at);
        self.live += instances.len() as u64;
        self.held[at] = Some(Held {
            key,
            ids: instances.to_vec(),
        });
        set_bit(&mut self.pending, at);
    }

    /// Gives group index `at` a range of `len` slots in the sums: a new
    /// one at their end, and every live group's packed anew once the holes
    /// outgrow the live ranges by 4,096 slots (positions move: the caller's
    /// change of groups makes every report resolve again).
    fn make_room(&mut self, at: usize, len: u32) {
        self.ranges[at] = (0, 0);
        if self.sums.len() as u64 > 2 * self.live + 4_096 {
            let mut end = 0u32;
            for (i, range) in self.ranges.iter_mut().enumerate() {
                let cap = self.held[i].as_ref().map_or(0, |h| h.ids.len() as u32);
                *range = (end, cap);
                end += cap;
            }
            self.sums.truncate(end as usize);
        }
        let base = u32::try_from(self.sums.len()).unwrap_or(u32::MAX);
        self.ranges[at] = (base, len);
        self.sums.resize(self.sums.len() + len as usize, [0.0; 2]);
    }

    /// Whether `instance` is in one of the groups set.
    pub fn holds(&self, instance: &[u8; 16]) -> bool {
        self.owner.contains_key(instance)
    }

    /// Removes group `key` and its instances' index entries.
    pub fn remove_group(&mut self, key: &K) {
        let Some(at) = self.keys.remove(key) else {
            return;
        };
        self.epoch += 1;
        let Some(old) = self.held.get_mut(at).and_then(Option::take) else {
            return;
        };
        self.free.push(at);
        self.live -= old.ids.len() as u64;
        clear_bit(&mut self.pending, at);
        for id in &old.ids {
            if self.owner.get(id).is_some_and(|(i, _)| *i as usize == at) {
                self.owner.remove(id);
            }
        }
    }

    /// The refresh at `now` from `peers` (a [`LoadTable::snapshot`]):
    /// calls `loads` with every group whose peer loads may have changed
    /// and its loads (one per slot). Whether any peer was fresh.
    ///
    /// [`LoadTable::snapshot`]: crate::LoadTable::snapshot
    pub fn refresh(
        &mut self,
        config: &crate::Config,
        peers: &[(u64, Arc<PeerReport>)],
        now: Instant,
        mut loads: impl FnMut(&K, &[PeerLoad]),
    ) -> bool {
        debug_assert!(peers.is_sorted_by_key(|(id, _)| *id), "a snapshot is by id");
        let listed = |id: &u64| peers.binary_search_by_key(id, |(p, _)| *p).is_ok();
        self.peers.retain(|(id, _)| listed(id));
        let silence = GroupView::silence(config);
        let mut fresh = false;
        // Peers are visited by id, as the snapshot is: every sum comes out
        // the same whichever groups share the set.
        let mut mine = 0;
        for (id, report) in peers {
            let age = now.saturating_duration_since(report.as_of);
            let live = age <= config.ttl;
            fresh |= live;
            if mine == self.peers.len() || self.peers[mine].0 != *id {
                self.peers.insert(mine, (*id, PeerTerms::default()));
            }
            let terms = &mut self.peers[mine].1;
            mine += 1;
            // A report past the TTL counts for nothing: its terms are
            // dropped, so that a silent peer keeps no group estimated.
            if !live {
                terms.clear();
                continue;
            }
            if terms.version != report.version || terms.epoch != self.epoch {
                terms.build(
                    report,
                    self.epoch,
                    &self.owner,
                    &self.ranges,
                    &mut self.resolve,
                );
            }
            let a = age.as_secs_f64();
            let heard = age <= silence;
            self.add(config.estimator, mine - 1, a, heard);
        }
        for word in 0..self.touched.len() {
            let mut bits = self.touched[word] | self.pending[word];
            self.pending[word] = self.touched[word];
            self.touched[word] = 0;
            while bits != 0 {
                let at = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let Some(held) = &self.held[at] else {
                    continue;
                };
                let (base, len) = (self.ranges[at].0 as usize, held.ids.len());
                self.out.clear();
                if self.pending[word] & (1 << (at % 64)) == 0 {
                    // No terms now: all zero, once.
                    self.out.resize(len, PeerLoad::default());
                } else {
                    let sums = &self.sums[base..base + len];
                    let pour = self.pour[at];
                    let level = if pour > 0.0 && len > 0 {
                        self.decayed.clear();
                        self.decayed.extend(sums.iter().map(|&[d, _]| d));
                        water_level(&self.decayed, pour)
                    } else {
                        0.0
                    };
                    self.out.extend(sums.iter().map(|&[d, a]| PeerLoad {
                        select: to_fixed(d.max(level)),
                        admit: to_fixed(a),
                    }));
                }
                loads(&held.key, &self.out);
            }
        }
        fresh
    }

    /// Adds the terms of peer number `p` (in `self.peers`) at age `a`
    /// seconds into the sums, clearing each group's the first time a tick
    /// touches it.
    fn add(&mut self, estimator: Estimator, p: usize, a: f64, heard: bool) {
        let terms = &self.peers[p].1;
        for seg in &terms.segs {
            let at = seg.at as usize;
            if set_bit(&mut self.touched, at) {
                let (base, len) = self.ranges[at];
                self.sums[base as usize..(base + len) as usize].fill([0.0; 2]);
                self.pour[at] = 0.0;
            }
        }
        let raw = estimator == Estimator::Raw;
        self.factors.clear();
        self.factors.extend(
            terms
                .inv_taus
                .iter()
                .map(|&inv_tau| if raw { 1.0 } else { (-a * inv_tau).exp() }),
        );
        for t in &terms.terms {
            let add = t.long + t.short * self.factors[t.k as usize];
            let sum = &mut self.sums[t.pos as usize];
            sum[0] += add;
            if heard {
                sum[1] += add;
            }
        }
        if estimator == Estimator::Predictive {
            self.survivals.clear();
            self.survivals
                .extend(terms.seg_taus.iter().map(|&tau| survival(a, tau)));
            for seg in &terms.segs {
                if seg.rate > 0.0 {
                    let tau = seg.rate_tau / seg.rate;
                    self.pour[seg.at as usize] += if tau > 0.0 {
                        seg.rate * tau * (1.0 - self.survivals[seg.k as usize])
                    } else {
                        seg.rate * a
                    };
                }
            }
        }
    }
}

impl PeerTerms {
    fn clear(&mut self) {
        self.version = 0;
        self.places.clear();
        self.clear_terms();
    }

    /// Drops the terms, keeping the places resolved.
    fn clear_terms(&mut self) {
        self.terms.clear();
        self.inv_taus.clear();
        self.segs.clear();
        self.seg_taus.clear();
    }

    /// Builds the terms of `report` against the groups of `epoch`: each
    /// instance's place looked up in `owner` unless the report this peer
    /// sent before listed it (and the groups have not changed since).
    fn build(
        &mut self,
        report: &PeerReport,
        epoch: u64,
        owner: &FxHashMap<[u8; 16], (u32, u32)>,
        ranges: &[(u32, u32)],
        scratch: &mut Resolve,
    ) {
        if self.epoch != epoch {
            self.places.clear();
        }
        self.clear_terms();
        self.version = report.version;
        self.epoch = epoch;
        let Resolve {
            places,
            buckets,
            taus,
            seg_of,
            stamp,
        } = scratch;
        // Both lists are sorted by instance: one merge, unless the report
        // lists the same instances as the one before (the usual case).
        let same = self.places.len() == report.entries.len()
            && (self.places.iter())
                .zip(&report.entries)
                .all(|((id, _), e)| *id == e.instance);
        if !same {
            places.clear();
            let mut before = 0;
            for e in &report.entries {
                while (self.places.get(before)).is_some_and(|(id, _)| *id < e.instance) {
                    before += 1;
                }
                let place = match self.places.get(before) {
                    Some((id, place)) if *id == e.instance => *place,
                    _ => owner
                        .get(&e.instance)
                        .map_or(NOWHERE, |&(at, slot)| (at, ranges[at as usize].0 + slot)),
                };
                places.push((e.instance, place));
            }
            std::mem::swap(&mut self.places, places);
        }
        *stamp += 1;
        buckets.clear();
        for (e, &(_, (at, pos))) in report.entries.iter().zip(&self.places) {
            if at == u32::MAX {
                continue;
            }
            let tau = f64::from(e.mean_service_us) / 1e6;
            let rate = f64::from(e.arrival_rate_milli) / 1000.0;
            let seg = &mut seg_of[at as usize];
            if seg.0 != *stamp {
                *seg = (*stamp, self.segs.len() as u32);
                self.segs.push(Seg {
                    at,
                    rate: 0.0,
                    rate_tau: 0.0,
                    k: u32::MAX,
                });
            }
            let s = &mut self.segs[seg.1 as usize];
            s.rate += rate;
            s.rate_tau += rate * tau;
            let bucket = bucket_of(e.mean_service_us);
            let k = *buckets.entry(bucket).or_insert_with(|| {
                self.inv_taus.push(inv_tau_of(bucket));
                (self.inv_taus.len() - 1) as u32
            });
            let long = e.long_inflight.min(e.inflight);
            self.terms.push(Term {
                pos,
                k,
                long: f64::from(long),
                short: f64::from(e.inflight - long),
            });
        }
        taus.clear();
        for seg in &mut self.segs {
            if seg.rate > 0.0 {
                let tau = seg.rate_tau / seg.rate;
                seg.k = *taus.entry(tau.to_bits()).or_insert_with(|| {
                    self.seg_taus.push(tau);
                    (self.seg_taus.len() - 1) as u32
                });
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
    use crate::testutil::{id, ids, report};
    use crate::{Config, Entry, LoadTable, Report};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

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

    /// What [`a_set_gives_each_group_its_own_estimate`] does at a step.
    #[derive(Clone, Debug)]
    enum Op {
        /// A report of `node`: per instance, (in flight, long-lived).
        Report {
            node: u64,
            counts: BTreeMap<usize, (u32, u32)>,
            rate: u32,
            tau: u32,
        },
        /// The peer leaves the table.
        Leave(u64),
        /// The group is set anew.
        Regroup(usize, u8),
        /// The group is removed.
        Remove(usize),
        /// Time passes (ms): reports expire after a second.
        Pass(u64),
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

    /// A refresh calls back, in the order the groups were set, each group
    /// some peer reports load on, and once more a group just set or one
    /// that lost its last load; no other.
    #[test]
    fn only_groups_with_load_are_called_back_and_once_more_after() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut table = LoadTable::new(config.ttl);
        let mut set = ViewSet::default();
        for g in 0..3usize {
            set.set_group(g, &[id(g)]);
        }
        let calls = |set: &mut ViewSet<usize>, table: &LoadTable| {
            let mut called = Vec::new();
            set.refresh(&config, &table.snapshot(), t0, |g, loads| {
                called.push((*g, loads[0].select / LOAD_ONE));
            });
            called
        };
        // Set: all three once; then none.
        assert_eq!(calls(&mut set, &table), [(0, 0), (1, 0), (2, 0)]);
        assert_eq!(calls(&mut set, &table), []);
        // Load on groups 2 and 0: those, in order, at every refresh (a
        // report lists busy instances only).
        let mut r = report(1, 1, &[(4, 0), (0, 0), (2, 0)], 0.0, 10);
        r.entries.retain(|e| e.instance != id(1));
        table.insert(r, t0);
        assert_eq!(calls(&mut set, &table), [(0, 4), (2, 2)]);
        assert_eq!(calls(&mut set, &table), [(0, 4), (2, 2)]);
        // Group 0 loses its load: once more, at zero.
        let mut r = report(1, 2, &[(0, 0), (0, 0), (3, 0)], 0.0, 10);
        r.entries.retain(|e| e.instance == id(2));
        table.insert(r, t0);
        assert_eq!(calls(&mut set, &table), [(0, 0), (2, 3)]);
        assert_eq!(calls(&mut set, &table), [(2, 3)]);
        // A group removed is not called back; one set again is, once.
        set.remove_group(&2);
        assert_eq!(calls(&mut set, &table), []);
        set.set_group(2, &[id(2)]);
        assert_eq!(calls(&mut set, &table), [(2, 3)]);
        table.remove_peer(1);
        assert_eq!(calls(&mut set, &table), [(2, 0)]);
        assert_eq!(calls(&mut set, &table), []);
    }

    /// Groups that grow leave their old ranges of sums behind; once those
    /// are most of the sums, the live groups are packed anew. Every group
    /// keeps its exact counts through it, and the sums stop growing.
    #[test]
    fn growing_groups_are_packed_and_keep_their_counts() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut table = LoadTable::new(config.ttl);
        let counts: Vec<(u32, u32)> = (0..6_000).map(|i| (1 + (i % 5) as u32, 0)).collect();
        table.insert(report(1, 1, &counts, 0.0, 10), t0);
        let mut set = ViewSet::default();
        // Group 0 or 2 (moved from one key to the other at each step, so
        // that an index is freed and taken again): every third instance;
        // group 1 grows over the rest.
        let small: Vec<[u8; 16]> = (0..6_000).step_by(3).map(id).collect();
        let mut small_key = 0;
        set.set_group(small_key, &small);
        let mut most = 0;
        for n in (500..=4_000).step_by(500) {
            set.remove_group(&small_key);
            small_key = 2 - small_key;
            set.set_group(small_key, &small);
            let members: Vec<[u8; 16]> =
                (0..6_000).filter(|i| i % 3 != 0).take(n).map(id).collect();
            set.set_group(1, &members);
            most = most.max(set.sums.len());
            let mut got = HashMap::new();
            set.refresh(&config, &table.snapshot(), t0, |g, loads| {
                got.insert(
                    *g,
                    loads
                        .iter()
                        .map(|l| l.select / LOAD_ONE)
                        .collect::<Vec<_>>(),
                );
            });
            assert_eq!(got.len(), 2, "only the groups there are");
            for (g, ids) in [(small_key, &small), (1, &members)] {
                let want: Vec<u64> = ids
                    .iter()
                    .map(|i| u64::from(counts[usize::from(i[15]) | usize::from(i[14]) << 8].0))
                    .collect();
                assert_eq!(got[&g], want, "group {g} at {n}");
            }
        }
        // Without packing the sums would hold 2,000 + 500 + … + 4,000.
        assert!(most < 2_000 + 18_000, "{most} sums");
        assert!(set.sums.len() <= 2 * (2_000 + 4_000) + 4_096 + 4_000);
    }

    /// A group's instances are found in a report of every group's busy
    /// instances, small group or large: their exact counts, and nothing
    /// for an instance the report leaves out.
    #[test]
    fn a_groups_instances_are_found_in_a_long_report() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut table = LoadTable::new(config.ttl);
        let count = |i: usize| (1 + (i % 7) as u32, (i % 2) as u32);
        let counts: Vec<(u32, u32)> = (0..2_000).map(count).collect();
        table.insert(report(1, 1, &counts, 0.0, 10), t0);
        let expect = |slots: &[usize]| -> Vec<u64> {
            slots
                .iter()
                .map(|&i| {
                    if i < 2_000 {
                        u64::from(count(i).0) * LOAD_ONE
                    } else {
                        0
                    }
                })
                .collect()
        };
        // In slot order, not sorted; 2,500 and 4,000 not reported.
        let small = [1_999, 3, 250, 2_500, 251, 0, 4_000, 1_000];
        let large: Vec<usize> = (0..3_000).rev().step_by(3).collect();
        for slots in [&small[..], &large[..]] {
            let instances: Vec<[u8; 16]> = slots.iter().map(|&i| id(i)).collect();
            let mut view = GroupView::new(&instances);
            let out = run(&mut view, &config, &table, t0);
            let select: Vec<u64> = out.iter().map(|l| l.select).collect();
            assert_eq!(select, expect(slots), "{} instances", slots.len());
        }
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

    /// The estimate of the group of `members` computed the plain way, for
    /// each slot a sum over the peers straight from their reports, in the
    /// same order of operations as the view (so equal to the bit).
    fn reference(
        config: &Config,
        peers: &[(u64, Arc<PeerReport>)],
        now: Instant,
        members: &[[u8; 16]],
    ) -> Vec<PeerLoad> {
        let mut decayed = vec![0.0f64; members.len()];
        let mut admit = vec![0.0f64; members.len()];
        let mut pour = 0.0f64;
        for (_, report) in peers {
            let age = now.saturating_duration_since(report.as_of);
            if age > config.ttl {
                continue;
            }
            let a = age.as_secs_f64();
            let (mut rate, mut rate_tau) = (0.0f64, 0.0f64);
            for e in &report.entries {
                let Some(slot) = members.iter().position(|m| *m == e.instance) else {
                    continue;
                };
                let tau = f64::from(e.mean_service_us) / 1e6;
                let r = f64::from(e.arrival_rate_milli) / 1000.0;
                rate += r;
                rate_tau += r * tau;
                let factor = match config.estimator {
                    Estimator::Raw => 1.0,
                    _ => (-a * inv_tau_of(bucket_of(e.mean_service_us))).exp(),
                };
                let long = e.long_inflight.min(e.inflight);
                let add = f64::from(long) + f64::from(e.inflight - long) * factor;
                decayed[slot] += add;
                if age <= GroupView::silence(config) {
                    admit[slot] += add;
                }
            }
            if config.estimator == Estimator::Predictive && rate > 0.0 {
                let tau = rate_tau / rate;
                pour += if tau > 0.0 {
                    rate * tau * (1.0 - survival(a, tau))
                } else {
                    rate * a
                };
            }
        }
        let level = if pour > 0.0 && !members.is_empty() {
            water_level(&decayed, pour)
        } else {
            0.0
        };
        decayed
            .iter()
            .zip(&admit)
            .map(|(&d, &a)| PeerLoad {
                select: to_fixed(d.max(level)),
                admit: to_fixed(a),
            })
            .collect()
    }

    proptest! {
        /// A [`ViewSet`] over several groups gives each group exactly the
        /// loads a fresh [`GroupView`] of the group computes from the same
        /// reports, and [`reference`] the plain way, through any sequence
        /// of reports, peers leaving, reports expiring, groups set anew
        /// (other slots, fewer instances) and removed; a group it does not
        /// call back keeps the loads of its last call.
        #[test]
        fn a_set_gives_each_group_its_own_estimate(
            ops in prop::collection::vec(
                prop_oneof![
                    4 => (0u64..4, prop::collection::btree_map(0usize..40, (0u32..9, 0u32..3), 0..30), 0u32..3000, 0u32..300)
                        .prop_map(|(node, counts, rate, tau)| Op::Report { node, counts, rate, tau }),
                    1 => (0u64..4).prop_map(Op::Leave),
                    1 => (0usize..4, any::<u8>()).prop_map(|(g, keep)| Op::Regroup(g, keep)),
                    1 => (0usize..4).prop_map(Op::Remove),
                    1 => (0u64..1500).prop_map(Op::Pass),
                ],
                1..30,
            ),
            estimator in prop::sample::select(vec![Estimator::Raw, Estimator::Decay, Estimator::Predictive]),
        ) {
            let t0 = Instant::now();
            let config = Config { estimator, ..Config::default() };
            let mut table = LoadTable::new(config.ttl);
            let mut set = ViewSet::default();
            // Group g: instances i with i % 4 == g, in some slot order.
            let mut groups: HashMap<usize, Vec<[u8; 16]>> = HashMap::new();
            for g in 0..4 {
                let members: Vec<[u8; 16]> = (0..40).filter(|i| i % 4 == g).map(id).collect();
                set.set_group(g, &members);
                groups.insert(g, members);
            }
            let mut last: HashMap<usize, Vec<PeerLoad>> = HashMap::new();
            let mut clock = t0;
            for (step, op) in ops.iter().enumerate() {
                match op {
                    Op::Report { node, counts, rate, tau } => {
                        let entries = counts
                            .iter()
                            .map(|(&i, &(inflight, long))| Entry {
                                instance: id(i),
                                inflight: inflight.max(long),
                                long_inflight: long.min(inflight),
                                arrival_rate_milli: *rate,
                                mean_service_us: tau * 1000,
                            })
                            .collect();
                        let r = Report { node_id: *node, incarnation: 1, seq: step as u64 + 1, sent_at_ms: 0, entries };
                        table.insert(r, clock);
                    }
                    Op::Leave(node) => table.remove_peer(*node),
                    Op::Regroup(g, keep) => {
                        // Its own instances (or all of them, the group
                        // gone before), a few left out, in another order.
                        let mut members: Vec<[u8; 16]> = (0..40)
                            .filter(|i| i % 4 == *g && (i / 4) % 8 != usize::from(*keep) % 8)
                            .map(id)
                            .collect();
                        let turn = usize::from(*keep) % members.len().max(1);
                        members.rotate_left(turn);
                        set.set_group(*g, &members);
                        groups.insert(*g, members);
                    }
                    Op::Pass(ms) => clock += Duration::from_millis(*ms),
                    Op::Remove(g) => {
                        set.remove_group(g);
                        groups.remove(g);
                        last.remove(g);
                    }
                }
                clock += Duration::from_millis(3);
                let now = clock;
                let peers = table.snapshot();
                set.refresh(&config, &peers, now, |g, loads| {
                    last.insert(*g, loads.to_vec());
                });
                for (g, members) in &groups {
                    let mut fresh = GroupView::new(members);
                    let mut want = Vec::new();
                    fresh.estimate(&config, &peers, now, &mut want);
                    let got = last.get(g).cloned().unwrap_or_else(|| vec![PeerLoad::default(); members.len()]);
                    prop_assert_eq!(&got, &want, "group {} after {:?}", g, op);
                    prop_assert_eq!(&want, &reference(&config, &peers, now, members), "group {}", g);
                }
            }
        }

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
