//! WebSocket tail: errors before upgrade, replay then live without gap or duplicate,
//! batches, resume gaps, slow readers, shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const WS_HEADERS: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

fn upgrade_request(server: &Server, path: &str) -> Resp {
    let mut conn = Conn::open(server.addr());
    conn.set_read_timeout(Duration::from_secs(10));
    conn.write_raw(&build_request("GET", path, &WS_HEADERS, b""))
        .unwrap();
    conn.read_final().expect("a reply to the upgrade request")
}

/// Appends `count` events to `id` from `threads` concurrent connections.
fn append_many(server: &Server, id: &str, count: usize, threads: usize, pad: usize) {
    let per = count / threads;
    assert_eq!(per * threads, count);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let addr = server.addr();
            let id = id.to_string();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for i in 0..per {
                    let body = json!({"type":"t","payload":{"t":t,"i":i,"pad":"x".repeat(pad)}});
                    let resp =
                        conn.post_json(&format!("/v1/sessions/{id}/append"), &body.to_string());
                    assert_eq!(resp.status, 201, "{}", resp.text());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn tail_errors_are_answered_before_upgrade() {
    let server = Server::start(Opts::new("tail-errors"));
    server.create_session("s");
    for bad in ["-1", "abc", "1.5", "", "18446744073709551616"] {
        let resp = upgrade_request(&server, &format!("/v1/sessions/s/tail?cursor={bad}"));
        assert_error(&resp, 400, "invalid_cursor");
    }
    for bad in ["0", "1001", "x", "-1", ""] {
        let resp = upgrade_request(&server, &format!("/v1/sessions/s/tail?batch_size={bad}"));
        assert_error(&resp, 400, "invalid_batch_size");
    }
    assert_error(
        &upgrade_request(&server, "/v1/sessions/nope/tail"),
        404,
        "session_not_found",
    );
    assert_error(
        &upgrade_request(&server, "/v1/sessions/nope/tail?cursor=3&batch_size=10"),
        404,
        "session_not_found",
    );
    // field rules come before the unknown session
    assert_error(
        &upgrade_request(&server, "/v1/sessions/nope/tail?cursor=x"),
        400,
        "invalid_cursor",
    );
    assert_error(
        &upgrade_request(&server, "/v1/sessions/nope/tail?batch_size=0"),
        400,
        "invalid_batch_size",
    );
    // a plain GET
    assert_error(
        &server.get("/v1/sessions/s/tail"),
        400,
        "websocket_upgrade_required",
    );
    assert_error(
        &server.get("/v1/sessions/s/tail?cursor=0&batch_size=5"),
        400,
        "websocket_upgrade_required",
    );
    // ...after the field rules, before the session lookup
    assert_error(
        &server.get("/v1/sessions/s/tail?cursor=x"),
        400,
        "invalid_cursor",
    );
    assert_error(
        &server.get("/v1/sessions/nope/tail"),
        400,
        "websocket_upgrade_required",
    );
    // tungstenite sees the refusal as an HTTP error
    match Ws::try_connect(server.addr(), "/v1/sessions/nope/tail") {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade of an unknown session succeeded"),
    }
    // the limits themselves are fine
    let ok = Ws::try_connect(
        server.addr(),
        "/v1/sessions/s/tail?cursor=0&batch_size=1000",
    );
    assert!(ok.is_ok(), "batch_size 1000 refused");
    let ok = Ws::try_connect(server.addr(), "/v1/sessions/s/tail?batch_size=1");
    assert!(ok.is_ok(), "batch_size 1 refused");
}

#[test]
fn replay_then_live_has_no_gap_and_no_duplicate_at_the_seam() {
    let server = Server::start(Opts::new("tail-seam"));
    server.create_session("s");
    append_many(&server, "s", 200, 4, 20);
    let total = 500u64;
    let appender = {
        let addr = server.addr();
        std::thread::spawn(move || {
            let handles: Vec<_> = (0..3)
                .map(|t| {
                    std::thread::spawn(move || {
                        let mut conn = Conn::open(addr);
                        for i in 0..100 {
                            let body = json!({"type":"live","payload":{"t":t,"i":i}});
                            let resp = conn.post_json("/v1/sessions/s/append", &body.to_string());
                            assert_eq!(resp.status, 201, "{}", resp.text());
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        })
    };
    // tails connect at different moments while the appends run
    let tails: Vec<_> = [
        (0u64, 1u64),
        (50, 1),
        (150, 1),
        (199, 7),
        (10, 1000),
        (230, 1),
        (260, 3),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (cursor, batch))| {
        let addr = server.addr();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(15 * i as u64));
            let mut ws = Ws::connect(
                addr,
                &format!("/v1/sessions/s/tail?cursor={cursor}&batch_size={batch}"),
            );
            let events = ws.collect_until(total, Duration::from_secs(60));
            (cursor, events)
        })
    })
    .collect();
    appender.join().unwrap();
    let stored = server.all_events("s");
    assert_eq!(seqs(&stored), (1..=total).collect::<Vec<_>>());
    for t in tails {
        let (cursor, events) = t.join().unwrap();
        assert_eq!(
            seqs(&events),
            ((cursor + 1)..=total).collect::<Vec<_>>(),
            "tail from cursor {cursor}"
        );
        assert_eq!(
            events[..],
            stored[cursor as usize..],
            "tail from {cursor} equals /events"
        );
    }
}

#[test]
fn batch_size_above_one_sends_arrays_in_replay_and_live() {
    let server = Server::start(Opts::new("tail-batch"));
    server.create_session("b");
    append_many(&server, "b", 35, 1, 10);
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/b/tail?cursor=0&batch_size=10");
    let mut got = Vec::new();
    while got.len() < 35 {
        let frame = ws.next_json(Duration::from_secs(10));
        let items = frame
            .as_array()
            .unwrap_or_else(|| panic!("batch frame is not an array: {frame}"));
        assert!(
            !items.is_empty() && items.len() <= 10,
            "batch of {}",
            items.len()
        );
        got.extend(items.iter().cloned());
    }
    assert_eq!(seqs(&got), (1..=35).collect::<Vec<_>>());
    // live events come as arrays too, without waiting to fill a batch
    server.append_ok("b", &json!({"type":"t","payload":"live"}));
    let started = Instant::now();
    let frame = ws.next_json(Duration::from_secs(5));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "live batch waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        seqs(frame.as_array().expect("live frame is an array")),
        vec![36]
    );

    // batch_size 1 (explicit or default): single objects
    for path in [
        "/v1/sessions/b/tail?cursor=33",
        "/v1/sessions/b/tail?cursor=33&batch_size=1",
    ] {
        let mut ws = Ws::connect(server.addr(), path);
        for seq in 34..=36u64 {
            let frame = ws.next_json(Duration::from_secs(10));
            assert!(frame.is_object(), "frame {frame}");
            assert_eq!(frame["seq"], seq);
            assert_eq!(frame["cursor"], seq);
        }
    }
}

#[test]
fn batched_frames_stay_within_one_mib() {
    let server = Server::start(Opts::new("tail-batch-mib"));
    server.create_session("m");
    append_many(&server, "m", 240, 4, 10 * 1024);
    let mut ws = Ws::connect(
        server.addr(),
        "/v1/sessions/m/tail?cursor=0&batch_size=1000",
    );
    let mut got = Vec::new();
    while got.len() < 240 {
        let text = match ws.next_frame(Duration::from_secs(20)) {
            Some(Frame::Text(t)) => t,
            other => panic!("expected a frame, got {other:?}"),
        };
        assert!(text.len() <= 1 << 20, "frame of {} bytes", text.len());
        let frame: Value = serde_json::from_str(&text).unwrap();
        got.extend(frame.as_array().expect("array").iter().cloned());
    }
    assert_eq!(seqs(&got), (1..=240).collect::<Vec<_>>());
}

#[test]
fn cursor_beyond_head_gets_a_resume_invalidated_gap_then_continues() {
    let server = Server::start(Opts::new("tail-gap"));
    server.create_session("g");
    for n in 0..5 {
        server.append_ok("g", &json!({"type":"t","payload":n}));
    }
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/g/tail?cursor=10");
    let gap = ws.next_json(Duration::from_secs(10));
    assert_eq!(
        gap,
        json!({"type":"gap","reason":"resume_invalidated","from_cursor":10,"next_cursor":5})
    );
    let mut batched = Ws::connect(server.addr(), "/v1/sessions/g/tail?cursor=8&batch_size=50");
    let gap = batched.next_json(Duration::from_secs(10));
    assert_eq!(
        gap,
        json!({"type":"gap","reason":"resume_invalidated","from_cursor":8,"next_cursor":5}),
        "a control frame is a single object even with batch_size > 1"
    );
    // the stream continues with 6
    server.append_ok("g", &json!({"type":"t","payload":5}));
    server.append_ok("g", &json!({"type":"t","payload":6}));
    assert_eq!(
        seqs(&ws.collect_until(7, Duration::from_secs(10))),
        vec![6, 7]
    );
    assert_eq!(
        seqs(&batched.collect_until(7, Duration::from_secs(10))),
        vec![6, 7]
    );
    // an empty session
    server.create_session("e");
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/e/tail?cursor=3");
    assert_eq!(
        ws.next_json(Duration::from_secs(10)),
        json!({"type":"gap","reason":"resume_invalidated","from_cursor":3,"next_cursor":0})
    );
    server.append_ok("e", &json!({"type":"t","payload":1}));
    assert_eq!(seqs(&ws.collect_until(1, Duration::from_secs(10))), vec![1]);
    // cursor == last_seq is no gap: just live
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/g/tail?cursor=7");
    assert!(
        ws.next_frame(Duration::from_millis(300)).is_none(),
        "nothing to send at the head"
    );
    server.append_ok("g", &json!({"type":"t","payload":7}));
    assert_eq!(seqs(&ws.collect_until(8, Duration::from_secs(10))), vec![8]);
}

#[test]
fn live_events_arrive_promptly() {
    let server = Server::start(Opts::new("tail-live"));
    server.create_session("l");
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/l/tail");
    for n in 1..=20u64 {
        server.append_ok("l", &json!({"type":"t","payload":n}));
        let started = Instant::now();
        let frame = ws.next_json(Duration::from_secs(5));
        assert_eq!(frame["seq"], n);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "event {n} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_slow_reader_receives_every_event_in_order() {
    let server = Server::start(Opts::new("tail-slow"));
    server.create_session("slow");
    // a small receive buffer (negotiated at connect) so the server really sees the
    // reader fall behind instead of the kernel absorbing everything
    let mut slow =
        Ws::connect_small_rcvbuf(server.addr(), "/v1/sessions/slow/tail?cursor=0", 16 * 1024);
    let mut fast = Ws::connect(
        server.addr(),
        "/v1/sessions/slow/tail?cursor=0&batch_size=100",
    );
    // ~8 MiB: well over the 1 MiB per-subscriber budget plus the kernel's socket buffers
    let total = 4000u64;
    let fast_reader = std::thread::spawn(move || {
        let started = Instant::now();
        let got = fast.collect_until(total, Duration::from_secs(60));
        eprintln!("the fast reader got everything in {:?}", started.elapsed());
        got
    });
    let started = Instant::now();
    append_many(&server, "slow", total as usize, 8, 2000);
    eprintln!("{total} appends of ~2 KB took {:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    let reading = Instant::now();
    let got = slow.collect_until(total, Duration::from_secs(30));
    eprintln!("the slow reader caught up in {:?}", reading.elapsed());
    assert_eq!(
        seqs(&got),
        (1..=total).collect::<Vec<_>>(),
        "slow reader lost or reordered events"
    );
    let fast_got = fast_reader.join().unwrap();
    assert_eq!(seqs(&fast_got), (1..=total).collect::<Vec<_>>());
    // and it rejoins live
    for n in 1..=5 {
        server.append_ok("slow", &json!({"type":"t","payload":"after"}));
        assert_eq!(
            seqs(&slow.collect_until(total + n, Duration::from_secs(10))),
            vec![total + n]
        );
    }
    assert_eq!(server.get("/health/live").status, 200);
}

#[test]
fn sigterm_closes_tails_with_1001_and_exits_0() {
    let mut server = Server::start(Opts::new("tail-sigterm"));
    server.create_session("t");
    server.append_ok("t", &json!({"type":"t","payload":1}));
    let mut tails: Vec<Ws> = [
        "/v1/sessions/t/tail?cursor=0",
        "/v1/sessions/t/tail?cursor=1&batch_size=10",
        "/v1/sessions/t/tail?cursor=5",
    ]
    .iter()
    .map(|p| Ws::connect(server.addr(), p))
    .collect();
    assert_eq!(tails[0].next_json(Duration::from_secs(10))["seq"], 1);
    assert_eq!(tails[2].next_json(Duration::from_secs(10))["type"], "gap");
    server.send_sigterm();
    for (i, ws) in tails.iter_mut().enumerate() {
        match ws.next_frame(Duration::from_secs(15)) {
            Some(Frame::Close(code, _)) => assert_eq!(code, Some(1001), "tail {i} close code"),
            Some(Frame::Text(t)) => panic!("tail {i}: unexpected frame {t} at shutdown"),
            other => panic!("tail {i}: expected a close frame 1001, got {other:?}"),
        }
    }
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}
