//! Shard snapshots and segment index files: the formats, and the pure rules recovery
//! follows with them.
//!
//! A shard snapshot keeps restart time bounded. It holds, for every group of the shard,
//! the committed session state ([`crate::session::GroupState::encode_snapshot`]) with
//! the log index it covers, and the shard's event index (where each session's events
//! live in the log) captured at one moment together with the log position `resume` at
//! which replay must start. Groups are serialised one at a time (so a big state never
//! stalls the shard), each at its own moment, which is why every group records its own
//! `committed_index`: replay skips the records a group already holds (see
//! [`ReplayRule`]).
//!
//! A segment index file (`.idx`, "sidecar") is written when a segment is sealed: the
//! byte offset of every event in the segment, grouped by session run, so that the
//! memory needed to find an old event does not grow with the number of events (only
//! with sessions × segments). Its header carries a crc32 of the offsets, checked when a
//! reader opens the file ([`decode_sidecar`]).
//!
//! # Snapshot file
//!
//! ```text
//! 0      8  magic "SCSNAP03" (version 3; "SCSNAP02" files, without repaired events,
//!           are still read)
//! 8      4  crc32 of bytes 12..L
//! 12     …  rkyv bytes of ShardSnapshot; L = end of the body
//! L      8  L (u64 LE)
//! …         zeros to a whole number of 4 KiB blocks (one more block when L + 8 ends
//!           less than 8 bytes before a boundary, so the copy and the trailer never overlap)
//! end-8  8  L again (u64 LE): a reader finds the body from the file's end
//! ```
//!
//! Only bytes 0..L are checksummed. The two copies of L let a reader tell a damaged
//! trailer (the body is found through the copy and still checked) from a file that is
//! cut short ([`decode_snapshot_file`]).

use rkyv::{Archive, Deserialize, Serialize};

const SNAPSHOT_MAGIC: [u8; 8] = *b"SCSNAP03";
/// Snapshots written before repaired events existed (no `SessionIndex::repaired`).
const SNAPSHOT_MAGIC_V2: [u8; 8] = *b"SCSNAP02";
/// Where the body's checksum sits in a snapshot, and where the checksummed bytes start.
const SNAPSHOT_CRC_AT: usize = 8;
const SNAPSHOT_BODY_AT: usize = 12;
const TRANSFER_MAGIC: [u8; 8] = *b"SCXFER01";
const SIDECAR_MAGIC: [u8; 8] = *b"SCIDX001";
/// Sidecar header: magic, epoch u64, count u32, crc32 of the offsets u32, then padding.
pub const SIDECAR_HEADER_BYTES: usize = 32;

/// A run of consecutive events of one session inside one sealed segment: events
/// `first_seq .. first_seq + count` live at offsets `sidecar[start .. start + count]`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub epoch: u32,
    pub first_seq: u64,
    pub count: u32,
    pub start: u32,
}

/// Where one session's events live, as captured in a snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionIndex {
    pub session_id: String,
    /// Events `1..=base_seq` are no longer in the local log (retention deleted their
    /// segments); `runs` start after it.
    pub base_seq: u64,
    pub runs: Vec<Run>,
    /// Events `active_first_seq ..` in the active segment `active_epoch`, by offset.
    pub active_epoch: u32,
    pub active_first_seq: u64,
    pub active: Vec<u32>,
    /// Events whose original record is damaged, read from a repaired copy instead.
    pub repaired: Vec<RepairedEvent>,
}

/// Event `seq` of a session is read from the repaired copy at (`epoch`, `offset`), not
/// from where its runs say (see `entry::REPAIR_TERM`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairedEvent {
    pub seq: u64,
    pub epoch: u32,
    pub offset: u32,
}

/// [`SessionIndex`] as snapshot version 2 stored it (before repaired events).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct SessionIndexV2 {
    session_id: String,
    base_seq: u64,
    runs: Vec<Run>,
    active_epoch: u32,
    active_first_seq: u64,
    active: Vec<u32>,
}

