use super::*;
use crate::model::{DEFAULT_HARD_LIMIT, Handler::*};
use uuid::Uuid;

/// The stored certificates' names.
struct Stored(&'static [&'static str]);

impl Certificates for Stored {
    fn has_certificate(&self, name: &str) -> bool {
        self.0.contains(&name)
    }
}

const NONE: Stored = Stored(&[]);

fn svc(port: u16, destination_port: u16, handlers: &[Handler]) -> Service {
    Service {
        port,
        destination_port,
        handlers: handlers.to_vec(),
    }
}

fn domain(fqdn: &str) -> Domain {
    Domain {
        fqdn: fqdn.into(),
        certificate: None,
    }
}

fn inst(n: u128, name: &str, address: &str) -> Instance {
    Instance {
        uuid: Uuid::from_u128(n),
        name: name.into(),
        address: address.into(),
    }
}

fn group() -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::from_u128(1),
        name: "web".into(),
        domains: vec![domain("web.edgelb.local")],
        services: vec![
            svc(443, 8080, &[Tls, Http]),
            svc(80, 443, &[Http, Redirect]),
        ],
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: vec![],
        created_at: "2024-01-01T00:00:00Z".into(),
        persistent: true,
        health_check: None,
        send_proxy_protocol: None,
    }
}

fn is_invalid(r: Result<(), ApplyError>) -> bool {
    matches!(r, Err(ApplyError::Invalid(_)))
}

#[test]
fn names() {
    for ok in ["a", "web", "web-1", "a-", "x0", &"a".repeat(63)] {
        assert!(valid_name(ok), "{ok:?}");
    }
    for bad in [
        "",
        "1a",
        "-a",
        "Web",
        "a_b",
        "a.b",
        "a b",
        "é",
        &"a".repeat(64),
    ] {
        assert!(!valid_name(bad), "{bad:?}");
    }
}

#[test]
fn fqdns() {
    let long_label = "a".repeat(63);
    let max = format!("{0}.{0}.{0}.{1}", long_label, "a".repeat(61));
    assert_eq!(max.len(), 253);
    for ok in [
        "localhost",
        "example.com",
        "a.b-c.d",
        "*.example.com",
        "x1.y2",
        &long_label,
        &max,
    ] {
        assert!(valid_fqdn(ok), "{ok:?}");
    }
    let too_long = format!("{max}a");
    for bad in [
        "",
        ".",
        "a..b",
        ".a",
        "a.",
        "-a.com",
        "a-.com",
        "Example.com",
        "*",
        "*.",
        "a.*.b",
        "**.a",
        "a_b.com",
        "a b",
        &"a".repeat(64),
        &too_long,
        "*.-a",
    ] {
        assert!(!valid_fqdn(bad), "{bad:?}");
    }
}

#[test]
fn addresses() {
    for ok in [
        "10.0.0.1",
        "::1",
        "fe80::1",
        "backend",
        "Backend.Local",
        "my_app",
        "api.internal.",
        "2001:db8::8a2e:370:7334",
    ] {
        assert!(valid_address(ok), "{ok:?}");
    }
    for bad in [
        "",
        "10.0.0.1:80",
        "[::1]",
        "[::1]:80",
        "host:80",
        "999.1.1.1",
        "1.2.3",
        "-a",
        "a..b",
        "http://a",
        "a/b",
        " a",
    ] {
        assert!(!valid_address(bad), "{bad:?}");
    }
}

#[test]
fn certificate_names() {
    for ok in ["example-com", "example.com", "a_b", "1cert"] {
        assert!(valid_certificate_name(ok), "{ok:?}");
    }
    for bad in ["", ".a", "-a", "A", "a/b", &"a".repeat(254)] {
        assert!(!valid_certificate_name(bad), "{bad:?}");
    }
}

#[test]
fn a_good_group_passes() {
    assert_eq!(check_group(&group(), &NONE), Ok(()));
}

#[test]
fn group_name_and_hard_limit() {
    let state = NONE;
    let mut g = group();
    g.name = "Web".into();
    assert!(is_invalid(check_group(&g, &state)));
    let mut g = group();
    g.hard_limit = 0;
    assert!(is_invalid(check_group(&g, &state)));
    g.hard_limit = 1;
    assert_eq!(check_group(&g, &state), Ok(()));
}

#[test]
fn services_need_one_and_valid_ports() {
    assert!(is_invalid(check_services(&[])));
    assert!(is_invalid(check_services(&[svc(0, 80, &[])])));
    assert!(is_invalid(check_services(&[svc(80, 0, &[])])));
    assert!(is_invalid(check_services(&[
        svc(80, 8080, &[]),
        svc(80, 8081, &[Http])
    ])));
    assert_eq!(check_services(&[svc(65535, 1, &[])]), Ok(()));
}

#[test]
fn handler_sets() {
    for ok in [&[][..], &[Tls], &[Http], &[Tls, Http]] {
        assert_eq!(check_services(&[svc(1, 1, ok)]), Ok(()), "{ok:?}");
    }
    for bad in [
        &[Redirect][..],
        &[Tls, Redirect],
        &[Tls, Http, Redirect],
        &[Http, Http],
        &[Tls, Tls],
    ] {
        let s = [svc(80, 443, bad), svc(443, 8080, &[Tls, Http])];
        assert!(is_invalid(check_services(&s)), "{bad:?}");
    }
}

