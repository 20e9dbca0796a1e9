//! Patience for the tests that wait in real time: the unit tests over real
//! sockets (HTTP on loopback, QUIC between in-process nodes, the admin API),
//! where tokio's paused clock would run ahead of the kernel, and the
//! integration harness, which re-exports these. Time-driven logic without
//! I/O is tested on the paused clock instead, and waits for nothing.
//!
//! Every deadline is multiplied by `EDGELB_TEST_PATIENCE` (a positive
//! number, 1 when unset or unreadable), so one variable stretches the unit
//! and the process-level tests alike on a slow machine.

use std::time::Duration;

/// The multiplier, from `EDGELB_TEST_PATIENCE`.
pub fn patience() -> f64 {
    std::env::var("EDGELB_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| p.is_finite() && *p > 0.0)
        .unwrap_or(1.0)
}

/// `base` scaled by `EDGELB_TEST_PATIENCE`.
pub fn patient(base: Duration) -> Duration {
    base.mul_f64(patience())
}
