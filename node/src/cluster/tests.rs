//! Transport tests over real UDP sockets on 127.0.0.1: mutual TLS, identity,
//! hostile frames, timeouts; openraft clusters over it ([`raft`]); load
//! gossip over it ([`gossip`](mod@gossip)).

mod gossip;
mod raft;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Vote;
use openraft::raft::{InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use quinn::{ConnectionError, Endpoint, ReadError, ReadToEndError};
use raft_store::Command;
use raft_store::model::Certificate;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::{Instant, timeout};

use super::frame::{self, HEADER_LIMIT, Header, Version};
use super::rpc::RpcKind;
use super::tls::ALPN_RAFT_2;
use super::*;

/// Patience for conditions that should hold quickly.
fn patience() -> Duration {
    crate::patience::patient(Duration::from_secs(5))
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn node_tls(ca: &CaBundle, id: u64) -> NodeTls {
    let (cert_pem, key_pem) = issue_node_cert(ca, id).unwrap();
    NodeTls {
        ca_cert_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    }
}

/// Answers votes (granted), `Linearize` (with the caller's id), appends
/// and snapshot chunks (accepted); hangs on `Write`. Records who called,
/// each append's entry count and each chunk's data.
#[derive(Default)]
struct Echo {
    seen: Mutex<Vec<u64>>,
    /// Each snapshot chunk received, in the order they came.
    chunks: Mutex<Vec<Chunk>>,
    /// Chunks received and not answered yet.
    chunks_in_flight: std::sync::atomic::AtomicUsize,
    /// How long each chunk's answer is held, in milliseconds (set by a
    /// test; none by default).
    hold_chunks_ms: std::sync::atomic::AtomicU64,
    /// The first chunk at this offset is answered with an error.
    fail_chunk_at: Mutex<Option<u64>>,
    /// How many entries each append received carried.
    appends: Mutex<Vec<usize>>,
    /// Held by a test, it keeps appends from being answered.
    answer_appends: tokio::sync::Mutex<()>,
}

/// A snapshot chunk an [`Echo`] received.
#[derive(Clone, Debug)]
struct Chunk {
    offset: u64,
    data: Vec<u8>,
    done: bool,
    /// Chunks received and not yet answered when it came, itself
    /// included: more than 1 means it was sent before an earlier one's
    /// answer was.
    in_flight: usize,
}

impl Echo {
    fn seen(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }

    /// The snapshot the chunks received make, each written at its offset.
    fn snapshot_bytes(&self) -> Vec<u8> {
        self.chunks_by_offset()
            .into_iter()
            .flat_map(|c| c.data)
            .collect()
    }

    /// The chunks received, by offset (each offset's last).
    fn chunks_by_offset(&self) -> Vec<Chunk> {
        let mut by_offset = std::collections::BTreeMap::new();
        for c in self.chunks.lock().unwrap().iter() {
            by_offset.insert(c.offset, c.clone());
        }
        by_offset.into_values().collect()
    }
}

impl RaftHandler for Echo {
    fn handle(&self, from: u64, rpc: Rpc) -> HandlerFuture<'_> {
        self.seen.lock().unwrap().push(from);
        Box::pin(async move {
            match rpc {
                Rpc::Vote(v) => RpcReply::Vote(Ok(VoteResponse::new(v.vote, None, true))),
                Rpc::Forward(Forward::Linearize) => {
                    RpcReply::Forward(Ok(ForwardReply::Linearized { read_index: from }))
                }
                Rpc::Forward(Forward::Write(_)) => std::future::pending().await,
                Rpc::AppendEntries(append) => {
                    self.appends.lock().unwrap().push(append.entries.len());
                    drop(self.answer_appends.lock().await);
                    RpcReply::AppendEntries(Ok(openraft::raft::AppendEntriesResponse::Success))
                }
                Rpc::InstallSnapshot(chunk) => {
                    use std::sync::atomic::Ordering::SeqCst;
                    let in_flight = self.chunks_in_flight.fetch_add(1, SeqCst) + 1;
                    self.chunks.lock().unwrap().push(Chunk {
                        offset: chunk.offset,
                        data: chunk.data,
                        done: chunk.done,
                        in_flight,
                    });
                    let hold = self.hold_chunks_ms.load(SeqCst);
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    // Before the answer is written: a chunk that comes while
                    // this one counts was sent before its answer came.
                    self.chunks_in_flight.fetch_sub(1, SeqCst);
                    let mut fail = self.fail_chunk_at.lock().unwrap();
                    if *fail == Some(chunk.offset) {
                        *fail = None;
                        return RpcReply::Error("this chunk is lost".into());
                    }
                    RpcReply::InstallSnapshot(Ok(InstallSnapshotResponse { vote: chunk.vote }))
                }
                _ => RpcReply::Error("not in this test".into()),
            }
        })
    }
}

fn vote() -> Rpc {
    Rpc::Vote(VoteRequest::new(Vote::new(7, 1), None))
}

fn serve(tls: &NodeTls, id: u64) -> (Transport, Arc<Echo>) {
    let echo = Arc::new(Echo::default());
    let handler: Arc<dyn RaftHandler> = echo.clone();
    (Transport::bind(loopback(), tls, id, handler).unwrap(), echo)
}

/// A new transport on `addr`, once the old endpoint's tasks have released
/// the socket.
async fn rebind(
    addr: SocketAddr,
    tls: &NodeTls,
    id: u64,
    handler: &Arc<dyn RaftHandler>,
) -> Transport {
    let deadline = Instant::now() + patience();
    loop {
        match Transport::bind(addr, tls, id, Arc::clone(handler)) {
            Ok(t) => return t,
            Err(e) => assert!(Instant::now() < deadline, "rebinding {addr}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `cond` until it holds or [`patience`] runs out.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + patience();
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bare quinn client presenting `tls` to node `server_id` at `addr`.
async fn raw_client(
    tls: &NodeTls,
    addr: SocketAddr,
    server_id: u64,
) -> (Endpoint, quinn::Connection) {
    let ep = Endpoint::client(loopback()).unwrap();
    let config = tls.client_config(ALPN_RAFT).unwrap();
    let conn = ep
        .connect_with(config, addr, &node_dns_name(server_id))
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// Sends `bytes` on a new stream and returns the code the server reset
/// its side with, or the reply.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, ReadToEndError> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The server may stop reading early: write errors are expected then.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    timeout(patience(), recv.read_to_end(1 << 20))
        .await
        .expect("server answers or resets in time")
}

/// Sends node 1's vote on a new stream of `conn` and checks the answer.
async fn assert_vote_answered(conn: &quinn::Connection) {
    let reply = send_raw(
        conn,
        &frame::encode_request(1, &vote(), Version::V1).unwrap(),
    )
    .await
    .unwrap();
    assert!(matches!(
        frame::decode_reply(&reply[4..]).unwrap(),
        RpcReply::Vote(Ok(_))
    ));
}

#[tokio::test]
async fn two_transports_exchange_rpcs() {
    let ca = generate_ca("test").unwrap();
    let (a, _) = serve(&node_tls(&ca, 1), 1);
    // Node 2 joins the way a new node does: its own key, a signed CSR.
    let (key_pem, csr) = node_key_and_csr(2).unwrap();
    let tls2 = NodeTls {
        ca_cert_pem: ca.cert_pem.clone(),
        cert_pem: sign_node_csr(&ca, &csr, 2).unwrap(),
        key_pem,
    };
    let (b, echo) = serve(&tls2, 2);
    let b_addr = b.local_addr().unwrap().to_string();

    let reply = a.call(2, &b_addr, vote(), patience()).await.unwrap();
    assert!(matches!(reply, RpcReply::Vote(Ok(v)) if v.vote_granted && v.vote == Vote::new(7, 1)));
    let reply = a
        .call(2, &b_addr, Rpc::Forward(Forward::Linearize), patience())
        .await
        .unwrap();
    assert!(matches!(
        reply,
        RpcReply::Forward(Ok(ForwardReply::Linearized { read_index: 1 }))
    ));
    // The peer error comes back as an error, not as a reply.
    let e = a
        .call(
            2,
            &b_addr,
            Rpc::Forward(Forward::RemoveNode { node_id: 3 }),
            patience(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, TransportError::Remote(m) if m == "not in this test"),
        "{e}"
    );

    assert_eq!(echo.seen(), [1, 1, 1]);
    assert_eq!(a.stats().connects, 1, "one cached connection");
    assert_eq!(b.stats().connections_accepted, 1);
    assert_eq!(b.stats().requests_served, 3);
}

#[tokio::test]
async fn foreign_or_missing_client_certificate_is_refused() {
    let ca = generate_ca("cluster").unwrap();
    let other = generate_ca("other").unwrap();
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap();

    // Trusts the cluster CA, but its own certificate is from another CA.
    let mut intruder = node_tls(&other, 1);
    intruder.ca_cert_pem = ca.cert_pem.clone();
    let (client, _) = serve(&intruder, 1);
    let e = client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap_err();
    assert!(
        e.is_unreachable() || matches!(e, TransportError::Stream(_)),
        "{e}"
    );
    // The dialler begins a fresh handshake while one goes unanswered
    // (every 1.25 round trips), so a slow refusal may be counted twice.
    eventually("a failed handshake", || {
        server.stats().handshakes_failed >= 1
    })
    .await;
    drop(client);
    let refused = server.stats().handshakes_failed;

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_RAFT.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let ep = Endpoint::client(loopback()).unwrap();
    let outcome = timeout(patience(), async {
        let conn = ep
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic)),
                addr,
                &node_dns_name(2),
            )
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let bytes = frame::encode_request(1, &vote(), Version::V1).map_err(|e| e.to_string())?;
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    })
    .await
    .expect("refused in time");
    assert!(outcome.is_err(), "{outcome:?}");
    eventually("one more failed handshake", || {
        server.stats().handshakes_failed > refused
    })
    .await;
    assert!(echo.seen().is_empty());
    assert_eq!(server.stats().connections_accepted, 0);
}

#[tokio::test]
async fn client_claiming_another_id_is_disconnected() {
    let ca = generate_ca("test").unwrap();
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap();
    let tls5 = node_tls(&ca, 5);

    // A transport refuses to start with a certificate for another node.
    let e = Transport::bind(loopback(), &tls5, 6, Arc::new(Echo::default())).unwrap_err();
    assert!(matches!(e, TransportError::Config(_)), "{e}");

    // A valid certificate for node 5 whose streams claim node 6.
    let (_ep, conn) = raw_client(&tls5, addr, 2).await;
    let lie = frame::encode_request(6, &vote(), Version::V1).unwrap();
    assert!(send_raw(&conn, &lie).await.is_err());
    let closed = timeout(patience(), conn.closed()).await.unwrap();
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code == codes::IDENTITY),
        "{closed}"
    );
    assert_eq!(server.stats().identity_refused, 1);
    assert!(echo.seen().is_empty());

    // The same certificate telling the truth is served.
    let (_ep, conn) = raw_client(&tls5, addr, 2).await;
    let truth = frame::encode_request(5, &vote(), Version::V1).unwrap();
    let reply = send_raw(&conn, &truth).await.unwrap();
    let reply = frame::decode_reply(&reply[4..]).unwrap();
    assert!(matches!(reply, RpcReply::Vote(Ok(_))));
    assert_eq!(echo.seen(), [5]);
}

