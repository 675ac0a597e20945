//! What travels inside a node-to-node frame ([`crate::wire`]): Raft messages of the
//! groups, the heartbeats of all groups between two nodes coalesced into one frame,
//! and requests forwarded to another node (their bytes are the shell's).
//!
//! A payload is `rkyv bytes | rkyv length: u32 LE | format: u8` ([`PEER_FORMAT`]). The
//! rkyv bytes are those of a private mirror of [`PeerFrame`]: the Raft types are generic
//! and carry no rkyv derives. The mirror borrows the commands, snapshot chunks and
//! bodies of the frame it encodes, so encoding copies each byte once. The trailer goes
//! last so that the rkyv bytes start at offset 0 of the buffer they are written into
//! (rkyv pads to alignment relative to that start); its length makes a truncated
//! payload an error rather than, by chance, a shorter valid archive.
//!
//! [`decode`] never panics on bad bytes: the payload is copied into an aligned buffer
//! and validated with bytecheck before anything reads it, then checked against the
//! invariants [`encode`] asserts (groups in range, at most one heartbeat per group,
//! entries of an AppendEntries consecutive after `prev_index` with terms that never
//! decrease and never exceed the message's term, §5.3).

use std::fmt;

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::with::Inline;
use rkyv::{Archive, Deserialize, Serialize};

use crate::entry::Command;
use crate::raft::{AppendResponse, Body, Entry, Message, NodeId, Payload, SnapshotMeta};
use crate::GROUPS;

/// The last byte of every payload; a different value is another (unknown) format.
pub const PEER_FORMAT: u8 = 1;
/// Bytes after the rkyv bytes: their length (u32 LE) and the format byte.
pub const PEER_TRAILER_BYTES: usize = 5;
/// Items in one [`PeerFrame::Heartbeats`] or [`PeerFrame::HeartbeatAcks`] at most: one
/// per group.
pub const HEARTBEAT_ITEMS_MAX: usize = GROUPS as usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFrame {
    /// One Raft message of one group. Any body may travel this way, heartbeats
    /// included, though those are normally coalesced into [`PeerFrame::Heartbeats`].
    Raft { group: u16, msg: Message<Command> },
    /// Every heartbeat node `from` sends node `to` in one tick: one item per group.
    Heartbeats {
        from: NodeId,
        to: NodeId,
        items: Vec<HeartbeatItem>,
    },
    /// The answers to a [`PeerFrame::Heartbeats`] frame: one item per group.
    HeartbeatAcks {
        from: NodeId,
        to: NodeId,
        items: Vec<HeartbeatAck>,
    },
    /// A request forwarded to another node; the answer carries the same `id`.
    Request { id: RequestId, body: Vec<u8> },
    /// The answer to the [`PeerFrame::Request`] with this `id`, with the crc32 of the
    /// request's body as the answering node received it: the requester checks that it
    /// is the body it sent, so a reply can never complete another request.
    Response {
        id: RequestId,
        request_crc: u32,
        body: Vec<u8>,
    },
    /// The sender refuses this connection (its handshake was fine, the peer is not, e.g.
    /// it came back with a new data dir): the first and last frame on it, so that the
    /// refused node can say why in its own log.
    Refused { reason: String },
}

/// Identifies a forwarded request for as long as the cluster runs: the requesting
/// process's incarnation (random, new at every start; see
/// [`crate::wire::Handshake::incarnation`]) and a number counted from 1 within it. A
/// process restarted while its requests were in flight numbers its own from 1 again,
/// but with another incarnation, so the answers to the old ones match none of its own.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    pub incarnation: u64,
    pub seq: u64,
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}/{}", self.incarnation, self.seq)
    }
}

/// The [`Body::Heartbeat`] of one group, without the node ids its frame carries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatItem {
    pub group: u16,
    pub term: u64,
    pub commit: u64,
    pub leader_commit: u64,
}

/// The [`Body::HeartbeatResponse`] of one group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub group: u16,
    pub term: u64,
}

impl HeartbeatItem {
    /// The item of `msg` if it is a heartbeat, for coalescing.
    pub fn from_message(group: u16, msg: &Message<Command>) -> Option<HeartbeatItem> {
        match msg.body {
            Body::Heartbeat {
                commit,
                leader_commit,
            } => Some(HeartbeatItem {
                group,
                term: msg.term,
                commit,
                leader_commit,
            }),
            _ => None,
        }
    }

