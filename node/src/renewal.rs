//! Keeping the node's cluster certificate valid while it runs.
//!
//! ```text
//!  at start, then every min(lifetime / 12, 1 h):
//!    built-in CA: node.pem has less than a third of its lifetime left?
//!                 ─▶ renew_node_cert(CA from the replicated state, node.key)
//!                 ─▶ Transport::reload_tls ─▶ tls/node.pem (atomic)
//!    own PKI:     --ca-cert / --node-cert / --node-key changed on disk?
//!                 ─▶ Transport::reload_tls
//! ```
//!
//! `edgelb_node_cert_expiration_timestamp_seconds` (gauge) is the
//! not-after time, in Unix seconds, of the certificate in use: an alert on
//! `… - time() < 7 * 86400` catches a renewal that keeps failing or own-PKI
//! files nobody replaced.
//!
//! Every member holds the cluster CA in its replicated state, so a node
//! renews its own certificate without asking anyone, even cut off from the
//! others. New handshakes (both directions) use the new certificate; open
//! connections keep theirs. With their own PKI, operators replace the files
//! and the node picks them up at the next check (as Envoy's file-based
//! secrets are), no restart needed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntGauge, Registry};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::AdminCert;
use crate::cluster::pki::{self, CaBundle};
use crate::cluster::{NodeTls, Transport};
use crate::config::Config;
use crate::store::Store;

/// The longest wait between two checks.
const MAX_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Where the node's certificate comes from.
#[derive(Debug)]
enum Source {
    /// `<data_dir>/tls/`, renewed with the cluster CA.
    BuiltIn { dir: PathBuf },
    /// The operator's files, reloaded when they change.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// The renewal task of one node.
pub(crate) struct Renewal {
    node_id: u64,
    lifetime: Duration,
    source: Source,
    store: Arc<Store>,
    transport: Arc<Transport>,
    /// The credentials the transport uses now.
    current: NodeTls,
    /// The admin API's certificate when it is the node's (`admin_tls`
    /// without files): renewed with it.
    admin: Option<Arc<AdminCert>>,
    /// `edgelb_node_cert_expiration_timestamp_seconds`.
    expiry: Option<IntGauge>,
}

impl Renewal {
    pub(crate) fn new(
        config: &Config,
        tls: NodeTls,
        store: Arc<Store>,
        transport: Arc<Transport>,
    ) -> Self {
        let source = match (&config.ca_cert, &config.node_cert, &config.node_key) {
            (Some(ca), Some(cert), Some(key)) => Source::Files {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => Source::BuiltIn {
                dir: config.data_dir.join("tls"),
            },
        };
        Self {
            node_id: config.node_id,
            lifetime: config.node_cert_lifetime,
            source,
            store,
            transport,
            current: tls,
            admin: None,
            expiry: None,
        }
    }

    /// Shows the expiry of the certificate in use in `registry`.
    pub(crate) fn metrics(mut self, registry: &Registry) -> Self {
        let gauge = IntGauge::new(
            "edgelb_node_cert_expiration_timestamp_seconds",
            "When the node certificate in use expires (not after), in Unix seconds.",
        );
        match gauge.and_then(|g| registry.register(Box::new(g.clone())).map(|()| g)) {
            Ok(g) => {
                self.expiry = Some(g);
                self.show_expiry();
            }
            Err(e) => warn!(error = %e, "certificate expiry series not registered"),
        }
        self
    }

    fn show_expiry(&self) {
        if let (Some(g), Ok(t)) = (&self.expiry, pki::not_after(&self.current.cert_pem)) {
            g.set(t.unix_timestamp());
        }
    }

    /// Renews the admin API's certificate `admin` with the node's.
    pub(crate) fn admin_cert(mut self, admin: Option<Arc<AdminCert>>) -> Self {
        self.admin = admin;
        self
    }

    /// How often the certificate is checked.
    fn period(&self) -> Duration {
        (self.lifetime / 12).clamp(Duration::from_secs(1), MAX_CHECK_EVERY)
    }

    /// Checks at once, then every [`Self::period`], until `shutdown`.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let period = self.period();
        loop {
            self.check(OffsetDateTime::now_utc());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
        }
    }

    fn check(&mut self, now: OffsetDateTime) {
        let next = match &self.source {
            Source::BuiltIn { dir } => match self.renewed(now) {
                Ok(Some(tls)) => {
                    let path = dir.join("node.pem");
                    if let Err(e) = crate::files::write_private(&path, &tls.cert_pem) {
                        warn!(path = %path.display(), error = %e, "could not store the renewed node certificate");
                    }
                    Some(tls)
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %e, "could not renew the node certificate");
                    None
                }
            },
            Source::Files { ca, cert, key } => {
                let read = |p: &PathBuf| crate::files::read_nonempty(p).ok().flatten();
                match (read(ca), read(cert), read(key)) {
                    (Some(ca_cert_pem), Some(cert_pem), Some(key_pem)) => {
                        let tls = NodeTls {
                            ca_cert_pem,
                            cert_pem,
                            key_pem,
                        };
                        let same = tls.ca_cert_pem == self.current.ca_cert_pem
                            && tls.cert_pem == self.current.cert_pem
                            && tls.key_pem == self.current.key_pem;
                        (!same).then_some(tls)
                    }
                    _ => None,
                }
            }
        };
        let Some(tls) = next else { return };
        match self.transport.reload_tls(&tls) {
            Ok(()) => {
                let not_after = pki::not_after(&tls.cert_pem).ok();
                info!(node_id = self.node_id, not_after = ?not_after, "node certificate in use from now on");
                if let Some(admin) = &self.admin
                    && let Err(e) = admin.set(&tls.cert_pem, &tls.key_pem)
                {
                    warn!(error = %e, "admin API keeps its certificate");
                }
                self.current = tls;
                self.show_expiry();
            }
            Err(e) => warn!(error = %e, "new node certificate refused; keeping the current one"),
        }
    }

    /// A renewed certificate when the current one is due and the cluster
    /// CA's key is in the replicated state.
    fn renewed(&self, now: OffsetDateTime) -> Result<Option<NodeTls>, pki::PkiError> {
        let not_after = pki::not_after(&self.current.cert_pem)?;
        if !pki::renewal_due(not_after, self.lifetime, now) {
            return Ok(None);
        }
        let state = self.store.state();
        let Some(secrets) = state.cluster().filter(|s| !s.ca_key_pem.is_empty()) else {
            return Ok(None);
        };
        let ca = CaBundle {
            cert_pem: secrets.ca_cert_pem.clone(),
            key_pem: secrets.ca_key_pem.clone(),
        };
        let cert_pem =
            pki::renew_node_cert(&ca, &self.current.key_pem, self.node_id, self.lifetime)?;
        Ok(Some(NodeTls {
            ca_cert_pem: self.current.ca_cert_pem.clone(),
            cert_pem,
            key_pem: self.current.key_pem.clone(),
        }))
    }
}
