//! The Postgres archive seen from outside (issue 4): `starcite serve --postgres-url`
//! copies every committed event into Postgres exactly once, byte for byte as the API
//! serves it, on one node and in a 3-node cluster across a leader change; `archived_seq`
//! reaches `last_seq` soon after appends stop and never decreases; without an archive it
//! stays 0; a database of another cluster is refused at start; and a Postgres outage
//! during load fails no append and loses no event.
//!
//! Needs `STARCITE_TEST_POSTGRES_URL` (`source scripts/test-postgres.sh start`); without
//! it the tests fail when `CI` or `STARCITE_CI_POSTGRES=1` is set, and otherwise print a
//! notice and pass (`archive_off_keeps_archived_seq_zero` needs no Postgres). Each test
//! works in a database of its own; the outage test runs a private Postgres server
//! (root and `/usr/lib/postgresql` needed).
//!
//! "Byte equal" is checked on the raw text of each JSON member as served (parsed with
//! `serde_json::value::RawValue`, so the text compared is a substring of the served
//! bytes) against `payload::text`, `metadata::text` and `refs::text` of the row.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::cluster::{
    groups_of, is_retryable, post_append, wait_first_ack_after, Ack, Cluster, ClusterOpts,
};
use common::postgres::{
    event_counts, event_rows, postgres_url, session_row, EventRow, PrivatePostgres, TestDb,
};
use common::{free_port, run_binary, try_request, unique_path, Frame, Opts, Resp, Server, Ws};
use postgres::{Client, NoTls};
use serde_json::value::RawValue;
use serde_json::Value;

/// How long after appends stop `archived_seq` may take to reach `last_seq` ("a few
/// seconds" in the spec; generous for a loaded 2-core machine).
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// The same after Postgres came back (reconnect backoff up to 5 s, then the backlog).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
const LEADER_TIMEOUT: Duration = Duration::from_secs(15);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a client keeps retrying one idempotency key while the cluster fails over.
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
const TAIL_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// The gauges `/metrics` must show when the archive is on.
const ARCHIVE_GAUGES: [&str; 3] = [
    "starcite_archive_events_behind",
    "starcite_archive_seconds_behind",
    "starcite_archive_connected",
];

/// The multi-node tests run one at a time (3 nodes each on 2 cores, one of them with a
/// Postgres of its own besides).
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------

/// An append body written by hand, so that member order, whitespace and number spelling
/// are exactly as given: nested objects with unsorted keys, numbers like `1.50` and
/// `1e3`, unicode raw and escaped, scalar payloads, insignificant whitespace, optional
/// actor/source/metadata/refs. `n` varies the content; `tag` goes into some strings.
fn varied_body(n: usize, tag: &str) -> String {
    match n % 7 {
        0 => format!(
            r#"{{"type":"msg","payload":{{"z":{n},"a":"text {tag} {n}","m":{{"y":[1,2,{{"b":null}}],"a":true}}}}}}"#
        ),
        1 => format!(
            r#"{{"type":"num","payload":{{"price":1.50,"big":1e3,"neg":-0.0,"small":1E-7,"huge":123456789012345678901234567890,"frac":0.1000,"n":{n}}}}}"#
        ),
        2 => format!(
            r#"{{"type":"uni","payload":{{"text":"héllo wörld 😀 中文 {n}","esc":"tab\t quote\" backslash\\ \u00e9 \ud83d\ude00 \u0001 \/"}},"actor":"user:é"}}"#
        ),
        3 => format!(
            r#"{{"type":"full","payload":"plain string {n}","actor":"agent:drafter","source":"web","metadata":{{"trace":"t-{n}","z":1.0,"a":[]}},"refs":{{"parent":{n},"thread":"th-{tag}"}}}}"#
        ),
        4 => format!(
            "{{ \"type\" : \"spaced\" ,\n  \"payload\" : [ {n} , {{ \"b\" : 2 , \"a\" : [ ] }} , \"x  y\" ] ,\t\"source\" : \"cli\" }}"
        ),
        5 => match (n / 7) % 3 {
            0 => r#"{"type":"scalar","payload":42.000}"#.to_string(),
            1 => r#"{"type":"scalar","payload":true}"#.to_string(),
            _ => r#"{"type":"scalar","payload":"ünï"}"#.to_string(),
        },
        _ => format!(
            r#"{{"type":"deep","payload":{{"l1":{{"l2":{{"l3":{{"l4":[[[{n}]]]}}}}}}}},"metadata":{{"k":"v","n":-{n}}}}}"#
        ),
    }
}

/// `body` (a JSON object's text) with `members` (e.g. `"a":1,"b":2`) added at its end.
fn with_members(body: &str, members: &str) -> String {
    let trimmed = body.trim_end();
    assert!(trimmed.ends_with('}'), "not an object: {body}");
    format!("{},{members}}}", &trimmed[..trimmed.len() - 1])
}

/// `raw` JSON text without insignificant whitespace (what a compact rendering that keeps
/// member order and number spelling gives, for text without escapes).
fn compact(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in raw.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Served JSON, member by member, as raw text
// ---------------------------------------------------------------------------------------

type RawObject = BTreeMap<String, Box<RawValue>>;

fn parse_object(text: &str, what: &str) -> RawObject {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what} is not a JSON object ({e}): {text}"))
}

/// An object as served: its exact text and the exact text of each member.
struct Served {
    text: String,
    members: RawObject,
    origin: String,
}

