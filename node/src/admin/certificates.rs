//! `/v1/certificates`: store certificates, list their names and expiry.
//! Keys are never answered.

use edgelb_api::services::{CertificateInfo, CertificateRequest, CertificatesData};
use hyper::body::Incoming;
use raft_store::command::Command;
use raft_store::model::Certificate;
use raft_store::state::Applied;
use raft_store::validate::valid_certificate_name;
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, PrimitiveDateTime, Time};

use super::reply::{ApiError, Reply, success};
use super::request::read_json;
use super::{Admin, unexpected};
use crate::tls::certified_key;

/// `POST /v1/certificates`: the PEM must parse and the key must match the
/// leaf certificate (400 otherwise) before it is proposed.
pub(crate) async fn create(admin: &Admin, body: Incoming) -> Result<Reply, ApiError> {
    let req: CertificateRequest = read_json(body).await?;
    if !valid_certificate_name(&req.name) {
        return Err(ApiError::invalid(format!(
            "certificate name {:?} is not valid: use a-z, 0-9, '.', '_' and '-', 1-253 chars, starting with a letter or digit",
            req.name
        )));
    }
    let bad =
        |e: &dyn std::fmt::Display| ApiError::invalid(format!("certificate {:?}: {e}", req.name));
    let key = certified_key(&req.chain, &req.private_key).map_err(|e| bad(&e))?;
    let not_after = key.cert.first().and_then(|der| not_after(der.as_ref()));
    let certificate = Certificate {
        name: req.name,
        chain: req.chain,
        private_key: req.private_key,
        not_after: not_after.clone(),
    };
    match admin
        .store
        .propose(Command::PutCertificate { certificate })
        .await?
    {
        Applied::Certificate(name) => Ok(success(CertificatesData {
            certificates: vec![CertificateInfo { name, not_after }],
        })),
        other => Err(unexpected(&other)),
    }
}

/// `GET /v1/certificates`.
pub(crate) fn list(admin: &Admin) -> Reply {
    let state = admin.store.state();
    let certificates = state
        .certificates()
        .map(|c| CertificateInfo {
            name: c.name.clone(),
            not_after: c.not_after.clone(),
        })
        .collect();
    success(CertificatesData { certificates })
}

/// `notAfter` of a DER X.509 certificate as RFC 3339, or `None` if the DER
/// is not shaped as expected. Walks only the fields before `validity`:
///
/// ```text
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
///     [0] version OPTIONAL, serialNumber INTEGER, signature SEQUENCE,
///     issuer SEQUENCE, validity SEQUENCE { notBefore Time, notAfter Time }, ... } ... }
/// ```
pub(crate) fn not_after(der: &[u8]) -> Option<String> {
    let (cert, _) = tlv(der, Some(0x30))?;
    let (tbs, _) = tlv(cert, Some(0x30))?;
    let rest = match tbs.first() {
        Some(0xa0) => tlv(tbs, Some(0xa0))?.1,
        _ => tbs,
    };
    let (_, rest) = tlv(rest, Some(0x02))?; // serialNumber
    let (_, rest) = tlv(rest, Some(0x30))?; // signature
    let (_, rest) = tlv(rest, Some(0x30))?; // issuer
    let (validity, _) = tlv(rest, Some(0x30))?;
    let (_, rest) = tlv(validity, None)?; // notBefore
    let tag = *rest.first()?;
    let (time, _) = tlv(rest, None)?;
    der_time(tag, time)
}

/// One DER element: its contents and what follows it. `tag` is checked when
/// given.
fn tlv(input: &[u8], tag: Option<u8>) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if tag.is_some_and(|want| want != t) {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        let len = bytes
            .iter()
            .fold(0_usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest.get(n..)?)
    };
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`, tag 0x18) as RFC 3339.
fn der_time(tag: u8, value: &[u8]) -> Option<String> {
    let digits = value.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        digits
            .get(range)?
            .iter()
            .try_fold(0_u32, |acc, d| Some(acc * 10 + u32::from(d - b'0')))
    };
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let field = |i: usize| num(rest + 2 * i..rest + 2 * i + 2).and_then(|n| u8::try_from(n).ok());
    let month = Month::try_from(field(0)?).ok()?;
    let date = Date::from_calendar_date(i32::try_from(year).ok()?, month, field(1)?).ok()?;
    let time = Time::from_hms(field(2)?, field(3)?, field(4)?).ok()?;
    PrimitiveDateTime::new(date, time)
        .assume_utc()
        .format(&Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_of_rcgen_certificates() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        for ((y, m, d), want) in [
            ((2049, 12, 31), "2049-12-31T00:00:00Z"),
            ((2051, 1, 2), "2051-01-02T00:00:00Z"),
        ] {
            let mut params =
                rcgen::CertificateParams::new(vec!["example.com".to_owned()]).expect("params");
            params.not_after = rcgen::date_time_ymd(y, m, d);
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("self-signed");
            assert_eq!(not_after(cert.der()).as_deref(), Some(want));
        }
    }

    #[test]
    fn not_after_never_panics_on_garbage() {
        assert_eq!(not_after(&[]), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
        assert_eq!(der_time(0x17, b"49123100000Z"), None);
        assert_eq!(der_time(0x17, b"491331000000Z"), None);
        assert_eq!(
            der_time(0x18, b"20491231000000Z").as_deref(),
            Some("2049-12-31T00:00:00Z")
        );
    }
}
