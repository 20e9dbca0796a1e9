//! A UDP relay between the nodes' cluster endpoints that applies a [`Link`]
//! per directed link: delay with jitter, loss, cut and heal, changed at run
//! time by the test. No root needed.
//!
//! ```text
//!   node i (R_i) ──▶ S_j ══ link (i→j) ══▶ U_ij ──▶ R_j (node j)
//!   node i (R_i) ◀── S_j ◀═ link (j→i) ══ U_ij ◀── R_j
//! ```
//!
//! Every node `j` advertises the relay's socket `S_j`
//! (`--advertise-cluster-addr`), so every peer dials it. The relay knows each
//! node's real (bound) cluster address `R_i`, so a datagram reaching `S_j`
//! from `R_i` is on link (i→j); it leaves through `U_ij`, one socket per
//! directed pair, so node `j` sees each peer at a distinct, stable address.
//! `j`'s answers reach `U_ij`, travel link (j→i), and leave through `S_j`,
//! the address `i` dialled: QUIC's path stays the same both ways.
//! Datagrams from unknown sources are dropped.
//!
//! Delays go through one timer queue (a heap ordered by due time) served
//! by one task, not a task per datagram.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::link::{Fate, Link};

/// What one directed link did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams sent on (after their delay).
    pub delivered: u64,
    /// Dropped because the link was cut.
    pub cut: u64,
    /// Dropped by the loss probability.
    pub lost: u64,
    /// Bytes of every datagram offered to the link (delivered, cut or
    /// lost): what the sender sent.
    pub bytes: u64,
}

/// The relay; clones share it. Its sockets close when the last clone is
/// dropped.
#[derive(Clone, Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    delay_line: mpsc::UnboundedSender<Pending>,
}

#[derive(Debug)]
struct NodeEntry {
    real: SocketAddr,
    advertised: Arc<UdpSocket>,
    advertised_addr: SocketAddr,
}

#[derive(Debug)]
struct State {
    nodes: BTreeMap<u64, NodeEntry>,
    by_real: HashMap<SocketAddr, u64>,
    /// `U_ij` by (i, j), and the IP node i's upstream sockets bind.
    upstream: HashMap<(u64, u64), Arc<UdpSocket>>,
    upstream_ip: HashMap<u64, IpAddr>,
    links: HashMap<(u64, u64), Link>,
    /// The shape of links not set one by one (also new nodes' links).
    default: Link,
    stats: HashMap<(u64, u64), LinkStats>,
    rng: SmallRng,
}

/// The relay's tasks, aborted when the last [`Relay`] clone goes.
#[derive(Debug, Default)]
struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            t.abort();
        }
    }
}

impl Tasks {
    fn push(&self, t: JoinHandle<()>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(t);
    }
}

/// A datagram waiting in the delay line.
#[derive(Debug)]
struct Pending {
    due: Instant,
    seq: u64,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    data: Bytes,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

impl Relay {
    /// A relay with no nodes yet; `seed` drives loss and jitter.
    pub fn new(seed: u64) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let relay = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    nodes: BTreeMap::new(),
                    by_real: HashMap::new(),
                    upstream: HashMap::new(),
                    upstream_ip: HashMap::new(),
                    links: HashMap::new(),
                    default: Link::default(),
                    stats: HashMap::new(),
                    rng: SmallRng::seed_from_u64(seed),
                }),
                delay_line: tx,
            }),
            tasks: Arc::new(Tasks::default()),
        };
        relay.tasks.push(tokio::spawn(delay_line(rx)));
        relay
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts node `id`, whose cluster endpoint is bound to `real`, behind
    /// the relay: binds its advertised socket on `advertise` (port 0 picks
    /// one) and its upstream sockets (towards each other node) on
    /// `upstream_ip`. Returns the address to advertise. Calling it again
    /// for a known id returns the same address.
    pub async fn add_node(
        &self,
        id: u64,
        real: SocketAddr,
        advertise: SocketAddr,
        upstream_ip: IpAddr,
    ) -> std::io::Result<SocketAddr> {
        if let Some(n) = self.state().nodes.get(&id) {
            return Ok(n.advertised_addr);
        }
        let socket = Arc::new(UdpSocket::bind(advertise).await?);
        let advertised_addr = socket.local_addr()?;
        let others: Vec<u64> = self.state().nodes.keys().copied().collect();
        // U_ij for i = id and for j = id, against every known node.
        let mut ups = Vec::new();
        for &k in &others {
            let out = UdpSocket::bind(SocketAddr::new(upstream_ip, 0)).await?;
            let k_ip = self.state().upstream_ip.get(&k).copied();
            let k_ip = k_ip.unwrap_or(upstream_ip);
            let into = UdpSocket::bind(SocketAddr::new(k_ip, 0)).await?;
            ups.push(((id, k), Arc::new(out)));
            ups.push(((k, id), Arc::new(into)));
        }
        {
            let mut st = self.state();
            st.nodes.insert(
                id,
                NodeEntry {
                    real,
                    advertised: socket.clone(),
                    advertised_addr,
                },
            );
            st.by_real.insert(real, id);
            st.upstream_ip.insert(id, upstream_ip);
            for (pair, s) in &ups {
                st.upstream.insert(*pair, s.clone());
            }
        }
        let shared = self.shared.clone();
        self.tasks
            .push(tokio::spawn(serve_advertised(shared, id, socket)));
        for ((from, to), s) in ups {
            let shared = self.shared.clone();
            self.tasks
                .push(tokio::spawn(serve_upstream(shared, from, to, s)));
        }
        Ok(advertised_addr)
    }

    /// The address node `id` advertises.
    pub fn advertised(&self, id: u64) -> Option<SocketAddr> {
        self.state().nodes.get(&id).map(|n| n.advertised_addr)
    }

    /// The ids behind the relay.
    pub fn ids(&self) -> Vec<u64> {
        self.state().nodes.keys().copied().collect()
    }

    /// Link (from → to) as it stands.
    pub fn link(&self, from: u64, to: u64) -> Link {
        let st = self.state();
        st.links.get(&(from, to)).copied().unwrap_or(st.default)
    }

    /// Sets every link, and the shape of links to nodes added later.
    pub fn set_all(&self, link: Link) {
        let mut st = self.state();
        st.links.clear();
        st.default = link;
    }

    /// Sets link (from → to).
    pub fn set(&self, from: u64, to: u64, link: Link) {
        self.state().links.insert((from, to), link);
    }

    /// Changes link (from → to) in place.
    pub fn update(&self, from: u64, to: u64, f: impl FnOnce(&mut Link)) {
        let mut st = self.state();
        let default = st.default;
        f(st.links.entry((from, to)).or_insert(default));
    }

    /// Applies `f` to every directed link between known nodes.
    pub fn update_all(&self, mut f: impl FnMut(u64, u64, &mut Link)) {
        let ids = self.ids();
        let mut st = self.state();
        let default = st.default;
        for &a in &ids {
            for &b in &ids {
                if a != b {
                    f(a, b, st.links.entry((a, b)).or_insert(default));
                }
            }
        }
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: u64) {
        self.update_all(|a, b, l| {
            if a == id || b == id {
                l.up = false;
            }
        });
    }

    /// Cuts every link between nodes of different `groups` and restores
    /// the links within a group; a node in no group is a group of its own.
    pub fn partition(&self, groups: &[&[u64]]) {
        let group_of = |id: u64| groups.iter().position(|g| g.contains(&id));
        self.update_all(|a, b, l| {
            l.up = matches!((group_of(a), group_of(b)), (Some(x), Some(y)) if x == y);
        });
    }

    /// Every link up and without loss; delays stay (they are the network,
    /// not a fault).
    pub fn heal_all(&self) {
        self.update_all(|_, _, l| {
            l.up = true;
            l.loss = 0.0;
        });
        let mut st = self.state();
        st.default.up = true;
        st.default.loss = 0.0;
    }

    /// Every link, and those of nodes added later, delayed by `delay` ±
    /// `jitter` one way.
    pub fn delay_all(&self, delay: Duration, jitter: Duration) {
        self.update_all(|_, _, l| {
            l.delay = delay;
            l.jitter = jitter;
        });
        let mut st = self.state();
        st.default.delay = delay;
        st.default.jitter = jitter;
    }

    /// What link (from → to) did so far.
    pub fn stats(&self, from: u64, to: u64) -> LinkStats {
        self.state()
            .stats
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }
}

