//! The deterministic state machine: [`State`] and [`State::apply`].
//!
//! `apply` works in two steps. *Plan* reads the state, builds the changed
//! group (or certificate) and runs every rule against it, without writing
//! anything; *commit* then writes the change and cannot fail. So a refused
//! command leaves the state exactly as it was, and [`State::check`] can run
//! the same rules as a dry run before a command is proposed.
//!
//! Iteration is over ordered maps only, and every value a command needs is
//! inside it, so every node that applies the same log holds the same state.
//!
//! The maps are persistent (`imbl::OrdMap`) and hold groups and
//! certificates behind `Arc`s: cloning a `State` is O(1), and applying a
//! command to the clone copies only the changed group and the O(log n) map
//! nodes above it, while every reader of the old state keeps it intact. So
//! the state machine publishes each batch's state without copying, and a
//! snapshot is built from a clone while applying goes on.

mod conflicts;
mod form;
mod index;
mod patch;
mod requests;

use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::changes::Rows;
use crate::command::Command;
pub use crate::model::ApplyError;
use crate::model::{Certificate, ClusterSecrets, Instance, ServiceGroup, find_instance};
use crate::validate;
pub use requests::KEPT as REQUESTS_KEPT;
use requests::Requests;

/// The replicated state: service groups and certificates.
///
/// Serialises as `{"groups": [...], "certificates": [...], "cluster": …}`
/// (groups in name order, certificates in name order); the indexes are
/// rebuilt on load. See [`form`] for the details.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct State {
    groups: OrdMap<Uuid, Arc<ServiceGroup>>,
    /// name → uuid, for lookups by name and iteration in name order.
    names: OrdMap<String, Uuid>,
    /// instance uuid → group uuid: instance uuids are unique cluster-wide.
    instances: OrdMap<Uuid, Uuid>,
    /// fqdn → group uuid.
    domains: OrdMap<String, Uuid>,
    /// Published port → the groups publishing it.
    ports: index::Ports,
    certificates: OrdMap<String, Arc<Certificate>>,
    /// The cluster CA and admin token hash, set once at bootstrap.
    cluster: Option<Arc<ClusterSecrets>>,
    /// The uuids of the requests applied lately under [`Command::Once`].
    requests: Requests,
}

/// What a successful [`State::apply`] did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// The group as created or patched.
    Group(ServiceGroup),
    /// The group as it was before deletion.
    Deleted(ServiceGroup),
    /// An instance was attached.
    Attached {
        /// Name of the group.
        group: String,
        /// The instance.
        instance: Instance,
    },
    /// An instance was detached.
    Detached {
        /// Name of the group.
        group: String,
        /// The instance as it was.
        instance: Instance,
    },
    /// A certificate was stored under this name.
    Certificate(String),
    /// The cluster's CA and token hash were recorded.
    ClusterInitialized,
    /// What each command of a [`Command::Batch`] answered, in order.
    Batch(Vec<Result<Self, ApplyError>>),
}

/// The write that a planned command makes.
enum Change {
    /// Insert or replace a group.
    Put(ServiceGroup),
    /// Remove a group.
    Remove(Uuid),
    /// Insert or replace a certificate.
    Certificate(Certificate),
    /// Record the cluster secrets.
    Cluster(ClusterSecrets),
    /// Nothing to write: the command is one already applied (see
    /// [`State::replayed`]).
    Nothing,
}

