//! One shard: the groups it owns, their session state machines, its write-ahead log and
//! its event store. Everything here runs on one glommio executor; other shards reach
//! it only by message (see `node`).
//!
//! The path of a write: decide against the state including in-flight entries
//! (`GroupState::decide_*`), `apply` the entry to that state, queue its log record,
//! wake the committer; the committer writes every queued record of every group in one
//! batch with one fdatasync, then `commit`s each entry (visible to reads, tails woken)
//! and releases the requests waiting on those indexes.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::channel::oneshot;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use shards::codec;
use shards::entry::{Command, LogRecord};
use shards::session::{AppendDecision, AppendError, CreateError, GroupState, Limits, PatchError};
use shards::snapshot::{fold_checksum, replay_rule, ReplayRule, ShardSnapshot};
use shards::validate::{render_event, NewEvent, NewSession, PatchRequest};

use crate::metrics::ShardStats;
use crate::node::with_timeout;
use crate::ops::{ApiError, ArchivedFilter, Op, Reply};
use crate::store::{Cold, EventStore, ReadPlan};
use crate::wal::{LogReader, RecordLocation, Replayed, Wal};

/// Log records queued for the next batch, at most; past it writes answer 503 overloaded.
const PENDING_RECORDS_MAX: usize = 65_536;
/// Approximate bytes of log records queued for the next batch, at most (same answer).
const PENDING_BYTES_MAX: usize = 64 << 20;
/// The single-node Raft term. Replication (issue 3) makes terms real.
const TERM: u64 = 1;

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One Raft group as a single voter: its state machine and log positions.
struct Group {
    state: GroupState,
    last_index: u64,
    commit_index: u64,
    /// Rolling checksum of committed entries (`shards::snapshot::fold_checksum`).
    checksum: u64,
    /// Requests waiting for `commit_index` to reach a log index.
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Group {
    fn new(limits: Limits) -> Group {
        Group {
            state: GroupState::new(limits),
            last_index: 0,
            commit_index: 0,
            checksum: 0,
            waiters: BTreeMap::new(),
        }
    }
}

pub struct ShardSettings {
    pub index: usize,
    pub shards: usize,
    pub limits: Limits,
    pub request_timeout: Duration,
    pub hot_bytes: usize,
}

pub struct ShardCore {
    pub index: usize,
    pub shards: usize,
    limits: Limits,
    request_timeout: Duration,
    groups: RefCell<HashMap<u16, Group>>,
    pending: RefCell<Vec<LogRecord>>,
    pending_bytes: Cell<usize>,
    wake_committer: LocalSender<()>,
    store: RefCell<EventStore>,
    reader: LogReader,
    pub stats: RefCell<ShardStats>,
    /// Tails waiting for the next committed event of a session.
    tail_waiters: RefCell<HashMap<String, Vec<oneshot::Sender<()>>>>,
    pub shutting_down: Cell<bool>,
    dir: PathBuf,
    /// Where the next batch will be written; every record not yet durable is after it.
    durable_position: Cell<(u64, u64)>,
    snapshot_log_bytes: u64,
    snapshot_running: Cell<bool>,
}

impl ShardCore {
    /// Recovers the shard (snapshot, then the log after it) and starts its committer.
    pub async fn start(
        settings: ShardSettings,
        dir: &Path,
        segment_bytes: u64,
        fsync_delay: Option<Duration>,
        snapshot_log_bytes: u64,
    ) -> Result<Rc<ShardCore>, String> {
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| format!("create {}: {e}", log_dir.display()))?;
        let snapshot = load_snapshot(dir).await?;
        let mut recovery = Recovery::new(&settings, snapshot)?;
        let resume = recovery.resume;
        let wal = Wal::open(&log_dir, segment_bytes, fsync_delay, resume, |item| {
            recovery.replay(item)
        })
        .await?;
        let Recovery {
            groups,
            store,
            seals,
            ..
        } = recovery;
        // Segments sealed during replay get their index files (again: an old one, if
        // any, may be missing or may not match the runs replay just built).
        for (epoch, offsets) in seals {
            let bytes = shards::snapshot::encode_sidecar(epoch, &offsets, codec::BLOCK_BYTES);
            wal.write_sidecar(epoch, &bytes).await;
        }
        let (wake_committer, wake_rx) = local_channel::new_bounded(1);
        let core = Rc::new(ShardCore {
            index: settings.index,
            shards: settings.shards,
            limits: settings.limits,
            request_timeout: settings.request_timeout,
            dir: dir.to_path_buf(),
            groups: RefCell::new(groups),
            pending: RefCell::new(Vec::new()),
            pending_bytes: Cell::new(0),
            wake_committer,
            store: RefCell::new(store),
            reader: wal.reader(),
            stats: RefCell::new(ShardStats::default()),
            tail_waiters: RefCell::new(HashMap::new()),
            shutting_down: Cell::new(false),
            durable_position: Cell::new(wal.durable_position()),
            snapshot_log_bytes,
            snapshot_running: Cell::new(false),
        });
        glommio::spawn_local(core.clone().run_committer(wal, wake_rx)).detach();
        Ok(core)
    }

