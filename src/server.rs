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

/// Connections one shard is refusing at once (writing their 503), at most; past it the
/// shard accepts nothing until one is done (new connections wait in the kernel's
/// backlog). Counted in the descriptors the node keeps for itself
/// (`crate::config::FdReserve`).
pub const REFUSING_PER_SHARD_MAX: usize = 16;
/// How long a refused connection gets to take its 503 before it is closed anyway.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After the 503, how long what the client sends meanwhile is read and dropped, so that
/// closing does not reset the connection before the client read the answer.
const REFUSE_LINGER: Duration = Duration::from_millis(250);
/// Accept errors (out of descriptors, …) are logged at most this often per shard.
const ACCEPT_ERROR_LOG_PERIOD: Duration = Duration::from_secs(1);
/// Exit status of a process stopped because a thread panicked (fail-stop).
pub const EXIT_PANIC: i32 = 101;
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
    /// Client connections this shard serves at once.
    connections_max: usize,
    archive: Option<ArchiveLink>,
    rebuild: Option<Rebuild>,
}

/// An unfinished rebuild (`crate::rebuild`): its marker and the tracker that removes it.
type Rebuild = (Arc<Marker>, Arc<RebuildTracker>);

/// Runs a node until it is asked to stop. Returns an error message for a failed start.
pub fn run(config: ServeConfig) -> Result<(), String> {
    install_fail_stop();
    config.validate()?;
    let members = config.members()?;
    check_ports_free(&config, &members)?;
    let nofile = raise_open_file_limit();
    let connections_max = config.connections_per_shard(nofile)?;
    tracing::info!(
        nofile,
        reserved = config.fd_reserve()?,
        connections_per_shard = connections_max,
        "client connection cap"
    );
    crate::tail::set_event_bytes_max(config.max_body_bytes);
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
            connections_max,
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

/// Fail-stop (DESIGN.md, "The replica core and its driver"): a panic in any thread (a
/// shard's executor, the archiver, the signal thread) means an invariant broke, and a
/// process with one shard gone would keep serving half of its groups. The hook prints
/// the reason (the default hook's message first) and ends the process at once with
/// [`EXIT_PANIC`]; a supervisor restarts it and recovery replays the log.
fn install_fail_stop() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = format!(
            "thread {name} panicked ({info}): stopping the process (fail-stop, exit status \
             {EXIT_PANIC}); restart it to recover from the log"
        );
        tracing::error!("{message}");
        eprintln!("starcite: {message}");
        // SAFETY: _exit(2) ends the process without running atexit handlers or
        // destructors, which other threads may be using; everything acknowledged is
        // already durable.
        unsafe { libc::_exit(EXIT_PANIC) }
    }));
}

/// Every shard listens with SO_REUSEPORT, which would also let a second node on this
/// host share (and silently take half of) the HTTP or peer ports. A port that a socket
/// held by a running process already listens on (in this network namespace) is
/// refused. The kernel's tables are read rather than a test bind: connections a killed
/// predecessor left closing would fail a bind without SO_REUSEPORT, and its listener
/// may outlive it briefly (held by its io_uring until the kernel tears that down),
/// though the port is free for this process.
fn check_ports_free(config: &ServeConfig, members: &[crate::config::Member]) -> Result<(), String> {
    let mut ports = vec![("HTTP", config.http_addr)];
    if members.len() > 1 {
        let listen = config.listen_peer_addr(members)?;
        for shard in 0..config.shard_count() {
            let addr = crate::transport::shard_peer_addr(listen, shard as u32);
            ports.push(("peer", addr));
        }
    }
    let listening = listening_sockets();
    for (what, addr) in ports.into_iter().filter(|(_, a)| a.port() != 0) {
        let inodes: Vec<u64> = listening
            .iter()
            .filter(|(l, _)| {
                l.port() == addr.port()
                    && (l.ip() == addr.ip()
                        || l.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            })
            .map(|&(_, inode)| inode)
            .collect();
        if !inodes.is_empty() && held_by_a_process(&inodes) {
            return Err(format!(
                "cannot listen on {addr} ({what} port): the port is already in use, another \
                 process listens on it (another starcite node?): stop it or choose another port"
            ));
        }
    }
    Ok(())
}

/// Local addresses and inodes of the TCP sockets in LISTEN state, from
/// `/proc/net/tcp{,6}` (empty where those cannot be read: the bind then decides alone).
fn listening_sockets() -> Vec<(std::net::SocketAddr, u64)> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != LISTEN {
                continue;
            }
            let inode = fields[9].parse::<u64>().unwrap_or(0);
            if let Some(addr) = parse_proc_addr(fields[1]) {
                out.push((addr, inode));
            }
        }
    }
    out
}

