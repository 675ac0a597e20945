//! Starting a shard: the snapshot and the log are recovered (`recovery`), the
//! groups this node replicates are built from what they replayed, and the shard's tasks
//! (driver, committer, clock, repairer, scrubber, retention) are spawned.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use glommio::channels::local_channel;
use shards::listing;
use shards::raft::{Config as RaftConfig, HardState, RaftNode};
use shards::replay::Replayed;
use shards::snapshot::ShardSnapshot;

use super::commit::{LogState, WriteQueue};
use super::driver::CatchUpWatch;
use super::reads::TailWaiters;
use super::snapshots::Snapshots;
use super::{
    archive, damage, now_us, peers, recovery, Group, RaftSettings, ShardCore, ShardSettings,
    Wakers, PENDING_RECORDS_MAX,
};
use crate::metrics::ShardStats;
use crate::wal::{LogSpace, Wal};

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

/// The shard snapshot to start from, and whether it was damaged: damage outside its
/// checksummed body is ignored; a damaged body is done without when the log still holds
/// everything from its first segment (replayed whole), else start-up stops.
async fn load_snapshot(
    shard: usize,
    dir: &Path,
    log_dir: &Path,
) -> Result<(Option<ShardSnapshot>, bool), String> {
    Ok(match recovery::load_snapshot(dir).await? {
        recovery::Loaded::None => (None, false),
        recovery::Loaded::Snapshot(snapshot, notes) => {
            let damaged = !notes.is_empty();
            for note in notes {
                tracing::warn!(shard, damage = %note, "snapshot file: damage outside its checksummed body; it is used, and rewritten soon");
            }
            (Some(*snapshot), damaged)
        }
        recovery::Loaded::Damaged(why) => {
            recovery::replay_without_snapshot(log_dir, &why)?;
            tracing::warn!(
                shard,
                damage = %why,
                "the shard snapshot is damaged; the log still holds everything from its \
                 first segment, so state is rebuilt from the whole log and a new snapshot \
                 is written"
            );
            (None, true)
        }
    })
}

/// What start-up recovered from the shard snapshot and the log.
struct Opened {
    /// The log, open for writing after its last durable batch.
    wal: Wal,
    space: Rc<LogSpace>,
    /// Where replay began (the snapshot's resume position).
    resume: (u64, u64),
    snapshot_damaged: bool,
    /// The oldest segment on disk (retention deleted the ones before).
    oldest_segment: u64,
    replayed: recovery::ReplayOutcome,
}

