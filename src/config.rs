//! Command line and environment configuration (`starcite serve --help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "starcite",
    version,
    about = "Durable, ordered session event log for AI applications"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a Starcite node.
    Serve(ServeConfig),
}

/// Settings of one node. Every flag has an environment variable twin.
#[derive(Args, Debug, Clone)]
pub struct ServeConfig {
    /// Address every shard accepts HTTP on (SO_REUSEPORT).
    #[arg(long, env = "STARCITE_HTTP_ADDR", default_value = "0.0.0.0:4000")]
    pub http_addr: SocketAddr,

    /// Directory holding the logs, snapshots and node identity.
    #[arg(long, env = "STARCITE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Number of shards (glommio executors); default one per CPU.
    #[arg(long, env = "STARCITE_SHARDS")]
    pub shards: Option<usize>,

    /// Pin each shard's executor to one CPU.
    #[arg(long, env = "STARCITE_PIN", default_value_t = false)]
    pub pin: bool,

    /// Microseconds an idle shard spins before parking (trades CPU for wake-up latency).
    #[arg(long, env = "STARCITE_SPIN_BEFORE_PARK_US", default_value_t = 50)]
    pub spin_before_park_us: u64,

    /// Client connections (HTTP, WebSocket) the node serves at once, split evenly across
    /// shards; past it a new connection gets 503 `overloaded` and is closed. Default: the
    /// open-file limit (RLIMIT_NOFILE, raised to its hard limit at start) minus the
    /// descriptors the node keeps for itself (docs/deployment.md, "Connections and file
    /// descriptors").
    #[arg(long, env = "STARCITE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Largest accepted request body in bytes.
    #[arg(long, env = "STARCITE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Longest a write waits for its commit before answering 503 (e.g. `5s`, `500ms`).
    #[arg(long, env = "STARCITE_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Longest a graceful shutdown waits for in-flight writes.
    #[arg(long, env = "STARCITE_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Size of one pre-written log segment in bytes (a multiple of 4096).
    #[arg(long, env = "STARCITE_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub segment_bytes: u64,

    /// Bytes of recent events each shard keeps in memory; older events are read from the log.
    #[arg(long, env = "STARCITE_HOT_BYTES_PER_SHARD", default_value_t = 64 << 20)]
    pub hot_bytes_per_shard: usize,

    /// Idempotency keys remembered per session (cluster-wide setting).
    #[arg(long, env = "STARCITE_DEDUPE_KEYS_MAX", default_value_t = 10_000)]
    pub dedupe_keys_max: usize,

    /// Producers remembered per session (cluster-wide setting).
    #[arg(long, env = "STARCITE_PRODUCERS_MAX", default_value_t = 10_000)]
    pub producers_max: usize,

    /// Write a state snapshot after this many log bytes since the last one.
    #[arg(long, env = "STARCITE_SNAPSHOT_LOG_BYTES", default_value_t = 256 << 20)]
    pub snapshot_log_bytes: u64,

    /// Per-subscriber budget: bytes of events one tail read holds at most (a slow reader
    /// is then served from storage at its own pace).
    #[arg(long, env = "STARCITE_TAIL_BUFFER_BYTES", default_value_t = 1 << 20)]
    pub tail_buffer_bytes: usize,

    /// Node id recorded in the data dir (clusters arrive with Raft replication).
    #[arg(long, env = "STARCITE_NODE_ID", default_value_t = 1)]
    pub node_id: u64,

    /// Cluster id recorded in the data dir.
    #[arg(long, env = "STARCITE_CLUSTER_ID", default_value = "starcite-local")]
    pub cluster_id: String,

    /// Where other nodes connect to this one (shard i listens on this port + i).
    /// Defaults to this node's entry in --peers.
    #[arg(long, env = "STARCITE_PEER_ADDR")]
    pub peer_addr: Option<String>,

