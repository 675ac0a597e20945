//! The checker: Raft safety after every round (election safety, log matching, leader
//! completeness, state-machine safety as entries commit), and the history at the end
//! (no acknowledged append lost, seqs contiguous, no idempotency key twice within the
//! dedupe window, replicas identical).

use std::collections::{BTreeMap, HashMap};

use shards::entry::{Command, Digest};
use shards::raft::{Entry, NodeId, Payload, Role};
use shards::session::{GroupState, Limits};

use super::cluster::Cluster;

#[derive(Debug, Clone)]
pub struct Ack {
    pub group: u16,
    pub session: String,
    pub key: Option<String>,
    pub digest: Digest,
    pub seq: u64,
    pub tick: u64,
    pub after_heal: bool,
}

#[derive(Default)]
struct SessionHistory {
    /// (digest, key) of seq i at [i - 1].
    events: Vec<(Digest, Option<String>)>,
    /// Idempotency key → (seq, position among keyed appends).
    keys: HashMap<String, (u64, u64)>,
    keyed: u64,
}

#[derive(Default)]
struct GroupHistory {
    leaders_by_term: BTreeMap<u64, NodeId>,
    /// Entry i at [i - 1]: (term, payload, highest term of a node that committed it when
    /// it was first seen committed).
    committed: Vec<(u64, Payload<Command>, u64)>,
    sessions: HashMap<String, SessionHistory>,
    acks_by_tick: Vec<u64>,
}

pub struct Checker {
    seed: u64,
    groups: BTreeMap<u16, GroupHistory>,
    acks: Vec<Ack>,
    limits: Limits,
}

impl Checker {
    pub fn new(seed: u64) -> Checker {
        Checker {
            seed,
            groups: BTreeMap::new(),
            acks: Vec::new(),
            limits: Limits::default(),
        }
    }

    pub fn committed_len(&self, g: u16) -> u64 {
        self.groups.get(&g).map_or(0, |h| h.committed.len() as u64)
    }

    /// Acknowledgements in group `g` at or after `tick`.
    pub fn acks_after(&self, g: u16, tick: u64) -> usize {
        self.groups
            .get(&g)
            .map_or(0, |h| h.acks_by_tick.iter().filter(|&&t| t >= tick).count())
    }

    /// State-machine safety: every node commits the same entry at each index; the
    /// session rules hold for the history as it is first committed.
    pub fn on_commit(
        &mut self,
        g: u16,
        node: NodeId,
        e: &Entry<Command>,
        node_term: u64,
        _tick: u64,
    ) -> Result<(), String> {
        let h = self.groups.entry(g).or_default();
        let len = h.committed.len() as u64;
        if e.index <= len {
            let (term, payload, seen) = &mut h.committed[(e.index - 1) as usize];
            if *term != e.term || *payload != e.payload {
                return Err(format!(
                    "state machine safety: node {node} commits at {} of group {g} term {} ({}), others committed term {term} ({})",
                    e.index,
                    e.term,
                    describe(&e.payload),
                    describe(payload)
                ));
            }
            *seen = (*seen).min(node_term);
            return Ok(());
        }
        if e.index != len + 1 {
            return Err(format!(
                "node {node} commits {} of group {g}, but only {len} were committed before",
                e.index
            ));
        }
        if let Payload::Data(cmd) = &e.payload {
            match cmd {
                Command::CreateSession(c) => {
                    if h.sessions.contains_key(&c.session_id) {
                        return Err(format!(
                            "session {} created twice (index {})",
                            c.session_id, e.index
                        ));
                    }
                    h.sessions
                        .insert(c.session_id.clone(), SessionHistory::default());
                }
                Command::Append(a) => {
                    let s = h.sessions.get_mut(&a.session_id).ok_or_else(|| {
                        format!("append to unknown session {} at {}", a.session_id, e.index)
                    })?;
                    if a.seq != s.events.len() as u64 + 1 {
                        return Err(format!(
                            "seqs not contiguous: session {} commits seq {} after {}",
                            a.session_id,
                            a.seq,
                            s.events.len()
                        ));
                    }
                    if let Some(key) = &a.idempotency_key {
                        if let Some(&(seq, position)) = s.keys.get(key) {
                            if s.keyed - position <= self.limits.dedupe_keys_max as u64 {
                                return Err(format!(
                                    "idempotency key {key:?} committed twice in session {} (seqs {seq} and {}) within the dedupe window",
                                    a.session_id, a.seq
                                ));
                            }
                        }
                        s.keyed += 1;
                        s.keys.insert(key.clone(), (a.seq, s.keyed));
                    }
                    s.events.push((a.digest, a.idempotency_key.clone()));
                }
                _ => {}
            }
        }
        h.committed.push((e.term, e.payload.clone(), node_term));
        Ok(())
    }

    /// A snapshot a follower received agrees with the committed history up to it.
    pub fn check_snapshot(
        &self,
        g: u16,
        index: u64,
        gs: &GroupState,
        _limits: Limits,
    ) -> Result<(), String> {
        let Some(h) = self.groups.get(&g) else {
            return Err(format!("group {g}: snapshot at {index} before any commit"));
        };
        if index > h.committed.len() as u64 {
            return Err(format!(
                "group {g}: snapshot at {index} beyond the committed history ({})",
                h.committed.len()
            ));
        }
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (_, p, _) in &h.committed[..index as usize] {
            match p {
                Payload::Data(Command::CreateSession(c)) => {
                    last.insert(&c.session_id, 0);
                }
                Payload::Data(Command::Append(a)) => {
                    last.insert(&a.session_id, a.seq);
                }
                _ => {}
            }
        }
        let views: HashMap<&str, u64> = gs.views().map(|v| (v.id.as_str(), v.last_seq)).collect();
        if views != last {
            return Err(format!(
                "group {g}: snapshot at {index} holds {views:?}, the history {last:?}"
            ));
        }
        Ok(())
    }

