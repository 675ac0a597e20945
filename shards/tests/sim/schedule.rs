//! The random fault schedule: crashes and restarts, crash loops (a process that dies
//! again within a few ticks of every start, with requests it forwarded still in
//! flight), symmetric and asymmetric
//! partitions, changes of the loss rate, and Figure-8 style patterns (Raft paper §5.4.2:
//! a leader is cut off with entries only it holds, another leader comes and goes, the
//! first returns and replicates its old-term entries to a majority before anything of
//! its new term).

use shards::raft::NodeId;

use super::cluster::Cluster;
use super::Rng;

enum Pending {
    Restart {
        at: u64,
        node: NodeId,
    },
    Heal {
        at: u64,
    },
    /// A crash loop: crash `node` again (if it is up), `left` more times after this.
    Crash {
        at: u64,
        node: NodeId,
        left: u64,
    },
    /// Figure 8, second half: crash whoever leads `group` now, let the old leader back.
    Figure8Crash {
        at: u64,
        group: u16,
        old: NodeId,
    },
}

/// The scripted Figure 8 (3 voters L, N, M of one group):
/// 1. isolate the leader L (term t): clients keep sending to it, so it appends entries
///    of term t that only it holds;
/// 2. the next leader N (term t+1) is isolated the moment it is elected, so its no-op
///    (and anything after) stays on N;
/// 3. L rejoins M alone, is elected (term t+2) and replicates its term-t entries to M;
///    a few rounds after its election L crashes (or, the other half of the time, L is
///    cut off the moment it commits something: messages still in flight from it are
///    dropped), possibly before its term-t+2 no-op reached M;
/// 4. N rejoins: its last term t+1 beats M's t, so it can win and overwrite the term-t
///    entries. Correct Raft never committed them (§5.4.2); a leader that counts
///    replicas of an earlier-term entry did.
enum Script {
    Idle,
    WaitElected { g: u16, l: NodeId, until: u64 },
    WaitCrash { n: NodeId, l: NodeId, until: u64 },
}

pub struct Schedule {
    rng: Rng,
    script: Script,
    pending: Vec<Pending>,
    /// Per-mille chances per tick.
    crash: u64,
    partition: u64,
    figure8: u64,
    rebuild: u64,
    crash_loop: u64,
}

impl Schedule {
    pub fn new(c: &mut Cluster) -> Schedule {
        let mut rng = Rng::new(c.seed ^ 0x5C4E_D01E);
        let crash = rng.range(5, 25);
        let partition = rng.range(5, 25);
        let figure8 = rng.range(5, 30);
        let rebuild = rng.range(1, 6);
        let crash_loop = rng.range(3, 12);
        Schedule {
            rng,
            script: Script::Idle,
            pending: Vec::new(),
            crash,
            partition,
            figure8,
            rebuild,
            crash_loop,
        }
    }

