//! Log replication (§5.3), the commit rule (§5.3, §5.4.2), heartbeats, and snapshots
//! for followers whose entries were compacted (§7, thesis ch. 5).

use super::node::RaftNode;
use super::progress::{Mode, Progress, SnapshotTransfer};
use super::{AppendResponse, Body, Entry, NodeId, Role, SnapshotError, SnapshotMeta};

impl<T: Clone> RaftNode<T> {
    pub(super) fn broadcast_append(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for peer in peers {
            self.send_appends(peer);
        }
        // A single voter commits on its own persist alone.
        self.maybe_commit();
    }

    /// Send as many AppendEntries to `peer` as its mode and the pipeline allow.
    pub(super) fn send_appends(&mut self, peer: NodeId) {
        while self.send_append_once(peer) {}
    }

    fn send_append_once(&mut self, peer: NodeId) -> bool {
        let max_inflight = self.config.max_inflight;
        let first_index = self.log.first_index();
        let p = self.progress_mut(peer);
        if !p.can_send(max_inflight) {
            return false;
        }
        if p.next_index < first_index {
            // The entries it needs are compacted: it gets a snapshot (thesis §5.3).
            p.mode = Mode::Snapshot(SnapshotTransfer {
                data: None,
                acked: 0,
                sent: 0,
                acked_at_heartbeat: 0,
            });
            self.snapshot_requests.insert(peer);
            return false;
        }
        let is_replicate = matches!(p.mode, Mode::Replicate { .. });
        let next = p.next_index;
        let prev_index = next - 1;
        let prev_term = self
            .log
            .term(prev_index)
            .expect("prev entry of a follower is in the log");
        let last = self.log.last_index();
        let entries = if next <= last {
            let c = &self.config;
            self.log.slice(
                next,
                last,
                c.max_entries_per_msg,
                c.max_bytes_per_msg,
                self.entry_bytes,
            )
        } else {
            Vec::new()
        };
        if entries.is_empty() && is_replicate {
            return false;
        }
        let last_new = prev_index + entries.len() as u64;
        let commit = self.log.commit;
        let p = self.progress_mut(peer);
        p.sent_append(last_new, !entries.is_empty());
        p.commit_sent = p.commit_sent.max(commit.min(last_new));
        self.send(
            peer,
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            },
        );
        is_replicate
    }

    /// §5.3, §5.4.2: the highest index a majority holds durably commits, if it is of
    /// the current term. The leader counts itself only up to its own persisted index.
    pub(super) fn maybe_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let mut matched: Vec<u64> = self
            .voters
            .iter()
            .map(|v| {
                if *v == self.id {
                    self.log.persisted
                } else {
                    self.progress[v].match_index
                }
            })
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matched[self.quorum() - 1];
        let current_term = self.log.term(candidate) == Some(self.term);
        if candidate > self.log.commit && (current_term || self.planted.commit_previous_term) {
            self.log.set_commit(candidate);
        }
    }

    fn heartbeat_commit(&self, p: &Progress) -> u64 {
        // Never tell a follower to commit beyond what it is known to hold.
        self.log.commit.min(p.match_index)
    }

    pub(super) fn commit_to_propagate(&self) -> bool {
        self.progress.values().any(|p| {
            self.heartbeat_commit(p) > p.commit_sent && !matches!(p.mode, Mode::Snapshot(_))
        })
    }

    /// A new commit index reaches followers in the same Ready: a commit-only heartbeat
    /// to each follower no AppendEntries told.
    pub(super) fn propagate_commit(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for peer in peers {
            let commit = self.heartbeat_commit(&self.progress[&peer]);
            let p = self.progress_mut(peer);
            if commit > p.commit_sent && !matches!(p.mode, Mode::Snapshot(_)) {
                p.commit_sent = commit;
                let leader_commit = self.log.commit;
                self.send(
                    peer,
                    Body::Heartbeat {
                        commit,
                        leader_commit,
                    },
                );
            }
        }
    }

    /// Every `heartbeat_ticks`: restart stalled transfers, then a heartbeat to each
    /// follower that got no AppendEntries in the interval.
    pub(super) fn heartbeat_round(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for peer in peers {
            let quiet = !self.progress[&peer].sent_since_heartbeat;
            self.progress_mut(peer).sent_since_heartbeat = false;
            self.restart_if_stalled(peer);
            if quiet && !self.progress[&peer].sent_since_heartbeat {
                let commit = self.heartbeat_commit(&self.progress[&peer]);
                let p = self.progress_mut(peer);
                p.commit_sent = p.commit_sent.max(commit);
                let leader_commit = self.log.commit;
                self.send(
                    peer,
                    Body::Heartbeat {
                        commit,
                        leader_commit,
                    },
                );
            }
        }
    }

    /// Messages may be lost: a probe unanswered for a heartbeat interval is sent again;
    /// a pipeline whose match did not move while messages were in flight restarts from
    /// the match (probe); a snapshot transfer goes back to the last confirmed chunk.
    fn restart_if_stalled(&mut self, peer: NodeId) {
        let p = self.progress_mut(peer);
        let stalled_match = p.match_index == p.match_at_heartbeat;
        p.match_at_heartbeat = p.match_index;
        match &mut p.mode {
            Mode::Probe { paused } => {
                if *paused {
                    *paused = false;
                    self.send_appends(peer);
                }
            }
            Mode::Replicate { inflight } => {
                if !inflight.is_empty() && stalled_match {
                    p.become_probe();
                    self.send_appends(peer);
                }
            }
            Mode::Snapshot(t) => {
                if t.data.is_some() && t.sent > t.acked && t.acked == t.acked_at_heartbeat {
                    t.sent = t.acked;
                }
                t.acked_at_heartbeat = t.acked;
                self.send_snapshot_chunks(peer);
            }
        }
    }

    pub(super) fn on_append(
        &mut self,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry<T>>,
        commit: u64,
    ) {
        // `commit` is the leader's own commit index (catch_up.rs).
        self.note_commit_announced(commit);
        let (mut prev_index, mut prev_term, mut entries) = (prev_index, prev_term, entries);
        if prev_index < self.log.commit {
            // Entries up to our commit index match every leader's log (§5.4.3): skip them.
            let skip = ((self.log.commit - prev_index) as usize).min(entries.len());
            entries.drain(..skip);
            prev_index = self.log.commit;
            prev_term = self
                .log
                .term(prev_index)
                .expect("commit index is in the log");
        }
        if self.log.term(prev_index) != Some(prev_term) {
            let response = self.reject_hint(prev_index);
            self.send(from, Body::AppendResponse(response));
            return;
        }
        let last_new = prev_index + entries.len() as u64;
        for entry in entries {
            assert!(
                entry.index > self.log.snapshot.index,
                "entry {} inside the snapshot",
                entry.index
            );
            match self.log.term(entry.index) {
                Some(term) if term == entry.term => {}
                Some(_) => {
                    // §5.3: a conflict; our suffix was never committed.
                    self.log.truncate_from(entry.index);
                    self.log.append(entry);
                }
                None => self.log.append(entry),
            }
        }
        let new_commit = commit.min(last_new);
        if new_commit > self.log.commit {
            self.log.set_commit(new_commit);
        }
        self.send(
            from,
            Body::AppendResponse(AppendResponse::Accepted {
                match_index: last_new,
            }),
        );
        self.maybe_end_catch_up();
    }

    fn reject_hint(&self, prev_index: u64) -> AppendResponse {
        let catching_up = self.is_catching_up();
        if prev_index > self.log.last_index() {
            return AppendResponse::Rejected {
                prev_index,
                conflict_term: None,
                first_index: self.log.last_index() + 1,
                catching_up,
            };
        }
        let term = self
            .log
            .term(prev_index)
            .expect("prev_index at or above commit is in the log");
        AppendResponse::Rejected {
            prev_index,
            conflict_term: Some(term),
            first_index: self.log.first_index_of_term_at(prev_index),
            catching_up,
        }
    }

    pub(super) fn on_heartbeat(&mut self, from: NodeId, commit: u64, leader_commit: u64) {
        self.note_commit_announced(leader_commit);
        // A heartbeat's commit is bounded by the leader's `match_index` for us, which a
        // member catching up may no longer deserve (its log may even hold other entries
        // there): while catching up, only AppendEntries, checked by Log Matching (§5.3),
        // advance its commit index.
        if self.is_catching_up() {
            self.answer_heartbeat_beyond_log(from, commit);
        } else {
            let commit = commit.min(self.log.last_index());
            if commit > self.log.commit {
                self.log.set_commit(commit);
            }
        }
        self.send(from, Body::HeartbeatResponse);
        self.maybe_end_catch_up();
    }

    pub(super) fn on_append_response(&mut self, from: NodeId, response: AppendResponse) {
        if self.role != Role::Leader {
            return;
        }
        self.progress_mut(from).recent_active = true;
        match response {
            AppendResponse::Accepted { match_index } => self.on_accepted(from, match_index),
            AppendResponse::Rejected {
                prev_index,
                conflict_term,
                first_index,
                catching_up,
            } => {
                let next = self.backtrack(prev_index, conflict_term, first_index);
                if catching_up
                    && self.lost_acknowledged(from, prev_index, conflict_term, first_index)
                {
                    self.restart_after_loss(from, next);
                    return;
                }
                let p = &self.progress[&from];
                let stale = prev_index <= p.match_index
                    || match p.mode {
                        Mode::Probe { .. } => prev_index != p.next_index - 1,
                        Mode::Replicate { .. } => false,
                        Mode::Snapshot(_) => true,
                    };
                if stale {
                    return;
                }
                let p = self.progress_mut(from);
                p.next_index = next.max(p.match_index + 1);
                p.mode = Mode::Probe { paused: false };
                self.send_appends(from);
            }
        }
    }

    /// Where to probe next after a rejection: fast backtracking (thesis §5.3) skips a
    /// whole conflicting term at once.
    fn backtrack(&self, prev_index: u64, conflict_term: Option<u64>, first_index: u64) -> u64 {
        let next = match conflict_term.and_then(|t| self.log.last_index_of_term(t)) {
            Some(last_of_term) => last_of_term + 1,
            None => first_index,
        };
        next.min(prev_index).max(1)
    }

    /// Does this rejection from a follower that is catching up (catch_up.rs) show that
    /// it no longer holds entries it acknowledged to us (rebuilt data dir, dropped torn
    /// tail)? Its log ends below its `match_index`, or it holds another entry at an
    /// index it acknowledged.
    ///
    /// Only a catching-up follower's rejection counts: an ordinary one of that kind was
    /// sent before the acknowledgement and overtaken by it (the network reorders and
    /// duplicates), so it is stale. A catching-up rejection may be stale too, from
    /// earlier in the same catch-up; restarting then is still safe (see
    /// `restart_after_loss`), it only costs a resend.
    fn lost_acknowledged(
        &self,
        from: NodeId,
        prev_index: u64,
        conflict_term: Option<u64>,
        first_index: u64,
    ) -> bool {
        let p = &self.progress[&from];
        if matches!(p.mode, Mode::Snapshot(_)) {
            return false; // a snapshot is already on its way
        }
        match conflict_term {
            None => first_index <= p.match_index,
            Some(_) => prev_index <= p.match_index,
        }
    }

    /// The follower's acknowledgements no longer hold: nothing is known to match (its
    /// log may even keep a suffix of another term), so `match_index` goes to 0 and
    /// probing starts at `next`, with entries or, when we compacted them, a snapshot
    /// (thesis §5.3). A lower `match_index` never undoes a commit (the commit index
    /// never goes back); it only stops this follower from counting until it
    /// acknowledges again, and bounds the commit index our heartbeats tell it.
    fn restart_after_loss(&mut self, from: NodeId, next: u64) {
        let p = self.progress_mut(from);
        p.match_index = 0;
        p.match_at_heartbeat = 0;
        p.commit_sent = 0;
        p.become_probe();
        p.next_index = next;
        self.send_appends(from);
    }

    fn on_accepted(&mut self, from: NodeId, match_index: u64) {
        // Only a peer that broke Raft's assumptions (lost its durable state and rejoined
        // under the same id, or a bug) can claim more than we sent: ignore it rather than
        // let remote input crash this node.
        debug_assert!(
            match_index <= self.log.last_index(),
            "node {}: follower {from} matched {match_index} beyond our last index {}",
            self.id,
            self.log.last_index()
        );
        if match_index > self.log.last_index() {
            return;
        }
        let p = self.progress_mut(from);
        let news = p.accepted(match_index);
        if let Mode::Snapshot(t) = &p.mode {
            // The follower holds the snapshot: continue with entries (or, if the log was
            // compacted beyond it meanwhile, with a newer snapshot).
            if t.data
                .as_ref()
                .is_none_or(|(meta, _)| p.match_index >= meta.index)
            {
                p.become_probe();
            }
        }
        if news {
            self.maybe_commit();
        }
        if let Some((to, _)) = self.transfer {
            if to == from && self.progress[&from].match_index == self.log.last_index() {
                self.send(from, Body::TimeoutNow);
            }
        }
        self.send_appends(from);
    }

    pub(super) fn on_heartbeat_response(&mut self, from: NodeId) {
        if self.role == Role::Leader {
            self.progress_mut(from).recent_active = true;
        }
    }

    /// The shell's answer to `Ready::snapshot_requests`: the snapshot for `peer`.
    pub fn send_snapshot(
        &mut self,
        peer: NodeId,
        meta: SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<(), SnapshotError> {
        if self.role != Role::Leader {
            return Err(SnapshotError::NotLeader);
        }
        let compacted_index = self.log.snapshot.index;
        if meta.index < compacted_index
            || self.log.term(meta.index) != Some(meta.term)
            || meta.index > self.log.commit
        {
            return Err(SnapshotError::TooOld {
                snapshot_index: meta.index,
                compacted_index,
            });
        }
        match self.progress.get_mut(&peer).map(|p| &mut p.mode) {
            Some(Mode::Snapshot(t)) if t.data.is_none() => {
                *t = SnapshotTransfer {
                    data: Some((meta, data)),
                    acked: 0,
                    sent: 0,
                    acked_at_heartbeat: 0,
                };
            }
            _ => return Err(SnapshotError::NotRequested { peer }),
        }
        self.send_snapshot_chunks(peer);
        Ok(())
    }

    /// The lowest index of a snapshot this leader is sending (None when it sends none).
    /// The follower needs the entries after it as soon as it has installed it: a
    /// leader that compacts them meanwhile sends it a newer snapshot instead, and a
    /// follower whose transfers take longer than the log keeps would never catch up
    /// (thesis §5.4.2: the leader must keep what it still has to send).
    pub fn snapshot_in_flight_index(&self) -> Option<u64> {
        if self.role != Role::Leader {
            return None;
        }
        self.progress
            .values()
            .filter_map(|p| match &p.mode {
                Mode::Snapshot(SnapshotTransfer {
                    data: Some((meta, _)),
                    ..
                }) => Some(meta.index),
                _ => None,
            })
            .min()
    }

    /// The shell cannot produce a snapshot for `peer` now; it is asked again after a
    /// heartbeat interval.
    pub fn snapshot_failed(&mut self, peer: NodeId) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(p) = self.progress.get_mut(&peer) {
            if matches!(p.mode, Mode::Snapshot(_)) {
                p.become_probe();
                p.mode = Mode::Probe { paused: true };
            }
        }
    }

    fn chunk_count(&self, len: usize) -> u64 {
        (len.div_ceil(self.config.snapshot_chunk_bytes) as u64).max(1)
    }

    /// Send chunks `sent..`, at most `max_inflight` unconfirmed (go-back-N on stall).
    fn send_snapshot_chunks(&mut self, peer: NodeId) {
        let chunk_bytes = self.config.snapshot_chunk_bytes;
        let window = self.config.max_inflight as u64;
        loop {
            let Mode::Snapshot(t) = &self.progress[&peer].mode else {
                return;
            };
            let Some((meta, data)) = &t.data else { return };
            let chunks = self.chunk_count(data.len());
            if t.sent >= chunks || t.sent - t.acked >= window {
                return;
            }
            let start = (t.sent as usize * chunk_bytes).min(data.len());
            let end = (start + chunk_bytes).min(data.len());
            let body = Body::InstallSnapshot {
                meta: *meta,
                offset: start as u64,
                data: data[start..end].to_vec(),
                done: t.sent + 1 == chunks,
            };
            let p = self.progress_mut(peer);
            p.sent_since_heartbeat = true;
            if let Mode::Snapshot(t) = &mut p.mode {
                t.sent += 1;
            }
            self.send(peer, body);
        }
    }

    pub(super) fn on_snapshot_response(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        next_offset: u64,
        installed: bool,
    ) {
        if self.role != Role::Leader {
            return;
        }
        self.progress_mut(from).recent_active = true;
        if installed {
            self.on_accepted(from, meta.index);
            return;
        }
        let chunk_bytes = self.config.snapshot_chunk_bytes as u64;
        if let Mode::Snapshot(t) = &mut self.progress_mut(from).mode {
            if t.data.as_ref().is_some_and(|(m, _)| *m == meta) {
                t.acked = next_offset / chunk_bytes;
                t.sent = t.sent.max(t.acked);
            }
        }
        self.send_snapshot_chunks(from);
    }

    /// Follower: assemble chunks in order; a complete snapshot replaces the log.
    pub(super) fn on_snapshot_chunk(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Vec<u8>,
        done: bool,
    ) {
        if meta.index <= self.log.commit || self.log.term(meta.index) == Some(meta.term) {
            // We hold (or have committed) everything it covers: keep our log (thesis §5.3
            // retains the entries after a matching snapshot index).
            if meta.index > self.log.commit {
                self.log.set_commit(meta.index);
            }
            self.incoming_snapshot = None;
            self.send(
                from,
                Body::InstallSnapshotResponse {
                    meta,
                    next_offset: offset,
                    installed: true,
                },
            );
            return;
        }
        if offset == 0
            && self
                .incoming_snapshot
                .as_ref()
                .is_none_or(|(m, _)| *m != meta)
        {
            self.incoming_snapshot = Some((meta, Vec::new()));
        }
        let held = match &mut self.incoming_snapshot {
            Some((m, buf)) if *m == meta && offset == buf.len() as u64 => {
                buf.extend_from_slice(&data);
                buf.len() as u64
            }
            // Out of order or from another snapshot: tell the leader what we hold.
            Some((m, buf)) if *m == meta => {
                let held = buf.len() as u64;
                self.send(
                    from,
                    Body::InstallSnapshotResponse {
                        meta,
                        next_offset: held,
                        installed: false,
                    },
                );
                return;
            }
            _ => {
                self.send(
                    from,
                    Body::InstallSnapshotResponse {
                        meta,
                        next_offset: 0,
                        installed: false,
                    },
                );
                return;
            }
        };
        if done {
            let (meta, buf) = self
                .incoming_snapshot
                .take()
                .expect("snapshot being assembled");
            self.log.restore(meta);
            self.snapshot_to_install = Some((meta, buf));
            self.send(
                from,
                Body::InstallSnapshotResponse {
                    meta,
                    next_offset: held,
                    installed: true,
                },
            );
            return;
        }
        self.send(
            from,
            Body::InstallSnapshotResponse {
                meta,
                next_offset: held,
                installed: false,
            },
        );
    }
}
