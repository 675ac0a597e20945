//! A shard's event index: where every committed event of its sessions lives in the log,
//! plus a hot window of recently committed events (already rendered as the JSON the API
//! serves) bounded by a byte budget per shard.
//!
//! Memory does not grow with the number of events: events of sealed segments are found
//! through runs (`shards::snapshot::Run`: one per session and segment) and the sealed
//! segment's index file; only the active segment's offsets are held per event, and that
//! is bounded by the segment size.
//!
//! An event whose record is damaged and was repaired (a copy fetched from another
//! replica, appended to the log) is read from that copy: a per-session override, bounded
//! per shard by [`REPAIRED_EVENTS_MAX`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use shards::snapshot::{RepairedEvent, Run, SessionIndex};

/// Repaired events one shard's index holds at most (about 40 bytes each). Reaching it
/// stops the process: that many damaged records mean the disk is failing, and the
/// replica must be rebuilt from its peers rather than patched record by record.
pub const REPAIRED_EVENTS_MAX: usize = 262_144;

/// Where to read an event that is not in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cold {
    /// In the active segment at this byte offset.
    Active { epoch: u32, offset: u32 },
    /// In a sealed segment: its offset is entry `index` of the segment's index file.
    Sealed { epoch: u32, index: u32 },
    /// A repaired copy at this byte offset of segment `epoch` (its original is damaged).
    Repaired { epoch: u32, offset: u32 },
}

#[derive(Default)]
struct SessionEvents {
    /// Events `1..=base` are not in the local log any more (retention).
    base: u64,
    runs: Vec<Run>,
    active_epoch: u32,
    active_first_seq: u64,
    active: Vec<u32>,
    /// Seq of `hot[0]`.
    hot_first_seq: u64,
    hot: VecDeque<Arc<str>>,
    /// Events read from a repaired copy: seq → (epoch, offset).
    repaired: BTreeMap<u64, (u32, u32)>,
}

impl SessionEvents {
    fn last_seq(&self) -> u64 {
        if !self.active.is_empty() {
            return self.active_first_seq + self.active.len() as u64 - 1;
        }
        self.runs
            .last()
            .map_or(self.base, |r| r.first_seq + r.count as u64 - 1)
    }

    /// Where the runs (not a repaired copy) put event `seq`, if it is local.
    fn locate_original(&self, seq: u64) -> Option<Cold> {
        if seq <= self.base || seq > self.last_seq() {
            return None;
        }
        if !self.active.is_empty() && seq >= self.active_first_seq {
            return None;
        }
        let at = self
            .runs
            .partition_point(|r| r.first_seq + r.count as u64 <= seq);
        let run = self.runs.get(at)?;
        (run.first_seq <= seq).then(|| Cold::Sealed {
            epoch: run.epoch,
            index: run.start + (seq - run.first_seq) as u32,
        })
    }

    fn locate(&self, seq: u64) -> Cold {
        if let Some(&(epoch, offset)) = self.repaired.get(&seq) {
            return Cold::Repaired { epoch, offset };
        }
        if !self.active.is_empty() && seq >= self.active_first_seq {
            let offset = self.active[(seq - self.active_first_seq) as usize];
            return Cold::Active {
                epoch: self.active_epoch,
                offset,
            };
        }
        let at = self
            .runs
            .partition_point(|r| r.first_seq + r.count as u64 <= seq);
        let run = self.runs[at];
        assert!(run.first_seq <= seq, "seq {seq} is indexed");
        Cold::Sealed {
            epoch: run.epoch,
            index: run.start + (seq - run.first_seq) as u32,
        }
    }
}

/// What a read needs: log locations of older events and in-memory newer ones, both in
/// seq order (all cold ones come first). When the read starts before what the local
/// log holds, `gone` is the last seq that is not local: events `after+1..=gone` come
/// from the archive (or are expired), and `cold`/`hot` are empty.
pub struct ReadPlan {
    pub gone: Option<u64>,
    pub cold: Vec<(u64, Cold)>,
    pub hot: Vec<(u64, Arc<str>)>,
}

/// The result of sealing a segment: its index file body and the runs it creates.
pub struct SealPlan {
    pub offsets: Vec<u32>,
    runs: Vec<(u32, Run)>,
}

