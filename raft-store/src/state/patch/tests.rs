use uuid::Uuid;

use crate::command::{Patch, PatchOp};
use crate::model::Handler::*;
use crate::state::fixtures::*;
use crate::state::{Applied, ApplyError};

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

/// A patch whose change the state already shows is recognised, as a patch
/// sent again after a first try that committed finds it: entries added as
/// given (not merely their keys), keys deleted, a value set. Before the
/// first apply, and for an entry of the same key with another value, it is
/// not.
#[test]
fn a_patch_already_applied_is_shown() {
    let mut s = state();
    let patches = [
        patch(
            "web",
            services(PatchOp::Add, vec![svc(8443, 8080, &[Http, Tls])]),
        ),
        patch("web", services(PatchOp::Del, vec![svc(8443, 0, &[])])),
        patch(
            "web",
            services(
                PatchOp::Set,
                vec![
                    svc(443, 9090, &[Http, Tls]),
                    svc(80, 443, &[Http, Redirect]),
                ],
            ),
        ),
        patch("web", domains(PatchOp::Add, &["*.Example.com"])),
        patch("web", domains(PatchOp::Del, &["*.EXAMPLE.com"])),
        patch(
            "web",
            domains(PatchOp::Set, &["web.edgelb.local", "Shop.example.com"]),
        ),
        patch("web", Patch::HardLimit(17)),
    ];
    for p in &patches {
        assert_eq!(s.shows_patch(p), None, "{p:?} before it applied");
        let applied = apply(&mut s, p);
        assert!(applied.is_ok(), "{p:?}: {applied:?}");
        assert_eq!(s.shows_patch(p), applied.ok(), "{p:?} after it applied");
    }
    // The same key with another value is not the change.
    let other = patch(
        "web",
        services(PatchOp::Add, vec![svc(443, 7070, &[Http, Tls])]),
    );
    assert!(is_invalid(&apply(&mut s, &other)));
    assert_eq!(s.shows_patch(&other), None);
    // No such group, or not a patch.
    assert_eq!(s.shows_patch(&patch("nope", Patch::HardLimit(17))), None);
    assert_eq!(s.shows_patch(&create(group(9, "other", vec![]))), None);
}
