//! The committer: one task per shard owns the log (`Wal`) and writes every record
//! queued by every group since the previous batch as ONE batch with one durable write,
//! then reports each group's part durable (`shards::replica::Durable`). It also seals
//! segments and starts shard snapshots between batches.

use std::rc::Rc;
use std::sync::Arc;

use glommio::channels::local_channel::LocalReceiver;
use shards::entry::{Command, LogRecord};
use shards::replica::Durable;
use shards::validate::render_event;

use super::driver::Effects;
use super::snapshots::rebase_missing;
use super::storage::STORAGE_RETRY_PERIOD;
use super::{command_bytes, ShardCore};
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

impl ShardCore {
    pub(super) fn queue_unit(&self, unit: WriteUnit) {
        let bytes: usize = unit.records.iter().map(|r| command_bytes(&r.command)).sum();
        self.units_records
            .set(self.units_records.get() + unit.records.len());
        self.units_bytes.set(self.units_bytes.get() + bytes);
        self.units.borrow_mut().push_back(unit);
        let _ = self.wake_committer.try_send(());
    }

    /// One batch write (one durable write) for every record queued while the previous
    /// batch was being written, then each Ready's persisted report and messages. It also
    /// wakes every `STORAGE_RETRY_PERIOD` without a write: a file creation that failed in
    /// the background (the next segment's pre-write) is tried again even when no write
    /// comes (client writes are refused meanwhile), see `storage`.
    pub(super) async fn run_committer(self: Rc<Self>, mut wal: Wal, wake: LocalReceiver<()>) {
        let mut bytes_since_snapshot = 0u64;
        loop {
            if let Some(None) = with_timeout(STORAGE_RETRY_PERIOD, wake.recv()).await {
                return;
            }
            if self.storage_needs_retry(&wal) {
                self.retry_storage(&mut wal, true).await;
            }
            self.write_queued(&mut wal, &mut bytes_since_snapshot).await;
        }
    }

    /// Writes every queued unit, batch after batch, until none is left.
    async fn write_queued(self: &Rc<Self>, wal: &mut Wal, bytes_since_snapshot: &mut u64) {
        loop {
            let mut units: Vec<WriteUnit> = self.units.borrow_mut().drain(..).collect();
            self.units_records.set(0);
            self.units_bytes.set(0);
            if units.is_empty() {
                return;
            }
            let mut records = Vec::new();
            for unit in units.iter_mut() {
                records.append(&mut unit.records);
            }
            let mut done = 0;
            while done < records.len() {
                let Some(written) = wal.write(&records[done..]).await else {
                    self.wait_for_segment(wal).await;
                    continue;
                };
                self.log_unblocked();
                if let Some(epoch) = written.sealed {
                    self.seal(wal, epoch).await;
                }
                self.durable_position.set(wal.durable_position());
                self.record_write(&written);
                *bytes_since_snapshot += written.bytes as u64;
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
            let due = *bytes_since_snapshot >= self.snapshot_log_bytes || self.snapshot_soon.get();
            if due && !self.snapshot_running.get() && self.sealing.borrow().is_empty() {
                *bytes_since_snapshot = 0;
                self.snapshot_soon.set(false);
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
        self.sealing
            .borrow_mut()
            .insert(epoch as u32, offsets.clone());
        // Written now, or (no space) kept in `sealing` and written by a later retry.
        self.write_pending_indexes(wal).await;
    }
}
