//! The experiments behind `docs/gossip-sim.md`: every strategy on every
//! scenario, averaged over seeds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gossip::Estimator;

use super::oracle::Knows;
use super::{Outcome, Scenario, Strategy, run};

/// `gossip_min_interval`s compared, in ms (5 is the default).
pub const INTERVALS: [u64; 3] = [5, 20, 50];

/// Estimators compared at every interval.
pub const ESTIMATORS: [Estimator; 3] = [Estimator::Raw, Estimator::Decay, Estimator::Predictive];

/// One scenario's results, in the order of [`strategies`].
#[derive(Clone, Debug)]
pub struct ScenarioResults {
    pub scenario: Scenario,
    pub rows: Vec<(Strategy, Outcome)>,
}

impl ScenarioResults {
    /// The outcome of the strategy labelled `label`.
    pub fn get(&self, label: &str) -> Option<&Outcome> {
        self.rows
            .iter()
            .find(|(s, _)| s.label() == label)
            .map(|(_, o)| o)
    }
}

/// The scenarios of the full run, with durations scaled by `scale`.
pub fn scenarios(scale: f64) -> Vec<Scenario> {
    let all = vec![
        Scenario::reference(),
        Scenario::ten_nodes(),
        Scenario::edge_fleet(),
        Scenario::long_lived(),
    ];
    all.into_iter().map(|s| s.scaled(scale)).collect()
}

/// Central, local only, then every estimator at every interval; on a
/// scenario with long-lived requests also the predictive estimator without
/// the long-lived split, to show requirement (c).
pub fn strategies(scenario: &Scenario) -> Vec<Strategy> {
    let mut all = vec![Strategy::Central, Strategy::Local];
    for interval in INTERVALS {
        for estimator in ESTIMATORS {
            all.push(Strategy::gossip(estimator, interval));
        }
    }
    if scenario.long_fraction > 0.0 {
        all.push(Strategy::Gossip {
            estimator: Estimator::Predictive,
            interval: Duration::from_millis(50),
            long_split: false,
        });
    }
    all
}

/// Runs every strategy of every scenario with `seeds` seeds each (1, 2, …),
/// on up to `threads` threads, and averages over the seeds.
pub fn run_all(scenarios: &[Scenario], seeds: u64, threads: usize) -> Vec<ScenarioResults> {
    let cases: Vec<(Scenario, Vec<Strategy>)> = scenarios
        .iter()
        .map(|sc| (sc.clone(), strategies(sc)))
        .collect();
    run_cases(&cases, 1..=seeds.max(1), threads)
        .into_iter()
        .zip(scenarios)
        .map(|(rows, sc)| ScenarioResults {
            scenario: sc.clone(),
            rows,
        })
        .collect()
}

/// Runs each case's strategies on its scenario with each of `seeds`, on
/// up to `threads` threads; per case, each strategy with its outcome
/// averaged over the seeds (in seed order, so the result does not depend
/// on which thread finished first).
pub fn run_cases(
    cases: &[(Scenario, Vec<Strategy>)],
    seeds: std::ops::RangeInclusive<u64>,
    threads: usize,
) -> Vec<Vec<(Strategy, Outcome)>> {
    run_cases_by_seed(cases, seeds, threads)
        .into_iter()
        .map(|rows| {
            rows.into_iter()
                .map(|(strategy, runs)| (strategy, average(&runs.iter().collect::<Vec<_>>())))
                .collect()
        })
        .collect()
}

/// [`run_cases`] without the averaging: per case, each strategy with its
/// outcome for each seed, in seed order.
pub fn run_cases_by_seed(
    cases: &[(Scenario, Vec<Strategy>)],
    seeds: std::ops::RangeInclusive<u64>,
    threads: usize,
) -> Vec<Vec<(Strategy, Vec<Outcome>)>> {
    let mut jobs = Vec::new();
    for (ci, (_, strategies)) in cases.iter().enumerate() {
        for ti in 0..strategies.len() {
            for seed in seeds.clone() {
                jobs.push((ci, ti, seed));
            }
        }
    }
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(ci, ti, seed)) = jobs.get(i) else {
                        break;
                    };
                    let (scenario, strategies) = &cases[ci];
                    let mut sc = scenario.clone();
                    sc.seed = seed;
                    let outcome = run(&sc, &strategies[ti]);
                    done.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((ci, ti, seed, outcome));
                }
            });
        }
    });
    let mut done = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    done.sort_by_key(|&(ci, ti, seed, _)| (ci, ti, seed));
    cases
        .iter()
        .enumerate()
        .map(|(ci, (_, strategies))| {
            strategies
                .iter()
                .enumerate()
                .map(|(ti, strategy)| {
                    let runs: Vec<Outcome> = done
                        .iter()
                        .filter(|(c, t, _, _)| (*c, *t) == (ci, ti))
                        .map(|(_, _, _, o)| o.clone())
                        .collect();
                    (strategy.clone(), runs)
                })
                .collect()
        })
        .collect()
}

