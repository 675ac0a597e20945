//! `starcite`: the server shell around the pure `shards` crate.
//!
//! - [`config`]: flags and environment variables; [`datadir`]: identity and lock.
//! - [`server`]: one glommio executor per shard, the channel mesh, listeners, shutdown.
//! - [`node`]: a shard's view of the node (route an op to the owning shard).
//! - [`shard`]: a shard's groups, group commit and replies; [`store`]: where events live
//!   (hot window + log locations); [`wal`]: the segmented write-ahead log on disk.
//! - [`http`]: HTTP/1.1 on httparse; [`api`]: the routes of API.md; [`tail`]: the
//!   WebSocket tail; [`ops`]: the messages between them; [`metrics`]: counters.
//! - [`archive`]: the Postgres archive on its own threads, fed by the shards.
pub mod api;
pub mod archive;
pub mod config;
pub mod datadir;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod rebuild;
pub mod server;
pub mod shard;
pub mod store;
pub mod tail;
pub mod transport;
pub mod wal;
