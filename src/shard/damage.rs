//! Damaged log data on this replica: finding it (reads whose verification fails, the
//! background scrubber), reporting it (a log line with file and offset, metrics,
//! `/health/ready`), keeping this replica from leading the groups it concerns, serving
//! reads from another replica meanwhile, and repairing it.
//!
//! A repair fetches the damaged events from another replica of the group (the peer
//! request `Op::FetchEvents`, served by any replica from its own committed log), checks
//! each copy (`shards::scrub::check_fetched`: the damaged frame's crc32 when it is
//! known, else the event's identity) and appends it to the log as a new record (index
//! 0, term `REPAIR_TERM`): nothing is rewritten in place. Once that record is durable,
//! the event index reads the event from it (`EventStore::repair`); replay after a
//! restart, and the shard snapshot, keep that. Events are fetched by (session, seq), the
//! key this event index uses: the event index does not know the Raft index of an event,
//! and the replica that serves it finds it by the same key in its own index.
//!
//! A damaged index file (`.idx`) is rebuilt from its segment when the segment itself
//! says unambiguously where each event is (`shards::scrub::SegmentAudit`), which needs no
//! other replica.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use glommio::channels::local_channel::LocalReceiver;
use shards::codec::SegmentVerifier;
use shards::entry::{AppendEntry, Command, LogRecord, REPAIR_TERM};
use shards::scrub::{self, AuditOutcome, FetchVerdict, SegmentAudit};

use super::{replication::WriteUnit, sealed_run, ShardCore};
use crate::node::with_timeout;
use crate::ops::{ApiError, Op, Reply};
use crate::store::Cold;
use crate::wal::{ReadError, RecordLocation};

/// Damaged events waiting for repair, per shard, at most. Past it a finding is counted
/// but not queued: the scrubber finds it again on a later pass.
const PENDING_EVENTS_MAX: usize = 65_536;
/// Recent damage descriptions kept for `/health/ready`.
const RECENT_MAX: usize = 8;
/// Damaged spans remembered (so each is logged once, not at every scrub pass).
const KNOWN_SPANS_MAX: usize = 4096;
/// Events one repair asks a peer for, at most.
const REPAIR_RANGE_EVENTS_MAX: u64 = 256;
/// Damaged events one repair round handles, at most (the rest wait for the next).
const REPAIR_ROUND_EVENTS_MAX: usize = 4096;
/// Bytes of events one fetch asks a peer for (the reply is one frame, at most 32 MiB).
const FETCH_BYTES_MAX: usize = 4 << 20;
/// Events one fetch answers with, at most.
const FETCH_EVENTS_MAX: u64 = 4096;
/// How long one peer gets to answer a fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// The repairer wakes at least this often (retries, leadership checks).
const REPAIR_PERIOD: Duration = Duration::from_millis(200);
/// A failed repair is retried after this long, doubling up to `REPAIR_RETRY_MAX`.
const REPAIR_RETRY_MIN: Duration = Duration::from_millis(200);
const REPAIR_RETRY_MAX: Duration = Duration::from_secs(5);
/// A damaged group's leadership is handed over at most this often (a transfer refuses
/// writes while it runs, so a target that cannot take it must not be retried at once).
const GIVE_UP_EVERY: Duration = Duration::from_secs(2);
/// Bytes the scrubber reads (and verifies, between two yields to the shard's other
/// work) at once: small enough that checking the records of one window takes a few
/// milliseconds of CPU even when they are small and many.
const SCRUB_WINDOW_BYTES: usize = 128 << 10;
/// The pace of an audit a failed read asked for, when the background pace is slower
/// (or off).
const URGENT_SCRUB_BYTES_PER_SEC: u64 = 8 << 20;
/// Segments waiting for an urgent audit, at most.
const URGENT_SEGMENTS_MAX: usize = 64;
/// The scrubber's pause when there is nothing to verify, or between passes.
const SCRUB_IDLE: Duration = Duration::from_secs(1);

/// A damaged event waiting for its repair.
#[derive(Debug, Clone)]
struct Pending {
    group: u16,
    /// The damaged record, for log lines.
    place: String,
    frame_crc: Option<u32>,
    /// Not retried before this.
    next_try: Instant,
    retry: Duration,
    /// A repair of it is out.
    in_flight: bool,
}

