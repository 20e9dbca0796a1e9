//! Shared builders for the state machine's unit tests.

use uuid::Uuid;

use super::*;
use crate::command::{Patch, PatchOp};
use crate::model::{DEFAULT_HARD_LIMIT, Domain, Handler, Handler::*, Service};

pub(crate) fn svc(port: u16, destination_port: u16, handlers: &[Handler]) -> Service {
    Service {
        port,
        destination_port,
        handlers: handlers.to_vec(),
    }
}

pub(crate) fn domain(fqdn: &str) -> Domain {
    Domain {
        fqdn: fqdn.into(),
        certificate: None,
    }
}

pub(crate) fn inst(n: u128, name: &str) -> Instance {
    Instance {
        uuid: Uuid::from_u128(n),
        name: name.into(),
        address: "10.0.0.1".into(),
    }
}

pub(crate) fn group(n: u128, name: &str, services: Vec<Service>) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(n),
        name: name.into(),
        domains: vec![domain(&format!("{name}.edgelb.local"))],
        services,
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: vec![],
        created_at: "2024-01-01T00:00:00Z".into(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    }
}

pub(crate) fn web() -> ServiceGroup {
    group(
        1,
        "web",
        vec![
            svc(443, 8080, &[Tls, Http]),
            svc(80, 443, &[Http, Redirect]),
        ],
    )
}

pub(crate) fn create(g: ServiceGroup) -> Command {
    Command::CreateGroup { group: g }
}

pub(crate) fn patch(id: &str, patch: Patch) -> Command {
    Command::PatchGroup {
        id: id.into(),
        patch,
    }
}

pub(crate) fn services(op: PatchOp, value: Vec<Service>) -> Patch {
    Patch::Services { op, value }
}

pub(crate) fn domains(op: PatchOp, value: &[&str]) -> Patch {
    Patch::Domains {
        op,
        value: value.iter().map(|d| domain(d)).collect(),
    }
}

pub(crate) fn attach(group: &str, instance: Instance) -> Command {
    Command::AttachInstance {
        group: group.into(),
        instance,
    }
}

pub(crate) fn cert(name: &str) -> Certificate {
    Certificate {
        name: name.into(),
        chain: "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n".into(),
        private_key: "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n".into(),
        not_after: None,
    }
}

/// A state with `web` (443 tls+http, 80 redirect) and `db` (5432 TCP).
pub(crate) fn state() -> State {
    let mut s = State::default();
    for cmd in [
        create(web()),
        create(group(2, "db", vec![svc(5432, 5432, &[])])),
    ] {
        assert!(s.apply(&cmd).is_ok(), "{cmd:?}");
    }
    s
}

/// Applies `cmd`, asserting that a failure leaves the state unchanged.
pub(crate) fn apply(s: &mut State, cmd: &Command) -> Result<Applied, ApplyError> {
    let before = s.clone();
    let r = s.apply(cmd);
    if r.is_err() {
        assert_eq!(*s, before, "failed {cmd:?} changed the state");
    }
    r
}

pub(crate) fn conflict(s: &str) -> Result<Applied, ApplyError> {
    Err(ApplyError::Conflict(s.into()))
}

pub(crate) fn is_invalid(r: &Result<Applied, ApplyError>) -> bool {
    matches!(r, Err(ApplyError::Invalid(_)))
}

pub(crate) fn is_not_found(r: &Result<Applied, ApplyError>) -> bool {
    matches!(r, Err(ApplyError::NotFound(_)))
}
