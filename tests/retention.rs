//! Local retention and the disk budget seen from outside: `--retention-bytes` deletes old
//! sealed log segments (once a snapshot covers them and, with the archive, once every
//! event in them is archived); without an archive the deleted events are reported as
//! 410 `events_expired` on `/events` and as an `expired` gap frame on tails; with the
//! archive, reads before the local log come from Postgres and join the local range with
//! no gap and no duplicate, a Postgres outage only delays them (503
//! `archive_unavailable`, tails wait), and unarchived events are never deleted;
//! `--max-disk-bytes` makes writes 507 `storage_full` while reads keep working.
//!
//! Every node here runs one shard with 1 MiB segments and a snapshot every 1 MiB of
//! log, so that ~1,500 sequential appends of 1 KiB (each takes at least one 4 KiB
//! block) fill several segments and retention has sealed, snapshotted segments to
//! delete.
//!
//! The archive tests need `STARCITE_TEST_POSTGRES_URL` (`source
//! scripts/test-postgres.sh start`); without it they fail when `CI` or
//! `STARCITE_CI_POSTGRES=1` is set, and otherwise print a notice and pass. The outage
//! tests run a private Postgres server (root and `/usr/lib/postgresql` needed).

mod common;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::postgres::{event_counts, postgres_url, PrivatePostgres, TestDb};
use common::{assert_error, Frame, Opts, Resp, Server, Ws};
use serde_json::value::RawValue;
use serde_json::{json, Value};

const SEGMENT_BYTES: u64 = 1 << 20;
const RETENTION_BYTES: u64 = 3 << 20;
/// Events appended by each retention test: at least ~6 segments of sequential 4 KiB
/// blocks (about 12 in practice: ~120 such appends fill a 1 MiB segment).
const EVENTS: u64 = 1500;
/// Bytes of padding in each payload.
const PAD: usize = 1000;
/// Longest wait for retention to delete something after the appends (1 s period).
const DELETE_TIMEOUT: Duration = Duration::from_secs(20);
/// Deletions are over when the counter has not moved for this long.
const SETTLE: Duration = Duration::from_millis(2500);
/// Longest wait for `archived_seq` to reach `last_seq`.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(20);
const TAIL_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// The tests run one at a time: each appends thousands of fsynced events on a 2-core
/// machine, and their timing (retention every 1 s, snapshots, Postgres restarts) is
/// easier to reason about without the others competing.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One shard, 1 MiB segments, a snapshot every 1 MiB, `--retention-bytes` 3 MiB.
fn retention_opts(name: &str) -> Opts {
    let mut opts = Opts::new(name)
        .shards(1)
        .arg("--snapshot-log-bytes", &SEGMENT_BYTES.to_string())
        .arg("--retention-bytes", &RETENTION_BYTES.to_string());
    opts.segment_bytes = SEGMENT_BYTES;
    opts
}

// ---------------------------------------------------------------------------------------
// Appends
// ---------------------------------------------------------------------------------------

