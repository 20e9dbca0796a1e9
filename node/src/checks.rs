//! Active health checks of instances (a group's `health_check`), as HAProxy
//! runs `check inter … rise … fall …`: every node checks every instance of
//! such a group on its own, every `interval_ms`, with a TCP connect or an
//! HTTP `GET path` whose status must be in `expect`. `fall` consecutive
//! failures take the instance out of selection on this node, `rise`
//! consecutive successes bring it back; nothing is replicated. An instance
//! starts up (checks begin at once, spread over the first interval).
//!
//! Passive marking stays: a failed connect still takes an instance down for
//! its backoff, and while the check holds it down a successful connect
//! does not bring it back. When every instance of a group is down the
//! balancer offers all of them again (the passive rule's fail-open), so a
//! group whose checks all fail still answers.
//!
//! One task per checked instance, on the control plane's runtime; the set
//! follows the routing table ([`Checks::reconcile`]).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts};
use raft_store::State;
use raft_store::model::{CheckKind, HealthCheck, ServiceGroup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::balancer::Backend;
use crate::routing::{Changes, RoutingTable};

/// The checks running, by group.
#[derive(Debug)]
pub struct Checks {
    groups: HashMap<Uuid, GroupChecks>,
    counters: Counters,
}

#[derive(Clone, Debug)]
struct Counters {
    /// `edgelb_health_checks_total{result}`
    checks: IntCounterVec,
    /// `edgelb_health_check_transitions_total{to}`
    transitions: IntCounterVec,
}

#[derive(Debug)]
struct GroupChecks {
    check: HealthCheck,
    port: u16,
    /// By instance uuid: its backend and the token that stops its task.
    instances: HashMap<Uuid, (Weak<Backend>, CancellationToken)>,
}

impl Drop for GroupChecks {
    fn drop(&mut self) {
        for (_, token) in self.instances.values() {
            token.cancel();
        }
    }
}

impl GroupChecks {
    /// Stops every check and gives the instances back to passive marking
    /// (the group's check was removed, or the group deleted).
    fn release(self) {
        for (weak, token) in self.instances.values() {
            token.cancel();
            if let Some(b) = weak.upgrade() {
                crate::balancer::set_checked(&b, true);
            }
        }
    }
}

impl Checks {
    /// No checks yet; the counters registered in `registry`.
    pub fn new(registry: &prometheus::Registry) -> Self {
        let vec = |name: &str, help: &str, label: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label])
                .expect("a valid metric name and help text");
            if let Err(error) = registry.register(Box::new(v.clone())) {
                warn!(%error, name, "health check metric not registered");
            }
            v
        };
        Self {
            groups: HashMap::new(),
            counters: Counters {
                checks: vec(
                    "edgelb_health_checks_total",
                    "Active health checks of instances this node ran, by result (pass, fail).",
                    "result",
                ),
                transitions: vec(
                    "edgelb_health_check_transitions_total",
                    "Instances the active health checks took out of selection (to=\"down\") or brought back (to=\"up\") on this node.",
                    "to",
                ),
            },
        }
    }

    /// Starts, restarts and stops checks after the routing table was
    /// rebuilt from `state` for `changes`: a task per instance of every
    /// group with a `health_check`.
    pub fn reconcile(&mut self, state: &State, table: &RoutingTable, changes: &Changes) {
        let uuids: Vec<Uuid> = match changes {
            Changes::All => {
                let mut all: Vec<Uuid> = table.groups().map(|g| g.uuid).collect();
                all.extend(self.groups.keys().copied());
                all.sort_unstable();
                all.dedup();
                all
            }
            Changes::Groups(set) | Changes::Certificates { groups: set, .. } => {
                set.iter().copied().collect()
            }
        };
        for uuid in uuids {
            let desired = state.group_by_uuid(&uuid).and_then(|g| {
                Some((
                    HealthCheck::clone(g.health_check.as_deref()?),
                    check_port(g)?,
                ))
            });
            let runtime = table.group(&uuid);
            let (Some((check, port)), Some(runtime)) = (desired, runtime) else {
                if let Some(g) = self.groups.remove(&uuid) {
                    g.release();
                }
                continue;
            };
            let same = self
                .groups
                .get(&uuid)
                .is_some_and(|g| g.check == check && g.port == port);
            if !same {
                // Replaced: the new tasks go on from each instance's state.
                self.groups.insert(
                    uuid,
                    GroupChecks {
                        check: check.clone(),
                        port,
                        instances: HashMap::new(),
                    },
                );
            }
            let Some(group) = self.groups.get_mut(&uuid) else {
                continue;
            };
            group.instances.retain(|id, (weak, token)| {
                let kept = runtime
                    .backends
                    .get(id)
                    .is_some_and(|b| std::ptr::eq(Arc::as_ptr(b), weak.as_ptr()));
                if !kept {
                    token.cancel();
                }
                kept
            });
            for (id, backend) in &runtime.backends {
                if group.instances.contains_key(id) {
                    continue;
                }
                let token = CancellationToken::new();
                tokio::spawn(run(
                    Arc::downgrade(backend),
                    check.clone(),
                    port,
                    self.counters.clone(),
                    token.clone(),
                ));
                group
                    .instances
                    .insert(*id, (Arc::downgrade(backend), token));
            }
        }
    }
}

