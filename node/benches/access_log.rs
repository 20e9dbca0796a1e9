//! Cost of one access log line.
//!
//! `cargo bench -p edgelb --bench access_log`
//!
//! - `worker/json`: the request path's part (the same for both formats),
//!   [`AccessLog::write`] of a kept-alive request's line on a data-plane
//!   worker, as in the node (the line's fields copied into the worker's
//!   buffer; its hand-over every 32 KiB); wall time on the worker.
//! - `cpu/json`, `cpu/text`: the whole cost of a line, the process's CPU
//!   time (`CLOCK_PROCESS_CPUTIME_ID`): the worker's part, and the writer
//!   thread's formatting and writing of the line to `/dev/null` (a file
//!   could not take lines this fast). Lines go 20,000 to a log, which is
//!   then closed on the worker (the writer takes the last of them and
//!   ends; its open and close, about 0.1 ms, are in the figure): the
//!   worker makes lines faster than the writer formats them, and a full
//!   queue drops them, which would be measured instead. The bench fails
//!   if any line was dropped.
//!
//! A request's budget for the log is about 5 % of its ~15 µs.

use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use edgelb::access_log::{AccessLog, Client, Entry, Format, Options, Target};
use edgelb::workers::Workers;
use rustix::time::{ClockId, clock_gettime};

fn entry(now: Instant) -> Entry<'static> {
    Entry {
        began: now,
        ended: now + Duration::from_micros(375),
        client: Some(Client {
            ip: b"127.0.0.1",
            port: 52692,
        }),
        port: 8080,
        tls: false,
        proto: "HTTP/1.1",
        method: "GET",
        host: b"web.example.com",
        path: "/a?b=1",
        group: "web",
        instance: "web-1",
        status: 200,
        bytes_in: 0,
        bytes_out: 612,
        attempts: 1,
        connect: None,
        response: Some(Duration::from_micros(373)),
        error: None,
    }
}

/// Lines per log: their bytes (about 140 each) stay well below the
/// queue's limit even if the writer took none meanwhile.
const CHUNK: u64 = 20_000;

/// The process's CPU time, all threads.
fn cpu() -> Duration {
    let t = clock_gettime(ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// `iters` lines in `format` on the worker: the time the worker spent in
/// [`AccessLog::write`], and the process's CPU time for them all.
fn lines(worker: &tokio::runtime::Handle, format: Format, iters: u64) -> (Duration, Duration) {
    let (tx, rx) = mpsc::channel();
    worker.spawn(async move {
        let line = entry(Instant::now());
        let (mut writing, mut dropped) = (Duration::ZERO, 0.0);
        let cpu_began = cpu();
        let mut left = iters;
        while left > 0 {
            let log = AccessLog::open(&Options {
                target: Target::File("/dev/null".into()),
                format,
                sample: 1.0,
            })
            .expect("the log opens");
            let registry = prometheus::Registry::new();
            log.register(&registry)
                .expect("the log's counters register");
            let n = left.min(CHUNK);
            let began = Instant::now();
            for _ in 0..n {
                log.write(black_box(&line));
            }
            writing += began.elapsed();
            log.close();
            dropped += registry
                .gather()
                .iter()
                .filter(|f| f.name() == "edgelb_access_log_dropped_total")
                .flat_map(|f| f.get_metric())
                .map(|m| m.get_counter().get_value())
                .sum::<f64>();
            left -= n;
        }
        let cpu = cpu() - cpu_began;
        assert_eq!(dropped, 0.0, "{format:?}: lines were dropped, not written");
        let _ = tx.send((writing, cpu));
    });
    rx.recv().expect("the worker times the lines")
}

fn bench(c: &mut Criterion) {
    let workers = Workers::start(1).expect("a worker starts");
    let worker = workers.handles()[0].clone();
    for (group, cpu) in [("worker", false), ("cpu", true)] {
        let mut group = c.benchmark_group(group);
        // The worker's part does not depend on the format.
        let formats = match cpu {
            true => &[("json", Format::Json), ("text", Format::Text)][..],
            false => &[("json", Format::Json)][..],
        };
        for &(name, format) in formats {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let (writing, total) = lines(&worker, format, iters);
                    if cpu { total } else { writing }
                });
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
