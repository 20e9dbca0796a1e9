//! The pure build: what it leaves alone, and the effects it lists.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use raft_store::command::{Patch, PatchOp};
use raft_store::model::{DEFAULT_HARD_LIMIT, Domain, Handler, Instance, Service, ServiceGroup};
use raft_store::{Command, State};
use uuid::Uuid;

use super::*;
use crate::balancer::Pick;
use crate::metrics::Metrics;

/// A group `name` publishing `port` (HTTP) under `name.example.com`.
pub(crate) fn group(name: &str, port: u16) -> ServiceGroup {
    ServiceGroup {
        uuid: Uuid::new_v4(),
        name: name.into(),
        domains: vec![Domain {
            fqdn: format!("{name}.example.com"),
            certificate: None,
        }],
        services: vec![Service {
            port,
            destination_port: 9000,
            handlers: vec![Handler::Http],
        }],
        hard_limit: DEFAULT_HARD_LIMIT,
        instances: Vec::new(),
        created_at: "2025-01-01T00:00:00Z".into(),
        persistent: false,
        health_check: None,
        send_proxy_protocol: None,
    }
}

fn attach(state: &mut State, group: &str, name: &str) -> Uuid {
    let uuid = Uuid::new_v4();
    let instance = Instance {
        uuid,
        name: name.into(),
        address: "10.0.0.1".into(),
    };
    state
        .apply(&Command::AttachInstance {
            group: group.into(),
            instance,
        })
        .expect("attach");
    uuid
}

fn detach(state: &mut State, group: &str, name: &str) {
    state
        .apply(&Command::DetachInstance {
            group: group.into(),
            instance: name.into(),
        })
        .expect("detach");
}

/// Two groups, `web` (a, b) on port 80 and `api` (x) on port 81.
fn two_groups() -> State {
    let mut state = State::default();
    for (name, port) in [("web", 80), ("api", 81)] {
        state
            .apply(&Command::CreateGroup {
                group: group(name, port),
            })
            .expect("create");
    }
    attach(&mut state, "web", "a");
    attach(&mut state, "web", "b");
    attach(&mut state, "api", "x");
    state
}

struct Fixture {
    metrics: Metrics,
    certs: CertCache,
    routes: ArcSwap<RoutingTable>,
    /// The state the published table was built from.
    published: std::sync::Mutex<Option<State>>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            metrics: Metrics::new(),
            certs: CertCache::default(),
            routes: ArcSwap::from_pointee(RoutingTable::default()),
            published: std::sync::Mutex::new(None),
        }
    }

    fn cx(&self) -> BuildContext<'_> {
        BuildContext {
            certs: &self.certs,
            drain_timeout: Duration::from_secs(30),
            load_changed: None,
        }
    }

    /// What changed since the published state.
    fn changes(&self, state: &State) -> Changes {
        let published = self.published.lock().expect("lock");
        changes(published.as_ref(), state)
    }

    /// The incremental build from the published table.
    fn build(&self, state: &State) -> (RoutingTable, Vec<Effect>) {
        RoutingTable::update(state, &self.routes.load(), &self.changes(state), &self.cx())
    }

    fn publish(&self, state: &State) {
        publish_changes(&self.routes, state, &self.changes(state), &self.cx());
        *self.published.lock().expect("lock") = Some(state.clone());
    }

    fn runtime(&self, name: &str) -> Arc<GroupRuntime> {
        let table = self.routes.load();
        table
            .groups()
            .find(|g| g.name == name)
            .cloned()
            .expect("group in the table")
    }

    fn series(&self) -> String {
        self.metrics.render(&self.routes.load())
    }
}

mod incremental;

/// A certificate as the admin API stores it, named `name`, for `fqdn`:
/// a new key at every call.
fn stored_certificate(name: &str, fqdn: &str) -> raft_store::model::Certificate {
    let ck = rcgen::generate_simple_self_signed(vec![fqdn.to_owned()]).expect("rcgen");
    raft_store::model::Certificate {
        name: name.to_owned(),
        chain: ck.cert.pem(),
        private_key: ck.key_pair.serialize_pem(),
        not_after: None,
    }
}

fn names(balancer: &GroupBalancer) -> Vec<String> {
    balancer.backends().iter().map(|b| b.name.clone()).collect()
}

fn kinds(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Drain(b) => format!("drain {}", b.name),
            Effect::Adopt(g) => format!("adopt {}", names(g).join("+")),
        })
        .collect()
}

