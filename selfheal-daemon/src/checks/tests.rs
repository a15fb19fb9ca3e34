//! The checks against real servers on loopback (HTTP, a TCP port, a RESP speaker) and a real
//! SQLite health log. PostgreSQL and Redis servers are exercised by the privileged end-to-end
//! tests.

use std::{
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{http::StatusCode, routing::get, Router};

use super::*;
use crate::{
    alerts::system_clock,
    config::{parse, Env},
    state::{self, DbOptions},
};

fn config(extra: &str, env: &[(&str, &str)]) -> Config {
    let text = format!("[target]\npid = 1\n{extra}");
    parse(&text, &Env::from_pairs(env.iter().copied())).expect("valid config")
}

#[test]
fn specs_come_from_checks_platforms_and_the_database_and_redis_urls() {
    let all = config(
        r#"
[[platforms]]
name = "crm"
hosts = ["crm.example"]
health_url = "http://127.0.0.1:1/health"
health_interval_ms = 2000
health_timeout_ms = 500

[[platforms]]
name = "shop"
hosts = ["shop.example"]
health_url = "http://127.0.0.1:2/health"

[[platforms]]
name = "crm-eu"
hosts = ["eu.crm.example"]
health_url = "http://127.0.0.1:1/health"

[[checks]]
name = "shop-api"
kind = "http"
url = "http://127.0.0.1:2/health"
platform = "shop"

[[checks]]
name = "provider"
kind = "http"
url = "https://user:pw@api.provider.example/v1/status?key=abc"
headers = { Authorization = "env:PROVIDER_TOKEN", X-Plain = "yes" }
"#,
        &[
            ("DATABASE_URL", "postgres://app:secret@127.0.0.1:5432/app"),
            ("REDIS_URL", "redis://:pw@127.0.0.1:6379/0"),
        ],
    );
    let specs = specs(&all);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    // The shop's health URL is already checked by `shop-api`: no second check. Two platforms
    // sharing a URL get a check each, so each platform's alert carries its name.
    assert_eq!(
        names,
        [
            "shop-api",
            "provider",
            "crm health",
            "crm-eu health",
            "database",
            "redis"
        ]
    );
    let crm = &specs[2];
    assert_eq!(crm.origin, Origin::PlatformHealth);
    assert_eq!(crm.platform.as_deref(), Some("crm"));
    assert_eq!(crm.interval, Duration::from_secs(2));
    assert_eq!(crm.timeout, Duration::from_millis(500));
    assert_eq!(crm.slow, Duration::from_millis(250));
    assert_eq!(crm.alert_after_failures, 3);
    // No credentials, query or fragment in what is shown.
    assert_eq!(
        specs[1].endpoint(),
        "https://api.provider.example/v1/status"
    );
    assert_eq!(specs[4].endpoint(), "postgres://127.0.0.1:5432/app");
    assert_eq!(specs[5].endpoint(), "redis://127.0.0.1:6379/0");
    // The provider's token variable is unset: the check cannot run, and says why.
    let why = specs[1].misconfigured.as_deref().expect("misconfigured");
    assert!(why.contains("PROVIDER_TOKEN"), "{why}");
    assert!(specs[0].misconfigured.is_none());

    let with_token = config(
        r#"
[[checks]]
name = "provider"
kind = "http"
url = "https://api.provider.example/v1/status"
headers = { Authorization = "env:PROVIDER_TOKEN" }
"#,
        &[("PROVIDER_TOKEN", "Bearer t0ken")],
    );
    let spec = &super::specs(&with_token)[0];
    assert!(spec.misconfigured.is_none());
    let Target::Http(http) = &spec.target else {
        panic!("an http check")
    };
    assert_eq!(http.headers.len(), 1);
    assert_eq!(http.headers[0].0, "Authorization");
    assert_eq!(http.headers[0].1.expose(), "Bearer t0ken");
}

#[test]
fn postgres_checks_carry_their_ca_file_named_by_its_key() {
    let config = config(
        r#"
[database]
ca_file = "/etc/selfheal/db-ca.pem"

[[checks]]
name = "web"
kind = "http"
url = "http://127.0.0.1:2/health"

[[checks]]
name = "replica"
kind = "postgres"
url = "postgres://app@127.0.0.1:5433/app?sslmode=require"
ca_file = "/etc/selfheal/replica-ca.pem"
"#,
        &[("DATABASE_URL", "postgres://app:secret@127.0.0.1:5432/app")],
    );
    let specs = specs(&config);
    let ca_files: Vec<(&str, Option<CaFile>)> = specs
        .iter()
        .filter_map(|spec| match &spec.target {
            Target::Postgres(postgres) => Some((spec.name.as_str(), postgres.ca_file.clone())),
            _ => None,
        })
        .collect();
    let ca_file = |key: &str, path: &str| {
        Some(CaFile {
            key: key.to_owned(),
            path: path.into(),
        })
    };
    assert_eq!(
        ca_files,
        [
            (
                "replica",
                ca_file("checks[1].ca_file", "/etc/selfheal/replica-ca.pem")
            ),
            (
                "database",
                ca_file("database.ca_file", "/etc/selfheal/db-ca.pem")
            ),
        ]
    );
}

#[tokio::test]
async fn a_postgres_check_whose_ca_file_cannot_be_used_is_down_saying_why() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let config = config(
        &format!(
            "[database]\nca_file = \"{}\"\n\
             [[checks]]\nname = \"replica\"\nkind = \"postgres\"\n\
             url = \"postgres://app:secret@127.0.0.1:9/app?sslmode=require\"\n\
             ca_file = \"{}\"\n",
            missing.display(),
            empty.display()
        ),
        // The CA file is read only for a TLS connection, which `require` asks for.
        &[(
            "DATABASE_URL",
            "postgres://app:secret@127.0.0.1:9/main?sslmode=require",
        )],
    );
    let client = reqwest::Client::new();
    let specs = specs(&config);
    let replica = probe::run(&specs[0], &client).await;
    assert_eq!(replica.status, CheckStatus::Down);
    assert_eq!(
        replica.message.as_deref(),
        Some(
            format!(
                "cannot use checks[0].ca_file {}: it holds no certificate (no BEGIN CERTIFICATE \
                 section)",
                empty.display()
            )
            .as_str()
        )
    );
    let database = probe::run(&specs[1], &client).await;
    assert_eq!(database.status, CheckStatus::Down);
    let message = database.message.expect("a message");
    assert!(
        message.starts_with(&format!(
            "cannot use database.ca_file {}: cannot read it: ",
            missing.display()
        )),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
}

#[test]
fn bad_check_options_are_reported_with_their_paths() {
    let text = r#"
[target]
pid = 1
[[checks]]
name = "db"
kind = "postgres"
url = "postgres://127.0.0.1/app"
body_contains = "ok"
slow_ms = 9000
alert_after_failures = 0
max_connections_percent = 120
[[checks]]
name = "web"
kind = "http"
url = "http://127.0.0.1/"
json_value = "ok"
expect_status = 42
headers = { "bad header" = "x", X-Key = "env:" }
address = "127.0.0.1:80"
[[checks]]
name = "we\"ird"
kind = "postgres"
url = "postgres://app@127.0.0.1:99999/app"
[[checks]]
name = "port"
kind = "tcp"
address = ":80"
url = "http://127.0.0.1/"
max_connections_percent = 50
[[platforms]]
name = "shop"
hosts = ["shop.example"]
error_rate_warning_percent = 6.0
"#;
    let problems = parse(text, &Env::default()).expect_err("invalid");
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "checks[0].kind",
        "checks[0].slow_ms",
        "checks[0].alert_after_failures",
        "checks[0].max_connections_percent",
        "checks[1].json_value",
        "checks[1].expect_status",
        "checks[1].headers.bad header",
        "checks[1].headers.X-Key",
        "checks[1].address",
        "checks[2].name",
        "checks[2].url",
        "checks[3].address",
        "checks[3].url",
        "checks[3].max_connections_percent",
        "platforms[0].error_rate_critical_percent",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
    let inherited = problems
        .iter()
        .find(|p| p.path == "platforms[0].error_rate_critical_percent")
        .expect("inherited critical");
    assert!(
        inherited
            .message
            .contains("5 (inherited from monitor.error_rate_critical_percent)"),
        "{inherited}"
    );
}

#[test]
fn alerts_of_checks_that_no_longer_run_are_cleared_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let metrics = Metrics::new();
    let (db, _thread, _) = state::open(
        &DbOptions {
            path: dir.path().join(state::DB_FILE),
            busy_timeout: Duration::from_secs(1),
        },
        metrics,
    )
    .expect("open");
    let config = config(
        &[
            http("crm", "http://127.0.0.1:9/", ""),
            http("off", "http://127.0.0.1:9/", "enabled = false"),
            http(
                "nokey",
                "http://127.0.0.1:9/",
                "headers = { X-Key = \"env:MISSING_KEY\" }",
            ),
        ]
        .concat(),
        &[],
    );
    let (checks, _runner) = Checks::new(specs(&config), db, system_clock());
    let alert = |rule: &str, check: &str| crate::alerts::Alert {
        id: 1,
        key: String::new(),
        rule: rule.to_owned(),
        labels: crate::alerts::Labels::from([("check".to_owned(), check.to_owned())]),
        platform: None,
        group_key: "check".to_owned(),
        group_id: 1,
        severity: crate::bus::Severity::Critical,
        state: crate::alerts::AlertState::Firing,
        message: String::new(),
        count: 1,
        first_seen_ms: 0,
        last_seen_ms: 0,
        acknowledged_at_ms: None,
        acknowledged_by: None,
        resolved_at_ms: None,
        resolved_by: None,
        last_notified_ms: None,
    };
    let active = [
        alert("check.down", "crm"),
        alert("check.down", "gone"),
        alert("check.slow", "off"),
        alert("check.down", "nokey"),
        alert("target.exited", "crm"),
    ];
    let cleared: Vec<(String, String)> = checks
        .orphaned(&active)
        .into_iter()
        .map(|s| {
            assert!(!s.firing);
            (s.rule, s.labels["check"].clone())
        })
        .collect();
    assert_eq!(
        cleared,
        [
            ("check.down".to_owned(), "gone".to_owned()),
            ("check.slow".to_owned(), "off".to_owned()),
            ("check.down".to_owned(), "nokey".to_owned()),
        ]
    );
}

