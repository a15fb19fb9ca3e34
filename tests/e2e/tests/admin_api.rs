//! The admin API end to end, against a running daemon watching the demo backend: every
//! operation of the served `OpenAPI` document is called (refused without a token and with a
//! wrong one, answered with the envelope with it), the new views carry real data (agents,
//! platforms, the target's CPU and memory, the slowest routes), bad input gets a 4xx with a
//! message, an agent restarts on request, the event stream delivers an alert's lifecycle as it
//! happens, the CLI's `status` exit code follows the daemon's health, and a read-only daemon
//! refuses changes (403) while serving reads, also on its unix socket.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use nix::sys::signal::Signal;
use selfheal_e2e::{
    bin, free_port, http, require_root, wait_for, Daemon, DemoBackend, KeepAlive, PgCluster,
    DEMO_PLATFORMS,
};
use serde_json::{json, Value};

/// `(status, body)` of `method path`, with `token` as the bearer when given; a body that is
/// not JSON comes back as a string.
fn call(
    daemon: &Daemon,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let url = format!("http://{}{path}", daemon.admin);
    let auth = token.map(|t| format!("Bearer {t}"));
    let agent = http();
    let response = match method {
        "GET" => {
            let mut request = agent.get(&url);
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.call()
        }
        "DELETE" => {
            let mut request = agent.delete(&url);
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.call()
        }
        "POST" => {
            let mut request = agent.post(&url).header("Content-Type", "application/json");
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.send(body)
        }
        other => panic!("no {other} in this API"),
    };
    let mut response = response.unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Asserts a refusal: `status`, and the error envelope with a message.
fn refused(answer: &(u16, Value), status: u16, what: &str) {
    assert_eq!(answer.0, status, "{what}: {}", answer.1);
    assert_eq!(answer.1["success"], false, "{what}: {}", answer.1);
    assert!(
        answer.1["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {}",
        answer.1
    );
}

/// Reads the event stream on a plain socket (so the test sees exactly what a browser gets)
/// and passes each `(event, data)` on.
fn stream_events(
    daemon: &Daemon,
    query: &str,
    token: &str,
) -> std::sync::mpsc::Receiver<(String, Value)> {
    let mut socket = std::net::TcpStream::connect(daemon.admin).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_mins(1)))
        .expect("timeout");
    write!(
        socket,
        "GET /api/v1/system/events{query} HTTP/1.1\r\nHost: selfheal\r\n\
         Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kind = String::new();
        for line in BufReader::new(socket).lines() {
            let Ok(line) = line else { return };
            if let Some(name) = line.strip_prefix("event:") {
                name.trim().clone_into(&mut kind);
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                if tx.send((kind.clone(), data)).is_err() {
                    return;
                }
            } else if line.starts_with("HTTP/1.1") && !line.contains(" 200 ") {
                let _ = tx.send(("http_error".to_owned(), Value::String(line)));
                return;
            }
        }
    });
    rx
}

/// Waits for the first streamed event that `matches`.
fn next_event(
    events: &std::sync::mpsc::Receiver<(String, Value)>,
    what: &str,
    matches: impl Fn(&str, &Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match events.recv_timeout(left) {
            Ok((kind, data)) if matches(&kind, &data) => return data,
            Ok((kind, _)) => seen.push(kind),
            Err(_) => break,
        }
    }
    panic!("no {what} on the event stream; saw {seen:?}");
}

