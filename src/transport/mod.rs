//! The node-to-node transport of ONE shard: TCP connections to the same shard index on
//! every other member, carrying opaque frames (`shards::wire`: length + crc32 + payload).
//!
//! # Addressing
//! Every shard listens on its own peer address: a node's peer port for shard *i* is its
//! base peer port + *i* ([`shard_peer_addr`]), so a connection lands directly on the shard
//! it belongs to and no shard ever forwards another's bytes. The handshake's `shard`
//! field is checked, so a miswired port is refused instead of mixing up shards.
//!
//! # Connections
//! One TCP connection per (shard, peer node), used in both directions. The LOWER node id
//! dials, the higher accepts. Each side's first frame is its [`Handshake`]: the dialer
//! sends first, the acceptor checks it with [`Handshake::accept`] and answers with its
//! own (or logs the refusal and closes), and the dialer checks the answer the same way.
//! A refused dialer waits the maximum backoff before it tries again. A peer we know
//! that comes back with another data dir incarnation ([`incarnations`]) is refused with
//! a reason: the refusing side completes its half of the handshake and sends one
//! `PeerFrame::Refused`, so the refused node logs why and shows it in
//! [`Transport::refused_by`]. A higher node that
//! dials us is refused (we dial it). A new connection always replaces an older one to
//! the same peer (keep the newest: the old one belongs to a previous incarnation of the
//! peer, or is about to fail anyway). The kernel closes a connection whose bytes stay
//! unacknowledged for [`UNACKED_TIMEOUT`], so a partition's end is noticed by a new dial,
//! not by TCP's ever longer retransmission timeout.
//!
//! # Incarnations
//! Every process has a random incarnation, sent in its handshake. Frames queued while a
//! peer was away are sent once it is back, unless it came back as another process (a
//! new incarnation): those frames were meant for the process that died (replies to its
//! forwarded requests among them) and are dropped. Each received frame says which
//! connection brought it ([`Incoming::conn`]), so a consumer can tell replies that
//! arrive on a later connection than its request left on.
//!
//! # Queues and backpressure
//! [`Transport::send`] never waits: it appends the frame to the peer's send queue, which
//! is bounded in bytes ([`TransportConfig::send_queue_bytes_max`]); when the queue is full
//! the frame is refused with [`SendError::Full`] and dropped (Raft retransmits). While a
//! peer is disconnected frames keep queueing up to the same bound and go out, in order,
//! once it is connected again; the frames a broken connection was writing are lost. One
//! writer per connection sends everything queued with one write call per batch.
//! Received frames go to one bounded channel ([`Incoming`]); when its consumer lags,
//! reading from the sockets stops, so TCP flow control pushes back on the senders.
//!
//! All of this runs on the shard's glommio executor: [`Transport::start`] must be called
//! from a task of that executor.

mod backoff;
mod conn;
pub mod incarnations;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{FutureExt, Shared as SharedFuture};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpListener;
use shards::wire::{Handshake, FRAME_HEADER_BYTES, FRAME_PAYLOAD_BYTES_MAX};

/// Frames received but not yet taken by the consumer; beyond this, sockets are not read.
pub const INCOMING_FRAMES_MAX: usize = 1024;
/// How long a TCP connect to a peer may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long either side waits for the other's handshake frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long bytes written to a peer may stay unacknowledged before the kernel closes the
/// connection (`TCP_USER_TIMEOUT`). Without it, a connection that lived through a
/// partition resumes only at TCP's next retransmission, whose timeout doubles for as long
/// as the partition lasts (a healed node took 26 s to acknowledge again after a 30 s
/// partition, tests/net_faults.rs); closed, it is dialled again within the reconnect
/// backoff. Far above a round trip and an election timeout, so that loss alone (several
/// retransmissions of one segment lost in a row) rarely closes a connection.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(3);

/// Accepted connections still handshaking; beyond this, new ones are closed at once.
pub const HANDSHAKES_PENDING_MAX: usize = 64;

