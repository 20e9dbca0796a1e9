//! The compact full report (wire version 3): the same report as version 1
//! (`codec.rs`), with the four counts of each entry as LEB128 varints
//! instead of fixed 32-bit fields.
//!
//! ```text
//! header, 38 bytes, big-endian: as version 1, with version = 3
//!   0  version      u8   = 3
//!   1  flags        u8   = 0 (reserved)
//!   2  node_id      u64
//!  10  incarnation  u64
//!  18  seq          u64
//!  26  sent_at_ms   u64
//!  34  count        u32
//! entries, strictly increasing by instance
//!   instance            [u8; 16]  uuid
//!   inflight            varint    canonical LEB128 u32, as in deltas
//!   long_inflight       varint
//!   arrival_rate_milli  varint
//!   mean_service_us     varint
//! ```
//!
//! A busy instance's counts are small numbers: an entry takes 20–26 bytes
//! instead of 32. Full reports are most of what a busy fleet sends (one at
//! least every `gossip_interval` per stream, each listing every instance),
//! so this is about a quarter off the inbound bytes of a node that hears
//! many regions' aggregates (`gossip/examples/fleet_bytes.rs`).
//!
//! Nodes that predate version 3 decode only versions 1 and 2, so a sender
//! uses version 3 only on connections where the peer said it reads it (the
//! cluster's gossip ALPN, see the README's compatibility rules); version 1
//! stays the fallback.
//!
//! Each entry takes at least 20 bytes, so a count that the input cannot
//! hold is refused before anything is allocated.

use crate::Error;
use crate::codec::{Entry, HEADER_LEN, MAX_ENTRIES, Report, put_header, validate};
use crate::delta::{Cursor, put_varint};

/// Wire format version of compact full reports.
pub const COMPACT_VERSION: u8 = 3;
/// The fewest bytes one entry takes (a uuid and four one-byte varints).
const MIN_ENTRY_LEN: usize = 20;

/// Encodes `report` in the compact format. Fails on what [`decode`] would
/// refuse, as `codec::encode` does.
pub fn encode_compact(report: &Report) -> Result<Vec<u8>, Error> {
    validate(&report.entries)?;
    let mut out = Vec::with_capacity(HEADER_LEN + report.entries.len() * 24);
    put_header(&mut out, COMPACT_VERSION, report)?;
    for entry in &report.entries {
        out.extend_from_slice(&entry.instance);
        for field in [
            entry.inflight,
            entry.long_inflight,
            entry.arrival_rate_milli,
            entry.mean_service_us,
        ] {
            put_varint(&mut out, field);
        }
    }
    Ok(out)
}

