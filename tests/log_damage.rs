//! Damaged bytes on one replica (issue 9, fault 4): a flipped byte in an event record
//! of a sealed segment, in a segment's index file, or in the shard snapshot. Reads of
//! every acknowledged event answer 200 with the right events through every node; the
//! damaged replica reports the damage (metrics, log line with file and offset,
//! `/health/ready`), hands over the leadership of the group concerned, repairs it from a
//! peer (then reads it locally again), its scrubber finds damage nobody reads, and every
//! group converges. A node alone cannot repair: it answers 500 naming the damage.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cluster::{groups_of, Cluster, ClusterOpts};
use common::{flip, Opts, Server, Ws};
use serde_json::{json, Value};
use shards::codec::verify_segment;
use shards::entry::Command;

const SEGMENT_BYTES: u64 = 1 << 20;
const SESSIONS: usize = 12;
const EVENTS: u64 = 128;
const PAD_BYTES: usize = 1800;

fn session(i: usize) -> String {
    format!("dmg-{i}")
}

/// Appends `EVENTS` events to every session, one client thread per session, so that
/// every sealed segment holds events of many sessions. Event `seq` carries `"n": seq`.
fn fill(post: impl Fn(&str, &Value) -> (u16, Value) + Sync) {
    let pad = "p".repeat(PAD_BYTES);
    std::thread::scope(|scope| {
        for i in 0..SESSIONS {
            let (post, pad) = (&post, &pad);
            scope.spawn(move || {
                let id = session(i);
                for n in 1..=EVENTS {
                    let body = json!({"type": "t", "payload": {"s": id, "n": n, "pad": pad}});
                    let (status, reply) = post(&id, &body);
                    assert_eq!(status, 201, "append to {id}: {reply}");
                    assert_eq!(reply["seq"], n);
                }
            });
        }
    });
}

/// Every event of the session read through `server`, checked against what was appended.
fn assert_all_events(server: &Server, id: &str) {
    let events = server.all_events(id);
    assert_eq!(events.len() as u64, EVENTS, "events of {id}");
    for (i, e) in events.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(e["seq"], seq, "{id}");
        assert_eq!(e["payload"]["n"], seq, "{id} seq {seq}");
        assert_eq!(e["payload"]["s"], id, "{id} seq {seq}");
    }
}

fn log_dir(server: &Server) -> PathBuf {
    server.data_dir.join("shard-000").join("log")
}

fn segment_path(server: &Server, epoch: u64) -> PathBuf {
    log_dir(server).join(format!("{epoch:020}.seg"))
}

fn index_path(server: &Server, epoch: u64) -> PathBuf {
    log_dir(server).join(format!("{epoch:020}.idx"))
}

fn snapshot_path(server: &Server) -> PathBuf {
    server.data_dir.join("shard-000").join("snapshot")
}

/// The segment where replay starts after a restart (the shard snapshot's).
fn resume_epoch(server: &Server) -> u64 {
    let bytes = fs::read(snapshot_path(server)).expect("a shard snapshot");
    let file = shards::snapshot::decode_snapshot_file(&bytes, 4096).expect("snapshot decodes");
    file.snapshot.resume_epoch
}

/// Where a snapshot file's body ends (the position of its own length copy).
fn body_end(file: &[u8]) -> u64 {
    (12..file.len() - 8)
        .rev()
        .find(|&at| u64::from_le_bytes(file[at..at + 8].try_into().unwrap()) == at as u64)
        .expect("the body's length") as u64
}

/// Flips a byte in the middle of the last event record of a session (other than
/// `except`) in segment `epoch`; returns (session, seq, offset of the record).
fn damage_an_event(server: &Server, epoch: u64, except: &[String]) -> (String, u64, u64) {
    let path = segment_path(server, epoch);
    let bytes = fs::read(&path).unwrap();
    let (records, spans) = verify_segment(&bytes, epoch);
    assert!(
        spans.is_empty(),
        "segment {epoch} is intact before the test"
    );
    let victim = records
        .iter()
        .rev()
        .find_map(|r| match &r.record.command {
            Command::Append(e) if r.record.index > 0 && !except.contains(&e.session_id) => {
                Some((e.session_id.clone(), e.seq, r.offset))
            }
            _ => None,
        })
        .expect("an event record in the segment");
    // The same event's last record in the segment is the one the index points at.
    let len = u32::from_le_bytes(bytes[victim.2 as usize..][..4].try_into().unwrap());
    flip(&path, victim.2 + 8 + u64::from(len) / 2);
    victim
}

