//! A real 3-node cluster (issue 3), seen from outside: any node serves any request, every
//! replica converges, a killed leader is replaced without losing an acknowledged append,
//! an acknowledgement waits for a majority's fsync (not for everyone's), a node that
//! missed many appends catches up through a snapshot, a partitioned leader cannot
//! acknowledge, and without a quorum a write is refused instead of left hanging.
//!
//! Each test starts its own three processes (`common::cluster::Cluster`), one shard each,
//! and compares the replicas directly through `GET /debug/groups/:g`.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::cluster::{
    groups_of, is_retryable, quantile, wait_first_ack_after, Ack, Cluster, ClusterOpts,
};
use common::{assert_error, seqs, try_request, Conn, Resp, Ws};
use serde_json::{json, Value};

/// `--request-timeout` of the tests that expect 503s: short, so that failures are quick.
const REQUEST_TIMEOUT: &str = "1s";
const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(1);
/// Time on top of the request timeout for a 503 to arrive (3 processes share 2 cores).
const REPLY_SLACK: Duration = Duration::from_millis(1500);
const LEADER_TIMEOUT: Duration = Duration::from_secs(15);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a client keeps retrying one idempotency key while the cluster fails over.
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
const FSYNC_DELAY_MS: u64 = 300;

fn post_append(addr: SocketAddr, session: &str, body: &Value) -> std::io::Result<Resp> {
    common::cluster::post_append(addr, session, &body.to_string())
}

fn append_body(key: &str) -> Value {
    json!({"type": "t", "payload": {"key": key}, "idempotency_key": key})
}

