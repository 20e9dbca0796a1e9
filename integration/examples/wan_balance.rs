//! Balance across regions with and without the estimator (a measurement
//! tool, not a test; the short version is in `tests/gossip`).
//!
//! ```text
//!   cargo run --release -p integration --example wan_balance -- \
//!       [SECONDS] [RUNS] [RATE] [MODES] [FIRST_SEED]
//! ```
//!
//! 3 regions × 2 real nodes behind the link emulator, one-way delays of 20
//! / 50 / 80 ms between the regions, arrivals split 40 / 25 / 15 / 10 / 6 /
//! 4 % over the nodes, 90 % of the requests 100 ms long and 10 % 1 s, 6
//! instances, `RATE` arrivals per second (default 120; see
//! `integration::wan`). For each of `RUNS` seeds from `FIRST_SEED`
//! (defaults 2 and 1) it measures `SECONDS` (default 60, after 3 s) in each
//! mode of `MODES` on the same arrivals and prints the time average of the
//! true global max / mean in-flight count. Modes are `local`, `predictive`
//! (the estimator), `raw` and `decay`; `a,b` runs them one after the other,
//! `a+b` side by side, one cluster each (default `local,predictive`).

use std::time::Duration;

use anyhow::Context;
use integration::wan::{Mode, Options, compare};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: f64| -> anyhow::Result<f64> {
        args.get(i)
            .map_or(Ok(default), |a| a.parse().context("not a number"))
    };
    let (secs, runs, rate) = (arg(1, 60.0)?, arg(2, 2.0)? as u64, arg(3, 120.0)?);
    let first = arg(5, 1.0)? as u64;
    // Groups run one after the other; the modes of a group side by side.
    let groups: Vec<Vec<Mode>> = args
        .get(4)
        .map_or("local,predictive", String::as_str)
        .split(',')
        .map(|g| g.split('+').map(str::parse).collect())
        .collect::<anyhow::Result<_>>()?;
    println!(
        "| seed | arrivals/s | modes side by side | mode | mean in flight per instance | max/mean | failed |"
    );
    println!("| ---: | ---: | --- | --- | ---: | ---: | ---: |");
    for seed in first..first + runs {
        let opts = Options {
            rate,
            long_share: 0.1,
            instances: 6,
            warmup: Duration::from_secs(3),
            measure: Duration::from_secs_f64(secs),
            seed,
        };
        for group in &groups {
            for o in compare(group, &opts).await? {
                println!(
                    "| {seed} | {rate:.0} | {} | {:?} | {:.2} | {:.3} | {} of {} |",
                    group.len(),
                    o.mode,
                    o.mean_inflight,
                    o.max_over_mean,
                    o.failed,
                    o.requests
                );
            }
        }
    }
    Ok(())
}
