//! The token check of `/v1` and `/metrics` with the per-address back-off
//! ([`super::backoff`]), and its series:
//!
//! | series | kind | meaning |
//! | --- | --- | --- |
//! | `edgelb_admin_auth_failures_total` | counter | requests that presented a wrong token |
//! | `edgelb_admin_auth_blocked_addresses` | gauge | client addresses answered 429 now (set at scrape time) |
//!
//! Requests refused while blocked are counted by
//! `edgelb_admin_requests_total{code="429"}`.

use std::net::IpAddr;
use std::time::Instant;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use prometheus::{IntCounter, IntGauge, Registry};
use tracing::warn;

use super::backoff::{AuthBackoff, Backoff};
use super::reply::ApiError;
use super::request::authorized;

/// Checks tokens and remembers who got them wrong.
#[derive(Debug)]
pub(crate) struct Guard {
    backoff: Backoff,
    failures: IntCounter,
    blocked: IntGauge,
}

impl Guard {
    /// A guard with `settings`, its series registered in `registry` (a
    /// registry that already has them keeps its own; these then count
    /// unseen).
    pub(crate) fn new(settings: AuthBackoff, registry: &Registry) -> Self {
        let guard = Self {
            backoff: Backoff::new(settings),
            failures: counter(
                "edgelb_admin_auth_failures_total",
                "Admin API and /metrics requests that presented a wrong bearer token.",
            ),
            blocked: gauge(
                "edgelb_admin_auth_blocked_addresses",
                "Client addresses answered 429 for repeated wrong tokens now.",
            ),
        };
        for c in [
            Box::new(guard.failures.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(guard.blocked.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                warn!(error = %e, "admin auth series not registered");
            }
        }
        guard
    }

    /// Whether `headers` carry one of `tokens` for a request from `peer`:
    /// 429 while `peer` is blocked (whatever the token), 401 for a missing
    /// or wrong token.
    pub(crate) fn check(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        tokens: &[&str],
    ) -> Result<(), ApiError> {
        let now = Instant::now();
        if let Some(left) = self.backoff.blocked(peer, now) {
            return Err(ApiError::blocked(left));
        }
        if tokens.iter().any(|t| authorized(headers, t)) {
            self.backoff.succeeded(peer);
            return Ok(());
        }
        if headers.contains_key(AUTHORIZATION) {
            self.failures.inc();
            if let Some(block) = self.backoff.failed(peer, now) {
                warn!(%peer, block_secs = block.as_secs(), "repeated wrong admin tokens; address blocked");
            }
        }
        Err(ApiError::unauthorized())
    }

    /// Sets the scrape-time gauge.
    pub(crate) fn set_gauges(&self) {
        let n = self.backoff.blocked_count(Instant::now());
        self.blocked.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

// The names and help texts are valid constants.
const VALID: &str = "a valid metric name and help text";

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect(VALID)
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect(VALID)
}
