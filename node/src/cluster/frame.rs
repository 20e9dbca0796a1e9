//! The wire format of one RPC stream: length-prefixed frames, JSON but for
//! a snapshot chunk's data on version 2.
//!
//! ```text
//!  client ─▶ server   [u32 BE len][Header json]  {"from":1,"rpc":"vote"}   ≤ 1 KiB
//!                     [u32 BE len][body]          the Rpc's payload         ≤ limit(rpc)
//!                     FIN
//!  server ─▶ client   [u32 BE len][RpcReply json]                           ≤ reply limit(rpc)
//!                     FIN
//!
//!  body, edgelb-raft/1:  the request as JSON
//!  body, edgelb-raft/2:  the same, except a snapshot chunk:
//!                        [u32 BE n][n bytes: the request as JSON, "data":[]]
//!                        [the chunk's data, deflated]
//! ```
//!
//! The header comes first so the server learns who claims to speak (checked
//! against the certificate) and how large a body it accepts before reading
//! one: appends and snapshot chunks may be large, votes and answers are
//! small. Encoding and decoding are plain functions over bytes; only
//! [`read_frame`] touches a stream.
//!
//! A connection's negotiated ALPN is its frames' [`Version`]. Version 1
//! sends a snapshot chunk's bytes (themselves the state's JSON) as a JSON
//! array of numbers, about 3.3 bytes on the wire per byte of snapshot;
//! version 2 sends them deflated, about half a byte per byte (random
//! uuids are most of a snapshot), a seventh of version 1's (see
//! `snapshot_chunks_are_a_fraction_of_their_size_on_version_2`): what a
//! joining node waits for across a slow or lossy link.

use std::io::{Read, Write};
use std::time::Duration;

use flate2::Compression;
use flate2::bufread::DeflateDecoder;
use flate2::write::DeflateEncoder;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use raft_store::{NodeId, TypeConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::rpc::{Forward, PreVote, Rpc, RpcKind, RpcReply};
use super::tls::{ALPN_RAFT, ALPN_RAFT_2, negotiated_alpn};

/// The largest frame anything may send: an append batch or a snapshot chunk.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// The most data one snapshot chunk carries on `edgelb-raft/2`, as sent
/// and once inflated: part of that version (a receiver refuses more, so a
/// release that sends larger chunks needs `edgelb-raft/3`), and the chunks
/// this release sends on it (`network::PeerNetwork::full_snapshot`); a
/// small bound because deflate inflates up to
/// about a thousandfold, and a peer could otherwise make a few kilobytes
/// cost 64 MiB a stream.
pub const CHUNK_DATA_LIMIT: usize = 1024 * 1024;
/// The largest header frame.
pub(crate) const HEADER_LIMIT: usize = 1024;
/// A vote, or an answer to anything but a forward.
const SMALL_LIMIT: usize = 64 * 1024;
/// A forwarded command (may carry certificates) or its answer (a group).
const FORWARD_LIMIT: usize = 8 * 1024 * 1024;

/// How long a server waits for a header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Which frames a Raft connection carries: its negotiated ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// `edgelb-raft/1`: every body is JSON.
    V1,
    /// `edgelb-raft/2`: a snapshot chunk's data is deflated bytes after
    /// the chunk's JSON; everything else as version 1.
    V2,
}

impl Version {
    /// The version an ALPN names; `None` if not a Raft one.
    pub(crate) fn of_alpn(alpn: &[u8]) -> Option<Self> {
        match alpn {
            ALPN_RAFT => Some(Self::V1),
            ALPN_RAFT_2 => Some(Self::V2),
            _ => None,
        }
    }

    /// The version of a Raft connection; version 1 if its ALPN is not a
    /// Raft one (which the accepting side never lets through).
    pub(crate) fn of(conn: &quinn::Connection) -> Self {
        negotiated_alpn(conn)
            .and_then(|alpn| Self::of_alpn(&alpn))
            .unwrap_or(Self::V1)
    }
}

/// The first frame of every stream: who is asking, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Header {
    /// The node id the client claims; must match its certificate.
    pub(crate) from: NodeId,
    /// What the body holds.
    pub(crate) rpc: RpcKind,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The bytes are not the JSON expected.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A snapshot chunk's framing or deflated data is broken.
    #[error("malformed snapshot chunk: {0}")]
    BadChunk(String),
    /// The stream ended inside a frame, or was reset.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

