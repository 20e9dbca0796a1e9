//! The selection structure: a segment tree over a group's instance slots.
//!
//! Every node holds the minimum key below it and how many leaves carry that
//! minimum. The root therefore knows the minimum load of the whole group and
//! the size of the tie set; [`MinTree::pick`] draws one index in
//! `0..tie_count` and walks down to the leaf with that rank among the
//! minimum leaves, so the choice is uniform over the tie set with one random
//! number and `log2(n)` steps. An update rewrites one leaf and the nodes on
//! its path to the root.
//!
//! ```text
//!                 (1, 3)                 min key 1, held by 3 leaves
//!           /              \
//!        (1, 2)          (1, 1)
//!       /      \        /      \
//!    (1,1)   (1,1)   (2,1)   (1,1)
//!    [ 1 ]   [ 1 ]   [ 2 ]   [ 1 ]       leaves: keys of slots 0..4
//! ```
//!
//! Plain data: no locks, no clock, no I/O. The caller (the group balancer)
//! owns the lock and decides what a key means; [`key`] is the encoding it
//! uses.

use rand::Rng;

/// Added to the load of an instance that is passively marked down.
///
/// Larger than any load that [`key`] lets through, so a down instance is never
/// in the minimum set while one instance is up, and when every instance is
/// down the minimum is taken over all of them, as the rule asks. Loads are
/// fixed point (`gossip::LOAD_ONE` = 1), so this is 2^46 whole requests.
pub(crate) const DOWN_PENALTY: u64 = 1 << 62;

/// Tree key for an instance with `load` (fixed point) in flight: loads are
/// clamped below [`DOWN_PENALTY`], which is added when the instance is down.
pub(crate) fn key(load: u64, down: bool) -> u64 {
    let load = load.min(DOWN_PENALTY - 1);
    if down { load + DOWN_PENALTY } else { load }
}

/// The load that a key was built from (the inverse of [`key`] up to clamping).
pub(crate) fn load_of(key: u64) -> u64 {
    key % DOWN_PENALTY
}

/// One tree node: the minimum key below it and how many leaves hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Node {
    min: u64,
    count: usize,
}

impl Node {
    /// Padding leaf beyond the last slot: never part of a minimum set.
    const EMPTY: Self = Self {
        min: u64::MAX,
        count: 0,
    };

    fn leaf(key: u64) -> Self {
        Self { min: key, count: 1 }
    }

    fn join(left: Self, right: Self) -> Self {
        match left.min.cmp(&right.min) {
            std::cmp::Ordering::Less => left,
            std::cmp::Ordering::Greater => right,
            std::cmp::Ordering::Equal => Self {
                min: left.min,
                count: left.count + right.count,
            },
        }
    }
}

/// Minimum-with-multiplicity segment tree over `len` slots.
///
/// Implicit binary heap layout: the root is `nodes[1]`, the children of `i`
/// are `2i` and `2i + 1`, the leaf of slot `s` is `nodes[width + s]` where
/// `width` is `len` rounded up to a power of two.
#[derive(Clone, Debug)]
pub(crate) struct MinTree {
    len: usize,
    width: usize,
    nodes: Vec<Node>,
}

impl MinTree {
    /// Builds the tree over `keys` (slot `s` gets the `s`-th key) in O(n).
    pub(crate) fn from_keys(keys: impl IntoIterator<Item = u64>) -> Self {
        let leaves: Vec<Node> = keys.into_iter().map(Node::leaf).collect();
        let len = leaves.len();
        let width = len.max(1).next_power_of_two();
        let mut nodes = vec![Node::EMPTY; 2 * width];
        nodes[width..width + len].copy_from_slice(&leaves);
        for i in (1..width).rev() {
            nodes[i] = Node::join(nodes[2 * i], nodes[2 * i + 1]);
        }
        Self { len, width, nodes }
    }

    /// Number of slots.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The key of `slot`, if there is such a slot.
    #[cfg(test)]
    pub(crate) fn get(&self, slot: usize) -> Option<u64> {
        (slot < self.len).then(|| self.nodes[self.width + slot].min)
    }

    /// The minimum key and how many slots hold it; `None` when empty.
    pub(crate) fn min(&self) -> Option<(u64, usize)> {
        let root = self.nodes[1];
        (root.count > 0).then_some((root.min, root.count))
    }

