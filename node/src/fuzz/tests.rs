//! The checked-in corpora, replayed on stable: every input of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` runs through
//! its target's body, so a crash the fuzzer once found stays fixed.

use std::path::{Path, PathBuf};

use super::{TARGETS, target};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(name: &str) {
    let body = target(name).expect("a known target");
    let corpus = inputs(&fuzz_dir().join("corpus").join(name));
    assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
    let regressions = inputs(&fuzz_dir().join("regressions").join(name));
    for file in corpus.iter().chain(&regressions) {
        let data = std::fs::read(file).expect("a corpus file reads");
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "{name} panicked on {}", file.display());
    }
}

#[test]
fn every_target_has_a_fuzz_target_file_and_a_corpus() {
    for (name, _) in TARGETS {
        let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&file).expect("the fuzz target exists");
        assert!(
            text.contains(&format!("edgelb::fuzz::{name}(")),
            "{} does not call edgelb::fuzz::{name}",
            file.display()
        );
        assert!(!inputs(&fuzz_dir().join("corpus").join(name)).is_empty());
    }
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*
        /// The tests above cover every target.
        #[test]
        fn every_target_is_replayed() {
            let replayed = [$(stringify!($name)),*];
            let all: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            assert_eq!(replayed.as_slice(), all.as_slice());
        }
    };
}

mod replay {
    use super::TARGETS;
    use super::replay;

    replay_tests!(
        gossip_report,
        gossip_delta,
        cluster_stream,
        cluster_body,
        admin_body,
        port_spec,
        config_toml,
        csr,
        http_head,
        http_answer,
    );
}
