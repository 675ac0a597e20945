//! The data directory: its identity file and the lock that keeps a second process out.
//!
//! The identity file also holds the data dir's **incarnation**: a random id drawn when
//! the directory is created. Peers remember it (`transport::incarnations`) and refuse
//! a known node that comes back with another one, i.e. with a data dir deleted and
//! created afresh, which has lost entries it acknowledged and the votes it cast
//! (docs/deployment.md, "Repairing a replica"). A data dir created before incarnations
//! existed gets one at its first start with this version (a compatible change: the
//! format version stays).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const IDENTITY_FILE: &str = "starcite.json";
const LOCK_FILE: &str = "LOCK";
/// Version of the on-disk layout; bumped when a data dir cannot be read by older code.
/// 2: snapshots record each session's retention base; `ArchiveProgress` log records
/// cover several sessions.
pub const DATA_FORMAT_VERSION: u32 = 2;

/// Who this data dir belongs to: written when the dir is created, checked at every start.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub format_version: u32,
    pub cluster_id: String,
    pub node_id: u64,
    pub shards: usize,
}

/// What `starcite.json` holds: the identity, and the incarnation (absent in data dirs
/// of earlier versions, which get one at start).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Stored {
    #[serde(flatten)]
    identity: Identity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incarnation: Option<String>,
}

/// An open, locked data directory. The lock lasts as long as this value.
pub struct DataDir {
    pub root: PathBuf,
    /// This data dir's random id, fixed when it was created (see the module docs).
    pub incarnation: u64,
    _lock: File,
}

/// How an incarnation is written: 16 hex digits.
pub fn format_incarnation(incarnation: u64) -> String {
    format!("{incarnation:016x}")
}

pub fn parse_incarnation(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() || text.len() > 16 {
        return Err(format!("incarnation {text:?} is not 1-16 hex digits"));
    }
    u64::from_str_radix(text, 16).map_err(|_| format!("incarnation {text:?} is not hex"))
}

impl DataDir {
    /// Creates or opens `root`, takes the exclusive lock and checks (or records) identity.
    /// `incarnation`: replaces the data dir's incarnation (`--data-incarnation`, for a
    /// data dir recreated after a deletion, with `--rebuild --forget-votes`).
    pub fn open(
        root: &Path,
        wanted: &Identity,
        incarnation: Option<u64>,
    ) -> Result<DataDir, String> {
        fs::create_dir_all(root)
            .map_err(|e| format!("cannot create data dir {}: {e}", root.display()))?;
        // Absolute from here on: glommio opens directories with openat(-1, path), which
        // only works for absolute paths.
        let root = &fs::canonicalize(root)
            .map_err(|e| format!("cannot resolve data dir {}: {e}", root.display()))?;
        let lock = lock_exclusive(&root.join(LOCK_FILE))?;
        let path = root.join(IDENTITY_FILE);
        let stored = match fs::read(&path) {
            Ok(bytes) => {
                let found: Stored = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{} is unreadable: {e}", path.display()))?;
                check_identity(&found.identity, wanted, root)?;
                Some(found)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let found = match &stored {
            Some(s) => s
                .incarnation
                .as_deref()
                .map(parse_incarnation)
                .transpose()?,
            None => None,
        };
        let chosen = incarnation.or(found).unwrap_or_else(rand::random);
        if found != Some(chosen) {
            match (stored.is_some(), found) {
                (false, _) => {}
                (true, None) => tracing::info!(
                    incarnation = %format_incarnation(chosen),
                    "data dir of an earlier version: assigned it an incarnation"
                ),
                (true, Some(old)) => tracing::warn!(
                    old = %format_incarnation(old),
                    new = %format_incarnation(chosen),
                    "--data-incarnation replaces the data dir's incarnation"
                ),
            }
            let record = Stored {
                identity: wanted.clone(),
                incarnation: Some(format_incarnation(chosen)),
            };
            write_durably(&path, &serde_json::to_vec_pretty(&record).expect("json"))?;
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            incarnation: chosen,
            _lock: lock,
        })
    }

    pub fn shard_dir(&self, shard: usize) -> PathBuf {
        self.root.join(format!("shard-{shard:03}"))
    }
}

fn check_identity(found: &Identity, wanted: &Identity, root: &Path) -> Result<(), String> {
    let dir = root.display();
    if found.format_version != wanted.format_version {
        return Err(format!(
            "data dir {dir} has format version {}, this binary writes {}",
            found.format_version, wanted.format_version
        ));
    }
    if found.shards != wanted.shards {
        return Err(format!(
            "data dir {dir} was created with {} shards; refusing to start with {} \
             (start with --shards {} or use a new data dir)",
            found.shards, wanted.shards, found.shards
        ));
    }
    if found.node_id != wanted.node_id {
        return Err(format!(
            "data dir {dir} belongs to node {}, not node {}",
            found.node_id, wanted.node_id
        ));
    }
    if found.cluster_id != wanted.cluster_id {
        return Err(format!(
            "data dir {dir} belongs to cluster {:?}, not {:?}",
            found.cluster_id, wanted.cluster_id
        ));
    }
    Ok(())
}

fn lock_exclusive(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    // SAFETY: flock on a valid, owned file descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data dir {} is locked by another starcite process",
            path.parent().unwrap_or(path).display()
        ));
    }
    Ok(file)
}

