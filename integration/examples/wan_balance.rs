//! Balance across regions with and without the estimator (a measurement
//! tool, not a test; the short version is in `tests/gossip`).
//!
//! ```text
//!   cargo run --release -p integration --example wan_balance -- [SECONDS] [RUNS] [RATE]
//! ```
//!
//! 3 regions × 2 real nodes behind the link emulator, one-way delays of 20
//! / 50 / 80 ms between the regions, arrivals split 40 / 25 / 15 / 10 / 6 /
//! 4 % over the nodes, 90 % of the requests 100 ms long and 10 % 1 s, 6
//! instances (see `integration::wan`). For each of `RUNS` seeds (default
//! 2) it measures `SECONDS` (default 60, after 3 s) with local counts only
//! and with the estimator, on the same arrivals, and prints the time
//! average of the true global max / mean in-flight count.

use std::time::Duration;

use anyhow::Context;
use integration::wan::{Mode, Options, run};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: f64| -> anyhow::Result<f64> {
        std::env::args()
            .nth(i)
            .map_or(Ok(default), |a| a.parse().context("not a number"))
    };
    let (secs, runs, rate) = (arg(1, 60.0)?, arg(2, 2.0)? as u64, arg(3, 120.0)?);
    println!(
        "| seed | arrivals/s | mean in flight per instance | local-only max/mean | estimator max/mean | failed (local / estimator) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | --- |");
    for seed in 1..=runs {
        let opts = Options {
            rate,
            long_share: 0.1,
            instances: 6,
            warmup: Duration::from_secs(3),
            measure: Duration::from_secs_f64(secs),
            seed,
        };
        let local = run(Mode::Local, &opts).await?;
        let estimator = run(Mode::Estimator, &opts).await?;
        println!(
            "| {seed} | {rate:.0} | {:.2} | {:.3} | {:.3} | {} / {} of {} |",
            local.mean_inflight,
            local.max_over_mean,
            estimator.max_over_mean,
            local.failed,
            estimator.failed,
            local.requests
        );
    }
    Ok(())
}
