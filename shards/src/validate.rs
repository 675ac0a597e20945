//! Request bodies → validated values, or the first broken rule with the field it names
//! (API.md). Every body is checked in the same order: `invalid_json` (UTF-8, syntax,
//! depth) first; then the body must be an object; then unknown fields in received order;
//! then the known fields in the order of API.md's tables.
//!
//! Choices API.md leaves open, made the same way for every optional field: JSON `null`
//! counts as absent (except a PATCH `title`, where null means "set the title to null"),
//! and an empty body (zero bytes or only JSON whitespace) counts as `{}`.

use rkyv::with::Map as MapWith;
use rkyv::{Archive, Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::entry::{AppendEntry, Digest};
use crate::forward::{FieldCode, JsonObjectText};
use crate::json;

pub const INVALID_JSON: &str = "invalid_json";
pub const INVALID_EVENT: &str = "invalid_event";
pub const INVALID_SESSION: &str = "invalid_session";
pub const INVALID_METADATA: &str = "invalid_metadata";

pub const EVENT_TYPE_BYTES_MAX: usize = 128;
pub const ACTOR_BYTES_MAX: usize = 256;
pub const SOURCE_BYTES_MAX: usize = 256;
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
pub const PRODUCER_ID_BYTES_MAX: usize = 256;
pub const SESSION_ID_BYTES_MAX: usize = 128;
pub const TITLE_BYTES_MAX: usize = 1024;
/// Limit on a session's metadata, measured as its compact JSON text.
pub const METADATA_BYTES_MAX: usize = 65_536;

/// A client error: the API error `code`, the offending `field` (None when no single
/// field is to blame) and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct FieldError {
    #[rkyv(with = FieldCode)]
    pub code: &'static str,
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    pub fn new(code: &'static str, field: Option<&str>, message: impl Into<String>) -> Self {
        FieldError {
            code,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({}): {}", self.code, field, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for FieldError {}

/// A validated append body. JSON values are held as the compact text that is stored
/// and served.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct NewEvent {
    pub event_type: String,
    /// Compact JSON text of any value except null.
    pub payload: String,
    pub actor: Option<String>,
    pub source: Option<String>,
    /// Compact object text, `{}` when absent.
    pub metadata: String,
    /// Compact object text, `{}` when absent.
    pub refs: String,
    pub idempotency_key: Option<String>,
    pub expected_seq: Option<u64>,
    /// `(producer_id, producer_seq)`.
    pub producer: Option<(String, u64)>,
    /// Digest of the content (API.md "same content"); not of idempotency_key or
    /// expected_seq.
    pub digest: Digest,
}

/// A validated create body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub id: Option<String>,
    pub title: Option<String>,
    /// Compact object text, `{}` when absent.
    pub metadata: String,
}

/// A validated PATCH body.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct PatchRequest {
    /// None: keep the title; Some(None): set it to null; Some(Some(t)): set it to t.
    pub title: Option<Option<String>>,
    /// The top-level keys to merge (null values remove the key).
    #[rkyv(with = MapWith<JsonObjectText>)]
    pub metadata: Option<Map<String, Value>>,
    pub expected_version: Option<u64>,
}

const APPEND_FIELDS: [&str; 10] = [
    "type",
    "payload",
    "actor",
    "source",
    "metadata",
    "refs",
    "idempotency_key",
    "expected_seq",
    "producer_id",
    "producer_seq",
];
const CREATE_FIELDS: [&str; 3] = ["id", "title", "metadata"];
const PATCH_FIELDS: [&str; 3] = ["title", "metadata", "expected_version"];

