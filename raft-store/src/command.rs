//! Commands: the entries of the replicated log.
//!
//! A command is fully formed by the node that proposes it: every uuid,
//! generated name and timestamp is chosen there and carried inside, so that
//! [`State::apply`](crate::state::State::apply) is deterministic on every node.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::model::PatchOp;
use crate::model::{Certificate, ClusterSecrets, Domain, Instance, Service, ServiceGroup};

/// A change to the replicated state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Create a group (uuid, name, domains, created_at already chosen;
    /// instances usually empty).
    CreateGroup {
        /// The new group.
        group: ServiceGroup,
    },
    /// Change services, domains or hard_limit of a group.
    PatchGroup {
        /// uuid string or name of the group.
        id: String,
        /// What to change.
        patch: Patch,
    },
    /// Delete a group; refused while instances are attached unless `force`.
    DeleteGroup {
        /// uuid string or name of the group.
        id: String,
        /// Delete even with instances attached.
        force: bool,
    },
    /// Attach an instance to a group.
    AttachInstance {
        /// uuid string or name of the group.
        group: String,
        /// The instance, uuid and name already chosen.
        instance: Instance,
    },
    /// Detach an instance from a group.
    DetachInstance {
        /// uuid string or name of the group.
        group: String,
        /// uuid string or name of the instance.
        instance: String,
    },
    /// Store a certificate, replacing one of the same name.
    PutCertificate {
        /// The certificate.
        certificate: Certificate,
    },
    /// Record the cluster CA and the admin token's hash; once, at bootstrap.
    InitCluster {
        /// The secrets every member shares.
        secrets: ClusterSecrets,
    },
    /// `command` applied at most once: `request` is the uuid the proposing
    /// node chose for the API request, and the same command sent again
    /// under it (a forwarded write retried after a first try whose answer
    /// was lost, but which committed) answers as applied and changes
    /// nothing, even after other writes. Only a patch of a group or a
    /// certificate is wrapped: creates and attaches carry their own uuids,
    /// deletes and detaches find their target gone. The newest
    /// [`KEPT`](crate::state::REQUESTS_KEPT) requests are remembered. A
    /// node proposes it only once every member reads it, since older nodes
    /// do not.
    Once {
        /// The request's uuid.
        request: Uuid,
        /// The patch or certificate.
        command: Box<Self>,
    },
    /// Several commands in one log entry, applied in order, each on its
    /// own: a refused one leaves the state as it was and the next still
    /// applies ([`Applied::Batch`](crate::state::Applied::Batch) answers
    /// each). The leader groups concurrent writes this way so that one
    /// append (one fsync) carries many; it does so only once every member
    /// reads batches, since older nodes do not. A batch inside a batch is
    /// refused.
    Batch {
        /// The commands, in the order they apply.
        commands: Vec<Self>,
    },
}

/// A change to one property of a group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Patch {
    /// Published ports, keyed by `port`.
    Services {
        /// How to combine.
        op: PatchOp,
        /// The services.
        value: Vec<Service>,
    },
    /// Domains, keyed by `fqdn`.
    Domains {
        /// How to combine.
        op: PatchOp,
        /// The domains.
        value: Vec<Domain>,
    },
    /// Set `hard_limit`.
    HardLimit(u32),
    /// Set or remove the active health check. Not read by releases before
    /// it: proposed only once every member says it reads group options.
    HealthCheck(Option<Box<crate::model::HealthCheck>>),
    /// Set or remove the PROXY protocol header sent to instances (TCP
    /// mode). Proposed as [`Patch::HealthCheck`] is.
    SendProxyProtocol(Option<crate::model::ProxyVersion>),
}

impl Command {
    /// Whether older members could not read this command as meant: a
    /// group with options, or a patch of them (in a batch too).
    pub fn uses_group_options(&self) -> bool {
        match self {
            Self::CreateGroup { group } => group.has_options(),
            Self::PatchGroup { patch, .. } => {
                matches!(patch, Patch::HealthCheck(_) | Patch::SendProxyProtocol(_))
            }
            Self::Batch { commands } => commands.iter().any(Self::uses_group_options),
            Self::Once { command, .. } => command.uses_group_options(),
            _ => false,
        }
    }

    /// Whether a sent-again request of this command could apply twice:
    /// a patch of a group or a certificate, which [`Command::Once`] wraps.
    pub fn applies_once(&self) -> bool {
        matches!(self, Self::PatchGroup { .. } | Self::PutCertificate { .. })
    }

    /// The command a [`Command::Once`] wraps, or this one.
    pub fn unwrapped(&self) -> &Self {
        match self {
            Self::Once { command, .. } => command,
            other => other,
        }
    }
}
