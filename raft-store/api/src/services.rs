//! The bodies of the `/v1/services` and `/v1/certificates` routes (SPEC §6),
//! shared by the node (server), `edgectl` and the tests (clients). Serde
//! only, no I/O; each answer travels in the [`envelope`](crate::envelope).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{ApplyError, Domain, Handler, PatchOp, Service, ServiceGroup};

/// `POST /v1/services`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// Generated when omitted.
    #[serde(default)]
    pub name: Option<String>,
    /// Published ports.
    pub services: Vec<Service>,
    /// Defaults to `<name>.<cluster_domain>`.
    #[serde(default)]
    pub domains: Option<Vec<DomainRequest>>,
    /// Defaults to [`DEFAULT_HARD_LIMIT`](crate::model::DEFAULT_HARD_LIMIT).
    #[serde(default)]
    pub hard_limit: Option<u32>,
    /// An active health check of the instances; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::model::HealthCheck>,
    /// TCP mode: send the instances a PROXY protocol header (`v1`, `v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy_protocol: Option<crate::model::ProxyVersion>,
}

/// A domain as requests spell it: `{name, certificate?: {name}}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DomainRequest {
    /// The host name (any case).
    pub name: String,
    /// A stored certificate to present.
    #[serde(default)]
    pub certificate: Option<CertificateRef>,
}

impl DomainRequest {
    /// The stored form: lowercase fqdn and the certificate's name.
    pub fn to_domain(&self) -> Domain {
        Domain {
            fqdn: self.name.to_ascii_lowercase(),
            certificate: self.certificate.as_ref().map(|c| c.name.clone()),
        }
    }
}

/// A reference to a stored certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateRef {
    /// Its name.
    pub name: String,
}

/// `PATCH /v1/services/{id}`; see [`resolve_patch`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    /// `services`, `domains` or `hard_limit`.
    pub prop: String,
    /// `set`, `add` or `del`.
    pub op: PatchOp,
    /// Depends on `prop`; may be left out only where none is needed (`del`
    /// of `health_check` or `send_proxy_protocol`). `null` is a value.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<serde_json::Value>,
}

/// A field that is there, `null` included (`Some(Null)`); `None` only when
/// it is left out (`#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// `POST /v1/services/{id}/instances`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Generated when omitted.
    #[serde(default)]
    pub name: Option<String>,
    /// IP or host name, no port.
    pub address: String,
}

/// `POST /v1/certificates`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// Name that domains refer to.
    pub name: String,
    /// PEM chain.
    pub chain: String,
    /// PEM private key.
    pub private_key: String,
}

/// `data` of the group routes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupsData {
    /// The groups.
    pub service_groups: Vec<ServiceGroup>,
}

/// `data` of the instance routes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstancesData {
    /// The instances.
    pub instances: Vec<InstanceView>,
}

/// An instance with this node's view of its health and load.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    /// Its uuid.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Health as seen by this node.
    pub state: InstanceState,
    /// In-flight counts.
    pub load: LoadView,
}

/// Health of an instance as seen by one node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Selectable.
    Up,
    /// Failing checks.
    Down,
    /// Detached; finishing its in-flight work.
    Draining,
}

/// In-flight counts of one instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct LoadView {
    /// This node's exact count.
    pub local: u64,
    /// The estimated cluster-wide count: `local` plus the peers' parts,
    /// what the balancer compares.
    pub global: u64,
    /// Each fresh peer's estimated part, by node id (0 where it has
    /// nothing on the instance).
    pub peers: BTreeMap<String, u64>,
}

impl LoadView {
    /// Peer `id`'s estimated part (0 when it is not listed).
    pub fn peer(&self, id: u64) -> u64 {
        self.peers.get(&id.to_string()).copied().unwrap_or(0)
    }
}

/// `data` of `GET /v1/certificates`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CertificatesData {
    /// Names and expiry, never keys.
    pub certificates: Vec<CertificateInfo>,
}

/// A stored certificate without its PEM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Its name.
    pub name: String,
    /// Expiry (RFC 3339), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

/// A [`PatchRequest`] with its value parsed for its `prop`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum PatchValue {
    /// `prop: services`.
    Services(PatchOp, Vec<Service>),
    /// `prop: domains`.
    Domains(PatchOp, Vec<DomainRequest>),
    /// `prop: hard_limit` (op `set` only).
    HardLimit(u32),
    /// `prop: health_check`: `set` to an object (or `null`), `del`.
    HealthCheck(Option<crate::model::HealthCheck>),
    /// `prop: send_proxy_protocol`: `set` to `"v1"`, `"v2"` (or `null`), `del`.
    SendProxyProtocol(Option<crate::model::ProxyVersion>),
}

