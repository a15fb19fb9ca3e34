//! The alert manager end to end: a SIGKILL of the demo backend raises a real `target.exited`
//! alert, seen through the API and through the `selfheal` CLI; the CLI acknowledges it; the
//! backend's return resolves it by itself; a second crash within the hour opens a second alert
//! whose notification is throttled; the first alert's trigger, acknowledgement and resolution
//! reach a Slack receiver on the loopback, once each, in order; then the daemon itself is
//! killed with SIGKILL and restarted on the same state directory, and every alert, its history,
//! the audit and the notification outbox are exactly as before (nothing delivered is sent
//! again); the surviving alert is then resolved through the CLI.

use std::{process::Command, time::Duration};

use nix::sys::signal::Signal;
use selfheal_e2e::{
    bin, free_port, require_root, sample, wait_for, Daemon, DemoBackend, PgCluster,
};
use selfheal_receivers::HttpRecorder;
use serde_json::{json, Value};

fn strings<'a>(items: &'a Value, field: &str) -> Vec<&'a str> {
    items
        .as_array()
        .expect("an array")
        .iter()
        .map(|item| item[field].as_str().expect("a string field"))
        .collect()
}

#[test]
fn alerts_are_raised_acknowledged_resolved_and_survive_a_sigkill_of_the_daemon() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    // A Slack incoming webhook on the loopback; its path is the secret part of the URL.
    let slack = HttpRecorder::start().expect("slack receiver");
    let mut daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n[monitor]\ninterval_ms = 500\n\n\
         [notifications]\nslack_webhook_url = \"{}\"\n\n\
         [alerts]\nnotify_interval_secs = 3600\n",
        backend.selector(),
        slack.url("/services/T0/B0/never-shown")
    ))
    .expect("daemon");
    daemon
        .wait_for_target(backend.proc.pid())
        .expect("target found");
    let empty = daemon.api("/api/v1/system/alerts").expect("alerts");
    assert_eq!(empty["total"], 0, "{empty}");

    // A crash raises one critical alert.
    backend.proc.signal(Signal::SIGKILL).expect("kill");
    let first = wait_for("the target.exited alert", Duration::from_secs(10), || {
        let data = daemon.api("/api/v1/system/alerts").ok()?;
        data["alerts"].as_array()?.first().cloned()
    })
    .expect("alert raised");
    assert_eq!(first["rule"], "target.exited", "{first}");
    assert_eq!(first["key"], "target.exited", "{first}");
    assert_eq!(first["severity"], "critical", "{first}");
    assert_eq!(first["state"], "firing", "{first}");
    assert_eq!(first["count"], 1, "{first}");
    assert_eq!(first["group"]["key"], "target", "{first}");
    assert!(
        first["message"]
            .as_str()
            .is_some_and(|m| m.contains("SIGKILL")),
        "{first}"
    );
    assert!(first["last_notified_unix_ms"].is_i64(), "notified: {first}");
    let id1 = first["id"].as_i64().expect("id");
    let id1_text = id1.to_string();
    let health = daemon.health().expect("health");
    assert_eq!(health["status"], "critical", "{health}");
    assert_eq!(health["alerts"][0]["id"], id1, "{health}");

    // Filters.
    let listed = |query: &str| {
        daemon
            .api(&format!("/api/v1/system/alerts{query}"))
            .expect("alerts")["total"]
            .as_u64()
            .expect("total")
    };
    assert_eq!(listed("?severity=critical&state=firing"), 1);
    assert_eq!(listed("?severity=warning"), 0);
    assert_eq!(listed("?platform=tackle.io"), 0);
    let (status, refused) = daemon
        .api_answer("/api/v1/system/alerts?state=open")
        .expect("answer");
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["success"], false);

    // The CLI shows it, as text and as the API's JSON.
    let (code, out, err) = daemon.cli(&["alerts"]);
    assert_eq!(code, 0, "{out}{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with(&format!("{id1} ")))
        .unwrap_or_else(|| panic!("no row for alert {id1}:\n{out}"));
    for word in ["firing", "critical", "target.exited", "SIGKILL"] {
        assert!(row.contains(word), "{word} not in {row:?}");
    }
    let (code, out, err) = daemon.cli(&["alerts", "--json"]);
    assert_eq!(code, 0, "{err}");
    let from_cli: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        from_cli,
        daemon.api("/api/v1/system/alerts").expect("alerts")
    );

    // Acknowledged through the CLI; a second acknowledgement and an unknown id are refused.
    let (code, out, err) =
        daemon.cli(&["ack", &id1_text, "--by", "e2e", "--note", "looking into it"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("alert {id1} acknowledged by e2e")),
        "{out}"
    );
    let (code, _, err) = daemon.cli(&["ack", &id1_text]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("409") && err.contains("acknowledged"), "{err}");
    let (code, _, err) = daemon.cli(&["ack", "999999"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("404"), "{err}");
    assert_eq!(listed("?state=acknowledged"), 1);
    assert_eq!(listed("?state=firing"), 0);

    // The backend comes back: the rule clears and the alert resolves by itself.
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend again");
    wait_for(
        "the alert to resolve itself",
        Duration::from_secs(10),
        || {
            let alert = daemon.api(&format!("/api/v1/system/alerts/{id1}")).ok()?["alert"].clone();
            (alert["state"] == "resolved").then_some(())
        },
    )
    .expect("auto-resolved");
    assert_eq!(listed(""), 0);
    assert!(daemon.health().expect("health")["alerts"]
        .as_array()
        .is_some_and(Vec::is_empty));
    let (code, _, err) = daemon.cli(&["resolve", &id1_text]);
    assert_eq!(code, 1, "resolving a resolved alert is refused: {err}");
    assert!(err.contains("409"), "{err}");
    let (status, refused) = daemon
        .api_post(
            &format!("/api/v1/system/alerts/{id1}/acknowledge"),
            &json!({}),
        )
        .expect("answer");
    assert_eq!(status, 409, "{refused}");

    // A second crash within the hour: a new alert of the same key, not notified again.
    backend.proc.signal(Signal::SIGKILL).expect("kill again");
    let second = wait_for("the second alert", Duration::from_secs(10), || {
        let data = daemon.api("/api/v1/system/alerts").ok()?;
        data["alerts"].as_array()?.first().cloned()
    })
    .expect("second alert");
    let id2 = second["id"].as_i64().expect("id");
    assert_ne!(id2, id1);
    assert_eq!(second["last_notified_unix_ms"], Value::Null, "{second}");
    assert_eq!(second["group"]["id"], id2, "{second}");

    // The first alert's three notifications were delivered, in order, once each.
    let d1 = wait_for(
        "the first alert's notifications delivered",
        Duration::from_secs(10),
        || {
            let d1 = daemon.api(&format!("/api/v1/system/alerts/{id1}")).ok()?;
            (strings(&d1["notifications"], "state") == ["delivered"; 3]).then_some(d1)
        },
    )
    .expect("detail 1");
    let texts: Vec<String> = slack
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.path, "/services/T0/B0/never-shown");
            r.json().expect("JSON")["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(texts.len(), 3, "{texts:#?}");
    for (text, word) in texts.iter().zip(["firing", "acknowledged", "resolved"]) {
        assert!(
            text.starts_with(&format!("[selfheal] CRITICAL target.exited {word}")),
            "{texts:#?}"
        );
    }
    assert_eq!(d1["alert"]["resolved_by"], "rule", "{d1}");
    assert_eq!(d1["alert"]["acknowledged_by"], "e2e", "{d1}");
    assert_eq!(
        strings(&d1["events"], "kind"),
        ["fired", "acknowledged", "resolved"]
    );
    assert_eq!(strings(&d1["events"], "actor"), ["rule", "e2e", "rule"]);
    assert_eq!(strings(&d1["audit"], "action"), ["acknowledge"]);
    assert_eq!(d1["audit"][0]["actor"], "e2e");
    assert_eq!(d1["audit"][0]["note"], "looking into it");
    assert_eq!(
        strings(&d1["notifications"], "kind"),
        ["trigger", "acknowledge", "resolve"]
    );
    assert_eq!(
        strings(&d1["notifications"], "channel"),
        ["slack", "slack", "slack"]
    );
    assert!(
        !d1.to_string().contains("never-shown"),
        "the webhook URL is a secret: {d1}"
    );
    let d2 = daemon
        .api(&format!("/api/v1/system/alerts/{id2}"))
        .expect("detail 2");
    assert_eq!(strings(&d2["events"], "kind"), ["fired"]);
    assert_eq!(d2["notifications"], json!([]), "throttled: {d2}");
    let metrics = daemon.metrics().expect("metrics");
    assert_eq!(
        sample(
            &metrics,
            "selfheal_alerts_notifications_enqueued_total{channel=\"slack\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "selfheal_alerts_notifications_suppressed_total{reason=\"throttled\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "selfheal_alerts_active{severity=\"critical\"}"),
        Some(1.0)
    );

    // SIGKILL the daemon and start it again on the same state directory.
    let history = daemon
        .api("/api/v1/system/alerts?history=true")
        .expect("history");
    assert_eq!(history["total"], 2, "{history}");
    daemon.kill().expect("SIGKILL the daemon");
    let daemon = daemon.restart().expect("daemon restarted");
    let health = daemon.health().expect("health");
    assert_eq!(health["alerts"][0]["id"], id2, "restored: {health}");
    assert_eq!(
        daemon
            .api("/api/v1/system/alerts?history=true")
            .expect("history"),
        history,
        "the history survived exactly"
    );
    assert_eq!(
        daemon
            .api(&format!("/api/v1/system/alerts/{id1}"))
            .expect("detail 1"),
        d1
    );
    // The restarted daemon's worker sent nothing again.
    assert_eq!(slack.count(), 3);
    assert_eq!(
        daemon
            .api(&format!("/api/v1/system/alerts/{id2}"))
            .expect("detail 2"),
        d2
    );

    // The restored alert is resolved through the CLI, found through the config file's
    // admin address this time.
    let config = daemon.config.display().to_string();
    let output = Command::new(bin("selfheal"))
        .args([
            "resolve",
            &id2.to_string(),
            "--by",
            "e2e",
            "--note",
            "fixed by hand",
            "--config",
            &config,
        ])
        .env(
            "SELFHEAL_ADMIN_TOKEN",
            daemon.token.as_deref().expect("token"),
        )
        .output()
        .expect("run the CLI");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let d2 = daemon
        .api(&format!("/api/v1/system/alerts/{id2}"))
        .expect("detail 2");
    assert_eq!(d2["alert"]["state"], "resolved", "{d2}");
    assert_eq!(d2["alert"]["resolved_by"], "e2e", "{d2}");
    assert_eq!(strings(&d2["events"], "kind"), ["fired", "resolved"]);
    assert_eq!(strings(&d2["audit"], "action"), ["resolve"]);
    assert_eq!(d2["audit"][0]["note"], "fixed by hand");
    assert_eq!(d2["notifications"], json!([]), "never notified: {d2}");
    let history = daemon
        .api("/api/v1/system/alerts?history=true&limit=1")
        .expect("history");
    assert_eq!(history["total"], 2);
    assert_eq!(history["alerts"].as_array().map(Vec::len), Some(1));
    assert_eq!(history["alerts"][0]["id"], id2);
    let (code, out, _) = daemon.cli(&["alerts"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("no alerts match"), "{out}");

    // A daemon that is not there: exit 69.
    let nowhere = format!("127.0.0.1:{}", free_port().expect("port"));
    let (code, _, err) = daemon.cli_at(&nowhere, &["alerts"]);
    assert_eq!(code, 69, "{err}");
}
