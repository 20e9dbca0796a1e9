//! `/v1/services/{id}/instances[/{instance}]`: attach, list, detach.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use edgelb_api::services::{AttachRequest, InstanceState, InstanceView, InstancesData, LoadView};
use hyper::body::Incoming;
use raft_store::command::Command;
use raft_store::model::Instance;
use raft_store::state::Applied;
use raft_store::validate::valid_address;
use uuid::Uuid;

use super::groups::{check_name, not_found};
use super::reply::{ApiError, Reply, success};
use super::request::read_json;
use super::{Admin, names, unexpected};
use crate::balancer::{Backend, BackendState};
use crate::routing::GroupRuntime;

/// Attempts at a generated name that the group has not given yet.
const NAME_ATTEMPTS: usize = 16;

/// `POST /v1/services/{id}/instances`: answers the attached instance (up,
/// no load yet).
pub(crate) async fn attach(admin: &Admin, id: &str, body: Incoming) -> Result<Reply, ApiError> {
    let req: AttachRequest = read_json(body).await?;
    let state = admin.store.state();
    let group = state.group(id).ok_or_else(|| not_found(id))?;
    let name = match req.name {
        Some(name) => {
            check_name("instance", &name)?;
            name
        }
        None => {
            let mut rng = rand::rng();
            let mut name = names::instance_name(&mut rng, &group.name);
            for _ in 1..NAME_ATTEMPTS {
                if group.instances.iter().all(|i| i.name != name) {
                    break;
                }
                name = names::instance_name(&mut rng, &group.name);
            }
            name
        }
    };
    if !valid_address(&req.address) {
        return Err(ApiError::invalid(format!(
            "instance address {:?} is not an IP address or host name (no port, no brackets)",
            req.address
        )));
    }
    let cmd = Command::AttachInstance {
        // By uuid: a group deleted and re-created under the same name since
        // the lookup above is not the one the name was generated for.
        group: group.uuid.to_string(),
        instance: Instance {
            uuid: Uuid::new_v4(),
            name,
            address: req.address,
        },
    };
    match admin.store.propose(cmd).await? {
        Applied::Attached { instance, .. } => Ok(one(view(&instance, None, None, Instant::now()))),
        other => Err(unexpected(&other)),
    }
}

/// `GET /v1/services/{id}/instances`: each instance with this node's view
/// of its state and load: `local` is this node's exact count, `peers` each
/// fresh peer's estimated part, `global` their sum (what selection uses).
/// An instance that the data plane has not picked up yet shows as up with
/// no load. Detached instances that this node still has work in flight to
/// follow, `draining`, with that work as their load, until it ends.
pub(crate) fn list(admin: &Admin, id: &str) -> Result<Reply, ApiError> {
    let state = admin.store.state();
    let group = state.group(id).ok_or_else(|| not_found(id))?;
    let table = admin.dataplane.routes.load();
    let runtime = table.group(&group.uuid);
    let now = Instant::now();
    let parts = runtime.map(|r| admin.gossip.peer_parts(r, now));
    let listed: HashSet<Uuid> = group.instances.iter().map(|i| i.uuid).collect();
    let instances = group
        .instances
        .iter()
        .map(|i| view(i, live(runtime, i), part(parts.as_ref(), i), now))
        .chain(
            runtime
                .into_iter()
                .flat_map(|r| r.draining())
                // A table newer than `state` (a detach applied between the
                // two reads) lists the instance above already.
                .filter(|b| !listed.contains(&b.uuid))
                .map(|b| draining_view(&b)),
        )
        .collect();
    Ok(success(InstancesData { instances }))
}

/// A detached instance still draining on this node: its own work in flight
/// is all its load (peers stop reporting it once they drop it).
fn draining_view(backend: &Backend) -> InstanceView {
    let local = backend.local_inflight();
    InstanceView {
        uuid: backend.uuid,
        name: backend.name.clone(),
        address: backend.address.clone(),
        state: InstanceState::Draining,
        load: LoadView {
            local,
            global: local,
            peers: BTreeMap::new(),
        },
    }
}

/// `DELETE /v1/services/{id}/instances/{instance}`: answers the detached
/// instance, draining, with the load it still carries.
pub(crate) async fn detach(admin: &Admin, id: &str, instance: &str) -> Result<Reply, ApiError> {
    let state = admin.store.state();
    // Hold the runtime from before the detach: the data plane drops the
    // backend from its table once it sees the new state.
    let table = admin.dataplane.routes.load();
    let runtime = state.group(id).and_then(|g| table.group(&g.uuid)).cloned();
    let cmd = Command::DetachInstance {
        group: id.to_owned(),
        instance: instance.to_owned(),
    };
    match admin.store.propose(cmd).await? {
        Applied::Detached { instance, .. } => {
            let now = Instant::now();
            let parts = runtime.as_ref().map(|r| admin.gossip.peer_parts(r, now));
            let live = live(runtime.as_ref(), &instance);
            let mut v = view(&instance, live, part(parts.as_ref(), &instance), now);
            v.state = InstanceState::Draining;
            Ok(one(v))
        }
        other => Err(unexpected(&other)),
    }
}

fn one(view: InstanceView) -> Reply {
    success(InstancesData {
        instances: vec![view],
    })
}

/// The live backend of `instance`, if the runtime has it.
fn live<'a>(runtime: Option<&'a Arc<GroupRuntime>>, instance: &Instance) -> Option<&'a Backend> {
    Some(runtime?.backends.get(&instance.uuid)?.as_ref())
}

/// The peers' parts of `instance`'s load, from the group's parts.
fn part<'a>(
    parts: Option<&'a HashMap<Uuid, BTreeMap<u64, u64>>>,
    instance: &Instance,
) -> Option<&'a BTreeMap<u64, u64>> {
    parts?.get(&instance.uuid)
}

fn view(
    instance: &Instance,
    live: Option<&Backend>,
    peers: Option<&BTreeMap<u64, u64>>,
    now: Instant,
) -> InstanceView {
    let (state, load) = match live {
        Some(backend) => {
            let local = backend.local_inflight();
            let peers: BTreeMap<String, u64> = peers
                .into_iter()
                .flatten()
                .map(|(id, n)| (id.to_string(), *n))
                .collect();
            // The peer load that selection uses, split by peer.
            let remote: u64 = peers.values().sum();
            (
                match backend.state(now) {
                    BackendState::Up => InstanceState::Up,
                    BackendState::Down => InstanceState::Down,
                    BackendState::Draining => InstanceState::Draining,
                },
                LoadView {
                    local,
                    global: local.saturating_add(remote),
                    peers,
                },
            )
        }
        None => (InstanceState::Up, LoadView::default()),
    };
    InstanceView {
        uuid: instance.uuid,
        name: instance.name.clone(),
        address: instance.address.clone(),
        state,
        load,
    }
}
