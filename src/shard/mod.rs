//! One shard: the Raft groups it holds a replica of, their session state machines, its
//! write-ahead log and its event index. Everything here runs on one glommio executor;
//! other shards reach it only by message (see `node`), other nodes through the
//! shard's peer transport (see `replication`).
//!
//! The path of a write on the group's leader: decide against the state including
//! in-flight entries (`GroupState::decide_*`), propose the entry to Raft and `apply` it
//! to that state, hand the Ready to the shell (AppendEntries leave at once; the entry
//! joins the shard's next log batch); the committer writes every queued record of
//! every group in one batch with one fdatasync, reports it persisted; once a majority
//! holds it, the entry is committed: `commit`ted to the state (visible to reads, tails
//! woken) and the request waiting on that (index, term) is released. A request that
//! arrives on a node that does not lead the group is forwarded to the leader's shard of
//! the same index and answered by the node it arrived at.

mod archive;
mod damage;
mod recovery;
mod replication;
mod retention;
mod storage;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::channel::oneshot;
use glommio::channels::local_channel::{self, LocalSender};
use shards::entry::Command;
use shards::listing;
use shards::raft::{Config as RaftConfig, RaftNode};
use shards::replica::Refused;
use shards::session::{AppendDecision, AppendError, CreateError, Limits, PatchError};
use shards::validate::{render_event, NewEvent, NewSession, PatchRequest};

use crate::metrics::ShardStats;
use crate::node::with_timeout;
use crate::ops::{ApiError, ArchivedFilter, Op, Reply};
use crate::store::{Cold, EventStore, ReadPlan};
use crate::wal::{LogReader, LogSpace, ReadError, RecordLocation, Wal};

pub use archive::ArchiveLink;
pub use damage::{set_test_lead_to, DamageStats};
pub(crate) use recovery::{decode_snapshot_file, SNAPSHOT_FILE};
pub use replication::{set_isolated, start_transport, PeerSettings};
pub use retention::Retention;

/// Written (durably) in the shard's directory when the log's last batch was damaged
/// rather than torn by a crash (see `Wal::open`): until it is removed, every group of
/// the shard catches up before it votes, across restarts.
const DAMAGED_TAIL_MARKER: &str = "catching-up";

/// Whether the shard's groups must catch up after a damaged last batch (its marker
/// exists). A node alone has no replica to catch up from: it says what may be lost and
/// goes on.
fn damaged_tail_catch_up(shard: usize, marker: &Path, members: usize) -> Result<bool, String> {
    if !marker
        .try_exists()
        .map_err(|e| format!("{}: {e}", marker.display()))?
    {
        return Ok(false);
    }
    if members > 1 {
        tracing::warn!(
            shard,
            "the log's last batch was damaged: every group of this shard learns its term from \
             the other voters and catches up from its leader before it votes again"
        );
        return Ok(true);
    }
    tracing::error!(
        shard,
        "the log's last batch was damaged and this node has no replica: writes acknowledged \
         in that batch may be lost"
    );
    std::fs::remove_file(marker).map_err(|e| format!("delete {}: {e}", marker.display()))?;
    Ok(false)
}

/// Log records queued for the next batch, at most; past it writes answer 503 overloaded.
const PENDING_RECORDS_MAX: usize = 65_536;
/// Approximate bytes of log records queued for the next batch, at most (same answer).
const PENDING_BYTES_MAX: usize = 64 << 20;
/// `/health/ready` reports a group without a leader for this long (API.md: 3 s).
const LEADERLESS_AFTER: Duration = Duration::from_secs(3);
/// Requests from other nodes served at once, at most.
const FORWARDED_IN_FLIGHT_MAX: usize = 16_384;

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The Raft timing and log bounds of every group.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub tick: Duration,
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    /// Applied entries kept in memory per group (for followers that lag a little).
    pub log_entries: u64,
}

pub struct ShardSettings {
    pub index: usize,
    pub shards: usize,
    pub limits: Limits,
    pub request_timeout: Duration,
    pub hot_bytes: usize,
    pub node_id: u64,
    /// Every member's node id (just this node's for a cluster of one).
    pub members: Vec<u64>,
    pub raft: RaftSettings,
    /// The archiver, when `--postgres-url` is set.
    pub archive: Option<ArchiveLink>,
    /// This shard's share of the retention settings and disk budget.
    pub retention: Retention,
    /// A rebuild is under way (`crate::rebuild`): every group starts catching up.
    pub catch_up: Option<CatchUpSettings>,
    /// This shard's share of `--scrub-bytes-per-sec` (0: no background scrubbing).
    pub scrub_bytes_per_sec: u64,
}

/// How groups start when a rebuild is under way (`crate::rebuild`).
pub struct CatchUpSettings {
    /// Nothing was carried: groups learn the terms from their peers first.
    pub forget_votes: bool,
    /// Each group's carried term and vote; the shard writes them as the first records
    /// of its new log.
    pub carried: BTreeMap<u16, shards::raft::HardState>,
    /// Removes the marker once every shard has caught up.
    pub tracker: Arc<crate::rebuild::RebuildTracker>,
}

pub(crate) use shards::entry::{command_bytes, event_bytes, COMMAND_FIXED_BYTES};

/// At the seal of segment `epoch`: a record written there whose event is not indexed yet
/// (its entry not applied, a history event not installed) gets its offset appended to
/// the segment's index file `offsets`, and remembers its place there.
pub(crate) fn place_in_seal(
    loc: RecordLocation,
    sealed: &mut Option<u32>,
    epoch: u64,
    offsets: &mut Vec<u32>,
) {
    if u64::from(loc.epoch) == epoch && sealed.is_none() {
        *sealed = Some(offsets.len() as u32);
        offsets.push(loc.offset);
    }
}

