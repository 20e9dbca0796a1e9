//! Published ports: one accept loop per port and data-plane worker, bound
//! and released as the routing table's ports come and go.
//!
//! Each worker binds the port itself (`SO_REUSEPORT`), after a probe bind
//! without that option has shown that no other socket holds the port (so a
//! second node on the same address fails to bind, as it would without the
//! option). An accept loop only accepts and hands off to its own worker; each connection reads the
//! routing table current at that moment to learn the port's mode (TLS or
//! not, HTTP or TCP) and its groups, so changing a port's groups never
//! rebinds it. A port that cannot be bound (in use) is logged (again only
//! when its error changes), keeps `/readyz` at 503 naming it
//! ([`Readiness`]), and is retried every [`BIND_RETRY`]. At most
//! `max_published_ports` ports are bound (each takes two descriptors per
//! worker, budgeted in `crate::limits`): the ports past it, in port order
//! after those already bound, wait unbound the same way, so that no
//! number of published ports can take the descriptors connections need.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, error, info, warn};

use crate::dataplane::{ConnInfo, DataPlane};
use crate::routing::RoutingTable;
use crate::workers::{Connection, Workers};

/// The set of bound published ports.
#[derive(Debug)]
pub struct Listeners {
    ip: IpAddr,
    dp: Arc<DataPlane>,
    limit: Arc<Semaphore>,
    /// Cancelled on node shutdown: stops accepting and drains connections.
    shutdown: CancellationToken,
    active: HashMap<u16, Active>,
    /// Where connections run; dropped (stopped) with the listeners.
    workers: Workers,
    /// A copy of each bound port's listeners, for a new process that takes
    /// them over ([`crate::upgrade`]).
    sockets: SocketCopies,
    /// Listeners taken over from the process this one replaces, by port:
    /// used instead of binding, until the first reconcile.
    inherited: BTreeMap<u16, Vec<std::net::TcpListener>>,
    /// Why each port that failed to bind last time did (logged once).
    failing: HashMap<u16, String>,
    /// The ports over `max_published_ports` at the last reconcile.
    over: Vec<u16>,
}

/// The published ports a reconcile left unbound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unbound {
    /// Binding them failed (in use, say).
    pub failed: Vec<u16>,
    /// Past `max_published_ports`: not tried.
    pub over: Vec<u16>,
}

impl Unbound {
    /// Whether every published port is bound.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty() && self.over.is_empty()
    }
}

/// What `/readyz` reads of the data plane (SPEC §6: state loaded,
/// listeners bound): whether the first state was applied, and the
/// published ports that could not be bound at the last attempt.
#[derive(Debug, Default)]
pub struct Readiness {
    loaded: AtomicBool,
    unbound: std::sync::Mutex<Unbound>,
}

impl Readiness {
    /// The first state was applied to the data plane.
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// The published ports the last reconcile left unbound (none: all
    /// bound).
    pub fn set_unbound(&self, ports: &Unbound) {
        let mut unbound = self
            .unbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        unbound.clone_from(ports);
    }

    /// `None` when the data plane is ready, else why not (one line).
    pub fn problem(&self) -> Option<String> {
        if !self.loaded.load(Ordering::Acquire) {
            return Some("not ready: state not loaded yet".to_owned());
        }
        let unbound = self
            .unbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = |ports: &[u16]| {
            let shown: Vec<String> = ports.iter().take(20).map(u16::to_string).collect();
            match ports.len() {
                n if n > 20 => format!("{} and {} more", shown.join(", "), n - 20),
                _ => shown.join(", "),
            }
        };
        let mut why = Vec::new();
        if !unbound.failed.is_empty() {
            why.push(format!(
                "published port {} cannot be bound (retried every {} s)",
                list(&unbound.failed),
                BIND_RETRY.as_secs()
            ));
        }
        if !unbound.over.is_empty() {
            why.push(format!(
                "published port {} not bound: more ports than max_published_ports",
                list(&unbound.over)
            ));
        }
        (!why.is_empty()).then(|| format!("not ready: {}", why.join("; ")))
    }
}

