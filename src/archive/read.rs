//! Reads of history beyond the local log: events of one session by seq range, rendered
//! as the API's event objects from the stored columns. The JSON columns hold the exact
//! texts the API serves and `render_event` is the same function tails and `/events` use,
//! so the bytes match what the node served before the events left its log.

use std::time::Duration;

use postgres::{Client, NoTls, Statement};
use shards::entry::AppendEntry;
use shards::validate::render_event;

use super::{unix_us_from_system_time, ReadError};

/// The largest range one read may ask for (`/events` pages hold at most 1000 events; a
/// tail reads in pages of its own budget).
pub const READ_LIMIT_MAX: u64 = 10_000;

const SELECT_RANGE: &str = "SELECT seq, inserted_at, type, payload::text, actor, source,
    metadata::text, refs::text, idempotency_key, producer_id, producer_seq, digest
FROM events WHERE session_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq";

/// One archived event: its seq and the event object exactly as the API serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedEvent {
    pub seq: u64,
    pub json: String,
}

/// A blocking reader with its own connection (never the archiver's, so reads do not
/// wait behind batch writes). For a thread that may block; the shards use
/// [`super::ArchiverHandle::read`], served by a reader thread owning one of these.
pub struct ArchiveReader {
    client: Client,
    select_range: Statement,
}

impl ArchiveReader {
    /// Connects and checks that the database is this cluster's archive.
    pub fn connect(
        url: &str,
        cluster_id: &str,
        connect_timeout: Duration,
    ) -> Result<ArchiveReader, ReadError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|error| ReadError::Unavailable(format!("bad postgres url: {error}")))?;
        config.connect_timeout(connect_timeout);
        config.application_name("starcite-archive-reader");
        let mut client = config.connect(NoTls).map_err(unavailable)?;
        let row = client
            .query_opt("SELECT cluster_id FROM starcite_meta", &[])
            .map_err(unavailable)?;
        match row {
            Some(row) if row.get::<_, String>(0) == cluster_id => {}
            Some(row) => {
                let database: String = row.get(0);
                return Err(ReadError::Unavailable(format!(
                    "the archive database belongs to cluster {database:?}, not {cluster_id:?}"
                )));
            }
            None => {
                return Err(ReadError::Unavailable(
                    "archive schema not created yet".into(),
                ))
            }
        }
        let select_range = client.prepare(SELECT_RANGE).map_err(unavailable)?;
        Ok(ArchiveReader {
            client,
            select_range,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The session's archived events with seq in `(after, after + limit]`, in seq order.
    /// Only what Postgres holds: the caller asks for ranges at or below `archived_seq`
    /// and checks that the seqs are `after + 1, after + 2, …`.
    pub fn read_events(
        &mut self,
        session_id: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<ArchivedEvent>, ReadError> {
        assert!(
            limit <= READ_LIMIT_MAX,
            "read limit {limit} above {READ_LIMIT_MAX}"
        );
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Ok(after_i64) = i64::try_from(after) else {
            // Past any seq Postgres can hold: nothing after it.
            return Ok(Vec::new());
        };
        let until = after_i64.saturating_add(limit as i64);
        let rows = self
            .client
            .query(&self.select_range, &[&session_id, &after_i64, &until])
            .map_err(unavailable)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let entry = entry_of_row(session_id, &row).map_err(|detail| {
                tracing::error!(session = %session_id, %detail, "archive: corrupt event row");
                ReadError::Unavailable(format!("corrupt event row of {session_id}: {detail}"))
            })?;
            events.push(ArchivedEvent {
                seq: entry.seq,
                json: render_event(&entry),
            });
        }
        Ok(events)
    }
}

/// Rebuilds the log entry from its row. A row that breaks the schema's invariants (only
/// possible if someone wrote to the table by hand) is refused rather than served.
fn entry_of_row(session_id: &str, row: &postgres::Row) -> Result<AppendEntry, String> {
    let seq: i64 = row.try_get(0).map_err(|e| e.to_string())?;
    let producer_seq: Option<i64> = row.try_get(10).map_err(|e| e.to_string())?;
    let digest: Vec<u8> = row.try_get(11).map_err(|e| e.to_string())?;
    let text = |i: usize| row.try_get::<_, String>(i).map_err(|e| e.to_string());
    let optional = |i: usize| {
        row.try_get::<_, Option<String>>(i)
            .map_err(|e| e.to_string())
    };
    Ok(AppendEntry {
        session_id: session_id.to_owned(),
        seq: u64::try_from(seq).map_err(|_| format!("seq {seq}"))?,
        inserted_at_us: unix_us_from_system_time(row.try_get(1).map_err(|e| e.to_string())?),
        event_type: text(2)?,
        payload: text(3)?,
        actor: optional(4)?,
        source: optional(5)?,
        metadata: text(6)?,
        refs: text(7)?,
        idempotency_key: optional(8)?,
        producer_id: optional(9)?,
        producer_seq: producer_seq
            .map(|value| u64::try_from(value).map_err(|_| format!("producer_seq {value}")))
            .transpose()?,
        digest: digest
            .try_into()
            .map_err(|d: Vec<u8>| format!("digest of {} bytes", d.len()))?,
    })
}

fn unavailable(error: postgres::Error) -> ReadError {
    ReadError::Unavailable(error.to_string())
}
