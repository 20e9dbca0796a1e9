//! Rules between groups (409 Conflict): unique names, fqdns and instance
//! uuids, and port sharing, checked through the state's indexes (see
//! `index`) so their cost does not grow with the number of groups.
//!
//! Port sharing: a listener has one mode, so several groups may publish the
//! same port only if it has `tls` or `http` (routed by SNI / `Host`) in every
//! one of them and the handler sets are identical. A plain TCP port belongs
//! to one group.

use uuid::Uuid;

use super::State;
use crate::model::{Service, ServiceGroup};
use crate::state::ApplyError;
use crate::validate::handlers_label;

/// Checks `group` (new or changed) against every other group, through
/// the state's indexes: its name, then its fqdns, ports and instance
/// uuids in the group's order. A port is compared with the first other
/// group publishing it in name order; all of them have the same handlers.
pub(super) fn check(state: &State, group: &ServiceGroup) -> Result<(), ApplyError> {
    if state
        .named(&group.name)
        .is_some_and(|o| o.uuid != group.uuid)
    {
        return Err(conflict(format!(
            "service group {:?} already exists",
            group.name
        )));
    }
    for d in &group.domains {
        if let Some(other) = state.domain_group(&d.fqdn)
            && other.uuid != group.uuid
        {
            return Err(conflict(format!(
                "domain {:?} already belongs to group {:?}",
                d.fqdn, other.name
            )));
        }
    }
    for s in &group.services {
        let Some(other) = state.port_holder(s.port, &group.uuid) else {
            continue;
        };
        if let Some(o) = other.services.iter().find(|o| o.port == s.port) {
            check_port(s, o, &other.name)?;
        }
    }
    for i in &group.instances {
        if let Some(other) = state.instance_group(&i.uuid)
            && other.uuid != group.uuid
        {
            return Err(conflict(format!(
                "instance uuid {} is already attached to group {:?}",
                i.uuid, other.name
            )));
        }
    }
    Ok(())
}

/// `ours` and `theirs` publish the same port; `holder` names their group.
fn check_port(ours: &Service, theirs: &Service, holder: &str) -> Result<(), ApplyError> {
    let port = ours.port;
    if theirs.handlers.is_empty() {
        return Err(conflict(format!(
            "port {port} is already published by group {holder:?} in TCP mode"
        )));
    }
    if ours.handlers.is_empty() {
        return Err(conflict(format!(
            "port {port} is already published by group {holder:?} ({}); a plain TCP port cannot be shared",
            handlers_label(&theirs.handlers)
        )));
    }
    if ours.handlers != theirs.handlers {
        return Err(conflict(format!(
            "port {port} is published by group {holder:?} with handlers {}; groups sharing a port need the same handlers",
            handlers_label(&theirs.handlers)
        )));
    }
    Ok(())
}

/// An instance uuid is attached nowhere yet (load reports are keyed by it).
pub(super) fn check_instance_uuid(state: &State, uuid: Uuid) -> Result<(), ApplyError> {
    match state.instance_group(&uuid) {
        Some(g) => Err(conflict(format!(
            "instance uuid {uuid} is already attached to group {:?}",
            g.name
        ))),
        None => Ok(()),
    }
}

fn conflict(message: String) -> ApplyError {
    ApplyError::Conflict(message)
}
