//! Feeding the Postgres archive (see `crate::archive`): the groups this node leads hand
//! their committed events, in seq order per session, to the archiver thread; the
//! archiver's reports come back as `ArchiveProgress` proposals, so `archived_seq` is
//! replicated and a new leader resumes where the archive is.
//!
//! Once per clock tick a shard:
//! 1. every `PROGRESS_EVERY` (200 ms), proposes one `ArchiveProgress` entry per group
//!    for what Postgres confirmed meanwhile (only where it still leads; another leader
//!    re-sends from the replicated `archived_seq`, and the writes are idempotent);
//! 2. scans each led group's committed Raft entries still in memory, from where the
//!    scan stopped, taking every event that continues its session's archive cursor
//!    (`sent`); a session whose next event is not in memory any more (compacted while
//!    Postgres was down or slow) becomes *lagging* and is read back from the log by one
//!    background task at a time, in bounded passes;
//! 3. `try_send`s what it gathered as one batch. A full channel keeps the batch for the
//!    next tick; while it is full the scan stops, so memory stays bounded, and whatever
//!    Raft compacts meanwhile is read back from the log later. Nothing ever blocks the
//!    executor and no committed event is skipped: the cursor only moves past an event
//!    once that event is in a batch, and the archiver never drops a batch.
//!
//! Ordering rule the archiver relies on: a shard sends each session's events in seq
//! order with no gap after what it sent before (or after `archived_seq`, when it starts
//! leading), so "Postgres committed seq N" means it holds 1..=N.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Sender, TrySendError};
use shards::entry::{AppendEntry, Command};
use shards::raft::{Entry, Payload};

use super::{event_bytes, now_us, Group, ShardCore};
use crate::archive::{ArchiveBatch, ArchiveStats, ReadError, ReadRequest, SessionRow};
use crate::metrics::ArchiveShardStats;
use crate::ops::ApiError;

/// One batch handed to the archiver holds at most this many events…
const BATCH_EVENTS_MAX: usize = 5_000;
/// …and about this many bytes.
const BATCH_BYTES_MAX: usize = 8 << 20;
/// Unconfirmed chunks remembered per session (for the lag in seconds), at most.
const UNCONFIRMED_CHUNKS_MAX: usize = 1_024;
/// Confirmations become `ArchiveProgress` entries at most this often (one entry per
/// group each time): bounds the extra Raft entries to 256 × 5 per second per cluster,
/// whatever the append rate, at the price of `archived_seq` trailing by that much.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// Catalog rows per batch, at most.
const BATCH_ROWS_MAX: usize = 1_000;
/// One background pass reads at most this many bytes of events from the log…
const LOG_READ_BYTES_MAX: usize = 4 << 20;
/// …for at most this many lagging sessions.
const LOG_READ_SESSIONS_MAX: usize = 256;

/// What a shard needs to talk to the archiver: its channel, the reports Postgres
/// confirmed (session → highest archived seq, merged by the archiver thread), and the
/// archiver's counters.
#[derive(Clone)]
pub struct ArchiveLink {
    pub sender: Sender<ArchiveBatch>,
    /// Reads of history beyond the local log.
    pub reads: Sender<ReadRequest>,
    pub durable: Arc<Mutex<HashMap<String, u64>>>,
    pub stats: Arc<ArchiveStats>,
}

/// A shard's side of the archive.
pub(crate) struct ArchiveFeed {
    link: ArchiveLink,
    /// The batch being gathered (kept while the channel is full).
    out: RefCell<Outgoing>,
    /// Per led group, from the tick the leadership was noticed.
    groups: RefCell<HashMap<u16, GroupFeed>>,
    /// A background log read is running.
    reading: Cell<bool>,
    last_progress: Cell<std::time::Instant>,
    deferred: Cell<u64>,
    log_reads: Cell<u64>,
}

#[derive(Default)]
struct Outgoing {
    batch: ArchiveBatch,
    bytes: usize,
    /// Sessions with events in `batch`.
    in_batch: HashSet<String>,
}

impl Outgoing {
    fn full(&self) -> bool {
        self.batch.events.len() >= BATCH_EVENTS_MAX || self.bytes >= BATCH_BYTES_MAX
    }
}

