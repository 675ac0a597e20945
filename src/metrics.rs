//! Per-shard counters and histograms. Each shard owns its own (no sharing between
//! cores); `/metrics` asks every shard for a copy and merges them.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKET_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; BUCKET_BOUNDS_US.len() + 1],
    sum_us: u64,
}

impl Histogram {
    pub fn record(&mut self, value_us: u64) {
        let bucket = BUCKET_BOUNDS_US
            .iter()
            .position(|&bound| value_us <= bound)
            .unwrap_or(BUCKET_BOUNDS_US.len());
        self.counts[bucket] += 1;
        self.sum_us += value_us;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.sum_us += other.sum_us;
    }

    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKET_BOUNDS_US.iter().enumerate() {
            cumulative += self.counts[i];
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[BUCKET_BOUNDS_US.len()];
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Everything one shard counts. Plain data, so it can cross cores by message.
#[derive(Clone, Debug, Default)]
pub struct ShardStats {
    pub requests: BTreeMap<(&'static str, u16), u64>,
    pub request_latency: BTreeMap<&'static str, Histogram>,
    pub appends: u64,
    pub dedupes: u64,
    pub conflicts: u64,
    pub dedupe_evictions: u64,
    pub hot_evictions: u64,
    pub fsyncs: u64,
    pub fsync_latency: Histogram,
    pub log_bytes_written: u64,
    pub hot_bytes: u64,
    pub sessions: u64,
    pub tail_subscribers: u64,
    /// Connections answered 503 `overloaded` at accept (past `--max-connections`).
    pub connections_refused: u64,
    pub commit_index_sum: u64,
    pub groups_leading: u64,
    pub groups_without_leader: u64,
    pub elections_won: u64,
    pub leaderships_lost: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    pub forwarded: u64,
    pub peer_frames_dropped: u64,
    /// Replies to forwarded requests that answered no request of this process.
    pub stale_replies_dropped: u64,
    /// Log segments deleted by retention.
    pub segments_deleted: u64,
    /// Raft messages from a leader cut or dropped because the log had no room for them.
    pub storage_deferred: u64,
    /// Bytes of the log's files (segments and index files).
    pub log_disk_bytes: u64,
    /// Shards whose storage is full (client writes get 507), one entry per shard.
    pub storage_full: Vec<StorageFull>,
    /// Groups with a replica here that have had no leader for 3 s (or never had one).
    pub leaderless: Vec<u16>,
    /// Groups still catching up after a rebuild (they vote for no one meanwhile).
    pub groups_catching_up: u64,
    /// Peers that refused this node's handshake, and why (the last refusal of each).
    pub refused_by: BTreeMap<u64, String>,
    /// Handshakes of peers this shard refused because they came back with a new data
    /// dir (another incarnation).
    pub peers_refused: u64,
    /// The archive feed, when `--postgres-url` is set.
    pub archive: Option<ArchiveShardStats>,
    /// The archiver thread's counters (shared by every shard of the node).
    pub archiver: Option<std::sync::Arc<crate::archive::ArchiveStats>>,
    /// Damaged log data found on this replica, and its repair.
    pub damage: crate::shard::DamageStats,
    /// Events the event index reads from a repaired copy.
    pub repaired_events: u64,
}

/// A shard whose storage is full (`shards::storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageFull {
    pub shard: usize,
    pub reason: shards::storage::FullReason,
    /// Not even Raft's records can be written (no room and no next segment).
    pub log_blocked: bool,
}

/// A shard's share of the archive lag (groups it leads).
#[derive(Debug, Clone, Copy, Default)]
pub struct ArchiveShardStats {
    /// Committed events not yet confirmed in Postgres.
    pub events_behind: u64,
    /// Age of the oldest of them.
    pub seconds_behind: f64,
    /// Batches kept for a later tick because the archiver's channel was full.
    pub batches_deferred: u64,
    /// Events read back from the log because they had left memory before being sent.
    pub events_read_from_log: u64,
}

impl ArchiveShardStats {
    fn merge(&mut self, other: &ArchiveShardStats) {
        self.events_behind += other.events_behind;
        self.seconds_behind = self.seconds_behind.max(other.seconds_behind);
        self.batches_deferred += other.batches_deferred;
        self.events_read_from_log += other.events_read_from_log;
    }
}

impl ShardStats {
    pub fn record_request(&mut self, route: &'static str, status: u16, latency_us: u64) {
        *self.requests.entry((route, status)).or_default() += 1;
        self.request_latency
            .entry(route)
            .or_default()
            .record(latency_us);
    }

    pub fn merge(&mut self, other: &ShardStats) {
        for (key, count) in &other.requests {
            *self.requests.entry(*key).or_default() += count;
        }
        for (route, hist) in &other.request_latency {
            self.request_latency.entry(route).or_default().merge(hist);
        }
        self.appends += other.appends;
        self.dedupes += other.dedupes;
        self.conflicts += other.conflicts;
        self.dedupe_evictions += other.dedupe_evictions;
        self.hot_evictions += other.hot_evictions;
        self.fsyncs += other.fsyncs;
        self.fsync_latency.merge(&other.fsync_latency);
        self.log_bytes_written += other.log_bytes_written;
        self.hot_bytes += other.hot_bytes;
        self.sessions += other.sessions;
        self.tail_subscribers += other.tail_subscribers;
        self.connections_refused += other.connections_refused;
        self.commit_index_sum += other.commit_index_sum;
        self.groups_leading += other.groups_leading;
        self.groups_without_leader += other.groups_without_leader;
        self.elections_won += other.elections_won;
        self.leaderships_lost += other.leaderships_lost;
        self.snapshots_sent += other.snapshots_sent;
        self.snapshots_installed += other.snapshots_installed;
        self.forwarded += other.forwarded;
        self.peer_frames_dropped += other.peer_frames_dropped;
        self.stale_replies_dropped += other.stale_replies_dropped;
        self.segments_deleted += other.segments_deleted;
        self.storage_deferred += other.storage_deferred;
        self.log_disk_bytes += other.log_disk_bytes;
        self.storage_full.extend_from_slice(&other.storage_full);
        self.leaderless.extend_from_slice(&other.leaderless);
        self.groups_catching_up += other.groups_catching_up;
        for (node, reason) in &other.refused_by {
            self.refused_by.insert(*node, reason.clone());
        }
        self.peers_refused += other.peers_refused;
        if let Some(theirs) = &other.archive {
            self.archive
                .get_or_insert_with(Default::default)
                .merge(theirs);
        }
        if self.archiver.is_none() {
            self.archiver = other.archiver.clone();
        }
        self.damage.merge(&other.damage);
        self.repaired_events += other.repaired_events;
    }
}

/// Reads one per-shard gauge.
type Gauge = fn(&ShardStats) -> u64;

/// Renders the merged stats (and each shard's gauges) as Prometheus text.
pub fn render(per_shard: &[ShardStats]) -> String {
    let mut total = ShardStats::default();
    for stats in per_shard {
        total.merge(stats);
    }
    let mut out = String::new();
    out.push_str("# TYPE starcite_http_requests_total counter\n");
    for ((route, status), count) in &total.requests {
        let _ = writeln!(
            out,
            "starcite_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
        );
    }
    out.push_str("# TYPE starcite_http_request_duration_seconds histogram\n");
    for (route, hist) in &total.request_latency {
        hist.render(
            &mut out,
            "starcite_http_request_duration_seconds",
            &format!("route=\"{route}\""),
        );
    }
    let counters = [
        ("starcite_appends_total", total.appends),
        ("starcite_dedupes_total", total.dedupes),
        ("starcite_conflicts_total", total.conflicts),
        ("starcite_dedupe_evictions_total", total.dedupe_evictions),
        ("starcite_hot_window_evictions_total", total.hot_evictions),
        ("starcite_log_fsyncs_total", total.fsyncs),
        ("starcite_log_bytes_written_total", total.log_bytes_written),
        ("starcite_raft_elections_won_total", total.elections_won),
        (
            "starcite_raft_leaderships_lost_total",
            total.leaderships_lost,
        ),
        ("starcite_raft_snapshots_sent_total", total.snapshots_sent),
        (
            "starcite_raft_snapshots_installed_total",
            total.snapshots_installed,
        ),
        ("starcite_forwarded_requests_total", total.forwarded),
        (
            "starcite_peer_frames_dropped_total",
            total.peer_frames_dropped,
        ),
        (
            "starcite_stale_replies_dropped_total",
            total.stale_replies_dropped,
        ),
        (
            "starcite_log_segments_deleted_total",
            total.segments_deleted,
        ),
        (
            "starcite_peer_handshakes_refused_new_data_dir_total",
            total.peers_refused,
        ),
        (
            "starcite_storage_deferred_messages_total",
            total.storage_deferred,
        ),
        ("starcite_log_damage_found_total", total.damage.found),
        ("starcite_log_damaged_spans_total", total.damage.spans),
        ("starcite_log_repairs_total", total.damage.repaired),
        (
            "starcite_log_index_rebuilds_total",
            total.damage.index_rebuilds,
        ),
        (
            "starcite_log_damage_not_queued_total",
            total.damage.not_queued,
        ),
        ("starcite_scrub_bytes_total", total.damage.scrub_bytes),
        ("starcite_scrub_segments_total", total.damage.scrub_segments),
        (
            "starcite_raft_leaderships_given_up_total",
            total.damage.leaderships_given_up,
        ),
        (
            "starcite_connections_refused_total",
            total.connections_refused,
        ),
    ];
    for (name, value) in counters {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {value}");
    }
    out.push_str("# TYPE starcite_log_fsync_duration_seconds histogram\n");
    total
        .fsync_latency
        .render(&mut out, "starcite_log_fsync_duration_seconds", "");
    let gauges: [(&str, Gauge); 12] = [
        ("starcite_hot_window_bytes", |s| s.hot_bytes),
        ("starcite_sessions", |s| s.sessions),
        ("starcite_tail_subscribers", |s| s.tail_subscribers),
        ("starcite_commit_index_sum", |s| s.commit_index_sum),
        ("starcite_raft_groups_leading", |s| s.groups_leading),
        ("starcite_raft_groups_without_leader", |s| {
            s.groups_without_leader
        }),
        ("starcite_raft_groups_catching_up", |s| s.groups_catching_up),
        ("starcite_refused_by_peers", |s| s.refused_by.len() as u64),
        ("starcite_log_disk_bytes", |s| s.log_disk_bytes),
        ("starcite_log_damaged_events", |s| s.damage.damaged_events),
        ("starcite_log_damaged_groups", |s| {
            s.damage.groups_held.len() as u64
        }),
        ("starcite_log_repaired_events", |s| s.repaired_events),
    ];
    for (name, get) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (shard, stats) in per_shard.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", get(stats));
        }
    }
    render_storage_full(&mut out, per_shard);
    if let (Some(feed), Some(archiver)) = (&total.archive, &total.archiver) {
        render_archive(&mut out, feed, archiver);
    }
    out
}

