//! The requests applied lately under [`Command::Once`](crate::command::Command::Once):
//! the uuids the proposing nodes chose for them, the newest [`KEPT`] in
//! the order they applied, so that one sent again is told apart from a new
//! one.
//!
//! Persistent maps, like the rest of [`State`](super::State): a clone is
//! O(1). Each uuid has a sequence number, its row key in storage
//! (`sm_requests`); the numbers are this node's (a snapshot install numbers
//! them afresh), the order is the log's, so every node evicts the same ones.

use imbl::OrdMap;
use uuid::Uuid;

use crate::changes::Rows;

/// How many request uuids are remembered. A retry comes within a write's
/// 5 s; this many patches or certificates in 5 s is 800 a second.
pub const KEPT: usize = 4096;

/// The remembered request uuids.
#[derive(Clone, Debug, Default)]
pub(crate) struct Requests {
    by_seq: OrdMap<u64, Uuid>,
    seq_of: OrdMap<Uuid, u64>,
}

/// Equal when they remember the same uuids in the same order: the
/// sequence numbers are each node's own.
impl PartialEq for Requests {
    fn eq(&self, other: &Self) -> bool {
        self.by_seq.values().eq(other.by_seq.values())
    }
}

impl Eq for Requests {}

impl Requests {
    /// Remembers `uuids` in this order (from a snapshot or storage).
    pub(crate) fn from_ordered(uuids: impl IntoIterator<Item = Uuid>) -> Self {
        let mut requests = Self::default();
        for uuid in uuids {
            requests.push(uuid, &mut Rows::default());
        }
        requests
    }

    /// Remembers `uuids` under their stored sequence numbers.
    pub(crate) fn from_rows(rows: impl IntoIterator<Item = (u64, Uuid)>) -> Result<Self, String> {
        let mut requests = Self::default();
        for (seq, uuid) in rows {
            if requests.seq_of.insert(uuid, seq).is_some() {
                return Err(format!("request {uuid} stored twice"));
            }
            requests.by_seq.insert(seq, uuid);
        }
        if requests.by_seq.len() > KEPT {
            return Err(format!(
                "{} requests stored, more than {KEPT}",
                requests.by_seq.len()
            ));
        }
        Ok(requests)
    }

    /// Whether `uuid` was applied lately.
    pub(crate) fn contains(&self, uuid: &Uuid) -> bool {
        self.seq_of.contains_key(uuid)
    }

    /// Remembers `uuid` (not remembered yet), forgetting the oldest past
    /// [`KEPT`]; notes the rows written in `rows`.
    pub(crate) fn push(&mut self, uuid: Uuid, rows: &mut Rows) {
        let seq = self.by_seq.get_max().map_or(0, |(seq, _)| seq + 1);
        self.by_seq.insert(seq, uuid);
        self.seq_of.insert(uuid, seq);
        rows.requests.insert(seq);
        while self.by_seq.len() > KEPT {
            let Some((oldest, gone)) = self.by_seq.get_min().map(|(s, u)| (*s, *u)) else {
                break;
            };
            self.by_seq.remove(&oldest);
            self.seq_of.remove(&gone);
            rows.requests.insert(oldest);
        }
    }

    /// The uuid stored under `seq`, if any.
    pub(crate) fn at(&self, seq: u64) -> Option<Uuid> {
        self.by_seq.get(&seq).copied()
    }

    /// The uuids with their sequence numbers, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, Uuid)> + '_ {
        self.by_seq.iter().map(|(s, u)| (*s, *u))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_seq.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_by_the_uuids_order_whatever_their_numbers() {
        let u = |n| Uuid::from_u128(n);
        let here = Requests::from_rows([(0, u(1)), (1, u(2))]).unwrap();
        let there = Requests::from_rows([(7, u(1)), (9, u(2))]).unwrap();
        assert_eq!(here, there);
        assert_eq!(here, Requests::from_ordered([u(1), u(2)]));
        assert_ne!(here, Requests::from_ordered([u(2), u(1)]));
        assert!(Requests::from_rows([(0, u(1)), (1, u(1))]).is_err());
    }
}
