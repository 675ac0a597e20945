//! Routing: an op for a session runs where the session's group is led, here or on
//! another node (forwarded, see `forwarding`), retrying while leadership moves; reads
//! that need no leader (tails, listings after a read index) run on this replica.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::forwarding::ForwardError;
use super::ShardCore;
use crate::ops::{ApiError, Op, Reply};

/// Ops that change state: after a forwarding timeout their outcome is unknown.
fn is_write(op: &Op) -> bool {
    matches!(
        op,
        Op::Create { .. } | Op::Patch { .. } | Op::SetArchived { .. } | Op::Append { .. }
    )
}

/// The session an op is about, if it is about one.
fn session_of(op: &Op) -> Option<&str> {
    match op {
        Op::Create { id, .. }
        | Op::Get { id }
        | Op::Patch { id, .. }
        | Op::SetArchived { id, .. }
        | Op::Append { id, .. }
        | Op::Read { id, .. } => Some(id),
        _ => None,
    }
}

impl ShardCore {
    /// Runs one operation for a session owned by this shard: here when this node leads
    /// the session's group, else on the leader's shard (forwarded).
    pub async fn execute(&self, op: Op) -> Reply {
        match op {
            Op::Stats => Reply::Stats(Box::new(self.stats_snapshot())),
            Op::DebugGroup { group } => Reply::Debug(self.debug_group(group)),
            Op::ReadIndex { groups } => Reply::ReadIndex(self.read_index(&groups).await),
            // Served by any replica from its own log (another replica's copy is damaged).
            Op::FetchEvents {
                id,
                after,
                through,
                max_bytes,
            } => self.serve_fetch(&id, after, through, max_bytes).await,
            Op::List {
                after,
                limit,
                archived,
                filters,
            } => {
                self.catch_up_with_leaders().await;
                for group in self.leading_groups() {
                    let _ = self.read_barrier(group).await;
                }
                self.list(after, limit, archived, &filters).await
            }
            // Tails read this replica's committed prefix (forwarded only when this node
            // holds no replica of the group).
            Op::Read {
                ref id,
                wait: Some(_),
                ..
            } if self.replicates(shards::group_of(id)) => self.execute_local(op).await,
            op => self.route(op).await,
        }
    }

    pub(super) fn replicates(&self, group: u16) -> bool {
        self.groups.borrow().contains_key(&group)
    }

    /// Runs a session op where the group's leader is, retrying while leadership moves,
    /// until the request timeout.
    async fn route(&self, op: Op) -> Reply {
        let Some(id) = session_of(&op) else {
            return Reply::Error(ApiError::Internal(format!("op without a session: {op:?}")));
        };
        let group = shards::group_of(id);
        // A long-poll read forwarded to a replica may wait that long before answering.
        let waits = match &op {
            Op::Read { wait: Some(w), .. } => *w,
            _ => Duration::ZERO,
        };
        let deadline = Instant::now() + self.request_timeout + waits;
        let mut hint: Option<u64> = None;
        let mut encoded: Option<Vec<u8>> = None;
        let mut attempt = 0usize;
        loop {
            let leader = hint.take().or_else(|| self.leader_of(group, attempt));
            attempt += 1;
            match leader {
                Some(leader) if leader == self.node_id => return self.execute_local(op).await,
                Some(leader) => {
                    if encoded.is_none() {
                        match crate::forward::encode_op(&op) {
                            Ok(bytes) => encoded = Some(bytes),
                            Err(e) => return Reply::Error(ApiError::Internal(e)),
                        }
                    }
                    let body = encoded.as_deref().expect("encoded");
                    match self.forward(leader, Some(group), body, deadline).await {
                        Ok(Reply::Error(ApiError::NotLeader { leader: next })) => {
                            hint = next.filter(|&n| n != leader);
                        }
                        Ok(reply) => return reply,
                        Err(ForwardError::TimedOut) => {
                            return Reply::Error(if is_write(&op) {
                                ApiError::CommitUnknown
                            } else {
                                ApiError::Unavailable
                            });
                        }
                        // A write that may have reached the old leader must not be sent
                        // again: the client retries (with its idempotency key).
                        Err(ForwardError::Abandoned) if is_write(&op) => {
                            return Reply::Error(ApiError::CommitUnknown);
                        }
                        Err(_) => {}
                    }
                }
                None => {}
            }
            if self.shutting_down.get() || Instant::now() + self.raft_settings.tick >= deadline {
                return Reply::Error(ApiError::Unavailable);
            }
            if hint.is_none() {
                glommio::timer::sleep(self.raft_settings.tick).await;
            }
        }
    }

