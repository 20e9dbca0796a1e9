//! What the clients saw during a chaos run, and the checker that judges it:
//! plain data and plain code (no I/O, no clock).
//!
//! Every write names something new (an instance `k-…` or `t-…` in the
//! ledger group, a domain `d-…` of the ledger group, or a group `g-…`), so
//! each write is identified by its key. Keepers (`k-…` instances and groups) are never removed; `t-…`
//! instances may be detached later by a write of their own.
//!
//! Checks:
//! - **lost**: an acknowledged write whose effect is missing on some node at
//!   the end (a key absent, or an acknowledged detach whose instance is
//!   still there);
//! - **duplicated**: a key present more than once on some node (whether
//!   its write was acknowledged, refused or timed out);
//! - **stale reads**: a consistent read that misses a keeper seen by a read
//!   that ended before it started, or acknowledged before it started;
//! - **failed requests**: data-plane requests that failed on a node while it
//!   was running and on the majority side (outside every excluded window).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What a write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Attach the instance named by the key.
    Attach,
    /// Detach the instance named by the key.
    Detach,
    /// Create the group named by the key.
    CreateGroup,
    /// Add the domain named by the key to the ledger group: a patch, which
    /// a node sends as a request to apply once (its retry after a first
    /// try that committed answers as applied).
    AddDomain,
}

/// How a write ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: acknowledged.
    Acked,
    /// An answer that is not 2xx (e.g. 503 without quorum).
    Refused,
    /// No answer (timeout, connection lost): it may or may not apply.
    Unknown,
}

/// One write. Times are offsets from the run's start.
#[derive(Clone, Debug)]
pub struct Write {
    pub key: String,
    pub kind: WriteKind,
    pub node: u64,
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
}

/// One successful consistent read: the keys it saw.
#[derive(Clone, Debug)]
pub struct Read {
    pub node: u64,
    pub start: Duration,
    pub end: Duration,
    pub seen: BTreeSet<String>,
}

/// One data-plane request.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub node: u64,
    pub start: Duration,
    pub end: Duration,
    pub ok: bool,
}

/// A window in which node `node` did not count as a healthy majority
/// member (stopped, restarting, cut off, on the minority side).
#[derive(Clone, Copy, Debug)]
pub struct Excluded {
    pub node: u64,
    pub from: Duration,
    pub to: Duration,
}

/// Everything a run recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub writes: Vec<Write>,
    pub reads: Vec<Read>,
    pub requests: Vec<Request>,
    pub excluded: Vec<Excluded>,
    /// Each node's keys at the end (a key twice if present twice).
    pub finals: BTreeMap<u64, Vec<String>>,
}

/// The checker's verdict on a [`History`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub acked: usize,
    pub refused: usize,
    pub unknown: usize,
    /// Acknowledged writes whose effect is missing somewhere (key, node).
    pub lost: Vec<(String, u64)>,
    /// Keys present more than once on a node (key, node, count).
    pub duplicated: Vec<(String, u64, usize)>,
    /// Consistent reads that went back in time: (node, read start, key
    /// missing).
    pub stale_reads: Vec<(u64, Duration, String)>,
    pub requests: usize,
    /// Failed data-plane requests on majority nodes: (node, start).
    pub failed_requests: Vec<(u64, Duration)>,
}

impl Verdict {
    /// No check failed.
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.stale_reads.is_empty()
            && self.failed_requests.is_empty()
    }
}

/// Keys that are never removed once written.
fn is_keeper(key: &str) -> bool {
    !key.starts_with("t-")
}

/// Judges `h`.
pub fn check(h: &History) -> Verdict {
    let mut v = Verdict::default();
    for w in &h.writes {
        match w.outcome {
            Outcome::Acked => v.acked += 1,
            Outcome::Refused => v.refused += 1,
            Outcome::Unknown => v.unknown += 1,
        }
    }
    check_finals(h, &mut v);
    check_reads(h, &mut v);
    v.requests = h.requests.len();
    for r in &h.requests {
        let excused = h
            .excluded
            .iter()
            .any(|e| e.node == r.node && r.start <= e.to && r.end >= e.from);
        if !r.ok && !excused {
            v.failed_requests.push((r.node, r.start));
        }
    }
    v
}

fn check_finals(h: &History, v: &mut Verdict) {
    // Detaches that may have applied: their instance may be absent.
    let detach_tried: BTreeSet<&str> = h
        .writes
        .iter()
        .filter(|w| w.kind == WriteKind::Detach)
        .map(|w| w.key.as_str())
        .collect();
    for (&node, keys) in &h.finals {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for k in keys {
            *counts.entry(k.as_str()).or_default() += 1;
        }
        for (k, &c) in &counts {
            if c > 1 {
                v.duplicated.push(((*k).to_owned(), node, c));
            }
        }
        for w in h.writes.iter().filter(|w| w.outcome == Outcome::Acked) {
            let present = counts.contains_key(w.key.as_str());
            let lost = match w.kind {
                WriteKind::Attach | WriteKind::CreateGroup | WriteKind::AddDomain => {
                    !present && !detach_tried.contains(w.key.as_str())
                }
                WriteKind::Detach => present,
            };
            if lost {
                v.lost.push((w.key.clone(), node));
            }
        }
    }
}

fn check_reads(h: &History, v: &mut Verdict) {
    let mut reads: Vec<&Read> = h.reads.iter().collect();
    reads.sort_by_key(|r| r.start);
    let mut by_end: Vec<&Read> = h.reads.iter().collect();
    by_end.sort_by_key(|r| r.end);
    let mut acked: Vec<&Write> = h
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Acked && w.kind != WriteKind::Detach && is_keeper(&w.key))
        .collect();
    acked.sort_by_key(|w| w.end);
    // Keepers that every read starting from now on must see.
    let mut must: BTreeSet<&str> = BTreeSet::new();
    let (mut ri, mut wi) = (0, 0);
    for r in reads {
        while ri < by_end.len() && by_end[ri].end < r.start {
            must.extend(
                by_end[ri]
                    .seen
                    .iter()
                    .map(String::as_str)
                    .filter(|k| is_keeper(k)),
            );
            ri += 1;
        }
        while wi < acked.len() && acked[wi].end < r.start {
            must.insert(acked[wi].key.as_str());
            wi += 1;
        }
        if let Some(missing) = must.iter().find(|k| !r.seen.contains(**k)) {
            v.stale_reads.push((r.node, r.start, (*missing).to_owned()));
        }
    }
}

#[cfg(test)]
mod tests;
