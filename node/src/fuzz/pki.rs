//! Certificate signing requests of joining nodes (`POST /v1/cluster/nodes`
//! with a `csr`), signed with the cluster CA.

use std::time::Duration;

use super::fixture;
use crate::cluster::pki::{node_dns_name, sign_node_csr_for};

/// The node id the requests are for.
const ID: u64 = 7;

/// Signing never panics and issues a certificate only for node [`ID`]'s
/// name: the certificate carries that one name, whatever the request said.
pub fn csr(data: &[u8]) {
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cert) = sign_node_csr_for(fixture::ca(), pem, ID, Duration::from_secs(3600)) else {
        return;
    };
    let params = rcgen::CertificateParams::from_ca_cert_pem(&cert).expect("an issued cert parses");
    let names: Vec<String> = params
        .subject_alt_names
        .iter()
        .map(|n| match n {
            rcgen::SanType::DnsName(d) => d.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, [node_dns_name(ID)]);
}
