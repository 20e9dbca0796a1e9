//! `edgectl`: parse the command line, run the command, print a failure as
//! one line (`edgectl: <message>`) and exit with its code (see
//! [`ops::error`]).

use std::process::ExitCode;

use clap::Parser;
use ops::cli::Cli;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2 (0 for --help).
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgectl: starting the runtime: {e}");
            return ExitCode::from(ops::error::EXIT_LOCAL);
        }
    };
    match runtime.block_on(ops::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            for line in failure.lines() {
                eprintln!("edgectl: {line}");
            }
            ExitCode::from(failure.exit_code())
        }
    }
}
