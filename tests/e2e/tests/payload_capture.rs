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
    assert_eq!(
        decoder_idle(&daemon),
        Some(1.0),
        "the decoder parses under SCHED_IDLE by default"
    );

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

    for reason in [
        "segment_ringbuf_full",
        "segment_unparsed",
        "connection_ringbuf_full",
        "undecodable",
    ] {
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
/// why, in its log and in `selfheal_capture_mode`, and captures (and sheds) nothing, even on a
/// host without idle CPU. Moved into a cgroup
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
    deals(&mut client, 5);
    // A host without idle CPU meanwhile: nothing is captured, so nothing is shed either.
    let hogs = CpuHogs::start();
    std::thread::sleep(Duration::from_millis(1500));
    drop(hogs);
    let captured = events(&daemon, "recv", "server") + events(&daemon, "recv", "unknown");
    assert!(captured < 0.5, "nothing captured, got {captured} events");
    assert_eq!(
        sampling_ratio(&daemon),
        Some(1.0),
        "no shedding while detached"
    );
    let text = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    assert!(
        !text.contains("payload capture is shedding"),
        "no shedding logged while nothing is captured:\n{text}"
    );

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

/// By default (no `[probes]` table: the capture on, `probes.unix_sockets = "off"`), a target
/// that talks to PostgreSQL over a unix socket is not seen by the cgroup capture (TCP only),
/// and no other process is hooked: the daemon counts those connections and says so in its
/// log, with how to have them seen, rather than showing no queries without a word.
#[test]
fn unix_socket_postgres_connections_are_counted_as_unseen_when_not_captured() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let marker = "selfheal_marker=unix-off";
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{marker}\"\npoll_interval_ms = 100\n\n[monitor]\ninterval_ms = 500\n"
    ))
    .expect("daemon");
    let cgroup = OwnCgroup::create("unix-off").expect("cgroup");
    let mut client = psql_on_socket(&pg, marker, false, false, &cgroup);
    daemon
        .wait_for_target(client.id())
        .expect("the daemon finds psql");
    wait_for(
        "the default capture on psql's cgroup",
        Duration::from_secs(10),
        || {
            (daemon
                .metric("selfheal_capture_mode{mode=\"cgroup\"}")
                .ok()
                .flatten()
                == Some(1.0))
            .then_some(())
        },
    )
    .expect("payload capture is on by default, on the target's cgroup");
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
    let unix_capture = daemon.metric(UNIX_CAPTURE).expect("metrics");
    let _ = client.kill();
    let _ = client.wait();
    let unseen = unseen.expect("counted");
    assert!(
        (unseen - 1.0).abs() < f64::EPSILON,
        "psql's one connection, got {unseen}"
    );
    assert_eq!(unix_capture, Some(0.0), "{UNIX_CAPTURE}");
    assert!(
        log.contains("the target talks to PostgreSQL over a unix socket")
            && log.contains(&format!(".s.PGSQL.{}", pg.port))
            && log.contains("probes.unix_sockets = \"auto\""),
        "the log says so, with the socket and how to have it seen:\n{log}"
    );
    drop(daemon);
    drop(cgroup);
}

/// With `probes.unix_sockets = "auto"` the daemon notices the target's unix-socket
/// connection to PostgreSQL, hooks its unix sockets, and measures its queries from then on,
/// exactly: counts per fingerprint and the SQLSTATE of a failing one.
#[test]
fn unix_socket_postgres_queries_are_captured_once_the_connection_is_noticed() {
    auto_capture("selfheal_marker=unix-auto", false);
}

/// The same for a target in a network namespace of its own (a container with its own
/// network, reaching PostgreSQL's socket through a shared directory): its connection is in
/// that namespace's socket list, not the daemon's.
#[test]
fn unix_socket_postgres_is_noticed_in_the_targets_own_network_namespace() {
    auto_capture("selfheal_marker=unix-netns", true);
}

