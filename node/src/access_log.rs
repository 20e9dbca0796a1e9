//! Access logs: one line per HTTP request and per TCP connection, as JSON
//! or as the common log format with the proxy's fields after it.
//!
//! ```text
//!  worker 0 ─ copies the line's fields into a buffer of its own thread
//!  worker 1 ─ …   (no lock, no atomic, the line not formatted)
//!       │ hands it over when it holds 32 KiB, or 100 ms after its first line
//!       ▼
//!  queue: Mutex<[buffers]> ──▶ writer thread: formats the lines ──write(2)──▶
//!                               file / stdout, every 100 ms, or at once when
//!                               the queue holds 1 MiB; SIGUSR1 reopens the file
//! ```
//!
//! The request path never waits on the disk, nor on another thread: a
//! worker copies a line's fields ([`line::Line`]) into a buffer only its
//! own thread touches (a lock taken per line cost a tenth of the log's
//! time per request: its release waits for the line's stores) and hands
//! the buffer to the writer thread whole. The writer formats the lines,
//! thousands at a time, with the formatting's code and tables in its
//! core's caches: formatted on the worker, a line at a time between two
//! requests that evict them, the same lines cost the node 4-8 % more CPU
//! per kept-alive request; copied, 1.5-4.6 % (`bench/log_cost.sh`). When
//! the disk is slower than the lines come (the queue
//! holds [`MAX_PENDING`]), further buffers are dropped and their lines
//! counted (`edgelb_access_log_dropped_total`), as a full syslog socket
//! drops HAProxy's. Off by default; `access_log_sample` logs a random
//! fraction.

mod line;

use std::cell::RefCell;
use std::fmt::{self, Display};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use tracing::warn;

use line::Line;

/// Where the lines go (`access_log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
    /// Appended to; created (0600) when missing, reopened on SIGUSR1.
    File(PathBuf),
}

impl Target {
    /// `stdout`, `stderr` or a file's path.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("is empty (leave it out, or \"off\", for no access log)".into()),
            "stdout" => Ok(Self::Stdout),
            "stderr" => Ok(Self::Stderr),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// How a line is written (`access_log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Json,
    /// The common log format (`client - - [time] "request" status bytes`),
    /// then the proxy's fields as `key=value`.
    Text,
}

impl Format {
    /// Appends `line` to `out`, formatted this way.
    fn write(self, out: &mut Vec<u8>, dates: &mut Dates, line: &Line<'_>) {
        match self {
            Self::Json => json(out, dates, line),
            Self::Text => text(out, dates, line),
        }
    }
}

/// The access log's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub target: Target,
    pub format: Format,
    /// The fraction of requests and connections logged, in (0, 1].
    pub sample: f64,
}

/// A thread's buffer this full goes to the writer: small enough to stay
/// in the core's cache while it is filled.
const HAND_OVER_AT: usize = 32 * 1024;

/// A worker's lines go to the writer this long after the first of them at
/// the latest (on a timer of the worker's, so a quiet worker's lines do
/// not wait for more).
const HAND_OVER_EVERY: Duration = Duration::from_millis(100);

/// The queue holding this much wakes the writer at once. Large, so that a
/// busy worker wakes it seldom (about 7 times a second at 50,000 lines a
/// second, of about 140 bytes each): each wake-up is a context switch on
/// a core the workers need.
const FLUSH_AT: usize = 1024 * 1024;

/// The queue holding this much drops further buffers until the writer
/// catches up.
pub(crate) const MAX_PENDING: usize = 8 * 1024 * 1024;

/// The writer's period when the queue does not fill up.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Written buffers kept for the next hand-overs (a busy node's second of
/// lines cycles through about this many).
const KEEP_FREE: usize = 64;

/// A thread's buffer's capacity: a line more than [`HAND_OVER_AT`] fits
/// without growing it.
const BUFFER: usize = HAND_OVER_AT + FEW;

/// Lines handed over this few bytes at a time join the last buffer
/// waiting, when it has room.
const FEW: usize = 4096;

/// The writer writes its formatted lines this many bytes at a time.
const WRITE_AT: usize = 256 * 1024;

/// How long a stopping log waits for the workers' last buffers (they come
/// within [`HAND_OVER_EVERY`]).
const STOP_WAIT: Duration = Duration::from_millis(300);

/// The access log of a node.
pub struct AccessLog {
    inner: Arc<Inner>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("target", &self.inner.target)
            .field("format", &self.inner.format)
            .finish_non_exhaustive()
    }
}

struct Inner {
    target: Target,
    format: Format,
    sample: f64,
    queue: Mutex<Queue>,
    /// Threads holding lines not handed over yet.
    held: AtomicUsize,
    stop: AtomicBool,
    reopen: AtomicBool,
    writer: OnceLock<Thread>,
    lines: IntCounter,
    dropped: IntCounter,
    errors: IntCounter,
}

/// The buffers handed over and not written yet.
#[derive(Default)]
struct Queue {
    full: Vec<Vec<u8>>,
    /// Bytes in `full`.
    bytes: usize,
    /// Lines in `full`: counted into `edgelb_access_log_lines_total` by the
    /// writer, so that workers share no counter per line.
    lines: u64,
    /// Written buffers, emptied, for the next hand-overs.
    free: Vec<Vec<u8>>,
    /// The writer has ended: what is handed over now is dropped (and
    /// counted).
    closed: bool,
}

