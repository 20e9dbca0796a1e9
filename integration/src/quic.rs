//! An outsider on a node's cluster port: a quinn client that offers ALPN
//! `edgelb-raft/1` with a certificate the cluster did not issue (or none),
//! accepts whatever certificate the node presents (so a refusal can only
//! come from the node), and tries to send one RPC stream.
//!
//! ```text
//!   outsider ──QUIC, ALPN edgelb-raft/1, [cert?]──▶ node :7071
//!            ──stream: [len][header][len][body], FIN──▶
//!            ◀── reply bytes  (Answered)  |  handshake error / close / reset  (Refused)
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut tls = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder.with_client_auth_cert(c.chain, c.key)?,
    };
    tls.alpn_protocols = vec![ALPN_RAFT.to_vec()];
    let quic = QuicClientConfig::try_from(Arc::new(tls)).context("QUIC client config")?;
    let endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
    let attempt = async {
        let connecting =
            endpoint.connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, server_name)?;
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
