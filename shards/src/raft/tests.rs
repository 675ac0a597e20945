//! Raft tests named after the paper sections they check, on the in-memory [`Sim`], plus
//! a randomized simulation over many seeds.

use super::sim::{NetConfig, Sim};
use super::{
    AppendResponse, Body, Config, Entry, HardState, Message, Payload, ProposeError, RaftNode,
    Restored, Role, SnapshotMeta,
};

fn config() -> Config {
    Config {
        election_ticks: 10,
        heartbeat_ticks: 2,
        max_inflight: 4,
        max_entries_per_msg: 8,
        max_bytes_per_msg: 1 << 20,
        snapshot_chunk_bytes: 64,
        max_uncommitted_entries: 10_000,
        pre_vote: true,
        check_quorum: true,
    }
}

fn elect(sim: &mut Sim) -> u64 {
    sim.run_until(200, |s| s.leader().is_some())
        .expect("a leader is elected");
    sim.leader().unwrap()
}

/// Propose `count` values at the leader and run until every live node applied them.
fn commit_values(sim: &mut Sim, count: u64, base: u64) {
    let leader = sim.leader().expect("leader");
    for v in 0..count {
        sim.propose(leader, base + v).expect("leader accepts");
    }
    let target = sim.raft(leader).last_index();
    let quorum = sim.nodes.len() / 2 + 1;
    sim.run_until(300, |s| {
        s.nodes[&leader].applied.len() as u64 >= target
            && s.nodes
                .values()
                .filter(|n| n.applied.len() as u64 >= target)
                .count()
                >= quorum
    })
    .expect("values commit on a majority");
}

#[test]
fn s5_2_leader_elected_with_majority() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 1);
    let leader = elect(&mut sim);
    sim.run_ticks(20);
    assert_eq!(
        sim.leader(),
        Some(leader),
        "a stable cluster keeps its leader"
    );
    for id in sim.ids() {
        assert_eq!(
            sim.raft(id).leader(),
            Some(leader),
            "node {id} follows the leader"
        );
    }

    // 5 nodes, 2 down: the remaining 3 are a majority and elect; 3 down: no leader.
    let mut sim = Sim::new(5, config(), NetConfig::default(), 2);
    sim.crash(4);
    sim.crash(5);
    let leader = elect(&mut sim);
    assert!(leader <= 3);
    let mut sim = Sim::new(5, config(), NetConfig::default(), 3);
    for id in [3, 4, 5] {
        sim.crash(id);
    }
    sim.run_ticks(100);
    assert_eq!(sim.leader(), None, "a minority never elects a leader");
}

#[test]
fn s5_2_split_vote_resolves() {
    let mut cfg = config();
    cfg.pre_vote = false;
    let mut sim = Sim::new(4, cfg, NetConfig::default(), 4);
    // Nodes 1 and 2 campaign at once in term 1; 3 only hears 1, 4 only hears 2: 2-2.
    sim.filter = Some(Box::new(|m: &Message<u64>| {
        !matches!(
            (m.from, m.to, &m.body),
            (2, 3, Body::Vote { .. }) | (1, 4, Body::Vote { .. })
        )
    }));
    for id in [1, 2] {
        sim.raft_mut(id).step(Message {
            from: 3,
            to: id,
            term: 0,
            body: Body::TimeoutNow,
        });
        sim.process(id);
    }
    sim.settle();
    assert!(
        sim.ids()
            .iter()
            .all(|&id| sim.raft(id).role() != Role::Leader),
        "term 1 is split"
    );
    assert_eq!(sim.raft(1).term(), 1);
    sim.filter = None;
    let leader = elect(&mut sim);
    assert!(
        sim.raft(leader).term() >= 2,
        "a later term resolves the split vote"
    );
}

#[test]
fn s5_3_follower_log_converges_after_conflict() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 5);
    let old = elect(&mut sim);
    commit_values(&mut sim, 3, 100);
    // The old leader, cut off, appends entries that never commit.
    sim.isolate(old);
    for v in 0..5 {
        sim.propose(old, 900 + v).unwrap();
    }
    let new = sim
        .run_until(200, |s| s.leader().is_some_and(|l| l != old))
        .map(|_| sim.leader().unwrap())
        .unwrap();
    commit_values(&mut sim, 8, 200);
    sim.heal();
    sim.run_until(200, |s| {
        s.applied_agree() && s.raft(old).last_index() == s.raft(new).last_index()
    })
    .expect("the old leader's log converges");
    assert_eq!(sim.raft(old).role(), Role::Follower);
    assert!(
        sim.stats.truncations >= 1,
        "the conflicting suffix was truncated"
    );
    assert!(
        !sim.nodes[&old]
            .applied
            .iter()
            .any(|v| (900..905).contains(v)),
        "uncommitted entries never apply"
    );
    sim.check_logs();
}

