//! edgelb's admin API as data and as a client, for everyone who speaks to a
//! node: the node itself (server, and client when it joins a cluster),
//! `edgectl` and the tests. It holds no data plane and no Raft storage, so
//! the operator CLI builds without them.
//!
//! ```text
//!            node (edgelb)                       edgectl (ops), tests (integration)
//!   admin API handlers ──serialise──┐         ┌──deserialise── Client::get/post/delete
//!   raft-store state machine        │         │                 ▲
//!     └─ model, validate ──────────┐│         │┌───────────────┘
//!                                   ▼▼         ▼▼
//!    model, validate ─ services, cluster ─ envelope {status, data | message, errors}
//!    pki (cluster CA, node certificates) ─ tls::client_config (verifier of an https:// admin API)
//! ```
//!
//! - [`model`]: the replicated data model (groups, services, domains,
//!   instances, certificates), port specs, and [`ApplyError`], why a change
//!   was refused. [`validate`]: the rules one group must pass on its own.
//!   The state machine (`raft-store`) applies both; the admin API and
//!   `edgectl` check input with them before sending it.
//! - [`services`] and [`cluster`]: the request and response bodies of the
//!   `/v1` routes; [`envelope`]: the `{"status":…}` wrapper of every answer.
//! - [`pki`]: the cluster CA and node certificates (`edgelb` at bootstrap,
//!   join and renewal; `edgectl certs`).
//! - [`tls`]: the client side of an admin API over TLS; [`client`]: the one
//!   admin HTTP client.
//!
//! Everything here but [`client`] is plain code: no I/O, no clock but the
//! validity dates [`pki`] writes into certificates.

pub mod client;
pub mod cluster;
pub mod envelope;
pub mod model;
pub mod pki;
pub mod services;
pub mod tls;
pub mod validate;

pub use client::{ApiUrl, Client};
pub use model::ApplyError;
