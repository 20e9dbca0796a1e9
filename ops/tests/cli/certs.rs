//! `certs init` and `certs node` make PEMs the node accepts: an own-PKI
//! cluster of two in-process nodes runs on them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgelb::config::Config;
use serde_json::Value;

use crate::support::{Node, Subnet, TOKEN, TempDir, edgectl, poll};

/// The DNS names a PEM certificate carries.
fn dns_names(pem: &str) -> anyhow::Result<Vec<String>> {
    let params = rcgen::CertificateParams::from_ca_cert_pem(pem)?;
    Ok(params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            rcgen::SanType::DnsName(n) => n.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect())
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_make_a_working_own_pki_cluster() -> anyhow::Result<()> {
    let dir = TempDir::new("pki");
    let pki = dir.path().join("pki");
    let pki_s = pki.to_string_lossy().into_owned();
    let run = edgectl(&["certs", "init", "--out", &pki_s]).await?.ok()?;
    assert!(run.stdout.contains("ca.pem"), "{}", run.stdout);
    assert!(
        std::fs::read_to_string(pki.join("ca.pem"))?.starts_with("-----BEGIN CERTIFICATE-----")
    );
    #[cfg(unix)]
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    // Never overwritten by accident.
    edgectl(&["certs", "init", "--out", &pki_s])
        .await?
        .fails(4, "already exists");

    for id in ["1", "3"] {
        let run = edgectl(&["certs", "node", id, "--ca", &pki_s, "--out", &pki_s])
            .await?
            .ok()?;
        assert!(
            run.stdout
                .contains(&format!("--node-cert {pki_s}/node-{id}.pem")),
            "{}",
            run.stdout
        );
    }
    let cert3 = std::fs::read_to_string(pki.join("node-3.pem"))?;
    assert_eq!(dns_names(&cert3)?, ["node-3.cluster.edgelb"]);
    #[cfg(unix)]
    assert_eq!(mode(&pki.join("node-3.key")), 0o600);
    edgectl(&["certs", "node", "3", "--ca", &pki_s, "--out", &pki_s])
        .await?
        .fails(4, "node-3.pem already exists");
    edgectl(&[
        "certs", "node", "3", "--ca", &pki_s, "--out", &pki_s, "--force",
    ])
    .await?
    .ok()?;
    let missing = dir.path().join("nope").to_string_lossy().into_owned();
    edgectl(&["certs", "node", "2", "--ca", &missing])
        .await?
        .fails(4, "edgectl certs init");
    assert_eq!(edgectl(&["certs", "node", "0"]).await?.code, 2);

    // A certificate for another node id is refused at start, before any
    // port is bound: with its admin address taken, the error is still the
    // config's, not the bind's.
    let net = Subnet::allocate();
    let taken = std::net::TcpListener::bind((net.ip(4), 0))?;
    // A config error (exit 64) that names the field.
    Node::refused(
        net.ip(4),
        &taken,
        |c| {
            Pki::issued(&pki, &pki, 3).apply(c);
            c.node_id = 4;
        },
        &[
            "node_cert: ",
            "is the certificate of node 3, not of node_id 4",
        ],
    )
    .await;
    // Node 3's certificate with node 1's key: a config error naming
    // node_key, before any port is bound.
    Node::refused(
        net.ip(4),
        &taken,
        |c| {
            Pki::issued(&pki, &pki, 3).apply(c);
            c.node_key = Some(pki.join("node-1.key"));
            c.node_id = 3;
        },
        &["node_key: ", "not the key of"],
    )
    .await;

    // Nodes 1 and 3 form a cluster on these certificates.
    let (node1, node3) =
        two_nodes(&net, Pki::issued(&pki, &pki, 1), Pki::issued(&pki, &pki, 3)).await?;
    node3.stop().await;
    node1.stop().await;
    Ok(())
}

/// A node's own-PKI files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    /// Node `id`'s files as `edgectl certs node` wrote them to `dir`, with
    /// the CA certificate `ca_dir/ca.pem`.
    fn issued(ca_dir: &Path, dir: &Path, id: u64) -> Self {
        Self {
            ca: ca_dir.join("ca.pem"),
            cert: dir.join(format!("node-{id}.pem")),
            key: dir.join(format!("node-{id}.key")),
        }
    }

    fn apply(&self, c: &mut Config) {
        c.ca_cert = Some(self.ca.clone());
        c.node_cert = Some(self.cert.clone());
        c.node_key = Some(self.key.clone());
    }
}

