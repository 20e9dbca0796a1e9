//! Goodness-of-fit for the balancer's "uniform among ties" rule.

use std::collections::BTreeMap;

/// Pearson's chi-square statistic of `counts` against a uniform expectation.
pub fn chi_square_uniform(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if counts.is_empty() || total == 0 {
        return 0.0;
    }
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| {
            let d = c as f64 - expected;
            d * d / expected
        })
        .sum()
}

/// The chi-square value that a uniform source exceeds with probability
/// 1e-4, for `df` degrees of freedom (1 to 9). A test that fails above it
/// is wrong once in 10,000 runs.
///
/// # Panics
/// For `df` outside 1..=9.
pub fn critical_1e4(df: usize) -> f64 {
    const TABLE: [f64; 9] = [
        15.14, 18.42, 21.11, 23.51, 25.74, 27.86, 29.88, 31.83, 33.72,
    ];
    TABLE[df - 1]
}

/// Counts per key, with every key of `keys` present (zero if never seen).
pub fn tally<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    seen: &[String],
) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = keys.into_iter().map(|k| (k.to_owned(), 0)).collect();
    for s in seen {
        *counts.entry(s.clone()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biased_picks_fail_and_fair_ones_pass() {
        // Leftmost-always.
        assert!(chi_square_uniform(&[400, 0, 0, 0]) > critical_1e4(3));
        // 2:1 in favour of one instance, at its expected counts.
        assert!(chi_square_uniform(&[160, 80, 80, 80]) > critical_1e4(3));
        // 2:1 between two pairs.
        assert!(chi_square_uniform(&[133, 133, 67, 67]) > critical_1e4(3));
        // Ordinary noise.
        assert!(chi_square_uniform(&[110, 95, 92, 103]) < critical_1e4(3));
        assert_eq!(chi_square_uniform(&[]), 0.0);
    }

    #[test]
    fn tally_keeps_unseen_keys() {
        let seen = vec!["a".to_owned(), "a".to_owned(), "c".to_owned()];
        let t = tally(["a", "b"], &seen);
        assert_eq!(t.get("a"), Some(&2));
        assert_eq!(t.get("b"), Some(&0));
        assert_eq!(t.get("c"), Some(&1));
    }
}
