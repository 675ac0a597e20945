//! The archiver's threads: the writer (gather a batch from the shard channels, write it
//! until Postgres commits it, report it) and the reader (serve range reads).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};
use postgres::{Client, NoTls};
use shards::entry::AppendEntry;

use super::schema::{self, SchemaError};
use super::write::Writer;
use super::{
    unix_us_from_system_time, ArchiveBatch, ArchiveConfig, ArchiveReader, ArchiveStats, Durable,
    OnDurable, ReadRequest, SessionRow,
};

/// A live connection with its prepared statements.
struct Connection {
    client: Client,
    writer: Writer,
}

/// The batch being built or retried: shard batches in arrival order.
#[derive(Default)]
struct Pending {
    parts: Vec<(usize, ArchiveBatch)>,
    events: usize,
}

pub(super) struct Worker {
    config: ArchiveConfig,
    receivers: Vec<Option<Receiver<ArchiveBatch>>>,
    stop: Receiver<()>,
    stats: Arc<ArchiveStats>,
    on_durable: OnDurable,
    connection: Option<Connection>,
}

/// Whether the worker goes on or was told to stop.
enum Flow {
    Continue,
    Stop,
}

impl Worker {
    pub(super) fn new(
        config: ArchiveConfig,
        receivers: Vec<Receiver<ArchiveBatch>>,
        stop: Receiver<()>,
        stats: Arc<ArchiveStats>,
        on_durable: OnDurable,
    ) -> Worker {
        Worker {
            config,
            receivers: receivers.into_iter().map(Some).collect(),
            stop,
            stats,
            on_durable,
            connection: None,
        }
    }

    /// Runs until stopped. `first` gets the outcome of the first connect attempt: a
    /// refusal, or `Ok` (connected, or unreachable and retrying).
    pub(super) fn run(mut self, first: Sender<Result<(), SchemaError>>) {
        lower_priority();
        match self.connect() {
            Err(error) if error.is_refusal() => {
                let _ = first.send(Err(error));
                return;
            }
            _ => {
                let _ = first.send(Ok(()));
            }
        }
        let mut pending = Pending::default();
        loop {
            if let Flow::Stop = self.gather(&mut pending) {
                return;
            }
            if let Flow::Stop = self.write_until_committed(&pending) {
                return;
            }
            self.report(std::mem::take(&mut pending));
        }
    }

    /// Connects (if needed) and migrates. Failures are counted and kept as last error.
    fn connect(&mut self) -> Result<(), SchemaError> {
        if self
            .connection
            .as_ref()
            .is_some_and(|c| !c.client.is_closed())
        {
            return Ok(());
        }
        self.connection = None;
        self.stats.connected.store(false, Ordering::Relaxed);
        match open(&self.config) {
            Ok(connection) => {
                self.connection = Some(connection);
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                self.stats.connected.store(true, Ordering::Relaxed);
                self.stats.refused.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .refused
                    .store(error.is_refusal(), Ordering::Relaxed);
                self.stats.set_last_error(error.to_string());
                if error.is_refusal() {
                    tracing::error!(%error, "archive database refused");
                } else {
                    tracing::warn!(%error, "archive: cannot connect to postgres");
                }
                Err(error)
            }
        }
    }

    /// Waits for the first shard batch, then takes more until the batch is full or
    /// `batch_max_delay` has passed since the first arrived.
    fn gather(&mut self, pending: &mut Pending) -> Flow {
        let mut deadline: Option<Instant> = None;
        while pending.events < self.config.batch_max_events {
            let mut select = Select::new();
            let stop_index = select.recv(&self.stop);
            let mut shard_of_index = HashMap::new();
            for (shard, receiver) in self.receivers.iter().enumerate() {
                if let Some(receiver) = receiver {
                    shard_of_index.insert(select.recv(receiver), shard);
                }
            }
            let operation = match deadline {
                None => select.select(),
                Some(deadline) => match select.select_deadline(deadline) {
                    Ok(operation) => operation,
                    Err(_) => break,
                },
            };
            let index = operation.index();
            if index == stop_index {
                let _ = operation.recv(&self.stop);
                return Flow::Stop;
            }
            let shard = shard_of_index[&index];
            let received = operation.recv(self.receivers[shard].as_ref().expect("selected"));
            let Ok(batch) = received else {
                // Every sender of this shard is gone: stop listening to it.
                self.receivers[shard] = None;
                continue;
            };
            if batch.events.is_empty() && batch.sessions.is_empty() {
                continue;
            }
            pending.events += batch.events.len();
            pending.parts.push((shard, batch));
            deadline.get_or_insert_with(|| Instant::now() + self.config.batch_max_delay);
        }
        self.publish_pending(pending);
        Flow::Continue
    }

    fn publish_pending(&self, pending: &Pending) {
        let oldest = pending
            .parts
            .iter()
            .flat_map(|(_, batch)| batch.events.iter())
            .map(|entry| entry.inserted_at_us.max(0) as u64)
            .min()
            .unwrap_or(0);
        self.stats
            .pending_events
            .store(pending.events as u64, Ordering::Relaxed);
        self.stats
            .oldest_pending_inserted_at_us
            .store(oldest, Ordering::Relaxed);
    }