/// Appends `body` through `addrs` in turn, retrying the same body (so the same
/// idempotency key) on 503 or a failed connection until a 201, which it returns.
fn append_retrying(addrs: &[SocketAddr], session: &str, body: &Value) -> Value {
    let deadline = Instant::now() + RETRY_TIMEOUT;
    let mut attempt = 0;
    loop {
        let resp = post_append(addrs[attempt % addrs.len()], session, body);
        if let Ok(r) = &resp {
            if r.status == 201 {
                return r.json();
            }
        }
        assert!(is_retryable(&resp), "append {body} to {session}: {resp:?}");
        assert!(
            Instant::now() < deadline,
            "append {body} to {session} not acknowledged within {RETRY_TIMEOUT:?}: {resp:?}"
        );
        attempt += 1;
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one append to node `via` and asserts it is refused with 503 `unavailable` or
/// `commit_unknown` and `Retry-After`, within the request timeout and some slack.
#[track_caller]
fn assert_refused_in_time(cluster: &Cluster, via: usize, session: &str, key: &str) {
    let started = Instant::now();
    let resp = post_append(cluster.addr(via), session, &append_body(key))
        .unwrap_or_else(|e| panic!("append {key} via node {via}: {e}"));
    let took = started.elapsed();
    assert_eq!(
        resp.status,
        503,
        "append {key} via node {via} answered {} {}",
        resp.status,
        resp.text()
    );
    let code = resp.json()["error"].as_str().unwrap_or("").to_string();
    assert!(
        code == "unavailable" || code == "commit_unknown",
        "append {key} via node {via}: 503 {code}"
    );
    assert!(
        resp.header("retry-after").is_some(),
        "503 without Retry-After"
    );
    assert!(
        took <= REQUEST_TIMEOUT_MAX + REPLY_SLACK,
        "append {key} via node {via} was refused after {took:?}, past the request timeout"
    );
}

/// Idempotency keys of `events`, in seq order, asserting seqs contiguous from 1 and no
/// key twice.
#[track_caller]
fn keys_of_contiguous(node: usize, session: &str, events: &[Value]) -> Vec<String> {
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(
        seqs(events),
        expected,
        "node {node}, {session}: seqs contiguous from 1"
    );
    let keys: Vec<String> = events
        .iter()
        .map(|e| e["idempotency_key"].as_str().unwrap_or("").to_string())
        .collect();
    let mut seen = HashSet::new();
    for key in keys.iter().filter(|k| !k.is_empty()) {
        assert!(
            seen.insert(key),
            "node {node}, {session}: key {key} appears twice"
        );
    }
    keys
}

// ---------------------------------------------------------------------------------------
// Replication
// ---------------------------------------------------------------------------------------

#[test]
fn any_node_serves_any_request_and_every_replica_converges() {
    let mut cluster = Cluster::start(ClusterOpts::new("cl-repl"));
    let sessions: Vec<String> = (0..6).map(|s| format!("rep-{s}")).collect();
    for id in &sessions {
        cluster.create_session(1, id);
        for i in [2, 3] {
            let resp = cluster.node(i).get(&format!("/v1/sessions/{id}"));
            assert_eq!(resp.status, 200, "{id} created on node 1, read on node {i}");
        }
    }
    let again = json!({ "id": sessions[0] }).to_string();
    assert_error(
        &cluster.node(2).post("/v1/sessions", &again),
        409,
        "session_exists",
    );

    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    for k in 0..90usize {
        let via = 1 + k % 3;
        let id = &sessions[k % sessions.len()];
        let key = format!("k{k}");
        let (status, reply) = cluster.append(via, id, &append_body(&key));
        assert_eq!(status, 201, "append {key} via node {via}: {reply}");
        let keys = acked.entry(id.clone()).or_default();
        keys.push(key.clone());
        let seq = keys.len() as u64;
        assert_eq!(reply["seq"], seq, "{id}: seqs contiguous");
        // Read-your-writes from the two other nodes.
        for other in [1 + (k + 1) % 3, 1 + (k + 2) % 3] {
            let session = cluster.node(other).session(id);
            assert!(
                session["last_seq"].as_u64().unwrap() >= seq,
                "node {other} shows {id} at {} after seq {seq} was acknowledged",
                session["last_seq"]
            );
            let path = format!("/v1/sessions/{id}/events?cursor={}&limit=1", seq - 1);
            let page = cluster.node(other).get(&path).json();
            assert_eq!(page["events"][0]["idempotency_key"], key, "node {other}");
        }
    }
    // Dedupe is replicated: a retry through another node gets the original seq.
    let (status, reply) = cluster.append(3, &sessions[0], &append_body("k0"));
    assert_eq!(status, 201, "{reply}");
    assert_eq!(
        (reply["seq"].as_u64(), &reply["deduped"]),
        (Some(1), &json!(true))
    );

    for i in cluster.ids() {
        for id in &sessions {
            let keys = keys_of_contiguous(i, id, &cluster.events(i, id));
            assert_eq!(keys, acked[id], "node {i}, {id}");
        }
    }
    let views = cluster.wait_converged(&groups_of(&sessions), CONVERGE_TIMEOUT);
    for id in &sessions {
        let view = views
            .iter()
            .find(|v| v["group"] == shards::group_of(id))
            .unwrap();
        assert_eq!(view["sessions"][id], acked[id].len(), "{id} in {view}");
    }
}

// ---------------------------------------------------------------------------------------
// Failover under load
// ---------------------------------------------------------------------------------------

/// A client appending to `session` until `stop`, each append with a new idempotency key,
/// through the nodes in turn. A 503 or a failed connection retries the same key on the
/// next node until a 201, which is recorded in `acks`.
fn spawn_writer(
    addrs: Vec<SocketAddr>,
    session: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut turn = 0usize;
        for n in 0.. {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let key = format!("{prefix}-{n}");
            let body = append_body(&key);
            let deadline = Instant::now() + RETRY_TIMEOUT;
            loop {
                turn += 1;
                let sent_at = Instant::now();
                let resp = post_append(addrs[turn % addrs.len()], &session, &body);
                if let Ok(r) = &resp {
                    if r.status == 201 {
                        let seq = r.json()["seq"].as_u64().expect("seq");
                        let ack = Ack {
                            session: session.clone(),
                            key,
                            seq,
                            sent_at,
                            acked_at: Instant::now(),
                        };
                        acks.lock().unwrap().push(ack);
                        break;
                    }
                }
                assert!(is_retryable(&resp), "append {key}: {resp:?}");
                assert!(Instant::now() < deadline, "{key} never acknowledged");
                thread::sleep(Duration::from_millis(20));
            }
        }
    })
}

/// Every acknowledged append of `session` is on node `node` exactly once, at its seq.
#[track_caller]
fn assert_acks_present(cluster: &Cluster, node: usize, session: &str, acks: &[Ack]) {
    let events = cluster.events(node, session);
    let keys = keys_of_contiguous(node, session, &events);
    for ack in acks.iter().filter(|a| a.session == session) {
        assert_eq!(
            keys.get(ack.seq as usize - 1),
            Some(&ack.key),
            "node {node}, {session}: acknowledged {} at seq {}",
            ack.key,
            ack.seq
        );
    }
}

