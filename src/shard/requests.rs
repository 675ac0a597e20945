//! Client writes and session reads on the group's leader: decide against the state
//! including in-flight entries, propose, and answer once the entry (or everything the
//! answer was decided against) is committed.

use std::time::{Duration, Instant};

use futures::channel::oneshot;
use shards::entry::Command;
use shards::replica::Refused;
use shards::session::AppendDecision;
use shards::validate::{NewEvent, NewSession, PatchRequest};

use super::{command_bytes, now_us, Group, ShardCore};
use crate::node::with_timeout;
use crate::ops::{ApiError, Reply};

impl ShardCore {
    /// Proposes `command` (decided against the leader's state) and applies it to that
    /// state; returns its (index, term).
    pub(super) fn propose(&self, group: u16, command: Command) -> Result<(u64, u64), ApiError> {
        if self.shutting_down.get() {
            return Err(ApiError::Unavailable);
        }
        // Decided after the dedupe rules (callers answered retries before proposing).
        // What frees space (archive progress) still goes through a full disk.
        let bytes = command_bytes(&command);
        let class = shards::storage::WriteClass::of_proposal(&command);
        match shards::storage::admit(class, self.space.full(), self.room(), bytes as u64) {
            shards::storage::Admission::Admit => {}
            shards::storage::Admission::Full(_) => return Err(ApiError::StorageFull),
            shards::storage::Admission::Wait => return Err(ApiError::Overloaded),
        }
        if self.queue.borrow().refuses(bytes) {
            return Err(ApiError::Overloaded);
        }
        let proposed = {
            let mut groups = self.groups.borrow_mut();
            let g = groups
                .get_mut(&group)
                .ok_or(ApiError::NotLeader { leader: None })?;
            g.propose(command).map_err(|refused| match refused {
                Refused::NotLeader { leader } => ApiError::NotLeader { leader },
                Refused::Transferring => ApiError::Unavailable,
                Refused::Backpressure => ApiError::Overloaded,
            })
        };
        if proposed.is_ok() {
            // Proposals of this turn of the executor leave together (one Ready per group,
            // one AppendEntries per follower, one send per peer).
            if self.proposed.borrow_mut().insert(group) {
                let _ = self.wake.driver.try_send(());
            }
        }
        proposed
    }

    /// Waits until entry `index` of `term` is committed. A timeout, or the entry being
    /// replaced, leaves the outcome unknown.
    async fn wait_commit(&self, group: u16, index: u64, term: u64) -> Result<(), ApiError> {
        let rx = {
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(&group) else {
                return Err(ApiError::CommitUnknown);
            };
            // Already applied: committed if the entry there is still ours (callers read
            // `term` from the log in the same step, so it has not been compacted).
            if let Some(committed) = g.outcome(index, term) {
                return if committed {
                    Ok(())
                } else {
                    Err(ApiError::CommitUnknown)
                };
            }
            let (tx, rx) = oneshot::channel();
            g.wait(index, term, tx);
            rx
        };
        match with_timeout(self.request_timeout, rx).await {
            Some(Ok(true)) => Ok(()),
            // Replaced entries, lost leadership, shutdown and timeouts all leave the
            // outcome unknown.
            _ => Err(ApiError::CommitUnknown),
        }
    }

    /// A reply decided against in-flight entries is sent only once they are committed,
    /// so a client never sees a result that a failure could take back (API.md).
    async fn settle(&self, group: u16) -> Result<(), ApiError> {
        let last = {
            let groups = self.groups.borrow();
            let Some(g) = groups.get(&group) else {
                return Err(ApiError::Unavailable);
            };
            g.settle_point()
        };
        self.wait_commit(group, last.0, last.1).await
    }

    async fn propose_and_wait(&self, group: u16, command: Command) -> Result<(), ApiError> {
        let (index, term) = self.propose(group, command)?;
        self.wait_commit(group, index, term).await
    }

    pub(super) fn with_group<T>(
        &self,
        group: u16,
        f: impl FnOnce(&mut Group) -> T,
    ) -> Result<T, ApiError> {
        let mut groups = self.groups.borrow_mut();
        match groups.get_mut(&group) {
            Some(g) if g.leading => Ok(f(g)),
            Some(g) => Err(ApiError::NotLeader {
                leader: g.raft.leader(),
            }),
            None => Err(ApiError::NotLeader { leader: None }),
        }
    }

    fn render_view(&self, group: u16, id: &str) -> Reply {
        match self.groups.borrow().get(&group).map(|g| g.state.view(id)) {
            Some(Some(view)) => Reply::Session(shards::session::render_session(view)),
            _ => Reply::Error(ApiError::SessionNotFound),
        }
    }

