//! The scrape-time renderer: same text as the registry encoder gave for
//! the same series, and series that follow the routing table.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec};
use raft_store::model::Instance;
use raft_store::{Command, State};
use uuid::Uuid;

use super::instance::FAMILIES;
use super::*;
use crate::balancer::Backend;
use crate::routing::tests::group;
use crate::routing::{BuildContext, publish};
use crate::series::{CODE_CLASSES, DURATION_BUCKETS};
use crate::tls::CertCache;

/// A state with `groups`, each with `instances` (names as given).
fn state(groups: &[(&str, &[&str])]) -> State {
    let mut state = State::default();
    for (name, instances) in groups {
        state
            .apply(&Command::CreateGroup {
                group: group(name, 80),
            })
            .expect("create");
        for (n, i) in instances.iter().enumerate() {
            state
                .apply(&Command::AttachInstance {
                    group: (*name).into(),
                    instance: Instance {
                        uuid: Uuid::new_v4(),
                        name: (*i).into(),
                        address: format!("10.0.{}.{}", n / 250, n % 250),
                    },
                })
                .expect("attach");
        }
    }
    state
}

fn table(routes: &ArcSwap<RoutingTable>, state: &State) -> Arc<RoutingTable> {
    let certs = CertCache::default();
    let cx = BuildContext {
        certs: &certs,
        drain_timeout: Duration::from_secs(30),
        load_changed: None,
    };
    publish(routes, state, &cx);
    routes.load_full()
}

fn backends(table: &RoutingTable) -> Vec<(String, Arc<Backend>)> {
    table
        .groups()
        .flat_map(|g| g.backends.values().map(|b| (g.name.clone(), b.clone())))
        .collect()
}

fn samples<'a>(text: &'a str, instance: &str) -> Vec<&'a str> {
    let needle = format!("instance_name=\"{instance}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&needle))
        .collect()
}

/// The per-instance families as the registry encoder rendered them.
fn registry_render(table: &RoutingTable) -> String {
    let registry = Registry::new();
    let labels = ["service", "instance_name"];
    let gauge = |i: usize| {
        let v = IntGaugeVec::new(Opts::new(FAMILIES[i].0, FAMILIES[i].1), &labels).expect("ok");
        registry.register(Box::new(v.clone())).expect("ok");
        v
    };
    let counter = |i: usize, extra: Option<&str>| {
        let mut l = labels.to_vec();
        l.extend(extra);
        let v = IntCounterVec::new(Opts::new(FAMILIES[i].0, FAMILIES[i].1), &l).expect("ok");
        registry.register(Box::new(v.clone())).expect("ok");
        v
    };
    let (bytes, errors, connections) = (
        counter(0, Some("direction")),
        counter(1, None),
        counter(2, None),
    );
    let (inflight, global) = (gauge(3), gauge(4));
    let duration = HistogramVec::new(
        HistogramOpts::new(FAMILIES[5].0, FAMILIES[5].1).buckets(DURATION_BUCKETS.to_vec()),
        &labels,
    )
    .expect("ok");
    registry.register(Box::new(duration.clone())).expect("ok");
    let (requests, selected, up) = (counter(6, Some("code_class")), counter(7, None), gauge(8));
    for group in table.groups() {
        for b in group.backends.values() {
            let l = [group.name.as_str(), b.name.as_str()];
            let m = &b.metrics;
            bytes
                .with_label_values(&[l[0], l[1], "rx"])
                .inc_by(m.bytes_rx.get());
            bytes
                .with_label_values(&[l[0], l[1], "tx"])
                .inc_by(m.bytes_tx.get());
            errors.with_label_values(&l).inc_by(m.connect_errors.get());
            connections
                .with_label_values(&l)
                .inc_by(m.connections.get());
            let local = i64::try_from(b.local_inflight()).expect("small");
            inflight.with_label_values(&l).set(local);
            let load = i64::try_from(group.balancer.load(b)).expect("small");
            global.with_label_values(&l).set(load);
            let h = duration.with_label_values(&l);
            for (class, c) in CODE_CLASSES.iter().zip(&m.requests) {
                requests
                    .with_label_values(&[l[0], l[1], class])
                    .inc_by(c.get());
            }
            selected.with_label_values(&l).inc_by(m.selected.get());
            up.with_label_values(&l).set(1);
            // Replays the observations the fixture made.
            for v in observed(&b.name) {
                h.observe(v);
            }
        }
    }
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode")
}