/// The archive cursor of one group this node leads.
struct GroupFeed {
    /// The Raft term of the leadership this feed belongs to.
    term: u64,
    /// The next Raft index to scan.
    next_index: u64,
    /// Highest seq handed to the archiver per session (absent: `archived_seq`).
    sent: HashMap<String, u64>,
    /// Sessions whose next event must be read back from the log.
    lagging: BTreeSet<String>,
    /// Sessions whose catalog row is to be (re)sent.
    rows: BTreeSet<String>,
    /// Per session, the batches sent and not confirmed: (first seq, its inserted_at),
    /// oldest first, for the lag in seconds.
    unconfirmed: HashMap<String, VecDeque<(u64, i64)>>,
    /// When this feed started (the age of lag it cannot date more precisely).
    started_us: i64,
}

impl GroupFeed {
    fn start(g: &Group) -> GroupFeed {
        let mut feed = GroupFeed {
            term: g.raft.term(),
            next_index: g.raft.snapshot_index() + 1,
            sent: HashMap::new(),
            lagging: BTreeSet::new(),
            rows: BTreeSet::new(),
            unconfirmed: HashMap::new(),
            started_us: now_us(),
        };
        // The previous leader may not have sent everything: every unarchived event and
        // every catalog row goes (again; the archive's writes are idempotent).
        for view in g.state.views() {
            if view.last_seq > view.archived_seq {
                feed.lagging.insert(view.id.clone());
            }
            feed.rows.insert(view.id.clone());
        }
        feed
    }

    fn cursor(&self, g: &Group, session: &str) -> u64 {
        let archived = g.state.view(session).map_or(0, |v| v.archived_seq);
        self.sent.get(session).copied().unwrap_or(0).max(archived)
    }

    /// Adds `event` to the batch if it continues the session's cursor; an event past
    /// the cursor makes the session lagging.
    fn offer(&mut self, g: &Group, event: &AppendEntry, out: &mut Outgoing) {
        let cursor = self.cursor(g, &event.session_id);
        if event.seq != cursor + 1 {
            if event.seq > cursor + 1 {
                self.lagging.insert(event.session_id.clone());
            }
            return;
        }
        // The first event of its session in this batch starts an unconfirmed chunk.
        if out.in_batch.insert(event.session_id.clone()) {
            let queue = self
                .unconfirmed
                .entry(event.session_id.clone())
                .or_default();
            if queue.len() < UNCONFIRMED_CHUNKS_MAX {
                queue.push_back((event.seq, event.inserted_at_us));
            }
        }
        match self.sent.get_mut(&event.session_id) {
            Some(sent) => *sent = event.seq,
            None => {
                self.sent.insert(event.session_id.clone(), event.seq);
            }
        }
        self.lagging.remove(&event.session_id);
        out.bytes += event_bytes(event);
        out.batch.events.push(event.clone());
    }

    /// Postgres holds `seq` and everything before it.
    fn confirmed(&mut self, session: &str, seq: u64) {
        if let Some(queue) = self.unconfirmed.get_mut(session) {
            while queue.front().is_some_and(|&(first, _)| first <= seq) {
                queue.pop_front();
            }
            if queue.is_empty() {
                self.unconfirmed.remove(session);
            }
        }
    }
}

fn session_row(view: &shards::session::SessionView) -> SessionRow {
    SessionRow {
        id: view.id.clone(),
        title: view.title.clone(),
        metadata: view.metadata.to_string(),
        version: view.version,
        archived: view.archived,
        created_at_us: view.created_at_us,
        updated_at_us: view.updated_at_us,
        archived_seq: view.archived_seq,
    }
}

impl ArchiveFeed {
    pub(crate) fn new(link: ArchiveLink) -> ArchiveFeed {
        ArchiveFeed {
            link,
            out: RefCell::new(Outgoing::default()),
            groups: RefCell::new(HashMap::new()),
            reading: Cell::new(false),
            last_progress: Cell::new(std::time::Instant::now()),
            deferred: Cell::new(0),
            log_reads: Cell::new(0),
        }
    }

    pub(crate) fn stats(&self) -> &Arc<ArchiveStats> {
        &self.link.stats
    }
}

impl ShardCore {
    /// One tick of the archive feed (see the module doc).
    pub(super) fn feed_archive(self: &Rc<Self>) {
        let Some(feed) = &self.archive else {
            return;
        };
        self.propose_archive_progress(feed);
        let mut wants_log = false;
        {
            let groups = self.groups.borrow();
            let mut feeds = feed.groups.borrow_mut();
            // A feed lives as long as the leadership it started in.
            feeds.retain(|id, f| {
                groups
                    .get(id)
                    .is_some_and(|g| g.leading && g.raft.term() == f.term)
            });
            let mut out = feed.out.borrow_mut();
            for (&id, g) in groups.iter() {
                // Only once the committed state holds every earlier leader's entries
                // (Raft §8: an entry of this term committed).
                if !g.leading || g.applied_term != g.raft.term() {
                    continue;
                }
                let f = feeds.entry(id).or_insert_with(|| GroupFeed::start(g));
                scan(f, g, &mut out);
                wants_log |= !f.lagging.is_empty();
            }
        }
        if wants_log && !feed.reading.get() && !feed.out.borrow().full() {
            feed.reading.set(true);
            glommio::spawn_local(self.clone().read_lagging()).detach();
        }
        self.send_archive_batch(feed);
    }

