//! A real Prometheus in the loop: the `prometheus` server (Debian package
//! `prometheus`, as for `promtool`) scrapes a local 3-node cluster with the
//! kit's `prometheus.yml` (its targets and intervals replaced) and
//! evaluates the kit's alert rules. Through its HTTP API: every instance's
//! series exist on every node, and so do the Raft and gossip series; every
//! rule evaluates without error; every alert's expression and every
//! dashboard query parses and returns data, except those known to be empty
//! on a healthy cluster (each with its reason).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::deploy::{backend, backend_answering, collect_exprs, deploy_dir, get_through, tool};
use crate::local::Local;
use crate::support::{Subnet, TempDir, http_get, poll};

/// Alerts whose expression is empty on a healthy cluster, and why; those
/// marked `true` must be (the others may blink: a report's age nears the
/// limit between two idle reports, say).
const QUIET_ALERTS: &[(&str, &str, bool)] = &[
    ("EdgelbNodeDown", "every node is up", true),
    ("EdgelbNoLeader", "the cluster has a leader", true),
    ("EdgelbRaftPreVotes", "no voter lost its leader", false),
    ("EdgelbApplyLag", "every node has applied the log", false),
    ("EdgelbGossipStale", "reports are fresh", false),
    (
        "EdgelbNodeCertExpiring",
        "the node certificates are new (90 days)",
        true,
    ),
    ("EdgelbDataDirFull", "the disk has room", true),
    ("EdgelbDataDirFilling", "the disk has room", false),
];

/// Dashboard queries that are empty on a healthy cluster, and why.
const QUIET_PANELS: &[(&str, &str)] = &[(
    "edgelb_gossip_reports_dropped_total",
    "no report is dropped on loopback",
)];

