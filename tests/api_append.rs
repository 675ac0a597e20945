//! Append: field rules, the five rules of API.md in their order, seq contiguity and the
//! exact stored text.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use serde_json::{json, Value};

fn post_raw(server: &Server, id: &str, body: &str) -> Resp {
    server.post(&format!("/v1/sessions/{id}/append"), body)
}

#[track_caller]
fn assert_reply(resp: &Resp, seq: u64, last_seq: u64, deduped: bool) {
    assert_eq!(resp.status, 201, "{}", resp.text());
    let body = resp.json();
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec!["archived_seq", "cursor", "deduped", "last_seq", "seq"],
        "{body}"
    );
    assert_eq!(
        body,
        json!({"seq": seq, "last_seq": last_seq, "deduped": deduped, "cursor": seq, "archived_seq": 0}),
        "append reply"
    );
}

fn last_seq(server: &Server, id: &str) -> u64 {
    server.session(id)["last_seq"].as_u64().unwrap()
}

#[test]
fn append_to_unknown_session_is_404_session_not_found() {
    let server = Server::start(Opts::new("append-404"));
    let resp = server.append("nope", &json!({"type":"t","payload":{}}));
    assert_error(&resp, 404, "session_not_found");
    let resp = server.append(
        "nope",
        &json!({"type":"t","payload":{},"idempotency_key":"k","expected_seq":0}),
    );
    assert_error(&resp, 404, "session_not_found");
    // sessions are created explicitly: still unknown afterwards
    assert_error(&server.get("/v1/sessions/nope"), 404, "session_not_found");
    // an id breaking the id rule is just as unknown
    let resp = post_raw(&server, "a%20b", r#"{"type":"t","payload":{}}"#);
    assert_error(&resp, 404, "session_not_found");
}

#[test]
fn field_rules_come_before_session_existence() {
    let server = Server::start(Opts::new("append-order"));
    // general order: 415 -> invalid_json -> field rules -> 404 session_not_found
    let resp = server.request(
        "POST",
        "/v1/sessions/nope/append",
        &[("Content-Type", "text/plain")],
        br#"{"type":"t","payload":{}}"#,
    );
    assert_error(&resp, 415, "unsupported_media_type");
    assert_error(
        &post_raw(&server, "nope", r#"{"type":"#),
        400,
        "invalid_json",
    );
    assert_field_error(
        &post_raw(&server, "nope", r#"{"payload":{}}"#),
        "invalid_event",
        "type",
    );
    assert_field_error(
        &post_raw(
            &server,
            "nope",
            r#"{"type":"t","payload":{},"idempotencyKey":"k"}"#,
        ),
        "invalid_event",
        "idempotencyKey",
    );
}

#[test]
fn seqs_are_contiguous_from_one_and_reply_has_every_field() {
    let server = Server::start(Opts::new("append-contig"));
    server.create_session("c");
    server.create_session("d");
    for n in 1..=20u64 {
        let resp = server.append("c", &json!({"type":"t","payload":{"n":n}}));
        assert_reply(&resp, n, n, false);
        if n % 5 == 0 {
            // another session has its own sequence
            let resp = server.append("d", &json!({"type":"t","payload":{"n":n}}));
            assert_reply(&resp, n / 5, n / 5, false);
        }
    }
    assert_eq!(seqs(&server.all_events("c")), (1..=20).collect::<Vec<_>>());
    assert_eq!(seqs(&server.all_events("d")), (1..=4).collect::<Vec<_>>());
    assert_eq!(last_seq(&server, "c"), 20);
}

#[test]
fn concurrent_appends_get_distinct_contiguous_seqs() {
    let server = Server::start(Opts::new("append-concurrent"));
    server.create_session("cc");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                let mut got = Vec::new();
                for i in 0..25 {
                    let body = json!({"type":"t","payload":{"t":t,"i":i}}).to_string();
                    let resp = conn.post_json("/v1/sessions/cc/append", &body);
                    assert_eq!(resp.status, 201, "{}", resp.text());
                    got.push(resp.json()["seq"].as_u64().unwrap());
                }
                assert!(
                    got.windows(2).all(|w| w[0] < w[1]),
                    "one client's seqs increase: {got:?}"
                );
                got
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    let events = server.all_events("cc");
    assert_eq!(seqs(&events), (1..=200).collect::<Vec<_>>());
}

#[test]
fn idempotency_same_content_returns_original_seq_and_current_last_seq() {
    let server = Server::start(Opts::new("append-dedupe"));
    server.create_session("s");
    let original =
        r#"{"type":"msg","payload":{"text":"hi","n":1},"actor":"user:1","idempotency_key":"k1"}"#;
    assert_reply(&post_raw(&server, "s", original), 1, 1, false);
    assert_reply(
        &post_raw(&server, "s", r#"{"type":"t","payload":2}"#),
        2,
        2,
        false,
    );
    assert_reply(
        &post_raw(&server, "s", r#"{"type":"t","payload":3}"#),
        3,
        3,
        false,
    );
    // the same content, members reordered and spaced
    let retry = r#" { "idempotency_key" : "k1", "payload" : { "n" : 1 , "text" : "hi" }, "actor":"user:1", "type":"msg" } "#;
    assert_reply(&post_raw(&server, "s", retry), 1, 3, true);
    assert_reply(&post_raw(&server, "s", original), 1, 3, true);
    assert_eq!(
        last_seq(&server, "s"),
        3,
        "nothing appended by a deduped request"
    );
    assert_eq!(server.all_events("s").len(), 3);
    // the key is per session
    server.create_session("s2");
    assert_reply(&post_raw(&server, "s2", original), 1, 1, false);
}

#[test]
fn same_content_ignores_key_order_whitespace_and_number_spelling() {
    let server = Server::start(Opts::new("append-same"));
    server.create_session("s");
    let first = r#"{"type":"t","payload":{"a":1.0,"b":[100,10.50,"é"],"c":{"x":null}},"idempotency_key":"k"}"#;
    assert_reply(&post_raw(&server, "s", first), 1, 1, false);
    let same = [
        r#"{"type":"t","payload":{"c":{"x":null},"b":[1e2,10.5,"\u00e9"],"a":1},"idempotency_key":"k"}"#,
        r#"{"type":"t","payload":{"a":10e-1,"b":[100.000,1.05E1,"é"],"c":{"x":null}},"idempotency_key":"k","metadata":{},"refs":{}}"#,
        // absent strings equal null; expected_seq is not content
        r#"{"type":"t","payload":{"a":1,"b":[100,10.5,"é"],"c":{"x":null}},"idempotency_key":"k","expected_seq":77}"#,
    ];
    for body in same {
        assert_reply(&post_raw(&server, "s", body), 1, 1, true);
    }
    // numbers are compared by exact value: these differ although they are equal as f64
    let exact =
        r#"{"type":"u","payload":{"x":0.1,"big":12345678901234567890123},"idempotency_key":"e"}"#;
    assert_reply(&post_raw(&server, "s", exact), 2, 2, false);
    for differs in [
        r#"{"type":"u","payload":{"x":0.10000000000000001,"big":12345678901234567890123},"idempotency_key":"e"}"#,
        r#"{"type":"u","payload":{"x":0.1,"big":12345678901234567890124},"idempotency_key":"e"}"#,
    ] {
        let body = assert_error(
            &post_raw(&server, "s", differs),
            409,
            "idempotency_conflict",
        );
        assert_eq!(body["seq"], 2);
    }
    assert_reply(
        &post_raw(
            &server,
            "s",
            r#"{"payload":{"big":12345678901234567890123,"x":1e-1},"type":"u","idempotency_key":"e"}"#,
        ),
        2,
        2,
        true,
    );
}

#[test]
fn idempotency_different_content_is_409_idempotency_conflict_with_original_seq() {
    let server = Server::start(Opts::new("append-idem-conflict"));
    server.create_session("s");
    server.append_ok("s", &json!({"type":"t","payload":0}));
    let base = json!({"type":"t","payload":{"n":1},"idempotency_key":"k"});
    assert_reply(&server.append("s", &base), 2, 2, false);
    let variants = [
        json!({"type":"t2","payload":{"n":1},"idempotency_key":"k"}),
        json!({"type":"t","payload":{"n":2},"idempotency_key":"k"}),
        json!({"type":"t","payload":{"n":1},"idempotency_key":"k","actor":"a"}),
        json!({"type":"t","payload":{"n":1},"idempotency_key":"k","source":"s"}),
        json!({"type":"t","payload":{"n":1},"idempotency_key":"k","metadata":{"m":1}}),
        json!({"type":"t","payload":{"n":1},"idempotency_key":"k","refs":{"r":1}}),
        json!({"type":"t","payload":{"n":1},"idempotency_key":"k","producer_id":"p","producer_seq":1}),
        json!({"type":"t","payload":[{"n":1}],"idempotency_key":"k"}),
    ];
    for v in variants {
        let body = assert_error(&server.append("s", &v), 409, "idempotency_conflict");
        assert_eq!(body["seq"], 2, "{v}");
    }
    assert_eq!(last_seq(&server, "s"), 2);
}

#[test]
fn dedupe_comes_before_expected_seq() {
    let server = Server::start(Opts::new("append-dedupe-first"));
    server.create_session("s");
    let req = json!({"type":"t","payload":{"a":1},"idempotency_key":"k","expected_seq":0});
    assert_reply(&server.append("s", &req), 1, 1, false);
    server.append_ok("s", &json!({"type":"t","payload":2}));
    // a retry of the committed request gets its original result, not a conflict
    assert_reply(&server.append("s", &req), 1, 2, true);
    // a key conflict is reported as such even with a stale expected_seq
    let other = json!({"type":"t","payload":{"a":2},"idempotency_key":"k","expected_seq":0});
    assert_eq!(
        assert_error(&server.append("s", &other), 409, "idempotency_conflict")["seq"],
        1
    );
    // a producer retry too
    let p = json!({"type":"t","payload":3,"producer_id":"p","producer_seq":1,"expected_seq":2});
    assert_reply(&server.append("s", &p), 3, 3, false);
    assert_reply(&server.append("s", &p), 3, 3, true);
    // a producer conflict is reported before an expected_seq conflict
    let p_bad = json!({"type":"t","payload":4,"producer_id":"p","producer_seq":5,"expected_seq":0});
    let body = assert_error(&server.append("s", &p_bad), 409, "producer_seq_conflict");
    assert_eq!(body["expected_producer_seq"], 2);
}

#[test]
fn idempotency_key_decides_alone_before_producer_rules() {
    let server = Server::start(Opts::new("append-key-vs-producer"));
    server.create_session("s");
    let a =
        json!({"type":"t","payload":1,"producer_id":"p","producer_seq":1,"idempotency_key":"k"});
    assert_reply(&server.append("s", &a), 1, 1, false);
    let b = json!({"type":"t","payload":2,"producer_id":"p","producer_seq":2});
    assert_reply(&server.append("s", &b), 2, 2, false);
    // same key, same content: deduped although producer_seq 1 is no longer the last
    assert_reply(&server.append("s", &a), 1, 2, true);
    // same key, different content that would be the valid next producer_seq: key conflict
    let c =
        json!({"type":"t","payload":3,"producer_id":"p","producer_seq":3,"idempotency_key":"k"});
    assert_eq!(
        assert_error(&server.append("s", &c), 409, "idempotency_conflict")["seq"],
        1
    );
    assert_eq!(last_seq(&server, "s"), 2);
}

#[test]
fn producer_seq_rules() {
    let server = Server::start(Opts::new("append-producer"));
    server.create_session("s");
    let ev = |pid: &str, pseq: u64, n: u64| json!({"type":"t","payload":{"n":n},"producer_id":pid,"producer_seq":pseq});
    // a new producer may start at any value >= 1
    assert_reply(&server.append("s", &ev("p", 5, 1)), 1, 1, false);
    assert_reply(&server.append("s", &ev("p", 6, 2)), 2, 2, false);
    // last + same content: deduped with the original seq
    assert_reply(&server.append("s", &ev("p", 6, 2)), 2, 2, true);
    // last + different content, a gap, an old value: conflict naming the next expected
    for (pseq, n) in [(6, 99), (8, 3), (5, 1), (1, 1)] {
        let body = assert_error(
            &server.append("s", &ev("p", pseq, n)),
            409,
            "producer_seq_conflict",
        );
        assert_eq!(body["expected_producer_seq"], 7, "producer_seq {pseq}");
    }
    assert_reply(&server.append("s", &ev("p", 7, 3)), 3, 3, false);
    // producers are independent
    assert_reply(&server.append("s", &ev("q", 1, 4)), 4, 4, false);
    assert_reply(&server.append("s", &ev("q", 2, 5)), 5, 5, false);
    let body = assert_error(
        &server.append("s", &ev("q", 4, 6)),
        409,
        "producer_seq_conflict",
    );
    assert_eq!(body["expected_producer_seq"], 3);
    // the producer's last entry dedupes even after others appended
    assert_reply(&server.append("s", &ev("p", 7, 3)), 3, 5, true);
    // the same producer in another session starts fresh
    server.create_session("t");
    assert_reply(&server.append("t", &ev("p", 1, 1)), 1, 1, false);
    let events = server.all_events("s");
    assert_eq!(events[0]["producer_id"], "p");
    assert_eq!(events[0]["producer_seq"], 5);
    assert_eq!(events[3]["producer_id"], "q");
    assert_eq!(last_seq(&server, "s"), 5);
}

#[test]
fn expected_seq_conflict_is_409_with_expected_and_current_seq() {
    let server = Server::start(Opts::new("append-expected"));
    server.create_session("s");
    assert_reply(
        &server.append("s", &json!({"type":"t","payload":1,"expected_seq":0})),
        1,
        1,
        false,
    );
    for stale in [0u64, 5, 2] {
        let body = assert_error(
            &server.append("s", &json!({"type":"t","payload":2,"expected_seq":stale})),
            409,
            "expected_seq_conflict",
        );
        assert_eq!(body["expected_seq"], stale);
        assert_eq!(body["current_seq"], 1);
    }
    assert_reply(
        &server.append("s", &json!({"type":"t","payload":2,"expected_seq":1})),
        2,
        2,
        false,
    );
    assert_eq!(last_seq(&server, "s"), 2);
}

#[test]
fn racing_expected_seq_appends_let_exactly_one_win() {
    let server = Server::start(Opts::new("append-race-expected"));
    server.create_session("s");
    let n = 16;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let addr = server.addr();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                barrier.wait();
                let body = json!({"type":"t","payload":{"i":i},"expected_seq":0}).to_string();
                conn.post_json("/v1/sessions/s/append", &body)
            })
        })
        .collect();
    let replies: Vec<Resp> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<&Resp> = replies.iter().filter(|r| r.status == 201).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one append with expected_seq 0 wins"
    );
    assert_eq!(winners[0].json()["seq"], 1);
    for r in replies.iter().filter(|r| r.status != 201) {
        let body = assert_error(r, 409, "expected_seq_conflict");
        assert_eq!(body["current_seq"], 1);
        assert_eq!(body["expected_seq"], 0);
    }
    assert_eq!(last_seq(&server, "s"), 1);
}

