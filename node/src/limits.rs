//! The file descriptors a node needs, checked against `RLIMIT_NOFILE`
//! before any port is bound.
//!
//! Each client connection takes two descriptors (the client's and the
//! instance's), each admin connection one, and the node itself some more
//! (Raft storage, the cluster endpoint, listeners, idle pooled upstream
//! connections): [`HEADROOM`]. The soft limit is raised to what is needed;
//! when even the hard limit is too low, an explicitly configured
//! `max_connections` is a configuration error (exit 64), and the default
//! one is lowered to what fits, as HAProxy derives `maxconn` from the
//! limit.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tracing::{info, warn};

use crate::config::ConfigError;
use crate::dataplane::Settings;

/// Descriptors kept for the node's own use.
pub const HEADROOM: u64 = 512;

/// Descriptors that `max_connections` client connections need with
/// `admin` admin connections.
pub fn needed(max_connections: usize, admin: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(admin as u64)
        .saturating_add(HEADROOM)
}

/// Makes `settings` fit the process's descriptor limit, raising the soft
/// limit as needed. `explicit`: `max_connections` was configured (else it
/// may be lowered).
pub fn fit_open_files(settings: &mut Settings, explicit: bool) -> Result<(), ConfigError> {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let admin = settings.admin_max_connections;
    let mut want = needed(settings.max_connections, admin);
    if want > hard {
        let spare = hard.saturating_sub(admin as u64 + HEADROOM) / 2;
        if explicit || spare == 0 {
            return Err(ConfigError::new(
                "max_connections",
                format!(
                    "{} client connections need about {want} file descriptors (2 per connection, \
                     {admin} for admin_max_connections, {HEADROOM} for the node), but the \
                     RLIMIT_NOFILE hard limit is {hard}: lower max_connections or raise the \
                     limit (ulimit -Hn, systemd's LimitNOFILE=)",
                    settings.max_connections
                ),
            ));
        }
        let fitted = usize::try_from(spare).unwrap_or(usize::MAX);
        warn!(
            max_connections = fitted,
            hard_limit = hard,
            "max_connections lowered to fit the open files limit"
        );
        settings.max_connections = fitted;
        want = needed(fitted, admin);
    }
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft < want {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: limit.maximum,
            },
        )
        .map_err(|e| {
            ConfigError::new(
                "max_connections",
                format!("raising the open files limit from {soft} to {want}: {e}"),
            )
        })?;
        info!(from = soft, to = want, "raised the open files limit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_connection_plus_admin_and_headroom() {
        assert_eq!(needed(1000, 256), 2000 + 256 + HEADROOM);
        assert_eq!(needed(usize::MAX, 1), u64::MAX);
    }

    #[test]
    fn the_current_limit_is_enough_for_a_small_node() {
        let mut s = Settings {
            max_connections: 16,
            admin_max_connections: 4,
            ..Settings::default()
        };
        fit_open_files(&mut s, true).unwrap();
        assert_eq!(s.max_connections, 16);
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        assert!(soft >= needed(16, 4));
    }

    #[test]
    fn more_than_any_limit_is_refused_when_explicit_and_lowered_when_default() {
        let huge = usize::MAX / 4;
        let mut s = Settings {
            max_connections: huge,
            ..Settings::default()
        };
        let err = fit_open_files(&mut s, true).unwrap_err();
        assert_eq!(err.field, "max_connections");
        assert!(err.message.contains("RLIMIT_NOFILE"), "{err}");
        if getrlimit(Resource::Nofile).maximum.is_some() {
            fit_open_files(&mut s, false).unwrap();
            assert!(s.max_connections < huge);
        }
    }
}
