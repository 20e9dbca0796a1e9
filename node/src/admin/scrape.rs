//! `GET /metrics`: the Prometheus text format, gzip-compressed when the
//! scraper accepts it (Prometheus does). The body is rendered on a blocking
//! thread and streamed in chunks as it is produced: at 100,000 instances it
//! is about 320 MB of text (14 MB gzipped), which the node never holds
//! whole.

use std::io::{self, BufWriter, Write};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::Either;
use tokio::sync::mpsc;
use tracing::debug;

use super::Admin;
use super::reply::{Chunks, Reply};
use crate::metrics::Metrics;
use crate::routing::RoutingTable;

/// The content type of the text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bytes per streamed chunk.
const CHUNK: usize = 256 * 1024;

/// Chunks rendered ahead of the connection.
const AHEAD: usize = 4;

pub(super) fn metrics(admin: &Admin, headers: &HeaderMap) -> Reply {
    admin.metrics.set_cluster(&admin.store.status());
    admin.guard.set_gauges();
    admin
        .metrics
        .gossip
        .set_report_ages(&admin.gossip.report_ages(std::time::Instant::now()));
    let gzip = accepts_gzip(headers);
    let metrics = admin.metrics.clone();
    let table = admin.dataplane.routes.load_full();
    let (tx, rx) = mpsc::channel(AHEAD);
    tokio::task::spawn_blocking(move || {
        let sink = BufWriter::with_capacity(CHUNK, Sink(tx));
        if let Err(e) = render(&metrics, &table, gzip, sink) {
            debug!(error = %e, "metrics scrape ended early");
        }
    });
    let mut reply = Response::new(Either::Right(Chunks(rx)));
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    reply
}

/// Writes the text of every family to `out`, gzip-compressed (fast level,
/// unchanged blocks of samples reused: [`Metrics::render_gzip_to`]) when
/// `gzip`.
pub(crate) fn render(
    metrics: &Metrics,
    table: &Arc<RoutingTable>,
    gzip: bool,
    mut out: impl Write,
) -> io::Result<()> {
    if gzip {
        metrics.render_gzip_to(table, &mut out)?;
        out.flush()
    } else {
        metrics.render_to(table, &mut out)?;
        out.flush()
    }
}

/// Hands each write to the response body as one chunk; fails once the
/// scraper went away.
struct Sink(mpsc::Sender<Bytes>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the scraper went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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
