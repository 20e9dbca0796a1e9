//! End-to-end test harness for edgelb: real nodes and real sockets on
//! loopback.
//!
//! ```text
//!   test ──admin client──▶ TestNode (in-process edgelb::app) ──▶ HttpBackend / EchoBackend
//!     │                       ▲ published ports on 127.A.N.1     on 127.A.N.2..=250
//!     └──HttpConn / raw / tls─┘
//!
//!   test ──AdminClient──▶ Cluster: edgelb processes, one /24 each ──▶ HttpBackends on their own /24
//!     │                     node 1 founds, nodes 2.. --join; kill9 / stop / restart
//!     └──HttpConn to any node's published ports; quic outsider (Raft or gossip ALPN) on :7071
//! ```
//!
//! Every [`TestNode`] and every [`Cluster`] member gets its own loopback /24
//! ([`Subnet`]): the node binds `.1` and its backends take `.2` to `.250`,
//! so tests can use fixed port numbers and still run in parallel. Waits poll
//! a condition with a deadline ([`wait_until`], [`poll`]) scaled by
//! `EDGELB_TEST_PATIENCE` (a float, default 1) for slow machines; nothing
//! sleeps blindly.
//!
//! Modules: [`addr`] (loopback addresses), [`admin`] (requests through
//! `edgelb-api`'s admin client, JSON answers),
//! [`node`] (in-process node), [`cluster`] (multi-node clusters of real
//! processes, faults), [`backend`] (HTTP and TCP echo backends), [`client`]
//! (HTTP/1.1 and HTTP/2 clients, raw sockets), [`tls`] (TLS client that
//! accepts any certificate and shows which one was served), [`quic`] (an
//! outsider on a node's cluster port), [`relay`] and [`link`] (the link
//! emulator between cluster members: delay, jitter, loss, cuts per
//! directed link), [`metrics`] (Prometheus text
//! parsing, `promtool`), [`process`] (the `edgelb` binary), [`compat`]
//! (an earlier commit's `edgelb`, built from the history), [`stats`]
//! (chi-square).
//!
//! The scenarios live in `tests/<area>/main.rs`: `balancing` (least
//! in-flight with uniform ties, detach and drain, refused instances),
//! `http` (redirects, forwarding headers, keep-alive, streaming, upgrades,
//! error answers and timeouts), `tls` (SNI, certificates, HTTP/2),
//! `tcp` (per-connection balancing, drain, hard limit), `admin` (auth,
//! limits, envelopes, lifecycle), `metrics` (labels, `promtool check
//! metrics`; set `EDGELB_REQUIRE_PROMTOOL=1` to fail instead of skip when
//! promtool is missing), `process` (the real binary: exit codes,
//! configuration precedence, SIGTERM, the stored token) and `cluster`
//! (Raft replication across processes: writes through followers, leader
//! kill -9, restarts, lost quorum, snapshots for late joiners, voters and
//! learners, mutual TLS on the cluster port; `EDGELB_TEST_LOG` sets the
//! nodes' `--log`) and `gossip` (one node's in-flight work steering
//! another's picks, a killed node's load fading within the TTL, outsiders
//! and impostors on the gossip ALPN, report ages in the cluster view and
//! metrics), `links` (a leader cut off through the link emulator and
//! through nftables; a 150 ms WAN) and `routing` (the next request after a
//! write's answer sees it, 200 attach/detach rounds through a follower;
//! attach/detach churn under keep-alive and connection-close load,
//! `EDGELB_CHURN_SECS` long) and `upgrade` (a data dir of format 1 on the
//! current binary, a rolling upgrade of three nodes from it, the frame
//! version of the cluster ALPN) and `identity` (one token per cluster, no
//! certificates for members, a removed node's certificate and impostor Raft
//! ids refused, a crash during the first start). `examples/raft_latency.rs` measures write
//! latency and throughput of a 3-node cluster.

pub mod addr;
pub mod admin;
pub mod backend;
pub mod chaos;
pub mod client;
pub mod cluster;
pub mod compat;
pub mod link;
pub mod load;
pub mod metrics;
pub mod node;
pub mod process;
pub mod quic;
pub mod relay;
pub mod stats;
pub mod tls;
pub mod wan;

use std::future::Future;
use std::time::{Duration, Instant};

pub use addr::{Subnet, TempDir};
pub use admin::{AdminClient, Group};
pub use backend::{EchoBackend, HttpBackend};
pub use client::{HttpConn, Reply};
pub use cluster::{Cluster, ClusterOptions};
pub use link::Link;
pub use node::{NodeOptions, TestNode};
pub use relay::Relay;

/// The multiplier for every deadline (`EDGELB_TEST_PATIENCE`, default 1)
/// and a deadline scaled by it: the node's own rule, which its unit tests
/// use too.
pub use edgelb::patience::{patience, patient};

/// Polls `cond` every few milliseconds until it holds; fails naming `what`
/// once `timeout` (scaled by [`patience`]) has passed.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + patient(timeout);
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {:?} waiting for {what}", patient(timeout));
        }
        // A bounded settle between polls, never a wait for the outcome itself.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `probe` every few milliseconds until it returns `Ok`, and returns
/// that; an `Err` means "not yet" and says why. Fails naming `what` and the
/// last reason once `timeout` (scaled by [`patience`]) has passed.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + patient(timeout);
    loop {
        let last = match probe().await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {:?} waiting for {what}; last: {last:#}",
                patient(timeout)
            );
        }
        // A bounded settle between polls, never a wait for the outcome itself.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `fut` with a deadline (scaled by [`patience`]), naming `what` when it
/// passes.
pub async fn within<T>(
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(patient(timeout), fut)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {:?}: {what}", patient(timeout)))
}
