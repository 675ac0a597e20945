//! Reading cold events with a fallback to other replicas: an event whose local copy
//! fails verification is read from another replica of its group (`Op::FetchEvents`),
//! and this replica serves such fetches from its own log.

use std::time::{Duration, Instant};

use shards::entry::{AppendEntry, Command, LogRecord};
use shards::scrub::{self, FetchVerdict};

use crate::ops::{ApiError, Op, Reply};
use crate::shard::reads::sealed_run;
use crate::shard::ShardCore;
use crate::store::Cold;
use crate::wal::{ReadError, RecordLocation};

/// Bytes of events one fetch asks a peer for (the reply is one frame, at most 32 MiB).
const FETCH_BYTES_MAX: usize = 4 << 20;
/// Events one fetch answers with, at most.
const FETCH_EVENTS_MAX: u64 = 4096;
/// How long one peer gets to answer a fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// A record's command in a few words, for messages.
fn describe(command: &Command) -> String {
    match command {
        Command::Append(e) => format!("event {} of {}", e.seq, e.session_id),
        Command::Meta(_) => "Raft state".into(),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

impl ShardCore {
    /// Reads the cold events `cold` of session `id` (in seq order) and hands each to
    /// `take` until it returns false; returns whether every one was taken. An event whose
    /// local copy fails verification (its record, or its segment's index file) is
    /// reported, and it and the rest of its run of events are read from another replica
    /// instead. With no other replica to read from, the answer is `LogDamaged`, naming
    /// the damage: never wrong data.
    pub(crate) async fn read_cold_events(
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
    pub(crate) async fn read_event(
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
    pub(super) async fn fetch_from_peers(
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
    pub(crate) async fn serve_fetch(
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
                        crate::shard::event_bytes(e)
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
}
