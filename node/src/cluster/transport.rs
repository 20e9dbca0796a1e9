//! [`Transport`]: the node's one QUIC endpoint, both ends of the Raft RPCs.
//!
//! Outgoing calls share one kept connection per peer (ALPN
//! `edgelb-raft/2`, or `/1` with a peer of an earlier release; made in the
//! background, or the one the peer opened to
//! this node: [`peers`]), each RPC on its own bidirectional stream;
//! a connection that failed, or whose call timed out while the peer
//! acknowledged but served nothing, is replaced on the next call (one cut
//! off by a partition is kept for the heal, see [`peers`]). Load gossip goes on separate
//! connections (ALPN `edgelb-gossip/2` or `/1`, [`Transport::gossip_connect`]), so
//! that a large report never queues behind Raft traffic or the other way
//! round. Incoming connections are served by [`server`].

mod gossip;
mod peer;
mod peers;
mod server;

pub use ::gossip::transport::{
    Dropped, GossipHandler, GossipLink, MAX_STRIKES, REPORT_TIMEOUT, SEND_TIMEOUT, Via, codes,
};
use peers::PeerSlot;

#[cfg(test)]
pub(crate) use peers::close_after;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use quinn::Endpoint;
use raft_store::NodeId;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::frame::{self, FrameError, Version};
use super::pki::node_dns_name;
use super::rpc::{RaftHandler, Rpc, RpcKind, RpcReply};
use super::tls::{ALPN_GOSSIP_2, ALPN_RAFT, NodeTls, negotiated_alpn};

/// Why a call failed, or the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Bad certificates or keys.
    #[error("cluster TLS config: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("binding the cluster endpoint: {0}")]
    Bind(#[source] io::Error),
    /// The peer's address does not resolve.
    #[error("resolving {addr}: {reason}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No connection could be made (handshake refused, no route, …).
    #[error("connecting to node {target}: {reason}")]
    Connect {
        /// The peer's id.
        target: NodeId,
        /// Why.
        reason: String,
    },
    /// The connection broke during the call.
    #[error("connection lost: {0}")]
    ConnectionLost(#[source] quinn::ConnectionError),
    /// The call did not complete in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The request is larger than its kind allows; it was not sent.
    #[error("request of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// Limit for the request's kind.
        limit: usize,
    },
    /// The stream was reset or ended early.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The peer answered something that is not a valid reply.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer could not handle the request ([`RpcReply::Error`]).
    #[error("peer error: {0}")]
    Remote(String),
    /// This transport is closed.
    #[error("transport closed")]
    Closed,
}

impl TransportError {
    /// Whether the peer could not be reached at all, so a caller should back
    /// off before trying again (openraft's `Unreachable`).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. } | Self::Connect { .. } | Self::ConnectionLost(_) | Self::Closed
        )
    }
}