thread_local! {
    /// The lines this thread has written and not handed over yet.
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// A thread's lines of one log, and its clock.
struct Held {
    log: Arc<Inner>,
    pending: Vec<u8>,
    lines: u64,
    /// A timer will hand `pending` over.
    timed: bool,
    /// On a worker, whose buffers are handed over full.
    worker: bool,
    clock: Clock,
}

impl Held {
    /// Gives the lines to the writer (or drops them when it is behind).
    fn hand_over(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let log = &self.log;
        let (wake, dropped) = {
            let mut q = lock(&log.queue);
            if q.closed || q.bytes >= MAX_PENDING {
                (false, true)
            } else {
                q.bytes += self.pending.len();
                q.lines += self.lines;
                // A few lines (another thread's, or a quiet worker's) join
                // the last buffer when they fit: one line is not one buffer,
                // and a full buffer is not copied.
                match q.full.last_mut() {
                    Some(last)
                        if self.pending.len() <= FEW
                            && last.capacity() - last.len() >= self.pending.len() =>
                    {
                        last.extend_from_slice(&self.pending);
                        self.pending.clear();
                    }
                    _ => {
                        let next = match self.worker {
                            true => q.free.pop().unwrap_or_else(|| Vec::with_capacity(BUFFER)),
                            false => Vec::new(),
                        };
                        let full = std::mem::replace(&mut self.pending, next);
                        q.full.push(full);
                    }
                }
                (
                    q.bytes >= FLUSH_AT || log.stop.load(Ordering::Relaxed),
                    false,
                )
            }
        };
        if dropped {
            log.dropped.inc_by(self.lines);
            self.pending.clear();
        }
        self.lines = 0;
        log.held.fetch_sub(1, Ordering::AcqRel);
        if wake && let Some(t) = log.writer.get() {
            t.unpark();
        }
    }
}

/// A thread that ends hands its lines over.
impl Drop for Held {
    fn drop(&mut self) {
        self.hand_over();
    }
}

/// Hands this thread's lines over when dropped: a worker's timer holds
/// one, so that the lines go when it fires or, if its runtime stops
/// first, when it is dropped.
struct HandOver;

impl Drop for HandOver {
    fn drop(&mut self) {
        with_held(|h| {
            h.timed = false;
            h.hand_over();
        });
    }
}

/// Runs `f` on this thread's held lines, if it holds any (and is not
/// ending, nor adding a line).
fn with_held(f: impl FnOnce(&mut Held)) {
    let _ = HELD.try_with(|held| {
        if let Ok(mut held) = held.try_borrow_mut()
            && let Some(h) = held.as_mut()
        {
            f(h);
        }
    });
}

/// A client's address as lines write it: its IP's text ([`client_ip`]),
/// made once per connection rather than per line, and its port.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub ip: &'a [u8],
    pub port: u16,
}

/// The text of a client's IP in lines, as in `X-Forwarded-For`: an
/// IPv4-mapped address as IPv4.
pub fn client_ip(ip: std::net::IpAddr) -> String {
    ip.to_canonical().to_string()
}

