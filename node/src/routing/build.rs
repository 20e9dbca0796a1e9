//! Building a routing table from the previous one: the changed groups'
//! runtimes, and the routes of the ports they touch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use raft_store::model::ServiceGroup;
use raft_store::state::State;
use uuid::Uuid;

use super::changes::by_uuid;
use super::{
    BuildContext, Changes, Effect, FastMap, GroupRuntime, Map, PortRoute, Published, Route,
    RoutingTable,
};
use crate::balancer::{Backend, GroupBalancer};
use crate::series::InstanceMetrics;

impl RoutingTable {
    /// Builds the table for `state` from `prev`, redoing what `changes`
    /// names, and lists what must happen once it is published ([`Effect`]).
    ///
    /// Changes nothing that `prev` or its requests use: a group whose
    /// instances or limit changed gets a new balancer, every balancer of the
    /// new table offers only its runtime's instances, and instances that
    /// stay keep their backend (counts, down marks, pools, metrics).
    pub fn update(
        state: &State,
        prev: &Self,
        changes: &Changes,
        cx: &BuildContext<'_>,
    ) -> (Self, Vec<Effect>) {
        // Groups whose keys change with a certificate: rebuilt even where
        // their routes stay alike.
        let rekeyed: BTreeSet<Uuid> = match changes {
            Changes::Certificates { names, .. } => naming(state, names).collect(),
            _ => BTreeSet::new(),
        };
        let (mut next, changed) = match changes {
            Changes::All => {
                let all: BTreeSet<Uuid> = prev
                    .groups
                    .keys()
                    .copied()
                    .chain(state.groups().map(|g| g.uuid))
                    .collect();
                (Self::default(), all)
            }
            Changes::Groups(groups) => (prev.clone(), groups.clone()),
            Changes::Certificates { groups, .. } => {
                (prev.clone(), groups.union(&rekeyed).copied().collect())
            }
        };
        let mut drains = Vec::new();
        let mut adopts = Vec::new();
        let mut ports = Ports::default();
        // A group whose name, domains and ports stay (an instance attached
        // or detached, a limit changed) keeps its routes: they name it by
        // uuid, so only its runtime is replaced.
        let routed_alike: BTreeSet<Uuid> = changed
            .iter()
            .filter(|uuid| {
                if rekeyed.contains(*uuid) {
                    return false;
                }
                let old = next.groups.get(*uuid);
                let new = by_uuid(state, uuid);
                old.zip(new)
                    .is_some_and(|(old, new)| routes_alike(old, new))
            })
            .copied()
            .collect();
        // Every changed group leaves first, so that a host name moving from
        // one changed group to another is not removed after its insertion.
        for uuid in &changed {
            if routed_alike.contains(uuid) {
                continue;
            }
            if let Some(old) = next.groups.remove(uuid) {
                for s in &old.services {
                    ports.get(&next, s.port).leave(&old);
                }
            }
        }
        for uuid in &changed {
            let old = prev.groups.get(uuid);
            let Some(g) = by_uuid(state, uuid) else {
                // Deleted: every instance it had drains.
                drains.extend(
                    old.iter()
                        .flat_map(|o| o.backends.values())
                        .cloned()
                        .map(Effect::Drain),
                );
                continue;
            };
            let (runtime, fresh) = group_runtime(g, old, cx);
            // What left the group: not in the runtime's instances (a map,
            // not a scan per backend: a group may hold 100,000).
            drains.extend(
                old.iter()
                    .flat_map(|o| o.backends.values())
                    .filter(|b| !runtime.backends.contains_key(&b.uuid))
                    .cloned()
                    .map(Effect::Drain),
            );
            if fresh {
                adopts.push(Effect::Adopt(runtime.balancer.clone()));
            }
            let runtime = Arc::new(runtime);
            if !routed_alike.contains(uuid) {
                for s in &runtime.services {
                    let route = ports.get(&next, s.port);
                    route.join(&runtime, s, state, cx);
                }
            }
            next.groups.insert(*uuid, runtime);
        }
        for (port, mut route) in ports.0 {
            if route.members.is_empty() {
                next.ports.remove(&port);
            } else {
                route.settle(&next.groups);
                next.ports.insert(port, Arc::new(route));
            }
        }
        drains.extend(adopts);
        (next, drains)
    }
}

/// The groups of `state` with a domain that names one of the certificates
/// `names`.
fn naming<'a>(state: &'a State, names: &'a BTreeSet<String>) -> impl Iterator<Item = Uuid> + 'a {
    state
        .groups()
        .filter(|g| {
            g.domains
                .iter()
                .any(|d| d.certificate.as_ref().is_some_and(|c| names.contains(c)))
        })
        .map(|g| g.uuid)
}

/// The routes being rebuilt, copied (cheaply) from the table on first use.
#[derive(Default)]
struct Ports(BTreeMap<u16, PortRoute>);

impl Ports {
    fn get(&mut self, table: &RoutingTable, port: u16) -> &mut PortRoute {
        self.0.entry(port).or_insert_with(|| {
            table
                .ports
                .get(&port)
                .map_or_else(|| PortRoute::empty(port), |r| PortRoute::clone(r))
        })
    }
}

impl PortRoute {
    fn empty(port: u16) -> Self {
        Self {
            port,
            tls: false,
            http: false,
            redirect: false,
            exact: Map::default(),
            wildcard: Map::default(),
            only: None,
            keys: Map::default(),
            default_key: None,
            members: imbl::OrdMap::new(),
        }
    }

