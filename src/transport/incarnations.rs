//! The data dir incarnation of every peer this shard has talked to, kept durably in
//! `shard-NNN/peers.json` (`{"peers": {"<node id>": "<16 hex digits>"}}`).
//!
//! A peer's handshake carries its data dir's incarnation (`shards::wire::Handshake`).
//! The first one seen for a node is recorded before the connection is used; later, a
//! different one means the node's data dir was deleted and created afresh, and the
//! handshake is refused (`shards::wire::check_data_incarnation`). The file is written
//! with blocking I/O on the shard's executor, which happens once per peer (and again
//! only after a repair), so it never competes with the append path.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::datadir::{format_incarnation, parse_incarnation, write_durably};

#[derive(Serialize, Deserialize, Default)]
struct Stored {
    peers: BTreeMap<String, String>,
}

pub struct KnownIncarnations {
    /// None: kept in memory only (transport tests).
    path: Option<PathBuf>,
    known: BTreeMap<u64, u64>,
}

impl KnownIncarnations {
    /// Reads `path` (absent: nothing known yet).
    pub fn load(path: Option<PathBuf>) -> Result<KnownIncarnations, String> {
        let mut known = BTreeMap::new();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| {
                        format!(
                            "{} is unreadable ({e}); it only lists the data dir incarnations of \
                             the peers, and may be deleted to learn them again",
                            path.display()
                        )
                    })?;
                    for (node, incarnation) in stored.peers {
                        let node: u64 = node
                            .parse()
                            .map_err(|_| format!("{}: bad node id {node:?}", path.display()))?;
                        let incarnation = parse_incarnation(&incarnation)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        known.insert(node, incarnation);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        Ok(KnownIncarnations { path, known })
    }

    pub fn get(&self, node: u64) -> Option<u64> {
        self.known.get(&node).copied()
    }

    /// Remembers `incarnation` for `node`, durably, before the connection is used.
    pub fn record(&mut self, node: u64, incarnation: u64) -> Result<(), String> {
        if self.known.get(&node) == Some(&incarnation) {
            return Ok(());
        }
        let mut next = self.known.clone();
        next.insert(node, incarnation);
        if let Some(path) = &self.path {
            let stored = Stored {
                peers: next
                    .iter()
                    .map(|(n, i)| (n.to_string(), format_incarnation(*i)))
                    .collect(),
            };
            write_durably(path, &serde_json::to_vec_pretty(&stored).expect("json"))?;
        }
        self.known = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnations_are_remembered_across_a_reload() {
        let dir =
            std::env::temp_dir().join(format!("starcite-incarnations-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peers.json");
        let _ = std::fs::remove_file(&path);
        let mut known = KnownIncarnations::load(Some(path.clone())).unwrap();
        assert_eq!(known.get(2), None);
        known.record(2, 0xAB).unwrap();
        known.record(3, u64::MAX).unwrap();
        let again = KnownIncarnations::load(Some(path.clone())).unwrap();
        assert_eq!((again.get(2), again.get(3)), (Some(0xAB), Some(u64::MAX)));
        std::fs::write(&path, b"{").unwrap();
        let err = KnownIncarnations::load(Some(path)).err().unwrap();
        assert!(err.contains("may be deleted"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
