//! Gossip over the transport, real UDP on 127.0.0.1: reports by datagram
//! and by stream, identity checks, hostile input.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ::gossip::{Entry, MAX_REPORT_LEN, Report, Wire};
use bytes::Bytes;
use quinn::{ConnectionError, Endpoint};
use tokio::time::timeout;

use super::{Echo, eventually, loopback, node_tls, patience};
use crate::cluster::*;

/// Records what the transport hands over.
#[derive(Default)]
struct Inbox {
    reports: Mutex<Vec<(Report, usize)>>,
    dropped: Mutex<Vec<(Dropped, usize)>>,
}

impl Inbox {
    fn reports(&self) -> Vec<(Report, usize)> {
        self.reports.lock().unwrap().clone()
    }

    fn dropped(&self) -> Vec<Dropped> {
        self.dropped.lock().unwrap().iter().map(|d| d.0).collect()
    }
}

impl GossipHandler for Inbox {
    fn report(&self, report: Wire, bytes: usize, _arrival: ::gossip::Arrival) {
        if let Wire::Full(report) = report {
            self.reports.lock().unwrap().push((report, bytes));
        }
    }

    fn dropped(&self, reason: Dropped, bytes: usize) {
        self.dropped.lock().unwrap().push((reason, bytes));
    }
}

fn report(node_id: u64, seq: u64, entries: usize) -> Report {
    Report {
        node_id,
        incarnation: 7,
        seq,
        sent_at_ms: 1,
        entries: (0..entries)
            .map(|i| {
                let mut instance = [0; 16];
                instance[8..].copy_from_slice(&(i as u64).to_be_bytes());
                Entry {
                    instance,
                    inflight: 3,
                    long_inflight: 1,
                    arrival_rate_milli: 2500,
                    mean_service_us: 10_000,
                }
            })
            .collect(),
    }
}

fn bytes(report: &Report) -> Bytes {
    Bytes::from(::gossip::encode(report).unwrap())
}

/// A transport for node `id` whose gossip goes to an [`Inbox`].
fn gossip_node(ca: &CaBundle, id: u64) -> (Transport, Arc<Inbox>) {
    let transport =
        Transport::bind(loopback(), &node_tls(ca, id), id, Arc::new(Echo::default())).unwrap();
    let inbox = Arc::new(Inbox::default());
    transport.set_gossip_handler(inbox.clone());
    (transport, inbox)
}

/// A bare quinn gossip client presenting `tls` to node `server_id`.
async fn raw_gossip(tls: &NodeTls, addr: SocketAddr, server_id: u64) -> quinn::Connection {
    let ep = Endpoint::client(loopback()).unwrap();
    let config = tls.client_config(ALPN_GOSSIP).unwrap();
    ep.connect_with(config, addr, &node_dns_name(server_id))
        .unwrap()
        .await
        .unwrap()
}

async fn send_stream(conn: &quinn::Connection, bytes: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    // The server may stop reading early (oversized): errors are expected.
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
}

/// Compact full reports (version 3) go only where the peer said it reads
/// them: between current nodes, not to a node of an earlier version, which
/// offers only `edgelb-gossip/1`.
#[tokio::test]
async fn compact_reports_only_to_peers_that_read_them() {
    let ca = generate_ca("test").unwrap();
    let (a, _) = gossip_node(&ca, 1);
    let (b, inbox) = gossip_node(&ca, 2);
    let b_addr = b.local_addr().unwrap().to_string();
    let link = a.gossip_connect(2, &b_addr, patience()).await.unwrap();
    assert!(link.compact());
    let r = report(1, 1, 100);
    let compact = Bytes::from(::gossip::encode_compact(&r).unwrap());
    assert!(compact.len() < r.encoded_len(), "{}", compact.len());
    link.send(compact.clone()).await.unwrap();
    eventually("the compact report", || inbox.reports().len() == 1).await;
    assert_eq!(inbox.reports()[0], (r, compact.len()));

    let old_tls = node_tls(&ca, 3);
    let old = Endpoint::server(
        old_tls.server_config_offering(&[ALPN_GOSSIP]).unwrap(),
        loopback(),
    )
    .unwrap();
    let old_addr = old.local_addr().unwrap().to_string();
    let accepted = tokio::spawn(async move {
        let conn = old.accept().await.unwrap().await.unwrap();
        tls::negotiated_alpn(&conn)
    });
    let link = a.gossip_connect(3, &old_addr, patience()).await.unwrap();
    assert!(!link.compact());
    let alpn = timeout(patience(), accepted).await.unwrap().unwrap();
    assert_eq!(alpn.as_deref(), Some(ALPN_GOSSIP));
}

