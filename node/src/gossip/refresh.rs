//! The refresh task: recomputes every backend's peer load from the load
//! table, right after a report arrives and every `gossip::REFRESH` while
//! any fresh peer reports load (estimates move with the reports' age; a
//! report that expires takes its load with it), throttled by
//! `gossip::RefreshSchedule`. Idle peers' reports (empty) wake nothing, so
//! an idle fleet does not refresh at all.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use ::gossip::{GroupView, PeerLoad, RefreshSchedule};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use super::Gossip;
use crate::balancer::Backend;
use crate::routing::GroupRuntime;

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

/// The refresh's state: one [`GroupView`] per group of the routing table,
/// kept between refreshes so that only what a new report changed is
/// rebuilt. Only the refresh takes its lock, never report intake.
#[derive(Debug, Default)]
pub(super) struct Views {
    groups: HashMap<Uuid, GroupState>,
    out: Vec<PeerLoad>,
}

#[derive(Debug)]
struct GroupState {
    /// The runtime the view was built for (a new one means new slots).
    runtime: Arc<GroupRuntime>,
    /// Its backends in slot order.
    backends: Vec<Arc<Backend>>,
    view: GroupView,
}

impl GroupState {
    fn new(runtime: &Arc<GroupRuntime>) -> Self {
        let backends: Vec<Arc<Backend>> = runtime.backends.values().cloned().collect();
        let ids: Vec<[u8; 16]> = backends.iter().map(|b| b.uuid.into_bytes()).collect();
        Self {
            runtime: Arc::clone(runtime),
            view: GroupView::new(&ids),
            backends,
        }
    }
}

/// Sets every backend's peer load from the fresh reports at `now`; whether
/// any fresh peer reports load (only then does the timer run). The load
/// table's lock is held only to take a snapshot (one `Arc` clone per peer).
pub(super) fn apply(gossip: &Gossip, now: Instant) -> bool {
    let routes = gossip.dataplane.routes.load();
    // Estimates move with the reports' age only while a fresh report lists
    // something: idle peers' reports need no timer.
    let (peers, moving) = {
        let table = gossip.lock();
        (table.snapshot(), table.fresh_load(now))
    };
    let mut views = gossip.views.lock().unwrap_or_else(PoisonError::into_inner);
    let Views { groups, out } = &mut *views;
    groups.retain(|uuid, _| routes.group(uuid).is_some());
    for runtime in routes.groups() {
        let state = groups
            .entry(runtime.uuid)
            .or_insert_with(|| GroupState::new(runtime));
        if !Arc::ptr_eq(&state.runtime, runtime) {
            *state = GroupState::new(runtime);
        }
        state.view.estimate(&gossip.config, &peers, now, out);
        let loads = state
            .backends
            .iter()
            .map(AsRef::as_ref)
            .zip(out.iter().copied());
        runtime.balancer.set_peer_loads(loads);
    }
    moving
}
