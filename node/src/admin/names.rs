//! Generated names for groups (`word-word-xxxxxxxx`) and instances
//! (`<group>-xxxxx`).

use rand::Rng;
use rand::seq::IndexedRandom;

const ADJECTIVES: [&str; 32] = [
    "amber", "bold", "brave", "bright", "calm", "clever", "crisp", "eager", "fancy", "gentle",
    "happy", "jolly", "keen", "lively", "lucky", "merry", "mighty", "nimble", "noble", "proud",
    "quick", "quiet", "rapid", "shiny", "silent", "steady", "sunny", "swift", "tidy", "vivid",
    "warm", "witty",
];

const NOUNS: [&str; 32] = [
    "badger", "beacon", "canyon", "cedar", "comet", "delta", "falcon", "fern", "harbor", "heron",
    "island", "lagoon", "maple", "meadow", "meteor", "nebula", "otter", "pebble", "pine", "planet",
    "prairie", "quartz", "raven", "river", "summit", "thunder", "tiger", "valley", "willow",
    "wolf", "yarrow", "zephyr",
];

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Longest name the model accepts.
const MAX_NAME: usize = 63;

/// `len` random characters of `[a-z0-9]`.
fn suffix<R: Rng + ?Sized>(rng: &mut R, len: usize) -> String {
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// A group name: two lowercase words and 8 random `[a-z0-9]`,
/// e.g. `quiet-river-x8f2k1ab`.
pub(crate) fn group_name<R: Rng + ?Sized>(rng: &mut R) -> String {
    let adjective = ADJECTIVES.choose(rng).copied().unwrap_or("edge");
    let noun = NOUNS.choose(rng).copied().unwrap_or("group");
    format!("{adjective}-{noun}-{}", suffix(rng, 8))
}

/// An instance name: the group's name (cut so that the result fits in 63
/// characters) and 5 random `[a-z0-9]`, e.g. `quiet-river-x8f2k1ab-3kq9z`.
pub(crate) fn instance_name<R: Rng + ?Sized>(rng: &mut R, group: &str) -> String {
    // Group names are ASCII (validated), so byte indices are char indices;
    // `get` keeps a non-ASCII name from panicking all the same.
    let keep = group.len().min(MAX_NAME - 6);
    let prefix = group.get(..keep).unwrap_or("instance");
    format!("{prefix}-{}", suffix(rng, 5))
}

#[cfg(test)]
mod tests {
    use raft_store::validate::valid_name;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    fn is_suffix(s: &str, len: usize) -> bool {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    }

    #[test]
    fn group_names_follow_the_rule() {
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..1000 {
            let name = group_name(&mut rng);
            assert!(valid_name(&name), "{name}");
            let parts: Vec<&str> = name.split('-').collect();
            assert_eq!(parts.len(), 3, "{name}");
            assert!(ADJECTIVES.contains(&parts[0]), "{name}");
            assert!(NOUNS.contains(&parts[1]), "{name}");
            assert!(is_suffix(parts[2], 8), "{name}");
        }
    }

    #[test]
    fn instance_names_fit() {
        let mut rng = SmallRng::seed_from_u64(7);
        let name = instance_name(&mut rng, "web");
        assert!(
            name.starts_with("web-") && is_suffix(&name[4..], 5),
            "{name}"
        );
        let long = format!("a{}", "b".repeat(62));
        let name = instance_name(&mut rng, &long);
        assert_eq!(name.len(), 63);
        assert!(valid_name(&name), "{name}");
    }
}
