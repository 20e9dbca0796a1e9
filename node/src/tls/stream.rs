//! A terminated TLS connection as the HTTP side reads it: [`TlsIo`].
//!
//! A connection is read far more often than it has something to give: the
//! connection's loop polls for the next request after every answer, and
//! while a request waits on its instance the client's side is watched for a
//! close. Through `tokio_rustls` every such read is a pass through rustls
//! (a read into its record buffer that finds the socket empty, an error
//! made and dropped), and a read that did return data tries once more for
//! the next record in the same way. Here a read first asks what it would
//! find: when rustls holds no plaintext and the socket has not been
//! readable since it was last drained, the answer is `Pending` at the cost
//! of tokio's readiness check, with the same wake-up registered as the read
//! would register. A read returns one record's plaintext at most.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A server-side TLS connection over TCP, read without idle passes through
/// rustls.
pub struct TlsIo(Box<TlsStream<TcpStream>>);

impl TlsIo {
    pub fn new(tls: Box<TlsStream<TcpStream>>) -> Self {
        Self(tls)
    }

    /// Whether a read would find nothing now: rustls holds no plaintext
    /// and wants more from a socket that is not readable (the read's
    /// wake-up is registered then). A closed connection's socket is
    /// readable, and rustls wants nothing after the peer's close_notify,
    /// so an end is always read.
    fn nothing_to_read(&self, cx: &mut Context<'_>) -> bool {
        let (tcp, session) = self.0.get_ref();
        session.wants_read() && tcp.poll_read_ready(cx).is_pending()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.nothing_to_read(cx) {
            return Poll::Pending;
        }
        let tls = Pin::new(&mut *self.0);
        let data = ready!(tls.poll_fill_buf(cx))?;
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        Pin::new(&mut *self.0).consume(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::task::{Wake, Waker};
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;
    use tokio::time::timeout;
    use tokio_rustls::client;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A client's TLS stream and the server's end of it, as a [`TlsIo`].
    async fn tls_pair() -> (client::TlsStream<TcpStream>, TlsIo) {
        let cert = rcgen::generate_simple_self_signed(vec!["test.local".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = ServerName::try_from("test.local").unwrap();
        let (client, server) = tokio::join!(
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                TlsConnector::from(Arc::new(client))
                    .connect(name, tcp)
                    .await
                    .unwrap()
            },
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                TlsAcceptor::from(Arc::new(server))
                    .accept(tcp)
                    .await
                    .unwrap()
            }
        );
        (client, TlsIo::new(Box::new(server)))
    }

    /// A waker that says when it was woken.
    struct Flag(Notify);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.notify_one();
        }
    }

    /// Reads `io` once, asserts that nothing is there yet, and returns the
    /// flag its wake-up will raise.
    fn read_finds_nothing(io: &mut TlsIo) -> Arc<Flag> {
        let flag = Arc::new(Flag(Notify::new()));
        let waker = Waker::from(flag.clone());
        let mut bytes = [0u8; 16];
        let mut buf = ReadBuf::new(&mut bytes);
        let read = Pin::new(io).poll_read(&mut Context::from_waker(&waker), &mut buf);
        assert!(read.is_pending());
        flag
    }

    /// A read that finds nothing is pending, and the client's next record
    /// wakes it; records sent one by one arrive whole and in order.
    #[tokio::test]
    async fn a_waiting_read_is_woken_by_the_next_record() {
        let (mut client, mut io) = tls_pair().await;
        let flag = read_finds_nothing(&mut io);

        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        timeout(LIMIT, flag.0.notified())
            .await
            .expect("the record wakes the read");
        let mut bytes = [0u8; 64];
        let mut buf = ReadBuf::new(&mut bytes);
        let read = poll_fn(|cx| Pin::new(&mut io).poll_read(cx, &mut buf));
        timeout(LIMIT, read).await.unwrap().unwrap();
        assert_eq!(buf.filled(), b"hello");

        // A hundred records, each flushed on its own.
        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for piece in sent.chunks(10) {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
        }
        let mut got = vec![0u8; sent.len()];
        timeout(LIMIT, io.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, sent);
    }

    /// The client's close_notify is read as the end, and a TCP close
    /// without one wakes a waiting read, which then ends.
    #[tokio::test]
    async fn every_end_is_read() {
        let (mut client, mut io) = tls_pair().await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        timeout(LIMIT, io.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"last");

        let (client, mut io) = tls_pair().await;
        let flag = read_finds_nothing(&mut io);
        drop(client);
        timeout(LIMIT, flag.0.notified())
            .await
            .expect("the close wakes the read");
        let mut rest = Vec::new();
        let end = timeout(LIMIT, io.read_to_end(&mut rest)).await.unwrap();
        // Nothing more to read: an end, or an error (a truncation, or a
        // reset: the client left the server's session tickets unread).
        assert!(!matches!(end, Ok(n) if n > 0), "{end:?}");
    }
}
