//! Handing leadership away: every group on graceful shutdown, and the groups of a
//! shard whose storage is full (Raft's leadership transfer). The groups a damaged
//! replica must not lead are handed over by `damage`.

use std::time::{Duration, Instant};

use super::ShardCore;

/// How often a shard whose storage is full hands its groups' leadership away again
/// (a group may come back to it through an election meanwhile).
const HANDOFF_PERIOD: Duration = Duration::from_secs(10);

/// When a shard whose storage is full hands its groups away again, and whose turn it
/// is among each group's other voters. Owned by the committer task, which runs the
/// storage retries.
#[derive(Default)]
pub(super) struct Handoff {
    at: Option<Instant>,
    turn: usize,
}

impl ShardCore {
    /// The groups this replica leads now (a copy: callers await between groups).
    pub(super) fn leading_groups(&self) -> Vec<u16> {
        let groups = self.groups.borrow();
        groups
            .iter()
            .filter(|(_, g)| g.leading)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Graceful shutdown: hands each group this node leads to another voter, and waits
    /// (bounded) until it leads none.
    pub async fn transfer_leadership(&self, limit: Duration) {
        let ids = self.group_ids();
        for &group in &ids {
            {
                let mut groups = self.groups.borrow_mut();
                let g = groups.get_mut(&group).expect("listed");
                if !g.leading {
                    continue;
                }
                let Some(&to) = g.raft.voters().iter().find(|&&v| v != self.node_id) else {
                    continue;
                };
                let _ = g.raft.transfer_leader(to);
            }
            self.process(group);
        }
        self.flush_outbox();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline
            && self
                .groups
                .borrow()
                .values()
                .any(|g| g.leading && g.raft.voters().len() > 1)
        {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A leader whose storage is full cannot take client writes: it hands each group it
    /// leads to another voter (turn by turn, so a dead voter is not asked forever). Raft
    /// brings the target up to date first and abandons the transfer after an election
    /// timeout if it does not answer.
    pub(super) fn hand_off_leadership(&self, handoff: &mut Handoff, now: Instant) {
        if handoff.at.is_some_and(|at| now < at) {
            return;
        }
        handoff.at = Some(now + HANDOFF_PERIOD);
        let turn = handoff.turn;
        handoff.turn = turn.wrapping_add(1);
        let mut handed = 0usize;
        for group in self.group_ids() {
            {
                let mut groups = self.groups.borrow_mut();
                let Some(g) = groups.get_mut(&group) else {
                    continue;
                };
                if !g.leading {
                    continue;
                }
                let others: Vec<u64> = g
                    .raft
                    .voters()
                    .iter()
                    .copied()
                    .filter(|&v| v != self.node_id)
                    .collect();
                if others.is_empty() {
                    continue;
                }
                let to = others[(turn + usize::from(group)) % others.len()];
                if g.raft.transfer_leader(to).is_ok() {
                    handed += 1;
                }
            }
            self.process(group);
        }
        self.flush_outbox();
        if handed > 0 {
            tracing::warn!(
                shard = self.index,
                groups = handed,
                "storage full: handing the leadership of this node's groups to other voters"
            );
        }
    }
}
