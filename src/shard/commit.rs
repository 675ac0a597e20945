//! The committer: one task per shard owns the log (`Wal`) and writes every record
//! queued by every group since the previous batch as ONE batch with one durable write,
//! then reports each group's part durable (`shards::replica::Durable`). It also seals
//! segments and starts shard snapshots between batches.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use glommio::channels::local_channel::LocalReceiver;
use shards::entry::{Command, LogRecord};
use shards::replica::Durable;
use shards::validate::render_event;

use super::driver::Effects;
use super::leadership::Handoff;
use super::snapshots::rebase_missing;
use super::storage::STORAGE_RETRY_PERIOD;
use super::{command_bytes, ShardCore, PENDING_BYTES_MAX, PENDING_RECORDS_MAX};
use crate::node::with_timeout;
use crate::wal::{RecordLocation, Wal};

/// Log records of one group's Ready (or of the shard's own upkeep), and what to do once
/// they are durable (`shards::replica::Durable`).
pub(super) struct WriteUnit {
    pub(super) group: u16,
    pub(super) records: Vec<LogRecord>,
    pub(super) durable: Durable,
}

impl WriteUnit {
    /// Records that are not Raft entries and need nothing once durable but their own
    /// handling in `on_record_durable` (repaired copies of damaged events).
    pub(super) fn records_only(group: u16, records: Vec<LogRecord>) -> WriteUnit {
        WriteUnit {
            group,
            records,
            durable: Durable::default(),
        }
    }
}

/// The write units queued for the committer, in the order they were taken, with their
/// totals. Every task that steps a group queues here; only the committer takes.
#[derive(Default)]
pub(super) struct WriteQueue {
    units: VecDeque<WriteUnit>,
    records: usize,
    bytes: usize,
}

impl WriteQueue {
    fn push(&mut self, unit: WriteUnit) {
        let bytes: usize = unit.records.iter().map(|r| command_bytes(&r.command)).sum();
        self.records += unit.records.len();
        self.bytes += bytes;
        self.units.push_back(unit);
    }

    /// Everything queued, oldest first; the queue is empty afterwards.
    fn take(&mut self) -> Vec<WriteUnit> {
        self.records = 0;
        self.bytes = 0;
        self.units.drain(..).collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// Approximate bytes of the queued records (`command_bytes`).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// A client write of `bytes` more would pass the queue's bounds (503 overloaded).
    pub(super) fn refuses(&self, bytes: usize) -> bool {
        self.records >= PENDING_RECORDS_MAX
            || (self.bytes > 0 && self.bytes + bytes > PENDING_BYTES_MAX)
    }

    /// The queue is at one of its bounds (only a log that cannot write lets it grow
    /// there: a writing committer takes everything queued at each batch).
    pub(super) fn at_bound(&self) -> bool {
        self.units.len() >= PENDING_RECORDS_MAX
            || self.records >= PENDING_RECORDS_MAX
            || self.bytes >= PENDING_BYTES_MAX
    }
}

/// The log as the rest of the shard sees it. The committer, which owns the files,
/// keeps it up to date; retention moves its oldest segment.
pub(super) struct LogState {
    /// Where the next batch will be written; every record not yet durable is after it.
    pub(super) durable_position: (u64, u64),
    /// The oldest log segment on disk.
    pub(super) oldest_segment: u64,
    /// Index files of sealed segments still being written (readers use these).
    pub(super) sealing: HashMap<u32, Rc<Vec<u32>>>,
    /// The committer writes nothing: no room and no next segment.
    pub(super) blocked: bool,
}

impl LogState {
    /// The segment being written.
    pub(super) fn active_epoch(&self) -> u64 {
        self.durable_position.0
    }

    /// Segment `epoch` is sealed, still on disk, and its index file is written.
    pub(super) fn sealed_and_indexed(&self, epoch: u64) -> bool {
        epoch >= self.oldest_segment
            && epoch < self.active_epoch()
            && !self.sealing.contains_key(&(epoch as u32))
    }
}

/// What only the committer task uses, owned by it and passed by `&mut`: the log files
/// and the clocks of its retries.
pub(super) struct Committer {
    pub(super) wal: Wal,
    /// Log bytes written since the last shard snapshot started.
    bytes_since_snapshot: u64,
    /// Failed file creations are tried again from then on (`storage`).
    pub(super) storage_retry_at: Instant,
    /// A failed shard snapshot is tried again from then on.
    pub(super) snapshot_retry_at: Instant,
    /// Leadership hand-offs while storage is full (`leadership`).
    pub(super) handoff: Handoff,
}

impl ShardCore {
    pub(super) fn queue_unit(&self, unit: WriteUnit) {
        self.queue.borrow_mut().push(unit);
        let _ = self.wake.committer.try_send(());
    }

