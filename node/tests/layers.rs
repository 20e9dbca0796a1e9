//! The node's modules depend on each other one way: no import cycle between
//! sibling modules, at any depth.
//!
//! `cargo test -p edgelb --test layers -- --nocapture` prints the module
//! graph (`a -> b`: code of `a` names an item of its sibling `b`) and fails
//! with the cycles it finds.
//!
//! How it reads the source: every `crate::`, `super::` and `self::` path
//! outside comments, string literals and `#[cfg(test)]` modules, use trees
//! included, is resolved from the file's own module; a path counts as an
//! edge between the two siblings under the modules the source and the
//! target share. A module's own submodules may use their parent's items
//! (they are its private parts), so child-to-parent paths are not edges.
//! Test files (`tests.rs`, `tests/`) and the binaries are left out: tests
//! may reach into any layer.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

type Module = Vec<String>;

/// Every module of `src` (as a path of names) with its source.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read src dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("lib" | "main" | "mod")
            ) {
                module.pop();
            }
            if module.first().is_some_and(|m| m == "bin") || module.iter().any(|m| m == "tests") {
                continue;
            }
            out.insert(module, fs::read_to_string(&path).expect("read source"));
        }
    }
    out
}

/// `src` without comments, string and char literals, and `#[cfg(test)]`
/// modules.
fn code(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A char literal ('x', '\n', '"'), not a lifetime ('a).
            b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\') => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("' '");
            }
            _ => {
                let ch = src[i..].chars().next().expect("in bounds");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    strip_test_modules(&out)
}

fn strip_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let head = after.trim_start();
        let is_mod = head.starts_with("mod ") || head.starts_with("pub(crate) mod ");
        match (is_mod, after.find(['{', ';'])) {
            (true, Some(open)) if after.as_bytes()[open] == b'{' => {
                let mut depth = 0;
                let mut end = after.len();
                for (k, c) in after[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths starting with `crate`, `super` or `self` in `code`, with use
/// trees expanded (`crate::a::{b, c::d}` gives `crate::a::b` and
/// `crate::a::c::d`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = ["crate::", "super::", "self::"]
            .iter()
            .find(|p| chars[i..].starts_with(&p.chars().collect::<Vec<_>>()));
        let boundary = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        match starts {
            Some(_) if boundary => {
                let (found, next) = path_at(&chars, i);
                out.extend(found);
                i = next;
            }
            _ => i += 1,
        }
    }
    out
}

/// The path (or use tree) starting at `i`, and where it ends.
fn path_at(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut segs = Vec::new();
    loop {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        let start = i;
        while chars.get(i).is_some_and(|&c| is_ident(c)) {
            i += 1;
        }
        if i > start {
            segs.push(chars[start..i].iter().collect::<String>());
        }
        if chars[i..].starts_with(&[':', ':']) {
            i += 2;
            if chars.get(i) == Some(&'{') {
                let mut depth = 0;
                let open = i;
                let mut end = chars.len();
                for (k, &c) in chars[open..].iter().enumerate() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + k;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let mut found = Vec::new();
                for part in split_top(&chars[open + 1..end]) {
                    let (inner, _) = path_at(&part, 0);
                    for tail in inner {
                        let mut p = segs.clone();
                        p.extend(tail.into_iter().filter(|s| s != "self"));
                        found.push(p);
                    }
                }
                return (found, end + 1);
            }
            continue;
        }
        return (vec![segs], i.max(start + 1));
    }
}

/// The comma-separated parts of a use tree's braces, nested braces kept.
fn split_top(chars: &[char]) -> Vec<Vec<char>> {
    let mut parts = vec![Vec::new()];
    let mut depth = 0;
    for &c in chars {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(Vec::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut().expect("one part at least").push(c);
    }
    parts
}

/// Edges between sibling modules: `(from, to)`.
fn edges(modules: &BTreeMap<Module, String>) -> BTreeSet<(Module, Module)> {
    let is_module = |m: &[String]| modules.keys().any(|k| k.starts_with(m));
    let mut out = BTreeSet::new();
    for (module, src) in modules {
        for path in paths(&code(src)) {
            let mut target: Module = Vec::new();
            let mut segs = path.into_iter().peekable();
            match segs.peek().map(String::as_str) {
                Some("crate") => {
                    segs.next();
                }
                _ => {
                    target.clone_from(module);
                    while let Some(s) = segs.next_if(|s| s == "super" || s == "self") {
                        if s == "super" {
                            target.pop();
                        }
                    }
                }
            }
            target.extend(segs);
            let shared = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if shared >= module.len() || shared >= target.len() {
                // Within the module itself, or a path to one of its parents.
                continue;
            }
            let (from, to) = (&module[..=shared], &target[..=shared]);
            if is_module(to) {
                out.insert((from.to_vec(), to.to_vec()));
            }
        }
    }
    out
}

/// The strongly connected components with more than one module.
fn cycles(edges: &BTreeSet<(Module, Module)>) -> Vec<Vec<Module>> {
    let nodes: BTreeSet<&Module> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let reach = |from: &Module| {
        let mut seen = BTreeSet::from([from.clone()]);
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for (a, b) in edges {
                if *a == m && seen.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&Module, BTreeSet<Module>> =
        nodes.iter().map(|&n| (n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for &n in &nodes {
        if done.contains(n) {
            continue;
        }
        let component: Vec<Module> = reachable[n]
            .iter()
            .filter(|m| reachable.get(m).is_some_and(|r| r.contains(n)))
            .cloned()
            .collect();
        done.extend(component.iter().cloned());
        if component.len() > 1 {
            out.push(component);
        }
    }
    out
}

fn name(m: &Module) -> String {
    m.join("::")
}

#[test]
fn node_modules_have_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(modules.len() > 50, "read {} modules", modules.len());
    let edges = edges(&modules);
    for (from, to) in &edges {
        println!("{} -> {}", name(from), name(to));
    }
    let found: Vec<String> = cycles(&edges)
        .iter()
        .map(|c| c.iter().map(name).collect::<Vec<_>>().join(" <-> "))
        .collect();
    assert!(
        found.is_empty(),
        "import cycles between modules: {found:#?}"
    );
}

#[test]
fn the_check_finds_a_cycle_through_a_use_tree() {
    let modules = BTreeMap::from([
        (vec!["a".to_owned()], "use crate::{b::B, c};".to_owned()),
        (
            vec!["b".to_owned()],
            "// crate::a in a comment\nfn f() { crate::c::g(\"crate::a\") }".to_owned(),
        ),
        (vec!["c".to_owned()], "use super::a::A;".to_owned()),
        (
            vec!["c".to_owned(), "d".to_owned()],
            "use super::super::b;".to_owned(),
        ),
        (
            vec!["e".to_owned()],
            "#[cfg(test)]\nmod tests { use crate::a; }\nfn h() {}".to_owned(),
        ),
    ]);
    let edges = edges(&modules);
    let names: BTreeSet<(String, String)> = edges.iter().map(|(a, b)| (name(a), name(b))).collect();
    let expect = [("a", "b"), ("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")];
    assert_eq!(
        names,
        expect
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    );
    let found = cycles(&edges);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].len(), 3);
}