/// Decodes a compact full report. Never panics; allocates at most in
/// proportion to `bytes.len()`.
pub(crate) fn decode(bytes: &[u8]) -> Result<Report, Error> {
    let truncated = |need| Error::Truncated {
        len: bytes.len(),
        need,
    };
    let mut c = Cursor { bytes };
    let [version, flags] = c.array().ok_or_else(|| truncated(HEADER_LEN))?;
    if version != COMPACT_VERSION {
        return Err(Error::Version(version));
    }
    if flags != 0 {
        return Err(Error::Flags(flags));
    }
    let mut u64s = [0u64; 4];
    for v in &mut u64s {
        *v = u64::from_be_bytes(c.array().ok_or_else(|| truncated(HEADER_LEN))?);
    }
    let [node_id, incarnation, seq, sent_at_ms] = u64s;
    let count = u32::from_be_bytes(c.array().ok_or_else(|| truncated(HEADER_LEN))?);
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > MAX_ENTRIES {
        return Err(Error::TooManyEntries(count));
    }
    // count ≤ MAX_ENTRIES, so this cannot overflow.
    if count * MIN_ENTRY_LEN > c.bytes.len() {
        return Err(truncated(HEADER_LEN + count * MIN_ENTRY_LEN));
    }
    let bad = |index| Error::BadChange { index };
    let mut entries = Vec::with_capacity(count);
    for index in 0..count {
        let instance = c.array().ok_or(bad(index))?;
        let mut field = || c.varint().ok_or(bad(index));
        entries.push(Entry {
            instance,
            inflight: field()?,
            long_inflight: field()?,
            arrival_rate_milli: field()?,
            mean_service_us: field()?,
        });
    }
    if !c.bytes.is_empty() {
        return Err(Error::TrailingBytes(c.bytes.len()));
    }
    validate(&entries)?;
    Ok(Report {
        node_id,
        incarnation,
        seq,
        sent_at_ms,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Wire, decode_wire};
    use crate::encode;
    use crate::testutil::wire_report as report;
    use proptest::prelude::*;

    fn entry(id: u8, inflight: u32, rate: u32, service: u32) -> Entry {
        let mut instance = [0; 16];
        instance[15] = id;
        Entry {
            instance,
            inflight,
            long_inflight: inflight / 2,
            arrival_rate_milli: rate,
            mean_service_us: service,
        }
    }

    #[test]
    fn a_busy_entry_is_smaller_than_in_version_1() {
        let r = report((0..100).map(|i| entry(i, 3, 2_000, 100_000)).collect());
        let compact = encode_compact(&r).unwrap();
        // 16 + 1 + 1 + 2 + 3 bytes per entry against 32.
        assert_eq!(compact.len(), HEADER_LEN + 100 * 23);
        assert_eq!(encode(&r).unwrap().len(), HEADER_LEN + 100 * 32);
        assert_eq!(decode_wire(&compact).unwrap(), Wire::Full(r));
    }

    #[test]
    fn refuses_what_version_1_refuses() {
        let unordered = report(vec![entry(2, 1, 1, 1), entry(1, 1, 1, 1)]);
        assert_eq!(
            encode_compact(&unordered),
            Err(Error::Unordered { index: 1 })
        );
        let mut long = entry(1, 1, 1, 1);
        long.long_inflight = 2;
        assert_eq!(
            encode_compact(&report(vec![long])),
            Err(Error::LongExceedsInflight { index: 0 })
        );
    }

    #[test]
    fn a_count_the_input_cannot_hold_is_refused_before_allocating() {
        let mut bytes = encode_compact(&report(vec![entry(1, 1, 1, 1)])).unwrap();
        bytes[34..38].copy_from_slice(&(MAX_ENTRIES as u32).to_be_bytes());
        assert!(matches!(decode(&bytes), Err(Error::Truncated { .. })));
        bytes[34..38].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&bytes),
            Err(Error::TooManyEntries(u32::MAX as usize))
        );
    }

    #[test]
    fn trailing_bytes_and_bad_flags_are_refused() {
        let mut bytes = encode_compact(&report(vec![entry(1, 1, 1, 1)])).unwrap();
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(Error::TrailingBytes(1)));
        bytes.pop();
        bytes[1] = 1;
        assert_eq!(decode(&bytes), Err(Error::Flags(1)));
    }

    fn entries() -> impl Strategy<Value = Vec<Entry>> {
        prop::collection::btree_map(
            any::<[u8; 16]>(),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            0..50,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(instance, (inflight, long, rate, service))| Entry {
                    instance,
                    inflight,
                    long_inflight: long.min(inflight),
                    arrival_rate_milli: rate,
                    mean_service_us: service,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn round_trip_matches_version_1(entries in entries()) {
            let r = report(entries);
            let compact = encode_compact(&r).unwrap();
            prop_assert!(compact.len() <= encode(&r).unwrap().len() + 4 * r.entries.len());
            prop_assert_eq!(decode_wire(&compact).unwrap(), Wire::Full(r));
        }

        #[test]
        fn arbitrary_and_mutated_bytes_never_panic(
            entries in entries(),
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = encode_compact(&report(entries)).unwrap();
            for (at, b) in flips {
                let len = bytes.len();
                bytes[at % len] ^= b;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            let _ = decode_wire(&bytes);
        }
    }
}
