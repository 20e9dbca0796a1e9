//! The load report and its wire format (version 1).
//!
//! A report is a node's absolute in-flight counts per instance at one moment,
//! never deltas, so a lost or reordered report costs freshness, not
//! correctness: the receiver keeps the newest one per peer.
//!
//! ```text
//! header, 38 bytes, big-endian
//!   0  version      u8   = 1
//!   1  flags        u8   = 0 (reserved)
//!   2  node_id      u64
//!  10  incarnation  u64  bumped on every start of the sender
//!  18  seq          u64  increasing within an incarnation
//!  26  sent_at_ms   u64  sender's wall clock, informational only
//!  34  count        u32  number of entries
//! entries, 32 bytes each, strictly increasing by instance
//!   0  instance            [u8; 16]  uuid
//!  16  inflight            u32  all in flight from the sender
//!  20  long_inflight       u32  part of inflight older than the sender's
//!                               `long_after`; never decayed by receivers
//!  24  arrival_rate_milli  u32  sender's picks of this instance per s ×1000
//!  28  mean_service_us     u32  sender's mean in-flight time of short work
//! ```
//!
//! Fixed-size fields keep the decoder trivial to bound: the length of the
//! input must be exactly `38 + 32 × count`, so decoding allocates only what
//! the input has already paid for, and `count` is capped at
//! [`MAX_ENTRIES`] (a report is at most [`MAX_REPORT_LEN`] bytes). Instances
//! a sender has nothing for are left out; a missing entry means zero.
//!
//! A report of up to [`DATAGRAM_ENTRIES`] entries fits in
//! [`DATAGRAM_MAX`] bytes, what one QUIC datagram carries on any path
//! (QUIC's 1200-byte minimum less packet overhead); larger reports go on a
//! unidirectional stream.

use crate::Error;

/// Wire format version written and accepted.
pub const VERSION: u8 = 1;
/// Bytes before the first entry.
pub const HEADER_LEN: usize = 38;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 32;
/// Most entries in one report.
pub const MAX_ENTRIES: usize = 100_000;
/// Largest valid report, in bytes (about 3.2 MB).
pub const MAX_REPORT_LEN: usize = HEADER_LEN + MAX_ENTRIES * ENTRY_LEN;
/// Reports up to this size may be sent as one QUIC datagram. QUIC guarantees
/// every path 1200-byte UDP payloads (RFC 9000 §14); the short header, packet
/// number, AEAD tag and DATAGRAM frame header take up to ~50 of them. The
/// transport should still check quinn's `max_datagram_size()` and send a
/// larger report on a unidirectional stream.
pub const DATAGRAM_MAX: usize = 1150;
/// Entries that fit in a [`DATAGRAM_MAX`]-byte report (34).
pub const DATAGRAM_ENTRIES: usize = (DATAGRAM_MAX - HEADER_LEN) / ENTRY_LEN;

/// One node's load at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub node_id: u64,
    /// Changes on every start of the sender; a newer incarnation replaces the
    /// old counts entirely.
    pub incarnation: u64,
    /// Increases with every report within an incarnation.
    pub seq: u64,
    /// Sender's clock in ms since the Unix epoch; informational (clocks of
    /// different nodes are not compared).
    pub sent_at_ms: u64,
    /// Strictly increasing by `instance`.
    pub entries: Vec<Entry>,
}

/// The sender's load on one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The instance's uuid.
    pub instance: [u8; 16],
    /// Connections/requests of the sender in flight to the instance.
    pub inflight: u32,
    /// The part of `inflight` that has lasted longer than the sender's
    /// `long_after` (long-lived connections, slow requests). Receivers count
    /// it as long as the sender reports it: it does not decay.
    pub long_inflight: u32,
    /// Sender's picks of this instance per second ×1000, smoothed.
    pub arrival_rate_milli: u32,
    /// Sender's mean in-flight time of work that ended within `long_after`,
    /// in µs; 0 when unknown.
    pub mean_service_us: u32,
}

impl Report {
    /// Size of the encoded report.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN.saturating_add(self.entries.len().saturating_mul(ENTRY_LEN))
    }

    /// Whether the encoded report fits in one datagram ([`DATAGRAM_MAX`]).
    pub fn fits_datagram(&self) -> bool {
        self.encoded_len() <= DATAGRAM_MAX
    }
}

