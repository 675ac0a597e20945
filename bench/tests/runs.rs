//! End-to-end runs of the load loop against the stub and a refused port.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use starcite_bench::config::{LoadConfig, Target};
use starcite_bench::runner::{find_max, run_load, setup_sessions};
use starcite_bench::stub::{StubConfig, StubServer};

fn config(url: &str, duration_ms: u64) -> LoadConfig {
    LoadConfig {
        targets: Target::parse_list(url).unwrap(),
        duration: Duration::from_millis(duration_ms),
        warmup: Duration::from_millis(100),
        sessions: 16,
        connections: 4,
        payload_bytes: 256,
        session_prefix: "t".into(),
        idempotency: true,
        timeout: Duration::from_secs(2),
    }
}

#[test]
fn find_max_steps_until_limit() {
    let stub = StubServer::start(StubConfig {
        stall_after_appends: None,
        stall_for: Duration::ZERO,
    })
    .unwrap();
    let cfg = config(&format!("http://{}", stub.addr()), 300);
    assert_eq!(setup_sessions(&cfg).unwrap().created, 16);
    let mut seen = 0;
    let steps = find_max(&cfg, 100.0, 2.0, 1000.0, 3, |_, _, _| seen += 1);
    assert_eq!(seen, 3);
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|(_, pass)| *pass), "{steps:?}");
    assert_eq!(steps[2].0.rate_target, 400.0);
    assert_eq!(steps[2].0.ok, 120);
}

#[test]
fn refused_connections_are_errors_and_the_run_ends() {
    // A port that was just free: connections are refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(&format!("http://127.0.0.1:{port}"), 300);
    let t = Instant::now();
    let s = run_load(&cfg, 100.0);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(s.ok, 0);
    assert!(s.errors > 0);
    assert_eq!(s.errors, s.errors_by_kind["connect"]);
    assert!(setup_sessions(&cfg).is_err());
}

#[test]
fn a_server_stalled_past_the_end_leaves_requests_unsent() {
    let stub = StubServer::start(StubConfig {
        stall_after_appends: Some(1),
        stall_for: Duration::from_millis(1500),
    })
    .unwrap();
    let mut cfg = config(&format!("http://{}", stub.addr()), 300);
    cfg.warmup = Duration::ZERO;
    cfg.timeout = Duration::from_millis(500);
    let t = Instant::now();
    let s = run_load(&cfg, 100.0);
    // Stops at the end of the schedule; in-flight requests time out after 1 s.
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s.ok, 0);
    assert_eq!(s.errors, s.errors_by_kind["timeout"]);
    assert!(s.unsent > 0, "{s:?}");
    assert_eq!(s.issued + s.unsent, s.scheduled);
}

#[test]
fn connections_spread_over_targets() {
    let stubs: Vec<StubServer> = (0..2)
        .map(|_| {
            StubServer::start(StubConfig {
                stall_after_appends: None,
                stall_for: Duration::ZERO,
            })
            .unwrap()
        })
        .collect();
    let mut cfg = config(
        &format!("http://{}, http://{}", stubs[0].addr(), stubs[1].addr()),
        400,
    );
    cfg.warmup = Duration::ZERO;
    cfg.connections = 6;
    // Setup works over several targets (which worker takes which session races).
    assert_eq!(setup_sessions(&cfg).unwrap().created, 16);
    let before: Vec<u64> = stubs.iter().map(|s| s.connections_accepted()).collect();
    let s = run_load(&cfg, 500.0);
    assert_eq!(s.errors, 0, "{:?}", s.errors_by_kind);
    assert_eq!(s.ok, 200);
    let appends: Vec<u64> = stubs.iter().map(|s| s.appends()).collect();
    assert_eq!(appends.iter().sum::<u64>(), s.ok);
    for (stub, before) in stubs.iter().zip(before) {
        // Connections 0, 2, 4 go to the first stub and 1, 3, 5 to the second.
        assert_eq!(stub.connections_accepted() - before, 3);
        assert!(stub.appends() > 0, "{appends:?}");
    }
}