#[tokio::test]
async fn bad_frames_reset_the_stream_and_the_server_keeps_serving() {
    let ca = generate_ca("test").unwrap();
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap();
    let tls1 = node_tls(&ca, 1);
    let (_ep, conn) = raw_client(&tls1, addr, 2).await;

    let header = |kind| frame::encode(&Header { from: 1, rpc: kind }, HEADER_LIMIT).unwrap();
    let with = |mut a: Vec<u8>, b: &[u8]| {
        a.extend_from_slice(b);
        a
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "header over 64 MiB",
            with(u32::MAX.to_be_bytes().to_vec(), b"{"),
        ),
        (
            "header over 1 KiB",
            with(2048u32.to_be_bytes().to_vec(), &[b' '; 2048]),
        ),
        (
            "garbage header",
            with(4u32.to_be_bytes().to_vec(), b"\xff\xfe{]"),
        ),
        (
            "vote body over its limit",
            with(header(RpcKind::Vote), &(1u32 << 20).to_be_bytes()),
        ),
        (
            "malformed body",
            with(header(RpcKind::AppendEntries), b"\x00\x00\x00\x03abc"),
        ),
        (
            "truncated body",
            with(header(RpcKind::Vote), b"\x00\x00\x00\x64{}"),
        ),
    ];
    let n = cases.len() as u64;
    for (what, bytes) in cases {
        match send_raw(&conn, &bytes).await {
            Err(ReadToEndError::Read(ReadError::Reset(code))) => {
                assert_eq!(code, codes::BAD_FRAME, "{what}");
            }
            other => panic!("{what}: expected a reset, got {other:?}"),
        }
    }
    assert_eq!(server.stats().bad_frames, n);
    assert!(echo.seen().is_empty());

    // Same connection, a good request.
    assert_vote_answered(&conn).await;
    // And a new peer.
    let (client, _) = serve(&node_tls(&ca, 3), 3);
    let reply = client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    assert!(matches!(reply, RpcReply::Vote(Ok(_))));
    assert_eq!(echo.seen(), [1, 3]);
}

#[tokio::test]
async fn calls_fail_in_time_and_say_why() {
    let ca = generate_ca("test").unwrap();
    let (server, _) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap().to_string();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let short = Duration::from_millis(300);

    // The handler never answers a write.
    let write = Rpc::Forward(Forward::Write(Command::DeleteGroup {
        id: "x".into(),
        force: false,
    }));
    let started = Instant::now();
    let e = client.call(2, &addr, write, short).await.unwrap_err();
    assert!(matches!(e, TransportError::Timeout(_)), "{e}");
    assert!(started.elapsed() < patience());

    // Nobody listens on that port: unreachable, within the timeout.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let e = client
        .call(9, &silent_addr, vote(), short)
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert!(started.elapsed() < patience());

    // Too large to send: refused locally.
    let huge = Rpc::Forward(Forward::Write(Command::PutCertificate {
        certificate: Certificate {
            name: "big".into(),
            chain: "x".repeat(9 << 20),
            private_key: String::new(),
            not_after: None,
        },
    }));
    let e = client.call(2, &addr, huge, patience()).await.unwrap_err();
    assert!(matches!(e, TransportError::TooLarge { .. }), "{e}");

    // Unresolvable address.
    let e = client
        .call(2, "no-such-host.invalid:1", vote(), short)
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert_eq!(client.stats().calls_failed, 4);
}

