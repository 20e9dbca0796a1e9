//! An instance's answer read by hand (the lean path, `super::lean`):
//! where its body ends, how it goes on to the client, and what ends the
//! request when it does.

use std::sync::Arc;
use std::time::Instant;

use super::conn::Conn;
use super::log::Log;
use crate::balancer::Lease;
use crate::upstream::{ParkedConn, Pool};

/// The upstream read buffer, at first: most answers fit.
pub(super) const READ_CHUNK: usize = 4 * 1024;

/// The largest the read buffer grows to, reading a bulk body.
pub(super) const MAX_READ: usize = 64 * 1024;

/// Where a response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    /// Passed on as sent (`Transfer-Encoding: chunked`).
    Chunked,
    /// Ends when the instance closes; sent to the client chunked.
    Close,
}

/// What ends a request whose response head came: its instance, its pool,
/// and its access log record.
#[derive(Debug)]
pub(super) struct Done {
    pub(super) lease: Lease,
    pub(super) pool: Arc<Pool>,
    pub(super) start: Instant,
    pub(super) status: u16,
    pub(super) log: Log,
}

impl Done {
    /// The lean path's end: [`Done::end_with`], `up` given back to the
    /// pool (a connection whose response was read completely and that the
    /// instance keeps open), `sent` body bytes logged.
    pub(super) fn end(
        mut self,
        conn: &Conn,
        up: Option<ParkedConn>,
        sent: u64,
        cut: Option<(&'static str, &'static str)>,
    ) {
        if let Some(record) = self.log.as_mut() {
            record.bytes_out = sent;
        }
        let cut = cut
            .as_ref()
            .map(|(side, why)| (*side, why as &dyn std::fmt::Display));
        self.end_with(cut, |pool, now| {
            if let Some(up) = up {
                pool.checkin_socket(up, conn.dp.settings.idle_limits(), now);
            }
        });
    }

    /// Ends the request, whichever path served it: counts the response
    /// (status class, duration), lets `give_back` return the connection
    /// to the pool, ends the in-flight count and writes the access log
    /// line with who cut the response off and why.
    pub(super) fn end_with(
        self,
        cut: Option<(&'static str, &dyn std::fmt::Display)>,
        give_back: impl FnOnce(&Arc<Pool>, Instant),
    ) {
        let now = Instant::now();
        let metrics = &self.lease.backend().metrics;
        metrics.observe_status(self.status);
        metrics
            .duration
            .observe(now.saturating_duration_since(self.start).as_secs_f64());
        give_back(&self.pool, now);
        // Ends the in-flight count (and times the work for gossip).
        self.lease.release(now);
        if let Some(record) = self.log {
            record.end(self.status, cut, now);
        }
    }
}

/// The access log's reason for a response the client did not take whole.
pub(super) const CLIENT_LEFT: (&str, &str) =
    ("client", "the client went away before the response ended");

/// A response body on its way: how much of it is left.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) framing: Framing,
    /// Bytes left of a `Length` body.
    pub(crate) left: u64,
    pub(super) chunks: Chunks,
    /// Bytes read past the body's end.
    pub(crate) left_over: usize,
    /// The body's bytes passed on (a chunked body's data only).
    pub(crate) sent: u64,
}

impl Progress {
    pub(crate) fn new(framing: Framing) -> Self {
        Self {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: Chunks::default(),
            left_over: 0,
            sent: 0,
        }
    }

    pub(crate) fn done(&self) -> bool {
        match self.framing {
            Framing::Empty => true,
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.chunks.done(),
            Framing::Close => false,
        }
    }

    /// Whether the client gets the body's bytes as the instance sent them.
    pub(crate) fn passes_through(&self) -> bool {
        self.framing != Framing::Close
    }

