//! The serialised form of [`State`]:
//! `{"groups": [...], "certificates": [...], "cluster": {...}, "requests": [...]}`,
//! groups and certificates in name order, `cluster` left out until the
//! cluster is initialised, `requests` (the uuids applied lately under
//! `Command::Once`, oldest first) left out while there are none. Snapshots carry this form, and so did the single-record
//! storage of format 1, so it stays as it is: nodes of earlier releases
//! decode it.
//!
//! Serialising streams from the maps (no copy of the state); deserialising
//! rebuilds the indexes and refuses two groups of one uuid or name, two
//! certificates of one name, and an fqdn or instance uuid held twice.

use std::sync::Arc;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use uuid::Uuid;

use super::requests::Requests;
use super::{REQUESTS_KEPT, State};
use crate::model::{Certificate, ClusterSecrets, ServiceGroup};

impl Serialize for State {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Seq<I>(std::cell::Cell<Option<I>>);
        impl<I, T> Serialize for Seq<I>
        where
            I: Iterator<Item = T>,
            T: Serialize,
        {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.take().into_iter().flatten())
            }
        }
        let fields =
            2 + usize::from(self.cluster.is_some()) + usize::from(!self.requests.is_empty());
        let mut s = serializer.serialize_struct("State", fields)?;
        s.serialize_field("groups", &Seq(Some(self.groups()).into()))?;
        s.serialize_field("certificates", &Seq(Some(self.certificates()).into()))?;
        if let Some(cluster) = self.cluster() {
            s.serialize_field("cluster", cluster)?;
        }
        if !self.requests.is_empty() {
            let uuids = self.requests.iter().map(|(_, uuid)| uuid);
            s.serialize_field("requests", &Seq(Some(uuids).into()))?;
        }
        s.end()
    }
}

/// The owned form, as decoded.
#[derive(Deserialize)]
struct Form {
    groups: Vec<ServiceGroup>,
    certificates: Vec<Certificate>,
    #[serde(default)]
    cluster: Option<ClusterSecrets>,
    /// Left out while empty, and by releases before `Command::Once`.
    #[serde(default)]
    requests: Vec<Uuid>,
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let form = Form::deserialize(deserializer)?;
        let mut state = Self::from_parts(form.groups, form.certificates, form.cluster)
            .map_err(serde::de::Error::custom)?;
        if form.requests.len() > REQUESTS_KEPT {
            return Err(serde::de::Error::custom(format!(
                "state remembers {} requests, more than {REQUESTS_KEPT}",
                form.requests.len()
            )));
        }
        state.requests = Requests::from_ordered(form.requests);
        Ok(state)
    }
}

impl State {
    /// A state holding `groups`, `certificates` and `cluster` (as read from
    /// a snapshot or from storage rows), with its indexes built. Refuses
    /// two groups of one uuid or name, two certificates of one name, and an
    /// fqdn or instance uuid held twice.
    pub(crate) fn from_parts(
        groups: impl IntoIterator<Item = ServiceGroup>,
        certificates: impl IntoIterator<Item = Certificate>,
        cluster: Option<ClusterSecrets>,
    ) -> Result<Self, String> {
        let mut state = Self::default();
        for g in groups {
            if state.groups.contains_key(&g.uuid) {
                return Err(format!("state holds group {} twice", g.uuid));
            }
            state
                .index(&g)
                .map_err(|what| format!("state holds {what} twice"))?;
            state.groups.insert(g.uuid, Arc::new(g));
        }
        for c in certificates {
            if state.certificates.contains_key(&c.name) {
                return Err(format!("state holds certificate {:?} twice", c.name));
            }
            state.certificates.insert(c.name.clone(), Arc::new(c));
        }
        state.cluster = cluster.map(Arc::new);
        Ok(state)
    }

    /// This state remembering the requests stored as `rows` (sequence
    /// number, uuid).
    pub(crate) fn with_request_rows(
        mut self,
        rows: impl IntoIterator<Item = (u64, Uuid)>,
    ) -> Result<Self, String> {
        self.requests = Requests::from_rows(rows)?;
        Ok(self)
    }

    /// How many request uuids are remembered.
    pub fn requests_remembered(&self) -> usize {
        self.requests.len()
    }

    /// The remembered request uuids by sequence number, oldest first.
    pub(crate) fn requests(&self) -> impl Iterator<Item = (u64, Uuid)> + '_ {
        self.requests.iter()
    }

    /// The request uuid stored under `seq`, if it is still remembered.
    pub(crate) fn request_at(&self, seq: u64) -> Option<Uuid> {
        self.requests.at(seq)
    }
}
