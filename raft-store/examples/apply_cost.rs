//! What a write costs the state machine as the state grows: apply (in
//! memory, published) per single-entry batch, the flush that writes the
//! rows of 100 such writes (one fsync'd redb transaction, as the node
//! writes them behind the batches), restart (open and load every row),
//! snapshot build and install, at 100 groups × 10 instances and at 10,000
//! groups × 10 instances, and the in-memory part of a write (clone the
//! published state, apply) alone; then one write of a group with 15,000
//! domains and 10,000 instances, and 100 attaches to it.
//!
//! ```text
//! cargo run --release -p raft-store --example apply_cost [-- WRITES]
//! ```
//!
//! The state is loaded in batches of 1,000 commands (one flush each); then
//! WRITES (default 1,000) attach/detach commands run one per batch, as the
//! node applies a lone write, with a flush after every 100, and their
//! latencies are reported. Files go to
//! a fresh directory under the system temp dir, removed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;
use openraft::{EntryPayload, RaftSnapshotBuilder};
use raft_store::model::{DEFAULT_HARD_LIMIT, Domain, Handler, Instance, Service, ServiceGroup};
use raft_store::types::{Entry, Request};
use raft_store::{Command, StateMachineStore};
use uuid::Uuid;

const PER_GROUP: usize = 10;
/// Writes between two flushes (the node flushes every 100 ms: 100 writes
/// at 1,000 writes/s).
const FLUSH_EVERY: usize = 100;

fn group(i: usize) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(1 + i as u128),
        name: format!("g{i}"),
        domains: vec![Domain {
            fqdn: format!("g{i}.example.com"),
            certificate: None,
        }],
        services: vec![Service {
            port: 8000 + (i % 50) as u16,
            destination_port: 80,
            handlers: vec![Handler::Http],
        }],
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: vec![],
        created_at: "2026-01-01T00:00:00Z".into(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    }
}

fn instance(g: usize, n: usize) -> Instance {
    Instance {
        uuid: Uuid::from_u128(((g as u128 + 1) << 32) | n as u128),
        name: format!("i{n}"),
        address: format!("10.{}.{}.{}", (g >> 8) & 255, g & 255, n % 250 + 1),
    }
}

struct Log {
    next: u64,
}

