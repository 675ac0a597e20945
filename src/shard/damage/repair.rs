//! The repairer task: fetches damaged events from other replicas, checks each copy
//! and appends it to the log as a repaired record; once durable, the event index reads
//! the event from it.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::LocalReceiver;
use shards::entry::{AppendEntry, Command, LogRecord, REPAIR_TERM};
use shards::scrub::{self, FetchVerdict};

use super::REPAIR_RETRY_MAX;
use crate::node::with_timeout;
use crate::shard::commit::WriteUnit;
use crate::shard::ShardCore;
use crate::wal::RecordLocation;

/// Events one repair asks a peer for, at most.
const REPAIR_RANGE_EVENTS_MAX: u64 = 256;
/// Damaged events one repair round handles, at most (the rest wait for the next).
const REPAIR_ROUND_EVENTS_MAX: usize = 4096;
/// The repairer wakes at least this often (retries, leadership checks).
const REPAIR_PERIOD: Duration = Duration::from_millis(200);

impl ShardCore {
    /// Repairs damaged events from other replicas, one round per wake-up or period.
    pub(crate) async fn run_repairer(self: Rc<Self>, wake: LocalReceiver<()>) {
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
    pub(crate) fn repaired_durable(&self, e: &AppendEntry, loc: RecordLocation) {
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
}
