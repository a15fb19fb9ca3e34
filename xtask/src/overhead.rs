//! `cargo xtask bench overhead`: what the daemon costs, measured side by side in one run.
//!
//! - The tax on a process that is *not* the target, here the xtask process: nanoseconds per
//!   `write(2)` to /dev/null (no hook fires), per unix datagram send or receive, and per
//!   non-blocking read of an empty socket (the cheapest operation a capture hook fires on),
//!   without and with the daemon (payload capture on), rounds alternated; and the capture
//!   programs' own in-kernel time per run from the kernel's BPF statistics.
//! - The cost to the target, without and with the daemon (payload capture on), in rounds
//!   alternated without/with/with/without to even out drift, compared by medians:
//!   - at saturation: keep-alive connections sending requests back to back; the throughput
//!     ratio (on these 2-core machines the load generator, the backend, PostgreSQL and the
//!     daemon share the CPUs, so every cycle the daemon spends shows up here);
//!   - under a fixed load of half the saturation rate: requests sent on a schedule, latency
//!     measured from the scheduled send (no coordinated omission); the p99 ratio, and the
//!     machine's CPU time per request (the capacity a CPU-bound machine loses), then one more
//!     run that splits the added time into the daemon's own CPU and the capture programs'.
//!   - at the same moments: two identical backends share that fixed load, the daemon (in the
//!     runs with it) capturing one; the ratio of their latencies within a run does not move
//!     with this VM's stalls and drift, which blur the comparisons across runs.

use std::{
    fs::OpenOptions,
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use selfheal_e2e::{free_port, Daemon, DemoBackend, KeepAlive, PgCluster};

/// One round: the time of one 1-byte `write(2)` to /dev/null, in ns — a syscall the capture
/// programs do not fire on.
fn write_cost_ns() -> Result<f64> {
    const CALLS: u32 = 1_000_000;
    let mut null = OpenOptions::new().write(true).open("/dev/null")?;
    let started = Instant::now();
    for _ in 0..CALLS {
        null.write_all(b"x")?;
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(CALLS))
}

/// One round: one 1-byte datagram sent and received on a unix socket pair, per socket
/// operation, in ns — the I/O the capture hooks fire on.
fn socket_op_cost_ns() -> Result<f64> {
    const PAIRS: u32 = 500_000;
    let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
    let mut buf = [0u8; 1];
    let started = Instant::now();
    for _ in 0..PAIRS {
        a.send(b"x")?;
        b.recv(&mut buf)?;
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(2 * PAIRS))
}

/// One round: a non-blocking read of an empty unix socket, in ns — the cheapest socket
/// operation the receive hook fires on, so the hook's share of it is as large as it gets.
fn empty_recv_cost_ns() -> Result<f64> {
    const CALLS: u32 = 1_000_000;
    let (_a, b) = std::os::unix::net::UnixDatagram::pair()?;
    b.set_nonblocking(true)?;
    let mut buf = [0u8; 1];
    let started = Instant::now();
    for _ in 0..CALLS {
        if b.recv(&mut buf).is_ok() {
            anyhow::bail!("an empty socket had data");
        }
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(CALLS))
}

/// One round: 64 bytes written and read back on a loopback TCP connection, per socket
/// operation, in ns — TCP traffic of a process outside the target's cgroup, which the
/// segment capture must not touch.
fn tcp_op_cost_ns() -> Result<f64> {
    use std::io::Read as _;
    const PAIRS: u32 = 200_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut a = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut b, _) = listener.accept()?;
    a.set_nodelay(true)?;
    let mut buf = [0u8; 64];
    let started = Instant::now();
    for _ in 0..PAIRS {
        a.write_all(&[7u8; 64])?;
        b.read_exact(&mut buf)?;
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(2 * PAIRS))
}

/// Costs to another process measured per round.
const OTHER_OPERATIONS: [&str; 4] = [
    "`write(2)` of 1 byte to /dev/null (no hook fires)",
    "unix datagram send or recv of 1 byte",
    "non-blocking recv on an empty unix socket",
    "loopback TCP write or read of 64 bytes",
];

