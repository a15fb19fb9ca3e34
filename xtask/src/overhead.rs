//! `cargo xtask bench overhead`: what the daemon costs, measured side by side in one run.
//!
//! - The tax on a process that is *not* the target: nanoseconds per `write(2)` of one byte to
//!   `/dev/null`, here in the xtask process, with no daemon, with the daemon and payload capture,
//!   and with the daemon without payload capture (`probes.payload_bytes = 0`).
//! - The cost to the target, without and with the daemon (payload capture on), in rounds
//!   alternated without/with/with/without to even out drift, compared by medians:
//!   - at saturation: keep-alive connections sending requests back to back; the throughput
//!     ratio (on these 2-core machines the load generator, the backend, PostgreSQL and the
//!     daemon share the CPUs, so every cycle the daemon spends shows up here);
//!   - under a fixed load of half the saturation rate: requests sent on a schedule, latency
//!     measured from the scheduled send (no coordinated omission); the p99 ratio.

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

/// `connections` keep-alive clients sending `GET /api/v1/tackle/deals` for `duration`: back to
/// back, or, with `rate` (requests per second over all connections), on a fixed schedule
/// with latency counted from the scheduled time.
fn load(
    backend: &DemoBackend,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<Load> {
    let address = backend.address;
    let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
                let mut client = KeepAlive::connect(address)?;
                let mut latencies = Vec::new();
                let mut errors = 0;
                let started = Instant::now();
                let mut next = started;
                while started.elapsed() < duration {
                    let sent = match interval {
                        Some(interval) => {
                            let scheduled = next;
                            next += interval;
                            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            scheduled
                        }
                        None => Instant::now(),
                    };
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

/// The capture programs' own time per run for processes that are not the target, from the
/// kernel's BPF statistics (`kernel.bpf_stats_enabled`, switched on for the measurement and
/// restored after) as the daemon exports them: `(program, runs, ns per run)`.
fn program_cost(daemon: &Daemon) -> Result<Vec<(&'static str, f64, f64)>> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    const PROGRAMS: [&str; 2] = ["capture_recv", "capture_send"];
    let previous = std::fs::read_to_string(SYSCTL).context("read kernel.bpf_stats_enabled")?;
    std::fs::write(SYSCTL, "1").context("enable kernel.bpf_stats_enabled")?;
    let read = || -> Result<Vec<(f64, f64)>> {
        let text = daemon.metrics()?;
        Ok(PROGRAMS
            .iter()
            .map(|p| {
                let series = |name: &str| {
                    selfheal_e2e::sample(&text, &format!("{name}{{program=\"{p}\"}}"))
                        .unwrap_or(0.0)
                };
                (
                    series("selfheal_ebpf_program_runs_total"),
                    series("selfheal_ebpf_program_run_seconds_total"),
                )
            })
            .collect())
    };
    // The daemon exports the kernel's totals once per second.
    std::thread::sleep(Duration::from_millis(2500));
    let before = read();
    let measured = before.and_then(|before| {
        socket_op_cost_ns()?;
        std::thread::sleep(Duration::from_millis(2500));
        Ok((before, read()?))
    });
    std::fs::write(SYSCTL, previous.trim()).context("restore kernel.bpf_stats_enabled")?;
    let (before, after) = measured?;
    Ok(PROGRAMS
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(program, ((runs0, secs0), (runs1, secs1)))| {
            let runs = runs1 - runs0;
            (*program, runs, (secs1 - secs0) * 1e9 / runs.max(1.0))
        })
        .collect())
}

fn daemon_for(backend: &DemoBackend, payload_bytes: u32) -> Result<Daemon> {
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\n\n[probes]\npayload_bytes = {payload_bytes}\n\n[monitor]\ninterval_ms = 1000\n",
        backend.selector()
    ))?;
    daemon.wait_for_target(backend.proc.pid())?;
    // The tracker hands the pid to the kernel filter asynchronously; let start-up settle.
    std::thread::sleep(Duration::from_secs(1));
    Ok(daemon)
}

