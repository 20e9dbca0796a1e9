//! Load gossip over QUIC (quinn): the sending side of one peer's gossip
//! connection ([`GossipLink`]) and the receiving side of one that a peer
//! opened ([`serve`]). The node opens and accepts the connections on its
//! one cluster endpoint (ALPN `edgelb-gossip/2`, or `edgelb-gossip/1` with
//! a peer that offers only that) and tells this module who the peer is.
//!
//! ```text
//!  sender: GossipLink::send(report)          receiver: serve(conn, peer)
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
//! by the receiver until the next full report, see [`Reassembler`](crate::Reassembler)).
//!
//! Every report must come from the node the peer's client certificate
//! names ([`Peer::proves`]: for the node, webpki's
//! `verify_is_valid_for_subject_name(node-<id>.cluster.edgelb)`, as for
//! Raft streams). Input that is not a valid report from that node is
//! dropped and counted ([`Dropped`]), never trusted and never a panic: a
//! report in another node's name closes the connection at once (the peer
//! lies or is misconfigured), and [`MAX_STRIKES`] bad inputs in a row close
//! it too. This node's own reports (a loop, or a second process with the
//! same id and certificate) are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, ReadToEndError, RecvStream, SendDatagramError};
use tokio::time::timeout;
use tracing::{Instrument, debug, warn};

use crate::{Arrival, DATAGRAM_MAX, MAX_REPORT_LEN, Wire, decode_wire};

/// How long a report on a stream may take to arrive once the stream opened.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sending one report on a stream may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Bad inputs in a row after which a gossip connection is closed.
pub const MAX_STRIKES: u32 = 8;

/// Application error codes on the cluster endpoint's connections and
/// streams, gossip's and Raft's alike.
pub mod codes {
    use quinn::VarInt;

    /// The endpoint is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0x00);
    /// A report or stream header claimed a node id the certificate does
    /// not name (closes the connection).
    pub const IDENTITY: VarInt = VarInt::from_u32(0x01);
    /// An oversized or malformed frame (resets the stream).
    pub const BAD_FRAME: VarInt = VarInt::from_u32(0x02);
    /// A frame did not arrive in time (resets the stream).
    pub const TIMEOUT: VarInt = VarInt::from_u32(0x03);
    /// The negotiated ALPN is not served by this node (closes the
    /// connection), or a stream of a kind the ALPN does not use (stops it).
    pub const UNSUPPORTED: VarInt = VarInt::from_u32(0x04);
    /// Too many bad gossip reports in a row (closes the connection).
    pub const BAD_REPORTS: VarInt = VarInt::from_u32(0x05);
    /// The peer opened more connections than a node keeps from one
    /// certificate: its oldest is closed.
    pub const TOO_MANY: VarInt = VarInt::from_u32(0x06);
}

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

/// What the receiving side hands over. Both methods run on the
/// transport's tasks and must not block.
pub trait GossipHandler: Send + Sync + 'static {
    /// A decoded report whose `node_id` the sender's certificate proves
    /// (not this node's); it was `bytes` long on the wire, and `arrival`
    /// dates it (receipt, less half the connection's round-trip time).
    fn report(&self, report: Wire, bytes: usize, arrival: Arrival);
    /// `bytes` of input that were dropped, and why.
    fn dropped(&self, reason: Dropped, bytes: usize);
}

/// The peer of an accepted gossip connection, as the node knows it.
pub trait Peer: Send + Sync + 'static {
    /// Whether the peer's certificate names node `id`. `false` closes the
    /// connection ([`codes::IDENTITY`]).
    fn proves(&self, id: u64) -> bool;
}

/// How a report was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Datagram,
    Stream,
}

/// Why a report was not sent; the link is then to be made anew.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(#[source] ConnectionError),
    /// The report's stream failed.
    #[error("report stream: {0}")]
    Stream(String),
    /// The report's stream did not finish within [`SEND_TIMEOUT`].
    #[error("report not sent within {0:?}")]
    Timeout(Duration),
}

/// An outgoing gossip connection to one peer.
#[derive(Debug)]
pub struct GossipLink {
    target: u64,
    conn: Connection,
    compact: bool,
}

impl GossipLink {
    /// A link to node `target` on `conn`; `compact` when the peer reads
    /// compact full reports (version 3: it agreed on `edgelb-gossip/2`).
    pub fn new(target: u64, conn: Connection, compact: bool) -> Self {
        Self {
            target,
            conn,
            compact,
        }
    }

