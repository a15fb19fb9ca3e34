//! (a) SIGKILL the demo backend: the daemon reports the exit, with its signal, through the API
//! and `/metrics`, and follows the backend when it comes back with a new pid.

use std::time::Duration;

use nix::sys::signal::Signal;
use selfheal_e2e::{
    free_port, monotonic_ns, require_root, sample, wait_for, Daemon, DemoBackend, PgCluster,
};

#[test]
fn sigkill_of_the_backend_is_seen_with_its_signal_and_the_restart_is_followed() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let mut daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n[monitor]\ninterval_ms = 500\n",
        backend.selector()
    ))
    .expect("daemon");

    let pid = backend.proc.pid();
    daemon.wait_for_target(pid).expect("target found");
    assert_eq!(
        daemon.health().expect("health")["probes"]["ebpf"],
        "attached"
    );

    let killed_at = monotonic_ns();
    backend.proc.signal(Signal::SIGKILL).expect("kill");
    let exit = daemon.wait_for_exit(pid).expect("exit reported");
    assert_eq!(exit["reason"], "SIGKILL", "{exit}");
    assert_eq!(exit["signal"], 9, "{exit}");
    assert_eq!(exit["source"], "ebpf", "the kernel probe saw it: {exit}");
    let observed = exit["observed_monotonic_ns"]
        .as_u64()
        .expect("observed time");
    let latency_ms = observed.saturating_sub(killed_at) as f64 / 1e6;
    println!("crash detection latency (kill -> event in the daemon): {latency_ms:.3} ms");
    assert!(observed >= killed_at, "the event cannot precede the kill");

    let metrics = daemon.metrics().expect("metrics");
    assert_eq!(
        sample(
            &metrics,
            "selfheal_target_process_exits_total{reason=\"SIGKILL\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "selfheal_target_up"), Some(0.0));
    let health = daemon.health().expect("health");
    assert_eq!(health["status"], "critical");
    assert_eq!(health["target"]["state"], "down");

    // The backend comes back (as a supervisor would restart it): the daemon follows it.
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend again");
    let new_pid = backend.proc.pid();
    assert_ne!(new_pid, pid);
    wait_for(
        "the daemon to follow the restart",
        Duration::from_secs(10),
        || {
            let health = daemon.health().ok()?;
            (health["target"]["pid"] == new_pid && health["target"]["restarts"] == 1).then_some(())
        },
    )
    .expect("restart followed");
    wait_for(
        "the target.exited alert to clear",
        Duration::from_secs(10),
        || {
            let metrics = daemon.metrics().ok()?;
            let health = daemon.health().ok()?;
            (sample(&metrics, "selfheal_target_restarts_total") == Some(1.0)
                && sample(&metrics, "selfheal_target_up") == Some(1.0)
                && health["alerts"].as_array().is_some_and(Vec::is_empty))
            .then_some(())
        },
    )
    .expect("alert cleared and metrics updated");

    // A normal exit is told apart from a signal.
    let pid = backend.proc.pid();
    backend
        .fault("crash?mode=exit&code=3")
        .expect("crash switch");
    let exit = daemon.wait_for_exit(pid).expect("exit reported");
    assert_eq!(exit["reason"], "exited", "{exit}");
    assert_eq!(exit["code"], 3, "{exit}");

    // SIGTERM stops the daemon cleanly: exit status 0, promptly.
    daemon.proc.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = daemon
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("the daemon stops within 5 s");
    assert!(status.success(), "clean shutdown exits 0: {status}");
}
