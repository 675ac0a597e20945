//! Coordinated-omission self test: a 1 s stall of all responses in the middle of a
//! 1,000/s run must appear at the corrected p99.9 while the service-time p50 stays low.

use starcite_bench::selftest;

#[test]
fn stall_shows_up_in_corrected_latency() {
    let outcome = selftest::run().expect("self test runs");
    let s = &outcome.summary;
    println!("{}", s.to_json());
    assert!(
        outcome.failures.is_empty(),
        "self test failed: {:?}",
        outcome.failures
    );
    assert!(s.latency.p999 >= selftest::MIN_CORRECTED_P999_MS, "{s:?}");
    assert!(s.service.p50 <= selftest::MAX_SERVICE_P50_MS, "{s:?}");
    assert_eq!(s.errors, 0);
}
