//! The replicated data model: service groups, their published ports
//! ([`Service`]), domains and instances, and stored certificates.
//!
//! These are plain serde types; the JSON they produce is both the admin API's
//! response shape and the state machine's snapshot format. The CLI port-spec
//! syntax (`EXT:INT[/h1+h2]`) is parsed and printed here too, and
//! [`ApplyError`] says why a change was refused (by the admin API early, or
//! by the state machine).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `hard_limit` of a group created without one.
pub const DEFAULT_HARD_LIMIT: u32 = 65535;

/// A port-spec or handler that does not parse.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// A port spec that is not `EXT:INT[/h1+h2]` or `P[/h1+h2]`.
    #[error("invalid port spec {spec:?}: {reason}")]
    PortSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A handler name other than `tls`, `http` or `redirect`.
    #[error("unknown handler {0:?}; expected tls, http or redirect")]
    Handler(String),
    /// `parse_port_specs` was given no specs.
    #[error("no port specs given")]
    NoPorts,
}

/// Why a command was refused. The message is for operators.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// A group, instance, port or domain that does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// Clashes with the current state (409).
    #[error("{0}")]
    Conflict(String),
}

impl ApplyError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid(_) => 400,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
        }
    }
}

impl From<ModelError> for ApplyError {
    fn from(e: ModelError) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// How a patch combines its value with the current list.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PatchOp {
    /// Replace the list.
    Set,
    /// Append to the list; an entry already present is refused.
    Add,
    /// Remove the entries with the same key (`port` / `fqdn`); an entry not
    /// present is refused.
    Del,
}

/// What a published port does with a connection. The derived order
/// (tls, http, redirect) is the normal form of a handler list.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    /// Terminate TLS at the edge.
    Tls,
    /// HTTP mode: balance per request, route by `Host`.
    Http,
    /// Answer every request with a 308 to the HTTPS port.
    Redirect,
}

impl Handler {
    /// The lowercase name used in JSON and port specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Http => "http",
            Self::Redirect => "redirect",
        }
    }
}

impl fmt::Display for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Handler {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tls" => Ok(Self::Tls),
            "http" => Ok(Self::Http),
            "redirect" => Ok(Self::Redirect),
            other => Err(ModelError::Handler(other.to_owned())),
        }
    }
}

/// One published port of a group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// The port the edge listens on.
    pub port: u16,
    /// The port instances listen on (for `redirect`: the HTTPS port to send
    /// clients to).
    pub destination_port: u16,
    /// Empty means plain TCP.
    pub handlers: Vec<Handler>,
}

impl Service {
    /// Whether `h` is among the handlers.
    pub fn has(&self, h: Handler) -> bool {
        self.handlers.contains(&h)
    }

    /// HTTP mode (per-request balancing).
    pub fn is_http(&self) -> bool {
        self.has(Handler::Http)
    }

    /// TLS is terminated at the edge.
    pub fn is_tls(&self) -> bool {
        self.has(Handler::Tls)
    }

    /// Answers every request with a redirect instead of proxying.
    pub fn is_redirect(&self) -> bool {
        self.has(Handler::Redirect)
    }
}

/// `EXT:INT`, then `/h1+h2` in the order tls, http, redirect when there are
/// handlers.
impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.port, self.destination_port)?;
        let mut handlers = self.handlers.clone();
        handlers.sort();
        for (i, h) in handlers.iter().enumerate() {
            f.write_str(if i == 0 { "/" } else { "+" })?;
            f.write_str(h.as_str())?;
        }
        Ok(())
    }
}

/// The CLI port spec `EXT:INT[/h1+h2]`; a bare `P` means `P:P`. Handlers
/// come back sorted; which combinations are allowed is checked by
/// [`crate::validate`], not here.
impl FromStr for Service {
    type Err = ModelError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ModelError::PortSpec {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (ports, handlers) = match spec.split_once('/') {
            Some((ports, handlers)) => (ports, Some(handlers)),
            None => (spec, None),
        };
        let (port, destination_port) = match ports.split_once(':') {
            Some((ext, int)) => (parse_port(ext), parse_port(int)),
            None => (parse_port(ports), parse_port(ports)),
        };
        let (Some(port), Some(destination_port)) = (port, destination_port) else {
            return Err(bad("expected EXT:INT or P with ports 1-65535"));
        };
        let mut list = Vec::new();
        if let Some(handlers) = handlers {
            for name in handlers.split('+') {
                let h = name.parse::<Handler>().map_err(|_| {
                    bad(&format!(
                        "unknown handler {name:?}; expected tls, http or redirect"
                    ))
                })?;
                if list.contains(&h) {
                    return Err(bad(&format!("handler {h} is listed twice")));
                }
                list.push(h);
            }
        }
        list.sort();
        Ok(Self {
            port,
            destination_port,
            handlers: list,
        })
    }
}

