//! edgelb's replicated data model, its deterministic state machine and the
//! openraft storage that replicates it.
//!
//! Service groups (published ports, domains, instances) and certificates are
//! replicated with Raft: every node applies the same log of [`Command`]s to
//! its own [`State`] and serves traffic from that local copy. The plain-code
//! part does no I/O and reads no clock or RNG: the [`model`] and its
//! [`validate`] rules (both from the `edgelb-api` crate, in
//! `raft-store/api/`, which the operator CLI shares without this crate's
//! storage), the [`command`]s and the [`state`] machine. Every uuid,
//! generated name and timestamp is chosen by the node that proposes a
//! command and travels inside it, so `apply` gives the same result on every
//! node.
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
//! # Storage
//!
//! The openraft side follows openraft's example split: [`types`]
//! (`declare_raft_types!`: [`Request`] in, [`Response`] out, members as
//! [`ClusterNode`]), [`LogStore`] (log and vote) and [`StateMachineStore`]
//! (applied state and snapshots), both on redb under the node's data dir:
//!
//! ```text
//!  client_write(Request) ─▶ LogStore::append ──fsync──▶ replicated, committed
//!     <data_dir>/raft-log.redb                                  │
//!                                                               ▼
//!  StateMachineStore::apply ─▶ State::apply per entry (in memory)
//!     │                                                         │
//!     │ within FLUSH_AFTER: the rows changed since the last     ▼
//!     ▼ flush, one fsync'd transaction          watch::Sender<AppliedState>
//!  <data_dir>/state-machine.redb                 ─▶ subscribe() receivers
//!                                                (data plane, admin reads)
//!  Response { result: Ok(Applied) | Err(ApplyError) } ─▶ client_write's caller
//! ```
//!
//! Durability: a log entry or vote is fsync'd before openraft is told it is
//! stored; the applied state is published and answered from memory, and
//! its rows are written behind it, within
//! [`FLUSH_AFTER`](state_machine::FLUSH_AFTER) (100 ms), one fsync'd
//! transaction for all the batches of that period, as etcd batches its
//! backend's commits. So an acknowledged write survives a crash of any
//! minority and a restart of the whole cluster (it is in the log of a
//! majority), and a restarted node serves its last applied state before it
//! hears from a leader: openraft re-applies the log up to the committed
//! index saved with it, which leaves out at most the last moment's
//! commits. The [`log_store`], [`state_machine`] and
//! [`snapshot`] modules give the details; docs/storage.md the layout, its
//! versions and the compatibility rules. Corrupt bytes on disk or in a
//! received snapshot are a [`StorageError`](types::StorageError), never a
//! panic; openraft stops the node on it; bytes of a newer format are
//! refused the same way ([`StoreError::NewerFormat`]).
//!
//! The applied [`State`] shares its structure between versions (an O(1)
//! clone), and each published [`AppliedState`] tells what changed since an
//! earlier index ([`AppliedState::changed_since`]), so readers rebuild only
//! that.
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
//!
//! **The same request again.** Uuids are chosen by the node per request, so
//! a `CreateGroup` whose uuid and name are those of a stored group, or an
//! `AttachInstance` whose uuid and name are those of an instance of that
//! group, is a request that already applied (sent again after its answer
//! was lost): it answers what is stored, as applied, and changes nothing.

mod changes;
pub mod command;
mod db;
pub mod faults;
pub mod log_store;
mod rebuild;
mod rows;
pub mod snapshot;
pub mod state;
pub mod state_machine;
pub mod types;

pub use edgelb_api::{model, validate};

#[cfg(test)]
mod tests;

pub use changes::Changed;
pub use command::{Command, Patch, PatchOp};
pub use db::{Seal, StoreError, encoded_len};
pub use log_store::{LogStore, WeakLogStore};
pub use model::{
    Certificate, DEFAULT_HARD_LIMIT, Domain, Handler, Instance, ModelError, Service, ServiceGroup,
    parse_port_specs,
};
pub use rebuild::{Rebuilt, RebuiltFrom};
pub use snapshot::{SnapshotBuilder, snapshot_interval};
pub use state::{Applied, ApplyError, State};
pub use state_machine::{AppliedState, StateMachineStore};
pub use types::{ClusterNode, NodeId, Request, Response, TypeConfig};
