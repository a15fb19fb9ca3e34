//! The healing loop with the demo backend under a manager: a unit of a real systemd
//! (restarted with RestartUnit over D-Bus) and a container of a real Docker Engine (the
//! backend's binary and its libraries imported as an image, on the host's network; restarted
//! and resized through the Engine API). Each asserts the diagnosis, the action and the
//! verified recovery.

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

const UNIT: &str = "backend.service";

/// The demo backend as a unit of a private systemd (`Restart=no`: bringing it back is the
/// daemon's job, `service` adds lines to its `[Service]`), watched by the daemon with
/// self-healing on and `extra_config` (given the backend's health URL).
struct Unit {
    daemon: Daemon,
    systemd: SystemdUser,
    port: u16,
    health_url: String,
    first: u32,
    _pg: PgCluster,
}

fn unit(service: &str, extra_config: impl Fn(&str) -> String) -> Unit {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let unit = format!(
        "[Service]\nExecStart={} --listen 127.0.0.1:{port} --database-url {}\nRestart=no\n{service}",
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
         [repair]\nself_healing = true\n\n[monitor]\ninterval_ms = 500\nnot_answering_secs = 2\n\n{}",
        systemd.bus_address(),
        extra_config(&health_url)
    ))
    .expect("daemon");
    daemon.wait_for_target(first).expect("unit resolved");
    daemon.wait_capturing().expect("capture attached");
    Unit {
        daemon,
        systemd,
        port,
        health_url,
        first,
        _pg: pg,
    }
}

#[test]
fn a_crashed_systemd_unit_is_restarted_over_dbus_and_verified_healthy() {
    let Unit {
        daemon,
        systemd,
        port,
        health_url,
        first,
        _pg,
    } = unit("", |health_url| {
        format!(
            "[[platforms]]\nname = \"leadsite.ai\"\nhosts = [\"leadsite.ai\"]\n\n\
             [[checks]]\nname = \"backend\"\nkind = \"http\"\nurl = \"{health_url}\"\n\
             platform = \"leadsite.ai\"\ninterval_ms = 1000\ntimeout_ms = 900\n"
        )
    });
    let crashed_at = Instant::now();
    fault(port, "crash");
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
    assert!(answers(&health_url), "the restarted backend answers");
}

/// The demo backend as a container of a private Docker Engine, watched by the daemon with
/// self-healing on; `extra_run` adds `docker run` options, `extra_config` config (given the
/// backend's port).
struct Contained {
    daemon: Daemon,
    engine: DockerEngine,
    name: String,
    health_url: String,
    port: u16,
    _pg: PgCluster,
}

fn contained(label: &str, extra_run: &[&str], extra_config: impl Fn(u16) -> String) -> Contained {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let engine = DockerEngine::start().expect("dockerd");
    let name = format!("selfheal-{label}-{}", std::process::id());
    let port = free_port().expect("port");
    let first = engine
        .start_demo_backend(&name, &pg.url(), port, extra_run)
        .expect("the backend in a container");
    let health_url = format!("http://127.0.0.1:{port}/health");
    let daemon = Daemon::start(&format!(
        "[target]\ncontainer = \"{name}\"\ndocker_socket = \"{}\"\npoll_interval_ms = 100\n\n\
         [repair]\nself_healing = true\ncooldown_secs = 0\n\n\
         [monitor]\ninterval_ms = 500\nnot_answering_secs = 2\n\n{}",
        engine.socket().display(),
        extra_config(port)
    ))
    .expect("daemon");
    daemon.wait_for_target(first).expect("container resolved");
    daemon.wait_capturing().expect("capture attached");
    Contained {
        daemon,
        engine,
        name,
        health_url,
        port,
        _pg: pg,
    }
}

fn answers(url: &str) -> bool {
    http().get(url).call().is_ok_and(|r| r.status() == 200)
}

/// Waits until the restarted backend answers `url` with 200.
fn wait_answering(url: &str) {
    wait_for(
        "the restarted backend to answer",
        Duration::from_secs(20),
        || answers(url).then_some(()),
    )
    .expect("answers");
}

/// Turns on the backend's fault `name` (with its query string).
fn fault(port: u16, name: &str) {
    http()
        .post(format!("http://127.0.0.1:{port}/__fault/{name}"))
        .send_empty()
        .unwrap_or_else(|err| panic!("fault {name}: {err}"));
}

