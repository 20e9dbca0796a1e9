//! `systemctl reload` as systemd runs it (SIGUSR2), with a stand-in for
//! systemd's notify socket: a reload whose new process cannot start leaves
//! the node serving; one that can hands the node over, and systemd hears
//! the new main pid before the old process goes.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, ensure};
use integration::cluster::{attach, get_once};
use integration::process::Process;
use integration::{AdminClient, HttpBackend, Subnet, TempDir, poll};
use serde_json::json;

use super::{TOKEN, admin_addr_of, healthz};

/// The group's published port.
const PORT: u16 = 8300;

/// What systemd would read on `NOTIFY_SOCKET`: each message, and whether
/// it carried a descriptor (a barrier's pipe, closed at once as systemd
/// does once it has read what came before).
fn notify_socket(path: &std::path::Path) -> anyhow::Result<mpsc::Receiver<(String, bool)>> {
    let socket = UnixDatagram::bind(path)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        loop {
            let mut buf = [0_u8; 4096];
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let Ok(msg) = rustix::net::recvmsg(
                &socket,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut control,
                rustix::net::RecvFlags::CMSG_CLOEXEC,
            ) else {
                return;
            };
            // Dropped here: the barrier's pipe closes.
            let fds: Vec<_> = control
                .drain()
                .filter_map(|m| match m {
                    rustix::net::RecvAncillaryMessage::ScmRights(fds) => Some(fds.count()),
                    _ => None,
                })
                .collect();
            let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
            if tx.send((text, fds.iter().sum::<usize>() > 0)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// A node's flags: on `subnet`'s node address (the admin API and, with
/// `cluster_port_flag`, the cluster endpoint on any port), its data dir in
/// `data`, the test's token, logging at info; `extra` first.
fn node_args(
    subnet: &Subnet,
    data: &TempDir,
    cluster_port_flag: bool,
    extra: &[&str],
) -> Vec<String> {
    let ip = subnet.node_ip().to_string();
    let any_port = format!("{ip}:0");
    let mut args: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
    args.extend([
        "--data-dir".to_owned(),
        data.path().join("data").to_string_lossy().into_owned(),
        "--admin-addr".to_owned(),
        any_port.clone(),
        "--listen-ip".to_owned(),
        ip,
        "--token".to_owned(),
        TOKEN.to_owned(),
        "--log".to_owned(),
        "info".to_owned(),
    ]);
    if cluster_port_flag {
        args.extend(["--cluster-addr".to_owned(), any_port]);
    }
    args
}

/// The next message systemd would read, within a few seconds.
fn next_message(rx: &mpsc::Receiver<(String, bool)>) -> anyhow::Result<(String, bool)> {
    rx.recv_timeout(Duration::from_secs(20))
        .context("no message on NOTIFY_SOCKET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_start_leaves_the_node_serving_and_one_that_can_hands_it_over()
-> anyhow::Result<()> {
    let subnet = Subnet::allocate();
    let data = TempDir::new("proc-reload");
    let config = data.path().join("edgelb.toml");
    std::fs::write(&config, "region = \"fra\"\n")?;
    let notify = data.path().join("notify.sock");
    let systemd = notify_socket(&notify)?;

    let args = node_args(
        &subnet,
        &data,
        true,
        &["--config", config.to_str().context("utf-8 path")?],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node =
        Process::spawn_with_env(&args, data.path(), &[("NOTIFY_SOCKET", notify.as_os_str())])
            .await?;
    let admin_addr = admin_addr_of(&mut node).await?;
    let (ready, _) = next_message(&systemd)?;
    ensure!(ready.contains("READY=1"), "first message: {ready:?}");

    let backend =
        HttpBackend::start("a", std::net::SocketAddr::new(subnet.next_ip(), 9300)).await?;
    let admin = AdminClient::new(admin_addr, TOKEN);
    admin
        .create_group(&json!({"name": "web", "services": [
            {"port": PORT, "destination_port": 9300, "handlers": ["http"]}]}))
        .await?;
    attach(&admin, "web", "a", backend.addr().ip()).await?;
    let published = std::net::SocketAddr::new(subnet.node_ip(), PORT);
    let serves = || async {
        let answer = get_once(published, "web").await?;
        ensure!(answer == (200, Some("a".to_owned())), "{answer:?}");
        Ok(())
    };
    poll("the group to be served", Duration::from_secs(20), serves).await?;

    // A configuration that does not load: the new process exits with 64
    // before it asks for anything, and this one serves on.
    std::fs::write(&config, "region = \"fra\"\ncolour = \"blue\"\n")?;
    reload_refused(&mut node, admin_addr, "exit status: 64").await?;
    serves().await?;
    ensure!(
        systemd.try_recv().is_err(),
        "systemd was told something by a process that did not start"
    );

    // Fixed: the reload goes through.
    std::fs::write(&config, "region = \"fra\"\n")?;
    let old = node.pid();
    let new = node.upgrade(Duration::from_secs(60)).await?;
    ensure!(new != old);
    let (main, _) = next_message(&systemd)?;
    ensure!(
        main.contains(&format!("MAINPID={new}")) && main.contains("READY=1"),
        "the new process's message: {main:?}"
    );
    let (barrier, with_fd) = next_message(&systemd)?;
    ensure!(
        barrier.contains("BARRIER=1") && with_fd,
        "then a barrier: {barrier:?}"
    );
    // The admin API is the same socket, and the node serves the group.
    ensure!(healthz(admin_addr).await? == http::StatusCode::OK);
    serves().await?;
    let stderr = node.stderr();
    ensure!(
        stderr.contains("the new process serves: draining"),
        "the old process's log: {stderr}"
    );

    // The old process drained and exited without a word to systemd (a
    // STOPPING=1 from it would stop the service).
    ensure!(
        systemd.try_recv().is_err(),
        "the old process told systemd something after the hand-over"
    );

    node.terminate().await?;
    let status = node.wait(Duration::from_secs(20)).await?;
    ensure!(status.success(), "the new process after SIGTERM: {status}");
    let (stopping, _) = next_message(&systemd)?;
    ensure!(stopping.contains("STOPPING=1"), "{stopping:?}");
    Ok(())
}

/// A new process that fails once the old one released its control plane
/// (here: its configuration names a cluster address another socket holds)
/// leaves the old one nothing to serve with for long: it drains, exits
/// with 74 (a service manager starts the node again), and the data dir
/// starts as after any stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_after_the_release_makes_the_old_one_exit_74() -> anyhow::Result<()>
{
    let subnet = Subnet::allocate();
    let data = TempDir::new("proc-reload-fails");
    let ip = subnet.node_ip();
    let cluster_addr = std::net::SocketAddr::new(ip, 7371);
    let config = data.path().join("edgelb.toml");
    std::fs::write(&config, format!("cluster_addr = \"{cluster_addr}\"\n"))?;
    // The cluster address from the file only: a flag would override it.
    let args = node_args(
        &subnet,
        &data,
        false,
        &["--config", config.to_str().context("utf-8 path")?],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node = Process::spawn(&args, data.path()).await?;
    node.wait_stdout("admin API on http://", Duration::from_secs(30))
        .await?;

    // The new configuration's cluster address is taken.
    let squatter = std::net::UdpSocket::bind((subnet.node_ip(), 0))?;
    let taken = squatter.local_addr()?;
    std::fs::write(&config, format!("cluster_addr = \"{taken}\"\n"))?;
    node.signal("USR2").await?;
    let status = node.wait(Duration::from_secs(60)).await?;
    let stderr = node.stderr();
    ensure!(
        status.code() == Some(74),
        "the old process exited with {status}; stderr:\n{stderr}"
    );
    ensure!(
        stderr.contains("control plane stopped for the new process")
            && stderr.contains("the upgrade failed after the control plane stopped"),
        "stderr:\n{stderr}"
    );
    drop(squatter);

    // Started again (as systemd would), the node comes up on its data dir.
    std::fs::write(&config, format!("cluster_addr = \"{cluster_addr}\"\n"))?;
    let mut again = Process::spawn(&args, data.path()).await?;
    let admin_addr = admin_addr_of(&mut again).await?;
    ensure!(healthz(admin_addr).await? == http::StatusCode::OK);
    again.terminate().await?;
    ensure!(again.wait(Duration::from_secs(20)).await?.success());
    Ok(())
}

/// Under a systemd unit that does not listen for notifications (an
/// earlier release's `Type=simple` unit: `INVOCATION_ID` without
/// `NOTIFY_SOCKET`), systemd would take the old process's exit for the
/// service's: the new process refuses to take over, and the node serves
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_unit_without_notify_the_upgrade_is_refused() -> anyhow::Result<()> {
    let subnet = Subnet::allocate();
    let data = TempDir::new("proc-reload-simple");
    let args = node_args(&subnet, &data, true, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let invocation = std::ffi::OsStr::new("0123456789abcdef");
    let mut node =
        Process::spawn_with_env(&args, data.path(), &[("INVOCATION_ID", invocation)]).await?;
    let admin_addr = admin_addr_of(&mut node).await?;
    reload_refused(&mut node, admin_addr, "not Type=notify").await?;
    node.terminate().await?;
    ensure!(node.wait(Duration::from_secs(20)).await?.success());
    Ok(())
}

/// Sends SIGUSR2 and waits until the running process logs that the new
/// one exited, with `why` in its log (checked in the same poll: a line
/// may arrive in two reads); the running one still runs and answers
/// `/healthz` on `admin_addr`.
async fn reload_refused(
    node: &mut Process,
    admin_addr: std::net::SocketAddr,
    why: &str,
) -> anyhow::Result<()> {
    node.signal("USR2").await?;
    let shown = &*node;
    poll(
        &format!("the new process to exit ({why})"),
        Duration::from_secs(30),
        || async {
            let stderr = shown.stderr();
            ensure!(stderr.contains("the new process exited"), "not yet");
            ensure!(stderr.contains(why), "{stderr}");
            Ok(())
        },
    )
    .await?;
    ensure!(node.exited()?.is_none(), "the running node stopped");
    ensure!(healthz(admin_addr).await? == http::StatusCode::OK);
    Ok(())
}
