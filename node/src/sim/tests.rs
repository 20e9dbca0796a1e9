use std::time::Duration;

use gossip::Estimator;

use super::{Scenario, Strategy, run};

/// SPEC's 10-node setup, short enough for a debug build.
fn ten_nodes_short(seconds: u64) -> Scenario {
    Scenario {
        name: "smoke".into(),
        duration: Duration::from_secs(seconds),
        warmup: Duration::from_secs(1),
        ..Scenario::ten_nodes()
    }
}

#[test]
fn same_seed_same_outcome() {
    let sc = Scenario {
        duration: Duration::from_millis(1500),
        ..ten_nodes_short(1)
    };
    let strategy = Strategy::gossip(Estimator::Predictive, 20);
    let a = run(&sc, &strategy);
    assert_eq!(a, run(&sc, &strategy));
    assert!(a.completed > 500 && a.reports > 500, "{a:?}");
    let other = Scenario { seed: 2, ..sc };
    assert_ne!(a, run(&other, &strategy));
}

/// The ordering the simulator exists to show, on a short run: the estimator
/// lands between the central balancer and local counts only, and naive
/// gossip herds at 200 ms (worse than local counts only).
#[test]
fn estimator_beats_local_only_and_naive_herds() {
    let sc = ten_nodes_short(8);
    let ratio = |s: Strategy| run(&sc, &s).max_mean;
    let central = ratio(Strategy::Central);
    let local = ratio(Strategy::Local);
    let predictive = ratio(Strategy::gossip(Estimator::Predictive, 50));
    let naive = ratio(Strategy::gossip(Estimator::Raw, 200));
    let all = format!(
        "central {central:.3}, predictive {predictive:.3}, local {local:.3}, naive@200 {naive:.3}"
    );
    assert!(central < predictive, "{all}");
    assert!(predictive < local * 0.95, "{all}");
    assert!(naive > local * 1.05, "{all}");
}
