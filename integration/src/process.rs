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

/// [`run`] with `EDGELB_*` variables set (none are inherited, nor
/// `MIMALLOC_*`, nor systemd's `INVOCATION_ID` and `NOTIFY_SOCKET`).
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
    // The environment must not configure the node behind the test's back:
    // neither edgelb's variables nor its allocator's (mimalloc's), nor
    // systemd's when the tests themselves run as a service (a CI
    // runner's), which would change what an upgrade does
    // (`edgelb::systemd`).
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| {
            k.starts_with("EDGELB_")
                || k.to_ascii_uppercase().starts_with("MIMALLOC_")
                || k == "INVOCATION_ID"
                || k == "NOTIFY_SOCKET"
        }) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A running `edgelb` child. Killed on drop if still running.
///
/// After [`Process::upgrade`] it is the process that took over from the
/// child: not a child of the test process, but handed to it when the child
/// exits (the test process is a subreaper) and reaped here by pid. It
/// writes to the child's stdout and stderr.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: u32,
    /// `pid` is the process that took over from `child` (which exited).
    successor: bool,
    stdout_lines: mpsc::UnboundedReceiver<String>,
    stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `edgelb args…` in `cwd`.
    pub async fn spawn(args: &[&str], cwd: &Path) -> anyhow::Result<Self> {
        Self::start(command(args, cwd).await?)
    }

    /// [`Process::spawn`] with `env` set (after the `EDGELB_*` and
    /// `MIMALLOC_*` variables and systemd's `INVOCATION_ID` and
    /// `NOTIFY_SOCKET` are cleared).
    pub async fn spawn_with_env(
        args: &[&str],
        cwd: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        let mut cmd = command(args, cwd).await?;
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::start(cmd)
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
            successor: false,
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
        self.wait_stdout_nth(needle, 1, timeout).await
    }

    /// Waits for the `n`th stdout line containing `needle` and returns it.
    async fn wait_stdout_nth(
        &mut self,
        needle: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let seen = |lines: &[String]| {
            lines
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
                .cloned()
        };
        if let Some(l) = seen(&self.stdout_seen) {
            return Ok(l);
        }
        let found = within(&format!("edgelb to print {needle:?}"), timeout, async {
            while let Some(line) = self.stdout_lines.recv().await {
                self.stdout_seen.push(line);
                if let Some(l) = seen(&self.stdout_seen) {
                    return Some(l);
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
        if self.successor {
            self.signal("KILL").await?;
        } else {
            self.child.start_kill().context("kill -9")?;
        }
        self.wait(Duration::from_secs(10)).await
    }

    /// The exit status, if the child has exited; an error when it cannot
    /// be told (a successor that exited and was reaped by its own parent
    /// has exited, but with a status no one can read any more). A
    /// successor that exited unreaped under a parent still running (a
    /// zombie) still counts as running.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.successor {
            return reap(self.pid);
        }
        self.child
            .try_wait()
            .context("asking whether edgelb exited")
    }

    /// Waits (bounded) for the child to exit.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if self.successor {
            let pid = self.pid;
            return within("edgelb to exit", timeout, async {
                loop {
                    match reap(pid) {
                        Ok(Some(status)) => return Ok(status),
                        Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Err(e) => return Err(e),
                    }
                }
            })
            .await?;
        }
        let status = within("edgelb to exit", timeout, self.child.wait()).await??;
        Ok(status)
    }

    /// A zero-downtime upgrade: sends SIGUSR2, waits until the process it
    /// starts says it took over and this one has exited with 0, and from
    /// then on stands for the new process. Returns its pid.
    pub async fn upgrade(&mut self, timeout: Duration) -> anyhow::Result<u32> {
        // The new process outlives its parent: it comes to the test
        // process then, to be reaped here.
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .context("becoming a subreaper")?;
        let before = self
            .stdout_seen
            .iter()
            .filter(|l| l.contains(TOOK_OVER))
            .count();
        self.signal("USR2").await?;
        let line = self.wait_stdout_nth(TOOK_OVER, before + 1, timeout).await?;
        let pid: u32 = line
            .rsplit("pid ")
            .next()
            .and_then(|p| p.trim_end_matches(')').parse().ok())
            .with_context(|| format!("no pid in {line:?}"))?;
        let status = self
            .wait(timeout)
            .await
            .context("the old process to exit")?;
        if !status.success() {
            bail!(
                "the old process exited with {status} after the upgrade; stderr:\n{}",
                self.stderr()
            );
        }
        self.pid = pid;
        self.successor = true;
        Ok(pid)
    }
}

/// What a new process prints once it took over (`edgelb: took over the
/// sockets (pid N)`).
const TOOK_OVER: &str = "took over the sockets (pid ";

/// The exit status of `pid`, a process handed to this one as a subreaper,
/// if it has exited. A process not handed over yet (its parent still runs)
/// counts as running; one that is gone without having been handed over
/// (its parent reaped it) is an error.
fn reap(pid: u32) -> anyhow::Result<Option<ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let raw = i32::try_from(pid).context("pid")?;
    let pid = rustix::process::Pid::from_raw(raw).context("pid 0")?;
    match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, status))) => Ok(Some(ExitStatus::from_raw(status.as_raw()))),
        Ok(None) => Ok(None),
        Err(rustix::io::Errno::CHILD) => match rustix::process::test_kill_process(pid) {
            Err(rustix::io::Errno::SRCH) => {
                bail!("pid {pid:?} exited and was reaped by its parent")
            }
            _ => Ok(None),
        },
        Err(e) => Err(e.into()),
    }
}

impl Drop for Process {
    /// A successor is not a `Child` killed on drop: killed here.
    fn drop(&mut self) {
        if self.successor
            && matches!(reap(self.pid), Ok(None))
            && let Ok(pid) = i32::try_from(self.pid)
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
}
