//! A shard's event store index: where every committed event of its sessions lives in
//! the log, plus a hot window of recently committed events (already rendered as the
//! JSON the API serves) bounded by a byte budget per shard. Older events are read back
//! from the log segments.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::wal::RecordLocation;

/// Where to find one session's events.
#[derive(Default)]
struct SessionEvents {
    /// `locations[seq - 1]` is where event `seq` lives in the log.
    locations: Vec<RecordLocation>,
    /// Seq of `hot[0]`.
    hot_first_seq: u64,
    hot: VecDeque<Arc<str>>,
}

/// What a read needs: events served from memory, and the log locations to read for
/// the others (in seq order, before the in-memory ones).
pub struct ReadPlan {
    pub cold: Vec<(u64, RecordLocation)>,
    pub hot: Vec<(u64, Arc<str>)>,
}

pub struct EventStore {
    ids: HashMap<String, u32>,
    sessions: Vec<SessionEvents>,
    /// Hot events in commit order: (session slot, bytes), for eviction oldest-first.
    fifo: VecDeque<(u32, u32)>,
    hot_bytes: usize,
    hot_bytes_max: usize,
    pub evicted_events: u64,
}

impl EventStore {
    pub fn new(hot_bytes_max: usize) -> EventStore {
        EventStore {
            ids: HashMap::new(),
            sessions: Vec::new(),
            fifo: VecDeque::new(),
            hot_bytes: 0,
            hot_bytes_max,
            evicted_events: 0,
        }
    }

    fn slot(&mut self, session_id: &str) -> u32 {
        if let Some(&slot) = self.ids.get(session_id) {
            return slot;
        }
        let slot = u32::try_from(self.sessions.len()).expect("fewer than 2^32 sessions");
        self.ids.insert(session_id.to_string(), slot);
        self.sessions.push(SessionEvents {
            hot_first_seq: 1,
            ..SessionEvents::default()
        });
        slot
    }

    /// Records committed event `seq`; `rendered` is kept in the hot window when given
    /// (recovery passes `None`: replayed history is served from the log).
    pub fn insert(
        &mut self,
        session_id: &str,
        seq: u64,
        loc: RecordLocation,
        rendered: Option<Arc<str>>,
    ) {
        let slot = self.slot(session_id);
        let events = &mut self.sessions[slot as usize];
        assert_eq!(
            events.locations.len() as u64 + 1,
            seq,
            "events of {session_id} must be indexed in seq order"
        );
        events.locations.push(loc);
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
            None => {
                // Replayed history is served from the log; the window starts after it.
                assert!(events.hot.is_empty(), "recovery inserts come before live ones");
                events.hot_first_seq = seq + 1;
            }
        }
    }

    fn evict(&mut self) {
        while self.hot_bytes > self.hot_bytes_max {
            let Some((slot, bytes)) = self.fifo.pop_front() else {
                break;
            };
            self.hot_bytes -= bytes as usize;
            let events = &mut self.sessions[slot as usize];
            // Every fifo entry has its event at the front of its session's window.
            events.hot.pop_front().expect("fifo and hot windows agree");
            events.hot_first_seq += 1;
            self.evicted_events += 1;
        }
    }

    pub fn last_seq(&self, session_id: &str) -> u64 {
        self.ids
            .get(session_id)
            .map_or(0, |&slot| self.sessions[slot as usize].locations.len() as u64)
    }

    /// Plans reading events `after+1 ..` : at most `max_events`, stopping once the
    /// in-memory part passes `max_bytes` (cold events are sized after reading).
    pub fn plan_read(&self, session_id: &str, after: u64, max_events: usize) -> ReadPlan {
        let mut plan = ReadPlan {
            cold: Vec::new(),
            hot: Vec::new(),
        };
        let Some(&slot) = self.ids.get(session_id) else {
            return plan;
        };
        let events = &self.sessions[slot as usize];
        let last = events.locations.len() as u64;
        let first = after.saturating_add(1);
        let end = last.min(after.saturating_add(max_events as u64));
        let mut seq = first;
        while seq <= end {
            if seq >= events.hot_first_seq {
                let text = events.hot[(seq - events.hot_first_seq) as usize].clone();
                plan.hot.push((seq, text));
            } else {
                plan.cold.push((seq, events.locations[(seq - 1) as usize]));
            }
            seq += 1;
        }
        plan
    }

    pub fn hot_bytes(&self) -> usize {
        self.hot_bytes
    }

    pub fn indexed_events(&self) -> u64 {
        self.sessions.iter().map(|s| s.locations.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: u32) -> RecordLocation {
        RecordLocation {
            epoch: 1,
            offset: n * 4096,
        }
    }

    #[test]
    fn hot_window_evicts_oldest_and_plans_cold_reads() {
        let mut store = EventStore::new(10);
        for seq in 1..=5u64 {
            store.insert("a", seq, loc(seq as u32), Some(Arc::from("xxxx")));
        }
        // 5 events of 4 bytes with a 10 byte budget: only the last two stay hot.
        assert_eq!(store.hot_bytes(), 8);
        let plan = store.plan_read("a", 0, 100);
        assert_eq!(plan.cold.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(plan.hot.iter().map(|h| h.0).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(store.evicted_events, 3);
    }

    #[test]
    fn recovery_inserts_are_cold_and_live_ones_hot() {
        let mut store = EventStore::new(1 << 20);
        store.insert("a", 1, loc(1), None);
        store.insert("a", 2, loc(2), Some(Arc::from("e2")));
        let plan = store.plan_read("a", 0, 10);
        assert_eq!(plan.cold.len(), 1);
        assert_eq!(plan.hot.len(), 1);
        assert_eq!(store.last_seq("a"), 2);
        assert_eq!(store.plan_read("a", 2, 10).hot.len(), 0);
        assert_eq!(store.last_seq("missing"), 0);
    }
}
