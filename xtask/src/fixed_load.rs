//! `cargo xtask bench fixed-load`: the target's latency under a fixed load without the daemon
//! and with it in several configurations, all in every round (in an order shuffled from round
//! to round), so that this VM's drift lands on every condition alike and one invocation
//! compares them.
//!
//! Per condition: the p99 of every request of its runs pooled, that p99's ratio to the runs
//! without the daemon with a bootstrap interval over the rounds (how far the ratio moves when
//! other rounds had been drawn: this machine's noise on it), the median over rounds of each
//! round's ratio with its own bootstrap interval, and the daemon's CPU per request — to tell
//! whether the p99 follows the daemon's work. With more than one configuration, each later
//! one is also compared with the first in the same way.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use selfheal_e2e::{free_port, DemoBackend, PgCluster};

use crate::overhead::{daemon_for, load, load_beside, median, pooled_quantile_us, Load, Probes};

/// A daemon configuration under test: its `[probes]` lines, and the `selfheal` binary to run
/// (another build, say the parent commit's, to compare two versions in one invocation).
struct Condition {
    probes: Probes,
    binary: Option<PathBuf>,
}

/// A daemon configuration under test: `[probes]` lines separated by `;`
/// (`payload_bytes = 256; shed_below_idle_percent = 100`), and optionally `binary = PATH`.
fn probes(condition: &str) -> Result<Condition> {
    let mut probes = Probes {
        capture: "cgroup".to_owned(),
        payload_bytes: 256,
        set: Vec::new(),
    };
    let mut binary = None;
    for line in condition
        .split(';')
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("`{line}` is not `key = value`"))?;
        match key.trim() {
            "payload_bytes" => {
                probes.payload_bytes = value
                    .trim()
                    .parse()
                    .with_context(|| format!("payload_bytes in `{condition}`"))?;
            }
            "capture" => value
                .trim()
                .trim_matches('"')
                .clone_into(&mut probes.capture),
            "binary" => {
                let path = PathBuf::from(value.trim().trim_matches('"'));
                let path = path
                    .canonicalize()
                    .with_context(|| format!("binary in `{condition}`: {}", path.display()))?;
                anyhow::ensure!(
                    path.is_file(),
                    "binary in `{condition}`: {} is not a file",
                    path.display()
                );
                binary = Some(path);
            }
            _ => probes.set.push(line.to_owned()),
        }
    }
    Ok(Condition { probes, binary })
}

/// One run of a condition: the load's figures and the daemon's CPU per request (0 without).
#[derive(Clone)]
struct Run {
    load: Load,
    daemon_us_per_request: f64,
}

fn run_once(
    backend: &DemoBackend,
    condition: Option<&Condition>,
    connections: usize,
    duration: Duration,
    rate: f64,
) -> Result<Run> {
    let Some(Condition { probes, binary }) = condition else {
        let load = load(backend, connections, duration, Some(rate)).context("load without")?;
        return Ok(Run {
            load,
            daemon_us_per_request: 0.0,
        });
    };
    // `selfheal_e2e::bin` reads it when the daemon starts (this process starts one at a time).
    let before = std::env::var_os("SELFHEAL_BIN");
    if let Some(path) = binary {
        std::env::set_var("SELFHEAL_BIN", path);
    }
    let daemon = daemon_for(backend, probes.payload_bytes, probes);
    match before {
        Some(path) => std::env::set_var("SELFHEAL_BIN", path),
        None => std::env::remove_var("SELFHEAL_BIN"),
    }
    let daemon = daemon?;
    let (load, daemon_seconds) = load_beside(&daemon, backend, connections, duration, Some(rate))?;
    let daemon_us_per_request = daemon_seconds * 1e6 / load.requests.max(1) as f64;
    Ok(Run {
        load,
        daemon_us_per_request,
    })
}

/// The runs of even rounds and those of odd ones, as many of each (an odd last round is
/// left out).
fn halves(runs: &[Run]) -> (Vec<Run>, Vec<Run>) {
    let pairs = runs.chunks_exact(2);
    (
        pairs.clone().map(|pair| pair[0].clone()).collect(),
        pairs.map(|pair| pair[1].clone()).collect(),
    )
}

