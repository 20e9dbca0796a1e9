use uuid::Uuid;

use crate::command::{Patch, PatchOp};
use crate::model::Handler::*;
use crate::state::fixtures::*;
use crate::state::{Applied, ApplyError, State};

#[test]
fn patch_services() {
    let mut s = state();
    let add = |v| patch("web", services(PatchOp::Add, v));
    let del = |v| patch("web", services(PatchOp::Del, v));
    assert_eq!(
        apply(&mut s, &add(vec![svc(443, 1, &[Tls])])),
        Err(ApplyError::Invalid(
            "port 443 is already in group \"web\"".into()
        ))
    );
    assert!(matches!(
        apply(&mut s, &add(vec![svc(5432, 1, &[])])),
        Err(ApplyError::Conflict(_))
    ));
    let Ok(Applied::Group(g)) = apply(&mut s, &add(vec![svc(8443, 8080, &[Http, Tls])])) else {
        panic!("add failed");
    };
    assert_eq!(g.services.last(), Some(&svc(8443, 8080, &[Tls, Http])));
    assert_eq!(
        apply(&mut s, &del(vec![svc(9999, 0, &[])])),
        Err(ApplyError::NotFound(
            "port 9999 not found in group \"web\"".into()
        ))
    );
    // 80 redirects to 443: 443 cannot go while 80 stays.
    assert!(is_invalid(&apply(&mut s, &del(vec![svc(443, 0, &[])]))));
    assert!(apply(&mut s, &del(vec![svc(80, 0, &[]), svc(443, 0, &[])])).is_ok());
    assert!(is_invalid(&apply(&mut s, &del(vec![svc(8443, 0, &[])]))));
    let set = patch("web", services(PatchOp::Set, vec![svc(8080, 80, &[Http])]));
    let Ok(Applied::Group(g)) = apply(&mut s, &set) else {
        panic!("set failed");
    };
    assert_eq!(g.services, [svc(8080, 80, &[Http])]);
    assert!(is_invalid(&apply(
        &mut s,
        &patch("web", services(PatchOp::Set, vec![]))
    )));
}

#[test]
fn patch_domains_and_hard_limit() {
    let mut s = state();
    let on_web = |p| patch("web", p);
    assert!(is_invalid(&apply(
        &mut s,
        &on_web(domains(PatchOp::Add, &["WEB.edgelb.local"]))
    )));
    assert!(matches!(
        apply(&mut s, &on_web(domains(PatchOp::Add, &["db.edgelb.local"]))),
        Err(ApplyError::Conflict(_))
    ));
    assert!(apply(&mut s, &on_web(domains(PatchOp::Add, &["*.Example.com"]))).is_ok());
    assert!(is_not_found(&apply(
        &mut s,
        &on_web(domains(PatchOp::Del, &["x.com"]))
    )));
    assert!(apply(&mut s, &on_web(domains(PatchOp::Del, &["*.EXAMPLE.com"]))).is_ok());
    assert!(is_invalid(&apply(
        &mut s,
        &on_web(domains(PatchOp::Del, &["web.edgelb.local"]))
    )));
    assert!(is_invalid(&apply(
        &mut s,
        &on_web(domains(PatchOp::Set, &["a", "a"]))
    )));
    assert!(is_invalid(&apply(&mut s, &on_web(Patch::HardLimit(0)))));
    let id = Uuid::from_u128(1).to_string();
    let Ok(Applied::Group(g)) = apply(&mut s, &patch(&id, Patch::HardLimit(10))) else {
        panic!("hard_limit failed");
    };
    assert_eq!(g.hard_limit, 10);
    assert_eq!(
        apply(&mut s, &patch("nope", Patch::HardLimit(1))),
        Err(ApplyError::NotFound(
            "service group \"nope\" not found".into()
        ))
    );
}

