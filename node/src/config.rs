//! Node configuration: a TOML file, then `EDGELB_*` variables, then flags, in
//! rising precedence. Everything is checked before any port is bound; an
//! error names the field and the process exits with 64 (EX_USAGE).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::admin::AuthBackoff;
use crate::dataplane::{IpNet, Settings};
use crate::health::MinFree;

/// Exit code for a bad configuration or bad flags (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Command-line flags; each also reads `EDGELB_<NAME>`.
#[derive(Debug, Default, Parser)]
#[command(name = "edgelb", version, about = "Clustered edge load balancer node")]
pub struct Args {
    /// TOML file with the same keys as the flags (snake_case).
    #[arg(long, env = "EDGELB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id (u64) [default: 1]
    #[arg(long, env = "EDGELB_NODE_ID")]
    pub node_id: Option<u64>,
    /// Region name [default: local]
    #[arg(long, env = "EDGELB_REGION")]
    pub region: Option<String>,
    /// Data directory [default: ./edgelb-data]
    #[arg(long, env = "EDGELB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Free space the data dir's file system keeps: below it writes are
    /// refused (507), e.g. 5% or 512MiB; 0 turns it off [default: 5%, at
    /// most 1GiB]
    #[arg(long, env = "EDGELB_DATA_DIR_MIN_FREE")]
    pub data_dir_min_free: Option<String>,
    /// Admin API address [default: 127.0.0.1:7070]
    #[arg(long, env = "EDGELB_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// Cluster (QUIC, UDP) address [default: 127.0.0.1:7071]
    #[arg(long, env = "EDGELB_CLUSTER_ADDR")]
    pub cluster_addr: Option<String>,
    /// The cluster address peers dial, when it differs from the bound one
    /// (NAT, relays) [default: --cluster-addr]
    #[arg(long, env = "EDGELB_ADVERTISE_CLUSTER_ADDR")]
    pub advertise_cluster_addr: Option<String>,
    /// IP the published ports are bound to [default: 127.0.0.1]
    #[arg(long, env = "EDGELB_LISTEN_IP")]
    pub listen_ip: Option<String>,
    /// Admin URL of a cluster member to join instead of bootstrapping.
    #[arg(long, env = "EDGELB_JOIN")]
    pub join: Option<String>,
    /// The cluster's admin token (generated at bootstrap when absent).
    #[arg(long, env = "EDGELB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token that `GET /metrics` requires (the admin token is
    /// accepted too) [default: none, /metrics is open]
    #[arg(long, env = "EDGELB_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Domain of default service fqdns [default: edgelb.local]
    #[arg(long, env = "EDGELB_CLUSTER_DOMAIN")]
    pub cluster_domain: Option<String>,
    /// Drain timeout for detached instances, e.g. 30s [default: 30s]
    #[arg(long, env = "EDGELB_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Log filter (tracing EnvFilter syntax) [default: info,openraft=warn]
    #[arg(long, env = "EDGELB_LOG")]
    pub log: Option<String>,
    /// Cluster CA certificate (PEM) when running your own PKI.
    #[arg(long, env = "EDGELB_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// This node's certificate (PEM, SAN `node-<id>.cluster.edgelb`) when running your own PKI.
    #[arg(long, env = "EDGELB_NODE_CERT")]
    pub node_cert: Option<PathBuf>,
    /// This node's private key (PEM) when running your own PKI.
    #[arg(long, env = "EDGELB_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// Serve the admin API over TLS; without --admin-tls-cert, with the
    /// node's cluster certificate (clients verify it with the cluster CA)
    #[arg(long, env = "EDGELB_ADMIN_TLS")]
    pub admin_tls: bool,
    /// Certificate chain (PEM) the admin API presents over TLS (turns
    /// --admin-tls on)
    #[arg(long, env = "EDGELB_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --admin-tls-cert
    #[arg(long, env = "EDGELB_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that verifies an https:// --join URL: the
    /// cluster CA (a member's <data dir>/tls/ca.pem) or the CA of the
    /// members' admin certificates [default: --ca-cert]
    #[arg(long, env = "EDGELB_JOIN_CA_CERT")]
    pub join_ca_cert: Option<PathBuf>,
    /// Voters the cluster keeps; further nodes stay learners [default: 5]
    #[arg(long, env = "EDGELB_MAX_VOTERS")]
    pub max_voters: Option<usize>,
    /// Leave the Raft membership on SIGTERM.
    #[arg(long, env = "EDGELB_LEAVE_ON_EXIT")]
    pub leave_on_exit: bool,
    /// At this start, rebuild a corrupt state machine (state-machine.redb)
    /// from the newest readable snapshot and the Raft log, or drop a
    /// corrupt snapshot file (a new one is built from the state machine);
    /// the corrupt files are moved aside. Does nothing to intact files.
    #[arg(long)]
    pub rebuild_state_machine: bool,
}

