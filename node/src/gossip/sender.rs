//! The sender: builds this node's report when counts change (at most every
//! `gossip_min_interval`) or when a heartbeat is due (`gossip_interval`),
//! both jittered by ±20 %, and publishes it to the links.

use std::sync::Arc;
use std::time::Duration;

use ::gossip::Tracker;
use bytes::Bytes;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Gossip, unix_ms};
use crate::balancer::LoadChanged;

/// Report timers are drawn from `interval × (1 ± JITTER)`: aligned timers
/// across nodes are the worst case for herding.
pub(super) const JITTER: f64 = 0.2;

/// `interval` jittered by ±[`JITTER`].
pub(super) fn jittered<R: Rng + ?Sized>(interval: Duration, rng: &mut R) -> Duration {
    interval.mul_f64(rng.random_range(1.0 - JITTER..=1.0 + JITTER))
}

pub(super) async fn run(
    gossip: Arc<Gossip>,
    mut tracker: Tracker,
    changed: Arc<LoadChanged>,
    reports: Arc<watch::Sender<Option<Bytes>>>,
    cancel: CancellationToken,
) {
    let (min_interval, interval) = (gossip.config.min_interval, gossip.config.interval);
    let mut last: Option<Instant> = None;
    let mut heartbeat = Instant::now();
    loop {
        let beat = tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep_until(heartbeat) => true,
            () = changed.raised() => {
                if !changed.is_raised() {
                    continue; // a stale wake-up
                }
                if let Some(last) = last {
                    let next = last + jittered(min_interval, &mut rand::rng());
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = sleep_until(next) => {}
                    }
                }
                false
            }
        };
        changed.take();
        let now = Instant::now();
        last = Some(now);
        heartbeat = now + jittered(interval, &mut rand::rng());
        // With nobody to tell (no peers, or their links are starting), the
        // counters are still sampled at every heartbeat: the tracker's
        // deltas must not span too many completions (see LoadCounters).
        if !beat && reports.receiver_count() == 0 {
            continue;
        }
        let routes = gossip.dataplane.routes.load();
        let counters = routes
            .groups()
            .flat_map(|g| g.backends.values())
            .map(|b| (b.uuid.into_bytes(), b.counters()));
        let report = tracker.report(now.into_std(), unix_ms(), counters);
        // Short work in flight becomes long-lived (counted by peers without
        // decay) within LONG_FLOOR of crossing its threshold, which is no
        // count change: look again that soon, so that a slow request never
        // fades from peers' estimates for a whole heartbeat (SPEC §3 (c)).
        if report.entries.iter().any(|e| e.inflight > e.long_inflight) {
            let soon = now + jittered(::gossip::LONG_FLOOR, &mut rand::rng());
            heartbeat = heartbeat.min(soon);
        }
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
