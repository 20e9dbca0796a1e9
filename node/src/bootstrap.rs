//! Joining or founding a cluster: the node's TLS identity and the first
//! Raft steps.
//!
//! ```text
//!  empty data dir, no --join:  generate cluster CA ─▶ issue own certificate ─▶ initialise a
//!                              one-node Raft ─▶ record CA + token hash (InitCluster)
//!  empty data dir, --join URL: generate key + CSR ─▶ POST URL/v1/cluster/nodes (token) ─▶
//!                              member signs with the cluster CA ─▶ (Raft starts) ─▶
//!                              POST again without CSR: added as a learner, promoted
//!                              by the leader's policy ([`add_self`])
//!  anything in the data dir:   load the stored identity; Raft resumes from its log
//! ```
//!
//! The TLS identity lives in `<data_dir>/tls/` (`ca.pem`, `node.pem`,
//! `node.key`, mode 0600). Operators with their own PKI pass `--ca-cert`,
//! `--node-cert` and `--node-key` instead; the cluster then records no CA
//! key and members cannot mint certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgelb_api::cluster::{AddNodeData, AddNodeRequest};
use edgelb_client::client::{self, ApiUrl, Client, UrlError};
use rustls::ClientConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::cluster::NodeTls;
use crate::cluster::pki::{self, CaBundle, PkiError};
use crate::config::{Config, ConfigError};
use crate::files::{IoError, io_error};

/// Why bootstrapping failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or directory of the data dir could not be read or written.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The cluster CA or this node's certificate could not be made.
    #[error("{what}: {source}")]
    Pki {
        what: &'static str,
        #[source]
        source: PkiError,
    },
    #[error("joining {url}: {source}")]
    Join {
        url: String,
        #[source]
        source: JoinError,
    },
    /// A file of the data dir is damaged; the message names it and says
    /// what to do (exit 65).
    #[error("{0}")]
    Corrupt(String),
}

