//! Where the settings come from, layered into one [`Source`]:
//!
//! ```text
//!  TOML file (--config) ──────────────────┐  layers of keys, in rising
//!  EDGELB_<KEY> of the keys with no flag ─┤  precedence: a key set by a
//!  EDGELB_* of the flags ─┐               │  higher one replaces it
//!  flags ─────────────────┴─ clap: Args ──┤
//!                                         ▼
//!                       serde: Source (every key typed, once)
//!                                         ▼
//!                       Config::from_source (defaults, checks)
//! ```
//!
//! Every key is typed by the same serde field whichever layer sets it, so
//! a duration is `humantime` syntax everywhere and a bad value is an error
//! that names its key (and the file or variable, when the value came from
//! one). A value that a higher layer replaces is never used, and never an
//! error.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{CommandFactory, Parser};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::ConfigError;
use crate::dataplane::IpNet;
use crate::health::MinFree;

// Values are kept as given here and typed with the file's keys in
// `Source`, so that a bad one is a config error naming its key. (The doc
// comment is `edgelb --help`'s text.)
/// Command-line flags; each also reads `EDGELB_<NAME>`.
#[derive(Debug, Default, Parser, Serialize)]
#[command(name = "edgelb", version, about = "Clustered edge load balancer node")]
pub struct Args {
    /// TOML file with the same keys as the flags (snake_case).
    #[arg(long, env = "EDGELB_CONFIG")]
    #[serde(skip)]
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
    /// The node's own log lines: text or json [default: text]
    #[arg(long, env = "EDGELB_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Access log: one line per HTTP request and TCP connection, to stdout,
    /// stderr or a file (appended to; reopened on SIGUSR1) [default: off]
    #[arg(long, env = "EDGELB_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// Access log lines: json or text (the common log format, then
    /// key=value fields) [default: json]
    #[arg(long, env = "EDGELB_ACCESS_LOG_FORMAT")]
    pub access_log_format: Option<String>,
    /// The fraction of requests and connections the access log writes,
    /// more than 0 and at most 1 [default: 1]
    #[arg(long, env = "EDGELB_ACCESS_LOG_SAMPLE", value_parser = finite)]
    pub access_log_sample: Option<f64>,
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
    #[arg(long, env = "EDGELB_ADMIN_TLS", value_parser = BoolishValueParser::new())]
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
    #[arg(long, env = "EDGELB_LEAVE_ON_EXIT", value_parser = BoolishValueParser::new())]
    pub leave_on_exit: bool,
    /// At this start, rebuild a corrupt state machine (state-machine.redb)
    /// from the newest readable snapshot and the Raft log, or drop a
    /// corrupt snapshot file (a new one is built from the state machine);
    /// the corrupt files are moved aside. Does nothing to intact files.
    #[arg(long)]
    #[serde(skip)]
    pub rebuild_state_machine: bool,
    /// Found a new one-node cluster from a backup (`edgectl cluster backup
    /// FILE`) on an empty data dir: the backup's cluster CA, groups,
    /// instances and certificates; needs the cluster's --token. Other nodes
    /// then join it with --join (README: Disaster recovery).
    #[arg(long, value_name = "FILE", conflicts_with = "force_new_cluster")]
    #[serde(skip)]
    pub restore: Option<PathBuf>,
    /// Found a new one-node cluster from this data dir's applied state,
    /// when the cluster lost its majority for good: the Raft log and
    /// membership start anew (the old files are moved aside), the cluster
    /// CA, token and every group are kept (README: Disaster recovery).
    #[arg(long)]
    #[serde(skip)]
    pub force_new_cluster: bool,
    /// Take over the listening sockets of the edgelb running on this data
    /// dir, which then drains and exits: a binary upgrade or a restart with
    /// a new configuration without refusing a connection (README:
    /// Upgrading without downtime). SIGUSR2 to a running node starts its
    /// binary with this flag.
    #[arg(long, conflicts_with_all = ["restore", "force_new_cluster"])]
    #[serde(skip)]
    pub upgrade: bool,
}

/// A finite number (a NaN would read as a key not set).
fn finite(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(f),
        _ => Err(format!("{v:?} is not a number")),
    }
}

