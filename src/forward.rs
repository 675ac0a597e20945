//! Requests forwarded between nodes: an [`Op`] a node cannot serve itself (it does not
//! lead the session's group) travels to the leader as the body of a
//! [`shards::peer::PeerFrame::Request`], and the [`Reply`] comes back in the matching
//! `Response`. These functions turn both into bytes and back.
//!
//! The bytes are rkyv archives of mirror types private to this module, so `ops` and the
//! `shards` types keep no serialisation concerns. Conversions that lose nothing are
//! exact both ways; the exceptions are stated where they happen: `Read::wait` travels
//! in whole microseconds, a patch's metadata as its JSON text (the workspace's
//! `serde_json` keeps key order and numbers' digits, so map → text → map is exact), and a
//! [`FieldError`]'s code as text mapped back to one of the codes this server uses.
//! [`Op::Stats`] and [`Reply::Stats`] are per node and never forwarded.
//!
//! Decoding never panics on bad bytes: they are copied into an aligned buffer and
//! validated with bytecheck before anything reads them.

use std::sync::Arc;
use std::time::Duration;

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use serde_json::{Map, Value};
use shards::validate::{self, FieldError, NewEvent, PatchRequest};

use crate::ops::{ApiError, ArchivedFilter, Op, Reply};

/// Every code a [`FieldError`] carries in this server: those of `shards::validate` and
/// the query-parameter codes of `api` (API.md). Decoding maps a code to the entry here
/// because `FieldError::code` is a `&'static str`.
const FIELD_ERROR_CODES: [&str; 8] = [
    validate::INVALID_JSON,
    validate::INVALID_EVENT,
    validate::INVALID_SESSION,
    validate::INVALID_METADATA,
    "invalid_cursor",
    "invalid_limit",
    "invalid_archived",
    "invalid_batch_size",
];
/// The code of a decoded [`FieldError`] whose code is not in [`FIELD_ERROR_CODES`] (a
/// peer running a newer build): API.md's generic 400.
const FIELD_ERROR_CODE_UNKNOWN: &str = "bad_request";

pub fn encode_op(op: &Op) -> Result<Vec<u8>, String> {
    to_bytes(&WireOp::of(op)?)
}

pub fn decode_op(bytes: &[u8]) -> Result<Op, String> {
    from_bytes::<WireOp>(bytes, "op")?.into_op()
}

pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, String> {
    to_bytes(&WireReply::of(reply)?)
}

pub fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    Ok(from_bytes::<WireReply>(bytes, "reply")?.into_reply())
}

fn to_bytes<T>(value: &T) -> Result<Vec<u8>, String>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            Vec<u8>,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, Vec::new())
        .map_err(|e| format!("serialising a forwarded message: {e}"))
}

fn from_bytes<T>(bytes: &[u8], what: &str) -> Result<T, String>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    // rkyv refuses (rather than misreads) unaligned data; a request body has no
    // alignment guarantee.
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rancor::Error>(&aligned)
        .map_err(|e| format!("forwarded {what} does not decode: {e}"))
}

#[derive(Archive, Serialize, Deserialize)]
enum WireOp {
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
        title: Option<Option<String>>,
        /// The metadata object as JSON text.
        metadata: Option<String>,
        expected_version: Option<u64>,
    },
    SetArchived {
        id: String,
        archived: bool,
    },
    Append {
        id: String,
        event: WireEvent,
    },
    Read {
        id: String,
        after: u64,
        max_events: u64,
        max_bytes: u64,
        wait_us: Option<u64>,
    },
    List {
        after: Option<String>,
        limit: u64,
        archived: WireArchivedFilter,
        filters: Vec<(String, String)>,
    },
    DebugGroup {
        group: u16,
    },
    ReadIndex {
        groups: Vec<u16>,
    },
    FetchEvents {
        id: String,
        after: u64,
        through: u64,
        max_bytes: u64,
    },
}

#[derive(Archive, Serialize, Deserialize)]
struct WireEvent {
    event_type: String,
    payload: String,
    actor: Option<String>,
    source: Option<String>,
    metadata: String,
    refs: String,
    idempotency_key: Option<String>,
    expected_seq: Option<u64>,
    producer: Option<(String, u64)>,
    digest: [u8; 16],
}

