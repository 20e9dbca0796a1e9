//! The accepting side of the endpoint: handshake, ALPN dispatch, and one
//! task per RPC stream. Gossip connections go to [`super::gossip`]. The
//! Raft connections this node opens are served the same way
//! ([`serve_own`]): a peer may call on them too.
//!
//! A bad stream (oversized, malformed or late frame) is reset and counted;
//! the connection and the other streams go on. A stream that claims a node
//! id its certificate does not name closes the whole connection: the peer is
//! lying or misconfigured, and nothing else it sends can be trusted.

use std::io;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use raft_store::NodeId;
use tokio::time::timeout;
use tracing::{Instrument, debug, debug_span, warn};

use super::gossip;
use super::peer::{Peer, Role};
use super::{END_WAIT_MAX, END_WAIT_MIN, Shared, bump, codes};
use crate::cluster::frame::{self, FrameError, HEADER_LIMIT, HEADER_TIMEOUT, Version};
use crate::cluster::rpc::RpcReply;
use crate::cluster::tls::{
    ALPN_GOSSIP, ALPN_GOSSIP_2, ALPN_RAFT, ALPN_RAFT_2, negotiated_alpn, peer_leaf, spoken,
    verify_peer_id, version_refused,
};

/// Accepts connections until the endpoint closes.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let span = debug_span!("cluster_conn", remote = %incoming.remote_address());
        tokio::spawn(serve_incoming(Arc::clone(&shared), incoming).instrument(span));
    }
}

async fn serve_incoming(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            bump(&shared.stats.handshakes_failed);
            if version_refused(&e) {
                warn!(
                    speaks = %spoken(),
                    "refused a peer that offered no cluster protocol version this node \
                     speaks: it runs an incompatible release"
                );
            } else {
                debug!(error = %e, "handshake failed");
            }
            return;
        }
    };
    let _admitted = Admitted::new(&shared, &conn);
    match negotiated_alpn(&conn).as_deref() {
        Some(ALPN_RAFT | ALPN_RAFT_2) => serve_raft(shared, conn, Role::Inbound).await,
        Some(ALPN_GOSSIP | ALPN_GOSSIP_2) => gossip::serve(shared, conn).await,
        // rustls refuses ALPNs the server does not offer; this is for an
        // ALPN offered but not dispatched here.
        alpn => {
            bump(&shared.stats.unsupported_alpn);
            debug!(alpn = ?alpn.map(String::from_utf8_lossy), "alpn not served");
            conn.close(codes::UNSUPPORTED, b"protocol not served");
        }
    }
}

/// Connections a node keeps open from one certificate (one peer). A peer
/// needs one for Raft and one for gossip; those of a process that died
/// stay until the idle timeout, so a peer that restarted three times
/// within it holds six more. Past this, the oldest is closed: a peer's new
/// connection always gets in, and one holding a valid certificate cannot
/// make this node keep any number of connections (each with its receive
/// windows).
const PER_PEER: usize = 8;

/// An incoming connection counted under its certificate while it is
/// served.
struct Admitted {
    shared: Arc<Shared>,
    leaf: Vec<u8>,
    id: usize,
}