/// A kept connection on which a call went unanswered, with the peer
/// sending nothing but acknowledgements meanwhile, is not used again: the
/// next call makes a fresh connection. (Acknowledgements alone used to
/// count as a live peer, and a connection whose streams nobody served kept
/// every call on it timing out until QUIC's idle timeout.)
#[tokio::test]
async fn a_connection_that_only_acknowledges_a_call_is_replaced() {
    let ca = generate_ca("test").unwrap();
    let (server, _) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap().to_string();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    client.call(2, &addr, vote(), patience()).await.unwrap();
    assert_eq!(client.stats().connects, 1);

    // The handler never answers a write: the peer acknowledges the request
    // and sends nothing else.
    let write = Rpc::Forward(Forward::Write(Command::DeleteGroup {
        id: "x".into(),
        force: false,
    }));
    let e = client
        .call(2, &addr, write, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Timeout(_)), "{e}");

    client.call(2, &addr, vote(), patience()).await.unwrap();
    assert_eq!(client.stats().connects, 2, "a fresh connection");
    assert_eq!(server.stats().connections_accepted, 2);
}

/// A UDP forwarder from one client to `server` that drops every datagram,
/// both ways, while it is cut: a partition between two nodes.
struct Forwarder {
    addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Forwarder {
    async fn to(server: SocketAddr) -> Self {
        Self::delayed(server, Duration::ZERO, Duration::ZERO).await
    }

    /// A link that delays each datagram by `one_way`, and what the dialler
    /// sends in QUIC's long-header (handshake) packets by `handshake_extra`
    /// more: its first calls overtake its last handshake packet when sent
    /// within that much of it, as a link with jitter reorders them.
    async fn delayed(server: SocketAddr, one_way: Duration, handshake_extra: Duration) -> Self {
        Self::build(server, one_way, Duration::ZERO, handshake_extra).await
    }

    /// A link that delays each datagram, either way, by `one_way ± jitter`
    /// (drawn for each): datagrams sent within `2 × jitter` of each other
    /// arrive in any order.
    async fn jittered(server: SocketAddr, one_way: Duration, jitter: Duration) -> Self {
        Self::build(server, one_way, jitter, Duration::ZERO).await
    }

    async fn build(
        server: SocketAddr,
        one_way: Duration,
        jitter: Duration,
        handshake_extra: Duration,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = Arc::new(tokio::net::UdpSocket::bind(loopback()).await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind(loopback()).await.unwrap());
        back.connect(server).await.unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (up_queue, up_sent) = delay_line(back.clone());
        let (down_queue, down_sent) = delay_line(front.clone());
        let up = {
            let (front, cut, client) = (front.clone(), cut.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let long_header = buf[0] & 0x80 != 0;
                    let delay = jittered(one_way, jitter)
                        + if long_header {
                            handshake_extra
                        } else {
                            Duration::ZERO
                        };
                    let _ = up_queue.send((Instant::now() + delay, buf[..n].to_vec(), None));
                }
            })
        };
        let down = {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(to) = to.filter(|_| !cut.load(Ordering::SeqCst)) {
                        let _ = down_queue.send((
                            Instant::now() + jittered(one_way, jitter),
                            buf[..n].to_vec(),
                            Some(to),
                        ));
                    }
                }
            })
        };
        Self {
            addr: front.local_addr().unwrap(),
            cut,
            tasks: vec![up, down, up_sent, down_sent],
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `one_way ± jitter`, drawn uniformly.
fn jittered(one_way: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return one_way;
    }
    let low = one_way.saturating_sub(jitter);
    low + (one_way + jitter - low).mul_f64(rand::random::<f64>())
}

/// What a delay line sends: when, the datagram, and to whom (`None`: the
/// socket's connected peer).
type Due = (Instant, Vec<u8>, Option<SocketAddr>);