#[test]
fn first_build_adopts_every_group_and_drains_nothing() {
    let fx = Fixture::new();
    let (_, effects) = fx.build(&two_groups());
    let mut kinds = kinds(&effects);
    kinds.sort();
    assert_eq!(kinds, ["adopt a+b", "adopt x"]);
}

#[test]
fn an_unchanged_state_lists_no_effects_and_keeps_the_balancers() {
    let fx = Fixture::new();
    let state = two_groups();
    fx.publish(&state);
    let web = fx.runtime("web");
    let (table, effects) = fx.build(&state);
    assert!(effects.is_empty(), "{:?}", kinds(&effects));
    let again = table.group(&web.uuid).expect("web");
    assert!(Arc::ptr_eq(&again.balancer, &web.balancer));
}

#[test]
fn attach_and_detach_leave_the_ports_routes_alone_and_route_to_the_new_runtime() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    let before = fx.routes.load_full();
    attach(&mut state, "web", "c");
    fx.publish(&state);
    let after = fx.routes.load_full();
    // The port's maps name the group by uuid: the same route is shared.
    let port = |t: &RoutingTable| t.port(80).cloned().expect("port 80");
    assert!(Arc::ptr_eq(&port(&before), &port(&after)));
    // Resolved in the new table, the host reaches the new runtime, whose
    // balancer offers the new instance.
    let target = after
        .target(&port(&after), Some("web.example.com"))
        .expect("web routes");
    assert!(Arc::ptr_eq(&target.group, &fx.runtime("web")));
    assert_eq!(names(&target.group.balancer), ["a", "b", "c"]);
    // And the old table still resolves to the old runtime.
    let old = before
        .target(&port(&before), Some("web.example.com"))
        .expect("web routed before");
    assert_eq!(names(&old.group.balancer), ["a", "b"]);

    detach(&mut state, "web", "a");
    fx.publish(&state);
    let detached = fx.routes.load_full();
    assert!(Arc::ptr_eq(&port(&after), &port(&detached)));
    let target = detached
        .target(&port(&detached), Some("web.example.com"))
        .expect("web routes");
    assert_eq!(names(&target.group.balancer), ["b", "c"]);
}

#[test]
fn a_changed_domain_or_limit_routes_as_the_new_state_says() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    let before = fx.routes.load_full();
    let port = |t: &RoutingTable| t.port(80).cloned().expect("port 80");
    state
        .apply(&Command::PatchGroup {
            id: "web".into(),
            patch: Patch::Domains {
                op: PatchOp::Set,
                value: vec![Domain {
                    fqdn: "www.example.com".into(),
                    certificate: None,
                }],
            },
        })
        .expect("patch domains");
    fx.publish(&state);
    let after = fx.routes.load_full();
    // A new host name: the port's routes are rebuilt.
    assert!(!Arc::ptr_eq(&port(&before), &port(&after)));
    let target = after
        .target(&port(&after), Some("www.example.com"))
        .expect("the new name routes");
    assert!(Arc::ptr_eq(&target.group, &fx.runtime("web")));

    // A new limit keeps the routes; the resolved runtime has it.
    state
        .apply(&Command::PatchGroup {
            id: "web".into(),
            patch: Patch::HardLimit(7),
        })
        .expect("patch limit");
    fx.publish(&state);
    let limited = fx.routes.load_full();
    assert!(Arc::ptr_eq(&port(&after), &port(&limited)));
    let target = limited
        .target(&port(&limited), Some("www.example.com"))
        .expect("routes");
    assert_eq!(target.group.balancer.hard_limit(), 7);
}

#[test]
fn attach_builds_a_new_balancer_and_leaves_the_published_one_alone() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    let (web, api) = (fx.runtime("web"), fx.runtime("api"));
    attach(&mut state, "web", "c");

    let (table, effects) = fx.build(&state);
    assert_eq!(kinds(&effects), ["adopt a+b+c"]);
    // The published balancer still offers exactly what its table serves.
    assert_eq!(names(&web.balancer), ["a", "b"]);
    let new_web = table.group(&web.uuid).expect("web");
    assert!(!Arc::ptr_eq(&new_web.balancer, &web.balancer));
    // Instances that stay are the same backends; other groups are untouched.
    for (id, b) in &web.backends {
        assert!(Arc::ptr_eq(b, &new_web.backends[id]));
    }
    let new_api = table.group(&api.uuid).expect("api");
    assert!(Arc::ptr_eq(&new_api.balancer, &api.balancer));

    // Every instance the new balancer can pick has a pool on the new table.
    let target = table
        .port(80)
        .and_then(|p| table.target(p, Some("web.example.com")))
        .expect("web routes on 80");
    for b in new_web.balancer.backends() {
        assert!(target.pool(&b).is_some(), "no pool for {}", b.name);
    }
}

