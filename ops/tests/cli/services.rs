//! Service groups and instances through `edgectl`, with golden outputs.

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::support::{Node, Run, Subnet, TOKEN, edgectl, edgectl_env};

/// `edgectl --api URL --token TOKEN args…`.
async fn ctl(node: &Node, args: &[&str]) -> anyhow::Result<Run> {
    ctl_env(node, args, &[]).await
}

async fn ctl_env(node: &Node, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Run> {
    let mut all = vec!["--api", node.url.as_str(), "--token", TOKEN];
    all.extend_from_slice(args);
    edgectl_env(&all, env).await
}

/// A made-up uuid numbered `n`, as long as a real one.
fn fake_uuid(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// Replaces every `(from, to)` in `text`.
fn normalise(text: &str, names: &[(String, String)]) -> String {
    names
        .iter()
        .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lifecycle_with_golden_outputs() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start(&net).await?;

    // The seed's shorthand, with a domain of our own.
    let web = ctl(
        &node,
        &[
            "service",
            "create",
            "-n",
            "web",
            "-d",
            "web.example.com",
            "443:8080",
        ],
    )
    .await?
    .ok()?;
    assert!(
        web.stdout
            .contains("  services: 443:8080/tls+http 80:443/http+redirect\n"),
        "{}",
        web.stdout
    );
    // Explicit specs, a hard limit, the default domain, through EDGELB_API
    // and EDGELB_TOKEN.
    let env = [("EDGELB_API", node.url.as_str()), ("EDGELB_TOKEN", TOKEN)];
    edgectl_env(
        &[
            "service",
            "create",
            "--name",
            "api",
            "--hard-limit",
            "100",
            "8000:8080/http",
            "9000:5432",
        ],
        &env,
    )
    .await?
    .ok()?;
    let attached = ctl(
        &node,
        &[
            "instance",
            "attach",
            "web",
            "--address",
            "web-1.internal",
            "--name",
            "web-1",
        ],
    )
    .await?
    .ok()?;
    assert!(
        attached.stdout.contains("   name: web-1\n"),
        "{}",
        attached.stdout
    );
    assert!(
        attached.stdout.contains("  state: up\n"),
        "{}",
        attached.stdout
    );

    // What the API holds, to normalise the uuids (to fixed ones of the same
    // length, so columns stay aligned) and to fix the clock.
    let json = ctl(&node, &["service", "list", "-o", "json"]).await?.ok()?;
    let data: Value = serde_json::from_str(&json.stdout)?;
    let groups = data["service_groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(groups.len(), 2, "{data}");
    let mut names = Vec::new();
    let mut latest = OffsetDateTime::UNIX_EPOCH;
    for g in &groups {
        let name = g["name"].as_str().unwrap_or_default();
        names.push((
            g["uuid"].as_str().unwrap_or_default().to_owned(),
            fake_uuid(names.len()),
        ));
        let _ = name;
        let created = g["created_at"].as_str().unwrap_or_default();
        latest = latest.max(OffsetDateTime::parse(created, &Rfc3339)?);
        names.push((created.to_owned(), "<created_at>".to_owned()));
        for i in g["instances"].as_array().into_iter().flatten() {
            names.push((
                i["uuid"].as_str().unwrap_or_default().to_owned(),
                fake_uuid(names.len()),
            ));
        }
    }
    let now = (latest + Duration::minutes(14)).format(&Rfc3339)?;
    let at_now = [("EDGECTL_NOW", now.as_str())];

    assert_eq!(
        normalise(&json.stdout, &names),
        r#"{
  "service_groups": [
    {
      "uuid": "00000000-0000-4000-8000-000000000000",
      "name": "api",
      "domains": [
        {
          "fqdn": "api.edgelb.local"
        }
      ],
      "services": [
        {
          "port": 8000,
          "destination_port": 8080,
          "handlers": [
            "http"
          ]
        },
        {
          "port": 9000,
          "destination_port": 5432,
          "handlers": []
        }
      ],
      "hard_limit": 100,
      "instances": [],
      "created_at": "<created_at>",
      "persistent": true
    },
    {
      "uuid": "00000000-0000-4000-8000-000000000002",
      "name": "web",
      "domains": [
        {
          "fqdn": "web.example.com"
        }
      ],
      "services": [
        {
          "port": 443,
          "destination_port": 8080,
          "handlers": [
            "tls",
            "http"
          ]
        },
        {
          "port": 80,
          "destination_port": 443,
          "handlers": [
            "http",
            "redirect"
          ]
        }
      ],
      "hard_limit": 65535,
      "instances": [
        {
          "uuid": "00000000-0000-4000-8000-000000000004",
          "name": "web-1",
          "address": "web-1.internal"
        }
      ],
      "created_at": "<created_at>",
      "persistent": true
    }
  ]
}
"#
    );

    // The seed's `-o list`: its fields in its order, keys right-aligned.
    let list = ctl_env(&node, &["service", "list", "-o", "list"], &at_now)
        .await?
        .ok()?;
    assert_eq!(
        normalise(&list.stdout, &names),
        "      uuid: 00000000-0000-4000-8000-000000000000
      name: api
      fqdn: api.edgelb.local
  services: 8000:8080/http 9000:5432
 instances:
created at: 14 minutes ago
persistent: true

      uuid: 00000000-0000-4000-8000-000000000002
      name: web
      fqdn: web.example.com
  services: 443:8080/tls+http 80:443/http+redirect
 instances: 00000000-0000-4000-8000-000000000004
created at: 14 minutes ago
persistent: true
"
    );
    // `ls` is `list`, and a table by default.
    let table = ctl_env(&node, &["service", "ls"], &at_now).await?.ok()?;
    assert_eq!(
        table.stdout,
        "NAME  FQDN              SERVICES                                INSTANCES  CREATED
api   api.edgelb.local  8000:8080/http 9000:5432                0          14 minutes ago
web   web.example.com   443:8080/tls+http 80:443/http+redirect  1          14 minutes ago
"
    );

    // get by name and by uuid; one block by default.
    let by_name = ctl_env(&node, &["service", "get", "web"], &at_now)
        .await?
        .ok()?;
    let web_uuid = groups[1]["uuid"].as_str().unwrap_or_default();
    let by_uuid = ctl_env(&node, &["service", "get", web_uuid], &at_now)
        .await?
        .ok()?;
    assert_eq!(by_name.stdout, by_uuid.stdout);
    assert!(
        by_name
            .stdout
            .starts_with(&format!("      uuid: {web_uuid}\n")),
        "{}",
        by_name.stdout
    );

    // Instances with their state and load.
    let instances = ctl(&node, &["instance", "list", "web"]).await?.ok()?;
    assert_eq!(
        normalise(&instances.stdout, &names),
        "NAME   UUID                                  ADDRESS         STATE  LOCAL  GLOBAL
web-1  00000000-0000-4000-8000-000000000004  web-1.internal  up     0      0
"
    );

    // rm with an instance attached: 409 as one line, exit 1, nothing removed.
    let refused = ctl(&node, &["service", "rm", "web"]).await?;
    let line = refused.fails(1, "(HTTP 409)");
    assert!(line.contains("\"web\""), "{line}");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    ctl(&node, &["service", "get", "web"]).await?.ok()?;

    // Detach (draining), then rm works; api goes with --force.
    let detached = ctl(&node, &["instance", "detach", "web", "web-1"])
        .await?
        .ok()?;
    assert!(
        detached.stdout.starts_with("detached web-1 ("),
        "{}",
        detached.stdout
    );
    let rm = ctl(&node, &["service", "rm", "web", "api", "--force"])
        .await?
        .ok()?;
    let removed: Vec<&str> = rm.stdout.lines().collect();
    assert_eq!(removed.len(), 2, "{}", rm.stdout);
    assert!(removed[0].starts_with("removed web ("), "{}", rm.stdout);
    assert!(removed[1].starts_with("removed api ("), "{}", rm.stdout);
    ctl(&node, &["service", "get", "web"])
        .await?
        .fails(1, "(HTTP 404)");
    let empty = ctl(&node, &["service", "ls"]).await?.ok()?;
    assert_eq!(empty.stdout, "NAME  FQDN  SERVICES  INSTANCES  CREATED\n");

    // A generated name (word-word-xxxxxxxx).
    let generated = ctl(&node, &["service", "create", "7000/http", "-o", "json"])
        .await?
        .ok()?;
    let v: Value = serde_json::from_str(&generated.stdout)?;
    let name = v["service_groups"][0]["name"].as_str().unwrap_or_default();
    assert_eq!(name.split('-').count(), 3, "{name}");

    node.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_reports_every_failure_and_removes_the_rest() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start(&net).await?;
    ctl(&node, &["service", "create", "-n", "one", "7100/http"])
        .await?
        .ok()?;
    let run = ctl(&node, &["service", "rm", "nope", "one", "never"]).await?;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    assert!(run.stdout.starts_with("removed one ("), "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "edgectl: service group \"nope\" not found (HTTP 404)",
            "edgectl: service group \"never\" not found (HTTP 404)"
        ]
    );
    node.stop().await;
    // Unused here, but proves the helper works without a node.
    let _ = edgectl(&["--version"]).await?.ok()?;
    Ok(())
}

/// `service create --health-check … --send-proxy-protocol …`, then
/// `service set` changes and removes them (one PATCH each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_proxy_headers_are_set_and_removed() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start(&net).await?;
    let created = ctl(
        &node,
        &[
            "-o",
            "json",
            "service",
            "create",
            "-n",
            "hc",
            "--health-check",
            "http:/healthz,fall=5",
            "--send-proxy-protocol",
            "v1",
            "9100",
        ],
    )
    .await?
    .ok()?;
    let v: Value = serde_json::from_str(&created.stdout)?;
    let g = &v["service_groups"][0];
    assert_eq!(g["health_check"]["path"], "/healthz", "{g}");
    assert_eq!(g["health_check"]["fall"], 5);
    assert_eq!(g["send_proxy_protocol"], "v1");

    let set = ctl(
        &node,
        &[
            "-o",
            "json",
            "service",
            "set",
            "hc",
            "--health-check",
            "tcp,interval_ms=500",
            "--send-proxy-protocol",
            "v2",
            "--hard-limit",
            "9",
        ],
    )
    .await?
    .ok()?;
    let v: Value = serde_json::from_str(&set.stdout)?;
    let g = &v["service_groups"][0];
    assert_eq!(
        (
            g["health_check"]["type"].as_str(),
            g["health_check"]["interval_ms"].as_u64()
        ),
        (Some("tcp"), Some(500))
    );
    assert_eq!(
        (g["send_proxy_protocol"].as_str(), g["hard_limit"].as_u64()),
        (Some("v2"), Some(9))
    );

    let off = ctl(
        &node,
        &[
            "-o",
            "json",
            "service",
            "set",
            "hc",
            "--no-health-check",
            "--no-send-proxy-protocol",
        ],
    )
    .await?
    .ok()?;
    let v: Value = serde_json::from_str(&off.stdout)?;
    let g = &v["service_groups"][0];
    assert!(
        g.get("health_check").is_none() && g.get("send_proxy_protocol").is_none(),
        "{g}"
    );

    // Usage errors: nothing to set, a bad check, both ways at once.
    for args in [
        &["service", "set", "hc"][..],
        &["service", "set", "hc", "--health-check", "icmp"],
        &[
            "service",
            "set",
            "hc",
            "--health-check",
            "tcp",
            "--no-health-check",
        ],
    ] {
        let run = ctl(&node, args).await?;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
    }
    node.stop().await;
    Ok(())
}
