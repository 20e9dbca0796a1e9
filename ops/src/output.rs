//! Output formats: `-o table` (a header row and aligned columns), `-o list`
//! (one `key: value` block per item, keys right-aligned as in
//! `kraft cloud service list -o list`, blocks separated by a blank line) and
//! `-o json` (the API's `data`, pretty-printed).
//!
//! Times are shown relative to a clock that is passed in (`14 minutes ago`),
//! so that rendering is deterministic under test.

use std::fmt::Write as _;

use clap::ValueEnum;
use edgelb_api::model::ServiceGroup;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `-o FORMAT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A header row and aligned columns.
    Table,
    /// One `key: value` block per item.
    List,
    /// The API's `data`, pretty-printed.
    Json,
}

/// Columns under a header row, left-aligned, two spaces apart; the last
/// column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the keys right-aligned to the longest one.
pub fn block(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields {
        let line = format!("{key:>width$}: {value}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Blocks separated by one blank line.
pub fn blocks(items: impl IntoIterator<Item = String>) -> String {
    items.into_iter().collect::<Vec<_>>().join("\n")
}

/// Pretty JSON with a final newline.
pub fn json<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("\"{e}\""));
    s.push('\n');
    s
}

/// The seed's `-o list` fields of a group, in its order: `uuid`, `name`,
/// `fqdn` (the first domain), `services`, `instances` (uuids), `created at`,
/// `persistent`.
pub fn group_fields(g: &ServiceGroup, now: OffsetDateTime) -> Vec<(&'static str, String)> {
    vec![
        ("uuid", g.uuid.to_string()),
        ("name", g.name.clone()),
        ("fqdn", fqdn(g)),
        ("services", services(g)),
        (
            "instances",
            g.instances
                .iter()
                .map(|i| i.uuid.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("created at", ago(&g.created_at, now)),
        ("persistent", g.persistent.to_string()),
    ]
}

/// Groups as `-o list` blocks.
pub fn groups_list(groups: &[ServiceGroup], now: OffsetDateTime) -> String {
    blocks(groups.iter().map(|g| block(&group_fields(g, now))))
}

/// Groups as `-o table`: NAME, FQDN, SERVICES, INSTANCES (how many),
/// CREATED.
pub fn groups_table(groups: &[ServiceGroup], now: OffsetDateTime) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                fqdn(g),
                services(g),
                g.instances.len().to_string(),
                ago(&g.created_at, now),
            ]
        })
        .collect();
    table(&["NAME", "FQDN", "SERVICES", "INSTANCES", "CREATED"], &rows)
}

fn fqdn(g: &ServiceGroup) -> String {
    g.domains
        .first()
        .map(|d| d.fqdn.clone())
        .unwrap_or_default()
}

fn services(g: &ServiceGroup) -> String {
    g.services
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// An RFC 3339 time relative to `now`: `now`, `1 second ago`,
/// `14 minutes ago`, `3 hours ago`, `2 days ago`, `5 weeks ago`,
/// `4 months ago`, `2 years ago` (go-humanize's wording, as kraft prints).
/// A time in the future (clock skew) reads `now`; one that does not parse is
/// shown as it is.
pub fn ago(rfc3339: &str, now: OffsetDateTime) -> String {
    let Ok(t) = OffsetDateTime::parse(rfc3339, &Rfc3339) else {
        return rfc3339.to_owned();
    };
    let secs = (now - t).whole_seconds();
    relative(secs)
}

/// `secs` seconds ago in words.
pub fn relative(secs: i64) -> String {
    const MINUTE: i64 = 60;
    const HOUR: i64 = 60 * MINUTE;
    const DAY: i64 = 24 * HOUR;
    const WEEK: i64 = 7 * DAY;
    const MONTH: i64 = 30 * DAY;
    const YEAR: i64 = 365 * DAY;
    let unit = |n: i64, name: &str| {
        let mut s = format!("{n} {name}");
        if n != 1 {
            s.push('s');
        }
        s.push_str(" ago");
        s
    };
    match secs {
        i64::MIN..=0 => "now".to_owned(),
        1..MINUTE => unit(secs, "second"),
        MINUTE..HOUR => unit(secs / MINUTE, "minute"),
        HOUR..DAY => unit(secs / HOUR, "hour"),
        DAY..WEEK => unit(secs / DAY, "day"),
        WEEK..MONTH => unit(secs / WEEK, "week"),
        MONTH..YEAR => unit(secs / MONTH, "month"),
        _ => unit(secs / YEAR, "year"),
    }
}

/// A duration in milliseconds, short: `850ms`, `2.3s`, `4m`.
pub fn millis(ms: u64) -> String {
    let mut s = String::new();
    let _ = match ms {
        0..1000 => write!(s, "{ms}ms"),
        1000..60_000 => write!(s, "{:.1}s", ms as f64 / 1000.0),
        _ => write!(s, "{}m", ms / 60_000),
    };
    s
}

#[cfg(test)]
mod tests {
    use edgelb_api::model::{Domain, Instance, parse_port_specs};
    use time::macros::datetime;

    use super::*;

    fn group() -> ServiceGroup {
        ServiceGroup {
            uuid: "954b4a52-fc51-4eac-b5c9-1fc2a368a237".parse().unwrap(),
            name: "wandering-shape-n6mhimgn".into(),
            domains: vec![Domain {
                fqdn: "wandering-shape-n6mhimgn.fra0.kraft.host".into(),
                certificate: None,
            }],
            services: parse_port_specs(&["443:8080"]).unwrap(),
            hard_limit: 65535,
            instances: [
                "06c972a6-a117-4b07-8eba-9389b4cccb42",
                "d6238ac6-27d2-47b3-8a45-c6cac99fb4ef",
            ]
            .iter()
            .enumerate()
            .map(|(n, u)| Instance {
                uuid: u.parse().unwrap(),
                name: format!("nginx-{n}"),
                address: format!("172.16.6.{n}"),
            })
            .collect(),
            created_at: "2025-01-01T12:00:00Z".into(),
            persistent: true,
            health_check: None,
            send_proxy_protocol: None,
        }
    }

    #[test]
    fn the_seed_list_block() {
        let now = datetime!(2025-01-01 12:14:30 UTC);
        assert_eq!(
            groups_list(&[group()], now),
            "      uuid: 954b4a52-fc51-4eac-b5c9-1fc2a368a237
      name: wandering-shape-n6mhimgn
      fqdn: wandering-shape-n6mhimgn.fra0.kraft.host
  services: 443:8080/tls+http 80:443/http+redirect
 instances: 06c972a6-a117-4b07-8eba-9389b4cccb42 d6238ac6-27d2-47b3-8a45-c6cac99fb4ef
created at: 14 minutes ago
persistent: true
"
        );
        let two = groups_list(&[group(), group()], now);
        assert!(two.contains("persistent: true\n\n      uuid:"), "{two}");
    }

    #[test]
    fn tables_align_and_do_not_trail() {
        let now = datetime!(2025-01-01 15:00:00 UTC);
        let mut g = group();
        g.instances.clear();
        assert_eq!(
            groups_table(&[group(), g], now),
            "NAME                      FQDN                                      SERVICES                                INSTANCES  CREATED
wandering-shape-n6mhimgn  wandering-shape-n6mhimgn.fra0.kraft.host  443:8080/tls+http 80:443/http+redirect  2          3 hours ago
wandering-shape-n6mhimgn  wandering-shape-n6mhimgn.fra0.kraft.host  443:8080/tls+http 80:443/http+redirect  0          3 hours ago
"
        );
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(-5), "now");
        assert_eq!(relative(0), "now");
        assert_eq!(relative(1), "1 second ago");
        assert_eq!(relative(59), "59 seconds ago");
        assert_eq!(relative(60), "1 minute ago");
        assert_eq!(relative(14 * 60 + 59), "14 minutes ago");
        assert_eq!(relative(3600), "1 hour ago");
        assert_eq!(relative(86_400 * 2), "2 days ago");
        assert_eq!(relative(86_400 * 7), "1 week ago");
        assert_eq!(relative(86_400 * 65), "2 months ago");
        assert_eq!(relative(86_400 * 800), "2 years ago");
        let now = datetime!(2025-01-01 12:00:00 UTC);
        assert_eq!(ago("not a time", now), "not a time");
        assert_eq!(ago("2025-01-01T11:00:00+00:00", now), "1 hour ago");
    }

    #[test]
    fn durations() {
        assert_eq!(millis(850), "850ms");
        assert_eq!(millis(2345), "2.3s");
        assert_eq!(millis(240_000), "4m");
    }
}