/// The costs above, one round each.
fn other_process_round() -> Result<[f64; 4]> {
    Ok([
        write_cost_ns()?,
        socket_op_cost_ns()?,
        empty_recv_cost_ns()?,
        tcp_op_cost_ns()?,
    ])
}

/// Rounds of the costs to a process that is not the target, without and with the daemon
/// (payload capture on), alternated without/with/with/without; medians per condition.
fn other_process_costs(
    backend: &DemoBackend,
    rounds: usize,
    capture: &Probes,
) -> Result<([f64; 4], [f64; 4])> {
    let mut without: Vec<[f64; 4]> = Vec::new();
    let mut with: Vec<[f64; 4]> = Vec::new();
    for round in 0..rounds * 2 {
        if matches!(round % 4, 1 | 2) {
            let _daemon = daemon_for(backend, capture.payload_bytes, capture)?;
            with.push(other_process_round()?);
        } else {
            without.push(other_process_round()?);
        }
    }
    let medians =
        |runs: &[[f64; 4]]| [0, 1, 2, 3].map(|i| median(runs.iter().map(|r| r[i]).collect()));
    Ok((medians(&without), medians(&with)))
}

/// CPU seconds of the daemon's threads running niced (the decoder when `probes.decode_nice`
/// is above 0), which `/proc/stat` counts as nice time.
fn niced_daemon_seconds(daemon: &Daemon) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", daemon.proc.pid())) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == "selfheal-decode")
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .map(|stat| {
            // Fields after the command's closing parenthesis: utime and stime are 14 and 15 of
            // proc(5), nice is 19.
            let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<f64> = rest
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0.0))
                .collect();
            let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
            if field(16) > 0.0 {
                (field(11) + field(12)) / 100.0
            } else {
                0.0
            }
        })
        .sum()
}

#[derive(Clone)]
pub(crate) struct Load {
    pub requests: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The machine's CPU time per request served (see [`busy_seconds`]), in µs.
    pub cpu_us_per_request: f64,
    /// Share of the run during which some process of the backend's cgroup waited for a CPU
    /// (its `cpu.pressure` "some" total), in %.
    pub stall_percent: f64,
    /// Every request's latency, µs, sorted.
    pub latencies_us: Vec<u32>,
}

/// Microseconds some task of `pid`'s cgroup2 directory has waited for a CPU (PSI, the
/// `some` line of its `cpu.pressure`); 0 where the kernel does not keep it.
fn cpu_stall_us(pid: u32) -> f64 {
    let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return 0.0;
    };
    let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) else {
        return 0.0;
    };
    let mount = selfheal_e2e::cgroup2_mount().display();
    std::fs::read_to_string(format!("{mount}{path}/cpu.pressure"))
        .ok()
        .and_then(|text| {
            let some = text.lines().find(|l| l.starts_with("some "))?;
            some.split_whitespace()
                .find_map(|f| f.strip_prefix("total="))?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// CPU seconds the machine has spent busy, from `/proc/stat`: user, system, irq and softirq
/// time of all CPUs — the backend, PostgreSQL, the load generator, the daemon and the kernel's
/// work for them. Niced time is left out so that a niced build beside the bench does not
/// count; the daemon's own niced thread is added back by the caller ([`niced_daemon_seconds`]).
/// Per request, the difference with and without the daemon is what it adds to the cost of
/// serving one, and the ratio is the capacity a CPU-bound machine loses: far steadier here
/// than a saturation throughput.
pub(crate) fn busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().unwrap_or_default();
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq …; USER_HZ is 100 on Linux.
    let busy = [0, 2, 5, 6]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0.0))
        .sum::<f64>();
    Ok(busy / 100.0)
}

