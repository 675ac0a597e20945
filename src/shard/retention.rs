//! Local retention and the disk budget.
//!
//! Sealed log segments leave the disk oldest first, once all of these hold:
//! - a durable shard snapshot starts replay after them (recovery never needs them);
//! - the retention setting is passed: the log holds more than `--retention-bytes`, or
//!   the segment was last written longer than `--retention-age` ago (neither set: never);
//! - with the archive on, every event in them is archived (`archived_seq` of its session
//!   is at least that event's seq), so unarchived events are never deleted.
//!
//! What is deleted stays readable from Postgres; without an archive readers get the
//! `expired` gap (tails) or 410 `events_expired` (`/events`). The disk budget
//! (`--max-disk-bytes`) is enforced by the log itself (`crate::wal::LogSpace`): it never
//! creates a file that would take the log's files past it, and client writes get 507
//! `storage_full` meanwhile (see `storage`), while archive progress still commits, so
//! space comes back as the archive catches up.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use super::ShardCore;

/// How often a shard looks for segments to delete.
const RETENTION_PERIOD: Duration = Duration::from_secs(1);

/// One shard's share of the node's retention settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    /// Keep at most this many bytes of log segments (older sealed ones go).
    pub bytes: Option<u64>,
    /// Delete sealed segments last written longer ago than this.
    pub age: Option<Duration>,
    /// Refuse client writes once the log's files would pass this.
    pub max_disk_bytes: Option<u64>,
}

impl ShardCore {
    /// Bytes of the log's files: every segment (the pre-written next one included) and
    /// index file.
    pub(super) fn log_disk_bytes(&self) -> u64 {
        self.space.files_bytes()
    }

    pub(super) async fn run_retention(self: Rc<Self>) {
        if self.retention.bytes.is_none() && self.retention.age.is_none() {
            return;
        }
        loop {
            glommio::timer::sleep(RETENTION_PERIOD).await;
            if self.shutting_down.get() {
                return;
            }
            while self.delete_oldest_segment() {
                futures_lite::future::yield_now().await;
            }
        }
    }

    /// Deletes the oldest segment if the rules allow it; returns whether it did.
    fn delete_oldest_segment(&self) -> bool {
        let (oldest, active) = {
            let log = self.log.borrow();
            (log.oldest_segment, log.active_epoch())
        };
        if oldest >= active.min(self.snapshots.borrow().resume_epoch()) {
            return false;
        }
        let over_bytes = self
            .retention
            .bytes
            .is_some_and(|max| self.log_disk_bytes() > max);
        let over_age = self.retention.age.is_some_and(|age| {
            crate::wal::segment_modified(&self.log_dir, oldest)
                .ok()
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .is_some_and(|since| since > age)
        });
        if !(over_bytes || over_age) {
            return false;
        }
        if self.archive.is_some() && !self.segment_archived(oldest) {
            return false;
        }
        // A snapshot for a follower is reading history back from the log; a segment
        // whose index file is not written yet is read through its offsets in memory.
        if self.groups.borrow().values().any(|g| g.building_snapshot)
            || self.log.borrow().sealing.contains_key(&(oldest as u32))
        {
            return false;
        }
        let dropped = self.store.borrow_mut().drop_through(oldest as u32);
        self.reader.forget(oldest);
        if let Err(error) = crate::wal::remove_segment(&self.log_dir, oldest, &self.space) {
            tracing::error!(shard = self.index, segment = oldest, %error, "retention: cannot delete");
            return false;
        }
        self.log.borrow_mut().oldest_segment = oldest + 1;
        self.stats.borrow_mut().segments_deleted += 1;
        tracing::info!(
            shard = self.index,
            segment = oldest,
            sessions = dropped,
            "retention deleted a log segment"
        );
        true
    }

    /// Every event in segment `epoch` is in the archive.
    fn segment_archived(&self, epoch: u64) -> bool {
        let store = self.store.borrow();
        let groups = self.groups.borrow();
        store
            .sessions_in(epoch as u32)
            .into_iter()
            .all(|(id, last)| {
                groups
                    .get(&shards::group_of(id))
                    .and_then(|g| g.state.view(id))
                    .is_some_and(|view| view.archived_seq >= last)
            })
    }
}