/// Why a member did not admit this node.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// `--join` is not an admin URL.
    #[error("{0}")]
    Url(#[source] UrlError),
    /// The node's key or certificate request could not be made.
    #[error("CSR: {0}")]
    Csr(#[source] PkiError),
    /// The member could not be reached, or refused.
    #[error("{0}")]
    Admin(#[source] client::Error),
    /// The member's answer lacks what this step needs.
    #[error("{0}")]
    Missing(&'static str),
}

/// What a node starts from.
#[derive(Debug)]
pub struct Identity {
    pub tls: NodeTls,
    /// The CA key when this node founded the cluster now (to record it).
    pub new_ca_key: Option<String>,
    /// True when the node joined a cluster during this start.
    pub joined: bool,
    /// True when this start founded a new cluster.
    pub founded: bool,
    /// `<data_dir>/founding` is damaged: harmless once the founding entry
    /// is committed (the marker is then removed), else the start stops
    /// with this message.
    pub damaged_founding: Option<String>,
}

fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// `<data_dir>/founding`: written before a founder's first Raft step and
/// removed once the founding entry (CA and token hash) is committed
/// ([`founding_done`]). It holds the new CA's key (empty with an operator's
/// PKI), so that a founder that crashed in between founds on its next start
/// with the CA its certificate chains to.
fn founding_marker(data_dir: &Path) -> PathBuf {
    data_dir.join("founding")
}

/// What [`check`] found: an identity to start from as it is, or one to make
/// by founding or joining ([`establish`]).
#[derive(Debug)]
pub struct Checked {
    found: Found,
    marker: PathBuf,
}

#[derive(Debug)]
enum Found {
    /// The operator's files or the data dir's; `mark` when a founding with
    /// the operator's PKI begins now (its marker is written by `establish`).
    Ready { identity: Identity, mark: bool },
    /// Nothing to start from: found a cluster, or join the one `--join`
    /// names.
    Anew,
}

/// Reads and checks the node's identity without writing anything or using
/// the network, so that a start with an identity that is not this node's
/// (a `node_cert` of another node, a `node_id` the data dir does not hold)
/// or a damaged one stops before any port is bound (SPEC §9).
///
/// A founder resumes an unfinished founding (the [`founding_marker`] is
/// there); a node with certificate files but no Raft state and no CA key
/// to found with (what a crash of an earlier version left) was never part
/// of a cluster and starts over.
pub fn check(config: &Config) -> Result<Checked, BootstrapError> {
    let marker = founding_marker(&config.data_dir);
    let mut unfinished = read_opt(&marker)?;
    let fresh = !has_raft_state(&config.data_dir);
    let operator_pki = config.ca_cert.is_some();
    let damaged_founding = match &unfinished {
        Some(body) => founding_damage(&marker, body, operator_pki),
        None => None,
    };
    if damaged_founding.is_some() {
        // Never founds with what the marker holds now.
        unfinished = None;
    }
    if let (Some(ca), Some(cert), Some(key)) =
        (&config.ca_cert, &config.node_cert, &config.node_key)
    {
        let read = |field: &str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| {
                BootstrapError::Config(ConfigError::new(field, format!("{}: {e}", p.display())))
            })
        };
        let tls = NodeTls {
            ca_cert_pem: read("ca_cert", ca)?,
            cert_pem: read("node_cert", cert)?,
            key_pem: read("node_key", key)?,
        };
        operator_files_sound(&tls, ca, cert, key)?;
        if let Some(other) = names_another_node(&tls.cert_pem, config.node_id) {
            return Err(ConfigError::new(
                "node_cert",
                format!(
                    "{} is the certificate of node {other}, not of node_id {}",
                    cert.display(),
                    config.node_id
                ),
            )
            .into());
        }
        let founded =
            config.join.is_none() && damaged_founding.is_none() && (fresh || unfinished.is_some());
        let mark = founded && unfinished.is_none();
        let identity = Identity {
            tls,
            new_ca_key: None,
            joined: false,
            founded,
            damaged_founding,
        };
        return Ok(Checked {
            found: Found::Ready { identity, mark },
            marker,
        });
    }
    let dir = tls_dir(&config.data_dir);
    if let Some(tls) = stored_identity(&dir, config, fresh)? {
        // Certificate files without Raft state, a founding to resume or a
        // join to finish are made anew below, whatever node they name.
        let made_anew =
            fresh && unfinished.is_none() && damaged_founding.is_none() && config.join.is_none();
        if let Some(other) =
            names_another_node(&tls.cert_pem, config.node_id).filter(|_| !made_anew)
        {
            return Err(ConfigError::new(
                "node_id",
                format!(
                    "is {}, but {} belongs to node {other} (its certificate {} names node \
                     {other}); on a restart the data dir wins: start it with --node-id {other}, \
                     or give node {} a data dir of its own",
                    config.node_id,
                    config.data_dir.display(),
                    dir.join("node.pem").display(),
                    config.node_id
                ),
            )
            .into());
        }
        let damaged = damaged_founding.is_some();
        let stored = |new_ca_key, founded| {
            let identity = Identity {
                tls,
                new_ca_key,
                joined: false,
                founded,
                damaged_founding,
            };
            Ok(Checked {
                found: Found::Ready {
                    identity,
                    mark: false,
                },
                marker: marker.clone(),
            })
        };
        match (config.join.is_some(), unfinished) {
            // A joining node that stopped after it got its certificate adds
            // itself on this start (`app::start`).
            (true, _) => return stored(None, false),
            (false, Some(ca_key)) => {
                let ca_key = ca_key.trim();
                let ca_key = (!ca_key.is_empty()).then(|| format!("{ca_key}\n"));
                return stored(ca_key, true);
            }
            (false, None) if !fresh || damaged => return stored(None, false),
            (false, None) => tracing::warn!(
                dir = %dir.display(),
                "certificate files without Raft state or a CA key: founding anew"
            ),
        }
    } else if !fresh {
        return Err(BootstrapError::Corrupt(format!(
            "{} holds Raft state but {} has no complete identity (ca.pem, node.pem, node.key)",
            config.data_dir.display(),
            dir.display()
        )));
    }
    Ok(Checked {
        found: Found::Anew,
        marker,
    })
}

/// [`check`] and [`establish`] in one step, for tools and tests that bind
/// no port of their own first.
pub async fn identity(config: &Config, token: &str) -> Result<Identity, BootstrapError> {
    establish(config, token, check(config)?).await
}

/// The node's identity from what [`check`] found: as it is, or made by
/// founding (a new CA, unless a restore brings one) or by joining the
/// cluster `--join` names (a CSR, signed by a member; the node's admin
/// address goes with it, so the admin port is bound by now).
///
/// Files are written atomically ([`crate::files`]), `node.pem` last: it
/// marks a complete identity.
pub async fn establish(
    config: &Config,
    token: &str,
    checked: Checked,
) -> Result<Identity, BootstrapError> {
    let Checked { found, marker } = checked;
    if let Found::Ready { identity, mark } = found {
        if mark {
            write(&marker, "")?;
        }
        return Ok(identity);
    }
    let dir = tls_dir(&config.data_dir);
    let (tls, new_ca_key, joined) = match &config.join {
        None => {
            // A restore keeps the backup's CA (`crate::restore`).
            let ca = match &config.founding_ca {
                Some(ca) => ca.clone(),
                None => pki::generate_ca("edgelb").map_err(|source| BootstrapError::Pki {
                    what: "cluster CA",
                    source,
                })?,
            };
            let (cert, key) =
                pki::issue_node_cert_for(&ca, config.node_id, config.node_cert_lifetime).map_err(
                    |source| BootstrapError::Pki {
                        what: "node certificate",
                        source,
                    },
                )?;
            let CaBundle { cert_pem, key_pem } = ca;
            write(&marker, &key_pem)?;
            (
                NodeTls {
                    ca_cert_pem: cert_pem,
                    cert_pem: cert,
                    key_pem: key,
                },
                Some(key_pem),
                false,
            )
        }
        Some(url) => (join(config, url, token).await?, None, true),
    };
    std::fs::create_dir_all(&dir).map_err(io_error(dir.display()))?;
    // node.pem last: it marks a complete identity.
    for (name, body) in [
        ("ca.pem", &tls.ca_cert_pem),
        ("node.key", &tls.key_pem),
        ("node.pem", &tls.cert_pem),
    ] {
        write(&dir.join(name), body)?;
    }
    let founded = !joined;
    Ok(Identity {
        tls,
        new_ca_key,
        joined,
        founded,
        damaged_founding: None,
    })
}

/// The operator's PKI files parse, and the key is the certificate's: a
/// config error naming the field otherwise.
fn operator_files_sound(
    tls: &NodeTls,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(), ConfigError> {
    for (field, path, pem) in [
        ("ca_cert", ca, &tls.ca_cert_pem),
        ("node_cert", cert, &tls.cert_pem),
    ] {
        if let Err(e) = pki::not_after(pem) {
            return Err(ConfigError::new(
                field,
                format!("{}: not a PEM certificate ({e})", path.display()),
            ));
        }
    }
    crate::tls::certified_key(&tls.cert_pem, &tls.key_pem)
        .map_err(|e| crate::config::pair_error(&e, ("node_cert", cert), ("node_key", key)))?;
    Ok(())
}

/// Forgets the [`founding_marker`] once the founding entry is committed.
pub fn founding_done(data_dir: &Path) -> Result<(), BootstrapError> {
    let marker = founding_marker(data_dir);
    crate::files::remove(&marker)
        .map_err(io_error(format_args!("removing {}", marker.display())))?;
    Ok(())
}

/// The node a certificate names when it does not name `id` (a certificate
/// that names no node is for the TLS checks to judge).
fn names_another_node(cert_pem: &str, id: u64) -> Option<u64> {
    let named = pki::named_nodes(cert_pem).ok()?;
    if named.contains(&id) {
        return None;
    }
    named.first().copied()
}

/// The identity in `dir` when all three files are there and not empty.
///
/// With Raft state in the data dir the identity must be there and sound:
/// a file missing, empty, not PEM, not a certificate or key, or a key that
/// is not the certificate's, is a damaged file (exit 65) named with what
/// to do ([`tls_damage`]).
fn stored_identity(
    dir: &Path,
    config: &Config,
    fresh: bool,
) -> Result<Option<NodeTls>, BootstrapError> {
    let files = ["ca.pem", "node.pem", "node.key"].map(|name| dir.join(name));
    let [ca, cert, key] = &files;
    let read = |p: &Path| match crate::files::read_nonempty(p) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(tls_damage(config, p, "it is not text (not PEM)"))
        }
        Err(e) => Err(io_error(p.display())(e).into()),
    };
    let pems = [read(ca)?, read(cert)?, read(key)?];
    let [Some(ca_cert_pem), Some(cert_pem), Some(key_pem)] = pems else {
        if fresh {
            return Ok(None);
        }
        // With Raft state every file must be there: the first one missing
        // or empty is named.
        let p = (files.iter().zip(&pems))
            .find_map(|(p, pem)| pem.is_none().then_some(p))
            .unwrap_or(ca);
        let what = if p.exists() {
            "the file is empty (truncated)"
        } else {
            "the file is missing"
        };
        return Err(tls_damage(config, p, what));
    };
    for (p, pem) in [(ca, &ca_cert_pem), (cert, &cert_pem)] {
        if let Err(e) = pki::not_after(pem) {
            return Err(tls_damage(
                config,
                p,
                &format!("not a PEM certificate ({e})"),
            ));
        }
    }
    if PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).is_err() {
        return Err(tls_damage(config, key, "not a PEM private key"));
    }
    if let Err(e) = crate::admin::AdminCert::new(&cert_pem, &key_pem) {
        return Err(tls_damage(
            config,
            key,
            &format!("it is not the key of {} ({e})", cert.display()),
        ));
    }
    Ok(Some(NodeTls {
        ca_cert_pem,
        cert_pem,
        key_pem,
    }))
}

