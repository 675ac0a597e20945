//! A shard's view of the whole node: its own core, and the bounded channel mesh to the
//! other shards. A request landing on a shard that does not own the session's group
//! crosses the mesh to the owner and its reply comes back on a oneshot.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select, Either};
use futures::StreamExt;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};

use crate::ops::{ApiError, Op, Reply};
use crate::shard::ShardCore;

/// Messages in flight on one directed mesh channel, at most.
pub const MESH_CHANNEL_CAPACITY: usize = 4096;
/// Requests one shard serves for other shards at the same time, at most.
const REMOTE_OPS_IN_FLIGHT_MAX: usize = 65_536;

/// One request for another shard and where to answer it.
pub struct MeshMsg {
    pub op: Op,
    pub reply: oneshot::Sender<Reply>,
}

/// Runs `fut`, giving up after `limit`.
pub async fn with_timeout<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let timer = glommio::timer::Timer::new(limit);
    match select(Box::pin(fut), timer).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(_) => None,
    }
}

pub struct Node {
    pub core: Rc<ShardCore>,
    /// `peers[i]` sends to shard i (None for this shard).
    peers: Vec<Option<ConnectedSender<MeshMsg>>>,
    /// Shards that finished recovery, for `/health/ready`.
    pub ready_shards: Arc<AtomicUsize>,
}

impl Node {
    pub fn new(
        core: Rc<ShardCore>,
        peers: Vec<Option<ConnectedSender<MeshMsg>>>,
        ready_shards: Arc<AtomicUsize>,
    ) -> Node {
        Node {
            core,
            peers,
            ready_shards,
        }
    }

    pub fn shards(&self) -> usize {
        self.core.shards
    }

    pub fn is_ready(&self) -> bool {
        self.ready_shards.load(Ordering::Acquire) == self.shards() && !self.core.shutting_down.get()
    }

    /// The shard owning session `id`.
    pub fn owner_of(&self, id: &str) -> usize {
        shards::shard_of(shards::group_of(id), self.shards())
    }

    /// Runs `op` on `shard`: here, or across the mesh.
    pub async fn call(&self, shard: usize, op: Op) -> Reply {
        if shard == self.core.index {
            return self.core.execute(op).await;
        }
        let sender = self.peers[shard]
            .as_ref()
            .expect("a sender for every other shard");
        let (tx, rx) = oneshot::channel();
        if sender.send(MeshMsg { op, reply: tx }).await.is_err() {
            return Reply::Error(ApiError::Unavailable);
        }
        rx.await.unwrap_or(Reply::Error(ApiError::Unavailable))
    }

    /// Runs one op per shard (built by `make`) concurrently; replies in shard order.
    pub async fn call_all(&self, make: impl Fn() -> Op) -> Vec<Reply> {
        let calls = (0..self.shards()).map(|shard| self.call(shard, make()));
        futures::future::join_all(calls).await
    }
}

/// Serves the requests other shards send to this one, each in its own task.
pub async fn serve_peer(core: Rc<ShardCore>, mut rx: ConnectedReceiver<MeshMsg>) {
    let in_flight = Rc::new(std::cell::Cell::new(0usize));
    while let Some(msg) = rx.next().await {
        if in_flight.get() >= REMOTE_OPS_IN_FLIGHT_MAX {
            let _ = msg.reply.send(Reply::Error(ApiError::Overloaded));
            continue;
        }
        in_flight.set(in_flight.get() + 1);
        let core = core.clone();
        let in_flight = in_flight.clone();
        glommio::spawn_local(async move {
            let reply = core.execute(msg.op).await;
            let _ = msg.reply.send(reply);
            in_flight.set(in_flight.get() - 1);
        })
        .detach();
    }
}