/// Every key of the TOML file, each flag's among them, typed. `None` is a
/// key no layer set.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Source {
    pub(super) node_id: Option<u64>,
    pub(super) region: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    #[serde(deserialize_with = "min_free")]
    pub(super) data_dir_min_free: Option<MinFree>,
    #[serde(deserialize_with = "socket_addr")]
    pub(super) admin_addr: Option<SocketAddr>,
    #[serde(deserialize_with = "socket_addr")]
    pub(super) cluster_addr: Option<SocketAddr>,
    #[serde(deserialize_with = "socket_addr")]
    pub(super) advertise_cluster_addr: Option<SocketAddr>,
    #[serde(deserialize_with = "ip_addr")]
    pub(super) listen_ip: Option<IpAddr>,
    pub(super) join: Option<String>,
    pub(super) token: Option<String>,
    pub(super) metrics_token: Option<String>,
    pub(super) cluster_domain: Option<String>,
    pub(super) log: Option<String>,
    pub(super) log_format: Option<LogFormat>,
    #[serde(deserialize_with = "access_log_target")]
    pub(super) access_log: Option<Option<crate::access_log::Target>>,
    pub(super) access_log_format: Option<crate::access_log::Format>,
    pub(super) access_log_sample: Option<f64>,
    #[serde(deserialize_with = "duration")]
    pub(super) drain_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) header_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) connect_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) upstream_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) idle_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration_or_zero")]
    pub(super) park_after: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) tcp_idle_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) send_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) tunnel_idle_timeout: Option<Duration>,
    #[serde(deserialize_with = "nets")]
    pub(super) trusted_proxies: Option<Vec<IpNet>>,
    pub(super) accept_proxy_protocol: Option<Vec<u16>>,
    pub(super) max_connections: Option<usize>,
    pub(super) admin_max_connections: Option<usize>,
    pub(super) max_published_ports: Option<usize>,
    pub(super) workers: Option<usize>,
    pub(super) join_ca_cert: Option<PathBuf>,
    pub(super) admin_tls: Option<bool>,
    pub(super) admin_tls_cert: Option<PathBuf>,
    pub(super) admin_tls_key: Option<PathBuf>,
    pub(super) admin_auth_failures: Option<u32>,
    #[serde(deserialize_with = "duration")]
    pub(super) admin_auth_window: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) admin_auth_block: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) admin_auth_block_max: Option<Duration>,
    pub(super) ca_cert: Option<PathBuf>,
    pub(super) node_cert: Option<PathBuf>,
    pub(super) node_key: Option<PathBuf>,
    pub(super) max_voters: Option<usize>,
    pub(super) leave_on_exit: Option<bool>,
    #[serde(deserialize_with = "duration")]
    pub(super) gossip_min_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) gossip_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) gossip_ttl: Option<Duration>,
    pub(super) gossip_estimator: Option<EstimatorKey>,
    #[serde(deserialize_with = "duration")]
    pub(super) raft_heartbeat_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) election_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub(super) node_cert_lifetime: Option<Duration>,
}

/// `gossip_estimator`: one of the [`gossip::Estimator`]s, or `local`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum EstimatorKey {
    Predictive,
    Decay,
    Raw,
    /// Peers' reports are received but not used.
    Local,
}

/// `log_format`: how the node's own log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One layer of settings: the keys it sets and where they came from. Keys
/// are held as serde values (`serde_json`'s, which keep a u64 whole) until
/// they are typed.
#[derive(Debug, Default)]
pub(super) struct Layer {
    keys: Map<String, Value>,
    from: Origin,
}

/// Where a layer's keys came from, for its errors.
#[derive(Debug, Default)]
enum Origin {
    /// Flags, and the variables clap reads for them.
    #[default]
    Flags,
    File(PathBuf),
    /// `EDGELB_<KEY>` variables of keys that have no flag.
    Variables,
}

