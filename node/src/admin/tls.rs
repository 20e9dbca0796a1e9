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
//! and clients check it against the cluster CA; the client side
//! (`edgectl --cacert`, `--join https://…`) is `edgelb_client::tls`.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntGauge, Registry};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::pki::not_after;
use crate::tls::{TlsError, certified_key};

/// How often an operator's certificate files are re-read.
const FILES_EVERY: Duration = Duration::from_secs(60);

/// The admin certificate in use.
pub struct AdminCert {
    current: ArcSwap<CertifiedKey>,
    /// The chain and key (PEM) `current` was made from: what the files are
    /// compared with ([`AdminCert::watch_files`]).
    pems: Mutex<(String, String)>,
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
            pems: Mutex::new((chain_pem.to_owned(), key_pem.to_owned())),
            expiry: OnceLock::new(),
        }))
    }

    /// Uses `chain_pem` and `key_pem` for new handshakes from now on.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        self.current
            .store(Arc::new(certified_key(chain_pem, key_pem)?));
        *self.pems.lock().unwrap_or_else(PoisonError::into_inner) =
            (chain_pem.to_owned(), key_pem.to_owned());
        self.show_expiry(chain_pem);
        Ok(())
    }

    /// Whether `chain_pem` and `key_pem` are what is in use.
    fn in_use(&self, chain_pem: &str, key_pem: &str) -> bool {
        let pems = self.pems.lock().unwrap_or_else(PoisonError::into_inner);
        pems.0 == chain_pem && pems.1 == key_pem
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
    /// them once they differ from what is in use and parse (a pair caught
    /// half-replaced is refused and tried again at the next check). Files
    /// changed before this starts (during a long join) are taken at the
    /// first check.
    pub async fn watch_files(
        self: Arc<Self>,
        cert: PathBuf,
        key: PathBuf,
        shutdown: CancellationToken,
    ) {
        self.watch_files_every(cert, key, shutdown, FILES_EVERY)
            .await;
    }

    async fn watch_files_every(
        self: Arc<Self>,
        cert: PathBuf,
        key: PathBuf,
        shutdown: CancellationToken,
        every: Duration,
    ) {
        let read = || {
            let c = std::fs::read_to_string(&cert).ok()?;
            let k = std::fs::read_to_string(&key).ok()?;
            Some((c, k))
        };
        // A refused pair is not logged again until the files change.
        let mut refused = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let Some((c, k)) = read() else {
                continue;
            };
            let seen = |(rc, rk): &(String, String)| *rc == c && *rk == k;
            if self.in_use(&c, &k) || refused.as_ref().is_some_and(seen) {
                continue;
            }
            match self.set(&c, &k) {
                Ok(()) => {
                    info!(cert = %cert.display(), "admin API certificate reloaded");
                    refused = None;
                }
                Err(e) => {
                    warn!(cert = %cert.display(), error = %e, "admin API certificate files refused; keeping the current one");
                    refused = Some((c, k));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
        (ck.cert.pem(), ck.key_pair.serialize_pem())
    }

    fn served(cert: &AdminCert) -> Vec<u8> {
        cert.current.load().cert[0].as_ref().to_vec()
    }

    #[test]
    fn a_half_replaced_pair_is_refused_and_the_current_one_kept() {
        let (old_cert, old_key) = pair("old.example");
        let (new_cert, new_key) = pair("new.example");
        assert!(matches!(
            AdminCert::new(&new_cert, &old_key),
            Err(TlsError::KeyMismatch)
        ));
        let admin = AdminCert::new(&old_cert, &old_key).expect("a matching pair");
        let before = served(&admin);
        // The certificate written, the key not yet.
        assert!(matches!(
            admin.set(&new_cert, &old_key),
            Err(TlsError::KeyMismatch)
        ));
        assert_eq!(served(&admin), before);
        admin.set(&new_cert, &new_key).expect("the new pair");
        assert_ne!(served(&admin), before);
    }

    /// Files replaced before the watch starts (the certificate was loaded
    /// before the admin port was bound, the watch starts after a join)
    /// are taken at its first check.
    #[tokio::test]
    async fn files_changed_before_the_watch_are_taken() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("admin.pem"), dir.join("admin.key"));
        let (old_cert, old_key) = pair("old.example");
        let (new_cert, new_key) = pair("new.example");
        let admin = AdminCert::new(&old_cert, &old_key).expect("a pair");
        let before = served(&admin);
        std::fs::write(&cert, &new_cert).unwrap();
        std::fs::write(&key, &new_key).unwrap();
        let stop = CancellationToken::new();
        let every = Duration::from_millis(20);
        let watch = tokio::spawn(admin.clone().watch_files_every(
            cert.clone(),
            key.clone(),
            stop.clone(),
            every,
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while served(&admin) == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new pair was not taken"
            );
            tokio::time::sleep(every).await;
        }
        stop.cancel();
        watch.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
