//! The cluster's certificates: a CA, and node certificates that name a node
//! id as the DNS name [`node_dns_name`] (`node-<id>.cluster.edgelb`).
//!
//! ```text
//!  generate_ca ─▶ CaBundle (cert + key, replicated)
//!  joining node: node_key_and_csr(id) ─▶ csr ─▶ member: sign_node_csr(ca, csr, id) ─▶ cert
//!  bootstrap / `edgectl certs node`: issue_node_cert(ca, id) ─▶ (cert, key)
//! ```
//!
//! Keys are ECDSA P-256. A node certificate carries exactly one subject
//! alternative name, its node's DNS name, and is good for both TLS client and
//! server authentication: every node dials and is dialled.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The DNS suffix under which node ids are named.
pub const NODE_DNS_SUFFIX: &str = "cluster.edgelb";

/// How long a cluster CA is valid.
const CA_VALIDITY: Duration = Duration::days(20 * 365);
/// How long a node certificate is valid. There is no rotation yet, so it
/// is long; operators who want short-lived certificates run their own PKI.
const NODE_VALIDITY: Duration = Duration::days(10 * 365);
/// Back-dating of `not_before`, for clocks that disagree a little.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Why a certificate could not be made or a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating a key or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// The CA certificate or key does not parse.
    #[error("bad cluster CA: {0}")]
    BadCa(#[source] rcgen::Error),
    /// The certificate request does not parse or its signature is wrong.
    #[error("bad certificate request: {0}")]
    BadCsr(#[source] rcgen::Error),
    /// The certificate request names something else than the node it is
    /// for.
    #[error("certificate request must name exactly {expected}, it names {found:?}")]
    WrongName {
        /// The one name the request may carry.
        expected: String,
        /// What the request carries.
        found: Vec<String>,
    },
}

/// The cluster CA: a PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone, PartialEq, Eq)]
pub struct CaBundle {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The DNS name that a node certificate for node `id` carries.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}.{NODE_DNS_SUFFIX}")
}

/// A new cluster CA (ECDSA P-256) named after the cluster.
pub fn generate_ca(cluster_name: &str) -> Result<CaBundle, PkiError> {
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("edgelb cluster CA {cluster_name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
    Ok(CaBundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new node key and a certificate request for node `id`: (key PEM,
/// CSR PEM). The key stays on the node; the CSR goes to a member's admin API.
pub fn node_key_and_csr(id: u64) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let params = CertificateParams::new(vec![node_dns_name(id)]).map_err(PkiError::Generate)?;
    let csr = params.serialize_request(&key).map_err(PkiError::Generate)?;
    let csr_pem = csr.pem().map_err(PkiError::Generate)?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Signs a joining node's certificate request with the cluster CA.
///
/// The request must carry exactly one subject alternative name,
/// [`node_dns_name`]`(id)`; anything else is refused. Only the request's
/// public key is used: the issued certificate's name, usages and validity are
/// chosen here.
pub fn sign_node_csr(ca: &CaBundle, csr_pem: &str, id: u64) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
    let expected = node_dns_name(id);
    let found: Vec<String> = csr.params.subject_alt_names.iter().map(san_text).collect();
    if found != [expected.as_str()] {
        return Err(PkiError::WrongName { expected, found });
    }
    let request = CertificateSigningRequestParams {
        params: node_params(id)?,
        public_key: csr.public_key,
    };
    let (issuer, issuer_key) = load_ca(ca)?;
    let cert = request
        .signed_by(&issuer, &issuer_key)
        .map_err(PkiError::Generate)?;
    Ok(cert.pem())
}

/// A new key and certificate for node `id`, signed by the cluster CA:
/// (certificate PEM, key PEM). For bootstrap and `edgectl certs node`.
pub fn issue_node_cert(ca: &CaBundle, id: u64) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let (issuer, issuer_key) = load_ca(ca)?;
    let cert = node_params(id)?
        .signed_by(&key, &issuer, &issuer_key)
        .map_err(PkiError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The parameters of every node certificate this module issues.
fn node_params(id: u64) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(vec![node_dns_name(id)]).map_err(PkiError::Generate)?;
    params.distinguished_name = name(&node_dns_name(id));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + NODE_VALIDITY;
    Ok(params)
}

/// The CA as an rcgen issuer: its parameters re-read from the certificate
/// (same subject and key identifier, so what it signs chains to the PEM).
fn load_ca(ca: &CaBundle) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem).map_err(PkiError::BadCa)?;
    let params = CertificateParams::from_ca_cert_pem(&ca.cert_pem).map_err(PkiError::BadCa)?;
    let cert = params.self_signed(&key).map_err(PkiError::BadCa)?;
    Ok((cert, key))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::DnsName(n) => n.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_for_the_right_node_is_signed() {
        let ca = generate_ca("test").unwrap();
        let (_key, csr) = node_key_and_csr(3).unwrap();
        let cert = sign_node_csr(&ca, &csr, 3).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn csr_for_another_node_is_refused() {
        let ca = generate_ca("test").unwrap();
        let (_key, csr) = node_key_and_csr(4).unwrap();
        match sign_node_csr(&ca, &csr, 3) {
            Err(PkiError::WrongName { expected, found }) => {
                assert_eq!(expected, "node-3.cluster.edgelb");
                assert_eq!(found, ["node-4.cluster.edgelb"]);
            }
            other => panic!("expected WrongName, got {other:?}"),
        }
    }

    #[test]
    fn csr_with_extra_names_is_refused() {
        let ca = generate_ca("test").unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec![node_dns_name(3), "evil.example".to_owned()]).unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            sign_node_csr(&ca, &csr, 3),
            Err(PkiError::WrongName { .. })
        ));
    }

    #[test]
    fn garbage_csr_and_ca_are_errors() {
        let ca = generate_ca("test").unwrap();
        assert!(matches!(
            sign_node_csr(&ca, "not a csr", 1),
            Err(PkiError::BadCsr(_))
        ));
        let bad = CaBundle {
            cert_pem: ca.cert_pem.clone(),
            key_pem: "nope".into(),
        };
        assert!(matches!(issue_node_cert(&bad, 1), Err(PkiError::BadCa(_))));
    }
}