/// Sends each datagram queued to it on `sock` once its due time has come,
/// in the order of their due times (then of arrival): however late the
/// task runs, it never reorders what is due in order.
fn delay_line(
    sock: Arc<tokio::net::UdpSocket>,
) -> (
    tokio::sync::mpsc::UnboundedSender<Due>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Due>();
    let task = tokio::spawn(async move {
        let mut queue = std::collections::BTreeMap::new();
        let mut arrived = 0u64;
        loop {
            let next = queue.keys().next().map(|&(due, _)| due);
            tokio::select! {
                item = rx.recv() => match item {
                    Some((due, datagram, to)) => {
                        arrived += 1;
                        queue.insert((due, arrived), (datagram, to));
                    }
                    None => return,
                },
                () = async {
                    match next {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {
                    while let Some(entry) = queue.first_entry() {
                        if entry.key().0 > Instant::now() {
                            break;
                        }
                        let (datagram, to): (Vec<u8>, Option<SocketAddr>) = entry.remove();
                        let _ = match to {
                            Some(to) => sock.send_to(&datagram, to).await,
                            None => sock.send(&datagram).await,
                        };
                    }
                }
            }
        }
    });
    (tx, task)
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// The acceptor drops (quinn does not buffer) what reaches it before the
/// dialler's last handshake packet. On a link that reorders datagrams
/// within an eighth of a round trip, a call made on a fresh connection
/// loses nothing to that: the dialler waits that long before sending.
#[tokio::test]
async fn a_first_call_is_not_lost_to_a_link_that_reorders_the_handshake() {
    // The STREAM frames of one call on a fresh connection over a 100 ms
    // link, first one that keeps datagrams in order, then one whose
    // last handshake packet is overtaken by what is sent up to 5 ms
    // after it: none is resent.
    let one_way = Duration::from_millis(50);
    let mut sent = Vec::new();
    for reorder in [Duration::ZERO, Duration::from_millis(5)] {
        let ca = generate_ca("test").unwrap();
        let (server, _) = serve(&node_tls(&ca, 2), 2);
        let link = Forwarder::delayed(server.local_addr().unwrap(), one_way, reorder).await;
        let addr = link.addr.to_string();
        let (client, _) = serve(&node_tls(&ca, 1), 1);
        client.call(2, &addr, vote(), patience()).await.unwrap();
        let conn = client.connection_to(2).unwrap();
        sent.push(conn.stats().frame_tx.stream);
    }
    assert_eq!(sent[1], sent[0], "STREAM frames sent: in order, reordered");
}

/// A call that timed out because the link was cut (its probes went
/// unanswered) keeps its connection: after the heal the next call goes
/// out on it, with no new handshake, rather than on a fresh connection.
#[tokio::test]
async fn a_connection_cut_off_by_a_partition_is_kept_for_the_heal() {
    let ca = generate_ca("test").unwrap();
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let link = Forwarder::to(server.local_addr().unwrap()).await;
    let addr = link.addr.to_string();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    client.call(2, &addr, vote(), patience()).await.unwrap();

    link.set_cut(true);
    let e = client
        .call(2, &addr, vote(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Timeout(_)), "{e}");
    // While cut, a call waits on the kept connection for a sign of life
    // and sends nothing; it times out as a call does.
    let e = client
        .call(2, &addr, vote(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Timeout(_)), "{e}");

    link.set_cut(false);
    client.call(2, &addr, vote(), patience()).await.unwrap();
    assert_eq!(
        client.stats().connects,
        1,
        "the same connection after the heal"
    );
    assert_eq!(server.stats().connections_accepted, 1);
    // The first vote and the one after the heal: the call sent into the
    // cut was given up with its stream, and the one held during the cut
    // never went out.
    assert_eq!(echo.seen(), [1, 1]);
}

/// Node 1's transport after one call to node 2, whose process then
/// "dies" without a word: its address is free for a new one with the same
/// key (`tls2`).
async fn peer_vanished_after_a_call(ca: &CaBundle) -> (Transport, NodeTls, SocketAddr) {
    let tls2 = node_tls(ca, 2);
    let (client, _) = serve(&node_tls(ca, 1), 1);
    let (old, _) = serve(&tls2, 2);
    let addr = old.local_addr().unwrap();
    client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    old.release_address().unwrap();
    (client, tls2, addr)
}

/// Starts a new process of node 2 (key `tls2`) on `addr` and checks that
/// node 1's next call reaches it on a second connection of node 1's.
async fn answered_by_a_new_process(client: &Transport, addr: SocketAddr, tls2: &NodeTls) {
    let echo = Arc::new(Echo::default());
    let handler: Arc<dyn RaftHandler> = echo.clone();
    let new = rebind(addr, tls2, 2, &handler).await;
    client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    assert_eq!(echo.seen(), [1]);
    assert_eq!(client.stats().connects, 2);
    assert_eq!(new.stats().connections_accepted, 1);
}

/// A call held on a connection cut off from a peer that meanwhile
/// restarted: the new process resets the old connection at the first
/// probe, and the same call goes out on a fresh one.
#[tokio::test]
async fn a_call_held_for_a_peer_that_restarted_goes_out_on_a_fresh_connection() {
    let ca = generate_ca("test").unwrap();
    let (client, tls2, addr) = peer_vanished_after_a_call(&ca).await;
    let e = client
        .call(2, &addr.to_string(), vote(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Timeout(_)), "{e}");

    answered_by_a_new_process(&client, addr, &tls2).await;
}

#[tokio::test]
async fn reconnects_after_the_peer_restarts() {
    let ca = generate_ca("test").unwrap();
    let tls2 = node_tls(&ca, 2);
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let (server, _) = serve(&tls2, 2);
    let addr = server.local_addr().unwrap();
    client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    server.close().await;
    drop(server);

    answered_by_a_new_process(&client, addr, &tls2).await;
}

#[tokio::test]
async fn a_peer_that_crashed_and_restarted_resets_the_old_connection_at_once() {
    let ca = generate_ca("test").unwrap();
    // A new process with the same key takes the vanished one's address.
    let (client, tls2, addr) = peer_vanished_after_a_call(&ca).await;
    let echo = Arc::new(Echo::default());
    let handler: Arc<dyn RaftHandler> = echo.clone();
    let new = rebind(addr, &tls2, 2, &handler).await;
    // The first call still goes out on the old connection. The new process
    // answers it with a stateless reset, which the client can verify
    // because the reset key comes from the node key: the call fails at
    // once as a reset, not as a timeout after patience().
    let e = client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reset"), "{e}");
    client
        .call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    assert_eq!(echo.seen(), [1]);
    assert_eq!(new.stats().connections_accepted, 1);
}

#[tokio::test]
async fn calls_ride_the_connection_the_peer_opened() {
    let ca = generate_ca("test").unwrap();
    let (a, echo_a) = serve(&node_tls(&ca, 1), 1);
    let (b, echo_b) = serve(&node_tls(&ca, 2), 2);
    let a_addr = a.local_addr().unwrap().to_string();
    let b_addr = b.local_addr().unwrap().to_string();
    b.call(1, &a_addr, vote(), patience()).await.unwrap();
    // Node 1 answers on node 2's connection and calls back on it: no
    // handshake of its own.
    a.call(2, &b_addr, vote(), patience()).await.unwrap();
    assert_eq!(a.uses_own_connection(2), Some(false));
    assert_eq!(a.stats().connects, 0);
    assert_eq!(b.stats().connections_accepted, 0);
    assert_eq!(a.stats().connections_accepted, 1);
    assert_eq!((echo_a.seen(), echo_b.seen()), (vec![2], vec![1]));
}

#[tokio::test]
async fn a_peer_that_does_not_announce_two_way_calls_is_not_called_on_its_connection() {
    // A node of an earlier release serves calls only on connections it
    // accepted, and says nothing on those it opens.
    let ca = generate_ca("test").unwrap();
    let (b, echo) = serve(&node_tls(&ca, 2), 2);
    let (_ep, conn) = raw_client(&node_tls(&ca, 1), b.local_addr().unwrap(), 2).await;
    assert_vote_answered(&conn).await;
    assert_eq!(echo.seen(), [1]);
    assert_eq!(b.uses_own_connection(1), None, "not adopted");
}

#[tokio::test]
async fn a_peer_known_to_serve_both_ways_is_called_on_its_next_connection_until_a_call_times_out() {
    let ca = generate_ca("test").unwrap();
    let tls2 = node_tls(&ca, 2);
    let (a, _) = serve(&node_tls(&ca, 1), 1);
    let a_addr = a.local_addr().unwrap();
    let (b, _) = serve(&tls2, 2);
    b.call(1, &a_addr.to_string(), vote(), patience())
        .await
        .unwrap();
    eventually("node 2's announcement", || {
        a.uses_own_connection(2) == Some(false)
    })
    .await;
    b.close().await;
    // Node 2 comes back as a release that does not serve its own
    // connections: node 1 takes its connection on trust at accept...
    let (_ep, _conn) = raw_client(&tls2, a_addr, 1).await;
    let (b2, echo) = serve(&tls2, 2);
    let b2_addr = b2.local_addr().unwrap().to_string();
    eventually("the new connection taken on trust", || {
        a.uses_own_connection(2) == Some(false)
    })
    .await;
    // ...and gives it up when a call on it goes unanswered.
    let e = a
        .call(2, &b2_addr, vote(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Timeout(_)), "{e}");
    a.call(2, &b2_addr, vote(), patience()).await.unwrap();
    assert_eq!(a.uses_own_connection(2), Some(true));
    assert_eq!(echo.seen(), [1]);
}

#[tokio::test]
async fn crossing_handshakes_settle_on_the_lower_ids_connection() {
    let ca = generate_ca("test").unwrap();
    let (a, _) = serve(&node_tls(&ca, 1), 1);
    let (b, _) = serve(&node_tls(&ca, 2), 2);
    let a_addr = a.local_addr().unwrap().to_string();
    let b_addr = b.local_addr().unwrap().to_string();
    // Neither has a connection yet: both open one.
    let (ab, ba) = tokio::join!(
        a.call(2, &b_addr, vote(), patience()),
        b.call(1, &a_addr, vote(), patience())
    );
    ab.unwrap();
    ba.unwrap();
    eventually("both handshakes done", || {
        a.stats().connects == 1 && b.stats().connects == 1
    })
    .await;
    // From now on both use node 1's; node 2 retires its own.
    b.call(1, &a_addr, vote(), patience()).await.unwrap();
    a.call(2, &b_addr, vote(), patience()).await.unwrap();
    assert_eq!(a.uses_own_connection(2), Some(true));
    assert_eq!(b.uses_own_connection(1), Some(false));
    b.call(1, &a_addr, vote(), patience()).await.unwrap();
    assert_eq!((a.stats().connects, b.stats().connects), (1, 1));
}

#[tokio::test]
async fn a_restarted_peer_is_called_on_its_new_connection_at_once() {
    let ca = generate_ca("test").unwrap();
    let tls2 = node_tls(&ca, 2);
    let (a, _) = serve(&node_tls(&ca, 1), 1);
    let a_addr = a.local_addr().unwrap().to_string();
    let (old, _) = serve(&tls2, 2);
    let addr = old.local_addr().unwrap();
    a.call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    // Node 1's connection ages past the time two handshakes can cross;
    // then node 2 dies without a word and comes back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.release_address().unwrap();
    let echo = Arc::new(Echo::default());
    let handler: Arc<dyn RaftHandler> = echo.clone();
    let new = rebind(addr, &tls2, 2, &handler).await;
    // The new process reaches node 1 first (as a restarted voter does):
    // node 1 drops its old connection and calls on the new one, where it
    // would otherwise lose a call to the reset.
    new.call(1, &a_addr, vote(), patience()).await.unwrap();
    a.call(2, &addr.to_string(), vote(), patience())
        .await
        .unwrap();
    assert_eq!(a.uses_own_connection(2), Some(false));
    assert_eq!(echo.seen(), [1]);
    assert_eq!(a.stats().connects, 1, "no handshake of node 1's own");
}

#[tokio::test]
async fn raft_connections_refuse_unidirectional_streams() {
    let ca = generate_ca("test").unwrap();
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap();
    let (_ep, conn) = raw_client(&node_tls(&ca, 1), addr, 2).await;
    let mut uni = conn.open_uni().await.unwrap();
    let _ = uni.write_all(b"gossip on the raft alpn").await;
    let stopped = timeout(patience(), uni.stopped()).await.unwrap();
    assert_eq!(stopped.unwrap(), Some(codes::UNSUPPORTED));
    // The connection still serves RPCs.
    assert_vote_answered(&conn).await;
    assert_eq!(echo.seen(), [1]);
}

/// A call reads its stream to the end on both sides when the end has
/// arrived, so neither side stops it: before, each call cost a
/// STOP_SENDING frame each way (a packet more, and its acknowledgement),
/// which made an idle cluster's heartbeats half again as expensive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_end_their_streams_without_stopping_them() {
    let ca = generate_ca("test").unwrap();
    let (a, _) = serve(&node_tls(&ca, 1), 1);
    let (b, _) = serve(&node_tls(&ca, 2), 2);
    let b_addr = b.local_addr().unwrap().to_string();
    a.call(2, &b_addr, vote(), patience()).await.unwrap();
    let conn = a.connection_to(2).unwrap();
    let before = conn.stats();
    let calls = 20;
    for _ in 0..calls {
        a.call(2, &b_addr, vote(), patience()).await.unwrap();
        // Spaced like heartbeats: nothing else on the connection meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = conn.stats();
    let sent = after.frame_tx.stop_sending - before.frame_tx.stop_sending;
    let received = after.frame_rx.stop_sending - before.frame_rx.stop_sending;
    let datagrams = (after.udp_tx.datagrams + after.udp_rx.datagrams)
        - (before.udp_tx.datagrams + before.udp_rx.datagrams);
    eprintln!(
        "{calls} calls: {datagrams} datagrams, STOP_SENDING {sent} sent, {received} received"
    );
    // A stream whose end was still on the way is stopped as before.
    assert!(
        sent < calls / 2 && received < calls / 2,
        "{calls} calls stopped {sent} streams here and {received} at the peer"
    );
}

/// A connection the transport let go, waiting out its grace before it is
/// closed, does not keep the endpoint (and its port) past the endpoint's
/// close: a node started again in the same process binds the port.
#[tokio::test]
async fn a_connection_let_go_releases_the_endpoint_at_its_close() {
    let ca = generate_ca("test").unwrap();
    let (server, _) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap();
    let (ep, conn) = raw_client(&node_tls(&ca, 1), addr, 2).await;
    let local = ep.local_addr().unwrap();
    let waiting = tokio::spawn(transport::close_after(
        conn,
        Duration::from_secs(3600),
        b"test",
    ));
    ep.close(0u32.into(), b"shutdown");
    drop(ep);
    timeout(patience(), waiting)
        .await
        .expect("the waiting task ends with the connection")
        .unwrap();
    // Its socket is free again.
    let deadline = Instant::now() + patience();
    while std::net::UdpSocket::bind(local).is_err() {
        assert!(Instant::now() < deadline, "{local} still bound");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A snapshot chunk of `data`, as the leader sends one.
fn snapshot_chunk(data: Vec<u8>) -> Rpc {
    Rpc::InstallSnapshot(InstallSnapshotRequest {
        vote: Vote::new_committed(7, 1),
        meta: openraft::SnapshotMeta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: "7-1-0".into(),
        },
        offset: 0,
        data,
        done: true,
    })
}

/// JSON-like data that deflates well, as a snapshot's does.
fn snapshot_like_data() -> Vec<u8> {
    (0..4_000)
        .flat_map(|i| {
            format!(
                r#"{{"name":"web-{i}","address":"10.0.{}.{}"}},"#,
                i >> 8,
                i & 255
            )
            .into_bytes()
        })
        .collect()
}

/// A node of `alpns` (an earlier release offers only `edgelb-raft/1`)
/// that reads one request as node 2 and answers it: the negotiated ALPN
/// and the request's body as it came off the wire.
async fn one_request_to(
    ca: &CaBundle,
    alpns: &[&[u8]],
    call: impl AsyncFnOnce(SocketAddr),
) -> (Option<Vec<u8>>, Vec<u8>) {
    let tls = node_tls(ca, 2);
    let ep = Endpoint::server(tls.server_config_offering(alpns).unwrap(), loopback()).unwrap();
    let addr = ep.local_addr().unwrap();
    let (heard, served) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let head = frame::read_frame(&mut recv, HEADER_LIMIT).await.unwrap();
        let kind = frame::decode_header(&head).unwrap().rpc;
        let body = frame::read_frame(&mut recv, kind.request_limit())
            .await
            .unwrap();
        let reply = RpcReply::InstallSnapshot(Ok(InstallSnapshotResponse {
            vote: Vote::new_committed(7, 1),
        }));
        send.write_all(&frame::encode(&reply, 1024).unwrap())
            .await
            .unwrap();
        let _ = send.finish();
        let _ = heard.send((tls::negotiated_alpn(&conn), body));
        // The connection stays open while the caller reads the answer.
        conn.closed().await;
    });
    call(addr).await;
    timeout(patience(), served).await.unwrap().unwrap()
}

/// Between current nodes a snapshot chunk's data travels deflated
/// (`edgelb-raft/2`); to a node of an earlier release, which offers only
/// `edgelb-raft/1`, as version 1's JSON, which that node reads.
#[tokio::test]
async fn snapshot_chunks_go_deflated_to_current_nodes_and_as_json_to_earlier_ones() {
    let ca = generate_ca("test").unwrap();
    let data = snapshot_like_data();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let client = &client;
    let call = |addr: SocketAddr| {
        let data = data.clone();
        async move {
            let reply = client
                .call(2, &addr.to_string(), snapshot_chunk(data), patience())
                .await
                .unwrap();
            assert!(
                matches!(reply, RpcReply::InstallSnapshot(Ok(_))),
                "{reply:?}"
            );
        }
    };
    let chunk_of =
        |body: &[u8], version| match frame::decode_request(RpcKind::InstallSnapshot, body, version)
        {
            Ok(Rpc::InstallSnapshot(chunk)) => Ok(chunk.data),
            other => Err(format!("{other:?}")),
        };

    let (alpn, body) = one_request_to(&ca, &[ALPN_RAFT_2, ALPN_RAFT], call).await;
    assert_eq!(alpn.as_deref(), Some(ALPN_RAFT_2));
    assert_eq!(chunk_of(&body, Version::V2).unwrap(), data);
    assert!(
        body.len() * 4 < data.len(),
        "{} bytes for {}",
        body.len(),
        data.len()
    );

    let (alpn, body) = one_request_to(&ca, &[ALPN_RAFT], call).await;
    assert_eq!(alpn.as_deref(), Some(ALPN_RAFT));
    assert_eq!(chunk_of(&body, Version::V1).unwrap(), data);
    assert!(chunk_of(&body, Version::V2).is_err());
}

/// A node of an earlier release (offering only `edgelb-raft/1`) sends a
/// snapshot chunk as version 1's JSON; a current node reads it.
#[tokio::test]
async fn a_current_node_reads_snapshot_chunks_from_an_earlier_one() {
    let ca = generate_ca("test").unwrap();
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let addr = server.local_addr().unwrap();
    let ep = Endpoint::client(loopback()).unwrap();
    let config = node_tls(&ca, 1)
        .client_config_offering(&[ALPN_RAFT], None, Duration::from_secs(10))
        .unwrap();
    let conn = ep
        .connect_with(config, addr, &node_dns_name(2))
        .unwrap()
        .await
        .unwrap();
    assert_eq!(tls::negotiated_alpn(&conn).as_deref(), Some(ALPN_RAFT));
    let data = snapshot_like_data();
    let request = frame::encode_request(1, &snapshot_chunk(data.clone()), Version::V1).unwrap();
    let reply = send_raw(&conn, &request).await.unwrap();
    assert!(matches!(
        frame::decode_reply(&reply[4..]).unwrap(),
        RpcReply::InstallSnapshot(Ok(_))
    ));
    let chunks = echo.chunks.lock().unwrap().clone();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].data, data);
}

