//! What load gossip costs on the wire, per peer.
//!
//! `cargo run --release -p edgelb --example gossip_bytes [-- --seconds S]`
//!
//! 1. Report sizes for 10, 1,000 and 10,000 instances with work in flight
//!    (38 bytes + 32 per such instance; idle instances cost nothing), and
//!    what that makes per peer at heartbeats only (one report per
//!    `gossip_interval`, 100 ms) and at the most the sender sends while
//!    counts keep changing (one per `gossip_min_interval`, 5 ms).
//! 2. The same, live: two in-process nodes gossiping over QUIC on
//!    127.0.0.1, node 1 holding one request on every instance; the rate of
//!    `edgelb_gossip_bytes_total{direction="tx"}` on node 1, first with no
//!    change (heartbeats), then with a pick and a release every 0.2 ms.
//!
//! Bytes are report payloads, as the metric counts them; QUIC adds its
//! packet overhead (about 40 bytes per datagram, ~4 % on streams).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use edgelb::balancer::{LoadChanged, Pick};
use edgelb::cluster::{
    HandlerFuture, NodeTls, RaftHandler, Rpc, RpcReply, Transport, generate_ca, issue_node_cert,
};
use edgelb::dataplane::{DataPlane, Settings};
use edgelb::gossip::{Gossip, GossipTasks, Peer, Peers, Wiring, spawn};
use edgelb::metrics::Metrics;
use edgelb::routing::{BuildContext, GroupRuntime, publish};
use edgelb::tls::CertCache;
use raft_store::model::{Domain, Handler, Instance, Service, ServiceGroup};
use raft_store::{Command, State};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SIZES: [usize; 3] = [10, 1_000, 10_000];

struct NoRaft;

impl RaftHandler for NoRaft {
    fn handle(&self, _from: u64, _rpc: Rpc) -> HandlerFuture<'_> {
        Box::pin(async { RpcReply::Error("no raft here".into()) })
    }
}

fn state(instances: usize) -> State {
    let group = ServiceGroup {
        uuid: Uuid::from_u128(0xfeed),
        name: "web".into(),
        domains: vec![Domain {
            fqdn: "web.edgelb.local".into(),
            certificate: None,
        }],
        services: vec![Service {
            port: 8080,
            destination_port: 9000,
            handlers: vec![Handler::Http],
        }],
        hard_limit: 65535,
        instances: (0..instances)
            .map(|i| Instance {
                uuid: Uuid::from_u128(i as u128 + 1),
                name: format!("i-{i}"),
                address: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32)).to_string(),
            })
            .collect(),
        created_at: "2025-01-01T00:00:00Z".into(),
        persistent: false,
        health_check: None,
        send_proxy_protocol: None,
    };
    let mut state = State::default();
    state
        .apply(&Command::CreateGroup { group })
        .expect("valid group");
    state
}

struct Node {
    transport: Arc<Transport>,
    gossip: Arc<Gossip>,
    dataplane: Arc<DataPlane>,
    metrics: Arc<Metrics>,
    changed: Arc<LoadChanged>,
}

impl Node {
    fn new(tls: &NodeTls, id: u64, instances: usize) -> anyhow::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let transport = Arc::new(Transport::bind(addr, tls, id, Arc::new(NoRaft))?);
        let metrics = Arc::new(Metrics::new());
        let dataplane = Arc::new(DataPlane::new(Settings::default()));
        let changed = Arc::new(LoadChanged::default());
        let certs = CertCache::default();
        let cx = BuildContext {
            certs: &certs,
            drain_timeout: Duration::from_secs(1),
            load_changed: Some(&changed),
        };
        publish(&dataplane.routes, &state(instances), &cx);
        let gossip = Arc::new(Gossip::new(
            id,
            gossip::Config::default(),
            dataplane.clone(),
            metrics.clone(),
        ));
        Ok(Self {
            transport,
            gossip,
            dataplane,
            metrics,
            changed,
        })
    }

    fn start(&self, peer: u64, addr: String) -> (GossipTasks, watch::Sender<Peers>) {
        let region = "local".to_owned();
        let peers = Peers::from([(peer, Peer { addr, region })]);
        let (tx, rx) = watch::channel(peers);
        let wiring = Wiring {
            transport: self.transport.clone(),
            peers: rx,
            load_changed: self.changed.clone(),
            incarnation: 1,
            region: "local".to_owned(),
        };
        let tasks = spawn(self.gossip.clone(), wiring, CancellationToken::new());
        (tasks, tx)
    }

    fn group(&self) -> Arc<GroupRuntime> {
        self.dataplane
            .routes
            .load()
            .group(&Uuid::from_u128(0xfeed))
            .cloned()
            .expect("the group")
    }

    fn tx(&self) -> (u64, u64) {
        let g = &self.metrics.gossip;
        (g.bytes_tx.get(), g.sent.get())
    }
}

