//! Recovery from what a crash leaves on disk: torn tails are dropped, corruption stops
//! the start with a message naming the segment file and offset, and restarts from a
//! snapshot keep every acknowledged append and its dedupe entry.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{run_binary, Opts, Server};
use serde_json::json;

const BLOCK: u64 = 4096;

fn segments(server: &Server, shard: usize) -> Vec<PathBuf> {
    let dir = server
        .data_dir
        .join(format!("shard-{shard:03}"))
        .join("log");
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Offset of the first all-zero block of a segment (where the next batch would go).
fn first_free_block(path: &PathBuf) -> u64 {
    let bytes = fs::read(path).unwrap();
    let at = bytes
        .chunks(BLOCK as usize)
        .position(|block| block.iter().all(|&b| b == 0))
        .expect("a free block");
    at as u64 * BLOCK
}

fn append_n(server: &Server, id: &str, n: u64) {
    for i in 0..n {
        let body = json!({"type": "t", "payload": {"i": i}, "idempotency_key": format!("k{i}")});
        server.append_ok(id, &body);
    }
}

#[test]
fn a_torn_tail_is_dropped_and_the_server_starts() {
    let mut server = Server::start(Opts::new("rec-torn").shards(1));
    // One shard: every session lives in shard 0's log.
    let id = "torn";
    server.create_session(id);
    append_n(&server, id, 20);
    server.kill9();
    // A half-written batch after the last acknowledged one: garbage in the next block.
    let segment = segments(&server, 0).pop().unwrap();
    let at = first_free_block(&segment);
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0xA5; 3000], at).unwrap();
    file.sync_all().unwrap();
    server.start_again();
    let events = server.all_events(id);
    assert_eq!(common::seqs(&events), (1..=20).collect::<Vec<_>>());
    // New appends go where the torn batch was, and survive another crash.
    assert_eq!(
        server.append_ok(id, &json!({"type": "t", "payload": 21}))["seq"],
        21
    );
    server.kill9();
    server.start_again();
    assert_eq!(server.all_events(id).len(), 21);
}

#[test]
fn corruption_before_valid_batches_refuses_to_start_naming_file_and_offset() {
    let mut server = Server::start(Opts::new("rec-corrupt").shards(1));
    let id = "corrupt";
    server.create_session(id);
    append_n(&server, id, 10);
    server.kill9();
    // Flip a byte of the first record (batch header 32 + record header 8 bytes): the
    // later batches are still valid, so this is corruption, not a torn tail.
    let segment = segments(&server, 0)[0].clone();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 40).unwrap();
    file.write_all_at(&[byte[0] ^ 0xFF], 40).unwrap();
    file.sync_all().unwrap();
    let stderr_path = server.data_dir.with_extension("corrupt.log");
    let (status, stderr) = run_binary(
        &server.serve_args(),
        &[],
        Duration::from_secs(20),
        &stderr_path,
    );
    let _ = fs::remove_file(&stderr_path);
    let status = status.expect("exits by itself");
    assert!(!status.success(), "must refuse to start: {status}");
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(stderr.contains(&name), "names the segment file: {stderr}");
    assert!(stderr.contains("offset 0"), "names the offset: {stderr}");
}

#[test]
fn restart_from_a_snapshot_keeps_appends_and_dedupe() {
    let mut server = Server::start(
        Opts::new("rec-snapshot")
            .shards(1)
            .arg("--snapshot-log-bytes", "262144")
            .arg("--hot-bytes-per-shard", "4096"),
    );
    let id = "snap".to_string();
    server.create_session(&id);
    append_n(&server, &id, 300);
    let snapshot = server.data_dir.join("shard-000").join("snapshot");
    assert!(snapshot.exists(), "a snapshot was written");
    server.kill9();
    server.start_again();
    let events = server.all_events(&id);
    assert_eq!(common::seqs(&events), (1..=300).collect::<Vec<_>>());
    // A retry of a pre-crash append is still deduped with its original seq.
    let retry = json!({"type": "t", "payload": {"i": 7}, "idempotency_key": "k7"});
    let reply = server.append_ok(&id, &retry);
    assert_eq!(reply["seq"], 8);
    assert_eq!(reply["deduped"], true);
    assert_eq!(
        server.append_ok(&id, &json!({"type": "t", "payload": 0}))["seq"],
        301
    );
    server.kill9();
    server.start_again();
    assert_eq!(server.all_events(&id).len(), 301);
}
