//! `cargo xtask bench crash-latency`: how long after a SIGKILL the daemon knows, with the eBPF
//! probe and with the pidfd fallback (`probes.ebpf = false`), measured side by side in one run.
//!
//! The target is a `sleep` renamed through argv[0], so nothing else matches its selector. The
//! clock is `CLOCK_MONOTONIC` on both sides: taken here just before `kill(2)`, and by the daemon
//! when the event reaches it (`last_exit.observed_monotonic_ns`).

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result};
use clap::Subcommand;
use nix::sys::signal::Signal;
use selfheal_e2e::{monotonic_ns, Daemon, Proc};

#[derive(Subcommand)]
pub(crate) enum Bench {
    /// Kill → event latency of a target crash.
    CrashLatency {
        /// Kills per mode.
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// Per fault scenario: time to detect, to diagnose and to recover.
    Healing {
        /// Runs per scenario (the medians are printed).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Only the scenarios whose name contains this (`crash`, `hang`, `lock`, `idle`,
        /// `leak`, `learned`).
        #[arg(long)]
        only: Option<String>,
    },
    /// The host's CPU while the daemon watches an idle systemd unit and an idle container
    /// (the daemon's own, and what it makes the manager, the bus and the engine do).
    WatchCost {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// `target.poll_interval_ms` of the daemon.
        #[arg(long, default_value_t = 500)]
        poll_interval_ms: u64,
    },
    /// Many concurrent clients on the admin API's read endpoints: errors, latency and the
    /// daemon's memory over the run.
    Api {
        /// Seconds of load.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Concurrent clients (keep-alive connections).
        #[arg(long, default_value_t = 32)]
        clients: usize,
    },
    /// The target's latency under a fixed load without the daemon and with it in each
    /// configuration given, every condition once per round in a shuffled order; pooled p99
    /// ratios and medians of per-round ratios, with bootstrap intervals over the rounds, and
    /// each configuration against the first.
    FixedLoad {
        /// Seconds per run.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
        /// Keep-alive client connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Rounds (each runs every condition once).
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(2..=500))]
        rounds: u64,
        /// Requests per second over all connections (default: half the saturation rate
        /// read at the start).
        #[arg(long)]
        rate: Option<f64>,
        /// A daemon configuration: `[probes]` lines separated by `;`, e.g.
        /// `--with "payload_bytes = 256; shed_below_idle_percent = 100"` (repeatable; default:
        /// `payload_bytes = 0` and `payload_bytes = 256`; `payload_bytes` is 256 unless given),
        /// and `binary = PATH` to run another `selfheal` build (another commit's, compared in
        /// the same rounds).
        #[arg(long = "with", value_name = "KEY = VALUE; …")]
        with: Vec<String>,
    },
    /// What the daemon costs other processes and the target, side by side.
    Overhead {
        /// Seconds per load run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Keep-alive client connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Runs with the daemon per phase (as many without, alternated in blocks of four:
        /// without, with, with, without).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Instead of the comparison: the daemon's CPU per request with capture off and on
        /// under the same fixed load, and where it goes (`perf record` of the daemon, the
        /// hottest functions printed; `perf` must be installed).
        #[arg(long)]
        profile: bool,
        /// Where the daemon captures payloads (`probes.capture`): `cgroup` (the target's own
        /// cgroup2; the demo backend runs in one) or `syscalls` (every process's socket
        /// syscalls).
        #[arg(long, default_value = "cgroup", value_parser = ["cgroup", "syscalls"])]
        capture: String,
        /// `probes.payload_bytes` of the daemon (0: no payload capture, the daemon's baseline).
        #[arg(long, default_value_t = 256)]
        payload_bytes: u32,
        /// One more line of the daemon's `[probes]` table, e.g. `--set "decode_nice = 19"`
        /// or `--set "flush_interval_ms = 250"` (repeatable).
        #[arg(long = "set", value_name = "KEY = VALUE")]
        set: Vec<String>,
    },
}

