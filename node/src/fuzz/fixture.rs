//! What the targets run against: a small replicated state (three groups, a
//! stored certificate, the cluster CA), its routing table, and the CA.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use raft_store::command::Command;
use raft_store::model::{
    Certificate, ClusterSecrets, Domain, Handler, Instance, Service, ServiceGroup,
};
use raft_store::state::State;
use uuid::Uuid;

use crate::cluster::pki::{self, CaBundle};
use crate::routing::{self, BuildContext, RoutingTable};
use crate::tls::CertCache;

/// The cluster CA of the fixture.
pub(super) fn ca() -> &'static CaBundle {
    static CA: OnceLock<CaBundle> = OnceLock::new();
    CA.get_or_init(|| pki::generate_ca("fuzz").expect("generating a CA"))
}

/// The fixture state: groups `web` (443 tls+http, 80 redirect; an exact
/// and a wildcard domain; two instances), `api` (443 and 8080 http) and
/// `db` (5432 TCP), certificate `web-cert`, the cluster CA.
pub(super) fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut state = State::default();
        for cmd in commands() {
            state.apply(&cmd).expect("the fixture applies");
        }
        state
    })
}

/// The routing table of [`state`].
pub(super) fn routes() -> &'static RoutingTable {
    routes_shared()
}

/// The routing table of [`state`], to publish in a data plane.
pub(super) fn routes_shared() -> &'static Arc<RoutingTable> {
    static ROUTES: OnceLock<Arc<RoutingTable>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let certs = CertCache::default();
        let routes = ArcSwap::from_pointee(RoutingTable::default());
        let cx = BuildContext {
            certs: &certs,
            drain_timeout: Duration::from_secs(1),
            load_changed: None,
        };
        routing::publish(&routes, state(), &cx);
        routes.load_full()
    })
}

fn commands() -> Vec<Command> {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["web.example.com".to_owned()]).expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    vec![
        Command::InitCluster {
            secrets: ClusterSecrets {
                ca_cert_pem: ca().cert_pem.clone(),
                ca_key_pem: ca().key_pem.clone(),
                token_sha256: "0".repeat(64),
            },
        },
        Command::PutCertificate {
            certificate: Certificate {
                name: "web-cert".into(),
                chain: cert.pem(),
                private_key: key.serialize_pem(),
                not_after: None,
            },
        },
        group(
            1,
            "web",
            &[
                svc(443, 8443, &[Handler::Tls, Handler::Http]),
                svc(80, 443, &[Handler::Http, Handler::Redirect]),
            ],
            &[
                ("web.example.com", Some("web-cert")),
                ("*.apps.example.com", None),
            ],
            &[(11, "web-a", "10.0.0.1"), (12, "web-b", "10.0.0.2")],
        ),
        group(
            2,
            "api",
            &[
                svc(443, 9000, &[Handler::Tls, Handler::Http]),
                svc(8080, 9000, &[Handler::Http]),
            ],
            &[("api.example.com", None)],
            &[(21, "api-a", "api.internal")],
        ),
        group(
            3,
            "db",
            &[svc(5432, 5432, &[])],
            &[("db.example.com", None)],
            &[(31, "db-a", "10.0.0.3")],
        ),
    ]
}

fn svc(port: u16, destination_port: u16, handlers: &[Handler]) -> Service {
    Service {
        port,
        destination_port,
        handlers: handlers.to_vec(),
    }
}

fn group(
    n: u128,
    name: &str,
    services: &[Service],
    domains: &[(&str, Option<&str>)],
    instances: &[(u128, &str, &str)],
) -> Command {
    Command::CreateGroup {
        group: ServiceGroup {
            uuid: Uuid::from_u128(n),
            name: name.into(),
            domains: domains
                .iter()
                .map(|(fqdn, cert)| Domain {
                    fqdn: (*fqdn).into(),
                    certificate: cert.map(str::to_owned),
                })
                .collect(),
            services: services.to_vec(),
            hard_limit: 100,
            instances: instances
                .iter()
                .map(|(n, name, address)| Instance {
                    uuid: Uuid::from_u128(*n),
                    name: (*name).into(),
                    address: (*address).into(),
                })
                .collect(),
            created_at: "2026-01-01T00:00:00Z".into(),
            persistent: true,
            health_check: None,
            send_proxy_protocol: None,
        },
    }
}

/// Applies `cmd` to a copy of the fixture state; whatever it answers, the
/// state must survive a snapshot (serialise, load back equal): a state a
/// command can reach but a snapshot cannot carry would stop every node
/// that installs it.
pub(super) fn apply(cmd: &Command) {
    let mut state = state().clone();
    let checked = state.check(cmd);
    let applied = state.apply(cmd);
    // A batch is checked command by command, when it is formed.
    if !matches!(cmd, Command::Batch { .. }) {
        assert_eq!(checked, applied, "check and apply disagree on {cmd:?}");
    }
    if applied.is_ok() {
        snapshot_round_trip(&state);
    }
}

/// A state serialises and loads back equal.
pub(super) fn snapshot_round_trip(state: &State) {
    let json = serde_json::to_vec(state).expect("a state serialises");
    let back: State = serde_json::from_slice(&json).expect("a serialised state loads");
    assert_eq!(&back, state);
}
