//! (b) The backend's connections to `PostgreSQL` appear as TCP connect-latency samples.

use std::time::Duration;

use selfheal_e2e::{free_port, require_root, sample, wait_for, Daemon, DemoBackend, PgCluster};

#[test]
fn backend_connections_to_postgres_are_connect_latency_samples() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n",
        backend.selector()
    ))
    .expect("daemon");
    let pid = backend.proc.pid();
    daemon.wait_for_target(pid).expect("target found");
    // Let the filter maps settle before the connections are made.
    std::thread::sleep(Duration::from_millis(200));
    let before = daemon
        .metric("selfheal_tcp_connect_duration_seconds_count")
        .expect("metrics")
        .unwrap_or(0.0);

    // Three new connections, each left idle in a transaction.
    backend.fault("idle_tx?n=3").expect("fault switch");
    let idle = wait_for(
        "three idle-in-transaction sessions",
        Duration::from_secs(10),
        || {
            let n: u32 = pg
                .psql("select count(*) from pg_stat_activity where state = 'idle in transaction'")
                .ok()?
                .parse()
                .ok()?;
            (n >= 3).then_some(n)
        },
    )
    .expect("sessions opened");

    let (count, sum) = wait_for(
        "connect samples in /metrics",
        Duration::from_secs(10),
        || {
            let text = daemon.metrics().ok()?;
            let count = sample(&text, "selfheal_tcp_connect_duration_seconds_count")?;
            let sum = sample(&text, "selfheal_tcp_connect_duration_seconds_sum")?;
            (count - before >= 3.0).then_some((count, sum))
        },
    )
    .expect("connect latency recorded");
    println!(
        "{idle} new sessions; connect samples {before} -> {count}, total {:.3} ms",
        sum * 1e3
    );
    assert!(
        sum > 0.0 && sum / count < 1.0,
        "loopback connects take well under a second: sum {sum} count {count}"
    );

    backend.fault("clear").expect("fault switch");
    wait_for("the closes to be counted", Duration::from_secs(10), || {
        let text = daemon.metrics().ok()?;
        (sample(
            &text,
            "selfheal_tcp_closes_total{how=\"normal\",role=\"client\"}",
        )
        .unwrap_or(0.0)
            + sample(
                &text,
                "selfheal_tcp_closes_total{how=\"abort\",role=\"client\"}",
            )
            .unwrap_or(0.0)
            >= 3.0)
            .then_some(())
    })
    .expect("closes counted");
}
