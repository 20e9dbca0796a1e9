//! [`Patch`] semantics: `set` replaces a list, `add` appends entries whose
//! key is not there yet, `del` removes entries by key (`port` for services,
//! `fqdn` for domains). The result is checked by the caller like a new group.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use super::ApplyError;
use crate::command::{Patch, PatchOp};
use crate::model::ServiceGroup;
use crate::validate::{normalise_domains, normalise_services};

/// `group` with `patch` applied (normalised, not yet validated).
pub(super) fn patched(group: &ServiceGroup, patch: &Patch) -> Result<ServiceGroup, ApplyError> {
    let mut g = group.clone();
    match patch {
        Patch::Services { op, value } => {
            let mut value = value.clone();
            normalise_services(&mut value);
            g.services = combine(
                &group.services,
                *op,
                value,
                |s| s.port,
                |s| format!("port {}", s.port),
                &group.name,
            )?;
        }
        Patch::Domains { op, value } => {
            let mut value = value.clone();
            normalise_domains(&mut value);
            g.domains = combine(
                &group.domains,
                *op,
                value,
                |d| d.fqdn.clone(),
                |d| format!("domain {:?}", d.fqdn),
                &group.name,
            )?;
        }
        Patch::HardLimit(limit) => g.hard_limit = *limit,
        Patch::HealthCheck(check) => g.health_check.clone_from(check),
        Patch::SendProxyProtocol(version) => g.send_proxy_protocol = *version,
    }
    Ok(g)
}

/// Whether `group` already shows what an `add` or `del` of `patch` does:
/// every entry an `add` names is there as given, no key a `del` names is
/// there. A retry of such a patch whose first try took effect is refused
/// ([`refused_as_done`]) and finds its change this way. A `set` (or a
/// value) is never refused for being done: it applies again.
pub(super) fn shown(group: &ServiceGroup, patch: &Patch) -> bool {
    match patch {
        Patch::Services { op, value } => {
            let mut value = value.clone();
            normalise_services(&mut value);
            holds(&group.services, *op, &value, |s| s.port)
        }
        Patch::Domains { op, value } => {
            let mut value = value.clone();
            normalise_domains(&mut value);
            holds(&group.domains, *op, &value, |d| d.fqdn.clone())
        }
        Patch::HardLimit(_) | Patch::HealthCheck(_) | Patch::SendProxyProtocol(_) => false,
    }
}

/// Whether `refused`, the refusal of `patch`, is the one a first try that
/// took effect leaves a retry: an `add` finding an entry's key there, a
/// `del` finding one gone. Any other refusal (a conflict, a group not
/// found, a rule the result breaks) stands whatever the state shows.
pub(super) fn refused_as_done(patch: &Patch, refused: &ApplyError) -> bool {
    let op = match patch {
        Patch::Services { op, .. } | Patch::Domains { op, .. } => *op,
        _ => return false,
    };
    match (op, refused) {
        (PatchOp::Add, ApplyError::Invalid(m)) => m.contains(ALREADY_IN),
        (PatchOp::Del, ApplyError::NotFound(m)) => m.contains(NOT_IN),
        _ => false,
    }
}

/// What [`combine`]'s refusals of an entry say, between the entry and the
/// group's name.
const ALREADY_IN: &str = " is already in group ";
const NOT_IN: &str = " not found in group ";

/// Whether `current` is what `op` with `value` leaves (see [`shown`]).
fn holds<T: PartialEq, K: Hash + Eq>(
    current: &[T],
    op: PatchOp,
    value: &[T],
    key: impl Fn(&T) -> K,
) -> bool {
    let current: HashMap<K, &T> = current.iter().map(|c| (key(c), c)).collect();
    match op {
        PatchOp::Set => false,
        PatchOp::Add => value
            .iter()
            .all(|v| current.get(&key(v)).is_some_and(|c| *c == v)),
        PatchOp::Del => !value.iter().any(|v| current.contains_key(&key(v))),
    }
}

/// Combines a list with a patch value, entries compared by `key`. Keys are
/// looked up in sets: a group may hold tens of thousands of domains, and a
/// patch may name as many.
fn combine<T: Clone, K: Hash + Eq>(
    current: &[T],
    op: PatchOp,
    value: Vec<T>,
    key: impl Fn(&T) -> K,
    describe: impl Fn(&T) -> String,
    group: &str,
) -> Result<Vec<T>, ApplyError> {
    match op {
        PatchOp::Set => Ok(value),
        PatchOp::Add => {
            let there: HashSet<K> = current.iter().map(&key).collect();
            if let Some(v) = value.iter().find(|v| there.contains(&key(v))) {
                return Err(ApplyError::Invalid(format!(
                    "{}{ALREADY_IN}{group:?}",
                    describe(v)
                )));
            }
            let mut out = current.to_vec();
            out.extend(value);
            Ok(out)
        }
        PatchOp::Del => {
            let there: HashSet<K> = current.iter().map(&key).collect();
            if let Some(v) = value.iter().find(|v| !there.contains(&key(v))) {
                return Err(ApplyError::NotFound(format!(
                    "{}{NOT_IN}{group:?}",
                    describe(v)
                )));
            }
            let gone: HashSet<K> = value.iter().map(&key).collect();
            Ok(current
                .iter()
                .filter(|c| !gone.contains(&key(c)))
                .cloned()
                .collect())
        }
    }
}

#[cfg(test)]
mod tests;
