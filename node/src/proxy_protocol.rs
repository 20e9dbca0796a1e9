//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load
//! balancer in front of the node puts before a connection's first byte to
//! say whom the connection is really from.
//!
//! On a port listed in `accept_proxy_protocol` every connection must start
//! with one (either version). The header is read with `MSG_PEEK` and then
//! taken off exactly, so what follows it (a TLS handshake, an HTTP request,
//! TCP bytes) reaches the port's handler untouched. A connection without a
//! valid header within `header_timeout`, or from an address outside
//! `trusted_proxies` when that is set, is closed and counted in
//! `edgelb_proxy_protocol_errors_total{reason}`.
//!
//! In TCP mode a group with `send_proxy_protocol` starts every connection
//! to an instance with such a header ([`header`]), naming the client and
//! the published address it connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header (the spec's bound, CRLF included).
const V1_MAX: usize = 107;

/// The longest v2 header accepted: the 16 fixed bytes and up to 4 KiB of
/// addresses and TLVs (load balancers send a few dozen bytes of TLVs).
const V2_MAX: usize = 16 + 4096;

/// Why a header was refused (the label of the error counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    Malformed,
    #[error("PROXY protocol header too long")]
    TooLong,
    #[error("no complete PROXY protocol header in time")]
    Timeout,
    #[error("the connection closed before its PROXY protocol header ended")]
    Closed,
}

impl HeaderError {
    /// The `reason` label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLong => "too_long",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
        }
    }
}

/// What the start of a stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole header of `len` bytes; `source` is the client it names
    /// (`None` for v2 `LOCAL`, v1 `UNKNOWN` and address families other than
    /// TCP over IPv4 or IPv6: the connection's own peer stands).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// The bytes so far are the start of a header; more are needed.
    Partial,
}

/// Parses the header at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    // Which version: as many bytes as there are must match a signature.
    let v2 = buf.len().min(12);
    if buf[..v2] == V2_SIGNATURE[..v2] {
        return if buf.len() < 16 {
            Ok(Parsed::Partial)
        } else {
            parse_v2(buf)
        };
    }
    let v1 = buf.len().min(6);
    if buf[..v1] == b"PROXY "[..v1] {
        return parse_v1(buf);
    }
    Err(HeaderError::Malformed)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::TooLong)
        } else if buf.contains(&b'\n') {
            // A bare LF is not the end of a header: not one.
            Err(HeaderError::Malformed)
        } else {
            Ok(Parsed::Partial)
        };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(HeaderError::TooLong);
    }
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| HeaderError::Malformed)?;
    let mut parts = line.split(' ');
    let proto = parts.next().ok_or(HeaderError::Malformed)?;
    if proto == "UNKNOWN" {
        // Whatever follows is to be ignored.
        return Ok(Parsed::Header { len, source: None });
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(HeaderError::Malformed);
    };
    let six = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(HeaderError::Malformed),
    };
    // Both addresses of the protocol's family (the destination is only
    // checked).
    let ip = |a: &str| match a.parse::<IpAddr>() {
        Ok(ip) if ip.is_ipv6() == six => Ok(ip),
        _ => Err(HeaderError::Malformed),
    };
    let src = ip(src)?;
    ip(dst)?;
    let port = |p: &str| {
        // Plain digits, no leading zero (the spec's form).
        if p.is_empty()
            || (p.len() > 1 && p.starts_with('0'))
            || !p.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(HeaderError::Malformed);
        }
        p.parse::<u16>().map_err(|_| HeaderError::Malformed)
    };
    let sport = port(sport)?;
    port(dport)?;
    Ok(Parsed::Header {
        len,
        source: Some(SocketAddr::new(src, sport)),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let ver_cmd = buf[12];
    let family = buf[13];
    let addr_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + addr_len;
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed);
    }
    if len > V2_MAX {
        return Err(HeaderError::TooLong);
    }
    if buf.len() < len {
        return Ok(Parsed::Partial);
    }
    let addrs = &buf[16..len];
    let source = match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection (a health check).
        0 => None,
        // PROXY
        1 => match family {
            // TCP over IPv4: src, dst, sport, dport.
            0x11 => {
                let a = addrs.get(..12).ok_or(HeaderError::Malformed)?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
            }
            // TCP over IPv6.
            0x21 => {
                let a = addrs.get(..36).ok_or(HeaderError::Malformed)?;
                let mut octets = [0_u8; 16];
                octets.copy_from_slice(&a[..16]);
                let ip = Ipv6Addr::from(octets);
                Some(SocketAddr::new(
                    ip.into(),
                    u16::from_be_bytes([a[32], a[33]]),
                ))
            }
            // UNSPEC, UDP, Unix sockets: no address to use.
            0x00 | 0x12 | 0x22 | 0x31 | 0x32 => None,
            _ => return Err(HeaderError::Malformed),
        },
        _ => return Err(HeaderError::Malformed),
    };
    Ok(Parsed::Header { len, source })
}

