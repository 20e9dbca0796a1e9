//! Prometheus metrics: one registry per node for the per-node series, and
//! per-instance series labelled `service` and `instance_name` that are not
//! in the registry: each backend counts in its own atomics
//! ([`crate::series`]) and a scrape renders them straight from the
//! routing table ([`instance`]), so an instance costs no registry object and
//! a detach leaves nothing to remove. The load-gossip series are in
//! [`GossipMetrics`].

mod gossip;
mod instance;
mod zipped;

use std::fmt;
use std::io;
use std::time::Instant;

use prometheus::{Encoder as _, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tracing::{debug, warn};

use crate::routing::RoutingTable;

pub use gossip::{DROP_REASONS, GossipMetrics};

/// The node's metrics.
///
/// Per instance (labels `service`, `instance_name`), rendered at scrape time
/// from the routing table:
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
/// Per node, in the registry: `edgelb_groups`, `edgelb_instances`,
/// `edgelb_listeners` (from the routing table at scrape time),
/// `edgelb_admin_requests_total{code}`, the Raft series and the gossip
/// series ([`GossipMetrics`]).
///
/// An instance's series are those of its backend in the table scraped, so
/// a detached instance's series disappear from the first scrape of a table
/// without it (and from older tables once it drains), and an instance
/// attached again starts from zero (a counter reset to Prometheus).
pub struct Metrics {
    registry: Registry,
    groups: IntGauge,
    instances: IntGauge,
    listeners: IntGauge,
    admin_requests: IntCounterVec,
    raft: RaftGauges,
    /// Load gossip.
    pub gossip: GossipMetrics,
    /// The compressed blocks of the last gzip-compressed scrape.
    zipper: zipped::Zipper,
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
        Self {
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
            zipper: zipped::Zipper::default(),
        }
    }

    /// Counts one answered admin API request.
    pub fn admin_request(&self, code: u16) {
        self.admin_requests
            .with_label_values(&[code.to_string()])
            .inc();
    }

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

    /// Encodes every family in the Prometheus text format: the per-instance
    /// series from the backends of `table`, the per-node ones from the
    /// registry (`edgelb_groups`, `edgelb_instances` and `edgelb_listeners`
    /// set from `table` first).
    pub fn render(&self, table: &RoutingTable) -> String {
        let mut out = Vec::new();
        if let Err(e) = self.render_to(table, &mut out) {
            warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_else(|e| {
            warn!(error = %e, "metrics text is not UTF-8");
            String::new()
        })
    }

    /// [`Metrics::render`] into `out`, in chunks: a scrape of many instances
    /// never holds its whole text when `out` compresses or streams.
    pub fn render_to(&self, table: &RoutingTable, out: &mut dyn io::Write) -> io::Result<()> {
        let scrape = instance::Scrape::of(table, Instant::now());
        let (head, tail) = self.registry_text(table, &scrape)?;
        out.write_all(&head)?;
        scrape.write(out)?;
        out.write_all(&tail)
    }

    /// [`Metrics::render`] as one gzip member, into `out`: only the
    /// per-instance samples that changed since the last compressed scrape
    /// are rendered and compressed again (see [`zipped`]).
    pub fn render_gzip_to(&self, table: &RoutingTable, out: &mut dyn io::Write) -> io::Result<()> {
        let scrape = instance::Scrape::of(table, Instant::now());
        let (head, tail) = self.registry_text(table, &scrape)?;
        let blocks = self.zipper.write(&scrape, &head, &tail, out)?;
        debug!(
            reused = blocks.reused,
            compressed = blocks.compressed,
            "metrics scrape compressed"
        );
        Ok(())
    }

    /// The registry's families that sort before the per-instance ones and
    /// those after, as text (`edgelb_groups`, `edgelb_instances` and
    /// `edgelb_listeners` set from `table` first).
    fn registry_text(
        &self,
        table: &RoutingTable,
        scrape: &instance::Scrape<'_>,
    ) -> io::Result<(Vec<u8>, Vec<u8>)> {
        self.groups
            .set(i64::try_from(scrape.groups).unwrap_or(i64::MAX));
        self.instances
            .set(i64::try_from(scrape.instances).unwrap_or(i64::MAX));
        self.listeners
            .set(i64::try_from(table.ports().count()).unwrap_or(i64::MAX));
        let families = self.registry.gather();
        // The per-instance families sit together in name order, like the
        // encoder would have put them.
        let first = instance::FAMILIES[0].0;
        let split = families.partition_point(|f| f.name() < first);
        let encoder = TextEncoder::new();
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        encoder
            .encode(&families[..split], &mut head)
            .map_err(io::Error::other)?;
        encoder
            .encode(&families[split..], &mut tail)
            .map_err(io::Error::other)?;
        Ok((head, tail))
    }

    /// The registry, for families registered elsewhere (Raft, gossip).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