impl State {
    /// Applies `cmd`. Atomic: on `Err` the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, ApplyError> {
        self.apply_noting(cmd, &mut Rows::default())
    }

    /// [`apply`](Self::apply), noting the row it writes in `rows`.
    pub(crate) fn apply_noting(
        &mut self,
        cmd: &Command,
        rows: &mut Rows,
    ) -> Result<Applied, ApplyError> {
        if let Command::Batch { commands } = cmd {
            let results = commands
                .iter()
                .map(|c| match c {
                    Command::Batch { .. } => Err(nested_batch()),
                    c => self.apply_noting(c, rows),
                })
                .collect();
            return Ok(Applied::Batch(results));
        }
        if let Command::Once { request, command } = cmd {
            if self.requests.contains(request) {
                tracing::info!(
                    %request,
                    "a request sent again was applied already: answered as applied, nothing changed"
                );
                return self.again(command);
            }
            once_only(command)?;
            let applied = self.apply_noting(command, rows)?;
            // Only what applied is remembered: a refused first try changed
            // nothing, and its retry is judged anew.
            self.requests.push(*request, rows);
            return Ok(applied);
        }
        let (change, applied) = self.plan(cmd)?;
        match &change {
            Change::Put(g) => rows.groups.insert(g.uuid),
            Change::Remove(uuid) => rows.groups.insert(*uuid),
            Change::Certificate(c) => rows.certificates.insert(c.name.clone()),
            Change::Cluster(_) => {
                rows.cluster = true;
                true
            }
            Change::Nothing => false,
        };
        self.commit(change);
        Ok(applied)
    }

    /// What [`apply`](Self::apply) would answer, without changing anything.
    pub fn check(&self, cmd: &Command) -> Result<Applied, ApplyError> {
        self.plan(cmd).map(|(_, applied)| applied)
    }

    /// What a patch sent again after a first try that may have committed
    /// answers when its retry was `refused` as a done change is (an `add`
    /// finding an entry's key there, a `del` finding one gone) and this
    /// state shows the change (every entry added there as given, every key
    /// deleted gone, [`patch::shown`]): the group as it is. `None` for
    /// other commands and refusals, or when the state does not show it.
    pub fn shows_patch(&self, cmd: &Command, refused: &ApplyError) -> Option<Applied> {
        let Command::PatchGroup { id, patch } = cmd else {
            return None;
        };
        let g = self.group(id)?;
        (Self::refused_as_done(cmd, refused) && patch::shown(g, patch))
            .then(|| Applied::Group(g.clone()))
    }

    /// Whether `refused` may be the refusal of a patch sent again whose
    /// first try took effect (see [`State::shows_patch`]).
    pub fn refused_as_done(cmd: &Command, refused: &ApplyError) -> bool {
        matches!(cmd, Command::PatchGroup { patch, .. } if patch::refused_as_done(patch, refused))
    }

    /// A group by uuid string or, failing that, by name.
    pub fn group(&self, id: &str) -> Option<&ServiceGroup> {
        Uuid::parse_str(id)
            .ok()
            .and_then(|u| self.groups.get(&u))
            .or_else(|| self.names.get(id).and_then(|u| self.groups.get(u)))
            .map(|g| &**g)
    }

    /// How many distinct ports the groups publish.
    pub fn published_ports(&self) -> usize {
        self.ports.len()
    }

    /// Whether a group other than `except` publishes `port`.
    pub fn publishes(&self, port: u16, except: Option<&Uuid>) -> bool {
        self.ports
            .get(&port)
            .is_some_and(|groups| groups.values().any(|u| Some(u) != except))
    }

    /// A group by uuid, shared: the same `Arc` in every state until a
    /// command changes the group.
    pub fn group_by_uuid(&self, uuid: &Uuid) -> Option<&Arc<ServiceGroup>> {
        self.groups.get(uuid)
    }

    /// All groups in name order.
    pub fn groups(&self) -> impl Iterator<Item = &ServiceGroup> {
        self.names
            .values()
            .filter_map(|u| self.groups.get(u))
            .map(|g| &**g)
    }

    /// The number of groups.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The number of attached instances.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    /// A stored certificate by name.
    pub fn certificate(&self, name: &str) -> Option<&Certificate> {
        self.certificates.get(name).map(|c| &**c)
    }

    /// The cluster CA and token hash, once the cluster is initialised.
    pub fn cluster(&self) -> Option<&ClusterSecrets> {
        self.cluster.as_deref()
    }

    /// All stored certificates in name order.
    pub fn certificates(&self) -> impl Iterator<Item = &Certificate> {
        self.certificates.values().map(|c| &**c)
    }

    fn find(&self, id: &str) -> Result<&ServiceGroup, ApplyError> {
        self.group(id)
            .ok_or_else(|| ApplyError::NotFound(format!("service group {id:?} not found")))
    }

    fn plan(&self, cmd: &Command) -> Result<(Change, Applied), ApplyError> {
        if let Some(applied) = self.replayed(cmd) {
            return Ok((Change::Nothing, applied));
        }
        match cmd {
            // `apply_noting` applies it and remembers its request; this is
            // for `check`.
            Command::Once { request, command } => {
                if self.requests.contains(request) {
                    return Ok((Change::Nothing, self.again(command)?));
                }
                once_only(command)?;
                self.plan(command)
            }
            Command::CreateGroup { group } => {
                let mut g = group.clone();
                validate::normalise_services(&mut g.services);
                validate::normalise_domains(&mut g.domains);
                validate::check_group(&g, self)?;
                if self.groups.contains_key(&g.uuid) {
                    return Err(ApplyError::Conflict(format!(
                        "a service group with uuid {} already exists",
                        g.uuid
                    )));
                }
                conflicts::check(self, &g)?;
                Ok((Change::Put(g.clone()), Applied::Group(g)))
            }
            Command::PatchGroup { id, patch } => {
                let g = patch::patched(self.find(id)?, patch)?;
                validate::check_group(&g, self)?;
                conflicts::check(self, &g)?;
                Ok((Change::Put(g.clone()), Applied::Group(g)))
            }
            Command::DeleteGroup { id, force } => {
                let g = self.find(id)?;
                if !force && !g.instances.is_empty() {
                    return Err(ApplyError::Conflict(format!(
                        "service group {:?} has {} instance(s) attached; detach them or delete with force",
                        g.name,
                        g.instances.len()
                    )));
                }
                Ok((Change::Remove(g.uuid), Applied::Deleted(g.clone())))
            }
            Command::AttachInstance { group, instance } => {
                let current = self.find(group)?;
                validate::check_instance(instance)?;
                if current.instances.iter().any(|i| i.name == instance.name) {
                    return Err(ApplyError::Conflict(format!(
                        "instance {:?} already exists in group {:?}",
                        instance.name, current.name
                    )));
                }
                conflicts::check_instance_uuid(self, instance.uuid)?;
                let mut g = current.clone();
                g.instances.push(instance.clone());
                let applied = Applied::Attached {
                    group: g.name.clone(),
                    instance: instance.clone(),
                };
                Ok((Change::Put(g), applied))
            }
            Command::DetachInstance { group, instance } => {
                let current = self.find(group)?;
                let Some(pos) = find_instance(&current.instances, instance) else {
                    return Err(ApplyError::NotFound(format!(
                        "instance {instance:?} not found in group {:?}",
                        current.name
                    )));
                };
                let mut g = current.clone();
                let removed = g.instances.remove(pos);
                let applied = Applied::Detached {
                    group: g.name.clone(),
                    instance: removed,
                };
                Ok((Change::Put(g), applied))
            }
            Command::PutCertificate { certificate } => {
                validate::check_certificate(certificate)?;
                let applied = Applied::Certificate(certificate.name.clone());
                Ok((Change::Certificate(certificate.clone()), applied))
            }
            Command::InitCluster { secrets } => {
                if self.cluster.is_some() {
                    return Err(ApplyError::Conflict(
                        "the cluster is already initialised".into(),
                    ));
                }
                // An empty CA key means the operators run their own PKI: members
                // then cannot mint node certificates.
                if secrets.ca_cert_pem.is_empty() || secrets.token_sha256.len() != 64 {
                    return Err(ApplyError::Invalid("cluster secrets are incomplete".into()));
                }
                Ok((
                    Change::Cluster(secrets.clone()),
                    Applied::ClusterInitialized,
                ))
            }
            // `apply_noting` applies a batch command by command.
            Command::Batch { .. } => Err(ApplyError::Invalid(
                "a batch is checked command by command".into(),
            )),
        }
    }

    fn commit(&mut self, change: Change) {
        match change {
            Change::Put(g) => {
                // Planning refused every clash, so indexing cannot find one.
                self.reindex(&g);
                self.groups.insert(g.uuid, Arc::new(g));
            }
            Change::Remove(uuid) => {
                self.unindex(&uuid);
                self.groups.remove(&uuid);
            }
            Change::Certificate(c) => {
                self.certificates.insert(c.name.clone(), Arc::new(c));
            }
            Change::Cluster(secrets) => self.cluster = Some(Arc::new(secrets)),
            Change::Nothing => {}
        }
    }

    /// What an earlier apply of `cmd` answered, when `cmd` is one this
    /// state already holds: a group or an instance carrying the uuid the
    /// proposing node chose for it (uuids are chosen per request, so the
    /// same uuid under the same name is the same request sent again, e.g.
    /// a forwarded write retried after its first try timed out and
    /// committed). Answered as applied instead of as a conflict, and
    /// changing nothing.
    fn replayed(&self, cmd: &Command) -> Option<Applied> {
        match cmd {
            Command::CreateGroup { group } => self
                .groups
                .get(&group.uuid)
                .filter(|g| g.name == group.name)
                .map(|g| Applied::Group(ServiceGroup::clone(g))),
            Command::AttachInstance { group, instance } => {
                let g = self.group(group)?;
                let stored = g
                    .instances
                    .iter()
                    .find(|i| i.uuid == instance.uuid && i.name == instance.name)?;
                Some(Applied::Attached {
                    group: g.name.clone(),
                    instance: stored.clone(),
                })
            }
            _ => None,
        }
    }
}

