//! Starting this node's Raft member: storage, the QUIC endpoint and openraft.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use raft_store::command::Command;
use raft_store::model::ClusterSecrets;
use raft_store::state::ApplyError;
use raft_store::types::{ClusterNode, Raft};
use raft_store::{AppliedState, LogStore, StateMachineStore};
use tokio::sync::watch;
use tracing::info;

use crate::bootstrap::Identity;
use crate::cluster::{
    MAX_PAYLOAD_ENTRIES, Network, SNAPSHOT_CHUNK, SNAPSHOT_CHUNK_TIMEOUT_MS, Transport,
    TransportError,
};
use crate::config::Config;
use crate::election::Timing;
use crate::files::{IoError, io_error};
use crate::health::Health;
use crate::membership::Policy;
use crate::store::{RaftRpc, Store, StoreError};

/// openraft's own snapshot policy, a backstop: [`snapshots`] asks for one
/// sooner, every [`raft_store::snapshot_interval`] entries (500 for a small
/// state, a tenth of its groups + instances for a large one) plus a random
/// extra of up to half that, so that a snapshot's O(state) cost stays
/// constant per write.
pub const SNAPSHOT_EVERY: u64 = 100_000;

/// Why this node's Raft member did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file of the data dir is damaged: the message names it and says
    /// what to do. Exit 65 ([`crate::health::EXIT_CORRUPT`]).
    #[error("{0}")]
    Corrupt(String),
    /// The storage did not open, for a reason other than a damaged file.
    #[error("opening storage in {}: {source}", dir.display())]
    Storage {
        dir: PathBuf,
        #[source]
        source: raft_store::StoreError,
    },
    /// The cluster endpoint did not bind (or its certificates are unusable).
    #[error("cluster_addr {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: TransportError,
    },
    /// openraft refused its settings, to start, or to initialise.
    #[error("{what}: {source}")]
    Raft {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The founding entry (cluster CA, token hash) was not committed in time.
    #[error("node {node_id}: recording the cluster CA: {source}")]
    Founding {
        node_id: u64,
        #[source]
        source: StoreError,
    },
    /// Local I/O (the data dir, a task that opened storage).
    #[error(transparent)]
    Io(#[from] IoError),
    /// The node's identity (one_node_store).
    #[error(transparent)]
    Identity(#[from] crate::bootstrap::BootstrapError),
}

impl StartError {
    fn raft(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Raft {
            what,
            source: Box::new(e),
        }
    }
}

/// What [`start`] hands back.
#[derive(Debug)]
pub struct Started {
    pub store: Store,
    pub transport: Arc<Transport>,
    pub cluster_addr: SocketAddr,
    /// The log store, for the election task's pre-votes.
    pub log: LogStore,
    /// The storage files, to seal at exit.
    pub seals: Vec<raft_store::Seal>,
}

/// openraft settings: the RPC limit and leader lease of `timing` (its own
/// heartbeat and election timers are off: [`crate::election`] drives
/// them), snapshots as [`snapshots`] asks for them (and at least every
/// [`SNAPSHOT_EVERY`] entries), keeping 100 entries behind a snapshot for
/// followers that lag a little.
pub fn raft_config(timing: &Timing) -> Result<openraft::Config, StartError> {
    openraft::Config {
        cluster_name: "edgelb".into(),
        install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT_MS,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
        max_in_snapshot_log_to_keep: 100,
        purge_batch_size: 64,
        // At most this many entries an append; its bytes are cut to what
        // the link carries within the RPC limit
        // (`cluster::network::append_budget`), and the log store reads at
        // most 1 MiB of them (`raft_store::log_store::REPLICATION_READ_BYTES`).
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..timing.openraft()
    }
    .validate()
    .map_err(|e| StartError::raft("raft config", e))
}

/// How long an upgrade's new process waits for the old one to close the
/// storage files.
const HELD_WAIT: Duration = Duration::from_secs(10);

/// Opens storage, binds the cluster endpoint and starts openraft.
pub async fn start(
    config: &Config,
    identity: &Identity,
    health: &Arc<Health>,
    registry: &prometheus::Registry,
) -> Result<Started, StartError> {
    let began = std::time::Instant::now();
    let dir = config.data_dir.clone();
    let faults = config.storage_faults.clone();
    let rebuild = config.rebuild_state_machine;
    // Each file's open is timed: after a crash redb repairs the file
    // (walks it and writes it back), which on a busy disk took seconds.
    let open = move || -> Result<_, raft_store::StoreError> {
        let faults = faults.as_ref();
        let t = std::time::Instant::now();
        let log = LogStore::open_with(&dir, faults)?;
        let log_took = t.elapsed();
        let sm = if rebuild {
            let (sm, rebuilt) =
                StateMachineStore::open_rebuilding(&dir, faults, log.last_purged()?)?;
            match rebuilt {
                Some(r) => tracing::warn!(
                    corrupt = %r.corrupt.display(),
                    moved_aside = ?r.moved_aside,
                    from = ?r.from,
                    "--rebuild-state-machine: rebuilt; openraft re-applies the log after it"
                ),
                None => info!(
                    "--rebuild-state-machine: the state machine and its snapshot are intact; nothing to do"
                ),
            }
            sm
        } else {
            let path = dir.join("state-machine.redb");
            if !path.exists() && log.last_purged()?.is_some() {
                // Created empty, it would sit below a purged log.
                return Err(raft_store::StoreError::Corrupt {
                    path,
                    problem: "the file is missing, and the Raft log was purged behind a snapshot"
                        .into(),
                });
            }
            StateMachineStore::open_with(&dir, faults)?
        };
        Ok((log, sm, log_took, t.elapsed() - log_took))
    };
    // In an upgrade the process being replaced closes the files as it
    // stops its control plane; until the last handle drops they are
    // still locked.
    let held_until = began
        + if config.upgrade {
            HELD_WAIT
        } else {
            Duration::ZERO
        };
    let opened = loop {
        let open = open.clone();
        let opened = tokio::task::spawn_blocking(open)
            .await
            .map_err(|e| io_error("opening storage")(e.into()))?;
        match opened {
            Err(e) if e.is_held_elsewhere() && std::time::Instant::now() < held_until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => break r.map_err(|e| storage_error(config, e))?,
        }
    };
    let (log, sm, log_took, state_took) = opened;
    info!(
        log_ms = ms(log_took),
        state_ms = ms(state_took),
        total_ms = ms(began.elapsed()),
        "storage opened"
    );
    let state = sm.subscribe();
    let seals = vec![log.seal(), sm.seal()];
    // The state machine writes its rows behind the batches: a failed write
    // stops the node even while no batch comes to fail.
    tokio::spawn(crate::health::watch_state_machine(
        sm.write_failures(),
        Arc::clone(health),
    ));
    let committed = log.committed_index();

    let policy = Policy {
        max_voters: config.max_voters,
        alive_within: config.raft.election_timeout,
    };
    let handler = Arc::new(RaftRpc::new(config.raft, policy, Arc::clone(health)));
    handler.campaign().count_in(registry);
    let transport = Transport::bind(
        config.cluster_addr,
        &identity.tls,
        config.node_id,
        handler.clone(),
    )
    .map_err(|source| StartError::Endpoint {
        addr: config.cluster_addr,
        source,
    })?;
    transport.set_longest_call(config.raft.vote_limit());
    let transport = Arc::new(transport);
    let cluster_addr = transport.local_addr().map_err(io_error("cluster_addr"))?;
    info!(%cluster_addr, since_storage_ms = ms(began.elapsed()), "cluster endpoint bound");
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config(&config.raft)?),
        Network::new(transport.clone(), handler.campaign()),
        log.clone(),
        sm,
    )
    .await
    .map_err(|e| StartError::raft("starting raft", e))?;
    info!(since_storage_ms = ms(began.elapsed()), "raft started");
    let (batcher, reconciler) = handler.set(raft.clone(), log.clone(), &transport);
    tokio::spawn(snapshots(raft.clone(), state.clone()));
    // Heartbeats and elections; the task ends when Raft stops.
    tokio::spawn(crate::election::run(
        raft.clone(),
        log.clone(),
        transport.clone(),
        handler.campaign(),
        (config.raft, config.max_voters),
    ));

    if identity.founded {
        let me = ClusterNode {
            region: config.region.clone(),
            cluster_addr: config.advertised_cluster_addr(cluster_addr).to_string(),
            admin_addr: config.admin_addr.to_string(),
        };
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::raft("raft", e))?;
        if !initialized {
            raft.initialize(BTreeMap::from([(config.node_id, me)]))
                .await
                .map_err(|e| StartError::raft("initialising the cluster", e))?;
            info!(
                node_id = config.node_id,
                "initialised a new one-node cluster"
            );
        }
    }
    Ok(Started {
        store: Store::new(
            config.node_id,
            raft,
            transport.clone(),
            state,
            committed,
            (batcher, reconciler),
            Arc::clone(health),
        ),
        transport,
        cluster_addr,
        log,
        seals,
    })
}

