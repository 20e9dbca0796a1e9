//! The clients of a chaos run: writers (attach, detach, create groups,
//! add domains)
//! through random nodes, a consistent reader, and data-plane traffic
//! through every node. Each records what it saw in the shared [`History`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::history::{History, Outcome, Read, Request, Write, WriteKind};
use crate::admin::AdminClient;
use crate::cluster::get_once;

/// The group every write attaches to (never served traffic).
pub(crate) const LEDGER: &str = "ledger";
/// Its port, and the port of the groups the writers create.
pub(crate) const LEDGER_PORT: u16 = 8090;
/// What follows a `d-…` key in the domain it names.
pub(crate) const DOMAIN_SUFFIX: &str = ".chaos.test";
/// The port that carries the data-plane traffic.
pub(crate) const WEB_PORT: u16 = 8080;
/// Where the backends listen.
pub(crate) const BACKEND_PORT: u16 = 9000;
/// The served group.
pub(crate) const WEB: &str = "web";

/// One node as the clients see it.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) admin: AdminClient,
    pub(crate) data: SocketAddr,
    /// Traffic to this node holds off while set (before a SIGTERM).
    pub(crate) paused: Arc<AtomicBool>,
    /// Data-plane requests to it in flight.
    pub(crate) inflight: Arc<AtomicUsize>,
}

/// The history shared by the clients, with the run's start.
#[derive(Debug)]
pub(crate) struct Recorder {
    pub(crate) t0: Instant,
    pub(crate) history: Mutex<History>,
}

impl Recorder {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            t0: Instant::now(),
            history: Mutex::new(History::default()),
        })
    }

    pub(crate) fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.history.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The running clients.
#[derive(Debug)]
pub(crate) struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Starts `writers` writers, one reader and traffic through every node;
    /// each stops by itself after `max` at the latest.
    pub(crate) fn start(
        rec: &Arc<Recorder>,
        nodes: &[Node],
        run: usize,
        writers: usize,
        seed: u64,
        max: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let until = Instant::now() + max;
        let seq = Arc::new(AtomicU32::new(1));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let c = Client {
                rec: rec.clone(),
                nodes: nodes.to_vec(),
                stop: stop.clone(),
                until,
                rng: SmallRng::seed_from_u64(seed ^ (w as u64 + 1)),
            };
            tasks.push(tokio::spawn(c.write_loop(run, w, seq.clone())));
        }
        let reader = Client {
            rec: rec.clone(),
            nodes: nodes.to_vec(),
            stop: stop.clone(),
            until,
            rng: SmallRng::seed_from_u64(seed ^ 0xfeed),
        };
        tasks.push(tokio::spawn(reader.read_loop()));
        for n in nodes {
            tasks.push(tokio::spawn(traffic_loop(
                rec.clone(),
                n.clone(),
                stop.clone(),
                until,
            )));
        }
        Self { stop, tasks }
    }

    /// Stops the clients and waits for them (each finishes its current
    /// request, bounded by the admin client's 10 s).
    pub(crate) async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Client {
    rec: Arc<Recorder>,
    nodes: Vec<Node>,
    stop: Arc<AtomicBool>,
    until: Instant,
    rng: SmallRng,
}

