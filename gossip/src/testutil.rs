//! Reports for the gossip crate's tests (codecs, estimator, view).

use crate::{Entry, Report};

/// Instance `i`'s id.
pub(crate) fn id(i: usize) -> [u8; 16] {
    let mut instance = [0; 16];
    instance[8..].copy_from_slice(&(i as u64).to_be_bytes());
    instance
}

/// The ids of instances `0..n`.
pub(crate) fn ids(n: usize) -> Vec<[u8; 16]> {
    (0..n).map(id).collect()
}

/// A peer's report number `seq`: per instance (inflight, long), every
/// instance picked at `rate` per second with mean service `tau_ms`.
pub(crate) fn report(
    node_id: u64,
    seq: u64,
    counts: &[(u32, u32)],
    rate: f64,
    tau_ms: u32,
) -> Report {
    Report {
        node_id,
        incarnation: 1,
        seq,
        sent_at_ms: 0,
        entries: counts
            .iter()
            .enumerate()
            .map(|(i, &(inflight, long))| Entry {
                instance: id(i),
                inflight,
                long_inflight: long,
                arrival_rate_milli: (rate * 1000.0) as u32,
                mean_service_us: tau_ms * 1000,
            })
            .collect(),
    }
}

/// A report carrying `entries`, with fixed header fields (the codecs'
/// tests).
pub(crate) fn wire_report(entries: Vec<Entry>) -> Report {
    Report {
        node_id: 7,
        incarnation: 3,
        seq: 42,
        sent_at_ms: 1_700_000_000_000,
        entries,
    }
}