#[test]
fn s5_4_1_candidate_with_stale_log_loses() {
    // Unit level: a voter refuses a candidate whose log is behind (§5.4.1).
    let restored = Restored {
        hard_state: HardState {
            term: 3,
            vote: None,
            commit: 0,
        },
        snapshot: SnapshotMeta::default(),
        entries: vec![
            Entry {
                term: 1,
                index: 1,
                payload: Payload::Data(1u64),
            },
            Entry {
                term: 3,
                index: 2,
                payload: Payload::Data(2),
            },
        ],
    };
    let mut voter = RaftNode::new(config(), 1, vec![1, 2, 3], 7, Some(restored));
    voter.step(Message {
        from: 2,
        to: 1,
        term: 4,
        body: Body::Vote {
            last_index: 5,
            last_term: 2,
            transfer: false,
        },
    });
    let ready = voter.ready();
    let granted: Vec<_> = ready
        .persisted_messages
        .iter()
        .map(|m| m.body.clone())
        .collect();
    assert_eq!(
        granted,
        vec![Body::VoteResponse { granted: false }],
        "older last term loses"
    );
    voter.step(Message {
        from: 3,
        to: 1,
        term: 4,
        body: Body::Vote {
            last_index: 2,
            last_term: 3,
            transfer: false,
        },
    });
    let ready = voter.ready();
    assert_eq!(
        ready.persisted_messages[0].body,
        Body::VoteResponse { granted: true },
        "equal log wins"
    );

    // Cluster level: a node that missed committed entries never becomes leader.
    let mut sim = Sim::new(3, config(), NetConfig::default(), 8);
    let leader = elect(&mut sim);
    let stale = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    sim.isolate(stale);
    commit_values(&mut sim, 5, 10);
    sim.crash(leader);
    sim.heal();
    let mut stale_led = false;
    sim.run_until(300, |s| {
        stale_led |= s.raft(stale).role() == Role::Leader;
        s.leader().is_some()
    })
    .expect("the up-to-date node is elected");
    assert!(!stale_led, "the stale node never won");
    assert_ne!(sim.leader(), Some(stale));
}

/// Becomes leader of term 3 over a restored log whose last entry (index 2) is of term 2.
fn leader_over_previous_term_entry() -> RaftNode<u64> {
    let restored = Restored {
        hard_state: HardState {
            term: 2,
            vote: None,
            commit: 0,
        },
        snapshot: SnapshotMeta::default(),
        entries: vec![
            Entry {
                term: 1,
                index: 1,
                payload: Payload::Data(1u64),
            },
            Entry {
                term: 2,
                index: 2,
                payload: Payload::Data(2),
            },
        ],
    };
    let mut node = RaftNode::new(config(), 1, vec![1, 2, 3], 9, Some(restored));
    while node.role() != Role::PreCandidate {
        node.tick();
    }
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::PreVoteResponse { granted: true },
    });
    assert_eq!(node.role(), Role::Candidate);
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::VoteResponse { granted: true },
    });
    assert_eq!(node.role(), Role::Leader);
    node
}

#[test]
fn s5_4_2_entry_of_previous_term_not_committed_by_counting() {
    let mut node = leader_over_previous_term_entry();
    let ready = node.ready();
    let noop = ready.entries_to_persist.last().unwrap().clone();
    assert_eq!(
        (noop.index, noop.term, noop.payload),
        (3, 3, Payload::Noop),
        "a new leader appends a no-op"
    );
    node.on_persisted(3, 3);
    // A majority (leader + node 2) holds index 2, but it is of term 2: no commit (Figure 8).
    let accepted = |m| Body::AppendResponse(AppendResponse::Accepted { match_index: m });
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: accepted(2),
    });
    assert_eq!(
        node.commit_index(),
        0,
        "§5.4.2: an entry of a previous term does not commit by counting"
    );
    // Once the no-op of term 3 is on a majority, it commits, and everything before it.
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: accepted(3),
    });
    assert_eq!(node.commit_index(), 3);
    let committed: Vec<u64> = node
        .ready()
        .committed_entries
        .iter()
        .map(|e| e.index)
        .collect();
    assert_eq!(committed, vec![1, 2, 3]);
}

#[test]
fn commit_requires_persisted_majority_not_sent() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 10);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 1, 1);
    let followers: Vec<u64> = sim.ids().into_iter().filter(|&id| id != leader).collect();
    // Followers receive the entry at once but take long to persist it.
    for &f in &followers {
        sim.nodes.get_mut(&f).unwrap().persist_rounds = Some(30);
    }
    let index = sim.propose(leader, 42).unwrap();
    for _ in 0..20 {
        sim.round();
    }
    for &f in &followers {
        assert_eq!(
            sim.raft(f).last_index(),
            index,
            "follower {f} received the entry"
        );
    }
    assert!(
        sim.raft(leader).commit_index() < index,
        "received is not persisted: no commit yet"
    );
    sim.run_until(50, |s| s.raft(leader).commit_index() >= index)
        .expect("commits once persisted");
    for _ in 0..40 {
        sim.round();
    }

    // The leader counts itself only after its own persist: with one follower cut off,
    // a slow leader disk holds the commit back even though the other follower acked.
    for &f in &followers {
        sim.nodes.get_mut(&f).unwrap().persist_rounds = None;
    }
    sim.nodes.get_mut(&leader).unwrap().persist_rounds = Some(30);
    sim.isolate(followers[1]);
    let index = sim.propose(leader, 43).unwrap();
    for _ in 0..20 {
        sim.round();
    }
    assert_eq!(
        sim.raft(followers[0]).persisted_index(),
        index,
        "the follower persisted it"
    );
    assert!(
        sim.raft(leader).commit_index() < index,
        "the leader's own unpersisted copy does not count"
    );
    sim.run_until(50, |s| s.raft(leader).commit_index() >= index)
        .expect("commits after the leader's persist");
}

