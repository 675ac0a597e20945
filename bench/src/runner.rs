//! Session setup, the open-loop load run, and the find-max rate search.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::client::{Client, ClientError};
use crate::config::LoadConfig;
use crate::schedule::{Schedule, Slot};
use crate::stats::{Recorder, Summary};

const WORKER_STACK: usize = 256 * 1024;
/// Overhead of `{"data":""}` around the filler string in the payload object.
const PAYLOAD_OVERHEAD: usize = r#"{"data":""}"#.len();
/// Attempts per session create when the server answers 503/429 or the connection fails.
const SETUP_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, Copy, Default)]
pub struct SetupReport {
    pub created: u64,
    pub existing: u64,
}

/// Creates sessions `<prefix>-0 .. <prefix>-(n-1)` with up to `connections` parallel
/// connections (setup connection `w` talks to target `w % n`, like the load connections);
/// 409 counts as existing. Any other outcome fails the setup.
pub fn setup_sessions(cfg: &LoadConfig) -> Result<SetupReport, String> {
    let next = AtomicU64::new(0);
    let created = AtomicU64::new(0);
    let existing = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let workers = (cfg.connections as u64).min(cfg.sessions).max(1);

    thread::scope(|s| {
        for w in 0..workers as usize {
            let (next, created, existing, failed, first_error) =
                (&next, &created, &existing, &failed, &first_error);
            thread::Builder::new()
                .stack_size(WORKER_STACK)
                .spawn_scoped(s, move || {
                    let target = cfg.target(w);
                    let mut client = Client::new(target.addr, &target.host, cfg.timeout);
                    while !failed.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= cfg.sessions {
                            break;
                        }
                        let id = cfg.session_id(n);
                        match create_session(&mut client, &id) {
                            Ok(true) => created.fetch_add(1, Ordering::Relaxed),
                            Ok(false) => existing.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_error.lock().unwrap().get_or_insert(e);
                                break;
                            }
                        };
                    }
                })
                .expect("spawn setup worker");
        }
    });

    match first_error.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(SetupReport {
            created: created.into_inner(),
            existing: existing.into_inner(),
        }),
    }
}

/// Ok(true) = created, Ok(false) = already existed.
fn create_session(client: &mut Client, id: &str) -> Result<bool, String> {
    let body = format!(r#"{{"id":"{id}"}}"#);
    let mut last = String::new();
    for attempt in 0..SETUP_ATTEMPTS {
        if attempt > 0 {
            thread::sleep(Duration::from_millis(100 << (attempt - 1).min(4)));
        }
        match client.post_json("/v1/sessions", body.as_bytes()) {
            Ok(r) if r.status == 201 => return Ok(true),
            Ok(r) if r.status == 409 => return Ok(false),
            Ok(r) if r.status == 503 || r.status == 429 => {
                last = status_label(r.status, r.body);
            }
            Ok(r) => {
                return Err(format!(
                    "creating session {id}: HTTP {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                ))
            }
            Err(e) => last = e.label().to_string(),
        }
    }
    Err(format!(
        "creating session {id}: gave up after {SETUP_ATTEMPTS} attempts (last: {last})"
    ))
}

/// Error kind for a non-201 answer: `http_<status>` plus the API error code if present.
fn status_label(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string));
    match code {
        Some(code) => format!("http_{status}:{code}"),
        None => format!("http_{status}"),
    }
}

/// The constant part of every append body: `{"type":"bench","payload":{"data":"..."}`
/// (the closing brace is added per request, after an optional idempotency key).
fn body_prefix(payload_bytes: usize) -> Vec<u8> {
    let filler: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(payload_bytes.saturating_sub(PAYLOAD_OVERHEAD))
        .map(char::from)
        .collect();
    format!(r#"{{"type":"bench","payload":{{"data":"{filler}"}}"#).into_bytes()
}

/// Runs one open-loop load at `rate` appends/s: `warmup` (not recorded), then `duration`.
/// Stops by itself at the end of the schedule; in-flight requests finish or time out.
pub fn run_load(cfg: &LoadConfig, rate: f64) -> Summary {
    let prefix = body_prefix(cfg.payload_bytes);
    // Idempotency keys are unique per run (find-max runs several over the same sessions).
    let run_token: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(10)
        .map(char::from)
        .collect();
    // Latency can never exceed the whole run plus one request timeout.
    let max_latency = cfg.warmup + cfg.duration + cfg.timeout + Duration::from_secs(60);

    // Connect up front so that connection setup is not charged to the first requests.
    // Connection i talks to target i % n, so the connections spread evenly over the targets.
    let clients: Vec<Client> = (0..cfg.connections)
        .map(|i| {
            let target = cfg.target(i);
            let mut c = Client::new(target.addr, &target.host, cfg.timeout);
            let _ = c.connect(); // a failure is retried (and counted) by the first request
            c
        })
        .collect();

    let schedule = Schedule::new(
        Instant::now() + Duration::from_millis(10),
        rate,
        cfg.warmup,
        cfg.duration,
    );
    let worker = Worker {
        cfg,
        schedule: &schedule,
        prefix: &prefix,
        run_token: &run_token,
        max_latency,
    };

    let mut total = Recorder::new(max_latency);
    thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let worker = &worker;
                thread::Builder::new()
                    .stack_size(WORKER_STACK)
                    .spawn_scoped(s, move || worker.run(client))
                    .expect("spawn load worker")
            })
            .collect();
        for h in handles {
            total.merge(&h.join().expect("load worker panicked"));
        }
    });
    Summary::new(rate, cfg.duration, schedule.measured_count(), &total)
}

