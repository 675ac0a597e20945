//! `GET /v1/sessions/:id/events`: paging, errors, event objects, and reads from the log
//! once events left the in-memory hot window.

mod common;

use common::*;
use serde_json::{json, Value};

const EVENT_KEYS: [&str; 12] = [
    "seq",
    "cursor",
    "type",
    "payload",
    "actor",
    "source",
    "metadata",
    "refs",
    "idempotency_key",
    "producer_id",
    "producer_seq",
    "inserted_at",
];

/// Span of the JSON value starting at `at` (strings and nesting aware).
fn value_end(text: &[u8], at: usize) -> usize {
    let mut i = at;
    let mut depth = 0usize;
    let mut in_string = false;
    while i < text.len() {
        let c = text[i];
        if in_string {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_string = false;
                if depth == 0 {
                    return i + 1;
                }
            }
        } else {
            match c {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    if depth == 0 {
                        return i;
                    }
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                b',' if depth == 0 => return i,
                _ => {}
            }
        }
        i += 1;
    }
    i
}

/// Raw text of the elements of the JSON array `text` (compact input expected).
fn split_array(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    assert_eq!(b[0], b'[', "not an array: {text}");
    let mut out = Vec::new();
    let mut i = 1;
    while i < b.len() && b[i] != b']' {
        let end = value_end(b, i);
        out.push(text[i..end].to_string());
        i = end;
        if i < b.len() && b[i] == b',' {
            i += 1;
        }
    }
    out
}

/// Raw text of top-level member `key` of the JSON object `text` (compact input expected).
fn raw_member(text: &str, key: &str) -> String {
    let b = text.as_bytes();
    let mut i = 1;
    while i < b.len() {
        let key_end = value_end(b, i);
        let name: String = serde_json::from_str(&text[i..key_end]).unwrap();
        let value_start = key_end + 1; // ':'
        let value_stop = value_end(b, value_start);
        if name == key {
            return text[value_start..value_stop].to_string();
        }
        i = value_stop + 1;
    }
    panic!("member {key} not in {text}");
}

/// Raw text of each event on one page.
fn raw_events(server: &Server, id: &str, cursor: u64, limit: u64) -> Vec<String> {
    let resp = server.get(&format!(
        "/v1/sessions/{id}/events?cursor={cursor}&limit={limit}"
    ));
    assert_eq!(resp.status, 200, "{}", resp.text());
    split_array(&raw_member(&resp.text(), "events"))
}

#[test]
fn events_page_with_cursor_limit_next_cursor_and_last_seq() {
    let server = Server::start(Opts::new("events-paging"));
    server.create_session("s");
    for n in 1..=125u64 {
        server.append_ok("s", &json!({"type":"t","payload":{"n":n}}));
    }
    let mut cursor = 0;
    let mut pages = Vec::new();
    loop {
        let page = server
            .get(&format!("/v1/sessions/s/events?cursor={cursor}&limit=40"))
            .json();
        let mut keys: Vec<&str> = page
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, vec!["events", "last_seq", "next_cursor"]);
        assert_eq!(page["last_seq"], 125);
        let got = seqs(page["events"].as_array().unwrap());
        assert_eq!(
            got,
            ((cursor + 1)..=(cursor + 40).min(125)).collect::<Vec<_>>()
        );
        let next = page["next_cursor"].as_u64().unwrap();
        assert_eq!(Some(&next), got.last().or(Some(&cursor)));
        pages.push(got.len());
        if got.is_empty() {
            break;
        }
        cursor = next;
    }
    assert_eq!(pages, vec![40, 40, 40, 5, 0]);
    // default limit 100, default cursor 0
    let page = server.get("/v1/sessions/s/events").json();
    assert_eq!(
        seqs(page["events"].as_array().unwrap()),
        (1..=100).collect::<Vec<_>>()
    );
    assert_eq!(page["next_cursor"], 100);
    let page = server.get("/v1/sessions/s/events?limit=1000").json();
    assert_eq!(page["events"].as_array().unwrap().len(), 125);
    assert_eq!(page["next_cursor"], 125);
    let page = server
        .get("/v1/sessions/s/events?cursor=124&limit=1")
        .json();
    assert_eq!(seqs(page["events"].as_array().unwrap()), vec![125]);
    // an empty session
    server.create_session("empty");
    let page = server.get("/v1/sessions/empty/events").json();
    assert_eq!(page, json!({"events":[],"next_cursor":0,"last_seq":0}));
}