/// The mean of `x` and its standard error (0 with fewer than 2 values).
pub fn mean_se(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n.max(1.0);
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Ages of the oracles' counts, in ms: up to the edge fleet's one-way delay.
pub const ORACLE_AGES: [u64; 4] = [0, 1, 2, 5];

/// Central, local only, the default estimator at 5 ms, then the oracles
/// (`oracle` module): counts only at each of [`ORACLE_AGES`], and at the
/// oldest with the completions or the picks since.
pub fn with_oracles() -> Vec<Strategy> {
    let oracle = |knows, ms| Strategy::Oracle {
        knows,
        age: Duration::from_millis(ms),
    };
    let oldest = ORACLE_AGES[ORACLE_AGES.len() - 1];
    let mut all = vec![
        Strategy::Central,
        Strategy::Local,
        Strategy::gossip(Estimator::default(), 5),
    ];
    all.extend(ORACLE_AGES.iter().map(|&ms| oracle(Knows::Nothing, ms)));
    all.push(oracle(Knows::Completions, oldest));
    all.push(oracle(Knows::Picks, oldest));
    all
}

/// [`with_oracles`] on the edge fleet scaled by `scale`, `seeds` seeds
/// each.
pub fn run_oracles(seeds: u64, scale: f64, threads: usize) -> Vec<(Strategy, Outcome)> {
    let cases = [(Scenario::edge_fleet().scaled(scale), with_oracles())];
    run_cases(&cases, 1..=seeds.max(1), threads)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// Each of `scenarios` with central, local only and the default estimator
/// at 5 ms (in that order).
pub fn against_local(scenarios: &[Scenario]) -> Vec<(Scenario, Vec<Strategy>)> {
    let strategies = vec![
        Strategy::Central,
        Strategy::Local,
        Strategy::gossip(Estimator::default(), 5),
    ];
    scenarios
        .iter()
        .map(|sc| (sc.clone(), strategies.clone()))
        .collect()
}

/// Central, local only and the default estimator at 5 ms on each of
/// `scenarios`, `seeds` seeds each: per scenario, a line with local only and
/// the estimator × central, the estimator's difference from local only
/// with its standard error over the seeds (paired: each seed's runs see the
/// same requests), and the estimator's view error.
pub fn compare(scenarios: &[Scenario], seeds: u64, threads: usize) -> Vec<(Scenario, String)> {
    let cases = against_local(scenarios);
    run_cases_by_seed(&cases, 1..=seeds.max(1), threads)
        .into_iter()
        .zip(scenarios)
        .map(|(rows, sc)| {
            let ratios = |i: usize| -> Vec<f64> {
                let central = rows.first().map_or(&[][..], |(_, r)| r);
                rows.get(i).map_or_else(Vec::new, |(_, runs)| {
                    runs.iter()
                        .zip(central)
                        .map(|(o, c)| o.max_mean / c.max_mean)
                        .collect()
                })
            };
            let (local, est) = (ratios(1), ratios(2));
            let diffs: Vec<f64> = est.iter().zip(&local).map(|(e, l)| e - l).collect();
            let (diff, se) = mean_se(&diffs);
            let central = mean_se(
                &rows
                    .first()
                    .map_or_else(Vec::new, |(_, r)| r.iter().map(|o| o.max_mean).collect()),
            )
            .0;
            let error = rows.get(2).map_or(f64::NAN, |(_, runs)| {
                mean_se(&runs.iter().map(|o| o.view_error).collect::<Vec<_>>()).0
            });
            let line = format!(
                "central {central:.3}, local only {:.3}, estimator {:.3} × central; \
                 difference {diff:+.3} ± {se:.3} (s.e.), view error {error:.2}",
                mean_se(&local).0,
                mean_se(&est).0,
            );
            (sc.clone(), line)
        })
        .collect()
}

fn average(runs: &[&Outcome]) -> Outcome {
    let n = runs.len().max(1) as f64;
    let avg = |f: fn(&Outcome) -> f64| runs.iter().map(|o| f(o)).sum::<f64>() / n;
    let sum =
        |f: fn(&Outcome) -> u64| runs.iter().map(|o| f(o)).sum::<u64>() / runs.len().max(1) as u64;
    Outcome {
        max_mean: avg(|o| o.max_mean),
        mean_latency: avg(|o| o.mean_latency),
        p99_latency: avg(|o| o.p99_latency),
        view_error: avg(|o| o.view_error),
        mean_inflight: avg(|o| o.mean_inflight),
        completed: sum(|o| o.completed),
        refused: sum(|o| o.refused),
        reports: sum(|o| o.reports),
        report_bytes: sum(|o| o.report_bytes),
        lost_reports: sum(|o| o.lost_reports),
        stale_reports: sum(|o| o.stale_reports),
    }
}
