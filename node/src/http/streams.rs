//! The streams of one HTTP/2 connection, run in the connection's own task.
//!
//! hyper hands each HTTP/2 stream's future to an executor. Spawned as a
//! task of its own, every request paid for the task's allocation and its
//! trips through the scheduler, and each answer reached the connection's
//! task as one more wake-up. Here the executor queues the stream for the
//! connection's task, which polls its streams beside hyper's connection:
//! the answers that became ready and the writes that carry them are done
//! in one poll, as HAProxy and NGINX serve a connection's streams on the
//! thread that owns it (a worker's runtime is a single thread anyway).
//!
//! A stream still running when its connection ends is dropped with it: its
//! client is gone (closed, reset or past the drain timeout), and dropping
//! the request releases its instance's in-flight count and its upstream
//! connection at once. Streams that hyper accepted in the very poll that
//! ended the connection (a protocol error after them, say) are dropped
//! without being started, so they leave no access-log line. hyper gives
//! each stream a clone of its executor, so the executor holds the queue
//! weakly: a queued stream can never keep its own queue alive.
//!
//! A panic in one stream (a bug) ends its connection, as one in an HTTP/1
//! request does; the worker goes on.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

type Queue = Mutex<Vec<Stream>>;

/// The queue of one connection's streams: the executor to give hyper, and
/// the queue itself for [`Streams`].
pub(crate) fn queue() -> (Spawner, Arc<Queue>) {
    let queue = Arc::new(Queue::default());
    (Spawner(Arc::downgrade(&queue)), queue)
}

/// hyper's executor for one connection's streams: it queues them for
/// [`Streams`], or drops them once the connection's task has.
#[derive(Clone)]
pub(crate) struct Spawner(Weak<Queue>);

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        if let Some(queue) = self.0.upgrade() {
            lock(&queue).push(Box::pin(stream));
        }
    }
}

/// Pushed and taken by the connection's own task only: never contended,
/// and a poisoned queue still holds whole futures.
fn lock(queue: &Queue) -> std::sync::MutexGuard<'_, Vec<Stream>> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// hyper's connection future (`C`) polled with the streams it started.
pub(crate) struct Streams<'a, C> {
    pub(crate) conn: Pin<&'a mut C>,
    started: Arc<Queue>,
    running: FuturesUnordered<Stream>,
}

impl<'a, C> Streams<'a, C> {
    pub(crate) fn new(conn: Pin<&'a mut C>, started: Arc<Queue>) -> Self {
        Self {
            conn,
            started,
            running: FuturesUnordered::new(),
        }
    }

    /// Moves the streams hyper started into the running set; false if
    /// there were none.
    fn take_started(&mut self) -> bool {
        let mut started = lock(&self.started);
        if started.is_empty() {
            return false;
        }
        self.running.extend(started.drain(..));
        true
    }

    /// Polls every stream that was woken (a stream that ends leaves the
    /// set).
    fn poll_running(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
    }
}

impl<C, T> Future for Streams<'_, C>
where
    C: Future<Output = T>,
{
    type Output = T;

    /// The streams first, so that the answers they produce are written by
    /// the connection's poll that follows; then the streams that poll
    /// accepted, until a poll of the connection accepts none.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        loop {
            this.poll_running(cx);
            if let Poll::Ready(end) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(end);
            }
            if !this.take_started() {
                return Poll::Pending;
            }
        }
    }
}
