//! The deployment kit under `ops/deploy/`: each example config loads with
//! the node's own loader, the systemd unit verifies, the Prometheus config
//! passes `promtool`, and every metric the dashboard and the alerts query
//! is exported by a live node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use edgelb::config::{Args, Config};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Node, Subnet, TOKEN, edgectl, edgectl_bin, http_get, poll};

pub(crate) fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Whether a missing tool fails the test (`EDGELB_REQUIRE_<NAME>=1`) or
/// skips the check.
pub(crate) fn tool(name: &str, require_var: &str) -> Option<()> {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(());
    }
    assert!(
        std::env::var(require_var).as_deref() != Ok("1"),
        "{name} is not installed and {require_var}=1"
    );
    eprintln!("skipping: {name} is not installed (set {require_var}=1 to fail instead)");
    None
}

/// Every `edgelb_*` metric name in `text` (PromQL, YAML or JSON).
pub(crate) fn edgelb_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("edgelb_") {
        let start = i + off;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Every metric name the Grafana dashboard's queries use.
pub(crate) fn dashboard_metrics() -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(deploy_dir().join("grafana-dashboard.json"))?;
    let dashboard: Value = serde_json::from_str(&text).context("the dashboard is not JSON")?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    anyhow::ensure!(!exprs.is_empty(), "the dashboard has no queries");
    Ok(exprs.iter().flat_map(|e| edgelb_names(e)).collect())
}

pub(crate) fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The sample names of a Prometheus text-format scrape.
pub(crate) fn metric_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The node's loader, reading no variables of the shell the test runs in.
fn load(args: Args) -> Result<Config, edgelb::config::ConfigError> {
    Config::load_with(args, |_| None)
}

#[test]
fn example_configs_load_with_the_node_loader() -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("config"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        [
            "ams-1", "ams-2", "fra-1", "fra-2", "nyc-1", "nyc-2", "nyc-3"
        ]
    );
    let mut by_id = BTreeMap::new();
    let mut addrs = BTreeSet::new();
    for (path, name) in files.iter().zip(&names) {
        // The token comes from EDGELB_TOKEN (edgelb.env), as a flag would.
        let args = Args {
            config: Some(path.clone()),
            token: Some(TOKEN.to_owned()),
            ..Args::default()
        };
        let c = load(args).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let region = name.split('-').next().unwrap_or_default();
        assert_eq!(c.region, region, "{name}");
        assert_eq!(c.max_voters, 5, "{name}");
        assert_eq!(c.data_dir, Path::new("/var/lib/edgelb"), "{name}");
        assert_eq!(
            c.join.is_none(),
            name == "fra-1",
            "{name}: only fra-1 founds"
        );
        assert!(!c.listen_ip.is_loopback(), "{name}");
        for a in [c.admin_addr, c.cluster_addr] {
            assert!(addrs.insert(a), "{name}: {a} is used twice");
        }
        assert!(
            by_id.insert(c.node_id, name.clone()).is_none(),
            "{name}: node id {} twice",
            c.node_id
        );
        if c.join.is_some() {
            // Without the token a joining node is a config error naming it.
            let err = load(Args {
                config: Some(path.clone()),
                ..Args::default()
            })
            .err()
            .with_context(|| format!("{name} loaded without a token"))?;
            assert_eq!(err.field, "token", "{name}");
        }
    }
    // Voters 1..=5 in three regions (started in id order), learners past that.
    let order: Vec<&str> = by_id.values().map(String::as_str).collect();
    assert_eq!(
        order,
        [
            "fra-1", "fra-2", "ams-1", "ams-2", "nyc-1", "nyc-2", "nyc-3"
        ]
    );

    // The example environment file's token is one the node accepts.
    let env = std::fs::read_to_string(deploy_dir().join("edgelb.env.example"))?;
    let token = env
        .lines()
        .find_map(|l| l.strip_prefix("EDGELB_TOKEN="))
        .context("no EDGELB_TOKEN= line")?;
    load(Args {
        token: Some(token.to_owned()),
        ..Args::default()
    })
    .map_err(|e| anyhow::anyhow!("edgelb.env.example: {e}"))?;
    Ok(())
}

#[test]
fn systemd_unit_is_hardened_and_verifies() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(deploy_dir().join("edgelb.service"))?;
    for line in [
        // READY=1 from the node, and MAINPID from an upgrade's new process.
        "Type=notify",
        "NotifyAccess=all",
        "ExecStart=/usr/local/bin/edgelb --config /etc/edgelb/edgelb.toml",
        "ExecReload=/bin/kill -USR2 $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=64 65",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edgelb",
        // The access log's directory (made writable by systemd).
        "LogsDirectory=edgelb",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=1048576",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "edgelb.service lacks {line}"
        );
    }
    if tool("systemd-analyze", "EDGELB_REQUIRE_SYSTEMD_ANALYZE").is_none() {
        return Ok(());
    }
    // verify wants ExecStart to exist: point it at a binary that does.
    let dir = crate::support::TempDir::new("unit");
    let copy = dir.path().join("edgelb.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/edgelb", edgectl_bin()))?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("edgelb.service"))
        .collect();
    assert!(
        about_ours.is_empty(),
        "systemd-analyze verify: {about_ours:?}"
    );
    Ok(())
}

