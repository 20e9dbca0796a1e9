//! Upstream HTTP/1.1 connections: one [`Pool`] of idle keep-alive
//! connections per instance and destination port.
//!
//! A connection is checked out for one request and goes back only after its
//! response body has been read completely; closed and stale ones are
//! discarded, and a sweeper closes those idle for longer than the pool idle
//! timeout. A connection idle for `park_after` (at least a second) is
//! *parked*: hyper's connection is taken apart and only the socket stays,
//! without the 8 KiB read and write buffers and the request channel's first
//! block (about 10 KiB) that a live one holds; the next checkout builds a
//! new hyper connection over the socket, which takes no I/O.
//!
//! Idle connections are kept per data-plane worker: a connection is watched
//! by the reactor of the worker that opened it, so only that worker's
//! requests take it again (`crate::workers`). The pool's lock is its own
//! and is never held across an await. Pooled connections are driven by the
//! request that uses them (see `PooledConn`).

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use super::ConnectError;
use super::client_body::ClientBody;
use crate::series::{Counter, InstanceMetrics};

/// How long a connection must have been idle for the lean path to read
/// it before reuse, whatever the reactor has seen ([`ParkedConn::stale`]):
/// under load connections are reused within this and cost no read.
const LOOK_AFTER: Duration = Duration::from_millis(100);

/// Idle upstream connections to one instance on one port.
#[derive(Debug)]
pub struct Pool {
    address: String,
    port: u16,
    /// `address` parsed, when it is an IP literal (no resolver needed).
    ip: Option<IpAddr>,
    idle: Mutex<Idle>,
    /// Wakes the sweeper when a checkin moves `sweep_at` earlier.
    sweep: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Idle {
    /// Per worker (grown to the highest worker that used the pool), oldest
    /// first, with when each went idle.
    conns: Vec<VecDeque<(Slot, Instant)>>,
    /// When the sweeper task (parking and closing idle connections) looks
    /// next; `None` while there is none.
    sweep_at: Option<Instant>,
}

impl Idle {
    /// The idle list of `worker`.
    fn of(&mut self, worker: usize) -> &mut VecDeque<(Slot, Instant)> {
        if self.conns.len() <= worker {
            self.conns.resize_with(worker + 1, VecDeque::new);
        }
        &mut self.conns[worker]
    }

    fn len(&self) -> usize {
        self.conns.iter().map(VecDeque::len).sum()
    }
}

/// An idle connection: ready to send, or parked (the socket only).
#[derive(Debug)]
enum Slot {
    Live(PooledConn),
    Parked(ParkedConn),
}

impl Slot {
    fn reusable(&self) -> bool {
        match self {
            Self::Live(conn) => conn.reusable(),
            Self::Parked(parked) => !parked.watch.aborted(),
        }
    }

    /// Ready to send: a parked connection gets a new hyper connection.
    fn into_live(self) -> Option<PooledConn> {
        match self {
            Self::Live(conn) => Some(conn),
            Self::Parked(parked) => parked.resume(),
        }
    }
}

/// An upstream connection without hyper's state: the socket, and what ties
/// it to its instance's drain. Idle connections wait in the pool this way
/// once parked, and the lean HTTP/1 path (`crate::http::lean`) uses them
/// as they are.
#[derive(Debug)]
pub(crate) struct ParkedConn {
    io: CountingIo,
    watch: Arc<Watch>,
    closed: oneshot::Sender<()>,
    /// The timer of its requests' waits, kept from request to request as
    /// [`PooledConn`]'s is.
    deadline: Deadline,
}

impl PooledConn {
    /// Takes hyper's connection apart, keeping the socket; `None` when the
    /// connection cannot be parked (ended, aborted, dedicated, or holding
    /// bytes the instance sent while idle), which closes it.
    fn park(self) -> Option<ParkedConn> {
        let Driver::Inline {
            conn: Some(conn),
            watch,
            _closed: closed,
        } = self.driver
        else {
            return None;
        };
        if watch.aborted() {
            return None;
        }
        // The waker of the task that last drove it: a parked connection
        // must not keep that task's memory.
        drop(watch.waker.take());
        let parts = Pin::into_inner(conn).into_parts();
        if !parts.read_buf.is_empty() {
            debug!("idle upstream connection received bytes; closing");
            return None;
        }
        // Its timer is dropped, not kept: the sweeper that parks idle
        // connections may run on another worker, whose runtime may be
        // shutting down, where polling the timer (to let go of its waker)
        // would fail. A request after an idle spell makes a new one.
        Some(ParkedConn {
            io: parts.io.into_inner(),
            watch,
            closed,
            deadline: Deadline::default(),
        })
    }
}

impl ParkedConn {
    /// The socket.
    pub(crate) fn io(&mut self) -> &mut CountingIo {
        &mut self.io
    }