impl State {
    /// What a command applied once answers when its request is sent again:
    /// the group as it is now, or the certificate's name.
    fn again(&self, cmd: &Command) -> Result<Applied, ApplyError> {
        match cmd {
            Command::PatchGroup { id, .. } => Ok(Applied::Group(self.find(id)?.clone())),
            Command::PutCertificate { certificate } => {
                Ok(Applied::Certificate(certificate.name.clone()))
            }
            _ => Err(not_once()),
        }
    }

    /// Whether `uuid` is a request applied lately under [`Command::Once`].
    pub fn applied_request(&self, uuid: &Uuid) -> bool {
        self.requests.contains(uuid)
    }
}

/// Refuses a [`Command::Once`] around anything but a patch or a certificate.
fn once_only(cmd: &Command) -> Result<(), ApplyError> {
    match cmd {
        Command::PatchGroup { .. } | Command::PutCertificate { .. } => Ok(()),
        _ => Err(not_once()),
    }
}

fn not_once() -> ApplyError {
    ApplyError::Invalid("only a patch or a certificate is applied once".into())
}

/// Domains may name the certificates stored here ([`validate::check_domains`]).
impl validate::Certificates for State {
    fn has_certificate(&self, name: &str) -> bool {
        self.certificate(name).is_some()
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
pub(crate) mod proptests;

fn nested_batch() -> ApplyError {
    ApplyError::Invalid("a batch inside a batch".into())
}

#[cfg(test)]
mod tests;
