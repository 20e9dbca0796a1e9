//! The token check of `/v1` and `/metrics` with the per-address back-off
//! ([`super::backoff`]), and its series:
//!
//! | series | kind | meaning |
//! | --- | --- | --- |
//! | `edgelb_admin_auth_failures_total` | counter | requests that presented a wrong token |
//! | `edgelb_admin_auth_blocked_addresses` | gauge | client addresses held back now: their requests with a token are answered slowly (set at scrape time) |

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::AUTHORIZATION;
use prometheus::{IntCounter, IntGauge, Registry};
use tracing::warn;

use super::backoff::{AuthBackoff, Backoff};
use super::reply::ApiError;
use super::request::authorized;

/// How long every answer to a request with a token waits while its address
/// is held back: a guesser then makes one guess a second per connection
/// (closing early tells it nothing: right and wrong wait alike), and the
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
                "Client addresses held back after repeated wrong tokens: their requests with a token are answered slowly.",
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

    /// Whether `headers` carry the admin token, or `other` (the metrics
    /// token of `/metrics`), for a request from `peer`: 401 for a missing
    /// or wrong token (SPEC §6). While `peer` is held back for repeated
    /// wrong tokens, every answer to a request that carries a token, right
    /// or wrong, waits [`SLOW_ANSWER`]: a quick answer would tell a guess
    /// right before the wrong ones' wait. The admin token clears the
    /// address's record (the metrics token does not: it opens `/metrics`
    /// only, and must not reset the count of guesses at the admin token).
    pub(crate) async fn check(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        admin: &str,
        other: Option<&str>,
    ) -> Result<(), ApiError> {
        if !headers.contains_key(AUTHORIZATION) {
            return Err(ApiError::unauthorized());
        }
        let now = Instant::now();
        let slowed = self.backoff.slowed(peer, now).is_some();
        let result = if authorized(headers, admin) {
            self.backoff.succeeded(peer);
            Ok(())
        } else if other.is_some_and(|t| authorized(headers, t)) {
            Ok(())
        } else {
            self.failures.inc();
            if let Some(period) = self.backoff.failed(peer, now) {
                warn!(%peer, secs = period.as_secs(), "repeated wrong admin tokens; this address's token requests are answered slowly");
            }
            Err(ApiError::unauthorized())
        };
        if slowed {
            tokio::time::sleep(SLOW_ANSWER).await;
        }
        result
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