/// Runs of each kind, per phase.
const ROUNDS: usize = 4;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// Rounds without and with the daemon in the order without, with, with, without, …;
/// prints each and returns (without, with).
fn alternate(
    backend: &DemoBackend,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    rounds: usize,
) -> Result<(Vec<Load>, Vec<Load>)> {
    println!("| run | requests | errors | req/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut without = Vec::new();
    let mut with = Vec::new();
    for round in 0..rounds * 2 {
        let daemon_on = matches!(round % 4, 1 | 2);
        let row = |name: String, l: &Load| {
            println!(
                "| {name} | {} | {} | {:.0} | {:.2} | {:.2} |",
                l.requests, l.errors, l.per_second, l.p50_ms, l.p99_ms
            );
        };
        if daemon_on {
            let daemon = daemon_for(backend, 256)?;
            let cpu = || {
                daemon
                    .metric("selfheal_daemon_cpu_seconds_total")
                    .ok()
                    .flatten()
                    .unwrap_or(0.0)
            };
            let cpu_before = cpu();
            let result =
                load(backend, connections, duration, rate).context("load with the daemon")?;
            let cpu_percent = (cpu() - cpu_before) / duration.as_secs_f64() * 100.0;
            drop(daemon);
            row(
                format!("with daemon (its CPU: {cpu_percent:.1} % of a core)"),
                &result,
            );
            with.push(result);
        } else {
            let result =
                load(backend, connections, duration, rate).context("load without the daemon")?;
            row("without daemon".to_owned(), &result);
            without.push(result);
        }
    }
    Ok((without, with))
}

fn ratio(without: &[Load], with: &[Load], f: fn(&Load) -> f64) -> f64 {
    median(with.iter().map(f).collect()) / median(without.iter().map(f).collect())
}

pub(crate) fn run(seconds: u64, connections: usize) -> Result<()> {
    let duration = Duration::from_secs(seconds);
    let pg = PgCluster::start()?;
    let backend = DemoBackend::start(&pg.url(), free_port()?)?;
    // Warm the backend's pool and caches.
    load(&backend, connections, Duration::from_secs(2), None)?;

    println!("## cost to a process that is not the target (medians of 5 rounds)");
    let bare = (write_cost_ns()?, socket_op_cost_ns()?);
    let (with_capture, program_costs) = {
        let daemon = daemon_for(&backend, 256)?;
        let costs = (write_cost_ns()?, socket_op_cost_ns()?);
        (costs, program_cost(&daemon)?)
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
    println!("In-kernel time of the capture programs per run, for a process that is not the target (kernel BPF statistics, during 5 × 1 M socket operations):");
    println!();
    println!("| program | runs | ns per run |");
    println!("|---|---|---|");
    for (program, runs, ns) in program_costs {
        println!("| `{program}` | {runs:.0} | {ns:.1} |");
    }
    println!();
    println!("## cost to the target at saturation: demo backend, {connections} keep-alive connections back to back, {seconds} s per run, {ROUNDS} runs each, alternated");
    let (without, with) = alternate(&backend, connections, duration, None, ROUNDS)?;
    let throughput = ratio(&without, &with, |l| l.per_second);
    let saturated_p99 = ratio(&without, &with, |l| l.p99_ms);
    println!();
    println!(
        "saturation, medians with/without: throughput {throughput:.3} ({:+.1} %), p99 {saturated_p99:.3} ({:+.1} %)",
        (throughput - 1.0) * 100.0,
        (saturated_p99 - 1.0) * 100.0
    );

    let rate = (median(without.iter().map(|l| l.per_second).collect()) / 2.0).round();
    println!();
    println!("## cost to the target under a fixed load: {rate} requests/s (half the saturation rate) on {connections} connections, {seconds} s per run, {ROUNDS} runs each, alternated");
    let (without, with) = alternate(&backend, connections, duration, Some(rate), ROUNDS)?;
    let served = ratio(&without, &with, |l| l.per_second);
    let p50 = ratio(&without, &with, |l| l.p50_ms);
    let p99 = ratio(&without, &with, |l| l.p99_ms);
    println!();
    println!(
        "fixed load, medians with/without: served {served:.3} ({:+.1} %), p50 {p50:.3} ({:+.1} %), p99 {p99:.3} ({:+.1} %)",
        (served - 1.0) * 100.0,
        (p50 - 1.0) * 100.0,
        (p99 - 1.0) * 100.0
    );
    Ok(())
}
