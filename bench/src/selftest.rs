//! Coordinated-omission self test: run the real load loop against the in-process stub,
//! which stalls every response for 1 s once in the middle of the run. A correct open-loop
//! benchmark charges that stall to every request that was due during it, so the corrected
//! p99.9 is close to 1 s, while the uncorrected service time stays low at p50.

use std::time::Duration;

use crate::config::{LoadConfig, Target};
use crate::runner::{run_load, setup_sessions};
use crate::stats::Summary;
use crate::stub::{StubConfig, StubServer};

pub const RATE: f64 = 1000.0;
pub const WARMUP: Duration = Duration::from_secs(1);
pub const DURATION: Duration = Duration::from_secs(5);
pub const CONNECTIONS: usize = 8;
pub const STALL: Duration = Duration::from_secs(1);

/// Corrected p99.9 must show the stall.
pub const MIN_CORRECTED_P999_MS: f64 = 900.0;
/// Uncorrected service-time p50 must stay low.
pub const MAX_SERVICE_P50_MS: f64 = 50.0;

pub struct SelfTestOutcome {
    pub summary: Summary,
    /// Empty when the test passed.
    pub failures: Vec<String>,
}

pub fn run() -> Result<SelfTestOutcome, String> {
    // Stall in the middle of the measured window.
    let stall_after = (RATE * (WARMUP.as_secs_f64() + DURATION.as_secs_f64() / 2.0)).round() as u64;
    let stub = StubServer::start(StubConfig {
        stall_after_appends: Some(stall_after),
        stall_for: STALL,
    })
    .map_err(|e| format!("cannot start stub server: {e}"))?;
    let target = Target::parse(&format!("http://{}", stub.addr()))?;
    let cfg = LoadConfig {
        targets: vec![target],
        duration: DURATION,
        warmup: WARMUP,
        sessions: 64,
        connections: CONNECTIONS,
        payload_bytes: 1024,
        session_prefix: "selftest".into(),
        idempotency: false,
        timeout: Duration::from_secs(10),
    };
    setup_sessions(&cfg)?;
    let summary = run_load(&cfg, RATE);

    let mut failures = Vec::new();
    if stub.stall_started().is_none() {
        failures.push("the stub never stalled".to_string());
    }
    if summary.errors != 0 {
        failures.push(format!(
            "{} errors: {:?}",
            summary.errors, summary.errors_by_kind
        ));
    }
    if summary.ok < summary.scheduled * 95 / 100 {
        failures.push(format!(
            "only {} of {} scheduled requests completed",
            summary.ok, summary.scheduled
        ));
    }
    if summary.latency.p999 < MIN_CORRECTED_P999_MS {
        failures.push(format!(
            "corrected p99.9 {:.1} ms < {MIN_CORRECTED_P999_MS} ms: the stall was omitted",
            summary.latency.p999
        ));
    }
    if summary.service.p50 > MAX_SERVICE_P50_MS {
        failures.push(format!(
            "service-time p50 {:.1} ms > {MAX_SERVICE_P50_MS} ms",
            summary.service.p50
        ));
    }
    Ok(SelfTestOutcome { summary, failures })
}
