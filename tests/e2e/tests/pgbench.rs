//! `pgbench -S` as the target: the daemon's count and mean latency for its SELECT agree with
//! pgbench's own report (and the count with `pg_stat_statements`), over TCP and over the
//! Unix socket.

use std::{process::Command, time::Duration};

use selfheal_daemon::protocols::fingerprint::fingerprint;
use selfheal_e2e::{
    json_f64, openmetrics, require_root, wait_for, wait_stable, Daemon, OwnCgroup, PgCluster,
    PgOptions, Proc,
};

const CLIENTS: u32 = 2;
const SECONDS: u32 = 10;
/// pgbench's rate limit (transactions per second, all clients): exactness is what this test
/// is about, and unthrottled pgbench on a 2-core VM with a debug daemon can outrun the decoder,
/// which then sheds connections (by design, counted as `reason="shed"`) rather than fall
/// behind. For the same reason the daemon does not shed for the host's load here
/// (`shed_below_idle_percent = 0`): pgbench and PostgreSQL may leave no CPU idle.
const RATE: u32 = 3000;
/// The statement of pgbench's built-in select-only script, after `:aid` is substituted (the
/// default simple-query mode sends the value as a literal).
const SELECT_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 1;";
/// How `pg_stat_statements` keeps it (literals become `$n`).
const SELECT_PGSS: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// pgbench's summary.
#[derive(Debug)]
struct PgbenchReport {
    processed: u64,
    failed: u64,
    /// Measured per transaction (pgbench measures them when `-P` is given; without it the
    /// "average" is derived from the duration).
    latency_avg_ms: f64,
    /// The average wait for a transaction's scheduled start under `-R`, which
    /// `latency_avg_ms` includes.
    lag_avg_ms: f64,
    /// Without the initial connection time.
    tps: f64,
}

/// The first number in `value`.
fn first_number_of(value: &str) -> f64 {
    value
        .trim()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a number: {value:?}"))
}

fn parse_report(text: &str) -> PgbenchReport {
    let field = |prefix: &str| -> &str {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in pgbench's report:\n{text}"))
            .trim()
    };
    let first_number = |value: &str| -> f64 {
        value
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a number: {value:?}"))
    };
    PgbenchReport {
        processed: first_number(field("number of transactions actually processed:")) as u64,
        failed: first_number(field("number of failed transactions:")) as u64,
        latency_avg_ms: first_number(field("latency average =")),
        // With `-R`, the latency average includes the wait for each transaction's scheduled
        // start: `rate limit schedule lag: avg 0.012 (max 1.234) ms`.
        lag_avg_ms: text
            .lines()
            .find_map(|l| l.strip_prefix("rate limit schedule lag: avg"))
            .map_or(0.0, first_number_of),
        tps: first_number(field("tps =")),
    }
}

