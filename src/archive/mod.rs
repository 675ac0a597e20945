//! The Postgres archive: committed events and the session catalog, streamed to Postgres
//! by a dedicated OS thread. The shards' side (who sends what, and progress) is
//! `crate::shard::archive`.
//!
//! The `postgres` crate runs a tokio runtime inside each `Client`; all of that stays on
//! the archiver's own threads, never on a glommio executor. Shards talk to it only by
//! message:
//!
//! - each shard owns a bounded `crossbeam_channel::Sender<ArchiveBatch>`
//!   ([`ArchiverHandle::shard_sender`]) and only ever `try_send`s: a full channel means
//!   "try again later" (the shard re-reads the events from its log), never a block;
//! - after Postgres commits a batch, the archiver calls `on_durable` once per shard that
//!   contributed, with the highest seq written per session ([`Durable`]);
//! - reads of old ranges go to a reader thread with its own connection
//!   ([`ArchiverHandle::read`]) so that they never wait behind batch writes.
//!
//! Writes are idempotent (see [`write`]), so after a connection breaks the archiver
//! reconnects with exponential backoff and writes the same batch again; a batch is
//! never dropped while the archiver runs. The schema is created or upgraded on every
//! connect ([`schema::migrate`]); a database of another cluster is refused.

pub mod read;
pub mod schema;
mod worker;
pub mod write;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Sender, TrySendError};
use shards::entry::AppendEntry;

pub use read::{ArchiveReader, ArchivedEvent, READ_LIMIT_MAX};
pub use schema::{SchemaError, SCHEMA_VERSION};
pub use write::WriteOutcome;

/// How event rows travel to Postgres. Both are idempotent; see `docs/deployment.md`
/// ("Postgres archive") for the measured throughput that picked the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Binary COPY straight into `events` under a savepoint; when a row is already
    /// there, COPY into a temporary staging table and `INSERT … SELECT … ON CONFLICT DO
    /// NOTHING` instead (see [`write`]).
    Copy,
    /// Multi-row `INSERT … VALUES … ON CONFLICT DO NOTHING`.
    Insert,
}

#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    /// A libpq-style URL or key=value string, e.g. `postgres://user@host:5432/db`.
    pub url: String,
    /// Written into the database on first use; another cluster's database is refused.
    pub cluster_id: String,
    /// One channel per shard.
    pub shards: usize,
    /// Batches each shard's channel holds before `try_send` reports it full (a shard
    /// sends at most one per Raft tick, of at most 5,000 events / 8 MiB: this bounds
    /// what waits for Postgres in memory; the rest waits in the log).
    pub shard_channel_batches_max: usize,
    /// A Postgres transaction closes once it holds this many events (it may exceed it
    /// by the size of the last shard batch taken)…
    pub batch_max_events: usize,
    /// …or this long after its first event arrived, whichever comes first.
    pub batch_max_delay: Duration,
    pub write_mode: WriteMode,
    /// Reconnect backoff: starts at `backoff_min`, doubles per failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Read requests queued for the reader thread before `read` reports overload.
    pub read_queue_max: usize,
}

impl ArchiveConfig {
    /// Defaults chosen from `examples/archive_throughput.rs` runs (docs/deployment.md).
    pub fn new(url: impl Into<String>, cluster_id: impl Into<String>, shards: usize) -> Self {
        ArchiveConfig {
            url: url.into(),
            cluster_id: cluster_id.into(),
            shards,
            shard_channel_batches_max: 16,
            batch_max_events: 5_000,
            batch_max_delay: Duration::from_millis(10),
            write_mode: WriteMode::Copy,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            read_queue_max: 1024,
        }
    }
}

/// What a shard hands to the archiver: committed events (as in its log; each session's
/// seqs in ascending order, with no gap after what it sent before) and catalog rows.
#[derive(Debug, Clone, Default)]
pub struct ArchiveBatch {
    pub events: Vec<AppendEntry>,
    pub sessions: Vec<SessionRow>,
}

