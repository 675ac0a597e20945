//! `starcite serve --rebuild`: the repair of a damaged data dir (docs/deployment.md,
//! "Repairing a replica").
//!
//! A replica's log holds, besides the entries, what Raft requires it never to forget:
//! each group's term and the vote it cast in it (§5.2). Deleting a damaged data dir
//! loses both, and a node that forgot its vote can vote twice in one term. So the
//! repair, before the shards start:
//!
//! 1. reads each group's term and vote from the old log: the shard snapshot's
//!    `hard_term`/`hard_vote` and every hard-state record after its resume position
//!    (the same replay rule as start-up), and refuses, saying what to do instead, when
//!    they cannot be read;
//! 2. writes them, durably, into the `rebuilding` marker file in the data dir (so a
//!    crash at any later point still has them);
//! 3. deletes the log segments, their index files and the snapshot of every shard.
//!
//! While the marker exists, every group starts in Raft's catching-up mode
//! (`shards::raft::RaftNode::catch_up`): restored with the carried term and vote, which
//! each shard writes as the first records of its new log; granting no vote and never
//! campaigning; until it has persisted everything up to a commit index that a leader
//! of its term announced after the start. A kill -9 on the way leaves the marker, so
//! the next start (with or without `--rebuild`) is in the same mode. The last shard
//! whose groups have all caught up removes the marker ([`RebuildTracker`]).
//!
//! With `--forget-votes` (the term and vote cannot be read, or the data dir was
//! deleted by hand) nothing is carried: the groups start fenced, and learn a term at
//! least as high as any they could have voted in from every other voter first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use shards::entry::{Command, MetaRecord};
use shards::raft::HardState;

use crate::datadir::{write_durably, DataDir};

/// The marker file in the data dir.
pub const MARKER_FILE: &str = "rebuilding";

/// What the marker holds.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Marker {
    /// The term and vote were not carried (`--forget-votes`): groups start fenced.
    pub forget_votes: bool,
    /// Each group's carried term and vote (vote 0: none).
    pub groups: Vec<Carried>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub group: u16,
    pub term: u64,
    pub vote: u64,
}

impl Marker {
    /// The carried hard state of each group (commit 0).
    pub fn hard_states(&self) -> BTreeMap<u16, HardState> {
        self.groups
            .iter()
            .map(|c| {
                let mut h = HardState::default();
                h.merge(c.term, (c.vote != 0).then_some(c.vote));
                (c.group, h)
            })
            .collect()
    }

    fn new(forget_votes: bool, hard_states: &BTreeMap<u16, HardState>) -> Marker {
        let groups = hard_states
            .iter()
            .filter(|(_, h)| h.term > 0)
            .map(|(&group, h)| Carried {
                group,
                term: h.term,
                vote: h.vote.unwrap_or(0),
            })
            .collect();
        Marker {
            forget_votes,
            groups,
        }
    }
}