/// How often the ports that could not be bound are tried again.
pub const BIND_RETRY: Duration = Duration::from_secs(2);

/// A copy of each bound published port's listeners (one per worker).
pub type SocketCopies = Arc<std::sync::Mutex<BTreeMap<u16, Vec<OwnedFd>>>>;

#[derive(Debug)]
struct Active {
    stop: CancellationToken,
    addr: SocketAddr,
    /// The port's accept loops, one per listener.
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Listeners {
    pub fn new(
        ip: IpAddr,
        dp: Arc<DataPlane>,
        shutdown: CancellationToken,
        workers: Workers,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(dp.settings.max_connections));
        Self {
            ip,
            dp,
            limit,
            shutdown,
            active: HashMap::new(),
            workers,
            sockets: SocketCopies::default(),
            inherited: BTreeMap::new(),
            failing: HashMap::new(),
            over: Vec::new(),
        }
    }

    /// Serves the ports `inherited` holds listeners for on those listeners
    /// (taken over from the process this one replaces) rather than on
    /// sockets of its own; listeners on another address are closed.
    #[must_use]
    pub fn inherit(mut self, inherited: BTreeMap<u16, Vec<std::net::TcpListener>>) -> Self {
        self.inherited = inherited
            .into_iter()
            .map(|(port, ls)| {
                let addr = SocketAddr::new(self.ip, port);
                let ls: Vec<_> = ls
                    .into_iter()
                    .filter(|l| crate::upgrade::bound_to(l, addr))
                    .collect();
                (port, ls)
            })
            .filter(|(_, ls)| !ls.is_empty())
            .collect();
        self
    }

    /// The copy of the bound ports' listeners that a new process takes
    /// over.
    pub fn sockets(&self) -> SocketCopies {
        self.sockets.clone()
    }