    /// Every member of the cluster with its peer address, this node included:
    /// `1=host:port,2=host:port,3=host:port`. Without it the node is a cluster of one.
    #[arg(long, env = "STARCITE_PEERS")]
    pub peers: Option<String>,

    /// Raft entries each group keeps in memory after applying them; a follower further
    /// behind than that catches up through a snapshot.
    #[arg(long, env = "STARCITE_RAFT_LOG_ENTRIES", default_value_t = 1024)]
    pub raft_log_entries: u64,

    /// The Raft clock: heartbeats go out every 3 ticks, elections start after 15–30.
    #[arg(long, env = "STARCITE_RAFT_TICK", default_value = "10ms", value_parser = parse_duration)]
    pub raft_tick: Duration,

    /// Postgres archive, e.g. `postgres://user@host:5432/db` (also read from
    /// `DATABASE_URL`). Without it the archive is off and history stays in the local log.
    #[arg(long, env = "STARCITE_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// An archive transaction closes at this many events…
    #[arg(long, env = "STARCITE_ARCHIVE_BATCH_EVENTS", default_value_t = 5_000)]
    pub archive_batch_events: usize,

    /// Local retention: keep at most this many bytes of log per node (older sealed
    /// segments are deleted; with an archive, only once archived). Default: unlimited.
    #[arg(long, env = "STARCITE_RETENTION_BYTES")]
    pub retention_bytes: Option<u64>,

    /// Local retention: delete sealed segments last written longer ago than this
    /// (`90s`, `30m`, `168h`). Default: unlimited.
    #[arg(long, env = "STARCITE_RETENTION_AGE", value_parser = parse_duration)]
    pub retention_age: Option<Duration>,

    /// Disk budget of the node's logs (split across shards): the log's files never pass
    /// it; when the next segment does not fit, client writes get 507 `storage_full`.
    /// Default: unlimited.
    #[arg(long, env = "STARCITE_MAX_DISK_BYTES")]
    pub max_disk_bytes: Option<u64>,

    /// …or this long after its first event arrived.
    #[arg(long, env = "STARCITE_ARCHIVE_BATCH_DELAY", default_value = "10ms", value_parser = parse_duration)]
    pub archive_batch_delay: Duration,

    /// Repair a damaged data dir: keep each group's term and vote, delete the log
    /// segments, index files and snapshot, and catch up from the other replicas, voting
    /// for no one until then (docs/deployment.md, "Repairing a replica").
    #[arg(long, env = "STARCITE_REBUILD", default_value_t = false)]
    pub rebuild: bool,

    /// With --rebuild, when the terms and votes cannot be read (the log is damaged, or
    /// the data dir was deleted by hand): carry nothing and learn the terms from every
    /// other replica before taking part. Needs every other node up.
    #[arg(long, env = "STARCITE_FORGET_VOTES", default_value_t = false)]
    pub forget_votes: bool,

    /// With --rebuild --forget-votes, for a data dir deleted by hand: the incarnation id
    /// its peers knew (their refusal names it), so that they accept it again.
    #[arg(long, env = "STARCITE_DATA_INCARNATION")]
    pub data_incarnation: Option<String>,

    /// Background verification of sealed log segments and their index files, in bytes
    /// read per second per node (split across shards); 0 turns it off.
    #[arg(long, env = "STARCITE_SCRUB_BYTES_PER_SEC", default_value_t = 8 << 20)]
    pub scrub_bytes_per_sec: u64,
}

/// One member of the cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub peer_addr: SocketAddr,
}

