//! The healing loop with the target under a manager: a unit of a real systemd (restarted with
//! RestartUnit over D-Bus) and a container of a real Docker Engine (restarted through the
//! Engine API). Each asserts the diagnosis, the action and the verified recovery.

use std::time::{Duration, Instant};

use selfheal_e2e::{
    bin, docker::DockerEngine, free_port, http, require_root, systemd::SystemdUser, wait_for,
    Daemon, PgCluster,
};
use serde_json::Value;

fn wait_recovered(daemon: &Daemon, signature: &str) -> Value {
    let found = wait_for(
        &format!("a recovered repair of {signature}"),
        Duration::from_secs(40),
        || {
            let data = daemon.api("/api/v1/system/repairs").ok()?;
            data["repairs"]
                .as_array()?
                .iter()
                .find(|r| r["signature"] == signature && r["state"] == "recovered")
                .cloned()
        },
    );
    found.unwrap_or_else(|err| {
        panic!(
            "{err}: {:#}",
            daemon.api("/api/v1/system/repairs").unwrap_or(Value::Null)
        )
    })
}

#[test]
fn a_crashed_systemd_unit_is_restarted_over_dbus_and_verified_healthy() {
    const UNIT: &str = "backend.service";
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    // Restart=no: bringing it back is the daemon's job here.
    let unit = format!(
        "[Service]\nExecStart={} --listen 127.0.0.1:{port} --database-url {}\nRestart=no\n",
        bin("demo-backend").display(),
        pg.url()
    );
    let systemd = SystemdUser::start(&[(UNIT, &unit)]).expect("systemd --user");
    systemd.unit_job("StartUnit", UNIT).expect("start");
    let health_url = format!("http://127.0.0.1:{port}/health");
    let first = wait_for("the backend to answer", Duration::from_secs(20), || {
        let pid = systemd.main_pid(UNIT).ok().filter(|p| *p != 0)?;
        http().get(&health_url).call().ok()?;
        Some(pid)
    })
    .expect("backend up");
    let daemon = Daemon::start(&format!(
        "[target]\nsystemd_unit = \"{UNIT}\"\nsystemd_bus = \"{}\"\npoll_interval_ms = 100\n\n\
         [repair]\nself_healing = true\n\n[monitor]\ninterval_ms = 500\n\n\
         [[platforms]]\nname = \"leadsite.ai\"\nhosts = [\"leadsite.ai\"]\n\n\
         [[checks]]\nname = \"backend\"\nkind = \"http\"\nurl = \"{health_url}\"\n\
         platform = \"leadsite.ai\"\ninterval_ms = 1000\ntimeout_ms = 900\n",
        systemd.bus_address()
    ))
    .expect("daemon");
    daemon.wait_for_target(first).expect("unit resolved");

    let crashed_at = Instant::now();
    http()
        .post(format!("http://127.0.0.1:{port}/__fault/crash"))
        .send_empty()
        .expect("crash");
    let repair = wait_recovered(&daemon, "target.crashed");
    println!(
        "systemd: recovered {} ms after the fault switch: {repair:#}",
        crashed_at.elapsed().as_millis()
    );
    assert_eq!(repair["action"], "restart");
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "systemd.restart", "{repair}");
    let second = systemd.main_pid(UNIT).expect("MainPID");
    assert_ne!(second, first);
    assert_eq!(
        effect["after"],
        format!("main pid {second}"),
        "read back from the unit: {repair}"
    );
    assert!(
        http()
            .get(&health_url)
            .call()
            .is_ok_and(|r| r.status() == 200),
        "the restarted backend answers"
    );
}

#[test]
fn a_killed_container_is_restarted_through_the_engine_api() {
    require_root();
    let engine = DockerEngine::start().expect("dockerd");
    let name = format!("selfheal-healing-{}", std::process::id());
    let first = engine.start_sleeper(&name).expect("a sleeping container");
    let daemon = Daemon::start(&format!(
        "[target]\ncontainer = \"{name}\"\ndocker_socket = \"{}\"\npoll_interval_ms = 100\n\n\
         [repair]\nself_healing = true\nstop_timeout_secs = 1\n\n[monitor]\ninterval_ms = 500\n",
        engine.socket().display()
    ))
    .expect("daemon");
    daemon.wait_for_target(first).expect("container resolved");

    engine.docker(&["kill", &name]).expect("kill");
    let repair = wait_recovered(&daemon, "target.crashed");
    assert_eq!(repair["action"], "restart");
    assert!(
        repair["summary"]
            .as_str()
            .is_some_and(|s| s.contains("SIGKILL")),
        "{repair}"
    );
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "docker.restart", "{repair}");
    assert!(
        effect["after"]
            .as_str()
            .is_some_and(|a| a.starts_with("running")),
        "{repair}"
    );
    let second = engine.pid(&name).expect("pid");
    assert_ne!(second, first);
    daemon
        .wait_for_target(second)
        .expect("the daemon follows it");
}
