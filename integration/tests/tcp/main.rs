//! TCP mode end to end: balancing per connection by open connections.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::backend::EchoClient;
use integration::client::tcp_connect;
use integration::{EchoBackend, NodeOptions, TestNode, wait_until};
use serde_json::json;

const PORT: u16 = 9000;
const BACKEND_PORT: u16 = 7000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_steer_new_ones_to_idle_instances() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let mut echoes = Vec::new();
    for name in ["e1", "e2", "e3", "e4"] {
        echoes.push(
            EchoBackend::start(name, SocketAddr::new(node.subnet.next_ip(), BACKEND_PORT)).await?,
        );
    }
    let group = node
        .create_group(&json!({
            "name": "echo",
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": []}],
        }))
        .await?;
    for e in &echoes {
        node.attach(&group, e.name(), e.addr().ip()).await?;
    }
    node.wait_idle(&group).await?;

    let mut held = Vec::new();
    let mut used = BTreeSet::new();
    for i in 0..2 {
        let mut c = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
        let who = c.who(&format!("hold {i}")).await?;
        assert!(
            used.insert(who.clone()),
            "connection {i} went to {who}, which already has one open: {used:?}"
        );
        held.push(c);
    }
    let loads = node.local_loads(&group).await?;
    for (name, local) in &loads {
        assert_eq!(
            *local,
            u64::from(used.contains(name)),
            "load.local of {name} with 2 connections open: {loads:?}"
        );
    }

    // The 3rd and 4th go to the two idle instances.
    for i in 2..4 {
        let mut c = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
        let who = c.who(&format!("hold {i}")).await?;
        assert!(
            used.insert(who.clone()),
            "connection {i} went to busy {who}; busy: {used:?}"
        );
        held.push(c);
    }
    let loads = node.local_loads(&group).await?;
    assert!(
        loads.iter().all(|(_, n)| *n == 1),
        "4 connections over 4 instances: {loads:?}"
    );
    let scrape = node.scrape().await?;
    assert_eq!(
        scrape.sum("edgelb_instance_inflight", &[("service", "echo")]),
        4.0
    );

    // Held connections stay on their instance.
    for (i, c) in held.iter_mut().enumerate() {
        c.who(&format!("still {i}")).await?;
    }
    drop(held);
    node.wait_idle(&group).await?;
    wait_until(
        "the echo backends to see every connection closed",
        Duration::from_secs(5),
        || async { echoes.iter().all(|e| e.open() == 0) },
    )
    .await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tcp_port_belongs_to_one_group() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    node.create_group(&json!({
        "name": "first",
        "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": []}],
    }))
    .await?;
    let (status, body) = node
        .post(
            "/v1/services",
            &json!({
                "name": "second",
                "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": []}],
            }),
        )
        .await?;
    assert_eq!(status, http::StatusCode::CONFLICT, "{body}");
    assert_eq!(body["status"], "error");
    assert_eq!(body["errors"][0]["status"], 409);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_instance_keeps_its_connection_until_the_drain_timeout() -> anyhow::Result<()> {
    let drain = Duration::from_secs(1);
    let mut opts = NodeOptions::default();
    opts.settings.drain_timeout = drain;
    let node = TestNode::start_with(opts).await?;
    let mut echoes = Vec::new();
    for name in ["d1", "d2"] {
        echoes.push(
            EchoBackend::start(name, SocketAddr::new(node.subnet.next_ip(), BACKEND_PORT)).await?,
        );
    }
    let group = node
        .create_group(&json!({
            "name": "draining",
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": []}],
        }))
        .await?;
    for e in &echoes {
        node.attach(&group, e.name(), e.addr().ip()).await?;
    }
    node.wait_idle(&group).await?;

    let mut held = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
    let victim = held.who("before").await?;
    node.detach(&group, &victim).await?;
    let detached = Instant::now();
    // Still in flight: the connection keeps working after the detach...
    assert_eq!(held.who("after").await?, victim);
    // ...new ones go elsewhere...
    let mut other = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
    assert_ne!(
        other.who("new").await?,
        victim,
        "a new connection went to the detached instance"
    );
    // ...and the node closes it once the drain timeout has passed.
    held.closed(drain + Duration::from_secs(5)).await?;
    let waited = detached.elapsed();
    assert!(
        waited >= drain.mul_f64(0.9),
        "closed after {waited:?}, before the drain timeout {drain:?}"
    );
    let victim_backend = echoes
        .iter()
        .find(|e| e.name() == victim)
        .ok_or_else(|| anyhow::anyhow!("unknown {victim}"))?;
    wait_until(
        "the detached instance's connection to close",
        Duration::from_secs(5),
        || async { victim_backend.open() == 0 },
    )
    .await?;
    assert_ne!(other.who("unaffected").await?, victim);
    drop(other);
    node.wait_idle(&group).await?;
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_instances_are_skipped_and_the_hard_limit_closes_connections() -> anyhow::Result<()>
{
    let node = TestNode::start().await?;
    let alive = EchoBackend::start(
        "alive",
        SocketAddr::new(node.subnet.next_ip(), BACKEND_PORT),
    )
    .await?;
    let group = node
        .create_group(&json!({
            "name": "mixed",
            "hard_limit": 1,
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": []}],
        }))
        .await?;
    node.attach(&group, "alive", alive.addr().ip()).await?;
    // Nothing listens here.
    node.attach(&group, "refusing", node.subnet.next_ip())
        .await?;
    node.wait_idle(&group).await?;

    // Connect failures are retried on the other instance.
    for i in 0..10 {
        let mut c = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
        assert_eq!(c.who(&format!("try {i}")).await?, "alive");
        drop(c);
        node.wait_idle(&group).await?;
    }

    // With "alive" at its hard limit of 1 (and "refusing" down), a new
    // connection is closed without reaching an instance.
    let mut held = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
    assert_eq!(held.who("hold").await?, "alive");
    let accepted = alive.accepted();
    let mut refused = EchoClient::new(tcp_connect(node.addr(PORT), None).await?);
    let answer = refused.who("over the limit").await;
    assert!(
        answer.is_err(),
        "a connection over the hard limit was served: {answer:?}"
    );
    refused.closed(Duration::from_secs(5)).await?;
    assert_eq!(
        alive.accepted(),
        accepted,
        "the connection over the limit reached the instance"
    );
    assert_eq!(held.who("still held").await?, "alive");
    drop(held);
    node.wait_idle(&group).await?;
    node.stop().await
}
