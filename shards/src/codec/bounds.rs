//! The largest log record a client request can produce, computed from the record
//! encoding itself, so that start-up can refuse a body limit the log cannot store
//! (a record above [`RECORD_BYTES_MAX`] or above what one segment holds would otherwise
//! stop the committer on the first large request).

use rkyv::rancor::Error;

use super::record::frame_bytes;
use super::{BATCH_HEADER_BYTES, BLOCK_BYTES, RECORD_ALIGN_BYTES, RECORD_BYTES_MAX};
use crate::entry::{AppendEntry, ArchivedAppendEntry, Command, LogRecord};
use crate::validate::SESSION_ID_BYTES_MAX;

/// Events of the largest batch append (API.md v1.1: `events` holds 1–1,000 events).
pub const BATCH_EVENTS_MAX: usize = 1_000;

/// Text the server adds to an event that its body did not carry: `{}` for an absent
/// `metadata` and an absent `refs`.
const DEFAULT_TEXT_BYTES: usize = 4;

/// Room for what a batch entry wraps its events in (a vector header, a batch-level
/// idempotency key and producer are body bytes already) and for rkyv's alignment
/// padding between its parts.
const BATCH_WRAPPER_BYTES: usize = 256;

/// Alignment padding rkyv may place between one event's out-of-line strings and the
/// next aligned value, at most.
const EVENT_PADDING_BYTES: usize = 16;

/// The largest rkyv encoding of the log record an append of `events` events (1 for a
/// single append, up to [`BATCH_EVENTS_MAX`] for a batch) can produce from a body of at
/// most `body_bytes` bytes.
///
/// Every text value of an event comes from the body and is stored no longer than it was
/// sent (JSON values are minified as written; strings are stored unescaped), so all
/// events together store at most `body_bytes` bytes of text. On top of that, each event
/// costs its fixed archived size and the fields the server adds: the session id (counted
/// per event, at its maximum length), seq, `inserted_at`, the content digest, and `{}`
/// for absent `metadata`/`refs`. The record's own fields (group, term, index, command
/// tag) are measured by encoding a probe record.
pub fn append_record_bytes_max(body_bytes: usize, events: usize) -> usize {
    assert!(
        (1..=BATCH_EVENTS_MAX).contains(&events),
        "an append holds 1..={BATCH_EVENTS_MAX} events, not {events}"
    );
    let record_fixed = probe_record_bytes();
    let per_event = std::mem::size_of::<ArchivedAppendEntry>()
        + SESSION_ID_BYTES_MAX
        + DEFAULT_TEXT_BYTES
        + EVENT_PADDING_BYTES;
    let batch_wrapper = if events > 1 { BATCH_WRAPPER_BYTES } else { 0 };
    record_fixed + per_event * events + batch_wrapper + body_bytes
}

/// The largest body whose append of `events` events stays within `record_bytes`
/// (0 when not even an empty body does).
pub fn append_body_bytes_max(record_bytes: usize, events: usize) -> usize {
    record_bytes.saturating_sub(append_record_bytes_max(0, events))
}

/// Bytes a batch holding only a record of `record_bytes` rkyv bytes takes in a
/// segment: batch header, record frame, and padding to the next block.
pub fn single_record_batch_bytes(record_bytes: usize) -> usize {
    (BATCH_HEADER_BYTES + frame_bytes(record_bytes)).next_multiple_of(BLOCK_BYTES)
}

/// The largest record (rkyv bytes) the log stores in a segment of `segment_bytes`:
/// [`RECORD_BYTES_MAX`], or less when a segment cannot hold that in one batch.
pub fn record_bytes_max_in(segment_bytes: u64) -> usize {
    let room = usize::try_from(segment_bytes)
        .unwrap_or(usize::MAX)
        .saturating_sub(BATCH_HEADER_BYTES + super::RECORD_HEADER_BYTES);
    (room - room % RECORD_ALIGN_BYTES).min(RECORD_BYTES_MAX)
}