/// A web server with `/ok`, `/slow` (300 ms), `/json` (`{"status": …}`), `/flaky` (answers
/// the status held in `flaky`) and `/headers` (200 only with `Authorization: Bearer t0ken`).
async fn web(flaky: Arc<AtomicU16>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "late"
            }),
        )
        .route(
            "/json",
            get(|| async { r#"{"status":"ok","db":{"up":false}}"# }),
        )
        .route(
            "/flaky",
            get(move || {
                let flaky = flaky.clone();
                async move {
                    StatusCode::from_u16(flaky.load(Ordering::SeqCst))
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                }
            }),
        )
        .route(
            "/headers",
            get(|headers: axum::http::HeaderMap| async move {
                if headers
                    .get("authorization")
                    .is_some_and(|v| v == "Bearer t0ken")
                {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (address, server)
}

fn http(name: &str, url: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout_ms") {
        ""
    } else {
        "timeout_ms = 1000\n"
    };
    format!(
        "[[checks]]\nname = \"{name}\"\nkind = \"http\"\nurl = \"{url}\"\ninterval_ms = 60000\n\
         {timeout}{extra}\n"
    )
}

struct Running {
    checks: Checks,
    events: crate::bus::Subscriber,
    cancel: CancellationToken,
    runner: tokio::task::JoinHandle<()>,
    _db_thread: state::DbThread,
    dir: tempfile::TempDir,
}

fn start(config: &Config, dir: tempfile::TempDir) -> Running {
    let metrics = Metrics::new();
    let (db, db_thread, _) = state::open(
        &DbOptions {
            path: dir.path().join(state::DB_FILE),
            busy_timeout: Duration::from_secs(1),
        },
        metrics.clone(),
    )
    .expect("open");
    let bus = Bus::new(metrics.clone());
    let events = bus.subscribe();
    let (checks, runner) = Checks::new(specs(config), db, system_clock());
    let cancel = CancellationToken::new();
    let runner = tokio::spawn(runner.run(bus, metrics, cancel.clone()));
    Running {
        checks,
        events,
        cancel,
        runner,
        _db_thread: db_thread,
        dir,
    }
}

impl Running {
    /// The next check report of `check`, within 5 s.
    async fn report(&mut self, check: &str) -> CheckReport {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(Event::Check(report)) = self.events.recv().await {
                    if report.check == check {
                        return report;
                    }
                }
            }
        })
        .await
        .expect("a check report within 5 s")
    }

    async fn integration(&self, name: &str) -> Integration {
        self.checks
            .integrations()
            .await
            .expect("integrations")
            .into_iter()
            .find(|i| i.spec.name == name)
            .expect("the check is listed")
    }

    async fn stop(self) -> tempfile::TempDir {
        self.cancel.cancel();
        let _ = self.runner.await;
        self.dir
    }
}

#[tokio::test]
async fn http_checks_tell_healthy_degraded_and_down_apart() {
    let flaky = Arc::new(AtomicU16::new(200));
    let (web, _server) = web(flaky.clone()).await;
    let mut text = String::new();
    text += &http(
        "ok",
        &format!("http://{web}/ok"),
        "body_contains = \"fine\"",
    );
    text += &http("slow", &format!("http://{web}/slow"), "slow_ms = 100");
    text += &http(
        "json-ok",
        &format!("http://{web}/json"),
        "json_field = \"status\"\njson_value = \"ok\"",
    );
    text += &http(
        "json-db",
        &format!("http://{web}/json"),
        "json_field = \"db.up\"",
    );
    text += &http(
        "body",
        &format!("http://{web}/ok"),
        "body_contains = \"great\"",
    );
    text += &http("status", &format!("http://{web}/ok"), "expect_status = 204");
    text += &http(
        "auth",
        &format!("http://{web}/headers"),
        "headers = { Authorization = \"env:TOKEN\" }",
    );
    text += &http("refused", "http://127.0.0.1:9/", "");
    text += &http(
        "hang",
        &format!("http://{web}/slow"),
        "timeout_ms = 50\nslow_ms = 10",
    );
    let all = config(&text, &[("TOKEN", "Bearer t0ken")]);
    let running = start(&all, tempfile::tempdir().expect("dir"));

    let results = running.checks.run_now(None).await.expect("run");
    let by_name = |name: &str| {
        results
            .iter()
            .find(|(spec, _)| spec.name == name)
            .map(|(_, latest)| latest.clone())
            .expect("result")
    };
    assert_eq!(by_name("ok").status, CheckStatus::Healthy);
    assert_eq!(by_name("json-ok").status, CheckStatus::Healthy);
    assert_eq!(by_name("auth").status, CheckStatus::Healthy);
    let slow = by_name("slow");
    assert_eq!(
        (slow.status, slow.degraded),
        (CheckStatus::Degraded, Some(Degraded::Slow))
    );
    assert!(slow.response_ms.is_some_and(|ms| ms >= 300.0), "{slow:?}");
    let expect_down = |name: &str, text: &str| {
        let latest = by_name(name);
        assert_eq!(latest.status, CheckStatus::Down, "{name}: {latest:?}");
        let message = latest.message.unwrap_or_default();
        assert!(message.contains(text), "{name}: {message:?} lacks {text:?}");
    };
    expect_down("json-db", "JSON field db.up is false");
    expect_down("body", "does not contain \"great\"");
    expect_down("status", "answered 200 OK (expected 204)");
    expect_down("refused", "error sending request");
    expect_down("hang", "no answer within 50 ms");
    // A refused connection has no response time; a wrong answer has one.
    assert_eq!(by_name("refused").response_ms, None);
    assert!(by_name("status").response_ms.is_some());
    // Errors never carry the URL.
    for (_, latest) in &results {
        let message = latest.message.clone().unwrap_or_default();
        assert!(!message.contains("127.0.0.1"), "{message}");
    }
    running.stop().await;
}

#[tokio::test]
async fn failures_in_a_row_are_counted_logged_and_survive_a_restart() {
    let flaky = Arc::new(AtomicU16::new(503));
    let (web, _server) = web(flaky.clone()).await;
    let flaky_config = config(&http("crm", &format!("http://{web}/flaky"), ""), &[]);
    let mut running = start(&flaky_config, tempfile::tempdir().expect("dir"));
    // The run at start, then two on demand.
    let first = running.report("crm").await;
    assert_eq!(
        (first.status, first.consecutive_failures),
        (CheckStatus::Down, 1)
    );
    for expected in 2..=3 {
        let results = running.checks.run_now(Some("crm")).await.expect("run");
        assert_eq!(results[0].1.consecutive_failures, expected);
        let report = running.report("crm").await;
        assert_eq!(report.consecutive_failures, expected);
        assert_eq!(report.alert_after_failures, 3);
        assert_eq!(report.platform, None);
        assert_eq!(
            report.message.as_deref(),
            Some("answered 503 Service Unavailable (expected 2xx)")
        );
    }
    let crm = running.integration("crm").await;
    assert_eq!(crm.latest.status, CheckStatus::Down);
    assert_eq!(crm.figures.runs_24h, 3);
    assert_eq!(crm.figures.success_rate_24h, Some(0.0));
    assert_eq!(
        crm.figures.last_error.map(|(_, e)| e).as_deref(),
        Some("answered 503 Service Unavailable (expected 2xx)")
    );
    assert!(!crm.stale);

    // A new runner on the same health log carries on counting.
    let dir = running.stop().await;
    let mut running = start(&flaky_config, dir);
    let restarted = running.checks.integrations().await.expect("integrations");
    assert_eq!(restarted[0].figures.runs_24h, 3);
    let fourth = running.report("crm").await;
    assert_eq!(fourth.consecutive_failures, 4);
    flaky.store(200, Ordering::SeqCst);
    let results = running.checks.run_now(Some("crm")).await.expect("run");
    assert_eq!(
        (results[0].1.status, results[0].1.consecutive_failures),
        (CheckStatus::Healthy, 0)
    );
    let crm = running.integration("crm").await;
    assert_eq!(crm.figures.runs_24h, 5);
    assert_eq!(crm.figures.success_rate_24h, Some(20.0));
    assert_eq!(crm.latest.message, None);
    running.stop().await;
}

#[tokio::test]
async fn unknown_names_disabled_and_misconfigured_checks_on_demand() {
    let both = config(
        &format!(
            "{}{}",
            http("off", "http://127.0.0.1:9/", "enabled = false"),
            http(
                "nokey",
                "http://127.0.0.1:9/",
                "headers = { X-Key = \"env:MISSING_KEY\" }"
            )
        ),
        &[],
    );
    let running = start(&both, tempfile::tempdir().expect("dir"));
    assert!(matches!(
        running.checks.run_now(Some("nope")).await,
        Err(CheckError::NotFound { .. })
    ));
    let results = running.checks.run_now(None).await.expect("run");
    assert_eq!(results.len(), 2);
    for (spec, latest) in &results {
        assert_eq!(latest.status, CheckStatus::Unknown, "{}", spec.name);
        assert_eq!(latest.last_run_ms, None);
    }
    assert_eq!(results[0].1.message.as_deref(), Some("disabled"));
    assert!(results[1]
        .1
        .message
        .as_deref()
        .is_some_and(|m| m.contains("MISSING_KEY")));
    // Neither is stale: they are not meant to run.
    assert_eq!(running.checks.stale_count(), 0);
    running.stop().await;
}

#[tokio::test]
async fn tcp_and_redis_checks() {
    // A listening port, and a RESP speaker that wants a password.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let open = port.local_addr().expect("address");
    let redis = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let redis_address = redis.local_addr().expect("address");
    let _speaker = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let Ok((mut stream, _)) = redis.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 1024];
                let mut authed = false;
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    let reply: &[u8] = if text.contains("AUTH") {
                        authed = text.contains("$6\r\ns3cret\r\n");
                        if authed {
                            b"+OK\r\n"
                        } else {
                            b"-WRONGPASS invalid username-password pair\r\n"
                        }
                    } else if authed {
                        b"+PONG\r\n"
                    } else {
                        b"-NOAUTH Authentication required.\r\n"
                    };
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let check = |name: &str, kind: &str, key: &str, value: String| {
        format!("[[checks]]\nname = \"{name}\"\nkind = \"{kind}\"\n{key} = \"{value}\"\ninterval_ms = 60000\ntimeout_ms = 1000\n")
    };
    let text = [
        check("port", "tcp", "address", open.to_string()),
        check("closed", "tcp", "address", closed.to_string()),
        check(
            "redis",
            "redis",
            "url",
            format!("redis://:s3cret@{redis_address}"),
        ),
        check(
            "redis-wrong",
            "redis",
            "url",
            format!("redis://:nope@{redis_address}"),
        ),
        check(
            "redis-nopass",
            "redis",
            "url",
            format!("redis://{redis_address}/0"),
        ),
    ]
    .concat();
    let running = start(&config(&text, &[]), tempfile::tempdir().expect("dir"));
    let results = running.checks.run_now(None).await.expect("run");
    let status: Vec<(&str, CheckStatus, String)> = results
        .iter()
        .map(|(spec, latest)| {
            (
                spec.name.as_str(),
                latest.status,
                latest.message.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(status[0], ("port", CheckStatus::Healthy, String::new()));
    assert_eq!(status[1].1, CheckStatus::Down);
    assert!(status[1].2.starts_with("cannot connect: "), "{status:?}");
    assert_eq!(status[2], ("redis", CheckStatus::Healthy, String::new()));
    assert_eq!(status[3].1, CheckStatus::Down);
    assert!(
        status[3].2.contains("AUTH refused: \"-WRONGPASS"),
        "{status:?}"
    );
    assert!(
        !status[3].2.contains("nope"),
        "the password leaked: {status:?}"
    );
    assert_eq!(status[4].1, CheckStatus::Down);
    assert!(
        status[4].2.contains("PING answered \"-NOAUTH"),
        "{status:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_check_that_stops_running_is_stale() {
    let (web, _server) = web(Arc::new(AtomicU16::new(200))).await;
    let crm = config(&http("crm", &format!("http://{web}/ok"), ""), &[]);
    let running = start(&crm, tempfile::tempdir().expect("dir"));
    let results = running.checks.run_now(Some("crm")).await.expect("run");
    let ran_at = results[0].1.last_run_ms.expect("ran");
    let spec = &running.checks.inner.slots[0].spec;
    let latest = running.checks.inner.slots[0].latest();
    let interval = i64::try_from(spec.interval.as_millis()).expect("ms");
    assert!(!running
        .checks
        .is_stale(spec, &latest, ran_at + 2 * interval));
    assert!(running
        .checks
        .is_stale(spec, &latest, ran_at + 2 * interval + 1));
    running.stop().await;
}

#[tokio::test]
async fn a_hung_check_delays_no_other() {
    // A server that accepts and never answers: the `hung` check waits its whole timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_address = silent.local_addr().expect("address");
    let _holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let (web, _server) = web(Arc::new(AtomicU16::new(200))).await;
    let text = [
        http(
            "hung",
            &format!("http://{silent_address}/"),
            "timeout_ms = 5000",
        ),
        http("fast", &format!("http://{web}/ok"), ""),
    ]
    .concat();
    let running = start(&config(&text, &[]), tempfile::tempdir().expect("dir"));
    // The hung check's first run is under way (it starts with the runner); the fast one runs
    // on demand, twice, and answers while the hung one has still not finished its first.
    for _ in 0..2 {
        let results = running.checks.run_now(Some("fast")).await.expect("run");
        assert_eq!(results[0].1.status, CheckStatus::Healthy);
    }
    let hung = running.checks.inner.slots[0].latest();
    assert_eq!(hung.last_run_ms, None, "{hung:?}");
    assert_eq!(hung.message.as_deref(), Some("not run yet"));
    running.stop().await;
}