#[test]
#[allow(clippy::too_many_lines)] // one daemon, every endpoint: a walk through the contract
fn every_endpoint_answers_checks_its_token_and_its_input_and_streams_events() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n[monitor]\ninterval_ms = 500\n\n\
         [probes]\npayload_bytes = 256\n{DEMO_PLATFORMS}\n\
         [[checks]]\nname = \"backend\"\nkind = \"http\"\nurl = \"{}\"\nplatform = \"tackle.io\"\n\
         interval_ms = 1000\ntimeout_ms = 800\n",
        backend.selector(),
        backend.url("/health"),
    ))
    .expect("daemon");
    daemon
        .wait_for_target(backend.proc.pid())
        .expect("target found");
    let token = daemon.token.clone().expect("token");
    let token = token.as_str();
    std::thread::sleep(Duration::from_millis(300));
    let mut client = KeepAlive::connect(backend.address).expect("connect");
    for _ in 0..5 {
        for (host, path) in [
            ("api.tackle.io", "/api/v1/tackle/deals"),
            ("api.leadsite.ai", "/api/v1/leads"),
        ] {
            assert_eq!(client.get(path, host).expect("request"), 200);
        }
    }

    // The served document lists every operation; each is refused without the token and with a
    // wrong one, unless it is open.
    let (status, doc) = call(&daemon, "GET", "/api/v1/openapi.json", None, "");
    assert_eq!(status, 200, "{doc}");
    let mut operations = Vec::new();
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in methods.as_object().expect("methods") {
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            operations.push((method.to_uppercase(), path.clone(), secured));
        }
    }
    assert!(operations.len() >= 28, "{operations:?}");
    let names: BTreeSet<&str> = operations.iter().map(|(_, p, _)| p.as_str()).collect();
    for contract in [
        "health",
        "health/detailed",
        "dashboard",
        "agents",
        "agents/{name}/restart",
        "alerts",
        "alerts/{id}/acknowledge",
        "alerts/{id}/resolve",
        "metrics",
        "queries",
        "traces",
        "performance",
        "patterns",
        "predictions",
        "repairs",
        "security",
        "integrations",
        "events",
    ] {
        assert!(
            names.contains(format!("/api/v1/system/{contract}").as_str()),
            "{contract} is not in the document"
        );
    }
    for (method, path, secured) in &operations {
        let concrete = path
            .replace("{id}", "1")
            .replace("{name}", "monitor")
            .replace("{signature}", "target.crashed");
        if *secured {
            refused(
                &call(&daemon, method, &concrete, None, "{}"),
                401,
                &format!("{method} {path} without a token"),
            );
            refused(
                &call(
                    &daemon,
                    method,
                    &concrete,
                    Some("not-the-token-at-all"),
                    "{}",
                ),
                401,
                &format!("{method} {path} with a wrong token"),
            );
        } else {
            let (status, _) = call(&daemon, method, &concrete, None, "");
            assert_eq!(status, 200, "{method} {path} is open");
        }
    }
    // Every read answers with the envelope (the event stream has its own test below).
    for (method, path, _) in &operations {
        if method != "GET" || path.contains('{') || path.ends_with("/events") {
            continue;
        }
        let (status, body) = call(&daemon, method, path, Some(token), "");
        assert_eq!(status, 200, "GET {path}: {body}");
        if path.starts_with("/api/v1/system/") {
            assert_eq!(body["success"], true, "GET {path}: {body}");
            assert!(
                body["data"].is_object() || body["data"].is_array(),
                "GET {path}: {body}"
            );
        }
    }
    let (_, page) = call(&daemon, "GET", "/", None, "");
    assert!(
        page.as_str()
            .is_some_and(|p| p.contains("<title>selfheal</title>")),
        "the dashboard page: {page}"
    );

    // The views carry what the daemon knows.
    let dashboard = daemon.api("/api/v1/system/dashboard").expect("dashboard");
    let platforms: BTreeSet<&str> = dashboard["platforms"]
        .as_array()
        .expect("platforms")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    for name in [
        "leadsite.ai",
        "leadsite.io",
        "clientcontact.io",
        "videosite.io",
        "tackle.io",
    ] {
        assert!(platforms.contains(name), "{name}: {dashboard}");
    }
    assert_eq!(
        dashboard["agents"].as_array().map(Vec::len),
        Some(7),
        "{dashboard}"
    );
    assert_eq!(
        dashboard["system"]["target"]["pid"],
        backend.proc.pid(),
        "{dashboard}"
    );
    let tackle = wait_for(
        "tackle.io's check and traffic",
        Duration::from_secs(10),
        || {
            let dashboard = daemon.api("/api/v1/system/dashboard").ok()?;
            let tackle = dashboard["platforms"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == "tackle.io")?
                .clone();
            (tackle["checks"][0]["status"] == "healthy" && tackle["traffic"]["requests"] == 5)
                .then_some(tackle)
        },
    )
    .expect("tackle.io at a glance");
    assert_eq!(tackle["status"], "healthy", "{tackle}");
    let detailed = wait_for("a process sample", Duration::from_secs(10), || {
        let detailed = daemon.api("/api/v1/system/health/detailed").ok()?;
        detailed["process"]["pid"].is_u64().then_some(detailed)
    })
    .expect("health/detailed");
    assert_eq!(detailed["process"]["pid"], backend.proc.pid(), "{detailed}");
    assert!(
        detailed["host"]["memory_total_bytes"].as_u64() > Some(0),
        "{detailed}"
    );
    assert_eq!(detailed["integrations"][0]["name"], "backend", "{detailed}");
    assert!(
        detailed["store"]["max_series"].as_u64() > Some(0),
        "{detailed}"
    );
    let series = wait_for(
        "the target's CPU and memory",
        Duration::from_secs(10),
        || {
            let series = daemon
                .api("/api/v1/system/metrics?window=1h&step=1m")
                .ok()?;
            series["target"]
                .as_array()?
                .iter()
                .any(|p| p["memory_bytes"].as_u64() > Some(0))
                .then_some(series)
        },
    )
    .expect("resource series");
    assert_eq!(
        series["target"].as_array().map(Vec::len),
        Some(60),
        "{series}"
    );
    let performance = daemon
        .api("/api/v1/system/performance")
        .expect("performance");
    let routes: Vec<&str> = performance["slowest_routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| r["route"].as_str())
        .collect();
    assert!(routes.contains(&"/api/v1/tackle/deals"), "{performance}");
    assert!(performance["optimizations"].is_array(), "{performance}");
    let predictions = daemon
        .api("/api/v1/system/predictions")
        .expect("predictions");
    assert_eq!(predictions["agent_enabled"], true, "{predictions}");
    assert!(predictions["predictions"].is_array(), "{predictions}");
    // The reader publishes its TCP summary once per report interval: wait for the first
    // one that holds the requests above.
    let security = wait_for(
        "the security view's accepted connections",
        Duration::from_secs(10),
        || {
            let security = daemon.api("/api/v1/system/security").ok()?;
            (security["connections"]["accepts"].as_u64() >= Some(1)).then_some(security)
        },
    )
    .unwrap_or_else(|err| {
        panic!(
            "{err:#}: {}",
            daemon.api("/api/v1/system/security").unwrap_or_default()
        )
    });
    assert!(security["findings"].is_array(), "{security}");
    let queries = daemon.api("/api/v1/system/queries").expect("queries");
    assert!(
        queries["queries"].as_array().is_some_and(|q| !q.is_empty()),
        "the backend's queries: {queries}"
    );

    // Bad input: a 4xx that says what is wrong.
    for (method, path, body, status) in [
        ("GET", "/api/v1/system/alerts/999999", "", 404),
        ("GET", "/api/v1/system/alerts/not-a-number", "", 404),
        ("GET", "/api/v1/system/alerts?limit=0", "", 400),
        ("GET", "/api/v1/system/alerts?state=sideways", "", 400),
        ("GET", "/api/v1/system/alerts?colour=red", "", 400),
        ("GET", "/api/v1/system/metrics?window=forever", "", 400),
        ("GET", "/api/v1/system/metrics?platform=nowhere.io", "", 400),
        ("GET", "/api/v1/system/predictions?limit=0", "", 400),
        ("GET", "/api/v1/system/repairs?limit=5000", "", 400),
        ("GET", "/api/v1/system/events?types=alerts", "", 400),
        (
            "POST",
            "/api/v1/system/alerts/1/acknowledge",
            "{not json",
            400,
        ),
        ("POST", "/api/v1/system/alerts/999999/resolve", "{}", 404),
        ("POST", "/api/v1/system/agents/janitor/restart", "{}", 404),
        (
            "POST",
            "/api/v1/system/agents/monitor/restart",
            "[1, 2]",
            400,
        ),
        (
            "POST",
            "/api/v1/system/checks/run",
            r#"{"name": "nope"}"#,
            404,
        ),
        (
            "POST",
            "/api/v1/system/repairs/circuits/target.crashed/reset",
            "{}",
            409,
        ),
        (
            "POST",
            "/api/v1/system/silences",
            r#"{"matchers": {}}"#,
            400,
        ),
        ("GET", "/api/v1/system/nothing-here", "", 404),
        ("DELETE", "/api/v1/system/agents", "", 405),
        (
            "POST",
            "/api/v1/system/alerts/1/acknowledge",
            r#"{"by": "rule"}"#,
            400,
        ),
    ] {
        refused(
            &call(&daemon, method, path, Some(token), body),
            status,
            &format!("{method} {path} {body}"),
        );
    }

    // An agent restarts on request.
    let (status, body) = call(
        &daemon,
        "POST",
        "/api/v1/system/agents/security/restart",
        Some(token),
        r#"{"by": "tester", "note": "rule change"}"#,
    );
    assert_eq!(status, 202, "{body}");
    wait_for(
        "the security agent's restart",
        Duration::from_secs(5),
        || {
            let agents = daemon.api("/api/v1/system/agents").ok()?;
            let security = agents["agents"]
                .as_array()?
                .iter()
                .find(|a| a["name"] == "security")?
                .clone();
            (security["restarts"] == 1 && security["state"] == "running").then_some(())
        },
    )
    .expect("restarted");

    // Healthy: `selfheal status` says so and exits 0.
    wait_for("a healthy daemon", Duration::from_secs(10), || {
        (daemon.health().ok()?["status"] == "healthy").then_some(())
    })
    .expect("healthy");
    let (code, out, err) = daemon.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("healthy") && out.contains("7 of 7 running"),
        "{out}"
    );
    assert!(out.contains("tackle.io healthy"), "{out}");

    // The event stream: an alert's lifecycle arrives as it happens.
    let events = stream_events(&daemon, "?types=alert_changed,target_exited", token);
    let hello = next_event(&events, "hello", |kind, _| kind == "hello");
    assert_eq!(
        hello["types"],
        json!(["alert_changed", "target_exited"]),
        "{hello}"
    );
    backend.proc.signal(Signal::SIGKILL).expect("kill");
    let exited = next_event(&events, "target_exited", |kind, _| kind == "target_exited");
    assert_eq!(exited["pid"], backend.proc.pid(), "{exited}");
    let fired = next_event(&events, "the alert firing", |kind, data| {
        kind == "alert_changed" && data["rule"] == "target.exited"
    });
    assert_eq!(fired["state"], "firing", "{fired}");
    assert_eq!(fired["by"], "rule", "{fired}");
    assert!(fired["at_unix_ms"].is_i64(), "{fired}");
    let id = fired["id"].as_i64().expect("id");
    let (status, body) = call(
        &daemon,
        "POST",
        &format!("/api/v1/system/alerts/{id}/acknowledge"),
        Some(token),
        r#"{"by": "tester"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let acknowledged = next_event(&events, "the acknowledgement", |kind, data| {
        kind == "alert_changed" && data["id"] == id
    });
    assert_eq!(acknowledged["state"], "acknowledged", "{acknowledged}");
    assert_eq!(acknowledged["by"], "tester", "{acknowledged}");

    // Critical now: `status` exits 1 and says why; the other client commands work.
    let (code, out, err) = daemon.cli(&["status"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("- critical") && out.contains(" critical, "),
        "{out}"
    );
    let (code, out, err) = daemon.cli(&["status", "--json"]);
    assert_eq!(code, 1, "{err}");
    let status_json: Value = serde_json::from_str(&out).expect("status --json");
    assert_eq!(status_json["system"]["status"], "critical", "{out}");
    let (code, out, err) = daemon.cli(&["queries", "--limit", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("COUNT") && out.contains("fingerprint(s)"),
        "{out}"
    );
    let (code, out, err) = daemon.cli(&["repairs", "--json"]);
    assert_eq!(code, 0, "{err}");
    let repairs: Value = serde_json::from_str(&out).expect("repairs --json");
    assert_eq!(repairs["self_healing"], false, "{out}");
    let (code, _, err) = daemon.cli_at("127.0.0.1:1", &["status"]);
    assert_eq!(code, 69, "{err}");

    // The changes the document lists, for real.
    let (status, body) = call(
        &daemon,
        "GET",
        &format!("/api/v1/system/alerts/{id}"),
        Some(token),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &daemon,
        "POST",
        "/api/v1/system/silences",
        Some(token),
        r#"{"matchers": {"rule": "target.exited"}, "duration": "1h", "by": "tester"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let silence = body["data"]["id"].as_i64().expect("silence id");
    let (status, body) = call(
        &daemon,
        "DELETE",
        &format!("/api/v1/system/silences/{silence}"),
        Some(token),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &daemon,
        "POST",
        "/api/v1/system/checks/run",
        Some(token),
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"][0]["status"], "down",
        "the backend is gone: {body}"
    );
    let (status, body) = call(
        &daemon,
        "POST",
        &format!("/api/v1/system/alerts/{id}/resolve"),
        Some(token),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let counts = daemon.api("/api/v1/system/dashboard").expect("dashboard")["alerts"].clone();
    assert!(counts["total"].as_i64() >= Some(1), "{counts}");

    // An open event stream does not hold the daemon up when it is told to stop.
    let mut daemon = daemon;
    daemon.proc.signal(Signal::SIGTERM).expect("stop");
    let status = daemon
        .proc
        .wait_timeout(Duration::from_secs(4))
        .expect("the daemon stops with a stream open");
    assert!(status.success(), "{status}");
}

#[test]
fn a_read_only_daemon_refuses_changes_and_serves_its_unix_socket() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let mut daemon = Daemon::start_admin(
        &format!(
            "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n",
            backend.selector()
        ),
        "read_only = true\nsocket = \"{dir}/run/admin.sock\"",
    )
    .expect("daemon");
    let token = daemon.token.clone().expect("token");
    let socket = daemon.dir.path().join("run/admin.sock");

    for (path, body) in [
        ("/api/v1/system/agents/monitor/restart", "{}"),
        ("/api/v1/system/checks/run", "{}"),
        ("/api/v1/system/alerts/1/acknowledge", "{}"),
        (
            "/api/v1/system/silences",
            r#"{"matchers": {"rule": "x"}, "duration": "1h"}"#,
        ),
    ] {
        refused(&call(&daemon, "POST", path, Some(&token), body), 403, path);
        // The token is checked first: a stranger learns nothing about the mode.
        refused(&call(&daemon, "POST", path, None, body), 401, path);
    }
    // `status` needs no token: without one it reads the open health endpoint.
    wait_for("a healthy daemon", Duration::from_secs(10), || {
        (daemon.health().ok()?["status"] == "healthy").then_some(())
    })
    .expect("healthy");
    let (code, out, err) = daemon.cli(&["status", "--token-file", "/nonexistent/admin.token"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("healthy") && out.contains("from /health only"),
        "{out}"
    );
    let agents = daemon.api("/api/v1/system/agents").expect("reads work");
    assert_eq!(agents["agents"][0]["restarts"], 0, "{agents}");
    let detailed = daemon
        .api("/api/v1/system/health/detailed")
        .expect("detailed");
    assert_eq!(
        detailed["self_healing"]["read_only_api"], true,
        "{detailed}"
    );

    // The unix socket: the daemon's user only, the same API, the same token.
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let over_socket = |auth: &str| {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        write!(
            stream,
            "GET /api/v1/system/agents HTTP/1.1\r\nHost: selfheal\r\n{auth}Connection: close\r\n\r\n"
        )
        .expect("request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        answer
    };
    let answer = over_socket(&format!("Authorization: Bearer {token}\r\n"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(r#""success":true"#) && answer.contains("\"monitor\""),
        "{answer}"
    );
    let answer = over_socket("");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The CLI on the socket: reads work, a change is refused with the daemon's reason.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(bin("selfheal"))
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env("SELFHEAL_ADMIN_TOKEN", &token)
            .output()
            .expect("run the CLI");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("7 of 7 running"), "{out}");
    let (code, out, err) = cli(&["alerts", "--state", "all", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"alerts\""), "{out}");
    let (code, _, err) = cli(&["ack", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(403)") && err.contains("read-only"), "{err}");

    daemon.proc.signal(Signal::SIGTERM).expect("stop");
    daemon
        .proc
        .wait_timeout(Duration::from_secs(10))
        .expect("stopped");
    assert!(!socket.exists(), "the socket file is removed at exit");
}