/// Counters of the transport, cumulative since bind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportStats {
    /// Incoming Raft connections whose handshake succeeded.
    pub connections_accepted: u64,
    /// Incoming handshakes that failed (no or foreign certificate, …).
    pub handshakes_failed: u64,
    /// Connections closed because a stream claimed an id the certificate
    /// does not name.
    pub identity_refused: u64,
    /// Connections closed because their ALPN is not served.
    pub unsupported_alpn: u64,
    /// Incoming gossip connections whose handshake succeeded.
    pub gossip_connections_accepted: u64,
    /// Gossip reports handed to the [`GossipHandler`] (proven sender, not
    /// this node).
    pub gossip_reports: u64,
    /// Gossip input dropped before it became a report (malformed,
    /// oversized, late, identity, this node's own).
    pub gossip_dropped: u64,
    /// Requests handed to the [`RaftHandler`].
    pub requests_served: u64,
    /// Streams reset for an oversized or malformed frame.
    pub bad_frames: u64,
    /// Streams reset because a frame did not arrive in time.
    pub read_timeouts: u64,
    /// Outgoing connections established.
    pub connects: u64,
    /// Outgoing calls that failed.
    pub calls_failed: u64,
    /// Incoming connections closed because their peer opened more than a
    /// node keeps from one certificate (the oldest goes).
    pub displaced: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) identity_refused: AtomicU64,
    pub(crate) unsupported_alpn: AtomicU64,
    pub(crate) gossip_connections_accepted: AtomicU64,
    pub(crate) gossip_reports: AtomicU64,
    pub(crate) gossip_dropped: AtomicU64,
    pub(crate) requests_served: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    pub(crate) read_timeouts: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) calls_failed: AtomicU64,
    pub(crate) displaced: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> TransportStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TransportStats {
            connections_accepted: g(&self.connections_accepted),
            handshakes_failed: g(&self.handshakes_failed),
            identity_refused: g(&self.identity_refused),
            unsupported_alpn: g(&self.unsupported_alpn),
            gossip_connections_accepted: g(&self.gossip_connections_accepted),
            gossip_reports: g(&self.gossip_reports),
            gossip_dropped: g(&self.gossip_dropped),
            requests_served: g(&self.requests_served),
            bad_frames: g(&self.bad_frames),
            read_timeouts: g(&self.read_timeouts),
            connects: g(&self.connects),
            calls_failed: g(&self.calls_failed),
            displaced: g(&self.displaced),
        }
    }
}

/// What the endpoint's tasks share.
pub(crate) struct Shared {
    pub(crate) endpoint: Endpoint,
    pub(crate) node_id: NodeId,
    pub(crate) handler: Arc<dyn RaftHandler>,
    /// Where incoming gossip reports go; until it is set they are dropped.
    pub(crate) gossip: OnceLock<Arc<dyn GossipHandler>>,
    pub(crate) stats: Counters,
    /// The TLS client sides, replaced when the node's certificate is
    /// renewed ([`Transport::reload_tls`]).
    clients: ArcSwap<Clients>,
    /// The peers whose Raft connections this node keeps open between calls
    /// ([`Transport::keep_open`]).
    keep_open: ArcSwap<BTreeSet<NodeId>>,
    /// How many connections each peer opened to this node, for noticing a
    /// peer that restarted or came back ([`Transport::arrivals`]).
    arrivals: Mutex<HashMap<NodeId, u64>>,
    /// One connection slot per peer.
    peers: Mutex<HashMap<NodeId, Arc<PeerSlot>>>,
    /// The connections peers opened to this node and still hold, by the
    /// certificate they presented (`server::Admitted`).
    pub(crate) incoming: Mutex<HashMap<Vec<u8>, Vec<quinn::Connection>>>,
    /// How long the slots keep a connection they stop using open.
    grace: peers::CallGrace,
}

/// The client sides of the node's connections, made from one set of
/// credentials.
struct Clients {
    /// Raft, with keep-alives: to the peers in `Shared::keep_open`.
    raft: quinn::ClientConfig,
    /// Raft without keep-alives, to every other peer.
    quiet: quinn::ClientConfig,
    gossip: quinn::ClientConfig,
}

impl Clients {
    fn new(tls: &NodeTls) -> Result<Self, TransportError> {
        Ok(Self {
            raft: tls.client_config(ALPN_RAFT)?,
            quiet: tls.quiet_client_config(ALPN_RAFT)?,
            gossip: tls.gossip_client_config()?,
        })
    }
}

