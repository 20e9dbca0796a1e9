//! `edgectl cluster local --nodes N`: an N-node cluster of real `edgelb`
//! processes on loopback, for trying edgelb out, until Ctrl-C or SIGTERM.
//!
//! ```text
//!  node 1  --listen-ip 127.0.0.11  admin 127.0.0.11:7070  cluster 127.0.0.11:7071  founds (token T)
//!  node 2  --listen-ip 127.0.0.12  admin 127.0.0.12:7070  …  --join http://127.0.0.11:7070 --token T
//!  …
//!  ready = every node's /readyz is 200, it knows a leader and its /v1/cluster lists N members,
//!          min(N, 5) of them voters, less one when that is even (voters stay odd)
//!  a node exits ─▶ "node K (pid P) exited (…); nodes … keep running; start it again with: …"
//!  edgectl cluster local --data-dir DIR start-node K ─▶ DIR/control.sock ─▶ node K started again
//!  Ctrl-C / SIGTERM ─▶ SIGTERM to each running pid ─▶ wait (30 s, then SIGKILL) ─▶ exit 0
//! ```
//!
//! Each node keeps its data dir and its log (`edgelb.log`, stdout and
//! stderr) under `<data dir>/node-<k>`. Only the processes started here are
//! ever signalled. A node that exits is left stopped (whoever stopped it
//! wants to watch the others fail over) until the operator starts it
//! again ([`control`]).

mod control;
mod node;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgelb_api::cluster::ClusterData;
use http::Method;
use rand::Rng;
use rand::distr::Alphanumeric;
use tokio::signal::unix::{SignalKind, signal};

use self::control::{Control, Reply, Started};
use self::node::{Launcher, Node, last_line, stop_all};
use crate::cli::{LocalArgs, LocalCmd};
use crate::client::{ApiUrl, Client};
use crate::error::{Failure, Outcome};
use crate::{Ctx, emit};

/// Admin API port of every local node (each on its own IP).
pub const ADMIN_PORT: u16 = 7070;
/// Cluster (QUIC) port of every local node.
pub const CLUSTER_PORT: u16 = 7071;
/// edgelb's default `max_voters`: nodes beyond it stay learners.
const MAX_VOTERS: usize = 5;
/// How often the supervisor looks for nodes that exited.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Runs `cluster local` (see the module docs), or its `start-node`.
pub async fn run(ctx: &Ctx, args: LocalArgs) -> Outcome {
    match args.command {
        Some(LocalCmd::StartNode { id }) => {
            let Some(dir) = &args.data_dir else {
                return Err(Failure::usage(
                    "start-node needs the running cluster's --data-dir DIR (cluster local prints it)",
                ));
            };
            control::start_node(dir, id, Duration::from_secs(args.timeout)).await
        }
        None => supervise(ctx, &args).await,
    }
}

/// Starts the cluster and keeps it until a signal.
async fn supervise(ctx: &Ctx, args: &LocalArgs) -> Outcome {
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
    let launcher = Launcher {
        binary,
        log: args.log.clone(),
        root: root.clone(),
        token,
        founder: format!("http://{}:{ADMIN_PORT}", ips[0]),
    };
    let mut nodes: Vec<Node> = Vec::new();
    let started = tokio::select! {
        r = start_all(&launcher, args.timeout, &ips, &mut nodes) => r,
        _ = term.recv() => Err(Failure::local("stopped by SIGTERM while starting")),
        _ = int.recv() => Err(Failure::local("stopped by Ctrl-C while starting")),
    };
    let outcome = match started.and_then(|()| Control::bind(&root)) {
        Ok(mut control) => {
            emit(&summary(&nodes, &launcher, temporary));
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = tick.tick() => report_exits(&mut nodes, &root),
                    (id, answer) = control.next() => {
                        let _ = answer.send(restart(&launcher, &mut nodes, id));
                    }
                }
            }
            Ok(())
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
    launcher: &Launcher,
    timeout: u64,
    ips: &[Ipv4Addr],
    nodes: &mut Vec<Node>,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    for (i, ip) in ips.iter().enumerate() {
        let id = u16::try_from(i + 1).map_err(Failure::local)?;
        eprintln!("edgectl: starting node {id} on {ip}");
        nodes.push(launcher.spawn(id, *ip)?);
        if id == 1 {
            // The others join through it: it must be serving first.
            wait_ready(&mut nodes[..1], &launcher.token, 1, deadline).await?;
        }
    }
    let n = nodes.len();
    wait_ready(nodes, &launcher.token, n, deadline).await
}