#[test]
fn prevote_partitioned_node_does_not_disrupt_on_rejoin() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 11);
    let leader = elect(&mut sim);
    let term = sim.raft(leader).term();
    let lonely = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    sim.isolate(lonely);
    sim.run_ticks(100);
    assert_eq!(
        sim.raft(lonely).term(),
        term,
        "pre-vote: an isolated node does not bump its term"
    );
    sim.heal();
    sim.run_ticks(50);
    assert_eq!(
        sim.leader(),
        Some(leader),
        "the rejoining node does not disrupt the leader"
    );
    assert_eq!(sim.raft(leader).term(), term);
    assert_eq!(sim.raft(lonely).leader(), Some(leader));
}

#[test]
fn check_quorum_partitioned_leader_steps_down() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 12);
    let old = elect(&mut sim);
    sim.isolate(old);
    let ticks = sim
        .run_until(100, |s| s.raft(old).role() != Role::Leader)
        .expect("it steps down");
    assert!(
        ticks <= 2 * config().election_ticks as u64,
        "within two election timeouts ({ticks})"
    );
    let new = sim
        .run_until(200, |s| s.leader().is_some_and(|l| l != old))
        .map(|_| sim.leader().unwrap());
    assert!(new.is_some(), "the majority elects a new leader");
    assert!(matches!(
        sim.propose(old, 1),
        Err(ProposeError::NotLeader { .. })
    ));
}

#[test]
fn fast_backtracking_uses_few_round_trips() {
    let mut cfg = config();
    cfg.max_entries_per_msg = 100;
    let mut sim = Sim::new(3, cfg, NetConfig::default(), 13);
    let old = elect(&mut sim);
    sim.isolate(old);
    for v in 0..60 {
        sim.propose(old, 1000 + v).unwrap();
    }
    sim.run_until(200, |s| s.leader().is_some_and(|l| l != old))
        .unwrap();
    commit_values(&mut sim, 60, 2000);
    sim.record_sent = true;
    sim.heal();
    sim.run_until(200, |s| s.applied_agree())
        .expect("converges");
    let rejections = sim
        .sent_log
        .iter()
        .filter(|m| {
            m.from == old
                && matches!(
                    m.body,
                    Body::AppendResponse(AppendResponse::Rejected { .. })
                )
        })
        .count();
    assert!(
        rejections <= 3,
        "{rejections} rejections to skip 60 conflicting entries"
    );
}

#[test]
fn inflight_pipeline_is_bounded() {
    let mut cfg = config();
    cfg.max_entries_per_msg = 1;
    let max_inflight = cfg.max_inflight;
    let mut sim = Sim::new(3, cfg, NetConfig::default(), 14);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 1, 1);
    let follower = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    // Acknowledgements from the follower are lost: the pipeline fills and stops.
    sim.cut.insert((follower, leader));
    sim.record_sent = true;
    for v in 0..50 {
        sim.propose(leader, 100 + v).unwrap();
    }
    sim.settle();
    let appends = sim
        .sent_log
        .iter()
        .filter(|m| {
            m.to == follower
                && matches!(&m.body, Body::Append { entries, .. } if !entries.is_empty())
        })
        .count();
    assert_eq!(
        appends, max_inflight,
        "exactly max_inflight AppendEntries in flight"
    );
    sim.heal();
    let target = sim.raft(leader).last_index();
    sim.run_until(200, |s| s.nodes[&follower].applied.len() as u64 >= target)
        .expect("catches up after the heal");
}

#[test]
fn install_snapshot_for_lagging_follower_in_chunks() {
    let net = NetConfig {
        drop_percent: 10,
        delay_rounds_max: 3,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(3, config(), net, 15);
    let leader = elect(&mut sim);
    let lagging = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    sim.crash(lagging);
    let leader = sim.leader().unwrap();
    commit_values(&mut sim, 40, 500);
    let applied = sim.raft(leader).applied_index();
    sim.compact(leader, applied);
    assert_eq!(sim.raft(leader).snapshot_index(), applied);
    sim.record_sent = true;
    sim.restart(lagging);
    sim.run_until(300, |s| s.nodes[&lagging].applied.len() as u64 >= applied)
        .expect("installs the snapshot");
    let chunks = sim
        .sent_log
        .iter()
        .filter(|m| m.to == lagging && matches!(m.body, Body::InstallSnapshot { .. }))
        .count();
    // 41 applied entries × 8 bytes in chunks of 64 bytes: at least 6 chunks.
    assert!(chunks >= 6, "sent in chunks ({chunks})");
    assert!(sim.stats.snapshots_installed >= 1);
    assert_eq!(
        sim.raft(lagging).snapshot_index(),
        applied,
        "the follower's log starts after the snapshot"
    );
    let leader = sim.leader().unwrap();
    commit_values(&mut sim, 5, 700);
    sim.run_until(100, |s| s.applied_agree())
        .expect("all replicas apply the same");
    assert_eq!(sim.nodes[&lagging].applied, sim.nodes[&leader].applied);
}

/// §5.4.2 of the thesis: the leader must still hold the entries after a snapshot when
/// the follower has installed it; the shell keeps them while a transfer is named here.
#[test]
fn a_leader_names_the_snapshot_it_is_sending_until_the_follower_has_it() {
    // Delays spread the chunks over several ticks.
    let net = NetConfig {
        delay_rounds_max: 3,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(3, config(), net, 15);
    let leader = elect(&mut sim);
    let lagging = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    sim.crash(lagging);
    let leader = sim.leader().unwrap();
    commit_values(&mut sim, 40, 500);
    let applied = sim.raft(leader).applied_index();
    sim.compact(leader, applied);
    assert_eq!(sim.raft(leader).snapshot_in_flight_index(), None);
    sim.restart(lagging);
    sim.run_until(300, |s| {
        s.raft(leader).snapshot_in_flight_index() == Some(applied)
    })
    .expect("the transfer is named while it runs");
    sim.run_until(300, |s| {
        s.nodes[&lagging].applied.len() as u64 >= applied
            && s.raft(leader).snapshot_in_flight_index().is_none()
    })
    .expect("installed, and no longer named");
    assert_eq!(sim.raft(lagging).snapshot_index(), applied);
    assert_eq!(
        sim.raft(lagging).snapshot_in_flight_index(),
        None,
        "not a leader"
    );
}

#[test]
fn leadership_transfer_moves_leader() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 16);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 5, 1);
    let target = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    // The target lags behind: the transfer first catches it up.
    sim.isolate(target);
    for v in 0..5 {
        sim.propose(leader, 50 + v).unwrap();
    }
    sim.run_ticks(2);
    sim.heal();
    let term = sim.raft(leader).term();
    sim.raft_mut(leader).transfer_leader(target).unwrap();
    assert!(matches!(
        sim.propose(leader, 1),
        Err(ProposeError::TransferInProgress { .. })
    ));
    sim.run_until(30, |s| s.leader() == Some(target))
        .expect("the target becomes leader");
    assert_eq!(sim.raft(target).term(), term + 1);
    assert_eq!(sim.raft(leader).role(), Role::Follower);
    commit_values(&mut sim, 3, 80);
}

