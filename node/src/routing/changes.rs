//! What a routing update has to redo.

use std::collections::BTreeSet;

use raft_store::state::State;
use uuid::Uuid;

/// What changed between the state of the published table and the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Unknown: every group and port is rebuilt (the runtime of what stays
    /// is still reused).
    All,
    /// Only these groups (by uuid) were created, patched, deleted or had
    /// instances attached or detached.
    Groups(BTreeSet<Uuid>),
    /// These groups, and the certificates of these names were added or
    /// replaced: besides the groups, every group with a domain that names
    /// one of them is rebuilt, its host names' keys taken anew (a scan of
    /// the groups' domains, where a rebuild of everything cost 57 ms at
    /// 100,000 instances, `benches/routing.rs` `rebuild_all`).
    Certificates {
        groups: BTreeSet<Uuid>,
        names: BTreeSet<String>,
    },
}

impl From<Option<raft_store::Changed>> for Changes {
    /// What the state machine reports (`AppliedState::changed_since`):
    /// `None` (history too short, a snapshot installed) rebuilds
    /// everything; cluster secrets do not route.
    fn from(changed: Option<raft_store::Changed>) -> Self {
        match changed {
            Some(c) if c.certificates.is_empty() => Self::Groups(c.groups),
            Some(c) => Self::Certificates {
                groups: c.groups,
                names: c.certificates,
            },
            None => Self::All,
        }
    }
}

/// What changed from `prev` (the state the published table was built
/// from; `None` before the first) to `state`, found by comparing the two
/// group by group: O(groups). The node asks the state machine instead
/// (`AppliedState::changed_since`); this is for states built by hand
/// (tests, benchmarks).
pub fn changes(prev: Option<&State>, state: &State) -> Changes {
    let Some(prev) = prev else {
        return Changes::All;
    };
    let mut names: BTreeSet<String> = BTreeSet::new();
    for c in state.certificates() {
        if prev.certificate(&c.name) != Some(c) {
            names.insert(c.name.clone());
        }
    }
    for c in prev.certificates() {
        if state.certificate(&c.name).is_none() {
            names.insert(c.name.clone());
        }
    }
    let mut groups = BTreeSet::new();
    for g in state.groups() {
        if by_uuid(prev, &g.uuid).is_none_or(|old| old != g) {
            groups.insert(g.uuid);
        }
    }
    for g in prev.groups() {
        if by_uuid(state, &g.uuid).is_none() {
            groups.insert(g.uuid);
        }
    }
    if names.is_empty() {
        Changes::Groups(groups)
    } else {
        Changes::Certificates { groups, names }
    }
}

/// The group of `state` with this uuid.
pub(super) fn by_uuid<'a>(
    state: &'a State,
    uuid: &Uuid,
) -> Option<&'a raft_store::model::ServiceGroup> {
    let mut text = Uuid::encode_buffer();
    state
        .group(uuid.hyphenated().encode_lower(&mut text))
        .filter(|g| g.uuid == *uuid)
}