/// A port number 1..=65535 written as plain digits (no sign, no spaces).
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Parses CLI port specs, applying the seed's shorthand: exactly one spec for
/// port 443 with no handlers (`443:INT`, or bare `443`) expands to
/// `443:INT/tls+http` plus `80:443/http+redirect`.
pub fn parse_port_specs(specs: &[&str]) -> Result<Vec<Service>, ModelError> {
    let services = specs
        .iter()
        .map(|s| s.parse::<Service>())
        .collect::<Result<Vec<_>, _>>()?;
    match services.as_slice() {
        [] => Err(ModelError::NoPorts),
        [only] if only.port == 443 && only.handlers.is_empty() => Ok(vec![
            Service {
                port: 443,
                destination_port: only.destination_port,
                handlers: vec![Handler::Tls, Handler::Http],
            },
            Service {
                port: 80,
                destination_port: 443,
                handlers: vec![Handler::Http, Handler::Redirect],
            },
        ]),
        _ => Ok(services),
    }
}

/// A host name routed to a group (HTTP `Host` / TLS SNI), exact or `*.`
/// wildcard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Domain {
    /// Lowercase host name.
    pub fqdn: String,
    /// Name of a stored [`Certificate`]; none means a self-signed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// A backend of a group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Instance {
    /// Assigned by the proposer; unique in the whole state.
    pub uuid: Uuid,
    /// Unique within its group.
    pub name: String,
    /// IP literal or host name, no port.
    pub address: String,
}

/// A service group: published ports, the domains routed to it and its
/// instances.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceGroup {
    /// Assigned by the proposer.
    pub uuid: Uuid,
    /// Unique across groups.
    pub name: String,
    /// Unique across groups.
    pub domains: Vec<Domain>,
    /// At least one.
    pub services: Vec<Service>,
    /// Max in-flight per instance (global estimate).
    pub hard_limit: u32,
    /// Attached backends.
    pub instances: Vec<Instance>,
    /// RFC 3339, chosen by the proposer.
    pub created_at: String,
    /// Kept across restarts.
    pub persistent: bool,
    /// An active health check of the instances, run by every node on its
    /// own; none when `None` (passive marking only).
    /// Boxed: most groups have none, and a group is in every answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<HealthCheck>>,
    /// TCP mode: a PROXY protocol header of this version starts every
    /// connection to an instance, naming the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy_protocol: Option<ProxyVersion>,
}

impl ServiceGroup {
    /// Whether the group uses properties that nodes older than them do not
    /// read (see `docs/compatibility.md`): proposed only once every member
    /// says it reads them.
    pub fn has_options(&self) -> bool {
        self.health_check.is_some() || self.send_proxy_protocol.is_some()
    }
}

/// A PROXY protocol version (HAProxy's).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text form.
    V1,
    /// The binary form.
    V2,
}

/// How an instance is checked.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// `GET path` over HTTP/1.1, answered with a status in `expect`.
    Http,
}

/// An active health check (HAProxy's `check inter … rise … fall …`): every
/// `interval_ms` each node checks each instance on its own; `fall`
/// consecutive failures take an instance out of selection on that node,
/// `rise` consecutive successes bring it back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp` or `http`.
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// `http`: the path (and query) requested; `/` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `http`: the statuses that pass, `"200"` or `"200-399"` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// The instances' port to check; the group's first destination port by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Between two checks of an instance, in ms.
    #[serde(default = "HealthCheck::default_interval")]
    pub interval_ms: u64,
    /// One check's limit, in ms.
    #[serde(default = "HealthCheck::default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down instance back.
    #[serde(default = "HealthCheck::default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an instance out of selection.
    #[serde(default = "HealthCheck::default_fall")]
    pub fall: u32,
}