/// Parses a patch's `value` for its `prop`.
///
/// - `services`: a list of `{port, destination_port, handlers}`; with `del`
///   an entry may be just `{port}` or a bare port number.
/// - `domains`: a list of `{name, certificate?: {name}}` or bare names.
/// - `hard_limit`: a number ≥ 1 (range checked on apply), op `set` only.
/// - `health_check`: `set` to `{type, path?, expect?, port?, interval_ms?,
///   timeout_ms?, rise?, fall?}` or `null`; `del` removes it (any value).
/// - `send_proxy_protocol`: `set` to `"v1"`, `"v2"` or `null`; `del`
///   removes it.
pub fn resolve_patch(req: PatchRequest) -> Result<PatchValue, ApplyError> {
    let PatchRequest { prop, op, value } = req;
    let what = prop.clone();
    let value = move || {
        value.ok_or_else(|| ApplyError::Invalid(format!("this patch of {what} needs a value")))
    };
    const SERVICES: &str = "a list of {port, destination_port, handlers} objects";
    const PORTS: &str = "a list of ports or {port} objects";
    const DOMAINS: &str = "a list of {name, certificate?: {name}} objects or names";
    match (prop.as_str(), op) {
        ("services", PatchOp::Del) => {
            let keys: Vec<PortKey> = parse(value()?, "services", PORTS)?;
            let services = keys.into_iter().map(PortKey::into_service).collect();
            Ok(PatchValue::Services(op, services))
        }
        ("services", op) => Ok(PatchValue::Services(
            op,
            parse(value()?, "services", SERVICES)?,
        )),
        ("domains", op) => {
            let items: Vec<DomainItem> = parse(value()?, "domains", DOMAINS)?;
            let domains = items.into_iter().map(DomainItem::into_request).collect();
            Ok(PatchValue::Domains(op, domains))
        }
        ("hard_limit", PatchOp::Set) => Ok(PatchValue::HardLimit(parse(
            value()?,
            "hard_limit",
            "a number from 1 to 4294967295",
        )?)),
        ("hard_limit", _) => Err(ApplyError::Invalid(
            "hard_limit only supports op \"set\"".to_owned(),
        )),
        ("health_check", PatchOp::Set) => Ok(PatchValue::HealthCheck(parse(
            value()?,
            "health_check",
            "a {type, path?, expect?, port?, interval_ms?, timeout_ms?, rise?, fall?} object or null",
        )?)),
        ("health_check", PatchOp::Del) => Ok(PatchValue::HealthCheck(None)),
        ("send_proxy_protocol", PatchOp::Set) => Ok(PatchValue::SendProxyProtocol(parse(
            value()?,
            "send_proxy_protocol",
            "\"v1\", \"v2\" or null",
        )?)),
        ("send_proxy_protocol", PatchOp::Del) => Ok(PatchValue::SendProxyProtocol(None)),
        (prop @ ("health_check" | "send_proxy_protocol"), _) => Err(ApplyError::Invalid(format!(
            "{prop} supports op \"set\" and \"del\""
        ))),
        (other, _) => Err(ApplyError::Invalid(format!(
            "unknown prop {other:?}; expected services, domains, hard_limit, health_check or send_proxy_protocol"
        ))),
    }
}

/// Deserialises a patch value; the error says what was expected and what
/// serde found (without serde's "at line 1 column N", meaningless here).
fn parse<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    prop: &str,
    expected: &str,
) -> Result<T, ApplyError> {
    serde_json::from_value(value).map_err(|e| {
        let detail = e.to_string();
        let detail = detail
            .rfind(" at line ")
            .map_or(detail.as_str(), |i| &detail[..i]);
        ApplyError::Invalid(format!("value for {prop} must be {expected} ({detail})"))
    })
}

/// An entry of a `services` `del`: a port or an object with at least `port`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortKey {
    Port(u16),
    Object(PortObject),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortObject {
    port: u16,
    #[serde(default)]
    destination_port: Option<u16>,
    #[serde(default)]
    handlers: Vec<Handler>,
}

impl PortKey {
    /// Deletion matches by port only; the other fields are carried along.
    fn into_service(self) -> Service {
        match self {
            Self::Port(port) => Service {
                port,
                destination_port: port,
                handlers: Vec::new(),
            },
            Self::Object(o) => Service {
                port: o.port,
                destination_port: o.destination_port.unwrap_or(o.port),
                handlers: o.handlers,
            },
        }
    }
}

/// An entry of a `domains` value: an object or a bare name.
#[derive(Deserialize)]
#[serde(untagged)]
enum DomainItem {
    Name(String),
    Object(DomainRequest),
}

impl DomainItem {
    fn into_request(self) -> DomainRequest {
        match self {
            Self::Name(name) => DomainRequest {
                name,
                certificate: None,
            },
            Self::Object(d) => d,
        }
    }
}

#[cfg(test)]
mod tests;
