//! `cargo xtask demo`: a throwaway PostgreSQL, the demo backend on it, and the daemon watching
//! the backend with `config/demo.toml`, plus light traffic on all five platforms. The daemon
//! heals the backend: the demo adds `[repair]` with self-healing on and the backend's own
//! command line as `start_command` (it names the throwaway database), so a crash or a hang is
//! diagnosed, repaired and verified by selfheal itself. Ctrl-C stops everything, in order, and
//! leaves nothing running.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use selfheal_e2e::{http, Daemon, DemoBackend, PgCluster};

/// The admin token the daemon generates in the state directory `config/demo.toml` names.
const DEMO_TOKEN: &str = "/var/lib/selfheal-demo/admin.token";

/// The ports `config/demo.toml` names.
const BACKEND_PORT: u16 = 8080;
const ADMIN: &str = "127.0.0.1:9797";

const HOSTS: [&str; 5] = [
    "api.leadsite.ai",
    "api.leadsite.io",
    "api.clientcontact.io",
    "api.videosite.io",
    "api.tackle.io",
];
const PATHS: [&str; 9] = [
    "/api/v1/campaigns",
    "/api/v1/campaigns/1",
    "/api/v1/leads",
    "/api/v1/leads/1",
    "/api/v1/websites",
    "/api/v1/videos",
    "/api/v1/conversations",
    "/api/v1/tackle/deals",
    "/health",
];

fn port_free(address: &str) -> bool {
    std::net::TcpListener::bind(address).is_ok()
}

