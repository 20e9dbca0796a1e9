//! The refresh task: recomputes every backend's peer load from the load
//! table, right after a report arrives and every [`REFRESH`] while any peer
//! is fresh (estimates move with the reports' age; a report that expires
//! takes its load with it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::Gossip;
use crate::balancer::Backend;
use crate::routing::GroupRuntime;

/// Recompute at least this often while a peer is fresh. The simulator gave
/// the same balance with 0.5 to 20 ms (reports trigger refreshes anyway).
pub(super) const REFRESH: Duration = Duration::from_millis(5);
/// Shortest pause between two refreshes.
const MIN_GAP: Duration = Duration::from_millis(1);
/// A refresh may take at most this share of the time (of one core) when
/// reports arrive faster than refreshes complete.
const MAX_SHARE: u32 = 5;

pub(super) async fn run(gossip: Arc<Gossip>, cancel: CancellationToken) {
    let mut active = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = gossip.report_arrived.notified() => {}
            () = sleep(REFRESH), if active => {}
        }
        let started = Instant::now();
        active = apply(&gossip, started);
        let gap = (started.elapsed() * (MAX_SHARE - 1)).max(MIN_GAP);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep(gap) => {}
        }
    }
}

/// Sets every backend's peer load from the fresh reports at `now`; whether
/// any peer is fresh.
pub(super) fn apply(gossip: &Gossip, now: Instant) -> bool {
    let routes = gossip.dataplane.routes.load();
    let mut updates: Vec<(&GroupRuntime, &Backend, u64)> = Vec::new();
    let fresh = {
        let table = gossip.lock();
        let fresh = table.fresh_peers(now) > 0;
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
        fresh
    };
    // The group locks are taken after the table's is released.
    for (group, backend, load) in updates {
        group.balancer.set_peer_load(backend, load);
    }
    fresh
}