/// Checks what the decoder would reject, so that encode never produces
/// bytes that decode refuses.
pub(crate) fn validate(entries: &[Entry]) -> Result<(), Error> {
    if entries.len() > MAX_ENTRIES {
        return Err(Error::TooManyEntries(entries.len()));
    }
    for (index, entry) in entries.iter().enumerate() {
        if entry.long_inflight > entry.inflight {
            return Err(Error::LongExceedsInflight { index });
        }
        if index > 0 && entries[index - 1].instance >= entry.instance {
            return Err(Error::Unordered { index });
        }
    }
    Ok(())
}

/// Encodes `report`. Fails on what [`decode`] would refuse: more than
/// [`MAX_ENTRIES`] entries, entries out of order or duplicated, or a
/// `long_inflight` above `inflight`.
pub fn encode(report: &Report) -> Result<Vec<u8>, Error> {
    validate(&report.entries)?;
    let mut out = Vec::with_capacity(report.encoded_len());
    put_header(&mut out, VERSION, report)?;
    for entry in &report.entries {
        out.extend_from_slice(&entry.instance);
        for field in [
            entry.inflight,
            entry.long_inflight,
            entry.arrival_rate_milli,
            entry.mean_service_us,
        ] {
            out.extend_from_slice(&field.to_be_bytes());
        }
    }
    Ok(out)
}

/// Writes the 38-byte header shared by full reports of every version.
pub(crate) fn put_header(out: &mut Vec<u8>, version: u8, report: &Report) -> Result<(), Error> {
    out.push(version);
    out.push(0);
    for field in [
        report.node_id,
        report.incarnation,
        report.seq,
        report.sent_at_ms,
    ] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    // Callers validate() first, which bounds the count by MAX_ENTRIES.
    let count =
        u32::try_from(report.entries.len()).map_err(|_| Error::TooManyEntries(usize::MAX))?;
    out.extend_from_slice(&count.to_be_bytes());
    Ok(())
}

/// A cursor over input whose length has already been checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        // Callers check the total length first; a short read leaves zeros
        // rather than panicking.
        if let Some((head, rest)) = self.bytes.split_first_chunk::<N>() {
            out = *head;
            self.bytes = rest;
        }
        out
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

