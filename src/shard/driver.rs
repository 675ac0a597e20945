//! The driver of the shard's replicas (`shards::replica`): every group's steps run
//! here, and what a step asks of the shell (`Effects`: send, write, index and publish,
//! release) is handed to the outbox, the committer, the event index and the waiting
//! requests. The driver task takes each executor turn's proposals; the clock task
//! ticks every group; frames from peers step their groups as they arrive.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures::channel::oneshot;
use glommio::channels::local_channel::LocalReceiver;
use shards::entry::Command;
use shards::raft::{Entry, Message, Payload, Role, SnapshotMeta};
use shards::replica::{hard_state_record, Persisted, Shell, Write};
use shards::validate::render_event;

use super::commit::WriteUnit;
use super::ShardCore;

/// What a group's replica asks of this shard (`shards::replica::Shell`) while one of
/// its steps runs; the shard's groups are borrowed meanwhile.
pub(super) struct Effects<'a> {
    pub(super) core: &'a ShardCore,
    pub(super) group: u16,
}

impl Shell<oneshot::Sender<bool>> for Effects<'_> {
    fn send(&mut self, msg: Message<Command>) {
        self.core.queue_message(self.group, msg);
    }

    fn write(&mut self, write: Write) {
        self.core.queue_unit(WriteUnit {
            group: self.group,
            records: write.records,
            durable: write.durable,
        });
    }

    /// A committed event becomes readable and its tails wake.
    fn applied(&mut self, entry: &Entry<Command>, place: &Persisted) {
        let Payload::Data(Command::Append(a)) = &entry.payload else {
            return;
        };
        let mut store = self.core.store.borrow_mut();
        let indexed = store.last_seq(&a.session_id);
        if a.seq == indexed + 1 {
            let text: Arc<str> = Arc::from(render_event(a));
            let (epoch, offset) = (place.loc.epoch, place.loc.offset);
            store.insert_at(
                &a.session_id,
                a.seq,
                epoch,
                offset,
                place.sealed,
                Some(text),
            );
        } else if a.seq > indexed + 1 {
            panic!(
                "fail-stop: event index has a gap: shard {} group {} session {} seq {} \
                 committed at index {} while the index ends at seq {indexed}",
                self.core.index, self.group, a.session_id, a.seq, entry.index
            );
        }
        drop(store);
        self.core.wake_tails(&a.session_id);
    }

    fn release(&mut self, waiter: oneshot::Sender<bool>, committed: bool) {
        let _ = waiter.send(committed);
    }

    fn leadership(&mut self, leading: bool) {
        let mut stats = self.core.stats.borrow_mut();
        if leading {
            stats.elections_won += 1;
        } else {
            stats.leaderships_lost += 1;
        }
    }

    fn installed(&mut self, meta: SnapshotMeta, events: usize) {
        tracing::info!(
            shard = self.core.index,
            group = self.group,
            index = meta.index,
            events,
            "installing snapshot"
        );
        self.core.stats.borrow_mut().snapshots_installed += 1;
    }
}

/// The markers of a catching-up shard, removed once none of its groups is catching up
/// any more. Owned by the clock task, which checks after every tick.
pub(super) struct CatchUpWatch {
    /// A rebuild is under way and some group of this shard is still catching up.
    pub(super) rebuild: Option<Arc<crate::rebuild::RebuildTracker>>,
    /// The log's last batch was damaged (`start::DAMAGED_TAIL_MARKER`): the marker is
    /// removed once no group of this shard is catching up any more.
    pub(super) tail_marker: Option<PathBuf>,
}

impl ShardCore {
    /// Starts the Raft clock and hands out what recovery left committed. A group with
    /// one voter elects itself at once.
    pub(super) async fn start_raft(self: &Rc<Self>, watch: CatchUpWatch) {
        self.peers.borrow_mut().me = Rc::downgrade(self);
        let ids = self.group_ids();
        for &group in &ids {
            self.process(group);
        }
        let election_ticks = self.raft_settings.election_ticks;
        for &group in &ids {
            let alone = self
                .groups
                .borrow()
                .get(&group)
                .is_some_and(|g| g.raft.voters().len() == 1);
            if !alone {
                continue;
            }
            for _ in 0..election_ticks * 4 {
                let leading = {
                    let mut groups = self.groups.borrow_mut();
                    let g = groups.get_mut(&group).expect("listed");
                    g.tick();
                    g.raft.role() == Role::Leader
                };
                self.process(group);
                if leading {
                    break;
                }
            }
        }
        glommio::spawn_local(self.clone().run_clock(watch)).detach();
    }

