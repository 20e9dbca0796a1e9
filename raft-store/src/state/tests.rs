use uuid::Uuid;

use super::fixtures::*;
use super::*;
use crate::command::{Patch, PatchOp};
use crate::model::Handler::*;

#[test]
fn create_normalises() {
    let mut s = State::default();
    let mut g = web();
    g.services[0].handlers = vec![Http, Tls];
    g.domains = vec![domain("WWW.Example.COM")];
    let Ok(Applied::Group(created)) = apply(&mut s, &create(g)) else {
        panic!("create failed");
    };
    assert_eq!(created.services[0].handlers, [Tls, Http]);
    assert_eq!(created.domains[0].fqdn, "www.example.com");
    assert_eq!(s.group("web"), Some(&created));
    assert_eq!(s.group(&Uuid::from_u128(1).to_string()), Some(&created));
}

#[test]
fn create_refuses_invalid_groups() {
    let mut s = state();
    let mut g = group(3, "api", vec![]);
    assert!(is_invalid(&apply(&mut s, &create(g.clone()))));
    g.services = vec![svc(8080, 8080, &[Http])];
    g.domains[0].certificate = Some("missing".into());
    assert_eq!(
        apply(&mut s, &create(g)),
        Err(ApplyError::Invalid(
            "certificate \"missing\" not found".into()
        ))
    );
}

#[test]
fn names_uuids_and_fqdns_are_unique() {
    let mut s = state();
    assert_eq!(
        apply(
            &mut s,
            &create(group(3, "web", vec![svc(8080, 80, &[Http])]))
        ),
        conflict("service group \"web\" already exists")
    );
    assert!(matches!(
        apply(
            &mut s,
            &create(group(1, "api", vec![svc(8080, 80, &[Http])]))
        ),
        Err(ApplyError::Conflict(_))
    ));
    let mut g = group(3, "api", vec![svc(8080, 80, &[Http])]);
    g.domains = vec![domain("WEB.edgelb.local")];
    assert_eq!(
        apply(&mut s, &create(g)),
        conflict("domain \"web.edgelb.local\" already belongs to group \"web\"")
    );
}

#[test]
fn tcp_ports_belong_to_one_group() {
    let mut s = state();
    assert_eq!(
        apply(&mut s, &create(group(3, "db2", vec![svc(5432, 5433, &[])]))),
        conflict("port 5432 is already published by group \"db\" in TCP mode")
    );
    // A TLS or HTTP claim on a TCP port is refused too.
    assert!(matches!(
        apply(
            &mut s,
            &create(group(3, "db2", vec![svc(5432, 5432, &[Tls])]))
        ),
        Err(ApplyError::Conflict(_))
    ));
    // And a TCP claim on a shared HTTP port.
    assert_eq!(
        apply(&mut s, &create(group(3, "raw", vec![svc(443, 443, &[])]))),
        conflict(
            "port 443 is already published by group \"web\" (tls+http); a plain TCP port cannot be shared"
        )
    );
}

#[test]
fn http_and_tls_ports_are_shared_with_identical_handlers() {
    let mut s = state();
    let api = group(
        3,
        "api",
        vec![
            svc(443, 9000, &[Tls, Http]),
            svc(80, 443, &[Http, Redirect]),
        ],
    );
    assert!(apply(&mut s, &create(api)).is_ok());
    assert!(apply(&mut s, &create(group(4, "sni", vec![svc(8443, 1, &[Tls])]))).is_ok());
    assert!(
        apply(
            &mut s,
            &create(group(5, "sni2", vec![svc(8443, 2, &[Tls])]))
        )
        .is_ok()
    );
    assert_eq!(
        apply(
            &mut s,
            &create(group(6, "mixed", vec![svc(443, 1, &[Tls])]))
        ),
        conflict(
            "port 443 is published by group \"api\" with handlers tls+http; groups sharing a port need the same handlers"
        )
    );
    assert!(matches!(
        apply(
            &mut s,
            &create(group(6, "plain", vec![svc(80, 1, &[Http])]))
        ),
        Err(ApplyError::Conflict(_))
    ));
}

