//! The first inputs of every corpus: valid messages of each kind, written
//! by `cargo test -p edgelb --lib fuzz::seeds -- --ignored` into
//! `fuzz/corpus/<target>/seed-*` (fuzzing then grows the corpora and
//! `cargo fuzz cmin` keeps them small; see docs/fuzzing.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gossip::{DeltaEncoder, Entry as LoadEntry, Report, encode, encode_compact};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, SnapshotMeta, Vote};
use raft_store::command::{Command, Patch, PatchOp};
use raft_store::model::{Certificate, Instance};
use raft_store::state::Applied;
use raft_store::types::{ClusterNode, Entry, Request};
use uuid::Uuid;

use super::fixture;
use crate::cluster::frame::{self, Version};
use crate::cluster::pki::node_key_and_csr;
use crate::cluster::{Forward, ForwardReply, PreVote, Rpc, RpcReply};

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), seed).expect("seed written");
    }
}

fn load_report(seq: u64, n: u8, bump: u32) -> Report {
    Report {
        node_id: 2,
        incarnation: 1,
        seq,
        sent_at_ms: 1_000,
        entries: (0..n)
            .map(|i| LoadEntry {
                instance: [i * 16; 16],
                inflight: 2 + bump,
                long_inflight: 1,
                arrival_rate_milli: 100 + 50 * bump,
                mean_service_us: 1000,
            })
            .collect(),
    }
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(3, 1), index)
}

fn commands() -> Vec<Command> {
    let instance = Instance {
        uuid: Uuid::from_u128(200),
        name: "web-c".into(),
        address: "10.0.0.9".into(),
    };
    let attach = Command::AttachInstance {
        group: "web".into(),
        instance,
    };
    vec![
        attach.clone(),
        Command::DetachInstance {
            group: "web".into(),
            instance: "web-a".into(),
        },
        Command::PatchGroup {
            id: "api".into(),
            patch: Patch::HardLimit(7),
        },
        Command::PatchGroup {
            id: "web".into(),
            patch: Patch::Services {
                op: PatchOp::Del,
                value: vec!["80".parse().expect("a spec")],
            },
        },
        Command::DeleteGroup {
            id: "db".into(),
            force: true,
        },
        Command::PutCertificate {
            certificate: Certificate {
                name: "c2".into(),
                chain: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
                private_key: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
                    .into(),
                not_after: Some("2030-01-01T00:00:00Z".into()),
            },
        },
        Command::Once {
            request: Uuid::from_u128(0x5eed_0001),
            command: Box::new(Command::PatchGroup {
                id: "api".into(),
                patch: Patch::HardLimit(9),
            }),
        },
        Command::Batch {
            commands: vec![
                attach,
                Command::DeleteGroup {
                    id: "api".into(),
                    force: false,
                },
            ],
        },
    ]
}

fn rpcs() -> Vec<Rpc> {
    let entries: Vec<Entry> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, command)| Entry {
            log_id: log_id(10 + i as u64),
            payload: EntryPayload::Normal(Request { command }),
        })
        .collect();
    let node = ClusterNode {
        region: "eu".into(),
        cluster_addr: "127.0.0.4:7071".into(),
        admin_addr: "127.0.0.4:7070".into(),
    };
    let membership = Entry {
        log_id: log_id(9),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([(1, node.clone()), (2, node.clone()), (3, node.clone())]),
        )),
    };
    let mut out = vec![
        Rpc::Vote(VoteRequest::new(Vote::new(3, 1), Some(log_id(8)))),
        Rpc::PreVote(PreVote {
            last_log_id: Some(log_id(8)),
        }),
        Rpc::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(8)),
            entries: std::iter::once(membership).chain(entries).collect(),
            leader_commit: Some(log_id(8)),
        }),
        Rpc::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }),
        Rpc::InstallSnapshot(InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(8)),
                last_membership: Default::default(),
                snapshot_id: "3-1-8".into(),
            },
            offset: 0,
            data: serde_json::to_vec(fixture::state()).expect("state json"),
            done: true,
        }),
        Rpc::Forward(Forward::AddLearner { node_id: 4, node }),
        Rpc::Forward(Forward::RemoveNode { node_id: 4 }),
        Rpc::Forward(Forward::Linearize),
        Rpc::Forward(Forward::Features),
    ];
    out.extend(
        commands()
            .into_iter()
            .map(|c| Rpc::Forward(Forward::Write(c))),
    );
    out
}

