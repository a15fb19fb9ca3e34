//! The actuators against the real thing: a v1 cgroup of this host (limits written, read back,
//! a value the kernel refuses reported as refused), a real PostgreSQL cluster with real `psql`
//! clients as the target's sessions (a long statement cancelled, an idle transaction and a
//! lock holder terminated, a superuser's session never touched, `ANALYZE`), a unit of a real
//! systemd over D-Bus and a container of a real Docker Engine (restarted, resized, killed).

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use selfheal_daemon::{
    actuators::{
        cgroup::{set_cpu_quota, set_memory_limit, CpuQuota},
        docker,
        postgres::{self, Selector, SessionAction, SessionFilter},
        systemd, ActionError,
    },
    probes::cgroup::Version,
};
use selfheal_e2e::{
    docker::DockerEngine, require_root, systemd::SystemdUser, wait_for, PgCluster, V1Cgroup,
};

/// A v1 `memory` + `cpu` cgroup pair holding one `sleep`, removed on drop.
struct TestCgroup {
    sleeper: Child,
    cgroup: V1Cgroup,
}

impl TestCgroup {
    fn create() -> Self {
        let sleeper = Command::new("sleep").arg("120").spawn().expect("sleep");
        let cgroup = V1Cgroup::create("act", sleeper.id()).expect("v1 cgroup");
        Self { sleeper, cgroup }
    }

    fn dir(&self, controller: &str) -> PathBuf {
        self.cgroup.dir(controller)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Then the cgroup pair goes (its own drop).
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
    }
}

#[test]
fn cgroup_limits_are_applied_read_back_and_refusals_reported() {
    require_root();
    let cgroup = TestCgroup::create();
    let memory = cgroup.dir("memory");
    let cpu = cgroup.dir("cpu");

    let effect = set_memory_limit(Version::V1, &memory, Some(256 << 20)).expect("set");
    assert_eq!(effect.before, "unlimited");
    assert_eq!(effect.after, format!("{} bytes", 256 << 20));
    let file = std::fs::read_to_string(memory.join("memory.limit_in_bytes")).expect("read");
    assert_eq!(
        file.trim(),
        (256u64 << 20).to_string(),
        "the kernel holds it"
    );
    // Not page-aligned: the kernel rounds down, which counts as applied.
    let effect = set_memory_limit(Version::V1, &memory, Some((300 << 20) + 123)).expect("raise");
    assert_eq!(effect.after, format!("{} bytes", 300 << 20));
    let effect = set_memory_limit(Version::V1, &memory, None).expect("unlimit");
    assert_eq!(effect.after, "unlimited");

    let half = CpuQuota {
        quota_us: 50_000,
        period_us: 100_000,
    };
    let effect = set_cpu_quota(Version::V1, &cpu, Some(half)).expect("quota");
    assert_eq!(
        (effect.before.as_str(), effect.after.as_str()),
        ("unlimited", "50000 µs per 100000 µs")
    );
    // The kernel refuses a quota under 1 ms: a failed action, and the old quota stays.
    let err = set_cpu_quota(
        Version::V1,
        &cpu,
        Some(CpuQuota {
            quota_us: 500,
            period_us: 100_000,
        }),
    )
    .expect_err("under the kernel's minimum");
    assert!(matches!(err, ActionError::Refused { .. }), "{err}");
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("read");
    assert_eq!(quota.trim(), "50000");
    set_cpu_quota(Version::V1, &cpu, None).expect("unlimited");
}

/// A `psql` session of `user` named `backend`, fed `script` on stdin and kept open.
fn session(pg: &PgCluster, user: &str, script: &str) -> Child {
    let mut child = Command::new(pg.program("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1"])
        .args(["-p", &pg.port.to_string(), "-U", user, "-d", "postgres"])
        .env("PGAPPNAME", "backend")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("feed psql");
    child
}

/// Closes a session's stdin and returns what it printed on stderr.
fn finish(mut child: Child) -> (bool, String) {
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("psql output");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn sessions_in_state(pg: &PgCluster, user: &str, state: &str) -> usize {
    pg.psql_rows(&format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'backend' \
         AND usename = '{user}' AND state = '{state}' AND wait_event_type IS DISTINCT FROM 'Lock'"
    ))
    .expect("pg_stat_activity")
    .len()
}

