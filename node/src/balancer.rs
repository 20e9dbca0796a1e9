//! Least in-flight selection with a uniform random tie-break (SPEC §3).
//!
//! For a new connection (TCP mode) or request (HTTP mode) to a group:
//!
//! 1. candidates are the attached instances minus those passively marked
//!    down; when every instance is down, all of them are candidates again;
//! 2. `load(i) = local_inflight(i) + peer_load(i)`;
//! 3. the instance is drawn uniformly from the candidates of minimum load;
//! 4. it counts in flight from [`GroupBalancer::pick`] until its [`Lease`]
//!    is dropped;
//! 5. if the minimum load is `>= hard_limit`, nothing is selected
//!    ([`Pick::Overloaded`]; a `hard_limit` of 0 refuses everything). With
//!    gossip, that minimum is checked on the *admission* load: local counts
//!    plus what peers reported (decayed), without their predicted picks,
//!    so a crashed peer's phantom load never refuses a request; when the
//!    estimate is at the limit but some candidate has room by that count,
//!    the candidate with the least admission load is taken (an O(n) scan,
//!    only near the limit).
//!
//! # Structure
//!
//! ```text
//!  pick(now, rng) ──► GroupBalancer ── Mutex<Inner> (per group & table) ──┐
//!        │              │  slots: [Arc<Backend>; n], down-until           │
//!        │              │  tree:  MinTree over key(slot)     (tree.rs)    │
//!        │              └─ expiries: heap of (down-until, slot)           │
//!        ▼                                                                │
//!     Lease ── Drop ──► local_inflight -= 1, refresh key ─────────────────┘
//!        │
//!        └─ pick and release bump the backend's LoadCounters (atomics) and
//!           mark the node's LoadChanged flag for the gossip sender
//! ```
//!
//! Loads are fixed point (`gossip::LOAD_ONE` = 1, 16 fractional bits):
//! local counts are whole, the peers' part is the gossip estimate, kept
//! fractional so that estimates a fraction apart are told apart; whole
//! loads tie exactly, so with fresh reports the rule is the seed's. Each
//! slot's key is `load + (DOWN_PENALTY if down)`, with the penalty (2^62)
//! above any real load, so the minimum of the keys is the minimum over
//! the up instances when there is one and over all instances otherwise: the
//! "all down ⇒ all candidates" clause needs no special case. The tree keeps
//! per node the minimum key below it and how many leaves carry it, so a pick
//! draws one rank in the tie set at the root and walks down to that leaf:
//! exactly uniform over the minimum set, O(log n), one random number. A pick
//! increments the instance's count and a release decrements it, each
//! rewriting one leaf-to-root path, O(log n).
//!
//! # Locking
//!
//! There is no global lock: each group has its own mutex around its tree,
//! held for one O(log n) walk or path update and never across I/O or an
//! `.await`. This is the shape of HAProxy's `leastconn`, whose servers sit in
//! an ordered tree under a per-backend lock; we take the same trade. A
//! lock-free scheme (for example sampling two instances) would not implement
//! the rule, which asks for the exact minimum set, and sharding one group's
//! counts would make the minimum approximate. Traffic to different groups
//! never contends; within one group the critical sections are a few hundred
//! nanoseconds even at 100 000 instances (see `benches/balancer.rs`).
//!
//! The counts themselves are atomics on [`Backend`], so the admin API,
//! metric scrapes and the gossip sender read them without the lock. Every
//! tree key is computed under the lock from the current atomics, and every
//! change of an atomic is followed by such a refresh, so the tree converges
//! to the counts even when a release's decrement runs concurrently with a
//! pick.
//!
//! # Down marking
//!
//! A failed connect ([`GroupBalancer::mark_down`]) takes the instance down for
//! a backoff of 1 s, doubling with each consecutive failure up to 30 s; a
//! successful connect ([`GroupBalancer::mark_up`]) resets it. A failure
//! reported while the instance is already down (work that had selected it
//! before it went down) belongs to the same outage and does not double the
//! backoff again; the next failure after the down time ends does. Decision
//! code has no clock: `now` is an argument. Down periods end lazily: each
//! pick first pops the expired entries of a small heap of down-until
//! instants, O(log n) per entry.
//!
//! # Attach and detach
//!
//! The routing table never changes a published balancer's set: each change
//! of a group's instances builds a new balancer over the new set
//! ([`GroupBalancer::over`], O(n), touching nothing) that is published with
//! the new table, so a table's balancer offers exactly the instances that
//! table can serve. The per-instance state lives in [`Backend`], shared by
//! the old and new balancers, so counts and down marks carry over.
//!
//! Each backend has a *home*: the balancer of the newest table holding it,
//! set by [`GroupBalancer::adopt`] right after that table is published. A
//! pick, release or down mark re-keys the slot in the balancer that picked
//! (from the lease) and in the home, so the newest tree stays exact however
//! old the table a request or lease started from; `adopt` re-keys every slot
//! once, which covers what changed before the home moved. Older balancers
//! stay exact for their own picks; a backend detached since one was built is
//! dropped from its tree by the first pick that meets it. All of this costs
//! nothing until a balancer is *stale* (a newer one adopted some of its
//! backends, or one of them drains, each flagged under its lock): before
//! that, it is its backends' home, and a pick or release only re-keys from
//! the counts. Each backend's home sits behind a small mutex of its own,
//! taken on those stale paths, on down marks, and on peer loads of a
//! backend not at its place in the list the refresh gives.
//!
//! A detached backend's leases still decrement its count when dropped, so
//! the admin API can show what a draining instance still has in flight;
//! [`start_drain`] bounds how long that may last. [`GroupBalancer::set_backends`]
//! replaces a balancer's set in place (tests, the simulator).