    /// Runs one operation for a session owned by this shard.
    pub async fn execute(&self, op: Op) -> Reply {
        match op {
            Op::Create {
                id,
                title,
                metadata,
            } => self.create(id, title, metadata).await,
            Op::Get { id } => self.get(&id),
            Op::Patch { id, patch } => self.patch(&id, &patch).await,
            Op::SetArchived { id, archived } => self.set_archived(&id, archived).await,
            Op::Append { id, event } => self.append(&id, &event).await,
            Op::Read {
                id,
                after,
                max_events,
                max_bytes,
                wait,
            } => self.read(&id, after, max_events, max_bytes, wait).await,
            Op::List {
                after,
                limit,
                archived,
                filters,
            } => self.list(after.as_deref(), limit, archived, &filters),
            Op::Stats => Reply::Stats(Box::new(self.stats_snapshot())),
            Op::DebugGroup { group } => Reply::Debug(self.debug_group(group)),
            Op::ReadIndex { .. } => Reply::ReadIndex(Vec::new()),
        }
    }

    fn with_group<T>(&self, group: u16, f: impl FnOnce(&mut Group) -> T) -> T {
        let mut groups = self.groups.borrow_mut();
        let limits = &self.limits;
        let group = groups.entry(group).or_insert_with(|| Group::new(*limits));
        f(group)
    }

    /// Queues `command` as the next entry of `group` (already decided against the
    /// state) and returns its log index.
    fn propose(&self, group: u16, command: Command) -> Result<u64, ApiError> {
        if self.shutting_down.get() {
            return Err(ApiError::Unavailable);
        }
        let bytes = command_bytes(&command);
        if self.pending.borrow().len() >= PENDING_RECORDS_MAX
            || (self.pending_bytes.get() > 0
                && self.pending_bytes.get() + bytes > PENDING_BYTES_MAX)
        {
            return Err(ApiError::Overloaded);
        }
        self.pending_bytes.set(self.pending_bytes.get() + bytes);
        let index = self.with_group(group, |g| {
            g.state.apply(&command);
            g.last_index += 1;
            g.last_index
        });
        self.pending.borrow_mut().push(LogRecord {
            group,
            term: TERM,
            index,
            command,
        });
        let _ = self.wake_committer.try_send(());
        Ok(index)
    }

