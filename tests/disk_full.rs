//! A full disk, seen from outside (issue 9, section 2): a node whose data dir sits on a
//! small loop-mounted ext4 image is filled by appends until the file system has no room
//! for the next log segment. It must then answer client writes with 507 `storage_full`
//! (never a reset or another 5xx), keep serving reads and retries of committed appends,
//! say why in `/metrics` and `/health/ready`, start again on the full disk, and take
//! writes again by itself once space returns. With `--max-disk-bytes` the log's files
//! never pass the budget. In a cluster, a replica on a full disk does not crash and the
//! others keep taking writes.
//!
//! The loop-mount tests need root and `mkfs.ext4` (CI has both: `.ci/run` installs
//! e2fsprogs). Without them they print why and pass, unless `STARCITE_CI_POSTGRES` is set
//! (CI), where they fail instead. Every image is unmounted and removed by a guard, also
//! when a test fails.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::cluster::{groups_of, Cluster, ClusterOpts};
use common::{assert_error, unique_path, Opts, Resp, Server};
use serde_json::{json, Value};

const SEGMENT_BYTES: u64 = 1 << 20;
/// Size of the ext4 image a node's data dir lives on.
const IMAGE_BYTES: u64 = 24 << 20;
/// A file written on the image before the node starts and deleted to give space back.
const FILLER_BYTES: usize = 3 << 20;
/// Bytes of padding in each payload: an append takes about 9 blocks of 4 KiB, so a few
/// hundred appends fill the image.
const PAD: usize = 32 << 10;
/// Appends tried at most before the disk must be full (a 24 MiB image holds ~650).
const APPENDS_MAX: u64 = 5_000;
/// Longest wait for writes to resume after space returned (retries every second).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// Loop-mounted images
// ---------------------------------------------------------------------------------------

/// Whether loop mounts can be used here; prints why not, and fails in CI.
fn loop_mounts_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mkfs = Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && mkfs {
        return true;
    }
    let why = if root {
        "mkfs.ext4 is missing (apt-get install e2fsprogs)"
    } else {
        "loop mounts need root"
    };
    if std::env::var_os("STARCITE_CI_POSTGRES").is_some() {
        panic!("{test}: {why}, and CI must run this test");
    }
    println!("SKIPPED {test}: {why}");
    false
}

/// `mount -o loop` of two tests at once may pick the same free loop device (both then
/// mount one image): mounts and unmounts of this process take turns.
static LOOP_DEVICES: Mutex<()> = Mutex::new(());

fn loop_devices() -> MutexGuard<'static, ()> {
    LOOP_DEVICES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An ext4 image mounted on a directory; unmounted and removed when dropped.
struct LoopDisk {
    image: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl LoopDisk {
    /// Moves the contents of `dir` onto a new ext4 image of `bytes` and mounts the image
    /// on `dir`, with a filler file of `filler` bytes on it.
    fn take_over(dir: &Path, bytes: u64, filler: usize) -> LoopDisk {
        let image = unique_path("disk-full-image").with_extension("img");
        let mut disk = LoopDisk {
            image: image.clone(),
            mount_point: dir.to_path_buf(),
            mounted: false,
        };
        let file = fs::File::create(&image).expect("create image");
        file.set_len(bytes).expect("size image");
        drop(file);
        let image_arg = image.to_str().expect("utf-8 path");
        // -m 0: no blocks reserved for root (the server runs as root in CI).
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", "-b", "4096", image_arg],
        )
        .expect("mkfs.ext4");
        let saved = unique_path("disk-full-saved");
        fs::rename(dir, &saved).expect("move the data dir aside");
        fs::create_dir(dir).expect("recreate the mount point");
        let turn = loop_devices();
        let mounted = run(
            "mount",
            &["-o", "loop", image_arg, dir.to_str().expect("utf-8")],
        );
        drop(turn);
        mounted.expect("mount");
        disk.mounted = true;
        run(
            "cp",
            &[
                "-a",
                &format!("{}/.", saved.display()),
                &dir.display().to_string(),
            ],
        )
        .expect("copy the data dir onto the image");
        fs::remove_dir_all(&saved).expect("remove the old data dir");
        fs::write(disk.filler(), vec![7u8; filler]).expect("write the filler");
        run("sync", &[]).expect("sync");
        disk
    }

