//! The simulated cluster: nodes, their shell, network, disk and clients.
//!
//! Every replica is the server's own `shards::replica::Replica`: this file is only
//! the shell around it (what `src/shard/` is in the server). It sends what the replica
//! sends (over a lossy, reordering, duplicating network), queues its writes on the
//! shard's disk (all groups of a shard share one write queue, completed in order by one
//! "fsync"), reports them durable, answers `snapshot_for` with the last compaction
//! snapshot, and turns released waiters into client replies. Leaders decide client
//! requests with `GroupState::decide_*` and `Replica::propose`, and answer a client
//! only when the replica releases its waiter (an acknowledgement = committed).
//!
//! A node that does not lead a client's group forwards the request to the node it
//! believes leads, as the server's shard does: the op is encoded with the server's codec
//! (`shards::forward`), sent in a `PeerFrame::Request` over the fake network (one
//! connection per node pair and shard, replaced when a frame is lost or either end
//! restarts), and its reply completes the waiting request only as
//! `shards::forwarding::Forwards` decides (same process incarnation, node, connection
//! and body crc); anything else is dropped as stale.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use shards::codec::record_crc;
use shards::entry::{Command, LogRecord, MetaRecord};
use shards::forward::{decode_op, decode_reply, encode_op, encode_reply};
use shards::forwarding::{self, Forwards, ReplyMatch};
use shards::ops::{ApiError, Op};
use shards::peer::{self, PeerFrame, RequestId};
use shards::raft::{
    Body, Config, Entry, HardState, Message, NodeId, Payload, PlantedBugs, RaftNode, Restored,
    Role, SnapshotMeta,
};
use shards::replay::{self, Replay, Replayed};
use shards::replica::{self, Durable, Persisted, RecordLocation, Recovered, Shell, Stop, Write};
use shards::session::{AppendDecision, AppendError, CreateError, GroupState, Limits};
use shards::snapshot::{GroupSnapshot, GroupTransfer, SnapshotEntry};
use shards::validate::{self, NewSession};

use super::check::{Ack, Checker};
use super::schedule::Schedule;
use super::{Rng, TraceHash};

/// Deliberate bugs the checker must catch (all off in normal runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// Raft knob: a leader commits an entry of an earlier term by counting replicas.
    pub previous_term_commit: bool,
    /// Replica bug: a write counts as durable (on_persisted, votes and acks sent) as
    /// soon as it is issued, while the disk still loses it on a crash.
    pub ack_before_persist: bool,
    /// Replica bug: a node that becomes leader rebuilds its session state from a
    /// snapshot without the dedupe windows (idempotency keys forgotten after failover).
    pub forgotten_dedupe: bool,
    /// Replica bug: a snapshot from the leader that does not decode is acknowledged as
    /// installed (the old state kept) instead of stopping the replica.
    pub ack_bad_snapshot: bool,
    /// Raft knob: a rebuilt node (wiped data dir) votes while it is catching up, so it
    /// can help elect a leader that lacks entries only it had acknowledged.
    pub vote_while_catching_up: bool,
    /// Replay bug: a restart keeps an entry its log rewrote (the §5.3 truncation
    /// skipped), so the restarted replica holds entries its leader replaced.
    pub skip_truncation_on_replay: bool,
    /// Replay bug: a restart applies the committed entries of its log to the state
    /// without moving the applied index, so each is applied again when Raft commits it
    /// (a leader's entry applied twice).
    pub apply_twice_on_replay: bool,
    /// Forwarding bug: a reply completes the waiting forwarded request with the same
    /// counter, whatever process incarnation, connection or body it answers.
    pub another_requests_reply: bool,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub bugs: Bugs,
    /// Number of Raft groups; `None`: 2 to 4, chosen by the seed.
    pub groups: Option<usize>,
    /// Ticks with faults, before healing.
    pub fault_ticks: u64,
    /// After healing, every group must commit a new client append and all replicas
    /// must converge within this many ticks.
    pub heal_ticks: u64,
    /// Keep a readable event log (printed for a failing seed).
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bugs: Bugs::default(),
            groups: None,
            fault_ticks: 300,
            heal_ticks: 300,
            verbose: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub elections: u64,
    pub leader_losses: u64,
    pub truncations: u64,
    pub snapshot_installs: u64,
    pub compactions: u64,
    pub crashes: u64,
    pub torn_tails: u64,
    pub partitions: u64,
    pub figure8: u64,
    pub dedupe_hits: u64,
    pub retries: u64,
    pub acks: u64,
    pub expected_seq_conflicts: u64,
    pub messages: u64,
    pub commits: u64,
    /// Disks wiped and rebuilt (`starcite serve --rebuild`, with or without the term
    /// and vote).
    pub rebuilds: u64,
    /// Snapshots damaged on their way (content changed, frame crc intact).
    pub snapshots_corrupted: u64,
    /// Replicas that stopped (fail-stop) on a snapshot that does not decode.
    pub fail_stops: u64,
    /// Crash loops started (a node dying again within a few ticks of each start).
    pub crash_loops: u64,
    /// Client requests a non-leader sent on to the node it believes leads.
    pub forwards: u64,
    /// Forwarded requests given up (deadline, new leader, connection replaced).
    pub forwards_abandoned: u64,
    /// Append acknowledgements a forwarding node passed on to its client.
    pub forwarded_acks: u64,
    /// Replies to forwarded requests that answered no waiting request (late, on an
    /// old connection, or meant for the node's previous process) and were dropped.
    pub stale_replies_dropped: u64,
    /// Of those, replies meant for an earlier process of the node (it restarted with
    /// the request in flight).
    pub stale_earlier_process: u64,
}

impl Coverage {
    pub fn add(&mut self, o: &Coverage) {
        self.elections += o.elections;
        self.leader_losses += o.leader_losses;
        self.truncations += o.truncations;
        self.snapshot_installs += o.snapshot_installs;
        self.compactions += o.compactions;
        self.crashes += o.crashes;
        self.torn_tails += o.torn_tails;
        self.partitions += o.partitions;
        self.figure8 += o.figure8;
        self.dedupe_hits += o.dedupe_hits;
        self.retries += o.retries;
        self.acks += o.acks;
        self.expected_seq_conflicts += o.expected_seq_conflicts;
        self.messages += o.messages;
        self.commits += o.commits;
        self.rebuilds += o.rebuilds;
        self.snapshots_corrupted += o.snapshots_corrupted;
        self.fail_stops += o.fail_stops;
        self.crash_loops += o.crash_loops;
        self.forwards += o.forwards;
        self.forwards_abandoned += o.forwards_abandoned;
        self.forwarded_acks += o.forwarded_acks;
        self.stale_replies_dropped += o.stale_replies_dropped;
        self.stale_earlier_process += o.stale_earlier_process;
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub coverage: Coverage,
    pub trace_hash: u64,
    /// The parameters the seed chose.
    pub params: String,
    pub ticks: u64,
}

/// What the seed chose for this run.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub shards: usize,
    pub groups: Vec<u16>,
    pub loss_percent: u64,
    pub duplicate_percent: u64,
    pub delay_rounds_max: u64,
    pub persist_rounds_max: u64,
    /// Snapshots sent with one byte of their content changed (a fault the transport's
    /// crc does not see: memory, the leader's disk).
    pub corrupt_snapshot_percent: u64,
    pub rounds_per_tick: u64,
    pub compact_after: u64,
    pub client_timeout_ticks: u64,
    pub request_percent: u64,
    /// Non-leaders forward client requests to the leader they know (the server's way);
    /// otherwise they answer `NotLeader` with the hint.
    pub forwarding: bool,
    pub raft: Config,
}

/// What one group stored: as the server's shard does, its part of the last snapshot,
/// then the log records written since, in log order. A restart replays them with the
/// server's own rules (`shards::replay`).
#[derive(Default)]
struct GroupDisk {
    snapshot: Option<GroupSnapshot>,
    /// Each record with the crc32 of its encoding.
    records: Vec<(LogRecord, u32)>,
}

struct PendingWrite {
    done_at: u64,
    group: u16,
    records: Vec<LogRecord>,
    durable: Durable,
}

#[derive(Default)]
struct ShardDisk {
    queue: VecDeque<PendingWrite>,
    last_done_at: u64,
}

/// The server's reply type; the per-node statistics payload is not simulated.
pub(super) type Reply = shards::ops::Reply<()>;

/// Where an answer goes: straight to a client, or back to the node that forwarded the
/// request (in a `PeerFrame::Response` echoing its id and body crc).
#[derive(Debug, Clone, Copy)]
enum ReplyTo {
    Client { client: usize, request: u64 },
    Peer(Via),
}

#[derive(Debug, Clone, Copy)]
struct Via {
    to: NodeId,
    shard: usize,
    id: RequestId,
    request_crc: u32,
}

