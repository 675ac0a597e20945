//! The operations a shard performs for requests, and their replies: the shared types of
//! `shards::ops` (which the forward codec, `shards::forward`, turns into bytes), with
//! [`Reply`]'s per-node statistics fixed to this server's [`ShardStats`].

pub use shards::ops::{ApiError, ArchivedFilter, Op};

use crate::metrics::ShardStats;

/// A shard's answer to an [`Op`]; `Reply::Stats` carries this node's counters and never
/// leaves the node.
pub type Reply = shards::ops::Reply<Box<ShardStats>>;