/// A replica whose data is damaged (the shell forbids it to campaign) never becomes
/// leader: it refuses a leadership transfer's TimeoutNow, and when the leader dies it
/// votes for the other healthy replica instead of standing itself (§5.2 still elects).
#[test]
fn s5_2_a_replica_that_may_not_campaign_never_leads_but_still_votes() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 17);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 3, 1);
    let damaged = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    let healthy = sim
        .ids()
        .into_iter()
        .find(|&id| id != leader && id != damaged)
        .unwrap();
    sim.raft_mut(damaged).set_campaign(false);
    assert!(!sim.raft(damaged).may_campaign());
    let last = sim.raft(leader).last_index();
    assert_eq!(sim.raft(leader).match_index(healthy), Some(last));
    assert_eq!(sim.raft(damaged).match_index(healthy), None, "not leading");

    // A transfer to it is refused by the target; the leader stays and takes writes again
    // once the transfer times out.
    sim.raft_mut(leader).transfer_leader(damaged).unwrap();
    sim.run_ticks(30);
    assert_eq!(sim.leader(), Some(leader));
    assert_eq!(sim.raft(damaged).role(), Role::Follower);
    commit_values(&mut sim, 2, 10);

    // The leader dies: only the healthy replica stands, and wins with the damaged one's
    // vote (two of three).
    sim.crash(leader);
    sim.run_until(300, |s| s.leader().is_some())
        .expect("the healthy replica is elected");
    assert_eq!(sim.leader(), Some(healthy));
    sim.run_ticks(100);
    assert_ne!(sim.raft(damaged).role(), Role::Leader);
    assert_eq!(sim.raft(damaged).leader(), Some(healthy));

    // Repaired, it may lead again: a transfer to it now succeeds.
    sim.raft_mut(damaged).set_campaign(true);
    sim.raft_mut(healthy).transfer_leader(damaged).unwrap();
    sim.run_until(30, |s| s.leader() == Some(damaged))
        .expect("the repaired replica takes the leadership");
}

/// Alone with a replica that may not campaign, a group has no leader (one vote is not a
/// majority of three), and the damaged replica never stands: availability needs a
/// healthy majority, which is what a group of three with one damaged replica has.
#[test]
fn s5_2_no_campaign_without_a_healthy_candidate() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 18);
    let leader = elect(&mut sim);
    let damaged = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    sim.raft_mut(damaged).set_campaign(false);
    let term = sim.raft(damaged).term();
    sim.crash(leader);
    let other = sim
        .ids()
        .into_iter()
        .find(|&id| id != leader && id != damaged)
        .unwrap();
    sim.crash(other);
    sim.run_ticks(200);
    assert_eq!(sim.raft(damaged).role(), Role::Follower);
    assert_eq!(sim.raft(damaged).term(), term, "it never asked for votes");
}

#[test]
fn single_voter_commits_after_own_persist() {
    let mut node = RaftNode::new(config(), 7, vec![7], 1, None);
    while node.role() != Role::Leader {
        node.tick();
    }
    let index = node.propose(5u64).unwrap();
    let ready = node.ready();
    assert!(
        ready.committed_entries.is_empty(),
        "nothing commits before the persist"
    );
    let last = ready.entries_to_persist.last().unwrap();
    assert_eq!(last.index, index);
    node.on_persisted(last.index, last.term);
    let committed: Vec<_> = node
        .ready()
        .committed_entries
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(committed, vec![Payload::Noop, Payload::Data(5)]);
}

#[test]
fn follower_refuses_proposals_with_leader_hint() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 17);
    let leader = elect(&mut sim);
    sim.run_ticks(2);
    let follower = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    assert_eq!(
        sim.propose(follower, 1),
        Err(ProposeError::NotLeader {
            leader_hint: Some(leader)
        })
    );
}

