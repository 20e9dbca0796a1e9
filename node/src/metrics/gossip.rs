//! The per-node load-gossip series.
//!
//! | series | kind | meaning |
//! | --- | --- | --- |
//! | `edgelb_gossip_reports_sent_total` | counter | reports handed to the network, one per peer |
//! | `edgelb_gossip_reports_received_total` | counter | reports that became their peer's newest |
//! | `edgelb_gossip_reports_dropped_total{reason}` | counter | `stale`, `malformed`, `identity`, `oversized`, `self`, `gap` (a delta whose base report was missed), `member` (from a node not in the cluster's membership) |
//! | `edgelb_gossip_bytes_total{direction}` | counter | report bytes, `tx` and `rx` (payload, without QUIC overhead) |
//! | `edgelb_gossip_peer_report_age_seconds{peer}` | gauge | age of each peer's newest report (set at scrape time) |

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec, Opts, Registry};

use super::STATIC_OK;

/// Values of `edgelb_gossip_reports_dropped_total{reason}`.
pub const DROP_REASONS: [&str; 7] = [
    "stale",
    "malformed",
    "identity",
    "oversized",
    "self",
    "gap",
    "member",
];

/// Handles of the gossip series.
pub struct GossipMetrics {
    /// `edgelb_gossip_reports_sent_total`
    pub sent: IntCounter,
    /// `edgelb_gossip_reports_received_total`
    pub received: IntCounter,
    dropped: IntCounterVec,
    /// `edgelb_gossip_bytes_total{direction="tx"}`
    pub bytes_tx: IntCounter,
    /// `edgelb_gossip_bytes_total{direction="rx"}`
    pub bytes_rx: IntCounter,
    age: GaugeVec,
    /// Peers with an age series.
    aged: Mutex<BTreeSet<u64>>,
}

impl GossipMetrics {
    pub(super) fn register(registry: &Registry) -> Self {
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect(STATIC_OK);
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect(STATIC_OK);
            reg(Box::new(c.clone()));
            c
        };
        let dropped = IntCounterVec::new(
            Opts::new(
                "edgelb_gossip_reports_dropped_total",
                "Gossip input not merged, by reason: stale (not newer than the peer's last report), malformed, identity (names another node than the sender's certificate), oversized, self (this node's own), gap (a delta whose base report was missed).",
            ),
            &["reason"],
        )
        .expect(STATIC_OK);
        reg(Box::new(dropped.clone()));
        for reason in DROP_REASONS {
            dropped.with_label_values(&[reason]);
        }
        let bytes = IntCounterVec::new(
            Opts::new(
                "edgelb_gossip_bytes_total",
                "Bytes of gossip reports sent (tx) and received (rx), without QUIC overhead.",
            ),
            &["direction"],
        )
        .expect(STATIC_OK);
        reg(Box::new(bytes.clone()));
        let age = GaugeVec::new(
            Opts::new(
                "edgelb_gossip_peer_report_age_seconds",
                "Age of the newest load report received from each peer.",
            ),
            &["peer"],
        )
        .expect(STATIC_OK);
        reg(Box::new(age.clone()));
        Self {
            sent: counter(
                "edgelb_gossip_reports_sent_total",
                "Load reports sent to peers (one per report and peer).",
            ),
            received: counter(
                "edgelb_gossip_reports_received_total",
                "Load reports received that became their peer's newest.",
            ),
            dropped,
            bytes_tx: bytes.with_label_values(&["tx"]),
            bytes_rx: bytes.with_label_values(&["rx"]),
            age,
            aged: Mutex::new(BTreeSet::new()),
        }
    }

    /// Counts one dropped report; `reason` is one of [`DROP_REASONS`].
    pub fn dropped(&self, reason: &str) {
        self.dropped.with_label_values(&[reason]).inc();
    }

    /// The count of reports dropped for `reason`.
    pub fn dropped_count(&self, reason: &str) -> u64 {
        self.dropped.with_label_values(&[reason]).get()
    }

    /// Sets the age series to `ages` (peer, age of its newest report) and
    /// removes the series of peers not listed.
    pub fn set_report_ages(&self, ages: &[(u64, Duration)]) {
        let mut aged = self.aged.lock().unwrap_or_else(PoisonError::into_inner);
        let now: BTreeSet<u64> = ages.iter().map(|(peer, _)| *peer).collect();
        for gone in aged.difference(&now) {
            let _ = self.age.remove_label_values(&[&gone.to_string()]);
        }
        for (peer, age) in ages {
            let gauge: Gauge = self.age.with_label_values(&[&peer.to_string()]);
            gauge.set(age.as_secs_f64());
        }
        *aged = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routing::RoutingTable;

    #[test]
    fn gossip_series() {
        let metrics = Metrics::new();
        let g = &metrics.gossip;
        g.sent.inc();
        g.bytes_tx.inc_by(70);
        g.dropped("identity");
        g.set_report_ages(&[(2, Duration::from_millis(40)), (3, Duration::from_secs(2))]);
        let text = metrics.render(&RoutingTable::default());
        for line in [
            "edgelb_gossip_reports_sent_total 1",
            "edgelb_gossip_reports_received_total 0",
            "edgelb_gossip_reports_dropped_total{reason=\"identity\"} 1",
            "edgelb_gossip_reports_dropped_total{reason=\"stale\"} 0",
            "edgelb_gossip_bytes_total{direction=\"tx\"} 70",
            "edgelb_gossip_bytes_total{direction=\"rx\"} 0",
            "edgelb_gossip_peer_report_age_seconds{peer=\"2\"} 0.04",
            "edgelb_gossip_peer_report_age_seconds{peer=\"3\"} 2",
            "# HELP edgelb_gossip_peer_report_age_seconds ",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        // A peer that leaves loses its series.
        g.set_report_ages(&[(3, Duration::from_secs(1))]);
        let text = metrics.render(&RoutingTable::default());
        assert!(!text.contains("peer=\"2\""), "{text}");
        assert!(text.contains("edgelb_gossip_peer_report_age_seconds{peer=\"3\"} 1"));
        assert_eq!(g.dropped_count("identity"), 1);
    }
}