    /// The Raft message this item stands for, to step into group `self.group`.
    pub fn to_message(&self, from: NodeId, to: NodeId) -> Message<Command> {
        Message {
            from,
            to,
            term: self.term,
            body: Body::Heartbeat {
                commit: self.commit,
                leader_commit: self.leader_commit,
            },
        }
    }
}

impl HeartbeatAck {
    /// The ack of `msg` if it is a heartbeat response, for coalescing.
    pub fn from_message(group: u16, msg: &Message<Command>) -> Option<HeartbeatAck> {
        match msg.body {
            Body::HeartbeatResponse => Some(HeartbeatAck {
                group,
                term: msg.term,
            }),
            _ => None,
        }
    }

    /// The Raft message this ack stands for, to step into group `self.group`.
    pub fn to_message(&self, from: NodeId, to: NodeId) -> Message<Command> {
        Message {
            from,
            to,
            term: self.term,
            body: Body::HeartbeatResponse,
        }
    }
}

/// Why a payload is not a [`PeerFrame`]. Every variant carries the offending values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// Fewer bytes than the trailer alone.
    TooShort {
        bytes: usize,
    },
    /// The trailing format byte is not [`PEER_FORMAT`].
    Format {
        found: u8,
    },
    /// The trailer's length is not that of the bytes before it (a truncated payload).
    LengthMismatch {
        stated: u32,
        actual: usize,
    },
    /// The bytes are not a valid archived frame.
    Invalid {
        reason: String,
    },
    GroupOutOfRange {
        group: u16,
    },
    TooManyHeartbeats {
        items: usize,
    },
    /// Entry `position` of an AppendEntries breaks the log's order: its index is not
    /// `prev_index + 1 + position`, or its term is below the previous entry's (or
    /// `prev_term`) or above the message's term.
    EntryOutOfOrder {
        position: usize,
        index: u64,
        term: u64,
        prev_index: u64,
        prev_term: u64,
        msg_term: u64,
    },
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::TooShort { bytes } => write!(
                f,
                "peer payload of {bytes} bytes, shorter than its {PEER_TRAILER_BYTES}-byte trailer"
            ),
            PeerError::Format { found } => {
                write!(f, "peer payload format {found}, expected {PEER_FORMAT}")
            }
            PeerError::LengthMismatch { stated, actual } => {
                write!(f, "peer payload states {stated} rkyv bytes, holds {actual}")
            }
            PeerError::Invalid { reason } => write!(f, "peer payload invalid: {reason}"),
            PeerError::GroupOutOfRange { group } => {
                write!(f, "peer frame names group {group}, groups are 0..{GROUPS}")
            }
            PeerError::TooManyHeartbeats { items } => write!(
                f,
                "peer frame holds {items} heartbeat items, at most {HEARTBEAT_ITEMS_MAX}"
            ),
            PeerError::EntryOutOfOrder {
                position,
                index,
                term,
                prev_index,
                prev_term,
                msg_term,
            } => write!(
                f,
                "append entry {position} (index {index}, term {term}) does not follow \
                 prev_index {prev_index} / prev_term {prev_term} in a message of term {msg_term}"
            ),
        }
    }
}

impl std::error::Error for PeerError {}

