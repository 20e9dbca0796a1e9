//! The real `edgelb` binary as a child process.
//!
//! `CARGO_BIN_EXE_edgelb` exists only inside the `edgelb` package, so the
//! binary is found next to the running test executable
//! (`target/<profile>/deps/<test>` or `target/<profile>/chaos` →
//! `target/<profile>/edgelb`) and built
//! once per test process with `cargo build --bin edgelb` (a no-op when it is
//! up to date). Only processes started here are ever signalled.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::within;

static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The path of an up-to-date `edgelb` binary of the test's profile.
pub fn edgelb_bin() -> anyhow::Result<PathBuf> {
    BINARY
        .get_or_init(build)
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Where the running test's build lives: the workspace, the target dir,
/// the profile's dir and the profile's name.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) workspace: PathBuf,
    pub(crate) target_dir: PathBuf,
    pub(crate) profile_dir: PathBuf,
    pub(crate) profile: String,
}

impl Layout {
    /// The layout of the running test executable.
    pub(crate) fn of_current_exe() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        // target/<profile>/deps/<test-binary>, target/<profile>/examples/<example>,
        // or target/<profile>/<binary> for the harness's own binaries (chaos).
        let profile_dir = exe
            .parent()
            .and_then(|p| {
                if p.file_name()
                    .is_some_and(|n| n == "deps" || n == "examples")
                {
                    p.parent()
                } else {
                    Some(p)
                }
            })
            .ok_or_else(|| format!("unexpected test binary location {}", exe.display()))?;
        let target_dir = profile_dir
            .parent()
            .ok_or_else(|| format!("unexpected test binary location {}", exe.display()))?;
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or("integration crate has no parent directory")?;
        Ok(Self {
            workspace: workspace.to_owned(),
            target_dir: target_dir.to_owned(),
            profile_dir: profile_dir.to_owned(),
            profile: profile.to_owned(),
        })
    }

    /// `cargo build --quiet --target-dir <target dir> <profile> extra…` in
    /// `cwd`, without the variables Cargo gives the running test.
    pub(crate) fn cargo_build(&self, cwd: &Path, extra: &[&str]) -> std::process::Command {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = std::process::Command::new(cargo);
        // Cargo gives the running test its package's variables; build scripts
        // (ring's) track some of them, so passing them on would rebuild half the
        // dependency graph here and again in the next ordinary cargo command.
        for (key, _) in std::env::vars_os() {
            let Some(k) = key.to_str() else { continue };
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_BIN_EXE_")
                || matches!(
                    k,
                    "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                cmd.env_remove(&key);
            }
        }
        cmd.current_dir(cwd)
            .args(["build", "--quiet"])
            .args(extra)
            .arg("--target-dir")
            .arg(&self.target_dir);
        match self.profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        cmd
    }
}

fn build() -> Result<PathBuf, String> {
    let layout = Layout::of_current_exe()?;
    let out = layout
        .cargo_build(&layout.workspace, &["-p", "edgelb", "--bin", "edgelb"])
        .output()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --bin edgelb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bin = layout
        .profile_dir
        .join(format!("edgelb{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} missing after cargo build", bin.display()))
    }
}

/// What a finished `edgelb` run produced.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `edgelb args…` to completion (bounded) in `cwd`.
pub async fn run(args: &[&str], cwd: &Path, timeout: Duration) -> anyhow::Result<Finished> {
    run_with_env(args, &[], cwd, timeout).await
}

/// [`run`] with `EDGELB_*` variables set (none are inherited).
pub async fn run_with_env(
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
    timeout: Duration,
) -> anyhow::Result<Finished> {
    let mut cmd = command(args, cwd).await?;
    cmd.envs(env.iter().copied());
    finish(cmd, timeout).await
}

/// Runs `bin args…` (another build of `edgelb`) to completion (bounded) in
/// `cwd`.
pub async fn run_bin(
    bin: &Path,
    args: &[&str],
    cwd: &Path,
    timeout: Duration,
) -> anyhow::Result<Finished> {
    finish(command_of(bin, args, cwd), timeout).await
}

async fn finish(mut cmd: Command, timeout: Duration) -> anyhow::Result<Finished> {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = within("edgelb to exit", timeout, child.wait_with_output()).await??;
    Ok(Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

async fn command(args: &[&str], cwd: &Path) -> anyhow::Result<Command> {
    // The first call builds the binary; keep that off the runtime's workers.
    let bin = tokio::task::spawn_blocking(edgelb_bin).await??;
    Ok(command_of(&bin, args, cwd))
}

fn command_of(bin: &Path, args: &[&str], cwd: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // The environment must not configure the node behind the test's back.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("EDGELB_")) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A running `edgelb` child. Killed on drop if still running.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: u32,
    stdout_lines: mpsc::UnboundedReceiver<String>,
    stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `edgelb args…` in `cwd`.
    pub async fn spawn(args: &[&str], cwd: &Path) -> anyhow::Result<Self> {
        Self::start(command(args, cwd).await?)
    }

    /// Starts `bin args…` in `cwd`: another build of `edgelb`, such as an
    /// earlier release's ([`crate::compat`]).
    pub async fn spawn_bin(bin: &Path, args: &[&str], cwd: &Path) -> anyhow::Result<Self> {
        Self::start(command_of(bin, args, cwd))
    }

    fn start(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let pid = child.id().context("child has no pid")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut stderr_pipe = child.stderr.take().context("child stderr")?;
        let (tx, stdout_lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut chunk = [0_u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Ok(Self {
            child,
            pid,
            stdout_lines,
            stdout_seen: Vec::new(),
            stderr,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets the stderr seen so far.
    pub fn clear_stderr(&self) {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Waits for a stdout line containing `needle` and returns it.
    pub async fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        if let Some(l) = self.stdout_seen.iter().find(|l| l.contains(needle)) {
            return Ok(l.clone());
        }
        let found = within(&format!("edgelb to print {needle:?}"), timeout, async {
            while let Some(line) = self.stdout_lines.recv().await {
                self.stdout_seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => Ok(line),
            Ok(None) => bail!(
                "edgelb closed stdout without {needle:?}; stderr:\n{}",
                self.stderr()
            ),
            Err(e) => bail!(
                "{e}; stdout so far: {:?}; stderr:\n{}",
                self.stdout_seen,
                self.stderr()
            ),
        }
    }

    /// Sends SIGTERM to this child (and nothing else).
    pub async fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM").await
    }

    /// Sends the signal `name` (`TERM`, `USR1`, …) to this child.
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{name} {} failed: {status}", self.pid);
        }
        Ok(())
    }

    /// Sends SIGKILL to this child (as a crash would) and reaps it.
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        self.child.start_kill().context("kill -9")?;
        self.wait(Duration::from_secs(10)).await
    }

    /// The exit status, if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (bounded) for the child to exit.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let status = within("edgelb to exit", timeout, self.child.wait()).await??;
        Ok(status)
    }
}
