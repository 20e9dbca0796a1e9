//! Per-instance series: the counters of [`crate::series`], rendered at
//! scrape time by walking the routing table.
//!
//! There is no per-series object in a registry, no label hashing and
//! nothing to remove on detach. A scrape lists the backends of
//! the table it renders, sorts them by label values and writes each family
//! straight into the text format, in the order and with the formatting of
//! `prometheus::TextEncoder` (families by name, series by label values in
//! label-name order, values as `f64` would print them).

use std::fmt::Write as _;
use std::io;
use std::ops::Range;
use std::time::Instant;

use crate::balancer::{Backend, BackendState};
use crate::routing::{GroupRuntime, RoutingTable};
use crate::series::{DURATION_BUCKETS, Histogram, InstanceSeries};

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

/// Rows rendered between two checks of the buffer's size.
const ROWS_PER_SPILL: usize = 64;

/// One run of samples over every instance: a family has one per value of
/// its extra label (`direction`, `code_class`), else one.
#[derive(Clone, Copy, Debug)]
pub(super) enum Section {
    /// A counter of the instance's series, with an optional first label
    /// (its name sorts before `instance_name`).
    Counter {
        name: &'static str,
        label: Option<(&'static str, &'static str)>,
        get: fn(&InstanceSeries) -> u64,
    },
    Inflight,
    InflightGlobal,
    Duration,
    Up,
}

impl Section {
    /// The sections of family `name` (one of [`FAMILIES`]), in order.
    pub(super) fn of(name: &str) -> &'static [Self] {
        match name {
            BYTES => &BYTES_SECTIONS,
            "edgelb_instance_connect_errors_total" => &[Self::Counter {
                name: "edgelb_instance_connect_errors_total",
                label: None,
                get: connect_errors,
            }],
            "edgelb_instance_connections_total" => &[Self::Counter {
                name: "edgelb_instance_connections_total",
                label: None,
                get: connections,
            }],
            "edgelb_instance_inflight" => &[Self::Inflight],
            "edgelb_instance_inflight_global" => &[Self::InflightGlobal],
            "edgelb_instance_request_duration_seconds" => &[Self::Duration],
            REQUESTS => &REQUESTS_SECTIONS,
            "edgelb_instance_selected_total" => &[Self::Counter {
                name: "edgelb_instance_selected_total",
                label: None,
                get: selected,
            }],
            _ => &[Self::Up],
        }
    }
}

const BYTES: &str = "edgelb_instance_bytes_total";
const REQUESTS: &str = "edgelb_instance_requests_total";

const BYTES_SECTIONS: [Section; 2] = [
    Section::Counter {
        name: BYTES,
        label: Some(("direction", "rx")),
        get: bytes_rx,
    },
    Section::Counter {
        name: BYTES,
        label: Some(("direction", "tx")),
        get: bytes_tx,
    },
];

const REQUESTS_SECTIONS: [Section; 5] = [
    requests_section("1xx", |s| s.requests[0].get()),
    requests_section("2xx", |s| s.requests[1].get()),
    requests_section("3xx", |s| s.requests[2].get()),
    requests_section("4xx", |s| s.requests[3].get()),
    requests_section("5xx", |s| s.requests[4].get()),
];

const fn requests_section(class: &'static str, get: fn(&InstanceSeries) -> u64) -> Section {
    Section::Counter {
        name: REQUESTS,
        label: Some(("code_class", class)),
        get,
    }
}

fn bytes_rx(s: &InstanceSeries) -> u64 {
    s.bytes_rx.get()
}

fn bytes_tx(s: &InstanceSeries) -> u64 {
    s.bytes_tx.get()
}

fn connect_errors(s: &InstanceSeries) -> u64 {
    s.connect_errors.get()
}

fn connections(s: &InstanceSeries) -> u64 {
    s.connections.get()
}

fn selected(s: &InstanceSeries) -> u64 {
    s.selected.get()
}

