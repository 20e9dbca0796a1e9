//! What a routing update has to redo.

use std::collections::BTreeSet;

use raft_store::state::State;
use uuid::Uuid;

/// What changed between the state of the published table and the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Unknown, or certificates changed: every group and port is rebuilt
    /// (the runtime of what stays is still reused).
    All,
    /// Only these groups (by uuid) were created, patched, deleted or had
    /// instances attached or detached.
    Groups(BTreeSet<Uuid>),
}

impl From<Option<raft_store::Changed>> for Changes {
    /// What the state machine reports (`AppliedState::changed_since`):
    /// `None` (history too short, a snapshot installed) or a certificate
    /// change rebuilds everything; cluster secrets do not route.
    fn from(changed: Option<raft_store::Changed>) -> Self {
        match changed {
            Some(c) if !c.certificates => Self::Groups(c.groups),
            _ => Self::All,
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
    if !prev.certificates().eq(state.certificates()) {
        return Changes::All;
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
    Changes::Groups(groups)
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