/// A PromQL query through the HTTP API: its `data.result` (an error when
/// it does not parse or evaluate).
async fn query(prom: &str, promql: &str) -> anyhow::Result<Vec<Value>> {
    let q: String =
        percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let (code, body) = http_get(prom, &format!("/api/v1/query?query={q}")).await?;
    let v: Value = serde_json::from_str(&body).with_context(|| format!("{code}: {body}"))?;
    anyhow::ensure!(
        code == 200 && v["status"] == "success",
        "{promql:?}: {code} {body}"
    );
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The kit's `prometheus.yml` with the local nodes as targets and
/// one-second intervals.
fn scrape_config(admins: &[SocketAddr]) -> anyhow::Result<String> {
    let kit = std::fs::read_to_string(deploy_dir().join("prometheus.yml"))?;
    let head = kit
        .split("    static_configs:\n")
        .next()
        .context("no static_configs in prometheus.yml")?;
    for interval in [
        "scrape_interval: 15s",
        "evaluation_interval: 15s",
        "scrape_interval: 5s",
    ] {
        anyhow::ensure!(head.contains(interval), "prometheus.yml lacks {interval}");
    }
    let mut config = head
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("scrape_timeout: 4s", "scrape_timeout: 1s");
    config.push_str("    static_configs:\n");
    for (k, a) in admins.iter().enumerate() {
        config.push_str(&format!(
            "      - targets: [\"{a}\"]\n        labels: {{ region: local, node: local-{} }}\n",
            k + 1
        ));
    }
    Ok(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_cluster_and_every_rule_and_panel_answers()
-> anyhow::Result<()> {
    if tool("prometheus", "EDGELB_REQUIRE_PROMETHEUS").is_none() {
        return Ok(());
    }
    let net = Subnet::allocate();
    let local = Local::start(&net, &[]).await?;
    let admins: Vec<SocketAddr> = local
        .urls
        .iter()
        .map(|u| u.trim_start_matches("http://").parse())
        .collect::<Result<_, _>>()?;

    // Traffic: a group with a working instance and one that refuses
    // (connect errors, an instance down), and a group whose instance
    // answers 500.
    let up = net.ip(2);
    backend(SocketAddr::from((up, 8080))).await?;
    let refused = net.ip(3).to_string();
    let failing = net.ip(4);
    backend_answering(
        SocketAddr::from((failing, 8080)),
        "500 Internal Server Error",
    )
    .await?;
    let failing = failing.to_string();
    for args in [
        &["service", "create", "-n", "prom", "7700:8080/http"][..],
        &[
            "instance",
            "attach",
            "prom",
            "--address",
            &up.to_string(),
            "--name",
            "up-1",
        ],
        &[
            "instance",
            "attach",
            "prom",
            "--address",
            &refused,
            "--name",
            "refused-1",
        ],
        &["service", "create", "-n", "prom-down", "7701:8080/http"],
        &[
            "instance",
            "attach",
            "prom-down",
            "--address",
            &failing,
            "--name",
            "err-1",
        ],
    ] {
        local.ctl(1, args).await?.ok()?;
    }
    let node_ips: Vec<_> = (11..=13).map(|h| net.ip(h)).collect();
    let traffic = || async {
        for ip in &node_ips {
            for _ in 0..8 {
                let ok = poll(
                    "a request through the group",
                    Duration::from_secs(20),
                    || get_through(*ip, 7700),
                )
                .await?;
                anyhow::ensure!(ok.starts_with("HTTP/1.1 200"), "{ok}");
                // The last attach was answered once node 1 applied it; the
                // others apply it a moment later (SPEC §5), and until then
                // this group has no instance there (503).
                poll(
                    "the failing group's answer",
                    Duration::from_secs(20),
                    || async {
                        let bad = get_through(*ip, 7701).await?;
                        anyhow::ensure!(bad.starts_with("HTTP/1.1 500"), "{bad}");
                        anyhow::Ok(())
                    },
                )
                .await?;
            }
        }
        anyhow::Ok(())
    };
    traffic().await?;

    // Prometheus, with the kit's rules.
    let dir = TempDir::new("prometheus");
    std::fs::create_dir_all(dir.path())?;
    std::fs::copy(
        deploy_dir().join("edgelb-alerts.yml"),
        dir.path().join("edgelb-alerts.yml"),
    )?;
    std::fs::write(dir.path().join("prometheus.yml"), scrape_config(&admins)?)?;
    let listen = SocketAddr::from((net.ip(20), 9090));
    let mut server = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus")?;
    let prom = format!("http://{listen}");
    let checked = check(&prom, &admins, &traffic).await;
    // Ended by its pid (kill_on_drop would too).
    let _ = server.start_kill();
    let _ = server.wait().await;
    let pids = local.pids.clone();
    local.stop(&pids).await?;
    checked
}

async fn check<F, Fut>(prom: &str, admins: &[SocketAddr], traffic: &F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    // Every node scraped.
    poll(
        "Prometheus to scrape the three nodes",
        Duration::from_secs(60),
        || async {
            let up = query(prom, "up{job=\"edgelb\"} == 1").await?;
            anyhow::ensure!(up.len() == admins.len(), "up: {up:?}");
            Ok(())
        },
    )
    .await?;

    // Every instance's series, on every node (SPEC §7), with the labels
    // the dashboard filters on.
    let per_instance = [
        "edgelb_instance_inflight",
        "edgelb_instance_inflight_global",
        "edgelb_instance_selected_total",
        "edgelb_instance_connections_total",
        "edgelb_instance_connect_errors_total",
        "edgelb_instance_up",
    ];
    for name in per_instance {
        poll(
            &format!("{name} for every node and instance"),
            Duration::from_secs(30),
            || async {
                let r = query(
                    prom,
                    &format!("count by (instance, service, instance_name, node, region) ({name})"),
                )
                .await?;
                // 3 nodes × (prom: up-1, refused-1; prom-down: err-1).
                anyhow::ensure!(r.len() == admins.len() * 3, "{name}: {r:?}");
                Ok(())
            },
        )
        .await?;
    }
    for (name, by) in [
        ("edgelb_instance_requests_total", "code_class"),
        ("edgelb_instance_bytes_total", "direction"),
        ("edgelb_instance_request_duration_seconds_bucket", "le"),
    ] {
        let r = query(
            prom,
            &format!("count by (instance, instance_name) ({name}{{instance_name=\"up-1\"}})"),
        )
        .await?;
        anyhow::ensure!(r.len() == admins.len(), "{name} by {by}: {r:?}");
    }
    // Raft: one leader among three, every node's term and indexes.
    for name in [
        "edgelb_raft_term",
        "edgelb_raft_commit_index",
        "edgelb_raft_applied_index",
        "edgelb_raft_apply_lag",
    ] {
        let r = query(prom, name).await?;
        anyhow::ensure!(r.len() == admins.len(), "{name}: {r:?}");
    }
    let leaders = query(prom, "sum(edgelb_raft_is_leader)").await?;
    anyhow::ensure!(
        leaders.first().and_then(|v| v["value"][1].as_str()) == Some("1"),
        "leaders: {leaders:?}"
    );
    // Gossip: each node hears both others.
    poll(
        "each node's report ages of both peers",
        Duration::from_secs(30),
        || async {
            let r = query(prom, "edgelb_gossip_peer_report_age_seconds").await?;
            anyhow::ensure!(r.len() == admins.len() * 2, "{r:?}");
            Ok(())
        },
    )
    .await?;

    // Every rule evaluated without error.
    poll(
        "every rule to be evaluated",
        Duration::from_secs(30),
        || async {
            let (code, body) = http_get(prom, "/api/v1/rules").await?;
            let v: Value = serde_json::from_str(&body)?;
            anyhow::ensure!(code == 200, "{body}");
            let rules: Vec<&Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            anyhow::ensure!(rules.len() >= 10, "rules: {body}");
            for r in &rules {
                anyhow::ensure!(r["health"] == "ok", "rule {}: {r}", r["name"]);
                anyhow::ensure!(
                    !r["lastEvaluation"]
                        .as_str()
                        .unwrap_or("0001")
                        .starts_with("0001"),
                    "rule {} not evaluated yet",
                    r["name"]
                );
            }
            Ok(())
        },
    )
    .await?;

    // Every alert expression parses; those not known to be quiet return
    // data (the refusing instances make EdgelbInstanceDown and
    // EdgelbUpstream5xx fire).
    let alerts = std::fs::read_to_string(deploy_dir().join("edgelb-alerts.yml"))?;
    let mut names = Vec::new();
    let mut lines = alerts.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("- alert: ") else {
            continue;
        };
        let expr_line = lines.next().context("an alert without expr")?;
        let mut expr = expr_line
            .trim()
            .strip_prefix("expr:")
            .context("expr after alert")?
            .trim()
            .to_owned();
        if expr == "|" {
            expr.clear();
            while let Some(l) = lines.peek() {
                if l.trim().is_empty()
                    || l.trim_start().starts_with("for:")
                    || !l.starts_with("          ")
                {
                    break;
                }
                expr.push_str(l.trim());
                expr.push(' ');
                lines.next();
            }
        }
        names.push((name.to_owned(), expr));
    }
    anyhow::ensure!(names.len() >= 10, "alerts read: {names:?}");
    for (name, expr) in &names {
        let quiet = QUIET_ALERTS.iter().find(|(n, _, _)| n == name);
        let must_be_empty = quiet.is_some_and(|q| q.2);
        let quiet = quiet.is_some();
        let r = poll(
            &format!("alert {name}"),
            Duration::from_secs(30),
            || async {
                // Requests keep coming so that rates and the down marks hold.
                traffic().await?;
                let r = query(prom, expr).await?;
                anyhow::ensure!(quiet || !r.is_empty(), "{name}: {expr} returned nothing");
                Ok(r)
            },
        )
        .await?;
        if must_be_empty {
            anyhow::ensure!(r.is_empty(), "{name} fires on a healthy cluster: {r:?}");
        }
    }

    // Every dashboard query (template variables at "All", Grafana's
    // label_values() as the query it stands for) parses and returns data.
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        deploy_dir().join("grafana-dashboard.json"),
    )?)?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    anyhow::ensure!(exprs.len() >= 20, "{exprs:?}");
    for expr in exprs {
        let promql = match expr
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.split_once(", "))
        {
            Some((metric, label)) => format!("group by ({label}) ({metric})"),
            None => expr
                .replace("$__rate_interval", "1m")
                .replace("$service", ".*")
                .replace("$node", ".*"),
        };
        let quiet = QUIET_PANELS.iter().any(|(m, _)| expr.contains(m));
        poll(
            &format!("panel {expr}"),
            Duration::from_secs(30),
            || async {
                traffic().await?;
                let r = query(prom, &promql).await?;
                anyhow::ensure!(quiet || !r.is_empty(), "{promql} returned nothing");
                Ok(())
            },
        )
        .await?;
    }
    Ok(())
}