    /// Binds the ports `table` publishes that are not bound yet, up to
    /// `max_published_ports` bound, and releases the ones it no longer
    /// publishes. Returns the ports left unbound.
    pub fn reconcile(&mut self, table: &RoutingTable) -> Unbound {
        let wanted: BTreeSet<u16> = table.ports().map(|p| p.port).collect();
        self.active.retain(|port, a| {
            let keep = wanted.contains(port);
            if !keep {
                info!(addr = %a.addr, "released published port");
                a.stop.cancel();
            }
            keep
        });
        let mut sockets = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sockets.retain(|port, _| wanted.contains(port));
        // Taken-over listeners serve their ports now or never: the ones
        // left are closed (the process they came from still holds its own
        // until it exits).
        let mut inherited = std::mem::take(&mut self.inherited);
        self.failing.retain(|port, _| wanted.contains(port));
        let mut unbound = Unbound::default();
        // Under max_published_ports the bound ports stay, then the ports
        // taken over from the process this one replaces (an upgrade keeps
        // serving what was served), then the lowest.
        let (taken, rest): (Vec<u16>, Vec<u16>) =
            wanted.into_iter().partition(|p| inherited.contains_key(p));
        for port in taken.into_iter().chain(rest) {
            if self.active.contains_key(&port) {
                continue;
            }
            if self.active.len() >= self.dp.settings.max_published_ports {
                self.failing.remove(&port);
                unbound.over.push(port);
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            let bound = match inherited.remove(&port) {
                Some(taken) => adopt(addr, taken, &self.workers),
                None => bind(addr, &self.workers),
            };
            match bound {
                Ok(listeners) => {
                    self.failing.remove(&port);
                    info!(%addr, listeners = listeners.len(), "bound published port");
                    let copies = listeners
                        .iter()
                        .map(|(l, _)| l.as_fd().try_clone_to_owned())
                        .collect::<std::io::Result<Vec<_>>>();
                    match copies {
                        Ok(c) => {
                            sockets.insert(port, c);
                        }
                        Err(e) => {
                            warn!(%addr, error = %e, "no copy of the listeners for an upgrade")
                        }
                    }
                    let stop = self.shutdown.child_token();
                    let handles = self.workers.handles();
                    let loops = listeners
                        .into_iter()
                        .map(|(listener, worker)| {
                            handles[worker].spawn(accept_loop(
                                listener,
                                port,
                                self.dp.clone(),
                                self.limit.clone(),
                                stop.clone(),
                                self.shutdown.clone(),
                            ))
                        })
                        .collect();
                    self.active.insert(port, Active { stop, addr, loops });
                }
                Err(e) => {
                    let why = e.to_string();
                    if self.failing.get(&port) == Some(&why) {
                        debug!(%addr, error = %e, "cannot bind published port; will retry");
                    } else {
                        error!(%addr, error = %e, "cannot bind published port; will retry");
                        self.failing.insert(port, why);
                    }
                    unbound.failed.push(port);
                }
            }
        }
        unbound.over.sort_unstable();
        unbound.failed.sort_unstable();
        if unbound.over != self.over {
            if !unbound.over.is_empty() {
                warn!(
                    unbound = unbound.over.len(),
                    first = unbound.over[0],
                    max_published_ports = self.dp.settings.max_published_ports,
                    "published ports over max_published_ports are not bound"
                );
            }
            self.over.clone_from(&unbound.over);
        }
        unbound
    }

    /// Resolves when every accept loop has stopped (the shutdown cancels
    /// them) and then every client connection has closed. The wait for
    /// connections holds the connection slots it gets: a loop still
    /// accepting meanwhile would find none and drop what it accepted.
    pub async fn drained(&mut self) {
        // The copies kept for an upgrade would keep the ports listening
        // (the kernel completing handshakes nobody accepts).
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for active in self.active.values_mut() {
            for l in active.loops.drain(..) {
                let _ = l.await;
            }
        }
        let all = u32::try_from(self.dp.settings.max_connections).unwrap_or(u32::MAX);
        let _ = self.limit.acquire_many(all).await;
    }

    /// Addresses of the bound ports.
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.active.values().map(|a| a.addr).collect()
    }
}

/// One listener on `addr` per worker, each registered with its worker's
/// reactor, with the worker's index.
fn bind(addr: SocketAddr, workers: &Workers) -> std::io::Result<Vec<(TcpListener, usize)>> {
    // Without SO_REUSEPORT this fails if anything holds the port, including
    // another node's reuse-port group.
    drop(socket(addr, false)?);
    bind_from(addr, workers, 0)
}

/// Listeners (`SO_REUSEPORT`) on `addr` for the workers from `first` on.
fn bind_from(
    addr: SocketAddr,
    workers: &Workers,
    first: usize,
) -> std::io::Result<Vec<(TcpListener, usize)>> {
    workers
        .handles()
        .iter()
        .enumerate()
        .skip(first)
        .map(|(i, worker)| {
            let _in_worker = worker.enter();
            Ok((socket(addr, true)?.listen(4096)?, i))
        })
        .collect()
}

/// Serves `addr` on listeners taken over from another process: the
/// workers take them in turn (a worker may get several when the other
/// process had more), and workers left without one bind their own into
/// the same `SO_REUSEPORT` group. Every listener of the group is served,
/// so no connection waits in a queue nobody accepts from.
fn adopt(
    addr: SocketAddr,
    taken: Vec<std::net::TcpListener>,
    workers: &Workers,
) -> std::io::Result<Vec<(TcpListener, usize)>> {
    let handles = workers.handles();
    let count = taken.len();
    let mut listeners = taken
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let worker = i % handles.len();
            let _in_worker = handles[worker].enter();
            l.set_nonblocking(true)?;
            Ok((TcpListener::from_std(l)?, worker))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners.extend(bind_from(addr, workers, count)?);
    Ok(listeners)
}