/// A session's catalog row as of some committed version. JSON texts as the API serves
/// them; timestamps in microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub id: String,
    pub title: Option<String>,
    /// Compact JSON object text.
    pub metadata: String,
    pub version: u64,
    pub archived: bool,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub archived_seq: u64,
}

/// Reported after Postgres committed a batch: for the shard that sent them, the highest
/// seq of each session whose events were in the batch. With the ordering rule of
/// [`ArchiveBatch`] every seq up to it is in Postgres too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    pub shard: usize,
    pub sessions: Vec<(String, u64)>,
    /// Catalog rows of this shard that the batch upserted.
    pub session_rows: usize,
}

/// Callback for [`Durable`] reports; runs on the archiver thread, so it must be quick
/// (e.g. a `try_send` to the shard).
pub type OnDurable = Box<dyn FnMut(Durable) + Send>;

#[derive(Debug)]
pub enum StartError {
    InvalidUrl(String),
    /// Postgres answered and this database cannot be ours (other cluster, newer schema).
    Refused(SchemaError),
    Spawn(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::InvalidUrl(detail) => write!(f, "invalid postgres url: {detail}"),
            StartError::Refused(error) => write!(f, "{error}"),
            StartError::Spawn(error) => write!(f, "cannot start the archiver thread: {error}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Why a read of the archive gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Postgres unreachable or failing (API.md: 503 `archive_unavailable`).
    Unavailable(String),
    /// The reader's queue is full; try again later.
    Overloaded,
    /// The archiver is shutting down.
    Stopped,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Unavailable(detail) => write!(f, "archive unavailable: {detail}"),
            ReadError::Overloaded => write!(f, "archive read queue full"),
            ReadError::Stopped => write!(f, "archive stopped"),
        }
    }
}

impl std::error::Error for ReadError {}

pub type ReadReply = Box<dyn FnOnce(Result<Vec<ArchivedEvent>, ReadError>) + Send>;

/// A read for the reader thread; `reply` runs on that thread.
pub struct ReadRequest {
    pub session_id: String,
    pub after: u64,
    pub limit: u64,
    pub reply: ReadReply,
}

/// Counters for `/metrics` and `/health/ready`, written by the archiver threads.
#[derive(Debug, Default)]
pub struct ArchiveStats {
    pub batches_written: AtomicU64,
    /// Event rows in committed batches, duplicates included.
    pub events_written: AtomicU64,
    /// Event rows that were new to Postgres.
    pub events_inserted: AtomicU64,
    pub session_rows_written: AtomicU64,
    /// Failed batch attempts (each is retried).
    pub retries: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Events received and not yet committed (the batch being built or retried).
    pub pending_events: AtomicU64,
    /// `inserted_at` of the oldest pending event (0: none): now minus this is how far
    /// behind, in time, the archive is for what the archiver holds.
    pub oldest_pending_inserted_at_us: AtomicU64,
    /// Wall clock of the last commit, µs since the Unix epoch (0: none yet).
    pub last_commit_unix_us: AtomicU64,
    pub connected: AtomicBool,
    /// The database was refused (another cluster's, or too new): nothing is written.
    pub refused: AtomicBool,
    pub reads: AtomicU64,
    pub read_failures: AtomicU64,
    /// Per event: Postgres commit (as the archiver saw it return) minus `inserted_at`.
    pub lag: Mutex<crate::metrics::Histogram>,
    last_error: Mutex<Option<String>>,
}

impl ArchiveStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("stats lock").clone()
    }

    fn set_last_error(&self, error: String) {
        *self.last_error.lock().expect("stats lock") = Some(error);
    }
}

/// The running archiver. Dropping it (or [`ArchiverHandle::shutdown`]) stops both
/// threads; a batch not yet committed is abandoned, which is safe because it was never
/// reported durable and the shards send it again after a restart.
pub struct ArchiverHandle {
    shard_senders: Vec<Sender<ArchiveBatch>>,
    read_sender: Sender<ReadRequest>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<ArchiveStats>,
}

pub struct Archiver;