/// One shard's damage bookkeeping.
#[derive(Default)]
pub(super) struct DamageLog {
    pending: BTreeMap<(String, u64), Pending>,
    /// Pending events per group: this replica does not campaign for these groups.
    groups: BTreeMap<u16, usize>,
    recent: VecDeque<String>,
    /// Segments to audit before the background pass goes on.
    urgent: VecDeque<u64>,
    known_spans: BTreeSet<(u64, u64)>,
    /// Segments whose index file reads found damaged, until an audit rebuilt it.
    index_damage: BTreeSet<u64>,
    /// When each damaged group's leadership was last handed over.
    given_up: BTreeMap<u16, Instant>,
    /// Groups with nobody to repair from (a node alone): logged once.
    alone_logged: BTreeSet<u16>,
    pub found: u64,
    pub spans: u64,
    pub repaired: u64,
    pub index_rebuilds: u64,
    pub not_queued: u64,
    pub scrub_bytes: u64,
    pub scrub_segments: u64,
    pub leaderships_given_up: u64,
}

/// What `/metrics` and `/health/ready` show of a shard's damage.
#[derive(Debug, Clone, Default)]
pub struct DamageStats {
    /// Damaged events not repaired yet.
    pub damaged_events: u64,
    /// Groups this replica does not campaign for while they are damaged here.
    pub groups_held: Vec<u16>,
    pub found: u64,
    pub spans: u64,
    pub repaired: u64,
    pub index_rebuilds: u64,
    pub not_queued: u64,
    pub scrub_bytes: u64,
    pub scrub_segments: u64,
    pub leaderships_given_up: u64,
    /// The last few findings, newest last.
    pub recent: Vec<String>,
}

impl DamageStats {
    pub fn merge(&mut self, other: &DamageStats) {
        self.damaged_events += other.damaged_events;
        self.groups_held.extend_from_slice(&other.groups_held);
        self.found += other.found;
        self.spans += other.spans;
        self.repaired += other.repaired;
        self.index_rebuilds += other.index_rebuilds;
        self.not_queued += other.not_queued;
        self.scrub_bytes += other.scrub_bytes;
        self.scrub_segments += other.scrub_segments;
        self.leaderships_given_up += other.leaderships_given_up;
        self.recent.extend(other.recent.iter().cloned());
    }
}

impl DamageLog {
    fn remember(&mut self, what: String) {
        if self.recent.len() == RECENT_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back(what);
    }

    pub(super) fn stats(&self) -> DamageStats {
        DamageStats {
            damaged_events: self.pending.len() as u64,
            groups_held: self.groups.keys().copied().collect(),
            found: self.found,
            spans: self.spans,
            repaired: self.repaired,
            index_rebuilds: self.index_rebuilds,
            not_queued: self.not_queued,
            scrub_bytes: self.scrub_bytes,
            scrub_segments: self.scrub_segments,
            leaderships_given_up: self.leaderships_given_up,
            recent: self.recent.iter().cloned().collect(),
        }
    }

    fn is_damaged(&self, group: u16) -> bool {
        self.groups.contains_key(&group)
    }

    /// Start-up found the shard snapshot damaged (and did without it, or without its
    /// damaged trailer).
    pub(super) fn found_snapshot_damage(&mut self, path: &std::path::Path) {
        self.found += 1;
        self.remember(format!(
            "{} was damaged at start-up: state rebuilt, a new snapshot is written",
            path.display()
        ));
    }
}

/// Test fault (`PUT /debug/faults {"lead_to": n}`, with `STARCITE_TEST_FAULTS=1`): every
/// shard of this process hands each group it leads to node n (0: off).
static TEST_LEAD_TO: AtomicU64 = AtomicU64::new(0);

pub fn set_test_lead_to(node: Option<u64>) {
    TEST_LEAD_TO.store(node.unwrap_or(0), Ordering::Relaxed);
}

/// Where a cold event's record is, for log lines.
fn place(reader: &crate::wal::LogReader, cold: Cold, err: &ReadError) -> String {
    match err {
        ReadError::Damaged { .. } => err.to_string(),
        ReadError::Io(_) => match cold {
            Cold::Sealed { epoch, index } => {
                format!(
                    "{} entry {index}",
                    reader.index_path(epoch as u64).display()
                )
            }
            Cold::Active { epoch, offset } | Cold::Repaired { epoch, offset } => format!(
                "{} offset {offset}",
                reader.segment_path(epoch as u64).display()
            ),
        },
    }
}

impl ShardCore {
    // ---- reading with a fallback to other replicas ----