mod backend;
mod tree;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use gossip::{LOAD_FRAC_BITS, LOAD_ONE, PeerLoad, Started};
use rand::Rng;
use tokio::sync::Notify;
use tracing::debug;

/// Backends re-keyed per lock by [`GroupBalancer::set_peer_loads`]: a
/// pick waits at most this many tree updates (a few µs).
const BATCH: usize = 64;

use backend::Down;
pub use backend::{Backend, BackendState, INITIAL_BACKOFF, MAX_BACKOFF, start_drain};
use tree::MinTree;

/// The balancer of one group: its attached backends and the selection tree.
#[derive(Debug)]
pub struct GroupBalancer {
    hard_limit: AtomicU32,
    inner: Mutex<Inner>,
    /// Told of every pick and release (the gossip sender's wake-up).
    changes: Option<Arc<LoadChanged>>,
}

/// "Some in-flight count changed": a node-wide flag that picks and releases
/// raise and the gossip sender takes down when it builds a report.
///
/// Raising an already raised flag is one atomic load of a line that is
/// written about once per report, so picks share it without contention.
/// Only the pick or release that raises it wakes the sender, at most once
/// per report and never per request.
///
/// It also keeps the backends picked at least once, registered at their
/// first pick: what the sender samples. An instance never picked has
/// nothing to report, and walking the whole routing table at every report
/// cost O(instances) (100,000 on a large table) per change.
#[derive(Debug, Default)]
pub struct LoadChanged {
    raised: AtomicBool,
    wake: Notify,
    picked: Mutex<Picked>,
}

/// The backends registered at their first pick.
#[derive(Debug, Default)]
struct Picked {
    list: Vec<Weak<Backend>>,
    /// At this length a registration forgets the detached ones itself (the
    /// sender does at each report, but skips reports while it has no
    /// peer): the list stays within twice the backends attached.
    prune_at: usize,
}

impl Picked {
    /// Forgets the backends detached (draining) or dropped; calls `keep`
    /// with each of the others.
    fn prune(&mut self, mut keep: impl FnMut(Arc<Backend>)) {
        self.list.retain(|w| match w.upgrade() {
            Some(b) if !b.is_draining() => {
                keep(b);
                true
            }
            _ => false,
        });
        self.prune_at = (2 * self.list.len()).max(64);
    }
}

impl LoadChanged {
    fn picked_list(&self) -> MutexGuard<'_, Picked> {
        self.picked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `backend`, picked for the first time. Two balancers over
    /// one backend (an old table's and a new one's) may both see its first
    /// pick and register it twice: harmless, the tracker samples an
    /// instance once per id, and pruning bounds the list.
    fn first_pick(&self, backend: &Arc<Backend>) {
        let mut picked = self.picked_list();
        picked.list.push(Arc::downgrade(backend));
        if picked.list.len() >= picked.prune_at {
            picked.prune(drop);
        }
    }