    /// Whether the peer reads compact full reports.
    pub fn compact(&self) -> bool {
        self.compact
    }

    /// The peer's node id.
    pub fn target(&self) -> u64 {
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
    pub async fn send(&self, report: Bytes) -> Result<Via, SendError> {
        let fits = report.len() <= DATAGRAM_MAX
            && self
                .conn
                .max_datagram_size()
                .is_some_and(|max| report.len() <= max);
        if fits {
            match self.conn.send_datagram(report.clone()) {
                Ok(()) => return Ok(Via::Datagram),
                Err(SendDatagramError::ConnectionLost(e)) => {
                    return Err(SendError::ConnectionLost(e));
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
                .map_err(SendError::ConnectionLost)?;
            if let Err(e) = stream.write_all(&report).await {
                return Err(SendError::Stream(e.to_string()));
            }
            // Open until now: finishing cannot fail.
            let _ = stream.finish();
            Ok(Via::Stream)
        };
        timeout(SEND_TIMEOUT, send)
            .await
            .map_err(|_| SendError::Timeout(SEND_TIMEOUT))?
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

/// One accepted gossip connection's receiving side.
struct Receiver<P, H> {
    conn: Connection,
    this_node: u64,
    peer: P,
    handler: H,
    /// Bad inputs since the last good report.
    strikes: AtomicU32,
}

/// Serves a gossip connection that `peer` opened to node `this_node` until
/// it closes, handing its reports to `handler`.
pub async fn serve<P: Peer, H: GossipHandler>(
    conn: Connection,
    this_node: u64,
    peer: P,
    handler: H,
) {
    let receiver = Arc::new(Receiver {
        conn: conn.clone(),
        this_node,
        peer,
        handler,
        strikes: AtomicU32::new(0),
    });
    debug!("gossip connection accepted");
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(bytes) => receiver.receive(&bytes),
                Err(e) => return closed(&e),
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    tokio::spawn(read_stream(Arc::clone(&receiver), recv).in_current_span());
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

fn closed(e: &ConnectionError) {
    debug!(reason = %e, "gossip connection closed");
}

async fn read_stream<P: Peer, H: GossipHandler>(
    receiver: Arc<Receiver<P, H>>,
    mut recv: RecvStream,
) {
    match timeout(REPORT_TIMEOUT, recv.read_to_end(MAX_REPORT_LEN)).await {
        Ok(Ok(bytes)) => receiver.receive(&bytes),
        Ok(Err(ReadToEndError::TooLong)) => {
            let _ = recv.stop(codes::BAD_FRAME);
            receiver.reject(Dropped::Oversized, MAX_REPORT_LEN);
        }
        // Reset by the sender (it gave up) or the connection went away.
        Ok(Err(ReadToEndError::Read(e))) => debug!(error = %e, "gossip stream ended"),
        Err(_) => {
            let _ = recv.stop(codes::TIMEOUT);
            debug!("gossip stream timed out");
            receiver.reject(Dropped::Malformed, 0);
        }
    }
}

impl<P: Peer, H: GossipHandler> Receiver<P, H> {
    /// Handles one report's bytes.
    fn receive(&self, bytes: &[u8]) {
        let report = match decode_wire(bytes) {
            Ok(report) => report,
            Err(e) => {
                debug!(error = %e, len = bytes.len(), "malformed gossip report");
                return self.reject(Dropped::Malformed, bytes.len());
            }
        };
        if !self.peer.proves(report.node_id()) {
            self.reject(Dropped::Identity, bytes.len());
            self.conn.close(
                codes::IDENTITY,
                b"certificate does not name the reporting node",
            );
            return;
        }
        if report.node_id() == self.this_node {
            debug!("own gossip report dropped");
            return self.reject(Dropped::Own, bytes.len());
        }
        self.strikes.store(0, Ordering::Relaxed);
        let arrival = Arrival::with_rtt(Instant::now(), self.conn.rtt());
        self.handler.report(report, bytes.len(), arrival);
    }

    /// Counts dropped input and closes the connection after too many in a
    /// row.
    fn reject(&self, reason: Dropped, bytes: usize) {
        self.handler.dropped(reason, bytes);
        let strikes = self.strikes.fetch_add(1, Ordering::Relaxed) + 1;
        if strikes >= MAX_STRIKES {
            warn!(
                strikes,
                "closing a gossip connection after repeated bad reports"
            );
            self.conn
                .close(codes::BAD_REPORTS, b"too many bad gossip reports");
        }
    }
}

#[cfg(test)]
mod tests;
