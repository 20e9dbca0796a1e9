//! TLS to an admin API served over `https://` (`--cacert`): the server's
//! certificate must chain to the CA in `--cacert` and name the host of
//! `--api` or be a node's cluster certificate
//! ([`edgelb_client::tls::client_config`]).

use std::path::Path;
use std::sync::Arc;

use rustls::{CertificateError, ClientConfig};

use crate::error::{Failure, Outcome};

/// A client config trusting only the CA certificates in `cacert` (PEM).
pub fn client_config(cacert: &Path) -> Outcome<Arc<ClientConfig>> {
    let shown = cacert.display();
    let pem =
        std::fs::read(cacert).map_err(|e| Failure::local(format!("--cacert {shown}: {e}")))?;
    edgelb_client::tls::client_config(&pem)
        .map_err(|e| Failure::local(format!("--cacert {shown}: {e}")))
}

/// What a failed handshake means to the operator, in a few words.
pub fn reason(e: &std::io::Error, cacert: &Path, host: &str) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return format!("the TLS handshake failed: {e}");
    };
    let ca = cacert.display();
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("its certificate is not signed by the CA in --cacert {ca} ({c:?})")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("its certificate names neither {host} nor a cluster node")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "its certificate has expired".to_owned()
            }
            other => format!("its certificate was refused: {other:?}"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "the TLS handshake failed ({tls}): does the admin API serve TLS? (without admin_tls use http://)"
        ),
        other => format!("the TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_a_local_error() {
        let dir = std::env::temp_dir().join(format!("edgectl-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = client_config(&empty).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let e = client_config(&dir.join("missing.pem")).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        assert!(e.to_string().contains("--cacert"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