/// Reads the PROXY header at the start of `stream` (waiting until
/// `deadline` at most) and takes it off the stream; the client it names,
/// `None` when it names none.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Option<SocketAddr>, HeaderError> {
    match tokio::time::timeout_at(deadline, read_header_now(stream)).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Timeout),
    }
}

/// The first peek's size: room for any v1 header and a v2 one with
/// addresses and a few TLVs.
const FIRST_PEEK: usize = 256;

async fn read_header_now(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    // Most headers fit the first peek (a v1 header is at most 107 bytes, a
    // v2 one with addresses 52); a longer v2 one (TLVs) grows it. Peeking
    // little also copies little of the client's first bytes.
    let mut buf = vec![0_u8; FIRST_PEEK];
    let mut seen = 0;
    // A header split over several segments (rare: balancers send it in
    // one) is waited for with a short sleep, since a peeked socket stays
    // readable: 1 ms, then 2, … at most 50.
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|_| HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        match parse(&buf[..n])? {
            Parsed::Header { len, source } => {
                stream
                    .read_exact(&mut buf[..len])
                    .await
                    .map_err(|_| HeaderError::Closed)?;
                return Ok(source);
            }
            Parsed::Partial if n == buf.len() && buf.len() < V2_MAX => buf.resize(V2_MAX, 0),
            Parsed::Partial if n == buf.len() => return Err(HeaderError::TooLong),
            Parsed::Partial => {
                if n == seen {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                } else {
                    seen = n;
                }
            }
        }
    }
}

/// A version 1 header for a connection from `client` to `local`.
pub(crate) fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            c.ip(),
            l.ip(),
            c.port(),
            l.port()
        ),
        (c, l) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            as_v6(c),
            as_v6(l),
            c.port(),
            l.port()
        ),
    }
    .into_bytes()
}