impl Served {
    fn parse(text: &str, origin: &str) -> Served {
        Served {
            text: text.to_string(),
            members: parse_object(text, origin),
            origin: origin.to_string(),
        }
    }

    /// The raw text of member `key` (panics when it is missing).
    fn raw(&self, key: &str) -> &str {
        match self.members.get(key) {
            Some(raw) => raw.get(),
            None => panic!("{}: no member {key:?} in {}", self.origin, self.text),
        }
    }

    fn value(&self, key: &str) -> Value {
        serde_json::from_str(self.raw(key)).expect("member text is JSON")
    }

    fn seq(&self) -> u64 {
        self.raw("seq")
            .parse()
            .unwrap_or_else(|_| panic!("{}: bad seq in {}", self.origin, self.text))
    }

    fn string(&self, key: &str) -> String {
        self.opt_string(key)
            .unwrap_or_else(|| panic!("{}: {key} is null in {}", self.origin, self.text))
    }

    fn opt_string(&self, key: &str) -> Option<String> {
        match self.value(key) {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => panic!("{}: {key} is {other}, not a string or null", self.origin),
        }
    }

    fn opt_i64(&self, key: &str) -> Option<i64> {
        match self.raw(key) {
            "null" => None,
            text => Some(text.parse().unwrap_or_else(|_| {
                panic!("{}: {key} is {text}, not an integer or null", self.origin)
            })),
        }
    }

    fn opt_u64(&self, key: &str) -> Option<u64> {
        self.raw(key).parse().ok()
    }
}

/// Every event of `session` from `GET /events` on `addr`, raw, paging from cursor 0.
fn served_events_http(addr: SocketAddr, session: &str) -> Vec<Served> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let path = format!("/v1/sessions/{session}/events?cursor={cursor}&limit=1000");
        let resp = common::request(addr, "GET", &path, &[], b"");
        assert_eq!(resp.status, 200, "GET {path} on {addr}: {}", resp.text());
        let text = String::from_utf8(resp.body).expect("events page is UTF-8");
        let page = parse_object(&text, "events page");
        let events: Vec<Box<RawValue>> = serde_json::from_str(page["events"].get())
            .unwrap_or_else(|e| panic!("events of {session} are not an array ({e}): {text}"));
        let last_seq: u64 = page["last_seq"].get().parse().expect("last_seq");
        let next: u64 = page["next_cursor"].get().parse().expect("next_cursor");
        let origin = format!("GET /events of {session} on {addr}");
        out.extend(events.iter().map(|e| Served::parse(e.get(), &origin)));
        if events.is_empty() || next >= last_seq {
            return out;
        }
        cursor = next;
    }
}

/// Every event of `session` through `last_seq` from a WebSocket tail on `addr` from
/// cursor 0 (batches of up to 100), raw.
fn served_events_tail(addr: SocketAddr, session: &str, last_seq: u64) -> Vec<Served> {
    let origin = format!("tail of {session} on {addr}");
    let mut out: Vec<Served> = Vec::new();
    if last_seq == 0 {
        return out;
    }
    let mut ws = Ws::connect(
        addr,
        &format!("/v1/sessions/{session}/tail?cursor=0&batch_size=100"),
    );
    let deadline = Instant::now() + TAIL_TIMEOUT;
    while out.last().map_or(0, Served::seq) < last_seq {
        let left = deadline.saturating_duration_since(Instant::now());
        let text = match ws.next_frame(left) {
            Some(Frame::Text(text)) => text,
            other => panic!(
                "{origin}: expected events through seq {last_seq}, got {other:?} after {} events",
                out.len()
            ),
        };
        if text.trim_start().starts_with('[') {
            let batch: Vec<Box<RawValue>> = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{origin}: bad frame ({e}): {text}"));
            out.extend(batch.iter().map(|e| Served::parse(e.get(), &origin)));
        } else {
            let event = Served::parse(&text, &origin);
            assert!(
                event.members.contains_key("seq"),
                "{origin}: unexpected control frame {text}"
            );
            out.push(event);
        }
    }
    ws.close();
    out
}

/// `GET /v1/sessions/:id` on `addr`, raw.
fn served_session(addr: SocketAddr, session: &str) -> std::io::Result<(Resp, Option<Served>)> {
    let resp = try_request(addr, "GET", &format!("/v1/sessions/{session}"), &[], b"")?;
    let served = (resp.status == 200).then(|| {
        Served::parse(
            &resp.text(),
            &format!("GET /v1/sessions/{session} on {addr}"),
        )
    });
    Ok((resp, served))
}

// ---------------------------------------------------------------------------------------
// Archive checks
// ---------------------------------------------------------------------------------------