/// Flips a byte inside the offsets of segment `epoch`'s index file.
fn damage_an_index(server: &Server, epoch: u64) {
    let path = index_path(server, epoch);
    let bytes = fs::read(&path).unwrap();
    let count = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as u64;
    assert!(count > 2, "index of segment {epoch} lists {count} events");
    flip(&path, 32 + 4 * (count / 2) + 1);
}

/// A log without its colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The sum of every sample of metric `name` on the node at `addr`.
fn metric(server: &Server, name: &str) -> u64 {
    let text = server.get("/metrics").text();
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until `check` holds for metric `name` of `server`; returns its value and when.
fn wait_metric(
    server: &Server,
    name: &str,
    timeout: Duration,
    check: impl Fn(u64) -> bool,
) -> (u64, Instant) {
    let deadline = Instant::now() + timeout;
    loop {
        let value = metric(server, name);
        if check(value) {
            return (value, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "{name} = {value} on {} after {timeout:?}\n{}",
            server.addr(),
            server.stderr_tail(6000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn set_fault(cluster: &Cluster, i: usize, body: Value) {
    let resp = cluster
        .try_request(i, "PUT", "/debug/faults", body.to_string().as_bytes())
        .unwrap();
    assert_eq!(resp.status, 204, "{}", resp.text());
}

/// Moves the leadership of every group in `groups` to node `to` (test fault `lead_to`).
fn lead_all(cluster: &mut Cluster, to: usize, groups: &[u16]) {
    for i in cluster.ids() {
        if i != to {
            set_fault(cluster, i, json!({ "lead_to": to }));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !groups
        .iter()
        .all(|&g| cluster.debug_group(to, g)["role"] == "leader")
    {
        assert!(
            Instant::now() < deadline,
            "node {to} did not take every group"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in cluster.ids() {
        if i != to {
            set_fault(cluster, i, json!({ "lead_to": null }));
        }
    }
}

#[test]
fn damage_on_one_replica_is_served_from_peers_reported_and_repaired() {
    let started = Instant::now();
    let opts = ClusterOpts {
        segment_bytes: Some(SEGMENT_BYTES),
        ..ClusterOpts::new("log-damage")
    }
    .arg("--snapshot-log-bytes", "262144")
    .arg("--tail-buffer-bytes", "4096")
    .env("STARCITE_TEST_FAULTS", "1")
    // Node 3 finds its damage by reading first; its scrubber is switched on later.
    .node_env(3, "STARCITE_SCRUB_BYTES_PER_SEC", "0");
    let mut cluster = Cluster::start(opts);
    let ids: Vec<String> = (0..SESSIONS).map(session).collect();
    for id in &ids {
        cluster.create_session(1, id);
    }
    fill(|id, body| cluster.append(1, id, body));
    let groups = groups_of(&ids);
    cluster.wait_converged(&groups, Duration::from_secs(30));
    let filled = started.elapsed();

    // Node 3 stopped: damage in three sealed segments its snapshot covers.
    cluster.terminate(3);
    let node3 = cluster.node(3);
    let resume = resume_epoch(node3);
    assert!(resume > 4, "the snapshot covers segments 1..{resume}");
    let (read_victim, read_seq, read_at) = damage_an_event(node3, 2, &[]);
    damage_an_index(node3, 3);
    let (scrub_victim, scrub_seq, scrub_at) =
        damage_an_event(node3, 4, std::slice::from_ref(&read_victim));
    cluster.spawn_again(3);
    cluster.wait_ready(3, Duration::from_secs(30));

    // Node 3 leads every group: reads through any node are served by its damaged log.
    lead_all(&mut cluster, 3, &groups);
    let read_group = shards::group_of(&read_victim);
    let detect_from = Instant::now();
    assert_all_events(cluster.node(1), &read_victim);
    let node3 = cluster.node(3);
    let (_, repaired_at) = wait_metric(
        node3,
        "starcite_log_repairs_total",
        Duration::from_secs(20),
        |v| v >= 1,
    );
    for i in cluster.ids() {
        for id in ids.iter().filter(|&id| *id != scrub_victim) {
            assert_all_events(cluster.node(i), id);
        }
    }
    let node3 = cluster.node(3);
    // Found by the reads (the event, and the index file), repaired from a peer.
    let (_, rebuilt_at) = wait_metric(
        node3,
        "starcite_log_index_rebuilds_total",
        Duration::from_secs(20),
        |v| v >= 1,
    );
    wait_metric(
        node3,
        "starcite_log_damaged_events",
        Duration::from_secs(20),
        |v| v == 0,
    );
    assert!(metric(node3, "starcite_log_damage_found_total") >= 2);
    assert!(metric(node3, "starcite_raft_leaderships_given_up_total") >= 1);
    let seg2 = segment_path(node3, 2)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let idx3 = index_path(node3, 3)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let log = node3.stderr();
    assert!(
        log.contains("damaged event")
            && log.contains(&seg2)
            && log.contains(&format!("offset {read_at}")),
        "node 3 names the damaged record's file and offset:\n{log}"
    );
    assert!(
        log.contains(&idx3),
        "node 3 names the damaged index file:\n{log}"
    );
    let ready = node3.get("/health/ready");
    assert_eq!(
        ready.status,
        200,
        "damage is detail, not a status: {}",
        ready.text()
    );
    let detail = &ready.json()["log_damage"];
    assert!(detail["found"].as_u64().unwrap() >= 2, "{detail}");
    assert!(detail["repaired"].as_u64().unwrap() >= 1, "{detail}");
    assert!(detail["recent"].to_string().contains(&seg2), "{detail}");
    // It handed the damaged group over and does not take it back by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.leader_of(read_group) == Some(3) {
        assert!(
            Instant::now() < deadline,
            "node 3 kept leading a damaged group"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Node 3's own replica now serves the repaired event: a tail there reads its local
    // committed log after its first page, and finds no damage on the way.
    let found_before = metric(cluster.node(3), "starcite_log_damage_found_total");
    // Two events fit the tail's 4 KiB first page (served by the group's leader); the
    // damaged one comes with the next read, from node 3's own log.
    assert!(read_seq > 3);
    let path = format!("/v1/sessions/{read_victim}/tail?cursor={}", read_seq - 3);
    let mut ws = Ws::connect(cluster.addr(3), &path);
    let tailed = ws.collect_until(read_seq + 2, Duration::from_secs(20));
    ws.close();
    let got: Vec<u64> = tailed
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    assert!(got.contains(&read_seq), "{got:?}");
    assert_eq!(
        metric(cluster.node(3), "starcite_log_damage_found_total"),
        found_before
    );
    assert!(metric(cluster.node(3), "starcite_log_repaired_events") >= 1);

    // The scrubber (on now) finds the damage in segment 4, which no read touched.
    let scrub_env = (
        "STARCITE_SCRUB_BYTES_PER_SEC".to_string(),
        (64u64 << 20).to_string(),
    );
    cluster.node_mut(3).opts.env.push(scrub_env);
    let scrub_from = Instant::now();
    cluster.restart(3);
    let node3 = cluster.node(3);
    let (_, scrub_repaired_at) = wait_metric(
        node3,
        "starcite_log_repairs_total",
        Duration::from_secs(30),
        |v| v >= 1,
    );
    wait_metric(
        node3,
        "starcite_log_damaged_events",
        Duration::from_secs(20),
        |v| v == 0,
    );
    let seg4 = segment_path(node3, 4)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let log = node3.stderr();
    let scrub_line = log
        .lines()
        .find(|l| l.contains("damaged event") && l.contains("the scrubber") && l.contains(&seg4))
        .unwrap_or_else(|| panic!("no scrubber finding in {seg4}:\n{log}"));
    assert!(
        scrub_line.contains(&seg4) && scrub_line.contains(&format!("offset {scrub_at}")),
        "{scrub_line}"
    );
    assert!(
        scrub_line.contains(&scrub_victim) && scrub_line.contains(&scrub_seq.to_string()),
        "{scrub_line}"
    );
    for i in cluster.ids() {
        for id in &ids {
            assert_all_events(cluster.node(i), id);
        }
    }

    // Node 2's snapshot: its last byte (the length trailer), then a byte in its body.
    cluster.terminate(2);
    let snapshot = snapshot_path(cluster.node(2));
    let len = fs::metadata(&snapshot).unwrap().len();
    flip(&snapshot, len - 1);
    cluster.restart(2);
    let log = cluster.node(2).stderr();
    let name = snapshot.display().to_string();
    let notes: Vec<&str> = log.lines().filter(|l| l.contains("snapshot")).collect();
    assert!(
        notes
            .iter()
            .any(|l| l.contains(&format!("length trailer at offset {}", len - 8))),
        "{log}"
    );
    assert!(
        notes.iter().all(|l| !l.contains("truncated")),
        "a damaged trailer is not a truncation:\n{log}"
    );
    cluster.terminate(2);
    // A byte in the middle of the checksummed body.
    flip(&snapshot, body_end(&fs::read(&snapshot).unwrap()) / 2);
    let snapshot_from = Instant::now();
    cluster.restart(2);
    let snapshot_restart = snapshot_from.elapsed();
    let log = cluster.node(2).stderr();
    let line = log
        .lines()
        .find(|l| l.contains("the shard snapshot is damaged"))
        .unwrap_or_else(|| panic!("no snapshot damage line:\n{log}"));
    assert!(
        line.contains(&name) && line.contains("checksum mismatch") && line.contains("offset 8"),
        "{line}"
    );
    assert!(metric(cluster.node(2), "starcite_log_damage_found_total") >= 1);
    for id in &ids {
        assert_all_events(cluster.node(2), id);
    }
    cluster.wait_converged(&groups, Duration::from_secs(30));
    eprintln!(
        "measured: fill {filled:?}; damaged event read and repaired {:?} after its read \
         started; damaged index file rebuilt {:?} after that read; unread damage found by \
         the scrubber and repaired {:?} after the restart began (graceful stop included); restart on a damaged snapshot \
         (whole log replayed) {snapshot_restart:?}; total {:?}",
        repaired_at - detect_from,
        rebuilt_at - detect_from,
        scrub_repaired_at - scrub_from,
        started.elapsed()
    );
}

/// A node alone has no healthy replica: a read covering a damaged event answers 500
/// `internal` naming the file and offset (never a panic, never wrong data), the health
/// detail reports it, and a damaged index file is rebuilt from its segment.
#[test]
fn a_node_alone_names_damage_it_cannot_repair_and_rebuilds_index_files() {
    let mut opts = Opts::new("log-damage-alone")
        .shards(1)
        .arg("--snapshot-log-bytes", "262144")
        .env("STARCITE_SCRUB_BYTES_PER_SEC", "0");
    opts.segment_bytes = SEGMENT_BYTES;
    let mut server = Server::start(opts);
    for i in 0..SESSIONS {
        server.create_session(&session(i));
    }
    fill(|id, body| {
        let resp = server.append(id, body);
        (resp.status, resp.json())
    });
    server.terminate();
    assert!(resume_epoch(&server) > 3);
    let (victim, seq, at) = damage_an_event(&server, 2, &[]);
    damage_an_index(&server, 3);
    server.start_again();

    let resp = server.get(&format!("/v1/sessions/{victim}/events?cursor=0&limit=1000"));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["error"], "internal");
    let message = body["message"].as_str().unwrap();
    let seg2 = segment_path(&server, 2).display().to_string();
    assert!(
        message.contains(&seg2) && message.contains(&format!("offset {at}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("event {seq} of {victim}")),
        "{message}"
    );
    // Every other event is served: the damaged index file is rebuilt from its segment
    // (reads of its events fail, naming it, until then).
    let deadline = Instant::now() + Duration::from_secs(20);
    let read_ok = |path: &str| loop {
        let resp = server.get(path);
        if resp.status == 200 {
            return resp.json();
        }
        assert_eq!(resp.status, 500, "{}", resp.text());
        assert!(resp.text().contains(".idx"), "{}", resp.text());
        assert!(
            Instant::now() < deadline,
            "index never rebuilt: {}",
            resp.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = read_ok(&format!(
        "/v1/sessions/{victim}/events?cursor={seq}&limit=10"
    ));
    assert_eq!(after["events"][0]["seq"], seq + 1);
    for i in 0..SESSIONS {
        let id = session(i);
        if id != victim {
            read_ok(&format!("/v1/sessions/{id}/events?cursor=0&limit=1000"));
            assert_all_events(&server, &id);
        }
    }
    assert!(metric(&server, "starcite_log_index_rebuilds_total") >= 1);
    assert_eq!(metric(&server, "starcite_log_damaged_events"), 1);
    let ready = server.get("/health/ready");
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.json()["log_damage"]["damaged_events"],
        1,
        "{}",
        ready.text()
    );
    // Still damaged, still serving, still alive.
    assert_eq!(
        server
            .get(&format!("/v1/sessions/{victim}/events?cursor=0"))
            .status,
        500
    );
    assert!(server.is_running());
}

/// A leader building a snapshot for a follower that fell behind reads the group's
/// history back from its log; a damaged event there is read from the third replica, so
/// the follower still gets the whole history and converges.
#[test]
fn a_snapshot_for_a_follower_reads_damaged_history_from_another_replica() {
    let opts = ClusterOpts {
        segment_bytes: Some(SEGMENT_BYTES),
        ..ClusterOpts::new("log-damage-history")
    }
    .arg("--raft-log-entries", "64")
    .env("STARCITE_TEST_FAULTS", "1")
    .env("STARCITE_SCRUB_BYTES_PER_SEC", "0");
    let mut cluster = Cluster::start(opts);
    let id = session(0);
    let group = shards::group_of(&id);
    cluster.create_session(1, &id);
    lead_all(&mut cluster, 1, &[group]);
    let pad = "h".repeat(PAD_BYTES);
    // Retried (with an idempotency key) while leadership moves: the damaged leader hands
    // the group over as soon as the snapshot's history read finds the damage.
    let append = |cluster: &Cluster, from: u64, to: u64| {
        for n in from..=to {
            let body = json!({"type": "t", "payload": {"s": id, "n": n, "pad": pad},
                              "idempotency_key": format!("k{n}")});
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (status, reply) = cluster.append(1, &id, &body);
                if status == 201 {
                    assert_eq!(reply["seq"], n, "{reply}");
                    break;
                }
                assert_eq!(status, 503, "{reply}");
                assert!(Instant::now() < deadline, "{reply}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let events = 600u64;
    append(&cluster, 1, 400);
    // Damage on the running leader, in its first (sealed) segment; nothing reads it yet.
    let (victim, seq, _) = damage_an_event(cluster.node(1), 1, &[]);
    assert_eq!(victim, id);
    // Node 2 falls behind by more than the 64 entries a leader keeps: it needs a
    // snapshot, whose history the leader reads back from its log.
    cluster.kill9(2);
    append(&cluster, 401, events);
    cluster.spawn_again(2);
    cluster.wait_ready(2, Duration::from_secs(30));
    let views = cluster.wait_converged(&[group], Duration::from_secs(30));
    assert_eq!(views[0]["sessions"][&id], events);
    assert!(metric(cluster.node(2), "starcite_raft_snapshots_installed_total") >= 1);
    // Only the snapshot's history read touched the damaged record.
    assert!(metric(cluster.node(1), "starcite_log_damage_found_total") >= 1);
    let log = plain(&cluster.node(1).stderr());
    assert!(
        log.contains(&format!("seq={seq}")) && log.contains("damaged event"),
        "{log}"
    );
    for i in cluster.ids() {
        let got = cluster.events(i, &id);
        assert_eq!(got.len() as u64, events, "node {i}");
        for (k, e) in got.iter().enumerate() {
            assert_eq!(e["payload"]["n"], k as u64 + 1, "node {i}");
        }
    }
    wait_metric(
        cluster.node(1),
        "starcite_log_damaged_events",
        Duration::from_secs(20),
        |v| v == 0,
    );
}