#[test]
fn racing_retries_with_one_idempotency_key_append_once() {
    let server = Server::start(Opts::new("append-race-key"));
    server.create_session("s");
    let n = 16;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let addr = server.addr();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                barrier.wait();
                let body =
                    json!({"type":"t","payload":{"x":1},"idempotency_key":"same"}).to_string();
                conn.post_json("/v1/sessions/s/append", &body)
            })
        })
        .collect();
    let replies: Vec<Value> = threads
        .into_iter()
        .map(|t| {
            let r = t.join().unwrap();
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()
        })
        .collect();
    assert!(replies.iter().all(|r| r["seq"] == 1), "{replies:?}");
    assert_eq!(
        replies.iter().filter(|r| r["deduped"] == false).count(),
        1,
        "{replies:?}"
    );
    assert_eq!(last_seq(&server, "s"), 1);
}

#[test]
fn type_is_required_non_empty_and_at_most_128_utf8_bytes() {
    let server = Server::start(Opts::new("append-type"));
    server.create_session("s");
    let bad = [
        r#"{"payload":{}}"#.to_string(),
        r#"{"type":"","payload":{}}"#.to_string(),
        r#"{"type":null,"payload":{}}"#.to_string(),
        r#"{"type":5,"payload":{}}"#.to_string(),
        r#"{"type":["t"],"payload":{}}"#.to_string(),
        json!({"type": "x".repeat(129), "payload": {}}).to_string(),
        // 43 x 3-byte characters = 129 bytes although only 43 characters
        json!({"type": "€".repeat(43), "payload": {}}).to_string(),
        // escapes count after unescaping: 65 x 2 bytes = 130
        format!(r#"{{"type":"{}","payload":{{}}}}"#, "\\u00e9".repeat(65)),
    ];
    for body in &bad {
        assert_field_error(&post_raw(&server, "s", body), "invalid_event", "type");
    }
    let good = [
        json!({"type": "x".repeat(128), "payload": {}}).to_string(),
        json!({"type": "é".repeat(64), "payload": {}}).to_string(),
        json!({"type": "😀".repeat(32), "payload": {}}).to_string(),
        format!(r#"{{"type":"{}","payload":{{}}}}"#, "\\u00e9".repeat(64)),
    ];
    for body in &good {
        assert_eq!(post_raw(&server, "s", body).status, 201, "{body}");
    }
    let events = server.all_events("s");
    assert_eq!(events.len(), good.len(), "rejected appends left no trace");
    assert_eq!(events[3]["type"], "é".repeat(64));
}

#[test]
fn payload_is_required_and_any_json_but_null() {
    let server = Server::start(Opts::new("append-payload"));
    server.create_session("s");
    for body in [r#"{"type":"t"}"#, r#"{"type":"t","payload":null}"#] {
        assert_field_error(&post_raw(&server, "s", body), "invalid_event", "payload");
    }
    let payloads = [
        json!({}),
        json!({"a":[1,{"b":null}]}),
        json!([]),
        json!(1),
        json!("s"),
        json!(true),
        json!(false),
        json!(0),
    ];
    for p in &payloads {
        assert_eq!(
            server.append("s", &json!({"type":"t","payload":p})).status,
            201,
            "{p}"
        );
    }
    let stored: Vec<Value> = server
        .all_events("s")
        .iter()
        .map(|e| e["payload"].clone())
        .collect();
    assert_eq!(stored, payloads.to_vec());
}

#[test]
fn optional_fields_have_their_types_and_byte_limits() {
    let server = Server::start(Opts::new("append-limits"));
    server.create_session("s");
    let s256 = "x".repeat(256);
    let s257 = "x".repeat(257);
    let e129 = "é".repeat(129); // 258 bytes
    let cases: Vec<(Value, &str)> = vec![
        (json!({"actor": s257}), "actor"),
        (json!({"actor": e129}), "actor"),
        (json!({"actor": 5}), "actor"),
        (json!({"actor": {"a":1}}), "actor"),
        (json!({"source": ""}), "source"),
        (json!({"source": s257}), "source"),
        (json!({"source": 1}), "source"),
        (json!({"metadata": "x"}), "metadata"),
        (json!({"metadata": [1]}), "metadata"),
        (json!({"refs": 5}), "refs"),
        (json!({"refs": ["a"]}), "refs"),
        (json!({"idempotency_key": ""}), "idempotency_key"),
        (json!({"idempotency_key": s257}), "idempotency_key"),
        (json!({"idempotency_key": 12}), "idempotency_key"),
        (json!({"expected_seq": -1}), "expected_seq"),
        (json!({"expected_seq": 1.5}), "expected_seq"),
        (json!({"expected_seq": "0"}), "expected_seq"),
        (
            json!({"producer_id": s257, "producer_seq": 1}),
            "producer_id",
        ),
        (json!({"producer_id": 7, "producer_seq": 1}), "producer_id"),
        (
            json!({"producer_id": "p", "producer_seq": 0}),
            "producer_seq",
        ),
        (
            json!({"producer_id": "p", "producer_seq": -3}),
            "producer_seq",
        ),
        (
            json!({"producer_id": "p", "producer_seq": "1"}),
            "producer_seq",
        ),
        (
            json!({"producer_id": "p", "producer_seq": 1.5}),
            "producer_seq",
        ),
    ];
    for (extra, field) in cases {
        let mut body = json!({"type":"t","payload":{}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        assert_field_error(&server.append("s", &body), "invalid_event", field);
    }
    // both or neither of producer_id / producer_seq
    for extra in [json!({"producer_id":"p"}), json!({"producer_seq":1})] {
        let mut body = json!({"type":"t","payload":{}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = server.append("s", &body);
        let err = assert_error(&resp, 400, "invalid_event");
        assert!(
            err["field"] == "producer_id" || err["field"] == "producer_seq",
            "field names the producer pair: {err}"
        );
    }
    assert_eq!(last_seq(&server, "s"), 0, "nothing invalid was appended");
    // the limits themselves are fine
    let full = json!({
        "type":"t","payload":{},"actor":s256,"source":s256,"metadata":{"m":1},"refs":{"r":"x"},
        "idempotency_key":s256,"expected_seq":0,"producer_id":s256,"producer_seq":1
    });
    assert_reply(&server.append("s", &full), 1, 1, false);
    let e128 = "é".repeat(128); // 256 bytes
    let multi = json!({"type":"t","payload":{},"actor":e128,"source":e128,"idempotency_key":e128,"producer_id":e128,"producer_seq":1});
    assert_reply(&server.append("s", &multi), 2, 2, false);
    // actor may be empty (only source is "non-empty")
    assert_reply(
        &server.append("s", &json!({"type":"t","payload":{},"actor":""})),
        3,
        3,
        false,
    );
}

#[test]
fn unknown_field_is_invalid_event_naming_it() {
    let server = Server::start(Opts::new("append-unknown"));
    server.create_session("s");
    for field in [
        "idempotencyKey",
        "seq",
        "cursor",
        "inserted_at",
        "Type",
        "extra",
    ] {
        let mut body = json!({"type":"t","payload":{},"idempotency_key":"k"});
        body[field] = json!("v");
        assert_field_error(&server.append("s", &body), "invalid_event", field);
    }
    assert_eq!(last_seq(&server, "s"), 0);
    // a body that is not an object is rejected
    for body in ["[]", "5", "\"x\"", "null"] {
        let resp = post_raw(&server, "s", body);
        assert_eq!(resp.status, 400, "{body}: {}", resp.text());
    }
}

#[test]
fn json_nested_deeper_than_64_levels_is_invalid_json() {
    let server = Server::start(Opts::new("append-depth"));
    server.create_session("s");
    // the body object is level 1: payload with 63 nested arrays is exactly 64 levels
    let nested = |levels: usize| {
        format!(
            r#"{{"type":"t","payload":{}{}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    };
    assert_eq!(
        post_raw(&server, "s", &nested(63)).status,
        201,
        "64 levels are allowed"
    );
    assert_error(&post_raw(&server, "s", &nested(64)), 400, "invalid_json");
    assert_error(&post_raw(&server, "s", &nested(1000)), 400, "invalid_json");
    // very deep input must not crash the server (no recursion blow-up)
    assert_error(
        &post_raw(&server, "s", &nested(200_000)),
        400,
        "invalid_json",
    );
    let objects = format!(
        r#"{{"type":"t","payload":{}1{}}}"#,
        r#"{"a":"#.repeat(100),
        "}".repeat(100)
    );
    assert_error(&post_raw(&server, "s", &objects), 400, "invalid_json");
    // also in metadata
    let meta = format!(
        r#"{{"type":"t","payload":1,"metadata":{{"a":{}{}}}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    assert_error(&post_raw(&server, "s", &meta), 400, "invalid_json");
    assert_eq!(last_seq(&server, "s"), 1);
    assert_eq!(server.get("/health/live").status, 200);
}

#[test]
fn body_over_one_mib_is_413_payload_too_large() {
    let server = Server::start(Opts::new("append-413"));
    server.create_session("s");
    let body_of = |total: usize| {
        let frame = r#"{"type":"t","payload":""}"#.len();
        format!(
            r#"{{"type":"t","payload":"{}"}}"#,
            "x".repeat(total - frame)
        )
    };
    let exact = body_of(1 << 20);
    assert_eq!(exact.len(), 1 << 20);
    let resp = post_raw(&server, "s", &exact);
    assert_eq!(
        resp.status,
        201,
        "a body of exactly 1 MiB is allowed: {}",
        resp.text()
    );

    let over = body_of((1 << 20) + 1);
    let mut conn = Conn::open(server.addr());
    let writer = {
        let mut stream = conn.stream().try_clone().unwrap();
        let bytes = build_request(
            "POST",
            "/v1/sessions/s/append",
            &[("Content-Type", "application/json")],
            over.as_bytes(),
        );
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stream.write_all(&bytes);
        })
    };
    let resp = conn.read_final().expect("a reply to an oversized body");
    assert_error(&resp, 413, "payload_too_large");
    assert_eq!(
        conn.closed_within(std::time::Duration::from_secs(5)),
        Ok(true),
        "closed after 413"
    );
    writer.join().unwrap();
    assert_eq!(last_seq(&server, "s"), 1);
    // the event at the limit reads back whole
    let events = server.all_events("s");
    let frame = r#"{"type":"t","payload":""}"#.len();
    assert_eq!(
        events[0]["payload"].as_str().unwrap().len(),
        (1 << 20) - frame
    );
}

#[test]
fn wrong_content_type_is_415_unsupported_media_type() {
    let server = Server::start(Opts::new("append-415"));
    server.create_session("s");
    let body = br#"{"type":"t","payload":{}}"#;
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonx"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| vec![("Content-Type", c)]).unwrap_or_default();
        let resp = server.request("POST", "/v1/sessions/s/append", &headers, body);
        assert_error(&resp, 415, "unsupported_media_type");
    }
    for ct in [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/JSON",
    ] {
        let resp = server.request(
            "POST",
            "/v1/sessions/s/append",
            &[("Content-Type", ct)],
            body,
        );
        assert_eq!(resp.status, 201, "{ct}: {}", resp.text());
    }
    assert_eq!(last_seq(&server, "s"), 3);
}

#[test]
fn event_text_is_stored_exactly_as_received() {
    let server = Server::start(Opts::new("append-text"));
    server.create_session("s");
    let body = "{ \"type\" : \"t\",\n \"payload\" : { \"z\" : 1.50, \"a\" : [ 1e2, -0.0, 1E-7, 100.0, \
                12345678901234567890123, 0.1000 ], \"m\" : { \"y\" : \"plain text\", \"b\" : null, \"t\" : true } },\
                \"metadata\" : { \"k2\" : 1, \"k1\" : 2.0 }, \"refs\" : { \"r\" : [ ] } }";
    assert_eq!(post_raw(&server, "s", body).status, 201);
    let resp = server.get("/v1/sessions/s/events");
    let text = resp.text();
    for expected in [
        r#""payload":{"z":1.50,"a":[1e2,-0.0,1E-7,100.0,12345678901234567890123,0.1000],"m":{"y":"plain text","b":null,"t":true}}"#,
        r#""metadata":{"k2":1,"k1":2.0}"#,
        r#""refs":{"r":[]}"#,
    ] {
        assert!(
            text.contains(expected),
            "stored text lost its spelling: want {expected} in {text}"
        );
    }
    // strings survive escapes as values
    let escaped = r#"{"type":"t","payload":{"s":"\u00e9\n\"q\"\\ \ud83d\ude00 \/"}}"#;
    assert_eq!(post_raw(&server, "s", escaped).status, 201);
    let events = server.all_events("s");
    assert_eq!(events[1]["payload"]["s"], "é\n\"q\"\\ 😀 /");
    // the tail serves the same text
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/s/tail?cursor=0");
    match ws.next_frame(std::time::Duration::from_secs(10)) {
        Some(Frame::Text(frame)) => assert!(
            frame.contains(
                r#""payload":{"z":1.50,"a":[1e2,-0.0,1E-7,100.0,12345678901234567890123,0.1000]"#
            ),
            "tail frame {frame}"
        ),
        other => panic!("expected an event frame, got {other:?}"),
    }
}

#[test]
fn dedupe_memory_keeps_the_last_n_keys_and_producers_across_restarts() {
    let mut server = Server::start(
        Opts::new("append-dedupe-window")
            .arg("--dedupe-keys-max", "5")
            .arg("--producers-max", "2"),
    );
    server.create_session("w");
    let keyed = |k: u32| json!({"type":"t","payload":{"k":k},"idempotency_key":format!("k{k}")});
    for k in 1..=8u32 {
        assert_reply(&server.append("w", &keyed(k)), k as u64, k as u64, false);
    }
    for round in ["live", "after restart"] {
        // k4..k8 are the last five keys: deduped
        for k in 4..=8u32 {
            let resp = server.append("w", &keyed(k));
            assert_eq!(resp.status, 201, "{round}: {}", resp.text());
            assert_eq!(
                resp.json()["deduped"],
                true,
                "{round}: k{k} is inside the window"
            );
            assert_eq!(resp.json()["seq"], k);
        }
        if round == "live" {
            server.restart();
        }
    }
    // k3 left the window: it appends again (and pushes k4 out)
    assert_reply(&server.append("w", &keyed(3)), 9, 9, false);
    assert_reply(&server.append("w", &keyed(4)), 10, 10, false);
    assert_reply(&server.append("w", &keyed(3)), 9, 10, true);

    // producers: the two most recent are remembered
    server.create_session("p");
    let prod = |p: &str, s: u64| json!({"type":"t","payload":{"p":p,"s":s},"producer_id":p,"producer_seq":s});
    server.append_ok("p", &prod("a", 1));
    server.append_ok("p", &prod("b", 1));
    let body = assert_error(
        &server.append("p", &prod("a", 5)),
        409,
        "producer_seq_conflict",
    );
    assert_eq!(body["expected_producer_seq"], 2);
    server.append_ok("p", &prod("c", 1)); // evicts a
    server.restart();
    let resp = server.append("p", &prod("a", 5));
    assert_eq!(
        resp.status,
        201,
        "an evicted producer starts afresh: {}",
        resp.text()
    );
    let body = assert_error(
        &server.append("p", &prod("c", 3)),
        409,
        "producer_seq_conflict",
    );
    assert_eq!(body["expected_producer_seq"], 2);
}
