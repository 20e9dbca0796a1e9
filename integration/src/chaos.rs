//! The fault suite: clusters of real nodes behind the link emulator,
//! clients writing and reading while a seeded schedule injects faults, and
//! a checker that reads the history.
//!
//! ```text
//!   writers ─attach/detach/create─▶ random node ┐
//!   reader ──GET ?consistent=true─▶ random node ├─ History ─▶ check() ─▶ Verdict
//!   traffic ─GET / ──────────────▶ every node  ┘      ▲
//!   schedule: kill -9, SIGTERM, restart, isolate, split, loss, flap, WAN
//!             (elections, catch-ups, SIGTERM exits measured as it goes)
//! ```
//!
//! `cargo run --release -p integration --bin chaos -- --runs N --seed S`;
//! [`history`] and [`schedule`] are plain code, [`run`] drives one run.

pub mod history;
pub mod run;
pub mod schedule;
mod workload;

use std::fmt::Write as _;
use std::time::Duration;

pub use run::{RunOptions, RunReport};

/// Limits a run is judged by, besides the history checks.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// New leader after the leader is lost, p99.
    pub election_p99: Duration,
    /// Catch-up after a heal or restart, p99.
    pub catchup_p99: Duration,
    /// A write on a cut-off node is refused within this.
    pub isolated_write: Duration,
    /// A SIGTERM with nothing in flight exits within this.
    pub sigterm: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            election_p99: Duration::from_secs(2),
            catchup_p99: Duration::from_secs(1),
            // The node's 5 s write bound, plus the HTTP exchange.
            isolated_write: Duration::from_millis(5_300),
            sigterm: Duration::from_secs(1),
        }
    }
}

/// The `q` quantile (0 to 1) of `v` (zero when empty).
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((v.len() as f64) * q).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

/// Why `r` (or a set of runs merged into it) fails `limits`; empty when it
/// passes.
pub fn failures(r: &RunReport, limits: &Limits) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &r.error {
        out.push(format!("run aborted: {e}"));
    }
    let v = &r.verdict;
    if !v.lost.is_empty() {
        out.push(format!(
            "{} acked writes lost: {:?}",
            v.lost.len(),
            first(&v.lost)
        ));
    }
    if !v.duplicated.is_empty() {
        out.push(format!(
            "{} duplicated: {:?}",
            v.duplicated.len(),
            first(&v.duplicated)
        ));
    }
    if !v.stale_reads.is_empty() {
        out.push(format!(
            "{} consistent reads went back in time: {:?}",
            v.stale_reads.len(),
            first(&v.stale_reads)
        ));
    }
    if !v.failed_requests.is_empty() {
        out.push(format!(
            "{} failed requests on majority nodes: {:?}",
            v.failed_requests.len(),
            first(&v.failed_requests)
        ));
    }
    if r.no_leader > 0 {
        out.push(format!("{} times no new leader within 20 s", r.no_leader));
    }
    if r.catchup_missed > 0 {
        out.push(format!(
            "{} catch-ups not done within 30 s",
            r.catchup_missed
        ));
    }
    let e99 = quantile(&r.elections, 0.99);
    if e99 > limits.election_p99 {
        out.push(format!(
            "election p99 {} ms > {} ms",
            ms(e99),
            ms(limits.election_p99)
        ));
    }
    let c99 = quantile(&r.catchups, 0.99);
    if c99 > limits.catchup_p99 {
        out.push(format!(
            "catch-up p99 {} ms > {} ms",
            ms(c99),
            ms(limits.catchup_p99)
        ));
    }
    for (took, refused) in &r.isolated_writes {
        if !refused || *took > limits.isolated_write {
            out.push(format!(
                "a write on a cut-off node {} after {} ms",
                if *refused {
                    "was refused"
                } else {
                    "was not refused"
                },
                ms(*took)
            ));
        }
    }
    for (node, took, code) in &r.sigterms {
        if *code != Some(0) || *took > limits.sigterm {
            out.push(format!(
                "SIGTERM to node {node}: exit {code:?} after {} ms",
                ms(*took)
            ));
        }
    }
    out
}

fn first<T: std::fmt::Debug>(v: &[T]) -> &[T] {
    &v[..v.len().min(3)]
}