#[derive(Debug)]
struct NoCampaign;

impl VoteSink for NoCampaign {
    fn votes_sent(&self) {}
}

/// The id of log entry `index`, of leader 1 in term 3.
fn log_id(index: u64) -> openraft::LogId<u64> {
    openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), index)
}

/// Entry `index`: a command of about `size` bytes of JSON.
fn entry(index: u64, size: usize) -> raft_store::types::Entry {
    raft_store::types::Entry {
        log_id: log_id(index),
        payload: openraft::EntryPayload::Normal(raft_store::types::Request {
            command: Command::DetachInstance {
                group: "g".repeat(size),
                instance: "i".into(),
            },
        }),
    }
}

/// An append of `entries` after entry `prev`, from leader 1 in term 3.
fn append(
    prev: Option<u64>,
    entries: Vec<raft_store::types::Entry>,
) -> openraft::raft::AppendEntriesRequest<raft_store::TypeConfig> {
    openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(3, 1),
        prev_log_id: prev.map(log_id),
        entries,
        leader_commit: None,
    }
}

/// Node 1's openraft client of node 2, whose Raft is an [`Echo`]: node 1's
/// transport, node 2's (kept for as long as the test uses it), its echo,
/// and the client.
async fn client_of_echo() -> (Arc<Transport>, Transport, Arc<Echo>, PeerNetwork) {
    let ca = generate_ca("test").unwrap();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let client = Arc::new(client);
    let peer = openraft_client_of(&client, server.local_addr().unwrap()).await;
    (client, server, echo, peer)
}

