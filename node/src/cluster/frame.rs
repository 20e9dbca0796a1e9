//! The wire format of one RPC stream: length-prefixed JSON frames.
//!
//! ```text
//!  client ─▶ server   [u32 BE len][Header json]  {"from":1,"rpc":"vote"}   ≤ 1 KiB
//!                     [u32 BE len][body json]     the Rpc's payload         ≤ limit(rpc)
//!                     FIN
//!  server ─▶ client   [u32 BE len][RpcReply json]                           ≤ reply limit(rpc)
//!                     FIN
//! ```
//!
//! The header comes first so the server learns who claims to speak (checked
//! against the certificate) and how large a body it accepts before reading
//! one: appends and snapshot chunks may be large, votes and answers are
//! small. Encoding and decoding are plain functions over bytes; only
//! [`read_frame`] touches a stream.

use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use raft_store::{NodeId, TypeConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::rpc::{Forward, PreVote, Rpc, RpcKind, RpcReply};

/// The largest frame anything may send: an append batch or a snapshot chunk.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// The largest header frame.
pub(crate) const HEADER_LIMIT: usize = 1024;
/// A vote, or an answer to anything but a forward.
const SMALL_LIMIT: usize = 64 * 1024;
/// A forwarded command (may carry certificates) or its answer (a group).
const FORWARD_LIMIT: usize = 8 * 1024 * 1024;

/// How long a server waits for a header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    let size = buf.len() - 4;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let len = u32::try_from(size).map_err(|_| FrameError::TooLarge { size, limit })?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// The request's header and body frames.
pub(crate) fn encode_request(from: NodeId, rpc: &Rpc) -> Result<Vec<u8>, FrameError> {
    let kind = rpc.kind();
    let mut buf = encode(&Header { from, rpc: kind }, HEADER_LIMIT)?;
    let limit = kind.request_limit();
    let body = match rpc {
        Rpc::AppendEntries(r) => encode(r, limit)?,
        Rpc::Vote(r) => encode(r, limit)?,
        Rpc::PreVote(r) => encode(r, limit)?,
        Rpc::InstallSnapshot(r) => encode(r, limit)?,
        Rpc::Forward(r) => encode(r, limit)?,
    };
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// Decodes a header frame's body.
pub(crate) fn decode_header(body: &[u8]) -> Result<Header, FrameError> {
    decode(body)
}

/// Decodes a request body of the kind its header named.
pub(crate) fn decode_request(kind: RpcKind, body: &[u8]) -> Result<Rpc, FrameError> {
    Ok(match kind {
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
    use openraft::Vote;

    use super::*;

    fn vote() -> Rpc {
        Rpc::Vote(VoteRequest::new(Vote::new(3, 1), None))
    }

    #[tokio::test]
    async fn request_round_trips() {
        let bytes = encode_request(1, &vote()).unwrap();
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
        let rpc = decode_request(header.rpc, &body).unwrap();
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
        assert!(decode_request(RpcKind::AppendEntries, br#"{"vote":1}"#).is_err());
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
