//! Mutual TLS for the cluster endpoint: the node's certificate and the
//! cluster CA ([`NodeTls`]) made into quinn server and client configs, and
//! the check that a peer's certificate names the node id it claims.
//!
//! Both sides present a certificate chaining to the cluster CA (rustls with
//! the ring provider, TLS 1.3 only, as QUIC requires):
//! - the server requires a client certificate (`WebPkiClientVerifier`), so a
//!   peer without a cluster-signed certificate fails the handshake;
//! - the client verifies the server against the CA *and* the name
//!   [`node_dns_name`]`(target)`, so it talks to the node it meant;
//! - the server learns the client's id from the stream header and checks
//!   that the client's certificate is valid for that id's name
//!   ([`verify_peer_id`]).

use std::sync::Arc;
use std::time::Duration;

use edgelb_client::tls::pem_error;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use super::TransportError;
use super::congestion::FlooredCubic;
use super::pki::node_dns_name;

/// ALPN of the Raft RPCs' first frame version ([`super::frame`]): every
/// body JSON. Offered after [`ALPN_RAFT_2`], for peers that predate it.
pub const ALPN_RAFT: &[u8] = b"edgelb-raft/1";
/// ALPN of the Raft RPCs' second frame version: a snapshot chunk's data
/// travels deflated ([`super::frame::Version::V2`]). A node offers both
/// and prefers this one.
pub const ALPN_RAFT_2: &[u8] = b"edgelb-raft/2";
/// ALPN of load gossip whose receiver reads wire versions 1 and 2 (full
/// reports and deltas).
pub const ALPN_GOSSIP: &[u8] = b"edgelb-gossip/1";
/// ALPN of load gossip whose receiver also reads version 3 (compact full
/// reports). A node offers both and prefers this one; a peer that predates
/// it agrees on `edgelb-gossip/1` and is sent version-1 full reports.
pub const ALPN_GOSSIP_2: &[u8] = b"edgelb-gossip/2";

/// Every Raft frame version this node reads, newest first. The ALPN is the
/// frame version: a release that changes the frames (header, a request or
/// reply body, their limits) adds `edgelb-raft/N+1` in front and keeps the
/// older ones for as long as it can still speak them, so the handshake
/// settles on the newest version both ends know and old and new nodes talk
/// during a rolling upgrade. A peer with no version in common is refused at
/// the handshake (TLS alert `no_application_protocol`), never misread; both
/// ends log it ([`version_refused`]). See docs/compatibility.md.
pub(crate) const RAFT_VERSIONS: &[&[u8]] = &[ALPN_RAFT_2, ALPN_RAFT];
/// Every gossip version this node reads, newest first.
pub(crate) const GOSSIP_VERSIONS: &[&[u8]] = &[ALPN_GOSSIP_2, ALPN_GOSSIP];

/// Every version of `alpn`'s protocol this node reads, newest first;
/// `None` if `alpn` is not one of them.
fn versions_of(alpn: &[u8]) -> Option<&'static [&'static [u8]]> {
    [RAFT_VERSIONS, GOSSIP_VERSIONS]
        .into_iter()
        .find(|versions| versions.contains(&alpn))
}

/// TLS alert 120 (`no_application_protocol`) as a QUIC error code.
const NO_COMMON_VERSION: u64 = 0x100 + 120;

/// Whether a handshake failed because the two ends share no ALPN, that is
/// no cluster protocol version: one runs a release the other cannot read.
pub(crate) fn version_refused(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
        quinn::ConnectionError::TransportError(t) => t.code,
        _ => return false,
    };
    u64::from(code) == NO_COMMON_VERSION
}

/// A failed handshake's reason, plain about a version mismatch.
pub(crate) fn handshake_error(e: &quinn::ConnectionError) -> String {
    if version_refused(e) {
        format!(
            "no cluster protocol version in common with the peer (this node speaks {}): \
             it runs an incompatible release ({e})",
            spoken()
        )
    } else {
        e.to_string()
    }
}

