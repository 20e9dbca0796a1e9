//! The cluster's certificates: a CA, and node certificates that name a node
//! id as the DNS name [`node_dns_name`] (`node-<id>.cluster.edgelb`).
//!
//! ```text
//!  generate_ca ─▶ CaBundle (cert + key, replicated)
//!  joining node: node_key_and_csr(id) ─▶ csr ─▶ member: sign_node_csr(ca, csr, id) ─▶ cert
//!  bootstrap / `edgectl certs node`: issue_node_cert(ca, id) ─▶ (cert, key)
//!  the node's renewal: renew_node_cert(ca, key, id) ─▶ cert for the same key
//! ```
//!
//! Node certificates live [`DEFAULT_NODE_LIFETIME`] (90 days) unless the
//! node is configured otherwise (`node_cert_lifetime`), and a node renews
//! its own once less than a third of the lifetime is left
//! ([`renewal_due`]).
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
/// How long a node certificate is valid unless configured otherwise
/// (`node_cert_lifetime`): 90 days, renewed with a third left.
pub const DEFAULT_NODE_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(90 * 24 * 3600);
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
    /// A node key does not parse.
    #[error("bad node key: {0}")]
    BadKey(#[source] rcgen::Error),
    /// A certificate does not parse.
    #[error("bad certificate: {0}")]
    BadCertificate(#[source] rcgen::Error),
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

/// The node ids that the (first) certificate in `cert_pem` names, by its
/// DNS names of the form [`node_dns_name`].
pub fn named_nodes(cert_pem: &str) -> Result<Vec<u64>, PkiError> {
    let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(PkiError::BadCertificate)?;
    let suffix = format!(".{NODE_DNS_SUFFIX}");
    Ok(params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::DnsName(name) => name.as_str().strip_suffix(suffix.as_str()),
            _ => None,
        })
        .filter_map(|label| label.strip_prefix("node-")?.parse().ok())
        .collect())
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
    sign_node_csr_for(ca, csr_pem, id, DEFAULT_NODE_LIFETIME)
}

/// [`sign_node_csr`] for a certificate valid for `lifetime`.
pub fn sign_node_csr_for(
    ca: &CaBundle,
    csr_pem: &str,
    id: u64,
    lifetime: std::time::Duration,
) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
    let expected = node_dns_name(id);
    let found: Vec<String> = csr.params.subject_alt_names.iter().map(san_text).collect();
    if found != [expected.as_str()] {
        return Err(PkiError::WrongName { expected, found });
    }
    let request = CertificateSigningRequestParams {
        params: node_params(id, lifetime)?,
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
    issue_node_cert_for(ca, id, DEFAULT_NODE_LIFETIME)
}

/// [`issue_node_cert`] for a certificate valid for `lifetime`.
pub fn issue_node_cert_for(
    ca: &CaBundle,
    id: u64,
    lifetime: std::time::Duration,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let cert = sign_node_key(ca, &key, id, lifetime)?;
    Ok((cert, key.serialize_pem()))
}

/// A new certificate for node `id` and its existing key (`key_pem`), signed
/// by the cluster CA: what a node renews its certificate with.
pub fn renew_node_cert(
    ca: &CaBundle,
    key_pem: &str,
    id: u64,
    lifetime: std::time::Duration,
) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(PkiError::BadKey)?;
    sign_node_key(ca, &key, id, lifetime)
}

/// A certificate (PEM) for node `id`'s `key`, signed by the cluster CA.
fn sign_node_key(
    ca: &CaBundle,
    key: &KeyPair,
    id: u64,
    lifetime: std::time::Duration,
) -> Result<String, PkiError> {
    let (issuer, issuer_key) = load_ca(ca)?;
    let cert = node_params(id, lifetime)?
        .signed_by(key, &issuer, &issuer_key)
        .map_err(PkiError::Generate)?;
    Ok(cert.pem())
}

/// When the (first) certificate in `cert_pem` stops being valid.
pub fn not_after(cert_pem: &str) -> Result<OffsetDateTime, PkiError> {
    CertificateParams::from_ca_cert_pem(cert_pem)
        .map(|p| p.not_after)
        .map_err(PkiError::BadCertificate)
}

/// Whether a certificate valid until `not_after` and issued for `lifetime`
/// is due for renewal at `now`: less than a third of its lifetime is left
/// (30 days of 90), or it has expired.
pub fn renewal_due(
    not_after: OffsetDateTime,
    lifetime: std::time::Duration,
    now: OffsetDateTime,
) -> bool {
    let third = Duration::try_from(lifetime / 3).unwrap_or(Duration::MAX);
    not_after - now < third
}

/// The parameters of every node certificate this module issues.
fn node_params(id: u64, lifetime: std::time::Duration) -> Result<CertificateParams, PkiError> {
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
    params.not_after = now + Duration::try_from(lifetime).unwrap_or(Duration::MAX);
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
    fn a_node_certificate_names_its_node() {
        let ca = generate_ca("test").unwrap();
        let (cert, _key) = issue_node_cert(&ca, 42).unwrap();
        assert_eq!(named_nodes(&cert).unwrap(), [42]);
        // The CA names no node; garbage is an error, not a panic.
        assert_eq!(named_nodes(&ca.cert_pem).unwrap(), Vec::<u64>::new());
        assert!(named_nodes("not a certificate").is_err());
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
    fn node_certificates_live_90_days_and_are_renewed_with_a_third_left() {
        let ca = generate_ca("test").unwrap();
        let (cert, key) = issue_node_cert(&ca, 3).unwrap();
        let now = OffsetDateTime::now_utc();
        let left = not_after(&cert).unwrap() - now;
        assert!(
            left <= Duration::days(90) && left > Duration::days(89),
            "{left}"
        );
        let lifetime = DEFAULT_NODE_LIFETIME;
        let expiry = not_after(&cert).unwrap();
        assert!(!renewal_due(expiry, lifetime, now));
        assert!(!renewal_due(expiry, lifetime, now + Duration::days(59)));
        assert!(renewal_due(expiry, lifetime, now + Duration::days(61)));
        assert!(renewal_due(expiry, lifetime, now + Duration::days(100)));

        // A renewal keeps the key and moves the expiry.
        let short = std::time::Duration::from_secs(60);
        let renewed = renew_node_cert(&ca, &key, 3, short).unwrap();
        assert_ne!(renewed, cert);
        let until = not_after(&renewed).unwrap() - now;
        assert!(until <= Duration::seconds(61), "{until}");
        assert!(matches!(
            renew_node_cert(&ca, "nope", 3, short),
            Err(PkiError::BadKey(_))
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