/// What a line says. Strings are escaped as the format needs; `None`s and
/// zeros print as `null` (JSON) or `-` (text).
pub struct Entry<'a> {
    /// When the request or connection began.
    pub began: Instant,
    /// When it ended, as the caller read the clock: a served request's or
    /// connection's end is read once, for the instance's metrics and for
    /// the line.
    pub ended: Instant,
    pub client: Option<Client<'a>>,
    /// The published port.
    pub port: u16,
    pub tls: bool,
    /// `HTTP/1.1`, `HTTP/2`, …, or `TCP`; written as it is.
    pub proto: &'static str,
    /// A token (RFC 9110 §9: `http::Method` holds no other), written as it
    /// is; empty for TCP connections.
    pub method: &'a str,
    pub host: &'a [u8],
    pub path: &'a str,
    pub group: &'a str,
    pub instance: &'a str,
    /// The HTTP status sent; 0 for TCP connections.
    pub status: u16,
    /// Body bytes from the client (HTTP), bytes to the instance (TCP).
    pub bytes_in: u64,
    /// Body bytes to the client (HTTP), bytes to the client (TCP).
    pub bytes_out: u64,
    /// Instances tried.
    pub attempts: u32,
    /// Connecting to the instance (a new connection; `None` when a pooled
    /// one was used or none was made).
    pub connect: Option<Duration>,
    /// From the first attempt to the instance's response headers.
    pub response: Option<Duration>,
    /// Who ended the request early (`client`, `upstream`, `internal`), and
    /// why.
    pub error: Option<(&'static str, &'a dyn Display)>,
}

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn open(options: &Options) -> io::Result<Self> {
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).expect("a valid metric name and help text")
        };
        let inner = Arc::new(Inner {
            target: options.target.clone(),
            format: options.format,
            sample: options.sample,
            queue: Mutex::default(),
            held: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            writer: OnceLock::new(),
            lines: counter(
                "edgelb_access_log_lines_total",
                "Access log lines written (counted as the writer takes them, within 200 ms).",
            ),
            dropped: counter(
                "edgelb_access_log_dropped_total",
                "Access log lines dropped because the log's thread or its target did not keep up.",
            ),
            errors: counter(
                "edgelb_access_log_write_errors_total",
                "Failed writes (or reopens) of the access log; their lines are lost.",
            ),
        });
        let out = Out::open(&inner.target)?;
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("edgelb-access-log".into())
                .spawn(move || write_loop(&inner, out))?
        };
        let _ = inner.writer.set(thread.thread().clone());
        Ok(Self {
            inner,
            writer: Mutex::new(Some(thread)),
        })
    }

    /// Registers the log's counters.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        for c in [&self.inner.lines, &self.inner.dropped, &self.inner.errors] {
            registry.register(Box::new(c.clone()))?;
        }
        Ok(())
    }

    /// Whether the next request or connection is logged (the sample).
    pub(crate) fn sampled(&self) -> bool {
        self.inner.sample >= 1.0 || rand::random::<f64>() < self.inner.sample
    }

    /// Adds a line (written within [`HAND_OVER_EVERY`] and
    /// [`FLUSH_EVERY`]).
    pub fn write(&self, entry: &Entry<'_>) {
        // `None` when the line cannot be held: the thread is ending (its
        // buffer destroyed), or a line is written while one is added
        // (none is).
        let timer = HELD.try_with(|held| {
            let mut held = held.try_borrow_mut().ok()?;
            // Lines of a log closed since go to it first.
            if held
                .as_ref()
                .is_some_and(|h| !Arc::ptr_eq(&h.log, &self.inner))
            {
                *held = None;
            }
            let h = held.get_or_insert_with(|| {
                let worker = crate::workers::on_worker();
                Held {
                    log: self.inner.clone(),
                    pending: Vec::with_capacity(if worker { BUFFER } else { 0 }),
                    lines: 0,
                    timed: false,
                    worker,
                    clock: Clock::default(),
                }
            });
            let first = h.pending.is_empty();
            let start = h.clock.wall(entry.began, entry.ended);
            encode(entry, start, &mut h.pending);
            h.lines += 1;
            if first {
                self.inner.held.fetch_add(1, Ordering::AcqRel);
            }
            // Another thread (the control plane's, a test's) has no timer
            // of its own: its lines go at once.
            if !h.worker || h.pending.len() >= HAND_OVER_AT {
                h.hand_over();
                return Some(false);
            }
            Some(!std::mem::replace(&mut h.timed, true))
        });
        let Ok(Some(timer)) = timer else {
            self.inner.dropped.inc();
            return;
        };
        if timer {
            // Spawned once the line is in: a runtime that is stopping drops
            // the timer at once, and its `HandOver` then hands the line over.
            let hand_over = HandOver;
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(async move {
                    let _hand_over = hand_over;
                    tokio::time::sleep(HAND_OVER_EVERY).await;
                })),
                Err(_) => drop(hand_over),
            }
        }
    }

    /// Reopens a file target (after the file was rotated away); the
    /// lines pending are written to the new file.
    pub fn reopen(&self) {
        self.inner.reopen.store(true, Ordering::Release);
        if let Some(t) = self.inner.writer.get() {
            t.unpark();
        }
    }

    /// Writes what is pending and stops the writer (waiting for it).
    pub fn close(&self) {
        // The caller's own lines first: a worker that closes the log
        // cannot run the timer that would hand them over.
        with_held(|h| {
            if Arc::ptr_eq(&h.log, &self.inner) {
                h.hand_over();
            }
        });
        self.inner.stop.store(true, Ordering::Release);
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Appends `e`'s [`Line`] to `out`; it began at `start` (wall-clock time
/// since the epoch).
fn encode(e: &Entry<'_>, start: Duration, out: &mut Vec<u8>) {
    let why;
    let (error_origin, error) = match e.error {
        Some((origin, e)) => {
            why = e.to_string();
            (origin.as_bytes(), why.as_bytes())
        }
        None => (&[][..], &[][..]),
    };
    let client = e.client.unwrap_or(Client { ip: &[], port: 0 });
    Line {
        start,
        duration: e.ended.saturating_duration_since(e.began),
        bytes_in: e.bytes_in,
        bytes_out: e.bytes_out,
        connect: e.connect,
        response: e.response,
        attempts: e.attempts,
        status: e.status,
        port: e.port,
        client_port: client.port,
        tls: e.tls,
        client_ip: client.ip,
        proto: e.proto.as_bytes(),
        method: e.method.as_bytes(),
        host: e.host,
        path: e.path.as_bytes(),
        group: e.group.as_bytes(),
        instance: e.instance.as_bytes(),
        error_origin,
        error,
    }
    .encode(out);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Out {
    Stdout,
    Stderr,
    File(File),
}

impl Out {
    fn open(target: &Target) -> io::Result<Self> {
        Ok(match target {
            Target::Stdout => Self::Stdout,
            Target::Stderr => Self::Stderr,
            Target::File(path) => Self::File(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout => io::stdout().lock().write_all(bytes),
            Self::Stderr => io::stderr().lock().write_all(bytes),
            Self::File(f) => f.write_all(bytes),
        }
    }
}

/// The writer thread: writes the buffers handed over, until `stop`; then
/// it waits (up to [`STOP_WAIT`]) for the buffers the workers still hold,
/// so that the lines of the last requests are not lost.
fn write_loop(inner: &Inner, mut out: Out) {
    // Swapped with the queue's: both keep their capacity.
    let mut batch = Vec::new();
    // The lines formatted and not written yet, and the dates they share.
    let mut formatted = Vec::with_capacity(WRITE_AT + FEW);
    let mut dates = Dates::default();
    let mut warned = false;
    let mut give_up = None;
    loop {
        let last = inner.stop.load(Ordering::Acquire) && {
            let give_up = *give_up.get_or_insert_with(|| Instant::now() + STOP_WAIT);
            inner.held.load(Ordering::Acquire) == 0 || Instant::now() >= give_up
        };
        if inner.reopen.swap(false, Ordering::AcqRel) {
            match Out::open(&inner.target) {
                Ok(o) => out = o,
                Err(error) => {
                    inner.errors.inc();
                    warn!(%error, "access log: reopen failed; writing to the old file");
                }
            }
        }
        {
            let mut q = lock(&inner.queue);
            std::mem::swap(&mut q.full, &mut batch);
            q.bytes = 0;
            q.closed = last;
            inner.lines.inc_by(std::mem::take(&mut q.lines));
        }
        let mut write = |formatted: &mut Vec<u8>| {
            match out.write_all(formatted) {
                Ok(()) => warned = false,
                Err(error) => {
                    inner.errors.inc();
                    if !std::mem::replace(&mut warned, true) {
                        warn!(%error, "access log: write failed; its lines are lost");
                    }
                }
            }
            formatted.clear();
            // Back to its size, after a very long line.
            formatted.shrink_to(WRITE_AT + FEW);
        };
        for buffer in &batch {
            let mut rest = &buffer[..];
            while !rest.is_empty() {
                let Some(line) = Line::decode(&mut rest) else {
                    // Not a whole line: cannot be (each is added whole).
                    debug_assert!(false, "a cut line in an access log buffer");
                    inner.errors.inc();
                    break;
                };
                inner.format.write(&mut formatted, &mut dates, &line);
                if formatted.len() >= WRITE_AT {
                    write(&mut formatted);
                }
            }
        }
        if !formatted.is_empty() {
            write(&mut formatted);
        }
        // A worker's buffers are kept for the next hand-overs, but for one
        // grown by a long line (freed, outside the lock).
        batch.retain(|b| (BUFFER..=2 * HAND_OVER_AT).contains(&b.capacity()));
        batch.truncate(KEEP_FREE);
        batch.iter_mut().for_each(Vec::clear);
        if !batch.is_empty() {
            let mut q = lock(&inner.queue);
            let keep = batch.len().min(KEEP_FREE.saturating_sub(q.free.len()));
            q.free.extend(batch.drain(..keep));
        }
        batch.clear();
        if last {
            return;
        }
        std::thread::park_timeout(FLUSH_EVERY);
    }
}

/// The wall clock at an instant, read once a second per thread (an
/// `Instant` is read for the duration anyway).
#[derive(Default)]
struct Clock {
    base: Option<Base>,
}

/// The wall clock read at an instant, as time since the epoch (what the
/// line is made of: no `SystemTime` arithmetic per line).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Base {
    at: Instant,
    /// A second after `at`: read again from then on.
    until: Instant,
    epoch: Duration,
}

/// The writer's date of the second last formatted: most lines of a
/// second share it.
#[derive(Default)]
struct Dates {
    secs: u64,
    /// The second `secs` as `format` writes it: `2026-12-05T08:20:39`
    /// (JSON) or `05/Dec/2026:08:20:39` (text).
    date: String,
    format: Option<Format>,
}

impl Clock {
    /// The wall-clock time (since the epoch) of `t`, an instant before
    /// `now`; a change of the wall clock shows within a second.
    fn wall(&mut self, t: Instant, now: Instant) -> Duration {
        let base = match self.base {
            Some(base) if now < base.until => base,
            _ => {
                let base = Base {
                    at: now,
                    until: now + Duration::from_secs(1),
                    epoch: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default(),
                };
                self.base = Some(base);
                base
            }
        };
        match t.checked_duration_since(base.at) {
            Some(after) => base.epoch + after,
            None => base
                .epoch
                .saturating_sub(base.at.saturating_duration_since(t)),
        }
    }
}

impl Dates {
    /// The date of `t` (since the epoch) in `format`'s way, to the
    /// second, and `t`'s milliseconds. A log has one format, so the date
    /// is made again when the second changes.
    fn at(&mut self, t: Duration, format: Format) -> (&str, u32) {
        let secs = t.as_secs();
        if secs != self.secs || self.format != Some(format) {
            let when = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            self.secs = secs;
            self.format = Some(format);
            self.date = match format {
                Format::Json => when.format(ISO),
                Format::Text => when.format(CLF),
            }
            .unwrap_or_default();
        }
        (&self.date, t.subsec_millis())
    }
}

/// `2026-12-05T08:20:39`, the JSON lines' time to the second.
const ISO: &[time::format_description::FormatItem<'_>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");

/// `05/Dec/2026:08:20:39`, the common log format's.
const CLF: &[time::format_description::FormatItem<'_>] =
    time::macros::format_description!("[day]/[month repr:short]/[year]:[hour]:[minute]:[second]");

// The line is written by hand rather than through `core::fmt`: with it,
// formatting took a third of the log's cost per request (floats above
// all).

fn num<N: itoa::Integer>(out: &mut Vec<u8>, n: N) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Three digits, zero-padded (`n` < 1000): one load from a table rather
/// than three divisions.
fn three(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&THREE[n as usize % 1000]);
}

/// `000` to `999`.
const THREE: [[u8; 3]; 1000] = {
    let mut t = [[0u8; 3]; 1000];
    let mut n = 0;
    while n < 1000 {
        t[n] = [
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        n += 1;
    }
    t
};

/// Milliseconds with three decimals (microseconds).
fn millis(out: &mut Vec<u8>, d: Duration) {
    // In u64 (`as_micros` is a u128): 584,000 years of microseconds.
    let micros = d
        .as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()));
    num(out, micros / 1000);
    out.push(b'.');
    three(out, (micros % 1000) as u32);
}

/// `"1.2.3.4:port"` or `"[::1]:port"`, JSON's client.
fn address(out: &mut Vec<u8>, ip: &[u8], port: u16) {
    // An IPv6 address's text has a `:` within its first five bytes (a
    // group has at most four digits); an IPv4 address's has none.
    let v6 = ip.iter().take(5).any(|&b| b == b':');
    out.extend_from_slice(if v6 { b"\"[" } else { b"\"" });
    out.extend_from_slice(ip);
    out.extend_from_slice(if v6 { b"]:" } else { b":" });
    num(out, port);
    out.push(b'"');
}

/// A field's name as each format writes it before the value, whole: one
/// copy per field rather than three.
#[derive(Clone, Copy)]
struct Key {
    /// `,"name":`
    json: &'static [u8],
    /// ` name=`
    text: &'static [u8],
}

/// The [`Key`] of the field `name`.
macro_rules! key {
    ($name:literal) => {
        Key {
            json: concat!(",\"", $name, "\":").as_bytes(),
            text: concat!(" ", $name, "=").as_bytes(),
        }
    };
}

fn json(out: &mut Vec<u8>, dates: &mut Dates, l: &Line<'_>) {
    let (date, ms) = dates.at(l.start, Format::Json);
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(date.as_bytes());
    out.push(b'.');
    three(out, ms);
    out.extend_from_slice(b"Z\",\"client\":");
    match l.client_ip {
        [] => out.extend_from_slice(b"null"),
        ip => address(out, ip, l.client_port),
    }
    let mut f = Json(out);
    f.word(key!("proto"), l.proto);
    f.word(key!("method"), l.method);
    f.text(key!("path"), l.path);
    f.status(l.status);
    f.num(key!("bytes_out"), l.bytes_out);
    fields(&mut f, l);
    out.extend_from_slice(b"}\n");
}

/// `client - - [05/Dec/2026:08:20:39 +0000] "GET /p HTTP/1.1" 200 512`,
/// then `key=value` pairs; strings in quotes with `"`, `\` and bytes
/// outside printable ASCII as `\xHH` (as NGINX escapes its log).
fn text(out: &mut Vec<u8>, dates: &mut Dates, l: &Line<'_>) {
    let (date, ms) = dates.at(l.start, Format::Text);
    match l.client_ip {
        [] => out.push(b'-'),
        ip => out.extend_from_slice(ip),
    }
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(date.as_bytes());
    out.push(b'.');
    three(out, ms);
    out.extend_from_slice(b" +0000] \"");
    if l.status == 0 {
        out.extend_from_slice(l.proto);
        out.extend_from_slice(b" :");
        num(out, l.port);
        out.extend_from_slice(b"\" -");
    } else {
        out.extend_from_slice(l.method);
        out.push(b' ');
        text_escaped(out, l.path, false);
        out.push(b' ');
        out.extend_from_slice(l.proto);
        out.extend_from_slice(b"\" ");
        num(out, l.status);
    }
    out.push(b' ');
    num(out, l.bytes_out);
    fields(&mut Text(out), l);
    out.push(b'\n');
}

/// The fields both formats write after their own head, in this order:
/// one place, so that the two cannot drift apart.
fn fields(f: &mut impl Fields, l: &Line<'_>) {
    f.text(key!("host"), l.host);
    f.text(key!("group"), l.group);
    f.text(key!("instance"), l.instance);
    f.num(key!("port"), u64::from(l.port));
    f.flag(key!("tls"), l.tls);
    f.num(key!("bytes_in"), l.bytes_in);
    f.num(key!("attempts"), u64::from(l.attempts));
    f.ms(key!("connect_ms"), l.connect);
    f.ms(key!("response_ms"), l.response);
    f.ms(key!("duration_ms"), Some(l.duration));
    f.word(key!("error_origin"), l.error_origin);
    f.text(key!("error"), l.error);
}

/// How a format writes one field (an empty value is JSON's `null`, the
/// text format's `-`): each format says how a field starts and how it
/// writes strings; numbers, flags and times are written alike.
trait Fields {
    /// What an absent value is written as.
    const NONE: &'static [u8];
    /// Starts the field `key`; the buffer its value goes to.
    fn key(&mut self, key: Key) -> &mut Vec<u8>;
    /// Writes `value` escaped as the format's strings are.
    fn escape(out: &mut Vec<u8>, value: &[u8]);
    /// A token or a word from a fixed set, written as it is (quoted in
    /// JSON only): nothing in it needs escaping.
    fn word(&mut self, key: Key, value: &[u8]);

    /// A string, escaped and quoted.
    #[inline(always)]
    fn text(&mut self, key: Key, value: &[u8]) {
        let out = self.key(key);
        if value.is_empty() {
            out.extend_from_slice(Self::NONE);
            return;
        }
        out.push(b'"');
        Self::escape(out, value);
        out.push(b'"');
    }

    #[inline(always)]
    fn num(&mut self, key: Key, n: u64) {
        num(self.key(key), n);
    }

    #[inline(always)]
    fn flag(&mut self, key: Key, b: bool) {
        self.key(key)
            .extend_from_slice(if b { b"true" } else { b"false" });
    }

    /// Milliseconds with three decimals.
    #[inline(always)]
    fn ms(&mut self, key: Key, d: Option<Duration>) {
        let out = self.key(key);
        match d {
            Some(d) => millis(out, d),
            None => out.extend_from_slice(Self::NONE),
        }
    }
}

/// `,"key":value` after the object's first field.
struct Json<'a>(&'a mut Vec<u8>);

impl Json<'_> {
    /// `null` for 0 (a TCP connection has none).
    #[inline(always)]
    fn status(&mut self, status: u16) {
        let out = self.key(key!("status"));
        if status == 0 {
            out.extend_from_slice(Self::NONE);
        } else {
            num(out, status);
        }
    }
}

impl Fields for Json<'_> {
    const NONE: &'static [u8] = b"null";

    #[inline(always)]
    fn key(&mut self, key: Key) -> &mut Vec<u8> {
        self.0.extend_from_slice(key.json);
        self.0
    }

    /// `"`, `\`, control characters and bytes outside ASCII as `\u00XX`
    /// (a header may hold bytes that are not UTF-8).
    fn escape(out: &mut Vec<u8>, value: &[u8]) {
        escaped(out, value, JSON_PLAIN, |out, b| match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
        });
    }

    #[inline(always)]
    fn word(&mut self, key: Key, value: &[u8]) {
        let out = self.key(key);
        if value.is_empty() {
            out.extend_from_slice(Self::NONE);
            return;
        }
        out.push(b'"');
        out.extend_from_slice(value);
        out.push(b'"');
    }
}