    /// What Postgres confirmed becomes one `ArchiveProgress` entry per group led here.
    fn propose_archive_progress(&self, feed: &ArchiveFeed) {
        if feed.last_progress.get().elapsed() < PROGRESS_EVERY {
            return;
        }
        feed.last_progress.set(std::time::Instant::now());
        let confirmed = std::mem::take(&mut *feed.link.durable.lock().expect("durable lock"));
        if confirmed.is_empty() {
            return;
        }
        let mut by_group: HashMap<u16, Vec<(String, u64)>> = HashMap::new();
        for (session, seq) in confirmed {
            let group = shards::group_of(&session);
            if let Some(f) = feed.groups.borrow_mut().get_mut(&group) {
                f.confirmed(&session, seq);
            }
            by_group.entry(group).or_default().push((session, seq));
        }
        for (group, reports) in by_group {
            let decided = self.with_group(group, |g| g.state.decide_archive_progress(&reports));
            if let Ok(Some(command)) = decided {
                // Not waited for: a lost entry is proposed again with the next report
                // or by the next leader, which re-archives from `archived_seq`.
                let _ = self.propose(group, command);
            }
        }
    }

    fn send_archive_batch(&self, feed: &ArchiveFeed) {
        let mut out = feed.out.borrow_mut();
        if out.batch.events.is_empty() && out.batch.sessions.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut out.batch);
        match feed.link.sender.try_send(batch) {
            Ok(()) => {
                out.bytes = 0;
                out.in_batch.clear();
            }
            Err(TrySendError::Full(batch)) => {
                out.batch = batch;
                feed.deferred.set(feed.deferred.get() + 1);
            }
            // The archiver stopped (shutdown): nothing to do.
            Err(TrySendError::Disconnected(_)) => {
                out.bytes = 0;
                out.in_batch.clear();
            }
        }
    }

    /// One bounded pass over lagging sessions: their next events are read back from the
    /// log and offered in order.
    async fn read_lagging(self: Rc<Self>) {
        let Some(feed) = &self.archive else {
            return;
        };
        let mut work = Vec::new();
        {
            let groups = self.groups.borrow();
            let feeds = feed.groups.borrow();
            'outer: for (&id, f) in feeds.iter() {
                let Some(g) = groups.get(&id) else { continue };
                for session in &f.lagging {
                    let last = g.state.view(session).map_or(0, |v| v.last_seq);
                    let cursor = f.cursor(g, session);
                    if last > cursor {
                        work.push((id, f.term, session.clone(), cursor, last));
                    }
                    if work.len() >= LOG_READ_SESSIONS_MAX {
                        break 'outer;
                    }
                }
            }
        }
        let mut budget = LOG_READ_BYTES_MAX;
        for (group, term, session, cursor, last) in work {
            if budget == 0 {
                break;
            }
            let read = self.read_log_events(&session, cursor, last, budget).await;
            let events = match read {
                Ok((events, _)) => events,
                Err(error) => {
                    tracing::error!(shard = self.index, %session, %error, "archive: reading the log");
                    continue;
                }
            };
            budget = budget.saturating_sub(events.iter().map(event_bytes).sum());
            feed.log_reads
                .set(feed.log_reads.get() + events.len() as u64);
            let groups = self.groups.borrow();
            let mut feeds = feed.groups.borrow_mut();
            let (Some(g), Some(f)) = (groups.get(&group), feeds.get_mut(&group)) else {
                continue;
            };
            if f.term != term {
                continue;
            }
            let mut out = feed.out.borrow_mut();
            for event in &events {
                f.offer(g, event, &mut out);
            }
            let last_now = g.state.view(&session).map_or(0, |v| v.last_seq);
            if f.cursor(g, &session) >= last_now {
                f.lagging.remove(&session);
            }
        }
        feed.reading.set(false);
    }

    /// Events `after+1 ..= after+limit` of a session from Postgres (rendered as the API
    /// serves them), checked to be exactly those seqs. Waits for the reader thread by
    /// polling, so the executor never blocks.
    pub(super) async fn read_archive(
        &self,
        id: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<(u64, Arc<str>)>, ApiError> {
        let Some(feed) = &self.archive else {
            return Err(ApiError::ArchiveUnavailable);
        };
        let limit = limit.min(crate::archive::READ_LIMIT_MAX);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let request = ReadRequest {
            session_id: id.to_string(),
            after,
            limit,
            reply: Box::new(move |result| {
                let _ = tx.send(result);
            }),
        };
        if feed.link.reads.try_send(request).is_err() {
            return Err(ApiError::Overloaded);
        }
        let deadline = std::time::Instant::now() + self.request_timeout;
        let result = loop {
            match rx.try_recv() {
                Ok(result) => break result,
                Err(crossbeam_channel::TryRecvError::Empty)
                    if std::time::Instant::now() < deadline =>
                {
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(_) => break Err(ReadError::Stopped),
            }
        };
        let events = match result {
            Ok(events) => events,
            Err(ReadError::Overloaded) => return Err(ApiError::Overloaded),
            Err(_) => return Err(ApiError::ArchiveUnavailable),
        };
        let contiguous = events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == after + 1 + i as u64);
        if !contiguous || (events.len() as u64) < limit {
            return Err(ApiError::Internal(format!(
                "archive holds {} of events {}..={} of {id}",
                events.len(),
                after + 1,
                after + limit
            )));
        }
        Ok(events
            .into_iter()
            .map(|e| (e.seq, Arc::from(e.json)))
            .collect())
    }

    /// The feed's counters and how far behind the archive is (events, and the age of
    /// the oldest) for the groups this shard leads; None without an archive.
    pub(super) fn archive_stats(&self) -> Option<ArchiveShardStats> {
        let feed = self.archive.as_ref()?;
        let now = now_us();
        let groups = self.groups.borrow();
        let feeds = feed.groups.borrow();
        let mut stats = ArchiveShardStats {
            batches_deferred: feed.deferred.get(),
            events_read_from_log: feed.log_reads.get(),
            ..Default::default()
        };
        let mut oldest = i64::MAX;
        for (id, g) in groups.iter().filter(|(_, g)| g.leading) {
            let f = feeds.get(id);
            for view in g.state.views() {
                if view.last_seq <= view.archived_seq {
                    continue;
                }
                stats.events_behind += view.last_seq - view.archived_seq;
                let since = f
                    .and_then(|f| f.unconfirmed.get(&view.id))
                    .and_then(|q| q.front())
                    .map(|&(_, at)| at)
                    .or_else(|| f.map(|f| f.started_us))
                    .unwrap_or(now);
                oldest = oldest.min(since);
            }
        }
        if oldest != i64::MAX {
            stats.seconds_behind = (now - oldest).max(0) as f64 / 1e6;
        }
        Some(stats)
    }
}

