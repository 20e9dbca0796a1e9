//! A TLS client for tests: it accepts any server certificate (the node's are
//! self-signed) but keeps the one presented, so a test can assert which
//! certificate was served for an SNI name.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Accepts every certificate; still checks handshake signatures, so the
/// server must hold the key of the certificate it presents.
#[derive(Debug)]
pub(crate) struct AcceptAny(pub(crate) Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A finished TLS handshake.
#[derive(Debug)]
pub struct TlsConn {
    pub stream: TlsStream<TcpStream>,
    /// The server's end-entity certificate (DER).
    pub cert: Vec<u8>,
    /// The protocol ALPN chose, if any.
    pub alpn: Option<Vec<u8>>,
}

impl TlsConn {
    /// Whether the served certificate names `dns_name` (in its SAN or subject).
    pub fn cert_names(&self, dns_name: &str) -> bool {
        der_mentions(&self.cert, dns_name)
    }
}

/// Connects to `addr` and completes a TLS handshake with SNI `sni`, offering
/// `alpn` (e.g. `[b"h2", b"http/1.1"]`, or none).
pub async fn connect(addr: SocketAddr, sni: &str, alpn: &[&[u8]]) -> anyhow::Result<TlsConn> {
    let tcp = crate::client::tcp_connect(addr, None)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    handshake(tcp, sni, alpn).await
}

/// Completes a TLS handshake on a connected stream, as [`connect`] does.
pub async fn handshake(tcp: TcpStream, sni: &str, alpn: &[&[u8]]) -> anyhow::Result<TlsConn> {
    let addr = tcp.peer_addr()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(sni.to_owned()).context("SNI name")?;
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr} for {sni}"))?;
    let (_, session) = stream.get_ref();
    let cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .context("server presented no certificate")?;
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    Ok(TlsConn { stream, cert, alpn })
}

/// Whether DER bytes contain `name` as an ASCII string: a dNSName in a SAN
/// and a subject common name are stored verbatim (IA5String / UTF8String),
/// so this tells certificates for different host names apart without an
/// X.509 parser.
pub fn der_mentions(der: &[u8], name: &str) -> bool {
    let needle = name.as_bytes();
    !needle.is_empty() && der.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::der_mentions;

    #[test]
    fn finds_names_in_bytes() {
        let der = b"\x30\x82\x01\x0a\x82\x06a.test\x82\x06b.test";
        assert!(der_mentions(der, "a.test"));
        assert!(!der_mentions(der, "c.test"));
        assert!(!der_mentions(der, ""));
    }
}
