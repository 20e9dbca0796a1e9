//! Upgrades from the last release of data-dir and cluster format 1
//! ([`FORMAT1_COMMIT`]), built from the repository's history
//! ([`integration::compat`]): a data dir it wrote starts on the current
//! binary with every group, instance and certificate (this file), and a
//! cluster of it upgrades one node at a time while it serves and takes
//! writes ([`rolling`]).
//!
//! Without that commit in the checkout (a shallow clone) the tests print
//! why and pass, unless `EDGELB_REQUIRE_OLD_BINARY=1` (CI).

mod in_place;
mod rolling;
mod versions;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use http::StatusCode;
use integration::client::HttpConn;
use integration::cluster::{attach, wait_serving};
use integration::compat::{FORMAT1_COMMIT, edgelb_at};
use integration::{AdminClient, Cluster, ClusterOptions, HttpBackend, poll, tls};
use serde_json::{Value, json};

/// An HTTP-mode port.
const WEB_PORT: u16 = 8080;
/// An HTTP-mode port shared by many small groups (routed by `Host`).
const SHARED_PORT: u16 = 8081;
/// A TCP-mode port.
const TCP_PORT: u16 = 8090;
/// A TLS + HTTP port.
const TLS_PORT: u16 = 8443;
/// Where backends listen.
const BACKEND_PORT: u16 = 9000;
/// The backends' names: instance addresses point at them in turn.
const BACKENDS: [&str; 3] = ["a", "b", "c"];
/// Small groups on [`SHARED_PORT`].
const SMALL_GROUPS: usize = 24;

/// The old binary, or `None` when the test is to be skipped.
fn old_binary() -> anyhow::Result<Option<PathBuf>> {
    edgelb_at(FORMAT1_COMMIT)
}

/// The default fqdn of group `name`.
fn host(name: &str) -> String {
    format!("{name}.edgelb.local")
}

/// What the admin API tells of every group, reduced to the fields of the
/// data model (SPEC §2), so that fields a later release adds to the answer
/// do not count as a difference: name → group.
async fn groups(admin: &AdminClient) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for g in admin.groups(false).await? {
        let mut instances: Vec<Value> = g["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| json!({"uuid": i["uuid"], "name": i["name"], "address": i["address"]}))
            .collect();
        instances.sort_by_key(|i| i["name"].as_str().map(ToOwned::to_owned));
        let name = g["name"].as_str().context("group without name")?.to_owned();
        let kept = json!({
            "uuid": g["uuid"],
            "name": g["name"],
            "domains": g["domains"],
            "services": g["services"],
            "hard_limit": g["hard_limit"],
            "created_at": g["created_at"],
            "persistent": g["persistent"],
            "instances": instances,
        });
        out.insert(name, kept);
    }
    Ok(out)
}

/// `data.certificates` of `GET /v1/certificates`.
async fn certificates(admin: &AdminClient) -> anyhow::Result<Value> {
    let (status, v) = admin.get("/v1/certificates").await?;
    ensure!(
        status == StatusCode::OK,
        "GET /v1/certificates: {status} {v}"
    );
    Ok(v["data"]["certificates"].clone())
}

/// Waits until node `id` answers `/readyz` with 200.
async fn wait_ready(cluster: &Cluster, id: u64) -> anyhow::Result<()> {
    let admin = cluster.admin(id);
    poll(
        &format!("node {id} to be ready"),
        Duration::from_secs(60),
        || async {
            let r = admin.request(http::Method::GET, "/readyz", None).await?;
            ensure!(
                r.status == StatusCode::OK,
                "/readyz: {} {}",
                r.status,
                r.text()
            );
            Ok(())
        },
    )
    .await
    .with_context(|| cluster.logs())
}

/// A self-signed certificate for `name`: PEM chain and key.
fn self_signed(name: &str) -> anyhow::Result<(String, String)> {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()])?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// What the old binary wrote, to be found again.
struct Written {
    groups: BTreeMap<String, Value>,
    certificates: Value,
    /// The DER of the certificate stored for `shop.example.test`.
    shop_der: Vec<u8>,
}