/// Validates the body of `POST /v1/sessions/:id/append` (API.md, Append table).
pub fn validate_append(body: &[u8]) -> Result<NewEvent, FieldError> {
    let members = parse_object(body, INVALID_EVENT, &APPEND_FIELDS)?;
    let fields = Fields {
        members: &members,
        code: INVALID_EVENT,
    };
    let event_type = fields
        .string("type", Text::NON_EMPTY, EVENT_TYPE_BYTES_MAX)?
        .ok_or_else(|| fields.error("type", "`type` is required"))?;
    if matches!(members.get("payload"), None | Some(Value::Null)) {
        return Err(fields.error("payload", "`payload` is required and must not be null"));
    }
    let actor = fields.string("actor", Text::MAY_BE_EMPTY, ACTOR_BYTES_MAX)?;
    let source = fields.string("source", Text::NON_EMPTY, SOURCE_BYTES_MAX)?;
    fields.object("metadata")?;
    fields.object("refs")?;
    let idempotency_key = fields.string(
        "idempotency_key",
        Text::NON_EMPTY,
        IDEMPOTENCY_KEY_BYTES_MAX,
    )?;
    let expected_seq = fields.integer("expected_seq", 0)?;
    let producer_id = fields.string("producer_id", Text::NON_EMPTY, PRODUCER_ID_BYTES_MAX)?;
    let producer_seq = fields.integer("producer_seq", 1)?;
    let producer = match (producer_id, producer_seq) {
        (Some(id), Some(seq)) => Some((id, seq)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(fields.error("producer_seq", "`producer_id` needs `producer_seq`"))
        }
        (None, Some(_)) => {
            return Err(fields.error("producer_id", "`producer_seq` needs `producer_id`"))
        }
    };
    let digest = append_digest(&members);
    // Stored values keep their text exactly as received, less whitespace.
    let raw =
        json::raw_members(body).map_err(|e| FieldError::new(INVALID_JSON, None, e.message))?;
    let text = |name: &str| match raw.get(name) {
        Some(value) if value.get() != "null" => Some(json::minify(value.get())),
        _ => None,
    };
    Ok(NewEvent {
        event_type,
        payload: text("payload").expect("payload was validated"),
        actor,
        source,
        metadata: text("metadata").unwrap_or_else(|| "{}".to_string()),
        refs: text("refs").unwrap_or_else(|| "{}".to_string()),
        idempotency_key,
        expected_seq,
        producer,
        digest,
    })
}

/// The "same content" digest of a validated append body: type, payload, actor, source,
/// metadata, refs, producer_id, producer_seq, with absent metadata/refs as `{}` and
/// absent strings as null.
fn append_digest(members: &Map<String, Value>) -> Digest {
    const CONTENT: [&str; 8] = [
        "type",
        "payload",
        "actor",
        "source",
        "metadata",
        "refs",
        "producer_id",
        "producer_seq",
    ];
    let null = Value::Null;
    let empty_object = Value::Object(Map::new());
    let content: Vec<(&str, &Value)> = CONTENT
        .iter()
        .map(|&name| {
            let value = match (name, members.get(name)) {
                ("metadata" | "refs", None | Some(Value::Null)) => &empty_object,
                (_, Some(value)) => value,
                (_, None) => &null,
            };
            (name, value)
        })
        .collect();
    json::object_digest(&content)
}

/// Validates the body of `POST /v1/sessions`.
pub fn validate_create(body: &[u8]) -> Result<NewSession, FieldError> {
    let members = parse_object(body, INVALID_SESSION, &CREATE_FIELDS)?;
    let fields = Fields {
        members: &members,
        code: INVALID_SESSION,
    };
    let id = fields.string("id", Text::NON_EMPTY, SESSION_ID_BYTES_MAX)?;
    if let Some(id) = &id {
        if !valid_session_id(id) {
            return Err(fields.error(
                "id",
                "`id` may contain only A-Z a-z 0-9 _ - . : and must not be `.` or `..`",
            ));
        }
    }
    let title = fields.string("title", Text::MAY_BE_EMPTY, TITLE_BYTES_MAX)?;
    let metadata = match session_metadata(&members)? {
        // Stored as received less whitespace, like event values (numbers as written).
        Some(_) => {
            let raw = json::raw_members(body)
                .map_err(|e| FieldError::new(INVALID_JSON, None, e.message))?;
            let text = json::minify(raw["metadata"].get());
            check_metadata_bytes(text)?
        }
        None => "{}".to_string(),
    };
    Ok(NewSession {
        id,
        title,
        metadata,
    })
}

/// Validates the body of `PATCH /v1/sessions/:id`.
pub fn validate_patch(body: &[u8]) -> Result<PatchRequest, FieldError> {
    let members = parse_object(body, INVALID_SESSION, &PATCH_FIELDS)?;
    let fields = Fields {
        members: &members,
        code: INVALID_SESSION,
    };
    let title = match members.get("title") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(_) => fields
            .string("title", Text::MAY_BE_EMPTY, TITLE_BYTES_MAX)?
            .map(Some),
    };
    let metadata = session_metadata(&members)?.cloned();
    let expected_version = fields.integer("expected_version", 1)?;
    if title.is_none() && metadata.is_none() {
        return Err(FieldError::new(
            INVALID_SESSION,
            None,
            "a patch needs `title` or `metadata`",
        ));
    }
    Ok(PatchRequest {
        title,
        metadata,
        expected_version,
    })
}

