//! `cluster status|add-node|remove-node` on a one-node cluster.

use serde_json::Value;

use crate::support::{Node, Subnet, TOKEN, edgectl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_add_and_remove_a_node() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start(&net).await?;
    let api = node.url.as_str();
    let admin_addr = api.trim_start_matches("http://");
    let ctl = |args: &'static [&'static str]| {
        let mut all = vec!["--api", api, "--token", TOKEN];
        all.extend_from_slice(args);
        async move { edgectl(&all).await }
    };

    let status = ctl(&["cluster", "status"]).await?.ok()?;
    let lines: Vec<&str> = status.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", status.stdout);
    assert!(
        lines[0].starts_with("node 1 sees leader 1, term "),
        "{}",
        status.stdout
    );
    assert!(
        lines[1].starts_with("NODE  REGION  ROLE   LEADER  CLUSTER ADDR"),
        "{}",
        status.stdout
    );
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["1*", "local", "voter", "yes"],
        "{}",
        status.stdout
    );
    assert_eq!(row[5], admin_addr, "{}", status.stdout);

    let json = ctl(&["cluster", "status", "-o", "json"]).await?.ok()?;
    let v: Value = serde_json::from_str(&json.stdout)?;
    assert_eq!(v["cluster"]["leader_id"], 1, "{v}");
    assert_eq!(
        v["cluster"]["nodes"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    let list = ctl(&["cluster", "status", "-o", "list"]).await?.ok()?;
    assert!(
        list.stdout.contains("      members: 1\n"),
        "{}",
        list.stdout
    );

    // A node for an own-PKI cluster, added by hand, then removed.
    let ip2 = net.ip(2);
    let cluster2 = format!("{ip2}:7071");
    let admin2 = format!("{ip2}:7070");
    let added = edgectl(&[
        "--api",
        api,
        "--token",
        TOKEN,
        "cluster",
        "add-node",
        "--node-id",
        "2",
        "--cluster-addr",
        &cluster2,
        "--admin-addr",
        &admin2,
        "--region",
        "ams",
    ])
    .await?
    .ok()?;
    assert!(
        added.stdout.starts_with("added node 2 (ams"),
        "{}",
        added.stdout
    );
    let status = ctl(&["cluster", "status"]).await?.ok()?;
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.starts_with("2 ") && l.contains("learner") && l.contains(&admin2)),
        "{}",
        status.stdout
    );
    let removed = ctl(&["cluster", "remove-node", "2"]).await?.ok()?;
    assert_eq!(removed.stdout, "removed node 2\n");

    // Refusals: one line, exit 1.
    ctl(&["cluster", "remove-node", "9"])
        .await?
        .fails(1, "(HTTP 404)");
    ctl(&["cluster", "remove-node", "1"])
        .await?
        .fails(1, "last voter");
    edgectl(&[
        "--api",
        api,
        "--token",
        TOKEN,
        "cluster",
        "add-node",
        "--node-id",
        "3",
        "--cluster-addr",
        "nowhere",
        "--admin-addr",
        &admin2,
    ])
    .await?
    .fails(1, "(HTTP 400)");
    // clap refuses node id 0.
    assert_eq!(ctl(&["cluster", "remove-node", "0"]).await?.code, 2);
    node.stop().await;
    Ok(())
}

/// `cluster backup FILE`: the backup of the groups, written 0600; an
/// existing file is kept unless `--force`; `--stale` reads the node's own
/// copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_backup_writes_the_state_to_a_private_file() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let net = Subnet::allocate();
    let node = Node::start(&net).await?;
    let api = node.url.as_str();
    let ctl = |args: Vec<String>| async move {
        let mut all = vec![
            "--api".to_owned(),
            api.to_owned(),
            "--token".to_owned(),
            TOKEN.to_owned(),
        ];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        edgectl(&refs).await
    };
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    ctl(s(&["service", "create", "-n", "kept", "7800:8080/http"]))
        .await?
        .ok()?;
    ctl(s(&[
        "instance",
        "attach",
        "kept",
        "--address",
        "10.0.0.7",
        "--name",
        "i1",
    ]))
    .await?
    .ok()?;
    let dir = crate::support::TempDir::new("backup");
    std::fs::create_dir_all(dir.path())?;
    let file = dir.path().join("b.json");
    let path = file.to_string_lossy().into_owned();
    let run = ctl(s(&["cluster", "backup", &path])).await?.ok()?;
    assert!(
        run.stdout.starts_with(&format!(
            "wrote {path}: 1 groups, 1 instances, 0 certificates, applied index "
        )),
        "{}",
        run.stdout
    );
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let backup: Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    assert_eq!(backup["format"], 1);
    assert_eq!(backup["groups"][0]["name"], "kept");
    assert_eq!(backup["groups"][0]["instances"][0]["name"], "i1");
    // An existing file is kept.
    let again = ctl(s(&["cluster", "backup", &path])).await?;
    assert_ne!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains(&path), "{}", again.stderr);
    let forced = ctl(s(&[
        "-o", "json", "cluster", "backup", "--stale", "--force", &path,
    ]))
    .await?
    .ok()?;
    let v: Value = serde_json::from_str(&forced.stdout)?;
    assert_eq!(
        (v["groups"].as_u64(), v["instances"].as_u64()),
        (Some(1), Some(1))
    );
    node.stop().await;
    Ok(())
}