    /// The body's next data at the front of `bytes`, decoded: how many
    /// bytes of framing come first (a chunked body's), and how many bytes
    /// of data follow them; both counted as taken.
    pub(crate) fn next_data(&mut self, bytes: &[u8]) -> Result<(usize, usize), &'static str> {
        let (framing, data) = match self.framing {
            Framing::Empty => (0, 0),
            Framing::Length(_) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                (0, n)
            }
            Framing::Close => (0, bytes.len()),
            Framing::Chunked => {
                let (framing, data) = self.chunks.next(bytes).map_err(|()| MALFORMED)?;
                if data > 0 {
                    self.chunks.took(data);
                }
                (framing, data)
            }
        };
        self.sent += data as u64;
        Ok((framing, data))
    }

    /// How many of `bytes` belong to the body as sent (a chunked body's
    /// framing included), counted as passed on.
    pub(crate) fn measure(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        let used = if self.framing == Framing::Chunked {
            let (used, data) = self.chunks.advance(bytes).map_err(|()| MALFORMED)?;
            self.sent += data as u64;
            used
        } else {
            self.next_data(bytes)?.1
        };
        self.left_over += bytes.len() - used;
        Ok(used)
    }

    /// Appends to `out` what of `bytes` belongs to the body, as the client
    /// gets it; returns how many of `bytes` that was.
    pub(crate) fn take(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<usize, &'static str> {
        let used = self.measure(bytes)?;
        if self.passes_through() {
            out.extend_from_slice(&bytes[..used]);
        } else if used > 0 {
            put_chunk(out, &bytes[..used]);
        }
        Ok(used)
    }

    /// The instance closed the connection: the end of a `Close` body, and
    /// a cut anywhere else.
    pub(crate) fn closed(&mut self) -> Result<(), &'static str> {
        if self.framing != Framing::Close {
            return Err("the instance closed before the body ended");
        }
        self.framing = Framing::Empty;
        Ok(())
    }

    /// [`Progress::closed`], and the end of the chunked body the client
    /// gets appended to `out`.
    pub(crate) fn at_close(&mut self, out: &mut Vec<u8>) -> Result<(), &'static str> {
        self.closed()?;
        out.extend_from_slice(b"0\r\n\r\n");
        Ok(())
    }
}

/// Why a chunked body is refused.
const MALFORMED: &str = "a malformed chunked body";

