//! Chains of delta reports: the sender's [`DeltaEncoder`] and the
//! receiver's [`Reassembler`] (wire format in `delta.rs`).
//!
//! ```text
//!  DeltaEncoder::next(report n, full?) ─▶ Encoded { full n, compact n, delta n (base n−1)? }
//!      a link that sent report n−1 sends delta n, any other link full n
//!      (compact where the peer reads version 3)
//!  Reassembler::apply(wire) ─▶ the peer's full report n, or Gap
//!      full: replaces what is held when it is newer (incarnation, then
//!            seq), or what is held is older than the TTL: the load
//!            table's rule, so that the two agree on a peer's state
//!      delta: applies only on the state it was made from (same
//!             incarnation, held seq = base_seq < seq); else Gap until
//!             the next full report, at most gossip_interval later
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Error;
use crate::codec::{Entry, Report, encode};
use crate::compact::encode_compact;
use crate::delta::{Delta, Wire, apply, diff, encode_delta};

/// A report encoded both ways.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub seq: u64,
    /// The full report (version 1).
    pub full: Vec<u8>,
    /// The same full report in the compact version 3, for peers that read
    /// it.
    pub compact: Vec<u8>,
    /// The delta on report `base_seq`, unless a full report was due or
    /// this is the first report.
    pub delta: Option<(u64, Vec<u8>)>,
}

/// The sender's side: what its receivers hold, to diff the next report
/// against.
#[derive(Debug, Default)]
pub struct DeltaEncoder {
    /// What a receiver that followed the chain holds (rates and service
    /// times within the dead band of the sender's).
    held: Vec<Entry>,
    last_seq: Option<u64>,
}

impl DeltaEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `report` in full, and as a delta on the previous one unless
    /// `full` (a full report is due).
    pub fn next(&mut self, report: &Report, full: bool) -> Result<Encoded, Error> {
        let full_bytes = encode(report)?;
        let compact = encode_compact(report)?;
        let delta = match self.last_seq {
            Some(base_seq) if !full => {
                let (changes, held) = diff(&self.held, &report.entries);
                let bytes = encode_delta(&Delta {
                    node_id: report.node_id,
                    incarnation: report.incarnation,
                    seq: report.seq,
                    sent_at_ms: report.sent_at_ms,
                    base_seq,
                    changes,
                })?;
                self.held = held;
                Some((base_seq, bytes))
            }
            _ => {
                self.held.clone_from(&report.entries);
                None
            }
        };
        self.last_seq = Some(report.seq);
        Ok(Encoded {
            seq: report.seq,
            full: full_bytes,
            compact,
            delta,
        })
    }
}

/// A delta that did not fit what is held: dropped until the next full
/// report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap;

/// The receiver's side: each peer's latest state, as deltas build it.
#[derive(Debug)]
pub struct Reassembler {
    peers: HashMap<u64, Held>,
    /// A held state this old gives way to any full report (the load
    /// table's `gossip_ttl`).
    ttl: Duration,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Held {
    incarnation: u64,
    seq: u64,
    entries: Vec<Entry>,
    /// When the state was last replaced or moved on by a delta.
    at: Instant,
}

impl Reassembler {
    /// A reassembler whose held states never expire.
    pub fn new() -> Self {
        Self::with_ttl(Duration::MAX)
    }