/// Decides a datagram on (from → to) and queues it to leave through
/// `socket` to `dest`.
fn forward(
    shared: &Shared,
    from: u64,
    to: u64,
    socket: Arc<UdpSocket>,
    dest: SocketAddr,
    data: &[u8],
) {
    let fate = {
        let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        let link = st.links.get(&(from, to)).copied().unwrap_or(st.default);
        let fate = link.fate(&mut st.rng);
        let stats = st.stats.entry((from, to)).or_default();
        stats.bytes += data.len() as u64;
        match fate {
            Fate::Deliver(_) => stats.delivered += 1,
            Fate::Cut => stats.cut += 1,
            Fate::Lost => stats.lost += 1,
        }
        fate
    };
    let Fate::Deliver(after) = fate else { return };
    let data = Bytes::copy_from_slice(data);
    if after.is_zero() {
        // Not awaited: UDP sends on loopback do not block, and a full
        // buffer is a drop like any other.
        let _ = socket.try_send_to(&data, dest);
        return;
    }
    let _ = shared.delay_line.send(Pending {
        due: Instant::now() + after,
        seq: 0,
        socket,
        to: dest,
        data,
    });
}

/// Datagrams to node `to`'s advertised socket: from a known node's real
/// address `R_i`, on link (i → to).
async fn serve_advertised(shared: Arc<Shared>, to: u64, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, src)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let route = {
            let st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.by_real.get(&src).and_then(|&from| {
                let up = st.upstream.get(&(from, to))?.clone();
                Some((from, up, st.nodes.get(&to)?.real))
            })
        };
        if let Some((from, up, dest)) = route {
            forward(&shared, from, to, up, dest, &buf[..n]);
        }
    }
}

/// Answers from node `to` on `U_(from,to)`: link (to → from), out through
/// `S_to` to `R_from`.
async fn serve_upstream(shared: Arc<Shared>, from: u64, to: u64, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, src)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let route = {
            let st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            let target = st.nodes.get(&to);
            let origin = st.nodes.get(&from);
            match (target, origin) {
                (Some(t), Some(o)) if t.real == src => Some((t.advertised.clone(), o.real)),
                _ => None,
            }
        };
        if let Some((out, dest)) = route {
            forward(&shared, to, from, out, dest, &buf[..n]);
        }
    }
}

/// The timer queue: sends each delayed datagram when it is due.
async fn delay_line(mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut heap: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = heap.peek().map(|p| p.0.due);
        let wait = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(mut p) => {
                    // Equal due times leave in arrival order.
                    seq += 1;
                    p.seq = seq;
                    heap.push(Reverse(p));
                }
                None => return,
            },
            () = wait => {
                let now = Instant::now();
                while heap.peek().is_some_and(|p| p.0.due <= now) {
                    if let Some(Reverse(p)) = heap.pop() {
                        let _ = p.socket.try_send_to(&p.data, p.to);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