/// A request waiting for its entry (or, when decided against in-flight entries, the
/// log's last entry) to commit: `reply` is sent if it does.
#[derive(Debug)]
pub(super) struct Waiter {
    to: ReplyTo,
    reply: Reply,
}

/// The client a forwarded request answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ForwardWaiter {
    client: usize,
    request: u64,
}

/// A forwarded request as the forwarding shard watches it (the server's `forward`
/// loop): given up at its deadline, when this replica sees another leader, or when the
/// connection it left on is replaced.
struct Outstanding {
    id: RequestId,
    to: NodeId,
    conn: u64,
    group: u16,
    deadline: u64,
    waiter: ForwardWaiter,
}

/// One shard's forwarded requests: the server's `Forwards` and what the shell watches.
struct Forwarder {
    incarnation: u64,
    forwards: Forwards<ForwardWaiter>,
    outstanding: Vec<Outstanding>,
}

/// A peer frame on the fake network, on connection `conn` of (`from`, `to`, `shard`).
struct PeerFlight {
    at: u64,
    seq: u64,
    from: NodeId,
    to: NodeId,
    shard: usize,
    conn: u64,
    bytes: Vec<u8>,
}

/// What a replica asked for during one step, handled in order once it returns (the
/// cluster is not borrowable while the replica is).
enum Effect {
    Send(Message<Command>),
    Write(Write),
    Applied(Entry<Command>),
    Release(Waiter, bool),
    Leadership(bool),
}

#[derive(Default)]
struct Effects(Vec<Effect>);

impl Shell<Waiter> for Effects {
    fn send(&mut self, msg: Message<Command>) {
        self.0.push(Effect::Send(msg));
    }
    fn write(&mut self, write: Write) {
        self.0.push(Effect::Write(write));
    }
    fn applied(&mut self, entry: &Entry<Command>, _place: &Persisted) {
        self.0.push(Effect::Applied(entry.clone()));
    }
    fn release(&mut self, waiter: Waiter, committed: bool) {
        self.0.push(Effect::Release(waiter, committed));
    }
    fn leadership(&mut self, leading: bool) {
        self.0.push(Effect::Leadership(leading));
    }
}

/// One replica: the server's replica type, the shell's copy of its log (for the
/// checks) and its disk.
pub(super) struct Replica {
    pub core: replica::Replica<Waiter>,
    /// The shell's copy of the in-memory log: entries after `shadow_snap.index`.
    pub shadow_snap: SnapshotMeta,
    pub shadow: Vec<Entry<Command>>,
    disk: GroupDisk,
}

impl std::ops::Deref for Replica {
    type Target = replica::Replica<Waiter>;
    fn deref(&self) -> &Self::Target {
        &self.core
    }
}

impl std::ops::DerefMut for Replica {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.core
    }
}

impl Replica {
    pub fn shadow_entry(&self, index: u64) -> Option<&Entry<Command>> {
        if index <= self.shadow_snap.index {
            return None;
        }
        self.shadow
            .get((index - self.shadow_snap.index - 1) as usize)
    }
}

pub(super) struct Node {
    pub id: NodeId,
    pub up: bool,
    pub replicas: BTreeMap<u16, Replica>,
    disks: Vec<ShardDisk>,
    /// Per shard; replaced (a new process incarnation) at every restart.
    forwarders: Vec<Forwarder>,
    restarts: u64,
    /// The durable `rebuilding` marker of `starcite serve --rebuild`: while set, every
    /// replica restarts catching up (`Some(true)`: term and vote lost too). Removed
    /// once no replica of the node is catching up.
    pub rebuilding: Option<bool>,
}

#[derive(Debug, Clone)]
enum RequestKind {
    Create,
    Append { body: String, key: Option<String> },
}

#[derive(Debug, Clone)]
struct Request {
    id: u64,
    kind: RequestKind,
    sent_tick: u64,
    resend: bool,
}

struct Client {
    group: u16,
    session: String,
    target: NodeId,
    pending: Option<Request>,
    created: bool,
    next_n: u64,
    known_seq: u64,
}

struct Flight {
    at: u64,
    seq: u64,
    group: u16,
    msg: Message<Command>,
}

enum ClientFlight {
    Request {
        node: NodeId,
        client: usize,
        request: Request,
    },
    Reply {
        client: usize,
        request: u64,
        reply: Reply,
    },
}

pub(super) struct Cluster {
    pub seed: u64,
    pub options: Options,
    pub params: Params,
    pub rng: Rng,
    pub round: u64,
    pub tick: u64,
    pub nodes: Vec<Node>,
    pub voters: BTreeMap<u16, Vec<NodeId>>,
    flights: Vec<Flight>,
    client_flights: Vec<(u64, u64, ClientFlight)>,
    peer_flights: Vec<PeerFlight>,
    /// The open connection of each (lower node, higher node, shard); a new id when one
    /// is replaced.
    conns: BTreeMap<(NodeId, NodeId, usize), u64>,
    next_conn: u64,
    flight_seq: u64,
    pub cut: BTreeSet<(NodeId, NodeId)>,
    pub loss_percent: u64,
    clients: Vec<Client>,
    next_request: u64,
    pub cov: Coverage,
    pub trace: TraceHash,
    pub log: Vec<String>,
    pub checker: Checker,
    pub healing: bool,
    limits: Limits,
    /// Figure-8 script hooks (see `schedule.rs`): isolate the next leader of the group
    /// elected other than the given node, the moment it is elected.
    pub fig8_isolate_next: Option<(u16, NodeId)>,
    pub fig8_elected: Option<NodeId>,
    /// Crash the given node this many rounds after it next becomes leader of the group.
    pub fig8_crash_next: Option<(u16, NodeId, u64)>,
    pub fig8_crashed: bool,
    /// Isolate the node the moment it, leading the group, next commits an entry
    /// (messages still in flight from it are dropped).
    pub fig8_cut_on_commit: Option<(u16, NodeId)>,
    crash_at: Option<(u64, NodeId)>,
    /// Nodes that stopped (fail-stop) and the tick their supervisor starts them again.
    supervised: Vec<(u64, NodeId)>,
}

/// Where the simulated disk "wrote" an entry (the replica only keeps it until the entry
/// commits; the server's is a segment and offset).
fn location(index: u64) -> RecordLocation {
    RecordLocation {
        epoch: 1,
        offset: index as u32,
    }
}

/// The Raft entry an entry record holds.
fn entry_of(rec: &LogRecord) -> Entry<Command> {
    Entry {
        term: rec.term,
        index: rec.index,
        payload: match &rec.command {
            Command::Noop => Payload::Noop,
            command => Payload::Data(command.clone()),
        },
    }
}

/// A leader's acknowledgement of an append at `seq` (the simulation checks only `seq`).
fn appended(seq: u64, deduped: bool) -> Reply {
    Reply::Appended {
        seq,
        last_seq: seq,
        deduped,
        archived_seq: 0,
    }
}

fn shard_of(group: u16, shards: usize) -> usize {
    shards::shard_of(group, shards)
}

