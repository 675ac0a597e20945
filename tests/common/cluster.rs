//! A real cluster for black-box tests: N `starcite serve` processes on 127.0.0.1 that
//! replicate every group to each other (`--node-id`, `--peer-addr`, `--peers`).
//!
//! With [`ClusterOpts::hosts`] each node runs in its own network namespace instead, on its
//! own address (see `common::netns`), and its peers may reach it through a proxy.
//!
//! Nodes are numbered like their node ids, from 1. Each node is a [`Server`] of the parent
//! module (same spawn, kill -9, SIGTERM, stderr log and HTTP helpers), on its own data dir
//! `target/test-data/<name>-<pid>-<n>/node<i>` and with its log next to it. Its ports
//! never change, so a restarted node comes back at the address its peers know.
//!
//! Dropping the `Cluster` kills every process; the folder is removed when the test
//! passes and kept, with the tail of every node's stderr printed, when it fails.

use std::fs;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{try_request, unique_path, Opts, Resp, Server, READY_TIMEOUT};

/// Ports handed out below the kernel's ephemeral range, so that a port of a stopped node
/// is not taken meanwhile by the source port of some outgoing connection.
const PORT_RANGE_LOW: u16 = 12_000;
/// Ports blocks already handed out by this process (tests of one binary run in threads).
static PORT_BLOCKS: AtomicUsize = AtomicUsize::new(0);
/// Attempts at finding a block of free ports before giving up.
const PORT_BLOCK_ATTEMPTS: usize = 500;
/// Attempts at starting a cluster when a node finds its port taken.
const START_ATTEMPTS: usize = 3;
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(20);
/// HTTP and peer ports of a node alone in its network namespace (nothing else binds there).
const NETNS_HTTP_PORT: u16 = 4000;
const NETNS_PEER_PORT: u16 = 4100;

/// Where a node runs when not on 127.0.0.1 of the test's own network namespace.
#[derive(Clone, Debug)]
pub struct NodeHost {
    /// Network namespace (`ip netns` name) the process runs in.
    pub netns: String,
    /// Address its HTTP port and its peer port listen on.
    pub ip: IpAddr,
    /// Address the other nodes dial to reach its peer port (a proxy in between), when it
    /// is not `ip:` its peer port.
    pub peer_dial: Option<SocketAddr>,
}

impl NodeHost {
    /// The peer address the node listens on.
    pub fn peer_listen(&self) -> SocketAddr {
        SocketAddr::new(self.ip, NETNS_PEER_PORT)
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub name: String,
    pub nodes: usize,
    /// Shards per node (one on the 2-core test machine: 3 nodes share it).
    pub shards: usize,
    /// `--segment-bytes` of every node (the single-node default when None).
    pub segment_bytes: Option<u64>,
    /// Extra `serve` flags of every node, e.g. `["--request-timeout", "1s"]`.
    pub args: Vec<String>,
    /// Environment of every node.
    pub env: Vec<(String, String)>,
    /// `per_node_env[i - 1]`: extra environment of node i (may be shorter than `nodes`).
    pub per_node_env: Vec<Vec<(String, String)>>,
    /// How long `start` waits for every node to be ready.
    pub ready_timeout: Duration,
    /// `hosts[i - 1]`: where node i runs; empty: every node on 127.0.0.1 here.
    pub hosts: Vec<NodeHost>,
}

impl ClusterOpts {
    pub fn new(name: &str) -> ClusterOpts {
        ClusterOpts {
            name: name.to_string(),
            nodes: 3,
            shards: 1,
            segment_bytes: None,
            args: Vec::new(),
            // Several nodes share the test machine's cores: no spinning before parking
            // (as scripts/cluster.sh).
            env: vec![("STARCITE_SPIN_BEFORE_PARK_US".into(), "0".into())],
            per_node_env: Vec::new(),
            ready_timeout: READY_TIMEOUT,
            hosts: Vec::new(),
        }
    }