/// `client`'s openraft client of node 2 at `addr`.
async fn openraft_client_of(client: &Arc<Transport>, addr: SocketAddr) -> PeerNetwork {
    use openraft::network::RaftNetworkFactory;

    let node = raft_store::ClusterNode {
        region: "local".into(),
        cluster_addr: addr.to_string(),
        admin_addr: "127.0.0.1:1".into(),
    };
    let mut network = Network::new(Arc::clone(client), Arc::new(NoCampaign));
    network.new_client(2, &node).await
}

/// An append goes out cut to what the connection sends within the call's
/// limit, and openraft is told the follower matched up to the last entry
/// sent, not the whole request's: before a connection exists that is
/// 64 KiB (one entry of 40 KB of eight); on loopback's round trip many
/// windows, and the eight go whole.
#[tokio::test]
async fn an_append_over_the_window_is_cut_and_answered_as_a_partial_success() {
    use openraft::network::{RPCOption, RaftNetwork};
    use openraft::raft::AppendEntriesResponse;

    let (client, _server, echo, mut peer) = client_of_echo().await;
    // Eight entries of about 40 KB: 320 KB.
    let entries = || (10..18).map(|i| entry(i, 40_000)).collect::<Vec<_>>();
    let append = |entries| append(Some(9), entries);
    let option = RPCOption::new(patience());
    let reply = peer
        .append_entries(append(entries()), option.clone())
        .await
        .unwrap();
    assert_eq!(
        reply,
        AppendEntriesResponse::PartialSuccess(Some(log_id(10)))
    );
    assert_eq!(*echo.appends.lock().unwrap(), [1]);
    // The connection up, its window and round trip known.
    assert!(client.window(2).is_some() && client.rtt(2).is_some());
    let reply = peer
        .append_entries(append(entries()), option.clone())
        .await
        .unwrap();
    assert_eq!(reply, AppendEntriesResponse::Success);
    assert_eq!(*echo.appends.lock().unwrap(), [1, 8]);
    // One entry goes whole, however large.
    let one = vec![entry(10, 1 << 20)];
    let reply = peer.append_entries(append(one), option).await.unwrap();
    assert_eq!(reply, AppendEntriesResponse::Success);
}

