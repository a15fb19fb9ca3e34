//! `cargo xtask setup`: everything the build and the tests need, installed only when missing.
//!
//! Quiet when all is in place (one line). Each missing piece is named; installing needs root.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

/// Debian packages, with what needs them.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker (must match rustc's LLVM 22)"),
    ("libpolly-22-dev", "bpf-linker"),
    ("clang-22", "bpf-linker"),
    ("zlib1g-dev", "bpf-linker"),
    ("libzstd-dev", "bpf-linker"),
    ("libxml2-dev", "bpf-linker"),
    (
        "postgresql",
        "the throwaway PostgreSQL of the demo and the end-to-end tests",
    ),
    (
        "systemd",
        "the private systemd user manager of the systemd end-to-end test",
    ),
    ("dbus-daemon", "the D-Bus session bus of that manager"),
    (
        "docker.io",
        "the private Docker Engine of the container end-to-end test",
    ),
    ("busybox-static", "the root filesystem of that test's image"),
    (
        "redis-server",
        "the Redis of the integration checks' end-to-end test",
    ),
    (
        "chromium",
        "the dashboard's end-to-end test (a real browser)",
    ),
    (
        "fonts-liberation",
        "readable text in that test's screenshots",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn exec(what: &str, command: &mut Command) -> Result<()> {
    println!("setup: {what}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("setup: {what} failed ({status})");
    }
    Ok(())
}

/// Installs what is missing; true when anything was done.
fn install_missing() -> Result<bool> {
    let mut did = false;

    let missing: Vec<_> = PACKAGES
        .iter()
        .filter(|(name, _)| !package_installed(name))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(name, _)| *name).collect();
        for (name, why) in &missing {
            println!("setup: missing package {name} (for {why})");
        }
        if !is_root() {
            bail!(
                "setup: installing {} needs root: run `sudo cargo xtask setup`",
                names.join(", ")
            );
        }
        exec(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        )?;
        exec(
            &format!("apt-get install {}", names.join(" ")),
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&names)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        did = true;
    }

    // playwright-core (which drives that browser) needs Node.js 20 or newer with npm: the
    // machine's own when it has one (Debian 12's nodejs is 18), else Debian's as a start.
    let node_major = || {
        Command::new("node")
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .trim_start_matches('v')
                    .split('.')
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
    };
    let has_npm = || {
        Command::new("npm")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if (node_major().is_none() || !has_npm()) && is_root() {
        exec(
            "install Node.js and npm (Debian's) for the dashboard test",
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "nodejs",
                    "npm",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        did = true;
    }
    if let Some(major) = node_major().filter(|major| *major < 20) {
        println!(
            "setup: Node.js {major} is older than the 20 that playwright-core needs: the dashboard \
             test will fail until a newer Node.js is installed"
        );
    }
    let dashboard = crate::root().join("tests/dashboard");
    if has_npm()
        && !dashboard
            .join("node_modules/playwright-core/package.json")
            .exists()
    {
        exec(
            "install playwright-core for the dashboard's test (npm ci, from package-lock.json)",
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dashboard),
        )?;
        did = true;
    }

    let rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup is missing: install Rust with rustup")?;
    if !rust_src.status.success() {
        exec(
            "install the nightly toolchain with rust-src (the eBPF programs need it)",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
        )?;
        did = true;
    } else if !String::from_utf8_lossy(&rust_src.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        exec(
            "add rust-src to nightly",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
        did = true;
    }

    let linker = Command::new("bpf-linker").arg("--version").output();
    let linker_ok =
        linker.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        exec(
            &format!(
                "build bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute, once)"
            ),
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
        )?;
        did = true;
    }

    if !Path::new("/sys/kernel/tracing/events").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        if is_root() {
            exec(
                "mount tracefs",
                Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]),
            )?;
            did = true;
        } else {
            println!("setup: tracefs is not mounted; the daemon mounts it when run as root");
        }
    }
    Ok(did)
}

pub(crate) fn run() -> Result<()> {
    if !install_missing()? {
        println!("setup: everything is in place");
    }
    Ok(())
}
