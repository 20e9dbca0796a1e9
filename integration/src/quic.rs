//! An outsider on a node's cluster port: a quinn client that offers ALPN
//! `edgelb-raft/1` or `edgelb-gossip/1` with a certificate the cluster did
//! not issue, none, or a member's own, and accepts whatever certificate the
//! node presents (so a refusal can only come from the node).
//!
//! ```text
//!   outsider ──QUIC, ALPN edgelb-raft/1, [cert?]──▶ node :7071
//!            ──stream: [len][header][len][body], FIN──▶
//!            ◀── reply bytes  (Answered)  |  handshake error / close / reset  (Refused)
//!
//!   outsider ──QUIC, ALPN edgelb-gossip/1, [cert?]──▶ node :7071   (GossipConn)
//!            ──datagram: report──▶  or  ──uni stream: report, FIN──▶
//!            (no reply: what the node made of it shows in its metrics and views)
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::QuicClientConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::tls::AcceptAny;
use crate::within;

/// The ALPN of Raft RPCs between nodes.
pub const ALPN_RAFT: &[u8] = b"edgelb-raft/1";
/// The ALPN of load gossip between nodes.
pub const ALPN_GOSSIP: &[u8] = b"edgelb-gossip/1";

/// A client certificate chain and its key.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ClientCert {
    /// A self-signed certificate for the DNS name `name`.
    pub fn self_signed(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![name.to_owned()])?.self_signed(&key)?;
        Ok(Self {
            chain: vec![cert.der().clone()],
            key: pkcs8(&key),
        })
    }

    /// A member's own credentials: a PEM chain and PEM key (a node's
    /// `tls/node.pem` and `tls/node.key`).
    pub fn from_pem_files(chain: &Path, key: &Path) -> anyhow::Result<Self> {
        let chain = CertificateDer::pem_file_iter(chain)
            .with_context(|| chain.display().to_string())?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| key.display().to_string())?;
        Ok(Self { chain, key })
    }

    /// A copy (keys are not `Clone`).
    pub fn duplicate(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }

    /// A certificate for `name` signed by a CA of its own (another cluster's
    /// CA, say), with that CA in the chain.
    pub fn from_foreign_ca(name: &str) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "edgelb cluster CA foreign");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec![name.to_owned()])?.signed_by(&key, &ca, &ca_key)?;
        Ok(Self {
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: pkcs8(&key),
        })
    }
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// What the node did with the attempt.
#[derive(Debug)]
pub enum Outcome {
    /// The handshake failed, or the node closed the connection before any
    /// reply byte; the reason as quinn reported it.
    Refused(String),
    /// The stream failed but the connection stayed open (the node heard
    /// the peer and disliked only this stream).
    StreamFailed(String),
    /// The node answered on the stream.
    Answered(Vec<u8>),
}

/// Connects to `addr` from `source` (port 0) asking for `server_name`, with
/// `cert` (none: no client certificate), opens a stream, sends `request`
/// and reads the answer. Bounded by 10 s.
pub async fn try_raft_stream(
    addr: SocketAddr,
    source: IpAddr,
    server_name: &str,
    cert: Option<ClientCert>,
    request: &[u8],
) -> anyhow::Result<Outcome> {
    try_raft_stream_offering(&[ALPN_RAFT], addr, source, server_name, cert, request).await
}

/// [`try_raft_stream`] offering the ALPNs `alpns` (frame versions, newest
/// first) instead of `edgelb-raft/1` alone.
pub async fn try_raft_stream_offering(
    alpns: &[&[u8]],
    addr: SocketAddr,
    source: IpAddr,
    server_name: &str,
    cert: Option<ClientCert>,
    request: &[u8],
) -> anyhow::Result<Outcome> {
    let config = client_config(alpns, cert)?;
    let endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
    let attempt = async {
        let connecting = endpoint.connect_with(config, addr, server_name)?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => return Ok(Outcome::Refused(format!("handshake: {e}"))),
        };
        let failed = match exchange(&conn, request).await {
            Ok(bytes) if !bytes.is_empty() => return Ok(Outcome::Answered(bytes)),
            Ok(_) => "stream ended without a reply".to_owned(),
            Err(e) => e,
        };
        // Refused means the connection itself was closed, not one stream.
        anyhow::Ok(
            match tokio::time::timeout(Duration::from_secs(3), conn.closed()).await {
                Ok(reason) => Outcome::Refused(format!("{failed}; connection closed: {reason}")),
                Err(_) => Outcome::StreamFailed(failed),
            },
        )
    };
    let outcome = within(
        &format!("the node at {addr} to answer or refuse"),
        Duration::from_secs(10),
        attempt,
    )
    .await;
    endpoint.close(0u32.into(), b"done");
    outcome?
}

