//! Whether a shard's log may take more writes: the outcome of every attempt at creating
//! a file, the disk budget, and the room left in the active segment. The shell
//! (`src/wal.rs`, `src/shard/`) reports outcomes and asks; nothing here does I/O.
//!
//! The rules (docs/architecture.md, "Storage full"):
//! - A file the log has to create (the next segment, a sealed segment's index file, a
//!   shard snapshot, the device probe written at start) could not be created: storage
//!   is full until a creation of that kind succeeds again. Meanwhile client writes
//!   (create, patch, archive flag, append, proposed on this node) are refused with 507;
//!   reads, tails and dedupe answers never look at this state. The decision is made
//!   after the dedupe rules (API.md): a retry of a committed append still gets its 201.
//! - Raft's own records (hard state, a leader's no-op, `ArchiveProgress`, snapshot
//!   metadata) are always admitted: they go into whatever room the active segment has.
//! - Client data (proposed here, or replicated from a leader) may use the active segment
//!   only down to a reserve while there is no next segment (neither pre-written nor
//!   being pre-written: its creation failed or the budget has no room), so that client
//!   data never starves Raft's records (elections, a new leader's no-op, archive
//!   progress that lets retention free space). A segment still being pre-written counts
//!   as there: in normal operation writes wait for it at the roll, as they always did.
//! - The log never creates a file that would take its files past the disk budget
//!   (`--max-disk-bytes`); that refusal is "storage full" with reason `budget`.

use crate::entry::Command;

/// Largest reserve of the active segment kept for Raft's records.
pub const RESERVE_BYTES_MAX: u64 = 4 << 20;

/// The files whose creation decides whether storage is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// The next log segment (pre-written with zeros), or the first one of an empty log.
    Segment,
    /// The index file of a sealed segment.
    Index,
    /// The shard snapshot (a temp file renamed into place).
    Snapshot,
    /// The one-block file that tells glommio how the device behaves (written at start).
    Probe,
}

impl FileKind {
    pub const ALL: [FileKind; 4] = [
        FileKind::Segment,
        FileKind::Index,
        FileKind::Snapshot,
        FileKind::Probe,
    ];

    fn slot(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Segment => "segment",
            FileKind::Index => "index",
            FileKind::Snapshot => "snapshot",
            FileKind::Probe => "probe",
        }
    }
}

/// Why storage is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FullReason {
    /// The file system said so (ENOSPC, EDQUOT).
    NoSpace,
    /// Another error while creating a file (EIO, EROFS, permissions…).
    IoError,
    /// The file would take the log past `--max-disk-bytes`.
    Budget,
}

impl FullReason {
    pub const ALL: [FullReason; 3] = [FullReason::NoSpace, FullReason::IoError, FullReason::Budget];

    /// The `reason` label of the `starcite_storage_full` gauge.
    pub fn as_str(self) -> &'static str {
        match self {
            FullReason::NoSpace => "no_space",
            FullReason::IoError => "io_error",
            FullReason::Budget => "budget",
        }
    }
}

/// Which kinds of file could not be created, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageHealth {
    failed: [Option<FullReason>; 4],
}

/// The node's storage state changed (one log line per change, not per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub before: Option<FullReason>,
    pub after: Option<FullReason>,
}

impl StorageHealth {
    /// Storage is full, and why: `NoSpace` before `IoError` before `Budget` when several
    /// kinds failed (the most urgent thing for an operator to fix first).
    pub fn full(&self) -> Option<FullReason> {
        self.failed.iter().flatten().min().copied()
    }

    /// Whether a creation of `kind` is failing.
    pub fn failing(&self, kind: FileKind) -> Option<FullReason> {
        self.failed[kind.slot()]
    }

    /// Records the outcome of creating a file of `kind`; returns the change of the
    /// overall state, if any.
    pub fn record(
        &mut self,
        kind: FileKind,
        outcome: Result<(), FullReason>,
    ) -> Option<Transition> {
        let before = self.full();
        self.failed[kind.slot()] = outcome.err();
        let after = self.full();
        (before != after).then_some(Transition { before, after })
    }
}

/// Who a log record is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteClass {
    /// A client write proposed on this node (create, patch, archive flag, append).
    Client,
    /// Client data a leader replicates to this follower.
    Replicated,
    /// Raft's own records: hard state, no-op, `ArchiveProgress`, snapshot metadata.
    Raft,
}

impl WriteClass {
    /// The class of `command` when this node proposes it.
    pub fn of_proposal(command: &Command) -> WriteClass {
        if is_client_data(command) {
            WriteClass::Client
        } else {
            WriteClass::Raft
        }
    }
}

