use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn write(key: &str, kind: WriteKind, start: u64, end: u64, outcome: Outcome) -> Write {
    Write {
        key: key.into(),
        kind,
        node: 1,
        start: ms(start),
        end: ms(end),
        outcome,
    }
}

fn read(start: u64, end: u64, seen: &[&str]) -> Read {
    Read {
        node: 2,
        start: ms(start),
        end: ms(end),
        seen: seen.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn finals(nodes: &[u64], keys: &[&str]) -> BTreeMap<u64, Vec<String>> {
    nodes
        .iter()
        .map(|n| (*n, keys.iter().map(|k| (*k).to_owned()).collect()))
        .collect()
}

/// Two acked attaches, a refused one, a group; seen as they should be.
fn clean() -> History {
    History {
        writes: vec![
            write("k-1", WriteKind::Attach, 0, 10, Outcome::Acked),
            write("k-2", WriteKind::Attach, 20, 30, Outcome::Acked),
            write("k-3", WriteKind::Attach, 40, 50, Outcome::Refused),
            write("g-1", WriteKind::CreateGroup, 60, 70, Outcome::Acked),
        ],
        reads: vec![
            read(11, 15, &["k-1"]),
            read(31, 35, &["k-1", "k-2"]),
            read(71, 80, &["k-1", "k-2", "g-1"]),
        ],
        requests: vec![Request {
            node: 1,
            start: ms(5),
            end: ms(6),
            ok: true,
        }],
        excluded: Vec::new(),
        finals: finals(&[1, 2, 3], &["k-1", "k-2", "g-1"]),
    }
}

#[test]
fn a_clean_history_passes() {
    let v = check(&clean());
    assert!(v.passed(), "{v:?}");
    assert_eq!((v.acked, v.refused, v.unknown), (3, 1, 0));
}

#[test]
fn an_acked_write_missing_on_one_node_is_lost() {
    let mut h = clean();
    h.finals.insert(3, vec!["k-1".into(), "g-1".into()]);
    let v = check(&h);
    assert_eq!(v.lost, vec![("k-2".to_owned(), 3)]);
    assert!(!v.passed());
}

#[test]
fn a_refused_or_unknown_write_may_apply_once_but_not_twice() {
    let mut h = clean();
    h.finals = finals(&[1, 2, 3], &["k-1", "k-2", "g-1", "k-3"]);
    assert!(check(&h).passed(), "a refused write may still have applied");
    h.finals.insert(
        2,
        vec![
            "k-1".into(),
            "k-2".into(),
            "g-1".into(),
            "k-3".into(),
            "k-3".into(),
        ],
    );
    let v = check(&h);
    assert_eq!(v.duplicated, vec![("k-3".to_owned(), 2, 2)]);
    assert!(!v.passed());
}

#[test]
fn a_read_going_back_in_time_is_stale() {
    let mut h = clean();
    // Saw k-2 at 31..35, then a later read misses it.
    h.reads.push(read(36, 40, &["k-1"]));
    let v = check(&h);
    assert_eq!(v.stale_reads, vec![(2, ms(36), "k-2".to_owned())]);
}

#[test]
fn a_read_missing_a_write_acked_before_it_started_is_stale() {
    let mut h = clean();
    h.reads = vec![read(31, 35, &["k-1"])];
    let v = check(&h);
    assert_eq!(v.stale_reads, vec![(2, ms(31), "k-2".to_owned())]);
    // Overlapping the write, either answer is linearizable.
    h.reads = vec![read(25, 35, &["k-1"])];
    assert!(check(&h).passed());
}

#[test]
fn detached_instances_may_leave_and_acked_detaches_must_stick() {
    let mut h = clean();
    h.writes
        .push(write("t-1", WriteKind::Attach, 80, 90, Outcome::Acked));
    h.writes
        .push(write("t-1", WriteKind::Detach, 95, 99, Outcome::Unknown));
    h.reads.push(read(91, 94, &["k-1", "k-2", "g-1", "t-1"]));
    h.reads.push(read(100, 110, &["k-1", "k-2", "g-1"]));
    assert!(check(&h).passed(), "t- instances are not keepers");
    h.writes
        .push(write("t-2", WriteKind::Attach, 80, 90, Outcome::Acked));
    h.writes
        .push(write("t-2", WriteKind::Detach, 95, 99, Outcome::Acked));
    h.finals = finals(&[1, 2, 3], &["k-1", "k-2", "g-1", "t-2"]);
    let v = check(&h);
    assert_eq!(
        v.lost.len(),
        3,
        "the acked detach is undone on every node: {v:?}"
    );
}

#[test]
fn failed_requests_count_only_outside_excluded_windows() {
    let mut h = clean();
    h.requests.push(Request {
        node: 3,
        start: ms(100),
        end: ms(200),
        ok: false,
    });
    h.requests.push(Request {
        node: 1,
        start: ms(150),
        end: ms(160),
        ok: false,
    });
    h.excluded.push(Excluded {
        node: 3,
        from: ms(190),
        to: ms(500),
    });
    let v = check(&h);
    assert_eq!(v.failed_requests, vec![(1, ms(150))]);
    assert_eq!(v.requests, 3);
}

#[test]
fn an_acked_domain_missing_at_the_end_or_from_a_later_read_fails() {
    let mut h = clean();
    h.writes
        .push(write("d-1", WriteKind::AddDomain, 81, 90, Outcome::Acked));
    h.finals = finals(&[1, 2, 3], &["k-1", "k-2", "g-1", "d-1"]);
    h.reads.push(read(91, 95, &["k-1", "k-2", "g-1", "d-1"]));
    assert!(check(&h).passed(), "{:?}", check(&h));
    h.finals
        .insert(2, vec!["k-1".into(), "k-2".into(), "g-1".into()]);
    h.reads.push(read(96, 99, &["k-1", "k-2", "g-1"]));
    let v = check(&h);
    assert_eq!(v.lost, vec![("d-1".to_owned(), 2)]);
    assert_eq!(v.stale_reads, vec![(2, ms(96), "d-1".to_owned())]);
}