    /// Whether the instance has closed the idle connection or sent on it
    /// unasked (an answer to nothing, such as a timeout's 408): either
    /// way no request may be sent on it. It costs a read only when the
    /// socket was seen readable, or with `look`: the reactor may not have
    /// seen what arrived a moment ago, and a connection idle for a while
    /// (an instance's keep-alive timeout closes those) is worth the read.
    pub(crate) fn stale(&self, cx: &mut Context<'_>, look: bool) -> bool {
        if !look && self.io.inner.poll_read_ready(cx).is_pending() {
            return false;
        }
        // tokio's own reads trust its readiness: this one asks the socket.
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let flags = rustix::net::RecvFlags::DONTWAIT | rustix::net::RecvFlags::PEEK;
        match rustix::net::recv(&self.io.inner, &mut byte, flags) {
            Err(rustix::io::Errno::AGAIN) => false,
            // End of stream, bytes, or an error.
            _ => true,
        }
    }

    /// The connection's timer for the waits of the request it carries,
    /// taken out while the request borrows the connection. Give it back
    /// with [`Self::keep_deadline`].
    pub(crate) fn take_deadline(&mut self) -> Deadline {
        std::mem::take(&mut self.deadline)
    }

    /// Keeps `deadline` for the connection's next request.
    pub(crate) fn keep_deadline(&mut self, deadline: Deadline) {
        self.deadline = deadline;
    }

    /// Whether the instance drained and the connection was aborted;
    /// `cx` is woken when that happens.
    pub(crate) fn poll_aborted(&self, cx: &mut Context<'_>) -> bool {
        self.watch.waker.register(cx.waker());
        self.watch.aborted()
    }

    /// A live connection over the parked socket. hyper's HTTP/1 client
    /// handshake does no I/O, so it is ready at its first poll.
    fn resume(self) -> Option<PooledConn> {
        if self.watch.aborted() {
            return None;
        }
        let handshake = std::pin::pin!(http1::Builder::new().handshake(TokioIo::new(self.io)));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok((sender, conn))) = handshake.poll(&mut cx) else {
            return None;
        };
        Some(PooledConn {
            sender,
            driver: Driver::Inline {
                conn: Some(Box::pin(conn)),
                watch: self.watch,
                _closed: self.closed,
            },
            deadline: self.deadline,
            activity: None,
        })
    }
}

impl Pool {
    /// A pool for the instance at `address` (IP or host name), `port`.
    pub fn new(address: &str, port: u16) -> Self {
        let ip = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok();
        Self {
            address: address.to_owned(),
            port,
            ip,
            idle: Mutex::new(Idle::default()),
            sweep: Arc::default(),
        }
    }

    /// The destination port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The instance's address as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Idle connections now held (all workers).
    pub fn idle_len(&self) -> usize {
        self.lock().len()
    }

