//! The dashboard in a real browser: Debian's Chromium, driven by playwright-core
//! (`tests/dashboard/dashboard.test.mjs`), against a daemon watching the demo backend. The
//! page asks for the token (a wrong one is refused, the right one kept for the session), loads
//! with no console errors, shows the five platforms, the agents and the charts; a crash of the
//! backend appears as a firing alert without a reload, and acknowledging it from the page
//! changes its state in the API. Screenshots go to `target/dashboard-screenshots/`.

use std::{path::Path, process::Command};

use selfheal_e2e::{
    free_port, require_root, target_dir, wait_for, Daemon, DemoBackend, KeepAlive, PgCluster,
    DEMO_PLATFORMS,
};

const PLATFORMS: &str = "leadsite.ai,leadsite.io,clientcontact.io,videosite.io,tackle.io";

#[test]
fn the_dashboard_shows_the_platforms_and_a_failure_live_and_acknowledges_it() {
    require_root();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboard/dashboard.test.mjs");
    let modules = script
        .with_file_name("node_modules")
        .join("playwright-core");
    assert!(
        Path::new("/usr/bin/chromium").exists() && modules.exists(),
        "this test needs Debian's chromium and playwright-core in tests/dashboard/node_modules: \
         run `cargo xtask setup` (as root)"
    );
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n[monitor]\ninterval_ms = 500\n\n\
         [probes]\npayload_bytes = 256\n{DEMO_PLATFORMS}",
        backend.selector(),
    ))
    .expect("daemon");
    daemon
        .wait_for_target(backend.proc.pid())
        .expect("target found");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut client = KeepAlive::connect(backend.address).expect("connect");
    for host in ["api.tackle.io", "api.leadsite.ai", "api.videosite.io"] {
        for _ in 0..3 {
            assert_eq!(client.get("/api/v1/campaigns", host).expect("request"), 200);
        }
    }
    wait_for(
        "a healthy daemon",
        std::time::Duration::from_secs(10),
        || (daemon.health().ok()?["status"] == "healthy").then_some(()),
    )
    .expect("healthy");

    let shots = target_dir().join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let output = Command::new("node")
        .arg(&script)
        .env("SELFHEAL_URL", format!("http://{}", daemon.admin))
        .env("SELFHEAL_TOKEN", daemon.token.as_deref().expect("token"))
        .env("FAULT_URL", backend.url("/__fault/crash?mode=abort"))
        .env("PLATFORMS", PLATFORMS)
        .env("SCREENSHOTS", &shots)
        .output()
        .expect("run node (install Node.js)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "the dashboard checks failed:\n{stdout}{stderr}"
    );
    for shot in ["1-healthy.png", "2-alert.png", "3-acknowledged.png"] {
        let size = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(size > 10_000, "{shot}: {size} bytes");
    }
    // The page's acknowledgement is the API's.
    let alerts = daemon
        .api("/api/v1/system/alerts?state=acknowledged")
        .expect("alerts");
    assert_eq!(alerts["alerts"][0]["rule"], "target.exited", "{alerts}");
    assert_eq!(
        alerts["alerts"][0]["acknowledged_by"], "dashboard",
        "{alerts}"
    );
}