    /// Hands the proposals of each executor turn to Raft, group by group, and sends
    /// what that produced.
    pub(super) async fn run_driver(self: Rc<Self>, wake: LocalReceiver<()>) {
        while wake.recv().await.is_some() {
            let groups = std::mem::take(&mut *self.proposed.borrow_mut());
            for group in groups {
                self.process(group);
            }
            self.flush_outbox();
        }
    }

    pub(super) fn group_ids(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.groups.borrow().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Ticks every group, compacts applied Raft logs, sends what that produced.
    async fn run_clock(self: Rc<Self>, mut watch: CatchUpWatch) {
        let tick = self.raft_settings.tick;
        let keep = self.raft_settings.log_entries;
        let ids = self.group_ids();
        let mut next = Instant::now() + tick;
        loop {
            let now = Instant::now();
            if next > now {
                glommio::timer::sleep(next - now).await;
            }
            next += tick;
            if Instant::now() > next + tick * 10 {
                next = Instant::now() + tick; // far behind (a stall): do not burst
            }
            for &group in &ids {
                {
                    let mut groups = self.groups.borrow_mut();
                    let g = groups.get_mut(&group).expect("listed");
                    g.tick();
                    g.compact(keep);
                }
                self.process(group);
            }
            self.feed_archive();
            self.flush_outbox();
            self.check_caught_up(&mut watch);
        }
    }

    /// A rebuild is under way: once no group of this shard is catching up any more
    /// (each persisted what a leader of its term had committed), the shard reports it
    /// once; the last shard removes the marker (`crate::rebuild`).
    fn check_caught_up(&self, watch: &mut CatchUpWatch) {
        if watch.rebuild.is_none() && watch.tail_marker.is_none() {
            return;
        }
        if self
            .groups
            .borrow()
            .values()
            .any(|g| g.raft.is_catching_up())
        {
            return;
        }
        if let Some(tracker) = watch.rebuild.take() {
            tracker.shard_caught_up(self.index);
        }
        if let Some(marker) = watch.tail_marker.take() {
            // Blocking, once: unlink, then make the unlink durable. If it fails the marker
            // stays and the next start catches up once more, which is safe.
            let removed = std::fs::remove_file(&marker)
                .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
            match removed {
                Ok(()) => tracing::info!(
                    shard = self.index,
                    "caught up after a damaged log tail: every group votes again"
                ),
                Err(e) => {
                    tracing::error!(shard = self.index, error = %e, "removing {} failed", marker.display())
                }
            }
        }
    }

    /// Writes each group's term and vote as log records (the hard state a rebuild
    /// carried over, which Raft already holds but the new log does not).
    pub(super) fn write_hard_states(&self, states: Vec<(u16, shards::raft::HardState)>) {
        for (group, h) in states {
            self.queue_unit(WriteUnit::records_only(
                group,
                vec![hard_state_record(group, h)],
            ));
        }
    }

    /// Performs every Ready the group has (`shards::replica`), and starts building the
    /// snapshots its followers need. A replica that must stop stops the process.
    pub(super) fn process(&self, group: u16) {
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(&group) else {
            return;
        };
        let snapshot_for = match g.step(&mut Effects { core: self, group }) {
            Ok(peers) => peers,
            Err(stop) => panic!("fail-stop: shard {} group {group}: {stop}", self.index),
        };
        for peer in snapshot_for {
            match self.peers.borrow().me.upgrade() {
                Some(me) => {
                    glommio::spawn_local(me.build_snapshot(group, peer)).detach();
                }
                None => {
                    g.building_snapshot = false;
                    g.raft.snapshot_failed(peer);
                }
            }
        }
    }

    pub(super) fn step(&self, group: u16, mut msg: Message<Command>) {
        if !self.admit_message(&mut msg) {
            self.stats.borrow_mut().storage_deferred += 1;
            return;
        }
        {
            let mut groups = self.groups.borrow_mut();
            let Some(g) = groups.get_mut(&group) else {
                return;
            };
            if msg.to != self.node_id || !g.raft.voters().contains(&msg.from) {
                return;
            }
            g.raft.step(msg);
        }
        self.process(group);
    }
}