/// The archived row equals the served event, member by member; JSON members compared as
/// the raw served text against the stored `json` text.
#[track_caller]
fn assert_row_equals_served(row: &EventRow, event: &Served) {
    let at = format!("{} seq {} ({})", row.session_id, row.seq, event.origin);
    let ctx = format!("{at}\n  row:    {row:?}\n  served: {}", event.text);
    assert_eq!(row.seq as u64, event.seq(), "{ctx}\nseq");
    for (column, stored, member) in [
        ("payload", &row.payload, "payload"),
        ("metadata", &row.metadata, "metadata"),
        ("refs", &row.refs, "refs"),
    ] {
        assert_eq!(
            stored.as_str(),
            event.raw(member),
            "{ctx}\n{column}::text differs from the served bytes"
        );
    }
    assert_eq!(row.event_type, event.string("type"), "{ctx}\ntype");
    assert_eq!(row.actor, event.opt_string("actor"), "{ctx}\nactor");
    assert_eq!(row.source, event.opt_string("source"), "{ctx}\nsource");
    assert_eq!(
        row.idempotency_key,
        event.opt_string("idempotency_key"),
        "{ctx}\nidempotency_key"
    );
    assert_eq!(
        row.producer_id,
        event.opt_string("producer_id"),
        "{ctx}\nproducer_id"
    );
    assert_eq!(
        row.producer_seq,
        event.opt_i64("producer_seq"),
        "{ctx}\nproducer_seq"
    );
    assert_eq!(
        row.inserted_at,
        event.string("inserted_at"),
        "{ctx}\ninserted_at (to the microsecond)"
    );
}

/// The rows of `session` are exactly seqs `1..=last_seq`, once each, and equal `served`
/// (which must be those same seqs in order). Returns the rows.
#[track_caller]
fn assert_archive_matches(
    client: &mut Client,
    session: &str,
    last_seq: u64,
    served: &[Served],
    what: &str,
) -> Vec<EventRow> {
    let rows = event_rows(client, session);
    assert_contiguous_once(client, session, last_seq, &rows);
    let served_seqs: Vec<u64> = served.iter().map(Served::seq).collect();
    assert_eq!(
        served_seqs,
        (1..=last_seq).collect::<Vec<_>>(),
        "{session}: {what} did not serve seqs 1..={last_seq}"
    );
    for (row, event) in rows.iter().zip(served) {
        assert_row_equals_served(row, event);
    }
    rows
}

/// `rows` (seq order) are exactly seqs `1..=last_seq`, once each.
#[track_caller]
fn assert_contiguous_once(client: &mut Client, session: &str, last_seq: u64, rows: &[EventRow]) {
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq as u64).collect();
    if seqs == (1..=last_seq).collect::<Vec<_>>() {
        return;
    }
    let present: HashSet<u64> = seqs.iter().copied().collect();
    let missing: Vec<u64> = (1..=last_seq).filter(|s| !present.contains(s)).collect();
    let mut seen = HashSet::new();
    let twice: Vec<u64> = seqs.iter().copied().filter(|s| !seen.insert(*s)).collect();
    let beyond: Vec<u64> = seqs.iter().copied().filter(|&s| s > last_seq).collect();
    panic!(
        "{session}: archive rows are not exactly seqs 1..={last_seq}: {} rows \
         (count, distinct, max = {:?}); missing {} (first {:?}); twice {:?}; beyond last_seq {:?}",
        rows.len(),
        event_counts(client, session),
        missing.len(),
        &missing[..missing.len().min(20)],
        &twice[..twice.len().min(20)],
        &beyond[..beyond.len().min(20)],
    );
}

/// Every event row of the database belongs to one of `sessions` (nothing stray), and
/// the total equals the sum of their `last_seq`s.
#[track_caller]
fn assert_no_stray_rows(client: &mut Client, last_seqs: &HashMap<String, u64>) {
    let rows = client
        .query(
            "SELECT session_id, count(*) FROM events GROUP BY session_id ORDER BY 1",
            &[],
        )
        .expect("count events per session");
    let counts: HashMap<String, u64> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect();
    let expected: HashMap<String, u64> = last_seqs
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(s, &n)| (s.clone(), n))
        .collect();
    assert_eq!(counts, expected, "rows per session in Postgres vs last_seq");
}

/// Polls `GET /v1/sessions/:id` of every session on every address until each reports
/// `archived_seq == last_seq`. Along the way asserts, per address and session, that
/// `archived_seq` never exceeds `last_seq` and never decreases. Returns the last session
/// object of each session (from the first address). On timeout panics with the last
/// bodies, the Postgres row counts (when `db_url` is given) and `extra()`.
fn wait_archived(
    addrs: &[SocketAddr],
    sessions: &[String],
    timeout: Duration,
    db_url: Option<&str>,
    extra: &dyn Fn() -> String,
) -> HashMap<String, Served> {
    let started = Instant::now();
    let mut highest: HashMap<(usize, String), u64> = HashMap::new();
    let mut last: HashMap<(usize, String), String> = HashMap::new();
    loop {
        let mut done = true;
        let mut firsts = HashMap::new();
        for (i, &addr) in addrs.iter().enumerate() {
            for session in sessions {
                let key = (i, session.clone());
                let (resp, served) = match served_session(addr, session) {
                    Ok(got) => got,
                    Err(e) => {
                        last.insert(key, format!("I/O error: {e}"));
                        done = false;
                        continue;
                    }
                };
                last.insert(key.clone(), format!("{} {}", resp.status, resp.text()));
                let Some(served) = served else {
                    done = false;
                    continue;
                };
                let archived = served.opt_u64("archived_seq").unwrap_or_else(|| {
                    panic!("{}: archived_seq missing or not a number", served.text)
                });
                let last_seq = served.opt_u64("last_seq").expect("last_seq");
                assert!(
                    archived <= last_seq,
                    "{session} on {addr}: archived_seq {archived} > last_seq {last_seq}: {}",
                    served.text
                );
                let before = highest.entry(key).or_insert(0);
                assert!(
                    archived >= *before,
                    "{session} on {addr}: archived_seq went back from {before} to {archived}: {}",
                    served.text
                );
                *before = archived;
                if archived != last_seq {
                    done = false;
                }
                if i == 0 {
                    firsts.insert(session.clone(), served);
                }
            }
        }
        if done {
            println!(
                "archived_seq == last_seq for {} sessions on {} nodes after {} ms",
                sessions.len(),
                addrs.len(),
                started.elapsed().as_millis()
            );
            return firsts;
        }
        if started.elapsed() > timeout {
            let mut report = String::new();
            let mut keys: Vec<_> = last.keys().cloned().collect();
            keys.sort();
            for key in keys {
                report.push_str(&format!(
                    "  {} via {}: {}\n",
                    key.1, addrs[key.0], last[&key]
                ));
            }
            if let Some(url) = db_url {
                match Client::connect(url, NoTls) {
                    Ok(mut client) => {
                        for session in sessions {
                            report.push_str(&format!(
                                "  postgres {session}: (count, distinct seqs, max seq) = {:?}\n",
                                event_counts(&mut client, session)
                            ));
                        }
                    }
                    Err(e) => report.push_str(&format!("  postgres unreachable: {e}\n")),
                }
            }
            panic!(
                "archived_seq did not reach last_seq within {timeout:?}:\n{report}{}",
                extra()
            );
        }
        thread::sleep(POLL);
    }
}

