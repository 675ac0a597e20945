//! The operations a shard performs for requests, and their replies. They cross cores
//! as messages (hence everything here is `Send`), so they carry owned values only.

use std::sync::Arc;
use std::time::Duration;

use shards::validate::{FieldError, NewEvent, PatchRequest};

/// One request for the shard that owns a session's group.
#[derive(Debug)]
pub enum Op {
    Create {
        id: String,
        title: Option<String>,
        metadata: String,
    },
    Get {
        id: String,
    },
    Patch {
        id: String,
        patch: PatchRequest,
    },
    SetArchived {
        id: String,
        archived: bool,
    },
    Append {
        id: String,
        event: NewEvent,
    },
    /// Committed events with `seq > after`, at most `max_events` and about `max_bytes`.
    /// With `wait`, an empty result waits up to that long for the next commit.
    Read {
        id: String,
        after: u64,
        max_events: usize,
        max_bytes: usize,
        wait: Option<Duration>,
    },
    /// Sessions of this shard with id > `after`, in id order: at most `limit + 1`, a
    /// share of the page's examination budget and the page's bytes
    /// (`shards::listing`).
    List {
        after: Option<String>,
        limit: usize,
        archived: ArchivedFilter,
        filters: Vec<(String, String)>,
    },
    Stats,
    /// This replica's view of a group (`GET /debug/groups/:g`).
    DebugGroup {
        group: u16,
    },
    /// Asked of a leader node by a follower before a local read (a batched read
    /// index): the commit index of each listed group this node leads.
    ReadIndex {
        groups: Vec<u16>,
    },
    /// Asked of another replica of the session's group (any replica, leader or not) when
    /// this node's copy of some events is damaged: the log records of committed events
    /// `after+1 ..= through` as that replica stores them, read from its own log (never
    /// from a third node), at most about `max_bytes` of them.
    FetchEvents {
        id: String,
        after: u64,
        through: u64,
        max_bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchivedFilter {
    Active,
    Archived,
    All,
}

#[derive(Debug)]
pub enum Reply {
    /// A rendered session object.
    Session(String),
    Appended {
        seq: u64,
        last_seq: u64,
        deduped: bool,
        archived_seq: u64,
    },
    Events {
        events: Vec<(u64, Arc<str>)>,
        last_seq: u64,
    },
    /// `(id, rendered session)` in id order.
    /// One shard's part of a listing page.
    Sessions(shards::listing::Part),
    Stats(Box<crate::metrics::ShardStats>),
    /// Rendered JSON of a debug view.
    Debug(String),
    /// `(group, commit index)` for each group of a `ReadIndex` this node leads.
    ReadIndex(Vec<(u16, u64)>),
    /// The answer to `FetchEvents`: consecutive events from `after + 1` (possibly none).
    Records(Vec<shards::entry::LogRecord>),
    Error(ApiError),
}

/// Every way a request can fail, with the facts the client needs. The HTTP mapping
/// lives in one place: `api::error_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    Invalid(FieldError),
    SessionNotFound,
    SessionExists,
    VersionConflict {
        current_version: u64,
    },
    IdempotencyConflict {
        seq: u64,
    },
    ProducerSeqConflict {
        expected_producer_seq: u64,
    },
    ExpectedSeqConflict {
        expected_seq: u64,
        current_seq: u64,
    },
    /// Not applied and never will be (shutting down, no leader).
    Unavailable,
    /// A bounded queue is full; not applied.
    Overloaded,
    /// May or may not have been applied (timeout waiting for the commit).
    CommitUnknown,
    /// The node's disk budget (`--max-disk-bytes`) is exhausted; not applied.
    StorageFull,
    /// Events up to `first_available_seq - 1` were deleted by retention (no archive).
    EventsExpired {
        first_available_seq: u64,
    },
    /// The range is only in the archive, and Postgres cannot be read now.
    ArchiveUnavailable,
    /// Reading stored events failed.
    Internal(String),
    /// Stored events are damaged on this node and no other replica could serve them
    /// (a node alone, or its peers unreachable): what is damaged, where.
    LogDamaged(String),
    /// Between nodes only: the receiving node does not lead the group; `leader` is the
    /// node it believes does. Never reaches a client (mapped to `unavailable`).
    NotLeader {
        leader: Option<u64>,
    },
}
