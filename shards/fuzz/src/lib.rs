//! Shared parts of the fuzz targets in `fuzz_targets/`: builders that turn fuzzer bytes
//! into valid values of the formats under test (so a target reaches the checks behind
//! the crc32s and the rkyv validation), and the damage a disk or a network does to
//! their encodings.
//!
//! Every builder reads an [`Unstructured`]: running out of bytes gives small, still
//! valid values, so any input is a usable recipe.

use arbitrary::{Result, Unstructured};
use shards::entry::{
    AppendEntry, ArchiveProgress, Command, CreateSession, LogRecord, MetaRecord, PatchSession,
    SessionProgress, SetArchived,
};
use shards::peer::{HeartbeatAck, HeartbeatItem, PeerFrame, RequestId};
use shards::raft::{AppendResponse, Body, Entry, Message, Payload, SnapshotMeta};
use shards::snapshot::{
    GroupSnapshot, GroupTransfer, RepairedEvent, Run, SessionIndex, ShardSnapshot, SnapshotEntry,
};

/// Longest string or byte field a builder makes: enough to cross sectors and rkyv's
/// inline/out-of-line string boundary without slowing every run down.
const FIELD_BYTES_MAX: usize = 600;
/// Most items of any list a builder makes.
const ITEMS_MAX: usize = 8;

/// A short string: often one of a few values (so that equal ids and keys occur), else
/// arbitrary UTF-8.
pub fn text(u: &mut Unstructured) -> Result<String> {
    const COMMON: [&str; 5] = ["", "s1", "session-2", "{}", "{\"k\":1}"];
    if u.ratio(1, 2)? {
        return Ok(COMMON[u.choose_index(COMMON.len())?].to_string());
    }
    let len = u.int_in_range(0..=FIELD_BYTES_MAX)?;
    let mut s = String::new();
    while s.len() < len && !u.is_empty() {
        s.push(u.arbitrary::<char>()?);
    }
    Ok(s)
}

pub fn bytes(u: &mut Unstructured) -> Result<Vec<u8>> {
    let len = u.int_in_range(0..=FIELD_BYTES_MAX)?;
    Ok(u.bytes(len.min(u.len()))?.to_vec())
}

fn opt<T>(
    u: &mut Unstructured,
    f: impl FnOnce(&mut Unstructured) -> Result<T>,
) -> Result<Option<T>> {
    Ok(if u.arbitrary::<bool>()? {
        Some(f(u)?)
    } else {
        None
    })
}

fn list<T>(
    u: &mut Unstructured,
    max: usize,
    mut f: impl FnMut(&mut Unstructured) -> Result<T>,
) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| f(u)).collect()
}

pub fn append_entry(u: &mut Unstructured) -> Result<AppendEntry> {
    Ok(AppendEntry {
        session_id: text(u)?,
        seq: u.arbitrary()?,
        inserted_at_us: u.arbitrary()?,
        event_type: text(u)?,
        payload: text(u)?,
        actor: opt(u, text)?,
        source: opt(u, text)?,
        metadata: text(u)?,
        refs: text(u)?,
        idempotency_key: opt(u, text)?,
        producer_id: opt(u, text)?,
        producer_seq: u.arbitrary()?,
        digest: u.arbitrary()?,
    })
}

pub fn command(u: &mut Unstructured) -> Result<Command> {
    Ok(match u.int_in_range(0..=7)? {
        0 => Command::Noop,
        1 => Command::CreateSession(CreateSession {
            session_id: text(u)?,
            title: opt(u, text)?,
            metadata: text(u)?,
            at_us: u.arbitrary()?,
        }),
        2 => Command::PatchSession(PatchSession {
            session_id: text(u)?,
            title: opt(u, text)?,
            metadata: text(u)?,
            version: u.arbitrary()?,
            at_us: u.arbitrary()?,
        }),
        3 => Command::SetArchived(SetArchived {
            session_id: text(u)?,
            archived: u.arbitrary()?,
            version: u.arbitrary()?,
            at_us: u.arbitrary()?,
        }),
        4 => Command::ArchiveProgress(ArchiveProgress {
            sessions: list(u, ITEMS_MAX, |u| {
                Ok(SessionProgress {
                    session_id: text(u)?,
                    archived_seq: u.arbitrary()?,
                })
            })?,
        }),
        5 => Command::Meta(MetaRecord::HardState {
            term: u.arbitrary()?,
            vote: u.arbitrary()?,
            commit: u.arbitrary()?,
        }),
        6 => Command::Meta(MetaRecord::Snapshot {
            index: u.arbitrary()?,
            term: u.arbitrary()?,
            checksum: u.arbitrary()?,
            state: bytes(u)?,
        }),
        _ => Command::Append(append_entry(u)?),
    })
}

