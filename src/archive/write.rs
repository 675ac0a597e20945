//! Batch writes into Postgres, idempotent: events are inserted with `ON CONFLICT DO
//! NOTHING` on (session_id, seq), session rows are upserted only forward. A batch written
//! twice (a retry after an unknown outcome, a duplicate from a new leader) changes nothing.
//!
//! Two ways to move events, chosen by [`WriteMode`]: binary COPY, or multi-row `INSERT …
//! VALUES`. Both run in the batch's transaction; `examples/archive_throughput.rs`
//! measures them. COPY cannot skip conflicting rows, so it first copies straight into
//! `events` under a savepoint (the common case: none of the rows is there yet) and, if
//! that hits a duplicate key, copies into a temporary staging table and moves the rows
//! with `INSERT … SELECT … ON CONFLICT DO NOTHING`.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::BytesMut;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::error::SqlState;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, Statement, Transaction};
use shards::entry::AppendEntry;

use super::{system_time_from_unix_us, SessionRow, WriteMode};

/// Rows per multi-row INSERT statement: 13 parameters a row stays far below Postgres's
/// 65,535 parameters per statement, and larger statements measured no faster.
pub const INSERT_ROWS_PER_STATEMENT: usize = 500;

const EVENT_COLUMNS: usize = 13;

/// Per-connection staging table for COPY. `ON COMMIT DELETE ROWS` empties it at the end
/// of every batch's transaction (and a rolled-back batch leaves nothing behind either).
const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS starcite_stage_events (
    session_id text, seq bigint, inserted_at timestamptz, type text, payload text,
    actor text, source text, metadata text, refs text, idempotency_key text,
    producer_id text, producer_seq bigint, digest bytea
) ON COMMIT DELETE ROWS";

const COPY_STAGING: &str = "COPY starcite_stage_events FROM STDIN (FORMAT binary)";

const COPY_EVENTS: &str = "COPY events FROM STDIN (FORMAT binary)";

/// The `::json` casts validate the text once and keep it byte for byte.
const INSERT_FROM_STAGING: &str = "INSERT INTO events SELECT session_id, seq, inserted_at,
    type, payload::json, actor, source, metadata::json, refs::json, idempotency_key,
    producer_id, producer_seq, digest FROM starcite_stage_events ON CONFLICT DO NOTHING";

const STAGING_TYPES: [Type; EVENT_COLUMNS] = [
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::BYTEA,
];

/// The column types of `events`, for COPY straight into it.
const EVENTS_TYPES: [Type; EVENT_COLUMNS] = [
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::JSON,
    Type::TEXT,
    Type::TEXT,
    Type::JSON,
    Type::JSON,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::BYTEA,
];

/// Forward-only upsert of the catalog: versioned columns change only when the incoming
/// version is higher (every `SET` expression sees the old row), `archived_seq` only grows.
const UPSERT_SESSIONS: &str = "INSERT INTO sessions
    (id, title, metadata, version, archived, created_at, updated_at, archived_seq)
SELECT id, title, metadata::json, version, archived, created_at, updated_at, archived_seq
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[],
            $6::timestamptz[], $7::timestamptz[], $8::int8[])
    AS u(id, title, metadata, version, archived, created_at, updated_at, archived_seq)
ON CONFLICT (id) DO UPDATE SET
    title = CASE WHEN EXCLUDED.version > sessions.version
                 THEN EXCLUDED.title ELSE sessions.title END,
    metadata = CASE WHEN EXCLUDED.version > sessions.version
                    THEN EXCLUDED.metadata ELSE sessions.metadata END,
    archived = CASE WHEN EXCLUDED.version > sessions.version
                    THEN EXCLUDED.archived ELSE sessions.archived END,
    updated_at = CASE WHEN EXCLUDED.version > sessions.version
                      THEN EXCLUDED.updated_at ELSE sessions.updated_at END,
    version = GREATEST(sessions.version, EXCLUDED.version),
    archived_seq = GREATEST(sessions.archived_seq, EXCLUDED.archived_seq)";

/// What one committed batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Event rows new to Postgres (the rest of the batch was already there).
    pub events_inserted: u64,
    pub session_rows: u64,
}

/// A connection's prepared state for batch writes. Tied to one `Client`: a new
/// connection gets a new `Writer`.
pub struct Writer {
    mode: WriteMode,
    /// The full-size multi-row INSERT, prepared once per connection.
    insert_full: Option<Statement>,
    upsert_sessions: Statement,
}

