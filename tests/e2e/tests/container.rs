//! The target as a container of a real Docker Engine (a private dockerd, see
//! `selfheal_e2e::docker`): the daemon finds its process through the Engine API's inspect,
//! follows `docker restart` to the new process, and sees `docker kill` with its signal.

use std::time::Duration;

use selfheal_e2e::{docker::DockerEngine, require_root, wait_for, Daemon};

#[test]
fn a_container_is_found_through_the_engine_api_and_followed_across_restarts() {
    require_root();
    let engine = DockerEngine::start().expect("dockerd");
    let name = format!("selfheal-backend-{}", std::process::id());
    let first = engine.start_sleeper(&name).expect("a sleeping container");
    assert_ne!(first, 0);

    let daemon = Daemon::start(&format!(
        "[target]\ncontainer = \"{name}\"\ndocker_socket = \"{}\"\npoll_interval_ms = 100\n",
        engine.socket().display()
    ))
    .expect("daemon");
    daemon.wait_for_target(first).expect("container resolved");

    // busybox sleep as PID 1 ignores SIGTERM, so the engine kills it after the 1 s timeout.
    engine
        .docker(&["restart", "-t", "1", &name])
        .expect("restart");
    let second = engine.pid(&name).expect("new pid");
    assert_ne!(second, first);
    let health = daemon.wait_for_target(second).expect("restart followed");
    assert_eq!(health["target"]["restarts"], 1, "{health}");
    assert_eq!(health["target"]["last_exit"]["pid"], first, "{health}");
    assert_eq!(
        health["target"]["last_exit"]["reason"], "SIGKILL",
        "{health}"
    );

    engine.docker(&["kill", &name]).expect("kill");
    let exit = daemon.wait_for_exit(second).expect("exit reported");
    // PID 1 of a PID namespace gets only the signals it handles, and SIGKILL: `docker kill`
    // sends SIGKILL by default.
    assert_eq!(exit["reason"], "SIGKILL", "{exit}");
    assert_eq!(exit["source"], "ebpf", "{exit}");
    let health = wait_for(
        "the container to be reported down",
        Duration::from_secs(10),
        || {
            let health = daemon.health().ok()?;
            (health["target"]["state"] == "down").then_some(health)
        },
    )
    .expect("down");
    let error = health["target"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("is not running"), "{health}");
}