/// Commands that carry what clients wrote (as opposed to Raft's and the archive's
/// bookkeeping).
pub fn is_client_data(command: &Command) -> bool {
    match command {
        Command::CreateSession(_)
        | Command::PatchSession(_)
        | Command::SetArchived(_)
        | Command::Append(_) => true,
        Command::ArchiveProgress(_) | Command::Noop | Command::Meta(_) => false,
    }
}

/// The room the log has for more records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// A next segment is pre-written or being pre-written: client data may fill the
    /// active one (the log rolls into the next one, waiting for its pre-write if need be).
    pub next_segment: bool,
    /// Bytes left in the active segment after what is already queued (0 without one).
    pub free_bytes: u64,
    /// Bytes of the active segment kept for Raft's records (see [`reserve_bytes`]).
    pub reserve_bytes: u64,
}

impl Room {
    /// `bytes` of client data fit without touching the reserve.
    pub fn fits(&self, bytes: u64) -> bool {
        self.next_segment || self.free_bytes >= bytes.saturating_add(self.reserve_bytes)
    }
}

/// What to do with a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Refused: 507 `storage_full`.
    Full(FullReason),
    /// Refused for now: there is no next segment and the active one has only its
    /// reserve left (503 `overloaded` for a client write while storage is not full yet;
    /// a leader's entries are not taken).
    Wait,
}

/// Whether a write of `bytes` (approximate log bytes) of `class` goes into the log now.
pub fn admit(class: WriteClass, full: Option<FullReason>, room: Room, bytes: u64) -> Admission {
    match class {
        WriteClass::Raft => Admission::Admit,
        WriteClass::Client if full.is_some() => Admission::Full(full.expect("checked")),
        WriteClass::Client | WriteClass::Replicated if room.fits(bytes) => Admission::Admit,
        WriteClass::Client | WriteClass::Replicated => Admission::Wait,
    }
}

/// How many of a leader's entries (in order: whether each is client data, and its
/// bytes) a follower takes now: Raft's records always, client data while it fits above
/// the reserve; the first one that does not fit ends the prefix (Raft accepts any
/// prefix of an AppendEntries; the leader sends the rest again).
pub fn admitted_prefix(entries: impl IntoIterator<Item = (bool, u64)>, room: Room) -> usize {
    let mut room = room;
    let mut taken = 0;
    for (client_data, bytes) in entries {
        let class = if client_data {
            WriteClass::Replicated
        } else {
            WriteClass::Raft
        };
        if admit(class, None, room, bytes) != Admission::Admit {
            break;
        }
        room.free_bytes = room.free_bytes.saturating_sub(bytes);
        taken += 1;
    }
    taken
}

/// The reserve of a segment of `segment_bytes`: a quarter, at most
/// [`RESERVE_BYTES_MAX`]. Every batch takes at least one 4 KiB block, so with 1 MiB
/// segments this is 64 batches of Raft records; with the default 64 MiB, 1024.
pub fn reserve_bytes(segment_bytes: u64) -> u64 {
    (segment_bytes / 4).min(RESERVE_BYTES_MAX)
}

/// The largest index file a sealed segment of `segment_bytes` can need: one 4-byte
/// offset per record, and no record's frame is smaller than a no-op's. The log keeps
/// this much of the budget free for the active segment's index file when it creates the
/// next segment, so that sealing never finds the budget used up.
pub fn index_bytes_max(segment_bytes: u64) -> u64 {
    let noop = crate::entry::LogRecord {
        group: 0,
        term: 0,
        index: 0,
        command: Command::Noop,
    };
    let mut frame = Vec::new();
    crate::codec::encode_record(&noop, &mut frame);
    let records = segment_bytes / frame.len() as u64;
    let bytes = crate::snapshot::SIDECAR_HEADER_BYTES as u64 + 4 * records;
    bytes.next_multiple_of(crate::codec::BLOCK_BYTES as u64)
}