impl Writer {
    pub fn new(client: &mut Client, mode: WriteMode) -> Result<Writer, postgres::Error> {
        if mode == WriteMode::Copy {
            client.batch_execute(CREATE_STAGING)?;
        }
        let insert_full = match mode {
            WriteMode::Copy => None,
            WriteMode::Insert => Some(client.prepare(&insert_sql(INSERT_ROWS_PER_STATEMENT))?),
        };
        let upsert_sessions = client.prepare(UPSERT_SESSIONS)?;
        Ok(Writer {
            mode,
            insert_full,
            upsert_sessions,
        })
    }

    /// Writes events and session rows in one transaction; returns once Postgres has
    /// committed it (synchronous_commit is on for the archiver's sessions).
    pub fn write(
        &mut self,
        client: &mut Client,
        events: &[&AppendEntry],
        sessions: &[&SessionRow],
    ) -> Result<WriteOutcome, postgres::Error> {
        let mut tx = client.transaction()?;
        let events_inserted = match self.mode {
            WriteMode::Copy => copy_events(&mut tx, events)?,
            WriteMode::Insert => self.insert_events(&mut tx, events)?,
        };
        let session_rows = upsert_sessions(&mut tx, &self.upsert_sessions, sessions)?;
        tx.commit()?;
        Ok(WriteOutcome {
            events_inserted,
            session_rows,
        })
    }

    fn insert_events(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[&AppendEntry],
    ) -> Result<u64, postgres::Error> {
        let full = self.insert_full.as_ref().expect("prepared in Insert mode");
        let mut inserted = 0;
        for chunk in events.chunks(INSERT_ROWS_PER_STATEMENT) {
            let rows: Vec<EventRow<'_>> = chunk.iter().map(|entry| EventRow::of(entry)).collect();
            let params: Vec<&(dyn ToSql + Sync)> = rows.iter().flat_map(EventRow::params).collect();
            assert_eq!(params.len(), chunk.len() * EVENT_COLUMNS);
            inserted += if chunk.len() == INSERT_ROWS_PER_STATEMENT {
                tx.execute(full, &params)?
            } else {
                let statement = tx.prepare(&insert_sql(chunk.len()))?;
                tx.execute(&statement, &params)?
            };
        }
        Ok(inserted)
    }
}

/// `INSERT INTO events VALUES ($1, …, $13), … ON CONFLICT DO NOTHING` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    assert!(rows >= 1 && rows * EVENT_COLUMNS <= u16::MAX as usize);
    let mut sql = String::with_capacity(64 + rows * 120);
    sql.push_str("INSERT INTO events VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        // Parameter types come from the columns (JSON texts bind as `json`).
        sql.push('(');
        for column in 0..EVENT_COLUMNS {
            if column > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("${}", row * EVENT_COLUMNS + column + 1));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

fn copy_events(tx: &mut Transaction<'_>, events: &[&AppendEntry]) -> Result<u64, postgres::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    tx.batch_execute("SAVEPOINT starcite_direct_copy")?;
    match copy_rows(tx, COPY_EVENTS, &EVENTS_TYPES, events) {
        Ok(copied) => {
            tx.batch_execute("RELEASE SAVEPOINT starcite_direct_copy")?;
            Ok(copied)
        }
        Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            // Some rows are there already (a retried or repeated batch).
            tx.batch_execute("ROLLBACK TO SAVEPOINT starcite_direct_copy")?;
            copy_rows(tx, COPY_STAGING, &STAGING_TYPES, events)?;
            tx.execute(INSERT_FROM_STAGING, &[])
        }
        Err(error) => Err(error),
    }
}

/// Binary COPY of `events` with `sql`; returns the rows copied.
fn copy_rows(
    tx: &mut Transaction<'_>,
    sql: &str,
    types: &[Type],
    events: &[&AppendEntry],
) -> Result<u64, postgres::Error> {
    let sink = tx.copy_in(sql)?;
    let mut writer = BinaryCopyInWriter::new(sink, types);
    for entry in events {
        writer.write(&EventRow::of(entry).params())?;
    }
    let copied = writer.finish()?;
    assert_eq!(
        copied,
        events.len() as u64,
        "COPY wrote a different row count"
    );
    Ok(copied)
}

/// JSON text for a `json` (or `text`) parameter: `json`'s binary form is its text, so
/// the bytes arrive unchanged; the server still validates them.
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::TEXT)
    }

    to_sql_checked!();
}

/// The owned conversions of one event's columns (Postgres has no unsigned integers).
struct EventRow<'a> {
    entry: &'a AppendEntry,
    seq: i64,
    inserted_at: SystemTime,
    producer_seq: Option<i64>,
    digest: &'a [u8],
    payload: JsonText<'a>,
    metadata: JsonText<'a>,
    refs: JsonText<'a>,
}