    /// Idle connections now parked (all workers).
    #[cfg(test)]
    pub(crate) fn parked_len(&self) -> usize {
        let idle = self.lock();
        let parked = |(slot, _): &&(Slot, Instant)| matches!(slot, Slot::Parked(_));
        idle.conns
            .iter()
            .map(|c| c.iter().filter(parked).count())
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The calling worker's most recently used idle connection that is
    /// still usable and not older than `max_age`.
    pub(crate) fn checkout(&self, max_age: Duration, now: Instant) -> Option<PooledConn> {
        // Outside the lock: resuming a parked connection allocates.
        self.take_idle(max_age, now)
            .and_then(|(slot, _)| slot.into_live())
    }

    /// Like [`Pool::checkout`], for the lean path: the socket alone (a live
    /// connection is parked first, which takes no I/O).
    pub(crate) fn checkout_socket(
        &self,
        max_age: Duration,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Option<ParkedConn> {
        loop {
            let (slot, since) = self.take_idle(max_age, now)?;
            // One that cannot be parked is closed; try the next.
            let Some(parked) = (match slot {
                Slot::Parked(parked) => Some(parked),
                Slot::Live(conn) => conn.park(),
            }) else {
                continue;
            };
            if parked.stale(cx, now.saturating_duration_since(since) >= LOOK_AFTER) {
                debug!("idle upstream connection closed or sent unasked; closing");
                continue;
            }
            return Some(parked);
        }
    }

    fn take_idle(&self, max_age: Duration, now: Instant) -> Option<(Slot, Instant)> {
        let worker = crate::workers::current();
        let mut stale = VecDeque::new();
        let found = {
            let mut idle = self.lock();
            let conns = idle.of(worker);
            let mut found = None;
            while let Some((conn, since)) = conns.pop_back() {
                if now.saturating_duration_since(since) > max_age {
                    // Everything older is staler still.
                    stale = std::mem::take(conns);
                    stale.push_back((conn, since));
                    break;
                }
                if conn.reusable() {
                    found = Some((conn, since));
                    break;
                }
            }
            found
        };
        drop(stale);
        found
    }

    /// Returns a connection whose response was read completely to the
    /// calling worker's list, which keeps at most `limits.max_idle`. A
    /// sweeper task runs while the pool holds any: it parks connections
    /// idle for `limits.park_after` (at least a second) and closes those
    /// idle for longer than `limits.idle_timeout`.
    pub(crate) fn checkin(self: &Arc<Self>, conn: PooledConn, limits: IdleLimits, now: Instant) {
        if conn.reusable() {
            self.put_idle(Slot::Live(conn), limits, now);
        }
    }

    /// Like [`Pool::checkin`], for a socket the lean path used: its
    /// response was read completely and the instance keeps it open.
    pub(crate) fn checkin_socket(
        self: &Arc<Self>,
        mut conn: ParkedConn,
        limits: IdleLimits,
        now: Instant,
    ) {
        if !conn.watch.aborted() {
            // The waker of the task that used it: an idle connection must
            // not keep that task's memory, nor wake it on a drain or when
            // its timer fires. (Checked in by that task, on the worker
            // whose runtime runs the timer.)
            drop(conn.watch.waker.take());
            conn.deadline.forget_waker();
            self.put_idle(Slot::Parked(conn), limits, now);
        }
    }

    fn put_idle(self: &Arc<Self>, slot: Slot, limits: IdleLimits, now: Instant) {
        let IdleLimits { max_idle, .. } = limits;
        if max_idle == 0 {
            return;
        }
        let worker = crate::workers::current();
        let (evicted, start, sooner) = {
            let mut idle = self.lock();
            let conns = idle.of(worker);
            let evicted = if conns.len() >= max_idle {
                conns.pop_front()
            } else {
                None
            };
            conns.push_back((slot, now));
            // The sweeper must look by the time this one is due.
            let due = now + limits.park_delay().min(limits.idle_timeout);
            let start = idle.sweep_at.is_none();
            let sooner = idle.sweep_at.is_none_or(|at| at > due);
            if sooner {
                idle.sweep_at = Some(due);
            }
            (evicted, start, sooner)
        };
        drop(evicted);
        if start {
            tokio::spawn(sweep_idle(Arc::downgrade(self), self.sweep.clone(), limits));
        } else if sooner {
            self.sweep.notify_one();
        }
    }

    /// Opens a TCP connection to the instance within `timeout` (TCP_NODELAY
    /// set). HTTP mode and TCP mode both connect through here.
    pub(crate) async fn dial(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let connecting = async {
            match self.ip {
                Some(ip) => TcpStream::connect(SocketAddr::new(ip, self.port)).await,
                None => TcpStream::connect((self.address.as_str(), self.port)).await,
            }
        };
        let stream = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Opens a new connection to the instance `name`, counted in `metrics`
    /// and aborted when `drain` fires (the instance's drain timeout has
    /// passed). `upgrades` makes a dedicated connection that can switch
    /// protocols (never pooled, driven by a task of its own so that the
    /// upgrade can take its socket).
    pub(crate) async fn connect(
        &self,
        name: &str,
        metrics: &InstanceMetrics,
        drain: CancellationToken,
        connect_timeout: Duration,
        upgrades: bool,
    ) -> Result<PooledConn, ConnectError> {
        let stream = self.dial(connect_timeout).await?;
        // An upgraded connection's traffic both ways, for the tunnel's idle
        // timeout.
        let activity = upgrades.then(|| Arc::new(Traffic::default()));
        let io = TokioIo::new(CountingIo::new(stream, metrics, activity.clone()));
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        let span = tracing::debug_span!("upstream", instance = %name);
        let driver = if upgrades {
            tokio::spawn(drive_upgradable(conn).instrument(span));
            Driver::Spawned
        } else {
            let (watch, closed) = watched(drain, span);
            Driver::Inline {
                conn: Some(Box::pin(conn)),
                watch,
                _closed: closed,
            }
        };
        Ok(PooledConn {
            sender,
            driver,
            deadline: Deadline::default(),
            activity,
        })
    }
}

impl Pool {
    /// Opens a new connection for the lean path: the socket, counted in
    /// `metrics` and aborted when `drain` fires, as [`Pool::connect`]'s.
    pub(crate) async fn connect_socket(
        &self,
        name: &str,
        metrics: &InstanceMetrics,
        drain: CancellationToken,
        connect_timeout: Duration,
    ) -> Result<ParkedConn, ConnectError> {
        let stream = self.dial(connect_timeout).await?;
        let (watch, closed) = watched(drain, tracing::debug_span!("upstream", instance = %name));
        Ok(ParkedConn {
            io: CountingIo::new(stream, metrics, None),
            watch,
            closed,
            deadline: Deadline::default(),
        })
    }
}

/// How long idle upstream connections are kept, and how many.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IdleLimits {
    /// Idle connections kept per worker; the oldest goes beyond that.
    pub(crate) max_idle: usize,
    /// Idle for longer: closed.
    pub(crate) idle_timeout: Duration,
    /// Idle for this long: parked.
    pub(crate) park_after: Duration,
}

impl IdleLimits {
    /// How long a connection stays live in the pool before it is parked:
    /// `park_after`, but at least a second, so that a busy pool's sweeper
    /// looks at most once a second.
    fn park_delay(&self) -> Duration {
        self.park_after.max(MIN_PARK_DELAY)
    }
}

const MIN_PARK_DELAY: Duration = Duration::from_secs(1);

/// Parks connections idle for the park delay and closes those idle for
/// longer than `idle_timeout`; ends when the pool is empty or gone. It
/// looks when the next of those is due: a pool whose idle connections are
/// all parked is looked at again only when the oldest is to close.
async fn sweep_idle(pool: Weak<Pool>, wake: Arc<Notify>, limits: IdleLimits) {
    loop {
        let at = {
            let Some(pool) = pool.upgrade() else { return };
            let Some(at) = pool.lock().sweep_at else {
                return;
            };
            at
        };
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            // A checkin moved `sweep_at` earlier.
            () = wake.notified() => continue,
        }
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let (stale, to_park) = {
            let mut idle = pool.lock();
            let mut stale = Vec::new();
            let mut to_park = Vec::new();
            for (worker, conns) in idle.conns.iter_mut().enumerate() {
                let keep = conns
                    .iter()
                    .position(|(_, since)| {
                        now.saturating_duration_since(*since) <= limits.idle_timeout
                    })
                    .unwrap_or(conns.len());
                stale.extend(conns.drain(..keep));
                // Oldest first, and what a sweep parks is older than what
                // it leaves: the live connections due to park are the run
                // after the last parked one.
                let due = conns.partition_point(|(_, since)| {
                    now.saturating_duration_since(*since) >= limits.park_delay()
                });
                let first_live = conns
                    .range(..due)
                    .rposition(|(slot, _)| matches!(slot, Slot::Parked(_)))
                    .map_or(0, |p| p + 1);
                to_park.extend(conns.drain(first_live..due).map(|entry| (worker, entry)));
            }
            (stale, to_park)
        };
        if !stale.is_empty() {
            debug!(closed = stale.len(), "idle upstream connections closed");
        }
        drop(stale);
        pool.park(to_park, limits.max_idle);
        let mut idle = pool.lock();
        idle.sweep_at = idle.next_sweep(&limits, now);
        if idle.sweep_at.is_none() {
            return;
        }
    }
}

impl Idle {
    /// When the next idle connection is due to park or to close; `None`
    /// when there is none.
    fn next_sweep(&self, limits: &IdleLimits, now: Instant) -> Option<Instant> {
        let due = self.conns.iter().filter_map(|conns| {
            let close = conns.front().map(|(_, since)| *since + limits.idle_timeout);
            let park = conns
                .iter()
                .find(|(slot, _)| matches!(slot, Slot::Live(_)))
                .map(|(_, since)| *since + limits.park_delay());
            close.into_iter().chain(park).min()
        });
        // Not sooner than a few milliseconds from now, however late.
        due.min().map(|at| at.max(now + Duration::from_millis(10)))
    }
}

impl Pool {
    /// Parks `conns` (taken from the idle lists) and puts them back in
    /// their workers' lists by the time they went idle. A list that took
    /// checkins meanwhile keeps at most `max_idle`, the newest.
    fn park(&self, conns: Vec<(usize, (Slot, Instant))>, max_idle: usize) {
        if conns.is_empty() {
            return;
        }
        let parked: Vec<_> = conns
            .into_iter()
            .filter_map(|(worker, (slot, since))| {
                let parked = match slot {
                    Slot::Live(conn) => conn.park()?,
                    Slot::Parked(parked) => parked,
                };
                Some((worker, Slot::Parked(parked), since))
            })
            .collect();
        let mut over = Vec::new();
        let mut idle = self.lock();
        for (worker, slot, since) in parked {
            let list = idle.of(worker);
            let at = list.partition_point(|(_, s)| *s <= since);
            list.insert(at, (slot, since));
            if list.len() > max_idle {
                over.extend(list.pop_front());
            }
        }
        drop(idle);
        // Closed outside the lock.
        drop(over);
    }
}

type Http1Conn = http1::Connection<TokioIo<CountingIo>, ClientBody>;

/// One upstream HTTP/1.1 connection.
///
/// A pooled connection has no task of its own: whoever uses it (the request
/// being forwarded, then its response body) drives its I/O through
/// [`Driver::poll_drive`], so a request and its response cross no task
/// boundary. A watcher task per connection sleeps until the instance's drain
/// timeout passes and then aborts it.
#[derive(Debug)]
pub(crate) struct PooledConn {
    pub(crate) sender: http1::SendRequest<ClientBody>,
    pub(crate) driver: Driver,
    pub(crate) deadline: Deadline,
    /// Bytes moved either way, on connections made for an upgrade.
    pub(crate) activity: Option<Arc<Traffic>>,
}

/// Deadlines of one connection's requests: one timer, reused (pushing a
/// registered timer later is cheap; registering one per request takes the
/// timer wheel's lock twice). No timer until the first wait.
#[derive(Debug, Default)]
pub(crate) struct Deadline {
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Deadline {
    /// Lets go of the waker of the task that last waited: a timer still
    /// registered would keep that task's memory and wake it when it fires.
    fn forget_waker(&mut self) {
        if let Some(timer) = self.timer.as_mut()
            && !timer.is_elapsed()
        {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            // Unconstrained: a task out of its budget would have the poll
            // return at once, the old waker still in place.
            let _ = std::pin::pin!(tokio::task::unconstrained(timer.as_mut())).poll(&mut cx);
        }
    }

    /// Forgets the deadline of the previous wait.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }

    /// Starts a deadline `after` from now on its first poll and polls it.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, after: Duration) -> Poll<()> {
        if !self.armed {
            self.armed = true;
            let at = tokio::time::Instant::now() + after;
            match self.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        // Armed: there is a timer.
        self.timer
            .as_mut()
            .map_or(Poll::Pending, |timer| timer.as_mut().poll(cx))
    }
}

#[derive(Debug)]
pub(crate) enum Driver {
    Inline {
        /// `None` once the connection ended. Boxed: it is large and moves
        /// between pool, request and body.
        conn: Option<Pin<Box<Http1Conn>>>,
        watch: Arc<Watch>,
        /// Dropped with the connection: ends the watcher.
        _closed: oneshot::Sender<()>,
    },
    /// Driven by a task (upgradable connections).
    Spawned,
}

impl Driver {
    /// Drives the connection's I/O; false once it has ended (closed, failed,
    /// or aborted because its instance drained).
    pub(crate) fn poll_drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Self::Inline { conn, watch, .. } = self else {
            return true;
        };
        watch.waker.register(cx.waker());
        if watch.aborted() {
            *conn = None;
            return false;
        }
        let Some(c) = conn.as_mut() else {
            return false;
        };
        match c.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(res) => {
                if let Err(error) = res {
                    debug!(%error, "upstream connection failed");
                }
                // Dropping it fails what is still queued on it (with the
                // request handed back when it was never written).
                *conn = None;
                false
            }
        }
    }