    fn filler(&self) -> PathBuf {
        self.mount_point.join("filler")
    }

    /// Deletes the filler: its space goes back to the file system.
    fn free_space(&self) {
        fs::remove_file(self.filler()).expect("remove the filler");
        run("sync", &[]).expect("sync");
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _turn = loop_devices();
            let point = self.mount_point.display().to_string();
            // The server was killed before (it is dropped first); a lazy unmount covers
            // a process that still holds a file for a moment.
            if run("umount", &[&point]).is_err() {
                let _ = run("umount", &["-l", &point]);
            }
        }
        let _ = fs::remove_file(&self.image);
        // The (now empty) mount point; kept if something is still in it.
        let _ = fs::remove_dir(&self.mount_point);
    }
}

// ---------------------------------------------------------------------------------------
// Appends and checks
// ---------------------------------------------------------------------------------------

fn payload(n: u64) -> Value {
    let letter = (b'a' + (n % 26) as u8) as char;
    json!({ "n": n, "pad": std::iter::repeat_n(letter, PAD).collect::<String>() })
}

fn append_body(n: u64) -> Value {
    json!({ "type": "fill", "payload": payload(n), "idempotency_key": format!("k{n}") })
}

/// Appends events 1, 2, … (key `k<n>`) until the first refusal, which must be 507
/// `storage_full`. Returns the acknowledged seqs by n.
fn fill_until_full(server: &Server, id: &str) -> BTreeMap<u64, u64> {
    let mut acked = BTreeMap::new();
    for n in 1..=APPENDS_MAX {
        let resp = server.append(id, &append_body(n));
        if resp.status == 201 {
            let seq = resp.json()["seq"].as_u64().expect("seq");
            assert_eq!(seq, acked.len() as u64 + 1, "seqs are contiguous");
            acked.insert(n, seq);
            continue;
        }
        assert_error(&resp, 507, "storage_full");
        println!("507 storage_full after {} appends", acked.len());
        return acked;
    }
    panic!("{APPENDS_MAX} appends of {PAD} bytes and no 507 on a {IMAGE_BYTES} byte image");
}

/// Every acknowledged append is there exactly once, at its seq, with its payload, and
/// nothing else is.
fn assert_all_present(server: &Server, id: &str, acked: &BTreeMap<u64, u64>) {
    let events = server.all_events(id);
    assert_eq!(
        events.len(),
        acked.len(),
        "events of {id} vs acknowledged appends"
    );
    for (n, &seq) in acked {
        let event = &events[seq as usize - 1];
        assert_eq!(event["seq"], seq);
        assert_eq!(
            event["idempotency_key"],
            format!("k{n}"),
            "event at seq {seq}"
        );
        assert_eq!(event["payload"], payload(*n), "payload at seq {seq}");
    }
}

fn metrics(server: &Server) -> String {
    let resp = server.get("/metrics");
    assert_eq!(resp.status, 200);
    resp.text()
}

fn ready(server: &Server) -> Value {
    let resp = server.get("/health/ready");
    assert_eq!(resp.status, 200, "ready: {}", resp.text());
    resp.json()
}

/// A retry of an acknowledged append (same key, same content) while storage is full.
fn assert_retry_is_deduped(server: &Server, id: &str, n: u64, seq: u64) {
    let resp = server.append(id, &append_body(n));
    assert_eq!(resp.status, 201, "retry of k{n}: {}", resp.text());
    let body = resp.json();
    assert_eq!(
        (body["seq"].as_u64(), body["deduped"].as_bool()),
        (Some(seq), Some(true))
    );
}

