//! Arbitrary bytes from the network: decoding never panics, whatever decodes
//! re-encodes to the same bytes, and merging and estimating from it never
//! panics either.

#![no_main]

use std::time::{Duration, Instant};

use gossip::{Estimator, LoadTable, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(report) = decode(data) else {
        return;
    };
    assert_eq!(encode(&report).as_deref(), Ok(data));
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
});
