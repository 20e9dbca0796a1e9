//! `edgectl cluster local --nodes N`: an N-node cluster of real `edgelb`
//! processes on loopback, for trying edgelb out, until Ctrl-C or SIGTERM.
//!
//! ```text
//!  node 1  --listen-ip 127.0.0.11  admin 127.0.0.11:7070  cluster 127.0.0.11:7071  founds (token T)
//!  node 2  --listen-ip 127.0.0.12  admin 127.0.0.12:7070  …  --join http://127.0.0.11:7070 --token T
//!  …
//!  ready = every node's /readyz is 200 and its /v1/cluster lists N members
//!  Ctrl-C / SIGTERM ─▶ SIGTERM to each started pid ─▶ wait (30 s, then SIGKILL) ─▶ exit 0
//! ```
//!
//! Each node keeps its data dir and its log (`edgelb.log`, stdout and
//! stderr) under `<data dir>/node-<k>`. Only the processes started here are
//! ever signalled.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::Method;
use rand::Rng;
use rand::distr::Alphanumeric;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::LocalArgs;
use crate::client::{ApiUrl, Client};
use crate::cluster::ClusterData;
use crate::error::{Failure, Outcome};
use crate::{Ctx, emit};

/// Admin API port of every local node (each on its own IP).
pub const ADMIN_PORT: u16 = 7070;
/// Cluster (QUIC) port of every local node.
pub const CLUSTER_PORT: u16 = 7071;
/// Drain timeout given to local nodes, so that Ctrl-C is quick.
const DRAIN_TIMEOUT: &str = "5s";
/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One started node.
struct Node {
    id: u16,
    ip: Ipv4Addr,
    dir: PathBuf,
    child: Child,
    pid: u32,
}

impl Node {
    fn admin_url(&self) -> String {
        format!("http://{}:{ADMIN_PORT}", self.ip)
    }

    fn log(&self) -> PathBuf {
        self.dir.join("edgelb.log")
    }

