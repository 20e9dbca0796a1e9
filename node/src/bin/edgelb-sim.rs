//! `edgelb-sim`: the load-gossip simulator (see `edgelb::sim`).
//!
//! `cargo run --release -p edgelb --bin edgelb-sim` runs every strategy on
//! every scenario and writes `docs/gossip-sim.md` and `docs/gossip-sim.png`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use edgelb::sim::{plot, report, suite};

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let started = Instant::now();
    let scenarios = suite::scenarios(args.scale);
    let results = suite::run_all(&scenarios, args.seeds, threads);
    let elapsed = started.elapsed();
    let report = report::markdown(&results, args.seeds);
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
