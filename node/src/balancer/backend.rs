//! One attached instance as the balancer sees it: counters that the data
//! plane and the admin API read without locks, its passive down state and
//! its drain state.
//!
//! This node's in-flight count lives in [`LoadCounters`], with what the
//! gossip sender samples for its reports (picks, completions, service
//! time, start-time epochs of the work in flight): all atomics, bumped by
//! the pick and the release of a [`Lease`](super::Lease) without a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use gossip::{LOAD_FRAC_BITS, LoadCounters, Started};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use uuid::Uuid;

use super::GroupBalancer;
use crate::series::InstanceMetrics;
use crate::upstream::Pool;

/// Down time after the first failed connect.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest down time, reached after six consecutive failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the admin API reports for an instance (`state: up|down|draining`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Selectable.
    Up,
    /// Passively marked down after a failed connect; selected only when every
    /// instance of its group is down.
    Down,
    /// Detached: out of selection, finishing what is in flight.
    Draining,
}

/// An instance attached to a group.
///
/// Shared as `Arc<Backend>` between the group's [`GroupBalancer`], the
/// [`Lease`]s of work in flight and the admin API. A backend belongs to one
/// group for its whole life; attaching the same instance again after a
/// detach means building a new `Backend`.
///
/// [`GroupBalancer`]: super::GroupBalancer
/// [`Lease`]: super::Lease
#[derive(Debug)]
pub struct Backend {
    pub uuid: Uuid,
    pub name: String,
    /// Host or IP, as attached (the port comes from the published port).
    pub address: String,
    pub metrics: InstanceMetrics,
    /// Connections/requests of this node in flight to the instance, and
    /// what the gossip sender samples.
    counters: LoadCounters,
    /// Peers' part of the load, set from gossip, in fixed point
    /// (`gossip::LOAD_ONE` = 1): for selection, and for admission
    /// (`hard_limit`, without the peers' predicted picks).
    peer: AtomicU64,
    admit: AtomicU64,
    /// The balancer that counts and down marks are reported to besides the
    /// one that picked: that of the newest routing table holding the backend.
    home: Mutex<Home>,
    /// `down.failures > 0`, readable without the lock: lets a successful
    /// connect to a healthy instance skip the group lock.
    failing: AtomicBool,
    down: Mutex<DownState>,
    draining: AtomicBool,
    /// Fired once the drain timeout has passed; created on first use (an
    /// instance nobody waits on never needs one).
    drain: OnceLock<CancellationToken>,
    /// Upstream pools to the instance, one per destination port, created
    /// on first use: an instance that carries no traffic costs none.
    pools: Mutex<Vec<Arc<Pool>>>,
}

/// Where a backend sits in its home balancer.
#[derive(Debug, Default)]
struct Home {
    group: Weak<GroupBalancer>,
    slot: usize,
}

/// Why a backend is out of selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Down {
    /// Failed connects: back at that time (the group brings it back).
    Until(Instant),
    /// The active health check says down: back when it says up.
    Held,
}

impl Down {
    /// When it ends by itself, if it does.
    pub(super) fn until(self) -> Option<Instant> {
        match self {
            Self::Until(at) => Some(at),
            Self::Held => None,
        }
    }
}

#[derive(Debug, Default)]
struct DownState {
    /// The active health check says down: it holds until the check says
    /// up, whatever `until` says, and a successful connect does not clear
    /// it.
    checked_down: bool,
    /// Consecutive failed connects (each after the previous down time ended).
    failures: u32,
    /// Marked down until then. Cleared by the group when it notices that the
    /// time has passed, so `Some` with a past instant is still "up" to
    /// [`Backend::state`].
    until: Option<Instant>,
}

/// A fixed-point load rounded to a whole count.
pub(super) fn whole(fixed: u64) -> u64 {
    (fixed >> LOAD_FRAC_BITS) + ((fixed >> (LOAD_FRAC_BITS - 1)) & 1)
}

/// Down time after `failures` consecutive failures: 1 s, 2 s, 4 s … 30 s.
pub(super) fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(5);
    (INITIAL_BACKOFF * (1u32 << doublings)).min(MAX_BACKOFF)
}

impl Backend {
    pub fn new(uuid: Uuid, name: String, address: String, metrics: InstanceMetrics) -> Self {
        Self::new_at(uuid, name, address, metrics, Instant::now())
    }

