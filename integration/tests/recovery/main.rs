//! Disaster recovery (README: Disaster recovery): a cluster that lost two
//! of its three nodes for good, data dirs included, comes back from the
//! survivor (`--force-new-cluster`) and, separately, from a backup file
//! (`GET /v1/cluster/backup`, `--restore FILE`) onto fresh data dirs;
//! every group and instance is back, requests are served, and new nodes
//! join with `--join`. The survivor's recovery runs with 50 ms between
//! the nodes (the link emulator), as across regions.

use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use integration::{Cluster, ClusterOptions, HttpBackend, Link, TempDir, poll};
use serde_json::{Value, json};

const PORT: u16 = 8300;
const BACKEND_PORT: u16 = 7300;

/// Two groups with two instances each, created through node 1; returns
/// them (as `GET /v1/services` lists them, by uuid) and the backends.
async fn populate(cluster: &Cluster) -> anyhow::Result<(Vec<Value>, Vec<HttpBackend>)> {
    let backends = cluster
        .http_backends(&["a-1", "a-2", "b-1", "b-2"], BACKEND_PORT)
        .await?;
    cluster
        .http_group(1, "alpha", PORT, BACKEND_PORT, &backends[..2])
        .await?;
    cluster
        .http_group(1, "beta", PORT + 1, BACKEND_PORT, &backends[2..])
        .await?;
    let (status, v) = cluster
        .admin(1)
        .patch(
            "/v1/services/beta",
            &json!({"prop": "hard_limit", "op": "set", "value": 7}),
        )
        .await?;
    anyhow::ensure!(status.is_success(), "{status} {v}");
    Ok((groups(cluster, 1).await?, backends))
}

/// Node `id`'s groups, sorted by uuid, after a linearizable read.
async fn groups(cluster: &Cluster, id: u64) -> anyhow::Result<Vec<Value>> {
    let mut g = cluster.admin(id).groups(true).await?;
    g.sort_by_key(|g| g["uuid"].as_str().unwrap_or_default().to_owned());
    Ok(g)
}

/// Node `id` holds `expected` and serves both groups' ports.
async fn holds(cluster: &Cluster, id: u64, expected: &[Value]) -> anyhow::Result<()> {
    let got = groups(cluster, id).await?;
    assert_eq!(got, expected, "node {id}'s groups");
    for (port, group) in [(PORT, "alpha"), (PORT + 1, "beta")] {
        let r = poll(
            &format!("node {id} to serve {group}"),
            Duration::from_secs(20),
            || async {
                let r =
                    integration::client::get(cluster.data_addr(id, port), "x.test", "/").await?;
                anyhow::ensure!(r.status == StatusCode::OK, "{}", r.status);
                Ok(r)
            },
        )
        .await?;
        let backend = r.backend().context("no backend named")?.to_owned();
        assert!(
            backend.starts_with(&group[..1]),
            "{group} answered by {backend}"
        );
    }
    Ok(())
}

