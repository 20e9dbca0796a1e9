//! The data plane's view of the replicated state: which group answers on
//! which published port and host name, and the live runtime (balancer,
//! backends, upstream pools) behind each group.
//!
//! A [`RoutingTable`] is immutable once built. Every state change builds a
//! new one from the [`State`] and the previous table, reusing the runtime of
//! instances that stay (so in-flight counts, down-marks and idle upstream
//! connections survive), and the listeners swap it in atomically
//! (`ArcSwap`). A request reads the table once; it never copies it.
//!
//! Building is pure: it touches nothing the published table or its requests
//! use, and returns the new table with a list of [`Effect`]s (drain detached
//! instances, move the balancers' home, drop metric series) that
//! [`publish`] runs only after the swap:
//!
//! ```text
//!  State ─▶ build(state, prev) ─▶ (table, effects) ─▶ routes.store(table) ─▶ run effects
//! ```
//!
//! A group whose instances (or limit) changed gets a new balancer built over
//! exactly the instances the new table has pools for, so any pick on any
//! table finds its pool; a detached instance is offered by no balancer of the
//! tables published after its removal.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use raft_store::model::ServiceGroup;
use raft_store::state::State;
use rustls::sign::CertifiedKey;
use uuid::Uuid;

use crate::balancer::{Backend, GroupBalancer, LoadChanged, start_drain};
use crate::http::upstream::Pool;
use crate::metrics::Metrics;
use crate::tls::CertCache;

/// One group's runtime, shared by every port the group publishes.
#[derive(Debug)]
pub struct GroupRuntime {
    pub uuid: Uuid,
    pub name: String,
    pub balancer: Arc<GroupBalancer>,
    /// Attached instances by uuid.
    pub backends: HashMap<Uuid, Arc<Backend>>,
}

/// One group on one published port.
#[derive(Debug)]
pub struct Target {
    pub group: Arc<GroupRuntime>,
    /// The instances' port for this published port; for a redirect port, the
    /// published TLS port that clients are sent to.
    pub destination_port: u16,
    /// Upstream connection pools per instance uuid (empty on redirect ports).
    pub pools: HashMap<Uuid, Arc<Pool>>,
}

impl Target {
    /// The pool for `backend` on this port.
    pub fn pool(&self, backend: &Backend) -> Option<&Arc<Pool>> {
        self.pools.get(&backend.uuid)
    }
}

/// Everything published on one port.
#[derive(Debug)]
pub struct PortRoute {
    pub port: u16,
    pub tls: bool,
    pub http: bool,
    pub redirect: bool,
    exact: HashMap<String, Arc<Target>>,
    wildcard: HashMap<String, Arc<Target>>,
    /// The group when exactly one publishes this port: it takes every host.
    only: Option<Arc<Target>>,
    /// TLS keys by fqdn pattern (`*.example.com` stored as is).
    keys: HashMap<String, Arc<CertifiedKey>>,
    default_key: Option<Arc<CertifiedKey>>,
}

impl PortRoute {
    /// The group serving `host` (an HTTP `Host` value or a TLS SNI name).
    pub fn route(&self, host: Option<&str>) -> Option<&Arc<Target>> {
        if let Some(host) = host.map(normalize_host) {
            if let Some(t) = self.exact.get(host.as_ref()) {
                return Some(t);
            }
            if let Some(t) = host
                .split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
            {
                return Some(t);
            }
        }
        self.only.as_ref()
    }

    /// The certificate to present for `sni`.
    pub fn key_for(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(host) = sni.map(normalize_host) {
            if let Some(k) = self.keys.get(host.as_ref()) {
                return Some(k.clone());
            }
            if let Some(k) = host
                .split_once('.')
                .and_then(|(_, parent)| self.keys.get(&format!("*.{parent}")))
            {
                return Some(k.clone());
            }
        }
        self.default_key.clone()
    }

    /// Every group on this port.
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        let mut seen = Vec::new();
        self.exact
            .values()
            .chain(self.wildcard.values())
            .chain(self.only.iter())
            .filter(move |t| {
                let new = !seen.contains(&t.group.uuid);
                if new {
                    seen.push(t.group.uuid);
                }
                new
            })
    }
}

