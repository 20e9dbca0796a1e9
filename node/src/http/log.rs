//! An HTTP request's access log line while the request is served
//! ([`Record`]): made when the request comes in (if the access log is on
//! and the request is in its sample), filled in as the request is routed
//! and forwarded, and written when its response ends.

use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Version};

use super::conn::Conn;
use crate::access_log::{Client, Entry};
use crate::balancer::Backend;
use crate::routing::GroupRuntime;

/// What the line of one request says so far. Boxed in an `Option`: a
/// request that is not logged carries one null pointer.
#[derive(Debug)]
pub(crate) struct Record {
    conn: Arc<Conn>,
    began: Instant,
    method: Method,
    version: Version,
    /// The target's path and query; none for an authority-form target
    /// (`CONNECT host:port`), whose path is empty. (One shared buffer to
    /// hold, where the whole `Uri` is three.)
    path: Option<PathAndQuery>,
    /// The host routed on, set once the request has passed the `Host`
    /// checks (none for a request that failed them).
    pub(crate) host: Option<HeaderValue>,
    pub(crate) group: Option<Arc<GroupRuntime>>,
    pub(crate) instance: Option<Arc<Backend>>,
    pub(crate) attempts: u32,
    pub(crate) connect: Option<Duration>,
    pub(crate) response: Option<Duration>,
    /// Request body bytes read from the client (counted by `ClientBody`;
    /// none for a request without a body).
    pub(crate) body_in: Option<Arc<AtomicU64>>,
    /// Bytes from the client counted otherwise (a tunnel's).
    pub(crate) bytes_in: u64,
    /// Response body bytes handed to the client.
    pub(crate) bytes_out: u64,
    /// The line was written.
    ended: bool,
}

/// A request's record, if it is logged.
pub(crate) type Log = Option<Box<Record>>;

impl Record {
    /// The record of `req`, when the access log is on and samples it.
    pub(crate) fn start<B: http_body::Body>(req: &Request<B>, conn: &Arc<Conn>) -> Log {
        Self::start_with(
            conn,
            req.method().clone(),
            req.version(),
            req.uri().path_and_query().cloned(),
            !req.body().is_end_stream(),
        )
    }

    /// The record of a request given by its parts (`body`: it has one),
    /// when the access log is on and samples it.
    pub(crate) fn start_with(
        conn: &Arc<Conn>,
        method: Method,
        version: Version,
        path: Option<PathAndQuery>,
        body: bool,
    ) -> Log {
        conn.dp.access_log_sampled()?;
        Some(Box::new(Self {
            conn: conn.clone(),
            began: Instant::now(),
            method,
            version,
            path,
            host: None,
            group: None,
            instance: None,
            attempts: 0,
            connect: None,
            response: None,
            body_in: body.then(Arc::default),
            bytes_in: 0,
            bytes_out: 0,
            ended: false,
        }))
    }

    /// Writes the line: the response's status, and who ended the request
    /// early and why; it ended at `now`.
    pub(crate) fn end(
        mut self: Box<Self>,
        status: u16,
        error: Option<(&'static str, &dyn Display)>,
        now: Instant,
    ) {
        self.write(status, error, now);
        self.ended = true;
    }

    fn write(&self, status: u16, error: Option<(&'static str, &dyn Display)>, now: Instant) {
        let Some(log) = &self.conn.dp.access_log else {
            return;
        };
        let info = &self.conn.info;
        log.write(&Entry {
            began: self.began,
            ended: now,
            client: Some(Client {
                ip: self.conn.client_ip.as_bytes(),
                port: info.peer.port(),
            }),
            port: info.port,
            tls: info.tls,
            proto: version(self.version),
            method: self.method.as_str(),
            host: self.host.as_ref().map_or(&[], HeaderValue::as_bytes),
            path: self.path.as_ref().map_or("", PathAndQuery::as_str),
            group: self.group.as_deref().map_or("", |g| g.name.as_str()),
            instance: self.instance.as_deref().map_or("", |b| b.name.as_str()),
            status,
            bytes_in: self.bytes_in
                + self
                    .body_in
                    .as_ref()
                    .map_or(0, |b| b.load(Ordering::Relaxed)),
            bytes_out: self.bytes_out,
            attempts: self.attempts,
            connect: self.connect,
            response: self.response,
            error,
        });
    }
}

/// A record dropped unwritten: the request went before its response
/// began (the client closed, an HTTP/2 stream was reset, the node shut
/// down); logged with NGINX's 499, "client closed request".
impl Drop for Record {
    fn drop(&mut self) {
        if !self.ended {
            self.write(
                CLIENT_CLOSED,
                Some(("client", &"the client went away before the response began")),
                Instant::now(),
            );
        }
    }
}

/// NGINX's status for a request whose client went away first.
const CLIENT_CLOSED: u16 = 499;

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}
