//! One replica of one Raft group: everything that decides what it persists,
//! acknowledges, applies and answers, with no I/O. The server's shard
//! (`src/shard/`) and the deterministic simulation (`shards/tests/sim/`) drive this very
//! type; they differ only in how they move bytes, keep time and store records.
//!
//! The unit is the group, not the shard: the driver batches the writes of every group of
//! its shard into one durable write (one log, one fsync per batch) and reports each
//! group's part durable afterwards ([`Replica::durable`], [`Replica::entry_durable`]).
//!
//! Inputs: client proposals ([`Replica::propose`]) and waits ([`Replica::wait`]), ticks
//! ([`Replica::tick`]), Raft messages (`replica.raft.step`), durability reports, and the
//! recovered state it starts from ([`Replica::new`]). Outputs go to a [`Shell`]: messages
//! to send now, writes (records, and what follows once they are durable), committed
//! entries to index and publish, replies to release; [`Replica::step`] returns the peers
//! that want a snapshot.
//!
//! Rules kept here:
//! - A reply is released only once its entry is committed, which for this replica's
//!   own entries means durable here too (Raft counts the leader only after
//!   `on_persisted`); messages of a Ready that promise durability leave only after the
//!   write ([`Durable::messages`]).
//! - Committed entries apply in index order, each exactly once, and each must have
//!   been made durable by this replica at the same term (its place in the log):
//!   otherwise the replica stops ([`Stop::Broken`]).
//! - A snapshot from the leader that does not decode is never acknowledged: the
//!   replica stops ([`Stop::BadSnapshot`]).
//! - A new leader decides against its committed state plus its log's uncommitted
//!   suffix (entries of earlier terms it will commit), never against a stale overlay.

use std::collections::BTreeMap;

use crate::entry::{command_bytes, Command, LogRecord, MetaRecord};
use crate::raft::{
    Entry, HardState, Message, NodeId, Payload, ProposeError, RaftNode, Ready, Role, SnapshotMeta,
};
use crate::session::{GroupState, Limits};
use crate::snapshot::{fold_checksum, GroupTransfer, SnapshotEntry};

/// Bytes of applied entries each group keeps in memory, at most (on top of the
/// `keep` count of [`Replica::compact`]): a follower further behind gets a snapshot.
const RAFT_LOG_BYTES_PER_GROUP: u64 = 2 << 20;
/// Bytes of applied entries a group keeps, at most, for a follower that is being sent a
/// snapshot (the entries after the snapshot, which it needs next): past this the
/// leader compacts anyway and the follower gets a newer snapshot.
const RAFT_LOG_BYTES_FOR_SNAPSHOT_MAX: u64 = 16 << 20;

/// Where a record lives: segment epoch and byte offset inside that segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    pub epoch: u32,
    pub offset: u32,
}

/// Where a persisted, not yet applied entry lives in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persisted {
    pub term: u64,
    pub loc: RecordLocation,
    /// The crc32 of the record's encoded bytes (folded into the group's checksum).
    pub crc: u32,
    /// Set when its segment was sealed before the entry committed: its place in the
    /// segment's index file.
    pub sealed: Option<u32>,
}

/// Deliberate bugs the simulation must catch (it plants each and shows that its checks
/// fail within 1,000 seeds). All off by default; never set them elsewhere.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlantedBugs {
    /// Report a write durable (to Raft, and send its messages) when it is handed to the
    /// shell, before the disk has it: replies and votes run ahead of durability.
    pub ack_before_persist: bool,
    /// Acknowledge a leader's snapshot whose state does not decode, keeping the old
    /// state (instead of stopping).
    pub ack_bad_snapshot: bool,
    /// A new leader rebuilds its session state without the dedupe windows.
    pub forgotten_dedupe: bool,
}

/// Why a replica must stop (fail-stop: the shell ends the process with this context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// An invariant of this replica is broken (a bug, or storage that lies).
    Broken(String),
    /// The leader's snapshot does not decode; it was not acknowledged.
    BadSnapshot(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Broken(e) => write!(f, "broken invariant: {e}"),
            Stop::BadSnapshot(e) => write!(f, "snapshot from the leader refused: {e}"),
        }
    }
}

/// Why a proposal was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotLeader {
        leader: Option<NodeId>,
    },
    /// A leadership transfer is under way: retry at the new leader.
    Transferring,
    /// Too many entries wait for commit.
    Backpressure,
}

