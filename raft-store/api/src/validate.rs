//! Validation of names, host names, addresses and of one group on its own.
//!
//! Everything here answers [`ApplyError::Invalid`] (400). Rules that compare
//! a group with the *other* groups (unique names and fqdns, port sharing) are
//! conflicts and live in the state machine. The admin API and `edgectl` call
//! these functions too, to refuse bad input before proposing it. The one
//! rule that looks at the stored state, that a domain names a stored
//! certificate, asks it through [`Certificates`].

use std::collections::HashSet;
use std::net::IpAddr;

use crate::model::{ApplyError, Certificate, Domain, Handler, Instance, Service, ServiceGroup};

/// The stored certificates, as far as [`check_domains`] needs them (the
/// replicated state answers it).
pub trait Certificates {
    /// Whether a certificate named `name` is stored.
    fn has_certificate(&self, name: &str) -> bool;
}

/// A group or instance name: `[a-z0-9-]`, 1–63 chars, starting with a letter.
pub fn valid_name(s: &str) -> bool {
    s.len() <= 63
        && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A lowercase host name, optionally with a leading `*.` wildcard label:
/// labels of `[a-z0-9-]`, 1–63 chars, not starting or ending with `-`, at
/// most 253 chars in all. A single label is fine.
pub fn valid_fqdn(s: &str) -> bool {
    let rest = s.strip_prefix("*.").unwrap_or(s);
    s.len() <= 253
        && rest
            .split('.')
            .all(|label| valid_label(label, |b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

/// Where an instance is reached: an IPv4 or IPv6 literal (no brackets, no
/// port) or a host name. Host names here may use upper case and `_` (as
/// container names do) and end with a dot; an all-numeric name (a mistyped
/// IPv4 address) is refused.
pub fn valid_address(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    name.len() <= 253
        && name
            .split('.')
            .all(|label| valid_label(label, |b| b.is_ascii_alphanumeric() || b == b'_'))
        && !name
            .split('.')
            .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// 1–63 bytes, each `-` or accepted by `ok`, not starting or ending with `-`.
fn valid_label(label: &str, ok: impl Fn(u8) -> bool) -> bool {
    (1..=63).contains(&label.len())
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label.bytes().all(|b| b == b'-' || ok(b))
}

/// A certificate name: 1–253 chars of `[a-z0-9._-]`, starting with a letter
/// or digit (so `example-com` and `example.com` both work).
pub fn valid_certificate_name(s: &str) -> bool {
    s.len() <= 253
        && s.as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
}

/// Every rule a group must pass on its own (see [`check_services`],
/// [`check_domains`], [`check_instances`]), plus its name and `hard_limit`.
/// Expects a normalised group (handlers sorted, fqdns lowercase).
pub fn check_group(
    group: &ServiceGroup,
    stored: &(impl Certificates + ?Sized),
) -> Result<(), ApplyError> {
    if !valid_name(&group.name) {
        return Err(invalid(format!(
            "service group name {:?} is not valid: use a-z, 0-9 and '-', 1-63 chars, starting with a letter",
            group.name
        )));
    }
    check_services(&group.services)?;
    if group.hard_limit == 0 {
        return Err(invalid("hard_limit must be at least 1"));
    }
    check_domains(&group.domains, stored)?;
    check_instances(&group.instances)?;
    if let Some(check) = &group.health_check {
        check_health_check(check)?;
    }
    Ok(())
}

/// A health check's limits: interval 100 ms to 1 h, timeout 10 ms to 60 s
/// (a check slower than the interval delays the next one), rise and fall 1
/// to 100, port 1–65535; `http` with a path of
/// printable ASCII starting with `/` (at most 1024 bytes) and `expect` a
/// status or a range; `tcp` with neither.
pub fn check_health_check(check: &crate::model::HealthCheck) -> Result<(), ApplyError> {
    use crate::model::CheckKind;
    if !(100..=3_600_000).contains(&check.interval_ms) {
        return Err(invalid("health_check.interval_ms must be 100 to 3600000"));
    }
    if !(10..=60_000).contains(&check.timeout_ms) {
        return Err(invalid("health_check.timeout_ms must be 10 to 60000"));
    }
    if !(1..=100).contains(&check.rise) || !(1..=100).contains(&check.fall) {
        return Err(invalid("health_check.rise and fall must be 1 to 100"));
    }
    if check.port == Some(0) {
        return Err(invalid("health_check.port must be 1 to 65535"));
    }
    match check.kind {
        CheckKind::Tcp => {
            if check.path.is_some() || check.expect.is_some() {
                return Err(invalid(
                    "health_check: path and expect are for type \"http\" only",
                ));
            }
        }
        CheckKind::Http => {
            if let Some(p) = &check.path
                && (!p.starts_with('/')
                    || p.len() > 1024
                    || !p.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(invalid(format!(
                    "health_check.path {p:?} must start with '/' and be printable ASCII without spaces, at most 1024 bytes"
                )));
            }
            check
                .expected()
                .map_err(|m| invalid(format!("health_check.{m}")))?;
        }
    }
    Ok(())
}

/// The handler sets a port may have (sorted).
const ALLOWED_HANDLERS: [&[Handler]; 5] = [
    &[],
    &[Handler::Tls],
    &[Handler::Http],
    &[Handler::Tls, Handler::Http],
    &[Handler::Http, Handler::Redirect],
];

/// At least one service; ports 1–65535 and not repeated; each handler set
/// one of none, tls, http, tls+http, http+redirect; a redirect points at a
/// TLS port of the same list. Expects handlers sorted.
pub fn check_services(services: &[Service]) -> Result<(), ApplyError> {
    if services.is_empty() {
        return Err(invalid("a service group needs at least one service"));
    }
    let mut ports = HashSet::with_capacity(services.len());
    for s in services {
        if s.port == 0 || s.destination_port == 0 {
            return Err(invalid(format!(
                "service {s}: ports must be between 1 and 65535"
            )));
        }
        if !ports.insert(s.port) {
            return Err(invalid(format!("port {} is listed twice", s.port)));
        }
        if let Some(w) = s.handlers.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "port {}: handler {} is listed twice",
                s.port, w[0]
            )));
        }
        if !ALLOWED_HANDLERS.contains(&s.handlers.as_slice()) {
            return Err(invalid(format!(
                "port {}: handlers {} are not allowed; use none, tls, http, tls+http or http+redirect",
                s.port,
                handlers_label(&s.handlers)
            )));
        }
    }
    for s in services.iter().filter(|s| s.is_redirect()) {
        let target = services
            .iter()
            .find(|t| t.port == s.destination_port && t.port != s.port);
        if !target.is_some_and(Service::is_tls) {
            return Err(invalid(format!(
                "port {}: redirect target {} must be another published port of this group with the tls handler",
                s.port, s.destination_port
            )));
        }
    }
    Ok(())
}

/// At least one domain; each a valid fqdn, listed once, and naming only
/// stored certificates. Expects fqdns lowercase.
pub fn check_domains(
    domains: &[Domain],
    stored: &(impl Certificates + ?Sized),
) -> Result<(), ApplyError> {
    if domains.is_empty() {
        return Err(invalid("a service group needs at least one domain"));
    }
    // Sets, not a scan of the entries before: a group may list tens of
    // thousands of domains or instances, and every node checks it.
    let mut seen = HashSet::with_capacity(domains.len());
    for d in domains {
        if !valid_fqdn(&d.fqdn) {
            return Err(invalid(format!(
                "domain {:?} is not a valid host name",
                d.fqdn
            )));
        }
        if !seen.insert(d.fqdn.as_str()) {
            return Err(invalid(format!("domain {:?} is listed twice", d.fqdn)));
        }
        if let Some(cert) = &d.certificate
            && !stored.has_certificate(cert)
        {
            return Err(invalid(format!("certificate {cert:?} not found")));
        }
    }
    Ok(())
}

/// Each instance valid ([`check_instance`]); names and uuids not repeated.
pub fn check_instances(instances: &[Instance]) -> Result<(), ApplyError> {
    let mut names = HashSet::with_capacity(instances.len());
    let mut uuids = HashSet::with_capacity(instances.len());
    for inst in instances {
        check_instance(inst)?;
        if !names.insert(inst.name.as_str()) {
            return Err(invalid(format!(
                "instance name {:?} is listed twice",
                inst.name
            )));
        }
        if !uuids.insert(inst.uuid) {
            return Err(invalid(format!(
                "instance uuid {} is listed twice",
                inst.uuid
            )));
        }
    }
    Ok(())
}

/// A valid instance name and address.
pub fn check_instance(instance: &Instance) -> Result<(), ApplyError> {
    if !valid_name(&instance.name) {
        return Err(invalid(format!(
            "instance name {:?} is not valid: use a-z, 0-9 and '-', 1-63 chars, starting with a letter",
            instance.name
        )));
    }
    if !valid_address(&instance.address) {
        return Err(invalid(format!(
            "instance address {:?} is not an IP address or host name (no port, no brackets)",
            instance.address
        )));
    }
    Ok(())
}

/// A valid name ([`valid_certificate_name`]) and PEM text: a chain with at
/// least one `CERTIFICATE` block and a `PRIVATE KEY` block. Whether the PEM
/// parses is for the node to check before proposing.
pub fn check_certificate(certificate: &Certificate) -> Result<(), ApplyError> {
    if !valid_certificate_name(&certificate.name) {
        return Err(invalid(format!(
            "certificate name {:?} is not valid: use a-z, 0-9, '-', '.' and '_', starting with a letter or digit",
            certificate.name
        )));
    }
    if !certificate.chain.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(format!(
            "certificate {:?}: chain is not a PEM certificate chain",
            certificate.name
        )));
    }
    if !certificate.private_key.contains("PRIVATE KEY-----") {
        return Err(invalid(format!(
            "certificate {:?}: private_key is not a PEM private key",
            certificate.name
        )));
    }
    Ok(())
}

/// Sorts handlers into tls, http, redirect order (duplicates are kept, so
/// that [`check_services`] can refuse them).
pub fn normalise_services(services: &mut [Service]) {
    for s in services {
        s.handlers.sort();
    }
}

/// Lowercases fqdns.
pub fn normalise_domains(domains: &mut [Domain]) {
    for d in domains {
        d.fqdn.make_ascii_lowercase();
    }
}

/// `tls+http`, or `tcp` for no handlers.
pub fn handlers_label(handlers: &[Handler]) -> String {
    if handlers.is_empty() {
        return "tcp".to_owned();
    }
    handlers
        .iter()
        .map(|h| h.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

fn invalid(message: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(message.into())
}

#[cfg(test)]
mod tests;