impl Shared {
    /// The slot of `target`, if a call was ever made to it.
    fn existing_slot(&self, target: NodeId) -> Option<Arc<PeerSlot>> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&target)
            .cloned()
    }

    /// The peers this node has a connection slot for.
    pub(crate) fn peer_ids(&self) -> Vec<NodeId> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// The client side for a new Raft connection to `target`: with
    /// keep-alives when `target` is to be kept open.
    pub(crate) fn client_for(&self, target: NodeId) -> quinn::ClientConfig {
        if self.keep_open.load().contains(&target) {
            self.clients.load().raft.clone()
        } else {
            self.clients.load().quiet.clone()
        }
    }

    /// The slot of `target`, made on first use.
    pub(crate) fn slot(&self, target: NodeId) -> Arc<PeerSlot> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            peers.entry(target).or_insert_with(|| {
                Arc::new(PeerSlot::new(self.node_id, target, self.grace.clone()))
            }),
        )
    }

    /// `id` reached this node on a gossip connection: if this node's
    /// handshake to `id` is still under way (the link was cut and has
    /// healed, and the attempt's resends have backed off), a fresh
    /// handshake begins now. An open connection is kept: calls in flight on it may
    /// be about to be answered, and one to a previous process of `id` is
    /// closed by that peer's stateless reset (`tls::reset_key`).
    pub(crate) fn peer_connected(self: &Arc<Self>, id: NodeId) {
        *self
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default() += 1;
        if let Some(slot) = self.existing_slot(id) {
            slot.hurry();
        }
    }

    /// `id` announced that it serves calls on Raft connection `conn`, which
    /// it opened to this node: calls to `id` may use it (`peers` has the
    /// rules).
    pub(crate) fn raft_peer_connected(&self, id: NodeId, conn: &quinn::Connection) {
        self.slot(id).adopt(conn);
    }

    /// `id` opened Raft connection `conn` to this node (known by its
    /// certificate, not yet announced): used at once if `id` announced
    /// before.
    pub(crate) fn raft_peer_accepted(&self, id: NodeId, conn: &quinn::Connection) {
        if let Some(slot) = self.existing_slot(id) {
            slot.adopt_if_known(conn);
        }
    }
}

/// The node's QUIC endpoint on `cluster_addr`: serves peers' Raft RPCs to a
/// [`RaftHandler`] and makes calls to peers ([`Transport::call`]).
///
/// Dropping it closes the endpoint.
pub struct Transport {
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.shared.node_id)
            .field("local_addr", &self.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// How long a call's stream waits for the end of the other side's message
/// once the message is in (a round trip, within these bounds) before it is
/// stopped: the caller for the reply's end, the server (after answering)
/// for the request's.
const END_WAIT_MIN: Duration = Duration::from_millis(20);
const END_WAIT_MAX: Duration = Duration::from_millis(500);

/// A call's request stream, reset unless the call got its answer: quinn
/// finishes a send stream that is dropped, so a call given up from
/// outside (openraft's own limit, a long append dropped by the network)
/// would otherwise send the rest of its request on, up to megabytes,
/// beside the one sent in its place.
struct Unanswered {
    send: quinn::SendStream,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.send.reset(codes::TIMEOUT);
        }
    }
}