const HEX: [u8; 16] = *b"0123456789abcdef";

/// ` key=value`.
struct Text<'a>(&'a mut Vec<u8>);

impl Fields for Text<'_> {
    const NONE: &'static [u8] = b"-";

    #[inline(always)]
    fn key(&mut self, key: Key) -> &mut Vec<u8> {
        self.0.extend_from_slice(key.text);
        self.0
    }

    fn escape(out: &mut Vec<u8>, value: &[u8]) {
        text_escaped(out, value, true);
    }

    #[inline(always)]
    fn word(&mut self, key: Key, value: &[u8]) {
        let out = self.key(key);
        out.extend_from_slice(if value.is_empty() { Self::NONE } else { value });
    }
}

/// Printable ASCII as it is, the rest as `\xHH`; spaces escaped too
/// unless `spaces` (a part of the request line splits on them). An empty
/// value is `-`.
fn text_escaped(out: &mut Vec<u8>, value: &[u8], spaces: bool) {
    if value.is_empty() {
        out.push(b'-');
        return;
    }
    let plain = if spaces {
        TEXT_PLAIN | SPACE
    } else {
        TEXT_PLAIN
    };
    escaped(out, value, plain, |out, b| {
        out.extend_from_slice(&[
            b'\\',
            b'x',
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 15)],
        ]);
    });
}