/// [`ShardSnapshot`] as version 2 stored it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct ShardSnapshotV2 {
    resume_epoch: u64,
    resume_offset: u64,
    groups: Vec<GroupSnapshot>,
    sessions: Vec<SessionIndexV2>,
}

impl ShardSnapshotV2 {
    fn upgrade(self) -> ShardSnapshot {
        ShardSnapshot {
            resume_epoch: self.resume_epoch,
            resume_offset: self.resume_offset,
            groups: self.groups,
            sessions: self
                .sessions
                .into_iter()
                .map(|s| SessionIndex {
                    session_id: s.session_id,
                    base_seq: s.base_seq,
                    runs: s.runs,
                    active_epoch: s.active_epoch,
                    active_first_seq: s.active_first_seq,
                    active: s.active,
                    repaired: Vec::new(),
                })
                .collect(),
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub group: u16,
    /// The last log index whose entry is part of `state`.
    pub committed_index: u64,
    /// `GroupState::encode_snapshot` bytes.
    pub state: Vec<u8>,
    /// The group's rolling checksum of committed entries up to `committed_index`.
    pub checksum: u64,
    /// The Raft term of the entry at `committed_index` (0 when it is 0).
    pub committed_term: u64,
    /// The group's Raft hard state when the snapshot was taken (vote 0: none).
    pub hard_term: u64,
    pub hard_vote: u64,
    /// Entries on disk after `committed_index` when the snapshot was taken (possibly
    /// before the resume position, so replay would not see them again).
    pub entries: Vec<SnapshotEntry>,
}

/// A persisted, not yet applied entry, with where it lives in the log.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub index: u64,
    pub term: u64,
    pub command: crate::entry::Command,
    pub epoch: u32,
    pub offset: u32,
    pub crc: u32,
    /// Its place in the sealed segment's index file; `u32::MAX` when not sealed.
    pub sealed: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShardSnapshot {
    /// Replay starts at this log position (segment epoch, byte offset).
    pub resume_epoch: u64,
    pub resume_offset: u64,
    pub groups: Vec<GroupSnapshot>,
    pub sessions: Vec<SessionIndex>,
}

impl ShardSnapshot {
    /// `SNAPSHOT_MAGIC`, crc32 of the rest (u32 LE), rkyv bytes.
    pub fn encode(&self) -> Vec<u8> {
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serialising into memory");
        framed(&SNAPSHOT_MAGIC, &body)
    }

    /// Never panics on bad bytes. Reads version 3 and version 2.
    pub fn decode(bytes: &[u8]) -> Result<ShardSnapshot, String> {
        decode_body(bytes).map_err(|e| e.to_string())
    }

    /// The snapshot file's bytes (layout in the module docs).
    pub fn encode_file(&self, block_bytes: usize) -> Vec<u8> {
        let mut bytes = self.encode();
        let len = bytes.len() as u64;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.resize(file_bytes(len as usize, block_bytes), 0);
        let total = bytes.len();
        bytes[total - 8..].copy_from_slice(&len.to_le_bytes());
        bytes
    }
}

/// Why a snapshot file cannot be used; every variant names where in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotFileError {
    /// Not a whole number of blocks: cut short (or extended) after it was written.
    Size {
        file_bytes: usize,
        block_bytes: usize,
    },
    /// Neither the length trailer nor its copy after the body gives the body's length.
    Length { trailer_at: usize, trailer: u64 },
    /// Bytes 0..8 are not a snapshot's magic.
    Magic { found: [u8; 8] },
    /// Bytes 12..`body_end` do not match the checksum stored at offset 8.
    Checksum {
        body_end: usize,
        stored: u32,
        computed: u32,
    },
    /// The body matches its checksum but does not decode (another format version, or a
    /// bug): not damage on disk.
    Decode { body_end: usize, reason: String },
}

impl std::fmt::Display for SnapshotFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Size {
                file_bytes,
                block_bytes,
            } => write!(
                f,
                "the file is {file_bytes} bytes, not a whole number of {block_bytes}-byte \
                 blocks: it was cut short or extended after it was written"
            ),
            Self::Length {
                trailer_at,
                trailer,
            } => write!(
                f,
                "the length trailer at offset {trailer_at} reads {trailer} and no copy of \
                 the body's length precedes it: the end of the file is damaged"
            ),
            Self::Magic { found } => write!(
                f,
                "bytes 0..8 at offset 0 are {found:02x?}, not a snapshot's magic"
            ),
            Self::Checksum {
                body_end,
                stored,
                computed,
            } => write!(
                f,
                "checksum mismatch: the crc32 at offset {SNAPSHOT_CRC_AT} is {stored:#010x} but \
                 bytes {SNAPSHOT_BODY_AT}..{body_end} give {computed:#010x}; a byte in that \
                 range (or the checksum) is damaged"
            ),
            Self::Decode { body_end, reason } => write!(
                f,
                "bytes {SNAPSHOT_BODY_AT}..{body_end} match their checksum but do not decode \
                 ({reason}): written by another version?"
            ),
        }
    }
}

