//! Port specs (`EXT:INT[/h1+h2]`, as `edgectl svc create` and the admin
//! clients take them), one per line.

use raft_store::model::{Service, parse_port_specs};
use raft_store::validate::check_services;

/// Parsing never panics; a parsed spec prints as a spec that parses back
/// to the same service; the service rules never panic on what parses.
pub fn specs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let specs: Vec<&str> = text.split('\n').take(64).collect();
    for spec in &specs {
        if let Ok(service) = spec.parse::<Service>() {
            let printed = service.to_string();
            assert_eq!(
                printed.parse::<Service>().as_ref(),
                Ok(&service),
                "{printed}"
            );
        }
    }
    if let Ok(services) = parse_port_specs(&specs) {
        assert!(!services.is_empty());
        let _ = check_services(&services);
    }
}
