//! A small network of Linux network namespaces for fault tests: one namespace per node,
//! each joined by a veth pair to a bridge in the test's own namespace, with the kernel's
//! tools (`ip`, `tc`) cutting and damaging the links.
//!
//! ```text
//!   test process (10.77.S.254 on bridge scb<pid>x<t>)
//!        |-- veth scv<pid>x<t>n1 <-> eth0 of netns scn-<pid>-<t>-1 (10.77.S.1)
//!        |-- veth scv<pid>x<t>n2 <-> eth0 of netns scn-<pid>-<t>-2 (10.77.S.2)
//!        `-- veth scv<pid>x<t>n3 <-> eth0 of netns scn-<pid>-<t>-3 (10.77.S.3)
//! ```
//!
//! Faults:
//! - [`NetLab::cut`]: a blackhole route in one node's namespace, so it cannot send to
//!   another node (one direction only); [`NetLab::isolate`] cuts both ways to every other
//!   node. The test process still reaches every node (its address is not blackholed).
//! - [`NetLab::set_loss`]: every packet leaving either end of every veth is dropped with
//!   the given probability. This kernel has no `netem`, so an `htb` qdisc sends packets
//!   that a classic-BPF filter picks at random (`ld rand`) to a class whose `pfifo` holds
//!   0 packets, which drops them. The qdisc sees packets before segmentation offload, so
//!   one dropped packet may be several TCP segments of a bulk transfer.
//! - Delay is not done by the kernel here (no `netem`): see `common::delay_proxy`.
//!
//! Names carry the test process's pid and a counter, so parallel tests and parallel test
//! processes do not collide; [`NetLab::create`] first removes what crashed earlier runs
//! left (names with this prefix whose pid is no longer alive). Dropping the lab deletes
//! its namespaces, veths and bridge.
//!
//! Needs root and iproute2. [`unavailable`] says why a machine cannot run these tests.

use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::cluster::NodeHost;

/// Prefix of every namespace name; interfaces use `scb` (bridge) and `scv` (veth).
const NETNS_PREFIX: &str = "scn-";
const BRIDGE_PREFIX: &str = "scb";
const VETH_PREFIX: &str = "scv";
/// Addresses are 10.77.S.x/24, one subnet S per lab.
const SUBNET_PREFIX: [u8; 2] = [10, 77];
/// The test process's own address on every lab's bridge.
const HOST_OCTET: u8 = 254;
/// Most nodes in one lab (addresses .1 to .N).
const NODES_MAX: usize = 16;
/// Subnets 10.77.1.0/24 to 10.77.250.0/24 are handed out.
const SUBNETS: usize = 250;

/// Labs created by this process (part of every name).
static LABS: AtomicUsize = AtomicUsize::new(0);
/// Namespaces made by [`unavailable`] to see whether it can make one.
static PROBES: AtomicUsize = AtomicUsize::new(0);
/// Serialises choosing a subnet and creating the bridge between the tests of one process.
static CREATE: Mutex<()> = Mutex::new(());

/// Why network-namespace tests cannot run here, or None when they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    for tool in ["ip", "tc"] {
        match Command::new(tool).arg("-V").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Some(format!("`{tool} -V` failed: {}", out.status)),
            Err(e) => return Some(format!("`{tool}` (iproute2) missing: {e}")),
        }
    }
    // Root in a container may still lack CAP_SYS_ADMIN: try one.
    let n = PROBES.fetch_add(1, Ordering::SeqCst);
    let probe = format!("{NETNS_PREFIX}{}-probe{n}", std::process::id());
    if let Err(e) = try_run("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e}"));
    }
    let _ = try_run("ip", &["netns", "delete", &probe]);
    None
}

/// Opens `/run/netns/<name>` (for setns(2)).
pub fn open(name: &str) -> fs::File {
    let path = format!("/run/netns/{name}");
    fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"))
}

/// Runs a command, panicking with its stderr when it fails.
fn run(program: &str, args: &[&str]) {
    if let Err(e) = try_run(program, args) {
        panic!("{e}");
    }
}

