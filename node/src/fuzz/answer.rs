//! An instance's answer as the lean path reads it (`crate::http::lean`):
//! its head parsed and rewritten for the client, and its body followed to
//! its end by its framing.

use crate::http::lean::parse_head;
use crate::http::reply::{Framing, Progress};

/// An answer's bytes: parsing its head never panics; a head taken is
/// within the bytes, and the head written for the client is one whole
/// response head without hop-by-hop fields; the body's end is found the
/// same whether its bytes come at once or a few at a time.
pub fn answer(data: &[u8]) {
    let Ok(Some(head)) = parse_head(data) else {
        return;
    };
    assert!(head.len <= data.len());
    check_client_head(&head.client_head(data));
    let body = &data[head.len..];
    let whole = follow(head.framing, body, body.len().max(1));
    for piece in [1, 2, 3, 7] {
        assert_eq!(
            follow(head.framing, body, piece),
            whole,
            "pieces of {piece}"
        );
    }
}

/// What following `body` in pieces of `piece` bytes found: bytes taken,
/// data passed on, bytes past the end, and whether the end came; `None`
/// at a framing error (where it came is not compared).
fn follow(framing: Framing, body: &[u8], piece: usize) -> Option<(usize, u64, usize, bool)> {
    let mut progress = Progress::new(framing);
    let mut used = 0;
    let mut out = Vec::new();
    for part in body.chunks(piece) {
        if progress.done() {
            // What comes after the end is only counted.
            progress.measure(part).ok()?;
            continue;
        }
        out.clear();
        used += progress.take(part, &mut out).ok()?;
        if progress.passes_through() {
            assert!(out.len() <= part.len());
        }
    }
    Some((used, progress.sent, progress.left_over, progress.done()))
}

fn check_client_head(head: &[u8]) {
    assert!(head.starts_with(b"HTTP/1.1 "));
    assert!(head.ends_with(b"\r\n\r\n"));
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut fields);
    let parsed = resp.parse(head);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head.len()),
        "the client's head parses whole: {parsed:?}"
    );
    for field in resp.headers.iter() {
        for hop in [
            "connection",
            "keep-alive",
            "upgrade",
            "proxy-connection",
            "te",
        ] {
            assert!(!field.name.eq_ignore_ascii_case(hop), "{hop} passed on");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    const STATUS: &[&str] = &[
        "HTTP/1.1 200 OK",
        "HTTP/1.0 200 OK",
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 304 Not Modified",
        "HTTP/1.1 103 Hints\r\n\r\nHTTP/1.1 200 OK",
        "HTTP/1.1 101 Up",
        "HTTP/1.1 099 Odd",
        "HTTP/1.1 299 Own Phrase",
    ];
    const FIELDS: &[&str] = &[
        "content-length: 5",
        "content-length: 0",
        "content-length: x",
        "content-length: 5, 5",
        "transfer-encoding: chunked",
        "transfer-encoding: gzip, chunked",
        "transfer-encoding: gzip",
        "connection: close",
        "connection: keep-alive, x-a",
        "x-a: 1",
        "keep-alive: timeout=5",
        "trailer: x-t",
        "server: s",
    ];
    /// Pieces of bodies, most of them chunked framing.
    const BODY: &[&str] = &[
        "\r\n",
        "\n",
        "\r",
        "0",
        "1",
        "5",
        "a",
        "F",
        "ffffffffffffffffffff",
        ";x=1",
        " ",
        "\t",
        "\0",
        "hello",
        "x-t: 1",
        "HTTP/1.1 200 OK",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Answers put together from HTTP's pieces hold what the fuzz
        /// target asserts (on stable, beside the corpus replay).
        #[test]
        fn answers_of_http_pieces(
            status in 0..STATUS.len(),
            fields in proptest::collection::vec(0..FIELDS.len(), 0..5),
            body in proptest::collection::vec(0..BODY.len(), 0..30),
        ) {
            let mut data = format!("{}\r\n", STATUS[status]);
            for f in fields {
                data.push_str(FIELDS[f]);
                data.push_str("\r\n");
            }
            data.push_str("\r\n");
            data.extend(body.iter().map(|&b| BODY[b]));
            super::answer(data.as_bytes());
        }
    }
}