/// A write through node `id`: a third instance attached to alpha, then
/// detached again.
async fn writes(cluster: &Cluster, id: u64) -> anyhow::Result<()> {
    let admin = cluster.admin(id);
    let (status, v) = admin
        .post(
            "/v1/services/alpha/instances",
            &json!({"name": "probe", "address": "127.0.0.99"}),
        )
        .await?;
    anyhow::ensure!(status.is_success(), "attach through {id}: {status} {v}");
    let (status, v) = admin.delete("/v1/services/alpha/instances/probe").await?;
    anyhow::ensure!(status.is_success(), "detach through {id}: {status} {v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_nodes_lost_for_good_come_back_from_the_survivor() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(
        3,
        ClusterOptions {
            relay: Some(17),
            link: Link::delayed(Duration::from_millis(50), Duration::from_millis(5)),
            ..ClusterOptions::default()
        },
    )
    .await?;
    let (expected, _backends) = populate(&cluster).await?;
    for id in [2, 3] {
        cluster
            .wait_applied(id, cluster.status(1).await?.commit_index)
            .await?;
    }
    // Two machines gone with their disks.
    for id in [2, 3] {
        cluster.kill9(id).await?;
        drop(cluster.move_data_dir_aside(id)?);
    }
    // The survivor serves but cannot write.
    let (status, _) = cluster
        .admin(1)
        .post(
            "/v1/services/alpha/instances",
            &json!({"name": "stuck", "address": "127.0.0.98"}),
        )
        .await?;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a write without a quorum"
    );

    // A start with --force-new-cluster founds a one-node cluster from its
    // applied state.
    cluster.stop(1).await?;
    cluster.restart_with(1, &["--force-new-cluster"]).await?;
    let view = cluster.status(1).await?;
    assert_eq!(
        (view.voters(), view.learners(), view.leader_id),
        (1, 0, Some(1)),
        "{view:?}"
    );
    holds(&cluster, 1, &expected).await?;
    writes(&cluster, 1).await?;
    let data = cluster.data_dir(1);
    assert!(
        !data.join("restore.json").exists(),
        "the restore's marker stays"
    );
    let replaced = std::fs::read_dir(data)?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("replaced-"));
    assert!(replaced, "the old Raft files were not moved aside");
    // The flag left on: refused, the node alone is a quorum now.
    cluster.stop(1).await?;
    let run = cluster
        .run_stopped_with(
            1,
            |args| args.push("--force-new-cluster".into()),
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(run.status.code(), Some(64), "{}", run.stderr);
    assert!(run.stderr.contains("only voter"), "{}", run.stderr);
    cluster.restart(1).await?;

    // New machines join it; a restart of the survivor without the flag
    // keeps the new cluster.
    cluster.restart_all(&[2, 3]).await?;
    cluster.wait_converged(3, 0).await?;
    for id in [2, 3] {
        holds(&cluster, id, &expected).await?;
    }
    cluster.stop(1).await?;
    cluster.restart(1).await?;
    cluster.wait_converged(3, 0).await?;
    holds(&cluster, 1, &expected).await?;
    writes(&cluster, 2).await?;
    cluster.ensure_no_errors()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_the_cluster_onto_fresh_machines() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let (expected, _backends) = populate(&cluster).await?;
    let (status, v) = cluster
        .admin(2)
        .get("/v1/cluster/backup?consistent=true")
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let backup = &v["data"]["backup"];
    assert_eq!(backup["format"], 1);
    assert_eq!(backup["node_id"], 2);
    assert_eq!(backup["groups"].as_array().map(Vec::len), Some(2));
    assert!(
        backup["cluster"]["ca_key_pem"]
            .as_str()
            .is_some_and(|k| k.contains("PRIVATE KEY")),
        "the backup keeps the CA key"
    );
    // Without the token: 401, as every /v1 route.
    let (status, _) = cluster
        .admin(2)
        .request_as(http::Method::GET, "/v1/cluster/backup", None, None)
        .await
        .map(|r| (r.status, ()))?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let dir = TempDir::new("backup");
    std::fs::create_dir_all(dir.path())?;
    let file = dir.path().join("edgelb-backup.json");
    std::fs::write(&file, serde_json::to_vec_pretty(backup)?)?;
    let file_arg = file.to_str().context("utf-8 path")?.to_owned();

    // Every machine lost, disks too.
    for id in [1, 2, 3] {
        cluster.kill9(id).await?;
        drop(cluster.move_data_dir_aside(id)?);
    }
    // Refused: a wrong token, and --join with it.
    let run = cluster
        .run_stopped_with(
            1,
            |args| {
                let t = args.iter().position(|a| a == "--token").expect("--token");
                args[t + 1] = "another-token-0123456789".into();
                args.extend(["--restore".into(), file_arg.clone()]);
            },
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(run.status.code(), Some(64), "{}", run.stderr);
    assert!(run.stderr.contains("token"), "{}", run.stderr);

    cluster.restart_with(1, &["--restore", &file_arg]).await?;
    holds(&cluster, 1, &expected).await?;
    writes(&cluster, 1).await?;
    cluster.restart_all(&[2, 3]).await?;
    cluster.wait_converged(3, 0).await?;
    for id in [2, 3] {
        holds(&cluster, id, &expected).await?;
    }
    // The restored node's data dir now has Raft state: --restore again is
    // refused rather than founding over it.
    cluster.stop(1).await?;
    let run = cluster
        .run_stopped_with(
            1,
            |args| args.extend(["--restore".into(), file_arg.clone()]),
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(run.status.code(), Some(64), "{}", run.stderr);
    assert!(run.stderr.contains("holds Raft state"), "{}", run.stderr);
    cluster.restart(1).await?;
    cluster.wait_converged(3, 0).await?;
    writes(&cluster, 1).await?;
    cluster.ensure_no_errors()
}