    /// The backends ever picked that are still attached (a detached one
    /// drains, and is forgotten here).
    pub fn picked(&self) -> Vec<Arc<Backend>> {
        let mut picked = self.picked_list();
        let mut attached = Vec::with_capacity(picked.list.len());
        picked.prune(|b| attached.push(b));
        attached
    }

    /// Raises the flag; wakes the waiter if it was down.
    pub fn raise(&self) {
        if !self.raised.load(Ordering::Relaxed) && !self.raised.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Whether the flag is raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Takes the flag down; whether it was raised.
    pub fn take(&self) -> bool {
        self.raised.swap(false, Ordering::AcqRel)
    }

    /// Completes once the flag has been raised since the last call (or at
    /// once when it is raised now). May complete spuriously.
    pub async fn raised(&self) {
        if self.raised.load(Ordering::Acquire) {
            return;
        }
        self.wake.notified().await;
    }
}

/// Outcome of [`GroupBalancer::pick`].
#[derive(Debug)]
#[must_use = "dropping a Pick::Selected releases the instance at once"]
pub enum Pick {
    /// An instance was selected and counts in flight until the lease drops.
    Selected(Lease),
    /// The group has no attached instance.
    NoInstances,
    /// The least loaded candidate is at or above the group's `hard_limit`.
    Overloaded,
}

/// One connection/request in flight to a selected backend. Dropping it
/// releases the instance.
#[derive(Debug)]
#[must_use = "dropping a Lease releases the instance at once"]
pub struct Lease {
    group: Arc<GroupBalancer>,
    backend: Arc<Backend>,
    /// The backend's slot in `group`.
    slot: usize,
    /// `None` once released.
    started: Option<Started>,
}

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Releases the instance, the work having ended at `now` (dropping the
    /// lease does the same at `Instant::now()`).
    pub fn release(mut self, now: Instant) {
        self.end(now);
    }

    fn end(&mut self, now: Instant) {
        let Some(started) = self.started.take() else {
            return;
        };
        self.backend.sub_inflight(started, now);
        self.group
            .update_both(self.slot, &self.backend, Inner::refresh);
        self.group.changed();
    }

    /// Records a failed connect to this lease's backend at `now` (see
    /// [`GroupBalancer::mark_down`]), also in the balancer that picked it.
    pub fn mark_down(&self, now: Instant) {
        if record_failure(&self.backend, now) {
            self.group
                .update_both(self.slot, &self.backend, Inner::sync);
        }
    }

    /// Records a successful connect to this lease's backend (see
    /// [`GroupBalancer::mark_up`]).
    pub fn mark_up(&self) {
        if record_success(&self.backend) {
            self.group
                .update_both(self.slot, &self.backend, Inner::sync);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.started.is_some() {
            self.end(Instant::now());
        }
    }
}

#[derive(Debug)]
struct Inner {
    slots: Vec<Slot>,
    tree: MinTree,
    /// Ends of down periods, earliest first. Entries are checked against the
    /// backend when they come due, so stale ones (after `mark_up`) are just
    /// dropped.
    expiries: BinaryHeap<Reverse<(Instant, usize)>>,
    /// A newer routing table changed this group: a newer balancer adopted
    /// some of these backends (updates made here must reach their home too)
    /// or some were detached (picks must skip draining ones). Until then
    /// this balancer is its backends' home (or newer than it), and picks and
    /// releases touch nothing but the counts.
    stale: bool,
}

#[derive(Debug)]
struct Slot {
    backend: Arc<Backend>,
    /// The down state the tree holds for this slot (`Some` = keyed as
    /// down). Equals `backend.down()` once synced.
    down: Option<Down>,
    /// Out of the tree for good: the backend drains.
    gone: bool,
}

impl Inner {
    /// The selection over `backends`, keyed from their current counts and
    /// down state. Duplicates and draining backends are left out. Touches no
    /// backend: the result is inert until a balancer holding it adopts them.
    fn over(backends: Vec<Arc<Backend>>) -> Self {
        let mut seen = HashSet::with_capacity(backends.len());
        let slots: Vec<Slot> = backends
            .into_iter()
            .filter(|b| !b.is_draining() && seen.insert(Arc::as_ptr(b)))
            .map(|backend| {
                let down = backend.down_now();
                Slot {
                    backend,
                    down,
                    gone: false,
                }
            })
            .collect();
        let tree = MinTree::from_keys(
            slots
                .iter()
                .map(|s| tree::key(s.backend.load(), s.down.is_some())),
        );
        let expiries = slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| Some(Reverse((s.down?.until()?, slot))))
            .collect();
        Self {
            slots,
            tree,
            expiries,
            stale: false,
        }
    }

    /// Whether `slot` holds `backend`.
    fn holds(&self, slot: usize, backend: &Backend) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(&s.backend), backend))
    }

    /// Recomputes the key of `slot` from the backend's current counts and
    /// the down state held here: after a pick or a release.
    fn refresh(&mut self, slot: usize) {
        if let Some(s) = self.slots.get(slot)
            && !s.gone
        {
            self.tree
                .set(slot, tree::key(s.backend.load(), s.down.is_some()));
        }
    }

    /// Recomputes the key of `slot` from the backend's current counts, down
    /// state and drain state (a draining backend leaves the tree).
    fn sync(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.gone || s.backend.is_draining() {
            s.down = None;
            s.gone = true;
            self.tree.clear(slot);
            return;
        }
        // Only a down period that ends by itself is waited for: the health
        // check's hold ends when the check says up (`set_checked`).
        let down = s.backend.down_now();
        if let Some(Down::Until(at)) = down
            && s.down != down
        {
            self.expiries.push(Reverse((at, slot)));
        }
        s.down = down;
        self.tree
            .set(slot, tree::key(s.backend.load(), down.is_some()));
    }

    /// With the estimated minimum at or above `hard_limit` (fixed point):
    /// the candidate (down ones only if `down`, i.e. every one is) of least
    /// admission load, if that is below the limit. Admission counts the
    /// peers' reported work but not their predicted picks, which a crashed
    /// peer's estimate keeps growing until its report expires: those never
    /// refuse a request. Ties are drawn uniformly, as the rule's are
    /// (reservoir sampling). O(n), only near the limit.
    fn admissible<R: Rng + ?Sized>(
        &self,
        down: bool,
        hard_limit: u64,
        rng: &mut R,
    ) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        let mut ties = 0_u32;
        let candidates = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.gone && s.down.is_some() == down && !s.backend.is_draining());
        for (slot, s) in candidates {
            let load = s.backend.admission_load();
            match best {
                Some((least, _)) if load > least => {}
                Some((least, _)) if load == least => {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((load, slot));
                    }
                }
                _ => {
                    best = Some((load, slot));
                    ties = 1;
                }
            }
        }
        best.filter(|&(load, _)| load < hard_limit)
            .map(|(_, slot)| slot)
    }

    /// Brings back the instances whose down period is over at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((until, slot))) = self.expiries.peek() {
            if until > now {
                break;
            }
            self.expiries.pop();
            if let Some(s) = self.slots.get(slot) {
                s.backend.expire_down(now);
            }
            self.sync(slot);
        }
    }
}