    /// Removes `group`'s host names and certificates (those it still owns).
    fn leave(&mut self, group: &GroupRuntime) {
        self.members.remove(&(group.name.clone(), group.uuid));
        let owns = |t: Option<&Arc<Route>>| t.is_some_and(|t| t.group == group.uuid);
        for d in &group.domains {
            let owned = match d.fqdn.strip_prefix("*.") {
                Some(parent) if owns(self.wildcard.get(parent)) => {
                    self.wildcard.remove(parent);
                    true
                }
                None if owns(self.exact.get(&d.fqdn)) => {
                    self.exact.remove(&d.fqdn);
                    true
                }
                _ => false,
            };
            if owned {
                self.keys.remove(&d.fqdn);
            }
        }
    }

    /// Adds `group`'s target on this port (published as `s`).
    fn join(
        &mut self,
        group: &Arc<GroupRuntime>,
        s: &Published,
        state: &State,
        cx: &BuildContext<'_>,
    ) {
        let target = Arc::new(Route {
            group: group.uuid,
            destination_port: s.destination_port,
            proxies: !s.redirect,
        });
        for d in &group.domains {
            match d.fqdn.strip_prefix("*.") {
                Some(parent) => self.wildcard.insert(parent.to_owned(), target.clone()),
                None => self.exact.insert(d.fqdn.clone(), target.clone()),
            };
            if s.tls {
                self.keys.insert(d.fqdn.clone(), cx.certs.key_for(d, state));
            }
        }
        self.members
            .insert((group.name.clone(), group.uuid), target);
    }

    /// Sets what follows from the members: the handlers (groups sharing a
    /// port have identical ones, a rule of the state machine), the group
    /// that takes every host when it is alone, and the default certificate:
    /// on a shared port an unknown SNI gets the first group's (in name
    /// order), so that the HTTP layer can answer 404 over TLS.
    fn settle(&mut self, groups: &Map<Uuid, Arc<GroupRuntime>>) {
        let port = self.port;
        let group = |t: &Arc<Route>| groups.get(&t.group);
        let first = self
            .members
            .values()
            .next()
            .and_then(group)
            .and_then(|g| g.services.iter().find(|s| s.port == port).copied());
        if let Some(s) = first {
            (self.tls, self.http, self.redirect) = (s.tls, s.http, s.redirect);
        }
        self.only = if self.members.len() == 1 {
            self.members.values().next().cloned()
        } else {
            None
        };
        self.default_key = if self.tls {
            self.members
                .values()
                .filter_map(group)
                .find_map(|g| g.domains.first())
                .and_then(|d| self.keys.get(&d.fqdn).cloned())
        } else {
            None
        };
    }
}

/// Whether `new` publishes what the runtime `old` was built from: the same
/// name (members are ordered by it), domains and ports.
fn routes_alike(old: &GroupRuntime, new: &ServiceGroup) -> bool {
    old.name == new.name
        && *old.domains == *new.domains
        && old
            .services
            .iter()
            .copied()
            .eq(new.services.iter().map(published))
}

fn published(s: &raft_store::model::Service) -> Published {
    Published {
        port: s.port,
        destination_port: s.destination_port,
        tls: s.is_tls(),
        http: s.is_http(),
        redirect: s.is_redirect(),
    }
}

/// The runtime of `g`, and whether its balancer is new (to be adopted).
fn group_runtime(
    g: &ServiceGroup,
    prev: Option<&Arc<GroupRuntime>>,
    cx: &BuildContext<'_>,
) -> (GroupRuntime, bool) {
    let mut backends =
        FastMap::with_capacity_and_hasher(g.instances.len(), rustc_hash::FxBuildHasher);
    for i in &g.instances {
        // Instances are immutable once attached: the uuid names one backend.
        let reused = prev.and_then(|p| p.backends.get(&i.uuid));
        let backend = reused.cloned().unwrap_or_else(|| {
            Arc::new(Backend::new(
                i.uuid,
                i.name.clone(),
                i.address.clone(),
                InstanceMetrics::new(),
            ))
        });
        backends.insert(i.uuid, backend);
    }
    // Selection order follows the group's attach order.
    let ordered: Vec<Arc<Backend>> = g
        .instances
        .iter()
        .filter_map(|i| backends.get(&i.uuid).cloned())
        .collect();
    let same = prev
        .filter(|p| p.balancer.hard_limit() == g.hard_limit && p.balancer.selects(&ordered))
        .map(|p| p.balancer.clone());
    let fresh = same.is_none();
    let balancer = same.unwrap_or_else(|| {
        Arc::new(GroupBalancer::over(
            g.hard_limit,
            cx.load_changed.cloned(),
            ordered,
        ))
    });
    let services = g.services.iter().map(published).collect();
    // What left the group with work in flight, and what left earlier and
    // is still at work; an idle one is not kept (a weak reference keeps
    // the allocation). An instance attached again under its uuid is the
    // group's again.
    let draining = prev
        .into_iter()
        .flat_map(|p| p.backends.values().cloned().chain(p.draining()))
        .filter(|b| !backends.contains_key(&b.uuid) && b.local_inflight() > 0)
        .map(|b| Arc::downgrade(&b))
        .collect();
    let runtime = GroupRuntime {
        uuid: g.uuid,
        name: g.name.clone(),
        balancer,
        backends,
        domains: g.domains.clone().into_boxed_slice(),
        services,
        send_proxy_protocol: g.send_proxy_protocol,
        draining,
    };
    (runtime, fresh)
}
