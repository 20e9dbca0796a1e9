//! Fuzz target bodies: one function per decoder that takes outside bytes.
//!
//! Each function takes arbitrary bytes, feeds them to the code a node runs
//! on bytes from a peer, a client or an operator, and asserts what must
//! hold whatever the input (no panic, round trips, invariants). The same
//! functions are driven by libFuzzer (`fuzz/`, `cargo +nightly fuzz run
//! <target>`) and, on stable, by the corpus replay in this module's tests,
//! which runs every checked-in input of `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` (see docs/fuzzing.md).
//!
//! Not a public API: hidden from the docs, kept `pub` only so the fuzz
//! crate can call it.

mod admin;
mod answer;
mod cluster;
mod config;
mod fixture;
mod gossip;
mod http;
mod pki;
mod ports;
#[cfg(test)]
mod seeds;
#[cfg(test)]
mod tests;

/// A fuzz target body.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` calls it.
pub const TARGETS: &[(&str, Target)] = &[
    ("gossip_report", gossip_report),
    ("gossip_delta", gossip_delta),
    ("cluster_stream", cluster_stream),
    ("cluster_body", cluster_body),
    ("admin_body", admin_body),
    ("port_spec", port_spec),
    ("config_toml", config_toml),
    ("csr", csr),
    ("http_head", http_head),
    ("http_answer", http_answer),
];

/// The body of target `name`; `None` for an unknown name.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

pub use admin::body as admin_body;
pub use answer::answer as http_answer;
pub use cluster::{body as cluster_body, stream as cluster_stream};
pub use config::toml as config_toml;
pub use gossip::{delta as gossip_delta, report as gossip_report};
pub use http::head as http_head;
pub use pki::csr;
pub use ports::specs as port_spec;