#[derive(Archive, Serialize, Deserialize)]
enum WireArchivedFilter {
    Active,
    Archived,
    All,
}

#[derive(Archive, Serialize, Deserialize)]
enum WireReply {
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
    /// A full scan's answer (a node from before listing pages had bounds).
    Sessions(Vec<(String, String)>),
    Debug(String),
    ReadIndex(Vec<(u16, u64)>),
    Error(WireApiError),
    Records(Vec<shards::entry::LogRecord>),
    /// One shard's part of a listing page (`shards::listing::Part`); new variants go
    /// last so that older nodes keep decoding the others.
    Page {
        sessions: Vec<(String, String)>,
        complete_through: Option<String>,
    },
}

#[derive(Archive, Serialize, Deserialize)]
enum WireApiError {
    Invalid {
        code: String,
        field: Option<String>,
        message: String,
    },
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
    Unavailable,
    Overloaded,
    CommitUnknown,
    StorageFull,
    EventsExpired {
        first_available_seq: u64,
    },
    ArchiveUnavailable,
    Internal(String),
    NotLeader {
        leader: Option<u64>,
    },
    LogDamaged(String),
}

impl WireOp {
    fn of(op: &Op) -> Result<WireOp, String> {
        Ok(match op {
            Op::Create {
                id,
                title,
                metadata,
            } => WireOp::Create {
                id: id.clone(),
                title: title.clone(),
                metadata: metadata.clone(),
            },
            Op::Get { id } => WireOp::Get { id: id.clone() },
            Op::Patch { id, patch } => WireOp::Patch {
                id: id.clone(),
                title: patch.title.clone(),
                metadata: match &patch.metadata {
                    Some(map) => Some(
                        serde_json::to_string(map)
                            .map_err(|e| format!("patch metadata to JSON: {e}"))?,
                    ),
                    None => None,
                },
                expected_version: patch.expected_version,
            },
            Op::SetArchived { id, archived } => WireOp::SetArchived {
                id: id.clone(),
                archived: *archived,
            },
            Op::Append { id, event } => WireOp::Append {
                id: id.clone(),
                event: WireEvent::of(event),
            },
            Op::Read {
                id,
                after,
                max_events,
                max_bytes,
                wait,
            } => WireOp::Read {
                id: id.clone(),
                after: *after,
                max_events: *max_events as u64,
                max_bytes: *max_bytes as u64,
                wait_us: match wait {
                    Some(wait) => Some(
                        u64::try_from(wait.as_micros())
                            .map_err(|_| format!("read wait {wait:?} exceeds u64 microseconds"))?,
                    ),
                    None => None,
                },
            },
            Op::List {
                after,
                limit,
                archived,
                filters,
            } => WireOp::List {
                after: after.clone(),
                limit: *limit as u64,
                archived: match archived {
                    ArchivedFilter::Active => WireArchivedFilter::Active,
                    ArchivedFilter::Archived => WireArchivedFilter::Archived,
                    ArchivedFilter::All => WireArchivedFilter::All,
                },
                filters: filters.clone(),
            },
            Op::Stats => return Err("Op::Stats is per node and never forwarded".into()),
            Op::DebugGroup { group } => WireOp::DebugGroup { group: *group },
            Op::ReadIndex { groups } => WireOp::ReadIndex {
                groups: groups.clone(),
            },
            Op::FetchEvents {
                id,
                after,
                through,
                max_bytes,
            } => WireOp::FetchEvents {
                id: id.clone(),
                after: *after,
                through: *through,
                max_bytes: *max_bytes as u64,
            },
        })
    }

