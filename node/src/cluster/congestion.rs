//! The congestion controller of cluster connections: quinn's Cubic with a
//! floor under its window.
//!
//! A link that drops packets for a while (a flapping or lossy path, a cut
//! that heals before the connection times out) makes Cubic shrink its
//! window, down to two packets after persistent congestion. The packets
//! lost in the cut still count as in flight until QUIC declares them
//! lost, which then takes a probe timeout that doubled with each unanswered
//! probe during the cut: a second or more on a 300 ms link. Until then
//! the window is full and a new Raft call waits, although the link works
//! again: catch-up after such a heal took 1.1–1.5 s where a fresh
//! connection would have caught up in two round trips.
//!
//! Cluster traffic is a few Raft calls in flight per peer (one append
//! stream, heartbeats, a vote) and one gossip report at a time, between a
//! handful of known nodes: it cannot flood a path. So the window never
//! drops below [`FLOOR`], a quarter of the window a fresh connection
//! starts with (`tls::INITIAL_WINDOW`): the first call after a heal goes
//! out at once, its acknowledgement makes QUIC declare the older packets
//! lost and resend them, and Cubic's own window grows from wherever it
//! was cut to.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// The least window a cluster connection keeps, in bytes.
pub(crate) const FLOOR: u64 = 64 * 1024;

/// Builds [`Floored`] Cubic controllers.
#[derive(Debug)]
pub(crate) struct FlooredCubic(Arc<CubicConfig>);

impl FlooredCubic {
    pub(crate) fn new(cubic: CubicConfig) -> Self {
        Self(Arc::new(cubic))
    }
}

impl ControllerFactory for FlooredCubic {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floored(Arc::clone(&self.0).build(now, current_mtu)))
    }
}

/// A controller whose window is its inner one's, but at least [`FLOOR`].
struct Floored(Box<dyn Controller>);

impl Controller for Floored {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.0.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.0
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.0
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.0.window().max(FLOOR)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.0.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self(self.0.clone_box()))
    }

    fn initial_window(&self) -> u64 {
        self.0.initial_window().max(FLOOR)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floored(initial: u64) -> Box<dyn Controller> {
        let mut cubic = CubicConfig::default();
        cubic.initial_window(initial);
        Arc::new(FlooredCubic::new(cubic)).build(Instant::now(), 1200)
    }

    #[test]
    fn persistent_congestion_leaves_the_floor() {
        let mut c = floored(256 * 1024);
        assert_eq!(c.window(), 256 * 1024);
        let now = Instant::now();
        c.on_congestion_event(now, now, true, 100_000);
        // Cubic alone would be at its two-packet minimum.
        assert_eq!(c.window(), FLOOR);
        assert_eq!(c.metrics().congestion_window, FLOOR);
    }

    #[test]
    fn a_window_above_the_floor_is_cubic_s() {
        let mut c = floored(256 * 1024);
        let now = Instant::now();
        // One ordinary loss: Cubic's multiplicative decrease (0.7).
        c.on_congestion_event(now, now, false, 1200);
        let w = c.window();
        assert!(w > FLOOR && w < 256 * 1024, "{w}");
    }
}