impl Layer {
    /// The TOML file at `path`.
    pub(super) fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("config", format!("{}: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    /// A TOML file's `text`, read from `path`.
    pub(super) fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let in_file = |field: String, message: &dyn std::fmt::Display| {
            ConfigError::new(field, format!("{}: {message}", path.display()))
        };
        let keys: Map<String, Value> = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map_or_else(|| "config".to_owned(), |s| field_at(text, s.start));
            in_file(field, &e.message())
        })?;
        // TOML has no null: one here was a nan or inf, which serde_json
        // cannot hold, and would read as a key not set.
        if let Some((key, _)) = keys.iter().find(|(_, v)| v.is_null()) {
            return Err(in_file(
                key.clone(),
                &"nan and inf are not values of any key",
            ));
        }
        Ok(Self {
            keys,
            from: Origin::File(path.to_owned()),
        })
    }

    /// The flags and variables that were given (clap reads a flag's own
    /// variable). A switch that is off was not given: it leaves its key to
    /// the layers below (see [`Layer::switches_off`]).
    pub(super) fn args(args: &Args) -> Result<Self, ConfigError> {
        let keys = serde_path_to_error::serialize(args, serde_json::value::Serializer)
            .map_err(|e| ConfigError::new(first_key(e.path()), e.into_inner().to_string()))?;
        let Value::Object(mut keys) = keys else {
            return Err(ConfigError::new("flags", "not a set of keys"));
        };
        keys.retain(|_, v| !v.is_null() && *v != Value::Bool(false));
        Ok(Self {
            keys,
            from: Origin::Flags,
        })
    }

    /// The switches that are off in `args` while their variable is set
    /// (`var` tells which are): `EDGELB_LEAVE_ON_EXIT=false`, which clap
    /// read into `args`, turns off the file's `leave_on_exit = true`. A layer
    /// of variables, between the other variables and the flags, so that an
    /// error names the variable.
    pub(super) fn switches_off(
        args: &Args,
        var: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ConfigError> {
        let given = serde_path_to_error::serialize(args, serde_json::value::Serializer)
            .map_err(|e| ConfigError::new(first_key(e.path()), e.into_inner().to_string()))?;
        let mut keys = Map::new();
        for arg in Args::command().get_arguments() {
            let id = arg.get_id().as_str();
            let set = arg
                .get_env()
                .and_then(|name| name.to_str())
                .is_some_and(|name| var(name).is_some());
            if set && given.get(id) == Some(&Value::Bool(false)) {
                keys.insert(id.to_owned(), Value::Bool(false));
            }
        }
        Ok(Self {
            keys,
            from: Origin::Variables,
        })
    }

    /// `EDGELB_<KEY>` for every key that has no flag (a flag reads its own
    /// variable), as `var` gives them. See [`variable_value`] for how a
    /// value is read; an empty one is a value (refused by every key that
    /// has no flag), as clap takes a flag's empty variable.
    pub(super) fn variables(var: &impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let flags: Vec<OsString> = Args::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(ToOwned::to_owned))
            .collect();
        let mut keys = Map::new();
        for key in source_keys() {
            let name = variable(key);
            if flags.iter().any(|f| *f == *name) {
                continue;
            }
            let Some(raw) = var(&name) else { continue };
            let raw = raw
                .into_string()
                .map_err(|_| ConfigError::new(*key, format!("{name} is not UTF-8")))?;
            keys.insert((*key).to_owned(), variable_value(key, &raw));
        }
        Ok(Self {
            keys,
            from: Origin::Variables,
        })
    }
}

/// The variable that sets `key`: `EDGELB_` and the key in capitals.
fn variable(key: &str) -> String {
    format!("EDGELB_{}", key.to_ascii_uppercase())
}

/// A variable's text as `key`'s value, the first of these that has the
/// key's type: the one TOML value it spells (`42`, `true`, `[80, 443]`,
/// `"30s"`), the text itself (`30s`), or a comma-separated list of either
/// (`10.0.0.0/8, 192.0.2.1` or `443,80` for a list key). When none has,
/// the form whose error reads best: the TOML value when it is a list or
/// quoted text, else the text (`30` for a duration is "not a duration",
/// not "an integer").
fn variable_value(key: &str, raw: &str) -> Value {
    let fits = |v: &Value| {
        let one = Map::from_iter([(key.to_owned(), v.clone())]);
        serde_json::from_value::<Source>(Value::Object(one)).is_ok()
    };
    let typed = toml_value(raw);
    let text = Value::String(raw.to_owned());
    let list = || {
        Value::Array(
            raw.split(',')
                .map(str::trim)
                .map(|item| match toml_value(item) {
                    Some(v) if !v.is_array() && !v.is_object() => v,
                    _ => Value::String(item.to_owned()),
                })
                .collect(),
        )
    };
    if let Some(v) = typed.as_ref().filter(|v| fits(v)) {
        return v.clone();
    }
    if fits(&text) {
        return text;
    }
    let list = list();
    if fits(&list) {
        return list;
    }
    match typed {
        Some(v) if v.is_array() || v.is_string() => v,
        _ => text,
    }
}

/// `raw` as one TOML value and nothing else (no second line, no comment);
/// `None` if it is not one, or is a date or time (no key takes those).
fn toml_value(raw: &str) -> Option<Value> {
    let v = Value::deserialize(toml::de::ValueDeserializer::new(raw)).ok()?;
    (!v.is_null() && !v.is_object()).then_some(v)
}

