//! General HTTP behaviour: malformed input never crashes or stalls the server, keep-alive,
//! pipelining, chunked bodies, `Expect: 100-continue`, CORS, 404/405.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A normal request answers promptly.
#[track_caller]
fn assert_responsive(server: &Server) {
    let started = Instant::now();
    let resp = server.get("/health/live");
    assert_eq!(resp.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "health took {:?}",
        started.elapsed()
    );
}

fn first_response(bytes: &[u8]) -> Resp {
    parse_responses(bytes)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no HTTP response in {:?}", String::from_utf8_lossy(bytes)))
}

#[test]
fn garbage_bytes_get_400_and_the_server_keeps_serving() {
    let server = Server::start(Opts::new("http-garbage"));
    server.create_session("s");
    let inputs: Vec<Vec<u8>> = vec![
        b"\x00\xff\xfe garbage \x01\x02\r\n\r\n".to_vec(),
        b"HELLO\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET /v1/sessions HTTP/1.1\r\nHost x\r\nNoColonHere\r\n\r\n".to_vec(),
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}".to_vec(),
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}".to_vec(),
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}".to_vec(),
    ];
    for input in inputs {
        let reply = raw_exchange_closing(server.addr(), &input, Duration::from_secs(5));
        let text = String::from_utf8_lossy(&reply).into_owned();
        let shown = String::from_utf8_lossy(&input).into_owned();
        let resp = first_response(&reply);
        assert!(
            resp.status == 400 || resp.status == 501 || resp.status == 505,
            "input {shown:?} got {text:?}"
        );
        if resp.status == 400 {
            assert_eq!(
                resp.json()["error"],
                "bad_request",
                "input {shown:?}: {text}"
            );
        }
        assert_eq!(
            parse_responses(&reply).len(),
            1,
            "one answer, then close: {text:?}"
        );
        assert_responsive(&server);
    }
    // random bytes of many sizes
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for size in [1usize, 7, 100, 5000, 20000] {
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let _ = raw_exchange(server.addr(), &bytes, Duration::from_secs(1));
        assert_responsive(&server);
    }
    assert_eq!(
        server.append_ok("s", &json!({"type":"t","payload":1}))["seq"],
        1
    );
}