/// `connections` keep-alive clients sending `GET /api/v1/tackle/deals` for `duration`: back to
/// back, or, with `rate` (requests per second over all connections), on a fixed schedule
/// with latency counted from the scheduled time.
pub(crate) fn load(
    backend: &DemoBackend,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<Load> {
    let address = backend.address;
    let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let busy_before = busy_seconds()?;
    let stall_before = cpu_stall_us(backend.proc.pid());
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
    let busy = busy_seconds()? - busy_before;
    let stall = cpu_stall_us(backend.proc.pid()) - stall_before;
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
        cpu_us_per_request: busy * 1e6 / latencies.len().max(1) as f64,
        stall_percent: stall / duration.as_secs_f64() / 1e4,
        latencies_us: latencies,
    })
}

/// The payload capture programs of both modes (only one pair is loaded at a time).
const PROGRAMS: [&str; 4] = [
    "capture_recv",
    "capture_send",
    "segment_ingress",
    "segment_egress",
];

/// Runs `work` with the kernel's BPF statistics on (`kernel.bpf_stats_enabled`, restored
/// after) and returns the capture programs' `(runs, seconds)` totals as the daemon exports
/// them, before and after.
#[allow(clippy::type_complexity)]
fn with_program_stats(
    daemon: &Daemon,
    work: impl FnOnce() -> Result<()>,
) -> Result<(Vec<(f64, f64)>, Vec<(f64, f64)>)> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
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
        work()?;
        std::thread::sleep(Duration::from_millis(2500));
        Ok((before, read()?))
    });
    std::fs::write(SYSCTL, previous.trim()).context("restore kernel.bpf_stats_enabled")?;
    measured
}

/// All capture programs' runs and seconds between two readings of [`with_program_stats`].
fn program_totals(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    before.iter().zip(after).fold((0.0, 0.0), |acc, (b, a)| {
        (acc.0 + a.0 - b.0, acc.1 + a.1 - b.1)
    })
}

/// The capture programs' own time per run for processes that are not the target, from the
/// kernel's BPF statistics (`kernel.bpf_stats_enabled`, switched on for the measurement and
/// restored after) as the daemon exports them: `(program, runs, ns per run)`.
fn program_cost(daemon: &Daemon) -> Result<Vec<(&'static str, f64, f64)>> {
    let (before, after) = with_program_stats(daemon, || {
        socket_op_cost_ns()?;
        tcp_op_cost_ns().map(|_| ())
    })?;
    Ok(PROGRAMS
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(program, ((runs0, secs0), (runs1, secs1)))| {
            let runs = runs1 - runs0;
            (*program, runs, (secs1 - secs0) * 1e9 / runs.max(1.0))
        })
        .collect())
}

/// The daemon's probe settings for a bench: `probes.capture` and more `[probes]` lines
/// (`--set`, e.g. `decode_nice = 19`).
pub(crate) struct Probes {
    pub capture: String,
    /// `payload_bytes` of the comparison (the profile compares 0 with it).
    pub payload_bytes: u32,
    pub set: Vec<String>,
}

/// `probes`: the `[probes]` lines besides `payload_bytes` (see [`Probes`]).
pub(crate) fn daemon_for(
    backend: &DemoBackend,
    payload_bytes: u32,
    probes: &Probes,
) -> Result<Daemon> {
    let capture = &probes.capture;
    let extra = probes.set.join("\n");
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\n\n[probes]\npayload_bytes = {payload_bytes}\ncapture = \"{capture}\"\n{extra}\n\n[monitor]\ninterval_ms = 1000\n",
        backend.selector()
    ))?;
    daemon.wait_for_target(backend.proc.pid())?;
    // The tracker hands the pid to the kernel filter asynchronously; let start-up settle.
    std::thread::sleep(Duration::from_secs(1));
    Ok(daemon)
}

