//! API.md "Hardening rules (v1.1)", HTTP and listing parts, against the real binary:
//! bounded listing pages and unsent answers, a bounded listing scan that appends on the
//! same shard outlive, the whole-body deadline, malformed percent-escapes, duplicate
//! member names, `Content-Encoding`, HEAD and `Allow`, and CORS preflights that allow
//! every method the server answers.
//!
//! Every test talks to its own server over loopback; every loop is bounded in count or
//! time.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PAGE_BYTES_MAX: usize = 4 << 20;
const MIB: u64 = 1 << 20;

/// Creates sessions `{prefix}{n:06}` for n in 0..count over `connections` keep-alive
/// connections; `metadata(n)` is each one's metadata.
fn create_sessions(
    server: &Server,
    prefix: &str,
    count: usize,
    connections: usize,
    metadata: impl Fn(usize) -> Value + Sync,
) {
    let addr = server.addr();
    thread::scope(|scope| {
        for c in 0..connections {
            let metadata = &metadata;
            scope.spawn(move || {
                let mut conn = Conn::open(addr);
                for n in (c..count).step_by(connections) {
                    let body = json!({"id": format!("{prefix}{n:06}"), "metadata": metadata(n)});
                    let resp = conn.post_json("/v1/sessions", &body.to_string());
                    assert_eq!(resp.status, 201, "{}", resp.text());
                }
            });
        }
    });
}

/// Every page of `GET /v1/sessions?{query}` from the start: (ids in order, pages).
fn all_pages(server: &Server, query: &str, pages_max: usize) -> (Vec<String>, Vec<Value>) {
    let mut ids = Vec::new();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..pages_max {
        let path = match &cursor {
            Some(c) => format!("/v1/sessions?{query}&cursor={c}"),
            None => format!("/v1/sessions?{query}"),
        };
        let resp = server.get(&path);
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert!(
            resp.body.len() <= PAGE_BYTES_MAX,
            "{path}: a page of {} bytes",
            resp.body.len()
        );
        let page = resp.json();
        for s in page["sessions"].as_array().unwrap() {
            ids.push(s["id"].as_str().unwrap().to_string());
        }
        cursor = page["next_cursor"].as_str().map(str::to_string);
        pages.push(page);
        if cursor.is_none() {
            return (ids, pages);
        }
    }
    panic!("{query}: more than {pages_max} pages");
}

/// RSS growth of the server over `baseline` while `during` runs, sampled every 100 ms.
fn peak_rss_growth(server: &Server, baseline: u64, during: Duration) -> u64 {
    let mut peak = 0;
    let end = Instant::now() + during;
    while Instant::now() < end {
        peak = peak.max(server.rss_bytes().saturating_sub(baseline));
        thread::sleep(Duration::from_millis(100));
    }
    peak
}

