//! Zero-downtime binary upgrade: a new `edgelb` process takes over the
//! listening sockets of the one running on the same data dir, as HAProxy
//! and Pingora do (the descriptors pass over a Unix socket, `SCM_RIGHTS`),
//! and the old process drains. No listening socket is ever closed, so no
//! connection is refused: until the new process accepts, connections wait
//! in the sockets' queues, which both processes accept from.
//!
//! ```text
//!   old process (serving)                        new process (edgelb --upgrade)
//!   <data_dir>/upgrade.sock  ◀──────── connect, hello {pid}
//!   each listening socket    ────────▶ socket {admin | port} + one descriptor, …, sent {count}
//!                            ◀──────── release    (config, token and identity read)
//!   stops its control plane: the admin API stops accepting, gossip, Raft,
//!   the storage sealed and closed, the cluster endpoint's address freed;
//!   its data plane keeps serving its last routing table
//!                            ────────▶ released
//!                                      opens the storage, starts Raft and gossip, the
//!                                      admin API on the passed socket, accepts on the
//!                                      passed published sockets; tells systemd MAINPID
//!                            ◀──────── ready
//!   stops accepting, drains its connections (drain_timeout), exits 0
//! ```
//!
//! Until `release`, a new process that fails or goes away costs nothing:
//! the old one goes on whole and offers the next upgrade. After it, the
//! old process has no control plane of its own: a new process that goes
//! away before `ready` makes the old one drain and exit with
//! [`crate::health::EXIT_STORAGE`], so that the service manager starts the
//! node again.
//!
//! The socket is a `SOCK_SEQPACKET` one (one message per packet, each with
//! at most one descriptor) in the data dir (0700), and the old process
//! talks only to a peer of its own user (`SO_PEERCRED`).

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

/// The socket's file in the data dir.
pub const SOCKET_FILE: &str = "upgrade.sock";

/// How long each side waits for the other's next message, but for the
/// new process's start between `released` and `ready` ([`READY_WITHIN`]).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the running node waits for a connected peer's hello (it takes
/// no other meanwhile).
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the old process waits for `ready` once it released its
/// control plane: the new process opens the storage (a repair after a
/// crash may take a while on a large state) and catches up.
pub const READY_WITHIN: Duration = Duration::from_secs(120);

/// The largest message (a refusal's reason is the longest).
const MAX_MESSAGE: usize = 4096;

/// Why an upgrade did not go through.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the upgrade socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the upgrade socket's path {0} is too long for a Unix socket (108 bytes)")]
    PathTooLong(PathBuf),
    #[error("talking to the other process: {0}")]
    Io(#[from] io::Error),
    #[error("the other process went away")]
    Gone,
    #[error("the other process did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the other process refused: {0}")]
    Refused(String),
    /// This process cannot take over (see [`crate::systemd::cannot_take_over`]).
    #[error("{0}")]
    Cannot(&'static str),
    #[error("unexpected message from the other process: {0}")]
    Protocol(String),
}

/// One message; a `Socket` carries one descriptor.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Message {
    Hello { pid: u32, version: String },
    Socket { socket: Passed },
    Sent { count: usize },
    Release,
    Released,
    Ready { pid: u32 },
    Refused { reason: String },
}

/// What a passed descriptor is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Passed {
    /// The admin API's listener.
    Admin,
    /// One of a published port's listeners (one per worker).
    Port(u16),
}

/// A connected `SOCK_SEQPACKET` socket (tokio's `UnixStream` for its
/// readiness; every read and write is a `recvmsg` or `sendmsg` here).
#[derive(Debug)]
struct Channel {
    stream: UnixStream,
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream: UnixStream::from_std(stream)?,
        })
    }

    async fn send(&self, message: &Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        let fds = fd.as_slice();
        loop {
            self.stream.writable().await?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("no room for the descriptor"));
                }
                Ok(rustix::net::sendmsg(
                    &self.stream,
                    &[IoSlice::new(&bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )?)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r.map(drop),
            }
        }
    }

    /// The next message and the descriptor it carries; `Gone` at the end.
    async fn recv(&self, within: Duration) -> Result<(Message, Option<OwnedFd>), UpgradeError> {
        tokio::time::timeout(within, self.recv_now())
            .await
            .map_err(|_| UpgradeError::Timeout(within))?
    }

    async fn recv_now(&self) -> Result<(Message, Option<OwnedFd>), UpgradeError> {
        let mut buf = vec![0_u8; MAX_MESSAGE];
        loop {
            self.stream.readable().await?;
            let got = self.stream.try_io(Interest::READABLE, || {
                // Room for more than one: a peer that sends more is
                // refused, and what it sent is closed with the buffer.
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    &self.stream,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(passed) = m {
                        fds.extend(passed);
                    }
                }
                Ok((msg.bytes, msg.flags, fds))
            });
            let (len, flags, mut fds) = match got {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => r?,
            };
            if len == 0 && fds.is_empty() {
                return Err(UpgradeError::Gone);
            }
            if flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) || fds.len() > 1 {
                return Err(UpgradeError::Protocol("a message too large".into()));
            }
            let message = serde_json::from_slice(&buf[..len])
                .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
            return Ok((message, fds.pop()));
        }
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