/// The versions this node speaks, for messages.
pub(crate) fn spoken() -> String {
    RAFT_VERSIONS
        .iter()
        .chain(GOSSIP_VERSIONS)
        .map(|v| String::from_utf8_lossy(v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A gossip connection that hears nothing (not even a keep-alive's
/// acknowledgement) for this long is dropped: a gossip link to a peer that
/// vanished reconnects after it. Two of its keep-alives
/// ([`GOSSIP_KEEP_ALIVE`]) and ten round trips of a slow link (300 ms) fit
/// in it, so such a link is not mistaken for a dead one.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The same for a Raft connection (QUIC takes the shorter of the two
/// sides', so the listener offers this and a gossip dialler its own).
/// Longer, because Raft calls do not wait for it: a connection cut off by
/// a partition is kept for when it heals (a probe's acknowledgement brings
/// it back within a round trip, where a fresh one costs a handshake, see
/// `peers::PeerSlot::cut_off`), a peer that restarted resets it at its
/// next packet, and a call that finds it closed makes a fresh one.
const RAFT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The congestion window a connection starts with.
const INITIAL_WINDOW: u64 = 256 * 1024;
/// The round trip assumed until one is measured.
const INITIAL_RTT: Duration = Duration::from_millis(50);
/// Keep-alives keep cached connections open between quiet periods. Only
/// the side that dialed sends them: its keep-alive and the answer to it
/// keep both sides' idle timers running, and a gossip receiver, which
/// sends nothing but acknowledgements, would otherwise send a keep-alive
/// (and get one acknowledged) on every incoming connection twice a
/// second. quinn sends one only after this long without anything else to
/// acknowledge, so a link in use carries none. Four fit in
/// [`RAFT_IDLE_TIMEOUT`]; a member heartbeated at least this often never
/// needs one. At 500 ms, the leader of an idle fleet of 30 sent about 50 a
/// second to learners between their heartbeats (each one a wake-up on both
/// sides and an acknowledgement back), and voters one to each other voter
/// twice a second.
///
/// Only a voter's Raft connections to the other voters are kept open
/// (`Transport::keep_open`): those carry pre-votes and votes, which must
/// not wait for a handshake. Every other Raft connection (to or from a
/// learner) is dialed without keep-alives and lapses once idle, so that
/// what an idle leader sends does not grow with the learners it has
/// (`election::heartbeat`).
const KEEP_ALIVE: Duration = Duration::from_millis(2500);
/// A gossip link's keep-alive: longer than an idle node's report period
/// (`gossip::SendSchedule::quiet_interval`, the TTL, 1 s by default), so
/// that the reports themselves keep the link open and an idle link carries
/// one datagram (and its acknowledgement) per report, not three. It still
/// fits twice in [`IDLE_TIMEOUT`].
const GOSSIP_KEEP_ALIVE: Duration = Duration::from_millis(1250);
/// Concurrent RPC streams a peer may open on one connection.
const MAX_STREAMS: u32 = 128;
/// How many packet numbers a later acknowledged packet must be ahead for
/// QUIC to declare a packet lost: never, so that only time does (a packet
/// sent more than [`LOSS_TIME_THRESHOLD`] round trips before,
/// unacknowledged while a later one was). A link that reorders datagrams
/// (jitter of a few ms on a WAN path, several paths between two regions)
/// acknowledges many later packets first; with QUIC's default of 3 each
/// such packet counted as lost and resent, and every loss cut the
/// congestion window: a node joining a cluster of 100,000 instances
/// across links of 150 ms ± 15 ms took 37–38 s to get its 11 MB snapshot
/// and be ready, and 19–28 s with this. Time-based detection is what
/// TCP's RACK does (see [`LOSS_TIME_THRESHOLD`]).
const REORDERING_THRESHOLD: u32 = u32::MAX;
/// How long after it was sent a packet counts as lost once a later one
/// was acknowledged, in round trips (the larger of the smoothed and the
/// latest): 5/4, where QUIC's default is 9/8 (Linux TCP's RACK allows a
/// quarter of the least round trip for reordering too). A link whose
/// delay varies by ±10 % each way (150 ms ± 15 ms, drawn for each
/// datagram) acknowledges some packets up to 1/10 of a round trip after
/// later ones, which 9/8 leaves about 7 ms of room for: an 11 MB snapshot across
/// such links counted 21–31 packets lost of 6,800, cut the window 18–28
/// times to its floor and took 29–42 s in 1 MiB chunks one at a time;
/// with 5/4, 1 packet and 13.4 s (7.2 s without the jitter). A packet
/// really lost is found 1/8 of a round trip later than with 9/8.
const LOSS_TIME_THRESHOLD: f32 = 5.0 / 4.0;
/// Per-stream receive window: enough for large frames to flow.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// What a peer may have sent on one connection and this node not yet read,
/// over all its streams: QUIC sets no bound by default, and a peer that
/// opened [`MAX_STREAMS`] streams and filled each window would be held
/// 512 MiB. A node reads its streams as their data arrives, and a single
/// stream is held to [`STREAM_WINDOW`] first, so no peer of its own comes
/// near this.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Concurrent unidirectional streams a peer may open on one connection:
/// gossip reports too large for a datagram, one per stream. A sender has
/// one in flight at a time; the rest is slack.
const MAX_UNI_STREAMS: u32 = 4;
/// Datagrams (gossip reports) buffered per connection, each way, in bytes:
/// on the receiving side, a few hundred reports before the oldest are
/// dropped.
const DATAGRAM_BUFFER: usize = 256 * 1024;

/// A node's cluster credentials, all PEM.
#[derive(Clone)]
pub struct NodeTls {
    /// The cluster CA certificate (one or more, e.g. during a CA rollover).
    pub ca_cert_pem: String,
    /// The node's certificate, optionally followed by intermediates.
    pub cert_pem: String,
    /// The node's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The parsed credentials.
struct Parsed {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn config_err(what: &str) -> impl FnOnce(String) -> TransportError + '_ {
    move |e| TransportError::Config(format!("{what}: {e}"))
}

impl NodeTls {
    fn parse(&self) -> Result<Parsed, TransportError> {
        let mut roots = RootCertStore::empty();
        let cas = certs(&self.ca_cert_pem).map_err(config_err("cluster CA"))?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| TransportError::Config(format!("cluster CA: {e}")))?;
        }
        let chain = certs(&self.cert_pem).map_err(config_err("node certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            TransportError::Config(match e {
                pem::Error::NoItemsFound => "node key: no private key in PEM".into(),
                e => format!("node key: {}", pem_error(&e)),
            })
        })?;
        Ok(Parsed {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// The endpoint's settings that must outlive a restart, derived from
    /// the node's private key: the stateless reset key and the key of the
    /// connection ids. A peer that keeps sending on a connection to this
    /// node's previous process then gets a valid stateless reset from the
    /// new one (RFC 9000 §10.3) and closes that connection at its next
    /// packet, instead of waiting out the idle timeout. Only a holder of
    /// the node key can make the reset tokens.
    pub(crate) fn endpoint_config(&self) -> Result<quinn::EndpointConfig, TransportError> {
        let Parsed { key, .. } = self.parse()?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"edgelb cluster endpoint keys\0");
        ctx.update(key.secret_der());
        let secret = ctx.finish();
        let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
        // The connection ids are validated by a keyed hash: a new process
        // must recognise its predecessor's ids to answer them with a reset.
        let cid_key = ring::hmac::sign(&reset, b"connection ids");
        let mut word = [0u8; 8];
        word.copy_from_slice(&cid_key.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(word);
        let mut config = quinn::EndpointConfig::new(Arc::new(reset));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        Ok(config)
    }

    /// Checks that the node's own certificate names node `id`, so a
    /// misconfigured node fails at start instead of at every peer.
    pub(crate) fn check_own_id(&self, id: u64) -> Result<(), TransportError> {
        let parsed = self.parse()?;
        let leaf = parsed
            .chain
            .first()
            .ok_or_else(|| TransportError::Config("node certificate: empty".into()))?;
        verify_peer_id(leaf, id).map_err(|e| TransportError::Config(e.to_string()))
    }

    /// The server side: requires a client certificate from the cluster CA,
    /// offers every version of both protocols, newest first (rustls takes
    /// the first of the server's list the client offers).
    pub(crate) fn server_config(&self) -> Result<quinn::ServerConfig, TransportError> {
        // rustls picks the first of these that the client offers.
        let all: Vec<&[u8]> = RAFT_VERSIONS
            .iter()
            .chain(GOSSIP_VERSIONS)
            .copied()
            .collect();
        self.server_config_offering(&all)
    }

    /// The server side offering only `alpns` (a node of an earlier
    /// version offers fewer).
    pub(crate) fn server_config_offering(
        &self,
        alpns: &[&[u8]],
    ) -> Result<quinn::ServerConfig, TransportError> {
        let Parsed { roots, chain, key } = self.parse()?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| TransportError::Config(format!("client verifier: {e}")))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Config(format!("tls: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TransportError::Config(format!("node certificate: {e}")))?;
        tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        let quic = QuicServerConfig::try_from(Arc::new(tls))
            .map_err(|e| TransportError::Config(format!("quic: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config(None, RAFT_IDLE_TIMEOUT)));
        Ok(config)
    }

    /// The client side for `alpn`'s protocol, offering every version of it
    /// this node reads ([`RAFT_VERSIONS`], [`GOSSIP_VERSIONS`]): presents
    /// the node certificate, verifies the server against the CA and the
    /// name passed to `connect_with`.
    pub(crate) fn client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, TransportError> {
        self.raft_client(alpn, Some(KEEP_ALIVE))
    }

    /// [`NodeTls::client_config`] without keep-alives, for the connections
    /// nobody needs open between calls (see [`KEEP_ALIVE`]): they lapse
    /// after [`RAFT_IDLE_TIMEOUT`] without traffic and the next call makes a
    /// fresh one.
    pub(crate) fn quiet_client_config(
        &self,
        alpn: &[u8],
    ) -> Result<quinn::ClientConfig, TransportError> {
        self.raft_client(alpn, None)
    }

    fn raft_client(
        &self,
        alpn: &[u8],
        keep_alive: Option<Duration>,
    ) -> Result<quinn::ClientConfig, TransportError> {
        let single = [alpn];
        let offered = versions_of(alpn).unwrap_or(&single);
        self.client_config_offering(offered, keep_alive, RAFT_IDLE_TIMEOUT)
    }

    /// The gossip client: offers every gossip version, the compact one
    /// first.
    pub(crate) fn gossip_client_config(&self) -> Result<quinn::ClientConfig, TransportError> {
        self.client_config_offering(GOSSIP_VERSIONS, Some(GOSSIP_KEEP_ALIVE), IDLE_TIMEOUT)
    }

    pub(crate) fn client_config_offering(
        &self,
        alpns: &[&[u8]],
        keep_alive: Option<Duration>,
        idle: Duration,
    ) -> Result<quinn::ClientConfig, TransportError> {
        let Parsed { roots, chain, key } = self.parse()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Config(format!("tls: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TransportError::Config(format!("node certificate: {e}")))?;
        tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        let quic = QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| TransportError::Config(format!("quic: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport_config(keep_alive, idle)));
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&e))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certs)
}

/// The transport settings of either side; `keep_alive` only on the side
/// that dialed (see [`KEEP_ALIVE`]), `idle` the idle timeout it offers.
fn transport_config(keep_alive: Option<Duration>, idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Every timeout passed is far below the limits of the conversion.
    if let Ok(idle) = IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    // The first handshake packet is resent after about three times the
    // initial RTT guess (333 ms by default): with 50 ms, a handshake whose
    // packets were lost in a cut is retried within ~200 ms of the link
    // healing (and a new attempt starts every 0.5–1 s, see peers.rs); a
    // slower link only costs a few early resends of a small packet.
    t.initial_rtt(INITIAL_RTT);
    // Peers are few and known: a larger first window lets a catch-up
    // append of a few hundred kB cross a 300 ms link in one round trip
    // (appends are cut to what the window sends within the call's limit,
    // `network::append_budget`) instead of the four of a standard slow
    // start; and a window
    // cut by a lossy spell never blocks the first call after it heals
    // (see `congestion`).
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(FlooredCubic::new(cubic)));
    t.keep_alive_interval(keep_alive)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .packet_threshold(REORDERING_THRESHOLD)
        .time_threshold(LOSS_TIME_THRESHOLD)
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_BUFFER);
    t
}

/// Why a peer's certificate does not prove the id it claims.
#[derive(Debug, thiserror::Error)]
#[error("certificate is not valid for node {id} ({name}): {reason}")]
pub(crate) struct IdentityError {
    id: u64,
    name: String,
    reason: String,
}

/// Checks that `leaf` (already verified against the cluster CA by rustls)
/// is valid for [`node_dns_name`]`(id)`.
pub(crate) fn verify_peer_id(leaf: &CertificateDer<'_>, id: u64) -> Result<(), IdentityError> {
    let name = node_dns_name(id);
    let fail = |reason: String| IdentityError {
        id,
        name: name.clone(),
        reason,
    };
    let dns = ServerName::try_from(name.as_str()).map_err(|e| fail(e.to_string()))?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| fail(e.to_string()))?;
    cert.verify_is_valid_for_subject_name(&dns)
        .map_err(|e| fail(e.to_string()))
}

/// The leaf certificate a connection's peer presented, if any.
pub(crate) fn peer_leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// The ALPN a connection negotiated.
pub(crate) fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

#[cfg(test)]
mod tests {
    use quinn::ConnectionError;
    use quinn_proto::{ConnectionClose, TransportErrorCode};

    use super::*;

    fn closed(code: TransportErrorCode) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    #[test]
    fn a_client_offers_every_version_of_its_protocol() {
        let raft: &[&[u8]] = &[b"edgelb-raft/2", b"edgelb-raft/1"];
        assert_eq!(versions_of(ALPN_RAFT), Some(raft));
        assert_eq!(versions_of(ALPN_RAFT_2), Some(raft));
        let gossip: &[&[u8]] = &[b"edgelb-gossip/2", b"edgelb-gossip/1"];
        assert_eq!(versions_of(ALPN_GOSSIP), Some(gossip));
        assert_eq!(versions_of(ALPN_GOSSIP_2), Some(gossip));
        assert_eq!(versions_of(b"other"), None);
        // Newest first.
        assert_eq!(RAFT_VERSIONS.first(), Some(&ALPN_RAFT_2));
    }

    #[test]
    fn no_common_alpn_reads_as_an_incompatible_release() {
        let refused = closed(TransportErrorCode::crypto(120));
        assert!(version_refused(&refused));
        let why = handshake_error(&refused);
        assert!(
            why.contains("no cluster protocol version in common"),
            "{why}"
        );
        assert!(why.contains("edgelb-raft/1"), "{why}");
        let other = closed(TransportErrorCode::crypto(42));
        assert!(!version_refused(&other));
        assert!(!handshake_error(&other).contains("in common"));
        assert!(!version_refused(&ConnectionError::TimedOut));
    }
}