#[test]
fn content_length_and_chunked_together_is_400_then_close() {
    let server = Server::start(Opts::new("http-cl-te"));
    let req = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n\
                GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n";
    let reply = raw_exchange_closing(server.addr(), req, Duration::from_secs(5));
    let responses = parse_responses(&reply);
    assert_eq!(
        responses.len(),
        1,
        "answer and close: {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert_error(&responses[0], 400, "bad_request");
    let listing = server.get("/v1/sessions?archived=all").json();
    assert_eq!(listing["sessions"], json!([]), "nothing was created");
}

#[test]
fn oversized_headers_are_431_headers_too_large() {
    let server = Server::start(Opts::new("http-431"));
    // ~12 KiB of headers are fine
    let value = "v".repeat(4000);
    let resp = server.request(
        "GET",
        "/health/live",
        &[("X-A", &value), ("X-B", &value), ("X-C", &value)],
        b"",
    );
    assert_eq!(resp.status, 200);
    // one header over 16 KiB
    let big = "v".repeat(17 * 1024);
    let bytes = build_request("GET", "/health/live", &[("X-Big", &big)], b"");
    let reply = raw_exchange_closing(server.addr(), &bytes, Duration::from_secs(5));
    assert_error(&first_response(&reply), 431, "headers_too_large");
    // many small headers over 16 KiB in total
    let mut many = Vec::new();
    for i in 0..400 {
        many.push((format!("X-H{i}"), "y".repeat(50)));
    }
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let bytes = build_request("POST", "/v1/sessions", &refs, b"{}");
    let reply = raw_exchange_closing(server.addr(), &bytes, Duration::from_secs(5));
    assert_error(&first_response(&reply), 431, "headers_too_large");
    // a huge request line / never-ending headers: answered, not buffered forever
    let mut endless = b"GET /health/live HTTP/1.1\r\n".to_vec();
    endless.extend(std::iter::repeat_n(b'h', 1 << 20));
    let reply = raw_exchange_closing(server.addr(), &endless, Duration::from_secs(5));
    let resp = first_response(&reply);
    assert!(
        resp.status == 431 || resp.status == 400,
        "got {}",
        resp.status
    );
    assert_responsive(&server);
}

#[test]
fn bad_json_is_400_invalid_json() {
    let server = Server::start(Opts::new("http-badjson"));
    server.create_session("s");
    let bodies: Vec<&[u8]> = vec![
        b"{",
        b"{\"type\":",
        b"{} x",
        b"{\"a\":1,}",
        b"[1,2",
        b"{'a':1}",
        b"nul",
        b"\xff\xfe{}",
        b"{\"id\":\"\xc3\x28\"}",
        b"{\"a\":\"\\uD800\"}",
    ];
    for body in &bodies {
        for path in ["/v1/sessions", "/v1/sessions/s/append"] {
            let resp = server.request("POST", path, &[("Content-Type", "application/json")], body);
            assert_error(&resp, 400, "invalid_json");
        }
        let resp = server.request(
            "PATCH",
            "/v1/sessions/s",
            &[("Content-Type", "application/json")],
            body,
        );
        assert_error(&resp, 400, "invalid_json");
    }
    assert_eq!(server.session("s")["last_seq"], 0);
}

#[test]
fn wrong_content_type_is_415_before_json_parsing() {
    let server = Server::start(Opts::new("http-415"));
    server.create_session("s");
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
    ] {
        for (method, path) in [
            ("POST", "/v1/sessions"),
            ("POST", "/v1/sessions/s/append"),
            ("PATCH", "/v1/sessions/s"),
        ] {
            let resp = server.request(method, path, &[("Content-Type", ct)], b"not even json");
            assert_error(&resp, 415, "unsupported_media_type");
        }
    }
    let resp = server.request(
        "POST",
        "/v1/sessions",
        &[("Content-Type", "application/json; charset=utf-8")],
        br#"{"id":"ok"}"#,
    );
    assert_eq!(resp.status, 201, "{}", resp.text());
    // an empty body needs no content type
    let resp = server.request("POST", "/v1/sessions/s/archive", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = server.request(
        "POST",
        "/v1/sessions",
        &[("Content-Type", "text/plain")],
        b"",
    );
    assert_eq!(resp.status, 201, "{}", resp.text());
}

#[test]
fn a_stalled_half_request_does_not_stall_other_connections() {
    let server = Server::start(Opts::new("http-stall"));
    server.create_session("s");
    let mut stalled = Vec::new();
    // headers announcing a body that never fully arrives
    for i in 0..10 {
        let mut conn = Conn::open(server.addr());
        let head = "POST /v1/sessions/s/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"type\":";
        conn.write_raw(head.as_bytes()).unwrap();
        stalled.push(conn);
        // half a request line / half the headers
        let mut conn = Conn::open(server.addr());
        let part = if i % 2 == 0 {
            "POST /v1/sess"
        } else {
            "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Partial: ab"
        };
        conn.write_raw(part.as_bytes()).unwrap();
        stalled.push(conn);
    }
    // an idle connection that sent nothing
    stalled.push(Conn::open(server.addr()));
    for n in 1..=5u64 {
        let started = Instant::now();
        let reply = server.append_ok("s", &json!({"type":"t","payload":n}));
        assert_eq!(reply["seq"], n);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "append took {:?}",
            started.elapsed()
        );
        assert_responsive(&server);
    }
    // the client gives up mid-body: the server discards the half request
    for conn in stalled.iter().step_by(2).take(5) {
        conn.shutdown_write();
    }
    drop(stalled);
    std::thread::sleep(Duration::from_millis(200));
    assert_responsive(&server);
    let events = server.all_events("s");
    assert_eq!(
        seqs(&events),
        (1..=5).collect::<Vec<_>>(),
        "no truncated body was appended"
    );
}