impl Admitted {
    /// Counts `conn` under its certificate, closing the peer's oldest if
    /// it now holds more than [`PER_PEER`]; `None` without a certificate
    /// (refused where it is served).
    fn new(shared: &Arc<Shared>, conn: &Connection) -> Option<Self> {
        let leaf = peer_leaf(conn)?.as_ref().to_vec();
        let oldest = {
            let mut incoming = shared
                .incoming
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let held = incoming.entry(leaf.clone()).or_default();
            held.push(conn.clone());
            (held.len() > PER_PEER).then(|| held.remove(0))
        };
        if let Some(oldest) = oldest {
            bump(&shared.stats.displaced);
            debug!(
                remote = %oldest.remote_address(),
                "a peer holds more connections than kept from one certificate: its oldest is closed"
            );
            oldest.close(
                codes::TOO_MANY,
                b"too many connections from one certificate",
            );
        }
        Some(Self {
            shared: Arc::clone(shared),
            leaf,
            id: conn.stable_id(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut incoming = self
            .shared
            .incoming
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = incoming.get_mut(&self.leaf) {
            held.retain(|c| c.stable_id() != self.id);
            if held.is_empty() {
                incoming.remove(&self.leaf);
            }
        }
    }
}

/// What a node sends, followed by its id, on a unidirectional stream of
/// each Raft connection it opens: it serves calls on that connection too,
/// so the peer may call it there (`Shared::raft_peer_connected`). A node of
/// an earlier release sends none, and is only called on connections it
/// accepted; it stops the stream, as it does any unidirectional one.
const TWO_WAY: &str = "edgelb-raft-two-way ";

/// How long the announcement may take to arrive once its stream opened.
const TWO_WAY_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the peer's calls on `conn`, a Raft connection this node opened
/// to `target`, until it closes, and tells the peer so.
pub(super) fn serve_own(shared: Arc<Shared>, conn: Connection, target: NodeId) {
    let span = debug_span!("cluster_conn", peer = target, own = true);
    let me = shared.node_id;
    let announce = {
        let conn = conn.clone();
        async move {
            let sent = async {
                let mut send = conn.open_uni().await?;
                send.write_all(format!("{TWO_WAY}{me}").as_bytes()).await?;
                let _ = send.finish();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            if let Err(e) = sent.await {
                debug!(error = %e, "two-way announcement not sent");
            }
        }
    };
    tokio::spawn(announce.instrument(span.clone()));
    tokio::spawn(serve_raft(shared, conn, Role::Own).instrument(span));
}

/// Reads a peer's announcement on a connection it opened (see
/// [`TWO_WAY`]); anything else is refused.
async fn two_way(shared: Arc<Shared>, peer: Arc<Peer>, mut recv: RecvStream) {
    let mut head = [0u8; TWO_WAY.len()];
    let id = async {
        timeout(TWO_WAY_TIMEOUT, recv.read_exact(&mut head))
            .await
            .ok()?
            .ok()?;
        if head != TWO_WAY.as_bytes() {
            return None;
        }
        let rest = timeout(TWO_WAY_TIMEOUT, recv.read_to_end(20))
            .await
            .ok()?
            .ok()?;
        std::str::from_utf8(&rest).ok()?.parse::<NodeId>().ok()
    }
    .await;
    match id {
        Some(id) if peer.proves(&shared, id) => shared.raft_peer_connected(id, &peer.conn),
        _ => {
            let _ = recv.stop(codes::UNSUPPORTED);
        }
    }
}

async fn serve_raft(shared: Arc<Shared>, conn: Connection, role: Role) {
    if role == Role::Inbound {
        bump(&shared.stats.connections_accepted);
    }
    let Some(peer) = Peer::of(&shared, &conn, role) else {
        return;
    };
    // Which node this is shows in its certificate; knowing it now, rather
    // than at its first call, lets a pending handshake of ours to it start
    // afresh at once (a peer that restarted reaches us before we reach it),
    // and calls use this connection at once if the peer announced two-way
    // calls before.
    if role == Role::Inbound
        && let Some(id) = shared
            .peer_ids()
            .into_iter()
            .find(|id| verify_peer_id(&peer.leaf, *id).is_ok())
    {
        peer.proves(&shared, id);
        shared.raft_peer_accepted(id, &conn);
    }
    let peer = Arc::new(peer);
    let version = Version::of(&conn);
    debug!(?role, ?version, "raft connection up");
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let stream =
                        serve_stream(Arc::clone(&shared), Arc::clone(&peer), version, send, recv);
                    tokio::spawn(stream.in_current_span());
                }
                Err(e) => {
                    debug!(reason = %e, "raft connection closed");
                    return;
                }
            },
            uni = conn.accept_uni() => match uni {
                // RPCs are bidirectional; a unidirectional stream is refused
                // unless it announces a connection served both ways.
                Ok(recv) if role == Role::Inbound => {
                    let read = two_way(Arc::clone(&shared), Arc::clone(&peer), recv);
                    tokio::spawn(read.in_current_span());
                }
                Ok(mut recv) => {
                    let _ = recv.stop(codes::UNSUPPORTED);
                }
                Err(e) => {
                    debug!(reason = %e, "raft connection closed");
                    return;
                }
            },
        }
    }
}

