//! The Raft shell of a shard: it performs every group's `Ready` (see
//! `shards::raft` for the rules), runs the shard's one committer (one log batch and one
//! durable write for the records of every group), the Raft clock, the peer transport
//! and the requests forwarded between nodes.
//!
//! Messages to one peer node are gathered while a turn of work runs and sent at its
//! end ([`ShardCore::flush_outbox`]); heartbeats of all groups to one peer become one
//! frame. AppendEntries leave before the leader's own write of the same entries.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use glommio::channels::local_channel::LocalReceiver;
use shards::entry::{Command, LogRecord};
use shards::forwarding::{Forwards, ReplyMatch};
use shards::peer::{HeartbeatAck, HeartbeatItem, PeerFrame, RequestId, HEARTBEAT_ITEMS_MAX};
use shards::raft::{Body, Entry, Message, Payload, Role, SnapshotMeta};
use shards::replica::{hard_state_record, Durable, Persisted, Shell, Write};
use shards::session::GroupState;
use shards::snapshot::GroupTransfer;
use shards::storage::FileKind;
use shards::validate::render_event;
use shards::wire::{ClusterSettings, Handshake, WIRE_VERSION};

use super::storage::STORAGE_RETRY_PERIOD;
use super::{command_bytes, ShardCore, FORWARDED_IN_FLIGHT_MAX};
use crate::node::with_timeout;
use crate::ops::{ApiError, Reply};
use crate::transport::{shard_peer_addr, Incoming, Transport, TransportConfig};
use crate::wal::{RecordLocation, Wal};

/// Bytes of events one snapshot for a follower may carry, at most.
const SNAPSHOT_TRANSFER_BYTES_MAX: usize = 512 << 20;
/// Bound of one peer's send queue.
const SEND_QUEUE_BYTES_MAX: usize = 64 << 20;
/// In each shard dir: the data dir incarnation of every peer (`transport::incarnations`).
const PEER_INCARNATIONS_FILE: &str = "peers.json";

/// How this node reaches the others.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub cluster_id: String,
    /// This process's incarnation (random, new at every start, never 0): see
    /// `shards::peer::RequestId`.
    pub incarnation: u64,
    /// This node's shard-0 peer address (shard i listens on its port + i).
    pub listen: SocketAddr,
    /// Every OTHER member's shard-0 peer address.
    pub peers: Vec<(u64, SocketAddr)>,
    pub settings: ClusterSettings,
    /// This node's data dir incarnation (`crate::datadir`).
    pub data_incarnation: u64,
}

/// Log records of one group's Ready (or of the shard's own upkeep), and what to do once
/// they are durable (`shards::replica::Durable`).
pub(super) struct WriteUnit {
    group: u16,
    records: Vec<LogRecord>,
    durable: Durable,
}

impl WriteUnit {
    /// Records that are not Raft entries and need nothing once durable but their own
    /// handling in `on_record_durable` (repaired copies of damaged events).
    pub(super) fn records_only(group: u16, records: Vec<LogRecord>) -> WriteUnit {
        WriteUnit {
            group,
            records,
            durable: Durable::default(),
        }
    }
}

/// What a group's replica asks of this shard (`shards::replica::Shell`) while one of
/// its steps runs; the shard's groups are borrowed meanwhile.
struct Effects<'a> {
    core: &'a ShardCore,
    group: u16,
}