/// The start-up error for a damaged file of `<data_dir>/tls/`: what is
/// wrong and the way out (restore the file, or rejoin).
fn tls_damage(config: &Config, path: &Path, problem: &str) -> BootstrapError {
    let ca_hint = if path.file_name().is_some_and(|n| n == "ca.pem") {
        " (ca.pem is the cluster CA's certificate, the same on every member: it can also be \
         copied from another member's <data_dir>/tls/ca.pem)"
    } else {
        ""
    };
    BootstrapError::Corrupt(format!(
        "{} is corrupt: {problem}. The node's TLS identity cannot be made again in place: \
         restore the file from a backup of {}{ca_hint}, or rejoin this node: {} \
         (README: Corrupted files)",
        path.display(),
        tls_dir(&config.data_dir).display(),
        rejoin_steps(config)
    ))
}

/// The documented way back for a node whose data dir cannot be repaired in
/// place: removed from the membership, a fresh data dir, joined again.
pub fn rejoin_steps(config: &Config) -> String {
    format!(
        "(1) on another member run `edgectl cluster remove-node {id}` (DELETE \
         /v1/cluster/nodes/{id}); (2) move {dir} aside; (3) start this node again with the \
         same flags and an empty data dir, with --join <a member's admin URL> and the \
         cluster's --token. A one-node cluster has no other member: restore {dir} from a backup",
        id = config.node_id,
        dir = config.data_dir.display()
    )
}

