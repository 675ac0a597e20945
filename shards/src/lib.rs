//! `shards`: everything one Starcite shard decides, with no I/O, no async, no threads
//! and no wall clock.
//!
//! - [`entry`]: the log entries (commands of the session state machine).
//! - [`json`]: JSON validation (depth limit), compact re-serialisation and content digests.
//! - [`validate`]: request bodies → validated commands or field errors (API.md rules).
//! - [`session`]: the per-group session state machine: seq, dedupe, expected_seq, versions.
//! - [`codec`]: log records and batches on disk (length + crc32 + rkyv) and the pure
//!   recovery scan that classifies torn tails and corruption.
//! - [`time`]: RFC 3339 formatting of microsecond timestamps.
//! - [`snapshot`]: shard snapshot and segment index formats, the replay rule.
//! - [`wire`]: node-to-node frames and handshake (the transport of issue 3).
//! - [`raft`]: the sans-IO Raft core (issue 3, in progress).
//!
//! The `starcite` crate (in `src/`) is the shell: it moves bytes, runs timers and does the
//! I/O these modules ask for.

pub mod codec;
pub mod entry;
pub mod json;
pub mod raft;
pub mod session;
pub mod snapshot;
pub mod time;
pub mod validate;
pub mod wire;

/// Number of Raft groups sessions are spread over.
pub const GROUPS: u16 = 256;

/// `group = crc32(session id) % 256` (DESIGN.md, placement).
pub fn group_of(session_id: &str) -> u16 {
    (crc32fast::hash(session_id.as_bytes()) % GROUPS as u32) as u16
}

/// `shard = group % shards`.
pub fn shard_of(group: u16, shards: usize) -> usize {
    assert!(shards > 0);
    group as usize % shards
}
