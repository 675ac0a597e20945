//! A damaged last batch (issue 9, fault 4): a replica whose log ends in a batch that was
//! written whole but no longer passes its checks drops it, like a batch torn by a crash,
//! but it may have acknowledged what that batch held and cast a vote recorded there. So
//! it grants no vote (and learns its term from the other voters) until it has caught up
//! to a leader's commit index, also across a kill -9 meanwhile; then it is an ordinary
//! member again, and nothing acknowledged is lost.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, ClusterOpts};
use common::{flip, try_request};
use serde_json::{json, Value};

const SESSIONS: usize = 4;
const EVENTS: u64 = 40;
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

fn session(i: usize) -> String {
    format!("tail-{i}")
}

fn log_dir(cluster: &Cluster, node: usize) -> PathBuf {
    cluster.node(node).data_dir.join("shard-000").join("log")
}

fn marker(cluster: &Cluster, node: usize) -> PathBuf {
    cluster
        .node(node)
        .data_dir
        .join("shard-000")
        .join("catching-up")
}

/// A byte inside the last record of the log in `dir` (so inside its last batch), found
/// with the log's own scan: its segment and offset. The newest segment may be the
/// pre-written next one, holding no batch.
fn last_record(dir: &Path) -> (PathBuf, u64) {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    for path in segments.into_iter().rev() {
        let epoch: u64 = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let scan = shards::codec::scan_segment(&fs::read(&path).unwrap(), epoch);
        if let Some(last) = scan.records.last() {
            return (path, last.offset + 8);
        }
    }
    panic!("no batch in {}", dir.display())
}

fn append_all(cluster: &Cluster, round: &str) {
    for i in 0..SESSIONS {
        for n in 0..EVENTS / 2 {
            let body = json!({"type": "t", "payload": {"round": round, "n": n},
                              "idempotency_key": format!("{round}-{n}")});
            let node = 1 + (n as usize % 2);
            let (status, reply) = cluster.append(node, &session(i), &body);
            assert_eq!(status, 201, "append through node {node}: {reply}");
        }
    }
}

fn groups_catching_up(cluster: &Cluster, node: usize) -> u64 {
    let resp = try_request(cluster.addr(node), "GET", "/health/ready", &[], b"");
    resp.ok()
        .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .and_then(|v| v["groups_catching_up"].as_u64())
        .unwrap_or(0)
}

fn wait_live(cluster: &Cluster, node: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !try_request(cluster.addr(node), "GET", "/health/live", &[], b"")
        .is_ok_and(|r| r.status == 200)
    {
        assert!(Instant::now() < deadline, "node {node} not live");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_replica_whose_last_batch_is_damaged_catches_up_before_it_votes() {
    let mut cluster = Cluster::start(ClusterOpts::new("damaged-tail"));
    for i in 0..SESSIONS {
        cluster.create_session(1, &session(i));
    }
    append_all(&cluster, "a");
    // Node 3 has everything; damage its last batch while it is down.
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill9(3);
    let (segment, at) = last_record(&log_dir(&cluster, 3));
    flip(&segment, at);
    append_all(&cluster, "b");

    // With node 2 down too, node 3 cannot learn every voter's term: it stays catching
    // up (no group has a leader: node 1 alone is no majority).
    cluster.kill9(2);
    cluster.spawn_again(3);
    wait_live(&cluster, 3);
    std::thread::sleep(Duration::from_secs(2));
    let log = cluster.node(3).stderr();
    assert!(
        log.contains("the log's last batch is damaged"),
        "node 3 did not report the damaged batch:\n{log}"
    );
    assert!(marker(&cluster, 3).exists(), "the marker is written");
    assert!(
        groups_catching_up(&cluster, 3) > 0,
        "node 3's groups catch up"
    );
    // A kill -9 meanwhile: the bad bytes are gone, the marker is not.
    cluster.kill9(3);
    assert!(marker(&cluster, 3).exists(), "kill -9 leaves the marker");
    cluster.spawn_again(3);
    wait_live(&cluster, 3);
    assert!(groups_catching_up(&cluster, 3) > 0, "still catching up");

    // Node 2 back: node 3 learns the terms, catches up and votes again.
    let started = Instant::now();
    cluster.spawn_again(2);
    while marker(&cluster, 3).exists() {
        assert!(
            started.elapsed() < CATCH_UP_TIMEOUT,
            "node 3 still catching up after {CATCH_UP_TIMEOUT:?}\n{}",
            cluster.stderr_tails(4000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "node 3 caught up {} ms after node 2 came back",
        started.elapsed().as_millis()
    );
    assert!(cluster
        .node(3)
        .stderr()
        .contains("caught up after a damaged log tail"));
    assert_eq!(groups_catching_up(&cluster, 3), 0);
    cluster.wait_ready(3, Duration::from_secs(30));
    append_all(&cluster, "c");
    let groups: Vec<u16> = (0..shards::GROUPS).collect();
    cluster.wait_converged(&groups, Duration::from_secs(30));
    // Every acknowledged append once, in every session, read through node 3.
    for i in 0..SESSIONS {
        let events = cluster.events(3, &session(i));
        let mut keys: Vec<String> = events
            .iter()
            .map(|e| e["idempotency_key"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(keys.len() as u64, 3 * EVENTS / 2, "{}", session(i));
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len() as u64, 3 * EVENTS / 2, "no duplicates");
    }
}
