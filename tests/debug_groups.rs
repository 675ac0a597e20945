//! `GET /debug/groups/:g`: a replica's view of one group (role, term, indexes, per-session
//! last_seq, rolling checksum of committed entries), the same after a crash and restart.

mod common;

use common::{Opts, Server};
use serde_json::{json, Value};

fn debug(server: &Server, group: u16) -> Value {
    let resp = server.get(&format!("/debug/groups/{group}"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

/// The group once its commit index reached `index` (a restarted node commits its new
/// term's no-op a moment after it reports ready), or as it is after 10 s.
fn debug_once_committed(server: &Server, group: u16, index: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = debug(server, group);
        if now["commit_index"].as_u64() >= Some(index) || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn debug_group_reports_indexes_sessions_and_a_checksum_that_survives_restart() {
    let mut server = Server::start(Opts::new("debug-groups").arg("--snapshot-log-bytes", "262144"));
    let id = "dbg";
    let group = shards::group_of(id);
    server.create_session(id);
    for i in 0..200 {
        let body = json!({"type": "t", "payload": {"i": i}, "idempotency_key": format!("k{i}")});
        server.append_ok(id, &body);
    }
    let before = debug(&server, group);
    assert_eq!(before["group"], group);
    assert_eq!(before["role"], "leader");
    assert_eq!(before["sessions"][id], 200);
    assert_eq!(
        before["commit_index"], 202,
        "the leader's no-op + create + 200 appends: {before}"
    );
    assert_eq!(before["applied_index"], before["commit_index"]);
    assert_eq!(before["checksum"].as_str().unwrap().len(), 16);

    server.kill9();
    server.start_again();
    let after = debug_once_committed(&server, group, 203);
    // The restarted node leads a new term, which starts with a no-op entry.
    assert!(after["term"].as_u64() > before["term"].as_u64(), "{after}");
    assert_eq!(after["commit_index"], 203, "{after}");
    assert_eq!(after["sessions"], before["sessions"]);
    assert_ne!(after["checksum"], before["checksum"]);

    // Replicas that restart agree with those that did not: tests/cluster.rs compares
    // checksums across nodes after kill -9. Here: a second crash and restart.
    server.kill9();
    server.start_again();
    let again = debug_once_committed(&server, group, 204);
    assert_eq!(again["commit_index"], 204);

    server.append_ok(id, &json!({"type": "t", "payload": "more"}));
    let moved = debug(&server, group);
    assert_ne!(moved["checksum"], again["checksum"]);
    assert_eq!(moved["commit_index"], 205);
    assert_eq!(moved["sessions"][id], 201);
}

#[test]
fn debug_group_out_of_range_is_not_found() {
    let server = Server::start(Opts::new("debug-groups-404"));
    for path in ["/debug/groups/256", "/debug/groups/abc", "/debug/groups/-1"] {
        let resp = server.get(path);
        assert_eq!(resp.status, 404, "{path}");
        assert_eq!(resp.json()["error"], "not_found");
    }
    // A fresh group holds its first leader's no-op.
    assert_eq!(debug(&server, 0)["commit_index"], 1);
}