/// Takes what the group committed since the last scan (see the module doc).
fn scan(f: &mut GroupFeed, g: &Group, out: &mut Outgoing) {
    let first = g.raft.snapshot_index() + 1;
    if f.next_index < first {
        // Compacted before the scan reached it: what was not sent comes from the log.
        for view in g.state.views() {
            if view.last_seq > f.cursor(g, &view.id) {
                f.lagging.insert(view.id.clone());
            }
        }
        f.next_index = first;
    }
    while f.next_index <= g.applied && !out.full() {
        match g.raft.entry(f.next_index) {
            Some(Entry {
                payload: Payload::Data(command),
                ..
            }) => match command {
                Command::Append(event) => f.offer(g, event, out),
                Command::CreateSession(c) => {
                    f.rows.insert(c.session_id.clone());
                }
                Command::PatchSession(c) => {
                    f.rows.insert(c.session_id.clone());
                }
                Command::SetArchived(c) => {
                    f.rows.insert(c.session_id.clone());
                }
                Command::ArchiveProgress(c) => {
                    f.rows
                        .extend(c.sessions.iter().map(|p| p.session_id.clone()));
                }
                Command::Noop | Command::Meta(_) => {}
            },
            Some(_) => {}
            None => break,
        }
        f.next_index += 1;
    }
    while out.batch.sessions.len() < BATCH_ROWS_MAX {
        let Some(id) = f.rows.pop_first() else { break };
        if let Some(view) = g.state.view(&id) {
            out.batch.sessions.push(session_row(view));
        }
    }
}
