//! The TOML configuration file.

use std::path::Path;

use crate::config::{Config, parse_duration};
use crate::limits;

/// Loading never panics, and a loaded configuration holds what `load`
/// promises: checked durations and limits.
pub fn toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_duration(text);
    let Ok(c) = Config::from_toml(text, Path::new("fuzz.toml")) else {
        return;
    };
    assert!(c.settings.max_connections >= 1);
    assert!(c.settings.admin_max_connections >= 1);
    assert!(c.gossip.min_interval <= c.gossip.interval && c.gossip.interval < c.gossip.ttl);
    assert!(c.raft.heartbeat_interval.saturating_mul(3) <= c.raft.election_timeout);
    let _ = limits::needed(c.settings.max_connections, limits::fixed(&c.settings));
    let _ = c.advertised_cluster_addr(c.cluster_addr);
}