impl ServeConfig {
    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        let shards = self.shard_count();
        if shards == 0 || shards > shards::GROUPS as usize {
            return Err(format!("--shards must be 1..=256, got {shards}"));
        }
        if self.segment_bytes < (1 << 20) || !self.segment_bytes.is_multiple_of(4096) {
            return Err("--segment-bytes must be a multiple of 4096 and at least 1 MiB".into());
        }
        if self.max_body_bytes < 1024 {
            return Err("--max-body-bytes must be at least 1024".into());
        }
        self.check_record_bounds()?;
        if self.dedupe_keys_max == 0 || self.producers_max == 0 {
            return Err("dedupe bounds must be at least 1".into());
        }
        if self.raft_log_entries == 0 {
            return Err("--raft-log-entries must be at least 1".into());
        }
        if self.raft_tick < Duration::from_millis(1) || self.raft_tick > Duration::from_secs(1) {
            return Err("--raft-tick must be between 1ms and 1s".into());
        }
        let shards = shards as u64;
        let segment_files_min = 3 * shards * self.segment_bytes;
        if self
            .max_disk_bytes
            .is_some_and(|max| max < segment_files_min)
        {
            return Err(format!(
                "--max-disk-bytes must hold at least 3 log segments per shard ({segment_files_min} bytes)"
            ));
        }
        if self.archive_batch_events == 0 {
            return Err("--archive-batch-events must be at least 1".into());
        }
        if self.forget_votes && !self.rebuild {
            return Err("--forget-votes is a kind of --rebuild: give both".into());
        }
        if self.data_incarnation.is_some() && !self.forget_votes {
            return Err(
                "--data-incarnation is only for --rebuild --forget-votes (a data dir deleted by hand)"
                    .into(),
            );
        }
        if let Some(text) = &self.data_incarnation {
            crate::datadir::parse_incarnation(text)
                .map_err(|e| format!("--data-incarnation: {e}"))?;
        }
        if self.rebuild && self.members()?.len() < 2 {
            return Err(
                "--rebuild needs --peers: a node without replicas has nothing to rebuild from"
                    .into(),
            );
        }
        if let Some(url) = self.postgres_url() {
            url.parse::<postgres::Config>()
                .map_err(|e| format!("--postgres-url: {e}"))?;
        }
        self.members()?;
        Ok(())
    }

    /// The largest log record a request can produce (a batch of the most events with a
    /// body of `--max-body-bytes`, every server-added field included) must fit the log:
    /// within its record limit and, with batch header and padding, within one segment.
    /// Otherwise the first such request would stop the committer.
    fn check_record_bounds(&self) -> Result<(), String> {
        use shards::codec;
        let events = codec::BATCH_EVENTS_MAX;
        let record = codec::append_record_bytes_max(self.max_body_bytes, events);
        if record > codec::RECORD_BYTES_MAX {
            return Err(format!(
                "--max-body-bytes {} is too large: an append of up to {events} events with \
                 such a body makes a log record of up to {record} bytes, above the log's \
                 record limit of {} bytes (use --max-body-bytes {} at most)",
                self.max_body_bytes,
                codec::RECORD_BYTES_MAX,
                codec::append_body_bytes_max(codec::RECORD_BYTES_MAX, events)
            ));
        }
        let segment_needed = codec::single_record_batch_bytes(record) as u64;
        if segment_needed > self.segment_bytes {
            return Err(format!(
                "--max-body-bytes {} needs --segment-bytes of at least {segment_needed}, got \
                 --segment-bytes {}: an append of up to {events} events with such a body \
                 makes a log record of up to {record} bytes, which with its batch header and \
                 padding must fit in one segment (or use --max-body-bytes {} at most)",
                self.max_body_bytes,
                self.segment_bytes,
                codec::append_body_bytes_max(
                    codec::record_bytes_max_in(self.segment_bytes),
                    events
                )
            ));
        }
        Ok(())
    }

    /// File descriptors the node keeps for everything but client connections: see
    /// [`FdReserve`].
    pub fn fd_reserve(&self) -> Result<u64, String> {
        let peers = self.members()?.len().saturating_sub(1) as u64;
        Ok(FdReserve::default().total(self.shard_count() as u64, peers))
    }

    /// Client connections each shard serves at once, from `--max-connections` or, by
    /// default, from the open-file limit `nofile` minus [`Self::fd_reserve`]. Refuses
    /// a limit that would let connections take the descriptors the log needs (a
    /// segment roll without one stops the process).
    pub fn connections_per_shard(&self, nofile: u64) -> Result<usize, String> {
        let shards = self.shard_count() as u64;
        let reserve = self.fd_reserve()?;
        let available = nofile.saturating_sub(reserve);
        let total = match self.max_connections {
            Some(max) if max as u64 > available => {
                return Err(format!(
                    "--max-connections {max} is more than the open-file limit allows: \
                     RLIMIT_NOFILE {nofile} minus {reserve} descriptors kept for logs, \
                     snapshots, peers and Postgres leaves {available} (raise ulimit -n)"
                ))
            }
            Some(max) => max as u64,
            None => available,
        };
        if total < shards {
            return Err(format!(
                "too few file descriptors for client connections: RLIMIT_NOFILE {nofile} \
                 minus {reserve} kept for logs, snapshots, peers and Postgres leaves \
                 {available}, and each of the {shards} shards needs at least one \
                 (raise ulimit -n, or give --max-connections at least {shards})"
            ));
        }
        Ok((total / shards) as usize)
    }

    /// One shard's share of `--scrub-bytes-per-sec` (0 stays 0: scrubbing off).
    pub fn shard_scrub_bytes_per_sec(&self) -> u64 {
        match self.scrub_bytes_per_sec {
            0 => 0,
            rate => (rate / self.shard_count() as u64).max(1),
        }
    }

    /// One shard's share of the retention settings and disk budget.
    pub fn shard_retention(&self) -> crate::shard::Retention {
        let shards = self.shard_count() as u64;
        crate::shard::Retention {
            bytes: self.retention_bytes.map(|b| b / shards),
            age: self.retention_age,
            max_disk_bytes: self.max_disk_bytes.map(|b| b / shards),
        }
    }

    /// The archive's Postgres URL: `--postgres-url`/`STARCITE_POSTGRES_URL`, else
    /// `DATABASE_URL`; an empty value means none.
    pub fn postgres_url(&self) -> Option<String> {
        self.postgres_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok())
            .filter(|url| !url.trim().is_empty())
    }

    /// The cluster's members from `--peers` (just this node when absent), in id order.
    pub fn members(&self) -> Result<Vec<Member>, String> {
        let Some(peers) = self.peers.as_deref().filter(|p| !p.trim().is_empty()) else {
            return Ok(Vec::new());
        };
        let mut members = Vec::new();
        for part in peers.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| format!("--peers: {part:?} is not id=host:port"))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|&id| id > 0)
                .ok_or_else(|| format!("--peers: node id {id:?} is not a positive integer"))?;
            let peer_addr = resolve(addr.trim()).map_err(|e| format!("--peers: {e}"))?;
            if members.iter().any(|m: &Member| m.id == id) {
                return Err(format!("--peers: node {id} is listed twice"));
            }
            members.push(Member { id, peer_addr });
        }
        members.sort_by_key(|m| m.id);
        if !members.iter().any(|m| m.id == self.node_id) {
            return Err(format!(
                "--peers must include this node (--node-id {})",
                self.node_id
            ));
        }
        Ok(members)
    }

    /// Where this node listens for peers: --peer-addr, else its own --peers entry.
    pub fn listen_peer_addr(&self, members: &[Member]) -> Result<SocketAddr, String> {
        match &self.peer_addr {
            Some(addr) => resolve(addr).map_err(|e| format!("--peer-addr: {e}")),
            None => members
                .iter()
                .find(|m| m.id == self.node_id)
                .map(|m| m.peer_addr)
                .ok_or_else(|| "--peer-addr is needed without --peers".to_string()),
        }
    }
}