/// The payload text of the `n`th event (about 1 KiB), compact, as the server serves it.
fn payload_text(n: u64) -> String {
    let letter = (b'a' + (n % 26) as u8) as char;
    let pad: String = std::iter::repeat_n(letter, PAD).collect();
    format!(r#"{{"n":{n},"pad":"{pad}"}}"#)
}

/// Appends events `from..=to` to `id` one after another, each acknowledged 201 at its
/// seq. Returns their payload texts, in seq order.
fn append_range(server: &Server, id: &str, from: u64, to: u64) -> Vec<String> {
    let mut sent = Vec::new();
    for seq in from..=to {
        let payload = payload_text(seq);
        let body = format!(r#"{{"type":"ret","payload":{payload}}}"#);
        let resp = server.post(&format!("/v1/sessions/{id}/append"), &body);
        assert_eq!(
            resp.status,
            201,
            "append seq {seq} to {id}: {}",
            resp.text()
        );
        let reply = resp.json();
        assert_eq!(reply["seq"], seq, "append to {id}: {reply}");
        sent.push(payload);
    }
    sent
}

/// Creates `id` and appends `EVENTS` events; returns their payload texts and the time
/// the appends took.
fn create_and_fill(server: &Server, id: &str) -> (Vec<String>, Duration) {
    server.create_session(id);
    let started = Instant::now();
    let sent = append_range(server, id, 1, EVENTS);
    (sent, started.elapsed())
}

// ---------------------------------------------------------------------------------------
// Observations
// ---------------------------------------------------------------------------------------

/// The value of counter `name` in `/metrics`.
fn metric(server: &Server, name: &str) -> u64 {
    let resp = server.get("/metrics");
    assert_eq!(resp.status, 200, "/metrics: {}", resp.text());
    let text = resp.text();
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .unwrap_or_else(|| panic!("/metrics has no {name}:\n{text}")) as u64
}

fn segments_deleted(server: &Server) -> u64 {
    metric(server, "starcite_log_segments_deleted_total")
}

/// Waits until retention deleted at least one segment and then deleted nothing more for
/// `SETTLE`. Returns the number deleted.
fn wait_deletions_settled(server: &Server, ctx: &str) -> u64 {
    let started = Instant::now();
    let mut last = segments_deleted(server);
    let mut since = Instant::now();
    loop {
        thread::sleep(POLL);
        let now = segments_deleted(server);
        if now != last {
            last = now;
            since = Instant::now();
        }
        if last > 0 && since.elapsed() >= SETTLE {
            println!(
                "{ctx}: {last} segments deleted, settled after {} ms",
                started.elapsed().as_millis()
            );
            return last;
        }
        assert!(
            started.elapsed() < DELETE_TIMEOUT + SETTLE,
            "{ctx}: no segment deleted (or deletions never settled) within {:?}: \
             starcite_log_segments_deleted_total = {last}",
            DELETE_TIMEOUT + SETTLE
        );
    }
}

/// Polls `GET /v1/sessions/:id` until `archived_seq == last_seq == last`.
fn wait_archived(
    server: &Server,
    id: &str,
    last: u64,
    timeout: Duration,
    extra: &dyn Fn() -> String,
) {
    let started = Instant::now();
    loop {
        let session = server.session(id);
        let (archived, last_seq) = (
            session["archived_seq"].as_u64().expect("archived_seq"),
            session["last_seq"].as_u64().expect("last_seq"),
        );
        assert_eq!(last_seq, last, "{id}: {session}");
        if archived == last_seq {
            println!(
                "{id}: archived_seq == last_seq == {last} after {} ms",
                started.elapsed().as_millis()
            );
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{id}: archived_seq did not reach {last} within {timeout:?}: {session}\n{}",
            extra()
        );
        thread::sleep(POLL);
    }
}

/// `/events?cursor={cursor}` of `id` answers 410 `events_expired`; returns
/// `first_available_seq`.
#[track_caller]
fn expect_expired(server: &Server, id: &str, cursor: u64) -> u64 {
    let resp = server.get(&format!("/v1/sessions/{id}/events?cursor={cursor}"));
    let body = assert_error(&resp, 410, "events_expired");
    body["first_available_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("410 without a numeric first_available_seq: {body}"))
}

/// One event as served: its seq, its exact text and the exact text of its payload.
#[derive(Clone, Debug)]
struct Served {
    seq: u64,
    text: String,
    payload: String,
}

impl Served {
    fn parse(text: &str, origin: &str) -> Served {
        let members: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{origin}: event is not a JSON object ({e}): {text}"));
        let seq = members
            .get("seq")
            .and_then(|raw| raw.get().parse().ok())
            .unwrap_or_else(|| panic!("{origin}: no numeric seq in {text}"));
        let payload = members
            .get("payload")
            .unwrap_or_else(|| panic!("{origin}: no payload in {text}"))
            .get()
            .to_string();
        Served {
            seq,
            text: text.to_string(),
            payload,
        }
    }
}

/// One page of `/events` (asserting 200): the events, raw, and `next_cursor`, `last_seq`.
fn events_page(server: &Server, id: &str, cursor: u64, limit: u64) -> (Vec<Served>, u64, u64) {
    let path = format!("/v1/sessions/{id}/events?cursor={cursor}&limit={limit}");
    let resp = server.get(&path);
    assert_eq!(resp.status, 200, "GET {path}: {}", resp.text());
    let text = String::from_utf8(resp.body).expect("events page is UTF-8");
    let page: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: ({e}) {text}"));
    let events: Vec<Box<RawValue>> = serde_json::from_str(page["events"].get())
        .unwrap_or_else(|e| panic!("GET {path}: events not an array ({e})"));
    let next: u64 = page["next_cursor"].get().parse().expect("next_cursor");
    let last_seq: u64 = page["last_seq"].get().parse().expect("last_seq");
    let origin = format!("GET {path}");
    let events = events
        .iter()
        .map(|e| Served::parse(e.get(), &origin))
        .collect();
    (events, next, last_seq)
}

/// Every event after `cursor` through the head, paging `/events` with `limit`.
/// Asserts each page is contiguous from its cursor.
fn page_all(server: &Server, id: &str, cursor: u64, limit: u64) -> Vec<Served> {
    let mut out = Vec::new();
    let mut cursor = cursor;
    loop {
        let (events, next, last_seq) = events_page(server, id, cursor, limit);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        let expected: Vec<u64> = (cursor + 1..=last_seq.min(cursor + limit)).collect();
        assert_eq!(
            seqs, expected,
            "{id}: page from cursor {cursor} (limit {limit}, last_seq {last_seq}) is not contiguous"
        );
        out.extend(events);
        if next >= last_seq {
            return out;
        }
        assert!(
            next > cursor,
            "{id}: next_cursor {next} did not move from {cursor}"
        );
        cursor = next;
    }
}

/// `events` are exactly seqs `from..=to`, in order, with the payloads sent.
#[track_caller]
fn assert_events(events: &[Served], from: u64, to: u64, sent: &[String], what: &str) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    if seqs != (from..=to).collect::<Vec<_>>() {
        let dupes = seqs.windows(2).filter(|w| w[1] <= w[0]).count();
        let holes = seqs.windows(2).filter(|w| w[1] > w[0] + 1).count();
        panic!(
            "{what}: expected seqs {from}..={to}, got {} events, first {:?}, last {:?}, \
             {dupes} out of order or duplicated, {holes} holes",
            seqs.len(),
            seqs.first(),
            seqs.last()
        );
    }
    for event in events {
        assert_eq!(
            event.payload,
            sent[event.seq as usize - 1],
            "{what}: payload of seq {} differs from what was sent",
            event.seq
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tails
// ---------------------------------------------------------------------------------------

/// What a tail delivered, in order.
#[derive(Debug)]
enum Item {
    /// A control frame (a single object without `seq`).
    Control(Value),
    /// An event, from a single-event frame or an array.
    Event(Served),
}

fn tail(server: &Server, id: &str, cursor: u64, batch_size: usize) -> Ws {
    Ws::connect(
        server.addr(),
        &format!("/v1/sessions/{id}/tail?cursor={cursor}&batch_size={batch_size}"),
    )
}

/// The items of the next frame, `None` when nothing arrives within `timeout`. Panics on
/// a close, the end of the connection or a binary frame. With `batch_size` 1 an event
/// frame must be one object, above 1 an array.
fn next_items(ws: &mut Ws, batch_size: usize, timeout: Duration) -> Option<Vec<Item>> {
    let text = match ws.next_frame(timeout)? {
        Frame::Text(text) => text,
        other => panic!("tail: expected a text frame, got {other:?}"),
    };
    let origin = "tail frame";
    if text.trim_start().starts_with('[') {
        assert!(
            batch_size > 1,
            "tail with batch_size 1 sent an array: {text}"
        );
        let batch: Vec<Box<RawValue>> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("tail: bad frame ({e}): {text}"));
        assert!(!batch.is_empty(), "tail sent an empty array");
        assert!(
            batch.len() <= batch_size,
            "tail sent {} events in one frame, batch_size {batch_size}",
            batch.len()
        );
        return Some(
            batch
                .iter()
                .map(|e| Item::Event(Served::parse(e.get(), origin)))
                .collect(),
        );
    }
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("tail: frame not JSON ({e}): {text}"));
    if value.get("seq").is_some() {
        assert_eq!(
            batch_size, 1,
            "tail with batch_size {batch_size} sent a bare event: {text}"
        );
        Some(vec![Item::Event(Served::parse(&text, origin))])
    } else {
        Some(vec![Item::Control(value)])
    }
}

/// Reads items until an event with seq ≥ `last_seq` arrived (or `timeout`, then panics).
fn collect_through(
    ws: &mut Ws,
    batch_size: usize,
    last_seq: u64,
    timeout: Duration,
    what: &str,
) -> Vec<Item> {
    let deadline = Instant::now() + timeout;
    let mut items = Vec::new();
    let mut head = 0;
    while head < last_seq {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(got) = next_items(ws, batch_size, left) else {
            panic!(
                "{what}: no event seq {last_seq} within {timeout:?}; {} items, last event seq {head}, \
                 controls {:?}",
                items.len(),
                controls(&items)
            );
        };
        for item in got {
            if let Item::Event(e) = &item {
                head = e.seq;
            }
            items.push(item);
        }
    }
    items
}

fn controls(items: &[Item]) -> Vec<&Value> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Control(v) => Some(v),
            Item::Event(_) => None,
        })
        .collect()
}