    /// A backend created at `created`: the start-time epochs of its load
    /// counters are counted from there (the simulator passes its own clock).
    pub fn new_at(
        uuid: Uuid,
        name: String,
        address: String,
        metrics: InstanceMetrics,
        created: Instant,
    ) -> Self {
        Self {
            uuid,
            name,
            address,
            metrics,
            counters: LoadCounters::new(created, gossip::Config::default().long_after),
            peer: AtomicU64::new(0),
            admit: AtomicU64::new(0),
            home: Mutex::new(Home::default()),
            failing: AtomicBool::new(false),
            down: Mutex::new(DownState::default()),
            draining: AtomicBool::new(false),
            drain: OnceLock::new(),
            pools: Mutex::new(Vec::new()),
        }
    }

    /// The upstream pool to the instance on `port`, created on first use.
    /// It lives as long as the backend: idle connections survive routing
    /// updates that keep the instance.
    pub fn pool(&self, port: u16) -> Arc<Pool> {
        // A list of pools, consistent after any panic.
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = pools.iter().find(|p| p.port() == port) {
            return p.clone();
        }
        let pool = Arc::new(Pool::new(&self.address, port));
        pools.push(pool.clone());
        pool
    }

    /// This node's connections/requests in flight to the instance.
    pub fn local_inflight(&self) -> u64 {
        self.counters.inflight()
    }

    /// The counters the gossip sender samples.
    pub fn counters(&self) -> &LoadCounters {
        &self.counters
    }

    /// The peers' part of the load, as last set by gossip, rounded to a
    /// whole count.
    pub fn peer_load(&self) -> u64 {
        whole(self.peer_load_fixed())
    }

    /// The peers' part of the load in fixed point (`gossip::LOAD_ONE` = 1).
    pub fn peer_load_fixed(&self) -> u64 {
        self.peer.load(Ordering::Relaxed)
    }

    /// The peers' part of the load that admission counts, fixed point.
    pub fn admit_load_fixed(&self) -> u64 {
        self.admit.load(Ordering::Relaxed)
    }

    /// `local_inflight + peer_load` in fixed point: what selection compares.
    pub(super) fn load(&self) -> u64 {
        (self.local_inflight() << LOAD_FRAC_BITS).saturating_add(self.peer_load_fixed())
    }

    /// `local_inflight` + the peers' part that admission counts, fixed point.
    pub(super) fn admission_load(&self) -> u64 {
        (self.local_inflight() << LOAD_FRAC_BITS).saturating_add(self.admit_load_fixed())
    }

    pub fn state(&self, now: Instant) -> BackendState {
        if self.is_draining() {
            BackendState::Draining
        } else if self
            .down()
            .is_some_and(|d| d.until().is_none_or(|until| until > now))
        {
            BackendState::Down
        } else {
            BackendState::Up
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Completes when the drain timeout of a detached backend has passed:
    /// whatever is still in flight to it should then be aborted.
    pub fn drained(&self) -> WaitForCancellationFutureOwned {
        self.drain_token().cancelled_owned()
    }

    /// The token behind [`Backend::drained`], for `select!` loops that hold
    /// several tokens.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.get_or_init(CancellationToken::new).clone()
    }

    pub(super) fn add_inflight(&self, now: Instant) -> Started {
        self.counters.start(now)
    }

    pub(super) fn sub_inflight(&self, started: Started, now: Instant) {
        // Only a `Lease` decrements, once, after its pick incremented.
        self.counters.finish(started, now);
    }

    /// Sets the peers' part (fixed point) for selection and admission;
    /// whether the selection part changed.
    pub(super) fn set_peer_load(&self, select: u64, admit: u64) -> bool {
        self.admit.store(admit, Ordering::Relaxed);
        self.peer.swap(select, Ordering::Relaxed) != select
    }

    /// End of the current down period of failed connects, if one is
    /// recorded.
    #[cfg(test)]
    pub(super) fn down_until(&self) -> Option<Instant> {
        self.lock_down().until
    }

    /// The current down state: held by the health check, or failed
    /// connects' down period.
    pub(super) fn down(&self) -> Option<Down> {
        let down = self.lock_down();
        if down.checked_down {
            Some(Down::Held)
        } else {
            down.until.map(Down::Until)
        }
    }

    /// The home balancer and this backend's slot in it, unless the home is
    /// `except` or gone.
    pub(super) fn home(
        &self,
        except: Option<&GroupBalancer>,
    ) -> Option<(Arc<GroupBalancer>, usize)> {
        let home = self.home.lock().unwrap_or_else(PoisonError::into_inner);
        if except.is_some_and(|e| std::ptr::eq(home.group.as_ptr(), e)) {
            return None;
        }
        Some((home.group.upgrade()?, home.slot))
    }

    /// Moves the home to `group`, where this backend sits at `slot`;
    /// returns the previous home if it is still alive.
    pub(super) fn set_home(
        &self,
        group: Weak<GroupBalancer>,
        slot: usize,
    ) -> Option<Arc<GroupBalancer>> {
        // Two plain fields, consistent after any panic.
        let mut home = self.home.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *home, Home { group, slot })
            .group
            .upgrade()
    }

