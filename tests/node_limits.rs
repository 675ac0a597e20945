//! A node's resource limits against the real binary: what a request can make the log
//! store (body limit vs record and segment limits), client connections vs file
//! descriptors, ports held by another process, fail-stop when a shard dies, and disk
//! use across restarts (issue 11: items 1–4, 12, 13).

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Conn, Opts, Server};
use serde_json::json;
use shards::codec;

const MIB: u64 = 1 << 20;

/// Runs `serve` with `args` on a fresh data dir and expects a refusal to start: a
/// non-zero exit within 20 s. Returns stderr.
fn refused(name: &str, args: &[&str]) -> String {
    let data_dir = common::unique_path(name);
    let stderr_path = data_dir.with_extension("stderr.log");
    let mut argv = vec![
        "serve".to_string(),
        "--http-addr".to_string(),
        format!("127.0.0.1:{}", common::free_port()),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let (status, stderr) = common::run_binary(&argv, &[], Duration::from_secs(20), &stderr_path);
    let status = status.unwrap_or_else(|| panic!("{args:?} started (killed after 20 s)"));
    assert!(!status.success(), "{args:?} exited 0: {stderr}");
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_file(&stderr_path);
    stderr
}

/// An append body of exactly `bytes` bytes.
fn body_of(bytes: usize) -> String {
    let empty = json!({"type": "t", "payload": ""}).to_string();
    let pad = bytes.checked_sub(empty.len()).expect("body too small");
    json!({"type": "t", "payload": "x".repeat(pad)}).to_string()
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// `*.seg` files under `dir`.
fn segments(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.metadata().unwrap().is_dir() {
            count += segments(&entry.path());
        } else if entry.path().extension().is_some_and(|e| e == "seg") {
            count += 1;
        }
    }
    count
}

// ---- items 1 and 2: a body the log cannot store is refused at start ----

#[test]
fn a_body_limit_whose_largest_record_outgrows_a_segment_is_refused_at_start() {
    let segment = 2 * MIB;
    let body_max =
        codec::append_body_bytes_max(codec::record_bytes_max_in(segment), codec::BATCH_EVENTS_MAX);
    let (seg_arg, body_arg) = (segment.to_string(), body_max.to_string());
    // One byte more body, or the next smaller segment, refuses to start and names both.
    let more = (body_max + 1).to_string();
    let stderr = refused(
        "limits-body-plus-one",
        &["--segment-bytes", &seg_arg, "--max-body-bytes", &more],
    );
    assert!(
        stderr.contains(&format!("--max-body-bytes {more}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("--segment-bytes {seg_arg}")),
        "{stderr}"
    );
    let smaller = (segment - 4096).to_string();
    let stderr = refused(
        "limits-segment-minus",
        &["--segment-bytes", &smaller, "--max-body-bytes", &body_arg],
    );
    assert!(
        stderr.contains(&format!("--segment-bytes {smaller}")),
        "{stderr}"
    );
    // The default body limit on the smallest segment (the crash of issue 11, item 1).
    let stderr = refused("limits-default-body", &["--segment-bytes", "1048576"]);
    assert!(stderr.contains("--max-body-bytes 1048576"), "{stderr}");

    // The largest accepted configuration takes bodies of the largest size, across
    // segment rolls and a restart.
    let mut opts = Opts::new("limits-largest-body")
        .shards(1)
        .arg("--max-body-bytes", &body_arg);
    opts.segment_bytes = segment;
    let mut server = Server::start(opts);
    server.create_session("big");
    let body = body_of(body_max);
    assert_eq!(body.len(), body_max);
    for seq in 1..=3u64 {
        let resp = server.post("/v1/sessions/big/append", &body);
        assert_eq!(resp.status, 201, "append {seq}: {}", resp.text());
        assert_eq!(resp.json()["seq"], seq);
    }
    let too_big = server.post("/v1/sessions/big/append", &body_of(body_max + 1));
    common::assert_error(&too_big, 413, "payload_too_large");
    server.restart();
    let events = server.events_after("big", 0);
    assert_eq!(common::seqs(&events), vec![1, 2, 3]);
    let payload_len = events[2]["payload"].as_str().unwrap().len();
    let overhead = json!({"type": "t", "payload": ""}).to_string().len();
    assert_eq!(payload_len, body_max - overhead);
    assert!(!server.stderr().contains("panicked"));
}

#[test]
fn a_body_limit_past_the_log_record_limit_is_refused_at_start() {
    let stderr = refused("limits-16mib-body", &["--max-body-bytes", "16777216"]);
    assert!(stderr.contains("--max-body-bytes 16777216"), "{stderr}");
    assert!(stderr.contains("8388608"), "{stderr}");
    let body_max = codec::append_body_bytes_max(codec::RECORD_BYTES_MAX, codec::BATCH_EVENTS_MAX);
    let segment = (16 * MIB).to_string();
    let more = (body_max + 1).to_string();
    let stderr = refused(
        "limits-record-plus-one",
        &["--segment-bytes", &segment, "--max-body-bytes", &more],
    );
    assert!(stderr.contains("8388608"), "{stderr}");
    // The largest accepted body limit stores a body of that size.
    let mut opts = Opts::new("limits-record-max")
        .shards(1)
        .arg("--max-body-bytes", &body_max.to_string());
    opts.segment_bytes = 16 * MIB;
    let server = Server::start(opts);
    server.create_session("huge");
    let resp = server.post("/v1/sessions/huge/append", &body_of(body_max));
    assert_eq!(resp.status, 201, "{}", resp.text());
    let resp = server.post("/v1/sessions/huge/append", &body_of(body_max));
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert!(!server.stderr().contains("panicked"));
}

// ---- item 3: connections past the cap get 503 and the log keeps its descriptors ----

/// Waits (at most `limit`) for the server to refuse idle connections: each refused one
/// gets exactly a 503 `overloaded` with `Retry-After: 1`, then the close. Returns how
/// many were refused; the others are still open and silent.
fn count_refused(idle: &mut [TcpStream], limit: Duration) -> usize {
    let mut answers: Vec<Vec<u8>> = vec![Vec::new(); idle.len()];
    let mut closed = vec![false; idle.len()];
    let deadline = Instant::now() + limit;
    let mut last_change = Instant::now();
    while Instant::now() < deadline && last_change.elapsed() < Duration::from_secs(2) {
        for (i, stream) in idle.iter_mut().enumerate() {
            if closed[i] {
                continue;
            }
            stream.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        closed[i] = true;
                        last_change = Instant::now();
                        break;
                    }
                    Ok(n) => answers[i].extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("connection {i}: {e}"),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut refused = 0;
    for (i, bytes) in answers.iter().enumerate() {
        if !closed[i] {
            assert!(bytes.is_empty(), "an answer without a close");
            continue;
        }
        let resp = common::parse_responses(bytes);
        assert_eq!(resp.len(), 1, "{:?}", String::from_utf8_lossy(bytes));
        common::assert_error(&resp[0], 503, "overloaded");
        assert_eq!(resp[0].header("retry-after"), Some("1"));
        assert_eq!(resp[0].header("connection"), Some("close"));
        refused += 1;
    }
    refused
}

#[test]
fn connections_past_the_cap_get_503_and_segment_rolls_keep_their_descriptors() {
    const IDLE: usize = 400;
    let mut opts = Opts::new("limits-nofile").shards(2);
    opts.segment_bytes = MIB;
    opts.nofile = Some(256);
    let server = Server::start(opts);
    // The connection the appends use comes first; then 400 idle ones.
    let mut conn = Conn::open(server.addr());
    server.create_session("fd");
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(server.addr()).expect("connect"))
        .collect();
    let refused = count_refused(&mut idle, Duration::from_secs(8));
    let kept = IDLE - refused;
    let cap = 256 - starcite::config::FdReserve::default().total(2, 0) as usize;
    assert!(kept < cap, "{kept} idle connections kept, the cap is {cap}");
    assert!(refused >= IDLE - cap, "only {refused} refused");
    // Rolls need descriptors (new segment, index file): 40 appends of 200 KB roll the
    // 1 MiB segments several times while the idle connections are held.
    let pad = "p".repeat(200_000);
    for i in 0..40 {
        let body = json!({"type": "t", "payload": {"i": i, "pad": pad}}).to_string();
        let resp = conn.post_json("/v1/sessions/fd/append", &body);
        assert_eq!(resp.status, 201, "append {i}: {}", resp.text());
    }
    let resp = conn.send("GET", "/v1/sessions/fd/events?cursor=39", &[], b"");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["events"][0]["seq"], 40);
    drop(idle);
    let stderr = server.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Too many open files"), "{stderr}");
    let metrics = server.get("/metrics").text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("starcite_connections_refused_total "))
        .expect("refused counter");
    let counted: usize = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(counted >= refused, "{line}");
}

// ---- item 4: a shard that panics takes the process down ----

#[test]
fn a_shard_that_panics_stops_the_process_and_a_restart_serves_again() {
    let mut server = Server::start(
        Opts::new("limits-fail-stop")
            .shards(2)
            .env("STARCITE_TEST_FAULTS", "1"),
    );
    server.create_session("fs");
    server.append_ok("fs", &json!({"type": "t", "payload": 1}));
    let fault = Instant::now();
    let _ = common::try_request(
        server.addr(),
        "PUT",
        "/debug/faults",
        &[("Content-Type", "application/json")],
        br#"{"panic_shard": true}"#,
    );
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("the process outlived its shard by 5 s");
    let exited_ms = fault.elapsed().as_millis();
    assert_eq!(status.code(), Some(101), "{status}");
    let stderr = server.stderr();
    assert!(stderr.contains("fail-stop"), "{stderr}");
    assert!(stderr.contains("test fault"), "{stderr}");
    // A supervisor restarts it: time from spawn to ready, and nothing acknowledged lost.
    let spawned = Instant::now();
    server.start_again();
    let ready_ms = spawned.elapsed().as_millis();
    eprintln!("fail-stop: exit {exited_ms} ms after the fault, ready {ready_ms} ms after restart");
    assert_eq!(common::seqs(&server.events_after("fs", 0)), vec![1]);
    server.append_ok("fs", &json!({"type": "t", "payload": 2}));
}

// ---- item 12: a port another process holds ----

#[test]
fn an_http_port_held_by_another_node_is_refused() {
    let server = Server::start(Opts::new("limits-port-a").shards(2));
    let data_dir = common::unique_path("limits-port-b");
    let stderr_path = data_dir.with_extension("stderr.log");
    let args: Vec<String> = [
        "serve",
        "--http-addr",
        &format!("127.0.0.1:{}", server.port),
        "--data-dir",
        &data_dir.display().to_string(),
        "--shards",
        "2",
        "--segment-bytes",
        "4194304",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (status, stderr) = common::run_binary(&args, &[], Duration::from_secs(20), &stderr_path);
    let status = status.expect("a second node on the same HTTP port started");
    assert!(!status.success());
    assert!(stderr.contains("HTTP port"), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
    // The first node still serves every connection.
    for _ in 0..20 {
        assert_eq!(server.get("/health/live").status, 200);
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_file(&stderr_path);
}

#[test]
fn a_peer_port_held_by_another_node_is_refused() {
    let peer_base = common::free_port();
    let peers = format!(
        "1=127.0.0.1:{peer_base},2=127.0.0.1:{},3=127.0.0.1:{}",
        common::free_port(),
        common::free_port()
    );
    let serve = |name: &str| -> (Vec<String>, std::path::PathBuf) {
        let data_dir = common::unique_path(name);
        let args = [
            "serve",
            "--http-addr",
            &format!("127.0.0.1:{}", common::free_port()),
            "--data-dir",
            &data_dir.display().to_string(),
            "--shards",
            "1",
            "--segment-bytes",
            "4194304",
            "--node-id",
            "1",
            "--peers",
            &peers,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        (args, data_dir)
    };
    let (args_a, dir_a) = serve("limits-peer-a");
    let log_a = std::fs::File::create(dir_a.with_extension("stderr.log")).unwrap();
    let mut first = common::base_command(&[])
        .args(&args_a)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_a)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", peer_base)).is_err() {
        assert!(Instant::now() < deadline, "the first node never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (args_b, dir_b) = serve("limits-peer-b");
    let stderr_path = dir_b.with_extension("stderr.log");
    let (status, stderr) = common::run_binary(&args_b, &[], Duration::from_secs(20), &stderr_path);
    let _ = first.kill();
    let _ = first.wait();
    let status = status.expect("a second node on the same peer port started");
    assert!(!status.success());
    assert!(stderr.contains("peer port"), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{peer_base}")),
        "{stderr}"
    );
    for dir in [dir_a, dir_b] {
        let _ = std::fs::remove_file(dir.with_extension("stderr.log"));
        let _ = std::fs::remove_dir_all(dir);
    }
}

// ---- item 13: restarts reuse the unused pre-written segment ----

#[test]
fn restarts_without_writes_add_no_disk_use() {
    let mut opts = Opts::new("limits-restarts")
        .shards(1)
        .arg("--max-disk-bytes", &(4 * MIB).to_string());
    opts.segment_bytes = MIB;
    let mut server = Server::start(opts);
    server.create_session("r");
    server.append_ok("r", &json!({"type": "t", "payload": 0}));
    server.restart();
    let (bytes, segs) = (dir_bytes(&server.data_dir), segments(&server.data_dir));
    for round in 1..=5 {
        if round == 3 {
            // A crash keeps the same rule.
            server.kill9();
            server.start_again();
        } else {
            server.restart();
        }
        assert_eq!(segments(&server.data_dir), segs, "restart {round}");
        let now = dir_bytes(&server.data_dir);
        assert!(
            now <= bytes + 64 * 1024,
            "restart {round}: {now} bytes on disk, {bytes} after the first restart"
        );
    }
    // Still writable (before: 507 storage_full from the 4th restart on).
    server.append_ok("r", &json!({"type": "t", "payload": 1}));
    assert_eq!(common::seqs(&server.events_after("r", 0)), vec![1, 2]);
    // Writes that fill the reused segment roll into the kept one, within the budget.
    let pad = "p".repeat(100_000);
    for i in 0..8 {
        let resp = server.append("r", &json!({"type": "t", "payload": {"i": i, "pad": pad}}));
        assert_eq!(resp.status, 201, "append {i}: {}", resp.text());
    }
    server.restart();
    assert_eq!(server.events_after("r", 0).len(), 10);
    assert!(!server.stderr().contains("panicked"));
}
