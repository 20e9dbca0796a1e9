//! One simulated edge node: its balancers over its own backends, and its
//! gossip state driven by the node's own schedules ([`SendSchedule`],
//! [`RefreshSchedule`]), dating ([`Arrival`]) and estimator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gossip::{Arrival, LoadTable, Merge, RefreshSchedule, Report, SendSchedule, Tracker, ViewSet};
use rand::rngs::SmallRng;
use uuid::Uuid;

use edgelb::balancer::{Backend, GroupBalancer, LoadChanged};
use edgelb::series::InstanceMetrics;

/// `n` backends whose load counters count time from `created`.
pub(super) fn backends(n: usize, created: Instant) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new_at(
                Uuid::from_u128(i as u128),
                format!("i-{i}"),
                format!("10.0.0.{i}"),
                InstanceMetrics::new(),
                created,
            ))
        })
        .collect()
}

/// One balancer per group over `backends` (instance `i` is in group
/// `i % groups`), raising `changed` on every pick and release.
pub(super) fn balancers(
    backends: &[Arc<Backend>],
    groups: usize,
    hard_limit: u32,
    changed: &Arc<LoadChanged>,
) -> Vec<Arc<GroupBalancer>> {
    (0..groups)
        .map(|g| {
            let members: Vec<Arc<Backend>> = backends
                .iter()
                .enumerate()
                .filter(|(i, _)| i % groups == g)
                .map(|(_, b)| Arc::clone(b))
                .collect();
            let balancer = Arc::new(GroupBalancer::with_changes(hard_limit, Arc::clone(changed)));
            balancer.set_backends(members);
            balancer
        })
        .collect()
}

/// A node's state; rebuilt on restart.
pub(super) struct SimNode {
    pub(super) id: u64,
    /// Taking traffic and gossiping.
    pub(super) up: bool,
    pub(super) incarnation: u64,
    pub(super) groups: Vec<Arc<GroupBalancer>>,
    /// Index = instance.
    pub(super) backends: Vec<Arc<Backend>>,
    pub(super) changed: Arc<LoadChanged>,
    pub(super) tracker: Tracker,
    pub(super) table: LoadTable,
    pub(super) send: SendSchedule,
    pub(super) refresh: RefreshSchedule,
    /// Generation of the pending send event (older ones are void), and
    /// whether it is a coalesced change rather than the heartbeat.
    pub(super) send_gen: u64,
    pub(super) coalescing: bool,
    /// Generation and time of the pending refresh event.
    pub(super) refresh_gen: u64,
    pub(super) refresh_at: Option<Instant>,
    /// The refresh's views, by group index, and the groups' instances.
    views: ViewSet<usize>,
    members: Vec<Vec<usize>>,
}

impl SimNode {
    pub(super) fn new(
        id: u64,
        incarnation: u64,
        config: &gossip::Config,
        groups: usize,
        instances: usize,
        hard_limit: u32,
        now: Instant,
    ) -> Self {
        let changed = Arc::new(LoadChanged::default());
        let backends = backends(instances, now);
        let members: Vec<Vec<usize>> = (0..groups)
            .map(|g| (0..instances).filter(|i| i % groups == g).collect())
            .collect();
        let mut views = ViewSet::default();
        for (g, m) in members.iter().enumerate() {
            let ids: Vec<[u8; 16]> = m.iter().map(|&i| backends[i].uuid.into_bytes()).collect();
            views.set_group(g, &ids);
        }
        Self {
            id,
            up: true,
            incarnation,
            groups: balancers(&backends, groups, hard_limit, &changed),
            backends,
            changed,
            tracker: Tracker::new(id, incarnation, config, now),
            table: LoadTable::new(config.ttl),
            send: SendSchedule::new(config, now),
            refresh: RefreshSchedule::new(now),
            send_gen: 0,
            coalescing: false,
            refresh_gen: 0,
            refresh_at: None,
            views,
            members,
        }
    }

    /// The refresh at `now`, as the node's refresh task does it: a snapshot
    /// of the load table, each group's view, the balancers' peer loads.
    /// Whether any peer is fresh.
    pub(super) fn refresh(&mut self, config: &gossip::Config, now: Instant) -> bool {
        let peers = self.table.snapshot();
        let (members, groups, backends) = (&self.members, &self.groups, &self.backends);
        self.views.refresh(config, &peers, now, |&g, loads| {
            let loads = members[g]
                .iter()
                .map(|&i| backends[i].as_ref())
                .zip(loads.iter().copied());
            groups[g].set_peer_loads(loads);
        })
    }

    /// Counts changed (a pick or release): when the coalesced report goes
    /// out, if this starts a new wait (the node's sender wakes on the flag
    /// and sleeps until [`SendSchedule::coalesced`]).
    pub(super) fn on_change(&mut self, now: Instant, rng: &mut SmallRng) -> Option<Instant> {
        if self.coalescing || !self.changed.is_raised() {
            return None;
        }
        self.coalescing = true;
        self.send_gen += 1;
        Some(self.send.coalesced(now, rng))
    }

    /// Builds the report due at `now` (the sender's loop body) for
    /// `targets` peers; returns it with the time of the next heartbeat.
    pub(super) fn build(
        &mut self,
        now: Instant,
        targets: usize,
        rng: &mut SmallRng,
    ) -> (Report, Instant) {
        self.changed.take();
        self.coalescing = false;
        self.send_gen += 1;
        let counters = self
            .backends
            .iter()
            .map(|b| (b.uuid.into_bytes(), b.counters()));
        let report = self.tracker.report(now, 0, counters);
        // Full reports only, and no wall clock (idle grid at multiples of
        // the idle interval from 0).
        self.send.set_targets(targets);
        self.send.sampled(now, 0, Some((&report, true)), rng);
        (report, self.send.heartbeat())
    }

    /// Merges a report received at `now` over a path with round-trip time
    /// `rtt`, as the node's intake does; returns when the refresh it asks
    /// for runs, if it moves the pending one earlier.
    pub(super) fn receive(
        &mut self,
        report: Report,
        now: Instant,
        rtt: Duration,
    ) -> Option<Instant> {
        if self.table.insert(report, Arrival::with_rtt(now, rtt)) == Merge::Stale {
            return None;
        }
        let at = self.refresh.on_report(now);
        self.schedule_refresh(at)
    }

    /// Makes `at` the pending refresh if it is earlier; returns it then.
    pub(super) fn schedule_refresh(&mut self, at: Instant) -> Option<Instant> {
        if self.refresh_at.is_some_and(|t| t <= at) {
            return None;
        }
        self.refresh_at = Some(at);
        self.refresh_gen += 1;
        Some(at)
    }
}
