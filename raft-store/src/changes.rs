//! What changed between applied states: [`Changed`] and the short history
//! behind [`AppliedState::changed_since`](crate::AppliedState::changed_since).
//!
//! Every applied batch notes the rows it wrote ([`Rows`]: group uuids,
//! certificate names, the cluster secrets). The state machine persists
//! exactly those rows, and keeps the last [`KEPT`] batches' [`Changed`] in
//! a persistent vector shared by every published state, so a reader that
//! rebuilt from the state at index `i` can ask what to rebuild now. A
//! reader further behind than the history (or behind a snapshot install)
//! is told to rebuild everything.

use std::collections::BTreeSet;
use std::sync::Arc;

use uuid::Uuid;

/// How many applied batches the history keeps. A reader falls that far
/// behind only when it is starved for hundreds of batches; it then
/// rebuilds everything, which is correct, just slower.
pub(crate) const KEPT: usize = 1024;

/// What changed between two applied states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Groups created, patched, deleted or whose instances changed (by uuid).
    pub groups: BTreeSet<Uuid>,
    /// The names of the certificates added, replaced or removed.
    pub certificates: BTreeSet<String>,
    /// The cluster secrets changed.
    pub cluster: bool,
}

impl Changed {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.certificates.is_empty() && !self.cluster
    }

    fn merge(&mut self, other: &Self) {
        self.groups.extend(other.groups.iter().copied());
        self.certificates.extend(other.certificates.iter().cloned());
        self.cluster |= other.cluster;
    }
}

/// The rows a batch of commands wrote: what to persist, and what readers
/// are told changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rows {
    pub(crate) groups: BTreeSet<Uuid>,
    pub(crate) certificates: BTreeSet<String>,
    pub(crate) cluster: bool,
    /// Request uuids remembered or forgotten, by sequence number (nothing
    /// a reader rebuilds by).
    pub(crate) requests: BTreeSet<u64>,
}

impl Rows {
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
            && self.certificates.is_empty()
            && !self.cluster
            && self.requests.is_empty()
    }

    /// The rows either names.
    pub(crate) fn merged(mut self, other: Self) -> Self {
        self.groups.extend(other.groups);
        self.certificates.extend(other.certificates);
        self.cluster |= other.cluster;
        self.requests.extend(other.requests);
        self
    }

    pub(crate) fn changed(&self) -> Changed {
        Changed {
            groups: self.groups.clone(),
            certificates: self.certificates.clone(),
            cluster: self.cluster,
        }
    }
}

/// One applied batch: it covers the indexes after the previous batch's
/// `to` (or the history's `floor`) up to `to`.
#[derive(Clone, Debug)]
struct Batch {
    to: u64,
    changed: Arc<Changed>,
}

/// The changes of the last [`KEPT`] batches that changed something.
/// Cloning is O(1); every published state holds its own version.
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    /// Changes after this index are all in `batches`.
    floor: u64,
    /// In index order; batches that changed nothing are left out.
    batches: imbl::Vector<Batch>,
}

impl History {
    /// An empty history for a state applied up to `index` with nothing
    /// known about how it came to be (at startup, after a snapshot install).
    pub(crate) fn starting_at(index: u64) -> Self {
        Self {
            floor: index,
            batches: imbl::Vector::new(),
        }
    }

    /// The history after a batch up to index `to` that changed `changed`.
    pub(crate) fn push(&self, to: u64, changed: Changed) -> Self {
        let mut next = self.clone();
        if changed.is_empty() {
            return next;
        }
        next.batches.push_back(Batch {
            to,
            changed: Arc::new(changed),
        });
        while next.batches.len() > KEPT {
            if let Some(dropped) = next.batches.pop_front() {
                next.floor = dropped.to;
            }
        }
        next
    }

    /// What changed after index `since` up to `index` (the index of the
    /// state holding this history); `None` when the history does not reach
    /// back that far or `since` is ahead of `index`.
    pub(crate) fn since(&self, since: u64, index: u64) -> Option<Changed> {
        if since < self.floor || since > index {
            return None;
        }
        let mut changed = Changed::default();
        for batch in self.batches.iter().rev() {
            if batch.to <= since {
                break;
            }
            changed.merge(&batch.changed);
        }
        Some(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(ids: &[u128]) -> Changed {
        Changed {
            groups: ids.iter().map(|&i| Uuid::from_u128(i)).collect(),
            ..Changed::default()
        }
    }

    #[test]
    fn since_unions_the_batches_after_the_index() {
        let h = History::starting_at(3)
            .push(5, groups(&[1]))
            .push(6, Changed::default())
            .push(
                8,
                Changed {
                    certificates: ["c".to_owned()].into(),
                    ..groups(&[2])
                },
            );
        assert_eq!(h.since(8, 8), Some(Changed::default()));
        assert_eq!(
            h.since(5, 8),
            Some(Changed {
                certificates: ["c".to_owned()].into(),
                ..groups(&[2])
            })
        );
        assert_eq!(
            h.since(3, 8),
            Some(Changed {
                certificates: ["c".to_owned()].into(),
                ..groups(&[1, 2])
            })
        );
        // Inside a batch: the whole batch counts (a superset is safe).
        assert_eq!(h.since(4, 8).unwrap().groups, groups(&[1, 2]).groups);
        assert_eq!(h.since(2, 8), None);
        assert_eq!(h.since(9, 8), None);
    }

    #[test]
    fn dropping_old_batches_raises_the_floor() {
        let mut h = History::starting_at(0);
        for i in 1..=(KEPT as u64 + 10) {
            h = h.push(i, groups(&[u128::from(i)]));
        }
        let last = KEPT as u64 + 10;
        assert_eq!(h.since(9, last), None);
        assert_eq!(h.since(10, last).unwrap().groups.len(), KEPT);
        // An older version is untouched by later pushes.
        let old = History::starting_at(0).push(1, groups(&[1]));
        let _newer = old.push(2, groups(&[2]));
        assert_eq!(old.since(0, 1), Some(groups(&[1])));
    }
}
