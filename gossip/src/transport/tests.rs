//! The transport over real QUIC connections on loopback: a report goes as
//! a datagram when it fits and on a stream when not, reaches the handler
//! with the sender's id; this node's own reports are dropped, a report in
//! another node's name closes the connection, and so do repeated bad
//! inputs. The node's cluster tests drive the same code behind its mutual
//! TLS; here the peer's proof is a fixed id.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::{Dropped, GossipHandler, GossipLink, MAX_STRIKES, Peer, Via, codes, serve};
use crate::testutil::report;
use crate::{Arrival, DATAGRAM_MAX, Wire, encode};

const ALPN: &[u8] = b"edgelb-gossip/2";
const NAME: &str = "gossip.test";
/// This node; the peer's certificate proves node [`PEER`].
const THIS: u64 = 1;
const PEER: u64 = 2;

/// The id the peer's certificate names.
struct Proven(u64);

impl Peer for Proven {
    fn proves(&self, id: u64) -> bool {
        id == self.0
    }
}

#[derive(Debug)]
enum Seen {
    Report(Wire, usize),
    Dropped(Dropped, usize),
}

struct Recorder(mpsc::UnboundedSender<Seen>);

impl GossipHandler for Recorder {
    fn report(&self, report: Wire, bytes: usize, _arrival: Arrival) {
        let _ = self.0.send(Seen::Report(report, bytes));
    }

    fn dropped(&self, reason: Dropped, bytes: usize) {
        let _ = self.0.send(Seen::Dropped(reason, bytes));
    }
}

/// A client connection to a served gossip endpoint, what the handler
/// sees, and the client's endpoint (kept open).
struct Pair {
    link: GossipLink,
    seen: mpsc::UnboundedReceiver<Seen>,
    _client: Endpoint,
    _server: Endpoint,
}

/// A pair whose client's certificate proves node `proven`.
async fn pair(proven: u64) -> Pair {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec![NAME.to_owned()]).expect("certificate");
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server TLS");
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).expect("QUIC server"),
    ));
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = Endpoint::server(server_config, loopback).expect("server endpoint");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = Endpoint::client(loopback).expect("client endpoint");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).expect("QUIC client"),
    )));

    let addr = server.local_addr().expect("server address");
    let (conn, accepted) = tokio::join!(
        async { client.connect(addr, NAME).expect("connect").await },
        async { server.accept().await.expect("incoming").await },
    );
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(serve(
        accepted.expect("accepted"),
        THIS,
        Proven(proven),
        Recorder(tx),
    ));
    Pair {
        link: GossipLink::new(THIS, conn.expect("connected"), true),
        seen,
        _client: client,
        _server: server,
    }
}

impl Pair {
    async fn next(&mut self) -> Seen {
        timeout(Duration::from_secs(5), self.seen.recv())
            .await
            .expect("the handler heard something in time")
            .expect("the serving task is running")
    }

    /// Waits for the connection to close; its application code.
    async fn closed(&self) -> u64 {
        match timeout(Duration::from_secs(5), self.link.conn.closed()).await {
            Ok(ConnectionError::ApplicationClosed(c)) => c.error_code.into_inner(),
            other => panic!("closed otherwise: {other:?}"),
        }
    }
}

fn encoded(node_id: u64, instances: usize) -> bytes::Bytes {
    let counts = vec![(1, 0); instances];
    bytes::Bytes::from(encode(&report(node_id, 1, &counts, 10.0, 100)).expect("encodes"))
}

#[tokio::test]
async fn a_small_report_goes_as_a_datagram_and_a_large_one_on_a_stream() {
    let mut p = pair(PEER).await;
    let small = encoded(PEER, 4);
    assert!(small.len() <= DATAGRAM_MAX);
    assert_eq!(
        p.link.send(small.clone()).await.expect("sent"),
        Via::Datagram
    );
    match p.next().await {
        Seen::Report(r, bytes) => {
            assert_eq!((r.node_id(), bytes), (PEER, small.len()));
        }
        other => panic!("{other:?}"),
    }
    let large = encoded(PEER, 200);
    assert!(large.len() > DATAGRAM_MAX);
    assert_eq!(p.link.send(large.clone()).await.expect("sent"), Via::Stream);
    match p.next().await {
        Seen::Report(Wire::Full(r), bytes) => {
            assert_eq!(
                (r.node_id, r.entries.len(), bytes),
                (PEER, 200, large.len())
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!p.link.is_closed());
}

/// Own reports (a loop, or a second process with this node's id and
/// certificate) are dropped, and count as bad input: a run of them closes
/// the connection.
#[tokio::test]
async fn own_reports_are_dropped_and_a_run_of_them_closes_the_connection() {
    let mut p = pair(THIS).await;
    for _ in 0..MAX_STRIKES {
        p.link.send(encoded(THIS, 2)).await.expect("sent");
        assert!(matches!(p.next().await, Seen::Dropped(Dropped::Own, _)));
    }
    assert_eq!(p.closed().await, codes::BAD_REPORTS.into_inner());
}

#[tokio::test]
async fn a_report_in_another_nodes_name_closes_the_connection() {
    let mut p = pair(PEER).await;
    p.link.send(encoded(3, 2)).await.expect("sent");
    assert!(matches!(
        p.next().await,
        Seen::Dropped(Dropped::Identity, _)
    ));
    assert_eq!(p.closed().await, codes::IDENTITY.into_inner());
}

#[tokio::test]
async fn repeated_bad_input_closes_the_connection_and_a_good_report_resets_the_count() {
    let mut p = pair(PEER).await;
    let junk = bytes::Bytes::from_static(b"not a gossip report");
    // One short of the limit, then a good report: the count starts over.
    for _ in 1..MAX_STRIKES {
        assert_eq!(
            p.link.send(junk.clone()).await.expect("sent"),
            Via::Datagram
        );
        assert!(matches!(
            p.next().await,
            Seen::Dropped(Dropped::Malformed, 19)
        ));
    }
    p.link.send(encoded(PEER, 2)).await.expect("sent");
    assert!(matches!(p.next().await, Seen::Report(..)));
    assert!(!p.link.is_closed());
    for _ in 0..MAX_STRIKES {
        p.link.send(junk.clone()).await.expect("sent");
        assert!(matches!(
            p.next().await,
            Seen::Dropped(Dropped::Malformed, _)
        ));
    }
    assert_eq!(p.closed().await, codes::BAD_REPORTS.into_inner());
}