fn address(data_dir: &Path) -> Result<(PathBuf, SocketAddrUnix), UpgradeError> {
    let path = data_dir.join(SOCKET_FILE);
    let addr = SocketAddrUnix::new(&path).map_err(|_| UpgradeError::PathTooLong(path.clone()))?;
    Ok((path, addr))
}

/// The running node's side: where a new process asks to take over.
#[derive(Debug)]
pub struct Offer {
    listener: UnixListener,
}

impl Offer {
    /// Listens on `<data_dir>/upgrade.sock`, replacing a file left there by
    /// an earlier process. Bound only once this process owns the data dir
    /// (its storage is open), so the file it replaces is never a live
    /// node's.
    pub fn bind(data_dir: &Path) -> Result<Self, UpgradeError> {
        let (path, addr) = address(data_dir)?;
        let failed = |source: io::Error| UpgradeError::Connect {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(failed(e)),
            _ => {}
        }
        let fd = seqpacket()?;
        rustix::net::bind(&fd, &addr).map_err(|e| failed(e.into()))?;
        rustix::net::listen(&fd, 4).map_err(|e| failed(e.into()))?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        Ok(Self {
            listener: UnixListener::from_std(listener)?,
        })
    }

    /// The next process that asks to take over: one of this process's
    /// user, which said hello. Others are turned away (and logged).
    pub async fn next(&self) -> Incoming {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accepting on the upgrade socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match Self::greet(stream).await {
                Ok(incoming) => return incoming,
                Err(e) => warn!(error = %e, "an upgrade was turned away"),
            }
        }
    }

    async fn greet(stream: UnixStream) -> Result<Incoming, UpgradeError> {
        let cred = stream.peer_cred()?;
        let own = rustix::process::getuid().as_raw();
        if cred.uid() != own && cred.uid() != 0 {
            return Err(UpgradeError::Refused(format!(
                "pid {:?} runs as uid {}, not this node's {own}",
                cred.pid(),
                cred.uid()
            )));
        }
        let channel = Channel { stream };
        match channel.recv(HELLO_TIMEOUT).await? {
            (Message::Hello { pid, version }, None) => {
                info!(pid, version, "a new process asks to take over (upgrade)");
                Ok(Incoming { channel, pid })
            }
            (other, _) => Err(UpgradeError::Protocol(format!("{other:?} before hello"))),
        }
    }
}

/// A new process taking over, on the running node's side.
#[derive(Debug)]
pub struct Incoming {
    channel: Channel,
    /// The new process.
    pub pid: u32,
}

/// The listening sockets a running node hands over.
#[derive(Debug, Default)]
pub struct Sockets<'a> {
    pub admin: Option<BorrowedFd<'a>>,
    /// Each published port's listeners (one per worker).
    pub ports: Vec<(u16, Vec<BorrowedFd<'a>>)>,
}

impl Incoming {
    /// Sends every listening socket (the new process holds them from now
    /// on as this one does) and waits until the new process asks this one
    /// to stop its control plane.
    pub async fn send_sockets(&self, sockets: &Sockets<'_>) -> Result<(), UpgradeError> {
        let mut count = 0;
        if let Some(admin) = sockets.admin {
            self.send_socket(Passed::Admin, admin).await?;
            count += 1;
        }
        for (port, fds) in &sockets.ports {
            for fd in fds {
                self.send_socket(Passed::Port(*port), *fd).await?;
                count += 1;
            }
        }
        self.channel.send(&Message::Sent { count }, None).await?;
        match self.channel.recv(STEP_TIMEOUT).await? {
            (Message::Release, None) => Ok(()),
            (Message::Refused { reason }, _) => Err(UpgradeError::Refused(reason)),
            (other, _) => Err(UpgradeError::Protocol(format!(
                "{other:?} instead of release"
            ))),
        }
    }

