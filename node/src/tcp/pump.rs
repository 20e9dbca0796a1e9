//! TCP mode's byte pump between two plain TCP sockets, one per direction:
//!
//! - The first [`SPLICE_AFTER`] bytes of a direction are read into a stack
//!   buffer and written on at once; only what the receiver does not take
//!   right away is kept on the heap until it does. An idle connection holds
//!   no buffer at all.
//! - After that, while the direction carries a bulk stream (a download, an
//!   upload: its reads fill the buffer), it moves its bytes through a pipe
//!   with splice(2), so they never enter user space, as HAProxy's
//!   `splice-auto` does. When its splices turn small (a kept-alive
//!   protocol's requests and answers after a download) it gives the pipe
//!   back and copies again: a small message costs two system calls copied
//!   and three spliced ([`Pace`]). A pipe is two descriptors; at most
//!   [`MAX_PIPES`] exist at once (they come out of the node's own
//!   descriptor reserve), and a direction that finds none left keeps
//!   copying.
//!
//! End of stream on one side shuts the other side's write half down, and
//! the pump ends when both directions have, or at the first error (as
//! `tokio::io::copy_bidirectional`).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Poll, ready};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::series::Counter;
use crate::upstream::Traffic;

/// Bytes a direction copies before it may switch to splice(2).
pub(crate) const SPLICE_AFTER: u64 = 64 * 1024;

/// Reads in a row that fill the copy buffer that make a direction a bulk
/// stream, which splices once it has moved [`SPLICE_AFTER`].
const BULK_READS: u32 = 2;

/// Splices in a row that move less than a copy buffer that make a spliced
/// direction give its pipe back.
const SMALL_SPLICES: u32 = 3;

/// Pipes open at once, all connections together.
pub(crate) const MAX_PIPES: usize = 128;

/// The stack buffer of one copy.
const COPY_CHUNK: usize = 16 * 1024;

/// What one splice into the pipe moves at most (a pipe's default size).
const PIPE_CHUNK: usize = 64 * 1024;

static PIPES: AtomicUsize = AtomicUsize::new(0);

/// Bytes moved through pipes, all connections together.
static SPLICED: AtomicU64 = AtomicU64::new(0);

/// Moves bytes both ways until both sides ended; returns the bytes moved
/// from `a` to `b` and from `b` to `a`. Each byte is counted in the
/// direction's counter and in `traffic` (`a` is the client).
pub(crate) async fn both_ways(
    a: TcpStream,
    b: TcpStream,
    a_to_b: &Counter,
    b_to_a: &Counter,
    traffic: &Traffic,
) -> io::Result<(u64, u64)> {
    let (mut a_read, a_write) = a.into_split();
    let (mut b_read, b_write) = b.into_split();
    tokio::try_join!(
        one_way(&mut a_read, &b_write, a_to_b, &traffic.to_instance),
        one_way(&mut b_read, &a_write, b_to_a, &traffic.to_client)
    )
}

