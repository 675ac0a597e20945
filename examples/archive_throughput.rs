//! Archive throughput: events/s that `starcite::archive` writes into Postgres, for binary
//! COPY and for multi-row INSERT (issue 4, "Measure and report").
//!
//! ```text
//! source scripts/test-postgres.sh start
//! cargo run --release --example archive_throughput -- --events 200000 --runs 3
//! ```
//!
//! Each run uses a fresh database, feeds pre-built events with 1 KiB payloads through
//! the shard channels exactly as shards would (`try_send`, retry when full) and stops
//! the clock when the archiver has reported every event durable. Modes alternate run by
//! run; the median per mode is printed.
//!
//! With `--rate R` the events are instead offered open-loop at R events/s (each stamped
//! with its due time as `inserted_at`), and the archive lag of every event (the time its
//! durable report arrived minus its due time) is summarised:
//!
//! ```text
//! cargo run --release --example archive_throughput -- --mode copy --rate 10000 --events 100000
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use crossbeam_channel::unbounded;
use postgres::{Client, NoTls};
use shards::entry::AppendEntry;
use starcite::archive::{ArchiveBatch, ArchiveConfig, Archiver, WriteMode};

#[derive(Parser, Debug)]
struct Args {
    /// Admin URL of the server; a database per run is created next to it.
    #[arg(long, env = "STARCITE_TEST_POSTGRES_URL")]
    url: String,
    /// copy, insert or both.
    #[arg(long, default_value = "both")]
    mode: String,
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Sessions the events are spread over (round robin).
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Shard channels feeding the archiver.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Events per message a shard sends.
    #[arg(long, default_value_t = 256)]
    shard_batch_events: usize,
    /// The archiver's transaction size (events).
    #[arg(long, default_value_t = 5_000)]
    batch_max_events: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Offer events open-loop at this rate (events/s) and report the archive lag.
    #[arg(long)]
    rate: Option<f64>,
}

fn main() {
    let args = Args::parse();
    let modes: Vec<WriteMode> = match args.mode.as_str() {
        "copy" => vec![WriteMode::Copy],
        "insert" => vec![WriteMode::Insert],
        "both" => vec![WriteMode::Copy, WriteMode::Insert],
        other => panic!("--mode copy|insert|both, not {other}"),
    };
    let events = build_events(&args);
    println!(
        "{} events, {} B payloads, {} sessions, {} shards x {} events/message, transactions of {} events",
        args.events, args.payload_bytes, args.sessions, args.shards, args.shard_batch_events,
        args.batch_max_events
    );
    let mut results: Vec<(WriteMode, Vec<f64>)> = modes.iter().map(|m| (*m, Vec::new())).collect();
    for run in 0..args.runs {
        for (mode, rates) in results.iter_mut() {
            if let Some(offered) = args.rate {
                let lag_ms = run_paced(&args, *mode, &events, offered);
                println!(
                    "run {run} {mode:?} at {offered:.0}/s: archive lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    lag_ms[lag_ms.len() / 2],
                    lag_ms[lag_ms.len() * 99 / 100],
                    lag_ms[lag_ms.len() - 1]
                );
                continue;
            }
            let rate = run_once(&args, *mode, &events);
            println!("run {run} {mode:?}: {rate:.0} events/s");
            rates.push(rate);
        }
    }
    for (mode, mut rates) in results {
        if rates.is_empty() {
            continue;
        }
        rates.sort_by(f64::total_cmp);
        println!("median {mode:?}: {:.0} events/s", rates[rates.len() / 2]);
    }
}