impl RpcKind {
    /// The largest request body of this kind.
    pub(crate) fn request_limit(self) -> usize {
        match self {
            Self::AppendEntries | Self::InstallSnapshot => MAX_FRAME,
            Self::Vote | Self::PreVote => SMALL_LIMIT,
            Self::Forward => FORWARD_LIMIT,
        }
    }

    /// The largest reply to a request of this kind.
    pub(crate) fn reply_limit(self) -> usize {
        match self {
            Self::AppendEntries | Self::InstallSnapshot | Self::Vote | Self::PreVote => SMALL_LIMIT,
            Self::Forward => FORWARD_LIMIT,
        }
    }

    /// How long a server waits for the body after the header.
    pub(crate) fn body_timeout(self) -> Duration {
        match self {
            Self::AppendEntries | Self::InstallSnapshot => Duration::from_secs(60),
            Self::Vote | Self::PreVote | Self::Forward => Duration::from_secs(10),
        }
    }
}

/// `value` as one frame (length prefix included), refused if the JSON
/// exceeds `limit`.
pub(crate) fn encode<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0; 4];
    serde_json::to_writer(&mut buf, value)?;
    seal(buf, limit)
}

/// `buf` (four bytes kept for the prefix, then a body) with its length
/// prefix written, refused if the body exceeds `limit`.
fn seal(mut buf: Vec<u8>, limit: usize) -> Result<Vec<u8>, FrameError> {
    let size = buf.len() - 4;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let len = u32::try_from(size).map_err(|_| FrameError::TooLarge { size, limit })?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// The request's header and body frames, as `version` writes them.
pub(crate) fn encode_request(
    from: NodeId,
    rpc: &Rpc,
    version: Version,
) -> Result<Vec<u8>, FrameError> {
    let kind = rpc.kind();
    let mut buf = encode(&Header { from, rpc: kind }, HEADER_LIMIT)?;
    let limit = kind.request_limit();
    let body = match rpc {
        Rpc::AppendEntries(r) => encode(r, limit)?,
        Rpc::Vote(r) => encode(r, limit)?,
        Rpc::PreVote(r) => encode(r, limit)?,
        Rpc::InstallSnapshot(r) => match version {
            Version::V1 => encode(r, limit)?,
            Version::V2 => encode_chunk(r, limit)?,
        },
        Rpc::Forward(r) => encode(r, limit)?,
    };
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// A snapshot chunk as version 2 frames it (module docs), refused if its
/// data exceeds [`CHUNK_DATA_LIMIT`] or the frame `limit`.
fn encode_chunk(
    r: &InstallSnapshotRequest<TypeConfig>,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    if r.data.len() > CHUNK_DATA_LIMIT {
        return Err(FrameError::TooLarge {
            size: r.data.len(),
            limit: CHUNK_DATA_LIMIT,
        });
    }
    let head = InstallSnapshotRequest::<TypeConfig> {
        vote: r.vote,
        meta: r.meta.clone(),
        offset: r.offset,
        data: Vec::new(),
        done: r.done,
    };
    // The frame's prefix, then the JSON as a frame of its own, then the
    // data.
    let mut buf = vec![0; 4];
    buf.extend_from_slice(&encode(&head, limit)?);
    // The fastest level: the data is JSON, which even that shrinks about
    // tenfold, and a chunk is deflated within its call's time.
    let mut deflate = DeflateEncoder::new(buf, Compression::fast());
    let written = deflate.write_all(&r.data).and_then(|()| deflate.finish());
    seal(
        written.map_err(|e| FrameError::BadChunk(format!("deflating: {e}")))?,
        limit,
    )
}

/// A version-2 snapshot chunk's body; its data may inflate to at most
/// `limit` bytes.
fn decode_chunk(
    body: &[u8],
    limit: usize,
) -> Result<InstallSnapshotRequest<TypeConfig>, FrameError> {
    let bad = |why: &str| FrameError::BadChunk(why.to_owned());
    let (len, rest) = body
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("shorter than its length prefix"))?;
    let json = u32::from_be_bytes(*len) as usize;
    if json > rest.len() {
        return Err(bad("its JSON runs past the frame"));
    }
    let (json, deflated) = rest.split_at(json);
    let mut chunk: InstallSnapshotRequest<TypeConfig> = serde_json::from_slice(json)?;
    if !chunk.data.is_empty() {
        return Err(bad("data inside its JSON"));
    }
    let mut inflate = DeflateDecoder::new(deflated);
    let mut data = Vec::new();
    (&mut inflate)
        .take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| FrameError::BadChunk(format!("data does not inflate: {e}")))?;
    if data.len() > limit {
        return Err(FrameError::BadChunk(format!(
            "data inflates past the limit of {limit} bytes"
        )));
    }
    if inflate.total_in() != deflated.len() as u64 {
        return Err(bad("bytes after its deflated data"));
    }
    chunk.data = data;
    Ok(chunk)
}