#[test]
fn cursor_past_the_head_is_200_with_no_events() {
    let server = Server::start(Opts::new("events-past-head"));
    server.create_session("s");
    for n in 0..3 {
        server.append_ok("s", &json!({"type":"t","payload":n}));
    }
    for cursor in [3u64, 4, 1000, 9_007_199_254_740_993] {
        let resp = server.get(&format!("/v1/sessions/s/events?cursor={cursor}"));
        assert_eq!(resp.status, 200, "{}", resp.text());
        let page = resp.json();
        assert_eq!(page["events"], json!([]));
        assert_eq!(page["next_cursor"], cursor);
        assert_eq!(page["last_seq"], 3);
    }
}

#[test]
fn bad_cursor_or_limit_is_400_and_unknown_session_404() {
    let server = Server::start(Opts::new("events-errors"));
    server.create_session("s");
    for bad in ["-1", "abc", "1.5", "", "18446744073709551616"] {
        let resp = server.get(&format!("/v1/sessions/s/events?cursor={bad}"));
        assert_error(&resp, 400, "invalid_cursor");
    }
    for bad in ["0", "1001", "-5", "x", ""] {
        let resp = server.get(&format!("/v1/sessions/s/events?limit={bad}"));
        assert_error(&resp, 400, "invalid_limit");
    }
    assert_error(
        &server.get("/v1/sessions/nope/events"),
        404,
        "session_not_found",
    );
    assert_error(
        &server.get("/v1/sessions/a%20b/events"),
        404,
        "session_not_found",
    );
}

#[test]
fn event_objects_have_every_field() {
    let server = Server::start(Opts::new("events-fields"));
    let session = server.create_session("s");
    server.append_ok("s", &json!({"type":"minimal","payload":{}}));
    let full = json!({
        "type":"full","payload":{"text":"hi"},"actor":"agent:drafter","source":"web",
        "metadata":{"m":1},"refs":{"parent":1},"idempotency_key":"k1",
        "producer_id":"prod","producer_seq":3
    });
    server.append_ok("s", &full);
    let events = server.all_events("s");
    assert_eq!(events.len(), 2);
    for e in &events {
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        let mut want = EVENT_KEYS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want, "event members of {e}");
        assert_eq!(e["cursor"], e["seq"]);
        let at = e["inserted_at"].as_str().unwrap();
        assert!(is_rfc3339_micros_utc(at), "inserted_at {at}");
        assert!(at >= session["created_at"].as_str().unwrap());
    }
    let mut minimal = events[0].clone();
    minimal.as_object_mut().unwrap().remove("inserted_at");
    assert_eq!(
        minimal,
        json!({"seq":1,"cursor":1,"type":"minimal","payload":{},"actor":null,"source":null,
               "metadata":{},"refs":{},"idempotency_key":null,"producer_id":null,"producer_seq":null})
    );
    let mut full_event = events[1].clone();
    full_event.as_object_mut().unwrap().remove("inserted_at");
    assert_eq!(
        full_event,
        json!({"seq":2,"cursor":2,"type":"full","payload":{"text":"hi"},"actor":"agent:drafter",
               "source":"web","metadata":{"m":1},"refs":{"parent":1},"idempotency_key":"k1",
               "producer_id":"prod","producer_seq":3})
    );
    assert!(events[1]["inserted_at"].as_str() >= events[0]["inserted_at"].as_str());
}