    fn into_op(self) -> Result<Op, String> {
        Ok(match self {
            WireOp::Create {
                id,
                title,
                metadata,
            } => Op::Create {
                id,
                title,
                metadata,
            },
            WireOp::Get { id } => Op::Get { id },
            WireOp::Patch {
                id,
                title,
                metadata,
                expected_version,
            } => Op::Patch {
                id,
                patch: PatchRequest {
                    title,
                    metadata: match metadata {
                        Some(text) => Some(
                            serde_json::from_str::<Map<String, Value>>(&text)
                                .map_err(|e| format!("forwarded patch metadata: {e}"))?,
                        ),
                        None => None,
                    },
                    expected_version,
                },
            },
            WireOp::SetArchived { id, archived } => Op::SetArchived { id, archived },
            WireOp::Append { id, event } => Op::Append {
                id,
                event: event.into_event(),
            },
            WireOp::Read {
                id,
                after,
                max_events,
                max_bytes,
                wait_us,
            } => Op::Read {
                id,
                after,
                max_events: to_usize(max_events, "max_events")?,
                max_bytes: to_usize(max_bytes, "max_bytes")?,
                wait: wait_us.map(Duration::from_micros),
            },
            WireOp::List {
                after,
                limit,
                archived,
                filters,
            } => Op::List {
                after,
                limit: to_usize(limit, "limit")?,
                archived: match archived {
                    WireArchivedFilter::Active => ArchivedFilter::Active,
                    WireArchivedFilter::Archived => ArchivedFilter::Archived,
                    WireArchivedFilter::All => ArchivedFilter::All,
                },
                filters,
            },
            WireOp::DebugGroup { group } => Op::DebugGroup { group },
            WireOp::ReadIndex { groups } => Op::ReadIndex { groups },
            WireOp::FetchEvents {
                id,
                after,
                through,
                max_bytes,
            } => Op::FetchEvents {
                id,
                after,
                through,
                max_bytes: to_usize(max_bytes, "max_bytes")?,
            },
        })
    }
}

fn to_usize(value: u64, field: &str) -> Result<usize, String> {
    usize::try_from(value).map_err(|_| format!("forwarded {field} {value} exceeds usize"))
}

impl WireEvent {
    fn of(event: &NewEvent) -> WireEvent {
        WireEvent {
            event_type: event.event_type.clone(),
            payload: event.payload.clone(),
            actor: event.actor.clone(),
            source: event.source.clone(),
            metadata: event.metadata.clone(),
            refs: event.refs.clone(),
            idempotency_key: event.idempotency_key.clone(),
            expected_seq: event.expected_seq,
            producer: event.producer.clone(),
            digest: event.digest,
        }
    }

    fn into_event(self) -> NewEvent {
        NewEvent {
            event_type: self.event_type,
            payload: self.payload,
            actor: self.actor,
            source: self.source,
            metadata: self.metadata,
            refs: self.refs,
            idempotency_key: self.idempotency_key,
            expected_seq: self.expected_seq,
            producer: self.producer,
            digest: self.digest,
        }
    }
}

impl WireReply {
    fn of(reply: &Reply) -> Result<WireReply, String> {
        Ok(match reply {
            Reply::Session(session) => WireReply::Session(session.clone()),
            Reply::Appended {
                seq,
                last_seq,
                deduped,
                archived_seq,
            } => WireReply::Appended {
                seq: *seq,
                last_seq: *last_seq,
                deduped: *deduped,
                archived_seq: *archived_seq,
            },
            Reply::Events { events, last_seq } => WireReply::Events {
                events: events.clone(),
                last_seq: *last_seq,
            },
            Reply::Sessions(part) => WireReply::Page {
                sessions: part.sessions.clone(),
                complete_through: part.complete_through.clone(),
            },
            Reply::Stats(_) => return Err("Reply::Stats is per node and never forwarded".into()),
            Reply::Debug(text) => WireReply::Debug(text.clone()),
            Reply::ReadIndex(commits) => WireReply::ReadIndex(commits.clone()),
            Reply::Records(records) => WireReply::Records(records.clone()),
            Reply::Error(error) => WireReply::Error(WireApiError::of(error)),
        })
    }

    fn into_reply(self) -> Reply {
        match self {
            WireReply::Session(session) => Reply::Session(session),
            WireReply::Appended {
                seq,
                last_seq,
                deduped,
                archived_seq,
            } => Reply::Appended {
                seq,
                last_seq,
                deduped,
                archived_seq,
            },
            WireReply::Events { events, last_seq } => Reply::Events { events, last_seq },
            WireReply::Sessions(sessions) => Reply::Sessions(shards::listing::Part {
                sessions,
                complete_through: None,
            }),
            WireReply::Page {
                sessions,
                complete_through,
            } => Reply::Sessions(shards::listing::Part {
                sessions,
                complete_through,
            }),
            WireReply::Debug(text) => Reply::Debug(text),
            WireReply::ReadIndex(commits) => Reply::ReadIndex(commits),
            WireReply::Records(records) => Reply::Records(records),
            WireReply::Error(error) => Reply::Error(error.into_error()),
        }
    }
}

