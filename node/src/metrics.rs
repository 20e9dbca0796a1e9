//! Prometheus metrics: one registry per node, per-instance series labelled
//! `service` and `instance_name`, and per-node series.
//!
//! Hot-path counters are resolved to concrete handles once per instance
//! ([`InstanceMetrics`]) so that a request never hashes label values. Gauges
//! that mirror atomics (in-flight counts, up) are filled in at scrape time.
//! The load-gossip series are in [`GossipMetrics`].

mod gossip;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tracing::warn;

use crate::balancer::BackendState;
use crate::routing::RoutingTable;

pub use gossip::{DROP_REASONS, GossipMetrics};

/// HTTP status classes counted by `edgelb_instance_requests_total{code_class}`.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Resolved metric handles for one attached instance.
///
/// Built by [`Metrics::instance`]; [`InstanceMetrics::unregistered`] builds a
/// set that no registry sees (tests and benchmarks).
#[derive(Clone, Debug)]
pub struct InstanceMetrics {
    /// `edgelb_instance_selected_total`
    pub selected: IntCounter,
    /// `edgelb_instance_connections_total`: upstream connections opened.
    pub connections: IntCounter,
    /// `edgelb_instance_connect_errors_total`
    pub connect_errors: IntCounter,
    /// `edgelb_instance_requests_total{code_class}`, indexed like [`CODE_CLASSES`].
    pub requests: [IntCounter; 5],
    /// `edgelb_instance_request_duration_seconds`
    pub duration: Histogram,
    /// `edgelb_instance_bytes_total{direction="rx"}`: bytes received from the instance.
    pub bytes_rx: IntCounter,
    /// `edgelb_instance_bytes_total{direction="tx"}`: bytes sent to the instance.
    pub bytes_tx: IntCounter,
}