/// Records of one Ready to write in the log, and what follows once they are durable.
pub struct Write {
    pub records: Vec<LogRecord>,
    pub durable: Durable,
}

/// Hand back to [`Replica::durable`] once the write's records are durable (after every
/// earlier write of the group).
#[derive(Default)]
pub struct Durable {
    /// The installed snapshot (its records are the write's history events and its
    /// `Snapshot` record).
    pub snapshot: Option<SnapshotMeta>,
    /// The last entry written.
    pub last_entry: Option<(u64, u64)>,
    /// Sent once durable (votes, acknowledgements).
    pub messages: Vec<Message<Command>>,
}

/// What a replica asks of whoever drives it.
pub trait Shell<W> {
    /// Send now.
    fn send(&mut self, msg: Message<Command>);
    /// Write durably, after every earlier write; then call [`Replica::entry_durable`]
    /// for each entry record and [`Replica::durable`] with `write.durable`.
    fn write(&mut self, write: Write);
    /// A committed entry, in index order, with its place in this replica's log: index
    /// its event, wake its readers. Called before the replies it releases.
    fn applied(&mut self, entry: &Entry<Command>, place: &Persisted);
    /// A waiter's outcome: `true` when its entry committed, `false` when the outcome is
    /// unknown (replaced, leadership lost).
    fn release(&mut self, waiter: W, committed: bool);
    /// Leadership won (`true`) or lost.
    fn leadership(&mut self, _leading: bool) {}
    /// The leader's snapshot replaced this replica's state.
    fn installed(&mut self, _meta: SnapshotMeta, _events: usize) {}
}

/// How a replica starts: what recovery found on disk (or nothing).
pub struct Recovered {
    pub state: GroupState,
    /// The last index the state holds, and its term.
    pub applied: u64,
    pub applied_term: u64,
    pub checksum: u64,
    /// Where the log's entries after `applied` are on disk.
    pub persisted: BTreeMap<u64, Persisted>,
}

impl Recovered {
    /// A replica with nothing on disk.
    pub fn fresh(limits: Limits) -> Recovered {
        Recovered {
            state: GroupState::new(limits),
            applied: 0,
            applied_term: 0,
            checksum: 0,
            persisted: BTreeMap::new(),
        }
    }
}

/// This node's replica of one Raft group. `W` is what a waiting request is answered
/// through (a channel in the server, a client id in the simulation).
pub struct Replica<W> {
    pub group: u16,
    pub raft: RaftNode<Command>,
    /// Committed state; while leading, plus the in-flight overlay.
    pub state: GroupState,
    /// The last entry applied to `state` (committed view), and its term.
    pub applied: u64,
    pub applied_term: u64,
    /// Rolling checksum of committed entries (`snapshot::fold_checksum`).
    pub checksum: u64,
    /// Entries on disk and not applied yet (their crc and location are needed then).
    pub persisted: BTreeMap<u64, Persisted>,
    /// This replica leads the group and `state` holds the in-flight overlay.
    pub leading: bool,
    /// A snapshot for a follower is being built (compaction waits for it).
    pub building_snapshot: bool,
    /// Bytes (`command_bytes`) of applied entries Raft still holds in memory.
    pub retained_bytes: u64,
    waiters: BTreeMap<u64, Vec<(u64, W)>>,
    limits: Limits,
    ticks: u64,
    /// The tick at which this replica last knew a leader.
    leader_seen: Option<u64>,
    bugs: PlantedBugs,
}

impl<W> Replica<W> {
    /// `raft` was restored from the same recovery (`Recovered::snapshot_meta` and the
    /// entries whose places `recovered.persisted` holds).
    pub fn new(group: u16, raft: RaftNode<Command>, recovered: Recovered, limits: Limits) -> Self {
        Replica {
            group,
            raft: raft.with_entry_bytes(command_bytes),
            state: recovered.state,
            applied: recovered.applied,
            applied_term: recovered.applied_term,
            checksum: recovered.checksum,
            persisted: recovered.persisted,
            leading: false,
            building_snapshot: false,
            retained_bytes: 0,
            waiters: BTreeMap::new(),
            limits,
            ticks: 0,
            leader_seen: None,
            bugs: PlantedBugs::default(),
        }
    }

    #[doc(hidden)]
    pub fn plant_bugs(&mut self, bugs: PlantedBugs) {
        self.bugs = bugs;
    }