pub(crate) fn run(bench: &Bench) -> Result<()> {
    match bench {
        Bench::CrashLatency { runs } => crash_latency(*runs),
        Bench::Healing { runs, only } => crate::healing::run(*runs, only.as_deref()),
        Bench::Api { seconds, clients } => crate::api_load::run(*seconds, *clients),
        Bench::WatchCost {
            seconds,
            poll_interval_ms,
        } => crate::watch_cost::run(*seconds, *poll_interval_ms),
        Bench::FixedLoad {
            seconds,
            connections,
            rounds,
            rate,
            with,
        } => crate::fixed_load::run(*seconds, *connections, *rounds as usize, *rate, with),
        Bench::Overhead {
            seconds,
            connections,
            rounds,
            profile,
            capture,
            payload_bytes,
            set,
        } => {
            let probes = crate::overhead::Probes {
                capture: capture.clone(),
                payload_bytes: *payload_bytes,
                set: set.clone(),
            };
            if *profile {
                crate::overhead::profile(*seconds, *connections, &probes)
            } else {
                crate::overhead::run(*seconds, *connections, *rounds as usize, &probes)
            }
        }
    }
}

struct Stats {
    p50: f64,
    p95: f64,
    max: f64,
    mean: f64,
}

fn stats(mut values: Vec<f64>) -> Stats {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Stats {
        p50: at(0.5),
        p95: at(0.95),
        max: *values.last().unwrap_or(&0.0),
        mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
    }
}

/// Kills `runs` targets under one daemon; the kill → event latencies in ms, and the kernel →
/// daemon part of each where the kernel timestamped it.
fn measure(ebpf: bool, runs: usize) -> Result<(Vec<f64>, Vec<f64>, String)> {
    let marker = format!("selfheal-bench-target-{}-{ebpf}", std::process::id());
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{marker}\"\npoll_interval_ms = 50\n\n[probes]\nebpf = {ebpf}\n\n[monitor]\ninterval_ms = 1000\n"
    ))?;
    let source = daemon.health()?["probes"]["ebpf"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let mut latencies = Vec::with_capacity(runs);
    let mut kernel_to_daemon = Vec::with_capacity(runs);
    for run in 0..runs {
        let mut command = Command::new("sleep");
        command.arg0(&marker).arg("3600");
        let target = Proc::spawn("target", command)?;
        let pid = target.pid();
        daemon.wait_for_target(pid)?;
        let killed = monotonic_ns();
        target.signal(Signal::SIGKILL)?;
        let exit = daemon
            .wait_for_exit(pid)
            .with_context(|| format!("run {run}"))?;
        let observed = exit["observed_monotonic_ns"].as_u64().unwrap_or(killed);
        latencies.push(observed.saturating_sub(killed) as f64 / 1e6);
        if let Some(exited) = exit["exited_monotonic_ns"].as_u64() {
            kernel_to_daemon.push(observed.saturating_sub(exited) as f64 / 1e6);
        }
        drop(target);
    }
    Ok((latencies, kernel_to_daemon, source))
}

fn crash_latency(runs: usize) -> Result<()> {
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    println!("crash detection latency: SIGKILL of the target → exit event in the daemon, {runs} kills per mode");
    println!(
        "| mode | detected by | p50 ms | p95 ms | max ms | mean ms | kernel → daemon p50 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ebpf in [true, false] {
        let (latencies, kernel, source) = measure(ebpf, runs)?;
        let s = stats(latencies);
        let k = if kernel.is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:.3}", stats(kernel).p50)
        };
        let mode = if ebpf {
            "eBPF (sched_process_exit)"
        } else {
            "fallback (pidfd, probes.ebpf = false)"
        };
        println!(
            "| {mode} | ebpf: {source} | {:.3} | {:.3} | {:.3} | {:.3} | {k} |",
            s.p50, s.p95, s.max, s.mean
        );
    }
    println!("For scale: Kubernetes' default liveness probe period is 10 s × 3 failures; Monit's cycle is 30 s.");
    Ok(())
}