/// What is wrong with the founding marker's `body`, if anything: it holds
/// the new CA's private key (PEM), or nothing with an operator's PKI.
fn founding_damage(marker: &Path, body: &str, operator_pki: bool) -> Option<String> {
    let body = body.trim();
    let problem = if body.is_empty() {
        if operator_pki {
            return None;
        }
        "the file is empty (truncated); it held the new cluster CA's key"
    } else if PrivateKeyDer::from_pem_slice(body.as_bytes()).is_ok() {
        return None;
    } else {
        "it does not hold the PEM key of the new cluster CA"
    };
    Some(format!(
        "{} is corrupt: {problem}. It marks a founding that has not completed: nothing \
         was written to the cluster yet. Move the data dir aside and start this node again \
         on an empty one to found the cluster anew (README: Corrupted files)",
        marker.display()
    ))
}

/// A file's text, empty or not; `None` when it is missing.
fn read_opt(path: &Path) -> Result<Option<String>, BootstrapError> {
    match std::fs::read(path) {
        // Bytes that are not text are a damaged file, told by the caller.
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path.display())(e).into()),
    }
}

fn write(path: &Path, body: &str) -> Result<(), BootstrapError> {
    crate::files::write_private(path, body).map_err(io_error(path.display()))?;
    Ok(())
}

/// SPEC §9: one token per cluster. Once the replicated state records the
/// hash of the cluster's token, this node's token must be that token: a
/// node that would take another one (its stored token lost, a copied data
/// dir) refuses to start instead of accepting it for cluster-wide writes.
pub fn check_token(state: &raft_store::State, token: &str) -> Result<(), ConfigError> {
    let Some(secrets) = state.cluster() else {
        return Ok(());
    };
    if token_matches(token, &secrets.token_sha256) {
        return Ok(());
    }
    Err(ConfigError::new(
        "token",
        "is not this cluster's token (its hash differs from the one the cluster recorded \
         when it was founded; one token per cluster): start the node with the cluster's --token",
    ))
}