struct Worker<'a> {
    cfg: &'a LoadConfig,
    schedule: &'a Schedule,
    prefix: &'a [u8],
    run_token: &'a str,
    max_latency: Duration,
}

impl Worker<'_> {
    /// One connection: repeatedly claim the next due request, send it, record the result.
    fn run(&self, mut client: Client) -> Recorder {
        let mut rec = Recorder::new(self.max_latency);
        let mut path = String::with_capacity(64 + self.cfg.session_prefix.len());
        let mut body = Vec::with_capacity(self.prefix.len() + 64);
        while let Some(slot) = self.schedule.next_slot() {
            self.build(&slot, &mut path, &mut body);
            let result = client.post_json(&path, &body);
            let done = Instant::now();
            if !slot.measured {
                continue;
            }
            rec.issued += 1;
            match result {
                Ok(r) if r.status == 201 => rec.record_ok(done - slot.due, r.service),
                Ok(r) => rec.record_error(&status_label(r.status, r.body)),
                Err(e) => {
                    rec.record_error(e.label());
                    if e == ClientError::Connect {
                        // Do not spin on a refused port: the schedule catches up afterwards
                        // and the delay is charged to latency of the requests that wait.
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        rec
    }

    fn build(&self, slot: &Slot, path: &mut String, body: &mut Vec<u8>) {
        let session = slot.index % self.cfg.sessions;
        path.clear();
        let _ = write!(
            path,
            "/v1/sessions/{}-{session}/append",
            self.cfg.session_prefix
        );
        body.clear();
        body.extend_from_slice(self.prefix);
        if self.cfg.idempotency {
            let _ = write!(
                body,
                r#","idempotency_key":"{}-{}""#,
                self.run_token, slot.index
            );
        }
        body.push(b'}');
    }
}

/// The find-max pass rule for one step.
pub fn step_passes(s: &Summary, p99_max_ms: f64) -> bool {
    s.achieved_rate() >= 0.99 * s.rate_target && s.errors == 0 && s.latency.p99 < p99_max_ms
}

/// Steps the rate up by `factor` from `start_rate` until a step fails (or `max_steps`).
/// Returns every step's summary with its verdict; `on_step` sees each as it finishes.
pub fn find_max(
    cfg: &LoadConfig,
    start_rate: f64,
    factor: f64,
    p99_max_ms: f64,
    max_steps: u32,
    mut on_step: impl FnMut(u32, &Summary, bool),
) -> Vec<(Summary, bool)> {
    let mut steps = Vec::new();
    let mut rate = start_rate;
    for step in 1..=max_steps {
        let summary = run_load(cfg, rate);
        let pass = step_passes(&summary, p99_max_ms);
        on_step(step, &summary, pass);
        steps.push((summary, pass));
        if !pass {
            break;
        }
        rate *= factor;
        // Let the server settle between steps.
        thread::sleep(Duration::from_millis(500));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_size_and_labels() {
        let p = body_prefix(1024);
        let mut full = p.clone();
        full.push(b'}');
        let v: serde_json::Value = serde_json::from_slice(&full).unwrap();
        assert_eq!(v["type"], "bench");
        assert_eq!(serde_json::to_string(&v["payload"]).unwrap().len(), 1024);
        assert_eq!(
            status_label(503, br#"{"error":"overloaded","message":"x"}"#),
            "http_503:overloaded"
        );
        assert_eq!(status_label(500, b"oops"), "http_500");
    }
}