fn socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse_port)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    dp: Arc<DataPlane>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let tls_http = TlsAcceptor::from(server_config(port, dp.routes.clone(), true));
    let tls_tcp = TlsAcceptor::from(server_config(port, dp.routes.clone(), false));
    let acceptors = Arc::new((tls_http, tls_tcp));
    // Fixed for the port: read once, not per connection.
    let proxied = dp.settings.accept_proxy_protocol.contains(&port);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                warn!(port, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(port, %peer, "connection limit reached; refusing");
            continue;
        };
        let permit = Connection::new(permit);
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            port,
            tls: false,
            accepted: crate::dataplane::Accepted::now(),
        };
        if proxied {
            handle_proxied(stream, conn, &dp, &acceptors, permit, &shutdown);
        } else {
            dispatch(stream, conn, &dp, &acceptors, permit, &shutdown);
        }
    }
}

/// Starts serving a connection on an `accept_proxy_protocol` port once
/// its PROXY header has been read.
fn handle_proxied(
    stream: TcpStream,
    conn: ConnInfo,
    dp: &Arc<DataPlane>,
    acceptors: &Arc<(TlsAcceptor, TlsAcceptor)>,
    permit: Connection<OwnedSemaphorePermit>,
    shutdown: &CancellationToken,
) {
    let (dp, acceptors, shutdown) = (dp.clone(), acceptors.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Some((stream, conn)) = proxied(stream, conn, &dp).await {
            dispatch(stream, conn, &dp, &acceptors, permit, &shutdown);
        }
    });
}

/// Takes the PROXY header off a connection on an `accept_proxy_protocol`
/// port; the connection is then from the client the header names. `None`
/// (the connection is dropped, and counted) without a valid header within
/// `header_timeout` of the accept, or from outside `trusted_proxies` when
/// that is set.
async fn proxied(
    mut stream: TcpStream,
    mut conn: ConnInfo,
    dp: &DataPlane,
) -> Option<(TcpStream, ConnInfo)> {
    let settings = &dp.settings;
    if !settings.trusted_proxies.is_empty() && !settings.trusts(conn.peer.ip()) {
        debug!(port = conn.port, peer = %conn.peer, "PROXY protocol port: not a trusted proxy; closing");
        dp.proxy_protocol_errors
            .with_label_values(&["untrusted"])
            .inc();
        return None;
    }
    let deadline = conn.accepted.instant() + dp.settings.header_timeout;
    match crate::proxy_protocol::read_header(&mut stream, deadline).await {
        Ok(source) => {
            if let Some(client) = source {
                conn.peer = client;
            }
            Some((stream, conn))
        }
        Err(error) => {
            debug!(port = conn.port, peer = %conn.peer, %error, "no valid PROXY protocol header; closing");
            dp.proxy_protocol_errors
                .with_label_values(&[error.reason()])
                .inc();
            None
        }
    }
}

/// Starts serving a connection, on the worker that accepted it, in the
/// mode of the port as the routing table has it now.
///
/// Each mode is a task of its own type: a task is as large as its future's
/// largest state, so a plain HTTP connection's task holds no TLS session
/// or TCP pump, nor a second copy of the arguments.
fn dispatch(
    stream: TcpStream,
    mut conn: ConnInfo,
    dp: &Arc<DataPlane>,
    acceptors: &Arc<(TlsAcceptor, TlsAcceptor)>,
    permit: Connection<OwnedSemaphorePermit>,
    shutdown: &CancellationToken,
) {
    // One read of the table: the port's mode, and a plain TCP port's target
    // (a TLS port's is resolved once the handshake names the host).
    let table = dp.routes.load();
    let Some(route) = table.port(conn.port) else {
        return;
    };
    let (dp, shutdown) = (dp.clone(), shutdown.clone());
    if route.http && !route.tls {
        tokio::spawn(crate::http::serve_connection(
            stream, conn, dp, shutdown, permit,
        ));
        return;
    }
    let span = debug_span!("conn", port = conn.port, peer = %conn.peer);
    if !route.tls {
        if let Some(target) = table.target(route, None) {
            tokio::spawn(
                async move {
                    let _permit = permit;
                    crate::tcp::proxy_plain(stream, conn, target, dp).await;
                }
                .instrument(span),
            );
        }
        return;
    }
    conn.tls = true;
    let (http, acceptors) = (route.http, acceptors.clone());
    tokio::spawn(
        async move {
            let _permit = permit;
            serve_tls(stream, conn, http, dp, &acceptors, shutdown).await;
        }
        .instrument(span),
    );
}

