//! Corrupted files in the data dir, on real processes: each start on a
//! damaged file exits 65 naming the file and the way out, and following
//! that way (README: Corrupted files) brings back every acknowledged
//! write. One single-node cluster and one of three are reused across the
//! cases.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use integration::cluster::Cluster;
use integration::{AdminClient, poll};
use raft_store::faults::damage::{garble_middle, garble_pages, truncate};
use tokio::task::JoinSet;

use crate::harness::group;

/// Creates groups `prefix-0..n` through `admin`, 2 at a time; answers the
/// names whose creation was acknowledged.
async fn write(admin: &AdminClient, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut tasks = JoinSet::new();
    for worker in 0..2 {
        let admin = admin.clone();
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in (worker..n).step_by(2) {
                let name = format!("{prefix}-{i:04}");
                let (status, v) = admin.post("/v1/services", &group(&name)).await?;
                ensure!(status.is_success(), "creating {name}: {status} {v}");
                acked.push(name);
            }
            anyhow::Ok(acked)
        });
    }
    let mut acked = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r??);
    }
    Ok(acked)
}

async fn names(admin: &AdminClient) -> anyhow::Result<BTreeSet<String>> {
    Ok(admin
        .groups(false)
        .await?
        .iter()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect())
}

/// Waits until node `id` holds every group of `acked`.
async fn holds_all(cluster: &Cluster, id: u64, acked: &[String]) -> anyhow::Result<()> {
    let admin = cluster.admin(id);
    poll(
        &format!("node {id} to hold all {} acknowledged groups", acked.len()),
        Duration::from_secs(30),
        || async {
            let have = names(&admin).await?;
            let missing: Vec<&String> = acked.iter().filter(|n| !have.contains(*n)).collect();
            ensure!(
                missing.is_empty(),
                "{} missing, e.g. {:?}",
                missing.len(),
                missing.first()
            );
            Ok(())
        },
    )
    .await
}

/// Starts stopped node `id` with its command line changed by `edit`,
/// expects exit 65 and a message holding each of `needles`.
async fn refused(
    cluster: &Cluster,
    id: u64,
    edit: impl FnOnce(&mut Vec<String>),
    needles: &[&str],
) -> anyhow::Result<String> {
    let run = cluster
        .run_stopped_with(id, edit, Duration::from_secs(30))
        .await?;
    let message = run
        .stderr
        .lines()
        .find(|l| l.starts_with("edgelb: "))
        .unwrap_or_default()
        .to_owned();
    ensure!(
        run.status.code() == Some(65),
        "node {id} exited with {:?}: {}",
        run.status,
        run.stderr
    );
    ensure!(!run.stderr.contains("panicked"), "a panic: {}", run.stderr);
    for n in needles {
        ensure!(message.contains(n), "{n:?} missing from {message:?}");
    }
    eprintln!("node {id} refused to start: {message}");
    Ok(message)
}

fn unchanged(_: &mut Vec<String>) {}

/// Drops `--token` and its value from a command line.
fn without_token(args: &mut Vec<String>) {
    if let Some(at) = args.iter().position(|a| a == "--token") {
        args.drain(at..at + 2);
    }
}

fn snapshot_file(data: &Path) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(data.join("snapshots"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .with_context(|| format!("no snapshot in {}", data.display()))
}

/// Writes through `admin` until every data dir of `data` holds a snapshot
/// (every 500 to 750 log entries at this size; writes sent together may
/// share an entry), so that the log is purged behind it; at most 4,000
/// groups. Answers the acknowledged names.
async fn write_until_snapshot(admin: &AdminClient, data: &[&Path]) -> anyhow::Result<Vec<String>> {
    let mut acked = Vec::new();
    for round in 0..40 {
        if data.iter().all(|d| snapshot_file(d).is_ok()) {
            return Ok(acked);
        }
        acked.extend(write(admin, &format!("w{round:02}"), 100).await?);
    }
    // The last round's snapshot may still be being written.
    for d in data {
        wait_snapshot(d).await?;
    }
    Ok(acked)
}

async fn wait_snapshot(data: &Path) -> anyhow::Result<PathBuf> {
    poll(
        &format!("a snapshot in {}", data.display()),
        Duration::from_secs(30),
        || async { snapshot_file(data) },
    )
    .await
}

fn moved_aside(data: &Path, prefix: &str) -> bool {
    std::fs::read_dir(data).is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.contains(".corrupt-")
        })
    })
}