impl WireApiError {
    fn of(error: &ApiError) -> WireApiError {
        match error {
            ApiError::Invalid(field) => WireApiError::Invalid {
                code: field.code.to_string(),
                field: field.field.clone(),
                message: field.message.clone(),
            },
            ApiError::SessionNotFound => WireApiError::SessionNotFound,
            ApiError::SessionExists => WireApiError::SessionExists,
            ApiError::VersionConflict { current_version } => WireApiError::VersionConflict {
                current_version: *current_version,
            },
            ApiError::IdempotencyConflict { seq } => {
                WireApiError::IdempotencyConflict { seq: *seq }
            }
            ApiError::ProducerSeqConflict {
                expected_producer_seq,
            } => WireApiError::ProducerSeqConflict {
                expected_producer_seq: *expected_producer_seq,
            },
            ApiError::ExpectedSeqConflict {
                expected_seq,
                current_seq,
            } => WireApiError::ExpectedSeqConflict {
                expected_seq: *expected_seq,
                current_seq: *current_seq,
            },
            ApiError::Unavailable => WireApiError::Unavailable,
            ApiError::Overloaded => WireApiError::Overloaded,
            ApiError::CommitUnknown => WireApiError::CommitUnknown,
            ApiError::StorageFull => WireApiError::StorageFull,
            ApiError::EventsExpired {
                first_available_seq,
            } => WireApiError::EventsExpired {
                first_available_seq: *first_available_seq,
            },
            ApiError::ArchiveUnavailable => WireApiError::ArchiveUnavailable,
            ApiError::Internal(reason) => WireApiError::Internal(reason.clone()),
            ApiError::NotLeader { leader } => WireApiError::NotLeader { leader: *leader },
            ApiError::LogDamaged(what) => WireApiError::LogDamaged(what.clone()),
        }
    }

    fn into_error(self) -> ApiError {
        match self {
            WireApiError::Invalid {
                code,
                field,
                message,
            } => ApiError::Invalid(FieldError {
                code: field_error_code(&code),
                field,
                message,
            }),
            WireApiError::SessionNotFound => ApiError::SessionNotFound,
            WireApiError::SessionExists => ApiError::SessionExists,
            WireApiError::VersionConflict { current_version } => {
                ApiError::VersionConflict { current_version }
            }
            WireApiError::IdempotencyConflict { seq } => ApiError::IdempotencyConflict { seq },
            WireApiError::ProducerSeqConflict {
                expected_producer_seq,
            } => ApiError::ProducerSeqConflict {
                expected_producer_seq,
            },
            WireApiError::ExpectedSeqConflict {
                expected_seq,
                current_seq,
            } => ApiError::ExpectedSeqConflict {
                expected_seq,
                current_seq,
            },
            WireApiError::Unavailable => ApiError::Unavailable,
            WireApiError::Overloaded => ApiError::Overloaded,
            WireApiError::CommitUnknown => ApiError::CommitUnknown,
            WireApiError::StorageFull => ApiError::StorageFull,
            WireApiError::EventsExpired {
                first_available_seq,
            } => ApiError::EventsExpired {
                first_available_seq,
            },
            WireApiError::ArchiveUnavailable => ApiError::ArchiveUnavailable,
            WireApiError::Internal(reason) => ApiError::Internal(reason),
            WireApiError::NotLeader { leader } => ApiError::NotLeader { leader },
            WireApiError::LogDamaged(what) => ApiError::LogDamaged(what),
        }
    }
}