/// The keys of [`Source`], as serde names them (the TOML file's keys).
fn source_keys() -> &'static [&'static str] {
    /// A deserializer that only notes the fields a struct asks for.
    struct Fields(&'static [&'static str]);
    impl<'de> Deserializer<'de> for &mut Fields {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("fields only"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(Self::Error::custom("fields only"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Fields(&[]);
    let _ = Source::deserialize(&mut fields);
    fields.0
}

/// `layers` in rising precedence, as one [`Source`]: each key from the
/// highest layer that sets it.
pub(super) fn layered(layers: &[Layer]) -> Result<Source, ConfigError> {
    let mut keys = Map::new();
    for layer in layers {
        keys.extend(layer.keys.clone());
    }
    serde_path_to_error::deserialize(Value::Object(keys)).map_err(|e| {
        let field = first_key(e.path());
        let message = e.into_inner().to_string();
        with_origin(layers, ConfigError::new(field, message))
    })
}

/// `error` with where its key's value came from (the file's path, or the
/// variable's name), from the highest of `layers` that sets it; a flag's
/// error, or one about no single key, is left as it is.
pub(super) fn with_origin(layers: &[Layer], error: ConfigError) -> ConfigError {
    let ConfigError { field, message } = error;
    let from = layers.iter().rev().find(|l| l.keys.contains_key(&field));
    match from.map(|l| &l.from) {
        Some(Origin::File(path)) => {
            ConfigError::new(field, format!("{}: {message}", path.display()))
        }
        Some(Origin::Variables) => {
            let name = variable(&field);
            ConfigError::new(field, format!("{name}: {message}"))
        }
        Some(Origin::Flags) | None => ConfigError::new(field, message),
    }
}

/// The top-level key an error is about.
fn first_key(path: &serde_path_to_error::Path) -> String {
    match path.iter().next() {
        Some(serde_path_to_error::Segment::Map { key }) => key.clone(),
        _ => "config".to_owned(),
    }
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

/// A value written as text, parsed by `parse` (whose error is the message).
fn text_as<'de, D, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    match Option::<String>::deserialize(d)? {
        Some(v) => parse(&v).map(Some).map_err(D::Error::custom),
        None => Ok(None),
    }
}

/// `access_log`: `off` (`Some(None)`), `stdout`, `stderr` or a path.
fn access_log_target<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<crate::access_log::Target>>, D::Error> {
    text_as(d, |v| match v {
        "off" => Ok(None),
        v => crate::access_log::Target::parse(v).map(Some),
    })
}

/// `HOST:PORT`: an IP address (`[::1]:7070` for IPv6), or a host name
/// resolved once, here, before anything is bound.
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    text_as(d, |v| v.parse().or_else(|_| resolve(v)))
}

/// A host name and port as one address: the first IPv4 address the name
/// has, else its first (so that `localhost:7070` is 127.0.0.1's whatever
/// order the resolver gives).
fn resolve(v: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    let malformed = || format!("{v:?} is not HOST:PORT");
    let (host, port) = v.rsplit_once(':').ok_or_else(malformed)?;
    let port: u16 = port.parse().map_err(|_| malformed())?;
    // An IPv6 literal without brackets, or a name that cannot be one.
    if host.is_empty() || host.contains([':', '[', ']', '/', ' ']) {
        return Err(malformed());
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{v:?}: cannot resolve {host:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{v:?}: {host:?} has no address"))
}

fn ip_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    text_as(d, |v| {
        v.parse().map_err(|_| format!("{v:?} is not an IP address"))
    })
}

fn min_free<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MinFree>, D::Error> {
    text_as(d, str::parse)
}

/// A duration in `humantime` syntax, zero included (`0s`).
fn duration_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    text_as(d, |v| {
        parse_duration(v)
            .ok_or_else(|| format!("{v:?} is not a duration like 0s, 500ms, 30s or 5m"))
    })
}

/// A duration in `humantime` syntax (`500ms`, `30s`, `5m`, `1h`, `90d`,
/// `1h 30m`), more than zero.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    text_as(d, |v| {
        let d = parse_duration(v)
            .ok_or_else(|| format!("{v:?} is not a duration like 500ms, 30s, 5m or 1h"))?;
        if d.is_zero() {
            return Err("must be greater than zero".to_owned());
        }
        Ok(d)
    })
}

/// Units `humantime` reads as calendar months and years: refused, so that
/// `5M` is an error rather than five months (no timeout of a node means
/// them, and `M` is easily taken for minutes).
const CALENDAR_UNITS: [&str; 6] = ["M", "month", "months", "y", "year", "years"];

/// Parses a duration in `humantime` syntax: `500ms`, `30s`, `5m`, `1h`,
/// `90d`, or several added up (`1h 30m`); not in months or years. At most
/// `u64::MAX` milliseconds, so that no deadline computed from it overflows.
pub fn parse_duration(v: &str) -> Option<Duration> {
    if v.split(|c: char| !c.is_ascii_alphabetic())
        .any(|unit| CALENDAR_UNITS.contains(&unit))
    {
        return None;
    }
    let d = humantime::parse_duration(v).ok()?;
    u64::try_from(d.as_millis()).is_ok().then_some(d)
}

/// `trusted_proxies`: CIDR blocks (`10.0.0.0/8`) or single addresses (a
/// /32 or /128).
fn nets<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    let Some(list) = Option::<Vec<String>>::deserialize(d)? else {
        return Ok(None);
    };
    list.iter()
        .map(|v| {
            let v = v.trim();
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| D::Error::custom(format!("{v:?} is not an IP address or CIDR block")))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}
