//! The admin API over TLS: `edgectl --cacert` verifies the node's cluster
//! certificate (with the cluster CA) or an operator's certificate (with its
//! CA); a wrong CA, a missing `--cacert` and plain HTTP to a TLS port fail
//! with one clear line and their exit codes.

use std::net::IpAddr;
use std::path::Path;

use edgelb::config::AdminTls;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

use crate::support::{Node, Run, Subnet, TOKEN, TempDir, edgectl, edgectl_env};

/// Writes a new CA to `dir/ca.pem` and a server certificate for
/// `admin.example` and `ip` (when given) signed by it to `dir/admin.pem`,
/// `dir/admin.key`.
fn operator_pki(dir: &Path, ip: Option<IpAddr>) -> anyhow::Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["admin.example".to_owned()])?;
    leaf.subject_alt_names.extend(ip.map(SanType::IpAddress));
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("admin.pem"), cert.pem())?;
    std::fs::write(dir.join("admin.key"), key.serialize_pem())?;
    Ok(())
}

/// `edgectl --api api --cacert cacert --token TOKEN service ls`.
async fn ls_over_tls(api: &str, cacert: &str) -> anyhow::Result<Run> {
    edgectl(&[
        "--api", api, "--cacert", cacert, "--token", TOKEN, "service", "ls",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgectl_verifies_the_node_certificate_with_the_cluster_ca() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start_with(net.ip(1), |c| c.admin_tls = Some(AdminTls::Node)).await?;
    let api = node.https_url();
    let ca = node.data_dir().join("tls/ca.pem");
    let ca = ca.to_string_lossy();

    let run = edgectl(&[
        "--api", &api, "--cacert", &ca, "--token", TOKEN, "cluster", "status",
    ])
    .await?
    .ok()?;
    assert!(run.stdout.contains("leader"), "{}", run.stdout);
    // The environment variable works as the flag does.
    edgectl_env(
        &["--api", &api, "--token", TOKEN, "service", "ls"],
        &[("EDGELB_CACERT", &ca)],
    )
    .await?
    .ok()?;

    // /metrics over TLS, with the expiry of the node certificate in use.
    let client = ops::client::Client::new(ops::client::ApiUrl::parse(&api)?, None).with_tls(
        ops::tls::client_config(Path::new(ca.as_ref()))?,
        ca.as_ref().into(),
    );
    let metrics = client.request(http::Method::GET, "/metrics", None).await?;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    let expiry: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("edgelb_node_cert_expiration_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no expiry series in:\n{text}"))?;
    let left = expiry - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (89 * 86_400..=90 * 86_400).contains(&left),
        "the node certificate expires in {left} s"
    );
    // The admin API serves that same certificate.
    assert!(
        text.contains(&format!(
            "edgelb_admin_cert_expiration_timestamp_seconds {expiry}\n"
        )),
        "{text}"
    );

    // Another cluster's CA: exit 3, naming the file.
    let other = TempDir::new("other-ca");
    let other_s = other.path().to_string_lossy().into_owned();
    edgectl(&["certs", "init", "--out", &other_s]).await?.ok()?;
    let wrong = other.path().join("ca.pem");
    let wrong = wrong.to_string_lossy();
    let line = ls_over_tls(&api, &wrong)
        .await?
        .fails(3, "is not signed by the CA in --cacert");
    assert!(line.contains(wrong.as_ref()), "{line}");
    assert!(line.contains(&api), "{line}");

    // https without --cacert, and --cacert with http: usage errors.
    edgectl(&["--api", &api, "--token", TOKEN, "service", "ls"])
        .await?
        .fails(2, "--cacert");
    ls_over_tls(&node.url, &ca)
        .await?
        .fails(2, "needs an https:// --api URL");
    // Plain HTTP to the TLS port: no answer, and a hint.
    edgectl(&["--api", &node.url, "--token", TOKEN, "service", "ls"])
        .await?
        .fails(3, "use https:// and --cacert");

    // A node joins through the TLS admin API, verified with the cluster CA.
    let ca_pem = std::fs::read(node.data_dir().join("tls/ca.pem"))?;
    let join_tls = edgelb::admin::client_config(&ca_pem)?;
    let joiner = Node::start_with(net.ip(2), |c| {
        c.node_id = 2;
        c.join = Some(api.clone());
        c.join_tls = Some(join_tls);
        c.admin_tls = Some(AdminTls::Node);
    })
    .await?;
    let status = edgectl(&[
        "--api",
        &joiner.https_url(),
        "--cacert",
        &ca,
        "--token",
        TOKEN,
        "cluster",
        "status",
        "-o",
        "json",
    ])
    .await?
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&status.stdout)?;
    assert_eq!(
        v["cluster"]["nodes"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    joiner.stop().await;
    node.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgectl_verifies_an_operator_certificate_by_address() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let ip = net.ip(1);
    let pki = TempDir::new("operator-pki");
    operator_pki(pki.path(), Some(ip))?;
    let (cert, key) = (pki.path().join("admin.pem"), pki.path().join("admin.key"));
    let node = Node::start_with(ip, |c| {
        c.admin_tls = Some(AdminTls::Files { cert, key });
    })
    .await?;
    let api = node.https_url();
    let ca = pki.path().join("ca.pem");
    ls_over_tls(&api, &ca.to_string_lossy()).await?.ok()?;
    // The cluster CA did not sign the operator's certificate.
    let cluster_ca = node.data_dir().join("tls/ca.pem");
    ls_over_tls(&api, &cluster_ca.to_string_lossy())
        .await?
        .fails(3, "is not signed by the CA in --cacert");
    node.stop().await;

    // A certificate for another name: refused by address.
    let other = TempDir::new("operator-pki-name");
    operator_pki(other.path(), None)?;
    let (cert, key) = (
        other.path().join("admin.pem"),
        other.path().join("admin.key"),
    );
    let named = Node::start_with(net.ip(2), |c| {
        c.admin_tls = Some(AdminTls::Files { cert, key });
    })
    .await?;
    let other_ca = other.path().join("ca.pem");
    let other_ca = other_ca.to_string_lossy();
    ls_over_tls(&named.https_url(), &other_ca)
        .await?
        .fails(3, "names neither");
    named.stop().await;

    // A key that is not the certificate's: a config error, found before
    // any port is bound (with its admin address taken, the error is still
    // the config's).
    let taken = std::net::TcpListener::bind((net.ip(4), 0))?;
    let (cert, key) = (pki.path().join("admin.pem"), other.path().join("admin.key"));
    Node::refused(
        net.ip(4),
        &taken,
        |c| c.admin_tls = Some(AdminTls::Files { cert, key }),
        &["admin_tls_key: ", "not the key of"],
    )
    .await;

    // https to a node that speaks plain HTTP.
    let plain = Node::start_with(net.ip(3), |_| {}).await?;
    ls_over_tls(&plain.https_url(), &other_ca)
        .await?
        .fails(3, "does the admin API serve TLS?");
    plain.stop().await;
    Ok(())
}