    /// One tick of the Raft clock.
    pub fn tick(&mut self) {
        self.raft.tick();
        self.ticks += 1;
        if self.raft.leader().is_some() {
            self.leader_seen = Some(self.ticks);
        }
    }

    /// Ticks since this replica last knew a leader (0 while it knows one; `u64::MAX`
    /// when it never has).
    pub fn ticks_without_leader(&self) -> u64 {
        match self.leader_seen {
            None => u64::MAX,
            Some(_) if self.raft.leader().is_some() => 0,
            Some(seen) => self.ticks - seen,
        }
    }

    /// Proposes `command` (decided against the leader's state) and applies it to that
    /// state; returns its (index, term). The driver then calls [`Replica::step`].
    pub fn propose(&mut self, command: Command) -> Result<(u64, u64), Refused> {
        if !self.leading {
            return Err(Refused::NotLeader {
                leader: self.raft.leader(),
            });
        }
        match self.raft.propose(command) {
            Ok(index) => {
                // The entry Raft now holds is the command: apply that one (no copy).
                if let Some(Entry {
                    payload: Payload::Data(command),
                    ..
                }) = self.raft.entry(index)
                {
                    self.state.apply(command);
                }
                Ok((index, self.raft.term()))
            }
            Err(ProposeError::NotLeader { leader_hint }) => Err(Refused::NotLeader {
                leader: leader_hint,
            }),
            Err(ProposeError::TransferInProgress { .. }) => Err(Refused::Transferring),
            Err(ProposeError::Backpressure { .. }) => Err(Refused::Backpressure),
        }
    }

    /// The outcome of entry (`index`, `term`) if it is known now: applied and still that
    /// entry (`true`), or replaced (`false`). `None`: wait for it.
    pub fn outcome(&self, index: u64, term: u64) -> Option<bool> {
        (self.applied >= index).then(|| self.raft.entry_term(index) == Some(term))
    }

    /// Waits for entry (`index`, `term`) to commit (call when [`Replica::outcome`] is
    /// `None`): `waiter` is released through [`Shell::release`].
    pub fn wait(&mut self, index: u64, term: u64, waiter: W) {
        self.waiters.entry(index).or_default().push((term, waiter));
    }

    /// The entry a reply decided against in-flight entries waits for (the log's last):
    /// a client never sees a result that a failure could take back.
    pub fn settle_point(&self) -> (u64, u64) {
        let last = self.raft.last_index();
        (last, self.raft.entry_term(last).unwrap_or(0))
    }

    /// Every waiting request learns that its outcome is unknown.
    pub fn fail_waiters(&mut self, shell: &mut impl Shell<W>) {
        for (_, waiters) in std::mem::take(&mut self.waiters) {
            for (_, w) in waiters {
                shell.release(w, false);
            }
        }
    }

    /// Performs every Ready Raft has. Returns the peers this replica should now build a
    /// snapshot for (at most one at a time: `building_snapshot` is set; the driver
    /// clears it and calls `raft.send_snapshot` or `raft.snapshot_failed`).
    pub fn step(&mut self, shell: &mut impl Shell<W>) -> Result<Vec<NodeId>, Stop> {
        let mut snapshot_for = Vec::new();
        while self.raft.has_ready() {
            let ready = self.raft.ready();
            self.perform(ready, shell, &mut snapshot_for)?;
        }
        Ok(snapshot_for)
    }

    fn perform(
        &mut self,
        ready: Ready<Command>,
        shell: &mut impl Shell<W>,
        snapshot_for: &mut Vec<NodeId>,
    ) -> Result<(), Stop> {
        let group = self.group;
        let mut became_leader = false;
        if let Some(soft) = ready.soft_state {
            if soft.role == Role::Leader && !self.leading {
                became_leader = true;
                shell.leadership(true);
            } else if soft.role != Role::Leader && self.leading {
                self.leading = false;
                self.state.discard_uncommitted();
                self.fail_waiters(shell);
                shell.leadership(false);
            }
        }
        for peer in ready.snapshot_requests {
            if !self.building_snapshot {
                self.building_snapshot = true;
                snapshot_for.push(peer);
            }
        }
        for msg in ready.messages {
            shell.send(msg);
        }
        let mut write = Write {
            records: Vec::new(),
            durable: Durable {
                snapshot: None,
                last_entry: None,
                messages: ready.persisted_messages,
            },
        };
        if let Some((meta, data)) = ready.snapshot_to_install {
            self.install_snapshot(meta, &data, &mut write, shell)?;
        }
        for e in ready.entries_to_persist {
            write.durable.last_entry = Some((e.index, e.term));
            write.records.push(LogRecord {
                group,
                term: e.term,
                index: e.index,
                command: match e.payload {
                    Payload::Noop => Command::Noop,
                    Payload::Data(command) => command,
                },
            });
        }
        if let Some(h) = ready.hard_state {
            write.records.push(hard_state_record(group, h));
        }
        if self.bugs.ack_before_persist {
            // The planted bug: durable "at once", while the disk has not got it.
            let durable = std::mem::take(&mut write.durable);
            self.durable(durable, shell);
        }
        let d = &write.durable;
        if !write.records.is_empty() || !d.messages.is_empty() || d.snapshot.is_some() {
            shell.write(write);
        }
        for e in ready.committed_entries {
            self.apply_committed(e, shell)?;
        }
        if became_leader {
            self.become_leader();
        }
        Ok(())
    }

