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
//! with sessions × segments).

use rkyv::{Archive, Deserialize, Serialize};

const SNAPSHOT_MAGIC: [u8; 8] = *b"SCSNAP02";
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

    /// Never panics on bad bytes.
    pub fn decode(bytes: &[u8]) -> Result<ShardSnapshot, String> {
        let aligned = unframed(&SNAPSHOT_MAGIC, bytes, "shard snapshot")?;
        rkyv::from_bytes::<ShardSnapshot, rkyv::rancor::Error>(&aligned)
            .map_err(|e| format!("shard snapshot does not decode: {e}"))
    }
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

/// Checks a whole sidecar and returns its offsets.
pub fn decode_sidecar(bytes: &[u8], epoch: u64) -> Result<Vec<u32>, String> {
    let count = sidecar_count(bytes, epoch)?;
    let end = SIDECAR_HEADER_BYTES + count * 4;
    let body = bytes
        .get(SIDECAR_HEADER_BYTES..end)
        .ok_or("sidecar is truncated")?;
    let stored = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(body) != stored {
        return Err("sidecar checksum mismatch".into());
    }
    Ok(decode_offsets(body))
}

/// Checks a sidecar header and returns the number of offsets it holds.
pub fn sidecar_count(bytes: &[u8], epoch: u64) -> Result<usize, String> {
    if bytes.len() < SIDECAR_HEADER_BYTES || bytes[..8] != SIDECAR_MAGIC {
        return Err("not a segment index (bad magic)".into());
    }
    let found = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if found != epoch {
        return Err(format!("segment index is for segment {found}, not {epoch}"));
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