/// A HEAD request on its own connection: (status line and headers, bytes after them).
fn head_request(server: &Server, path: &str) -> (String, String) {
    let request = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let raw = raw_exchange_closing(server.addr(), request.as_bytes(), Duration::from_secs(5));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a complete head");
    (head.to_string(), rest.to_string())
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// Item 6: 60 KB of metadata per session makes `limit=1000` a 24 MB page without the
/// page bound; 16 connections that pipeline such listings and never read held one such
/// answer (twice) each.
#[test]
fn listing_pages_hold_at_most_4_mib_and_unread_pipelined_answers_stay_bounded() {
    const SESSIONS: usize = 400;
    const CONNECTIONS: usize = 16;
    const PIPELINED: usize = 40;
    let server = Server::start(Opts::new("harden-page-bytes"));
    let pad = "m".repeat(60_000);
    create_sessions(&server, "big", SESSIONS, 8, |n| json!({"n": n, "pad": pad}));

    // Pages stop at 4 MiB; following next_cursor still lists every session once.
    let (ids, pages) = all_pages(&server, "limit=1000", 50);
    let expected: Vec<String> = (0..SESSIONS).map(|n| format!("big{n:06}")).collect();
    assert_eq!(ids, expected);
    assert!(pages.len() >= 6, "{} pages for 24 MB", pages.len());
    let first = pages[0]["sessions"].as_array().unwrap().len();
    assert!(
        first >= 60,
        "a 4 MiB page holds about 69 sessions, got {first}"
    );

    // Connections that pipeline listings and never read.
    let baseline = server.rss_bytes();
    let request = b"GET /v1/sessions?limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(PIPELINED);
    let mut hogs = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.write_all(&request).unwrap();
        hogs.push(stream);
    }
    let growth = peak_rss_growth(&server, baseline, Duration::from_secs(4));
    println!(
        "rss baseline {} MiB, peak growth {} MiB with {CONNECTIONS} unread connections",
        baseline / MIB,
        growth / MIB
    );
    // One unsent answer of at most 4 MiB per connection, plus the pages being built
    // (each shard renders up to a page of its own part); without the bound it was one
    // 24 MB answer, held twice, per connection: about 680 MiB.
    assert!(
        growth < 256 * MIB,
        "RSS grew by {} MiB with {CONNECTIONS} connections that never read",
        growth / MIB
    );
    // Other clients are served meanwhile.
    let started = Instant::now();
    assert_eq!(server.get("/health/live").status, 200);
    assert_eq!(server.get("/v1/sessions/big000001").status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(hogs);
}

/// Item 7: a filter that matches nothing examines at most 10,000 sessions per page (the
/// page is empty and names where to go on), and appends on the same shard are answered
/// while 32 clients loop over such listings.
#[test]
fn a_listing_examines_at_most_10000_sessions_and_appends_go_on_meanwhile() {
    const SESSIONS: usize = 15_000;
    const LOOPERS: usize = 32;
    const APPENDS: usize = 40;
    // One shard: the listings and the appends share it.
    let server = Server::start(Opts::new("harden-page-scan").shards(1));
    create_sessions(
        &server,
        "s",
        SESSIONS,
        32,
        |n| json!({"tag": (n % 7).to_string()}),
    );

    // Nothing matches: two pages (10,000 then 5,000 examined), both empty.
    let (ids, pages) = all_pages(&server, "metadata.tag=none&limit=1000", 4);
    assert!(ids.is_empty());
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_eq!(pages[0]["next_cursor"], "s009999", "10,000 examined");

    // A filter that matches one in seven: every match, in order, once.
    let (ids, _) = all_pages(&server, "metadata.tag=3&limit=1000", 10);
    let expected: Vec<String> = (0..SESSIONS)
        .filter(|n| n % 7 == 3)
        .map(|n| format!("s{n:06}"))
        .collect();
    assert_eq!(ids, expected);
    let (ids, _) = all_pages(&server, "limit=1000", 40);
    assert_eq!(ids.len(), SESSIONS);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), SESSIONS);

    // Listing loops, and appends on the same shard meanwhile.
    server.create_session("writer");
    let baseline = server.rss_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let listings = Arc::new(AtomicU64::new(0));
    let addr = server.addr();
    let loopers: Vec<_> = (0..LOOPERS)
        .map(|_| {
            let (stop, listings) = (stop.clone(), listings.clone());
            thread::spawn(move || {
                let mut conn = Conn::open(addr);
                conn.set_read_timeout(Duration::from_secs(30));
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let resp = conn.send("GET", "/v1/sessions?metadata.tag=none", &[], b"");
                    assert_eq!(resp.status, 200, "{}", resp.text());
                    listings.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let mut conn = Conn::open(addr);
    conn.set_read_timeout(Duration::from_secs(30));
    let mut latencies = Vec::new();
    let mut rss_growth = 0;
    for i in 0..APPENDS {
        let started = Instant::now();
        let body = json!({"type": "t", "payload": i}).to_string();
        let resp = conn.post_json("/v1/sessions/writer/append", &body);
        latencies.push(started.elapsed());
        assert_eq!(resp.status, 201, "append {i}: {}", resp.text());
        rss_growth = rss_growth.max(server.rss_bytes().saturating_sub(baseline));
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for looper in loopers {
        looper.join().unwrap();
    }
    latencies.sort();
    println!(
        "appends during {LOOPERS} listing loops ({} listings): p50 {:?}, max {:?}; \
         rss growth {} MiB",
        listings.load(Ordering::Relaxed),
        latencies[APPENDS / 2],
        latencies[APPENDS - 1],
        rss_growth / MIB
    );
    assert!(
        rss_growth < 64 * MIB,
        "RSS grew by {} MiB during the listing loops",
        rss_growth / MIB
    );
    assert_eq!(server.session("writer")["last_seq"], APPENDS as u64);
}

/// Item 8: a body that keeps trickling (a byte every 5 s, never 30 s of silence) is cut
/// off 60 s after the head with 408.
#[test]
fn a_body_still_incomplete_60_seconds_after_the_head_gets_408() {
    let server = Server::start(Opts::new("harden-body-deadline"));
    server.create_session("s");
    let mut conn = Conn::open(server.addr());
    conn.write_raw(
        b"POST /v1/sessions/s/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n",
    )
    .unwrap();
    let started = Instant::now();
    let mut answer = None;
    // 100 bytes at one per 5 s would take 500 s; give up at 80 s.
    while started.elapsed() < Duration::from_secs(80) {
        if conn.write_raw(b" ").is_err() {
            break;
        }
        match conn.closed_within(Duration::from_secs(5)) {
            Ok(false) => {}
            Ok(true) => break,
            Err(bytes) => {
                answer = Some(bytes);
                break;
            }
        }
    }
    let waited = started.elapsed();
    let bytes = answer.unwrap_or_else(|| panic!("no answer after {waited:?}"));
    let resp = parse_responses(&bytes)
        .into_iter()
        .next()
        .expect("an HTTP answer");
    assert_error(&resp, 408, "request_timeout");
    assert!(
        (Duration::from_secs(55)..=Duration::from_secs(70)).contains(&waited),
        "408 after {waited:?}"
    );
    assert_eq!(server.session("s")["last_seq"], 0);
}

/// Item 9: a malformed percent-escape is refused with the parameter's own code, never
/// dropped (which turned a filtered listing into a full one).
#[test]
fn malformed_percent_escapes_get_the_parameters_error_code() {
    let server = Server::start(Opts::new("harden-percent"));
    server.request(
        "POST",
        "/v1/sessions",
        &[("Content-Type", "application/json")],
        br#"{"id":"a","metadata":{"k":"v w"}}"#,
    );
    server.create_session("b");
    for bad in ["%zz", "%", "%4", "%C3%28"] {
        let resp = server.get(&format!("/v1/sessions?metadata.k={bad}"));
        assert_field_error(&resp, "invalid_filter", "metadata.k");
        let resp = server.get(&format!("/v1/sessions?metadata.{bad}=v"));
        assert_eq!(resp.json()["error"], "invalid_filter", "{}", resp.text());
        for (path, param, code) in [
            ("/v1/sessions", "cursor", "invalid_cursor"),
            ("/v1/sessions", "limit", "invalid_limit"),
            ("/v1/sessions", "archived", "invalid_archived"),
            ("/v1/sessions/a/events", "cursor", "invalid_cursor"),
            ("/v1/sessions/a/events", "limit", "invalid_limit"),
            ("/v1/sessions/a/tail", "cursor", "invalid_cursor"),
            ("/v1/sessions/a/tail", "batch_size", "invalid_batch_size"),
        ] {
            let resp = server.get(&format!("{path}?{param}={bad}"));
            assert_field_error(&resp, code, param);
        }
    }
    // Well-formed escapes still decode, `+` is a space.
    let page = server.get("/v1/sessions?metadata.k=v%20w").json();
    assert_eq!(page["sessions"].as_array().unwrap().len(), 1);
    let page = server.get("/v1/sessions?metadata.k=v+w&cursor=%30").json();
    assert_eq!(page["sessions"][0]["id"], "a");
}

/// Item 10: a member named twice in any object of a body is 400 `invalid_json`, so
/// what is stored and what dedupe digests cannot differ.
#[test]
fn duplicate_member_names_in_a_body_are_400_invalid_json() {
    let server = Server::start(Opts::new("harden-duplicates"));
    server.create_session("s");
    for body in [
        r#"{"type":"t","payload":{"k":1,"k":2}}"#,
        r#"{"type":"t","type":"u","payload":1}"#,
        r#"{"type":"t","payload":[{"a":{"b":1,"b":1}}]}"#,
        r#"{"type":"t","payload":1,"metadata":{"x":1,"\u0078":2}}"#,
    ] {
        let resp = server.post("/v1/sessions/s/append", body);
        assert_error(&resp, 400, "invalid_json");
    }
    assert_eq!(server.session("s")["last_seq"], 0);
    let resp = server.post("/v1/sessions", r#"{"id":"d","metadata":{"k":1,"k":2}}"#);
    assert_error(&resp, 400, "invalid_json");
    assert_error(&server.get("/v1/sessions/d"), 404, "session_not_found");
    let resp = server.patch("/v1/sessions/s", r#"{"title":"a","title":"b"}"#);
    assert_error(&resp, 400, "invalid_json");
    assert_eq!(server.session("s")["version"], 1);
    // The same name in different objects is fine.
    let body = json!({"type":"t","payload":{"k":{"k":1},"j":[{"k":1},{"k":2}]}});
    server.append_ok("s", &body);
}

/// Item 11, HTTP part: a content-coded body is 415; HEAD is the GET without its body
/// (the tail: 405); `Allow` lists HEAD and OPTIONS.
#[test]
fn content_encoding_is_415_and_head_answers_like_get() {
    let server = Server::start(Opts::new("harden-encoding-head"));
    server.create_session("s");
    let body = br#"{"type":"t","payload":1}"#;
    for coding in ["gzip", "br", "identity, gzip"] {
        let headers = [
            ("Content-Type", "application/json"),
            ("Content-Encoding", coding),
        ];
        let resp = server.request("POST", "/v1/sessions/s/append", &headers, body);
        assert_error(&resp, 415, "unsupported_media_type");
    }
    assert_eq!(server.session("s")["last_seq"], 0);
    let headers = [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "Identity"),
    ];
    let resp = server.request("POST", "/v1/sessions/s/append", &headers, body);
    assert_eq!(resp.status, 201, "{}", resp.text());

    for path in [
        "/v1/sessions/s",
        "/v1/sessions",
        "/v1/sessions/s/events",
        "/health/live",
        "/metrics",
    ] {
        let get = server.get(path);
        let (head, rest) = head_request(&server, path);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {} ", get.status)),
            "{head}"
        );
        assert_eq!(rest, "", "HEAD {path}: no body");
        let length = header_of(&head, "Content-Length").expect("Content-Length");
        if path != "/metrics" {
            assert_eq!(length, get.body.len().to_string(), "HEAD {path}");
        }
    }
    let (head, rest) = head_request(&server, "/v1/sessions/s/tail");
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
    assert_eq!(rest, "");
    assert_eq!(header_of(&head, "Allow").as_deref(), Some("GET, OPTIONS"));
    for (method, path, expected) in [
        ("DELETE", "/v1/sessions/s", "GET, HEAD, PATCH, OPTIONS"),
        ("PUT", "/v1/sessions", "GET, HEAD, POST, OPTIONS"),
        ("POST", "/v1/sessions/s/events", "GET, HEAD, OPTIONS"),
        ("GET", "/v1/sessions/s/append", "POST, OPTIONS"),
    ] {
        let resp = server.request(method, path, &[], b"");
        assert_error(&resp, 405, "method_not_allowed");
        assert_eq!(resp.header("allow"), Some(expected), "{method} {path}");
    }
}

/// API.md: a preflight answers with `Access-Control-Allow-Methods`, and HEAD is answered
/// (v1.1): a preflight must allow every method some route answers, HEAD included, and a
/// HEAD the preflight allows is then served.
#[test]
fn a_preflight_allows_every_method_the_server_answers_head_included() {
    let server = Server::start(Opts::new("harden-preflight-head"));
    server.create_session("s");
    for (path, requested) in [
        ("/v1/sessions/s", "HEAD"),
        ("/v1/sessions", "HEAD"),
        ("/v1/sessions/s/events", "HEAD"),
        ("/v1/sessions/s/append", "POST"),
        ("/v1/sessions/s", "PATCH"),
    ] {
        let preflight = server.request(
            "OPTIONS",
            path,
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", requested),
            ],
            b"",
        );
        assert_eq!(preflight.status, 204, "{path}");
        let allowed: BTreeSet<String> = preflight
            .header("access-control-allow-methods")
            .expect("Access-Control-Allow-Methods")
            .split(',')
            .map(|m| m.trim().to_string())
            .collect();
        // Every method the path's `Allow` lists (from a 405) is allowed cross-origin.
        let refused = server.request("DELETE", path, &[], b"");
        assert_error(&refused, 405, "method_not_allowed");
        for method in refused.header("allow").expect("Allow").split(',') {
            assert!(
                allowed.contains(method.trim()),
                "{path}: {method} is answered but the preflight allows only {allowed:?}"
            );
        }
        assert!(allowed.contains(requested), "{path}: {allowed:?}");
    }
    let (head, rest) = head_request(&server, "/v1/sessions/s");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(rest, "");
}
