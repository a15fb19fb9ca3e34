//! The target selected by a real cgroup, watched without eBPF (`probes.ebpf = false`): the
//! cgroup's memory limit, usage and CPU throttling reach `/metrics`, the monitor raises and
//! clears a memory alert, and a kill is still seen, through the pidfd.

use std::time::Duration;

use nix::sys::signal::Signal;
use selfheal_e2e::{
    free_port, require_root, sample, wait_for, Daemon, DemoBackend, PgCluster, V1Cgroup,
};

const LIMIT: u64 = 256 << 20;

/// The backend in a v1 cgroup pair with a memory limit and a 20 % CPU quota.
fn limited_cgroup(pid: u32) -> V1Cgroup {
    let cgroup = V1Cgroup::create("cg", pid).expect("v1 cgroup");
    let memory = cgroup.dir("memory");
    let cpu = cgroup.dir("cpu");
    std::fs::write(memory.join("memory.limit_in_bytes"), LIMIT.to_string()).expect("memory limit");
    std::fs::write(cpu.join("cpu.cfs_period_us"), "100000").expect("cfs period");
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "20000").expect("20 % CPU quota");
    cgroup
}

#[test]
fn a_cgroup_target_without_ebpf_reports_limits_throttling_alerts_and_exits() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    let cgroup = limited_cgroup(backend.proc.pid());
    let daemon = Daemon::start(&format!(
        "[target]\ncgroup = \"{}\"\npoll_interval_ms = 100\n\n[probes]\nebpf = false\n\n\
         [monitor]\ninterval_ms = 300\nmemory_threshold_percent = 30.0\nconsecutive_samples = 2\n",
        cgroup.dir("memory").display()
    ))
    .expect("daemon");
    let pid = backend.proc.pid();
    let health = daemon.wait_for_target(pid).expect("cgroup resolved");
    assert!(
        health["probes"]["ebpf"]
            .as_str()
            .is_some_and(|s| s.starts_with("disabled")),
        "{health}"
    );

    // Usage starts near 0: v1 does not move a process's existing charges with it.
    wait_for(
        "the cgroup's memory limit in /metrics",
        Duration::from_secs(10),
        || {
            let text = daemon.metrics().ok()?;
            (sample(&text, "selfheal_target_cgroup_memory_limit_bytes") == Some(LIMIT as f64))
                .then_some(())
        },
    )
    .expect("memory limit exported");

    let fault = |switch: &str| backend.fault(switch).expect("fault switch");
    fault("spin?threads=1");
    let throttled = wait_for(
        "CPU throttling of the cgroup",
        Duration::from_secs(10),
        || {
            daemon
                .metric("selfheal_target_cgroup_cpu_throttled_periods_total")
                .ok()?
                .filter(|v| *v > 0.0)
        },
    )
    .expect("throttling exported");
    println!("throttled periods seen: {throttled}");
    fault("clear");

    // 30 % of 256 MiB is ~77 MiB: a 40 MB/s leak crosses it in about two seconds.
    fault("leak?mb_per_sec=40");
    wait_for("the memory alert", Duration::from_secs(20), || {
        let alerts = daemon.health().ok()?["alerts"].clone();
        alerts
            .as_array()?
            .iter()
            .any(|a| a["rule"] == "target.memory_high" && a["severity"] == "warning")
            .then_some(())
    })
    .expect("memory alert fired");
    assert_eq!(daemon.health().expect("health")["status"], "degraded");
    let usage = daemon
        .metric("selfheal_target_cgroup_memory_usage_bytes")
        .expect("metrics")
        .unwrap_or(0.0);
    assert!(
        usage > 0.3 * LIMIT as f64,
        "the leak is charged to the cgroup: {usage}"
    );
    fault("clear");
    wait_for("the memory alert to clear", Duration::from_secs(20), || {
        let health = daemon.health().ok()?;
        (health["alerts"].as_array()?.is_empty() && health["status"] == "healthy").then_some(())
    })
    .expect("memory alert cleared");

    backend.proc.signal(Signal::SIGKILL).expect("kill");
    let exit = daemon.wait_for_exit(pid).expect("exit reported");
    assert_eq!(exit["source"], "procfs", "{exit}");
    assert_eq!(
        exit["reason"], "unknown",
        "without eBPF the status is not known: {exit}"
    );
    assert_eq!(
        daemon
            .metric("selfheal_target_process_exits_total{reason=\"unknown\"}")
            .expect("metrics"),
        Some(1.0)
    );
}
