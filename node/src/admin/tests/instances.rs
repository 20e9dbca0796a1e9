//! Instances and certificates.

use std::time::Instant;

use http::Method;
use serde_json::json;

use super::Server;
use crate::balancer::Pick;
use crate::cluster::GossipHandler;

#[tokio::test]
async fn attach_and_detach() {
    let s = Server::start().await;
    s.create("web").await;
    let data = s
        .send(
            Method::POST,
            "/v1/services/web/instances",
            &json!({"address": "backend.internal"}),
        )
        .await
        .data();
    let generated = data["instances"][0].clone();
    let name = generated["name"].as_str().expect("name");
    let suffix = name.strip_prefix("web-").expect("named after the group");
    assert!(
        suffix.len() == 5
            && suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{name}"
    );
    assert_eq!(generated["address"], "backend.internal");
    assert_eq!(generated["state"], "up");
    let uuid =
        uuid::Uuid::parse_str(generated["uuid"].as_str().expect("uuid")).expect("uuid parses");
    assert_eq!(uuid.get_version_num(), 4);

    let b = s.attach("web", "b", "10.0.0.2").await;
    assert_eq!(b["name"], "b");
    let g = s.get("/v1/services/web").await.data()["service_groups"][0].clone();
    assert_eq!(g["instances"].as_array().map(Vec::len), Some(2));

    let data = s.delete("/v1/services/web/instances/b").await.data();
    assert_eq!(data["instances"][0]["uuid"], b["uuid"]);
    assert_eq!(data["instances"][0]["state"], "draining");
    let data = s
        .delete(&format!("/v1/services/web/instances/{uuid}"))
        .await
        .data();
    assert_eq!(data["instances"][0]["name"], name);
    s.delete("/v1/services/web/instances/b")
        .await
        .assert_error(404);
    s.delete("/v1/services/nope/instances/b")
        .await
        .assert_error(404);
    s.send(
        Method::POST,
        "/v1/services/nope/instances",
        &json!({"address": "10.0.0.1"}),
    )
    .await
    .assert_error(404);
    let g = s.get("/v1/services/web").await.data()["service_groups"][0].clone();
    assert_eq!(g["instances"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn instances_show_state_and_load() {
    let s = Server::start().await;
    let g = s.create("web").await;
    let a = s.attach("web", "a", "10.0.0.1").await;
    s.attach("web", "b", "10.0.0.2").await;
    // Not in the data plane yet: up, no load.
    let data = s.get("/v1/services/web/instances").await.data();
    assert_eq!(
        data["instances"][0]["load"],
        json!({"local": 0, "global": 0, "peers": {}})
    );
    assert_eq!(data["instances"][0]["state"], "up");

    s.rebuild();
    let table = s.admin.dataplane.routes.load_full();
    let uuid = uuid::Uuid::parse_str(g["uuid"].as_str().expect("uuid")).expect("uuid");
    let runtime = table.group(&uuid).expect("runtime").clone();
    let a_uuid = uuid::Uuid::parse_str(a["uuid"].as_str().expect("uuid")).expect("uuid");
    let backend_a = runtime.backends.get(&a_uuid).expect("backend a").clone();
    let backend_b = runtime
        .backends
        .values()
        .find(|b| b.uuid != a_uuid)
        .expect("backend b")
        .clone();
    // Peer 7, a member, reports 5 in flight on b.
    let peer = crate::gossip::Peer {
        addr: "127.0.0.1:1".into(),
        region: String::new(),
    };
    s.admin.gossip.set_peers(&[(7, peer)].into_iter().collect());
    let report = ::gossip::Report {
        node_id: 7,
        incarnation: 1,
        seq: 1,
        sent_at_ms: 0,
        entries: vec![::gossip::Entry {
            instance: backend_b.uuid.into_bytes(),
            inflight: 5,
            ..::gossip::Entry::default()
        }],
    };
    s.admin
        .gossip
        .report(::gossip::Wire::Full(report), 70, Instant::now().into());
    assert!(s.admin.gossip.refresh(Instant::now()));
    // b carries the peers' 5, so the picks go to a.
    let leases: Vec<Pick> = (0..2)
        .map(|_| runtime.balancer.pick(Instant::now(), &mut rand::rng()))
        .collect();
    runtime.balancer.mark_down(&backend_b, Instant::now());

    let data = s
        .get("/v1/services/web/instances?consistent=true")
        .await
        .data();
    let view = |name: &str| {
        data["instances"]
            .as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} listed: {data}"))
    };
    assert_eq!(view("a")["state"], "up");
    // Every fresh peer is listed, with its part of each instance.
    assert_eq!(
        view("a")["load"],
        json!({"local": 2, "global": 2, "peers": {"7": 0}})
    );
    assert_eq!(view("a")["address"], "10.0.0.1");
    assert_eq!(view("b")["state"], "down");
    assert_eq!(
        view("b")["load"],
        json!({"local": 0, "global": 5, "peers": {"7": 5}})
    );
    assert_eq!(runtime.balancer.load(&backend_b), 5);
    assert_eq!(backend_a.local_inflight(), 2);
    drop(leases);
    s.get("/v1/services/nope/instances").await.assert_error(404);
    s.stop().await;
}

fn self_signed(name: &str) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

#[tokio::test]
async fn certificates_are_checked_and_keys_never_shown() {
    let s = Server::start().await;
    let (chain, key) = self_signed("shop.example.com");
    let body = json!({"name": "shop", "chain": chain, "private_key": key});
    let data = s.send(Method::POST, "/v1/certificates", &body).await.data();
    assert_eq!(data["certificates"][0]["name"], "shop");
    let not_after = data["certificates"][0]["not_after"]
        .as_str()
        .expect("not_after")
        .to_owned();
    time::OffsetDateTime::parse(&not_after, &time::format_description::well_known::Rfc3339)
        .expect("not_after is RFC 3339");

    let list = s.get("/v1/certificates").await;
    assert_eq!(
        list.data(),
        json!({"certificates": [{"name": "shop", "not_after": not_after}]})
    );
    assert!(
        !list.body.contains("PRIVATE KEY") && !list.body.contains("BEGIN"),
        "{}",
        list.body
    );

    // A domain may now name it.
    let create = json!({"name": "shop", "services": [{"port": 443, "destination_port": 80, "handlers": ["tls", "http"]}],
        "domains": [{"name": "shop.example.com", "certificate": {"name": "shop"}}]});
    let g = s.send(Method::POST, "/v1/services", &create).await.data()["service_groups"][0].clone();
    assert_eq!(
        g["domains"],
        json!([{"fqdn": "shop.example.com", "certificate": "shop"}])
    );
    assert!(
        !s.get("/v1/services/shop")
            .await
            .body
            .contains("PRIVATE KEY")
    );

    let (_, other_key) = self_signed("other.example.com");
    let mismatched = json!({"name": "bad", "chain": chain, "private_key": other_key});
    let m = s
        .send(Method::POST, "/v1/certificates", &mismatched)
        .await
        .assert_error(400);
    assert!(m.contains("private key"), "{m}");
    let garbage = json!({"name": "bad", "chain": "not a pem", "private_key": key});
    s.send(Method::POST, "/v1/certificates", &garbage)
        .await
        .assert_error(400);
    let bad_name = json!({"name": "Bad Name", "chain": chain, "private_key": key});
    s.send(Method::POST, "/v1/certificates", &bad_name)
        .await
        .assert_error(400);
    assert_eq!(
        s.get("/v1/certificates").await.data()["certificates"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    s.stop().await;
}
