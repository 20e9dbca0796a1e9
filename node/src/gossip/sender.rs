//! The sender: builds this node's report when counts change (at most every
//! `gossip_min_interval`) or when a heartbeat is due (`gossip_interval`),
//! both jittered by ±20 %; an idle node every third of `gossip_ttl` on the
//! wall clock's grid (see `gossip::SendSchedule`); and publishes it to the
//! links.

use std::sync::Arc;

use ::gossip::{DeltaEncoder, Encoded, SendSchedule, Tracker};
use bytes::Bytes;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Gossip, Streams, unix_ms};
use crate::balancer::LoadChanged;

/// A report as the links get it.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) seq: u64,
    /// The whole report (version 1).
    pub(crate) full: Bytes,
    /// The whole report in the compact version 3, for peers that read it.
    pub(crate) compact: Bytes,
    /// The delta on report `.0`, for a link that sent that one (none when
    /// a full report is due).
    pub(crate) delta: Option<(u64, Bytes)>,
}

impl From<Encoded> for Published {
    fn from(e: Encoded) -> Self {
        Self {
            seq: e.seq,
            full: Bytes::from(e.full),
            compact: Bytes::from(e.compact),
            delta: e.delta.map(|(base, d)| (base, Bytes::from(d))),
        }
    }
}

impl Published {
    /// What a link that last sent report `sent` (none: nothing yet on this
    /// connection) sends: the delta when it follows on from `sent`, else
    /// the full report, compact when the peer reads it (`compact`).
    pub(crate) fn for_link(&self, sent: Option<u64>, compact: bool) -> &Bytes {
        match &self.delta {
            Some((base, delta)) if sent == Some(*base) => delta,
            _ if compact => &self.compact,
            _ => &self.full,
        }
    }
}

pub(super) async fn run(
    gossip: Arc<Gossip>,
    mut tracker: Tracker,
    changed: Arc<LoadChanged>,
    streams: Streams,
    cancel: CancellationToken,
) {
    let reports = &streams.own;
    let mut encoder = DeltaEncoder::new();
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
        if !beat && reports.receiver_count() == 0 && streams.aggregate.receiver_count() == 0 {
            schedule.sampled(now.into_std(), unix_ms(), None, &mut rand::rng());
            continue;
        }
        // The instances ever picked and still attached, not the whole
        // table: a report costs what carried work.
        let picked = changed.picked();
        let counters = picked.iter().map(|b| (b.uuid.into_bytes(), b.counters()));
        let wall = unix_ms();
        let report = tracker.report(now.into_std(), wall, counters);
        let full = schedule.full_due(now.into_std());
        // The next heartbeat, sooner while short work in flight may turn
        // long-lived, later when the node is idle in a large fleet (see
        // gossip::SendSchedule): the peers of its own reports decide.
        schedule.set_targets(reports.receiver_count());
        schedule.sampled(
            now.into_std(),
            wall,
            Some((&report, full)),
            &mut rand::rng(),
        );
        {
            // The region's aggregate follows this node's changes.
            let mut own = super::locked(&gossip.own);
            if **own != report.entries {
                *own = Arc::new(report.entries.clone());
                gossip.region_changed.notify_one();
            }
        }
        match encoder.next(&report, full) {
            Ok(encoded) => {
                debug!(
                    seq = report.seq,
                    entries = report.entries.len(),
                    bytes = encoded.full.len(),
                    delta = encoded.delta.as_ref().map(|(_, d)| d.len()),
                    "report built"
                );
                reports.send_replace(Some(Arc::new(Published::from(encoded))));
            }
            Err(e) => warn!(error = %e, "report not sent"),
        }
    }
}