/// The encoded size of an append record whose text fields are all empty (so stored
/// inline) and whose optional fields are all present: the fixed part of every append.
fn probe_record_bytes() -> usize {
    let probe = LogRecord {
        group: u16::MAX,
        term: u64::MAX,
        index: u64::MAX,
        command: Command::Append(AppendEntry {
            session_id: String::new(),
            seq: u64::MAX,
            inserted_at_us: i64::MAX,
            event_type: String::new(),
            payload: String::new(),
            actor: Some(String::new()),
            source: Some(String::new()),
            metadata: String::new(),
            refs: String::new(),
            idempotency_key: Some(String::new()),
            producer_id: Some(String::new()),
            producer_seq: Some(u64::MAX),
            digest: [0xff; 16],
        }),
    };
    match rkyv::to_bytes::<Error>(&probe) {
        Ok(bytes) => bytes.len(),
        Err(e) => panic!("rkyv serialization of the probe record failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::record::serialize;

    /// An event whose text fields have the lengths in `parts` (the session id is
    /// server-side and always at its maximum).
    fn event(seq: u64, parts: [usize; 9]) -> AppendEntry {
        let s = |n: usize| "x".repeat(n);
        AppendEntry {
            session_id: s(SESSION_ID_BYTES_MAX),
            seq,
            inserted_at_us: i64::MAX,
            event_type: s(parts[0]),
            payload: s(parts[1]),
            actor: Some(s(parts[2])),
            source: Some(s(parts[3])),
            metadata: s(parts[4].max(2)),
            refs: s(parts[5].max(2)),
            idempotency_key: Some(s(parts[6])),
            producer_id: Some(s(parts[7])),
            producer_seq: Some(u64::MAX - parts[8] as u64),
            digest: [7; 16],
        }
    }

    /// Text bytes of an event that its body carried (all but the session id).
    fn text_bytes(e: &AppendEntry) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        e.event_type.len()
            + e.payload.len()
            + opt(&e.actor)
            + opt(&e.source)
            + e.metadata.len()
            + e.refs.len()
            + opt(&e.idempotency_key)
            + opt(&e.producer_id)
    }

    fn record(event: AppendEntry) -> LogRecord {
        LogRecord {
            group: 255,
            term: u64::MAX,
            index: u64::MAX,
            command: Command::Append(event),
        }
    }

    #[test]
    fn a_single_append_never_encodes_larger_than_the_bound() {
        // Body bytes spread over the fields in ways that stress rkyv's inline strings
        // (≤ 8 bytes) and alignment padding.
        let splits: [[usize; 9]; 6] = [
            [1, 1 << 20, 0, 0, 2, 2, 0, 0, 0],
            [128, 1000, 256, 256, 9, 9, 256, 256, 1],
            [9, 9, 9, 9, 9, 9, 9, 9, 9],
            [8, 8, 8, 8, 8, 8, 8, 8, 8],
            [7, 13, 1, 3, 5, 11, 15, 17, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0],
        ];
        for split in splits {
            let event = event(1, split);
            let text = text_bytes(&event);
            let encoded = serialize(&record(event)).len();
            let bound = append_record_bytes_max(text, 1);
            assert!(encoded <= bound, "{split:?}: {encoded} > {bound}");
        }
    }

    #[test]
    fn a_batch_of_the_most_events_stays_within_the_bound() {
        // No batch entry exists yet: its events are modelled as a vector of full
        // append entries in one record, each with every server-added field.
        #[derive(rkyv::Archive, rkyv::Serialize)]
        struct Batch {
            record: LogRecord,
            events: Vec<AppendEntry>,
        }
        let events: Vec<AppendEntry> = (0..BATCH_EVENTS_MAX as u64)
            .map(|i| event(i, [9, 100 + (i as usize % 7), 9, 9, 2, 2, 0, 0, 0]))
            .collect();
        let text: usize = events.iter().map(text_bytes).sum();
        let batch = Batch {
            record: record(event(0, [0; 9])),
            events,
        };
        let encoded = rkyv::to_bytes::<Error>(&batch).unwrap().len();
        let bound = append_record_bytes_max(text, BATCH_EVENTS_MAX);
        assert!(encoded <= bound, "{encoded} > {bound}");
    }

    #[test]
    fn body_and_segment_limits_invert_the_bound() {
        let record = record_bytes_max_in(1 << 20);
        assert_eq!(single_record_batch_bytes(record), 1 << 20);
        assert!(single_record_batch_bytes(record + 1) > 1 << 20);
        let body = append_body_bytes_max(record, BATCH_EVENTS_MAX);
        assert_eq!(append_record_bytes_max(body, BATCH_EVENTS_MAX), record);
        assert!(append_record_bytes_max(body + 1, BATCH_EVENTS_MAX) > record);
        assert_eq!(record_bytes_max_in(64 << 20), RECORD_BYTES_MAX);
    }
}