/// The peer address of shard `shard` of a node whose shard 0 listens on `base`.
pub fn shard_peer_addr(base: SocketAddr, shard: u32) -> SocketAddr {
    let port = u32::from(base.port()) + shard;
    assert!(port <= u32::from(u16::MAX), "peer port {port} out of range");
    SocketAddr::new(base.ip(), port as u16)
}

#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub node_id: u64,
    pub shard: u32,
    pub shards: u32,
    /// This shard's peer address (see [`shard_peer_addr`]).
    pub listen: SocketAddr,
    /// Every OTHER member's peer address for THIS shard.
    pub peers: Vec<(u64, SocketAddr)>,
    /// Every member's node id, ours included.
    pub members: Vec<u64>,
    /// Ours; its node id, shard and shard count must equal the fields above.
    pub handshake: Handshake,
    /// Bound of one peer's send queue, in frame bytes (header included).
    pub send_queue_bytes_max: usize,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Where the peers' data dir incarnations are remembered (None: in memory only).
    pub incarnations_file: Option<PathBuf>,
}

impl TransportConfig {
    fn check(&self) -> Result<(), String> {
        let h = &self.handshake;
        if (h.node_id, h.shard, h.shards) != (self.node_id, self.shard, self.shards) {
            return Err(format!(
                "handshake says node {} shard {}/{}, config says node {} shard {}/{}",
                h.node_id, h.shard, h.shards, self.node_id, self.shard, self.shards
            ));
        }
        if self.shard >= self.shards {
            return Err(format!("shard {} of {}", self.shard, self.shards));
        }
        if !self.members.contains(&self.node_id) {
            return Err(format!("node {} is not among the members", self.node_id));
        }
        for (id, addr) in &self.peers {
            if *id == self.node_id || !self.members.contains(id) {
                return Err(format!("peer {id} at {addr} is not another member"));
            }
        }
        let distinct: std::collections::BTreeSet<u64> = self.peers.iter().map(|p| p.0).collect();
        if distinct.len() != self.peers.len() {
            return Err("a peer is listed twice".into());
        }
        if self.send_queue_bytes_max <= FRAME_HEADER_BYTES {
            return Err(format!(
                "send queue of {} bytes holds no frame",
                self.send_queue_bytes_max
            ));
        }
        let (min, max) = (self.reconnect_backoff_min, self.reconnect_backoff_max);
        if min.is_zero() || min > max {
            return Err(format!("reconnect backoff {min:?}..{max:?}"));
        }
        Ok(())
    }
}

/// One frame from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub from: u64,
    /// The connection it arrived on (see [`Transport::connection`]).
    pub conn: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The peer's send queue is at its bound; the frame was dropped.
    Full,
    /// Not a peer of this shard.
    UnknownPeer,
    /// [`Transport::shutdown`] was called.
    ShutDown,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Full => write!(f, "send queue full"),
            SendError::UnknownPeer => write!(f, "unknown peer"),
            SendError::ShutDown => write!(f, "transport shut down"),
        }
    }
}

/// Counters since start (all monotonic except `queued_bytes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Frames and bytes (headers included) written to sockets.
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Write calls that sent them (queued frames are coalesced into one write).
    pub writes: u64,
    /// Frames and bytes (headers included) read from sockets, handshakes excluded.
    pub frames_received: u64,
    pub bytes_received: u64,
    /// Frames refused by `send` with `Full`, or lost with a broken connection.
    pub frames_dropped: u64,
    /// Connections that completed the handshake.
    pub connects: u64,
    /// Of those, ones to a peer that had been connected before.
    pub reconnects: u64,
    /// Dials that failed before a handshake (refused port, timeout, reset).
    pub dial_failures: u64,
    /// Handshakes refused, by us or by the peer.
    pub handshakes_refused: u64,
    /// Connections closed for a bad frame (crc or length).
    pub frame_errors: u64,
    /// Of the refused handshakes, those of a known peer with a new data dir.
    pub new_data_dir_refusals: u64,
    /// Bytes waiting in all send queues now.
    pub queued_bytes: u64,
}

/// The transport of one shard. Dropping it shuts it down.
pub struct Transport {
    shared: Rc<Shared>,
    local_addr: SocketAddr,
}

