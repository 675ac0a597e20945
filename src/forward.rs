//! Requests forwarded between nodes: the codec is pure and lives in `shards::forward`
//! (beside the peer frames that carry its bytes); these are its entry points as the
//! shell names them.

pub use shards::forward::{decode_op, encode_op, encode_reply};

use crate::ops::Reply;

/// The reply a peer sent for a forwarded request (never `Reply::Stats`).
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    shards::forward::decode_reply(bytes)
}