#[test]
fn postgres_sessions_of_the_target_are_cancelled_and_terminated_by_rule() {
    require_root();
    let pg = PgCluster::start().expect("PostgreSQL");
    pg.psql(
        "CREATE ROLE app LOGIN; CREATE TABLE leads (id int); INSERT INTO leads VALUES (1); \
         GRANT ALL ON leads TO app",
    )
    .expect("schema");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = runtime
        .block_on(postgres::connect(&pg.url(), None))
        .expect("actuator connects");
    let target = SessionFilter {
        application_name: Some("backend".to_owned()),
        ..SessionFilter::default()
    };

    // No filter: refused, whatever the selector.
    let err = runtime
        .block_on(postgres::act(
            &client,
            &SessionFilter::default(),
            Selector::BlockingOthers,
            |_: &postgres::Session| SessionAction::Terminate,
        ))
        .expect_err("no filter");
    assert!(matches!(err, ActionError::Unsafe(_)), "{err}");

    // A long statement of the target, and the same from a superuser with the same name.
    let long = session(&pg, "app", "SELECT pg_sleep(60);\n");
    let superuser = session(&pg, "postgres", "SELECT pg_sleep(60);\n");
    wait_for("both statements running", Duration::from_secs(10), || {
        (sessions_in_state(&pg, "app", "active") == 1
            && sessions_in_state(&pg, "postgres", "active") == 1)
            .then_some(())
    })
    .expect("running");
    std::thread::sleep(Duration::from_millis(1200));
    let outcomes = runtime
        .block_on(postgres::act(
            &client,
            &target,
            Selector::RunningLongerThan(Duration::from_secs(1)),
            |_: &postgres::Session| SessionAction::Cancel,
        ))
        .expect("cancel");
    assert_eq!(outcomes.len(), 1, "only the target's session: {outcomes:?}");
    let effect = outcomes[0].as_ref().expect("cancel applied");
    assert!(effect.before.starts_with("active"), "{effect:?}");
    assert!(effect.before.contains("pg_sleep"), "{effect:?}");
    let (_, stderr) = finish(long);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql saw the cancel: {stderr}"
    );
    assert_eq!(
        sessions_in_state(&pg, "postgres", "active"),
        1,
        "the superuser's statement is untouched"
    );
    pg.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = 'postgres' AND application_name = 'backend'")
        .expect("end the superuser's sleep");
    drop(finish(superuser));

    // A transaction left idle: terminated once idle for longer than the rule's limit.
    let idle = session(&pg, "app", "BEGIN; SELECT 1;\n");
    wait_for("an idle transaction", Duration::from_secs(10), || {
        (sessions_in_state(&pg, "app", "idle in transaction") == 1).then_some(())
    })
    .expect("idle in transaction");
    let early = runtime
        .block_on(postgres::act(
            &client,
            &target,
            Selector::IdleInTransactionLongerThan(Duration::from_secs(30)),
            |_: &postgres::Session| SessionAction::Terminate,
        ))
        .expect("select");
    assert!(early.is_empty(), "not idle for 30 s yet: {early:?}");
    std::thread::sleep(Duration::from_millis(1200));
    let outcomes = runtime
        .block_on(postgres::act(
            &client,
            &target,
            Selector::IdleInTransactionLongerThan(Duration::from_secs(1)),
            |_: &postgres::Session| SessionAction::Terminate,
        ))
        .expect("terminate");
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let effect = outcomes[0].as_ref().expect("terminate applied");
    assert_eq!(effect.after, "session ended");
    assert_eq!(sessions_in_state(&pg, "app", "idle in transaction"), 0);
    drop(finish(idle));

    // A lock holder blocking another session: terminating it lets the waiter through.
    let holder = session(&pg, "app", "BEGIN; LOCK TABLE leads;\n");
    wait_for("the lock held", Duration::from_secs(10), || {
        (sessions_in_state(&pg, "app", "idle in transaction") == 1).then_some(())
    })
    .expect("holder");
    let waiter = session(&pg, "app", "SELECT count(*) FROM leads;\n");
    let blocked = || {
        pg.psql_rows(
            "SELECT pid FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0",
        )
        .expect("blocked")
        .len()
    };
    wait_for("the waiter blocked", Duration::from_secs(10), || {
        (blocked() == 1).then_some(())
    })
    .expect("waiter blocked");
    let outcomes = runtime
        .block_on(postgres::act(
            &client,
            &target,
            Selector::BlockingOthers,
            |_: &postgres::Session| SessionAction::Terminate,
        ))
        .expect("terminate the blocker");
    assert_eq!(outcomes.len(), 1, "only the holder blocks: {outcomes:?}");
    let effect = outcomes[0].as_ref().expect("applied");
    assert!(effect.before.contains("blocking 1"), "{effect:?}");
    let (waited_ok, stderr) = finish(waiter);
    assert!(waited_ok, "the waiter got its answer: {stderr}");
    assert_eq!(blocked(), 0);
    drop(finish(holder));

    // ANALYZE of a named table, read back from the statistics; a bad name is refused.
    let effect = runtime
        .block_on(postgres::analyze(&client, "public.leads"))
        .expect("analyze");
    assert_ne!(effect.before, effect.after, "{effect:?}");
    let err = runtime
        .block_on(postgres::analyze(&client, "a.b.c"))
        .expect_err("not a table name");
    assert!(matches!(err, ActionError::Unsafe(_)), "{err}");
}