    /// The instance drained and the connection was aborted.
    pub(crate) fn aborted(&self) -> bool {
        matches!(self, Self::Inline { watch, .. } if watch.aborted())
    }
}

impl PooledConn {
    fn reusable(&self) -> bool {
        matches!(&self.driver, Driver::Inline { conn: Some(_), watch, .. } if !watch.aborted())
            && !self.sender.is_closed()
    }

    /// Waits (at most `wait`) until the connection can take a request;
    /// false if it ended or took too long (an idle connection the instance
    /// closed is found out here, before anything is written to it).
    pub(crate) async fn ready(&mut self, wait: Duration) -> bool {
        self.deadline.disarm();
        poll_fn(|cx| {
            let alive = self.driver.poll_drive(cx);
            match self.sender.poll_ready(cx) {
                Poll::Ready(res) => Poll::Ready(res.is_ok() && alive),
                Poll::Pending if !alive => Poll::Ready(false),
                Poll::Pending => self.deadline.poll(cx, wait).map(|()| false),
            }
        })
        .await
    }
}

/// Lets the drain watcher abort a connection that is driven inline.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    aborted: AtomicBool,
    waker: AtomicWaker,
}

impl Watch {
    fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// A new connection's watch, aborted by a watcher task (in `span`) when
/// `drain` fires; dropping the sender ends the watcher.
fn watched(drain: CancellationToken, span: tracing::Span) -> (Arc<Watch>, oneshot::Sender<()>) {
    let watch = Arc::new(Watch::default());
    let (closed, closed_rx) = oneshot::channel();
    tokio::spawn(watch_drain(watch.clone(), drain, closed_rx).instrument(span));
    (watch, closed)
}

/// Aborts the connection when the instance's drain timeout passes; ends
/// with the connection. A task of its own, woken only by those events (the
/// token takes a lock when polled; the hot path never polls it).
async fn watch_drain(watch: Arc<Watch>, drain: CancellationToken, closed: oneshot::Receiver<()>) {
    tokio::select! {
        () = drain.cancelled() => {
            debug!("upstream connection aborted: instance drained");
            watch.abort();
        }
        _ = closed => {}
    }
}

/// Runs a dedicated connection that may be upgraded; once upgraded, the
/// tunnel owns the socket and ends it on drain.
async fn drive_upgradable(conn: Http1Conn) {
    if let Err(error) = conn.with_upgrades().await {
        debug!(%error, "upstream connection failed");
    }
}

/// Bytes moved over one connection to an instance, each way. TCP mode's
/// and tunnels' idle timeouts watch their sum; the access log reports them.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) to_instance: AtomicU64,
    pub(crate) to_client: AtomicU64,
}

