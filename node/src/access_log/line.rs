//! A line as a worker holds it: its numbers and its strings' bytes,
//! copied as they are into the thread's buffer. The writer thread reads
//! them back and formats the line ([`super::json`], [`super::text`]).
//!
//! ```text
//!  head (HEAD bytes): start, duration, bytes in/out, connect, response
//!                     (u64 ns, u64::MAX for none), attempts (u32),
//!                     status, port, client port (u16), tls (u8),
//!                     then each string's length (u32)
//!  then the strings:  client IP, proto, method, host, path, group,
//!                     instance, error origin, error
//! ```
//!
//! Native byte order: the bytes never leave the process.

use std::time::Duration;

/// What a line says, as both formats need it. A client without an
/// address has an empty `client_ip`; an absent string is empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Line<'a> {
    /// When it began, as wall-clock time since the epoch.
    pub(super) start: Duration,
    pub(super) duration: Duration,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) connect: Option<Duration>,
    pub(super) response: Option<Duration>,
    pub(super) attempts: u32,
    pub(super) status: u16,
    pub(super) port: u16,
    pub(super) client_port: u16,
    pub(super) tls: bool,
    pub(super) client_ip: &'a [u8],
    pub(super) proto: &'a [u8],
    pub(super) method: &'a [u8],
    pub(super) host: &'a [u8],
    pub(super) path: &'a [u8],
    pub(super) group: &'a [u8],
    pub(super) instance: &'a [u8],
    pub(super) error_origin: &'a [u8],
    pub(super) error: &'a [u8],
}

const STRINGS: usize = 9;

/// The head's bytes: six u64s, a u32, three u16s, a u8, and a u32 per
/// string.
const HEAD: usize = 6 * 8 + 4 + 3 * 2 + 1 + STRINGS * 4;

/// A duration as the head holds it: nanoseconds, `u64::MAX` for none
/// (584 years of nanoseconds fit below it).
fn nanos(d: Option<Duration>) -> u64 {
    d.map_or(u64::MAX, |d| {
        u64::try_from(d.as_nanos()).map_or(u64::MAX - 1, |n| n.min(u64::MAX - 1))
    })
}

fn duration(n: u64) -> Option<Duration> {
    (n != u64::MAX).then(|| Duration::from_nanos(n))
}

impl<'a> Line<'a> {
    /// The strings, in the order the line holds them.
    fn strings_mut(&mut self) -> [&mut &'a [u8]; STRINGS] {
        [
            &mut self.client_ip,
            &mut self.proto,
            &mut self.method,
            &mut self.host,
            &mut self.path,
            &mut self.group,
            &mut self.instance,
            &mut self.error_origin,
            &mut self.error,
        ]
    }

    /// Appends the line to `out`: one copy of its head, one per string (a
    /// string over 4 GiB is cut there).
    #[inline]
    pub(super) fn encode(mut self, out: &mut Vec<u8>) {
        let strings = self
            .strings_mut()
            .map(|&mut s| &s[..s.len().min(u32::MAX as usize)]);
        let mut head = Head([0; HEAD], 0);
        for n in [self.start, self.duration] {
            head.put(nanos(Some(n)).to_ne_bytes());
        }
        head.put(self.bytes_in.to_ne_bytes());
        head.put(self.bytes_out.to_ne_bytes());
        head.put(nanos(self.connect).to_ne_bytes());
        head.put(nanos(self.response).to_ne_bytes());
        head.put(self.attempts.to_ne_bytes());
        head.put(self.status.to_ne_bytes());
        head.put(self.port.to_ne_bytes());
        head.put(self.client_port.to_ne_bytes());
        head.put([u8::from(self.tls)]);
        for s in strings {
            head.put((s.len() as u32).to_ne_bytes());
        }
        debug_assert_eq!(head.1, HEAD, "the head is filled");
        out.reserve(HEAD + strings.iter().map(|s| s.len()).sum::<usize>());
        out.extend_from_slice(&head.0);
        for s in strings {
            out.extend_from_slice(s);
        }
    }