    async fn send_socket(&self, socket: Passed, fd: BorrowedFd<'_>) -> Result<(), UpgradeError> {
        Ok(self
            .channel
            .send(&Message::Socket { socket }, Some(fd))
            .await?)
    }

    /// Says that the control plane stopped, and waits (up to
    /// [`READY_WITHIN`]) for the new process to serve.
    pub async fn released(self) -> Result<(), UpgradeError> {
        self.channel.send(&Message::Released, None).await?;
        match self.channel.recv(READY_WITHIN).await? {
            (Message::Ready { pid }, None) if pid == self.pid => Ok(()),
            (other, _) => Err(UpgradeError::Protocol(format!(
                "{other:?} instead of ready"
            ))),
        }
    }
}

/// The new process's side: the sockets it took over, and the way to tell
/// the old process what comes next.
#[derive(Debug)]
pub struct Takeover {
    channel: Channel,
    /// The admin API's listener, if the old process had one.
    pub admin: Option<std::net::TcpListener>,
    /// The published ports' listeners.
    pub ports: BTreeMap<u16, Vec<std::net::TcpListener>>,
}

impl Takeover {
    /// Connects to the node running on `data_dir` and takes over its
    /// listening sockets.
    pub async fn connect(data_dir: &Path) -> Result<Self, UpgradeError> {
        let (path, addr) = address(data_dir)?;
        let fd = seqpacket()?;
        // A Unix socket connects at once or fails (no EINPROGRESS wait
        // for a listener that is there).
        rustix::net::connect(&fd, &addr).map_err(|e| UpgradeError::Connect {
            path,
            source: e.into(),
        })?;
        let channel = Channel::new(fd)?;
        let hello = Message::Hello {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        channel.send(&hello, None).await?;
        let mut admin = None;
        let mut ports: BTreeMap<u16, Vec<std::net::TcpListener>> = BTreeMap::new();
        let mut received = 0;
        loop {
            match channel.recv(STEP_TIMEOUT).await? {
                (Message::Socket { socket }, Some(fd)) => {
                    received += 1;
                    let listener = std::net::TcpListener::from(fd);
                    match socket {
                        Passed::Admin => admin = Some(listener),
                        Passed::Port(p) => ports.entry(p).or_default().push(listener),
                    }
                }
                (Message::Sent { count }, None) if count == received => break,
                (other, _) => {
                    return Err(UpgradeError::Protocol(format!(
                        "{other:?} while receiving sockets ({received} so far)"
                    )));
                }
            }
        }
        info!(
            admin = admin.is_some(),
            ports = ports.len(),
            sockets = received,
            "took over the running node's listening sockets"
        );
        Ok(Self {
            channel,
            admin,
            ports,
        })
    }

    /// Asks the old process to stop its control plane (which frees the
    /// storage and the cluster address), and waits until it has.
    pub async fn release(&self) -> Result<(), UpgradeError> {
        self.channel.send(&Message::Release, None).await?;
        match self.channel.recv(STEP_TIMEOUT).await? {
            (Message::Released, None) => Ok(()),
            (other, _) => Err(UpgradeError::Protocol(format!(
                "{other:?} instead of released"
            ))),
        }
    }

    /// Tells the old process that this one serves: it stops accepting and
    /// drains.
    pub async fn ready(self) -> Result<(), UpgradeError> {
        let ready = Message::Ready {
            pid: std::process::id(),
        };
        Ok(self.channel.send(&ready, None).await?)
    }

    /// Turns the old process's offer down before `release` (this process
    /// cannot start): the old one goes on.
    pub async fn refuse(self, reason: &str) {
        let refused = Message::Refused {
            reason: reason.to_owned(),
        };
        let _ = self.channel.send(&refused, None).await;
    }
}

/// Whether an inherited listener is bound to `addr` (to any port when
/// `addr`'s is 0): one that the configuration still asks for.
pub fn bound_to(listener: &std::net::TcpListener, addr: std::net::SocketAddr) -> bool {
    listener
        .local_addr()
        .is_ok_and(|l| l.ip() == addr.ip() && (addr.port() == 0 || l.port() == addr.port()))
}

#[cfg(test)]
mod tests;