/// Durations the fixture observes for an instance.
fn observed(name: &str) -> Vec<f64> {
    match name {
        "a" => vec![0.0001, 0.003, 0.02, 0.75, 45.0],
        "b" => vec![0.0005, 0.0005, 30.0],
        _ => Vec::new(),
    }
}

#[test]
fn instance_families_render_as_the_registry_encoder_did() {
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    // Names that sort differently by instance than by group, and a second
    // group with the same instance names.
    let table = table(
        &routes,
        &state(&[
            ("web", &["b", "a", "c-1"]),
            ("api", &["a", "z"]),
            ("empty", &[]),
        ]),
    );
    for (n, (_, b)) in backends(&table).iter().enumerate() {
        // One instance never counts anything: its counters are never
        // allocated, and it still shows every series at zero.
        if b.name == "z" {
            continue;
        }
        let n = n as u64;
        let m = &b.metrics;
        m.bytes_rx.inc_by(1000 * n + 7);
        m.bytes_tx.inc_by(n);
        m.connect_errors.inc_by(n % 2);
        m.connections.inc_by(n * 3);
        m.selected.inc_by(n * 11);
        for status in [101, 204, 301, 404, 503, 599] {
            if !(status + n).is_multiple_of(3) {
                m.observe_status(u16::try_from(status).expect("status"));
            }
        }
        for v in observed(&b.name) {
            m.duration.observe(v);
        }
    }
    let ours = Metrics::new().render(&table);
    let instance_part: String = ours
        .lines()
        .filter(|l| l.contains("edgelb_instance_"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(instance_part, registry_render(&table));
    // The per-instance families sit in name order among the others.
    let names: Vec<&str> = ours
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
}

#[test]
fn series_follow_the_table_and_leave_with_a_detach() {
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    let mut s = state(&[("web", &["a", "b"])]);
    let before = table(&routes, &s);
    let metrics = Metrics::new();
    let text = metrics.render(&before);
    let a = samples(&text, "a");
    // 9 families: 5 classes + 2 directions + 6 single series + the
    // histogram's buckets, +Inf, sum and count.
    assert_eq!(a.len(), 5 + 2 + 6 + DURATION_BUCKETS.len() + 3, "{text}");
    assert!(a.contains(&r#"edgelb_instance_up{instance_name="a",service="web"} 1"#));

    s.apply(&Command::DetachInstance {
        group: "web".into(),
        instance: "a".into(),
    })
    .expect("detach");
    let after = table(&routes, &s);
    let text = metrics.render(&after);
    assert!(samples(&text, "a").is_empty(), "{text}");
    assert_eq!(samples(&text, "b").len(), a.len(), "{text}");
    assert!(text.contains("edgelb_instances 1\n"), "{text}");
    // A scrape of the table from before the detach brings nothing back:
    // the instance drains.
    assert!(samples(&metrics.render(&before), "a").is_empty());
}

#[test]
fn no_instance_no_instance_family() {
    let text = Metrics::new().render(&RoutingTable::default());
    assert!(!text.contains("edgelb_instance_"), "{text}");
    assert!(text.contains("edgelb_instances 0\n"), "{text}");
}

#[test]
fn every_family_has_help() {
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    let table = table(&routes, &state(&[("web", &["a"])]));
    let metrics = Metrics::new();
    metrics.admin_request(200);
    let text = metrics.render(&table);
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap_or_default();
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
    }
    assert!(text.contains("# TYPE edgelb_instance_request_duration_seconds histogram"));
    assert!(text.contains("edgelb_admin_requests_total{code=\"200\"} 1"));
}

#[test]
fn label_values_are_escaped() {
    let mut out = String::new();
    instance::escape_into(&mut out, "a\"b\\c\nd");
    assert_eq!(out, r#"a\"b\\c\nd"#);
}

mod zipped;
