//! `cargo xtask bench overhead`: what the daemon costs, measured side by side in one run.
//!
//! - The tax on a process that is *not* the target: nanoseconds per `write(2)` of one byte to
//!   `/dev/null`, here in the xtask process, with no daemon, with the daemon and payload capture,
//!   and with the daemon without payload capture (`probes.payload_bytes = 0`).
//! - The cost to the target: the demo backend's throughput and latency under a fixed load
//!   (keep-alive connections, each sending requests back to back), without and with the daemon,
//!   alternated twice to even out drift; printed as ratios.

use std::{
    fs::OpenOptions,
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use selfheal_e2e::{free_port, Daemon, DemoBackend, KeepAlive, PgCluster};

/// Median over 5 rounds of the time of one 1-byte `write(2)` to /dev/null, in ns.
fn write_cost_ns() -> Result<f64> {
    const CALLS: u32 = 1_000_000;
    let mut null = OpenOptions::new().write(true).open("/dev/null")?;
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..CALLS {
            null.write_all(b"x")?;
        }
        rounds.push(started.elapsed().as_nanos() as f64 / f64::from(CALLS));
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[2])
}

/// Median over 5 rounds of one 1-byte datagram sent and received on a unix socket pair, per
/// socket operation, in ns: the I/O the capture hooks fire on.
fn socket_op_cost_ns() -> Result<f64> {
    const ROUNDS: u32 = 500_000;
    let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
    let mut buf = [0u8; 1];
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..ROUNDS {
            a.send(b"x")?;
            b.recv(&mut buf)?;
        }
        rounds.push(started.elapsed().as_nanos() as f64 / f64::from(2 * ROUNDS));
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[2])
}

struct Load {
    requests: u64,
    errors: u64,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `connections` keep-alive clients sending `GET /api/v1/tackle/deals` back to back for `duration`.
fn load(backend: &DemoBackend, connections: usize, duration: Duration) -> Result<Load> {
    let address = backend.address;
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
                let mut client = KeepAlive::connect(address)?;
                let mut latencies = Vec::new();
                let mut errors = 0;
                let started = Instant::now();
                while started.elapsed() < duration {
                    let sent = Instant::now();
                    match client.get("/api/v1/tackle/deals", "api.tackle.io") {
                        Ok(200) => latencies
                            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX)),
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            client = KeepAlive::connect(address)?;
                        }
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut l, e) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        latencies.append(&mut l);
        errors += e;
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    Ok(Load {
        requests: latencies.len() as u64,
        errors,
        per_second: latencies.len() as f64 / duration.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}

fn daemon_for(backend: &DemoBackend, payload_bytes: u32) -> Result<Daemon> {
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\n\n[probes]\npayload_bytes = {payload_bytes}\n",
        backend.selector()
    ))?;
    daemon.wait_for_target(backend.proc.pid())?;
    // The tracker hands the pid to the kernel filter asynchronously.
    std::thread::sleep(Duration::from_millis(300));
    Ok(daemon)
}

pub(crate) fn run(seconds: u64, connections: usize) -> Result<()> {
    let duration = Duration::from_secs(seconds);
    let pg = PgCluster::start()?;
    let backend = DemoBackend::start(&pg.url(), free_port()?)?;
    // Warm the backend's pool and caches.
    load(&backend, connections, Duration::from_secs(2))?;

    println!("## cost to a process that is not the target (medians of 5 rounds)");
    let bare = (write_cost_ns()?, socket_op_cost_ns()?);
    let with_capture = {
        let _daemon = daemon_for(&backend, 256)?;
        (write_cost_ns()?, socket_op_cost_ns()?)
    };
    let without_capture = {
        let _daemon = daemon_for(&backend, 0)?;
        (write_cost_ns()?, socket_op_cost_ns()?)
    };
    println!(
        "| condition | write(2) to /dev/null, ns | added | unix socket send or recv, ns | added |"
    );
    println!("|---|---|---|---|---|");
    println!("| no daemon | {:.1} | — | {:.1} | — |", bare.0, bare.1);
    for (name, cost) in [
        (
            "daemon, payload capture on (`payload_bytes = 256`)",
            with_capture,
        ),
        ("daemon, payload capture off (default)", without_capture),
    ] {
        println!(
            "| {name} | {:.1} | {:+.1} | {:.1} | {:+.1} |",
            cost.0,
            cost.0 - bare.0,
            cost.1,
            cost.1 - bare.1
        );
    }
    println!();
    println!("## cost to the target: demo backend, {connections} keep-alive connections, {seconds} s per run, alternated twice");
    println!("| run | requests | errors | req/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut without = Vec::new();
    let mut with = Vec::new();
    for round in 1..=2 {
        let result = load(&backend, connections, duration).context("load without the daemon")?;
        println!(
            "| without daemon #{round} | {} | {} | {:.0} | {:.2} | {:.2} |",
            result.requests, result.errors, result.per_second, result.p50_ms, result.p99_ms
        );
        without.push(result);
        let daemon = daemon_for(&backend, 256)?;
        let cpu = || {
            daemon
                .metric("selfheal_daemon_cpu_seconds_total")
                .ok()
                .flatten()
                .unwrap_or(0.0)
        };
        let cpu_before = cpu();
        let result = load(&backend, connections, duration).context("load with the daemon")?;
        let cpu_percent = (cpu() - cpu_before) / duration.as_secs_f64() * 100.0;
        drop(daemon);
        println!(
            "| with daemon #{round} (its CPU: {cpu_percent:.0} % of a core) | {} | {} | {:.0} | {:.2} | {:.2} |",
            result.requests, result.errors, result.per_second, result.p50_ms, result.p99_ms
        );
        with.push(result);
    }
    let mean =
        |runs: &[Load], f: fn(&Load) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    let throughput = mean(&with, |l| l.per_second) / mean(&without, |l| l.per_second);
    let p99 = mean(&with, |l| l.p99_ms) / mean(&without, |l| l.p99_ms);
    println!();
    println!("throughput with/without: {throughput:.3} ({:+.1} %); p99 with/without: {p99:.3} ({:+.1} %)", (throughput - 1.0) * 100.0, (p99 - 1.0) * 100.0);
    Ok(())
}