#[tokio::test]
async fn reports_go_by_datagram_or_by_stream() {
    let ca = generate_ca("test").unwrap();
    let (a, _) = gossip_node(&ca, 1);
    let (b, inbox) = gossip_node(&ca, 2);
    let b_addr = b.local_addr().unwrap().to_string();
    let link = a.gossip_connect(2, &b_addr, patience()).await.unwrap();
    assert_eq!(link.target(), 2);

    let small = report(1, 1, 3);
    assert!(small.fits_datagram());
    assert_eq!(link.send(bytes(&small)).await.unwrap(), Via::Datagram);
    // 100 entries: 3,238 bytes, more than a datagram carries.
    let big = report(1, 2, 100);
    assert!(!big.fits_datagram());
    assert_eq!(link.send(bytes(&big)).await.unwrap(), Via::Stream);
    // The largest valid report goes on a stream too.
    let huge = report(1, 3, ::gossip::MAX_ENTRIES);
    assert_eq!(bytes(&huge).len(), MAX_REPORT_LEN);
    assert_eq!(link.send(bytes(&huge)).await.unwrap(), Via::Stream);

    eventually("three reports", || inbox.reports().len() == 3).await;
    let mut got = inbox.reports();
    got.sort_by_key(|(r, _)| r.seq);
    assert_eq!(got[0], (small.clone(), small.encoded_len()));
    assert_eq!(got[1], (big.clone(), big.encoded_len()));
    assert_eq!(got[2].0.entries.len(), ::gossip::MAX_ENTRIES);
    assert!(inbox.dropped().is_empty());
    assert_eq!(b.stats().gossip_connections_accepted, 1);
    assert_eq!(b.stats().gossip_reports, 3);
    // Gossip does not use the Raft connection, nor Raft the gossip one.
    assert_eq!(b.stats().connections_accepted, 0);
}

#[tokio::test]
async fn a_report_in_another_nodes_name_is_dropped_and_the_connection_closed() {
    let ca = generate_ca("test").unwrap();
    let (a, _) = gossip_node(&ca, 1);
    let (b, inbox) = gossip_node(&ca, 2);
    let b_addr = b.local_addr().unwrap().to_string();

    // Node 1's certificate, a report claiming node 3.
    let link = a.gossip_connect(2, &b_addr, patience()).await.unwrap();
    link.send(bytes(&report(3, 1, 2))).await.unwrap();
    eventually("the impostor's report dropped", || {
        inbox.dropped() == [Dropped::Identity]
    })
    .await;
    eventually("the connection closed", || link.is_closed()).await;
    assert!(inbox.reports().is_empty());
    assert_eq!(b.stats().identity_refused, 1);

    // The same node telling the truth on a new connection is heard.
    let link = a.gossip_connect(2, &b_addr, patience()).await.unwrap();
    link.send(bytes(&report(1, 1, 2))).await.unwrap();
    eventually("the true report", || inbox.reports().len() == 1).await;
    assert_eq!(inbox.reports()[0].0.node_id, 1);
}

