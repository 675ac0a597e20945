//! The shard's peers: its transport to the same shard of every other node, the
//! outbox that gathers a turn's messages per node (heartbeats of all groups as one
//! frame), and the task that serves the frames that arrive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::channel::oneshot;
use glommio::channels::local_channel::LocalReceiver;
use shards::entry::Command;
use shards::forwarding::Forwards;
use shards::peer::{HeartbeatAck, HeartbeatItem, PeerFrame, HEARTBEAT_ITEMS_MAX};
use shards::raft::{Body, Message};
use shards::wire::{ClusterSettings, Handshake, WIRE_VERSION};

use super::ShardCore;
use crate::ops::Reply;
use crate::transport::{shard_peer_addr, Incoming, Transport, TransportConfig};

/// Bound of one peer's send queue.
const SEND_QUEUE_BYTES_MAX: usize = 64 << 20;

/// In each shard dir: the data dir incarnation of every peer (`transport::incarnations`).
const PEER_INCARNATIONS_FILE: &str = "peers.json";

/// How this node reaches the others.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub cluster_id: String,
    /// This process's incarnation (random, new at every start, never 0): see
    /// `shards::peer::RequestId`.
    pub incarnation: u64,
    /// This node's shard-0 peer address (shard i listens on its port + i).
    pub listen: SocketAddr,
    /// Every OTHER member's shard-0 peer address.
    pub peers: Vec<(u64, SocketAddr)>,
    pub settings: ClusterSettings,
    /// This node's data dir incarnation (`crate::datadir`).
    pub data_incarnation: u64,
}

/// Messages gathered for one peer node during a turn.
#[derive(Default)]
struct Outbox {
    frames: Vec<PeerFrame>,
    heartbeats: Vec<HeartbeatItem>,
    acks: Vec<HeartbeatAck>,
}

#[derive(Default)]
pub(super) struct Peers {
    pub(super) me: Weak<ShardCore>,
    pub(super) transport: Option<Rc<Transport>>,
    outbox: BTreeMap<u64, Outbox>,
    /// Requests this shard forwarded and waits for (set with the transport).
    pub(super) forwards: Option<Forwards<oneshot::Sender<Reply>>>,
    pub(super) forwarded_in_flight: usize,
}

/// Fault injection (`PUT /debug/faults`, test builds of a cluster): while set, every
/// shard of this process drops every frame to and from other nodes.
static ISOLATED: AtomicBool = AtomicBool::new(false);

pub fn set_isolated(isolated: bool) {
    ISOLATED.store(isolated, Ordering::Relaxed);
}

pub(super) fn isolated() -> bool {
    ISOLATED.load(Ordering::Relaxed)
}

/// Starts the shard's peer transport and the task that serves what arrives on it.
pub fn start_transport(core: &Rc<ShardCore>, peer: PeerSettings) -> Result<(), String> {
    let shard = core.index as u32;
    let mut members: Vec<u64> = peer.peers.iter().map(|p| p.0).collect();
    members.push(core.node_id);
    let config = TransportConfig {
        node_id: core.node_id,
        shard,
        shards: core.shards as u32,
        listen: shard_peer_addr(peer.listen, shard),
        peers: peer
            .peers
            .iter()
            .map(|&(id, addr)| (id, shard_peer_addr(addr, shard)))
            .collect(),
        members,
        handshake: Handshake {
            wire_version: WIRE_VERSION,
            cluster_id: peer.cluster_id,
            node_id: core.node_id,
            shards: core.shards as u32,
            shard,
            incarnation: peer.incarnation,
            settings: peer.settings,
            data_incarnation: peer.data_incarnation,
        },
        send_queue_bytes_max: SEND_QUEUE_BYTES_MAX,
        reconnect_backoff_min: Duration::from_millis(20),
        reconnect_backoff_max: Duration::from_millis(500),
        incarnations_file: Some(core.dir.join(PEER_INCARNATIONS_FILE)),
    };
    let forwards = Forwards::new(peer.incarnation);
    let (transport, incoming) = Transport::start(config)?;
    let mut peers = core.peers.borrow_mut();
    peers.transport = Some(transport);
    peers.forwards = Some(forwards);
    drop(peers);
    glommio::spawn_local(core.clone().run_incoming(incoming)).detach();
    Ok(())
}