impl Transport {
    /// Binds the endpoint on `addr` (UDP) with the node's credentials and
    /// starts serving. The certificate must name `node_id`.
    pub fn bind(
        addr: SocketAddr,
        tls: &NodeTls,
        node_id: NodeId,
        handler: Arc<dyn RaftHandler>,
    ) -> Result<Self, TransportError> {
        tls.check_own_id(node_id)?;
        let server = tls.server_config()?;
        let clients = Clients::new(tls)?;
        let socket = std::net::UdpSocket::bind(addr).map_err(TransportError::Bind)?;
        let endpoint = Endpoint::new(
            tls.endpoint_config()?,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(TransportError::Bind)?;
        let shared = Arc::new(Shared {
            endpoint,
            node_id,
            handler,
            gossip: OnceLock::new(),
            stats: Counters::default(),
            clients: ArcSwap::from_pointee(clients),
            keep_open: ArcSwap::from_pointee(BTreeSet::new()),
            arrivals: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            grace: peers::CallGrace::default(),
        });
        let accept = tokio::spawn(server::accept_loop(Arc::clone(&shared)));
        debug!(node_id, addr = ?shared.endpoint.local_addr().ok(), "cluster endpoint bound");
        Ok(Self { shared, accept })
    }

    /// The longest a call to a peer may take besides a snapshot chunk's
    /// (a vote's, with a long election timeout): a connection this node stops
    /// using (superseded, or dropped after a call timed out) stays open a
    /// second longer, for the calls still in flight on it.
    pub fn set_longest_call(&self, longest: Duration) {
        self.shared.grace.set_longest_call(longest);
    }

    /// Uses `tls` (a renewed certificate, a reloaded PKI) for every
    /// handshake from now on, in both directions. Open connections keep
    /// the credentials they were made with. The certificate must name this
    /// node.
    pub fn reload_tls(&self, tls: &NodeTls) -> Result<(), TransportError> {
        tls.check_own_id(self.shared.node_id)?;
        let server = tls.server_config()?;
        let clients = Clients::new(tls)?;
        self.shared.endpoint.set_server_config(Some(server));
        self.shared.clients.store(Arc::new(clients));
        Ok(())
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Moves the endpoint to another socket (without telling its peers:
    /// after [`Transport::close`], or as if this process had died), so that
    /// its address is free for a new one: another process on the same
    /// node, in an upgrade ([`crate::upgrade`]).
    pub fn release_address(&self) -> io::Result<()> {
        // quinn keeps the previous socket open for stragglers; a second
        // move drops the original one.
        let ip = self.local_addr()?.ip();
        for _ in 0..2 {
            self.shared
                .endpoint
                .rebind(std::net::UdpSocket::bind((ip, 0))?)?;
        }
        Ok(())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The counters so far.
    pub fn stats(&self) -> TransportStats {
        self.shared.stats.snapshot()
    }

    /// The handler of incoming calls, for tests that call it directly.
    #[cfg(test)]
    pub(crate) fn handler(&self) -> Arc<dyn RaftHandler> {
        Arc::clone(&self.shared.handler)
    }

    /// Sets where incoming gossip reports go (once; later calls are
    /// ignored). Until then they are dropped.
    pub fn set_gossip_handler(&self, handler: Arc<dyn GossipHandler>) {
        let _ = self.shared.gossip.set(handler);
    }

    /// A new gossip connection to node `target` at `addr` (`host:port`),
    /// made within `timeout`.
    pub async fn gossip_connect(
        &self,
        target: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<GossipLink, TransportError> {
        let connect = async {
            let sock = resolve(&self.shared, addr).await?;
            let connect_err = |reason: String| TransportError::Connect { target, reason };
            let connecting = self
                .shared
                .endpoint
                .connect_with(
                    self.shared.clients.load().gossip.clone(),
                    sock,
                    &node_dns_name(target),
                )
                .map_err(|e| match e {
                    quinn::ConnectError::EndpointStopping => TransportError::Closed,
                    e => connect_err(e.to_string()),
                })?;
            let conn = connecting
                .await
                .map_err(|e| connect_err(super::tls::handshake_error(&e)))?;
            bump(&self.shared.stats.connects);
            debug!(target, addr, "gossip connected");
            let compact = negotiated_alpn(&conn).as_deref() == Some(ALPN_GOSSIP_2);
            Ok(GossipLink::new(target, conn, compact))
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| TransportError::Connect {
                target,
                reason: format!("no connection within {timeout:?}"),
            })?
    }

    /// Closes every connection and the endpoint, waiting briefly for peers
    /// to be told. Later calls fail with [`TransportError::Closed`].
    pub async fn close(&self) {
        self.shared.endpoint.close(codes::SHUTDOWN, b"shutdown");
        self.accept.abort();
        // Peers are told at once; waiting for their acknowledgement is
        // bounded short, as they may be gone.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.shared.endpoint.wait_idle())
            .await;
    }

    /// Sends `rpc` to node `target` at `addr` (`host:port`) and waits at most
    /// `timeout` for its reply, connecting first if needed.
    ///
    /// The reply's kind matches the request's; a peer's [`RpcReply::Error`]
    /// comes back as [`TransportError::Remote`].
    pub async fn call(
        &self,
        target: NodeId,
        addr: &str,
        rpc: Rpc,
        timeout: Duration,
    ) -> Result<RpcReply, TransportError> {
        let deadline = Instant::now() + timeout;
        let kind = rpc.kind();
        let result = self.exchange(target, addr, &rpc, deadline, timeout).await;
        if let Err(e) = &result {
            bump(&self.shared.stats.calls_failed);
            debug!(target, addr, %kind, error = %e, "call failed");
        }
        result
    }

    async fn exchange(
        &self,
        target: NodeId,
        addr: &str,
        rpc: &Rpc,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<RpcReply, TransportError> {
        let kind = rpc.kind();
        let slot = self.slot(target);
        // A kept connection may have died since its last use; then one
        // fresh connection is tried.
        let mut fresh = false;
        let mut request = None;
        let (conn, send, mut recv) = loop {
            let (conn, new) = timeout_at(deadline, slot.get(&self.shared, addr))
                .await
                .map_err(|_| TransportError::Connect {
                    target,
                    reason: format!("no connection within {timeout:?}"),
                })??;
            fresh |= new;
            // A connection whose last call heard nothing from the peer is
            // probed until it hears from it before this call sends.
            match timeout_at(deadline, slot.until_heard(&conn)).await {
                Err(_) => return Err(TransportError::Timeout(timeout)),
                Ok(true) => {}
                Ok(false) => {
                    slot.discard(&conn, "closed while cut off");
                    if fresh {
                        return Err(TransportError::Connect {
                            target,
                            reason: "the connection closed while the peer was cut off".into(),
                        });
                    }
                    debug!(target, "kept connection closed while cut off, reconnecting");
                    fresh = true;
                    continue;
                }
            }
            // Encoded once the connection, hence the frame version, is
            // known, and before a stream opens for it.
            let version = Version::of(&conn);
            if request.as_ref().is_none_or(|(v, _)| *v != version) {
                let bytes = frame::encode_request(self.shared.node_id, rpc, version).map_err(
                    |e| match e {
                        FrameError::TooLarge { size, limit } => {
                            TransportError::TooLarge { size, limit }
                        }
                        e => TransportError::Protocol(format!("encoding {kind}: {e}")),
                    },
                )?;
                request = Some((version, bytes));
            }
            match timeout_at(deadline, conn.open_bi()).await {
                Err(_) => {
                    slot.discard(&conn, "opening a stream timed out");
                    return Err(TransportError::Timeout(timeout));
                }
                Ok(Ok((send, recv))) => break (conn, send, recv),
                Ok(Err(e)) => {
                    slot.discard(&conn, "connection lost");
                    if fresh {
                        return Err(TransportError::ConnectionLost(e));
                    }
                    debug!(target, error = %e, "kept connection failed, reconnecting");
                    fresh = true;
                }
            }
        };
        // A stream's error says "connection lost"; the connection says why
        // (timed out, closed by the peer, reset by a restarted peer).
        let stream_failed = |e: &dyn std::fmt::Display| match conn.close_reason() {
            Some(why) => TransportError::Stream(format!("{e}: {why}")),
            None => TransportError::Stream(e.to_string()),
        };
        let mut send = Unanswered {
            send,
            answered: false,
        };
        let exchange = async {
            let (_, request) = request.as_ref().expect("encoded before the stream opened");
            send.send
                .write_all(request)
                .await
                .map_err(|e| stream_failed(&e))?;
            // The stream is open until now: finishing cannot fail.
            let _ = send.send.finish();
            let body = frame::read_frame(&mut recv, kind.reply_limit())
                .await
                .map_err(|e| match e {
                    FrameError::TooLarge { .. }
                    | FrameError::Malformed(_)
                    | FrameError::BadChunk(_) => TransportError::Protocol(e.to_string()),
                    FrameError::Io(e) => stream_failed(&e),
                })?;
            let ended = frame::take_end(&mut recv);
            frame::decode_reply(&body)
                .map(|reply| (reply, ended))
                .map_err(|e| TransportError::Protocol(e.to_string()))
        };
        let stats = conn.stats();
        let heard_before = served_in(&stats);
        let probes = peers::Probes::new(&stats);
        // An append on a connection that goes silent while a fresh one to
        // the peer comes up (a healed link, a restarted peer) gives up at
        // once, so that openraft's retry goes out on the fresh one. Votes
        // wait: their answers need the voter's fsync, and a lost vote
        // costs a round.
        let retry_fresh = async {
            if kind == RpcKind::AppendEntries && !fresh {
                slot.superseded(&conn, heard_before).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let outcome = tokio::select! {
            r = timeout_at(deadline, exchange) => r.ok(),
            () = probes.run(&conn) => None,
            () = retry_fresh => {
                debug!(target, "a fresh connection came up while a call on a silent one waited");
                None
            }
        };
        let reply = match outcome {
            Some(Ok((reply, ended))) => {
                send.answered = true;
                if !ended {
                    // The reply's end is a moment behind it: waited for
                    // aside, so the call returns now and the stream still
                    // ends without a STOP_SENDING.
                    let wait = conn.rtt().clamp(END_WAIT_MIN, END_WAIT_MAX);
                    tokio::spawn(frame::drain_end(recv, wait));
                }
                reply
            }
            Some(Err(e)) => return Err(e),
            None => {
                drop(send);
                let _ = recv.stop(codes::TIMEOUT);
                // The peer silent, its probes unanswered (a cut, or a peer
                // process that is gone): the connection is kept, and the
                // next call waits on it for a sign of life
                // (`PeerSlot::cut_off`). A peer that acknowledged but did not
                // serve this connection during the call (its end no longer
                // reads streams here) is met with a fresh handshake next
                // time. A peer that served anything during the call is
                // alive (merely slow, or the request was large): its
                // connection and congestion window are kept, as is a
                // connection made during this call.
                slot.distrust(&conn);
                let silent = served(&conn) == heard_before;
                if let Some(count) = probes.silent(&conn) {
                    slot.cut_off(&conn, count);
                } else if silent && !fresh {
                    slot.discard(&conn, "call timed out");
                }
                return Err(TransportError::Timeout(timeout));
            }
        };
        slot.reachable(addr);
        match reply.kind() {
            Some(k) if k == kind => Ok(reply),
            Some(k) => Err(TransportError::Protocol(format!(
                "{k} reply to a {kind} request"
            ))),
            None => match reply {
                RpcReply::Error(e) => Err(TransportError::Remote(e)),
                _ => Err(TransportError::Protocol("reply without kind".into())),
            },
        }
    }

    fn slot(&self, target: NodeId) -> Arc<PeerSlot> {
        self.shared.slot(target)
    }

    /// The measured round trip to `target`, once a connection was made.
    pub fn rtt(&self, target: NodeId) -> Option<Duration> {
        self.shared.existing_slot(target).and_then(|s| s.rtt())
    }

    /// The congestion window of the connection to `target` (bytes it sends
    /// in one round trip), once a connection was made.
    pub fn window(&self, target: NodeId) -> Option<u64> {
        self.shared.existing_slot(target).and_then(|s| s.window())
    }

    /// Whether calls to `target` go out on this node's own connection
    /// (`false`: on the one `target` opened); `None` without one.
    #[cfg(test)]
    pub(crate) fn uses_own_connection(&self, target: NodeId) -> Option<bool> {
        self.shared.existing_slot(target).and_then(|s| s.uses_own())
    }

    /// The frame version of the connection calls to `target` go out on
    /// now; `None` without one.
    pub(crate) fn version(&self, target: NodeId) -> Option<Version> {
        let conn = self.shared.existing_slot(target).and_then(|s| s.in_use())?;
        Some(Version::of(&conn))
    }

    /// The connection calls to `target` go out on now.
    #[cfg(test)]
    pub(crate) fn connection_to(&self, target: NodeId) -> Option<quinn::Connection> {
        self.shared.existing_slot(target).and_then(|s| s.in_use())
    }

    /// Makes sure a connection to `target` at `addr` exists or is being
    /// made, without waiting: voters keep one to each other so that a
    /// pre-vote or vote costs one round trip, not a handshake as well.
    pub fn warm(&self, target: NodeId, addr: &str) {
        let slot = self.slot(target);
        if slot.is_open_or_opening(addr) {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let addr = addr.to_owned();
        tokio::spawn(async move {
            let _ = slot.get(&shared, &addr).await;
        });
    }

    /// Keeps this node's Raft connections to `peers` open between calls
    /// (QUIC keep-alives) from their next handshake on; every other one is
    /// made without and lapses once idle. A voter keeps the other voters
    /// ([`super::tls`]'s `KEEP_ALIVE` says why); nothing else is kept.
    pub fn keep_open(&self, peers: BTreeSet<NodeId>) {
        if **self.shared.keep_open.load() != peers {
            self.shared.keep_open.store(Arc::new(peers));
        }
    }

    /// How many connections (Raft or gossip) `peer` has opened to this node
    /// since it started: a change means it came back, possibly as a new
    /// process that lost what it was last told.
    pub fn arrivals(&self, peer: NodeId) -> u64 {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .copied()
            .unwrap_or(0)
    }

    /// Whether `target` answered a call within `within`.
    pub fn answered_within(&self, target: NodeId, within: Duration) -> bool {
        self.shared
            .existing_slot(target)
            .is_some_and(|s| s.answered_within(within))
    }

    /// Records that `target` refused an empty append (heartbeat or commit
    /// notice) sent without waiting for its answer: openraft's next one to
    /// it waits for the answer, so that openraft sees the refusal.
    pub fn heartbeat_refused(&self, target: NodeId) {
        self.slot(target).refused();
    }

    /// Whether `target` refused an empty append since this was last asked.
    pub(crate) fn take_heartbeat_refused(&self, target: NodeId) -> bool {
        self.shared
            .existing_slot(target)
            .is_some_and(|s| s.take_refused())
    }

    /// Records that `target` could not be reached (for the log: the first
    /// failure after a success is a warning, the rest are quiet).
    pub fn note_unreachable(&self, target: NodeId, reason: &str) {
        self.slot(target).unreachable(reason);
    }
}

/// `addr` as a socket address, preferring the family of the local socket.
pub(crate) async fn resolve(shared: &Shared, addr: &str) -> Result<SocketAddr, TransportError> {
    if let Ok(sock) = addr.parse() {
        return Ok(sock);
    }
    let err = |reason: String| TransportError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    let found: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .collect();
    let v4 = shared
        .endpoint
        .local_addr()
        .map(|a| a.is_ipv4())
        .unwrap_or(true);
    found
        .iter()
        .find(|a| a.is_ipv4() == v4)
        .or(found.first())
        .copied()
        .ok_or_else(|| err("no address".into()))
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shared.endpoint.close(codes::SHUTDOWN, b"shutdown");
        self.accept.abort();
    }
}

/// What the peer's side of `conn` has done that only a peer serving it
/// does: stream data (answers, its own calls) and flow-control credit
/// (it read what was sent). Acknowledgements and pings do not count: QUIC
/// sends them for a connection whose streams nobody reads any more, and
/// counting them kept such a connection, with every call on it timing
/// out, until QUIC's idle timeout (elections of 10 s and more).
pub(crate) fn served(conn: &quinn::Connection) -> u64 {
    served_in(&conn.stats())
}

/// [`served`], from a snapshot of the connection's statistics.
fn served_in(stats: &quinn::ConnectionStats) -> u64 {
    let f = &stats.frame_rx;
    f.stream + f.max_data + f.max_stream_data
}