/// One instance as a scrape sees it.
struct Row<'a> {
    group: &'a GroupRuntime,
    backend: &'a Backend,
    /// `instance_name="…",service="…"` in `Scrape::labels`.
    labels: Range<usize>,
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

    /// Instances listed (the rows of every section).
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The `instance_name="…",service="…"` labels of row `i`.
    pub(super) fn labels(&self, i: usize) -> &str {
        &self.labels[self.rows[i].labels.clone()]
    }

    /// Writes every per-instance family (none when there is no instance,
    /// like an empty vector family in a registry).
    pub(super) fn write(&self, out: &mut dyn io::Write) -> io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(CHUNK + 64 * 1024);
        let mut values = Vec::new();
        for family in FAMILIES {
            header(&mut buf, family);
            for &section in Section::of(family.0) {
                let mut start = 0;
                while start < self.rows.len() {
                    let rows = start..(start + ROWS_PER_SPILL).min(self.rows.len());
                    start = rows.end;
                    values.clear();
                    self.values(section, rows.clone(), &mut values);
                    self.write_rows(section, rows, &values, &mut buf);
                    if buf.len() >= CHUNK {
                        out.write_all(&buf)?;
                        buf.clear();
                    }
                }
            }
        }
        out.write_all(&buf)
    }

    /// Reads the values that the samples of `section` for `rows` show,
    /// appending them to `out`: one per row, or for the histogram the
    /// cumulative bucket counts then the `f64` bits of the sum.
    pub(super) fn values(&self, section: Section, rows: Range<usize>, out: &mut Vec<u64>) {
        for row in &self.rows[rows] {
            match section {
                Section::Counter { get, .. } => {
                    out.push(row.backend.metrics.peek().map_or(0, get));
                }
                Section::Inflight => out.push(row.backend.local_inflight()),
                Section::InflightGlobal => out.push(row.group.balancer.load(row.backend)),
                Section::Up => out.push(u64::from(row.backend.state(self.now) == BackendState::Up)),
                Section::Duration => {
                    let h = row.backend.metrics.peek().map(|s| &s.duration);
                    out.extend(h.map_or([0; DURATION_BUCKETS.len() + 1], Histogram::cumulative));
                    out.push(h.map_or(0.0, Histogram::get_sample_sum).to_bits());
                }
            }
        }
    }

    /// The samples of `section` for rows `rows` showing `values` (as read
    /// by [`Scrape::values`]), appended to `buf`.
    pub(super) fn write_rows(
        &self,
        section: Section,
        rows: Range<usize>,
        values: &[u64],
        buf: &mut Vec<u8>,
    ) {
        let mut int = itoa::Buffer::new();
        let (name, label) = match section {
            Section::Counter { name, label, .. } => (name, label),
            Section::Inflight => ("edgelb_instance_inflight", None),
            Section::InflightGlobal => ("edgelb_instance_inflight_global", None),
            Section::Up => ("edgelb_instance_up", None),
            Section::Duration => {
                let per_row = DURATION_BUCKETS.len() + 2;
                for (row, values) in self.rows[rows].iter().zip(values.chunks_exact(per_row)) {
                    self.histogram(row, values, buf, &mut int);
                }
                return;
            }
        };
        for (row, &value) in self.rows[rows].iter().zip(values) {
            buf.extend_from_slice(name.as_bytes());
            buf.push(b'{');
            if let Some((label, v)) = label {
                buf.extend_from_slice(label.as_bytes());
                buf.extend_from_slice(b"=\"");
                buf.extend_from_slice(v.as_bytes());
                buf.extend_from_slice(b"\",");
            }
            buf.extend_from_slice(self.labels[row.labels.clone()].as_bytes());
            buf.extend_from_slice(b"} ");
            // Integers print as `prometheus` prints the `f64` it would hold
            // (the same digits below 2^53).
            buf.extend_from_slice(int.format(value).as_bytes());
            buf.push(b'\n');
        }
    }

    /// The bucket, sum and count samples of `row`'s histogram from its
    /// values (cumulative counts, then the sum's bits).
    fn histogram(&self, row: &Row<'_>, values: &[u64], buf: &mut Vec<u8>, int: &mut itoa::Buffer) {
        const NAME: &[u8] = b"edgelb_instance_request_duration_seconds";
        let labels = self.labels[row.labels.clone()].as_bytes();
        let (counts, sum) = values.split_at(BOUNDS.len());
        for (bound, &count) in BOUNDS.iter().zip(counts) {
            buf.extend_from_slice(NAME);
            buf.extend_from_slice(b"_bucket{");
            buf.extend_from_slice(labels);
            buf.extend_from_slice(b",le=\"");
            buf.extend_from_slice(bound.as_bytes());
            buf.extend_from_slice(b"\"} ");
            buf.extend_from_slice(int.format(count).as_bytes());
            buf.push(b'\n');
        }
        buf.extend_from_slice(NAME);
        buf.extend_from_slice(b"_sum{");
        buf.extend_from_slice(labels);
        buf.extend_from_slice(b"} ");
        match sum.first().map_or(0.0, |&bits| f64::from_bits(bits)) {
            0.0 => buf.push(b'0'),
            sum => {
                let mut text = String::new();
                // Writing to a String cannot fail.
                let _ = write!(text, "{sum}");
                buf.extend_from_slice(text.as_bytes());
            }
        }
        buf.push(b'\n');
        buf.extend_from_slice(NAME);
        buf.extend_from_slice(b"_count{");
        buf.extend_from_slice(labels);
        buf.extend_from_slice(b"} ");
        buf.extend_from_slice(int.format(counts.last().copied().unwrap_or(0)).as_bytes());
        buf.push(b'\n');
    }
}

/// The `le` label values of the histogram's buckets, as `f64` prints them.
const BOUNDS: [&str; DURATION_BUCKETS.len() + 1] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "20", "30", "+Inf",
];

/// The `# HELP` and `# TYPE` lines of `family`.
pub(super) fn header(buf: &mut Vec<u8>, (name, help, kind): (&str, &str, &str)) {
    for part in [
        "# HELP ",
        name,
        " ",
        help,
        "\n# TYPE ",
        name,
        " ",
        kind,
        "\n",
    ] {
        buf.extend_from_slice(part.as_bytes());
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