/// Runs a command; the error names it and carries its stderr.
fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program [-n netns] -batch -` with `commands` on its stdin, one a line: several
/// changes of one namespace in one process, so that they apply within a millisecond or
/// so of each other rather than one fork and exec apart.
fn run_batch(program: &str, netns: Option<&str>, commands: &[String]) {
    use std::io::Write;
    use std::process::Stdio;
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", args.join(" ")));
    let script = commands.join("\n") + "\n";
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(script.as_bytes()).expect("write batch");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for batch");
    assert!(
        out.status.success(),
        "{program} {} failed ({}) on:\n{script}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// True when process `pid` is alive.
fn pid_alive(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// The pid in a name `<prefix><pid><non-digit>...`.
fn pid_in(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Deletes the namespaces, bridges and veths that runs no longer alive left behind.
fn remove_stale() {
    let own = std::process::id();
    let stale = |pid: Option<u32>| pid.is_some_and(|p| p != own && !pid_alive(p));
    let netns = try_run("ip", &["netns", "list"]).unwrap_or_default();
    for name in netns.lines().filter_map(|l| l.split_whitespace().next()) {
        if stale(pid_in(name, NETNS_PREFIX)) {
            eprintln!("removing network namespace {name} left by an earlier run");
            let _ = try_run("ip", &["netns", "delete", name]);
        }
    }
    let links = try_run("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "12: scb123x0: <...>" or "13: scv123x0n1@if2: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let pid = pid_in(name, BRIDGE_PREFIX).or_else(|| pid_in(name, VETH_PREFIX));
        if stale(pid) {
            eprintln!("removing interface {name} left by an earlier run");
            let _ = try_run("ip", &["link", "delete", name]);
        }
    }
}

/// Subnets (third octet of 10.77.S.0/24) some interface here already has an address in.
fn subnets_in_use() -> BTreeSet<u8> {
    let addrs = try_run("ip", &["-o", "-4", "addr", "show"]).unwrap_or_default();
    let prefix = format!("{}.{}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1]);
    addrs
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(&prefix)?.split('.').next()?.parse().ok())
        .collect()
}

/// One node's end of the lab.
struct LabNode {
    netns: String,
    /// The veth end on the bridge, in the test's namespace.
    host_veth: String,
    ip: Ipv4Addr,
}

/// Namespaces, veths and a bridge; removed on drop.
pub struct NetLab {
    subnet: u8,
    bridge: String,
    nodes: Vec<LabNode>,
    /// Cuts in place, as (from node, to node).
    cuts: Mutex<BTreeSet<(usize, usize)>>,
    /// Whether the loss filters are installed.
    lossy: Mutex<bool>,
}

impl NetLab {
    /// Creates one namespace per node, each with its veth on a new bridge, all up.
    pub fn create(nodes: usize) -> NetLab {
        assert!((1..=NODES_MAX).contains(&nodes), "{nodes} nodes");
        let _guard = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        remove_stale();
        let (pid, n) = (std::process::id(), LABS.fetch_add(1, Ordering::SeqCst));
        let used = subnets_in_use();
        let subnet = (0..SUBNETS)
            .map(|k| 1 + ((pid as usize + n * 37 + k) % SUBNETS) as u8)
            .find(|s| !used.contains(s))
            .expect("a free subnet under 10.77.0.0/16");
        let bridge = format!("{BRIDGE_PREFIX}{pid}x{n}");
        let mut lab = NetLab {
            subnet,
            bridge: bridge.clone(),
            nodes: Vec::new(),
            cuts: Mutex::new(BTreeSet::new()),
            lossy: Mutex::new(false),
        };
        // From here on, a failure drops `lab`, which removes what was made so far.
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        let host_cidr = format!("{}/24", lab.host_ip());
        run("ip", &["addr", "add", &host_cidr, "dev", &bridge]);
        run("ip", &["link", "set", &bridge, "up"]);
        for i in 1..=nodes {
            let node = LabNode {
                netns: format!("{NETNS_PREFIX}{pid}-{n}-{i}"),
                host_veth: format!("{VETH_PREFIX}{pid}x{n}n{i}"),
                ip: lab.ip_of(i as u8),
            };
            assert!(
                node.host_veth.len() <= 15,
                "interface name {}",
                node.host_veth
            );
            run("ip", &["netns", "add", &node.netns]);
            lab.nodes.push(node);
            lab.wire(i);
        }
        lab
    }

    /// The veth pair of node i: one end on the bridge, the other `eth0` in its namespace.
    fn wire(&self, i: usize) {
        let node = &self.nodes[i - 1];
        let (ns, veth) = (node.netns.as_str(), node.host_veth.as_str());
        run(
            "ip",
            &[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        run("ip", &["link", "set", veth, "master", &self.bridge]);
        run("ip", &["link", "set", veth, "up"]);
        let cidr = format!("{}/24", node.ip);
        run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
        run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }

    fn ip_of(&self, octet: u8) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.subnet, octet)
    }

    /// The test process's address on the bridge (proxies listen here).
    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(self.ip_of(HOST_OCTET))
    }

    /// Node i's address (its HTTP and peer ports listen on it).
    pub fn node_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.nodes[i - 1].ip)
    }

    pub fn netns(&self, i: usize) -> &str {
        &self.nodes[i - 1].netns
    }

    /// Where each node runs, for `ClusterOpts::hosts` (peers dial each other directly).
    pub fn hosts(&self) -> Vec<NodeHost> {
        (1..=self.nodes.len())
            .map(|i| NodeHost {
                netns: self.netns(i).to_string(),
                ip: self.node_ip(i),
                peer_dial: None,
            })
            .collect()
    }

    // ---- faults ----

    /// Node `from` can no longer send anything to node `to` (a blackhole route in
    /// `from`'s namespace; the kernel fails its sends to `to` at once).
    pub fn cut(&self, from: usize, to: usize) {
        self.cut_all(&[(from, to)]);
    }

    /// [`NetLab::cut`] for every (from, to) pair, with one batch of `ip` commands per
    /// namespace.
    pub fn cut_all(&self, pairs: &[(usize, usize)]) {
        let mut cuts = self.cuts.lock().unwrap();
        let new: Vec<(usize, usize)> = pairs
            .iter()
            .copied()
            .filter(|p| !cuts.contains(p))
            .collect();
        self.change_routes("add", &new);
        cuts.extend(new);
    }

    /// Undoes [`NetLab::cut`].
    pub fn mend(&self, from: usize, to: usize) {
        let mut cuts = self.cuts.lock().unwrap();
        if cuts.remove(&(from, to)) {
            self.change_routes("del", &[(from, to)]);
        }
    }

    /// `ip route add|del blackhole` for each (from, to): in `from`'s namespace, to `to`.
    fn change_routes(&self, verb: &str, pairs: &[(usize, usize)]) {
        for from in 1..=self.nodes.len() {
            let commands: Vec<String> = pairs
                .iter()
                .filter(|&&(f, to)| f == from && to != from)
                .map(|&(_, to)| format!("route {verb} blackhole {}/32", self.node_ip(to)))
                .collect();
            if !commands.is_empty() {
                run_batch("ip", Some(self.netns(from)), &commands);
            }
        }
    }

    /// Node k can neither send to nor receive from any other node.
    pub fn isolate(&self, k: usize) {
        let others = (1..=self.nodes.len()).filter(|&o| o != k);
        let pairs: Vec<(usize, usize)> = others.flat_map(|o| [(k, o), (o, k)]).collect();
        self.cut_all(&pairs);
    }

    /// Every packet leaving either end of every node's veth is dropped with probability
    /// `percent` / 100 (so a packet between two nodes crosses two lossy hops).
    pub fn set_loss(&self, percent: f64) {
        assert!((0.0..100.0).contains(&percent), "loss {percent}%");
        let mut lossy = self.lossy.lock().unwrap();
        assert!(!*lossy, "loss already set");
        // cls_bpf: `ld rand` loads a random u32; at or above the threshold the filter
        // matches (ret -1: the filter's class 1:20, whose pfifo of 0 packets drops it),
        // below it the packet goes unmatched to the default class 1:10.
        let threshold = ((1.0 - percent / 100.0) * 4_294_967_296.0) as u64;
        let threshold = threshold.min(u64::from(u32::MAX));
        let program = format!("4,32 0 0 4294963256,53 0 1 {threshold},6 0 0 4294967295,6 0 0 0");
        let mut host_side = Vec::new();
        for node in &self.nodes {
            host_side.extend(drop_filter(&node.host_veth, &program));
            run_batch("tc", Some(&node.netns), &drop_filter("eth0", &program));
        }
        run_batch("tc", None, &host_side);
        *lossy = true;
    }

    /// Removes the loss filters of [`NetLab::set_loss`].
    pub fn clear_loss(&self) {
        let mut lossy = self.lossy.lock().unwrap();
        if !*lossy {
            return;
        }
        let mut host_side = Vec::new();
        for node in &self.nodes {
            host_side.push(format!("qdisc del dev {} root", node.host_veth));
            run_batch(
                "tc",
                Some(&node.netns),
                &["qdisc del dev eth0 root".to_string()],
            );
        }
        run_batch("tc", None, &host_side);
        *lossy = false;
    }

    /// Removes every cut and the loss.
    pub fn heal(&self) {
        let mut cuts = self.cuts.lock().unwrap();
        let all: Vec<(usize, usize)> = cuts.iter().copied().collect();
        self.change_routes("del", &all);
        cuts.clear();
        drop(cuts);
        self.clear_loss();
    }
}

/// `tc` commands for `dev`: an `htb` root with a default class that passes and a class
/// that drops (a `pfifo` of 0 packets) what `program` (classic BPF) matches.
fn drop_filter(dev: &str, program: &str) -> Vec<String> {
    let class = |id: &str| {
        format!("class add dev {dev} parent 1: classid {id} htb rate 10gbit quantum 60000")
    };
    vec![
        format!("qdisc add dev {dev} root handle 1: htb default 10"),
        class("1:10"),
        class("1:20"),
        format!("qdisc add dev {dev} parent 1:20 handle 20: pfifo limit 0"),
        format!(
            "filter add dev {dev} parent 1: protocol all prio 1 bpf bytecode \"{program}\" classid 1:20"
        ),
    ]
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair; the host
        // end is deleted first anyway, in case a process still holds the namespace.
        for node in &self.nodes {
            let _ = try_run("ip", &["link", "delete", &node.host_veth]);
            let _ = try_run("ip", &["netns", "delete", &node.netns]);
        }
        let _ = try_run("ip", &["link", "delete", &self.bridge]);
    }
}