/// An address as IPv6 (IPv4 mapped), for a header naming both ends when
/// they are of different families.
fn as_v6(a: SocketAddr) -> Ipv6Addr {
    match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A version 2 header (`PROXY`, TCP) for a connection from `client` to
/// `local`.
pub(crate) fn v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(0x11);
            out.extend_from_slice(&12_u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        (c, l) => {
            out.push(0x21);
            out.extend_from_slice(&36_u16.to_be_bytes());
            out.extend_from_slice(&as_v6(c).octets());
            out.extend_from_slice(&as_v6(l).octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
    }
    out
}

/// The header of `version` for a connection from `client` to `local`.
pub(crate) fn header(
    version: raft_store::model::ProxyVersion,
    client: SocketAddr,
    local: SocketAddr,
) -> Vec<u8> {
    match version {
        raft_store::model::ProxyVersion::V1 => v1(client, local),
        raft_store::model::ProxyVersion::V2 => v2(client, local),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header(len: usize, source: &str) -> Parsed {
        Parsed::Header {
            len,
            source: Some(source.parse().unwrap()),
        }
    }

    #[test]
    fn v1_headers_parse() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(parse(h), Ok(header(45, "192.0.2.1:56324")));
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n";
        assert_eq!(parse(h), Ok(header(h.len(), "[2001:db8::1]:56324")));
        let h = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header {
                len: h.len(),
                source: None
            })
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").map(|_| ()), Ok(()));
        for partial in [&b"P"[..], b"PROXY", b"PROXY TCP4 192.0.2.1 1"] {
            assert_eq!(parse(partial), Ok(Parsed::Partial), "{partial:?}");
        }
    }

    #[test]
    fn bad_v1_headers_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 9\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 0443 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 443\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
        ] {
            assert_eq!(parse(bad), Err(HeaderError::Malformed), "{bad:?}");
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert_eq!(parse(&long), Err(HeaderError::TooLong));
    }

    #[test]
    fn v2_headers_parse() {
        let client: SocketAddr = "192.0.2.1:56324".parse().unwrap();
        let local: SocketAddr = "198.51.100.2:443".parse().unwrap();
        let mut h = v2(client, local);
        assert_eq!(h.len(), 28);
        h.extend_from_slice(b"\x16\x03\x01 the TLS hello");
        assert_eq!(parse(&h), Ok(header(28, "192.0.2.1:56324")));
        for cut in [1, 12, 15, 16, 27] {
            assert_eq!(parse(&h[..cut]), Ok(Parsed::Partial), "{cut}");
        }
        let client6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let h6 = v2(client6, "[2001:db8::2]:443".parse().unwrap());
        assert_eq!(parse(&h6), Ok(header(52, "[2001:db8::1]:1")));
        // LOCAL, with TLVs after the addresses: no client, length taken whole.
        let mut local_cmd = V2_SIGNATURE.to_vec();
        local_cmd.extend_from_slice(&[0x20, 0x00, 0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(
            parse(&local_cmd),
            Ok(Parsed::Header {
                len: 21,
                source: None
            })
        );
    }

    #[test]
    fn bad_v2_headers_are_refused() {
        let good = v2(
            "192.0.2.1:1".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        assert_eq!(
            parse(&with(12, 0x11)),
            Err(HeaderError::Malformed),
            "version 1 in v2"
        );
        assert_eq!(
            parse(&with(12, 0x22)),
            Err(HeaderError::Malformed),
            "command 2"
        );
        assert_eq!(
            parse(&with(13, 0x99)),
            Err(HeaderError::Malformed),
            "family"
        );
        // TCP4 with too short an address block.
        let short = [&V2_SIGNATURE[..], &[0x21, 0x11, 0, 4, 1, 2, 3, 4]].concat();
        assert_eq!(parse(&short), Err(HeaderError::Malformed));
        let huge = [&V2_SIGNATURE[..], &[0x21, 0x11, 0xff, 0xff]].concat();
        assert_eq!(parse(&huge), Err(HeaderError::TooLong));
        assert_eq!(
            parse(&with(3, b'x')),
            Err(HeaderError::Malformed),
            "signature"
        );
    }

    #[test]
    fn v1_headers_round_trip() {
        let c: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let l: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let h = v1(c, l);
        assert_eq!(h, b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n");
        assert_eq!(parse(&h), Ok(header(h.len(), "203.0.113.9:40000")));
        let c6: SocketAddr = "[2001:db8::9]:5".parse().unwrap();
        let h = v1(c6, l);
        assert_eq!(parse(&h), Ok(header(h.len(), "[2001:db8::9]:5")));
    }

    proptest! {
        /// Any bytes: a header, a partial one or an error, never a panic,
        /// and a header never longer than the bytes.
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Parsed::Header { len, .. }) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn v2_bytes_after_the_signature_parse_without_panicking(
            rest in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let bytes = [&V2_SIGNATURE[..], &rest].concat();
            if let Ok(Parsed::Header { len, .. }) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn headers_we_write_parse_back(
            a in any::<[u8; 4]>(), b in any::<[u8; 16]>(), p in any::<u16>(), six in any::<bool>(),
        ) {
            let client = if six {
                SocketAddr::new(Ipv6Addr::from(b).into(), p)
            } else {
                SocketAddr::new(Ipv4Addr::from(a).into(), p)
            };
            let local: SocketAddr = "127.0.0.1:9000".parse().unwrap();
            for h in [v1(client, local), v2(client, local)] {
                let Ok(Parsed::Header { len, source }) = parse(&h) else {
                    return Err(TestCaseError::fail(format!("{h:?}")));
                };
                prop_assert_eq!(len, h.len());
                let source = source.expect("a source");
                prop_assert_eq!(source.port(), p);
                let same_ip = match (source.ip(), client.ip()) {
                    (IpAddr::V6(s), IpAddr::V4(c)) => s.to_ipv4_mapped() == Some(c),
                    (s, c) => s == c,
                };
                prop_assert!(same_ip, "{source} from {client}");
            }
        }
    }

    /// A v2 header longer than the first peek (1,000 bytes of TLVs) is
    /// read whole, and the bytes after it are left to the stream.
    #[tokio::test]
    async fn a_long_v2_header_is_read_past_the_first_peek() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let mut header = v2(client, local);
        let tlvs = 1_000;
        header.extend(std::iter::repeat_n(0_u8, tlvs));
        let len = u16::try_from(header.len() - 16).unwrap();
        header[14..16].copy_from_slice(&len.to_be_bytes());
        assert!(header.len() > FIRST_PEEK);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&header).await.unwrap();
            s.write_all(b"hello").await.unwrap();
            s
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let source = read_header(
            &mut stream,
            tokio::time::Instant::now() + Duration::from_secs(5),
        )
        .await
        .expect("a valid header");
        assert_eq!(source, Some(client));
        let mut rest = [0_u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
        drop(sender.await);
    }
}
