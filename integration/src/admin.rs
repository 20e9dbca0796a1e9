//! The tests' side of one node's admin API: [`edgelb_client::Client`] (one
//! bounded request per connection) with the cluster's bearer token, its
//! answers as [`Reply`]s and JSON for the tests to pick apart.
//! [`TestNode`](crate::TestNode) and [`Cluster`](crate::cluster::Cluster)
//! members both speak through it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use edgelb_api::services::InstanceView;
use edgelb_client::{ApiUrl, Client};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::client::Reply;
use crate::metrics::Scrape;
use crate::{patient, within};

/// A group as the admin API created it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub uuid: String,
    pub name: String,
}

/// The admin API of one node.
#[derive(Clone, Debug)]
pub struct AdminClient {
    pub addr: SocketAddr,
    pub token: String,
}

impl AdminClient {
    /// A client of the admin API on `addr` presenting `token`.
    pub fn new(addr: SocketAddr, token: &str) -> Self {
        Self {
            addr,
            token: token.to_owned(),
        }
    }

    /// One request with the client's token.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Reply> {
        self.request_as(method, path, body, Some(&self.token)).await
    }

    /// One request with `token` (none: no `Authorization` header), bounded
    /// by 10 s (scaled by [`patience`](crate::patience)).
    pub async fn request_as(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let bound = Duration::from_secs(10);
        let mut client =
            Client::new(ApiUrl::http(self.addr)).with_timeouts(patient(bound), patient(bound));
        if let Some(t) = token {
            client = client.with_token(t);
        }
        let body = body.map(|b| Bytes::from(b.to_string()));
        let answer = within(
            &format!("an admin API answer from {}", self.addr),
            bound,
            client.send(method, path, body),
        )
        .await??;
        Ok(Reply {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
        })
    }

    /// `GET path` → status and JSON body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let r = self.request(Method::GET, path, None).await?;
        Ok((r.status, r.json()))
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let r = self.request(Method::POST, path, Some(body)).await?;
        Ok((r.status, r.json()))
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let r = self.request(Method::PATCH, path, Some(body)).await?;
        Ok((r.status, r.json()))
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let r = self.request(Method::DELETE, path, None).await?;
        Ok((r.status, r.json()))
    }

    /// Creates a group from a `POST /v1/services` body.
    pub async fn create_group(&self, body: &Value) -> anyhow::Result<Group> {
        let (status, v) = self.post("/v1/services", body).await?;
        ensure!(status.is_success(), "creating group {body}: {status} {v}");
        group_of(&v)
    }

    /// `data.service_groups` of `GET /v1/services[?consistent=true]`.
    pub async fn groups(&self, consistent: bool) -> anyhow::Result<Vec<Value>> {
        let path = if consistent {
            "/v1/services?consistent=true"
        } else {
            "/v1/services"
        };
        let (status, v) = self.get(path).await?;
        ensure!(status == StatusCode::OK, "GET {path}: {status} {v}");
        v["data"]["service_groups"]
            .as_array()
            .cloned()
            .context("data.service_groups is not a list")
    }

    /// `data.instances` of `GET /v1/services/{group}/instances` (uuid or
    /// name), sorted by name.
    pub async fn instances(&self, group: &str) -> anyhow::Result<Vec<InstanceView>> {
        let path = format!("/v1/services/{group}/instances");
        let (status, v) = self.get(&path).await?;
        ensure!(status == StatusCode::OK, "GET {path}: {status} {v}");
        let mut out: Vec<InstanceView> = serde_json::from_value(v["data"]["instances"].clone())
            .with_context(|| format!("data.instances of GET {path}: {v}"))?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Scrapes `GET /metrics`.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        let r = self.request(Method::GET, "/metrics", None).await?;
        ensure!(
            r.status == StatusCode::OK,
            "GET /metrics: {} {}",
            r.status,
            r.text()
        );
        Scrape::parse(&r.text())
    }
}

/// The first group of a `data.service_groups` answer.
pub fn group_of(v: &Value) -> anyhow::Result<Group> {
    let g = &v["data"]["service_groups"][0];
    let (Some(uuid), Some(name)) = (g["uuid"].as_str(), g["name"].as_str()) else {
        bail!("answer without service_groups[0].uuid/name: {v}");
    };
    Ok(Group {
        uuid: uuid.to_owned(),
        name: name.to_owned(),
    })
}
