//! What a leader knows about each follower (Figure 2 `nextIndex`/`matchIndex`) and how
//! it is sending to it: probing for the match point one message at a time, streaming
//! AppendEntries through a bounded pipeline, or sending a snapshot in chunks.

use std::collections::VecDeque;

use super::SnapshotMeta;

#[derive(Debug)]
pub(crate) enum Mode {
    /// One AppendEntries at a time until the follower accepts one; `paused` while it is
    /// unanswered.
    Probe { paused: bool },
    /// Optimistic: `next` advances as messages leave. `inflight` holds the last index
    /// of each unacknowledged message, at most `Config::max_inflight`.
    Replicate { inflight: VecDeque<u64> },
    /// The entries the follower needs are compacted: it gets a snapshot.
    Snapshot(SnapshotTransfer),
}

#[derive(Debug)]
pub(crate) struct SnapshotTransfer {
    /// None until the shell supplies the bytes (`Ready::snapshot_requests`).
    pub data: Option<(SnapshotMeta, Vec<u8>)>,
    /// Bytes the follower confirmed.
    pub acked: u64,
    /// Bytes sent (go-back-N from `acked` when the transfer stalls).
    pub sent: u64,
    /// `acked` at the previous heartbeat, to notice a stall.
    pub acked_at_heartbeat: u64,
}

#[derive(Debug)]
pub(crate) struct Progress {
    pub match_index: u64,
    pub next_index: u64,
    pub mode: Mode,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// An AppendEntries (or snapshot chunk) went out since the last heartbeat round.
    pub sent_since_heartbeat: bool,
    /// The commit index the follower was last told (heartbeats only carry a new one).
    pub commit_sent: u64,
    /// `match_index` at the previous heartbeat, to notice a stalled pipeline.
    pub match_at_heartbeat: u64,
}

impl Progress {
    pub fn new(next_index: u64) -> Self {
        Progress {
            match_index: 0,
            next_index,
            mode: Mode::Probe { paused: false },
            recent_active: false,
            sent_since_heartbeat: false,
            commit_sent: 0,
            match_at_heartbeat: 0,
        }
    }

    pub fn become_probe(&mut self) {
        self.next_index = self.match_index + 1;
        self.mode = Mode::Probe { paused: false };
    }

    pub fn become_replicate(&mut self) {
        self.next_index = self.match_index + 1;
        self.mode = Mode::Replicate {
            inflight: VecDeque::new(),
        };
    }

    /// Can another AppendEntries go out now?
    pub fn can_send(&self, max_inflight: usize) -> bool {
        match &self.mode {
            Mode::Probe { paused } => !paused,
            Mode::Replicate { inflight } => inflight.len() < max_inflight,
            Mode::Snapshot(_) => false,
        }
    }

    /// Record an AppendEntries ending at `last` (== prev when empty).
    pub fn sent_append(&mut self, last: u64, had_entries: bool) {
        self.sent_since_heartbeat = true;
        match &mut self.mode {
            Mode::Probe { paused } => *paused = true,
            Mode::Replicate { inflight } => {
                if had_entries {
                    inflight.push_back(last);
                    self.next_index = last + 1;
                }
            }
            Mode::Snapshot(_) => unreachable!("append while sending a snapshot"),
        }
    }

    /// The follower holds everything through `index` durably. Returns whether this is
    /// news.
    pub fn accepted(&mut self, index: u64) -> bool {
        let news = index > self.match_index;
        if news {
            self.match_index = index;
            self.next_index = self.next_index.max(index + 1);
        }
        match &mut self.mode {
            Mode::Probe { .. } => self.become_replicate(),
            Mode::Replicate { inflight } => {
                while inflight.front().is_some_and(|&last| last <= index) {
                    inflight.pop_front();
                }
            }
            Mode::Snapshot(_) => {}
        }
        news
    }
}
