//! Rebuilding a shard at start: the shard snapshot, then every log record after its
//! resume position, into each group's replica (state machine, Raft log and hard state)
//! and the shard's event index.
//!
//! Each group's replay rules are `shards::replay` (the simulation replays with the same
//! code). Here: which records belong to which group, the history events a snapshot
//! install wrote before its `Snapshot` record (they become the group's events; history
//! without its `Snapshot` record, a crash during the install, is ignored), the event
//! index (events of entries the state already holds are indexed at the end of replay,
//! once truncation can no longer change them; later entries go back to Raft, which
//! hands the committed ones out again), segment seals and repaired copies.

use std::collections::HashMap;
use std::path::Path;

use shards::entry::{Command, MetaRecord, REPAIR_TERM};
use shards::session::Limits;
use shards::snapshot::ShardSnapshot;

use shards::replay::{Replay, Replayed};
use shards::replica::{Persisted, RecordLocation};

use super::{place_in_seal, ShardSettings};
use crate::store::EventStore;
use crate::wal::Replayed as LogItem;

pub(crate) const SNAPSHOT_FILE: &str = "snapshot";

/// What start-up found in the shard's snapshot file.
pub(super) enum Loaded {
    None,
    /// The snapshot, with notes on damage outside its checksummed body (harmless).
    Snapshot(Box<ShardSnapshot>, Vec<String>),
    /// The file is damaged: what, where (file and offsets).
    Damaged(String),
}

/// Reads the shard's snapshot, if there is one. Damage is reported, not fatal here: the
/// caller decides whether the log alone can replace the snapshot.
pub(super) async fn load_snapshot(dir: &Path) -> Result<Loaded, String> {
    // A crash while a snapshot was written leaves its temp file, which never became the
    // snapshot: its space goes back (it matters on a full disk).
    let _ = std::fs::remove_file(dir.join(format!("{SNAPSHOT_FILE}.tmp")));
    let path = dir.join(SNAPSHOT_FILE);
    let Some(bytes) = crate::wal::read_file(&path)
        .await
        .map_err(|e| format!("read {}: {e}", path.display()))?
    else {
        return Ok(Loaded::None);
    };
    Ok(
        match shards::snapshot::decode_snapshot_file(&bytes, shards::codec::BLOCK_BYTES) {
            Ok(file) => Loaded::Snapshot(Box::new(file.snapshot), file.notes),
            Err(e) => Loaded::Damaged(format!("{}: {e}", path.display())),
        },
    )
}

/// A damaged snapshot can be done without when the log still holds everything from its
/// first segment (the snapshot is only an optimisation over the log): replay then starts
/// there. Otherwise the start is refused, saying what to do.
pub(super) fn replay_without_snapshot(log_dir: &Path, damage: &str) -> Result<(), String> {
    let oldest = crate::wal::segment_epochs(log_dir)?.first().copied();
    match oldest {
        None | Some(1) => Ok(()),
        Some(oldest) => Err(format!(
            "refusing to start: the shard snapshot is damaged ({damage}). A snapshot is only \
             an optimisation over the log, but this log no longer starts at its first segment \
             (its oldest is segment {oldest}: retention deleted the older ones after a snapshot \
             covered them), so this replica cannot rebuild its state from its own files. In a \
             cluster, restore this node's data dir from a healthy replica (start it with \
             `starcite serve --rebuild`, see docs/deployment.md); a node alone: restore the \
             data dir from a backup. Deleting the snapshot file would not help: the state it \
             held is not in the log any more"
        )),
    }
}