/// xorshift64*: enough randomness to draw rounds for the bootstrap, no dependency.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// The 5th and 95th percentiles of the pooled p99 ratio `with / without` over `resamples`
/// draws of the rounds with replacement (a round's runs are drawn together, so that what the
/// VM did in that round stays paired).
fn bootstrap(without: &[Run], with: &[Run], resamples: usize) -> (f64, f64) {
    let pooled_p99_us = |runs: &[Run], picked: &[usize]| {
        pooled_quantile_us(picked.iter().map(|&i| &runs[i].load), 0.99)
    };
    let rounds = without.len().min(with.len());
    let mut draw = Draw(0x9E37_79B9_7F4A_7C15);
    let ratios: Vec<f64> = (0..resamples)
        .map(|_| {
            let picked: Vec<usize> = (0..rounds).map(|_| draw.below(rounds)).collect();
            pooled_p99_us(with, &picked) / pooled_p99_us(without, &picked)
        })
        .collect();
    interval(ratios)
}

/// The 5th and 95th percentiles of a bootstrap's resampled statistics.
fn interval(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.05), at(0.95))
}

/// The median of per-round p99 ratios `with / without` (the same round's runs paired), and
/// its 5th and 95th percentiles over `resamples` draws of the rounds with replacement. A
/// disturbed stretch of the VM moves a median little, where it wrecks a pooled p99.
fn per_round_median(without: &[Run], with: &[Run], resamples: usize) -> (f64, f64, f64) {
    let ratios: Vec<f64> = with
        .iter()
        .zip(without)
        .map(|(w, wo)| w.load.p99_ms / wo.load.p99_ms)
        .collect();
    let mut draw = Draw(0x5851_F42D_4C95_7F2D);
    let medians: Vec<f64> = (0..resamples)
        .map(|_| {
            median(
                (0..ratios.len())
                    .map(|_| ratios[draw.below(ratios.len())])
                    .collect(),
            )
        })
        .collect();
    let (low, high) = interval(medians);
    (median(ratios), low, high)
}

