//! The real `edgelb` binary: exit codes, configuration errors, health,
//! SIGTERM and the stored token (SPEC §9).

mod upgrade;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use integration::client::HttpConn;
use integration::process::{Process, run, run_with_env};
use integration::{Subnet, TempDir};

/// EX_USAGE.
const EXIT_CONFIG: i32 = 64;
const TOKEN: &str = "integration-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flag_exits_64_and_names_the_field() -> anyhow::Result<()> {
    let cwd = TempDir::new("bad-flag");
    let out = run(
        &["--admin-addr", "nope"],
        cwd.path(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("admin_addr"),
        "stderr does not name the field: {}",
        out.stderr
    );
    assert!(
        !cwd.path().join("edgelb-data").exists(),
        "a bad flag still created the data dir"
    );

    let out = run(&["--no-such-flag"], cwd.path(), Duration::from_secs(30)).await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "unknown flag; stderr: {}",
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_toml_key_exits_64_and_names_the_key() -> anyhow::Result<()> {
    let cwd = TempDir::new("bad-toml");
    let file = cwd.path().join("edgelb.toml");
    std::fs::write(&file, "region = \"fra\"\ncolour = \"blue\"\n")?;
    let file = file.to_str().context("utf-8 temp path")?;
    let out = run(&["--config", file], cwd.path(), Duration::from_secs(30)).await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("colour"),
        "stderr does not name the key: {}",
        out.stderr
    );

    std::fs::write(
        cwd.path().join("edgelb.toml"),
        "header_timeout = \"soon\"\n",
    )?;
    let out = run(&["--config", file], cwd.path(), Duration::from_secs(30)).await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("header_timeout"),
        "stderr does not name the key: {}",
        out.stderr
    );
    Ok(())
}

/// A duration in any layer is checked as in the file, and its error names
/// the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_duration_exits_64_and_names_the_key() -> anyhow::Result<()> {
    let cwd = TempDir::new("bad-duration");
    for (args, env) in [
        (&["--drain-timeout", "5 fortnights"][..], &[][..]),
        (&[][..], &[("EDGELB_DRAIN_TIMEOUT", "0s")][..]),
    ] {
        let out = run_with_env(args, env, cwd.path(), Duration::from_secs(30)).await?;
        assert_eq!(
            out.status.code(),
            Some(EXIT_CONFIG),
            "{args:?} {env:?}; stderr: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("drain_timeout"),
            "stderr does not name the key: {}",
            out.stderr
        );
    }
    Ok(())
}

async fn healthz(admin: SocketAddr) -> anyhow::Result<StatusCode> {
    let mut conn = HttpConn::connect(admin).await?;
    Ok(conn.get(&admin.to_string(), "/healthz").await?.status)
}

/// Starts the binary on `subnet`'s node address and returns it with its
/// admin address (printed on stdout).
async fn start(
    subnet: &Subnet,
    data: &TempDir,
    token: &str,
) -> anyhow::Result<(Process, SocketAddr)> {
    start_with(subnet, data, token, &[]).await
}

/// [`start`] with `extra` flags.
async fn start_with(
    subnet: &Subnet,
    data: &TempDir,
    token: &str,
    extra: &[&str],
) -> anyhow::Result<(Process, SocketAddr)> {
    start_with_env(subnet, data, token, extra, &[]).await
}

