//! `/v1/services` and `/v1/services/{id}`: service groups.

use edgelb_api::services::{
    CreateGroupRequest, DomainRequest, GroupsData, PatchRequest, PatchValue, resolve_patch,
};
use hyper::body::Incoming;
use raft_store::command::{Command, Patch};
use raft_store::model::{DEFAULT_HARD_LIMIT, Domain, PatchOp, ServiceGroup};
use raft_store::state::Applied;
use raft_store::validate::{valid_fqdn, valid_name};
use uuid::Uuid;

use super::reply::{ApiError, Reply, success};
use super::request::read_json;
use super::{Admin, names, unexpected};

/// Attempts at a generated name that no group has yet.
const NAME_ATTEMPTS: usize = 16;

/// `POST /v1/services`.
pub(crate) async fn create(admin: &Admin, body: Incoming) -> Result<Reply, ApiError> {
    let req: CreateGroupRequest = read_json(body).await?;
    let state = admin.store.state();
    let name = match req.name {
        Some(name) => {
            check_name("service group", &name)?;
            name
        }
        None => {
            let mut rng = rand::rng();
            let mut name = names::group_name(&mut rng);
            for _ in 1..NAME_ATTEMPTS {
                if state.group(&name).is_none() {
                    break;
                }
                name = names::group_name(&mut rng);
            }
            name
        }
    };
    let domains = match req.domains {
        Some(domains) => to_domains(&domains)?,
        None => to_domains(&[DomainRequest {
            name: format!("{name}.{}", admin.cluster_domain),
            certificate: None,
        }])?,
    };
    let group = ServiceGroup {
        uuid: Uuid::new_v4(),
        name,
        domains,
        services: req.services,
        hard_limit: req.hard_limit.unwrap_or(DEFAULT_HARD_LIMIT),
        instances: Vec::new(),
        created_at: now_rfc3339()?,
        persistent: true,
        health_check: req.health_check.map(Box::new),
        send_proxy_protocol: req.send_proxy_protocol,
    };
    let ports: Vec<u16> = group.services.iter().map(|s| s.port).collect();
    check_port_budget(admin, &state, None, &ports)?;
    match admin.store.propose(Command::CreateGroup { group }).await? {
        Applied::Group(g) => Ok(one(g)),
        other => Err(unexpected(&other)),
    }
}