impl Log {
    fn entry(&mut self, command: Command) -> Entry {
        self.next += 1;
        Entry {
            log_id: log_id(1, 1, self.next),
            payload: EntryPayload::Normal(Request { command }),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(dir: &Path, groups: usize, writes: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut sm = StateMachineStore::open(dir)?;
    let mut log = Log { next: 0 };
    let mut commands = Vec::new();
    for g in 0..groups {
        commands.push(Command::CreateGroup { group: group(g) });
        for n in 0..PER_GROUP {
            commands.push(Command::AttachInstance {
                group: format!("g{g}"),
                instance: instance(g, n),
            });
        }
    }
    let started = Instant::now();
    for chunk in commands.chunks(1000) {
        let entries: Vec<_> = chunk.iter().cloned().map(|c| log.entry(c)).collect();
        for r in sm.apply(entries).await? {
            if let Some(Err(e)) = r.result {
                return Err(format!("loading: {e}").into());
            }
        }
        sm.flush().await?;
    }
    let instances = sm.current().instance_count();
    println!(
        "{groups} groups, {instances} instances: loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Attach then detach an extra instance, each write its own batch.
    let mut took = Vec::with_capacity(writes);
    let mut flushes = Vec::new();
    for w in 0..writes {
        if w % FLUSH_EVERY == 0 && w > 0 {
            let t = Instant::now();
            sm.flush().await?;
            flushes.push(t.elapsed());
        }
        let g = (w / 2 * 7919) % groups;
        let command = if w % 2 == 0 {
            Command::AttachInstance {
                group: format!("g{g}"),
                instance: instance(g, PER_GROUP + w),
            }
        } else {
            Command::DetachInstance {
                group: format!("g{g}"),
                instance: format!("i{}", PER_GROUP + w - 1),
            }
        };
        let entry = log.entry(command);
        let t = Instant::now();
        let r = sm.apply([entry]).await?;
        took.push(t.elapsed());
        if let Some(Err(e)) = &r[0].result {
            return Err(format!("write {w}: {e}").into());
        }
    }
    took.sort();
    let mean = took.iter().sum::<Duration>() / writes as u32;
    println!(
        "  apply per write ({writes} writes, 1 per batch): mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(mean),
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(took[took.len() - 1]),
    );
    flushes.sort();
    if !flushes.is_empty() {
        let mean = flushes.iter().sum::<Duration>() / flushes.len() as u32;
        println!(
            "  flush of {FLUSH_EVERY} writes' rows ({} flushes): mean {:.2} ms ({:.3} ms per write), p50 {:.2} ms, max {:.2} ms",
            flushes.len(),
            ms(mean),
            ms(mean) / FLUSH_EVERY as f64,
            ms(percentile(&flushes, 0.5)),
            ms(flushes[flushes.len() - 1]),
        );
    }

    // The in-memory part alone: clone the published state, apply, publish.
    let state = sm.current();
    let rounds = 10_000u32;
    let t = Instant::now();
    for w in 0..rounds as usize {
        let g = (w * 7919) % groups;
        let mut next = (*state).clone();
        let attach = Command::AttachInstance {
            group: format!("g{g}"),
            instance: instance(g, 1_000_000 + w),
        };
        next.apply(&attach)?;
        std::hint::black_box(std::sync::Arc::new(next));
    }
    println!(
        "  in memory (clone state + apply an attach): {:.1} µs per write",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
    );

    let t = Instant::now();
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
    let built = t.elapsed();
    let bytes = snapshot.snapshot.metadata().await?.len();
    drop(sm);

    let t = Instant::now();
    let sm = StateMachineStore::open(dir)?;
    let reopened = t.elapsed();
    assert_eq!(*sm.current(), *state, "reopened state differs");
    drop(sm);

    let other = dir.join("installed");
    let mut follower = StateMachineStore::open(&other)?;
    let t = Instant::now();
    follower
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await?;
    let installed = t.elapsed();
    assert_eq!(*follower.current(), *state, "installed state differs");
    println!(
        "  restart (open + load rows) {:.0} ms; snapshot {:.1} MB built in {:.0} ms, installed in {:.0} ms",
        ms(reopened),
        bytes as f64 / 1e6,
        ms(built),
        ms(installed),
    );
    Ok(())
}

/// Domains and instances of the one large group ([`large`]): as many as a
/// 1 MiB request body holds of either.
const LARGE_DOMAINS: usize = 15_000;
const LARGE_INSTANCES: usize = 10_000;

/// One write that creates a group with [`LARGE_DOMAINS`] domains and
/// [`LARGE_INSTANCES`] instances, into an empty store: what checking and
/// applying one large command costs.
async fn large(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut sm = StateMachineStore::open(dir)?;
    let mut log = Log { next: 0 };
    let mut g = group(0);
    g.domains = (0..LARGE_DOMAINS)
        .map(|i| Domain {
            fqdn: format!("host-{i:05}.a-rather-long-region-name.example.com"),
            certificate: None,
        })
        .collect();
    g.instances = (0..LARGE_INSTANCES).map(|n| instance(n >> 8, n)).collect();
    let entry = log.entry(Command::CreateGroup { group: g });
    let t = Instant::now();
    for r in sm.apply([entry]).await? {
        if let Some(Err(e)) = r.result {
            return Err(format!("the large group: {e}").into());
        }
    }
    let applied = t.elapsed();
    // Then instances attached to it, each write its own batch.
    let mut took = Vec::with_capacity(100);
    for n in 0..100 {
        let entry = log.entry(Command::AttachInstance {
            group: "g0".into(),
            instance: instance(1 << 20, LARGE_INSTANCES + n),
        });
        let t = Instant::now();
        for r in sm.apply([entry]).await? {
            if let Some(Err(e)) = r.result {
                return Err(format!("attaching to the large group: {e}").into());
            }
        }
        took.push(t.elapsed());
    }
    took.sort();
    println!(
        "one group of {LARGE_DOMAINS} domains and {LARGE_INSTANCES} instances: applied in {:.1} ms; \
         an attach to it p50 {:.3} ms, p99 {:.3} ms",
        ms(applied),
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
    );
    Ok(())
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let writes = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 1000,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for groups in [100, 10_000] {
        let dir = TempDir(
            std::env::temp_dir().join(format!("edgelb-apply-cost-{}-{groups}", std::process::id())),
        );
        rt.block_on(run(&dir.0, groups, writes))?;
    }
    let dir = TempDir(
        std::env::temp_dir().join(format!("edgelb-apply-cost-{}-large", std::process::id())),
    );
    rt.block_on(large(&dir.0))?;
    Ok(())
}