/// Runs `f` on `backend`'s slot in its home balancer (the one of the newest
/// routing table that holds it), unless that is `except`.
fn in_home(backend: &Backend, except: Option<&GroupBalancer>, f: fn(&mut Inner, usize)) {
    let Some((group, slot)) = backend.home(except) else {
        return;
    };
    let mut inner = group.lock();
    if inner.holds(slot, backend) {
        f(&mut inner, slot);
    }
}

impl GroupBalancer {
    pub fn new(hard_limit: u32) -> Self {
        Self::over(hard_limit, None, Vec::new())
    }

    /// A balancer that raises `changes` on every pick and release.
    pub fn with_changes(hard_limit: u32, changes: Arc<LoadChanged>) -> Self {
        Self::over(hard_limit, Some(changes), Vec::new())
    }

    /// A balancer over `backends` (in that order; duplicates and draining
    /// backends left out), keyed from their current counts. Pure: nothing
    /// changes for the backends or for other balancers until
    /// [`GroupBalancer::adopt`].
    pub fn over(
        hard_limit: u32,
        changes: Option<Arc<LoadChanged>>,
        backends: Vec<Arc<Backend>>,
    ) -> Self {
        Self {
            hard_limit: AtomicU32::new(hard_limit),
            inner: Mutex::new(Inner::over(backends)),
            changes,
        }
    }

    fn changed(&self) {
        if let Some(c) = &self.changes {
            c.raise();
        }
    }

    pub fn hard_limit(&self) -> u32 {
        self.hard_limit.load(Ordering::Relaxed)
    }

    pub fn set_hard_limit(&self, limit: u32) {
        self.hard_limit.store(limit, Ordering::Relaxed);
    }

