//! Resource limits of the admin port and of the process (issue 12,
//! finding 5): an admin connection flood cannot take the descriptors the
//! data plane needs, and `max_connections` must fit `RLIMIT_NOFILE`.

use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use integration::client::{self, tcp_connect};
use integration::process::{Process, edgelb_bin, run_bin};
use integration::{NodeOptions, TempDir, TestNode, patient};
use tokio::io::AsyncReadExt;

use super::{BACKEND_PORT, PORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_over_the_limit_are_closed_at_once() -> anyhow::Result<()> {
    let cap = 8;
    let mut opts = NodeOptions::default();
    opts.settings.admin_max_connections = cap;
    let node = TestNode::start_with(opts).await?;
    let backends = node.http_backends(&["busy"], BACKEND_PORT).await?;
    node.http_group("busy", PORT, BACKEND_PORT, &backends)
        .await?;

    // Idle connections that never send a byte: the header timeout (10 s)
    // would close them only much later.
    let flood = 40;
    let mut conns = Vec::new();
    for _ in 0..flood {
        conns.push(tcp_connect(node.admin_addr, None).await?);
    }
    let mut closed = 0;
    for c in &mut conns {
        let mut byte = [0_u8; 1];
        // An open idle connection yields nothing within the wait.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), c.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert!(
        closed >= flood - cap,
        "{closed} of {flood} idle admin connections were closed at once (limit {cap})"
    );
    // The data plane serves meanwhile, and the admin API again once the
    // flood is gone.
    let r = client::get(node.addr(PORT), "busy.test", "/").await?;
    assert_eq!(r.status, StatusCode::OK);
    drop(conns);
    integration::wait_until(
        "the admin API to answer",
        Duration::from_secs(5),
        || async {
            node.get("/v1/services")
                .await
                .is_ok_and(|(s, _)| s == StatusCode::OK)
        },
    )
    .await?;
    node.stop().await
}

/// `sh -c 'ulimit -n LIMIT && exec edgelb ARGS'`.
fn limited(limit: u32, args: &str) -> anyhow::Result<Vec<String>> {
    let bin = edgelb_bin()?;
    Ok(vec![
        "-c".to_owned(),
        format!("ulimit -n {limit} && exec {} {args}", bin.display()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_that_cannot_fit_the_open_files_limit_exits_64() -> anyhow::Result<()> {
    let cwd = TempDir::new("nofile");
    let file = cwd.path().join("edgelb.toml");
    let subnet = integration::Subnet::allocate();
    let ip = subnet.node_ip();
    std::fs::write(
        &file,
        format!(
            "max_connections = 1000\nadmin_addr = \"{ip}:0\"\ncluster_addr = \"{ip}:0\"\nlisten_ip = \"{ip}\"\n"
        ),
    )?;
    let args = limited(2048, &format!("--config {}", file.display()))?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_bin(
        "/bin/sh".as_ref(),
        &args,
        cwd.path(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(out.status.code(), Some(64), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("max_connections") && out.stderr.contains("RLIMIT_NOFILE"),
        "stderr does not name the problem: {}",
        out.stderr
    );

    // Without max_connections configured, the node fits it to the limit
    // (two workers, whatever the machine: the ports' share depends on it).
    std::fs::write(
        &file,
        format!(
            "workers = 2\nadmin_addr = \"{ip}:0\"\ncluster_addr = \"{ip}:0\"\nlisten_ip = \"{ip}\"\n"
        ),
    )?;
    let args = limited(2048, &format!("--config {}", file.display()))?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Process::spawn_bin("/bin/sh".as_ref(), &args, cwd.path()).await?;
    p.wait_stdout("admin API on", patient(Duration::from_secs(30)))
        .await
        .with_context(|| p.stderr())?;
    let stderr = p.stderr();
    assert!(
        // 512 = (2048 - 256 admin - 256 for the ports (an eighth: 64 ports
        // on 2 workers) - 512 headroom) / 2; the log may be coloured.
        stderr.contains("max_connections lowered") && stderr.contains("512"),
        "stderr: {stderr}"
    );
    p.terminate().await?;
    let status = p.wait(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0));
    Ok(())
}
