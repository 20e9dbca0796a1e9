//! Load gossip on a node: tells every peer what this node has in flight
//! per instance, and turns the peers' reports into each backend's peer load
//! (SPEC §3 "Stale load", §5 "Gossip").
//!
//! ```text
//!  data plane: pick / release ─▶ Backend LoadCounters (atomics)
//!        │ raise LoadChanged (once per report, never per request); a
//!        │ backend's first pick registers it there
//!        ▼
//!  sender ── at most every gossip_min_interval while counts change, and a
//!   │        heartbeat every gossip_interval (both ±20 %): Tracker samples
//!   │        the registered backends still attached ─▶ Report ─▶ DeltaEncoder: the full
//!   │        report, and a delta on the previous one unless a full one is
//!   │        due (at least every gossip_interval) ─▶ watch (latest)
//!   ▼
//!  links: one task per peer (Raft membership minus this node): its own QUIC
//!   │     connection (edgelb-gossip/2 or /1); datagram or unidirectional stream
//!   ▼
//!  peer's transport ─▶ Gossip::report ─▶ LoadTable (mutex, gossip tasks and
//!                                        admin reads only; as_of = receipt
//!                                        less RTT/2: gossip::Arrival)
//!                                            │ wakes
//!                                            ▼
//!  refresh: every few ms while a peer is fresh, and after each report
//!           (throttled): LoadTable::snapshot (brief lock) ─▶ ViewSet: each
//!           new report resolved once into flat terms, every term added
//!           into flat sums and only groups with load estimated
//!           (refresh.rs, no lock shared with intake)
//!           ─▶ GroupBalancer::set_peer_loads (fixed point)
//! ```
//!
//! The data plane never takes a lock for gossip: picks and releases bump
//! atomics, and the sender reads them. A report carries this node's absolute
//! counts, all of them or (a delta) those that changed since the previous
//! report, with a full one at least every `gossip_interval`; a lost report
//! costs freshness only (a delta whose base was lost is dropped until the
//! next full one); the receiver keeps each
//! peer's newest by `(incarnation, seq)`, the incarnation being the start
//! time in ms (a restart replaces the old counts at once). Reports are dated
//! by their age at the sender (receipt less half the connection's RTT:
//! time in transit counts) and expire `gossip_ttl` after that, so a dead or silent peer's load fades
//! out; a peer that leaves the membership is forgotten at once.

mod aggregator;
mod links;
mod refresh;
mod sender;

pub(crate) use sender::Published;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::gossip::{Arrival, Entry, LoadTable, Merge, Plan, Reassembler, Tracker, Wire};
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use crate::balancer::{Backend, LoadChanged};
use crate::cluster::{Dropped, GossipHandler, Transport};
use crate::dataplane::DataPlane;
use crate::metrics::Metrics;
use crate::routing::GroupRuntime;
use crate::store::{ClusterStatus, Store};

/// A peer to gossip with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its cluster address (`host:port`).
    pub addr: String,
    /// Its region.
    pub region: String,
}

/// The peers to gossip with: the Raft membership minus this node.
pub type Peers = BTreeMap<u64, Peer>;

/// The gossip groups of this node and its peers, for the gossip plan:
/// their regions, or cells of a large region (`gossip::cells`).
#[derive(Debug, Default)]
struct Fleet {
    /// This node's configured region.
    home: String,
    /// This node's group.
    region: String,
    /// Every peer's group.
    regions: HashMap<u64, String>,
}

