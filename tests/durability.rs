//! Durability: kill -9 mid-stream, fsync before acknowledgement, data dir lock and
//! identity, graceful restart, segment rolls.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// `serve_args` of `server` with `--shards` replaced.
fn args_with_shards(server: &Server, shards: usize) -> Vec<String> {
    let mut args = server.serve_args();
    let at = args.iter().position(|a| a == "--shards").unwrap();
    args[at + 1] = shards.to_string();
    args
}

/// Every session (archived or not), in order.
fn all_sessions(server: &Server) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/sessions?archived=all&limit=1000".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", pct(c)));
        }
        let page = server.get(&path).json();
        out.extend(page["sessions"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return out,
        }
    }
}

/// Raw bodies of every `/events` page of a session (limit 1000), for byte comparison.
fn raw_event_pages(server: &Server, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let resp = server.get(&format!(
            "/v1/sessions/{id}/events?cursor={cursor}&limit=1000"
        ));
        assert_eq!(resp.status, 200);
        let page = resp.json();
        let next = page["next_cursor"].as_u64().unwrap();
        let done = page["events"].as_array().unwrap().is_empty()
            || next >= page["last_seq"].as_u64().unwrap();
        out.push(resp.text());
        if done {
            return out;
        }
        cursor = next;
    }
}

struct Acked {
    session: String,
    body: Value,
    seq: u64,
}

#[test]
fn every_acknowledged_append_survives_kill9() {
    let mut server = Server::start(Opts::new("dur-kill9"));
    let sessions = ["k-a", "k-b", "k-c", "k-d"];
    for s in sessions {
        server.create_session(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let in_doubt: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let mut workers = Vec::new();
    for t in 0..6 {
        let addr = server.addr();
        let (stop, acked, in_doubt) = (stop.clone(), acked.clone(), in_doubt.clone());
        workers.push(std::thread::spawn(move || {
            let mut conn = match Conn::try_open(addr) {
                Ok(c) => c,
                Err(_) => return,
            };
            let session = sessions[t % sessions.len()].to_string();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({
                    "type":"t","payload":{"t":t,"i":i,"pad":"z".repeat(300 + (i as usize % 700))},
                    "idempotency_key":format!("w{t}-{i}"),"actor":format!("worker:{t}")
                });
                match conn.try_send(
                    "POST",
                    &format!("/v1/sessions/{session}/append"),
                    &[("Content-Type", "application/json")],
                    body.to_string().as_bytes(),
                ) {
                    Ok(resp) if resp.status == 201 => {
                        let seq = resp.json()["seq"].as_u64().unwrap();
                        acked.lock().unwrap().push(Acked {
                            session: session.clone(),
                            body,
                            seq,
                        });
                    }
                    _ => {
                        in_doubt.lock().unwrap().push((session.clone(), body));
                        return;
                    }
                }
                i += 1;
            }
        }));
    }
    // a client creating sessions at the same time
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let addr = server.addr();
        let (stop, created) = (stop.clone(), created.clone());
        workers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("created-{i:05}");
                match try_request(
                    addr,
                    "POST",
                    "/v1/sessions",
                    &[("Content-Type", "application/json")],
                    json!({"id": id, "metadata":{"i": i}})
                        .to_string()
                        .as_bytes(),
                ) {
                    Ok(resp) if resp.status == 201 => created.lock().unwrap().push(id),
                    _ => return,
                }
                i += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let in_doubt = std::mem::take(&mut *in_doubt.lock().unwrap());
    let created = std::mem::take(&mut *created.lock().unwrap());
    assert!(
        acked.len() > 50,
        "only {} appends acknowledged before the kill",
        acked.len()
    );
    eprintln!(
        "{} appends acknowledged, {} in doubt, {} sessions created",
        acked.len(),
        in_doubt.len(),
        created.len()
    );

    server.start_again();
    let mut by_session: HashMap<String, Vec<Value>> = HashMap::new();
    for s in sessions {
        let events = server.all_events(s);
        let last = events.len() as u64;
        assert_eq!(
            seqs(&events),
            (1..=last).collect::<Vec<_>>(),
            "{s}: contiguous from 1"
        );
        assert_eq!(server.session(s)["last_seq"], last);
        by_session.insert(s.to_string(), events);
    }
    for a in &acked {
        let events = &by_session[&a.session];
        let event = events.get(a.seq as usize - 1).unwrap_or_else(|| {
            panic!(
                "acknowledged seq {} of {} lost (head {})",
                a.seq,
                a.session,
                events.len()
            )
        });
        assert_eq!(
            event["idempotency_key"], a.body["idempotency_key"],
            "seq {} of {}",
            a.seq, a.session
        );
        assert_eq!(event["payload"], a.body["payload"]);
        assert_eq!(event["actor"], a.body["actor"]);
    }
    for id in &created {
        assert_eq!(
            server.get(&format!("/v1/sessions/{id}")).status,
            200,
            "acknowledged create of {id} lost"
        );
    }
    // pre-crash retries are answered with their original seq
    for a in acked.iter().step_by(7) {
        let resp = server.append(&a.session, &a.body);
        assert_eq!(resp.status, 201, "{}", resp.text());
        let reply = resp.json();
        assert_eq!(
            reply["deduped"], true,
            "retry of {} after restart",
            a.body["idempotency_key"]
        );
        assert_eq!(reply["seq"], a.seq);
        assert_eq!(reply["last_seq"], by_session[&a.session].len() as u64);
    }
    // in-doubt requests: applied once or not at all, never twice
    for (session, body) in &in_doubt {
        let resp = server.append(session, body);
        assert_eq!(resp.status, 201, "{}", resp.text());
        let again = server.append(session, body).json();
        assert_eq!(again["deduped"], true);
        assert_eq!(again["seq"], resp.json()["seq"]);
    }
    for s in sessions {
        let events = server.all_events(s);
        assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());
        let keys: std::collections::HashSet<&str> = events
            .iter()
            .filter_map(|e| e["idempotency_key"].as_str())
            .collect();
        assert_eq!(keys.len(), events.len(), "{s}: a key appended twice");
        let next = server.append_ok(s, &json!({"type":"after","payload":{}}));
        assert_eq!(next["seq"], events.len() as u64 + 1);
    }
}

