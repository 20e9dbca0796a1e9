//! Arbitrary bytes from the network as a delta report: decoding never
//! panics, whatever decodes re-encodes to the same bytes, and applying it
//! to a held state never panics and keeps the state valid.

#![no_main]

use gossip::{Entry, Reassembler, Report, Wire, decode_wire, encode, encode_delta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