impl Shell<oneshot::Sender<bool>> for Effects<'_> {
    fn send(&mut self, msg: Message<Command>) {
        self.core.queue_message(self.group, msg);
    }

    fn write(&mut self, write: Write) {
        self.core.queue_unit(WriteUnit {
            group: self.group,
            records: write.records,
            durable: write.durable,
        });
    }

    /// A committed event becomes readable and its tails wake.
    fn applied(&mut self, entry: &Entry<Command>, place: &Persisted) {
        let Payload::Data(Command::Append(a)) = &entry.payload else {
            return;
        };
        let mut store = self.core.store.borrow_mut();
        let indexed = store.last_seq(&a.session_id);
        if a.seq == indexed + 1 {
            let text: Arc<str> = Arc::from(render_event(a));
            let (epoch, offset) = (place.loc.epoch, place.loc.offset);
            store.insert_at(
                &a.session_id,
                a.seq,
                epoch,
                offset,
                place.sealed,
                Some(text),
            );
        } else if a.seq > indexed + 1 {
            panic!(
                "fail-stop: event index has a gap: shard {} group {} session {} seq {} \
                 committed at index {} while the index ends at seq {indexed}",
                self.core.index, self.group, a.session_id, a.seq, entry.index
            );
        }
        drop(store);
        self.core.wake_tails(&a.session_id);
    }

    fn release(&mut self, waiter: oneshot::Sender<bool>, committed: bool) {
        let _ = waiter.send(committed);
    }

    fn leadership(&mut self, leading: bool) {
        let mut stats = self.core.stats.borrow_mut();
        if leading {
            stats.elections_won += 1;
        } else {
            stats.leaderships_lost += 1;
        }
    }

    fn installed(&mut self, meta: SnapshotMeta, events: usize) {
        tracing::info!(
            shard = self.core.index,
            group = self.group,
            index = meta.index,
            events,
            "installing snapshot"
        );
        self.core.stats.borrow_mut().snapshots_installed += 1;
    }
}

/// Messages gathered for one peer node during a turn.
#[derive(Default)]
struct Outbox {
    frames: Vec<PeerFrame>,
    heartbeats: Vec<HeartbeatItem>,
    acks: Vec<HeartbeatAck>,
}

#[derive(Default)]
pub(super) struct Peers {
    me: Weak<ShardCore>,
    transport: Option<Rc<Transport>>,
    outbox: BTreeMap<u64, Outbox>,
    /// Requests this shard forwarded and waits for (set with the transport).
    forwards: Option<Forwards<oneshot::Sender<Reply>>>,
    forwarded_in_flight: usize,
}

/// Fault injection (`PUT /debug/faults`, test builds of a cluster): while set, every
/// shard of this process drops every frame to and from other nodes.
static ISOLATED: AtomicBool = AtomicBool::new(false);

pub fn set_isolated(isolated: bool) {
    ISOLATED.store(isolated, Ordering::Relaxed);
}

fn isolated() -> bool {
    ISOLATED.load(Ordering::Relaxed)
}

pub(super) enum ForwardError {
    /// Never left this node (no connection, full queue): safe to retry.
    NotSent,
    /// No answer in time: the outcome is unknown.
    TimedOut,
    /// The target went away or stopped leading while the request was out: the outcome
    /// is unknown.
    Abandoned,
}

/// Starts the shard's peer transport and the task that serves what arrives on it.
pub fn start_transport(core: &Rc<ShardCore>, peer: PeerSettings) -> Result<(), String> {
    let shard = core.index as u32;
    let mut members: Vec<u64> = peer.peers.iter().map(|p| p.0).collect();
    members.push(core.node_id);
    let config = TransportConfig {
        node_id: core.node_id,
        shard,
        shards: core.shards as u32,
        listen: shard_peer_addr(peer.listen, shard),
        peers: peer
            .peers
            .iter()
            .map(|&(id, addr)| (id, shard_peer_addr(addr, shard)))
            .collect(),
        members,
        handshake: Handshake {
            wire_version: WIRE_VERSION,
            cluster_id: peer.cluster_id,
            node_id: core.node_id,
            shards: core.shards as u32,
            shard,
            incarnation: peer.incarnation,
            settings: peer.settings,
            data_incarnation: peer.data_incarnation,
        },
        send_queue_bytes_max: SEND_QUEUE_BYTES_MAX,
        reconnect_backoff_min: Duration::from_millis(20),
        reconnect_backoff_max: Duration::from_millis(500),
        incarnations_file: Some(core.dir.join(PEER_INCARNATIONS_FILE)),
    };
    let forwards = Forwards::new(peer.incarnation);
    let (transport, incoming) = Transport::start(config)?;
    let mut peers = core.peers.borrow_mut();
    peers.transport = Some(transport);
    peers.forwards = Some(forwards);
    drop(peers);
    glommio::spawn_local(core.clone().run_incoming(incoming)).detach();
    Ok(())
}