impl InstanceMetrics {
    /// Handles that are not registered anywhere.
    pub fn unregistered() -> Self {
        let c = |name: &str| IntCounter::new(name, name).expect("static metric name is valid");
        Self {
            selected: c("selected"),
            connections: c("connections"),
            connect_errors: c("connect_errors"),
            requests: CODE_CLASSES.map(|_| c("requests")),
            duration: Histogram::with_opts(HistogramOpts::new("duration", "duration"))
                .expect("static metric name is valid"),
            bytes_rx: c("bytes_rx"),
            bytes_tx: c("bytes_tx"),
        }
    }

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

/// Upper bounds of `edgelb_instance_request_duration_seconds`: 0.5 ms to 30 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// Values of `edgelb_instance_bytes_total{direction}`.
pub const DIRECTIONS: [&str; 2] = ["rx", "tx"];

/// Labels of every per-instance series.
const INSTANCE_LABELS: [&str; 2] = ["service", "instance_name"];

/// Gauges of one instance that [`Metrics::render`] fills in at scrape time.
#[derive(Clone)]
struct InstanceGauges {
    inflight: IntGauge,
    inflight_global: IntGauge,
    up: IntGauge,
}

/// The node's metric registry.
///
/// Per instance (labels `service`, `instance_name`):
///
/// | series | kind | meaning |
/// | --- | --- | --- |
/// | `edgelb_instance_inflight` | gauge | connections (TCP) or requests (HTTP) this node has in flight |
/// | `edgelb_instance_inflight_global` | gauge | estimate over the cluster: local + peers' reports |
/// | `edgelb_instance_selected_total` | counter | times the balancer picked it |
/// | `edgelb_instance_requests_total{code_class}` | counter | finished HTTP requests by status class |
/// | `edgelb_instance_connections_total` | counter | upstream connections opened |
/// | `edgelb_instance_connect_errors_total` | counter | failed upstream connects |
/// | `edgelb_instance_request_duration_seconds` | histogram | request (HTTP) or connection (TCP) duration |
/// | `edgelb_instance_bytes_total{direction}` | counter | `rx` from the instance, `tx` to it |
/// | `edgelb_instance_up` | gauge | 1 while selectable (up), 0 while marked down or draining |
///
/// Per node: `edgelb_groups`, `edgelb_instances`, `edgelb_listeners` (from
/// the routing table at scrape time), `edgelb_admin_requests_total{code}`,
/// the Raft series and the gossip series ([`GossipMetrics`]).
///
/// Every series of an instance is created by [`Metrics::instance`] and
/// removed by [`Metrics::remove_instance`], so a detached instance's series
/// disappear from the next scrape.
pub struct Metrics {
    registry: Registry,
    inflight: IntGaugeVec,
    inflight_global: IntGaugeVec,
    up: IntGaugeVec,
    selected: IntCounterVec,
    requests: IntCounterVec,
    connections: IntCounterVec,
    connect_errors: IntCounterVec,
    duration: HistogramVec,
    bytes: IntCounterVec,
    groups: IntGauge,
    instances: IntGauge,
    listeners: IntGauge,
    admin_requests: IntCounterVec,
    raft: RaftGauges,
    /// Load gossip.
    pub gossip: GossipMetrics,
    /// Scrape-time gauges by service, then instance name. Holding this lock
    /// while setting them keeps a scrape that races a detach from bringing
    /// the detached instance's series back.
    gauges: Mutex<HashMap<String, HashMap<String, InstanceGauges>>>,
}

/// Per-node Raft series.
struct RaftGauges {
    term: IntGauge,
    is_leader: IntGauge,
    commit_index: IntGauge,
    applied_index: IntGauge,
    apply_lag: IntGauge,
    snapshot_index: IntGauge,
    voters: IntGauge,
    learners: IntGauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// Metric names, help texts and label names below are static and valid, and
// each is registered once in a fresh registry: construction cannot fail.
const STATIC_OK: &str = "static metric definitions are valid and unique";

impl Metrics {
    /// A registry with every family registered and no instance series yet.
    ///
    /// # Panics
    /// Never: every name, help text and label is a valid constant, and each
    /// family is registered once in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect(STATIC_OK);
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntGaugeVec::new(Opts::new(name, help), labels).expect(STATIC_OK);
            reg(Box::new(v.clone()));
            v
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels).expect(STATIC_OK);
            reg(Box::new(v.clone()));
            v
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect(STATIC_OK);
            reg(Box::new(g.clone()));
            g
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "edgelb_instance_request_duration_seconds",
                "Duration of proxied HTTP requests (HTTP mode) or connections (TCP mode), by instance.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &INSTANCE_LABELS,
        )
        .expect(STATIC_OK);
        reg(Box::new(duration.clone()));
        let with_class = ["service", "instance_name", "code_class"];
        let with_direction = ["service", "instance_name", "direction"];
        Self {
            inflight: gauge_vec(
                "edgelb_instance_inflight",
                "Connections (TCP mode) or requests (HTTP mode) this node has in flight to the instance.",
                &INSTANCE_LABELS,
            ),
            inflight_global: gauge_vec(
                "edgelb_instance_inflight_global",
                "Estimated in-flight count of the instance over the cluster: this node's plus its peers' reports.",
                &INSTANCE_LABELS,
            ),
            up: gauge_vec(
                "edgelb_instance_up",
                "1 while the instance is selectable, 0 while it is marked down or draining.",
                &INSTANCE_LABELS,
            ),
            selected: counter_vec(
                "edgelb_instance_selected_total",
                "Times the balancer selected the instance.",
                &INSTANCE_LABELS,
            ),
            requests: counter_vec(
                "edgelb_instance_requests_total",
                "Finished HTTP requests proxied to the instance, by response status class.",
                &with_class,
            ),
            connections: counter_vec(
                "edgelb_instance_connections_total",
                "Upstream connections opened to the instance.",
                &INSTANCE_LABELS,
            ),
            connect_errors: counter_vec(
                "edgelb_instance_connect_errors_total",
                "Failed attempts to connect to the instance (refused, unreachable or timed out).",
                &INSTANCE_LABELS,
            ),
            duration,
            bytes: counter_vec(
                "edgelb_instance_bytes_total",
                "Bytes proxied: rx received from the instance, tx sent to it.",
                &with_direction,
            ),
            groups: gauge("edgelb_groups", "Service groups in this node's state."),
            instances: gauge(
                "edgelb_instances",
                "Instances attached to the service groups in this node's state.",
            ),
            listeners: gauge(
                "edgelb_listeners",
                "Published ports in this node's routing table.",
            ),
            admin_requests: counter_vec(
                "edgelb_admin_requests_total",
                "Admin API requests answered, by HTTP status code.",
                &["code"],
            ),
            raft: RaftGauges {
                term: gauge("edgelb_raft_term", "Current Raft term seen by this node."),
                is_leader: gauge(
                    "edgelb_raft_is_leader",
                    "1 when this node is the Raft leader.",
                ),
                commit_index: gauge(
                    "edgelb_raft_commit_index",
                    "Highest Raft log index known committed.",
                ),
                applied_index: gauge(
                    "edgelb_raft_applied_index",
                    "Highest Raft log index applied to this node's state.",
                ),
                apply_lag: gauge(
                    "edgelb_raft_apply_lag",
                    "Committed membership entries not yet applied on this node (commit index - applied index).",
                ),
                snapshot_index: gauge(
                    "edgelb_raft_snapshot_index",
                    "Last Raft log index covered by this node's snapshot (built or installed).",
                ),
                voters: gauge("edgelb_raft_voters", "Voters in the Raft membership."),
                learners: gauge("edgelb_raft_learners", "Learners in the Raft membership."),
            },
            gossip: GossipMetrics::register(&registry),
            registry,
            gauges: Mutex::new(HashMap::new()),
        }
    }

    /// Creates every series of one instance (all status classes and both
    /// directions at zero) and returns the handles the data plane counts with.
    pub fn instance(&self, service: &str, instance_name: &str) -> InstanceMetrics {
        let labels = [service, instance_name];
        let gauges = InstanceGauges {
            inflight: self.inflight.with_label_values(&labels),
            inflight_global: self.inflight_global.with_label_values(&labels),
            up: self.up.with_label_values(&labels),
        };
        gauges.up.set(1);
        self.lock_gauges()
            .entry(service.to_owned())
            .or_default()
            .insert(instance_name.to_owned(), gauges);
        InstanceMetrics {
            selected: self.selected.with_label_values(&labels),
            connections: self.connections.with_label_values(&labels),
            connect_errors: self.connect_errors.with_label_values(&labels),
            requests: CODE_CLASSES.map(|class| {
                self.requests
                    .with_label_values(&[service, instance_name, class])
            }),
            duration: self.duration.with_label_values(&labels),
            bytes_rx: self
                .bytes
                .with_label_values(&[service, instance_name, DIRECTIONS[0]]),
            bytes_tx: self
                .bytes
                .with_label_values(&[service, instance_name, DIRECTIONS[1]]),
        }
    }

    /// Removes every series of one instance from every family. Handles that
    /// are still held keep counting, but nothing scrapes them any more.
    pub fn remove_instance(&self, service: &str, instance_name: &str) {
        let mut gauges = self.lock_gauges();
        if let Some(by_name) = gauges.get_mut(service) {
            by_name.remove(instance_name);
            if by_name.is_empty() {
                gauges.remove(service);
            }
        }
        let labels = [service, instance_name];
        // A series that was never created is not an error here: removal is
        // idempotent.
        for v in [&self.inflight, &self.inflight_global, &self.up] {
            let _ = v.remove_label_values(&labels);
        }
        for v in [&self.selected, &self.connections, &self.connect_errors] {
            let _ = v.remove_label_values(&labels);
        }
        let _ = self.duration.remove_label_values(&labels);
        for class in CODE_CLASSES {
            let _ = self
                .requests
                .remove_label_values(&[service, instance_name, class]);
        }
        for direction in DIRECTIONS {
            let _ = self
                .bytes
                .remove_label_values(&[service, instance_name, direction]);
        }
    }

    /// Counts one answered admin API request.
    pub fn admin_request(&self, code: u16) {
        self.admin_requests
            .with_label_values(&[code.to_string()])
            .inc();
    }

    /// Fills the scrape-time gauges from the live runtime in `table` and
    /// encodes every family in the Prometheus text format.
    /// Sets the per-node Raft series from this node's view (at scrape time).
    pub fn set_cluster(&self, s: &crate::store::ClusterStatus) {
        let r = &self.raft;
        r.term.set(saturating_i64(s.term));
        r.is_leader.set(i64::from(s.is_leader));
        r.commit_index.set(saturating_i64(s.commit_index));
        r.applied_index.set(saturating_i64(s.applied_index));
        r.apply_lag.set(saturating_i64(
            s.commit_index.saturating_sub(s.applied_index),
        ));
        r.snapshot_index.set(saturating_i64(s.snapshot_index));
        let voters = s
            .members
            .iter()
            .filter(|m| m.role == crate::store::Role::Voter)
            .count();
        r.voters.set(i64::try_from(voters).unwrap_or(i64::MAX));
        r.learners
            .set(i64::try_from(s.members.len() - voters).unwrap_or(i64::MAX));
    }

    pub fn render(&self, table: &RoutingTable) -> String {
        let now = Instant::now();
        let (mut groups, mut instances) = (0_i64, 0_i64);
        {
            let gauges = self.lock_gauges();
            for group in table.groups() {
                groups += 1;
                let by_name = gauges.get(&group.name);
                for backend in group.backends.values() {
                    instances += 1;
                    let Some(g) = by_name.and_then(|m| m.get(&backend.name)) else {
                        continue;
                    };
                    g.inflight.set(saturating_i64(backend.local_inflight()));
                    g.inflight_global
                        .set(saturating_i64(group.balancer.load(backend)));
                    g.up.set(i64::from(backend.state(now) == BackendState::Up));
                }
            }
        }
        self.groups.set(groups);
        self.instances.set(instances);
        self.listeners
            .set(i64::try_from(table.ports().count()).unwrap_or(i64::MAX));
        let families = self.registry.gather();
        match TextEncoder::new().encode_to_string(&families) {
            Ok(text) => text,
            Err(e) => {
                warn!(error = %e, "encoding metrics");
                String::new()
            }
        }
    }

    /// The registry, for families registered elsewhere (Raft, gossip).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn lock_gauges(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, InstanceGauges>>> {
        self.gauges.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series<'a>(text: &'a str, instance: &str) -> Vec<&'a str> {
        let needle = format!("instance_name=\"{instance}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&needle))
            .collect()
    }

    #[test]
    fn instance_series_are_created_up_front_and_removed_entirely() {
        let metrics = Metrics::new();
        let table = RoutingTable::default();
        let a = metrics.instance("web", "a");
        let _b = metrics.instance("web", "b");
        a.observe_status(404);
        a.duration.observe(0.003);
        let text = metrics.render(&table);
        let a_series = series(&text, "a");
        for class in CODE_CLASSES {
            let want = format!(
                "edgelb_instance_requests_total{{code_class=\"{class}\",instance_name=\"a\",service=\"web\"}} {}",
                u8::from(class == "4xx")
            );
            assert!(a_series.contains(&want.as_str()), "{want}\n{text}");
        }
        for direction in DIRECTIONS {
            let want = format!(
                "edgelb_instance_bytes_total{{direction=\"{direction}\",instance_name=\"a\",service=\"web\"}} 0"
            );
            assert!(a_series.contains(&want.as_str()), "{want}\n{text}");
        }
        // 9 families: 5 classes + 2 directions + 6 single series + the
        // histogram's buckets, sum and count.
        assert_eq!(
            a_series.len(),
            5 + 2 + 6 + DURATION_BUCKETS.len() + 3,
            "{text}"
        );

        metrics.remove_instance("web", "a");
        metrics.remove_instance("web", "a");
        let text = metrics.render(&table);
        assert!(series(&text, "a").is_empty(), "{text}");
        assert_eq!(series(&text, "b").len(), a_series.len(), "{text}");
        // Handles still held keep working; nothing scrapes them.
        a.selected.inc();
        assert!(series(&metrics.render(&table), "a").is_empty());
    }

    #[test]
    fn every_family_has_help() {
        let metrics = Metrics::new();
        let _a = metrics.instance("web", "a");
        metrics.admin_request(200);
        let text = metrics.render(&RoutingTable::default());
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(text.contains("# TYPE edgelb_instance_request_duration_seconds histogram"));
        assert!(text.contains("edgelb_admin_requests_total{code=\"200\"} 1"));
    }
}
