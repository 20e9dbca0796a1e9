//! Node configuration: a TOML file, then `EDGELB_*` variables, then flags, in
//! rising precedence, layered into one typed source ([`source`]) and checked
//! here into a [`Config`]. Everything is checked before any port is bound;
//! an error names the field and the process exits with 64 (EX_USAGE).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::admin::AuthBackoff;
use crate::dataplane::Settings;
use crate::health::MinFree;

mod source;

pub use source::{Args, LogFormat, parse_duration};
use source::{EstimatorKey, Layer, Source, layered, with_origin};

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

/// The certificate of the admin API over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminTls {
    /// The node's cluster certificate (`admin_tls = true` alone).
    Node,
    /// An operator's certificate (`admin_tls_cert`, `admin_tls_key`).
    Files { cert: PathBuf, key: PathBuf },
}

/// Where a new cluster's state comes from (flags only: one start's act;
/// see `crate::restore`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restore {
    /// `--restore FILE`: a backup, onto an empty data dir.
    File(PathBuf),
    /// `--force-new-cluster`: what this data dir's state machine applied.
    ForceNewCluster,
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
    /// `--restore FILE` or `--force-new-cluster` (flags only): this start
    /// founds a new cluster from a backup ([`crate::restore`]).
    pub restore: Option<Restore>,
    /// `--upgrade` (a flag only): take over the sockets of the node running
    /// on the data dir ([`crate::upgrade`]).
    pub upgrade: bool,
    /// The CA a founding node keeps instead of generating one (set by
    /// [`crate::restore::prepare`], never from a file or a flag).
    pub founding_ca: Option<crate::cluster::pki::CaBundle>,
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
    /// `log_format`: the node's own log lines as text or JSON.
    pub log_format: LogFormat,
    /// `access_log`, `access_log_format`, `access_log_sample`; off when
    /// `None`.
    pub access_log: Option<crate::access_log::Options>,
    pub settings: Settings,
    /// `max_connections` was configured: it must fit the open files limit
    /// as it is (the default is lowered to fit; see [`crate::limits`]).
    pub max_connections_explicit: bool,
    /// `max_published_ports` was set (else `limits` may lower it).
    pub max_published_ports_explicit: bool,
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
            restore: None,
            upgrade: false,
            founding_ca: None,
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
            log_format: LogFormat::Text,
            access_log: None,
            settings: Settings::default(),
            max_connections_explicit: false,
            max_published_ports_explicit: false,
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

    /// The file named by `args.config` (if any) under the process's
    /// `EDGELB_*` variables and the flags of `args`, checked.
    pub fn load(args: Args) -> Result<Self, ConfigError> {
        Self::load_with(args, |name| std::env::var_os(name))
    }

    /// [`Config::load`] with the variables of keys without a flag read
    /// through `var` (`|_| None`: none, whatever the process has); a
    /// switch's variable (which clap reads into `args`) is looked up there
    /// only to tell an off switch given as `false` from one not given.
    pub fn load_with(
        args: Args,
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => Layer::read(path)?,
            None => Layer::default(),
        };
        let layers = [
            file,
            Layer::variables(&var)?,
            Layer::switches_off(&args, &var)?,
            Layer::args(&args)?,
        ];
        let source = layered(&layers)?;
        // The checks after typing name the key; its origin is added here.
        let mut config = Self::from_source(source, args.rebuild_state_machine)
            .map_err(|e| with_origin(&layers, e))?;
        config.restore = match (args.restore, args.force_new_cluster) {
            (Some(file), _) => Some(Restore::File(file)),
            (None, true) => Some(Restore::ForceNewCluster),
            (None, false) => None,
        };
        config.upgrade = args.upgrade;
        if config.restore.is_some() && config.join.is_some() {
            return Err(ConfigError::new(
                "join",
                "--restore and --force-new-cluster found a new cluster: they do not go with --join",
            ));
        }
        if config.restore.is_some() && config.token.is_none() {
            return Err(ConfigError::new(
                "token",
                "--restore and --force-new-cluster need the cluster's --token",
            ));
        }
        Ok(config)
    }

    /// The configuration of a TOML file's `text` alone (no flags), as
    /// [`load`](Self::load) reads a file named `path`.
    pub(crate) fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let layers = [Layer::parse(text, path)?];
        Self::from_source(layered(&layers)?, false).map_err(|e| with_origin(&layers, e))
    }

    /// The embedded default with what `s` sets, checked.
    fn from_source(s: Source, rebuild_state_machine: bool) -> Result<Self, ConfigError> {
        let mut c = Self::embedded_default();
        c.rebuild_state_machine = rebuild_state_machine;
        set(&mut c.node_id, s.node_id);
        // The admin API adds nodes from 1, and a member refuses a join as 0:
        // refused here, before any port is bound. A founder may be node 0
        // (a cluster founded so before this check restarts as it was).
        if c.node_id == 0 && s.join.is_some() {
            return Err(ConfigError::new(
                "node_id",
                "a joining node must be 1 or more (the admin API adds nodes from 1)",
            ));
        }
        if let Some(v) = s.region {
            if v.is_empty() || v.len() > 63 {
                return Err(ConfigError::new("region", "must be 1 to 63 characters"));
            }
            c.region = v;
        }
        set(&mut c.data_dir, s.data_dir);
        set(&mut c.data_dir_min_free, s.data_dir_min_free);
        set(&mut c.admin_addr, s.admin_addr);
        set(&mut c.cluster_addr, s.cluster_addr);
        if let Some(a) = s.advertise_cluster_addr {
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(ConfigError::new(
                    "advertise_cluster_addr",
                    format!(
                        "{:?} cannot be dialled (port 0 or an unspecified IP)",
                        a.to_string()
                    ),
                ));
            }
            c.advertise_cluster_addr = Some(a);
        }
        set(&mut c.listen_ip, s.listen_ip);
        if let Some(v) = s.join {
            if !v.starts_with("http://") && !v.starts_with("https://") {
                return Err(ConfigError::new(
                    "join",
                    format!("{v:?} is not an http:// or https:// admin URL"),
                ));
            }
            c.join = Some(v);
        }
        if let Some(v) = s.token {
            check_token("token", &v)?;
            c.token = Some(v);
        }
        if let Some(v) = s.metrics_token {
            check_token("metrics_token", &v)?;
            c.metrics_token = Some(v);
        }
        if let Some(v) = s.cluster_domain {
            if !raft_store::validate::valid_fqdn(&v) || v.starts_with("*.") {
                return Err(ConfigError::new(
                    "cluster_domain",
                    format!("{v:?} is not a domain name"),
                ));
            }
            c.cluster_domain = v;
        }
        set(&mut c.log, s.log);
        set(&mut c.log_format, s.log_format);
        c.access_log = access_log(s.access_log, s.access_log_format, s.access_log_sample)?;
        let t = &mut c.settings;
        set(&mut t.drain_timeout, s.drain_timeout);
        set(&mut t.header_timeout, s.header_timeout);
        set(&mut t.connect_timeout, s.connect_timeout);
        set(&mut t.upstream_timeout, s.upstream_timeout);
        set(&mut t.idle_timeout, s.idle_timeout);
        set(&mut t.park_after, s.park_after);
        set(&mut t.tcp_idle_timeout, s.tcp_idle_timeout);
        set(&mut t.send_timeout, s.send_timeout);
        set(&mut t.tunnel_idle_timeout, s.tunnel_idle_timeout);
        set(&mut t.trusted_proxies, s.trusted_proxies);
        if let Some(mut ports) = s.accept_proxy_protocol {
            if ports.contains(&0) {
                return Err(ConfigError::new(
                    "accept_proxy_protocol",
                    "ports are 1 to 65535",
                ));
            }
            ports.sort_unstable();
            ports.dedup();
            t.accept_proxy_protocol = ports;
        }
        if let Some(v) = s.max_connections {
            if v == 0 {
                return Err(ConfigError::new("max_connections", "must be at least 1"));
            }
            t.max_connections = v;
            c.max_connections_explicit = true;
        }
        if let Some(v) = s.admin_max_connections {
            if v == 0 {
                return Err(ConfigError::new(
                    "admin_max_connections",
                    "must be at least 1",
                ));
            }
            t.admin_max_connections = v;
        }
        if let Some(v) = s.max_published_ports {
            if !(1..=65535).contains(&v) {
                return Err(ConfigError::new(
                    "max_published_ports",
                    "must be from 1 to 65535",
                ));
            }
            t.max_published_ports = v;
            c.max_published_ports_explicit = true;
        }
        if let Some(v) = s.workers {
            if v == 0 {
                return Err(ConfigError::new("workers", "must be at least 1"));
            }
            t.workers = v;
        }
        let a = &mut c.admin_auth;
        set(&mut a.failures, s.admin_auth_failures);
        set(&mut a.window, s.admin_auth_window);
        set(&mut a.block, s.admin_auth_block);
        set(&mut a.block_max, s.admin_auth_block_max);
        if a.block > a.block_max {
            return Err(ConfigError::new(
                "admin_auth_block",
                "must not exceed admin_auth_block_max",
            ));
        }
        c.admin_tls = admin_tls(s.admin_tls, s.admin_tls_cert, s.admin_tls_key)?;
        c.ca_cert = s.ca_cert;
        c.node_cert = s.node_cert;
        c.node_key = s.node_key;
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
        let join_ca = s
            .join_ca_cert
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
        if let Some(v) = s.max_voters {
            if !(1..=9).contains(&v) {
                return Err(ConfigError::new("max_voters", "must be 1 to 9"));
            }
            c.max_voters = v;
        }
        c.leave_on_exit = s.leave_on_exit.unwrap_or(false);
        set(&mut c.node_cert_lifetime, s.node_cert_lifetime);
        if !(MIN_CERT_LIFETIME..=MAX_CERT_LIFETIME).contains(&c.node_cert_lifetime) {
            return Err(ConfigError::new(
                "node_cert_lifetime",
                "must be 10s to 825d",
            ));
        }
        let g = &mut c.gossip;
        set(&mut g.min_interval, s.gossip_min_interval);
        set(&mut g.interval, s.gossip_interval);
        set(&mut g.ttl, s.gossip_ttl);
        match s.gossip_estimator {
            None | Some(EstimatorKey::Predictive) => g.estimator = gossip::Estimator::Predictive,
            Some(EstimatorKey::Decay) => g.estimator = gossip::Estimator::Decay,
            Some(EstimatorKey::Raw) => g.estimator = gossip::Estimator::Raw,
            Some(EstimatorKey::Local) => c.gossip_local = true,
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
        set(&mut r.heartbeat_interval, s.raft_heartbeat_interval);
        set(&mut r.election_timeout, s.election_timeout);
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

/// `v`, when a layer set it, in place of the default in `slot`.
fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

/// The access log's options: on when `access_log` names a target; its
/// format and sample are errors without one (they would do nothing).
fn access_log(
    target: Option<Option<crate::access_log::Target>>,
    format: Option<crate::access_log::Format>,
    sample: Option<f64>,
) -> Result<Option<crate::access_log::Options>, ConfigError> {
    if let Some(s) = sample
        && !(s > 0.0 && s <= 1.0)
    {
        return Err(ConfigError::new(
            "access_log_sample",
            format!("{s} is not more than 0 and at most 1"),
        ));
    }
    let Some(target) = target else {
        if let Some(field) = [
            format.map(|_| "access_log_format"),
            sample.map(|_| "access_log_sample"),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            return Err(ConfigError::new(
                field,
                "is set but access_log is not (set access_log to stdout, stderr or a file)",
            ));
        }
        return Ok(None);
    };
    // `off`: the format and sample may stay in the file.
    let Some(target) = target else {
        return Ok(None);
    };
    Ok(Some(crate::access_log::Options {
        target,
        format: format.unwrap_or_default(),
        sample: sample.unwrap_or(1.0),
    }))
}

/// The admin API's certificate chain and key from the operator's files
/// (`admin_tls_cert`, `admin_tls_key`), in PEM: a file that cannot be
/// read, does not parse, or a key that is not the certificate's is a
/// config error naming the field.
pub(crate) fn read_admin_files(cert: &Path, key: &Path) -> Result<(String, String), ConfigError> {
    let read = |field: &str, p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| ConfigError::new(field, format!("{}: {e}", p.display())))
    };
    let (c, k) = (read("admin_tls_cert", cert)?, read("admin_tls_key", key)?);
    crate::tls::certified_key(&c, &k)
        .map_err(|e| pair_error(&e, ("admin_tls_cert", cert), ("admin_tls_key", key)))?;
    Ok((c, k))
}

