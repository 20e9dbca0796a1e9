//! Bounded HTTP load loops for churn tests and measurements: kept-alive
//! connections and one request per connection, counting every answer that
//! is not a 200 as a failure; and the resident set size of a process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONNECTION;
use http::{HeaderValue, StatusCode};
use http_body_util::Full;

use crate::client::{self, HttpConn, get_request};

/// What the load loops saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The first ten failures, described.
    pub first_failures: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    pub fn record(&self, outcome: anyhow::Result<client::Reply>) {
        let why = match outcome {
            Ok(r) if r.status == StatusCode::OK => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(r) => format!("{} from {:?}: {}", r.status, r.backend(), r.text()),
            Err(e) => format!("{e:#}"),
        };
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.len() < 10 {
            first.push(why);
        }
    }
}

/// Requests on one kept-alive connection until `stop` (each bounded by
/// 10 s).
pub async fn keep_alive(addr: SocketAddr, host: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut conn = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.as_ref().is_none_or(HttpConn::is_closed) {
            match HttpConn::connect(addr).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tally.record(Err(e));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let reply = tokio::time::timeout(Duration::from_secs(10), c.get(&host, "/")).await;
        tally.record(reply.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s"))));
    }
}

/// One request per connection (`Connection: close`) until `stop`, from
/// source addresses taken in turn from `sources`, so that closed
/// connections waiting out TIME_WAIT never exhaust one address's ports.
pub async fn connection_close(
    addr: SocketAddr,
    host: String,
    sources: Vec<IpAddr>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        let source = sources[next % sources.len()];
        next += 1;
        let one = async {
            let mut conn = HttpConn::connect_from(addr, Some(source)).await?;
            let mut req = get_request(&host, "/");
            req.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            conn.send(req.map(|b: Full<Bytes>| b)).await
        };
        let reply = tokio::time::timeout(Duration::from_secs(10), one).await;
        tally.record(reply.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s"))));
    }
}

/// Resident set size of process `pid` (this one for `None`), in KiB (0 where /proc is missing).
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |p| format!("/proc/{p}/status"),
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms, the Linux default); zero when
/// it cannot be read.
pub fn cpu_time(pid: u32) -> Duration {
    const TICK: Duration = Duration::from_millis(10);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count from after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u32 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u32>().ok())
        .sum();
    TICK * ticks
}

impl Tally {
    /// The first failures, for a report.
    pub fn failures(&self) -> Vec<String> {
        self.first_failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }
}

/// `pairs` keep-alive loops and `pairs` connection-close loops against
/// `addr` (each close loop from 16 source addresses `source` hands out),
/// until `stop`.
pub fn mixed(
    addr: SocketAddr,
    host: &str,
    pairs: usize,
    mut source: impl FnMut() -> IpAddr,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut loops = Vec::new();
    for _ in 0..pairs {
        loops.push(tokio::spawn(keep_alive(
            addr,
            host.to_owned(),
            stop.clone(),
            tally.clone(),
        )));
        let sources = (0..16).map(|_| source()).collect();
        loops.push(tokio::spawn(connection_close(
            addr,
            host.to_owned(),
            sources,
            stop.clone(),
            tally.clone(),
        )));
    }
    loops
}

/// Stops the loops [`mixed`] started and waits for each (30 s at most).
pub async fn stop(
    stop: &AtomicBool,
    loops: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        tokio::time::timeout(Duration::from_secs(30), l)
            .await
            .context("a load loop did not stop")??;
    }
    Ok(())
}
