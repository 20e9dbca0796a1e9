//! The refresh task: recomputes every backend's peer load from the load
//! table, right after a report arrives and every `gossip::REFRESH` while
//! any fresh peer reports load (estimates move with the reports' age; a
//! report that expires takes its load with it), throttled by
//! `gossip::RefreshSchedule`. Idle peers' reports (empty) wake nothing, so
//! an idle fleet does not refresh at all.

use std::sync::Arc;
use std::time::Instant;

use ::gossip::RefreshSchedule;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

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

/// Sets every backend's peer load from the fresh reports at `now`; whether
/// any fresh peer reports load (only then does the timer run).
pub(super) fn apply(gossip: &Gossip, now: Instant) -> bool {
    let routes = gossip.dataplane.routes.load();
    let mut updates: Vec<(&GroupRuntime, &Backend, u64)> = Vec::new();
    let fresh = {
        let table = gossip.lock();
        let fresh = table.fresh_peers(now) > 0;
        // Estimates move with the reports' age only while a fresh report
        // lists something: idle peers' reports need no timer.
        let moving = table.fresh_load(now);
        for group in routes.groups() {
            let backends: Vec<&Arc<Backend>> = group.backends.values().collect();
            if fresh {
                let ids: Vec<[u8; 16]> = backends.iter().map(|b| b.uuid.into_bytes()).collect();
                let loads = gossip.config.estimator.peer_loads(&table, &ids, now);
                for (backend, load) in backends.into_iter().zip(loads) {
                    if backend.peer_load() != load {
                        updates.push((group, backend, load));
                    }
                }
            } else {
                for backend in backends {
                    if backend.peer_load() != 0 {
                        updates.push((group, backend, 0));
                    }
                }
            }
        }
        moving
    };
    // The group locks are taken after the table's is released.
    for (group, backend, load) in updates {
        group.balancer.set_peer_load(backend, load);
    }
    fresh
}