#[test]
fn killing_the_leader_under_load_fails_over_and_loses_no_acknowledged_append() {
    let kills: usize = std::env::var("FAILOVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut cluster =
        Cluster::start(ClusterOpts::new("cl-failover").arg("--request-timeout", "2s"));
    let target = "fo-target".to_string();
    let bystander = "fo-bystander".to_string();
    let group = shards::group_of(&target);
    assert_ne!(group, shards::group_of(&bystander));
    cluster.create_session(1, &target);
    cluster.create_session(1, &bystander);

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for (n, session) in [&target, &target, &target, &bystander].iter().enumerate() {
        let (stop, acks) = (stop.clone(), acks.clone());
        let (session, prefix) = (session.to_string(), format!("w{n}"));
        writers.push(spawn_writer(cluster.addrs(), session, prefix, stop, acks));
    }
    let mut failover_ms = Vec::new();
    for round in 1..=kills {
        thread::sleep(Duration::from_millis(700));
        let leader = cluster.wait_leader(group, LEADER_TIMEOUT);
        let killed_at = Instant::now();
        cluster.kill9(leader);
        let Some(took) = wait_first_ack_after(
            |f| acks.lock().unwrap().iter().for_each(&mut *f),
            &target,
            killed_at,
            RETRY_TIMEOUT,
        ) else {
            panic!(
                "round {round}: no append to group {group} acknowledged within {RETRY_TIMEOUT:?} of killing node {leader}\n{}",
                cluster.stderr_tails(3000)
            );
        };
        println!(
            "failover_ms={} (round {round}, killed leader node {leader})",
            took.as_millis()
        );
        failover_ms.push(took.as_millis() as u64);
        cluster.restart(leader);
        cluster.wait_caught_up(leader, group, CONVERGE_TIMEOUT);
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().expect("writer panicked");
    }

    let acks = acks.lock().unwrap().clone();
    let groups = groups_of(&[target.clone(), bystander.clone()]);
    let views = cluster.wait_converged(&groups, CONVERGE_TIMEOUT);
    for i in cluster.ids() {
        assert_acks_present(&cluster, i, &target, &acks);
        assert_acks_present(&cluster, i, &bystander, &acks);
    }
    let view = views.iter().find(|v| v["group"] == group).unwrap();
    let acked_target = acks.iter().filter(|a| a.session == target).count();
    assert!(view["sessions"][&target].as_u64().unwrap() >= acked_target as u64);
    failover_ms.sort_unstable();
    println!(
        "failover over {kills} kills: sorted_ms={failover_ms:?} p50_ms={} max_ms={} ({} appends acknowledged)",
        quantile(&failover_ms, 0.5),
        quantile(&failover_ms, 1.0),
        acks.len()
    );
}

// ---------------------------------------------------------------------------------------
// Acknowledgement needs a majority's fsync
// ---------------------------------------------------------------------------------------

/// Median round trip of `samples` sequential appends to `session` through node `via`.
/// An append that got 503 (leadership still settling while 300 ms fsyncs slow the
/// elections down on a busy machine) is retried with its key; its time counts in full.
fn median_append_ms(cluster: &Cluster, via: usize, session: &str, samples: usize) -> u64 {
    // The session exists once a create got 201 or, after a retried create, 409.
    let deadline = Instant::now() + RETRY_TIMEOUT;
    loop {
        let resp = try_request(
            cluster.addr(via),
            "POST",
            "/v1/sessions",
            &[("Content-Type", "application/json")],
            json!({ "id": session }).to_string().as_bytes(),
        );
        match resp {
            Ok(r) if r.status == 201 || r.status == 409 => break,
            other => {
                assert!(is_retryable(&other), "create {session}: {other:?}");
                assert!(Instant::now() < deadline, "create {session}: {other:?}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let mut millis = Vec::new();
    for n in 0..samples {
        let body = append_body(&format!("lat-{n}"));
        let started = Instant::now();
        append_retrying(&[cluster.addr(via)], session, &body);
        millis.push(started.elapsed().as_millis() as u64);
    }
    millis.sort_unstable();
    println!("append latency via node {via}: sorted_ms={millis:?}");
    quantile(&millis, 0.5)
}

#[test]
fn one_slow_follower_does_not_delay_acknowledgements() {
    let delay = FSYNC_DELAY_MS.to_string();
    // Election timeouts must exceed the slowest fsync (here 300 ms): a 40 ms tick gives
    // 600–1200 ms.
    let opts = ClusterOpts::new("cl-fsync-one")
        .arg("--raft-tick", "40ms")
        .node_env(3, "STARCITE_TEST_FSYNC_DELAY_MS", &delay);
    let mut cluster = Cluster::start(opts);
    // A session whose group a fast node leads: the slow node is one of its followers.
    let mut chosen = None;
    for n in 0..64 {
        let id = format!("fast-{n}");
        let leader = cluster.wait_leader(shards::group_of(&id), LEADER_TIMEOUT);
        if leader != 3 {
            chosen = Some((id, leader));
            break;
        }
    }
    let (id, leader) = chosen.expect("a group led by node 1 or 2");
    let median = median_append_ms(&cluster, leader, &id, 21);
    assert!(
        median < 150,
        "median append {median} ms with only follower node 3 delaying its fsync by {FSYNC_DELAY_MS} ms"
    );
    // The slow follower still receives everything.
    cluster.wait_converged(&[shards::group_of(&id)], CONVERGE_TIMEOUT);
}

#[test]
fn two_slow_replicas_delay_acknowledgements() {
    let delay = FSYNC_DELAY_MS.to_string();
    let opts = ClusterOpts::new("cl-fsync-two")
        .arg("--raft-tick", "40ms")
        .node_env(2, "STARCITE_TEST_FSYNC_DELAY_MS", &delay)
        .node_env(3, "STARCITE_TEST_FSYNC_DELAY_MS", &delay);
    let mut cluster = Cluster::start(opts);
    let id = "slow";
    let leader = cluster.wait_leader(shards::group_of(id), LEADER_TIMEOUT);
    // Whoever leads, a majority includes a slow node.
    let median = median_append_ms(&cluster, leader, id, 11);
    assert!(
        median >= 250,
        "median append {median} ms although 2 of 3 replicas delay their fsync by {FSYNC_DELAY_MS} ms"
    );
}

// ---------------------------------------------------------------------------------------
// Catch-up
// ---------------------------------------------------------------------------------------

/// Appends `per_session` events to each of `sessions` through `addr` on one keep-alive
/// connection, retrying on 503.
/// Creates the sessions, stops node 3, and fills each session with `per_session`
/// appends from writers of `per_writer` sessions each, through nodes 1 and 2 in turn.
fn fill_while_node_3_is_down(
    cluster: &mut Cluster,
    sessions: &[String],
    per_writer: usize,
    per_session: usize,
) {
    for id in sessions {
        cluster.create_session(1, id);
    }
    let status = cluster.terminate(3);
    assert!(status.success(), "node 3 stopped with {status}");
    let fillers: Vec<_> = sessions
        .chunks(per_writer)
        .enumerate()
        .map(|(w, chunk)| {
            let addr = cluster.addr(1 + w % 2);
            let chunk = chunk.to_vec();
            thread::spawn(move || fill(addr, chunk, per_session))
        })
        .collect();
    for filler in fillers {
        filler.join().expect("filler panicked");
    }
}

/// Waits until every replica of the sessions' groups converged, each session at
/// `per_session` events.
fn assert_converged_at(cluster: &mut Cluster, sessions: &[String], per_session: usize) {
    let views = cluster.wait_converged(&groups_of(sessions), CONVERGE_TIMEOUT);
    for id in sessions {
        let view = views
            .iter()
            .find(|v| v["group"] == shards::group_of(id))
            .unwrap();
        assert_eq!(view["sessions"][id], per_session, "{id} in {view}");
    }
}

fn fill(addr: SocketAddr, sessions: Vec<String>, per_session: usize) {
    let mut conn = Conn::open(addr);
    for i in 0..per_session {
        for id in &sessions {
            let body = append_body(&format!("{id}-{i}"));
            let path = format!("/v1/sessions/{id}/append");
            let resp = conn.post_json(&path, &body.to_string());
            if resp.status != 201 {
                assert_eq!(resp.status, 503, "{}", resp.text());
                append_retrying(&[addr], id, &body);
            }
        }
    }
}

#[test]
fn a_restarted_node_that_missed_many_appends_catches_up_through_a_snapshot() {
    // Every node keeps only 32 Raft entries per group, so the leaders compact far past
    // what node 3 has while it is down: it can only catch up through a snapshot.
    let opts = ClusterOpts::new("cl-catchup").arg("--raft-log-entries", "32");
    let mut cluster = Cluster::start(opts);
    let sessions: Vec<String> = (0..8).map(|s| format!("cu-{s}")).collect();
    let per_session = 250;
    let started = Instant::now();
    fill_while_node_3_is_down(&mut cluster, &sessions, 2, per_session);
    println!(
        "{} appends with node 3 down took {:?}",
        per_session * sessions.len(),
        started.elapsed()
    );

    cluster.restart(3);
    assert_converged_at(&mut cluster, &sessions, per_session);
    for id in &sessions {
        let reference = cluster.events(1, id);
        keys_of_contiguous(1, id, &reference);
        assert_eq!(reference.len(), per_session, "{id}");
        assert!(cluster.events(3, id) == reference, "node 3 /events of {id}");
        let path = format!("/v1/sessions/{id}/tail?cursor=0&batch_size=1000");
        let mut ws = Ws::connect(cluster.addr(3), &path);
        let tailed = ws.collect_until(per_session as u64, Duration::from_secs(10));
        assert!(tailed == reference, "node 3 tail of {id}");
        ws.close();
    }
    // Node 3 takes part again.
    let (status, reply) = cluster.append(3, &sessions[0], &append_body("after"));
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply["seq"], per_session as u64 + 1);
}

// ---------------------------------------------------------------------------------------
// Partition and lost quorum
// ---------------------------------------------------------------------------------------

/// Waits until node `node` no longer calls itself the leader of group `g`.
fn wait_stepped_down(cluster: &Cluster, node: usize, g: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let view = cluster.debug_group(node, g);
        if view["role"] != "leader" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "isolated node {node} still leads group {g} after {timeout:?}: {view}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The in-process switch (`STARCITE_TEST_FAULTS`) cuts the node off; the main partition
/// tests, with the kernel cutting real links between network namespaces, are in
/// tests/net_faults.rs.
#[test]
fn an_isolated_leader_cannot_acknowledge_and_rejoins_cleanly() {
    let opts = ClusterOpts::new("cl-partition")
        .env("STARCITE_TEST_FAULTS", "1")
        .arg("--request-timeout", REQUEST_TIMEOUT);
    let mut cluster = Cluster::start(opts);
    let id = "part";
    let group = shards::group_of(id);
    cluster.create_session(1, id);
    let mut acked: Vec<String> = Vec::new();
    for n in 0..5 {
        let key = format!("before-{n}");
        let (status, reply) = cluster.append(1 + n % 3, id, &append_body(&key));
        assert_eq!(status, 201, "{reply}");
        acked.push(key);
    }
    let old = cluster.wait_leader(group, LEADER_TIMEOUT);
    let majority: Vec<SocketAddr> = cluster
        .ids()
        .into_iter()
        .filter(|&i| i != old)
        .map(|i| cluster.addr(i))
        .collect();

    cluster.isolate(old, true);
    assert_refused_in_time(&cluster, old, id, "isolated-1");
    let isolated_at = Instant::now();
    for n in 0..5 {
        let key = format!("during-{n}");
        let reply = append_retrying(&majority, id, &append_body(&key));
        assert_eq!(reply["seq"], acked.len() as u64 + 1, "{key}");
        acked.push(key);
    }
    println!(
        "the majority side acknowledged again {:?} after the isolation",
        isolated_at.elapsed()
    );
    let new = cluster.wait_leader(group, LEADER_TIMEOUT);
    assert_ne!(
        new, old,
        "the isolated node cannot be the leader that committed"
    );
    assert_refused_in_time(&cluster, old, id, "isolated-2");
    wait_stepped_down(&cluster, old, group, Duration::from_secs(10));

    cluster.isolate(old, false);
    let views = cluster.wait_converged(&[group], CONVERGE_TIMEOUT);
    assert_eq!(views[0]["sessions"][id], acked.len(), "{}", views[0]);
    let keys = keys_of_contiguous(old, id, &cluster.events(old, id));
    assert_eq!(
        keys, acked,
        "the old leader holds exactly the acknowledged events"
    );
    let reply = append_retrying(&[cluster.addr(old)], id, &append_body("healed"));
    assert_eq!(reply["seq"], acked.len() as u64 + 1);
}

/// Waits until node `node` answers 503 on `/health/ready` naming group `g` as leaderless.
fn wait_not_ready_for(cluster: &Cluster, node: usize, g: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let resp = cluster.node(node).get("/health/ready");
        if resp.status == 503 {
            let body = resp.json();
            let leaderless = body["groups_without_leader"].as_array();
            if leaderless.is_some_and(|gs| gs.iter().any(|x| x == g)) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {node} /health/ready after {timeout:?}: {} {}",
            resp.status,
            resp.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn without_a_quorum_a_write_is_refused_with_503_not_left_hanging() {
    let opts = ClusterOpts::new("cl-noquorum").arg("--request-timeout", REQUEST_TIMEOUT);
    let mut cluster = Cluster::start(opts);
    let id = "nq";
    let group = shards::group_of(id);
    cluster.create_session(1, id);
    let (status, reply) = cluster.append(1, id, &append_body("first"));
    assert_eq!(status, 201, "{reply}");

    cluster.kill9(2);
    cluster.kill9(3);
    for n in 0..3 {
        assert_refused_in_time(&cluster, 1, id, &format!("nq-{n}"));
        thread::sleep(Duration::from_millis(300));
    }
    let started = Instant::now();
    let resp = cluster.node(1).post("/v1/sessions", r#"{"id":"nq-new"}"#);
    assert_eq!(resp.status, 503, "create without a quorum: {}", resp.text());
    assert!(started.elapsed() <= REQUEST_TIMEOUT_MAX + REPLY_SLACK);
    wait_not_ready_for(&cluster, 1, group, Duration::from_secs(15));

    // A majority again: the retried key is applied exactly once.
    cluster.restart(2);
    let reply = append_retrying(&[cluster.addr(1)], id, &append_body("nq-0"));
    let events = cluster.events(1, id);
    let keys = keys_of_contiguous(1, id, &events);
    assert_eq!(keys[0], "first");
    let seq = reply["seq"].as_u64().unwrap();
    assert_eq!(keys[seq as usize - 1], "nq-0");
    cluster.wait_converged(&[group], CONVERGE_TIMEOUT);
}

// ---------------------------------------------------------------------------------------
// Every node killed at once
// ---------------------------------------------------------------------------------------

/// kill -9 of the whole cluster under load, more than once, with small segments (seals
/// while entries are in flight) and frequent shard snapshots (resume positions with
/// entries not yet applied): after each restart every acknowledged append is on every
/// replica exactly once and the replicas agree.
#[test]
fn killing_every_node_at_once_loses_no_acknowledged_append() {
    let mut cluster = Cluster::start(
        // The harness runs 4 MiB segments: each batch takes at least 4 KiB, so a few
        // thousand appends fill one.
        ClusterOpts::new("cl-crash-all")
            .arg("--snapshot-log-bytes", "524288")
            .arg("--request-timeout", "2s"),
    );
    let sessions: Vec<String> = (0..6).map(|n| format!("crash-{n}")).collect();
    for s in &sessions {
        cluster.create_session(1, s);
    }
    let acks = Arc::new(Mutex::new(Vec::new()));
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = sessions
            .iter()
            .enumerate()
            .map(|(n, s)| {
                let prefix = format!("r{round}w{n}");
                spawn_writer(
                    cluster.addrs(),
                    s.clone(),
                    prefix,
                    stop.clone(),
                    acks.clone(),
                )
            })
            .collect();
        thread::sleep(Duration::from_millis(1500));
        for i in cluster.ids() {
            cluster.kill9(i);
        }
        // Writers retry their pending key through the restart, then stop.
        for i in cluster.ids() {
            cluster.spawn_again(i);
        }
        for i in cluster.ids() {
            cluster.wait_ready(i, LEADER_TIMEOUT);
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().expect("writer panicked");
        }
    }
    let acks = acks.lock().unwrap().clone();
    assert!(acks.len() > 50, "only {} appends acknowledged", acks.len());
    cluster.wait_converged(&groups_of(&sessions), CONVERGE_TIMEOUT);
    for i in cluster.ids() {
        for s in &sessions {
            assert_acks_present(&cluster, i, s, &acks);
        }
    }
    println!(
        "{} appends acknowledged over 3 whole-cluster crashes",
        acks.len()
    );
}

// ---------------------------------------------------------------------------------------
// Tails across a leader change
// ---------------------------------------------------------------------------------------

/// A tail on a node that survives follows the session across the death of the group's
/// leader: every seq once, in order, including those acknowledged by the new leader.
#[test]
fn a_tail_continues_across_a_leader_change_without_gap_or_duplicate() {
    let mut cluster =
        Cluster::start(ClusterOpts::new("cl-tail-failover").arg("--request-timeout", "2s"));
    let session = "tail-fo".to_string();
    let group = shards::group_of(&session);
    cluster.create_session(1, &session);
    let leader = cluster.wait_leader(group, LEADER_TIMEOUT);
    let watcher = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let mut ws = Ws::connect(
        cluster.addr(watcher),
        &format!("/v1/sessions/{session}/tail?cursor=0"),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let live: Vec<SocketAddr> = cluster
        .ids()
        .into_iter()
        .filter(|&i| i != leader)
        .map(|i| cluster.addr(i))
        .collect();
    let writer = spawn_writer(
        live,
        session.clone(),
        "t".into(),
        stop.clone(),
        acks.clone(),
    );
    thread::sleep(Duration::from_millis(500));
    cluster.kill9(leader);
    let new_leader = loop {
        let l = cluster.wait_leader(group, LEADER_TIMEOUT);
        if l != leader {
            break l;
        }
        thread::sleep(Duration::from_millis(20));
    };
    thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer panicked");
    let acks = acks.lock().unwrap().clone();
    let last = acks
        .iter()
        .map(|a| a.seq)
        .max()
        .expect("appends acknowledged");
    assert!(
        acks.iter()
            .any(|a| a.acked_at > Instant::now() - Duration::from_millis(700)),
        "appends acknowledged by the new leader {new_leader}"
    );
    let events = ws.collect_until(last, Duration::from_secs(20));
    let tailed = seqs(&events);
    assert_eq!(
        tailed,
        (1..=tailed.len() as u64).collect::<Vec<_>>(),
        "tail on node {watcher}: every seq once, in order"
    );
    for ack in &acks {
        let e = &events[ack.seq as usize - 1];
        assert_eq!(e["idempotency_key"], ack.key.as_str(), "seq {}", ack.seq);
    }
    println!(
        "tail on node {watcher} followed {} events across the death of leader {leader}",
        tailed.len()
    );
}

// ---------------------------------------------------------------------------------------
// Five nodes: each group on 3 of them
// ---------------------------------------------------------------------------------------

/// With 5 members every group has 3 replicas (rendezvous hashing); a node that holds no
/// replica of a group still serves its writes, reads and tails (forwarded).
#[test]
fn five_nodes_place_each_group_on_three_and_every_node_serves_every_session() {
    let mut opts = ClusterOpts::new("cl-five");
    opts.nodes = 5;
    let mut cluster = Cluster::start(opts);
    let sessions: Vec<String> = (0..8).map(|n| format!("five-{n}")).collect();
    for s in &sessions {
        cluster.create_session(1, s);
    }
    for (n, s) in sessions.iter().enumerate() {
        for via in cluster.ids() {
            let body = append_body(&format!("{s}-{via}"));
            let (status, reply) = cluster.append(via, s, &body);
            assert_eq!(status, 201, "append to {s} via node {via}: {reply}");
        }
        let g = shards::group_of(s);
        let replicas: Vec<usize> = cluster
            .ids()
            .into_iter()
            .filter(|&i| cluster.debug_group(i, g)["role"] != "none")
            .collect();
        assert_eq!(replicas.len(), 3, "group {g} of {s}: replicas {replicas:?}");
        // Reads and a tail through a node without a replica.
        let outsider = cluster
            .ids()
            .into_iter()
            .find(|i| !replicas.contains(i))
            .expect("a node without a replica");
        let events = cluster.events(outsider, s);
        assert_eq!(
            seqs(&events),
            (1..=5).collect::<Vec<_>>(),
            "{s} via {outsider}"
        );
        let mut ws = Ws::connect(
            cluster.addr(outsider),
            &format!("/v1/sessions/{s}/tail?cursor=2"),
        );
        let tailed = ws.collect_until(5, Duration::from_secs(10));
        assert_eq!(
            seqs(&tailed),
            vec![3, 4, 5],
            "tail of {s} via {outsider} ({n})"
        );
    }
    cluster.wait_converged(&groups_of(&sessions), CONVERGE_TIMEOUT);
}

// ---------------------------------------------------------------------------------------
// Retention in a cluster
// ---------------------------------------------------------------------------------------

/// `first_available_seq` of a session on one node (1 when nothing expired there).
fn first_available(cluster: &Cluster, node: usize, id: &str) -> u64 {
    let resp = common::request(
        cluster.addr(node),
        "GET",
        &format!("/v1/sessions/{id}/events?cursor=0&limit=1"),
        &[],
        b"",
    );
    match resp.status {
        200 => 1,
        410 => resp.json()["first_available_seq"].as_u64().expect("F"),
        other => panic!("node {node}: /events of {id}: {other} {}", resp.text()),
    }
}

/// Every event of a session after `after` on one node, paging `/events`.
fn events_after(cluster: &Cluster, node: usize, id: &str, after: u64) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut cursor = after;
    loop {
        let path = format!("/v1/sessions/{id}/events?cursor={cursor}&limit=1000");
        let resp = common::request(cluster.addr(node), "GET", &path, &[], b"");
        assert_eq!(resp.status, 200, "node {node} {path}: {}", resp.text());
        let page = resp.json();
        let events = page["events"].as_array().expect("events").clone();
        if events.is_empty() {
            return out;
        }
        cursor = page["next_cursor"].as_u64().expect("next_cursor");
        out.extend(events);
    }
}

fn segments_deleted(cluster: &Cluster, node: usize) -> u64 {
    let text = common::request(cluster.addr(node), "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|l| l.strip_prefix("starcite_log_segments_deleted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_node_catching_up_after_retention_gets_the_history_its_leader_still_holds() {
    // Small segments, frequent snapshots and a 3 MiB retention (no archive): the two
    // live nodes delete old segments while node 3 is down; node 3 then needs a snapshot
    // (32 Raft entries per group) whose history starts where its leader's log does.
    let mut opts = ClusterOpts::new("cl-retention")
        .arg("--raft-log-entries", "32")
        .arg("--snapshot-log-bytes", "1048576")
        .arg("--retention-bytes", "3145728");
    opts.segment_bytes = Some(1 << 20);
    let mut cluster = Cluster::start(opts);
    let sessions: Vec<String> = (0..2).map(|s| format!("rt-{s}")).collect();
    let per_session = 800;
    fill_while_node_3_is_down(&mut cluster, &sessions, 1, per_session);
    let deadline = Instant::now() + Duration::from_secs(20);
    while segments_deleted(&cluster, 1) == 0 || segments_deleted(&cluster, 2) == 0 {
        assert!(
            Instant::now() < deadline,
            "no segment deleted on nodes 1 and 2"
        );
        thread::sleep(Duration::from_millis(200));
    }
    for id in &sessions {
        assert!(first_available(&cluster, 1, id) > 1 || first_available(&cluster, 2, id) > 1);
    }

    cluster.restart(3);
    assert_converged_at(&mut cluster, &sessions, per_session);
    for id in &sessions {
        // Node 3 holds one contiguous range ending at the head, starting where the
        // snapshot's history did; the range both nodes hold is identical.
        let f3 = first_available(&cluster, 3, id);
        let f1 = first_available(&cluster, 1, id);
        let from = f1.max(f3);
        println!("{id}: first available seq on node 1 {f1}, on node 3 {f3}");
        // Node 1 deleted the start before node 3 came back, so node 3 could only get
        // the rest: it must not claim older events.
        assert!(
            f3 > 1,
            "node 3 holds {id} from seq 1, which its leader had deleted"
        );
        let on3 = events_after(&cluster, 3, id, from - 1);
        let on1 = events_after(&cluster, 1, id, from - 1);
        let expected: Vec<u64> = (from..=per_session as u64).collect();
        assert_eq!(seqs(&on3), expected, "node 3 {id} (F1 {f1}, F3 {f3})");
        assert!(on3 == on1, "node 3 and node 1 differ for {id}");
        // A tail on node 3 from 0: the expired gap (when node 3 lacks the start), then
        // everything it holds, then live.
        let path = format!("/v1/sessions/{id}/tail?cursor=0&batch_size=1");
        let mut ws = Ws::connect(cluster.addr(3), &path);
        let mut next = 1;
        if f3 > 1 {
            let gap = ws.next_json(Duration::from_secs(10));
            assert_eq!(gap["type"], "gap", "{gap}");
            assert_eq!(gap["reason"], "expired", "{gap}");
            assert_eq!(gap["next_cursor"], f3 - 1, "{gap}");
            next = f3;
        }
        if next <= per_session as u64 {
            let tailed = ws.collect_until(per_session as u64, Duration::from_secs(10));
            let expected: Vec<u64> = (next..=per_session as u64).collect();
            assert_eq!(seqs(&tailed), expected, "node 3 tail of {id}");
        }
        let (status, reply) = cluster.append(3, id, &append_body(&format!("{id}-after")));
        assert_eq!(status, 201, "{reply}");
        assert_eq!(reply["seq"], per_session as u64 + 1);
        let live = ws.next_json(Duration::from_secs(10));
        assert_eq!(live["seq"], per_session as u64 + 1, "{live}");
        ws.close();
    }
    cluster.wait_converged(&groups_of(&sessions), CONVERGE_TIMEOUT);
    cluster.assert_no_integrity_errors();
}
