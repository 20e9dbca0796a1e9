//! The token check of `/v1` and `/metrics` with the per-address back-off
//! ([`super::backoff`]), and its series:
//!
//! | series | kind | meaning |
//! | --- | --- | --- |
//! | `edgelb_admin_auth_failures_total` | counter | requests that presented a wrong token |
//! | `edgelb_admin_auth_blocked_addresses` | gauge | client addresses whose wrong tokens are answered slowly now (set at scrape time) |

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::AUTHORIZATION;
use prometheus::{IntCounter, IntGauge, Registry};
use tracing::warn;

use super::backoff::{AuthBackoff, Backoff};
use super::reply::ApiError;
use super::request::authorized;

/// How long a wrong token's 401 waits while its address is held back: a
/// guesser then makes one guess a second per connection, and the
/// per-address connection limit bounds its connections.
pub(crate) const SLOW_ANSWER: Duration = Duration::from_secs(1);

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
                "Client addresses whose wrong tokens are answered slowly now, after repeated wrong tokens.",
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
    /// 401 for a missing or wrong token (SPEC §6), a wrong one answered
    /// only after [`SLOW_ANSWER`] while `peer` is held back for repeated
    /// wrong tokens. A right token is served at once, and clears the
    /// address's record.
    pub(crate) async fn check(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        tokens: &[&str],
    ) -> Result<(), ApiError> {
        if tokens.iter().any(|t| authorized(headers, t)) {
            self.backoff.succeeded(peer);
            return Ok(());
        }
        if !headers.contains_key(AUTHORIZATION) {
            return Err(ApiError::unauthorized());
        }
        self.failures.inc();
        let now = Instant::now();
        let slowed = self.backoff.slowed(peer, now).is_some();
        if let Some(period) = self.backoff.failed(peer, now) {
            warn!(%peer, secs = period.as_secs(), "repeated wrong admin tokens; this address's wrong tokens are answered slowly");
        }
        if slowed {
            tokio::time::sleep(SLOW_ANSWER).await;
        }
        Err(ApiError::unauthorized())
    }

    /// Sets the scrape-time gauge.
    pub(crate) fn set_gauges(&self) {
        let n = self.backoff.slowed_count(Instant::now());
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
