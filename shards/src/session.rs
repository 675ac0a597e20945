//! The session state machine of one Raft group: seq assignment, dedupe, expected_seq,
//! versions, the archive watermark. Pure and deterministic.
//!
//! It keeps two layers, because a leader decides against more than reads may show:
//!
//! - the committed state (`sessions`): every entry passed to [`GroupState::commit`], in
//!   log order. Reads ([`GroupState::view`], [`GroupState::views`]) and snapshots see only
//!   this, and it is identical on every replica, dedupe windows included.
//! - the in-flight overlay (`pending`): what entries passed to [`GroupState::apply`] but
//!   not yet committed change, per session. Decisions (`decide_*`) look at the overlay
//!   first, then the committed state, so a leader never hands out a seq twice and sees
//!   the idempotency keys of entries still in flight.
//!
//! How the shell drives it:
//! - Leader: `decide_*` → propose the returned command and [`GroupState::apply`] it at
//!   once → [`GroupState::commit`] it when it is committed (same order as apply).
//! - Follower: [`GroupState::commit`] each committed entry (calling `apply` first is
//!   allowed, never required).
//! - Becoming leader, or losing entries to a log truncation: call
//!   [`GroupState::discard_uncommitted`], then `apply` every entry of the log after the
//!   commit index, in order, before deciding anything.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;

use rkyv::{Archive, Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::entry::{
    AppendEntry, ArchiveProgress, Command, CreateSession, Digest, PatchSession, SessionProgress,
    SetArchived,
};
use crate::time::format_rfc3339_us;
use crate::validate::{self, FieldError, NewEvent, NewSession, PatchRequest};

/// Bounds of the replicated dedupe memory, per session. Cluster-wide settings: every
/// replica must use the same values or their states diverge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Idempotency keys remembered per session (the most recent ones, in log order).
    pub dedupe_keys_max: usize,
    /// Producers remembered per session (the most recently appending ones).
    pub producers_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            dedupe_keys_max: 10_000,
            producers_max: 10_000,
        }
    }
}

