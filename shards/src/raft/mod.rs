//! A hand-written, sans-IO Raft core for one group (Raft paper, Ongaro's thesis).
//!
//! [`RaftNode`] is a plain state machine in the style of raft-rs `RawNode` and ScyllaDB's
//! `fsm`: the shell feeds it [`RaftNode::tick`] (a logical clock), [`RaftNode::step`]
//! (a message from a peer), [`RaftNode::propose`] and the acknowledgements of its own
//! I/O ([`RaftNode::on_persisted`], [`RaftNode::send_snapshot`]); it takes one
//! [`Ready`] at a time with [`RaftNode::ready`] and performs it. Nothing in here does
//! I/O, reads a clock or owns a thread; randomness (election timeouts) comes from a
//! seeded generator the caller chooses.
//!
//! # What the shell must do with a [`Ready`]
//!
//! 1. Send [`Ready::messages`] right away: a leader's AppendEntries go out while its own
//!    write of the same entries is still in progress.
//! 2. Make durable, in this order: [`Ready::snapshot_to_install`] (the follower's log
//!    then starts after it), [`Ready::entries_to_persist`] (writing an entry at index
//!    `i` replaces any stored entry `>= i`: the suffix was truncated by a conflict,
//!    §5.3) and [`Ready::hard_state`]. Readies are persisted in the order they were
//!    taken.
//! 3. Once that is durable: call [`RaftNode::on_persisted`] with the (index, term) of
//!    the last entry written (or of the installed snapshot), then send
//!    [`Ready::persisted_messages`] (votes and acknowledgements promise durable state,
//!    so they must not leave before it is on disk).
//! 4. Apply [`Ready::committed_entries`] in order. They are committed and already
//!    durable locally; [`Payload::Noop`] entries (appended by every new leader, §5.4.2)
//!    carry no command and are only skipped.
//! 5. For each peer in [`Ready::snapshot_requests`], call [`RaftNode::send_snapshot`]
//!    with a snapshot whose index is at least the last compacted index (or
//!    [`RaftNode::snapshot_failed`] when none can be produced now).
//!
//! Commit needs a persisted majority: the leader counts itself for an entry only after
//! `on_persisted` covers it, and followers acknowledge only through
//! `persisted_messages`.
//!
//! Heartbeats are [`Body::Heartbeat`] messages, at most one per follower per heartbeat
//! interval, and none to a follower that got an AppendEntries in that interval. The
//! shell may coalesce all heartbeats of its groups to one peer node into one frame.
//!
//! After a restart, pass the durable state as [`Restored`]: the entries it holds count
//! as persisted, and entries after the snapshot up to the stored commit are handed out
//! again in `committed_entries` (the state machine restarts from the snapshot).
//!
//! A node that may have lost entries it acknowledged, or its term and vote (a rebuilt
//! data dir, a dropped torn tail), starts in the catching-up mode of `catch_up.rs`
//! ([`RaftNode::catch_up`]): it grants no vote and never campaigns until it holds what
//! a leader of its term has committed.
//!
//! Files: `node.rs` (state, entry points, elections), `replicate.rs` (replication,
//! commit, heartbeats, snapshots), `catch_up.rs`, `log.rs`, `progress.rs`, `rng.rs`;
//! tests in `tests.rs` on the simulated network and disk of `sim.rs`. Replay one simulation
//! seed: `RAFT_SIM_SEED=<seed> RAFT_SIM_SEEDS=1 cargo test -p starcite-shards simulation`.

mod catch_up;
mod log;
mod node;
mod progress;
mod replicate;
mod rng;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use node::RaftNode;
pub use rng::SplitMix64;

/// Deliberate bugs for the cluster simulation's self-test (`shards/tests/cluster_sim.rs`
/// shows that its checker catches them). All off by default; never set them elsewhere.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlantedBugs {
    /// Commit by counting replicas an entry of an earlier term (breaks §5.4.2, Figure 8).
    pub commit_previous_term: bool,
    /// Grant votes and pre-votes while catching up (breaks catch_up.rs: a member that
    /// lost acknowledged entries helps elect a leader that lacks them).
    pub vote_while_catching_up: bool,
}

