//! Test harness: an in-memory network and disk driving several [`RaftNode`]s in one
//! thread, deterministically from a seed, with message loss, delay (hence reordering),
//! duplication, partitions, slow persistence and crashes that lose unpersisted writes.
//! After every round it checks the Raft safety properties (Figure 3): election safety,
//! log matching, leader completeness and state-machine safety.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Body, Config, Entry, HardState, Message, NodeId, Payload, RaftNode, Ready, Restored, Role,
    SnapshotMeta, SplitMix64,
};

pub type Msg = Message<u64>;
/// Returns false to drop a message.
pub type Filter = Box<dyn FnMut(&Msg) -> bool>;

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub drop_percent: u64,
    pub duplicate_percent: u64,
    /// A message arrives 1..=delay_rounds_max rounds after it is sent.
    pub delay_rounds_max: u64,
    /// A Ready's writes become durable this many rounds after it is taken (0: at once).
    pub persist_rounds: u64,
    pub rounds_per_tick: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            drop_percent: 0,
            duplicate_percent: 0,
            delay_rounds_max: 1,
            persist_rounds: 0,
            rounds_per_tick: 4,
        }
    }
}

struct PendingWrite {
    done_at: u64,
    snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    entries: Vec<Entry<u64>>,
    hard_state: Option<HardState>,
    messages: Vec<Msg>,
}

pub struct SimNode {
    pub raft: RaftNode<u64>,
    pub up: bool,
    /// Durable: what a restart recovers.
    disk_hard_state: HardState,
    disk_snapshot: (SnapshotMeta, Vec<u8>),
    disk_log: Vec<Entry<u64>>,
    pending: Vec<PendingWrite>,
    /// The state machine: the payload of every applied index (Noop as u64::MAX).
    pub applied: Vec<u64>,
    /// Per-node persist delay override (rounds).
    pub persist_rounds: Option<u64>,
    /// Durable marker of a rebuild (like `starcite serve --rebuild`'s file): while it is
    /// set, the node restarts in catching-up mode; `Some(true)`: its term and vote were
    /// lost too. Cleared once the node is no longer catching up.
    pub rebuilding: Option<bool>,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub elections: u64,
    pub snapshots_installed: u64,
    pub truncations: u64,
    pub appends_sent: u64,
    pub messages_delivered: u64,
    /// Disks wiped and rebuilt (counted by the caller).
    pub wipes: u64,
}

pub struct Sim {
    pub nodes: BTreeMap<NodeId, SimNode>,
    pub net: NetConfig,
    pub raft_config: Config,
    seed: u64,
    rng: SplitMix64,
    pub now: u64,
    flights: Vec<(u64, u64, Msg)>,
    sequence: u64,
    /// Directed links that drop everything.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Optional filter: returns false to drop a message (tests inspect traffic with it).
    pub filter: Option<Filter>,
    pub stats: Stats,
    leaders_by_term: BTreeMap<u64, NodeId>,
    /// index → (term, payload, highest term of a node that applied it).
    committed: BTreeMap<u64, (u64, u64, u64)>,
    /// Messages sent by each node, for tests that inspect traffic.
    pub sent_log: Vec<Msg>,
    pub record_sent: bool,
}