fn tls(ca: &edgelb::cluster::CaBundle, id: u64) -> anyhow::Result<NodeTls> {
    let (cert_pem, key_pem) = issue_node_cert(ca, id)?;
    Ok(NodeTls {
        ca_cert_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    })
}

/// Bytes/s and reports/s of node 1's tx counters over `window`.
async fn rate(node: &Node, window: Duration) -> (f64, f64) {
    let (b0, r0) = node.tx();
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let (b1, r1) = node.tx();
    let s = start.elapsed().as_secs_f64();
    ((b1 - b0) as f64 / s, (r1 - r0) as f64 / s)
}

fn human(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e6 {
        format!("{:.1} MB/s", bytes_per_s / 1e6)
    } else if bytes_per_s >= 1e3 {
        format!("{:.1} kB/s", bytes_per_s / 1e3)
    } else {
        format!("{bytes_per_s:.0} B/s")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map_or(Ok(3.0), |s| s.parse())?;
    let window = Duration::from_secs_f64(seconds);
    let config = gossip::Config::default();
    let heartbeats = 1.0 / config.interval.as_secs_f64();
    let max_rate = 1.0 / config.min_interval.as_secs_f64();

    println!("Report size and bytes per peer (payload), by instances with work in flight:\n");
    println!(
        "| instances | bytes/report | carried as | heartbeats only ({heartbeats:.0}/s) | counts changing ({max_rate:.0}/s) |"
    );
    println!("| ---: | ---: | --- | ---: | ---: |");
    for n in SIZES {
        let len = gossip::HEADER_LEN + n * gossip::ENTRY_LEN;
        let via = if len <= gossip::DATAGRAM_MAX {
            "datagram"
        } else {
            "stream"
        };
        println!(
            "| {n} | {len} | {via} | {} | {} |",
            human(len as f64 * heartbeats),
            human(len as f64 * max_rate)
        );
    }

    println!("\nLive, node 1 → node 2 over QUIC on 127.0.0.1, {seconds} s per figure:\n");
    println!("| instances | heartbeats only | reports/s | counts changing | reports/s |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let ca = generate_ca("gossip-bytes")?;
    for n in SIZES {
        let one = Node::new(&tls(&ca, 1)?, 1, n)?;
        let two = Node::new(&tls(&ca, 2)?, 2, n)?;
        let addr = |node: &Node| node.transport.local_addr().map(|a| a.to_string());
        let (tasks1, _peers1) = one.start(2, addr(&two)?);
        let (tasks2, _peers2) = two.start(1, addr(&one)?);
        // One request in flight on every instance of node 1.
        let group = one.group();
        let mut rng = rand::rng();
        let held: Vec<_> = (0..n)
            .filter_map(|_| match group.balancer.pick(Instant::now(), &mut rng) {
                Pick::Selected(lease) => Some(lease),
                _ => None,
            })
            .collect();
        // Until node 2 has heard of all of it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while two
            .group()
            .backends
            .values()
            .map(|b| b.peer_load())
            .sum::<u64>()
            < n as u64
        {
            anyhow::ensure!(Instant::now() < deadline, "node 2 never saw node 1's load");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (idle_bytes, idle_reports) = rate(&one, window).await;
        // A pick and a release every 0.2 ms.
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (group, stop) = (group.clone(), stop.clone());
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_micros(200));
                while !stop.load(Ordering::Relaxed) {
                    interval.tick().await;
                    let pick = group.balancer.pick(Instant::now(), &mut rand::rng());
                    drop(pick);
                }
            })
        };
        let (busy_bytes, busy_reports) = rate(&one, window).await;
        stop.store(true, Ordering::Relaxed);
        churn.await?;
        println!(
            "| {n} | {} | {idle_reports:.1} | {} | {busy_reports:.1} |",
            human(idle_bytes),
            human(busy_bytes)
        );
        drop(held);
        tasks1.stop().await;
        tasks2.stop().await;
    }
    Ok(())
}