pub struct EventStore {
    ids: HashMap<String, u32>,
    sessions: Vec<SessionEvents>,
    /// Sessions with events in the active segment (slots), for sealing.
    active_slots: Vec<u32>,
    /// Hot events in commit order: (session slot, bytes), for eviction oldest-first.
    fifo: VecDeque<(u32, u32)>,
    hot_bytes: usize,
    hot_bytes_max: usize,
    pub evicted_events: u64,
    /// Repaired events held, all sessions together (at most `REPAIRED_EVENTS_MAX`).
    repaired: usize,
}

impl EventStore {
    pub fn new(hot_bytes_max: usize) -> EventStore {
        EventStore {
            ids: HashMap::new(),
            sessions: Vec::new(),
            active_slots: Vec::new(),
            fifo: VecDeque::new(),
            hot_bytes: 0,
            hot_bytes_max,
            evicted_events: 0,
            repaired: 0,
        }
    }

    fn slot(&mut self, session_id: &str) -> u32 {
        if let Some(&slot) = self.ids.get(session_id) {
            return slot;
        }
        let slot = u32::try_from(self.sessions.len()).expect("fewer than 2^32 sessions");
        self.ids.insert(session_id.to_string(), slot);
        self.sessions.push(SessionEvents::default());
        slot
    }

    /// The session's slot, checking that `seq` is its next event.
    fn next_slot(&mut self, session_id: &str, seq: u64) -> u32 {
        let slot = self.slot(session_id);
        assert_eq!(
            self.sessions[slot as usize].last_seq() + 1,
            seq,
            "events of {session_id} indexed in seq order"
        );
        slot
    }

    /// Records committed event `seq` at `offset` of segment `epoch`. `rendered` goes to
    /// the hot window (recovery passes None: replayed history is read from the log).
    pub fn insert(
        &mut self,
        session_id: &str,
        seq: u64,
        epoch: u32,
        offset: u32,
        rendered: Option<Arc<str>>,
    ) {
        let slot = self.next_slot(session_id, seq);
        let events = &mut self.sessions[slot as usize];
        if events.active.is_empty() {
            events.active_epoch = epoch;
            events.active_first_seq = seq;
            self.active_slots.push(slot);
        }
        assert_eq!(
            events.active_epoch, epoch,
            "segment {} of {session_id} was sealed",
            events.active_epoch
        );
        events.active.push(offset);
        self.push_hot(slot, seq, rendered);
    }

    /// Records committed event `seq` that sits in a segment sealed before it committed
    /// (it was written, not yet committed, when the segment filled): the seal put its
    /// offset at `index` of that segment's index file.
    pub fn insert_sealed(
        &mut self,
        session_id: &str,
        seq: u64,
        epoch: u32,
        index: u32,
        rendered: Option<Arc<str>>,
    ) {
        let slot = self.next_slot(session_id, seq);
        let events = &mut self.sessions[slot as usize];
        assert!(
            events.active.is_empty(),
            "an event of sealed segment {epoch} commits after a later one of {session_id}"
        );
        match events.runs.last_mut() {
            Some(run) if run.epoch == epoch && run.start + run.count == index => run.count += 1,
            _ => events.runs.push(Run {
                epoch,
                first_seq: seq,
                count: 1,
                start: index,
            }),
        }
        self.push_hot(slot, seq, rendered);
    }

    /// Records committed event `seq` where the log put it: at `offset` of the active
    /// segment `epoch`, or — when `sealed` — at that place of the index file of `epoch`,
    /// sealed before the event committed.
    pub fn insert_at(
        &mut self,
        session_id: &str,
        seq: u64,
        epoch: u32,
        offset: u32,
        sealed: Option<u32>,
        rendered: Option<Arc<str>>,
    ) {
        match sealed {
            Some(index) => self.insert_sealed(session_id, seq, epoch, index, rendered),
            None => self.insert(session_id, seq, epoch, offset, rendered),
        }
    }

    fn push_hot(&mut self, slot: u32, seq: u64, rendered: Option<Arc<str>>) {
        let events = &mut self.sessions[slot as usize];
        match rendered {
            Some(text) => {
                if events.hot.is_empty() {
                    events.hot_first_seq = seq;
                }
                assert_eq!(events.hot_first_seq + events.hot.len() as u64, seq);
                let bytes = text.len();
                events.hot.push_back(text);
                self.fifo.push_back((slot, bytes as u32));
                self.hot_bytes += bytes;
                self.evict();
            }
            None => assert!(
                events.hot.is_empty(),
                "recovery inserts come before live ones"
            ),
        }
    }