/// A decoded snapshot file, with any damage found outside its checksummed body (a
/// damaged trailer or padding: harmless, but worth a log line and a new snapshot).
#[derive(Debug)]
pub struct SnapshotFile {
    pub snapshot: ShardSnapshot,
    pub notes: Vec<String>,
}

/// Reads a snapshot file (layout in the module docs). Never panics on bad bytes; every
/// error names the offsets involved. A damaged last byte is a damaged trailer (the body
/// is then found through its length copy and still checked), never "truncated".
pub fn decode_snapshot_file(
    file: &[u8],
    block_bytes: usize,
) -> Result<SnapshotFile, SnapshotFileError> {
    if file.len() < block_bytes || !file.len().is_multiple_of(block_bytes) {
        return Err(SnapshotFileError::Size {
            file_bytes: file.len(),
            block_bytes,
        });
    }
    let trailer_at = file.len() - 8;
    let read_len = |at: usize| u64::from_le_bytes(file[at..at + 8].try_into().expect("8 bytes"));
    let trailer = read_len(trailer_at);
    // The body's length L is stored right after the body and in the trailer; the file
    // ends where `file_bytes` says. L is the position of its own copy. A damaged length
    // may be any u64, so nothing here may overflow.
    let is_length = |len: u64| {
        let Some((l, copy_end)) = usize::try_from(len)
            .ok()
            .and_then(|l| Some((l, l.checked_add(8)?)))
        else {
            return false;
        };
        if l < SNAPSHOT_BODY_AT || copy_end > file.len() {
            return false;
        }
        if file_bytes(l, block_bytes) == file.len() {
            return read_len(l) == len;
        }
        // Written before `file_bytes` kept the trailer clear of the copy: the trailer
        // overwrote half of the copy and is the only whole L left (the checksum of the
        // body still decides).
        copy_end.next_multiple_of(block_bytes) == file.len()
            && copy_end > trailer_at
            && trailer == len
    };
    let mut notes = Vec::new();
    let body_end = if is_length(trailer) {
        trailer as usize
    } else {
        let lowest = file
            .len()
            .saturating_sub(block_bytes + 16)
            .max(SNAPSHOT_BODY_AT);
        let found = (lowest..=trailer_at)
            .rev()
            .find(|&at| is_length(at as u64))
            .ok_or(SnapshotFileError::Length {
                trailer_at,
                trailer,
            })?;
        notes.push(format!(
            "the length trailer at offset {trailer_at} is damaged (it reads {trailer}); the \
             body's length {found} was read from its copy at offset {found}"
        ));
        found
    };
    let padding = body_end + 8..trailer_at.max(body_end + 8);
    if let Some(i) = file[padding.clone()].iter().position(|&b| b != 0) {
        notes.push(format!(
            "padding byte at offset {} is not zero (outside the checksummed body: harmless)",
            padding.start + i
        ));
    }
    let snapshot = decode_body(&file[..body_end])?;
    Ok(SnapshotFile { snapshot, notes })
}

