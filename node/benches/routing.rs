//! Cost of one routing update and one metrics scrape at scale.
//!
//! `cargo bench -p edgelb --bench routing`
//!
//! - `update/N`: one group's instance attached or detached (alternately)
//!   in a state of N instances (groups of 10 sharing 50 ports): building
//!   the new table from the published one and swapping it in, with its
//!   effects. Constant in N is the goal.
//! - `update_one_group/N`: the same in one group of N instances (linear in
//!   N is the goal: that group is rebuilt).
//! - `rebuild_all/N`: the table rebuilt whole from the same state, as a
//!   certificate write had it rebuilt; `certificate/N`: what one costs now
//!   (the groups naming it found and rebuilt; here none names it).
//! - `changes/N`: finding what changed by comparing the two states (what
//!   the node does until the state machine reports it).
//! - `render/N`, `render_gzip/N`, `render_gzip_cold/N`: `GET /metrics`
//!   bodies at N instances (compressed: blocks reused from the previous
//!   scrape, or all compressed as at the first scrape).

#[path = "support/scale.rs"]
mod scale;

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgelb::metrics::Metrics;
use edgelb::routing::{Changes, RoutingTable, changes, publish, publish_changes};
use edgelb::tls::CertCache;
use raft_store::{Command, State};

/// The base state and the same with one more instance in group 0.
fn states(instances: usize) -> (State, State) {
    let base = scale::state(instances);
    let mut more = base.clone();
    more.apply(&Command::AttachInstance {
        group: "group-0".into(),
        instance: scale::instance(0, 1_000),
    })
    .expect("attach");
    (base, more)
}

fn update(c: &mut Criterion) {
    let mut bench = c.benchmark_group("routing");
    bench
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for instances in [1_000, 100_000] {
        let (base, more) = states(instances);
        attach_and_detach(
            &mut bench,
            BenchmarkId::new("update", instances),
            &base,
            &more,
        );
        bench.bench_function(BenchmarkId::new("changes", instances), |b| {
            b.iter(|| black_box(changes(Some(&base), &more)));
        });
        // What a certificate write cost before: every group and port rebuilt
        // (the runtimes of what stays reused).
        let certs = CertCache::default();
        let cx = scale::cx(&certs);
        let routes = ArcSwap::from_pointee(RoutingTable::default());
        publish(&routes, &base, &cx);
        bench.bench_function(BenchmarkId::new("rebuild_all", instances), |b| {
            b.iter(|| publish_changes(&routes, &base, &Changes::All, &cx));
        });
        // What a certificate write costs now: the groups whose domains name
        // it (here none) found by a scan, and rebuilt.
        let certificate = Changes::Certificates {
            groups: BTreeSet::new(),
            names: BTreeSet::from(["a-certificate".to_owned()]),
        };
        bench.bench_function(BenchmarkId::new("certificate", instances), |b| {
            b.iter(|| publish_changes(&routes, &base, &certificate, &cx));
        });
    }
    // One group holding them all: an attach or detach rebuilds that group,
    // so linear in N is the goal (finding the instances that left scanned
    // the group once per instance before: quadratic).
    for instances in [10_000, 100_000] {
        let mut base = State::default();
        let mut group = scale::group(0);
        group.instances = (0..instances)
            .map(|i| scale::instance(0, u32::try_from(i).expect("small")))
            .collect();
        base.apply(&Command::CreateGroup { group })
            .expect("valid group");
        let mut more = base.clone();
        more.apply(&Command::AttachInstance {
            group: "group-0".into(),
            instance: scale::instance(0, u32::try_from(instances).expect("small")),
        })
        .expect("attach");
        let id = BenchmarkId::new("update_one_group", instances);
        attach_and_detach(&mut bench, id, &base, &more);
    }
    bench.finish();
}

/// Publishes `more` (group 0 with one more instance) and `base` in turn,
/// from the table of the other.
fn attach_and_detach(
    bench: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    base: &State,
    more: &State,
) {
    let certs = CertCache::default();
    let cx = scale::cx(&certs);
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    publish(&routes, base, &cx);
    let group = Changes::Groups(BTreeSet::from([scale::group(0).uuid]));
    let mut attached = false;
    bench.bench_function(id, |b| {
        b.iter(|| {
            let next = if attached { base } else { more };
            attached = !attached;
            publish_changes(&routes, next, &group, &cx);
        });
    });
}

fn render(c: &mut Criterion) {
    let mut bench = c.benchmark_group("metrics");
    bench
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let instances = 100_000;
    let certs = CertCache::default();
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    publish(&routes, &scale::state(instances), &scale::cx(&certs));
    let table: Arc<RoutingTable> = routes.load_full();
    let metrics = Metrics::new();
    let mut size = 0;
    bench.bench_function(BenchmarkId::new("render", instances), |b| {
        b.iter(|| {
            let mut text = Vec::new();
            metrics.render_to(&table, &mut text).expect("render");
            size = text.len();
            black_box(text)
        });
    });
    let mut zipped = 0;
    // A scrape like the last one: every block's compressed bytes reused.
    bench.bench_function(BenchmarkId::new("render_gzip", instances), |b| {
        b.iter(|| {
            let mut body = Vec::new();
            metrics.render_gzip_to(&table, &mut body).expect("render");
            zipped = body.len();
            black_box(body)
        });
    });
    // The first scrape: every block compressed.
    bench.bench_function(BenchmarkId::new("render_gzip_cold", instances), |b| {
        b.iter(|| {
            let mut body = Vec::new();
            Metrics::new()
                .render_gzip_to(&table, &mut body)
                .expect("render");
            black_box(body)
        });
    });
    println!("metrics at {instances} instances: {size} bytes of text, {zipped} gzipped");
    bench.finish();
}

criterion_group!(benches, update, render);
criterion_main!(benches);