/// Decodes one report. Never panics; allocates at most `bytes.len()`.
pub fn decode(bytes: &[u8]) -> Result<Report, Error> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::Truncated {
            len: bytes.len(),
            need: HEADER_LEN,
        });
    }
    let mut r = Reader { bytes };
    let [version, flags] = r.take();
    if version != VERSION {
        return Err(Error::Version(version));
    }
    if flags != 0 {
        return Err(Error::Flags(flags));
    }
    let node_id = r.u64();
    let incarnation = r.u64();
    let seq = r.u64();
    let sent_at_ms = r.u64();
    let count = usize::try_from(r.u32()).unwrap_or(usize::MAX);
    if count > MAX_ENTRIES {
        return Err(Error::TooManyEntries(count));
    }
    // count ≤ MAX_ENTRIES, so this cannot overflow.
    let need = HEADER_LEN + count * ENTRY_LEN;
    if bytes.len() < need {
        return Err(Error::Truncated {
            len: bytes.len(),
            need,
        });
    }
    if bytes.len() > need {
        return Err(Error::TrailingBytes(bytes.len() - need));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        entries.push(Entry {
            instance: r.take(),
            inflight: r.u32(),
            long_inflight: r.u32(),
            arrival_rate_milli: r.u32(),
            mean_service_us: r.u32(),
        });
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
    use crate::testutil::wire_report as report;
    use proptest::prelude::*;

    fn entry(id: u8, inflight: u32, long: u32) -> Entry {
        let mut instance = [0; 16];
        instance[15] = id;
        Entry {
            instance,
            inflight,
            long_inflight: long,
            arrival_rate_milli: 1500,
            mean_service_us: 10_000,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let r = report(vec![entry(1, 5, 1), entry(2, 0, 0)]);
        let bytes = encode(&r).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 2 * ENTRY_LEN);
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(bytes[0], VERSION);
        assert_eq!(&bytes[2..10], &7u64.to_be_bytes());
        assert_eq!(&bytes[34..38], &2u32.to_be_bytes());
        assert_eq!(&bytes[38 + 16..38 + 20], &5u32.to_be_bytes());
        assert_eq!(decode(&bytes).unwrap(), r);
    }

    #[test]
    fn datagram_threshold() {
        assert_eq!(DATAGRAM_ENTRIES, 34);
        let fits = report((0..34).map(|i| entry(i, 1, 0)).collect());
        assert!(fits.fits_datagram());
        assert!(encode(&fits).unwrap().len() <= DATAGRAM_MAX);
        let over = report((0..35).map(|i| entry(i, 1, 0)).collect());
        assert!(!over.fits_datagram());
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        assert_eq!(
            encode(&report(vec![entry(2, 1, 0), entry(1, 1, 0)])),
            Err(Error::Unordered { index: 1 })
        );
        assert_eq!(
            encode(&report(vec![entry(1, 1, 0), entry(1, 1, 0)])),
            Err(Error::Unordered { index: 1 })
        );
        assert_eq!(
            encode(&report(vec![entry(1, 1, 2)])),
            Err(Error::LongExceedsInflight { index: 0 })
        );
    }

    #[test]
    fn malformed_input() {
        let good = encode(&report(vec![entry(1, 5, 1), entry(2, 3, 0)])).unwrap();
        assert_eq!(
            decode(&good[..10]),
            Err(Error::Truncated { len: 10, need: 38 })
        );
        assert_eq!(
            decode(&good[..good.len() - 1]),
            Err(Error::Truncated {
                len: good.len() - 1,
                need: good.len()
            })
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(Error::TrailingBytes(1)));
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2), Err(Error::Version(2)));
        let mut flagged = good.clone();
        flagged[1] = 1;
        assert_eq!(decode(&flagged), Err(Error::Flags(1)));
        // A count that the input does not back is refused before allocating.
        let mut huge = good[..HEADER_LEN].to_vec();
        huge[34..38].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge), Err(Error::TooManyEntries(u32::MAX as usize)));
        huge[34..38].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(matches!(decode(&huge), Err(Error::Truncated { .. })));
        // Entries in the wrong order.
        let mut swapped = good.clone();
        swapped[38 + 15] = 9;
        assert_eq!(decode(&swapped), Err(Error::Unordered { index: 1 }));
    }

    #[test]
    fn limits() {
        assert_eq!(MAX_REPORT_LEN, 3_200_038);
        let max = report(
            (0..MAX_ENTRIES as u32)
                .map(|i| {
                    let mut instance = [0; 16];
                    instance[12..].copy_from_slice(&i.to_be_bytes());
                    Entry {
                        instance,
                        ..Entry::default()
                    }
                })
                .collect(),
        );
        let bytes = encode(&max).unwrap();
        assert_eq!(bytes.len(), MAX_REPORT_LEN);
        assert_eq!(decode(&bytes).unwrap().entries.len(), MAX_ENTRIES);
        let mut over = max;
        over.entries.push(Entry {
            instance: [0xff; 16],
            ..Entry::default()
        });
        assert_eq!(encode(&over), Err(Error::TooManyEntries(MAX_ENTRIES + 1)));
    }

    fn entries_strategy() -> impl Strategy<Value = Vec<Entry>> {
        prop::collection::btree_map(
            any::<[u8; 16]>(),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            0..60,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(instance, (a, b, rate, service))| Entry {
                    instance,
                    inflight: a.max(b),
                    long_inflight: a.min(b),
                    arrival_rate_milli: rate,
                    mean_service_us: service,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            node_id in any::<u64>(),
            incarnation in any::<u64>(),
            seq in any::<u64>(),
            sent_at_ms in any::<u64>(),
            entries in entries_strategy(),
        ) {
            let r = Report { node_id, incarnation, seq, sent_at_ms, entries };
            let bytes = encode(&r).unwrap();
            prop_assert_eq!(bytes.len(), r.encoded_len());
            prop_assert_eq!(decode(&bytes).unwrap(), r);
        }

        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(r) = decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(encode(&r).unwrap(), bytes);
            }
        }

        #[test]
        fn decode_mutated_reports(
            entries in entries_strategy(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&report(entries)).unwrap();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= byte;
            }
            let cut = cut.index(bytes.len() + 1);
            if let Ok(r) = decode(&bytes[..cut]) {
                prop_assert_eq!(encode(&r).unwrap(), &bytes[..cut]);
            }
        }
    }
}
