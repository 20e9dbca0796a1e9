//! `edgectl cluster local --nodes 3` with the real `edgelb` binary: the
//! nodes form one cluster, a write through node 2 shows on node 3, and
//! SIGTERM to edgectl stops every node.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::deploy::{dashboard_metrics, metric_names};
use crate::support::{Net, edgectl, edgelb_bin, http_get, patient, poll};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_local_runs_three_nodes_until_sigterm() -> anyhow::Result<()> {
    let binary = tokio::task::spawn_blocking(edgelb_bin).await??;
    let net = Net::allocate();
    let base = net.ip(11).to_string();
    let mut cmd = tokio::process::Command::new(crate::support::edgectl_bin());
    crate::support::clean_env(&mut cmd);
    cmd.args([
        "cluster",
        "local",
        "--nodes",
        "3",
        "--base-ip",
        &base,
        "--log",
        "warn",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    // `--binary` is left out on purpose: edgelb is found next to edgectl.
    assert_eq!(
        binary.parent(),
        Path::new(crate::support::edgectl_bin()).parent()
    );
    let mut child = cmd.spawn()?;
    let edgectl_pid = child.id().context("edgectl pid")?;
    let stdout = child.stdout.take().context("stdout")?;
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
        let out = child.wait_with_output().await?;
        anyhow::bail!(
            "cluster local did not come up: {started:?}\nstdout: {summary:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
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

    // A write through node 2 shows on node 3.
    let ctl = |api: String, args: &'static [&'static str]| {
        let token = token.clone();
        async move {
            let mut all = vec!["--api", api.as_str(), "--token", token.as_str()];
            all.extend_from_slice(args);
            edgectl(&all).await
        }
    };
    ctl(
        urls[1].clone(),
        &["service", "create", "-n", "shared", "7500:8080/http"],
    )
    .await?
    .ok()?;
    let on3 = poll(
        "node 3 to list the group",
        Duration::from_secs(30),
        || async {
            let run = ctl(urls[2].clone(), &["service", "list"]).await?;
            anyhow::ensure!(run.code == 0 && run.stdout.contains("shared"), "{run:?}");
            Ok(run)
        },
    )
    .await?;
    assert!(on3.stdout.contains("7500:8080/http"), "{}", on3.stdout);
    let status = ctl(urls[2].clone(), &["cluster", "status"]).await?.ok()?;
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
            let (code, text) = http_get(&urls[1], "/metrics").await?;
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
    let pid = rustix::process::Pid::from_raw(i32::try_from(edgectl_pid)?).context("pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let out = tokio::time::timeout(patient(Duration::from_secs(60)), child.wait_with_output())
        .await
        .context("edgectl did not exit after SIGTERM")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("every node stopped"), "{stderr}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "node pid {pid} is still there"
        );
    }
    Ok(())
}