/// Adds and deletes of thousands of domains at once: the entry already
/// there (or missing) is named wherever it is, and what stays keeps its
/// order.
#[test]
fn patches_of_thousands_of_domains() {
    let mut s = state();
    let on_web = |p| patch("web", p);
    let names: Vec<String> = (0..5_000).map(|i| format!("h{i}.example.com")).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(apply(&mut s, &on_web(domains(PatchOp::Add, &all))).is_ok());
    assert_eq!(
        apply(
            &mut s,
            &on_web(domains(
                PatchOp::Add,
                &["new.example.com", "h4321.example.com"]
            ))
        ),
        Err(ApplyError::Invalid(
            "domain \"h4321.example.com\" is already in group \"web\"".into()
        ))
    );
    let odd: Vec<&str> = all.iter().copied().skip(1).step_by(2).collect();
    let Ok(Applied::Group(g)) = apply(&mut s, &on_web(domains(PatchOp::Del, &odd))) else {
        panic!("del failed");
    };
    let left: Vec<&str> = g.domains.iter().map(|d| d.fqdn.as_str()).collect();
    let even: Vec<&str> = all.iter().copied().step_by(2).collect();
    assert_eq!(left[left.len() - even.len()..], even[..]);
    assert_eq!(
        apply(
            &mut s,
            &on_web(domains(PatchOp::Del, &["h0.example.com", "h1.example.com"]))
        ),
        Err(ApplyError::NotFound(
            "domain \"h1.example.com\" not found in group \"web\"".into()
        ))
    );
}

/// A patch sent again after a first try that took effect is refused (an
/// `add` finds its entries there, a `del` its keys gone), and that refusal
/// with the state showing the change answers the group: entries added as
/// given (not merely their keys), keys deleted. Other refusals stand, and
/// so does a refusal of the done kind where the state does not show the
/// change.
#[test]
fn a_patch_sent_again_is_answered_by_the_change_the_state_shows() {
    let mut s = state();
    let patches = [
        patch(
            "web",
            services(PatchOp::Add, vec![svc(8443, 8080, &[Http, Tls])]),
        ),
        patch("web", services(PatchOp::Del, vec![svc(8443, 0, &[])])),
        patch(
            "web",
            domains(PatchOp::Add, &["*.Example.com", "shop.example.com"]),
        ),
        patch("web", domains(PatchOp::Del, &["*.EXAMPLE.com"])),
    ];
    for p in &patches {
        let applied = apply(&mut s, p);
        assert!(applied.is_ok(), "{p:?}: {applied:?}");
        let refused = apply(&mut s, p).expect_err("sent again");
        assert!(State::refused_as_done(p, &refused), "{p:?}: {refused:?}");
        assert_eq!(s.shows_patch(p, &refused), applied.ok(), "{p:?}");
    }
    // An entry of the same key with another value is not the change.
    let other = patch(
        "web",
        services(PatchOp::Add, vec![svc(443, 7070, &[Http, Tls])]),
    );
    let refused = apply(&mut s, &other).expect_err("443 is there");
    assert!(State::refused_as_done(&other, &refused));
    assert_eq!(s.shows_patch(&other, &refused), None);
    // Refusals a done change does not leave stand: a port another group
    // publishes, a rule the result breaks, a group not found.
    let taken = patch("web", services(PatchOp::Add, vec![svc(5432, 1, &[])]));
    let conflict = apply(&mut s, &taken).expect_err("db publishes 5432");
    assert!(!State::refused_as_done(&taken, &conflict));
    assert_eq!(s.shows_patch(&taken, &conflict), None);
    let redirected = patch("web", services(PatchOp::Del, vec![svc(443, 0, &[])]));
    let broken = apply(&mut s, &redirected).expect_err("80 redirects to 443");
    assert!(!State::refused_as_done(&redirected, &broken), "{broken:?}");
    let gone = patch("nope", domains(PatchOp::Del, &["x.com"]));
    let missing = apply(&mut s, &gone).expect_err("no such group");
    assert!(!State::refused_as_done(&gone, &missing), "{missing:?}");
    // A set (a value, a limit) applies again rather than being refused.
    let limit = patch("web", Patch::HardLimit(17));
    assert!(apply(&mut s, &limit).is_ok());
    assert!(apply(&mut s, &limit).is_ok());
    let any = ApplyError::Invalid(" is already in group ".into());
    assert!(!State::refused_as_done(&limit, &any));
    assert_eq!(s.shows_patch(&limit, &any), None);
    assert_eq!(
        s.shows_patch(&create(group(9, "other", vec![])), &any),
        None
    );
}
