//! Deterministic cluster simulation (issue 3, "Deterministic simulation"): N nodes × C
//! shards × a few Raft groups in one thread, from one seed, driving the production
//! `shards::replica::Replica` (Raft and the session state machine), `shards::replay`,
//! and the forward codec and request identity (`shards::forward`,
//! `shards::forwarding`).
//!
//! - `cluster.rs`: the nodes, their shell (what `src/` does with a `Ready`), the simulated
//!   network (Raft messages, and peer frames on connections that break and are
//!   replaced) and disk, the clients, forwarding.
//! - `check.rs`: the checker (Raft safety after every step, history at the end).
//! - `schedule.rs`: the random fault schedule, including Figure-8 style patterns.
//!
//! Entry point: [`run_seed`].

#![allow(dead_code)]

mod check;
mod cluster;
mod schedule;

pub use cluster::{Bugs, Coverage, Options, Report};

/// Runs one seed; `Err` carries the checker's (or a production assertion's) complaint.
pub fn run_seed(seed: u64, options: &Options) -> Result<Report, String> {
    run_with(seed, options, |c| c.run())
}

/// Runs the wipe scenario (`Cluster::run_wipe_scenario`) of one seed.
pub fn run_wipe_seed(
    seed: u64,
    options: &Options,
    lose_hard_state: bool,
) -> Result<Report, String> {
    run_with(seed, options, |c| c.run_wipe_scenario(lose_hard_state))
}

fn run_with(
    seed: u64,
    options: &Options,
    run: impl FnOnce(cluster::Cluster) -> Result<Report, String>,
) -> Result<Report, String> {
    let options = options.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        run(cluster::Cluster::new(seed, &options))
    }));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".to_string());
            Err(format!("panic in production code or simulator: {text}"))
        }
    }
}

/// Small deterministic generator (SplitMix64, as in `shards::raft`).
#[derive(Debug, Clone)]
pub struct Rng(shards::raft::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(shards::raft::SplitMix64::new(seed))
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n.max(1))
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.0.chance(percent)
    }
    /// True with probability `per_mille` / 1000.
    pub fn chance_mille(&mut self, per_mille: u64) -> bool {
        self.0.below(1000) < per_mille
    }
    pub fn range(&mut self, low: u64, high_inclusive: u64) -> u64 {
        low + self.below(high_inclusive - low + 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
}

/// Running hash of the trace (FNV-1a over u64 words).
#[derive(Debug, Clone, Copy)]
pub struct TraceHash(pub u64);

impl Default for TraceHash {
    fn default() -> Self {
        TraceHash(0xcbf2_9ce4_8422_2325)
    }
}

impl TraceHash {
    pub fn add(&mut self, word: u64) {
        for b in word.to_le_bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn add_str(&mut self, s: &str) {
        for b in s.bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self.add(s.len() as u64);
    }
}