/// Terminates TLS and serves the connection in the port's mode.
async fn serve_tls(
    stream: TcpStream,
    conn: ConnInfo,
    http: bool,
    dp: Arc<DataPlane>,
    acceptors: &(TlsAcceptor, TlsAcceptor),
    shutdown: CancellationToken,
) {
    let acceptor = if http { &acceptors.0 } else { &acceptors.1 };
    // From the accept (a PROXY header's time included); on an HTTP port
    // the first request's header timeout, which runs from the accept too,
    // bounds it as well.
    let settings = &dp.settings;
    let accepted = conn.accepted.instant();
    let mut deadline = accepted + settings.tls_handshake_timeout;
    if http {
        deadline = deadline.min(accepted + settings.header_timeout);
    }
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
    // Both boxed, so that the task keeps room for neither: the handshake
    // (a session being built, and its timer) ends here, and the session is
    // then held by what serves it (456 bytes of task instead of 1,480).
    let tls = match Box::pin(handshake).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            debug!(error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            debug!("tls handshake timed out");
            return;
        }
    };
    if http {
        crate::http::serve_connection(crate::tls::TlsIo::new(tls), conn, dp, shutdown, ()).await;
    } else {
        let sni = tls.get_ref().1.server_name().map(str::to_owned);
        // Routed by the table as it is once the handshake is done.
        let target = {
            let table = dp.routes.load();
            table
                .port(conn.port)
                .and_then(|p| table.target(p, sni.as_deref()))
        };
        match target {
            // Boxed: the TCP pump's state would make every TLS HTTP
            // connection's task larger too.
            Some(target) => {
                // A syscall: only for a group that sends the PROXY header.
                let local = target
                    .group
                    .send_proxy_protocol
                    .and_then(|_| tls.get_ref().0.local_addr().ok());
                Box::pin(crate::tcp::proxy(tls, conn, target, dp, local)).await;
            }
            None => debug!(?sni, "no group for this server name; closing"),
        }
    }
}

/// Picks the certificate for a connection on one published port by SNI,
/// against the routing table current at handshake time.
#[derive(Debug)]
struct SniResolver {
    port: u16,
    routes: Arc<ArcSwap<RoutingTable>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.routes.load();
        table.port(self.port)?.key_for(hello.server_name())
    }
}