/// A node's gossip state: the peers' newest reports and what the admin API
/// and metrics read from them. Incoming reports arrive through its
/// [`GossipHandler`] implementation; [`spawn`] runs the rest.
pub struct Gossip {
    node_id: u64,
    config: ::gossip::Config,
    table: Mutex<LoadTable>,
    /// Each peer's state as its delta reports build it.
    chains: Mutex<Reassembler>,
    /// The refresh's state (never locked by report intake).
    views: Mutex<refresh::Views>,
    fleet: Mutex<Fleet>,
    /// This node's latest own report's entries, for its region's aggregate.
    own: Mutex<Arc<Vec<Entry>>>,
    /// Wakes the aggregator: this node's or a region peer's counts changed.
    region_changed: Notify,
    /// Wakes the refresh task when a report was merged.
    report_arrived: Notify,
    /// A peer's report came with a newer incarnation: it restarted, and
    /// the connections to its old process are dead (the links reconnect).
    restarted: broadcast::Sender<u64>,
    dataplane: Arc<DataPlane>,
    metrics: Arc<Metrics>,
    /// `gossip_estimator = "local"`: peers' reports are not used.
    local_only: bool,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip")
            .field("node_id", &self.node_id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gossip {
    pub fn new(
        node_id: u64,
        config: ::gossip::Config,
        dataplane: Arc<DataPlane>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node_id,
            table: Mutex::new(LoadTable::new(config.ttl)),
            chains: Mutex::new(Reassembler::with_ttl(config.ttl)),
            views: Mutex::new(refresh::Views::default()),
            fleet: Mutex::new(Fleet::default()),
            own: Mutex::new(Arc::default()),
            region_changed: Notify::new(),
            config,
            report_arrived: Notify::new(),
            restarted: broadcast::Sender::new(64),
            dataplane,
            metrics,
            local_only: false,
        }
    }

    /// A node that does not use its peers' reports (`gossip_estimator =
    /// "local"`): they are counted in bytes and dropped, so selection
    /// compares this node's own counts only. It still reports its own.
    pub fn local_only(mut self, local: bool) -> Self {
        self.local_only = local;
        self
    }

    /// Peers heard with a new incarnation, as they are heard.
    pub(crate) fn restarts(&self) -> broadcast::Receiver<u64> {
        self.restarted.subscribe()
    }

    /// The incarnation of `peer`'s newest report kept.
    pub(crate) fn incarnation(&self, peer: u64) -> Option<u64> {
        self.lock().incarnation(peer)
    }

    pub fn config(&self) -> &::gossip::Config {
        &self.config
    }

    /// Each fresh peer's part of the load of every instance of `group`, by
    /// instance uuid (every fresh peer listed, 0 included): the peer load
    /// that selection uses, rounded to a whole count, split in proportion to
    /// each peer's estimated part at `now`.
    pub fn peer_parts(
        &self,
        group: &GroupRuntime,
        now: Instant,
    ) -> HashMap<Uuid, BTreeMap<u64, u64>> {
        let backends: Vec<&Arc<Backend>> = group.backends.values().collect();
        let ids: Vec<[u8; 16]> = backends.iter().map(|b| b.uuid.into_bytes()).collect();
        let totals: Vec<u64> = backends.iter().map(|b| b.peer_load()).collect();
        // A copy, estimated outside the lock: report intake and the refresh
        // do not wait for a group of 100,000 instances to be split.
        let table = self.lock().clone();
        let parts = self
            .config
            .estimator
            .split_by_peer(&table, &ids, &totals, now);
        backends
            .into_iter()
            .zip(parts)
            .map(|(backend, parts)| (backend.uuid, parts))
            .collect()
    }

    /// Age of the newest report of `peer`; `None` when it has not reported
    /// (or is this node).
    pub fn last_report_age(&self, peer: u64, now: Instant) -> Option<Duration> {
        self.lock().last_report_age(peer, now)
    }

    /// Every peer that has reported, with the age of its newest report.
    pub fn report_ages(&self, now: Instant) -> Vec<(u64, Duration)> {
        self.lock().report_ages(now).collect()
    }

    /// Sets every backend's peer load from the fresh reports at `now`.
    /// Returns whether any fresh peer reports load (else every peer load
    /// is now 0).
    pub fn refresh(&self, now: Instant) -> bool {
        refresh::apply(self, now)
    }

    /// Takes the membership in: forgets the reports of peers not in
    /// `peers`, and notes everyone's gossip group (region or cell).
    pub(crate) fn set_peers(&self, peers: &Peers) {
        {
            let mut fleet = locked(&self.fleet);
            let mut groups = ::gossip::cells(
                peers
                    .iter()
                    .map(|(&id, p)| (id, p.region.as_str()))
                    .chain([(self.node_id, fleet.home.as_str())]),
            );
            fleet.region = groups.remove(&self.node_id).unwrap_or_default();
            fleet.regions = groups.into_iter().collect();
        }
        self.lock().retain_peers(|id| peers.contains_key(&id));
        locked(&self.chains).retain_peers(|id| peers.contains_key(&id));
    }

    /// Whom this node sends what, given `peers` and which region peers
    /// look alive at `now`: a fresh report, or an empty one within
    /// `gossip::quiet_alive` (an idle peer repeats it only that rarely).
    fn plan(&self, peers: &Peers, now: Instant) -> Plan {
        let fleet = locked(&self.fleet);
        let table = self.lock();
        let ttl = table.ttl();
        let quiet = ::gossip::quiet_alive(&self.config);
        let members = peers
            .keys()
            .filter_map(|id| fleet.regions.get(id).map(|g| (*id, g.as_str())))
            .chain([(self.node_id, fleet.region.as_str())]);
        ::gossip::plan(self.node_id, members, |id| {
            let within = if table.entry_count(id) == Some(0) {
                quiet
            } else {
                ttl
            };
            table
                .last_report_age(id, now)
                .is_some_and(|age| age <= within)
        })
    }

    /// This node's region peers with a fresh report at `now` (what
    /// [`Gossip::region_sum`] sums), and whether that is every one of them.
    fn fresh_region_peers(&self, now: Instant) -> (Vec<u64>, bool) {
        let fleet = locked(&self.fleet);
        let table = self.lock();
        let ttl = table.ttl();
        let mut all = true;
        let fresh = fleet
            .regions
            .iter()
            .filter(|&(_, r)| *r == fleet.region)
            .filter_map(|(&id, _)| {
                let fresh = table.last_report_age(id, now).is_some_and(|age| age <= ttl);
                all &= fresh;
                fresh.then_some(id)
            })
            .collect();
        (fresh, all)
    }

    /// This node's region's load: its own latest report and those of
    /// `peers` (its fresh region peers), summed, over the instances of
    /// this node's groups. A peer's entry for an instance in none of them
    /// (not yet applied here, or made up) is left out: a peer listing a
    /// hundred thousand made-up instances would otherwise push the sum
    /// past what a report may carry, and no aggregate would go out.
    fn region_sum(&self, peers: &[u64]) -> Vec<Entry> {
        let own = Arc::clone(&locked(&self.own));
        let mut sum = {
            let chains = locked(&self.chains);
            let held = peers.iter().filter_map(|&id| chains.held(id));
            ::gossip::aggregate(std::iter::once(own.as_slice()).chain(held))
        };
        let mut views = locked(&self.views);
        views.take_groups(&self.dataplane.routes);
        sum.retain(|e| views.knows(&e.instance));
        sum
    }

    fn lock(&self) -> MutexGuard<'_, LoadTable> {
        // Merges leave the table consistent; nothing panics while it is held.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl GossipHandler for Gossip {
    fn report(&self, report: Wire, bytes: usize, arrival: Arrival) {
        let m = &self.metrics.gossip;
        m.bytes_rx.inc_by(bytes as u64);
        if self.local_only {
            return;
        }
        // Only members gossip: a node removed from the cluster keeps a
        // valid certificate, but its reports count for nothing. The
        // membership is held until the report is in the table (fleet, then
        // table, as the plan takes them): `set_peers` changes it before it
        // prunes, so a removal either comes first and this drops the
        // report, or its prune comes after the insert.
        let fleet = locked(&self.fleet);
        if !fleet.regions.contains_key(&report.node_id()) {
            return m.dropped("member");
        }
        // A delta becomes the full report it stands for.
        let applied = locked(&self.chains).apply(report);
        let Ok(report) = applied else {
            debug!(bytes, "delta report without its base: dropped");
            return m.dropped("gap");
        };
        let peer = report.node_id;
        let incarnation = report.incarnation;
        let empty = report.entries.is_empty();
        // What the wall clocks say of the transit, when it is longer than
        // RTT/2: the time a report waited for either end's CPU counts too.
        let arrival = arrival.with_sender_clock(report.sent_at_ms, unix_ms(), self.config.ttl / 2);
        // A report from another region is that region's aggregate.
        let (remote, regions) = match fleet.regions.get(&peer) {
            Some(r) if *r != fleet.region => {
                let same: Vec<u64> = fleet
                    .regions
                    .iter()
                    .filter(|&(&id, other)| other == r && id != peer)
                    .map(|(&id, _)| id)
                    .collect();
                (true, same)
            }
            _ => (false, Vec::new()),
        };
        let (merged, before, was_empty) = {
            let mut table = self.lock();
            let before = table.incarnation(peer);
            let was_empty = table.entry_count(peer).is_none_or(|n| n == 0);
            let merged = table.insert(report, arrival);
            if merged == Merge::Accepted && remote {
                // The latest aggregate of a region stands for all of it:
                // another member's (the plan moved) goes. Under the same
                // lock as the insert: apart, a refresh could see the
                // region twice, and two members' aggregates arriving
                // together could each remove the other's (none left).
                for id in regions {
                    table.remove_peer(id);
                }
            }
            (merged, before, was_empty)
        };
        drop(fleet);
        match merged {
            Merge::Accepted => {
                m.received.inc();
                // An idle peer's heartbeat changes no estimate: the refresh
                // (and the aggregator, for a region peer) is not woken for
                // it.
                if !(empty && was_empty) {
                    if !remote {
                        self.region_changed.notify_one();
                    }
                    self.report_arrived.notify_one();
                }
                if before.is_some_and(|b| b != incarnation) {
                    debug!(peer, incarnation, "peer restarted");
                    let _ = self.restarted.send(peer);
                }
            }
            Merge::Stale => m.dropped("stale"),
        }
    }

    fn dropped(&self, reason: Dropped, bytes: usize) {
        let m = &self.metrics.gossip;
        m.bytes_rx.inc_by(bytes as u64);
        m.dropped(reason.label());
    }
}

/// The reports links send: this node's own, and its region's aggregate.
#[derive(Clone, Debug)]
struct Streams {
    own: Arc<watch::Sender<Option<Arc<Published>>>>,
    aggregate: Arc<watch::Sender<Option<Arc<Published>>>>,
}

impl Streams {
    /// What decides whether an idle node's aggregate keeps heartbeating
    /// every `gossip_interval` (`gossip::SendSchedule::set_targets`): it
    /// does while both streams have few peers, that is while its region is
    /// small too. A member of a large region sends its aggregate to a peer
    /// or two of another region or cell only, and counted alone that
    /// stream heartbeated ten times a second in an idle fleet. The own
    /// reports' pace is decided by their own peers.
    fn aggregate_targets(&self) -> usize {
        self.own
            .receiver_count()
            .max(self.aggregate.receiver_count())
    }
}

/// What [`spawn`] needs besides the [`Gossip`] state.
#[derive(Debug)]
pub struct Wiring {
    /// Sends reports, and hands incoming ones to the `Gossip` (set with
    /// [`Transport::set_gossip_handler`] by [`spawn`]).
    pub transport: Arc<Transport>,
    /// The peers, kept up to date (see [`membership`]).
    pub peers: watch::Receiver<Peers>,
    /// Raised by the data plane's picks and releases.
    pub load_changed: Arc<LoadChanged>,
    /// This start's incarnation ([`incarnation`]).
    pub incarnation: u64,
    /// This node's region.
    pub region: String,
}

/// The running gossip tasks; stop them with [`GossipTasks::stop`].
#[derive(Debug, Default)]
pub struct GossipTasks {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl GossipTasks {
    /// Stops gossiping: the tasks end and the peer connections close.
    pub async fn stop(self) {
        self.cancel.cancel();
        // A link may be waiting on a handshake to a peer that is gone:
        // nothing is lost by cutting it short.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Stops at once, without waiting.
    pub fn abort(self) {
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Adds a task that stops on the same token (e.g. the [`membership`]
    /// feed), so that it is waited for or aborted with the others.
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }
}

/// Starts gossiping: the sender, one link per peer, and the refresh task,
/// until `cancel` (or [`GossipTasks::stop`]).
pub fn spawn(gossip: Arc<Gossip>, wiring: Wiring, cancel: CancellationToken) -> GossipTasks {
    {
        let mut fleet = locked(&gossip.fleet);
        fleet.home = wiring.region.clone();
        fleet.region = wiring.region;
    }
    wiring.transport.set_gossip_handler(gossip.clone());
    let tracker = Tracker::new(
        gossip.node_id,
        wiring.incarnation,
        &gossip.config,
        Instant::now(),
    );
    let streams = Streams {
        own: Arc::new(watch::channel(None).0),
        aggregate: Arc::new(watch::channel(None).0),
    };
    let tasks = vec![
        tokio::spawn(sender::run(
            gossip.clone(),
            tracker,
            wiring.load_changed,
            streams.clone(),
            cancel.clone(),
        )),
        tokio::spawn(aggregator::run(
            gossip.clone(),
            wiring.incarnation,
            streams.clone(),
            cancel.clone(),
        )),
        tokio::spawn(links::run(
            gossip.clone(),
            wiring.transport,
            wiring.peers,
            streams,
            cancel.clone(),
        )),
        tokio::spawn(refresh::run(gossip, cancel.clone())),
    ];
    GossipTasks { cancel, tasks }
}

/// The Raft membership minus this node, as `store` sees it, kept up to date
/// until `cancel`.
pub fn membership(
    store: Arc<Store>,
    cancel: CancellationToken,
) -> (watch::Receiver<Peers>, JoinHandle<()>) {
    let mut raft = store.raft().metrics();
    // Raft's metrics change with every heartbeat and write, the peers only
    // with the membership: its log id says when to look (building the
    // status clones every member, which at every heartbeat was a large
    // share of an idle node's CPU).
    let mut seen = *raft.borrow_and_update().membership_config.log_id();
    let (tx, rx) = watch::channel(peers_of(&store.status()));
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = raft.changed() => if changed.is_err() { return },
            }
            let now = *raft.borrow_and_update().membership_config.log_id();
            if now == seen {
                continue;
            }
            seen = now;
            let peers = peers_of(&store.status());
            tx.send_if_modified(|p| {
                let changed = *p != peers;
                if changed {
                    *p = peers;
                }
                changed
            });
        }
    });
    (rx, task)
}

fn peers_of(status: &ClusterStatus) -> Peers {
    status
        .members
        .iter()
        .filter(|m| m.node_id != status.node_id)
        .map(|m| {
            let peer = Peer {
                addr: m.node.cluster_addr.clone(),
                region: m.node.region.clone(),
            };
            (m.node_id, peer)
        })
        .collect()
}

/// A new incarnation: the wall clock in ms, which grows across restarts (a
/// clock that stepped back costs one `gossip_ttl` of deafness at the peers,
/// see [`LoadTable`]).
pub fn incarnation() -> u64 {
    unix_ms()
}

/// Locks `m`; the gossip state's mutexes guard plain data that no panic
/// leaves half-updated.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
