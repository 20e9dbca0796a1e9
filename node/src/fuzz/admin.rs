//! Admin API request bodies (`POST`/`PATCH` JSON), checked as the handlers
//! check them and then dry-run against the fixture state, as a proposal
//! would be.

use edgelb_api::cluster::AddNodeRequest;
use edgelb_api::services::{
    AttachRequest, CertificateRequest, CreateGroupRequest, PatchRequest, PatchValue, resolve_patch,
};
use raft_store::command::{Command, Patch};
use raft_store::model::{Certificate, DEFAULT_HARD_LIMIT, Instance, ServiceGroup};
use raft_store::validate::{valid_address, valid_certificate_name};
use uuid::Uuid;

use super::fixture;
use crate::admin::certificates::not_after;
use crate::admin::groups::{check_name, to_domains};
use crate::tls::certified_key;

/// The first byte picks the route, the rest is the body: 0 create a group,
/// 1 patch one, 2 attach an instance, 3 store a certificate, 4 add a node
/// (without a CSR; the `csr` target signs those).
pub fn body(data: &[u8]) {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => create_group(json),
        1 => patch_group(json),
        2 => attach(json),
        3 => certificate(json),
        _ => add_node(json),
    }
}

fn create_group(json: &[u8]) {
    let Ok(req) = serde_json::from_slice::<CreateGroupRequest>(json) else {
        return;
    };
    let name = req.name.unwrap_or_else(|| "quiet-river-x8f2k1ab".into());
    if check_name("service group", &name).is_err() {
        return;
    }
    let Ok(domains) = to_domains(&req.domains.unwrap_or_default()) else {
        return;
    };
    fixture::apply(&Command::CreateGroup {
        group: ServiceGroup {
            uuid: Uuid::from_u128(100),
            name,
            domains,
            services: req.services,
            hard_limit: req.hard_limit.unwrap_or(DEFAULT_HARD_LIMIT),
            instances: Vec::new(),
            created_at: "2026-01-01T00:00:00Z".into(),
            persistent: true,
            health_check: None,
            send_proxy_protocol: None,
        },
    });
}

fn patch_group(json: &[u8]) {
    let Ok(req) = serde_json::from_slice::<PatchRequest>(json) else {
        return;
    };
    let Ok(value) = resolve_patch(req) else {
        return;
    };
    let patch = match value {
        PatchValue::Services(op, value) => Patch::Services { op, value },
        PatchValue::Domains(op, value) => {
            let Ok(value) = to_domains(&value) else {
                return;
            };
            Patch::Domains { op, value }
        }
        PatchValue::HardLimit(n) => Patch::HardLimit(n),
        PatchValue::HealthCheck(check) => Patch::HealthCheck(check.map(Box::new)),
        PatchValue::SendProxyProtocol(version) => Patch::SendProxyProtocol(version),
    };
    for id in ["web", "api", "db"] {
        fixture::apply(&Command::PatchGroup {
            id: id.into(),
            patch: patch.clone(),
        });
    }
}

fn attach(json: &[u8]) {
    let Ok(req) = serde_json::from_slice::<AttachRequest>(json) else {
        return;
    };
    let name = req.name.unwrap_or_else(|| "web-3kq9z".into());
    if check_name("instance", &name).is_err() || !valid_address(&req.address) {
        return;
    }
    fixture::apply(&Command::AttachInstance {
        group: "web".into(),
        instance: Instance {
            uuid: Uuid::from_u128(101),
            name,
            address: req.address,
        },
    });
}

fn certificate(json: &[u8]) {
    let Ok(req) = serde_json::from_slice::<CertificateRequest>(json) else {
        return;
    };
    if !valid_certificate_name(&req.name) {
        return;
    }
    let Ok(key) = certified_key(&req.chain, &req.private_key) else {
        return;
    };
    let _ = key.keys_match();
    let not_after = key.cert.first().and_then(|der| not_after(der.as_ref()));
    fixture::apply(&Command::PutCertificate {
        certificate: Certificate {
            name: req.name,
            chain: req.chain,
            private_key: req.private_key,
            not_after,
        },
    });
}

fn add_node(json: &[u8]) {
    // The checks before the membership change: ids, addresses, region.
    let Ok(req) = serde_json::from_slice::<AddNodeRequest>(json) else {
        return;
    };
    let _ = req.cluster_addr.parse::<std::net::SocketAddr>();
    let _ = req.admin_addr.parse::<std::net::SocketAddr>();
}
