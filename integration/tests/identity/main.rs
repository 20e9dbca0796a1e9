//! Cluster identity and admission (SPEC §9): one token per cluster, node
//! certificates only for nodes that are not members, a removed node's
//! certificate no longer writes, Raft messages whose ids differ from the
//! sender's certificate are refused, and a crash during the first start
//! leaves a node that can start again.

use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use integration::cluster::Cluster;
use integration::quic::{ClientCert, Outcome, frame_request, try_raft_stream};
use raft_store::command::Command;
use serde_json::{Value, json};

/// EX_USAGE.
const EXIT_CONFIG: i32 = 64;

fn group(name: &str) -> Value {
    json!({
        "name": name,
        "services": [{"port": 8080, "destination_port": 80, "handlers": ["http"]}],
    })
}

fn group_names(groups: &[Value]) -> Vec<String> {
    groups
        .iter()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect()
}

/// The text of a Raft stream's reply (after its length prefix).
fn reply_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Answered(bytes) => {
            String::from_utf8_lossy(bytes.get(4..).unwrap_or_default()).into_owned()
        }
        other => format!("{other:?}"),
    }
}

/// Whether the node refused the request: it closed the stream or
/// connection, or answered with an error instead of doing it.
fn refused(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Refused(_) | Outcome::StreamFailed(_) => true,
        Outcome::Answered(_) => reply_text(outcome).starts_with("{\"error\""),
    }
}

