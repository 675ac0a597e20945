//! The Postgres archive (`starcite::archive`) against a real Postgres (issue 4).
//!
//! Needs `STARCITE_TEST_POSTGRES_URL` (`source scripts/test-postgres.sh start` sets it).
//! Without it the tests fail when `CI` or `STARCITE_CI_POSTGRES=1` is set, and otherwise
//! print a notice and pass. Every test works in a database of its own, so they run in
//! parallel; the restart test runs a private Postgres server of its own.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::postgres::{postgres_url, PrivatePostgres, TestDb};
use crossbeam_channel::{unbounded, Receiver};
use postgres::{Client, NoTls};
use shards::entry::AppendEntry;
use shards::validate::{render_event, validate_append};
use starcite::archive::{
    schema, ArchiveBatch, ArchiveConfig, Archiver, ArchiverHandle, Durable, ReadError, SchemaError,
    SessionRow, StartError, WriteMode, SCHEMA_VERSION,
};

const DURABLE_TIMEOUT: Duration = Duration::from_secs(20);
const BOTH_MODES: [WriteMode; 2] = [WriteMode::Copy, WriteMode::Insert];

// ---------------------------------------------------------------------------------
// Harness (Postgres itself: tests/common/postgres.rs)
// ---------------------------------------------------------------------------------

fn config(url: &str, mode: WriteMode) -> ArchiveConfig {
    let mut config = ArchiveConfig::new(url, "cluster-test", 2);
    config.write_mode = mode;
    config.batch_max_delay = Duration::from_millis(2);
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(500);
    config
}

fn start(config: ArchiveConfig) -> (ArchiverHandle, Receiver<Durable>) {
    let (durable_tx, durable_rx) = unbounded();
    let handle = Archiver::start(
        config,
        Box::new(move |durable| {
            let _ = durable_tx.send(durable);
        }),
    )
    .expect("archiver starts");
    (handle, durable_rx)
}