/// Whether `token` hashes to `recorded` (a cluster's `token_sha256`),
/// compared in constant time.
pub(crate) fn token_matches(token: &str, recorded: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(token_sha256(token).as_bytes().ct_eq(recorded.as_bytes()))
}

/// Whether `data_dir` holds a Raft log (a node that was ever a member).
pub(crate) fn has_raft_state(data_dir: &Path) -> bool {
    data_dir.join("raft-log.redb").exists()
}

async fn join(config: &Config, url: &str, token: &str) -> Result<NodeTls, BootstrapError> {
    let (key_pem, csr) =
        pki::node_key_and_csr(config.node_id).map_err(|e| BootstrapError::Join {
            url: url.to_owned(),
            source: JoinError::Csr(e),
        })?;
    let body = AddNodeRequest {
        node_id: config.node_id,
        cluster_addr: config
            .advertised_cluster_addr(config.cluster_addr)
            .to_string(),
        admin_addr: config.admin_addr.to_string(),
        region: config.region.clone(),
        csr: Some(csr),
    };
    // The member may be starting too: retry for a while.
    post_add_node(
        url,
        config.join_tls.as_ref(),
        token,
        &body,
        30,
        "no certificate in the answer",
        |d| {
            Some(NodeTls {
                ca_cert_pem: d.ca_certificate?,
                cert_pem: d.certificate?,
                key_pem: key_pem.clone(),
            })
        },
    )
    .await
}

/// Adds this node (its cluster endpoint listening, its Raft started) to
/// the cluster at `url` and returns the index of the last membership change
/// the leader made for it. Retried while the member is starting or has no
/// quorum, for up to a minute.
pub async fn add_self(
    config: &Config,
    cluster_addr: &str,
    url: &str,
    token: &str,
) -> Result<u64, BootstrapError> {
    let body = AddNodeRequest {
        node_id: config.node_id,
        cluster_addr: cluster_addr.to_owned(),
        admin_addr: config.admin_addr.to_string(),
        region: config.region.clone(),
        csr: None,
    };
    post_add_node(
        url,
        config.join_tls.as_ref(),
        token,
        &body,
        60,
        "no log index in the answer",
        |d| d.log_index,
    )
    .await
}

