use serde_json::json;

use super::*;
use crate::model::Handler::*;

fn req(prop: &str, op: PatchOp, value: serde_json::Value) -> PatchRequest {
    PatchRequest {
        prop: prop.into(),
        op,
        value: Some(value),
    }
}

fn invalid_message(r: Result<PatchValue, ApplyError>) -> String {
    match r {
        Err(ApplyError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn create_request_parses_and_refuses_unknown_fields() {
    let body = json!({
        "services": [{"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]}],
        "domains": [{"name": "Web.Example.com", "certificate": {"name": "web-cert"}}]
    });
    let parsed: CreateGroupRequest = serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.name, None);
    assert_eq!(parsed.hard_limit, None);
    let domains = parsed.domains.unwrap_or_default();
    assert_eq!(
        domains[0].to_domain(),
        Domain {
            fqdn: "web.example.com".into(),
            certificate: Some("web-cert".into())
        }
    );
    let typo = json!({"services": [], "hardlimit": 5});
    assert!(serde_json::from_value::<CreateGroupRequest>(typo).is_err());
    let bad_domain = json!({"services": [], "domains": [{"fqdn": "a.com"}]});
    assert!(serde_json::from_value::<CreateGroupRequest>(bad_domain).is_err());
    assert!(serde_json::from_value::<AttachRequest>(json!({"address": "h", "port": 1})).is_err());
    assert!(
        serde_json::from_value::<CertificateRequest>(json!({"name": "a", "chain": ""})).is_err()
    );
}

#[test]
fn instance_and_certificate_views() {
    let view = InstanceView {
        uuid: Uuid::from_u128(1),
        name: "a".into(),
        address: "10.0.0.1".into(),
        state: InstanceState::Draining,
        load: LoadView {
            local: 1,
            global: 3,
            peers: BTreeMap::from([("n2".to_owned(), 2)]),
        },
    };
    let json = serde_json::to_value(InstancesData {
        instances: vec![view.clone()],
    })
    .ok();
    assert_eq!(
        json.clone(),
        Some(json!({"instances": [{
            "uuid": "00000000-0000-0000-0000-000000000001",
            "name": "a",
            "address": "10.0.0.1",
            "state": "draining",
            "load": {"local": 1, "global": 3, "peers": {"n2": 2}}
        }]}))
    );
    let back: Option<InstancesData> = json.and_then(|j| serde_json::from_value(j).ok());
    assert_eq!(back.map(|d| d.instances), Some(vec![view]));
    let certs = CertificatesData {
        certificates: vec![
            CertificateInfo {
                name: "a".into(),
                not_after: None,
            },
            CertificateInfo {
                name: "b".into(),
                not_after: Some("2030-01-01T00:00:00Z".into()),
            },
        ],
    };
    assert_eq!(
        serde_json::to_value(&certs).ok(),
        Some(
            json!({"certificates": [{"name": "a"}, {"name": "b", "not_after": "2030-01-01T00:00:00Z"}]})
        )
    );
}

#[test]
fn patch_services() {
    let value = json!([{"port": 8443, "destination_port": 8080, "handlers": ["http", "tls"]}]);
    assert_eq!(
        resolve_patch(req("services", PatchOp::Add, value)),
        Ok(PatchValue::Services(
            PatchOp::Add,
            vec![Service {
                port: 8443,
                destination_port: 8080,
                handlers: vec![Http, Tls]
            }]
        ))
    );
    let del = resolve_patch(req("services", PatchOp::Del, json!([443, {"port": 80}])));
    let Ok(PatchValue::Services(PatchOp::Del, gone)) = del else {
        panic!("{del:?}");
    };
    assert_eq!(gone.iter().map(|s| s.port).collect::<Vec<_>>(), [443, 80]);
    let msg = invalid_message(resolve_patch(req(
        "services",
        PatchOp::Set,
        json!([{"port": 1}]),
    )));
    assert!(
        msg.starts_with(
            "value for services must be a list of {port, destination_port, handlers} objects ("
        ),
        "{msg}"
    );
    let msg = invalid_message(resolve_patch(req("services", PatchOp::Add, json!(443))));
    assert!(msg.contains("services"), "{msg}");
    let msg = invalid_message(resolve_patch(req(
        "services",
        PatchOp::Set,
        json!([{"port": 1, "destination_port": 1, "handlers": ["ftp"]}]),
    )));
    assert!(msg.contains("ftp"), "{msg}");
}

#[test]
fn patch_domains() {
    let value = json!([{"name": "A.com", "certificate": {"name": "c"}}, "b.com"]);
    let Ok(PatchValue::Domains(PatchOp::Set, domains)) =
        resolve_patch(req("domains", PatchOp::Set, value))
    else {
        panic!("domains did not parse");
    };
    let stored: Vec<Domain> = domains.iter().map(DomainRequest::to_domain).collect();
    assert_eq!(
        stored,
        [
            Domain {
                fqdn: "a.com".into(),
                certificate: Some("c".into())
            },
            Domain {
                fqdn: "b.com".into(),
                certificate: None
            }
        ]
    );
    assert!(
        invalid_message(resolve_patch(req(
            "domains",
            PatchOp::Add,
            json!({"name": "a"})
        )))
        .contains("domains")
    );
    assert!(matches!(
        resolve_patch(req("domains", PatchOp::Add, json!([{"fqdn": "a"}]))),
        Err(ApplyError::Invalid(_))
    ));
}

#[test]
fn patch_hard_limit() {
    assert_eq!(
        resolve_patch(req("hard_limit", PatchOp::Set, json!(10))),
        Ok(PatchValue::HardLimit(10))
    );
    assert_eq!(
        invalid_message(resolve_patch(req("hard_limit", PatchOp::Add, json!(10)))),
        "hard_limit only supports op \"set\""
    );
    for bad in [json!(-1), json!("10"), json!(4_294_967_296u64), json!(1.5)] {
        assert!(
            invalid_message(resolve_patch(req("hard_limit", PatchOp::Set, bad)))
                .starts_with("value for hard_limit")
        );
    }
}

#[test]
fn patch_unknown_prop() {
    assert_eq!(
        invalid_message(resolve_patch(req("name", PatchOp::Set, json!("x")))),
        "unknown prop \"name\"; expected services, domains, hard_limit, health_check or send_proxy_protocol"
    );
}

#[test]
fn patch_health_check_and_send_proxy_protocol() {
    let set = resolve_patch(req(
        "health_check",
        PatchOp::Set,
        json!({"type": "http", "path": "/h", "rise": 5}),
    ));
    let Ok(PatchValue::HealthCheck(Some(c))) = set else {
        panic!("{set:?}");
    };
    assert_eq!((c.path.as_deref(), c.rise, c.fall), (Some("/h"), 5, 3));
    assert!(matches!(
        resolve_patch(req("health_check", PatchOp::Set, json!(null))),
        Ok(PatchValue::HealthCheck(None))
    ));
    assert!(matches!(
        resolve_patch(req("health_check", PatchOp::Del, json!(null))),
        Ok(PatchValue::HealthCheck(None))
    ));
    assert_eq!(
        invalid_message(resolve_patch(req("health_check", PatchOp::Add, json!({})))),
        "health_check supports op \"set\" and \"del\""
    );
    assert!(
        invalid_message(resolve_patch(req(
            "health_check",
            PatchOp::Set,
            json!({"type": "icmp"})
        )))
        .starts_with("value for health_check")
    );
    assert!(matches!(
        resolve_patch(req("send_proxy_protocol", PatchOp::Set, json!("v2"))),
        Ok(PatchValue::SendProxyProtocol(Some(
            crate::model::ProxyVersion::V2
        )))
    ));
    assert!(
        invalid_message(resolve_patch(req(
            "send_proxy_protocol",
            PatchOp::Set,
            json!("v3")
        )))
        .starts_with("value for send_proxy_protocol")
    );
}

#[test]
fn patch_request_op_is_lowercase() {
    let parsed: Option<PatchRequest> =
        serde_json::from_value(json!({"prop": "hard_limit", "op": "set", "value": 3})).ok();
    assert_eq!(parsed.map(|p| p.op), Some(PatchOp::Set));
    assert!(
        serde_json::from_value::<PatchRequest>(json!({"prop": "x", "op": "Set", "value": 3}))
            .is_err()
    );
}

#[test]
fn a_patch_without_a_value_is_a_del_that_needs_none() {
    // The README's body for removing a health check.
    let r: PatchRequest =
        serde_json::from_value(json!({"prop": "health_check", "op": "del"})).expect("parses");
    assert_eq!(resolve_patch(r), Ok(PatchValue::HealthCheck(None)));
    let r: PatchRequest =
        serde_json::from_value(json!({"prop": "send_proxy_protocol", "op": "del"}))
            .expect("parses");
    assert_eq!(resolve_patch(r), Ok(PatchValue::SendProxyProtocol(None)));
    // Where a value is needed its absence is refused, a set of null
    // included (it would remove the check), while an explicit null is one.
    for (prop, op) in [
        ("services", "add"),
        ("health_check", "set"),
        ("send_proxy_protocol", "set"),
    ] {
        let r: PatchRequest =
            serde_json::from_value(json!({"prop": prop, "op": op})).expect("parses");
        let m = invalid_message(resolve_patch(r));
        assert!(
            m.contains(&format!("this patch of {prop} needs a value")),
            "{m}"
        );
    }
    let r: PatchRequest =
        serde_json::from_value(json!({"prop": "health_check", "op": "set", "value": null}))
            .expect("parses");
    assert_eq!(resolve_patch(r), Ok(PatchValue::HealthCheck(None)));
}