/// A certificate and key (files `cert` and `key`, set by the two fields)
/// that do not load together, as a config error naming the field at fault:
/// the certificate's when the chain does not parse, else the key's (it
/// does not parse, or is not the certificate's).
pub(crate) fn pair_error(
    e: &crate::tls::TlsError,
    (cert_field, cert): (&str, &Path),
    (key_field, key): (&str, &Path),
) -> ConfigError {
    match e {
        crate::tls::TlsError::Chain(_) => {
            ConfigError::new(cert_field, format!("{}: {e}", cert.display()))
        }
        crate::tls::TlsError::KeyMismatch => ConfigError::new(
            key_field,
            format!("{}: not the key of {} ({e})", key.display(), cert.display()),
        ),
        e => ConfigError::new(key_field, format!("{}: {e}", key.display())),
    }
}

/// `admin_tls` from the switch (`Some(false)`: set to false) and the
/// files, which are read and parsed here so that a bad pair stops the
/// start before any port is bound.
fn admin_tls(
    switch: Option<bool>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<AdminTls>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok((switch == Some(true)).then_some(AdminTls::Node)),
        (Some(cert), Some(key)) => {
            if switch == Some(false) {
                return Err(ConfigError::new(
                    "admin_tls",
                    "is false but admin_tls_cert and admin_tls_key are set",
                ));
            }
            read_admin_files(&cert, &key)?;
            Ok(Some(AdminTls::Files { cert, key }))
        }
        (Some(_), None) | (None, Some(_)) => Err(ConfigError::new(
            "admin_tls_cert",
            "--admin-tls-cert and --admin-tls-key go together",
        )),
    }
}