/// Node 1 founds a cluster with `pki1`; node 3 is added by hand (own PKI:
/// members cannot sign certificates) and started with `pki3`. Returns once
/// a group created on node 1 is served by node 3, which proves that the
/// two authenticated each other over mutual TLS.
async fn two_nodes(net: &Subnet, pki1: Pki, pki3: Pki) -> anyhow::Result<(Node, Node)> {
    let node1 = Node::start_with(net.ip(1), |c| pki1.apply(c)).await?;
    let ip3 = net.ip(3);
    let (admin3, cluster3) = (format!("{ip3}:7070"), format!("{ip3}:7071"));
    edgectl(&[
        "--api",
        &node1.url,
        "--token",
        TOKEN,
        "cluster",
        "add-node",
        "--node-id",
        "3",
        "--cluster-addr",
        &cluster3,
        "--admin-addr",
        &admin3,
    ])
    .await?
    .ok()?;
    let join = node1.url.clone();
    let node3 = Node::start_with(ip3, |c| {
        pki3.apply(c);
        c.node_id = 3;
        c.admin_addr = admin3.parse().expect("an address");
        c.cluster_addr = cluster3.parse().expect("an address");
        c.join = Some(join);
    })
    .await?;
    edgectl(&[
        "--api",
        &node1.url,
        "--token",
        TOKEN,
        "service",
        "create",
        "-n",
        "pki",
        "7400/http",
    ])
    .await?
    .ok()?;
    poll(
        "node 3 to replicate the group",
        Duration::from_secs(30),
        || async {
            let run = edgectl(&[
                "--api", &node3.url, "--token", TOKEN, "service", "get", "pki", "-o", "json",
            ])
            .await?;
            anyhow::ensure!(run.code == 0, "{run:?}");
            Ok(())
        },
    )
    .await?;
    let status = edgectl(&[
        "--api", &node3.url, "--token", TOKEN, "cluster", "status", "-o", "json",
    ])
    .await?
    .ok()?;
    let v: Value = serde_json::from_str(&status.stdout)?;
    assert_eq!(v["cluster"]["leader_id"], 1, "{v}");
    assert_eq!(
        v["cluster"]["nodes"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    Ok((node1, node3))
}

/// A CA rollover for operators with their own PKI: while every node trusts
/// a bundle of the old and the new CA, nodes with certificates from either
/// work together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_bundle_lets_old_and_new_certificates_meet() -> anyhow::Result<()> {
    let dir = TempDir::new("rollover");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    for (ca, id) in [(&old, "1"), (&new, "3")] {
        let ca = ca.to_string_lossy().into_owned();
        edgectl(&["certs", "init", "--out", &ca]).await?.ok()?;
        edgectl(&["certs", "node", id, "--ca", &ca, "--out", &ca])
            .await?
            .ok()?;
    }
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        std::fs::read_to_string(old.join("ca.pem"))?
            + &std::fs::read_to_string(new.join("ca.pem"))?,
    )?;
    let with_bundle = |pki: Pki| Pki {
        ca: bundle.clone(),
        ..pki
    };
    let net = Subnet::allocate();
    let (node1, node3) = two_nodes(
        &net,
        with_bundle(Pki::issued(&old, &old, 1)),
        with_bundle(Pki::issued(&new, &new, 3)),
    )
    .await?;
    node3.stop().await;
    node1.stop().await;
    Ok(())
}
