//! The data plane's view of the replicated state: which group answers on
//! which published port and host name, and the live runtime (balancer,
//! backends) behind each group.
//!
//! A [`RoutingTable`] is immutable once built. Every state change builds a
//! new one from the [`State`] and the previous table, reusing the runtime of
//! instances that stay (so in-flight counts, down-marks and idle upstream
//! connections survive), and the listeners swap it in atomically
//! (`ArcSwap`). A request reads the table once; it never copies it.
//!
//! The update is incremental: only the groups that changed get a new
//! runtime, and only the ports they publish (or published) a new route, in
//! which only their host names and certificates move; a port's maps name
//! groups by uuid ([`Route`], resolved by [`RoutingTable::target`]), so a
//! group whose name, domains and ports stay (an instance attached or
//! detached, a new limit) keeps its routes. The table's maps are
//! persistent (`imbl`): the new table shares every untouched entry with the
//! previous one, so one write costs O(changed groups × log(groups)), not
//! O(state). The state machine tells which groups changed since the
//! published table's state (`AppliedState::changed_since`), and which
//! certificates: a group whose domain names a changed certificate is
//! rebuilt too, its keys taken anew ([`Changes::Certificates`]: a scan of
//! the groups' domains, 0.9 ms at 100,000 instances where rebuilding
//! everything took 57 ms). When that is unknown (the first state, a
//! snapshot installed), every group is rebuilt, still reusing the runtime
//! of what stays ([`Changes::All`]).
//!
//! Building is pure: it touches nothing the published table or its requests
//! use, and returns the new table with a list of [`Effect`]s (drain detached
//! instances, move the balancers' home) that [`publish`] runs only after
//! the swap:
//!
//! ```text
//!  State ─▶ update(state, prev, changes) ─▶ (table, effects) ─▶ routes.store(table) ─▶ run effects
//! ```
//!
//! A group whose instances (or limit) changed gets a new balancer built over
//! exactly the instances of its new runtime, so any pick on any table finds
//! its pool; a detached instance is offered by no balancer of the tables
//! published after its removal. Upstream pools live on the backend, one per
//! destination port, created on first use ([`Backend::pool`]).

mod build;
mod changes;

use std::borrow::Cow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use raft_store::model::Domain;
use raft_store::state::State;
use rustls::sign::CertifiedKey;
use uuid::Uuid;

use crate::balancer::{Backend, GroupBalancer, LoadChanged, start_drain};
use crate::tls::CertCache;
use crate::upstream::Pool;

pub use changes::{Changes, changes};

/// The table's persistent maps. They hash with FxHash, not SipHash: their
/// keys are what the operator configured (ports, host names, uuids), a
/// client's `Host` or SNI is only ever looked up in them, and SipHash was
/// a third of a request's routing (five lookups each).
pub(crate) type Map<K, V> =
    imbl::GenericHashMap<K, V, rustc_hash::FxBuildHasher, imbl::shared_ptr::DefaultSharedPtr>;

/// A group's instances by uuid, hashed with FxHash as the table's maps are.
pub type FastMap<K, V> = std::collections::HashMap<K, V, rustc_hash::FxBuildHasher>;

/// One group's runtime, shared by every port the group publishes.
#[derive(Debug)]
pub struct GroupRuntime {
    pub uuid: Uuid,
    pub name: String,
    pub balancer: Arc<GroupBalancer>,
    /// Attached instances by uuid.
    pub backends: FastMap<Uuid, Arc<Backend>>,
    /// The group's domains, as this runtime was built from.
    domains: Box<[Domain]>,
    /// The ports the group publishes.
    services: Box<[Published]>,
    /// TCP mode: the PROXY protocol header each connection to an instance
    /// starts with.
    pub send_proxy_protocol: Option<raft_store::model::ProxyVersion>,
    /// Instances detached from the group with work still in flight when it
    /// was built: held weakly, so this runtime keeps none of them alive
    /// ([`GroupRuntime::draining`] shows those still at work).
    draining: Box<[Weak<Backend>]>,
}

impl GroupRuntime {
    /// Detached instances this node still has work in flight to, until
    /// that work ends or the drain timeout cuts it.
    pub fn draining(&self) -> impl Iterator<Item = Arc<Backend>> + '_ {
        self.draining
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|b| b.local_inflight() > 0 && !b.drain_token().is_cancelled())
    }
}

/// One published port of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Published {
    port: u16,
    destination_port: u16,
    tls: bool,
    http: bool,
    redirect: bool,
}