/// The session id rule (API.md): 1–128 bytes of `A-Z a-z 0-9 _ - . :`, not `.` or `..`.
/// URL ids that break it are simply not found.
pub fn valid_session_id(id: &str) -> bool {
    (1..=SESSION_ID_BYTES_MAX).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// `ses_` + the 12 random bytes in unpadded base64url (16 characters).
pub fn generate_session_id(random: [u8; 12]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id = String::with_capacity(20);
    id.push_str("ses_");
    for chunk in random.chunks_exact(3) {
        let bits = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            id.push(char::from(ALPHABET[(bits >> shift & 0x3f) as usize]));
        }
    }
    id
}

/// Metadata of a session body: must be an object (`invalid_metadata` otherwise); null
/// counts as absent.
fn session_metadata(
    members: &Map<String, Value>,
) -> Result<Option<&Map<String, Value>>, FieldError> {
    match members.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(metadata)) => Ok(Some(metadata)),
        Some(_) => Err(FieldError::new(
            INVALID_METADATA,
            Some("metadata"),
            "`metadata` must be a JSON object",
        )),
    }
}

/// Compact text of session metadata, within [`METADATA_BYTES_MAX`].
pub fn checked_metadata_text(metadata: &Map<String, Value>) -> Result<String, FieldError> {
    check_metadata_bytes(json::object_to_compact(metadata))
}

fn check_metadata_bytes(text: String) -> Result<String, FieldError> {
    if text.len() > METADATA_BYTES_MAX {
        return Err(FieldError::new(
            INVALID_SESSION,
            Some("metadata"),
            format!(
                "`metadata` is {} bytes as compact JSON, more than {METADATA_BYTES_MAX}",
                text.len()
            ),
        ));
    }
    Ok(text)
}

/// The body as a JSON object: an empty body is `{}`; a parse failure is `invalid_json`;
/// anything but an object is `code` on field `body`; the first member not in `known`
/// (in received order) is `code` on that member.
fn parse_object(
    body: &[u8],
    code: &'static str,
    known: &[&str],
) -> Result<Map<String, Value>, FieldError> {
    if body
        .iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Ok(Map::new());
    }
    let value = json::parse(body).map_err(|e| FieldError::new(INVALID_JSON, None, e.message))?;
    let Value::Object(members) = value else {
        return Err(FieldError::new(
            code,
            Some("body"),
            "the body must be a JSON object",
        ));
    };
    if let Some(unknown) = members.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(FieldError::new(
            code,
            Some(unknown),
            format!("unknown field `{unknown}` (known: {})", known.join(", ")),
        ));
    }
    Ok(members)
}

/// Whether an empty string is allowed.
#[derive(Clone, Copy)]
struct Text {
    non_empty: bool,
}

impl Text {
    const NON_EMPTY: Text = Text { non_empty: true };
    const MAY_BE_EMPTY: Text = Text { non_empty: false };
}

/// Typed access to the members of a body; every error carries the operation's code.
struct Fields<'a> {
    members: &'a Map<String, Value>,
    code: &'static str,
}

impl<'a> Fields<'a> {
    fn error(&self, field: &str, message: impl Into<String>) -> FieldError {
        FieldError::new(self.code, Some(field), message)
    }

    /// An optional string of at most `bytes_max` UTF-8 bytes; null counts as absent.
    fn string(
        &self,
        name: &str,
        text: Text,
        bytes_max: usize,
    ) -> Result<Option<String>, FieldError> {
        match self.members.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => {
                if text.non_empty && value.is_empty() {
                    return Err(self.error(name, format!("`{name}` must not be empty")));
                }
                if value.len() > bytes_max {
                    return Err(self.error(
                        name,
                        format!("`{name}` is {} bytes, more than {bytes_max}", value.len()),
                    ));
                }
                Ok(Some(value.clone()))
            }
            Some(_) => Err(self.error(name, format!("`{name}` must be a string"))),
        }
    }

    /// An optional JSON object; null counts as absent.
    fn object(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, FieldError> {
        match self.members.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(value)) => Ok(Some(value)),
            Some(_) => Err(self.error(name, format!("`{name}` must be a JSON object"))),
        }
    }

    /// An optional integer literal in `min..=u64::MAX`; null counts as absent.
    fn integer(&self, name: &str, min: u64) -> Result<Option<u64>, FieldError> {
        match self.members.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(number)) => match integer_literal(number) {
                Some(value) if value >= min => Ok(Some(value)),
                _ => Err(self.error(
                    name,
                    format!("`{name}` must be an integer from {min} to {}", u64::MAX),
                )),
            },
            Some(_) => Err(self.error(name, format!("`{name}` must be an integer"))),
        }
    }
}

/// The value of a JSON number written as an integer (no fraction, no exponent) that fits
/// in u64; `-0` is 0.
fn integer_literal(number: &Number) -> Option<u64> {
    let text = number.to_string();
    match text.strip_prefix('-') {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b == b'0') => Some(0),
        Some(_) => None,
        None if text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok(),
        None => None,
    }
}

