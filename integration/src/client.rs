//! Clients: a keep-alive HTTP/1.1 connection ([`HttpConn`]), HTTP/2 over any
//! stream ([`H2Conn`]), and a raw-socket client that writes exactly the
//! bytes a test gives it and parses whatever comes back ([`raw_exchange`],
//! [`read_reply`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A complete HTTP response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-backend` header set by [`HttpBackend`](crate::HttpBackend).
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }

    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Connects to `addr`, from `source` when given (so the peer sees a known
/// client address).
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match source {
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A GET request for `path` with `Host: host`.
pub fn get_request(host: &str, path: &str) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    if let Ok(v) = HeaderValue::from_str(host) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    req
}

/// One HTTP/1.1 client connection, kept alive across requests.
#[derive(Debug)]
pub struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<BoxBody<Bytes, Infallible>>,
    driver: JoinHandle<()>,
}

impl HttpConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::connect_from(addr, None).await
    }

    /// Connects to `addr` from `source`.
    pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<Self> {
        let stream = tcp_connect(addr, source)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Self::over(stream).await
    }

    /// HTTP/1.1 over an established stream (plain or TLS).
    pub async fn over<S>(io: S) -> anyhow::Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, driver })
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        let resp = self.start(req.map(BodyExt::boxed)).await?;
        collect(resp).await
    }

    /// Sends `req` (any body, e.g. a [`http_body_util::Channel`] the test
    /// feeds) and returns as soon as the response head arrives, with its
    /// body still streaming.
    pub async fn start(
        &mut self,
        req: Request<BoxBody<Bytes, Infallible>>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        self.sender.ready().await.context("connection not ready")?;
        self.sender
            .send_request(req)
            .await
            .context("sending request")
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Reply> {
        self.send(get_request(host, path)).await
    }

    /// Whether the server has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One `GET` on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
    HttpConn::connect(addr).await?.get(host, path).await
}

/// An HTTP/2 client connection.
#[derive(Debug)]
pub struct H2Conn {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    /// Only the first handle drives the connection.
    driver: Option<JoinHandle<()>>,
}

impl H2Conn {
    /// HTTP/2 (prior knowledge, e.g. after ALPN chose `h2`) over `io`.
    pub async fn over<S>(io: S) -> anyhow::Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            driver: Some(driver),
        })
    }

    /// `GET https://host/path`.
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Reply> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = format!("https://{host}{path}")
            .parse()
            .context("request uri")?;
        self.sender
            .ready()
            .await
            .context("h2 connection not ready")?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .context("sending h2 request")?;
        collect(resp).await
    }

    /// A second handle on the same connection (for concurrent streams).
    pub fn stream(&self) -> Self {
        Self {
            sender: self.sender.clone(),
            driver: None,
        }
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        if let Some(d) = &self.driver {
            d.abort();
        }
    }
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .context("reading response body")?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Writes `request` to a fresh connection to `addr` (concurrently with
/// reading, so a server that answers early is still heard) and reads one
/// response, within `timeout`.
pub async fn raw_exchange(
    addr: SocketAddr,
    request: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let stream = tcp_connect(addr, None)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The server may close before reading everything; that is its answer.
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        // Keep the write half open until the reply is read.
        std::future::pending::<()>().await;
        drop(wr);
    });
    let reply = crate::within("raw response", timeout, read_reply(&mut rd)).await;
    writer.abort();
    reply?
}

/// A connection that a test writes raw bytes to and reads parsed responses
/// from, in order (pipelining, half-sent requests, upgrades).
#[derive(Debug)]
pub struct RawConn<S> {
    io: S,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawConn<S> {
    /// Wraps a connected stream.
    pub fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` as they are.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Reads the next response, within `timeout`.
    pub async fn reply(&mut self, timeout: Duration) -> anyhow::Result<Reply> {
        crate::within(
            "a response",
            timeout,
            read_reply_buffered(&mut self.io, &mut self.buf),
        )
        .await?
    }

    /// Reads one line (after a response, e.g. on an upgraded connection).
    pub async fn line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        crate::within("a line", timeout, async {
            loop {
                if let Some(i) = find(&self.buf, b"\n") {
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    return Ok(String::from_utf8_lossy(&line).trim_end().to_owned());
                }
                if read_more(&mut self.io, &mut self.buf).await? == 0 {
                    bail!("connection closed before a full line");
                }
            }
        })
        .await?
    }

    /// Waits until the peer closes (or `timeout` passes); returns what came
    /// before the close.
    pub async fn closed(&mut self, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.buf);
        out.extend(read_to_close(&mut self.io, timeout).await?);
        Ok(out)
    }

    /// The stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

/// Reads one HTTP/1.x response from `r`: the head, then a body framed by
/// `content-length`, `chunked`, or the end of the stream.
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<Reply> {
    read_reply_buffered(r, &mut Vec::new()).await
}

/// [`read_reply`] starting with the bytes in `buf` and leaving what follows
/// the response there.
async fn read_reply_buffered<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Reply> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if read_more(r, buf).await? == 0 {
            bail!(
                "connection closed before a response head; got {:?}",
                String::from_utf8_lossy(buf)
            );
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let status = StatusCode::from_u16(code)?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_str(value.trim())?,
        );
    }
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let chunked = headers
        .get(http::header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let body = if no_body {
        Vec::new()
    } else if chunked {
        read_chunked(r, buf).await?
    } else if let Some(n) = length {
        while buf.len() < n {
            if read_more(r, buf).await? == 0 {
                bail!("connection closed after {} of {n} body bytes", buf.len());
            }
        }
        buf.drain(..n).collect()
    } else {
        while read_more(r, buf).await? > 0 {}
        std::mem::take(buf)
    };
    Ok(Reply {
        status,
        headers,
        body: Bytes::from(body),
    })
}

async fn read_chunked<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if read_more(r, buf).await? == 0 {
                bail!("connection closed inside a chunk size line");
            }
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // No trailers are expected: the final CRLF follows.
            while buf.len() < 2 {
                if read_more(r, buf).await? == 0 {
                    bail!("connection closed after the last chunk");
                }
            }
            buf.drain(..2);
            return Ok(body);
        }
        while buf.len() < size + 2 {
            if read_more(r, buf).await? == 0 {
                bail!("connection closed inside a chunk");
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
    let mut chunk = [0_u8; 16 * 1024];
    let n = r.read(&mut chunk).await.context("reading")?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the peer closes (or `timeout` passes) and returns what came.
/// `Ok` with an empty vector means a clean close with no bytes.
pub async fn read_to_close<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    crate::within("the peer to close", timeout, async {
        let mut chunk = [0_u8; 4096];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_content_length_chunked_and_eof_bodies() {
        let mut a: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhelloEXTRA";
        let r = read_reply(&mut a).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text().as_str(), r.header("x-a")),
            (200, "hello", Some("1"))
        );

        let mut b: &[u8] = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = read_reply(&mut b).await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (404, "abcde"));

        let mut c: &[u8] = b"HTTP/1.0 408 Request Timeout\r\n\r\nslow";
        let r = read_reply(&mut c).await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (408, "slow"));

        let mut d: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Le";
        assert!(read_reply(&mut d).await.is_err());
    }
}
