//! edgelb's replicated data model and its deterministic state machine.
//!
//! Service groups (published ports, domains, instances) and certificates are
//! replicated with Raft: every node applies the same log of [`Command`]s to
//! its own [`State`] and serves traffic from that local copy. This crate is
//! the plain-code part of that: the [`model`], its [`validate`] rules, the
//! [`command`]s, the [`state`] machine and the admin [`api`] types. It does
//! no I/O and reads no clock or RNG; every uuid, generated name and
//! timestamp is chosen by the node that proposes a command and travels
//! inside it, so `apply` gives the same result on every node.
//!
//! ```text
//!  admin API ──▶ validate ──▶ Command ──▶ Raft log ──▶ State::apply (every node)
//!  (request)     (400 early)   (uuid, name,             │  Ok(Applied) / Err(ApplyError)
//!                              created_at chosen)       ▼
//!                                              data plane rebuilds routing
//! ```
//!
//! [`State::apply`] is atomic: a refused command leaves the state unchanged
//! and answers [`ApplyError`] (`Invalid` 400, `NotFound` 404, `Conflict`
//! 409); [`State::check`] runs the same rules as a dry run.
//!
//! # Rules
//!
//! Per group ([`validate`], 400): a valid name; at least one service; ports
//! 1–65535, each published once; handler sets none, `tls`, `http`,
//! `tls+http` or `http+redirect`; a `redirect` port's `destination_port` is
//! another `tls` port of the same group; `hard_limit` ≥ 1; at least one
//! domain, each a valid fqdn, listed once, naming only stored certificates;
//! instance names valid and unique, addresses IPs or host names. Handlers are
//! kept in the order tls, http, redirect and fqdns in lower case.
//!
//! Between groups (409): names, fqdns and instance uuids are unique.
//!
//! **Port sharing.** A listener has one mode. Several groups may publish the
//! same port only if the port has `tls` or `http` in every one of them
//! (traffic is routed by SNI / `Host`) *and* their handler sets are
//! identical; so `443/tls+http` can be shared, but not `443/tls` in one group
//! and `443/tls+http` in another. A plain TCP port (no `tls`, no `http`)
//! belongs to the one group that published it first; a second claim is a
//! conflict naming the port and the group holding it.
//!
//! Attaching an instance whose name is already taken in the group, or whose
//! uuid is attached anywhere, is a conflict (409); a group *created* with
//! duplicate instances is invalid input (400).

pub mod api;
pub mod command;
pub mod model;
pub mod state;
pub mod validate;

pub use command::{Command, Patch, PatchOp};
pub use model::{
    Certificate, DEFAULT_HARD_LIMIT, Domain, Handler, Instance, ModelError, Service, ServiceGroup,
    parse_port_specs,
};
pub use state::{Applied, ApplyError, State};
