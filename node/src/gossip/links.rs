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

/// The least time between two reconnections of a link for its peer's
/// restarts.
const RESTART_RECONNECT: Duration = Duration::from_secs(1);

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

/// What a link does when some peer is heard with a new incarnation.
#[derive(Debug)]
struct Restarts {
    /// The link's peer.
    id: u64,
    /// Its incarnation as the link last knew it.
    incarnation: Option<u64>,
    /// When the link last reconnected for one.
    reconnected: Option<Instant>,
}

impl Restarts {
    fn new(id: u64, incarnation: Option<u64>) -> Self {
        Self {
            id,
            incarnation,
            reconnected: None,
        }
    }

    /// When to reconnect, if at all, on hearing that `peer` restarted
    /// (none: the notices were too many to keep, lagged) while the load
    /// table holds `incarnation` of this link's peer. Another peer's
    /// restart, or lost notices that left this link's peer as it was,
    /// change nothing: a peer sending new incarnations over and over does
    /// not make every link reconnect. This link's own peer is reconnected
    /// to at most once a [`RESTART_RECONNECT`].
    fn heard(
        &mut self,
        peer: Option<u64>,
        incarnation: Option<u64>,
        now: Instant,
    ) -> Option<Instant> {
        if peer.is_some_and(|p| p != self.id) || incarnation == self.incarnation {
            return None;
        }
        self.incarnation = incarnation;
        let at = match self.reconnected {
            // One is already due: it will find the newest incarnation.
            Some(due) if due > now => due,
            Some(last) => (last + RESTART_RECONNECT).max(now),
            None => now,
        };
        self.reconnected = Some(at);
        Some(at)
    }
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
    let mut on_restart = Restarts::new(id, gossip.incarnation(id));
    let mut conn: Option<GossipLink> = None;
    // The last report sent on `conn`: the next may be a delta on it.
    let mut sent: Option<u64> = None;
    let mut backoff = INITIAL_BACKOFF;
    let mut retry_at = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = reports.changed() => if changed.is_err() { return },
            heard = restarts.recv() => {
                let at = on_restart.heard(heard.ok(), gossip.incarnation(id), Instant::now());
                if let Some(at) = at {
                    debug!("peer restarted: reconnecting");
                    conn = None;
                    backoff = INITIAL_BACKOFF;
                    retry_at = at;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A link reconnects for its own peer's new incarnation only, at most
    /// once a second, and lost notices (lagged) cost nothing unless its
    /// peer's incarnation changed.
    #[test]
    fn a_link_reconnects_for_its_own_peers_restarts_only_and_not_too_often() {
        let t0 = Instant::now();
        let mut r = Restarts::new(2, Some(10));
        assert_eq!(r.heard(Some(3), Some(10), t0), None, "another peer");
        assert_eq!(r.heard(None, Some(10), t0), None, "lagged, unchanged");
        assert_eq!(r.heard(Some(2), Some(10), t0), None, "already known");
        assert_eq!(r.heard(Some(2), Some(11), t0), Some(t0));
        let soon = t0 + Duration::from_millis(10);
        assert_eq!(
            r.heard(None, Some(12), soon),
            Some(t0 + RESTART_RECONNECT),
            "lagged, changed"
        );
        // A flood: one reconnection a second, not pushed further off.
        assert_eq!(
            r.heard(Some(2), Some(13), soon),
            Some(t0 + RESTART_RECONNECT)
        );
        let next = t0 + RESTART_RECONNECT + Duration::from_millis(1);
        assert_eq!(
            r.heard(Some(2), Some(14), next),
            Some(t0 + RESTART_RECONNECT * 2)
        );
        let later = t0 + RESTART_RECONNECT * 5;
        assert_eq!(r.heard(Some(2), Some(15), later), Some(later));
        assert_eq!(r.heard(Some(3), Some(99), later), None);
    }
}
