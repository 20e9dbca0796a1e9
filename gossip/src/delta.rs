//! Delta reports: only the instances whose entries changed since the
//! sender's previous report, in a compact wire format (version 2), and the
//! receiver's side that turns them back into full reports.
//!
//! ```text
//!  sender: Tracker ─▶ Report n (absolute) ─▶ DeltaEncoder::next
//!            ├─ full n  (codec.rs, version 1)  always
//!            └─ delta n (version 2, base n−1)  unless a full one is due
//!          a link sends delta n if it sent report n−1, else full n
//!  receiver: Reassembler::apply(peer's state at n−1 + delta n) ─▶ Report n
//!            a delta whose base is not the state held is dropped (a gap):
//!            the next full report repairs it, within gossip_interval
//! ```
//!
//! Counts stay absolute: a delta carries the new values of what changed,
//! never increments, so applying one is idempotent and a lost one costs at
//! most one `gossip_interval` of freshness (SPEC §5).
//!
//! ```text
//! header, 46 bytes, big-endian
//!   0  version      u8   = 2
//!   1  flags        u8   = 0 (reserved)
//!   2  node_id      u64
//!  10  incarnation  u64
//!  18  seq          u64
//!  26  sent_at_ms   u64
//!  34  base_seq     u64  the report (same incarnation) this one changes
//!  42  count        u32
//! entries, in increasing instance order, LEB128 varints (u32, canonical)
//!   rank   varint  k > 0: the k-th instance (1-based, by uuid) of the
//!                  base report; 0: an instance new since, 16-byte uuid follows
//!   mask   u8      0: the instance is gone (nothing in flight, no rate);
//!                  bits 0–3: inflight, long_inflight, arrival_rate_milli,
//!                  mean_service_us follow (in that order), others unchanged
//! ```
//!
//! In-flight counts are always exact. The smoothed pick rate and mean
//! service time drift a little with every report; a delta carries them only
//! when they moved by more than a share of the value the receiver holds
//! ([`RATE_DEADBAND`], [`SERVICE_DEADBAND`]; or to or from zero), and the
//! next full report, at most `gossip_interval` later, sets them exactly.
//! The bands are wide enough that the drift of an exponentially weighted
//! average (each completion moves a mean service time by a few per cent;
//! the rate decays a little with every report) is not re-sent every time:
//! with 1,000 busy instances that drift alone made deltas several
//! kilobytes (`gossip/examples/fleet_bytes.rs`). Within the bands the
//! estimate moves by at most about as much for at most one interval. A
//! busy instance thus costs about 4–6 bytes in a delta against 32 in a full
//! report.

use crate::Error;
use crate::codec::{Entry, MAX_ENTRIES, Report};

/// Wire format version of delta reports.
pub const DELTA_VERSION: u8 = 2;
/// Bytes before the first entry of a delta.
pub const DELTA_HEADER_LEN: usize = 46;
/// A pick rate is re-sent when it moved by more than 1/`RATE_DEADBAND` of
/// the value the receiver holds (about 6 %).
pub const RATE_DEADBAND: u32 = 16;
/// A mean service time is re-sent when it moved by more than
/// 1/`SERVICE_DEADBAND` of the value the receiver holds (12.5 %).
pub const SERVICE_DEADBAND: u32 = 8;

const INFLIGHT: u8 = 1;
const LONG: u8 = 2;
const RATE: u8 = 4;
const SERVICE: u8 = 8;

/// A report as it arrives: full, or a delta on the sender's previous one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wire {
    Full(Report),
    Delta(Delta),
}

impl Wire {
    /// The sending node.
    pub fn node_id(&self) -> u64 {
        match self {
            Self::Full(r) => r.node_id,
            Self::Delta(d) => d.node_id,
        }
    }
}

/// The entries of a report that changed since report `base_seq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub node_id: u64,
    pub incarnation: u64,
    pub seq: u64,
    pub sent_at_ms: u64,
    pub base_seq: u64,
    pub changes: Vec<Change>,
}

/// One instance's change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// Which instance.
    pub instance: Ref,
    /// Its new fields (`None`: unchanged); all `None` with `gone`.
    pub inflight: Option<u32>,
    pub long_inflight: Option<u32>,
    pub arrival_rate_milli: Option<u32>,
    pub mean_service_us: Option<u32>,
    /// The instance left the report.
    pub gone: bool,
}

/// An instance named in a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ref {
    /// Its rank (0-based) among the base report's instances.
    Rank(u32),
    /// An instance the base report did not list.
    New([u8; 16]),
}