/// Lowercases and strips a port and a trailing dot: `Example.COM.:8080` → `example.com`.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = if host.starts_with('[') {
        host.split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// What the builder needs besides the state.
#[derive(Debug)]
pub struct BuildContext<'a> {
    pub metrics: &'a Metrics,
    pub certs: &'a CertCache,
    pub drain_timeout: Duration,
    /// Raised by new groups' picks and releases, for the gossip sender.
    pub load_changed: Option<&'a Arc<LoadChanged>>,
}

/// What a new table asks of the world once it is published, in this order.
#[derive(Debug)]
pub enum Effect {
    /// An instance left: it starts draining, and balancers of older tables
    /// stop offering it.
    Drain(Arc<Backend>),
    /// A group's new balancer becomes its backends' home (see
    /// [`GroupBalancer::adopt`]).
    Adopt(Arc<GroupBalancer>),
    /// A detached instance's metric series go (unless the new state has an
    /// instance of the same name in a group of the same name, which owns
    /// them now).
    RemoveSeries { group: String, instance: String },
}

impl Effect {
    fn run(self, cx: &BuildContext<'_>) {
        match self {
            Self::Drain(backend) => start_drain(&backend, cx.drain_timeout),
            Self::Adopt(balancer) => balancer.adopt(),
            Self::RemoveSeries { group, instance } => cx.metrics.remove_instance(&group, &instance),
        }
    }
}

/// Builds the table for `state`, swaps it into `routes`, then runs its
/// effects: the one way a state reaches the data plane.
pub fn publish(routes: &ArcSwap<RoutingTable>, state: &State, cx: &BuildContext<'_>) {
    let prev = routes.load_full();
    let (table, effects) = RoutingTable::build(state, &prev, cx);
    routes.store(Arc::new(table));
    for effect in effects {
        effect.run(cx);
    }
}

/// The routing table of one state.
#[derive(Debug, Default)]
pub struct RoutingTable {
    ports: HashMap<u16, Arc<PortRoute>>,
    groups: HashMap<Uuid, Arc<GroupRuntime>>,
}

impl RoutingTable {
    /// The route published on `port`.
    pub fn port(&self, port: u16) -> Option<&Arc<PortRoute>> {
        self.ports.get(&port)
    }

    /// Every published port.
    pub fn ports(&self) -> impl Iterator<Item = &Arc<PortRoute>> {
        self.ports.values()
    }

    /// A group's runtime by uuid.
    pub fn group(&self, uuid: &Uuid) -> Option<&Arc<GroupRuntime>> {
        self.groups.get(uuid)
    }

    /// Every group's runtime.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<GroupRuntime>> {
        self.groups.values()
    }

    /// Builds the table for `state`, reusing what `prev` has for groups and
    /// instances that stay, and lists what must happen once it is published
    /// ([`Effect`]). Changes nothing that `prev` or its requests use: a
    /// group whose instances or limit changed gets a new balancer, and every
    /// balancer of the new table offers only instances it has pools for.
    pub fn build(state: &State, prev: &Self, cx: &BuildContext<'_>) -> (Self, Vec<Effect>) {
        let mut effects = Vec::new();
        for (uuid, old) in &prev.groups {
            let kept = state.group(&uuid.to_string()).filter(|g| g.uuid == *uuid);
            for (id, b) in &old.backends {
                if kept.is_none_or(|k| !k.instances.iter().any(|i| i.uuid == *id)) {
                    effects.push(Effect::Drain(b.clone()));
                    let renamed = state
                        .group(&old.name)
                        .is_none_or(|g| !g.instances.iter().any(|i| i.name == b.name));
                    if renamed {
                        effects.push(Effect::RemoveSeries {
                            group: old.name.clone(),
                            instance: b.name.clone(),
                        });
                    }
                }
            }
        }
        let mut groups = HashMap::new();
        for g in state.groups() {
            let (runtime, fresh) = group_runtime(g, prev.groups.get(&g.uuid), cx);
            if fresh {
                effects.push(Effect::Adopt(runtime.balancer.clone()));
            }
            groups.insert(g.uuid, Arc::new(runtime));
        }
        // Series removal last: an instance that reuses a detached one's name
        // got its handles above, and keeps its series (see `RemoveSeries`).
        effects.sort_by_key(|e| match e {
            Effect::Drain(_) => 0,
            Effect::Adopt(_) => 1,
            Effect::RemoveSeries { .. } => 2,
        });

        let mut by_port: HashMap<u16, Vec<(&ServiceGroup, u16)>> = HashMap::new();
        for g in state.groups() {
            for s in &g.services {
                by_port
                    .entry(s.port)
                    .or_default()
                    .push((g, s.destination_port));
            }
        }
        let mut ports = HashMap::new();
        for (port, members) in by_port {
            let route = port_route(port, &members, &groups, prev.ports.get(&port), state, cx);
            ports.insert(port, Arc::new(route));
        }
        (Self { ports, groups }, effects)
    }
}

