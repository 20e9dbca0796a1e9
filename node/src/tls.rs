//! TLS termination's certificates: one key per domain, cached.
//!
//! A domain that names a stored certificate presents it; a domain without one
//! (or whose stored certificate does not parse) presents a self-signed
//! certificate that this node generates once per fqdn and logs. Keys are
//! cached so that rebuilding the routing table costs no key generation.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use edgelb_client::tls::pem_error;
use raft_store::model::{Certificate, Domain};
use raft_store::state::State;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

mod stream;
pub use stream::TlsIo;

/// Errors turning PEM into a usable key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain: {0}")]
    Chain(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("self-signed certificate for {0}: {1}")]
    SelfSigned(String, String),
    /// The key is not the one the chain's first certificate names.
    #[error("the private key does not belong to the first certificate of the chain")]
    KeyMismatch,
}

/// Parses a PEM chain and key into a signing key, and checks that the key
/// is the first certificate's (a key type whose public half rustls cannot
/// derive has nothing to compare and passes).
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Chain(pem_error(&e)))?;
    if chain.is_empty() {
        return Err(TlsError::Chain("no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Key("no PRIVATE KEY block".into()),
        e => TlsError::Key(pem_error(&e)),
    })?;
    let signer = any_supported_type(&key).map_err(|e| TlsError::Key(e.to_string()))?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch)
        }
        Err(e) => Err(TlsError::Chain(e.to_string())),
    }
}

fn self_signed(fqdn: &str) -> Result<CertifiedKey, TlsError> {
    let err = |e: rcgen::Error| TlsError::SelfSigned(fqdn.to_owned(), e.to_string());
    let ck = rcgen::generate_simple_self_signed(vec![fqdn.to_owned()]).map_err(err)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let signer = any_supported_type(&key).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(CertifiedKey::new(vec![ck.cert.der().clone()], signer))
}

/// Keys by domain, kept across routing rebuilds.
#[derive(Default)]
pub struct CertCache {
    /// Stored certificates by (name, chain) so a replaced certificate reloads.
    stored: Mutex<HashMap<(String, String), Arc<CertifiedKey>>>,
    generated: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertCache").finish_non_exhaustive()
    }
}

impl CertCache {
    /// The key `domain` presents.
    ///
    /// # Panics
    /// Only if generating a self-signed certificate fails, which rcgen does not
    /// do for a validated fqdn.
    pub fn key_for(&self, domain: &Domain, state: &State) -> Arc<CertifiedKey> {
        if let Some(cert) = domain
            .certificate
            .as_deref()
            .and_then(|n| state.certificate(n))
        {
            match self.stored_key(cert) {
                Ok(k) => return k,
                Err(e) => {
                    warn!(fqdn = %domain.fqdn, certificate = %cert.name, error = %e, "stored certificate unusable; presenting a self-signed one")
                }
            }
        }
        let mut generated = self
            .generated
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = generated.get(&domain.fqdn) {
            return k.clone();
        }
        // A validated fqdn (wildcards included) is a valid SAN; fall back to a
        // fixed name rather than fail if rcgen ever disagrees.
        let key = self_signed(&domain.fqdn)
            .or_else(|_| self_signed("edgelb.invalid"))
            .expect("rcgen signs a fixed dns name");
        info!(fqdn = %domain.fqdn, "generated a self-signed certificate");
        let key = Arc::new(key);
        generated.insert(domain.fqdn.clone(), key.clone());
        key
    }

    fn stored_key(&self, cert: &Certificate) -> Result<Arc<CertifiedKey>, TlsError> {
        let id = (cert.name.clone(), cert.chain.clone());
        let mut stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = stored.get(&id) {
            return Ok(k.clone());
        }
        let key = Arc::new(certified_key(&cert.chain, &cert.private_key)?);
        stored.insert(id, key.clone());
        Ok(key)
    }
}
