//! What a WebSocket tail costs the server and how it ends when the client misbehaves
//! (issue 11: items 5, 14 and the WebSocket parts): pongs queued for a client that never
//! reads are bounded, protocol violations close with 1008, a wrong
//! `Sec-WebSocket-Version` gets 426, and an idle tailer costs at most 64 KiB.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Conn, Frame, Opts, Server, Ws};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A gauge or counter of `/metrics`, summed over its shards.
fn metric(server: &Server, name: &str) -> u64 {
    let text = server.get("/metrics").text();
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(!values.is_empty(), "{name} not in /metrics");
    values.iter().sum()
}

fn wait_for_metric(server: &Server, name: &str, value: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = metric(server, name);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {now}, not {value}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client frame (clients mask every frame, RFC 6455 §5.3).
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x5a, 0x17, 0xc3, 0x09];
    let mut frame = vec![first_byte, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A WebSocket handshake written by hand over a socket with a small receive buffer;
/// returns the socket right after the 101.
fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    let stream = common::connect_with_rcvbuf(addr, 4096).expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    (&stream).write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    assert!(reader.buffer().is_empty(), "frames before any event");
    stream
}

#[test]
fn a_client_that_pings_and_never_reads_is_dropped_and_its_queue_is_bounded() {
    const PINGS_MAX: usize = 200_000;
    const BURST: usize = 100;
    let server = Server::start(Opts::new("tail-ping-flood").shards(1));
    server.create_session("pf");
    let baseline = server.rss_bytes();
    let mut stream = raw_upgrade(server.addr(), "/v1/sessions/pf/tail");
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let burst: Vec<u8> = (0..BURST)
        .flat_map(|_| masked_frame(0x89, &[b'p'; 125]))
        .collect();
    let mut sent = 0;
    let mut peak = baseline;
    let dropped = loop {
        if sent >= PINGS_MAX {
            break false;
        }
        match stream.write_all(&burst) {
            Ok(()) => sent += BURST,
            // Reset or broken pipe: the server dropped the connection. A write that
            // blocks for 5 s means it stopped reading without closing.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the server neither reads nor closes after {sent} pings")
            }
            Err(_) => break true,
        }
        if sent % 5_000 == 0 {
            peak = peak.max(server.rss_bytes());
        }
    };
    peak = peak.max(server.rss_bytes());
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "ping flood: dropped={dropped} after {sent} pings, server RSS +{} KiB",
        growth / KIB
    );
    assert!(dropped, "{sent} pings never read, connection still open");
    assert!(
        growth <= 16 * MIB,
        "server grew by {growth} bytes for a client that never reads"
    );
    wait_for_metric(
        &server,
        "starcite_tail_subscribers",
        0,
        Duration::from_secs(2),
    );
    assert_eq!(server.get("/health/live").status, 200);
}

/// A tail on `session` whose client then breaks the protocol with `bytes`.
fn close_after(server: &Server, session: &str, bytes: &[u8]) -> Frame {
    let mut ws = Ws::connect(server.addr(), &format!("/v1/sessions/{session}/tail"));
    ws.ws.get_mut().write_all(bytes).unwrap();
    loop {
        match ws.next_frame(Duration::from_secs(5)) {
            Some(Frame::Text(_)) => continue,
            Some(other) => return other,
            None => panic!("no close within 5 s"),
        }
    }
}

#[test]
fn websocket_protocol_violations_close_with_1008() {
    let server = Server::start(Opts::new("tail-violations").shards(1));
    server.create_session("pv");
    // An unmasked client frame (RFC 6455 §5.1).
    let unmasked = [0x81u8, 0x02, b'h', b'i'];
    // A reserved opcode (0x3).
    let reserved = masked_frame(0x83, b"x");
    // A control frame that is fragmented (FIN clear on a ping).
    let fragmented_ping = masked_frame(0x09, b"x");
    // Invalid UTF-8 in a text frame.
    let bad_utf8 = masked_frame(0x81, &[0xff, 0xfe]);
    for (what, bytes) in [
        ("unmasked", unmasked.to_vec()),
        ("reserved opcode", reserved),
        ("fragmented ping", fragmented_ping),
        ("invalid utf-8", bad_utf8),
    ] {
        match close_after(&server, "pv", &bytes) {
            Frame::Close(Some(1008), _) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // A message above the 64 KiB a client may send.
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/pv/tail");
    let big = "x".repeat(70 * 1024);
    ws.ws
        .send(tungstenite::Message::Text(big.into()))
        .expect("send");
    match ws.next_frame(Duration::from_secs(5)) {
        Some(Frame::Close(Some(1008), _)) => {}
        other => panic!("too large: {other:?}"),
    }
    wait_for_metric(
        &server,
        "starcite_tail_subscribers",
        0,
        Duration::from_secs(3),
    );
}

#[test]
fn a_wrong_websocket_version_gets_426_with_the_supported_version() {
    let server = Server::start(Opts::new("tail-version").shards(1));
    server.create_session("wv");
    for version in [Some("8"), Some("14"), None] {
        let mut headers = vec![
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        if let Some(v) = version {
            headers.push(("Sec-WebSocket-Version", v));
        }
        let mut conn = Conn::open(server.addr());
        let resp = conn.send("GET", "/v1/sessions/wv/tail", &headers, b"");
        assert_eq!(resp.status, 426, "version {version:?}: {}", resp.text());
        assert_eq!(resp.header("sec-websocket-version"), Some("13"));
        assert_eq!(resp.json()["error"], "websocket_version_unsupported");
    }
    // Without an upgrade it stays 400 websocket_upgrade_required.
    let resp = server.get("/v1/sessions/wv/tail");
    common::assert_error(&resp, 400, "websocket_upgrade_required");
}

/// A tail client with small buffers of its own (the test process holds them all).
fn idle_tailer(addr: SocketAddr, path: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).expect("connect");
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let url = format!("ws://{addr}{path}");
    match tungstenite::client::client_with_config(url, stream, Some(config)) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("tail {path}: {e}"),
    }
}

#[test]
fn an_idle_tailer_costs_the_server_at_most_64_kib() {
    let tailers: usize = std::env::var("STARCITE_TEST_TAILERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let server = Server::start(Opts::new("tail-idle-memory").shards(2));
    for i in 0..10 {
        server.create_session(&format!("idle{i}"));
    }
    let path = |i: usize| format!("/v1/sessions/idle{}/tail", i % 10);
    // Warm the allocator and the per-shard structures first.
    let warm: Vec<_> = (0..100)
        .map(|i| idle_tailer(server.addr(), &path(i)))
        .collect();
    wait_for_metric(
        &server,
        "starcite_tail_subscribers",
        100,
        Duration::from_secs(10),
    );
    drop(warm);
    wait_for_metric(
        &server,
        "starcite_tail_subscribers",
        0,
        Duration::from_secs(10),
    );
    let before = server.rss_bytes();
    let started = Instant::now();
    let held: Vec<_> = (0..tailers)
        .map(|i| idle_tailer(server.addr(), &path(i)))
        .collect();
    wait_for_metric(
        &server,
        "starcite_tail_subscribers",
        tailers as u64,
        Duration::from_secs(60),
    );
    let after = server.rss_bytes();
    let per_tailer = after.saturating_sub(before) / tailers as u64;
    eprintln!(
        "{tailers} idle tailers: server RSS {} -> {} KiB, {} bytes each (connected in {:?})",
        before / KIB,
        after / KIB,
        per_tailer,
        started.elapsed()
    );
    assert!(
        per_tailer <= 64 * KIB,
        "an idle tailer costs {per_tailer} bytes"
    );
    drop(held);
}