#[test]
fn restart_keeps_persisted_log_and_vote() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 18);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 10, 1);
    for id in sim.ids() {
        sim.crash(id);
    }
    for id in sim.ids() {
        sim.restart(id);
    }
    elect(&mut sim);
    commit_values(&mut sim, 2, 100);
    assert!(sim.nodes[&leader].applied.starts_with(&[u64::MAX]));
    assert_eq!(
        sim.nodes[&leader].applied.len() as u64,
        sim.raft(sim.leader().unwrap()).last_index()
    );
}

/// One randomized run: loss, duplication, reordering, partitions, crashes, slow disks,
/// compaction; Sim checks safety after every round. Returns some coverage.
fn random_run(seed: u64, ticks: u64) -> super::sim::Stats {
    let mut rng = super::SplitMix64::new(seed);
    let n = if seed.is_multiple_of(2) { 3 } else { 5 };
    let net = NetConfig {
        drop_percent: rng.below(25),
        duplicate_percent: rng.below(10),
        delay_rounds_max: 1 + rng.below(6),
        persist_rounds: rng.below(3),
        rounds_per_tick: 3,
    };
    let mut cfg = config();
    cfg.snapshot_chunk_bytes = 16 + rng.below(64) as usize;
    cfg.max_inflight = 1 + rng.below(4) as usize;
    let mut sim = Sim::new(n, cfg, net, seed);
    let mut value = 0u64;
    let mut wipes = 0u64;
    for _ in 0..ticks {
        let ids = sim.ids();
        let pick = ids[rng.below(n as u64) as usize];
        match rng.below(100) {
            0..=2 => {
                let side: Vec<u64> = ids.iter().copied().filter(|_| rng.chance(50)).collect();
                sim.partition(&side);
            }
            3..=6 => sim.heal(),
            7 if sim.nodes[&pick].up => sim.crash(pick),
            8..=10 if !sim.nodes[&pick].up => sim.restart(pick),
            11..=13 => {
                let applied = sim.raft(pick).applied_index();
                sim.compact(pick, applied.saturating_sub(rng.below(5)));
            }
            // A lost disk, rebuilt (one node at a time: two members catching up at once
            // leave a 3-node group without a quorum of voters).
            14 if sim.nodes[&pick].up && sim.nodes.values().all(|n| n.rebuilding.is_none()) => {
                sim.wipe(pick, rng.chance(30));
                wipes += 1;
            }
            _ => {}
        }
        if let Some(leader) = sim.leader() {
            for _ in 0..rng.below(3) {
                value += 1;
                let _ = sim.propose(leader, value);
            }
        }
        sim.tick_all();
    }
    // Heal everything: the group must make progress and every replica converge.
    sim.heal();
    sim.net.drop_percent = 0;
    sim.net.duplicate_percent = 0;
    for id in sim.ids() {
        if !sim.nodes[&id].up {
            sim.restart(id);
        }
    }
    // A proposal to a leader that is deposed before it commits is lost: retry, as a
    // client would, until the value is applied everywhere. The bound covers a wiped node
    // that needs two whole snapshots in 16-byte chunks, one at a time (1,000 ticks).
    let marker = u64::MAX - 1;
    let mut applied_everywhere = false;
    for _ in 0..100 {
        if let Some(leader) = sim.leader() {
            if !sim.nodes[&leader].applied.contains(&marker) {
                let _ = sim.propose(leader, marker);
            }
        }
        sim.run_ticks(10);
        if sim.nodes.values().all(|n| n.applied.contains(&marker)) {
            applied_everywhere = true;
            break;
        }
    }
    assert!(
        applied_everywhere,
        "seed {seed}: no progress after healing: {}",
        sim.dump()
    );
    sim.check_logs();
    let mut stats = sim.stats.clone();
    stats.wipes = wipes;
    stats
}

#[test]
fn simulation_random_faults_keep_safety() {
    let seeds: u64 = std::env::var("RAFT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let first: u64 = std::env::var("RAFT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut elections = 0;
    let mut snapshots = 0;
    let mut truncations = 0;
    let mut wipes = 0;
    for seed in first..first + seeds {
        // Replay one seed: RAFT_SIM_SEED=<seed> RAFT_SIM_SEEDS=1 cargo test -p starcite-shards simulation
        let result = std::panic::catch_unwind(|| random_run(seed, 300));
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                eprintln!("failing seed {seed}: RAFT_SIM_SEED={seed} RAFT_SIM_SEEDS=1 cargo test -p starcite-shards simulation");
                std::panic::resume_unwind(e);
            }
        };
        elections += stats.elections;
        snapshots += stats.snapshots_installed;
        truncations += stats.truncations;
        wipes += stats.wipes;
    }
    eprintln!(
        "raft simulation: {seeds} seeds, {elections} elections, {snapshots} snapshot installs, \
         {truncations} truncations, {wipes} wiped disks"
    );
    if seeds >= 100 {
        assert!(elections >= seeds, "coverage: {elections} elections");
        assert!(snapshots >= 5, "coverage: {snapshots} snapshot installs");
        assert!(truncations >= 5, "coverage: {truncations} truncations");
        assert!(wipes >= 5, "coverage: {wipes} wiped disks");
    }
}

