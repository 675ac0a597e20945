//! What the shard reports: `/metrics` and `/health/ready` counters, `/debug/groups`,
//! and whether it is idle (shutdown).

use std::time::Duration;

use super::ShardCore;
use crate::metrics::ShardStats;

/// `/health/ready` reports a group without a leader for this long (API.md: 3 s).
const LEADERLESS_AFTER: Duration = Duration::from_secs(3);

impl ShardCore {
    /// `GET /debug/groups/:g`: this replica's view of one group, for tests that compare
    /// replicas directly (served locally, never forwarded).
    pub(super) fn debug_group(&self, group: u16) -> String {
        let groups = self.groups.borrow();
        let Some(g) = groups.get(&group) else {
            return serde_json::json!({
                "group": group,
                "shard": self.index,
                "role": "none",
                "voters": shards::voters_of(group, &self.members),
            })
            .to_string();
        };
        let mut sessions = serde_json::Map::new();
        for view in g.state.views() {
            sessions.insert(view.id.clone(), view.last_seq.into());
        }
        let role = match g.raft.role() {
            shards::raft::Role::Leader => "leader",
            shards::raft::Role::Follower => "follower",
            shards::raft::Role::Candidate => "candidate",
            shards::raft::Role::PreCandidate => "precandidate",
        };
        serde_json::json!({
            "group": group,
            "shard": self.index,
            "node": self.node_id,
            "role": role,
            "term": g.raft.term(),
            "leader": g.raft.leader(),
            "voters": g.raft.voters(),
            "commit_index": g.raft.commit_index(),
            "applied_index": g.applied,
            "last_index": g.raft.last_index(),
            "snapshot_index": g.raft.snapshot_index(),
            "catching_up": g.raft.is_catching_up(),
            "checksum": format!("{:016x}", g.checksum),
            "sessions": sessions,
        })
        .to_string()
    }

    /// Groups with a replica here that have had no leader for `LEADERLESS_AFTER` (or
    /// never had one since start).
    fn groups_without_leader(&self) -> Vec<u16> {
        let ticks = LEADERLESS_AFTER.as_nanos() / self.raft_settings.tick.as_nanos().max(1);
        let mut out: Vec<u16> = self
            .groups
            .borrow()
            .iter()
            .filter(|(_, g)| u128::from(g.ticks_without_leader()) >= ticks.max(1))
            .map(|(&id, _)| id)
            .collect();
        out.sort_unstable();
        out
    }

    pub(super) fn stats_snapshot(&self) -> ShardStats {
        let mut stats = self.stats.borrow().clone();
        let store = self.store.borrow();
        stats.hot_bytes = store.hot_bytes() as u64;
        stats.hot_evictions = store.evicted_events;
        let groups = self.groups.borrow();
        stats.sessions = groups
            .values()
            .map(|g| g.state.views().count() as u64)
            .sum();
        stats.dedupe_evictions = groups.values().map(|g| g.state.evictions()).sum();
        stats.commit_index_sum = groups.values().map(|g| g.applied).sum();
        stats.groups_leading = groups.values().filter(|g| g.leading).count() as u64;
        stats.groups_without_leader = groups
            .values()
            .filter(|g| g.raft.leader().is_none())
            .count() as u64;
        drop(groups);
        stats.leaderless = self.groups_without_leader();
        (stats.refused_by, stats.peers_refused) = self.refusals();
        stats.groups_catching_up = self
            .groups
            .borrow()
            .values()
            .filter(|g| g.raft.is_catching_up())
            .count() as u64;
        stats.log_disk_bytes = self.space.files_bytes();
        stats.storage_full = self
            .space
            .full()
            .map(|reason| crate::metrics::StorageFull {
                shard: self.index,
                reason,
                log_blocked: self.log.borrow().blocked,
            })
            .into_iter()
            .collect();
        stats.archive = self.archive_stats();
        stats.archiver = self.archive.as_ref().map(|feed| feed.stats().clone());
        stats.damage = self.damage.borrow().stats();
        stats.repaired_events = self.store.borrow().repaired_count() as u64;
        stats
    }

    /// True when nothing is queued or being written, and every group this node leads
    /// has committed all of its entries.
    pub fn idle(&self) -> bool {
        self.queue.borrow().is_empty()
            && self
                .groups
                .borrow()
                .values()
                .all(|g| !g.leading || g.raft.commit_index() == g.raft.last_index())
    }
}
