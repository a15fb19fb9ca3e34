//! `cargo xtask fuzz --seconds N`: runs each libFuzzer target of the protocol parsers for N
//! seconds and prints executions and coverage.
//!
//! The targets live in `selfheal-daemon/fuzz` (the cargo-fuzz layout, a workspace of its own);
//! they need nightly (sanitizer flags) and `cargo-fuzz`, which is installed when missing. Each
//! run reads the committed seeds (`fuzz/seeds/<target>`, read-only) and grows a local corpus
//! (`fuzz/corpus/<target>`, ignored by git); a crash leaves its input in `fuzz/artifacts/`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

/// The fuzz targets, one per parser plus the label makers.
const TARGETS: &[&str] = &["http", "postgres", "labels"];

/// What libFuzzer reported at the end of one run.
#[derive(Debug, Default)]
struct Outcome {
    runs: u64,
    execs_per_sec: u64,
    coverage: u64,
    features: u64,
    corpus: String,
    new_units: u64,
    peak_rss_mb: u64,
}

pub(crate) fn run(seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let dir = crate::root().join("selfheal-daemon/fuzz");
    let mut outcomes = Vec::new();
    for target in TARGETS {
        println!("==> fuzz {target} for {seconds} s");
        let started = Instant::now();
        let outcome = fuzz_one(&dir, target, seconds)?;
        println!(
            "==> fuzz {target}: {} runs, {} exec/s, cov {}, corpus {} in {:.0} s",
            outcome.runs,
            outcome.execs_per_sec,
            outcome.coverage,
            outcome.corpus,
            started.elapsed().as_secs_f64()
        );
        outcomes.push((*target, outcome));
    }
    println!();
    println!("| target | runs | exec/s | cov (edges) | features | corpus (units/bytes) | new units | peak RSS MB |");
    println!("|---|---|---|---|---|---|---|---|");
    for (target, o) in &outcomes {
        println!(
            "| {target} | {} | {} | {} | {} | {} | {} | {} |",
            o.runs, o.execs_per_sec, o.coverage, o.features, o.corpus, o.new_units, o.peak_rss_mb
        );
    }
    Ok(())
}

/// Installs `cargo-fuzz` unless `cargo fuzz` already answers.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return Ok(());
    }
    let mut install = Command::new("cargo");
    install.args(["install", "cargo-fuzz", "--locked"]);
    crate::step("install cargo-fuzz", install)
}

fn fuzz_one(dir: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = dir.join("seeds").join(target);
    let dict = dir.join("dicts").join(format!("{target}.dict"));
    // The rustup proxy picks nightly; the sanitizer flags need it.
    let output = Command::new("cargo")
        .current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-dict={}", dict.display()))
        .args(["-max_len=8192", "-print_final_stats=1"])
        .stdout(Stdio::inherit())
        .output()
        .context("cannot run cargo fuzz")?;
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        bail!(
            "fuzz target {target} failed ({}); its input is under {}",
            output.status,
            dir.join("artifacts").join(target).display()
        );
    }
    Ok(parse_outcome(&log))
}

/// Reads libFuzzer's last status line (`#N DONE cov: … ft: … corp: …`) and final stats.
fn parse_outcome(log: &str) -> Outcome {
    let mut outcome = Outcome::default();
    let field = |line: &str, name: &str| -> Option<String> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next().map(str::to_owned)
    };
    if let Some(done) = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && (l.contains("DONE") || l.contains("cov:")))
    {
        outcome.coverage = field(done, "cov:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        outcome.features = field(done, "ft:").and_then(|v| v.parse().ok()).unwrap_or(0);
        outcome.corpus = field(done, "corp:").unwrap_or_default();
    }
    for line in log.lines() {
        let Some((name, value)) = line.strip_prefix("stat::").and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let value = value.trim().parse().unwrap_or(0);
        match name {
            "number_of_executed_units" => outcome.runs = value,
            "average_exec_per_sec" => outcome.execs_per_sec = value,
            "new_units_added" => outcome.new_units = value,
            "peak_rss_mb" => outcome.peak_rss_mb = value,
            _ => {}
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_is_read() {
        let log = "#2\tINITED cov: 10 ft: 11 corp: 3/99b exec/s: 0 rss: 30Mb\n\
                   #524288\tpulse  cov: 900 ft: 2000 corp: 300/20Kb exec/s: 40000 rss: 60Mb\n\
                   #1200000\tDONE   cov: 950 ft: 2100 corp: 320/22Kb lim: 4096 exec/s: 40000 rss: 61Mb\n\
                   Done 1200000 runs in 30 second(s)\n\
                   stat::number_of_executed_units: 1200000\n\
                   stat::average_exec_per_sec:     40000\n\
                   stat::new_units_added:          317\n\
                   stat::slowest_unit_time_sec:    0\n\
                   stat::peak_rss_mb:              61\n";
        let outcome = parse_outcome(log);
        assert_eq!(outcome.runs, 1_200_000);
        assert_eq!(outcome.execs_per_sec, 40_000);
        assert_eq!((outcome.coverage, outcome.features), (950, 2100));
        assert_eq!(outcome.corpus, "320/22Kb");
        assert_eq!((outcome.new_units, outcome.peak_rss_mb), (317, 61));
    }
}