fn auto_capture(marker: &str, own_netns: bool) {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let daemon = Daemon::start(&unix_config(marker, "auto")).expect("daemon");
    assert_eq!(
        daemon.metric(UNIX_CAPTURE).expect("metrics"),
        Some(0.0),
        "nothing hooked before the target has such a connection"
    );
    let cgroup =
        OwnCgroup::create(if own_netns { "unix-netns" } else { "unix-auto" }).expect("cgroup");
    // psql connects at once and then waits for its script on stdin.
    let mut client = psql_on_socket(&pg, marker, false, own_netns, &cgroup);
    daemon
        .wait_for_target(client.id())
        .expect("the daemon finds psql");
    daemon.wait_capturing().expect("capture attached");
    wait_for_unix_capture(&daemon, "attached once the connection is noticed");
    let before = queries(&daemon);
    run_script(
        &mut client,
        "select 'unix-auto', 1;\nselect 'unix-auto', 2;\nselect 'unix-auto', 3;\n\
         select * from no_such_table_unix;\n",
    );
    let seen = wait_for("the queries to be decoded", Duration::from_secs(10), || {
        let delta = delta(&before, &queries(&daemon));
        (delta.values().map(|q| q.0).sum::<u64>() >= 4).then_some(delta)
    });
    let unseen = daemon
        .metric("selfheal_capture_unseen_postgres_connections")
        .expect("metrics");
    let log = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    let seen = seen.unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{log}",
            daemon.api("/api/v1/system/queries").unwrap_or_default()
        )
    });
    let selects: Vec<_> = seen
        .iter()
        .filter(|(f, _)| f.eq_ignore_ascii_case("select ?, ?"))
        .collect();
    let failing: Vec<_> = seen
        .iter()
        .filter(|(f, _)| f.contains("no_such_table_unix"))
        .collect();
    assert_eq!(
        selects.len(),
        1,
        "one fingerprint for the three selects: {seen:?}"
    );
    assert_eq!(selects[0].1 .0, 3, "three selects: {seen:?}");
    assert_eq!(failing.len(), 1, "{seen:?}");
    assert_eq!(
        failing[0].1 .1.get("42P01"),
        Some(&1),
        "the failing query's SQLSTATE: {seen:?}"
    );
    assert_eq!(
        seen.values().map(|q| q.0).sum::<u64>(),
        4,
        "nothing else: {seen:?}"
    );
    assert_eq!(unseen, Some(0.0), "captured connections are not unseen");
    assert!(
        log.contains("capturing the target's unix-socket connections to PostgreSQL"),
        "the log says so:\n{log}"
    );
    drop(daemon);
    drop(cgroup);
}

