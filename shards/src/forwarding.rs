//! Which reply completes which forwarded request.
//!
//! A shard forwards requests it cannot serve to the leader's node and waits for the
//! answers. Each request gets a [`RequestId`]: this process's incarnation (random, new at
//! every start) and a counter. A reply completes a waiting request only when it names
//! this process's incarnation, comes from the node the request was sent to, on the
//! connection it was sent on, and echoes the crc32 of the request's body. Anything else
//! is stale (meant for an earlier process of this node, or late from a connection that
//! has since been replaced) and is dropped. A reply that passes the first three checks
//! but names another body means two requests shared an id: the caller must stop rather
//! than tell a client another request's outcome.

use std::collections::HashMap;

use crate::peer::RequestId;
use crate::raft::NodeId;

/// What to do with a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyMatch<W> {
    /// It answers this waiting request (now forgotten).
    Complete(W),
    /// It answers no request of this process: drop it.
    Stale,
    /// It names a waiting request of this process but another body: a broken invariant.
    Mismatch { sent_crc: u32, answered_crc: u32 },
}

struct Waiting<W> {
    to: NodeId,
    conn: u64,
    request_crc: u32,
    waiter: W,
}

/// Deliberate bugs the simulation must catch (it plants each and shows that its checks
/// fail within 1,000 seeds). All off by default; never set them elsewhere.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlantedBugs {
    /// A reply completes the waiting request with the same counter, whatever process,
    /// node, connection and body it answers: after a restart (the counter starts again)
    /// a late reply meant for the earlier process tells a client another request's
    /// outcome.
    pub match_by_counter_only: bool,
}

/// The forwarded requests a shard waits for, each with its waiter `W`.
pub struct Forwards<W> {
    incarnation: u64,
    next_seq: u64,
    waiting: HashMap<u64, Waiting<W>>,
    bugs: PlantedBugs,
}

impl<W> Forwards<W> {
    /// `incarnation`: this process's, never 0.
    pub fn new(incarnation: u64) -> Forwards<W> {
        assert_ne!(incarnation, 0, "a process incarnation is never 0");
        Forwards {
            incarnation,
            next_seq: 0,
            waiting: HashMap::new(),
            bugs: PlantedBugs::default(),
        }
    }

    #[doc(hidden)]
    pub fn plant_bugs(&mut self, bugs: PlantedBugs) {
        self.bugs = bugs;
    }

    /// Registers a request with body `body` about to be sent to `to` on connection `conn`.
    pub fn start(&mut self, to: NodeId, conn: u64, body: &[u8], waiter: W) -> RequestId {
        self.next_seq += 1;
        let id = RequestId {
            incarnation: self.incarnation,
            seq: self.next_seq,
        };
        let waiting = Waiting {
            to,
            conn,
            request_crc: crc32fast::hash(body),
            waiter,
        };
        assert!(
            self.waiting.insert(id.seq, waiting).is_none(),
            "forwarded request id {id} is already waiting"
        );
        id
    }

    /// Forgets a request (answered, given up, or never sent).
    pub fn cancel(&mut self, id: RequestId) {
        if id.incarnation == self.incarnation {
            self.waiting.remove(&id.seq);
        }
    }

    /// A reply naming `id` and `answered_crc` arrived from `from` on connection `conn`.
    pub fn reply(
        &mut self,
        from: NodeId,
        conn: u64,
        id: RequestId,
        answered_crc: u32,
    ) -> ReplyMatch<W> {
        if self.bugs.match_by_counter_only {
            return match self.waiting.remove(&id.seq) {
                Some(waiting) => ReplyMatch::Complete(waiting.waiter),
                None => ReplyMatch::Stale,
            };
        }
        if id.incarnation != self.incarnation {
            return ReplyMatch::Stale;
        }
        let Some(waiting) = self.waiting.get(&id.seq) else {
            return ReplyMatch::Stale;
        };
        if waiting.to != from || waiting.conn != conn {
            return ReplyMatch::Stale;
        }
        if waiting.request_crc != answered_crc {
            return ReplyMatch::Mismatch {
                sent_crc: waiting.request_crc,
                answered_crc,
            };
        }
        let waiting = self.waiting.remove(&id.seq).expect("just found");
        ReplyMatch::Complete(waiting.waiter)
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 0xabcd;

    #[test]
    fn a_reply_completes_the_request_it_answers_once() {
        let mut f = Forwards::new(ME);
        let id = f.start(2, 7, b"append a", "a");
        let other = f.start(3, 8, b"append b", "b");
        assert_ne!(id, other);
        let crc = crc32fast::hash(b"append a");
        assert_eq!(f.reply(2, 7, id, crc), ReplyMatch::Complete("a"));
        assert_eq!(f.reply(2, 7, id, crc), ReplyMatch::Stale, "a duplicate");
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn a_reply_meant_for_an_earlier_process_completes_nothing() {
        // The earlier process numbered its requests from 1 as well.
        let mut earlier = Forwards::new(ME + 1);
        let old = earlier.start(2, 7, b"old request", ());
        let mut now = Forwards::new(ME);
        let new = now.start(2, 7, b"old request", ());
        assert_eq!(old.seq, new.seq);
        let crc = crc32fast::hash(b"old request");
        assert_eq!(now.reply(2, 7, old, crc), ReplyMatch::Stale);
        assert_eq!(
            now.len(),
            1,
            "the new request still waits for its own reply"
        );
    }

    #[test]
    fn a_reply_from_another_node_or_connection_completes_nothing() {
        let mut f = Forwards::new(ME);
        let id = f.start(2, 7, b"x", ());
        let crc = crc32fast::hash(b"x");
        assert_eq!(f.reply(3, 7, id, crc), ReplyMatch::Stale);
        assert_eq!(f.reply(2, 6, id, crc), ReplyMatch::Stale);
        assert_eq!(f.reply(2, 7, id, crc), ReplyMatch::Complete(()));
    }

    #[test]
    fn a_reply_naming_another_body_is_a_mismatch() {
        let mut f = Forwards::new(ME);
        let id = f.start(2, 7, b"mine", ());
        let theirs = crc32fast::hash(b"another request");
        assert_eq!(
            f.reply(2, 7, id, theirs),
            ReplyMatch::Mismatch {
                sent_crc: crc32fast::hash(b"mine"),
                answered_crc: theirs
            }
        );
    }

    #[test]
    fn a_cancelled_request_takes_no_reply() {
        let mut f = Forwards::new(ME);
        let id = f.start(2, 7, b"x", ());
        f.cancel(id);
        assert!(f.is_empty());
        assert_eq!(f.reply(2, 7, id, crc32fast::hash(b"x")), ReplyMatch::Stale);
    }
}
