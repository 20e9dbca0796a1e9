//! `GET /metrics`: the Prometheus text format, gzip-compressed when the
//! scraper accepts it (Prometheus does). Rendering runs on a blocking
//! thread: at 100,000 instances it is tens of megabytes of text.

use std::io::Write as _;
use std::sync::Arc;

use flate2::Compression;
use flate2::write::GzEncoder;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use http::{HeaderMap, HeaderValue, StatusCode};
use tracing::warn;

use super::Admin;
use super::reply::{ApiError, Reply, with_type};
use crate::metrics::Metrics;
use crate::routing::RoutingTable;

/// The content type of the text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) async fn metrics(admin: &Admin, headers: &HeaderMap) -> Result<Reply, ApiError> {
    admin.metrics.set_cluster(&admin.store.status());
    admin
        .metrics
        .gossip
        .set_report_ages(&admin.gossip.report_ages(std::time::Instant::now()));
    let gzip = accepts_gzip(headers);
    let metrics = admin.metrics.clone();
    let table = admin.dataplane.routes.load_full();
    let body = tokio::task::spawn_blocking(move || render(&metrics, &table, gzip))
        .await
        .map_err(std::io::Error::other)
        .and_then(|rendered| rendered)
        .map_err(|e| {
            warn!(error = %e, "rendering metrics");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed",
            )
        })?;
    let mut reply = with_type(StatusCode::OK, TEXT_FORMAT, body);
    let headers = reply.headers_mut();
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(reply)
}

/// The text of every family, gzip-compressed (fast level: a scrape is
/// mostly repeated names and labels) when `gzip`.
pub(crate) fn render(
    metrics: &Metrics,
    table: &Arc<RoutingTable>,
    gzip: bool,
) -> std::io::Result<Vec<u8>> {
    if !gzip {
        let mut text = Vec::new();
        metrics.render_to(table, &mut text)?;
        return Ok(text);
    }
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    metrics.render_to(table, &mut encoder)?;
    encoder.flush()?;
    encoder.finish()
}

/// Whether `Accept-Encoding` lists `gzip` (or `*`) with a non-zero weight.
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default();
            let weight = parts
                .find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .map_or(Some(1.0), |q| q.parse::<f32>().ok());
            (coding.eq_ignore_ascii_case("gzip") || coding == "*")
                && weight.is_some_and(|q| q > 0.0)
        })
}