fn mix(a: u64, b: u64) -> u64 {
    let mut r = Rng::new(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next()
}

impl Cluster {
    pub fn new(seed: u64, options: &Options) -> Cluster {
        let mut rng = Rng::new(seed);
        let nodes = if rng.chance(20) { 5 } else { 3 };
        let shards = rng.range(1, 3) as usize;
        let group_count = options.groups.unwrap_or_else(|| rng.range(2, 4) as usize);
        let mut groups: BTreeSet<u16> = BTreeSet::new();
        if group_count >= shards::GROUPS as usize {
            groups = (0..shards::GROUPS).collect();
        } else {
            while groups.len() < group_count {
                groups.insert(rng.below(shards::GROUPS as u64) as u16);
            }
        }
        let groups: Vec<u16> = groups.into_iter().collect();
        let raft = Config {
            election_ticks: 10,
            heartbeat_ticks: rng.range(1, 3) as u32,
            max_inflight: rng.range(1, 8) as usize,
            max_entries_per_msg: rng.range(1, 8) as usize,
            max_bytes_per_msg: 1 << 20,
            snapshot_chunk_bytes: rng.range(256, 8192) as usize,
            max_uncommitted_entries: rng.range(16, 256),
            pre_vote: !rng.chance(10),
            check_quorum: !rng.chance(10),
        };
        let params = Params {
            nodes,
            shards,
            groups: groups.clone(),
            loss_percent: rng.range(0, 30),
            duplicate_percent: rng.range(0, 5),
            delay_rounds_max: rng.range(1, 6),
            persist_rounds_max: rng.range(0, 6),
            corrupt_snapshot_percent: if rng.chance(30) { rng.range(5, 50) } else { 0 },
            rounds_per_tick: 4,
            compact_after: rng.range(4, 48),
            client_timeout_ticks: rng.range(15, 40),
            request_percent: rng.range(20, 80),
            forwarding: rng.chance(80),
            raft,
        };
        let ids: Vec<NodeId> = (1..=nodes as u64).collect();
        let mut voters = BTreeMap::new();
        for &g in &groups {
            // Rendezvous hashing: the 3 nodes with the highest hash of (group, node).
            let mut ranked: Vec<(u64, NodeId)> =
                ids.iter().map(|&n| (mix(g as u64, n), n)).collect();
            ranked.sort_unstable_by(|a, b| b.cmp(a));
            let mut set: Vec<NodeId> = ranked.iter().take(3).map(|&(_, n)| n).collect();
            set.sort_unstable();
            voters.insert(g, set);
        }
        let limits = Limits::default();
        let mut cluster = Cluster {
            seed,
            options: options.clone(),
            loss_percent: params.loss_percent,
            params,
            rng,
            round: 0,
            tick: 0,
            nodes: Vec::new(),
            voters,
            flights: Vec::new(),
            client_flights: Vec::new(),
            peer_flights: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            flight_seq: 0,
            cut: BTreeSet::new(),
            clients: Vec::new(),
            next_request: 1,
            cov: Coverage::default(),
            trace: TraceHash::default(),
            log: Vec::new(),
            checker: Checker::new(seed),
            healing: false,
            limits,
            fig8_isolate_next: None,
            fig8_elected: None,
            fig8_crash_next: None,
            fig8_crashed: false,
            fig8_cut_on_commit: None,
            crash_at: None,
            supervised: Vec::new(),
        };
        for &id in &ids {
            let mut replicas = BTreeMap::new();
            for &g in &groups {
                if cluster.voters[&g].contains(&id) {
                    let core = cluster.new_replica(id, g, 0, None, Recovered::fresh(limits));
                    replicas.insert(
                        g,
                        Replica {
                            core,
                            shadow_snap: SnapshotMeta::default(),
                            shadow: Vec::new(),
                            disk: GroupDisk::default(),
                        },
                    );
                }
            }
            let disks = (0..cluster.params.shards)
                .map(|_| ShardDisk::default())
                .collect();
            let forwarders = cluster.new_forwarders(id, 0);
            cluster.nodes.push(Node {
                id,
                up: true,
                replicas,
                disks,
                forwarders,
                restarts: 0,
                rebuilding: None,
            });
        }
        for &g in &groups {
            let sessions = cluster.rng.range(1, 3);
            for s in 0..sessions {
                let session = format!("g{g}-s{s}");
                for _ in 0..cluster.rng.range(1, 3) {
                    let target = cluster.random_voter(g);
                    cluster.clients.push(Client {
                        group: g,
                        session: session.clone(),
                        target,
                        pending: None,
                        created: false,
                        next_n: 1,
                        known_seq: 0,
                    });
                }
            }
        }
        cluster
    }

    /// A replica of `group` on node `id` (the server's type), with Raft restored from
    /// the same disk as `recovered`.
    fn new_replica(
        &self,
        id: NodeId,
        group: u16,
        restarts: u64,
        restored: Option<Restored<Command>>,
        recovered: Recovered,
    ) -> replica::Replica<Waiter> {
        let seed = mix(self.seed, (group as u64) << 32 | id << 16 | restarts);
        let mut raft = RaftNode::new(
            self.params.raft.clone(),
            id,
            self.voters[&group].clone(),
            seed,
            restored,
        );
        let bugs = self.options.bugs;
        raft.plant_bugs(PlantedBugs {
            commit_previous_term: bugs.previous_term_commit,
            vote_while_catching_up: bugs.vote_while_catching_up,
        });
        if let Some(lost_hard_state) = self.node_rebuilding(id) {
            raft = raft.catch_up(lost_hard_state);
        }
        let mut core = replica::Replica::new(group, raft, recovered, self.limits);
        core.plant_bugs(replica::PlantedBugs {
            ack_before_persist: bugs.ack_before_persist,
            ack_bad_snapshot: bugs.ack_bad_snapshot,
            forgotten_dedupe: bugs.forgotten_dedupe,
        });
        core
    }

    /// The forwarding state of a new process of node `id`: its incarnation is new (never
    /// 0), its request counters start again.
    fn new_forwarders(&self, id: NodeId, restarts: u64) -> Vec<Forwarder> {
        let incarnation = mix(self.seed ^ 0x1AC0_u64, id << 32 | restarts) | 1;
        (0..self.params.shards)
            .map(|_| {
                let mut forwards = Forwards::new(incarnation);
                forwards.plant_bugs(forwarding::PlantedBugs {
                    match_by_counter_only: self.options.bugs.another_requests_reply,
                });
                Forwarder {
                    incarnation,
                    forwards,
                    outstanding: Vec::new(),
                }
            })
            .collect()
    }

    /// The node's rebuild marker (none while the cluster is being built).
    fn node_rebuilding(&self, id: NodeId) -> Option<bool> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.rebuilding)
    }

    pub fn random_voter(&mut self, group: u16) -> NodeId {
        let v = &self.voters[&group];
        v[self.rng.below(v.len() as u64) as usize]
    }

    pub fn note(&mut self, text: impl FnOnce() -> String) {
        if self.options.verbose {
            let t = text();
            self.log
                .push(format!("[t{} r{}] {t}", self.tick, self.round));
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn rep(&mut self, id: NodeId, group: u16) -> &mut Replica {
        self.nodes[(id - 1) as usize]
            .replicas
            .get_mut(&group)
            .expect("replica")
    }

    // ---- the run ----

    pub fn run(mut self) -> Result<Report, String> {
        let mut schedule = Schedule::new(&mut self);
        let fault_ticks = self.options.fault_ticks;
        for _ in 0..fault_ticks {
            schedule.step(&mut self);
            self.tick_once().map_err(|e| self.failure(&e))?;
        }
        self.heal();
        self.finish()
    }

    /// After the faults: every group must acknowledge a new append within the bound, then
    /// (no new requests) every replica must converge, every rebuilt node included.
    fn finish(mut self) -> Result<Report, String> {
        let heal_start = self.tick;
        let mut progressed: BTreeSet<u16> = BTreeSet::new();
        let bound = self.options.heal_ticks;
        while progressed.len() < self.params.groups.len() {
            if self.tick - heal_start >= bound {
                let missing: Vec<u16> = self
                    .params
                    .groups
                    .iter()
                    .copied()
                    .filter(|g| !progressed.contains(g))
                    .collect();
                let e = format!(
                    "liveness: groups {missing:?} made no acknowledged progress within {bound} ticks after healing"
                );
                return Err(self.failure(&e));
            }
            self.tick_once().map_err(|e| self.failure(&e))?;
            for &g in &self.params.groups {
                if self.checker.acks_after(g, heal_start) > 0 {
                    progressed.insert(g);
                }
            }
        }
        // Quiesce: no new client requests; every replica must converge.
        self.params.request_percent = 0;
        let quiesce_start = self.tick;
        loop {
            if self.converged() {
                break;
            }
            if self.tick - quiesce_start >= bound {
                // Caught up but different: a safety failure, not a liveness one.
                self.final_checks().map_err(|e| self.failure(&e))?;
                let e = format!(
                    "liveness: replicas did not converge within {bound} ticks after healing"
                );
                return Err(self.failure(&e));
            }
            self.tick_once().map_err(|e| self.failure(&e))?;
        }
        self.final_checks().map_err(|e| self.failure(&e))?;
        Ok(Report {
            coverage: self.cov.clone(),
            trace_hash: self.trace.0,
            params: self.describe(),
            ticks: self.tick,
        })
    }

    /// Scenario (no random faults, no message loss): clients append for a while, then
    /// the disk of the node that leads the fewest groups is wiped and rebuilt. Every
    /// group it did not lead must keep its leader, and every replica converge with every
    /// acknowledged append.
    pub fn run_wipe_scenario(mut self, lose_hard_state: bool) -> Result<Report, String> {
        self.loss_percent = 0;
        self.params.duplicate_percent = 0;
        self.params.corrupt_snapshot_percent = 0;
        for _ in 0..80 {
            self.tick_once().map_err(|e| self.failure(&e))?;
        }
        let leaders: BTreeMap<u16, Option<(NodeId, u64)>> = self
            .params
            .groups
            .iter()
            .map(|&g| {
                let leader = self.leader_of(g);
                let term = leader.map(|l| self.node(l).replicas[&g].raft.term());
                (g, leader.zip(term))
            })
            .collect();
        let led = |n: NodeId| {
            leaders
                .values()
                .filter(|l| l.is_some_and(|(id, _)| id == n))
                .count()
        };
        let victim = (1..=self.params.nodes as u64)
            .min_by_key(|&n| led(n))
            .expect("nodes");
        self.wipe(victim, lose_hard_state);
        for _ in 0..60 {
            self.tick_once().map_err(|e| self.failure(&e))?;
        }
        for (&g, &leader) in &leaders {
            let now = self.leader_of(g);
            let term = now.map(|l| self.node(l).replicas[&g].raft.term());
            if leader.is_some_and(|(l, _)| l != victim) && now.zip(term) != leader {
                let e = format!(
                    "group {g}: leader {leader:?} before node {victim} was wiped, {:?} after",
                    now.zip(term)
                );
                return Err(self.failure(&e));
            }
        }
        self.finish()
    }

    pub fn describe(&self) -> String {
        let p = &self.params;
        format!(
            "nodes {} shards {} groups {:?} loss {}% dup {}% delay<={} persist<={} compact>{} inflight {} entries/msg {} chunk {} pre_vote {} check_quorum {} bugs {:?}",
            p.nodes,
            p.shards,
            if p.groups.len() > 8 { vec![p.groups.len() as u16] } else { p.groups.clone() },
            p.loss_percent,
            p.duplicate_percent,
            p.delay_rounds_max,
            p.persist_rounds_max,
            p.compact_after,
            p.raft.max_inflight,
            p.raft.max_entries_per_msg,
            p.raft.snapshot_chunk_bytes,
            p.raft.pre_vote,
            p.raft.check_quorum,
            self.options.bugs,
        )
    }

    fn failure(&self, e: &str) -> String {
        let mut out = format!(
            "seed {}: {e}\n  at tick {} round {}; {}",
            self.seed,
            self.tick,
            self.round,
            self.describe()
        );
        for n in &self.nodes {
            for (g, r) in &n.replicas {
                out.push_str(&format!(
                    "\n  node {} up {} group {g}: {:?} term {} commit {} applied {} last {} snap {}",
                    n.id,
                    n.up,
                    r.raft.role(),
                    r.raft.term(),
                    r.raft.commit_index(),
                    r.applied,
                    r.raft.last_index(),
                    r.raft.snapshot_index()
                ));
            }
        }
        if !self.log.is_empty() {
            let start = self.log.len().saturating_sub(60);
            out.push_str("\n  last events:\n    ");
            out.push_str(&self.log[start..].join("\n    "));
        }
        out
    }

    fn heal(&mut self) {
        self.healing = true;
        self.note(|| "heal everything".to_string());
        self.fig8_isolate_next = None;
        self.fig8_crash_next = None;
        self.fig8_cut_on_commit = None;
        self.crash_at = None;
        self.cut.clear();
        self.loss_percent = 0;
        self.params.duplicate_percent = 0;
        self.params.corrupt_snapshot_percent = 0;
        let down: Vec<NodeId> = self.nodes.iter().filter(|n| !n.up).map(|n| n.id).collect();
        for id in down {
            self.restart(id);
        }
    }

    fn converged(&self) -> bool {
        for &g in &self.params.groups {
            let len = self.checker.committed_len(g);
            let mut snapshots = Vec::new();
            for &v in &self.voters[&g] {
                let r = &self.node(v).replicas[&g];
                if r.applied != len || r.raft.commit_index() != len {
                    return false;
                }
                snapshots.push(r.state.encode_snapshot());
            }
            if snapshots.windows(2).any(|w| w[0] != w[1]) {
                return false;
            }
            if self.rebuilding_nodes() > 0 {
                return false; // a rebuilt node must end catching up
            }
            // Only Noops may follow a committed log: nothing uncommitted anywhere.
            if self.voters[&g]
                .iter()
                .any(|&v| self.node(v).replicas[&g].raft.last_index() != len)
            {
                return false;
            }
        }
        self.clients.iter().all(|c| c.pending.is_none())
    }

    fn final_checks(&self) -> Result<(), String> {
        for &g in &self.params.groups {
            let len = self.checker.committed_len(g);
            if self.voters[&g]
                .iter()
                .any(|&v| self.node(v).replicas[&g].applied != len)
            {
                continue; // not caught up: compared only once every replica is
            }
            let mut first: Option<(NodeId, Vec<u8>)> = None;
            for &v in &self.voters[&g] {
                let bytes = self.node(v).replicas[&g].state.encode_snapshot();
                match &first {
                    None => first = Some((v, bytes)),
                    Some((w, b)) if *b != bytes => {
                        return Err(format!(
                            "state machine divergence: replicas {w} and {v} of group {g} hold different session states (dedupe windows included) at the same index {len}"
                        ))
                    }
                    _ => {}
                }
            }
        }
        self.checker.final_check()
    }

    /// One tick: clients, every Raft node's clock, then the network rounds.
    pub fn tick_once(&mut self) -> Result<(), String> {
        self.tick += 1;
        self.trace.add(0xF00D ^ self.tick);
        let tick = self.tick;
        let due: Vec<NodeId> = self
            .supervised
            .iter()
            .filter(|&&(at, _)| at <= tick)
            .map(|&(_, id)| id)
            .collect();
        self.supervised.retain(|&(at, _)| at > tick);
        for id in due {
            self.restart(id);
        }
        self.clients_step()?;
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            if !self.node(id).up {
                continue;
            }
            let groups: Vec<u16> = self.node(id).replicas.keys().copied().collect();
            for g in groups {
                self.rep(id, g).core.tick();
                self.process(id, g)?;
            }
            self.watch_forwards(id);
            self.maybe_compact(id)?;
        }
        for _ in 0..self.params.rounds_per_tick {
            self.round_once()?;
        }
        self.clear_caught_up_markers();
        let mut checker = std::mem::replace(&mut self.checker, Checker::new(0));
        let result = checker.check_step(self);
        self.checker = checker;
        result?;
        Ok(())
    }

    fn round_once(&mut self) -> Result<(), String> {
        self.round += 1;
        let now = self.round;
        if let Some((at, node)) = self.crash_at {
            if at <= now {
                self.crash_at = None;
                self.note(|| format!("figure 8: crash re-elected leader {node}"));
                self.crash(node);
                self.fig8_crashed = true;
            }
        }
        let mut due: Vec<Flight> = Vec::new();
        let mut rest = Vec::with_capacity(self.flights.len());
        for f in self.flights.drain(..) {
            if f.at <= now {
                due.push(f);
            } else {
                rest.push(f);
            }
        }
        self.flights = rest;
        due.sort_by_key(|f| (f.at, f.seq));
        for f in due {
            let to = f.msg.to;
            if !self.node(to).up || self.cut.contains(&(f.msg.from, to)) {
                continue;
            }
            self.cov.messages += 1;
            self.trace.add(f.seq);
            self.trace
                .add(f.group as u64 ^ (f.msg.from << 16) ^ (to << 24));
            self.rep(to, f.group).raft.step(f.msg);
            self.process(to, f.group)?;
        }
        let mut due_peers: Vec<PeerFlight> = Vec::new();
        let mut rest = Vec::with_capacity(self.peer_flights.len());
        for f in self.peer_flights.drain(..) {
            if f.at <= now {
                due_peers.push(f);
            } else {
                rest.push(f);
            }
        }
        self.peer_flights = rest;
        due_peers.sort_by_key(|f| (f.at, f.seq));
        for f in due_peers {
            if !self.node(f.to).up || self.cut.contains(&(f.from, f.to)) {
                continue;
            }
            self.trace.add(0x9EE4 ^ f.seq);
            self.on_peer_frame(f)?;
        }
        let mut due_clients = Vec::new();
        let mut rest = Vec::new();
        for f in self.client_flights.drain(..) {
            if f.0 <= now {
                due_clients.push(f);
            } else {
                rest.push(f);
            }
        }
        self.client_flights = rest;
        due_clients.sort_by_key(|f| (f.0, f.1));
        for (_, _, f) in due_clients {
            match f {
                ClientFlight::Request {
                    node,
                    client,
                    request,
                } => self.handle_request(node, client, request)?,
                ClientFlight::Reply {
                    client,
                    request,
                    reply,
                } => self.handle_reply(client, request, reply)?,
            }
        }
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            for shard in 0..self.params.shards {
                self.finish_writes(id, shard)?;
            }
        }
        let mut checker = std::mem::replace(&mut self.checker, Checker::new(0));
        let result = checker.check_round(self);
        self.checker = checker;
        result?;
        Ok(())
    }

    // ---- network ----

    fn send(&mut self, group: u16, msg: Message<Command>) {
        if self.cut.contains(&(msg.from, msg.to)) || self.rng.chance(self.loss_percent) {
            return;
        }
        let mut msg = msg;
        if let Body::InstallSnapshot { data, .. } = &mut msg.body {
            if !data.is_empty() && self.rng.chance(self.params.corrupt_snapshot_percent) {
                // One byte of the snapshot changes on its way, in a way the transport's
                // frame crc does not see (the sender's memory or disk).
                let at = self.rng.below(data.len() as u64) as usize;
                data[at] ^= 0x20;
                self.cov.snapshots_corrupted += 1;
            }
        }
        let copies = if self.rng.chance(self.params.duplicate_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.round + 1 + self.rng.below(self.params.delay_rounds_max);
            self.flight_seq += 1;
            self.flights.push(Flight {
                at,
                seq: self.flight_seq,
                group,
                msg: msg.clone(),
            });
        }
    }

    fn send_client(&mut self, flight: ClientFlight) {
        if self.rng.chance(self.loss_percent / 2) {
            return; // the client sees a timeout
        }
        let at = self.round + 1 + self.rng.below(self.params.delay_rounds_max);
        self.flight_seq += 1;
        self.client_flights.push((at, self.flight_seq, flight));
    }

    /// The open connection between `a` and `b` for `shard`, if any.
    fn connection(&self, a: NodeId, b: NodeId, shard: usize) -> Option<u64> {
        self.conns.get(&(a.min(b), a.max(b), shard)).copied()
    }

    /// The open connection between `a` and `b` for `shard`, opened if there is none.
    fn connect(&mut self, a: NodeId, b: NodeId, shard: usize) -> u64 {
        let key = (a.min(b), a.max(b), shard);
        if let Some(&conn) = self.conns.get(&key) {
            return conn;
        }
        self.next_conn += 1;
        self.conns.insert(key, self.next_conn);
        self.next_conn
    }

    /// Sends a peer frame on the current connection of (`from`, `to`, `shard`). A TCP
    /// connection does not lose a frame and carry on: a lost frame (loss, a cut link)
    /// breaks the connection, and the next frame opens a new one. Frames are never
    /// duplicated (TCP does not), but delayed and reordered like Raft messages.
    fn send_peer(&mut self, from: NodeId, to: NodeId, shard: usize, frame: &PeerFrame) {
        if !self.node(to).up {
            return; // nothing listens: no connection
        }
        let conn = self.connect(from, to, shard);
        if self.cut.contains(&(from, to)) || self.rng.chance(self.loss_percent / 2) {
            self.conns.remove(&(from.min(to), from.max(to), shard));
            self.note(|| format!("connection {conn} of {from} and {to} breaks"));
            return;
        }
        let bytes = peer::encode(frame);
        let at = self.round + 1 + self.rng.below(self.params.delay_rounds_max);
        self.flight_seq += 1;
        self.peer_flights.push(PeerFlight {
            at,
            seq: self.flight_seq,
            from,
            to,
            shard,
            conn,
            bytes,
        });
    }

    pub fn isolate(&mut self, id: NodeId) {
        for other in 1..=self.params.nodes as u64 {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    // ---- crash and restart ----

    /// Stop the node: everything not yet durable is lost, except that the disk may have
    /// written a prefix of the pending writes of a shard, the next one torn (and so
    /// dropped by the recovery scan).
    pub fn crash(&mut self, id: NodeId) {
        if !self.node(id).up {
            return;
        }
        self.cov.crashes += 1;
        self.note(|| format!("crash node {id}"));
        self.trace.add(0xC4A5 ^ id);
        for shard in 0..self.params.shards {
            let queue: Vec<PendingWrite> = self.node_mut(id).disks[shard].queue.drain(..).collect();
            if queue.is_empty() {
                continue;
            }
            let survive = if self.rng.chance(50) {
                self.rng.below(queue.len() as u64) as usize
            } else {
                0
            };
            if survive < queue.len() {
                self.cov.torn_tails += 1;
            }
            for w in queue.into_iter().take(survive) {
                self.write_to_disk(id, &w);
            }
            self.node_mut(id).disks[shard].last_done_at = 0;
        }
        // The process is gone: its replicas (and the requests they held) with it.
        self.node_mut(id).up = false;
        self.flights.retain(|f| f.msg.to != id);
        // Its connections die with it; frames it sent may still be read by their
        // receivers (they were in the kernel's buffers), frames to it are lost.
        self.peer_flights.retain(|f| f.to != id);
        self.conns.retain(|&(a, b, _), _| a != id && b != id);
    }

    /// Start the node again from its disk.
    pub fn restart(&mut self, id: NodeId) {
        if self.node(id).up {
            return;
        }
        self.note(|| format!("restart node {id}"));
        self.trace.add(0x5EA7 ^ id);
        self.node_mut(id).restarts += 1;
        let restarts = self.node(id).restarts;
        let groups: Vec<u16> = self.node(id).replicas.keys().copied().collect();
        for g in groups {
            let replayed = self.replay_disk(id, g);
            let snap = replayed.raft.snapshot;
            let shadow = replayed.raft.entries.clone();
            let core = self.new_replica(id, g, restarts, Some(replayed.raft), replayed.recovered);
            let r = self.rep(id, g);
            r.core = core;
            r.shadow_snap = snap;
            r.shadow = shadow;
        }
        // A new process: a new incarnation, its forwarded requests counted from 1 again.
        let forwarders = self.new_forwarders(id, restarts);
        let node = self.node_mut(id);
        node.forwarders = forwarders;
        node.up = true;
    }

    /// What a restart of node `id` rebuilds of group `g` from its disk.
    fn replay_disk(&self, id: NodeId, g: u16) -> Replayed {
        let d = &self.node(id).replicas[&g].disk;
        let mut replay = match &d.snapshot {
            Some(snapshot) => Replay::from_snapshot(snapshot.clone(), self.limits)
                .expect("stored snapshot decodes"),
            None => Replay::new(self.limits),
        };
        replay.plant_bugs(replay::PlantedBugs {
            skip_truncation: self.options.bugs.skip_truncation_on_replay,
            apply_twice: self.options.bugs.apply_twice_on_replay,
        });
        for (rec, crc) in &d.records {
            match &rec.command {
                Command::Meta(MetaRecord::HardState { term, vote, commit }) => {
                    replay.hard_state(*term, *vote, *commit)
                }
                Command::Meta(MetaRecord::Snapshot {
                    index,
                    term,
                    checksum,
                    state,
                }) => replay
                    .snapshot(*index, *term, *checksum, state)
                    .expect("stored snapshot record decodes"),
                _ if rec.index > 0 => {
                    let place = Persisted {
                        term: rec.term,
                        loc: location(rec.index),
                        crc: *crc,
                        sealed: None,
                    };
                    replay.entry(rec.index, rec.term, rec.command.clone(), place);
                }
                _ => {} // history events of an installed snapshot: the server's index
            }
        }
        replay.finish()
    }

    /// The node's data dir is lost and rebuilt (`starcite serve --rebuild`): it stops,
    /// every group's log and snapshot go, the term and vote stay (unless
    /// `lose_hard_state`: a data dir deleted by hand, `--rebuild --forget-votes`), the
    /// marker is set and the node restarts catching up.
    pub fn wipe(&mut self, id: NodeId, lose_hard_state: bool) {
        self.crash(id);
        self.cov.rebuilds += 1;
        self.note(|| format!("wipe node {id} (term and vote lost: {lose_hard_state})"));
        self.trace
            .add(0x3199 ^ id ^ u64::from(lose_hard_state) << 8);
        let node = self.node_mut(id);
        node.rebuilding = Some(lose_hard_state || node.rebuilding == Some(true));
        let groups: Vec<u16> = self.node(id).replicas.keys().copied().collect();
        for g in groups {
            // `--rebuild` writes the old log's term and vote as the new log's first
            // records; `--forget-votes` (and a data dir deleted by hand) keeps nothing.
            let hard = self.replay_disk(id, g).raft.hard_state;
            let d = &mut self.rep(id, g).disk;
            d.snapshot = None;
            d.records.clear();
            if !lose_hard_state {
                let carried = HardState { commit: 0, ..hard };
                let rec = replica::hard_state_record(g, carried);
                let crc = record_crc(&rec);
                d.records.push((rec, crc));
            }
        }
        self.restart(id);
    }

    /// Nodes whose rebuild marker is still set.
    pub fn rebuilding_nodes(&self) -> usize {
        self.nodes.iter().filter(|n| n.rebuilding.is_some()).count()
    }

    /// The marker goes once every replica of the node has caught up (and so persisted
    /// what it must).
    fn clear_caught_up_markers(&mut self) {
        for node in &mut self.nodes {
            if node.up
                && node.rebuilding.is_some()
                && node.replicas.values().all(|r| !r.raft.is_catching_up())
            {
                node.rebuilding = None;
                let id = node.id;
                self.trace.add(0xCA7C ^ id);
                if self.options.verbose {
                    self.log.push(format!(
                        "[t{} r{}] node {id} caught up",
                        self.tick, self.round
                    ));
                }
            }
        }
    }

    // ---- the shell ----

    /// Steps the replica until it has nothing more to do, and carries out what it asks.
    /// A replica that stops on a snapshot that does not decode takes its node down
    /// (fail-stop, as the server's process); any other stop fails the run.
    fn process(&mut self, id: NodeId, group: u16) -> Result<(), String> {
        while self.node(id).up {
            let mut effects = Effects::default();
            let stepped = self.rep(id, group).core.step(&mut effects);
            let snapshot_for = match stepped {
                Ok(peers) => peers,
                Err(Stop::BadSnapshot(e)) => {
                    self.cov.fail_stops += 1;
                    self.note(|| format!("node {id} stops: {e}"));
                    self.crash(id);
                    // Its supervisor starts it again a little later.
                    let at = self.tick + 1 + self.rng.below(10);
                    self.supervised.push((at, id));
                    return Ok(());
                }
                Err(stop) => return Err(format!("node {id}: {stop}")),
            };
            for effect in effects.0 {
                self.carry_out(id, group, effect)?;
            }
            for peer in snapshot_for {
                self.send_snapshot(id, group, peer);
            }
            if !self.node(id).up || !self.node(id).replicas[&group].raft.has_ready() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn carry_out(&mut self, id: NodeId, g: u16, effect: Effect) -> Result<(), String> {
        match effect {
            Effect::Leadership(true) => {
                let term = self.node(id).replicas[&g].raft.term();
                self.trace.add(0x50F7 ^ term ^ (id << 48));
                self.cov.elections += 1;
                self.note(|| format!("node {id} leads group {g} in term {term}"));
                if let Some((fg, except)) = self.fig8_isolate_next {
                    if fg == g && id != except {
                        // Before this Ready's messages leave: its entries stay its own.
                        self.note(|| format!("figure 8: isolate new leader {id}"));
                        self.isolate(id);
                        self.fig8_isolate_next = None;
                        self.fig8_elected = Some(id);
                    }
                }
                if let Some((fg, l, k)) = self.fig8_crash_next {
                    if fg == g && id == l {
                        if k % 2 == 0 {
                            self.crash_at = Some((self.round + k, l));
                        } else {
                            self.fig8_cut_on_commit = Some((g, l));
                        }
                        self.fig8_crash_next = None;
                    }
                }
            }
            Effect::Leadership(false) => {
                let term = self.node(id).replicas[&g].raft.term();
                self.trace.add(0x1055 ^ term ^ (id << 48));
                self.cov.leader_losses += 1;
                self.note(|| format!("node {id} loses group {g} in term {term}"));
            }
            Effect::Send(msg) => self.send(g, msg),
            Effect::Write(write) => self.queue_write(id, g, write)?,
            Effect::Applied(e) => self.commit_entry(id, g, e)?,
            Effect::Release(w, committed) => {
                let reply = if committed {
                    w.reply
                } else {
                    Reply::Error(ApiError::CommitUnknown)
                };
                self.answer(id, w.to, reply)?;
            }
        }
        Ok(())
    }

    /// A write of the replica: the shell's copy of the log follows it at once (what the
    /// replica's Raft log holds), the disk gets it after a random delay, in order.
    fn queue_write(&mut self, id: NodeId, g: u16, write: Write) -> Result<(), String> {
        for rec in &write.records {
            if let Command::Meta(MetaRecord::Snapshot {
                index, term, state, ..
            }) = &rec.command
            {
                self.cov.snapshot_installs += 1;
                self.note(|| format!("node {id} group {g} installs snapshot at {index}"));
                let gs = GroupState::decode_snapshot(state, self.limits)
                    .map_err(|e| format!("node {id} group {g}: installed snapshot: {e}"))?;
                self.checker.check_snapshot(g, *index, &gs, self.limits)?;
                let r = self.rep(id, g);
                r.shadow_snap = SnapshotMeta {
                    index: *index,
                    term: *term,
                };
                r.shadow.clear();
            }
        }
        let entries: Vec<Entry<Command>> = write
            .records
            .iter()
            .filter(|rec| rec.index > 0)
            .map(entry_of)
            .collect();
        if let Some(first) = entries.first() {
            let r = self.rep(id, g);
            let keep = first.index.saturating_sub(r.shadow_snap.index + 1) as usize;
            let truncated = r.shadow.len() > keep;
            r.shadow.truncate(keep);
            r.shadow.extend(entries.iter().cloned());
            if truncated {
                self.cov.truncations += 1;
                self.note(|| format!("node {id} group {g} truncates from {}", first.index));
            }
        }
        let shard = shard_of(g, self.params.shards);
        let delay = self.rng.range(0, self.params.persist_rounds_max);
        let round = self.round;
        let disk = &mut self.node_mut(id).disks[shard];
        let done_at = disk.last_done_at.max(round + delay);
        disk.last_done_at = done_at;
        disk.queue.push_back(PendingWrite {
            done_at,
            group: g,
            records: write.records,
            durable: write.durable,
        });
        Ok(())
    }

    /// The leader answers a snapshot request as the server's does: its committed state
    /// at its applied index (nothing before its first applied entry).
    fn send_snapshot(&mut self, id: NodeId, g: u16, peer: NodeId) {
        let r = self.rep(id, g);
        r.building_snapshot = false;
        let meta = SnapshotMeta {
            index: r.applied,
            term: r.applied_term,
        };
        let result = if meta.index == 0 {
            Err(None)
        } else {
            let data = GroupTransfer {
                state: r.state.encode_snapshot(),
                checksum: r.checksum,
                events: Vec::new(),
            }
            .encode();
            r.raft.send_snapshot(peer, meta, data).map_err(Some)
        };
        if result.is_err() {
            r.raft.snapshot_failed(peer);
        }
        self.note(|| {
            format!(
                "node {id} group {g}: snapshot {} for {peer}: {result:?}",
                meta.index
            )
        });
    }

    fn commit_entry(&mut self, id: NodeId, g: u16, e: Entry<Command>) -> Result<(), String> {
        let term_now = self.node(id).replicas[&g].raft.term();
        if let Some(s) = self.node(id).replicas[&g].shadow_entry(e.index) {
            if *s != e {
                return Err(format!(
                    "node {id} group {g}: committed entry {} differs from the log",
                    e.index
                ));
            }
        }
        self.checker.on_commit(g, id, &e, term_now, self.tick)?;
        self.cov.commits += 1;
        self.trace.add(0xC0 ^ e.index ^ (e.term << 32) ^ (id << 56));
        if self.fig8_cut_on_commit == Some((g, id)) && self.node(id).replicas[&g].leading {
            self.fig8_cut_on_commit = None;
            self.note(|| {
                format!(
                    "figure 8: isolate re-elected leader {id} as it commits {}",
                    e.index
                )
            });
            self.isolate(id);
            self.fig8_crashed = true;
        }
        Ok(())
    }

    fn write_to_disk(&mut self, id: NodeId, w: &PendingWrite) {
        let d = &mut self.rep(id, w.group).disk;
        d.records
            .extend(w.records.iter().map(|rec| (rec.clone(), record_crc(rec))));
    }

    fn finish_writes(&mut self, id: NodeId, shard: usize) -> Result<(), String> {
        loop {
            let now = self.round;
            let node = self.node_mut(id);
            if !node.up {
                return Ok(());
            }
            let disk = &mut node.disks[shard];
            if disk.queue.front().is_none_or(|w| w.done_at > now) {
                return Ok(());
            }
            let w = disk.queue.pop_front().expect("front");
            self.write_to_disk(id, &w);
            let group = w.group;
            let mut effects = Effects::default();
            let r = self.rep(id, group);
            for rec in w.records.iter().filter(|rec| rec.index > 0) {
                r.core
                    .entry_durable(rec.index, rec.term, location(rec.index), record_crc(rec));
            }
            r.core.durable(w.durable, &mut effects);
            for effect in effects.0 {
                self.carry_out(id, group, effect)?;
            }
            self.process(id, group)?;
        }
    }

    fn maybe_compact(&mut self, id: NodeId) -> Result<(), String> {
        let after = self.params.compact_after;
        let groups: Vec<u16> = self.node(id).replicas.keys().copied().collect();
        for g in groups {
            let r = self.rep(id, g);
            let applied = r.applied;
            if applied < r.raft.snapshot_index() + after || applied != r.raft.applied_index() {
                continue;
            }
            let Some(term) = r.raft.entry_term(applied) else {
                continue;
            };
            let meta = SnapshotMeta {
                index: applied,
                term,
            };
            r.raft
                .compact(meta)
                .map_err(|e| format!("node {id} group {g}: compact: {e:?}"))?;
            // As the server's shard snapshot: the committed state, the hard state, and the
            // entries on disk not applied yet with their places; the log before it goes.
            let hard = r.raft.hard_state();
            let entries = r.unapplied_entries();
            let snapshot = GroupSnapshot {
                group: g,
                committed_index: applied,
                state: r.state.encode_snapshot(),
                checksum: r.checksum,
                committed_term: term,
                hard_term: hard.term,
                hard_vote: hard.vote.unwrap_or(0),
                entries,
            };
            r.disk.snapshot = Some(snapshot);
            r.disk.records.clear();
            let keep_from = (applied - r.shadow_snap.index) as usize;
            r.shadow.drain(..keep_from.min(r.shadow.len()));
            r.shadow_snap = meta;
            self.cov.compactions += 1;
        }
        Ok(())
    }

    // ---- clients ----

    fn clients_step(&mut self) -> Result<(), String> {
        for c in 0..self.clients.len() {
            let tick = self.tick;
            let timeout = self.params.client_timeout_ticks;
            let client = &self.clients[c];
            match &client.pending {
                None => {
                    if !self.rng.chance(self.params.request_percent) {
                        continue;
                    }
                    let request = self.new_request(c);
                    self.clients[c].pending = Some(request);
                    self.submit(c);
                }
                Some(req) => {
                    let timed_out = tick >= req.sent_tick + timeout;
                    if !(timed_out || req.resend) {
                        continue;
                    }
                    if timed_out {
                        self.cov.retries += 1;
                        if let RequestKind::Append { key: None, .. } = req.kind {
                            // Without a key a retry could append twice: give up.
                            self.clients[c].pending = None;
                            continue;
                        }
                        // Try another node.
                        let g = self.clients[c].group;
                        self.clients[c].target = self.random_voter(g);
                    }
                    self.submit(c);
                }
            }
        }
        Ok(())
    }

    fn new_request(&mut self, c: usize) -> Request {
        let id = self.next_request;
        self.next_request += 1;
        let client = &self.clients[c];
        let kind = if !client.created {
            RequestKind::Create
        } else {
            let n = client.next_n;
            let keyed = !self.rng.chance(10);
            let key = keyed.then(|| format!("c{c}-{n}"));
            let mut body = format!(r#"{{"type":"t","payload":{{"c":{c},"n":{n}}}"#);
            if let Some(k) = &key {
                body.push_str(&format!(r#","idempotency_key":"{k}""#));
            }
            if self.rng.chance(20) {
                body.push_str(&format!(r#","expected_seq":{}"#, self.clients[c].known_seq));
            }
            body.push('}');
            self.clients[c].next_n += 1;
            RequestKind::Append { body, key }
        };
        Request {
            id,
            kind,
            sent_tick: self.tick,
            resend: false,
        }
    }

    fn submit(&mut self, c: usize) {
        let tick = self.tick;
        let client = &mut self.clients[c];
        let request = client.pending.as_mut().expect("pending");
        request.sent_tick = tick;
        request.resend = false;
        let request = request.clone();
        let node = client.target;
        self.trace.add(0xC1 ^ request.id ^ (node << 48));
        self.send_client(ClientFlight::Request {
            node,
            client: c,
            request,
        });
    }

    /// A node takes a client's request as the server's shard does (`src/shard/mod.rs`
    /// `route`): the leader serves it, a follower that knows the leader forwards it
    /// there (when the seed forwards), any other node answers `NotLeader`.
    fn handle_request(&mut self, id: NodeId, c: usize, request: Request) -> Result<(), String> {
        if !self.node(id).up {
            return Ok(());
        }
        let g = self.clients[c].group;
        let session = self.clients[c].session.clone();
        let to = ReplyTo::Client {
            client: c,
            request: request.id,
        };
        let op = match &request.kind {
            RequestKind::Create => Op::Create {
                id: session,
                title: None,
                metadata: "{}".to_string(),
            },
            RequestKind::Append { body, .. } => Op::Append {
                id: session,
                event: validate::validate_append(body.as_bytes()).expect("valid body"),
            },
        };
        let forwarding = self.params.forwarding;
        let r = self.rep(id, g);
        if !r.leading && forwarding {
            if let Some(leader) = r.raft.leader().filter(|&l| l != id) {
                let waiter = ForwardWaiter {
                    client: c,
                    request: request.id,
                };
                return self.forward(id, g, leader, &op, waiter);
            }
        }
        self.serve(id, g, to, op)
    }

    /// A node serves an op (a client's, or one forwarded to it) as the server's shard
    /// does (`src/shard/mod.rs`: create, append): decide against the leader's state, then
    /// propose and wait for the entry, or wait for the log's last entry (a reply decided
    /// against in-flight entries). A node that does not lead answers `NotLeader`.
    fn serve(&mut self, id: NodeId, g: u16, to: ReplyTo, op: Op) -> Result<(), String> {
        let now_us = (self.tick * 1000 + self.round) as i64;
        let r = self.rep(id, g);
        if !r.leading {
            let leader = r.raft.leader();
            return self.answer(id, to, Reply::Error(ApiError::NotLeader { leader }));
        }
        // What to propose (with its reply once committed), or the reply to settle.
        let (command, reply): (Option<Command>, Reply) = match op {
            Op::Create { id: session, .. } => {
                let new = NewSession {
                    id: Some(session.clone()),
                    title: None,
                    metadata: "{}".to_string(),
                };
                let created = Reply::Session(String::new());
                match r.state.decide_create(&new, session, now_us) {
                    Ok(cmd) => (Some(cmd), created),
                    Err(CreateError::SessionExists) => (None, created),
                }
            }
            Op::Append { id: session, event } => {
                match r.state.decide_append(&session, &event, now_us) {
                    Ok(AppendDecision::Append(cmd)) => {
                        let Command::Append(a) = &cmd else {
                            unreachable!("append decision")
                        };
                        let seq = a.seq;
                        (Some(cmd), appended(seq, false))
                    }
                    Ok(AppendDecision::Deduped { seq }) => {
                        self.cov.dedupe_hits += 1;
                        (None, appended(seq, true))
                    }
                    Err(
                        e @ (AppendError::SessionNotFound
                        | AppendError::ExpectedSeqConflict { .. }),
                    ) => (None, Reply::Error(e.into())),
                    Err(e) => {
                        return Err(format!(
                            "node {id} group {g}: {to:?} refused: {e:?} (the same content is always retried with the same key)"
                        ))
                    }
                }
            }
            other => return Err(format!("node {id}: the simulation sends no {other:?}")),
        };
        let r = self.rep(id, g);
        let wait_for = match command {
            Some(command) => r.core.propose(command).ok(),
            None => Some(r.core.settle_point()),
        };
        let now = match wait_for {
            None => Some(Reply::Error(ApiError::Unavailable)),
            Some((index, term)) => match r.core.outcome(index, term) {
                Some(true) => Some(reply),
                Some(false) => Some(Reply::Error(ApiError::CommitUnknown)),
                None => {
                    r.core.wait(index, term, Waiter { to, reply });
                    None
                }
            },
        };
        self.process(id, g)?;
        match now {
            Some(reply) => self.answer(id, to, reply),
            None => Ok(()),
        }
    }

    /// Node `id` sends `reply` where it goes: to the client, or back to the forwarding
    /// node in the server's bytes.
    fn answer(&mut self, id: NodeId, to: ReplyTo, reply: Reply) -> Result<(), String> {
        match to {
            ReplyTo::Client { client, request } => self.send_client(ClientFlight::Reply {
                client,
                request,
                reply,
            }),
            ReplyTo::Peer(via) => {
                let body = encode_reply(&reply)
                    .map_err(|e| format!("node {id}: reply {reply:?} does not encode: {e}"))?;
                let frame = PeerFrame::Response {
                    id: via.id,
                    request_crc: via.request_crc,
                    body,
                };
                self.send_peer(id, via.to, via.shard, &frame);
            }
        }
        Ok(())
    }

    /// Node `id`, not leading group `g`, forwards `op` to `leader` as the server's
    /// `forward` does: registered with `Forwards` on the current connection, then sent.
    fn forward(
        &mut self,
        id: NodeId,
        g: u16,
        leader: NodeId,
        op: &Op,
        waiter: ForwardWaiter,
    ) -> Result<(), String> {
        if !self.node(leader).up {
            // No connection: not sent, so the client may safely send again.
            let to = ReplyTo::Client {
                client: waiter.client,
                request: waiter.request,
            };
            return self.answer(id, to, Reply::Error(ApiError::Unavailable));
        }
        let body = encode_op(op).map_err(|e| format!("node {id}: {op:?} does not encode: {e}"))?;
        let shard = shard_of(g, self.params.shards);
        let conn = self.connect(id, leader, shard);
        let deadline = self.tick + self.params.client_timeout_ticks;
        let forwarder = &mut self.node_mut(id).forwarders[shard];
        let request = forwarder.forwards.start(leader, conn, &body, waiter);
        forwarder.outstanding.push(Outstanding {
            id: request,
            to: leader,
            conn,
            group: g,
            deadline,
            waiter,
        });
        self.cov.forwards += 1;
        self.trace.add(0xF0 ^ request.seq ^ (leader << 48));
        self.note(|| {
            format!(
                "node {id} forwards {request} (client {}) to {leader} on connection {conn}",
                waiter.client
            )
        });
        self.send_peer(id, leader, shard, &PeerFrame::Request { id: request, body });
        Ok(())
    }

    /// The server's `forward` loop, once a tick: a forwarded request is given up at its
    /// deadline, when this replica sees another leader, or when its connection was
    /// replaced. The client is told the outcome is unknown (it may have been applied).
    fn watch_forwards(&mut self, id: NodeId) {
        for shard in 0..self.params.shards {
            let outstanding = std::mem::take(&mut self.node_mut(id).forwarders[shard].outstanding);
            let mut keep = Vec::with_capacity(outstanding.len());
            for o in outstanding {
                let leader = self
                    .node(id)
                    .replicas
                    .get(&o.group)
                    .and_then(|r| r.raft.leader());
                let moved = leader.is_some_and(|l| l != o.to);
                let replaced = self.connection(id, o.to, shard) != Some(o.conn);
                if self.tick < o.deadline && !moved && !replaced {
                    keep.push(o);
                    continue;
                }
                self.node_mut(id).forwarders[shard].forwards.cancel(o.id);
                self.cov.forwards_abandoned += 1;
                self.note(|| {
                    format!(
                        "node {id} gives up forwarded {} (moved {moved}, replaced {replaced})",
                        o.id
                    )
                });
                self.send_client(ClientFlight::Reply {
                    client: o.waiter.client,
                    request: o.waiter.request,
                    reply: Reply::Error(ApiError::CommitUnknown),
                });
            }
            self.node_mut(id).forwarders[shard].outstanding = keep;
        }
    }

    /// A peer frame arrives (the server's `run_incoming`): a forwarded request to serve,
    /// or the reply to one.
    fn on_peer_frame(&mut self, f: PeerFlight) -> Result<(), String> {
        let frame = peer::decode(&f.bytes).map_err(|e| {
            format!(
                "node {}: peer frame from {} does not decode: {e}",
                f.to, f.from
            )
        })?;
        match frame {
            PeerFrame::Request { id, body } => {
                let via = Via {
                    to: f.from,
                    shard: f.shard,
                    id,
                    request_crc: crc32fast::hash(&body),
                };
                let op =
                    decode_op(&body).map_err(|e| format!("node {}: forwarded op: {e}", f.to))?;
                let session = match &op {
                    Op::Create { id, .. } | Op::Append { id, .. } => id.clone(),
                    other => return Err(format!("node {}: forwarded {other:?}", f.to)),
                };
                let g = self
                    .clients
                    .iter()
                    .find(|c| c.session == session)
                    .map(|c| c.group)
                    .ok_or_else(|| format!("forwarded op for unknown session {session}"))?;
                self.serve(f.to, g, ReplyTo::Peer(via), op)
            }
            PeerFrame::Response {
                id,
                request_crc,
                body,
            } => self.complete_forward(&f, id, request_crc, &body),
            _ => Err(format!(
                "node {}: unexpected peer frame from {}",
                f.to, f.from
            )),
        }
    }

    /// A reply to a forwarded request: it completes the request it answers, or is
    /// dropped (`shards::forwarding`); one that names a waiting request with another body
    /// stops the run, as it stops the server.
    fn complete_forward(
        &mut self,
        f: &PeerFlight,
        id: RequestId,
        request_crc: u32,
        body: &[u8],
    ) -> Result<(), String> {
        let me = f.to;
        let forwarder = &mut self.node_mut(me).forwarders[f.shard];
        let earlier_process = id.incarnation != forwarder.incarnation;
        match forwarder.forwards.reply(f.from, f.conn, id, request_crc) {
            ReplyMatch::Complete(waiter) => {
                forwarder.outstanding.retain(|o| o.id.seq != id.seq);
                let reply: Reply = decode_reply(body)
                    .map_err(|e| format!("node {me}: forwarded reply: {e}"))?;
                if matches!(reply, Reply::Appended { .. }) {
                    self.cov.forwarded_acks += 1;
                }
                self.note(|| format!("node {me}: {id} answered by {}: {reply:?}", f.from));
                self.send_client(ClientFlight::Reply {
                    client: waiter.client,
                    request: waiter.request,
                    reply,
                });
            }
            ReplyMatch::Stale => {
                self.cov.stale_replies_dropped += 1;
                self.cov.stale_earlier_process += u64::from(earlier_process);
                self.note(|| format!("node {me} drops a stale reply to {id} from {} on connection {}", f.from, f.conn));
            }
            ReplyMatch::Mismatch {
                sent_crc,
                answered_crc,
            } => {
                return Err(format!(
                    "node {me}: node {} answered forwarded request {id} for a body with crc {answered_crc:#010x}, but the request sent with that id has crc {sent_crc:#010x}: two requests share an id",
                    f.from
                ))
            }
        }
        Ok(())
    }

    fn handle_reply(&mut self, c: usize, request: u64, reply: Reply) -> Result<(), String> {
        let tick = self.tick;
        let healing = self.healing;
        let client = &mut self.clients[c];
        let Some(pending) = &client.pending else {
            return Ok(());
        };
        if pending.id != request {
            return Ok(()); // a late answer to an earlier request
        }
        self.trace.add(0xAC ^ request);
        match reply {
            Reply::Appended { seq, deduped, .. } => {
                let RequestKind::Append { body, key } = pending.kind.clone() else {
                    return Err(format!("client {c}: append ack for a create"));
                };
                let event = validate::validate_append(body.as_bytes()).expect("valid body");
                client.known_seq = client.known_seq.max(seq);
                let group = client.group;
                let session = client.session.clone();
                client.pending = None;
                self.cov.acks += 1;
                let _ = deduped;
                self.checker.on_ack(Ack {
                    group,
                    session,
                    key,
                    digest: event.digest,
                    seq,
                    tick,
                    after_heal: healing,
                })?;
            }
            Reply::Session(_) => {
                if !matches!(pending.kind, RequestKind::Create) {
                    return Err(format!("client {c}: create ack for an append"));
                }
                client.created = true;
                client.pending = None;
            }
            Reply::Error(ApiError::SessionNotFound) => {
                client.created = false;
                client.pending = None;
            }
            Reply::Error(ApiError::ExpectedSeqConflict { current_seq, .. }) => {
                client.known_seq = current_seq;
                client.pending = None;
                self.cov.expected_seq_conflicts += 1;
            }
            Reply::Error(ApiError::NotLeader { leader: hint }) => {
                let g = client.group;
                let target = match hint {
                    Some(h) => h,
                    None => self.random_voter(g),
                };
                let client = &mut self.clients[c];
                client.target = target;
                if let Some(p) = client.pending.as_mut() {
                    p.resend = true;
                }
            }
            Reply::Error(ApiError::Unavailable) => {
                if let Some(p) = client.pending.as_mut() {
                    p.resend = true;
                }
            }
            Reply::Error(ApiError::CommitUnknown) => {
                // As a timeout: the next client step retries (another node, or gives up
                // an append without a key).
                if let Some(p) = client.pending.as_mut() {
                    p.sent_tick = 0;
                }
            }
            other => return Err(format!("client {c}: unexpected reply {other:?}")),
        }
        Ok(())
    }

    /// Clients of group `g` send to `node` next (they keep talking to an old leader).
    pub fn point_clients(&mut self, g: u16, node: NodeId) {
        for c in self.clients.iter_mut().filter(|c| c.group == g) {
            c.target = node;
        }
    }

    pub fn voters_of(&self, g: u16) -> &[NodeId] {
        &self.voters[&g]
    }

    /// The leader of a group with the highest term among live nodes.
    pub fn leader_of(&self, g: u16) -> Option<NodeId> {
        self.voters[&g]
            .iter()
            .filter(|&&v| self.node(v).up)
            .map(|&v| (&self.node(v).replicas[&g].raft, v))
            .filter(|(r, _)| r.role() == Role::Leader)
            .max_by_key(|(r, _)| r.term())
            .map(|(_, v)| v)
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.node(id).up
    }

    pub fn msg_kind(body: &Body<Command>) -> u64 {
        match body {
            Body::PreVote { .. } => 1,
            Body::PreVoteResponse { .. } => 2,
            Body::Vote { .. } => 3,
            Body::VoteResponse { .. } => 4,
            Body::Append { .. } => 5,
            Body::AppendResponse(_) => 6,
            Body::Heartbeat { .. } => 7,
            Body::HeartbeatResponse => 8,
            Body::InstallSnapshot { .. } => 9,
            Body::InstallSnapshotResponse { .. } => 10,
            Body::TimeoutNow => 11,
        }
    }
}
