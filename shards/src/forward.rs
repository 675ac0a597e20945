//! Requests forwarded between nodes: an [`Op`] a node cannot serve itself (it does not
//! lead the session's group) travels to the leader as the body of a
//! [`crate::peer::PeerFrame::Request`], and the [`Reply`] comes back in the matching
//! `Response` (which reply completes which request: [`crate::forwarding`]). These
//! functions turn both into bytes and back.
//!
//! The bytes are rkyv archives of the [`crate::ops`] types themselves (derived there and
//! on the `validate` and `listing` types they hold), so there is no second copy of
//! them to keep in step. Where a field has no rkyv form of its own, a wrapper of this
//! module says how it travels, losing nothing:
//! - [`UsizeAsU64`]: counts and byte limits travel as 64 bits (rkyv's own `usize`
//!   form is 32 bits and would cut larger values);
//! - [`JsonObjectText`]: a patch's metadata travels as its JSON text (the workspace's
//!   `serde_json` keeps key order and numbers' digits, so map → text → map is exact);
//! - [`FieldCode`]: a [`validate::FieldError`]'s code travels as text and comes back as the
//!   entry of [`FIELD_ERROR_CODES`] it names (`FieldError::code` is a `&'static str`);
//! - [`NotForwarded`]: [`Reply::Stats`] is per node, and encoding or decoding it is an
//!   error ([`Op::Stats`] is refused here too).
//!
//! Decoding never panics on bad bytes: they are copied into an aligned buffer and
//! validated with bytecheck before anything reads them.

use rkyv::rancor::{self, Fallible, Source};
use rkyv::ser::Writer;
use rkyv::string::{ArchivedString, StringResolver};
use rkyv::util::AlignedVec;
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::{Archive, Archived, Deserialize, Place, Serialize, SerializeUnsized};
use serde_json::{Map, Value};

use crate::ops::{Op, Reply};
use crate::validate;

/// Every code a [`validate::FieldError`] carries in the server: those of [`crate::validate`] and
/// the query-parameter codes of the API (API.md). Decoding maps a code to the entry
/// here because `FieldError::code` is a `&'static str`.
pub const FIELD_ERROR_CODES: [&str; 8] = [
    validate::INVALID_JSON,
    validate::INVALID_EVENT,
    validate::INVALID_SESSION,
    validate::INVALID_METADATA,
    "invalid_cursor",
    "invalid_limit",
    "invalid_archived",
    "invalid_batch_size",
];
/// The code of a decoded [`validate::FieldError`] whose code is not in [`FIELD_ERROR_CODES`] (a
/// peer running a newer build): API.md's generic 400.
pub const FIELD_ERROR_CODE_UNKNOWN: &str = "bad_request";

pub fn encode_op(op: &Op) -> Result<Vec<u8>, String> {
    if let Op::Stats = op {
        return Err("Op::Stats is per node and never forwarded".into());
    }
    to_bytes(op)
}

pub fn decode_op(bytes: &[u8]) -> Result<Op, String> {
    match from_bytes::<Op>(bytes, "op")? {
        Op::Stats => Err("forwarded op is Stats, which is per node".into()),
        op => Ok(op),
    }
}

/// Any `S`: a [`Reply::Stats`] is refused whatever its payload.
pub fn encode_reply<S>(reply: &Reply<S>) -> Result<Vec<u8>, String> {
    to_bytes(reply)
}

pub fn decode_reply<S>(bytes: &[u8]) -> Result<Reply<S>, String> {
    from_bytes::<Reply<S>>(bytes, "reply")
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

/// A wrapper's refusal, carried in rkyv's error.
#[derive(Debug)]
struct WireError(String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

/// A `usize` as a little-endian `u64` (see the module doc).
pub struct UsizeAsU64;

impl ArchiveWith<usize> for UsizeAsU64 {
    type Archived = Archived<u64>;
    type Resolver = ();

    fn resolve_with(field: &usize, _: (), out: Place<Self::Archived>) {
        // Lossless: no platform Rust supports has a `usize` wider than 64 bits.
        (*field as u64).resolve((), out);
    }
}

impl<S: Fallible + ?Sized> SerializeWith<usize, S> for UsizeAsU64 {
    fn serialize_with(_: &usize, _: &mut S) -> Result<(), S::Error> {
        Ok(())
    }
}

impl<D> DeserializeWith<Archived<u64>, usize, D> for UsizeAsU64
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(field: &Archived<u64>, _: &mut D) -> Result<usize, D::Error> {
        usize::try_from(field.to_native()).map_err(D::Error::new)
    }
}

/// A JSON object as its text (see the module doc).
pub struct JsonObjectText;

/// The object's text, kept from serialising to resolving (rkyv writes a short string
/// inline, so resolving needs the text itself, not only where it was written).
pub struct JsonTextResolver {
    text: String,
    inner: StringResolver,
}

impl ArchiveWith<Map<String, Value>> for JsonObjectText {
    type Archived = ArchivedString;
    type Resolver = JsonTextResolver;

    fn resolve_with(
        _: &Map<String, Value>,
        resolver: JsonTextResolver,
        out: Place<ArchivedString>,
    ) {
        ArchivedString::resolve_from_str(&resolver.text, resolver.inner, out);
    }
}

impl<S> SerializeWith<Map<String, Value>, S> for JsonObjectText
where
    S: Fallible + Writer + ?Sized,
    S::Error: Source,
    str: SerializeUnsized<S>,
{
    fn serialize_with(
        field: &Map<String, Value>,
        serializer: &mut S,
    ) -> Result<JsonTextResolver, S::Error> {
        let text = serde_json::to_string(field).map_err(S::Error::new)?;
        let inner = ArchivedString::serialize_from_str(&text, serializer)?;
        Ok(JsonTextResolver { text, inner })
    }
}

impl<D> DeserializeWith<ArchivedString, Map<String, Value>, D> for JsonObjectText
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(field: &ArchivedString, _: &mut D) -> Result<Map<String, Value>, D::Error> {
        serde_json::from_str(field.as_str()).map_err(D::Error::new)
    }
}