    /// Sets the key of `slot` and fixes the path to the root: O(log n).
    /// A slot out of range is ignored.
    pub(crate) fn set(&mut self, slot: usize, key: u64) {
        self.put(slot, Node::leaf(key));
    }

    /// Takes `slot` out of every minimum set for good (until the next
    /// [`MinTree::set`] of it): O(log n). A slot out of range is ignored.
    pub(crate) fn clear(&mut self, slot: usize) {
        self.put(slot, Node::EMPTY);
    }

    fn put(&mut self, slot: usize, leaf: Node) {
        if slot >= self.len {
            return;
        }
        let mut i = self.width + slot;
        if self.nodes[i] == leaf {
            return;
        }
        self.nodes[i] = leaf;
        while i > 1 {
            i /= 2;
            let joined = Node::join(self.nodes[2 * i], self.nodes[2 * i + 1]);
            if self.nodes[i] == joined {
                // Nothing above can change either.
                break;
            }
            self.nodes[i] = joined;
        }
    }

    /// Picks a slot uniformly at random among those with the minimum key and
    /// returns it with that key; `None` when there are no slots. O(log n),
    /// one random draw.
    pub(crate) fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<(usize, u64)> {
        let (min, count) = self.min()?;
        let rank = if count == 1 {
            0
        } else {
            rng.random_range(0..count)
        };
        Some((self.descend(min, rank), min))
    }

