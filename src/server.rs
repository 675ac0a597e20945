//! Starting and stopping a node: the data dir, one glommio executor per shard, the
//! channel mesh between them, the HTTP listeners, and graceful shutdown on SIGTERM/SIGINT.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{select, Either};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use shards::session::Limits;

use crate::api::Api;
use crate::archive::{ArchiveConfig, Archiver, ArchiverHandle, Durable, StartError};
use crate::config::ServeConfig;
use crate::datadir::{parse_incarnation, DataDir, Identity, DATA_FORMAT_VERSION};
use crate::http::{HttpConfig, Shutdown};
use crate::node::{serve_peer, MeshMsg, Node, MESH_CHANNEL_CAPACITY};
use crate::rebuild::{Marker, RebuildTracker};
use crate::shard::{
    start_transport, ArchiveLink, CatchUpSettings, PeerSettings, RaftSettings, ShardCore,
    ShardSettings,
};

/// Connections one shard serves at once, at most; more are closed on accept.
const CONNECTIONS_PER_SHARD_MAX: usize = 16_384;
/// Test-only: delay every fdatasync by this many milliseconds (proves acks wait for fsync).
const FSYNC_DELAY_ENV: &str = "STARCITE_TEST_FSYNC_DELAY_MS";
/// Followers campaign after 15–30 ticks without a leader (150–300 ms at the default
/// 10 ms tick); leaders send heartbeats every 3 ticks.
const ELECTION_TICKS: u32 = 15;
const HEARTBEAT_TICKS: u32 = 3;

/// Everything one shard's executor needs, moved into its thread.
struct ShardBoot {
    index: usize,
    config: Arc<ServeConfig>,
    data_dir: Arc<DataDir>,
    senders: Vec<Option<SharedSender<MeshMsg>>>,
    receivers: Vec<Option<SharedReceiver<MeshMsg>>>,
    ready: Arc<AtomicUsize>,
    stop: oneshot::Receiver<()>,
    archive: Option<ArchiveLink>,
    rebuild: Option<Rebuild>,
}

/// An unfinished rebuild (`crate::rebuild`): its marker and the tracker that removes it.
type Rebuild = (Arc<Marker>, Arc<RebuildTracker>);

