//! The cluster transport: one QUIC endpoint per node, mutual TLS with the
//! cluster CA, Raft RPCs as length-prefixed JSON on one stream each, load
//! gossip reports as datagrams or unidirectional streams.
//!
//! ```text
//!                       UDP cluster_addr (one quinn Endpoint)
//!   peer ──QUIC+mTLS──▶ ┌─────────────────────────────────────────────┐
//!                       │ handshake: client cert must chain to the CA  │──✗ refused
//!                       │ ALPN edgelb-raft/2|1 ─▶ server: per stream   │
//!                       │   [len][Header{from,rpc}] from ≟ cert name ──┼──✗ close(IDENTITY)
//!                       │   [len][body ≤ limit(rpc)] ──▶ RaftHandler   │──✗ reset(BAD_FRAME)
//!                       │   ◀── [len][RpcReply]                        │
//!                       │ ALPN edgelb-gossip/2|1 ▶ gossip::transport:: │
//!                       │   serve (the gossip crate's):                │
//!                       │   datagram | uni stream ≤ MAX_REPORT_LEN     │──✗ dropped, counted
//!                       │   decode, node_id ≟ cert name ──────────────┼──✗ close(IDENTITY)
//!                       │   ──▶ GossipHandler::report                  │
//!                       └─────────────────────────────────────────────┘
//!   openraft ─▶ Network/PeerNetwork ─▶ Transport::call(target, cluster_addr, Rpc)
//!               (one cached connection per peer, a new stream per RPC)
//! ```
//!
//! - [`pki`] (from `edgelb-client`, which `edgectl certs` shares): the cluster
//!   CA and node certificates; a node's id is the DNS name
//!   `node-<id>.cluster.edgelb` in its certificate.
//! - [`NodeTls`]: a node's CA, certificate and key, made into rustls/quinn
//!   configs. The client checks it reached the node it dialled (server name
//!   = target's DNS name); the server checks that each stream's claimed
//!   `from` id is named by the client's certificate.
//! - [`Transport`]: the endpoint. Serves incoming requests to a
//!   [`RaftHandler`] and makes calls ([`Transport::call`]).
//! - Frames: `u32` big-endian length + JSON. The header frame (≤ 1 KiB)
//!   names the sender and the RPC kind, which sets the body limit: 64 MiB
//!   for appends and snapshot chunks, 8 MiB for forwards, 64 KiB for votes
//!   and replies other than forwards. Oversized, malformed or late frames
//!   reset that stream only and are counted in [`TransportStats`]. The
//!   negotiated ALPN is the frames' version: on `edgelb-raft/2` a snapshot
//!   chunk's data follows its JSON deflated ([`frame`]).
//! - [`Network`]: openraft's network factory over [`Transport::call`].
//! - Gossip ([`GossipLink`], [`GossipHandler`]): one connection per peer
//!   (ALPN `edgelb-gossip/2`, or `/1` with a node that offers only that;
//!   apart from Raft's), a report per datagram when it fits, else per
//!   unidirectional stream. The transport is the gossip crate's
//!   (`gossip::transport`); the endpoint opens and accepts its connections
//!   and proves their peers (`transport/gossip.rs`).

mod congestion;
pub(crate) mod frame;
mod network;
pub(crate) mod rpc;
mod tls;
mod transport;

#[cfg(test)]
mod tests;

/// The most entries one append carries (openraft's `max_payload_entries`):
/// as many as 256, since an append's bytes are bounded by what the link
/// carries within the call's limit (`network::append_budget`). openraft
/// keeps one append in flight per follower, so this is what a follower a
/// round trip away can take per round trip: with 64, a leader committing
/// more than about 210 entries a second left a learner 300 ms away behind
/// for as long as the writes went on, and it was never promoted.
pub const MAX_PAYLOAD_ENTRIES: u64 = 256;

/// The snapshot bytes sent per `InstallSnapshot` call to a peer of
/// `edgelb-raft/1`, or before a connection tells the peer's version; a
/// connection of `edgelb-raft/2` takes four times as many, 1 MiB
/// (`network::PeerNetwork::full_snapshot`), several in flight at once
/// as the connection's window allows. A chunk whose call
/// times out in the transport (at 3/4 of [`SNAPSHOT_CHUNK_TIMEOUT_MS`],
/// `network::PeerNetwork::send_chunk`) is sent again at the same
/// offset (the send resumes at the first chunk not acknowledged), up to
/// five times in a row; one that outlasts openraft's own
/// limit ends the send, and the next starts over from the first chunk. So
/// each must cross a lossy long link well within that: on `edgelb-raft/1`
/// (a peer of an earlier release) a chunk's frame is about 3.3 times its
/// bytes (JSON numbers), 0.85 MB, which takes about 4 s at the least window
/// cluster connections keep (64 KiB per round trip of 300 ms: the rate
/// under 1 % loss); on `edgelb-raft/2` it is deflated, about 0.13 MB, and
/// a 1 MiB chunk about 0.5 MB, 2.4 s at that rate.
/// openraft's default, 3 MiB (about 11 MB on the wire as JSON), never
/// crossed that link, and the joining node never caught up. At most
/// [`CHUNK_DATA_LIMIT`], which `edgelb-raft/2` fixes.
pub const SNAPSHOT_CHUNK: u64 = 256 * 1024;
const _: () = assert!(SNAPSHOT_CHUNK as usize <= CHUNK_DATA_LIMIT);

/// How long one snapshot chunk's call may take, in milliseconds
/// (openraft's `install_snapshot_timeout`; see [`SNAPSHOT_CHUNK`]).
pub const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 15_000;

pub use edgelb_client::pki;
pub use frame::{CHUNK_DATA_LIMIT, MAX_FRAME};
pub use network::{Network, PeerNetwork, VoteSink, rpc_deadline};
pub use pki::{
    CaBundle, PkiError, generate_ca, issue_node_cert, node_dns_name, node_key_and_csr,
    sign_node_csr,
};
pub use rpc::{
    Forward, ForwardError, ForwardReply, HandlerFuture, PreVote, RaftHandler, Rpc, RpcReply,
};
pub use tls::{ALPN_GOSSIP, ALPN_GOSSIP_2, ALPN_RAFT, ALPN_RAFT_2, NodeTls};
pub use transport::{
    Dropped, GossipHandler, GossipLink, MAX_STRIKES, REPORT_TIMEOUT, SEND_TIMEOUT, Transport,
    TransportError, TransportStats, Via, codes,
};
