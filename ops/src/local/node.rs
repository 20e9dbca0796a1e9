//! One local `edgelb` process: how it is started (the same flags on the
//! first start and on every restart), watched and stopped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{ADMIN_PORT, CLUSTER_PORT};
use crate::error::{Failure, Outcome};

/// Drain timeout given to local nodes, so that Ctrl-C is quick.
const DRAIN_TIMEOUT: &str = "5s";
/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What every node of one local cluster is started with.
#[derive(Debug)]
pub(crate) struct Launcher {
    pub(crate) binary: PathBuf,
    /// The nodes' log filter.
    pub(crate) log: String,
    /// Holds `node-1`, `node-2`, …
    pub(crate) root: PathBuf,
    pub(crate) token: String,
    /// Node 1's admin URL, which the others join.
    pub(crate) founder: String,
}

/// One node and its process (running or exited).
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) id: u16,
    pub(crate) ip: Ipv4Addr,
    pub(crate) dir: PathBuf,
    child: Child,
    pub(crate) pid: u32,
    /// Set once its exit has been reported, until it is started again.
    exited: Option<ExitStatus>,
}

impl Launcher {
    /// Starts node `id` on `ip`; node 1 founds (or resumes) the cluster,
    /// the others join node 1 (`--join` is ignored once a data dir holds a
    /// cluster, so a restart resumes from it).
    pub(crate) fn spawn(&self, id: u16, ip: Ipv4Addr) -> Outcome<Node> {
        let dir = self.root.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Failure::local(format!("creating {}: {e}", dir.display())))?;
        let log_path = dir.join("edgelb.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Failure::local(format!("opening {}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Failure::local(format!("{}: {e}", log_path.display())))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--node-id")
            .arg(id.to_string())
            .arg("--region")
            .arg("local")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--admin-addr")
            .arg(format!("{ip}:{ADMIN_PORT}"))
            .arg("--cluster-addr")
            .arg(format!("{ip}:{CLUSTER_PORT}"))
            .arg("--listen-ip")
            .arg(ip.to_string())
            .arg("--token")
            .arg(&self.token)
            .arg("--drain-timeout")
            .arg(DRAIN_TIMEOUT)
            .arg("--log")
            .arg(&self.log);
        if id > 1 {
            cmd.arg("--join").arg(&self.founder);
        }
        // The caller's environment must not configure the nodes behind the
        // flags' back (EDGELB_CONFIG, EDGELB_DATA_DIR, …).
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("EDGELB_")) {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| Failure::local(format!("starting {}: {e}", self.binary.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| Failure::local(format!("node {id} exited at once")))?;
        Ok(Node {
            id,
            ip,
            dir,
            child,
            pid,
            exited: None,
        })
    }
}

impl Node {
    pub(crate) fn admin_url(&self) -> String {
        format!("http://{}:{ADMIN_PORT}", self.ip)
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("edgelb.log")
    }

    /// Whether its process is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Fails when the process has exited, quoting the end of its log.
    pub(crate) fn check_alive(&mut self) -> Outcome {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Failure::local(format!(
                "node {} exited ({status}); last log line: {}",
                self.id,
                last_line(&self.log())
            ))),
            Err(e) => Err(Failure::local(format!("node {}: {e}", self.id))),
        }
    }

    /// Its exit status the first time it is seen to have exited; `None`
    /// while it runs and once reported.
    pub(crate) fn newly_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return None;
        }
        // An error here means the child was already reaped: treat it as
        // running, the next look will tell.
        let status = self.child.try_wait().ok().flatten()?;
        self.exited = Some(status);
        Some(status)
    }
}

/// SIGTERM to every node still running, then waits for each (bounded; then
/// SIGKILL). Exits already reported are not reported again.
pub(crate) async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if node.running() {
            terminate(node.pid);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    for node in nodes.iter_mut().filter(|n| n.exited.is_none()) {
        match tokio::time::timeout_at(deadline, node.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("edgectl: node {} exited with {status}", node.id),
            Ok(Err(e)) => eprintln!("edgectl: node {}: {e}", node.id),
            Err(_) => {
                eprintln!(
                    "edgectl: node {} did not stop within {STOP_TIMEOUT:?}; killing it",
                    node.id
                );
                let _ = node.child.kill().await;
            }
        }
    }
}

/// Sends SIGTERM to `pid` (a child started here).
fn terminate(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// The last non-empty line of a log file (for a node that died).
pub(crate) fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("(nothing in {})", path.display()))
}