/// The size of a snapshot file whose body ends at `body_end`: the body, its length's
/// copy, zeros, and the trailer in the last 8 bytes of the last block. The trailer never
/// overlaps the copy: it is the copy itself when the copy ends on a block boundary, else
/// it sits in the block boundary's last 8 bytes at or after `body_end + 16`.
fn file_bytes(body_end: usize, block_bytes: usize) -> usize {
    let copy_end = body_end + 8;
    if copy_end.is_multiple_of(block_bytes) {
        copy_end
    } else {
        (copy_end + 8).next_multiple_of(block_bytes)
    }
}

/// Decodes the framed body of a snapshot of version 3 or 2.
fn decode_body(body: &[u8]) -> Result<ShardSnapshot, SnapshotFileError> {
    let mut found = [0u8; 8];
    let head = body.len().min(8);
    found[..head].copy_from_slice(&body[..head]);
    let v2 = found == SNAPSHOT_MAGIC_V2;
    if body.len() < SNAPSHOT_BODY_AT || !(found == SNAPSHOT_MAGIC || v2) {
        return Err(SnapshotFileError::Magic { found });
    }
    let stored = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&body[SNAPSHOT_BODY_AT..]);
    let body_end = body.len();
    if stored != computed {
        return Err(SnapshotFileError::Checksum {
            body_end,
            stored,
            computed,
        });
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body_end);
    aligned.extend_from_slice(&body[SNAPSHOT_BODY_AT..]);
    let decoded = if v2 {
        rkyv::from_bytes::<ShardSnapshotV2, rkyv::rancor::Error>(&aligned).map(|s| s.upgrade())
    } else {
        rkyv::from_bytes::<ShardSnapshot, rkyv::rancor::Error>(&aligned)
    };
    decoded.map_err(|e| SnapshotFileError::Decode {
        body_end,
        reason: e.to_string(),
    })
}