/// `value` with the bytes [`PLAIN`] marks with `plain` copied as they
/// are (in runs) and each other byte written by `escape`: the one place
/// both formats decide what is plain.
fn escaped(out: &mut Vec<u8>, value: &[u8], plain: u8, escape: impl Fn(&mut Vec<u8>, u8)) {
    let mut rest = value;
    loop {
        let i = plain_len(rest, plain);
        out.extend_from_slice(&rest[..i]);
        let Some(&b) = rest.get(i) else {
            return;
        };
        escape(out, b);
        rest = &rest[i + 1..];
    }
}

/// How many bytes `value` starts with that [`PLAIN`] marks with `plain`:
/// eight at a time while none of them needs escaping (most values need
/// nothing), then byte by byte.
fn plain_len(value: &[u8], plain: u8) -> usize {
    // The lowest plain byte: the space, or `!` when the space is escaped.
    let lowest = if plain & (JSON_PLAIN | SPACE) != 0 {
        b' '
    } else {
        b'!'
    };
    let mut n = 0;
    while let Some(word) = value.get(n..n + 8) {
        if !plain_word(word, lowest) {
            return n + plain_bytes(&value[n..], plain);
        }
        n += 8;
    }
    match value.len() {
        len if len == n => len,
        // The last few bytes of a longer value as its last eight bytes,
        // overlapping the words already checked.
        len @ 8.. if plain_word(&value[len - 8..], lowest) => len,
        _ => n + plain_bytes(&value[n..], plain),
    }
}