#[test]
fn new_commit_reaches_followers_without_waiting_for_a_tick() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 19);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 1, 1);
    sim.settle();
    let index = sim.propose(leader, 7).unwrap();
    // No tick: only piggybacked commits and commit-only heartbeats can carry it.
    sim.settle();
    assert_eq!(sim.raft(leader).commit_index(), index);
    for id in sim.ids() {
        assert_eq!(
            sim.raft(id).commit_index(),
            index,
            "node {id} learned the commit"
        );
        assert_eq!(sim.nodes[&id].applied.last(), Some(&7));
    }
}

#[test]
fn heartbeats_skipped_when_appends_went_out() {
    let mut cfg = config();
    cfg.heartbeat_ticks = 1;
    let mut sim = Sim::new(3, cfg, NetConfig::default(), 20);
    let leader = elect(&mut sim);
    sim.run_ticks(3);
    let is_idle_heartbeat = |m: &Message<u64>| matches!(m.body, Body::Heartbeat { .. });
    sim.record_sent = true;
    sim.run_ticks(5);
    let idle = sim
        .sent_log
        .iter()
        .filter(|m| m.from == leader && is_idle_heartbeat(m))
        .count();
    assert_eq!(idle, 5 * 2, "one heartbeat per follower per tick when idle");
    // Busy: an AppendEntries goes to each follower every tick, so no idle heartbeats;
    // only commit-only heartbeats (when the commit index moves after the append left).
    sim.sent_log.clear();
    for v in 0..5 {
        sim.propose(leader, v).unwrap();
        sim.tick_all();
    }
    let mut told = std::collections::BTreeMap::new();
    for m in sim.sent_log.iter().filter(|m| m.from == leader) {
        let last_told = told.entry(m.to).or_insert(0u64);
        match &m.body {
            Body::Append {
                prev_index,
                entries,
                commit,
                ..
            } => {
                *last_told = (*last_told).max((*commit).min(prev_index + entries.len() as u64));
            }
            Body::Heartbeat { commit, .. } => {
                assert!(
                    *commit > *last_told,
                    "a heartbeat to busy {} without news: {commit}",
                    m.to
                );
                *last_told = *commit;
            }
            _ => {}
        }
    }
}

// ---- Catching up (catch_up.rs): members that lost what they had promised ----

/// Runs until every live node applied the same entries as the leader and none is
/// still catching up.
fn converge_after_wipe(sim: &mut Sim, wiped: u64) {
    sim.run_until(600, |s| {
        let leader = s.leader();
        leader.is_some_and(|l| {
            s.nodes[&wiped].applied == s.nodes[&l].applied && !s.raft(wiped).is_catching_up()
        })
    })
    .unwrap_or_else(|| panic!("node {wiped} did not catch up: {}", sim.dump()));
    assert_eq!(sim.nodes[&wiped].rebuilding, None, "the marker is cleared");
}

#[test]
fn s5_3_leader_resends_to_a_follower_that_lost_acknowledged_entries_while_it_stays_leader() {
    for quiet in [true, false] {
        let mut sim = Sim::new(3, config(), NetConfig::default(), 30);
        let leader = elect(&mut sim);
        commit_values(&mut sim, 12, 100);
        sim.settle();
        let follower = sim.ids().into_iter().find(|&id| id != leader).unwrap();
        let acknowledged = sim.raft(leader).progress[&follower].match_index;
        assert!(acknowledged >= 13, "the follower acknowledged the entries");
        let term = sim.raft(leader).term();
        sim.wipe(follower, false);
        assert_eq!(sim.raft(follower).last_index(), 0);
        assert_eq!(sim.raft(follower).term(), term, "--rebuild keeps the term");
        if !quiet {
            commit_values(&mut sim, 3, 200);
        }
        // A quiet group too: the heartbeat's commit lies beyond the follower's log.
        converge_after_wipe(&mut sim, follower);
        assert_eq!(sim.leader(), Some(leader), "the leader stayed the same");
        assert_eq!(sim.raft(leader).term(), term);
        assert_eq!(
            sim.raft(follower).last_index(),
            sim.raft(leader).last_index()
        );
    }
}

#[test]
fn s7_a_follower_that_lost_entries_the_leader_compacted_gets_a_snapshot() {
    let mut sim = Sim::new(3, config(), NetConfig::default(), 31);
    let leader = elect(&mut sim);
    commit_values(&mut sim, 30, 100);
    sim.settle();
    let applied = sim.raft(leader).applied_index();
    sim.compact(leader, applied);
    let follower = sim.ids().into_iter().find(|&id| id != leader).unwrap();
    sim.wipe(follower, false);
    converge_after_wipe(&mut sim, follower);
    assert!(sim.stats.snapshots_installed >= 1, "a snapshot was sent");
    assert!(sim.raft(follower).snapshot_index() >= applied);
    assert_eq!(sim.leader(), Some(leader));
}

/// A leader of term 2 over entries 1..=3 whose follower 2 acknowledged all of them.
fn leader_with_acknowledging_follower() -> RaftNode<u64> {
    let mut node = leader_over_previous_term_entry();
    let noop = node.ready().entries_to_persist.last().unwrap().clone();
    node.on_persisted(noop.index, noop.term);
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::AppendResponse(AppendResponse::Accepted { match_index: 3 }),
    });
    assert_eq!(node.progress[&2].match_index, 3);
    node.ready();
    node
}

fn rejection(first_index: u64, catching_up: bool) -> Message<u64> {
    Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::AppendResponse(AppendResponse::Rejected {
            prev_index: 3,
            conflict_term: None,
            first_index,
            catching_up,
        }),
    }
}