/// One group on one published port, as a port's maps hold it: the group
/// by uuid, resolved through the table's group map when a connection or
/// request is routed ([`RoutingTable::target`]). So attaching or detaching
/// an instance, which gives the group a new runtime, replaces one entry of
/// the group map and leaves the port's maps (host names, members) alone.
#[derive(Debug)]
pub struct Route {
    pub group: Uuid,
    /// The instances' port for this published port; for a redirect port, the
    /// published TLS port that clients are sent to.
    pub destination_port: u16,
    /// Proxies to the instances (not a redirect port).
    proxies: bool,
}

/// One group on one published port, resolved: what a connection or a
/// request is served by.
#[derive(Clone, Debug)]
pub struct Target {
    pub group: Arc<GroupRuntime>,
    /// The instances' port for this published port; for a redirect port, the
    /// published TLS port that clients are sent to.
    pub destination_port: u16,
    /// Proxies to the instances (not a redirect port).
    proxies: bool,
}

impl Target {
    /// The upstream pool for `backend` on this port (created on first
    /// use): `None` on a redirect port or for a backend not in this
    /// target's group.
    pub fn pool(&self, backend: &Backend) -> Option<Arc<Pool>> {
        let ours = self
            .group
            .backends
            .get(&backend.uuid)
            .is_some_and(|b| std::ptr::eq(Arc::as_ptr(b), backend));
        (self.proxies && ours).then(|| backend.pool(self.destination_port))
    }
}

/// Everything published on one port.
#[derive(Clone, Debug)]
pub struct PortRoute {
    pub port: u16,
    pub tls: bool,
    pub http: bool,
    pub redirect: bool,
    exact: Map<String, Arc<Route>>,
    wildcard: Map<String, Arc<Route>>,
    /// The group when exactly one publishes this port: it takes every host.
    only: Option<Arc<Route>>,
    /// TLS keys by fqdn pattern (`*.example.com` stored as is).
    keys: Map<String, Arc<CertifiedKey>>,
    default_key: Option<Arc<CertifiedKey>>,
    /// Every group on this port, by name then uuid.
    members: imbl::OrdMap<(String, Uuid), Arc<Route>>,
}

impl PortRoute {
    /// The group serving `host` (an HTTP `Host` value or a TLS SNI name).
    pub fn route(&self, host: Option<&str>) -> Option<&Arc<Route>> {
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

    /// Every group on this port, in name order.
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.members.values()
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
    pub certs: &'a CertCache,
    pub drain_timeout: Duration,
    /// Raised by new groups' picks and releases, for the gossip sender.
    pub load_changed: Option<&'a Arc<LoadChanged>>,
}

/// What a new table asks of the world once it is published, in this order.
#[derive(Debug)]
pub enum Effect {
    /// An instance left: it starts draining, and balancers of older tables
    /// stop offering it (its metric series go with it).
    Drain(Arc<Backend>),
    /// A group's new balancer becomes its backends' home (see
    /// [`GroupBalancer::adopt`]).
    Adopt(Arc<GroupBalancer>),
}

impl Effect {
    fn run(self, cx: &BuildContext<'_>) {
        match self {
            Self::Drain(backend) => start_drain(&backend, cx.drain_timeout),
            Self::Adopt(balancer) => balancer.adopt(),
        }
    }
}

/// Rebuilds everything for `state` (reusing what stays), swaps it into
/// `routes`, then runs its effects.
pub fn publish(routes: &ArcSwap<RoutingTable>, state: &State, cx: &BuildContext<'_>) {
    publish_changes(routes, state, &Changes::All, cx);
}

/// Builds the table for `state` from the published one, updating what
/// `changes` names, swaps it into `routes`, then runs its effects: the one
/// way a state reaches the data plane.
pub fn publish_changes(
    routes: &ArcSwap<RoutingTable>,
    state: &State,
    changes: &Changes,
    cx: &BuildContext<'_>,
) {
    let prev = routes.load_full();
    let (table, effects) = RoutingTable::update(state, &prev, changes, cx);
    routes.store(Arc::new(table));
    for effect in effects {
        effect.run(cx);
    }
}

/// The routing table of one state.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    ports: Map<u16, Arc<PortRoute>>,
    groups: Map<Uuid, Arc<GroupRuntime>>,
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

    /// The group serving `host` on `port`, resolved in this table.
    pub fn target(&self, port: &PortRoute, host: Option<&str>) -> Option<Target> {
        let route = port.route(host)?;
        Some(Target {
            group: self.groups.get(&route.group)?.clone(),
            destination_port: route.destination_port,
            proxies: route.proxies,
        })
    }

    /// Every group's runtime.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<GroupRuntime>> {
        self.groups.values()
    }
}

#[cfg(test)]
pub(crate) mod tests;