/// How long one `POST /v1/cluster/nodes` may take once connected.
const JOIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// `POST /v1/cluster/nodes` with `body` until an answer whose data `take`
/// accepts, retrying (every 500 ms, `tries` times) while the member cannot
/// be reached or answers 503 ([`client::Error::is_retryable`]).
async fn post_add_node<T>(
    url: &str,
    tls: Option<&Arc<ClientConfig>>,
    token: &str,
    body: &AddNodeRequest,
    tries: usize,
    missing: &'static str,
    take: impl Fn(AddNodeData) -> Option<T>,
) -> Result<T, BootstrapError> {
    let err = |source| BootstrapError::Join {
        url: url.to_owned(),
        source,
    };
    let base = ApiUrl::parse(url).map_err(|e| err(JoinError::Url(e)))?;
    let mut client = Client::new(base)
        .with_token(token)
        .with_user_agent(concat!("edgelb/", env!("CARGO_PKG_VERSION")))
        .with_timeouts(client::CONNECT_TIMEOUT, JOIN_REQUEST_TIMEOUT);
    if let Some(tls) = tls {
        client = client.with_tls(tls.clone());
    }
    let mut attempt = 1;
    loop {
        match client.post("/v1/cluster/nodes", body).await {
            Ok(data) => return take(data).ok_or_else(|| err(JoinError::Missing(missing))),
            Err(e) if e.is_retryable() && attempt < tries => {}
            Err(e) => return Err(err(JoinError::Admin(e))),
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Lowercase hex SHA-256 of the admin token.
pub fn token_sha256(token: &str) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(label: &str) -> Config {
        let mut config = Config::embedded_default();
        config.data_dir =
            std::env::temp_dir().join(format!("edgelb-bootstrap-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&config.data_dir);
        std::fs::create_dir_all(&config.data_dir).unwrap();
        config
    }

    #[tokio::test]
    async fn a_founding_interrupted_before_its_entry_resumes_with_the_same_ca() {
        let config = config("resume");
        let first = identity(&config, "t").await.unwrap();
        assert!(first.founded);
        let ca_key = first.new_ca_key.clone().unwrap();
        // A crash now: Raft may have created its files, the founding entry
        // never committed.
        std::fs::write(config.data_dir.join("raft-log.redb"), b"").unwrap();
        let again = identity(&config, "t").await.unwrap();
        assert!(again.founded, "the founding is not resumed");
        assert_eq!(
            again.new_ca_key.as_deref().map(str::trim),
            Some(ca_key.trim())
        );
        assert_eq!(again.tls.cert_pem.trim(), first.tls.cert_pem.trim());
        // The CA it resumes with signs certificates that chain to ca.pem.
        let ca = CaBundle {
            cert_pem: again.tls.ca_cert_pem.clone(),
            key_pem: again.new_ca_key.unwrap(),
        };
        pki::issue_node_cert(&ca, 2).unwrap();

        founding_done(&config.data_dir).unwrap();
        let restarted = identity(&config, "t").await.unwrap();
        assert!(!restarted.founded && restarted.new_ca_key.is_none());
        assert_eq!(restarted.tls.cert_pem.trim(), first.tls.cert_pem.trim());
        std::fs::remove_dir_all(&config.data_dir).unwrap();
    }

    #[tokio::test]
    async fn another_node_id_is_refused_on_a_restart_and_not_before_one() {
        let mut config = config("other-id");
        let first = identity(&config, "t").await.unwrap();
        founding_done(&config.data_dir).unwrap();
        config.node_id = 7;
        // Certificate files without Raft state start over, as node 7.
        let anew = identity(&config, "t").await.unwrap();
        assert!(anew.founded);
        assert_eq!(pki::named_nodes(&anew.tls.cert_pem).unwrap(), [7]);
        assert_ne!(anew.tls.cert_pem, first.tls.cert_pem);
        // With Raft state the data dir wins: a config error naming node_id.
        founding_done(&config.data_dir).unwrap();
        std::fs::write(config.data_dir.join("raft-log.redb"), b"").unwrap();
        config.node_id = 3;
        match identity(&config, "t").await {
            Err(BootstrapError::Config(e)) => {
                assert_eq!(e.field, "node_id");
                assert!(e.message.contains("--node-id 7"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&config.data_dir).unwrap();
    }

    #[tokio::test]
    async fn torn_identity_files_without_raft_state_start_over() {
        let config = config("torn");
        let first = identity(&config, "t").await.unwrap();
        founding_done(&config.data_dir).unwrap();
        std::fs::write(tls_dir(&config.data_dir).join("node.key"), b"").unwrap();
        let again = identity(&config, "t").await.unwrap();
        assert!(again.founded && again.new_ca_key.is_some());
        assert_ne!(again.tls.ca_cert_pem, first.tls.ca_cert_pem);
        assert!(!again.tls.key_pem.is_empty());

        // With Raft state the same damage is an error that names the files.
        std::fs::write(tls_dir(&config.data_dir).join("node.key"), b"").unwrap();
        std::fs::write(config.data_dir.join("raft-log.redb"), b"").unwrap();
        let err = identity(&config, "t").await.unwrap_err().to_string();
        assert!(err.contains("node.key"), "{err}");
        std::fs::remove_dir_all(&config.data_dir).unwrap();
    }

    #[tokio::test]
    async fn a_key_that_is_not_the_certificates_is_a_damaged_file() {
        let config = config("other-key");
        let first = identity(&config, "t").await.unwrap();
        founding_done(&config.data_dir).unwrap();
        // A sound key, of another certificate of the same CA.
        let ca = CaBundle {
            cert_pem: first.tls.ca_cert_pem.clone(),
            key_pem: first.new_ca_key.unwrap(),
        };
        let (_, other_key) = pki::issue_node_cert(&ca, 1).unwrap();
        std::fs::write(tls_dir(&config.data_dir).join("node.key"), other_key).unwrap();
        // Without Raft state (not overwritten, docs/identity.md), then with.
        for raft_state in [false, true] {
            if raft_state {
                std::fs::write(config.data_dir.join("raft-log.redb"), b"").unwrap();
            }
            match check(&config) {
                Err(BootstrapError::Corrupt(e)) => {
                    assert!(
                        e.contains("node.key") && e.contains("not the key of"),
                        "{e}"
                    );
                }
                other => panic!("raft state {raft_state}: {other:?}"),
            }
        }
        std::fs::remove_dir_all(&config.data_dir).unwrap();
    }
}