/// The CLI form: `tcp` or `http[:PATH]`, then `,key=value` options
/// (`expect`, `port`, `interval_ms`, `timeout_ms`, `rise`, `fall`), e.g.
/// `http:/healthz,expect=200-299,interval_ms=1000`. Limits are checked by
/// [`crate::validate::check_health_check`], not here.
impl FromStr for HealthCheck {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let (kind, path) = match head.split_once(':') {
            Some(("http", path)) => (CheckKind::Http, Some(path.to_owned())),
            None if head == "http" => (CheckKind::Http, None),
            None if head == "tcp" => (CheckKind::Tcp, None),
            _ => {
                return Err(format!(
                    "health check {spec:?}: expected tcp or http[:PATH], then ,key=value options"
                ));
            }
        };
        let mut check = Self {
            kind,
            path,
            expect: None,
            port: None,
            interval_ms: Self::default_interval(),
            timeout_ms: Self::default_timeout(),
            rise: Self::default_rise(),
            fall: Self::default_fall(),
        };
        for opt in parts {
            let (key, value) = opt
                .split_once('=')
                .ok_or_else(|| format!("health check option {opt:?} is not key=value"))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("health check option {key}: {v:?} is not a number"))
            };
            let small = |v: &str| {
                number(v).and_then(|n| {
                    u32::try_from(n)
                        .map_err(|_| format!("health check option {key}: {n} is too large"))
                })
            };
            match key {
                "expect" => check.expect = Some(value.to_owned()),
                "port" => {
                    check.port =
                        Some(u16::try_from(number(value)?).map_err(|_| {
                            format!("health check option port: {value} is not a port")
                        })?);
                }
                "interval_ms" => check.interval_ms = number(value)?,
                "timeout_ms" => check.timeout_ms = number(value)?,
                "rise" => check.rise = small(value)?,
                "fall" => check.fall = small(value)?,
                other => {
                    return Err(format!(
                        "unknown health check option {other:?}; expected expect, port, interval_ms, timeout_ms, rise or fall"
                    ));
                }
            }
        }
        Ok(check)
    }
}

impl HealthCheck {
    fn default_interval() -> u64 {
        2000
    }
    fn default_timeout() -> u64 {
        1000
    }
    fn default_rise() -> u32 {
        2
    }
    fn default_fall() -> u32 {
        3
    }

    /// The passing statuses, `expect` parsed (`200-399` by default).
    pub fn expected(&self) -> Result<(u16, u16), String> {
        let Some(e) = self.expect.as_deref() else {
            return Ok((200, 399));
        };
        let status = |s: &str| {
            s.parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c) && s.len() == 3)
                .ok_or_else(|| format!("expect {e:?}: {s:?} is not a status from 100 to 599"))
        };
        match e.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (status(lo)?, status(hi)?);
                if lo > hi {
                    return Err(format!("expect {e:?}: the range is empty"));
                }
                Ok((lo, hi))
            }
            None => status(e).map(|c| (c, c)),
        }
    }
}

impl ServiceGroup {
    /// An instance by uuid string or, failing that, by name.
    pub fn instance(&self, id: &str) -> Option<&Instance> {
        find_instance(&self.instances, id).and_then(|i| self.instances.get(i))
    }
}

/// Position of the instance named by uuid string or name; a uuid match wins.
pub fn find_instance(instances: &[Instance], id: &str) -> Option<usize> {
    Uuid::parse_str(id)
        .ok()
        .and_then(|u| instances.iter().position(|i| i.uuid == u))
        .or_else(|| instances.iter().position(|i| i.name == id))
}

/// A stored certificate (PEM).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    /// Name that domains refer to.
    pub name: String,
    /// PEM certificate chain, leaf first.
    pub chain: String,
    /// PEM private key.
    pub private_key: String,
    /// Expiry (RFC 3339) as read by the proposer, if known.
    #[serde(default)]
    pub not_after: Option<String>,
}

#[cfg(test)]
mod tests;

/// Secrets every cluster member holds: the CA that signs node certificates
/// (so any member can admit a node) and the admin token's SHA-256.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct ClusterSecrets {
    /// The cluster CA certificate, PEM.
    pub ca_cert_pem: String,
    /// The cluster CA private key, PEM; empty when operators run their own PKI.
    pub ca_key_pem: String,
    /// Lowercase hex SHA-256 of the admin token.
    pub token_sha256: String,
}

impl fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSecrets")
            .field("token_sha256", &self.token_sha256)
            .finish_non_exhaustive()
    }
}
