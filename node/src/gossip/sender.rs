//! The sender: builds this node's report when counts change (at most every
//! `gossip_min_interval`) or when a heartbeat is due (`gossip_interval`),
//! both jittered by ±20 %; an idle node every third of `gossip_ttl` on the
//! wall clock's grid (see `gossip::SendSchedule`); and publishes it to the
//! links.

use std::sync::Arc;

use ::gossip::{SendSchedule, Tracker};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Gossip, unix_ms};
use crate::balancer::LoadChanged;

pub(super) async fn run(
    gossip: Arc<Gossip>,
    mut tracker: Tracker,
    changed: Arc<LoadChanged>,
    reports: Arc<watch::Sender<Option<Bytes>>>,
    cancel: CancellationToken,
) {
    // The timers are the simulator's too (gossip::SendSchedule).
    let mut schedule = SendSchedule::new(&gossip.config, Instant::now().into_std());
    loop {
        let heartbeat = Instant::from_std(schedule.heartbeat());
        let beat = tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep_until(heartbeat) => true,
            () = changed.raised() => {
                if !changed.is_raised() {
                    continue; // a stale wake-up
                }
                let next = schedule.coalesced(Instant::now().into_std(), &mut rand::rng());
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = sleep_until(Instant::from_std(next)) => {}
                }
                false
            }
        };
        changed.take();
        let now = Instant::now();
        // With nobody to tell (no peers, or their links are starting), the
        // counters are still sampled at every heartbeat: the tracker's
        // deltas must not span too many completions (see LoadCounters).
        if !beat && reports.receiver_count() == 0 {
            schedule.sampled(now.into_std(), unix_ms(), None, &mut rand::rng());
            continue;
        }
        let routes = gossip.dataplane.routes.load();
        let counters = routes
            .groups()
            .flat_map(|g| g.backends.values())
            .map(|b| (b.uuid.into_bytes(), b.counters()));
        let wall = unix_ms();
        let report = tracker.report(now.into_std(), wall, counters);
        // The next heartbeat, sooner while short work in flight may turn
        // long-lived, later when the node is idle (see gossip::SendSchedule).
        schedule.sampled(
            now.into_std(),
            wall,
            Some((&report, true)),
            &mut rand::rng(),
        );
        match ::gossip::encode(&report) {
            Ok(bytes) => {
                debug!(
                    seq = report.seq,
                    entries = report.entries.len(),
                    bytes = bytes.len(),
                    "report built"
                );
                reports.send_replace(Some(Bytes::from(bytes)));
            }
            Err(e) => warn!(error = %e, "report not sent"),
        }
    }
}
