//! `cargo xtask test`: every check CI runs, in order, stopping at the first failure.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::{build_binaries, cargo, setup, step};

pub(crate) fn run() -> Result<()> {
    setup::run()?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    step("cargo fmt --check", fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--quiet",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    step("cargo clippy -D warnings", clippy)?;
    let root = nix::unistd::Uid::effective().is_root();
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--exclude", "selfheal-e2e"]);
    if root {
        // The unit tests that need the daemon's privileges (loading eBPF programs, leaving
        // SCHED_IDLE) are `#[ignore]`d for a plain `cargo test`; here they run.
        unit.args(["--", "--include-ignored"]);
    }
    step("unit and integration tests", unit)?;

    if !root {
        bail!(
            "the unit tests that need root and the end-to-end tests (which load eBPF programs) \
             did not run: run `sudo cargo xtask test`"
        );
    }
    build_binaries()?;
    let target = crate::root().join("target/debug");
    let mut e2e = cargo();
    e2e.args([
        "test",
        "-p",
        "selfheal-e2e",
        "--",
        "--test-threads=1",
        "--nocapture",
    ])
    .env("SELFHEAL_BIN", target.join("selfheal"))
    .env("DEMO_BACKEND_BIN", target.join("demo-backend"));
    step("end-to-end tests (root, one at a time)", e2e)?;

    println!("==> demo (runs for 8 s)");
    crate::demo::run(Some(Duration::from_secs(8)))?;
    println!("==> demo: ok");
    println!("all checks passed");
    Ok(())
}
