//! `cargo xtask bench watch-cost`: what watching a systemd unit or a container costs the host
//! while nothing happens — the daemon's own CPU and what it makes the service manager, the
//! bus and the container engine do — against the same idle target without the daemon.

use std::time::Duration;

use anyhow::{Context, Result};
use selfheal_e2e::{docker::DockerEngine, systemd::SystemdUser, wait_for, Daemon};

use crate::overhead::busy_seconds;

/// The host's busy CPU (ms per second) over `seconds`, and the daemon's own share of it when
/// one runs.
fn measure(seconds: u64, daemon: Option<&Daemon>) -> Result<(f64, f64)> {
    let own = || -> Result<f64> {
        Ok(match daemon {
            Some(daemon) => daemon
                .metric("selfheal_daemon_cpu_seconds_total")?
                .unwrap_or(0.0),
            None => 0.0,
        })
    };
    let (busy, own_before) = (busy_seconds()?, own()?);
    std::thread::sleep(Duration::from_secs(seconds));
    let per_second = |s: f64| s * 1000.0 / seconds as f64;
    Ok((
        per_second(busy_seconds()? - busy),
        per_second(own()? - own_before),
    ))
}

/// One row: the host without the daemon, then with it watching `target` (`[target]` lines).
fn row(name: &str, target: &str, pid: u32, seconds: u64, poll_ms: u64) -> Result<()> {
    let (idle, _) = measure(seconds, None)?;
    let daemon = Daemon::start(&format!(
        "[target]\n{target}\npoll_interval_ms = {poll_ms}\n"
    ))?;
    daemon.wait_for_target(pid)?;
    // Start-up work (the first resolution, loading the probes) is not what is measured.
    std::thread::sleep(Duration::from_secs(2));
    let (watched, own) = measure(seconds, Some(&daemon))?;
    drop(daemon);
    println!(
        "| {name} | {idle:.1} | {watched:.1} | {:+.1} | {own:.1} | {:+.1} |",
        watched - idle,
        watched - idle - own
    );
    Ok(())
}

pub(crate) fn run(seconds: u64, poll_ms: u64) -> Result<()> {
    println!("## the host's CPU while the daemon watches an idle target (poll_interval_ms = {poll_ms}, {seconds} s per measurement)");
    println!();
    println!("| target | host busy without the daemon, ms/s | with it, ms/s | added, ms/s | the daemon's own, ms/s | the rest (manager, bus, engine), ms/s |");
    println!("|---|---|---|---|---|---|");

    let unit = "[Service]\nExecStart=/bin/sleep infinity\n";
    let systemd = SystemdUser::start(&[("sleeper.service", unit)]).context("systemd --user")?;
    systemd.unit_job("StartUnit", "sleeper.service")?;
    let pid = wait_for("the unit's main process", Duration::from_secs(10), || {
        systemd
            .main_pid("sleeper.service")
            .ok()
            .filter(|pid| *pid != 0)
    })?;
    row(
        "systemd unit (a user manager's bus)",
        &format!(
            "systemd_unit = \"sleeper.service\"\nsystemd_bus = \"{}\"",
            systemd.bus_address()
        ),
        pid,
        seconds,
        poll_ms,
    )?;
    drop(systemd);

    let engine = DockerEngine::start().context("dockerd")?;
    let name = format!("selfheal-watch-cost-{}", std::process::id());
    let pid = engine.start_sleeper(&name)?;
    row(
        "container (Docker Engine API)",
        &format!(
            "container = \"{name}\"\ndocker_socket = \"{}\"",
            engine.socket().display()
        ),
        pid,
        seconds,
        poll_ms,
    )?;
    Ok(())
}
