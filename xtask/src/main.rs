//! `cargo xtask <command>`: the steps cargo alone cannot do.
//!
//! - `setup`: installs what building and testing need (idempotent, quiet when done).
//! - `demo`: the demo backend on a throwaway PostgreSQL, watched by the daemon.
//! - `test`: format, lints, unit tests, then the privileged end-to-end tests and a demo run.
//! - `bench crash-latency`: kill → event latency, eBPF against the pidfd fallback.
//! - `bench healing`: per fault scenario, time to detect, diagnose and recover.
//! - `bench overhead`: what the daemon costs the target and other processes, side by side.
//! - `bench fixed-load`: the target's latency under a fixed load without the daemon and with it
//!   in several configurations, every one in each round.
//! - `bench api`: many concurrent clients on the admin API's read endpoints.
//! - `fuzz --seconds N`: each protocol parser's libFuzzer target for N seconds (nightly).

mod api_load;
mod bench;
mod demo;
mod fixed_load;
mod fuzz;
mod healing;
mod overhead;
mod setup;
mod test;
mod watch_cost;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and system packages the build and tests need.
    Setup,
    /// Run the demo: a throwaway PostgreSQL, the demo backend, and the daemon watching it.
    Demo {
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration_secs: Option<u64>,
    },
    /// Run every check and test: fmt, clippy, unit tests, end-to-end tests (as root), demo.
    Test,
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Fuzz the protocol parsers: each cargo-fuzz target for a while, with its numbers.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Demo { duration_secs } => {
            setup::run()?;
            build_binaries()?;
            demo::run(duration_secs.map(std::time::Duration::from_secs))
        }
        Task::Test => test::run(),
        Task::Bench { bench } => {
            setup::run()?;
            // Benchmarks measure what users run: optimized binaries.
            let mut command = cargo();
            command.args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "selfheal-daemon",
                "-p",
                "demo-backend",
            ]);
            step("build selfheal and demo-backend (release)", command)?;
            selfheal_e2e::use_profile("release");
            bench::run(&bench)
        }
        Task::Fuzz { seconds } => fuzz::run(seconds),
    }
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// `cargo` as invoked by the user (so the same toolchain builds everything).
pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Runs a step, printing its name and how long it took; fails with its name.
pub(crate) fn step(name: &str, mut command: Command) -> Result<()> {
    println!("==> {name}");
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    println!("==> {name}: ok in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds the daemon and the demo backend (debug profile, shared with the tests).
pub(crate) fn build_binaries() -> Result<()> {
    let mut command = cargo();
    command.args([
        "build",
        "--quiet",
        "-p",
        "selfheal-daemon",
        "-p",
        "demo-backend",
    ]);
    step("build selfheal and demo-backend", command)
}