/// The file descriptors a node keeps for itself, so that client connections can never
/// take the one a segment roll, an index file or a snapshot needs.
#[derive(Debug, Clone, Copy)]
pub struct FdReserve {
    /// Standard streams, the data dir lock, signal handling, logging, the archiver's
    /// Postgres connections, files read or written once at start.
    pub base: u64,
    /// Per shard: its executor's io_uring rings and eventfds, the active and the next
    /// log segment, index and snapshot files being written, its HTTP listener.
    pub per_shard: u64,
    /// Per shard: segments and index files its log reader keeps open for cold reads.
    pub reader_files: u64,
    /// Per shard: connections being refused (503 `overloaded`) at once.
    pub refusing: u64,
    /// Per shard of a cluster: its peer listener and handshakes in progress.
    pub peer_listener_and_handshakes: u64,
    /// Per shard and other member: the connection to that member's shard.
    pub per_peer: u64,
}

impl Default for FdReserve {
    fn default() -> Self {
        FdReserve {
            base: 32,
            per_shard: 16,
            reader_files: 2 * crate::wal::READER_FILES_MAX as u64,
            refusing: crate::server::REFUSING_PER_SHARD_MAX as u64,
            peer_listener_and_handshakes: 1 + crate::transport::HANDSHAKES_PENDING_MAX as u64,
            per_peer: 2,
        }
    }
}