/// The payload of `frame`. Panics if `frame` breaks an invariant [`decode`] checks: the
/// caller built it from its own Raft state, so that would be a bug.
pub fn encode(frame: &PeerFrame) -> Vec<u8> {
    if let Err(e) = check(frame) {
        panic!("encoding a peer frame that breaks its invariants: {e}");
    }
    let wire = WireFrame::of(frame);
    let mut out = match rkyv::api::high::to_bytes_in::<_, rancor::Error>(&wire, Vec::new()) {
        Ok(bytes) => bytes,
        Err(e) => panic!("rkyv serialization of a peer frame failed: {e}"),
    };
    let len = u32::try_from(out.len()).expect("a peer frame is far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.push(PEER_FORMAT);
    out
}

/// The frame in `bytes` (a frame payload; any alignment). Never panics on bad bytes.
pub fn decode(bytes: &[u8]) -> Result<PeerFrame, PeerError> {
    let Some(archive_len) = bytes.len().checked_sub(PEER_TRAILER_BYTES) else {
        return Err(PeerError::TooShort { bytes: bytes.len() });
    };
    let (archive, trailer) = bytes.split_at(archive_len);
    if trailer[4] != PEER_FORMAT {
        return Err(PeerError::Format { found: trailer[4] });
    }
    let stated = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    if stated as usize != archive_len {
        return Err(PeerError::LengthMismatch {
            stated,
            actual: archive_len,
        });
    }
    // rkyv refuses (rather than misreads) unaligned data, and a frame payload sits at
    // any offset of the connection's read buffer.
    let mut aligned = AlignedVec::<16>::with_capacity(archive.len());
    aligned.extend_from_slice(archive);
    let archived =
        rkyv::access::<ArchivedWireFrame<'_>, rancor::Error>(&aligned).map_err(|e| invalid(&e))?;
    let frame = archived.to_frame()?;
    check(&frame)?;
    Ok(frame)
}

fn invalid(e: &rancor::Error) -> PeerError {
    PeerError::Invalid {
        reason: e.to_string(),
    }
}

/// The invariants both sides of the codec hold frames to.
fn check(frame: &PeerFrame) -> Result<(), PeerError> {
    let check_group = |group: u16| {
        if group < GROUPS {
            Ok(())
        } else {
            Err(PeerError::GroupOutOfRange { group })
        }
    };
    let check_items = |items: usize| {
        if items <= HEARTBEAT_ITEMS_MAX {
            Ok(())
        } else {
            Err(PeerError::TooManyHeartbeats { items })
        }
    };
    match frame {
        PeerFrame::Raft { group, msg } => {
            check_group(*group)?;
            check_entries(msg)
        }
        PeerFrame::Heartbeats { items, .. } => {
            check_items(items.len())?;
            items.iter().try_for_each(|item| check_group(item.group))
        }
        PeerFrame::HeartbeatAcks { items, .. } => {
            check_items(items.len())?;
            items.iter().try_for_each(|ack| check_group(ack.group))
        }
        PeerFrame::Request { .. } | PeerFrame::Response { .. } => Ok(()),
        PeerFrame::Refused { .. } => Ok(()),
    }
}

/// §5.3: the entries of an AppendEntries directly follow `prev_index`, and terms along
/// a log never decrease; a leader never holds an entry of a term above its own. The
/// follower relies on both (it computes its match index from `prev_index` and the count).
fn check_entries(msg: &Message<Command>) -> Result<(), PeerError> {
    let Body::Append {
        prev_index,
        prev_term,
        entries,
        ..
    } = &msg.body
    else {
        return Ok(());
    };
    let mut last_term = *prev_term;
    for (position, entry) in entries.iter().enumerate() {
        let in_order = Some(entry.index) == prev_index.checked_add(1 + position as u64)
            && entry.term >= last_term
            && entry.term <= msg.term;
        if !in_order {
            return Err(PeerError::EntryOutOfOrder {
                position,
                index: entry.index,
                term: entry.term,
                prev_index: *prev_index,
                prev_term: *prev_term,
                msg_term: msg.term,
            });
        }
        last_term = entry.term;
    }
    Ok(())
}

// The mirror of `PeerFrame` that rkyv archives. It borrows the bulky parts of the frame
// (commands, snapshot data, request bodies, heartbeat lists); decoding reads the
// validated archive directly and builds the owned frame, so the mirror is never
// deserialized as a whole.

#[derive(Archive, Serialize)]
enum WireFrame<'a> {
    Raft {
        group: u16,
        msg: WireMessage<'a>,
    },
    Heartbeats {
        from: u64,
        to: u64,
        #[rkyv(with = Inline)]
        items: &'a Vec<HeartbeatItem>,
    },
    HeartbeatAcks {
        from: u64,
        to: u64,
        #[rkyv(with = Inline)]
        items: &'a Vec<HeartbeatAck>,
    },
    Request {
        id: RequestId,
        #[rkyv(with = Inline)]
        body: &'a Vec<u8>,
    },
    Response {
        id: RequestId,
        request_crc: u32,
        #[rkyv(with = Inline)]
        body: &'a Vec<u8>,
    },
    Refused {
        #[rkyv(with = Inline)]
        reason: &'a String,
    },
}

#[derive(Archive, Serialize)]
struct WireMessage<'a> {
    from: u64,
    to: u64,
    term: u64,
    body: WireBody<'a>,
}

