//! Property tests: `apply` is deterministic, atomic, and keeps the
//! invariants, over random command sequences drawn from small pools (so that
//! names, ports and domains collide often).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::command::{Patch, PatchOp};
use crate::model::{Domain, Handler, Service};
use crate::validate::check_group;

fn handlers() -> impl Strategy<Value = Vec<Handler>> {
    use Handler::*;
    prop_oneof![
        4 => prop::sample::select(vec![
            vec![], vec![Tls], vec![Http], vec![Tls, Http], vec![Http, Tls], vec![Http, Redirect],
        ]),
        1 => prop::collection::vec(prop::sample::select(vec![Tls, Http, Redirect]), 0..4),
    ]
}

fn service() -> impl Strategy<Value = Service> {
    let ports = prop::sample::select(vec![80u16, 443, 8443, 5432, 22, 0]);
    let dests = prop::sample::select(vec![443u16, 8443, 8080, 22, 0]);
    (ports, dests, handlers()).prop_map(|(port, destination_port, handlers)| Service {
        port,
        destination_port,
        handlers,
    })
}

/// Mostly coherent port sets (so that groups get created and collide on
/// ports), sometimes random ones.
fn services() -> impl Strategy<Value = Vec<Service>> {
    use Handler::*;
    let s = |port, destination_port, handlers: &[Handler]| Service {
        port,
        destination_port,
        handlers: handlers.to_vec(),
    };
    let templates = vec![
        vec![s(443, 8080, &[Tls, Http]), s(80, 443, &[Http, Redirect])],
        vec![s(443, 8080, &[Http, Tls])],
        vec![s(443, 8080, &[Tls])],
        vec![s(80, 8080, &[Http])],
        vec![s(5432, 5432, &[])],
        vec![s(22, 22, &[]), s(8443, 8080, &[Tls])],
        vec![s(8443, 22, &[])],
    ];
    prop_oneof![
        4 => prop::sample::select(templates),
        1 => prop::collection::vec(service(), 0..4),
    ]
}

fn domain() -> impl Strategy<Value = Domain> {
    let fqdns = prop::sample::select(vec![
        "a.com", "b.com", "A.com", "*.a.com", "c", "d.org", "bad_",
    ]);
    let certs = prop_oneof![
        4 => Just(None),
        1 => prop::option::of(prop::sample::select(vec!["c1", "c2"])),
    ];
    (fqdns, certs).prop_map(|(fqdn, certificate)| Domain {
        fqdn: fqdn.into(),
        certificate: certificate.map(Into::into),
    })
}

fn instance() -> impl Strategy<Value = Instance> {
    (
        100u128..106,
        prop::sample::select(vec!["i", "j", "k", "K"]),
        prop::sample::select(vec!["10.0.0.1", "::1", "backend", "bad:1"]),
    )
        .prop_map(|(n, name, address)| Instance {
            uuid: Uuid::from_u128(n),
            name: name.into(),
            address: address.into(),
        })
}

fn group() -> impl Strategy<Value = ServiceGroup> {
    (
        1u128..7,
        prop::sample::select(vec!["a", "b", "c", "d", "e", "Bad"]),
        prop_oneof![5 => prop::collection::vec(domain(), 1..3), 1 => Just(Vec::new())],
        services(),
        prop_oneof![6 => Just(100u32), 1 => Just(0u32)],
        prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(instance(), 0..3)],
    )
        .prop_map(
            |(n, name, domains, services, hard_limit, instances)| ServiceGroup {
                uuid: Uuid::from_u128(n),
                name: name.into(),
                domains,
                services,
                hard_limit,
                instances,
                created_at: "2024-01-01T00:00:00Z".into(),
                persistent: true,
                health_check: None,
                send_proxy_protocol: None,
            },
        )
}

/// A group or instance id: a pooled name or uuid string.
fn id(
    names: &'static [&'static str],
    uuids: std::ops::Range<u128>,
) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(names).prop_map(String::from),
        1 => uuids.prop_map(|n| Uuid::from_u128(n).to_string()),
    ]
}

fn op() -> impl Strategy<Value = PatchOp> {
    prop::sample::select(vec![PatchOp::Set, PatchOp::Add, PatchOp::Del])
}

fn patch() -> impl Strategy<Value = Patch> {
    prop_oneof![
        (op(), services()).prop_map(|(op, value)| Patch::Services { op, value }),
        (op(), prop::collection::vec(domain(), 0..3))
            .prop_map(|(op, value)| Patch::Domains { op, value }),
        prop::sample::select(vec![0u32, 5]).prop_map(Patch::HardLimit),
    ]
}

pub(crate) fn command() -> impl Strategy<Value = Command> {
    const GROUPS: &[&str] = &["a", "b", "c", "d", "e", "x"];
    let cert = |name: &'static str, ok: bool| Certificate {
        name: name.into(),
        chain: if ok {
            "-----BEGIN CERTIFICATE-----"
        } else {
            ""
        }
        .into(),
        private_key: "-----BEGIN PRIVATE KEY-----".into(),
        not_after: None,
    };
    prop_oneof![
        4 => group().prop_map(|group| Command::CreateGroup { group }),
        3 => (id(GROUPS, 1..7), patch()).prop_map(|(id, patch)| Command::PatchGroup { id, patch }),
        1 => (id(GROUPS, 1..7), any::<bool>()).prop_map(|(id, force)| Command::DeleteGroup { id, force }),
        3 => (id(GROUPS, 1..7), instance())
            .prop_map(|(group, instance)| Command::AttachInstance { group, instance }),
        2 => (id(GROUPS, 1..7), id(&["i", "j", "z"], 100..106))
            .prop_map(|(group, instance)| Command::DetachInstance { group, instance }),
        1 => (prop::sample::select(vec!["c1", "c2", "C"]), any::<bool>())
            .prop_map(move |(name, ok)| Command::PutCertificate { certificate: cert(name, ok) }),
    ]
}