impl FdReserve {
    pub fn total(&self, shards: u64, peers: u64) -> u64 {
        let cluster = if peers > 0 {
            self.peer_listener_and_handshakes + self.per_peer * peers
        } else {
            0
        };
        self.base + shards * (self.per_shard + self.reader_files + self.refusing + cluster)
    }
}

/// Resolves `host:port` (a name is looked up once, at start).
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// Parses `250ms`, `5s`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("bad duration unit in {text:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeConfig, String> {
        use clap::Parser;
        let mut argv = vec!["starcite", "serve"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Serve(config) = cli.command;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn peers_list_every_member_and_must_include_this_node() {
        let config = serve(&[
            "--node-id",
            "2",
            "--peers",
            "3=127.0.0.1:7003, 1=127.0.0.1:7001,2=127.0.0.1:7002",
        ])
        .unwrap();
        let members = config.members().unwrap();
        let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(
            config.listen_peer_addr(&members).unwrap(),
            "127.0.0.1:7002".parse::<SocketAddr>().unwrap()
        );
        let err = serve(&["--node-id", "4", "--peers", "1=127.0.0.1:7001"]).unwrap_err();
        assert!(err.contains("must include this node"), "{err}");
        let err = serve(&["--peers", "1=127.0.0.1:7001,1=127.0.0.1:7002"]).unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
        let err = serve(&["--peers", "1:127.0.0.1:7001"]).unwrap_err();
        assert!(err.contains("id=host:port"), "{err}");
        let err = serve(&["--peers", "0=127.0.0.1:7001"]).unwrap_err();
        assert!(err.contains("positive integer"), "{err}");
        let err = serve(&["--peers", "1=127.0.0.1"]).unwrap_err();
        assert!(err.contains("cannot resolve"), "{err}");
        // No --peers: a cluster of one.
        assert!(serve(&[]).unwrap().members().unwrap().is_empty());
    }

    #[test]
    fn retention_and_disk_budget_split_across_shards() {
        let config = serve(&[
            "--shards",
            "2",
            "--retention-bytes",
            "1000000000",
            "--retention-age",
            "2h",
            "--max-disk-bytes",
            "2000000000",
        ])
        .unwrap();
        let r = config.shard_retention();
        assert_eq!(r.bytes, Some(500_000_000));
        assert_eq!(r.age, Some(Duration::from_secs(7200)));
        assert_eq!(r.max_disk_bytes, Some(1_000_000_000));
        assert_eq!(serve(&[]).unwrap().shard_retention().bytes, None);
        // The budget must hold a few segments per shard.
        let err = serve(&["--shards", "2", "--max-disk-bytes", "100000000"]).unwrap_err();
        assert!(err.contains("at least 3 log segments"), "{err}");
        let err = serve(&["--postgres-url", "postgres://x:notaport/db"]).unwrap_err();
        assert!(err.contains("--postgres-url"), "{err}");
    }

    #[test]
    fn rebuild_needs_peers_and_its_options_need_rebuild() {
        let peers = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003";
        assert!(serve(&["--peers", peers, "--rebuild"]).unwrap().rebuild);
        let err = serve(&["--rebuild"]).unwrap_err();
        assert!(err.contains("needs --peers"), "{err}");
        let err = serve(&["--peers", peers, "--forget-votes"]).unwrap_err();
        assert!(err.contains("--rebuild"), "{err}");
        let err = serve(&["--peers", peers, "--rebuild", "--data-incarnation", "ab"]).unwrap_err();
        assert!(err.contains("--forget-votes"), "{err}");
        let config = serve(&[
            "--peers",
            peers,
            "--rebuild",
            "--forget-votes",
            "--data-incarnation",
            "00000000000000ab",
        ])
        .unwrap();
        assert!(config.forget_votes);
        let err = serve(&[
            "--peers",
            peers,
            "--rebuild",
            "--forget-votes",
            "--data-incarnation",
            "xyz",
        ])
        .unwrap_err();
        assert!(err.contains("not hex"), "{err}");
    }

    #[test]
    fn the_largest_record_a_body_makes_must_fit_a_record_and_a_segment() {
        use shards::codec;
        let events = codec::BATCH_EVENTS_MAX;
        // The default body limit needs more than the smallest segment.
        let err = serve(&["--segment-bytes", "1048576"]).unwrap_err();
        assert!(err.contains("--max-body-bytes 1048576"), "{err}");
        assert!(err.contains("--segment-bytes 1048576"), "{err}");
        // The largest body a 1 MiB segment takes is accepted; one byte more is not.
        let body = codec::append_body_bytes_max(codec::record_bytes_max_in(1 << 20), events);
        let body_arg = body.to_string();
        serve(&["--segment-bytes", "1048576", "--max-body-bytes", &body_arg]).unwrap();
        let more = (body + 1).to_string();
        let err = serve(&["--segment-bytes", "1048576", "--max-body-bytes", &more]).unwrap_err();
        assert!(err.contains("needs --segment-bytes of at least"), "{err}");
        // The log's record limit caps the body whatever the segment size.
        let err = serve(&["--max-body-bytes", "16777216"]).unwrap_err();
        assert!(err.contains("record limit of 8388608"), "{err}");
        let body = codec::append_body_bytes_max(codec::RECORD_BYTES_MAX, events);
        assert!(body > 7 << 20, "{body}");
        let body_arg = body.to_string();
        serve(&["--segment-bytes", "16777216", "--max-body-bytes", &body_arg]).unwrap();
        let more = (body + 1).to_string();
        let err = serve(&["--segment-bytes", "16777216", "--max-body-bytes", &more]).unwrap_err();
        assert!(err.contains("record limit"), "{err}");
    }

    #[test]
    fn connections_are_what_the_open_file_limit_leaves_after_the_reserve() {
        let config = serve(&["--shards", "2"]).unwrap();
        let reserve = config.fd_reserve().unwrap();
        assert_eq!(reserve, FdReserve::default().total(2, 0));
        assert_eq!(config.connections_per_shard(reserve + 100).unwrap(), 50);
        let err = config.connections_per_shard(reserve + 1).unwrap_err();
        assert!(err.contains("too few file descriptors"), "{err}");
        let config = serve(&["--shards", "2", "--max-connections", "10"]).unwrap();
        assert_eq!(config.connections_per_shard(reserve + 100).unwrap(), 5);
        let err = config.connections_per_shard(reserve + 9).unwrap_err();
        assert!(err.contains("--max-connections 10"), "{err}");
        // A cluster keeps descriptors for its peers too.
        let peers = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003";
        let config = serve(&["--shards", "2", "--peers", peers]).unwrap();
        assert!(config.fd_reserve().unwrap() > reserve);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 hours").is_err());
    }
}
