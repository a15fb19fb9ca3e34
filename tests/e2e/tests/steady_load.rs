//! No noise: the demo backend serving a steady, paced load on its five platforms for three
//! minutes, watched with payload capture, its health URL and its database checked every
//! second, raises no alert at all — while every rule had data to judge (each platform's
//! requests are in the store, every check ran). Then the backend answers 500 to every API
//! request: the platforms' `http.error_rate` alerts fire, critical, from the same traffic
//! rules, so the quiet before was not a rule that never looks. Last, the backend hangs:
//! `target.not_answering` fires, and clears when it answers again.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use selfheal_e2e::{
    free_port,
    load::{self, Amount, Call, Mix},
    require_root, wait_for, Daemon, DemoBackend, KeepAlive, PgCluster, DEMO_PLATFORMS,
};
use serde_json::Value;

const STEADY: Duration = Duration::from_mins(3);
/// About 100 requests a second: bursts of 20 every 200 ms.
const BURST: u64 = 20;
const PAUSE: Duration = Duration::from_millis(200);

/// The health URL, checked every second and labelled with its platform.
const HEALTH_CHECK: &str = r#"
[[checks]]
name = "leadsite.ai health"
kind = "http"
url = "HEALTH"
interval_ms = 1000
timeout_ms = 800
platform = "leadsite.ai"
"#;

fn mix() -> Mix {
    Mix::new(vec![
        (
            2,
            Call::get(
                "api.leadsite.ai",
                "/api/v1/campaigns/1",
                "leadsite.ai",
                "/api/v1/campaigns/:id",
            ),
        ),
        (
            2,
            Call::get(
                "leadsite.io",
                "/api/v1/campaigns",
                "leadsite.io",
                "/api/v1/campaigns",
            ),
        ),
        (
            2,
            Call::get(
                "clientcontact.io",
                "/api/v1/conversations",
                "clientcontact.io",
                "/api/v1/conversations",
            ),
        ),
        (
            2,
            Call::get(
                "videosite.io",
                "/api/v1/videos",
                "videosite.io",
                "/api/v1/videos",
            ),
        ),
        (
            2,
            Call::get(
                "api.tackle.io",
                "/api/v1/tackle/deals",
                "tackle.io",
                "/api/v1/tackle/deals",
            ),
        ),
    ])
}