    /// Log locations of events `after+1 ..= through` of a session (hot ones included),
    /// for reading entries back from the log.
    pub fn locations(&self, session_id: &str, after: u64, through: u64) -> Vec<(u64, Cold)> {
        let Some(&slot) = self.ids.get(session_id) else {
            return Vec::new();
        };
        let events = &self.sessions[slot as usize];
        let end = events.last_seq().min(through);
        (after.max(events.base).saturating_add(1)..=end)
            .map(|seq| (seq, events.locate(seq)))
            .collect()
    }

    fn evict(&mut self) {
        while self.hot_bytes > self.hot_bytes_max {
            let Some((slot, bytes)) = self.fifo.pop_front() else {
                break;
            };
            self.hot_bytes -= bytes as usize;
            let events = &mut self.sessions[slot as usize];
            // A fifo entry's event is at the front of its session's window, unless
            // `rebase` emptied that window (then a newer event goes a little early).
            if events.hot.pop_front().is_some() {
                events.hot_first_seq += 1;
                self.evicted_events += 1;
                if events.hot.is_empty() {
                    // Give the buffer back: most sessions go quiet, and an empty window
                    // would keep its capacity for as long as the session exists.
                    events.hot = VecDeque::new();
                }
            }
        }
    }

    /// The index file body for sealing segment `epoch`, and the runs it will create.
    /// Nothing changes until [`EventStore::apply_seal`], called once the file is durable.
    pub fn plan_seal(&self, epoch: u32) -> SealPlan {
        let mut plan = SealPlan {
            offsets: Vec::new(),
            runs: Vec::with_capacity(self.active_slots.len()),
        };
        for &slot in &self.active_slots {
            let events = &self.sessions[slot as usize];
            if events.active.is_empty() {
                continue; // rebased since
            }
            assert_eq!(
                events.active_epoch, epoch,
                "only the active segment is sealed"
            );
            let run = Run {
                epoch,
                first_seq: events.active_first_seq,
                count: events.active.len() as u32,
                start: plan.offsets.len() as u32,
            };
            plan.offsets.extend_from_slice(&events.active);
            plan.runs.push((slot, run));
        }
        plan
    }

    /// Turns the planned offsets into runs; gives back the index file body.
    pub fn apply_seal(&mut self, plan: SealPlan) -> Vec<u32> {
        for (slot, run) in plan.runs {
            let events = &mut self.sessions[slot as usize];
            events.runs.push(run);
            events.active = Vec::new();
        }
        self.active_slots.clear();
        plan.offsets
    }

    pub fn last_seq(&self, session_id: &str) -> u64 {
        self.ids
            .get(session_id)
            .map_or(0, |&slot| self.sessions[slot as usize].last_seq())
    }

    /// Plans reading events `after+1 ..`, at most `max_events`.
    pub fn plan_read(&self, session_id: &str, after: u64, max_events: usize) -> ReadPlan {
        let mut plan = ReadPlan {
            gone: None,
            cold: Vec::new(),
            hot: Vec::new(),
        };
        let Some(&slot) = self.ids.get(session_id) else {
            return plan;
        };
        let events = &self.sessions[slot as usize];
        if after < events.base {
            plan.gone = Some(events.base);
            return plan;
        }
        let end = events
            .last_seq()
            .min(after.saturating_add(max_events as u64));
        for seq in after.saturating_add(1)..=end {
            if !events.hot.is_empty() && seq >= events.hot_first_seq {
                let text = events.hot[(seq - events.hot_first_seq) as usize].clone();
                plan.hot.push((seq, text));
            } else {
                plan.cold.push((seq, events.locate(seq)));
            }
        }
        plan
    }