#[test]
fn delete_needs_force_while_instances_are_attached() {
    let mut s = state();
    assert!(apply(&mut s, &attach("web", inst(10, "a"))).is_ok());
    let del = |force| Command::DeleteGroup {
        id: "web".into(),
        force,
    };
    assert_eq!(
        apply(&mut s, &del(false)),
        conflict(
            "service group \"web\" has 1 instance(s) attached; detach them or delete with force"
        )
    );
    let Ok(Applied::Deleted(g)) = apply(&mut s, &del(true)) else {
        panic!("forced delete failed");
    };
    assert_eq!(g.instances, [inst(10, "a")]);
    assert!(s.group("web").is_none());
    assert!(is_not_found(&apply(&mut s, &del(true))));
    // Name, ports and domains are free again.
    assert!(apply(&mut s, &create(group(7, "web", vec![svc(443, 1, &[Tls])]))).is_ok());
    assert!(apply(&mut s, &attach("web", inst(10, "a"))).is_ok());
    assert!(
        apply(
            &mut s,
            &Command::DeleteGroup {
                id: "db".into(),
                force: false
            }
        )
        .is_ok()
    );
}

#[test]
fn attach_and_detach() {
    let mut s = state();
    let Ok(Applied::Attached { group, instance }) = apply(&mut s, &attach("web", inst(10, "a")))
    else {
        panic!("attach failed");
    };
    assert_eq!((group.as_str(), instance), ("web", inst(10, "a")));
    assert_eq!(
        apply(&mut s, &attach("web", inst(11, "a"))),
        conflict("instance \"a\" already exists in group \"web\"")
    );
    assert!(matches!(
        apply(&mut s, &attach("db", inst(10, "b"))),
        Err(ApplyError::Conflict(_))
    ));
    assert!(is_invalid(&apply(&mut s, &attach("web", inst(12, "B")))));
    let mut bad = inst(12, "b");
    bad.address = "[::1]:80".into();
    assert!(is_invalid(&apply(&mut s, &attach("web", bad))));
    assert!(is_not_found(&apply(&mut s, &attach("nope", inst(12, "b")))));
    // Same name in another group is fine.
    assert!(apply(&mut s, &attach("db", inst(12, "a"))).is_ok());

    let detach = |group: &str, instance: &str| Command::DetachInstance {
        group: group.into(),
        instance: instance.into(),
    };
    assert_eq!(
        apply(&mut s, &detach("web", "x")),
        Err(ApplyError::NotFound(
            "instance \"x\" not found in group \"web\"".into()
        ))
    );
    let Ok(Applied::Detached { instance, .. }) =
        apply(&mut s, &detach("web", &Uuid::from_u128(10).to_string()))
    else {
        panic!("detach by uuid failed");
    };
    assert_eq!(instance, inst(10, "a"));
    assert!(apply(&mut s, &detach("db", "a")).is_ok());
    assert!(s.groups().all(|g| g.instances.is_empty()));
}

#[test]
fn certificates_are_stored_and_replaced() {
    let mut s = state();
    let put = |c| Command::PutCertificate { certificate: c };
    assert_eq!(
        apply(&mut s, &put(cert("a-cert"))),
        Ok(Applied::Certificate("a-cert".into()))
    );
    let mut newer = cert("a-cert");
    newer.not_after = Some("2030-01-01T00:00:00Z".into());
    assert!(apply(&mut s, &put(newer.clone())).is_ok());
    assert_eq!(s.certificate("a-cert"), Some(&newer));
    assert_eq!(s.certificates().count(), 1);
    let mut bad = cert("a-cert");
    bad.private_key = String::new();
    assert!(is_invalid(&apply(&mut s, &put(bad))));
    let mut d = domain("secure.example.com");
    d.certificate = Some("a-cert".into());
    assert!(
        apply(
            &mut s,
            &patch(
                "web",
                Patch::Domains {
                    op: PatchOp::Add,
                    value: vec![d]
                }
            )
        )
        .is_ok()
    );
}

#[test]
fn groups_iterate_in_name_order() {
    let mut s = state();
    assert!(apply(&mut s, &create(group(0, "api", vec![svc(1, 1, &[])]))).is_ok());
    let names: Vec<_> = s.groups().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["api", "db", "web"]);
}

#[test]
fn check_is_a_dry_run() {
    let s = state();
    let cmd = attach("web", inst(10, "a"));
    let mut applied = s.clone();
    assert_eq!(s.check(&cmd), applied.apply(&cmd));
    assert_eq!(s, state());
    assert_ne!(s, applied);
}

#[test]
fn status_codes() {
    assert_eq!(ApplyError::Invalid(String::new()).status(), 400);
    assert_eq!(ApplyError::NotFound(String::new()).status(), 404);
    assert_eq!(ApplyError::Conflict(String::new()).status(), 409);
}