/// The runtime of `g`, and whether its balancer is new (to be adopted).
fn group_runtime(
    g: &ServiceGroup,
    prev: Option<&Arc<GroupRuntime>>,
    cx: &BuildContext<'_>,
) -> (GroupRuntime, bool) {
    let mut backends = HashMap::new();
    for i in &g.instances {
        // Instances are immutable once attached: the uuid names one backend.
        let reused = prev.and_then(|p| p.backends.get(&i.uuid));
        let backend = reused.cloned().unwrap_or_else(|| {
            let metrics = cx.metrics.instance(&g.name, &i.name);
            Arc::new(Backend::new(
                i.uuid,
                i.name.clone(),
                i.address.clone(),
                metrics,
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
    let runtime = GroupRuntime {
        uuid: g.uuid,
        name: g.name.clone(),
        balancer,
        backends,
    };
    (runtime, fresh)
}

fn port_route(
    port: u16,
    members: &[(&ServiceGroup, u16)],
    groups: &HashMap<Uuid, Arc<GroupRuntime>>,
    prev: Option<&Arc<PortRoute>>,
    state: &State,
    cx: &BuildContext<'_>,
) -> PortRoute {
    // Groups sharing a port have identical handlers (a rule of the state machine).
    let service = members
        .first()
        .and_then(|(g, _)| g.services.iter().find(|s| s.port == port));
    let (tls, http, redirect) = service.map_or((false, false, false), |s| {
        (s.is_tls(), s.is_http(), s.is_redirect())
    });
    let mut route = PortRoute {
        port,
        tls,
        http,
        redirect,
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        only: None,
        keys: HashMap::new(),
        default_key: None,
    };
    for (g, destination_port) in members {
        let Some(group) = groups.get(&g.uuid) else {
            continue;
        };
        let old = prev.and_then(|p| p.targets().find(|t| t.group.uuid == g.uuid));
        let mut pools = HashMap::new();
        if !redirect {
            for (id, b) in &group.backends {
                let reused = old
                    .filter(|o| o.destination_port == *destination_port)
                    .and_then(|o| o.pools.get(id))
                    .filter(|p| p.address() == b.address);
                let pool = reused
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Pool::new(&b.address, *destination_port)));
                pools.insert(*id, pool);
            }
        }
        let target = Arc::new(Target {
            group: group.clone(),
            destination_port: *destination_port,
            pools,
        });
        for d in &g.domains {
            match d.fqdn.strip_prefix("*.") {
                Some(parent) => route.wildcard.insert(parent.to_owned(), target.clone()),
                None => route.exact.insert(d.fqdn.clone(), target.clone()),
            };
            if tls {
                let key = cx.certs.key_for(d, state);
                if route.default_key.is_none() {
                    route.default_key = Some(key.clone());
                }
                route.keys.insert(d.fqdn.clone(), key);
            }
        }
        if members.len() == 1 {
            route.only = Some(target);
        }
    }
    // On a shared port an unknown SNI still gets the first group's
    // certificate, so that the HTTP layer can answer 404 over TLS.
    route
}

#[cfg(test)]
mod tests;