fn field_error_code(code: &str) -> &'static str {
    FIELD_ERROR_CODES
        .into_iter()
        .find(|known| *known == code)
        .unwrap_or(FIELD_ERROR_CODE_UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> NewEvent {
        NewEvent {
            event_type: "note".into(),
            payload: r#"{"b":1E2,"a":[1.50,"é"]}"#.into(),
            actor: Some("agent:drafter".into()),
            source: None,
            metadata: "{}".into(),
            refs: r#"{"r":[]}"#.into(),
            idempotency_key: Some("k".into()),
            expected_seq: Some(0),
            producer: Some(("w".into(), 7)),
            digest: [0xab; 16],
        }
    }

    fn patch(metadata: &str) -> PatchRequest {
        PatchRequest {
            title: Some(None),
            metadata: Some(serde_json::from_str(metadata).unwrap()),
            expected_version: Some(3),
        }
    }

    fn every_op() -> Vec<Op> {
        vec![
            Op::Create {
                id: "ses_1".into(),
                title: Some("t".into()),
                metadata: r#"{"m":1}"#.into(),
            },
            Op::Create {
                id: "ses_1".into(),
                title: None,
                metadata: "{}".into(),
            },
            Op::Get { id: "ses_1".into() },
            Op::Patch {
                id: "ses_1".into(),
                patch: patch(r#"{"z":null,"a":1.50,"big":123456789012345678901234567890}"#),
            },
            Op::Patch {
                id: "ses_1".into(),
                patch: PatchRequest {
                    title: Some(Some("new".into())),
                    metadata: None,
                    expected_version: None,
                },
            },
            Op::Patch {
                id: "ses_1".into(),
                patch: PatchRequest {
                    title: None,
                    metadata: Some(Map::new()),
                    expected_version: None,
                },
            },
            Op::SetArchived {
                id: "ses_1".into(),
                archived: true,
            },
            Op::Append {
                id: "ses_1".into(),
                event: event(),
            },
            Op::Read {
                id: "ses_1".into(),
                after: 41,
                max_events: 1000,
                max_bytes: 4 << 20,
                wait: Some(Duration::from_micros(2_500_001)),
            },
            Op::Read {
                id: "ses_1".into(),
                after: 0,
                max_events: 1,
                max_bytes: 0,
                wait: None,
            },
            Op::List {
                after: Some("ses_0".into()),
                limit: 100,
                archived: ArchivedFilter::Active,
                filters: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            },
            Op::List {
                after: None,
                limit: 1,
                archived: ArchivedFilter::Archived,
                filters: Vec::new(),
            },
            Op::List {
                after: None,
                limit: 1,
                archived: ArchivedFilter::All,
                filters: Vec::new(),
            },
            Op::DebugGroup { group: 255 },
            Op::ReadIndex {
                groups: vec![0, 7, 255],
            },
            Op::FetchEvents {
                id: "ses_1".into(),
                after: 4,
                through: 90,
                max_bytes: 4 << 20,
            },
        ]
    }

    fn every_error() -> Vec<ApiError> {
        let mut errors: Vec<ApiError> = FIELD_ERROR_CODES
            .into_iter()
            .map(|code| ApiError::Invalid(FieldError::new(code, Some("f"), "why")))
            .collect();
        errors.extend([
            ApiError::Invalid(FieldError::new(validate::INVALID_JSON, None, "syntax")),
            ApiError::SessionNotFound,
            ApiError::SessionExists,
            ApiError::VersionConflict { current_version: 4 },
            ApiError::IdempotencyConflict { seq: 9 },
            ApiError::ProducerSeqConflict {
                expected_producer_seq: 8,
            },
            ApiError::ExpectedSeqConflict {
                expected_seq: 1,
                current_seq: 2,
            },
            ApiError::Unavailable,
            ApiError::Overloaded,
            ApiError::CommitUnknown,
            ApiError::StorageFull,
            ApiError::EventsExpired {
                first_available_seq: 7,
            },
            ApiError::ArchiveUnavailable,
            ApiError::Internal("disk".into()),
            ApiError::NotLeader { leader: Some(2) },
            ApiError::NotLeader { leader: None },
            ApiError::LogDamaged("segment 3 offset 4096".into()),
        ]);
        errors
    }

    fn every_reply() -> Vec<Reply> {
        let mut replies = vec![
            Reply::Session(r#"{"id":"ses_1"}"#.into()),
            Reply::Appended {
                seq: 5,
                last_seq: 5,
                deduped: true,
                archived_seq: 2,
            },
            Reply::Events {
                events: vec![(1, Arc::from(r#"{"seq":1}"#)), (2, Arc::from(""))],
                last_seq: 9,
            },
            Reply::Events {
                events: Vec::new(),
                last_seq: 0,
            },
            Reply::Sessions(shards::listing::Part {
                sessions: vec![("a".into(), "{}".into()), ("b".into(), "{}".into())],
                complete_through: Some("c".into()),
            }),
            Reply::Sessions(shards::listing::Part {
                sessions: Vec::new(),
                complete_through: None,
            }),
            Reply::Debug("{}".into()),
            Reply::ReadIndex(vec![(3, 100), (255, u64::MAX)]),
            Reply::Records(vec![shards::entry::LogRecord {
                group: 7,
                term: 2,
                index: 11,
                command: shards::entry::Command::Noop,
            }]),
        ];
        replies.extend(every_error().into_iter().map(Reply::Error));
        replies
    }

    #[test]
    fn every_op_round_trips() {
        for op in every_op() {
            let bytes = encode_op(&op).unwrap();
            let decoded = decode_op(&bytes).unwrap();
            assert_eq!(format!("{decoded:?}"), format!("{op:?}"));
            // A body may sit at any offset of a buffer.
            let mut shifted = vec![0u8; 1];
            shifted.extend_from_slice(&bytes);
            assert_eq!(
                format!("{:?}", decode_op(&shifted[1..]).unwrap()),
                format!("{op:?}")
            );
        }
    }

    #[test]
    fn patch_metadata_keeps_its_exact_numbers_and_order() {
        let original = patch(r#"{"z":null,"a":1.50,"n":1E2,"big":123456789012345678901234567890}"#);
        let op = Op::Patch {
            id: "ses_1".into(),
            patch: original.clone(),
        };
        let Op::Patch { patch: decoded, .. } = decode_op(&encode_op(&op).unwrap()).unwrap() else {
            panic!("not a patch");
        };
        assert_eq!(decoded, original);
        let text = serde_json::to_string(&decoded.metadata.unwrap()).unwrap();
        assert_eq!(
            text,
            serde_json::to_string(&original.metadata.unwrap()).unwrap()
        );
        assert!(text.starts_with(r#"{"z":null,"a":1.50,"#), "{text}");
    }

    #[test]
    fn every_reply_round_trips() {
        for reply in every_reply() {
            let decoded = decode_reply(&encode_reply(&reply).unwrap()).unwrap();
            assert_eq!(format!("{decoded:?}"), format!("{reply:?}"));
        }
    }

    #[test]
    fn errors_round_trip_with_their_static_codes() {
        for error in every_error() {
            let reply = decode_reply(&encode_reply(&Reply::Error(error.clone())).unwrap());
            let Ok(Reply::Error(decoded)) = reply else {
                panic!("{error:?} came back as {reply:?}");
            };
            assert_eq!(decoded, error);
        }
    }

    #[test]
    fn an_unknown_field_error_code_decodes_to_bad_request() {
        let wire = WireReply::Error(WireApiError::Invalid {
            code: "invalid_from_the_future".into(),
            field: Some("x".into()),
            message: "m".into(),
        });
        let decoded = decode_reply(&to_bytes(&wire).unwrap()).unwrap();
        let Reply::Error(ApiError::Invalid(field)) = decoded else {
            panic!("{decoded:?}");
        };
        assert_eq!(field.code, FIELD_ERROR_CODE_UNKNOWN);
        assert_eq!(field.field.as_deref(), Some("x"));
    }

    #[test]
    fn stats_are_never_forwarded() {
        assert!(encode_op(&Op::Stats).is_err());
        let stats = Reply::Stats(Box::default());
        assert!(encode_reply(&stats).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_op(b"").is_err());
        assert!(decode_op(b"garbage").is_err());
        assert!(decode_reply(&[0xff; 64]).is_err());
        // Bytes of a reply are not an op.
        let reply = encode_reply(&Reply::Session("x".repeat(40))).unwrap();
        assert!(decode_op(&reply).is_err());
        let op = encode_op(&every_op()[7]).unwrap();
        for cut in 0..op.len() {
            assert!(decode_op(&op[..cut]).is_err(), "cut {cut}");
        }
        for at in 0..op.len() {
            for bit in 0..8 {
                let mut flipped = op.clone();
                flipped[at] ^= 1 << bit;
                let _ = decode_op(&flipped);
                let _ = decode_reply(&flipped);
            }
        }
    }

    #[test]
    fn a_wait_beyond_u64_microseconds_is_refused() {
        let op = Op::Read {
            id: "ses_1".into(),
            after: 0,
            max_events: 1,
            max_bytes: 1,
            wait: Some(Duration::MAX),
        };
        assert!(encode_op(&op).is_err());
    }
}