#[test]
fn snapshot_round_trip() {
    let mut s = state();
    assert!(
        s.apply(&Command::PutCertificate {
            certificate: cert("c")
        })
        .is_ok()
    );
    assert!(s.apply(&attach("web", inst(10, "a"))).is_ok());
    let json = serde_json::to_value(&s).ok();
    let groups = json
        .as_ref()
        .and_then(|j| j["groups"].as_array())
        .map(Vec::len);
    assert_eq!(groups, Some(2));
    let back: Option<State> = json.and_then(|j| serde_json::from_value(j).ok());
    assert_eq!(back.as_ref(), Some(&s));
    assert_eq!(
        back.and_then(|b| b.group("web").cloned()),
        s.group("web").cloned()
    );
}

#[test]
fn snapshot_with_duplicates_is_refused() {
    let g = serde_json::to_value(web()).ok();
    let json = serde_json::json!({"groups": [g, g], "certificates": []});
    assert!(serde_json::from_value::<State>(json).is_err());
}

#[test]
fn cluster_secrets_are_set_once_and_survive_serde() {
    let secrets = ClusterSecrets {
        ca_cert_pem: "-----BEGIN CERTIFICATE-----".into(),
        ca_key_pem: "-----BEGIN PRIVATE KEY-----".into(),
        token_sha256: "ab".repeat(32),
    };
    let mut s = State::default();
    assert!(s.cluster().is_none());
    let cmd = Command::InitCluster {
        secrets: secrets.clone(),
    };
    assert_eq!(s.apply(&cmd), Ok(Applied::ClusterInitialized));
    assert_eq!(s.cluster(), Some(&secrets));
    assert!(matches!(s.apply(&cmd), Err(ApplyError::Conflict(_))));
    let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
    let bad = Command::InitCluster {
        secrets: ClusterSecrets {
            token_sha256: "short".into(),
            ..secrets
        },
    };
    assert!(matches!(
        State::default().apply(&bad),
        Err(ApplyError::Invalid(_))
    ));
    // The key never shows in debug output.
    assert!(!format!("{:?}", s.cluster()).contains("PRIVATE"));
}

#[test]
fn a_clone_shares_every_group_a_command_does_not_touch() {
    let s = state();
    let mut next = s.clone();
    apply(&mut next, &attach("web", inst(900, "extra"))).unwrap();
    for g in s.groups() {
        let before = s.group_by_uuid(&g.uuid).unwrap();
        let after = next.group_by_uuid(&g.uuid).unwrap();
        assert_eq!(Arc::ptr_eq(before, after), g.name != "web");
    }
    assert_eq!(
        next.group("web").unwrap().instances.len(),
        s.group("web").unwrap().instances.len() + 1
    );
    // The instance index follows attach, detach and delete.
    let again = attach("db", inst(900, "other"));
    assert!(next.check(&again).is_err());
    let detach = Command::DetachInstance {
        group: "web".into(),
        instance: "extra".into(),
    };
    apply(&mut next, &detach).unwrap();
    assert!(next.check(&again).is_ok());
}