    /// One batch write (one durable write) for every record queued while the previous
    /// batch was being written, then each Ready's persisted report and messages. It also
    /// wakes every `STORAGE_RETRY_PERIOD` without a write: a file creation that failed in
    /// the background (the next segment's pre-write) is tried again even when no write
    /// comes (client writes are refused meanwhile), see `storage`.
    pub(super) async fn run_committer(self: Rc<Self>, wal: Wal, wake: LocalReceiver<()>) {
        let now = Instant::now();
        let mut c = Committer {
            wal,
            bytes_since_snapshot: 0,
            storage_retry_at: now,
            snapshot_retry_at: now,
            handoff: Handoff::default(),
        };
        loop {
            if let Some(None) = with_timeout(STORAGE_RETRY_PERIOD, wake.recv()).await {
                return;
            }
            if self.storage_needs_retry(&c.wal) {
                self.retry_storage(&mut c, true).await;
            }
            self.write_queued(&mut c).await;
        }
    }

    /// Writes every queued unit, batch after batch, until none is left.
    async fn write_queued(self: &Rc<Self>, c: &mut Committer) {
        loop {
            let mut units = self.queue.borrow_mut().take();
            if units.is_empty() {
                return;
            }
            let mut records = Vec::new();
            for unit in units.iter_mut() {
                records.append(&mut unit.records);
            }
            let mut done = 0;
            while done < records.len() {
                let Some(written) = c.wal.write(&records[done..]).await else {
                    self.wait_for_segment(c).await;
                    continue;
                };
                self.log_unblocked();
                if let Some(epoch) = written.sealed {
                    self.seal(&c.wal, epoch).await;
                }
                self.log.borrow_mut().durable_position = c.wal.durable_position();
                self.record_write(&written);
                c.bytes_since_snapshot += written.bytes as u64;
                let placed = written.locations.iter().zip(&written.crcs);
                for (record, (loc, crc)) in records[done..].iter().zip(placed) {
                    self.on_record_durable(record, *loc, *crc);
                }
                done += written.taken;
            }
            for unit in units {
                self.complete_unit(unit);
            }
            self.flush_outbox();
            // A snapshot never covers a sealed segment whose index file is not written.
            // Damage found or repaired wants one soon (`damage`): the resume position then
            // passes it, so a restart never replays through it.
            let by_bytes = c.bytes_since_snapshot >= self.snapshot_log_bytes;
            let indexes_pending = !self.log.borrow().sealing.is_empty();
            if self
                .snapshots
                .borrow_mut()
                .start_due(by_bytes, indexes_pending)
            {
                c.bytes_since_snapshot = 0;
                self.start_snapshot();
            }
        }
    }

    fn record_write(&self, written: &crate::wal::Written) {
        let mut stats = self.stats.borrow_mut();
        stats.fsyncs += 1;
        stats.fsync_latency.record(written.fsync_us);
        stats.log_bytes_written += written.bytes as u64;
    }

    /// A record is durable: an entry's place is remembered until it commits; a history
    /// event (snapshot install) is indexed at once.
    fn on_record_durable(&self, record: &LogRecord, loc: RecordLocation, crc: u32) {
        if record.index > 0 {
            if let Some(g) = self.groups.borrow_mut().get_mut(&record.group) {
                g.entry_durable(record.index, record.term, loc, crc);
            }
            return;
        }
        if let Command::Append(e) = &record.command {
            if record.term == shards::entry::REPAIR_TERM {
                self.repaired_durable(e, loc);
                return;
            }
            let mut store = self.store.borrow_mut();
            let indexed = store.last_seq(&e.session_id);
            if e.seq > indexed + 1 {
                // The leader's history starts later (retention deleted older events).
                store.rebase(&e.session_id, e.seq - 1);
            }
            if e.seq == store.last_seq(&e.session_id) + 1 {
                let text: Arc<str> = Arc::from(render_event(e));
                store.insert(&e.session_id, e.seq, loc.epoch, loc.offset, Some(text));
            }
            drop(store);
            self.wake_tails(&e.session_id);
        }
    }

    fn complete_unit(&self, unit: WriteUnit) {
        let group = unit.group;
        {
            let mut groups = self.groups.borrow_mut();
            if let Some(g) = groups.get_mut(&group) {
                let installed = unit.durable.snapshot.is_some();
                g.durable(unit.durable, &mut Effects { core: self, group });
                if installed {
                    rebase_missing(&mut self.store.borrow_mut(), &g.state);
                }
            }
        }
        self.process(group);
    }

    /// Seals segment `epoch`: its index file lists the committed events' offsets, then
    /// those of entries written there and not committed yet (they are indexed through
    /// their place in the file when they commit). The store switches at once; readers
    /// use the in-memory offsets until the file is durable.
    async fn seal(&self, wal: &Wal, epoch: u64) {
        let offsets = {
            let mut store = self.store.borrow_mut();
            let mut plan = store.plan_seal(epoch as u32);
            let mut groups = self.groups.borrow_mut();
            let mut ids: Vec<u16> = groups.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                let g = groups.get_mut(&id).expect("listed");
                for p in g.persisted.values_mut() {
                    super::place_in_seal(p.loc, &mut p.sealed, epoch, &mut plan.offsets);
                }
            }
            Rc::new(store.apply_seal(plan))
        };
        self.log
            .borrow_mut()
            .sealing
            .insert(epoch as u32, offsets.clone());
        // Written now, or (no space) kept in `sealing` and written by a later retry.
        self.write_pending_indexes(wal).await;
    }
}