    /// Reads the cold events `cold` of session `id` (in seq order) and hands each to
    /// `take` until it returns false; returns whether every one was taken. An event whose
    /// local copy fails verification (its record, or its segment's index file) is
    /// reported, and it and the rest of its run of events are read from another replica
    /// instead. With no other replica to read from, the answer is `LogDamaged`, naming
    /// the damage: never wrong data.
    pub(super) async fn read_cold_events(
        &self,
        id: &str,
        cold: &[(u64, Cold)],
        take: &mut dyn FnMut(AppendEntry) -> bool,
    ) -> Result<bool, ApiError> {
        let mut i = 0;
        while i < cold.len() {
            let run = sealed_run(&cold[i..]);
            let chunk = &cold[i..i + run];
            let last = chunk[run - 1].0;
            i += run;
            let locations = match self.resolve(chunk).await {
                Ok(locations) => locations,
                Err(err @ ReadError::Damaged { .. }) => {
                    let what = self.note_index_damage(chunk[0].1, &err);
                    if !self
                        .take_from_peers(id, chunk[0].0 - 1, last, &what, take)
                        .await?
                    {
                        return Ok(false);
                    }
                    continue;
                }
                Err(ReadError::Io(e)) => {
                    return Err(ApiError::Internal(format!("index of {id}: {e}")));
                }
            };
            for (k, (seq, loc)) in locations.into_iter().enumerate() {
                match self.read_event(id, seq, loc).await {
                    Ok(event) => {
                        if !take(event) {
                            return Ok(false);
                        }
                    }
                    Err(err @ ReadError::Damaged { .. }) => {
                        let what = self.note_event_damage(id, seq, chunk[k].1, &err, "a read");
                        if !self.take_from_peers(id, seq - 1, last, &what, take).await? {
                            return Ok(false);
                        }
                        break;
                    }
                    Err(ReadError::Io(e)) => {
                        return Err(ApiError::Internal(format!(
                            "reading event {seq} of {id} at {loc:?}: {e}"
                        )));
                    }
                }
            }
        }
        Ok(true)
    }

    /// Reads event `seq` of `id` at `loc`: its record's checks, then its identity (a
    /// record that is not this event means the index pointing there is wrong).
    pub(super) async fn read_event(
        &self,
        id: &str,
        seq: u64,
        loc: RecordLocation,
    ) -> Result<AppendEntry, ReadError> {
        let record = self.reader.read(loc).await?;
        match record.command {
            Command::Append(e) if e.session_id == id && e.seq == seq => Ok(e),
            other => Err(ReadError::Damaged {
                file: self.reader.segment_path(loc.epoch as u64),
                offset: Some(loc.offset as u64),
                reason: format!(
                    "the record there is {}, not event {seq} of {id}",
                    describe(&other)
                ),
                frame_crc: None,
            }),
        }
    }