/// The TOML file: the same keys as the flags, plus data-plane tuning.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    region: Option<String>,
    data_dir: Option<PathBuf>,
    data_dir_min_free: Option<String>,
    admin_addr: Option<String>,
    cluster_addr: Option<String>,
    advertise_cluster_addr: Option<String>,
    listen_ip: Option<String>,
    join: Option<String>,
    token: Option<String>,
    metrics_token: Option<String>,
    cluster_domain: Option<String>,
    drain_timeout: Option<String>,
    log: Option<String>,
    header_timeout: Option<String>,
    connect_timeout: Option<String>,
    upstream_timeout: Option<String>,
    idle_timeout: Option<String>,
    tcp_idle_timeout: Option<String>,
    send_timeout: Option<String>,
    tunnel_idle_timeout: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    max_connections: Option<usize>,
    admin_max_connections: Option<usize>,
    join_ca_cert: Option<PathBuf>,
    admin_tls: Option<bool>,
    admin_tls_cert: Option<PathBuf>,
    admin_tls_key: Option<PathBuf>,
    admin_auth_failures: Option<u32>,
    admin_auth_window: Option<String>,
    admin_auth_block: Option<String>,
    admin_auth_block_max: Option<String>,
    ca_cert: Option<PathBuf>,
    node_cert: Option<PathBuf>,
    node_key: Option<PathBuf>,
    max_voters: Option<usize>,
    leave_on_exit: Option<bool>,
    gossip_min_interval: Option<String>,
    gossip_interval: Option<String>,
    gossip_ttl: Option<String>,
    gossip_estimator: Option<String>,
    raft_heartbeat_interval: Option<String>,
    election_timeout: Option<String>,
    node_cert_lifetime: Option<String>,
}

/// The certificate of the admin API over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminTls {
    /// The node's cluster certificate (`admin_tls = true` alone).
    Node,
    /// An operator's certificate (`admin_tls_cert`, `admin_tls_key`).
    Files { cert: PathBuf, key: PathBuf },
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: u64,
    pub region: String,
    pub data_dir: PathBuf,
    /// `data_dir_min_free`: the free-space floor below which writes are
    /// refused ([`crate::health`]).
    pub data_dir_min_free: MinFree,
    /// Opens the Raft storage through this fault-injecting backend (tests
    /// only; never set from a file, a variable or a flag).
    pub storage_faults: Option<Arc<raft_store::faults::Faults>>,
    /// `--rebuild-state-machine`: rebuild a corrupt state machine or drop
    /// a corrupt snapshot at this start (a flag only: a one-off repair).
    pub rebuild_state_machine: bool,
    pub admin_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    /// What goes into the membership as this node's `cluster_addr` (the
    /// bound address when `None`); see [`Config::advertised_cluster_addr`].
    pub advertise_cluster_addr: Option<SocketAddr>,
    pub listen_ip: IpAddr,
    pub join: Option<String>,
    /// Verifies an `https://` `join` URL (`join_ca_cert`, else `ca_cert`).
    pub join_tls: Option<Arc<rustls::ClientConfig>>,
    pub token: Option<String>,
    /// When set, `GET /metrics` needs it (or the admin token) as a bearer
    /// token.
    pub metrics_token: Option<String>,
    pub cluster_domain: String,
    pub log: String,
    pub settings: Settings,
    /// `max_connections` was configured: it must fit the open files limit
    /// as it is (the default is lowered to fit; see [`crate::limits`]).
    pub max_connections_explicit: bool,
    /// The back-off on wrong admin tokens per client address
    /// (`admin_auth_failures`, `admin_auth_window`, `admin_auth_block`,
    /// `admin_auth_block_max`).
    pub admin_auth: AuthBackoff,
    /// The admin API over TLS, and with which certificate; plain HTTP when
    /// `None`.
    pub admin_tls: Option<AdminTls>,
    pub ca_cert: Option<PathBuf>,
    pub node_cert: Option<PathBuf>,
    pub node_key: Option<PathBuf>,
    pub max_voters: usize,
    pub leave_on_exit: bool,
    /// Load gossip: `gossip_min_interval`, `gossip_interval`, `gossip_ttl`,
    /// `gossip_estimator` (the rest at its defaults).
    pub gossip: gossip::Config,
    /// `gossip_estimator = "local"`: peers' reports are received but not
    /// used; selection compares this node's own counts only. For
    /// comparisons (the node still reports its own load).
    pub gossip_local: bool,
    /// Raft timing: `raft_heartbeat_interval`, `election_timeout`.
    pub raft: crate::election::Timing,
    /// `node_cert_lifetime`: how long the node certificates this node signs
    /// with the built-in cluster CA are valid (its own when it renews, a
    /// joining node's); renewed with a third left.
    pub node_cert_lifetime: Duration,
}