    /// Makes this balancer its backends' home: from now on releases, down
    /// marks and peer loads of work selected by any balancer reach this one's
    /// tree. Then re-keys every slot, so what changed before is counted too.
    /// O(n).
    pub fn adopt(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let backends = self.backends();
        let mut previous: Vec<Arc<Self>> = Vec::new();
        for (slot, b) in backends.iter().enumerate() {
            if let Some(old) = b.set_home(weak.clone(), slot)
                && !Arc::ptr_eq(&old, self)
                && !previous.iter().any(|p| Arc::ptr_eq(p, &old))
            {
                previous.push(old);
            }
        }
        // Under each previous home's lock: an update made there before this
        // changed its counts before, so the re-keying below sees it; one
        // made after finds `stale` and reaches this balancer through
        // the backend's home, which has moved already.
        for old in &previous {
            old.lock().stale = true;
        }
        let mut inner = self.lock();
        inner.stale = false;
        for slot in 0..inner.slots.len() {
            inner.sync(slot);
        }
        debug!(backends = inner.slots.len(), "balancer adopted");
    }

    /// Whether this balancer selects exactly `backends`, in that order.
    pub fn selects(&self, backends: &[Arc<Backend>]) -> bool {
        let inner = self.lock();
        inner.slots.len() == backends.len()
            && inner
                .slots
                .iter()
                .zip(backends)
                .all(|(s, b)| Arc::ptr_eq(&s.backend, b))
    }

    /// Replaces the selectable set in place, in O(n), and adopts it.
    /// Backends that stay (same `Arc`) keep their counts and down state; the
    /// others leave selection at once. Duplicates and draining backends are
    /// left out. The routing table never does this to a published balancer:
    /// it builds a new one per change ([`GroupBalancer::over`]).
    pub fn set_backends(self: &Arc<Self>, backends: Vec<Arc<Backend>>) {
        let fresh = Inner::over(backends);
        *self.lock() = fresh;
        self.adopt();
    }