/// Writes a small file so that it survives a crash: temp file, fsync, rename, fsync dir.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let result = (|| -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            format_version: DATA_FORMAT_VERSION,
            cluster_id: "c".into(),
            node_id: 2,
            shards: 1,
        }
    }

    fn fresh_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("starcite-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        root
    }

    fn stored(root: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(root.join(IDENTITY_FILE)).unwrap()).unwrap()
    }

    #[test]
    fn a_new_data_dir_gets_an_incarnation_that_stays() {
        let root = fresh_root("incarnation-new");
        let first = DataDir::open(&root, &identity(), None).unwrap().incarnation;
        let again = DataDir::open(&root, &identity(), None).unwrap().incarnation;
        assert_eq!(first, again);
        assert_eq!(stored(&root)["incarnation"], format_incarnation(first));
        // Deleted and created afresh: another one.
        fs::remove_dir_all(&root).unwrap();
        let other = DataDir::open(&root, &identity(), None).unwrap().incarnation;
        assert_ne!(other, first);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_data_dir_of_an_earlier_version_is_given_an_incarnation_at_start() {
        let root = fresh_root("incarnation-migrated");
        fs::create_dir_all(&root).unwrap();
        let old = serde_json::to_vec_pretty(&identity()).unwrap();
        fs::write(root.join(IDENTITY_FILE), old).unwrap();
        let dir = DataDir::open(&root, &identity(), None).unwrap();
        let text = stored(&root)["incarnation"].as_str().unwrap().to_string();
        assert_eq!(parse_incarnation(&text), Ok(dir.incarnation));
        assert_eq!(stored(&root)["node_id"], 2, "the identity is kept");
        drop(dir);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn data_incarnation_replaces_the_incarnation() {
        let root = fresh_root("incarnation-given");
        DataDir::open(&root, &identity(), None).unwrap();
        let dir = DataDir::open(&root, &identity(), Some(0xAB)).unwrap();
        assert_eq!(dir.incarnation, 0xAB);
        assert_eq!(stored(&root)["incarnation"], "00000000000000ab");
        drop(dir);
        assert_eq!(
            DataDir::open(&root, &identity(), None).unwrap().incarnation,
            0xAB
        );
        assert!(parse_incarnation("xyz").is_err());
        assert!(parse_incarnation("00000000000000000").is_err(), "17 digits");
        fs::remove_dir_all(&root).unwrap();
    }
}