/// Sends a batch on `shard`'s channel (retrying while full, as a shard would).
fn send(handle: &ArchiverHandle, shard: usize, batch: ArchiveBatch) {
    let sender = handle.shard_sender(shard);
    let mut batch = batch;
    let deadline = Instant::now() + DURABLE_TIMEOUT;
    loop {
        match sender.try_send(batch) {
            Ok(()) => return,
            Err(error) => {
                assert!(Instant::now() < deadline, "shard channel stayed full");
                batch = error.into_inner();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Waits until `session` is reported durable through `seq` (reports may be split).
fn wait_durable(durable: &Receiver<Durable>, session: &str, seq: u64) {
    let deadline = Instant::now() + DURABLE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let report = durable
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{session} not durable through {seq} in time"));
        if report
            .sessions
            .iter()
            .any(|(id, max)| id == session && *max >= seq)
        {
            return;
        }
    }
}

fn entry_from_body(session: &str, seq: u64, body: &str) -> AppendEntry {
    let event = validate_append(body.as_bytes()).expect("valid append body");
    AppendEntry {
        session_id: session.to_owned(),
        seq,
        // 2026-11-27T05:20:01.123456Z plus seq ms: microseconds must survive.
        inserted_at_us: 1_795_756_801_123_456 + seq as i64 * 1_000 + 1,
        event_type: event.event_type,
        payload: event.payload,
        actor: event.actor,
        source: event.source,
        metadata: event.metadata,
        refs: event.refs,
        idempotency_key: event.idempotency_key,
        producer_id: event.producer.as_ref().map(|(id, _)| id.clone()),
        producer_seq: event.producer.map(|(_, seq)| seq),
        digest: event.digest,
    }
}

fn plain_entry(session: &str, seq: u64) -> AppendEntry {
    entry_from_body(
        session,
        seq,
        &format!(r#"{{"type":"msg","payload":{{"n":{seq}}}}}"#),
    )
}

fn count_events(client: &mut Client, session: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM events WHERE session_id = $1",
            &[&session],
        )
        .expect("count")
        .get(0)
}

fn session_row(id: &str, version: u64, title: &str, archived_seq: u64) -> SessionRow {
    SessionRow {
        id: id.to_owned(),
        title: Some(title.to_owned()),
        metadata: format!(r#"{{"v":{version}}}"#),
        version,
        archived: version.is_multiple_of(2),
        created_at_us: 1_795_756_801_000_001,
        updated_at_us: 1_795_756_801_000_001 + version as i64,
        archived_seq,
    }
}

// ---------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------

#[test]
fn migrations_are_idempotent_and_record_version_and_cluster() {
    let Some(admin) = postgres_url() else { return };
    let db = TestDb::create(&admin, "migrate");
    let mut client = db.client();
    assert_eq!(
        schema::migrate(&mut client, "cluster-test").unwrap(),
        SCHEMA_VERSION
    );
    assert_eq!(
        schema::migrate(&mut client, "cluster-test").unwrap(),
        SCHEMA_VERSION
    );
    let row = client
        .query_one(
            "SELECT cluster_id, schema_version, count(*) OVER () FROM starcite_meta",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cluster-test");
    assert_eq!(row.get::<_, i32>(1), SCHEMA_VERSION);
    assert_eq!(row.get::<_, i64>(2), 1, "one meta row");
    // The archiver migrates on every connect: starting twice is just as harmless.
    for _ in 0..2 {
        let (handle, _durable) = start(config(&db.url, WriteMode::Copy));
        handle.shutdown();
    }
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('events', 'sessions', 'starcite_meta')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 3);
}

#[test]
fn a_database_of_another_cluster_is_refused() {
    let Some(admin) = postgres_url() else { return };
    let db = TestDb::create(&admin, "foreign");
    schema::migrate(&mut db.client(), "cluster-a").unwrap();
    let config = ArchiveConfig::new(&db.url, "cluster-b", 1);
    match Archiver::start(config, Box::new(|_| {})) {
        Err(StartError::Refused(SchemaError::ForeignCluster { database, ours })) => {
            assert_eq!(
                (database.as_str(), ours.as_str()),
                ("cluster-a", "cluster-b")
            );
        }
        Err(other) => panic!("expected a foreign-cluster refusal, got {other}"),
        Ok(_) => panic!("another cluster's database was accepted"),
    }
    let error = schema::migrate(&mut db.client(), "cluster-b").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("belongs to cluster \"cluster-a\""),
        "{error}"
    );
}

#[test]
fn a_schema_newer_than_the_binary_is_refused() {
    let Some(admin) = postgres_url() else { return };
    let db = TestDb::create(&admin, "too_new");
    let mut client = db.client();
    schema::migrate(&mut client, "cluster-test").unwrap();
    client
        .execute("UPDATE starcite_meta SET schema_version = 999", &[])
        .unwrap();
    match schema::migrate(&mut client, "cluster-test") {
        Err(SchemaError::SchemaTooNew {
            database: 999,
            ours,
        }) => assert_eq!(ours, SCHEMA_VERSION),
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------

#[test]
fn a_batch_written_twice_changes_nothing() {
    let Some(admin) = postgres_url() else { return };
    for mode in BOTH_MODES {
        let db = TestDb::create(&admin, "twice");
        let (handle, durable) = start(config(&db.url, mode));
        // 1200 events: more than one multi-row INSERT statement.
        let events: Vec<AppendEntry> = (1..=1200)
            .map(|seq| plain_entry("ses_twice", seq))
            .collect();
        let batch = ArchiveBatch {
            events: events.clone(),
            sessions: vec![session_row("ses_twice", 1, "t", 0)],
        };
        send(&handle, 0, batch.clone());
        wait_durable(&durable, "ses_twice", 1200);
        let mut client = db.client();
        let before: Vec<String> = dump_events(&mut client);
        // The same batch again, and an overlapping one with a duplicate inside it.
        send(&handle, 0, batch);
        wait_durable(&durable, "ses_twice", 1200);
        let mut overlapping = events[1100..].to_vec();
        overlapping.push(events[1199].clone());
        send(
            &handle,
            1,
            ArchiveBatch {
                events: overlapping,
                sessions: vec![],
            },
        );
        wait_durable(&durable, "ses_twice", 1200);
        assert_eq!(count_events(&mut client, "ses_twice"), 1200, "{mode:?}");
        assert_eq!(dump_events(&mut client), before, "{mode:?}: rows changed");
        let stats = handle.stats();
        assert_eq!(
            stats.events_inserted.load(Ordering::Relaxed),
            1200,
            "{mode:?}"
        );
        assert_eq!(
            stats.events_written.load(Ordering::Relaxed),
            1200 * 2 + 101,
            "{mode:?}"
        );
        handle.shutdown();
    }
}

fn dump_events(client: &mut Client) -> Vec<String> {
    client
        .query("SELECT e::text FROM events e ORDER BY session_id, seq", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn stored_text_equals_rendered_text_byte_for_byte() {
    let Some(admin) = postgres_url() else { return };
    let bodies = [
        r#"{"type":"num","payload":1E2}"#,
        r#"{"type":"num","payload":[1e-7,-0.0,0,12345678901234567890123456789,1.50]}"#,
        r#"{"type":"esc","payload":{"s":"\u00e9\ud83d\ude00 \"q\" \\ \n\t\u0000","raw":"é😀"}}"#,
        r#"{"type":"order","payload":{"z":1,"a":{"y":[],"b":{}}},"metadata":{"k":"v","a":1E+2}}"#,
        r#"{"type":"all","payload":"text","actor":"agent:é","source":"src","refs":{"parent":7},
            "idempotency_key":"key-1","producer_id":"p","producer_seq":3}"#,
        r#"{"type":"ws","payload" : { "spaced" : [ 1 , 2 ] } }"#,
    ];
    for mode in BOTH_MODES {
        let db = TestDb::create(&admin, "bytes");
        let (handle, durable) = start(config(&db.url, mode));
        let entries: Vec<AppendEntry> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| entry_from_body("ses_bytes", i as u64 + 1, body))
            .collect();
        send(
            &handle,
            0,
            ArchiveBatch {
                events: entries.clone(),
                sessions: vec![],
            },
        );
        wait_durable(&durable, "ses_bytes", entries.len() as u64);
        let read = handle.read_blocking("ses_bytes", 0, 100).expect("read");
        assert_eq!(read.len(), entries.len());
        let mut client = db.client();
        for (entry, archived) in entries.iter().zip(&read) {
            assert_eq!(archived.seq, entry.seq);
            assert_eq!(
                archived.json,
                render_event(entry),
                "{mode:?} seq {}",
                entry.seq
            );
            let row = client
                .query_one(
                    "SELECT payload::text, metadata::text, refs::text, to_char(inserted_at \
                     AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
                     FROM events WHERE session_id = $1 AND seq = $2",
                    &[&"ses_bytes", &(entry.seq as i64)],
                )
                .unwrap();
            assert_eq!(row.get::<_, String>(0), entry.payload);
            assert_eq!(row.get::<_, String>(1), entry.metadata);
            assert_eq!(row.get::<_, String>(2), entry.refs);
            assert_eq!(
                row.get::<_, String>(3),
                shards::time::format_rfc3339_us(entry.inserted_at_us),
                "microseconds kept"
            );
        }
        // The API's own rendering keeps numbers as written.
        assert!(
            read[0].json.contains(r#""payload":1E2"#),
            "{}",
            read[0].json
        );
        handle.shutdown();
    }
}

#[test]
fn session_catalog_moves_only_forward() {
    let Some(admin) = postgres_url() else { return };
    for mode in BOTH_MODES {
        let db = TestDb::create(&admin, "catalog");
        let (handle, durable) = start(config(&db.url, mode));
        let mut client = db.client();
        let read_row = |client: &mut Client| -> (Option<String>, String, i64, bool, i64) {
            let row = client
                .query_one(
                    "SELECT title, metadata::text, version, archived, archived_seq \
                     FROM sessions WHERE id = 'ses_cat'",
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
        };
        let marker = |n| ArchiveBatch {
            events: vec![plain_entry("marker", n)],
            sessions: vec![],
        };
        // Version 3 first.
        send(
            &handle,
            0,
            ArchiveBatch {
                sessions: vec![session_row("ses_cat", 3, "three", 5)],
                ..marker(1)
            },
        );
        wait_durable(&durable, "marker", 1);
        let v3 = read_row(&mut client);
        assert_eq!(v3, (Some("three".into()), r#"{"v":3}"#.into(), 3, false, 5));
        // A late version 2 (a deposed leader) with a larger archived_seq: only
        // archived_seq moves.
        send(
            &handle,
            0,
            ArchiveBatch {
                sessions: vec![session_row("ses_cat", 2, "two", 9)],
                ..marker(2)
            },
        );
        wait_durable(&durable, "marker", 2);
        assert_eq!(
            read_row(&mut client),
            (Some("three".into()), r#"{"v":3}"#.into(), 3, false, 9)
        );
        // Version 4 with a smaller archived_seq: the catalog moves, archived_seq stays.
        send(
            &handle,
            0,
            ArchiveBatch {
                sessions: vec![session_row("ses_cat", 4, "four", 7)],
                ..marker(3)
            },
        );
        wait_durable(&durable, "marker", 3);
        assert_eq!(
            read_row(&mut client),
            (Some("four".into()), r#"{"v":4}"#.into(), 4, true, 9)
        );
        // Several rows of one session in one batch: the highest version, largest seq.
        let rows = vec![
            session_row("ses_cat", 6, "six", 10),
            session_row("ses_cat", 5, "five", 12),
            session_row("ses_cat", 4, "four", 11),
        ];
        send(
            &handle,
            0,
            ArchiveBatch {
                sessions: rows,
                ..marker(4)
            },
        );
        wait_durable(&durable, "marker", 4);
        assert_eq!(
            read_row(&mut client),
            (Some("six".into()), r#"{"v":6}"#.into(), 6, true, 12)
        );
        handle.shutdown();
    }
}

// ---------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------

#[test]
fn read_range_returns_seqs_after_cursor_up_to_limit() {
    let Some(admin) = postgres_url() else { return };
    let db = TestDb::create(&admin, "read");
    let (handle, durable) = start(config(&db.url, WriteMode::Copy));
    let events: Vec<AppendEntry> = (1..=20)
        .map(|seq| plain_entry("ses_read", seq))
        .chain((1..=5).map(|seq| plain_entry("ses_other", seq)))
        .collect();
    send(
        &handle,
        0,
        ArchiveBatch {
            events: events.clone(),
            sessions: vec![],
        },
    );
    wait_durable(&durable, "ses_read", 20);
    let seqs = |after, limit| -> Vec<u64> {
        let read = handle
            .read_blocking("ses_read", after, limit)
            .expect("read");
        for archived in &read {
            assert_eq!(
                archived.json,
                render_event(&events[archived.seq as usize - 1])
            );
        }
        read.iter().map(|archived| archived.seq).collect()
    };
    assert_eq!(seqs(5, 10), (6..=15).collect::<Vec<_>>());
    assert_eq!(seqs(0, 1), vec![1]);
    assert_eq!(seqs(18, 10), vec![19, 20]);
    assert_eq!(seqs(20, 10), Vec::<u64>::new());
    assert_eq!(seqs(u64::MAX - 1, 10), Vec::<u64>::new());
    assert!(handle
        .read_blocking("ses_unknown", 0, 10)
        .unwrap()
        .is_empty());
    handle.shutdown();
}

// ---------------------------------------------------------------------------------
// Postgres down and back
// ---------------------------------------------------------------------------------

#[test]
fn archiver_reconnects_after_postgres_restart_and_loses_no_batch() {
    // The URL is not used (a private server is), but its absence decides skip or fail.
    if postgres_url().is_none() {
        return;
    }
    let Some(server) = PrivatePostgres::init() else {
        return;
    };
    let (handle, durable) = start(config(&server.url(), WriteMode::Copy));
    send(
        &handle,
        0,
        ArchiveBatch {
            events: (1..=100).map(|s| plain_entry("ses_rs", s)).collect(),
            sessions: vec![],
        },
    );
    wait_durable(&durable, "ses_rs", 100);

    server.stop();
    // Appends go on while Postgres is down: batches queue, nothing is reported durable,
    // reads fail at once with "unavailable".
    send(
        &handle,
        0,
        ArchiveBatch {
            events: (101..=200).map(|s| plain_entry("ses_rs", s)).collect(),
            sessions: vec![],
        },
    );
    send(
        &handle,
        1,
        ArchiveBatch {
            events: (201..=300).map(|s| plain_entry("ses_rs", s)).collect(),
            sessions: vec![],
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        durable.try_recv().is_err(),
        "reported durable while Postgres was down"
    );
    let stats = handle.stats().clone();
    assert!(
        stats.retries.load(Ordering::Relaxed) >= 2,
        "no retries counted"
    );
    assert!(!stats.connected.load(Ordering::Relaxed));
    assert!(stats.last_error().is_some());
    assert!(stats.pending_events.load(Ordering::Relaxed) >= 100);
    match handle.read_blocking("ses_rs", 0, 10) {
        Err(ReadError::Unavailable(_)) => {}
        other => panic!("read while down: {other:?}"),
    }

    server.start();
    wait_durable(&durable, "ses_rs", 300);
    let mut client = Client::connect(&server.url(), NoTls).unwrap();
    assert_eq!(count_events(&mut client, "ses_rs"), 300);
    let seqs: Vec<i64> = client
        .query(
            "SELECT seq FROM events WHERE session_id = 'ses_rs' ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<i64>>(), "gap or duplicate");
    assert_eq!(
        handle.read_blocking("ses_rs", 295, 10).unwrap().len(),
        5,
        "reader reconnected"
    );
    assert!(stats.connects.load(Ordering::Relaxed) >= 2);
    handle.shutdown();
}