/// Identifies a member of the group (a node of the cluster).
pub type NodeId = u64;

/// Timers, limits and feature switches of one group. All times are in ticks.
#[derive(Debug, Clone)]
pub struct Config {
    /// Followers start an election after a random timeout in
    /// `[election_ticks, 2 * election_ticks)`; a leader checks its quorum every
    /// `election_ticks`.
    pub election_ticks: u32,
    /// A leader sends heartbeats every `heartbeat_ticks` (must be < `election_ticks`).
    pub heartbeat_ticks: u32,
    /// AppendEntries messages in flight to one follower at most (pipeline depth).
    pub max_inflight: usize,
    /// Entries in one AppendEntries at most.
    pub max_entries_per_msg: usize,
    /// Bytes of entries in one AppendEntries at most, measured with the size function
    /// given to [`RaftNode::with_entry_bytes`] (at least one entry is always sent).
    pub max_bytes_per_msg: usize,
    /// Bytes of snapshot data in one InstallSnapshot chunk.
    pub snapshot_chunk_bytes: usize,
    /// Proposals are refused with [`ProposeError::Backpressure`] while this many
    /// entries are uncommitted.
    pub max_uncommitted_entries: u64,
    /// §9.6 thesis: probe with PreVote before bumping the term.
    pub pre_vote: bool,
    /// §6.2 thesis: a leader that has not heard from a quorum within `election_ticks`
    /// steps down, and a node that heard from a leader within `election_ticks` ignores
    /// (pre)votes that are not a leadership transfer.
    pub check_quorum: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_inflight: 64,
            max_entries_per_msg: 256,
            max_bytes_per_msg: 1 << 20,
            snapshot_chunk_bytes: 1 << 20,
            max_uncommitted_entries: 1 << 16,
            pre_vote: true,
            check_quorum: true,
        }
    }
}

impl Config {
    fn validate(&self) {
        assert!(
            self.heartbeat_ticks >= 1,
            "config: heartbeat_ticks must be >= 1: {self:?}"
        );
        assert!(
            self.election_ticks > self.heartbeat_ticks,
            "config: election_ticks must exceed heartbeat_ticks: {self:?}"
        );
        assert!(
            self.max_inflight >= 1,
            "config: max_inflight must be >= 1: {self:?}"
        );
        assert!(
            self.max_entries_per_msg >= 1,
            "config: max_entries_per_msg >= 1: {self:?}"
        );
        assert!(
            self.snapshot_chunk_bytes >= 1,
            "config: snapshot_chunk_bytes >= 1: {self:?}"
        );
    }
}

/// What an entry carries: a command of the state machine, or the no-op a new leader
/// appends to commit the entries of earlier terms (§5.4.2, §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload<T> {
    Noop,
    Data(T),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    pub term: u64,
    pub index: u64,
    pub payload: Payload<T>,
}

/// The state that must be durable before votes and acknowledgements leave (Figure 2).
/// `commit` may be persisted lazily: it is only a hint after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: u64,
    pub vote: Option<NodeId>,
    pub commit: u64,
}

impl HardState {
    /// Folds in a term and vote written later (log replay) or carried over (a rebuilt
    /// data dir): the term never goes back, and the vote of a term, once cast, is never
    /// taken back or replaced (§5.2, one vote per term). `commit` is not touched.
    pub fn merge(&mut self, term: u64, vote: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        if term == self.term && self.vote.is_none() {
            self.vote = vote;
        }
    }
}

/// The last (index, term) a state-machine snapshot covers. The bytes are the shell's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
}

