//! One link per peer: a gossip connection of its own, and every new report
//! sent on it: as a delta when the link sent the report the delta is based
//! on (on this connection), else in full. A link that cannot connect skips
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

use super::{Gossip, Peers, Published};
use crate::cluster::{GossipLink, Transport};

/// Connecting to a peer may take this long: a few round trips of the
/// slowest link the cluster runs on (300 ms).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// First wait after a failed connect or send; doubles up to [`MAX_BACKOFF`],
/// short enough that reports flow again within a second of a peer coming
/// back.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Keeps one link task per peer in `peers`, and forgets the reports of
/// peers that leave.
pub(super) async fn run(
    gossip: Arc<Gossip>,
    transport: Arc<Transport>,
    mut peers: watch::Receiver<Peers>,
    reports: Arc<watch::Sender<Option<Arc<Published>>>>,
    cancel: CancellationToken,
) {
    let mut running: HashMap<u64, (String, AbortHandle)> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut membership_changed = true;
    loop {
        if membership_changed {
            let current = peers.borrow_and_update().clone();
            running.retain(|id, (addr, task)| {
                let keep = current.get(id) == Some(addr);
                if !keep {
                    debug!(peer = id, "gossip link stopped");
                    task.abort();
                }
                keep
            });
            for (&id, addr) in &current {
                if running.contains_key(&id) {
                    continue;
                }
                let mut rx = reports.subscribe();
                // Send the latest report at once.
                rx.mark_changed();
                let span = debug_span!("gossip_link", peer = id, %addr);
                let link = link(
                    gossip.clone(),
                    transport.clone(),
                    id,
                    addr.clone(),
                    rx,
                    cancel.clone(),
                );
                running.insert(id, (addr.clone(), tasks.spawn(link.instrument(span))));
            }
            gossip.retain_peers(&current);
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = peers.changed() => {
                if changed.is_err() {
                    break;
                }
                membership_changed = true;
            }
            Some(_) = tasks.join_next() => membership_changed = false,
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
                // Its old process is gone; so is the Raft connection to it.
                transport.peer_restarted(id);
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
        let report = published.for_link(sent).clone();
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