/// An append of one entry larger than its budget goes on past openraft's
/// limit: the call answers `Timeout` when its limit runs out, and
/// openraft's next appends of the same entry wait for the same sending
/// instead of sending it again, also once the budget has grown past the
/// entry (here: 100 KB, over the 64 KiB before a connection exists, under
/// loopback's 4 MiB after) and after an awaited empty append. An append of
/// another entry is sent anew.
#[tokio::test]
async fn an_entry_over_its_budget_goes_on_past_the_limit_and_is_sent_once() {
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};

    let (client, _server, echo, mut peer) = client_of_echo().await;
    let append = |prev, entries| append(Some(prev), entries);
    let short = RPCOption::new(Duration::from_millis(200));
    // Appends with entries the follower received.
    let received = || {
        echo.appends
            .lock()
            .unwrap()
            .iter()
            .filter(|n| **n > 0)
            .count()
    };
    // As openraft does: the same append again while it times out.
    async fn until_answered(
        peer: &mut PeerNetwork,
        rpc: AppendEntriesRequest<raft_store::TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, String> {
        let deadline = Instant::now() + patience();
        loop {
            let option = RPCOption::new(Duration::from_millis(200));
            match peer.append_entries(rpc.clone(), option).await {
                Err(RPCError::Timeout(_)) if Instant::now() < deadline => {}
                r => break r.map_err(|e| e.to_string()),
            }
        }
    }

    let held = echo.answer_appends.lock().await;
    let r = peer
        .append_entries(append(9, vec![entry(10, 100_000)]), short.clone())
        .await;
    assert!(matches!(r, Err(RPCError::Timeout(_))), "{r:?}");
    eventually("the follower to receive the append", || received() == 1).await;
    assert!(client.window(2).is_some() && client.rtt(2).is_some());
    // Sent again while unanswered, now within the budget: it waits for
    // the same sending.
    let r = peer
        .append_entries(append(9, vec![entry(10, 100_000)]), short.clone())
        .await;
    assert!(matches!(r, Err(RPCError::Timeout(_))), "{r:?}");
    // An empty append that waits for its answer leaves it going.
    client.heartbeat_refused(2);
    let r = peer.append_entries(append(10, vec![]), short.clone()).await;
    assert!(matches!(r, Err(RPCError::Timeout(_))), "{r:?}");
    drop(held);
    // With a small entry after it the large one goes alone, and its answer
    // is that of the first sending: the follower received it once.
    let reply = until_answered(
        &mut peer,
        append(9, vec![entry(10, 100_000), entry(11, 10)]),
    )
    .await
    .unwrap();
    assert_eq!(
        reply,
        AppendEntriesResponse::PartialSuccess(Some(log_id(10)))
    );
    assert_eq!(received(), 1);

    // Another entry (the next after the first) is sent anew.
    let held = echo.answer_appends.lock().await;
    let r = peer
        .append_entries(append(10, vec![entry(11, 5 << 20)]), short.clone())
        .await;
    assert!(matches!(r, Err(RPCError::Timeout(_))), "{r:?}");
    eventually("the follower to receive the second", || received() == 2).await;
    drop(held);
    let reply = until_answered(&mut peer, append(10, vec![entry(11, 5 << 20)]))
        .await
        .unwrap();
    assert_eq!(reply, AppendEntriesResponse::Success);
    assert_eq!(received(), 2);
}

/// A call dropped before its answer (openraft's own limit, a long append
/// given up) resets its request's stream: quinn finishes a send stream that
/// is dropped, so the rest of a large request would go on after it. The
/// follower here reads the header and stops reading, the request (16 MB)
/// waits on its stream window, the call is dropped, and then the follower
/// reads on: the stream was reset.
#[tokio::test]
async fn a_call_dropped_before_its_answer_resets_its_stream() {
    let ca = generate_ca("test").unwrap();
    let tls = node_tls(&ca, 2);
    let ep = Endpoint::server(
        tls.server_config_offering(&[ALPN_RAFT_2, ALPN_RAFT])
            .unwrap(),
        loopback(),
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let (started, reading) = tokio::sync::oneshot::channel();
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let (read, rest) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        frame::read_frame(&mut recv, HEADER_LIMIT).await.unwrap();
        let _ = started.send(());
        let _ = gone.await;
        let _ = read.send(recv.read_to_end(64 << 20).await.map(|b| b.len()));
        conn.closed().await;
    });
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let rpc = Rpc::AppendEntries(append(None, vec![entry(10, 16 << 20)]));
    let addr = addr.to_string();
    let call = client.call(2, &addr, rpc, patience());
    tokio::select! {
        r = call => panic!("answered: {r:?}"),
        r = reading => r.unwrap(),
    }
    // The call is dropped.
    go.send(()).unwrap();
    let r = timeout(patience(), rest).await.unwrap().unwrap();
    assert!(
        matches!(r, Err(ReadToEndError::Read(ReadError::Reset(code))) if code == codes::TIMEOUT),
        "{r:?}"
    );
}

/// Datagrams a link reorders are not taken for lost ones: a 4 MB append
/// through a link of 50 ms ± 4 ms each way (datagrams sent within 8 ms of
/// each other arrive in any order, and QUIC paces a window over the round
/// trip) reaches the peer with under 10 % of its packets counted as lost
/// and few cuts of the congestion window: 1–22 of about 3,000 and 1–8 in
/// five runs here (those acknowledged more than 9/8 of the round trip
/// after they were sent, the threshold then; none without the jitter),
/// 162 of 3,165 once while other builds and tests held both CPUs (the
/// user-space link then delays datagrams by more than its jitter). With
/// QUIC's default reordering threshold (3 packets): 660 of 3,650 and 326
/// cuts, 8 s instead of 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_a_link_reorders_are_not_taken_for_lost() {
    let ms = Duration::from_millis;
    let ca = generate_ca("test").unwrap();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let (server, echo) = serve(&node_tls(&ca, 2), 2);
    let link = Forwarder::jittered(server.local_addr().unwrap(), ms(50), ms(4)).await;
    let addr = link.addr.to_string();
    client.call(2, &addr, vote(), patience()).await.unwrap();
    let rpc = Rpc::AppendEntries(append(None, vec![entry(10, 4 << 20)]));
    let reply = client
        .call(2, &addr, rpc, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(reply, RpcReply::AppendEntries(Ok(_))), "{reply:?}");
    assert_eq!(echo.appends.lock().unwrap().clone(), vec![1]);
    let stats = client.connection_to(2).expect("a connection").stats();
    eprintln!(
        "sent {} packets, {} lost, {} congestion events",
        stats.path.sent_packets, stats.path.lost_packets, stats.path.congestion_events
    );
    assert!(stats.path.sent_packets > 2_500, "{stats:?}");
    assert!(
        stats.path.lost_packets * 10 < stats.path.sent_packets,
        "{} of {} packets counted as lost",
        stats.path.lost_packets,
        stats.path.sent_packets
    );
    assert!(stats.path.congestion_events < 30, "{stats:?}");
}