impl Config {
    /// The embedded default: a one-node cluster on loopback.
    pub fn embedded_default() -> Self {
        Self {
            node_id: 1,
            region: "local".into(),
            data_dir: PathBuf::from("./edgelb-data"),
            data_dir_min_free: MinFree::Default,
            storage_faults: None,
            rebuild_state_machine: false,
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 7070)),
            cluster_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 7071)),
            advertise_cluster_addr: None,
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            join: None,
            join_tls: None,
            token: None,
            metrics_token: None,
            cluster_domain: "edgelb.local".into(),
            // `openraft::replication` is off unless named (see main.rs).
            log: "info,openraft=warn".into(),
            settings: Settings::default(),
            max_connections_explicit: false,
            admin_auth: AuthBackoff::default(),
            admin_tls: None,
            ca_cert: None,
            node_cert: None,
            node_key: None,
            max_voters: 5,
            leave_on_exit: false,
            gossip: gossip::Config::default(),
            gossip_local: false,
            raft: crate::election::Timing::default(),
            node_cert_lifetime: crate::cluster::pki::DEFAULT_NODE_LIFETIME,
        }
    }

    /// The cluster address peers dial: `advertise_cluster_addr`, else the
    /// address the cluster endpoint is bound to (`bound`, which resolves a
    /// port 0 in `cluster_addr`).
    pub fn advertised_cluster_addr(&self, bound: SocketAddr) -> SocketAddr {
        self.advertise_cluster_addr.unwrap_or(bound)
    }

    /// Merges the file named by `args.config` (if any) under `args`.
    pub fn load(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// The configuration of a TOML file's `text` alone (no flags), as
    /// [`load`](Self::load) reads a file named `path`.
    pub(crate) fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::merge(Args::default(), parse_file(text, path)?)
    }

    fn merge(args: Args, file: FileConfig) -> Result<Self, ConfigError> {
        let mut c = Self::embedded_default();
        if let Some(v) = args.node_id.or(file.node_id) {
            c.node_id = v;
        }
        if let Some(v) = args.region.or(file.region) {
            if v.is_empty() || v.len() > 63 {
                return Err(ConfigError::new("region", "must be 1 to 63 characters"));
            }
            c.region = v;
        }
        if let Some(v) = args.data_dir.or(file.data_dir) {
            c.data_dir = v;
        }
        if let Some(v) = args.data_dir_min_free.or(file.data_dir_min_free) {
            c.data_dir_min_free = v
                .parse()
                .map_err(|e: String| ConfigError::new("data_dir_min_free", e))?;
        }
        if let Some(v) = args.admin_addr.or(file.admin_addr) {
            c.admin_addr = parse_addr("admin_addr", &v)?;
        }
        if let Some(v) = args.cluster_addr.or(file.cluster_addr) {
            c.cluster_addr = parse_addr("cluster_addr", &v)?;
        }
        if let Some(v) = args.advertise_cluster_addr.or(file.advertise_cluster_addr) {
            let a = parse_addr("advertise_cluster_addr", &v)?;
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(ConfigError::new(
                    "advertise_cluster_addr",
                    format!("{v:?} cannot be dialled (port 0 or an unspecified IP)"),
                ));
            }
            c.advertise_cluster_addr = Some(a);
        }
        if let Some(v) = args.listen_ip.or(file.listen_ip) {
            c.listen_ip = v.parse().map_err(|_| {
                ConfigError::new("listen_ip", format!("{v:?} is not an IP address"))
            })?;
        }
        if let Some(v) = args.join.or(file.join) {
            if !v.starts_with("http://") && !v.starts_with("https://") {
                return Err(ConfigError::new(
                    "join",
                    format!("{v:?} is not an http:// or https:// admin URL"),
                ));
            }
            c.join = Some(v);
        }
        if let Some(v) = args.token.or(file.token) {
            check_token("token", &v)?;
            c.token = Some(v);
        }
        if let Some(v) = args.metrics_token.or(file.metrics_token) {
            check_token("metrics_token", &v)?;
            c.metrics_token = Some(v);
        }
        if let Some(v) = args.cluster_domain.or(file.cluster_domain) {
            if !raft_store::validate::valid_fqdn(&v) || v.starts_with("*.") {
                return Err(ConfigError::new(
                    "cluster_domain",
                    format!("{v:?} is not a domain name"),
                ));
            }
            c.cluster_domain = v;
        }
        if let Some(v) = args.log.or(file.log) {
            c.log = v;
        }
        let s = &mut c.settings;
        set_duration(
            &mut s.drain_timeout,
            "drain_timeout",
            args.drain_timeout.or(file.drain_timeout),
        )?;
        set_duration(&mut s.header_timeout, "header_timeout", file.header_timeout)?;
        set_duration(
            &mut s.connect_timeout,
            "connect_timeout",
            file.connect_timeout,
        )?;
        set_duration(
            &mut s.upstream_timeout,
            "upstream_timeout",
            file.upstream_timeout,
        )?;
        set_duration(&mut s.idle_timeout, "idle_timeout", file.idle_timeout)?;
        set_duration(
            &mut s.tcp_idle_timeout,
            "tcp_idle_timeout",
            file.tcp_idle_timeout,
        )?;
        set_duration(&mut s.send_timeout, "send_timeout", file.send_timeout)?;
        set_duration(
            &mut s.tunnel_idle_timeout,
            "tunnel_idle_timeout",
            file.tunnel_idle_timeout,
        )?;
        if let Some(list) = file.trusted_proxies {
            s.trusted_proxies = list
                .iter()
                .map(|v| parse_net(v))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = file.max_connections {
            if v == 0 {
                return Err(ConfigError::new("max_connections", "must be at least 1"));
            }
            s.max_connections = v;
            c.max_connections_explicit = true;
        }
        if let Some(v) = file.admin_max_connections {
            if v == 0 {
                return Err(ConfigError::new(
                    "admin_max_connections",
                    "must be at least 1",
                ));
            }
            s.admin_max_connections = v;
        }
        let a = &mut c.admin_auth;
        if let Some(v) = file.admin_auth_failures {
            a.failures = v;
        }
        set_duration(&mut a.window, "admin_auth_window", file.admin_auth_window)?;
        set_duration(&mut a.block, "admin_auth_block", file.admin_auth_block)?;
        set_duration(
            &mut a.block_max,
            "admin_auth_block_max",
            file.admin_auth_block_max,
        )?;
        if a.block > a.block_max {
            return Err(ConfigError::new(
                "admin_auth_block",
                "must not exceed admin_auth_block_max",
            ));
        }
        c.admin_tls = admin_tls(
            args.admin_tls || file.admin_tls.unwrap_or(false),
            file.admin_tls == Some(false) && !args.admin_tls,
            args.admin_tls_cert.or(file.admin_tls_cert),
            args.admin_tls_key.or(file.admin_tls_key),
        )?;
        c.ca_cert = args.ca_cert.or(file.ca_cert);
        c.node_cert = args.node_cert.or(file.node_cert);
        c.node_key = args.node_key.or(file.node_key);
        let pki_given = [
            c.ca_cert.is_some(),
            c.node_cert.is_some(),
            c.node_key.is_some(),
        ];
        if pki_given.iter().any(|g| *g) && !pki_given.iter().all(|g| *g) {
            return Err(ConfigError::new(
                "ca_cert",
                "--ca-cert, --node-cert and --node-key go together",
            ));
        }
        let join_ca = args
            .join_ca_cert
            .or(file.join_ca_cert)
            .map(|p| ("join_ca_cert", p))
            .or_else(|| c.ca_cert.clone().map(|p| ("ca_cert", p)));
        if c.join.as_deref().is_some_and(|j| j.starts_with("https://")) {
            let Some((field, path)) = join_ca else {
                return Err(ConfigError::new(
                    "join_ca_cert",
                    "an https:// --join needs the CA that verifies it: --join-ca-cert (the cluster CA is a member's <data dir>/tls/ca.pem) or --ca-cert",
                ));
            };
            let pem = std::fs::read(&path)
                .map_err(|e| ConfigError::new(field, format!("{}: {e}", path.display())))?;
            let tls = crate::admin::client_config(&pem)
                .map_err(|e| ConfigError::new(field, format!("{}: {e}", path.display())))?;
            c.join_tls = Some(tls);
        }
        if let Some(v) = args.max_voters.or(file.max_voters) {
            if !(1..=9).contains(&v) {
                return Err(ConfigError::new("max_voters", "must be 1 to 9"));
            }
            c.max_voters = v;
        }
        c.leave_on_exit = args.leave_on_exit || file.leave_on_exit.unwrap_or(false);
        c.rebuild_state_machine = args.rebuild_state_machine;
        set_duration(
            &mut c.node_cert_lifetime,
            "node_cert_lifetime",
            file.node_cert_lifetime,
        )?;
        if !(MIN_CERT_LIFETIME..=MAX_CERT_LIFETIME).contains(&c.node_cert_lifetime) {
            return Err(ConfigError::new(
                "node_cert_lifetime",
                "must be 10s to 825d",
            ));
        }
        let g = &mut c.gossip;
        set_duration(
            &mut g.min_interval,
            "gossip_min_interval",
            file.gossip_min_interval,
        )?;
        set_duration(&mut g.interval, "gossip_interval", file.gossip_interval)?;
        set_duration(&mut g.ttl, "gossip_ttl", file.gossip_ttl)?;
        match file.gossip_estimator.as_deref() {
            None | Some("predictive") => g.estimator = gossip::Estimator::Predictive,
            Some("decay") => g.estimator = gossip::Estimator::Decay,
            Some("raw") => g.estimator = gossip::Estimator::Raw,
            Some("local") => c.gossip_local = true,
            Some(other) => {
                return Err(ConfigError::new(
                    "gossip_estimator",
                    format!("{other:?} is not one of predictive, decay, raw, local"),
                ));
            }
        }
        let g = &mut c.gossip;
        if g.min_interval > g.interval {
            return Err(ConfigError::new(
                "gossip_min_interval",
                "must not exceed gossip_interval",
            ));
        }
        // With a heartbeat less often than the TTL, an idle peer's reports
        // would expire between heartbeats.
        if g.interval >= g.ttl {
            return Err(ConfigError::new(
                "gossip_interval",
                "must be shorter than gossip_ttl",
            ));
        }
        let r = &mut c.raft;
        set_duration(
            &mut r.heartbeat_interval,
            "raft_heartbeat_interval",
            file.raft_heartbeat_interval,
        )?;
        set_duration(
            &mut r.election_timeout,
            "election_timeout",
            file.election_timeout,
        )?;
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&r.election_timeout) {
            return Err(ConfigError::new("election_timeout", "must be 100ms to 60s"));
        }
        // A follower must hear several heartbeats within the timeout.
        if r.heartbeat_interval.is_zero() || r.heartbeat_interval * 3 > r.election_timeout {
            return Err(ConfigError::new(
                "raft_heartbeat_interval",
                "must be more than 0 and at most a third of election_timeout",
            ));
        }
        if c.join.is_some() && c.token.is_none() {
            return Err(ConfigError::new(
                "token",
                "--join needs the cluster's --token",
            ));
        }
        if c.admin_addr == c.cluster_addr && c.admin_addr.port() != 0 {
            return Err(ConfigError::new(
                "cluster_addr",
                "must differ from admin_addr",
            ));
        }
        Ok(c)
    }
}