/// Rendered events of one read, within a byte budget (but at least one event).
struct Page {
    events: Vec<(u64, Arc<str>)>,
    bytes: usize,
    max_bytes: usize,
}

impl Page {
    fn new(max_bytes: usize) -> Page {
        Page {
            events: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Adds the event if it fits; false (and nothing added) when it does not.
    fn push(&mut self, seq: u64, text: Arc<str>) -> bool {
        if !self.events.is_empty() && self.bytes + text.len() > self.max_bytes {
            return false;
        }
        self.bytes += text.len();
        self.events.push((seq, text));
        true
    }
}

/// A request waiting for the entry it proposed (`term` at that index) to commit.
/// This node's replica of one Raft group (`shards::replica`): a waiting request is
/// answered through a channel.
pub(crate) type Group = shards::replica::Replica<oneshot::Sender<bool>>;

pub struct ShardCore {
    pub index: usize,
    pub shards: usize,
    pub node_id: u64,
    members: Vec<u64>,
    request_timeout: Duration,
    raft_settings: RaftSettings,
    groups: RefCell<HashMap<u16, Group>>,
    /// Listing scans running at once (`shards::listing::SCANS_AT_ONCE_MAX`).
    listing_scans: glommio::sync::Semaphore,
    /// Ready writes waiting for the committer, in the order they were taken.
    units: RefCell<VecDeque<replication::WriteUnit>>,
    units_records: Cell<usize>,
    units_bytes: Cell<usize>,
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
    /// Index files of sealed segments still being written (readers use these).
    sealing: RefCell<HashMap<u32, Rc<Vec<u32>>>>,
    peers: RefCell<replication::Peers>,
    /// Groups with proposals not yet handed to Raft's Ready (see `run_driver`).
    proposed: RefCell<std::collections::BTreeSet<u16>>,
    wake_driver: LocalSender<()>,
    archive: Option<archive::ArchiveFeed>,
    retention: Retention,
    log_dir: PathBuf,
    /// The oldest log segment on disk.
    oldest_segment: Cell<u64>,
    /// Replay after a restart starts in this segment (the last durable snapshot's).
    snapshot_resume_epoch: Cell<u64>,
    /// A rebuild is under way and some group of this shard is still catching up.
    rebuild: RefCell<Option<Arc<crate::rebuild::RebuildTracker>>>,
    /// The log's last batch was damaged (`DAMAGED_TAIL_MARKER`): removed once no group
    /// of this shard is catching up any more.
    tail_marker: RefCell<Option<PathBuf>>,
    /// The log's files, room and storage-full state (see `storage`).
    space: Rc<LogSpace>,
    /// Bytes of the active segment kept for Raft's records (`shards::storage`).
    reserve_bytes: u64,
    /// The committer writes nothing: no room and no next segment.
    log_blocked: Cell<bool>,
    /// Failed file creations are tried again from then on.
    storage_retry_at: Cell<Instant>,
    snapshot_retry_at: Cell<Instant>,
    /// A shard whose storage is full hands leadership away again from then on.
    handoff_at: Cell<Option<Instant>>,
    handoff_turn: Cell<usize>,
    /// A shard snapshot is wanted at the next batch (damage was found or repaired).
    snapshot_soon: Cell<bool>,
    /// Damaged data found on this replica, and its repair (see `damage`).
    damage: RefCell<damage::DamageLog>,
    wake_repairer: LocalSender<()>,
    wake_scrubber: LocalSender<()>,
    scrub_bytes_per_sec: u64,
}

/// Ops that change state: after a forwarding timeout their outcome is unknown.
fn is_write(op: &Op) -> bool {
    matches!(
        op,
        Op::Create { .. } | Op::Patch { .. } | Op::SetArchived { .. } | Op::Append { .. }
    )
}

/// The session an op is about, if it is about one.
fn session_of(op: &Op) -> Option<&str> {
    match op {
        Op::Create { id, .. }
        | Op::Get { id }
        | Op::Patch { id, .. }
        | Op::SetArchived { id, .. }
        | Op::Append { id, .. }
        | Op::Read { id, .. } => Some(id),
        _ => None,
    }
}

impl ShardCore {
    /// Recovers the shard (snapshot, then the log after it), starts its committer and
    /// its Raft clock. Peers are attached afterwards with [`start_transport`].
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
        let (snapshot, snapshot_damaged) = match recovery::load_snapshot(dir).await? {
            recovery::Loaded::None => (None, false),
            recovery::Loaded::Snapshot(snapshot, notes) => {
                let damaged = !notes.is_empty();
                for note in notes {
                    tracing::warn!(shard = settings.index, damage = %note, "snapshot file: damage outside its checksummed body; it is used, and rewritten soon");
                }
                (Some(*snapshot), damaged)
            }
            recovery::Loaded::Damaged(why) => {
                recovery::replay_without_snapshot(&log_dir, &why)?;
                tracing::warn!(
                    shard = settings.index,
                    damage = %why,
                    "the shard snapshot is damaged; the log still holds everything from its \
                     first segment, so state is rebuilt from the whole log and a new snapshot \
                     is written"
                );
                (None, true)
            }
        };
        let mut recovery = recovery::Recovery::new(&settings, snapshot)?;
        let resume = recovery.resume;
        let mut replay_error = None;
        let space = LogSpace::new(settings.index, settings.retention.max_disk_bytes);
        let replay = |item| {
            if replay_error.is_none() {
                if let Err(e) = recovery.replay(item) {
                    replay_error = Some(e);
                }
            }
        };
        let tail_marker = dir.join(DAMAGED_TAIL_MARKER);
        let mut wal = Wal::open(
            &log_dir,
            segment_bytes,
            fsync_delay,
            resume,
            space.clone(),
            &tail_marker,
            replay,
        )
        .await
        .map_err(|e| match snapshot_damaged {
            true => format!("{e} (the shard snapshot was damaged, so the whole log was replayed)"),
            false => e,
        })?;
        if let Some(e) = replay_error {
            return Err(e);
        }
        let (mut recovered, mut store, seals, later_repairs) = recovery.finish();
        // Runs of segments retention deleted after the snapshot was taken.
        let oldest_segment = crate::wal::segment_epochs(&log_dir)?
            .first()
            .copied()
            .unwrap_or(1);
        if oldest_segment > 1 {
            store.drop_through((oldest_segment - 1) as u32);
        }
        // Segments sealed during replay get their index files (again: an old one, if
        // any, may be missing or may not match the runs replay just built). One that
        // cannot be written (full disk) stays in memory, where readers find it, and is
        // written when space returns.
        let mut sealing = HashMap::new();
        for (epoch, offsets) in seals {
            let bytes =
                shards::snapshot::encode_sidecar(epoch, &offsets, shards::codec::BLOCK_BYTES);
            if let Err(e) = wal.write_index(epoch, &bytes).await {
                space.record(shards::storage::FileKind::Index, Err(e));
                let epoch = u32::try_from(epoch).expect("epoch fits u32");
                sealing.insert(epoch, Rc::new(offsets));
            }
        }
        wal.start_next();
        let members = if settings.members.is_empty() {
            vec![settings.node_id]
        } else {
            settings.members.clone()
        };
        let tail_catch_up = damaged_tail_catch_up(settings.index, &tail_marker, members.len())?;
        let mut groups = HashMap::new();
        let mut carried_to_write = Vec::new();
        for group in
            (0..shards::GROUPS).filter(|&g| shards::shard_of(g, settings.shards) == settings.index)
        {
            let voters = shards::voters_of(group, &members);
            if !voters.contains(&settings.node_id) {
                continue;
            }
            let seed = (settings.node_id << 16 | u64::from(group)) ^ now_us() as u64;
            let r = recovered
                .remove(&group)
                .unwrap_or_else(|| shards::replay::Replay::new(settings.limits).finish());
            let mut restored = r.raft;
            if let Some(carried) = settings
                .catch_up
                .as_ref()
                .and_then(|c| c.carried.get(&group))
            {
                let before = restored.hard_state;
                restored.hard_state.merge(carried.term, carried.vote);
                if restored.hard_state != before {
                    carried_to_write.push((group, restored.hard_state));
                }
            }
            let mut raft = RaftNode::new(
                raft_config(&settings.raft),
                settings.node_id,
                voters,
                seed,
                Some(restored),
            );
            if let Some(c) = &settings.catch_up {
                raft = raft.catch_up(c.forget_votes);
            } else if tail_catch_up {
                // The dropped batch may have held a vote it cast: the term and vote are
                // learnt from the other voters before anything else (thesis §3.8).
                raft = raft.catch_up(true);
            }
            groups.insert(group, Group::new(group, raft, r.recovered, settings.limits));
        }
        let (wake_committer, wake_rx) = local_channel::new_bounded(1);
        let (wake_driver, driver_rx) = local_channel::new_bounded(1);
        let (wake_repairer, repairer_rx) = local_channel::new_bounded(1);
        let (wake_scrubber, scrubber_rx) = local_channel::new_bounded(1);
        let mut damage = damage::DamageLog::default();
        if snapshot_damaged {
            damage.found_snapshot_damage(&dir.join(recovery::SNAPSHOT_FILE));
        }
        let core = Rc::new(ShardCore {
            index: settings.index,
            shards: settings.shards,
            node_id: settings.node_id,
            members,
            request_timeout: settings.request_timeout,
            raft_settings: settings.raft.clone(),
            dir: dir.to_path_buf(),
            groups: RefCell::new(groups),
            listing_scans: glommio::sync::Semaphore::new(listing::SCANS_AT_ONCE_MAX as u64),
            units: RefCell::new(VecDeque::new()),
            units_records: Cell::new(0),
            units_bytes: Cell::new(0),
            wake_committer,
            store: RefCell::new(store),
            reader: wal.reader(),
            stats: RefCell::new(ShardStats::default()),
            tail_waiters: RefCell::new(HashMap::new()),
            shutting_down: Cell::new(false),
            durable_position: Cell::new(wal.durable_position()),
            snapshot_log_bytes,
            snapshot_running: Cell::new(false),
            sealing: RefCell::new(sealing),
            peers: RefCell::new(replication::Peers::default()),
            proposed: RefCell::new(std::collections::BTreeSet::new()),
            wake_driver,
            archive: settings.archive.map(archive::ArchiveFeed::new),
            retention: settings.retention,
            log_dir,
            oldest_segment: Cell::new(oldest_segment),
            snapshot_resume_epoch: Cell::new(resume.0),
            rebuild: RefCell::new(settings.catch_up.map(|c| c.tracker)),
            tail_marker: RefCell::new(tail_catch_up.then_some(tail_marker)),
            space,
            reserve_bytes: shards::storage::reserve_bytes(segment_bytes),
            log_blocked: Cell::new(false),
            storage_retry_at: Cell::new(Instant::now()),
            snapshot_retry_at: Cell::new(Instant::now()),
            handoff_at: Cell::new(None),
            handoff_turn: Cell::new(0),
            snapshot_soon: Cell::new(snapshot_damaged),
            damage: RefCell::new(damage),
            wake_repairer,
            wake_scrubber,
            scrub_bytes_per_sec: settings.scrub_bytes_per_sec,
        });
        // The carried terms and votes are the first records of the new log; they go
        // before anything this node promises (one durable batch at a time, in order).
        core.write_hard_states(carried_to_write);
        glommio::spawn_local(core.clone().run_retention()).detach();
        glommio::spawn_local(core.clone().run_repairer(repairer_rx)).detach();
        glommio::spawn_local(core.clone().run_scrubber(scrubber_rx)).detach();
        glommio::spawn_local(core.clone().run_driver(driver_rx)).detach();
        glommio::spawn_local(core.clone().run_committer(wal, wake_rx)).detach();
        core.start_raft().await;
        // Starting Raft applied the committed entries after the snapshot: the events
        // repaired among them are indexed now.
        for (session, seq, loc) in later_repairs {
            core.store
                .borrow_mut()
                .repair(&session, seq, loc.epoch, loc.offset);
        }
        Ok(core)
    }

    /// Runs one operation for a session owned by this shard: here when this node leads
    /// the session's group, else on the leader's shard (forwarded).
    pub async fn execute(&self, op: Op) -> Reply {
        match op {
            Op::Stats => Reply::Stats(Box::new(self.stats_snapshot())),
            Op::DebugGroup { group } => Reply::Debug(self.debug_group(group)),
            Op::ReadIndex { groups } => Reply::ReadIndex(self.read_index(&groups).await),
            // Served by any replica from its own log (another replica's copy is damaged).
            Op::FetchEvents {
                id,
                after,
                through,
                max_bytes,
            } => self.serve_fetch(&id, after, through, max_bytes).await,
            Op::List {
                after,
                limit,
                archived,
                filters,
            } => {
                self.catch_up_with_leaders().await;
                let leading: Vec<u16> = self
                    .groups
                    .borrow()
                    .iter()
                    .filter(|(_, g)| g.leading)
                    .map(|(&id, _)| id)
                    .collect();
                for group in leading {
                    let _ = self.read_barrier(group).await;
                }
                self.list(after, limit, archived, &filters).await
            }
            // Tails read this replica's committed prefix (forwarded only when this node
            // holds no replica of the group).
            Op::Read {
                ref id,
                wait: Some(_),
                ..
            } if self.replicates(shards::group_of(id)) => self.execute_local(op).await,
            op => self.route(op).await,
        }
    }

    fn replicates(&self, group: u16) -> bool {
        self.groups.borrow().contains_key(&group)
    }

    /// Runs a session op where the group's leader is, retrying while leadership moves,
    /// until the request timeout.
    async fn route(&self, op: Op) -> Reply {
        let Some(id) = session_of(&op) else {
            return Reply::Error(ApiError::Internal(format!("op without a session: {op:?}")));
        };
        let group = shards::group_of(id);
        // A long-poll read forwarded to a replica may wait that long before answering.
        let waits = match &op {
            Op::Read { wait: Some(w), .. } => *w,
            _ => Duration::ZERO,
        };
        let deadline = Instant::now() + self.request_timeout + waits;
        let mut hint: Option<u64> = None;
        let mut encoded: Option<Vec<u8>> = None;
        let mut attempt = 0usize;
        loop {
            let leader = hint.take().or_else(|| self.leader_of(group, attempt));
            attempt += 1;
            match leader {
                Some(leader) if leader == self.node_id => return self.execute_local(op).await,
                Some(leader) => {
                    if encoded.is_none() {
                        match crate::forward::encode_op(&op) {
                            Ok(bytes) => encoded = Some(bytes),
                            Err(e) => return Reply::Error(ApiError::Internal(e)),
                        }
                    }
                    let body = encoded.as_deref().expect("encoded");
                    match self.forward(leader, Some(group), body, deadline).await {
                        Ok(Reply::Error(ApiError::NotLeader { leader: next })) => {
                            hint = next.filter(|&n| n != leader);
                        }
                        Ok(reply) => return reply,
                        Err(replication::ForwardError::TimedOut) => {
                            return Reply::Error(if is_write(&op) {
                                ApiError::CommitUnknown
                            } else {
                                ApiError::Unavailable
                            });
                        }
                        // A write that may have reached the old leader must not be sent
                        // again: the client retries (with its idempotency key).
                        Err(replication::ForwardError::Abandoned) if is_write(&op) => {
                            return Reply::Error(ApiError::CommitUnknown);
                        }
                        Err(_) => {}
                    }
                }
                None => {}
            }
            if self.shutting_down.get() || Instant::now() + self.raft_settings.tick >= deadline {
                return Reply::Error(ApiError::Unavailable);
            }
            if hint.is_none() {
                glommio::timer::sleep(self.raft_settings.tick).await;
            }
        }
    }

    /// The node to send a group's requests to: its leader as this replica knows it, or
    /// (no replica here) one of its voters in turn, which answers with the leader.
    fn leader_of(&self, group: u16, attempt: usize) -> Option<u64> {
        if let Some(g) = self.groups.borrow().get(&group) {
            return g.raft.leader();
        }
        let voters = shards::voters_of(group, &self.members);
        voters.get(attempt % voters.len().max(1)).copied()
    }

    /// Runs an op on this replica (sent here by `route`, locally or from another node).
    /// Writes and read-your-writes reads need this node to lead the group.
    pub(crate) async fn execute_local(&self, op: Op) -> Reply {
        if let Some(id) = session_of(&op) {
            let group = shards::group_of(id);
            let tail = matches!(op, Op::Read { wait: Some(_), .. });
            let leader = self
                .groups
                .borrow()
                .get(&group)
                .map(|g| (g.leading, g.raft.leader()));
            match leader {
                None => return Reply::Error(ApiError::NotLeader { leader: None }),
                Some((false, leader)) if !tail => {
                    return Reply::Error(ApiError::NotLeader { leader })
                }
                _ => {}
            }
        }
        match op {
            Op::Create {
                id,
                title,
                metadata,
            } => self.create(id, title, metadata).await,
            Op::Get { id } => self.get(&id).await,
            Op::Patch { id, patch } => self.patch(&id, &patch).await,
            Op::SetArchived { id, archived } => self.set_archived(&id, archived).await,
            Op::Append { id, event } => self.append(&id, &event).await,
            Op::Read {
                id,
                after,
                max_events,
                max_bytes,
                wait,
            } => {
                if wait.is_none() {
                    if let Err(e) = self.read_barrier(shards::group_of(&id)).await {
                        return Reply::Error(e);
                    }
                }
                self.read(&id, after, max_events, max_bytes, wait).await
            }
            other => Box::pin(self.execute(other)).await,
        }
    }

    /// `(group, commit index)` of each listed group this node leads (a read index),
    /// once it has committed an entry of its term (see `read_barrier`).
    async fn read_index(&self, groups: &[u16]) -> Vec<(u16, u64)> {
        let mut out = Vec::with_capacity(groups.len());
        for &group in groups {
            if self.read_barrier(group).await.is_err() {
                continue;
            }
            if let Some(g) = self.groups.borrow().get(&group) {
                out.push((group, g.raft.commit_index()));
            }
        }
        out
    }

    /// Before a listing on a follower: asks each leader node (one request per node, for
    /// all the groups it leads here) for its commit indexes and waits until this
    /// replica has applied them, so the listing reflects every acknowledged write.
    async fn catch_up_with_leaders(&self) {
        let mut by_leader: BTreeMap<u64, Vec<u16>> = BTreeMap::new();
        for (&group, g) in self.groups.borrow().iter() {
            match g.raft.leader() {
                Some(leader) if leader != self.node_id => {
                    by_leader.entry(leader).or_default().push(group)
                }
                _ => {}
            }
        }
        let deadline = Instant::now() + self.request_timeout;
        for (leader, groups) in by_leader {
            let Ok(body) = crate::forward::encode_op(&Op::ReadIndex { groups }) else {
                continue;
            };
            let Ok(Reply::ReadIndex(indexes)) = self.forward(leader, None, &body, deadline).await
            else {
                continue;
            };
            for (group, commit) in indexes {
                while Instant::now() < deadline
                    && self
                        .groups
                        .borrow()
                        .get(&group)
                        .is_some_and(|g| g.applied < commit)
                {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }

    /// Proposes `command` (decided against the leader's state) and applies it to that
    /// state; returns its (index, term).
    fn propose(&self, group: u16, command: Command) -> Result<(u64, u64), ApiError> {
        if self.shutting_down.get() {
            return Err(ApiError::Unavailable);
        }
        // Decided after the dedupe rules (callers answered retries before proposing).
        // What frees space (archive progress) still goes through a full disk.
        let bytes = command_bytes(&command);
        let class = shards::storage::WriteClass::of_proposal(&command);
        match shards::storage::admit(class, self.space.full(), self.room(), bytes as u64) {
            shards::storage::Admission::Admit => {}
            shards::storage::Admission::Full(_) => return Err(ApiError::StorageFull),
            shards::storage::Admission::Wait => return Err(ApiError::Overloaded),
        }
        if self.units_records.get() >= PENDING_RECORDS_MAX
            || (self.units_bytes.get() > 0 && self.units_bytes.get() + bytes > PENDING_BYTES_MAX)
        {
            return Err(ApiError::Overloaded);
        }
        let proposed = {
            let mut groups = self.groups.borrow_mut();
            let g = groups
                .get_mut(&group)
                .ok_or(ApiError::NotLeader { leader: None })?;
            g.propose(command).map_err(|refused| match refused {
                Refused::NotLeader { leader } => ApiError::NotLeader { leader },
                Refused::Transferring => ApiError::Unavailable,
                Refused::Backpressure => ApiError::Overloaded,
            })
        };
        if proposed.is_ok() {
            // Proposals of this turn of the executor leave together (one Ready per group,
            // one AppendEntries per follower, one send per peer).
            if self.proposed.borrow_mut().insert(group) {
                let _ = self.wake_driver.try_send(());
            }
        }
        proposed
    }

    /// Waits until entry `index` of `term` is committed. A timeout, or the entry being
    /// replaced, leaves the outcome unknown.
    async fn wait_commit(&self, group: u16, index: u64, term: u64) -> Result<(), ApiError> {
        let rx = {
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(&group) else {
                return Err(ApiError::CommitUnknown);
            };
            // Already applied: committed if the entry there is still ours (callers read
            // `term` from the log in the same step, so it has not been compacted).
            if let Some(committed) = g.outcome(index, term) {
                return if committed {
                    Ok(())
                } else {
                    Err(ApiError::CommitUnknown)
                };
            }
            let (tx, rx) = oneshot::channel();
            g.wait(index, term, tx);
            rx
        };
        match with_timeout(self.request_timeout, rx).await {
            Some(Ok(true)) => Ok(()),
            // Replaced entries, lost leadership, shutdown and timeouts all leave the
            // outcome unknown.
            _ => Err(ApiError::CommitUnknown),
        }
    }

    /// A reply decided against in-flight entries is sent only once they are committed,
    /// so a client never sees a result that a failure could take back (API.md).
    async fn settle(&self, group: u16) -> Result<(), ApiError> {
        let last = {
            let groups = self.groups.borrow();
            let Some(g) = groups.get(&group) else {
                return Err(ApiError::Unavailable);
            };
            g.settle_point()
        };
        self.wait_commit(group, last.0, last.1).await
    }

    async fn propose_and_wait(&self, group: u16, command: Command) -> Result<(), ApiError> {
        let (index, term) = self.propose(group, command)?;
        self.wait_commit(group, index, term).await
    }

    fn with_group<T>(&self, group: u16, f: impl FnOnce(&mut Group) -> T) -> Result<T, ApiError> {
        let mut groups = self.groups.borrow_mut();
        match groups.get_mut(&group) {
            Some(g) if g.leading => Ok(f(g)),
            Some(g) => Err(ApiError::NotLeader {
                leader: g.raft.leader(),
            }),
            None => Err(ApiError::NotLeader { leader: None }),
        }
    }

    fn render_view(&self, group: u16, id: &str) -> Reply {
        match self.groups.borrow().get(&group).map(|g| g.state.view(id)) {
            Some(Some(view)) => Reply::Session(shards::session::render_session(view)),
            _ => Reply::Error(ApiError::SessionNotFound),
        }
    }

    async fn create(&self, id: String, title: Option<String>, metadata: String) -> Reply {
        let group = shards::group_of(&id);
        let request = NewSession {
            id: Some(id.clone()),
            title,
            metadata,
        };
        let decided = match self.with_group(group, |g| {
            g.state.decide_create(&request, id.clone(), now_us())
        }) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
        let result = match decided {
            Ok(command) => self.propose_and_wait(group, command).await,
            Err(CreateError::SessionExists) => {
                self.settle(group).await.and(Err(ApiError::SessionExists))
            }
        };
        match result {
            Ok(()) => self.render_view(group, &id),
            Err(e) => Reply::Error(e),
        }
    }

    async fn get(&self, id: &str) -> Reply {
        let group = shards::group_of(id);
        if let Err(e) = self.read_barrier(group).await {
            return Reply::Error(e);
        }
        self.render_view(group, id)
    }

    /// Before a leader serves a read: it has committed an entry of its own term, so its
    /// committed state holds every acknowledged write (Raft §8; a new leader learns what
    /// its predecessors committed only by committing its own no-op).
    async fn read_barrier(&self, group: u16) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let state = self
                .groups
                .borrow()
                .get(&group)
                .map(|g| (g.leading, g.applied_term == g.raft.term()));
            match state {
                Some((true, true)) => return Ok(()),
                Some((true, false)) if Instant::now() < deadline && !self.shutting_down.get() => {
                    glommio::timer::sleep(Duration::from_micros(500)).await;
                }
                Some((true, false)) => return Err(ApiError::Unavailable),
                Some((false, _)) => {
                    let leader = self
                        .groups
                        .borrow()
                        .get(&group)
                        .and_then(|g| g.raft.leader());
                    return Err(ApiError::NotLeader { leader });
                }
                None => return Err(ApiError::NotLeader { leader: None }),
            }
        }
    }

    async fn patch(&self, id: &str, patch: &PatchRequest) -> Reply {
        let group = shards::group_of(id);
        let decided = match self.with_group(group, |g| g.state.decide_patch(id, patch, now_us())) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
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

    async fn set_archived(&self, id: &str, archived: bool) -> Reply {
        let group = shards::group_of(id);
        let decided = match self.with_group(group, |g| {
            g.state.decide_set_archived(id, archived, now_us())
        }) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
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
        let decided = match self.with_group(group, |g| g.state.decide_append(id, event, now_us())) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
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
        match self
            .groups
            .borrow()
            .get(&group)
            .and_then(|g| g.state.view(id))
        {
            Some(view) => Reply::Appended {
                seq,
                last_seq: view.last_seq,
                deduped,
                archived_seq: view.archived_seq,
            },
            None => Reply::Error(ApiError::SessionNotFound),
        }
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
            let last_seq = self
                .groups
                .borrow()
                .get(&group)
                .and_then(|g| g.state.view(id))
                .map(|v| v.last_seq);
            let Some(last_seq) = last_seq else {
                return Reply::Error(ApiError::SessionNotFound);
            };
            let plan = self.store.borrow().plan_read(id, after, max_events);
            if let Some(gone) = plan.gone {
                return match self.read_gone(id, after, gone, max_events, max_bytes).await {
                    Ok(events) => Reply::Events { events, last_seq },
                    Err(e) => Reply::Error(e),
                };
            }
            if plan.cold.is_empty() && plan.hot.is_empty() && !waited {
                if let Some(wait) = wait {
                    self.wait_for_event(id, wait).await;
                    waited = true;
                    continue;
                }
            }
            let mut page = Page::new(max_bytes);
            return match self.materialize(id, plan, &mut page).await {
                Ok(()) => Reply::Events {
                    events: page.events,
                    last_seq,
                },
                // Retention deleted the segment between planning and reading: plan
                // again (the range now comes from the archive, or is expired).
                Err(_) if self.store.borrow().first_local_seq(id) > after + 1 => continue,
                Err(e) => Reply::Error(e),
            };
        }
    }

    /// A read starting before the local log (events `after+1..=gone` left it): those
    /// come from the archive, then the local log goes on from `gone + 1` in the same
    /// page. Without an archive they are expired.
    async fn read_gone(
        &self,
        id: &str,
        after: u64,
        gone: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Arc<str>)>, ApiError> {
        if self.archive.is_none() {
            return Err(ApiError::EventsExpired {
                first_available_seq: gone + 1,
            });
        }
        let want = (gone - after).min(max_events as u64);
        let mut page = Page::new(max_bytes);
        for (seq, text) in self.read_archive(id, after, want).await? {
            if !page.push(seq, text) {
                return Ok(page.events);
            }
        }
        let next = page.events.last().map_or(after, |e| e.0);
        let room = max_events - page.events.len();
        if next == gone && room > 0 {
            let plan = self.store.borrow().plan_read(id, gone, room);
            if plan.gone.is_none() {
                self.materialize(id, plan, &mut page).await?;
            }
        }
        Ok(page.events)
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

    /// Adds a read plan's events to `page`: cold ones are read back from the log (or,
    /// where the local copy is damaged, from another replica). Stops at the first event
    /// that does not fit.
    async fn materialize(&self, id: &str, plan: ReadPlan, page: &mut Page) -> Result<(), ApiError> {
        let mut take =
            |e: shards::entry::AppendEntry| page.push(e.seq, Arc::from(render_event(&e)));
        if !self.read_cold_events(id, &plan.cold, &mut take).await? {
            return Ok(());
        }
        for (seq, text) in plan.hot {
            if !page.push(seq, text) {
                break;
            }
        }
        Ok(())
    }

    /// Log locations of cold events (all direct, or one sealed run).
    async fn resolve(&self, cold: &[(u64, Cold)]) -> Result<Vec<(u64, RecordLocation)>, ReadError> {
        match cold[0].1 {
            Cold::Active { .. } | Cold::Repaired { .. } => Ok(cold
                .iter()
                .map(|&(seq, c)| match c {
                    Cold::Active { epoch, offset } | Cold::Repaired { epoch, offset } => {
                        (seq, RecordLocation { epoch, offset })
                    }
                    Cold::Sealed { .. } => unreachable!("sealed_run keeps runs apart"),
                })
                .collect()),
            Cold::Sealed { epoch, index } => {
                let pending = self.sealing.borrow().get(&epoch).cloned();
                let offsets = match pending {
                    Some(offsets) => {
                        let start = index as usize;
                        let slice = offsets.get(start..start + cold.len()).ok_or_else(|| {
                            ReadError::Io(std::io::Error::other(format!(
                                "index of segment {epoch} being written lacks entries {start}.."
                            )))
                        })?;
                        slice.to_vec()
                    }
                    None => self.reader.read_offsets(epoch, index, cold.len() as u32)?,
                };
                Ok(cold
                    .iter()
                    .zip(offsets)
                    .map(|(&(seq, _), offset)| (seq, RecordLocation { epoch, offset }))
                    .collect())
            }
        }
    }

    /// Events `after+1 ..= through` of a session, read back from the log (the index
    /// says where; damaged ones come from another replica), stopping before
    /// `max_bytes` (`event_bytes`) would be passed, but with at least one event.
    /// Returns them and whether the range was read whole.
    pub(crate) async fn read_log_events(
        &self,
        id: &str,
        after: u64,
        through: u64,
        max_bytes: usize,
    ) -> Result<(Vec<shards::entry::AppendEntry>, bool), String> {
        let locations = self.store.borrow().locations(id, after, through);
        let mut events = Vec::with_capacity(locations.len());
        let mut bytes = 0usize;
        let mut take = |e: shards::entry::AppendEntry| {
            let size = event_bytes(&e);
            if !events.is_empty() && bytes + size > max_bytes {
                return false;
            }
            bytes += size;
            events.push(e);
            true
        };
        self.read_cold_events(id, &locations, &mut take)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let complete = events.last().map_or(after, |e| e.seq) >= through;
        Ok((events, complete))
    }

    /// This shard's part of a listing page (`shards::listing`). The scan yields to the
    /// executor between chunks and only a few scans run at once, so however many
    /// listings are in flight, a ready append waits for at most a few chunks; the scan
    /// holds no borrow across those yields.
    async fn list(
        &self,
        after: Option<String>,
        limit: usize,
        archived: ArchivedFilter,
        filters: &[(String, String)],
    ) -> Reply {
        let wanted = |view: &shards::session::SessionView| {
            let flag = match archived {
                ArchivedFilter::Active => !view.archived,
                ArchivedFilter::Archived => view.archived,
                ArchivedFilter::All => true,
            };
            flag && shards::session::metadata_matches(view, filters)
        };
        let examine_max = listing::examined_per_shard(self.shards);
        let mut scan = listing::Scan::new(after, limit + 1, examine_max);
        // Waiting listings cost nothing; the semaphore is never closed.
        let Ok(_scanning) = self.listing_scans.acquire_permit(1).await else {
            return Reply::Error(ApiError::Unavailable);
        };
        loop {
            let finished = {
                let groups = self.groups.borrow();
                scan.step(groups.values().map(|g| &g.state), wanted)
            };
            if finished {
                break;
            }
            yield_to_io().await;
        }
        let groups = self.groups.borrow();
        // A session's group may have left this shard during the scan: it is left out.
        let part = listing::render_part(scan.finish(), |id| {
            let view = groups.get(&shards::group_of(id))?.state.view(id)?;
            Some(shards::session::render_session(view))
        });
        Reply::Sessions(part)
    }

    /// `GET /debug/groups/:g`: this replica's view of one group, for tests that compare
    /// replicas directly (served locally, never forwarded).
    fn debug_group(&self, group: u16) -> String {
        let groups = self.groups.borrow();
        let Some(g) = groups.get(&group) else {
            return serde_json::json!({
                "group": group,
                "shard": self.index,
                "role": "none",
                "voters": shards::voters_of(group, &self.members),
            })
            .to_string();
        };
        let mut sessions = serde_json::Map::new();
        for view in g.state.views() {
            sessions.insert(view.id.clone(), view.last_seq.into());
        }
        let role = match g.raft.role() {
            shards::raft::Role::Leader => "leader",
            shards::raft::Role::Follower => "follower",
            shards::raft::Role::Candidate => "candidate",
            shards::raft::Role::PreCandidate => "precandidate",
        };
        serde_json::json!({
            "group": group,
            "shard": self.index,
            "node": self.node_id,
            "role": role,
            "term": g.raft.term(),
            "leader": g.raft.leader(),
            "voters": g.raft.voters(),
            "commit_index": g.raft.commit_index(),
            "applied_index": g.applied,
            "last_index": g.raft.last_index(),
            "snapshot_index": g.raft.snapshot_index(),
            "catching_up": g.raft.is_catching_up(),
            "checksum": format!("{:016x}", g.checksum),
            "sessions": sessions,
        })
        .to_string()
    }

    /// Groups with a replica here that have had no leader for `LEADERLESS_AFTER` (or
    /// never had one since start).
    fn groups_without_leader(&self) -> Vec<u16> {
        let ticks = LEADERLESS_AFTER.as_nanos() / self.raft_settings.tick.as_nanos().max(1);
        let mut out: Vec<u16> = self
            .groups
            .borrow()
            .iter()
            .filter(|(_, g)| u128::from(g.ticks_without_leader()) >= ticks.max(1))
            .map(|(&id, _)| id)
            .collect();
        out.sort_unstable();
        out
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
        stats.commit_index_sum = groups.values().map(|g| g.applied).sum();
        stats.groups_leading = groups.values().filter(|g| g.leading).count() as u64;
        stats.groups_without_leader = groups
            .values()
            .filter(|g| g.raft.leader().is_none())
            .count() as u64;
        drop(groups);
        stats.leaderless = self.groups_without_leader();
        (stats.refused_by, stats.peers_refused) = self.refusals();
        stats.groups_catching_up = self
            .groups
            .borrow()
            .values()
            .filter(|g| g.raft.is_catching_up())
            .count() as u64;
        stats.log_disk_bytes = self.space.files_bytes();
        stats.storage_full = self
            .space
            .full()
            .map(|reason| crate::metrics::StorageFull {
                shard: self.index,
                reason,
                log_blocked: self.log_blocked.get(),
            })
            .into_iter()
            .collect();
        stats.archive = self.archive_stats();
        stats.archiver = self.archive.as_ref().map(|feed| feed.stats().clone());
        stats.damage = self.damage.borrow().stats();
        stats.repaired_events = self.store.borrow().repaired_count() as u64;
        stats
    }

    /// True when nothing is queued or being written, and every group this node leads
    /// has committed all of its entries.
    pub fn idle(&self) -> bool {
        self.units.borrow().is_empty()
            && self
                .groups
                .borrow()
                .values()
                .all(|g| !g.leading || g.raft.commit_index() == g.raft.last_index())
    }
}

fn raft_config(settings: &RaftSettings) -> RaftConfig {
    RaftConfig {
        election_ticks: settings.election_ticks,
        heartbeat_ticks: settings.heartbeat_ticks,
        max_inflight: 64,
        max_entries_per_msg: 512,
        max_bytes_per_msg: 1 << 20,
        snapshot_chunk_bytes: 1 << 20,
        max_uncommitted_entries: PENDING_RECORDS_MAX as u64,
        pre_vote: true,
        check_quorum: true,
    }
}

/// How many cold events from the first one are read together: direct locations
/// (active segment or repaired copies) together, or one run of consecutive entries of a
/// sealed segment's index file.
pub(super) fn sealed_run(cold: &[(u64, Cold)]) -> usize {
    let direct = |c: Cold| matches!(c, Cold::Active { .. } | Cold::Repaired { .. });
    let mut n = 1;
    while n < cold.len() {
        let same = match (cold[n - 1].1, cold[n].1) {
            (a, b) if direct(a) && direct(b) => true,
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

/// Lets the executor collect socket and disk completions and run every task they wake
/// before going on. A plain `yield_now` is not enough: glommio polls for I/O only when
/// its task queue has nothing ready to run (or its 100 ms preemption timer fires), so a
/// task that is always ready would hold every append's I/O back by 100 ms per step. A
/// timer, by contrast, can fire only from that poll.
async fn yield_to_io() {
    glommio::timer::sleep(Duration::from_micros(10)).await;
}