/// [`Body`] with [`AppendResponse`] flattened into two variants.
#[derive(Archive, Serialize)]
enum WireBody<'a> {
    PreVote {
        last_index: u64,
        last_term: u64,
    },
    PreVoteResponse {
        granted: bool,
    },
    Vote {
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
    },
    Append {
        prev_index: u64,
        prev_term: u64,
        entries: Vec<WireEntry<'a>>,
        commit: u64,
    },
    AppendAccepted {
        match_index: u64,
    },
    AppendRejected {
        prev_index: u64,
        conflict_term: Option<u64>,
        first_index: u64,
        catching_up: bool,
    },
    Heartbeat {
        commit: u64,
        leader_commit: u64,
    },
    HeartbeatResponse,
    InstallSnapshot {
        meta: WireSnapshotMeta,
        offset: u64,
        #[rkyv(with = Inline)]
        data: &'a Vec<u8>,
        done: bool,
    },
    InstallSnapshotResponse {
        meta: WireSnapshotMeta,
        next_offset: u64,
        installed: bool,
    },
    TimeoutNow,
}

#[derive(Archive, Serialize)]
struct WireEntry<'a> {
    term: u64,
    index: u64,
    payload: WirePayload<'a>,
}

/// An explicit enum, so `Payload::Noop` and `Payload::Data(Command::Noop)` stay apart.
#[derive(Archive, Serialize)]
enum WirePayload<'a> {
    Noop,
    Data(#[rkyv(with = Inline)] &'a Command),
}

#[derive(Archive, Serialize)]
struct WireSnapshotMeta {
    index: u64,
    term: u64,
}