    /// A reassembler whose held state of a peer gives way to any full
    /// report once `ttl` old, as the load table's reports do.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            peers: HashMap::new(),
            ttl,
        }
    }

    /// The full report that `wire` makes of its sender's state.
    pub fn apply(&mut self, wire: Wire) -> Result<Report, Gap> {
        self.apply_at(wire, Instant::now())
    }

    /// [`Reassembler::apply`] at `now`.
    pub fn apply_at(&mut self, wire: Wire, now: Instant) -> Result<Report, Gap> {
        match wire {
            Wire::Full(report) => {
                let ttl = self.ttl;
                let replace = self.peers.get(&report.node_id).is_none_or(|h| {
                    (h.incarnation, h.seq) < (report.incarnation, report.seq)
                        || now.saturating_duration_since(h.at) > ttl
                });
                if replace {
                    self.peers.insert(
                        report.node_id,
                        Held {
                            incarnation: report.incarnation,
                            seq: report.seq,
                            entries: report.entries.clone(),
                            at: now,
                        },
                    );
                }
                Ok(report)
            }
            Wire::Delta(d) => {
                let held = self.peers.get_mut(&d.node_id).ok_or(Gap)?;
                if held.incarnation != d.incarnation
                    || held.seq != d.base_seq
                    || d.seq <= d.base_seq
                {
                    return Err(Gap);
                }
                let entries = apply(&held.entries, &d.changes).ok_or(Gap)?;
                held.seq = d.seq;
                held.at = now;
                held.entries.clone_from(&entries);
                Ok(Report {
                    node_id: d.node_id,
                    incarnation: d.incarnation,
                    seq: d.seq,
                    sent_at_ms: d.sent_at_ms,
                    entries,
                })
            }
        }
    }

    /// What is held of `peer`'s state, sorted by instance.
    pub fn held(&self, peer: u64) -> Option<&[Entry]> {
        self.peers.get(&peer).map(|h| h.entries.as_slice())
    }

    /// Keeps only the peers for which `keep` is true.
    pub fn retain_peers(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.peers.retain(|&id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::delta::{DELTA_HEADER_LEN, decode_wire};
    use proptest::prelude::*;

    fn id(n: u8) -> [u8; 16] {
        let mut i = [0; 16];
        i[15] = n;
        i
    }

    fn entry(n: u8, inflight: u32, rate: u32) -> Entry {
        Entry {
            instance: id(n),
            inflight,
            long_inflight: inflight / 2,
            arrival_rate_milli: rate,
            mean_service_us: 10_000,
        }
    }

    fn report(seq: u64, entries: Vec<Entry>) -> Report {
        Report {
            node_id: 4,
            incarnation: 9,
            seq,
            sent_at_ms: 0,
            entries,
        }
    }

    fn wire(bytes: &[u8]) -> Wire {
        decode_wire(bytes).unwrap()
    }

    #[test]
    fn a_delta_carries_only_what_changed() {
        let mut enc = DeltaEncoder::new();
        let first = report(1, (0..100).map(|i| entry(i, 3, 5000)).collect());
        let e = enc.next(&first, false).unwrap();
        assert!(e.delta.is_none(), "the first report is full");
        let mut second = first.clone();
        second.seq = 2;
        second.entries[7].inflight = 4;
        // A rate within the dead band is not re-sent.
        second.entries[8].arrival_rate_milli = 5100;
        let e = enc.next(&second, false).unwrap();
        let (base, delta) = e.delta.unwrap();
        assert_eq!(base, 1);
        assert!(delta.len() <= DELTA_HEADER_LEN + 4, "{}", delta.len());
        assert!(e.full.len() > 3000);
    }

    #[test]
    fn deltas_then_a_full_report_rebuild_the_same_table() {
        let mut enc = DeltaEncoder::new();
        let mut rx = Reassembler::new();
        let mut entries: Vec<Entry> = (0..20).map(|i| entry(i * 2, 2, 1000)).collect();
        for seq in 1..=30u64 {
            // Instances come and go, counts move.
            let n = (seq % 20) as usize;
            entries[n].inflight = (seq % 7) as u32;
            entries[n].long_inflight = 0;
            if seq % 5 == 0 {
                entries.remove(n);
            }
            if seq % 3 == 0 {
                let new = entry(seq as u8 * 2 + 1, 1, 10);
                let at = entries.partition_point(|e| e.instance < new.instance);
                if entries.get(at).is_none_or(|e| e.instance != new.instance) {
                    entries.insert(at, new);
                }
            }
            let r = report(seq, entries.clone());
            let full = seq % 10 == 0;
            let e = enc.next(&r, full).unwrap();
            let got = match e.delta {
                Some((_, d)) => rx.apply(wire(&d)).unwrap(),
                None => rx.apply(wire(&e.full)).unwrap(),
            };
            // Counts are exact after every delta; rates within the band.
            assert_eq!(got.seq, seq);
            assert_eq!(got.entries.len(), r.entries.len());
            for (g, w) in got.entries.iter().zip(&r.entries) {
                assert_eq!(
                    (g.instance, g.inflight, g.long_inflight),
                    (w.instance, w.inflight, w.long_inflight)
                );
            }
            if full {
                assert_eq!(got, r);
            }
        }
    }

    #[test]
    fn a_lost_delta_is_a_gap_until_the_next_full_report() {
        let mut enc = DeltaEncoder::new();
        let mut rx = Reassembler::new();
        let r1 = report(1, vec![entry(1, 1, 0)]);
        rx.apply(wire(&enc.next(&r1, true).unwrap().full)).unwrap();
        let r2 = report(2, vec![entry(1, 5, 0)]);
        let _lost = enc.next(&r2, false).unwrap();
        let r3 = report(3, vec![entry(1, 6, 0), entry(2, 1, 0)]);
        let (_, d3) = enc.next(&r3, false).unwrap().delta.unwrap();
        assert_eq!(rx.apply(wire(&d3)), Err(Gap));
        assert_eq!(rx.held(4), Some(&r1.entries[..]));
        let r4 = report(4, vec![entry(2, 2, 0)]);
        let e4 = enc.next(&r4, true).unwrap();
        assert!(e4.delta.is_none());
        assert_eq!(rx.apply(wire(&e4.full)), Ok(r4.clone()));
        // The chain goes on from the full report.
        let r5 = report(5, vec![entry(2, 3, 0)]);
        let (_, d5) = enc.next(&r5, false).unwrap().delta.unwrap();
        assert_eq!(rx.apply(wire(&d5)), Ok(r5));
        // Another incarnation's delta does not apply.
        let mut other = Delta {
            node_id: 4,
            incarnation: 10,
            seq: 6,
            base_seq: 5,
            ..Delta::default()
        };
        assert_eq!(rx.apply(Wire::Delta(other.clone())), Err(Gap));
        other.node_id = 5;
        assert_eq!(rx.apply(Wire::Delta(other)), Err(Gap));
    }

    /// A delta must move its sender's state on: one that names its own
    /// base (or an older one) is malformed, and a replay of a delta
    /// already applied is a gap, not a second application.
    #[test]
    fn a_delta_is_applied_once_and_only_forwards() {
        let backward = Delta {
            node_id: 4,
            incarnation: 9,
            seq: 3,
            base_seq: 3,
            ..Delta::default()
        };
        assert_eq!(
            decode_wire(&encode_delta(&backward).unwrap()),
            Err(Error::BackwardDelta {
                seq: 3,
                base_seq: 3
            })
        );
        let mut rx = Reassembler::new();
        assert_eq!(rx.apply(Wire::Delta(backward.clone())), Err(Gap));
        let mut enc = DeltaEncoder::new();
        let r1 = report(1, vec![entry(1, 1, 0)]);
        rx.apply(wire(&enc.next(&r1, true).unwrap().full)).unwrap();
        assert_eq!(
            rx.apply(Wire::Delta(Delta {
                seq: 1,
                base_seq: 1,
                ..backward
            })),
            Err(Gap),
            "in memory too"
        );
        let r2 = report(2, vec![entry(1, 4, 0)]);
        let (_, d2) = enc.next(&r2, false).unwrap().delta.unwrap();
        assert_eq!(rx.apply(wire(&d2)), Ok(r2.clone()));
        assert_eq!(rx.apply(wire(&d2)), Err(Gap), "a replay");
        assert_eq!(rx.held(4), Some(&r2.entries[..]));
    }

    /// The held state of a peer changes as the load table's report does:
    /// a full report of an older incarnation leaves it, and one numbered
    /// far ahead holds only until it is `ttl` old, after which the
    /// sender's real numbering takes over again.
    #[test]
    fn the_held_state_follows_the_load_tables_rule() {
        let ttl = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut rx = Reassembler::with_ttl(ttl);
        let mut enc = DeltaEncoder::new();
        let r5 = report(5, vec![entry(1, 1, 0)]);
        rx.apply_at(wire(&enc.next(&r5, true).unwrap().full), t0)
            .unwrap();
        let mut older = report(100, vec![entry(7, 7, 0)]);
        older.incarnation = 8;
        assert!(rx.apply_at(Wire::Full(older), t0).is_ok());
        assert_eq!(rx.held(4), Some(&r5.entries[..]), "an older incarnation");
        // The chain on report 5 goes on.
        let r6 = report(6, vec![entry(1, 2, 0)]);
        let (_, d6) = enc.next(&r6, false).unwrap().delta.unwrap();
        assert_eq!(rx.apply_at(wire(&d6), t0), Ok(r6.clone()));
        // A report numbered far ahead.
        let ahead = report(u64::MAX - 1, vec![entry(9, 9, 0)]);
        assert!(rx.apply_at(Wire::Full(ahead.clone()), t0).is_ok());
        assert_eq!(rx.held(4), Some(&ahead.entries[..]));
        let r7 = report(7, vec![entry(1, 3, 0)]);
        let e7 = enc.next(&r7, true).unwrap();
        assert!(rx.apply_at(wire(&e7.full), t0 + ttl).is_ok());
        assert_eq!(rx.held(4), Some(&ahead.entries[..]), "within the TTL");
        let r8 = report(8, vec![entry(1, 4, 0)]);
        let e8 = enc.next(&r8, true).unwrap();
        let later = t0 + ttl + Duration::from_millis(1);
        assert_eq!(rx.apply_at(wire(&e8.full), later), Ok(r8.clone()));
        assert_eq!(rx.held(4), Some(&r8.entries[..]), "past the TTL");
        let r9 = report(9, vec![entry(1, 5, 0)]);
        let (_, d9) = enc.next(&r9, false).unwrap().delta.unwrap();
        assert_eq!(rx.apply_at(wire(&d9), later), Ok(r9));
    }

    #[test]
    fn a_link_that_skipped_sends_full_and_the_chain_goes_on() {
        let mut enc = DeltaEncoder::new();
        let mut rx = Reassembler::new();
        enc.next(&report(1, vec![entry(1, 1, 100)]), true).unwrap();
        enc.next(&report(2, vec![entry(1, 2, 100)]), false).unwrap();
        // This link missed 1 and 2: it sends 3 in full.
        let r3 = report(3, vec![entry(1, 2, 101), entry(3, 1, 0)]);
        let e3 = enc.next(&r3, false).unwrap();
        assert_eq!(rx.apply(wire(&e3.full)), Ok(r3));
        let r4 = report(4, vec![entry(1, 3, 101), entry(3, 1, 0)]);
        let (_, d4) = enc.next(&r4, false).unwrap().delta.unwrap();
        assert_eq!(rx.apply(wire(&d4)).unwrap().entries, r4.entries);
    }

    proptest! {
        /// Whatever the reports, following the chain gives the exact
        /// counts of every report, and a full report gives it exactly.
        #[test]
        fn chains_follow_any_reports(
            steps in prop::collection::vec(
                (prop::collection::btree_map(0u8..40, (0u32..5, 0u32..3, 0u32..100_000), 0..30), any::<bool>()),
                1..30,
            ),
        ) {
            let mut enc = DeltaEncoder::new();
            let mut rx = Reassembler::new();
            for (seq, (instances, full)) in steps.into_iter().enumerate() {
                let entries: Vec<Entry> = instances
                    .into_iter()
                    .map(|(n, (inflight, long, rate))| Entry {
                        instance: id(n),
                        inflight: inflight + long,
                        long_inflight: long,
                        arrival_rate_milli: rate,
                        mean_service_us: rate / 3,
                    })
                    .collect();
                let r = report(seq as u64 + 1, entries);
                let e = enc.next(&r, full).unwrap();
                let got = match e.delta {
                    Some((_, d)) => rx.apply(decode_wire(&d).unwrap()).unwrap(),
                    None => rx.apply(decode_wire(&e.full).unwrap()).unwrap(),
                };
                prop_assert_eq!(got.entries.len(), r.entries.len());
                for (g, w) in got.entries.iter().zip(&r.entries) {
                    prop_assert_eq!((g.instance, g.inflight, g.long_inflight), (w.instance, w.inflight, w.long_inflight));
                    prop_assert!(g.arrival_rate_milli.abs_diff(w.arrival_rate_milli) <= g.arrival_rate_milli / crate::RATE_DEADBAND + 1);
                }
                if full {
                    prop_assert_eq!(&got, &r);
                }
            }
        }

        /// Arbitrary bytes never panic the decoder, and whatever decodes as
        /// a delta re-encodes to the same bytes.
        #[test]
        fn delta_decoding_is_total(bytes in prop::collection::vec(any::<u8>(), 0..200), seed in any::<u8>()) {
            let mut bytes = bytes;
            if let Some(b) = bytes.first_mut() {
                *b = if seed % 2 == 0 { crate::delta::DELTA_VERSION } else { *b };
            }
            if let Ok(Wire::Delta(d)) = decode_wire(&bytes) {
                prop_assert_eq!(encode_delta(&d).unwrap(), bytes);
            }
        }
    }
}
