//! edgelb's admin API as data, for everyone who speaks to a node or
//! applies its log: the node (the admin API's handlers and, through
//! `raft-store`, the state machine), `edgectl` and the tests. It does no
//! I/O and holds no data plane and no Raft storage, so the operator CLI
//! builds without them; the HTTP client and the cluster certificates are
//! `edgelb-client` (`ops/client/`).
//!
//! ```text
//!            node (edgelb)                       edgectl (ops), tests (integration)
//!   admin API handlers ──serialise──┐         ┌──deserialise── edgelb_client::Client
//!   raft-store state machine        │         │                 ▲
//!     └─ model, validate ──────────┐│         │┌───────────────┘
//!                                   ▼▼         ▼▼
//!    model, validate ─ services, cluster ─ envelope {status, data | message, errors}
//! ```
//!
//! - [`model`]: the replicated data model (groups, services, domains,
//!   instances, certificates), port specs, and [`ApplyError`], why a change
//!   was refused. [`validate`]: the rules one group must pass on its own.
//!   The state machine (`raft-store`) applies both; the admin API and
//!   `edgectl` check input with them before sending it.
//! - [`services`] and [`cluster`]: the request and response bodies of the
//!   `/v1` routes; [`envelope`]: the `{"status":…}` wrapper of every answer.

pub mod cluster;
pub mod envelope;
pub mod model;
pub mod services;
pub mod validate;

pub use model::ApplyError;