#[test]
fn a_systemd_unit_is_restarted_resized_and_killed_over_dbus() {
    const UNIT: &str = "backend.service";
    require_root();
    let systemd = SystemdUser::start(&[(UNIT, "[Service]\nExecStart=/bin/sleep 3600\n")])
        .expect("systemd --user");
    systemd.unit_job("StartUnit", UNIT).expect("start");
    let first = wait_for("the unit's main process", Duration::from_secs(10), || {
        systemd.main_pid(UNIT).ok().filter(|pid| *pid != 0)
    })
    .expect("MainPID");
    let bus = systemd.bus_address();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    let effect = runtime
        .block_on(systemd::restart(UNIT, &bus, Duration::from_secs(10)))
        .expect("restart");
    let second = systemd.main_pid(UNIT).expect("MainPID");
    assert_ne!(second, first);
    assert_eq!(
        (effect.before, effect.after),
        (format!("main pid {first}"), format!("main pid {second}"))
    );

    let effect = runtime
        .block_on(systemd::set_limits(
            UNIT,
            &bus,
            Some(Some(256 << 20)),
            Some(Some(500_000)),
        ))
        .expect("set limits");
    assert_eq!(effect.before, "MemoryMax=infinity CPUQuota=infinity");
    assert_eq!(effect.after, "MemoryMax=268435456 CPUQuota=50%");
    let path = "/org/freedesktop/systemd1/unit/backend_2eservice";
    let memory_max = systemd
        .busctl(&[
            "get-property",
            "org.freedesktop.systemd1",
            path,
            "org.freedesktop.systemd1.Service",
            "MemoryMax",
        ])
        .expect("busctl");
    assert_eq!(memory_max, "t 268435456", "systemd holds it");
    // Under what the process uses: systemd takes it, the kernel refuses it (v1: EBUSY).
    let refused = runtime
        .block_on(systemd::set_limits(UNIT, &bus, Some(Some(4096)), None))
        .expect_err("a limit under the usage");
    assert!(
        refused
            .to_string()
            .contains("the kernel's limit is 268435456"),
        "{refused}"
    );
    let effect = runtime
        .block_on(systemd::set_limits(UNIT, &bus, Some(None), None))
        .expect("unlimit memory");
    assert_eq!(effect.after, "MemoryMax=infinity CPUQuota=50%");

    let effect = runtime
        .block_on(systemd::kill_main(UNIT, &bus, 9))
        .expect("kill");
    assert_eq!(effect.before, format!("main pid {second}"));
    wait_for("the killed process gone", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{second}")).exists()).then_some(())
    })
    .expect("gone");
}

#[test]
fn a_container_is_restarted_resized_and_its_exit_read_through_the_engine_api() {
    require_root();
    let engine = DockerEngine::start().expect("dockerd");
    let name = format!("selfheal-act-{}", std::process::id());
    let first = engine.start_sleeper(&name).expect("a sleeping container");
    let socket = engine.socket();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // busybox sleep as PID 1 ignores SIGTERM: the engine kills it after the 1 s timeout.
    let effect = runtime
        .block_on(docker::restart(&socket, &name, Duration::from_secs(1)))
        .expect("restart");
    let second = engine.pid(&name).expect("new pid");
    assert_ne!(second, first);
    assert!(
        effect
            .before
            .starts_with(&format!("running as pid {first} ")),
        "{effect:?}"
    );
    assert!(
        effect
            .after
            .starts_with(&format!("running as pid {second} ")),
        "{effect:?}"
    );

    let effect = runtime
        .block_on(docker::update(
            &socket,
            &name,
            Some(128 << 20),
            Some(500_000_000),
        ))
        .expect("update");
    assert_eq!(effect.before, "memory unlimited, CPU unlimited");
    assert_eq!(effect.after, "memory 134217728 bytes, 0.50 CPUs");
    let memory = engine
        .docker(&["inspect", "-f", "{{.HostConfig.Memory}}", &name])
        .expect("inspect");
    assert_eq!(memory.trim(), "134217728", "the engine holds it");
    // The engine refuses a limit under its minimum (6 MB): a refused action, limits unchanged.
    let err = runtime
        .block_on(docker::update(&socket, &name, Some(1 << 20), None))
        .expect_err("under the engine's minimum");
    assert!(matches!(err, ActionError::Refused { .. }), "{err}");
    let limits = runtime
        .block_on(docker::inspect(&socket, &name))
        .expect("inspect");
    assert_eq!(limits.host_config.memory, 128 << 20);

    engine.docker(&["kill", &name]).expect("kill");
    let stopped = wait_for("the container stopped", Duration::from_secs(10), || {
        runtime
            .block_on(docker::inspect(&socket, &name))
            .ok()
            .filter(|i| !i.state.running)
    })
    .expect("stopped");
    assert_eq!(stopped.state.exit_code, 137, "{stopped:?}");
    assert!(!stopped.state.oom_killed);
}
