//! Per-worker recording (no shared locks on the hot path) and the merged run summary.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Microsecond resolution, 3 significant digits.
const SIGFIG: u8 = 3;

/// What one connection worker observed during the measured window.
pub struct Recorder {
    /// Corrected latency: due time → complete response.
    latency: Histogram<u64>,
    /// Uncorrected service time: request written → complete response.
    service: Histogram<u64>,
    pub issued: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Recorder {
    /// `max` bounds the recordable value; larger values saturate at it.
    pub fn new(max: Duration) -> Recorder {
        let high = (max.as_micros() as u64).max(2_000_000);
        let hist = || Histogram::new_with_bounds(1, high, SIGFIG).expect("valid histogram bounds");
        Recorder {
            latency: hist(),
            service: hist(),
            issued: 0,
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    pub fn record_ok(&mut self, latency: Duration, service: Duration) {
        self.ok += 1;
        self.latency.saturating_record(micros(latency));
        self.service.saturating_record(micros(service));
    }

    pub fn record_error(&mut self, kind: &str) {
        match self.errors.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.errors.insert(kind.to_string(), 1);
            }
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latency
            .add(&other.latency)
            .expect("histograms share bounds");
        self.service
            .add(&other.service)
            .expect("histograms share bounds");
        self.issued += other.issued;
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    fn to_json(self) -> Value {
        json!({
            "p50": round3(self.p50),
            "p90": round3(self.p90),
            "p99": round3(self.p99),
            "p99_9": round3(self.p999),
            "max": round3(self.max),
        })
    }

    fn line(&self) -> String {
        format!(
            "p50 {:>9.3}  p90 {:>9.3}  p99 {:>9.3}  p99.9 {:>9.3}  max {:>9.3}",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The result of one load run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub rate_target: f64,
    pub measured_secs: f64,
    /// Requests due in the measured window.
    pub scheduled: u64,
    /// Requests sent in the measured window.
    pub issued: u64,
    /// Due in the measured window but never sent (the run ended with them still queued).
    pub unsent: u64,
    /// Completed with 201.
    pub ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub latency: Percentiles,
    pub service: Percentiles,
}

impl Summary {
    pub fn new(rate_target: f64, measured: Duration, scheduled: u64, rec: &Recorder) -> Summary {
        let measured_secs = measured.as_secs_f64();
        Summary {
            rate_target,
            measured_secs,
            scheduled,
            issued: rec.issued,
            unsent: scheduled.saturating_sub(rec.issued),
            ok: rec.ok,
            errors: rec.errors.values().sum(),
            errors_by_kind: rec.errors.clone(),
            latency: Percentiles::of(&rec.latency),
            service: Percentiles::of(&rec.service),
        }
    }

    /// Completed-ok appends per measured second.
    pub fn achieved_rate(&self) -> f64 {
        if self.measured_secs > 0.0 {
            self.ok as f64 / self.measured_secs
        } else {
            0.0
        }
    }

    pub fn print_human(&self) {
        println!(
            "rate target {:.1}/s, achieved {:.1}/s over {:.1}s",
            self.rate_target,
            self.achieved_rate(),
            self.measured_secs
        );
        println!(
            "count {} ok, {} errors, {} unsent (scheduled {})",
            self.ok, self.errors, self.unsent, self.scheduled
        );
        if !self.errors_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .errors_by_kind
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("errors by kind: {}", kinds.join(", "));
        }
        if self.unsent > 0 {
            println!(
                "WARNING: {} due requests were still waiting for a connection when the run \
                 ended (the server did not keep up); percentiles cover completed requests only",
                self.unsent
            );
        }
        println!(
            "latency ms (corrected, from due time): {}",
            self.latency.line()
        );
        println!(
            "service ms (uncorrected, send->resp):  {}",
            self.service.line()
        );
    }

    pub fn to_json(&self) -> Value {
        json!({
            "rate_target": round3(self.rate_target),
            "achieved_rate": round3(self.achieved_rate()),
            "measured_secs": round3(self.measured_secs),
            "count": self.ok,
            "scheduled": self.scheduled,
            "issued": self.issued,
            "unsent": self.unsent,
            "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "latency_ms": self.latency.to_json(),
            "service_ms": self.service.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_percentiles() {
        let mut a = Recorder::new(Duration::from_secs(10));
        let mut b = Recorder::new(Duration::from_secs(10));
        for _ in 0..990 {
            a.record_ok(Duration::from_millis(1), Duration::from_micros(500));
        }
        for _ in 0..10 {
            b.record_ok(Duration::from_secs(1), Duration::from_micros(500));
        }
        b.record_error("timeout");
        b.record_error("timeout");
        b.record_error("http_503:overloaded");
        a.issued = 990;
        b.issued = 13;
        a.merge(&b);
        let s = Summary::new(1000.0, Duration::from_secs(1), 1005, &a);
        assert_eq!(s.ok, 1000);
        assert_eq!(s.errors, 3);
        assert_eq!(s.unsent, 2);
        assert_eq!(s.errors_by_kind["timeout"], 2);
        assert!((s.latency.p50 - 1.0).abs() < 0.01);
        assert!(s.latency.p999 > 990.0);
        assert!((s.service.max - 0.5).abs() < 0.01);
        assert_eq!(s.achieved_rate(), 1000.0);
        let j = s.to_json();
        assert_eq!(j["count"], 1000);
        assert!(j["latency_ms"]["p99_9"].as_f64().unwrap() > 990.0);
    }
}
