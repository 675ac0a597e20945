//! Snapshots: the shard snapshot (event index, resume position, every group's
//! committed state) that bounds replay after a restart, and a leader's snapshot of one
//! group (its state and every event of its sessions) for a follower too far behind.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use shards::raft::SnapshotMeta;
use shards::session::GroupState;
use shards::snapshot::GroupTransfer;
use shards::storage::FileKind;

use super::ShardCore;

/// The shard snapshot's state, shared by the committer (which starts one between two
/// batches), the task that writes it, retention (which deletes only what a durable
/// snapshot covers) and damage (which wants one soon).
pub(super) struct Snapshots {
    /// A snapshot is being written.
    running: bool,
    /// One is wanted at the next batch (damage was found or repaired).
    soon: bool,
    /// Replay after a restart starts in this segment (the last durable snapshot's).
    resume_epoch: u64,
}

impl Snapshots {
    pub(super) fn new(resume_epoch: u64, soon: bool) -> Snapshots {
        Snapshots {
            running: false,
            soon,
            resume_epoch,
        }
    }

    pub(super) fn running(&self) -> bool {
        self.running
    }

    pub(super) fn resume_epoch(&self) -> u64 {
        self.resume_epoch
    }

    /// Asks for a snapshot at the next batch, so that its resume position passes
    /// damage just found or repaired and a restart never replays through it.
    pub(super) fn want_soon(&mut self) {
        self.soon = true;
    }

    /// Whether the committer starts a snapshot now: one is due (`by_bytes`, or wanted
    /// soon), none is running, and no index file is pending (a snapshot never covers a
    /// sealed segment without its index file). Starting one satisfies the wish.
    pub(super) fn start_due(&mut self, by_bytes: bool, indexes_pending: bool) -> bool {
        if !(by_bytes || self.soon) || self.running || indexes_pending {
            return false;
        }
        self.soon = false;
        true
    }
}

/// Bytes of events one snapshot for a follower may carry, at most.
const SNAPSHOT_TRANSFER_BYTES_MAX: usize = 512 << 20;

/// After a snapshot's history is indexed: a session whose events the leader no longer
/// had (retention) restarts its local history after its head.
pub(super) fn rebase_missing(store: &mut crate::store::EventStore, state: &GroupState) {
    for view in state.views() {
        if store.last_seq(&view.id) < view.last_seq {
            store.rebase(&view.id, view.last_seq);
        }
    }
}

fn events_bytes(events: &[shards::entry::AppendEntry]) -> usize {
    events.iter().map(super::event_bytes).sum()
}