/// With `probes.unix_sockets = "always"` the unix sockets are hooked from the start, so even
/// a connection's startup is seen: the query sent right after connecting, and a connection
/// refused at startup (a database that does not exist, SQLSTATE 3D000). TCP stays the
/// segment capture's: a query over TCP meanwhile counts once.
#[test]
fn unix_socket_postgres_connections_are_seen_from_their_first_byte_when_always_captured() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let marker = "selfheal_marker=unix-always";
    let daemon = Daemon::start(&unix_config(marker, "always")).expect("daemon");
    wait_for_unix_capture(&daemon, "attached from the start");
    let cgroup = OwnCgroup::create("unix-always").expect("cgroup");
    // The shell waits for a line before it becomes psql (same pid), so the daemon knows the
    // target before its first connection.
    let mut client = psql_on_socket(&pg, marker, true, false, &cgroup);
    daemon
        .wait_for_target(client.id())
        .expect("the daemon finds the target");
    daemon.wait_capturing().expect("capture attached");
    let before = queries(&daemon);
    let refused_before = auth_failures(&daemon, "3D000");
    // Two selects over the unix socket; one over TCP (the segment capture's, which the unix
    // hooks must leave alone: taken by both, it would count twice); then a refused startup
    // over the unix socket again.
    let socket_dir = pg.socket_dir().display().to_string();
    let script = format!(
        "go\nselect 'unix-always', 1;\nselect 'unix-always', 2;\n\
         \\c \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"\n\
         select 'over-tcp', 3;\n\
         \\c \"host={socket_dir} port={port} user=postgres dbname=no_such_database_unix\"\n",
        port = pg.port
    );
    run_script(&mut client, &script);
    let seen = wait_for(
        "the queries and the refused connection to be decoded",
        Duration::from_secs(10),
        || {
            let delta = delta(&before, &queries(&daemon));
            let refused = auth_failures(&daemon, "3D000") - refused_before;
            (delta.values().map(|q| q.0).sum::<u64>() >= 3 && refused >= 1)
                .then_some((delta, refused))
        },
    );
    let log = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    let (seen, refused) = seen.unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{log}",
            daemon.api("/api/v1/system/queries").unwrap_or_default()
        )
    });
    assert_eq!(seen.len(), 1, "one fingerprint: {seen:?}");
    // Settled: nothing more arrives (a TCP query taken twice would show up here).
    std::thread::sleep(Duration::from_millis(1500));
    let seen = delta(&before, &queries(&daemon));
    assert_eq!(
        seen.values().next().map(|q| q.0),
        Some(3),
        "the three selects, the first one sent right after connecting, the TCP one once: {seen:?}"
    );
    assert_eq!(refused, 1, "the connection refused at startup");
    drop(daemon);
    drop(cgroup);
}

/// With `always`, a process in the target's cgroup that the daemon has not listed (a worker
/// just forked, a target just restarted, here a `psql` it never looks for) is seen from its
/// first byte, as its TCP segments are: a query sent right after connecting and a refused
/// startup, both over and done in a few milliseconds.
#[test]
fn unix_socket_postgres_of_a_process_not_yet_found_in_the_targets_cgroup_is_seen() {
    let Waiting {
        pg,
        daemon,
        cgroup,
        target,
    } = waiting_target("unix-cgroup");
    let before = queries(&daemon);
    let refused_before = auth_failures(&daemon, "3D000");
    let socket_dir = pg.socket_dir().display().to_string();
    let port = pg.port.to_string();
    for (database, sql) in [
        ("postgres", "select 'unix-cgroup', 1"),
        ("no_such_database_cgroup", "select 1"),
    ] {
        let mut psql = std::process::Command::new(pg.program("psql"));
        psql.args(["-X", "-h", &socket_dir, "-p", &port, "-U", "postgres"])
            .args(["-d", database, "-At", "-q", "-c", sql]);
        cgroup
            .place(&mut psql)
            .expect("psql in the target's cgroup");
        let status = psql
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("psql");
        println!("psql on {database}: {status}");
    }
    let seen = wait_for(
        "the query and the refused connection to be decoded",
        Duration::from_secs(10),
        || {
            let delta = delta(&before, &queries(&daemon));
            let refused = auth_failures(&daemon, "3D000") - refused_before;
            (!delta.is_empty() && refused >= 1).then_some((delta, refused))
        },
    );
    let log = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    let (seen, refused) = seen.unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{log}",
            daemon.api("/api/v1/system/queries").unwrap_or_default()
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    let settled = delta(&before, &queries(&daemon));
    assert_eq!(settled, seen, "nothing more arrives");
    assert_eq!(
        seen.values().map(|q| q.0).collect::<Vec<_>>(),
        vec![1],
        "the one select: {seen:?}"
    );
    assert_eq!(refused, 1, "the connection refused at startup");
    end(target, daemon, cgroup);
}