fn replies() -> Vec<RpcReply> {
    vec![
        RpcReply::PreVote(true),
        RpcReply::Error("raft not running".into()),
        RpcReply::Forward(Ok(ForwardReply::Written {
            log_index: 12,
            result: Ok(Applied::Certificate("c2".into())),
        })),
        RpcReply::Forward(Ok(ForwardReply::Features {
            batches: true,
            group_options: true,
            once: true,
        })),
        RpcReply::Vote(Ok(openraft::raft::VoteResponse::new(
            Vote::new(3, 1),
            Some(log_id(8)),
            true,
        ))),
        RpcReply::AppendEntries(Ok(openraft::raft::AppendEntriesResponse::Success)),
    ]
}

fn kind_byte(rpc: &Rpc) -> u8 {
    match rpc {
        Rpc::AppendEntries(_) => 0,
        Rpc::Vote(_) => 1,
        Rpc::PreVote(_) => 2,
        Rpc::InstallSnapshot(_) => 3,
        Rpc::Forward(_) => 4,
    }
}

fn prefixed(which: u8, json: &[u8]) -> Vec<u8> {
    std::iter::once(which).chain(json.iter().copied()).collect()
}

fn pem_pair(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    (
        params.self_signed(&key).expect("cert").pem(),
        key.serialize_pem(),
    )
}