    /// How the backend is down, if it is, without a lock when there are no
    /// failures (the common case).
    pub(super) fn down_now(&self) -> Option<Down> {
        if self.is_failing() { self.down() } else { None }
    }

    /// Records a failed connect at `now`. Returns the end of the new down
    /// period, or `None` when the backend is already down at `now`: a failure
    /// of work selected before the backend went down belongs to the same
    /// outage and does not double the backoff again.
    pub(super) fn record_failure(&self, now: Instant) -> Option<(Instant, u32)> {
        let mut down = self.lock_down();
        if down.until.is_some_and(|until| until > now) {
            return None;
        }
        down.failures = down.failures.saturating_add(1);
        let until = now + backoff(down.failures);
        down.until = Some(until);
        self.failing.store(true, Ordering::Relaxed);
        Some((until, down.failures))
    }

    /// Whether failures are recorded, without taking a lock.
    pub(super) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Records a successful connect: forgets failures and any down period,
    /// unless the health check holds the backend down. Whether that
    /// changed the down state.
    pub(super) fn reset_failures(&self) -> bool {
        let mut down = self.lock_down();
        if down.checked_down {
            down.failures = 0;
            return false;
        }
        *down = DownState::default();
        self.failing.store(false, Ordering::Relaxed);
        true
    }

    /// Sets what the active health check says; whether that changed the
    /// down state. Down holds until the check says up.
    pub(super) fn set_checked(&self, up: bool) -> bool {
        let mut down = self.lock_down();
        if down.checked_down != up {
            return false;
        }
        if up {
            *down = DownState::default();
            self.failing.store(false, Ordering::Relaxed);
        } else {
            down.checked_down = true;
            self.failing.store(true, Ordering::Relaxed);
        }
        true
    }

    /// Whether the active health check holds the backend down.
    pub fn checked_down(&self) -> bool {
        self.is_failing() && self.lock_down().checked_down
    }

    /// Ends the down period if it is over at `now`; returns whether it did.
    /// The failure count stays, so the next failure doubles the backoff.
    pub(super) fn expire_down(&self, now: Instant) -> bool {
        let mut down = self.lock_down();
        if down.until.is_some_and(|until| until <= now) {
            down.until = None;
            true
        } else {
            false
        }
    }

    fn lock_down(&self) -> MutexGuard<'_, DownState> {
        // The state is two plain fields, consistent after any panic.
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks a detached backend draining and fires its drain token once
/// `timeout` has passed (at once when called outside a tokio runtime).
///
/// Taking the backend out of selection is the group's business: pass the
/// remaining backends to [`GroupBalancer::set_backends`]. A draining backend
/// given to `set_backends` is left out. Calling this again does nothing.
///
/// [`GroupBalancer::set_backends`]: super::GroupBalancer::set_backends
pub fn start_drain(backend: &Arc<Backend>, timeout: Duration) {
    if backend.draining.swap(true, Ordering::AcqRel) {
        return;
    }
    // Its balancer's picks check for drains from now on.
    if let Some((home, _)) = backend.home(None) {
        home.mark_stale();
    }
    let token = backend.drain_token();
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(timeout) => token.cancel(),
                    () = token.cancelled() => {}
                }
            });
        }
        Err(_) => token.cancel(),
    }
}