    pub(super) async fn create(
        &self,
        id: String,
        title: Option<String>,
        metadata: String,
    ) -> Reply {
        let group = shards::group_of(&id);
        let request = NewSession {
            id: Some(id.clone()),
            title,
            metadata,
        };
        let decided = match self.with_group(group, |g| {
            g.state.decide_create(&request, id.clone(), now_us())
        }) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
        self.commit_decision(group, &id, decided.map(Some)).await
    }

    pub(super) async fn get(&self, id: &str) -> Reply {
        let group = shards::group_of(id);
        if let Err(e) = self.read_barrier(group).await {
            return Reply::Error(e);
        }
        self.render_view(group, id)
    }

    /// Before a leader serves a read: it has committed an entry of its own term, so its
    /// committed state holds every acknowledged write (Raft §8; a new leader learns what
    /// its predecessors committed only by committing its own no-op).
    pub(super) async fn read_barrier(&self, group: u16) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let state = self
                .groups
                .borrow()
                .get(&group)
                .map(|g| (g.leading, g.applied_term == g.raft.term()));
            match state {
                Some((true, true)) => return Ok(()),
                Some((true, false)) if Instant::now() < deadline && !self.shutting_down.get() => {
                    glommio::timer::sleep(Duration::from_micros(500)).await;
                }
                Some((true, false)) => return Err(ApiError::Unavailable),
                Some((false, _)) => {
                    let leader = self
                        .groups
                        .borrow()
                        .get(&group)
                        .and_then(|g| g.raft.leader());
                    return Err(ApiError::NotLeader { leader });
                }
                None => return Err(ApiError::NotLeader { leader: None }),
            }
        }
    }

    pub(super) async fn patch(&self, id: &str, patch: &PatchRequest) -> Reply {
        let group = shards::group_of(id);
        let decided = match self.with_group(group, |g| g.state.decide_patch(id, patch, now_us())) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
        self.commit_decision(group, id, decided.map(Some)).await
    }

    pub(super) async fn set_archived(&self, id: &str, archived: bool) -> Reply {
        let group = shards::group_of(id);
        let decided = match self.with_group(group, |g| {
            g.state.decide_set_archived(id, archived, now_us())
        }) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
        self.commit_decision(group, id, decided).await
    }

    /// Answers a decided change to a session with the session as committed: the entry
    /// is proposed and waited for; with nothing to propose, or a refusal, the answer
    /// waits until everything it was decided against is committed (`settle`).
    async fn commit_decision<E: Into<ApiError>>(
        &self,
        group: u16,
        id: &str,
        decided: Result<Option<Command>, E>,
    ) -> Reply {
        let result = match decided {
            Ok(Some(command)) => self.propose_and_wait(group, command).await,
            Ok(None) => self.settle(group).await,
            Err(e) => self.settle(group).await.and(Err(e.into())),
        };
        match result {
            Ok(()) => self.render_view(group, id),
            Err(e) => Reply::Error(e),
        }
    }

    pub(super) async fn append(&self, id: &str, event: &NewEvent) -> Reply {
        let group = shards::group_of(id);
        let decided = match self.with_group(group, |g| g.state.decide_append(id, event, now_us())) {
            Ok(d) => d,
            Err(e) => return Reply::Error(e),
        };
        let (seq, deduped) = match decided {
            Ok(AppendDecision::Append(command)) => {
                let Command::Append(entry) = &command else {
                    unreachable!("decide_append proposes appends")
                };
                let seq = entry.seq;
                if let Err(e) = self.propose_and_wait(group, command).await {
                    return Reply::Error(e);
                }
                self.stats.borrow_mut().appends += 1;
                (seq, false)
            }
            Ok(AppendDecision::Deduped { seq }) => {
                if let Err(e) = self.settle(group).await {
                    return Reply::Error(e);
                }
                self.stats.borrow_mut().dedupes += 1;
                (seq, true)
            }
            Err(e) => {
                let settled = self.settle(group).await;
                self.stats.borrow_mut().conflicts += 1;
                return Reply::Error(settled.err().unwrap_or_else(|| ApiError::from(e)));
            }
        };
        match self
            .groups
            .borrow()
            .get(&group)
            .and_then(|g| g.state.view(id))
        {
            Some(view) => Reply::Appended {
                seq,
                last_seq: view.last_seq,
                deduped,
                archived_seq: view.archived_seq,
            },
            None => Reply::Error(ApiError::SessionNotFound),
        }
    }
}
