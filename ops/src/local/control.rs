//! `edgectl cluster local --data-dir DIR start-node K`: a second `edgectl`
//! asks the running `cluster local` to start one of its stopped nodes
//! again, through a Unix socket in the data dir.
//!
//! ```text
//!  edgectl … start-node K ──{"start_node":K}──▶ DIR/control.sock ──▶ supervisor
//!          ◀──{"started":{pid, admin, …}} or {"refused":"why"}──────────┘ (spawns node K)
//!  then polls node K until /readyz is 200, it lists every member, knows a
//!  leader and has applied what the leader had committed
//! ```
//!
//! The supervisor stays the parent of every node, so the restarted node
//! logs to the same file and Ctrl-C stops it like the others.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgelb_api::cluster::ClusterData;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::node::last_line;
use super::probe;
use crate::client::{ApiUrl, Client};
use crate::emit;
use crate::error::{Failure, Outcome};

/// The socket's name in the data dir.
const SOCKET: &str = "control.sock";
/// How long one side waits for the other's line.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request line read.
const MAX_LINE: u64 = 4096;

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    start_node: u16,
}

/// What the supervisor answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// The node's process was started.
    Started(Started),
    /// Why not (unknown node, still running, spawn failed).
    Refused(String),
}

/// A node started again.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Started {
    pub(crate) pid: u32,
    pub(crate) admin: String,
    pub(crate) log: PathBuf,
    /// The admin token (the socket is only for the data dir's owner).
    pub(crate) token: String,
    /// How many members the cluster has.
    pub(crate) members: usize,
}

/// A request for the supervisor and where its answer goes.
pub(crate) type Ask = (u16, oneshot::Sender<Reply>);

/// The listening socket; removed on drop.
#[derive(Debug)]
pub(crate) struct Control {
    path: PathBuf,
    asks: mpsc::Receiver<Ask>,
    task: JoinHandle<()>,
}

impl Control {
    /// Listens on `<root>/control.sock` (replacing a stale one).
    pub(crate) fn bind(root: &Path) -> Outcome<Self> {
        let path = root.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Failure::local(format!("listening on {}: {e}", path.display())))?;
        // The replies carry the token: only the owner may connect.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Failure::local(format!("{}: {e}", path.display())))?;
        let (tx, asks) = mpsc::channel(8);
        let task = tokio::spawn(accept(listener, tx));
        Ok(Self { path, asks, task })
    }

    /// The next request; pending forever once the listener is gone.
    pub(crate) async fn next(&mut self) -> Ask {
        match self.asks.recv().await {
            Some(ask) => ask,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept(listener: UnixListener, tx: mpsc::Sender<Ask>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(e) => {
                eprintln!("edgectl: control socket: {e}");
                // A bounded pause so that a persistent error (EMFILE) does
                // not spin.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One client: one request line, one reply line.
async fn serve(stream: UnixStream, tx: mpsc::Sender<Ask>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    let read = tokio::time::timeout(EXCHANGE_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (answer, answered) = oneshot::channel();
                if tx.send((req.start_node, answer)).await.is_err() {
                    return; // the supervisor is stopping
                }
                match answered.await {
                    Ok(reply) => reply,
                    Err(_) => return,
                }
            }
            Err(e) => Reply::Refused(format!("bad request: {e}")),
        },
        Ok(Err(_)) | Err(_) => return,
    };
    if let Ok(mut text) = serde_json::to_string(&reply) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
}

/// `start-node K`: asks the `cluster local` running on `root` to start node
/// `id` again, then waits (up to `timeout`) until it is back in the
/// cluster.
pub(crate) async fn start_node(root: &Path, id: u16, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let started = ask(root, id).await?;
    eprintln!(
        "edgectl: node {id} started (pid {}); waiting until it is back in the cluster",
        started.pid
    );
    let url = ApiUrl::parse(&started.admin)?;
    let open = Client::new(url.clone(), None);
    let authed = Client::new(url, Some(started.token.clone()));
    loop {
        let why = match probe(&open, &authed, started.members).await {
            Ok(()) => match caught_up(&authed, &started.token).await {
                Ok(()) => break,
                Err(why) => why,
            },
            Err(why) => why,
        };
        if !alive(started.pid) {
            return Err(Failure::local(format!(
                "node {id} exited again; last log line: {}",
                last_line(&started.log)
            )));
        }
        if Instant::now() >= deadline {
            return Err(Failure::local(format!(
                "node {id} is running (pid {}) but not back in the cluster in time: {why}; see {}",
                started.pid,
                started.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    emit(&format!(
        "node {id} is back: pid {}, admin {}, ready, {} members, caught up with its leader\n",
        started.pid, started.admin, started.members
    ));
    Ok(())
}

/// `Ok` once the node has applied what its leader had committed when
/// asked; else why not.
async fn caught_up(authed: &Client, token: &str) -> Result<(), String> {
    let mine: ClusterData = authed.get("/v1/cluster").await.map_err(|e| e.to_string())?;
    let me = &mine.cluster;
    let leader = me.leader_id.ok_or("it knows no leader")?;
    if leader == me.node_id {
        return Ok(());
    }
    let addr = me
        .nodes
        .iter()
        .find(|n| n.node_id == leader)
        .map(|n| n.admin_addr.clone())
        .ok_or_else(|| format!("it does not list its leader {leader}"))?;
    let url = ApiUrl::parse(&format!("http://{addr}")).map_err(|e| e.to_string())?;
    let theirs: ClusterData = Client::new(url, Some(token.to_owned()))
        .get("/v1/cluster")
        .await
        .map_err(|e| format!("asking its leader {leader}: {e}"))?;
    let committed = theirs.cluster.commit_index;
    if me.applied_index < committed {
        return Err(format!(
            "it has applied index {} of its leader's {committed}",
            me.applied_index
        ));
    }
    Ok(())
}

/// One exchange with the supervisor.
async fn ask(root: &Path, id: u16) -> Outcome<Started> {
    let path = root.join(SOCKET);
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        Failure::local(format!(
            "no `edgectl cluster local` runs with --data-dir {} ({}: {e})",
            root.display(),
            path.display()
        ))
    })?;
    let exchange = async {
        let mut line = serde_json::to_string(&Request { start_node: id })?;
        line.push('\n');
        stream.write_all(line.as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(&mut stream)
            .take(1 << 16)
            .read_line(&mut answer)
            .await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| Failure::local(format!("{} did not answer", path.display())))?
        .map_err(|e| Failure::local(format!("{}: {e}", path.display())))?;
    match serde_json::from_str::<Reply>(&answer) {
        Ok(Reply::Started(s)) => Ok(s),
        Ok(Reply::Refused(why)) => Err(Failure::local(why)),
        Err(e) => Err(Failure::local(format!(
            "{}: unexpected answer {answer:?}: {e}",
            path.display()
        ))),
    }
}

/// Whether process `pid` still exists (a zombie counts until reaped).
fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}