/// Every invariant the state machine promises.
fn check_invariants(s: &State) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.names.len(), s.groups.len());
    let attached: usize = s.groups().map(|g| g.instances.len()).sum();
    prop_assert_eq!(s.instances.len(), attached);
    let domains: usize = s.groups().map(|g| g.domains.len()).sum();
    prop_assert_eq!(s.domains.len(), domains);
    let published: usize = s.groups().map(|g| g.services.len()).sum();
    prop_assert_eq!(s.ports.values().map(|h| h.len()).sum::<usize>(), published);
    let mut fqdns = BTreeSet::new();
    let mut instance_uuids = BTreeSet::new();
    let mut ports: BTreeMap<u16, Vec<&Service>> = BTreeMap::new();
    for g in s.groups() {
        prop_assert_eq!(s.names.get(&g.name), Some(&g.uuid));
        for i in &g.instances {
            prop_assert_eq!(s.instances.get(&i.uuid), Some(&g.uuid));
        }
        for d in &g.domains {
            prop_assert_eq!(s.domains.get(&d.fqdn), Some(&g.uuid));
        }
        for sv in &g.services {
            prop_assert_eq!(
                s.ports.get(&sv.port).and_then(|h| h.get(&g.name)),
                Some(&g.uuid)
            );
        }
        prop_assert_eq!(check_group(g, s), Ok(()), "group {:?} is invalid", g.name);
        for d in &g.domains {
            prop_assert!(fqdns.insert(d.fqdn.clone()), "fqdn {} twice", d.fqdn);
        }
        let mut names = BTreeSet::new();
        for i in &g.instances {
            prop_assert!(
                names.insert(&i.name),
                "instance {} twice in {}",
                i.name,
                g.name
            );
            prop_assert!(
                instance_uuids.insert(i.uuid),
                "instance uuid {} twice",
                i.uuid
            );
        }
        for sv in &g.services {
            ports.entry(sv.port).or_default().push(sv);
            if sv.is_redirect() {
                let target = g.services.iter().find(|t| t.port == sv.destination_port);
                prop_assert!(
                    target.is_some_and(Service::is_tls),
                    "{} redirects badly",
                    sv
                );
            }
        }
    }
    for (port, claims) in ports {
        if claims.len() > 1 {
            prop_assert!(
                claims.iter().all(|c| c.is_tls() || c.is_http()),
                "TCP port {port} shared"
            );
            prop_assert!(
                claims.iter().all(|c| c.handlers == claims[0].handlers),
                "port {port} mixed"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn apply_is_deterministic(cmds in prop::collection::vec(command(), 0..40)) {
        let mut a = State::default();
        let mut b = State::default();
        for cmd in &cmds {
            // `b` goes through a snapshot before each command, as a restarted
            // node would.
            let json = serde_json::to_string(&b).map_err(|e| TestCaseError::fail(e.to_string()))?;
            b = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(a.apply(cmd), b.apply(cmd));
            prop_assert_eq!(&a, &b);
        }
    }

    #[test]
    fn failed_apply_changes_nothing(cmds in prop::collection::vec(command(), 0..40)) {
        let mut s = State::default();
        for cmd in &cmds {
            let before = s.clone();
            let checked = s.check(cmd);
            let result = s.apply(cmd);
            prop_assert_eq!(&checked, &result);
            if result.is_err() {
                prop_assert_eq!(&s, &before);
            }
        }
    }

    #[test]
    fn invariants_hold(cmds in prop::collection::vec(command(), 0..40)) {
        let mut s = State::default();
        for cmd in &cmds {
            let _ = s.apply(cmd);
            check_invariants(&s)?;
        }
    }
}

/// The generators reach every kind of outcome (guards against properties
/// that hold only because every command fails).
#[test]
fn generators_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let Ok(tree) = prop::collection::vec(command(), 40).new_tree(&mut runner) else {
            continue;
        };
        let mut s = State::default();
        for cmd in tree.current() {
            let kind = match s.apply(&cmd) {
                Ok(Applied::Group(_)) => "group",
                Ok(Applied::Deleted(_)) => "deleted",
                Ok(Applied::Attached { .. }) => "attached",
                Ok(Applied::Detached { .. }) => "detached",
                Ok(Applied::Certificate(_)) => "certificate",
                // Not generated: bootstrap-only, covered by a unit test.
                Ok(Applied::ClusterInitialized) => "cluster",
                // Not generated: the leader forms batches (unit test).
                Ok(Applied::Batch(_)) => "batch",
                Err(ApplyError::Invalid(_)) => "invalid",
                Err(ApplyError::NotFound(_)) => "not found",
                Err(ApplyError::Conflict(_)) => "conflict",
            };
            seen.insert(kind);
        }
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
}
