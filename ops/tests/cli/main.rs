//! `edgectl` end to end: the real binary against real nodes.
//!
//! - `services`: create (the seed's 443 shorthand and explicit specs), list
//!   in every format (golden outputs), get, attach, detach, rm.
//! - `errors`: every error path prints one line and exits with the
//!   documented code.
//! - `cluster`: `cluster status|add-node|remove-node` on a one-node cluster.
//! - `certs`: `certs init` and `certs node` make a working own-PKI cluster.
//! - `local`: `cluster local --nodes 3` with the real `edgelb` binary; a
//!   killed node leaves the others running and `start-node` brings it back.
//! - `tls`: `--cacert` against a node serving the admin API over TLS, with
//!   its cluster certificate or an operator's; a wrong CA exits 3.
//! - `deploy`: the deployment kit (configs, systemd unit, Prometheus,
//!   Grafana) against the node's loader, `systemd-analyze`, `promtool` and
//!   a live `/metrics`.
//! - `prometheus`: a real Prometheus server scrapes a local 3-node cluster
//!   with the kit's scrape config and rules; every series, rule and
//!   dashboard query is checked through its HTTP API.

mod certs;
mod cluster;
mod deploy;
mod errors;
mod local;
mod prometheus;
mod services;
mod support;
mod tls;
