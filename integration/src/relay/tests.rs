use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::*;
use crate::addr::Subnet;

/// Two plain UDP "nodes" (1 and 2) behind a relay.
struct Pair {
    relay: Relay,
    a: UdpSocket,
    b: UdpSocket,
    /// What node 1 dials to reach node 2.
    to_b: SocketAddr,
}

async fn pair() -> Pair {
    let (na, nb) = (Subnet::allocate(), Subnet::allocate());
    let a = UdpSocket::bind(SocketAddr::new(na.node_ip(), 0))
        .await
        .unwrap();
    let b = UdpSocket::bind(SocketAddr::new(nb.node_ip(), 0))
        .await
        .unwrap();
    let relay = Relay::new(7);
    for (id, s, net) in [(1, &a, &na), (2, &b, &nb)] {
        relay
            .add_node(
                id,
                s.local_addr().unwrap(),
                SocketAddr::new(net.ip(253), 0),
                net.ip(254),
            )
            .await
            .unwrap();
    }
    let to_b = relay.advertised(2).unwrap();
    Pair { relay, a, b, to_b }
}

async fn recv(s: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(within, s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some((buf[..n].to_vec(), from))
}

/// One round trip 1 → 2 → 1; checks the answer comes from the address 1
/// dialled, and returns how long it took.
async fn round_trip(p: &Pair) -> Option<Duration> {
    let start = Instant::now();
    p.a.send_to(b"ping", p.to_b).await.unwrap();
    let (data, seen_as) = recv(&p.b, Duration::from_secs(2)).await?;
    assert_eq!(data, b"ping");
    // Node 2 sees node 1 at the relay's (1→2) upstream socket.
    assert_eq!(seen_as.ip(), p.relay.state().upstream_ip[&1]);
    p.b.send_to(b"pong", seen_as).await.unwrap();
    let (data, from) = recv(&p.a, Duration::from_secs(2)).await?;
    assert_eq!(data, b"pong");
    assert_eq!(from, p.to_b, "the answer comes from the address dialled");
    Some(start.elapsed())
}

#[tokio::test]
async fn forwards_both_ways_with_the_configured_delay() {
    let p = pair().await;
    let fast = round_trip(&p).await.expect("a perfect link delivers");
    assert!(fast < Duration::from_millis(50), "{fast:?}");
    p.relay.set(
        1,
        2,
        Link::delayed(Duration::from_millis(60), Duration::ZERO),
    );
    p.relay.set(
        2,
        1,
        Link::delayed(Duration::from_millis(30), Duration::ZERO),
    );
    let slow = round_trip(&p).await.expect("a delayed link delivers");
    assert!(
        slow >= Duration::from_millis(90) && slow < Duration::from_millis(400),
        "{slow:?}"
    );
    assert_eq!(p.relay.stats(1, 2).delivered, 2);
    assert_eq!(p.relay.stats(2, 1).delivered, 2);
}

#[tokio::test]
async fn a_cut_drops_and_heal_restores() {
    let p = pair().await;
    p.relay.isolate(2);
    p.a.send_to(b"lost", p.to_b).await.unwrap();
    assert!(recv(&p.b, Duration::from_millis(300)).await.is_none());
    assert_eq!(p.relay.stats(1, 2).cut, 1);
    p.relay.heal_all();
    assert!(round_trip(&p).await.is_some());
    // One way only: 2 → 1 cut, 1 → 2 up.
    p.relay.update(2, 1, |l| l.up = false);
    p.a.send_to(b"one way", p.to_b).await.unwrap();
    let (_, seen_as) = recv(&p.b, Duration::from_secs(2)).await.unwrap();
    p.b.send_to(b"back", seen_as).await.unwrap();
    assert!(recv(&p.a, Duration::from_millis(300)).await.is_none());
    assert_eq!(p.relay.stats(2, 1).cut, 1);
}

#[tokio::test]
async fn loss_drops_about_the_configured_share() {
    let p = pair().await;
    p.relay.update(1, 2, |l| l.loss = 0.5);
    for i in 0..400u32 {
        p.a.send_to(&i.to_be_bytes(), p.to_b).await.unwrap();
    }
    let mut got = 0;
    while recv(&p.b, Duration::from_millis(300)).await.is_some() {
        got += 1;
    }
    assert!((140..=260).contains(&got), "{got} of 400 arrived");
    let s = p.relay.stats(1, 2);
    assert_eq!(s.delivered + s.lost, 400);
    assert_eq!(s.delivered, got);
}

#[tokio::test]
async fn jitter_delays_each_datagram_within_its_bounds() {
    let p = pair().await;
    p.relay.set(
        1,
        2,
        Link::delayed(Duration::from_millis(50), Duration::from_millis(40)),
    );
    let start = Instant::now();
    for i in 0..50u32 {
        p.a.send_to(&i.to_be_bytes(), p.to_b).await.unwrap();
    }
    let mut order = Vec::new();
    while let Some((d, _)) = recv(&p.b, Duration::from_millis(500)).await {
        order.push(u32::from_be_bytes(d[..4].try_into().unwrap()));
        if order.len() == 50 {
            break;
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(order.len(), 50);
    assert!(elapsed >= Duration::from_millis(10), "{elapsed:?}");
    // Sent in a burst, delays drawn from 10..90 ms: reordered.
    assert!(order.windows(2).any(|w| w[0] > w[1]), "{order:?}");
}

#[tokio::test]
async fn partition_cuts_across_groups_only() {
    let p = pair().await;
    let n3 = Subnet::allocate();
    let c = UdpSocket::bind(SocketAddr::new(n3.node_ip(), 0))
        .await
        .unwrap();
    p.relay
        .add_node(
            3,
            c.local_addr().unwrap(),
            SocketAddr::new(n3.ip(253), 0),
            n3.ip(254),
        )
        .await
        .unwrap();
    p.relay.partition(&[&[1, 3], &[2]]);
    assert!(!p.relay.link(1, 2).up && !p.relay.link(2, 3).up);
    assert!(p.relay.link(1, 3).up && p.relay.link(3, 1).up);
    let to_c = p.relay.advertised(3).unwrap();
    p.a.send_to(b"hi", to_c).await.unwrap();
    assert!(recv(&c, Duration::from_secs(2)).await.is_some());
    p.relay.heal_all();
    assert!(p.relay.link(1, 2).up && p.relay.link(2, 3).up);
}