pub fn log_record(u: &mut Unstructured) -> Result<LogRecord> {
    Ok(LogRecord {
        group: u.arbitrary()?,
        term: u.arbitrary()?,
        index: u.arbitrary()?,
        command: command(u)?,
    })
}

fn snapshot_meta(u: &mut Unstructured) -> Result<SnapshotMeta> {
    Ok(SnapshotMeta {
        index: u.arbitrary()?,
        term: u.arbitrary()?,
    })
}

/// A Raft message that keeps the invariants `peer::encode` asserts (§5.3: entries
/// follow `prev_index` with terms that never decrease and never pass the message's).
pub fn raft_message(u: &mut Unstructured) -> Result<Message<Command>> {
    let term: u64 = u.arbitrary()?;
    let body = match u.int_in_range(0..=11)? {
        0 => Body::PreVote {
            last_index: u.arbitrary()?,
            last_term: u.arbitrary()?,
        },
        1 => Body::PreVoteResponse {
            granted: u.arbitrary()?,
        },
        2 => Body::Vote {
            last_index: u.arbitrary()?,
            last_term: u.arbitrary()?,
            transfer: u.arbitrary()?,
        },
        3 => Body::VoteResponse {
            granted: u.arbitrary()?,
        },
        4 => Body::AppendResponse(AppendResponse::Accepted {
            match_index: u.arbitrary()?,
        }),
        5 => Body::AppendResponse(AppendResponse::Rejected {
            prev_index: u.arbitrary()?,
            conflict_term: u.arbitrary()?,
            first_index: u.arbitrary()?,
            catching_up: u.arbitrary()?,
        }),
        6 => Body::Heartbeat {
            commit: u.arbitrary()?,
            leader_commit: u.arbitrary()?,
        },
        7 => Body::HeartbeatResponse,
        8 => Body::InstallSnapshot {
            meta: snapshot_meta(u)?,
            offset: u.arbitrary()?,
            data: bytes(u)?,
            done: u.arbitrary()?,
        },
        9 => Body::InstallSnapshotResponse {
            meta: snapshot_meta(u)?,
            next_offset: u.arbitrary()?,
            installed: u.arbitrary()?,
        },
        10 => Body::TimeoutNow,
        _ => append_body(u, term)?,
    };
    Ok(Message {
        from: u.arbitrary()?,
        to: u.arbitrary()?,
        term,
        body,
    })
}

fn append_body(u: &mut Unstructured, term: u64) -> Result<Body<Command>> {
    let prev_index = u.int_in_range(0..=u64::MAX - ITEMS_MAX as u64)?;
    let prev_term = u.int_in_range(0..=term)?;
    let mut entry_term = prev_term;
    let entries = list(u, ITEMS_MAX, |u| {
        entry_term = u.int_in_range(entry_term..=term)?;
        let payload = if u.arbitrary()? {
            Payload::Data(command(u)?)
        } else {
            Payload::Noop
        };
        Ok((entry_term, payload))
    })?;
    let entries = entries
        .into_iter()
        .enumerate()
        .map(|(i, (term, payload))| Entry {
            term,
            index: prev_index + 1 + i as u64,
            payload,
        })
        .collect();
    Ok(Body::Append {
        prev_index,
        prev_term,
        entries,
        commit: u.arbitrary()?,
    })
}