/// The ALPN a node settles on with a client offering `alpns` (newest
/// first) and presenting `cert`; `None` if the handshake fails. Bounded by
/// 10 s.
pub async fn agreed_alpn(
    alpns: &[&[u8]],
    addr: SocketAddr,
    source: IpAddr,
    server_name: &str,
    cert: Option<ClientCert>,
) -> anyhow::Result<Option<Vec<u8>>> {
    let config = client_config(alpns, cert)?;
    let endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
    let connecting = endpoint.connect_with(config, addr, server_name)?;
    let conn = within(
        &format!("a QUIC handshake with {addr}"),
        Duration::from_secs(10),
        connecting,
    )
    .await?;
    let alpn = conn.ok().and_then(|c| {
        let data = c.handshake_data()?;
        let data = data
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .ok()?;
        data.protocol
    });
    endpoint.close(0u32.into(), b"done");
    Ok(alpn)
}

/// A client config offering `alpns` that accepts any server certificate and
/// presents `cert` (none: no client certificate).
fn client_config(alpns: &[&[u8]], cert: Option<ClientCert>) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut tls = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder.with_client_auth_cert(c.chain, c.key)?,
    };
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let quic = QuicClientConfig::try_from(Arc::new(tls)).context("QUIC client config")?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// What became of a gossip connection attempt.
#[derive(Debug)]
pub enum Gossip {
    /// The handshake failed, or the node closed the connection; the reason
    /// as quinn reported it.
    Refused(String),
    /// The node kept the connection open.
    Open(GossipConn),
}

/// Connects to `addr` from `source` (port 0) with ALPN `edgelb-gossip/1`,
/// asking for `server_name`, with `cert` (none: no client certificate).
/// A connection that the node closes right after the handshake (TLS 1.3
/// clients finish before the server has judged their certificate) counts as
/// refused: the handshake is given `settle` to be turned down.
pub async fn gossip_connect(
    addr: SocketAddr,
    source: IpAddr,
    server_name: &str,
    cert: Option<ClientCert>,
    settle: Duration,
) -> anyhow::Result<Gossip> {
    let config = client_config(&[ALPN_GOSSIP], cert)?;
    let endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
    let connecting = endpoint.connect_with(config, addr, server_name)?;
    let conn = match within(
        &format!("a QUIC handshake with {addr}"),
        Duration::from_secs(10),
        connecting,
    )
    .await?
    {
        Ok(c) => c,
        Err(e) => {
            endpoint.close(0u32.into(), b"done");
            return Ok(Gossip::Refused(format!("handshake: {e}")));
        }
    };
    let conn = GossipConn { endpoint, conn };
    match conn.closed_within(settle).await {
        Some(reason) => Ok(Gossip::Refused(format!("closed: {reason}"))),
        None => Ok(Gossip::Open(conn)),
    }
}

/// An open gossip connection to a node.
#[derive(Debug)]
pub struct GossipConn {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl GossipConn {
    /// The largest datagram the node accepts (none: it takes no datagrams).
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }

    /// Sends `bytes` as one QUIC datagram.
    pub fn send_datagram(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.conn
            .send_datagram(bytes::Bytes::copy_from_slice(bytes))
            .context("sending a datagram")
    }

    /// Sends `bytes` on a new unidirectional stream and finishes it.
    pub async fn send_stream(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut send = self.conn.open_uni().await.context("opening a stream")?;
        send.write_all(bytes).await.context("writing the stream")?;
        // Fails only when the node has closed the connection already, having
        // read the stream (or not): what it made of it shows elsewhere.
        let _ = send.finish();
        Ok(())
    }

    /// Why the node closed the connection, if it does within `timeout`
    /// (scaled by [`patience`](crate::patience)).
    pub async fn closed_within(&self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(crate::patient(timeout), self.conn.closed())
            .await
            .ok()
            .map(|e| e.to_string())
    }

    /// Whether the connection is closed already.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}

impl Drop for GossipConn {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
    }
}

/// Sends `request` on a new stream and reads the reply to its end.
async fn exchange(conn: &quinn::Connection, request: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("open stream: {e}"))?;
    send.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let _ = send.finish();
    recv.read_to_end(1 << 20)
        .await
        .map_err(|e| format!("read: {e}"))
}

/// One request as the cluster transport frames it: a `u32` big-endian
/// length and JSON `{"from": from, "rpc": rpc}`, then the length and JSON of
/// `body`.
pub fn frame_request(from: u64, rpc: &str, body: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [
        serde_json::json!({"from": from, "rpc": rpc}).to_string(),
        body.to_string(),
    ] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}