#[test]
fn inserted_at_never_goes_backwards() {
    let server = Server::start(Opts::new("events-inserted-at"));
    server.create_session("s");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for i in 0..30 {
                    let resp = conn.post_json(
                        "/v1/sessions/s/append",
                        &json!({"type":"t","payload":[t,i]}).to_string(),
                    );
                    assert_eq!(resp.status, 201);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let events = server.all_events("s");
    assert_eq!(seqs(&events), (1..=120).collect::<Vec<_>>());
    let times: Vec<&str> = events
        .iter()
        .map(|e| e["inserted_at"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "inserted_at in seq order: {times:?}"
    );
}

#[test]
fn a_page_stays_within_4_mib() {
    let server = Server::start(Opts::new("events-4mib"));
    server.create_session("big");
    let blob = "y".repeat(900 * 1024);
    for n in 0..6 {
        server.append_ok("big", &json!({"type":"t","payload":{"n":n,"blob":blob}}));
    }
    let mut cursor = 0;
    let mut seen = Vec::new();
    while cursor < 6 {
        let resp = server.get(&format!(
            "/v1/sessions/big/events?cursor={cursor}&limit=100"
        ));
        assert_eq!(resp.status, 200);
        assert!(
            resp.body.len() <= 4 << 20,
            "page of {} bytes",
            resp.body.len()
        );
        let page = resp.json();
        let got = seqs(page["events"].as_array().unwrap());
        assert!(!got.is_empty(), "a page must make progress");
        assert_eq!(page["next_cursor"].as_u64(), got.last().copied());
        assert_eq!(page["last_seq"], 6);
        cursor = *got.last().unwrap();
        seen.extend(got);
    }
    assert_eq!(seen, (1..=6).collect::<Vec<_>>());
}

#[test]
fn reads_after_events_left_the_hot_window_return_the_same_bytes() {
    let server_opts = Opts::new("events-cold").arg("--hot-bytes-per-shard", "4096");
    let mut server = Server::start(server_opts);
    server.create_session("cold");
    server.create_session("other");
    let tricky = r#"{"type":"t","payload":{"z":1.50,"a":[100.0,-0.0,12345678901234567890123],"s":"é \"q\""},"metadata":{"b":1,"a":2},"refs":{},"actor":"user:1","idempotency_key":"first"}"#;
    assert_eq!(server.post("/v1/sessions/cold/append", tricky).status, 201);
    let mut fresh = raw_events(&server, "cold", 0, 1);
    assert!(
        fresh[0].contains(r#""payload":{"z":1.50,"a":[100.0,-0.0,12345678901234567890123],"s":"#),
        "first read: {}",
        fresh[0]
    );
    // every event read right after its append (from the hot window), ~300 bytes each,
    // spread over both sessions so both shards' windows turn over many times
    for n in 2..=150u64 {
        let body =
            json!({"type":"t","payload":{"n":n,"pad":"p".repeat(200),"f":format!("{n}.50")}});
        // keep a number with a trailing zero in every event
        let text = body
            .to_string()
            .replace(&format!("\"{n}.50\""), &format!("{n}.50"));
        assert_eq!(server.post("/v1/sessions/cold/append", &text).status, 201);
        server.append_ok(
            "other",
            &json!({"type":"t","payload":{"pad":"q".repeat(300)}}),
        );
        let got = raw_events(&server, "cold", n - 1, 1);
        assert_eq!(got.len(), 1);
        fresh.push(got[0].clone());
    }
    let check = |server: &Server, when: &str| {
        // page sizes that start and end at different places
        for limit in [1000u64, 7, 64] {
            let mut cursor = 0;
            let mut all = Vec::new();
            while cursor < 150 {
                let page = raw_events(server, "cold", cursor, limit);
                assert!(!page.is_empty());
                cursor += page.len() as u64;
                all.extend(page);
            }
            assert_eq!(all.len(), fresh.len());
            for (i, (a, b)) in fresh.iter().zip(&all).enumerate() {
                assert_eq!(a, b, "{when}: event {} differs (limit {limit})", i + 1);
            }
        }
        // a tail replays the same events from the log
        let mut ws = Ws::connect(server.addr(), "/v1/sessions/cold/tail?cursor=0");
        let tailed = ws.collect_until(150, std::time::Duration::from_secs(20));
        let values: Vec<Value> = fresh
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect();
        assert_eq!(tailed, values, "{when}: tail replay");
        // the idempotency key of the first event still dedupes
        let resp = server.post("/v1/sessions/cold/append", tricky);
        assert_eq!(resp.status, 201);
        assert_eq!(resp.json()["seq"], 1);
        assert_eq!(resp.json()["deduped"], true);
    };
    check(&server, "after eviction");
    server.restart();
    check(&server, "after restart");
    server.kill9();
    server.start_again();
    check(&server, "after kill -9");
}