    /// The attached backends, in slot order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.lock()
            .slots
            .iter()
            .map(|s| Arc::clone(&s.backend))
            .collect()
    }

    /// Selects an instance by the rule (see the module docs). O(log n);
    /// O(n) when the estimated minimum is at `hard_limit` (see
    /// [`Inner::admissible`]).
    pub fn pick<R: Rng + ?Sized>(self: &Arc<Self>, now: Instant, rng: &mut R) -> Pick {
        let hard_limit = u64::from(self.hard_limit()) << LOAD_FRAC_BITS;
        let (backend, slot, started, stale, first) = {
            let mut inner = self.lock();
            inner.expire(now);
            let (mut slot, key) = loop {
                let Some((slot, key)) = inner.tree.pick(rng) else {
                    return Pick::NoInstances;
                };
                // Detached since this balancer was built (a request that
                // read the previous routing table): out of the tree for good.
                if inner.stale
                    && inner
                        .slots
                        .get(slot)
                        .is_some_and(|s| s.backend.is_draining())
                {
                    inner.sync(slot);
                    continue;
                }
                break (slot, key);
            };
            if tree::load_of(key) >= hard_limit {
                match inner.admissible(key >= tree::DOWN_PENALTY, hard_limit, rng) {
                    Some(room) => slot = room,
                    None => return Pick::Overloaded,
                }
            }
            // The tree has exactly one leaf per slot, so `slot` is in range.
            let Some(backend) = inner.slots.get(slot).map(|s| Arc::clone(&s.backend)) else {
                return Pick::NoInstances;
            };
            let first = !backend.counters().used();
            let started = backend.add_inflight(now);
            inner.refresh(slot);
            (backend, slot, started, inner.stale, first)
        };
        if stale {
            in_home(&backend, Some(self), Inner::refresh);
        }
        if first && let Some(c) = &self.changes {
            c.first_pick(&backend);
        }
        self.changed();
        backend.metrics.selected.inc();
        Pick::Selected(Lease {
            group: Arc::clone(self),
            backend,
            slot,
            started: Some(started),
        })
    }

    /// Records a failed connect (refused or timed out) to `backend` at `now`:
    /// down for 1 s, doubling per consecutive failure up to 30 s. Reaches the
    /// backend's home balancer; work holding a [`Lease`] should call
    /// [`Lease::mark_down`], which also reaches the balancer it picked from.
    pub fn mark_down(&self, backend: &Backend, now: Instant) {
        if record_failure(backend, now) {
            in_home(backend, None, Inner::sync);
        }
    }

    /// Records a successful connect to `backend`: resets its backoff and ends
    /// any down period. Lock-free when the backend had no failures.
    pub fn mark_up(&self, backend: &Backend) {
        if record_success(backend) {
            in_home(backend, None, Inner::sync);
        }
    }

    /// Sets the peers' part of `backend`'s load to `load` whole requests,
    /// for selection and admission alike.
    pub fn set_peer_load(&self, backend: &Backend, load: u64) {
        let fixed = load.saturating_mul(LOAD_ONE);
        if backend.set_peer_load(fixed, fixed) {
            in_home(backend, None, Inner::sync);
        }
    }

    /// Sets the peers' parts of many backends' loads (fixed point, from
    /// gossip) and re-keys those whose selection load changed, under one
    /// lock per [`BATCH`] backends. Listed in this balancer's slot order
    /// (the refresh lists a group's backends so), a backend is re-keyed at
    /// its place here without asking it where its home is, and in its home
    /// too once this balancer is stale (a newer one adopted it meanwhile:
    /// the home's key would otherwise keep the old load until the backend's
    /// next change). One not at its place here is re-keyed in its home, as
    /// any update of a backend is. A newer balancer not yet adopted is
    /// re-keyed here while the current home is not; adopting re-keys every
    /// slot of the new one, and the old one serves only requests routed
    /// before.
    pub fn set_peer_loads<'a>(&self, loads: impl IntoIterator<Item = (&'a Backend, PeerLoad)>) {
        let mut changed: Vec<(&Backend, usize)> = Vec::new();
        for (at, (backend, load)) in loads.into_iter().enumerate() {
            if backend.set_peer_load(load.select, load.admit) {
                changed.push((backend, at));
            }
        }
        // Each with whether it was re-keyed here.
        let mut elsewhere: Vec<(&Backend, bool)> = Vec::new();
        for batch in changed.chunks(BATCH) {
            let mut inner = self.lock();
            for &(backend, at) in batch {
                let here = inner.holds(at, backend);
                if here {
                    inner.sync(at);
                }
                if inner.stale || !here {
                    elsewhere.push((backend, here));
                }
            }
        }
        for (backend, here) in elsewhere {
            in_home(backend, here.then_some(self), Inner::sync);
        }
    }

    /// `local_inflight + peer_load` of `backend`, as selection sees it,
    /// rounded to a whole count.
    pub fn load(&self, backend: &Backend) -> u64 {
        backend::whole(backend.load())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent or only one key
        // stale (refreshed by the next update of that slot).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `update` (a re-keying) on `slot` if it still holds `backend`,
    /// and on the backend's slot in its home when that is another balancer.
    fn update_both(&self, slot: usize, backend: &Backend, update: fn(&mut Inner, usize)) {
        let (done, stale) = {
            let mut inner = self.lock();
            let holds = inner.holds(slot, backend);
            if holds {
                update(&mut inner, slot);
            }
            (holds, inner.stale)
        };
        // When the set here was replaced in place, the home (this balancer)
        // knows the new slot.
        if stale || !done {
            in_home(backend, done.then_some(self), update);
        }
    }

    /// Marks this balancer stale (see `Inner::stale`).
    pub(crate) fn mark_stale(&self) {
        self.lock().stale = true;
    }
}

/// Sets what the active health check says of `backend`: out of
/// selection while down (as a failed connect takes it out, but until the
/// check says up), back when up.
pub fn set_checked(backend: &Backend, up: bool) {
    if backend.set_checked(up) {
        debug!(instance = %backend.name, up, "health check changed the instance's state");
        in_home(backend, None, Inner::sync);
    }
}

/// Records a failed connect; whether a new down period started.
fn record_failure(backend: &Backend, now: Instant) -> bool {
    let Some((until, failures)) = backend.record_failure(now) else {
        return false;
    };
    debug!(
        instance = %backend.name,
        failures,
        backoff_ms = u64::try_from((until - now).as_millis()).unwrap_or(u64::MAX),
        "marked down"
    );
    true
}

/// Records a successful connect; whether that brought the backend back
/// (not while the health check holds it down).
fn record_success(backend: &Backend) -> bool {
    if !backend.is_failing() || !backend.reset_failures() {
        return false;
    }
    debug!(instance = %backend.name, "marked up");
    true
}
