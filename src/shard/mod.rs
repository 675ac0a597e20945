//! One shard: the Raft groups it holds a replica of, their session state machines, its
//! write-ahead log and its event index. Everything here runs on one glommio executor;
//! other shards reach it only by message (see `node`), other nodes through the
//! shard's peer transport (see `peers`).
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
//!
//! The shell is split by concept (docs/architecture.md, "The shard shell"): `start`
//! (recovery and the tasks), `routing` (where an op runs), `requests` (writes and
//! session reads on the leader), `reads` (events, tails, listings), `driver` (every
//! group's steps and their effects, the Raft clock), `commit` (the committer and group
//! commit), `snapshots` (shard snapshots and snapshots for followers), `peers` (the
//! transport and the outbox), `forwarding` (requests between nodes), `leadership`
//! (handing groups away), `storage` (a full disk), `retention`, `archive` (the
//! Postgres feed), `damage` (damaged data, its repair and the scrubber) and `status`.

mod archive;
mod commit;
mod damage;
mod driver;
mod forwarding;
mod leadership;
mod peers;
mod reads;
mod recovery;
mod requests;
mod retention;
mod routing;
mod snapshots;
mod start;
mod status;
mod storage;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::channel::oneshot;
use glommio::channels::local_channel::LocalSender;
use shards::session::Limits;

use crate::metrics::ShardStats;
use crate::store::EventStore;
use crate::wal::{LogReader, LogSpace, RecordLocation};

pub use archive::ArchiveLink;
pub use damage::{set_test_lead_to, DamageStats};
pub use peers::{set_isolated, start_transport, PeerSettings};
pub(crate) use recovery::{decode_snapshot_file, SNAPSHOT_FILE};
pub use retention::Retention;

/// Log records queued for the next batch, at most; past it writes answer 503 overloaded.
const PENDING_RECORDS_MAX: usize = 65_536;
/// Approximate bytes of log records queued for the next batch, at most (same answer).
const PENDING_BYTES_MAX: usize = 64 << 20;

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
    /// Ready writes waiting for the committer.
    queue: RefCell<commit::WriteQueue>,
    store: RefCell<EventStore>,
    reader: LogReader,
    pub stats: RefCell<ShardStats>,
    /// Tails waiting for the next committed event of a session.
    tails: RefCell<reads::TailWaiters>,
    pub shutting_down: Cell<bool>,
    dir: PathBuf,
    /// Where the log is durable, which segments it holds, pending index files.
    log: RefCell<commit::LogState>,
    /// Log bytes between two shard snapshots (`--snapshot-log-bytes`).
    snapshot_log_bytes: u64,
    snapshots: RefCell<snapshots::Snapshots>,
    peers: RefCell<peers::Peers>,
    /// Groups with proposals not yet handed to Raft's Ready (see `run_driver`).
    proposed: RefCell<std::collections::BTreeSet<u16>>,
    archive: Option<archive::ArchiveFeed>,
    retention: Retention,
    log_dir: PathBuf,
    /// The log's files, room and storage-full state (see `storage`).
    space: Rc<LogSpace>,
    /// Bytes of the active segment kept for Raft's records (`shards::storage`).
    reserve_bytes: u64,
    /// Damaged data found on this replica, and its repair (see `damage`).
    damage: RefCell<damage::DamageLog>,
    wake: Wakers,
    scrub_bytes_per_sec: u64,
}

/// Wakes the shard's tasks that sleep until there is work (each channel holds at most
/// one wake-up: a task that is awake already takes the new work in its current turn).
struct Wakers {
    /// Proposals of this executor turn wait in `ShardCore::proposed`.
    driver: LocalSender<()>,
    /// Write units wait in `ShardCore::queue`.
    committer: LocalSender<()>,
    /// Damaged events wait for repair.
    repairer: LocalSender<()>,
    /// A segment waits for an urgent audit.
    scrubber: LocalSender<()>,
}
