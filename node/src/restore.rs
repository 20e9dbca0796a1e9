//! Disaster recovery: a backup of the replicated state
//! (`GET /v1/cluster/backup`, `edgectl cluster backup FILE`), and a new
//! cluster founded from one (`edgelb --restore FILE`) or from a survivor's
//! data dir when the cluster lost its majority for good
//! (`edgelb --force-new-cluster`).
//!
//! ```text
//!  --restore FILE ──────────────┐
//!  --force-new-cluster: the data │ dir's applied state, as a backup
//!                                ▼
//!   <data_dir>/restore.json  (written first: a start that stops half-way
//!                            │ resumes from it)
//!   old Raft files and tls/ moved to <data_dir>/replaced-<unix time>/
//!                            ▼
//!   founding with the backup's cluster CA (not a new one)
//!                            ▼
//!   InitCluster, then every certificate and group proposed ──▶ restore.json removed
//! ```
//!
//! The new cluster has one member, this node; other nodes join it with
//! `--join` as usual (with fresh data dirs). The cluster CA, the token
//! (its hash must match) and every group, instance and certificate are
//! the backup's; Raft's log, terms and membership start anew.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgelb_api::cluster::{BACKUP_FORMAT, Backup};
use raft_store::command::Command;
use raft_store::{LogStore, StateMachineStore};
use tracing::{info, warn};

use crate::cluster::pki::CaBundle;
pub use crate::config::Restore;
use crate::config::{Config, ConfigError};
use crate::files::{IoError, io_error};
use crate::store::{Store, StoreError};

/// Why a restore could not be prepared or applied.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The flags or the backup do not fit this start (exit 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data dir's state does not read (exit 65).
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backup's state was refused.
    #[error("restoring: {0}")]
    Apply(String),
}

/// `<data_dir>/restore.json`: the backup being restored, from before the
/// old files move aside until every group is proposed.
fn marker(data_dir: &Path) -> PathBuf {
    data_dir.join("restore.json")
}

fn config_error(field: &str, message: impl Into<String>) -> RestoreError {
    RestoreError::Config(ConfigError::new(field, message))
}

/// Reads and checks a backup file.
pub fn read_backup(path: &Path) -> Result<Backup, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let backup: Backup = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not an edgelb backup: {e}", path.display()))?;
    if backup.format > BACKUP_FORMAT {
        return Err(format!(
            "{}: backup format {} is newer than this release reads ({BACKUP_FORMAT})",
            path.display(),
            backup.format
        ));
    }
    Ok(backup)
}