/// [`start_with`] with `env` set.
async fn start_with_env(
    subnet: &Subnet,
    data: &TempDir,
    token: &str,
    extra: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<(Process, SocketAddr)> {
    let ip = subnet.node_ip().to_string();
    let data_dir = data.path().to_str().context("utf-8 temp path")?;
    let any_port = format!("{ip}:0");
    let mut args = vec![
        "--data-dir",
        data_dir,
        "--admin-addr",
        &any_port,
        "--cluster-addr",
        &any_port,
        "--listen-ip",
        &ip,
        "--token",
        token,
    ];
    if !extra.contains(&"--log") {
        args.extend_from_slice(&["--log", "warn"]);
    }
    args.extend_from_slice(extra);
    let mut p = Process::spawn_with_env(&args, data.path(), env).await?;
    let addr = admin_addr_of(&mut p).await?;
    Ok((p, addr))
}

/// Waits for `p`'s "admin API on" line and returns the address it names.
async fn admin_addr_of(p: &mut Process) -> anyhow::Result<SocketAddr> {
    let line = p
        .wait_stdout("admin API on http://", Duration::from_secs(30))
        .await?;
    line.rsplit("http://")
        .next()
        .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        .with_context(|| format!("no admin address in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_exits_0_on_sigterm_and_keeps_its_token() -> anyhow::Result<()> {
    let subnet = Subnet::allocate();
    let data = TempDir::new("proc-node");
    let (mut node, admin) = start(&subnet, &data, TOKEN).await?;
    assert_eq!(
        healthz(admin).await?,
        StatusCode::OK,
        "stderr: {}",
        node.stderr()
    );

    // A group created now must survive the restart.
    let mut conn = HttpConn::connect(admin).await?;
    let mut req = integration::client::get_request(&admin.to_string(), "/v1/services");
    *req.method_mut() = http::Method::POST;
    *req.body_mut() = http_body_util::Full::new(bytes::Bytes::from(
        r#"{"name":"kept","services":[{"port":8080,"destination_port":9000,"handlers":["http"]}]}"#,
    ));
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    req.headers_mut()
        .insert("content-type", "application/json".parse()?);
    let r = conn.send(req).await?;
    assert!(
        r.status.is_success(),
        "creating a group: {} {}",
        r.status,
        r.text()
    );
    drop(conn);

    node.terminate().await?;
    let status = node.wait(Duration::from_secs(20)).await?;
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM; stderr: {}",
        node.stderr()
    );
    assert!(
        data.path().join("token").is_file(),
        "no token file in the data dir"
    );

    // A different token on the same data dir is a config error.
    let data_dir = data.path().to_str().context("utf-8 temp path")?;
    let ip = subnet.node_ip().to_string();
    let admin_arg = format!("{ip}:0");
    let out = run(
        &[
            "--data-dir",
            data_dir,
            "--admin-addr",
            &admin_arg,
            "--cluster-addr",
            &admin_arg,
            "--listen-ip",
            &ip,
            "--token",
            "a-different-token-9876543210",
        ],
        data.path(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "restart with another token; stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("token"),
        "stderr does not name the field: {}",
        out.stderr
    );

    // The same token restarts with the stored state.
    let (mut node, admin) = start(&subnet, &data, TOKEN).await?;
    assert_eq!(healthz(admin).await?, StatusCode::OK);
    let mut conn = HttpConn::connect(admin).await?;
    let mut req = integration::client::get_request(&admin.to_string(), "/v1/services/kept");
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let r = conn.send(req).await?;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "group after restart: {}",
        r.text()
    );
    drop(conn);
    node.terminate().await?;
    assert_eq!(
        node.wait(Duration::from_secs(20)).await?.code(),
        Some(0),
        "stderr: {}",
        node.stderr()
    );
    Ok(())
}

/// `THP_enabled` of process `pid` (`/proc/PID/status`): whether the kernel
/// may back its memory with transparent huge pages; `None` when the kernel
/// does not say.
fn thp_enabled(pid: u32) -> anyhow::Result<Option<bool>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim() == "1"))
}

