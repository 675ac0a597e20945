use std::time::Duration;
use starcite_bench::config::{LoadConfig, Target};
use starcite_bench::runner::{run_load, setup_sessions};
use starcite_bench::stub::{StubConfig, StubServer};
#[test]
fn perf() {
    let stub = StubServer::start(StubConfig { stall_after_appends: None, stall_for: Duration::ZERO }).unwrap();
    let cfg = LoadConfig { target: Target::parse(&format!("http://{}", stub.addr())).unwrap(), duration: Duration::from_secs(3), warmup: Duration::from_secs(1), sessions: 1024, connections: 64, payload_bytes: 1024, session_prefix: "p".into(), idempotency: false, timeout: Duration::from_secs(10) };
    setup_sessions(&cfg).unwrap();
    for rate in [5000.0, 10000.0, 20000.0, 40000.0] {
        let s = run_load(&cfg, rate);
        println!("{}", s.to_json());
    }
}
