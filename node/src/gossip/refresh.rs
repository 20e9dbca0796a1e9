//! The refresh task: recomputes every backend's peer load from the load
//! table, right after a report arrives and every `gossip::REFRESH` while
//! any fresh peer reports load (estimates move with the reports' age; a
//! report that expires takes its load with it), throttled by
//! `gossip::RefreshSchedule`. Idle peers' reports (empty) wake nothing, so
//! an idle fleet does not refresh at all.

use std::sync::{Arc, PoisonError, Weak};
use std::time::Instant;

use ::gossip::{RefreshSchedule, ViewSet};
use arc_swap::ArcSwap;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use super::Gossip;
use crate::balancer::Backend;
use crate::routing::{FastMap, GroupRuntime, RoutingTable};

pub(super) async fn run(gossip: Arc<Gossip>, cancel: CancellationToken) {
    // The timers are the simulator's too (gossip::RefreshSchedule).
    let mut schedule = RefreshSchedule::new(Instant::now());
    loop {
        let timer = schedule.timer().map(tokio::time::Instant::from_std);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = gossip.report_arrived.notified() => {}
            () = sleep_until(timer.unwrap_or_else(tokio::time::Instant::now)), if timer.is_some() => {}
        }
        let at = tokio::time::Instant::from_std(schedule.on_report(Instant::now()));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep_until(at) => {}
        }
        let started = Instant::now();
        let active = apply(&gossip, started);
        schedule.refreshed(started, Instant::now(), active);
    }
}

/// The refresh's state: the groups' views ([`ViewSet`]), kept between
/// refreshes so that only what a new report changed is rebuilt, and each
/// group's runtime and backends in slot order. The refresh and the region
/// aggregate (which keeps the instances of these groups) take its lock,
/// never report intake.
#[derive(Debug, Default)]
pub(super) struct Views {
    /// By group (FxHash, as the routing table's maps: a refresh over many
    /// groups looks each one up).
    groups: FastMap<Uuid, GroupState>,
    set: ViewSet<Uuid>,
    /// The routing table the groups were last taken from (not kept alive:
    /// an idle fleet refreshes seldom).
    routes: Weak<RoutingTable>,
}

#[derive(Debug)]
struct GroupState {
    /// The runtime the view was built for (a new one means new slots).
    runtime: Arc<GroupRuntime>,
    /// Its backends in slot order.
    backends: Vec<Arc<Backend>>,
}

impl Views {
    /// Takes the groups of the routing table now in `routes`, unless they
    /// are the ones last taken. Read under the views' lock, so that the
    /// refresh and the region aggregate, which both call this, never take
    /// an older table after a newer one.
    pub(super) fn take_groups(&mut self, routes: &ArcSwap<RoutingTable>) {
        let routes = &routes.load_full();
        let Self {
            groups,
            set,
            routes: seen,
        } = self;
        if std::ptr::eq(seen.as_ptr(), Arc::as_ptr(routes)) {
            return;
        }
        groups.retain(|uuid, _| {
            let keep = routes.group(uuid).is_some();
            if !keep {
                set.remove_group(uuid);
            }
            keep
        });
        for runtime in routes.groups() {
            let same = groups
                .get(&runtime.uuid)
                .is_some_and(|state| Arc::ptr_eq(&state.runtime, runtime));
            if !same {
                // In the balancer's slot order, where `set_peer_loads`
                // re-keys each without asking for its home.
                let backends: Vec<Arc<Backend>> = runtime.balancer.backends();
                let ids: Vec<[u8; 16]> = backends.iter().map(|b| b.uuid.into_bytes()).collect();
                set.set_group(runtime.uuid, &ids);
                let state = GroupState {
                    runtime: Arc::clone(runtime),
                    backends,
                };
                groups.insert(runtime.uuid, state);
            }
        }
        *seen = Arc::downgrade(routes);
    }

    /// Whether `instance` is in one of the groups last taken.
    pub(super) fn knows(&self, instance: &[u8; 16]) -> bool {
        self.set.holds(instance)
    }
}

/// Sets every backend's peer load from the fresh reports at `now`; whether
/// any fresh peer reports load (only then does the timer run). The load
/// table's lock is held only to take a snapshot (one `Arc` clone per peer).
pub(super) fn apply(gossip: &Gossip, now: Instant) -> bool {
    // Estimates move with the reports' age only while a fresh report lists
    // something: idle peers' reports need no timer.
    let (peers, moving) = {
        let table = gossip.lock();
        (table.snapshot(), table.fresh_load(now))
    };
    let mut views = gossip.views.lock().unwrap_or_else(PoisonError::into_inner);
    views.take_groups(&gossip.dataplane.routes);
    let Views { groups, set, .. } = &mut *views;
    set.refresh(&gossip.config, &peers, now, |uuid, loads| {
        if let Some(state) = groups.get(uuid) {
            let loads = state
                .backends
                .iter()
                .map(AsRef::as_ref)
                .zip(loads.iter().copied());
            state.runtime.balancer.set_peer_loads(loads);
        }
    });
    moving
}