/// What a node restarts from: its durable hard state, its latest snapshot (index 0 if
/// none) and the log entries after it, all as stored.
#[derive(Debug, Clone)]
pub struct Restored<T> {
    pub hard_state: HardState,
    pub snapshot: SnapshotMeta,
    pub entries: Vec<Entry<T>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// Volatile state the shell may want to show or route by; reported when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftState {
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<T> {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's current term, except for PreVote (the term it would campaign in)
    /// and a granted PreVoteResponse (the term of the request).
    pub term: u64,
    pub body: Body<T>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<T> {
    /// §9.6 thesis: would you vote for me in `term`? Changes no state of the receiver.
    PreVote {
        last_index: u64,
        last_term: u64,
    },
    PreVoteResponse {
        granted: bool,
    },
    /// §5.2 RequestVote. `transfer` marks a leadership transfer, which voters honour
    /// even while they hear from a leader.
    Vote {
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
    },
    /// §5.3 AppendEntries.
    Append {
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry<T>>,
        commit: u64,
    },
    AppendResponse(AppendResponse),
    /// Liveness and commit index only; `commit` never exceeds what the follower is
    /// known to hold. `leader_commit` is the leader's own commit index, unclamped: a
    /// follower never commits by it, but a follower that is catching up (see
    /// [`RaftNode::catch_up`]) learns from it how far it must persist.
    Heartbeat {
        commit: u64,
        leader_commit: u64,
    },
    HeartbeatResponse,
    /// §7 / thesis ch. 5: one chunk of a snapshot, `data` at byte `offset`.
    InstallSnapshot {
        meta: SnapshotMeta,
        offset: u64,
        data: Vec<u8>,
        done: bool,
    },
    /// `next_offset`: the bytes the follower holds; `installed` once it took the whole.
    InstallSnapshotResponse {
        meta: SnapshotMeta,
        next_offset: u64,
        installed: bool,
    },
    /// Leadership transfer: campaign now, without pre-vote.
    TimeoutNow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendResponse {
    /// The follower's log matches the leader's through `match_index`, durably.
    Accepted { match_index: u64 },
    /// No entry at `prev_index` with the leader's `prev_term`. Fast backtracking hint
    /// (thesis §5.3 optimisation): `conflict_term` is the follower's term at
    /// `prev_index` (None when its log is shorter) and `first_index` the first index
    /// the follower holds with that term (or its last index + 1). `catching_up`: the
    /// follower may have lost entries it acknowledged (see [`RaftNode::catch_up`]), so
    /// a log end below the leader's `match_index` for it is news, not a stale answer.
    Rejected {
        prev_index: u64,
        conflict_term: Option<u64>,
        first_index: u64,
        catching_up: bool,
    },
}

/// One unit of work for the shell; see the module docs for the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready<T> {
    pub soft_state: Option<SoftState>,
    pub hard_state: Option<HardState>,
    pub snapshot_to_install: Option<(SnapshotMeta, Vec<u8>)>,
    pub entries_to_persist: Vec<Entry<T>>,
    /// Send now.
    pub messages: Vec<Message<T>>,
    /// Send after this Ready's (and every earlier Ready's) writes are durable.
    pub persisted_messages: Vec<Message<T>>,
    /// Apply in order; already durable locally.
    pub committed_entries: Vec<Entry<T>>,
    /// Peers that need a snapshot: answer with [`RaftNode::send_snapshot`].
    pub snapshot_requests: Vec<NodeId>,
}

impl<T> Ready<T> {
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && self.hard_state.is_none()
            && self.snapshot_to_install.is_none()
            && self.entries_to_persist.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.snapshot_requests.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposeError {
    /// Only the leader accepts proposals; `leader_hint` is the leader this node knows.
    NotLeader { leader_hint: Option<NodeId> },
    /// A leadership transfer to `to` is in progress (§3.10 thesis): retry at the new
    /// leader.
    TransferInProgress { to: NodeId },
    /// Too many entries wait for commit (`Config::max_uncommitted_entries`).
    Backpressure { uncommitted: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferError {
    NotLeader { leader_hint: Option<NodeId> },
    NotAVoter { to: NodeId },
    ToSelf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    NotLeader,
    /// The peer is not waiting for a snapshot (it caught up, or the request is stale).
    NotRequested {
        peer: NodeId,
    },
    /// The snapshot ends before the log's first retained entry: the peer could not
    /// continue from it.
    TooOld {
        snapshot_index: u64,
        compacted_index: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactError {
    /// Only applied entries may be compacted.
    NotApplied { index: u64, applied: u64 },
    /// `meta.term` is not the term of the entry at `meta.index`.
    TermMismatch {
        index: u64,
        term: u64,
        log_term: Option<u64>,
    },
}
