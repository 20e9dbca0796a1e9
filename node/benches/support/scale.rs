//! A state at edge-platform scale, shared by the routing benchmark and the
//! instance-memory example: groups of 10 instances sharing 50 HTTP ports by
//! domain (the shape of the scale benchmark in the README).

use std::net::Ipv4Addr;
use std::time::Duration;

use edgelb::routing::BuildContext;
use edgelb::tls::CertCache;
use raft_store::model::{Domain, Handler, Instance, Service, ServiceGroup};
use raft_store::{Command, State};
use uuid::Uuid;

/// Instances per group.
pub(crate) const PER_GROUP: usize = 10;
/// Published HTTP ports the groups share.
pub(crate) const PORTS: u16 = 50;

/// Group `g` with its `PER_GROUP` instances.
pub(crate) fn group(g: usize) -> ServiceGroup {
    let n = u32::try_from(g).expect("fewer than 2^32 groups");
    ServiceGroup {
        uuid: Uuid::from_u128(u128::from(n) + 1),
        name: format!("group-{g}"),
        domains: vec![Domain {
            fqdn: format!("group-{g}.example.com"),
            certificate: None,
        }],
        services: vec![Service {
            port: 8000 + u16::try_from(g % usize::from(PORTS)).expect("port"),
            destination_port: 9000,
            handlers: vec![Handler::Http],
        }],
        hard_limit: 65535,
        instances: (0..PER_GROUP)
            .map(|i| instance(n, u32::try_from(i).expect("small")))
            .collect(),
        created_at: "2025-01-01T00:00:00Z".into(),
        persistent: false,
        health_check: None,
        send_proxy_protocol: None,
    }
}

/// Instance `i` of group `g`.
pub(crate) fn instance(g: u32, i: u32) -> Instance {
    Instance {
        uuid: Uuid::from_u128((u128::from(g) + 1) << 32 | u128::from(i)),
        name: format!("instance-{i}"),
        address: Ipv4Addr::from(0x0a00_0000 + g * 64 + i).to_string(),
    }
}

/// A state with `instances / PER_GROUP` groups.
pub(crate) fn state(instances: usize) -> State {
    let mut state = State::default();
    for g in 0..instances / PER_GROUP {
        state
            .apply(&Command::CreateGroup { group: group(g) })
            .expect("valid group");
    }
    state
}

/// A build context without gossip.
pub(crate) fn cx(certs: &CertCache) -> BuildContext<'_> {
    BuildContext {
        certs,
        drain_timeout: Duration::from_secs(30),
        load_changed: None,
    }
}