impl<'a> WireFrame<'a> {
    fn of(frame: &'a PeerFrame) -> WireFrame<'a> {
        match frame {
            PeerFrame::Raft { group, msg } => WireFrame::Raft {
                group: *group,
                msg: WireMessage {
                    from: msg.from,
                    to: msg.to,
                    term: msg.term,
                    body: WireBody::of(&msg.body),
                },
            },
            PeerFrame::Heartbeats { from, to, items } => WireFrame::Heartbeats {
                from: *from,
                to: *to,
                items,
            },
            PeerFrame::HeartbeatAcks { from, to, items } => WireFrame::HeartbeatAcks {
                from: *from,
                to: *to,
                items,
            },
            PeerFrame::Request { id, body } => WireFrame::Request { id: *id, body },
            PeerFrame::Response {
                id,
                request_crc,
                body,
            } => WireFrame::Response {
                id: *id,
                request_crc: *request_crc,
                body,
            },
            PeerFrame::Refused { reason } => WireFrame::Refused { reason },
        }
    }
}

impl<'a> WireBody<'a> {
    fn of(body: &'a Body<Command>) -> WireBody<'a> {
        match body {
            Body::PreVote {
                last_index,
                last_term,
            } => WireBody::PreVote {
                last_index: *last_index,
                last_term: *last_term,
            },
            Body::PreVoteResponse { granted } => WireBody::PreVoteResponse { granted: *granted },
            Body::Vote {
                last_index,
                last_term,
                transfer,
            } => WireBody::Vote {
                last_index: *last_index,
                last_term: *last_term,
                transfer: *transfer,
            },
            Body::VoteResponse { granted } => WireBody::VoteResponse { granted: *granted },
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => WireBody::Append {
                prev_index: *prev_index,
                prev_term: *prev_term,
                entries: entries.iter().map(WireEntry::of).collect(),
                commit: *commit,
            },
            Body::AppendResponse(AppendResponse::Accepted { match_index }) => {
                WireBody::AppendAccepted {
                    match_index: *match_index,
                }
            }
            Body::AppendResponse(AppendResponse::Rejected {
                prev_index,
                conflict_term,
                first_index,
                catching_up,
            }) => WireBody::AppendRejected {
                prev_index: *prev_index,
                conflict_term: *conflict_term,
                first_index: *first_index,
                catching_up: *catching_up,
            },
            Body::Heartbeat {
                commit,
                leader_commit,
            } => WireBody::Heartbeat {
                commit: *commit,
                leader_commit: *leader_commit,
            },
            Body::HeartbeatResponse => WireBody::HeartbeatResponse,
            Body::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => WireBody::InstallSnapshot {
                meta: WireSnapshotMeta::of(meta),
                offset: *offset,
                data,
                done: *done,
            },
            Body::InstallSnapshotResponse {
                meta,
                next_offset,
                installed,
            } => WireBody::InstallSnapshotResponse {
                meta: WireSnapshotMeta::of(meta),
                next_offset: *next_offset,
                installed: *installed,
            },
            Body::TimeoutNow => WireBody::TimeoutNow,
        }
    }
}

impl<'a> WireEntry<'a> {
    fn of(entry: &'a Entry<Command>) -> WireEntry<'a> {
        WireEntry {
            term: entry.term,
            index: entry.index,
            payload: match &entry.payload {
                Payload::Noop => WirePayload::Noop,
                Payload::Data(command) => WirePayload::Data(command),
            },
        }
    }
}

impl WireSnapshotMeta {
    fn of(meta: &SnapshotMeta) -> WireSnapshotMeta {
        WireSnapshotMeta {
            index: meta.index,
            term: meta.term,
        }
    }
}

// From the validated archive to owned values.

impl ArchivedWireFrame<'_> {
    fn to_frame(&self) -> Result<PeerFrame, PeerError> {
        Ok(match self {
            ArchivedWireFrame::Raft { group, msg } => PeerFrame::Raft {
                group: group.to_native(),
                msg: Message {
                    from: msg.from.to_native(),
                    to: msg.to.to_native(),
                    term: msg.term.to_native(),
                    body: msg.body.to_body()?,
                },
            },
            ArchivedWireFrame::Heartbeats { from, to, items } => PeerFrame::Heartbeats {
                from: from.to_native(),
                to: to.to_native(),
                items: heartbeat_list(items.len(), || rkyv::deserialize(items))?,
            },
            ArchivedWireFrame::HeartbeatAcks { from, to, items } => PeerFrame::HeartbeatAcks {
                from: from.to_native(),
                to: to.to_native(),
                items: heartbeat_list(items.len(), || rkyv::deserialize(items))?,
            },
            ArchivedWireFrame::Request { id, body } => PeerFrame::Request {
                id: request_id(id),
                body: body.to_vec(),
            },
            ArchivedWireFrame::Response {
                id,
                request_crc,
                body,
            } => PeerFrame::Response {
                id: request_id(id),
                request_crc: request_crc.to_native(),
                body: body.to_vec(),
            },
            ArchivedWireFrame::Refused { reason } => PeerFrame::Refused {
                reason: reason.as_str().to_string(),
            },
        })
    }
}

fn request_id(id: &ArchivedRequestId) -> RequestId {
    RequestId {
        incarnation: id.incarnation.to_native(),
        seq: id.seq.to_native(),
    }
}

/// Refuses an oversized heartbeat list before allocating it.
fn heartbeat_list<T>(
    items: usize,
    build: impl FnOnce() -> Result<Vec<T>, rancor::Error>,
) -> Result<Vec<T>, PeerError> {
    if items > HEARTBEAT_ITEMS_MAX {
        return Err(PeerError::TooManyHeartbeats { items });
    }
    build().map_err(|e| invalid(&e))
}

impl ArchivedWireBody<'_> {
    fn to_body(&self) -> Result<Body<Command>, PeerError> {
        Ok(match self {
            ArchivedWireBody::PreVote {
                last_index,
                last_term,
            } => Body::PreVote {
                last_index: last_index.to_native(),
                last_term: last_term.to_native(),
            },
            ArchivedWireBody::PreVoteResponse { granted } => {
                Body::PreVoteResponse { granted: *granted }
            }
            ArchivedWireBody::Vote {
                last_index,
                last_term,
                transfer,
            } => Body::Vote {
                last_index: last_index.to_native(),
                last_term: last_term.to_native(),
                transfer: *transfer,
            },
            ArchivedWireBody::VoteResponse { granted } => Body::VoteResponse { granted: *granted },
            ArchivedWireBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => Body::Append {
                prev_index: prev_index.to_native(),
                prev_term: prev_term.to_native(),
                entries: entries
                    .iter()
                    .map(ArchivedWireEntry::to_entry)
                    .collect::<Result<_, _>>()?,
                commit: commit.to_native(),
            },
            ArchivedWireBody::AppendAccepted { match_index } => {
                Body::AppendResponse(AppendResponse::Accepted {
                    match_index: match_index.to_native(),
                })
            }
            ArchivedWireBody::AppendRejected {
                prev_index,
                conflict_term,
                first_index,
                catching_up,
            } => Body::AppendResponse(AppendResponse::Rejected {
                prev_index: prev_index.to_native(),
                conflict_term: conflict_term.as_ref().map(|term| term.to_native()),
                first_index: first_index.to_native(),
                catching_up: *catching_up,
            }),
            ArchivedWireBody::Heartbeat {
                commit,
                leader_commit,
            } => Body::Heartbeat {
                commit: commit.to_native(),
                leader_commit: leader_commit.to_native(),
            },
            ArchivedWireBody::HeartbeatResponse => Body::HeartbeatResponse,
            ArchivedWireBody::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => Body::InstallSnapshot {
                meta: meta.to_meta(),
                offset: offset.to_native(),
                data: data.to_vec(),
                done: *done,
            },
            ArchivedWireBody::InstallSnapshotResponse {
                meta,
                next_offset,
                installed,
            } => Body::InstallSnapshotResponse {
                meta: meta.to_meta(),
                next_offset: next_offset.to_native(),
                installed: *installed,
            },
            ArchivedWireBody::TimeoutNow => Body::TimeoutNow,
        })
    }
}

impl ArchivedWireEntry<'_> {
    fn to_entry(&self) -> Result<Entry<Command>, PeerError> {
        let payload = match &self.payload {
            ArchivedWirePayload::Noop => Payload::Noop,
            ArchivedWirePayload::Data(command) => Payload::Data(
                rkyv::deserialize::<Command, rancor::Error>(command).map_err(|e| invalid(&e))?,
            ),
        };
        Ok(Entry {
            term: self.term.to_native(),
            index: self.index.to_native(),
            payload,
        })
    }
}