impl ShardCore {
    /// Peers that refused this node's handshake (and why), and how many handshakes this
    /// shard refused for a new data dir.
    pub(super) fn refusals(&self) -> (BTreeMap<u64, String>, u64) {
        match &self.peers.borrow().transport {
            Some(t) => (t.refused_by(), t.stats().new_data_dir_refusals),
            None => (BTreeMap::new(), 0),
        }
    }

    /// Starts the Raft clock and hands out what recovery left committed. A group with
    /// one voter elects itself at once.
    pub(super) async fn start_raft(self: &Rc<Self>) {
        self.peers.borrow_mut().me = Rc::downgrade(self);
        let ids = self.group_ids();
        for &group in &ids {
            self.process(group);
        }
        let election_ticks = self.raft_settings.election_ticks;
        for &group in &ids {
            let alone = self
                .groups
                .borrow()
                .get(&group)
                .is_some_and(|g| g.raft.voters().len() == 1);
            if !alone {
                continue;
            }
            for _ in 0..election_ticks * 4 {
                let leading = {
                    let mut groups = self.groups.borrow_mut();
                    let g = groups.get_mut(&group).expect("listed");
                    g.tick();
                    g.raft.role() == Role::Leader
                };
                self.process(group);
                if leading {
                    break;
                }
            }
        }
        glommio::spawn_local(self.clone().run_clock()).detach();
    }

    /// Hands the proposals of each executor turn to Raft, group by group, and sends
    /// what that produced.
    pub(super) async fn run_driver(self: Rc<Self>, wake: LocalReceiver<()>) {
        while wake.recv().await.is_some() {
            let groups = std::mem::take(&mut *self.proposed.borrow_mut());
            for group in groups {
                self.process(group);
            }
            self.flush_outbox();
        }
    }

