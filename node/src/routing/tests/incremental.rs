//! The incremental update builds the same table as a full rebuild, and
//! shares what did not change with the previous table.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use proptest::prelude::*;
use raft_store::model::{Certificate, Domain, Handler, Instance, Service};
use raft_store::{Command, Patch, PatchOp};

use super::*;

const GROUPS: [&str; 4] = ["g0", "g1", "g2", "g3"];
const FQDNS: [&str; 4] = ["a.example.com", "b.example.com", "*.example.com", "c.test"];
const PORTS: [u16; 3] = [80, 81, 443];
/// Certificates `c0` and `c1`, each in two versions (another chain and
/// key under the same name): `CERTS[2 * name + version]`.
static CERTS: LazyLock<Vec<Certificate>> = LazyLock::new(|| {
    (0..4)
        .map(|i| stored_certificate(&format!("c{}", i / 2), &format!("v{i}.example.com")))
        .collect()
});

#[derive(Clone, Debug)]
enum Op {
    Create {
        group: usize,
        port: usize,
        handlers: usize,
        domains: Vec<(usize, usize)>,
    },
    Attach {
        group: usize,
        instance: usize,
    },
    Detach {
        group: usize,
        instance: usize,
    },
    Delete {
        group: usize,
    },
    Limit {
        group: usize,
        limit: u32,
    },
    Domains {
        group: usize,
        domains: Vec<(usize, usize)>,
    },
    Services {
        group: usize,
        port: usize,
        handlers: usize,
        destination: u16,
    },
    /// A certificate stored or replaced (`CERTS[cert]`).
    PutCertificate {
        cert: usize,
    },
}

fn handlers(i: usize) -> Vec<Handler> {
    match i % 4 {
        0 => vec![Handler::Http],
        1 => vec![Handler::Tls, Handler::Http],
        2 => vec![Handler::Tls],
        _ => Vec::new(),
    }
}

/// The domains of `FQDNS` picked, each naming no certificate, `c0` or
/// `c1` (the last pick of an fqdn wins).
fn domains(picked: &[(usize, usize)]) -> Vec<Domain> {
    let set: BTreeMap<usize, usize> = picked.iter().copied().collect();
    set.into_iter()
        .map(|(i, cert)| Domain {
            fqdn: FQDNS[i].into(),
            certificate: cert.checked_sub(1).map(|c| format!("c{c}")),
        })
        .collect()
}

fn op() -> impl Strategy<Value = Op> {
    let g = 0..GROUPS.len();
    let d = proptest::collection::vec((0..FQDNS.len(), 0..3_usize), 0..3);
    prop_oneof![
        (g.clone(), 0..PORTS.len(), 0..4_usize, d.clone()).prop_map(
            |(group, port, handlers, domains)| Op::Create {
                group,
                port,
                handlers,
                domains
            }
        ),
        (g.clone(), 0..4_usize).prop_map(|(group, instance)| Op::Attach { group, instance }),
        (g.clone(), 0..4_usize).prop_map(|(group, instance)| Op::Attach { group, instance }),
        (g.clone(), 0..4_usize).prop_map(|(group, instance)| Op::Detach { group, instance }),
        g.clone().prop_map(|group| Op::Delete { group }),
        (g.clone(), 1..4_u32).prop_map(|(group, limit)| Op::Limit { group, limit }),
        (g.clone(), d).prop_map(|(group, domains)| Op::Domains { group, domains }),
        (0..CERTS.len()).prop_map(|cert| Op::PutCertificate { cert }),
        (g, 0..PORTS.len(), 0..4_usize, 9000..9002_u16).prop_map(
            |(group, port, handlers, destination)| Op::Services {
                group,
                port,
                handlers,
                destination
            }
        ),
    ]
}

/// Applies `op`; a refused command changes nothing.
fn apply(state: &mut State, op: &Op) {
    let cmd = match op {
        Op::Create {
            group,
            port,
            handlers: h,
            domains: d,
        } => {
            let mut g = super::group(GROUPS[*group], PORTS[*port]);
            g.services[0].handlers = handlers(*h);
            g.domains = domains(d);
            Command::CreateGroup { group: g }
        }
        Op::Attach { group, instance } => Command::AttachInstance {
            group: GROUPS[*group].into(),
            instance: Instance {
                uuid: Uuid::new_v4(),
                name: format!("i{instance}"),
                address: format!("10.0.0.{instance}"),
            },
        },
        Op::Detach { group, instance } => Command::DetachInstance {
            group: GROUPS[*group].into(),
            instance: format!("i{instance}"),
        },
        Op::Delete { group } => Command::DeleteGroup {
            id: GROUPS[*group].into(),
            force: true,
        },
        Op::Limit { group, limit } => Command::PatchGroup {
            id: GROUPS[*group].into(),
            patch: Patch::HardLimit(*limit),
        },
        Op::Domains { group, domains: d } => Command::PatchGroup {
            id: GROUPS[*group].into(),
            patch: Patch::Domains {
                op: PatchOp::Set,
                value: domains(d),
            },
        },
        Op::Services {
            group,
            port,
            handlers: h,
            destination,
        } => Command::PatchGroup {
            id: GROUPS[*group].into(),
            patch: Patch::Services {
                op: PatchOp::Set,
                value: vec![Service {
                    port: PORTS[*port],
                    destination_port: *destination,
                    handlers: handlers(*h),
                }],
            },
        },
        Op::PutCertificate { cert } => Command::PutCertificate {
            certificate: CERTS[*cert].clone(),
        },
    };
    let _ = state.apply(&cmd);
}

