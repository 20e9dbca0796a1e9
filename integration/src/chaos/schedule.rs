//! The seeded fault schedule: which fault, against whom, for how long.
//! Plain code: the plan is drawn from an RNG; who "the leader" is gets
//! resolved when the step runs.

use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom;

/// Whom a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The leader at the time the step runs.
    Leader,
    /// A node other than the leader.
    Follower,
}

/// One kind of fault.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// SIGKILL, restart after the hold.
    Kill(Target),
    /// SIGTERM (exit timed), restart after the hold.
    Term(Target),
    /// Every link to and from the node cut.
    Isolate(Target),
    /// The cluster split in two: the minority side has `n / 2` nodes and
    /// holds the leader or not (2|1 for three nodes, 3|2 for five).
    Split { leader_in_minority: bool },
    /// Datagrams from the node to one peer dropped with this probability
    /// (the other way intact).
    OneWayLoss { from: Target, loss: f64 },
    /// The node's links go down and up every `period`.
    Flap { node: Target, period: Duration },
    /// Every link delayed by its own 50–150 ms one way.
    Wan,
}

impl Fault {
    /// Short name for the report.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kill(_) => "sigkill",
            Self::Term(_) => "sigterm",
            Self::Isolate(_) => "isolate",
            Self::Split { .. } => "split",
            Self::OneWayLoss { .. } => "one-way-loss",
            Self::Flap { .. } => "flap",
            Self::Wan => "wan-delay",
        }
    }
}

/// A fault and how long it lasts before the heal (or restart).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
}

fn target(rng: &mut impl Rng) -> Target {
    if rng.random_bool(0.5) {
        Target::Leader
    } else {
        Target::Follower
    }
}

/// `count` steps drawn from `rng`; `kinds` limits the faults by
/// [`Fault::name`] (all when empty).
pub fn plan(rng: &mut impl Rng, count: usize, kinds: &[String]) -> Vec<Step> {
    let all = [
        "sigkill",
        "sigterm",
        "isolate",
        "split",
        "one-way-loss",
        "flap",
        "wan-delay",
    ];
    let allowed: Vec<&str> = all
        .iter()
        .copied()
        .filter(|k| kinds.is_empty() || kinds.iter().any(|x| x == k))
        .collect();
    let mut steps = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(&kind) = allowed.choose(rng) else {
            break;
        };
        let fault = match kind {
            "sigkill" => Fault::Kill(target(rng)),
            "sigterm" => Fault::Term(target(rng)),
            "isolate" => Fault::Isolate(target(rng)),
            "split" => Fault::Split {
                leader_in_minority: rng.random_bool(0.5),
            },
            "one-way-loss" => Fault::OneWayLoss {
                from: target(rng),
                loss: rng.random_range(0.2..=0.8),
            },
            "flap" => Fault::Flap {
                node: target(rng),
                period: Duration::from_millis(rng.random_range(200..=600)),
            },
            _ => Fault::Wan,
        };
        let hold = Duration::from_millis(rng.random_range(1_500..=4_000));
        steps.push(Step { fault, hold });
    }
    steps
}

/// A one-way delay for a WAN link: 50–150 ms.
pub fn wan_delay(rng: &mut impl Rng) -> Duration {
    Duration::from_millis(rng.random_range(50..=150))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let a = plan(&mut SmallRng::seed_from_u64(9), 20, &[]);
        let b = plan(&mut SmallRng::seed_from_u64(9), 20, &[]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 20);
        let c = plan(&mut SmallRng::seed_from_u64(10), 20, &[]);
        assert_ne!(a, c);
    }

    #[test]
    fn every_kind_shows_up_and_kinds_can_be_limited() {
        let steps = plan(&mut SmallRng::seed_from_u64(1), 200, &[]);
        for k in [
            "sigkill",
            "sigterm",
            "isolate",
            "split",
            "one-way-loss",
            "flap",
            "wan-delay",
        ] {
            assert!(steps.iter().any(|s| s.fault.name() == k), "{k}");
        }
        assert!(steps.iter().all(|s| s.hold >= Duration::from_millis(1_500)));
        let only = plan(&mut SmallRng::seed_from_u64(1), 50, &["isolate".into()]);
        assert!(only.iter().all(|s| s.fault.name() == "isolate"));
        assert!(plan(&mut SmallRng::seed_from_u64(1), 5, &["nope".into()]).is_empty());
    }
}
