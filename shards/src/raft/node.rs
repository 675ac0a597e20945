//! [`RaftNode`]: one member of one group. This file holds the state, the entry points
//! the shell calls, term handling and elections (§5.2, thesis §9.6 pre-vote, §6.2
//! check-quorum); `replicate.rs` holds log replication and snapshots (§5.3, §7).

use std::collections::{BTreeMap, BTreeSet};

use super::catch_up::CatchUp;
use super::log::RaftLog;
use super::progress::Progress;
use super::rng::SplitMix64;
use super::{
    Body, CompactError, Config, HardState, Message, NodeId, Payload, PlantedBugs, ProposeError,
    Ready, Restored, Role, SnapshotMeta, SoftState, TransferError,
};

/// The Raft state machine of one member of one group. See the module docs for how the
/// shell drives it.
#[derive(Debug)]
pub struct RaftNode<T> {
    pub(super) id: NodeId,
    pub(super) config: Config,
    pub(super) voters: Vec<NodeId>,
    pub(super) term: u64,
    pub(super) vote: Option<NodeId>,
    pub(super) role: Role,
    pub(super) leader: Option<NodeId>,
    pub(super) log: RaftLog<T>,
    /// Leader only: every other voter.
    pub(super) progress: BTreeMap<NodeId, Progress>,
    /// (Pre)candidate only: answers received, self included.
    pub(super) votes: BTreeMap<NodeId, bool>,
    /// The campaign is a leadership transfer (votes bypass leader stickiness).
    pub(super) campaign_transfer: bool,
    pub(super) election_elapsed: u32,
    pub(super) heartbeat_elapsed: u32,
    pub(super) election_timeout: u32,
    /// Leader only: transferring to this voter, for this many ticks.
    pub(super) transfer: Option<(NodeId, u32)>,
    pub(super) rng: SplitMix64,
    pub(super) entry_bytes: fn(&T) -> usize,
    /// Follower: chunks of a snapshot being received.
    pub(super) incoming_snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    /// Follower: a received snapshot for the next Ready.
    pub(super) snapshot_to_install: Option<(SnapshotMeta, Vec<u8>)>,
    pub(super) messages: Vec<Message<T>>,
    pub(super) persisted_messages: Vec<Message<T>>,
    pub(super) snapshot_requests: BTreeSet<NodeId>,
    last_hard_state: HardState,
    last_soft_state: SoftState,
    /// Proposals were appended since the last Ready: AppendEntries go out with it.
    broadcast_pending: bool,
    /// False while the shell says this replica must not lead (its copy of the group's
    /// data is damaged): it never starts a campaign, but still votes.
    campaign_allowed: bool,
    /// Test-only deliberate bugs (all off): see [`PlantedBugs`].
    pub(super) planted: PlantedBugs,
    /// Catching up after losing entries (or the term and vote): see `catch_up.rs`.
    pub(super) catch_up: Option<CatchUp>,
}

fn no_bytes<T>(_: &T) -> usize {
    0
}

impl<T: Clone> RaftNode<T> {
    /// A member `id` of the group `voters`, fresh (`restored` None) or restarted from
    /// its durable state. `seed` drives the randomized election timeouts.
    pub fn new(
        config: Config,
        id: NodeId,
        voters: Vec<NodeId>,
        seed: u64,
        restored: Option<Restored<T>>,
    ) -> Self {
        config.validate();
        let mut voters = voters;
        voters.sort_unstable();
        voters.dedup();
        assert!(
            voters.contains(&id),
            "node {id} is not among the voters {voters:?}"
        );
        let restored = restored.unwrap_or(Restored {
            hard_state: HardState::default(),
            snapshot: SnapshotMeta::default(),
            entries: Vec::new(),
        });
        let log = RaftLog::new(
            restored.snapshot,
            restored.entries,
            restored.hard_state.commit,
        );
        // An entry's term is never above the durable term of its writer; taking the max
        // also covers a crash between writing entries and the hard state.
        let term = restored.hard_state.term.max(log.last_term());
        let vote = if term == restored.hard_state.term {
            restored.hard_state.vote
        } else {
            None
        };
        let mut node = RaftNode {
            id,
            config,
            voters,
            term,
            vote,
            role: Role::Follower,
            leader: None,
            log,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            campaign_transfer: false,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            election_timeout: 0,
            transfer: None,
            rng: SplitMix64::new(seed ^ id.wrapping_mul(0x9E37_79B9)),
            entry_bytes: no_bytes::<T>,
            incoming_snapshot: None,
            snapshot_to_install: None,
            messages: Vec::new(),
            persisted_messages: Vec::new(),
            snapshot_requests: BTreeSet::new(),
            broadcast_pending: false,
            last_hard_state: HardState::default(),
            last_soft_state: SoftState {
                role: Role::Follower,
                leader: None,
                term: 0,
            },
            campaign_allowed: true,
            planted: PlantedBugs::default(),
            catch_up: None,
        };
        node.reset_election_timer();
        node.last_hard_state = node.hard_state();
        node.last_soft_state = node.soft_state();
        node
    }

