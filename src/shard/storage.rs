//! The storage-full state of a shard (docs/architecture.md, "Storage full"): what
//! happens when the log cannot create a file, and how it recovers by itself.
//!
//! The rules are decided in `shards::storage` (pure); this module applies them:
//! - admission: a write proposed here, or a leader's entries arriving here, go into the
//!   log only as `shards::storage::admit` says (507 for client writes while full);
//! - retries: every [`STORAGE_RETRY_PERIOD`] the committer tries again what could not be
//!   created (device probe, next segment, index files of sealed segments, the shard
//!   snapshot), so writes resume by themselves when space returns;
//! - leadership: a leader whose storage is full hands the groups it leads to other
//!   voters (Raft's leadership transfer), so the cluster keeps taking writes for them.

use std::rc::Rc;
use std::time::{Duration, Instant};

use shards::entry::Command;
use shards::raft::{Body, Message, Payload};
use shards::storage::{self, FileKind, Room};

use super::commit::Committer;
use super::{command_bytes, ShardCore, COMMAND_FIXED_BYTES};
use crate::wal::Wal;

/// How often a failed file creation is tried again.
pub(super) const STORAGE_RETRY_PERIOD: Duration = Duration::from_secs(1);
/// How often a failed shard snapshot is tried again (a snapshot encodes every group's
/// state: retrying it every second would cost a full disk's node CPU for nothing).
const SNAPSHOT_RETRY_PERIOD: Duration = Duration::from_secs(5);

impl ShardCore {
    /// The room the log has now for more records (see `shards::storage::Room`).
    pub(super) fn room(&self) -> Room {
        let queued = self.queue.borrow().bytes() as u64;
        Room {
            next_segment: self.space.next_segment(),
            free_bytes: self.space.active_free().saturating_sub(queued),
            reserve_bytes: self.reserve_bytes,
        }
    }

    /// Whether a message from a leader goes to Raft now. A leader's entries are cut to
    /// the prefix the log takes (client data only above the reserve without a next
    /// segment); a snapshot only with a next segment; with the write queue at its
    /// bound (the log cannot write), entries, snapshots and vote requests wait. Raft
    /// treats what is dropped or cut as lost messages and sends it again.
    pub(super) fn admit_message(&self, msg: &mut Message<Command>) -> bool {
        // Only a log that cannot write lets the queue grow: a writing committer takes
        // everything queued at each batch (a snapshot being installed alone may queue
        // more records than the client bound, and must not be refused for it).
        let queue_full = self.log.borrow().blocked && self.queue.borrow().at_bound();
        match &mut msg.body {
            Body::Append { entries, .. } if !entries.is_empty() => {
                if queue_full {
                    return false;
                }
                let sizes = entries.iter().map(|e| match &e.payload {
                    Payload::Data(c) => (storage::is_client_data(c), command_bytes(c) as u64),
                    Payload::Noop => (false, COMMAND_FIXED_BYTES as u64),
                });
                let keep = storage::admitted_prefix(sizes, self.room());
                if keep < entries.len() {
                    entries.truncate(keep);
                    self.stats.borrow_mut().storage_deferred += 1;
                }
                true
            }
            Body::InstallSnapshot { .. } => !queue_full && self.space.next_segment(),
            Body::Vote { .. } => !queue_full,
            _ => true,
        }
    }

    /// Something failed to be created and is to be tried again.
    pub(super) fn storage_needs_retry(&self, wal: &Wal) -> bool {
        wal.needs_retry() || self.space.full().is_some() || !self.log.borrow().sealing.is_empty()
    }

    /// Tries again, at most once per [`STORAGE_RETRY_PERIOD`], what could not be
    /// created; hands leadership away while storage stays full. Runs in the committer
    /// (which owns the log), between batches; `between_batches` is false while a batch
    /// waits for a segment (no snapshot may be captured then).
    pub(super) async fn retry_storage(self: &Rc<Self>, c: &mut Committer, between_batches: bool) {
        let now = Instant::now();
        if now < c.storage_retry_at {
            return;
        }
        c.storage_retry_at = now + STORAGE_RETRY_PERIOD;
        c.wal.retry().await;
        self.write_pending_indexes(&c.wal).await;
        if between_batches && self.space.failing(FileKind::Snapshot).is_some() {
            self.retry_snapshot(&mut c.snapshot_retry_at, now);
        }
        if self.space.full().is_some() {
            self.hand_off_leadership(&mut c.handoff, now);
        }
    }

    /// Writes the index files of sealed segments that could not be written before
    /// (readers use their offsets in memory meanwhile), oldest first.
    pub(super) async fn write_pending_indexes(&self, wal: &Wal) {
        let mut pending: Vec<(u32, Rc<Vec<u32>>)> = self
            .log
            .borrow()
            .sealing
            .iter()
            .map(|(&epoch, offsets)| (epoch, offsets.clone()))
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort_unstable_by_key(|p| p.0);
        let mut failure = None;
        for (epoch, offsets) in pending {
            let bytes = shards::snapshot::encode_sidecar(
                u64::from(epoch),
                &offsets,
                shards::codec::BLOCK_BYTES,
            );
            match wal.write_index(u64::from(epoch), &bytes).await {
                Ok(()) => {
                    self.log.borrow_mut().sealing.remove(&epoch);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        self.space
            .record(FileKind::Index, failure.map_or(Ok(()), Err));
    }

    /// Starts a shard snapshot again after one failed (not while an index file is
    /// pending: a snapshot must never cover a sealed segment without its index file).
    fn retry_snapshot(self: &Rc<Self>, retry_at: &mut Instant, now: Instant) {
        if self.snapshots.borrow().running()
            || !self.log.borrow().sealing.is_empty()
            || now < *retry_at
        {
            return;
        }
        *retry_at = now + SNAPSHOT_RETRY_PERIOD;
        self.start_snapshot();
    }

    /// The committer cannot write: the active segment has no room for the next record
    /// and no next segment could be created. It waits (every queued record stays
    /// queued, within the queue's bounds) and tries again.
    pub(super) async fn wait_for_segment(self: &Rc<Self>, c: &mut Committer) {
        if !std::mem::replace(&mut self.log.borrow_mut().blocked, true) {
            tracing::error!(
                shard = self.index,
                "log full: no room in the active segment and no next segment; Raft's records \
                 wait for space (this replica acknowledges nothing meanwhile)"
            );
        }
        glommio::timer::sleep(STORAGE_RETRY_PERIOD).await;
        self.retry_storage(c, false).await;
    }

    /// A batch was written: the log is not blocked.
    pub(super) fn log_unblocked(&self) {
        if std::mem::replace(&mut self.log.borrow_mut().blocked, false) {
            tracing::info!(shard = self.index, "log writable again");
        }
    }
}
