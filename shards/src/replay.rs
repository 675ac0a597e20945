//! Rebuilding one group's replica from what it stored: its last snapshot (if any), then
//! its log records in log order. The server's recovery (`src/shard/recovery.rs`) and the
//! simulation's restart drive this same type; the result starts a
//! [`crate::replica::Replica`] and its Raft node.
//!
//! Rules (the log holds Raft entries, so a suffix may be rewritten):
//! - An entry record `(index, term)` replaces every earlier record of the group with an
//!   index `>= index` (the follower's log was truncated by a conflict, §5.3).
//! - A `HardState` record never rolls the term or vote back (`HardState::merge`); the
//!   commit index only grows.
//! - A `Snapshot` record replaces the state and voids every earlier entry of the group.
//! - Entries at or below the state's index are not Raft's any more (the state holds
//!   them); the commit index is clamped to the entries on disk.

use std::collections::BTreeMap;

use crate::entry::Command;
use crate::raft::{Entry, HardState, Payload, Restored, SnapshotMeta};
use crate::replica::{Persisted, Recovered};
use crate::session::{GroupState, Limits};
use crate::snapshot::GroupSnapshot;

/// Deliberate bugs the simulation must catch. All off by default; never set them
/// elsewhere.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlantedBugs {
    /// An entry record at an index the log already holds is ignored instead of
    /// replacing that entry and every later one (§5.3 truncation skipped).
    pub skip_truncation: bool,
    /// Replay applies the committed entries it holds to the state but reports the
    /// state's index unchanged, so Raft hands them over again as committed after the
    /// restart and the replica applies each a second time.
    pub apply_twice: bool,
}

/// An entry record seen during replay, with its place and the event it carries.
#[derive(Debug, Clone)]
pub struct Seen {
    pub persisted: Persisted,
    /// (session, seq) of an append.
    pub event: Option<(String, u64)>,
}

/// One group being replayed.
pub struct Replay {
    state: GroupState,
    applied: u64,
    applied_term: u64,
    checksum: u64,
    hard_state: HardState,
    entries: Vec<Entry<Command>>,
    seen: BTreeMap<u64, Seen>,
    limits: Limits,
    bugs: PlantedBugs,
}

/// What replay rebuilt: the replica's start, Raft's, and the entry records at or below
/// the state's index (their events are the state's: index them).
pub struct Replayed {
    pub recovered: Recovered,
    pub raft: Restored<Command>,
    pub applied_records: BTreeMap<u64, Seen>,
}

impl Replay {
    /// A group with nothing stored yet.
    pub fn new(limits: Limits) -> Replay {
        Replay {
            state: GroupState::new(limits),
            applied: 0,
            applied_term: 0,
            checksum: 0,
            hard_state: HardState::default(),
            entries: Vec::new(),
            seen: BTreeMap::new(),
            limits,
            bugs: PlantedBugs::default(),
        }
    }

    /// A group from its part of a snapshot (the entries it held on disk after its state
    /// come with their places).
    pub fn from_snapshot(g: GroupSnapshot, limits: Limits) -> Result<Replay, String> {
        let mut replay = Replay::new(limits);
        replay.state = GroupState::decode_snapshot(&g.state, limits)
            .map_err(|e| format!("snapshot of group {}: {e}", g.group))?;
        replay.applied = g.committed_index;
        replay.applied_term = g.committed_term;
        replay.checksum = g.checksum;
        replay.hard_state = HardState {
            term: g.hard_term,
            vote: (g.hard_vote != 0).then_some(g.hard_vote),
            commit: g.committed_index,
        };
        for e in g.entries {
            let persisted = Persisted {
                term: e.term,
                loc: crate::replica::RecordLocation {
                    epoch: e.epoch,
                    offset: e.offset,
                },
                crc: e.crc,
                sealed: (e.sealed != u32::MAX).then_some(e.sealed),
            };
            replay.entry(e.index, e.term, e.command, persisted);
        }
        Ok(replay)
    }

    #[doc(hidden)]
    pub fn plant_bugs(&mut self, bugs: PlantedBugs) {
        self.bugs = bugs;
    }

    /// An entry record: it replaces every entry at or after its index.
    pub fn entry(&mut self, index: u64, term: u64, command: Command, persisted: Persisted) {
        if self.bugs.skip_truncation && self.entries.last().is_some_and(|e| e.index >= index) {
            return; // the planted bug: the older entry stays
        }
        self.seen.split_off(&index);
        let event = match &command {
            Command::Append(e) => Some((e.session_id.clone(), e.seq)),
            _ => None,
        };
        self.seen.insert(index, Seen { persisted, event });
        let keep = self.entries.partition_point(|e| e.index < index);
        self.entries.truncate(keep);
        if index <= self.applied {
            return;
        }
        let contiguous = match self.entries.last() {
            Some(last) => last.index + 1 == index,
            None => index == self.applied + 1,
        };
        if !contiguous {
            // After a gap nothing can be Raft's log (a later record may close it only
            // by rewriting from the gap on, which truncates first).
            return;
        }
        self.entries.push(Entry {
            term,
            index,
            payload: match command {
                Command::Noop => Payload::Noop,
                command => Payload::Data(command),
            },
        });
    }

    /// A `HardState` record: never rolls term or vote back.
    pub fn hard_state(&mut self, term: u64, vote: u64, commit: u64) {
        let h = &mut self.hard_state;
        h.merge(term, (vote != 0).then_some(vote));
        h.commit = h.commit.max(commit);
    }

    /// A `Snapshot` record: the state at `index` replaces the group's, every earlier
    /// entry is void.
    pub fn snapshot(
        &mut self,
        index: u64,
        term: u64,
        checksum: u64,
        state: &[u8],
    ) -> Result<(), String> {
        self.state = GroupState::decode_snapshot(state, self.limits)?;
        self.applied = index;
        self.applied_term = term;
        self.checksum = checksum;
        self.entries.clear();
        self.seen.clear();
        self.hard_state.commit = self.hard_state.commit.max(index);
        Ok(())
    }

    /// The state replay has reached (its sessions, for the shell's event index).
    pub fn state(&self) -> &GroupState {
        &self.state
    }

    /// The places of every entry record seen since the state (they get their place in
    /// a segment's index file when it is sealed during replay).
    pub fn places_mut(&mut self) -> impl Iterator<Item = &mut Persisted> {
        self.seen.values_mut().map(|s| &mut s.persisted)
    }

    /// Ends replay.
    pub fn finish(mut self) -> Replayed {
        if self.bugs.apply_twice {
            // The planted bug: these entries are applied here and again once Raft
            // commits them, because `applied` below does not move.
            for e in self
                .entries
                .iter()
                .filter(|e| e.index <= self.hard_state.commit)
            {
                if let Payload::Data(command) = &e.payload {
                    self.state.commit(command);
                }
            }
        }
        let later = self.seen.split_off(&(self.applied + 1));
        let persisted = later.into_iter().map(|(i, s)| (i, s.persisted)).collect();
        let last = self.entries.last().map_or(self.applied, |e| e.index);
        self.hard_state.commit = self.hard_state.commit.clamp(self.applied, last);
        Replayed {
            raft: Restored {
                hard_state: self.hard_state,
                snapshot: SnapshotMeta {
                    index: self.applied,
                    term: self.applied_term,
                },
                entries: self.entries,
            },
            recovered: Recovered {
                state: self.state,
                applied: self.applied,
                applied_term: self.applied_term,
                checksum: self.checksum,
                persisted,
            },
            applied_records: self.seen,
        }
    }
}