/// The unix-socket capture takes connections to PostgreSQL only: a process of the target's
/// cgroup writing 2000 lines to a stdout that is a unix socket (as a systemd unit's is, to
/// journald) costs no ring-buffer record, while a query over PostgreSQL's socket is still seen.
#[test]
fn unix_sockets_other_than_postgres_ones_are_not_captured() {
    let Waiting {
        pg,
        daemon,
        cgroup,
        target,
    } = waiting_target("unix-other");
    let records = || {
        daemon
            .metric("selfheal_ebpf_ringbuf_events_total")
            .ok()
            .flatten()
            .unwrap_or(0.0)
    };
    // Two report intervals: the counter is exported once per interval.
    std::thread::sleep(Duration::from_millis(1200));
    let before = records();
    let (stdout, mut reader) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let drained = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text).expect("read the lines");
        text.lines().count()
    });
    let mut chatter = std::process::Command::new("sh");
    chatter.args([
        "-c",
        "i=0; while [ $i -lt 2000 ]; do echo \"line $i of a service's log\"; i=$((i+1)); done",
    ]);
    cgroup
        .place(&mut chatter)
        .expect("chatter in the target's cgroup");
    let status = chatter
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            stdout,
        )))
        .status()
        .expect("chatter");
    // The command holds the socket's other end until dropped: the reader's end of file.
    drop(chatter);
    assert!(status.success());
    assert_eq!(drained.join().expect("reader"), 2000, "every line written");
    std::thread::sleep(Duration::from_millis(1200));
    let added = records() - before;
    assert!(
        added < 50.0,
        "2000 writes to a unix socket that is not PostgreSQL's took {added} ring records"
    );
    // PostgreSQL's socket is still captured.
    let queries_before = queries(&daemon);
    let mut psql = std::process::Command::new(pg.program("psql"));
    psql.args(["-X", "-h", &pg.socket_dir().display().to_string()])
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-At", "-q", "-c", "select 'unix-other', 1"]);
    cgroup
        .place(&mut psql)
        .expect("psql in the target's cgroup");
    assert!(psql
        .stdout(std::process::Stdio::null())
        .status()
        .expect("psql")
        .success());
    let seen = wait_for("the query to be decoded", Duration::from_secs(10), || {
        let delta = delta(&queries_before, &queries(&daemon));
        (!delta.is_empty()).then_some(delta)
    })
    .expect("the query over PostgreSQL's unix socket is seen");
    assert_eq!(
        seen.values().map(|q| q.0).collect::<Vec<_>>(),
        vec![1],
        "{seen:?}"
    );
    end(target, daemon, cgroup);
}

/// A daemon with `probes.unix_sockets = "always"`, hooked, watching its target: a shell in a
/// cgroup of its own (`name`) that waits for its input to end.
struct Waiting {
    pg: PgCluster,
    daemon: Daemon,
    cgroup: OwnCgroup,
    target: std::process::Child,
}

fn waiting_target(name: &str) -> Waiting {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let marker = format!("selfheal_marker={name}");
    let daemon = Daemon::start(&unix_config(&marker, "always")).expect("daemon");
    let cgroup = OwnCgroup::create(name).expect("cgroup");
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "read go", &marker]);
    cgroup.place(&mut sh).expect("target in its cgroup");
    let target = sh
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("target");
    daemon
        .wait_for_target(target.id())
        .expect("the daemon finds the target");
    daemon.wait_capturing().expect("capture attached");
    wait_for_unix_capture(&daemon, "attached from the start");
    Waiting {
        pg,
        daemon,
        cgroup,
        target,
    }
}

/// Ends the waiting target, then the daemon, then the cgroup.
fn end(mut target: std::process::Child, daemon: Daemon, cgroup: OwnCgroup) {
    drop(target.stdin.take());
    let _ = target.wait();
    drop(daemon);
    drop(cgroup);
}

const UNIX_CAPTURE: &str = "selfheal_ebpf_probe_attached{probe=\"unix_capture\"}";

