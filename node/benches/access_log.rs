//! Cost of one access log line on the request path.
//!
//! `cargo bench -p edgelb --bench access_log`
//!
//! - `write/json`, `write/text`: [`AccessLog::write`] of a kept-alive
//!   request's line on a data-plane worker, as in the node (the date,
//!   read once a second; the formatting into the worker's buffer; its
//!   hand-over every 32 KiB), with the writer thread taking the buffers
//!   meanwhile and writing them to `/dev/null`: a file could not take
//!   lines this fast, and a full queue drops them, which would be
//!   measured instead (the bench fails if any line was dropped).
//!   A request's budget for the log is about 5 % of its ~15 µs.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use edgelb::access_log::{AccessLog, Client, Entry, Format, Options, Target};
use edgelb::workers::Workers;

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

fn write(c: &mut Criterion) {
    let mut group = c.benchmark_group("write");
    let workers = Workers::start(1).expect("a worker starts");
    let worker = workers.handles()[0].clone();
    for (name, format) in [("json", Format::Json), ("text", Format::Text)] {
        let log = Arc::new(
            AccessLog::open(&Options {
                target: Target::File("/dev/null".into()),
                format,
                sample: 1.0,
            })
            .expect("the log opens"),
        );
        let registry = prometheus::Registry::new();
        log.register(&registry)
            .expect("the log's counters register");
        // Timed on the worker: `iters` lines, the time sent back.
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (log, (tx, rx)) = (log.clone(), mpsc::channel());
                worker.spawn(async move {
                    let line = entry(Instant::now());
                    let began = Instant::now();
                    for _ in 0..iters {
                        log.write(black_box(&line));
                    }
                    let _ = tx.send(began.elapsed());
                });
                rx.recv().expect("the worker times the lines")
            });
        });
        log.close();
        let dropped: f64 = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "edgelb_access_log_dropped_total")
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value())
            .sum();
        assert_eq!(dropped, 0.0, "{name}: lines were dropped, not written");
    }
    group.finish();
}

criterion_group!(benches, write);
criterion_main!(benches);