    /// Writes `pending` in one transaction, reconnecting and retrying with exponential
    /// backoff until Postgres commits it. Retrying is safe: writes are idempotent, and a
    /// commit whose answer was lost is just written again.
    fn write_until_committed(&mut self, pending: &Pending) -> Flow {
        let events: Vec<&AppendEntry> = pending
            .parts
            .iter()
            .flat_map(|(_, batch)| batch.events.iter())
            .collect();
        let sessions: Vec<&SessionRow> = pending
            .parts
            .iter()
            .flat_map(|(_, batch)| batch.sessions.iter())
            .collect();
        let mut backoff = self.config.backoff_min;
        loop {
            if self.connect().is_ok() {
                let connection = self.connection.as_mut().expect("connected");
                match connection
                    .writer
                    .write(&mut connection.client, &events, &sessions)
                {
                    Ok(outcome) => {
                        let stats = &self.stats;
                        let now_us = unix_us_from_system_time(std::time::SystemTime::now());
                        let mut lag = stats.lag.lock().expect("lag lock");
                        for event in &events {
                            lag.record((now_us - event.inserted_at_us).max(0) as u64);
                        }
                        drop(lag);
                        stats.batches_written.fetch_add(1, Ordering::Relaxed);
                        stats
                            .events_written
                            .fetch_add(events.len() as u64, Ordering::Relaxed);
                        stats
                            .events_inserted
                            .fetch_add(outcome.events_inserted, Ordering::Relaxed);
                        stats
                            .session_rows_written
                            .fetch_add(outcome.session_rows, Ordering::Relaxed);
                        return Flow::Continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, events = events.len(), "archive batch failed; retrying");
                        self.stats.set_last_error(error.to_string());
                        // Whatever broke, start over on a fresh connection: the
                        // transaction rolled back and no session state is trusted.
                        self.connection = None;
                        self.stats.connected.store(false, Ordering::Relaxed);
                    }
                }
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            match self.stop.recv_timeout(backoff) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return Flow::Stop,
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// Tells each contributing shard what is now durable.
    fn report(&mut self, pending: Pending) {
        self.stats.last_commit_unix_us.store(
            unix_us_from_system_time(std::time::SystemTime::now()).max(0) as u64,
            Ordering::Relaxed,
        );
        let mut per_shard: HashMap<usize, (HashMap<String, u64>, usize)> = HashMap::new();
        for (shard, batch) in pending.parts {
            let (seqs, session_rows) = per_shard.entry(shard).or_default();
            *session_rows += batch.sessions.len();
            for entry in batch.events {
                let seq_max = seqs.entry(entry.session_id).or_insert(0);
                *seq_max = (*seq_max).max(entry.seq);
            }
        }
        self.publish_pending(&Pending::default());
        for (shard, (seqs, session_rows)) in per_shard {
            (self.on_durable)(Durable {
                shard,
                sessions: seqs.into_iter().collect(),
                session_rows,
            });
        }
    }
}

/// The archiver yields the CPU to the shards when both want it: appends keep their
/// latency and the archive only lags (Linux: a thread's nice value is its own).
fn lower_priority() {
    const ARCHIVER_NICE: libc::c_int = 10;
    // SAFETY: gettid and setpriority have no memory preconditions.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, ARCHIVER_NICE)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "archiver: cannot lower priority");
    }
}

/// A new connection: durable commits forced on, schema migrated, statements prepared.
fn open(config: &ArchiveConfig) -> Result<Connection, SchemaError> {
    let mut pg: postgres::Config = config.url.parse()?;
    pg.connect_timeout(config.connect_timeout);
    pg.application_name("starcite-archiver");
    let mut client = pg.connect(NoTls)?;
    // A batch is reported durable only after its commit is on Postgres's disk, whatever
    // the server's default says.
    client.batch_execute("SET synchronous_commit TO on")?;
    schema::migrate(&mut client, &config.cluster_id)?;
    let writer = Writer::new(&mut client, config.write_mode)?;
    Ok(Connection { client, writer })
}

/// The reader thread: one connection of its own, opened on demand. When Postgres is
/// unreachable a read fails at once (`/events` answers 503, a tail waits and retries).
pub(super) fn serve_reads(
    config: ArchiveConfig,
    requests: Receiver<ReadRequest>,
    stop: Receiver<()>,
    stats: Arc<ArchiveStats>,
) {
    let mut reader: Option<ArchiveReader> = None;
    loop {
        let request = crossbeam_channel::select! {
            recv(stop) -> _ => return,
            recv(requests) -> request => match request {
                Ok(request) => request,
                Err(_) => return,
            },
        };
        if reader.as_ref().is_some_and(ArchiveReader::is_closed) {
            reader = None;
        }
        if reader.is_none() {
            match ArchiveReader::connect(&config.url, &config.cluster_id, config.connect_timeout) {
                Ok(connected) => reader = Some(connected),
                Err(error) => {
                    stats.read_failures.fetch_add(1, Ordering::Relaxed);
                    (request.reply)(Err(error));
                    continue;
                }
            }
        }
        let result = reader.as_mut().expect("connected").read_events(
            &request.session_id,
            request.after,
            request.limit.min(super::READ_LIMIT_MAX),
        );
        stats.reads.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            stats.read_failures.fetch_add(1, Ordering::Relaxed);
            reader = None;
        }
        (request.reply)(result);
    }
}
