//! Log entries: the commands of the session state machine as they are written to the
//! log (and, later, replicated by Raft). Every field a replica needs to reach the same
//! state is fixed here by the leader at proposal time (seq, timestamps, merged metadata),
//! so applying an entry is deterministic on every replica.
//!
//! JSON values (payload, metadata, refs) are stored as the exact compact text the API
//! serves, so reads from memory, disk and the archive return the same bytes.

use rkyv::{Archive, Deserialize, Serialize};

/// The term of an index-0 `Append` record that repairs a damaged event (see
/// [`MetaRecord`]). No Raft term reaches it.
pub const REPAIR_TERM: u64 = u64::MAX;

/// One record of a shard's write-ahead log: an entry of one Raft group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub group: u16,
    pub term: u64,
    pub index: u64,
    pub command: Command,
}

/// A 128-bit digest of an append's "content" (API.md: type, payload, actor, source,
/// metadata, refs, producer_id, producer_seq as JSON values).
pub type Digest = [u8; 16];

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Appended by a new leader to commit entries of earlier terms (Raft §5.4.2).
    Noop,
    CreateSession(CreateSession),
    PatchSession(PatchSession),
    SetArchived(SetArchived),
    Append(AppendEntry),
    ArchiveProgress(ArchiveProgress),
    /// Not a Raft entry and not part of any group's state machine: durable Raft state
    /// written to the shard's log beside the entries, in a record with index 0.
    Meta(MetaRecord),
}

/// Raft state a shard writes to its log besides entries (records with index 0). A
/// history event (an event carried by a received snapshot) is a `Command::Append` in a
/// record with index 0 and term 0; it counts only once the group's `Snapshot` record
/// follows it. A *repaired* event is a `Command::Append` in a record with index 0 and
/// term [`REPAIR_TERM`]: a copy, fetched from another replica, of a committed event whose
/// own record is damaged on this replica; from then on the event index points at it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum MetaRecord {
    /// The group's term, vote (0: none) and commit index; the latest one counts.
    HardState { term: u64, vote: u64, commit: u64 },
    /// A snapshot received from the leader: the group's state through `index`. Every
    /// entry of the group before this record is void.
    Snapshot {
        index: u64,
        term: u64,
        checksum: u64,
        /// `GroupState::encode_snapshot` bytes.
        state: Vec<u8>,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CreateSession {
    pub session_id: String,
    pub title: Option<String>,
    /// Compact JSON object text.
    pub metadata: String,
    pub at_us: i64,
}

/// The result of a PATCH as decided by the leader: the new title and merged metadata.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PatchSession {
    pub session_id: String,
    pub title: Option<String>,
    /// Compact JSON object text after the shallow merge.
    pub metadata: String,
    /// The version after this patch (previous + 1).
    pub version: u64,
    pub at_us: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SetArchived {
    pub session_id: String,
    pub archived: bool,
    /// The version after this change (previous + 1).
    pub version: u64,
    pub at_us: i64,
}

/// Postgres holds the events of these sessions up to these seqs: one entry per group
/// and report, however many sessions it covers.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ArchiveProgress {
    pub sessions: Vec<SessionProgress>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionProgress {
    pub session_id: String,
    pub archived_seq: u64,
}

/// One event appended to a session, with its seq and `inserted_at` fixed by the leader.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppendEntry {
    pub session_id: String,
    pub seq: u64,
    pub inserted_at_us: i64,
    pub event_type: String,
    /// Compact JSON text of any value except null.
    pub payload: String,
    pub actor: Option<String>,
    pub source: Option<String>,
    /// Compact JSON object text (`{}` when absent).
    pub metadata: String,
    /// Compact JSON object text (`{}` when absent).
    pub refs: String,
    pub idempotency_key: Option<String>,
    pub producer_id: Option<String>,
    pub producer_seq: Option<u64>,
    pub digest: Digest,
}

/// Roughly the bytes a command takes in the log: a fixed part plus its variable-size
/// fields.
pub fn command_bytes(command: &Command) -> usize {
    COMMAND_FIXED_BYTES
        + match command {
            Command::Append(e) => event_fields_bytes(e),
            Command::CreateSession(c) => c.session_id.len() + c.metadata.len(),
            Command::PatchSession(p) => p.session_id.len() + p.metadata.len(),
            Command::SetArchived(a) => a.session_id.len(),
            Command::ArchiveProgress(a) => a.sessions.iter().map(|p| p.session_id.len() + 16).sum(),
            Command::Noop => 0,
            Command::Meta(MetaRecord::Snapshot { state, .. }) => state.len(),
            Command::Meta(_) => 0,
        }
}

pub const COMMAND_FIXED_BYTES: usize = 64;

/// `command_bytes` of an event.
pub fn event_bytes(e: &AppendEntry) -> usize {
    COMMAND_FIXED_BYTES + event_fields_bytes(e)
}

fn event_fields_bytes(e: &AppendEntry) -> usize {
    e.session_id.len()
        + e.event_type.len()
        + e.payload.len()
        + e.metadata.len()
        + e.refs.len()
        + e.actor.as_ref().map_or(0, String::len)
        + e.source.as_ref().map_or(0, String::len)
        + e.idempotency_key.as_ref().map_or(0, String::len)
        + e.producer_id.as_ref().map_or(0, String::len)
}
