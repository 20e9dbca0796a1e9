//! TLS to an admin API served over `https://` (the node's `admin_tls`).
//!
//! With the node's certificate the server name is `node-<id>.cluster.edgelb`
//! and clients check it against the cluster CA. [`client_config`] (what
//! `edgectl --cacert` and `edgelb --join https://…` use) accepts a
//! certificate that chains to the given CA and names the host dialled, as
//! curl does, or names a node `node-<id>.cluster.edgelb` whatever the host,
//! as Consul's `verify_server_hostname` accepts `server.<dc>.consul`: only a
//! CA that signs node certificates signs such names (the cluster CA, or the
//! operator's CA of their own PKI), and every member may serve the admin
//! API.
//!
//! ```text
//!  CA PEM ─▶ client_config ─▶ ClientConfig (ALPN http/1.1) ─▶ Client::with_tls
//!  handshake: web PKI check for the host ──ok──▶ accepted
//!                 └─ not valid for the name ─▶ a `node-<id>` name in the certificate? ─▶ checked again for it
//! ```

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::pki::NODE_DNS_SUFFIX;

/// Why a CA file cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A `CERTIFICATE` block does not decode.
    #[error("certificate chain: {}", pem_error(.0))]
    Pem(#[source] pem::Error),
    /// No `CERTIFICATE` block at all.
    #[error("certificate chain: holds no PEM certificate")]
    Empty,
    /// A certificate that rustls does not take as a trust anchor, or a
    /// verifier that cannot be built.
    #[error("certificate chain: {0}")]
    Rustls(#[source] rustls::Error),
    /// The roots given to the web PKI verifier were refused.
    #[error("certificate chain: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// A PEM parsing error in words: the markers named as text (the parser's
/// own messages print them as bytes).
pub fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "section end \"{}\" missing",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "illegal section start: \"{}\"",
            String::from_utf8_lossy(line).escape_debug()
        ),
        e => e.to_string(),
    }
}

/// A client config for an admin API over TLS that trusts only the CA
/// certificates in `ca_pem` (see the module docs for the names accepted).
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, CaError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(CaError::Pem)?)
            .map_err(CaError::Rustls)?;
    }
    if roots.is_empty() {
        return Err(CaError::Empty);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(CaError::Verifier)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(CaError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeNames { inner }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The web PKI check, with a node's cluster name accepted for any host.
#[derive(Debug)]
struct NodeNames {
    inner: Arc<WebPkiServerVerifier>,
}

/// Whether `name` is `node-<id>.cluster.edgelb`.
fn is_node_name(name: &str) -> bool {
    name.strip_suffix(NODE_DNS_SUFFIX)
        .and_then(|n| n.strip_suffix('.'))
        .and_then(|n| n.strip_prefix("node-"))
        .is_some_and(|id| id.parse::<u64>().is_ok())
}

impl ServerCertVerifier for NodeNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let first = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) = &first
        else {
            return first;
        };
        let node_name = webpki::EndEntityCert::try_from(end_entity)
            .ok()
            .and_then(|cert| {
                cert.valid_dns_names()
                    .find(|n| is_node_name(n))
                    .map(str::to_owned)
            });
        match node_name.and_then(|n| ServerName::try_from(n).ok()) {
            Some(name) => {
                self.inner
                    .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
            }
            None => first,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_errors_name_their_markers_as_text() {
        let truncated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        let e = client_config(truncated.as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "certificate chain: section end \"CERTIFICATE\" missing"
        );
    }

    #[test]
    fn node_names() {
        assert!(is_node_name("node-1.cluster.edgelb"));
        assert!(is_node_name("node-18446744073709551615.cluster.edgelb"));
        assert!(!is_node_name("node-.cluster.edgelb"));
        assert!(!is_node_name("node-x.cluster.edgelb"));
        assert!(!is_node_name("node-1cluster.edgelb"));
        assert!(!is_node_name("evil.node-1.cluster.edgelb"));
        assert!(!is_node_name("node-1.cluster.edgelb.example"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        assert!(matches!(client_config(b""), Err(CaError::Empty)));
        assert!(matches!(client_config(b"not pem"), Err(CaError::Empty)));
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(client_config(broken).is_err());
        let ca = crate::pki::generate_ca("t").unwrap();
        assert!(client_config(ca.cert_pem.as_bytes()).is_ok());
    }
}