    /// Decide from now on against the committed state plus the log's uncommitted suffix
    /// (entries of earlier terms this leader will commit).
    fn become_leader(&mut self) {
        self.leading = true;
        if self.bugs.forgotten_dedupe {
            // The planted bug: the session state is rebuilt without its dedupe windows.
            let none = Limits {
                dedupe_keys_max: 0,
                producers_max: 0,
            };
            let stripped = GroupState::decode_snapshot(&self.state.encode_snapshot(), none)
                .expect("own snapshot decodes");
            self.state = GroupState::decode_snapshot(&stripped.encode_snapshot(), self.limits)
                .expect("own snapshot decodes");
        }
        self.state.discard_uncommitted();
        for index in self.applied + 1..=self.raft.last_index() {
            if let Some(Entry {
                payload: Payload::Data(command),
                ..
            }) = self.raft.entry(index)
            {
                self.state.apply(command);
            }
        }
    }

    /// A follower takes the leader's snapshot: its state at once, and the records that
    /// make it durable (the group's history events, then the snapshot record).
    fn install_snapshot(
        &mut self,
        meta: SnapshotMeta,
        data: &[u8],
        write: &mut Write,
        shell: &mut impl Shell<W>,
    ) -> Result<(), Stop> {
        let decoded = GroupTransfer::decode(data).and_then(|transfer| {
            GroupState::decode_snapshot(&transfer.state, self.limits).map(|state| (transfer, state))
        });
        let (transfer, state) = match decoded {
            Ok(decoded) => decoded,
            Err(e) if self.bugs.ack_bad_snapshot => {
                // The planted bug: acknowledged as installed, with the old state kept.
                let _ = e;
                write.durable.snapshot = Some(meta);
                return Ok(());
            }
            Err(e) => {
                return Err(Stop::BadSnapshot(format!(
                    "group {}: snapshot at index {} term {}: {e}",
                    self.group, meta.index, meta.term
                )))
            }
        };
        shell.installed(meta, transfer.events.len());
        self.state = state;
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.checksum = transfer.checksum;
        self.persisted.clear();
        self.leading = false;
        self.fail_waiters(shell);
        let group = self.group;
        for e in transfer.events {
            write.records.push(LogRecord {
                group,
                term: 0,
                index: 0,
                command: Command::Append(e),
            });
        }
        write.records.push(LogRecord {
            group,
            term: meta.term,
            index: 0,
            command: Command::Meta(MetaRecord::Snapshot {
                index: meta.index,
                term: meta.term,
                checksum: transfer.checksum,
                state: transfer.state,
            }),
        });
        write.durable.snapshot = Some(meta);
        Ok(())
    }

    /// A committed entry joins the committed state, the shell indexes it, and the
    /// requests waiting up to it learn their outcome.
    fn apply_committed(
        &mut self,
        e: Entry<Command>,
        shell: &mut impl Shell<W>,
    ) -> Result<(), Stop> {
        if e.index <= self.applied {
            return Ok(()); // a snapshot already covers it
        }
        if e.index != self.applied + 1 {
            return Err(Stop::Broken(format!(
                "group {}: committed entry {} follows applied entry {}",
                self.group, e.index, self.applied
            )));
        }
        let later = self.persisted.split_off(&(e.index + 1));
        let place = std::mem::replace(&mut self.persisted, later).remove(&e.index);
        let place = match place {
            Some(p) if p.term == e.term => p,
            other => {
                return Err(Stop::Broken(format!(
                    "group {}: committed entry {} of term {} has no log location \
                     (persisted here: {other:?})",
                    self.group, e.index, e.term
                )))
            }
        };
        self.checksum = fold_checksum(self.checksum, place.crc);
        if let Payload::Data(command) = &e.payload {
            self.state.commit(command);
            self.retained_bytes += command_bytes(command) as u64;
        }
        shell.applied(&e, &place);
        self.applied = e.index;
        self.applied_term = e.term;
        let later = self.waiters.split_off(&(e.index + 1));
        let released = std::mem::replace(&mut self.waiters, later);
        for (index, waiters) in released {
            for (term, w) in waiters {
                shell.release(w, index == e.index && term == e.term);
            }
        }
        Ok(())
    }