#[test]
fn acknowledgement_waits_for_fsync() {
    let server = Server::start(Opts::new("dur-fsync").env("STARCITE_TEST_FSYNC_DELAY_MS", "300"));
    let min = Duration::from_millis(300);
    let timed = |f: &dyn Fn() -> Resp| {
        let started = Instant::now();
        let resp = f();
        (resp, started.elapsed())
    };
    let (resp, took) = timed(&|| server.post("/v1/sessions", r#"{"id":"f"}"#));
    assert_eq!(resp.status, 201);
    assert!(took >= min, "create acknowledged after {took:?}");
    for n in 1..=3u64 {
        let (resp, took) = timed(&|| server.append("f", &json!({"type":"t","payload":n})));
        assert_eq!(resp.json()["seq"], n);
        assert!(took >= min, "append {n} acknowledged after {took:?}");
    }
    let (resp, took) = timed(&|| server.patch("/v1/sessions/f", r#"{"title":"x"}"#));
    assert_eq!(resp.status, 200);
    assert!(took >= min, "patch acknowledged after {took:?}");
    let (resp, took) = timed(&|| server.post("/v1/sessions/f/archive", ""));
    assert_eq!(resp.status, 200);
    assert!(took >= min, "archive acknowledged after {took:?}");
    // concurrent appends (group commit) each wait too
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let started = Instant::now();
                let resp = request(
                    addr,
                    "POST",
                    "/v1/sessions/f/append",
                    &[("Content-Type", "application/json")],
                    json!({"type":"t","payload":{"c":i}}).to_string().as_bytes(),
                );
                assert_eq!(resp.status, 201, "{}", resp.text());
                started.elapsed()
            })
        })
        .collect();
    for t in threads {
        let took = t.join().unwrap();
        assert!(took >= min, "concurrent append acknowledged after {took:?}");
    }
    assert_eq!(server.session("f")["last_seq"], 9);
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused() {
    let server = Server::start(Opts::new("dur-lock"));
    server.create_session("l");
    let mut args = server.serve_args();
    let at = args.iter().position(|a| a == "--http-addr").unwrap();
    args[at + 1] = format!("127.0.0.1:{}", free_port());
    let stderr_path = server.data_dir.with_extension("second.log");
    let (status, stderr) = run_binary(&args, &[], Duration::from_secs(20), &stderr_path);
    let _ = std::fs::remove_file(&stderr_path);
    let status = status.expect("the second process must exit on its own");
    assert!(!status.success(), "second process exited with {status}");
    let lower = stderr.to_lowercase();
    assert!(
        ["lock", "in use", "another", "already"]
            .iter()
            .any(|w| lower.contains(w)),
        "unclear refusal: {stderr}"
    );
    // the first one is unharmed
    assert_eq!(
        server.append_ok("l", &json!({"type":"t","payload":1}))["seq"],
        1
    );
    assert_eq!(server.get("/health/ready").status, 200);
}

#[test]
fn restart_with_a_different_shard_count_is_refused() {
    let mut server = Server::start(Opts::new("dur-shards"));
    server.create_session("s");
    server.append_ok("s", &json!({"type":"t","payload":1}));
    let status = server.terminate();
    assert!(status.success(), "{status}");
    for shards in [3usize, 1] {
        let stderr_path = server
            .data_dir
            .with_extension(format!("shards{shards}.log"));
        let (status, stderr) = run_binary(
            &args_with_shards(&server, shards),
            &[],
            Duration::from_secs(20),
            &stderr_path,
        );
        let _ = std::fs::remove_file(&stderr_path);
        let status = status.expect("must exit on its own");
        assert!(
            !status.success(),
            "--shards {shards} on a 2-shard data dir: {status}"
        );
        // numbers in the message, leaving out the data dir path and the address
        let text = stderr
            .replace(&server.data_dir_arg(), " ")
            .replace(&format!("127.0.0.1:{}", server.port), " ");
        let numbers: Vec<&str> = text
            .split(|c: char| !c.is_ascii_digit())
            .filter(|t| !t.is_empty())
            .collect();
        assert!(
            numbers.contains(&"2")
                && numbers.contains(&shards.to_string().as_str())
                && text.to_lowercase().contains("shard"),
            "message must name both shard counts: {stderr}"
        );
    }
    server.start_again();
    assert_eq!(seqs(&server.all_events("s")), vec![1]);
}

#[test]
fn restart_after_sigterm_keeps_everything() {
    let mut server = Server::start(Opts::new("dur-graceful"));
    server.post(
        "/v1/sessions",
        r#"{"id":"g1","title":"One","metadata":{"user":"42","k":[1,2]}}"#,
    );
    server.post("/v1/sessions", r#"{"id":"g2","metadata":{"user":"7"}}"#);
    server.post("/v1/sessions", r#"{"id":"g3"}"#);
    server.patch(
        "/v1/sessions/g1",
        r#"{"title":"Uno","metadata":{"k":null,"new":1.50}}"#,
    );
    server.post("/v1/sessions/g2/archive", "");
    let generated = server.post("/v1/sessions", "").json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut producer_seqs: HashMap<&str, u64> = HashMap::new();
    for n in 1..=30u64 {
        let s = ["g1", "g2", "g3"][n as usize % 3];
        let mut body =
            json!({"type":"t","payload":{"n":n,"f":1},"idempotency_key":format!("key-{n}")});
        if n % 2 == 0 {
            let pseq = producer_seqs.entry(s).or_insert(0);
            *pseq += 1;
            body["producer_id"] = json!(format!("prod-{s}"));
            body["producer_seq"] = json!(*pseq);
        }
        server.append_ok(s, &body);
    }
    let sessions_before = all_sessions(&server);
    assert_eq!(sessions_before.len(), 4);
    let pages_before: Vec<Vec<String>> = ["g1", "g2", "g3"]
        .iter()
        .map(|s| raw_event_pages(&server, s))
        .collect();
    for round in ["sigterm", "sigterm again", "kill -9"] {
        if round == "kill -9" {
            server.kill9();
            server.start_again();
        } else {
            let status = server.terminate();
            assert_eq!(status.code(), Some(0), "{round}: exit {status}");
            server.start_again();
        }
        assert_eq!(all_sessions(&server), sessions_before, "{round}: sessions");
        let pages: Vec<Vec<String>> = ["g1", "g2", "g3"]
            .iter()
            .map(|s| raw_event_pages(&server, s))
            .collect();
        assert_eq!(pages, pages_before, "{round}: events byte for byte");
        assert_eq!(
            server.get("/v1/sessions?metadata.user=42").json()["sessions"][0]["id"],
            "g1"
        );
        assert_error(
            &server.post("/v1/sessions", r#"{"id":"g1"}"#),
            409,
            "session_exists",
        );
        assert_error(
            &server.post("/v1/sessions", &json!({"id": generated}).to_string()),
            409,
            "session_exists",
        );
        // dedupe memory survived
        // n = 6 went to g1 (n % 3 == 0) as its second event, with producer prod-g1, seq 1
        let body = json!({"type":"t","payload":{"n":6,"f":1},"idempotency_key":"key-6","producer_id":"prod-g1","producer_seq":1});
        let reply = server.append_ok("g1", &body);
        assert_eq!(reply["deduped"], true, "{round}");
        assert_eq!(reply["seq"], 2);
        // producer state survived: prod-g1 last used 5 (n = 30, g1's tenth event)
        let resp = server.append(
            "g1",
            &json!({"type":"t","payload":0,"producer_id":"prod-g1","producer_seq":99}),
        );
        assert_eq!(
            assert_error(&resp, 409, "producer_seq_conflict")["expected_producer_seq"],
            6,
            "{round}"
        );
        // the producer's last entry dedupes by producer alone (no key given)
        let resp = server.append(
            "g1",
            &json!({"type":"t","payload":{"n":30,"f":1},"producer_id":"prod-g1","producer_seq":5}),
        );
        assert_eq!(resp.status, 201, "{round}: {}", resp.text());
        assert_eq!(resp.json()["seq"], 10, "{round}");
        assert_eq!(resp.json()["deduped"], true, "{round}");
        // expected_seq sees the recovered head
        let resp = server.append("g3", &json!({"type":"t","payload":0,"expected_seq":0}));
        assert_eq!(
            assert_error(&resp, 409, "expected_seq_conflict")["current_seq"],
            10,
            "{round}"
        );
        // version conflicts see the recovered version
        let resp = server.patch("/v1/sessions/g1", r#"{"title":"x","expected_version":1}"#);
        assert_eq!(
            assert_error(&resp, 409, "expected_version_conflict")["current_version"],
            2
        );
    }
    // new writes continue after the recovered state, inserted_at does not go backwards
    let last = server.all_events("g2").last().unwrap().clone();
    let reply = server.append_ok("g2", &json!({"type":"t","payload":"new"}));
    assert_eq!(reply["seq"], 11);
    let new = server.all_events("g2").last().unwrap().clone();
    assert!(new["inserted_at"].as_str() >= last["inserted_at"].as_str());
}

fn roll_payload(session: usize, i: usize) -> Value {
    let fill = char::from(b'a' + ((session * 7 + i) % 26) as u8);
    json!({"s": session, "i": i, "blob": fill.to_string().repeat(60 * 1024 + i)})
}

#[test]
fn a_log_with_many_segment_rolls_recovers() {
    let mut server = Server::start(Opts::new("dur-rolls"));
    let sessions = 12;
    let per = 40;
    for s in 0..sessions {
        server.create_session(&format!("r{s:02}"));
    }
    let started = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|s| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for i in 0..per {
                    let body = json!({"type":"blob","payload":roll_payload(s, i),"idempotency_key":format!("r{s}-{i}")});
                    let resp = conn.post_json(&format!("/v1/sessions/r{s:02}/append"), &body.to_string());
                    assert_eq!(resp.status, 201, "{}", resp.text());
                    assert_eq!(resp.json()["seq"], i as u64 + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let written = sessions * per * 60 * 1024;
    eprintln!("{} MiB appended in {:?}", written >> 20, started.elapsed());
    assert!(
        written > 6 * (4 << 20),
        "enough data for several 4 MiB segment rolls per shard"
    );

    let verify = |server: &Server, extra: usize| {
        for s in 0..sessions {
            let id = format!("r{s:02}");
            let events = server.all_events(&id);
            assert_eq!(
                seqs(&events),
                (1..=(per + extra) as u64).collect::<Vec<_>>(),
                "{id}"
            );
            for (i, e) in events.iter().take(per).enumerate() {
                assert_eq!(e["payload"], roll_payload(s, i), "{id} seq {}", i + 1);
            }
        }
    };
    server.kill9();
    let started = Instant::now();
    server.start_again();
    eprintln!("recovery after kill -9 took {:?}", started.elapsed());
    verify(&server, 0);
    // keep writing after recovery, then a graceful restart
    for s in 0..sessions {
        let reply = server.append_ok(
            &format!("r{s:02}"),
            &json!({"type":"after","payload":{"s":s}}),
        );
        assert_eq!(reply["seq"], per as u64 + 1);
        let dedupe = server.append_ok(
            &format!("r{s:02}"),
            &json!({"type":"blob","payload":roll_payload(s, 0),"idempotency_key":format!("r{s}-0")}),
        );
        assert_eq!(dedupe["seq"], 1);
        assert_eq!(dedupe["deduped"], true);
    }
    server.restart();
    verify(&server, 1);
}

#[test]
fn a_relative_data_dir_works() {
    let mut opts = Opts::new("dur-relative");
    opts.relative_data_dir = true;
    let mut server = Server::start(opts);
    server.create_session("rel");
    server.append_ok("rel", &json!({"type":"t","payload":1}));
    server.restart();
    assert_eq!(seqs(&server.all_events("rel")), vec![1]);
}

#[test]
fn a_write_outliving_the_request_timeout_is_503_commit_unknown_and_safe_to_retry() {
    let server = Server::start(
        Opts::new("dur-timeout")
            .arg("--request-timeout", "300ms")
            .env("STARCITE_TEST_FSYNC_DELAY_MS", "1500"),
    );
    // the create itself outlives the timeout: retry until the session shows up
    let resp = server.post("/v1/sessions", r#"{"id":"slow"}"#);
    assert!(resp.status == 201 || resp.status == 503, "{}", resp.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.get("/v1/sessions/slow").status != 200 {
        assert!(Instant::now() < deadline, "session never committed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = json!({"type":"t","payload":{"x":1},"idempotency_key":"retry-me"});
    let started = Instant::now();
    let resp = server.append("slow", &body);
    let took = started.elapsed();
    assert_error(&resp, 503, "commit_unknown");
    assert!(
        resp.header("retry-after").is_some(),
        "503 without Retry-After"
    );
    assert!(
        took < Duration::from_millis(1400),
        "the reply waited {took:?}, past the request timeout"
    );
    // once the fsync is done a retry is answered with the one and only seq
    std::thread::sleep(Duration::from_millis(2500));
    let resp = server.append("slow", &body);
    let mut tries = 0;
    let resp = if resp.status == 503 {
        // the retry may itself wait on a fsync (if the first was lost): retry again later
        let mut resp = resp;
        while resp.status == 503 && tries < 10 {
            std::thread::sleep(Duration::from_millis(2000));
            resp = server.append("slow", &body);
            tries += 1;
        }
        resp
    } else {
        resp
    };
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert_eq!(resp.json()["seq"], 1);
    let events = server.all_events("slow");
    assert_eq!(seqs(&events), vec![1], "applied exactly once");
}

#[test]
fn sigterm_during_writes_finishes_or_refuses_each_and_exits_0() {
    let mut server =
        Server::start(Opts::new("dur-sigterm-writes").env("STARCITE_TEST_FSYNC_DELAY_MS", "400"));
    server.create_session("w");
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let body = json!({"type":"t","payload":{"i":i},"idempotency_key":format!("k{i}")});
                let resp = try_request(
                    addr,
                    "POST",
                    "/v1/sessions/w/append",
                    &[("Content-Type", "application/json")],
                    body.to_string().as_bytes(),
                );
                (body, resp)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    server.send_sigterm();
    let results: Vec<(Value, std::io::Result<Resp>)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exit after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        server.stderr_tail(3000)
    );
    let mut acked = Vec::new();
    for (body, resp) in &results {
        match resp {
            Ok(r) if r.status == 201 => {
                acked.push((body.clone(), r.json()["seq"].as_u64().unwrap()))
            }
            Ok(r) => {
                let err = assert_error(r, 503, r.json()["error"].as_str().unwrap_or("?"));
                assert!(
                    err["error"] == "unavailable" || err["error"] == "commit_unknown",
                    "in-flight write at shutdown answered {err}"
                );
            }
            Err(_) => {} // connection closed without an answer: in doubt
        }
    }
    eprintln!(
        "{} of {} in-flight appends acknowledged at shutdown",
        acked.len(),
        results.len()
    );
    server.start_again();
    let events = server.all_events("w");
    assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());
    for (body, seq) in acked {
        let e = &events[seq as usize - 1];
        assert_eq!(e["idempotency_key"], body["idempotency_key"]);
    }
}

#[test]
fn requests_racing_an_uncommitted_entry_are_answered_after_its_commit() {
    let server =
        Server::start(Opts::new("dur-inflight").env("STARCITE_TEST_FSYNC_DELAY_MS", "600"));
    server.create_session("r");
    let body = json!({"type":"t","payload":{"first":true},"idempotency_key":"a"});
    let t0 = Instant::now();
    let first = {
        let addr = server.addr();
        let body = body.clone();
        std::thread::spawn(move || {
            let resp = request(
                addr,
                "POST",
                "/v1/sessions/r/append",
                &[("Content-Type", "application/json")],
                body.to_string().as_bytes(),
            );
            (resp, t0.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    // a retry of the in-flight entry and a conflict decided against it
    let retry = {
        let addr = server.addr();
        let body = body.clone();
        std::thread::spawn(move || {
            let resp = request(
                addr,
                "POST",
                "/v1/sessions/r/append",
                &[("Content-Type", "application/json")],
                body.to_string().as_bytes(),
            );
            (resp, t0.elapsed())
        })
    };
    let conflict = server.append(
        "r",
        &json!({"type":"t","payload":{"second":true},"expected_seq":0}),
    );
    let conflict_at = t0.elapsed();
    let (first, first_at) = first.join().unwrap();
    let (retry, retry_at) = retry.join().unwrap();
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.json()["seq"], 1);
    assert_eq!(first.json()["deduped"], false);
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(retry.json()["seq"], 1);
    assert_eq!(retry.json()["deduped"], true);
    let err = assert_error(&conflict, 409, "expected_seq_conflict");
    assert_eq!(err["current_seq"], 1);
    let slack = Duration::from_millis(50);
    assert!(
        retry_at + slack >= first_at,
        "the retry was answered at {retry_at:?}, before the original committed ({first_at:?})"
    );
    assert!(
        conflict_at + slack >= first_at,
        "the conflict was answered at {conflict_at:?}, before the entry it lost to committed ({first_at:?})"
    );
    assert_eq!(seqs(&server.all_events("r")), vec![1]);
}