/// Tokens are 1 to 256 printable ASCII characters (what a bearer token
/// can carry in a header without quoting). SPEC sets no length: a token
/// shorter than [`SHORT_TOKEN`] starts the node with a warning
/// ([`short_token_warning`]).
pub(crate) fn check_token(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > 256 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            "must be 1 to 256 printable ASCII characters",
        ));
    }
    Ok(())
}

/// Tokens shorter than this are accepted with a warning: short enough to
/// guess (generated ones are 40 random letters and digits).
pub(crate) const SHORT_TOKEN: usize = 16;

/// The warning for a `field` token shorter than [`SHORT_TOKEN`], if it is.
pub(crate) fn short_token_warning(field: &str, v: &str) -> Option<String> {
    (v.len() < SHORT_TOKEN).then(|| {
        format!(
            "{field} is {} characters long, short enough to guess: use {SHORT_TOKEN} or more \
             (a generated token is 40 random letters and digits)",
            v.len()
        )
    })
}

/// Bounds of `node_cert_lifetime`: short ones are for tests; 825 days is
/// the longest the CA/Browser Forum ever allowed a leaf certificate.
const MIN_CERT_LIFETIME: Duration = Duration::from_secs(10);
const MAX_CERT_LIFETIME: Duration = Duration::from_secs(825 * 86_400);

#[cfg(test)]
mod tests;