/// Loads the shard snapshot and replays the log after its resume position.
async fn open_log(
    settings: &ShardSettings,
    dir: &Path,
    log_dir: &Path,
    tail_marker: &Path,
    segment_bytes: u64,
    fsync_delay: Option<Duration>,
) -> Result<Opened, String> {
    let (snapshot, snapshot_damaged) = load_snapshot(settings.index, dir, log_dir).await?;
    let mut recovery = recovery::Recovery::new(settings, snapshot)?;
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
    let wal = Wal::open(
        log_dir,
        segment_bytes,
        fsync_delay,
        resume,
        space.clone(),
        tail_marker,
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
    let (recovered, mut store, seals, later_repairs) = recovery.finish();
    // Runs of segments retention deleted after the snapshot was taken.
    let oldest_segment = crate::wal::segment_epochs(log_dir)?
        .first()
        .copied()
        .unwrap_or(1);
    if oldest_segment > 1 {
        store.drop_through((oldest_segment - 1) as u32);
    }
    Ok(Opened {
        wal,
        space,
        resume,
        snapshot_damaged,
        oldest_segment,
        replayed: (recovered, store, seals, later_repairs),
    })
}

/// Segments sealed during replay get their index files (again: an old one, if any, may
/// be missing or may not match the runs replay just built). One that cannot be written
/// (full disk) is returned: it stays in memory, where readers find it, and is written
/// when space returns.
async fn write_replay_seals(
    wal: &Wal,
    space: &LogSpace,
    seals: Vec<(u64, Vec<u32>)>,
) -> HashMap<u32, Rc<Vec<u32>>> {
    let mut sealing = HashMap::new();
    for (epoch, offsets) in seals {
        let bytes = shards::snapshot::encode_sidecar(epoch, &offsets, shards::codec::BLOCK_BYTES);
        if let Err(e) = wal.write_index(epoch, &bytes).await {
            space.record(shards::storage::FileKind::Index, Err(e));
            let epoch = u32::try_from(epoch).expect("epoch fits u32");
            sealing.insert(epoch, Rc::new(offsets));
        }
    }
    sealing
}

/// This node's replica of each group of the shard it is a voter of, from what replay
/// recovered; and the hard states a rebuild carried over that the new log must record.
fn build_groups(
    settings: &ShardSettings,
    members: &[u64],
    mut recovered: HashMap<u16, Replayed>,
    tail_catch_up: bool,
) -> (HashMap<u16, Group>, Vec<(u16, HardState)>) {
    let mut groups = HashMap::new();
    let mut carried_to_write = Vec::new();
    for group in
        (0..shards::GROUPS).filter(|&g| shards::shard_of(g, settings.shards) == settings.index)
    {
        let voters = shards::voters_of(group, members);
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
    (groups, carried_to_write)
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
        let tail_marker = dir.join(DAMAGED_TAIL_MARKER);
        let Opened {
            mut wal,
            space,
            resume,
            snapshot_damaged,
            oldest_segment,
            replayed: (recovered, store, seals, later_repairs),
        } = open_log(
            &settings,
            dir,
            &log_dir,
            &tail_marker,
            segment_bytes,
            fsync_delay,
        )
        .await?;
        let sealing = write_replay_seals(&wal, &space, seals).await;
        wal.start_next();
        let members = if settings.members.is_empty() {
            vec![settings.node_id]
        } else {
            settings.members.clone()
        };
        let tail_catch_up = damaged_tail_catch_up(settings.index, &tail_marker, members.len())?;
        let (groups, carried_to_write) =
            build_groups(&settings, &members, recovered, tail_catch_up);
        let (committer, wake_rx) = local_channel::new_bounded(1);
        let (driver, driver_rx) = local_channel::new_bounded(1);
        let (repairer, repairer_rx) = local_channel::new_bounded(1);
        let (scrubber, scrubber_rx) = local_channel::new_bounded(1);
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
            queue: RefCell::new(WriteQueue::default()),
            store: RefCell::new(store),
            reader: wal.reader(),
            stats: RefCell::new(ShardStats::default()),
            tails: RefCell::new(TailWaiters::default()),
            shutting_down: Cell::new(false),
            log: RefCell::new(LogState {
                durable_position: wal.durable_position(),
                oldest_segment,
                sealing,
                blocked: false,
            }),
            snapshot_log_bytes,
            snapshots: RefCell::new(Snapshots::new(resume.0, snapshot_damaged)),
            peers: RefCell::new(peers::Peers::default()),
            proposed: RefCell::new(std::collections::BTreeSet::new()),
            archive: settings.archive.map(archive::ArchiveFeed::new),
            retention: settings.retention,
            log_dir,
            space,
            reserve_bytes: shards::storage::reserve_bytes(segment_bytes),
            damage: RefCell::new(damage),
            wake: Wakers {
                driver,
                committer,
                repairer,
                scrubber,
            },
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
        let watch = CatchUpWatch {
            rebuild: settings.catch_up.map(|c| c.tracker),
            tail_marker: tail_catch_up.then_some(tail_marker),
        };
        core.start_raft(watch).await;
        // Starting Raft applied the committed entries after the snapshot: the events
        // repaired among them are indexed now.
        for (session, seq, loc) in later_repairs {
            core.store
                .borrow_mut()
                .repair(&session, seq, loc.epoch, loc.offset);
        }
        Ok(core)
    }
}