impl Change {
    fn mask(&self) -> u8 {
        if self.gone {
            return 0;
        }
        let mut m = 0;
        for (present, bit) in [
            (self.inflight.is_some(), INFLIGHT),
            (self.long_inflight.is_some(), LONG),
            (self.arrival_rate_milli.is_some(), RATE),
            (self.mean_service_us.is_some(), SERVICE),
        ] {
            if present {
                m |= bit;
            }
        }
        m
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes a delta. Fails on a change that names nothing to change, a
/// change that is neither gone nor has a field, or more than
/// [`MAX_ENTRIES`] changes.
pub fn encode_delta(delta: &Delta) -> Result<Vec<u8>, Error> {
    if delta.changes.len() > MAX_ENTRIES {
        return Err(Error::TooManyEntries(delta.changes.len()));
    }
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + delta.changes.len() * 6);
    out.push(DELTA_VERSION);
    out.push(0);
    for field in [
        delta.node_id,
        delta.incarnation,
        delta.seq,
        delta.sent_at_ms,
        delta.base_seq,
    ] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    let count =
        u32::try_from(delta.changes.len()).map_err(|_| Error::TooManyEntries(usize::MAX))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (index, c) in delta.changes.iter().enumerate() {
        let mask = c.mask();
        if mask == 0 && !c.gone {
            return Err(Error::BadChange { index });
        }
        match c.instance {
            Ref::Rank(rank) => put_varint(
                &mut out,
                rank.checked_add(1).ok_or(Error::BadChange { index })?,
            ),
            Ref::New(id) => {
                out.push(0);
                out.extend_from_slice(&id);
            }
        }
        out.push(mask);
        for v in [
            c.inflight,
            c.long_inflight,
            c.arrival_rate_milli,
            c.mean_service_us,
        ]
        .into_iter()
        .flatten()
        {
            put_varint(&mut out, v);
        }
    }
    Ok(out)
}

/// A cursor over untrusted bytes.
pub(crate) struct Cursor<'a> {
    pub(crate) bytes: &'a [u8],
}

impl Cursor<'_> {
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    /// A canonical LEB128 u32 (no redundant trailing zero groups).
    pub(crate) fn varint(&mut self) -> Option<u32> {
        let mut v: u64 = 0;
        for i in 0..5 {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return None;
                }
                return u32::try_from(v).ok();
            }
        }
        None
    }
}

/// Decodes a report of any version: a full report (version 1, see
/// `codec.rs`, or the compact version 3, see `compact.rs`) or a delta
/// (version 2). Never panics; allocates at most in proportion to
/// `bytes.len()`.
pub fn decode_wire(bytes: &[u8]) -> Result<Wire, Error> {
    match bytes.first() {
        Some(&DELTA_VERSION) => decode_delta(bytes).map(Wire::Delta),
        Some(&crate::compact::COMPACT_VERSION) => crate::compact::decode(bytes).map(Wire::Full),
        _ => crate::codec::decode(bytes).map(Wire::Full),
    }
}

fn decode_delta(bytes: &[u8]) -> Result<Delta, Error> {
    let truncated = || Error::Truncated {
        len: bytes.len(),
        need: DELTA_HEADER_LEN,
    };
    let mut c = Cursor { bytes };
    let [version, flags] = c.array().ok_or_else(truncated)?;
    if version != DELTA_VERSION {
        return Err(Error::Version(version));
    }
    if flags != 0 {
        return Err(Error::Flags(flags));
    }
    let mut u64s = [0u64; 5];
    for v in &mut u64s {
        *v = u64::from_be_bytes(c.array().ok_or_else(truncated)?);
    }
    let [node_id, incarnation, seq, sent_at_ms, base_seq] = u64s;
    // A sender numbers its reports upwards: a delta that does not move
    // past its base could be replayed to cost its receiver a whole
    // application each time.
    if seq <= base_seq {
        return Err(Error::BackwardDelta { seq, base_seq });
    }
    let count = u32::from_be_bytes(c.array().ok_or_else(truncated)?);
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    // Every change takes at least two bytes.
    if count > MAX_ENTRIES || count > c.bytes.len() / 2 {
        return Err(if count > MAX_ENTRIES {
            Error::TooManyEntries(count)
        } else {
            Error::Truncated {
                len: bytes.len(),
                need: DELTA_HEADER_LEN.saturating_add(count.saturating_mul(2)),
            }
        });
    }
    let bad = |index| Error::BadChange { index };
    let mut changes = Vec::with_capacity(count);
    let (mut last_rank, mut last_new): (Option<u32>, Option<[u8; 16]>) = (None, None);
    for index in 0..count {
        let rank = c.varint().ok_or(bad(index))?;
        let instance = if rank == 0 {
            let id = c.array().ok_or(bad(index))?;
            if last_new.is_some_and(|l| l >= id) {
                return Err(Error::Unordered { index });
            }
            last_new = Some(id);
            Ref::New(id)
        } else {
            let rank = rank - 1;
            if last_rank.is_some_and(|l| l >= rank) {
                return Err(Error::Unordered { index });
            }
            last_rank = Some(rank);
            Ref::Rank(rank)
        };
        let mask = c.u8().ok_or(bad(index))?;
        if mask & !(INFLIGHT | LONG | RATE | SERVICE) != 0 {
            return Err(bad(index));
        }
        let mut field = |bit: u8| -> Result<Option<u32>, Error> {
            if mask & bit == 0 {
                return Ok(None);
            }
            c.varint().map(Some).ok_or(bad(index))
        };
        changes.push(Change {
            instance,
            inflight: field(INFLIGHT)?,
            long_inflight: field(LONG)?,
            arrival_rate_milli: field(RATE)?,
            mean_service_us: field(SERVICE)?,
            gone: mask == 0,
        });
    }
    if !c.bytes.is_empty() {
        return Err(Error::TrailingBytes(c.bytes.len()));
    }
    Ok(Delta {
        node_id,
        incarnation,
        seq,
        sent_at_ms,
        base_seq,
        changes,
    })
}

