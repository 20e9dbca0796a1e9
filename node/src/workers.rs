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

use std::cell::Cell;
use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The index of the worker this thread runs; none on other threads.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
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
            () = give_back_memory() => {}
        }
    });
    runtime.shutdown_background();
}

/// Every [`COLLECT_PERIOD`], returns the worker's emptied allocator pages
/// to the system. The allocator would do so only when this thread next
/// allocates, so a worker that went quiet after a burst of connections
/// would keep their buffers' pages (24.0 against 5.7 KiB per idle
/// connection after 8,000 clients, `bench/idle.sh`).
async fn give_back_memory() {
    let mut tick = tokio::time::interval(COLLECT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        edgelb_alloc::collect();
    }
}

/// How often a worker returns emptied pages: the allocator's own purge
/// delay (1 s), so pages go back within about two seconds of emptying.
const COLLECT_PERIOD: Duration = Duration::from_secs(1);

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
