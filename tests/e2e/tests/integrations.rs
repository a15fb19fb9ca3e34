//! Integration checks end to end: a platform's health URL (the demo backend's `/health`), a
//! PostgreSQL check and a TCP check against a real cluster. The cluster is stopped: the
//! Postgres check goes down with the connection error as its last error, the backend's health
//! URL answers 503, the port is closed, and after three failed runs in a row each raises one
//! `check.down` alert;
//! the cluster is started again: both checks are healthy and the alerts resolve by themselves.
//! A cluster that requires TLS: verified against the test CA of `ca_file` (a check's and
//! `database.ca_file`), refused without it (an unknown issuer), and refused in plain text.

use std::time::Duration;

use selfheal_daemon::{actuators::postgres, tls::CaFile};
use selfheal_e2e::{
    free_port, require_root, wait_for, Daemon, DemoBackend, PgCluster, PgOptions, RedisServer,
};
use serde_json::{json, Value};

fn check<'a>(integrations: &'a Value, name: &str) -> &'a Value {
    integrations["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {integrations}"))
}

fn statuses(integrations: &Value) -> Vec<(String, String)> {
    integrations["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn active_check_alerts(daemon: &Daemon) -> Vec<Value> {
    daemon
        .api("/api/v1/system/alerts")
        .ok()
        .and_then(|data| data["alerts"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["rule"] == "check.down")
        .collect()
}

#[test]
fn checks_follow_postgres_and_the_health_url_down_and_back() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let daemon = Daemon::start(&format!(
        r#"[target]
command = "{selector}"
poll_interval_ms = 100

[database]
url = "{pg_url}"

[[platforms]]
name = "leadsite.ai"
hosts = ["leadsite.ai"]
health_url = "{health}"
health_interval_ms = 1000
health_timeout_ms = 800

[[checks]]
name = "postgres"
kind = "postgres"
url = "{pg_url}"
interval_ms = 1000
timeout_ms = 800

[[checks]]
name = "postgres-port"
kind = "tcp"
address = "127.0.0.1:{pg_port}"
interval_ms = 1000
timeout_ms = 500
"#,
        selector = backend.selector(),
        pg_url = pg.url(),
        health = backend.url("/health"),
        pg_port = pg.port,
    ))
    .expect("daemon");

    // Every check healthy; `database.url` is the `postgres` check's URL, so it is not checked
    // twice.
    let healthy = wait_for("every check healthy", Duration::from_secs(20), || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        (data["healthy"] == 3).then_some(data)
    })
    .expect("healthy");
    assert_eq!(healthy["total"], 3, "{healthy}");
    assert_eq!(
        statuses(&healthy),
        [
            ("postgres".to_owned(), "healthy".to_owned()),
            ("postgres-port".to_owned(), "healthy".to_owned()),
            ("leadsite.ai health".to_owned(), "healthy".to_owned()),
        ]
    );
    let postgres = check(&healthy, "postgres");
    assert_eq!(postgres["kind"], "postgres");
    assert_eq!(postgres["origin"], "configured");
    assert_eq!(postgres["success_rate_24h_percent"], 100.0, "{postgres}");
    assert_eq!(postgres["uptime_30d_percent"], 100.0, "{postgres}");
    assert_eq!(postgres["postgres"]["max_connections"], 100, "{postgres}");
    // The demo backend's pool holds sessions, and the check sees its own.
    assert!(
        postgres["postgres"]["connections"].as_i64() >= Some(1),
        "{postgres}"
    );
    assert!(postgres["response_ms"].as_f64() > Some(0.0), "{postgres}");
    let site = check(&healthy, "leadsite.ai health");
    assert_eq!(site["origin"], "platform_health");
    assert_eq!(site["platform"], "leadsite.ai");
    assert_eq!(site["interval_ms"], 1000);
    assert_eq!(site["stale"], false);

    // On demand: every check runs now; an unknown name is a 404, a bad body a 400.
    let (status, ran) = daemon
        .api_post("/api/v1/system/checks/run", &json!({}))
        .expect("run");
    assert_eq!(status, 200, "{ran}");
    let ran = ran["data"].as_array().expect("results").clone();
    assert_eq!(ran.len(), 3, "{ran:?}");
    assert!(
        ran.iter()
            .all(|r| r["ran"] == true && r["status"] == "healthy"),
        "{ran:?}"
    );
    let (status, body) = daemon
        .api_post("/api/v1/system/checks/run", &json!({"name": "nope"}))
        .expect("run");
    assert_eq!(status, 404, "{body}");
    let (status, body) = daemon
        .api_post("/api/v1/system/checks/run", &json!({"nmae": "postgres"}))
        .expect("run");
    assert_eq!(status, 400, "{body}");
    assert!(active_check_alerts(&daemon).is_empty());

    // The database goes away.
    pg.stop_server().expect("stop postgres");
    let alerts = wait_for("three check.down alerts", Duration::from_secs(30), || {
        let alerts = active_check_alerts(&daemon);
        (alerts.len() == 3).then_some(alerts)
    })
    .expect("alerts");
    let mut checks: Vec<&str> = alerts
        .iter()
        .map(|a| a["labels"]["check"].as_str().expect("check label"))
        .collect();
    checks.sort_unstable();
    assert_eq!(
        checks,
        ["leadsite.ai health", "postgres", "postgres-port"],
        "{alerts:?}"
    );
    for alert in &alerts {
        assert_eq!(alert["severity"], "critical", "{alert}");
        assert_eq!(alert["count"], 1, "{alert}");
    }
    let site_alert = alerts
        .iter()
        .find(|a| a["labels"]["check"] == "leadsite.ai health")
        .expect("site alert");
    assert_eq!(
        site_alert["labels"]["platform"], "leadsite.ai",
        "{site_alert}"
    );
    assert_eq!(
        site_alert["group"]["key"], "platform=leadsite.ai",
        "{site_alert}"
    );
    let down = daemon
        .api("/api/v1/system/integrations")
        .expect("integrations");
    let postgres = check(&down, "postgres");
    assert_eq!(postgres["status"], "down", "{postgres}");
    assert!(
        postgres["consecutive_failures"].as_u64() >= Some(3),
        "{postgres}"
    );
    let last_error = postgres["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("cannot connect: ") && last_error.contains("onnection refused"),
        "{postgres}"
    );
    assert!(
        postgres["success_rate_24h_percent"].as_f64() < Some(100.0),
        "{postgres}"
    );
    let site = check(&down, "leadsite.ai health");
    assert_eq!(site["status"], "down", "{site}");
    assert_eq!(
        site["last_error"], "answered 503 Service Unavailable (expected 2xx)",
        "{site}"
    );
    assert_eq!(check(&down, "postgres-port")["status"], "down", "{down}");
    assert_eq!(
        daemon
            .metric("selfheal_check_up{check=\"postgres\"}")
            .expect("metrics"),
        Some(0.0)
    );

    // It comes back: healthy again, and the alerts resolve by themselves.
    pg.start_server().expect("start postgres");
    wait_for("every check healthy again", Duration::from_secs(30), || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        (data["healthy"] == 3).then_some(())
    })
    .expect("healthy again");
    wait_for("the alerts resolved", Duration::from_secs(10), || {
        active_check_alerts(&daemon).is_empty().then_some(())
    })
    .expect("resolved");
    let history = daemon
        .api("/api/v1/system/alerts?state=resolved")
        .expect("history");
    let resolved: Vec<&Value> = history["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter(|a| a["rule"] == "check.down")
        .collect();
    assert_eq!(resolved.len(), 3, "{history}");
    for alert in resolved {
        assert_eq!(alert["resolved_by"], "rule", "{alert}");
    }
    let postgres = check(
        &daemon
            .api("/api/v1/system/integrations")
            .expect("integrations"),
        "postgres",
    )
    .clone();
    assert_eq!(postgres["consecutive_failures"], 0, "{postgres}");
    assert_eq!(postgres["message"], Value::Null, "{postgres}");
    // The last error stays on record.
    assert!(postgres["last_error"].is_string(), "{postgres}");
}