    pub fn on_ack(&mut self, ack: Ack) -> Result<(), String> {
        let h = self.groups.entry(ack.group).or_default();
        h.acks_by_tick.push(ack.tick);
        // An ack is sent only after commit: it must already be in the history, with the
        // content and idempotency key of the request it answers (a reply that reached
        // another request's client names another event).
        let s = h.sessions.get(&ack.session);
        let event = s.and_then(|s| s.events.get((ack.seq as usize).wrapping_sub(1)));
        match event {
            Some((digest, key)) if *digest == ack.digest && *key == ack.key => {}
            other => {
                return Err(format!(
                    "acknowledged append (session {}, key {:?}, seq {}) is not committed with that content: {:?}",
                    ack.session,
                    ack.key,
                    ack.seq,
                    other.map(|(_, k)| k)
                ))
            }
        }
        self.acks.push(ack);
        Ok(())
    }

    /// After every round: election safety, commit within the log, the shell's log copy.
    pub fn check_round(&mut self, c: &Cluster) -> Result<(), String> {
        for &g in &c.params.groups {
            for &v in c.voters_of(g) {
                if !c.is_up(v) {
                    continue;
                }
                let r = &c.node(v).replicas[&g].raft;
                if r.role() == Role::Leader {
                    let h = self.groups.entry(g).or_default();
                    let first = *h.leaders_by_term.entry(r.term()).or_insert(v);
                    if first != v {
                        return Err(format!(
                            "election safety: group {g} has leaders {first} and {v} in term {}",
                            r.term()
                        ));
                    }
                }
                if r.commit_index() > r.last_index() {
                    return Err(format!("node {v} group {g}: commit beyond its log"));
                }
            }
        }
        Ok(())
    }

    /// After every tick: log matching and leader completeness.
    pub fn check_step(&mut self, c: &Cluster) -> Result<(), String> {
        self.check_round(c)?;
        for &g in &c.params.groups {
            let voters: Vec<NodeId> = c
                .voters_of(g)
                .iter()
                .copied()
                .filter(|&v| c.is_up(v))
                .collect();
            for &v in &voters {
                let rep = &c.node(v).replicas[&g];
                let r = &rep.raft;
                // The shell's copy of the log is the node's log.
                if rep.shadow_snap.index + rep.shadow.len() as u64 != r.last_index() {
                    return Err(format!(
                        "node {v} group {g}: shell log ends at {}, raft at {}",
                        rep.shadow_snap.index + rep.shadow.len() as u64,
                        r.last_index()
                    ));
                }
                if r.role() != Role::Leader {
                    continue;
                }
                // Leader completeness: what was committed before this term is in its log.
                let Some(h) = self.groups.get(&g) else {
                    continue;
                };
                let from = r.snapshot_index() + 1;
                for index in from..=h.committed.len() as u64 {
                    let (term, _, seen) = &h.committed[(index - 1) as usize];
                    if *seen < r.term() && r.entry_term(index) != Some(*term) {
                        return Err(format!(
                            "leader completeness: leader {v} of group {g} in term {} lacks committed entry {index} (term {term})",
                            r.term()
                        ));
                    }
                }
            }
            // Log matching: same (index, term) → identical logs up to there.
            for (i, &a) in voters.iter().enumerate() {
                for &b in &voters[i + 1..] {
                    let ra = &c.node(a).replicas[&g];
                    let rb = &c.node(b).replicas[&g];
                    let low = ra.shadow_snap.index.max(rb.shadow_snap.index) + 1;
                    let high = ra.raft.last_index().min(rb.raft.last_index());
                    if low > high {
                        continue;
                    }
                    let Some(top) = (low..=high)
                        .rev()
                        .find(|&k| ra.raft.entry_term(k) == rb.raft.entry_term(k))
                    else {
                        continue;
                    };
                    for k in low..=top {
                        if ra.shadow_entry(k) != rb.shadow_entry(k) {
                            return Err(format!(
                                "log matching: nodes {a} and {b} of group {g} agree at {top} but differ at {k}"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// At the end: every acknowledged append is in the history at its seq, once.
    pub fn final_check(&self) -> Result<(), String> {
        for ack in &self.acks {
            let h = &self.groups[&ack.group];
            let s = h
                .sessions
                .get(&ack.session)
                .ok_or_else(|| format!("acknowledged append to lost session {}", ack.session))?;
            match s.events.get(ack.seq as usize - 1) {
                Some((digest, key)) if *digest == ack.digest && *key == ack.key => {}
                _ => {
                    return Err(format!(
                        "acknowledged append lost: session {} seq {} key {:?}",
                        ack.session, ack.seq, ack.key
                    ))
                }
            }
            let copies = s.events.iter().filter(|(d, _)| *d == ack.digest).count();
            if copies != 1 {
                return Err(format!(
                    "acknowledged append (session {} key {:?}) committed {copies} times",
                    ack.session, ack.key
                ));
            }
        }
        Ok(())
    }
}

fn describe(p: &Payload<Command>) -> String {
    match p {
        Payload::Noop => "noop".to_string(),
        Payload::Data(Command::Append(a)) => {
            format!(
                "append {} seq {} key {:?}",
                a.session_id, a.seq, a.idempotency_key
            )
        }
        Payload::Data(Command::CreateSession(c)) => format!("create {}", c.session_id),
        Payload::Data(other) => format!("{other:?}"),
    }
}