fn pgbench_setup(pg: &PgCluster) {
    let output = Command::new(pg.program("pgbench"))
        .args(["-i", "-q", "-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", "postgres", "postgres"])
        .output()
        .expect("pgbench -i");
    assert!(
        output.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The daemon's entry for pgbench's SELECT: (count, mean ms, p95 ms).
fn select_entry(daemon: &Daemon, expected: &str) -> Option<(u64, f64, f64)> {
    let data = daemon.api("/api/v1/system/queries").ok()?;
    let entry = data["queries"]
        .as_array()?
        .iter()
        .find(|q| q["fingerprint"] == expected)?
        .clone();
    Some((
        entry["count"].as_u64()?,
        json_f64(&entry["mean_ms"], "mean_ms"),
        json_f64(&entry["p95_ms"], "p95_ms"),
    ))
}

/// Runs `pgbench -S` against `host` (an address, or the socket directory) in a cgroup of its
/// own, with the daemon started first and watching it with `capture` (`probes.capture`), and
/// compares.
fn check_pgbench(pg: &PgCluster, host: &str, capture: &str) {
    pgbench_setup(pg);
    // pgbench's first connection reads the scale from pgbench_branches: while this lock is
    // held it waits there, so the daemon can find it and attach before any benchmark
    // connection opens or any SELECT runs.
    let lock = pg.lock_table("pgbench_branches").expect("lock");

    let port = pg.port.to_string();
    let (clients, seconds, rate) = (CLIENTS.to_string(), SECONDS.to_string(), RATE.to_string());
    let args = [
        "-n", "-S", "-c", &clients, "-T", &seconds, "-R", &rate, "-P", &seconds, "-h", host, "-p",
        &port,
    ];
    // A unique piece of its command line (the binary's path comes before it).
    let selector = format!("pgbench {}", args.join(" "));
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{selector}\"\npoll_interval_ms = 100\n\n\
         [probes]\npayload_bytes = 512\ncapture = \"{capture}\"\nshed_below_idle_percent = 0\n"
    ))
    .expect("daemon");

    let out = tempfile::Builder::new()
        .prefix("pgbench-")
        .tempdir()
        .expect("tempdir");
    let report_path = out.path().join("report.txt");
    let mut command = Command::new(pg.program("pgbench"));
    command
        .args(args)
        .args(["-U", "postgres", "postgres"])
        .stdout(std::fs::File::create(&report_path).expect("report file"));
    let cgroup = OwnCgroup::create("pgbench").expect("a cgroup for pgbench");
    cgroup.place(&mut command).expect("pgbench in its cgroup");
    let mut pgbench =
        Proc::spawn_logged("pgbench", command, &out.path().join("pgbench.log")).expect("pgbench");
    daemon
        .wait_for_target(pgbench.pid())
        .expect("the daemon finds pgbench");
    daemon.wait_capturing().expect("capture attached");
    wait_for(
        "pgbench to wait for the lock",
        Duration::from_secs(10),
        || {
            (pg.psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'pgbench' AND wait_event_type = 'Lock'",
            )
            .ok()?
                == "1")
                .then_some(())
        },
    )
    .expect("pgbench blocked");
    // Let the filter maps settle, as in payload_capture.rs.
    std::thread::sleep(Duration::from_millis(300));
    pg.psql("SELECT pg_stat_statements_reset()")
        .expect("reset pg_stat_statements");
    lock.release().expect("release the lock");

    let status = pgbench
        .wait_timeout(Duration::from_secs(u64::from(SECONDS) + 30))
        .expect("pgbench ends");
    let text = std::fs::read_to_string(&report_path).expect("report");
    assert!(status.success(), "pgbench failed ({status}):\n{text}");
    println!("{text}");
    let report = parse_report(&text);
    assert_eq!(report.failed, 0, "no failed transactions");
    let server_calls: u64 = pg
        .psql(&format!(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query = '{SELECT_PGSS}'"
        ))
        .expect("pg_stat_statements")
        .parse()
        .expect("calls");

    let expected = fingerprint(SELECT_SQL);
    // The daemon decodes asynchronously: wait until its count stops moving.
    let settled = wait_stable(
        "the daemon's count of pgbench's SELECT",
        Duration::from_secs(30),
        Duration::from_secs(1),
        || {
            select_entry(&daemon, &expected)
                .ok_or_else(|| anyhow::anyhow!("no entry for {expected:?} yet"))
        },
        |(count, _, _)| *count >= server_calls,
    );
    let (count, mean_ms, p95_ms) = settled.unwrap_or_else(|e| {
        panic!(
            "{e}\npg_stat_statements counted {server_calls}, pgbench {}, for {expected:?}\nlosses:\n{}",
            report.processed,
            daemon.losses()
        )
    });
    // pgbench's run time, as it measured it (without the initial connections).
    let run_s = report.processed as f64 / report.tps;
    println!(
        "{host}: pgbench {} transactions, {:.1} tps, latency average {:.4} ms; \
         pg_stat_statements {server_calls} calls; daemon {count} queries ({:.1}/s over pgbench's \
         {run_s:.2} s), mean {mean_ms:.4} ms, p95 {p95_ms:.4} ms\nlosses:\n{}",
        report.processed,
        report.tps,
        report.latency_avg_ms,
        count as f64 / run_s,
        daemon.losses()
    );

    // Count, and so rate over pgbench's run time. The server counted exactly the
    // transactions pgbench reports (one SELECT each), so the daemon must count them all, the
    // last exchange of each connection included: pgbench exits as soon as its last answers
    // are in, and the tracker learns of the exit (through the exit probe, or the pidfd)
    // before the capture task has decoded what the process read last; its connections are
    // closed when the captures reach its exit, which the kernel recorded after them. Nothing
    // was lost on the way: no capture dropped (ring buffer, queue), no query dropped by the
    // decoder. (One answer may be unmatched: that of the scale query on pgbench's first
    // connection, sent before the daemon found the process and answered once the lock above
    // is released; it is not the statement counted here.)
    assert_eq!(
        server_calls, report.processed,
        "pg_stat_statements and pgbench agree"
    );
    let metrics = daemon.metrics().expect("metrics");
    let total = |name: &str, problem: Option<&str>| -> f64 {
        openmetrics::samples(&metrics, name)
            .iter()
            .filter(|s| {
                problem.is_none_or(|p| {
                    s.label("protocol") == Some("postgres") && s.label("problem") == Some(p)
                })
            })
            .map(|s| s.value)
            .sum()
    };
    let lost = (
        total("selfheal_ebpf_ringbuf_drops_total", None),
        total("selfheal_protocol_problems_total", Some("dropped")),
    );
    assert_eq!(
        lost,
        (0.0, 0.0),
        "captures dropped, queries dropped\nlosses:\n{}",
        daemon.losses()
    );
    assert_eq!(
        count,
        server_calls,
        "the daemon counted {count} SELECTs, the server {server_calls}\nlosses:\n{}",
        daemon.losses()
    );

    // Mean latency. pgbench times each transaction in user space around libpq's send and
    // receive; the daemon times the same query between pgbench's send syscall and the recv
    // that brings the answer. The daemon's span lies inside pgbench's, so its mean cannot
    // exceed pgbench's (5 % + 20 µs for pgbench's clock, which it reads lazily once per
    // loop). The difference is pgbench's own work around the two syscalls (libpq buffering,
    // polling both clients' sockets, the script's `\set` random): ~7 % of the latency when
    // measured here with `perf trace`, but at ~0.1 ms per query a few µs of scheduling are
    // tens of percent, so the daemon may read down to 60 % of pgbench's figure, less 20 µs.
    // Without the schedule lag `-R` adds to pgbench's figure (the daemon sees the query when
    // it is sent, after the lag).
    let avg = report.latency_avg_ms - report.lag_avg_ms;
    let (low, high) = (avg * 0.6 - 0.02, avg * 1.05 + 0.02);
    assert!(
        (low..=high).contains(&mean_ms),
        "the daemon's mean {mean_ms:.4} ms is outside {low:.4}..{high:.4} ms \
         (pgbench's latency average {avg:.4} ms)"
    );
}

#[test]
fn pgbench_select_count_and_latency_match_over_tcp() {
    require_root();
    let pg = PgCluster::start_with(PgOptions {
        pg_stat_statements: true,
        ..PgOptions::default()
    })
    .expect("postgres");
    // On the target's own cgroup: pgbench's TCP segments.
    check_pgbench(&pg, "127.0.0.1", "cgroup");
}

#[test]
fn pgbench_select_count_and_latency_match_over_the_unix_socket() {
    require_root();
    let pg = PgCluster::start_with(PgOptions {
        pg_stat_statements: true,
        ..PgOptions::default()
    })
    .expect("postgres");
    let socket_dir = pg.socket_dir().display().to_string();
    // The cgroup capture sees TCP only: a unix-socket client is captured on its syscalls.
    check_pgbench(&pg, &socket_dir, "syscalls");
}