impl ArchivedWireSnapshotMeta {
    fn to_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            index: self.index.to_native(),
            term: self.term.to_native(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::entry::{AppendEntry, CreateSession};

    fn append(seq: u64) -> Command {
        Command::Append(AppendEntry {
            session_id: "ses_1".into(),
            seq,
            inserted_at_us: 1_700_000_000_000_000,
            event_type: "note".into(),
            payload: r#"{"text":"héllo"}"#.into(),
            actor: Some("agent:drafter".into()),
            source: None,
            metadata: "{}".into(),
            refs: r#"{"r":[1]}"#.into(),
            idempotency_key: Some("k".into()),
            producer_id: Some("w".into()),
            producer_seq: Some(seq),
            digest: [seq as u8; 16],
        })
    }

    fn message(term: u64, body: Body<Command>) -> Message<Command> {
        Message {
            from: 1,
            to: 3,
            term,
            body,
        }
    }

    fn entry(term: u64, index: u64, payload: Payload<Command>) -> Entry<Command> {
        Entry {
            term,
            index,
            payload,
        }
    }

    fn round_trip(frame: PeerFrame) {
        let bytes = encode(&frame);
        assert_eq!(decode(&bytes), Ok(frame));
        // A payload may sit at any offset of a read buffer.
        let mut shifted = vec![0u8; 3];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode(&shifted[3..]), decode(&bytes));
    }

    /// Encodes without the invariant checks of [`encode`], to show `decode` applies them.
    fn encode_unchecked(frame: &PeerFrame) -> Vec<u8> {
        let mut out =
            rkyv::api::high::to_bytes_in::<_, rancor::Error>(&WireFrame::of(frame), Vec::new())
                .unwrap();
        out.extend_from_slice(&(out.len() as u32).to_le_bytes());
        out.push(PEER_FORMAT);
        out
    }