/// `starcite_storage_full{shard,reason}`: 1 for the reason a shard refuses client
/// writes (507), 0 for the others; `starcite_log_blocked{shard}`: 1 while not even
/// Raft's records can be written.
fn render_storage_full(out: &mut String, per_shard: &[ShardStats]) {
    use shards::storage::FullReason;
    out.push_str("# TYPE starcite_storage_full gauge\n");
    for (shard, stats) in per_shard.iter().enumerate() {
        let full = stats.storage_full.first();
        for reason in FullReason::ALL {
            let on = full.is_some_and(|f| f.reason == reason);
            let _ = writeln!(
                out,
                "starcite_storage_full{{shard=\"{shard}\",reason=\"{}\"}} {}",
                reason.as_str(),
                u8::from(on)
            );
        }
    }
    out.push_str("# TYPE starcite_log_blocked gauge\n");
    for (shard, stats) in per_shard.iter().enumerate() {
        let blocked = stats.storage_full.first().is_some_and(|f| f.log_blocked);
        let _ = writeln!(
            out,
            "starcite_log_blocked{{shard=\"{shard}\"}} {}",
            u8::from(blocked)
        );
    }
}

fn render_archive(
    out: &mut String,
    feed: &ArchiveShardStats,
    archiver: &crate::archive::ArchiveStats,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let gauges = [
        ("starcite_archive_events_behind", feed.events_behind as f64),
        ("starcite_archive_seconds_behind", feed.seconds_behind),
        (
            "starcite_archive_connected",
            f64::from(u8::from(archiver.connected.load(Relaxed))),
        ),
        (
            "starcite_archive_pending_events",
            archiver.pending_events.load(Relaxed) as f64,
        ),
    ];
    for (name, value) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {value}");
    }
    let counters = [
        (
            "starcite_archive_batches_written_total",
            archiver.batches_written.load(Relaxed),
        ),
        (
            "starcite_archive_events_written_total",
            archiver.events_written.load(Relaxed),
        ),
        (
            "starcite_archive_events_inserted_total",
            archiver.events_inserted.load(Relaxed),
        ),
        (
            "starcite_archive_retries_total",
            archiver.retries.load(Relaxed),
        ),
        (
            "starcite_archive_connect_failures_total",
            archiver.connect_failures.load(Relaxed),
        ),
        (
            "starcite_archive_batches_deferred_total",
            feed.batches_deferred,
        ),
        (
            "starcite_archive_events_read_from_log_total",
            feed.events_read_from_log,
        ),
        ("starcite_archive_reads_total", archiver.reads.load(Relaxed)),
        (
            "starcite_archive_read_failures_total",
            archiver.read_failures.load(Relaxed),
        ),
    ];
    for (name, value) in counters {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {value}");
    }
    out.push_str("# TYPE starcite_archive_lag_seconds histogram\n");
    archiver
        .lag
        .lock()
        .expect("lag lock")
        .render(out, "starcite_archive_lag_seconds", "");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut stats = ShardStats::default();
        stats.record_request("append", 201, 80);
        stats.record_request("append", 201, 3_000);
        stats.fsync_latency.record(120);
        let text = render(&[stats.clone(), stats]);
        assert!(text.contains("starcite_http_requests_total{route=\"append\",status=\"201\"} 4"));
        assert!(text.contains(
            "starcite_http_request_duration_seconds_bucket{route=\"append\",le=\"0.0001\"} 2"
        ));
        assert!(text.contains(
            "starcite_http_request_duration_seconds_bucket{route=\"append\",le=\"+Inf\"} 4"
        ));
        assert!(text.contains("starcite_log_fsync_duration_seconds_count{} 2"));
        assert!(text.contains("starcite_storage_full{shard=\"1\",reason=\"no_space\"} 0"));
    }

    #[test]
    fn storage_full_gauge_names_the_shard_and_its_reason() {
        let full = ShardStats {
            storage_full: vec![StorageFull {
                shard: 1,
                reason: shards::storage::FullReason::Budget,
                log_blocked: true,
            }],
            ..ShardStats::default()
        };
        let text = render(&[ShardStats::default(), full]);
        assert!(text.contains("starcite_storage_full{shard=\"1\",reason=\"budget\"} 1"));
        assert!(text.contains("starcite_storage_full{shard=\"1\",reason=\"no_space\"} 0"));
        assert!(text.contains("starcite_storage_full{shard=\"0\",reason=\"budget\"} 0"));
        assert!(text.contains("starcite_log_blocked{shard=\"1\"} 1"));
        assert!(text.contains("starcite_log_blocked{shard=\"0\"} 0"));
    }
}
