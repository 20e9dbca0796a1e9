//! The data plane's threads: one single-threaded runtime per worker, as
//! HAProxy's threads and NGINX's worker processes are.
//!
//! Every published port is bound once per worker (`SO_REUSEPORT`, so the
//! kernel spreads new connections over the workers), and a connection lives
//! on the worker that accepted it: its client socket, its upstream
//! connections, their timers and every wake-up of its task stay on one
//! thread. Upstream pools keep one idle list per worker ([`current`]), so a
//! request never takes a connection whose socket another worker's reactor
//! watches. The control plane (Raft, gossip, the admin API) keeps the
//! node's multi-threaded runtime.
//!
//! A worker that holds no client connection sleeps: its memory collector
//! ([`give_back_memory`]) runs while the worker holds connections (a
//! WebSocket tunnel included) and for three periods after the last one
//! closes, then waits for the next accept, so an idle node's data plane
//! makes no wake-ups at all.

use std::cell::Cell;
use std::io;
use std::sync::mpsc;
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The index of the worker this thread runs; none on other threads.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
    /// The client connections open on this thread ([`Connection`]), and
    /// how many were opened or closed in all.
    static CONNECTIONS: Cell<(usize, u64)> = const { Cell::new((0, 0)) };
    /// The memory collector, while it waits for a connection.
    static COLLECTOR: Cell<Option<Waker>> = const { Cell::new(None) };
    /// The collector's passes on this thread.
    static COLLECTS: Cell<u64> = const { Cell::new(0) };
}

/// A client connection, counted on the thread that accepted it while the
/// connection's task holds this (the worker's, which runs its tasks on
/// that thread alone): what keeps the worker's memory collector running.
/// It holds the connection's place under `max_connections`, `P`.
#[derive(Debug)]
pub(crate) struct Connection<P> {
    _place: P,
}

impl<P> Connection<P> {
    pub(crate) fn new(place: P) -> Self {
        counted(1);
        Self { _place: place }
    }
}

impl<P> Drop for Connection<P> {
    fn drop(&mut self) {
        counted(-1);
    }
}

/// A connection opened (`1`) or closed (`-1`) on this thread: counted, and
/// the collector woken if it waits.
fn counted(change: isize) {
    CONNECTIONS.with(|c| {
        let (open, events) = c.get();
        c.set((open.saturating_add_signed(change), events.wrapping_add(1)));
    });
    if let Some(collector) = COLLECTOR.take() {
        collector.wake();
    }
}

/// Whether the caller runs on a worker (whose runtime is a single thread,
/// so that a task it spawns runs on the caller's thread).
pub(crate) fn on_worker() -> bool {
    INDEX.with(Cell::get).is_some()
}

/// The index of the worker running the caller; 0 on any other thread (the
/// control plane, tests), which shares worker 0's upstream idle lists.
pub(crate) fn current() -> usize {
    INDEX.with(Cell::get).unwrap_or(0)
}

/// The running workers. Dropping this stops them: each drops the tasks
/// still on it (connections included), as a crash would; a graceful stop
/// drains the connections first (see `Listeners::drained`).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    _threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers (at least one).
    pub fn start(n: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for index in 0..n.max(1) {
            let (tx, rx) = mpsc::sync_channel(1);
            let token = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("edgelb-dp-{index}"))
                .spawn(move || run(index, &token, &tx))?;
            match rx.recv() {
                Ok(Ok(handle)) => handles.push(handle),
                Ok(Err(e)) => {
                    stop.cancel();
                    return Err(e);
                }
                Err(_) => {
                    stop.cancel();
                    return Err(io::Error::other("a data-plane worker ended at start"));
                }
            }
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stop,
            _threads: threads,
        })
    }

    /// The workers' runtimes, by index.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Not joined: the caller may be a runtime thread, which must not
        // block. Each worker drops its tasks and ends by itself.
        self.stop.cancel();
    }
}

fn run(index: usize, stop: &CancellationToken, started: &mpsc::SyncSender<io::Result<Handle>>) {
    INDEX.with(|i| i.set(Some(index)));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let _ = started.send(Ok(runtime.handle().clone()));
    runtime.block_on(async {
        tokio::select! {
            () = stop.cancelled() => {}
            () = give_back_memory(COLLECT_PERIOD) => {}
        }
    });
    runtime.shutdown_background();
}