/// The snapshot in the bytes of the file at `path` (see `shards::snapshot` for the
/// layout); damage outside its checksummed body is ignored here.
pub(crate) fn decode_snapshot_file(path: &Path, bytes: &[u8]) -> Result<ShardSnapshot, String> {
    shards::snapshot::decode_snapshot_file(bytes, shards::codec::BLOCK_BYTES)
        .map(|file| file.snapshot)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A history event seen during replay (waiting for its group's `Snapshot` record).
struct History {
    session: String,
    seq: u64,
    loc: RecordLocation,
    sealed: Option<u32>,
}

/// What replay hands back: each group, the event index, the segments sealed during
/// replay with their index file bodies, and the repaired copies of events that are not
/// indexed yet (their entries commit again once Raft restarts: apply them then).
pub(super) type ReplayOutcome = (
    HashMap<u16, Replayed>,
    EventStore,
    Vec<(u64, Vec<u32>)>,
    Vec<(String, u64, RecordLocation)>,
);

/// One group being replayed, and the history events of a snapshot install that wait
/// for its `Snapshot` record.
struct ReplayGroup {
    replay: Replay,
    history: Vec<History>,
}

impl ReplayGroup {
    fn new(replay: Replay) -> ReplayGroup {
        ReplayGroup {
            replay,
            history: Vec::new(),
        }
    }
}

pub(super) struct Recovery {
    shard: usize,
    shards: usize,
    limits: Limits,
    pub resume: (u64, u64),
    groups: HashMap<u16, ReplayGroup>,
    pub store: EventStore,
    /// Segments whose end replay passed, with their index file bodies (written after
    /// replay, before the shard serves).
    pub seals: Vec<(u64, Vec<u32>)>,
    /// Repaired copies of damaged events: (session, seq, where), applied at the end of
    /// replay, once the events they repair are indexed.
    repairs: Vec<(String, u64, RecordLocation)>,
}

impl Recovery {
    pub fn new(
        settings: &ShardSettings,
        snapshot: Option<ShardSnapshot>,
    ) -> Result<Recovery, String> {
        let mut recovery = Recovery {
            shard: settings.index,
            shards: settings.shards,
            limits: settings.limits,
            resume: (1, 0),
            groups: HashMap::new(),
            store: EventStore::new(settings.hot_bytes),
            seals: Vec::new(),
            repairs: Vec::new(),
        };
        if let Some(snapshot) = snapshot {
            recovery.resume = (snapshot.resume_epoch, snapshot.resume_offset);
            for g in snapshot.groups {
                let group = g.group;
                let replay = Replay::from_snapshot(g, settings.limits)?;
                recovery.groups.insert(group, ReplayGroup::new(replay));
            }
            recovery.store.restore(snapshot.sessions);
        }
        Ok(recovery)
    }

    pub fn replay(&mut self, item: LogItem) -> Result<(), String> {
        let (loc, crc, rec) = match item {
            LogItem::Record(loc, crc, rec) => (loc, crc, rec),
            LogItem::SegmentEnd(epoch) => {
                self.seal(epoch);
                return Ok(());
            }
        };
        if shards::shard_of(rec.group, self.shards) != self.shard {
            return Err(format!(
                "log record of group {} in shard {}'s log at {loc:?}",
                rec.group, self.shard
            ));
        }
        let limits = self.limits;
        let group = self
            .groups
            .entry(rec.group)
            .or_insert_with(|| ReplayGroup::new(Replay::new(limits)));
        let rec = *rec;
        if rec.index == 0 {
            match rec.command {
                Command::Append(e) if rec.term == REPAIR_TERM => {
                    self.repairs.push((e.session_id, e.seq, loc));
                }
                Command::Append(e) => group.history.push(History {
                    session: e.session_id,
                    seq: e.seq,
                    loc,
                    sealed: None,
                }),
                Command::Meta(MetaRecord::HardState { term, vote, commit }) => {
                    group.replay.hard_state(term, vote, commit);
                }
                Command::Meta(MetaRecord::Snapshot {
                    index,
                    term,
                    checksum,
                    state,
                }) => {
                    group
                        .replay
                        .snapshot(index, term, checksum, &state)
                        .map_err(|e| {
                            format!("snapshot record of group {} at {loc:?}: {e}", rec.group)
                        })?;
                    for h in std::mem::take(&mut group.history) {
                        if h.seq > self.store.last_seq(&h.session) + 1 {
                            // The leader no longer held older events (retention).
                            self.store.rebase(&h.session, h.seq - 1);
                        }
                        index_event(&mut self.store, &h.session, h.seq, h.loc, h.sealed);
                    }
                    super::snapshots::rebase_missing(&mut self.store, group.replay.state());
                }
                other => {
                    return Err(format!(
                        "log record at {loc:?} has index 0 but holds {other:?}"
                    ))
                }
            }
            return Ok(());
        }
        let persisted = Persisted {
            term: rec.term,
            loc,
            crc,
            sealed: None,
        };
        group
            .replay
            .entry(rec.index, rec.term, rec.command, persisted);
        Ok(())
    }

    /// A segment ended: its events get their index file, including entries not yet
    /// known to be committed (their offsets go at the end, for `insert_sealed`).
    fn seal(&mut self, epoch: u64) {
        let mut plan = self.store.plan_seal(epoch as u32);
        let mut ids: Vec<u16> = self.groups.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let group = self.groups.get_mut(&id).expect("listed");
            for p in group.replay.places_mut() {
                place_in_seal(p.loc, &mut p.sealed, epoch, &mut plan.offsets);
            }
            for h in group.history.iter_mut() {
                place_in_seal(h.loc, &mut h.sealed, epoch, &mut plan.offsets);
            }
        }
        let offsets = self.store.apply_seal(plan);
        self.seals.push((epoch, offsets));
    }

    /// Ends replay: indexes the events the states hold and hands back each group.
    pub fn finish(mut self) -> ReplayOutcome {
        let mut out = HashMap::new();
        let mut ids: Vec<u16> = self.groups.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let g = self.groups.remove(&id).expect("listed");
            let replayed = g.replay.finish();
            for seen in replayed.applied_records.values() {
                if let Some((session, seq)) = &seen.event {
                    let p = &seen.persisted;
                    index_event(&mut self.store, session, *seq, p.loc, p.sealed);
                }
            }
            out.insert(id, replayed);
        }
        let mut later = Vec::new();
        for (session, seq, loc) in std::mem::take(&mut self.repairs) {
            if !self.store.repair(&session, seq, loc.epoch, loc.offset) {
                later.push((session, seq, loc));
            }
        }
        (out, self.store, self.seals, later)
    }
}