#[test]
#[ignore = "writes the seed corpora into fuzz/corpus"]
fn write_seeds() {
    // Gossip: full and compact reports, and a delta on an eight-instance base.
    let reports = [
        load_report(1, 0, 0),
        load_report(2, 3, 1),
        load_report(3, 8, 2),
    ];
    let mut seeds = Vec::new();
    for r in &reports {
        seeds.push(encode(r).expect("report"));
        seeds.push(encode_compact(r).expect("compact"));
    }
    write("gossip_report", &seeds);
    let mut enc = DeltaEncoder::new();
    enc.next(&load_report(4, 8, 0), true).expect("full");
    let mut deltas = Vec::new();
    for (seq, bump) in [(5, 3), (6, 9)] {
        if let Some((_, d)) = enc
            .next(&load_report(seq, 8, bump), false)
            .expect("delta")
            .delta
        {
            deltas.push(d);
        }
    }
    write("gossip_delta", &deltas);

    // Cluster: whole request streams; bodies by kind, replies, a snapshot.
    let mut streams: Vec<Vec<u8>> = rpcs()
        .iter()
        .map(|r| frame::encode_request(1, r, Version::V1).expect("request"))
        .collect();
    let version2 = rpcs()
        .into_iter()
        .filter(|r| matches!(r, Rpc::InstallSnapshot(_)))
        .map(|r| frame::encode_request(1, &r, Version::V2).expect("request"));
    let rpcs: Vec<Rpc> = rpcs()
        .into_iter()
        .chain(
            rpcs()
                .into_iter()
                .filter(|r| matches!(r, Rpc::InstallSnapshot(_))),
        )
        .collect();
    streams.extend(version2);
    write("cluster_stream", &streams);
    let mut bodies = Vec::new();
    for (rpc, stream) in rpcs.iter().zip(&streams) {
        let head_len = 4 + u32::from_be_bytes(stream[..4].try_into().expect("prefix")) as usize;
        bodies.push(prefixed(kind_byte(rpc), &stream[head_len + 4..]));
    }
    for reply in replies() {
        bodies.push(prefixed(5, &serde_json::to_vec(&reply).expect("reply")));
    }
    bodies.push(prefixed(
        6,
        &serde_json::to_vec(fixture::state()).expect("state"),
    ));
    write("cluster_body", &bodies);

    // Admin bodies.
    let (chain, key) = pem_pair(&["shop.example.com"]);
    let (_, other_key) = pem_pair(&["x.example.com"]);
    let cert = |key: &str| {
        serde_json::json!({"name": "shop-cert", "chain": chain, "private_key": key}).to_string()
    };
    let admin: Vec<(u8, String)> = vec![
        (0, r#"{"name":"shop","services":[{"port":443,"destination_port":8443,"handlers":["tls","http"]},{"port":80,"destination_port":443,"handlers":["http","redirect"]}],"domains":[{"name":"Shop.Example.com"},{"name":"*.shop.example.com","certificate":{"name":"web-cert"}}],"hard_limit":10}"#.into()),
        (0, r#"{"services":[{"port":9000,"destination_port":9000,"handlers":[]}],"domains":[{"name":"q.example.com"}]}"#.into()),
        (1, r#"{"prop":"services","op":"add","value":[{"port":9443,"destination_port":8443,"handlers":["tls"]}]}"#.into()),
        (1, r#"{"prop":"services","op":"del","value":[80,{"port":443}]}"#.into()),
        (1, r#"{"prop":"domains","op":"set","value":["a.example.com",{"name":"b.example.com","certificate":{"name":"web-cert"}}]}"#.into()),
        (1, r#"{"prop":"hard_limit","op":"set","value":5}"#.into()),
        (2, r#"{"name":"web-c","address":"10.0.0.9"}"#.into()),
        (2, r#"{"address":"fd00::1"}"#.into()),
        (2, r#"{"address":"backend.internal"}"#.into()),
        (3, cert(&key)),
        (3, cert(&other_key)),
        (4, r#"{"node_id":4,"cluster_addr":"127.0.0.4:7071","admin_addr":"127.0.0.4:7070","region":"eu"}"#.into()),
    ];
    let admin: Vec<Vec<u8>> = admin
        .iter()
        .map(|(w, j)| prefixed(*w, j.as_bytes()))
        .collect();
    write("admin_body", &admin);

    write(
        "port_spec",
        &[
            "443",
            "443:8443",
            "443:8443/tls+http\n80:443/http+redirect",
            "5432:5432\n8080:80/http",
            "9443:9000/tls",
        ]
        .map(|s| s.as_bytes().to_vec()),
    );

    let full = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/config/fra-1.toml"),
    )
    .expect("an example config");
    let rest = r#"node_id = 7
advertise_cluster_addr = "203.0.113.7:7071"
join = "http://10.1.0.11:7070"
token = "0123456789abcdef0123"
metrics_token = "fedcba9876543210fedc"
trusted_proxies = ["10.0.0.0/8", "fd00::1"]
admin_max_connections = 64
send_timeout = "30s"
tunnel_idle_timeout = "1h"
leave_on_exit = true
gossip_min_interval = "20ms"
gossip_interval = "200ms"
gossip_ttl = "2s"
gossip_estimator = "decay"
raft_heartbeat_interval = "100ms"
election_timeout = "1s"
node_cert_lifetime = "30d"
"#;
    write(
        "config_toml",
        &[full, rest.as_bytes().to_vec(), b"region = \"x\"\n".to_vec()],
    );

    let csr_for = |names: &[&str]| {
        let key = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params")
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
            .into_bytes()
    };
    write(
        "csr",
        &[
            node_key_and_csr(7).expect("csr").1.into_bytes(),
            node_key_and_csr(8).expect("csr").1.into_bytes(),
            csr_for(&["node-7.cluster.edgelb", "evil.example.com"]),
        ],
    );

    write(
        "http_head",
        &[
            "GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET /a?b=c HTTP/1.1\r\nHost: Web.Example.COM.:80\r\nConnection: keep-alive, x-foo\r\nX-Foo: 1\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\n\r\n",
            "GET http://api.example.com/x HTTP/1.1\r\nHost: other\r\n\r\n",
            "GET /chat HTTP/1.1\r\nHost: x.apps.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET https://[::1]:8443/p HTTP/2\r\ncookie: a=1\r\ncookie: b=2\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: [::1]\r\nTE: trailers\r\nProxy-Connection: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]
        .map(|s| s.as_bytes().to_vec()),
    );
}