    /// The line `bytes` starts with, and the bytes after it; `None` if
    /// they do not hold a whole line.
    pub(super) fn decode(bytes: &mut &'a [u8]) -> Option<Self> {
        let mut head: &[u8] = take(bytes, HEAD)?;
        let u64 = |b: &mut &[u8]| Some(u64::from_ne_bytes(*take_array(b)?));
        let u16 = |b: &mut &[u8]| Some(u16::from_ne_bytes(*take_array(b)?));
        let start = duration(u64(&mut head)?)?;
        let elapsed = duration(u64(&mut head)?)?;
        let bytes_in = u64(&mut head)?;
        let bytes_out = u64(&mut head)?;
        let connect = duration(u64(&mut head)?);
        let response = duration(u64(&mut head)?);
        let attempts = u32::from_ne_bytes(*take_array(&mut head)?);
        let status = u16(&mut head)?;
        let port = u16(&mut head)?;
        let client_port = u16(&mut head)?;
        let tls = take_array::<1>(&mut head)?[0] != 0;
        let mut line = Self {
            start,
            duration: elapsed,
            bytes_in,
            bytes_out,
            connect,
            response,
            attempts,
            status,
            port,
            client_port,
            tls,
            ..Self::default()
        };
        for s in line.strings_mut() {
            let len = u32::from_ne_bytes(*take_array(&mut head)?);
            *s = take(bytes, usize::try_from(len).ok()?)?;
        }
        Some(line)
    }
}

/// A head being filled, and where the next field goes: the offsets are
/// constants once inlined, so each field is one store.
struct Head([u8; HEAD], usize);

impl Head {
    #[inline(always)]
    fn put<const N: usize>(&mut self, bytes: [u8; N]) {
        self.0[self.1..self.1 + N].copy_from_slice(&bytes);
        self.1 += N;
    }
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (taken, rest) = bytes.split_at_checked(n)?;
    *bytes = rest;
    Some(taken)
}

fn take_array<'a, const N: usize>(bytes: &mut &'a [u8]) -> Option<&'a [u8; N]> {
    let (taken, rest) = bytes.split_first_chunk::<N>()?;
    *bytes = rest;
    Some(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            start: Duration::from_millis(1_796_458_839_123),
            duration: Duration::from_micros(2_500),
            bytes_in: 3,
            bytes_out: u64::MAX,
            connect: None,
            response: Some(Duration::ZERO),
            attempts: 7,
            status: 503,
            port: 8080,
            client_port: 65535,
            tls: true,
            client_ip: b"2001:db8::1",
            proto: b"HTTP/2",
            method: b"PATCH",
            host: b"ex\xffample.com",
            path: b"/a?b=1",
            group: b"web",
            instance: b"web-1",
            error_origin: b"upstream",
            error: b"",
        }
    }

    #[test]
    fn lines_read_back_as_they_were_written_one_after_another() {
        let a = line();
        let b = Line {
            connect: Some(Duration::from_nanos(u64::MAX - 1)),
            response: None,
            tls: false,
            client_ip: b"",
            error: b"every attempt failed",
            ..line()
        };
        let c = Line::default();
        let mut buf = Vec::new();
        for l in [&a, &b, &c] {
            l.clone().encode(&mut buf);
        }
        let mut rest = &buf[..];
        for want in [&a, &b, &c] {
            assert_eq!(Line::decode(&mut rest).as_ref(), Some(want));
        }
        assert!(rest.is_empty());
        assert_eq!(Line::decode(&mut rest), None);
    }

    #[test]
    fn a_cut_line_reads_as_none() {
        let mut buf = Vec::new();
        line().encode(&mut buf);
        for len in 0..buf.len() {
            let mut cut = &buf[..len];
            assert_eq!(Line::decode(&mut cut), None, "{len} bytes");
        }
    }

    #[test]
    fn a_duration_too_long_for_the_head_is_kept_as_long_as_it_can_be() {
        let l = Line {
            response: Some(Duration::MAX),
            ..line()
        };
        let mut buf = Vec::new();
        l.encode(&mut buf);
        let back = Line::decode(&mut &buf[..]).unwrap();
        assert_eq!(back.response, Some(Duration::from_nanos(u64::MAX - 1)));
    }
}
