//! `shards`: everything one Starcite shard decides, with no I/O, no async, no threads
//! and no wall clock.
//!
//! - [`entry`]: the log entries (commands of the session state machine).
//! - [`json`]: JSON validation (depth limit), compact re-serialisation and content digests.
//! - [`validate`]: request bodies → validated commands or field errors (API.md rules).
//! - [`session`]: the per-group session state machine: seq, dedupe, expected_seq, versions.
//! - [`listing`]: listing pages: each shard's bounded scan in id order, and the merge of
//!   the shards' parts into one page.
//! - [`codec`]: log records and batches on disk (length + crc32 + rkyv) and the pure
//!   recovery scan that classifies torn tails and corruption.
//! - [`time`]: RFC 3339 formatting of microsecond timestamps.
//! - [`snapshot`]: shard snapshot and segment index formats, the replay rule.
//! - [`scrub`]: damage detection and repair decisions: auditing a verified segment
//!   against the event index, rebuilding index files, checking copies fetched from
//!   peers, the scrubber's pace.
//! - [`wire`]: node-to-node frames and handshake (the transport of issue 3).
//! - [`peer`]: what travels inside those frames: Raft messages, coalesced heartbeats,
//!   forwarded requests.
//! - [`ops`]: the operations a shard performs for requests, their replies, and
//!   [`ops::ApiError`], the one error type a client is told about.
//! - [`forward`]: forwarded requests and replies as bytes (the `ops` types' rkyv form).
//! - [`forwarding`]: which reply completes which forwarded request (request ids across
//!   process restarts and connections).
//! - [`raft`]: the sans-IO Raft core.
//! - [`replica`]: one replica of one group: what it persists, acknowledges, applies
//!   and answers (the server and the simulation drive this same type).
//! - [`http`]: what the HTTP server decides from a client's bytes: request heads, body
//!   framing, chunked decoding, query strings and their percent-escapes.
//! - [`tail`]: what a WebSocket tail decides about its client: alive, gone or in
//!   violation, ping or idle.
//! - [`storage`]: whether the log may take more writes (full disk, disk budget, the
//!   reserve kept for Raft's own records).
//!
//! The `starcite` crate (in `src/`) is the shell: it moves bytes, runs timers and does the
//! I/O these modules ask for.

pub mod codec;
pub mod entry;
pub mod forward;
pub mod forwarding;
pub mod http;
pub mod json;
pub mod listing;
pub mod ops;
pub mod peer;
pub mod raft;
pub mod replay;
pub mod replica;
pub mod scrub;
pub mod session;
pub mod snapshot;
pub mod storage;
pub mod tail;
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

/// Replicas per group (fewer when the cluster has fewer nodes).
pub const REPLICAS: usize = 3;

/// The voters of `group`: the `REPLICAS` members with the highest rendezvous score
/// (highest random weight hashing), in id order. Every node computes the same set from
/// the same member list; adding a node moves only the groups it now wins.
pub fn voters_of(group: u16, members: &[u64]) -> Vec<u64> {
    let score = |node: u64| {
        let mut bytes = [0u8; 10];
        bytes[..2].copy_from_slice(&group.to_le_bytes());
        bytes[2..].copy_from_slice(&node.to_le_bytes());
        // splitmix64 over crc32 spreads the score over 64 bits.
        let mut z =
            (u64::from(crc32fast::hash(&bytes)) << 32 | node).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut ranked: Vec<u64> = members.to_vec();
    ranked.sort_unstable();
    ranked.dedup();
    ranked.sort_by_key(|&node| std::cmp::Reverse((score(node), node)));
    ranked.truncate(REPLICAS);
    ranked.sort_unstable();
    ranked
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    #[test]
    fn three_nodes_replicate_every_group_everywhere() {
        for g in 0..GROUPS {
            assert_eq!(voters_of(g, &[3, 1, 2]), vec![1, 2, 3]);
        }
        assert_eq!(voters_of(7, &[5]), vec![5]);
    }

    #[test]
    fn five_nodes_spread_groups_evenly_and_adding_a_node_moves_few() {
        let five = [1, 2, 3, 4, 5];
        let mut load = [0usize; 6];
        for g in 0..GROUPS {
            let v = voters_of(g, &five);
            assert_eq!(v.len(), 3);
            for n in v {
                load[n as usize] += 1;
            }
        }
        // 256 * 3 / 5 = 153.6 replicas per node on average.
        for n in 1..=5 {
            assert!((110..=200).contains(&load[n]), "node {n}: {load:?}");
        }
        let six = [1, 2, 3, 4, 5, 6];
        let moved = (0..GROUPS)
            .filter(|&g| voters_of(g, &five) != voters_of(g, &six))
            .count();
        // Only groups node 6 wins change: about 3/6 of them.
        assert!(moved < 200, "{moved} groups moved");
    }
}