/// One [`load`] run beside `daemon`: the machine's CPU per request with the daemon's niced
/// thread added back (see [`busy_seconds`]), and the daemon's own CPU seconds over the run.
pub(crate) fn load_beside(
    daemon: &Daemon,
    backend: &DemoBackend,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<(Load, f64)> {
    let cpu = || {
        daemon
            .metric("selfheal_daemon_cpu_seconds_total")
            .ok()
            .flatten()
            .unwrap_or(0.0)
    };
    let (cpu_before, niced_before) = (cpu(), niced_daemon_seconds(daemon));
    let mut result = load(backend, connections, duration, rate).context("load with the daemon")?;
    result.cpu_us_per_request +=
        (niced_daemon_seconds(daemon) - niced_before) * 1e6 / result.requests.max(1) as f64;
    Ok((result, cpu() - cpu_before))
}

/// Rounds of each condition for the cost to other processes.
const OTHER_ROUNDS: usize = 6;

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
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
    capture: &Probes,
    backend: &DemoBackend,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    rounds: usize,
) -> Result<(Vec<Load>, Vec<Load>)> {
    println!("| run | requests | errors | req/s | p50 ms | p99 ms | machine CPU µs per request | backend's CPU stall % |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut without = Vec::new();
    let mut with = Vec::new();
    for round in 0..rounds * 2 {
        let daemon_on = matches!(round % 4, 1 | 2);
        let row = |name: String, l: &Load| {
            println!(
                "| {name} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} |",
                l.requests,
                l.errors,
                l.per_second,
                l.p50_ms,
                l.p99_ms,
                l.cpu_us_per_request,
                l.stall_percent
            );
        };
        if daemon_on {
            let daemon = daemon_for(backend, capture.payload_bytes, capture)?;
            let (result, daemon_seconds) =
                load_beside(&daemon, backend, connections, duration, rate)?;
            let cpu_percent = daemon_seconds / duration.as_secs_f64() * 100.0;
            let sampling = daemon
                .metric("selfheal_capture_sampling_ratio")
                .ok()
                .flatten()
                .unwrap_or(1.0);
            let shed = daemon
                .metric("selfheal_ebpf_ringbuf_drops_total{reason=\"shed\"}")
                .ok()
                .flatten()
                .unwrap_or(0.0);
            drop(daemon);
            row(
                format!(
                    "with daemon (its CPU: {cpu_percent:.1} % of a core; at the end kept 1 connection in {:.0}, {shed:.0} packets shed)",
                    1.0 / sampling.max(1e-9)
                ),
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

/// The median over the blocks of four runs [`alternate`] makes (without, with, with,
/// without) of each block's mean with / mean without: a drift of the machine over the whole
/// invocation, as large here as the effect, cancels within a block.
fn paired_ratio(without: &[Load], with: &[Load], f: fn(&Load) -> f64) -> f64 {
    let mean = |loads: &[Load]| loads.iter().map(f).sum::<f64>() / loads.len().max(1) as f64;
    median(
        without
            .chunks(2)
            .zip(with.chunks(2))
            .map(|(without, with)| mean(with) / mean(without))
            .collect(),
    )
}

/// How far apart the two runs without the daemon of a block are (the median over the
/// blocks of |first / second − 1|, in %): what this machine's noise alone does to one
/// figure, to read the ratios against.
fn noise_percent(without: &[Load], f: fn(&Load) -> f64) -> f64 {
    median(
        without
            .chunks_exact(2)
            .map(|pair| (f(&pair[0]) / f(&pair[1]) - 1.0).abs() * 100.0)
            .collect(),
    )
}

/// The quantile `q` of every request of `loads` together, in µs (NaN without a request).
pub(crate) fn pooled_quantile_us<'a>(loads: impl IntoIterator<Item = &'a Load>, q: f64) -> f64 {
    let mut all: Vec<u32> = loads
        .into_iter()
        .flat_map(|l| l.latencies_us.iter().copied())
        .collect();
    if all.is_empty() {
        return f64::NAN;
    }
    let at = ((all.len() - 1) as f64 * q) as usize;
    let (_, value, _) = all.select_nth_unstable(at);
    f64::from(*value)
}

/// `name ratio (±%), paired ratio (±%), noise` for the summaries.
fn ratios(name: &str, without: &[Load], with: &[Load], f: fn(&Load) -> f64) -> String {
    let r = ratio(without, with, f);
    let p = paired_ratio(without, with, f);
    let noise = noise_percent(without, f);
    format!(
        "{name} {r:.3} ({:+.1} %; paired by block {p:.3}, {:+.1} %; two runs without differ by {noise:.1} %)",
        (r - 1.0) * 100.0,
        (p - 1.0) * 100.0
    )
}

/// The p99 of every request of each condition pooled, with / without.
fn pooled_p99(without: &[Load], with: &[Load]) -> String {
    let (a, b) = (
        pooled_quantile_us(without, 0.99) / 1000.0,
        pooled_quantile_us(with, 0.99) / 1000.0,
    );
    format!(
        "p99 of all requests pooled: {b:.2} ms with, {a:.2} ms without, {:.3} ({:+.1} %)",
        b / a,
        (b / a - 1.0) * 100.0
    )
}

/// Two identical backends under the same fixed load at the same moments, the daemon (in the
/// runs with it) capturing the first only. Both share every stall of this VM, so the ratio
/// captured / not captured of one run is free of the drift and the stalls that blur the
/// comparisons across runs; the change of that ratio between the runs without and with the
/// daemon is the capture's cost in the target's own path. The daemon's CPU lands on both
/// alike and is not in it: its cost is measured separately, as CPU per request.
fn twins(
    pg: &PgCluster,
    capture: &Probes,
    connections: usize,
    duration: Duration,
    rate: f64,
    rounds: usize,
) -> Result<()> {
    let captured = DemoBackend::start(&pg.url(), free_port()?)?;
    let other = DemoBackend::start(&pg.url(), free_port()?)?;
    for backend in [&captured, &other] {
        load(backend, connections, Duration::from_secs(2), None)?;
    }
    println!("## the same moments: two identical backends, {:.0} requests/s each on {connections} connections of their own (together the fixed load's rate), the daemon capturing the first; {} s per run, {rounds} runs each, alternated", rate / 2.0, duration.as_secs());
    println!(
        "| run | captured p50 ms | other p50 ms | captured p99 ms | other p99 ms | p99 ratio |"
    );
    println!("|---|---|---|---|---|---|");
    let mut runs: [Vec<(Load, Load)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds * 2 {
        let daemon_on = matches!(round % 4, 1 | 2);
        let daemon = if daemon_on {
            Some(daemon_for(&captured, capture.payload_bytes, capture)?)
        } else {
            None
        };
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| load(&captured, connections, duration, Some(rate / 2.0)));
            let b = scope.spawn(|| load(&other, connections, duration, Some(rate / 2.0)));
            (
                a.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked")),
                b.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked")),
            )
        });
        let (a, b) = (a??, b??);
        drop(daemon);
        if a.errors + b.errors > 0 {
            anyhow::bail!(
                "{} requests failed in a run of the same moments: the comparison would not hold",
                a.errors + b.errors
            );
        }
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |",
            if daemon_on {
                "with daemon"
            } else {
                "without daemon"
            },
            a.p50_ms,
            b.p50_ms,
            a.p99_ms,
            b.p99_ms,
            a.p99_ms / b.p99_ms
        );
        runs[usize::from(daemon_on)].push((a, b));
    }
    let [without, with] = runs;
    let ratio = |runs: &[(Load, Load)], f: fn(&Load) -> f64| {
        median(runs.iter().map(|(a, b)| f(a) / f(b)).collect())
    };
    let pooled = |runs: &[(Load, Load)]| {
        let (a, b): (Vec<Load>, Vec<Load>) = runs.iter().cloned().unzip();
        pooled_quantile_us(&a, 0.99) / pooled_quantile_us(&b, 0.99)
    };
    println!();
    for (name, f) in [
        ("p50", (|l: &Load| l.p50_ms) as fn(&Load) -> f64),
        ("p99", |l: &Load| l.p99_ms),
    ] {
        let (off, on) = (ratio(&without, f), ratio(&with, f));
        println!(
            "same moments, {name} captured / other (medians over runs): {off:.3} without the daemon, {on:.3} with it: the capture adds {:+.1} %",
            (on / off - 1.0) * 100.0
        );
    }
    let (off, on) = (pooled(&without), pooled(&with));
    println!(
        "same moments, p99 of all requests pooled, captured / other: {off:.3} without the daemon, {on:.3} with it: the capture adds {:+.1} %",
        (on / off - 1.0) * 100.0
    );
    Ok(())
}

pub(crate) fn run(seconds: u64, connections: usize, rounds: usize, capture: &Probes) -> Result<()> {
    let duration = Duration::from_secs(seconds);
    let pg = PgCluster::start()?;
    let backend = DemoBackend::start(&pg.url(), free_port()?)?;
    // Warm the backend's pool and caches.
    load(&backend, connections, Duration::from_secs(2), None)?;

    println!(
        "payload capture: probes.capture = \"{}\", payload_bytes = {}{}",
        capture.capture,
        capture.payload_bytes,
        if capture.set.is_empty() {
            String::new()
        } else {
            format!(", {}", capture.set.join(", "))
        }
    );
    println!();
    println!("## cost to a process that is not the target ({OTHER_ROUNDS} rounds per condition, alternated, medians)");
    let (bare, with_capture) = other_process_costs(&backend, OTHER_ROUNDS, capture)?;
    let program_costs = program_cost(&daemon_for(&backend, capture.payload_bytes, capture)?)?;
    println!("| operation | no daemon, ns | daemon with payload capture, ns | added, ns |");
    println!("|---|---|---|---|");
    for (i, operation) in OTHER_OPERATIONS.iter().enumerate() {
        println!(
            "| {operation} | {:.1} | {:.1} | {:+.1} |",
            bare[i],
            with_capture[i],
            with_capture[i] - bare[i]
        );
    }
    println!();
    println!("In-kernel runs of the capture programs for a process that is not the target (kernel BPF statistics, during 1 M unix and 400 k loopback TCP socket operations):");
    println!();
    println!("| program | runs | ns per run |");
    println!("|---|---|---|");
    for (program, runs, ns) in program_costs {
        println!("| `{program}` | {runs:.0} | {ns:.1} |");
    }
    println!();
    println!("## cost to the target at saturation: demo backend, {connections} keep-alive connections back to back, {seconds} s per run, {rounds} runs each, alternated");
    let (without, with) = alternate(capture, &backend, connections, duration, None, rounds)?;
    println!();
    println!(
        "saturation, medians with/without: {}, {}",
        ratios("throughput", &without, &with, |l| l.per_second),
        ratios("p99", &without, &with, |l| l.p99_ms),
    );
    println!("saturation, {}", pooled_p99(&without, &with));

    let rate = (median(without.iter().map(|l| l.per_second).collect()) / 2.0).round();
    println!();
    println!("## cost to the target under a fixed load: {rate} requests/s (half the saturation rate) on {connections} connections, {seconds} s per run, {rounds} runs each, alternated");
    let (without, with) = alternate(capture, &backend, connections, duration, Some(rate), rounds)?;
    println!();
    println!(
        "fixed load, medians with/without: {}, {}, {}, {}",
        ratios("served", &without, &with, |l| l.per_second),
        ratios("p50", &without, &with, |l| l.p50_ms),
        ratios("p99", &without, &with, |l| l.p99_ms),
        ratios("machine CPU per request", &without, &with, |l| l
            .cpu_us_per_request),
    );
    println!("fixed load, {}", pooled_p99(&without, &with));
    println!();
    twins(&pg, capture, connections, duration, rate, rounds)?;

    // Where the added CPU goes: one more run with the daemon and the kernel's BPF statistics
    // on (they cost time themselves, so this run is not among the compared ones).
    let daemon = daemon_for(&backend, capture.payload_bytes, capture)?;
    let cpu_before = daemon
        .metric("selfheal_daemon_cpu_seconds_total")?
        .unwrap_or(0.0);
    let mut requests = 0.0;
    let (before, after) = with_program_stats(&daemon, || {
        requests = load(&backend, connections, duration, Some(rate))?.requests as f64;
        Ok(())
    })?;
    let daemon_cpu = daemon
        .metric("selfheal_daemon_cpu_seconds_total")?
        .unwrap_or(0.0)
        - cpu_before;
    let (runs, seconds) = program_totals(&before, &after);
    println!();
    println!(
        "per request, same fixed load, one more run: the daemon's own CPU {:.1} µs (userspace and the kernel work of its syscalls), the capture programs {:.1} µs in the kernel ({:.1} runs of {:.0} ns, per socket operation of every process with the syscall capture, per TCP segment of the target with the cgroup capture)",
        daemon_cpu * 1e6 / requests.max(1.0),
        seconds * 1e6 / requests.max(1.0),
        runs / requests.max(1.0),
        seconds * 1e9 / runs.max(1.0),
    );
    Ok(())
}

/// `--profile`: the daemon's own CPU per request under one fixed load (half the saturation
/// rate) with payload capture off and on, then `perf record` of the daemon during one more
/// run with capture on, and the functions it spends most of its time in.
pub(crate) fn profile(seconds: u64, connections: usize, capture: &Probes) -> Result<()> {
    let duration = Duration::from_secs(seconds);
    let pg = PgCluster::start()?;
    let backend = DemoBackend::start(&pg.url(), free_port()?)?;
    load(&backend, connections, Duration::from_secs(2), None)?;
    let rate =
        (load(&backend, connections, Duration::from_secs(3), None)?.per_second / 2.0).round();
    println!("## the daemon's own CPU per request: {rate} requests/s on {connections} connections, {seconds} s per run");
    println!();
    println!("| payload_bytes | requests | daemon CPU, s | per request, µs | capture programs per request (kernel BPF statistics) |");
    println!("|---|---|---|---|---|");
    for payload_bytes in [0, capture.payload_bytes] {
        let daemon = daemon_for(&backend, payload_bytes, capture)?;
        let before = daemon
            .metric("selfheal_daemon_cpu_seconds_total")?
            .unwrap_or(0.0);
        let mut served = None;
        let (stats_before, stats_after) = with_program_stats(&daemon, || {
            served = Some(load(&backend, connections, duration, Some(rate))?);
            Ok(())
        })?;
        let requests = served.map_or(0, |s| s.requests).max(1) as f64;
        let cpu = daemon
            .metric("selfheal_daemon_cpu_seconds_total")?
            .unwrap_or(0.0)
            - before;
        let (runs, seconds) = program_totals(&stats_before, &stats_after);
        println!(
            "| {payload_bytes} | {requests} | {cpu:.3} | {:.1} | {:.1} µs: {:.1} runs of {:.0} ns |",
            cpu * 1e6 / requests,
            seconds * 1e6 / requests,
            runs / requests,
            seconds * 1e9 / runs.max(1.0),
        );
        for (program, (b, a)) in PROGRAMS.iter().zip(stats_before.iter().zip(&stats_after)) {
            let runs = a.0 - b.0;
            if runs > 0.0 {
                println!(
                    "|   `{program}` | | | | {:.1} runs of {:.0} ns |",
                    runs / requests,
                    (a.1 - b.1) * 1e9 / runs
                );
            }
        }
    }
    let daemon = daemon_for(&backend, capture.payload_bytes, capture)?;
    let data = std::env::temp_dir().join(format!("selfheal-overhead-{}.perf", std::process::id()));
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "1999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &daemon.proc.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf record (is perf installed?)")?;
    load(&backend, connections, duration, Some(rate))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(perf.id()).unwrap_or(0)),
        nix::sys::signal::Signal::SIGINT,
    )
    .context("stop perf")?;
    perf.wait().context("perf record")?;
    println!();
    println!("## where the daemon's time goes with capture on (perf, self time, ≥ 0.5 %)");
    println!();
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "comm,sym",
            "--percent-limit",
            "0.5",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("perf report")?;
    let text = String::from_utf8_lossy(&report.stdout);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        println!("    {line}");
    }
    println!();
    println!(
        "perf data: {} (perf report -i … for call graphs)",
        data.display()
    );
    Ok(())
}
