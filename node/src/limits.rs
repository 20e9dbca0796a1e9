//! The file descriptors a node needs, checked against `RLIMIT_NOFILE`
//! before any port is bound.
//!
//! Each client connection takes two descriptors (the client's and the
//! instance's), each admin connection one, each published port two per
//! worker (its listener and the copy kept for an upgrade; at most
//! `max_published_ports` ports are bound), and the node itself some more
//! (Raft storage, the cluster endpoint, idle pooled upstream
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
/// `fixed` more (the admin connections and the published ports).
pub fn needed(max_connections: usize, fixed: u64) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(fixed)
        .saturating_add(HEADROOM)
}

/// Descriptors the settings need besides client connections: one per
/// admin connection and two per published port and worker.
pub fn fixed(settings: &Settings) -> u64 {
    (settings.max_published_ports as u64)
        .saturating_mul(settings.workers as u64)
        .saturating_mul(2)
        .saturating_add(settings.admin_max_connections as u64)
}

/// Which of the budgeted settings were configured (the others may be
/// lowered to fit).
#[derive(Clone, Copy, Debug, Default)]
pub struct Explicit {
    pub max_connections: bool,
    pub max_published_ports: bool,
}

/// The share of the descriptor limit that the default
/// `max_published_ports` may take (the rest is for connections): an
/// eighth, so that 1,024 ports on every worker of a large machine do not
/// halve the connections a node that publishes two ports can hold.
const PORTS_SHARE: u64 = 8;

/// Makes `settings` fit the process's descriptor limit, raising the soft
/// limit as needed. What `explicit` does not name may be lowered.
pub fn fit_open_files(settings: &mut Settings, explicit: Explicit) -> Result<(), ConfigError> {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if !explicit.max_published_ports {
        let per_port = (settings.workers as u64).max(1) * 2;
        let fits = usize::try_from(hard / PORTS_SHARE / per_port).unwrap_or(usize::MAX);
        if fits < settings.max_published_ports {
            info!(
                max_published_ports = fits.max(1),
                hard_limit = hard,
                "max_published_ports lowered to an eighth of the open files limit"
            );
            settings.max_published_ports = fits.max(1);
        }
    }
    let admin = settings.admin_max_connections;
    let fixed = fixed(settings);
    let ports = fixed - admin as u64;
    let mut want = needed(settings.max_connections, fixed);
    if want > hard {
        let spare = hard.saturating_sub(fixed.saturating_add(HEADROOM)) / 2;
        if explicit.max_connections || spare == 0 {
            return Err(ConfigError::new(
                "max_connections",
                format!(
                    "{} client connections need about {want} file descriptors (2 per connection, \
                     {admin} for admin_max_connections, {ports} for max_published_ports on \
                     every worker, {HEADROOM} for the node), but the RLIMIT_NOFILE hard limit \
                     is {hard}: lower max_connections or max_published_ports, or raise the limit \
                     (ulimit -Hn, systemd's LimitNOFILE=)",
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
        want = needed(fitted, fixed);
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
    fn two_descriptors_per_connection_plus_admin_ports_and_headroom() {
        let s = Settings {
            max_connections: 1000,
            admin_max_connections: 256,
            max_published_ports: 100,
            workers: 4,
            ..Settings::default()
        };
        assert_eq!(fixed(&s), 256 + 100 * 4 * 2);
        assert_eq!(needed(1000, fixed(&s)), 2000 + 256 + 800 + HEADROOM);
        assert_eq!(needed(usize::MAX, 1), u64::MAX);
    }

    #[test]
    fn the_current_limit_is_enough_for_a_small_node() {
        let mut s = Settings {
            max_connections: 16,
            admin_max_connections: 4,
            max_published_ports: 8,
            ..Settings::default()
        };
        let both = Explicit {
            max_connections: true,
            max_published_ports: true,
        };
        fit_open_files(&mut s, both).unwrap();
        assert_eq!(s.max_connections, 16);
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        assert!(soft >= needed(16, fixed(&s)));
    }

    #[test]
    fn the_default_ports_take_at_most_an_eighth_of_the_limit() {
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        let mut s = Settings {
            max_connections: 16,
            admin_max_connections: 4,
            max_published_ports: 65535,
            workers: 4,
            ..Settings::default()
        };
        fit_open_files(&mut s, Explicit::default()).unwrap();
        let fits = usize::try_from(hard / 8 / 8).unwrap_or(usize::MAX).max(1);
        assert_eq!(s.max_published_ports, fits.min(65535));
        assert!(fixed(&s) - 4 <= (hard / 8).max(8), "{}", fixed(&s));
    }

    #[test]
    fn more_than_any_limit_is_refused_when_explicit_and_lowered_when_default() {
        let huge = usize::MAX / 4;
        let mut s = Settings {
            max_connections: huge,
            ..Settings::default()
        };
        let connections = Explicit {
            max_connections: true,
            max_published_ports: false,
        };
        let err = fit_open_files(&mut s, connections).unwrap_err();
        assert_eq!(err.field, "max_connections");
        assert!(err.message.contains("RLIMIT_NOFILE"), "{err}");
        if getrlimit(Resource::Nofile).maximum.is_some() {
            fit_open_files(&mut s, Explicit::default()).unwrap();
            assert!(s.max_connections < huge);
        }
    }
}
