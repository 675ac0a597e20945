//! Requests forwarded between nodes: sending one to the leader's shard and waiting
//! for the reply that answers it (`shards::forwarding`), and serving the ones other
//! nodes send here.

use std::time::Instant;

use futures::channel::oneshot;
use shards::forwarding::ReplyMatch;
use shards::peer::{PeerFrame, RequestId};

use super::peers::isolated;
use super::ShardCore;
use crate::node::with_timeout;
use crate::ops::{ApiError, Reply};

/// Requests from other nodes served at once, at most.
const FORWARDED_IN_FLIGHT_MAX: usize = 16_384;

pub(super) enum ForwardError {
    /// Never left this node (no connection, full queue): safe to retry.
    NotSent,
    /// No answer in time: the outcome is unknown.
    TimedOut,
    /// The target went away or stopped leading while the request was out: the outcome
    /// is unknown.
    Abandoned,
}

impl ShardCore {
    /// Sends a request to `to` (same shard index) and waits for its reply until
    /// `deadline`. Gives up early, as `Abandoned`, when the connection to `to` drops or
    /// is replaced (a reply on another connection is not taken, see
    /// [`ShardCore::complete_forward`]) or this node learns that `to` no longer leads
    /// `group`: a write's outcome is then unknown, a read can be sent again elsewhere.
    pub(super) async fn forward(
        &self,
        to: u64,
        group: Option<u16>,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Reply, ForwardError> {
        let (id, conn, mut rx, transport) = {
            let mut peers = self.peers.borrow_mut();
            let Some(transport) = peers.transport.clone() else {
                return Err(ForwardError::NotSent);
            };
            let Some(conn) = transport.connection(to).filter(|_| !isolated()) else {
                return Err(ForwardError::NotSent);
            };
            let (tx, rx) = oneshot::channel();
            let forwards = peers.forwards.as_mut().expect("set with the transport");
            (forwards.start(to, conn, body, tx), conn, rx, transport)
        };
        let frame = PeerFrame::Request {
            id,
            body: body.to_vec(),
        };
        if transport.send(to, shards::peer::encode(&frame)).is_err() {
            self.cancel_forward(id);
            return Err(ForwardError::NotSent);
        }
        self.stats.borrow_mut().forwarded += 1;
        let local_leader = |g: u16| self.groups.borrow().get(&g).and_then(|r| r.raft.leader());
        let seen = group.and_then(local_leader);
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(ForwardError::TimedOut);
            }
            let slice = left.min(self.raft_settings.tick * 2);
            match with_timeout(slice, &mut rx).await {
                Some(Ok(reply)) => break Ok(reply),
                Some(Err(_)) => break Err(ForwardError::TimedOut),
                None => {}
            }
            // This replica saw a new leader elected since the request left.
            let now = group.and_then(local_leader);
            let moved = now.is_some_and(|l| l != to && Some(l) != seen);
            if moved || transport.connection(to) != Some(conn) {
                break Err(ForwardError::Abandoned);
            }
        };
        self.cancel_forward(id);
        answer
    }

    fn cancel_forward(&self, id: RequestId) {
        if let Some(forwards) = self.peers.borrow_mut().forwards.as_mut() {
            forwards.cancel(id);
        }
    }

    /// A reply to a forwarded request arrived from `from` on connection `conn`: it
    /// completes the request it answers, or is dropped (see `shards::forwarding`). A
    /// reply that names a waiting request of this process with another body stops the
    /// process: two requests shared an id, and a client would be told another's outcome.
    pub(super) fn complete_forward(
        &self,
        from: u64,
        conn: u64,
        id: RequestId,
        request_crc: u32,
        body: &[u8],
    ) {
        let matched = match self.peers.borrow_mut().forwards.as_mut() {
            Some(forwards) => forwards.reply(from, conn, id, request_crc),
            None => ReplyMatch::Stale,
        };
        match matched {
            ReplyMatch::Complete(tx) => {
                let reply = crate::forward::decode_reply(body)
                    .unwrap_or_else(|e| Reply::Error(ApiError::Internal(e)));
                let _ = tx.send(reply);
            }
            ReplyMatch::Stale => {
                self.stats.borrow_mut().stale_replies_dropped += 1;
                tracing::debug!(shard = self.index, from, conn, %id, "dropping a reply that answers no request of this process");
            }
            ReplyMatch::Mismatch {
                sent_crc,
                answered_crc,
            } => panic!(
                "shard {}: node {from} answered forwarded request {id} for a body with crc \
                 {answered_crc:#010x}, but the request sent with that id has crc {sent_crc:#010x}: \
                 two requests share an id",
                self.index
            ),
        }
    }

    pub(super) fn serve_request(&self, from: u64, id: RequestId, body: Vec<u8>) {
        let Some(me) = self.peers.borrow().me.upgrade() else {
            return;
        };
        let busy = {
            let mut peers = self.peers.borrow_mut();
            if peers.forwarded_in_flight >= FORWARDED_IN_FLIGHT_MAX {
                true
            } else {
                peers.forwarded_in_flight += 1;
                false
            }
        };
        let request_crc = crc32fast::hash(&body);
        glommio::spawn_local(async move {
            let reply = if busy {
                Reply::Error(ApiError::Overloaded)
            } else {
                let reply = match crate::forward::decode_op(&body) {
                    Ok(op) => me.execute_local(op).await,
                    Err(e) => Reply::Error(ApiError::Internal(format!("bad request: {e}"))),
                };
                me.peers.borrow_mut().forwarded_in_flight -= 1;
                reply
            };
            let body = crate::forward::encode_reply(&reply).unwrap_or_else(|e| {
                crate::forward::encode_reply(&Reply::Error(ApiError::Internal(e)))
                    .expect("an error reply encodes")
            });
            let frame = PeerFrame::Response {
                id,
                request_crc,
                body,
            };
            let transport = me.peers.borrow().transport.clone();
            if let Some(transport) = transport {
                if !isolated() {
                    let _ = transport.send(from, shards::peer::encode(&frame));
                }
            }
        })
        .detach();
    }
}
