//! The in-memory view of one group's log: the entries after the last snapshot, and the
//! indexes that say how far they are committed, handed to the shell, durable and
//! applied.
//!
//! Invariants (asserted): `snapshot.index <= applied <= commit <= last_index()`,
//! `persisted <= last_index()`, entry terms never decrease along the log, and
//! committed entries are never truncated.

use std::collections::VecDeque;

use super::{Entry, SnapshotMeta};

#[derive(Debug)]
pub(crate) struct RaftLog<T> {
    /// The last entry covered by the snapshot; `entries[0]` is `snapshot.index + 1`.
    pub snapshot: SnapshotMeta,
    /// A deque: compaction drops from the front without moving what stays.
    pub entries: VecDeque<Entry<T>>,
    pub commit: u64,
    /// Last entry handed to the shell in `committed_entries` (or covered by a snapshot).
    pub applied: u64,
    /// Every entry `<= persisted` is durable on this node.
    pub persisted: u64,
    /// First entry not yet handed to the shell in `entries_to_persist`.
    pub unstable: u64,
}

impl<T: Clone> RaftLog<T> {
    pub fn new(snapshot: SnapshotMeta, entries: Vec<Entry<T>>, commit: u64) -> Self {
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(
                e.index,
                snapshot.index + 1 + i as u64,
                "restored log has a gap at {i}"
            );
            assert!(
                e.term >= snapshot.term,
                "restored entry {} older than snapshot",
                e.index
            );
        }
        let last = snapshot.index + entries.len() as u64;
        let log = RaftLog {
            snapshot,
            entries: entries.into(),
            commit: commit.max(snapshot.index).min(last),
            applied: snapshot.index,
            persisted: last,
            unstable: last + 1,
        };
        log.check();
        log
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot.index + self.entries.len() as u64
    }

    pub fn last_term(&self) -> u64 {
        self.entries.back().map_or(self.snapshot.term, |e| e.term)
    }

    /// The term of the entry at `index`, if this log still knows it.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: u64) -> Option<&Entry<T>> {
        if index <= self.snapshot.index {
            return None;
        }
        self.entries.get((index - self.snapshot.index - 1) as usize)
    }

    /// §5.4.1: is a log ending at (`last_index`, `last_term`) at least as up-to-date?
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// First index of the run of entries with the same term as `index` (fast
    /// backtracking hint), not going below the first retained entry.
    pub fn first_index_of_term_at(&self, index: u64) -> u64 {
        let term = self
            .term(index)
            .expect("first_index_of_term_at: index not in log");
        let mut i = index;
        while i > self.first_index() && self.term(i - 1) == Some(term) {
            i -= 1;
        }
        i
    }

    /// The last index holding `term`, if any (leader side of fast backtracking).
    pub fn last_index_of_term(&self, term: u64) -> Option<u64> {
        if let Some(e) = self.entries.iter().rev().find(|e| e.term <= term) {
            return (e.term == term).then_some(e.index);
        }
        (self.snapshot.term == term).then_some(self.snapshot.index)
    }

    pub fn append(&mut self, entry: Entry<T>) {
        assert_eq!(entry.index, self.last_index() + 1, "append out of order");
        assert!(
            entry.term >= self.last_term(),
            "append of term {} after term {} at index {}",
            entry.term,
            self.last_term(),
            entry.index
        );
        self.entries.push_back(entry);
    }

    /// §5.3: drop `index` and everything after it (a conflict with the leader's log).
    pub fn truncate_from(&mut self, index: u64) {
        assert!(
            index > self.commit,
            "truncating committed entry {index} (commit {})",
            self.commit
        );
        assert!(
            index > self.snapshot.index,
            "truncating into the snapshot at {index}"
        );
        self.entries
            .truncate((index - self.snapshot.index - 1) as usize);
        self.persisted = self.persisted.min(index - 1);
        self.unstable = self.unstable.min(index);
    }

    /// Entries `from..=to`, at most `max_count`, at most `max_bytes` (but at least one).
    pub fn slice(
        &self,
        from: u64,
        to: u64,
        max_count: usize,
        max_bytes: usize,
        bytes: fn(&T) -> usize,
    ) -> Vec<Entry<T>> {
        let mut out = Vec::new();
        let mut total = 0usize;
        let mut i = from;
        while i <= to && out.len() < max_count {
            let e = self.entry(i).expect("slice: entry not in log");
            let size = match &e.payload {
                super::Payload::Data(d) => bytes(d),
                super::Payload::Noop => 0,
            };
            if !out.is_empty() && total + size > max_bytes {
                break;
            }
            total += size;
            out.push(e.clone());
            i += 1;
        }
        out
    }

    pub fn set_commit(&mut self, commit: u64) {
        assert!(
            commit <= self.last_index(),
            "commit {commit} beyond last index {}",
            self.last_index()
        );
        if commit > self.commit {
            self.commit = commit;
        }
    }

    /// Entries the shell must write next; they count as handed over afterwards.
    pub fn take_unstable(&mut self) -> Vec<Entry<T>> {
        let from = self.unstable.max(self.first_index());
        let out: Vec<_> = (from..=self.last_index())
            .map(|i| self.entry(i).unwrap().clone())
            .collect();
        self.unstable = self.last_index() + 1;
        out
    }

    /// Committed and locally durable entries not yet applied; they count as applied.
    pub fn take_committed(&mut self) -> Vec<Entry<T>> {
        let to = self.commit.min(self.persisted);
        if to <= self.applied {
            return Vec::new();
        }
        let out: Vec<_> = (self.applied + 1..=to)
            .map(|i| self.entry(i).unwrap().clone())
            .collect();
        self.applied = to;
        out
    }

    /// Drop entries up to `meta.index` (already applied) behind a snapshot.
    pub fn compact(&mut self, meta: SnapshotMeta) {
        assert!(meta.index <= self.applied, "compact beyond applied");
        if meta.index <= self.snapshot.index {
            return;
        }
        let drop = (meta.index - self.snapshot.index) as usize;
        self.entries.drain(..drop);
        self.snapshot = meta;
        self.unstable = self.unstable.max(meta.index + 1);
        self.check();
    }

    /// Replace the whole log by a snapshot from the leader (thesis §5.3).
    pub fn restore(&mut self, meta: SnapshotMeta) {
        assert!(
            meta.index > self.commit,
            "restoring snapshot {meta:?} at or below commit {}",
            self.commit
        );
        self.entries.clear();
        self.snapshot = meta;
        self.commit = meta.index;
        self.applied = meta.index;
        self.unstable = meta.index + 1;
        // `persisted` stays: the shell reports the snapshot durable with on_persisted.
        self.persisted = self.persisted.min(meta.index);
    }

    pub fn check(&self) {
        assert!(
            self.snapshot.index <= self.applied
                && self.applied <= self.commit
                && self.commit <= self.last_index()
                && self.persisted <= self.last_index(),
            "log invariant broken: snapshot {:?} applied {} commit {} persisted {} last {}",
            self.snapshot,
            self.applied,
            self.commit,
            self.persisted,
            self.last_index()
        );
    }
}
