//! One kept Raft connection per peer, made in the background.
//!
//! A connection is made once and reused by every RPC. Making it is a task
//! of its own, not part of any RPC: an RPC whose deadline passes while the
//! handshake is under way gives up waiting, but the handshake goes on and
//! the next RPC finds the connection ready. A handshake attempt waits for
//! the peer's first answer for [`attempt_timeout`] (half a second, or three
//! round trips on a slow link), so that after a partition heals the next
//! attempt starts promptly instead of waiting out QUIC's growing
//! retransmission timer; a handshake the peer has answered is finished.
//!
//! ```text
//!  call ─▶ slot(peer) ─ connected, same addr, open? ──yes──▶ use it
//!                      │ no
//!                      └─▶ connecting? ──no──▶ spawn connect(addr, attempt_timeout)
//!                               └─ wait for the outcome (bounded by the call's deadline)
//! ```
//!
//! A connection whose RPC timed out is dropped ([`PeerSlot::discard`]): a
//! peer that restarted does not know the old connection, and a healed
//! partition is best met with a fresh handshake than with a connection
//! whose timers backed off during the cut.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::Connection;
use raft_store::NodeId;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::transport::{Shared, TransportError, bump, codes};

/// Bounds of one handshake attempt. A handshake takes one to two round
/// trips; an attempt gets three of the last measured ones, at least
/// [`ATTEMPT_MIN`] (a 300 ms link's handshake fits, should the link have
/// become slower than measured) and at most [`ATTEMPT_MAX`]. Short attempts
/// matter after a partition heals: a fresh attempt sends its first packet
/// at once, where an old one waits out QUIC's growing resend timer.
const ATTEMPT_MIN: Duration = Duration::from_millis(500);
const ATTEMPT_MAX: Duration = Duration::from_secs(3);

/// A handshake attempt this old is replaced when the peer reaches this node
/// (see [`PeerSlot::hurry`]); a younger one's first packets are still fresh.
const HURRY_AFTER: Duration = Duration::from_millis(100);

/// How long one handshake attempt may take.
pub(crate) fn attempt_timeout(rtt: Option<Duration>) -> Duration {
    rtt.map_or(ATTEMPT_MIN, |r| (r * 3).clamp(ATTEMPT_MIN, ATTEMPT_MAX))
}

/// The state of the connection to one peer.
#[derive(Clone, Debug, Default)]
enum Conn {
    #[default]
    None,
    Connecting {
        addr: String,
        /// Bumped for each attempt, so waiters see their attempt's outcome.
        attempt: u64,
    },
    Up {
        addr: String,
        conn: Connection,
    },
    Failed {
        attempt: u64,
        reason: String,
    },
}

/// The connection slot of one peer.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    target: NodeId,
    state: watch::Sender<Conn>,
    inner: Mutex<SlotInner>,
}

#[derive(Debug, Default)]
struct SlotInner {
    attempts: u64,
    /// The last measured round trip to this peer.
    rtt: Option<Duration>,
    /// Whether the last attempt or call failed (for logging transitions).
    unreachable: bool,
    /// When the peer last answered a call.
    answered: Option<tokio::time::Instant>,
    /// When the last handshake attempt started.
    started: Option<tokio::time::Instant>,
}