#[test]
fn serialised_form_is_unchanged() {
    let s = state();
    let json = serde_json::to_value(&s).unwrap();
    let names: Vec<_> = json["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);
    assert_eq!(json["certificates"], serde_json::json!([]));
    assert!(json.get("cluster").is_none());
    let back: State = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
    // An instance uuid attached to two groups is refused on load.
    let mut a = group(5, "a", vec![svc(8000, 80, &[])]);
    let mut b = group(6, "b", vec![svc(8001, 80, &[])]);
    a.instances.push(inst(42, "x"));
    b.instances.push(inst(42, "y"));
    let json = serde_json::json!({"groups": [a, b], "certificates": []});
    assert!(serde_json::from_value::<State>(json).is_err());
}

#[test]
fn a_batch_applies_in_order_and_a_refused_command_fails_alone() {
    let mut s = state();
    let before = s.clone();
    let batch = Command::Batch {
        commands: vec![
            create(group(30, "new", vec![svc(8080, 80, &[Http])])),
            // Sees the group created just before it in the same batch.
            attach("new", inst(31, "a")),
            // Refused: the name is taken by the attach above.
            attach("new", inst(32, "a")),
            attach("nope", inst(33, "b")),
            Command::Batch { commands: vec![] },
            attach("new", inst(34, "c")),
        ],
    };
    let Ok(Applied::Batch(results)) = s.apply(&batch) else {
        panic!("the batch was refused as a whole");
    };
    assert_eq!(results.len(), 6);
    assert!(matches!(results[0], Ok(Applied::Group(ref g)) if g.name == "new"));
    assert!(
        matches!(results[1], Ok(Applied::Attached { ref instance, .. }) if instance.name == "a")
    );
    assert_eq!(
        results[2],
        conflict("instance \"a\" already exists in group \"new\"")
    );
    assert!(is_not_found(&results[3]));
    assert!(is_invalid(&results[4]));
    assert!(
        matches!(results[5], Ok(Applied::Attached { ref instance, .. }) if instance.name == "c")
    );
    let names: Vec<&str> = s
        .group("new")
        .map(|g| g.instances.iter().map(|i| i.name.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["a", "c"]);
    // The groups that were there are untouched.
    for g in before.groups() {
        assert_eq!(s.group(&g.name), Some(g));
    }
}

#[test]
fn the_same_create_or_attach_again_answers_as_applied_and_changes_nothing() {
    let mut s = State::default();
    let first = apply(&mut s, &create(web()));
    let before = s.clone();
    // The same request (the uuid and name chosen for it) sent again.
    assert_eq!(apply(&mut s, &create(web())), first);
    assert_eq!(s, before);
    let mut rows = Rows::default();
    assert_eq!(s.apply_noting(&create(web()), &mut rows), first);
    assert!(rows.is_empty(), "a request applied again writes no row");

    let attached = apply(&mut s, &attach("web", inst(10, "a")));
    assert!(attached.is_ok());
    let before = s.clone();
    assert_eq!(apply(&mut s, &attach("web", inst(10, "a"))), attached);
    assert_eq!(s, before);

    // Another request under a taken name or uuid is still a conflict.
    let mut other = web();
    other.uuid = Uuid::from_u128(99);
    assert!(matches!(
        apply(&mut s, &create(other)),
        Err(ApplyError::Conflict(_))
    ));
    assert!(matches!(
        apply(
            &mut s,
            &create(group(1, "api", vec![svc(8080, 80, &[Http])]))
        ),
        Err(ApplyError::Conflict(_))
    ));
    assert_eq!(
        apply(&mut s, &attach("web", inst(11, "a"))),
        conflict("instance \"a\" already exists in group \"web\"")
    );
    assert!(matches!(
        apply(&mut s, &attach("web", inst(10, "b"))),
        Err(ApplyError::Conflict(_))
    ));
}

fn once(request: u128, command: Command) -> Command {
    Command::Once {
        request: Uuid::from_u128(request),
        command: Box::new(command),
    }
}

fn hard_limit(s: &State) -> u32 {
    s.group("web").map_or(0, |g| g.hard_limit)
}

#[test]
fn a_request_applied_once_answers_a_retry_as_applied_even_after_other_writes() {
    let mut s = state();
    let first = apply(&mut s, &once(1, patch("web", Patch::HardLimit(5))));
    assert!(matches!(&first, Ok(Applied::Group(g)) if g.hard_limit == 5));
    // Another write between the first try and the retry.
    assert!(apply(&mut s, &patch("web", Patch::HardLimit(7))).is_ok());
    let before = s.clone();
    let mut rows = Rows::default();
    let again = s.apply_noting(&once(1, patch("web", Patch::HardLimit(5))), &mut rows);
    // Answered as applied, with the group as it is now; nothing changes,
    // nothing is written.
    assert!(matches!(&again, Ok(Applied::Group(g)) if g.hard_limit == 7));
    assert_eq!(s, before);
    assert!(rows.is_empty(), "{rows:?}");
    assert_eq!(hard_limit(&s), 7);
    // An `add` sent again is not refused as "already in group".
    let add = patch(
        "web",
        services(PatchOp::Add, vec![svc(8082, 9000, &[Http])]),
    );
    assert!(apply(&mut s, &once(2, add.clone())).is_ok());
    assert!(apply(&mut s, &once(2, add.clone())).is_ok());
    assert!(matches!(
        apply(&mut s, &add),
        Err(ApplyError::Invalid(_) | ApplyError::Conflict(_))
    ));
    // A certificate sent again does not replace one stored since.
    let put = |not_after: &str| Command::PutCertificate {
        certificate: Certificate {
            not_after: Some(not_after.into()),
            ..cert("c")
        },
    };
    let (first, second) = ("2030-01-01T00:00:00Z", "2031-01-01T00:00:00Z");
    assert_eq!(
        apply(&mut s, &once(3, put(first))),
        Ok(Applied::Certificate("c".into()))
    );
    assert!(apply(&mut s, &put(second)).is_ok());
    assert_eq!(
        apply(&mut s, &once(3, put(first))),
        Ok(Applied::Certificate("c".into()))
    );
    assert_eq!(
        s.certificate("c").and_then(|c| c.not_after.as_deref()),
        Some(second)
    );
    // Inside a batch too.
    let batch = Command::Batch {
        commands: vec![
            once(1, patch("web", Patch::HardLimit(5))),
            once(4, patch("web", Patch::HardLimit(9))),
        ],
    };
    assert!(apply(&mut s, &batch).is_ok());
    assert_eq!(hard_limit(&s), 9);
    assert!(s.applied_request(&Uuid::from_u128(4)));
}

#[test]
fn a_refused_request_is_not_remembered() {
    let mut s = State::default();
    let first = apply(&mut s, &once(1, patch("web", Patch::HardLimit(5))));
    assert!(matches!(first, Err(ApplyError::NotFound(_))), "{first:?}");
    assert!(!s.applied_request(&Uuid::from_u128(1)));
    assert!(apply(&mut s, &create(web())).is_ok());
    // Its retry is judged anew: the group is there now.
    assert!(apply(&mut s, &once(1, patch("web", Patch::HardLimit(5)))).is_ok());
    assert_eq!(hard_limit(&s), 5);
    assert!(s.applied_request(&Uuid::from_u128(1)));
}

#[test]
fn only_a_patch_or_a_certificate_is_applied_once() {
    let mut s = State::default();
    let refused = [
        once(1, create(web())),
        once(2, attach("web", inst(10, "a"))),
        once(3, once(4, patch("web", Patch::HardLimit(5)))),
        once(5, Command::Batch { commands: vec![] }),
    ];
    for cmd in &refused {
        assert!(
            matches!(apply(&mut s, cmd), Err(ApplyError::Invalid(_))),
            "{cmd:?}"
        );
        assert!(
            matches!(s.check(cmd), Err(ApplyError::Invalid(_))),
            "{cmd:?}"
        );
    }
    assert_eq!(s, State::default());
}

#[test]
fn the_oldest_requests_are_forgotten_past_the_limit() {
    let mut s = state();
    for n in 0..=REQUESTS_KEPT as u128 {
        let limit = Patch::HardLimit(n as u32 + 1);
        assert!(apply(&mut s, &once(n, patch("web", limit))).is_ok());
    }
    assert_eq!(s.requests.len(), REQUESTS_KEPT);
    // The first is forgotten: sent again, it applies again.
    assert!(!s.applied_request(&Uuid::from_u128(0)));
    assert!(s.applied_request(&Uuid::from_u128(1)));
    assert!(apply(&mut s, &once(0, patch("web", Patch::HardLimit(1)))).is_ok());
    assert_eq!(hard_limit(&s), 1);
    // Its return evicted the next oldest; the rows name the one added and
    // the one forgotten.
    assert!(!s.applied_request(&Uuid::from_u128(1)));
    let mut rows = Rows::default();
    assert!(
        s.apply_noting(&once(9_999, patch("web", Patch::HardLimit(3))), &mut rows)
            .is_ok()
    );
    assert_eq!(rows.requests.len(), 2, "{rows:?}");
    assert!(
        rows.requests
            .iter()
            .any(|&seq| s.request_at(seq) == Some(Uuid::from_u128(9_999)))
    );
    assert!(rows.requests.iter().any(|&seq| s.request_at(seq).is_none()));
}

#[test]
fn remembered_requests_survive_the_serialised_form() {
    let mut s = state();
    // Without any, the form is as before (no `requests`).
    assert!(serde_json::to_value(&s).unwrap().get("requests").is_none());
    for n in [30, 10, 20] {
        assert!(apply(&mut s, &once(n, patch("web", Patch::HardLimit(1)))).is_ok());
    }
    let json = serde_json::to_value(&s).unwrap();
    let listed: Vec<Uuid> = serde_json::from_value(json["requests"].clone()).unwrap();
    assert_eq!(listed, [30, 10, 20].map(Uuid::from_u128), "oldest first");
    let mut back: State = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
    // Restored, it still tells a retry apart, and forgets in the same order.
    assert!(back.applied_request(&Uuid::from_u128(10)));
    assert!(apply(&mut back, &once(10, patch("web", Patch::HardLimit(2)))).is_ok());
    assert_eq!(hard_limit(&back), 1);
    // A form with more than the limit is refused.
    let mut json = serde_json::to_value(&s).unwrap();
    json["requests"] = serde_json::to_value(
        (0..=REQUESTS_KEPT as u128)
            .map(Uuid::from_u128)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(serde_json::from_value::<State>(json).is_err());
}