    fn every_body() -> Vec<Body<Command>> {
        let meta = SnapshotMeta { index: 40, term: 6 };
        vec![
            Body::PreVote {
                last_index: 9,
                last_term: 4,
            },
            Body::PreVoteResponse { granted: true },
            Body::Vote {
                last_index: 9,
                last_term: 4,
                transfer: true,
            },
            Body::VoteResponse { granted: false },
            Body::Append {
                prev_index: 10,
                prev_term: 5,
                entries: vec![
                    entry(6, 11, Payload::Noop),
                    entry(6, 12, Payload::Data(Command::Noop)),
                    entry(7, 13, Payload::Data(append(1))),
                    entry(
                        7,
                        14,
                        Payload::Data(Command::CreateSession(CreateSession {
                            session_id: "ses_2".into(),
                            title: None,
                            metadata: r#"{"a":1.50}"#.into(),
                            at_us: -1,
                        })),
                    ),
                ],
                commit: 12,
            },
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries: Vec::new(),
                commit: 0,
            },
            Body::AppendResponse(AppendResponse::Accepted { match_index: 14 }),
            Body::AppendResponse(AppendResponse::Rejected {
                prev_index: 10,
                conflict_term: Some(3),
                first_index: 8,
                catching_up: false,
            }),
            Body::AppendResponse(AppendResponse::Rejected {
                prev_index: 10,
                conflict_term: None,
                first_index: 5,
                catching_up: true,
            }),
            Body::Heartbeat {
                commit: 12,
                leader_commit: 15,
            },
            Body::HeartbeatResponse,
            Body::InstallSnapshot {
                meta,
                offset: 1 << 20,
                data: (0..5000u32).map(|i| (i * 7) as u8).collect(),
                done: false,
            },
            Body::InstallSnapshot {
                meta,
                offset: 0,
                data: Vec::new(),
                done: true,
            },
            Body::InstallSnapshotResponse {
                meta,
                next_offset: 4096,
                installed: false,
            },
            Body::TimeoutNow,
        ]
    }

    #[test]
    fn every_raft_body_round_trips() {
        for (group, body) in every_body().into_iter().enumerate() {
            round_trip(PeerFrame::Raft {
                group: group as u16 * 17,
                msg: message(7, body),
            });
        }
    }

    #[test]
    fn noop_payload_and_noop_command_stay_distinct() {
        let frame = |payload| PeerFrame::Raft {
            group: 0,
            msg: message(
                2,
                Body::Append {
                    prev_index: 0,
                    prev_term: 0,
                    entries: vec![entry(2, 1, payload)],
                    commit: 0,
                },
            ),
        };
        let noop = encode(&frame(Payload::Noop));
        let data_noop = encode(&frame(Payload::Data(Command::Noop)));
        assert_ne!(noop, data_noop);
        assert_eq!(decode(&noop), Ok(frame(Payload::Noop)));
        assert_eq!(decode(&data_noop), Ok(frame(Payload::Data(Command::Noop))));
    }

    #[test]
    fn heartbeats_of_every_group_round_trip() {
        let items: Vec<HeartbeatItem> = (0..GROUPS)
            .map(|group| HeartbeatItem {
                group,
                term: 3 + group as u64,
                commit: u64::MAX - group as u64,
                leader_commit: u64::MAX - group as u64 / 2,
            })
            .collect();
        let acks: Vec<HeartbeatAck> = (0..GROUPS)
            .rev()
            .map(|group| HeartbeatAck { group, term: 9 })
            .collect();
        round_trip(PeerFrame::Heartbeats {
            from: 2,
            to: 1,
            items,
        });
        round_trip(PeerFrame::HeartbeatAcks {
            from: 1,
            to: 2,
            items: acks,
        });
        round_trip(PeerFrame::Heartbeats {
            from: 2,
            to: 1,
            items: Vec::new(),
        });
    }

    #[test]
    fn heartbeat_items_split_out_and_rebuild_raft_messages() {
        let heartbeat = message(
            5,
            Body::Heartbeat {
                commit: 8,
                leader_commit: 9,
            },
        );
        let item = HeartbeatItem::from_message(42, &heartbeat).unwrap();
        assert_eq!(
            item,
            HeartbeatItem {
                group: 42,
                term: 5,
                commit: 8,
                leader_commit: 9,
            }
        );
        assert_eq!(item.to_message(1, 3), heartbeat);
        let response = message(5, Body::HeartbeatResponse);
        let ack = HeartbeatAck::from_message(42, &response).unwrap();
        assert_eq!(ack, HeartbeatAck { group: 42, term: 5 });
        assert_eq!(ack.to_message(1, 3), response);
        assert_eq!(HeartbeatItem::from_message(42, &response), None);
        assert_eq!(HeartbeatAck::from_message(42, &heartbeat), None);
    }

    #[test]
    fn a_refusal_round_trips() {
        round_trip(PeerFrame::Refused {
            reason: "node 3 came back with a new data dir".into(),
        });
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let id = |incarnation, seq| RequestId { incarnation, seq };
        round_trip(PeerFrame::Request {
            id: id(0x1234_5678_9abc_def0, 7),
            body: b"opaque op".to_vec(),
        });
        round_trip(PeerFrame::Response {
            id: id(u64::MAX, u64::MAX),
            request_crc: 0xdead_beef,
            body: Vec::new(),
        });
        round_trip(PeerFrame::Response {
            id: id(1, 0),
            request_crc: 0,
            body: vec![0xff; 70_000],
        });
    }

    #[test]
    fn every_truncation_is_an_error() {
        let frames = [
            PeerFrame::Raft {
                group: 3,
                msg: message(7, every_body().swap_remove(4)),
            },
            PeerFrame::Request {
                id: RequestId {
                    incarnation: 5,
                    seq: 1,
                },
                body: b"x".to_vec(),
            },
        ];
        for frame in frames {
            let bytes = encode(&frame);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "cut {cut} of {frame:?}");
            }
        }
        assert_eq!(decode(&[]), Err(PeerError::TooShort { bytes: 0 }));
    }

    #[test]
    fn every_bit_flip_decodes_or_errs_without_panic() {
        for body in every_body() {
            let bytes = encode(&PeerFrame::Raft {
                group: 1,
                msg: message(7, body),
            });
            // The snapshot chunk is long; its data bytes are all alike.
            for at in (0..bytes.len()).filter(|at| *at < 512 || bytes.len() - at < 512) {
                for bit in 0..8 {
                    let mut flipped = bytes.clone();
                    flipped[at] ^= 1 << bit;
                    let _ = decode(&flipped);
                }
            }
        }
    }

    #[test]
    fn unknown_format_byte_is_refused() {
        let mut bytes = encode(&PeerFrame::Request {
            id: RequestId {
                incarnation: 5,
                seq: 1,
            },
            body: Vec::new(),
        });
        *bytes.last_mut().unwrap() = 2;
        assert_eq!(decode(&bytes), Err(PeerError::Format { found: 2 }));
    }

    #[test]
    fn decode_refuses_frames_that_break_invariants() {
        let out_of_range = PeerFrame::Raft {
            group: GROUPS,
            msg: message(1, Body::TimeoutNow),
        };
        assert_eq!(
            decode(&encode_unchecked(&out_of_range)),
            Err(PeerError::GroupOutOfRange { group: GROUPS })
        );
        let too_many = PeerFrame::HeartbeatAcks {
            from: 1,
            to: 2,
            items: vec![HeartbeatAck { group: 0, term: 1 }; HEARTBEAT_ITEMS_MAX + 1],
        };
        assert_eq!(
            decode(&encode_unchecked(&too_many)),
            Err(PeerError::TooManyHeartbeats {
                items: HEARTBEAT_ITEMS_MAX + 1
            })
        );
        let append = |entries| PeerFrame::Raft {
            group: 0,
            msg: message(
                5,
                Body::Append {
                    prev_index: 10,
                    prev_term: 4,
                    entries,
                    commit: 0,
                },
            ),
        };
        let refused = [
            vec![entry(4, 12, Payload::Noop)],
            vec![entry(4, 11, Payload::Noop), entry(4, 11, Payload::Noop)],
            vec![entry(3, 11, Payload::Noop)],
            vec![entry(5, 11, Payload::Noop), entry(4, 12, Payload::Noop)],
            vec![entry(6, 11, Payload::Noop)],
        ];
        for entries in refused {
            let frame = append(entries);
            assert!(
                matches!(
                    decode(&encode_unchecked(&frame)),
                    Err(PeerError::EntryOutOfOrder { .. })
                ),
                "{frame:?}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "breaks its invariants")]
    fn encode_refuses_entries_out_of_order() {
        encode(&PeerFrame::Raft {
            group: 0,
            msg: message(
                5,
                Body::Append {
                    prev_index: 10,
                    prev_term: 4,
                    entries: vec![entry(4, 13, Payload::Noop)],
                    commit: 0,
                },
            ),
        });
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            // With a well-formed trailer, the rkyv validation itself is exercised.
            bytes.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            bytes.push(PEER_FORMAT);
            let _ = decode(&bytes);
        }

        #[test]
        fn random_appends_round_trip(
            prev_index in 0u64..1 << 40,
            terms in proptest::collection::vec((0u64..3, any::<bool>(), any::<u64>()), 0..40),
        ) {
            let mut term = 1;
            let entries = terms
                .iter()
                .enumerate()
                .map(|(i, &(bump, noop, seq))| {
                    term += bump;
                    let payload = if noop { Payload::Noop } else { Payload::Data(append(seq)) };
                    entry(term, prev_index + 1 + i as u64, payload)
                })
                .collect();
            let frame = PeerFrame::Raft {
                group: (prev_index % GROUPS as u64) as u16,
                msg: message(term, Body::Append { prev_index, prev_term: 1, entries, commit: prev_index }),
            };
            prop_assert_eq!(decode(&encode(&frame)), Ok(frame));
        }
    }
}
