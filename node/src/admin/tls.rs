//! The admin API over TLS (`admin_tls`, `admin_tls_cert`, `admin_tls_key`).
//!
//! ```text
//!  accept ─▶ TLS handshake (within the header timeout) ─▶ HTTP/1.1 as on plain TCP
//!                 ▲
//!  AdminCert ─────┘ the certificate in use, swapped without a restart:
//!    node:  the node's cluster certificate; `crate::renewal` swaps in each renewal
//!    files: the operator's files, re-read every minute ([`AdminCert::watch_files`])
//! ```
//!
//! With the node's certificate the server name is `node-<id>.cluster.edgelb`
//! and clients check it against the cluster CA. [`client_config`] (what
//! `edgectl --cacert` and `--join https://…` use) accepts a certificate
//! that chains to the given CA and names the host dialled, as curl does,
//! or names a node `node-<id>.cluster.edgelb` whatever the host, as Consul's
//! `verify_server_hostname` accepts `server.<dc>.consul`: only a CA that
//! signs node certificates signs such names (the cluster CA, or the
//! operator's CA of their own PKI), and every member may serve the admin
//! API.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntGauge, Registry};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::pki::{NODE_DNS_SUFFIX, not_after};
use crate::tls::{TlsError, certified_key};

/// How often an operator's certificate files are re-read.
const FILES_EVERY: Duration = Duration::from_secs(60);

/// The admin certificate in use.
pub struct AdminCert {
    current: ArcSwap<CertifiedKey>,
    /// `edgelb_admin_cert_expiration_timestamp_seconds`, once shown.
    expiry: OnceLock<IntGauge>,
}

impl fmt::Debug for AdminCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminCert").finish_non_exhaustive()
    }
}

impl AdminCert {
    /// The certificate chain and key in PEM.
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(certified_key(chain_pem, key_pem)?),
            expiry: OnceLock::new(),
        }))
    }

    /// Uses `chain_pem` and `key_pem` for new handshakes from now on.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        self.current
            .store(Arc::new(certified_key(chain_pem, key_pem)?));
        self.show_expiry(chain_pem);
        Ok(())
    }

    /// Shows when the certificate `chain_pem` (the one in use) expires as
    /// `edgelb_admin_cert_expiration_timestamp_seconds` in `registry`.
    pub fn register_expiry(&self, registry: &Registry, chain_pem: &str) {
        let gauge = IntGauge::new(
            "edgelb_admin_cert_expiration_timestamp_seconds",
            "When the admin API's TLS certificate in use expires (not after), in Unix seconds.",
        );
        match gauge.and_then(|g| registry.register(Box::new(g.clone())).map(|()| g)) {
            Ok(g) => {
                let _ = self.expiry.set(g);
                self.show_expiry(chain_pem);
            }
            Err(e) => warn!(error = %e, "admin certificate expiry series not registered"),
        }
    }

    fn show_expiry(&self, chain_pem: &str) {
        if let (Some(g), Ok(t)) = (self.expiry.get(), not_after(chain_pem)) {
            g.set(t.unix_timestamp());
        }
    }

    /// The acceptor of the admin listener: HTTP/1.1 by ALPN, this
    /// certificate.
    ///
    /// # Panics
    /// Never: ring supports rustls' default protocol versions.
    pub(crate) fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(cfg))
    }

    /// Re-reads `cert` and `key` every minute until `shutdown` and uses
    /// them once they changed and parse (a pair caught half-replaced is
    /// refused and tried again at the next check).
    pub async fn watch_files(
        self: Arc<Self>,
        cert: PathBuf,
        key: PathBuf,
        shutdown: CancellationToken,
    ) {
        let read = || {
            let c = std::fs::read_to_string(&cert).ok()?;
            let k = std::fs::read_to_string(&key).ok()?;
            Some((c, k))
        };
        let mut last = read();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(FILES_EVERY) => {}
            }
            let now = read();
            if now.is_none() || now == last {
                continue;
            }
            if let Some((c, k)) = &now {
                match self.set(c, k) {
                    Ok(()) => {
                        info!(cert = %cert.display(), "admin API certificate reloaded");
                        last = now;
                    }
                    Err(e) => {
                        warn!(cert = %cert.display(), error = %e, "admin API certificate files refused; keeping the current one");
                    }
                }
            }
        }
    }
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver(Arc<AdminCert>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

/// A client config for an admin API over TLS that trusts only the CA
/// certificates in `ca_pem` (see the module docs for the names accepted).
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| TlsError::Chain(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::Chain(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Chain("holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Chain(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Chain(e.to_string()))?
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
        assert!(client_config(b"").is_err());
        assert!(client_config(b"not pem").is_err());
        let ca = crate::cluster::pki::generate_ca("t").unwrap();
        assert!(client_config(ca.cert_pem.as_bytes()).is_ok());
    }
}
