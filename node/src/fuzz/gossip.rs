//! Load reports from peers (datagrams and unidirectional streams).

use std::time::{Duration, Instant};

use gossip::{
    COMPACT_VERSION, Entry, Estimator, LoadTable, Reassembler, Report, VERSION, Wire, decode_wire,
    encode, encode_compact, encode_delta,
};

/// A report of any wire version: decoding never panics; a full report
/// re-encodes to the same bytes, a compact one to an equal report; merging
/// and estimating from it never panics either.
pub fn report(data: &[u8]) {
    let Ok(Wire::Full(report)) = decode_wire(data) else {
        return;
    };
    match data.first() {
        Some(&VERSION) => assert_eq!(encode(&report).as_deref(), Ok(data)),
        Some(&COMPACT_VERSION) => {
            let again = encode_compact(&report).expect("a decoded report encodes");
            assert!(matches!(decode_wire(&again), Ok(Wire::Full(r)) if r == report));
        }
        _ => {}
    }
    let instances: Vec<[u8; 16]> = report.entries.iter().map(|e| e.instance).take(64).collect();
    let t0 = Instant::now();
    let mut table = LoadTable::new(Duration::from_secs(1));
    table.insert(report, t0);
    for age in [0, 1, 50, 999] {
        let now = t0 + Duration::from_millis(age);
        for estimator in [Estimator::Raw, Estimator::Decay, Estimator::Predictive] {
            let loads = estimator.peer_loads(&table, &instances, now);
            assert_eq!(loads.len(), instances.len());
        }
    }
}

/// A delta report: decoding never panics, whatever decodes re-encodes to
/// the same bytes, and applying it to a held state never panics and keeps
/// the state valid.
pub fn delta(data: &[u8]) {
    let Ok(Wire::Delta(delta)) = decode_wire(data) else {
        return;
    };
    assert_eq!(encode_delta(&delta).as_deref(), Ok(data));
    // A base the delta may refer to: eight instances.
    let base = Report {
        node_id: delta.node_id,
        incarnation: delta.incarnation,
        seq: delta.base_seq,
        sent_at_ms: 0,
        entries: (0..8u8)
            .map(|i| Entry {
                instance: [i * 16; 16],
                inflight: 2,
                long_inflight: 1,
                arrival_rate_milli: 100,
                mean_service_us: 1000,
            })
            .collect(),
    };
    let mut rx = Reassembler::new();
    let _ = rx.apply(Wire::Full(base));
    if let Ok(report) = rx.apply(Wire::Delta(delta)) {
        // What a delta builds is a valid report.
        assert!(encode(&report).is_ok());
    }
}
