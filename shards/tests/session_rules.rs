//! The session rules of API.md, one test per rule, against the pure state machine.

use proptest::prelude::*;
use shards::entry::Command;
use shards::session::{
    metadata_matches, render_session, AppendDecision, AppendError, CreateError, GroupState, Limits,
    NotFound, PatchError,
};
use shards::validate::{
    validate_append, validate_create, validate_patch, NewEvent, INVALID_SESSION,
};

const T0: i64 = 1_795_756_801_000_000;

fn event(body: &str) -> NewEvent {
    validate_append(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"))
}

/// A leader and its state: decide, apply (propose), commit.
struct Leader {
    state: GroupState,
}

impl Leader {
    fn new() -> Leader {
        Leader::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Leader {
        let mut leader = Leader {
            state: GroupState::new(limits),
        };
        leader.create("s");
        leader
    }

    fn propose_and_commit(&mut self, command: &Command) {
        self.state.apply(command);
        self.state.commit(command);
    }

    fn create(&mut self, id: &str) {
        let new = validate_create(b"{}").unwrap();
        let command = self.state.decide_create(&new, id.to_string(), T0).unwrap();
        self.propose_and_commit(&command);
    }

    /// Decides an append at `now_us`; an accepted append is proposed and committed.
    fn append_at(&mut self, body: &str, now_us: i64) -> Result<(u64, bool), AppendError> {
        match self.state.decide_append("s", &event(body), now_us)? {
            AppendDecision::Append(command) => {
                let Command::Append(entry) = &command else {
                    panic!("{command:?}")
                };
                let seq = entry.seq;
                self.propose_and_commit(&command);
                Ok((seq, false))
            }
            AppendDecision::Deduped { seq } => Ok((seq, true)),
        }
    }

    fn append(&mut self, body: &str) -> Result<(u64, bool), AppendError> {
        self.append_at(body, T0)
    }

    fn last_seq(&self) -> u64 {
        self.state.committed_seq("s").unwrap()
    }
}

fn appended(seq: u64) -> Result<(u64, bool), AppendError> {
    Ok((seq, false))
}

fn deduped(seq: u64) -> Result<(u64, bool), AppendError> {
    Ok((seq, true))
}

// ---- append ----

#[test]
fn append_seq_is_contiguous_from_1() {
    let mut leader = Leader::new();
    for seq in 1..=5 {
        assert_eq!(leader.append(r#"{"type":"t","payload":{}}"#), appended(seq));
    }
    assert_eq!(leader.last_seq(), 5);
}

#[test]
fn append_to_unknown_session_is_not_found() {
    let leader = Leader::new();
    let result = leader
        .state
        .decide_append("nope", &event(r#"{"type":"t","payload":1}"#), T0);
    assert_eq!(result, Err(AppendError::SessionNotFound));
}

#[test]
fn append_entry_carries_the_event_and_its_digest() {
    let leader = Leader::new();
    let new = event(
        r#"{"type":"t","payload":[1],"actor":"a","source":"src","metadata":{"m":1},"refs":{"r":2},"idempotency_key":"k","producer_id":"p","producer_seq":3}"#,
    );
    let AppendDecision::Append(Command::Append(entry)) =
        leader.state.decide_append("s", &new, T0 + 5).unwrap()
    else {
        panic!("not an append")
    };
    assert_eq!(
        (entry.session_id.as_str(), entry.seq, entry.inserted_at_us),
        ("s", 1, T0 + 5)
    );
    assert_eq!(
        (entry.event_type.as_str(), entry.payload.as_str()),
        ("t", "[1]")
    );
    assert_eq!(
        (entry.actor.as_deref(), entry.source.as_deref()),
        (Some("a"), Some("src"))
    );
    assert_eq!(
        (entry.metadata.as_str(), entry.refs.as_str()),
        (r#"{"m":1}"#, r#"{"r":2}"#)
    );
    assert_eq!(entry.idempotency_key.as_deref(), Some("k"));
    assert_eq!(
        (entry.producer_id.as_deref(), entry.producer_seq),
        (Some("p"), Some(3))
    );
    assert_eq!(entry.digest, new.digest);
}

#[test]
fn dedupe_same_key_same_content_returns_original_seq() {
    let mut leader = Leader::new();
    leader.append(r#"{"type":"t","payload":0}"#).unwrap();
    let body = r#"{"type":"t","payload":{"a":1,"b":2},"idempotency_key":"k"}"#;
    assert_eq!(leader.append(body), appended(2));
    leader.append(r#"{"type":"t","payload":0}"#).unwrap();
    // Same content spelled differently: member order, whitespace, number form.
    let again = r#"{ "idempotency_key":"k", "payload":{"b":2.0,"a":1}, "type":"t" }"#;
    assert_eq!(leader.append(again), deduped(2));
    assert_eq!(leader.last_seq(), 3, "nothing appended");
}

#[test]
fn dedupe_same_key_different_content_conflicts_with_original_seq() {
    let mut leader = Leader::new();
    leader
        .append(r#"{"type":"t","payload":1,"idempotency_key":"k"}"#)
        .unwrap();
    assert_eq!(
        leader.append(r#"{"type":"t","payload":2,"idempotency_key":"k"}"#),
        Err(AppendError::IdempotencyConflict { seq: 1 })
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"k","actor":"x"}"#),
        Err(AppendError::IdempotencyConflict { seq: 1 })
    );
}

#[test]
fn dedupe_ignores_expected_seq_and_key_is_not_content() {
    let mut leader = Leader::new();
    leader
        .append(r#"{"type":"t","payload":1,"idempotency_key":"a","expected_seq":0}"#)
        .unwrap();
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"a","expected_seq":7}"#),
        deduped(1)
    );
    // Another key with the same content is a new event.
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"b"}"#),
        appended(2)
    );
}

#[test]
fn dedupe_checked_before_expected_seq() {
    let mut leader = Leader::new();
    let body = r#"{"type":"t","payload":1,"idempotency_key":"k","expected_seq":0}"#;
    assert_eq!(leader.append(body), appended(1));
    leader.append(r#"{"type":"t","payload":2}"#).unwrap();
    // The retry's expected_seq no longer holds, but the key decides alone.
    assert_eq!(leader.append(body), deduped(1));
}

#[test]
fn dedupe_key_decides_before_producer() {
    let mut leader = Leader::new();
    let body =
        r#"{"type":"t","payload":1,"idempotency_key":"k","producer_id":"p","producer_seq":1}"#;
    assert_eq!(leader.append(body), appended(1));
    leader
        .append(r#"{"type":"t","payload":2,"producer_id":"p","producer_seq":2}"#)
        .unwrap();
    assert_eq!(leader.append(body), deduped(1));
}

#[test]
fn dedupe_keys_are_per_session() {
    let mut leader = Leader::new();
    leader.create("other");
    leader
        .append(r#"{"type":"t","payload":1,"idempotency_key":"k"}"#)
        .unwrap();
    let new = event(r#"{"type":"t","payload":2,"idempotency_key":"k"}"#);
    let decision = leader.state.decide_append("other", &new, T0).unwrap();
    assert!(matches!(decision, AppendDecision::Append(_)));
}

#[test]
fn dedupe_sees_entries_still_in_flight() {
    let mut leader = Leader::new();
    let new = event(r#"{"type":"t","payload":1,"idempotency_key":"k"}"#);
    let AppendDecision::Append(command) = leader.state.decide_append("s", &new, T0).unwrap() else {
        panic!()
    };
    leader.state.apply(&command);
    // Retried before the original commits: deduped against the in-flight seq 1, which the
    // shell holds back until committed_seq reaches it.
    assert_eq!(
        leader.state.decide_append("s", &new, T0),
        Ok(AppendDecision::Deduped { seq: 1 })
    );
    assert_eq!(leader.state.committed_seq("s"), Some(0));
    leader.state.commit(&command);
    assert_eq!(leader.state.committed_seq("s"), Some(1));
    assert_eq!(
        leader.state.decide_append("s", &new, T0),
        Ok(AppendDecision::Deduped { seq: 1 })
    );
}

#[test]
fn dedupe_window_evicts_oldest_key() {
    let limits = Limits {
        dedupe_keys_max: 2,
        producers_max: 10,
    };
    let mut leader = Leader::with_limits(limits);
    for key in ["a", "b", "c"] {
        leader
            .append(&format!(
                r#"{{"type":"t","payload":1,"idempotency_key":"{key}"}}"#
            ))
            .unwrap();
    }
    assert_eq!(leader.state.evictions(), 1);
    // "b" and "c" are remembered; "a" was evicted and counts as new.
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"b"}"#),
        deduped(2)
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"c"}"#),
        deduped(3)
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"a"}"#),
        appended(4)
    );
    // Re-adding "a" evicted "b".
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"idempotency_key":"b"}"#),
        appended(5)
    );
    assert_eq!(leader.state.evictions(), 3);
}

// ---- producers ----

#[test]
fn unseen_producer_starts_anywhere() {
    let mut leader = Leader::new();
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":42}"#),
        appended(1)
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"producer_id":"q","producer_seq":1}"#),
        appended(2)
    );
}

#[test]
fn producer_seq_must_continue() {
    let mut leader = Leader::new();
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":5}"#)
        .unwrap();
    for bad in [4, 7, 1, 100] {
        let body = format!(r#"{{"type":"t","payload":1,"producer_id":"p","producer_seq":{bad}}}"#);
        assert_eq!(
            leader.append(&body),
            Err(AppendError::ProducerSeqConflict {
                expected_producer_seq: 6
            }),
            "producer_seq {bad}"
        );
    }
    assert_eq!(
        leader.append(r#"{"type":"t","payload":2,"producer_id":"p","producer_seq":6}"#),
        appended(2)
    );
}

#[test]
fn producer_same_last_same_content_dedupes() {
    let mut leader = Leader::new();
    leader
        .append(r#"{"type":"t","payload":{"x":1},"producer_id":"p","producer_seq":1}"#)
        .unwrap();
    leader.append(r#"{"type":"u","payload":0}"#).unwrap();
    assert_eq!(
        leader.append(r#"{"producer_seq":1,"producer_id":"p","payload":{"x":1.0},"type":"t"}"#),
        deduped(1)
    );
}

#[test]
fn producer_same_last_different_content_conflicts() {
    let mut leader = Leader::new();
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":1}"#)
        .unwrap();
    assert_eq!(
        leader.append(r#"{"type":"t","payload":2,"producer_id":"p","producer_seq":1}"#),
        Err(AppendError::ProducerSeqConflict {
            expected_producer_seq: 2
        })
    );
}

#[test]
fn producer_dedupe_checked_before_expected_seq() {
    let mut leader = Leader::new();
    let body = r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":1,"expected_seq":0}"#;
    leader.append(body).unwrap();
    leader.append(r#"{"type":"t","payload":2}"#).unwrap();
    assert_eq!(leader.append(body), deduped(1));
}

#[test]
fn producer_conflict_checked_before_expected_seq() {
    let mut leader = Leader::new();
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":1}"#)
        .unwrap();
    assert_eq!(
        leader.append(
            r#"{"type":"t","payload":1,"producer_id":"p","producer_seq":3,"expected_seq":9}"#
        ),
        Err(AppendError::ProducerSeqConflict {
            expected_producer_seq: 2
        })
    );
}

#[test]
fn producer_window_evicts_least_recently_appending() {
    let limits = Limits {
        dedupe_keys_max: 10,
        producers_max: 2,
    };
    let mut leader = Leader::with_limits(limits);
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"a","producer_seq":1}"#)
        .unwrap();
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"b","producer_seq":1}"#)
        .unwrap();
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"a","producer_seq":2}"#)
        .unwrap();
    // "c" pushes out "b", the producer that appended least recently.
    leader
        .append(r#"{"type":"t","payload":1,"producer_id":"c","producer_seq":1}"#)
        .unwrap();
    assert_eq!(leader.state.evictions(), 1);
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"producer_id":"a","producer_seq":9}"#),
        Err(AppendError::ProducerSeqConflict {
            expected_producer_seq: 3
        })
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"producer_id":"b","producer_seq":9}"#),
        appended(5),
        "an evicted producer is unseen again"
    );
}

// ---- expected_seq ----

#[test]
fn expected_seq_conflict_reports_both() {
    let mut leader = Leader::new();
    leader.append(r#"{"type":"t","payload":1}"#).unwrap();
    leader.append(r#"{"type":"t","payload":1}"#).unwrap();
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"expected_seq":1}"#),
        Err(AppendError::ExpectedSeqConflict {
            expected_seq: 1,
            current_seq: 2
        })
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"expected_seq":3}"#),
        Err(AppendError::ExpectedSeqConflict {
            expected_seq: 3,
            current_seq: 2
        })
    );
}

#[test]
fn expected_seq_equal_to_last_seq_appends() {
    let mut leader = Leader::new();
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"expected_seq":0}"#),
        appended(1)
    );
    assert_eq!(
        leader.append(r#"{"type":"t","payload":1,"expected_seq":1}"#),
        appended(2)
    );
}

#[test]
fn expected_seq_counts_entries_in_flight() {
    let mut leader = Leader::new();
    let AppendDecision::Append(command) = leader
        .state
        .decide_append("s", &event(r#"{"type":"t","payload":1}"#), T0)
        .unwrap()
    else {
        panic!()
    };
    leader.state.apply(&command);
    assert_eq!(leader.state.last_seq("s"), Some(1));
    assert_eq!(leader.state.committed_seq("s"), Some(0));
    assert_eq!(
        leader.state.decide_append(
            "s",
            &event(r#"{"type":"t","payload":1,"expected_seq":0}"#),
            T0
        ),
        Err(AppendError::ExpectedSeqConflict {
            expected_seq: 0,
            current_seq: 1
        })
    );
}

// ---- inserted_at ----

#[test]
fn inserted_at_never_goes_backwards() {
    let mut leader = Leader::new();
    let mut inserted = Vec::new();
    for now_us in [T0 + 100, T0 + 50, T0 + 200, T0 - 1_000_000] {
        let decision =
            leader
                .state
                .decide_append("s", &event(r#"{"type":"t","payload":1}"#), now_us);
        let Ok(AppendDecision::Append(command)) = decision else {
            panic!()
        };
        let Command::Append(entry) = &command else {
            panic!()
        };
        inserted.push(entry.inserted_at_us);
        leader.propose_and_commit(&command);
    }
    assert_eq!(inserted, [T0 + 100, T0 + 100, T0 + 200, T0 + 200]);
}

// ---- create and reads ----

#[test]
fn uncommitted_session_not_visible() {
    let mut state = GroupState::new(Limits::default());
    let command = state
        .decide_create(&validate_create(b"{}").unwrap(), "x".into(), T0)
        .unwrap();
    state.apply(&command);
    assert!(state.view("x").is_none());
    assert_eq!(state.committed_seq("x"), None);
    assert_eq!(state.views().count(), 0);
    // Decisions already see it: no second create, appends may follow it in the log.
    assert_eq!(state.last_seq("x"), Some(0));
    state.commit(&command);
    let view = state.view("x").unwrap();
    assert_eq!((view.version, view.last_seq, view.archived), (1, 0, false));
    assert_eq!((view.created_at_us, view.updated_at_us), (T0, T0));
}

#[test]
fn create_same_id_again_is_session_exists() {
    let mut state = GroupState::new(Limits::default());
    let new = validate_create(br#"{"title":"a"}"#).unwrap();
    let command = state.decide_create(&new, "x".into(), T0).unwrap();
    state.apply(&command);
    assert_eq!(
        state.decide_create(&new, "x".into(), T0),
        Err(CreateError::SessionExists)
    );
    state.commit(&command);
    assert_eq!(
        state.decide_create(&new, "x".into(), T0),
        Err(CreateError::SessionExists)
    );
}

#[test]
fn create_keeps_title_and_metadata() {
    let mut state = GroupState::new(Limits::default());
    let new = validate_create(br#"{"title":"T","metadata":{"b":1,"a":"x"}}"#).unwrap();
    let command = state.decide_create(&new, "x".into(), T0).unwrap();
    state.apply(&command);
    state.commit(&command);
    let view = state.view("x").unwrap();
    assert_eq!(view.title.as_deref(), Some("T"));
    assert_eq!(view.metadata, r#"{"b":1,"a":"x"}"#);
}

#[test]
fn sessions_listed_in_bytewise_id_order() {
    let mut leader = Leader::new();
    for id in ["b", "B", "a:1", "_", "a", "a.", "0"] {
        leader.create(id);
    }
    let ids: Vec<&str> = leader.state.views().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["0", "B", "_", "a", "a.", "a:1", "b", "s"]);
    let after: Vec<&str> = leader
        .state
        .views_after(Some("a."))
        .map(|v| v.id.as_str())
        .collect();
    assert_eq!(after, ["a:1", "b", "s"]);
    assert_eq!(leader.state.views_after(None).count(), 8);
    assert_eq!(leader.state.views_after(Some("zzz")).count(), 0);
}

#[test]
fn render_session_is_the_api_object() {
    let mut state = GroupState::new(Limits::default());
    let new = validate_create(br#"{"title":"say \"hi\"","metadata":{"k":[1.0]}}"#).unwrap();
    let command = state.decide_create(&new, "x".into(), T0 + 123_456).unwrap();
    state.apply(&command);
    state.commit(&command);
    assert_eq!(
        render_session(state.view("x").unwrap()),
        concat!(
            r#"{"id":"x","title":"say \"hi\"","metadata":{"k":[1.0]},"last_seq":0,"#,
            r#""archived_seq":0,"version":1,"archived":false,"#,
            r#""created_at":"2026-11-27T05:20:01.123456Z","updated_at":"2026-11-27T05:20:01.123456Z"}"#
        )
    );
    let untitled = Leader::new();
    let text = render_session(untitled.state.view("s").unwrap());
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(parsed["title"].is_null());
}

#[test]
fn metadata_filter_matches_top_level_strings() {
    let mut state = GroupState::new(Limits::default());
    let new =
        validate_create(br#"{"metadata":{"user":"42","n":42,"nested":{"user":"7"}}}"#).unwrap();
    let command = state.decide_create(&new, "x".into(), T0).unwrap();
    state.commit(&command);
    let view = state.view("x").unwrap();
    let filter = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        metadata_matches(view, &pairs)
    };
    assert!(filter(&[]));
    assert!(filter(&[("user", "42")]));
    assert!(!filter(&[("user", "7")]));
    assert!(
        !filter(&[("n", "42")]),
        "the number 42 is not the string \"42\""
    );
    assert!(!filter(&[("nested", "7")]));
    assert!(
        !filter(&[("user", "42"), ("missing", "x")]),
        "several filters AND"
    );
}

// ---- patch ----

fn patch(state: &GroupState, body: &str, now_us: i64) -> Result<Command, PatchError> {
    state.decide_patch("s", &validate_patch(body.as_bytes()).unwrap(), now_us)
}

#[test]
fn patch_merge_removes_null_keys() {
    let mut state = GroupState::new(Limits::default());
    let new = validate_create(br#"{"title":"T","metadata":{"a":1,"b":2,"c":3}}"#).unwrap();
    let command = state.decide_create(&new, "s".into(), T0).unwrap();
    state.commit(&command);
    let command = patch(
        &state,
        r#"{"metadata":{"b":null,"a":"x","d":4,"zz":null}}"#,
        T0 + 1,
    )
    .unwrap();
    state.apply(&command);
    state.commit(&command);
    let view = state.view("s").unwrap();
    // "a" replaced in place, "b" removed, "c" kept, "d" appended; title untouched.
    assert_eq!(view.metadata, r#"{"a":"x","c":3,"d":4}"#);
    assert_eq!(view.title.as_deref(), Some("T"));
}

#[test]
fn patch_title_set_and_cleared() {
    let mut leader = Leader::new();
    let command = patch(&leader.state, r#"{"title":"new"}"#, T0 + 1).unwrap();
    leader.propose_and_commit(&command);
    assert_eq!(
        leader.state.view("s").unwrap().title.as_deref(),
        Some("new")
    );
    let command = patch(&leader.state, r#"{"title":null}"#, T0 + 2).unwrap();
    leader.propose_and_commit(&command);
    assert_eq!(leader.state.view("s").unwrap().title, None);
}

#[test]
fn patch_bumps_version_and_moves_updated_at_forward() {
    let mut leader = Leader::new();
    let command = patch(&leader.state, r#"{"title":"a"}"#, T0 + 10).unwrap();
    leader.propose_and_commit(&command);
    // The clock stepped back: updated_at still moves forward by 1 µs.
    let command = patch(&leader.state, r#"{"title":"b"}"#, T0 - 5).unwrap();
    leader.propose_and_commit(&command);
    let view = leader.state.view("s").unwrap();
    assert_eq!(
        (view.version, view.updated_at_us, view.created_at_us),
        (3, T0 + 11, T0)
    );
}

#[test]
fn patch_expected_version_conflict() {
    let mut leader = Leader::new();
    assert_eq!(
        patch(&leader.state, r#"{"title":"a","expected_version":2}"#, T0),
        Err(PatchError::VersionConflict { current: 1 })
    );
    let command = patch(&leader.state, r#"{"title":"a","expected_version":1}"#, T0).unwrap();
    leader.propose_and_commit(&command);
    assert_eq!(
        patch(&leader.state, r#"{"title":"b","expected_version":1}"#, T0),
        Err(PatchError::VersionConflict { current: 2 })
    );
}

#[test]
fn patch_unknown_session_not_found() {
    let state = GroupState::new(Limits::default());
    assert_eq!(
        patch(&state, r#"{"title":"a"}"#, T0),
        Err(PatchError::NotFound)
    );
}

#[test]
fn patch_result_over_64_kib_is_invalid_session_metadata() {
    let mut leader = Leader::new();
    let half = "x".repeat(40_000);
    let command = patch(
        &leader.state,
        &format!(r#"{{"metadata":{{"a":"{half}"}}}}"#),
        T0,
    )
    .unwrap();
    leader.propose_and_commit(&command);
    let Err(PatchError::Invalid(error)) = patch(
        &leader.state,
        &format!(r#"{{"metadata":{{"b":"{half}"}}}}"#),
        T0,
    ) else {
        panic!("merged metadata over the limit accepted")
    };
    assert_eq!(
        (error.code, error.field.as_deref()),
        (INVALID_SESSION, Some("metadata"))
    );
    // Removing "a" in the same patch keeps it within the limit.
    let body = format!(r#"{{"metadata":{{"a":null,"b":"{half}"}}}}"#);
    assert!(patch(&leader.state, &body, T0).is_ok());
}

#[test]
fn appends_do_not_change_version() {
    let mut leader = Leader::new();
    leader.append(r#"{"type":"t","payload":1}"#).unwrap();
    let view = leader.state.view("s").unwrap();
    assert_eq!((view.version, view.updated_at_us), (1, T0));
}

// ---- archive flag and archived_seq ----

#[test]
fn archive_bumps_version_and_updated_at() {
    let mut leader = Leader::new();
    let command = leader
        .state
        .decide_set_archived("s", true, T0 + 7)
        .unwrap()
        .unwrap();
    leader.propose_and_commit(&command);
    let view = leader.state.view("s").unwrap();
    assert_eq!(
        (view.archived, view.version, view.updated_at_us),
        (true, 2, T0 + 7)
    );
    let command = leader
        .state
        .decide_set_archived("s", false, T0)
        .unwrap()
        .unwrap();
    leader.propose_and_commit(&command);
    let view = leader.state.view("s").unwrap();
    assert_eq!(
        (view.archived, view.version, view.updated_at_us),
        (false, 3, T0 + 8)
    );
}

#[test]
fn archive_repeat_changes_nothing() {
    let mut leader = Leader::new();
    assert_eq!(leader.state.decide_set_archived("s", false, T0), Ok(None));
    let command = leader
        .state
        .decide_set_archived("s", true, T0)
        .unwrap()
        .unwrap();
    leader.state.apply(&command);
    // Already archived by the in-flight entry.
    assert_eq!(leader.state.decide_set_archived("s", true, T0), Ok(None));
    leader.state.commit(&command);
    assert_eq!(
        leader.state.decide_set_archived("s", true, T0 + 9),
        Ok(None)
    );
    assert_eq!(leader.state.view("s").unwrap().version, 2);
}

#[test]
fn archive_unknown_session_not_found() {
    let state = GroupState::new(Limits::default());
    assert_eq!(state.decide_set_archived("x", true, T0), Err(NotFound));
}

#[test]
fn archived_seq_is_clamped_and_never_decreases() {
    let mut leader = Leader::new();
    for _ in 0..3 {
        leader.append(r#"{"type":"t","payload":1}"#).unwrap();
    }
    let report = |seq: u64| vec![("s".to_string(), seq), ("x".to_string(), seq)];
    assert_eq!(leader.state.decide_archive_progress(&report(0)), None);
    let command = leader.state.decide_archive_progress(&report(99)).unwrap();
    assert_eq!(
        command,
        Command::ArchiveProgress(shards::entry::ArchiveProgress {
            sessions: vec![shards::entry::SessionProgress {
                session_id: "s".into(),
                archived_seq: 3
            }]
        })
    );
    // A trailing or repeated entry commits without moving anything back.
    let stale = leader.state.decide_archive_progress(&report(2)).unwrap();
    leader.propose_and_commit(&command);
    assert_eq!(leader.state.view("s").unwrap().archived_seq, 3);
    leader.propose_and_commit(&stale);
    leader.propose_and_commit(&command);
    assert_eq!(leader.state.view("s").unwrap().archived_seq, 3);
    assert_eq!(leader.state.decide_archive_progress(&report(2)), None);
    assert_eq!(leader.state.decide_archive_progress(&report(3)), None);
}

// ---- in-flight entries ----

#[test]
fn discard_uncommitted_forgets_in_flight_entries() {
    let mut leader = Leader::new();
    let new = event(r#"{"type":"t","payload":1,"idempotency_key":"k"}"#);
    let AppendDecision::Append(command) = leader.state.decide_append("s", &new, T0).unwrap() else {
        panic!()
    };
    leader.state.apply(&command);
    assert_eq!(leader.state.last_seq("s"), Some(1));
    leader.state.discard_uncommitted();
    assert_eq!(leader.state.last_seq("s"), Some(0));
    assert_eq!(leader.state.uncommitted_sessions(), 0);
    // The lost entry's key is free again and seq 1 is handed out anew.
    let AppendDecision::Append(Command::Append(entry)) =
        leader.state.decide_append("s", &new, T0).unwrap()
    else {
        panic!()
    };
    assert_eq!(entry.seq, 1);
}

#[test]
fn follower_commit_without_apply_reaches_the_same_state() {
    let mut leader = Leader {
        state: GroupState::new(Limits::default()),
    };
    let mut follower = GroupState::new(Limits::default());
    let create = validate_create(b"{}").unwrap();
    let create = leader.state.decide_create(&create, "s".into(), T0).unwrap();
    leader.state.apply(&create);
    let mut commands = vec![create];
    for i in 0..5 {
        let body = format!(r#"{{"type":"t","payload":{i},"idempotency_key":"k{i}"}}"#);
        let AppendDecision::Append(command) =
            leader.state.decide_append("s", &event(&body), T0).unwrap()
        else {
            panic!()
        };
        leader.state.apply(&command);
        commands.push(command);
    }
    for command in &commands {
        leader.state.commit(command);
        follower.commit(command);
    }
    assert_eq!(leader.state.encode_snapshot(), follower.encode_snapshot());
}

#[test]
#[should_panic(expected = "seq must be last_seq + 1")]
fn apply_rejects_a_seq_gap() {
    let mut leader = Leader::new();
    let AppendDecision::Append(Command::Append(mut entry)) = leader
        .state
        .decide_append("s", &event(r#"{"type":"t","payload":1}"#), T0)
        .unwrap()
    else {
        panic!()
    };
    entry.seq = 2;
    leader.state.apply(&Command::Append(entry));
}

#[test]
#[should_panic(expected = "already exists")]
fn commit_rejects_a_second_create() {
    let mut leader = Leader::new();
    let command = GroupState::new(Limits::default())
        .decide_create(&validate_create(b"{}").unwrap(), "s".into(), T0)
        .unwrap();
    leader.state.commit(&command);
}

#[test]
#[should_panic(expected = "version must grow by 1")]
fn apply_rejects_a_version_jump() {
    let mut leader = Leader::new();
    let Command::PatchSession(mut patch_entry) =
        patch(&leader.state, r#"{"title":"x"}"#, T0).unwrap()
    else {
        panic!()
    };
    patch_entry.version = 3;
    leader.state.apply(&Command::PatchSession(patch_entry));
}

// ---- snapshots ----

fn busy_state() -> GroupState {
    let limits = Limits {
        dedupe_keys_max: 3,
        producers_max: 2,
    };
    let mut leader = Leader::with_limits(limits);
    leader.create("other");
    for i in 0..8 {
        let body = format!(
            r#"{{"type":"t","payload":{i},"idempotency_key":"k{i}","producer_id":"p{}","producer_seq":{}}}"#,
            i % 3,
            i / 3 + 1
        );
        leader.append(&body).unwrap();
    }
    let command = patch(
        &leader.state,
        r#"{"title":"T","metadata":{"m":"v"}}"#,
        T0 + 1,
    )
    .unwrap();
    leader.propose_and_commit(&command);
    let command = leader
        .state
        .decide_archive_progress(&[("s".to_string(), 4)])
        .unwrap();
    leader.propose_and_commit(&command);
    let command = leader
        .state
        .decide_set_archived("other", true, T0 + 2)
        .unwrap()
        .unwrap();
    leader.propose_and_commit(&command);
    leader.state
}

#[test]
fn snapshot_round_trip() {
    let state = busy_state();
    let bytes = state.encode_snapshot();
    let mut restored = GroupState::decode_snapshot(&bytes, state.limits()).unwrap();
    assert_eq!(restored.encode_snapshot(), bytes);
    assert_eq!(restored.evictions(), state.evictions());
    let views: Vec<_> = state.views().cloned().collect();
    let restored_views: Vec<_> = restored.views().cloned().collect();
    assert_eq!(views, restored_views);
    // Dedupe tables and their eviction order survive: keys k5..k7 and producers p1, p0
    // (p2 appended least recently) are remembered.
    let mut original = Leader { state };
    for state in [&mut original.state, &mut restored] {
        let mut leader = Leader {
            state: state.clone(),
        };
        assert_eq!(leader.append(r#"{"type":"t","payload":7,"idempotency_key":"k7","producer_id":"p1","producer_seq":3}"#), deduped(8));
        assert_eq!(
            leader.append(r#"{"type":"t","payload":4,"idempotency_key":"k4"}"#),
            appended(9)
        );
        assert_eq!(
            leader.append(r#"{"type":"t","payload":1,"producer_id":"p0","producer_seq":9}"#),
            Err(AppendError::ProducerSeqConflict {
                expected_producer_seq: 4
            })
        );
        assert_eq!(
            leader.append(r#"{"type":"t","payload":1,"producer_id":"p2","producer_seq":9}"#),
            Ok((10, false))
        );
        *state = leader.state;
    }
    assert_eq!(original.state.encode_snapshot(), restored.encode_snapshot());
}

#[test]
fn snapshot_of_empty_state_round_trips() {
    let state = GroupState::new(Limits::default());
    let restored =
        GroupState::decode_snapshot(&state.encode_snapshot(), Limits::default()).unwrap();
    assert!(restored.is_empty());
}

#[test]
fn snapshot_excludes_in_flight_entries() {
    let mut leader = Leader::new();
    let before = leader.state.encode_snapshot();
    let AppendDecision::Append(command) = leader
        .state
        .decide_append("s", &event(r#"{"type":"t","payload":1}"#), T0)
        .unwrap()
    else {
        panic!()
    };
    leader.state.apply(&command);
    assert_eq!(leader.state.encode_snapshot(), before);
}

#[test]
fn snapshot_decode_applies_smaller_limits_oldest_first() {
    let state = busy_state();
    let limits = Limits {
        dedupe_keys_max: 1,
        producers_max: 1,
    };
    let restored = GroupState::decode_snapshot(&state.encode_snapshot(), limits).unwrap();
    let mut leader = Leader { state: restored };
    // Only k7 and p1 (the newest) remain.
    assert_eq!(
        leader.append(r#"{"type":"t","payload":6,"idempotency_key":"k6"}"#),
        appended(9)
    );
    let mut leader = Leader {
        state: GroupState::decode_snapshot(&state.encode_snapshot(), limits).unwrap(),
    };
    assert_eq!(
        leader.append(r#"{"type":"t","payload":0,"idempotency_key":"k7"}"#),
        Err(AppendError::IdempotencyConflict { seq: 8 })
    );
}

#[test]
fn corrupt_snapshot_decode_errors() {
    let bytes = busy_state().encode_snapshot();
    let limits = Limits::default();
    assert!(GroupState::decode_snapshot(&[], limits).is_err());
    assert!(GroupState::decode_snapshot(b"STSESS01", limits).is_err());
    for len in 0..bytes.len() {
        assert!(
            GroupState::decode_snapshot(&bytes[..len], limits).is_err(),
            "truncated at {len}"
        );
    }
    for at in 0..bytes.len() {
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 0x40;
        assert!(
            GroupState::decode_snapshot(&corrupt, limits).is_err(),
            "byte {at} flipped"
        );
    }
}

proptest! {
    /// With the checksum fixed up, garbage in the body still never panics the decoder.
    #[test]
    fn snapshot_decoder_never_panics(noise in prop::collection::vec(any::<u8>(), 0..512), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let limits = Limits::default();
        let _ = GroupState::decode_snapshot(&noise, limits);
        let mut bytes = busy_state().encode_snapshot();
        for (at, value) in flips {
            let at = 12 + at % (bytes.len() - 12);
            bytes[at] = value;
        }
        let crc = crc32fast::hash(&bytes[12..]).to_le_bytes();
        bytes[8..12].copy_from_slice(&crc);
        let _ = GroupState::decode_snapshot(&bytes, limits);
    }

    /// Any sequence of appends: seqs are contiguous, a replica that only commits ends in the
    /// same state, and the snapshot round-trips.
    #[test]
    fn replicas_agree_and_snapshots_round_trip(
        ops in prop::collection::vec((0u8..4, 0u8..6, 0u8..3, 1u64..5, any::<bool>()), 1..80),
        in_flight_max in 1usize..6,
    ) {
        let limits = Limits { dedupe_keys_max: 3, producers_max: 2 };
        let mut leader = GroupState::new(limits);
        let mut follower = GroupState::new(limits);
        let create = leader.decide_create(&validate_create(b"{}").unwrap(), "s".into(), T0).unwrap();
        leader.apply(&create);
        let mut in_flight = vec![create];
        let mut seqs = Vec::new();
        for (i, (key, payload, producer, producer_seq, with_expected)) in ops.into_iter().enumerate() {
            let mut body = format!(r#"{{"type":"t","payload":{payload}"#);
            if key > 0 {
                body.push_str(&format!(r#","idempotency_key":"k{key}""#));
            }
            if producer > 0 {
                body.push_str(&format!(r#","producer_id":"p{producer}","producer_seq":{producer_seq}"#));
            }
            if with_expected {
                body.push_str(&format!(r#","expected_seq":{}"#, leader.last_seq("s").unwrap()));
            }
            body.push('}');
            if let Ok(AppendDecision::Append(command)) = leader.decide_append("s", &event(&body), T0 + i as i64) {
                let Command::Append(entry) = &command else { panic!() };
                seqs.push(entry.seq);
                leader.apply(&command);
                in_flight.push(command);
            }
            while in_flight.len() > in_flight_max {
                let command = in_flight.remove(0);
                leader.commit(&command);
                follower.commit(&command);
            }
        }
        for command in in_flight.drain(..) {
            leader.commit(&command);
            follower.commit(&command);
        }
        prop_assert_eq!(seqs.clone(), (1..=seqs.len() as u64).collect::<Vec<_>>());
        prop_assert_eq!(leader.uncommitted_sessions(), 0);
        let bytes = leader.encode_snapshot();
        prop_assert_eq!(&bytes, &follower.encode_snapshot());
        let restored = GroupState::decode_snapshot(&bytes, limits).unwrap();
        prop_assert_eq!(restored.encode_snapshot(), bytes);
    }
}