impl ShardCore {
    /// Peers that refused this node's handshake (and why), and how many handshakes this
    /// shard refused for a new data dir.
    pub(super) fn refusals(&self) -> (BTreeMap<u64, String>, u64) {
        match &self.peers.borrow().transport {
            Some(t) => (t.refused_by(), t.stats().new_data_dir_refusals),
            None => (BTreeMap::new(), 0),
        }
    }

    pub(super) fn queue_message(&self, group: u16, msg: Message<Command>) {
        let mut peers = self.peers.borrow_mut();
        let to = msg.to;
        let outbox = peers.outbox.entry(to).or_default();
        match msg.body {
            Body::Heartbeat {
                commit,
                leader_commit,
            } => outbox.heartbeats.push(HeartbeatItem {
                group,
                term: msg.term,
                commit,
                leader_commit,
            }),
            Body::HeartbeatResponse => outbox.acks.push(HeartbeatAck {
                group,
                term: msg.term,
            }),
            _ => outbox.frames.push(PeerFrame::Raft { group, msg }),
        }
    }

    /// Sends everything gathered for each peer (heartbeats as one frame per peer).
    pub(super) fn flush_outbox(&self) {
        let mut peers = self.peers.borrow_mut();
        if peers.outbox.is_empty() {
            return;
        }
        let outboxes = std::mem::take(&mut peers.outbox);
        let Some(transport) = peers.transport.clone() else {
            return;
        };
        let isolated = isolated();
        drop(peers);
        let mut dropped = 0u64;
        for (to, outbox) in outboxes {
            let mut frames = outbox.frames;
            for items in outbox.heartbeats.chunks(HEARTBEAT_ITEMS_MAX) {
                frames.push(PeerFrame::Heartbeats {
                    from: self.node_id,
                    to,
                    items: items.to_vec(),
                });
            }
            for items in outbox.acks.chunks(HEARTBEAT_ITEMS_MAX) {
                frames.push(PeerFrame::HeartbeatAcks {
                    from: self.node_id,
                    to,
                    items: items.to_vec(),
                });
            }
            for frame in frames {
                if isolated || transport.send(to, shards::peer::encode(&frame)).is_err() {
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            self.stats.borrow_mut().peer_frames_dropped += dropped;
        }
    }

    /// This shard has a live connection to node `to`.
    pub(super) fn connected_to(&self, to: u64) -> bool {
        !isolated()
            && self
                .peers
                .borrow()
                .transport
                .as_ref()
                .is_some_and(|t| t.connection(to).is_some())
    }

    /// Serves frames from other nodes.
    async fn run_incoming(self: Rc<Self>, incoming: LocalReceiver<Incoming>) {
        while let Some(frame) = incoming.recv().await {
            if isolated() {
                self.stats.borrow_mut().peer_frames_dropped += 1;
                continue;
            }
            let decoded = match shards::peer::decode(&frame.payload) {
                Ok(decoded) => decoded,
                Err(e) => {
                    tracing::warn!(shard = self.index, from = frame.from, error = %e, "bad peer frame");
                    continue;
                }
            };
            match decoded {
                PeerFrame::Raft { group, msg } => self.step(group, msg),
                PeerFrame::Heartbeats { from, to, items } => {
                    for item in items {
                        self.step(item.group, item.to_message(from, to));
                    }
                }
                PeerFrame::HeartbeatAcks { from, to, items } => {
                    for item in items {
                        self.step(item.group, item.to_message(from, to));
                    }
                }
                PeerFrame::Request { id, body } => self.serve_request(frame.from, id, body),
                // Handled by the transport: only ever the first frame of a connection.
                PeerFrame::Refused { .. } => {}
                PeerFrame::Response {
                    id,
                    request_crc,
                    body,
                } => self.complete_forward(frame.from, frame.conn, id, request_crc, &body),
            }
            self.flush_outbox();
        }
    }
}