    /// The node to send a group's requests to: its leader as this replica knows it, or
    /// (no replica here) one of its voters in turn, which answers with the leader.
    fn leader_of(&self, group: u16, attempt: usize) -> Option<u64> {
        if let Some(g) = self.groups.borrow().get(&group) {
            return g.raft.leader();
        }
        let voters = shards::voters_of(group, &self.members);
        voters.get(attempt % voters.len().max(1)).copied()
    }

    /// Runs an op on this replica (sent here by `route`, locally or from another node).
    /// Writes and read-your-writes reads need this node to lead the group.
    pub(crate) async fn execute_local(&self, op: Op) -> Reply {
        if let Some(id) = session_of(&op) {
            let group = shards::group_of(id);
            let tail = matches!(op, Op::Read { wait: Some(_), .. });
            let leader = self
                .groups
                .borrow()
                .get(&group)
                .map(|g| (g.leading, g.raft.leader()));
            match leader {
                None => return Reply::Error(ApiError::NotLeader { leader: None }),
                Some((false, leader)) if !tail => {
                    return Reply::Error(ApiError::NotLeader { leader })
                }
                _ => {}
            }
        }
        match op {
            Op::Create {
                id,
                title,
                metadata,
            } => self.create(id, title, metadata).await,
            Op::Get { id } => self.get(&id).await,
            Op::Patch { id, patch } => self.patch(&id, &patch).await,
            Op::SetArchived { id, archived } => self.set_archived(&id, archived).await,
            Op::Append { id, event } => self.append(&id, &event).await,
            Op::Read {
                id,
                after,
                max_events,
                max_bytes,
                wait,
            } => {
                if wait.is_none() {
                    if let Err(e) = self.read_barrier(shards::group_of(&id)).await {
                        return Reply::Error(e);
                    }
                }
                self.read(&id, after, max_events, max_bytes, wait).await
            }
            other => Box::pin(self.execute(other)).await,
        }
    }

    /// `(group, commit index)` of each listed group this node leads (a read index),
    /// once it has committed an entry of its term (see `read_barrier`).
    async fn read_index(&self, groups: &[u16]) -> Vec<(u16, u64)> {
        let mut out = Vec::with_capacity(groups.len());
        for &group in groups {
            if self.read_barrier(group).await.is_err() {
                continue;
            }
            if let Some(g) = self.groups.borrow().get(&group) {
                out.push((group, g.raft.commit_index()));
            }
        }
        out
    }

    /// Before a listing on a follower: asks each leader node (one request per node, for
    /// all the groups it leads here) for its commit indexes and waits until this
    /// replica has applied them, so the listing reflects every acknowledged write.
    async fn catch_up_with_leaders(&self) {
        let mut by_leader: BTreeMap<u64, Vec<u16>> = BTreeMap::new();
        for (&group, g) in self.groups.borrow().iter() {
            match g.raft.leader() {
                Some(leader) if leader != self.node_id => {
                    by_leader.entry(leader).or_default().push(group)
                }
                _ => {}
            }
        }
        let deadline = Instant::now() + self.request_timeout;
        for (leader, groups) in by_leader {
            let Ok(body) = crate::forward::encode_op(&Op::ReadIndex { groups }) else {
                continue;
            };
            let Ok(Reply::ReadIndex(indexes)) = self.forward(leader, None, &body, deadline).await
            else {
                continue;
            };
            for (group, commit) in indexes {
                while Instant::now() < deadline
                    && self
                        .groups
                        .borrow()
                        .get(&group)
                        .is_some_and(|g| g.applied < commit)
                {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}