    /// Runs node i in `hosts[i - 1]` (one entry per node).
    pub fn hosts(mut self, hosts: Vec<NodeHost>) -> ClusterOpts {
        assert_eq!(hosts.len(), self.nodes, "one host per node");
        self.hosts = hosts;
        self
    }

    pub fn arg(mut self, flag: &str, value: &str) -> ClusterOpts {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> ClusterOpts {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// An environment variable of node `node` only.
    pub fn node_env(mut self, node: usize, key: &str, value: &str) -> ClusterOpts {
        assert!((1..=self.nodes).contains(&node), "no node {node}");
        if self.per_node_env.len() < node {
            self.per_node_env.resize(node, Vec::new());
        }
        self.per_node_env[node - 1].push((key.to_string(), value.to_string()));
        self
    }
}

/// The ports of one cluster: HTTP port of each node and the first peer port of each
/// node (shard s of node i listens on `peer[i] + s`).
#[derive(Clone, Debug)]
struct Ports {
    http: Vec<u16>,
    peer: Vec<u16>,
}

impl Ports {
    /// The fixed ports of nodes that each have a network namespace of their own.
    fn in_own_netns(nodes: usize, shards: usize) -> Ports {
        assert!(shards <= usize::from(NETNS_PEER_PORT - NETNS_HTTP_PORT));
        Ports {
            http: vec![NETNS_HTTP_PORT; nodes],
            peer: vec![NETNS_PEER_PORT; nodes],
        }
    }

    /// One block of `nodes * (1 + shards)` consecutive ports that were all free a moment
    /// ago, starting at an offset that differs between processes and between calls.
    fn reserve(nodes: usize, shards: usize) -> Ports {
        let len = nodes * (1 + shards);
        let high = ephemeral_port_low().max(PORT_RANGE_LOW + 2_000);
        let span = usize::from(high - PORT_RANGE_LOW) - len;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as usize;
        let seed = std::process::id() as usize * 7_919 + nanos;
        for attempt in 0..PORT_BLOCK_ATTEMPTS {
            let block = PORT_BLOCKS.fetch_add(1, Ordering::SeqCst);
            let offset = (seed + (block + attempt) * len * 7) % span;
            let base = PORT_RANGE_LOW + offset as u16;
            let ports: Vec<u16> = (base..base + len as u16).collect();
            if ports.iter().all(|&p| port_is_free(p)) {
                let http = ports[..nodes].to_vec();
                let peer = (0..nodes).map(|i| ports[nodes + i * shards]).collect();
                return Ports { http, peer };
            }
        }
        panic!("no block of {len} free ports below {high}");
    }
}

/// Lowest port of the kernel's ephemeral range (32768 when unknown).
fn ephemeral_port_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// N `starcite serve` processes replicating to each other.
pub struct Cluster {
    pub opts: ClusterOpts,
    /// Folder of the data dirs and logs of every node.
    pub dir: PathBuf,
    /// `--peers` value shared by every node.
    pub peers: String,
    nodes: Vec<Server>,
}

impl Cluster {
    /// Starts every node and waits until each answers 200 on `/health/ready` (every group
    /// has a leader). Retries on other ports when a node finds its port taken.
    pub fn start(opts: ClusterOpts) -> Cluster {
        Cluster::start_without(opts, &[])
    }

    /// Like [`Cluster::start`], but nodes `absent` are not started (start them later
    /// with [`Cluster::spawn_again`]); the others must become ready without them.
    pub fn start_without(opts: ClusterOpts, absent: &[usize]) -> Cluster {
        assert!(opts.nodes >= 1 && opts.shards >= 1);
        let dir = unique_path(&opts.name);
        let mut last_err = String::new();
        for _ in 0..START_ATTEMPTS {
            fs::create_dir_all(&dir).expect("create cluster dir");
            let ports = if opts.hosts.is_empty() {
                Ports::reserve(opts.nodes, opts.shards)
            } else {
                Ports::in_own_netns(opts.nodes, opts.shards)
            };
            let mut cluster = Cluster::build(&opts, &dir, &ports);
            for (i, node) in cluster.nodes.iter_mut().enumerate() {
                if !absent.contains(&(i + 1)) {
                    node.spawn();
                }
            }
            match cluster.try_wait_all_ready(opts.ready_timeout, absent) {
                Ok(()) => return cluster,
                Err(e) => last_err = e,
            }
            let port_taken = cluster
                .nodes
                .iter()
                .any(|n| n.stderr().to_lowercase().contains("in use"));
            if !port_taken {
                // Dropped while panicking: every node's stderr tail is printed.
                panic!("cluster {} did not become ready: {last_err}", opts.name);
            }
            // Dropped here: processes killed, folder removed; try other ports.
        }
        panic!(
            "cluster {} did not start after {START_ATTEMPTS} attempts: {last_err}",
            opts.name
        );
    }

    fn build(opts: &ClusterOpts, dir: &std::path::Path, ports: &Ports) -> Cluster {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let ip = |i: usize| opts.hosts.get(i).map_or(loopback, |h| h.ip);
        let peer_listen = |i: usize| SocketAddr::new(ip(i), ports.peer[i]);
        let peer_dial = |i: usize| {
            let dial = opts.hosts.get(i).and_then(|h| h.peer_dial);
            dial.unwrap_or_else(|| peer_listen(i))
        };
        let peers = (0..opts.nodes)
            .map(|i| format!("{}={}", i + 1, peer_dial(i)))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = dir
            .file_name()
            .expect("cluster dir name")
            .to_string_lossy()
            .into_owned();
        let nodes = (0..opts.nodes)
            .map(|i| {
                let mut node_opts = Opts::new(&format!("{}-node{}", opts.name, i + 1))
                    .shards(opts.shards)
                    .arg("--node-id", &(i + 1).to_string())
                    .arg("--cluster-id", &cluster_id)
                    .arg("--peer-addr", &peer_listen(i).to_string())
                    .arg("--peers", &peers);
                node_opts.ip = ip(i);
                node_opts.netns = opts.hosts.get(i).map(|h| h.netns.clone());
                if let Some(bytes) = opts.segment_bytes {
                    node_opts.segment_bytes = bytes;
                }
                node_opts.args.extend(opts.args.iter().cloned());
                node_opts.env.extend(opts.env.iter().cloned());
                if let Some(env) = opts.per_node_env.get(i) {
                    node_opts.env.extend(env.iter().cloned());
                }
                let data_dir = dir.join(format!("node{}", i + 1));
                Server {
                    opts: node_opts,
                    port: ports.http[i],
                    log_path: data_dir.with_extension("stderr.log"),
                    data_dir,
                    child: None,
                    cleanup: Vec::new(),
                }
            })
            .collect();
        Cluster {
            opts: opts.clone(),
            dir: dir.to_path_buf(),
            peers,
            nodes,
        }
    }

    /// Waits until every node but `absent` is ready; fails as soon as one exits.
    fn try_wait_all_ready(&mut self, timeout: Duration, absent: &[usize]) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut ready: Vec<bool> = (1..=self.nodes.len())
            .map(|i| absent.contains(&i))
            .collect();
        loop {
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if absent.contains(&(i + 1)) {
                    continue;
                }
                if !node.is_running() {
                    return Err(format!("node {} exited during start", i + 1));
                }
                if !ready[i] {
                    let probe = try_request(node.addr(), "GET", "/health/ready", &[], b"");
                    ready[i] = probe.is_ok_and(|r| r.status == 200);
                }
            }
            if ready.iter().all(|&r| r) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let waiting: Vec<usize> = (1..=ready.len()).filter(|&i| !ready[i - 1]).collect();
                return Err(format!("nodes {waiting:?} not ready after {timeout:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Node ids, `1..=nodes`.
    pub fn ids(&self) -> Vec<usize> {
        (1..=self.nodes.len()).collect()
    }

    pub fn node(&self, i: usize) -> &Server {
        assert!((1..=self.nodes.len()).contains(&i), "no node {i}");
        &self.nodes[i - 1]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Server {
        assert!((1..=self.nodes.len()).contains(&i), "no node {i}");
        &mut self.nodes[i - 1]
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.node(i).addr()
    }

    /// Every node's HTTP address, in node order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(Server::addr).collect()
    }

    /// `http://<ip>:<port>` of node i.
    pub fn node_url(&self, i: usize) -> String {
        format!("http://{}", self.addr(i))
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.node_mut(i).is_running()
    }

    /// Ids of the nodes whose process runs.
    pub fn live(&mut self) -> Vec<usize> {
        self.ids()
            .into_iter()
            .filter(|&i| self.is_running(i))
            .collect()
    }

    /// kill -9 node i and reap it.
    pub fn kill9(&mut self, i: usize) {
        self.node_mut(i).kill9();
    }

    /// SIGTERM node i and wait for its exit (panics after 30 s).
    pub fn terminate(&mut self, i: usize) -> ExitStatus {
        self.node_mut(i).terminate()
    }

    /// Starts node i again on the same data dir and ports (stopping it gracefully first if
    /// it still runs) and waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        self.node_mut(i).restart();
    }

    /// Starts a killed node i again without waiting for it (a node alone is not ready
    /// until a quorum of its groups' replicas is back).
    pub fn spawn_again(&mut self, i: usize) {
        self.node_mut(i).spawn();
    }

    /// Starts a stopped node i again with `extra` flags appended to its arguments from
    /// now on, and waits until it is ready.
    pub fn restart_with_args(&mut self, i: usize, extra: &[&str]) {
        let node = self.node_mut(i);
        node.opts.args.extend(extra.iter().map(|a| a.to_string()));
        node.restart();
    }

    /// Waits until node i answers 200 on `/health/ready`; panics with its stderr when not.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) {
        let node = self.node_mut(i);
        if let Err(e) = node.try_wait_ready(timeout) {
            panic!("node {i} not ready: {e}\n{}", node.stderr_tail(6000));
        }
    }

    // ---- HTTP ----

    /// One request to node i on a fresh connection; I/O errors are returned.
    pub fn try_request(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<Resp> {
        let headers: &[(&str, &str)] = if body.is_empty() {
            &[]
        } else {
            &[("Content-Type", "application/json")]
        };
        try_request(self.addr(i), method, path, headers, body)
    }

    /// Creates session `id` through node i (asserting 201).
    pub fn create_session(&self, i: usize, id: &str) -> Value {
        self.node(i).create_session(id)
    }

    /// POSTs `body` to `/v1/sessions/{session}/append` on node i. Returns the status and
    /// the JSON reply (`Value::Null` when the body is not JSON), or status 0 and the
    /// error text when the connection failed.
    pub fn append(&self, i: usize, session: &str, body: &Value) -> (u16, Value) {
        let path = format!("/v1/sessions/{session}/append");
        match self.try_request(i, "POST", &path, body.to_string().as_bytes()) {
            Ok(resp) => (
                resp.status,
                serde_json::from_slice(&resp.body).unwrap_or(Value::Null),
            ),
            Err(e) => (0, json!({ "io_error": e.to_string() })),
        }
    }

    /// Every event of `session` read from node i.
    pub fn events(&self, i: usize, session: &str) -> Vec<Value> {
        self.node(i).all_events(session)
    }

    /// `PUT /debug/faults {"isolate": on}` on node i (needs `STARCITE_TEST_FAULTS=1`).
    pub fn isolate(&self, i: usize, on: bool) {
        let body = json!({ "isolate": on }).to_string();
        let resp = self
            .try_request(i, "PUT", "/debug/faults", body.as_bytes())
            .unwrap_or_else(|e| panic!("PUT /debug/faults on node {i}: {e}"));
        assert_eq!(resp.status, 204, "isolate node {i}: {}", resp.text());
    }

    // ---- /debug/groups ----

    /// Node i's own view of group g (`GET /debug/groups/g`, never forwarded).
    pub fn debug_group(&self, i: usize, g: u16) -> Value {
        self.try_debug_group(i, g)
            .unwrap_or_else(|| panic!("GET /debug/groups/{g} on node {i} failed"))
    }

    /// Like [`Cluster::debug_group`], `None` when the node does not answer 200.
    pub fn try_debug_group(&self, i: usize, g: u16) -> Option<Value> {
        let resp = self
            .try_request(i, "GET", &format!("/debug/groups/{g}"), b"")
            .ok()?;
        (resp.status == 200).then(|| resp.json())
    }

    /// The leader of group g as the live nodes see it: the node that reports itself
    /// leader in the highest term, else a leader id every answering node agrees on.
    pub fn leader_of(&mut self, g: u16) -> Option<usize> {
        let views: Vec<(usize, Value)> = self
            .live()
            .into_iter()
            .filter_map(|i| Some((i, self.try_debug_group(i, g)?)))
            .collect();
        let self_leader = views
            .iter()
            .filter(|(_, v)| v["role"] == "leader")
            .max_by_key(|(_, v)| v["term"].as_u64().unwrap_or(0))
            .map(|(i, _)| *i);
        if self_leader.is_some() {
            return self_leader;
        }
        let first = views.first()?.1["leader"].as_u64()?;
        let agreed = views
            .iter()
            .all(|(_, v)| v["leader"].as_u64() == Some(first));
        agreed.then_some(first as usize)
    }

    /// Waits until group g has a leader among the running nodes and returns it.
    pub fn wait_leader(&mut self, g: u16, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader_of(g) {
                if self.is_running(leader) {
                    return leader;
                }
            }
            if Instant::now() > deadline {
                panic!("group {g} has no leader after {timeout:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Panics when a node logged one of the errors that mean its replica is damaged
    /// (they are logged instead of crashing the node).
    pub fn assert_no_integrity_errors(&self) {
        const DAMAGE: [&str; 3] = [
            "event index has a gap",
            "committed entry has no log location",
            "snapshot refused",
        ];
        for i in self.ids() {
            let log = self.node(i).stderr();
            for needle in DAMAGE {
                assert!(!log.contains(needle), "node {i} logged {needle:?}:\n{log}");
            }
        }
    }

    /// Waits until every running node reports, for each group of `groups`, the same
    /// commit_index, applied_index (equal to commit_index), checksum and sessions.
    /// Returns one converged view per group; panics with every view on timeout.
    pub fn wait_converged(&mut self, groups: &[u16], timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let live = self.live();
            let views: Vec<Vec<Option<Value>>> = groups
                .iter()
                .map(|&g| live.iter().map(|&i| self.try_debug_group(i, g)).collect())
                .collect();
            if views.iter().all(|per_node| converged(per_node)) {
                self.assert_no_integrity_errors();
                return views
                    .into_iter()
                    .map(|per_node| {
                        per_node
                            .into_iter()
                            .flatten()
                            .find(|v| v["role"] != "none")
                            .expect("a replica's view")
                    })
                    .collect();
            }
            if Instant::now() > deadline {
                let mut report = String::new();
                for (g, per_node) in groups.iter().zip(&views) {
                    for (i, view) in live.iter().zip(per_node) {
                        report.push_str(&format!("group {g} node {i}: {view:?}\n"));
                    }
                }
                panic!(
                    "replicas did not converge within {timeout:?} (live nodes {live:?}):\n{report}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node i has applied everything the leader of group g had committed
    /// when the call began (a restarted node caught up, while appends may go on).
    pub fn wait_caught_up(&mut self, i: usize, g: u16, timeout: Duration) {
        let leader = self.wait_leader(g, timeout);
        let target = self.debug_group(leader, g)["commit_index"]
            .as_u64()
            .expect("commit_index");
        let deadline = Instant::now() + timeout;
        loop {
            let applied = self
                .try_debug_group(i, g)
                .and_then(|v| v["applied_index"].as_u64())
                .unwrap_or(0);
            if applied >= target {
                return;
            }
            if Instant::now() > deadline {
                panic!("node {i} applied {applied} of group {g} after {timeout:?}, leader {leader} had committed {target}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of every node's stderr, for failure messages.
    pub fn stderr_tails(&self, bytes: usize) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {} stderr ---\n{}\n", i + 1, n.stderr_tail(bytes)))
            .collect()
    }
}

/// True when every node answered and the views agree on what replicas must agree on.
fn converged(views: &[Option<Value>]) -> bool {
    // Nodes that hold no replica of the group (5+ node clusters) report role "none".
    let views: Vec<&Option<Value>> = views
        .iter()
        .filter(|v| v.as_ref().is_none_or(|v| v["role"] != "none"))
        .collect();
    let Some(Some(first)) = views.first() else {
        return false;
    };
    let same = |v: &Value| {
        ["commit_index", "applied_index", "checksum", "sessions"]
            .iter()
            .all(|k| v[k] == first[k])
    };
    first["applied_index"] == first["commit_index"]
        && views.iter().all(|v| v.as_ref().is_some_and(same))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill all before any node's own drop, so none outlives the others for long.
        for node in &mut self.nodes {
            node.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- cluster {} kept in {}",
                self.opts.name,
                self.dir.display()
            );
        }
        // Each node's drop then removes its data dir and log (or prints its stderr tail);
        // the empty cluster folder goes after them.
        let nodes = std::mem::take(&mut self.nodes);
        drop(nodes);
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The value at quantile `q` (0.0–1.0) of sorted `values` (nearest rank).
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    assert!(!sorted.is_empty(), "quantile of nothing");
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The groups of these sessions, sorted, once each.
pub fn groups_of(sessions: &[String]) -> Vec<u16> {
    let mut groups: Vec<u16> = sessions.iter().map(|s| shards::group_of(s)).collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// `POST /v1/sessions/:session/append` with a JSON body, on a fresh connection.
pub fn post_append(addr: SocketAddr, session: &str, body: &str) -> std::io::Result<Resp> {
    try_request(
        addr,
        "POST",
        &format!("/v1/sessions/{session}/append"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// True for the replies a client answers by retrying the same request: a 503 of the kinds
/// API.md names, or a connection that failed (node down, killed mid-request).
pub fn is_retryable(resp: &std::io::Result<Resp>) -> bool {
    match resp {
        Err(_) => true,
        Ok(r) if r.status == 503 => {
            let code = serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null);
            matches!(
                code["error"].as_str(),
                Some("unavailable" | "commit_unknown" | "overloaded")
            )
        }
        Ok(_) => false,
    }
}

/// One acknowledged append, as a load-generating test client saw it.
#[derive(Clone, Debug)]
pub struct Ack {
    pub session: String,
    pub key: String,
    pub seq: u64,
    /// When the request that got the 201 was sent (retries of the same key included).
    pub sent_at: Instant,
    pub acked_at: Instant,
}

/// Time from `since` to the first acknowledgement of an append to `session` sent after
/// it (`acks` gives the acknowledgements so far), or None after `timeout`.
pub fn wait_first_ack_after(
    acks: impl Fn(&mut dyn FnMut(&Ack)),
    session: &str,
    since: Instant,
    timeout: Duration,
) -> Option<Duration> {
    while since.elapsed() < timeout {
        let mut first: Option<Instant> = None;
        acks(&mut |a: &Ack| {
            if a.session == session && a.sent_at >= since {
                first = Some(first.map_or(a.acked_at, |f| f.min(a.acked_at)));
            }
        });
        if let Some(at) = first {
            return Some(at - since);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