/// The start-up error for a storage that did not open: for a damaged file,
/// which one, what is wrong, and the way out (README: Corrupted files).
fn storage_error(config: &Config, e: raft_store::StoreError) -> StartError {
    use raft_store::StoreError as E;
    let rebuild = "start this node once with --rebuild-state-machine";
    match e {
        E::Corrupt { path, problem } if path.ends_with("raft-log.redb") => {
            StartError::Corrupt(format!(
                "{} is corrupt: {problem}. The Raft log cannot be repaired in place: a voter \
                 that forgot entries it acknowledged could elect a leader without committed \
                 writes. Rejoin this node: {} (README: Corrupted files)",
                path.display(),
                crate::bootstrap::rejoin_steps(config)
            ))
        }
        E::Corrupt { path, problem } if path.ends_with("state-machine.redb") => {
            StartError::Corrupt(format!(
                "{} is corrupt: {problem}. The state machine is rebuilt from the newest \
                 snapshot and the Raft log, without losing a write: {rebuild} (the file is \
                 moved aside) (README: Corrupted files)",
                path.display()
            ))
        }
        E::Corrupt { path, problem } => StartError::Corrupt(format!(
            "{} (the current snapshot) is corrupt: {problem}. The state machine is intact: \
             {rebuild}; the file is moved aside and a new snapshot is built from the state \
             machine (README: Corrupted files)",
            path.display()
        )),
        e @ E::CannotRebuild { .. } => StartError::Corrupt(format!(
            "{e}. Rejoin this node: {} (README: Corrupted files)",
            crate::bootstrap::rejoin_steps(config)
        )),
        source => StartError::Storage {
            dir: config.data_dir.clone(),
            source,
        },
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Asks openraft for a snapshot once [`raft_store::snapshot_interval`]
/// entries, plus a random extra of up to half that, were applied since
/// the last one (built or asked for); ends when the state machine or Raft
/// stops.
///
/// The extra is drawn anew for each snapshot, so the members of a cluster
/// do not snapshot at the same index: building one writes the whole state
/// to disk and is followed by a purge of the log behind it, and members
/// busy with that at the same moment held up every write (a write needs
/// a quorum, which the other members still make).
async fn snapshots(raft: Raft, mut state: watch::Receiver<AppliedState>) {
    let mut asked_at = 0;
    // Per mille of the interval.
    let mut extra: u64 = rand::random_range(0..500);
    while state.changed().await.is_ok() {
        let (index, every) = {
            let applied = state.borrow_and_update();
            (applied.index, raft_store::snapshot_interval(&applied.state))
        };
        let due = every.saturating_add(every.saturating_mul(extra) / 1000);
        let built = raft.metrics().borrow().snapshot.map_or(0, |l| l.index);
        if index.saturating_sub(built.max(asked_at)) < due {
            continue;
        }
        asked_at = index;
        extra = rand::random_range(0..500);
        tracing::debug!(index, every, "asking for a snapshot");
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}

/// Records the cluster CA and the admin token's hash in the replicated state
/// (once; a restart finds them there).
pub async fn found_cluster(
    store: &Store,
    config: &Config,
    identity: &Identity,
    token: &str,
) -> Result<(), StartError> {
    if store.state().cluster().is_some() {
        return Ok(());
    }
    let secrets = ClusterSecrets {
        ca_cert_pem: identity.tls.ca_cert_pem.clone(),
        ca_key_pem: identity.new_ca_key.clone().unwrap_or_default(),
        token_sha256: crate::bootstrap::token_sha256(token),
    };
    propose_while_electing(store, Command::InitCluster { secrets })
        .await
        .map_err(|source| StartError::Founding {
            node_id: config.node_id,
            source,
        })
}

/// Proposes `cmd` on a new one-node cluster, which elects itself within
/// the election timeout: retried until then (20 s at most). A conflict
/// means it is there already; any other refusal of the command is an
/// error at once.
pub(crate) async fn propose_while_electing(store: &Store, cmd: Command) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.propose(cmd.clone()).await {
            Ok(_) | Err(StoreError::Apply(ApplyError::Conflict(_))) => return Ok(()),
            Err(e @ StoreError::Apply(_)) => return Err(e),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A founded one-node cluster's store in `data_dir`, without the data plane
/// or admin API: the same path as a real node, for tests and tools.
pub async fn one_node_store(
    data_dir: &std::path::Path,
) -> Result<(Store, Arc<Transport>), StartError> {
    let mut config = Config::embedded_default();
    config.data_dir = data_dir.to_owned();
    config.cluster_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    std::fs::create_dir_all(data_dir).map_err(io_error(data_dir.display()))?;
    let token = "one-node-store-token";
    let identity = crate::bootstrap::identity(&config, token).await?;
    let registry = prometheus::Registry::new();
    let health = Health::new(data_dir, config.data_dir_min_free, &registry);
    let started = start(&config, &identity, &health, &registry).await?;
    found_cluster(&started.store, &config, &identity, token).await?;
    Ok((started.store, started.transport))
}