impl Client {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.until
    }

    fn pick(&mut self) -> Node {
        let i = self.rng.random_range(0..self.nodes.len());
        self.nodes[i].clone()
    }

    async fn write_loop(mut self, run: usize, writer: usize, seq: Arc<AtomicU32>) {
        let mut temps: Vec<String> = Vec::new();
        while self.running() {
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let node = self.pick();
            let roll = self.rng.random_range(0..100);
            let (key, kind, method, path, body) = if roll < 10 && !temps.is_empty() {
                let i = self.rng.random_range(0..temps.len());
                let name = temps.swap_remove(i);
                let path = format!("/v1/services/{LEDGER}/instances/{name}");
                (name, WriteKind::Detach, http::Method::DELETE, path, None)
            } else if roll < 20 {
                let name = format!("g-{run}-{writer}-{n}");
                let body = json!({
                    "name": name,
                    "services": [{"port": LEDGER_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}],
                });
                let path = "/v1/services".to_owned();
                (
                    name,
                    WriteKind::CreateGroup,
                    http::Method::POST,
                    path,
                    Some(body),
                )
            } else if roll < 30 {
                let name = format!("d-{run}-{writer}-{n}");
                let body = json!({"prop": "domains", "op": "add",
                    "value": [{"fqdn": format!("{name}{DOMAIN_SUFFIX}")}]});
                let path = format!("/v1/services/{LEDGER}");
                (
                    name,
                    WriteKind::AddDomain,
                    http::Method::PATCH,
                    path,
                    Some(body),
                )
            } else {
                let prefix = if roll < 45 { "t" } else { "k" };
                let name = format!("{prefix}-{run}-{writer}-{n}");
                let [_, a, b, c] = n.to_be_bytes();
                let address = Ipv4Addr::new(10, a, b, c).to_string();
                let body = json!({"name": name, "address": address});
                let path = format!("/v1/services/{LEDGER}/instances");
                (
                    name,
                    WriteKind::Attach,
                    http::Method::POST,
                    path,
                    Some(body),
                )
            };
            let start = self.rec.now();
            let outcome = outcome(node.admin.request(method, &path, body.as_ref()).await);
            let end = self.rec.now();
            if outcome == Outcome::Acked && kind == WriteKind::Attach && key.starts_with("t-") {
                temps.push(key.clone());
            }
            self.rec.with(|h| {
                h.writes.push(Write {
                    key,
                    kind,
                    node: node.id,
                    start,
                    end,
                    outcome,
                });
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn read_loop(mut self) {
        while self.running() {
            let node = self.pick();
            let start = self.rec.now();
            let got = node.admin.get("/v1/services?consistent=true").await;
            let end = self.rec.now();
            if let Ok((status, v)) = got
                && status.is_success()
                && let Some(groups) = v["data"]["service_groups"].as_array()
                && let Some(seen) = keys(groups)
            {
                self.rec.with(|h| {
                    h.reads.push(Read {
                        node: node.id,
                        start,
                        end,
                        seen: seen.into_iter().collect(),
                    });
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How a write's answer counts: 2xx acknowledged; another status, or a
/// refused connection (the request never left), refused; anything else
/// (a timeout, a connection lost mid-request) unknown.
pub(crate) fn outcome(answer: anyhow::Result<crate::client::Reply>) -> Outcome {
    match answer {
        Ok(r) if r.status.is_success() => Outcome::Acked,
        Ok(_) => Outcome::Refused,
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            }) =>
        {
            Outcome::Refused
        }
        Err(_) => Outcome::Unknown,
    }
}

/// The keys in `data.service_groups` of a `GET /v1/services` answer: the
/// writers' groups and the ledger's instances. Duplicates stay.
pub(crate) fn keys(groups: &[Value]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for g in groups {
        let name = g["name"].as_str()?;
        if name.starts_with("g-") {
            out.push(name.to_owned());
        }
        if name == LEDGER {
            for i in g["instances"].as_array()? {
                out.push(i["name"].as_str()?.to_owned());
            }
            for d in g["domains"].as_array()? {
                if let Some(key) = d["fqdn"].as_str()?.strip_suffix(DOMAIN_SUFFIX) {
                    out.push(key.to_owned());
                }
            }
        }
    }
    Some(out)
}

/// One `GET /` after another through `node`'s data plane until stopped.
async fn traffic_loop(rec: Arc<Recorder>, node: Node, stop: Arc<AtomicBool>, until: Instant) {
    let host = format!("{WEB}.edgelb.local");
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        if node.paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        node.inflight.fetch_add(1, Ordering::SeqCst);
        let start = rec.now();
        let ok = matches!(get_once(node.data, &host).await, Ok((200, Some(_))));
        let end = rec.now();
        node.inflight.fetch_sub(1, Ordering::SeqCst);
        rec.with(|h| {
            h.requests.push(Request {
                node: node.id,
                start,
                end,
                ok,
            });
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
