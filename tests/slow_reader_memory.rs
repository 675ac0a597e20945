//! A reader that stops reading while 100,000 events are appended, then reads at full
//! speed, receives every seq in order; meanwhile the server's memory grows by no more
//! than the per-subscriber budget (plus the event index's 4 bytes per event).

mod common;

use std::time::{Duration, Instant};

use common::{Opts, Server, Ws};
use serde_json::json;

const EVENTS: u64 = 100_000;
const WRITERS: u64 = 8;
const TAIL_BUDGET_BYTES: u64 = 1 << 20;

fn append_many(server: &Server, session: &str, count: u64, pad: usize) {
    let addr = server.addr();
    let per_writer = count / WRITERS;
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let session = session.to_string();
            std::thread::spawn(move || {
                let mut conn = common::Conn::open(addr);
                for i in 0..per_writer {
                    let body =
                        json!({"type": "t", "payload": {"w": w, "i": i, "pad": "x".repeat(pad)}});
                    let resp = conn
                        .post_json(&format!("/v1/sessions/{session}/append"), &body.to_string());
                    assert_eq!(resp.status, 201, "{}", resp.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn slow_reader_gets_every_seq_and_server_memory_stays_within_the_subscriber_budget() {
    // A small hot window so that its (bounded) growth does not hide what we measure.
    let server = Server::start(
        Opts::new("slow_reader_memory")
            .arg("--hot-bytes-per-shard", "1048576")
            // Applied Raft entries kept for followers are memory too (bounded per group);
            // keep few so that they do not hide what we measure.
            .arg("--raft-log-entries", "64")
            .arg("--tail-buffer-bytes", &TAIL_BUDGET_BYTES.to_string()),
    );
    server.create_session("slow");
    server.create_session("filler");
    // Fill the hot windows and warm the allocator before measuring.
    append_many(&server, "filler", 16_000, 200);
    server.append_ok("slow", &json!({"type": "t", "payload": {"first": true}}));

    let mut ws = Ws::connect(server.addr(), "/v1/sessions/slow/tail?cursor=0");
    let first = ws.next_json(Duration::from_secs(10));
    assert_eq!(first["seq"], 1);

    let before = server.rss_bytes();
    let started = Instant::now();
    append_many(&server, "slow", EVENTS, 64);
    // Keep not reading for 10 s in all, as the reader of the issue does.
    if let Some(rest) = Duration::from_secs(10).checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let after = server.rss_bytes();

    let events = ws.collect_until(EVENTS + 1, Duration::from_secs(120));
    let seqs = common::seqs(&events);
    let expected: Vec<u64> = (2..=EVENTS + 1).collect();
    assert_eq!(seqs, expected, "every seq once, in order");

    let growth = after.saturating_sub(before);
    // The event index keeps 4 bytes per event of the active segment (bounded by the
    // segment size); allow that plus the subscriber budget.
    let allowed = TAIL_BUDGET_BYTES + EVENTS * 4 + (256 << 10);
    println!("rss before {before} after {after} growth {growth} allowed {allowed}");
    assert!(
        growth <= allowed,
        "server RSS grew by {growth} bytes during the pause (allowed {allowed})"
    );
}
