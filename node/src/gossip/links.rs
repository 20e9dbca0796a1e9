//! One link per peer: a gossip connection of its own, and every new report
//! sent on it: as a delta when the link sent the report the delta is based
//! on (on this connection), else in full: compact (version 3) when the
//! peer agreed on `edgelb-gossip/2`, version 1 for a peer of an earlier
//! version. A link that cannot connect skips
//! reports (the next one carries the same absolute counts, in full) and
//! retries with a backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use ::gossip::Stream;

use super::{Gossip, Peers, Published, Streams};
use crate::cluster::{GossipLink, Transport};

/// Connecting to a peer may take this long: a few round trips of the
/// slowest link the cluster runs on (300 ms).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// First wait after a failed connect or send; doubles up to [`MAX_BACKOFF`],
/// short enough that reports flow again within a second of a peer coming
/// back.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The plan is looked at again this often (besides membership changes): a
/// region peer that died or came back moves the aggregates' senders.
const REPLAN: Duration = Duration::from_secs(1);

/// Keeps one link task per peer that the plan gives something to send
/// (`gossip::plan`: own reports inside the region, the region's aggregate
/// to the members of other regions assigned to this node), and forgets the
/// reports of peers that leave.
pub(super) async fn run(
    gossip: Arc<Gossip>,
    transport: Arc<Transport>,
    mut peers: watch::Receiver<Peers>,
    streams: Streams,
    cancel: CancellationToken,
) {
    let mut running: HashMap<u64, (String, Stream, AbortHandle)> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut replan = true;
    loop {
        if replan {
            let current = peers.borrow_and_update().clone();
            gossip.set_peers(&current);
            let plan = gossip.plan(&current, std::time::Instant::now());
            running.retain(|id, (addr, stream, task)| {
                let keep = current.get(id).is_some_and(|p| p.addr == *addr)
                    && plan.stream(*id) == Some(*stream);
                if !keep {
                    debug!(peer = id, "gossip link stopped");
                    task.abort();
                }
                keep
            });
            for (&id, peer) in &current {
                let Some(stream) = plan.stream(id) else {
                    continue;
                };
                if running.contains_key(&id) {
                    continue;
                }
                let mut rx = match stream {
                    Stream::Own => streams.own.subscribe(),
                    Stream::Aggregate => streams.aggregate.subscribe(),
                };
                // Send the latest report at once.
                rx.mark_changed();
                let addr = &peer.addr;
                let span = debug_span!("gossip_link", peer = id, %addr, ?stream);
                let link = link(
                    gossip.clone(),
                    transport.clone(),
                    id,
                    addr.clone(),
                    rx,
                    cancel.clone(),
                );
                let task = tasks.spawn(link.instrument(span));
                running.insert(id, (addr.clone(), stream, task));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = peers.changed() => {
                if changed.is_err() {
                    break;
                }
                replan = true;
            }
            () = tokio::time::sleep(REPLAN) => replan = true,
            Some(_) = tasks.join_next() => replan = false,
        }
    }
    tasks.shutdown().await;
}

/// Sends every new report to peer `id` at `addr` until cancelled.
async fn link(
    gossip: Arc<Gossip>,
    transport: Arc<Transport>,
    id: u64,
    addr: String,
    mut reports: watch::Receiver<Option<Arc<Published>>>,
    cancel: CancellationToken,
) {
    let metrics = &gossip.metrics.gossip;
    let mut restarts = gossip.restarts();
    let mut conn: Option<GossipLink> = None;
    // The last report sent on `conn`: the next may be a delta on it.
    let mut sent: Option<u64> = None;
    let mut backoff = INITIAL_BACKOFF;
    let mut retry_at = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = reports.changed() => if changed.is_err() { return },
            restarted = restarts.recv() => {
                // A lagged receiver may have missed this peer: reconnect.
                if restarted.is_ok_and(|p| p != id) {
                    continue;
                }
                debug!("peer restarted: reconnecting");
                conn = None;
                backoff = INITIAL_BACKOFF;
                retry_at = Instant::now();
                continue;
            }
        }
        let Some(published) = reports.borrow_and_update().clone() else {
            continue;
        };
        if conn.as_ref().is_some_and(GossipLink::is_closed) {
            debug!("gossip connection closed");
            conn = None;
        }
        if conn.is_none() {
            sent = None;
        }
        let link = match &conn {
            Some(link) => link,
            None if Instant::now() < retry_at => continue,
            None => match transport.gossip_connect(id, &addr, CONNECT_TIMEOUT).await {
                Ok(link) => conn.insert(link),
                Err(e) => {
                    debug!(error = %e, ?backoff, "gossip connect failed");
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let report = published.for_link(sent, link.compact()).clone();
        let len = report.len();
        match link.send(report).await {
            Ok(via) => {
                sent = Some(published.seq);
                metrics.sent.inc();
                metrics.bytes_tx.inc_by(len as u64);
                backoff = INITIAL_BACKOFF;
                debug!(?via, len, "report sent");
            }
            Err(e) => {
                debug!(error = %e, ?backoff, "report not sent");
                conn = None;
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