/// Runs a node until it is asked to stop. Returns an error message for a failed start.
pub fn run(config: ServeConfig) -> Result<(), String> {
    config.validate()?;
    let members = config.members()?;
    if !members.is_empty() {
        let listen = config.listen_peer_addr(&members)?;
        tracing::info!(
            node = config.node_id,
            peer_addr = %listen,
            members = ?members.iter().map(|m| m.id).collect::<Vec<_>>(),
            "cluster member"
        );
    }
    let shards = config.shard_count();
    let identity = Identity {
        format_version: DATA_FORMAT_VERSION,
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
        shards,
    };
    let incarnation = config
        .data_incarnation
        .as_deref()
        .map(parse_incarnation)
        .transpose()?;
    let data_dir = Arc::new(DataDir::open(&config.data_dir, &identity, incarnation)?);
    let rebuild = start_rebuild(&config, &data_dir, members.len())?;
    let (archiver, mut links) = start_archiver(&config, shards)?;
    let config = Arc::new(config);
    let ready = Arc::new(AtomicUsize::new(0));
    let (mut senders, mut receivers) = build_mesh(shards);
    let mut stops = Vec::new();
    let mut handles = Vec::new();
    for index in 0..shards {
        let (stop_tx, stop_rx) = oneshot::channel();
        stops.push(stop_tx);
        let boot = ShardBoot {
            index,
            config: config.clone(),
            data_dir: data_dir.clone(),
            senders: std::mem::take(&mut senders[index]),
            receivers: std::mem::take(&mut receivers[index]),
            ready: ready.clone(),
            stop: stop_rx,
            archive: links.as_mut().map(|links| links[index].clone()),
            rebuild: rebuild.clone(),
        };
        let placement = if config.pin {
            Placement::Fixed(index)
        } else {
            Placement::Unbound
        };
        let mut builder = LocalExecutorBuilder::new(placement).name(&format!("shard-{index}"));
        if config.spin_before_park_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(config.spin_before_park_us));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Non-root users usually have 8 MiB of locked memory; stay well inside it.
            builder = builder.io_memory(1 << 20).ring_depth(1024);
        }
        let handle = builder
            .spawn(move || async move { shard_main(boot).await })
            .map_err(|e| format!("cannot start shard {index}: {e}"))?;
        handles.push(handle);
    }
    spawn_signal_thread(stops)?;
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => failure = Some(message),
            Err(e) => failure = Some(format!("shard executor failed: {e}")),
        }
    }
    if let Some(archiver) = archiver {
        archiver.shutdown();
    }
    match failure {
        Some(message) => Err(message),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// `--rebuild` deletes the damaged log, keeping the terms and votes in the marker
/// (`crate::rebuild::prepare`); a marker left by an unfinished rebuild makes this start
/// catch up too, with or without the flag.
fn start_rebuild(
    config: &ServeConfig,
    data_dir: &DataDir,
    members: usize,
) -> Result<Option<Rebuild>, String> {
    let shards = config.shard_count();
    let marker = if config.rebuild {
        Some(crate::rebuild::prepare(
            data_dir,
            shards,
            config.forget_votes,
        )?)
    } else {
        crate::rebuild::read_marker(&data_dir.root)?
    };
    let Some(marker) = marker else {
        return Ok(None);
    };
    if members < 2 {
        return Err(format!(
            "{} holds an unfinished rebuild ({}) but this node has no --peers to catch up from",
            data_dir.root.display(),
            crate::rebuild::MARKER_FILE
        ));
    }
    if !config.rebuild {
        tracing::warn!(
            "an unfinished rebuild: every group catches up from its leader before it votes"
        );
    }
    let tracker = RebuildTracker::new(&data_dir.root, shards);
    Ok(Some((Arc::new(marker), Arc::new(tracker))))
}

/// Starts the Postgres archiver when a URL is configured: one link per shard. A
/// database of another cluster stops the start; an unreachable one does not (the
/// archive lags and catches up).
fn start_archiver(
    config: &ServeConfig,
    shards: usize,
) -> Result<(Option<ArchiverHandle>, Option<Vec<ArchiveLink>>), String> {
    let Some(url) = config.postgres_url() else {
        return Ok((None, None));
    };
    let durable: Vec<Arc<Mutex<HashMap<String, u64>>>> =
        (0..shards).map(|_| Arc::default()).collect();
    let reports = durable.clone();
    let on_durable = Box::new(move |d: Durable| {
        let mut map = reports[d.shard].lock().expect("durable lock");
        for (session, seq) in d.sessions {
            let at = map.entry(session).or_insert(0);
            *at = (*at).max(seq);
        }
    });
    let mut archive_config = ArchiveConfig::new(url, config.cluster_id.clone(), shards);
    archive_config.batch_max_events = config.archive_batch_events;
    archive_config.batch_max_delay = config.archive_batch_delay;
    let handle = Archiver::start(archive_config, on_durable).map_err(|e| match e {
        StartError::Refused(refusal) => format!("--postgres-url: {refusal}"),
        other => other.to_string(),
    })?;
    let links = durable
        .into_iter()
        .enumerate()
        .map(|(shard, durable)| ArchiveLink {
            sender: handle.shard_sender(shard),
            reads: handle.read_sender(),
            durable,
            stats: handle.stats().clone(),
        })
        .collect();
    tracing::info!("archiving to postgres");
    Ok((Some(handle), Some(links)))
}

type MeshEnds = (
    Vec<Vec<Option<SharedSender<MeshMsg>>>>,
    Vec<Vec<Option<SharedReceiver<MeshMsg>>>>,
);

/// One bounded channel for every ordered pair of shards.
fn build_mesh(shards: usize) -> MeshEnds {
    let mut senders: Vec<Vec<_>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    let mut receivers: Vec<Vec<_>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(MESH_CHANNEL_CAPACITY);
                senders[from][to] = Some(tx);
                receivers[to][from] = Some(rx);
            }
        }
    }
    (senders, receivers)
}

