//! `/v1/services`: create, read, patch, delete.

use http::Method;
use serde_json::{Value, json};

use super::{Server, TOKEN, http_service};

#[tokio::test]
async fn create_with_and_without_a_name() {
    let s = Server::start().await;
    let data = s
        .send(
            Method::POST,
            "/v1/services",
            &json!({"services": http_service()}),
        )
        .await
        .data();
    let g = &data["service_groups"][0];
    let name = g["name"].as_str().expect("name");
    let parts: Vec<&str> = name.split('-').collect();
    assert_eq!(parts.len(), 3, "{name}");
    assert!(
        parts[..2]
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())),
        "{name}"
    );
    assert!(
        parts[2].len() == 8
            && parts[2]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{name}"
    );
    assert_eq!(
        g["domains"],
        json!([{"fqdn": format!("{name}.edgelb.local")}])
    );
    assert_eq!(g["hard_limit"], 65535);
    assert_eq!(g["persistent"], true);
    assert_eq!(g["instances"], json!([]));
    let uuid = uuid::Uuid::parse_str(g["uuid"].as_str().expect("uuid")).expect("uuid parses");
    assert_eq!(uuid.get_version_num(), 4);
    let created = g["created_at"].as_str().expect("created_at");
    time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
        .expect("created_at is RFC 3339");

    let body = json!({
        "name": "web",
        "services": http_service(),
        "domains": [{"name": "Web.Example.COM"}, {"name": "*.apps.example.com"}],
        "hard_limit": 10,
    });
    let g = s.send(Method::POST, "/v1/services", &body).await.data()["service_groups"][0].clone();
    assert_eq!(g["name"], "web");
    assert_eq!(
        g["domains"],
        json!([{"fqdn": "web.example.com"}, {"fqdn": "*.apps.example.com"}])
    );
    assert_eq!(g["hard_limit"], 10);
    assert_eq!(
        s.get("/v1/services").await.data()["service_groups"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_input_is_400() {
    let s = Server::start().await;
    let post = |body: String| s.request(Method::POST, "/v1/services", Some(TOKEN), Some(body));
    let m = post("{".into()).await.assert_error(400);
    assert!(m.contains("invalid JSON"), "{m}");
    let m = post(json!({"services": http_service(), "bogus": 1}).to_string())
        .await
        .assert_error(400);
    assert!(m.contains("unknown field `bogus`"), "{m}");
    post(json!({"name": "Web", "services": http_service()}).to_string())
        .await
        .assert_error(400);
    post(
        json!({"name": "web", "services": http_service(), "domains": [{"name": "bad_host"}]})
            .to_string(),
    )
    .await
    .assert_error(400);
    post(json!({"name": "web", "services": []}).to_string())
        .await
        .assert_error(400);
    post(
        json!({"name": "web", "services": [{"port": 0, "destination_port": 80, "handlers": []}]})
            .to_string(),
    )
    .await
    .assert_error(400);
    post(json!({"name": "web", "services": [{"port": 80, "destination_port": 80, "handlers": ["gzip"]}]}).to_string())
        .await
        .assert_error(400);
    post(String::new()).await.assert_error(400);
    s.create("web").await;
    // A name that reads as a uuid would be taken for one: the group whose
    // uuid it is (DELETE would remove that one) or none. Either spelling.
    let uuid_like = "e283c24c-22bd-4f94-8b29-a707e1e66ec2";
    for name in [uuid_like.to_owned(), uuid_like.replace('-', "")] {
        let m = post(json!({"name": name, "services": http_service()}).to_string())
            .await
            .assert_error(400);
        assert!(m.contains("reads as a uuid"), "{m}");
        s.send(
            Method::POST,
            "/v1/services/web/instances",
            &json!({"name": name, "address": "10.0.0.1"}),
        )
        .await
        .assert_error(400);
    }
    s.send(
        Method::POST,
        "/v1/services/web/instances",
        &json!({"address": "10.0.0.1:80"}),
    )
    .await
    .assert_error(400);
    s.send(
        Method::POST,
        "/v1/services/web/instances",
        &json!({"name": "-x", "address": "10.0.0.1"}),
    )
    .await
    .assert_error(400);
    s.send(
        Method::PATCH,
        "/v1/services/web",
        &json!({"prop": "color", "op": "set", "value": 1}),
    )
    .await
    .assert_error(400);
    s.send(
        Method::PATCH,
        "/v1/services/web",
        &json!({"prop": "hard_limit", "op": "set", "value": 0}),
    )
    .await
    .assert_error(400);
    assert_eq!(
        s.get("/v1/services").await.data()["service_groups"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    s.stop().await;
}

#[tokio::test]
async fn duplicate_names_conflict() {
    let s = Server::start().await;
    s.create("web").await;
    let body = json!({"name": "web", "services": http_service()});
    s.send(Method::POST, "/v1/services", &body)
        .await
        .assert_error(409);
    s.attach("web", "a", "10.0.0.1").await;
    s.send(
        Method::POST,
        "/v1/services/web/instances",
        &json!({"name": "a", "address": "10.0.0.2"}),
    )
    .await
    .assert_error(409);
    s.stop().await;
}

#[tokio::test]
async fn get_by_uuid_and_by_name() {
    let s = Server::start().await;
    let g = s.create("web").await;
    let uuid = g["uuid"].as_str().expect("uuid");
    let by_uuid = s.get(&format!("/v1/services/{uuid}")).await.data();
    let by_name = s.get("/v1/services/web?consistent=true").await.data();
    assert_eq!(by_uuid, by_name);
    assert_eq!(by_uuid["service_groups"][0], g);
    s.get("/v1/services/nope").await.assert_error(404);
    s.get(&format!("/v1/services/{}", uuid::Uuid::new_v4()))
        .await
        .assert_error(404);
    s.stop().await;
}

#[tokio::test]
async fn patch_hard_limit_and_services() {
    let s = Server::start().await;
    s.create("web").await;
    let g = s
        .send(
            Method::PATCH,
            "/v1/services/web",
            &json!({"prop": "hard_limit", "op": "set", "value": 7}),
        )
        .await
        .data()["service_groups"][0]
        .clone();
    assert_eq!(g["hard_limit"], 7);
    let add = json!({"prop": "services", "op": "add", "value": [{"port": 9000, "destination_port": 9000, "handlers": []}]});
    let g =
        s.send(Method::PATCH, "/v1/services/web", &add).await.data()["service_groups"][0].clone();
    let ports: Vec<&Value> = g["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| &s["port"])
        .collect();
    assert_eq!(ports, [&json!(8080), &json!(9000)]);
    s.send(Method::PATCH, "/v1/services/web", &add)
        .await
        .assert_error(400);
    let del = json!({"prop": "services", "op": "del", "value": [8080]});
    let g =
        s.send(Method::PATCH, "/v1/services/web", &del).await.data()["service_groups"][0].clone();
    assert_eq!(
        g["services"],
        json!([{"port": 9000, "destination_port": 9000, "handlers": []}])
    );
    let domains = json!({"prop": "domains", "op": "add", "value": ["Shop.Example.com"]});
    let g = s
        .send(Method::PATCH, "/v1/services/web", &domains)
        .await
        .data()["service_groups"][0]
        .clone();
    assert_eq!(g["domains"][1], json!({"fqdn": "shop.example.com"}));
    s.send(
        Method::PATCH,
        "/v1/services/nope",
        &json!({"prop": "hard_limit", "op": "set", "value": 7}),
    )
    .await
    .assert_error(404);
    assert_eq!(
        s.get("/v1/services/web").await.data()["service_groups"][0],
        g
    );
    s.stop().await;
}

#[tokio::test]
async fn delete_needs_force_while_instances_are_attached() {
    let s = Server::start().await;
    let g = s.create("web").await;
    s.attach("web", "a", "10.0.0.1").await;
    s.delete("/v1/services/web").await.assert_error(409);
    s.delete("/v1/services/web?force=false")
        .await
        .assert_error(409);
    let data = s.delete("/v1/services/web?force=true").await.data();
    let removed = &data["service_groups"][0];
    assert_eq!(removed["uuid"], g["uuid"]);
    assert_eq!(removed["instances"][0]["name"], "a");
    s.get("/v1/services/web").await.assert_error(404);
    s.delete("/v1/services/web").await.assert_error(404);

    let g = s.create("api").await;
    let data = s
        .delete(&format!(
            "/v1/services/{}",
            g["uuid"].as_str().expect("uuid")
        ))
        .await
        .data();
    assert_eq!(data["service_groups"][0]["name"], "api");
    s.stop().await;
}