#[test]
fn a_crashed_container_is_restarted_through_the_engine_api_and_verified_healthy() {
    // The backend's own health check: the verification runs it after the restart.
    let scene = contained("crash", &[], |port| {
        format!(
            "[[platforms]]\nname = \"leadsite.ai\"\nhosts = [\"leadsite.ai\"]\n\n\
             [[checks]]\nname = \"backend\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\"\n\
             platform = \"leadsite.ai\"\ninterval_ms = 1000\ntimeout_ms = 900\n"
        )
    });
    let first = scene.engine.pid(&scene.name).expect("pid");
    fault(scene.port, "crash");
    let repair = wait_recovered(&scene.daemon, "target.crashed");
    assert_eq!(repair["action"], "restart");
    // abort(3) as PID 1 of a PID namespace: SIGABRT has no handler there and is ignored, so
    // glibc ends the process another way (SIGSEGV); the diagnosis names what happened.
    assert!(
        repair["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("the target died from SIG")),
        "{repair}"
    );
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "docker.restart", "{repair}");
    let second = scene.engine.pid(&scene.name).expect("pid");
    assert_ne!(second, first);
    scene
        .daemon
        .wait_for_target(second)
        .expect("the daemon follows it");
    wait_answering(&scene.health_url);
}

#[test]
fn a_hung_container_is_restarted() {
    let scene = contained("hang", &[], |_| {
        "[probes]\npayload_bytes = 512\n".to_owned()
    });
    let first = scene.engine.pid(&scene.name).expect("pid");
    fault(scene.port, "hang");
    let url = format!("http://127.0.0.1:{}/api/v1/campaigns", scene.port);
    let waiting = std::thread::spawn(move || {
        let _ = http().get(&url).call();
    });
    let repair = wait_recovered(&scene.daemon, "target.hung");
    assert_eq!(repair["action"], "restart");
    assert_eq!(repair["effects"][0]["action"], "docker.restart", "{repair}");
    assert_ne!(scene.engine.pid(&scene.name).expect("pid"), first);
    wait_answering(&scene.health_url);
    let _ = waiting.join();
}

#[test]
fn a_leaking_container_gets_a_higher_memory_limit_from_the_engine() {
    let scene = contained("leak", &["--memory", "256m"], |_| String::new());
    let first = scene.engine.pid(&scene.name).expect("pid");
    fault(scene.port, "leak?mb_per_sec=40&max_mb=220");
    let repair = wait_recovered(&scene.daemon, "target.memory_leak");
    assert_eq!(repair["action"], "raise_memory_limit");
    assert_eq!(repair["effects"][0]["action"], "docker.update", "{repair}");
    let limit = scene
        .engine
        .docker(&["inspect", "-f", "{{.HostConfig.Memory}}", &scene.name])
        .expect("inspect");
    assert_eq!(limit, (384_u64 << 20).to_string(), "raised by 50 %");
    assert_eq!(
        scene.engine.pid(&scene.name).expect("pid"),
        first,
        "the same process: no OOM kill, no restart"
    );
    assert!(answers(&scene.health_url));
}

#[test]
fn a_hung_systemd_unit_is_restarted() {
    let Unit {
        daemon,
        systemd,
        port,
        health_url,
        first,
        _pg,
    } = unit("", |_| "[probes]\npayload_bytes = 512\n".to_owned());
    fault(port, "hang");
    let url = format!("http://127.0.0.1:{port}/api/v1/campaigns");
    let waiting = std::thread::spawn(move || {
        let _ = http().get(&url).call();
    });
    let repair = wait_recovered(&daemon, "target.hung");
    assert_eq!(repair["action"], "restart");
    assert_eq!(
        repair["effects"][0]["action"], "systemd.restart",
        "{repair}"
    );
    assert_ne!(systemd.main_pid(UNIT).expect("MainPID"), first);
    wait_answering(&health_url);
    let _ = waiting.join();
}

/// The v1 memory limit of the cgroup process `pid` is in.
fn memory_limit_of(pid: u32) -> u64 {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroups");
    let path = cgroups
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })
        .expect("a v1 memory cgroup");
    std::fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
        .expect("memory.limit_in_bytes")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_leaking_systemd_unit_gets_a_higher_memory_max_over_dbus() {
    let Unit {
        daemon,
        systemd,
        port,
        health_url,
        first,
        _pg,
    } = unit("MemoryMax=256M\n", |_| String::new());
    assert_eq!(
        memory_limit_of(first),
        256 << 20,
        "the unit's limit in its cgroup"
    );
    fault(port, "leak?mb_per_sec=40&max_mb=220");
    let repair = wait_recovered(&daemon, "target.memory_leak");
    println!("systemd leak: {repair:#}");
    assert_eq!(repair["action"], "raise_memory_limit");
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "systemd.set_limits", "{repair}");
    // What the kernel holds, not only what systemd says.
    assert_eq!(memory_limit_of(first), 384 << 20, "raised by 50 %");
    assert_eq!(
        systemd.main_pid(UNIT).expect("MainPID"),
        first,
        "the same process: no OOM kill, no restart"
    );
    assert!(answers(&health_url));
}
