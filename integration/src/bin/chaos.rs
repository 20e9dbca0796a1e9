//! `chaos`: the fault suite (see `integration::chaos`). Runs `--runs`
//! seeded runs, prints each run's figures and the total, and exits 1 when
//! a check fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use integration::chaos::{Limits, RunOptions, RunReport, describe, failures, run::run, total};

/// Fault suite: clusters behind a link emulator, clients, seeded faults.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Args {
    /// Number of runs.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seed of the first run (run k uses seed + k).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cluster sizes, used in turn.
    #[arg(long, value_delimiter = ',', default_values_t = [3, 5])]
    nodes: Vec<usize>,
    /// Faults per run.
    #[arg(long, default_value_t = 8)]
    faults: usize,
    /// Only these fault kinds (sigkill, sigterm, isolate, split,
    /// one-way-loss, flap, wan-delay); all when absent.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Every link delayed 50–150 ms one way for the whole run.
    #[arg(long)]
    wan: bool,
    /// A line per fault as the run goes.
    #[arg(long, short)]
    verbose: bool,
    /// Concurrent writers.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Limit: new leader p99, in ms. Default 2000, and 3000 with `--wan`:
    /// on links slower than 50 ms one way the acceptance allows the
    /// README's figure for that round trip (2 s up to 300 ms) plus 1 s.
    #[arg(long)]
    election_p99_ms: Option<u64>,
    /// Limit: catch-up after heal or restart p99, in ms.
    #[arg(long, default_value_t = 1000)]
    catchup_p99_ms: u64,
    /// Appends each run's figures to this file (one JSON line per run), so
    /// that a batch made in pieces can be totalled with `--merge`.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Writes every run's node logs to this directory
    /// (`edgelb-chaos-seed-S.log`), not only a failed run's to the temp
    /// dir.
    #[arg(long)]
    logs: Option<std::path::PathBuf>,
    /// Runs nothing: prints each run saved in these files (`--save`) and
    /// their total, judged by the limits.
    #[arg(long, num_args = 1.., conflicts_with = "save")]
    merge: Vec<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.nodes.iter().any(|n| !(3..=9).contains(n)) {
        eprintln!("chaos: --nodes: each size must be 3 to 9");
        return ExitCode::from(64);
    }
    let limits = Limits {
        election_p99: Duration::from_millis(args.election_p99_ms.unwrap_or(if args.wan {
            3000
        } else {
            2000
        })),
        catchup_p99: Duration::from_millis(args.catchup_p99_ms),
        ..Limits::default()
    };
    if !args.merge.is_empty() {
        return merge(&args.merge, &limits);
    }
    let mut reports = Vec::new();
    let mut failed = false;
    for k in 0..args.runs {
        let o = RunOptions {
            run: k,
            seed: args.seed.wrapping_add(k as u64),
            nodes: args.nodes[k % args.nodes.len()],
            faults: args.faults,
            kinds: args.kinds.clone(),
            wan: args.wan,
            writers: args.writers,
            verbose: args.verbose,
        };
        // On SIGINT or SIGTERM the run is dropped, which kills its nodes.
        let r = tokio::select! {
            r = run(&o) => r,
            () = interrupted() => {
                eprintln!("chaos: interrupted; the nodes of run {k} are killed");
                return ExitCode::from(130);
            }
        };
        println!(
            "{}",
            describe(&format!("run {k} (seed {}, {} nodes)", o.seed, o.nodes), &r)
        );
        let why = failures(&r, &limits);
        for f in &why {
            println!("  FAIL: {f}");
        }
        if !why.is_empty() {
            failed = true;
        }
        if !why.is_empty() || args.logs.is_some() {
            let dir = args.logs.clone().unwrap_or_else(std::env::temp_dir);
            let path = dir.join(format!("edgelb-chaos-seed-{}.log", o.seed));
            match std::fs::write(&path, &r.logs) {
                Ok(()) => println!("  nodes' logs: {}", path.display()),
                Err(e) => println!("  nodes' logs not written to {}: {e}", path.display()),
            }
        }
        if let Some(path) = &args.save
            && let Err(e) = save(path, &r)
        {
            eprintln!("chaos: --save {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        reports.push(r);
    }
    if print_total(&reports, &limits) {
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints the total of `reports` and why it fails `limits`; true when it
/// does.
fn print_total(reports: &[RunReport], limits: &Limits) -> bool {
    let t = total(reports);
    println!(
        "{}",
        describe(&format!("total of {} runs", reports.len()), &t)
    );
    let why = failures(&t, limits);
    for f in &why {
        println!("  FAIL: {f}");
    }
    !why.is_empty()
}

/// Appends `r` to `path` as one JSON line.
fn save(path: &std::path::Path, r: &RunReport) -> std::io::Result<()> {
    use std::io::Write as _;
    let line = serde_json::to_string(r).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}

/// `--merge`: the runs saved in `paths`, each and in total.
fn merge(paths: &[std::path::PathBuf], limits: &Limits) -> ExitCode {
    let mut reports = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("chaos: --merge {}: {e}", path.display());
                return ExitCode::from(66);
            }
        };
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<RunReport>(line) {
                Ok(r) => reports.push(r),
                Err(e) => {
                    eprintln!("chaos: --merge {} line {}: {e}", path.display(), n + 1);
                    return ExitCode::from(65);
                }
            }
        }
    }
    let mut failed = false;
    for r in &reports {
        println!(
            "{}",
            describe(
                &format!("run {} (seed {}, {} nodes)", r.run, r.seed, r.nodes),
                r
            )
        );
        for f in failures(r, limits) {
            failed = true;
            println!("  FAIL: {f}");
        }
    }
    if print_total(&reports, limits) || failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No signal handling: never resolves, the run goes on.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
