//! Raft RPC streams from peers: the header frame, the body of each kind,
//! the replies, and what the state machine does with the commands they
//! carry.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use openraft::EntryPayload;
use raft_store::state::State;

use super::fixture;
use crate::cluster::frame::{self, HEADER_LIMIT, Version};
use crate::cluster::rpc::RpcKind;
use crate::cluster::{Forward, Rpc};

/// Polls a future over in-memory bytes, which never waits.
fn ready<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("reading from a byte slice waited"),
    }
}

/// A whole request stream as a server reads it: the header frame (at most
/// 1 KiB), then a body frame of at most the kind's limit, decoded as that
/// kind.
pub fn stream(data: &[u8]) {
    let mut r = data;
    let Ok(head) = ready(frame::read_frame(&mut r, HEADER_LIMIT)) else {
        return;
    };
    assert!(head.len() <= HEADER_LIMIT);
    let Ok(header) = frame::decode_header(&head) else {
        return;
    };
    let again = frame::encode(&header, HEADER_LIMIT).expect("a decoded header encodes");
    assert_eq!(frame::decode_header(&again[4..]).ok(), Some(header));
    let Ok(body) = ready(frame::read_frame(&mut r, header.rpc.request_limit())) else {
        return;
    };
    for version in VERSIONS {
        if let Ok(rpc) = frame::decode_request(header.rpc, &body, version) {
            assert_eq!(rpc.kind(), header.rpc);
            exercise(&rpc);
        }
    }
}

/// Every frame version; a body is read as each.
const VERSIONS: [Version; 2] = [Version::V1, Version::V2];

const KINDS: [RpcKind; 5] = [
    RpcKind::AppendEntries,
    RpcKind::Vote,
    RpcKind::PreVote,
    RpcKind::InstallSnapshot,
    RpcKind::Forward,
];

/// One body: the first byte picks what it is (a request of each kind, a
/// reply, or a snapshot's state), the rest is the JSON.
pub fn body(data: &[u8]) {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 7 {
        5 => {
            if let Ok(reply) = frame::decode_reply(json) {
                // What the client checks next: the reply matches a kind.
                let _ = reply.kind();
            }
        }
        6 => {
            // A snapshot's state, as installed from a leader's chunks.
            if let Ok(state) = serde_json::from_slice::<State>(json) {
                fixture::snapshot_round_trip(&state);
            }
        }
        k => {
            let kind = KINDS[usize::from(k)];
            for version in VERSIONS {
                if let Ok(rpc) = frame::decode_request(kind, json, version) {
                    assert_eq!(rpc.kind(), kind);
                    exercise(&rpc);
                }
            }
        }
    }
}

/// What the node does with a decoded request that does not need a running
/// Raft: a forwarded write and the commands of appended entries are
/// applied to the fixture state; every request re-encodes.
fn exercise(rpc: &Rpc) {
    // Re-encoding may exceed the kind's limit only if the JSON grew; what
    // version 2 encodes, it decodes to the same request.
    let _ = frame::encode_request(1, rpc, Version::V1);
    if let Rpc::InstallSnapshot(chunk) = rpc
        && let Ok(again) = frame::encode_request(1, rpc, Version::V2)
    {
        let body = &again[4 + u32_at(&again) as usize + 4..];
        match frame::decode_request(RpcKind::InstallSnapshot, body, Version::V2) {
            Ok(Rpc::InstallSnapshot(back)) => {
                assert_eq!(back.data, chunk.data);
                assert_eq!(back.offset, chunk.offset);
                assert_eq!(back.meta, chunk.meta);
            }
            other => panic!("a chunk version 2 encoded did not decode: {other:?}"),
        }
    }
    match rpc {
        Rpc::Forward(Forward::Write(cmd)) => fixture::apply(cmd),
        Rpc::AppendEntries(req) => {
            for entry in req.entries.iter().take(16) {
                if let EntryPayload::Normal(r) = &entry.payload {
                    fixture::apply(&r.command);
                }
            }
        }
        _ => {}
    }
}

/// The big-endian `u32` a frame starts with.
fn u32_at(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[..4].try_into().expect("a frame has a prefix"))
}