#[test]
fn prometheus_config_passes_promtool() -> anyhow::Result<()> {
    if tool("promtool", "EDGELB_REQUIRE_PROMTOOL").is_none() {
        return Ok(());
    }
    let out = Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(deploy_dir())
        .output()?;
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The config loads the alerting rules; promtool checked them too.
    assert!(String::from_utf8_lossy(&out.stdout).contains("rule files found"));
    Ok(())
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() -> anyhow::Result<()> {
    if tool("promtool", "EDGELB_REQUIRE_PROMTOOL").is_none() {
        return Ok(());
    }
    let out = Command::new("promtool")
        .args(["test", "rules", "edgelb-alerts.test.yml"])
        .current_dir(deploy_dir())
        .output()?;
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// An HTTP/1.1 backend that answers every request with 200 `ok` and closes.
pub(crate) async fn backend(addr: SocketAddr) -> anyhow::Result<()> {
    backend_answering(addr, "200 OK").await
}

/// An HTTP/1.1 backend that answers every request with `status` (`500
/// Internal Server Error`, say) and `ok`, and closes.
pub(crate) async fn backend_answering(
    addr: SocketAddr,
    status: &'static str,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0_u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// One `GET /` through published `port` of `ip` → the raw response.
pub(crate) async fn get_through(ip: IpAddr, port: u16) -> anyhow::Result<String> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: dash.edgelb.local\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_exported_metrics() -> anyhow::Result<()> {
    let queried = dashboard_metrics()?;
    for family in [
        "edgelb_instance_inflight",
        "edgelb_instance_inflight_global",
        "edgelb_instance_requests_total",
        "edgelb_instance_connect_errors_total",
        "edgelb_instance_request_duration_seconds_bucket",
        "edgelb_raft_is_leader",
        "edgelb_raft_term",
        "edgelb_gossip_peer_report_age_seconds",
    ] {
        assert!(
            queried.contains(family),
            "the dashboard does not show {family}"
        );
    }
    let alerts = std::fs::read_to_string(deploy_dir().join("edgelb-alerts.yml"))?;
    let mut all = queried.clone();
    all.extend(edgelb_names(&alerts));

    // A live node with some traffic.
    let net = Subnet::allocate();
    let node = Node::start(&net).await?;
    let backend_ip = net.ip(2);
    backend(SocketAddr::from((backend_ip, 8080))).await?;
    let api = node.url.as_str();
    let ctl = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        edgectl(&refs).await
    };
    let base = |rest: &[&str]| {
        let mut v: Vec<String> = ["--api", api, "--token", TOKEN].map(str::to_owned).to_vec();
        v.extend(rest.iter().map(|s| (*s).to_owned()));
        v
    };
    ctl(base(&["service", "create", "-n", "dash", "7600:8080/http"]))
        .await?
        .ok()?;
    ctl(base(&[
        "instance",
        "attach",
        "dash",
        "--address",
        &backend_ip.to_string(),
        "--name",
        "b1",
    ]))
    .await?
    .ok()?;
    let reply = poll(
        "a request through the balancer",
        Duration::from_secs(20),
        || get_through(node.ip, 7600),
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    let (code, scrape) = http_get(api, "/metrics").await?;
    assert_eq!(code, 200);
    let exported = metric_names(&scrape);
    let missing: Vec<&String> = all
        .iter()
        .filter(|n| !exported.contains(*n))
        // A one-node cluster has no peers, so some gossip series (report
        // ages) do not exist; the 3-node `cluster local` test checks those.
        .filter(|n| !n.starts_with("edgelb_gossip_"))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
    node.stop().await;
    Ok(())
}

#[test]
fn metric_name_extraction() {
    let names = edgelb_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(edgelb_instance_request_duration_seconds_bucket{x="edgelb"}[5m]))) + notedgelb_x"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["edgelb_instance_request_duration_seconds_bucket"]
    );
    let scrape = "# HELP a b\nedgelb_raft_term 3\nedgelb_x{a=\"b\"} 1\n";
    assert_eq!(
        metric_names(scrape).into_iter().collect::<Vec<_>>(),
        ["edgelb_raft_term", "edgelb_x"]
    );
}