/// The rustls config for a published port: HTTP ports offer h2 and
/// http/1.1 by ALPN, TCP ports offer nothing.
pub fn server_config(
    port: u16,
    routes: Arc<ArcSwap<RoutingTable>>,
    http: bool,
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { port, routes }));
    if http {
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Arc::new(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free port on 127.0.0.1 (bound and released).
    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    #[test]
    fn each_worker_binds_the_port_and_others_cannot() {
        let workers = Workers::start(2).expect("workers");
        let addr = free_addr();
        let listeners = bind(addr, &workers).expect("first bind");
        assert_eq!(listeners.len(), 2, "one listener per worker");
        // A second node on the same address (same user, so SO_REUSEPORT
        // alone would let it in) is refused, as without the option.
        let again = bind(addr, &workers).expect_err("the port is taken");
        assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse);
        drop(listeners);
        // Released with the listeners.
        let listeners = bind(addr, &workers).expect("bind after release");
        drop(listeners);

        let held = std::net::TcpListener::bind(free_addr()).expect("bind");
        let taken = held.local_addr().expect("addr");
        let err = bind(taken, &workers).expect_err("held by a plain socket");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }

    /// Listeners taken over from a process with more workers are shared
    /// out (one worker serves two); with fewer, the workers left bind their
    /// own into the same group.
    #[test]
    fn taken_over_listeners_are_shared_out_and_completed() {
        let addr = free_addr();
        let other = Workers::start(3).expect("workers");
        let theirs: Vec<std::net::TcpListener> = bind(addr, &other)
            .expect("bind")
            .into_iter()
            .map(|(l, _)| l.into_std().expect("std"))
            .collect();
        let copies = |ls: &[std::net::TcpListener]| -> Vec<_> {
            ls.iter().map(|l| l.try_clone().expect("dup")).collect()
        };
        let two = Workers::start(2).expect("workers");
        let adopted = adopt(addr, copies(&theirs), &two).expect("adopt");
        let on: Vec<usize> = adopted.iter().map(|(_, w)| *w).collect();
        assert_eq!(on, [0, 1, 0], "three listeners over two workers");
        drop(adopted);

        let four = Workers::start(4).expect("workers");
        let adopted = adopt(addr, copies(&theirs[..2]), &four).expect("adopt");
        let on: Vec<usize> = adopted.iter().map(|(_, w)| *w).collect();
        assert_eq!(on, [0, 1, 2, 3], "two taken over, two bound into the group");
        for (l, _) in &adopted {
            assert_eq!(l.local_addr().expect("addr"), addr);
        }
    }

    /// At most `max_published_ports` ports are bound: the ones taken over
    /// in an upgrade first (they were served), then the lowest; the rest
    /// wait, and a port released makes room.
    #[tokio::test]
    async fn ports_past_the_limit_wait_and_taken_over_ones_come_first() {
        use raft_store::command::Command;
        let mut ports: Vec<u16> = (0..3).map(|_| free_addr().port()).collect();
        ports.sort_unstable();
        let mut group = crate::routing::tests::group("many", ports[0]);
        for &port in &ports[1..] {
            let mut extra = group.services[0].clone();
            extra.port = port;
            group.services.push(extra);
        }
        let mut state = raft_store::State::default();
        state
            .apply(&Command::CreateGroup { group })
            .expect("create");
        let dp = Arc::new(DataPlane::new(crate::dataplane::Settings {
            max_published_ports: 2,
            ..crate::dataplane::Settings::default()
        }));
        let certs = crate::tls::CertCache::default();
        let cx = crate::routing::BuildContext {
            certs: &certs,
            drain_timeout: Duration::from_secs(1),
            load_changed: None,
        };
        crate::routing::publish(&dp.routes, &state, &cx);
        let workers = Workers::start(1).expect("workers");
        // The highest port was served by the process this one replaces.
        let addr = |port| SocketAddr::new("127.0.0.1".parse().expect("ip"), port);
        let theirs = std::net::TcpListener::bind(addr(ports[2])).expect("bind");
        let mut listeners = Listeners::new(
            "127.0.0.1".parse().expect("ip"),
            dp.clone(),
            CancellationToken::new(),
            workers,
        )
        .inherit(BTreeMap::from([(ports[2], vec![theirs])]));
        let unbound = listeners.reconcile(&dp.routes.load());
        assert_eq!(unbound.over, [ports[1]], "{unbound:?}");
        assert!(unbound.failed.is_empty(), "{unbound:?}");
        let mut bound: Vec<u16> = listeners.bound().iter().map(SocketAddr::port).collect();
        bound.sort_unstable();
        assert_eq!(bound, [ports[0], ports[2]]);
        // Releasing one lets the waiting port in.
        let mut fewer = state.group("many").expect("group").clone();
        fewer.services.retain(|s| s.port != ports[0]);
        state
            .apply(&Command::DeleteGroup {
                id: "many".into(),
                force: true,
            })
            .expect("delete");
        state
            .apply(&Command::CreateGroup { group: fewer })
            .expect("create");
        crate::routing::publish(&dp.routes, &state, &cx);
        let unbound = listeners.reconcile(&dp.routes.load());
        assert!(unbound.is_empty(), "{unbound:?}");
        let mut bound: Vec<u16> = listeners.bound().iter().map(SocketAddr::port).collect();
        bound.sort_unstable();
        assert_eq!(bound, [ports[1], ports[2]]);
    }

    /// A connected socket as an accept loop gets it, and a data plane.
    async fn connection(tls: bool) -> (TcpStream, ConnInfo, Arc<DataPlane>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = l.local_addr().expect("addr");
        let stream = TcpStream::connect(peer).await.expect("connect");
        let dp = Arc::new(DataPlane::new(crate::dataplane::Settings::default()));
        let info = ConnInfo {
            peer,
            port: 1,
            tls,
            accepted: crate::dataplane::Accepted::now(),
        };
        (stream, info, dp)
    }

    /// A plain HTTP connection's task is as large as the largest state of
    /// its future, for as long as it is open, parked included: the TLS
    /// handshake, the TCP pump, hyper's connection (boxed while it serves)
    /// and copies of the arguments must not make it pay for theirs.
    #[tokio::test]
    async fn a_plain_http_connection_task_is_small() {
        let (stream, info, dp) = connection(false).await;
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let task =
            crate::http::serve_connection(stream, info, dp, CancellationToken::new(), permit);
        eprintln!("connection task: {} bytes", size_of_val(&task));
        assert!(size_of_val(&task) <= LIMIT, "{} bytes", size_of_val(&task));
    }

    /// 384 bytes in a release build, 400 in a debug one; 1,520 with
    /// hyper's HTTP/1 connection inline.
    const LIMIT: usize = 448;

    /// The same for a TLS connection: the session (1,216 bytes) is boxed,
    /// and neither the handshake nor the TCP pump's state is kept beside
    /// the connection's.
    #[tokio::test]
    async fn a_tls_connection_task_is_small() {
        let (stream, info, dp) = connection(true).await;
        let acceptors = (
            TlsAcceptor::from(server_config(1, dp.routes.clone(), true)),
            TlsAcceptor::from(server_config(1, dp.routes.clone(), false)),
        );
        let task = serve_tls(stream, info, true, dp, &acceptors, CancellationToken::new());
        eprintln!("TLS connection task: {} bytes", size_of_val(&task));
        assert!(
            size_of_val(&task) <= TLS_LIMIT,
            "{} bytes",
            size_of_val(&task)
        );
    }

    /// 456 bytes in a release build; 5,080 with the session and the TCP
    /// pump inline.
    const TLS_LIMIT: usize = 640;

    #[test]
    fn connections_reach_the_workers_listeners() {
        let workers = Workers::start(2).expect("workers");
        let addr = free_addr();
        let listeners = bind(addr, &workers).expect("bind");
        let (tx, rx) = std::sync::mpsc::channel();
        for (listener, worker) in listeners {
            let tx = tx.clone();
            workers.handles()[worker].spawn(async move {
                while let Ok((_, peer)) = listener.accept().await {
                    let _ = tx.send((crate::workers::current(), peer));
                }
            });
        }
        let mut accepted_by = BTreeSet::new();
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(std::net::TcpStream::connect(addr).expect("connect"));
            let (worker, _) = rx.recv_timeout(Duration::from_secs(10)).expect("accepted");
            accepted_by.insert(worker);
        }
        // The kernel spreads connections by their addresses' hash: 64
        // connections from different ports reach both workers.
        assert_eq!(accepted_by.into_iter().collect::<Vec<_>>(), [0, 1]);
    }
}