/// `magic`, crc32 of `body` (u32 LE), `body`.
fn framed(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The checked body of [`framed`] bytes, copied into an aligned buffer for rkyv.
fn unframed(
    magic: &[u8; 8],
    bytes: &[u8],
    what: &str,
) -> Result<rkyv::util::AlignedVec<16>, String> {
    if bytes.len() < 12 || bytes[..8] != magic[..] {
        return Err(format!("not a {what} (bad magic)"));
    }
    let stored = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let body = &bytes[12..];
    if crc32fast::hash(body) != stored {
        return Err(format!("{what} checksum mismatch"));
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    Ok(aligned)
}

/// What a leader sends a follower that fell behind its log (Raft InstallSnapshot data):
/// the group's committed state at the snapshot index, its rolling checksum there, and
/// every event of the group's sessions up to that point, so the follower's history
/// stays one contiguous range equal to the leader's.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupTransfer {
    pub state: Vec<u8>,
    pub checksum: u64,
    pub events: Vec<crate::entry::AppendEntry>,
}

impl GroupTransfer {
    pub fn encode(&self) -> Vec<u8> {
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serialising into memory");
        framed(&TRANSFER_MAGIC, &body)
    }

    /// Never panics on bad bytes.
    pub fn decode(bytes: &[u8]) -> Result<GroupTransfer, String> {
        let aligned = unframed(&TRANSFER_MAGIC, bytes, "group transfer")?;
        rkyv::from_bytes::<GroupTransfer, rkyv::rancor::Error>(&aligned)
            .map_err(|e| format!("group transfer does not decode: {e}"))
    }
}

/// Folds one committed log record (by the crc32 of its encoded bytes, which covers
/// group, term, index and command) into a group's rolling checksum. Replicas holding
/// the same committed entries in the same order hold the same checksum, so tests can
/// compare them directly (`GET /debug/groups/:g`).
pub fn fold_checksum(checksum: u64, record_crc: u32) -> u64 {
    // splitmix64 finaliser over (previous ⊕ crc): order-sensitive and well mixed.
    let mut z = (checksum ^ record_crc as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What replay does with one log record, given what the snapshot already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRule {
    /// The group's state already holds this entry.
    Skip,
    /// Apply and commit it.
    Apply,
}

/// The group state covers entries up to `committed_index`; later ones are replayed.
pub fn replay_rule(committed_index: u64, index: u64) -> ReplayRule {
    if index <= committed_index {
        ReplayRule::Skip
    } else {
        ReplayRule::Apply
    }
}

/// A sidecar's bytes: header then offsets (u32 LE), padded with zeros to `block_bytes`.
pub fn encode_sidecar(epoch: u64, offsets: &[u32], block_bytes: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(offsets.len() * 4);
    for offset in offsets {
        body.extend_from_slice(&offset.to_le_bytes());
    }
    let mut bytes = Vec::with_capacity(SIDECAR_HEADER_BYTES + body.len() + block_bytes);
    bytes.extend_from_slice(&SIDECAR_MAGIC);
    bytes.extend_from_slice(&epoch.to_le_bytes());
    let count = u32::try_from(offsets.len()).expect("offsets of one segment fit u32");
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.resize(SIDECAR_HEADER_BYTES, 0);
    bytes.extend_from_slice(&body);
    let padded = bytes.len().next_multiple_of(block_bytes);
    bytes.resize(padded, 0);
    bytes
}

/// Checks a whole sidecar (magic, epoch, count against the file's size, crc32 of the
/// offsets) and returns its offsets. Errors name the offsets in the file involved.
pub fn decode_sidecar(bytes: &[u8], epoch: u64) -> Result<Vec<u32>, String> {
    let count = sidecar_count(bytes, epoch)?;
    let end = SIDECAR_HEADER_BYTES + count * 4;
    let body = bytes.get(SIDECAR_HEADER_BYTES..end).ok_or_else(|| {
        format!(
            "the count at offset 16 says {count} offsets (bytes {SIDECAR_HEADER_BYTES}..{end}) \
             but the file has {} bytes",
            bytes.len()
        )
    })?;
    let stored = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(body);
    if computed != stored {
        return Err(format!(
            "checksum mismatch: the crc32 at offset 20 is {stored:#010x} but the offsets at \
             bytes {SIDECAR_HEADER_BYTES}..{end} give {computed:#010x}"
        ));
    }
    Ok(decode_offsets(body))
}

/// Checks a sidecar header and returns the number of offsets it holds.
pub fn sidecar_count(bytes: &[u8], epoch: u64) -> Result<usize, String> {
    if bytes.len() < SIDECAR_HEADER_BYTES || bytes[..8] != SIDECAR_MAGIC {
        return Err("not a segment index (bad magic at offset 0)".into());
    }
    let found = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if found != epoch {
        return Err(format!(
            "the epoch at offset 8 says segment {found}, not {epoch}"
        ));
    }
    Ok(u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize)
}

/// Offsets from a slice of a sidecar's body.
pub fn decode_offsets(body: &[u8]) -> Vec<u32> {
    body.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShardSnapshot {
        ShardSnapshot {
            resume_epoch: 3,
            resume_offset: 8192,
            groups: vec![GroupSnapshot {
                group: 7,
                committed_index: 42,
                state: vec![1, 2, 3],
                checksum: 7,
                committed_term: 2,
                hard_term: 3,
                hard_vote: 1,
                entries: Vec::new(),
            }],
            sessions: vec![SessionIndex {
                session_id: "s".into(),
                base_seq: 0,
                runs: vec![Run {
                    epoch: 2,
                    first_seq: 1,
                    count: 10,
                    start: 0,
                }],
                active_epoch: 3,
                active_first_seq: 11,
                active: vec![4096, 8192],
                repaired: vec![RepairedEvent {
                    seq: 4,
                    epoch: 3,
                    offset: 12288,
                }],
            }],
        }
    }

    #[test]
    fn snapshot_round_trips() {
        let snapshot = sample();
        assert_eq!(ShardSnapshot::decode(&snapshot.encode()).unwrap(), snapshot);
    }

    #[test]
    fn corrupt_snapshot_is_an_error_never_a_panic() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(ShardSnapshot::decode(&bytes[..cut]).is_err());
        }
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            assert!(ShardSnapshot::decode(&flipped).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn a_version_2_snapshot_is_still_read() {
        let mut snapshot = sample();
        let v2 = ShardSnapshotV2 {
            resume_epoch: snapshot.resume_epoch,
            resume_offset: snapshot.resume_offset,
            groups: snapshot.groups.clone(),
            sessions: snapshot
                .sessions
                .iter()
                .map(|s| SessionIndexV2 {
                    session_id: s.session_id.clone(),
                    base_seq: s.base_seq,
                    runs: s.runs.clone(),
                    active_epoch: s.active_epoch,
                    active_first_seq: s.active_first_seq,
                    active: s.active.clone(),
                })
                .collect(),
        };
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(&v2).unwrap();
        let bytes = framed(&SNAPSHOT_MAGIC_V2, &body);
        snapshot.sessions[0].repaired.clear();
        assert_eq!(ShardSnapshot::decode(&bytes).unwrap(), snapshot);
    }

    #[test]
    fn a_snapshot_file_round_trips() {
        let file = sample().encode_file(4096);
        assert_eq!(file.len(), 4096);
        let read = decode_snapshot_file(&file, 4096).unwrap();
        assert_eq!(read.snapshot, sample());
        assert!(read.notes.is_empty());
    }

    /// Found by the `snapshot_file` fuzz target: when the length's copy ended less than 8
    /// bytes before a block boundary, the trailer was written over half of it and the
    /// file could not be read back (start-up then refused to run once retention had
    /// deleted the first segment). rkyv bodies grow in steps of 8 bytes, so with 4 KiB
    /// blocks that was one body length in 512.
    #[test]
    fn fuzz_a_length_copy_just_before_a_block_boundary_does_not_collide_with_the_trailer() {
        for block in [64, 4096] {
            let mut snapshot = sample();
            let mut collisions = 0;
            for _ in 0..block {
                snapshot.groups[0].state.push(0x5a);
                let body_end = snapshot.encode().len();
                let file = snapshot.encode_file(block);
                assert_eq!(file.len() % block, 0);
                assert!(file.len() >= body_end + 16 || file.len() == body_end + 8);
                let read = decode_snapshot_file(&file, block)
                    .unwrap_or_else(|e| panic!("body of {body_end} bytes, {block}: {e}"));
                assert_eq!(read.snapshot, snapshot);
                assert!(read.notes.is_empty(), "{:?}", read.notes);
                let copy_end_in_block = (body_end + 8) % block;
                collisions += usize::from(copy_end_in_block > block - 8);
            }
            assert!(collisions > 0, "the case that collided before is covered");
        }
    }

    /// The files the encoder wrote before that fix: the trailer is the only whole copy of
    /// the length, and the body's checksum still guards them.
    #[test]
    fn fuzz_a_file_whose_trailer_overwrote_the_length_copy_is_still_read() {
        let mut snapshot = sample();
        while snapshot.encode().len() % 4096 != 4084 {
            snapshot.groups[0].state.push(0x5a);
        }
        let len = snapshot.encode().len() as u64;
        let mut file = snapshot.encode();
        file.extend_from_slice(&len.to_le_bytes());
        file.resize(file.len().next_multiple_of(4096), 0);
        let trailer_at = file.len() - 8;
        file[trailer_at..].copy_from_slice(&len.to_le_bytes());
        let read = decode_snapshot_file(&file, 4096).expect("an old file is read");
        assert_eq!(read.snapshot, snapshot);
        file[20] ^= 1;
        assert!(matches!(
            decode_snapshot_file(&file, 4096),
            Err(SnapshotFileError::Checksum { .. })
        ));
    }

    /// A damaged trailer near `u64::MAX`: `L + 8` overflowed (a panic with overflow
    /// checks, an out-of-bounds read without) instead of being refused as a length.
    #[test]
    fn fuzz_a_trailer_near_u64_max_is_a_damaged_trailer_not_a_panic() {
        let mut file = sample().encode_file(4096);
        let trailer_at = file.len() - 8;
        // `u64::MAX - 6 + 8` wraps to 1, whose next block boundary is the file's end.
        for trailer in [u64::MAX, u64::MAX - 6, u64::MAX - 8] {
            file[trailer_at..].copy_from_slice(&trailer.to_le_bytes());
            let read = decode_snapshot_file(&file, 4096).expect("found through the copy");
            assert_eq!(read.snapshot, sample());
            assert_eq!(read.notes.len(), 1, "{:?}", read.notes);
        }
    }

    #[test]
    fn a_damaged_last_byte_is_a_damaged_trailer_not_a_truncation() {
        let mut file = sample().encode_file(4096);
        let last = file.len() - 1;
        file[last] ^= 0x01;
        let read = decode_snapshot_file(&file, 4096).expect("the body is found and checked");
        assert_eq!(read.snapshot, sample());
        assert_eq!(read.notes.len(), 1, "{:?}", read.notes);
        assert!(
            read.notes[0].contains("trailer at offset 4088"),
            "{:?}",
            read.notes
        );
        assert!(!read.notes[0].contains("truncated"));
        // Both copies of the length damaged: an error that says so, with the offset.
        let body_len = sample().encode().len();
        file[body_len] ^= 0x01;
        let err = decode_snapshot_file(&file, 4096).unwrap_err();
        assert!(matches!(
            err,
            SnapshotFileError::Length {
                trailer_at: 4088,
                ..
            }
        ));
        assert!(err.to_string().contains("offset 4088"), "{err}");
    }

    #[test]
    fn a_damaged_byte_in_the_body_names_the_checksummed_range() {
        let mut file = sample().encode_file(4096);
        file[40] ^= 0x10;
        let err = decode_snapshot_file(&file, 4096).unwrap_err();
        let SnapshotFileError::Checksum { body_end, .. } = err else {
            panic!("{err:?}");
        };
        let text = err.to_string();
        assert!(text.contains("offset 8"), "{text}");
        assert!(text.contains(&format!("bytes 12..{body_end}")), "{text}");
        let mut file = sample().encode_file(4096);
        file[2] ^= 0x10;
        let err = decode_snapshot_file(&file, 4096).unwrap_err();
        assert!(err.to_string().contains("offset 0"), "{err}");
    }

    #[test]
    fn damaged_padding_is_noted_and_a_cut_file_is_refused() {
        let mut file = sample().encode_file(4096);
        file[4000] = 7;
        let read = decode_snapshot_file(&file, 4096).unwrap();
        assert!(read.notes[0].contains("offset 4000"), "{:?}", read.notes);
        let err = decode_snapshot_file(&file[..4000], 4096).unwrap_err();
        assert!(err.to_string().contains("4000 bytes"), "{err}");
        for at in 0..file.len() {
            let mut flipped = sample().encode_file(4096);
            flipped[at] ^= 0x80;
            // Never a panic, never a snapshot that differs from what was written.
            if let Ok(read) = decode_snapshot_file(&flipped, 4096) {
                assert_eq!(read.snapshot, sample(), "flip at {at}");
            }
        }
    }

    #[test]
    fn checksum_depends_on_every_record_and_their_order() {
        let ab = fold_checksum(fold_checksum(0, 1), 2);
        let ba = fold_checksum(fold_checksum(0, 2), 1);
        assert_ne!(ab, ba);
        assert_ne!(fold_checksum(0, 1), fold_checksum(0, 3));
        assert_eq!(ab, fold_checksum(fold_checksum(0, 1), 2));
    }

    #[test]
    fn replay_skips_entries_the_snapshot_holds() {
        assert_eq!(replay_rule(10, 10), ReplayRule::Skip);
        assert_eq!(replay_rule(10, 11), ReplayRule::Apply);
        assert_eq!(replay_rule(0, 1), ReplayRule::Apply);
    }

    #[test]
    fn sidecar_round_trips_and_checks_epoch_and_crc() {
        let bytes = encode_sidecar(5, &[0, 4096, 12288], 4096);
        assert_eq!(bytes.len(), 4096);
        assert_eq!(decode_sidecar(&bytes, 5).unwrap(), vec![0, 4096, 12288]);
        assert!(decode_sidecar(&bytes, 6).is_err());
        let mut bad = bytes.clone();
        bad[SIDECAR_HEADER_BYTES] ^= 1;
        assert!(decode_sidecar(&bad, 5).is_err());
        assert!(decode_sidecar(&bytes[..10], 5).is_err());
    }
}