/// Splits items into (control frames, events), asserting that every control frame comes
/// before every event.
fn split_items(items: Vec<Item>, what: &str) -> (Vec<Value>, Vec<Served>) {
    let mut ctrl = Vec::new();
    let mut events = Vec::new();
    for item in items {
        match item {
            Item::Control(v) => {
                assert!(
                    events.is_empty(),
                    "{what}: control frame {v} after {} events (last seq {:?})",
                    events.len(),
                    events.last().map(|e: &Served| e.seq)
                );
                ctrl.push(v);
            }
            Item::Event(e) => events.push(e),
        }
    }
    (ctrl, events)
}

/// A tail of `id` from cursor 0 on a node without an archive after retention: the
/// expired gap to `first - 1`, then `first..=last` in order, then a live append.
/// Returns the new head and the payloads sent (with the live one appended).
fn check_expired_tail(
    server: &Server,
    id: &str,
    batch_size: usize,
    first: u64,
    last: u64,
    sent: &mut Vec<String>,
) -> u64 {
    let what = format!("tail of {id} from 0 (batch_size {batch_size})");
    let started = Instant::now();
    let mut ws = tail(server, id, 0, batch_size);
    let items = collect_through(&mut ws, batch_size, last, TAIL_TIMEOUT, &what);
    let (ctrl, events) = split_items(items, &what);
    assert_eq!(
        ctrl,
        vec![json!({"type":"gap","reason":"expired","from_cursor":0,"next_cursor":first - 1})],
        "{what}: control frames"
    );
    assert_events(&events, first, last, sent, &what);
    // Live.
    let live = last + 1;
    sent.extend(append_range(server, id, live, live));
    let items = collect_through(&mut ws, batch_size, live, TAIL_TIMEOUT, &what);
    let (ctrl, events) = split_items(items, &what);
    assert!(
        ctrl.is_empty(),
        "{what}: control frames after the replay: {ctrl:?}"
    );
    assert_events(&events, live, live, sent, &format!("{what}, live"));
    ws.close();
    println!(
        "{what}: gap to {}, {} replayed events and one live in {} ms",
        first - 1,
        last - first + 1,
        started.elapsed().as_millis()
    );
    live
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn retention_without_archive_reports_expired_then_serves_the_rest() {
    let _serial = serial();
    let mut server = Server::start(retention_opts("ret-noarch"));
    let id = "ret-noarch";
    let (mut sent, took) = create_and_fill(&server, id);
    println!("{EVENTS} appends in {} ms", took.as_millis());
    let deleted = wait_deletions_settled(&server, id);
    let mut last = EVENTS;

    // /events: 410 before the local log, with the first seq still there.
    let first = expect_expired(&server, id, 0);
    println!("{deleted} segments deleted; first_available_seq {first}");
    assert!(
        first > 1 && first <= last,
        "first_available_seq {first} outside 2..={last}"
    );
    if first >= 3 {
        assert_eq!(
            expect_expired(&server, id, first - 2),
            first,
            "cursor {} asks for the deleted seq {}",
            first - 2,
            first - 1
        );
    }
    let rest = page_all(&server, id, first - 1, 1000);
    assert_events(
        &rest,
        first,
        last,
        &sent,
        "/events from first_available_seq - 1",
    );
    let (page, _, _) = events_page(&server, id, first - 1, 1);
    assert_eq!(page.first().map(|e| e.seq), Some(first));
    let session = server.session(id);
    assert_eq!(session["last_seq"], last, "{session}");
    assert_eq!(session["archived_seq"], 0, "{session}");

    // Tails from 0: the expired gap, the rest, then live.
    last = check_expired_tail(&server, id, 1, first, last, &mut sent);
    last = check_expired_tail(&server, id, 50, first, last, &mut sent);

    // kill -9 and restart on the same data dir.
    server.kill9();
    server.start_again();
    assert_eq!(
        expect_expired(&server, id, 0),
        first,
        "first_available_seq after a restart"
    );
    let session = server.session(id);
    assert_eq!(session["last_seq"], last, "after restart: {session}");
    sent.extend(append_range(&server, id, last + 1, last + 1));
    last += 1;
    let what = format!("tail of {id} from {} after restart", first - 1);
    let mut ws = tail(&server, id, first - 1, 1);
    let items = collect_through(&mut ws, 1, last, TAIL_TIMEOUT, &what);
    let (ctrl, events) = split_items(items, &what);
    assert!(ctrl.is_empty(), "{what}: control frames {ctrl:?}");
    assert_events(&events, first, last, &sent, &what);
    sent.extend(append_range(&server, id, last + 1, last + 1));
    last += 1;
    let items = collect_through(&mut ws, 1, last, TAIL_TIMEOUT, &what);
    assert_events(&split_items(items, &what).1, last, last, &sent, &what);
    ws.close();
    assert_events(
        &page_all(&server, id, first - 1, 1000),
        first,
        last,
        &sent,
        "/events after restart",
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        expect_expired(&server, id, 0),
        first,
        "first_available_seq a while after the restart"
    );
}

#[test]
fn retention_with_archive_tail_from_zero_reads_postgres_then_local_then_live() {
    let Some(admin) = postgres_url() else { return };
    let _serial = serial();
    let db = TestDb::create(&admin, "ret_archive");
    let server = Server::start(retention_opts("ret-arch").arg("--postgres-url", &db.url));
    let id = "ret-arch";
    let (mut sent, took) = create_and_fill(&server, id);
    println!("{EVENTS} appends in {} ms", took.as_millis());
    let mut last = EVENTS;
    wait_archived(&server, id, last, ARCHIVE_TIMEOUT, &String::new);
    wait_deletions_settled(&server, id);
    let mut client = db.client();
    assert_eq!(
        event_counts(&mut client, id),
        (last as i64, last as i64, last as i64),
        "rows in Postgres (count, distinct seqs, max seq)"
    );

    // /events from 0 no longer 410s: it starts at seq 1, from Postgres.
    let (page, _, last_seq) = events_page(&server, id, 0, 100);
    assert_eq!(last_seq, last);
    assert_events(&page, 1, 100, &sent, "/events?cursor=0&limit=100");

    // Paging from 0 with limit 1000: Postgres, then local, contiguous.
    let paged = page_all(&server, id, 0, 1000);
    assert_events(&paged, 1, last, &sent, "/events from 0, limit 1000");
    // Pages of other sizes and starts agree byte for byte.
    for (cursor, limit) in [(0, 1), (0, 333), (last / 2, 1000), (last - 300, 250)] {
        let (events, _, _) = events_page(&server, id, cursor, limit);
        for event in &events {
            assert_eq!(
                event.text,
                paged[event.seq as usize - 1].text,
                "seq {} from cursor {cursor} limit {limit} differs from the limit-1000 paging",
                event.seq
            );
        }
    }

    // Tail from 0: every event once, in order, byte-equal to /events; then live.
    let what = "tail from 0 (archive)";
    let started = Instant::now();
    let mut ws = tail(&server, id, 0, 1);
    let items = collect_through(&mut ws, 1, last, TAIL_TIMEOUT, what);
    let (ctrl, events) = split_items(items, what);
    assert!(ctrl.is_empty(), "{what}: control frames {ctrl:?}");
    assert_events(&events, 1, last, &sent, what);
    for (event, served) in events.iter().zip(&paged) {
        assert_eq!(
            event.text, served.text,
            "{what}: frame of seq {} differs from /events",
            event.seq
        );
    }
    println!(
        "{what}: {last} events in {} ms",
        started.elapsed().as_millis()
    );
    for _ in 0..5 {
        sent.extend(append_range(&server, id, last + 1, last + 1));
        last += 1;
        let items = collect_through(&mut ws, 1, last, TAIL_TIMEOUT, what);
        let (ctrl, events) = split_items(items, what);
        assert!(ctrl.is_empty(), "{what}: control frames {ctrl:?}");
        assert_events(&events, last, last, &sent, &format!("{what}, live"));
    }
    ws.close();
    assert_events(
        &page_all(&server, id, 0, 1000),
        1,
        last,
        &sent,
        "/events from 0 after the live appends",
    );
}

#[test]
fn archive_unreachable_delays_old_reads_never_skips() {
    // The shared URL is not used (a private server is), but its absence decides skip or
    // fail, as for the other archive tests.
    if postgres_url().is_none() {
        return;
    }
    let _serial = serial();
    let Some(pg) = PrivatePostgres::init() else {
        return;
    };
    let server = Server::start(retention_opts("ret-outage").arg("--postgres-url", &pg.url()));
    let id = "ret-outage";
    let (mut sent, took) = create_and_fill(&server, id);
    println!("{EVENTS} appends in {} ms", took.as_millis());
    let mut last = EVENTS;
    let pg_log = || format!("--- private postgres log ---\n{}", pg.log_tail(3000));
    wait_archived(&server, id, last, ARCHIVE_TIMEOUT, &pg_log);
    wait_deletions_settled(&server, id);
    let before = page_all(&server, id, 0, 1000);
    assert_events(&before, 1, last, &sent, "/events before the outage");

    pg.stop();
    let stopped = Instant::now();
    let resp: Resp = server.get(&format!("/v1/sessions/{id}/events?cursor=0"));
    assert_error(&resp, 503, "archive_unavailable");
    assert!(
        resp.header("retry-after").is_some(),
        "503 archive_unavailable without Retry-After: {:?}",
        resp.headers
    );
    // The local range is still served.
    let (events, _, _) = events_page(&server, id, last - 20, 1000);
    assert_events(
        &events,
        last - 19,
        last,
        &sent,
        "/events of the local range, Postgres down",
    );

    // Where the local log begins: the smallest cursor served without Postgres.
    let status_at = |cursor: u64| {
        let resp = server.get(&format!(
            "/v1/sessions/{id}/events?cursor={cursor}&limit=10"
        ));
        match resp.status {
            200 => true,
            503 => {
                assert_error(&resp, 503, "archive_unavailable");
                false
            }
            _ => panic!(
                "/events?cursor={cursor} with Postgres down: {} {}",
                resp.status,
                resp.text()
            ),
        }
    };
    let (mut unavailable, mut served) = (0u64, last - 20);
    while served - unavailable > 1 {
        let mid = (served + unavailable) / 2;
        if status_at(mid) {
            served = mid;
        } else {
            unavailable = mid;
        }
    }
    let local_first = served + 1;
    println!("with Postgres down, /events serves seqs {local_first}.. (the local log)");
    assert!(
        local_first > 1,
        "retention deleted segments, yet seq 1 is still read without Postgres"
    );

    // A tail from 0 waits: no event, no gap.
    let what = "tail from 0 while Postgres is down";
    let mut ws = tail(&server, id, 0, 1);
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    if let Some(got) = next_items(
        &mut ws,
        1,
        quiet_until.saturating_duration_since(Instant::now()),
    ) {
        panic!("{what}: got {got:?} while the archive is unreachable");
    }
    println!(
        "Postgres down for {} ms; the tail stayed quiet",
        stopped.elapsed().as_millis()
    );

    pg.start();
    let restarted = Instant::now();
    let items = collect_through(&mut ws, 1, last, TAIL_TIMEOUT, what);
    let (ctrl, events) = split_items(items, what);
    assert!(ctrl.is_empty(), "{what}: control frames {ctrl:?}");
    assert_events(&events, 1, last, &sent, what);
    println!(
        "{what}: all {last} events within {} ms of Postgres starting again",
        restarted.elapsed().as_millis()
    );
    sent.extend(append_range(&server, id, last + 1, last + 1));
    last += 1;
    let items = collect_through(&mut ws, 1, last, TAIL_TIMEOUT, what);
    assert_events(
        &split_items(items, what).1,
        last,
        last,
        &sent,
        &format!("{what}, live"),
    );
    ws.close();
    assert_events(
        &page_all(&server, id, 0, 1000),
        1,
        last,
        &sent,
        "/events after the outage",
    );
    // A page across the seam of Postgres and the local log: contiguous, the same bytes.
    let cursor = local_first.saturating_sub(6);
    let (events, _, _) = events_page(&server, id, cursor, 10);
    let to = (cursor + 10).min(last);
    assert_events(
        &events,
        cursor + 1,
        to,
        &sent,
        "a page across the archive/local seam",
    );
    for event in &events {
        assert_eq!(
            event.text,
            before[event.seq as usize - 1].text,
            "seq {} across the seam differs from the paging before the outage",
            event.seq
        );
    }
}

#[test]
fn archive_keeps_unarchived_events_when_postgres_is_down() {
    if postgres_url().is_none() {
        return;
    }
    let _serial = serial();
    let Some(pg) = PrivatePostgres::init() else {
        return;
    };
    pg.stop();
    // The node starts and takes appends while its archive is down.
    let server = Server::start(retention_opts("ret-unarch").arg("--postgres-url", &pg.url()));
    let id = "ret-unarch";
    let (sent, took) = create_and_fill(&server, id);
    println!("{EVENTS} appends in {} ms", took.as_millis());
    let last = EVENTS;

    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        segments_deleted(&server),
        0,
        "segments with unarchived events were deleted"
    );
    let session = server.session(id);
    assert_eq!(session["last_seq"], last, "{session}");
    assert_eq!(session["archived_seq"], 0, "Postgres is down: {session}");
    assert_events(
        &page_all(&server, id, 0, 1000),
        1,
        last,
        &sent,
        "/events, Postgres down",
    );

    pg.start();
    let pg_log = || format!("--- private postgres log ---\n{}", pg.log_tail(3000));
    wait_archived(
        &server,
        id,
        last,
        ARCHIVE_TIMEOUT + Duration::from_secs(10),
        &pg_log,
    );
    let archived_at = Instant::now();
    let deleted = wait_deletions_settled(&server, id);
    println!(
        "{deleted} segments deleted, settled {} ms after the archive caught up",
        archived_at.elapsed().as_millis()
    );
    let mut client = postgres::Client::connect(&pg.url(), postgres::NoTls)
        .expect("connect to the private postgres");
    assert_eq!(
        event_counts(&mut client, id),
        (last as i64, last as i64, last as i64),
        "rows in Postgres (count, distinct seqs, max seq)"
    );
    assert_events(
        &page_all(&server, id, 0, 1000),
        1,
        last,
        &sent,
        "/events after deletion",
    );
}

