//! The backend's socket reads and writes are captured from the kernel: its HTTP requests and
//! responses (server side) and its PostgreSQL traffic (client side), on new connections and
//! on one that was open before the daemon started.

use std::time::Duration;

use selfheal_e2e::{
    free_port, require_root, wait_for, Daemon, DemoBackend, KeepAlive, OwnCgroup, PgCluster,
};

fn events(daemon: &Daemon, direction: &str, role: &str) -> f64 {
    let series =
        format!("selfheal_capture_events_total{{direction=\"{direction}\",role=\"{role}\"}}");
    daemon.metric(&series).expect("metrics").unwrap_or(0.0)
}

#[test]
fn http_and_postgres_traffic_is_captured_including_a_connection_older_than_the_daemon() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    // Opened before the daemon exists: only the procfs seeding can make it visible.
    let mut old = KeepAlive::connect(backend.address).expect("connect");
    assert_eq!(
        old.get("/api/v1/tackle/deals", "api.tackle.io")
            .expect("request"),
        200
    );

    let daemon = Daemon::capturing(&backend, 256, "").expect("daemon capturing the backend");
    let health = daemon.health().expect("health");
    assert_eq!(health["probes"]["ebpf"], "attached", "{health}");

    // The kernel never saw this connection open: its role comes from procfs (the backend's
    // fd → socket inode → an established entry on its listening port), so it counts as the
    // server side like a new connection would.
    let before = (
        events(&daemon, "recv", "server"),
        events(&daemon, "send", "server"),
    );
    assert_eq!(
        old.get("/api/v1/tackle/deals", "api.tackle.io")
            .expect("request"),
        200
    );
    let after = wait_for(
        "the old connection's request and response",
        Duration::from_secs(10),
        || {
            let now = (
                events(&daemon, "recv", "server"),
                events(&daemon, "send", "server"),
            );
            (now.0 > before.0 && now.1 > before.1).then_some(now)
        },
    )
    .expect("captured on the pre-existing connection");
    println!(
        "old connection: recv {} -> {}, send {} -> {}",
        before.0, after.0, before.1, after.1
    );

    // New connections accepted after the daemon started: the server side of ten requests.
    let server_before = (
        events(&daemon, "recv", "server"),
        events(&daemon, "send", "server"),
    );
    for id in 1..=10 {
        let mut fresh = KeepAlive::connect(backend.address).expect("connect");
        let status = fresh
            .get(&format!("/api/v1/leads/{id}"), "api.tackle.io")
            .expect("request");
        assert!(status == 200 || status == 404, "{status}");
    }
    wait_for(
        "ten requests and responses on new connections",
        Duration::from_secs(10),
        || {
            (events(&daemon, "recv", "server") >= server_before.0 + 10.0
                && events(&daemon, "send", "server") >= server_before.1 + 10.0)
                .then_some(())
        },
    )
    .expect("captured on new server connections");

    // New connections to PostgreSQL (the pool's are older than the daemon): the client side.
    let client_before = (
        events(&daemon, "send", "client"),
        events(&daemon, "recv", "client"),
    );
    backend.fault("idle_tx?n=3").expect("fault switch");
    // Each of the three sends at least a startup message and a query and reads the answers.
    wait_for(
        "the new PostgreSQL connections' traffic",
        Duration::from_secs(10),
        || {
            (events(&daemon, "send", "client") >= client_before.0 + 6.0
                && events(&daemon, "recv", "client") >= client_before.1 + 6.0)
                .then_some(())
        },
    )
    .expect("captured on new client connections");
    backend.fault("clear").expect("fault switch");

    for reason in ["segment_ringbuf_full", "segment_unparsed"] {
        let drops = daemon
            .metric(&format!(
                "selfheal_ebpf_ringbuf_drops_total{{reason=\"{reason}\"}}"
            ))
            .expect("metrics");
        assert_eq!(drops, Some(0.0), "nothing {reason} at this rate");
    }
    let mode = daemon
        .metric("selfheal_capture_mode{mode=\"cgroup\"}")
        .expect("metrics");
    assert_eq!(mode, Some(1.0), "captured on the backend's own cgroup");
}