pub(crate) fn run(
    seconds: u64,
    connections: usize,
    rounds: usize,
    rate: Option<f64>,
    conditions: &[String],
) -> Result<()> {
    anyhow::ensure!(rounds >= 2, "--rounds must be at least 2");
    let defaults = [
        "payload_bytes = 0".to_owned(),
        "payload_bytes = 256".to_owned(),
    ];
    let conditions = if conditions.is_empty() {
        &defaults[..]
    } else {
        conditions
    };
    let parsed = conditions
        .iter()
        .map(|c| probes(c))
        .collect::<Result<Vec<_>>>()?;
    let duration = Duration::from_secs(seconds);
    let pg = PgCluster::start()?;
    let backend = DemoBackend::start(&pg.url(), free_port()?)?;
    let saturation = load(&backend, connections, Duration::from_secs(3), None)?;
    let rate = rate.unwrap_or((saturation.per_second / 2.0).round());
    anyhow::ensure!(
        rate >= 1.0 && rate.is_finite(),
        "the fixed load's rate must be at least 1 request/s (saturation read {:.0})",
        saturation.per_second
    );
    let names: Vec<String> = std::iter::once("without daemon".to_owned())
        .chain(conditions.iter().map(|c| format!("daemon, {c}")))
        .collect();
    println!("## the target under a fixed load: {rate} requests/s on {connections} keep-alive connections (saturation read {:.0} requests/s), {seconds} s per run, {rounds} rounds, every condition once per round in a shuffled order", saturation.per_second);
    println!("| round | condition | p50 ms | p99 ms | daemon CPU µs per request | machine CPU µs per request |");
    println!("|---|---|---|---|---|---|");
    let mut runs: Vec<Vec<Run>> = names.iter().map(|_| Vec::new()).collect();
    let mut draw = Draw(0x2545_F491_4F6C_DD1D);
    for round in 0..rounds {
        // A fresh order each round, so that no condition keeps following the same one (what a
        // run leaves behind, say a daemon's exit, would otherwise land on one condition).
        let mut order: Vec<usize> = (0..names.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, draw.below(i + 1));
        }
        for condition in order {
            let daemon = condition.checked_sub(1).map(|i| &parsed[i]);
            let run = run_once(&backend, daemon, connections, duration, rate)
                .with_context(|| format!("round {round}, {}", names[condition]))?;
            anyhow::ensure!(
                run.load.errors == 0,
                "{} requests failed in round {round} ({}): the comparison would not hold",
                run.load.errors,
                names[condition]
            );
            println!(
                "| {round} | {} | {:.2} | {:.2} | {:.1} | {:.1} |",
                names[condition],
                run.load.p50_ms,
                run.load.p99_ms,
                run.daemon_us_per_request,
                run.load.cpu_us_per_request
            );
            runs[condition].push(run);
        }
    }
    println!();
    println!("| condition | daemon CPU µs per request (median) | p50 ms (median) | p99 ms pooled | pooled p99 / without | 90 % bootstrap interval | median of per-round p99 ratios | its 90 % bootstrap interval |");
    println!("|---|---|---|---|---|---|---|---|");
    let without = &runs[0];
    for (index, (name, with)) in names.iter().zip(&runs).enumerate() {
        let pooled = pooled_quantile_us(with.iter().map(|r| &r.load), 0.99);
        if index == 0 {
            // The same comparison between two halves of the runs without the daemon (even
            // rounds against odd ones): what this machine's noise alone reads.
            let (even, odd) = halves(without);
            let ratio = pooled_quantile_us(odd.iter().map(|r| &r.load), 0.99)
                / pooled_quantile_us(even.iter().map(|r| &r.load), 0.99);
            let (low, high) = bootstrap(&even, &odd, 400);
            // Paired as round 2k+1 against round 2k: neighbours, not the same round, so this
            // reads somewhat more noise than a same-round pair carries.
            let (aa, aa_low, aa_high) = per_round_median(&even, &odd, 400);
            println!(
                "| {name} | — | {:.3} | {:.2} | odd / even rounds: {ratio:.3} ({:+.1} %) | {low:.3} – {high:.3} | {aa:.3} (neighbouring rounds) | {aa_low:.3} – {aa_high:.3} |",
                median(with.iter().map(|r| r.load.p50_ms).collect()),
                pooled / 1000.0,
                (ratio - 1.0) * 100.0,
            );
            continue;
        }
        let ratio = pooled / pooled_quantile_us(without.iter().map(|r| &r.load), 0.99);
        let (low, high) = bootstrap(without, with, 400);
        let (per_round, per_round_low, per_round_high) = per_round_median(without, with, 400);
        println!(
            "| {name} | {:.1} | {:.3} | {:.2} | {ratio:.3} ({:+.1} %) | {low:.3} – {high:.3} | {per_round:.3} | {per_round_low:.3} – {per_round_high:.3} |",
            median(with.iter().map(|r| r.daemon_us_per_request).collect()),
            median(with.iter().map(|r| r.load.p50_ms).collect()),
            pooled / 1000.0,
            (ratio - 1.0) * 100.0,
        );
    }
    if names.len() > 2 {
        // What each later configuration adds to the first one's, in the same rounds (say the
        // capture's own cost: `payload_bytes = 256` against `payload_bytes = 0`).
        println!();
        println!("| against {} | pooled p99 ratio | 90 % bootstrap interval | median of per-round p99 ratios | its 90 % bootstrap interval |", names[1]);
        println!("|---|---|---|---|---|");
        let base = &runs[1];
        for (name, with) in names.iter().zip(&runs).skip(2) {
            let ratio = pooled_quantile_us(with.iter().map(|r| &r.load), 0.99)
                / pooled_quantile_us(base.iter().map(|r| &r.load), 0.99);
            let (low, high) = bootstrap(base, with, 400);
            let (per_round, per_round_low, per_round_high) = per_round_median(base, with, 400);
            println!(
                "| {name} | {ratio:.3} ({:+.1} %) | {low:.3} – {high:.3} | {per_round:.3} | {per_round_low:.3} – {per_round_high:.3} |",
                (ratio - 1.0) * 100.0,
            );
        }
    }
    Ok(())
}