/// `/health/ready` answers 200 and mentions the archive; `/metrics` has the archive
/// gauges. Returns the archive lines of `/metrics` (for the log).
#[track_caller]
fn assert_archive_observable(addr: SocketAddr, ctx: &str) -> String {
    let ready = common::request(addr, "GET", "/health/ready", &[], b"");
    assert_eq!(
        ready.status,
        200,
        "{ctx}: /health/ready on {addr}: {}",
        ready.text()
    );
    let body: Value = serde_json::from_slice(&ready.body).unwrap_or(Value::Null);
    assert!(
        body.get("archive").is_some(),
        "{ctx}: /health/ready on {addr} has no \"archive\": {}",
        ready.text()
    );
    let metrics = common::request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(metrics.status, 200, "{ctx}: /metrics on {addr}");
    let text = metrics.text();
    for gauge in ARCHIVE_GAUGES {
        assert!(
            text.contains(gauge),
            "{ctx}: /metrics on {addr} lacks {gauge}"
        );
    }
    let archive_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("starcite_archive_"))
        .collect();
    format!("archive {}; {}", body["archive"], archive_lines.join("; "))
}

// ---------------------------------------------------------------------------------------
// Clients under load
// ---------------------------------------------------------------------------------------

/// What the writers saw: acknowledged appends and anything that broke the contract.
#[derive(Default)]
struct WriteLog {
    acks: Vec<Ack>,
    problems: Vec<String>,
}

struct Writer {
    addrs: Vec<SocketAddr>,
    session: String,
    /// Prefix of the idempotency keys (and the producer id when `producer`).
    prefix: String,
    producer: bool,
    /// Pause between the starts of two appends.
    pace: Duration,
    /// Retry a 503 or a failed connection with the same body (else it is a problem).
    retry: bool,
}

/// A client appending varied bodies to one session until `stop`, each with a new
/// idempotency key, through the nodes in turn. Checks every reply's `archived_seq`
/// (≤ `last_seq`, never smaller than in an earlier reply to this client).
fn spawn_writer(w: Writer, stop: Arc<AtomicBool>, log: Arc<Mutex<WriteLog>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let problem = |text: String| log.lock().unwrap().problems.push(text);
        let mut turn = 0usize;
        let mut last_archived = 0u64;
        let mut next_at = Instant::now();
        for n in 0usize.. {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            if next_at > now {
                thread::sleep(next_at - now);
            }
            next_at = next_at.max(now - w.pace) + w.pace;
            let key = format!("{}-{n}", w.prefix);
            let mut body = with_members(
                &varied_body(n, &w.prefix),
                &format!(r#""idempotency_key":"{key}""#),
            );
            if w.producer {
                body = with_members(
                    &body,
                    &format!(r#""producer_id":"{}","producer_seq":{}"#, w.prefix, n + 1),
                );
            }
            let deadline = Instant::now() + RETRY_TIMEOUT;
            loop {
                turn += 1;
                let addr = w.addrs[turn % w.addrs.len()];
                let sent_at = Instant::now();
                let resp = post_append(addr, &w.session, &body);
                if let Ok(r) = &resp {
                    if r.status == 201 {
                        let reply = r.json();
                        let (seq, last_seq, archived) = (
                            reply["seq"].as_u64().unwrap_or(0),
                            reply["last_seq"].as_u64().unwrap_or(0),
                            reply["archived_seq"].as_u64(),
                        );
                        match archived {
                            None => problem(format!("{key}: reply without archived_seq: {reply}")),
                            Some(a) if a > last_seq => {
                                problem(format!("{key}: archived_seq > last_seq: {reply}"))
                            }
                            Some(a) if a < last_archived => problem(format!(
                                "{key} via {addr}: archived_seq went back from {last_archived}: {reply}"
                            )),
                            Some(a) => last_archived = a,
                        }
                        log.lock().unwrap().acks.push(Ack {
                            session: w.session.clone(),
                            key,
                            seq,
                            sent_at,
                            acked_at: Instant::now(),
                        });
                        break;
                    }
                }
                if w.retry && is_retryable(&resp) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let got = match &resp {
                    Ok(r) => format!("{} {}", r.status, r.text()),
                    Err(e) => format!("I/O error {e}"),
                };
                problem(format!("append {key} to {} via {addr}: {got}", w.session));
                if w.retry {
                    return; // never acknowledged: this client gives up
                }
                break;
            }
        }
    })
}