/// mimalloc asks for huge pages on its arenas, and a 2 MiB page is resident
/// as soon as one byte of it is: idle connections cost 1.6× the memory that
/// way (`edgelb_alloc::no_transparent_huge_pages`). The node turns them off
/// for itself, unless `MIMALLOC_ALLOW_THP=1` asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_runs_without_transparent_huge_pages_unless_asked() -> anyhow::Result<()> {
    let Some(ours) = thp_enabled(std::process::id())? else {
        eprintln!("this kernel does not report THP_enabled; nothing to compare");
        return Ok(());
    };
    if !ours {
        // Inherited: a node with them off would prove nothing.
        eprintln!("this test runs without huge pages itself; nothing to compare");
        return Ok(());
    }
    let subnet = Subnet::allocate();
    for (env, want) in [(None, false), (Some("1"), true), (Some("0"), false)] {
        let data = TempDir::new("proc-thp");
        let vars: Vec<(&str, &std::ffi::OsStr)> = env
            .map(|v| ("MIMALLOC_ALLOW_THP", std::ffi::OsStr::new(v)))
            .into_iter()
            .collect();
        let (mut node, admin) = start_with_env(&subnet, &data, TOKEN, &[], &vars).await?;
        assert_eq!(healthz(admin).await?, StatusCode::OK);
        assert_eq!(
            thp_enabled(node.pid())?,
            Some(want),
            "MIMALLOC_ALLOW_THP={env:?}; stderr: {}",
            node.stderr()
        );
        node.terminate().await?;
        assert_eq!(node.wait(Duration::from_secs(20)).await?.code(), Some(0));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_sits_between_file_and_flags() -> anyhow::Result<()> {
    let cwd = TempDir::new("env");
    let out = run_with_env(
        &[],
        &[("EDGELB_LISTEN_IP", "not-an-ip")],
        cwd.path(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("listen_ip"),
        "stderr does not name the field: {}",
        out.stderr
    );

    // A flag beats the variable, the variable beats the file: with the
    // file's drain_timeout and the variable's listen_ip both overridden, the
    // first error left is the file's header_timeout (checked after both).
    let file = cwd.path().join("edgelb.toml");
    std::fs::write(
        &file,
        "drain_timeout = \"forever\"\nheader_timeout = \"never\"\n",
    )?;
    let file = file.to_str().context("utf-8 temp path")?;
    let out = run_with_env(
        &["--config", file, "--listen-ip", "127.0.0.1"],
        &[
            ("EDGELB_DRAIN_TIMEOUT", "5s"),
            ("EDGELB_LISTEN_IP", "not-an-ip"),
        ],
        cwd.path(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("header_timeout"),
        "expected the header_timeout error: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("listen_ip"),
        "the variable beat the flag: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("drain_timeout"),
        "the file beat the variable: {}",
        out.stderr
    );

    // A switch's variable takes the usual spellings of a boolean (as
    // environment files write them), each meaning what it says: against a
    // file that names admin TLS files, off is refused naming the variable,
    // on reads the (missing) certificate.
    let tls_file = cwd.path().join("tls.toml");
    std::fs::write(
        &tls_file,
        "admin_tls_cert = \"/nonexistent/admin.pem\"\nadmin_tls_key = \"/nonexistent/admin.key\"\n",
    )?;
    let tls_file = tls_file.to_str().context("utf-8 temp path")?;
    for (on, off) in [("1", "0"), ("yes", "no"), ("On", "OFF"), ("true", "false")] {
        let dir = cwd.path();
        let start = |value: &'static str| async move {
            let args = ["--config", tls_file];
            let vars = [("EDGELB_ADMIN_TLS", value), ("EDGELB_LEAVE_ON_EXIT", value)];
            run_with_env(&args, &vars, dir, Duration::from_secs(30)).await
        };
        let out = start(off).await?;
        assert_eq!(
            out.status.code(),
            Some(EXIT_CONFIG),
            "{off}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("EDGELB_ADMIN_TLS: is false"),
            "{off}: {}",
            out.stderr
        );
        let out = start(on).await?;
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{on}: {}", out.stderr);
        assert!(
            out.stderr.contains("admin_tls_cert: ")
                && out.stderr.contains("/nonexistent/admin.pem: No such file"),
            "{on}: {}",
            out.stderr
        );
    }
    let out = run_with_env(
        &["--config", file],
        &[("EDGELB_LEAVE_ON_EXIT", "maybe")],
        cwd.path(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", out.stderr);
    assert!(
        out.stderr.contains("maybe") && !out.stderr.contains("drain_timeout"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// The access log (text format) gets a line per HTTP request and per TCP
/// connection, SIGUSR1 moves it to a new file after a rotation, and the
/// last lines are written when the node stops; `--log-format json` makes
/// the node's own log lines JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_follow_a_rotation_and_the_node_logs_json() -> anyhow::Result<()> {
    use integration::backend::EchoClient;
    use integration::{AdminClient, EchoBackend, HttpBackend};
    use serde_json::json;

    let subnet = Subnet::allocate();
    let data = TempDir::new("proc-access-log");
    let logs = TempDir::new("proc-access-log-files");
    std::fs::create_dir_all(logs.path())?;
    let path = logs.path().join("access.log");
    let path_arg = path.to_str().context("utf-8 temp path")?.to_owned();
    let (mut node, admin_addr) = start_with(
        &subnet,
        &data,
        TOKEN,
        &[
            "--access-log",
            &path_arg,
            "--access-log-format",
            "text",
            "--log-format",
            "json",
            "--log",
            "info",
        ],
    )
    .await?;
    let admin = AdminClient::new(admin_addr, TOKEN);
    let web = HttpBackend::start("web-1", SocketAddr::new(subnet.next_ip(), 7100)).await?;
    let echo = EchoBackend::start("echo-1", SocketAddr::new(subnet.next_ip(), 7200)).await?;
    let http_group = admin
        .create_group(&json!({"name": "web", "services": [
            {"port": 8080, "destination_port": 7100, "handlers": ["http"]}]}))
        .await?;
    let tcp_group = admin
        .create_group(&json!({"name": "echo", "services": [
            {"port": 9000, "destination_port": 7200, "handlers": []}]}))
        .await?;
    for (g, name, ip) in [
        (&http_group, "web-1", web.addr().ip()),
        (&tcp_group, "echo-1", echo.addr().ip()),
    ] {
        let (status, v) = admin
            .post(
                &format!("/v1/services/{}/instances", g.uuid),
                &json!({"name": name, "address": ip.to_string()}),
            )
            .await?;
        anyhow::ensure!(status.is_success(), "attach {name}: {status} {v}");
    }
    let http_addr = SocketAddr::new(subnet.node_ip(), 8080);
    let tcp_addr = SocketAddr::new(subnet.node_ip(), 9000);
    let reply = integration::client::get(http_addr, "web.edgelb.local", "/first?a=1").await?;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    {
        let mut c = EchoClient::new(integration::client::tcp_connect(tcp_addr, None).await?);
        assert_eq!(c.who("hello").await?, "echo-1");
    }
    let lines_of = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    integration::wait_until("two access log lines", Duration::from_secs(10), || {
        let n = lines_of(&path).len();
        async move { n >= 2 }
    })
    .await?;
    let lines = lines_of(&path);
    let http_line = lines
        .iter()
        .find(|l| l.contains("\"GET /first?a=1 HTTP/1.1\" 200 "))
        .with_context(|| format!("no line for the HTTP request: {lines:?}"))?;
    assert!(
        http_line.contains(" group=\"web\" instance=\"web-1\" port=8080 "),
        "{http_line}"
    );
    assert!(
        http_line.starts_with("127."),
        "the client's IP first: {http_line}"
    );
    let tcp_line = lines
        .iter()
        .find(|l| l.contains("\"TCP :9000\" - "))
        .with_context(|| format!("no line for the TCP connection: {lines:?}"))?;
    assert!(
        tcp_line.contains(" group=\"echo\" instance=\"echo-1\" "),
        "{tcp_line}"
    );
    // "hello\n" went up; "echo-1 hello\n" came back.
    assert!(tcp_line.contains(" bytes_in=6 "), "{tcp_line}");
    assert!(tcp_line.contains("\" - 13 "), "{tcp_line}");

    // A rotation: the file is moved away, SIGUSR1, and new lines go to a
    // new file at the old path.
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&path, &rotated)?;
    node.signal("USR1").await?;
    // The reopen is seen in the node's (JSON) log.
    integration::wait_until(
        "the reopen in the node's log",
        Duration::from_secs(10),
        || {
            let seen = node.stderr().contains("reopening the access log");
            async move { seen }
        },
    )
    .await?;
    let reply = integration::client::get(http_addr, "web.edgelb.local", "/second").await?;
    assert_eq!(reply.status, StatusCode::OK);
    node.terminate().await?;
    assert_eq!(node.wait(Duration::from_secs(20)).await?.code(), Some(0));
    // Written by the stop at the latest.
    let after = lines_of(&path);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(
        after[0].contains("\"GET /second HTTP/1.1\" 200 "),
        "{after:?}"
    );
    assert_eq!(lines_of(&rotated).len(), 2);

    let stderr = node.stderr();
    let reopen = stderr
        .lines()
        .find(|l| l.contains("reopening the access log"))
        .context("the reopen line")?;
    let v: serde_json::Value =
        serde_json::from_str(reopen).with_context(|| format!("--log-format json: {reopen:?}"))?;
    assert_eq!(v["level"], "INFO");
    Ok(())
}