/// The event object of API.md, members in this order: seq, cursor, type, payload, actor,
/// source, metadata, refs, idempotency_key, producer_id, producer_seq, inserted_at.
/// Stored JSON texts are inserted verbatim.
pub fn render_event(entry: &AppendEntry) -> String {
    let mut out = String::with_capacity(
        160 + entry.event_type.len()
            + entry.payload.len()
            + entry.metadata.len()
            + entry.refs.len(),
    );
    render_event_into(&mut out, entry);
    out
}

/// [`render_event`], appended to `out` (for batch frames and pages).
pub fn render_event_into(out: &mut String, entry: &AppendEntry) {
    use std::fmt::Write as _;
    let seq = entry.seq;
    write!(out, r#"{{"seq":{seq},"cursor":{seq},"type":"#).expect("writing to a String");
    push_json_string(out, &entry.event_type);
    out.push_str(r#","payload":"#);
    out.push_str(&entry.payload);
    out.push_str(r#","actor":"#);
    push_optional_json_string(out, entry.actor.as_deref());
    out.push_str(r#","source":"#);
    push_optional_json_string(out, entry.source.as_deref());
    out.push_str(r#","metadata":"#);
    out.push_str(&entry.metadata);
    out.push_str(r#","refs":"#);
    out.push_str(&entry.refs);
    out.push_str(r#","idempotency_key":"#);
    push_optional_json_string(out, entry.idempotency_key.as_deref());
    out.push_str(r#","producer_id":"#);
    push_optional_json_string(out, entry.producer_id.as_deref());
    match entry.producer_seq {
        Some(producer_seq) => write!(out, r#","producer_seq":{producer_seq}"#),
        None => write!(out, r#","producer_seq":null"#),
    }
    .expect("writing to a String");
    out.push_str(r#","inserted_at":""#);
    out.push_str(&crate::time::format_rfc3339_us(entry.inserted_at_us));
    out.push_str("\"}");
}

/// Appends `text` as a JSON string literal.
pub fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::to_string(text).expect("serialising a str cannot fail"));
}

/// Appends `text` as a JSON string literal, or `null`.
pub fn push_optional_json_string(out: &mut String, text: Option<&str>) {
    match text {
        Some(text) => push_json_string(out, text),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod metadata_text_tests {
    use super::*;

    #[test]
    fn create_metadata_is_stored_as_written_less_whitespace() {
        let new = validate_create(br#"{"metadata": {"b": 1E2, "a": [1.50, "\u00e9"]}}"#).unwrap();
        assert_eq!(new.metadata, r#"{"b":1E2,"a":[1.50,"\u00e9"]}"#);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(body: &str) -> Result<NewEvent, FieldError> {
        validate_append(body.as_bytes())
    }

    fn append_error(body: &str) -> (&'static str, Option<String>) {
        let error = append(body).expect_err(body);
        (error.code, error.field)
    }

    fn event_error(field: &str) -> (&'static str, Option<String>) {
        (INVALID_EVENT, Some(field.to_string()))
    }

    fn create_error(body: &str) -> (&'static str, Option<String>) {
        let error = validate_create(body.as_bytes()).expect_err(body);
        (error.code, error.field)
    }

    fn patch_error(body: &str) -> (&'static str, Option<String>) {
        let error = validate_patch(body.as_bytes()).expect_err(body);
        (error.code, error.field)
    }

    fn session_error(field: &str) -> (&'static str, Option<String>) {
        (INVALID_SESSION, Some(field.to_string()))
    }

    #[test]
    fn append_minimal_body() {
        let event = append(r#"{"type":"note","payload":{"b":1, "a":[1.50]}}"#).unwrap();
        assert_eq!(event.event_type, "note");
        assert_eq!(event.payload, r#"{"b":1,"a":[1.50]}"#);
        assert_eq!(event.metadata, "{}");
        assert_eq!(event.refs, "{}");
        assert_eq!(
            (
                event.actor,
                event.source,
                event.idempotency_key,
                event.expected_seq,
                event.producer
            ),
            (None, None, None, None, None)
        );
    }

    #[test]
    fn append_full_body() {
        let event = append(
            r#"{"type":"t","payload":"p","actor":"agent:drafter","source":"s","metadata":{"m":1},
               "refs":{"r":[]},"idempotency_key":"k","expected_seq":0,"producer_id":"w","producer_seq":7}"#,
        )
        .unwrap();
        assert_eq!(event.actor.as_deref(), Some("agent:drafter"));
        assert_eq!(event.source.as_deref(), Some("s"));
        assert_eq!(event.metadata, r#"{"m":1}"#);
        assert_eq!(event.refs, r#"{"r":[]}"#);
        assert_eq!(event.idempotency_key.as_deref(), Some("k"));
        assert_eq!(event.expected_seq, Some(0));
        assert_eq!(event.producer, Some(("w".to_string(), 7)));
    }

    #[test]
    fn invalid_json_comes_first() {
        assert_eq!(append_error("{"), (INVALID_JSON, None));
        assert_eq!(
            validate_append(b"{\"type\":\"\xff\",\"x\":1}")
                .unwrap_err()
                .code,
            INVALID_JSON
        );
        let deep = format!(
            r#"{{"x":1,"payload":{}{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert_eq!(append_error(&deep), (INVALID_JSON, None));
    }

    #[test]
    fn depth_64_ok_65_rejected() {
        // The body object is level 1, so the payload may nest 63 more levels.
        let ok = format!(
            r#"{{"type":"t","payload":{}{}}}"#,
            "[".repeat(63),
            "]".repeat(63)
        );
        assert!(append(&ok).is_ok());
        let deep = format!(
            r#"{{"type":"t","payload":{}{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert_eq!(append_error(&deep), (INVALID_JSON, None));
    }

    #[test]
    fn body_must_be_an_object() {
        assert_eq!(append_error("[]"), event_error("body"));
        assert_eq!(append_error("null"), event_error("body"));
        assert_eq!(create_error("\"x\""), session_error("body"));
        assert_eq!(patch_error("1"), session_error("body"));
    }

    #[test]
    fn empty_body_counts_as_empty_object() {
        assert_eq!(append_error(""), event_error("type"));
        assert_eq!(append_error(" \r\n\t"), event_error("type"));
        let session = validate_create(b"").unwrap();
        assert_eq!(
            session,
            NewSession {
                id: None,
                title: None,
                metadata: "{}".into()
            }
        );
        assert_eq!(validate_create(b"  \n").unwrap(), session);
        assert_eq!(validate_create(b"{}").unwrap(), session);
        assert_eq!(patch_error(""), (INVALID_SESSION, None));
    }

    #[test]
    fn unknown_field_idempotency_key_camel_case_rejected() {
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"idempotencyKey":"k"}"#),
            event_error("idempotencyKey")
        );
    }

    #[test]
    fn unknown_fields_checked_first_in_received_order() {
        assert_eq!(
            append_error(r#"{"type":5,"zz":1,"aa":2}"#),
            event_error("zz")
        );
        assert_eq!(
            create_error(r#"{"id":"..","name":"x"}"#),
            session_error("name")
        );
        assert_eq!(patch_error(r#"{"version":1}"#), session_error("version"));
    }

    #[test]
    fn known_fields_checked_in_table_order() {
        assert_eq!(
            append_error(r#"{"producer_seq":0,"type":""}"#),
            event_error("type")
        );
        assert_eq!(
            append_error(r#"{"refs":1,"payload":null,"type":"t"}"#),
            event_error("payload")
        );
        assert_eq!(
            append_error(r#"{"expected_seq":-1,"idempotency_key":"","type":"t","payload":1}"#),
            event_error("idempotency_key")
        );
    }

    #[test]
    fn type_is_required_non_empty_string_up_to_128_bytes() {
        assert_eq!(append_error(r#"{"payload":1}"#), event_error("type"));
        assert_eq!(
            append_error(r#"{"type":null,"payload":1}"#),
            event_error("type")
        );
        assert_eq!(
            append_error(r#"{"type":"","payload":1}"#),
            event_error("type")
        );
        assert_eq!(
            append_error(r#"{"type":7,"payload":1}"#),
            event_error("type")
        );
        // 64 two-byte characters are 128 bytes; one more is 130.
        assert!(append(&format!(r#"{{"type":"{}","payload":1}}"#, "é".repeat(64))).is_ok());
        assert_eq!(
            append_error(&format!(r#"{{"type":"{}","payload":1}}"#, "é".repeat(65))),
            event_error("type")
        );
        // Limits count bytes after unescaping: 65 escaped `\u00e9` are 390 bytes of body
        // text but 130 bytes of value; 128 escaped `\n` are 256 bytes of text, 128 of value.
        assert_eq!(
            append_error(&format!(
                r#"{{"type":"{}","payload":1}}"#,
                r"\u00e9".repeat(65)
            )),
            event_error("type")
        );
        assert!(append(&format!(
            r#"{{"type":"{}","payload":1}}"#,
            r"\n".repeat(128)
        ))
        .is_ok());
    }

    #[test]
    fn payload_is_required_and_not_null() {
        assert_eq!(append_error(r#"{"type":"t"}"#), event_error("payload"));
        assert_eq!(
            append_error(r#"{"type":"t","payload":null}"#),
            event_error("payload")
        );
        for payload in ["0", "false", "\"\"", "[]", "{}", "-1.5e-3"] {
            let event = append(&format!(r#"{{"type":"t","payload":{payload}}}"#)).unwrap();
            assert_eq!(
                event.payload,
                json::to_compact(&json::parse(payload.as_bytes()).unwrap())
            );
        }
    }

    #[test]
    fn actor_is_an_optional_string_up_to_256_bytes() {
        assert_eq!(
            append(r#"{"type":"t","payload":1,"actor":null}"#)
                .unwrap()
                .actor,
            None
        );
        assert_eq!(
            append(r#"{"type":"t","payload":1,"actor":""}"#)
                .unwrap()
                .actor
                .as_deref(),
            Some("")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"actor":1}"#),
            event_error("actor")
        );
        // "€" is 3 bytes: 85 of them are 255 bytes, 86 are 258.
        let ok = format!(
            r#"{{"type":"t","payload":1,"actor":"a{}"}}"#,
            "€".repeat(85)
        );
        assert!(append(&ok).is_ok());
        let long = format!(r#"{{"type":"t","payload":1,"actor":"{}"}}"#, "€".repeat(86));
        assert_eq!(append_error(&long), event_error("actor"));
    }

    #[test]
    fn source_is_an_optional_non_empty_string_up_to_256_bytes() {
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"source":""}"#),
            event_error("source")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"source":[]}"#),
            event_error("source")
        );
        // "😀" is 4 bytes: 64 of them are 256 bytes.
        let ok = format!(
            r#"{{"type":"t","payload":1,"source":"{}"}}"#,
            "😀".repeat(64)
        );
        assert!(append(&ok).is_ok());
        let long = format!(
            r#"{{"type":"t","payload":1,"source":"{}x"}}"#,
            "😀".repeat(64)
        );
        assert_eq!(append_error(&long), event_error("source"));
    }

    #[test]
    fn metadata_and_refs_are_optional_objects() {
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"metadata":[]}"#),
            event_error("metadata")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"refs":"x"}"#),
            event_error("refs")
        );
        let event = append(r#"{"type":"t","payload":1,"metadata":null,"refs":null}"#).unwrap();
        assert_eq!((event.metadata.as_str(), event.refs.as_str()), ("{}", "{}"));
    }

    #[test]
    fn idempotency_key_is_an_optional_non_empty_string_up_to_256_bytes() {
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"idempotency_key":""}"#),
            event_error("idempotency_key")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"idempotency_key":5}"#),
            event_error("idempotency_key")
        );
        let ok = format!(
            r#"{{"type":"t","payload":1,"idempotency_key":"{}"}}"#,
            "ü".repeat(128)
        );
        assert!(append(&ok).is_ok());
        let long = format!(
            r#"{{"type":"t","payload":1,"idempotency_key":"{}k"}}"#,
            "ü".repeat(128)
        );
        assert_eq!(append_error(&long), event_error("idempotency_key"));
    }

    #[test]
    fn expected_seq_is_an_integer_literal_at_least_0() {
        for ok in ["0", "-0", "18446744073709551615", "42"] {
            let body = format!(r#"{{"type":"t","payload":1,"expected_seq":{ok}}}"#);
            assert!(append(&body).is_ok(), "{ok}");
        }
        for bad in [
            "-1",
            "5.0",
            "1e2",
            "18446744073709551616",
            "\"5\"",
            "true",
            "0.5",
        ] {
            let body = format!(r#"{{"type":"t","payload":1,"expected_seq":{bad}}}"#);
            assert_eq!(append_error(&body), event_error("expected_seq"), "{bad}");
        }
    }

    #[test]
    fn producer_id_and_producer_seq_both_or_neither() {
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"producer_id":"w"}"#),
            event_error("producer_seq")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"producer_seq":1}"#),
            event_error("producer_id")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"producer_id":"w","producer_seq":0}"#),
            event_error("producer_seq")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"producer_id":"","producer_seq":1}"#),
            event_error("producer_id")
        );
        assert_eq!(
            append_error(r#"{"type":"t","payload":1,"producer_id":"w","producer_seq":1.0}"#),
            event_error("producer_seq")
        );
        let long = format!(
            r#"{{"type":"t","payload":1,"producer_id":"{}","producer_seq":1}}"#,
            "ß".repeat(129)
        );
        assert_eq!(append_error(&long), event_error("producer_id"));
    }

    #[test]
    fn same_content_digest_ignores_order_whitespace_numbers_key_and_expected_seq() {
        let a = append(
            r#"{"type":"t","payload":{"x":1,"y":[1.0]},"idempotency_key":"a","expected_seq":3}"#,
        )
        .unwrap();
        let b = append(
            r#"{ "payload" : { "y" : [ 10e-1 ] , "x" : 1 } , "type" : "t", "metadata": {}, "refs": null, "actor": null }"#,
        )
        .unwrap();
        assert_eq!(a.digest, b.digest);
    }

    #[test]
    fn different_content_different_digest() {
        let base = r#"{"type":"t","payload":1}"#;
        let variants = [
            r#"{"type":"u","payload":1}"#,
            r#"{"type":"t","payload":2}"#,
            r#"{"type":"t","payload":"1"}"#,
            r#"{"type":"t","payload":1,"actor":""}"#,
            r#"{"type":"t","payload":1,"source":"s"}"#,
            r#"{"type":"t","payload":1,"metadata":{"a":1}}"#,
            r#"{"type":"t","payload":1,"refs":{"a":1}}"#,
            r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":1}"#,
            r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":2}"#,
        ];
        let mut digests = vec![append(base).unwrap().digest];
        for variant in variants {
            let digest = append(variant).unwrap().digest;
            assert!(!digests.contains(&digest), "{variant}");
            digests.push(digest);
        }
    }

    #[test]
    fn create_accepts_every_field() {
        let session = validate_create(
            br#"{"id":"a-Z_0.9:x","title":"T\u00e9","metadata":{"k":"v","n":1.0}}"#,
        )
        .unwrap();
        assert_eq!(session.id.as_deref(), Some("a-Z_0.9:x"));
        assert_eq!(session.title.as_deref(), Some("Té"));
        assert_eq!(session.metadata, r#"{"k":"v","n":1.0}"#);
        let session = validate_create(br#"{"id":null,"title":null,"metadata":null}"#).unwrap();
        assert_eq!(
            session,
            NewSession {
                id: None,
                title: None,
                metadata: "{}".into()
            }
        );
    }

    #[test]
    fn create_id_rule() {
        for bad in [
            "\"\"", "\".\"", "\"..\"", "\"a/b\"", "\"a b\"", "\"é\"", "1",
        ] {
            assert_eq!(
                create_error(&format!(r#"{{"id":{bad}}}"#)),
                session_error("id"),
                "{bad}"
            );
        }
        let max = "x".repeat(128);
        assert!(validate_create(format!(r#"{{"id":"{max}"}}"#).as_bytes()).is_ok());
        assert_eq!(
            create_error(&format!(r#"{{"id":"{max}y"}}"#)),
            session_error("id")
        );
        assert!(validate_create(br#"{"id":"..."}"#).is_ok());
    }

    #[test]
    fn valid_session_id_rule() {
        assert!(valid_session_id("ses_abc-DEF.1:2"));
        assert!(valid_session_id(&"a".repeat(128)));
        assert!(!valid_session_id(&"a".repeat(129)));
        for bad in ["", ".", "..", "a%2F", "a?b", "ü"] {
            assert!(!valid_session_id(bad), "{bad}");
        }
    }

    #[test]
    fn create_title_up_to_1024_bytes() {
        assert!(
            validate_create(format!(r#"{{"title":"{}"}}"#, "ж".repeat(512)).as_bytes()).is_ok()
        );
        assert_eq!(
            create_error(&format!(r#"{{"title":"{}!"}}"#, "ж".repeat(512))),
            session_error("title")
        );
        assert_eq!(create_error(r#"{"title":{}}"#), session_error("title"));
    }

    #[test]
    fn create_metadata_must_be_an_object_up_to_64_kib() {
        assert_eq!(
            create_error(r#"{"metadata":[]}"#),
            (INVALID_METADATA, Some("metadata".into()))
        );
        assert_eq!(
            create_error(r#"{"metadata":"x"}"#),
            (INVALID_METADATA, Some("metadata".into()))
        );
        // {"k":"…"} is 8 bytes of framing.
        let fits = format!(
            r#"{{"metadata":{{"k":"{}"}}}}"#,
            "a".repeat(METADATA_BYTES_MAX - 8)
        );
        assert!(validate_create(fits.as_bytes()).is_ok());
        let big = format!(
            r#"{{"metadata":{{"k":"{}"}}}}"#,
            "a".repeat(METADATA_BYTES_MAX - 7)
        );
        assert_eq!(create_error(&big), session_error("metadata"));
        // Measured as compact text, not as received: whitespace does not count.
        let spaced = format!(
            r#"{{"metadata":{{ "k" : "{}" }} }}"#,
            "a".repeat(METADATA_BYTES_MAX - 8)
        );
        assert!(validate_create(spaced.as_bytes()).is_ok());
    }

    #[test]
    fn patch_needs_title_or_metadata() {
        assert_eq!(patch_error("{}"), (INVALID_SESSION, None));
        assert_eq!(
            patch_error(r#"{"expected_version":1}"#),
            (INVALID_SESSION, None)
        );
        assert_eq!(patch_error(r#"{"metadata":null}"#), (INVALID_SESSION, None));
    }

    #[test]
    fn patch_title_null_sets_null() {
        let patch = validate_patch(br#"{"title":null}"#).unwrap();
        assert_eq!(patch.title, Some(None));
        let patch = validate_patch(br#"{"title":"x"}"#).unwrap();
        assert_eq!(patch.title, Some(Some("x".into())));
        assert_eq!(patch_error(r#"{"title":1}"#), session_error("title"));
    }

    #[test]
    fn patch_metadata_must_be_an_object() {
        let patch = validate_patch(br#"{"metadata":{"b":null,"a":1}}"#).unwrap();
        let metadata = patch.metadata.unwrap();
        assert_eq!(json::object_to_compact(&metadata), r#"{"b":null,"a":1}"#);
        assert_eq!(
            patch_error(r#"{"metadata":1}"#),
            (INVALID_METADATA, Some("metadata".into()))
        );
    }

    #[test]
    fn patch_expected_version_is_an_integer_at_least_1() {
        let patch = validate_patch(br#"{"title":"x","expected_version":3}"#).unwrap();
        assert_eq!(patch.expected_version, Some(3));
        for bad in ["0", "-1", "1.0", "\"1\""] {
            let body = format!(r#"{{"title":"x","expected_version":{bad}}}"#);
            assert_eq!(
                patch_error(&body),
                session_error("expected_version"),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_session_ids_are_ses_and_16_base64url_chars() {
        assert_eq!(generate_session_id([0; 12]), "ses_AAAAAAAAAAAAAAAA");
        assert_eq!(generate_session_id([0xff; 12]), "ses_________________");
        assert_eq!(
            generate_session_id(*b"hello world!"),
            "ses_aGVsbG8gd29ybGQh" // base64 of "hello world!"
        );
        assert_eq!(generate_session_id([0xfb; 12]), "ses_-_v7-_v7-_v7-_v7");
        assert!(valid_session_id(&generate_session_id([0x5a; 12])));
    }

    fn sample_entry() -> AppendEntry {
        AppendEntry {
            session_id: "s".into(),
            seq: 7,
            inserted_at_us: 1_795_756_801_123_456,
            event_type: "quote\"back\\slash\nnewline\u{1}é".into(),
            payload: r#"{"z":1.50,"a":[1e+2]}"#.into(),
            actor: Some("agent:drafter".into()),
            source: None,
            metadata: "{}".into(),
            refs: r#"{"r":"x"}"#.into(),
            idempotency_key: Some("k".into()),
            producer_id: None,
            producer_seq: None,
            digest: [0; 16],
        }
    }

    #[test]
    fn render_event_member_order_and_values() {
        let text = render_event(&sample_entry());
        assert_eq!(
            text,
            concat!(
                r#"{"seq":7,"cursor":7,"type":"quote\"back\\slash\nnewline\u0001é","#,
                r#""payload":{"z":1.50,"a":[1e+2]},"actor":"agent:drafter","source":null,"#,
                r#""metadata":{},"refs":{"r":"x"},"idempotency_key":"k","producer_id":null,"#,
                r#""producer_seq":null,"inserted_at":"2026-11-27T05:20:01.123456Z"}"#
            )
        );
        let parsed = json::parse(text.as_bytes()).unwrap();
        let keys: Vec<&str> = parsed
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "seq",
                "cursor",
                "type",
                "payload",
                "actor",
                "source",
                "metadata",
                "refs",
                "idempotency_key",
                "producer_id",
                "producer_seq",
                "inserted_at"
            ]
        );
        assert_eq!(parsed["type"], sample_entry().event_type.as_str());
    }

    #[test]
    fn render_event_with_producer() {
        let mut entry = sample_entry();
        entry.producer_id = Some("w\u{2028}".into());
        entry.producer_seq = Some(u64::MAX);
        let parsed = json::parse(render_event(&entry).as_bytes()).unwrap();
        assert_eq!(parsed["producer_id"], "w\u{2028}");
        assert_eq!(parsed["producer_seq"].to_string(), u64::MAX.to_string());
    }
}