impl<'a> EventRow<'a> {
    fn of(entry: &'a AppendEntry) -> EventRow<'a> {
        EventRow {
            entry,
            seq: to_i64(entry.seq, "seq"),
            inserted_at: system_time_from_unix_us(entry.inserted_at_us),
            producer_seq: entry
                .producer_seq
                .map(|value| to_i64(value, "producer_seq")),
            digest: &entry.digest,
            payload: JsonText(&entry.payload),
            metadata: JsonText(&entry.metadata),
            refs: JsonText(&entry.refs),
        }
    }

    /// The 13 columns in table order.
    fn params(&self) -> [&(dyn ToSql + Sync); EVENT_COLUMNS] {
        let e = self.entry;
        [
            &e.session_id,
            &self.seq,
            &self.inserted_at,
            &e.event_type,
            &self.payload,
            &e.actor,
            &e.source,
            &self.metadata,
            &self.refs,
            &e.idempotency_key,
            &e.producer_id,
            &self.producer_seq,
            &self.digest,
        ]
    }
}

/// One row per session (an upsert may not touch a row twice in one statement): the
/// highest version wins, `archived_seq` is the largest seen.
fn merge_sessions<'a>(sessions: &[&'a SessionRow]) -> Vec<SessionRow> {
    let mut by_id: HashMap<&'a str, SessionRow> = HashMap::with_capacity(sessions.len());
    for row in sessions {
        match by_id.get_mut(row.id.as_str()) {
            None => {
                by_id.insert(row.id.as_str(), (*row).clone());
            }
            Some(kept) => {
                let archived_seq = kept.archived_seq.max(row.archived_seq);
                if row.version > kept.version {
                    *kept = (*row).clone();
                }
                kept.archived_seq = archived_seq;
            }
        }
    }
    by_id.into_values().collect()
}

fn upsert_sessions(
    tx: &mut Transaction<'_>,
    statement: &Statement,
    sessions: &[&SessionRow],
) -> Result<u64, postgres::Error> {
    if sessions.is_empty() {
        return Ok(0);
    }
    let rows = merge_sessions(sessions);
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let titles: Vec<Option<&str>> = rows.iter().map(|r| r.title.as_deref()).collect();
    let metadata: Vec<&str> = rows.iter().map(|r| r.metadata.as_str()).collect();
    let versions: Vec<i64> = rows.iter().map(|r| to_i64(r.version, "version")).collect();
    let archived: Vec<bool> = rows.iter().map(|r| r.archived).collect();
    let created: Vec<SystemTime> = rows
        .iter()
        .map(|r| system_time_from_unix_us(r.created_at_us))
        .collect();
    let updated: Vec<SystemTime> = rows
        .iter()
        .map(|r| system_time_from_unix_us(r.updated_at_us))
        .collect();
    let archived_seqs: Vec<i64> = rows
        .iter()
        .map(|r| to_i64(r.archived_seq, "archived_seq"))
        .collect();
    tx.execute(
        statement,
        &[
            &ids,
            &titles,
            &metadata,
            &versions,
            &archived,
            &created,
            &updated,
            &archived_seqs,
        ],
    )
}

/// Seqs and versions are u64 in Starcite and bigint in Postgres; values past i64::MAX
/// cannot be produced (one append per microsecond would take 290,000 years).
fn to_i64(value: u64, what: &str) -> i64 {
    i64::try_from(value).unwrap_or_else(|_| panic!("{what} {value} exceeds bigint"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, version: u64, archived_seq: u64) -> SessionRow {
        SessionRow {
            id: id.into(),
            title: Some(format!("v{version}")),
            metadata: "{}".into(),
            version,
            archived: false,
            created_at_us: 1,
            updated_at_us: version as i64,
            archived_seq,
        }
    }

    #[test]
    fn merged_session_rows_keep_the_highest_version_and_the_largest_archived_seq() {
        let rows = [
            row("a", 2, 9),
            row("a", 5, 3),
            row("b", 1, 0),
            row("a", 4, 7),
        ];
        let refs: Vec<&SessionRow> = rows.iter().collect();
        let mut merged = merge_sessions(&refs);
        merged.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(
            merged,
            vec![
                SessionRow {
                    archived_seq: 9,
                    ..row("a", 5, 3)
                },
                row("b", 1, 0)
            ]
        );
    }

    #[test]
    fn multi_row_insert_numbers_thirteen_parameters_per_row() {
        let sql = insert_sql(2);
        assert!(
            sql.starts_with("INSERT INTO events VALUES ($1,$2,"),
            "{sql}"
        );
        assert!(sql.contains("$13),($14,"), "{sql}");
        assert!(sql.ends_with("$26) ON CONFLICT DO NOTHING"), "{sql}");
        let full = insert_sql(INSERT_ROWS_PER_STATEMENT);
        assert_eq!(
            full.matches('$').count(),
            INSERT_ROWS_PER_STATEMENT * EVENT_COLUMNS
        );
    }
}