#[test]
fn a_stale_rejection_overtaken_by_the_acknowledgement_does_not_reset_progress() {
    let mut node = leader_with_acknowledging_follower();
    // Sent before the acknowledgement (the follower's log was shorter then), delivered
    // after it: not news.
    node.step(rejection(1, false));
    assert_eq!(node.progress[&2].match_index, 3);
    let sent = node.ready().messages;
    assert!(
        !sent
            .iter()
            .any(|m| m.to == 2 && matches!(m.body, Body::Append { .. })),
        "nothing is resent: {sent:?}"
    );
}

#[test]
fn a_catching_up_follower_whose_log_ends_below_its_match_is_probed_from_its_log_end() {
    let mut node = leader_with_acknowledging_follower();
    node.step(rejection(2, true));
    assert_eq!(
        node.progress[&2].match_index, 0,
        "nothing is known to match until it acknowledges again"
    );
    let appends: Vec<(u64, usize)> = node
        .ready()
        .messages
        .iter()
        .filter(|m| m.to == 2)
        .filter_map(|m| match &m.body {
            Body::Append {
                prev_index,
                entries,
                ..
            } => Some((*prev_index, entries.len())),
            _ => None,
        })
        .collect();
    assert_eq!(appends, vec![(1, 2)], "entries 2 and 3 are sent again");
    // A catching-up follower whose log is not shorter than its match: ordinary news.
    let mut node = leader_with_acknowledging_follower();
    node.step(rejection(4, true));
    assert_eq!(node.progress[&2].match_index, 3);
    // One holding an entry of another term where it acknowledged ours (a suffix of an
    // old term that a lost write had replaced): probed again from that term's start.
    let mut node = leader_with_acknowledging_follower();
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::AppendResponse(AppendResponse::Rejected {
            prev_index: 2,
            conflict_term: Some(1),
            first_index: 2,
            catching_up: true,
        }),
    });
    assert_eq!(node.progress[&2].match_index, 0);
    let probes: Vec<u64> = node
        .ready()
        .messages
        .iter()
        .filter_map(|m| match &m.body {
            Body::Append { prev_index, .. } if m.to == 2 => Some(*prev_index),
            _ => None,
        })
        .collect();
    assert_eq!(probes, vec![1], "after the leader's last entry of term 1");
}

/// A member of term 3 (voted for 2) with entries 1 (term 1) and 2 (term 3), starting in
/// catching-up mode.
fn catching_up_member(term_and_vote_lost: bool) -> RaftNode<u64> {
    let restored = Restored {
        hard_state: HardState {
            term: 3,
            vote: Some(2),
            commit: 0,
        },
        snapshot: SnapshotMeta::default(),
        entries: vec![
            Entry {
                term: 1,
                index: 1,
                payload: Payload::Data(1u64),
            },
            Entry {
                term: 3,
                index: 2,
                payload: Payload::Data(2),
            },
        ],
    };
    RaftNode::new(config(), 1, vec![1, 2, 3], 5, Some(restored)).catch_up(term_and_vote_lost)
}

fn granted_votes(ready: &super::Ready<u64>) -> Vec<Body<u64>> {
    ready
        .messages
        .iter()
        .chain(&ready.persisted_messages)
        .map(|m| m.body.clone())
        .filter(|b| matches!(b, Body::VoteResponse { .. } | Body::PreVoteResponse { .. }))
        .collect()
}

#[test]
fn a_catching_up_member_grants_no_vote_or_pre_vote_and_never_campaigns() {
    let mut node = catching_up_member(false);
    for _ in 0..100 {
        node.tick();
    }
    let ready = node.ready();
    assert_eq!(node.role(), Role::Follower);
    assert!(
        ready.messages.is_empty() && ready.persisted_messages.is_empty(),
        "no campaign: {ready:?}"
    );
    // An up-to-date candidate of a later term gets neither a pre-vote nor a vote.
    for body in [
        Body::PreVote {
            last_index: 9,
            last_term: 4,
        },
        Body::Vote {
            last_index: 9,
            last_term: 4,
            transfer: true,
        },
    ] {
        node.step(Message {
            from: 3,
            to: 1,
            term: 4,
            body,
        });
    }
    assert_eq!(
        granted_votes(&node.ready()),
        vec![
            Body::PreVoteResponse { granted: false },
            Body::VoteResponse { granted: false }
        ]
    );
    assert_eq!(node.hard_state().vote, None, "no vote recorded");
    node.step(Message {
        from: 3,
        to: 1,
        term: 4,
        body: Body::TimeoutNow,
    });
    assert_eq!(node.role(), Role::Follower, "not even a transfer");
}

fn append_from_2(term: u64, prev: (u64, u64), entries: &[(u64, u64)], commit: u64) -> Message<u64> {
    Message {
        from: 2,
        to: 1,
        term,
        body: Body::Append {
            prev_index: prev.0,
            prev_term: prev.1,
            entries: entries
                .iter()
                .map(|&(index, term)| Entry {
                    term,
                    index,
                    payload: Payload::Data(index * 10),
                })
                .collect(),
            commit,
        },
    }
}

