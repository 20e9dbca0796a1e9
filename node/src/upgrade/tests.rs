use std::io::{Read, Write};
use std::os::fd::AsFd;

use super::*;

fn listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind")
}

/// The old side's offer, bound in a fresh data dir.
fn offer() -> (tempfile::TempDir, Offer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let offer = Offer::bind(dir.path()).expect("bind the upgrade socket");
    (dir, offer)
}

/// The whole exchange: every socket arrives, is the same socket (a
/// connection made to it is accepted by the new side), and the steps come
/// in order.
#[tokio::test]
async fn sockets_pass_and_the_steps_come_in_order() {
    let (dir, offer) = offer();
    let admin = listener();
    let port_a = [listener(), listener()];
    let addrs: Vec<_> = port_a.iter().map(|l| l.local_addr().unwrap()).collect();

    let path = dir.path().to_owned();
    let new = tokio::spawn(async move {
        let takeover = Takeover::connect(&path).await.expect("take over");
        takeover.release().await.expect("released");
        takeover
    });
    let incoming = offer.next().await;
    assert_eq!(incoming.pid, std::process::id());
    let sockets = Sockets {
        admin: Some(admin.as_fd()),
        ports: vec![(8080, port_a.iter().map(AsFd::as_fd).collect())],
    };
    incoming
        .send_sockets(&sockets)
        .await
        .expect("release asked");
    let released = tokio::spawn(incoming.released());
    let mut takeover = new.await.expect("new side");

    let got = takeover.ports.remove(&8080).expect("port 8080 passed");
    let got_addrs: Vec<_> = got.iter().map(|l| l.local_addr().unwrap()).collect();
    assert_eq!(got_addrs, addrs, "the same sockets, in order");
    assert_eq!(
        takeover.admin.as_ref().unwrap().local_addr().unwrap(),
        admin.local_addr().unwrap()
    );
    assert!(bound_to(&got[0], addrs[0]));
    assert!(!bound_to(&got[0], addrs[1]));
    // The old side's copies closed, the socket still listens: a connection
    // made now is accepted on the new side.
    drop(port_a);
    let mut client = std::net::TcpStream::connect(addrs[0]).expect("connect");
    client.write_all(b"hi").unwrap();
    let (mut accepted, _) = got[0].accept().expect("accepted by the new side");
    let mut two = [0; 2];
    accepted.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"hi");

    takeover.ready().await.expect("ready sent");
    released.await.unwrap().expect("the old side saw ready");
}

/// A new process that goes away before `release` leaves the old one as it
/// was: the offer takes the next one.
#[tokio::test]
async fn a_new_process_that_goes_away_is_seen_and_the_next_is_taken() {
    let (dir, offer) = offer();
    let admin = listener();
    let path = dir.path().to_owned();
    let first = tokio::spawn(async move {
        let t = Takeover::connect(&path).await.expect("take over");
        t.refuse("the configuration is bad").await;
    });
    let incoming = offer.next().await;
    let sockets = Sockets {
        admin: Some(admin.as_fd()),
        ports: Vec::new(),
    };
    let err = incoming.send_sockets(&sockets).await.expect_err("refused");
    assert!(
        matches!(&err, UpgradeError::Refused(r) if r.contains("configuration")),
        "{err}"
    );
    first.await.unwrap();

    let path = dir.path().to_owned();
    let second = tokio::spawn(async move {
        let t = Takeover::connect(&path).await.expect("take over");
        drop(t);
    });
    let incoming = offer.next().await;
    let err = incoming.send_sockets(&sockets).await.expect_err("gone");
    assert!(matches!(err, UpgradeError::Gone), "{err}");
    second.await.unwrap();
}

/// A peer that does not speak the protocol is turned away without
/// stopping the offer.
#[tokio::test]
async fn garbage_is_turned_away() {
    let (dir, offer) = offer();
    let (_, addr) = address(dir.path()).unwrap();
    let bad = seqpacket().unwrap();
    rustix::net::connect(&bad, &addr).unwrap();
    rustix::net::send(&bad, b"{\"op\":\"release\"}", SendFlags::empty()).unwrap();
    let bad2 = seqpacket().unwrap();
    rustix::net::connect(&bad2, &addr).unwrap();
    rustix::net::send(&bad2, b"\xff not json", SendFlags::empty()).unwrap();

    let path = dir.path().to_owned();
    let good = tokio::spawn(async move { Takeover::connect(&path).await.map(drop) });
    let incoming = tokio::time::timeout(Duration::from_secs(10), offer.next())
        .await
        .expect("the good one is taken");
    incoming
        .send_sockets(&Sockets::default())
        .await
        .expect_err("the new side dropped after the sockets");
    good.await
        .unwrap()
        .expect("the good one received no socket");
}

#[test]
fn a_data_dir_too_deep_for_a_unix_socket_is_named() {
    let deep = PathBuf::from(format!("/tmp/{}", "d".repeat(120)));
    let err = Offer::bind(&deep).expect_err("too long");
    assert!(matches!(err, UpgradeError::PathTooLong(_)), "{err}");
}

#[tokio::test]
async fn nothing_listening_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Takeover::connect(dir.path()).await.expect_err("no node");
    assert!(err.to_string().contains("upgrade.sock"), "{err}");
}

/// A peer that connects and says nothing holds the offer for the hello
/// timeout only; the next one is taken.
#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_hello_timeout() {
    let (dir, offer) = offer();
    let (_, addr) = address(dir.path()).unwrap();
    let silent = seqpacket().unwrap();
    rustix::net::connect(&silent, &addr).unwrap();
    let path = dir.path().to_owned();
    let good = tokio::spawn(async move { Takeover::connect(&path).await.map(drop) });
    let incoming = tokio::time::timeout(HELLO_TIMEOUT * 5, offer.next())
        .await
        .expect("the good one is taken after the silent one's timeout");
    assert_eq!(incoming.pid, std::process::id());
    drop(incoming);
    let _ = good.await;
    drop(silent);
}

/// A message with more than one descriptor, or a `ready` from another
/// pid, is refused; what was passed is closed, not kept.
#[tokio::test]
async fn extra_descriptors_and_a_stranger_ready_are_refused() {
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .unwrap();
    let (sender, receiver) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
    let (one, two) = (listener(), listener());
    let bytes = serde_json::to_vec(&Message::Socket {
        socket: Passed::Admin,
    })
    .unwrap();
    let fds = [one.as_fd(), two.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        &sender.stream,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    let err = receiver
        .recv(Duration::from_secs(5))
        .await
        .expect_err("two descriptors");
    assert!(matches!(err, UpgradeError::Protocol(_)), "{err}");

    let incoming = Incoming {
        channel: receiver,
        pid: 4242,
    };
    let stranger = tokio::spawn(async move {
        let _ = sender.recv(Duration::from_secs(5)).await;
        sender.send(&Message::Ready { pid: 1 }, None).await.unwrap();
        sender
    });
    let err = incoming
        .released()
        .await
        .expect_err("not the new process's pid");
    assert!(matches!(err, UpgradeError::Protocol(_)), "{err}");
    drop(stranger.await);
}
