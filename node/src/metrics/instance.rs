//! Per-instance series: plain atomics on each backend, rendered at scrape
//! time by walking the routing table.
//!
//! An instance costs one [`InstanceSeries`] (about 250 bytes of atomics)
//! and nothing in a registry: there is no per-series object, no label
//! hashing and nothing to remove on detach. A scrape lists the backends of
//! the table it renders, sorts them by label values and writes each family
//! straight into the text format, in the order and with the formatting of
//! `prometheus::TextEncoder` (families by name, series by label values in
//! label-name order, values as `f64` would print them).

use std::fmt::Write as _;
use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::balancer::{Backend, BackendState};
use crate::routing::{GroupRuntime, RoutingTable};

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
    fn cumulative(&self) -> [u64; DURATION_BUCKETS.len() + 1] {
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
    fn peek(&self) -> Option<&InstanceSeries> {
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

/// Help texts of the per-instance families, by name (sorted).
pub(super) const FAMILIES: [(&str, &str, &str); 9] = [
    (
        "edgelb_instance_bytes_total",
        "Bytes proxied: rx received from the instance, tx sent to it.",
        "counter",
    ),
    (
        "edgelb_instance_connect_errors_total",
        "Failed attempts to connect to the instance (refused, unreachable or timed out).",
        "counter",
    ),
    (
        "edgelb_instance_connections_total",
        "Upstream connections opened to the instance.",
        "counter",
    ),
    (
        "edgelb_instance_inflight",
        "Connections (TCP mode) or requests (HTTP mode) this node has in flight to the instance.",
        "gauge",
    ),
    (
        "edgelb_instance_inflight_global",
        "Estimated in-flight count of the instance over the cluster: this node's plus its peers' reports.",
        "gauge",
    ),
    (
        "edgelb_instance_request_duration_seconds",
        "Duration of proxied HTTP requests (HTTP mode) or connections (TCP mode), by instance.",
        "histogram",
    ),
    (
        "edgelb_instance_requests_total",
        "Finished HTTP requests proxied to the instance, by response status class.",
        "counter",
    ),
    (
        "edgelb_instance_selected_total",
        "Times the balancer selected the instance.",
        "counter",
    ),
    (
        "edgelb_instance_up",
        "1 while the instance is selectable, 0 while it is marked down or draining.",
        "gauge",
    ),
];

/// Bytes buffered before they are handed to the writer.
const CHUNK: usize = 256 * 1024;

/// One instance as a scrape sees it.
struct Row<'a> {
    group: &'a GroupRuntime,
    backend: &'a Backend,
    /// `instance_name="…",service="…"` in `Scrape::labels`.
    labels: std::ops::Range<usize>,
}

/// The per-instance series of one routing table, ready to write.
pub(super) struct Scrape<'a> {
    rows: Vec<Row<'a>>,
    labels: String,
    now: Instant,
    /// Groups and instances in the table.
    pub(super) groups: usize,
    pub(super) instances: usize,
}

impl<'a> Scrape<'a> {
    /// Lists the instances of `table` that are still attached (a table
    /// older than the current one may hold detached, draining instances:
    /// their series are gone), in label order.
    pub(super) fn of(table: &'a RoutingTable, now: Instant) -> Self {
        let (mut groups, mut instances) = (0, 0);
        let mut listed: Vec<(&GroupRuntime, &Backend)> = Vec::new();
        for group in table.groups() {
            groups += 1;
            for backend in group.backends.values() {
                instances += 1;
                if !backend.is_draining() {
                    listed.push((group, backend));
                }
            }
        }
        // Label names in order are instance_name, service: the encoder's
        // order of series.
        listed.sort_unstable_by(|a, b| (&a.1.name, &a.0.name).cmp(&(&b.1.name, &b.0.name)));
        let mut labels = String::with_capacity(listed.len() * 40);
        let rows = listed
            .into_iter()
            .map(|(group, backend)| {
                let start = labels.len();
                labels.push_str("instance_name=\"");
                escape_into(&mut labels, &backend.name);
                labels.push_str("\",service=\"");
                escape_into(&mut labels, &group.name);
                labels.push('"');
                Row {
                    group,
                    backend,
                    labels: start..labels.len(),
                }
            })
            .collect();
        Self {
            rows,
            labels,
            now,
            groups,
            instances,
        }
    }

