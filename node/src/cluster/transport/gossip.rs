//! Load gossip on the cluster endpoint (ALPN `edgelb-gossip/2`, or
//! `edgelb-gossip/1` with a peer that offers only that).
//!
//! ```text
//!  sender: GossipLink::send(report)          receiver: serve(conn)
//!    ≤ DATAGRAM_MAX and ≤ the path's  ──datagram──▶ read_datagram ─┐
//!    max_datagram_size()                                          ├─▶ receive(bytes)
//!    else one unidirectional stream   ──uni, FIN──▶ read_to_end ──┘   decode
//!    per report (≤ MAX_REPORT_LEN)          (≤ MAX_REPORT_LEN,        node_id ≟ certificate
//!                                            REPORT_TIMEOUT)          node_id ≠ this node
//!                                                                     └─▶ GossipHandler::report
//! ```
//!
//! One gossip connection per peer and direction, separate from the Raft
//! connections. A report travels alone: one datagram or one stream, never
//! split, so a lost datagram costs one report's freshness and nothing else
//! (reports carry absolute counts; a delta whose base was lost is dropped
//! by the receiver until the next full report, see `gossip::Reassembler`).
//!
//! Every report must come from the node its client certificate names
//! (webpki `verify_is_valid_for_subject_name(node-<id>.cluster.edgelb)`, as
//! for Raft streams). Input that is not a valid report from that node is
//! dropped and counted ([`Dropped`]), never trusted and never a panic: a
//! report in another node's name closes the connection at once (the peer
//! lies or is misconfigured), and [`MAX_STRIKES`] bad inputs in a row close
//! it too. This node's own reports (a loop, or a second process with the
//! same id and certificate) are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ::gossip::{Arrival, DATAGRAM_MAX, MAX_REPORT_LEN, Wire};
use bytes::Bytes;
use quinn::{Connection, ReadToEndError, RecvStream, SendDatagramError};
use raft_store::NodeId;
use tokio::time::timeout;
use tracing::{Instrument, debug, warn};

use super::peer::{Peer, Role};
use super::{Shared, TransportError, bump, codes};
use crate::cluster::tls::{ALPN_GOSSIP_2, negotiated_alpn};

/// How long a report on a stream may take to arrive once the stream opened.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sending one report on a stream may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Bad inputs in a row after which a gossip connection is closed.
pub const MAX_STRIKES: u32 = 8;

/// Why gossip input was dropped before it became a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// Not a valid report (wrong version, truncated, bad entries), or a
    /// stream that did not finish in time.
    Malformed,
    /// The report names another node than the sender's certificate.
    Identity,
    /// A stream longer than the largest valid report.
    Oversized,
    /// The report is this node's own.
    Own,
}

impl Dropped {
    /// The `reason` label of `edgelb_gossip_reports_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Identity => "identity",
            Self::Oversized => "oversized",
            Self::Own => "self",
        }
    }
}

/// What the receiving side of the transport hands over. Both methods run
/// on the transport's tasks and must not block.
pub trait GossipHandler: Send + Sync + 'static {
    /// A decoded report whose `node_id` the sender's certificate proves
    /// (not this node's); it was `bytes` long on the wire, and `arrival`
    /// dates it (receipt, less half the connection's round-trip time).
    fn report(&self, report: Wire, bytes: usize, arrival: Arrival);
    /// `bytes` of input that were dropped, and why.
    fn dropped(&self, reason: Dropped, bytes: usize);
}

/// How a report was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Datagram,
    Stream,
}

/// An outgoing gossip connection to one peer.
#[derive(Debug)]
pub struct GossipLink {
    target: NodeId,
    conn: Connection,
    compact: bool,
}

impl GossipLink {
    pub(super) fn new(target: NodeId, conn: Connection) -> Self {
        let compact = negotiated_alpn(&conn).as_deref() == Some(ALPN_GOSSIP_2);
        Self {
            target,
            conn,
            compact,
        }
    }

    /// Whether the peer reads compact full reports (version 3): it agreed
    /// on `edgelb-gossip/2`.
    pub fn compact(&self) -> bool {
        self.compact
    }

    /// The peer's node id.
    pub fn target(&self) -> NodeId {
        self.target
    }

    /// Whether the connection is closed (then make a new one).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// The largest datagram the connection takes now, if any.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }

    /// Sends one encoded report: as a datagram when it fits in
    /// [`DATAGRAM_MAX`] and in what the path takes, else on its own
    /// unidirectional stream (waiting at most [`SEND_TIMEOUT`]).
    pub async fn send(&self, report: Bytes) -> Result<Via, TransportError> {
        let fits = report.len() <= DATAGRAM_MAX
            && self
                .conn
                .max_datagram_size()
                .is_some_and(|max| report.len() <= max);
        if fits {
            match self.conn.send_datagram(report.clone()) {
                Ok(()) => return Ok(Via::Datagram),
                Err(SendDatagramError::ConnectionLost(e)) => {
                    return Err(TransportError::ConnectionLost(e));
                }
                // The path shrank, or the peer takes no datagrams after all.
                Err(e) => {
                    debug!(target = self.target, error = %e, "datagram refused, using a stream")
                }
            }
        }
        let send = async {
            let mut stream = self
                .conn
                .open_uni()
                .await
                .map_err(TransportError::ConnectionLost)?;
            if let Err(e) = stream.write_all(&report).await {
                return Err(TransportError::Stream(e.to_string()));
            }
            // Open until now: finishing cannot fail.
            let _ = stream.finish();
            Ok(Via::Stream)
        };
        timeout(SEND_TIMEOUT, send)
            .await
            .map_err(|_| TransportError::Timeout(SEND_TIMEOUT))?
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(codes::SHUTDOWN, b"gossip link closed");
    }
}

impl Drop for GossipLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// A gossip peer as the receiving side sees it.
struct Sender {
    peer: Peer,
    /// Bad inputs since the last good report.
    strikes: AtomicU32,
}

/// Serves an incoming gossip connection until it closes.
pub(super) async fn serve(shared: Arc<Shared>, conn: Connection) {
    bump(&shared.stats.gossip_connections_accepted);
    let Some(peer) = Peer::of(&shared, &conn, Role::Gossip) else {
        return;
    };
    let sender = Arc::new(Sender {
        peer,
        strikes: AtomicU32::new(0),
    });
    debug!("gossip connection accepted");
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(bytes) => receive(&shared, &sender, &bytes),
                Err(e) => return closed(&e),
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let read = read_stream(Arc::clone(&shared), Arc::clone(&sender), recv);
                    tokio::spawn(read.in_current_span());
                }
                Err(e) => return closed(&e),
            },
            // Gossip is one-way: a bidirectional stream is refused.
            bi = conn.accept_bi() => match bi {
                Ok((mut send, mut recv)) => {
                    let _ = send.reset(codes::UNSUPPORTED);
                    let _ = recv.stop(codes::UNSUPPORTED);
                }
                Err(e) => return closed(&e),
            },
        }
    }
}

fn closed(e: &quinn::ConnectionError) {
    debug!(reason = %e, "gossip connection closed");
}

async fn read_stream(shared: Arc<Shared>, sender: Arc<Sender>, mut recv: RecvStream) {
    match timeout(REPORT_TIMEOUT, recv.read_to_end(MAX_REPORT_LEN)).await {
        Ok(Ok(bytes)) => receive(&shared, &sender, &bytes),
        Ok(Err(ReadToEndError::TooLong)) => {
            let _ = recv.stop(codes::BAD_FRAME);
            reject(&shared, &sender, Dropped::Oversized, MAX_REPORT_LEN);
        }
        // Reset by the sender (it gave up) or the connection went away.
        Ok(Err(ReadToEndError::Read(e))) => debug!(error = %e, "gossip stream ended"),
        Err(_) => {
            let _ = recv.stop(codes::TIMEOUT);
            debug!("gossip stream timed out");
            reject(&shared, &sender, Dropped::Malformed, 0);
        }
    }
}

/// Handles one report's bytes from `sender`.
fn receive(shared: &Arc<Shared>, sender: &Sender, bytes: &[u8]) {
    let report = match ::gossip::decode_wire(bytes) {
        Ok(report) => report,
        Err(e) => {
            debug!(error = %e, len = bytes.len(), "malformed gossip report");
            return reject(shared, sender, Dropped::Malformed, bytes.len());
        }
    };
    if !sender.peer.proves(shared, report.node_id()) {
        bump(&shared.stats.identity_refused);
        reject(shared, sender, Dropped::Identity, bytes.len());
        sender.peer.conn.close(
            codes::IDENTITY,
            b"certificate does not name the reporting node",
        );
        return;
    }
    if report.node_id() == shared.node_id {
        debug!("own gossip report dropped");
        return reject(shared, sender, Dropped::Own, bytes.len());
    }
    sender.strikes.store(0, Ordering::Relaxed);
    bump(&shared.stats.gossip_reports);
    match shared.gossip.get() {
        Some(handler) => {
            let arrival = Arrival::with_rtt(Instant::now(), sender.peer.conn.rtt());
            handler.report(report, bytes.len(), arrival);
        }
        None => debug!("gossip report before the handler was set"),
    }
}

/// Counts dropped input and closes the connection after too many in a row.
fn reject(shared: &Shared, sender: &Sender, reason: Dropped, bytes: usize) {
    bump(&shared.stats.gossip_dropped);
    if let Some(handler) = shared.gossip.get() {
        handler.dropped(reason, bytes);
    }
    let strikes = sender.strikes.fetch_add(1, Ordering::Relaxed) + 1;
    if strikes >= MAX_STRIKES {
        warn!(
            strikes,
            "closing a gossip connection after repeated bad reports"
        );
        sender
            .peer
            .conn
            .close(codes::BAD_REPORTS, b"too many bad gossip reports");
    }
}