impl Traffic {
    /// Bytes to the instance and to the client.
    pub(crate) fn moved(&self) -> (u64, u64) {
        (
            self.to_instance.load(Ordering::Relaxed),
            self.to_client.load(Ordering::Relaxed),
        )
    }
}

/// Resolves once `traffic` has not moved for a whole `timeout` (checked
/// once per `timeout`, so after between one and two of them).
pub(crate) async fn idle(traffic: Arc<Traffic>, timeout: Duration) {
    let sum = |t: &Traffic| {
        let (a, b) = t.moved();
        a.wrapping_add(b)
    };
    let mut seen = sum(&traffic);
    loop {
        tokio::time::sleep(timeout).await;
        let now = sum(&traffic);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// A TCP stream to an instance that counts the bytes both ways in the
/// instance's metrics and, for TCP mode and tunnels, in `activity`.
#[derive(Debug)]
pub(crate) struct CountingIo {
    inner: TcpStream,
    metrics: InstanceMetrics,
    activity: Option<Arc<Traffic>>,
}

impl CountingIo {
    /// Wraps a new connection to the instance counted in `metrics` and
    /// counts it.
    pub(crate) fn new(
        inner: TcpStream,
        metrics: &InstanceMetrics,
        activity: Option<Arc<Traffic>>,
    ) -> Self {
        metrics.connections.inc();
        Self {
            inner,
            metrics: metrics.clone(),
            activity,
        }
    }

    fn count(counter: &Counter, way: Option<&AtomicU64>, n: usize) {
        counter.inc_by(n as u64);
        if let Some(a) = way {
            a.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for CountingIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            Self::count(
                &this.metrics.bytes_rx,
                this.activity.as_ref().map(|t| &t.to_client),
                n,
            );
        }
        res
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            Self::count(
                &this.metrics.bytes_tx,
                this.activity.as_ref().map(|t| &t.to_instance),
                n,
            );
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            Self::count(
                &this.metrics.bytes_tx,
                this.activity.as_ref().map(|t| &t.to_instance),
                n,
            );
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket from `pool.connect_socket` to a local listener, and the
    /// listener's end of it.
    async fn socket_pair() -> (ParkedConn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = Pool::new("127.0.0.1", addr.port());
        let metrics = InstanceMetrics::new();
        let (conn, accepted) = tokio::join!(
            pool.connect_socket(
                "a",
                &metrics,
                CancellationToken::new(),
                Duration::from_secs(5)
            ),
            listener.accept()
        );
        (conn.expect("connect"), accepted.expect("accept").0)
    }

    fn stale_now(conn: &ParkedConn, look: bool) -> bool {
        conn.stale(&mut Context::from_waker(std::task::Waker::noop()), look)
    }

    #[tokio::test]
    async fn an_idle_socket_the_instance_closed_or_wrote_to_is_stale() {
        use tokio::io::AsyncWriteExt;
        let (conn, _peer) = socket_pair().await;
        assert!(!stale_now(&conn, true), "a quiet socket is usable");
        assert!(!stale_now(&conn, false));

        let (conn, mut peer) = socket_pair().await;
        peer.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .expect("write");
        // Looking reads at once; otherwise the reactor must have seen it.
        assert!(stale_now(&conn, true), "bytes nobody asked for");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stale_now(&conn, false) {
            assert!(Instant::now() < deadline, "readiness never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let (conn, peer) = socket_pair().await;
        drop(peer);
        assert!(stale_now(&conn, true), "closed by the instance");
    }

    /// A waker that only counts its clones (by its `Arc`).
    struct Quiet;

    impl std::task::Wake for Quiet {
        fn wake(self: Arc<Self>) {}
    }

    #[tokio::test]
    async fn a_socket_back_in_the_pool_lets_go_of_its_last_request_s_waker() {
        let (mut conn, _peer) = socket_pair().await;
        let task = Arc::new(Quiet);
        let waker = std::task::Waker::from(task.clone());
        let mut deadline = conn.take_deadline();
        let waiting = deadline.poll(&mut Context::from_waker(&waker), Duration::from_secs(60));
        assert!(waiting.is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&task), 2, "the timer holds the waker");
        conn.keep_deadline(deadline);
        let pool = Arc::new(Pool::new("127.0.0.1", 1));
        let limits = IdleLimits {
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
            park_after: Duration::from_secs(1),
        };
        pool.checkin_socket(conn, limits, Instant::now());
        assert_eq!(pool.idle_len(), 1, "kept for the next request");
        assert_eq!(Arc::strong_count(&task), 1, "the timer let go of it");
    }

    #[test]
    fn pool_parses_ip_literals() {
        assert_eq!(
            Pool::new("10.0.0.1", 80).ip,
            Some(IpAddr::from([10, 0, 0, 1]))
        );
        assert!(Pool::new("::1", 80).ip.is_some());
        assert!(Pool::new("[::1]", 80).ip.is_some());
        assert_eq!(Pool::new("backend.internal", 80).ip, None);
        assert_eq!(
            Pool::new("backend.internal", 80).address(),
            "backend.internal"
        );
    }
}