/// Whether a running process has one of these socket inodes open. Processes of other
/// users may be unreadable: their sockets cannot share our port anyway (SO_REUSEPORT
/// needs the same user), so the bind refuses those.
fn held_by_a_process(inodes: &[u64]) -> bool {
    let names: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    for proc_dir in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if names.iter().any(|n| target.as_os_str() == n.as_str()) {
                    return true;
                }
            }
        }
    }
    false
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6): the address as the kernel
/// prints it, in 32-bit words of host byte order, and the port in hex.
fn parse_proc_addr(text: &str) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            // A dual-stack listener on `::` or a v4-mapped one covers IPv4 too.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Raises the soft open-file limit to the hard one (client connections are the main
/// user of descriptors) and returns it.
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
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
        boot.connections_max,
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
    connections_max: usize,
) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    let refusing = Rc::new(std::cell::Cell::new(0usize));
    let mut errors = AcceptErrors::default();
    loop {
        while refusing.get() >= REFUSING_PER_SHARD_MAX && !shutdown.is_triggered() {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let accepted = match select(Box::pin(listener.accept()), Box::pin(shutdown.wait())).await {
            Either::Left((accepted, _)) => accepted,
            Either::Right(_) => return,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                errors.failed(&e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= connections_max {
            api.node.core.stats.borrow_mut().connections_refused += 1;
            refusing.set(refusing.get() + 1);
            let refusing = refusing.clone();
            glommio::spawn_local(async move {
                refuse(stream).await;
                refusing.set(refusing.get() - 1);
            })
            .detach();
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

/// Answers a connection over the cap with 503 `overloaded` (`Retry-After: 1`) and closes
/// it, within [`REFUSE_TIMEOUT`] plus [`REFUSE_LINGER`].
async fn refuse(mut stream: glommio::net::TcpStream) {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let response = crate::http::Response::error(
        503,
        "overloaded",
        "this node serves as many connections as it can: retry shortly",
    )
    .with_header("Retry-After", "1");
    let bytes = crate::http::encode_last(&response);
    let answer = async {
        stream.write_all(&bytes).await?;
        stream.shutdown(std::net::Shutdown::Write).await
    };
    if !matches!(
        crate::node::with_timeout(REFUSE_TIMEOUT, answer).await,
        Some(Ok(()))
    ) {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 1024];
        while let Ok(1..) = stream.read(&mut sink).await {}
    };
    let _ = crate::node::with_timeout(REFUSE_LINGER, drain).await;
}

/// Accept errors (EMFILE, ENFILE, …) repeat as fast as the loop retries: log the first,
/// then at most one line per [`ACCEPT_ERROR_LOG_PERIOD`] with how many happened.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn failed(&mut self, error: &dyn std::fmt::Display) {
        self.unlogged += 1;
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_PERIOD);
        if due {
            tracing::warn!(%error, count = self.unlogged, "accept failed");
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_addresses_parse_as_the_kernel_prints_them() {
        let v4 = parse_proc_addr("0100007F:1F90").unwrap();
        assert_eq!(
            v4,
            "127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap()
        );
        let any6 = parse_proc_addr("00000000000000000000000000000000:0FA0").unwrap();
        assert_eq!(any6, "[::]:4000".parse::<std::net::SocketAddr>().unwrap());
        assert!(parse_proc_addr("zz:1").is_none());
        // This process listens on a port: the table shows it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inodes: Vec<u64> = listening_sockets()
            .into_iter()
            .filter(|(a, _)| *a == addr)
            .map(|(_, inode)| inode)
            .collect();
        assert_eq!(inodes.len(), 1);
        assert!(held_by_a_process(&inodes));
        drop(listener);
        assert!(!listening_sockets().iter().any(|(a, _)| *a == addr));
    }
}