/// Before the node's identity is loaded: when this start founds a new
/// cluster from a backup (the flags, or an unfinished restore's marker),
/// moves the data dir's old Raft files and identity aside, sets the CA to
/// found with, and returns the backup to apply once founded.
pub async fn prepare(config: &mut Config) -> Result<Option<Backup>, RestoreError> {
    let data_dir = config.data_dir.clone();
    let marker = marker(&data_dir);
    let resumed = match std::fs::read(&marker) {
        Ok(bytes) => Some(serde_json::from_slice::<Pending>(&bytes).map_err(|e| {
            RestoreError::Corrupt(format!(
                "{} (an unfinished restore) does not read: {e}; start again with --restore \
                 <the backup> on an emptied data dir",
                marker.display()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(marker.display())(e).into()),
    };
    let raft_state = crate::bootstrap::has_raft_state(&data_dir);
    let mut pending = match (resumed, config.restore.clone()) {
        (Some(p), restore) => {
            if let Some(Restore::File(path)) = restore
                && read_backup(&path).map_err(|m| config_error("restore", m))? != p.backup
            {
                return Err(config_error(
                    "restore",
                    format!(
                        "{} holds an unfinished restore of another backup: start without \
                         --restore to finish it, or empty the data dir to restore {}",
                        marker.display(),
                        path.display()
                    ),
                ));
            }
            warn!(marker = %marker.display(), "resuming an unfinished restore");
            p
        }
        (None, None) => return Ok(None),
        (None, Some(Restore::File(path))) => {
            if raft_state {
                return Err(config_error(
                    "restore",
                    format!(
                        "{} holds Raft state: --restore founds a new cluster on an empty data dir \
                         (use --force-new-cluster to found one from this data dir's state)",
                        data_dir.display()
                    ),
                ));
            }
            let backup = read_backup(&path).map_err(|m| config_error("restore", m))?;
            Pending {
                backup,
                moved: true,
            }
        }
        (None, Some(Restore::ForceNewCluster)) => {
            if !raft_state {
                return Err(config_error(
                    "force_new_cluster",
                    format!(
                        "{} holds no Raft state to found a new cluster from",
                        data_dir.display()
                    ),
                ));
            }
            let (voters, backup) = survivor(&data_dir, config.node_id).await?;
            // A flag left on after a recovery must not found yet again.
            if voters == [config.node_id] {
                return Err(config_error(
                    "force_new_cluster",
                    "this node is the only voter of its cluster, a quorum on its own: there is \
                     nothing to force (start it without --force-new-cluster)",
                ));
            }
            let backup = backup.ok_or_else(|| {
                config_error(
                    "force_new_cluster",
                    "this data dir's state has no founded cluster (no CA) to keep",
                )
            })?;
            info!(
                applied_index = backup.applied_index,
                groups = backup.groups.len(),
                certificates = backup.certificates.len(),
                "--force-new-cluster: founding a new cluster from this data dir's applied state"
            );
            Pending {
                backup,
                moved: false,
            }
        }
    };
    if config.join.is_some() {
        return Err(config_error(
            "join",
            "a restore founds a new cluster: it does not go with --join",
        ));
    }
    // A resumed restore was checked when it began; its token is stored.
    if let Some(token) = config.token.as_deref() {
        check(config, token, &pending.backup)?;
    }
    if !pending.moved {
        write_marker(&marker, &pending)?;
        move_aside(&data_dir)?;
        pending.moved = true;
    }
    write_marker(&marker, &pending)?;
    config.founding_ca = backup_ca(&pending.backup);
    Ok(Some(pending.backup))
}

/// What the survivor's data dir holds: the voters of its last membership,
/// and its state as a backup. Committed entries that its state machine had
/// not written yet (it writes behind the log, so a crash may leave it up
/// to a flush behind) are applied from the Raft log first, as a restart
/// would.
async fn survivor(
    data_dir: &Path,
    node_id: u64,
) -> Result<(Vec<u64>, Option<Backup>), RestoreError> {
    use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
    let corrupt = |e: &dyn std::fmt::Display| {
        RestoreError::Corrupt(format!(
            "--force-new-cluster: the Raft storage in {} does not read: {e}",
            data_dir.display()
        ))
    };
    let dir = data_dir.to_owned();
    let (mut log, mut sm) = tokio::task::spawn_blocking(move || {
        Ok::<_, raft_store::StoreError>((LogStore::open(&dir)?, StateMachineStore::open(&dir)?))
    })
    .await
    .map_err(|e| io_error("reading the Raft storage")(e.into()))?
    .map_err(|e| corrupt(&e))?;
    let from = sm.last_applied().map_or(0, |l| l.index + 1);
    let committed = log.read_committed().await.map_err(|e| corrupt(&e))?;
    if let Some(c) = committed.filter(|c| c.index >= from) {
        let entries = log
            .try_get_log_entries(from..=c.index)
            .await
            .map_err(|e| corrupt(&e))?;
        info!(
            from,
            to = c.index,
            entries = entries.len(),
            "--force-new-cluster: applying committed entries the state machine had not written"
        );
        sm.apply(entries).await.map_err(|e| corrupt(&e))?;
    }
    let index = sm.last_applied().map_or(0, |l| l.index);
    let found = (
        sm.voters(),
        crate::store::backup_of(&sm.current(), index, node_id),
    );
    // Written, so that the moved-aside files are whole; closed before
    // they move.
    sm.flush().await.map_err(|e| corrupt(&e))?;
    drop((sm, log));
    Ok(found)
}

/// The backup fits this start: the token is the one it recorded, and a
/// cluster on an operator's PKI (no CA key in the backup) is restored with
/// that PKI's files.
fn check(config: &Config, token: &str, backup: &Backup) -> Result<(), RestoreError> {
    if !crate::bootstrap::token_matches(token, &backup.cluster.token_sha256) {
        return Err(config_error(
            "token",
            "is not the backup's cluster token (its hash differs): start with the cluster's --token",
        ));
    }
    if let Some(ca) = backup_ca(backup) {
        crate::cluster::pki::issue_node_cert_for(&ca, config.node_id, config.node_cert_lifetime)
            .map_err(|e| {
                config_error(
                    "restore",
                    format!("the backup's cluster CA cannot sign a node certificate: {e}"),
                )
            })?;
    } else {
        let Some(ca) = &config.ca_cert else {
            return Err(config_error(
                "ca_cert",
                "the backup's cluster runs its own PKI (no CA key in the backup): start with \
                 --ca-cert, --node-cert and --node-key",
            ));
        };
        let pem = std::fs::read_to_string(ca)
            .map_err(|e| config_error("ca_cert", format!("{}: {e}", ca.display())))?;
        if pem.trim() != backup.cluster.ca_cert_pem.trim() {
            return Err(config_error(
                "ca_cert",
                "is not the backup's cluster CA certificate",
            ));
        }
    }
    Ok(())
}

/// The backup's cluster CA, when it has its key (not an operator's PKI).
fn backup_ca(backup: &Backup) -> Option<CaBundle> {
    let secrets = &backup.cluster;
    (!secrets.ca_key_pem.is_empty()).then(|| CaBundle {
        cert_pem: secrets.ca_cert_pem.clone(),
        key_pem: secrets.ca_key_pem.clone(),
    })
}

/// What `restore.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Pending {
    backup: Backup,
    /// The old files were moved aside (a founding may have begun).
    moved: bool,
}

fn write_marker(path: &Path, pending: &Pending) -> Result<(), RestoreError> {
    let text = serde_json::to_string(pending)
        .map_err(|e| io_error(path.display())(std::io::Error::other(e)))?;
    crate::files::write_private(path, &text).map_err(io_error(path.display()))?;
    Ok(())
}

/// Moves the Raft log, the state machine, snapshots, the identity and a
/// founding marker into `<data_dir>/replaced-<unix time>/` (each one only if
/// it is there: a move that stopped half-way goes on).
fn move_aside(data_dir: &Path) -> Result<(), RestoreError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let aside = data_dir.join(format!("replaced-{secs}"));
    for name in [
        "raft-log.redb",
        "state-machine.redb",
        "snapshots",
        "tls",
        "founding",
    ] {
        let from = data_dir.join(name);
        if !from.exists() {
            continue;
        }
        std::fs::create_dir_all(&aside).map_err(io_error(aside.display()))?;
        std::fs::rename(&from, aside.join(name)).map_err(io_error(from.display()))?;
    }
    if aside.exists() {
        // Both directories' entries durable, as the repairs' moves are:
        // what left the data dir and what arrived in `aside`.
        crate::files::sync_dir(&aside)
            .and_then(|()| crate::files::sync_dir(data_dir))
            .map_err(io_error(aside.display()))?;
        info!(to = %aside.display(), "the old Raft state and identity moved aside");
    }
    Ok(())
}

/// Once the new cluster is founded: proposes every certificate, then every
/// group (a group names its certificates), skipping what is already there
/// (a resumed restore), then removes the marker.
pub async fn apply(store: &Store, data_dir: &Path, backup: &Backup) -> Result<(), RestoreError> {
    let marker = marker(data_dir);
    let resumes = |e: RestoreError| match e {
        RestoreError::Apply(m) => RestoreError::Apply(format!(
            "{m}; the next start resumes from {}: to start over, stop the node, empty the data \
             dir and restore again",
            marker.display()
        )),
        e => e,
    };
    let mut created = 0_usize;
    for certificate in &backup.certificates {
        propose(
            store,
            Command::PutCertificate {
                certificate: certificate.clone(),
            },
        )
        .await
        .map_err(resumes)?;
    }
    for group in &backup.groups {
        if store.state().group_by_uuid(&group.uuid).is_some() {
            continue;
        }
        propose(
            store,
            Command::CreateGroup {
                group: group.clone(),
            },
        )
        .await
        .map_err(resumes)?;
        created += 1;
    }
    crate::files::remove(&marker).map_err(io_error(marker.display()))?;
    info!(
        groups = backup.groups.len(),
        created,
        certificates = backup.certificates.len(),
        from_index = backup.applied_index,
        taken_at = %backup.taken_at,
        "restored: a new one-node cluster holds the backup's state"
    );
    Ok(())
}

/// Proposes `cmd` on the new one-node cluster (it may still be electing
/// itself); a conflict means it is there already.
async fn propose(store: &Store, cmd: Command) -> Result<(), RestoreError> {
    match crate::raft::propose_while_electing(store, cmd).await {
        Err(StoreError::Apply(e)) => Err(RestoreError::Apply(format!("the backup's state: {e}"))),
        r => Ok(r?),
    }
}

#[cfg(test)]
mod tests {
    use raft_store::model::{Certificate, Domain, Handler, Instance, Service, ServiceGroup};
    use uuid::Uuid;

    use super::*;

    fn certificate() -> Certificate {
        Certificate {
            name: "site".into(),
            chain: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            private_key: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into(),
            not_after: None,
        }
    }

    fn group() -> ServiceGroup {
        ServiceGroup {
            uuid: Uuid::new_v4(),
            name: "site".into(),
            domains: vec![Domain {
                fqdn: "site.example.com".into(),
                certificate: Some("site".into()),
            }],
            services: vec![Service {
                port: 443,
                destination_port: 8080,
                handlers: vec![Handler::Tls, Handler::Http],
            }],
            hard_limit: 9,
            instances: vec![Instance {
                uuid: Uuid::new_v4(),
                name: "i1".into(),
                address: "10.0.0.1".into(),
            }],
            created_at: "2026-01-01T00:00:00Z".into(),
            persistent: false,
            health_check: None,
            send_proxy_protocol: None,
        }
    }

    /// A group that names a stored certificate comes back with it on a new
    /// store (certificates go first), and applying again (a resumed
    /// restore) changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_applies_its_certificates_then_its_groups() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, _a) = crate::raft::one_node_store(a_dir.path()).await.unwrap();
        a.propose(Command::PutCertificate {
            certificate: certificate(),
        })
        .await
        .unwrap();
        let group = group();
        a.propose(Command::CreateGroup {
            group: group.clone(),
        })
        .await
        .unwrap();
        let applied = a.subscribe().borrow().clone();
        let backup =
            crate::store::backup_of(&applied.state, applied.index, 1).expect("a founded cluster");
        assert_eq!(backup.applied_index, applied.index);
        assert_eq!((backup.groups.len(), backup.certificates.len()), (1, 1));
        let round: Backup = serde_json::from_str(&serde_json::to_string(&backup).unwrap()).unwrap();
        assert!(round == backup, "a backup reads back as written");

        let (b, _b) = crate::raft::one_node_store(b_dir.path()).await.unwrap();
        for _ in 0..2 {
            std::fs::write(marker(b_dir.path()), "{}").unwrap();
            apply(&b, b_dir.path(), &backup).await.unwrap();
            assert!(!marker(b_dir.path()).exists(), "the marker is removed");
            let state = b.state();
            assert_eq!(state.group_count(), 1);
            assert_eq!(
                state.group_by_uuid(&group.uuid).map(|g| (**g).clone()),
                Some(group.clone())
            );
            assert_eq!(state.certificate("site"), Some(&certificate()));
        }
    }

    #[test]
    fn a_newer_backup_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        std::fs::write(&path, "not json").unwrap();
        assert!(
            read_backup(&path)
                .unwrap_err()
                .contains("not an edgelb backup")
        );
        let newer = serde_json::json!({
            "format": BACKUP_FORMAT + 1, "taken_at": "", "node_id": 1, "applied_index": 1,
            "cluster": {"ca_cert_pem": "x", "ca_key_pem": "y", "token_sha256": "z"},
            "groups": [], "certificates": [],
        });
        std::fs::write(&path, newer.to_string()).unwrap();
        assert!(
            read_backup(&path)
                .unwrap_err()
                .contains("newer than this release reads")
        );
    }

    const TOKEN: &str = "restore-test-token-0123456789";

    /// A backup of an empty cluster with a real CA and `TOKEN`.
    fn empty_backup() -> Backup {
        let ca = crate::cluster::pki::generate_ca("test").unwrap();
        Backup {
            format: BACKUP_FORMAT,
            taken_at: "2026-12-05T00:00:00Z".into(),
            node_id: 1,
            applied_index: 3,
            cluster: raft_store::model::ClusterSecrets {
                ca_cert_pem: ca.cert_pem,
                ca_key_pem: ca.key_pem,
                token_sha256: crate::bootstrap::token_sha256(TOKEN),
            },
            groups: vec![group()],
            certificates: vec![],
        }
    }

    fn config(dir: &Path, restore: Option<Restore>) -> Config {
        let mut c = Config::embedded_default();
        c.data_dir = dir.to_owned();
        c.token = Some(TOKEN.into());
        c.restore = restore;
        c
    }

    fn write_backup(dir: &Path, name: &str, b: &Backup) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec(b).unwrap()).unwrap();
        path
    }

    fn refused(r: Result<Option<Backup>, RestoreError>) -> (String, String) {
        match r {
            Err(RestoreError::Config(e)) => (e.field, e.message),
            other => panic!("not a config error: {other:?}"),
        }
    }

    /// What `prepare` refuses before it writes anything, and what it does
    /// with a good backup: the marker, the CA to found with.
    #[tokio::test]
    async fn prepare_checks_the_backup_before_it_writes() {
        let files = tempfile::tempdir().unwrap();
        let good = empty_backup();
        let good_path = write_backup(files.path(), "good.json", &good);

        // Another cluster's token.
        let data = tempfile::tempdir().unwrap();
        let mut c = config(data.path(), Some(Restore::File(good_path.clone())));
        c.token = Some("another-token-0123456789".into());
        assert_eq!(refused(prepare(&mut c).await).0, "token");
        // A CA key that does not sign.
        let mut bad_ca = good.clone();
        bad_ca.cluster.ca_key_pem =
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into();
        let bad_path = write_backup(files.path(), "bad-ca.json", &bad_ca);
        let mut c = config(data.path(), Some(Restore::File(bad_path)));
        let (field, message) = refused(prepare(&mut c).await);
        assert_eq!(field, "restore");
        assert!(message.contains("cannot sign"), "{message}");
        // Raft state in the data dir.
        let used = tempfile::tempdir().unwrap();
        std::fs::write(used.path().join("raft-log.redb"), b"").unwrap();
        let mut c = config(used.path(), Some(Restore::File(good_path.clone())));
        assert!(
            refused(prepare(&mut c).await)
                .1
                .contains("holds Raft state")
        );
        // Nothing written by any of them.
        assert!(!marker(data.path()).exists());

        // A good one: the marker holds it, the CA is the backup's.
        let mut c = config(data.path(), Some(Restore::File(good_path)));
        let got = prepare(&mut c).await.unwrap().expect("a backup to apply");
        assert!(got == good);
        assert!(marker(data.path()).exists());
        assert_eq!(
            c.founding_ca.as_ref().map(|ca| ca.cert_pem.clone()),
            Some(good.cluster.ca_cert_pem.clone())
        );
        // Another backup over the unfinished restore: refused, naming the
        // marker; no flag: resumed.
        let mut other = good.clone();
        other.groups.clear();
        let other_path = write_backup(files.path(), "other.json", &other);
        let mut c = config(data.path(), Some(Restore::File(other_path)));
        let (field, message) = refused(prepare(&mut c).await);
        assert_eq!(field, "restore");
        assert!(message.contains("restore.json"), "{message}");
        let mut c = config(data.path(), None);
        assert!(prepare(&mut c).await.unwrap().is_some_and(|b| b == good));
    }
}