/// `bytes` as one chunk of a chunked body.
fn put_chunk(out: &mut Vec<u8>, bytes: &[u8]) {
    let digits = (usize::BITS - bytes.len().leading_zeros())
        .div_ceil(4)
        .max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(bytes.len() >> (4 * i)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Follows a chunked body (RFC 9112 §7.1) to find its end.
#[derive(Debug, Default)]
pub(super) struct Chunks {
    state: ChunkState,
    /// Size of the chunk being read, then bytes left of it.
    size: u64,
    /// The size line being read has a digit.
    digits: bool,
}

/// A control character other than HTAB, not allowed in a chunk extension or
/// a trailer field (and a bare LF, which lenient parsers take for a line's
/// end, would let the client see the body end elsewhere than this parser).
fn control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size.
    #[default]
    Size,
    /// After the size: extensions or whitespace, up to CR.
    Ext,
    /// LF after a size line.
    SizeLf,
    Data,
    /// CR after a chunk's data.
    DataCr,
    DataLf,
    /// Start of a trailer line (or of the final CRLF).
    TrailerStart,
    Trailer,
    /// LF of a trailer line.
    TrailerLf,
    /// LF of the final CRLF.
    EndLf,
    Done,
}

impl Chunks {
    pub(super) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Follows `bytes`; returns how many belong to the body (all, unless it
    /// ends within them) and how many of those are data. An error for
    /// bytes no chunked body has.
    fn advance(&mut self, bytes: &[u8]) -> Result<(usize, usize), ()> {
        let (mut i, mut data) = (0, 0);
        loop {
            let (framing, n) = self.next(&bytes[i..])?;
            i += framing;
            if n == 0 {
                return Ok((i, data));
            }
            self.took(n);
            i += n;
            data += n;
        }
    }

    /// Follows the framing at the front of `bytes` up to the next data:
    /// returns how many bytes of framing that was, and how many data
    /// bytes follow it in `bytes` (0 when `bytes` ends first, or the body
    /// does). Data counts as followed once [`Chunks::took`].
    pub(super) fn next(&mut self, bytes: &[u8]) -> Result<(usize, usize), ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() && self.state != Done {
            let b = bytes[i];
            // A line end's byte: `want`, then the state `next`.
            let expect = |want: u8, next: ChunkState| if b == want { Ok(next) } else { Err(()) };
            match self.state {
                Size => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.size = self.size.checked_mul(16).ok_or(())? + u64::from(d);
                        self.digits = true;
                    }
                    // A size has a digit at least.
                    None if !self.digits => return Err(()),
                    None if b == b'\r' => self.state = SizeLf,
                    None if b == b';' || b == b' ' || b == b'\t' => self.state = Ext,
                    None => return Err(()),
                },
                Ext => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    } else if control(b) {
                        return Err(());
                    }
                }
                SizeLf => {
                    self.state = expect(b'\n', if self.size == 0 { TrailerStart } else { Data })?;
                    self.digits = false;
                }
                Data => {
                    let n = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    return Ok((i, n));
                }
                DataCr => self.state = expect(b'\r', DataLf)?,
                DataLf => self.state = expect(b'\n', Size)?,
                TrailerStart if b == b'\r' => self.state = EndLf,
                TrailerStart | Trailer => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    } else if control(b) {
                        return Err(());
                    } else {
                        self.state = Trailer;
                    }
                }
                TrailerLf => self.state = expect(b'\n', TrailerStart)?,
                EndLf => self.state = expect(b'\n', Done)?,
                Done => {}
            }
            i += 1;
        }
        Ok((i, 0))
    }

    /// `n` data bytes (at least one) that [`Chunks::next`] found were
    /// taken.
    pub(super) fn took(&mut self, n: usize) {
        debug_assert!(n > 0 && self.state == ChunkState::Data);
        self.size -= n as u64;
        if self.size == 0 {
            self.state = ChunkState::DataCr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(body: &[u8], pieces: usize) -> (Result<usize, ()>, bool) {
        let mut chunks = Chunks::default();
        let mut used = 0;
        for piece in body.chunks(pieces) {
            match chunks.advance(piece) {
                Ok((n, _)) => used += n,
                Err(()) => return (Err(()), chunks.done()),
            }
            if chunks.done() {
                break;
            }
        }
        (Ok(used), chunks.done())
    }
    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nx-t: 1\r\n\r\n";
        for piece in [1, 2, 3, 7, body.len()] {
            assert_eq!(
                follow(body, piece),
                (Ok(body.len()), true),
                "pieces of {piece}"
            );
        }
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(follow(&with_next, with_next.len()), (Ok(body.len()), true));
        assert_eq!(follow(b"a\r\n0123456789\r\n", 4), (Ok(15), false));
    }

    #[test]
    fn a_broken_chunked_body_is_an_error() {
        for bad in [
            &b"z\r\n"[..],
            b"5\r\nhelloXX",
            b"5\n",
            b"\r\n",
            b";ext\r\n",
            b"1;a\nb\r\nx\r\n",
            b"0\r\n\nHTTP/1.1 200 OK\r\n",
            b"0\r\nx-t: 1\n\r\n",
            b"0\r\nx-t: \x001\r\n\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert_eq!(
                follow(bad, bad.len()).0,
                Err(()),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
    #[test]
    fn a_body_that_ends_at_close_is_sent_chunked() {
        let mut body = Progress::new(Framing::Close);
        let mut out = Vec::new();
        assert_eq!(body.take(b"hello", &mut out), Ok(5));
        body.at_close(&mut out).expect("end of a Close body");
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        assert!(body.done());
        let mut cut = Progress::new(Framing::Length(10));
        assert_eq!(cut.take(b"hello", &mut Vec::new()), Ok(5));
        assert!(cut.at_close(&mut Vec::new()).is_err());
    }
}