    /// The entries on disk and not applied yet, with their places, as a shard snapshot
    /// carries them (replay starts from them: `Replay::from_snapshot`). An entry Raft
    /// no longer holds in that term was replaced and is left out.
    pub fn unapplied_entries(&self) -> Vec<SnapshotEntry> {
        self.persisted
            .iter()
            .filter_map(|(&index, p)| {
                let entry = self.raft.entry(index).filter(|e| e.term == p.term)?;
                Some(SnapshotEntry {
                    index,
                    term: p.term,
                    command: match &entry.payload {
                        Payload::Noop => Command::Noop,
                        Payload::Data(c) => c.clone(),
                    },
                    epoch: p.loc.epoch,
                    offset: p.loc.offset,
                    crc: p.crc,
                    sealed: p.sealed.unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    /// An entry record of this group is durable at `loc`: its place is remembered until
    /// it commits. A later write of the same index replaces it and every later one
    /// (§5.3: the log was truncated).
    pub fn entry_durable(&mut self, index: u64, term: u64, loc: RecordLocation, crc: u32) {
        if index <= self.applied {
            return;
        }
        self.persisted.split_off(&index);
        self.persisted.insert(
            index,
            Persisted {
                term,
                loc,
                crc,
                sealed: None,
            },
        );
    }

    /// A write handed to [`Shell::write`] is durable (with every earlier one).
    pub fn durable(&mut self, durable: Durable, shell: &mut impl Shell<W>) {
        if let Some(meta) = durable.snapshot {
            self.raft.on_persisted(meta.index, meta.term);
        }
        if let Some((index, term)) = durable.last_entry {
            self.raft.on_persisted(index, term);
        }
        for msg in durable.messages {
            shell.send(msg);
        }
    }

    /// Drops applied Raft entries from memory beyond the `keep` most recent or
    /// `RAFT_LOG_BYTES_PER_GROUP` bytes (they stay in the log files; a follower that
    /// needs them gets a snapshot). A little hysteresis on the count, so compaction is
    /// not a per-entry cost.
    pub fn compact(&mut self, keep: u64) {
        let first = self.raft.snapshot_index();
        let over_count = self.applied > first + keep + keep / 8;
        let over_bytes = self.retained_bytes > RAFT_LOG_BYTES_PER_GROUP;
        if self.building_snapshot || !(over_count || over_bytes) {
            return;
        }
        // A follower being sent a snapshot needs the entries after it once installed.
        let limit = match self.raft.snapshot_in_flight_index() {
            Some(sending) if self.retained_bytes <= RAFT_LOG_BYTES_FOR_SNAPSHOT_MAX => {
                sending.min(self.applied)
            }
            _ => self.applied,
        };
        let mut index = first;
        let mut bytes = self.retained_bytes;
        while index < limit && (self.applied - index > keep || bytes > RAFT_LOG_BYTES_PER_GROUP / 2)
        {
            index += 1;
            if let Some(Entry {
                payload: Payload::Data(command),
                ..
            }) = self.raft.entry(index)
            {
                bytes = bytes.saturating_sub(command_bytes(command) as u64);
            }
        }
        if let Some(term) = self.raft.entry_term(index) {
            if self.raft.compact(SnapshotMeta { index, term }).is_ok() {
                self.retained_bytes = bytes;
            }
        }
    }
}

/// The log record of a group's term, vote and commit index.
pub fn hard_state_record(group: u16, h: HardState) -> LogRecord {
    LogRecord {
        group,
        term: h.term,
        index: 0,
        command: Command::Meta(MetaRecord::HardState {
            term: h.term,
            vote: h.vote.unwrap_or(0),
            commit: h.commit,
        }),
    }
}