/// Waits up to 10 s for the unix-socket hooks to be attached; `why` names the expectation.
fn wait_for_unix_capture(daemon: &Daemon, why: &str) {
    wait_for(
        "the unix-socket capture to attach",
        Duration::from_secs(10),
        || (daemon.metric(UNIX_CAPTURE).ok().flatten() == Some(1.0)).then_some(()),
    )
    .expect(why);
}

/// A daemon watching the process whose command line holds `marker`, capturing payloads on
/// its cgroup, with `probes.unix_sockets = mode` and a short report interval (the unix-socket
/// connections are looked for once per interval).
fn unix_config(marker: &str, mode: &str) -> String {
    format!(
        "[target]\ncommand = \"{marker}\"\npoll_interval_ms = 100\n\n\
         [probes]\npayload_bytes = 256\nunix_sockets = \"{mode}\"\n\n[monitor]\ninterval_ms = 500\n"
    )
}

/// psql on the cluster's unix socket, in `cgroup`, reading its script from stdin; `marker`
/// is on its command line. With `wait`, a shell reads one line first and then becomes psql;
/// with `own_netns`, it runs in a new network namespace (`unshare -n`, which becomes it).
fn psql_on_socket(
    pg: &PgCluster,
    marker: &str,
    wait: bool,
    own_netns: bool,
    cgroup: &OwnCgroup,
) -> std::process::Child {
    let psql = pg.program("psql").display().to_string();
    let socket_dir = pg.socket_dir().display().to_string();
    let port = pg.port.to_string();
    let options = [
        "-X",
        "-h",
        &socket_dir,
        "-p",
        &port,
        "-U",
        "postgres",
        "-At",
        "-q",
    ]
    .map(ToString::to_string);
    // Each of `unshare` and `sh` becomes the next program (same pid).
    let mut line: Vec<String> = Vec::new();
    if own_netns {
        line.extend(["unshare".to_owned(), "-n".to_owned()]);
    }
    if wait {
        line.extend(["sh".to_owned(), "-c".to_owned()]);
        line.push(format!("read go; exec \"$0\" \"$@\" --set={marker}"));
        line.push(psql);
        line.extend(options);
    } else {
        line.push(psql);
        line.extend(options);
        line.push(format!("--set={marker}"));
    }
    let mut command = std::process::Command::new(&line[0]);
    command.args(&line[1..]);
    cgroup.place(&mut command).expect("psql in its cgroup");
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql")
}

/// Sends `script` to the client's stdin, closes it, and waits for the client to finish.
fn run_script(client: &mut std::process::Child, script: &str) {
    use std::io::Write as _;
    let mut stdin = client.stdin.take().expect("stdin");
    stdin.write_all(script.as_bytes()).expect("script");
    drop(stdin);
    let status = client.wait().expect("psql");
    println!("psql exited: {status}");
}

/// Per fingerprint: count and errors by SQLSTATE, from `/api/v1/system/queries`.
type Queries = std::collections::BTreeMap<String, (u64, std::collections::BTreeMap<String, u64>)>;