/// Every alert the daemon ever recorded, in any state.
fn all_alerts(daemon: &Daemon) -> Vec<Value> {
    daemon
        .api("/api/v1/system/alerts?state=all")
        .expect("alerts")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Drives the mix in paced bursts on `conns` until `stop`; the requests sent.
fn paced(conns: &mut [KeepAlive], mix: &Mix, stop: &AtomicBool) -> u64 {
    let mut sent = 0;
    while !stop.load(Ordering::SeqCst) {
        let report = load::run_on(conns, mix, Amount::Requests(BURST)).expect("load");
        sent += report.total();
        std::thread::sleep(PAUSE);
    }
    sent
}

#[test]
fn a_healthy_backend_under_steady_load_raises_no_alert() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let extra = format!(
        "\n[monitor]\ninterval_ms = 1000\nnot_answering_secs = 5\n\n[database]\nurl = \"{}\"\n{}",
        pg.url(),
        DEMO_PLATFORMS.to_owned() + &HEALTH_CHECK.replace("HEALTH", &backend.url("/health"))
    );
    let daemon = Daemon::capturing(&backend, 512, &extra).expect("daemon");
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mix = mix();
    let stop = AtomicBool::new(false);

    let started = Instant::now();
    let sent = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut conns: Vec<KeepAlive> = (0..2)
                .map(|_| KeepAlive::connect(address).expect("connect"))
                .collect();
            paced(&mut conns, &mix, &stop)
        });
        // Watch as it goes: the first alert fails the test at once, with what it says.
        while started.elapsed() < STEADY {
            std::thread::sleep(Duration::from_secs(5));
            let alerts = all_alerts(&daemon);
            if !alerts.is_empty() {
                stop.store(true, Ordering::SeqCst);
                panic!(
                    "an alert under steady healthy load after {:?}: {alerts:#?}",
                    started.elapsed()
                );
            }
        }
        stop.store(true, Ordering::SeqCst);
        load.join().expect("load thread")
    });
    println!("steady load: {sent} requests in {:?}", started.elapsed());
    assert!(sent > 10_000, "the load sent only {sent} requests");

    // Every rule had something to judge: each platform's requests over the last minute are
    // in the store (well above the rules' 20-request minimum), and every check ran.
    let metrics = daemon
        .api("/api/v1/system/metrics?window=1m")
        .expect("metrics");
    for platform in [
        "leadsite.ai",
        "leadsite.io",
        "clientcontact.io",
        "videosite.io",
        "tackle.io",
    ] {
        let figures = metrics["platforms"]
            .as_array()
            .expect("platforms")
            .iter()
            .find(|p| p["platform"] == platform)
            .unwrap_or_else(|| panic!("no traffic of {platform} in {metrics}"));
        assert!(figures["requests"].as_u64() > Some(200), "{figures}");
        assert_eq!(figures["errors"], 0, "{figures}");
    }
    let integrations = daemon
        .api("/api/v1/system/integrations")
        .expect("integrations");
    assert_eq!(integrations["total"], 2, "{integrations}");
    assert_eq!(integrations["healthy"], 2, "{integrations}");
    for check in integrations["checks"].as_array().expect("checks") {
        // The health URL every second; `DATABASE_URL`'s implied check every 30 s.
        let least = if check["name"] == "database" { 6 } else { 150 };
        assert!(check["runs_24h"].as_u64() >= Some(least), "{check}");
        assert_eq!(check["success_rate_24h_percent"], 100.0, "{check}");
    }
    assert!(all_alerts(&daemon).is_empty());
    let health = daemon.health().expect("health");
    assert_eq!(health["status"], "healthy", "{health}");

    // The same rules on the same traffic see a real problem.
    backend.fault("errors?secs=120").expect("inject 500s");
    let stop = AtomicBool::new(false);
    let fired = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut conns: Vec<KeepAlive> = (0..2)
                .map(|_| KeepAlive::connect(address).expect("connect"))
                .collect();
            paced(&mut conns, &mix, &stop)
        });
        let fired = wait_for(
            "critical http.error_rate alerts on every platform",
            Duration::from_mins(1),
            || {
                let alerts: Vec<Value> = all_alerts(&daemon)
                    .into_iter()
                    .filter(|a| a["rule"] == "http.error_rate" && a["severity"] == "critical")
                    .collect();
                (alerts.len() == 5).then_some(alerts)
            },
        );
        stop.store(true, Ordering::SeqCst);
        let _ = load.join();
        fired
    })
    .expect("error-rate alerts");
    let mut platforms: Vec<&str> = fired
        .iter()
        .map(|a| a["labels"]["platform"].as_str().expect("platform label"))
        .collect();
    platforms.sort_unstable();
    assert_eq!(
        platforms,
        [
            "clientcontact.io",
            "leadsite.ai",
            "leadsite.io",
            "tackle.io",
            "videosite.io"
        ]
    );
    for alert in &fired {
        assert_eq!(alert["state"], "firing", "{alert}");
        let message = alert["message"].as_str().unwrap_or_default();
        assert!(message.contains("answered 5xx"), "{alert}");
    }

    // The backend hangs: requests wait and nothing is answered.
    backend.fault("clear").expect("clear the 500s");
    backend.fault("hang").expect("hang");
    let waiting: Vec<std::net::TcpStream> = ["leadsite.io", "tackle.io", "videosite.io"]
        .iter()
        .map(|host| unanswered(address, host))
        .collect();
    let hung = wait_for(
        "the target.not_answering alert",
        Duration::from_secs(30),
        || {
            all_alerts(&daemon)
                .into_iter()
                .find(|a| a["rule"] == "target.not_answering" && a["state"] == "firing")
        },
    )
    .expect("not answering");
    assert_eq!(hung["severity"], "critical", "{hung}");
    let message = hung["message"].as_str().unwrap_or_default();
    // Ours, and the daemon's own health check of the backend.
    let waiting_count: usize = message
        .split(": ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(waiting_count >= 3, "{hung}");
    backend.fault("clear").expect("clear the hang");
    wait_for(
        "target.not_answering resolved",
        Duration::from_secs(30),
        || {
            all_alerts(&daemon)
                .into_iter()
                .find(|a| a["id"] == hung["id"] && a["state"] == "resolved")
        },
    )
    .expect("answering again");
    drop(waiting);
}

/// Sends a request on a new connection and leaves it waiting for its answer.
fn unanswered(address: std::net::SocketAddr, host: &str) -> std::net::TcpStream {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(
        stream,
        "GET /api/v1/campaigns HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
    )
    .expect("send");
    stream
}
