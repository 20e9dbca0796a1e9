//! The operator side of a node's admin API and of the cluster's
//! certificates, shared by `edgectl`, the node (which joins a cluster
//! through a member's admin API and signs the certificates of nodes that
//! join it) and the tests. The bodies and the envelope it reads are
//! `edgelb-api`'s.
//!
//! ```text
//!   edgectl, node (join), tests ─▶ Client::get/post/delete ─▶ http(s)://admin /v1/…
//!                                    └─ tls::client_config (verifier of an https:// admin API)
//!   node (bootstrap, join, renewal), edgectl certs ─▶ pki (cluster CA, node certificates)
//! ```
//!
//! - [`client`]: the one admin HTTP client (one HTTP/1.1 connection per
//!   request, plain or over rustls), answers unwrapped from the envelope.
//! - [`tls`]: the client side of an admin API over TLS.
//! - [`pki`]: the cluster CA and node certificates (`edgelb` at bootstrap,
//!   join and renewal; `edgectl certs`). Plain code: no I/O, no clock but
//!   the validity dates it writes into certificates.

pub mod client;
pub mod pki;
pub mod tls;

pub use client::{ApiUrl, Client};