/// Light, steady traffic: a request every 200 ms, cycling through platforms and routes.
fn traffic(backend: SocketAddr, stop: &AtomicBool) {
    let agent = http();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let host = HOSTS[i % HOSTS.len()];
        let path = PATHS[(i / HOSTS.len()) % PATHS.len()];
        let _ = agent
            .get(format!("http://{backend}{path}"))
            .header("Host", host)
            .call();
        if i.is_multiple_of(25) {
            let _ = agent
                .post(format!("http://{backend}/api/v1/auth/login"))
                .header("Host", host)
                .send_json(serde_json::json!({"email": "demo@example.com", "password": "wrong"}));
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills the backends the daemon started (they outlive it by design) when dropped.
struct Reaper;

impl Drop for Reaper {
    fn drop(&mut self) {
        let pattern = format!("demo-backend --listen 127.0.0.1:{BACKEND_PORT}");
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
    }
}

fn status_line(daemon: &Daemon) -> String {
    match daemon.health() {
        Ok(h) => {
            let target = &h["target"];
            let exit = &target["last_exit"];
            let last = if exit.is_null() {
                String::new()
            } else {
                format!(
                    ", last exit: pid {} {}",
                    exit["pid"],
                    exit["reason"].as_str().unwrap_or("?")
                )
            };
            format!(
                "daemon: {} — target {} pid {} restarts {}{last}",
                h["status"].as_str().unwrap_or("?"),
                target["state"].as_str().unwrap_or("?"),
                target["pid"],
                target["restarts"],
            )
        }
        Err(err) => format!("daemon: not answering ({err})"),
    }
}

pub(crate) fn run(duration: Option<Duration>) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo loads eBPF programs and needs root: run `sudo cargo xtask demo`");
    }
    for (address, what) in [
        (format!("127.0.0.1:{BACKEND_PORT}"), "the demo backend"),
        (ADMIN.to_owned(), "the admin API"),
    ] {
        if !port_free(&address) {
            bail!("{address} is in use, and config/demo.toml puts {what} there: is another demo running?");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("cannot catch Ctrl-C")?;
    }

    println!("demo: starting a throwaway PostgreSQL");
    let pg = PgCluster::start()?;
    println!("demo: starting the demo backend on 127.0.0.1:{BACKEND_PORT}");
    let mut backend = DemoBackend::start(&pg.url(), BACKEND_PORT)?;
    println!("demo: starting selfheal with config/demo.toml and self-healing on");
    let scratch = tempfile::Builder::new()
        .prefix("selfheal-demo-")
        .tempdir()?;
    let log = scratch.path().join("selfheal.log");
    let admin: SocketAddr = ADMIN.parse()?;
    let config = scratch.path().join("demo.toml");
    let base = std::fs::read_to_string(crate::root().join("config/demo.toml"))
        .context("reading config/demo.toml")?;
    let start_command = [
        selfheal_e2e::bin("demo-backend").display().to_string(),
        "--listen".to_owned(),
        format!("127.0.0.1:{BACKEND_PORT}"),
        "--database-url".to_owned(),
        pg.url(),
    ];
    std::fs::write(
        &config,
        format!(
            "{base}\n# Added by `cargo xtask demo`: how the backend is started again.\n\
             [repair]\nself_healing = true\nstart_command = {}\n",
            serde_json::to_string(&start_command)?
        ),
    )?;
    let daemon = Daemon::start_with_file(&config, admin, scratch);
    // Whatever backend the daemon started is killed when the demo ends, however it ends.
    let reaper = Reaper;
    let daemon = daemon?;

    let traffic_thread = {
        let stop = stop.clone();
        let address = backend.address;
        std::thread::spawn(move || traffic(address, &stop))
    };

    println!();
    println!("selfheal is watching the demo backend:");
    println!(
        "  dashboard:           http://{ADMIN}/  (the token it asks for: sudo cat {DEMO_TOKEN})"
    );
    println!("  admin API (health):  http://{ADMIN}/api/v1/system/health  (every endpoint: /api/v1/openapi.json)");
    println!("  Prometheus metrics:  http://{ADMIN}/metrics");
    println!("  traffic views:       TOKEN=$(sudo cat {DEMO_TOKEN}); curl -H \"Authorization: Bearer $TOKEN\" 'http://{ADMIN}/api/v1/system/metrics?window=5m'");
    println!(
        "                       (also /api/v1/system/queries, traces, alerts and integrations)"
    );
    println!("  from the shell:      sudo target/debug/selfheal status --config config/demo.toml  (also alerts, repairs, queries)");
    println!("  demo backend:        http://127.0.0.1:{BACKEND_PORT}  (e.g. curl -H 'Host: api.tackle.io' http://127.0.0.1:{BACKEND_PORT}/api/v1/tackle/deals)");
    println!("  break it:            curl -X POST 'http://127.0.0.1:{BACKEND_PORT}/__fault/crash?mode=abort'  (or /__fault/hang)");
    println!("  watch it heal:       curl -H \"Authorization: Bearer $TOKEN\" http://{ADMIN}/api/v1/system/repairs  (also diagnoses, patterns)");
    println!("  PostgreSQL:          {}", pg.url());
    println!("  daemon log:          {}", log.display());
    match duration {
        Some(d) => println!("Stopping by itself in {} s.", d.as_secs()),
        None => println!("Press Ctrl-C to stop everything."),
    }
    println!();

    let started = Instant::now();
    let mut last_status = Instant::now();
    let mut outcome = Ok(());
    let mut exited = false;
    while !stop.load(Ordering::SeqCst) && duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(100));
        if !exited {
            if let Some(status) = backend.proc.try_status() {
                exited = true;
                println!("demo: the backend the demo started exited ({status}); selfheal restarts it (see /api/v1/system/repairs)");
            }
        }
        if last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            println!("{}", status_line(&daemon));
        }
    }
    if outcome.is_ok() {
        let status = daemon.health().context("the daemon stopped answering")?;
        if status["target"]["state"] != "running" {
            outcome = Err(anyhow::anyhow!(
                "the daemon does not see the backend running: {status}"
            ));
        }
    }
    println!("demo: stopping");
    stop.store(true, Ordering::SeqCst);
    let _ = traffic_thread.join();
    drop(daemon);
    drop(reaper);
    drop(backend);
    drop(pg);
    println!("demo: stopped; nothing left running");
    outcome
}