/// Merges run reports into one total (the lists concatenated).
pub fn total(runs: &[RunReport]) -> RunReport {
    let mut t = RunReport::default();
    for r in runs {
        for (k, n) in &r.faults {
            *t.faults.entry(k.clone()).or_default() += n;
        }
        let (a, b) = (&mut t.verdict, &r.verdict);
        a.acked += b.acked;
        a.refused += b.refused;
        a.unknown += b.unknown;
        a.requests += b.requests;
        a.lost.extend(b.lost.iter().cloned());
        a.duplicated.extend(b.duplicated.iter().cloned());
        a.stale_reads.extend(b.stale_reads.iter().cloned());
        a.failed_requests.extend(b.failed_requests.iter().cloned());
        t.elections.extend(&r.elections);
        t.no_leader += r.no_leader;
        t.catchups.extend(&r.catchups);
        t.catchup_missed += r.catchup_missed;
        t.isolated_writes.extend(&r.isolated_writes);
        t.sigterms.extend(&r.sigterms);
        if let Some(e) = &r.error {
            t.error = Some(format!("run {}: {e}", r.run));
        }
    }
    t
}

/// The figures of one run (or the total) as a few lines.
pub fn describe(label: &str, r: &RunReport) -> String {
    let v = &r.verdict;
    let mut s = String::new();
    let faults: Vec<String> = r.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        s,
        "{label}: faults injected {} ({})",
        r.faults.values().sum::<usize>(),
        faults.join(", ")
    );
    let _ = writeln!(
        s,
        "  writes acked {} / refused {} / unknown {}; lost {}, duplicated {}; stale consistent reads {}",
        v.acked,
        v.refused,
        v.unknown,
        v.lost.len(),
        v.duplicated.len(),
        v.stale_reads.len()
    );
    let _ = writeln!(
        s,
        "  election ms p50 {} p99 {} max {} (n {}, none {}); catch-up ms p99 {} max {} (n {}, missed {})",
        ms(quantile(&r.elections, 0.5)),
        ms(quantile(&r.elections, 0.99)),
        ms(quantile(&r.elections, 1.0)),
        r.elections.len(),
        r.no_leader,
        ms(quantile(&r.catchups, 0.99)),
        ms(quantile(&r.catchups, 1.0)),
        r.catchups.len(),
        r.catchup_missed
    );
    let iso: Vec<Duration> = r.isolated_writes.iter().map(|(t, _)| *t).collect();
    let accepted = r
        .isolated_writes
        .iter()
        .filter(|(_, refused)| !refused)
        .count();
    let _ = writeln!(
        s,
        "  client requests {}, failed on majority nodes {}; writes on cut-off nodes {}, \
         {accepted} not refused, answered in ms max {}",
        v.requests,
        v.failed_requests.len(),
        iso.len(),
        ms(quantile(&iso, 1.0))
    );
    let times: Vec<Duration> = r.sigterms.iter().map(|(_, t, _)| *t).collect();
    let not_zero = r.sigterms.iter().filter(|(_, _, c)| *c != Some(0)).count();
    let _ = write!(
        s,
        "  SIGTERM {} sent, {not_zero} not exiting 0; exit ms p50 {} p99 {} max {}",
        r.sigterms.len(),
        ms(quantile(&times, 0.5)),
        ms(quantile(&times, 0.99)),
        ms(quantile(&times, 1.0))
    );
    if r.sigterms.len() <= 10 {
        let each: Vec<String> = r
            .sigterms
            .iter()
            .map(|(n, t, c)| {
                let code = c.map_or_else(|| "none".to_owned(), |c| c.to_string());
                format!("n{n}:{}ms/exit {code}", ms(*t))
            })
            .collect();
        let _ = write!(s, " [{}]", each.join(" "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn limits_flag_slow_sigterms_and_accepted_cut_off_writes() {
        let limits = Limits::default();
        let mut r = RunReport::default();
        assert!(failures(&r, &limits).is_empty());
        r.sigterms.push((1, Duration::from_millis(200), Some(0)));
        r.isolated_writes.push((Duration::from_secs(5), true));
        assert!(failures(&r, &limits).is_empty());
        r.sigterms.push((2, Duration::from_secs(3), Some(0)));
        r.isolated_writes.push((Duration::from_millis(10), false));
        assert_eq!(
            failures(&r, &limits).len(),
            2,
            "{:?}",
            failures(&r, &limits)
        );
        let t = total(&[r.clone(), r]);
        assert_eq!(t.sigterms.len(), 4);
    }
}