#[test]
fn disk_budget_answers_507_and_keeps_reads() {
    let _serial = serial();
    let mut opts = Opts::new("ret-budget")
        .shards(1)
        .arg("--snapshot-log-bytes", &SEGMENT_BYTES.to_string())
        .arg("--max-disk-bytes", &(4 * SEGMENT_BYTES).to_string());
    opts.segment_bytes = SEGMENT_BYTES;
    let server = Server::start(opts);
    let id = "ret-budget";
    server.create_session(id);

    let mut sent = Vec::new();
    let mut full: Option<Resp> = None;
    let started = Instant::now();
    for seq in 1..=3000u64 {
        let payload = payload_text(seq);
        let body = format!(r#"{{"type":"ret","payload":{payload}}}"#);
        let resp = server.post(&format!("/v1/sessions/{id}/append"), &body);
        if resp.status == 201 {
            assert_eq!(resp.json()["seq"], seq, "{}", resp.text());
            sent.push(payload);
            continue;
        }
        full = Some(resp);
        break;
    }
    let full =
        full.unwrap_or_else(|| panic!("3000 appends of ~1 KiB and no 507 with a 4 MiB budget"));
    assert_error(&full, 507, "storage_full");
    let last = sent.len() as u64;
    println!(
        "507 storage_full after {last} appends ({} ms): {}",
        started.elapsed().as_millis(),
        full.text()
    );
    assert!(last > 0, "the very first append was refused");

    // Still full; nothing was applied.
    let again = server.append(id, &json!({"type": "ret", "payload": {"again": true}}));
    assert_error(&again, 507, "storage_full");
    let create = server.post("/v1/sessions", r#"{"id":"ret-budget-2"}"#);
    assert_error(&create, 507, "storage_full");

    // Reads work.
    let session = server.session(id);
    assert_eq!(session["last_seq"], last, "{session}");
    assert_events(
        &page_all(&server, id, 0, 1000),
        1,
        last,
        &sent,
        "/events after 507",
    );
    let mut ws = tail(&server, id, 0, 100);
    let items = collect_through(&mut ws, 100, last, TAIL_TIMEOUT, "tail after 507");
    let (ctrl, events) = split_items(items, "tail after 507");
    assert!(ctrl.is_empty(), "control frames {ctrl:?}");
    assert_events(&events, 1, last, &sent, "tail after 507");
    ws.close();
    let missing = server.get("/v1/sessions/ret-budget-2");
    assert_error(&missing, 404, "session_not_found");
    assert_eq!(segments_deleted(&server), 0, "no retention configured");
}
