//! `edgectl cluster local --nodes 3` with the real `edgelb` binary: the
//! nodes form one cluster, a write through node 2 shows on node 3, SIGTERM
//! to edgectl stops every node; a node killed by its pid leaves the others
//! running (they elect a new leader) until `start-node` brings it back.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use edgelb_api::cluster::ClusterData;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::deploy::{dashboard_metrics, metric_names};
use crate::support::{Run, Subnet, TempDir, edgectl, edgelb_bin, http_get, patient, poll};

/// A running `edgectl cluster local --nodes 3` and what it printed.
pub(crate) struct Local {
    child: Child,
    token: String,
    /// Admin URL of node k at `k - 1`.
    pub(crate) urls: Vec<String>,
    /// The pid it printed for node k at `k - 1`.
    pub(crate) pids: Vec<u32>,
    /// Its stderr so far.
    stderr: Arc<Mutex<String>>,
}

impl Local {
    /// Starts it on `net`'s `.11`–`.13` with `extra` flags and reads its
    /// summary.
    pub(crate) async fn start(net: &Subnet, extra: &[&str]) -> anyhow::Result<Self> {
        let base = net.ip(11).to_string();
        let mut cmd = tokio::process::Command::new(crate::support::edgectl_bin());
        crate::support::clean_env(&mut cmd);
        cmd.args(["cluster", "local", "--nodes", "3", "--base-ip", &base])
            .args(["--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr_pipe = child.stderr.take().context("stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr_pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut all) = sink.lock() {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
        });
        let mut lines = BufReader::new(stdout).lines();

        // Read the summary up to the token line.
        let mut summary = Vec::new();
        let read = async {
            while let Some(line) = lines.next_line().await? {
                let done = line.starts_with("token: ");
                summary.push(line);
                if done {
                    break;
                }
            }
            anyhow::Ok(())
        };
        let started = tokio::time::timeout(patient(Duration::from_secs(120)), read).await;
        if !matches!(started, Ok(Ok(()))) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            anyhow::bail!(
                "cluster local did not come up: {started:?}\nstdout: {summary:?}\nstderr: {}",
                text(&stderr)
            );
        }
        let token = summary
            .iter()
            .find_map(|l| l.strip_prefix("token: "))
            .context("no token line")?
            .to_owned();
        // node K  admin URL  cluster ADDR  listen IP  pid PID  log PATH
        let mut urls = Vec::new();
        let mut pids = Vec::new();
        for k in 1..=3 {
            let line = summary
                .iter()
                .find(|l| l.starts_with(&format!("node {k}  admin ")))
                .with_context(|| format!("no line for node {k}: {summary:?}"))?;
            let words: Vec<&str> = line.split_whitespace().collect();
            urls.push(words[3].to_owned());
            pids.push(words[9].parse::<u32>()?);
            assert_eq!(
                words[3],
                format!("http://{}:7070", net.ip(10 + k)),
                "{line}"
            );
        }
        Ok(Self {
            child,
            token,
            urls,
            pids,
            stderr,
        })
    }

    /// `edgectl --api <node k> --token T args…`.
    pub(crate) async fn ctl(&self, k: usize, args: &[&str]) -> anyhow::Result<Run> {
        let mut all = vec!["--api", self.urls[k - 1].as_str(), "--token", &self.token];
        all.extend_from_slice(args);
        edgectl(&all).await
    }

    /// `GET /v1/cluster` on node k.
    async fn status(&self, k: usize) -> anyhow::Result<ClusterData> {
        let run = self
            .ctl(k, &["-o", "json", "cluster", "status"])
            .await?
            .ok()?;
        Ok(serde_json::from_str(&run.stdout)?)
    }

    /// SIGTERM to edgectl: it exits 0 and says every node stopped, and
    /// none of `pids` is left.
    pub(crate) async fn stop(mut self, pids: &[u32]) -> anyhow::Result<()> {
        let pid = self.child.id().context("edgectl has exited")?;
        signal(pid, rustix::process::Signal::TERM)?;
        let status = tokio::time::timeout(patient(Duration::from_secs(60)), self.child.wait())
            .await
            .context("edgectl did not exit after SIGTERM")??;
        // The reader ends with the pipe; bounded in case a node holds it.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while Arc::strong_count(&self.stderr) > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let stderr = text(&self.stderr);
        assert_eq!(status.code(), Some(0), "stderr: {stderr}");
        assert!(stderr.contains("every node stopped"), "{stderr}");
        for pid in pids {
            assert!(!running(*pid), "node pid {pid} is still there");
        }
        Ok(())
    }
}

fn text(buf: &Mutex<String>) -> String {
    buf.lock().map(|s| s.clone()).unwrap_or_default()
}