#[test]
fn catching_up_ends_once_a_current_term_leaders_commit_is_persisted() {
    let mut node = catching_up_member(false);
    // Leader 2 of term 3 sends entry 3 and announces commit 3 (an entry of term 3).
    node.step(append_from_2(3, (2, 3), &[(3, 3)], 3));
    assert!(node.is_catching_up(), "entry 3 is not durable yet");
    let ready = node.ready();
    let last = ready.entries_to_persist.last().unwrap();
    node.on_persisted(last.index, last.term);
    assert!(
        !node.is_catching_up(),
        "everything up to commit 3 is durable"
    );

    // A commit index at an entry of an earlier term does not end it: the leader has not
    // committed anything of its own term, so it may not know every commit yet.
    let mut node = catching_up_member(false);
    node.on_persisted(2, 3);
    node.step(append_from_2(4, (2, 3), &[(3, 4)], 1));
    let last = node.ready().entries_to_persist.last().unwrap().clone();
    node.on_persisted(last.index, last.term);
    assert!(node.is_catching_up(), "commit 1 is of term 1, not 4");
    // The leader commits its entry of term 4 and says so in a heartbeat.
    node.step(Message {
        from: 2,
        to: 1,
        term: 4,
        body: Body::Heartbeat {
            commit: 3,
            leader_commit: 3,
        },
    });
    assert!(!node.is_catching_up());
    assert_eq!(
        node.commit_index(),
        1,
        "heartbeats commit nothing while catching up"
    );
    node.step(Message {
        from: 2,
        to: 1,
        term: 4,
        body: Body::Heartbeat {
            commit: 3,
            leader_commit: 3,
        },
    });
    assert_eq!(node.commit_index(), 3, "they do again afterwards");

    // A heartbeat's clamped commit is not an announcement: only the leader's own.
    let mut node = catching_up_member(false);
    node.on_persisted(2, 3);
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::Heartbeat {
            commit: 2,
            leader_commit: 5,
        },
    });
    assert!(node.is_catching_up(), "the leader committed up to 5");
}

#[test]
fn a_heartbeat_beyond_a_catching_up_log_is_answered_with_its_real_end() {
    let mut node = catching_up_member(false);
    node.step(Message {
        from: 2,
        to: 1,
        term: 3,
        body: Body::Heartbeat {
            commit: 7,
            leader_commit: 7,
        },
    });
    let bodies: Vec<Body<u64>> = node.ready().messages.into_iter().map(|m| m.body).collect();
    assert!(
        bodies.contains(&Body::AppendResponse(AppendResponse::Rejected {
            prev_index: 7,
            conflict_term: None,
            first_index: 3,
            catching_up: true,
        })),
        "{bodies:?}"
    );
    assert_eq!(
        node.commit_index(),
        0,
        "a heartbeat commits nothing while catching up"
    );
}

#[test]
fn a_member_that_lost_its_term_and_vote_answers_nothing_until_every_voter_told_its_term() {
    let mut node = catching_up_member(true);
    // The leader (term 7) is heard from, node 3 not yet: nothing is acknowledged.
    node.step(append_from_2(7, (2, 3), &[(3, 7)], 2));
    let ready = node.ready();
    assert!(ready.messages.is_empty() && ready.persisted_messages.is_empty());
    assert!(ready.entries_to_persist.is_empty(), "{ready:?}");
    assert!(node.is_fenced());
    // An election timeout later it asks node 3 (and only node 3) for its term.
    for _ in 0..2 * config().election_ticks {
        node.tick();
    }
    let probes: Vec<(u64, u64)> = node
        .ready()
        .messages
        .iter()
        .filter(|m| matches!(m.body, Body::PreVote { .. }))
        .map(|m| (m.to, m.term))
        .collect();
    assert!(!probes.is_empty() && probes.iter().all(|&(to, _)| to == 3));
    node.step(Message {
        from: 3,
        to: 1,
        term: 9,
        body: Body::PreVoteResponse { granted: false },
    });
    assert!(!node.is_fenced());
    assert_eq!(
        (node.term(), node.hard_state().vote),
        (9, Some(1)),
        "the highest term heard, its vote used up"
    );
    assert!(node.is_catching_up());
    // Leader 2's term 7 is now stale: it learns term 9 instead of an acknowledgement.
    node.step(append_from_2(7, (2, 3), &[(3, 7)], 2));
    let answers: Vec<Body<u64>> = node.ready().messages.into_iter().map(|m| m.body).collect();
    assert_eq!(answers, vec![Body::HeartbeatResponse]);
    // A candidate of term 9 gets no vote, not even once caught up.
    node.step(Message {
        from: 3,
        to: 1,
        term: 9,
        body: Body::Vote {
            last_index: 9,
            last_term: 9,
            transfer: false,
        },
    });
    assert_eq!(
        granted_votes(&node.ready()),
        vec![Body::VoteResponse { granted: false }]
    );
}

#[test]
fn a_member_wiped_with_its_term_and_vote_rejoins_without_breaking_safety() {
    for seed in 0..20 {
        let net = NetConfig {
            drop_percent: 5,
            duplicate_percent: 5,
            delay_rounds_max: 3,
            ..NetConfig::default()
        };
        let mut sim = Sim::new(3, config(), net, 40 + seed);
        let leader = elect(&mut sim);
        commit_values(&mut sim, 10, 100);
        let victim = sim.ids()[seed as usize % 3];
        sim.wipe(victim, seed % 2 == 0);
        let leader_now = sim
            .run_until(300, |s| s.leader().is_some())
            .map(|_| sim.leader());
        assert!(leader_now.is_some(), "seed {seed}: a leader (was {leader})");
        commit_values(&mut sim, 5, 300);
        converge_after_wipe(&mut sim, victim);
        sim.check_logs();
    }
}