    /// The whole index, for a snapshot.
    pub fn capture(&self) -> Vec<SessionIndex> {
        let mut ids: Vec<(&String, &u32)> = self.ids.iter().collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|(id, &slot)| {
                let events = &self.sessions[slot as usize];
                SessionIndex {
                    session_id: id.clone(),
                    base_seq: events.base,
                    runs: events.runs.clone(),
                    active_epoch: events.active_epoch,
                    active_first_seq: events.active_first_seq,
                    active: events.active.clone(),
                    repaired: events
                        .repaired
                        .iter()
                        .map(|(&seq, &(epoch, offset))| RepairedEvent { seq, epoch, offset })
                        .collect(),
                }
            })
            .collect()
    }

    /// Loads a captured index into an empty store.
    pub fn restore(&mut self, sessions: Vec<SessionIndex>) {
        assert!(self.sessions.is_empty(), "restore into an empty store");
        for index in sessions {
            let slot = self.slot(&index.session_id);
            let events = &mut self.sessions[slot as usize];
            events.base = index.base_seq;
            events.runs = index.runs;
            events.active_epoch = index.active_epoch;
            events.active_first_seq = index.active_first_seq;
            events.active = index.active;
            if !events.active.is_empty() {
                self.active_slots.push(slot);
            }
            for r in index.repaired {
                self.set_repaired(slot, r.seq, r.epoch, r.offset);
            }
        }
    }

    /// Event `seq` of a session is read from now on from its repaired copy at
    /// (`epoch`, `offset`). False (nothing changes) when the index does not hold the
    /// event (retention deleted it meanwhile, or it is not indexed yet).
    pub fn repair(&mut self, session_id: &str, seq: u64, epoch: u32, offset: u32) -> bool {
        let Some(&slot) = self.ids.get(session_id) else {
            return false;
        };
        let events = &self.sessions[slot as usize];
        if seq <= events.base || seq > events.last_seq() {
            return false;
        }
        self.set_repaired(slot, seq, epoch, offset);
        true
    }

    fn set_repaired(&mut self, slot: u32, seq: u64, epoch: u32, offset: u32) {
        let events = &mut self.sessions[slot as usize];
        if events.repaired.insert(seq, (epoch, offset)).is_none() {
            self.repaired += 1;
            assert!(
                self.repaired <= REPAIRED_EVENTS_MAX,
                "more than {REPAIRED_EVENTS_MAX} repaired events in one shard's log: the disk \
                 under this data dir keeps damaging records; stop this node, replace the disk \
                 and rebuild the replica from its peers"
            );
        }
    }

    /// Where event `seq` of a session is read from, if from a repaired copy.
    pub fn repaired_at(&self, session_id: &str, seq: u64) -> Option<(u32, u32)> {
        let &slot = self.ids.get(session_id)?;
        self.sessions[slot as usize].repaired.get(&seq).copied()
    }

    /// Repaired events held (all sessions).
    pub fn repaired_count(&self) -> usize {
        self.repaired
    }

    /// True when the index holds event `seq` of the session (committed, still local).
    pub fn holds(&self, session_id: &str, seq: u64) -> bool {
        self.ids.get(session_id).is_some_and(|&slot| {
            let events = &self.sessions[slot as usize];
            seq > events.base && seq <= events.last_seq()
        })
    }

    /// Every run of sealed segment `epoch`, with its session (for the scrubber).
    pub fn runs_in(&self, epoch: u32) -> Vec<(String, Run)> {
        let mut out = Vec::new();
        for (id, &slot) in &self.ids {
            let runs = &self.sessions[slot as usize].runs;
            let from = runs.partition_point(|r| r.epoch < epoch);
            for run in runs[from..].iter().take_while(|r| r.epoch == epoch) {
                out.push((id.clone(), *run));
            }
        }
        out
    }

    /// Repaired events the scrubber of segment `epoch` must know: those whose copy is
    /// in it (with the copy's offset), and those whose damaged original is in it (None).
    pub fn repaired_in(&self, epoch: u32) -> Vec<(String, u64, Option<u64>)> {
        let mut out = Vec::new();
        for (id, &slot) in &self.ids {
            let events = &self.sessions[slot as usize];
            for (&seq, &(at, offset)) in &events.repaired {
                if at == epoch {
                    out.push((id.clone(), seq, Some(u64::from(offset))));
                } else if matches!(events.locate_original(seq), Some(Cold::Sealed { epoch: e, .. }) if e == epoch)
                {
                    out.push((id.clone(), seq, None));
                }
            }
        }
        out
    }

    pub fn hot_bytes(&self) -> usize {
        self.hot_bytes
    }

    /// The first seq of the session the local log holds (1 until retention deleted
    /// something; `last_seq + 1` when it holds none).
    pub fn first_local_seq(&self, session_id: &str) -> u64 {
        self.ids
            .get(session_id)
            .map_or(1, |&slot| self.sessions[slot as usize].base + 1)
    }

    /// The session's history here restarts after `base` (a snapshot from a leader that
    /// no longer holds older events): what was indexed is forgotten.
    pub fn rebase(&mut self, session_id: &str, base: u64) {
        let slot = self.slot(session_id);
        let events = &mut self.sessions[slot as usize];
        if !events.active.is_empty() {
            self.active_slots.retain(|&s| s != slot);
        }
        events.base = base;
        events.runs.clear();
        events.active.clear();
        events.hot.clear();
        events.hot_first_seq = base + 1;
        self.repaired -= events.repaired.len();
        events.repaired.clear();
    }

    /// Forgets every event in sealed segments up to `epoch` (their files are being
    /// deleted). Returns how many sessions lost events.
    pub fn drop_through(&mut self, epoch: u32) -> usize {
        let mut touched = 0;
        for events in &mut self.sessions {
            let keep = events.runs.partition_point(|r| r.epoch <= epoch);
            if keep > 0 {
                let last = events.runs[keep - 1];
                events.base = events.base.max(last.first_seq + last.count as u64 - 1);
                events.runs.drain(..keep);
                touched += 1;
            }
            // A repaired copy is written after its original, so it leaves with it or later.
            let before = events.repaired.len();
            let base = events.base;
            events
                .repaired
                .retain(|&seq, &mut (at, _)| seq > base && at > epoch);
            self.repaired -= before - events.repaired.len();
        }
        touched
    }

    /// Sessions with events in sealed segment `epoch`, with the last such seq.
    pub fn sessions_in(&self, epoch: u32) -> Vec<(&str, u64)> {
        let mut out = Vec::new();
        for (id, &slot) in &self.ids {
            let events = &self.sessions[slot as usize];
            if let Some(run) = events.runs.iter().rev().find(|r| r.epoch == epoch) {
                out.push((id.as_str(), run.first_seq + run.count as u64 - 1));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_window_evicts_oldest_and_plans_cold_reads() {
        let mut store = EventStore::new(10);
        for seq in 1..=5u64 {
            store.insert("a", seq, 1, seq as u32 * 4096, Some(Arc::from("xxxx")));
        }
        // 5 events of 4 bytes with a 10 byte budget: only the last two stay hot.
        assert_eq!(store.hot_bytes(), 8);
        let plan = store.plan_read("a", 0, 100);
        assert_eq!(
            plan.cold.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(plan.hot.iter().map(|h| h.0).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(
            plan.cold[0].1,
            Cold::Active {
                epoch: 1,
                offset: 4096
            }
        );
        assert_eq!(store.evicted_events, 3);
    }

    /// A session whose events all left the hot window holds no buffer for them
    /// (issue 11: memory per session beyond its hot window).
    #[test]
    fn a_session_evicted_from_the_hot_window_keeps_no_buffer() {
        let mut store = EventStore::new(8);
        store.insert("a", 1, 1, 0, Some(Arc::from("xxxx")));
        store.insert("b", 1, 1, 4096, Some(Arc::from("xxxx")));
        store.insert("b", 2, 1, 8192, Some(Arc::from("xxxx")));
        let a = store.ids["a"] as usize;
        assert!(store.sessions[a].hot.is_empty());
        assert_eq!(store.sessions[a].hot.capacity(), 0);
        // Its event is read from the log; a new one is hot again.
        assert_eq!(store.plan_read("a", 0, 10).cold.len(), 1);
        store.insert("a", 2, 1, 12288, Some(Arc::from("yy")));
        assert_eq!(store.plan_read("a", 1, 10).hot.len(), 1);
    }

    #[test]
    fn sealing_turns_offsets_into_runs() {
        let mut store = EventStore::new(0);
        store.insert("a", 1, 1, 0, None);
        store.insert("b", 1, 1, 100, None);
        store.insert("a", 2, 1, 200, None);
        let plan = store.plan_seal(1);
        assert_eq!(plan.offsets.len(), 3);
        store.apply_seal(plan);
        store.insert("a", 3, 2, 0, None);
        let plan = store.plan_read("a", 0, 10);
        let spots: Vec<Cold> = plan.cold.iter().map(|c| c.1).collect();
        // Session a was sealed first: its two offsets are entries 0 and 1.
        assert_eq!(
            spots,
            vec![
                Cold::Sealed { epoch: 1, index: 0 },
                Cold::Sealed { epoch: 1, index: 1 },
                Cold::Active {
                    epoch: 2,
                    offset: 0
                },
            ]
        );
        assert_eq!(
            store.plan_read("b", 0, 10).cold[0].1,
            Cold::Sealed { epoch: 1, index: 2 }
        );
    }

    #[test]
    fn capture_and_restore_keep_every_location() {
        let mut store = EventStore::new(1 << 20);
        store.insert("a", 1, 1, 0, None);
        store.apply_seal(store.plan_seal(1));
        store.insert("a", 2, 2, 4096, Some(Arc::from("e2")));
        let mut restored = EventStore::new(1 << 20);
        restored.restore(store.capture());
        assert_eq!(restored.last_seq("a"), 2);
        let plan = restored.plan_read("a", 0, 10);
        assert_eq!(plan.cold.len(), 2);
        assert_eq!(restored.last_seq("missing"), 0);
    }

    #[test]
    fn dropped_segments_leave_a_base_that_reads_report_and_snapshots_keep() {
        let mut store = EventStore::new(0);
        for seq in 1..=3 {
            store.insert("a", seq, 1, seq as u32 * 100, None);
        }
        store.insert("b", 1, 1, 900, None);
        store.apply_seal(store.plan_seal(1));
        store.insert("a", 4, 2, 0, None);
        store.apply_seal(store.plan_seal(2));
        store.insert("a", 5, 3, 0, None);
        assert_eq!(store.sessions_in(1).len(), 2);
        assert_eq!(store.drop_through(1), 2);
        assert_eq!(store.first_local_seq("a"), 4);
        assert_eq!(store.last_seq("a"), 5);
        // b lost everything it had: its head stays.
        assert_eq!((store.first_local_seq("b"), store.last_seq("b")), (2, 1));
        assert_eq!(store.plan_read("a", 1, 10).gone, Some(3));
        let plan = store.plan_read("a", 3, 10);
        assert_eq!((plan.gone, plan.cold.len()), (None, 2));
        assert_eq!(store.locations("a", 0, 5).len(), 2);
        let mut restored = EventStore::new(0);
        restored.restore(store.capture());
        assert_eq!(restored.first_local_seq("a"), 4);
        assert_eq!(restored.last_seq("b"), 1);
        // b's next event goes on after its base.
        restored.insert("b", 2, 3, 100, None);
        assert_eq!(restored.last_seq("b"), 2);
    }

    #[test]
    fn a_repaired_event_is_read_from_its_copy_and_survives_a_snapshot() {
        let mut store = EventStore::new(0);
        for seq in 1..=3 {
            store.insert("a", seq, 1, seq as u32 * 100, None);
        }
        store.apply_seal(store.plan_seal(1));
        store.insert("a", 4, 2, 0, None);
        assert!(store.repair("a", 2, 2, 4096));
        assert!(!store.repair("a", 9, 2, 8192), "not indexed");
        assert!(!store.repair("zz", 1, 2, 8192));
        let spots: Vec<Cold> = store
            .plan_read("a", 0, 10)
            .cold
            .iter()
            .map(|c| c.1)
            .collect();
        assert_eq!(
            spots[1],
            Cold::Repaired {
                epoch: 2,
                offset: 4096
            }
        );
        assert_eq!(spots[2], Cold::Sealed { epoch: 1, index: 2 });
        assert_eq!(store.repaired_in(1), vec![("a".to_string(), 2, None)]);
        assert_eq!(store.repaired_in(2), vec![("a".to_string(), 2, Some(4096))]);
        assert_eq!(store.runs_in(1).len(), 1);
        let mut restored = EventStore::new(0);
        restored.restore(store.capture());
        assert_eq!(restored.repaired_count(), 1);
        assert_eq!(
            restored.plan_read("a", 1, 1).cold[0].1,
            Cold::Repaired {
                epoch: 2,
                offset: 4096
            }
        );
        // Retention of segment 1 leaves the copy in 2 (event 2 is gone anyway).
        assert_eq!(restored.drop_through(1), 1);
        assert_eq!(restored.repaired_count(), 0);
        restored.rebase("a", 10);
        assert_eq!(restored.repaired_count(), 0);
    }

    #[test]
    fn rebase_restarts_a_session_after_a_base() {
        let mut store = EventStore::new(1 << 20);
        store.insert("a", 1, 1, 0, Some(Arc::from("e1")));
        store.rebase("a", 40);
        assert_eq!(store.last_seq("a"), 40);
        store.insert("a", 41, 1, 100, Some(Arc::from("e41")));
        assert_eq!(store.plan_read("a", 40, 10).hot.len(), 1);
        assert_eq!(store.plan_read("a", 0, 10).gone, Some(40));
        // Sealing skips the emptied active list of the rebase and keeps the new one.
        store.apply_seal(store.plan_seal(1));
        assert_eq!(store.plan_read("a", 40, 10).hot[0].0, 41);
    }
}