/// A [`validate::FieldError`] code as text (see the module doc).
pub struct FieldCode;

impl ArchiveWith<&'static str> for FieldCode {
    type Archived = ArchivedString;
    type Resolver = StringResolver;

    fn resolve_with(field: &&'static str, resolver: StringResolver, out: Place<ArchivedString>) {
        ArchivedString::resolve_from_str(field, resolver, out);
    }
}

impl<S> SerializeWith<&'static str, S> for FieldCode
where
    S: Fallible + Writer + ?Sized,
    S::Error: Source,
    str: SerializeUnsized<S>,
{
    fn serialize_with(
        field: &&'static str,
        serializer: &mut S,
    ) -> Result<StringResolver, S::Error> {
        ArchivedString::serialize_from_str(field, serializer)
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<ArchivedString, &'static str, D> for FieldCode {
    fn deserialize_with(field: &ArchivedString, _: &mut D) -> Result<&'static str, D::Error> {
        Ok(field_error_code(field.as_str()))
    }
}

fn field_error_code(code: &str) -> &'static str {
    FIELD_ERROR_CODES
        .into_iter()
        .find(|known| *known == code)
        .unwrap_or(FIELD_ERROR_CODE_UNKNOWN)
}

/// A value that never leaves its node: encoding and decoding it are errors.
pub struct NotForwarded;

impl<F> ArchiveWith<F> for NotForwarded {
    type Archived = ();
    type Resolver = ();

    fn resolve_with(_: &F, _: (), _: Place<()>) {}
}

impl<F, S> SerializeWith<F, S> for NotForwarded
where
    S: Fallible + ?Sized,
    S::Error: Source,
{
    fn serialize_with(_: &F, _: &mut S) -> Result<(), S::Error> {
        Err(S::Error::new(WireError(
            "Reply::Stats is per node and never forwarded".into(),
        )))
    }
}

impl<F, D> DeserializeWith<(), F, D> for NotForwarded
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(_: &(), _: &mut D) -> Result<F, D::Error> {
        Err(D::Error::new(WireError(
            "forwarded reply is Stats, which is per node".into(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::ops::{ApiError, ArchivedFilter};
    use crate::validate::{FieldError, NewEvent, PatchRequest};

    /// The shell's statistics are not this crate's business: any payload will do.
    type Reply = crate::ops::Reply<()>;

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
            Reply::Sessions(crate::listing::Part {
                sessions: vec![("a".into(), "{}".into()), ("b".into(), "{}".into())],
                complete_through: Some("c".into()),
            }),
            Reply::Sessions(crate::listing::Part {
                sessions: Vec::new(),
                complete_through: None,
            }),
            Reply::Debug("{}".into()),
            Reply::ReadIndex(vec![(3, 100), (255, u64::MAX)]),
            Reply::Records(vec![crate::entry::LogRecord {
                group: 7,
                term: 2,
                index: 11,
                command: crate::entry::Command::Noop,
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
            let decoded: Reply = decode_reply(&encode_reply(&reply).unwrap()).unwrap();
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
        let sent = Reply::Error(ApiError::Invalid(FieldError::new(
            "invalid_from_the_future",
            Some("x"),
            "m",
        )));
        let decoded: Reply = decode_reply(&encode_reply(&sent).unwrap()).unwrap();
        let Reply::Error(ApiError::Invalid(field)) = decoded else {
            panic!("{decoded:?}");
        };
        assert_eq!(field.code, FIELD_ERROR_CODE_UNKNOWN);
        assert_eq!(field.field.as_deref(), Some("x"));
    }

    #[test]
    fn sizes_travel_as_64_bits() {
        let op = Op::FetchEvents {
            id: "ses_1".into(),
            after: 0,
            through: 1,
            max_bytes: usize::MAX,
        };
        let Op::FetchEvents { max_bytes, .. } = decode_op(&encode_op(&op).unwrap()).unwrap() else {
            panic!("not a fetch");
        };
        assert_eq!(max_bytes, usize::MAX);
    }

    #[test]
    fn stats_are_never_forwarded() {
        assert!(encode_op(&Op::Stats).is_err());
        assert!(encode_reply(&Reply::Stats(())).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_op(b"").is_err());
        assert!(decode_op(b"garbage").is_err());
        assert!(decode_reply::<()>(&[0xff; 64]).is_err());
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
                let _ = decode_reply::<()>(&flipped);
            }
        }
    }

    #[test]
    fn a_wait_travels_exactly() {
        for wait in [Duration::MAX, Duration::new(3, 999_999_999), Duration::ZERO] {
            let op = Op::Read {
                id: "ses_1".into(),
                after: 0,
                max_events: 1,
                max_bytes: 1,
                wait: Some(wait),
            };
            let Op::Read { wait: decoded, .. } = decode_op(&encode_op(&op).unwrap()).unwrap()
            else {
                panic!("not a read");
            };
            assert_eq!(decoded, Some(wait));
        }
    }
}