/// Copies only the files and directories of `from`: not the upgrade
/// socket a node leaves there (a socket is no file to copy), nor links.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        let kind = e.file_type()?;
        if kind.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// One node: the state machine (garbage, truncated, missing), the snapshot
/// file (garbage, emptied), the token (garbage, empty), the TLS files and
/// the Raft log (garbage, half, empty), each refused at start and
/// recovered as the README says; a stale damaged founding marker is
/// removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_recovers_every_corrupted_file_as_the_runbook_says() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let admin = cluster.admin(1);
    let data = cluster.data_dir(1).to_owned();
    let mut acked = write_until_snapshot(&admin, &[&data]).await?;
    let rebuild = "--rebuild-state-machine";

    // The state machine: garbage over a row's pages, then cut in half.
    let sm = data.join("state-machine.redb");
    for (round, damage) in ["garbage", "half", "missing"].into_iter().enumerate() {
        cluster.stop(1).await?;
        match damage {
            "garbage" => garble_pages(&sm, acked.last().context("no writes")?)?,
            "half" => truncate(&sm, |l| l / 2)?,
            _ => std::fs::remove_file(&sm)?,
        }
        refused(&cluster, 1, unchanged, &["state-machine.redb", rebuild]).await?;
        cluster.restart_with(1, &[rebuild]).await?;
        holds_all(&cluster, 1, &acked).await.context(damage)?;
        ensure!(
            moved_aside(&data, "state-machine.redb"),
            "{damage}: not moved aside"
        );
        acked.extend(write(&admin, &format!("sm{round}"), 10).await?);
    }

    // The snapshot document: garbage in the middle (refused), then
    // emptied (refused, and rebuilt).
    cluster.stop(1).await?;
    let snapshot = snapshot_file(&data)?;
    let name = snapshot
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let pristine = std::fs::read(&snapshot)?;
    garble_middle(&snapshot, 64 * 1024)?;
    refused(&cluster, 1, unchanged, &[&name, rebuild]).await?;
    std::fs::write(&snapshot, &pristine)?;
    truncate(&snapshot, |_| 0)?;
    refused(&cluster, 1, unchanged, &[&name, rebuild]).await?;
    cluster.restart_with(1, &[rebuild]).await?;
    holds_all(&cluster, 1, &acked).await?;
    // The log was purged behind it: a new snapshot is built at start.
    wait_snapshot(&data).await?;

    // The token: garbage in the middle, then emptied. Without --token the
    // node refuses; with the cluster's --token the file is written again.
    let token = data.join("token");
    for damage in ["garbage", "empty"] {
        cluster.stop(1).await?;
        match damage {
            "garbage" => garble_middle(&token, 8)?,
            _ => truncate(&token, |_| 0)?,
        }
        refused(&cluster, 1, without_token, &["token", "--token"]).await?;
        cluster.restart(1).await?;
        let stored = std::fs::read_to_string(&token)?;
        ensure!(
            stored.trim() == cluster.token(),
            "{damage}: token file {stored:?}"
        );
        holds_all(&cluster, 1, &acked).await?;
    }

    // TLS files: garbage in the key, ca.pem truncated, node.pem emptied;
    // restored from a backup.
    let tls = [
        ("node.key", "garbage"),
        ("ca.pem", "half"),
        ("node.pem", "empty"),
    ];
    for (file, damage) in tls {
        cluster.stop(1).await?;
        let path = data.join("tls").join(file);
        let backup = std::fs::read(&path)?;
        match damage {
            "garbage" => garble_middle(&path, 64)?,
            "half" => truncate(&path, |l| l / 2)?,
            _ => truncate(&path, |_| 0)?,
        }
        refused(&cluster, 1, unchanged, &[file, "backup", "remove-node 1"]).await?;
        std::fs::write(&path, backup)?;
        cluster.restart(1).await?;
        holds_all(&cluster, 1, &acked).await?;
    }

    // The Raft log of a one-node cluster: there is no other member to
    // rejoin, so the data dir is restored from a backup (taken while the
    // node was stopped, as the README says).
    cluster.stop(1).await?;
    let backup = integration::addr::TempDir::new("backup-n1");
    copy_dir(&data, &backup.path().join("data"))?;
    let log = data.join("raft-log.redb");
    for damage in ["garbage", "half", "empty"] {
        std::fs::copy(backup.path().join("data").join("raft-log.redb"), &log)?;
        match damage {
            "garbage" => garble_pages(&log, acked.last().context("no writes")?)?,
            "half" => truncate(&log, |l| l / 2)?,
            _ => truncate(&log, |_| 0)?,
        }
        refused(
            &cluster,
            1,
            unchanged,
            &["raft-log.redb", "remove-node 1", "--join", "restore"],
        )
        .await
        .context(damage)?;
    }
    std::fs::remove_dir_all(&data)?;
    copy_dir(&backup.path().join("data"), &data)?;
    // A founding marker left damaged once the founding is complete is only
    // removed.
    let marker = data.join("founding");
    std::fs::write(&marker, b"\xff\xfe not a key")?;
    cluster.restart(1).await?;
    holds_all(&cluster, 1, &acked).await?;
    ensure!(!marker.exists(), "the stale founding marker is still there");
    acked.extend(write(&admin, "after", 10).await?);
    holds_all(&cluster, 1, &acked).await?;
    Ok(())
}