fn signal(pid: u32, sig: rustix::process::Signal) -> anyhow::Result<()> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid")?;
    rustix::process::kill_process(pid, sig)?;
    Ok(())
}

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_local_runs_three_nodes_until_sigterm() -> anyhow::Result<()> {
    let binary = tokio::task::spawn_blocking(edgelb_bin).await??;
    // `--binary` is left out on purpose: edgelb is found next to edgectl.
    assert_eq!(
        binary.parent(),
        Path::new(crate::support::edgectl_bin()).parent()
    );
    let net = Subnet::allocate();
    let local = Local::start(&net, &[]).await?;

    // A write through node 2 shows on node 3.
    local
        .ctl(2, &["service", "create", "-n", "shared", "7500:8080/http"])
        .await?
        .ok()?;
    let on3 = poll(
        "node 3 to list the group",
        Duration::from_secs(30),
        || async {
            let run = local.ctl(3, &["service", "list"]).await?;
            anyhow::ensure!(run.code == 0 && run.stdout.contains("shared"), "{run:?}");
            Ok(run)
        },
    )
    .await?;
    assert!(on3.stdout.contains("7500:8080/http"), "{}", on3.stdout);
    let status = local.ctl(3, &["cluster", "status"]).await?.ok()?;
    assert_eq!(status.stdout.lines().count(), 2 + 3, "{}", status.stdout);

    // Once the nodes export gossip series at all, every gossip name the
    // dashboard queries is among them (report ages appear as reports
    // arrive).
    let gossip: Vec<String> = dashboard_metrics()?
        .into_iter()
        .filter(|n| n.starts_with("edgelb_gossip_"))
        .collect();
    poll(
        "node 2 to export the dashboard's gossip series",
        Duration::from_secs(20),
        || async {
            let (code, text) = http_get(&local.urls[1], "/metrics").await?;
            anyhow::ensure!(code == 200, "/metrics answered {code}");
            let exported = metric_names(&text);
            if !exported.iter().any(|n| n.starts_with("edgelb_gossip_")) {
                return Ok(()); // a node without load gossip yet
            }
            let missing: Vec<&String> = gossip.iter().filter(|n| !exported.contains(*n)).collect();
            anyhow::ensure!(missing.is_empty(), "not exported: {missing:?}");
            Ok(())
        },
    )
    .await?;

    // SIGTERM to edgectl stops every node and exits 0.
    let pids = local.pids.clone();
    local.stop(&pids).await
}

/// The README's walkthrough: `kill <pid of node 1>`, a new leader among 2
/// and 3, then node 1 started again the documented way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_local_survives_a_killed_node_and_starts_it_again() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(edgelb_bin).await??;
    let net = Subnet::allocate();
    let dir = TempDir::new("local");
    let dir_arg = dir.path().to_str().context("temp dir path")?.to_owned();
    let mut local = Local::start(&net, &["--data-dir", &dir_arg]).await?;

    // Kill node 1 by the pid edgectl printed; edgectl says so, and how to
    // start it again.
    let old = local.pids[0];
    signal(old, rustix::process::Signal::TERM)?;
    let line = poll(
        "edgectl to report node 1's exit",
        Duration::from_secs(30),
        || async {
            text(&local.stderr)
                .lines()
                .find(|l| l.starts_with(&format!("edgectl: node 1 (pid {old}) exited (")))
                .map(str::to_owned)
                .context("no exit line yet")
        },
    )
    .await?;
    let restart = format!("edgectl cluster local --data-dir {dir_arg} start-node 1");
    assert!(line.contains("; nodes 2, 3 keep running; "), "{line}");
    assert!(line.contains(&restart), "{line}");

    // The other two keep running and elect a new leader among themselves.
    let (leader, term) = poll(
        "a new leader among nodes 2 and 3",
        Duration::from_secs(20),
        || async {
            let (a, b) = (
                local.status(2).await?.cluster,
                local.status(3).await?.cluster,
            );
            anyhow::ensure!(
                a.leader_id.is_some_and(|l| l != 1) && a.leader_id == b.leader_id,
                "node 2 sees leader {:?} (term {}), node 3 {:?} (term {})",
                a.leader_id,
                a.term,
                b.leader_id,
                b.term
            );
            Ok((a.leader_id, a.term))
        },
    )
    .await?;
    assert!(matches!(local.child.try_wait(), Ok(None)), "edgectl exited");
    assert!(running(local.pids[1]) && running(local.pids[2]));
    local
        .ctl(
            3,
            &["service", "create", "-n", "while-down", "7501:8080/http"],
        )
        .await?
        .ok()?;

    // `start-node 1` brings it back; a second one, or an unknown node, is
    // refused.
    let start_node = |k: &'static str| {
        let dir = dir_arg.clone();
        async move { edgectl(&["cluster", "local", "--data-dir", &dir, "start-node", k]).await }
    };
    let run = start_node("1").await?.ok()?;
    let new: u32 = run
        .stdout
        .strip_prefix("node 1 is back: pid ")
        .and_then(|r| r.split(',').next())
        .with_context(|| format!("unexpected output: {run:?}"))?
        .parse()?;
    assert!(new != old && running(new), "{run:?}");
    assert!(
        text(&local.stderr).contains(&format!("edgectl: node 1 started again (pid {new})")),
        "{}",
        text(&local.stderr)
    );
    start_node("1")
        .await?
        .fails(4, &format!("node 1 is running (pid {new})"));
    start_node("4").await?.fails(4, "no node 4");

    // Node 1 is back in the cluster: it follows a leader and has the write
    // made while it was down.
    poll(
        "node 1 to be back in the cluster",
        Duration::from_secs(20),
        || async {
            let c = local.status(1).await?.cluster;
            anyhow::ensure!(
                c.leader_id.is_some() && c.nodes.len() == 3 && c.term >= term,
                "node 1 sees leader {:?}, term {}, {} members (the others saw {leader:?} in term {term})",
                c.leader_id,
                c.term,
                c.nodes.len()
            );
            let list = local.ctl(1, &["service", "list"]).await?.ok()?;
            anyhow::ensure!(list.stdout.contains("while-down"), "{}", list.stdout);
            Ok(())
        },
    )
    .await?;

    // SIGTERM to edgectl stops every node, the restarted one too.
    let mut pids = local.pids.clone();
    pids[0] = new;
    local.stop(&pids).await
}
