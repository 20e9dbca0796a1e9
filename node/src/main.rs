//! The `edgelb` binary: load the configuration, start tracing, run the node
//! until SIGTERM or Ctrl-C, drain, exit. A bad configuration exits with 64,
//! a corrupt file in the data dir with 65, a failed storage with 74.

use std::process::ExitCode;

use clap::Parser;
use edgelb::app::{self, StartError};
use edgelb::config::{Args, Config, EXIT_CONFIG, LogFormat};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// mimalloc: glibc malloc's cost per allocation grew with the heap (a
/// third of the extra CPU per write at 100,000 instances, README
/// "Benchmarks", the scale example); the library and its tests keep the
/// system allocator. Data-plane workers give emptied pages back once a
/// second (`edgelb_alloc::collect`), and the process runs without
/// transparent huge pages (`edgelb_alloc::no_transparent_huge_pages`).
#[global_allocator]
static ALLOCATOR: edgelb_alloc::MiMalloc = edgelb_alloc::MiMalloc;

fn main() -> ExitCode {
    // Before the node allocates much: a page faulted in keeps its size.
    // Only a refusal of the kernel's is reported, once tracing is up.
    let huge_pages = edgelb_alloc::no_transparent_huge_pages();
    // Everything the node writes (keys, token, Raft state) is for its own
    // user only: files 0600, directories 0700.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Resolved now: after a package upgrade replaced the file, this path
    // names the new binary, which SIGUSR2 starts (`Upgrader`).
    let upgrader = Upgrader::of_this_process();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let mut config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgelb: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let filter = match EnvFilter::try_new(log_filter(&config.log)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("edgelb: config: log: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Err(error) = huge_pages {
        tracing::warn!(%error, "could not turn transparent huge pages off; idle connections cost more memory");
    }
    // Before any port is bound, and before the runtime's threads start.
    let explicit = edgelb::limits::Explicit {
        max_connections: config.max_connections_explicit,
        max_published_ports: config.max_published_ports_explicit,
    };
    if let Err(e) = edgelb::limits::fit_open_files(&mut config.settings, explicit) {
        eprintln!("edgelb: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgelb: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (code, end) = runtime.block_on(run(config, upgrader));
    // Blocking work left (the storage seals, a storage call of a Raft that
    // was stopped) may finish until the stop's deadline, then the exit
    // goes on without it: it must not hang on a busy disk. A file left
    // unsealed is repaired at the next start.
    let left = end.map_or(EXIT_WAIT_MAX, |e| {
        e.saturating_duration_since(tokio::time::Instant::now())
    });
    let began = std::time::Instant::now();
    runtime.shutdown_timeout(left.clamp(EXIT_WAIT_MIN, EXIT_WAIT_MAX));
    tracing::info!(
        waited_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
        "exiting"
    );
    code
}

/// Bounds of the exit's wait for leftover blocking work.
const EXIT_WAIT_MIN: std::time::Duration = std::time::Duration::from_millis(20);
const EXIT_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// The tracing filter for `log`: openraft logs every failed replication
/// RPC as an error, which the cluster transport already reports once per
/// peer going away and coming back, so that target is off unless `log`
/// names it.
fn log_filter(log: &str) -> String {
    if log.contains("openraft::replication") {
        log.to_owned()
    } else {
        format!("{log},openraft::replication=off")
    }
}

/// Runs the node; the exit code and, after a graceful stop, the deadline
/// for leftover blocking work.
async fn run(config: Config, upgrader: Upgrader) -> (ExitCode, Option<tokio::time::Instant>) {
    let mut signals = Signals::new();
    // SIGTERM while starting (joining, say) is a clean stop too.
    let node = tokio::select! {
        node = app::start(config) => node,
        () = signals.recv() => {
            tracing::info!("stopped while starting");
            return (ExitCode::SUCCESS, None);
        }
    };
    let mut node = match node {
        Ok(n) => n,
        Err(StartError::Config(e)) => {
            eprintln!("edgelb: {e}");
            return (ExitCode::from(EXIT_CONFIG as u8), None);
        }
        Err(StartError::Corrupt(e)) => {
            eprintln!("edgelb: {e}");
            return (ExitCode::from(edgelb::health::EXIT_CORRUPT), None);
        }
        Err(e) => {
            eprintln!("edgelb: {e}");
            return (ExitCode::FAILURE, None);
        }
    };
    if node.token_generated {
        // Printed once, at the first start; it is kept in the data dir.
        println!(
            "edgelb: admin token (saved in the data dir): {}",
            node.token
        );
    }
    // The line that scripts wait for comes once the data plane serves the
    // state (what /readyz answers 200 for, unless a published port cannot
    // be bound: /readyz names it), not merely once the process runs.
    let health = node.health.clone();
    tokio::select! {
        () = node.ready() => {}
        () = signals.recv() => {
            let end = node.shutdown().await;
            return (ExitCode::SUCCESS, Some(end));
        }
        reason = health.failed() => return failed(node, &reason).await,
    }
    if node.upgrading() {
        // systemd learns the new main process before the old one goes.
        if let Err(e) = edgelb::systemd::ready_as_main().await {
            tracing::warn!(error = %e, "telling systemd the new main process");
        }
        if let Err(e) = node.took_over().await {
            tracing::warn!(error = %e, "telling the old process that this one serves");
        }
        println!("edgelb: took over the sockets (pid {})", std::process::id());
    } else if let Err(e) = edgelb::systemd::ready() {
        tracing::warn!(error = %e, "telling systemd that the node is ready");
    }
    println!("edgelb: admin API on http://{}", node.admin_addr);
    let offer = match node.offer_upgrades() {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, "no zero-downtime upgrade for this node");
            None
        }
    };
    let mut code = ExitCode::SUCCESS;
    // After a hand-over the service goes on in the new process: systemd
    // must not hear that it stops.
    let mut handed_over = false;
    loop {
        tokio::select! {
            signal = signals.recv_or_upgrade() => match signal {
                Wanted::Stop => break,
                Wanted::Upgrade => upgrader.start(),
            },
            reason = health.failed() => return failed(node, &reason).await,
            incoming = next_upgrade(offer.as_ref()) => {
                let pid = incoming.pid;
                // Until the release this node is whole: a stop abandons
                // the hand-over, as does a new process that goes away.
                tokio::select! {
                    sent = node.send_sockets(&incoming) => if let Err(e) = sent {
                        tracing::warn!(pid, error = %e, "upgrade abandoned: this process serves on");
                        continue;
                    },
                    () = signals.recv() => break,
                }
                node.release_control().await;
                tokio::select! {
                    ready = incoming.released() => match ready {
                        Ok(()) => {
                            tracing::info!(pid, "the new process serves: draining");
                            handed_over = true;
                        }
                        Err(e) => {
                            eprintln!("edgelb: the upgrade failed after the control plane stopped ({e}): draining, and exiting for a restart");
                            code = ExitCode::from(edgelb::health::EXIT_STORAGE);
                        }
                    },
                    // Stopped meanwhile: the new process serves or fails
                    // on its own.
                    () = signals.recv() => {}
                }
                break;
            }
        }
    }
    if !handed_over {
        let _ = edgelb::systemd::stopping();
    }
    tracing::info!("shutting down: draining connections");
    let end = node.shutdown().await;
    (code, Some(end))
}

/// The next process that asks to take this one's place, if upgrades are
/// offered.
async fn next_upgrade(offer: Option<&edgelb::upgrade::Offer>) -> edgelb::upgrade::Incoming {
    match offer {
        Some(o) => o.next().await,
        None => std::future::pending().await,
    }
}

/// Starts a new `edgelb` process that takes this one's place (SIGUSR2):
/// the binary at this process's path (the new one, after a package
/// upgrade) with this process's arguments and `--upgrade`. The one-off
/// flags of a first start (`--restore`, `--force-new-cluster`) are left
/// out. It inherits the environment, stdout and stderr.
#[derive(Debug)]
struct Upgrader {
    exe: Option<std::path::PathBuf>,
    args: Vec<std::ffi::OsString>,
}

impl Upgrader {
    /// The binary is the path this process was started by (`argv[0]`,
    /// as systemd's `ExecStart` names it) when that is a path, so that a
    /// deploy that swaps a symlink starts the binary the link names now;
    /// else the running binary's.
    fn of_this_process() -> Self {
        let mut given = std::env::args_os();
        let started_as = given
            .next()
            .map(std::path::PathBuf::from)
            .filter(|p| p.components().count() > 1);
        let mut args = Vec::new();
        while let Some(a) = given.next() {
            match a.to_str() {
                Some("--restore") => {
                    given.next();
                }
                Some(s) if s.starts_with("--restore=") => {}
                Some("--force-new-cluster" | "--upgrade") => {}
                _ => args.push(a),
            }
        }
        args.push("--upgrade".into());
        Self {
            exe: started_as.or_else(|| std::env::current_exe().ok()),
            args,
        }
    }

    fn start(&self) {
        let Some(exe) = &self.exe else {
            tracing::warn!("SIGUSR2: this process's binary path is unknown: no upgrade");
            return;
        };
        tracing::info!(exe = %exe.display(), "SIGUSR2: starting a new process to take over");
        let child = tokio::process::Command::new(exe)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .spawn();
        match child {
            // Reaped here, and its end logged, while this process runs.
            Ok(mut child) => {
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(status) => tracing::warn!(%status, "the new process exited"),
                        Err(e) => tracing::warn!(error = %e, "waiting for the new process"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(exe = %exe.display(), error = %e, "SIGUSR2: starting the new process")
            }
        }
    }
}

/// The Raft core or storage stopped: the node can no longer write. It
/// stops as on SIGTERM (the data plane drains) and exits with 74, so that
/// the service manager starts it again with its storage reopened.
async fn failed(node: app::NodeHandle, reason: &str) -> (ExitCode, Option<tokio::time::Instant>) {
    eprintln!("edgelb: {reason}");
    let end = node.shutdown().await;
    (ExitCode::from(edgelb::health::EXIT_STORAGE), Some(end))
}

/// SIGTERM and Ctrl-C (SIGINT), listened for once for the whole run. A
/// listener made anew at each wait misses a signal that arrives between
/// two waits (after the "admin API on" line, say), and the process, whose
/// default action for it is gone, would not stop.
struct Signals {
    term: Option<Signal>,
    interrupt: Option<Signal>,
    /// SIGUSR1 reopens the access log (`app`); listened for from the
    /// start, so that its default action (ending the process) never
    /// applies, with or without an access log.
    _user1: Option<Signal>,
    /// SIGUSR2 starts a new process that takes this one's place.
    user2: Option<Signal>,
}

impl Signals {
    fn new() -> Self {
        Self {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
            _user1: signal(SignalKind::user_defined1()).ok(),
            user2: signal(SignalKind::user_defined2()).ok(),
        }
    }

    /// The next SIGTERM, SIGINT or SIGUSR2.
    async fn recv_or_upgrade(&mut self) -> Wanted {
        tokio::select! {
            () = next(&mut self.term) => Wanted::Stop,
            () = next(&mut self.interrupt) => Wanted::Stop,
            () = next(&mut self.user2) => Wanted::Upgrade,
        }
    }

    /// The next SIGTERM or SIGINT (one received while nobody waited
    /// counts).
    async fn recv(&mut self) {
        tokio::select! {
            () = next(&mut self.term) => {}
            () = next(&mut self.interrupt) => {}
        }
    }
}

/// What a signal asks for.
enum Wanted {
    /// SIGTERM, SIGINT.
    Stop,
    /// SIGUSR2.
    Upgrade,
}

async fn next(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