/// Whether none of eight bytes needs escaping: none below `lowest`, none
/// 0x7f or above, no `"` and no `\`.
#[inline]
fn plain_word(word: &[u8], lowest: u8) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    /// A byte of `x` is 0 (exact as to whether any is).
    fn zero(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGH
    }
    let x = u64::from_ne_bytes(word.try_into().unwrap_or([0; 8]));
    let below = x.wrapping_sub(ONES * u64::from(lowest)) & !x & HIGH;
    let above = (x.wrapping_add(ONES) | x) & HIGH;
    below | above | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\'))) == 0
}

/// How many bytes `value` starts with that [`PLAIN`] marks with `plain`,
/// one at a time.
fn plain_bytes(value: &[u8], plain: u8) -> usize {
    value
        .iter()
        .position(|&b| PLAIN[usize::from(b)] & plain == 0)
        .unwrap_or(value.len())
}

const HEX_UPPER: [u8; 16] = *b"0123456789ABCDEF";

/// Per byte, the formats that write it as it is: one load per byte for
/// the common case of a value with nothing to escape.
const PLAIN: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0x20;
    while b <= 0x7e {
        if b != b'"' as usize && b != b'\\' as usize {
            t[b] = if b == b' ' as usize {
                JSON_PLAIN | SPACE
            } else {
                JSON_PLAIN | TEXT_PLAIN
            };
        }
        b += 1;
    }
    t
};
/// Printable ASCII but `"` and `\`, space included.
const JSON_PLAIN: u8 = 1;
/// The same without the space.
const TEXT_PLAIN: u8 = 2;
/// The space, which the text format escapes only in its request line.
const SPACE: u8 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte, alone, after a byte that needs escaping, and at each
    /// place of a longer value (within and after its eight-byte words), is
    /// written as each format says it should be.
    #[test]
    fn every_byte_is_escaped_as_its_format_says() {
        let json = |b: u8| -> Vec<u8> {
            match b {
                b'"' => b"\\\"".to_vec(),
                b'\\' => b"\\\\".to_vec(),
                0x20..=0x7e => vec![b],
                _ => format!("\\u00{b:02x}").into_bytes(),
            }
        };
        let text = |b: u8, spaces: bool| -> Vec<u8> {
            match b {
                b' ' if spaces => vec![b],
                0x21..=0x7e if b != b'"' && b != b'\\' => vec![b],
                _ => format!("\\x{b:02X}").into_bytes(),
            }
        };
        let filler = b"abc/def?ghi=jkl&mno.pqr";
        for b in 0..=u8::MAX {
            let mut values = vec![vec![b], vec![0x01, b]];
            for at in 0..filler.len() {
                let mut v = filler.to_vec();
                v[at] = b;
                values.push(v.clone());
                // And a second one eight bytes on, in the next word.
                if let Some(next) = v.get_mut(at + 8) {
                    *next = b;
                    values.push(v);
                }
            }
            for value in &values {
                let mut out = Vec::new();
                Json::escape(&mut out, value);
                let want: Vec<u8> = value.iter().flat_map(|&v| json(v)).collect();
                assert_eq!(out, want, "JSON, byte {b:#04x} in {value:?}");
                for spaces in [false, true] {
                    let mut out = Vec::new();
                    text_escaped(&mut out, value, spaces);
                    let want: Vec<u8> = value.iter().flat_map(|&v| text(v, spaces)).collect();
                    assert_eq!(out, want, "text, byte {b:#04x} in {value:?}, {spaces}");
                }
            }
        }
    }

    fn entry() -> Entry<'static> {
        let began = Instant::now();
        Entry {
            began,
            ended: began + DURATION,
            client: Some(Client {
                ip: b"127.0.0.1",
                port: 50312,
            }),
            port: 8080,
            tls: false,
            proto: "HTTP/1.1",
            method: "GET",
            host: b"example.com",
            path: "/a?b=1",
            group: "web",
            instance: "a1",
            status: 200,
            bytes_in: 3,
            bytes_out: 612,
            attempts: 1,
            connect: None,
            response: Some(Duration::from_micros(1_200)),
            error: None,
        }
    }

    const DURATION: Duration = Duration::from_micros(2_500);

    /// 2026-12-05T08:20:39.123Z
    fn at() -> Duration {
        Duration::from_millis(1_796_458_839_123)
    }

    /// `e`'s line as the writer formats it, from the bytes a worker
    /// holds; it began at [`at`].
    fn line(format: Format, e: &Entry<'_>) -> String {
        let mut held = Vec::new();
        encode(e, at(), &mut held);
        let mut rest = &held[..];
        let l = Line::decode(&mut rest).expect("a whole line");
        assert!(rest.is_empty());
        let mut out = Vec::new();
        format.write(&mut out, &mut Dates::default(), &l);
        String::from_utf8(out).expect("lines are ASCII")
    }

    /// A log writing `format` to `access.log` in `dir`, and that path.
    fn file_log(dir: &tempfile::TempDir, format: Format) -> (AccessLog, PathBuf) {
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&Options {
            target: Target::File(path.clone()),
            format,
            sample: 1.0,
        })
        .unwrap();
        (log, path)
    }

    #[test]
    fn the_wall_clock_of_an_instant_comes_from_a_base_read_once_a_second() {
        let mut clock = Clock::default();
        let now = Instant::now();
        let before = now.checked_sub(Duration::from_millis(30)).unwrap_or(now);
        let wall = clock.wall(before, now);
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let ago = since_epoch.checked_sub(wall).expect("in the past");
        assert!(
            ago >= now - before && ago < Duration::from_secs(5),
            "{ago:?}"
        );
        let base = clock.base.expect("a base");
        let later = now + Duration::from_millis(500);
        assert_eq!(
            clock.wall(later, later),
            base.epoch + Duration::from_millis(500)
        );
        assert_eq!(clock.base, Some(base), "the same base");
        let just_before = base.until.checked_sub(Duration::from_nanos(1)).unwrap();
        clock.wall(just_before, just_before);
        assert_eq!(clock.base, Some(base), "the same base up to a second on");
        let much_later = now + Duration::from_secs(2);
        clock.wall(much_later, much_later);
        assert_eq!(clock.base.map(|b| b.at), Some(much_later), "read again");
    }

    #[test]
    fn civil_dates_match_known_days() {
        let day = |d: u64| {
            let t = Duration::from_secs(d * 86_400);
            let iso = Dates::default().at(t, Format::Json).0.to_owned();
            let clf = Dates::default().at(t, Format::Text).0.to_owned();
            (iso, clf)
        };
        assert_eq!(day(0).0, "1970-01-01T00:00:00");
        assert_eq!(day(11_016).0, "2000-02-29T00:00:00");
        assert_eq!(
            day(20_792),
            ("2026-12-05T00:00:00".into(), "05/Dec/2026:00:00:00".into())
        );
        assert_eq!(day(24_837).0, "2038-01-01T00:00:00");
        let mut dates = Dates::default();
        let t = Duration::from_secs(20_792 * 86_400);
        assert_eq!(dates.at(t, Format::Json).0, "2026-12-05T00:00:00");
        assert_eq!(
            dates.at(t, Format::Text).0,
            "05/Dec/2026:00:00:00",
            "made again for another format"
        );
    }

    /// A client on a dual-stack listener is logged as IPv4 when it is
    /// one, as `X-Forwarded-For` names it; IPv6 keeps its brackets.
    #[test]
    fn ipv4_mapped_clients_are_logged_as_ipv4() {
        let mut e = entry();
        let mapped = client_ip("::ffff:10.1.2.3".parse().unwrap());
        e.client = Some(Client {
            ip: mapped.as_bytes(),
            port: 4000,
        });
        assert!(line(Format::Json, &e).contains("\"client\":\"10.1.2.3:4000\""));
        assert!(line(Format::Text, &e).starts_with("10.1.2.3 - - ["));
        let v6 = client_ip("2001:db8::1".parse().unwrap());
        e.client = Some(Client {
            ip: v6.as_bytes(),
            port: 4000,
        });
        assert!(line(Format::Json, &e).contains("\"client\":\"[2001:db8::1]:4000\""));
        assert!(line(Format::Text, &e).starts_with("2001:db8::1 - - ["));
        e.client = None;
        assert!(line(Format::Json, &e).contains("\"client\":null,"));
        assert!(line(Format::Text, &e).starts_with("- - - ["));
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let l = line(Format::Json, &entry());
        assert_eq!(
            l,
            "{\"time\":\"2026-12-05T08:20:39.123Z\",\"client\":\"127.0.0.1:50312\",\
             \"proto\":\"HTTP/1.1\",\"method\":\"GET\",\"path\":\"/a?b=1\",\"status\":200,\
             \"bytes_out\":612,\"host\":\"example.com\",\"group\":\"web\",\"instance\":\"a1\",\
             \"port\":8080,\"tls\":false,\"bytes_in\":3,\"attempts\":1,\"connect_ms\":null,\
             \"response_ms\":1.200,\"duration_ms\":2.500,\"error_origin\":null,\"error\":null}\n"
        );
        assert!(l.ends_with("}\n") && l.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&l).expect("valid JSON");
        assert_eq!(v["time"], "2026-12-05T08:20:39.123Z");
        assert_eq!(v["client"], "127.0.0.1:50312");
        assert_eq!(v["port"], 8080);
        assert_eq!(v["tls"], false);
        assert_eq!(v["proto"], "HTTP/1.1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["host"], "example.com");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["group"], "web");
        assert_eq!(v["instance"], "a1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_in"], 3);
        assert_eq!(v["bytes_out"], 612);
        assert_eq!(v["attempts"], 1);
        assert!(v["connect_ms"].is_null());
        assert_eq!(v["response_ms"], 1.2);
        assert_eq!(v["duration_ms"], 2.5);
        assert!(v["error"].is_null() && v["error_origin"].is_null());
    }

    #[test]
    fn hostile_strings_stay_inside_their_json_field() {
        let why = "upstream said \"no\"\n";
        let e = Entry {
            host: b"ev\"il\\\n\xff.example",
            path: "/\"}{\u{1}",
            status: 0,
            error: Some(("upstream", &why)),
            ..entry()
        };
        let l = line(Format::Json, &e);
        assert_eq!(l.matches('\n').count(), 1, "one line: {l:?}");
        let v: serde_json::Value = serde_json::from_str(&l).expect("valid JSON");
        assert_eq!(v["host"], "ev\"il\\\n\u{ff}.example");
        assert_eq!(v["path"], "/\"}{\u{1}");
        assert!(v["status"].is_null());
        assert_eq!(v["error_origin"], "upstream");
        assert_eq!(v["error"], why);
    }

    #[test]
    fn a_text_line_starts_with_the_common_log_format() {
        let l = line(Format::Text, &entry());
        assert_eq!(
            l,
            "127.0.0.1 - - [05/Dec/2026:08:20:39.123 +0000] \"GET /a?b=1 HTTP/1.1\" 200 612 \
             host=\"example.com\" group=\"web\" instance=\"a1\" port=8080 tls=false bytes_in=3 \
             attempts=1 connect_ms=- response_ms=1.200 duration_ms=2.500 error_origin=- error=-\n"
        );
        let tcp = Entry {
            proto: "TCP",
            method: "",
            host: b"",
            path: "",
            status: 0,
            connect: Some(Duration::from_micros(150)),
            response: None,
            error: Some(("upstream", &"every attempt failed")),
            ..entry()
        };
        let l = line(Format::Text, &tcp);
        assert!(
            l.starts_with(
                "127.0.0.1 - - [05/Dec/2026:08:20:39.123 +0000] \"TCP :8080\" - 612 host=- "
            ),
            "{l}"
        );
        assert!(
            l.ends_with(" error_origin=upstream error=\"every attempt failed\"\n"),
            "{l}"
        );
        let hostile = Entry {
            path: "/\" 200 0\n",
            ..entry()
        };
        let l = line(Format::Text, &hostile);
        assert_eq!(l.matches('\n').count(), 1);
        assert!(
            l.contains("\"GET /\\x22\\x20200\\x200\\x0A HTTP/1.1\" 200"),
            "{l}"
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_reopen_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = file_log(&dir, Format::Json);
        log.write(&entry());
        let wait = |p: &std::path::Path, lines: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let n = std::fs::read_to_string(p).map_or(0, |s| s.lines().count());
                if n >= lines {
                    return n;
                }
                assert!(Instant::now() < deadline, "{n} of {lines} lines");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        assert_eq!(wait(&path, 1), 1);
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.write(&entry());
        log.write(&entry());
        log.close();
        assert_eq!(wait(&path, 2), 2, "the lines after the reopen");
        assert_eq!(wait(&rotated, 1), 1, "the rotated file keeps its line");
        assert_eq!(log.inner.lines.get(), 3);
        assert_eq!(log.inner.dropped.get(), 0);
    }

    /// A worker keeps its lines (no lock per line) and hands them over on
    /// a timer of its own, with no line after them to push them; a log
    /// closed while a worker holds lines still writes them.
    #[test]
    fn a_workers_lines_reach_the_file_on_its_timer_and_at_close() {
        let workers = crate::workers::Workers::start(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = file_log(&dir, Format::Json);
        let log = Arc::new(log);
        let on_worker = |n: usize| {
            let (log, (done, wrote)) = (log.clone(), std::sync::mpsc::channel());
            workers.handles()[0].spawn(async move {
                assert!(crate::workers::on_worker());
                for _ in 0..n {
                    log.write(&entry());
                }
                done.send(()).unwrap();
            });
            wrote.recv_timeout(Duration::from_secs(10)).unwrap();
        };
        let lines = || std::fs::read_to_string(&path).map_or(0, |s| s.lines().count());
        on_worker(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines() < 1 {
            assert!(
                Instant::now() < deadline,
                "the worker's line was not written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        on_worker(2);
        log.close();
        assert_eq!(lines(), 3, "the lines the worker held at the close");
        assert_eq!(log.inner.lines.get(), 3);
        assert_eq!(log.inner.held.load(Ordering::Acquire), 0);
    }

    /// Lines handed over many buffers at a time are formatted and written
    /// whole and in order, past the writer's own write size.
    #[test]
    fn many_lines_from_a_worker_are_written_whole_and_in_order() {
        const LINES: u64 = 5_000;
        let workers = crate::workers::Workers::start(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = file_log(&dir, Format::Json);
        let log = Arc::new(log);
        let (done, wrote) = std::sync::mpsc::channel();
        let worker_log = log.clone();
        workers.handles()[0].spawn(async move {
            for n in 0..LINES {
                worker_log.write(&Entry {
                    bytes_out: n,
                    ..entry()
                });
            }
            done.send(()).unwrap();
        });
        wrote.recv_timeout(Duration::from_secs(10)).unwrap();
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() > 2 * WRITE_AT, "{} bytes", text.len());
        let mut n = 0;
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).expect("each line whole");
            assert_eq!(v["bytes_out"], n);
            assert_eq!(v["path"], "/a?b=1");
            n += 1;
        }
        assert_eq!(n, LINES);
        assert_eq!(log.inner.lines.get(), LINES);
    }

    /// A worker that closes the log (the last owner of the data plane
    /// dropped on it) cannot run its own timer: its lines go at the close.
    #[test]
    fn a_worker_that_closes_the_log_writes_its_own_lines() {
        let workers = crate::workers::Workers::start(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = file_log(&dir, Format::Text);
        let (done, closed) = std::sync::mpsc::channel();
        workers.handles()[0].spawn(async move {
            log.write(&entry());
            log.close();
            done.send(log).unwrap();
        });
        let log = closed.recv_timeout(Duration::from_secs(10)).unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 1);
        assert_eq!(log.inner.dropped.get(), 0);
        // Lines after the close are dropped and counted, not queued.
        log.write(&entry());
        assert_eq!(log.inner.dropped.get(), 1);
    }

    #[test]
    fn a_full_queue_drops_lines_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = file_log(&dir, Format::Json);
        // As if the writer were stuck (it is stopped, and the queue open
        // as when it runs): the queue is full.
        log.close();
        let mut q = lock(&log.inner.queue);
        q.closed = false;
        q.bytes = MAX_PENDING;
        drop(q);
        log.write(&entry());
        assert_eq!(log.inner.dropped.get(), 1);
        assert_eq!(log.inner.lines.get(), 0);
    }

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("stdout"), Ok(Target::Stdout));
        assert_eq!(Target::parse("stderr"), Ok(Target::Stderr));
        assert_eq!(
            Target::parse("/var/log/edgelb/access.log"),
            Ok(Target::File("/var/log/edgelb/access.log".into()))
        );
        assert!(Target::parse("").is_err());
    }
}