/// Three nodes: a follower's state machine is rebuilt while the others
/// write on; a follower's corrupt log is recovered by the rejoin procedure
/// (removed, an empty data dir, --join), and no acknowledged write is
/// missing anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_rebuilds_its_state_machine_and_rejoins_after_a_corrupt_log()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let follower = cluster
        .ids()
        .into_iter()
        .rfind(|&id| id != leader && id != 1)
        .context("a follower")?;
    let admin = cluster.admin(leader);
    let data = cluster.data_dir(follower).to_owned();
    let mut acked = write_until_snapshot(&admin, &[&data]).await?;
    holds_all(&cluster, follower, &acked).await?;

    // The follower's state machine, garbage over a row: refused, then
    // rebuilt while the others keep writing.
    cluster.stop(follower).await?;
    garble_pages(
        &data.join("state-machine.redb"),
        acked.last().context("no writes")?,
    )?;
    refused(
        &cluster,
        follower,
        unchanged,
        &["state-machine.redb", "--rebuild-state-machine"],
    )
    .await?;
    let meanwhile = {
        let admin = admin.clone();
        tokio::spawn(async move { write(&admin, "meanwhile", 40).await })
    };
    cluster
        .restart_with(follower, &["--rebuild-state-machine"])
        .await?;
    acked.extend(meanwhile.await??);
    acked.extend(write(&admin, "rebuilt", 10).await?);
    for id in cluster.ids() {
        holds_all(&cluster, id, &acked).await?;
    }

    // The follower's log, garbage over a row: refused with the rejoin
    // procedure, which is then followed.
    cluster.stop(follower).await?;
    garble_pages(
        &data.join("raft-log.redb"),
        acked.last().context("no writes")?,
    )?;
    let message = refused(
        &cluster,
        follower,
        unchanged,
        &[
            "raft-log.redb",
            &format!("edgectl cluster remove-node {follower}"),
            "--join",
        ],
    )
    .await?;
    ensure!(
        message.contains(&data.to_string_lossy().into_owned()),
        "{message}"
    );
    let (status, v) = admin
        .delete(&format!("/v1/cluster/nodes/{follower}"))
        .await?;
    ensure!(
        status.is_success(),
        "removing node {follower}: {status} {v}"
    );
    acked.extend(write(&admin, "two-left", 10).await?);
    let _aside = cluster.move_data_dir_aside(follower)?;
    cluster.restart(follower).await?;
    cluster.wait_converged(3, 0).await?;
    acked.extend(write(&admin, "rejoined", 10).await?);
    for id in cluster.ids() {
        holds_all(&cluster, id, &acked).await?;
    }
    Ok(())
}
