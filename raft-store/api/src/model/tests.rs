use proptest::prelude::*;

use super::*;

fn svc(port: u16, destination_port: u16, handlers: &[Handler]) -> Service {
    Service {
        port,
        destination_port,
        handlers: handlers.to_vec(),
    }
}

#[test]
fn display_prints_handlers_in_order() {
    use Handler::*;
    assert_eq!(
        svc(443, 8080, &[Tls, Http]).to_string(),
        "443:8080/tls+http"
    );
    assert_eq!(
        svc(443, 8080, &[Http, Tls]).to_string(),
        "443:8080/tls+http"
    );
    assert_eq!(
        svc(80, 443, &[Redirect, Http]).to_string(),
        "80:443/http+redirect"
    );
    assert_eq!(svc(5432, 5432, &[]).to_string(), "5432:5432");
}

#[test]
fn from_str_accepts_specs() {
    use Handler::*;
    assert_eq!(
        "443:8080/tls+http".parse(),
        Ok(svc(443, 8080, &[Tls, Http]))
    );
    assert_eq!(
        "443:8080/http+tls".parse(),
        Ok(svc(443, 8080, &[Tls, Http]))
    );
    assert_eq!(
        "80:443/http+redirect".parse(),
        Ok(svc(80, 443, &[Http, Redirect]))
    );
    assert_eq!("5432".parse(), Ok(svc(5432, 5432, &[])));
    assert_eq!("8080/http".parse(), Ok(svc(8080, 8080, &[Http])));
    assert_eq!("22:2222".parse(), Ok(svc(22, 2222, &[])));
}

#[test]
fn from_str_refuses_bad_specs() {
    for bad in [
        "",
        ":",
        "443:",
        ":443",
        "0",
        "0:80",
        "80:0",
        "65536",
        "+443",
        "443:+80",
        " 443",
        "443 ",
        "a:b",
        "1:2:3",
        "443/",
        "443/tls+",
        "443/ftp",
        "443/TLS",
        "443/tls+tls",
        "443:80/http/tls",
    ] {
        let err = bad.parse::<Service>();
        assert!(
            matches!(err, Err(ModelError::PortSpec { .. })),
            "{bad:?} → {err:?}"
        );
    }
    let msg = "443/ftp".parse::<Service>().err().map(|e| e.to_string());
    assert_eq!(
        msg.as_deref(),
        Some(
            "invalid port spec \"443/ftp\": unknown handler \"ftp\"; expected tls, http or redirect"
        )
    );
}

#[test]
fn shorthand_443_expands() {
    use Handler::*;
    let expanded = vec![
        svc(443, 8080, &[Tls, Http]),
        svc(80, 443, &[Http, Redirect]),
    ];
    assert_eq!(parse_port_specs(&["443:8080"]), Ok(expanded));
    assert_eq!(
        parse_port_specs(&["443"]),
        Ok(vec![
            svc(443, 443, &[Tls, Http]),
            svc(80, 443, &[Http, Redirect])
        ])
    );
}

#[test]
fn shorthand_applies_only_to_a_lone_bare_443() {
    use Handler::*;
    assert_eq!(
        parse_port_specs(&["443:8080/tls"]),
        Ok(vec![svc(443, 8080, &[Tls])])
    );
    assert_eq!(
        parse_port_specs(&["443:8080", "22"]),
        Ok(vec![svc(443, 8080, &[]), svc(22, 22, &[])])
    );
    assert_eq!(
        parse_port_specs(&["8443:8080"]),
        Ok(vec![svc(8443, 8080, &[])])
    );
    assert_eq!(parse_port_specs(&[]), Err(ModelError::NoPorts));
    assert!(matches!(
        parse_port_specs(&["443", "x"]),
        Err(ModelError::PortSpec { .. })
    ));
}

#[test]
fn handler_parse_and_display() {
    for h in [Handler::Tls, Handler::Http, Handler::Redirect] {
        assert_eq!(h.to_string().parse::<Handler>(), Ok(h));
    }
    assert_eq!("x".parse::<Handler>(), Err(ModelError::Handler("x".into())));
}