/// A backend that shares its cgroup with other processes is not captured on it (other
/// processes would pay and their traffic would be taken for the target's): the daemon says
/// why, in its log and in `selfheal_capture_mode`, and captures nothing. Moved into a cgroup
/// of its own, it is attached there without a restart of the daemon.
#[test]
fn a_backend_sharing_its_cgroup_is_not_captured_until_it_has_its_own() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend =
        DemoBackend::start_shared(&pg.url(), free_port().expect("port")).expect("demo backend");
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n[probes]\npayload_bytes = 256\n\n\
         [monitor]\ninterval_ms = 500\n",
        backend.selector()
    ))
    .expect("daemon");
    daemon
        .wait_for_target(backend.proc.pid())
        .expect("the daemon finds the backend");
    let mode = |mode: &str| {
        daemon
            .metric(&format!("selfheal_capture_mode{{mode=\"{mode}\"}}"))
            .expect("metrics")
    };
    wait_for("capture mode none", Duration::from_secs(10), || {
        (mode("none") == Some(1.0)).then_some(())
    })
    .expect("the capture is off");
    assert_eq!(
        daemon
            .metric("selfheal_ebpf_probe_attached{probe=\"payload_capture\"}")
            .expect("metrics"),
        Some(0.0)
    );
    let log = daemon.proc.log().expect("daemon log");
    let text = std::fs::read_to_string(log).expect("log");
    assert!(
        text.contains("payload capture is waiting for the target to run in a cgroup of its own")
            && text.contains("root cgroup"),
        "the log says why:\n{text}"
    );
    let mut client = KeepAlive::connect(backend.address).expect("connect");
    for _ in 0..5 {
        assert_eq!(
            client
                .get("/api/v1/tackle/deals", "api.tackle.io")
                .expect("request"),
            200
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    let captured = events(&daemon, "recv", "server") + events(&daemon, "recv", "unknown");
    assert!(captured < 0.5, "nothing captured, got {captured} events");

    // Moved into a cgroup of its own while running: the daemon attaches there.
    let cgroup = OwnCgroup::create("moved-backend").expect("cgroup");
    std::fs::write(
        cgroup.dir().join("cgroup.procs"),
        backend.proc.pid().to_string(),
    )
    .expect("move the backend");
    wait_for("capture mode cgroup", Duration::from_secs(10), || {
        (mode("cgroup") == Some(1.0)).then_some(())
    })
    .expect("attached to the backend's new cgroup");

    // A process that is not the target joins its cgroup (as a child the backend forked
    // would): the capture stays where it is over several re-checks, since every process of
    // the target is still there. Only a first attachment asks for the cgroup to be its alone.
    let mut stranger = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    std::fs::write(cgroup.dir().join("cgroup.procs"), stranger.id().to_string())
        .expect("move the stranger in");
    std::thread::sleep(Duration::from_secs(2));
    let still = (mode("cgroup"), mode("none"));
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert_eq!(
        still,
        (Some(1.0), Some(0.0)),
        "the capture stays on the target's cgroup with a stranger in it"
    );
    drop(client);
    drop(daemon);
    drop(backend);
    drop(cgroup);
}

/// A target that talks to PostgreSQL over a unix socket is not seen by the cgroup capture
/// (TCP only): the daemon counts those connections and says so in its log, rather than
/// showing no queries without a word.
#[test]
fn unix_socket_postgres_connections_are_counted_as_unseen_on_the_cgroup_capture() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let socket_dir = pg.socket_dir().display().to_string();
    let port = pg.port.to_string();
    // A unique piece of its command line, for the daemon's selector.
    let marker = "select 'selfheal-unix-client', pg_sleep(30)";
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{marker}\"\npoll_interval_ms = 100\n\n\
         [probes]\npayload_bytes = 256\n\n[monitor]\ninterval_ms = 500\n"
    ))
    .expect("daemon");
    let mut command = std::process::Command::new(pg.program("psql"));
    command.args([
        "-X",
        "-h",
        &socket_dir,
        "-p",
        &port,
        "-U",
        "postgres",
        "-At",
        "-c",
        marker,
    ]);
    let cgroup = OwnCgroup::create("unix-client").expect("cgroup");
    cgroup.place(&mut command).expect("psql in its cgroup");
    let mut client = command
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    daemon
        .wait_for_target(client.id())
        .expect("the daemon finds psql");
    daemon.wait_capturing().expect("capture attached");
    let unseen = wait_for(
        "the unix-socket connection to be counted",
        Duration::from_secs(10),
        || {
            let value = daemon
                .metric("selfheal_capture_unseen_postgres_connections")
                .ok()??;
            (value >= 1.0).then_some(value)
        },
    );
    let log = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    let _ = client.kill();
    let _ = client.wait();
    let unseen = unseen.expect("counted");
    assert!(
        (unseen - 1.0).abs() < f64::EPSILON,
        "psql's one connection, got {unseen}"
    );
    assert!(
        log.contains("the target talks to PostgreSQL over a unix socket")
            && log.contains(&format!(".s.PGSQL.{port}")),
        "the log says so, with the socket:\n{log}"
    );
    drop(daemon);
    drop(cgroup);
}