/// `GET /v1/services`, encoded on the blocking pool: about 11 MB of JSON
/// at 100,000 instances, hundreds of ms that would otherwise hold a runtime
/// thread (and the writes waiting for it).
pub(crate) async fn list(admin: &Admin) -> Result<Reply, ApiError> {
    let state = admin.store.state();
    tokio::task::spawn_blocking(move || {
        success(GroupsData {
            service_groups: state.groups().cloned().collect(),
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing the service groups: {e}"),
        )
    })
}

/// `GET /v1/services/{id}`.
pub(crate) fn get(admin: &Admin, id: &str) -> Result<Reply, ApiError> {
    let state = admin.store.state();
    let group = state.group(id).ok_or_else(|| not_found(id))?;
    Ok(one(group.clone()))
}

/// `PATCH /v1/services/{id}`.
pub(crate) async fn patch(admin: &Admin, id: &str, body: Incoming) -> Result<Reply, ApiError> {
    let req: PatchRequest = read_json(body).await?;
    let resolved = resolve_patch(req)?;
    if let PatchValue::Services(op @ (PatchOp::Set | PatchOp::Add), services) = &resolved {
        let state = admin.store.state();
        // A group not found is the state machine's to answer.
        if let Some(group) = state.group(id) {
            let mut ports: Vec<u16> = services.iter().map(|s| s.port).collect();
            if *op == PatchOp::Add {
                ports.extend(group.services.iter().map(|s| s.port));
            }
            check_port_budget(admin, &state, Some(group), &ports)?;
        }
    }
    let patch = match resolved {
        PatchValue::Services(op, value) => Patch::Services { op, value },
        PatchValue::Domains(op, value) => Patch::Domains {
            op,
            value: to_domains(&value)?,
        },
        PatchValue::HardLimit(n) => Patch::HardLimit(n),
        PatchValue::HealthCheck(check) => Patch::HealthCheck(check.map(Box::new)),
        PatchValue::SendProxyProtocol(version) => Patch::SendProxyProtocol(version),
    };
    let cmd = Command::PatchGroup {
        id: id.to_owned(),
        patch,
    };
    match admin.store.propose(cmd).await? {
        Applied::Group(g) => Ok(one(g)),
        other => Err(unexpected(&other)),
    }
}

/// 409 when the group (`group`, or a new one) publishing `ports` would
/// make the cluster publish more distinct ports than this node binds
/// (`max_published_ports`): every node with that limit would leave the
/// rest unbound and answer `/readyz` with 503. Only growth is refused.
fn check_port_budget(
    admin: &Admin,
    state: &raft_store::State,
    group: Option<&ServiceGroup>,
    ports: &[u16],
) -> Result<(), ApiError> {
    let max = admin.dataplane.settings.max_published_ports;
    let uuid = group.map(|g| &g.uuid);
    let now = state.published_ports();
    let mut wanted: Vec<u16> = ports.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    // The group's own ports it gives up that no other group publishes.
    let freed = group.map_or(0, |g| {
        let mut own: Vec<u16> = g.services.iter().map(|s| s.port).collect();
        own.sort_unstable();
        own.dedup();
        own.iter()
            .filter(|p| wanted.binary_search(p).is_err() && !state.publishes(**p, uuid))
            .count()
    });
    let added = wanted
        .iter()
        .filter(|&&p| !state.publishes(p, None))
        .count();
    let after = now - freed + added;
    if after > max && after > now {
        return Err(ApiError::new(
            http::StatusCode::CONFLICT,
            format!(
                "the cluster would publish {after} ports; this node binds at most {max} \
                 (max_published_ports), and would leave the rest unbound"
            ),
        ));
    }
    Ok(())
}

/// `DELETE /v1/services/{id}[?force=true]`.
pub(crate) async fn delete(admin: &Admin, id: &str, force: bool) -> Result<Reply, ApiError> {
    let cmd = Command::DeleteGroup {
        id: id.to_owned(),
        force,
    };
    match admin.store.propose(cmd).await? {
        Applied::Deleted(g) => Ok(one(g)),
        other => Err(unexpected(&other)),
    }
}

fn one(group: ServiceGroup) -> Reply {
    success(GroupsData {
        service_groups: vec![group],
    })
}

pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::new(
        http::StatusCode::NOT_FOUND,
        format!("service group {id:?} not found"),
    )
}

/// 400 unless `name` follows the naming rule and does not read as a uuid:
/// `{id}` in a route is a uuid or a name, tried as a uuid first, so such a
/// name would reach another group or instance (whose uuid it is) or none.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if !valid_name(name) {
        return Err(ApiError::invalid(format!(
            "{what} name {name:?} is not valid: use a-z, 0-9 and '-', 1-63 chars, starting with a letter"
        )));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(ApiError::invalid(format!(
            "{what} name {name:?} is not valid: it reads as a uuid, and routes take a uuid \
             before a name"
        )));
    }
    Ok(())
}

/// The stored form of request domains, each checked to be a valid host name.
pub(crate) fn to_domains(requests: &[DomainRequest]) -> Result<Vec<Domain>, ApiError> {
    requests
        .iter()
        .map(|r| {
            let d = r.to_domain();
            if valid_fqdn(&d.fqdn) {
                Ok(d)
            } else {
                Err(ApiError::invalid(format!(
                    "domain {:?} is not a valid host name",
                    r.name
                )))
            }
        })
        .collect()
}

/// Now in RFC 3339, whole seconds, UTC.
fn now_rfc3339() -> Result<String, ApiError> {
    crate::store::now_rfc3339().map_err(|e| {
        ApiError::new(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("formatting the time: {e}"),
        )
    })
}