    /// Writes every per-instance family (none when there is no instance,
    /// like an empty vector family in a registry).
    pub(super) fn write(&self, out: &mut dyn io::Write) -> io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut buf = Buf::new(out);
        for (name, help, kind) in FAMILIES {
            buf.text("# HELP ");
            buf.text(name);
            buf.text(" ");
            buf.text(help);
            buf.text("\n# TYPE ");
            buf.text(name);
            buf.text(" ");
            buf.text(kind);
            buf.text("\n");
            match name {
                "edgelb_instance_bytes_total" => {
                    for (direction, rx) in [("rx", true), ("tx", false)] {
                        self.each(&mut buf, name, Some(("direction", direction)), |s| {
                            if rx {
                                s.bytes_rx.get()
                            } else {
                                s.bytes_tx.get()
                            }
                        })?;
                    }
                }
                "edgelb_instance_connect_errors_total" => {
                    self.each(&mut buf, name, None, |s| s.connect_errors.get())?;
                }
                "edgelb_instance_connections_total" => {
                    self.each(&mut buf, name, None, |s| s.connections.get())?;
                }
                "edgelb_instance_inflight" => {
                    self.each_row(&mut buf, name, |r| r.backend.local_inflight())?;
                }
                "edgelb_instance_inflight_global" => {
                    self.each_row(&mut buf, name, |r| r.group.balancer.load(r.backend))?;
                }
                "edgelb_instance_request_duration_seconds" => self.histograms(&mut buf, name)?,
                "edgelb_instance_requests_total" => {
                    for (i, class) in CODE_CLASSES.iter().enumerate() {
                        self.each(&mut buf, name, Some(("code_class", class)), |s| {
                            s.requests[i].get()
                        })?;
                    }
                }
                "edgelb_instance_selected_total" => {
                    self.each(&mut buf, name, None, |s| s.selected.get())?;
                }
                _ => {
                    let now = self.now;
                    self.each_row(&mut buf, name, |r| {
                        u64::from(r.backend.state(now) == BackendState::Up)
                    })?;
                }
            }
        }
        buf.flush()
    }

    /// One sample per instance of a counter, with an optional first label
    /// (its name sorts before `instance_name`).
    fn each(
        &self,
        buf: &mut Buf<'_>,
        name: &str,
        first: Option<(&str, &str)>,
        value: impl Fn(&InstanceSeries) -> u64,
    ) -> io::Result<()> {
        for row in &self.rows {
            buf.text(name);
            buf.text("{");
            if let Some((label, v)) = first {
                buf.text(label);
                buf.text("=\"");
                buf.text(v);
                buf.text("\",");
            }
            buf.text(&self.labels[row.labels.clone()]);
            buf.text("} ");
            buf.int(row.backend.metrics.peek().map_or(0, &value));
            buf.text("\n");
            buf.spill()?;
        }
        Ok(())
    }

    fn each_row(
        &self,
        buf: &mut Buf<'_>,
        name: &str,
        value: impl Fn(&Row<'_>) -> u64,
    ) -> io::Result<()> {
        for row in &self.rows {
            buf.text(name);
            buf.text("{");
            buf.text(&self.labels[row.labels.clone()]);
            buf.text("} ");
            buf.int(value(row));
            buf.text("\n");
            buf.spill()?;
        }
        Ok(())
    }

    fn histograms(&self, buf: &mut Buf<'_>, name: &str) -> io::Result<()> {
        let bounds: Vec<String> = DURATION_BUCKETS
            .iter()
            .map(ToString::to_string)
            .chain(std::iter::once("+Inf".to_owned()))
            .collect();
        for row in &self.rows {
            let h = row.backend.metrics.peek().map(|s| &s.duration);
            let counts = h.map_or([0; DURATION_BUCKETS.len() + 1], Histogram::cumulative);
            let labels = &self.labels[row.labels.clone()];
            for (bound, count) in bounds.iter().zip(counts) {
                buf.text(name);
                buf.text("_bucket{");
                buf.text(labels);
                buf.text(",le=\"");
                buf.text(bound);
                buf.text("\"} ");
                buf.int(count);
                buf.text("\n");
            }
            buf.text(name);
            buf.text("_sum{");
            buf.text(labels);
            buf.text("} ");
            buf.float(h.map_or(0.0, Histogram::get_sample_sum));
            buf.text("\n");
            buf.text(name);
            buf.text("_count{");
            buf.text(labels);
            buf.text("} ");
            buf.int(counts[DURATION_BUCKETS.len()]);
            buf.text("\n");
            buf.spill()?;
        }
        Ok(())
    }
}

/// A write buffer handed to `out` in chunks of about [`CHUNK`] bytes.
struct Buf<'w> {
    bytes: Vec<u8>,
    out: &'w mut dyn io::Write,
    int: itoa::Buffer,
    float: String,
}

impl<'w> Buf<'w> {
    fn new(out: &'w mut dyn io::Write) -> Self {
        Self {
            bytes: Vec::with_capacity(CHUNK + 4096),
            out,
            int: itoa::Buffer::new(),
            float: String::new(),
        }
    }

    fn text(&mut self, s: &str) {
        self.bytes.extend_from_slice(s.as_bytes());
    }

    /// An integer, printed as `prometheus` prints the `f64` it would hold
    /// (the same digits below 2^53).
    fn int(&mut self, n: u64) {
        self.bytes.extend_from_slice(self.int.format(n).as_bytes());
    }

    fn float(&mut self, x: f64) {
        self.float.clear();
        // Writing to a String cannot fail.
        let _ = write!(self.float, "{x}");
        self.bytes.extend_from_slice(self.float.as_bytes());
    }

    /// Hands the buffer to the writer once it holds a chunk.
    fn spill(&mut self) -> io::Result<()> {
        if self.bytes.len() >= CHUNK {
            self.out.write_all(&self.bytes)?;
            self.bytes.clear();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.write_all(&self.bytes)?;
        self.bytes.clear();
        Ok(())
    }
}

/// A label value escaped as the text format asks (`\`, newline, `"`).
pub(super) fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}