impl ShardCore {
    /// Leader: reads the group's state and history and hands them to Raft for `peer`.
    pub(super) async fn build_snapshot(self: Rc<Self>, group: u16, peer: u64) {
        // Spawned from inside `process` (which holds the groups): start on a later turn.
        futures_lite::future::yield_now().await;
        let captured = {
            let groups = self.groups.borrow();
            let Some(g) = groups.get(&group) else { return };
            let sessions: Vec<(String, u64)> = g
                .state
                .views()
                .map(|v| (v.id.clone(), v.last_seq))
                .collect();
            (
                SnapshotMeta {
                    index: g.applied,
                    term: g.applied_term,
                },
                g.state.encode_snapshot(),
                g.checksum,
                sessions,
            )
        };
        let (meta, state, checksum, sessions) = captured;
        let events = self.read_history(&sessions).await;
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(&group) else {
            return;
        };
        g.building_snapshot = false;
        let sent = match events {
            Ok(events) => {
                let data = GroupTransfer {
                    state,
                    checksum,
                    events,
                }
                .encode();
                g.raft
                    .send_snapshot(peer, meta, data)
                    .map_err(|e| format!("{e:?}"))
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => self.stats.borrow_mut().snapshots_sent += 1,
            Err(e) => {
                tracing::warn!(shard = self.index, group, peer, error = %e, "no snapshot sent");
                g.raft.snapshot_failed(peer);
            }
        }
        drop(groups);
        self.process(group);
        self.flush_outbox();
    }

    /// Every event of the given sessions up to the given seqs, read back from the log.
    async fn read_history(
        &self,
        sessions: &[(String, u64)],
    ) -> Result<Vec<shards::entry::AppendEntry>, String> {
        let mut events = Vec::new();
        for (id, last) in sessions {
            let room = SNAPSHOT_TRANSFER_BYTES_MAX.saturating_sub(events_bytes(&events));
            let base = self.store.borrow().first_local_seq(id) - 1;
            let (read, complete) = self.read_log_events(id, base, *last, room).await?;
            if !complete || read.len() as u64 != last - base.min(*last) {
                return Err(format!(
                    "{id}: {} of {last} events read (history over {SNAPSHOT_TRANSFER_BYTES_MAX} bytes or not indexed)",
                    read.len()
                ));
            }
            events.extend(read);
        }
        Ok(events)
    }

    /// Captures the event index, the resume position and the entries not applied yet
    /// (between two batches of the committer) and writes a snapshot in the background.
    pub(super) fn start_snapshot(self: &Rc<Self>) {
        self.snapshots.borrow_mut().running = true;
        let resume = self.log.borrow().durable_position;
        let sessions = self.store.borrow().capture();
        let entries = self.capture_entries();
        let task = self.clone().write_snapshot(resume, sessions, entries);
        glommio::spawn_local(task).detach();
    }

    /// Writes a shard snapshot: the event index, the resume position and the entries not
    /// applied yet (captured together by the committer between batches), then each
    /// group's committed state, one group per step so the shard keeps serving.
    async fn write_snapshot(
        self: Rc<Self>,
        resume: (u64, u64),
        sessions: Vec<shards::snapshot::SessionIndex>,
        mut entries: HashMap<u16, Vec<shards::snapshot::SnapshotEntry>>,
    ) {
        let started = Instant::now();
        let ids = self.group_ids();
        let mut groups = Vec::with_capacity(ids.len());
        for group in ids {
            let captured = entries.remove(&group).unwrap_or_default();
            if let Some(snap) = self.group_snapshot(group, captured) {
                groups.push(snap);
            }
            futures_lite::future::yield_now().await;
        }
        let snapshot = shards::snapshot::ShardSnapshot {
            resume_epoch: resume.0,
            resume_offset: resume.1,
            groups,
            sessions,
        };
        // Layout: `shards::snapshot` (module docs), read back by `load_snapshot`.
        let bytes = snapshot.encode_file(shards::codec::BLOCK_BYTES);
        let total = bytes.len();
        match crate::wal::write_file_durably(&self.dir, super::recovery::SNAPSHOT_FILE, &bytes)
            .await
        {
            Ok(()) => {
                self.snapshots.borrow_mut().resume_epoch = resume.0;
                self.space.record(FileKind::Snapshot, Ok(()));
                tracing::info!(
                    shard = self.index,
                    bytes = total,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot written"
                )
            }
            Err(e) => {
                let error = format!("writing the snapshot in {}: {e}", self.dir.display());
                self.space
                    .record(FileKind::Snapshot, Err((crate::wal::reason_of(&e), error)));
            }
        }
        self.snapshots.borrow_mut().running = false;
    }

    /// Every group's entries on disk and not applied yet, with their places: captured
    /// with the event index and the resume position, so that an entry written before
    /// that position and applied later is in the snapshot either way.
    fn capture_entries(&self) -> HashMap<u16, Vec<shards::snapshot::SnapshotEntry>> {
        let groups = self.groups.borrow();
        let mut out = HashMap::new();
        for (&group, g) in groups.iter() {
            let entries = g.unapplied_entries();
            if !entries.is_empty() {
                out.insert(group, entries);
            }
        }
        out
    }

    fn group_snapshot(
        &self,
        group: u16,
        entries: Vec<shards::snapshot::SnapshotEntry>,
    ) -> Option<shards::snapshot::GroupSnapshot> {
        let groups = self.groups.borrow();
        let g = groups.get(&group)?;
        let hard = g.raft.hard_state();
        Some(shards::snapshot::GroupSnapshot {
            group,
            committed_index: g.applied,
            state: g.state.encode_snapshot(),
            checksum: g.checksum,
            committed_term: g.applied_term,
            hard_term: hard.term,
            hard_vote: hard.vote.unwrap_or(0),
            entries,
        })
    }
}