/// Whether a smoothed value moved enough to be re-sent.
fn moved(held: u32, now: u32, band: u32) -> bool {
    if (held == 0) != (now == 0) {
        return true;
    }
    held.abs_diff(now) > held / band
}

/// The changes that take `base` (what receivers hold, sorted by instance)
/// to `next` (sorted), and what receivers hold after applying them.
pub(crate) fn diff(base: &[Entry], next: &[Entry]) -> (Vec<Change>, Vec<Entry>) {
    let mut changes = Vec::new();
    let mut held = Vec::with_capacity(next.len());
    let (mut i, mut j) = (0, 0);
    let rank = |i: usize| Ref::Rank(u32::try_from(i).unwrap_or(u32::MAX));
    while i < base.len() || j < next.len() {
        let order = match (base.get(i), next.get(j)) {
            (Some(b), Some(n)) => b.instance.cmp(&n.instance),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                changes.push(Change {
                    instance: rank(i),
                    inflight: None,
                    long_inflight: None,
                    arrival_rate_milli: None,
                    mean_service_us: None,
                    gone: true,
                });
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                let n = next[j];
                changes.push(Change {
                    instance: Ref::New(n.instance),
                    inflight: Some(n.inflight),
                    long_inflight: Some(n.long_inflight),
                    arrival_rate_milli: Some(n.arrival_rate_milli),
                    mean_service_us: Some(n.mean_service_us),
                    gone: false,
                });
                held.push(n);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (b, n) = (base[i], next[j]);
                let mut h = b;
                let mut c = Change {
                    instance: rank(i),
                    inflight: None,
                    long_inflight: None,
                    arrival_rate_milli: None,
                    mean_service_us: None,
                    gone: false,
                };
                if b.inflight != n.inflight {
                    (c.inflight, h.inflight) = (Some(n.inflight), n.inflight);
                }
                if b.long_inflight != n.long_inflight {
                    (c.long_inflight, h.long_inflight) = (Some(n.long_inflight), n.long_inflight);
                }
                if moved(b.arrival_rate_milli, n.arrival_rate_milli, RATE_DEADBAND) {
                    c.arrival_rate_milli = Some(n.arrival_rate_milli);
                    h.arrival_rate_milli = n.arrival_rate_milli;
                }
                if moved(b.mean_service_us, n.mean_service_us, SERVICE_DEADBAND) {
                    c.mean_service_us = Some(n.mean_service_us);
                    h.mean_service_us = n.mean_service_us;
                }
                if c.mask() != 0 {
                    changes.push(c);
                }
                held.push(h);
                i += 1;
                j += 1;
            }
        }
    }
    // Ranks and new uuids are each increasing; the encoding wants them in
    // one list in instance order, which this already is.
    (changes, held)
}

/// Applies `changes` to `base` (sorted by instance): the entries after
/// them, sorted, or `None` when a change does not fit the base (a rank
/// beyond it, a new instance it already has, order broken, a long-lived
/// count above the in-flight one).
pub(crate) fn apply(base: &[Entry], changes: &[Change]) -> Option<Vec<Entry>> {
    let mut out = Vec::with_capacity(base.len() + changes.len());
    let mut next = 0usize; // next base entry not yet copied
    for c in changes {
        match c.instance {
            Ref::Rank(rank) => {
                let rank = usize::try_from(rank).ok()?;
                let b = *base.get(rank)?;
                if rank < next {
                    return None;
                }
                out.extend_from_slice(&base[next..rank]);
                next = rank + 1;
                if c.gone {
                    continue;
                }
                out.push(Entry {
                    instance: b.instance,
                    inflight: c.inflight.unwrap_or(b.inflight),
                    long_inflight: c.long_inflight.unwrap_or(b.long_inflight),
                    arrival_rate_milli: c.arrival_rate_milli.unwrap_or(b.arrival_rate_milli),
                    mean_service_us: c.mean_service_us.unwrap_or(b.mean_service_us),
                });
            }
            Ref::New(id) => {
                // Copy the base entries before it.
                let at = next + base[next..].partition_point(|e| e.instance < id);
                if base.get(at).is_some_and(|e| e.instance == id) || c.gone {
                    return None;
                }
                out.extend_from_slice(&base[next..at]);
                next = at;
                out.push(Entry {
                    instance: id,
                    inflight: c.inflight?,
                    long_inflight: c.long_inflight?,
                    arrival_rate_milli: c.arrival_rate_milli?,
                    mean_service_us: c.mean_service_us?,
                });
            }
        }
        if let Some(e) = out.last()
            && e.long_inflight > e.inflight
        {
            return None;
        }
        if out.len() >= 2 && out[out.len() - 2].instance >= out[out.len() - 1].instance {
            return None;
        }
    }
    out.extend_from_slice(&base[next..]);
    Some(out)
}