/// Indexes a replayed event the state holds (unless the index already has it).
fn index_event(
    store: &mut EventStore,
    session: &str,
    seq: u64,
    loc: RecordLocation,
    sealed: Option<u32>,
) {
    if seq == store.last_seq(session) + 1 {
        store.insert_at(session, seq, loc.epoch, loc.offset, sealed, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::RaftSettings;
    use shards::entry::{AppendEntry, CreateSession, LogRecord};
    use std::time::Duration;

    fn settings() -> ShardSettings {
        ShardSettings {
            archive: None,
            retention: Default::default(),
            catch_up: None,
            scrub_bytes_per_sec: 0,
            index: 0,
            shards: 1,
            limits: Limits {
                dedupe_keys_max: 100,
                producers_max: 100,
            },
            request_timeout: Duration::from_secs(1),
            hot_bytes: 1 << 20,
            node_id: 1,
            members: vec![1, 2, 3],
            raft: RaftSettings {
                tick: Duration::from_millis(10),
                election_ticks: 10,
                heartbeat_ticks: 2,
                log_entries: 100,
            },
        }
    }

    const G: u16 = 5;

    pub(super) fn create(id: &str) -> Command {
        Command::CreateSession(CreateSession {
            session_id: id.into(),
            title: None,
            metadata: "{}".into(),
            at_us: 1,
        })
    }

    pub(super) fn append(id: &str, seq: u64, payload: &str) -> Command {
        Command::Append(AppendEntry {
            session_id: id.into(),
            seq,
            inserted_at_us: 2,
            event_type: "t".into(),
            payload: payload.into(),
            actor: None,
            source: None,
            metadata: "{}".into(),
            refs: "{}".into(),
            idempotency_key: None,
            producer_id: None,
            producer_seq: None,
            digest: [0; 16],
        })
    }

    /// Feeds records at consecutive offsets of segment 1.
    struct Feed {
        recovery: Recovery,
        offset: u32,
    }

    impl Feed {
        fn new() -> Feed {
            Feed {
                recovery: Recovery::new(&settings(), None).unwrap(),
                offset: 0,
            }
        }

        fn record(&mut self, term: u64, index: u64, command: Command) {
            let rec = LogRecord {
                group: G,
                term,
                index,
                command,
            };
            let loc = RecordLocation {
                epoch: 1,
                offset: self.offset,
            };
            self.offset += 64;
            self.recovery
                .replay(LogItem::Record(loc, self.offset, Box::new(rec)))
                .unwrap();
        }

        fn hard(&mut self, term: u64, vote: u64, commit: u64) {
            self.record(
                term,
                0,
                Command::Meta(MetaRecord::HardState { term, vote, commit }),
            );
        }
    }

    fn terms(g: &Replayed) -> Vec<(u64, u64)> {
        g.raft.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn a_rewritten_entry_replaces_it_and_everything_after_it() {
        let mut f = Feed::new();
        f.record(1, 1, Command::Noop);
        f.record(1, 2, create("s"));
        f.record(1, 3, append("s", 1, "1"));
        f.record(1, 4, append("s", 2, "2"));
        // A new leader of term 2 overwrote the suffix from index 3.
        f.record(2, 3, append("s", 1, "\"other\""));
        let (groups, store, _, _) = f.recovery.finish();
        let g = &groups[&G];
        assert_eq!(terms(g), vec![(1, 1), (2, 1), (3, 2)]);
        assert_eq!(
            g.recovered.persisted.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(g.recovered.persisted[&3].term, 2);
        // Nothing is indexed before it commits.
        assert_eq!(store.last_seq("s"), 0);
    }

    #[test]
    fn an_older_hard_state_never_rolls_back_term_or_vote() {
        let mut f = Feed::new();
        f.hard(3, 2, 0);
        f.hard(2, 1, 0);
        f.hard(3, 0, 0);
        let (groups, _, _, _) = f.recovery.finish();
        let h = groups[&G].raft.hard_state;
        assert_eq!((h.term, h.vote), (3, Some(2)));
    }

    #[test]
    fn the_commit_index_is_clamped_to_the_entries_on_disk() {
        let mut f = Feed::new();
        f.record(1, 1, Command::Noop);
        f.hard(1, 1, 9);
        let (groups, _, _, _) = f.recovery.finish();
        assert_eq!(groups[&G].raft.hard_state.commit, 1);
    }

    #[test]
    fn a_snapshot_record_replaces_the_state_and_indexes_its_history() {
        let mut f = Feed::new();
        f.record(1, 1, Command::Noop);
        f.record(1, 2, append("stale", 1, "1")); // voided by the snapshot
        let mut state = shards::session::GroupState::new(settings().limits);
        state.apply(&create("s"));
        state.commit(&create("s"));
        for seq in 1..=2 {
            state.apply(&append("s", seq, "0"));
            state.commit(&append("s", seq, "0"));
        }
        f.record(0, 0, append("s", 1, "0"));
        f.record(0, 0, append("s", 2, "0"));
        f.record(
            4,
            0,
            Command::Meta(MetaRecord::Snapshot {
                index: 10,
                term: 4,
                checksum: 77,
                state: state.encode_snapshot(),
            }),
        );
        f.record(4, 11, append("s", 3, "0"));
        let (groups, store, _, _) = f.recovery.finish();
        let g = &groups[&G];
        assert_eq!(
            (
                g.recovered.applied,
                g.recovered.applied_term,
                g.recovered.checksum
            ),
            (10, 4, 77)
        );
        assert_eq!(g.recovered.state.view("s").unwrap().last_seq, 2);
        assert_eq!(terms(g), vec![(11, 4)]);
        assert_eq!(store.last_seq("s"), 2);
        assert_eq!(store.last_seq("stale"), 0);
        assert!(g.raft.hard_state.commit >= 10);
    }

    #[test]
    fn a_repaired_copy_is_where_replay_indexes_the_event() {
        let mut f = Feed::new();
        f.record(1, 1, create("s"));
        f.record(1, 2, append("s", 1, "1"));
        f.record(1, 3, append("s", 2, "2"));
        f.hard(1, 1, 3);
        // Event 1's record was damaged; its copy from a peer was appended later.
        f.record(REPAIR_TERM, 0, append("s", 1, "1"));
        let copy_at = f.offset - 64;
        // A repair of an event this replica does not hold is ignored.
        f.record(REPAIR_TERM, 0, append("s", 9, "9"));
        let (groups, store, _, later) = f.recovery.finish();
        assert_eq!(groups[&G].raft.entries.len(), 3, "a repair is not an entry");
        // The entries are not applied yet (Raft hands them out again at start), so the
        // event is not indexed: its repair is handed back, to apply once it is.
        assert_eq!(store.repaired_count(), 0);
        let at = RecordLocation {
            epoch: 1,
            offset: copy_at,
        };
        assert_eq!(later[0], ("s".to_string(), 1, at));
        assert_eq!(later.len(), 2);
    }

    #[test]
    fn history_without_its_snapshot_record_is_ignored() {
        let mut f = Feed::new();
        f.record(0, 0, append("s", 1, "0"));
        f.record(0, 0, append("s", 2, "0"));
        let (groups, store, _, _) = f.recovery.finish();
        assert_eq!(store.last_seq("s"), 0);
        assert_eq!(groups[&G].recovered.applied, 0);
    }

    #[test]
    fn a_damaged_snapshot_is_replaced_by_the_log_only_when_it_starts_at_segment_one() {
        let dir = std::env::temp_dir().join(format!("starcite-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let damage = "/data/shard-000/snapshot: checksum mismatch at offset 8";
        assert!(replay_without_snapshot(&dir, damage).is_ok(), "no log yet");
        for epoch in [1u64, 2] {
            std::fs::write(dir.join(format!("{epoch:020}.seg")), b"").unwrap();
        }
        assert!(replay_without_snapshot(&dir, damage).is_ok());
        std::fs::remove_file(dir.join(format!("{:020}.seg", 1))).unwrap();
        let refusal = replay_without_snapshot(&dir, damage).unwrap_err();
        assert!(refusal.contains(damage), "{refusal}");
        assert!(refusal.contains("oldest is segment 2"), "{refusal}");
        assert!(
            refusal.contains("--rebuild") && refusal.contains("backup"),
            "{refusal}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_of_another_shards_group_refuses_the_log() {
        let mut s = settings();
        s.shards = 2;
        s.index = 0;
        let mut recovery = Recovery::new(&s, None).unwrap();
        let rec = LogRecord {
            group: 1,
            term: 1,
            index: 1,
            command: Command::Noop,
        };
        let loc = RecordLocation {
            epoch: 1,
            offset: 0,
        };
        assert!(recovery
            .replay(LogItem::Record(loc, 0, Box::new(rec)))
            .is_err());
    }
}
