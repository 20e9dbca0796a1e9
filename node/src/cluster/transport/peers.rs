//! One Raft connection per pair of peers, made in the background and
//! used both ways.
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
//! QUIC streams go both ways, so each side serves RPCs on every Raft
//! connection, whoever opened it, and calls go out on the connection the
//! peer opened as readily as on one of this node's own (once the peer has
//! announced that it serves calls there, which a node of an earlier
//! release does not: `server::TWO_WAY`). After a peer
//! restarts, it connects to its voters at once: they call it on that
//! connection instead of waiting for a handshake of their own, a round
//! trip and more sooner. The rules, the same on both sides:
//! - a node opens a connection of its own only when it has no open one to
//!   the peer (neither its own nor the peer's);
//! - with both open (the two opened theirs at the same time, e.g. as a
//!   partition healed), both use the one opened by the lower node id; the
//!   higher retires its own and closes it after [`CallGrace`], so calls
//!   in flight on it finish;
//! - a call waiting for this node's handshake takes the peer's connection
//!   as soon as it arrives.
//!
//! ```text
//!  call ─▶ slot(peer) ─ own (same addr) or peer's open? ──yes──▶ use it
//!                      │ no                        (both: the lower id's)
//!                      └─▶ connecting? ──no──▶ spawn connect(addr, attempt_timeout)
//!                               └─ wait for it or the peer's connection
//!                                  (bounded by the call's deadline)
//! ```
//!
//! A call that waits longer than a round trip probes its connection with
//! one-byte datagrams ([`Probes`]). One that times out with its probes
//! unanswered (a cut link, or a peer process that is gone) keeps the
//! connection, and the next calls wait on it for a sign of life before
//! they send ([`PeerSlot::cut_off`]): when the link heals, a probe's
//! acknowledgement has QUIC resend what the cut lost at once, about a
//! round trip after the heal, where a fresh connection would cost a
//! handshake and QUIC's own resend would wait out a timer that backed off
//! during the cut. A peer that restarted resets the connection at the
//! first probe that reaches its new process, and the waiting call goes
//! out on a fresh one. A connection whose call timed out while the peer
//! acknowledged but served nothing is dropped ([`PeerSlot::discard`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::Connection;
use raft_store::NodeId;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Shared, TransportError, bump, codes};

/// Bounds of one handshake attempt. A handshake takes one to two round
/// trips; an attempt gets three of the last measured ones, at least
/// [`ATTEMPT_MIN`] (a 300 ms link's handshake fits, should the link have
/// become slower than measured) and at most [`ATTEMPT_MAX`]. Short attempts
/// matter after a partition heals: a fresh attempt sends its first packet
/// at once, where an old one waits out QUIC's growing resend timer.
const ATTEMPT_MIN: Duration = Duration::from_millis(500);
const ATTEMPT_MAX: Duration = Duration::from_secs(3);

/// A handshake begun this long ago gets a fresh one beside it when the
/// peer reaches this node (see [`PeerSlot::hurry`]); a younger one's first
/// packets are still fresh.
const HURRY_AFTER: Duration = Duration::from_millis(100);

/// How long a retired or dropped connection stays open for the calls in
/// flight on it, ours or the peer's: a second longer than the longest call
/// may take. Until [`CallGrace::set_longest_call`] says otherwise, the
/// longest is a snapshot chunk's (15 s).
#[derive(Debug, Clone)]
pub(crate) struct CallGrace(Arc<std::sync::atomic::AtomicU64>);

impl Default for CallGrace {
    fn default() -> Self {
        let grace = Self(Arc::default());
        grace.set_longest_call(Duration::ZERO);
        grace
    }
}

