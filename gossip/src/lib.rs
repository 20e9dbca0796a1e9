//! Load gossip between edge nodes: each node reports its in-flight counts per
//! instance to its peers so that every node can estimate the global load.
//!
//! ```text
//!  sender                                   receiver
//!  balancer picks / releases                 transport.rs (QUIC datagram or stream)
//!   │ LoadCounters::start / finish                │ decode (codec.rs)
//!   ▼ (counters.rs: atomics, no lock)             ▼
//!  LoadCounters per instance            LoadTable (state.rs): newest report
//!   │ sampled when a report is due        per peer by (incarnation, seq),
//!   ▼                                     fresh within `ttl`
//!  Tracker (tracker.rs) ── report() ──►          │ Estimator::peer_loads
//!  long-lived part, arrival rate,   encode       ▼  (estimator.rs)
//!  service time from the deltas           peers' part of each instance's
//!                                         load ──► GroupBalancer::set_peer_load
//! ```
//!
//! Everything here but [`transport`] (the QUIC link and receiving loop,
//! over connections the node's cluster endpoint opens and accepts) is
//! plain code without I/O or a clock: every decision takes `now` as an
//! argument, so the simulator (the `edgelb-sim` crate, `node/sim`) and the
//! tests drive the same code as the data plane.
//!
//! A peer's report is old by the time it is used, and adding its raw counts
//! to the own ones herds (every node sees the same stale minimum). The
//! default [`Estimator::Predictive`] therefore estimates each peer's current
//! counts: what it reported, less the expected completions since, plus the
//! picks it is expected to have made since, placed on the least loaded
//! instances. `docs/gossip-sim.md` has the data.

mod chain;
mod codec;
mod compact;
mod counters;
mod delta;
mod estimator;
mod regions;
mod schedule;
mod state;
#[cfg(test)]
mod testutil;
mod tracker;
pub mod transport;
mod view;

use std::time::Duration;

pub use chain::{DeltaEncoder, Encoded, Gap, Reassembler};
pub use codec::{
    DATAGRAM_ENTRIES, DATAGRAM_MAX, ENTRY_LEN, Entry, HEADER_LEN, MAX_ENTRIES, MAX_REPORT_LEN,
    Report, VERSION, decode, encode,
};
pub use compact::{COMPACT_VERSION, encode_compact};
pub use counters::{EPOCHS, LoadCounters, Started};
pub use delta::{
    Change, DELTA_HEADER_LEN, DELTA_VERSION, Delta, RATE_DEADBAND, Ref, SERVICE_DEADBAND, Wire,
    decode_wire, encode_delta,
};
pub use estimator::{Estimator, water_level};
pub use regions::{CELL_MAX, Plan, Stream, aggregate, cells, plan};
pub use schedule::{
    FEW_TARGETS, JITTER, MAX_SHARE, MIN_GAP, REFRESH, RefreshSchedule, SendSchedule, jittered,
    quiet_alive,
};
pub use state::{Arrival, Counters, LoadTable, Merge, PeerReport};
pub use tracker::{LONG_FLOOR, Tracker};
pub use view::{GroupView, LOAD_FRAC_BITS, LOAD_ONE, PeerLoad, ViewSet, to_fixed};

/// Gossip settings (SPEC §5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Reports older than this, by the time they were received, are ignored,
    /// so a dead node's load fades out. Default 1 s.
    pub ttl: Duration,
    /// A node sends a report as soon as its counts change, at most this often
    /// per peer. Default 5 ms.
    pub min_interval: Duration,
    /// Heartbeat when nothing changed. Default 100 ms.
    pub interval: Duration,
    /// Work in flight for longer than 8 mean service times of its instance
    /// (at least 20 ms), and in any case after `long_after`, is reported as
    /// long-lived; receivers count it as it is, without decay. Default 1 s.
    pub long_after: Duration,
    /// Smoothing window of the reported arrival rates. Default 1 s.
    pub rate_window: Duration,
    /// How peers' reports become their part of an instance's load.
    pub estimator: Estimator,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(1),
            min_interval: Duration::from_millis(5),
            interval: Duration::from_millis(100),
            long_after: Duration::from_secs(1),
            rate_window: Duration::from_secs(1),
            estimator: Estimator::default(),
        }
    }
}

/// Why a report could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("report truncated: {len} bytes, need {need}")]
    Truncated { len: usize, need: usize },
    #[error("unsupported report version {0}")]
    Version(u8),
    #[error("unknown report flags {0:#04x}")]
    Flags(u8),
    #[error("report has {0} entries, more than {MAX_ENTRIES}")]
    TooManyEntries(usize),
    #[error("{0} bytes after the last entry")]
    TrailingBytes(usize),
    #[error("entry {index}: instances not in strictly increasing order")]
    Unordered { index: usize },
    #[error("entry {index}: long-lived count above the in-flight count")]
    LongExceedsInflight { index: usize },
    #[error("delta change {index}: malformed")]
    BadChange { index: usize },
    #[error("delta report {seq} does not follow its base {base_seq}")]
    BackwardDelta { seq: u64, base_seq: u64 },
}
