//! `cargo xtask bench api`: many concurrent clients on the admin API's read endpoints for a
//! bounded time, while the daemon watches the demo backend under light traffic with payload
//! capture on and event streams open. Prints per endpoint the requests, errors and latency,
//! the throughput, and the daemon's memory (RSS) over the run: after a warm-up it must stay
//! flat (bounded views, bounded streams).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use selfheal_e2e::{free_port, Daemon, DemoBackend, KeepAlive, PgCluster, DEMO_PLATFORMS};

/// The read endpoints, as a dashboard and scrapers call them.
const ENDPOINTS: [&str; 17] = [
    "/api/v1/system/health",
    "/api/v1/system/health/detailed",
    "/api/v1/system/dashboard",
    "/api/v1/system/agents",
    "/api/v1/system/alerts",
    "/api/v1/system/metrics?window=5m",
    "/api/v1/system/metrics?window=1h&step=1m",
    "/api/v1/system/queries",
    "/api/v1/system/traces",
    "/api/v1/system/performance",
    "/api/v1/system/predictions",
    "/api/v1/system/security",
    "/api/v1/system/integrations",
    "/api/v1/system/repairs",
    "/api/v1/system/patterns",
    "/api/v1/system/diagnoses",
    "/metrics",
];

/// Event streams held open through the run.
const STREAMS: usize = 8;

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
}

/// Holds an event stream open, reading what comes, until `stop`.
fn hold_stream(
    daemon: &Daemon,
    token: &str,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<u64>> {
    let mut socket = std::net::TcpStream::connect(daemon.admin)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(
        socket,
        "GET /api/v1/system/events HTTP/1.1\r\nHost: selfheal\r\nAuthorization: Bearer {token}\r\n\r\n"
    )?;
    Ok(std::thread::spawn(move || {
        let mut events = 0;
        let mut reader = BufReader::new(socket);
        let mut line = String::new();
        while !stop.load(Ordering::Relaxed) {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => events += u64::from(line.starts_with("event:")),
                Err(_) => {}
            }
        }
        events
    }))
}

pub(crate) fn run(seconds: u64, clients: usize) -> Result<()> {
    let pg = PgCluster::start()?;
    let backend = DemoBackend::start(&pg.url(), free_port()?)?;
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\n\n[probes]\npayload_bytes = 256\n\n[monitor]\ninterval_ms = 1000\n{DEMO_PLATFORMS}",
        backend.selector()
    ))?;
    daemon.wait_for_target(backend.proc.pid())?;
    let token = daemon.token.clone().unwrap_or_default();
    let stop = Arc::new(AtomicBool::new(false));

    // Light traffic to the backend, so the views have routes and queries to show.
    let traffic = {
        let stop = stop.clone();
        let address = backend.address;
        std::thread::spawn(move || -> Result<u64> {
            let mut client = KeepAlive::connect(address)?;
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                for (host, path) in [
                    ("api.tackle.io", "/api/v1/tackle/deals"),
                    ("api.leadsite.ai", "/api/v1/leads"),
                    ("api.videosite.io", "/api/v1/videos"),
                ] {
                    client.get(path, host)?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(sent)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| hold_stream(&daemon, &token, stop.clone()))
        .collect::<Result<_>>()?;

    let pid = daemon.proc.pid();
    let rss_start = rss_kib(pid);
    println!(
        "## admin API under load: {clients} clients for {seconds} s on {} read endpoints, {STREAMS} event streams open, the backend under light traffic with payload capture on",
        ENDPOINTS.len()
    );
    let tallies: Arc<Mutex<BTreeMap<&'static str, Tally>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|k| {
            let tallies = tallies.clone();
            let base = format!("http://{}", daemon.admin);
            let token = token.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                let mut local: BTreeMap<&'static str, Tally> = BTreeMap::new();
                let mut i = k;
                while Instant::now() < deadline {
                    let path = ENDPOINTS[i % ENDPOINTS.len()];
                    i += 1;
                    let begun = Instant::now();
                    let outcome = agent
                        .get(format!("{base}{path}"))
                        .header("Authorization", &format!("Bearer {token}"))
                        .call()
                        .map_err(|e| e.to_string())
                        .and_then(|mut r| {
                            let status = r.status().as_u16();
                            let body = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
                            if status == 200 {
                                Ok(())
                            } else {
                                Err(format!("{status}: {body}"))
                            }
                        });
                    let tally = local.entry(path).or_default();
                    tally
                        .latencies_us
                        .push(u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX));
                    if let Err(error) = outcome {
                        tally.errors += 1;
                        tally.first_error.get_or_insert(error);
                    }
                }
                let mut all = tallies
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (path, tally) in local {
                    let entry = all.entry(path).or_default();
                    entry.latencies_us.extend(tally.latencies_us);
                    entry.errors += tally.errors;
                    if entry.first_error.is_none() {
                        entry.first_error = tally.first_error;
                    }
                }
            })
        })
        .collect();
    // The daemon's memory, once a second.
    let mut rss = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(rss_kib(pid));
    }
    for worker in workers {
        let _ = worker.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let events: u64 = streams.into_iter().map(|s| s.join().unwrap_or(0)).sum();
    let sent = traffic.join().map_or(Ok(0), |r| r)?;

    let tallies = tallies
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    println!("| endpoint | requests | errors | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    let (mut total, mut errors) = (0, 0);
    for (path, tally) in tallies.iter() {
        let mut sorted = tally.latencies_us.clone();
        sorted.sort_unstable();
        total += sorted.len();
        errors += tally.errors;
        println!(
            "| `{path}` | {} | {} | {:.2} | {:.2} | {:.2} |",
            sorted.len(),
            tally.errors,
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            percentile(&sorted, 1.0)
        );
        if let Some(error) = &tally.first_error {
            println!("|   first error: {error} |");
        }
    }
    let warm = rss.get(rss.len() / 4).copied().unwrap_or(rss_start);
    let end = rss.last().copied().unwrap_or(rss_start);
    let max = rss.iter().copied().max().unwrap_or(rss_start);
    println!(
        "\n{total} requests in {elapsed:.1} s: {:.0} requests/s, {errors} errors; {events} events delivered to {STREAMS} streams; {sent} backend requests alongside",
        total as f64 / elapsed
    );
    println!(
        "daemon RSS: {:.1} MiB before the load, {:.1} MiB after a quarter of it, {:.1} MiB at the end (max {:.1} MiB): {:+.1} MiB over the last three quarters",
        rss_start as f64 / 1024.0,
        warm as f64 / 1024.0,
        end as f64 / 1024.0,
        max as f64 / 1024.0,
        (end as f64 - warm as f64) / 1024.0
    );
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
