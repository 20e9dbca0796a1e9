//! The cluster protocol's version is the ALPN (`edgelb-raft/N`): a peer
//! offering only a version a node does not read is refused at the
//! handshake, never misread; a peer offering a later version before the
//! ones a node reads (as a later release does) settles on one of those,
//! with today's binary (which reads versions 2 and 1) and with the
//! format-1 one (version 1 only).

use std::path::PathBuf;
use std::time::Duration;

use edgelb::cluster::Forward;
use integration::quic::{
    ClientCert, Outcome, agreed_alpn, frame_request, try_raft_stream_offering,
};
use integration::{Cluster, ClusterOptions, wait_until};

use super::old_binary;

const LATER: &[u8] = b"edgelb-raft/3";
const V2: &[u8] = b"edgelb-raft/2";
const V1: &[u8] = b"edgelb-raft/1";

/// Checks one single-node cluster running `binary` (`None`: today's),
/// which reads version 2 or not.
async fn check(
    binary: Option<PathBuf>,
    what: &str,
    logs_refusal: bool,
    reads_v2: bool,
) -> anyhow::Result<()> {
    let opts = ClusterOptions {
        binary,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(1, opts).await?;
    let tls = cluster.data_dir(1).join("tls");
    let member = ClientCert::from_pem_files(&tls.join("node.pem"), &tls.join("node.key"))?;
    // A harmless request a member may make.
    let request = frame_request(1, "forward", &serde_json::to_value(Forward::Linearize)?);
    let node = cluster.cluster_addr(1);
    let name = "node-1.cluster.edgelb";

    let source = cluster.backend_ip();
    let offer = |alpns: &'static [&'static [u8]]| {
        let member = member.duplicate();
        let request = request.clone();
        async move { try_raft_stream_offering(alpns, node, source, name, Some(member), &request).await }
    };
    let refused = |outcome: Outcome, offered: &str| match outcome {
        Outcome::Refused(why) => assert!(
            why.contains("120") || why.to_lowercase().contains("application protocol"),
            "{what}: refused, but not for the version: {why}"
        ),
        other => panic!("{what}: a peer speaking only {offered} was heard: {other:?}"),
    };
    let answered = |outcome: Outcome, offered: &str| match outcome {
        Outcome::Answered(reply) => {
            let text = String::from_utf8_lossy(reply.get(4..).unwrap_or_default()).into_owned();
            assert!(text.contains("linearized"), "{what}: {text}");
        }
        other => panic!("{what}: a peer offering {offered} was not heard: {other:?}"),
    };

    // The version each side settles on, offered every one.
    let agreed = agreed_alpn(
        &[LATER, V2, V1],
        node,
        source,
        name,
        Some(member.duplicate()),
    )
    .await?;
    let expected = if reads_v2 { V2 } else { V1 };
    assert_eq!(
        agreed.as_deref(),
        Some(expected),
        "{what}: settled on {:?}",
        agreed.as_deref().map(String::from_utf8_lossy)
    );
    refused(offer(&[LATER]).await?, "edgelb-raft/3");
    answered(offer(&[LATER, V2, V1]).await?, "/3, /2 and /1");
    answered(offer(&[LATER, V1]).await?, "/3 and /1");
    if reads_v2 {
        answered(offer(&[V2]).await?, "edgelb-raft/2");
    } else {
        refused(offer(&[V2]).await?, "edgelb-raft/2");
    }
    if logs_refusal {
        // Only today's binary names the reason; format 1 counts it quietly.
        wait_until(
            &format!("{what}: a log line naming the refusal"),
            Duration::from_secs(5),
            || async {
                cluster
                    .stderr(1)
                    .contains("offered no cluster protocol version")
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_frame_version_is_refused_and_a_later_peer_settles_on_one_both_read()
-> anyhow::Result<()> {
    check(None, "today's binary", true, true).await?;
    if let Some(old) = old_binary()? {
        check(Some(old), "format 1", false, false).await?;
    }
    Ok(())
}