/// Everything a request can observe of a table, by value (backends by
/// uuid, keys by identity: the certificate cache hands out one per fqdn).
fn describe(table: &RoutingTable) -> String {
    let target = |t: &Arc<Route>| format!("{}:{}:{}", t.group, t.destination_port, t.proxies);
    let key = |k: &Arc<CertifiedKey>| format!("{:p}", Arc::as_ptr(k));
    let mut out = Vec::new();
    let mut ports: Vec<&Arc<PortRoute>> = table.ports().collect();
    ports.sort_by_key(|p| p.port);
    for p in ports {
        let mut exact: Vec<String> = p
            .exact
            .iter()
            .map(|(h, t)| format!("{h}={}", target(t)))
            .collect();
        exact.sort();
        let mut wildcard: Vec<String> = p
            .wildcard
            .iter()
            .map(|(h, t)| format!("{h}={}", target(t)))
            .collect();
        wildcard.sort();
        let mut keys: Vec<String> = p
            .keys
            .iter()
            .map(|(h, k)| format!("{h}={}", key(k)))
            .collect();
        keys.sort();
        let members: Vec<String> = p
            .members
            .iter()
            .map(|((name, uuid), t)| format!("{name}/{uuid}={}", target(t)))
            .collect();
        out.push(format!(
            "port {} tls={} http={} redirect={} only={:?} default={:?}\n exact {exact:?}\n wildcard {wildcard:?}\n keys {keys:?}\n members {members:?}",
            p.port,
            p.tls,
            p.http,
            p.redirect,
            p.only.as_ref().map(target),
            p.default_key.as_ref().map(key),
        ));
    }
    let mut groups: Vec<&Arc<GroupRuntime>> = table.groups().collect();
    groups.sort_by_key(|g| g.uuid);
    for g in groups {
        let mut backends: Vec<String> = g
            .backends
            .values()
            .map(|b| format!("{}/{}@{}", b.uuid, b.name, b.address))
            .collect();
        backends.sort();
        let selects: Vec<Uuid> = g.balancer.backends().iter().map(|b| b.uuid).collect();
        out.push(format!(
            "group {} {} limit={} selects={selects:?} backends={backends:?} services={:?} domains={:?}",
            g.uuid,
            g.name,
            g.balancer.hard_limit(),
            g.services,
            g.domains,
        ));
    }
    out.join("\n")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn incremental_update_equals_full_rebuild(ops in proptest::collection::vec(op(), 1..40)) {
        let fx = Fixture::new();
        let mut state = State::default();
        for op in &ops {
            apply(&mut state, op);
            let before = fx.routes.load_full();
            let changes = fx.changes(&state);
            fx.publish(&state);
            let after = fx.routes.load_full();
            let (full, _) = RoutingTable::update(&state, &RoutingTable::default(), &Changes::All, &fx.cx());
            prop_assert_eq!(describe(&after), describe(&full), "after {:?}", op);

            // What did not change is shared, not rebuilt.
            let Changes::Groups(changed) = changes else {
                continue;
            };
            for g in before.groups().filter(|g| !changed.contains(&g.uuid)) {
                let kept = after.group(&g.uuid).expect("unchanged group stays");
                prop_assert!(Arc::ptr_eq(kept, g));
            }
            for p in before.ports() {
                let touched = p.targets().any(|t| changed.contains(&t.group))
                    || after.port(p.port).is_some_and(|a| a.targets().any(|t| changed.contains(&t.group)));
                if !touched {
                    prop_assert!(after.port(p.port).is_some_and(|a| Arc::ptr_eq(a, p)));
                }
            }
            // Instances that stay keep their backend; those that left drain.
            for g in before.groups() {
                for (id, b) in &g.backends {
                    match after.group(&g.uuid).and_then(|a| a.backends.get(id)) {
                        Some(kept) => prop_assert!(Arc::ptr_eq(kept, b) && !b.is_draining()),
                        None => prop_assert!(b.is_draining()),
                    }
                }
            }
        }
    }
}