/// A session as reads show it: committed state only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub id: String,
    pub title: Option<String>,
    /// Compact JSON object text. The empty object, which most sessions have, is a
    /// static string rather than an allocation (issue 11: memory per session).
    pub metadata: Cow<'static, str>,
    pub last_seq: u64,
    pub archived_seq: u64,
    pub version: u64,
    pub archived: bool,
    pub created_at_us: i64,
    pub updated_at_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateError {
    SessionExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchError {
    NotFound,
    VersionConflict {
        current: u64,
    },
    /// The merged metadata breaks a limit (`invalid_session`, field `metadata`).
    Invalid(FieldError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

// Not boxed: a decision is moved once, straight into the proposal; a box would cost an
// allocation per append.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendDecision {
    /// Propose this `Command::Append`.
    Append(Command),
    /// Nothing to append: the request repeats the entry with this seq (which may still be
    /// in flight: compare with [`GroupState::committed_seq`]).
    Deduped { seq: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    SessionNotFound,
    /// The idempotency key was used for different content by the entry `seq`.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyRecord {
    seq: u64,
    digest: Digest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProducerRecord {
    producer_seq: u64,
    /// Seq of the entry that carried `producer_seq`.
    seq: u64,
    digest: Digest,
}

/// The replicated dedupe memory of one session, bounded and evicted in log order.
#[derive(Debug, Clone, Default)]
struct DedupeWindow {
    keys: HashMap<String, KeyRecord>,
    /// Keys in the order their entries were committed; the front is evicted first.
    key_order: VecDeque<String>,
    producers: HashMap<String, ProducerRecord>,
    /// `(producer_id, seq)` per committed entry of a producer, oldest first. An item is
    /// stale when the producer has appended since (its record has a later seq); stale
    /// items are skipped on eviction and dropped by compaction, so the least recently
    /// appending producer is evicted first, in O(1) amortised.
    producer_order: VecDeque<(String, u64)>,
}

impl DedupeWindow {
    /// Remembers `key`; returns how many keys were evicted to stay within `keys_max`.
    fn record_key(&mut self, key: &str, record: KeyRecord, keys_max: usize) -> u64 {
        let previous = self.keys.insert(key.to_string(), record);
        assert!(
            previous.is_none(),
            "idempotency key {key:?} committed twice (seq {} then {})",
            previous.map_or(0, |p| p.seq),
            record.seq
        );
        self.key_order.push_back(key.to_string());
        let mut evicted = 0;
        while self.keys.len() > keys_max {
            let oldest = self
                .key_order
                .pop_front()
                .expect("key_order lists every key");
            self.keys
                .remove(&oldest)
                .expect("key_order lists only remembered keys");
            evicted += 1;
        }
        evicted
    }

    /// Remembers the producer's latest entry; returns how many producers were evicted to
    /// stay within `producers_max`.
    fn record_producer(&mut self, id: &str, record: ProducerRecord, producers_max: usize) -> u64 {
        self.producers.insert(id.to_string(), record);
        self.producer_order.push_back((id.to_string(), record.seq));
        let mut evicted = 0;
        while self.producers.len() > producers_max {
            let (oldest, seq) = self
                .producer_order
                .pop_front()
                .expect("order lists every producer");
            if self.producers.get(&oldest).is_some_and(|r| r.seq == seq) {
                self.producers.remove(&oldest);
                evicted += 1;
            }
        }
        if self.producer_order.len() > 2 * self.producers.len() + 16 {
            let producers = &self.producers;
            self.producer_order
                .retain(|(id, seq)| producers.get(id).is_some_and(|r| r.seq == *seq));
        }
        evicted
    }

    /// Producers from least to most recently appending.
    fn producers_in_order(&self) -> impl Iterator<Item = (&String, &ProducerRecord)> {
        self.producer_order.iter().filter_map(|(id, seq)| {
            let record = self.producers.get(id)?;
            (record.seq == *seq).then_some((id, record))
        })
    }
}

/// Committed state of one session.
#[derive(Debug, Clone)]
struct SessionState {
    view: SessionView,
    last_inserted_at_us: i64,
    /// Allocated with the session's first idempotency key or producer: most sessions
    /// never use either, and an empty window would cost them 160 bytes each (issue 11's
    /// bound of 1 KiB per session).
    dedupe: Option<Box<DedupeWindow>>,
}

/// The scalar part of a session as decisions see it (committed + in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    version: u64,
    archived: bool,
    created_at_us: i64,
    updated_at_us: i64,
    last_seq: u64,
    archived_seq: u64,
    last_inserted_at_us: i64,
}

impl Head {
    fn of(session: &SessionState) -> Head {
        Head {
            version: session.view.version,
            archived: session.view.archived,
            created_at_us: session.view.created_at_us,
            updated_at_us: session.view.updated_at_us,
            last_seq: session.view.last_seq,
            archived_seq: session.view.archived_seq,
            last_inserted_at_us: session.last_inserted_at_us,
        }
    }
}

/// What the in-flight entries of one session change.
#[derive(Debug, Clone)]
struct Pending {
    /// Entries applied and not yet committed.
    entries: u64,
    head: Head,
    /// Title and metadata, when an in-flight create or patch set them (kept apart so an
    /// append does not copy the metadata).
    texts: Option<(Option<String>, String)>,
    keys: HashMap<String, KeyRecord>,
    producers: HashMap<String, ProducerRecord>,
}

/// The sessions of one Raft group.
#[derive(Debug, Clone)]
pub struct GroupState {
    limits: Limits,
    /// Committed sessions by id, in bytewise id order.
    sessions: BTreeMap<String, SessionState>,
    /// In-flight changes by session id.
    pending: HashMap<String, Pending>,
    /// Dedupe entries (keys and producers) evicted by committed entries.
    evictions: u64,
}

impl GroupState {
    pub fn new(limits: Limits) -> GroupState {
        GroupState {
            limits,
            sessions: BTreeMap::new(),
            pending: HashMap::new(),
            evictions: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    // ---- decisions (against committed + in-flight state) ----

    fn head(&self, id: &str) -> Option<Head> {
        match self.pending.get(id) {
            Some(pending) => Some(pending.head),
            None => self.sessions.get(id).map(Head::of),
        }
    }

    /// Title and metadata as decisions see them.
    fn texts(&self, id: &str) -> Option<(&Option<String>, &str)> {
        if let Some((title, metadata)) = self.pending.get(id).and_then(|p| p.texts.as_ref()) {
            return Some((title, metadata));
        }
        self.sessions
            .get(id)
            .map(|s| (&s.view.title, &*s.view.metadata))
    }

    /// `POST /v1/sessions`; `id` is the requested id or a generated one.
    pub fn decide_create(
        &self,
        session: &NewSession,
        id: String,
        now_us: i64,
    ) -> Result<Command, CreateError> {
        assert!(validate::valid_session_id(&id), "invalid session id {id:?}");
        if self.head(&id).is_some() {
            return Err(CreateError::SessionExists);
        }
        Ok(Command::CreateSession(CreateSession {
            session_id: id,
            title: session.title.clone(),
            metadata: session.metadata.clone(),
            at_us: now_us,
        }))
    }

    /// `PATCH /v1/sessions/:id`: shallow merge of the metadata (given keys replace in
    /// place or are appended, null removes), version + 1, `updated_at` strictly later.
    pub fn decide_patch(
        &self,
        id: &str,
        patch: &PatchRequest,
        now_us: i64,
    ) -> Result<Command, PatchError> {
        let head = self.head(id).ok_or(PatchError::NotFound)?;
        if patch
            .expected_version
            .is_some_and(|expected| expected != head.version)
        {
            return Err(PatchError::VersionConflict {
                current: head.version,
            });
        }
        let (title, metadata) = self.texts(id).expect("a session with a head has texts");
        let metadata = match &patch.metadata {
            None => metadata.to_string(),
            Some(changes) => merged_metadata(metadata, changes).map_err(PatchError::Invalid)?,
        };
        let title = match &patch.title {
            None => title.clone(),
            Some(new_title) => new_title.clone(),
        };
        Ok(Command::PatchSession(PatchSession {
            session_id: id.to_string(),
            title,
            metadata,
            version: head.version + 1,
            at_us: now_us.max(head.updated_at_us + 1),
        }))
    }

    /// Archive (`true`) or unarchive (`false`); `None` when the flag already is so.
    pub fn decide_set_archived(
        &self,
        id: &str,
        archived: bool,
        now_us: i64,
    ) -> Result<Option<Command>, NotFound> {
        let head = self.head(id).ok_or(NotFound)?;
        if head.archived == archived {
            return Ok(None);
        }
        Ok(Some(Command::SetArchived(SetArchived {
            session_id: id.to_string(),
            archived,
            version: head.version + 1,
            at_us: now_us.max(head.updated_at_us + 1),
        })))
    }

    /// The append rules of API.md, in their order: unknown session, idempotency key,
    /// producer, expected_seq, then the next seq.
    pub fn decide_append(
        &self,
        id: &str,
        event: &NewEvent,
        now_us: i64,
    ) -> Result<AppendDecision, AppendError> {
        let head = self.head(id).ok_or(AppendError::SessionNotFound)?;
        if let Some(key) = &event.idempotency_key {
            if let Some(original) = self.key_record(id, key) {
                return if original.digest == event.digest {
                    Ok(AppendDecision::Deduped { seq: original.seq })
                } else {
                    Err(AppendError::IdempotencyConflict { seq: original.seq })
                };
            }
        }
        if let Some((producer_id, producer_seq)) = &event.producer {
            if let Some(last) = self.producer_record(id, producer_id) {
                if *producer_seq == last.producer_seq && event.digest == last.digest {
                    return Ok(AppendDecision::Deduped { seq: last.seq });
                }
                if Some(*producer_seq) != last.producer_seq.checked_add(1) {
                    return Err(AppendError::ProducerSeqConflict {
                        expected_producer_seq: last.producer_seq.saturating_add(1),
                    });
                }
            }
        }
        if let Some(expected_seq) = event.expected_seq {
            if expected_seq != head.last_seq {
                return Err(AppendError::ExpectedSeqConflict {
                    expected_seq,
                    current_seq: head.last_seq,
                });
            }
        }
        Ok(AppendDecision::Append(Command::Append(AppendEntry {
            session_id: id.to_string(),
            seq: head.last_seq + 1,
            inserted_at_us: now_us.max(head.last_inserted_at_us),
            event_type: event.event_type.clone(),
            payload: event.payload.clone(),
            actor: event.actor.clone(),
            source: event.source.clone(),
            metadata: event.metadata.clone(),
            refs: event.refs.clone(),
            idempotency_key: event.idempotency_key.clone(),
            producer_id: event.producer.as_ref().map(|(id, _)| id.clone()),
            producer_seq: event.producer.as_ref().map(|(_, seq)| *seq),
            digest: event.digest,
        })))
    }

    /// The archiver stored events `1..=archived_seq` of each reported session: one
    /// entry advancing every watermark that moves (clamped to the committed last_seq),
    /// or `None` when none does. Progress is not part of the in-flight overlay: it is
    /// only ever about committed events, and commit keeps the larger value, so an
    /// entry that repeats or trails another changes nothing.
    pub fn decide_archive_progress(&self, reports: &[(String, u64)]) -> Option<Command> {
        let mut sessions = Vec::new();
        for (id, archived_seq) in reports {
            let Some(view) = self.view(id) else { continue };
            let archived_seq = (*archived_seq).min(view.last_seq);
            if archived_seq > view.archived_seq {
                sessions.push(SessionProgress {
                    session_id: id.clone(),
                    archived_seq,
                });
            }
        }
        (!sessions.is_empty()).then_some(Command::ArchiveProgress(ArchiveProgress { sessions }))
    }

    fn key_record(&self, id: &str, key: &str) -> Option<KeyRecord> {
        let in_flight = self.pending.get(id).and_then(|p| p.keys.get(key));
        let committed = || self.sessions.get(id)?.dedupe.as_ref()?.keys.get(key);
        in_flight.or_else(committed).copied()
    }

    fn producer_record(&self, id: &str, producer_id: &str) -> Option<ProducerRecord> {
        let in_flight = self
            .pending
            .get(id)
            .and_then(|p| p.producers.get(producer_id));
        let committed = || {
            let dedupe = self.sessions.get(id)?.dedupe.as_ref()?;
            dedupe.producers.get(producer_id)
        };
        in_flight.or_else(committed).copied()
    }

    // ---- apply: a proposed entry joins the in-flight overlay ----

    /// Records a proposed (not yet durable) entry in the decision state. Panics when the
    /// entry contradicts that state: entries come only from `decide_*` against it.
    pub fn apply(&mut self, command: &Command) {
        match command {
            Command::Noop | Command::Meta(_) => {}
            Command::CreateSession(create) => self.apply_create(create),
            Command::PatchSession(patch) => {
                let pending = self.pending_for(&patch.session_id, command);
                assert_eq!(
                    patch.version,
                    pending.head.version + 1,
                    "apply {command:?}: version must grow by 1"
                );
                assert!(
                    patch.at_us > pending.head.updated_at_us,
                    "apply {command:?}: updated_at must move forward"
                );
                pending.head.version = patch.version;
                pending.head.updated_at_us = patch.at_us;
                pending.texts = Some((patch.title.clone(), patch.metadata.clone()));
            }
            Command::SetArchived(set) => {
                let pending = self.pending_for(&set.session_id, command);
                assert_eq!(
                    set.version,
                    pending.head.version + 1,
                    "apply {command:?}: version must grow by 1"
                );
                assert!(
                    set.at_us > pending.head.updated_at_us,
                    "apply {command:?}: updated_at must move forward"
                );
                assert_ne!(
                    set.archived, pending.head.archived,
                    "apply {command:?}: the flag must change"
                );
                pending.head.version = set.version;
                pending.head.updated_at_us = set.at_us;
                pending.head.archived = set.archived;
            }
            Command::Append(append) => self.apply_append(append, command),
            // Not in the overlay (see `decide_archive_progress`).
            Command::ArchiveProgress(_) => {}
        }
    }

    fn apply_create(&mut self, create: &CreateSession) {
        let id = &create.session_id;
        assert!(
            self.head(id).is_none(),
            "apply {create:?}: session {id:?} already exists"
        );
        let head = Head {
            version: 1,
            archived: false,
            created_at_us: create.at_us,
            updated_at_us: create.at_us,
            last_seq: 0,
            archived_seq: 0,
            last_inserted_at_us: create.at_us,
        };
        let pending = Pending {
            entries: 1,
            head,
            texts: Some((create.title.clone(), create.metadata.clone())),
            keys: HashMap::new(),
            producers: HashMap::new(),
        };
        self.pending.insert(id.clone(), pending);
    }

    fn apply_append(&mut self, append: &AppendEntry, command: &Command) {
        let pending = self.pending_for(&append.session_id, command);
        assert_eq!(
            append.seq,
            pending.head.last_seq + 1,
            "apply {command:?}: seq must be last_seq + 1"
        );
        assert!(
            append.inserted_at_us >= pending.head.last_inserted_at_us,
            "apply {command:?}: inserted_at went backwards"
        );
        pending.head.last_seq = append.seq;
        pending.head.last_inserted_at_us = append.inserted_at_us;
        let seq = append.seq;
        let digest = append.digest;
        if let Some(key) = &append.idempotency_key {
            pending.keys.insert(key.clone(), KeyRecord { seq, digest });
        }
        if let (Some(producer_id), Some(producer_seq)) = (&append.producer_id, append.producer_seq)
        {
            let record = ProducerRecord {
                producer_seq,
                seq,
                digest,
            };
            pending.producers.insert(producer_id.clone(), record);
        }
    }

    /// The overlay of an existing session, counting one more in-flight entry.
    fn pending_for(&mut self, id: &str, command: &Command) -> &mut Pending {
        if !self.pending.contains_key(id) {
            let session = self
                .sessions
                .get(id)
                .unwrap_or_else(|| panic!("apply {command:?}: unknown session"));
            let pending = Pending {
                entries: 0,
                head: Head::of(session),
                texts: None,
                keys: HashMap::new(),
                producers: HashMap::new(),
            };
            self.pending.insert(id.to_string(), pending);
        }
        let pending = self.pending.get_mut(id).expect("inserted above");
        pending.entries += 1;
        pending
    }

    /// Forgets every in-flight entry (leadership change, log truncation): decisions then
    /// see the committed state until entries are applied again.
    pub fn discard_uncommitted(&mut self) {
        self.pending.clear();
    }

    /// Number of sessions with entries applied and not yet committed.
    pub fn uncommitted_sessions(&self) -> usize {
        self.pending.len()
    }

    // ---- commit: a durable entry joins the committed state ----

    /// Records a committed entry (log order). Panics when it contradicts the committed
    /// state: that would mean replicas disagree or entries were skipped.
    pub fn commit(&mut self, command: &Command) {
        match command {
            Command::Noop | Command::Meta(_) => return,
            Command::CreateSession(create) => self.commit_create(create),
            Command::PatchSession(patch) => {
                let view = &mut self.committed_mut(&patch.session_id, command).view;
                assert_eq!(
                    patch.version,
                    view.version + 1,
                    "commit {command:?}: version must grow by 1"
                );
                view.title = patch.title.clone();
                view.metadata = stored_metadata(&patch.metadata);
                view.version = patch.version;
                view.updated_at_us = patch.at_us;
            }
            Command::SetArchived(set) => {
                let view = &mut self.committed_mut(&set.session_id, command).view;
                assert_eq!(
                    set.version,
                    view.version + 1,
                    "commit {command:?}: version must grow by 1"
                );
                view.archived = set.archived;
                view.version = set.version;
                view.updated_at_us = set.at_us;
            }
            Command::Append(append) => self.commit_append(append, command),
            Command::ArchiveProgress(progress) => {
                for p in &progress.sessions {
                    let view = &mut self.committed_mut(&p.session_id, command).view;
                    assert!(
                        p.archived_seq <= view.last_seq,
                        "commit {command:?}: archived beyond last_seq {}",
                        view.last_seq
                    );
                    view.archived_seq = view.archived_seq.max(p.archived_seq);
                }
                return; // never applied to the overlay: nothing to release
            }
        }
        self.release(command);
    }

    fn commit_create(&mut self, create: &CreateSession) {
        let id = &create.session_id;
        assert!(
            !self.sessions.contains_key(id),
            "commit {create:?}: session {id:?} already exists"
        );
        let view = SessionView {
            id: id.clone(),
            title: create.title.clone(),
            metadata: stored_metadata(&create.metadata),
            last_seq: 0,
            archived_seq: 0,
            version: 1,
            archived: false,
            created_at_us: create.at_us,
            updated_at_us: create.at_us,
        };
        let session = SessionState {
            view,
            last_inserted_at_us: create.at_us,
            dedupe: None,
        };
        self.sessions.insert(id.clone(), session);
    }

    fn commit_append(&mut self, append: &AppendEntry, command: &Command) {
        let limits = self.limits;
        let session = self.committed_mut(&append.session_id, command);
        assert_eq!(
            append.seq,
            session.view.last_seq + 1,
            "commit {command:?}: seq must be last_seq + 1"
        );
        session.view.last_seq = append.seq;
        session.last_inserted_at_us = session.last_inserted_at_us.max(append.inserted_at_us);
        let (seq, digest) = (append.seq, append.digest);
        let mut evicted = 0;
        if let Some(key) = &append.idempotency_key {
            let record = KeyRecord { seq, digest };
            evicted += session.dedupe.get_or_insert_with(Box::default).record_key(
                key,
                record,
                limits.dedupe_keys_max,
            );
        }
        if let (Some(producer_id), Some(producer_seq)) = (&append.producer_id, append.producer_seq)
        {
            let record = ProducerRecord {
                producer_seq,
                seq,
                digest,
            };
            evicted += session
                .dedupe
                .get_or_insert_with(Box::default)
                .record_producer(producer_id, record, limits.producers_max);
        }
        self.evictions += evicted;
    }

    fn committed_mut(&mut self, id: &str, command: &Command) -> &mut SessionState {
        self.sessions
            .get_mut(id)
            .unwrap_or_else(|| panic!("commit {command:?}: unknown session"))
    }

    /// One in-flight entry of the session is now committed: the overlay stops carrying
    /// it (the committed dedupe window answers for it from now on, so a session that
    /// always has entries in flight does not grow its overlay without bound).
    fn release(&mut self, command: &Command) {
        let id = session_of(command);
        let Some(pending) = self.pending.get_mut(id) else {
            return; // a follower committing without applying first
        };
        if let Command::Append(append) = command {
            if let Some(key) = &append.idempotency_key {
                if pending.keys.get(key).is_some_and(|r| r.seq == append.seq) {
                    pending.keys.remove(key);
                }
            }
            if let Some(producer_id) = &append.producer_id {
                if pending
                    .producers
                    .get(producer_id)
                    .is_some_and(|r| r.seq == append.seq)
                {
                    pending.producers.remove(producer_id);
                }
            }
        }
        pending.entries -= 1;
        if pending.entries == 0 {
            self.pending.remove(id);
        }
    }

    // ---- reads (committed state) ----

    /// A committed session; a session whose create is still in flight is not found.
    pub fn view(&self, id: &str) -> Option<&SessionView> {
        self.sessions.get(id).map(|s| &s.view)
    }

    /// Committed sessions in bytewise id order.
    pub fn views(&self) -> impl Iterator<Item = &SessionView> {
        self.sessions.values().map(|s| &s.view)
    }

    /// Committed sessions with ids after `cursor` (exclusive), in bytewise id order.
    pub fn views_after<'a>(
        &'a self,
        cursor: Option<&str>,
    ) -> impl Iterator<Item = &'a SessionView> {
        let start = match cursor {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        self.sessions
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, s)| &s.view)
    }

    /// Head seq including in-flight appends (what the next append builds on).
    pub fn last_seq(&self, id: &str) -> Option<u64> {
        self.head(id).map(|h| h.last_seq)
    }

    /// Head seq of the committed state (what reads and tails may show).
    pub fn committed_seq(&self, id: &str) -> Option<u64> {
        self.view(id).map(|v| v.last_seq)
    }

    /// Number of committed sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Dedupe entries (idempotency keys and producers) evicted so far by committed
    /// appends.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    // ---- snapshots (committed state only) ----

    /// The committed state, dedupe windows and their eviction order included, as bytes:
    /// `SNAPSHOT_MAGIC`, crc32 (u32 LE) of the rest, rkyv bytes of the snapshot.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let snapshot = Snapshot {
            evictions: self.evictions,
            sessions: self.sessions.values().map(SessionSnapshot::of).collect(),
        };
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(&snapshot)
            .expect("serialising a snapshot into memory cannot fail");
        let mut bytes = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 4 + body.len());
        bytes.extend_from_slice(&SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes
    }

    /// Rebuilds a committed state from [`GroupState::encode_snapshot`] bytes. Never
    /// panics: corrupt or inconsistent bytes are an error. Windows longer than `limits`
    /// allow lose their oldest entries.
    pub fn decode_snapshot(bytes: &[u8], limits: Limits) -> Result<GroupState, String> {
        let header = SNAPSHOT_MAGIC.len() + 4;
        if bytes.len() < header || bytes[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
            return Err("not a session snapshot (bad magic)".to_string());
        }
        let crc = u32::from_le_bytes(
            bytes[SNAPSHOT_MAGIC.len()..header]
                .try_into()
                .expect("4 bytes"),
        );
        let body = &bytes[header..];
        if crc32fast::hash(body) != crc {
            return Err("session snapshot checksum mismatch".to_string());
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        let snapshot = rkyv::from_bytes::<Snapshot, rkyv::rancor::Error>(&aligned)
            .map_err(|e| format!("session snapshot does not decode: {e}"))?;
        let mut state = GroupState::new(limits);
        state.evictions = snapshot.evictions;
        for session in snapshot.sessions {
            let id = session.id.clone();
            if state
                .sessions
                .last_key_value()
                .is_some_and(|(last, _)| *last >= id)
            {
                return Err(format!("session snapshot: session {id:?} out of order"));
            }
            let session = session
                .restore(limits)
                .map_err(|e| format!("session snapshot: session {id:?}: {e}"))?;
            state.sessions.insert(id, session);
        }
        Ok(state)
    }
}

/// The session a command is about (Noop has none).
fn session_of(command: &Command) -> &str {
    match command {
        Command::Noop | Command::Meta(_) => "",
        Command::CreateSession(c) => &c.session_id,
        Command::PatchSession(c) => &c.session_id,
        Command::SetArchived(c) => &c.session_id,
        Command::Append(c) => &c.session_id,
        Command::ArchiveProgress(_) => "",
    }
}

/// Metadata text as a session keeps it: the empty object is not allocated.
fn stored_metadata(text: &str) -> Cow<'static, str> {
    match text {
        "{}" => Cow::Borrowed("{}"),
        text => Cow::Owned(text.to_string()),
    }
}