    /// Waits until `index` of `group` is durable. A timeout leaves the outcome unknown.
    async fn wait_commit(&self, group: u16, index: u64) -> Result<(), ApiError> {
        let rx = self.with_group(group, |g| {
            if g.commit_index >= index {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            g.waiters.entry(index).or_default().push(tx);
            Some(rx)
        });
        let Some(rx) = rx else { return Ok(()) };
        match with_timeout(self.request_timeout, rx).await {
            Some(Ok(())) => Ok(()),
            // Dropped waiters (shutdown) and timeouts both leave the outcome unknown.
            _ => Err(ApiError::CommitUnknown),
        }
    }

    /// A reply decided against in-flight entries is sent only once they are durable, so
    /// a client never sees a result that a crash could take back (API.md).
    async fn settle(&self, group: u16) -> Result<(), ApiError> {
        let last = self.with_group(group, |g| g.last_index);
        self.wait_commit(group, last).await
    }

    fn render_view(&self, group: u16, id: &str) -> Reply {
        self.with_group(group, |g| match g.state.view(id) {
            Some(view) => Reply::Session(shards::session::render_session(view)),
            None => Reply::Error(ApiError::SessionNotFound),
        })
    }

    async fn create(&self, id: String, title: Option<String>, metadata: String) -> Reply {
        let group = shards::group_of(&id);
        let request = NewSession {
            id: Some(id.clone()),
            title,
            metadata,
        };
        let decided = self.with_group(group, |g| {
            g.state.decide_create(&request, id.clone(), now_us())
        });
        let result = match decided {
            Ok(command) => match self.propose(group, command) {
                Ok(index) => self.wait_commit(group, index).await,
                Err(e) => Err(e),
            },
            Err(CreateError::SessionExists) => {
                self.settle(group).await.and(Err(ApiError::SessionExists))
            }
        };
        match result {
            Ok(()) => self.render_view(group, &id),
            Err(e) => Reply::Error(e),
        }
    }

    fn get(&self, id: &str) -> Reply {
        self.render_view(shards::group_of(id), id)
    }

    async fn patch(&self, id: &str, patch: &PatchRequest) -> Reply {
        let group = shards::group_of(id);
        let decided = self.with_group(group, |g| g.state.decide_patch(id, patch, now_us()));
        let result = match decided {
            Ok(command) => self.propose_and_wait(group, command).await,
            Err(e) => {
                let error = match e {
                    PatchError::NotFound => ApiError::SessionNotFound,
                    PatchError::VersionConflict { current } => ApiError::VersionConflict {
                        current_version: current,
                    },
                    PatchError::Invalid(field) => ApiError::Invalid(field),
                };
                self.settle(group).await.and(Err(error))
            }
        };
        match result {
            Ok(()) => self.render_view(group, id),
            Err(e) => Reply::Error(e),
        }
    }

    async fn propose_and_wait(&self, group: u16, command: Command) -> Result<(), ApiError> {
        let index = self.propose(group, command)?;
        self.wait_commit(group, index).await
    }

    async fn set_archived(&self, id: &str, archived: bool) -> Reply {
        let group = shards::group_of(id);
        let decided = self.with_group(group, |g| {
            g.state.decide_set_archived(id, archived, now_us())
        });
        let result = match decided {
            Ok(Some(command)) => self.propose_and_wait(group, command).await,
            Ok(None) => self.settle(group).await,
            Err(_) => self.settle(group).await.and(Err(ApiError::SessionNotFound)),
        };
        match result {
            Ok(()) => self.render_view(group, id),
            Err(e) => Reply::Error(e),
        }
    }

    async fn append(&self, id: &str, event: &NewEvent) -> Reply {
        let group = shards::group_of(id);
        let decided = self.with_group(group, |g| g.state.decide_append(id, event, now_us()));
        let (seq, deduped) = match decided {
            Ok(AppendDecision::Append(command)) => {
                let Command::Append(entry) = &command else {
                    unreachable!("decide_append proposes appends")
                };
                let seq = entry.seq;
                if let Err(e) = self.propose_and_wait(group, command).await {
                    return Reply::Error(e);
                }
                self.stats.borrow_mut().appends += 1;
                (seq, false)
            }
            Ok(AppendDecision::Deduped { seq }) => {
                if let Err(e) = self.settle(group).await {
                    return Reply::Error(e);
                }
                self.stats.borrow_mut().dedupes += 1;
                (seq, true)
            }
            Err(e) => {
                let settled = self.settle(group).await;
                self.stats.borrow_mut().conflicts += 1;
                return Reply::Error(settled.err().unwrap_or_else(|| append_error(e)));
            }
        };
        self.with_group(group, |g| match g.state.view(id) {
            Some(view) => Reply::Appended {
                seq,
                last_seq: view.last_seq,
                deduped,
                archived_seq: view.archived_seq,
            },
            None => Reply::Error(ApiError::SessionNotFound),
        })
    }

    async fn read(
        &self,
        id: &str,
        after: u64,
        max_events: usize,
        max_bytes: usize,
        wait: Option<Duration>,
    ) -> Reply {
        let group = shards::group_of(id);
        let mut waited = false;
        loop {
            let Some(last_seq) = self.with_group(group, |g| g.state.view(id).map(|v| v.last_seq))
            else {
                return Reply::Error(ApiError::SessionNotFound);
            };
            let plan = self.store.borrow().plan_read(id, after, max_events);
            if plan.cold.is_empty() && plan.hot.is_empty() && !waited {
                if let Some(wait) = wait {
                    self.wait_for_event(id, wait).await;
                    waited = true;
                    continue;
                }
            }
            return match self.materialize(id, plan, max_bytes).await {
                Ok(events) => Reply::Events { events, last_seq },
                Err(e) => Reply::Error(e),
            };
        }
    }

    async fn wait_for_event(&self, id: &str, wait: Duration) {
        if self.shutting_down.get() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.tail_waiters
            .borrow_mut()
            .entry(id.to_string())
            .or_default()
            .push(tx);
        let _ = with_timeout(wait, rx).await;
        // A waiter that timed out is dropped here, so idle sessions collect no garbage.
        let mut waiters = self.tail_waiters.borrow_mut();
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|tx| !tx.is_canceled());
            if list.is_empty() {
                waiters.remove(id);
            }
        }
    }

    /// Wakes every tail waiting on any session (shutdown).
    pub fn wake_all_tails(&self) {
        self.tail_waiters.borrow_mut().clear();
    }

    /// Turns a read plan into rendered events: cold ones are read back from the log.
    /// Stops before `max_bytes` would be passed (but returns at least one event).
    async fn materialize(
        &self,
        id: &str,
        plan: ReadPlan,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Arc<str>)>, ApiError> {
        let mut events = Vec::with_capacity(plan.cold.len() + plan.hot.len());
        let mut bytes = 0;
        let fits = |bytes: usize, len: usize, events: &Vec<_>| {
            events.is_empty() || bytes + len <= max_bytes
        };
        let mut i = 0;
        while i < plan.cold.len() {
            // Consecutive events of one sealed run share one read of the index file.
            let run = sealed_run(&plan.cold[i..]);
            let locations = self.resolve(&plan.cold[i..i + run]).await?;
            for (seq, loc) in locations {
                let text = self.read_cold(id, seq, loc).await?;
                if !fits(bytes, text.len(), &events) {
                    return Ok(events);
                }
                bytes += text.len();
                events.push((seq, text));
            }
            i += run;
        }
        for (seq, text) in plan.hot {
            if !fits(bytes, text.len(), &events) {
                break;
            }
            bytes += text.len();
            events.push((seq, text));
        }
        Ok(events)
    }

    /// Log locations of cold events (all Active, or one sealed run).
    async fn resolve(&self, cold: &[(u64, Cold)]) -> Result<Vec<(u64, RecordLocation)>, ApiError> {
        match cold[0].1 {
            Cold::Active { .. } => Ok(cold
                .iter()
                .map(|&(seq, c)| match c {
                    Cold::Active { epoch, offset } => (seq, RecordLocation { epoch, offset }),
                    Cold::Sealed { .. } => unreachable!("sealed_run keeps runs apart"),
                })
                .collect()),
            Cold::Sealed { epoch, index } => {
                let offsets = self
                    .reader
                    .read_offsets(epoch, index, cold.len() as u32)
                    .map_err(|e| ApiError::Internal(format!("index of segment {epoch}: {e}")))?;
                Ok(cold
                    .iter()
                    .zip(offsets)
                    .map(|(&(seq, _), offset)| (seq, RecordLocation { epoch, offset }))
                    .collect())
            }
        }
    }

    async fn read_cold(
        &self,
        id: &str,
        seq: u64,
        loc: RecordLocation,
    ) -> Result<Arc<str>, ApiError> {
        let record = self.reader.read(loc).await.map_err(|e| {
            ApiError::Internal(format!("reading event {seq} of {id} at {loc:?}: {e}"))
        })?;
        match record.command {
            Command::Append(e) if e.session_id == id && e.seq == seq => {
                Ok(Arc::from(render_event(&e)))
            }
            _ => Err(ApiError::Internal(format!(
                "log record at {loc:?} is not event {seq} of {id}"
            ))),
        }
    }

    fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        archived: ArchivedFilter,
        filters: &[(String, String)],
    ) -> Reply {
        let groups = self.groups.borrow();
        let wanted = |view: &&shards::session::SessionView| {
            let flag = match archived {
                ArchivedFilter::Active => !view.archived,
                ArchivedFilter::Archived => view.archived,
                ArchivedFilter::All => true,
            };
            flag && shards::session::metadata_matches(view, filters)
        };
        // Each group's sessions are in id order: at most `limit + 1` from each can make
        // the page, so a page costs groups × limit, not the number of sessions.
        let mut found: Vec<(String, String)> = Vec::new();
        for group in groups.values() {
            let page = group
                .state
                .views_after(after)
                .filter(wanted)
                .take(limit + 1);
            found.extend(page.map(|view| (view.id.clone(), String::new())));
        }
        found.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        found.truncate(limit + 1);
        for (id, rendered) in found.iter_mut() {
            let group = &groups[&shards::group_of(id)];
            *rendered = shards::session::render_session(group.state.view(id).expect("listed"));
        }
        Reply::Sessions(found)
    }

    /// `GET /debug/groups/:g`: this replica's view of one group, for tests that compare
    /// replicas directly. A single node is the one voter and leader of term 1.
    fn debug_group(&self, group: u16) -> String {
        let groups = self.groups.borrow();
        let (commit, last, checksum) = groups
            .get(&group)
            .map_or((0, 0, 0), |g| (g.commit_index, g.last_index, g.checksum));
        let mut sessions = serde_json::Map::new();
        if let Some(g) = groups.get(&group) {
            for view in g.state.views() {
                sessions.insert(view.id.clone(), view.last_seq.into());
            }
        }
        serde_json::json!({
            "group": group,
            "shard": self.index,
            "role": "leader",
            "term": TERM,
            "voters": 1,
            "commit_index": commit,
            "applied_index": commit,
            "last_index": last,
            "checksum": format!("{checksum:016x}"),
            "sessions": sessions,
        })
        .to_string()
    }

    fn stats_snapshot(&self) -> ShardStats {
        let mut stats = self.stats.borrow().clone();
        let store = self.store.borrow();
        stats.hot_bytes = store.hot_bytes() as u64;
        stats.hot_evictions = store.evicted_events;
        let groups = self.groups.borrow();
        stats.sessions = groups
            .values()
            .map(|g| g.state.views().count() as u64)
            .sum();
        stats.dedupe_evictions = groups.values().map(|g| g.state.evictions()).sum();
        stats.commit_index_sum = groups.values().map(|g| g.commit_index).sum();
        stats
    }

    /// The committer: one batch write + one fdatasync for everything queued while the
    /// previous batch was being synced (group commit), then commit and reply.
    async fn run_committer(self: Rc<Self>, mut wal: Wal, wake: LocalReceiver<()>) {
        let mut bytes_since_snapshot = 0u64;
        while wake.recv().await.is_some() {
            loop {
                let mut records = std::mem::take(&mut *self.pending.borrow_mut());
                self.pending_bytes.set(0);
                if records.is_empty() {
                    break;
                }
                while !records.is_empty() {
                    let written = wal.write(&records).await;
                    if let Some(epoch) = written.sealed {
                        self.seal(&wal, epoch).await;
                    }
                    self.durable_position.set(wal.durable_position());
                    self.record_write(&written);
                    bytes_since_snapshot += written.bytes as u64;
                    let rest = records.split_off(written.taken);
                    let placed = written.locations.into_iter().zip(written.crcs);
                    for (record, (loc, crc)) in records.into_iter().zip(placed) {
                        self.on_durable(record, loc, crc);
                    }
                    records = rest;
                }
                if bytes_since_snapshot >= self.snapshot_log_bytes && !self.snapshot_running.get() {
                    bytes_since_snapshot = 0;
                    self.snapshot_running.set(true);
                    glommio::spawn_local(self.clone().write_snapshot()).detach();
                }
            }
        }
    }

    fn record_write(&self, written: &crate::wal::Written) {
        let mut stats = self.stats.borrow_mut();
        stats.fsyncs += 1;
        stats.fsync_latency.record(written.fsync_us);
        stats.log_bytes_written += written.bytes as u64;
    }

    /// Writes the index file of a sealed segment, then turns the store's per-event
    /// offsets for it into runs.
    async fn seal(&self, wal: &Wal, epoch: u64) {
        let plan = self.store.borrow().plan_seal(epoch as u32);
        let bytes = shards::snapshot::encode_sidecar(epoch, &plan.offsets, codec::BLOCK_BYTES);
        wal.write_sidecar(epoch, &bytes).await;
        self.store.borrow_mut().apply_seal(plan);
    }

    /// Writes a shard snapshot: the event index and the resume position at one moment,
    /// then each group's committed state, one group per step so the shard keeps serving.
    async fn write_snapshot(self: Rc<Self>) {
        let started = std::time::Instant::now();
        let (resume_epoch, resume_offset) = self.durable_position.get();
        let sessions = self.store.borrow().capture();
        let mut ids: Vec<u16> = self.groups.borrow().keys().copied().collect();
        ids.sort_unstable();
        let mut groups = Vec::with_capacity(ids.len());
        for group in ids {
            let snap = self.with_group(group, |g| shards::snapshot::GroupSnapshot {
                group,
                committed_index: g.commit_index,
                checksum: g.checksum,
                state: g.state.encode_snapshot(),
            });
            groups.push(snap);
            futures_lite::future::yield_now().await;
        }
        let snapshot = shards::snapshot::ShardSnapshot {
            resume_epoch,
            resume_offset,
            groups,
            sessions,
        };
        let mut bytes = snapshot.encode();
        let len = bytes.len() as u64;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.resize(bytes.len().next_multiple_of(4096), 0);
        // The length trailer sits at the end of the padded file: see `load_snapshot`.
        let total = bytes.len();
        bytes[total - 8..].copy_from_slice(&len.to_le_bytes());
        match crate::wal::write_file_durably(&self.dir, SNAPSHOT_FILE, &bytes).await {
            Ok(()) => tracing::info!(
                shard = self.index,
                bytes = total,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot written"
            ),
            Err(e) => tracing::error!(shard = self.index, error = %e, "snapshot failed"),
        }
        self.snapshot_running.set(false);
    }

    fn on_durable(&self, record: LogRecord, loc: RecordLocation, crc: u32) {
        let released = self.with_group(record.group, |g| {
            assert_eq!(record.index, g.commit_index + 1, "commits are in log order");
            g.state.commit(&record.command);
            g.commit_index = record.index;
            g.checksum = fold_checksum(g.checksum, crc);
            let later = g.waiters.split_off(&(record.index + 1));
            std::mem::replace(&mut g.waiters, later)
        });
        for tx in released.into_values().flatten() {
            let _ = tx.send(());
        }
        if let Command::Append(e) = &record.command {
            let text: Arc<str> = Arc::from(render_event(e));
            self.store
                .borrow_mut()
                .insert(&e.session_id, e.seq, loc.epoch, loc.offset, Some(text));
            if let Some(waiters) = self.tail_waiters.borrow_mut().remove(&e.session_id) {
                for tx in waiters {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// True when nothing is queued or being written.
    pub fn idle(&self) -> bool {
        self.pending.borrow().is_empty()
            && self
                .groups
                .borrow()
                .values()
                .all(|g| g.commit_index == g.last_index)
    }
}

/// How many leading cold events can be resolved together: a run of Active ones, or of
/// consecutive entries of one sealed segment's index.
fn sealed_run(cold: &[(u64, Cold)]) -> usize {
    let mut n = 1;
    while n < cold.len() {
        let same = match (cold[n - 1].1, cold[n].1) {
            (Cold::Active { .. }, Cold::Active { .. }) => true,
            (Cold::Sealed { epoch: a, index: i }, Cold::Sealed { epoch: b, index: j }) => {
                a == b && j == i + 1
            }
            _ => false,
        };
        if !same {
            break;
        }
        n += 1;
    }
    n
}

const SNAPSHOT_FILE: &str = "snapshot";

/// Reads the shard's snapshot, if there is one. A snapshot that does not decode is an
/// error: starting from the log alone could miss sealed segments' runs.
async fn load_snapshot(dir: &Path) -> Result<Option<ShardSnapshot>, String> {
    let path = dir.join(SNAPSHOT_FILE);
    let Some(bytes) = crate::wal::read_file(&path)
        .await
        .map_err(|e| format!("read {}: {e}", path.display()))?
    else {
        return Ok(None);
    };
    let trailer = bytes
        .len()
        .checked_sub(8)
        .ok_or_else(|| format!("{} is truncated", path.display()))?;
    let len = u64::from_le_bytes(bytes[trailer..].try_into().expect("8 bytes")) as usize;
    let body = bytes
        .get(..len)
        .ok_or_else(|| format!("{} is truncated", path.display()))?;
    ShardSnapshot::decode(body)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Rebuilds a shard's state: snapshot first, then every log record after it.
struct Recovery {
    shard: usize,
    shards: usize,
    limits: Limits,
    resume: (u64, u64),
    groups: HashMap<u16, Group>,
    store: EventStore,
    /// Segments whose end replay passed, with their index file bodies (written after
    /// replay, before the shard serves).
    seals: Vec<(u64, Vec<u32>)>,
}

impl Recovery {
    fn new(settings: &ShardSettings, snapshot: Option<ShardSnapshot>) -> Result<Recovery, String> {
        let mut recovery = Recovery {
            shard: settings.index,
            shards: settings.shards,
            limits: settings.limits,
            resume: (1, 0),
            groups: HashMap::new(),
            store: EventStore::new(settings.hot_bytes),
            seals: Vec::new(),
        };
        if let Some(snapshot) = snapshot {
            recovery.resume = (snapshot.resume_epoch, snapshot.resume_offset);
            for g in snapshot.groups {
                let state = GroupState::decode_snapshot(&g.state, settings.limits)
                    .map_err(|e| format!("snapshot of group {}: {e}", g.group))?;
                let mut group = Group::new(settings.limits);
                group.state = state;
                group.last_index = g.committed_index;
                group.commit_index = g.committed_index;
                group.checksum = g.checksum;
                recovery.groups.insert(g.group, group);
            }
            recovery.store.restore(snapshot.sessions);
        }
        Ok(recovery)
    }

    fn replay(&mut self, item: Replayed) {
        let (loc, crc, rec) = match item {
            Replayed::Record(loc, crc, rec) => (loc, crc, rec),
            Replayed::SegmentEnd(epoch) => {
                let plan = self.store.plan_seal(epoch as u32);
                let offsets = self.store.apply_seal(plan);
                self.seals.push((epoch, offsets));
                return;
            }
        };
        assert_eq!(
            shards::shard_of(rec.group, self.shards),
            self.shard,
            "log record of group {} in shard {}'s log",
            rec.group,
            self.shard
        );
        let limits = &self.limits;
        let group = self
            .groups
            .entry(rec.group)
            .or_insert_with(|| Group::new(*limits));
        if replay_rule(group.commit_index, rec.index) == ReplayRule::Apply {
            assert_eq!(
                rec.index,
                group.last_index + 1,
                "log indexes of group {} are contiguous",
                rec.group
            );
            group.state.apply(&rec.command);
            group.state.commit(&rec.command);
            group.last_index = rec.index;
            group.commit_index = rec.index;
            group.checksum = fold_checksum(group.checksum, crc);
        }
        if let Command::Append(e) = &rec.command {
            if e.seq > self.store.last_seq(&e.session_id) {
                self.store
                    .insert(&e.session_id, e.seq, loc.epoch, loc.offset, None);
            }
        }
    }
}

/// Roughly the bytes a command takes in the log (its variable-size fields).
fn command_bytes(command: &Command) -> usize {
    const FIXED_BYTES: usize = 64;
    FIXED_BYTES
        + match command {
            Command::Append(e) => {
                e.session_id.len()
                    + e.event_type.len()
                    + e.payload.len()
                    + e.metadata.len()
                    + e.refs.len()
                    + e.actor.as_ref().map_or(0, String::len)
                    + e.source.as_ref().map_or(0, String::len)
                    + e.idempotency_key.as_ref().map_or(0, String::len)
                    + e.producer_id.as_ref().map_or(0, String::len)
            }
            Command::CreateSession(c) => c.session_id.len() + c.metadata.len(),
            Command::PatchSession(p) => p.session_id.len() + p.metadata.len(),
            Command::SetArchived(a) => a.session_id.len(),
            Command::ArchiveProgress(a) => a.session_id.len(),
            Command::Noop => 0,
        }
}

fn append_error(e: AppendError) -> ApiError {
    match e {
        AppendError::SessionNotFound => ApiError::SessionNotFound,
        AppendError::IdempotencyConflict { seq } => ApiError::IdempotencyConflict { seq },
        AppendError::ProducerSeqConflict {
            expected_producer_seq,
        } => ApiError::ProducerSeqConflict {
            expected_producer_seq,
        },
        AppendError::ExpectedSeqConflict {
            expected_seq,
            current_seq,
        } => ApiError::ExpectedSeqConflict {
            expected_seq,
            current_seq,
        },
    }
}
