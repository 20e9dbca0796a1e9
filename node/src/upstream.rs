//! Connections to instances, as both proxies use them: the pool of
//! keep-alive HTTP/1.1 connections per instance and port ([`Pool`]), the
//! byte-counting stream ([`CountingIo`]), the client's request body on its
//! way up ([`ClientBody`]) and why a connect failed ([`ConnectError`]).
//!
//! This module knows instances only by their address, port and counters:
//! the balancer's backends own their pools, and the proxies above decide
//! which instance to try.

mod client_body;
mod pool;

use std::io;

pub(crate) use client_body::{Activity, ClientBody};
pub use pool::Pool;
pub(crate) use pool::{CountingIo, IdleLimits, ParkedConn, PooledConn, Traffic, idle};

/// Connecting to an instance failed before any request byte was sent: the
/// instance is marked down and another one may be tried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("connection closed before the request was sent: {0}")]
    Closed(hyper::Error),
}