    /// Fails when the process has exited, quoting the end of its log.
    fn check_alive(&mut self) -> Outcome {
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
}

/// Runs the local cluster until a signal; see the module docs.
pub async fn run(ctx: &Ctx, args: LocalArgs) -> Outcome {
    // Installed first: from here on SIGTERM and Ctrl-C stop the cluster
    // instead of killing edgectl and orphaning the nodes.
    let mut term = signal(SignalKind::terminate()).map_err(Failure::local)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Failure::local)?;
    let binary = find_binary(args.binary.as_deref())?;
    let ips = node_ips(args.base_ip, args.nodes)?;
    let (root, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("edgelb-local-{}", std::process::id())),
            true,
        ),
    };
    let token = choose_token(ctx.global.token.as_deref(), &root)?;
    let mut nodes: Vec<Node> = Vec::new();
    let started = tokio::select! {
        r = start_all(&binary, &args, &ips, &root, &token, &mut nodes) => r,
        _ = term.recv() => Err(Failure::local("stopped by SIGTERM while starting")),
        _ = int.recv() => Err(Failure::local("stopped by Ctrl-C while starting")),
    };
    let outcome = match started {
        Ok(()) => {
            emit(&summary(&nodes, &root, &token, temporary));
            tokio::select! {
                _ = term.recv() => Ok(()),
                _ = int.recv() => Ok(()),
                e = watch(&mut nodes) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    eprintln!("edgectl: stopping {} node(s)", nodes.len());
    stop_all(&mut nodes).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    if outcome.is_ok() {
        eprintln!("edgectl: every node stopped");
    }
    outcome
}

/// Starts node 1, waits until it is ready, then the others (joining node 1),
/// and waits until every node lists every member.
async fn start_all(
    binary: &Path,
    args: &LocalArgs,
    ips: &[Ipv4Addr],
    root: &Path,
    token: &str,
    nodes: &mut Vec<Node>,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let founder = format!("http://{}:{ADMIN_PORT}", ips[0]);
    for (i, ip) in ips.iter().enumerate() {
        let id = u16::try_from(i + 1).map_err(Failure::local)?;
        let join = (id > 1).then_some(founder.as_str());
        eprintln!("edgectl: starting node {id} on {ip}");
        nodes.push(spawn(binary, args, id, *ip, root, token, join)?);
        if id == 1 {
            // The others join through it: it must be serving first.
            wait_ready(&mut nodes[..1], token, 1, deadline).await?;
        }
    }
    let n = nodes.len();
    wait_ready(nodes, token, n, deadline).await
}

fn spawn(
    binary: &Path,
    args: &LocalArgs,
    id: u16,
    ip: Ipv4Addr,
    root: &Path,
    token: &str,
    join: Option<&str>,
) -> Outcome<Node> {
    let dir = root.join(format!("node-{id}"));
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
    let mut cmd = Command::new(binary);
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
        .arg(token)
        .arg("--drain-timeout")
        .arg(DRAIN_TIMEOUT)
        .arg("--log")
        .arg(&args.log);
    if let Some(url) = join {
        cmd.arg("--join").arg(url);
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
        .map_err(|e| Failure::local(format!("starting {}: {e}", binary.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| Failure::local(format!("node {id} exited at once")))?;
    Ok(Node {
        id,
        ip,
        dir,
        child,
        pid,
    })
}

/// Waits until each of `nodes` answers `/readyz` and lists `members`
/// members, failing early when one exits.
async fn wait_ready(nodes: &mut [Node], token: &str, members: usize, deadline: Instant) -> Outcome {
    for node in nodes.iter_mut() {
        let url = ApiUrl::parse(&node.admin_url())?;
        let open = Client::new(url.clone(), None);
        let authed = Client::new(url, Some(token.to_owned()));
        loop {
            node.check_alive()?;
            let why = match probe(&open, &authed, members).await {
                Ok(()) => break,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(Failure::local(format!(
                    "node {} was not ready in time: {why}; see {}",
                    node.id,
                    node.log().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// `Ok` once the node is ready and sees `members` members; else why not.
async fn probe(open: &Client, authed: &Client, members: usize) -> Result<(), String> {
    let ready = open
        .request(Method::GET, "/readyz", None)
        .await
        .map_err(|e| e.to_string())?;
    if ready.status != 200 {
        return Err(format!("/readyz answered {}", ready.status));
    }
    let data: ClusterData = authed.get("/v1/cluster").await.map_err(|e| e.to_string())?;
    let seen = data.cluster.nodes.len();
    if seen < members {
        return Err(format!("it lists {seen} of {members} members"));
    }
    Ok(())
}

/// Returns when a node exits on its own.
async fn watch(nodes: &mut [Node]) -> Failure {
    loop {
        for node in nodes.iter_mut() {
            if let Err(e) = node.check_alive() {
                return e;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM to every node still running, then waits for each (bounded; then
/// SIGKILL).
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if matches!(node.child.try_wait(), Ok(None)) {
            terminate(node.pid);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    for node in nodes.iter_mut() {
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

/// What to tell the operator once the cluster is up.
fn summary(nodes: &[Node], root: &Path, token: &str, temporary: bool) -> String {
    let mut s = String::new();
    let kept = if temporary { "removed at exit" } else { "kept" };
    let _ = writeln!(
        s,
        "edgelb cluster of {} node(s) is ready (data in {}, {kept})",
        nodes.len(),
        root.display()
    );
    for n in nodes {
        let _ = writeln!(
            s,
            "node {}  admin {}  cluster {}:{CLUSTER_PORT}  listen {}  pid {}  log {}",
            n.id,
            n.admin_url(),
            n.ip,
            n.ip,
            n.pid,
            n.log().display()
        );
    }
    let first = nodes.first().map(Node::admin_url).unwrap_or_default();
    let _ = writeln!(s, "token: {token}");
    let _ = writeln!(s);
    let _ = writeln!(s, "try:");
    let _ = writeln!(s, "  export EDGELB_API={first} EDGELB_TOKEN={token}");
    let _ = writeln!(s, "  edgectl cluster status");
    let _ = writeln!(
        s,
        "  edgectl service create -n web 8000:8080/http   # published on every node's listen IP"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "Ctrl-C stops every node.");
    s
}

/// `nodes` consecutive IPv4 loopback addresses from `base`.
pub fn node_ips(base: Ipv4Addr, nodes: u16) -> Outcome<Vec<Ipv4Addr>> {
    let start = u32::from(base);
    let ips: Vec<Ipv4Addr> = (0..u32::from(nodes))
        .map(|k| start.checked_add(k).map(Ipv4Addr::from))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Failure::usage(format!("--base-ip {base} leaves no room for {nodes} nodes"))
        })?;
    match ips.iter().find(|ip| !ip.is_loopback()) {
        Some(ip) => Err(Failure::usage(format!(
            "--base-ip {base} with --nodes {nodes} reaches {ip}, which is not a loopback address"
        ))),
        None => Ok(ips),
    }
}

/// `--token`/`EDGELB_TOKEN`, else the token node 1 stored in an earlier
/// run in `root`, else a new one.
fn choose_token(given: Option<&str>, root: &Path) -> Outcome<String> {
    let stored = std::fs::read_to_string(root.join("node-1").join("token"))
        .ok()
        .map(|t| t.trim().to_owned());
    match (given, stored) {
        (Some(g), Some(s)) if g != s => Err(Failure::usage(format!(
            "--token differs from the token of the cluster in {}",
            root.display()
        ))),
        (Some(g), _) => {
            if g.len() < 16 || g.len() > 256 || !g.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Failure::usage(
                    "--token must be 16 to 256 printable ASCII characters",
                ));
            }
            Ok(g.to_owned())
        }
        (None, Some(s)) => Ok(s),
        (None, None) => Ok(rand::rng()
            .sample_iter(Alphanumeric)
            .take(32)
            .map(char::from)
            .collect()),
    }
}

/// `--binary`, else `edgelb` next to this executable (`target/<profile>/`
/// during development), else `edgelb` on `PATH`.
pub fn find_binary(given: Option<&Path>) -> Outcome<PathBuf> {
    let name = format!("edgelb{}", std::env::consts::EXE_SUFFIX);
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(Failure::local(format!(
                "--binary {} is not a file",
                p.display()
            )))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(&name)))
        .filter(|p| p.is_file());
    if let Some(p) = beside {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Failure::local(
                "no edgelb binary: pass --binary, put edgelb next to edgectl or on PATH (cargo build --bin edgelb)",
            )
        })
}

/// The last non-empty line of a log file (for a node that died).
fn last_line(path: &Path) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_consecutive_loopback() {
        let ips = node_ips(Ipv4Addr::new(127, 0, 0, 11), 3).unwrap();
        assert_eq!(
            ips,
            [
                Ipv4Addr::new(127, 0, 0, 11),
                Ipv4Addr::new(127, 0, 0, 12),
                Ipv4Addr::new(127, 0, 0, 13)
            ]
        );
        let ips = node_ips(Ipv4Addr::new(127, 0, 0, 255), 2).unwrap();
        assert_eq!(ips[1], Ipv4Addr::new(127, 0, 1, 0));
        assert_eq!(
            node_ips(Ipv4Addr::new(127, 255, 255, 255), 2)
                .unwrap_err()
                .exit_code(),
            2
        );
        assert!(node_ips(Ipv4Addr::new(10, 0, 0, 1), 1).is_err());
    }

    #[test]
    fn tokens() {
        let dir = std::env::temp_dir().join(format!("edgectl-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(choose_token(None, &dir).unwrap().len(), 32);
        assert!(choose_token(Some("short"), &dir).is_err());
        std::fs::create_dir_all(dir.join("node-1")).unwrap();
        std::fs::write(dir.join("node-1/token"), "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        assert_eq!(
            choose_token(None, &dir).unwrap(),
            "abcdefghijklmnopqrstuvwxyz"
        );
        assert!(choose_token(Some("0123456789abcdef0"), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