#[tokio::test]
async fn garbage_is_dropped_and_counted_and_the_node_keeps_listening() {
    let ca = generate_ca("test").unwrap();
    let (b, inbox) = gossip_node(&ca, 2);
    let addr = b.local_addr().unwrap();
    let tls1 = node_tls(&ca, 1);
    let conn = raw_gossip(&tls1, addr, 2).await;

    let good = ::gossip::encode(&report(1, 1, 2)).unwrap();
    conn.send_datagram(Bytes::from_static(b"not a report"))
        .unwrap();
    send_stream(&conn, b"\x01\x00 nor this").await;
    send_stream(&conn, &good[..good.len() - 1]).await; // cut short
    send_stream(&conn, &vec![0; MAX_REPORT_LEN + 1]).await;
    let expect = [
        Dropped::Malformed,
        Dropped::Malformed,
        Dropped::Malformed,
        Dropped::Oversized,
    ];
    eventually("four inputs dropped", || inbox.dropped().len() == 4).await;
    let mut seen = inbox.dropped();
    seen.sort_by_key(|d| d.label());
    let mut want = expect.to_vec();
    want.sort_by_key(|d| d.label());
    assert_eq!(seen, want);

    // Same connection, a good report (as a datagram and as a stream).
    conn.send_datagram(Bytes::from(good.clone())).unwrap();
    send_stream(&conn, &::gossip::encode(&report(1, 2, 40)).unwrap()).await;
    eventually("two good reports", || inbox.reports().len() == 2).await;

    // A bidirectional stream is refused without harm.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&good).await;
    let _ = send.finish();
    assert!(
        timeout(patience(), recv.read_to_end(16))
            .await
            .unwrap()
            .is_err()
    );

    // This node's own report (a second process with its certificate).
    let own = raw_gossip(&node_tls(&ca, 2), addr, 2).await;
    own.send_datagram(Bytes::from(::gossip::encode(&report(2, 1, 1)).unwrap()))
        .unwrap();
    eventually("the own report dropped", || {
        inbox.dropped().contains(&Dropped::Own)
    })
    .await;

    // Bad input over and over closes that connection.
    for _ in 0..MAX_STRIKES {
        conn.send_datagram(Bytes::from_static(b"junk")).unwrap();
    }
    let closed = timeout(patience(), conn.closed()).await.unwrap();
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == codes::BAD_REPORTS),
        "{closed}"
    );

    // The node still listens: a new connection is heard.
    let conn = raw_gossip(&tls1, addr, 2).await;
    conn.send_datagram(Bytes::from(::gossip::encode(&report(1, 3, 1)).unwrap()))
        .unwrap();
    eventually("a report on a new connection", || {
        inbox.reports().len() == 3
    })
    .await;
    assert_eq!(b.stats().gossip_reports, 3);
    assert_eq!(
        b.stats().gossip_dropped,
        inbox.dropped().len() as u64,
        "{:?}",
        inbox.dropped()
    );
}

/// A peer opening connection after connection with one certificate gets
/// each new one in, and this node keeps at most eight of them: the oldest
/// are closed (`TOO_MANY`), the newest still carry reports.
#[tokio::test]
async fn one_certificate_holds_at_most_eight_connections() {
    let ca = generate_ca("test").unwrap();
    let (node, inbox) = gossip_node(&ca, 1);
    let addr = node.local_addr().unwrap();
    let tls = node_tls(&ca, 2);
    let mut conns = Vec::new();
    for _ in 0..10 {
        let conn = raw_gossip(&tls, addr, 1).await;
        // Served (and counted) before the next one opens.
        conn.send_datagram(bytes(&report(2, conns.len() as u64 + 1, 1)))
            .unwrap();
        let sent = conns.len() + 1;
        eventually("the report to arrive", || inbox.reports().len() == sent).await;
        conns.push(conn);
    }
    for (i, conn) in conns.iter().take(2).enumerate() {
        let closed = timeout(patience(), conn.closed())
            .await
            .unwrap_or_else(|_| panic!("connection {i} still open"));
        assert!(
            matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == codes::TOO_MANY),
            "connection {i}: {closed:?}"
        );
    }
    for conn in &conns[2..] {
        assert!(conn.close_reason().is_none());
    }
    assert_eq!(node.stats().displaced, 2);
    // The newest still carries reports.
    conns[9].send_datagram(bytes(&report(2, 11, 1))).unwrap();
    eventually("the last report to arrive", || inbox.reports().len() == 11).await;
}