#[test]
fn truncated_body_then_close_appends_nothing() {
    let server = Server::start(Opts::new("http-truncated"));
    server.create_session("s");
    let full = br#"{"type":"t","payload":{"text":"complete"}}"#;
    for cut in [0, 1, 10, full.len() - 1] {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        let head = format!(
            "POST /v1/sessions/s/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            full.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&full[..cut]).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let (reply, closed) = read_until_close_flag(&mut stream, Duration::from_secs(5));
        assert!(
            closed,
            "the server keeps a connection whose body was cut short (cut at {cut})"
        );
        if let Some(resp) = parse_responses(&reply).first() {
            assert!(
                resp.status == 400 || resp.status == 408,
                "truncated body got {}",
                resp.status
            );
        }
    }
    assert_eq!(server.session("s")["last_seq"], 0);
    assert_responsive(&server);
}

#[test]
fn hundred_concurrent_connections_appending_all_succeed_with_contiguous_seqs() {
    let server = Server::start(Opts::new("http-100"));
    server.create_session("one");
    server.create_session("two");
    let per_conn = 5;
    let started = Instant::now();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|t| {
            let addr = server.addr();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                barrier.wait();
                let session = if t % 4 == 0 { "two" } else { "one" };
                let mut got = Vec::new();
                for i in 0..per_conn {
                    let body = json!({"type":"t","payload":{"t":t,"i":i},"idempotency_key":format!("{t}-{i}")});
                    let resp = conn.post_json(&format!("/v1/sessions/{session}/append"), &body.to_string());
                    assert_eq!(resp.status, 201, "{}", resp.text());
                    got.push(resp.json()["seq"].as_u64().unwrap());
                }
                assert!(got.windows(2).all(|w| w[0] < w[1]));
                (session, got)
            })
        })
        .collect();
    let mut one = Vec::new();
    let mut two = Vec::new();
    for t in threads {
        let (session, got) = t.join().unwrap();
        if session == "one" {
            one.extend(got)
        } else {
            two.extend(got)
        }
    }
    one.sort_unstable();
    two.sort_unstable();
    assert_eq!(one, (1..=375).collect::<Vec<_>>());
    assert_eq!(two, (1..=125).collect::<Vec<_>>());
    assert_eq!(
        seqs(&server.all_events("one")),
        (1..=375).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&server.all_events("two")),
        (1..=125).collect::<Vec<_>>()
    );
    eprintln!(
        "500 appends over 100 connections took {:?}",
        started.elapsed()
    );
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let server = Server::start(Opts::new("http-keepalive"));
    server.create_session("s");
    let mut conn = Conn::open(server.addr());
    for n in 1..=50u64 {
        let resp = conn.post_json(
            "/v1/sessions/s/append",
            &json!({"type":"t","payload":n}).to_string(),
        );
        assert_eq!(resp.json()["seq"], n);
        let resp = conn.send("GET", "/v1/sessions/s", &[], b"");
        assert_eq!(resp.json()["last_seq"], n);
        // errors keep the connection open too (they are not framing errors)
        let resp = conn.send("GET", "/nope", &[], b"");
        assert_eq!(resp.status, 404);
        let resp = conn.post_json("/v1/sessions/s/append", "{\"type\":1}");
        assert_eq!(resp.status, 400);
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(Opts::new("http-pipeline"));
    server.create_session("s");
    let mut bytes = Vec::new();
    let mut expect = Vec::new();
    for n in 1..=10u64 {
        let body = json!({"type":"t","payload":n}).to_string();
        bytes.extend(build_request(
            "POST",
            "/v1/sessions/s/append",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ));
        expect.push((201, Some(n)));
        bytes.extend(build_request("GET", "/nope", &[], b""));
        expect.push((404, None));
        bytes.extend(build_request("GET", "/v1/sessions/s", &[], b""));
        expect.push((200, None));
        bytes.extend(build_request(
            "POST",
            "/v1/sessions/missing/append",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ));
        expect.push((404, None));
    }
    bytes.extend(build_request(
        "GET",
        "/health/live",
        &[("Connection", "close")],
        b"",
    ));
    expect.push((200, None));
    let mut conn = Conn::open(server.addr());
    conn.write_raw(&bytes).unwrap();
    let mut got = Vec::new();
    for _ in 0..expect.len() {
        got.push(conn.read_final().expect("pipelined reply"));
    }
    for (i, (resp, (status, seq))) in got.iter().zip(&expect).enumerate() {
        assert_eq!(resp.status, *status, "reply {i}: {}", resp.text());
        if let Some(seq) = seq {
            assert_eq!(resp.json()["seq"], *seq, "reply {i}");
        }
        if i % 4 == 1 {
            assert_eq!(resp.json()["error"], "not_found");
        }
        if i % 4 == 2 {
            let last = resp.json()["last_seq"].as_u64().unwrap();
            assert!(
                last > (i as u64 / 4),
                "GET after append {} saw last_seq {last}",
                i / 4 + 1
            );
        }
        if i % 4 == 3 {
            assert_eq!(resp.json()["error"], "session_not_found");
        }
    }
    assert_eq!(
        conn.closed_within(Duration::from_secs(5)),
        Ok(true),
        "Connection: close honoured"
    );
}