#[test]
fn group_json_shape() {
    let group = ServiceGroup {
        uuid: Uuid::from_u128(1),
        name: "web".into(),
        domains: vec![Domain {
            fqdn: "web.edgelb.local".into(),
            certificate: None,
        }],
        services: vec![svc(443, 8080, &[Handler::Tls, Handler::Http])],
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: vec![],
        created_at: "2024-01-01T00:00:00Z".into(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    };
    let json = serde_json::to_value(&group).ok();
    let expected = serde_json::json!({
        "uuid": "00000000-0000-0000-0000-000000000001",
        "name": "web",
        "domains": [{"fqdn": "web.edgelb.local"}],
        "services": [{"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]}],
        "hard_limit": 65535,
        "instances": [],
        "created_at": "2024-01-01T00:00:00Z",
        "persistent": true
    });
    assert_eq!(json, Some(expected.clone()));
    let back: Option<ServiceGroup> = serde_json::from_value(expected).ok();
    assert_eq!(back, Some(group));
}

#[test]
fn domain_certificate_is_optional_in_json() {
    let with = Domain {
        fqdn: "a.example".into(),
        certificate: Some("a-cert".into()),
    };
    assert_eq!(
        serde_json::to_string(&with).ok().as_deref(),
        Some(r#"{"fqdn":"a.example","certificate":"a-cert"}"#)
    );
    let without: Option<Domain> = serde_json::from_str(r#"{"fqdn":"a.example"}"#).ok();
    assert_eq!(without.and_then(|d| d.certificate), None);
}

#[test]
fn instance_lookup_by_uuid_or_name() {
    let a = Instance {
        uuid: Uuid::from_u128(7),
        name: "a".into(),
        address: "10.0.0.1".into(),
    };
    // A name that happens to look like the other's uuid: the uuid wins.
    let b = Instance {
        uuid: Uuid::from_u128(8),
        name: Uuid::from_u128(7).to_string(),
        address: "10.0.0.2".into(),
    };
    let group = ServiceGroup {
        uuid: Uuid::from_u128(1),
        name: "web".into(),
        domains: vec![],
        services: vec![],
        hard_limit: 1,
        instances: vec![a.clone(), b.clone()],
        created_at: String::new(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    };
    assert_eq!(group.instance("a"), Some(&a));
    assert_eq!(group.instance(&Uuid::from_u128(8).to_string()), Some(&b));
    assert_eq!(group.instance(&Uuid::from_u128(7).to_string()), Some(&a));
    assert_eq!(group.instance("c"), None);
}

fn handler_set() -> impl Strategy<Value = Vec<Handler>> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(t, h, r)| {
        [
            (t, Handler::Tls),
            (h, Handler::Http),
            (r, Handler::Redirect),
        ]
        .into_iter()
        .filter_map(|(on, h)| on.then_some(h))
        .collect()
    })
}

proptest! {
    #[test]
    fn display_from_str_round_trip(
        port in 1u16..,
        destination_port in 1u16..,
        handlers in handler_set(),
    ) {
        let s = Service { port, destination_port, handlers };
        prop_assert_eq!(s.to_string().parse::<Service>(), Ok(s.clone()));
    }

    #[test]
    fn parse_display_is_canonical(spec in "[0-9]{1,6}(:[0-9]{1,6})?(/(tls|http|redirect)(\\+(tls|http|redirect)){0,2})?") {
        if let Ok(s) = spec.parse::<Service>() {
            let printed = s.to_string();
            prop_assert_eq!(printed.parse::<Service>(), Ok(s));
        }
    }

    #[test]
    fn from_str_never_panics(spec in "\\PC*") {
        let _ = spec.parse::<Service>();
    }
}

#[test]
fn health_checks_parse_from_the_cli_form_and_read_back() {
    let c: HealthCheck =
        "http:/healthz?x=1,expect=200-299,interval_ms=500,timeout_ms=100,rise=3,fall=4,port=8081"
            .parse()
            .unwrap();
    assert_eq!(c.kind, CheckKind::Http);
    assert_eq!(c.path.as_deref(), Some("/healthz?x=1"));
    assert_eq!(c.expected(), Ok((200, 299)));
    assert_eq!(
        (c.interval_ms, c.timeout_ms, c.rise, c.fall, c.port),
        (500, 100, 3, 4, Some(8081))
    );
    let tcp: HealthCheck = "tcp".parse().unwrap();
    assert_eq!(
        (
            tcp.kind,
            tcp.interval_ms,
            tcp.timeout_ms,
            tcp.rise,
            tcp.fall
        ),
        (CheckKind::Tcp, 2000, 1000, 2, 3)
    );
    let http: HealthCheck = "http".parse().unwrap();
    assert_eq!((http.path.clone(), http.expected()), (None, Ok((200, 399))));
    for bad in [
        "udp",
        "http:/x,rise",
        "http:/x,color=red",
        "tcp,port=70000",
        "http:/x,fall=-1",
        "",
    ] {
        assert!(bad.parse::<HealthCheck>().is_err(), "{bad}");
    }
    // JSON: `type`, defaults for what is left out, unknown keys refused.
    let j: HealthCheck = serde_json::from_str(r#"{"type":"http","path":"/h"}"#).unwrap();
    assert_eq!((j.interval_ms, j.rise), (2000, 2));
    let back = serde_json::to_value(&j).unwrap();
    assert_eq!(back["type"], "http");
    assert!(back.get("expect").is_none());
    assert!(serde_json::from_str::<HealthCheck>(r#"{"type":"http","pth":"/h"}"#).is_err());
    for (expect, ok) in [
        ("200", Some((200, 200))),
        ("200-399", Some((200, 399))),
        ("399-200", None),
        ("99", None),
        ("600", None),
        ("2xx", None),
    ] {
        let c = HealthCheck {
            expect: Some(expect.into()),
            ..http_check()
        };
        assert_eq!(c.expected().ok(), ok, "{expect}");
    }
}

fn http_check() -> HealthCheck {
    "http:/".parse().unwrap()
}

#[test]
fn a_group_without_options_serialises_as_before() {
    let mut g: ServiceGroup = serde_json::from_value(serde_json::json!({
        "uuid": "00000000-0000-0000-0000-000000000001", "name": "web", "domains": [],
        "services": [], "hard_limit": 1, "instances": [], "created_at": "", "persistent": true,
    }))
    .unwrap();
    let v = serde_json::to_value(&g).unwrap();
    assert!(v.get("health_check").is_none() && v.get("send_proxy_protocol").is_none());
    assert!(!g.has_options());
    g.send_proxy_protocol = Some(ProxyVersion::V2);
    assert!(g.has_options());
    assert_eq!(
        serde_json::to_value(&g).unwrap()["send_proxy_protocol"],
        "v2"
    );
}