    /// Events `after+1 ..= through` of `id` from other replicas, handed to `take`.
    /// `what` names the local damage, for the error when no replica can serve them.
    async fn take_from_peers(
        &self,
        id: &str,
        after: u64,
        through: u64,
        what: &str,
        take: &mut dyn FnMut(AppendEntry) -> bool,
    ) -> Result<bool, ApiError> {
        let group = shards::group_of(id);
        let mut next = after;
        while next < through {
            let records = self
                .fetch_from_peers(id, group, next, through, &|_| true)
                .await
                .map_err(|e| ApiError::LogDamaged(format!("{what} ({e})")))?;
            for record in records {
                let Command::Append(event) = record.command else {
                    unreachable!("fetch_from_peers checks every record")
                };
                next = event.seq;
                if !take(event) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Events `after+1 ..= through` of `id` (group `group`) from another replica,
    /// checked to be those events in order (at least one): the first answer `good`
    /// accepts, else the first valid answer.
    async fn fetch_from_peers(
        &self,
        id: &str,
        group: u16,
        after: u64,
        through: u64,
        good: &dyn Fn(&[LogRecord]) -> bool,
    ) -> Result<Vec<LogRecord>, String> {
        let leader = self
            .groups
            .borrow()
            .get(&group)
            .and_then(|g| g.raft.leader());
        let mut peers: Vec<u64> = shards::voters_of(group, &self.members)
            .into_iter()
            .filter(|&n| n != self.node_id)
            .collect();
        if peers.is_empty() {
            return Err("no other replica holds this group".into());
        }
        // The leader first: it holds every committed event.
        peers.sort_by_key(|&n| Some(n) != leader);
        let op = Op::FetchEvents {
            id: id.to_string(),
            after,
            through,
            max_bytes: FETCH_BYTES_MAX,
        };
        let body = crate::forward::encode_op(&op)?;
        let mut why = Vec::new();
        let mut first_valid = None;
        for to in peers {
            let deadline = Instant::now() + FETCH_TIMEOUT.min(self.request_timeout);
            let records = match self.forward(to, None, &body, deadline).await {
                Ok(Reply::Records(records)) => records,
                Ok(Reply::Error(e)) => {
                    why.push(format!("node {to}: {e:?}"));
                    continue;
                }
                Ok(other) => {
                    why.push(format!("node {to}: unexpected {other:?}"));
                    continue;
                }
                Err(_) => {
                    why.push(format!("node {to} did not answer"));
                    continue;
                }
            };
            let expected = (after + 1..=through).zip(&records);
            let bad = expected
                .map(|(seq, r)| scrub::check_fetched(group, id, seq, None, r))
                .find_map(|v| match v {
                    FetchVerdict::Wrong(why) => Some(why),
                    _ => None,
                });
            match bad {
                _ if records.is_empty() => why.push(format!("node {to} has none of them")),
                Some(wrong) => why.push(format!("node {to} sent {wrong}")),
                None if records.len() as u64 > through - after => {
                    why.push(format!("node {to} sent more than asked"))
                }
                None if good(&records) => return Ok(records),
                None => {
                    first_valid.get_or_insert(records);
                }
            }
        }
        if let Some(records) = first_valid {
            return Ok(records);
        }
        Err(format!(
            "events {}..={through} of {id} from other replicas: {}",
            after + 1,
            why.join("; ")
        ))
    }

    /// The answer to another replica's `FetchEvents`: committed events read from this
    /// replica's own log, consecutive from `after + 1`, stopping at about `max_bytes` or
    /// at the first one that is damaged here too (reported like any damage).
    pub(super) async fn serve_fetch(
        &self,
        id: &str,
        after: u64,
        through: u64,
        max_bytes: usize,
    ) -> Reply {
        let group = shards::group_of(id);
        if !self.replicates(group) {
            return Reply::Error(ApiError::NotLeader { leader: None });
        }
        let max_bytes = max_bytes.min(FETCH_BYTES_MAX);
        let through = through.min(after.saturating_add(FETCH_EVENTS_MAX));
        let locations = self.store.borrow().locations(id, after, through);
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut i = 0;
        while i < locations.len() {
            let run = sealed_run(&locations[i..]);
            let chunk = &locations[i..i + run];
            i += run;
            let resolved = match self.resolve(chunk).await {
                Ok(resolved) => resolved,
                Err(err) => {
                    if matches!(err, ReadError::Damaged { .. }) {
                        self.note_index_damage(chunk[0].1, &err);
                    }
                    break;
                }
            };
            for (k, (seq, loc)) in resolved.into_iter().enumerate() {
                let record = match self.reader.read(loc).await {
                    Ok(record) => record,
                    Err(err) => {
                        if matches!(err, ReadError::Damaged { .. }) {
                            self.note_event_damage(id, seq, chunk[k].1, &err, "a peer's fetch");
                        }
                        return Reply::Records(records);
                    }
                };
                let size = match &record.command {
                    Command::Append(e) if e.session_id == id && e.seq == seq => {
                        super::event_bytes(e)
                    }
                    _ => return Reply::Records(records),
                };
                if !records.is_empty() && bytes + size > max_bytes {
                    return Reply::Records(records);
                }
                bytes += size;
                records.push(record);
            }
        }
        Reply::Records(records)
    }

    // ---- reporting ----

    /// A read found event `seq` of `id` damaged: logs it (once), queues its repair and
    /// an audit of its segment. Returns the description.
    pub(super) fn note_event_damage(
        &self,
        id: &str,
        seq: u64,
        cold: Cold,
        err: &ReadError,
        by: &str,
    ) -> String {
        let place = place(&self.reader, cold, err);
        let what = format!("event {seq} of {id}: {place}");
        let frame_crc = match err {
            ReadError::Damaged { frame_crc, .. } => *frame_crc,
            ReadError::Io(_) => None,
        };
        if let Cold::Sealed { epoch, .. } | Cold::Repaired { epoch, .. } = cold {
            self.audit_soon(epoch as u64);
        }
        self.add_pending(id, seq, place, frame_crc, by);
        what
    }

    /// A read found the index file of a sealed segment damaged: logs it and asks for
    /// an audit, which rebuilds it from the segment. Returns the description.
    fn note_index_damage(&self, cold: Cold, err: &ReadError) -> String {
        let what = err.to_string();
        if let Cold::Sealed { epoch, .. } = cold {
            self.audit_soon(epoch as u64);
            if self.damage.borrow_mut().index_damage.insert(epoch as u64) {
                tracing::warn!(
                    shard = self.index,
                    damage = %what,
                    "a segment index file is damaged: reads of its events go to other \
                     replicas until the scrubber has rebuilt it from its segment"
                );
                let mut damage = self.damage.borrow_mut();
                damage.found += 1;
                damage.remember(what.clone());
            }
        }
        what
    }

    /// Queues segment `epoch` for an audit before the background pass; false when it is
    /// queued already.
    fn audit_soon(&self, epoch: u64) -> bool {
        let mut damage = self.damage.borrow_mut();
        if damage.urgent.contains(&epoch) || damage.urgent.len() >= URGENT_SEGMENTS_MAX {
            return false;
        }
        damage.urgent.push_back(epoch);
        drop(damage);
        let _ = self.wake_scrubber.try_send(());
        true
    }

    /// Queues the repair of event `seq` of `id`; the first time, logs it with its place
    /// and stops campaigning for its group.
    fn add_pending(&self, id: &str, seq: u64, place: String, frame_crc: Option<u32>, by: &str) {
        let group = shards::group_of(id);
        let mut damage = self.damage.borrow_mut();
        let key = (id.to_string(), seq);
        if damage.pending.contains_key(&key) {
            return;
        }
        damage.found += 1;
        if damage.pending.len() >= PENDING_EVENTS_MAX {
            damage.not_queued += 1;
            return;
        }
        tracing::warn!(
            shard = self.index,
            group,
            session = id,
            seq,
            damage = %place,
            found_by = by,
            "damaged event: reads are served by another replica until it is repaired"
        );
        damage.remember(format!("event {seq} of {id} (group {group}): {place}"));
        damage.pending.insert(
            key,
            Pending {
                group,
                place,
                frame_crc,
                next_try: Instant::now(),
                retry: REPAIR_RETRY_MIN,
                in_flight: false,
            },
        );
        let count = damage.groups.entry(group).or_default();
        *count += 1;
        let first = *count == 1;
        drop(damage);
        if first {
            self.hold_group(group, true);
        }
        // Whatever happens next, the next shard snapshot should cover this damage, so
        // that a restart never has to replay through it.
        self.snapshot_soon.set(true);
        let _ = self.wake_repairer.try_send(());
    }

    /// While a group's data is damaged here, this replica does not campaign for it and
    /// hands its leadership over (a group of one has nobody to hand it to).
    fn hold_group(&self, group: u16, damaged: bool) {
        {
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(&group) else {
                return;
            };
            if g.raft.voters().len() < 2 {
                return;
            }
            g.raft.set_campaign(!damaged);
        }
        if damaged {
            self.give_up_leadership(group, None);
        }
    }

    /// Hands group `group` to another voter (to `to` if given) this node is connected
    /// to, if it leads the group and has not tried in the last `GIVE_UP_EVERY`.
    fn give_up_leadership(&self, group: u16, to: Option<u64>) {
        let connected = |n: u64| self.connected_to(n);
        {
            let mut damage = self.damage.borrow_mut();
            let recent = damage
                .given_up
                .get(&group)
                .is_some_and(|at| at.elapsed() < GIVE_UP_EVERY);
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(&group) else {
                return;
            };
            if !g.leading || recent {
                return;
            }
            // The connected voter furthest along: a transfer to a lagging one would
            // first have to catch it up.
            let target = match to {
                Some(n) => Some(n).filter(|&n| g.raft.voters().contains(&n) && connected(n)),
                None => g
                    .raft
                    .voters()
                    .iter()
                    .copied()
                    .filter(|&n| n != self.node_id && connected(n))
                    .max_by_key(|&n| g.raft.match_index(n)),
            };
            let Some(target) = target.filter(|&n| n != self.node_id) else {
                return;
            };
            if g.raft.transfer_leader(target).is_err() {
                return;
            }
            damage.given_up.insert(group, Instant::now());
            if to.is_none() {
                damage.leaderships_given_up += 1;
                tracing::warn!(
                    shard = self.index,
                    group,
                    to = target,
                    "handing over the leadership of a group whose data is damaged here"
                );
            }
        }
        self.process(group);
        self.flush_outbox();
    }

    /// Damaged groups this node leads are handed over (and, under the test fault, every
    /// group it leads goes to the node named there).
    fn enforce_leadership(&self) {
        let lead_to = TEST_LEAD_TO.load(Ordering::Relaxed);
        let leading: Vec<u16> = self
            .groups
            .borrow()
            .iter()
            .filter(|(_, g)| g.leading)
            .map(|(&id, _)| id)
            .collect();
        for group in leading {
            if self.damage.borrow().is_damaged(group) {
                self.give_up_leadership(group, None);
            } else if lead_to != 0 && lead_to != self.node_id {
                self.give_up_leadership(group, Some(lead_to));
            }
        }
    }

    // ---- repair ----

    /// Repairs damaged events from other replicas, one round per wake-up or period.
    pub(super) async fn run_repairer(self: Rc<Self>, wake: LocalReceiver<()>) {
        loop {
            let _ = with_timeout(REPAIR_PERIOD, wake.recv()).await;
            if self.shutting_down.get() {
                return;
            }
            self.enforce_leadership();
            let round = self.take_round();
            for (id, group, seqs) in round {
                self.repair_session(&id, group, seqs).await;
            }
        }
    }

    /// Pending events due for a try, by session, marked in flight.
    #[allow(clippy::type_complexity)]
    fn take_round(&self) -> Vec<(String, u16, Vec<(u64, Option<u32>)>)> {
        let now = Instant::now();
        let mut damage = self.damage.borrow_mut();
        let mut alone = Vec::new();
        let mut round: Vec<(String, u16, Vec<(u64, Option<u32>)>)> = Vec::new();
        let mut taken = 0;
        for ((id, seq), p) in damage.pending.iter_mut() {
            if taken == REPAIR_ROUND_EVENTS_MAX {
                break;
            }
            if p.in_flight || p.next_try > now {
                continue;
            }
            if shards::voters_of(p.group, &self.members).len() < 2 {
                alone.push(p.group);
                p.next_try = now + Duration::from_secs(3600);
                continue;
            }
            p.in_flight = true;
            taken += 1;
            match round.last_mut() {
                Some((last, _, seqs)) if last == id => seqs.push((*seq, p.frame_crc)),
                _ => round.push((id.clone(), p.group, vec![(*seq, p.frame_crc)])),
            }
        }
        for group in alone {
            if damage.alone_logged.insert(group) {
                tracing::error!(
                    shard = self.index,
                    group,
                    "damaged events of a group with no other replica cannot be repaired: \
                     reads of them fail; restore this data dir from a backup"
                );
            }
        }
        round
    }

    /// Fetches the damaged events `seqs` of `id` from another replica, checks each copy
    /// and appends the good ones to the log; failures are retried later.
    async fn repair_session(&self, id: &str, group: u16, seqs: Vec<(u64, Option<u32>)>) {
        let crcs: BTreeMap<u64, Option<u32>> = seqs.iter().copied().collect();
        let list: Vec<u64> = crcs.keys().copied().collect();
        let mut records = Vec::new();
        let mut failed: Vec<u64> = Vec::new();
        // A copy whose encoding matches the damaged frame's crc32 is preferred: another
        // replica may hold the event in another form (a snapshot's history event).
        let original = |records: &[LogRecord]| {
            records.iter().all(|r| match &r.command {
                Command::Append(e) => {
                    let hint = crcs.get(&e.seq).copied().flatten();
                    hint.is_none()
                        || scrub::check_fetched(group, id, e.seq, hint, r) == FetchVerdict::Original
                }
                _ => false,
            })
        };
        for (first, last) in scrub::seq_ranges(&list, REPAIR_RANGE_EVENTS_MAX) {
            let fetched = match self
                .fetch_from_peers(id, group, first - 1, last, &original)
                .await
            {
                Ok(fetched) => fetched,
                Err(why) => {
                    tracing::warn!(shard = self.index, group, session = id, first, last, error = %why, "repair deferred");
                    failed.extend(first..=last);
                    continue;
                }
            };
            let got = fetched.len() as u64;
            for (seq, fetched) in (first..=last).zip(fetched) {
                match scrub::check_fetched(group, id, seq, crcs[&seq], &fetched) {
                    FetchVerdict::Wrong(why) => {
                        tracing::error!(shard = self.index, group, session = id, seq, error = %why, "a fetched copy is not the damaged event");
                        failed.push(seq);
                    }
                    verdict => {
                        tracing::info!(
                            shard = self.index,
                            group,
                            session = id,
                            seq,
                            byte_identical = verdict == FetchVerdict::Original,
                            damaged_frame_crc = ?crcs[&seq],
                            "copy of a damaged event fetched from another replica"
                        );
                        records.push(LogRecord {
                            group,
                            term: REPAIR_TERM,
                            index: 0,
                            command: fetched.command,
                        });
                    }
                }
            }
            failed.extend(first + got..=last);
        }
        self.retry_later(id, &failed);
        if records.is_empty() {
            return;
        }
        self.queue_unit(WriteUnit::records_only(group, records));
    }

    fn retry_later(&self, id: &str, seqs: &[u64]) {
        let mut damage = self.damage.borrow_mut();
        for &seq in seqs {
            if let Some(p) = damage.pending.get_mut(&(id.to_string(), seq)) {
                p.in_flight = false;
                p.next_try = Instant::now() + p.retry;
                p.retry = (p.retry * 2).min(REPAIR_RETRY_MAX);
            }
        }
    }

    /// A repaired copy of event `e` is durable at `loc`: the index reads it from there.
    pub(super) fn repaired_durable(&self, e: &AppendEntry, loc: RecordLocation) {
        let held = self
            .store
            .borrow_mut()
            .repair(&e.session_id, e.seq, loc.epoch, loc.offset);
        let key = (e.session_id.clone(), e.seq);
        let mut damage = self.damage.borrow_mut();
        let Some(p) = damage.pending.remove(&key) else {
            return;
        };
        if held {
            damage.repaired += 1;
            tracing::info!(
                shard = self.index,
                group = p.group,
                session = %e.session_id,
                seq = e.seq,
                damaged = %p.place,
                copy = %format!("{} offset {}", self.reader.segment_path(loc.epoch as u64).display(), loc.offset),
                "damaged event repaired"
            );
        }
        let count = damage.groups.get_mut(&p.group).expect("counted");
        *count -= 1;
        let healed = *count == 0;
        if healed {
            damage.groups.remove(&p.group);
            damage.given_up.remove(&p.group);
        }
        drop(damage);
        if healed {
            self.hold_group(p.group, false);
        }
    }

    // ---- the scrubber ----

    /// Verifies sealed segments one after the other at `scrub_bytes_per_sec` (0: only
    /// the audits failed reads ask for), oldest first, round and round.
    pub(super) async fn run_scrubber(self: Rc<Self>, wake: LocalReceiver<()>) {
        let mut cursor = 0u64;
        loop {
            if self.shutting_down.get() {
                return;
            }
            match self.next_audit(&mut cursor) {
                Some((epoch, rate)) => self.audit_segment(epoch, rate).await,
                None => {
                    let _ = with_timeout(SCRUB_IDLE, wake.recv()).await;
                }
            }
        }
    }

    fn next_audit(&self, cursor: &mut u64) -> Option<(u64, u64)> {
        let rate = self.scrub_bytes_per_sec;
        if let Some(epoch) = self.damage.borrow_mut().urgent.pop_front() {
            return Some((epoch, rate.max(URGENT_SCRUB_BYTES_PER_SEC)));
        }
        if rate == 0 {
            return None;
        }
        let oldest = self.oldest_segment.get();
        let active = self.durable_position.get().0;
        *cursor = (*cursor).max(oldest);
        if *cursor >= active {
            *cursor = oldest; // a pass is over: the next starts after a pause
            return None;
        }
        *cursor += 1;
        Some((*cursor - 1, rate))
    }

    /// Verifies sealed segment `epoch` (every batch and record crc32, and the index
    /// file against it) at `rate` bytes per second, then reports and repairs.
    async fn audit_segment(&self, epoch: u64, rate: u64) {
        let sealed = epoch >= self.oldest_segment.get()
            && epoch < self.durable_position.get().0
            && !self.sealing.borrow().contains_key(&(epoch as u32));
        if !sealed {
            return;
        }
        let Ok(size) = std::fs::metadata(self.reader.segment_path(epoch)).map(|m| m.len()) else {
            return; // deleted by retention meanwhile
        };
        let index = match self.reader.read_index_file(epoch) {
            Ok(Some(bytes)) => shards::snapshot::decode_sidecar(&bytes, epoch),
            Ok(None) => Err("the file is missing".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut audit = self.start_audit(epoch as u32, index);
        let mut verifier = SegmentVerifier::new(epoch, size);
        let started = Instant::now();
        let mut bytes = 0u64;
        while let Some(request) = verifier.next_read() {
            let left = (size - request.offset) as usize;
            let len = request.min_bytes.max(SCRUB_WINDOW_BYTES).min(left);
            let window = match self.reader.read_span(epoch, request.offset, len).await {
                Ok(window) => window,
                Err(e) => {
                    tracing::debug!(shard = self.index, segment = epoch, error = %e, "scrub stopped");
                    return;
                }
            };
            verifier.feed(&window);
            for record in verifier.take_records() {
                audit.record(&record);
            }
            for span in verifier.take_spans() {
                audit.damaged(span);
            }
            bytes += len as u64;
            self.damage.borrow_mut().scrub_bytes += len as u64;
            let due = scrub::scrub_pause(bytes, rate);
            match due.checked_sub(started.elapsed()) {
                Some(wait) if !wait.is_zero() => glommio::timer::sleep(wait).await,
                _ => futures_lite::future::yield_now().await,
            }
            if self.shutting_down.get() {
                return;
            }
        }
        self.damage.borrow_mut().scrub_segments += 1;
        let outcome = audit.finish();
        self.apply_audit(epoch, outcome).await;
    }

    /// What the event index says segment `epoch` holds.
    fn start_audit(&self, epoch: u32, index: Result<Vec<u32>, String>) -> SegmentAudit {
        let store = self.store.borrow();
        let mut fixed = Vec::new();
        for g in self.groups.borrow().values() {
            for p in g.persisted.values() {
                if let (true, Some(position)) = (p.loc.epoch == epoch, p.sealed) {
                    fixed.push((position, p.loc.offset));
                }
            }
        }
        SegmentAudit::new(store.runs_in(epoch), index, fixed, store.repaired_in(epoch))
    }

    /// Acts on an audit: rebuilds a damaged index file, queues damaged events for
    /// repair, and logs damage that holds no event.
    async fn apply_audit(&self, epoch: u64, outcome: AuditOutcome) {
        let segment = self.reader.segment_path(epoch);
        if outcome.index_problem.is_none() {
            self.damage.borrow_mut().index_damage.remove(&epoch);
        }
        if let (Some(problem), Some(offsets)) = (&outcome.index_problem, &outcome.rebuilt_index) {
            let bytes =
                shards::snapshot::encode_sidecar(epoch, offsets, shards::codec::BLOCK_BYTES);
            let path = self.reader.index_path(epoch);
            match self.reader.replace_index_file(epoch, &bytes).await {
                Ok(()) => {
                    self.damage.borrow_mut().index_damage.remove(&epoch);
                    tracing::warn!(
                        shard = self.index,
                        file = %path.display(),
                        problem = %problem,
                        "a segment index file was damaged: rebuilt from its segment"
                    );
                    let mut damage = self.damage.borrow_mut();
                    damage.index_rebuilds += 1;
                    damage.remember(format!("{} rebuilt: {problem}", path.display()));
                }
                Err(e) => tracing::error!(
                    shard = self.index,
                    file = %path.display(),
                    error = %e,
                    "cannot rewrite a damaged segment index file"
                ),
            }
        }
        for d in outcome.damaged_events {
            let place = match d.offset {
                Some(o) => format!(
                    "{} is damaged at offset {o}: {}",
                    segment.display(),
                    d.reason
                ),
                None => format!("{}: {}", segment.display(), d.reason),
            };
            // The audit read what the index said when it began: an event repaired since
            // (elsewhere than the copy found damaged) needs nothing more.
            let store = self.store.borrow();
            let copy = store.repaired_at(&d.session, d.seq);
            let current = match copy {
                Some((at, offset)) => at as u64 == epoch && Some(u64::from(offset)) == d.offset,
                None => store.holds(&d.session, d.seq),
            };
            drop(store);
            if current {
                self.add_pending(&d.session, d.seq, place, d.frame_crc, "the scrubber");
            }
        }
        for span in outcome.other_spans {
            let mut damage = self.damage.borrow_mut();
            let key = (epoch, span.start);
            if damage.known_spans.contains(&key) {
                continue;
            }
            if damage.known_spans.len() < KNOWN_SPANS_MAX {
                damage.known_spans.insert(key);
            }
            damage.spans += 1;
            let what = format!(
                "{} offsets {}..{}: {}",
                segment.display(),
                span.start,
                span.end,
                span.reason
            );
            tracing::warn!(
                shard = self.index,
                damage = %what,
                "damaged log bytes that hold no indexed event (other records, read only when \
                 the log is replayed from before them): the next shard snapshot moves replay \
                 past them"
            );
            damage.remember(what);
            drop(damage);
            self.snapshot_soon.set(true);
        }
    }
}

/// A record's command in a few words, for messages.
fn describe(command: &Command) -> String {
    match command {
        Command::Append(e) => format!("event {} of {}", e.seq, e.session_id),
        Command::Meta(_) => "Raft state".into(),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}
