//! The state's indexes over its groups, kept in step by `commit`: names,
//! fqdns, published ports and instance uuids, each pointing at group
//! uuids. They make the rules between groups ([`conflicts`](super::conflicts))
//! O(log n) lookups instead of scans of every group.

use std::collections::{BTreeSet, HashSet};

use imbl::OrdMap;
use uuid::Uuid;

use super::State;
use crate::model::{Domain, ServiceGroup};

/// Port → the groups publishing it, by name (so the first is the holder
/// named in a conflict, in name order).
pub(super) type Ports = OrdMap<u16, OrdMap<String, Uuid>>;

impl State {
    /// Adds `g` to the indexes. Answers what it found already indexed to
    /// another group (a name, fqdn or instance uuid), which a valid state
    /// never holds.
    pub(super) fn index(&mut self, g: &ServiceGroup) -> Result<(), String> {
        let mut clash = None;
        if self.names.insert(g.name.clone(), g.uuid).is_some() {
            clash = Some(format!("group name {:?}", g.name));
        }
        for d in &g.domains {
            if self.domains.insert(d.fqdn.clone(), g.uuid).is_some() {
                clash = Some(format!("domain {:?}", d.fqdn));
            }
        }
        for s in &g.services {
            let mut holders = self.ports.get(&s.port).cloned().unwrap_or_default();
            holders.insert(g.name.clone(), g.uuid);
            self.ports.insert(s.port, holders);
        }
        for i in &g.instances {
            if self.instances.insert(i.uuid, g.uuid).is_some() {
                clash = Some(format!("instance {}", i.uuid));
            }
        }
        clash.map_or(Ok(()), Err)
    }

    /// Removes the stored group `uuid` (if any) from the indexes.
    pub(super) fn unindex(&mut self, uuid: &Uuid) {
        let Some(old) = self.groups.get(uuid).cloned() else {
            return;
        };
        self.names.remove(&old.name);
        for d in &old.domains {
            self.domains.remove(&d.fqdn);
        }
        for s in &old.services {
            if let Some(holders) = self.ports.get(&s.port) {
                let mut holders = holders.clone();
                holders.remove(&old.name);
                if holders.is_empty() {
                    self.ports.remove(&s.port);
                } else {
                    self.ports.insert(s.port, holders);
                }
            }
        }
        for i in &old.instances {
            self.instances.remove(&i.uuid);
        }
    }

    /// Moves the indexes from the stored version of `new` (if any) to
    /// `new`, touching only what differs: attaching an instance adds one
    /// entry, whatever the group's size.
    pub(super) fn reindex(&mut self, new: &ServiceGroup) {
        let Some(old) = self.groups.get(&new.uuid).cloned() else {
            let _ = self.index(new);
            return;
        };
        if old.name != new.name {
            self.unindex(&new.uuid);
            let _ = self.index(new);
            return;
        }
        // Most writes (an attach, a detach, a limit) leave the domains as
        // they were: one pass finds that. Otherwise sets, not a scan of
        // one list per entry of the other: a group may hold tens of
        // thousands of domains.
        if old.domains != new.domains {
            let (before, after): (HashSet<&Domain>, HashSet<&Domain>) =
                (old.domains.iter().collect(), new.domains.iter().collect());
            for d in old.domains.iter().filter(|d| !after.contains(d)) {
                self.domains.remove(&d.fqdn);
            }
            for d in new.domains.iter().filter(|d| !before.contains(d)) {
                self.domains.insert(d.fqdn.clone(), new.uuid);
            }
        }
        let ports = |g: &ServiceGroup| g.services.iter().map(|s| s.port).collect::<BTreeSet<_>>();
        let (before, after) = (ports(&old), ports(new));
        for port in before.difference(&after) {
            if let Some(holders) = self.ports.get(port) {
                let mut holders = holders.clone();
                holders.remove(&old.name);
                if holders.is_empty() {
                    self.ports.remove(port);
                } else {
                    self.ports.insert(*port, holders);
                }
            }
        }
        for port in after.difference(&before) {
            let mut holders = self.ports.get(port).cloned().unwrap_or_default();
            holders.insert(new.name.clone(), new.uuid);
            self.ports.insert(*port, holders);
        }
        let uuids = |g: &ServiceGroup| g.instances.iter().map(|i| i.uuid).collect::<HashSet<_>>();
        let (before, after) = (uuids(&old), uuids(new));
        for uuid in before.difference(&after) {
            self.instances.remove(uuid);
        }
        for uuid in after.difference(&before) {
            self.instances.insert(*uuid, new.uuid);
        }
    }

    fn by_uuid(&self, uuid: Option<&Uuid>) -> Option<&ServiceGroup> {
        uuid.and_then(|u| self.groups.get(u)).map(|g| &**g)
    }

    /// The group named `name`.
    pub(super) fn named(&self, name: &str) -> Option<&ServiceGroup> {
        self.by_uuid(self.names.get(name))
    }

    /// The group that instance `uuid` is attached to.
    pub(super) fn instance_group(&self, uuid: &Uuid) -> Option<&ServiceGroup> {
        self.by_uuid(self.instances.get(uuid))
    }

    /// The group that holds domain `fqdn`.
    pub(super) fn domain_group(&self, fqdn: &str) -> Option<&ServiceGroup> {
        self.by_uuid(self.domains.get(fqdn))
    }

    /// The first group in name order, other than `except`, that publishes
    /// `port`.
    pub(super) fn port_holder(&self, port: u16, except: &Uuid) -> Option<&ServiceGroup> {
        let holders = self.ports.get(&port)?;
        self.by_uuid(holders.values().find(|u| *u != except))
    }
}