/// Every `period` while this thread holds client connections, returns its
/// emptied allocator pages to the system. The allocator would do so only
/// when this thread next allocates, so a worker that went quiet after a
/// burst of connections would keep their buffers' pages (24.0 against 5.7
/// KiB per idle connection after 8,000 clients, `bench/idle.sh`).
///
/// After the last connection closes (and no other opened or closed within
/// a period) it collects [`QUIET_COLLECTS`] more times, and then waits
/// for a connection to open or close instead of waking every period: a
/// worker with no client connection (or tunnel) holds no buffer that a
/// later collect could return, and an idle node's workers then sleep
/// (the period's timer had each wake up every second). The upstream
/// connections a pool keeps after its clients left are not counted: what
/// one frees when its idle timeout closes it (a few KiB; its buffers went
/// when it parked) goes back at the next collect.
async fn give_back_memory(period: Duration) {
    loop {
        let seen = CONNECTIONS.with(Cell::get).1;
        std::future::poll_fn(|cx| {
            if CONNECTIONS.with(Cell::get).1 == seen {
                COLLECTOR.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let mut quiet = 0;
        let mut seen = CONNECTIONS.with(Cell::get).1;
        while quiet < QUIET_COLLECTS {
            tokio::time::sleep(period).await;
            edgelb_alloc::collect();
            COLLECTS.set(COLLECTS.get() + 1);
            let (open, events) = CONNECTIONS.with(Cell::get);
            quiet = if open > 0 || events != seen {
                0
            } else {
                quiet + 1
            };
            seen = events;
        }
    }
}

/// How often a worker returns emptied pages: the allocator's own purge
/// delay (1 s), so pages go back within about two seconds of emptying.
const COLLECT_PERIOD: Duration = Duration::from_secs(1);

/// Collects after the last connection closed (after the one that saw the
/// close): pages emptied just before the first are past the purge delay
/// at the second, and an upstream pool's connections, which park up to
/// a second after their last use, are past it at the third.
const QUIET_COLLECTS: u32 = 3;

/// One worker per CPU the process may use.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread_and_knows_its_index() {
        let workers = Workers::start(2).expect("workers start");
        assert_eq!(workers.handles().len(), 2);
        let mut seen = Vec::new();
        for (i, handle) in workers.handles().iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            handle.spawn(async move {
                let _ = tx.send((current(), std::thread::current().name().map(str::to_owned)));
            });
            let (index, name) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the worker runs the task");
            assert_eq!(index, i);
            seen.push(name.expect("named thread"));
        }
        assert_eq!(seen, ["edgelb-dp-0", "edgelb-dp-1"]);
        assert_eq!(current(), 0, "other threads count as worker 0");
    }

    /// The collector's passes on this thread after `run` more of the test
    /// clock (paused: it advances as the runtime idles).
    async fn collects_after(run: Duration) -> u64 {
        tokio::time::sleep(run).await;
        COLLECTS.get()
    }

    /// With no connection the collector waits without a timer; a
    /// connection wakes it, it collects every period while the connection
    /// is open and three times more after, then waits again.
    #[tokio::test(start_paused = true)]
    async fn the_memory_collector_runs_only_around_connections() {
        const P: Duration = Duration::from_secs(1);
        let collector = tokio::spawn(give_back_memory(P));
        assert_eq!(collects_after(P * 10).await, 0, "no connection yet");
        let held = Connection::new(());
        let base = collects_after(P / 2).await;
        assert_eq!(base, 0);
        assert_eq!(collects_after(P * 5).await, 5, "one per period while open");
        drop(held);
        // The pass that sees the close, then three quiet ones.
        assert_eq!(collects_after(P * 10).await, 9);
        assert_eq!(collects_after(P * 60).await, 9, "asleep once quiet");
        // A connection opened and closed between two passes counts too.
        drop(Connection::new(()));
        let woke = collects_after(P / 2).await;
        drop(Connection::new(()));
        assert_eq!(woke, 9);
        assert_eq!(collects_after(P * 10).await, 13);
        assert_eq!(CONNECTIONS.with(Cell::get).0, 0);
        collector.abort();
    }

    #[test]
    fn dropping_the_workers_drops_their_tasks() {
        struct Flag(mpsc::Sender<()>);
        impl Drop for Flag {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let workers = Workers::start(1).expect("workers start");
        let (tx, rx) = mpsc::channel();
        let flag = Flag(tx);
        workers.handles()[0].spawn(async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        drop(workers);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the pending task was dropped when its worker stopped");
    }
}