impl Archiver {
    /// Starts the writer and reader threads. The first connect happens before this
    /// returns: a database that is not ours fails the start ([`StartError::Refused`]);
    /// an unreachable Postgres does not (the archive only lags, the writer keeps trying).
    pub fn start(
        config: ArchiveConfig,
        on_durable: OnDurable,
    ) -> Result<ArchiverHandle, StartError> {
        assert!(config.shards >= 1 && config.shard_channel_batches_max >= 1);
        assert!(config.batch_max_events >= 1 && config.backoff_min <= config.backoff_max);
        config
            .url
            .parse::<postgres::Config>()
            .map_err(|error| StartError::InvalidUrl(error.to_string()))?;
        let stats = Arc::new(ArchiveStats::default());
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.shards)
            .map(|_| bounded::<ArchiveBatch>(config.shard_channel_batches_max))
            .unzip();
        let (read_sender, read_receiver) = bounded(config.read_queue_max);
        let (first_tx, first_rx) = bounded(1);
        let writer = worker::Worker::new(
            config.clone(),
            receivers,
            stop_rx.clone(),
            stats.clone(),
            on_durable,
        );
        let writer = std::thread::Builder::new()
            .name("archiver".into())
            .spawn(move || writer.run(first_tx))
            .map_err(StartError::Spawn)?;
        let reader_stats = stats.clone();
        let reader = std::thread::Builder::new()
            .name("archive-reader".into())
            .spawn(move || worker::serve_reads(config, read_receiver, stop_rx, reader_stats))
            .map_err(StartError::Spawn)?;
        let mut handle = ArchiverHandle {
            shard_senders: senders,
            read_sender,
            stop: Some(stop_tx),
            threads: vec![writer, reader],
            stats,
        };
        match first_rx.recv() {
            Ok(Err(refusal)) => {
                handle.stop_threads();
                Err(StartError::Refused(refusal))
            }
            Ok(Ok(())) | Err(_) => Ok(handle),
        }
    }
}

impl ArchiverHandle {
    /// The sending side of `shard`'s channel, for that shard to own.
    pub fn shard_sender(&self, shard: usize) -> Sender<ArchiveBatch> {
        self.shard_senders[shard].clone()
    }

    /// The reader thread's queue, for a shard to own (`try_send` only).
    pub fn read_sender(&self) -> Sender<ReadRequest> {
        self.read_sender.clone()
    }

    pub fn stats(&self) -> &Arc<ArchiveStats> {
        &self.stats
    }

    /// Queues a read for the reader thread; never blocks.
    pub fn read(&self, request: ReadRequest) -> Result<(), ReadError> {
        match self.read_sender.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ReadError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(ReadError::Stopped),
        }
    }

    /// [`ArchiverHandle::read`], waiting for the answer: for threads that may block.
    pub fn read_blocking(
        &self,
        session_id: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<ArchivedEvent>, ReadError> {
        let (reply_tx, reply_rx) = bounded(1);
        self.read(ReadRequest {
            session_id: session_id.to_owned(),
            after,
            limit,
            reply: Box::new(move |result| {
                let _ = reply_tx.send(result);
            }),
        })?;
        reply_rx.recv().map_err(|_| ReadError::Stopped)?
    }

    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        // Dropping the zero-capacity stop channel wakes both threads (recv sees it
        // disconnected), whatever they are waiting on.
        drop(self.stop.take());
        for thread in self.threads.drain(..) {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for ArchiverHandle {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_threads();
        }
    }
}

pub(crate) fn system_time_from_unix_us(unix_us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(unix_us.unsigned_abs());
    if unix_us >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

pub(crate) fn unix_us_from_system_time(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).expect("timestamp within i64 µs"),
        Err(before) => {
            -i64::try_from(before.duration().as_micros()).expect("timestamp within i64 µs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_system_time_to_the_microsecond() {
        for unix_us in [0, 1, -1, 1_795_000_000_123_456, -946_684_800_000_001] {
            assert_eq!(
                unix_us_from_system_time(system_time_from_unix_us(unix_us)),
                unix_us
            );
        }
    }
}