#[test]
fn redirect_must_point_at_a_tls_port_of_the_group() {
    let redirect = svc(80, 443, &[Http, Redirect]);
    assert_eq!(
        check_services(&[redirect.clone(), svc(443, 8080, &[Tls])]),
        Ok(())
    );
    assert!(is_invalid(check_services(std::slice::from_ref(&redirect))));
    assert!(is_invalid(check_services(&[
        redirect.clone(),
        svc(443, 8080, &[Http])
    ])));
    assert!(is_invalid(check_services(&[redirect, svc(443, 8080, &[])])));
    // pointing at itself
    assert!(is_invalid(check_services(&[svc(
        80,
        80,
        &[Http, Redirect]
    )])));
}

#[test]
fn domains() {
    let state = NONE;
    assert!(is_invalid(check_domains(&[], &state)));
    assert!(is_invalid(check_domains(&[domain("bad_name")], &state)));
    assert!(is_invalid(check_domains(
        &[domain("a.com"), domain("a.com")],
        &state
    )));
    assert_eq!(
        check_domains(&[domain("a.com"), domain("*.a.com")], &state),
        Ok(())
    );
}

#[test]
fn a_repeat_anywhere_in_a_long_list_is_named() {
    let mut ds: Vec<Domain> = (0..5_000).map(|i| domain(&format!("h{i}.a.com"))).collect();
    assert_eq!(check_domains(&ds, &NONE), Ok(()));
    ds.push(domain("h17.a.com"));
    assert_eq!(
        check_domains(&ds, &NONE),
        Err(ApplyError::Invalid(
            "domain \"h17.a.com\" is listed twice".into()
        ))
    );
    let mut is: Vec<Instance> = (0..5_000)
        .map(|i| inst(i + 1, &format!("i{i}"), "x"))
        .collect();
    assert_eq!(check_instances(&is), Ok(()));
    is.push(inst(10_000, "i4999", "x"));
    assert_eq!(
        check_instances(&is),
        Err(ApplyError::Invalid(
            "instance name \"i4999\" is listed twice".into()
        ))
    );
    is.pop();
    is.push(inst(3, "fresh", "x"));
    assert!(is_invalid(check_instances(&is)));
}

#[test]
fn domain_certificate_must_exist() {
    let d = Domain {
        fqdn: "a.com".into(),
        certificate: Some("a-cert".into()),
    };
    assert_eq!(
        check_domains(std::slice::from_ref(&d), &NONE),
        Err(ApplyError::Invalid(
            "certificate \"a-cert\" not found".into()
        ))
    );
    assert_eq!(check_domains(&[d], &Stored(&["a-cert"])), Ok(()));
}

#[test]
fn instances() {
    assert_eq!(
        check_instances(&[inst(1, "a", "10.0.0.1"), inst(2, "b", "h")]),
        Ok(())
    );
    assert!(is_invalid(check_instances(&[inst(1, "A", "10.0.0.1")])));
    assert!(is_invalid(check_instances(&[inst(1, "a", "10.0.0.1:80")])));
    assert!(is_invalid(check_instances(&[
        inst(1, "a", "x"),
        inst(2, "a", "y")
    ])));
    assert!(is_invalid(check_instances(&[
        inst(1, "a", "x"),
        inst(1, "b", "y")
    ])));
}

#[test]
fn certificates() {
    let good = Certificate {
        name: "a-cert".into(),
        chain: "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n".into(),
        private_key: "-----BEGIN EC PRIVATE KEY-----\nMII\n-----END EC PRIVATE KEY-----\n".into(),
        not_after: None,
    };
    assert_eq!(check_certificate(&good), Ok(()));
    let mut c = good.clone();
    c.name = "A".into();
    assert!(is_invalid(check_certificate(&c)));
    let mut c = good.clone();
    c.chain = "junk".into();
    assert!(is_invalid(check_certificate(&c)));
    let mut c = good;
    c.private_key = "junk".into();
    assert!(is_invalid(check_certificate(&c)));
}

#[test]
fn normalising() {
    let mut s = [svc(443, 80, &[Http, Tls]), svc(80, 443, &[Redirect, Http])];
    normalise_services(&mut s);
    assert_eq!(s[0].handlers, [Tls, Http]);
    assert_eq!(s[1].handlers, [Http, Redirect]);
    let mut d = [domain("WWW.Example.COM")];
    normalise_domains(&mut d);
    assert_eq!(d[0].fqdn, "www.example.com");
    assert_eq!(handlers_label(&[]), "tcp");
    assert_eq!(handlers_label(&[Tls, Http]), "tls+http");
}

#[test]
fn health_check_limits() {
    use crate::model::HealthCheck;
    let ok = |spec: &str| check_health_check(&spec.parse::<HealthCheck>().unwrap());
    assert!(ok("tcp").is_ok());
    assert!(ok("http:/healthz,expect=204").is_ok());
    assert!(ok("http:/,interval_ms=100,timeout_ms=10,rise=100,fall=1").is_ok());
    for bad in [
        "tcp,interval_ms=99",
        "tcp,interval_ms=3600001",
        "tcp,timeout_ms=9",
        "tcp,timeout_ms=60001",
        "tcp,rise=0",
        "tcp,fall=101",
        "tcp,port=0",
        "tcp,expect=200",
        "http:healthz",
        "http:/a b",
        "http:/,expect=2xx",
    ] {
        assert!(is_invalid(ok(bad)), "{bad}");
    }
    let mut g = group();
    g.health_check = Some(Box::new("tcp,rise=0".parse().unwrap()));
    assert!(is_invalid(check_group(&g, &NONE)), "check_group checks it");
}
