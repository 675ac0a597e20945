use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use starcite_bench::config::{
    describe_targets, parse_duration, random_prefix, validate_prefix, LoadConfig, Target,
};
use starcite_bench::runner::{find_max, run_load, setup_sessions};
use starcite_bench::selftest;

/// Open-loop latency benchmark for Starcite appends (corrects coordinated omission).
#[derive(Parser, Debug)]
#[command(name = "starcite-bench", version)]
struct Cli {
    /// Server address: http://host:port (plain http only), or a comma-separated list of
    /// them (e.g. the nodes of a cluster); connection i uses target i % n.
    #[arg(long, default_value = "http://127.0.0.1:4000")]
    url: String,
    /// Target appends per second (constant arrival rate); the start rate for --find-max.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured duration (e.g. 60s, 60, 2m); per step with --find-max.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before measuring (not recorded).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// Number of sessions; append i goes to session i % sessions.
    #[arg(long, default_value_t = 1024)]
    sessions: u64,
    /// Keep-alive HTTP/1.1 connections (each carries one request at a time).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Approximate serialized size of each append's `payload` object.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Session id prefix (ids are <prefix>-<n>); random by default.
    #[arg(long)]
    session_prefix: Option<String>,
    /// Also print the summary as one JSON line.
    #[arg(long)]
    json: bool,
    /// Send a unique idempotency_key with every append.
    #[arg(long)]
    idempotency: bool,
    /// Per-request timeout (connect + send + response).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Step the rate up from --rate and report the highest sustainable one.
    #[arg(long)]
    find_max: bool,
    /// find-max: rate multiplier per step.
    #[arg(long, default_value_t = 1.25)]
    step_factor: f64,
    /// find-max: a step passes only if the corrected p99 is below this.
    #[arg(long, default_value_t = 20.0)]
    p99_max_ms: f64,
    /// find-max: at most this many steps.
    #[arg(long, default_value_t = 40)]
    max_steps: u32,
    /// Run the coordinated-omission self test against an in-process stub server.
    #[arg(long)]
    self_test: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.self_test {
        return self_test(cli.json);
    }
    match bench(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starcite-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn self_test(json: bool) -> ExitCode {
    println!(
        "self test: stub server, {} appends/s for {:?} (+{:?} warm-up), {} connections, one {:?} stall of all responses mid-run",
        selftest::RATE,
        selftest::DURATION,
        selftest::WARMUP,
        selftest::CONNECTIONS,
        selftest::STALL
    );
    let outcome = match selftest::run() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("self test could not run: {e}");
            return ExitCode::from(2);
        }
    };
    outcome.summary.print_human();
    if json {
        println!("{}", outcome.summary.to_json());
    }
    if outcome.failures.is_empty() {
        println!(
            "self test PASSED: corrected p99.9 {:.1} ms >= {} ms, service p50 {:.3} ms <= {} ms",
            outcome.summary.latency.p999,
            selftest::MIN_CORRECTED_P999_MS,
            outcome.summary.service.p50,
            selftest::MAX_SERVICE_P50_MS
        );
        ExitCode::SUCCESS
    } else {
        for f in &outcome.failures {
            println!("self test FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}

fn bench(cli: &Cli) -> Result<(), String> {
    if !(cli.rate > 0.0 && cli.rate.is_finite()) {
        return Err("--rate must be > 0".into());
    }
    if cli.duration.is_zero() {
        return Err("--duration must be > 0".into());
    }
    if cli.sessions == 0 || cli.connections == 0 {
        return Err("--sessions and --connections must be > 0".into());
    }
    if cli.find_max && !(cli.step_factor > 1.0 && cli.step_factor.is_finite()) {
        return Err("--step-factor must be > 1".into());
    }
    let prefix = cli.session_prefix.clone().unwrap_or_else(random_prefix);
    validate_prefix(&prefix)?;
    let targets = Target::parse_list(&cli.url)?;
    if cli.connections < targets.len() {
        return Err(format!(
            "--connections ({}) must be at least the number of --url targets ({}) so that \
             every target gets a connection",
            cli.connections,
            targets.len()
        ));
    }
    let cfg = LoadConfig {
        targets,
        duration: cli.duration,
        warmup: cli.warmup,
        sessions: cli.sessions,
        connections: cli.connections,
        payload_bytes: cli.payload_bytes,
        session_prefix: prefix,
        idempotency: cli.idempotency,
        timeout: cli.timeout,
    };

    println!(
        "starcite-bench: {}, {} sessions '{}-N', {} connections, payload ~{} B{}",
        describe_targets(&cfg.targets),
        cfg.sessions,
        cfg.session_prefix,
        cfg.connections,
        cfg.payload_bytes,
        if cfg.idempotency {
            ", idempotency keys"
        } else {
            ""
        }
    );
    let setup = setup_sessions(&cfg).map_err(|e| format!("setup failed: {e}"))?;
    println!(
        "setup: {} sessions created, {} already existed",
        setup.created, setup.existing
    );

    if cli.find_max {
        return run_find_max(cli, &cfg);
    }
    println!(
        "running {:.1}/s for {:?} after {:?} warm-up",
        cli.rate, cfg.duration, cfg.warmup
    );
    let summary = run_load(&cfg, cli.rate);
    summary.print_human();
    if cli.json {
        println!("{}", summary.to_json());
    }
    Ok(())
}

fn run_find_max(cli: &Cli, cfg: &LoadConfig) -> Result<(), String> {
    println!(
        "find-max: from {:.1}/s, x{} per step, {:?} each (+{:?} warm-up); pass = achieved >= 99%, 0 errors, p99 < {} ms",
        cli.rate, cli.step_factor, cfg.duration, cfg.warmup, cli.p99_max_ms
    );
    let steps = find_max(
        cfg,
        cli.rate,
        cli.step_factor,
        cli.p99_max_ms,
        cli.max_steps,
        |step, s, pass| {
            println!(
                "step {step:>2}: target {:>10.1}/s  achieved {:>10.1}/s  errors {:>6}  unsent {:>7}  p50 {:>8.3} ms  p99 {:>8.3} ms  p99.9 {:>8.3} ms  {}",
                s.rate_target,
                s.achieved_rate(),
                s.errors,
                s.unsent,
                s.latency.p50,
                s.latency.p99,
                s.latency.p999,
                if pass { "PASS" } else { "FAIL" }
            );
            if !s.errors_by_kind.is_empty() {
                println!("         errors by kind: {:?}", s.errors_by_kind);
            }
        },
    );
    let best = steps.iter().rfind(|(_, pass)| *pass).map(|(s, _)| s);
    match best {
        Some(s) => println!(
            "max sustainable rate: {:.1}/s (achieved {:.1}/s, p99 {:.3} ms)",
            s.rate_target,
            s.achieved_rate(),
            s.latency.p99
        ),
        None => println!(
            "max sustainable rate: none (the start rate {:.1}/s already failed)",
            cli.rate
        ),
    }
    if cli.json {
        let line = json!({
            "mode": "find_max",
            "max_rate": best.map(|s| s.rate_target),
            "p99_max_ms": cli.p99_max_ms,
            "steps": steps.iter().map(|(s, pass)| {
                let mut v = s.to_json();
                v["pass"] = json!(pass);
                v
            }).collect::<Vec<_>>(),
        });
        println!("{line}");
    }
    Ok(())
}
