//! Notifications end to end, to real receivers on the loopback speaking the real protocols (a
//! Slack incoming webhook, the PagerDuty Events API v2, a generic JSON webhook, SMTP), with the
//! demo backend's health URL as the failing platform:
//!
//! - the database stops, the health URL answers 503: after three failed runs one alert and one
//!   notification per channel; it keeps failing: nothing more; `selfheal ack` sends the
//!   acknowledgements; it recovers: the resolutions. A second failure within the hour opens a
//!   new alert whose trigger is throttled; `selfheal resolve` closes it without a word sent.
//! - every receiver fails while two alerts fire; the daemon is killed (SIGKILL) and restarted: both
//!   alerts and every undelivered notification are still there, and once the receivers
//!   recover each notification is delivered exactly once.

use std::time::Duration;

use selfheal_e2e::{free_port, require_root, wait_for, Daemon, DemoBackend, PgCluster};
use selfheal_receivers::{HttpRecorder, SmtpFailure, SmtpRecorder};
use serde_json::Value;

const ROUTING_KEY: &str = "e2e-routing-key-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(30);
/// The daemon's `[probes]` without payload capture (on by default).
const NO_CAPTURE: &str = "[probes]\npayload_bytes = 0\n";

struct Receivers {
    slack: HttpRecorder,
    pagerduty: HttpRecorder,
    webhook: HttpRecorder,
    smtp: SmtpRecorder,
}

