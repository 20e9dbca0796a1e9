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
//!    ([`Pick::Overloaded`]; a `hard_limit` of 0 refuses everything).
//!
//! # Structure
//!
//! ```text
//!  pick(now, rng) ──► GroupBalancer ── Mutex<Inner> (one per group) ──────┐
//!        │              │  slots: [Arc<Backend>; n], down flags           │
//!        │              │  tree:  MinTree over key(slot)     (tree.rs)    │
//!        │              └─ expiries: heap of (down-until, slot)           │
//!        ▼                                                                │
//!     Lease ── Drop ──► local_inflight -= 1, refresh key ─────────────────┘
//!        │
//!        └─ pick and release bump the backend's LoadCounters (atomics) and
//!           mark the node's LoadChanged flag for the gossip sender
//! ```
//!
//! Each slot's key is `load + (DOWN_PENALTY if down)`, with the penalty
//! (2^40) above any real load, so the minimum of the keys is the minimum over
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
//! [`GroupBalancer::set_backends`] replaces the set in O(n): a backend that
//! stays (same `Arc`) keeps its counts and down state, a removed one leaves
//! selection at once. Its leases still decrement its count when dropped, so
//! the admin API can show what a draining instance still has in flight;
//! [`start_drain`] bounds how long that may last.

mod backend;
mod tree;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use gossip::Started;
use rand::Rng;
use tokio::sync::Notify;
use tracing::debug;

use backend::DETACHED;
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
#[derive(Debug, Default)]
pub struct LoadChanged {
    raised: AtomicBool,
    wake: Notify,
}

impl LoadChanged {
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
        {
            let mut inner = self.group.lock();
            if let Some(slot) = inner.slot_of(&self.backend) {
                inner.refresh(slot);
            }
        }
        self.group.changed();
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
}

#[derive(Debug)]
struct Slot {
    backend: Arc<Backend>,
    /// In the tree as down. Equals `backend.down_until().is_some()`.
    down: bool,
}

impl Inner {
    fn empty() -> Self {
        Self {
            slots: Vec::new(),
            tree: MinTree::from_keys([]),
            expiries: BinaryHeap::new(),
        }
    }

    /// The slot of `backend` in this group, if it is attached here.
    fn slot_of(&self, backend: &Backend) -> Option<usize> {
        let slot = backend.slot.load(Ordering::Relaxed);
        let attached = self
            .slots
            .get(slot)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(&s.backend), backend));
        attached.then_some(slot)
    }

    /// Recomputes the key of `slot` from the backend's current counts.
    fn refresh(&mut self, slot: usize) {
        if let Some(s) = self.slots.get(slot) {
            self.tree.set(slot, tree::key(s.backend.load(), s.down));
        }
    }

    fn set_down(&mut self, slot: usize, down: bool) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.down = down;
            self.refresh(slot);
        }
    }

    /// Brings back the instances whose down period is over at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((until, slot))) = self.expiries.peek() {
            if until > now {
                break;
            }
            self.expiries.pop();
            let expired = self
                .slots
                .get(slot)
                .is_some_and(|s| s.backend.expire_down(now));
            if expired {
                self.set_down(slot, false);
            }
        }
    }
}

impl GroupBalancer {
    pub fn new(hard_limit: u32) -> Self {
        Self {
            hard_limit: AtomicU32::new(hard_limit),
            inner: Mutex::new(Inner::empty()),
            changes: None,
        }
    }