/// Decodes a header frame's body.
pub(crate) fn decode_header(body: &[u8]) -> Result<Header, FrameError> {
    decode(body)
}

/// Decodes a request body of the kind its header named, as `version`
/// frames it.
pub(crate) fn decode_request(
    kind: RpcKind,
    body: &[u8],
    version: Version,
) -> Result<Rpc, FrameError> {
    Ok(match kind {
        RpcKind::InstallSnapshot if version == Version::V2 => {
            Rpc::InstallSnapshot(decode_chunk(body, CHUNK_DATA_LIMIT)?)
        }
        RpcKind::AppendEntries => {
            Rpc::AppendEntries(decode::<AppendEntriesRequest<TypeConfig>>(body)?)
        }
        RpcKind::Vote => Rpc::Vote(decode::<VoteRequest<NodeId>>(body)?),
        RpcKind::PreVote => Rpc::PreVote(decode::<PreVote>(body)?),
        RpcKind::InstallSnapshot => {
            Rpc::InstallSnapshot(decode::<InstallSnapshotRequest<TypeConfig>>(body)?)
        }
        RpcKind::Forward => Rpc::Forward(decode::<Forward>(body)?),
    })
}

/// Decodes a reply body.
pub(crate) fn decode_reply(body: &[u8]) -> Result<RpcReply, FrameError> {
    decode(body)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Reads one frame's body of at most `limit` bytes. Memory grows with what
/// actually arrives, not with what the prefix announces.
pub(crate) async fn read_frame<R>(r: &mut R, limit: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut len = [0; 4];
    r.read_exact(&mut len).await?;
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let mut body = Vec::with_capacity(size.min(SMALL_LIMIT));
    let mut take = r.take(size as u64);
    take.read_to_end(&mut body).await?;
    if body.len() != size {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(body)
}

/// Takes the end of `recv` (its FIN) if it has already arrived, without
/// waiting for it; `true` when it had. Once a frame has been read, nothing
/// else may follow; a stream dropped before its end was read is stopped (a
/// STOP_SENDING frame), which cost every call a packet more each way, and
/// one more acknowledged. A stream whose end is still on the way (or that
/// carries more bytes, which nothing here reads) is stopped when dropped.
pub(crate) fn take_end(recv: &mut quinn::RecvStream) -> bool {
    let mut byte = [0u8; 1];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let read = std::pin::pin!(recv.read(&mut byte));
    matches!(read.poll(&mut cx), std::task::Poll::Ready(Ok(None)))
}

/// Waits up to `wait` for the end of `recv` (see [`take_end`]) and drops
/// it: the end of a reply often follows its data in a packet of its own.
pub(crate) async fn drain_end(mut recv: quinn::RecvStream, wait: Duration) {
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(wait, recv.read(&mut byte)).await;
}

#[cfg(test)]
mod tests {
    use openraft::{LogId, SnapshotMeta, Vote};
    use raft_store::command::Command;
    use raft_store::model::{Instance, ServiceGroup};
    use raft_store::state::State;
    use rand::{Rng, SeedableRng};
    use uuid::Uuid;

    use super::*;

    /// The start of a snapshot of `n` instances with random uuids, as the
    /// state machine writes one (the state's JSON).
    fn snapshot_data(n: u32, len: usize) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut state = State::default();
        let group: ServiceGroup = serde_json::from_value(serde_json::json!({
            "uuid": Uuid::from_u128(rng.random()),
            "name": "web",
            "domains": [{"fqdn": "web.example.com", "certificate": null}],
            "services": [{"port": 443, "destination_port": 8443, "handlers": ["tls", "http"]}],
            "hard_limit": 100,
            "instances": [],
            "created_at": "2026-01-01T00:00:00Z",
            "persistent": true,
        }))
        .unwrap();
        let mut group = group;
        group.instances = (0..n)
            .map(|i| Instance {
                uuid: Uuid::from_u128(rng.random()),
                name: format!("web-{i}"),
                address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            })
            .collect();
        state.apply(&Command::CreateGroup { group }).unwrap();
        let mut data = serde_json::to_vec(&state).unwrap();
        assert!(data.len() >= len, "{} bytes", data.len());
        data.truncate(len);
        data
    }

    fn chunk(data: Vec<u8>) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 80)),
                last_membership: Default::default(),
                snapshot_id: "3-1-80".into(),
            },
            offset: 262_144,
            data,
            done: false,
        }
    }

    /// A request's body frame as `version` encodes it (the header's frame
    /// skipped).
    fn body(rpc: &Rpc, version: Version) -> Vec<u8> {
        let bytes = encode_request(1, rpc, version).unwrap();
        let head = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        bytes[4 + head + 4..].to_vec()
    }

    #[test]
    fn snapshot_chunks_are_a_fraction_of_their_size_on_version_2() {
        // A chunk as the leader sends one on version 1: 256 KiB of a
        // snapshot (four times that on version 2).
        let data = snapshot_data(4_000, 256 * 1024);
        let rpc = Rpc::InstallSnapshot(chunk(data.clone()));
        let v1 = body(&rpc, Version::V1);
        let v2 = body(&rpc, Version::V2);
        eprintln!(
            "a 256 KiB chunk: {} bytes on version 1 ({:.2} per byte), {} on version 2 ({:.3})",
            v1.len(),
            v1.len() as f64 / data.len() as f64,
            v2.len(),
            v2.len() as f64 / data.len() as f64
        );
        assert!(v1.len() > data.len() * 3, "{}", v1.len());
        // Random uuids are most of a snapshot: half a byte per byte is
        // about what deflate makes of them.
        assert!(v2.len() * 5 < v1.len(), "{} against {}", v2.len(), v1.len());
        for (body, version) in [(v1, Version::V1), (v2, Version::V2)] {
            let Rpc::InstallSnapshot(back) =
                decode_request(RpcKind::InstallSnapshot, &body, version).unwrap()
            else {
                panic!("not a chunk");
            };
            assert_eq!(back.data, data);
            assert_eq!((back.offset, back.done), (262_144, false));
            assert_eq!(back.meta.snapshot_id, "3-1-80");
            assert_eq!(back.vote, Vote::new_committed(3, 1));
        }
        // An empty last chunk, as openraft ends a snapshot with.
        let mut last = chunk(Vec::new());
        last.done = true;
        let body = body(&Rpc::InstallSnapshot(last), Version::V2);
        let back = decode_request(RpcKind::InstallSnapshot, &body, Version::V2).unwrap();
        assert!(matches!(back, Rpc::InstallSnapshot(c) if c.done && c.data.is_empty()));
    }

    #[test]
    fn other_requests_are_framed_alike_on_both_versions() {
        let append = Rpc::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        });
        for rpc in [vote(), append] {
            assert_eq!(body(&rpc, Version::V1), body(&rpc, Version::V2));
        }
    }

    #[test]
    fn broken_version_2_chunks_are_refused() {
        let good = body(
            &Rpc::InstallSnapshot(chunk(b"{\"groups\":[]}".repeat(100))),
            Version::V2,
        );
        let json = u32::from_be_bytes(good[..4].try_into().unwrap()) as usize;
        let decode = |b: &[u8]| {
            decode_chunk(b, MAX_FRAME)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        // Shorter than the prefix; a JSON length past the end.
        assert!(decode(&good[..3]).contains("length prefix"));
        let mut long = good.clone();
        long[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&long).contains("past the frame"));
        // Data cut short, data that is not deflate, bytes after it.
        assert!(decode(&good[..good.len() - 2]).contains("inflate"));
        let mut garbage = good[..4 + json].to_vec();
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(decode(&garbage).contains("inflate"));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"more");
        assert!(decode(&trailing).contains("after"));
        // Data inside the JSON (a version-1 body's form) is refused.
        let v1 = body(&Rpc::InstallSnapshot(chunk(b"xy".to_vec())), Version::V1);
        let mut inside = (v1.len() as u32).to_be_bytes().to_vec();
        inside.extend_from_slice(&v1);
        inside.extend_from_slice(&good[4 + json..]);
        assert!(decode(&inside).contains("inside its JSON"));
        // A body that inflates past the limit is refused once past it,
        // without inflating the rest.
        let big = body(
            &Rpc::InstallSnapshot(chunk(vec![b' '; CHUNK_DATA_LIMIT])),
            Version::V2,
        );
        assert!(big.len() < 16 * 1024, "{}", big.len());
        let e = decode_chunk(&big, 64 * 1024).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("past the limit of 65536"), "{e}");
        assert!(decode_request(RpcKind::InstallSnapshot, &big, Version::V2).is_ok());
        // The server's bound is the chunk data limit, not the frame's: one
        // byte more is refused, as the sender refuses to send it.
        let mut bomb = big[..4 + json].to_vec();
        let mut deflate = DeflateEncoder::new(Vec::new(), Compression::best());
        deflate
            .write_all(&vec![b' '; CHUNK_DATA_LIMIT + 1])
            .unwrap();
        bomb.extend_from_slice(&deflate.finish().unwrap());
        let e = decode_request(RpcKind::InstallSnapshot, &bomb, Version::V2).unwrap_err();
        assert!(e.to_string().contains("past the limit"), "{e}");
        let over = Rpc::InstallSnapshot(chunk(vec![b' '; CHUNK_DATA_LIMIT + 1]));
        assert!(matches!(
            encode_request(1, &over, Version::V2),
            Err(FrameError::TooLarge { .. })
        ));
        // What the server reads: a version-1 chunk's body is not version 2.
        assert!(decode_request(RpcKind::InstallSnapshot, &v1, Version::V2).is_err());
    }

    fn vote() -> Rpc {
        Rpc::Vote(VoteRequest::new(Vote::new(3, 1), None))
    }

    #[tokio::test]
    async fn request_round_trips() {
        let bytes = encode_request(1, &vote(), Version::V1).unwrap();
        let mut r = bytes.as_slice();
        let header = decode_header(&read_frame(&mut r, HEADER_LIMIT).await.unwrap()).unwrap();
        assert_eq!(
            header,
            Header {
                from: 1,
                rpc: RpcKind::Vote
            }
        );
        let body = read_frame(&mut r, header.rpc.request_limit())
            .await
            .unwrap();
        let rpc = decode_request(header.rpc, &body, Version::V1).unwrap();
        assert!(matches!(rpc, Rpc::Vote(v) if v.vote == Vote::new(3, 1)));
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_before_reading() {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = read_frame(&mut bytes.as_slice(), MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut bytes = 10u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = read_frame(&mut bytes.as_slice(), MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Io(_)), "{e}");
    }

    #[test]
    fn garbage_and_wrong_kinds_do_not_decode() {
        assert!(decode_header(b"\xff\x00").is_err());
        assert!(decode_header(br#"{"from":1,"rpc":"vote","x":1}"#).is_err());
        assert!(decode_header(br#"{"from":-1,"rpc":"vote"}"#).is_err());
        for version in [Version::V1, Version::V2] {
            assert!(decode_request(RpcKind::AppendEntries, br#"{"vote":1}"#, version).is_err());
        }
        assert!(decode_reply(b"null").is_err());
    }

    #[test]
    fn encode_refuses_over_limit() {
        let e = encode(&"x".repeat(100), 10).unwrap_err();
        assert!(matches!(
            e,
            FrameError::TooLarge {
                size: 102,
                limit: 10
            }
        ));
    }
}