/// The instances' port a group's check connects to.
fn check_port(group: &ServiceGroup) -> Option<u16> {
    let check = group.health_check.as_ref()?;
    check
        .port
        .or_else(|| group.services.first().map(|s| s.destination_port))
}

/// Checks one instance until `stop` (whoever stops it decides what
/// becomes of the instance's state: see [`GroupChecks::release`]).
async fn run(
    backend: Weak<Backend>,
    check: HealthCheck,
    port: u16,
    counters: Counters,
    stop: CancellationToken,
) {
    let interval = Duration::from_millis(check.interval_ms);
    // Spread over the first interval: a group's instances (and the nodes)
    // do not check in step.
    let first = interval.mul_f64(rand::random::<f64>());
    let mut next = tokio::time::Instant::now() + first;
    let (mut passes, mut fails) = (0_u32, 0_u32);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next) => {}
        }
        next += interval;
        let Some(b) = backend.upgrade() else { return };
        let result = probe(&b.address, port, &check).await;
        if stop.is_cancelled() {
            // Replaced or removed while probing: the outcome is not ours to
            // apply any more.
            break;
        }
        counters
            .checks
            .with_label_values(&[if result.is_ok() { "pass" } else { "fail" }])
            .inc();
        // The backend's own state: a check that replaced another goes on
        // from what that one decided.
        let up = !b.checked_down();
        match result {
            Ok(()) => {
                passes += 1;
                fails = 0;
                if !up && passes >= check.rise {
                    crate::balancer::set_checked(&b, true);
                    counters.transitions.with_label_values(&["up"]).inc();
                    info!(instance = %b.name, address = %b.address, port, "health check: up");
                }
            }
            Err(why) => {
                fails += 1;
                passes = 0;
                if up && fails >= check.fall {
                    crate::balancer::set_checked(&b, false);
                    counters.transitions.with_label_values(&["down"]).inc();
                    warn!(instance = %b.name, address = %b.address, port, %why, "health check: down");
                }
            }
        }
        // A check slower than the interval starts the next one at once,
        // not in a burst.
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
    }
}

/// One check of `address:port`, bounded by `timeout_ms`.
async fn probe(address: &str, port: u16, check: &HealthCheck) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout_ms);
    match tokio::time::timeout(timeout, probe_now(address, port, check)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", check.timeout_ms)),
    }
}

/// The longest status line read.
const MAX_STATUS_LINE: usize = 1024;

async fn probe_now(address: &str, port: u16, check: &HealthCheck) -> Result<(), String> {
    let host = address.trim_start_matches('[').trim_end_matches(']');
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let path = check.path.as_deref().unwrap_or("/");
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: edgelb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0_u8; 256];
    let line_end = loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err("no status line in the first 1024 bytes".into());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP status line: {line:?}"))?;
    let (lo, hi) = check.expected()?;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}, expected {lo}-{hi}"))
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    fn http(expect: Option<&str>) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Http,
            path: Some("/healthz?full=1".into()),
            expect: expect.map(str::to_owned),
            port: None,
            interval_ms: 100,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
        }
    }

    /// A server that answers each connection with `answer` once it has
    /// read a request head, and reports the head.
    async fn server(answer: &'static str) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0_u8; 512];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn http_checks_pass_on_an_expected_status_and_fail_otherwise() {
        let (ok, mut heads) = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        probe("127.0.0.1", ok, &http(None)).await.unwrap();
        let head = heads.recv().await.unwrap();
        assert!(
            head.starts_with("GET /healthz?full=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nHost: 127.0.0.1:{ok}\r\n")),
            "{head}"
        );
        let (bad, _) = server("HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        let why = probe("127.0.0.1", bad, &http(None)).await.unwrap_err();
        assert_eq!(why, "status 500, expected 200-399");
        probe("127.0.0.1", bad, &http(Some("500"))).await.unwrap();
        let (junk, _) = server("SSH-2.0-OpenSSH\r\n").await;
        let why = probe("127.0.0.1", junk, &http(None)).await.unwrap_err();
        assert!(why.starts_with("not an HTTP status line"), "{why}");
    }

    #[tokio::test]
    async fn tcp_checks_pass_on_a_connect_and_time_out_on_silence() {
        let (port, _) = server("").await;
        let tcp = HealthCheck {
            kind: CheckKind::Tcp,
            path: None,
            expect: None,
            ..http(None)
        };
        probe("127.0.0.1", port, &tcp).await.unwrap();
        // Nothing listens on port 1 of this address.
        let why = probe("127.0.0.1", 1, &tcp).await.unwrap_err();
        assert!(why.starts_with("connect: "), "{why}");
        // A server that never answers: the timeout.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let why = probe("127.0.0.1", port, &http(None)).await.unwrap_err();
        assert_eq!(why, "no answer within 500 ms");
        drop(silent);
    }
}
