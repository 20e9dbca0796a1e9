//! edgelb node library: everything the `edgelb` binary runs.
//!
//! A node keeps a copy of the replicated state ([`store`]), turns it into an
//! immutable routing table ([`routing`]) that connections read without locks,
//! binds the published ports ([`listeners`]) on its data-plane threads
//! ([`workers`]), terminates TLS ([`tls`]),
//! proxies HTTP ([`http`]) and TCP ([`tcp`]) to the instance the balancer
//! picks ([`balancer`]), tells its peers its load and takes theirs into
//! account ([`gossip`](mod@gossip), over [`cluster`]), and serves the admin
//! API ([`admin`]) and metrics ([`metrics`]). [`app::start`] wires it
//! together from a [`config::Config`].

pub mod access_log;
pub mod admin;
pub mod app;
pub mod balancer;
pub mod bootstrap;
pub mod checks;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod election;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod gossip;
pub mod health;
pub mod http;
pub mod limits;
pub mod listeners;
pub mod membership;
pub mod metrics;
#[doc(hidden)]
pub mod patience;
pub mod proxy_protocol;
pub mod raft;
mod renewal;
pub mod restore;
pub mod routing;
pub mod series;
pub mod store;
pub mod systemd;
pub mod tcp;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod workers;