#[test]
fn detach_drains_and_drops_series_only_once_published() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    let web = fx.runtime("web");
    let b = web
        .backends
        .values()
        .find(|b| b.name == "b")
        .cloned()
        .expect("b");
    assert!(fx.series().contains(r#"instance_name="b""#));
    detach(&mut state, "web", "b");

    let (_, effects) = fx.build(&state);
    assert_eq!(kinds(&effects), ["drain b", "adopt a"]);
    // Building did none of it.
    assert!(!b.is_draining());
    assert!(fx.series().contains(r#"instance_name="b""#));
    assert_eq!(names(&web.balancer), ["a", "b"]);

    fx.publish(&state);
    assert!(b.is_draining());
    assert!(!fx.series().contains(r#"instance_name="b""#));
    // The old table's balancer no longer offers the drained instance.
    for _ in 0..20 {
        match web
            .balancer
            .pick(std::time::Instant::now(), &mut rand::rng())
        {
            Pick::Selected(lease) => assert_eq!(lease.backend().name, "a"),
            other => panic!("expected a pick, got {other:?}"),
        }
    }
}

#[test]
fn a_name_reused_in_the_same_change_keeps_its_series() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    detach(&mut state, "web", "b");
    let again = attach(&mut state, "web", "b");

    let (_, effects) = fx.build(&state);
    assert_eq!(kinds(&effects), ["drain b", "adopt a+b"]);
    fx.publish(&state);
    assert!(fx.series().contains(r#"instance_name="b""#));
    let web = fx.runtime("web");
    assert!(!web.backends[&again].is_draining());
}

#[test]
fn deleting_a_group_drains_its_instances() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    state
        .apply(&Command::DeleteGroup {
            id: "api".into(),
            force: true,
        })
        .expect("delete");
    let (table, effects) = fx.build(&state);
    assert_eq!(kinds(&effects), ["drain x"]);
    assert!(table.port(81).is_none());
}

#[test]
fn a_new_hard_limit_gets_a_new_balancer() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    let web = fx.runtime("web");
    state
        .apply(&Command::PatchGroup {
            id: "web".into(),
            patch: Patch::HardLimit(7),
        })
        .expect("patch");
    let (table, effects) = fx.build(&state);
    assert_eq!(kinds(&effects), ["adopt a+b"]);
    assert_eq!(web.balancer.hard_limit(), DEFAULT_HARD_LIMIT);
    assert_eq!(
        table.group(&web.uuid).expect("web").balancer.hard_limit(),
        7
    );
}

#[test]
fn what_the_state_machine_reports_decides_what_is_rebuilt() {
    let g = Uuid::new_v4();
    let changed = |certificates: &[&str], cluster| raft_store::Changed {
        groups: [g].into(),
        certificates: certificates.iter().map(|c| (*c).to_owned()).collect(),
        cluster,
    };
    assert_eq!(Changes::from(None), Changes::All);
    assert_eq!(
        Changes::from(Some(changed(&["c"], false))),
        Changes::Certificates {
            groups: [g].into(),
            names: ["c".to_owned()].into()
        }
    );
    assert_eq!(
        Changes::from(Some(changed(&[], true))),
        Changes::Groups([g].into())
    );
}

/// A certificate replaced: a group whose domain names it presents the new
/// one at once, though its routes stay alike; a group that names none keeps
/// its runtime, and a port none of them publishes its routes.
#[test]
fn a_replaced_certificate_rebuilds_only_the_groups_that_name_it() {
    let fx = Fixture::new();
    let mut state = two_groups();
    let put = |state: &mut State| {
        let certificate = stored_certificate("tls-cert", "tls.example.com");
        state
            .apply(&Command::PutCertificate { certificate })
            .expect("put certificate");
    };
    put(&mut state);
    let mut tls = group("tls", 443);
    tls.domains[0].certificate = Some("tls-cert".into());
    tls.services[0].handlers = vec![Handler::Tls, Handler::Http];
    state
        .apply(&Command::CreateGroup { group: tls })
        .expect("create");
    fx.publish(&state);
    let key = |fx: &Fixture| {
        fx.routes
            .load()
            .port(443)
            .and_then(|p| p.key_for(Some("tls.example.com")))
            .expect("a key for the TLS host")
    };
    let (before, web, api_port) = (
        key(&fx),
        fx.runtime("web"),
        fx.routes.load().port(81).cloned(),
    );

    put(&mut state);
    assert!(matches!(fx.changes(&state), Changes::Certificates { .. }));
    fx.publish(&state);
    let after = key(&fx);
    assert!(
        !Arc::ptr_eq(&before, &after),
        "the old certificate is still presented"
    );
    let domain = &state.group("tls").expect("tls").domains[0];
    assert!(Arc::ptr_eq(&after, &fx.certs.key_for(domain, &state)));
    assert!(Arc::ptr_eq(&web, &fx.runtime("web")), "web was rebuilt");
    let api_now = fx.routes.load().port(81).cloned();
    assert!(
        api_port
            .zip(api_now)
            .is_some_and(|(a, b)| Arc::ptr_eq(&a, &b))
    );
}

/// The detached instances `web`'s runtime lists as still at work.
fn draining_in_web(fx: &Fixture) -> Vec<String> {
    fx.runtime("web")
        .draining()
        .map(|b| b.name.clone())
        .collect()
}

// In a runtime: outside one, a drain's timeout fires at once.
#[tokio::test]
async fn a_detached_instance_is_listed_draining_while_work_is_in_flight_through_later_rebuilds() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    // A request in flight to each instance of web.
    let web = fx.runtime("web");
    let leases: Vec<_> = (0..2)
        .map(|_| {
            match web
                .balancer
                .pick(std::time::Instant::now(), &mut rand::rng())
            {
                Pick::Selected(lease) => lease,
                other => panic!("expected a pick, got {other:?}"),
            }
        })
        .collect();
    drop(web);
    let (on_b, on_a): (Vec<_>, Vec<_>) = leases.into_iter().partition(|l| l.backend().name == "b");
    assert_eq!(
        (on_a.len(), on_b.len()),
        (1, 1),
        "least in flight spreads two picks"
    );
    assert!(draining_in_web(&fx).is_empty());

    detach(&mut state, "web", "b");
    fx.publish(&state);
    assert_eq!(draining_in_web(&fx), ["b"]);
    // Another change to the group rebuilds its runtime: b is still at work.
    attach(&mut state, "web", "c");
    fx.publish(&state);
    assert_eq!(draining_in_web(&fx), ["b"]);
    // So does a rebuild of every group (a snapshot installed).
    publish(&fx.routes, &state, &fx.cx());
    assert_eq!(draining_in_web(&fx), ["b"]);
    // Its last request over, it is gone; an instance detached idle never shows.
    drop(on_b);
    assert!(draining_in_web(&fx).is_empty());
    detach(&mut state, "web", "c");
    fx.publish(&state);
    assert!(draining_in_web(&fx).is_empty());
    drop(on_a);
}

#[tokio::test(start_paused = true)]
async fn a_draining_instance_leaves_the_list_when_its_drain_times_out_or_it_is_attached_again() {
    let fx = Fixture::new();
    let mut state = two_groups();
    fx.publish(&state);
    let pick = |fx: &Fixture| match fx
        .runtime("web")
        .balancer
        .pick(std::time::Instant::now(), &mut rand::rng())
    {
        Pick::Selected(lease) => lease,
        other => panic!("expected a pick, got {other:?}"),
    };
    let first = pick(&fx);
    let name = first.backend().name.clone();
    detach(&mut state, "web", &name);
    fx.publish(&state);
    assert_eq!(draining_in_web(&fx), [name]);
    // The drain timeout (30 s) cuts its work: no longer listed, though the
    // lease is still held.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(first.backend().drain_token().is_cancelled());
    assert!(draining_in_web(&fx).is_empty());
    drop(first);

    // Attached again under its uuid (a retried attach): the group's, not
    // draining, even with work in flight to the old runtime's backend.
    let second = pick(&fx);
    let other = second.backend().name.clone();
    let again = state
        .group("web")
        .and_then(|g| g.instances.iter().find(|i| i.name == other).cloned())
        .expect("the picked instance");
    detach(&mut state, "web", &other);
    fx.publish(&state);
    assert_eq!(draining_in_web(&fx), [other]);
    state
        .apply(&Command::AttachInstance {
            group: "web".into(),
            instance: again,
        })
        .expect("attach again");
    fx.publish(&state);
    assert!(draining_in_web(&fx).is_empty());
    drop(second);
}
