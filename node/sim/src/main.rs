//! `edgelb-sim`: the load-gossip simulator (see the `edgelb_sim` library).
//!
//! `cargo run --release -p edgelb-sim` runs every strategy on
//! every scenario, the fault scenario, the oracles on the edge fleet and
//! the grid of requirement (b), and
//! writes `docs/gossip-sim.md` and `docs/gossip-sim.png` (about 10 minutes
//! on two cores; `--quick` takes under a minute, with rougher figures).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use edgelb_sim::{grid, plot, report, suite};

#[derive(Debug, Parser)]
#[command(about = "Simulates balancing with gossiped load and writes the report")]
struct Args {
    /// Seeds per strategy and scenario (results are averaged).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Scales every scenario's simulated duration.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Where gossip-sim.md and gossip-sim.png are written.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// TrueType font for the plot's text (default: DejaVu Sans if installed).
    #[arg(long)]
    font: Option<String>,
    /// Worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Simulated seconds per grid cell and seed (after 1 s of warm-up).
    #[arg(long, default_value_t = 8.0)]
    grid_seconds: f64,
    /// Seeds per grid cell.
    #[arg(long, default_value_t = 3)]
    grid_seeds: u64,
    /// A short, rougher run for iterating: one seed, a quarter of the
    /// durations, 2 s per grid cell (overrides the options above).
    #[arg(long)]
    quick: bool,
    /// Runs only the scenarios (of the suite and the grid) whose name
    /// contains this, with central, local only and the default estimator
    /// at 5 ms, and prints a line per scenario; writes nothing.
    #[arg(long)]
    only: Option<String>,
    /// Runs only the oracles on the edge fleet and prints their table
    /// (what reports of an age could give at best); writes nothing. Before
    /// `--only`, which it overrides.
    #[arg(long)]
    oracles: bool,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.seeds = 1;
        args.scale = 0.25;
        args.grid_seconds = 2.0;
        args.grid_seeds = 1;
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let started = Instant::now();
    if args.oracles {
        let rows = suite::run_oracles(args.seeds, args.scale, threads);
        print!("{}", report::oracles(&rows, args.seeds, args.scale));
        eprintln!("simulated in {:.1} s", started.elapsed().as_secs_f64());
        return ExitCode::SUCCESS;
    }
    if let Some(only) = &args.only {
        let grid = grid::scenarios(args.grid_seconds);
        let picked: Vec<_> = suite::scenarios(args.scale)
            .into_iter()
            .chain(grid)
            .filter(|s| s.name.contains(only.as_str()))
            .collect();
        for (sc, line) in suite::compare(&picked, args.seeds, threads) {
            println!("{}: {line}", sc.name);
        }
        eprintln!("simulated in {:.1} s", started.elapsed().as_secs_f64());
        return ExitCode::SUCCESS;
    }
    let scenarios = suite::scenarios(args.scale);
    let results = suite::run_all(&scenarios, args.seeds, threads);
    eprintln!("scenarios: {:.1} s", started.elapsed().as_secs_f64());
    let faults = grid::run_faults(args.seeds, threads);
    eprintln!("faults: {:.1} s", started.elapsed().as_secs_f64());
    let oracles = suite::run_oracles(args.seeds, args.scale, threads);
    eprintln!("oracles: {:.1} s", started.elapsed().as_secs_f64());
    let cells = grid::run(args.grid_seconds, args.grid_seeds, threads);
    let elapsed = started.elapsed();
    let run = report::GridRun {
        seconds: args.grid_seconds,
        seeds: args.grid_seeds,
    };
    let report = report::markdown(
        &results, args.seeds, &cells, run, &faults, &oracles, args.scale,
    );
    print!("{report}");
    eprintln!(
        "simulated in {:.1} s on {threads} threads",
        elapsed.as_secs_f64()
    );

    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("edgelb-sim: {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let md = args.out.join("gossip-sim.md");
    if let Err(e) = std::fs::write(&md, &report) {
        eprintln!("edgelb-sim: {}: {e}", md.display());
        return ExitCode::FAILURE;
    }
    let text = plot::load_font(args.font.as_deref());
    if !text {
        eprintln!("edgelb-sim: no font found (try --font); plotting without text");
    }
    let png = args.out.join("gossip-sim.png");
    match plot::render(&results, text).map(|bytes| std::fs::write(&png, bytes)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("edgelb-sim: {}: {e}", png.display());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("edgelb-sim: {e}");
            return ExitCode::FAILURE;
        }
    }
    eprintln!("wrote {} and {}", md.display(), png.display());
    ExitCode::SUCCESS
}
