//! Patience for the unit tests that wait in real time: those over real
//! sockets (HTTP on loopback, QUIC between in-process nodes, the admin API),
//! where tokio's paused clock would run ahead of the kernel. Time-driven
//! logic without I/O is tested on the paused clock instead, and waits for
//! nothing.
//!
//! The rule is the integration harness's (`integration::patience`): every
//! deadline is multiplied by `EDGELB_TEST_PATIENCE` (a positive number,
//! 1 when unset or unreadable), so one variable stretches the unit and the
//! process-level tests alike on a slow machine.

use std::time::Duration;

/// The multiplier, from `EDGELB_TEST_PATIENCE`.
fn patience() -> f64 {
    std::env::var("EDGELB_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| p.is_finite() && *p > 0.0)
        .unwrap_or(1.0)
}

/// `base` scaled by `EDGELB_TEST_PATIENCE`.
pub(crate) fn patient(base: Duration) -> Duration {
    base.mul_f64(patience())
}