async fn one_way(
    from: &mut OwnedReadHalf,
    to: &OwnedWriteHalf,
    counter: &Counter,
    moved_way: &AtomicU64,
) -> io::Result<u64> {
    let mut pace = Pace::default();
    let mut pipe: Option<Pipe> = None;
    loop {
        if pipe.is_none() && pace.bulk() {
            pipe = Pipe::take();
            if pipe.is_none() {
                pace.no_pipe();
            }
        }
        let n = match &pipe {
            Some(p) => p.splice(from.as_ref(), to.as_ref()).await?,
            None => copy(from, to.as_ref()).await?,
        };
        if n == 0 {
            // The peer may be gone already: nothing to tell it then.
            let _ = rustix::net::shutdown(to.as_ref(), rustix::net::Shutdown::Write);
            return Ok(pace.moved);
        }
        if pipe.is_some() {
            if pace.spliced(n) {
                // Empty: a splice hands on all it took in.
                pipe = None;
            }
        } else {
            pace.copied(n);
        }
        counter.inc_by(n as u64);
        moved_way.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Whether a direction is a bulk stream, by the sizes of its last reads
/// (HAProxy's streamer flag in short): splicing saves the copies of a bulk
/// stream, and costs a small message a system call more than copying it
/// (into the pipe, out of it, and a splice that finds the socket empty,
/// against one read and one write).
#[derive(Debug, Default)]
struct Pace {
    /// Bytes the direction moved, copied and spliced.
    moved: u64,
    /// Copies in a row that filled the buffer.
    full_reads: u32,
    /// Splices in a row that moved less than a copy buffer.
    small_splices: u32,
}

impl Pace {
    /// Counts a copy of `n` bytes.
    fn copied(&mut self, n: usize) {
        self.moved += n as u64;
        self.full_reads = if n == COPY_CHUNK {
            self.full_reads.saturating_add(1)
        } else {
            0
        };
    }

    /// Counts a splice of `n` bytes; true when the direction should give
    /// its pipe back and copy again.
    fn spliced(&mut self, n: usize) -> bool {
        self.moved += n as u64;
        if n >= COPY_CHUNK {
            self.small_splices = 0;
            return false;
        }
        self.small_splices += 1;
        if self.small_splices < SMALL_SPLICES {
            return false;
        }
        self.small_splices = 0;
        self.full_reads = 0;
        true
    }

    /// No pipe was left for a bulk stream: it asks again after
    /// [`BULK_READS`] more full reads.
    fn no_pipe(&mut self) {
        self.full_reads = 0;
    }

    /// Whether the direction should splice: past [`SPLICE_AFTER`], with
    /// its last [`BULK_READS`] copies each filling the buffer.
    fn bulk(&self) -> bool {
        self.moved >= SPLICE_AFTER && self.full_reads >= BULK_READS
    }
}

/// One read of `from`, written whole to `to`; 0 at the end of `from`.
///
/// The read and the first write happen in one poll, into a stack buffer
/// that lives only for that poll: it is no part of the connection's task (a
/// future holds what lives across a wait). The read goes through tokio's
/// `poll_read`, which forgets the socket's readiness after a short read, so
/// no read is spent on finding it empty.
async fn copy(from: &mut OwnedReadHalf, to: &TcpStream) -> io::Result<usize> {
    let (n, rest) = poll_fn(|cx| {
        // Not zeroed: filling 16 KiB at every poll costs more than the read.
        let mut chunk = [MaybeUninit::<u8>::uninit(); COPY_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut buf))?;
        let read = buf.filled();
        if read.is_empty() {
            return Poll::Ready(Ok((0, Vec::new())));
        }
        // Usually the receiver takes it all at once; the rest waits on the
        // heap.
        let sent = match to.try_write(read) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Poll::Ready(Err(e)),
        };
        Poll::Ready(Ok((read.len(), read[sent..].to_vec())))
    })
    .await?;
    write_all(to, &rest).await?;
    Ok(n)
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A pipe of the splice path, counted against [`MAX_PIPES`].
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new pipe, if fewer than [`MAX_PIPES`] are open and the system
    /// gives one.
    fn take() -> Option<Self> {
        let taken = PIPES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_PIPES).then_some(n + 1)
        });
        if taken.is_err() {
            return None;
        }
        match rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
            Ok((read, write)) => Some(Self { read, write }),
            Err(_) => {
                PIPES.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Moves what `from` has (up to a pipe's worth) into the pipe and all of
    /// it on to `to`; 0 at the end of `from`.
    async fn splice(&self, from: &TcpStream, to: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let n = loop {
            from.readable().await?;
            let res = from.try_io(Interest::READABLE, || {
                rustix::pipe::splice(from, None, &self.write, None, PIPE_CHUNK, flags)
                    .map_err(io::Error::from)
            });
            match res {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            let res = to.try_io(Interest::WRITABLE, || {
                rustix::pipe::splice(&self.read, None, to, None, left, flags)
                    .map_err(io::Error::from)
            });
            match res {
                Ok(k) => {
                    left -= k;
                    SPLICED.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pipes open now.
#[cfg(test)]
fn pipes_open() -> usize {
    PIPES.load(Ordering::Acquire)
}

/// Bytes moved through pipes so far.
#[cfg(test)]
fn spliced() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use rand::RngCore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// The figures checked are process-wide: one test at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Both ends of a loopback TCP connection.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    /// A client and an instance, and the node's two sockets between them:
    /// (client, client side, upstream side, instance).
    async fn two_connections() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let (client, client_side) = socket_pair().await;
        let (upstream_side, instance) = socket_pair().await;
        (client, client_side, upstream_side, instance)
    }

    /// Runs `talk` with a client and an instance connected through the
    /// pump (`talk` ends both); the bytes the pump moved each way.
    async fn through_pump<F>(talk: impl FnOnce(TcpStream, TcpStream) -> F) -> (u64, u64)
    where
        F: Future<Output = ()>,
    {
        let (client, client_side, upstream_side, instance) = two_connections().await;
        let (a, b, traffic) = (Counter::default(), Counter::default(), Traffic::default());
        let pumping = both_ways(client_side, upstream_side, &a, &b, &traffic);
        let (moved, ()) = within(async { tokio::join!(pumping, talk(client, instance)) }).await;
        moved.expect("pump")
    }

    async fn within<T>(fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(crate::patience::patient(Duration::from_secs(20)), fut)
            .await
            .expect("timed out")
    }

    /// Writes `data` to `s`, ends its write half, and reads `s` to its end.
    async fn exchange(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&data).await.expect("write");
            w.shutdown().await.expect("shutdown");
        };
        let read = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("read");
            got
        };
        tokio::join!(write, read).1
    }

    #[tokio::test]
    async fn long_streams_both_ways_arrive_whole_and_counted_and_spliced() {
        let _serial = SERIAL.lock().await;
        let (client, client_side, upstream_side, instance) = two_connections().await;
        let mut up = vec![0_u8; 3 * 1024 * 1024 + 17];
        let mut down = vec![0_u8; 5 * 1024 * 1024 + 3];
        rand::rng().fill_bytes(&mut up);
        rand::rng().fill_bytes(&mut down);
        let (to_instance, to_client, traffic) =
            (Counter::default(), Counter::default(), Traffic::default());
        let spliced_before = spliced();
        let pumping = both_ways(
            client_side,
            upstream_side,
            &to_instance,
            &to_client,
            &traffic,
        );
        let (moved, got_by_client, got_by_instance) = within(async {
            tokio::join!(
                pumping,
                exchange(client, up.clone()),
                exchange(instance, down.clone())
            )
        })
        .await;
        assert_eq!(moved.expect("pump"), (up.len() as u64, down.len() as u64));
        assert!(
            got_by_instance == up,
            "the instance got the client's bytes in order"
        );
        assert!(
            got_by_client == down,
            "the client got the instance's bytes in order"
        );
        assert_eq!(to_instance.get(), up.len() as u64);
        assert_eq!(to_client.get(), down.len() as u64);
        assert_eq!(traffic.moved(), (up.len() as u64, down.len() as u64));
        // Most of what each direction moved past its first 64 KiB went
        // through a pipe (how much exactly depends on how the kernel paces
        // the reads: a few are copied until two in a row fill the buffer,
        // and small ones in a row go back to copying; the unit test of
        // `Pace` checks the thresholds), and the pipes were given back.
        assert_eq!(pipes_open(), 0);
        let expected = ((up.len() + down.len()) as u64 - 2 * SPLICE_AFTER) / 2;
        assert!(
            spliced() - spliced_before >= expected,
            "{} < {expected}",
            spliced() - spliced_before
        );
    }

    /// `rounds` requests of `size` bytes from `client`, each answered with
    /// as many bytes by `instance`, one at a time, checked on arrival.
    async fn ping_pong(
        client: &mut TcpStream,
        instance: &mut TcpStream,
        rounds: usize,
        size: usize,
    ) {
        let mut buf = vec![0_u8; size];
        for round in 0..rounds {
            let ask = vec![(round % 251) as u8; size];
            client.write_all(&ask).await.expect("write");
            instance.read_exact(&mut buf).await.expect("read");
            assert_eq!(buf, ask, "request {round}");
            let answer = vec![(round % 241) as u8 ^ 0xff; size];
            instance.write_all(&answer).await.expect("write");
            client.read_exact(&mut buf).await.expect("read");
            assert_eq!(buf, answer, "answer {round}");
        }
    }

    #[tokio::test]
    async fn small_messages_are_copied_however_long_the_connection_lasts() {
        let _serial = SERIAL.lock().await;
        let spliced_before = spliced();
        // 2,000 × 100 bytes each way: three times SPLICE_AFTER.
        let moved = through_pump(|mut client, mut instance| async move {
            ping_pong(&mut client, &mut instance, 2_000, 100).await;
            assert_eq!(pipes_open(), 0, "a direction of small messages took a pipe");
        })
        .await;
        assert_eq!(moved, (200_000, 200_000));
        assert_eq!(spliced(), spliced_before, "small messages are copied");
    }

    #[tokio::test]
    async fn a_download_is_spliced_and_the_small_messages_after_it_are_copied() {
        let _serial = SERIAL.lock().await;
        let mut download = vec![0_u8; 2 * 1024 * 1024];
        rand::rng().fill_bytes(&mut download);
        let download_len = download.len() as u64;
        let spliced_before = spliced();
        let moved = through_pump(|mut client, mut instance| async move {
            let send = async {
                instance.write_all(&download).await.expect("write");
            };
            let receive = async {
                let mut got = vec![0_u8; download.len()];
                client.read_exact(&mut got).await.expect("read");
                got
            };
            let ((), got) = tokio::join!(send, receive);
            assert!(got == download, "the download arrived whole and in order");
            let after_download = spliced();
            assert!(
                after_download - spliced_before >= download.len() as u64 / 2,
                "the download was copied: {} bytes spliced",
                after_download - spliced_before
            );
            // The pipe goes back after SMALL_SPLICES small answers; none of
            // the rest passes through one.
            ping_pong(&mut client, &mut instance, SMALL_SPLICES as usize, 100).await;
            assert_eq!(pipes_open(), 0, "the pipe was kept for small messages");
            let given_back = spliced();
            ping_pong(&mut client, &mut instance, 500, 100).await;
            assert_eq!(spliced(), given_back, "small messages went through a pipe");
        })
        .await;
        let small = (SMALL_SPLICES as u64 + 500) * 100;
        assert_eq!(moved, (small, download_len + small));
    }

    #[test]
    fn a_direction_splices_while_its_reads_fill_the_buffer() {
        let mut pace = Pace::default();
        // Full reads, but not yet SPLICE_AFTER.
        while pace.moved + (COPY_CHUNK as u64) < SPLICE_AFTER {
            pace.copied(COPY_CHUNK);
            assert!(!pace.bulk(), "bulk at {} bytes", pace.moved);
        }
        pace.copied(COPY_CHUNK);
        assert!(pace.bulk());
        // A short read: not bulk until BULK_READS full ones in a row.
        pace.copied(100);
        assert!(!pace.bulk());
        pace.copied(COPY_CHUNK);
        assert!(!pace.bulk());
        pace.copied(COPY_CHUNK);
        assert!(pace.bulk());
        // Spliced: only SMALL_SPLICES small ones in a row give the pipe back.
        assert!(!pace.spliced(10));
        assert!(!pace.spliced(10));
        assert!(!pace.spliced(COPY_CHUNK), "a big splice breaks the row");
        assert!(!pace.spliced(10));
        assert!(!pace.spliced(10));
        assert!(pace.spliced(10));
        assert!(!pace.bulk(), "copying again needs full reads again");
        pace.copied(COPY_CHUNK);
        pace.copied(COPY_CHUNK);
        assert!(pace.bulk());
    }

    #[tokio::test]
    async fn a_short_exchange_is_copied_and_an_early_end_reaches_the_other_side() {
        let _serial = SERIAL.lock().await;
        let spliced_before = spliced();
        let moved = through_pump(|mut client, mut instance| async move {
            client.write_all(b"ping").await.expect("write");
            let mut buf = [0_u8; 4];
            instance.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"ping");
            instance.write_all(b"pong").await.expect("write");
            client.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"pong");
            // The instance closes: the client sees the end, then closes too.
            drop(instance);
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.expect("read");
            assert!(rest.is_empty());
            drop(client);
        })
        .await;
        assert_eq!(moved, (4, 4));
        assert_eq!(spliced(), spliced_before, "short exchanges are copied");
        assert_eq!(pipes_open(), 0);
    }
}
