//! Catching up: the mode of a member that may have lost part of what Figure 2 says must
//! be on stable storage before it answers an RPC.
//!
//! Raft's safety rests on every member keeping its promises: the entries it
//! acknowledged (they count towards a commit, §5.3) and the vote it cast in its term
//! (§5.2). A member whose log lost a suffix (its data dir was rebuilt, or a torn tail
//! was dropped) has broken the first promise; one that also lost its term and vote has
//! broken the second. Thesis §3.8 says such a server cannot rejoin with its old
//! identity and should be added back as a new member through a membership change. This
//! mode gives the same guarantee without one (membership is static here):
//!
//! - It **grants no vote and no pre-vote, and never campaigns** (not even on
//!   `TimeoutNow`). An election then needs a majority of the OTHER voters, whose logs
//!   still hold every committed entry, so Leader Completeness (§5.4.3) holds as if
//!   this member were down. It still accepts entries and acknowledges them once
//!   durable, like any follower: those promises are made afresh.
//! - Its rejections carry `catching_up`, so a leader that still believes the old
//!   acknowledgements (`match_index`) learns that they no longer hold, forgets them
//!   and probes again from where the follower's log ends, with entries or a snapshot
//!   (`replicate.rs`). A heartbeat whose commit index lies beyond its log is answered
//!   with such a rejection too, so a quiet group notices the loss without waiting for
//!   a new entry. For the same reason (a leader's `match_index` for it may be stale) a
//!   heartbeat's commit index is not applied while catching up: only AppendEntries,
//!   checked by Log Matching, advance it.
//! - It **ends** once it has persisted everything up to a commit index announced by a
//!   leader of its current term since it started (`Append::commit`,
//!   `Heartbeat::leader_commit`), and the entry at that index is of the current term.
//!   That last condition means the leader has committed an entry of its own term, so
//!   its commit index covers every entry committed in earlier terms (§5.4.2: only
//!   current-term entries commit by counting, everything before them with them); and
//!   the leader announced at least what it committed with this member's lost
//!   acknowledgements of this term, as a leader's commit index never goes back. From
//!   then on the member holds every committed entry it ever acknowledged and may vote
//!   again.
//!
//! When the term and vote are lost too, the member starts **fenced**: a vote it cast
//! before the loss, or an entry it acknowledged, was in a term that some other voter
//! has also reached durably (the candidate or leader it answered, or, for its own
//! winning candidacy, a voter that granted it). So it first hears from every other
//! voter of the group (any message carries the sender's term; it probes the silent
//! ones with a PreVote every election timeout, whose answer carries the answerer's
//! term), takes the highest term heard as its own and marks its vote for that term as
//! used (for itself), and only then follows the usual rules, catching up as above.
//! Until then it answers nothing: leaders of lower terms, which might conflict with
//! what it promised, are simply not acknowledged. A voter that is down keeps the group
//! waiting, which is the safe answer.

use std::collections::BTreeMap;

use super::node::RaftNode;
use super::{AppendResponse, Body, Message, NodeId, Role};

/// Why, and how far, a member is catching up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CatchUp {
    /// While the term and vote are unknown: the highest term heard from each other
    /// voter since start.
    pub fence: Option<BTreeMap<NodeId, u64>>,
    /// The highest commit index a leader of the current term announced since start
    /// (reset when the term changes).
    pub target: Option<u64>,
}

impl<T: Clone> RaftNode<T> {
    /// Starts this member in catching-up mode (see the module docs of `catch_up.rs`):
    /// it may have lost entries it acknowledged, and with `term_and_vote_lost` also
    /// the term and vote it had (they are then learnt from the other voters).
    pub fn catch_up(mut self, term_and_vote_lost: bool) -> Self {
        assert!(
            self.voters.len() > 1,
            "node {}: a lone voter has no one to catch up from",
            self.id
        );
        assert_eq!(self.role, Role::Follower, "catch_up on a fresh node only");
        self.catch_up = Some(CatchUp {
            fence: term_and_vote_lost.then(BTreeMap::new),
            target: None,
        });
        self
    }

    /// Still catching up: no vote, no campaign (see [`RaftNode::catch_up`]).
    pub fn is_catching_up(&self) -> bool {
        self.catch_up.is_some()
    }

    /// Catching up and still waiting to hear every other voter's term.
    pub fn is_fenced(&self) -> bool {
        self.catch_up.as_ref().is_some_and(|c| c.fence.is_some())
    }

    /// Fenced: notes the sender's term. Returns whether the message may be handled:
    /// once every other voter has been heard from, this member takes the highest term
    /// and marks its vote of that term as used, then handles messages as usual.
    pub(super) fn fence_step(&mut self, msg: &Message<T>) -> bool {
        let Some(fence) = self.catch_up.as_mut().and_then(|c| c.fence.as_mut()) else {
            return true;
        };
        let heard = fence.entry(msg.from).or_insert(0);
        *heard = (*heard).max(msg.term);
        let others = self.voters.iter().filter(|&&v| v != self.id).count();
        if fence.len() < others {
            return false;
        }
        let highest = fence.values().copied().max().unwrap_or(0);
        self.catch_up.as_mut().expect("fenced").fence = None;
        if highest > self.term {
            self.become_follower(highest, None);
        }
        // Whatever this member promised before its loss was in a term <= `highest`:
        // never grant a second vote in it.
        if self.vote.is_none() {
            self.vote = Some(self.id);
        }
        true
    }

    /// Fenced, every election timeout: asks the voters not heard from yet for their
    /// term. A PreVote changes no state of its receiver (thesis §9.6), and every answer
    /// carries a term at least the answerer's own.
    pub(super) fn fence_probe(&mut self) {
        let Some(fence) = self.catch_up.as_ref().and_then(|c| c.fence.as_ref()) else {
            return;
        };
        let silent: Vec<NodeId> = self
            .voters
            .iter()
            .copied()
            .filter(|v| *v != self.id && !fence.contains_key(v))
            .collect();
        let body = Body::PreVote {
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
        };
        for to in silent {
            self.messages.push(Message {
                from: self.id,
                to,
                term: self.term + 1,
                body: body.clone(),
            });
        }
    }

    /// A leader of the current term announced `commit` (its own commit index).
    pub(super) fn note_commit_announced(&mut self, commit: u64) {
        if let Some(c) = self.catch_up.as_mut() {
            c.target = Some(c.target.map_or(commit, |t| t.max(commit)));
        }
    }

    /// The term changed: announcements of earlier leaders no longer count.
    pub(super) fn forget_announced_commit(&mut self) {
        if let Some(c) = self.catch_up.as_mut() {
            c.target = None;
        }
    }

    /// Catching up, a heartbeat says the leader counts on entries up to `commit`
    /// that this log does not hold: tell it where the log really ends.
    pub(super) fn answer_heartbeat_beyond_log(&mut self, from: NodeId, commit: u64) {
        if self.catch_up.is_none() || commit <= self.log.last_index() {
            return;
        }
        let response = AppendResponse::Rejected {
            prev_index: commit,
            conflict_term: None,
            first_index: self.log.last_index() + 1,
            catching_up: true,
        };
        self.send(from, Body::AppendResponse(response));
    }

    /// Ends the mode once everything up to the announced commit index is durable here
    /// and that entry is of the current term (see the module docs).
    pub(super) fn maybe_end_catch_up(&mut self) {
        let Some(c) = &self.catch_up else {
            return;
        };
        let Some(target) = c.target else {
            return;
        };
        if c.fence.is_none()
            && self.log.persisted >= target
            && self.log.term(target) == Some(self.term)
        {
            self.catch_up = None;
        }
    }
}
