//! The real `edgelb` binary: exit codes, configuration errors, health,
//! SIGTERM and the stored token (SPEC §9).

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
    let ip = subnet.node_ip().to_string();
    let data_dir = data.path().to_str().context("utf-8 temp path")?;
    let args = [
        "--data-dir",
        data_dir,
        "--admin-addr",
        &format!("{ip}:0"),
        "--cluster-addr",
        &format!("{ip}:0"),
        "--listen-ip",
        &ip,
        "--token",
        token,
        "--log",
        "warn",
    ];
    let mut p = Process::spawn(&args, data.path()).await?;
    let line = p
        .wait_stdout("admin API on http://", Duration::from_secs(30))
        .await?;
    let addr = line
        .rsplit("http://")
        .next()
        .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        .with_context(|| format!("no admin address in {line:?}"))?;
    Ok((p, addr))
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
    Ok(())
}