/// Whether a file of `new_bytes` (replacing one of `replaced_bytes`, 0 for a new name)
/// keeps the log's files (`files_bytes` now) within `budget`.
pub fn within_budget(
    budget: Option<u64>,
    files_bytes: u64,
    new_bytes: u64,
    replaced_bytes: u64,
) -> bool {
    budget.is_none_or(|max| {
        files_bytes
            .saturating_sub(replaced_bytes)
            .saturating_add(new_bytes)
            <= max
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{ArchiveProgress, MetaRecord};

    const ROOMY: Room = Room {
        next_segment: true,
        free_bytes: 0,
        reserve_bytes: 1000,
    };

    fn room(free_bytes: u64) -> Room {
        Room {
            next_segment: false,
            free_bytes,
            reserve_bytes: 1000,
        }
    }

    #[test]
    fn storage_full_refuses_only_client_writes() {
        let full = Some(FullReason::NoSpace);
        assert_eq!(
            admit(WriteClass::Client, full, ROOMY, 10),
            Admission::Full(FullReason::NoSpace)
        );
        assert_eq!(admit(WriteClass::Raft, full, room(0), 10), Admission::Admit);
        // A follower keeps taking its leader's entries while they fit above the reserve.
        assert_eq!(
            admit(WriteClass::Replicated, full, room(5000), 10),
            Admission::Admit
        );
        assert_eq!(admit(WriteClass::Client, None, ROOMY, 10), Admission::Admit);
    }

    #[test]
    fn client_data_never_takes_the_reserve_without_a_next_segment() {
        assert_eq!(
            admit(WriteClass::Client, None, room(1500), 500),
            Admission::Admit
        );
        assert_eq!(
            admit(WriteClass::Client, None, room(1499), 500),
            Admission::Wait
        );
        assert_eq!(
            admit(WriteClass::Replicated, None, room(1499), 500),
            Admission::Wait
        );
        // Raft's records may use the reserve, down to nothing.
        assert_eq!(
            admit(WriteClass::Raft, None, room(10), 500),
            Admission::Admit
        );
    }

    #[test]
    fn a_follower_takes_the_prefix_of_entries_that_fits() {
        // Client data 600 + 300 fit in 2000 - 1000; the next 200 does not; a no-op
        // after it is not taken either (a prefix only).
        let entries = [
            (true, 600),
            (false, 50),
            (true, 300),
            (true, 200),
            (false, 10),
        ];
        assert_eq!(admitted_prefix(entries, room(2000)), 3);
        assert_eq!(admitted_prefix(entries, ROOMY), 5);
        // Raft's records alone always go in.
        assert_eq!(admitted_prefix([(false, 50), (false, 50)], room(0)), 2);
        assert_eq!(admitted_prefix([(true, 1)], room(0)), 0);
    }

    #[test]
    fn health_reports_each_change_once_and_the_most_urgent_reason() {
        let mut h = StorageHealth::default();
        assert_eq!(h.full(), None);
        let t = h.record(FileKind::Segment, Err(FullReason::Budget));
        assert_eq!(
            t,
            Some(Transition {
                before: None,
                after: Some(FullReason::Budget)
            })
        );
        // The same failure again changes nothing.
        assert_eq!(h.record(FileKind::Segment, Err(FullReason::Budget)), None);
        // An index file failing with ENOSPC is the more urgent reason.
        assert!(h
            .record(FileKind::Index, Err(FullReason::NoSpace))
            .is_some());
        assert_eq!(h.full(), Some(FullReason::NoSpace));
        assert_eq!(h.failing(FileKind::Index), Some(FullReason::NoSpace));
        // Writable again only once every kind succeeded.
        assert!(h.record(FileKind::Index, Ok(())).is_some());
        assert_eq!(h.full(), Some(FullReason::Budget));
        let t = h.record(FileKind::Segment, Ok(())).expect("a change");
        assert_eq!(t.after, None);
        assert_eq!(h.record(FileKind::Probe, Ok(())), None);
    }

    #[test]
    fn the_budget_counts_the_new_file_and_what_it_replaces() {
        assert!(within_budget(None, u64::MAX, 1, 0));
        assert!(within_budget(Some(4096), 0, 4096, 0));
        assert!(!within_budget(Some(4096), 1, 4096, 0));
        // Rewriting an index file of 4 KiB with one of 8 KiB needs 4 KiB more.
        assert!(within_budget(Some(12288), 8192, 8192, 4096));
        assert!(!within_budget(Some(12287), 8192, 8192, 4096));
    }

    #[test]
    fn the_index_allowance_covers_a_segment_full_of_the_smallest_records() {
        let mut frame = Vec::new();
        let noop = crate::entry::LogRecord {
            group: 7,
            term: 9,
            index: 11,
            command: Command::Noop,
        };
        crate::codec::encode_record(&noop, &mut frame);
        let records = (1u64 << 20) / frame.len() as u64;
        let max = index_bytes_max(1 << 20);
        assert!(max >= crate::snapshot::SIDECAR_HEADER_BYTES as u64 + 4 * records);
        assert_eq!(max % 4096, 0);
        // An eighth of the segment at most: the frame is at least 32 bytes.
        assert!(max <= (1 << 20) / 8 + 4096, "{max}");
    }

    #[test]
    fn raft_records_and_archive_progress_are_not_client_data() {
        assert!(!is_client_data(&Command::Noop));
        assert!(!is_client_data(&Command::ArchiveProgress(
            ArchiveProgress {
                sessions: Vec::new()
            }
        )));
        assert!(!is_client_data(&Command::Meta(MetaRecord::HardState {
            term: 1,
            vote: 0,
            commit: 0
        })));
        assert_eq!(reserve_bytes(1 << 20), 256 << 10);
        assert_eq!(reserve_bytes(64 << 20), RESERVE_BYTES_MAX);
    }
}