    pub(super) fn group_ids(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.groups.borrow().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Ticks every group, compacts applied Raft logs, sends what that produced.
    async fn run_clock(self: Rc<Self>) {
        let tick = self.raft_settings.tick;
        let keep = self.raft_settings.log_entries;
        let ids = self.group_ids();
        let mut next = Instant::now() + tick;
        loop {
            let now = Instant::now();
            if next > now {
                glommio::timer::sleep(next - now).await;
            }
            next += tick;
            if Instant::now() > next + tick * 10 {
                next = Instant::now() + tick; // far behind (a stall): do not burst
            }
            for &group in &ids {
                {
                    let mut groups = self.groups.borrow_mut();
                    let g = groups.get_mut(&group).expect("listed");
                    g.tick();
                    g.compact(keep);
                }
                self.process(group);
            }
            self.feed_archive();
            self.flush_outbox();
            self.check_caught_up();
        }
    }

    /// A rebuild is under way: once no group of this shard is catching up any more
    /// (each persisted what a leader of its term had committed), the shard reports it
    /// once; the last shard removes the marker (`crate::rebuild`).
    fn check_caught_up(&self) {
        if self.rebuild.borrow().is_none() && self.tail_marker.borrow().is_none() {
            return;
        }
        if self
            .groups
            .borrow()
            .values()
            .any(|g| g.raft.is_catching_up())
        {
            return;
        }
        if let Some(tracker) = self.rebuild.borrow_mut().take() {
            tracker.shard_caught_up(self.index);
        }
        if let Some(marker) = self.tail_marker.borrow_mut().take() {
            // Blocking, once: unlink, then make the unlink durable. If it fails the marker
            // stays and the next start catches up once more, which is safe.
            let removed = std::fs::remove_file(&marker)
                .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
            match removed {
                Ok(()) => tracing::info!(
                    shard = self.index,
                    "caught up after a damaged log tail: every group votes again"
                ),
                Err(e) => {
                    tracing::error!(shard = self.index, error = %e, "removing {} failed", marker.display())
                }
            }
        }
    }

    /// Writes each group's term and vote as log records (the hard state a rebuild
    /// carried over, which Raft already holds but the new log does not).
    pub(super) fn write_hard_states(&self, states: Vec<(u16, shards::raft::HardState)>) {
        for (group, h) in states {
            self.queue_unit(WriteUnit::records_only(
                group,
                vec![hard_state_record(group, h)],
            ));
        }
    }

    /// Performs every Ready the group has (`shards::replica`), and starts building the
    /// snapshots its followers need. A replica that must stop stops the process.
    pub(super) fn process(&self, group: u16) {
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(&group) else {
            return;
        };
        let snapshot_for = match g.step(&mut Effects { core: self, group }) {
            Ok(peers) => peers,
            Err(stop) => panic!("fail-stop: shard {} group {group}: {stop}", self.index),
        };
        for peer in snapshot_for {
            match self.peers.borrow().me.upgrade() {
                Some(me) => {
                    glommio::spawn_local(me.build_snapshot(group, peer)).detach();
                }
                None => {
                    g.building_snapshot = false;
                    g.raft.snapshot_failed(peer);
                }
            }
        }
    }

    pub(super) fn queue_unit(&self, unit: WriteUnit) {
        let bytes: usize = unit.records.iter().map(|r| command_bytes(&r.command)).sum();
        self.units_records
            .set(self.units_records.get() + unit.records.len());
        self.units_bytes.set(self.units_bytes.get() + bytes);
        self.units.borrow_mut().push_back(unit);
        let _ = self.wake_committer.try_send(());
    }

    pub(super) fn wake_tails(&self, session: &str) {
        if let Some(waiters) = self.tail_waiters.borrow_mut().remove(session) {
            for tx in waiters {
                let _ = tx.send(());
            }
        }
    }

    /// Leader: reads the group's state and history and hands them to Raft for `peer`.
    async fn build_snapshot(self: Rc<Self>, group: u16, peer: u64) {
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

    // ---- the committer ----

    /// One batch write (one durable write) for every record queued while the previous
    /// batch was being written, then each Ready's persisted report and messages. It also
    /// wakes every `STORAGE_RETRY_PERIOD` without a write: a file creation that failed in
    /// the background (the next segment's pre-write) is tried again even when no write
    /// comes (client writes are refused meanwhile), see `storage`.
    pub(super) async fn run_committer(self: Rc<Self>, mut wal: Wal, wake: LocalReceiver<()>) {
        let mut bytes_since_snapshot = 0u64;
        loop {
            if let Some(None) = with_timeout(STORAGE_RETRY_PERIOD, wake.recv()).await {
                return;
            }
            if self.storage_needs_retry(&wal) {
                self.retry_storage(&mut wal, true).await;
            }
            self.write_queued(&mut wal, &mut bytes_since_snapshot).await;
        }
    }

    /// Writes every queued unit, batch after batch, until none is left.
    async fn write_queued(self: &Rc<Self>, wal: &mut Wal, bytes_since_snapshot: &mut u64) {
        loop {
            let mut units: Vec<WriteUnit> = self.units.borrow_mut().drain(..).collect();
            self.units_records.set(0);
            self.units_bytes.set(0);
            if units.is_empty() {
                return;
            }
            let mut records = Vec::new();
            for unit in units.iter_mut() {
                records.append(&mut unit.records);
            }
            let mut done = 0;
            while done < records.len() {
                let Some(written) = wal.write(&records[done..]).await else {
                    self.wait_for_segment(wal).await;
                    continue;
                };
                self.log_unblocked();
                if let Some(epoch) = written.sealed {
                    self.seal(wal, epoch).await;
                }
                self.durable_position.set(wal.durable_position());
                self.record_write(&written);
                *bytes_since_snapshot += written.bytes as u64;
                let placed = written.locations.iter().zip(&written.crcs);
                for (record, (loc, crc)) in records[done..].iter().zip(placed) {
                    self.on_record_durable(record, *loc, *crc);
                }
                done += written.taken;
            }
            for unit in units {
                self.complete_unit(unit);
            }
            self.flush_outbox();
            // A snapshot never covers a sealed segment whose index file is not written.
            // Damage found or repaired wants one soon (`damage`): the resume position then
            // passes it, so a restart never replays through it.
            let due = *bytes_since_snapshot >= self.snapshot_log_bytes || self.snapshot_soon.get();
            if due && !self.snapshot_running.get() && self.sealing.borrow().is_empty() {
                *bytes_since_snapshot = 0;
                self.snapshot_soon.set(false);
                self.start_snapshot();
            }
        }
    }

    /// Captures the event index, the resume position and the entries not applied yet
    /// (between two batches of the committer) and writes a snapshot in the background.
    pub(super) fn start_snapshot(self: &Rc<Self>) {
        self.snapshot_running.set(true);
        let resume = self.durable_position.get();
        let sessions = self.store.borrow().capture();
        let entries = self.capture_entries();
        let task = self.clone().write_snapshot(resume, sessions, entries);
        glommio::spawn_local(task).detach();
    }

    fn record_write(&self, written: &crate::wal::Written) {
        let mut stats = self.stats.borrow_mut();
        stats.fsyncs += 1;
        stats.fsync_latency.record(written.fsync_us);
        stats.log_bytes_written += written.bytes as u64;
    }

    /// A record is durable: an entry's place is remembered until it commits; a history
    /// event (snapshot install) is indexed at once.
    fn on_record_durable(&self, record: &LogRecord, loc: RecordLocation, crc: u32) {
        if record.index > 0 {
            if let Some(g) = self.groups.borrow_mut().get_mut(&record.group) {
                g.entry_durable(record.index, record.term, loc, crc);
            }
            return;
        }
        if let Command::Append(e) = &record.command {
            if record.term == shards::entry::REPAIR_TERM {
                self.repaired_durable(e, loc);
                return;
            }
            let mut store = self.store.borrow_mut();
            let indexed = store.last_seq(&e.session_id);
            if e.seq > indexed + 1 {
                // The leader's history starts later (retention deleted older events).
                store.rebase(&e.session_id, e.seq - 1);
            }
            if e.seq == store.last_seq(&e.session_id) + 1 {
                let text: Arc<str> = Arc::from(render_event(e));
                store.insert(&e.session_id, e.seq, loc.epoch, loc.offset, Some(text));
            }
            drop(store);
            self.wake_tails(&e.session_id);
        }
    }

    fn complete_unit(&self, unit: WriteUnit) {
        let group = unit.group;
        {
            let mut groups = self.groups.borrow_mut();
            if let Some(g) = groups.get_mut(&group) {
                let installed = unit.durable.snapshot.is_some();
                g.durable(unit.durable, &mut Effects { core: self, group });
                if installed {
                    rebase_missing(&mut self.store.borrow_mut(), &g.state);
                }
            }
        }
        self.process(group);
    }

    /// Seals segment `epoch`: its index file lists the committed events' offsets, then
    /// those of entries written there and not committed yet (they are indexed through
    /// their place in the file when they commit). The store switches at once; readers
    /// use the in-memory offsets until the file is durable.
    async fn seal(&self, wal: &Wal, epoch: u64) {
        let offsets = {
            let mut store = self.store.borrow_mut();
            let mut plan = store.plan_seal(epoch as u32);
            let mut groups = self.groups.borrow_mut();
            let mut ids: Vec<u16> = groups.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                let g = groups.get_mut(&id).expect("listed");
                for p in g.persisted.values_mut() {
                    super::place_in_seal(p.loc, &mut p.sealed, epoch, &mut plan.offsets);
                }
            }
            Rc::new(store.apply_seal(plan))
        };
        self.sealing
            .borrow_mut()
            .insert(epoch as u32, offsets.clone());
        // Written now, or (no space) kept in `sealing` and written by a later retry.
        self.write_pending_indexes(wal).await;
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
                self.snapshot_resume_epoch.set(resume.0);
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
        self.snapshot_running.set(false);
    }

    /// Every group's entries on disk and not applied yet, with their places: captured
    /// with the event index and the resume position, so that an entry written before
    /// that position and applied later is in the snapshot either way.
    fn capture_entries(&self) -> HashMap<u16, Vec<shards::snapshot::SnapshotEntry>> {
        let groups = self.groups.borrow();
        let mut out = HashMap::new();
        for (&group, g) in groups.iter() {
            let entries: Vec<_> = g
                .persisted
                .iter()
                .filter_map(|(&index, p)| {
                    let entry = g.raft.entry(index).filter(|e| e.term == p.term)?;
                    Some(shards::snapshot::SnapshotEntry {
                        index,
                        term: p.term,
                        command: match &entry.payload {
                            Payload::Noop => Command::Noop,
                            Payload::Data(c) => c.clone(),
                        },
                        epoch: p.loc.epoch,
                        offset: p.loc.offset,
                        crc: p.crc,
                        sealed: p.sealed.unwrap_or(u32::MAX),
                    })
                })
                .collect();
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

    // ---- peers ----

    fn queue_message(&self, group: u16, msg: Message<Command>) {
        let mut peers = self.peers.borrow_mut();
        let to = msg.to;
        let outbox = peers.outbox.entry(to).or_default();
        match msg.body {
            Body::Heartbeat {
                commit,
                leader_commit,
            } => outbox.heartbeats.push(HeartbeatItem {
                group,
                term: msg.term,
                commit,
                leader_commit,
            }),
            Body::HeartbeatResponse => outbox.acks.push(HeartbeatAck {
                group,
                term: msg.term,
            }),
            _ => outbox.frames.push(PeerFrame::Raft { group, msg }),
        }
    }

    /// Sends everything gathered for each peer (heartbeats as one frame per peer).
    pub(super) fn flush_outbox(&self) {
        let mut peers = self.peers.borrow_mut();
        if peers.outbox.is_empty() {
            return;
        }
        let outboxes = std::mem::take(&mut peers.outbox);
        let Some(transport) = peers.transport.clone() else {
            return;
        };
        let isolated = isolated();
        drop(peers);
        let mut dropped = 0u64;
        for (to, outbox) in outboxes {
            let mut frames = outbox.frames;
            for items in outbox.heartbeats.chunks(HEARTBEAT_ITEMS_MAX) {
                frames.push(PeerFrame::Heartbeats {
                    from: self.node_id,
                    to,
                    items: items.to_vec(),
                });
            }
            for items in outbox.acks.chunks(HEARTBEAT_ITEMS_MAX) {
                frames.push(PeerFrame::HeartbeatAcks {
                    from: self.node_id,
                    to,
                    items: items.to_vec(),
                });
            }
            for frame in frames {
                if isolated || transport.send(to, shards::peer::encode(&frame)).is_err() {
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            self.stats.borrow_mut().peer_frames_dropped += dropped;
        }
    }

    /// Sends a request to `to` (same shard index) and waits for its reply until
    /// `deadline`. Gives up early, as `Abandoned`, when the connection to `to` drops or
    /// is replaced (a reply on another connection is not taken, see
    /// [`ShardCore::complete_forward`]) or this node learns that `to` no longer leads
    /// `group`: a write's outcome is then unknown, a read can be sent again elsewhere.
    pub(super) async fn forward(
        &self,
        to: u64,
        group: Option<u16>,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Reply, ForwardError> {
        let (id, conn, mut rx, transport) = {
            let mut peers = self.peers.borrow_mut();
            let Some(transport) = peers.transport.clone() else {
                return Err(ForwardError::NotSent);
            };
            let Some(conn) = transport.connection(to).filter(|_| !isolated()) else {
                return Err(ForwardError::NotSent);
            };
            let (tx, rx) = oneshot::channel();
            let forwards = peers.forwards.as_mut().expect("set with the transport");
            (forwards.start(to, conn, body, tx), conn, rx, transport)
        };
        let frame = PeerFrame::Request {
            id,
            body: body.to_vec(),
        };
        if transport.send(to, shards::peer::encode(&frame)).is_err() {
            self.cancel_forward(id);
            return Err(ForwardError::NotSent);
        }
        self.stats.borrow_mut().forwarded += 1;
        let local_leader = |g: u16| self.groups.borrow().get(&g).and_then(|r| r.raft.leader());
        let seen = group.and_then(local_leader);
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(ForwardError::TimedOut);
            }
            let slice = left.min(self.raft_settings.tick * 2);
            match with_timeout(slice, &mut rx).await {
                Some(Ok(reply)) => break Ok(reply),
                Some(Err(_)) => break Err(ForwardError::TimedOut),
                None => {}
            }
            // This replica saw a new leader elected since the request left.
            let now = group.and_then(local_leader);
            let moved = now.is_some_and(|l| l != to && Some(l) != seen);
            if moved || transport.connection(to) != Some(conn) {
                break Err(ForwardError::Abandoned);
            }
        };
        self.cancel_forward(id);
        answer
    }

    /// This shard has a live connection to node `to`.
    pub(super) fn connected_to(&self, to: u64) -> bool {
        !isolated()
            && self
                .peers
                .borrow()
                .transport
                .as_ref()
                .is_some_and(|t| t.connection(to).is_some())
    }

    fn cancel_forward(&self, id: RequestId) {
        if let Some(forwards) = self.peers.borrow_mut().forwards.as_mut() {
            forwards.cancel(id);
        }
    }

    /// A reply to a forwarded request arrived from `from` on connection `conn`: it
    /// completes the request it answers, or is dropped (see `shards::forwarding`). A
    /// reply that names a waiting request of this process with another body stops the
    /// process: two requests shared an id, and a client would be told another's outcome.
    fn complete_forward(&self, from: u64, conn: u64, id: RequestId, request_crc: u32, body: &[u8]) {
        let matched = match self.peers.borrow_mut().forwards.as_mut() {
            Some(forwards) => forwards.reply(from, conn, id, request_crc),
            None => ReplyMatch::Stale,
        };
        match matched {
            ReplyMatch::Complete(tx) => {
                let reply = crate::forward::decode_reply(body)
                    .unwrap_or_else(|e| Reply::Error(ApiError::Internal(e)));
                let _ = tx.send(reply);
            }
            ReplyMatch::Stale => {
                self.stats.borrow_mut().stale_replies_dropped += 1;
                tracing::debug!(shard = self.index, from, conn, %id, "dropping a reply that answers no request of this process");
            }
            ReplyMatch::Mismatch {
                sent_crc,
                answered_crc,
            } => panic!(
                "shard {}: node {from} answered forwarded request {id} for a body with crc \
                 {answered_crc:#010x}, but the request sent with that id has crc {sent_crc:#010x}: \
                 two requests share an id",
                self.index
            ),
        }
    }

    /// Serves frames from other nodes.
    async fn run_incoming(self: Rc<Self>, incoming: LocalReceiver<Incoming>) {
        while let Some(frame) = incoming.recv().await {
            if isolated() {
                self.stats.borrow_mut().peer_frames_dropped += 1;
                continue;
            }
            let decoded = match shards::peer::decode(&frame.payload) {
                Ok(decoded) => decoded,
                Err(e) => {
                    tracing::warn!(shard = self.index, from = frame.from, error = %e, "bad peer frame");
                    continue;
                }
            };
            match decoded {
                PeerFrame::Raft { group, msg } => self.step(group, msg),
                PeerFrame::Heartbeats { from, to, items } => {
                    for item in items {
                        self.step(item.group, item.to_message(from, to));
                    }
                }
                PeerFrame::HeartbeatAcks { from, to, items } => {
                    for item in items {
                        self.step(item.group, item.to_message(from, to));
                    }
                }
                PeerFrame::Request { id, body } => self.serve_request(frame.from, id, body),
                // Handled by the transport: only ever the first frame of a connection.
                PeerFrame::Refused { .. } => {}
                PeerFrame::Response {
                    id,
                    request_crc,
                    body,
                } => self.complete_forward(frame.from, frame.conn, id, request_crc, &body),
            }
            self.flush_outbox();
        }
    }

    fn step(&self, group: u16, mut msg: Message<Command>) {
        if !self.admit_message(&mut msg) {
            self.stats.borrow_mut().storage_deferred += 1;
            return;
        }
        {
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(&group) else {
                return;
            };
            if msg.to != self.node_id || !g.raft.voters().contains(&msg.from) {
                return;
            }
            g.raft.step(msg);
        }
        self.process(group);
    }

    fn serve_request(&self, from: u64, id: RequestId, body: Vec<u8>) {
        let Some(me) = self.peers.borrow().me.upgrade() else {
            return;
        };
        let busy = {
            let mut peers = self.peers.borrow_mut();
            if peers.forwarded_in_flight >= FORWARDED_IN_FLIGHT_MAX {
                true
            } else {
                peers.forwarded_in_flight += 1;
                false
            }
        };
        let request_crc = crc32fast::hash(&body);
        glommio::spawn_local(async move {
            let reply = if busy {
                Reply::Error(ApiError::Overloaded)
            } else {
                let reply = match crate::forward::decode_op(&body) {
                    Ok(op) => me.execute_local(op).await,
                    Err(e) => Reply::Error(ApiError::Internal(format!("bad request: {e}"))),
                };
                me.peers.borrow_mut().forwarded_in_flight -= 1;
                reply
            };
            let body = crate::forward::encode_reply(&reply).unwrap_or_else(|e| {
                crate::forward::encode_reply(&Reply::Error(ApiError::Internal(e)))
                    .expect("an error reply encodes")
            });
            let frame = PeerFrame::Response {
                id,
                request_crc,
                body,
            };
            let transport = me.peers.borrow().transport.clone();
            if let Some(transport) = transport {
                if !isolated() {
                    let _ = transport.send(from, shards::peer::encode(&frame));
                }
            }
        })
        .detach();
    }

    /// Graceful shutdown: hands each group this node leads to another voter, and waits
    /// (bounded) until it leads none.
    pub async fn transfer_leadership(&self, limit: Duration) {
        let ids = self.group_ids();
        for &group in &ids {
            {
                let mut groups = self.groups.borrow_mut();
                let g = groups.get_mut(&group).expect("listed");
                if !g.leading {
                    continue;
                }
                let Some(&to) = g.raft.voters().iter().find(|&&v| v != self.node_id) else {
                    continue;
                };
                let _ = g.raft.transfer_leader(to);
            }
            self.process(group);
        }
        self.flush_outbox();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline
            && self
                .groups
                .borrow()
                .values()
                .any(|g| g.leading && g.raft.voters().len() > 1)
        {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The log record of a group's hard state (index 0: not an entry).
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