/// Every acknowledged append is archived at its seq (its idempotency key is in the row),
/// and no key is archived twice.
#[track_caller]
fn assert_acks_archived(session: &str, rows: &[EventRow], acks: &[Ack]) {
    let mut seen = HashSet::new();
    for row in rows {
        if let Some(key) = &row.idempotency_key {
            assert!(
                seen.insert(key.clone()),
                "{session}: key {key} archived twice (again at seq {})",
                row.seq
            );
        }
    }
    for ack in acks.iter().filter(|a| a.session == session) {
        let row = rows.get(ack.seq as usize - 1);
        assert_eq!(
            row.and_then(|r| r.idempotency_key.as_deref()),
            Some(ack.key.as_str()),
            "{session}: {} was acknowledged at seq {}, archived row there: {row:?}",
            ack.key,
            ack.seq
        );
    }
}

/// Distinct session ids in distinct groups: `first`, then ids `{prefix}-{k}` whose groups
/// differ from every id chosen before.
fn sessions_in_distinct_groups(first: &str, prefix: &str, count: usize) -> Vec<String> {
    let mut ids = vec![first.to_string()];
    let mut groups = vec![shards::group_of(first)];
    for k in 0.. {
        if ids.len() == count {
            break;
        }
        let id = format!("{prefix}-{k}");
        let group = shards::group_of(&id);
        if !groups.contains(&group) {
            groups.push(group);
            ids.push(id);
        }
    }
    ids
}

// ---------------------------------------------------------------------------------------
// One node
// ---------------------------------------------------------------------------------------