/// `admin_tls` from the switch (`on`, or `off` when set to false) and the
/// files, which are read and parsed here so that a bad pair stops the
/// start before any port is bound.
fn admin_tls(
    on: bool,
    off: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<AdminTls>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(on.then_some(AdminTls::Node)),
        (Some(cert), Some(key)) => {
            if off {
                return Err(ConfigError::new(
                    "admin_tls",
                    "is false but admin_tls_cert and admin_tls_key are set",
                ));
            }
            let read = |field: &str, p: &Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::new(field, format!("{}: {e}", p.display())))
            };
            let (c, k) = (read("admin_tls_cert", &cert)?, read("admin_tls_key", &key)?);
            let pair = crate::tls::certified_key(&c, &k).map_err(|e| {
                let field = match e {
                    crate::tls::TlsError::Key(_) => "admin_tls_key",
                    _ => "admin_tls_cert",
                };
                ConfigError::new(field, e.to_string())
            })?;
            pair.keys_match().map_err(|e| {
                ConfigError::new(
                    "admin_tls_key",
                    format!("{}: not the key of {} ({e})", key.display(), cert.display()),
                )
            })?;
            Ok(Some(AdminTls::Files { cert, key }))
        }
        (Some(_), None) | (None, Some(_)) => Err(ConfigError::new(
            "admin_tls_cert",
            "--admin-tls-cert and --admin-tls-key go together",
        )),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", format!("{}: {e}", path.display())))?;
    parse_file(&text, path)
}

fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let field = e
            .span()
            .map_or_else(|| "config".to_owned(), |s| field_at(text, s.start));
        ConfigError::new(field, format!("{}: {}", path.display(), e.message()))
    })
}

/// The key on the line where a TOML error starts (best effort).
fn field_at(text: &str, offset: usize) -> String {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    line.split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .unwrap_or("config")
        .to_owned()
}

fn parse_addr(field: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| ConfigError::new(field, format!("{v:?} is not HOST:PORT with an IP host")))
}

/// Tokens are 16 to 256 printable ASCII characters.
pub(crate) fn check_token(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.len() < 16 || v.len() > 256 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            "must be 16 to 256 printable ASCII characters",
        ));
    }
    Ok(())
}

/// A CIDR block (`10.0.0.0/8`) or a single address (a /32 or /128).
fn parse_net(v: &str) -> Result<IpNet, ConfigError> {
    let v = v.trim();
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            ConfigError::new(
                "trusted_proxies",
                format!("{v:?} is not an IP address or CIDR block"),
            )
        })
}

/// Bounds of `node_cert_lifetime`: short ones are for tests; 825 days is
/// the longest the CA/Browser Forum ever allowed a leaf certificate.
const MIN_CERT_LIFETIME: Duration = Duration::from_secs(10);
const MAX_CERT_LIFETIME: Duration = Duration::from_secs(825 * 86_400);

fn set_duration(slot: &mut Duration, field: &str, v: Option<String>) -> Result<(), ConfigError> {
    if let Some(v) = v {
        *slot = parse_duration(&v).ok_or_else(|| {
            ConfigError::new(
                field,
                format!("{v:?} is not a duration like 500ms, 30s, 5m or 1h"),
            )
        })?;
        if slot.is_zero() {
            return Err(ConfigError::new(field, "must be greater than zero"));
        }
    }
    Ok(())
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `90d`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests;