fn encode_state(applied: &[u64]) -> Vec<u8> {
    applied.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_state(data: &[u8]) -> Vec<u64> {
    data.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn payload_value(p: &Payload<u64>) -> u64 {
    match p {
        Payload::Noop => u64::MAX,
        Payload::Data(v) => *v,
    }
}

impl Sim {
    pub fn new(n: usize, raft_config: Config, net: NetConfig, seed: u64) -> Sim {
        let ids: Vec<NodeId> = (1..=n as u64).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                let raft = RaftNode::new(raft_config.clone(), id, ids.clone(), seed, None);
                let node = SimNode {
                    raft,
                    up: true,
                    disk_hard_state: HardState::default(),
                    disk_snapshot: (SnapshotMeta::default(), Vec::new()),
                    disk_log: Vec::new(),
                    pending: Vec::new(),
                    applied: Vec::new(),
                    persist_rounds: None,
                    rebuilding: None,
                };
                (id, node)
            })
            .collect();
        Sim {
            nodes,
            net,
            raft_config,
            seed,
            rng: SplitMix64::new(seed.wrapping_mul(31).wrapping_add(7)),
            now: 0,
            flights: Vec::new(),
            sequence: 0,
            cut: BTreeSet::new(),
            filter: None,
            stats: Stats::default(),
            leaders_by_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            sent_log: Vec::new(),
            record_sent: false,
        }
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn raft(&self, id: NodeId) -> &RaftNode<u64> {
        &self.nodes[&id].raft
    }

    pub fn raft_mut(&mut self, id: NodeId) -> &mut RaftNode<u64> {
        &mut self.nodes.get_mut(&id).unwrap().raft
    }

    /// The leaders of the highest term that has one, among nodes that are up.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.up && n.raft.role() == Role::Leader)
            .max_by_key(|(_, n)| n.raft.term())
            .map(|(&id, _)| id)
    }

    pub fn isolate(&mut self, id: NodeId) {
        for other in self.ids() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Split into two sides that cannot talk to each other.
    pub fn partition(&mut self, side: &[NodeId]) {
        for a in self.ids() {
            for b in self.ids() {
                if side.contains(&a) != side.contains(&b) {
                    self.cut.insert((a, b));
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Lose everything not yet durable and every message in flight to it; stop.
    pub fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        node.up = false;
        node.pending.clear();
        self.flights.retain(|(_, _, m)| m.to != id);
    }

    /// Start again from the disk.
    pub fn restart(&mut self, id: NodeId) {
        let ids = self.ids();
        let config = self.raft_config.clone();
        let seed = self.seed ^ self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        let restored = Restored {
            hard_state: node.disk_hard_state,
            snapshot: node.disk_snapshot.0,
            entries: node.disk_log.clone(),
        };
        let raft = RaftNode::new(config, id, ids, seed, Some(restored));
        node.raft = match node.rebuilding {
            Some(lost_hard_state) => raft.catch_up(lost_hard_state),
            None => raft,
        };
        node.applied = decode_state(&node.disk_snapshot.1);
        node.up = true;
    }

    /// The node's disk is lost: it restarts from an empty log in catching-up mode,
    /// keeping its term and vote (`starcite serve --rebuild`) unless `lose_hard_state`
    /// (a data dir deleted by hand, repaired with `--rebuild --forget-votes`).
    pub fn wipe(&mut self, id: NodeId, lose_hard_state: bool) {
        self.crash(id);
        let node = self.nodes.get_mut(&id).unwrap();
        node.disk_log.clear();
        node.disk_snapshot = (SnapshotMeta::default(), Vec::new());
        node.disk_hard_state = if lose_hard_state {
            HardState::default()
        } else {
            HardState {
                commit: 0,
                ..node.disk_hard_state
            }
        };
        node.rebuilding = Some(lose_hard_state || node.rebuilding == Some(true));
        self.restart(id);
    }

    pub fn propose(&mut self, id: NodeId, value: u64) -> Result<u64, super::ProposeError> {
        let r = self.raft_mut(id).propose(value);
        self.process(id);
        r
    }

    /// Compact node `id`'s log up to `index` behind a snapshot of its state machine.
    pub fn compact(&mut self, id: NodeId, index: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        let index = index.min(node.raft.applied_index());
        if index <= node.raft.snapshot_index() {
            return;
        }
        let term = node.raft.entry_term(index).unwrap();
        let meta = SnapshotMeta { index, term };
        node.raft.compact(meta).unwrap();
        node.disk_snapshot = (meta, encode_state(&node.applied[..index as usize]));
        node.disk_log.retain(|e| e.index > index);
    }

    pub fn tick_all(&mut self) {
        for id in self.ids() {
            if self.nodes[&id].up {
                self.raft_mut(id).tick();
                self.process(id);
            }
        }
        for _ in 0..self.net.rounds_per_tick {
            self.round();
        }
        self.check_logs();
    }

    pub fn run_ticks(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.tick_all();
        }
    }

    /// Tick until `done` holds, at most `ticks_max` ticks; returns the ticks taken.
    pub fn run_until(&mut self, ticks_max: u64, mut done: impl FnMut(&Sim) -> bool) -> Option<u64> {
        for t in 0..ticks_max {
            if done(self) {
                return Some(t);
            }
            self.tick_all();
        }
        done(self).then_some(ticks_max)
    }

    /// Deliver messages and finish writes without ticking, until nothing moves.
    pub fn settle(&mut self) {
        for _ in 0..1000 {
            if self.flights.is_empty() && self.nodes.values().all(|n| n.pending.is_empty()) {
                return;
            }
            self.round();
        }
        panic!("network did not settle");
    }

    pub fn round(&mut self) {
        self.now += 1;
        let now = self.now;
        let mut due: Vec<(u64, u64, Msg)> = Vec::new();
        self.flights.retain(|f| {
            if f.0 <= now {
                due.push(f.clone());
                false
            } else {
                true
            }
        });
        due.sort_by_key(|f| (f.0, f.1));
        for (_, _, msg) in due {
            let to = msg.to;
            if !self.nodes[&to].up || self.cut.contains(&(msg.from, to)) {
                continue;
            }
            self.stats.messages_delivered += 1;
            self.raft_mut(to).step(msg);
            self.process(to);
        }
        for id in self.ids() {
            self.finish_writes(id);
        }
        self.check_round();
    }

    fn send(&mut self, msg: Msg) {
        if self.record_sent {
            self.sent_log.push(msg.clone());
        }
        if let Body::Append { .. } = msg.body {
            self.stats.appends_sent += 1;
        }
        if let Some(filter) = self.filter.as_mut() {
            if !filter(&msg) {
                return;
            }
        }
        if self.cut.contains(&(msg.from, msg.to)) || self.rng.chance(self.net.drop_percent) {
            return;
        }
        let copies = if self.rng.chance(self.net.duplicate_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + 1 + self.rng.below(self.net.delay_rounds_max);
            self.sequence += 1;
            self.flights.push((at, self.sequence, msg.clone()));
        }
    }

    /// Perform every Ready of node `id` (the shell's loop turn).
    pub fn process(&mut self, id: NodeId) {
        while self.nodes[&id].up && self.nodes[&id].raft.has_ready() {
            let ready = self.raft_mut(id).ready();
            self.perform(id, ready);
        }
        let node = self.nodes.get_mut(&id).unwrap();
        if node.up && node.rebuilding.is_some() && !node.raft.is_catching_up() {
            node.rebuilding = None;
        }
    }

    fn perform(&mut self, id: NodeId, ready: Ready<u64>) {
        if ready.soft_state.is_some_and(|s| s.role == Role::Leader) {
            self.stats.elections += 1;
        }
        for peer in ready.snapshot_requests {
            let node = self.nodes.get_mut(&id).unwrap();
            let (meta, data) = node.disk_snapshot.clone();
            if node.raft.send_snapshot(peer, meta, data).is_err() {
                node.raft.snapshot_failed(peer);
            }
        }
        for msg in ready.messages {
            self.send(msg);
        }
        self.apply(id, ready.committed_entries);
        let node = &self.nodes[&id];
        let delay = node.persist_rounds.unwrap_or(self.net.persist_rounds);
        let write = PendingWrite {
            done_at: self.now + delay,
            snapshot: ready.snapshot_to_install,
            entries: ready.entries_to_persist,
            hard_state: ready.hard_state,
            messages: ready.persisted_messages,
        };
        self.nodes.get_mut(&id).unwrap().pending.push(write);
        if delay == 0 {
            self.finish_writes(id);
        }
    }

    fn finish_writes(&mut self, id: NodeId) {
        let now = self.now;
        loop {
            let node = self.nodes.get_mut(&id).unwrap();
            if !node.up || node.pending.first().is_none_or(|w| w.done_at > now) {
                return;
            }
            let write = node.pending.remove(0);
            if let Some((meta, data)) = write.snapshot {
                node.disk_log.clear();
                node.applied = decode_state(&data);
                node.disk_snapshot = (meta, data);
                node.raft.on_persisted(meta.index, meta.term);
                self.stats.snapshots_installed += 1;
                let applied = self.nodes[&id].applied.clone();
                for (i, v) in applied.iter().enumerate() {
                    self.check_committed(id, i as u64 + 1, None, *v);
                }
            }
            let node = self.nodes.get_mut(&id).unwrap();
            if let Some(first) = write.entries.first() {
                let before = node.disk_log.len();
                node.disk_log.retain(|e| e.index < first.index);
                if node.disk_log.len() < before {
                    self.stats.truncations += 1;
                }
                let node = self.nodes.get_mut(&id).unwrap();
                let last = write.entries.last().unwrap();
                let (index, term) = (last.index, last.term);
                node.disk_log.extend(write.entries);
                node.raft.on_persisted(index, term);
            }
            let node = self.nodes.get_mut(&id).unwrap();
            if let Some(hs) = write.hard_state {
                node.disk_hard_state = hs;
            }
            for msg in write.messages {
                self.send(msg);
            }
            self.process(id);
        }
    }

    fn apply(&mut self, id: NodeId, entries: Vec<Entry<u64>>) {
        for e in entries {
            let node = self.nodes.get_mut(&id).unwrap();
            assert_eq!(
                e.index,
                node.applied.len() as u64 + 1,
                "seed {}: node {id} applies {} after {}",
                self.seed,
                e.index,
                node.applied.len()
            );
            let value = payload_value(&e.payload);
            node.applied.push(value);
            self.check_committed(id, e.index, Some(e.term), value);
        }
    }

    /// State-machine safety: every node applies the same command at each index.
    fn check_committed(&mut self, id: NodeId, index: u64, term: Option<u64>, value: u64) {
        let node_term = self.nodes[&id].raft.term();
        match self.committed.get(&index) {
            Some(&(t, v, _)) => {
                assert_eq!(
                    v, value,
                    "seed {}: state machine safety: node {id} applied {value} at {index}, another applied {v}",
                    self.seed
                );
                if let Some(term) = term {
                    assert_eq!(
                        t, term,
                        "seed {}: node {id} applied term {term} at {index}, another {t}",
                        self.seed
                    );
                }
            }
            None => {
                let term = term.unwrap_or(0);
                self.committed.insert(index, (term, value, node_term));
            }
        }
    }

    fn check_round(&mut self) {
        for (&id, node) in &self.nodes {
            let raft = &node.raft;
            if node.up && raft.role() == Role::Leader {
                let first = *self.leaders_by_term.entry(raft.term()).or_insert(id);
                assert_eq!(
                    first,
                    id,
                    "seed {}: election safety: two leaders in term {}",
                    self.seed,
                    raft.term()
                );
                // Leader completeness: entries committed in earlier terms are in its log.
                for (&index, &(term, _, seen_term)) in
                    self.committed.range(raft.snapshot_index() + 1..)
                {
                    if seen_term < raft.term() && term != 0 {
                        assert_eq!(
                            raft.entry_term(index),
                            Some(term),
                            "seed {}: leader completeness: leader {id} of term {} lacks committed {index}",
                            self.seed,
                            raft.term()
                        );
                    }
                }
            }
            assert!(
                raft.commit_index() <= raft.last_index(),
                "seed {}: commit beyond log",
                self.seed
            );
        }
    }

    /// Log matching: if two logs hold an entry with the same index and term, they are
    /// identical up to it.
    pub fn check_logs(&self) {
        let nodes: Vec<&SimNode> = self.nodes.values().collect();
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                let (a, b) = (&a.raft, &b.raft);
                let low = a.snapshot_index().max(b.snapshot_index()) + 1;
                let high = a.last_index().min(b.last_index());
                let Some(top) = (low..=high)
                    .rev()
                    .find(|&k| a.entry_term(k) == b.entry_term(k))
                else {
                    continue;
                };
                for k in low..=top {
                    let ea = &a.log_entries()[(k - a.snapshot_index() - 1) as usize];
                    let eb = &b.log_entries()[(k - b.snapshot_index() - 1) as usize];
                    assert_eq!(
                        ea,
                        eb,
                        "seed {}: log matching broken at {k} below {top} ({} vs {})",
                        self.seed,
                        a.id(),
                        b.id()
                    );
                }
            }
        }
    }

    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (id, n) in &self.nodes {
            let r = &n.raft;
            out.push_str(&format!(
                "\nnode {id} up {} {:?} term {} leader {:?} commit {} persisted {} last {} snap {} applied {} pending {} rebuilding {:?} catch_up {:?} progress {:?}",
                n.up,
                r.role(),
                r.term(),
                r.leader(),
                r.commit_index(),
                r.persisted_index(),
                r.last_index(),
                r.snapshot_index(),
                n.applied.len(),
                n.pending.len(),
                n.rebuilding,
                r.catch_up,
                r.progress,
            ));
        }
        out
    }

    /// Every live node applied the same prefix, up to the longest.
    pub fn applied_agree(&self) -> bool {
        let lens: BTreeSet<usize> = self
            .nodes
            .values()
            .filter(|n| n.up)
            .map(|n| n.applied.len())
            .collect();
        lens.len() == 1
    }
}