impl Transport {
    /// Binds the listener, starts the dialers of the peers with a higher node id, and
    /// returns the transport with the receiving end of the incoming frames.
    pub fn start(
        config: TransportConfig,
    ) -> Result<(Rc<Transport>, LocalReceiver<Incoming>), String> {
        config.check()?;
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| format!("binding the peer address {}: {e}", config.listen))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| format!("peer listener address: {e}"))?;
        let incarnations = incarnations::KnownIncarnations::load(config.incarnations_file.clone())?;
        let (incoming_tx, incoming_rx) = local_channel::new_bounded(INCOMING_FRAMES_MAX);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let peers = config
            .peers
            .iter()
            .map(|&(id, _)| (id, Peer::new()))
            .collect();
        let shared = Rc::new(Shared {
            handshake_frame: conn::handshake_frame(&config.handshake),
            config,
            peers: RefCell::new(peers),
            incoming: RefCell::new(Some(Rc::new(incoming_tx))),
            stats: RefCell::new(TransportStats::default()),
            stop_tx: RefCell::new(Some(stop_tx)),
            stop: stop_rx.shared(),
            shut: Cell::new(false),
            next_conn_id: Cell::new(1),
            handshakes_pending: Cell::new(0),
            incarnations: RefCell::new(incarnations),
            refused_by: RefCell::new(BTreeMap::new()),
            refusals_logged: RefCell::new(BTreeMap::new()),
        });
        shared.spawn(conn::accept_loop(shared.clone(), listener));
        let dialled: Vec<(u64, SocketAddr)> = shared
            .config
            .peers
            .iter()
            .copied()
            .filter(|(id, _)| *id > shared.config.node_id)
            .collect();
        for (id, addr) in dialled {
            shared.spawn(conn::dial_loop(shared.clone(), id, addr));
        }
        tracing::info!(
            node = shared.config.node_id,
            shard = shared.config.shard,
            addr = %local_addr,
            "peer transport listening"
        );
        Ok((Rc::new(Transport { shared, local_addr }), incoming_rx))
    }

    /// Where the listener is bound (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `payload` as one frame to `to`. Never waits.
    ///
    /// Panics when `payload` is empty or larger than `FRAME_PAYLOAD_BYTES_MAX`: callers
    /// build their messages, so either is a bug.
    pub fn send(&self, to: u64, payload: Vec<u8>) -> Result<(), SendError> {
        assert!(
            !payload.is_empty() && payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
            "frame payload of {} bytes",
            payload.len()
        );
        if self.shared.shut.get() {
            return Err(SendError::ShutDown);
        }
        let mut peers = self.shared.peers.borrow_mut();
        let peer = peers.get_mut(&to).ok_or(SendError::UnknownPeer)?;
        let frame_bytes = FRAME_HEADER_BYTES + payload.len();
        if peer.queued_bytes() + frame_bytes > self.shared.config.send_queue_bytes_max {
            drop(peers);
            self.shared.stats.borrow_mut().frames_dropped += 1;
            return Err(SendError::Full);
        }
        shards::wire::encode_frame(&payload, &mut peer.pending);
        peer.pending_frames += 1;
        if let Some(conn) = &peer.conn {
            // A full wake channel already holds a wake-up: nothing is lost.
            let _ = conn.wake.try_send(());
        }
        Ok(())
    }

    /// True while `peer` has an established (handshaken) connection.
    pub fn is_connected(&self, peer: u64) -> bool {
        self.shared
            .peers
            .borrow()
            .get(&peer)
            .is_some_and(|p| p.conn.is_some())
    }

    /// The id of `peer`'s established connection (unique within this transport), if any.
    pub fn connection(&self, peer: u64) -> Option<u64> {
        self.shared
            .peers
            .borrow()
            .get(&peer)
            .and_then(|p| p.conn.as_ref().map(|c| c.id))
    }

    /// The peers with an established (handshaken) connection, in id order.
    pub fn connected_peers(&self) -> Vec<u64> {
        let peers = self.shared.peers.borrow();
        peers
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Peers that refused us (their reason), until one of them accepts us again.
    pub fn refused_by(&self) -> BTreeMap<u64, String> {
        self.shared.refused_by.borrow().clone()
    }

    pub fn stats(&self) -> TransportStats {
        let queued: usize = self
            .shared
            .peers
            .borrow()
            .values()
            .map(Peer::queued_bytes)
            .sum();
        TransportStats {
            queued_bytes: queued as u64,
            ..self.shared.stats.borrow().clone()
        }
    }

    /// Closes the listener and every connection and stops redialling. The tasks end on
    /// their next turn of the executor; the incoming channel then reports its end.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

/// State shared by the transport's tasks (single-threaded: never borrowed across
/// an await).
struct Shared {
    config: TransportConfig,
    /// Our handshake, already framed.
    handshake_frame: Vec<u8>,
    peers: RefCell<BTreeMap<u64, Peer>>,
    /// Taken by `shutdown`, so the consumer sees the channel end once readers are gone.
    incoming: RefCell<Option<Rc<LocalSender<Incoming>>>>,
    stats: RefCell<TransportStats>,
    /// Dropped by `shutdown`, which completes `stop` and so ends every task.
    stop_tx: RefCell<Option<oneshot::Sender<()>>>,
    stop: SharedFuture<oneshot::Receiver<()>>,
    shut: Cell<bool>,
    next_conn_id: Cell<u64>,
    /// Accepted connections that have not finished their handshake.
    handshakes_pending: Cell<usize>,
    /// The data dir incarnation of every peer we talked to.
    incarnations: RefCell<incarnations::KnownIncarnations>,
    /// Peers that refused us, and why.
    refused_by: RefCell<BTreeMap<u64, String>>,
    /// When a refusal (ours or theirs) about a peer was last logged.
    refusals_logged: RefCell<BTreeMap<u64, Instant>>,
}

impl Shared {
    /// Runs `task` on this executor until it ends or the transport shuts down.
    fn spawn(&self, task: impl Future<Output = ()> + 'static) {
        let stop = self.stop.clone();
        glommio::spawn_local(async move {
            futures_lite::future::or(task, async move {
                let _ = stop.await;
            })
            .await
        })
        .detach();
    }

    fn shutdown(&self) {
        if self.shut.replace(true) {
            return;
        }
        drop(self.stop_tx.borrow_mut().take());
        for peer in self.peers.borrow_mut().values_mut() {
            peer.conn = None;
            peer.pending = Vec::new();
            peer.pending_frames = 0;
        }
        drop(self.incoming.borrow_mut().take());
        tracing::info!(
            node = self.config.node_id,
            shard = self.config.shard,
            "peer transport shut down"
        );
    }

    fn bump(&self, f: impl FnOnce(&mut TransportStats)) {
        f(&mut self.stats.borrow_mut());
    }

    /// A refusal about `peer` repeats every reconnect: log it at most every
    /// `REFUSAL_LOG_INTERVAL`.
    fn should_log_refusal(&self, peer: u64) -> bool {
        let now = Instant::now();
        let mut logged = self.refusals_logged.borrow_mut();
        match logged.get(&peer) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                logged.insert(peer, now);
                true
            }
        }
    }
}

/// A repeated refusal about the same peer is logged at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One peer's send queue and current connection.
struct Peer {
    /// Encoded frames waiting for the writer, oldest first.
    pending: Vec<u8>,
    pending_frames: u64,
    /// Taken by the current connection's writer and being written now.
    inflight_bytes: usize,
    inflight_frames: u64,
    conn: Option<ConnHandle>,
    ever_connected: bool,
    /// The process incarnation of the peer's last handshake.
    process_incarnation: Option<u64>,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            pending: Vec::new(),
            pending_frames: 0,
            inflight_bytes: 0,
            inflight_frames: 0,
            conn: None,
            ever_connected: false,
            process_incarnation: None,
        }
    }

    fn queued_bytes(&self) -> usize {
        self.pending.len() + self.inflight_bytes
    }
}

/// The handle of an established connection; dropping it closes the connection.
struct ConnHandle {
    id: u64,
    /// Dropping the sender completes the connection's close signal.
    _close: oneshot::Sender<()>,
    /// Wakes the writer when frames were queued.
    wake: LocalSender<()>,
}