#[test]
fn cors_preflight_and_allow_origin_on_every_response() {
    let server = Server::start(Opts::new("http-cors"));
    server.create_session("s");
    let resp = server.request(
        "OPTIONS",
        "/v1/sessions/s/append",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type, x-custom-header",
            ),
        ],
        b"",
    );
    assert_eq!(resp.status, 204, "{}", resp.text());
    assert!(resp.body.is_empty());
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
    let methods = resp
        .header("access-control-allow-methods")
        .expect("Allow-Methods")
        .to_ascii_uppercase();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = resp
        .header("access-control-allow-headers")
        .expect("Allow-Headers")
        .to_ascii_lowercase();
    assert!(
        allowed.contains("content-type") && allowed.contains("x-custom-header"),
        "{allowed}"
    );
    let expose = resp
        .header("access-control-expose-headers")
        .expect("Expose-Headers")
        .to_ascii_lowercase();
    assert!(expose.contains("retry-after"), "{expose}");
    // preflight of other routes
    for path in ["/v1/sessions", "/v1/sessions/s", "/v1/sessions/s/events"] {
        let resp = server.request(
            "OPTIONS",
            path,
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "x-other"),
            ],
            b"",
        );
        assert_eq!(resp.status, 204, "{path}");
        assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
        assert!(resp
            .header("access-control-allow-headers")
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("x-other"));
    }
    // every normal response, errors included
    let responses = vec![
        server.get("/health/live"),
        server.get("/v1/sessions/s"),
        server.post("/v1/sessions", "{}"),
        server.append("s", &json!({"type":"t","payload":1})),
        server.get("/v1/sessions/nope"),
        server.get("/nope"),
        server.request("DELETE", "/v1/sessions/s", &[], b""),
        server.request(
            "POST",
            "/v1/sessions",
            &[("Content-Type", "text/plain")],
            b"x",
        ),
        server.post("/v1/sessions", "{"),
        server.get("/metrics"),
        server.get("/v1/sessions/s/tail"),
    ];
    for resp in responses {
        assert_eq!(
            resp.header("access-control-allow-origin"),
            Some("*"),
            "status {}",
            resp.status
        );
    }
}