/// The marker of an unfinished rebuild, if there is one.
pub fn read_marker(root: &Path) -> Result<Option<Marker>, String> {
    let path = root.join(MARKER_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "{} is unreadable ({e}): it marks an unfinished rebuild; start with \
                 `starcite serve --rebuild --forget-votes` (docs/deployment.md)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Steps 1–3 of the module docs. Returns the marker now on disk.
pub fn prepare(data_dir: &DataDir, shards: usize, forget_votes: bool) -> Result<Marker, String> {
    let root = &data_dir.root;
    let earlier = read_marker(root)?;
    let forget_votes = forget_votes || earlier.as_ref().is_some_and(|m| m.forget_votes);
    let mut carried = earlier.map(|m| m.hard_states()).unwrap_or_default();
    if !forget_votes {
        for shard in 0..shards {
            let dir = data_dir.shard_dir(shard);
            let read = read_hard_states(&dir).map_err(|e| cannot_read(root, &e))?;
            for (group, h) in read {
                carried.entry(group).or_default().merge(h.term, h.vote);
            }
        }
        if carried.values().all(|h| h.term == 0) {
            return Err(format!(
                "refusing to rebuild {}: it holds no term or vote of any group, so there is \
                 nothing to carry. A data dir deleted by hand lost this node's votes: if that \
                 is what happened, start it with `starcite serve --rebuild --forget-votes` \
                 (with `--data-incarnation` as its peers' refusal names it) while every other \
                 node is up (docs/deployment.md, \"Repairing a replica\")",
                root.display()
            ));
        }
    }
    let marker = Marker::new(forget_votes, &carried);
    // Durable before anything is deleted: from here on a crash restarts catching up.
    let bytes = serde_json::to_vec_pretty(&marker).expect("json");
    write_durably(&root.join(MARKER_FILE), &bytes)?;
    let mut deleted = 0usize;
    for shard in 0..shards {
        deleted += delete_log(&data_dir.shard_dir(shard))?;
    }
    tracing::warn!(
        groups_carried = marker.groups.len(),
        forget_votes,
        files_deleted = deleted,
        "rebuild: deleted the log and snapshot; every group votes for no one until it has \
         caught up from its leader"
    );
    Ok(marker)
}

fn cannot_read(root: &Path, error: &str) -> String {
    format!(
        "refusing to rebuild {}: the term and vote of its groups cannot be read ({error}). \
         Do not delete the data dir: its votes would be forgotten and this node could vote \
         twice in one term. Start it with `starcite serve --rebuild --forget-votes` while \
         every other node is up: it then learns the terms from its peers and votes for no \
         one until it has caught up (docs/deployment.md, \"Repairing a replica\")",
        root.display()
    )
}

/// Each group's term and vote in one shard's data: the snapshot's, then every
/// hard-state record after its resume position. Without a readable snapshot the whole
/// log is read, which holds every record only if retention deleted no segment.
fn read_hard_states(shard_dir: &Path) -> Result<BTreeMap<u16, HardState>, String> {
    let mut out: BTreeMap<u16, HardState> = BTreeMap::new();
    let log_dir = shard_dir.join("log");
    let epochs = if log_dir.exists() {
        crate::wal::segment_epochs(&log_dir)?
    } else {
        Vec::new()
    };
    let snapshot_path = shard_dir.join(crate::shard::SNAPSHOT_FILE);
    let mut resume = (1, 0);
    match std::fs::read(&snapshot_path) {
        Ok(bytes) => match crate::shard::decode_snapshot_file(&snapshot_path, &bytes) {
            Ok(snapshot) => {
                resume = (snapshot.resume_epoch, snapshot.resume_offset);
                for g in snapshot.groups {
                    let vote = (g.hard_vote != 0).then_some(g.hard_vote);
                    out.entry(g.group).or_default().merge(g.hard_term, vote);
                }
            }
            // The log from its first segment holds every hard-state record too.
            Err(e) if epochs.first() != Some(&1) => {
                return Err(format!(
                    "{e}, and retention deleted the segments before {}",
                    epochs.first().copied().unwrap_or(1)
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "rebuild: snapshot unreadable; reading the whole log")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("read {}: {e}", snapshot_path.display())),
    }
    let mut summaries = Vec::new();
    for &epoch in epochs.iter().filter(|&&e| e >= resume.0) {
        let scan = crate::wal::scan_segment_blocking(&log_dir, epoch)?;
        let from = if epoch == resume.0 { resume.1 } else { 0 };
        for rec in scan.records.iter().filter(|r| r.offset >= from) {
            let r = &rec.record;
            if let (0, Command::Meta(MetaRecord::HardState { term, vote, .. })) =
                (r.index, &r.command)
            {
                let vote = (*vote != 0).then_some(*vote);
                out.entry(r.group).or_default().merge(*term, vote);
            }
        }
        summaries.push(scan.summary(epoch));
    }
    // A torn tail was never acknowledged (nothing in it was promised); corruption
    // before the end may hide a newer term or vote.
    shards::codec::classify_log(&summaries)
        .map_err(|e| crate::wal::describe_log_error(&log_dir, &e))?;
    Ok(out)
}

/// Deletes one shard's segments, index files and snapshot. Returns how many files.
fn delete_log(shard_dir: &Path) -> Result<usize, String> {
    let log_dir = shard_dir.join("log");
    let mut files = crate::wal::log_files(&log_dir)?;
    for name in [crate::shard::SNAPSHOT_FILE, "snapshot.tmp"] {
        let path = shard_dir.join(name);
        if path.exists() {
            files.push(path);
        }
    }
    for file in &files {
        std::fs::remove_file(file).map_err(|e| format!("delete {}: {e}", file.display()))?;
    }
    for dir in [&log_dir, shard_dir] {
        if dir.exists() {
            sync_dir(dir)?;
        }
    }
    Ok(files.len())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("sync {}: {e}", dir.display()))
}

/// Counts the shards still catching up; the last one to finish removes the marker.
#[derive(Debug)]
pub struct RebuildTracker {
    root: PathBuf,
    shards_left: AtomicUsize,
}

impl RebuildTracker {
    pub fn new(root: &Path, shards: usize) -> RebuildTracker {
        RebuildTracker {
            root: root.to_path_buf(),
            shards_left: AtomicUsize::new(shards),
        }
    }

    /// Every group of `shard` has caught up (what it must hold is durable). Called once
    /// per shard.
    pub fn shard_caught_up(&self, shard: usize) {
        let left = self.shards_left.fetch_sub(1, Ordering::AcqRel) - 1;
        tracing::info!(shard, shards_left = left, "rebuild: shard caught up");
        if left > 0 {
            return;
        }
        let path = self.root.join(MARKER_FILE);
        // Blocking, once: unlink, then make the unlink durable.
        let removed = std::fs::remove_file(&path)
            .map_err(|e| format!("delete {}: {e}", path.display()))
            .and_then(|()| sync_dir(&self.root));
        match removed {
            Ok(()) => tracing::info!("rebuild complete: every group caught up and votes again"),
            // The marker stays: the next start catches up once more, which is safe.
            Err(e) => tracing::error!(error = %e, "rebuild: removing the marker failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadir::{Identity, DATA_FORMAT_VERSION};
    use shards::entry::LogRecord;

    fn hard(group: u16, term: u64, vote: u64) -> LogRecord {
        LogRecord {
            group,
            term,
            index: 0,
            command: Command::Meta(MetaRecord::HardState {
                term,
                vote,
                commit: 0,
            }),
        }
    }

    fn noop(group: u16, term: u64, index: u64) -> LogRecord {
        LogRecord {
            group,
            term,
            index,
            command: Command::Noop,
        }
    }

    /// A one-shard data dir whose first segment holds `batches`, one batch each.
    fn data_dir_with(name: &str, batches: &[Vec<LogRecord>]) -> (DataDir, PathBuf) {
        let root = std::env::temp_dir().join(format!("starcite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let identity = Identity {
            format_version: DATA_FORMAT_VERSION,
            cluster_id: "c".into(),
            node_id: 1,
            shards: 1,
        };
        let dir = DataDir::open(&root, &identity, None).unwrap();
        let log = dir.shard_dir(0).join("log");
        std::fs::create_dir_all(&log).unwrap();
        let mut segment = Vec::new();
        for records in batches {
            let mut batch = shards::codec::BatchBuilder::new(1);
            for r in records {
                batch.push(r).unwrap();
            }
            segment.extend(batch.finish());
        }
        segment.resize(1 << 20, 0);
        let path = log.join(format!("{:020}.seg", 1));
        std::fs::write(&path, segment).unwrap();
        (dir, path)
    }

    #[test]
    fn a_rebuild_carries_each_groups_newest_term_and_vote_then_deletes_the_log() {
        let (dir, segment) = data_dir_with(
            "rebuild-carry",
            &[
                vec![hard(5, 2, 1), noop(5, 2, 1)],
                vec![hard(5, 3, 0), hard(7, 4, 0)],
                vec![hard(5, 3, 2), hard(5, 2, 1)],
            ],
        );
        let marker = prepare(&dir, 1, false).unwrap();
        let states = marker.hard_states();
        assert_eq!((states[&5].term, states[&5].vote), (3, Some(2)));
        assert_eq!((states[&7].term, states[&7].vote), (4, None));
        assert!(!segment.exists(), "the log is deleted");
        assert_eq!(read_marker(&dir.root).unwrap(), Some(marker));
        // A second --rebuild (the new log is empty) keeps what the marker carried.
        let again = prepare(&dir, 1, false).unwrap();
        assert_eq!(again.hard_states(), states);
        let _ = std::fs::remove_dir_all(&dir.root);
    }

    #[test]
    fn a_rebuild_refuses_a_log_it_cannot_read_and_forget_votes_goes_on() {
        let (dir, segment) = data_dir_with(
            "rebuild-corrupt",
            &[vec![hard(5, 2, 1)], vec![hard(5, 3, 2)]],
        );
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[44] ^= 0x5A; // inside the first batch's record; a valid batch follows
        std::fs::write(&segment, bytes).unwrap();
        let err = prepare(&dir, 1, false).unwrap_err();
        assert!(
            err.contains("cannot be read") && err.contains("--rebuild --forget-votes"),
            "{err}"
        );
        assert!(segment.exists() && read_marker(&dir.root).unwrap().is_none());
        let marker = prepare(&dir, 1, true).unwrap();
        assert!(marker.forget_votes && marker.groups.is_empty());
        assert!(!segment.exists());
        let _ = std::fs::remove_dir_all(&dir.root);
    }

    #[test]
    fn a_rebuild_of_a_data_dir_without_any_term_has_nothing_to_carry() {
        let (dir, segment) = data_dir_with("rebuild-empty", &[]);
        let err = prepare(&dir, 1, false).unwrap_err();
        assert!(
            err.contains("nothing to carry") && err.contains("--forget-votes"),
            "{err}"
        );
        assert!(segment.exists());
        let _ = std::fs::remove_dir_all(&dir.root);
    }

    #[test]
    fn a_marker_round_trips_its_carried_terms_and_votes() {
        let mut hard = BTreeMap::new();
        hard.insert(
            3u16,
            HardState {
                term: 7,
                vote: Some(2),
                commit: 9,
            },
        );
        hard.insert(
            4u16,
            HardState {
                term: 5,
                vote: None,
                commit: 0,
            },
        );
        hard.insert(5u16, HardState::default());
        let marker = Marker::new(false, &hard);
        assert_eq!(marker.groups.len(), 2, "nothing to carry for group 5");
        let back: Marker = serde_json::from_slice(&serde_json::to_vec(&marker).unwrap()).unwrap();
        let states = back.hard_states();
        assert_eq!(
            states[&3],
            HardState {
                term: 7,
                vote: Some(2),
                commit: 0
            }
        );
        assert_eq!(
            states[&4],
            HardState {
                term: 5,
                vote: None,
                commit: 0
            }
        );
    }
}