/// Why a stream is given up.
enum Failure {
    /// Oversized, malformed or truncated: reset and count.
    BadFrame(String),
    /// A frame did not arrive in time: reset and count.
    Late,
    /// The peer reset the stream or the connection went away.
    Gone(io::Error),
}

async fn read(recv: &mut RecvStream, limit: usize, wait: Duration) -> Result<Vec<u8>, Failure> {
    match timeout(wait, frame::read_frame(recv, limit)).await {
        Err(_) => Err(Failure::Late),
        Ok(Ok(body)) => Ok(body),
        Ok(Err(FrameError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(Failure::BadFrame("stream ended inside a frame".into()))
        }
        Ok(Err(FrameError::Io(e))) => Err(Failure::Gone(e)),
        Ok(Err(e)) => Err(Failure::BadFrame(e.to_string())),
    }
}

fn give_up(shared: &Shared, send: &mut SendStream, recv: &mut RecvStream, failure: Failure) {
    let code: VarInt = match failure {
        Failure::BadFrame(why) => {
            bump(&shared.stats.bad_frames);
            debug!(%why, "bad frame, resetting stream");
            codes::BAD_FRAME
        }
        Failure::Late => {
            bump(&shared.stats.read_timeouts);
            debug!("frame timed out, resetting stream");
            codes::TIMEOUT
        }
        Failure::Gone(e) => {
            debug!(error = %e, "stream gone");
            return;
        }
    };
    // Either may already be closed by the peer; nothing more to do then.
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    version: Version,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let header = match read(&mut recv, HEADER_LIMIT, HEADER_TIMEOUT)
        .await
        .and_then(|b| frame::decode_header(&b).map_err(|e| Failure::BadFrame(e.to_string())))
    {
        Ok(header) => header,
        Err(f) => return give_up(&shared, &mut send, &mut recv, f),
    };
    if !peer.proves(&shared, header.from) {
        bump(&shared.stats.identity_refused);
        peer.conn.close(
            codes::IDENTITY,
            b"certificate does not name the claimed node",
        );
        return;
    }
    let kind = header.rpc;
    let rpc = match read(&mut recv, kind.request_limit(), kind.body_timeout())
        .await
        .and_then(|b| {
            frame::decode_request(kind, &b, version).map_err(|e| Failure::BadFrame(e.to_string()))
        }) {
        Ok(rpc) => rpc,
        Err(f) => return give_up(&shared, &mut send, &mut recv, f),
    };
    bump(&shared.stats.requests_served);
    let reply = shared.handler.handle(header.from, rpc).await;
    // The request's end came with it or soon after: taken now, the stream
    // closes without a STOP_SENDING.
    let ended = frame::take_end(&mut recv);
    let bytes = frame::encode(&reply, kind.reply_limit()).or_else(|e| {
        warn!(%kind, error = %e, "reply not sent");
        frame::encode(
            &RpcReply::Error(format!("reply not sent: {e}")),
            HEADER_LIMIT,
        )
    });
    let Ok(bytes) = bytes else {
        // A short error string always encodes; drop the stream if not.
        return;
    };
    if let Err(e) = send.write_all(&bytes).await {
        debug!(%kind, error = %e, "reply not delivered");
        return;
    }
    let _ = send.finish();
    if !ended {
        // The end is a moment behind the request (in a packet of its own,
        // or held up by a busy CPU at either end): waited for once the
        // reply is on its way, for about a round trip, so that the stream
        // still closes without a STOP_SENDING.
        let wait = peer.conn.rtt().clamp(END_WAIT_MIN, END_WAIT_MAX);
        frame::drain_end(recv, wait).await;
    }
}
