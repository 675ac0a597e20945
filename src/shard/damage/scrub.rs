//! The scrubber task: verifies sealed segments and their index files in the
//! background at a bounded rate (and at once where a read failed), rebuilds damaged
//! index files and queues damaged events for repair.

use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::LocalReceiver;
use shards::codec::SegmentVerifier;
use shards::scrub::{self, AuditOutcome, SegmentAudit};

use crate::node::with_timeout;
use crate::shard::ShardCore;

/// Damaged spans remembered (so each is logged once, not at every scrub pass).
const KNOWN_SPANS_MAX: usize = 4096;
/// Bytes the scrubber reads (and verifies, between two yields to the shard's other
/// work) at once: small enough that checking the records of one window takes a few
/// milliseconds of CPU even when they are small and many.
const SCRUB_WINDOW_BYTES: usize = 128 << 10;
/// The pace of an audit a failed read asked for, when the background pace is slower
/// (or off).
const URGENT_SCRUB_BYTES_PER_SEC: u64 = 8 << 20;
/// The scrubber's pause when there is nothing to verify, or between passes.
const SCRUB_IDLE: Duration = Duration::from_secs(1);

impl ShardCore {
    /// Verifies sealed segments one after the other at `scrub_bytes_per_sec` (0: only
    /// the audits failed reads ask for), oldest first, round and round.
    pub(crate) async fn run_scrubber(self: Rc<Self>, wake: LocalReceiver<()>) {
        let mut cursor = 0u64;
        loop {
            if self.shutting_down.get() {
                return;
            }
            match self.next_audit(&mut cursor) {
                Some((epoch, rate)) => self.audit_segment(epoch, rate).await,
                None => {
                    let _ = with_timeout(SCRUB_IDLE, wake.recv()).await;
                }
            }
        }
    }

    fn next_audit(&self, cursor: &mut u64) -> Option<(u64, u64)> {
        let rate = self.scrub_bytes_per_sec;
        if let Some(epoch) = self.damage.borrow_mut().urgent.pop_front() {
            return Some((epoch, rate.max(URGENT_SCRUB_BYTES_PER_SEC)));
        }
        if rate == 0 {
            return None;
        }
        let (oldest, active) = {
            let log = self.log.borrow();
            (log.oldest_segment, log.active_epoch())
        };
        *cursor = (*cursor).max(oldest);
        if *cursor >= active {
            *cursor = oldest; // a pass is over: the next starts after a pause
            return None;
        }
        *cursor += 1;
        Some((*cursor - 1, rate))
    }