/// A Redis check against a real `redis-server` with a password: the right password is
/// healthy, a wrong one is down with the server's refusal (and not the password); the server
/// stops: the check is down with the connection error.
#[test]
fn redis_checks_against_a_real_server() {
    require_root();
    let mut redis = RedisServer::start("e2e-redis-pass").expect("redis-server");
    let daemon = Daemon::start(&format!(
        r#"[target]
pid = {pid}

[redis]
url = "{url}"

[[checks]]
name = "redis-wrong-password"
kind = "redis"
url = "redis://:not-the-password@127.0.0.1:{port}"
interval_ms = 1000
timeout_ms = 500
"#,
        pid = std::process::id(),
        url = redis.url(),
        port = redis.port,
    ))
    .expect("daemon");
    let data = wait_for("both redis checks ran", Duration::from_secs(20), || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        (data["healthy"] == 1 && data["down"] == 1).then_some(data)
    })
    .expect("ran");
    // `REDIS_URL`'s check is implicit: named `redis`, every 30 s.
    let implied = check(&data, "redis");
    assert_eq!(implied["origin"], "redis", "{implied}");
    assert_eq!(implied["status"], "healthy", "{implied}");
    assert_eq!(implied["interval_ms"], 30_000, "{implied}");
    assert_eq!(
        implied["endpoint"],
        format!("redis://127.0.0.1:{}", redis.port),
        "{implied}"
    );
    let wrong = check(&data, "redis-wrong-password");
    let message = wrong["last_error"].as_str().unwrap_or_default();
    assert!(message.starts_with("AUTH refused: \"-WRONGPASS"), "{wrong}");
    let text = data.to_string();
    assert!(
        !text.contains("e2e-redis-pass") && !text.contains("not-the-password"),
        "a password leaked: {data}"
    );

    redis.stop();
    let (status, ran) = daemon
        .api_post("/api/v1/system/checks/run", &json!({"name": "redis"}))
        .expect("run");
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["data"][0]["status"], "down", "{ran}");
    let message = ran["data"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("cannot connect: ") && message.contains("onnection refused"),
        "{ran}"
    );
}