    /// A balancer that raises `changes` on every pick and release.
    pub fn with_changes(hard_limit: u32, changes: Arc<LoadChanged>) -> Self {
        Self {
            changes: Some(changes),
            ..Self::new(hard_limit)
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

    /// Replaces the selectable set, in O(n). Backends that stay (same `Arc`)
    /// keep their counts and down state; the others leave selection at once.
    /// Duplicates and draining backends are left out.
    pub fn set_backends(&self, backends: Vec<Arc<Backend>>) {
        let mut inner = self.lock();
        let old = std::mem::take(&mut inner.slots);
        let mut slots: Vec<Slot> = Vec::with_capacity(backends.len());
        for backend in backends {
            let seen = slots
                .get(backend.slot.load(Ordering::Relaxed))
                .is_some_and(|s| Arc::ptr_eq(&s.backend, &backend));
            if seen || backend.is_draining() {
                continue;
            }
            backend.slot.store(slots.len(), Ordering::Relaxed);
            let down = backend.down_until().is_some();
            slots.push(Slot { backend, down });
        }
        for gone in old {
            let slot = gone.backend.slot.load(Ordering::Relaxed);
            let kept = slots
                .get(slot)
                .is_some_and(|s| Arc::ptr_eq(&s.backend, &gone.backend));
            if !kept {
                gone.backend.slot.store(DETACHED, Ordering::Relaxed);
            }
        }
        inner.tree = MinTree::from_keys(slots.iter().map(|s| tree::key(s.backend.load(), s.down)));
        inner.expiries = slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| Some(Reverse((s.backend.down_until()?, slot))))
            .collect();
        inner.slots = slots;
        debug!(backends = inner.slots.len(), "balancer set updated");
    }

    /// The attached backends, in slot order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.lock()
            .slots
            .iter()
            .map(|s| Arc::clone(&s.backend))
            .collect()
    }

    /// Selects an instance by the rule (see the module docs). O(log n).
    pub fn pick<R: Rng + ?Sized>(self: &Arc<Self>, now: Instant, rng: &mut R) -> Pick {
        let hard_limit = u64::from(self.hard_limit());
        let (backend, started) = {
            let mut inner = self.lock();
            inner.expire(now);
            let Some((slot, key)) = inner.tree.pick(rng) else {
                return Pick::NoInstances;
            };
            if tree::load_of(key) >= hard_limit {
                return Pick::Overloaded;
            }
            // The tree has exactly one leaf per slot, so `slot` is in range.
            let Some(backend) = inner.slots.get(slot).map(|s| Arc::clone(&s.backend)) else {
                return Pick::NoInstances;
            };
            let started = backend.add_inflight(now);
            inner.refresh(slot);
            (backend, started)
        };
        self.changed();
        backend.metrics.selected.inc();
        Pick::Selected(Lease {
            group: Arc::clone(self),
            backend,
            started: Some(started),
        })
    }

    /// Records a failed connect (refused or timed out) to `backend` at `now`:
    /// down for 1 s, doubling per consecutive failure up to 30 s.
    pub fn mark_down(&self, backend: &Backend, now: Instant) {
        let mut inner = self.lock();
        let Some((until, failures)) = backend.record_failure(now) else {
            return;
        };
        debug!(
            instance = %backend.name,
            failures,
            backoff_ms = u64::try_from((until - now).as_millis()).unwrap_or(u64::MAX),
            "marked down"
        );
        if let Some(slot) = inner.slot_of(backend) {
            inner.expiries.push(Reverse((until, slot)));
            inner.set_down(slot, true);
        }
    }

    /// Records a successful connect to `backend`: resets its backoff and ends
    /// any down period. Lock-free when the backend had no failures.
    pub fn mark_up(&self, backend: &Backend) {
        if !backend.is_failing() {
            return;
        }
        let mut inner = self.lock();
        backend.reset_failures();
        debug!(instance = %backend.name, "marked up");
        if let Some(slot) = inner.slot_of(backend) {
            inner.set_down(slot, false);
        }
    }

    /// Sets the peers' part of `backend`'s load (from gossip).
    pub fn set_peer_load(&self, backend: &Backend, load: u64) {
        backend.set_peer_load(load);
        let mut inner = self.lock();
        if let Some(slot) = inner.slot_of(backend) {
            inner.refresh(slot);
        }
    }

    /// `local_inflight + peer_load` of `backend`, as selection sees it.
    pub fn load(&self, backend: &Backend) -> u64 {
        backend.load()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent or only one key
        // stale (refreshed by the next update of that slot).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
