//! The target as a unit of a real systemd (a private user manager, see `selfheal_e2e::systemd`):
//! the daemon finds its MainPID over D-Bus, follows RestartUnit to the new process, and sees
//! KillUnit's SIGKILL with its signal.

use std::time::Duration;

use selfheal_e2e::{
    bin, free_port, require_root, systemd::SystemdUser, wait_for, Daemon, PgCluster,
};

#[test]
fn a_systemd_unit_is_found_over_dbus_and_followed_across_restarts() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let unit = format!(
        "[Service]\nExecStart={} --listen 127.0.0.1:{port} --database-url {}\n",
        bin("demo-backend").display(),
        pg.url()
    );
    let systemd = SystemdUser::start(&[("backend.service", &unit)]).expect("systemd --user");
    systemd
        .unit_job("StartUnit", "backend.service")
        .expect("start the backend unit");
    let first = wait_for("the unit's main process", Duration::from_secs(10), || {
        systemd
            .main_pid("backend.service")
            .ok()
            .filter(|pid| *pid != 0)
    })
    .expect("MainPID");

    let daemon = Daemon::start(&format!(
        "[target]\nsystemd_unit = \"backend.service\"\nsystemd_bus = \"{}\"\npoll_interval_ms = 100\n",
        systemd.bus_address()
    ))
    .expect("daemon");
    daemon.wait_for_target(first).expect("unit resolved");

    systemd
        .unit_job("RestartUnit", "backend.service")
        .expect("restart");
    let second = wait_for("a new main process", Duration::from_secs(10), || {
        systemd
            .main_pid("backend.service")
            .ok()
            .filter(|pid| *pid != 0 && *pid != first)
    })
    .expect("new MainPID");
    let health = daemon.wait_for_target(second).expect("restart followed");
    assert_eq!(health["target"]["restarts"], 1, "{health}");
    assert_eq!(health["target"]["last_exit"]["pid"], first, "{health}");
    // systemd stops the unit with SIGTERM, which the backend handles by shutting down cleanly.
    assert_eq!(
        health["target"]["last_exit"]["reason"], "exited",
        "{health}"
    );
    assert_eq!(health["target"]["last_exit"]["code"], 0, "{health}");

    systemd.kill_unit("backend.service", 9).expect("KillUnit");
    let exit = daemon.wait_for_exit(second).expect("exit reported");
    assert_eq!(exit["reason"], "SIGKILL", "{exit}");
    assert_eq!(exit["source"], "ebpf", "{exit}");
    wait_for(
        "the daemon to report the unit down",
        Duration::from_secs(10),
        || {
            let health = daemon.health().ok()?;
            let error = health["target"]["last_error"].as_str()?.to_owned();
            (health["target"]["state"] == "down").then_some(error)
        },
    )
    .map(|error| assert!(error.contains("backend.service"), "{error}"))
    .expect("down");
}