#[test]
fn postgres_over_tls_is_verified_against_the_ca_file() {
    require_root();
    let pg = PgCluster::start_with(PgOptions {
        tls: true,
        ..PgOptions::default()
    })
    .expect("postgres with TLS");
    let ca = pg.ca_file().expect("the cluster's CA");
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let daemon = Daemon::start(&format!(
        r#"[target]
pid = {pid}

# The implied `database` check, by host name (the certificate names localhost too).
[database]
url = "postgres://postgres@localhost:{port}/postgres?sslmode=require"
ca_file = "{ca}"

[[checks]]
name = "pg-tls"
kind = "postgres"
url = "{base}?sslmode=require"
ca_file = "{ca}"
interval_ms = 60000
timeout_ms = 5000

[[checks]]
name = "pg-tls-untrusted"
kind = "postgres"
url = "{base}?sslmode=require"
interval_ms = 60000
timeout_ms = 5000

[[checks]]
name = "pg-plain"
kind = "postgres"
url = "{base}?sslmode=disable"
interval_ms = 60000
timeout_ms = 5000
"#,
        pid = std::process::id(),
        port = pg.port,
        ca = ca.display(),
    ))
    .expect("daemon");
    let data = wait_for("every TLS check ran", Duration::from_secs(20), || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        (data["healthy"] == 2 && data["down"] == 2).then_some(data)
    })
    .expect("ran");

    for name in ["pg-tls", "database"] {
        let verified = check(&data, name);
        assert_eq!(verified["status"], "healthy", "{verified}");
        assert_eq!(verified["postgres"]["max_connections"], 100, "{verified}");
    }
    assert_eq!(check(&data, "database")["origin"], "database");
    // Healthy is encrypted: the server takes no TCP login without TLS (pg-plain below).
    let untrusted = check(&data, "pg-tls-untrusted");
    let error = untrusted["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("cannot connect: error performing TLS handshake: ")
            && error.contains("invalid peer certificate")
            && error.contains("UnknownIssuer"),
        "{untrusted}"
    );
    let plain = check(&data, "pg-plain");
    let error = plain["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("cannot connect: ")
            && error.contains("no encryption")
            && error.contains("SQLSTATE 28000"),
        "{plain}"
    );

    // The session actuator connects through the same connector.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let require = format!("{base}?sslmode=require");
    let trusted = CaFile {
        key: "database.ca_file".to_owned(),
        path: ca.clone(),
    };
    let client = runtime
        .block_on(postgres::connect(&require, Some(&trusted)))
        .expect("the actuator connects over TLS");
    let ssl: bool = runtime
        .block_on(client.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        ))
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the actuator's session is not encrypted");
    let error = runtime
        .block_on(postgres::connect(&require, None))
        .expect_err("an unknown issuer");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
}
