//! The aggregator: this node's region's load (its own latest report and
//! its region peers' fresh ones, summed by `gossip::aggregate`), sent to
//! the members of other regions that the plan assigns to this node (see
//! `gossip::plan`).
//!
//! It runs the same send schedule as the node's own reports
//! (`gossip::SendSchedule`: full report at least every `gossip_interval`,
//! deltas between, idle on the wall-clock grid), with changes coalesced to
//! at most one aggregate every [`MIN_INTERVAL`] (or `gossip_min_interval`
//! if longer): across regions the reports spend tens of milliseconds in
//! transit anyway, and a region's sum changes with every pick of any of
//! its members. Its reports are in this node's name, with this start's
//! incarnation and their own sequence numbers (no receiver hears both
//! streams of one node).
//!
//! A node that has just started sends no aggregate until it has a fresh
//! report from each of its region peers, or for one TTL at most (a peer
//! silent that long is down): a remote node keeps the latest aggregate of
//! a region for the whole region, and a sum made before the peers were
//! heard would leave their load out.

use std::sync::Arc;
use std::time::Duration;

use ::gossip::{DeltaEncoder, Report, SendSchedule};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Gossip, Published, Streams, unix_ms};

/// Shortest time between two aggregates.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(20);

pub(super) async fn run(
    gossip: Arc<Gossip>,
    incarnation: u64,
    streams: Streams,
    cancel: CancellationToken,
) {
    let aggregates = &streams.aggregate;
    let config = ::gossip::Config {
        min_interval: gossip.config.min_interval.max(MIN_INTERVAL),
        ..gossip.config.clone()
    };
    let started = Instant::now().into_std();
    let mut schedule = SendSchedule::new(&config, started);
    let mut encoder = DeltaEncoder::new();
    let mut seq = 0u64;
    loop {
        let heartbeat = Instant::from_std(schedule.heartbeat());
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep_until(heartbeat) => {}
            () = gossip.region_changed.notified() => {
                let next = schedule.coalesced(Instant::now().into_std(), &mut rand::rng());
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = sleep_until(Instant::from_std(next)) => {}
                }
            }
        }
        let now = Instant::now().into_std();
        let wall = unix_ms();
        // Nobody in another region to tell; or this node has just started
        // and not yet heard every region peer: its sum would leave them
        // out, and a receiver takes the latest aggregate of a region for
        // the whole of it. A peer still silent after the TTL is down.
        let ready = (aggregates.receiver_count() > 0)
            .then(|| gossip.fresh_region_peers(now))
            .filter(|&(_, heard_all)| heard_all || now >= started + config.ttl);
        let Some((peers, _)) = ready else {
            schedule.sampled(now, wall, None, &mut rand::rng());
            continue;
        };
        seq += 1;
        let report = Report {
            node_id: gossip.node_id,
            incarnation,
            seq,
            sent_at_ms: wall,
            entries: gossip.region_sum(&peers),
        };
        let full = schedule.full_due(now);
        schedule.set_targets(streams.aggregate_targets());
        schedule.sampled(now, wall, Some((&report, full)), &mut rand::rng());
        match encoder.next(&report, full) {
            Ok(encoded) => {
                debug!(
                    seq,
                    entries = report.entries.len(),
                    bytes = encoded.full.len(),
                    "region aggregate built"
                );
                aggregates.send_replace(Some(Arc::new(Published::from(encoded))));
            }
            Err(e) => warn!(error = %e, "region aggregate not sent"),
        }
    }
}