impl Receivers {
    fn start() -> Self {
        Self {
            slack: HttpRecorder::start().expect("slack"),
            pagerduty: HttpRecorder::start_answering(202, r#"{"status":"success"}"#)
                .expect("pagerduty"),
            webhook: HttpRecorder::start().expect("webhook"),
            smtp: SmtpRecorder::start().expect("smtp"),
        }
    }

    fn config(&self) -> String {
        format!(
            r#"
[alerts]
notify_interval_secs = 3600

[notifications]
slack_webhook_url = "{slack}"
pagerduty_url = "{pagerduty}"
pagerduty_routing_key = "{ROUTING_KEY}"
webhook_url = "{webhook}"
email_to = ["oncall@example.test"]
email_from = "selfheal@example.test"
smtp_host = "127.0.0.1"
smtp_port = {smtp}
smtp_tls = "none"
"#,
            slack = self.slack.url("/services/T000/B000/e2e-secret-path"),
            pagerduty = self.pagerduty.url("/v2/enqueue"),
            webhook = self.webhook.url("/hooks/selfheal"),
            smtp = self.smtp.port(),
        )
    }

    /// Deliveries each receiver accepted: Slack, PagerDuty, webhook, email.
    fn accepted(&self) -> [usize; 4] {
        [
            self.slack.accepted().len(),
            self.pagerduty.accepted().len(),
            self.webhook.accepted().len(),
            self.smtp.messages().len(),
        ]
    }

    fn wait_accepted(&self, n: usize) -> [usize; 4] {
        wait_for(&format!("{n} deliveries at every receiver"), WAIT, || {
            let accepted = self.accepted();
            accepted.iter().all(|&a| a >= n).then_some(accepted)
        })
        .expect("deliveries")
    }
}

fn platform(name: &str, health: &str) -> String {
    format!(
        "\n[[platforms]]\nname = \"{name}\"\nhosts = [\"{name}\"]\nhealth_url = \"{health}\"\n\
         health_interval_ms = 1000\nhealth_timeout_ms = 800\n"
    )
}

fn active(daemon: &Daemon) -> Vec<Value> {
    daemon
        .api("/api/v1/system/alerts")
        .ok()
        .and_then(|data| data["alerts"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until the check has failed `n` times in a row.
fn failed_runs(daemon: &Daemon, check: &str, n: u64) {
    wait_for(&format!("{check} failed {n} times"), WAIT, || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        data["checks"]
            .as_array()?
            .iter()
            .any(|c| c["name"] == check && c["consecutive_failures"].as_u64() >= Some(n))
            .then_some(())
    })
    .expect("failed runs");
}

#[test]
fn a_failing_health_url_notifies_each_channel_once_and_closes_the_page() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let receivers = Receivers::start();
    // Without payload capture: the failing check's 503s would also raise the traffic rule
    // `http.error_rate` (they are requests the target serves), a second alert on every
    // channel; this test counts the check's alone.
    let daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n{NO_CAPTURE}{}{}",
        backend.selector(),
        receivers.config(),
        platform("leadsite.ai", &backend.url("/health")),
    ))
    .expect("daemon");
    let check = "leadsite.ai health";
    wait_for("the health check healthy", WAIT, || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        (data["healthy"] == 1).then_some(())
    })
    .expect("healthy");

    // The platform goes down: one alert, one trigger per channel.
    pg.stop_server().expect("stop postgres");
    let alert = wait_for("the check.down alert", WAIT, || {
        active(&daemon)
            .into_iter()
            .find(|a| a["rule"] == "check.down")
    })
    .expect("alert");
    let id = alert["id"].as_i64().expect("id");
    let key = alert["key"].as_str().expect("key").to_owned();
    assert_eq!(
        key,
        r#"check.down{check="leadsite.ai health",platform="leadsite.ai"}"#
    );
    assert_eq!(receivers.wait_accepted(1), [1, 1, 1, 1]);

    let slack = &receivers.slack.accepted()[0];
    assert_eq!(slack.path, "/services/T000/B000/e2e-secret-path");
    let text = slack.json().expect("slack json")["text"]
        .as_str()
        .expect("slack text")
        .to_owned();
    assert!(text.contains("CRITICAL") && text.contains(&key), "{text}");
    let pd = receivers.pagerduty.accepted()[0].json().expect("pd json");
    assert_eq!(pd["routing_key"], ROUTING_KEY, "{pd}");
    assert_eq!(pd["event_action"], "trigger", "{pd}");
    assert_eq!(pd["dedup_key"], format!("selfheal:{key}"), "{pd}");
    assert_eq!(pd["payload"]["severity"], "critical", "{pd}");
    let summary = pd["payload"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("failed 3 times in a row"), "{pd}");
    let hook = receivers.webhook.accepted()[0]
        .json()
        .expect("webhook json");
    assert_eq!(hook["kind"], "trigger", "{hook}");
    assert_eq!(hook["alert"]["id"], id, "{hook}");
    assert_eq!(hook["alert"]["labels"]["platform"], "leadsite.ai", "{hook}");
    let mail = &receivers.smtp.messages()[0];
    let subject = mail.header("Subject").unwrap_or_default();
    assert!(
        subject.contains("CRITICAL") && subject.contains("check.down"),
        "{subject}"
    );

    // Still failing: nothing more is sent.
    failed_runs(&daemon, check, 8);
    assert_eq!(receivers.accepted(), [1, 1, 1, 1]);

    // Acknowledged through the CLI: each channel hears of it.
    let (code, out, err) = daemon.cli(&["ack", &id.to_string(), "--by", "ana"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(receivers.wait_accepted(2), [2, 2, 2, 2]);
    let pd = receivers.pagerduty.accepted()[1].json().expect("pd json");
    assert_eq!(pd["event_action"], "acknowledge", "{pd}");
    assert_eq!(pd["dedup_key"], format!("selfheal:{key}"), "{pd}");

    // It recovers: the alert resolves itself and every channel is told.
    pg.start_server().expect("start postgres");
    assert_eq!(receivers.wait_accepted(3), [3, 3, 3, 3]);
    let pd = receivers.pagerduty.accepted()[2].json().expect("pd json");
    assert_eq!(pd["event_action"], "resolve", "{pd}");
    assert_eq!(pd["dedup_key"], format!("selfheal:{key}"), "{pd}");
    assert_eq!(
        receivers.webhook.accepted()[2].json().expect("json")["kind"],
        "resolve"
    );
    // A receiver's answer is recorded by the daemon just after it is given.
    let detail = wait_for("the outbox rows recorded delivered", WAIT, || {
        let detail = daemon.api(&format!("/api/v1/system/alerts/{id}")).ok()?;
        detail["notifications"]
            .as_array()?
            .iter()
            .all(|r| r["state"] == "delivered")
            .then_some(detail)
    })
    .expect("delivered");
    assert_eq!(detail["alert"]["state"], "resolved", "{detail}");
    assert_eq!(detail["alert"]["resolved_by"], "rule", "{detail}");
    let rows = detail["notifications"].as_array().expect("notifications");
    assert_eq!(rows.len(), 12, "{detail}");
    for row in rows {
        assert_eq!(row["state"], "delivered", "{row}");
        assert_eq!(row["attempts"], 1, "{row}");
    }

    // A second failure within the hour: a new alert, its trigger throttled.
    pg.stop_server().expect("stop postgres again");
    let second = wait_for("a second check.down alert", WAIT, || {
        active(&daemon)
            .into_iter()
            .find(|a| a["rule"] == "check.down")
    })
    .expect("second alert");
    let second_id = second["id"].as_i64().expect("id");
    assert_ne!(second_id, id);
    failed_runs(&daemon, check, 6);
    let (code, out, err) = daemon.cli(&["resolve", &second_id.to_string(), "--by", "ana"]);
    assert_eq!(code, 0, "{out}{err}");
    let detail = daemon
        .api(&format!("/api/v1/system/alerts/{second_id}"))
        .expect("detail");
    assert_eq!(detail["alert"]["state"], "resolved", "{detail}");
    assert_eq!(
        detail["notifications"],
        Value::Array(Vec::new()),
        "{detail}"
    );
    assert_eq!(receivers.accepted(), [3, 3, 3, 3]);
    // No secret in what the API shows.
    let text = detail.to_string();
    assert!(
        !text.contains(ROUTING_KEY) && !text.contains("e2e-secret-path"),
        "{text}"
    );
}

#[test]
fn undelivered_notifications_survive_a_sigkill_and_go_out_exactly_once() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let port = free_port().expect("port");
    let backend = DemoBackend::start(&pg.url(), port).expect("demo backend");
    let receivers = Receivers::start();
    receivers.slack.answer(500, "boom");
    receivers.pagerduty.answer(503, "unavailable");
    receivers.webhook.answer(502, "bad gateway");
    receivers.smtp.fail(Some(SmtpFailure::Mail));
    let health = backend.url("/health");
    // Without payload capture, as above: the checks' alerts alone.
    let mut daemon = Daemon::start(&format!(
        "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n{NO_CAPTURE}{}{}{}",
        backend.selector(),
        receivers.config(),
        platform("leadsite.ai", &health),
        platform("tackle.io", &health),
    ))
    .expect("daemon");
    wait_for("both health checks healthy", WAIT, || {
        let data = daemon.api("/api/v1/system/integrations").ok()?;
        (data["healthy"] == 2).then_some(())
    })
    .expect("healthy");

    pg.stop_server().expect("stop postgres");
    let alerts = wait_for("two alerts", WAIT, || {
        let alerts = active(&daemon);
        (alerts.len() == 2).then_some(alerts)
    })
    .expect("alerts");
    let mut ids: Vec<i64> = alerts
        .iter()
        .map(|a| a["id"].as_i64().expect("id"))
        .collect();
    ids.sort_unstable();
    // Every receiver has refused at least one attempt of each.
    wait_for("refused attempts at every receiver", WAIT, || {
        (receivers.slack.count() >= 2
            && receivers.pagerduty.count() >= 2
            && receivers.webhook.count() >= 2
            && receivers.smtp.transactions() >= 2)
            .then_some(())
    })
    .expect("attempts");
    assert_eq!(receivers.accepted(), [0, 0, 0, 0]);

    daemon.kill().expect("SIGKILL the daemon");
    let daemon = daemon.restart().expect("restart");
    let mut restored: Vec<i64> = active(&daemon)
        .iter()
        .map(|a| a["id"].as_i64().expect("id"))
        .collect();
    restored.sort_unstable();
    assert_eq!(restored, ids);
    for id in &ids {
        let detail = daemon
            .api(&format!("/api/v1/system/alerts/{id}"))
            .expect("detail");
        let rows = detail["notifications"].as_array().expect("notifications");
        let mut channels: Vec<&str> = rows
            .iter()
            .map(|r| r["channel"].as_str().expect("channel"))
            .collect();
        channels.sort_unstable();
        assert_eq!(
            channels,
            ["email", "pagerduty", "slack", "webhook"],
            "{detail}"
        );
        for row in rows {
            assert_eq!(row["kind"], "trigger", "{row}");
            assert_eq!(row["state"], "pending", "{row}");
        }
    }

    // The receivers recover: each alert's trigger goes out once per channel.
    receivers.slack.answer(200, "ok");
    receivers.pagerduty.answer(202, r#"{"status":"success"}"#);
    receivers.webhook.answer(200, "ok");
    receivers.smtp.fail(None);
    assert_eq!(receivers.wait_accepted(2), [2, 2, 2, 2]);
    wait_for("every notification delivered", WAIT, || {
        ids.iter()
            .all(|id| {
                daemon
                    .api(&format!("/api/v1/system/alerts/{id}"))
                    .ok()
                    .and_then(|d| d["notifications"].as_array().cloned())
                    .is_some_and(|rows| rows.iter().all(|r| r["state"] == "delivered"))
            })
            .then_some(())
    })
    .expect("delivered");
    // Nothing more arrives: delivered rows are never sent again.
    failed_runs(&daemon, "leadsite.ai health", 12);
    assert_eq!(receivers.accepted(), [2, 2, 2, 2]);
    let mut dedup: Vec<String> = receivers
        .pagerduty
        .accepted()
        .iter()
        .map(|r| {
            r.json().expect("json")["dedup_key"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), 2, "{dedup:?}");
}