    /// The slot of the `rank`-th leaf (left to right) holding `min`, which
    /// must be the root's minimum with `rank` below the root's count.
    fn descend(&self, min: u64, mut rank: usize) -> usize {
        let mut i = 1;
        while i < self.width {
            let left = self.nodes[2 * i];
            // Invariant: nodes[i].min == min and rank < nodes[i].count, so
            // when the left child does not hold the rank, the right child
            // holds the minimum and the remaining rank.
            if left.min == min && rank < left.count {
                i *= 2;
            } else {
                if left.min == min {
                    rank -= left.count;
                }
                i = 2 * i + 1;
            }
        }
        i - self.width
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::{MinTree, key, load_of};
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn naive_min(keys: &[u64]) -> Option<(u64, usize)> {
        let min = *keys.iter().min()?;
        Some((min, keys.iter().filter(|&&k| k == min).count()))
    }

    /// Pearson's chi-square statistic of `observed` against a uniform spread.
    pub(in crate::balancer) fn chi_square(observed: &[u64]) -> f64 {
        let total: u64 = observed.iter().sum();
        let expected = total as f64 / observed.len() as f64;
        observed
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum()
    }

    /// 99.9 % quantile of chi-square with 4 degrees of freedom.
    pub(in crate::balancer) const CHI2_DF4_P999: f64 = 18.47;

    #[test]
    fn empty_tree_picks_nothing() {
        let tree = MinTree::from_keys([]);
        assert_eq!(tree.len(), 0);
        assert_eq!(tree.min(), None);
        assert_eq!(tree.pick(&mut SmallRng::seed_from_u64(1)), None);
    }

    #[test]
    fn single_slot() {
        let mut tree = MinTree::from_keys([7]);
        assert_eq!(tree.pick(&mut SmallRng::seed_from_u64(1)), Some((0, 7)));
        tree.set(0, 3);
        assert_eq!(tree.min(), Some((3, 1)));
        tree.set(1, 0); // out of range: ignored
        assert_eq!(tree.get(1), None);
        assert_eq!(tree.min(), Some((3, 1)));
    }

    #[test]
    fn key_encoding() {
        assert_eq!(load_of(key(5, false)), 5);
        assert_eq!(load_of(key(5, true)), 5);
        assert!(key(0, true) > key(u64::MAX, false));
        assert!(key(1, true) > key(0, true));
    }

    #[test]
    fn all_down_takes_min_over_all() {
        let keys = [key(3, true), key(1, true), key(2, true), key(1, true)];
        let tree = MinTree::from_keys(keys);
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..100 {
            let (slot, k) = tree.pick(&mut rng).unwrap();
            assert!(slot == 1 || slot == 3);
            assert_eq!(load_of(k), 1);
        }
    }

    #[test]
    fn down_instances_are_skipped_while_one_is_up() {
        let keys = [key(0, true), key(9, false), key(0, true)];
        let tree = MinTree::from_keys(keys);
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..100 {
            assert_eq!(tree.pick(&mut rng).map(|p| p.0), Some(1));
        }
    }

    /// The tie set is spread unevenly over the tree (3 of 5 in the left half
    /// of a 16-wide tree, 11 slots), so a walk that splits ties 50/50 per
    /// node is as wrong as a leftmost pick, and both fail the bound.
    #[test]
    fn ties_are_uniform() {
        let mut keys = vec![5u64; 11];
        let tied = [0usize, 3, 4, 9, 10];
        for &s in &tied {
            keys[s] = 2;
        }
        let tree = MinTree::from_keys(keys);
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        let draws = 40_000;
        let mut hits = [0u64; 5];
        for _ in 0..draws {
            let (slot, key) = tree.pick(&mut rng).unwrap();
            assert_eq!(key, 2);
            let pos = tied.iter().position(|&s| s == slot).unwrap();
            hits[pos] += 1;
        }
        let stat = chi_square(&hits);
        assert!(stat < CHI2_DF4_P999, "chi-square {stat} for {hits:?}");

        // The bound has power: a 50/50 split per node, a leftmost pick and a
        // 2:1 bias between two tied slots are all rejected.
        let halving = {
            let mut h = [0u64; 5];
            for _ in 0..draws {
                let mut i = 1;
                while i < tree.width {
                    let (l, r) = (tree.nodes[2 * i], tree.nodes[2 * i + 1]);
                    i = if l.min < r.min || (l.min == r.min && rng.random_bool(0.5)) {
                        2 * i
                    } else {
                        2 * i + 1
                    };
                }
                let slot = i - tree.width;
                h[tied.iter().position(|&s| s == slot).unwrap()] += 1;
            }
            h
        };
        assert!(chi_square(&halving) > CHI2_DF4_P999, "{halving:?}");
        assert!(chi_square(&[draws, 0, 0, 0, 0]) > CHI2_DF4_P999);
        let biased = [10_667, 5_333, 8_000, 8_000, 8_000];
        assert!(chi_square(&biased) > CHI2_DF4_P999);
    }

    fn keys_strategy() -> impl Strategy<Value = Vec<u64>> {
        // Small loads so that ties are common; some instances down.
        prop::collection::vec((0u64..6, prop::bool::weighted(0.3)), 0..70)
            .prop_map(|v| v.into_iter().map(|(l, d)| key(l, d)).collect())
    }

    proptest! {
        #[test]
        fn pick_returns_a_minimum_leaf(
            keys in keys_strategy(),
            updates in prop::collection::vec((0usize..80, 0u64..6, any::<bool>()), 0..40),
            seed in any::<u64>(),
        ) {
            let mut keys = keys;
            let mut tree = MinTree::from_keys(keys.iter().copied());
            let mut rng = SmallRng::seed_from_u64(seed);
            // The first round checks the built tree, later ones each update.
            let rounds = std::iter::once(None).chain(updates.into_iter().map(Some));
            for update in rounds {
                if let Some((slot, load, down)) = update {
                    if let Some(k) = keys.get_mut(slot) {
                        *k = key(load, down);
                    }
                    tree.set(slot, key(load, down));
                }
                prop_assert_eq!(tree.min(), naive_min(&keys));
                for _ in 0..4 {
                    match tree.pick(&mut rng) {
                        None => prop_assert!(keys.is_empty()),
                        Some((slot, k)) => {
                            prop_assert_eq!(Some(k), keys.iter().copied().min());
                            prop_assert_eq!(keys[slot], k);
                        }
                    }
                }
            }
        }

        #[test]
        fn every_minimum_leaf_is_reachable(keys in keys_strategy()) {
            // Walking every rank reaches each minimum leaf exactly once.
            let tree = MinTree::from_keys(keys.iter().copied());
            if let Some((min, count)) = tree.min() {
                let seen: Vec<usize> = (0..count).map(|rank| tree.descend(min, rank)).collect();
                let expect: Vec<usize> = keys
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| **k == min)
                    .map(|(s, _)| s)
                    .collect();
                prop_assert_eq!(seen, expect);
            }
        }
    }
}