/// A frame `peer::encode` accepts: groups below `shards::GROUPS`.
pub fn peer_frame(u: &mut Unstructured) -> Result<PeerFrame> {
    let group = |u: &mut Unstructured| u.int_in_range(0..=shards::GROUPS - 1);
    let id = |u: &mut Unstructured| -> Result<RequestId> {
        Ok(RequestId {
            incarnation: u.arbitrary()?,
            seq: u.arbitrary()?,
        })
    };
    Ok(match u.int_in_range(0..=5)? {
        0 => PeerFrame::Raft {
            group: group(u)?,
            msg: raft_message(u)?,
        },
        1 => PeerFrame::Heartbeats {
            from: u.arbitrary()?,
            to: u.arbitrary()?,
            items: list(u, ITEMS_MAX, |u| {
                Ok(HeartbeatItem {
                    group: group(u)?,
                    term: u.arbitrary()?,
                    commit: u.arbitrary()?,
                    leader_commit: u.arbitrary()?,
                })
            })?,
        },
        2 => PeerFrame::HeartbeatAcks {
            from: u.arbitrary()?,
            to: u.arbitrary()?,
            items: list(u, ITEMS_MAX, |u| {
                Ok(HeartbeatAck {
                    group: group(u)?,
                    term: u.arbitrary()?,
                })
            })?,
        },
        3 => PeerFrame::Request {
            id: id(u)?,
            body: bytes(u)?,
        },
        4 => PeerFrame::Response {
            id: id(u)?,
            request_crc: u.arbitrary()?,
            body: bytes(u)?,
        },
        _ => PeerFrame::Refused { reason: text(u)? },
    })
}

pub fn shard_snapshot(u: &mut Unstructured) -> Result<ShardSnapshot> {
    let groups = list(u, 4, |u| {
        Ok(GroupSnapshot {
            group: u.arbitrary()?,
            committed_index: u.arbitrary()?,
            state: bytes(u)?,
            checksum: u.arbitrary()?,
            committed_term: u.arbitrary()?,
            hard_term: u.arbitrary()?,
            hard_vote: u.arbitrary()?,
            entries: list(u, 4, |u| {
                Ok(SnapshotEntry {
                    index: u.arbitrary()?,
                    term: u.arbitrary()?,
                    command: command(u)?,
                    epoch: u.arbitrary()?,
                    offset: u.arbitrary()?,
                    crc: u.arbitrary()?,
                    sealed: u.arbitrary()?,
                })
            })?,
        })
    })?;
    let sessions = list(u, 4, |u| {
        Ok(SessionIndex {
            session_id: text(u)?,
            base_seq: u.arbitrary()?,
            runs: list(u, ITEMS_MAX, |u| {
                Ok(Run {
                    epoch: u.arbitrary()?,
                    first_seq: u.arbitrary()?,
                    count: u.arbitrary()?,
                    start: u.arbitrary()?,
                })
            })?,
            active_epoch: u.arbitrary()?,
            active_first_seq: u.arbitrary()?,
            active: list(u, ITEMS_MAX, |u| u.arbitrary())?,
            repaired: list(u, ITEMS_MAX, |u| {
                Ok(RepairedEvent {
                    seq: u.arbitrary()?,
                    epoch: u.arbitrary()?,
                    offset: u.arbitrary()?,
                })
            })?,
        })
    })?;
    Ok(ShardSnapshot {
        resume_epoch: u.arbitrary()?,
        resume_offset: u.arbitrary()?,
        groups,
        sessions,
    })
}

pub fn group_transfer(u: &mut Unstructured) -> Result<GroupTransfer> {
    Ok(GroupTransfer {
        state: bytes(u)?,
        checksum: u.arbitrary()?,
        events: list(u, 4, append_entry)?,
    })
}

/// Damages `buf` the ways storage and networks do: flipped bits, overwritten bytes,
/// a zeroed 512-byte sector (a write torn inside a batch), a cut or grown end. Only
/// positions in `range` are touched by the in-place kinds. Returns whether anything
/// changed.
pub fn damage(
    u: &mut Unstructured,
    buf: &mut Vec<u8>,
    range: std::ops::Range<usize>,
) -> Result<bool> {
    let mut changed = false;
    for _ in 0..u.int_in_range(0..=3)? {
        // An earlier cut may have shortened `buf`.
        let range = range.start.min(buf.len())..range.end.min(buf.len());
        let kind = u.int_in_range(0..=4)?;
        if range.is_empty() && kind < 3 {
            continue;
        }
        let at = if range.is_empty() {
            0
        } else {
            u.int_in_range(range.start..=range.end - 1)?
        };
        match kind {
            0 => buf[at] ^= 1 << u.int_in_range(0..=7)?,
            1 => buf[at] = u.arbitrary()?,
            2 => {
                let start = at / 512 * 512;
                let end = (start + 512).min(buf.len());
                buf[start..end].fill(0);
            }
            3 => {
                let keep = u.int_in_range(0..=buf.len())?;
                buf.truncate(keep);
            }
            _ => {
                let grow = bytes(u)?;
                buf.extend_from_slice(&grow);
            }
        }
        changed = true;
    }
    Ok(changed)
}