/// Writes groups of every kind through the old binary: HTTP, TCP, TLS with a
/// stored certificate and with a generated one, many small groups on a
/// shared port, a patched hard limit; attaches and detaches instances.
async fn write_everything(cluster: &Cluster, backends: &[HttpBackend]) -> anyhow::Result<Written> {
    let admin = cluster.admin(1);
    let ips: Vec<_> = backends.iter().map(|b| b.addr().ip()).collect();

    let (chain, key) = self_signed("shop.example.test")?;
    let (status, v) = admin
        .post(
            "/v1/certificates",
            &json!({"name": "shop", "chain": chain, "private_key": key}),
        )
        .await?;
    ensure!(status.is_success(), "storing a certificate: {status} {v}");
    let shop_der = first_certificate_der(&chain)?;

    let web = admin
        .create_group(&json!({
            "name": "web",
            "services": [{"port": WEB_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        }))
        .await?;
    for (n, ip) in ["web-1", "web-2", "web-3"].iter().zip(&ips) {
        attach(&admin, &web.uuid, n, *ip).await?;
    }
    // Attached and detached again: must stay gone.
    attach(&admin, &web.uuid, "gone", ips[0]).await?;
    let (status, v) = admin
        .delete(&format!("/v1/services/{}/instances/gone", web.uuid))
        .await?;
    ensure!(status.is_success(), "detaching: {status} {v}");
    let (status, v) = admin
        .patch(
            "/v1/services/web",
            &json!({"prop": "hard_limit", "op": "set", "value": 1000}),
        )
        .await?;
    ensure!(status.is_success(), "patching hard_limit: {status} {v}");

    let tcp = admin
        .create_group(&json!({
            "name": "tcp",
            "services": [{"port": TCP_PORT, "destination_port": BACKEND_PORT, "handlers": []}],
        }))
        .await?;
    attach(&admin, &tcp.uuid, "tcp-1", ips[1]).await?;

    let shop = admin
        .create_group(&json!({
            "name": "shop",
            "domains": [{"name": "shop.example.test", "certificate": {"name": "shop"}}],
            "services": [{"port": TLS_PORT, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]}],
        }))
        .await?;
    attach(&admin, &shop.uuid, "shop-1", ips[2]).await?;
    let generated = admin
        .create_group(&json!({
            "name": "generated",
            "domains": [{"name": "generated.example.test"}],
            "services": [{"port": TLS_PORT, "destination_port": BACKEND_PORT, "handlers": ["tls", "http"]}],
        }))
        .await?;
    attach(&admin, &generated.uuid, "generated-1", ips[0]).await?;

    for i in 0..SMALL_GROUPS {
        let g = admin
            .create_group(&json!({
                "name": format!("small-{i}"),
                "services": [{"port": SHARED_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
            }))
            .await?;
        attach(&admin, &g.uuid, &format!("small-{i}-a"), ips[i % 3]).await?;
    }
    Ok(Written {
        groups: groups(&admin).await?,
        certificates: certificates(&admin).await?,
        shop_der,
    })
}

/// The DER of the first certificate of a PEM chain.
fn first_certificate_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .context("no certificate in PEM")??;
    Ok(der.as_ref().to_vec())
}

/// Everything `written` holds is served by node 1: the same groups and
/// certificates through the admin API, and traffic on every kind of port.
async fn check_everything(cluster: &Cluster, written: &Written) -> anyhow::Result<()> {
    let admin = cluster.admin(1);
    let now = groups(&admin).await?;
    for (name, was) in &written.groups {
        let is = now
            .get(name)
            .with_context(|| format!("group {name} is missing after the upgrade"))?;
        ensure!(is == was, "group {name} changed:\nwas {was}\nnow {is}");
    }
    ensure!(
        certificates(&admin).await? == written.certificates,
        "certificates changed: {}",
        certificates(&admin).await?
    );

    wait_serving(cluster.data_addr(1, WEB_PORT), &host("web"), &BACKENDS).await?;
    let tcp = cluster.data_addr(1, TCP_PORT);
    let r = HttpConn::connect(tcp).await?.get("anything", "/").await?;
    ensure!(
        r.status == StatusCode::OK && r.backend() == Some(BACKENDS[1]),
        "TCP port answered {} from {:?}",
        r.status,
        r.backend()
    );
    for i in 0..SMALL_GROUPS {
        wait_serving(
            cluster.data_addr(1, SHARED_PORT),
            &host(&format!("small-{i}")),
            &[BACKENDS[i % 3]],
        )
        .await?;
    }
    let shop = tls::connect(cluster.data_addr(1, TLS_PORT), "shop.example.test", &[]).await?;
    ensure!(
        shop.cert == written.shop_der,
        "shop.example.test is not served with the stored certificate"
    );
    let r = HttpConn::over(shop.stream)
        .await?
        .get("shop.example.test", "/")
        .await?;
    ensure!(
        r.status == StatusCode::OK && r.backend() == Some(BACKENDS[2]),
        "shop answered {} from {:?}",
        r.status,
        r.backend()
    );
    let generated = tls::connect(
        cluster.data_addr(1, TLS_PORT),
        "generated.example.test",
        &[],
    )
    .await?;
    ensure!(
        generated.cert_names("generated.example.test"),
        "generated.example.test is served a certificate that does not name it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_written_by_format1_starts_on_the_current_binary() -> anyhow::Result<()> {
    let Some(old) = old_binary()? else {
        return Ok(());
    };
    let opts = ClusterOptions {
        binary: Some(old.clone()),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start_with(1, opts).await?;
    let backends = cluster.http_backends(&BACKENDS, BACKEND_PORT).await?;
    let written = write_everything(&cluster, &backends).await?;
    let before = cluster.status(1).await?;
    cluster.stop(1).await?;

    cluster.set_binary(1, None)?;
    cluster.restart(1).await?;
    wait_ready(&cluster, 1).await?;
    let after = cluster.status(1).await?;
    ensure!(
        after.node_id == before.node_id && after.leader_id == Some(1),
        "the upgraded node is not its cluster's leader: {after:?}"
    );
    check_everything(&cluster, &written).await?;

    // New writes on the migrated data dir, then one more restart.
    let admin = cluster.admin(1);
    let g = admin
        .create_group(&json!({
            "name": "after-upgrade",
            "services": [{"port": SHARED_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
        }))
        .await?;
    attach(&admin, &g.uuid, "after-1", backends[0].addr().ip()).await?;
    let (status, v) = admin.delete("/v1/services/web/instances/web-3").await?;
    ensure!(status.is_success(), "detaching web-3: {status} {v}");
    wait_serving(
        cluster.data_addr(1, SHARED_PORT),
        &host("after-upgrade"),
        &[BACKENDS[0]],
    )
    .await?;
    let written = Written {
        groups: groups(&admin).await?,
        ..written
    };
    cluster.stop(1).await?;

    // No way back on the same data dir: the format-1 binary refuses the
    // migrated one (it must never start on it as if it were empty).
    let back = cluster
        .run_stopped(1, &old, Duration::from_secs(30))
        .await?;
    ensure!(
        !back.status.success()
            && back
                .stderr
                .contains(&cluster.data_dir(1).display().to_string()),
        "the format-1 binary on a migrated data dir: {:?}\n{}",
        back.status,
        back.stderr
    );
    eprintln!("format 1 on a migrated data dir: {}", back.stderr.trim());

    cluster.restart(1).await?;
    wait_ready(&cluster, 1).await?;
    check_everything(&cluster, &written).await?;
    ensure!(
        !groups(&admin).await?["web"]["instances"]
            .as_array()
            .context("instances")?
            .iter()
            .any(|i| i["name"] == "web-3"),
        "a detached instance came back"
    );
    Ok(())
}