/// Shallow merge of `changes` into the stored metadata object.
fn merged_metadata(stored: &str, changes: &Map<String, Value>) -> Result<String, FieldError> {
    let mut merged: Map<String, Value> = serde_json::from_str(stored)
        .unwrap_or_else(|e| panic!("stored metadata {stored:?} is not a JSON object: {e}"));
    for (key, value) in changes {
        if value.is_null() {
            merged.shift_remove(key);
        } else {
            merged.insert(key.clone(), value.clone());
        }
    }
    validate::checked_metadata_text(&merged)
}

/// The session object of API.md: `{"id","title","metadata","last_seq","archived_seq",
/// "version","archived","created_at","updated_at"}`, metadata inserted verbatim.
pub fn render_session(view: &SessionView) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(200 + view.id.len() + view.metadata.len());
    out.push_str(r#"{"id":"#);
    validate::push_json_string(&mut out, &view.id);
    out.push_str(r#","title":"#);
    validate::push_optional_json_string(&mut out, view.title.as_deref());
    out.push_str(r#","metadata":"#);
    out.push_str(&view.metadata);
    write!(
        out,
        r#","last_seq":{},"archived_seq":{},"version":{},"archived":{},"created_at":"{}","updated_at":"{}"}}"#,
        view.last_seq,
        view.archived_seq,
        view.version,
        view.archived,
        format_rfc3339_us(view.created_at_us),
        format_rfc3339_us(view.updated_at_us),
    )
    .expect("writing to a String");
    out
}

/// Listing filter `metadata.KEY=VALUE`: every KEY's top-level metadata value is the JSON
/// string VALUE (several filters AND).
pub fn metadata_matches(view: &SessionView, filters: &[(String, String)]) -> bool {
    if filters.is_empty() {
        return true;
    }
    let Ok(metadata) = serde_json::from_str::<Map<String, Value>>(&view.metadata) else {
        return false;
    };
    filters
        .iter()
        .all(|(key, value)| metadata.get(key).and_then(Value::as_str) == Some(value.as_str()))
}

/// First bytes of every session snapshot (format version 1).
const SNAPSHOT_MAGIC: [u8; 8] = *b"STSESS01";

#[derive(Archive, Serialize, Deserialize)]
struct Snapshot {
    evictions: u64,
    /// In bytewise id order.
    sessions: Vec<SessionSnapshot>,
}

#[derive(Archive, Serialize, Deserialize)]
struct SessionSnapshot {
    id: String,
    title: Option<String>,
    metadata: String,
    last_seq: u64,
    archived_seq: u64,
    version: u64,
    archived: bool,
    created_at_us: i64,
    updated_at_us: i64,
    last_inserted_at_us: i64,
    /// Oldest first (eviction order).
    keys: Vec<KeySnapshot>,
    /// Least recently appending first (eviction order).
    producers: Vec<ProducerSnapshot>,
}

#[derive(Archive, Serialize, Deserialize)]
struct KeySnapshot {
    key: String,
    seq: u64,
    digest: Digest,
}

#[derive(Archive, Serialize, Deserialize)]
struct ProducerSnapshot {
    producer_id: String,
    producer_seq: u64,
    seq: u64,
    digest: Digest,
}

impl SessionSnapshot {
    fn of(session: &SessionState) -> SessionSnapshot {
        let view = &session.view;
        let empty = DedupeWindow::default();
        let dedupe = session.dedupe.as_deref().unwrap_or(&empty);
        let keys = dedupe.key_order.iter().map(|key| {
            let record = dedupe.keys[key];
            KeySnapshot {
                key: key.clone(),
                seq: record.seq,
                digest: record.digest,
            }
        });
        let producers = dedupe
            .producers_in_order()
            .map(|(id, record)| ProducerSnapshot {
                producer_id: id.clone(),
                producer_seq: record.producer_seq,
                seq: record.seq,
                digest: record.digest,
            });
        SessionSnapshot {
            id: view.id.clone(),
            title: view.title.clone(),
            metadata: view.metadata.to_string(),
            last_seq: view.last_seq,
            archived_seq: view.archived_seq,
            version: view.version,
            archived: view.archived,
            created_at_us: view.created_at_us,
            updated_at_us: view.updated_at_us,
            last_inserted_at_us: session.last_inserted_at_us,
            keys: keys.collect(),
            producers: producers.collect(),
        }
    }

    /// Checks what the state machine relies on, then rebuilds the session.
    fn restore(self, limits: Limits) -> Result<SessionState, String> {
        if !validate::valid_session_id(&self.id) {
            return Err("invalid id".to_string());
        }
        if self.version == 0
            || self.archived_seq > self.last_seq
            || self.created_at_us > self.updated_at_us
        {
            return Err("inconsistent counters".to_string());
        }
        if serde_json::from_str::<Map<String, Value>>(&self.metadata).is_err() {
            return Err("metadata is not a JSON object".to_string());
        }
        let mut dedupe = DedupeWindow::default();
        let mut previous_seq = 0;
        let skip = self.keys.len().saturating_sub(limits.dedupe_keys_max);
        for key in self.keys.into_iter().skip(skip) {
            if key.seq <= previous_seq || key.seq > self.last_seq {
                return Err(format!(
                    "idempotency key {:?} has seq {} out of order",
                    key.key, key.seq
                ));
            }
            previous_seq = key.seq;
            let record = KeyRecord {
                seq: key.seq,
                digest: key.digest,
            };
            if dedupe.keys.insert(key.key.clone(), record).is_some() {
                return Err(format!("idempotency key {:?} listed twice", key.key));
            }
            dedupe.key_order.push_back(key.key);
        }
        let mut previous_seq = 0;
        let skip = self.producers.len().saturating_sub(limits.producers_max);
        for producer in self.producers.into_iter().skip(skip) {
            let id = producer.producer_id;
            if producer.seq <= previous_seq
                || producer.seq > self.last_seq
                || producer.producer_seq == 0
            {
                return Err(format!(
                    "producer {id:?} has seq {} out of order",
                    producer.seq
                ));
            }
            previous_seq = producer.seq;
            let record = ProducerRecord {
                producer_seq: producer.producer_seq,
                seq: producer.seq,
                digest: producer.digest,
            };
            if dedupe.producers.insert(id.clone(), record).is_some() {
                return Err(format!("producer {id:?} listed twice"));
            }
            dedupe.producer_order.push_back((id, producer.seq));
        }
        let view = SessionView {
            id: self.id,
            title: self.title,
            metadata: stored_metadata(&self.metadata),
            last_seq: self.last_seq,
            archived_seq: self.archived_seq,
            version: self.version,
            archived: self.archived,
            created_at_us: self.created_at_us,
            updated_at_us: self.updated_at_us,
        };
        Ok(SessionState {
            view,
            last_inserted_at_us: self.last_inserted_at_us,
            dedupe: (!dedupe.keys.is_empty() || !dedupe.producers.is_empty())
                .then(|| Box::new(dedupe)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_756_801_000_000;

    fn event(body: &str) -> NewEvent {
        validate::validate_append(body.as_bytes()).unwrap()
    }

    fn state_with_session(limits: Limits) -> GroupState {
        let mut state = GroupState::new(limits);
        let new = validate::validate_create(b"{}").unwrap();
        let command = state.decide_create(&new, "s".into(), T0).unwrap();
        state.apply(&command);
        state.commit(&command);
        state
    }

    fn propose(state: &mut GroupState, body: &str) -> Command {
        let AppendDecision::Append(command) = state.decide_append("s", &event(body), T0).unwrap()
        else {
            panic!("{body} was not appended")
        };
        state.apply(&command);
        command
    }

    /// A session that always has an entry in flight keeps its overlay, but the overlay
    /// only carries the keys of entries still in flight.
    #[test]
    fn overlay_stays_small_while_entries_are_always_in_flight() {
        let limits = Limits {
            dedupe_keys_max: 4,
            producers_max: 4,
        };
        let mut state = state_with_session(limits);
        let mut previous = propose(
            &mut state,
            r#"{"type":"t","payload":0,"idempotency_key":"k0"}"#,
        );
        for i in 1..1000 {
            let body = format!(
                r#"{{"type":"t","payload":{i},"idempotency_key":"k{i}","producer_id":"p{}","producer_seq":{}}}"#,
                i % 7,
                i / 7 + 1
            );
            let next = propose(&mut state, &body);
            state.commit(&previous);
            previous = next;
            let pending = &state.pending["s"];
            assert_eq!(pending.entries, 1);
            assert!(pending.keys.len() <= 1 && pending.producers.len() <= 1);
        }
        state.commit(&previous);
        assert!(state.pending.is_empty());
        let dedupe = state.sessions["s"].dedupe.as_deref().unwrap();
        assert_eq!((dedupe.keys.len(), dedupe.key_order.len()), (4, 4));
        assert_eq!(dedupe.producers.len(), 4);
    }

    /// A session that never sends an idempotency key or producer allocates no dedupe
    /// window (issue 11: memory per session), in the live state and after a snapshot.
    #[test]
    fn sessions_without_keys_or_producers_hold_no_dedupe_window() {
        let mut state = state_with_session(Limits::default());
        let command = propose(&mut state, r#"{"type":"t","payload":1}"#);
        state.commit(&command);
        assert!(state.sessions["s"].dedupe.is_none());
        let restored =
            GroupState::decode_snapshot(&state.encode_snapshot(), Limits::default()).unwrap();
        assert!(restored.sessions["s"].dedupe.is_none());
        let command = propose(
            &mut state,
            r#"{"type":"t","payload":1,"idempotency_key":"k"}"#,
        );
        state.commit(&command);
        assert_eq!(state.sessions["s"].dedupe.as_ref().unwrap().keys.len(), 1);
    }

    /// One producer appending forever leaves no pile of stale order items behind.
    #[test]
    fn producer_order_is_compacted() {
        let mut state = state_with_session(Limits::default());
        for i in 1..=1000 {
            let body =
                format!(r#"{{"type":"t","payload":1,"producer_id":"p","producer_seq":{i}}}"#);
            let command = propose(&mut state, &body);
            state.commit(&command);
        }
        let dedupe = state.sessions["s"].dedupe.as_deref().unwrap();
        assert_eq!(dedupe.producers.len(), 1);
        assert!(
            dedupe.producer_order.len() <= 2 + 16,
            "{}",
            dedupe.producer_order.len()
        );
        let ordered: Vec<_> = dedupe.producers_in_order().collect();
        assert_eq!(ordered.len(), 1);
        assert_eq!(ordered[0].1.producer_seq, 1000);
    }

    #[test]
    fn decisions_see_in_flight_patch_texts() {
        let mut state = state_with_session(Limits::default());
        let patch = validate::validate_patch(br#"{"metadata":{"a":1}}"#).unwrap();
        let command = state.decide_patch("s", &patch, T0).unwrap();
        state.apply(&command);
        let patch = validate::validate_patch(br#"{"metadata":{"b":2}}"#).unwrap();
        let Command::PatchSession(second) = state.decide_patch("s", &patch, T0).unwrap() else {
            panic!()
        };
        assert_eq!(
            (second.version, second.metadata.as_str()),
            (3, r#"{"a":1,"b":2}"#)
        );
        assert_eq!(second.at_us, T0 + 2);
        assert_eq!(
            state.view("s").unwrap().metadata,
            "{}",
            "reads see committed state only"
        );
    }

    #[test]
    fn producer_seq_at_u64_max_cannot_continue() {
        let mut state = state_with_session(Limits::default());
        let body = format!(
            r#"{{"type":"t","payload":1,"producer_id":"p","producer_seq":{}}}"#,
            u64::MAX
        );
        let command = propose(&mut state, &body);
        state.commit(&command);
        let other = format!(
            r#"{{"type":"t","payload":2,"producer_id":"p","producer_seq":{}}}"#,
            u64::MAX
        );
        assert_eq!(
            state.decide_append("s", &event(&other), T0),
            Err(AppendError::ProducerSeqConflict {
                expected_producer_seq: u64::MAX
            })
        );
    }
}
