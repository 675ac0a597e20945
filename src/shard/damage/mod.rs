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

mod fetch;
mod repair;
mod scrub;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ShardCore;
use crate::store::Cold;
use crate::wal::ReadError;

/// Damaged events waiting for repair, per shard, at most. Past it a finding is counted
/// but not queued: the scrubber finds it again on a later pass.
const PENDING_EVENTS_MAX: usize = 65_536;
/// Recent damage descriptions kept for `/health/ready`.
const RECENT_MAX: usize = 8;
/// A failed repair is retried after this long, doubling up to `REPAIR_RETRY_MAX`.
const REPAIR_RETRY_MIN: Duration = Duration::from_millis(200);
const REPAIR_RETRY_MAX: Duration = Duration::from_secs(5);
/// A damaged group's leadership is handed over at most this often (a transfer refuses
/// writes while it runs, so a target that cannot take it must not be retried at once).
const GIVE_UP_EVERY: Duration = Duration::from_secs(2);
/// Segments waiting for an urgent audit, at most.
const URGENT_SEGMENTS_MAX: usize = 64;
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
        let _ = self.wake.scrubber.try_send(());
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
        self.snapshots.borrow_mut().want_soon();
        let _ = self.wake.repairer.try_send(());
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
        for group in self.leading_groups() {
            if self.damage.borrow().is_damaged(group) {
                self.give_up_leadership(group, None);
            } else if lead_to != 0 && lead_to != self.node_id {
                self.give_up_leadership(group, Some(lead_to));
            }
        }
    }
}