    /// Verifies sealed segment `epoch` (every batch and record crc32, and the index
    /// file against it) at `rate` bytes per second, then reports and repairs.
    async fn audit_segment(&self, epoch: u64, rate: u64) {
        if !self.log.borrow().sealed_and_indexed(epoch) {
            return;
        }
        let Ok(size) = std::fs::metadata(self.reader.segment_path(epoch)).map(|m| m.len()) else {
            return; // deleted by retention meanwhile
        };
        let index = match self.reader.read_index_file(epoch) {
            Ok(Some(bytes)) => shards::snapshot::decode_sidecar(&bytes, epoch),
            Ok(None) => Err("the file is missing".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut audit = self.start_audit(epoch as u32, index);
        let mut verifier = SegmentVerifier::new(epoch, size);
        let started = Instant::now();
        let mut bytes = 0u64;
        while let Some(request) = verifier.next_read() {
            let left = (size - request.offset) as usize;
            let len = request.min_bytes.max(SCRUB_WINDOW_BYTES).min(left);
            let window = match self.reader.read_span(epoch, request.offset, len).await {
                Ok(window) => window,
                Err(e) => {
                    tracing::debug!(shard = self.index, segment = epoch, error = %e, "scrub stopped");
                    return;
                }
            };
            verifier.feed(&window);
            for record in verifier.take_records() {
                audit.record(&record);
            }
            for span in verifier.take_spans() {
                audit.damaged(span);
            }
            bytes += len as u64;
            self.damage.borrow_mut().scrub_bytes += len as u64;
            let due = scrub::scrub_pause(bytes, rate);
            match due.checked_sub(started.elapsed()) {
                Some(wait) if !wait.is_zero() => glommio::timer::sleep(wait).await,
                _ => futures_lite::future::yield_now().await,
            }
            if self.shutting_down.get() {
                return;
            }
        }
        self.damage.borrow_mut().scrub_segments += 1;
        let outcome = audit.finish();
        self.apply_audit(epoch, outcome).await;
    }

    /// What the event index says segment `epoch` holds.
    fn start_audit(&self, epoch: u32, index: Result<Vec<u32>, String>) -> SegmentAudit {
        let store = self.store.borrow();
        let mut fixed = Vec::new();
        for g in self.groups.borrow().values() {
            for p in g.persisted.values() {
                if let (true, Some(position)) = (p.loc.epoch == epoch, p.sealed) {
                    fixed.push((position, p.loc.offset));
                }
            }
        }
        SegmentAudit::new(store.runs_in(epoch), index, fixed, store.repaired_in(epoch))
    }

    /// Acts on an audit: rebuilds a damaged index file, queues damaged events for
    /// repair, and logs damage that holds no event.
    async fn apply_audit(&self, epoch: u64, outcome: AuditOutcome) {
        let segment = self.reader.segment_path(epoch);
        if outcome.index_problem.is_none() {
            self.damage.borrow_mut().index_damage.remove(&epoch);
        }
        if let (Some(problem), Some(offsets)) = (&outcome.index_problem, &outcome.rebuilt_index) {
            self.rebuild_index_file(epoch, problem, offsets).await;
        }
        for d in outcome.damaged_events {
            let place = match d.offset {
                Some(o) => format!(
                    "{} is damaged at offset {o}: {}",
                    segment.display(),
                    d.reason
                ),
                None => format!("{}: {}", segment.display(), d.reason),
            };
            // The audit read what the index said when it began: an event repaired since
            // (elsewhere than the copy found damaged) needs nothing more.
            let store = self.store.borrow();
            let copy = store.repaired_at(&d.session, d.seq);
            let current = match copy {
                Some((at, offset)) => at as u64 == epoch && Some(u64::from(offset)) == d.offset,
                None => store.holds(&d.session, d.seq),
            };
            drop(store);
            if current {
                self.add_pending(&d.session, d.seq, place, d.frame_crc, "the scrubber");
            }
        }
        for span in outcome.other_spans {
            let mut damage = self.damage.borrow_mut();
            let key = (epoch, span.start);
            if damage.known_spans.contains(&key) {
                continue;
            }
            if damage.known_spans.len() < KNOWN_SPANS_MAX {
                damage.known_spans.insert(key);
            }
            damage.spans += 1;
            let what = format!(
                "{} offsets {}..{}: {}",
                segment.display(),
                span.start,
                span.end,
                span.reason
            );
            tracing::warn!(
                shard = self.index,
                damage = %what,
                "damaged log bytes that hold no indexed event (other records, read only when \
                 the log is replayed from before them): the next shard snapshot moves replay \
                 past them"
            );
            damage.remember(what);
            drop(damage);
            self.snapshots.borrow_mut().want_soon();
        }
    }

    /// Replaces segment `epoch`'s damaged index file (`problem`) with one rebuilt from
    /// the segment.
    async fn rebuild_index_file(&self, epoch: u64, problem: &str, offsets: &[u32]) {
        let bytes = shards::snapshot::encode_sidecar(epoch, offsets, shards::codec::BLOCK_BYTES);
        let path = self.reader.index_path(epoch);
        match self.reader.replace_index_file(epoch, &bytes).await {
            Ok(()) => {
                self.damage.borrow_mut().index_damage.remove(&epoch);
                tracing::warn!(
                    shard = self.index,
                    file = %path.display(),
                    problem = %problem,
                    "a segment index file was damaged: rebuilt from its segment"
                );
                let mut damage = self.damage.borrow_mut();
                damage.index_rebuilds += 1;
                damage.remember(format!("{} rebuilt: {problem}", path.display()));
            }
            Err(e) => tracing::error!(
                shard = self.index,
                file = %path.display(),
                error = %e,
                "cannot rewrite a damaged segment index file"
            ),
        }
    }
}
