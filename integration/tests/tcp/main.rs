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

/// A PROXY v2 header from a balancer on an `accept_proxy_protocol` port
/// reaches a TCP-mode instance as the PROXY header the group sends
/// (`send_proxy_protocol`), naming the original client; set through a
/// PATCH, then switched to v2 and off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_client_reaches_a_tcp_instance_in_a_proxy_header() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut opts = NodeOptions::default();
    opts.settings.accept_proxy_protocol = vec![PORT];
    let node = TestNode::start_with(opts).await?;
    // An instance that reports the first bytes it gets.
    let backend_addr = SocketAddr::new(node.subnet.next_ip(), BACKEND_PORT);
    let listener = tokio::net::TcpListener::bind(backend_addr).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let rx = tokio::sync::Mutex::new(rx);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut b = [0_u8; 512];
                while !got.ends_with(b"hello") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&b[..n]),
                    }
                }
                let _ = tx.send(got);
                let _ = s.write_all(b"bye").await;
            });
        }
    });
    let group = node
        .create_group(&json!({
            "name": "pp",
            "services": [{"port": PORT, "destination_port": BACKEND_PORT, "handlers": []}],
            "send_proxy_protocol": "v1",
        }))
        .await?;
    node.attach(&group, "i1", backend_addr.ip()).await?;
    // From a balancer: a v2 header naming 203.0.113.7:4444, then bytes.
    let through = |header: Vec<u8>| async {
        let mut c = tcp_connect(node.addr(PORT), None).await?;
        c.write_all(&[header, b"hello".to_vec()].concat()).await?;
        let mut bye = [0_u8; 3];
        c.read_exact(&mut bye).await?;
        anyhow::ensure!(&bye == b"bye");
        let mut rx = rx.lock().await;
        let got = tokio::time::timeout(integration::patient(Duration::from_secs(5)), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the instance saw nothing"))?;
        anyhow::Ok(got)
    };
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1]);
    v2.extend_from_slice(&4444_u16.to_be_bytes());
    v2.extend_from_slice(&PORT.to_be_bytes());
    let got = through(v2.clone()).await?;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text,
        format!("PROXY TCP4 203.0.113.7 {} 4444 {PORT}\r\nhello", node.ip()),
        "what the instance got"
    );
    // v2 to the instance: the signature, then the client's address.
    let (status, v) = node
        .patch(
            "/v1/services/pp",
            &json!({"prop": "send_proxy_protocol", "op": "set", "value": "v2"}),
        )
        .await?;
    assert!(status.is_success(), "{status} {v}");
    let got = through(v2.clone()).await?;
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&got[12..20], &[0x21, 0x11, 0, 12, 203, 0, 113, 7]);
    assert_eq!(&got[24..26], &4444_u16.to_be_bytes());
    assert!(got.ends_with(b"hello"));
    // Off: the client's bytes only.
    let (status, v) = node
        .patch(
            "/v1/services/pp",
            &json!({"prop": "send_proxy_protocol", "op": "del", "value": null}),
        )
        .await?;
    assert!(status.is_success(), "{status} {v}");
    assert_eq!(through(v2).await?, b"hello");
    node.stop().await
}
