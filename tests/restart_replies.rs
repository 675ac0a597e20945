//! Replies to forwarded requests after a restart (issue 9, fault 1): a node that is
//! killed while its forwarded writes are in flight on the leaders, and restarted at once,
//! must never complete a NEW request with the leader's answer to one the OLD process
//! sent. Every 201 must carry the seq at which that very request's event is stored.
//!
//! The scenario is the one the fault drill found: nodes 2 and 3 lead every group and
//! delay each fsync by 3 s (so a forwarded append stays in flight about 3 s), node 1
//! forwards 8 appends, is killed 0.4 s later and restarted; as soon as it serves again it
//! forwards 8 new appends, while the leaders' answers to the old 8 arrive. (The delay is
//! switched on once the leaders are elected: elections with a 3 s fsync take minutes.)

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{post_append, Cluster, ClusterOpts};
use common::{try_request, Resp};
use serde_json::{json, Value};

/// Injected fsync delay of the leaders (nodes 2 and 3).
const FSYNC_DELAY_MS: u64 = 3000;
/// Appends per round.
const ROUND: usize = 8;
const SESSIONS: [&str; 2] = ["stale-reply-a", "stale-reply-b"];
const LIVE_TIMEOUT: Duration = Duration::from_secs(20);

fn body(key: &str) -> String {
    json!({"type": "t", "payload": {"key": key}, "idempotency_key": key}).to_string()
}

/// Sends one round of appends through `addr`, each on its own connection and thread.
fn send_round(
    addr: SocketAddr,
    round: &str,
) -> Vec<thread::JoinHandle<(String, String, Option<Resp>)>> {
    (0..ROUND)
        .map(|i| {
            let session = SESSIONS[i % SESSIONS.len()].to_string();
            let key = format!("{round}-{i}");
            thread::spawn(move || {
                let resp = post_append(addr, &session, &body(&key)).ok();
                (session, key, resp)
            })
        })
        .collect()
}

#[test]
fn a_restarted_node_completes_each_request_only_with_its_own_reply() {
    let mut opts = ClusterOpts::new("stale-reply")
        .arg("--raft-tick", "400ms")
        .arg("--request-timeout", "15s")
        .env("STARCITE_TEST_FAULTS", "1");
    // Two of three nodes with 6-12 s election timeouts: a few split votes take a while.
    opts.ready_timeout = Duration::from_secs(90);
    // Nodes 2 and 3 elect leaders of every group among themselves.
    let mut cluster = Cluster::start_without(opts, &[1]);
    for session in SESSIONS {
        cluster.create_session(2, session);
    }
    for node in [2, 3] {
        let body = json!({ "fsync_delay_ms": FSYNC_DELAY_MS }).to_string();
        let resp = cluster
            .try_request(node, "PUT", "/debug/faults", body.as_bytes())
            .expect("PUT /debug/faults");
        assert_eq!(resp.status, 204, "{}", resp.text());
    }
    cluster.spawn_again(1);
    cluster.wait_ready(1, Duration::from_secs(60));
    let addr = cluster.addr(1);

    let old = send_round(addr, "old");
    thread::sleep(Duration::from_millis(400));
    cluster.kill9(1);
    cluster.spawn_again(1);
    let deadline = Instant::now() + LIVE_TIMEOUT;
    while !try_request(addr, "GET", "/health/live", &[], b"").is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "node 1 not live again");
        thread::sleep(Duration::from_millis(5));
    }
    let new = send_round(addr, "new");

    let new: Vec<_> = new.into_iter().map(|h| h.join().unwrap()).collect();
    let old: Vec<_> = old.into_iter().map(|h| h.join().unwrap()).collect();
    let events: Vec<Vec<Value>> = SESSIONS.iter().map(|s| cluster.events(2, s)).collect();
    let stored_key = |session: &str, seq: u64| -> Option<String> {
        let i = SESSIONS.iter().position(|s| *s == session).unwrap();
        let event = events[i].iter().find(|e| e["seq"] == seq)?;
        event["idempotency_key"].as_str().map(str::to_string)
    };
    let mut acked = 0;
    let mut wrong = Vec::new();
    for (session, key, resp) in &new {
        let Some(resp) = resp else { continue };
        assert!(
            resp.status == 201 || resp.status == 503,
            "append {key} through the restarted node: {} {}",
            resp.status,
            resp.text()
        );
        if resp.status != 201 {
            continue;
        }
        acked += 1;
        let seq = resp.json()["seq"].as_u64().expect("seq");
        if stored_key(session, seq).as_deref() != Some(key) {
            wrong.push(format!(
                "{key} acknowledged as {session} seq {seq}, which holds {:?}",
                stored_key(session, seq)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {acked} acknowledgements carry another request's seq:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        cluster.stderr_tails(3000)
    );
    assert!(
        acked > 0,
        "no append through the restarted node was acknowledged"
    );
    // Every key is stored at most once; every acknowledged one exactly once.
    for (i, session) in SESSIONS.iter().enumerate() {
        let mut keys: Vec<&str> = events[i]
            .iter()
            .filter_map(|e| e["idempotency_key"].as_str())
            .collect();
        let all = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(
            keys.len(),
            all,
            "{session} stores a key twice: {:?}",
            events[i]
        );
    }
    let acked_old = old
        .iter()
        .filter(|(_, _, r)| r.as_ref().is_some_and(|r| r.status == 201))
        .count();
    let metrics = cluster.node(1).get("/metrics").text();
    let stale = metrics
        .lines()
        .find(|l| l.starts_with("starcite_stale_replies_dropped_total"))
        .unwrap_or("starcite_stale_replies_dropped_total (absent)");
    eprintln!(
        "new round: {acked} of {ROUND} acknowledged, all with their own seq; old round: \
         {acked_old} answered before the kill; node 1: {stale}"
    );
}