fn queries(daemon: &Daemon) -> Queries {
    let data = daemon.api("/api/v1/system/queries").unwrap_or_default();
    let mut out = Queries::new();
    for q in data["queries"].as_array().into_iter().flatten() {
        let entry = out
            .entry(q["fingerprint"].as_str().unwrap_or_default().to_owned())
            .or_default();
        entry.0 += q["count"].as_u64().unwrap_or(0);
        for (state, n) in q["sqlstates"].as_object().into_iter().flatten() {
            *entry.1.entry(state.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    out
}

/// What moved between two query views.
fn delta(before: &Queries, after: &Queries) -> Queries {
    after
        .iter()
        .filter_map(|(fingerprint, (count, states))| {
            let (then, then_states) = before.get(fingerprint).cloned().unwrap_or_default();
            (*count > then).then(|| {
                let states = states
                    .iter()
                    .map(|(s, n)| (s.clone(), n - then_states.get(s).copied().unwrap_or(0)))
                    .filter(|(_, n)| *n > 0)
                    .collect();
                (fingerprint.clone(), (count - then, states))
            })
        })
        .collect()
}

fn auth_failures(daemon: &Daemon, sqlstate: &str) -> u64 {
    daemon.api("/api/v1/system/queries").unwrap_or_default()["auth_failures"][sqlstate]
        .as_u64()
        .unwrap_or(0)
}

/// Busy loops outside the target's cgroup, two per CPU, until dropped: no CPU is ever idle.
struct CpuHogs(Vec<std::process::Child>);

impl CpuHogs {
    fn start() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        Self(
            (0..cpus * 2)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

/// Requests on each of `clients` (keep-alive connections), back to back, until `stop`; the
/// number sent, and the connections, still open.
fn keep_busy(
    clients: Vec<KeepAlive>,
    stop: &std::sync::atomic::AtomicBool,
) -> (u64, Vec<KeepAlive>) {
    std::thread::scope(|scope| {
        let workers: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                scope.spawn(move || {
                    let mut sent = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        client
                            .get("/api/v1/tackle/deals", "api.tackle.io")
                            .expect("request");
                        sent += 1;
                    }
                    (sent, client)
                })
            })
            .collect();
        let mut total = 0;
        let mut clients = Vec::new();
        for worker in workers {
            let (sent, client) = worker.join().expect("worker");
            total += sent;
            clients.push(client);
        }
        (total, clients)
    })
}

/// `n` requests on `client`, each answered 200.
fn deals(client: &mut KeepAlive, n: usize) {
    for _ in 0..n {
        assert_eq!(
            client
                .get("/api/v1/tackle/deals", "api.tackle.io")
                .expect("request"),
            200
        );
    }
}

fn connect_all(address: std::net::SocketAddr, n: usize) -> Vec<KeepAlive> {
    (0..n)
        .map(|_| KeepAlive::connect(address).expect("connect"))
        .collect()
}

/// `selfheal_capture_decoder_idle`: whether the decoder parses under `SCHED_IDLE`.
fn decoder_idle(daemon: &Daemon) -> Option<f64> {
    daemon
        .metric("selfheal_capture_decoder_idle")
        .expect("metrics")
}

fn sampling_ratio(daemon: &Daemon) -> Option<f64> {
    daemon
        .metric("selfheal_capture_sampling_ratio")
        .expect("metrics")
}

/// Packets (or socket operations) of shed connections the kernel did not capture.
fn shed_packets(daemon: &Daemon) -> f64 {
    daemon
        .metric("selfheal_ebpf_ringbuf_drops_total{reason=\"shed\"}")
        .expect("metrics")
        .unwrap_or(0.0)
}

/// HTTP requests the daemon counted, over every series.
fn http_requests(daemon: &Daemon) -> u64 {
    selfheal_e2e::http_request_counts(&daemon.metrics().expect("metrics"))
        .into_values()
        .sum()
}

/// While the host has no CPU to spare (busy loops beside the backend, its clients back to
/// back), the capture sheds connections in the kernel: the share kept falls below 1, the shed
/// segments are counted, the log says why. Once the host is quiet again every connection is
/// kept, and requests are counted exactly again — on new connections, and at once on the
/// connections that were shed (their streams jumped ahead while they were).
#[test]
fn a_host_without_idle_cpu_makes_the_capture_shed_connections_until_it_is_quiet() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    let daemon = Daemon::capturing(&backend, 256, "").expect("daemon capturing the backend");
    assert_eq!(
        sampling_ratio(&daemon),
        Some(1.0),
        "every connection kept at rest"
    );

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (shed, mut clients) = std::thread::scope(|scope| {
        let hogs = CpuHogs::start();
        let clients = connect_all(backend.address, 16);
        let load = scope.spawn(|| keep_busy(clients, &stop));
        let shed = wait_for("the capture to shed", Duration::from_secs(20), || {
            let ratio = sampling_ratio(&daemon)?;
            let dropped = shed_packets(&daemon);
            (ratio < 1.0 && dropped > 0.0).then_some((ratio, dropped))
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, clients) = load.join().expect("load");
        drop(hogs);
        println!("{sent} requests on the busy host");
        (shed, clients)
    });
    let (ratio, dropped) = shed.expect("the capture sheds while the target waits for CPU");
    println!(
        "kept one connection in {:.0}; {dropped} segments shed",
        1.0 / ratio
    );
    let log = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    // Shed for the host's load (not only a decoder falling behind): the idle share it read
    // was under the threshold.
    let idle = log
        .lines()
        .find(|line| line.contains("payload capture is shedding connections"))
        .and_then(|line| line.split("host_cpu_idle_percent=").nth(1))
        .and_then(|rest| rest.trim_start_matches('"').split('"').next())
        .and_then(|value| value.parse::<f64>().ok());
    assert!(
        idle.is_some_and(|idle| idle < 15.0),
        "the log says it sheds for the host's idle share ({idle:?}):\n{log}"
    );

    // Quiet again: one step back per calm second, four steps at most.
    wait_for(
        "every connection kept again",
        Duration::from_secs(15),
        || (sampling_ratio(&daemon)? > 0.99).then_some(()),
    )
    .expect("the capture comes back");
    let log = std::fs::read_to_string(daemon.proc.log().expect("daemon log")).expect("log");
    assert!(
        log.contains("payload capture keeps every connection again"),
        "the log says it is back:\n{log}"
    );
    let before = http_requests(&daemon);
    for _ in 0..4 {
        deals(
            &mut KeepAlive::connect(backend.address).expect("connect"),
            10,
        );
    }
    wait_for("the 40 requests counted", Duration::from_secs(10), || {
        (http_requests(&daemon) == before + 40).then_some(())
    })
    .unwrap_or_else(|err| panic!("{err:#}: {} counted", http_requests(&daemon) - before));

    // The connections open through the shedding, some of them shed: five more requests on
    // each are counted while they stay open (a shed one's next segments start its streams
    // over instead of waiting behind holes that will never fill).
    let before = http_requests(&daemon);
    for client in &mut clients {
        deals(client, 5);
    }
    wait_for(
        "the 80 requests on the old connections counted",
        Duration::from_secs(10),
        || (http_requests(&daemon) == before + 80).then_some(()),
    )
    .unwrap_or_else(|err| panic!("{err:#}: {} counted", http_requests(&daemon) - before));
    drop(clients);
}

/// With `shed_below_idle_percent = 0` the same pressure sheds nothing: every request on every
/// connection is counted.
#[test]
fn without_shedding_a_target_on_a_busy_host_is_still_counted_exactly() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    let daemon = Daemon::capturing(&backend, 256, "shed_below_idle_percent = 0\n")
        .expect("daemon capturing the backend");
    let before = http_requests(&daemon);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        let hogs = CpuHogs::start();
        let clients = connect_all(backend.address, 4);
        let load = scope.spawn(|| keep_busy(clients, &stop));
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, _clients) = load.join().expect("load");
        drop(hogs);
        sent
    });
    wait_for("every request counted", Duration::from_secs(15), || {
        (http_requests(&daemon) == before + sent).then_some(())
    })
    .unwrap_or_else(|err| {
        panic!(
            "{err:#}: {} of {sent} counted",
            http_requests(&daemon) - before
        )
    });
    assert_eq!(sampling_ratio(&daemon), Some(1.0));
    let shed = shed_packets(&daemon);
    assert!(shed < 0.5, "{shed} packets shed");
    // Exact counts need a decoder that keeps up: it is not under SCHED_IDLE then (under it,
    // the busy loops above would have starved it and its queue would have overflowed).
    assert_eq!(decoder_idle(&daemon), Some(0.0));
}