impl CallGrace {
    /// The longest a call may take besides a snapshot chunk's (a vote's,
    /// with a long election timeout); the chunk's when that is longer.
    pub(crate) fn set_longest_call(&self, longest: Duration) {
        let chunk = Duration::from_millis(crate::cluster::SNAPSHOT_CHUNK_TIMEOUT_MS);
        let grace = longest.max(chunk) + Duration::from_secs(1);
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.0.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// How long after this node's own connection was made a peer's may still
/// arrive because the two handshakes crossed: the peer's handshake began
/// before ours reached it (half a round trip) and took a round trip and a
/// half. Four round trips, at least 250 ms, leave room for slow hosts.
fn crossing_time(rtt: Duration) -> Duration {
    (rtt * 4).max(Duration::from_millis(250))
}

/// Closes `conn` after `grace`, unless it closed before (the endpoint's
/// close at shutdown closes it): the task then ends at once, and with it
/// its hold on the endpoint, whose socket a node started again in the same
/// process must bind.
pub(crate) async fn close_after(conn: Connection, grace: Duration, reason: &'static [u8]) {
    tokio::select! {
        () = tokio::time::sleep(grace) => conn.close(codes::SHUTDOWN, reason),
        _ = conn.closed() => {}
    }
}

/// How long one handshake attempt may take.
pub(crate) fn attempt_timeout(rtt: Option<Duration>) -> Duration {
    rtt.map_or(ATTEMPT_MIN, |r| (r * 3).clamp(ATTEMPT_MIN, ATTEMPT_MAX))
}

/// Of two open connections between `me` and `peer`, the one both use: the
/// one opened by the lower id. `true` when that is this node's own.
pub(crate) fn own_is_canonical(me: NodeId, peer: NodeId) -> bool {
    me < peer
}

fn is_open(conn: &Connection) -> bool {
    conn.close_reason().is_none()
}

/// Whether the peer has finished the handshake of `conn`, a connection
/// this node opened: it sends HANDSHAKE_DONE once it has our last
/// handshake packet, and reads what we send from then on.
fn confirmed(conn: &Connection) -> bool {
    conn.stats().frame_rx.handshake_done > 0
}

/// Everything the peer sent on `conn` so far, in datagrams. Unlike
/// [`served`](super::served) this counts acknowledgements and
/// keep-alives: a count that does not move means that nothing at all gets
/// through (a cut link, or a peer process that is gone).
pub(crate) fn heard(conn: &Connection) -> u64 {
    heard_in(&conn.stats())
}

/// [`heard`], from a snapshot of the connection's statistics.
pub(crate) fn heard_in(stats: &quinn::ConnectionStats) -> u64 {
    stats.udp_rx.datagrams
}

/// How often a connection is probed while a call on it waits for a sign
/// of life: an eighth of its round trip, within
/// [`PROBE_MIN`]..[`PROBE_MAX`] (a link that heals is found within that
/// and a round trip; a cut link costs a few small datagrams a second per
/// waiting call).
fn probe_every(rtt: Duration) -> Duration {
    (rtt / 8).clamp(PROBE_MIN, PROBE_MAX)
}

const PROBE_MIN: Duration = Duration::from_millis(10);
const PROBE_MAX: Duration = Duration::from_millis(50);

/// How long a peer may hold back the acknowledgement of a lone probe
/// (QUIC's default `max_ack_delay`, which quinn uses).
const ACK_DELAY: Duration = Duration::from_millis(25);

/// How often a call held on a cut-off connection looks whether the peer
/// was heard.
const LOOK_EVERY: Duration = Duration::from_millis(5);

/// Sends a one-byte datagram on `conn` (see [`probe_after_handshake`] for
/// what the peer does with it: acknowledges it, nothing else); `false` on
/// a closed connection.
fn send_probe(conn: &Connection) -> bool {
    is_open(conn) && conn.send_datagram(bytes::Bytes::from_static(&[0])).is_ok()
}

/// Probes `conn` every `every` from now, looking every [`LOOK_EVERY`] at
/// its [`heard`] count, until `done` takes that count as an answer: `true`
/// then, `false` once the connection is closed.
async fn probe_until(
    conn: &Connection,
    every: Duration,
    mut done: impl FnMut(u64) -> bool,
) -> bool {
    let mut next_probe = tokio::time::Instant::now();
    loop {
        if !is_open(conn) {
            return false;
        }
        if done(heard(conn)) {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= next_probe {
            if !send_probe(conn) {
                return false;
            }
            next_probe = now + every;
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// A call's probes of its connection, and what they heard: while the call
/// waits longer than an answer takes on a working link (its round trip
/// and one probe interval), a datagram goes out every [`probe_every`]
/// ([`Probes::run`]).
///
/// A link that is cut loses the call's packets, and QUIC resends them
/// only at its probe timeout, which doubles with each resend lost in the
/// cut (after a few seconds, the next is a second or more away). A probe
/// that crosses the healed link is acknowledged, and that acknowledgement
/// has QUIC declare the earlier packets lost and resend them at once: the
/// call goes through about a round trip after the heal. A peer process
/// that is gone answers a probe with a stateless reset (from its
/// successor) or not at all.
pub(crate) struct Probes {
    /// The [`heard`] count last seen to change, and when.
    last: Mutex<(u64, tokio::time::Instant)>,
    rtt: Duration,
}

impl Probes {
    /// The probes of a call starting now, on a connection whose
    /// statistics are `stats`.
    pub(crate) fn new(stats: &quinn::ConnectionStats) -> Self {
        Self {
            last: Mutex::new((heard_in(stats), tokio::time::Instant::now())),
            rtt: stats.path.rtt.min(ATTEMPT_MAX),
        }
    }

    /// Probes `conn`, noting when the peer was last heard. Never
    /// resolves; the call drops it when it ends.
    pub(crate) async fn run(&self, conn: &Connection) {
        let every = probe_every(self.rtt);
        tokio::time::sleep(self.rtt + every).await;
        probe_until(conn, every, |count| {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if count != last.0 {
                *last = (count, tokio::time::Instant::now());
            }
            false
        })
        .await;
        std::future::pending::<()>().await;
    }

    /// The [`heard`] count of `conn` if the peer has been silent for
    /// longer than a probe takes to be acknowledged (a round trip, the
    /// peer's acknowledgement delay, and two probe intervals): nothing at
    /// all gets through.
    pub(crate) fn silent(&self, conn: &Connection) -> Option<u64> {
        let (count, since) = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let quiet = self.rtt + ACK_DELAY + probe_every(self.rtt) * 2;
        (heard(conn) == count && since.elapsed() >= quiet).then_some(count)
    }
}

/// The state of this node's own connection to one peer.
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
        /// When the handshake finished.
        since: tokio::time::Instant,
    },
    Failed {
        attempt: u64,
        reason: String,
    },
}

/// This node's own connection and the newest one the peer opened to it.
#[derive(Clone, Debug, Default)]
struct Links {
    own: Conn,
    inbound: Option<Connection>,
    /// The inbound connection `inbound` replaced, used while it is open
    /// and `inbound` is not: of two handshakes of the peer's that both
    /// finished (one begun beside the other, see `connect`), the peer
    /// keeps one and closes the other, whichever reached this node last.
    earlier: Option<Connection>,
    /// Whether the peer announced on `inbound` that it serves calls there
    /// (`false`: taken on trust, as the peer announced on an earlier one).
    confirmed: bool,
}

/// Which connection a call uses.
#[derive(Clone, Debug)]
struct Pick {
    conn: Connection,
    /// This node's own connection, open but not the canonical one: the
    /// caller retires it.
    retire: Option<Connection>,
}

impl Links {
    /// The open connection calls to the peer at `addr` use (`None` for
    /// any address: the peer's own connection proves who it is wherever
    /// it comes from).
    fn pick(&self, addr: Option<&str>, own_canonical: bool) -> Option<Pick> {
        let own = match &self.own {
            Conn::Up { addr: a, conn, .. } if addr.is_none_or(|x| x == a) && is_open(conn) => {
                Some(conn)
            }
            _ => None,
        };
        let inbound = self
            .inbound
            .as_ref()
            .filter(|c| is_open(c))
            .or_else(|| self.earlier.as_ref().filter(|c| is_open(c)));
        match (own, inbound) {
            // Until the peer has finished its side of our handshake, what
            // we send may be dropped (`probe_after_handshake`); the peer's
            // own connection, finished on both sides, carries the calls
            // meanwhile. Nothing is retired: ours is the one both keep.
            (Some(o), Some(i)) if own_canonical && !confirmed(o) => Some(Pick {
                conn: i.clone(),
                retire: None,
            }),
            (Some(o), Some(_)) if own_canonical => Some(Pick {
                conn: o.clone(),
                retire: None,
            }),
            (Some(o), Some(i)) => Some(Pick {
                conn: i.clone(),
                retire: Some(o.clone()),
            }),
            (Some(c), None) | (None, Some(c)) => Some(Pick {
                conn: c.clone(),
                retire: None,
            }),
            (None, None) => None,
        }
    }
}

/// The connection slot of one peer.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    me: NodeId,
    target: NodeId,
    state: watch::Sender<Links>,
    inner: Mutex<SlotInner>,
    /// Wakes the handshake attempt under way to begin a fresh handshake
    /// now ([`PeerSlot::hurry`]).
    hurried: tokio::sync::Notify,
    /// How long a connection this slot stops using stays open.
    grace: CallGrace,
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
    /// Whether the peer announced that it serves calls on the connections
    /// it opens: its next one is used as soon as it is accepted.
    two_way: bool,
    /// A connection on which a call heard nothing at all from the peer,
    /// and the [`heard`] count then: calls on it wait for a sign of life
    /// before they send ([`PeerSlot::until_heard`]).
    cut_off: Option<(Connection, u64)>,
    /// Whether the peer refused an empty append sent in the background
    /// (a higher vote, logs that part): openraft's next one must wait for
    /// the answer (`network::PeerNetwork`).
    refused: bool,
}

impl PeerSlot {
    pub(crate) fn new(me: NodeId, target: NodeId, grace: CallGrace) -> Self {
        Self {
            me,
            target,
            grace,
            state: watch::Sender::new(Links::default()),
            inner: Mutex::new(SlotInner::default()),
            hurried: tokio::sync::Notify::new(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn own_canonical(&self) -> bool {
        own_is_canonical(self.me, self.target)
    }

    /// The connection to use from `links`, retiring this node's own when
    /// the peer's is the canonical one.
    fn choose(&self, links: &Links, addr: Option<&str>) -> Option<Connection> {
        let pick = links.pick(addr, self.own_canonical())?;
        if let Some(old) = pick.retire {
            self.retire(&old);
        }
        Some(pick.conn)
    }

    /// Stops using this node's own connection `conn` (the peer's is
    /// canonical) and closes it once calls in flight on it are done.
    fn retire(&self, conn: &Connection) {
        let id = conn.stable_id();
        let retired = self.state.send_if_modified(|l| match &l.own {
            Conn::Up { conn: c, .. } if c.stable_id() == id => {
                l.own = Conn::None;
                true
            }
            _ => false,
        });
        if retired {
            debug!(
                target = self.target,
                "using the peer's connection; retiring ours"
            );
            let conn = conn.clone();
            let grace = self.grace.get();
            tokio::spawn(close_after(conn, grace, b"superseded"));
        }
    }

    /// Whether a connection to `addr` (or one the peer opened) is open or
    /// being made, or an attempt started within the last [`ATTEMPT_MIN`]
    /// (a peer that refuses at once is not asked again on every tick of a
    /// caller that keeps it warm).
    pub(crate) fn is_open_or_opening(&self, addr: &str) -> bool {
        let recent = self
            .inner()
            .started
            .is_some_and(|t| t.elapsed() < ATTEMPT_MIN);
        let links = self.state.borrow();
        if links.pick(Some(addr), self.own_canonical()).is_some() {
            return true;
        }
        match &links.own {
            Conn::Connecting { addr: a, .. } => a == addr,
            _ => recent,
        }
    }

    /// The round trip measured on the connection calls use, if there is
    /// one. Without one the last measurement may be stale (the link may
    /// have slowed since), so callers use their full limits.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.in_use().map(|c| c.rtt())
    }

    /// The congestion window of the connection calls use, if there is one:
    /// what it sends in one round trip.
    pub(crate) fn window(&self) -> Option<u64> {
        self.in_use().map(|c| c.stats().path.cwnd)
    }

    /// The open connection calls go out on now (this node's or the
    /// peer's).
    pub(crate) fn in_use(&self) -> Option<Connection> {
        self.state
            .borrow()
            .pick(None, self.own_canonical())
            .map(|p| p.conn)
    }

    /// Whether calls now go out on this node's own connection (`false`: on
    /// the peer's); `None` without an open one.
    #[cfg(test)]
    pub(crate) fn uses_own(&self) -> Option<bool> {
        let links = self.state.borrow();
        let pick = links.pick(None, self.own_canonical())?;
        Some(
            matches!(&links.own, Conn::Up { conn, .. } if conn.stable_id() == pick.conn.stable_id()),
        )
    }

    /// The open connection to `addr` (this node's or the peer's), waiting
    /// for a handshake (started now if none is under way) or for the peer
    /// to connect. `true` when it was not used before.
    pub(crate) async fn get(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        addr: &str,
    ) -> Result<(Connection, bool), TransportError> {
        let mut rx = self.state.subscribe();
        loop {
            let current = rx.borrow_and_update().clone();
            if let Some(conn) = self.choose(&current, Some(addr)) {
                return Ok((conn, false));
            }
            let attempt = match current.own {
                Conn::Connecting { addr: a, attempt } if a == addr => attempt,
                _ => self.start(shared, addr),
            };
            loop {
                let links = rx.borrow_and_update().clone();
                if let Some(conn) = self.choose(&links, Some(addr)) {
                    return Ok((conn, true));
                }
                match &links.own {
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
        let (attempt, rtt) = {
            let mut inner = self.inner();
            inner.attempts += 1;
            inner.started = Some(tokio::time::Instant::now());
            (inner.attempts, inner.rtt)
        };
        let mut previous = Conn::None;
        self.state.send_modify(|l| {
            previous = std::mem::replace(
                &mut l.own,
                Conn::Connecting {
                    addr: addr.to_owned(),
                    attempt,
                },
            );
        });
        if let Conn::Up { conn, .. } = previous {
            conn.close(codes::SHUTDOWN, b"replaced");
        }
        let slot = Arc::clone(self);
        let shared = Arc::clone(shared);
        let addr = addr.to_owned();
        tokio::spawn(async move {
            let outcome = connect(&shared, &slot, &addr, rtt).await;
            slot.finish(attempt, addr, outcome, &shared);
        });
        attempt
    }

    fn finish(
        &self,
        attempt: u64,
        addr: String,
        outcome: Result<Connection, String>,
        shared: &Arc<Shared>,
    ) {
        // The newest attempt publishes its failure; a success is taken
        // from any attempt to the same address while none is up (an
        // attempt replaced by a fresh one, `hurry`, may still finish first).
        match outcome {
            Ok(conn) => {
                let since = tokio::time::Instant::now();
                let taken = self.state.send_if_modified(|l| match &l.own {
                    Conn::Connecting { addr: a, .. } if *a == addr => {
                        l.own = Conn::Up {
                            addr: addr.clone(),
                            conn: conn.clone(),
                            since,
                        };
                        true
                    }
                    _ => false,
                });
                if !taken {
                    conn.close(codes::SHUTDOWN, b"superseded");
                    return;
                }
                bump(&shared.stats.connects);
                self.inner().rtt = Some(conn.rtt());
                self.reachable(&addr);
                // The peer may call on it too.
                super::server::serve_own(Arc::clone(shared), conn, self.target);
            }
            Err(reason) => {
                let failed = self.state.send_if_modified(|l| match &l.own {
                    Conn::Connecting { attempt: n, .. } if *n == attempt => {
                        l.own = Conn::Failed {
                            attempt,
                            reason: reason.clone(),
                        };
                        true
                    }
                    _ => false,
                });
                if failed {
                    self.unreachable(&reason);
                }
            }
        }
    }

    /// Drops the connection if it is still `conn` (after a timed-out or
    /// broken call), so that the next call makes a fresh one. It is closed
    /// only after [`CallGrace`]: other calls in flight on it, ours or
    /// the peer's (it may only have been slow), still get their answers.
    pub(crate) fn discard(&self, conn: &Connection, why: &str) {
        let id = conn.stable_id();
        let dropped = self.state.send_if_modified(|l| {
            let mut hit = false;
            if matches!(&l.own, Conn::Up { conn: c, .. } if c.stable_id() == id) {
                l.own = Conn::None;
                hit = true;
            }
            if l.inbound.as_ref().is_some_and(|c| c.stable_id() == id) {
                l.inbound = None;
                hit = true;
            }
            if l.earlier.as_ref().is_some_and(|c| c.stable_id() == id) {
                l.earlier = None;
                hit = true;
            }
            hit
        });
        if dropped {
            self.inner().rtt = Some(conn.rtt());
            debug!(target = self.target, why, "dropping the cluster connection");
            let conn = conn.clone();
            let grace = self.grace.get();
            tokio::spawn(close_after(conn, grace, b"dropped"));
        }
    }

    /// Notes that a call on `conn` timed out with the peer silent, nothing
    /// at all heard from it since `count` ([`heard`], [`Probes::silent`]):
    /// the link is cut or the peer is gone. The connection is kept rather than dropped: once the
    /// link heals, a probe's acknowledgement brings it back within a round
    /// trip, where a fresh connection needs a handshake (a round trip and
    /// a half before the peer can read a call, and more when a reordered
    /// first call is dropped, see [`probe_after_handshake`]). A peer that
    /// restarted resets it at the first probe that reaches its new
    /// process; one that is gone lets it lapse at QUIC's idle timeout.
    pub(crate) fn cut_off(&self, conn: &Connection, count: u64) {
        self.inner().cut_off = Some((conn.clone(), count));
    }

    /// Waits, probing `conn`, until the peer is heard on it, if a call on
    /// it heard nothing at all ([`PeerSlot::cut_off`]); at once otherwise.
    /// A call sends nothing on a connection that is known to lose it: what
    /// piles up unacknowledged on a cut link fills the congestion window,
    /// and then even the probes would wait for QUIC's backed-off timer.
    /// `false` when the connection closed meanwhile.
    pub(crate) async fn until_heard(&self, conn: &Connection) -> bool {
        let id = conn.stable_id();
        let is_this = |c: &(Connection, u64)| c.0.stable_id() == id;
        let Some(mark) = self
            .inner()
            .cut_off
            .as_ref()
            .filter(|c| is_this(c))
            .map(|c| c.1)
        else {
            return true;
        };
        let every = probe_every(conn.rtt().min(ATTEMPT_MAX));
        let heard = probe_until(conn, every, |count| count != mark).await;
        let mut inner = self.inner();
        if inner.cut_off.as_ref().is_some_and(is_this) {
            inner.cut_off = None;
        }
        heard
    }

    /// Resolves once calls to the peer would go out on another open
    /// connection than `conn` (the peer reconnected, or a fresh handshake
    /// of this node's finished) while `conn` has not served anything since
    /// `heard` (its [`served`](super::served) count when the
    /// call began): the call on it was sent into a cut or to a process
    /// that is gone, and waiting out its deadline would only hold back the
    /// retry on the fresh connection. Never resolves otherwise.
    pub(crate) async fn superseded(&self, conn: &Connection, heard: u64) {
        let id = conn.stable_id();
        let mut rx = self.state.subscribe();
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            let other = rx
                .borrow_and_update()
                .pick(None, self.own_canonical())
                .is_some_and(|p| p.conn.stable_id() != id);
            if other && super::served(conn) == heard {
                return;
            }
        }
    }

    /// Takes `conn`, a Raft connection the peer opened to this node and
    /// announced as served both ways, for calls to the peer: calls waiting
    /// for a handshake of this node's own go out on it at once.
    ///
    /// A peer opens a connection only when it has none open to this node,
    /// so one that arrives well after this node's own was made (later than
    /// the two could have crossed) means the peer has lost that one: it
    /// restarted, or dropped it after a timeout. This node's own is then
    /// retired whatever the ids, rather than found dead by a failed call.
    pub(crate) fn adopt(&self, conn: &Connection) {
        self.inner().two_way = true;
        self.take(conn, true);
    }

    /// [`adopt`](Self::adopt)s `conn` as soon as it is accepted if the
    /// peer announced two-way calls on an earlier connection (a restarted
    /// or reconnecting peer): its announcement may come a resend later. A
    /// call on it that times out before the announcement arrives gives the
    /// trust up ([`PeerSlot::distrust`]), in case the peer went back to an
    /// earlier release.
    pub(crate) fn adopt_if_known(&self, conn: &Connection) {
        if self.inner().two_way {
            self.take(conn, false);
        }
    }

    fn take(&self, conn: &Connection, confirmed: bool) {
        let id = conn.stable_id();
        let stale = match &self.state.borrow().own {
            Conn::Up {
                conn: own, since, ..
            } if is_open(own) && own.stable_id() != id => {
                (since.elapsed() > crossing_time(own.rtt())).then(|| own.clone())
            }
            _ => None,
        };
        debug!(
            target = self.target,
            confirmed,
            ours_lost = stale.is_some(),
            "peer connected: calls may use its connection"
        );
        self.state.send_modify(|l| {
            let again = l.inbound.as_ref().is_some_and(|c| c.stable_id() == id);
            if !again {
                l.earlier = l.inbound.take().filter(is_open);
            }
            l.confirmed = confirmed || (again && l.confirmed);
            l.inbound = Some(conn.clone());
        });
        if let Some(own) = stale {
            self.retire(&own);
        }
    }

    /// A call on `conn` timed out: if it is the peer's connection taken on
    /// trust, it is no longer used, and the peer's next one waits for its
    /// announcement.
    pub(crate) fn distrust(&self, conn: &Connection) {
        let id = conn.stable_id();
        let dropped = self.state.send_if_modified(|l| {
            let hit = !l.confirmed && l.inbound.as_ref().is_some_and(|c| c.stable_id() == id);
            if hit {
                l.inbound = None;
            }
            hit
        });
        if dropped {
            self.inner().two_way = false;
            debug!(
                target = self.target,
                "a call on the peer's unannounced connection timed out: not using it"
            );
        }
    }

    /// Has the handshake attempt under way begin a fresh handshake beside
    /// its pending ones (the peer just reached this node, so the link
    /// works; the pending ones may be waiting out a backed-off resend).
    pub(crate) fn hurry(&self) {
        {
            let links = self.state.borrow();
            match &links.own {
                // The peer's Raft connection serves already.
                _ if links.pick(None, self.own_canonical()).is_some() => return,
                Conn::Connecting { .. } => {}
                _ => return,
            }
        }
        debug!(
            target = self.target,
            "peer reached us while our handshake was pending: a fresh one begins"
        );
        // The attempt begins one beside its pending ones (`connect`),
        // unless it began one within HURRY_AFTER.
        self.hurried.notify_one();
    }

    /// Records that a call to the peer failed as unreachable, logging the
    /// transition once.
    pub(crate) fn unreachable(&self, reason: &str) {
        let first = !std::mem::replace(&mut self.inner().unreachable, true);
        if first {
            warn!(peer = self.target, %reason, "cluster peer unreachable");
        }
    }

    /// Records that the peer refused an empty append sent in the
    /// background.
    pub(crate) fn refused(&self) {
        self.inner().refused = true;
    }

    /// Whether the peer refused an empty append since the last call;
    /// clears it.
    pub(crate) fn take_refused(&self) -> bool {
        std::mem::take(&mut self.inner().refused)
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

/// How long a handshake attempt waits for the peer's first answer before
/// it sends a fresh first packet on a new connection beside the pending
/// one: a bit over the last measured round trip (so that on a working
/// link no second handshake is begun), at least [`STAGGER_MIN`]. A first
/// packet sent into a cut is resent by QUIC after a backed-off timer
/// (0.15 s, then 0.45 s, 1.05 s after the start); a fresh one leaves at
/// once, so a link that heals during an attempt is tried again within
/// about this long instead of within the next resend or attempt.
fn stagger(rtt: Option<Duration>) -> Duration {
    rtt.map_or(STAGGER_MIN, |r| (r * 5 / 4).max(STAGGER_MIN))
}

const STAGGER_MIN: Duration = Duration::from_millis(200);

/// One QUIC handshake attempt to `target` at `addr`, on a link whose last
/// measured round trip is `rtt`. The peer must answer within
/// [`attempt_timeout`]; while it has not, a fresh handshake is begun every
/// [`stagger`] beside the pending ones, and the first to be answered is
/// kept (the others are dropped, which the peer sees as a handshake
/// aborted). Once the peer has answered (its handshake flight arrived),
/// the rest may take up to [`ATTEMPT_MAX`]: a handshake that is under way
/// when a partition heals is finished rather than abandoned at the
/// attempt's deadline.
async fn connect(
    shared: &Shared,
    slot: &PeerSlot,
    addr: &str,
    rtt: Option<Duration>,
) -> Result<Connection, String> {
    let target = slot.target;
    let first = attempt_timeout(rtt);
    let began = tokio::time::Instant::now();
    let sock = super::resolve(shared, addr)
        .await
        .map_err(|e| e.to_string())?;
    let every = stagger(rtt);
    // No handshake begins after `first`; the last one begun gets `every`.
    let (last_start, give_up) = (began + first, began + first + every);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = began;
    let mut latest = began;
    let answered = loop {
        if tokio::time::Instant::now() >= next && next < last_start {
            latest = tokio::time::Instant::now();
            let mut connecting = shared
                .endpoint
                .connect_with(
                    shared.client_for(target),
                    sock,
                    &crate::cluster::pki::node_dns_name(target),
                )
                .map_err(|e| e.to_string())?;
            pending.spawn(async move {
                connecting
                    .handshake_data()
                    .await
                    .map_err(|e| crate::cluster::tls::handshake_error(&e))?;
                Ok::<_, String>(connecting)
            });
            next += every;
        }
        let until = if next < last_start { next } else { give_up };
        tokio::select! {
            done = pending.join_next() => match done {
                Some(Ok(Ok(connecting))) => break connecting,
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(format!("handshake task: {e}")),
                None => {}
            },
            () = tokio::time::sleep_until(until) => {
                if until >= give_up {
                    return Err(format!("no handshake within {:?}", give_up - began));
                }
            }
            // The peer just reached this node: the link works, and our
            // pending first packets may be waiting out a backed-off resend.
            () = slot.hurried.notified() => {
                let now = tokio::time::Instant::now();
                if now >= latest + HURRY_AFTER && now < last_start {
                    next = now;
                }
            }
        }
    };
    // The handshakes not answered yet are dropped (their tasks aborted).
    drop(pending);
    let conn = tokio::time::timeout(ATTEMPT_MAX, answered)
        .await
        .map_err(|_| format!("handshake unfinished within {ATTEMPT_MAX:?}"))?
        .map_err(|e| crate::cluster::tls::handshake_error(&e))?;
    tokio::time::sleep(reorder_hold(conn.rtt())).await;
    // The peer may have refused us meanwhile (our certificate, say).
    if let Some(e) = conn.close_reason() {
        return Err(crate::cluster::tls::handshake_error(&e));
    }
    debug!(target, addr, "connected");
    probe_after_handshake(&conn);
    Ok(conn)
}

/// How long the dialler sends nothing on a connection whose handshake it
/// just finished: an eighth of the round trip, the reordering QUIC's loss
/// detection allows for (RFC 9002's time threshold is 9/8 of a round
/// trip), at most [`HOLD_MAX`].
///
/// The peer reads nothing of what we send until our last handshake packet
/// has reached it, and quinn drops (does not buffer) what arrives before
/// it. Sent at once, a first call overtaken by that packet on a link that
/// reorders is lost, and resent a round trip later at best
/// ([`probe_after_handshake`]); sent after the hold, it arrives after it.
/// The cost is the hold on each connection this node makes (12.5 ms on a
/// 100 ms link); a call waiting meanwhile takes the peer's own connection
/// if that arrives first.
fn reorder_hold(rtt: Duration) -> Duration {
    (rtt / 8).min(HOLD_MAX)
}

const HOLD_MAX: Duration = Duration::from_millis(50);

/// When probes follow a finished handshake, in round trips after it.
const PROBES: [f64; 4] = [0.1, 0.3, 0.6, 1.0];

/// Sends a few one-byte datagrams over the first round trip of `conn`, a
/// connection this node just made, so that calls sent on it are not held
/// up if the peer dropped them.
///
/// The dialler may send as soon as its handshake is done, but the peer
/// reads nothing of it until the dialler's last handshake packet has
/// reached it, and quinn drops (does not buffer) what arrives before it.
/// [`reorder_hold`] keeps the first calls behind that packet on a link
/// that reorders within an eighth of a round trip; on one that reorders
/// more, or loses that packet, they can still be dropped. QUIC resends lost data
/// when a later packet is acknowledged, or else after its probe timeout,
/// which after a first round trip R is about 3 R (0.9 s on a 300 ms link):
/// seen as the first appends to a restarted or reconnected follower
/// arriving 0.4–0.7 s after the connection was up. A datagram is a packet
/// the peer acknowledges and does nothing else with (no Raft or gossip
/// side reads datagrams on a Raft connection; they are dropped once its
/// small buffer is full), so its acknowledgement lets QUIC find the
/// dropped packets lost and resend them a round trip and a bit after they
/// were sent. Several are sent, the first soon after the handshake, so
/// that one reaches the peer just after that last handshake packet
/// whatever the reordering. Harmless where nothing was dropped: four
/// small packets per connection made.
fn probe_after_handshake(conn: &Connection) {
    let conn = conn.clone();
    // The handle is held for at most a round trip (of at most the
    // handshake's own bound), and nothing is sent on a closed connection.
    let rtt = conn.rtt().min(ATTEMPT_MAX);
    let start = tokio::time::Instant::now();
    tokio::spawn(async move {
        for at in PROBES {
            tokio::time::sleep_until(start + rtt.mul_f64(at)).await;
            if !send_probe(&conn) {
                return;
            }
        }
    });
}

#[cfg(test)]
mod stagger_tests {
    use super::*;

    #[test]
    fn a_fresh_handshake_is_begun_a_bit_over_a_round_trip_after_the_last() {
        let ms = Duration::from_millis;
        assert_eq!(stagger(None), ms(200));
        assert_eq!(stagger(Some(ms(20))), ms(200));
        // On a working 300 ms link the first handshake is answered before
        // a second begins.
        assert_eq!(stagger(Some(ms(300))), ms(375));
        assert!(stagger(Some(ms(300))) < attempt_timeout(Some(ms(300))));
    }
}

#[cfg(test)]
mod grace_tests {
    use super::*;

    #[test]
    fn a_connection_let_go_outlives_the_longest_call() {
        let grace = CallGrace::default();
        // A snapshot chunk's call (15 s) is the longest by default.
        assert_eq!(grace.get(), Duration::from_secs(16));
        // A slot made before the limit is known reads the one set later.
        let slot = PeerSlot::new(1, 2, grace.clone());
        grace.set_longest_call(Duration::from_secs(45));
        assert_eq!(slot.grace.get(), Duration::from_secs(46));
    }
}