#[test]
fn unknown_route_404_not_found_and_wrong_method_405_with_allow() {
    let server = Server::start(Opts::new("http-404-405"));
    server.create_session("s");
    for path in [
        "/",
        "/nope",
        "/v1",
        "/v1/session",
        "/v1/sessions/s/nope",
        "/v1/sessions/s/append/x",
        "/v2/sessions",
    ] {
        assert_error(&server.get(path), 404, "not_found");
        // 404 comes before 405
        assert_error(&server.request("DELETE", path, &[], b""), 404, "not_found");
    }
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("DELETE", "/v1/sessions/s", vec!["GET", "PATCH"]),
        ("POST", "/v1/sessions/s", vec!["GET", "PATCH"]),
        ("PUT", "/v1/sessions", vec!["GET", "POST"]),
        ("DELETE", "/v1/sessions", vec!["GET", "POST"]),
        ("GET", "/v1/sessions/s/append", vec!["POST"]),
        ("GET", "/v1/sessions/s/archive", vec!["POST"]),
        ("PATCH", "/v1/sessions/s/unarchive", vec!["POST"]),
        ("POST", "/v1/sessions/s/events", vec!["GET"]),
        ("POST", "/v1/sessions/s/tail", vec!["GET"]),
        ("POST", "/health/live", vec!["GET"]),
        ("POST", "/metrics", vec!["GET"]),
    ];
    for (method, path, allowed) in cases {
        // 405 comes before body checks (wrong content type here)
        let resp = server.request(method, path, &[("Content-Type", "text/plain")], b"x");
        assert_error(&resp, 405, "method_not_allowed");
        let allow = resp
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header"));
        let allow_list: Vec<String> = allow
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .collect();
        for m in allowed {
            assert!(
                allow_list.iter().any(|a| a == m),
                "{method} {path}: Allow {allow} lacks {m}"
            );
        }
        assert!(
            !allow_list.iter().any(|a| a == method),
            "{method} {path}: Allow {allow} lists {method}"
        );
    }
}

#[test]
fn chunked_request_bodies_work() {
    let server = Server::start(Opts::new("http-chunked"));
    let mut conn = Conn::open(server.addr());
    let create = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                   Transfer-Encoding: chunked\r\n\r\n5\r\n{\"id\"\r\n7;ext=1\r\n:\"chunk\r\n2\r\n\"}\r\n0\r\n\r\n";
    conn.write_raw(create).unwrap();
    let resp = conn.read_final().unwrap();
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert_eq!(resp.json()["id"], "chunk");
    // several appends on the same connection, bodies split at odd places
    for n in 1..=3u64 {
        let body = json!({"type":"t","payload":{"n":n,"text":"chunked body"}}).to_string();
        let mut req = b"POST /v1/sessions/chunk/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for piece in body.as_bytes().chunks(n as usize * 3) {
            req.extend(format!("{:X}\r\n", piece.len()).as_bytes());
            req.extend(piece);
            req.extend(b"\r\n");
        }
        req.extend(b"0\r\n\r\n");
        // send in two writes
        let (a, b) = req.split_at(req.len() / 2);
        conn.write_raw(a).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        conn.write_raw(b).unwrap();
        let resp = conn.read_final().unwrap();
        assert_eq!(resp.status, 201, "{}", resp.text());
        assert_eq!(resp.json()["seq"], n);
    }
    assert_eq!(
        server.all_events("chunk")[2]["payload"]["text"],
        "chunked body"
    );
    // a chunked body over the limit is 413
    let mut req = b"POST /v1/sessions/chunk/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 256 * 1024];
    for _ in 0..5 {
        req.extend(format!("{:X}\r\n", chunk.len()).as_bytes());
        req.extend(&chunk);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    let reply = raw_exchange_closing(server.addr(), &req, Duration::from_secs(10));
    assert_error(&first_response(&reply), 413, "payload_too_large");
    assert_eq!(server.session("chunk")["last_seq"], 3);
}

#[test]
fn expect_100_continue_works() {
    let server = Server::start(Opts::new("http-expect"));
    server.create_session("s");
    let body = br#"{"type":"t","payload":{"x":1}}"#;
    let mut conn = Conn::open(server.addr());
    let head = format!(
        "POST /v1/sessions/s/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_raw(head.as_bytes()).unwrap();
    conn.set_read_timeout(Duration::from_secs(5));
    let interim = conn
        .read_response()
        .expect("100 Continue before the body is sent");
    assert_eq!(interim.status, 100);
    conn.write_raw(body).unwrap();
    let resp = conn.read_final().unwrap();
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert_eq!(resp.json()["seq"], 1);
    // the connection stays usable
    let resp = conn.send("GET", "/v1/sessions/s", &[], b"");
    assert_eq!(resp.json()["last_seq"], 1);

    // a body that is too large is refused without waiting for it
    let mut conn = Conn::open(server.addr());
    let head = "POST /v1/sessions/s/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 2097152\r\n\r\n";
    conn.write_raw(head.as_bytes()).unwrap();
    conn.set_read_timeout(Duration::from_secs(5));
    let resp = conn.read_response().expect("an early final answer");
    assert_error(&resp, 413, "payload_too_large");
    // an unknown route is refused without waiting either
    let mut conn = Conn::open(server.addr());
    let head = "POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
    conn.write_raw(head.as_bytes()).unwrap();
    conn.set_read_timeout(Duration::from_secs(5));
    let resp = conn.read_response().expect("an early final answer");
    assert_error(&resp, 404, "not_found");
    assert_eq!(server.session("s")["last_seq"], 1);
}

#[test]
fn max_body_bytes_flag_is_honoured() {
    let server = Server::start(Opts::new("http-maxbody").arg("--max-body-bytes", "4096"));
    server.create_session("s");
    let fits = json!({"type":"t","payload":"x".repeat(4000)}).to_string();
    assert!(fits.len() <= 4096);
    assert_eq!(server.post("/v1/sessions/s/append", &fits).status, 201);
    let over = json!({"type":"t","payload":"x".repeat(4100)}).to_string();
    assert_error(
        &server.post("/v1/sessions/s/append", &over),
        413,
        "payload_too_large",
    );
    assert_error(
        &server.post(
            "/v1/sessions",
            &json!({"title":"t".repeat(5000)}).to_string(),
        ),
        413,
        "payload_too_large",
    );
}

#[test]
fn health_and_metrics_answer() {
    let server = Server::start(Opts::new("http-health"));
    let resp = server.get("/health/live");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["status"], "ok");
    let resp = server.get("/health/ready");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["status"], "ok");
    server.create_session("m");
    server.append_ok("m", &json!({"type":"t","payload":1}));
    let resp = server.get("/metrics");
    assert_eq!(resp.status, 200);
    let text = resp.text();
    assert!(text.contains("# TYPE"), "Prometheus text: {text}");
}