    /// Measure entries for `Config::max_bytes_per_msg` (default: every entry is 0 bytes,
    /// so only `max_entries_per_msg` limits a message).
    pub fn with_entry_bytes(mut self, entry_bytes: fn(&T) -> usize) -> Self {
        self.entry_bytes = entry_bytes;
        self
    }

    /// Test-only: switch on deliberate bugs (the cluster simulation's self-test).
    #[doc(hidden)]
    pub fn plant_bugs(&mut self, bugs: PlantedBugs) {
        self.planted = bugs;
    }

    /// Allows or forbids this replica to campaign (pre-vote, vote or a leadership
    /// transfer's TimeoutNow). Forbidden, it keeps voting for others and following a
    /// leader, so a group whose other replicas are healthy elects one of them. A leader
    /// is not deposed by this: the shell hands its leadership over (`transfer_leader`).
    pub fn set_campaign(&mut self, allowed: bool) {
        self.campaign_allowed = allowed;
    }

    pub fn may_campaign(&self) -> bool {
        self.campaign_allowed
    }

    /// Leader only: the highest index known to be replicated on `peer` (None when not
    /// leading or not a voter). Lets the shell pick a transfer target that is caught up.
    pub fn match_index(&self, peer: NodeId) -> Option<u64> {
        self.progress.get(&peer).map(|p| p.match_index)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn voters(&self) -> &[NodeId] {
        &self.voters
    }
    pub fn commit_index(&self) -> u64 {
        self.log.commit
    }
    pub fn applied_index(&self) -> u64 {
        self.log.applied
    }
    pub fn persisted_index(&self) -> u64 {
        self.log.persisted
    }
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }
    /// The last index covered by the latest snapshot (entries up to it are compacted).
    pub fn snapshot_index(&self) -> u64 {
        self.log.snapshot.index
    }
    /// The term of the entry at `index`, if still in the log (or the snapshot's last).
    pub fn entry_term(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }
    /// The entry at `index`, while the log holds it (not compacted, not truncated).
    pub fn entry(&self, index: u64) -> Option<&super::Entry<T>> {
        self.log.entry(index)
    }

    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.commit,
        }
    }
    pub fn soft_state(&self) -> SoftState {
        SoftState {
            role: self.role,
            leader: self.leader,
            term: self.term,
        }
    }

    pub(super) fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Advance the logical clock by one tick.
    pub fn tick(&mut self) {
        if self.role == Role::Leader {
            self.tick_leader();
            return;
        }
        self.election_elapsed += 1;
        if self.election_elapsed >= self.election_timeout {
            if self.is_catching_up() {
                // Never campaigns (catch_up.rs); a fenced member asks for terms instead.
                self.reset_election_timer();
                self.fence_probe();
                return;
            }
            if self.campaign_allowed {
                self.campaign();
            } else {
                // The leader went silent but this replica may not stand: it forgets that
                // leader (so it is out of lease and grants the others' pre-votes, §9.6
                // thesis) and waits for one of them to win.
                self.become_follower(self.term, None);
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if let Some((_, elapsed)) = self.transfer.as_mut() {
            *elapsed += 1;
            if *elapsed >= self.config.election_ticks {
                self.transfer = None; // §3.10 thesis: abort a transfer that takes too long.
            }
        }
        if self.election_elapsed >= self.config.election_ticks {
            self.election_elapsed = 0;
            let active = 1 + self.progress.values().filter(|p| p.recent_active).count();
            if self.config.check_quorum && active < self.quorum() {
                // §6.2 thesis: without a quorum this leader could not commit anything,
                // and clients should find the leader elected by the majority.
                self.become_follower(self.term, None);
                return;
            }
            self.progress
                .values_mut()
                .for_each(|p| p.recent_active = false);
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.heartbeat_round();
        }
    }

    /// Append `data` to the log (leader only); it commits once a majority persisted it.
    pub fn propose(&mut self, data: T) -> Result<u64, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if let Some((to, _)) = self.transfer {
            return Err(ProposeError::TransferInProgress { to });
        }
        let uncommitted = self.log.last_index() - self.log.commit;
        if uncommitted >= self.config.max_uncommitted_entries {
            return Err(ProposeError::Backpressure { uncommitted });
        }
        let index = self.append_local(Payload::Data(data));
        // Sent with the next Ready: proposals made together leave in one AppendEntries.
        self.broadcast_pending = true;
        Ok(index)
    }

    /// The shell made every entry up to (`index`, `term`) durable (and, before it, every
    /// entry handed out earlier), or installed a snapshot ending there. A report for an
    /// entry that has since been replaced is ignored.
    pub fn on_persisted(&mut self, index: u64, term: u64) {
        // A report may arrive after a conflict truncated the entries it covers (they
        // are then no longer handed out, or replaced with another term): ignore it.
        if index <= self.log.persisted
            || index >= self.log.unstable
            || self.log.term(index) != Some(term)
        {
            return;
        }
        self.log.persisted = index;
        if self.role == Role::Leader {
            self.maybe_commit();
        }
        self.maybe_end_catch_up();
    }

    /// Discard the log up to `meta.index`, which a state-machine snapshot now covers.
    pub fn compact(&mut self, meta: SnapshotMeta) -> Result<(), CompactError> {
        if meta.index > self.log.applied {
            return Err(CompactError::NotApplied {
                index: meta.index,
                applied: self.log.applied,
            });
        }
        if meta.index <= self.log.snapshot.index {
            return Ok(());
        }
        let log_term = self.log.term(meta.index);
        if log_term != Some(meta.term) {
            return Err(CompactError::TermMismatch {
                index: meta.index,
                term: meta.term,
                log_term,
            });
        }
        self.log.compact(meta);
        Ok(())
    }

    /// Hand leadership to `to` (§3.10 thesis): bring it up to date, then tell it to
    /// campaign at once. Proposals are refused meanwhile; the transfer is abandoned after
    /// an election timeout.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if to == self.id {
            return Err(TransferError::ToSelf);
        }
        if !self.voters.contains(&to) {
            return Err(TransferError::NotAVoter { to });
        }
        self.transfer = Some((to, 0));
        if self.progress[&to].match_index == self.log.last_index() {
            self.send(to, Body::TimeoutNow);
        } else {
            self.send_appends(to);
        }
        Ok(())
    }

    /// Everything the shell must do now. Taking it hands it over: the next call returns
    /// only what happened since.
    pub fn ready(&mut self) -> Ready<T> {
        if std::mem::take(&mut self.broadcast_pending) && self.role == Role::Leader {
            self.broadcast_append();
        }
        if self.role == Role::Leader {
            self.propagate_commit();
        }
        let hard = self.hard_state();
        let soft = self.soft_state();
        let ready = Ready {
            soft_state: (soft != self.last_soft_state).then_some(soft),
            hard_state: (hard != self.last_hard_state).then_some(hard),
            snapshot_to_install: self.snapshot_to_install.take(),
            entries_to_persist: self.log.take_unstable(),
            messages: std::mem::take(&mut self.messages),
            persisted_messages: std::mem::take(&mut self.persisted_messages),
            committed_entries: self.log.take_committed(),
            snapshot_requests: std::mem::take(&mut self.snapshot_requests)
                .into_iter()
                .collect(),
        };
        self.last_hard_state = hard;
        self.last_soft_state = soft;
        ready
    }

    /// Is there anything for [`RaftNode::ready`]?
    pub fn has_ready(&self) -> bool {
        self.hard_state() != self.last_hard_state
            || self.soft_state() != self.last_soft_state
            || self.snapshot_to_install.is_some()
            || self.log.unstable <= self.log.last_index()
            || !self.messages.is_empty()
            || !self.persisted_messages.is_empty()
            || !self.snapshot_requests.is_empty()
            || self.log.commit.min(self.log.persisted) > self.log.applied
            || (self.role == Role::Leader && self.commit_to_propagate())
    }

    /// Handle a message from a peer.
    pub fn step(&mut self, msg: Message<T>) {
        assert_eq!(
            msg.to, self.id,
            "node {}: message for {} stepped here",
            self.id, msg.to
        );
        if !self.voters.contains(&msg.from) || msg.from == self.id {
            return;
        }
        if !self.fence_step(&msg) {
            return;
        }
        if !self.step_term(&msg) {
            return;
        }
        let from = msg.from;
        let term = msg.term;
        match msg.body {
            Body::PreVote {
                last_index,
                last_term,
            } => self.on_pre_vote(from, term, last_index, last_term),
            Body::Vote {
                last_index,
                last_term,
                ..
            } => self.on_vote(from, last_index, last_term),
            Body::PreVoteResponse { granted } => {
                if self.role == Role::PreCandidate && term == self.term + 1 {
                    self.on_vote_response(from, granted);
                }
            }
            Body::VoteResponse { granted } => {
                if self.role == Role::Candidate && term == self.term {
                    self.on_vote_response(from, granted);
                }
            }
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.follow(from);
                self.on_append(from, prev_index, prev_term, entries, commit);
            }
            Body::Heartbeat {
                commit,
                leader_commit,
            } => {
                self.follow(from);
                self.on_heartbeat(from, commit, leader_commit);
            }
            Body::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => {
                self.follow(from);
                self.on_snapshot_chunk(from, meta, offset, data, done);
            }
            Body::AppendResponse(response) => self.on_append_response(from, response),
            Body::HeartbeatResponse => self.on_heartbeat_response(from),
            Body::InstallSnapshotResponse {
                meta,
                next_offset,
                installed,
            } => self.on_snapshot_response(from, meta, next_offset, installed),
            Body::TimeoutNow => {
                if self.role != Role::Leader && !self.is_catching_up() && self.campaign_allowed {
                    self.become_candidate(true);
                }
            }
        }
        self.log.check();
    }

    /// Figure 2 "all servers" rule on terms, with pre-vote and leader stickiness.
    /// Returns whether the message should be handled further.
    fn step_term(&mut self, msg: &Message<T>) -> bool {
        if msg.term > self.term {
            match &msg.body {
                // A pre-vote never changes the receiver's term (§9.6 thesis), and a grant
                // carries the term the candidate asked about.
                Body::PreVote { .. } | Body::PreVoteResponse { granted: true } => {}
                // §6.2 thesis: while a leader is heard from, disruptive votes are ignored.
                Body::Vote {
                    transfer: false, ..
                } if self.in_lease() => return false,
                Body::Append { .. } | Body::Heartbeat { .. } | Body::InstallSnapshot { .. } => {
                    self.become_follower(msg.term, Some(msg.from))
                }
                _ => self.become_follower(msg.term, None),
            }
            return true;
        }
        if msg.term < self.term {
            match &msg.body {
                // A stale leader learns our term and steps down.
                Body::Append { .. } | Body::Heartbeat { .. } | Body::InstallSnapshot { .. } => {
                    self.send(msg.from, Body::HeartbeatResponse)
                }
                Body::PreVote { .. } => {
                    self.send(msg.from, Body::PreVoteResponse { granted: false })
                }
                _ => {}
            }
            return false;
        }
        true
    }

    /// A leader of the current term spoke: follow it.
    fn follow(&mut self, from: NodeId) {
        assert!(
            self.role != Role::Leader,
            "node {}: two leaders in term {}: {} and {from}",
            self.id,
            self.term,
            self.id
        );
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.election_elapsed = 0;
    }

    /// Heard from a leader within the last election timeout (or is the leader).
    fn in_lease(&self) -> bool {
        self.config.check_quorum
            && (self.role == Role::Leader
                || (self.leader.is_some() && self.election_elapsed < self.config.election_ticks))
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let base = self.config.election_ticks as u64;
        self.election_timeout = (base + self.rng.below(base)) as u32;
    }

    pub(super) fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        assert!(
            term >= self.term,
            "node {}: term going back from {} to {term}",
            self.id,
            self.term
        );
        if term > self.term {
            self.term = term;
            self.vote = None;
            self.forget_announced_commit();
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.progress.clear();
        self.votes.clear();
        self.transfer = None;
        self.reset_election_timer();
    }

    fn campaign(&mut self) {
        if self.config.pre_vote {
            self.become_pre_candidate();
        } else {
            self.become_candidate(false);
        }
    }

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.id, true);
        self.reset_election_timer();
        let body = Body::PreVote {
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
        };
        self.request_votes(self.term + 1, body);
        self.tally();
    }

    fn become_candidate(&mut self, transfer: bool) {
        self.term += 1;
        self.vote = Some(self.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.campaign_transfer = transfer;
        self.votes.clear();
        self.votes.insert(self.id, true);
        self.reset_election_timer();
        let body = Body::Vote {
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
            transfer,
        };
        self.request_votes(self.term, body);
        self.tally();
    }

    fn request_votes(&mut self, term: u64, body: Body<T>) {
        let peers: Vec<NodeId> = self
            .voters
            .iter()
            .copied()
            .filter(|&v| v != self.id)
            .collect();
        for to in peers {
            let msg = Message {
                from: self.id,
                to,
                term,
                body: body.clone(),
            };
            // A vote request promises our durable term and vote (written in this Ready).
            match body {
                Body::Vote { .. } => self.persisted_messages.push(msg),
                _ => self.messages.push(msg),
            }
        }
    }

    fn on_pre_vote(&mut self, from: NodeId, term: u64, last_index: u64, last_term: u64) {
        // A member catching up may lack committed entries it acknowledged (catch_up.rs).
        let granted = term > self.term
            && !self.in_lease()
            && self.may_vote()
            && self.log.is_up_to_date(last_index, last_term);
        let reply_term = if granted { term } else { self.term };
        self.messages.push(Message {
            from: self.id,
            to: from,
            term: reply_term,
            body: Body::PreVoteResponse { granted },
        });
    }

    /// §5.2, §5.4.1: one vote per term, only for a log at least as up-to-date; none
    /// while catching up (catch_up.rs).
    fn on_vote(&mut self, from: NodeId, last_index: u64, last_term: u64) {
        let granted = (self.vote.is_none() || self.vote == Some(from))
            && self.may_vote()
            && self.log.is_up_to_date(last_index, last_term);
        if granted {
            self.vote = Some(from);
            self.election_elapsed = 0;
        }
        let msg = Message {
            from: self.id,
            to: from,
            term: self.term,
            body: Body::VoteResponse { granted },
        };
        self.persisted_messages.push(msg);
    }

    /// Not while catching up (catch_up.rs), unless that rule is planted away.
    fn may_vote(&self) -> bool {
        !self.is_catching_up() || self.planted.vote_while_catching_up
    }

    fn on_vote_response(&mut self, from: NodeId, granted: bool) {
        self.votes.insert(from, granted);
        self.tally();
    }

    fn tally(&mut self) {
        let yes = self.votes.values().filter(|&&g| g).count();
        let no = self.votes.len() - yes;
        if yes >= self.quorum() {
            match self.role {
                Role::PreCandidate => self.become_candidate(false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
        } else if no >= self.quorum() {
            self.become_follower(self.term, None);
        }
    }

    fn become_leader(&mut self) {
        assert_eq!(
            self.role,
            Role::Candidate,
            "node {}: leader without candidacy",
            self.id
        );
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.votes.clear();
        self.transfer = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let next = self.log.last_index() + 1;
        self.progress = self
            .voters
            .iter()
            .filter(|&&v| v != self.id)
            .map(|&v| (v, Progress::new(next)))
            .collect();
        // §5.4.2, §8: entries of earlier terms commit only under an entry of this term.
        self.append_local(Payload::Noop);
        self.broadcast_append();
    }

    fn append_local(&mut self, payload: Payload<T>) -> u64 {
        let index = self.log.last_index() + 1;
        self.log.append(super::Entry {
            term: self.term,
            index,
            payload,
        });
        index
    }

    pub(super) fn send(&mut self, to: NodeId, body: Body<T>) {
        let persisted = matches!(
            body,
            Body::AppendResponse(super::AppendResponse::Accepted { .. })
                | Body::InstallSnapshotResponse {
                    installed: true,
                    ..
                }
        );
        let msg = Message {
            from: self.id,
            to,
            term: self.term,
            body,
        };
        if persisted {
            self.persisted_messages.push(msg);
        } else {
            self.messages.push(msg);
        }
    }

    pub(super) fn progress_mut(&mut self, peer: NodeId) -> &mut Progress {
        self.progress.get_mut(&peer).expect("progress of a voter")
    }

    #[cfg(test)]
    pub(super) fn log_entries(&self) -> &std::collections::VecDeque<super::Entry<T>> {
        &self.log.entries
    }
}
