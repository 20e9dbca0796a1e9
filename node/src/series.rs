//! The counters of one attached instance: plain atomics that the data plane
//! bumps on each backend ([`InstanceMetrics`]) and that a scrape reads
//! ([`crate::metrics`] renders them from the routing table).
//!
//! An instance costs one [`InstanceSeries`] (about 250 bytes of atomics),
//! allocated when first counted, and nothing in a registry.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// HTTP status classes counted by `edgelb_instance_requests_total{code_class}`.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of `edgelb_instance_request_duration_seconds`: 0.5 ms to 30 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// Values of `edgelb_instance_bytes_total{direction}`.
pub const DIRECTIONS: [&str; 2] = ["rx", "tx"];

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram over [`DURATION_BUCKETS`].
///
/// Each observation lands in exactly one slot (the last one for values
/// above 30 s), and the count is the sum of the slots as read, so a scrape
/// that races observations still shows cumulative buckets that never exceed
/// the `+Inf` bucket and `_count`.
#[derive(Debug, Default)]
pub struct Histogram {
    slots: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// `f64` bits of the sum of observations.
    sum: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let slot = DURATION_BUCKETS
            .iter()
            .position(|&bound| v <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.slots[slot].fetch_add(1, Ordering::Relaxed);
        // The closure always returns `Some`, so the update cannot fail.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn get_sample_count(&self) -> u64 {
        self.slots.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    pub fn get_sample_sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// Cumulative counts per bound, then the total (`+Inf`).
    pub(crate) fn cumulative(&self) -> [u64; DURATION_BUCKETS.len() + 1] {
        let mut out = [0; DURATION_BUCKETS.len() + 1];
        let mut total = 0;
        for (o, s) in out.iter_mut().zip(&self.slots) {
            total += s.load(Ordering::Relaxed);
            *o = total;
        }
        out
    }
}

/// The counters of one attached instance.
#[derive(Debug, Default)]
pub struct InstanceSeries {
    /// `edgelb_instance_selected_total`
    pub selected: Counter,
    /// `edgelb_instance_connections_total`: upstream connections opened.
    pub connections: Counter,
    /// `edgelb_instance_connect_errors_total`
    pub connect_errors: Counter,
    /// `edgelb_instance_requests_total{code_class}`, indexed like [`CODE_CLASSES`].
    pub requests: [Counter; 5],
    /// `edgelb_instance_request_duration_seconds`
    pub duration: Histogram,
    /// `edgelb_instance_bytes_total{direction="rx"}`: bytes received from the instance.
    pub bytes_rx: Counter,
    /// `edgelb_instance_bytes_total{direction="tx"}`: bytes sent to the instance.
    pub bytes_tx: Counter,
}

impl InstanceSeries {
    /// Counts one finished HTTP request with `status`.
    pub fn observe_status(&self, status: u16) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.requests[class].inc();
    }
}

/// A shared handle on one instance's counters: the backend holds one, and
/// work in flight may hold clones. The counters are allocated when first
/// counted (or the handle cloned): an instance that carries no traffic
/// costs one word, and scrapes show it at zero without allocating.
#[derive(Debug, Default)]
pub struct InstanceMetrics(OnceLock<Arc<InstanceSeries>>);

impl InstanceMetrics {
    /// Counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    fn series(&self) -> &Arc<InstanceSeries> {
        self.0.get_or_init(Arc::default)
    }

    /// The counters, if anything was ever counted.
    pub(crate) fn peek(&self) -> Option<&InstanceSeries> {
        self.0.get().map(|s| &**s)
    }
}

impl Clone for InstanceMetrics {
    /// Another handle on the same counters.
    fn clone(&self) -> Self {
        Self(OnceLock::from(Arc::clone(self.series())))
    }
}

impl Deref for InstanceMetrics {
    type Target = InstanceSeries;

    fn deref(&self) -> &InstanceSeries {
        self.series()
    }
}