/// Says which nodes exited since the last look; the others keep running.
fn report_exits(nodes: &mut [Node], root: &Path) {
    for i in 0..nodes.len() {
        let Some(status) = nodes[i].newly_exited() else {
            continue;
        };
        let running: Vec<String> = nodes
            .iter_mut()
            .filter_map(|n| n.running().then(|| n.id.to_string()))
            .collect();
        let others = match running.as_slice() {
            [] => "no node is running".to_owned(),
            [one] => format!("node {one} keeps running"),
            many => format!("nodes {} keep running", many.join(", ")),
        };
        let node = &nodes[i];
        // A crash or a refused start leaves its reason at the end of the log.
        let why = if status.code().is_some_and(|c| c != 0) {
            format!("; last log line: {}", last_line(&node.log()))
        } else {
            String::new()
        };
        eprintln!(
            "edgectl: node {} (pid {}) exited ({status}); {others}; start it again with: edgectl cluster local --data-dir {} start-node {}{why}",
            node.id,
            node.pid,
            root.display(),
            node.id,
        );
    }
}

/// Starts stopped node `id` again, for `start-node`.
fn restart(launcher: &Launcher, nodes: &mut [Node], id: u16) -> Reply {
    let members = nodes.len();
    let Some(node) = nodes.iter_mut().find(|n| n.id == id) else {
        return Reply::Refused(format!(
            "no node {id}: this cluster has nodes 1 to {members}"
        ));
    };
    if node.running() {
        return Reply::Refused(format!(
            "node {id} is running (pid {}); stop it first",
            node.pid
        ));
    }
    match launcher.spawn(id, node.ip) {
        Ok(started) => {
            *node = started;
            eprintln!("edgectl: node {id} started again (pid {})", node.pid);
            Reply::Started(Started {
                pid: node.pid,
                admin: node.admin_url(),
                log: node.log(),
                token: launcher.token.clone(),
                members,
            })
        }
        Err(e) => Reply::Refused(format!("starting node {id}: {e}")),
    }
}

/// Waits until each of `nodes` is ready and lists `members` members,
/// failing early when one exits.
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

/// `Ok` once the node is ready, knows a leader and sees `members` members,
/// as many of them voters as the cluster will have; else why not.
async fn probe(open: &Client, authed: &Client, members: usize) -> Result<(), String> {
    let ready = open
        .request(Method::GET, "/readyz", None)
        .await
        .map_err(|e| e.to_string())?;
    if ready.status != http::StatusCode::OK {
        return Err(format!("/readyz answered {}", ready.status));
    }
    let data: ClusterData = authed.get("/v1/cluster").await.map_err(|e| e.to_string())?;
    let seen = data.cluster.nodes.len();
    if seen < members {
        return Err(format!("it lists {seen} of {members} members"));
    }
    // A joiner is a voter before its /readyz answers when it is promoted,
    // but the leader keeps the voters odd: with an even count the last
    // joiner stays a learner.
    let voters = data.cluster.voters();
    let want = members.min(MAX_VOTERS);
    let want = if want.is_multiple_of(2) {
        want - 1
    } else {
        want
    };
    if voters < want {
        return Err(format!("it lists {voters} of {want} voters"));
    }
    if data.cluster.leader_id.is_none() {
        return Err("it knows no leader".to_owned());
    }
    Ok(())
}

/// What to tell the operator once the cluster is up.
fn summary(nodes: &[Node], launcher: &Launcher, temporary: bool) -> String {
    let mut s = String::new();
    let root = &launcher.root;
    let token = &launcher.token;
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
    let _ = writeln!(
        s,
        "A node that exits (kill <pid>) leaves the others running; start it again with:"
    );
    let _ = writeln!(
        s,
        "  edgectl cluster local --data-dir {} start-node <k>",
        root.display()
    );
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
            if g.is_empty() || g.len() > 256 || !g.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Failure::usage(
                    "--token must be 1 to 256 printable ASCII characters",
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
        // SPEC sets no length (the node warns under 16); a header must be
        // able to carry it.
        assert_eq!(choose_token(Some("short"), &dir).unwrap(), "short");
        for bad in ["", "with space", &"x".repeat(257)] {
            assert!(choose_token(Some(bad), &dir).is_err(), "{bad:?}");
        }
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
