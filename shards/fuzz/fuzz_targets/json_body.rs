//! Request bodies (`shards/src/json.rs`, `shards/src/validate.rs`): the bytes of a POST
//! or PATCH body through the JSON parser and the three validators, with the properties
//! the API promises about what they accept:
//!
//! - an accepted body is re-validated to the same result from its compact form (the
//!   dedupe digest ignores whitespace, key order and number spelling);
//! - stored texts (payload, metadata, refs) are valid JSON of the right kind;
//! - every error carries one of the validators' codes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use shards::json;
use shards::validate::{
    self, valid_session_id, FieldError, ACTOR_BYTES_MAX, EVENT_TYPE_BYTES_MAX,
    IDEMPOTENCY_KEY_BYTES_MAX, METADATA_BYTES_MAX, TITLE_BYTES_MAX,
};

fuzz_target!(|body: &[u8]| {
    let compact = match json::parse(body) {
        Ok(value) => {
            assert!(json::depth(&value) <= json::MAX_DEPTH);
            let compact = json::to_compact(&value);
            let again = json::parse(compact.as_bytes()).expect("compact text parses");
            assert_eq!(json::content_digest(&value), json::content_digest(&again));
            let minified = json::minify(std::str::from_utf8(body).expect("parsed as UTF-8"));
            let value_of_minified = json::parse(minified.as_bytes()).expect("minified parses");
            assert_eq!(value, value_of_minified, "minify changes only whitespace");
            Some(compact)
        }
        Err(_) => None,
    };
    check_append(body, compact.as_deref());
    check_create(body);
    check_patch(body, compact.as_deref());
});

fn check_code(e: &FieldError) {
    let codes = [
        validate::INVALID_JSON,
        validate::INVALID_EVENT,
        validate::INVALID_SESSION,
        validate::INVALID_METADATA,
    ];
    assert!(codes.contains(&e.code), "{e:?}");
}

fn parse_stored(text: &str) -> Value {
    json::parse(text.as_bytes()).unwrap_or_else(|e| panic!("stored text {text:?}: {e}"))
}

fn check_append(body: &[u8], compact: Option<&str>) {
    let event = match validate::validate_append(body) {
        Ok(event) => event,
        Err(e) => return check_code(&e),
    };
    assert!(!event.event_type.is_empty() && event.event_type.len() <= EVENT_TYPE_BYTES_MAX);
    assert!(event
        .actor
        .as_ref()
        .is_none_or(|a| a.len() <= ACTOR_BYTES_MAX));
    assert!(event
        .idempotency_key
        .as_ref()
        .is_none_or(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_BYTES_MAX));
    assert_ne!(parse_stored(&event.payload), Value::Null);
    assert!(parse_stored(&event.metadata).is_object());
    assert!(parse_stored(&event.refs).is_object());
    if let Some(compact) = compact {
        let again = validate::validate_append(compact.as_bytes())
            .unwrap_or_else(|e| panic!("compact form {compact:?} refused: {e:?}"));
        assert_eq!(again.digest, event.digest, "{compact}");
        assert_eq!(
            (&again.event_type, &again.expected_seq, &again.producer),
            (&event.event_type, &event.expected_seq, &event.producer)
        );
        assert_eq!(
            json::content_digest(&parse_stored(&again.payload)),
            json::content_digest(&parse_stored(&event.payload))
        );
    }
}

fn check_create(body: &[u8]) {
    let session = match validate::validate_create(body) {
        Ok(session) => session,
        Err(e) => return check_code(&e),
    };
    assert!(session.id.as_deref().is_none_or(valid_session_id));
    assert!(session
        .title
        .as_ref()
        .is_none_or(|t| t.len() <= TITLE_BYTES_MAX));
    assert!(session.metadata.len() <= METADATA_BYTES_MAX);
    assert!(parse_stored(&session.metadata).is_object());
}

fn check_patch(body: &[u8], compact: Option<&str>) {
    let patch = match validate::validate_patch(body) {
        Ok(patch) => patch,
        Err(e) => return check_code(&e),
    };
    assert!(patch.title.is_some() || patch.metadata.is_some());
    if let Some(metadata) = &patch.metadata {
        let _ = validate::checked_metadata_text(metadata);
    }
    if let Some(compact) = compact {
        let again = validate::validate_patch(compact.as_bytes())
            .unwrap_or_else(|e| panic!("compact form {compact:?} refused: {e:?}"));
        assert_eq!(again, patch);
    }
}