    pub fn step(&mut self, c: &mut Cluster) {
        let now = c.tick;
        let due: Vec<Pending> = {
            let (due, rest): (Vec<Pending>, Vec<Pending>) =
                self.pending.drain(..).partition(|p| match p {
                    Pending::Restart { at, .. }
                    | Pending::Heal { at }
                    | Pending::Crash { at, .. }
                    | Pending::Figure8Crash { at, .. } => *at <= now,
                });
            self.pending = rest;
            due
        };
        for p in due {
            match p {
                Pending::Restart { node, .. } => c.restart(node),
                Pending::Crash { node, left, .. } => {
                    if c.is_up(node) {
                        self.bounce(c, node, left);
                    }
                }
                Pending::Heal { .. } => {
                    c.note(|| "heal partitions".to_string());
                    c.cut.clear();
                }
                Pending::Figure8Crash { group, old, .. } => {
                    c.cut.clear();
                    if let Some(l) = c.leader_of(group) {
                        if l != old {
                            c.crash(l);
                            let at = now + self.rng.range(5, 30);
                            self.pending.push(Pending::Restart { at, node: l });
                        }
                    }
                    // Isolate the rest briefly so the old leader's entries spread first.
                    let at = now + self.rng.range(1, 6);
                    self.pending.push(Pending::Heal { at });
                }
            }
        }
        self.script_step(c);
        if !matches!(self.script, Script::Idle) {
            return; // no random faults while the script runs
        }
        let n = c.params.nodes as u64;
        if self.rng.chance_mille(self.crash) {
            let id = 1 + self.rng.below(n);
            if c.is_up(id) {
                c.crash(id);
                let at = now + self.rng.range(1, 40);
                self.pending.push(Pending::Restart { at, node: id });
            }
        }
        if self.rng.chance_mille(self.crash_loop) {
            let id = 1 + self.rng.below(n);
            if c.is_up(id) {
                c.cov.crash_loops += 1;
                let left = self.rng.range(2, 5);
                self.bounce(c, id, left);
            }
        }
        if self.rng.chance_mille(self.partition) {
            c.cov.partitions += 1;
            match self.rng.below(3) {
                0 => {
                    let id = 1 + self.rng.below(n);
                    c.note(|| format!("isolate node {id}"));
                    c.isolate(id);
                }
                1 => {
                    // Symmetric split into two sides.
                    let side: Vec<NodeId> = (1..=n).filter(|_| self.rng.chance(50)).collect();
                    c.note(|| format!("partition {side:?} from the rest"));
                    for a in 1..=n {
                        for b in 1..=n {
                            if side.contains(&a) != side.contains(&b) {
                                c.cut.insert((a, b));
                            }
                        }
                    }
                }
                _ => {
                    // Asymmetric: one direction of a few links.
                    for _ in 0..self.rng.range(1, 3) {
                        let a = 1 + self.rng.below(n);
                        let b = 1 + self.rng.below(n);
                        if a != b {
                            c.note(|| format!("cut link {a} -> {b}"));
                            c.cut.insert((a, b));
                        }
                    }
                }
            }
            let at = now + self.rng.range(3, 60);
            self.pending.push(Pending::Heal { at });
        }
        if self.rng.chance_mille(self.figure8) {
            let g = c.params.groups[self.rng.below(c.params.groups.len() as u64) as usize];
            if let Some(l) = c.leader_of(g) {
                c.cov.figure8 += 1;
                c.note(|| format!("figure 8 script: isolate leader {l} of group {g}"));
                c.cut.clear();
                c.isolate(l);
                c.point_clients(g, l);
                c.fig8_isolate_next = Some((g, l));
                c.fig8_elected = None;
                self.script = Script::WaitElected {
                    g,
                    l,
                    until: now + 80,
                };
                return;
            }
        }
        if self.rng.chance_mille(self.figure8) {
            let g = c.params.groups[self.rng.below(c.params.groups.len() as u64) as usize];
            if let Some(l) = c.leader_of(g) {
                // First half: the leader keeps taking proposals that only it holds.
                c.cov.figure8 += 1;
                c.note(|| format!("figure 8: isolate leader {l} of group {g}"));
                c.isolate(l);
                let at = now + self.rng.range(2, 25);
                self.pending.push(Pending::Figure8Crash {
                    at,
                    group: g,
                    old: l,
                });
            }
        }
        if self.rng.chance_mille(10) {
            c.loss_percent = self.rng.range(0, 30);
        }
        // A lost data dir, rebuilt with (or, a third of the time, without) its term and
        // vote. One node at a time: two members catching up at once leave a 3-voter
        // group without a quorum until one of them is done.
        if self.rng.chance_mille(self.rebuild) && c.rebuilding_nodes() == 0 {
            let id = 1 + self.rng.below(n);
            let lose_hard_state = self.rng.chance(33);
            if c.is_up(id) {
                c.wipe(id, lose_hard_state);
            }
        }
    }

    /// One turn of a crash loop: the node dies now and its supervisor starts it again
    /// the next tick; `left` more times, it dies again within a few ticks of that
    /// start (its forwarded requests then number from 1 again while replies to its
    /// previous process's may still arrive).
    fn bounce(&mut self, c: &mut Cluster, id: NodeId, left: u64) {
        let now = c.tick;
        c.crash(id);
        let start = now + 1;
        self.pending.push(Pending::Restart {
            at: start,
            node: id,
        });
        if left > 0 {
            let at = start + self.rng.range(1, 4);
            self.pending.push(Pending::Crash {
                at,
                node: id,
                left: left - 1,
            });
        }
    }

    fn script_step(&mut self, c: &mut Cluster) {
        let now = c.tick;
        match self.script {
            Script::Idle => {}
            Script::WaitElected { g, l, until } => {
                if let Some(n) = c.fig8_elected.take() {
                    // 3. L rejoins the third node; N stays cut off.
                    c.cut.clear();
                    c.isolate(n);
                    c.fig8_crashed = false;
                    let k = self.rng.range(1, 16);
                    c.fig8_crash_next = Some((g, l, k));
                    self.script = Script::WaitCrash {
                        n,
                        l,
                        until: now + 80,
                    };
                } else if now >= until {
                    c.fig8_isolate_next = None;
                    c.cut.clear();
                    self.script = Script::Idle;
                }
            }
            Script::WaitCrash { n, l, until } => {
                if c.fig8_crashed || now >= until {
                    // 4. N rejoins; L comes back later.
                    c.fig8_crash_next = None;
                    c.fig8_cut_on_commit = None;
                    c.cut.clear();
                    if c.is_up(l) {
                        // L was cut off as it committed: keep it away while N campaigns.
                        c.isolate(l);
                        let at = now + self.rng.range(15, 40);
                        self.pending.push(Pending::Heal { at });
                    }
                    c.note(|| format!("figure 8: {n} rejoins"));
                    if !c.is_up(l) {
                        let at = now + self.rng.range(15, 40);
                        self.pending.push(Pending::Restart { at, node: l });
                    }
                    self.script = Script::Idle;
                }
            }
        }
    }
}