/// A node of `edgelb-raft/1` only (an earlier release) that answers every
/// snapshot chunk it is sent, on any stream: each chunk's offset and size.
async fn earlier_node_taking_chunks(ca: &CaBundle) -> (SocketAddr, Arc<Mutex<Vec<(u64, usize)>>>) {
    let tls = node_tls(ca, 2);
    let ep = Endpoint::server(
        tls.server_config_offering(&[ALPN_RAFT]).unwrap(),
        loopback(),
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let chunks: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let seen = chunks.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let head = frame::read_frame(&mut recv, HEADER_LIMIT).await.unwrap();
                    let kind = frame::decode_header(&head).unwrap().rpc;
                    let body = frame::read_frame(&mut recv, kind.request_limit())
                        .await
                        .unwrap();
                    let Ok(Rpc::InstallSnapshot(chunk)) =
                        frame::decode_request(kind, &body, Version::V1)
                    else {
                        continue;
                    };
                    seen.lock().unwrap().push((chunk.offset, chunk.data.len()));
                    let reply =
                        RpcReply::InstallSnapshot(Ok(InstallSnapshotResponse { vote: chunk.vote }));
                    let _ = send.write_all(&frame::encode(&reply, 1024).unwrap()).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (addr, chunks)
}

/// A snapshot of `len` bytes in a file, and the bytes.
async fn snapshot_of(
    len: usize,
) -> (
    tempfile::NamedTempFile,
    openraft::Snapshot<raft_store::TypeConfig>,
    Vec<u8>,
) {
    let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let snapshot = openraft::Snapshot {
        meta: openraft::SnapshotMeta {
            last_log_id: Some(log_id(10)),
            last_membership: openraft::StoredMembership::default(),
            snapshot_id: "s-10".into(),
        },
        snapshot: Box::new(tokio::fs::File::open(file.path()).await.unwrap()),
    };
    (file, snapshot, data)
}

/// A snapshot goes to a current node in chunks of 1 MiB, the most
/// `edgelb-raft/2` takes (all but the first, sent before a connection told
/// the peer's version: openraft's 256 KiB), and to a node of an earlier
/// release (`edgelb-raft/1`, whose frames are 3.3 times a chunk's bytes) in
/// chunks of 256 KiB; whole either way.
#[tokio::test]
async fn a_snapshot_goes_in_chunks_as_large_as_the_peer_reads() {
    use openraft::network::{RPCOption, RaftNetwork};

    const KIB: usize = 1024;
    let option = || RPCOption::new(Duration::from_secs(15));
    let vote = Vote::new_committed(7, 1);
    let (_client, _server, echo, mut peer) = client_of_echo().await;
    let (_file, snapshot, data) = snapshot_of(3 * 1024 * KIB + 5).await;
    let r = peer
        .full_snapshot(vote, snapshot, std::future::pending(), option())
        .await
        .unwrap();
    assert_eq!(r.vote, vote);
    let chunks = echo.chunks_by_offset();
    let sizes: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
    assert_eq!(sizes, [256 * KIB, 1024 * KIB, 1024 * KIB, 768 * KIB + 5]);
    assert_eq!(echo.snapshot_bytes(), data);

    // An earlier release's node.
    let ca = generate_ca("test").unwrap();
    let (client, _) = serve(&node_tls(&ca, 1), 1);
    let (addr, seen) = earlier_node_taking_chunks(&ca).await;
    let mut peer = openraft_client_of(&Arc::new(client), addr).await;
    let (_file, snapshot, _) = snapshot_of(1024 * KIB + 5).await;
    peer.full_snapshot(vote, snapshot, std::future::pending(), option())
        .await
        .unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            (0, 256 * KIB),
            (256 * 1024, 256 * KIB),
            (512 * 1024, 256 * KIB),
            (768 * 1024, 256 * KIB),
            (1024 * 1024, 5)
        ]
    );
}

/// A snapshot of `len` bytes sent by node 1 to an [`Echo`] that holds each
/// chunk's answer `hold_ms` and fails the first chunk at `fail_at`, over a
/// connection that told the version first (so every chunk is 1 MiB): the
/// echo, the chunks in the order they came with how many were in flight
/// (offset, in flight), and the bytes sent.
async fn snapshot_to_echo(
    len: usize,
    hold_ms: u64,
    fail_at: Option<u64>,
) -> (Arc<Echo>, Vec<Chunk>, Vec<(u64, usize)>, Vec<u8>) {
    use openraft::network::{RPCOption, RaftNetwork};
    use std::sync::atomic::Ordering::SeqCst;

    let option = RPCOption::new(Duration::from_secs(15));
    let vote = Vote::new_committed(7, 1);
    let (_client, _server, echo, mut peer) = client_of_echo().await;
    peer.vote(VoteRequest::new(vote, None), option.clone())
        .await
        .unwrap();
    echo.hold_chunks_ms.store(hold_ms, SeqCst);
    *echo.fail_chunk_at.lock().unwrap() = fail_at;
    let (_file, snapshot, data) = snapshot_of(len).await;
    peer.full_snapshot(vote, snapshot, std::future::pending(), option)
        .await
        .unwrap();
    let arrived = echo.chunks.lock().unwrap().clone();
    let in_flight = arrived.iter().map(|c| (c.offset, c.in_flight)).collect();
    (echo, arrived, in_flight, data)
}

/// Several snapshot chunks are in flight at once: the follower's answers
/// held 300 ms, a current node gets the middle chunks of a 12 MiB
/// snapshot (1 MiB each) before the earlier ones' answers, at most four
/// at a time; the first chunk (which starts the follower's file) and the
/// last (which installs it) each come alone, after every earlier chunk
/// was answered; the bytes are whole. openraft's own loop sent one chunk
/// per round trip.
#[tokio::test]
async fn snapshot_chunks_overlap_but_the_first_and_the_last_go_alone() {
    let (echo, arrived, in_flight, data) = snapshot_to_echo(12 * 1024 * 1024 + 5, 300, None).await;
    assert_eq!(arrived.len(), 13, "each chunk once: {in_flight:?}");
    // The first chunk was answered before the second came.
    let (first, second, last) = (&arrived[0], &arrived[1], &arrived[12]);
    assert_eq!(first.offset, 0, "{in_flight:?}");
    assert_eq!(second.in_flight, 1, "{in_flight:?}");
    assert!(last.done && last.in_flight == 1, "{in_flight:?}");
    let most = arrived.iter().map(|c| c.in_flight).max().unwrap();
    assert!(
        (2..=network::MAX_CHUNKS_IN_FLIGHT).contains(&most),
        "chunks in flight at once: {in_flight:?}"
    );
    assert_eq!(echo.snapshot_bytes(), data);
}

/// A chunk that fails while later ones are in flight is sent again, and
/// every chunk after it: the follower writes each at its offset, so the
/// bytes come out whole, and the last chunk still goes alone, once every
/// earlier one is answered.
#[tokio::test]
async fn a_snapshot_chunk_that_fails_among_others_is_sent_again_with_those_after_it() {
    const MIB: u64 = 1024 * 1024;
    let (echo, arrived, offsets, data) =
        snapshot_to_echo(6 * 1024 * 1024 + 5, 100, Some(2 * MIB)).await;
    let sent = |offset| arrived.iter().filter(|c| c.offset == offset).count();
    assert_eq!(sent(2 * MIB), 2, "{offsets:?}");
    // The first chunk went once; the second may go again if its answer
    // came after the third's failure.
    assert_eq!(sent(0), 1, "{offsets:?}");
    assert!((1..=2).contains(&sent(MIB)), "{offsets:?}");
    let last = arrived.last().unwrap();
    assert!(last.done && last.in_flight == 1, "{offsets:?}");
    assert_eq!(arrived.iter().filter(|c| c.done).count(), 1, "{offsets:?}");
    assert_eq!(echo.snapshot_bytes(), data);
}