impl PeerSlot {
    pub(crate) fn new(target: NodeId) -> Self {
        Self {
            target,
            state: watch::Sender::new(Conn::None),
            inner: Mutex::new(SlotInner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a connection to `addr` is open or being made, or an attempt
    /// started within the last [`ATTEMPT_MIN`] (a peer that refuses at once
    /// is not asked again on every tick of a caller that keeps it warm).
    pub(crate) fn is_open_or_opening(&self, addr: &str) -> bool {
        let recent = self
            .inner()
            .started
            .is_some_and(|t| t.elapsed() < ATTEMPT_MIN);
        match &*self.state.borrow() {
            Conn::Up { addr: a, conn } => a == addr && conn.close_reason().is_none(),
            Conn::Connecting { addr: a, .. } => a == addr,
            _ => recent,
        }
    }

    /// The round trip measured on the open connection, if there is one.
    /// Without one the last measurement may be stale (the link may have
    /// slowed since), so callers use their full limits.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match &*self.state.borrow() {
            Conn::Up { conn, .. } => Some(conn.rtt()),
            _ => None,
        }
    }

    /// The open connection to `addr`, waiting for a handshake (started now
    /// if none is under way). `true` when it was not used before.
    pub(crate) async fn get(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        addr: &str,
    ) -> Result<(Connection, bool), TransportError> {
        let mut rx = self.state.subscribe();
        loop {
            let current = rx.borrow_and_update().clone();
            let attempt = match current {
                Conn::Up { addr: a, conn } if a == addr && conn.close_reason().is_none() => {
                    return Ok((conn, false));
                }
                Conn::Connecting { addr: a, attempt } if a == addr => attempt,
                _ => self.start(shared, addr),
            };
            loop {
                match &*rx.borrow_and_update() {
                    Conn::Up { addr: a, conn } if a == addr => return Ok((conn.clone(), true)),
                    Conn::Failed { attempt: n, reason } if *n >= attempt => {
                        return Err(TransportError::Connect {
                            target: self.target,
                            reason: reason.clone(),
                        });
                    }
                    Conn::Connecting { attempt: n, .. } if *n >= attempt => {}
                    // Replaced by a state this call did not ask for (another
                    // address, or discarded): start over.
                    _ => break,
                }
                if rx.changed().await.is_err() {
                    return Err(TransportError::Closed);
                }
            }
        }
    }

    /// Starts a handshake attempt to `addr`; returns its number.
    fn start(self: &Arc<Self>, shared: &Arc<Shared>, addr: &str) -> u64 {
        let (attempt, timeout) = {
            let mut inner = self.inner();
            inner.attempts += 1;
            inner.started = Some(tokio::time::Instant::now());
            (inner.attempts, attempt_timeout(inner.rtt))
        };
        let previous = self.state.send_replace(Conn::Connecting {
            addr: addr.to_owned(),
            attempt,
        });
        if let Conn::Up { conn, .. } = previous {
            conn.close(codes::SHUTDOWN, b"replaced");
        }
        let slot = Arc::clone(self);
        let shared = Arc::clone(shared);
        let addr = addr.to_owned();
        tokio::spawn(async move {
            let outcome = connect(&shared, slot.target, &addr, timeout).await;
            slot.finish(attempt, addr, outcome, &shared);
        });
        attempt
    }

    fn finish(
        &self,
        attempt: u64,
        addr: String,
        outcome: Result<Connection, String>,
        shared: &Shared,
    ) {
        // Only the newest attempt may publish its outcome.
        let current =
            matches!(&*self.state.borrow(), Conn::Connecting { attempt: n, .. } if *n == attempt);
        match outcome {
            Ok(conn) if current => {
                bump(&shared.stats.connects);
                self.inner().rtt = Some(conn.rtt());
                self.reachable(&addr);
                self.state.send_replace(Conn::Up { addr, conn });
            }
            Ok(conn) => conn.close(codes::SHUTDOWN, b"superseded"),
            Err(reason) if current => {
                self.unreachable(&reason);
                self.state.send_replace(Conn::Failed { attempt, reason });
            }
            Err(_) => {}
        }
    }

    /// Drops the connection if it is still `conn` (after a timed-out or
    /// broken call), so that the next call makes a fresh one.
    pub(crate) fn discard(&self, conn: &Connection, why: &str) {
        let drop_it = matches!(&*self.state.borrow(), Conn::Up { conn: c, .. } if c.stable_id() == conn.stable_id());
        if drop_it {
            self.inner().rtt = Some(conn.rtt());
            debug!(target = self.target, why, "dropping the cluster connection");
            conn.close(codes::SHUTDOWN, b"dropped");
            self.state.send_replace(Conn::None);
        }
    }

    /// Replaces a handshake attempt that has been under way for a while
    /// with a fresh one (the peer just reached this node, so the link
    /// works; the old attempt may be waiting out a backed-off resend).
    pub(crate) fn hurry(self: &Arc<Self>, shared: &Arc<Shared>) {
        let addr = match &*self.state.borrow() {
            Conn::Connecting { addr, .. } => addr.clone(),
            _ => return,
        };
        let stale = self
            .inner()
            .started
            .is_some_and(|t| t.elapsed() >= HURRY_AFTER);
        if stale {
            debug!(
                target = self.target,
                "peer reached us while our handshake was pending: starting afresh"
            );
            self.start(shared, &addr);
        }
    }

    /// Records that a call to the peer failed as unreachable, logging the
    /// transition once.
    pub(crate) fn unreachable(&self, reason: &str) {
        let first = !std::mem::replace(&mut self.inner().unreachable, true);
        if first {
            warn!(peer = self.target, %reason, "cluster peer unreachable");
        }
    }

    /// Whether the peer answered a call within `within`.
    pub(crate) fn answered_within(&self, within: Duration) -> bool {
        self.inner().answered.is_some_and(|t| t.elapsed() <= within)
    }

    /// Records that the peer answered, logging the transition once.
    pub(crate) fn reachable(&self, addr: &str) {
        let was = {
            let mut inner = self.inner();
            inner.answered = Some(tokio::time::Instant::now());
            std::mem::replace(&mut inner.unreachable, false)
        };
        if was {
            info!(peer = self.target, addr, "cluster peer reachable again");
        }
    }
}

/// One QUIC handshake to `target` at `addr`. The peer must answer within
/// `first`; once it has (its handshake flight arrived), the rest may take
/// up to [`ATTEMPT_MAX`]: a handshake that is under way when a partition
/// heals is finished rather than abandoned at the attempt's deadline.
async fn connect(
    shared: &Shared,
    target: NodeId,
    addr: &str,
    first: Duration,
) -> Result<Connection, String> {
    let began = tokio::time::Instant::now();
    let sock = super::transport::resolve(shared, addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut connecting = shared
        .endpoint
        .connect_with(
            shared.client.clone(),
            sock,
            &super::pki::node_dns_name(target),
        )
        .map_err(|e| e.to_string())?;
    let no_answer = || format!("no handshake within {first:?}");
    tokio::time::timeout_at(began + first, connecting.handshake_data())
        .await
        .map_err(|_| no_answer())?
        .map_err(|e| super::tls::handshake_error(&e))?;
    let conn = tokio::time::timeout_at(began + ATTEMPT_MAX, connecting)
        .await
        .map_err(|_| format!("handshake unfinished within {ATTEMPT_MAX:?}"))?
        .map_err(|e| super::tls::handshake_error(&e))?;
    debug!(target, addr, "connected");
    Ok(conn)
}