/// A member's credentials as written in its data dir.
fn member_cert(cluster: &Cluster, id: u64) -> anyhow::Result<ClientCert> {
    let tls = cluster.data_dir(id).join("tls");
    ClientCert::from_pem_files(&tls.join("node.pem"), &tls.join("node.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_another_token_refuses_to_start() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(2).await?;
    cluster.stop(2).await?;
    // The stored token is gone (a lost file, a copied data dir): the node
    // must not take the token it is given now, which the cluster never
    // chose.
    std::fs::remove_file(cluster.data_dir(2).join("token"))?;
    let out = cluster
        .run_stopped_with_token(2, "not-the-cluster-token", Duration::from_secs(40))
        .await
        .context("node 2 kept running with a token that is not the cluster's")?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("token") && out.stderr.contains("cluster"),
        "the error does not name the token: {}",
        out.stderr
    );

    // With the cluster's token it starts again and writes.
    cluster.restart(2).await?;
    cluster.admin(2).create_group(&group("after")).await?;
    Ok(())
}

/// On a restart the data dir wins (SPEC §9): started as another node, the
/// node refuses with a config error naming `node_id` (it exited 1 on a TLS
/// error before); started in another region or at another admin address,
/// it logs that the membership's record stays, and peers keep seeing that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_identity_its_data_dir_records() -> anyhow::Result<()> {
    // The start's info line shows the region the node goes by.
    let opts = integration::cluster::ClusterOptions {
        log: "warn,edgelb::app=info".into(),
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(2, opts).await?;
    let region_of = |v: &Value, id: u64| {
        v["data"]["cluster"]["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == id))
            .map(|n| n["region"].clone())
    };
    let (_, before) = cluster.admin(1).get("/v1/cluster").await?;
    let recorded = region_of(&before, 2).context("node 2 listed")?;
    cluster.stop(2).await?;
    // Refused before any port is bound: with its admin address taken, the
    // error is still the config's, not the bind's.
    let taken = std::net::TcpListener::bind(cluster.admin_addr(2))?;
    let run = cluster
        .run_stopped_with(
            2,
            |args| {
                let at = args
                    .iter()
                    .position(|a| a == "--node-id")
                    .expect("--node-id");
                args[at + 1] = "7".into();
            },
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(run.status.code(), Some(EXIT_CONFIG), "{}", run.stderr);
    assert!(
        run.stderr.contains("node_id: is 7") && run.stderr.contains("--node-id 2"),
        "{}",
        run.stderr
    );
    drop(taken);

    cluster.restart_with(2, &["--region", "elsewhere"]).await?;
    integration::wait_until("the warning", Duration::from_secs(5), || async {
        let log = cluster.stderr(2);
        log.lines()
            .any(|l| l.contains("on a restart the data dir wins") && l.contains("\"region\""))
    })
    .await
    .with_context(|| cluster.stderr(2))?;
    // Gossip groups the node by the recorded region, not the one given.
    let recorded_name = recorded.as_str().context("a region")?.to_owned();
    integration::wait_until("the start line", Duration::from_secs(5), || async {
        cluster
            .stderr(2)
            .lines()
            .any(|l| l.contains("node started"))
    })
    .await
    .with_context(|| cluster.stderr(2))?;
    let started = cluster.stderr(2);
    let line = started
        .lines()
        .find(|l| l.contains("node started"))
        .context("the start line")?;
    assert!(
        line.contains(recorded_name.as_str()) && !line.contains("elsewhere"),
        "{line}"
    );
    for id in [1, 2] {
        let (status, v) = cluster.admin(id).get("/v1/cluster").await?;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(region_of(&v, 2).as_ref(), Some(&recorded), "{v}");
    }
    cluster.stop(2).await?;
    cluster.restart(2).await?;
    cluster.ensure_no_errors()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_does_not_mint_certificates_for_members() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let view = cluster.status(1).await?;
    for target in [1_u64, 2] {
        let member = view
            .nodes
            .iter()
            .find(|n| n.node_id == target)
            .context("member in the view")?;
        let (_key, csr) = edgelb::cluster::node_key_and_csr(target)?;
        let body = json!({
            "node_id": target,
            "cluster_addr": member.cluster_addr,
            "admin_addr": member.admin_addr,
            "region": member.region,
            "csr": csr,
        });
        for via in [1_u64, 2] {
            let (status, v) = cluster.admin(via).post("/v1/cluster/nodes", &body).await?;
            assert_eq!(
                status,
                StatusCode::CONFLICT,
                "a certificate for member {target} through node {via}: {v}"
            );
            assert!(v["data"]["certificate"].is_null(), "{v}");
            let message = v["message"].as_str().unwrap_or_default();
            assert!(message.contains("member"), "{message}");
        }
    }
    // Adding an existing member again without a CSR stays an idempotent
    // no-op (a joining node retries it).
    let member = &view.nodes[1];
    let (status, v) = cluster
        .admin(1)
        .post(
            "/v1/cluster/nodes",
            &json!({
                "node_id": member.node_id,
                "cluster_addr": member.cluster_addr,
                "admin_addr": member.admin_addr,
                "region": member.region,
            }),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_cannot_write_and_raft_ids_must_match_the_certificate() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let removed = *cluster
        .ids()
        .iter()
        .rev()
        .find(|id| **id != leader)
        .context("a follower")?;
    let member = *cluster
        .ids()
        .iter()
        .find(|id| **id != leader && **id != removed)
        .context("another follower")?;
    let (status, v) = cluster
        .admin(leader)
        .delete(&format!("/v1/cluster/nodes/{removed}"))
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    cluster.kill9(removed).await?;
    let term = cluster.metric(leader, "edgelb_raft_term").await?;

    let addr = cluster.cluster_addr(leader);
    let name = edgelb::cluster::node_dns_name(leader);
    // A write and a membership change forwarded by the removed node, with
    // its own (still unexpired) certificate.
    let create = Command::CreateGroup {
        group: serde_json::from_value(json!({
            "uuid": "9a1f0e53-4b1c-4d2e-8f00-000000000009",
            "name": "intruder",
            "services": [{"port": 8081, "destination_port": 80, "handlers": ["http"]}],
            "domains": [{"fqdn": "intruder.example"}],
            "hard_limit": 10,
            "instances": [],
            "created_at": "2026-01-01T00:00:00Z",
            "persistent": false,
        }))
        .context("a group for the command")?,
    };
    let forwards = [
        serde_json::to_value(edgelb::cluster::Forward::Write(create))?,
        serde_json::to_value(edgelb::cluster::Forward::AddLearner {
            node_id: removed,
            node: raft_store::types::ClusterNode {
                region: "local".into(),
                cluster_addr: cluster.cluster_addr(removed).to_string(),
                admin_addr: format!("{}:7070", cluster.ip(removed)),
            },
        })?,
    ];
    let ask = |from: u64, rpc: &'static str, body: &Value| {
        let request = frame_request(from, rpc, body);
        let cert = member_cert(&cluster, from);
        let source = cluster.backend_ip();
        let name = name.clone();
        async move { try_raft_stream(addr, source, &name, Some(cert?), &request).await }
    };
    for body in &forwards {
        let outcome = ask(removed, "forward", body).await?;
        assert!(
            refused(&outcome),
            "the leader ran a forward from removed node {removed}: {}",
            reply_text(&outcome)
        );
    }
    // Nor does it get to campaign: its pre-vote is refused, not weighed.
    let outcome = ask(removed, "pre_vote", &json!({"last_log_id": null})).await?;
    assert!(
        refused(&outcome),
        "the leader weighed a pre-vote from removed node {removed}: {}",
        reply_text(&outcome)
    );

    // A current member speaking for another node: a vote request for
    // candidate 9 and an append as leader 9, both with a term that would
    // depose the leader if heard.
    let vote = json!({
        "vote": {"leader_id": {"term": 1000, "node_id": 9}, "committed": false},
        "last_log_id": {"leader_id": {"term": 1000, "node_id": 9}, "index": 1_000_000},
    });
    let append = json!({
        "vote": {"leader_id": {"term": 1000, "node_id": 9}, "committed": true},
        "prev_log_id": null,
        "entries": [],
        "leader_commit": null,
    });
    for (rpc, body) in [("vote", &vote), ("append_entries", &append)] {
        let outcome = ask(member, rpc, body).await?;
        assert!(
            refused(&outcome),
            "the leader heard a {rpc} from node {member} speaking for node 9: {}",
            reply_text(&outcome)
        );
    }

    let groups = group_names(&cluster.admin(leader).groups(true).await?);
    assert!(!groups.iter().any(|g| g == "intruder"), "{groups:?}");
    let view = cluster.status(leader).await?;
    assert!(
        view.nodes.iter().all(|n| n.node_id != removed),
        "the removed node is back: {view:?}"
    );
    assert_eq!(cluster.metric(leader, "edgelb_raft_term").await?, term);
    assert_eq!(view.leader_id, Some(leader));
    // The member's own requests are still heard.
    cluster
        .admin(member)
        .create_group(&group("member-write"))
        .await?;
    Ok(())
}

/// Removes everything a node's Raft wrote, keeping its certificate files
/// and token: what a crash during the first start, before the founding
/// entry was written, leaves.
fn wipe_raft_state(dir: &std::path::Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "tls" || name == "token" || name == "edgelb-test.toml" {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_that_crashed_before_founding_founds_on_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    cluster.kill9(1).await?;
    wipe_raft_state(cluster.data_dir(1))?;
    cluster.restart(1).await?;
    // The node leads a cluster of its own that records a CA: it writes,
    // and admits a new node.
    cluster.leader().await?;
    cluster.admin(1).create_group(&group("after")).await?;
    cluster.add_members(1).await?;
    cluster.wait_converged(1, 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_key_file_from_a_crash_does_not_stop_restarts() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    cluster.kill9(1).await?;
    wipe_raft_state(cluster.data_dir(1))?;
    let tls = cluster.data_dir(1).join("tls");
    std::fs::write(tls.join("node.key"), "")?;
    cluster.restart(1).await?;
    cluster.leader().await?;
    cluster.admin(1).create_group(&group("after")).await?;
    Ok(())
}

/// When node `id`'s stored certificate stops being valid.
fn stored_not_after(cluster: &Cluster, id: u64) -> anyhow::Result<time::OffsetDateTime> {
    let pem = std::fs::read_to_string(cluster.data_dir(id).join("tls/node.pem"))?;
    Ok(edgelb::cluster::pki::not_after(&pem)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_are_renewed_before_they_expire() -> anyhow::Result<()> {
    let opts = integration::cluster::ClusterOptions {
        config: "node_cert_lifetime = \"24s\"\n".into(),
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(2, opts).await?;
    let first: Vec<_> = [1, 2]
        .into_iter()
        .map(|id| stored_not_after(&cluster, id))
        .collect::<anyhow::Result<_>>()?;
    let lifetime = time::Duration::seconds(25);
    for (id, until) in [1_u64, 2].into_iter().zip(&first) {
        let left = *until - time::OffsetDateTime::now_utc();
        assert!(left <= lifetime, "node {id}'s certificate lives {left}");
    }
    // Each node renews its own with a third of the lifetime left, and
    // stores it.
    let latest = *first.iter().max().context("two nodes")?;
    integration::poll(
        "both nodes to renew their certificates",
        Duration::from_secs(40),
        || async {
            for (id, until) in [1_u64, 2].into_iter().zip(&first) {
                let now = stored_not_after(&cluster, id)?;
                anyhow::ensure!(now > *until, "node {id} still has {until}");
            }
            Ok(())
        },
    )
    .await?;
    // Past the first certificates' expiry, every connection is made anew:
    // node 1 restarts (with its renewed file) and node 2 presents the
    // certificate it renewed in memory.
    integration::poll(
        "the first certificates to expire",
        Duration::from_secs(40),
        || async {
            anyhow::ensure!(time::OffsetDateTime::now_utc() > latest + time::Duration::seconds(1));
            Ok(())
        },
    )
    .await?;
    cluster.kill9(1).await?;
    cluster.restart(1).await?;
    cluster.leader().await?;
    cluster
        .admin(2)
        .create_group(&group("after-renewal"))
        .await?;
    let groups = group_names(&cluster.admin(1).groups(false).await?);
    assert!(groups.iter().any(|g| g == "after-renewal"), "{groups:?}");
    Ok(())
}