fn assert_full(server: &Server, id: &str, reason: &str) {
    let resp = server.append(id, &json!({"type": "fill", "payload": {"more": true}}));
    assert_error(&resp, 507, "storage_full");
    let gauge = format!("starcite_storage_full{{shard=\"0\",reason=\"{reason}\"}} 1");
    assert!(metrics(server).contains(&gauge), "{gauge} missing");
    let detail = ready(server);
    assert_eq!(detail["storage_full"][0]["reason"], reason, "{detail}");
}

/// No temp file stays: a creation that failed removes its temp file at once. (One may
/// exist for a few milliseconds while a retry, once a second, pre-writes a segment.)
fn no_temp_files(log_dir: &Path) {
    let temp_files = || -> Vec<String> {
        fs::read_dir(log_dir)
            .expect("list log dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = temp_files();
        if found.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{found:?} stay in {}",
            log_dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Appends until one is acknowledged (writes resumed), at most `RESUME_TIMEOUT`.
fn wait_writes_resume(server: &Server, id: &str, n: u64, acked: &mut BTreeMap<u64, u64>) {
    let deadline = Instant::now() + RESUME_TIMEOUT;
    loop {
        let resp: Resp = server.append(id, &append_body(n));
        if resp.status == 201 {
            acked.insert(n, resp.json()["seq"].as_u64().expect("seq"));
            return;
        }
        assert_error(&resp, 507, "storage_full");
        assert!(
            Instant::now() < deadline,
            "writes did not resume within {RESUME_TIMEOUT:?} of freeing space:\n{}",
            disk_state(
                &server.data_dir,
                &server.data_dir.join("shard-000").join("log")
            )
        );
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_disk_refuses_writes_keeps_reads_survives_restarts_and_recovers() {
    if !loop_mounts_available(
        "a_full_disk_refuses_writes_keeps_reads_survives_restarts_and_recovers",
    ) {
        return;
    }
    let started = Instant::now();
    // Shard snapshots every segment: they are written (or fail) while the disk fills.
    let mut opts = Opts::new("disk-full")
        .shards(1)
        .arg("--snapshot-log-bytes", &SEGMENT_BYTES.to_string());
    opts.segment_bytes = SEGMENT_BYTES;
    let mut server = Server::start(opts);
    server.terminate();
    let disk = LoopDisk::take_over(&server.data_dir, IMAGE_BYTES, FILLER_BYTES);
    // Dropped before `disk`: the process dies before the image is unmounted.
    let mut server = server;
    server.start_again();
    let id = "full";
    server.create_session(id);
    let log_dir = server.data_dir.join("shard-000").join("log");

    let mut acked = fill_until_full(&server, id);
    assert!(acked.len() > 100, "only {} appends fitted", acked.len());
    assert_full(&server, id, "no_space");
    let (&first_n, &first_seq) = acked.iter().next().expect("acked");
    let (&last_n, &last_seq) = acked.iter().next_back().expect("acked");
    assert_retry_is_deduped(&server, id, first_n, first_seq);
    assert_retry_is_deduped(&server, id, last_n, last_seq);
    assert_error(
        &server.post("/v1/sessions", r#"{"id":"other"}"#),
        507,
        "storage_full",
    );
    assert_all_present(&server, id, &acked);
    no_temp_files(&log_dir);

    // kill -9 and start again on the full disk: it serves reads, writes stay 507.
    server.kill9();
    server.start_again();
    assert_all_present(&server, id, &acked);
    assert_full(&server, id, "no_space");
    assert_retry_is_deduped(&server, id, last_n, last_seq);
    assert!(server.is_running(), "the node died on the full disk");
    no_temp_files(&log_dir);

    // Space returns: writes resume without a restart.
    disk.free_space();
    let freed = Instant::now();
    let mut n = last_n + 1;
    wait_writes_resume(&server, id, n, &mut acked);
    println!(
        "writes resumed {} ms after space returned",
        freed.elapsed().as_millis()
    );
    for _ in 0..20 {
        n += 1;
        let resp = server.append(id, &append_body(n));
        assert_eq!(resp.status, 201, "after space returned: {}", resp.text());
        acked.insert(n, resp.json()["seq"].as_u64().expect("seq"));
    }
    assert!(metrics(&server).contains("starcite_storage_full{shard=\"0\",reason=\"no_space\"} 0"));
    assert_eq!(ready(&server)["storage_full"], json!([]));
    assert_all_present(&server, id, &acked);
    server.kill9();
    server.start_again();
    assert_all_present(&server, id, &acked);
    println!("full disk test: {} ms", started.elapsed().as_millis());
    drop(server);
    drop(disk);
}

/// Bytes of every file in `dir`.
fn files_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Samples the size of `dir`'s files every 2 ms until dropped; keeps the largest.
struct DirWatch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirWatch {
    fn start(dir: PathBuf) -> DirWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(files_bytes(&dir), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        DirWatch {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn the_disk_budget_covers_every_log_file_including_the_next_segment() {
    let budget = 8 * SEGMENT_BYTES;
    let mut opts = Opts::new("disk-budget")
        .shards(1)
        .arg("--max-disk-bytes", &budget.to_string());
    opts.segment_bytes = SEGMENT_BYTES;
    let mut server = Server::start(opts);
    let id = "budget";
    server.create_session(id);
    let log_dir = server.data_dir.join("shard-000").join("log");
    let watch = DirWatch::start(log_dir.clone());

    let acked = fill_until_full(&server, id);
    assert!(acked.len() > 50, "only {} appends fitted", acked.len());
    assert_full(&server, id, "budget");
    let (&last_n, &last_seq) = acked.iter().next_back().expect("acked");
    assert_retry_is_deduped(&server, id, last_n, last_seq);
    server.kill9();
    server.start_again();
    assert_full(&server, id, "budget");
    assert_all_present(&server, id, &acked);
    let largest = watch.max();
    drop(watch);
    println!(
        "budget {budget}: largest sum of log files {largest}, now {}",
        files_bytes(&log_dir)
    );
    assert!(
        largest <= budget,
        "log files reached {largest} bytes, budget {budget}"
    );
    assert!(files_bytes(&log_dir) <= budget);
}

#[test]
fn a_replica_on_a_full_disk_stays_up_and_the_cluster_keeps_writing() {
    if !loop_mounts_available("a_replica_on_a_full_disk_stays_up_and_the_cluster_keeps_writing") {
        return;
    }
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOpts {
        segment_bytes: Some(SEGMENT_BYTES),
        ..ClusterOpts::new("disk-full-cluster")
    });
    cluster.terminate(3);
    // The filler is larger than what node 3 misses while full, so that it can catch up
    // once the filler is gone.
    let disk = LoopDisk::take_over(&cluster.node(3).data_dir, 32 << 20, 8 << 20);
    let mut cluster = cluster;
    cluster.spawn_again(3);
    cluster.wait_ready(3, Duration::from_secs(30));
    // Node 3 leads some groups (it takes over part of node 1's) when its disk fills.
    cluster.kill9(1);
    wait_until(Duration::from_secs(30), "node 3 leads a group", || {
        leading(&cluster, 3).is_some_and(|n| n > 0)
    });
    cluster.spawn_again(1);
    cluster.wait_ready(1, Duration::from_secs(30));
    let sessions: Vec<String> = (0..8).map(|i| format!("full-{i}")).collect();
    for id in &sessions {
        cluster.create_session(1, id);
    }

    // Appends through nodes 1 and 2 until node 3's disk is full, then some more.
    let mut acked: Vec<(String, u64, u64)> = Vec::new();
    let mut n = 0u64;
    let mut after_full = 0;
    while after_full < 50 {
        n += 1;
        assert!(n <= APPENDS_MAX, "node 3 never reported a full disk");
        let id = &sessions[n as usize % sessions.len()];
        let seq = append_retrying(&cluster, 1 + (n as usize % 2), id, n);
        acked.push((id.clone(), n, seq));
        if after_full > 0 {
            after_full += 1;
        } else if node_full(&cluster, 3) {
            println!(
                "node 3 full after {} appends, leading {:?} groups",
                acked.len(),
                leading(&cluster, 3)
            );
            after_full = 1;
        }
    }
    assert!(cluster.is_running(3), "node 3 died on its full disk");
    // It handed away the groups it led.
    wait_until(Duration::from_secs(30), "node 3 leads no group", || {
        leading(&cluster, 3) == Some(0)
    });

    // Space returns: node 3 catches up by itself, nothing acknowledged is lost.
    disk.free_space();
    let log_dir = cluster.node(3).data_dir.join("shard-000").join("log");
    let deadline = Instant::now() + RESUME_TIMEOUT;
    while node_full(&cluster, 3) {
        assert!(
            Instant::now() < deadline,
            "node 3 not writable {RESUME_TIMEOUT:?} after space returned:\n{}\n{}",
            disk_state(&cluster.node(3).data_dir, &log_dir),
            node_metrics(&cluster, 3)
        );
        std::thread::sleep(POLL);
    }
    cluster.wait_converged(&groups_of(&sessions), Duration::from_secs(60));
    let mut by_session: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for (id, n, seq) in &acked {
        by_session.entry(id).or_default().push((*n, *seq));
    }
    for (id, expected) in by_session {
        for node in [1, 3] {
            let events = cluster.events(node, id);
            for &(n, seq) in &expected {
                let event = &events[seq as usize - 1];
                assert_eq!(
                    event["idempotency_key"],
                    format!("k{n}"),
                    "node {node} {id}"
                );
            }
            let keys: std::collections::BTreeSet<_> = events
                .iter()
                .map(|e| e["idempotency_key"].to_string())
                .collect();
            assert_eq!(keys.len(), events.len(), "an append stored twice in {id}");
        }
    }
    assert!(
        cluster.node(3).stderr().contains("handing the leadership"),
        "node 3 did not hand its groups away"
    );
    println!(
        "cluster full disk test: {} ms",
        started.elapsed().as_millis()
    );
    let folder = cluster.dir.clone();
    drop(cluster);
    drop(disk);
    let _ = fs::remove_dir_all(folder);
}

/// Appends `k<n>` through `node`, retrying the same request on 503 and on 507 (a group
/// led by the full node, until it hands the group away), at most 30 s.
fn append_retrying(cluster: &Cluster, node: usize, id: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = cluster.append(node, id, &append_body(n));
        match status {
            201 => return body["seq"].as_u64().expect("seq"),
            503 | 507 => {}
            other => panic!("append k{n} to {id} through node {node}: {other} {body}"),
        }
        assert!(
            Instant::now() < deadline,
            "append k{n} to {id} through node {node} not acknowledged: {status} {body}"
        );
        std::thread::sleep(POLL);
    }
}

fn node_metrics(cluster: &Cluster, node: usize) -> String {
    cluster
        .try_request(node, "GET", "/metrics", b"")
        .map(|r| r.text())
        .unwrap_or_default()
}

fn node_full(cluster: &Cluster, node: usize) -> bool {
    node_metrics(cluster, node)
        .lines()
        .any(|l| l.starts_with("starcite_storage_full{") && l.ends_with(" 1"))
}

fn leading(cluster: &Cluster, node: usize) -> Option<u64> {
    node_metrics(cluster, node)
        .lines()
        .find_map(|l| l.strip_prefix("starcite_raft_groups_leading{shard=\"0\"} "))
        .and_then(|v| v.parse().ok())
}

/// `df` of the file system holding `dir` and the files of `log_dir`, for failure reports.
fn disk_state(dir: &Path, log_dir: &Path) -> String {
    let df = Command::new("df")
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut files: Vec<String> = fs::read_dir(log_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let len = e.metadata().map_or(0, |m| m.len());
                    format!("{} {len}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    format!("{df}{}", files.join("\n"))
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(POLL);
    }
}
