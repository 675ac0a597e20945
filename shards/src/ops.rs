//! The operations a shard performs for requests, their replies, and the one error type
//! every request can fail with.
//!
//! These are the server's request messages: they cross cores inside a node (so they
//! carry owned values only and are `Send`) and travel between nodes when a request is
//! forwarded to its group's leader (see [`crate::forward`], which turns them into bytes
//! and back: the rkyv derives here are that codec's wire form). [`ApiError`] is the only
//! error a client is ever told about: the session rules' per-operation errors
//! ([`CreateError`], [`PatchError`], [`AppendError`], [`NotFound`]) convert into it
//! without losing a fact, and the HTTP layer maps each of its variants to one status in
//! one place (`starcite::api::error_response`).
//!
//! [`Reply`] is generic over the payload of [`Reply::Stats`]: per-node counters the
//! shell defines (`starcite::metrics::ShardStats`) and never forwards, so this crate does
//! not need to know their type. The shell names `Reply<Box<ShardStats>>`; the codec
//! refuses a `Stats` reply both ways.

use std::sync::Arc;
use std::time::Duration;

use rkyv::{Archive, Deserialize, Serialize};

use crate::entry::LogRecord;
use crate::forward::{NotForwarded, UsizeAsU64};
use crate::listing::Part;
use crate::session::{AppendError, CreateError, NotFound, PatchError};
use crate::validate::{FieldError, NewEvent, PatchRequest};

/// One request for the shard that owns a session's group.
#[derive(Debug, Archive, Serialize, Deserialize)]
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
        #[rkyv(with = UsizeAsU64)]
        max_events: usize,
        #[rkyv(with = UsizeAsU64)]
        max_bytes: usize,
        wait: Option<Duration>,
    },
    /// Sessions of this shard with id > `after`, in id order: at most `limit + 1`, a
    /// share of the page's examination budget and the page's bytes
    /// (`crate::listing`).
    List {
        after: Option<String>,
        #[rkyv(with = UsizeAsU64)]
        limit: usize,
        archived: ArchivedFilter,
        filters: Vec<(String, String)>,
    },
    /// Per node, never forwarded (the codec refuses it).
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
        #[rkyv(with = UsizeAsU64)]
        max_bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ArchivedFilter {
    Active,
    Archived,
    All,
}

/// The answer to an [`Op`]. `S` is the shell's per-node statistics (see the module doc).
#[derive(Debug, Archive, Serialize, Deserialize)]
pub enum Reply<S> {
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
    /// One shard's part of a listing page.
    Sessions(Part),
    /// Per node, never forwarded (the codec refuses it).
    Stats(#[rkyv(with = NotForwarded)] S),
    /// Rendered JSON of a debug view.
    Debug(String),
    /// `(group, commit index)` for each group of a `ReadIndex` this node leads.
    ReadIndex(Vec<(u16, u64)>),
    /// The answer to `FetchEvents`: consecutive events from `after + 1` (possibly none).
    Records(Vec<LogRecord>),
    Error(ApiError),
}

/// Every way a request can fail, with the facts the client needs. The HTTP mapping
/// lives in one place: `starcite::api::error_response`.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
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

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> ApiError {
        match e {
            CreateError::SessionExists => ApiError::SessionExists,
        }
    }
}

impl From<PatchError> for ApiError {
    fn from(e: PatchError) -> ApiError {
        match e {
            PatchError::NotFound => ApiError::SessionNotFound,
            PatchError::VersionConflict { current } => ApiError::VersionConflict {
                current_version: current,
            },
            PatchError::Invalid(field) => ApiError::Invalid(field),
        }
    }
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> ApiError {
        match e {
            AppendError::SessionNotFound => ApiError::SessionNotFound,
            AppendError::IdempotencyConflict { seq } => ApiError::IdempotencyConflict { seq },
            AppendError::ProducerSeqConflict {
                expected_producer_seq,
            } => ApiError::ProducerSeqConflict {
                expected_producer_seq,
            },
            AppendError::ExpectedSeqConflict {
                expected_seq,
                current_seq,
            } => ApiError::ExpectedSeqConflict {
                expected_seq,
                current_seq,
            },
        }
    }
}

impl From<NotFound> for ApiError {
    fn from(_: NotFound) -> ApiError {
        ApiError::SessionNotFound
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> ApiError {
        ApiError::Invalid(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each session rule's error keeps its facts in the API error it becomes.
    #[test]
    fn session_rule_errors_convert_without_losing_a_fact() {
        assert_eq!(
            ApiError::from(CreateError::SessionExists),
            ApiError::SessionExists
        );
        assert_eq!(
            ApiError::from(PatchError::NotFound),
            ApiError::SessionNotFound
        );
        assert_eq!(
            ApiError::from(PatchError::VersionConflict { current: 7 }),
            ApiError::VersionConflict { current_version: 7 }
        );
        let field = FieldError::new(crate::validate::INVALID_SESSION, Some("metadata"), "big");
        assert_eq!(
            ApiError::from(PatchError::Invalid(field.clone())),
            ApiError::Invalid(field)
        );
        assert_eq!(ApiError::from(NotFound), ApiError::SessionNotFound);
        assert_eq!(
            ApiError::from(AppendError::SessionNotFound),
            ApiError::SessionNotFound
        );
        assert_eq!(
            ApiError::from(AppendError::IdempotencyConflict { seq: 3 }),
            ApiError::IdempotencyConflict { seq: 3 }
        );
        assert_eq!(
            ApiError::from(AppendError::ProducerSeqConflict {
                expected_producer_seq: 9
            }),
            ApiError::ProducerSeqConflict {
                expected_producer_seq: 9
            }
        );
        assert_eq!(
            ApiError::from(AppendError::ExpectedSeqConflict {
                expected_seq: 1,
                current_seq: 2
            }),
            ApiError::ExpectedSeqConflict {
                expected_seq: 1,
                current_seq: 2
            }
        );
    }
}
