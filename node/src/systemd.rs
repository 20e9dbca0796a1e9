//! systemd's readiness protocol (`Type=notify`): a no-op without
//! `NOTIFY_SOCKET`, so the node runs the same under any other supervisor.
//!
//! In an upgrade the new process is not the one systemd started: it says
//! `MAINPID=` with `READY=1`, and waits until systemd has read that (a
//! barrier) before it tells the old process to go, so that systemd never
//! sees its main process exit (and stops the service) before it knows
//! the new one.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::io::AsyncReadExt;

/// How long a barrier waits for systemd.
const BARRIER_WAIT: Duration = Duration::from_secs(5);

/// Why this process cannot take over as systemd's main process, if it
/// cannot: it runs as a systemd service (`INVOCATION_ID`) whose unit does
/// not listen for notifications (`Type=notify`, `NotifyAccess=all`), so
/// systemd would take the old process's exit for the service's and stop
/// the new one with it.
pub fn cannot_take_over() -> Option<&'static str> {
    let service = std::env::var_os("INVOCATION_ID").is_some();
    let notify = std::env::var_os("NOTIFY_SOCKET").is_some();
    (service && !notify).then_some(
        "this systemd unit is not Type=notify with NotifyAccess=all (ops/deploy/edgelb.service): \
         install that unit and restart once; until then upgrade by restarting",
    )
}

/// The node serves.
pub fn ready() -> io::Result<()> {
    sd_notify::notify(&[NotifyState::Ready])
}

/// This process replaces the main one and serves; returns once systemd
/// has read it.
pub async fn ready_as_main() -> io::Result<()> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    sd_notify::notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready])?;
    barrier().await
}

/// The node stops.
pub fn stopping() -> io::Result<()> {
    sd_notify::notify(&[NotifyState::Stopping])
}

/// `BARRIER=1` with a pipe's write end: systemd closes it once it has
/// processed every earlier message.
async fn barrier() -> io::Result<()> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    sd_notify::notify_with_fds(&[NotifyState::Custom("BARRIER=1")], &[write.as_fd()])?;
    drop(write);
    let mut read = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let mut byte = [0_u8; 1];
    match tokio::time::timeout(BARRIER_WAIT, read.read(&mut byte)).await {
        Ok(r) => r.map(drop),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "systemd did not answer the barrier",
        )),
    }
}