/// First SIGTERM/SIGINT: graceful shutdown of every shard. Second: exit at once
/// (everything acknowledged is already fsynced).
fn spawn_signal_thread(stops: Vec<oneshot::Sender<()>>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stops = Some(stops);
            for signal in signals.forever() {
                match stops.take() {
                    Some(stops) => {
                        tracing::info!(signal, "shutting down");
                        for stop in stops {
                            let _ = stop.send(());
                        }
                    }
                    None => {
                        tracing::warn!(signal, "second signal: exiting now");
                        std::process::exit(0);
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    Ok(())
}

async fn shard_main(boot: ShardBoot) -> Result<(), String> {
    let config = boot.config.clone();
    let index = boot.index;
    let (peers, peer_receivers) = connect_mesh(boot.senders, boot.receivers).await;
    let fsync_delay = std::env::var(FSYNC_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let members = config.members()?;
    let settings = ShardSettings {
        index,
        shards: config.shard_count(),
        limits: Limits {
            dedupe_keys_max: config.dedupe_keys_max,
            producers_max: config.producers_max,
        },
        request_timeout: config.request_timeout,
        hot_bytes: config.hot_bytes_per_shard,
        node_id: config.node_id,
        members: members.iter().map(|m| m.id).collect(),
        raft: RaftSettings {
            tick: config.raft_tick,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: HEARTBEAT_TICKS,
            log_entries: config.raft_log_entries,
        },
        archive: boot.archive.clone(),
        retention: config.shard_retention(),
        catch_up: boot
            .rebuild
            .as_ref()
            .map(|(marker, tracker)| CatchUpSettings {
                forget_votes: marker.forget_votes,
                carried: marker
                    .hard_states()
                    .into_iter()
                    .filter(|&(g, _)| shards::shard_of(g, config.shard_count()) == index)
                    .collect(),
                tracker: tracker.clone(),
            }),
        scrub_bytes_per_sec: config.shard_scrub_bytes_per_sec(),
    };
    let peer_settings = if members.len() > 1 {
        Some(PeerSettings {
            cluster_id: config.cluster_id.clone(),
            incarnation: process_incarnation(),
            listen: config.listen_peer_addr(&members)?,
            peers: members
                .iter()
                .filter(|m| m.id != config.node_id)
                .map(|m| (m.id, m.peer_addr))
                .collect(),
            settings: shards::wire::ClusterSettings {
                members: members.iter().map(|m| m.id).collect(),
                dedupe_keys_max: config.dedupe_keys_max as u64,
                producers_max: config.producers_max as u64,
                max_body_bytes: config.max_body_bytes as u64,
                retention_bytes: config.retention_bytes.unwrap_or(0),
                retention_age_ms: config.retention_age.map_or(0, |a| a.as_millis() as u64),
            },
            data_incarnation: boot.data_dir.incarnation,
        })
    } else {
        None
    };
    let started = Instant::now();
    let dir = boot.data_dir.shard_dir(index);
    let core = ShardCore::start(
        settings,
        &dir,
        config.segment_bytes,
        fsync_delay,
        config.snapshot_log_bytes,
    )
    .await?;
    tracing::info!(
        shard = index,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "log recovered"
    );
    if let Some(peer_settings) = peer_settings {
        start_transport(&core, peer_settings)?;
    }
    for rx in peer_receivers {
        glommio::spawn_local(serve_peer(core.clone(), rx)).detach();
    }
    let node = Rc::new(Node::new(core.clone(), peers, boot.ready.clone()));
    let listener = TcpListener::bind(config.http_addr)
        .map_err(|e| format!("cannot listen on {}: {e}", config.http_addr))?;
    boot.ready.fetch_add(1, Ordering::AcqRel);
    if index == 0 {
        tracing::info!(addr = %config.http_addr, shards = config.shard_count(), "serving");
    }
    let http_shutdown = Rc::new(Shutdown::new());
    let api = Rc::new(Api {
        node: node.clone(),
        shutdown: http_shutdown.clone(),
        tail_buffer_bytes: config.tail_buffer_bytes,
        bodies_in_flight: Rc::new(std::cell::Cell::new(0)),
    });
    let http_config = Rc::new(HttpConfig {
        max_body_bytes: config.max_body_bytes,
        ..HttpConfig::default()
    });
    let accept = glommio::spawn_local(accept_loop(
        listener,
        api,
        http_config,
        http_shutdown.clone(),
    ));
    let _ = boot.stop.await;
    drain(&core, &http_shutdown, config.shutdown_timeout).await;
    drop(accept);
    Ok(())
}

async fn connect_mesh(
    senders: Vec<Option<SharedSender<MeshMsg>>>,
    receivers: Vec<Option<SharedReceiver<MeshMsg>>>,
) -> (
    Vec<Option<glommio::channels::shared_channel::ConnectedSender<MeshMsg>>>,
    Vec<glommio::channels::shared_channel::ConnectedReceiver<MeshMsg>>,
) {
    // Connecting waits for the other end, so connect every channel concurrently.
    let senders = futures::future::join_all(senders.into_iter().map(|s| async move {
        match s {
            Some(s) => Some(s.connect().await),
            None => None,
        }
    }));
    let receivers = futures::future::join_all(receivers.into_iter().flatten().map(|r| r.connect()));
    futures::future::join(senders, receivers).await
}

async fn accept_loop(
    listener: TcpListener,
    api: Rc<Api>,
    config: Rc<HttpConfig>,
    shutdown: Rc<Shutdown>,
) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let accepted = match select(Box::pin(listener.accept()), Box::pin(shutdown.wait())).await {
            Either::Left((accepted, _)) => accepted,
            Either::Right(_) => return,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= CONNECTIONS_PER_SHARD_MAX {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.set(open.get() + 1);
        let (api, config, shutdown, open) =
            (api.clone(), config.clone(), shutdown.clone(), open.clone());
        glommio::spawn_local(async move {
            crate::http::serve_connection(stream, api, config, shutdown).await;
            open.set(open.get() - 1);
        })
        .detach();
    }
}

/// Graceful shutdown of one shard: stop accepting, let in-flight writes finish for at
/// most `limit`, refuse new writes, close tails (1001), and leave the log synced.
async fn drain(core: &Rc<ShardCore>, http: &Rc<Shutdown>, limit: Duration) {
    http.trigger();
    let deadline = Instant::now() + limit;
    while !core.idle() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Hand this node's groups to other voters so clients see no election timeout.
    let left = deadline.saturating_duration_since(Instant::now());
    core.transfer_leadership(left.min(Duration::from_secs(2)))
        .await;
    core.shutting_down.set(true);
    core.wake_all_tails();
    // Give tails and connections a moment to send their close frames.
    glommio::timer::sleep(Duration::from_millis(100)).await;
}

/// A random id for this process, new at every start and never 0 (see
/// `shards::peer::RequestId`); the same for every shard of the process.
fn process_incarnation() -> u64 {
    static INCARNATION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *INCARNATION.get_or_init(|| loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    })
}