#[test]
fn single_node_archives_every_event_exactly_once_byte_equal() {
    let Some(admin) = postgres_url() else { return };
    let db = TestDb::create(&admin, "arc_single");
    let server = Server::start(Opts::new("arc-single").arg("--postgres-url", &db.url));
    let addr = server.addr();

    // Sessions with titles and metadata (unsorted keys, numbers as written, unicode); one
    // patched, one archived, so their versions move.
    let creates = [
        r#"{"id":"arc-s1","title":"Première ✓ session","metadata":{"z":"last","a":1.50,"nested":{"k":[1,"two",1e3]}}}"#,
        r#"{"id":"arc-s2","title":null,"metadata":{}}"#,
        r#"{"id":"arc-s3","title":"plain","metadata":{"tenant":"t-1","emoji":"😀","n":-0.0}}"#,
    ];
    let ids: Vec<String> = ["arc-s1", "arc-s2", "arc-s3"].map(String::from).to_vec();
    for body in creates {
        let resp = server.post("/v1/sessions", body);
        assert_eq!(resp.status, 201, "create {body}: {}", resp.text());
        assert_eq!(resp.json()["archived_seq"], 0, "{}", resp.text());
    }
    let patched = server.patch(
        "/v1/sessions/arc-s3",
        r#"{"title":"patched ✓","metadata":{"added":{"b":1,"a":2},"tenant":null}}"#,
    );
    assert_eq!(patched.status, 200, "{}", patched.text());
    let archived = server.post("/v1/sessions/arc-s2/archive", "");
    assert_eq!(archived.status, 200, "{}", archived.text());

    // Appends, interleaved over the sessions: some with an idempotency key, some with a
    // producer, a few retried (deduped: nothing appended).
    let per_session = 150usize;
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    let mut last_archived: HashMap<String, u64> = HashMap::new();
    let mut producer_seq: HashMap<String, u64> = HashMap::new();
    let mut deduped = 0;
    for n in 0..per_session {
        for (s, id) in ids.iter().enumerate() {
            let mut body = varied_body(n + s, id);
            let keyed = n % 3 == 0;
            let produced = n % 5 == 0;
            if keyed {
                body = with_members(&body, &format!(r#""idempotency_key":"key-{id}-{n}""#));
            }
            if produced {
                // A producer never seen before may start at any value.
                let p = producer_seq.entry(id.clone()).or_insert(6);
                *p += 1;
                body = with_members(
                    &body,
                    &format!(r#""producer_id":"prod-{id}","producer_seq":{p}"#),
                );
            }
            let resp = server.post(&format!("/v1/sessions/{id}/append"), &body);
            assert_eq!(
                resp.status,
                201,
                "append to {id}: {}\nbody: {body}",
                resp.text()
            );
            let reply = resp.json();
            let bodies = sent.entry(id.clone()).or_default();
            bodies.push(body.clone());
            let seq = bodies.len() as u64;
            assert_eq!(reply["seq"], seq, "{id}: {reply}");
            assert_eq!(reply["last_seq"], seq, "{id}: {reply}");
            assert_eq!(reply["deduped"], false, "{id}: {reply}");
            let archived = reply["archived_seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("{id}: no archived_seq in {reply}"));
            let before = last_archived.entry(id.clone()).or_insert(0);
            assert!(
                archived <= seq && archived >= *before,
                "{id}: archived_seq {archived} after {before}, at seq {seq}: {reply}"
            );
            *before = archived;
            if (keyed || produced) && n % 2 == 0 {
                let again = server.post(&format!("/v1/sessions/{id}/append"), &body);
                assert_eq!(again.status, 201, "retry to {id}: {}", again.text());
                let again = again.json();
                assert_eq!(
                    (&again["seq"], &again["deduped"]),
                    (&Value::from(seq), &Value::Bool(true)),
                    "retry of seq {seq} of {id}: {again}"
                );
                deduped += 1;
            }
        }
    }
    println!(
        "{} appends, {deduped} deduped retries",
        per_session * ids.len()
    );

    let sessions = wait_archived(&[addr], &ids, ARCHIVE_TIMEOUT, Some(&db.url), &|| {
        String::new()
    });
    let mut client = db.client();
    let mut last_seqs = HashMap::new();
    for id in &ids {
        let session = &sessions[id];
        let last_seq = session.opt_u64("last_seq").unwrap();
        assert_eq!(last_seq, per_session as u64, "{id}: {}", session.text);
        last_seqs.insert(id.clone(), last_seq);

        let served_http = served_events_http(addr, id);
        let rows = assert_archive_matches(&mut client, id, last_seq, &served_http, "GET /events");
        let served_tail = served_events_tail(addr, id, last_seq);
        assert_archive_matches(&mut client, id, last_seq, &served_tail, "the tail");

        // What was archived is what was sent: equal JSON values (numbers as written),
        // and, for text without escapes, the sent text minus whitespace.
        for (row, body) in rows.iter().zip(&sent[id]) {
            let sent = Served::parse(body, &format!("sent body of {id} seq {}", row.seq));
            let ctx = format!(
                "{id} seq {}: sent {body}\narchived payload {}",
                row.seq, row.payload
            );
            let archived: Value = serde_json::from_str(&row.payload).expect("payload is JSON");
            assert_eq!(archived, sent.value("payload"), "{ctx}");
            if !sent.raw("payload").contains('\\') {
                assert_eq!(row.payload, compact(sent.raw("payload")), "{ctx}");
            }
            for member in ["metadata", "refs"] {
                let stored = if member == "metadata" {
                    &row.metadata
                } else {
                    &row.refs
                };
                match sent.members.get(member) {
                    Some(raw) => assert_eq!(stored, &compact(raw.get()), "{ctx}\n{member}"),
                    None => assert_eq!(stored, "{}", "{ctx}\n{member}"),
                }
            }
        }

        // The catalog row: what GET serves, archived_seq at the head (it may trail the
        // events by one write: poll).
        let version = session.opt_u64("version").expect("version") as i64;
        let deadline = Instant::now() + ARCHIVE_TIMEOUT;
        let row = loop {
            let row = session_row(&mut client, id);
            let current = row
                .as_ref()
                .is_some_and(|r| r.archived_seq == last_seq as i64 && r.version == version);
            if current || Instant::now() > deadline {
                break row;
            }
            thread::sleep(POLL);
        };
        let row =
            row.unwrap_or_else(|| panic!("no sessions row for {id}; served {}", session.text));
        let ctx = format!("sessions row {row:?}\nserved {}", session.text);
        assert_eq!(row.id, *id, "{ctx}");
        assert_eq!(row.title, session.opt_string("title"), "{ctx}\ntitle");
        assert_eq!(
            row.metadata,
            session.raw("metadata"),
            "{ctx}\nmetadata::text"
        );
        assert_eq!(row.version, version, "{ctx}\nversion");
        assert_eq!(
            Value::Bool(row.archived),
            session.value("archived"),
            "{ctx}\narchived"
        );
        assert_eq!(
            row.created_at,
            session.string("created_at"),
            "{ctx}\ncreated_at"
        );
        assert_eq!(
            row.updated_at,
            session.string("updated_at"),
            "{ctx}\nupdated_at"
        );
        assert_eq!(row.archived_seq, last_seq as i64, "{ctx}\narchived_seq");
    }
    assert_no_stray_rows(&mut client, &last_seqs);
    assert_eq!(sessions["arc-s2"].value("archived"), true);
    assert_eq!(sessions["arc-s3"].opt_u64("version"), Some(2));

    // Appends after the archive caught up: archived_seq in the reply never goes back.
    let reply = server.append_ok("arc-s1", &serde_json::json!({"type":"late","payload":{}}));
    assert!(
        reply["archived_seq"].as_u64().unwrap_or(0) >= per_session as u64,
        "archived_seq went back: {reply}"
    );
    println!("{}", assert_archive_observable(addr, "single node"));
}

#[test]
fn archive_off_keeps_archived_seq_zero() {
    // No --postgres-url, and no DATABASE_URL either (an empty value means none).
    let server = Server::start(Opts::new("arc-off").env("DATABASE_URL", ""));
    let created = server.create_session("off-1");
    assert_eq!(created["archived_seq"], 0, "{created}");
    for n in 1..=30u64 {
        let reply = server.append_ok(
            "off-1",
            &serde_json::json!({"type": "t", "payload": {"n": n}, "idempotency_key": format!("k{n}")}),
        );
        assert_eq!(reply["seq"], n, "{reply}");
        assert_eq!(reply["archived_seq"], 0, "archive off: {reply}");
    }
    // A deduped reply too.
    let again = server.append_ok(
        "off-1",
        &serde_json::json!({"type": "t", "payload": {"n": 1}, "idempotency_key": "k1"}),
    );
    assert_eq!(
        (&again["deduped"], &again["archived_seq"]),
        (&Value::Bool(true), &Value::from(0)),
        "{again}"
    );
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let session = server.session("off-1");
        assert_eq!(session["last_seq"], 30, "{session}");
        assert_eq!(session["archived_seq"], 0, "archive off: {session}");
        thread::sleep(POLL);
    }
    let ready = server.get("/health/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    // Tolerant: when the detail names the archive, it says it is off.
    let detail = ready.json();
    if let Some(enabled) = detail["archive"]["enabled"].as_bool() {
        assert!(!enabled, "archive reported enabled without a URL: {detail}");
    }
}

#[test]
fn a_database_of_another_cluster_is_refused_at_start() {
    let Some(admin) = postgres_url() else { return };
    let db = TestDb::create(&admin, "arc_foreign");
    let mut a = Server::start(
        Opts::new("arc-foreign-x")
            .shards(1)
            .arg("--cluster-id", "cluster-x")
            .arg("--postgres-url", &db.url),
    );
    // The database is cluster-x's once something was archived into it.
    a.create_session("foreign-1");
    a.append_ok(
        "foreign-1",
        &serde_json::json!({"type": "t", "payload": {}}),
    );
    wait_archived(
        &[a.addr()],
        &["foreign-1".into()],
        ARCHIVE_TIMEOUT,
        Some(&db.url),
        &|| String::new(),
    );
    let stopped = a.terminate();
    println!("cluster-x node stopped: {stopped}");

    // Another cluster on a fresh data dir (so that only the database can refuse it).
    let data_dir = unique_path("arc-foreign-y");
    let log = data_dir.with_extension("stderr.log");
    let args: Vec<String> = [
        "serve",
        "--http-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--shards",
        "1",
        "--cluster-id",
        "cluster-y",
        "--postgres-url",
        &db.url,
    ]
    .map(String::from)
    .to_vec();
    let started = Instant::now();
    let (status, stderr) = run_binary(&args, &[], Duration::from_secs(10), &log);
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_file(&log);
    let Some(status) = status else {
        panic!("cluster-y's node still ran 10 s after start on cluster-x's database\n{stderr}");
    };
    assert!(
        !status.success(),
        "cluster-y's node exited successfully ({status}) on cluster-x's database\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("cluster"),
        "the refusal does not mention the cluster ({status}, after {:?}):\n{stderr}",
        started.elapsed()
    );
    println!("refused after {:?}: {status}", started.elapsed());

    // The rightful cluster still starts on it and archives on.
    a.start_again();
    let reply = a.append_ok(
        "foreign-1",
        &serde_json::json!({"type": "t", "payload": {}}),
    );
    assert_eq!(reply["seq"], 2, "{reply}");
    wait_archived(
        &[a.addr()],
        &["foreign-1".into()],
        ARCHIVE_TIMEOUT,
        Some(&db.url),
        &|| String::new(),
    );
    let mut client = db.client();
    let rows = event_rows(&mut client, "foreign-1");
    assert_contiguous_once(&mut client, "foreign-1", 2, &rows);
}

// ---------------------------------------------------------------------------------------
// A cluster
// ---------------------------------------------------------------------------------------

#[test]
fn cluster_archives_exactly_once_across_leader_change() {
    let Some(admin) = postgres_url() else { return };
    let _heavy = heavy();
    let db = TestDb::create(&admin, "arc_cluster");
    let mut cluster = Cluster::start(
        ClusterOpts::new("arc-cluster")
            .arg("--postgres-url", &db.url)
            .arg("--request-timeout", "2s"),
    );
    let sessions = sessions_in_distinct_groups("arc-busy", "arc-other", 3);
    let busy = sessions[0].clone();
    let group = shards::group_of(&busy);
    for id in &sessions {
        cluster.create_session(1, id);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let mut writers = Vec::new();
    let plan = [&busy, &busy, &busy, &sessions[1], &sessions[2]];
    for (n, session) in plan.into_iter().enumerate() {
        let writer = Writer {
            addrs: cluster.addrs(),
            session: session.clone(),
            prefix: format!("w{n}"),
            producer: n == 0 || n == 3,
            pace: Duration::from_millis(10),
            retry: true,
        };
        writers.push(spawn_writer(writer, stop.clone(), log.clone()));
    }

    thread::sleep(Duration::from_millis(1500));
    let leader = cluster.wait_leader(group, LEADER_TIMEOUT);
    let killed_at = Instant::now();
    cluster.kill9(leader);
    let Some(took) = wait_first_ack_after(
        |f| log.lock().unwrap().acks.iter().for_each(&mut *f),
        &busy,
        killed_at,
        RETRY_TIMEOUT,
    ) else {
        panic!(
            "no append to {busy} (group {group}) acknowledged within {RETRY_TIMEOUT:?} of killing node {leader}"
        );
    };
    println!("killed leader node {leader} of group {group}; first ack after {took:?}");
    thread::sleep(Duration::from_millis(500));
    cluster.restart(leader);
    cluster.wait_caught_up(leader, group, CONVERGE_TIMEOUT);
    thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().expect("writer panicked");
    }
    let (acks, problems) = {
        let log = log.lock().unwrap();
        (log.acks.clone(), log.problems.clone())
    };
    assert!(
        problems.is_empty(),
        "writers saw problems:\n{}",
        problems.join("\n")
    );
    println!("{} appends acknowledged", acks.len());

    let addrs = cluster.addrs();
    let served = wait_archived(&addrs, &sessions, ARCHIVE_TIMEOUT, Some(&db.url), &|| {
        String::new()
    });
    let mut client = db.client();
    let mut last_seqs = HashMap::new();
    for (k, id) in sessions.iter().enumerate() {
        let last_seq = served[id].opt_u64("last_seq").unwrap();
        let acked_max = acks
            .iter()
            .filter(|a| &a.session == id)
            .map(|a| a.seq)
            .max();
        assert!(
            acked_max.unwrap_or(0) <= last_seq && acked_max.is_some(),
            "{id}: last_seq {last_seq}, highest acknowledged seq {acked_max:?}"
        );
        last_seqs.insert(id.clone(), last_seq);
        // The tail from one node, the pages from another.
        let tail_node = 1 + k % 3;
        let tail = served_events_tail(cluster.addr(tail_node), id, last_seq);
        let rows = assert_archive_matches(&mut client, id, last_seq, &tail, "the tail");
        assert_acks_archived(id, &rows, &acks);
        let pages = served_events_http(cluster.addr(1 + (k + 1) % 3), id);
        assert_archive_matches(&mut client, id, last_seq, &pages, "GET /events");
    }
    assert_no_stray_rows(&mut client, &last_seqs);
    cluster.wait_converged(&groups_of(&sessions), CONVERGE_TIMEOUT);
    cluster.assert_no_integrity_errors();
    for i in cluster.ids() {
        println!(
            "node {i}: {}",
            assert_archive_observable(cluster.addr(i), "cluster")
        );
    }
}

#[test]
fn postgres_outage_during_load_loses_nothing() {
    // The shared URL is not used (a private server is), but its absence decides skip or
    // fail, as for the other archive tests.
    if postgres_url().is_none() {
        return;
    }
    let _heavy = heavy();
    let Some(pg) = PrivatePostgres::init() else {
        return;
    };
    let url = pg.url();
    let mut cluster = Cluster::start(ClusterOpts::new("arc-outage").arg("--postgres-url", &url));
    let sessions = sessions_in_distinct_groups("arc-out", "arc-out", 4);
    for id in &sessions {
        cluster.create_session(1, id);
    }
    let addrs = cluster.addrs();
    let get_session = |id: &str| -> Value {
        let (resp, _) = served_session(addrs[0], id).expect("GET session");
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json()
    };

    // 4 clients at 50 appends/s each, 8 s; no retries: every append must get its 201.
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let writers: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let writer = Writer {
                addrs: addrs.clone(),
                session: id.clone(),
                prefix: format!("o{n}"),
                producer: n % 2 == 0,
                pace: Duration::from_millis(20),
                retry: false,
            };
            spawn_writer(writer, stop.clone(), log.clone())
        })
        .collect();
    let t0 = Instant::now();
    let sleep_until = |at: Duration| {
        if let Some(left) = at.checked_sub(t0.elapsed()) {
            thread::sleep(left);
        }
    };

    sleep_until(Duration::from_secs(2));
    pg.stop();
    let stopped_at = t0.elapsed();
    // Anything committed after this point cannot be in the archive until Postgres is back.
    let head_at_stop: HashMap<String, u64> = sessions
        .iter()
        .map(|id| (id.clone(), get_session(id)["last_seq"].as_u64().unwrap()))
        .collect();

    sleep_until(stopped_at + Duration::from_millis(1500));
    for i in cluster.ids() {
        let seen = assert_archive_observable(cluster.addr(i), "while Postgres is down");
        println!("node {i} while Postgres is down: {seen}");
    }
    sleep_until(stopped_at + Duration::from_secs(3));
    for id in &sessions {
        let session = get_session(id);
        let archived = session["archived_seq"].as_u64().unwrap();
        assert!(
            archived <= head_at_stop[id],
            "{id}: archived_seq {archived} while Postgres is down, but the head was {} when it stopped: {session}",
            head_at_stop[id]
        );
        println!("{id} before Postgres is back: {session}");
    }
    pg.start();
    println!(
        "Postgres down from {stopped_at:?} to {:?} after the load began",
        t0.elapsed()
    );

    sleep_until(Duration::from_secs(8));
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().expect("writer panicked");
    }
    let (acks, problems) = {
        let log = log.lock().unwrap();
        (log.acks.clone(), log.problems.clone())
    };
    assert!(
        problems.is_empty(),
        "{} appends failed or broke the contract while Postgres was down or back:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!("{} appends acknowledged", acks.len());

    let pg_log = || format!("--- private postgres log ---\n{}", pg.log_tail(3000));
    let served = wait_archived(&addrs, &sessions, CATCH_UP_TIMEOUT, Some(&url), &pg_log);
    let mut client = Client::connect(&url, NoTls).expect("connect to the private postgres");
    let mut last_seqs = HashMap::new();
    for (k, id) in sessions.iter().enumerate() {
        let last_seq = served[id].opt_u64("last_seq").unwrap();
        let acked = acks.iter().filter(|a| &a.session == id).count() as u64;
        assert_eq!(
            last_seq, acked,
            "{id}: every append acknowledged once, nothing else"
        );
        last_seqs.insert(id.clone(), last_seq);
        let tail = served_events_tail(cluster.addr(1 + k % 3), id, last_seq);
        let rows = assert_archive_matches(&mut client, id, last_seq, &tail, "the tail");
        assert_acks_archived(id, &rows, &acks);
    }
    assert_no_stray_rows(&mut client, &last_seqs);
    cluster.wait_converged(&groups_of(&sessions), CONVERGE_TIMEOUT);
}