#[test]
fn slow_headers_are_cut_off_after_about_10_seconds() {
    let server = Server::start(Opts::new("http-slow-headers"));
    let mut conn = Conn::open(server.addr());
    let started = Instant::now();
    conn.write_raw(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // keep trickling bytes without ever finishing the headers
    let mut closed_at = None;
    while started.elapsed() < Duration::from_secs(16) {
        if conn.write_raw(b"X-Slow: 1\r\n").is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        match conn.closed_within(Duration::from_millis(500)) {
            Ok(true) => {
                closed_at = Some(started.elapsed());
                break;
            }
            Ok(false) => {}
            Err(bytes) => {
                // a 408 reply is fine
                let resp = first_response(&bytes);
                assert_eq!(resp.status, 408, "{}", String::from_utf8_lossy(&bytes));
                closed_at = Some(started.elapsed());
                break;
            }
        }
    }
    let closed_at = closed_at.expect("connection still open 16 s after it started sending headers");
    assert!(
        closed_at >= Duration::from_secs(8),
        "closed too early: {closed_at:?}"
    );
    assert_responsive(&server);
}

#[test]
fn a_body_silent_for_30_seconds_gets_408_request_timeout() {
    let server = Server::start(Opts::new("http-408"));
    server.create_session("s");
    let mut conn = Conn::open(server.addr());
    let head = "POST /v1/sessions/s/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"type\":";
    let started = Instant::now();
    conn.write_raw(head.as_bytes()).unwrap();
    conn.set_read_timeout(Duration::from_secs(45));
    let resp = conn.read_final().expect("a 408 reply");
    let waited = started.elapsed();
    assert_error(&resp, 408, "request_timeout");
    assert!(
        waited >= Duration::from_secs(25),
        "408 after only {waited:?}"
    );
    assert!(
        waited <= Duration::from_secs(40),
        "408 only after {waited:?}"
    );
    assert_eq!(
        conn.closed_within(Duration::from_secs(5)),
        Ok(true),
        "closed after 408"
    );
    assert_eq!(server.session("s")["last_seq"], 0);
}