fn build_events(args: &Args) -> Vec<AppendEntry> {
    let filler: String = "abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(args.payload_bytes)
        .collect();
    let mut next_seq = vec![0u64; args.sessions];
    (0..args.events)
        .map(|i| {
            let session = i % args.sessions;
            next_seq[session] += 1;
            // {"i":N,"text":"…"} trimmed to payload_bytes in all.
            let head = format!(r#"{{"i":{i},"text":""#);
            let body_len = args.payload_bytes.saturating_sub(head.len() + 2);
            AppendEntry {
                session_id: format!("ses_bench_{session:06}"),
                seq: next_seq[session],
                inserted_at_us: 1_795_756_801_000_000 + i as i64,
                event_type: "message".into(),
                payload: format!("{head}{}\"}}", &filler[..body_len]),
                actor: Some("agent:bench".into()),
                source: None,
                metadata: "{}".into(),
                refs: "{}".into(),
                idempotency_key: Some(format!("key-{i}")),
                producer_id: None,
                producer_seq: None,
                digest: [7; 16],
            }
        })
        .collect()
}

/// A fresh database next to `--url`: (admin client, its name, its url).
fn fresh_database(args: &Args) -> (Client, String, String) {
    let database = format!("starcite_bench_{}", std::process::id());
    let mut admin = Client::connect(&args.url, NoTls).expect("connect");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .unwrap();
    let url = format!(
        "{}/{database}",
        &args.url[..args.url.rfind('/').expect("url with a path")]
    );
    (admin, database, url)
}

/// One timed run into a fresh database; returns events/s.
fn run_once(args: &Args, mode: WriteMode, events: &[AppendEntry]) -> f64 {
    let (mut admin, database, url) = fresh_database(args);
    let mut config = ArchiveConfig::new(url, "bench", args.shards);
    config.write_mode = mode;
    config.batch_max_events = args.batch_max_events;
    let (durable_tx, durable_rx) = unbounded();
    let handle =
        Archiver::start(config, Box::new(move |d| drop(durable_tx.send(d)))).expect("start");

    let started = Instant::now();
    std::thread::scope(|scope| {
        let chunks: Vec<&[AppendEntry]> = events.chunks(args.shard_batch_events).collect();
        for shard in 0..args.shards {
            let sender = handle.shard_sender(shard);
            let mine: Vec<&[AppendEntry]> = chunks
                .iter()
                .skip(shard)
                .step_by(args.shards)
                .copied()
                .collect();
            scope.spawn(move || {
                for chunk in mine {
                    let mut batch = ArchiveBatch {
                        events: chunk.to_vec(),
                        sessions: vec![],
                    };
                    while let Err(full) = sender.try_send(batch) {
                        batch = full.into_inner();
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            });
        }
        let mut durable_events = 0;
        while durable_events < events.len() as u64 {
            durable_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("durable report");
            durable_events = handle
                .stats()
                .events_written
                .load(std::sync::atomic::Ordering::Relaxed);
        }
    });
    let elapsed = started.elapsed();
    let inserted = handle
        .stats()
        .events_inserted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(inserted, events.len() as u64, "every event inserted once");
    handle.shutdown();
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .unwrap();
    events.len() as f64 / elapsed.as_secs_f64()
}

fn unix_us_now() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_micros() as i64
}

/// One open-loop run at `rate` events/s; returns every event's archive lag in ms, sorted.
/// Event `i` is due at `start + i / rate`; lag counts from the due time, so a producer
/// that falls behind does not hide it (no coordinated omission).
fn run_paced(args: &Args, mode: WriteMode, events: &[AppendEntry], rate: f64) -> Vec<f64> {
    let (mut admin, database, url) = fresh_database(args);
    let mut config = ArchiveConfig::new(url, "bench", args.shards);
    config.write_mode = mode;
    config.batch_max_events = args.batch_max_events;
    let (durable_tx, durable_rx) = unbounded();
    let handle =
        Archiver::start(config, Box::new(move |d| drop(durable_tx.send(d)))).expect("start");
    let start_us = unix_us_now() + 100_000;
    let due_us = move |i: usize| start_us + (i as f64 * 1e6 / rate) as i64;
    let sessions = args.sessions;
    let mut lags_ms = Vec::with_capacity(events.len());
    std::thread::scope(|scope| {
        let senders: Vec<_> = (0..args.shards)
            .map(|shard| handle.shard_sender(shard))
            .collect();
        scope.spawn(move || {
            let mut next = 0;
            let mut backlog: Vec<Vec<AppendEntry>> = vec![Vec::new(); senders.len()];
            while next < events.len() || backlog.iter().any(|b| !b.is_empty()) {
                let now = unix_us_now();
                while next < events.len() && due_us(next) <= now {
                    let mut entry = events[next].clone();
                    entry.inserted_at_us = due_us(next);
                    backlog[(next % sessions) % senders.len()].push(entry);
                    next += 1;
                }
                for (shard, pending) in backlog.iter_mut().enumerate() {
                    if !pending.is_empty() {
                        let events = std::mem::take(pending);
                        let batch = ArchiveBatch {
                            events,
                            sessions: vec![],
                        };
                        if let Err(full) = senders[shard].try_send(batch) {
                            *pending = full.into_inner().events;
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        let mut reported = vec![0u64; sessions];
        while lags_ms.len() < events.len() {
            let durable = durable_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("durable report");
            let now = unix_us_now();
            for (session_id, seq_max) in durable.sessions {
                let session: usize = session_id["ses_bench_".len()..].parse().unwrap();
                for seq in reported[session] + 1..=seq_max {
                    let i = (seq as usize - 1) * sessions + session;
                    lags_ms.push((now - due_us(i)) as f64 / 1000.0);
                }
                reported[session] = reported[session].max(seq_max);
            }
        }
    });
    handle.shutdown();
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .unwrap();
    lags_ms.sort_by(f64::total_cmp);
    lags_ms
}
