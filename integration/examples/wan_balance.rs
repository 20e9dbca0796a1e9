//! Balance across regions with and without the estimator (a measurement
//! tool, not a test; the short version is in `tests/gossip`).
//!
//! ```text
//!   cargo run --release -p integration --example wan_balance -- \
//!       [SECONDS] [RUNS] [RATE] [MODES] [FIRST_SEED] [SHARES] [INSTANCES] [LONG]
//! ```
//!
//! 3 regions × 2 real nodes behind the link emulator, one-way delays of 20
//! / 50 / 80 ms between the regions (see `integration::wan`). For each of
//! `RUNS` seeds from `FIRST_SEED` (defaults 2 and 1) it runs `SECONDS`
//! (default 60) of arrivals in each mode of `MODES` and prints the time
//! average of the true global max / mean in-flight count, and each mode
//! paired with the first of its group (block by block: a mean difference,
//! its standard error and their ratio, z). Modes are `local`, `predictive`
//! (the estimator), `raw` and `decay`; `a,b` runs them one after the other,
//! `a+b` side by side (one cluster each, every arrival sent to all at
//! once), `a/b` in interleaved rounds of 1.25 s (one cluster busy at a time,
//! as `tests/gossip` does); default `local/predictive`. `RATE` is arrivals
//! per second (default 100), `SHARES` six percentages of the arrivals per
//! node (default 40,25,15,10,6,4), `INSTANCES` (default 4), `LONG` the
//! share of 1 s requests (default 0.1; the others take 100 ms).

use std::time::Duration;

use anyhow::Context;
use integration::wan::{Mode, Options, Paired, Rounds, SHARES, compare, interleave};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: f64| -> anyhow::Result<f64> {
        args.get(i)
            .map_or(Ok(default), |a| a.parse().context("not a number"))
    };
    let (secs, runs, rate) = (arg(1, 60.0)?, arg(2, 2.0)? as u64, arg(3, 100.0)?);
    let first = arg(5, 1.0)? as u64;
    let shares = match args.get(6) {
        None => SHARES,
        Some(list) => {
            let v: Vec<f64> = list
                .split(',')
                .map(|x| x.parse::<f64>().map(|p| p / 100.0))
                .collect::<Result<_, _>>()
                .context("SHARES: six percentages")?;
            v.try_into()
                .map_err(|_| anyhow::anyhow!("SHARES: six percentages"))?
        }
    };
    let instances = arg(7, 4.0)? as usize;
    let long_share = arg(8, 0.1)?;
    let spec = args.get(4).map_or("local/predictive", String::as_str);
    println!(
        "| seed | arrivals/s | modes | mode | mean in flight per instance | max/mean | paired with the first: mean ± stderr (z) | failed |"
    );
    println!("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |");
    for seed in first..first + runs {
        let opts = Options {
            shares,
            rate,
            long_share,
            instances,
            warmup: Duration::from_secs(3),
            measure: Duration::from_secs_f64(secs),
            seed,
        };
        // Groups run one after the other; the modes of a group side by side
        // or interleaved.
        for group in spec.split(',') {
            let interleaved = group.contains('/');
            let modes: Vec<Mode> = group
                .split(['+', '/'])
                .map(str::parse)
                .collect::<anyhow::Result<_>>()?;
            let outcomes = if interleaved {
                let length = Duration::from_millis(1250);
                let rounds = Rounds {
                    count: (secs / length.as_secs_f64()).ceil() as u64,
                    length,
                    settle: Duration::from_millis(250),
                };
                interleave(&modes, &opts, &rounds).await?
            } else {
                compare(&modes, &opts).await?
            };
            for o in &outcomes {
                let paired = Paired::new(&outcomes[0], o);
                println!(
                    "| {seed} | {rate:.0} | {group} | {:?} | {:.2} | {:.3} | {:+.3} ± {:.3} ({:+.1}) | {} of {} |",
                    o.mode,
                    o.mean_inflight,
                    o.max_over_mean,
                    paired.mean,
                    paired.stderr,
                    paired.z(),
                    o.failed,
                    o.requests
                );
                if let Some(why) = &o.first_failure {
                    eprintln!("{:?}: first failure: {why}", o.mode);
                }
            }
        }
    }
    Ok(())
}
