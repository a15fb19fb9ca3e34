//! The delivery worker against a real SQLite file, a hand-driven clock and real receivers on
//! the loopback interface (`selfheal-receivers`): each channel's message as the other end got
//! it, retries, give-up, ordering, restarts and secrets.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use selfheal_receivers::{HttpRecorder, SmtpFailure, SmtpRecorder, TestPki};

use super::*;
use crate::{
    alerts::{self, Action, AlertManager, Signal},
    bus::Severity,
    config::SmtpTls,
    state::{self, DbOptions, DbThread},
};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
/// Some instant, in Unix ms.
const T0: i64 = 1_800_000_000_000;
/// How long a test waits for something that should take milliseconds.
const WAIT: Duration = Duration::from_secs(10);

const SLACK_PATH: &str = "/services/T0SECRET/B0SECRET/xoxsecretslackkey";
const ROUTING_KEY: &str = "R0UT1NGKEYf00dfeedbeef0123456789";
const SMTP_PASSWORD: &str = "hunter2-smtp-secret";

/// A state directory, a clock the test moves, and metrics.
struct Fixture {
    dir: tempfile::TempDir,
    now: Arc<AtomicI64>,
    clock: alerts::Clock,
    metrics: Metrics,
}

impl Fixture {
    fn new() -> Self {
        let now = Arc::new(AtomicI64::new(T0));
        let read = now.clone();
        Self {
            dir: tempfile::tempdir().expect("dir"),
            now,
            clock: Arc::new(move || read.load(Ordering::SeqCst)),
            metrics: Metrics::new(),
        }
    }

    fn open(&self) -> (StateDb, DbThread) {
        let (db, thread, _) = state::open(
            &DbOptions {
                path: self.dir.path().join(state::DB_FILE),
                busy_timeout: Duration::from_secs(1),
            },
            self.metrics.clone(),
        )
        .expect("open");
        (db, thread)
    }

    fn now(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    fn advance_to(&self, at: i64) {
        self.now.store(at, Ordering::SeqCst);
    }

    async fn manager(&self, db: &StateDb, config: &NotificationsConfig) -> AlertManager {
        let settings =
            alerts::Settings::from_config(&crate::config::AlertsConfig::default(), config);
        AlertManager::start(
            db.clone(),
            settings,
            self.clock.clone(),
            self.metrics.clone(),
        )
        .await
        .expect("manager")
    }

    fn notifier(&self, db: &StateDb, config: &NotificationsConfig, poll: Duration) -> Notifier {
        let settings = Settings {
            timeout: Duration::from_secs(5),
            give_up_after_ms: 24 * HOUR,
            poll_interval: poll,
            batch: 50,
        };
        Notifier::new(
            config,
            settings,
            db.clone(),
            self.clock.clone(),
            self.metrics.clone(),
        )
        .expect("notifier")
    }

    fn deliveries(&self, channel: &'static str, result: &'static str) -> u64 {
        self.metrics
            .notify_deliveries
            .get_or_create(&DeliveryLabel { channel, result })
            .get()
    }
}

fn fire(rule: &str, labels: &[(&str, &str)], severity: Severity, message: &str) -> Signal {
    Signal {
        rule: rule.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        severity,
        message: message.to_owned(),
        firing: true,
    }
}

fn cleared(rule: &str, labels: &[(&str, &str)]) -> Signal {
    Signal {
        firing: false,
        ..fire(rule, labels, Severity::Info, "back to normal")
    }
}

/// An outbox row as the tests look at it.
#[derive(Debug, Clone)]
struct Stored {
    id: i64,
    channel: String,
    kind: String,
    state: String,
    attempts: i64,
    next_attempt_ms: i64,
    delivered_at_ms: Option<i64>,
    last_error: Option<String>,
    payload: String,
}

async fn stored(db: &StateDb) -> Vec<Stored> {
    db.call("test_outbox", |c| {
        c.prepare(
            "SELECT id, channel, kind, state, attempts, next_attempt_ms, delivered_at_ms, \
             last_error, payload FROM outbox ORDER BY id",
        )?
        .query_map([], |r| {
            Ok(Stored {
                id: r.get(0)?,
                channel: r.get(1)?,
                kind: r.get(2)?,
                state: r.get(3)?,
                attempts: r.get(4)?,
                next_attempt_ms: r.get(5)?,
                delivered_at_ms: r.get(6)?,
                last_error: r.get(7)?,
                payload: r.get(8)?,
            })
        })?
        .collect()
    })
    .await
    .expect("outbox")
}

fn slack_config(recorder: &HttpRecorder) -> NotificationsConfig {
    NotificationsConfig {
        slack_webhook_url: Some(Secret::new(recorder.url(SLACK_PATH))),
        ..NotificationsConfig::default()
    }
}

fn pagerduty_config(recorder: &HttpRecorder) -> NotificationsConfig {
    NotificationsConfig {
        pagerduty_routing_key: Some(Secret::new(ROUTING_KEY)),
        pagerduty_url: recorder.url("/v2/enqueue"),
        ..NotificationsConfig::default()
    }
}

fn email_config(recorder: &SmtpRecorder) -> NotificationsConfig {
    NotificationsConfig {
        email_to: vec![
            "ops@example.com".into(),
            "Oncall <oncall@example.com>".into(),
        ],
        email_from: Some("selfheal <selfheal@example.com>".into()),
        smtp_host: Some("127.0.0.1".into()),
        smtp_port: recorder.port(),
        smtp_tls: SmtpTls::None,
        smtp_username: Some("selfheal".into()),
        smtp_password: Some(Secret::new(SMTP_PASSWORD)),
        ..NotificationsConfig::default()
    }
}

fn webhook_config(recorder: &HttpRecorder) -> NotificationsConfig {
    NotificationsConfig {
        webhook_url: Some(Secret::new(
            recorder.url("/hooks/alerts?token=whsecrettoken42"),
        )),
        webhook_headers: BTreeMap::from([(
            "Authorization".to_owned(),
            Secret::new("Bearer wh-header-secret"),
        )]),
        ..NotificationsConfig::default()
    }
}

/// Runs the worker in the background until the returned token is cancelled.
fn spawn_worker(
    notifier: &Notifier,
    manager: &AlertManager,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(notifier.clone(), manager.enqueued(), cancel.clone()));
    (cancel, task)
}

/// Waits until `check` holds on the outbox.
async fn outbox_until(db: &StateDb, what: &str, check: impl Fn(&[Stored]) -> bool) -> Vec<Stored> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = stored(db).await;
        if check(&rows) {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {WAIT:?} for {what}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn backoff_doubles_from_two_seconds_to_five_minutes_with_a_little_jitter() {
    assert_eq!(backoff_ms(1, 0), 2_000);
    assert_eq!(backoff_ms(2, 0), 4_000);
    assert_eq!(backoff_ms(3, 0), 8_000);
    assert_eq!(backoff_ms(9, 0), 300_000);
    assert_eq!(backoff_ms(1_000, 0), 300_000);
    for entropy in [1, 77, u64::MAX] {
        let first = backoff_ms(1, entropy);
        assert!((1_800..=2_000).contains(&first), "{first}");
        let capped = backoff_ms(50, entropy);
        assert!((270_000..=300_000).contains(&capped), "{capped}");
    }
}

#[test]
fn timestamps_dedup_keys_and_redaction() {
    assert_eq!(payload::rfc3339(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(payload::rfc3339(T0), "2027-01-15T08:00:00.000Z");
    assert_eq!(
        payload::rfc3339(951_782_400_123),
        "2000-02-29T00:00:00.123Z"
    );
    assert_eq!(
        pagerduty::dedup_key("target.exited"),
        "selfheal:target.exited"
    );
    let long = format!("check.down{{check=\"{}\"}}", "é".repeat(200));
    let key = pagerduty::dedup_key(&long);
    assert!(key.len() <= 255, "{}", key.len());
    assert!(key.starts_with("selfheal:check.down"));
    assert_ne!(key, pagerduty::dedup_key(&format!("{long}x")));

    let config = NotificationsConfig {
        slack_webhook_url: Some(Secret::new(format!("https://hooks.slack.com{SLACK_PATH}"))),
        pagerduty_routing_key: Some(Secret::new(ROUTING_KEY)),
        webhook_url: Some(Secret::new("https://u:pw-in-url@example.com/h?k=qsecret")),
        ..NotificationsConfig::default()
    };
    let redactor = Redactor::from_config(&config);
    let text = redactor.redact(&format!(
        "POST https://hooks.slack.com{SLACK_PATH} failed; {SLACK_PATH}; key {ROUTING_KEY}; \
         u:pw-in-url; k=qsecret; echoed auth=Basic dTpwdy1pbi11cmw="
    ));
    // `dTpwdy1pbi11cmw=` is base64 of `u:pw-in-url`, as the Authorization header carries it.
    for secret in [
        SLACK_PATH,
        ROUTING_KEY,
        "pw-in-url",
        "qsecret",
        "dTpwdy1pbi11cmw=",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(text.contains("***"), "{text}");
}

#[tokio::test]
async fn slack_gets_a_text_and_blocks_for_the_trigger_and_the_resolution() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start().expect("recorder");
    let config = slack_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire(
            "target.memory_high",
            &[("platform", "tackle.io")],
            Severity::Warning,
            "memory at 91 % of the limit <1 GiB>",
        ))
        .await;
    manager
        .signal(fire(
            "check.down",
            &[("platform", "tackle.io"), ("check", "crm")],
            Severity::Critical,
            "crm is down",
        ))
        .await;
    let round = notifier.round(Channel::Slack).await;
    assert_eq!(round.delivered, 2);
    let requests = recorder.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("POST", SLACK_PATH)
    );
    assert_eq!(first.header("content-type"), Some("application/json"));
    let body = first.json().expect("json");
    assert_eq!(
        body["text"],
        r#"[selfheal] WARNING target.memory_high{platform="tackle.io"} firing: memory at 91 % of the limit <1 GiB>"#
    );
    let all = first.body_text();
    assert!(
        all.contains("memory at 91 % of the limit &lt;1 GiB&gt;"),
        "{all}"
    );
    assert!(all.contains("*Labels*\\nplatform=tackle.io"), "{all}");
    assert!(all.contains("*Severity*\\nwarning"), "{all}");
    // The second alert joined the first one's group: its message lists both.
    let second = requests[1].body_text();
    assert!(
        second.contains("*Group platform=tackle.io* (2 active)"),
        "{second}"
    );
    assert!(
        second.contains("target.memory_high (warning, firing)"),
        "{second}"
    );
    assert!(second.contains("check.down (critical, firing)"), "{second}");

    f.advance_to(T0 + MIN);
    manager
        .signal(cleared("target.memory_high", &[("platform", "tackle.io")]))
        .await;
    assert_eq!(notifier.round(Channel::Slack).await.delivered, 1);
    let resolved = recorder.requests()[2].json().expect("json");
    let text = resolved["text"].as_str().expect("text");
    assert!(
        text.starts_with(r#"[selfheal] WARNING target.memory_high{platform="tackle.io"} resolved: resolved by the rule"#),
        "{text}"
    );
    assert_eq!(resolved["attachments"][0]["color"], "#2eb67d");

    let rows = stored(&db).await;
    assert!(
        rows.iter()
            .all(|r| r.state == "delivered" && r.attempts == 1),
        "{rows:#?}"
    );
    assert_eq!(rows[2].delivered_at_ms, Some(T0 + MIN));
    assert_eq!(f.deliveries("slack", "delivered"), 3);
    assert_eq!(
        f.metrics
            .notify_pending
            .get_or_create(&ChannelLabel { channel: "slack" })
            .get(),
        0
    );
}

#[tokio::test]
async fn pagerduty_trigger_acknowledge_and_resolve_share_one_dedup_key() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start_answering(202, r#"{"status":"success"}"#).expect("recorder");
    let config = pagerduty_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    let labels = [("platform", "tackle.io")];
    manager
        .signal(fire(
            "target.cpu_high",
            &labels,
            Severity::Critical,
            "cpu at 240 %",
        ))
        .await;
    let id = manager.active()[0].id;
    manager
        .change(id, Action::Acknowledge, "ana".into(), "on it".into())
        .await
        .expect("ack");
    manager.signal(cleared("target.cpu_high", &labels)).await;
    // One round sends the three in order.
    assert_eq!(notifier.round(Channel::PagerDuty).await.delivered, 3);
    let events: Vec<serde_json::Value> = recorder
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.path, "/v2/enqueue");
            r.json().expect("json")
        })
        .collect();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["event_action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["trigger", "acknowledge", "resolve"]);
    let key = r#"selfheal:target.cpu_high{platform="tackle.io"}"#;
    for event in &events {
        assert_eq!(event["routing_key"], ROUTING_KEY);
        assert_eq!(event["dedup_key"], key);
    }
    let trigger = &events[0]["payload"];
    assert_eq!(trigger["severity"], "critical");
    assert_eq!(
        trigger["summary"],
        r#"CRITICAL target.cpu_high{platform="tackle.io"} firing: cpu at 240 %"#
    );
    assert_eq!(trigger["component"], "tackle.io");
    assert_eq!(trigger["group"], "platform=tackle.io");
    assert_eq!(trigger["class"], "target.cpu_high");
    assert_eq!(trigger["timestamp"], "2027-01-15T08:00:00.000Z");
    assert!(trigger["source"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(trigger["custom_details"]["labels"]["platform"], "tackle.io");
    assert_eq!(trigger["custom_details"]["alert_id"], id);
    assert!(events[1].get("payload").is_none(), "{}", events[1]);

    // Severities map one to one.
    manager
        .signal(fire(
            "target.memory_high",
            &[],
            Severity::Info,
            "memory grows",
        ))
        .await;
    assert_eq!(notifier.round(Channel::PagerDuty).await.delivered, 1);
    assert_eq!(
        recorder.requests()[3].json().expect("json")["payload"]["severity"],
        "info"
    );
}

#[tokio::test]
async fn a_pagerduty_400_fails_the_notification_at_once() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start_answering(
        400,
        r#"{"status":"invalid event","message":"Event object is invalid","errors":["Length of 'routing_key' is incorrect"]}"#,
    )
    .expect("recorder");
    let config = pagerduty_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    let round = notifier.round(Channel::PagerDuty).await;
    assert!(round.stopped);
    let rows = stored(&db).await;
    assert_eq!(rows[0].state, "failed");
    assert_eq!(rows[0].attempts, 1);
    let error = rows[0].last_error.as_deref().expect("error");
    assert!(error.starts_with("HTTP 400 Bad Request: "), "{error}");
    assert!(error.contains("routing_key"), "{error}");
    assert_eq!(f.deliveries("pagerduty", "failed"), 1);
    // Nothing is tried again, however long we wait.
    f.advance_to(T0 + 48 * HOUR);
    assert_eq!(notifier.round(Channel::PagerDuty).await, Round::default());
    assert_eq!(recorder.count(), 1);
}

#[tokio::test]
async fn email_goes_to_every_recipient_with_subject_body_and_credentials() {
    let f = Fixture::new();
    let recorder = SmtpRecorder::start().expect("recorder");
    recorder.require_credentials(Some(("selfheal", SMTP_PASSWORD)));
    let config = email_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire(
            "target.exited",
            &[],
            Severity::Critical,
            "the target exited (SIGKILL)",
        ))
        .await;
    assert_eq!(notifier.round(Channel::Email).await.delivered, 1);
    let mails = recorder.messages();
    let mail = &mails[0];
    // `smtp_tls = "none"`, to a loopback relay: in clear, as configured.
    assert!(!mail.tls);
    assert_eq!(mail.from, "selfheal@example.com");
    assert_eq!(mail.to, ["ops@example.com", "oncall@example.com"]);
    assert_eq!(
        mail.header("subject").as_deref(),
        Some("[selfheal] CRITICAL target.exited firing")
    );
    assert_eq!(
        mail.header("from").as_deref(),
        Some("selfheal <selfheal@example.com>")
    );
    assert!(mail
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let body = mail.body();
    for line in [
        "CRITICAL target.exited firing",
        "Message:    the target exited (SIGKILL)",
        "Rule:       target.exited",
        "Labels:     none",
        "First seen: 2027-01-15T08:00:00.000Z",
    ] {
        assert!(body.contains(line), "{line:?} not in {body}");
    }
    let auth = mail.auth.as_ref().expect("authenticated");
    assert_eq!(
        (
            auth.mechanism.as_str(),
            auth.username.as_str(),
            auth.password.as_str()
        ),
        ("PLAIN", "selfheal", SMTP_PASSWORD)
    );

    // A relay that offers only AUTH LOGIN gets the same credentials that way.
    recorder.advertise_auth(&["LOGIN"]);
    let id = manager.active()[0].id;
    manager
        .change(
            id,
            Action::Resolve,
            "ana".into(),
            "restarted by hand".into(),
        )
        .await
        .expect("resolve");
    assert_eq!(notifier.round(Channel::Email).await.delivered, 1);
    let mail = &recorder.messages()[1];
    assert_eq!(
        mail.header("subject").as_deref(),
        Some("[selfheal] CRITICAL target.exited resolved")
    );
    assert!(
        mail.body().contains("resolved by ana: restarted by hand"),
        "{}",
        mail.body()
    );
    let auth = mail.auth.as_ref().expect("authenticated");
    assert_eq!(
        (auth.mechanism.as_str(), auth.password.as_str()),
        ("LOGIN", SMTP_PASSWORD)
    );
}

#[tokio::test]
async fn an_smtp_451_is_retried_and_the_message_sent_once_it_passes() {
    let f = Fixture::new();
    let recorder = SmtpRecorder::start().expect("recorder");
    recorder.fail(Some(SmtpFailure::Data));
    let config = email_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    assert!(notifier.round(Channel::Email).await.stopped);
    let row = stored(&db).await.remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 1));
    let error = row.last_error.expect("error");
    assert!(
        error.starts_with("SMTP: ") && error.contains("451"),
        "{error}"
    );
    assert!(!error.contains(SMTP_PASSWORD));

    recorder.fail(Some(SmtpFailure::Mail));
    f.advance_to(row.next_attempt_ms);
    assert!(notifier.round(Channel::Email).await.stopped);
    recorder.fail(None);
    let row = stored(&db).await.remove(0);
    f.advance_to(row.next_attempt_ms);
    assert_eq!(notifier.round(Channel::Email).await.delivered, 1);
    assert_eq!(recorder.transactions(), 3);
    assert_eq!(recorder.messages().len(), 1);
    let row = stored(&db).await.remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("delivered", 3));
}

/// Which TLS a relay speaks in the tests below.
#[derive(Debug, Clone, Copy)]
enum RelayTls {
    StartTls,
    Implicit,
}

/// A relay with a certificate from a fresh test CA, and that CA written to a file.
fn tls_relay(f: &Fixture, mode: RelayTls) -> (SmtpRecorder, std::path::PathBuf) {
    let pki = TestPki::localhost().expect("pki");
    let recorder = match mode {
        RelayTls::StartTls => SmtpRecorder::start_starttls(&pki.cert_pem, &pki.key_pem),
        RelayTls::Implicit => SmtpRecorder::start_implicit_tls(&pki.cert_pem, &pki.key_pem),
    }
    .expect("recorder");
    let ca_file = f.dir.path().join("relay-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).expect("CA file");
    (recorder, ca_file)
}

/// `smtp_tls` with the CA file: the email arrives over TLS, credentials included.
async fn email_is_delivered_over_tls(mode: RelayTls, smtp_tls: SmtpTls) {
    let f = Fixture::new();
    let (recorder, ca_file) = tls_relay(&f, mode);
    recorder.require_credentials(Some(("selfheal", SMTP_PASSWORD)));
    let config = NotificationsConfig {
        smtp_tls,
        smtp_ca_file: Some(ca_file),
        ..email_config(&recorder)
    };
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    let round = notifier.round(Channel::Email).await;
    assert_eq!(round.delivered, 1, "{mode:?}: {:#?}", stored(&db).await);
    let mails = recorder.messages();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(mail.tls, "{mode:?}: the mail came in clear");
    assert_eq!(
        mail.header("subject").as_deref(),
        Some("[selfheal] CRITICAL target.exited firing")
    );
    assert_eq!(mail.to, ["ops@example.com", "oncall@example.com"]);
    let auth = mail.auth.as_ref().expect("authenticated");
    assert!(auth.tls && auth.accepted, "{auth:?}");
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("selfheal", SMTP_PASSWORD)
    );
    // No AUTH was tried before TLS, and nothing failed on the way.
    let auths = recorder.authentications();
    assert!(auths.iter().all(|a| a.tls), "{auths:?}");
    assert!(recorder.tls_failures().is_empty());
    let row = stored(&db).await.remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("delivered", 1));
}

#[tokio::test]
async fn email_over_starttls_trusts_the_ca_file_and_authenticates_inside_tls() {
    email_is_delivered_over_tls(RelayTls::StartTls, SmtpTls::Starttls).await;
}

#[tokio::test]
async fn email_over_implicit_tls_trusts_the_ca_file_and_authenticates_inside_tls() {
    email_is_delivered_over_tls(RelayTls::Implicit, SmtpTls::Tls).await;
}

#[tokio::test]
async fn a_relay_certificate_from_an_unknown_ca_is_refused_and_retried() {
    let f = Fixture::new();
    let (recorder, _ca_file) = tls_relay(&f, RelayTls::StartTls);
    // Without smtp_ca_file, only the web PKI roots are trusted.
    let config = NotificationsConfig {
        smtp_tls: SmtpTls::Starttls,
        ..email_config(&recorder)
    };
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    let round = notifier.round(Channel::Email).await;
    assert!(round.stopped && round.delivered == 0, "{round:?}");
    let row = stored(&db).await.remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 1));
    assert!(row.next_attempt_ms > T0, "{row:?}");
    let error = row.last_error.expect("error");
    assert!(
        error.starts_with("SMTP: ")
            && error.contains("certificate")
            && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert!(!error.contains(SMTP_PASSWORD), "{error}");
    recorder
        .wait_for_tls_failures(1, WAIT)
        .await
        .expect("the handshake was tried and failed");
    assert!(recorder.authentications().is_empty());
    assert_eq!(recorder.transactions(), 0);
    assert!(recorder.messages().is_empty());
    assert_eq!(f.deliveries("email", "retry"), 1);
}

#[tokio::test]
async fn starttls_is_required_a_relay_without_it_gets_nothing_in_clear() {
    let f = Fixture::new();
    // A plain-text relay: EHLO does not offer STARTTLS.
    let recorder = SmtpRecorder::start().expect("recorder");
    let config = NotificationsConfig {
        smtp_tls: SmtpTls::Starttls,
        ..email_config(&recorder)
    };
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    assert!(notifier.round(Channel::Email).await.stopped);
    let row = stored(&db).await.remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 1));
    let error = row.last_error.expect("error");
    assert!(error.contains("STARTTLS"), "{error}");
    assert!(!error.contains(SMTP_PASSWORD), "{error}");
    // Neither the credentials nor the message went out.
    assert!(recorder.authentications().is_empty());
    assert_eq!(recorder.transactions(), 0);
    assert!(recorder.messages().is_empty());
}

#[tokio::test]
async fn an_unusable_smtp_ca_file_fails_the_email_setup_with_its_reason() {
    let f = Fixture::new();
    let pki = TestPki::localhost().expect("pki");
    let recorder = SmtpRecorder::start().expect("recorder");
    let (db, _thread) = f.open();
    let dir = f.dir.path();
    // Every reason a file is refused is `tls::read_ca_file`'s (tested there); here, that
    // the email channel's setup fails with it, naming its key.
    let cases = [
        ("missing.pem", None, "cannot read it"),
        (
            "key-only.pem",
            Some(pki.key_pem.clone()),
            "holds no certificate",
        ),
    ];
    for (name, contents, reason) in cases {
        let path = dir.join(name);
        if let Some(contents) = contents {
            std::fs::write(&path, contents).expect("write");
        }
        let config = NotificationsConfig {
            smtp_tls: SmtpTls::Starttls,
            smtp_ca_file: Some(path.clone()),
            ..email_config(&recorder)
        };
        let settings = Settings::from_config(&config);
        let Err(error) = Notifier::new(
            &config,
            settings,
            db.clone(),
            f.clock.clone(),
            f.metrics.clone(),
        ) else {
            panic!("{name}: the notifier was set up");
        };
        assert!(
            matches!(&error, NotifyError::SmtpCaFile { path: p, .. } if *p == path),
            "{name}: {error:?}"
        );
        let text = describe(&error);
        assert!(
            text.starts_with(&format!(
                "cannot use notifications.smtp_ca_file {}: ",
                path.display()
            )) && text.contains(reason),
            "{name}: {text}"
        );
    }
    // With smtp_tls = "none" the file is not read (validation refuses that pairing anyway).
    let config = NotificationsConfig {
        smtp_ca_file: Some(dir.join("missing.pem")),
        ..email_config(&recorder)
    };
    assert!(Notifier::new(
        &config,
        Settings::from_config(&config),
        db.clone(),
        f.clock.clone(),
        f.metrics.clone(),
    )
    .is_ok());
}

#[tokio::test]
async fn the_webhook_gets_the_stored_payload_as_is_with_its_headers() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start().expect("recorder");
    let config = webhook_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire(
            "target.exited",
            &[("platform", "tackle.io")],
            Severity::Critical,
            "exited",
        ))
        .await;
    assert_eq!(notifier.round(Channel::Webhook).await.delivered, 1);
    let request = &recorder.requests()[0];
    let row = stored(&db).await.remove(0);
    assert_eq!(row.channel, "webhook");
    assert_eq!(request.path, "/hooks/alerts");
    assert_eq!(request.query.as_deref(), Some("token=whsecrettoken42"));
    assert_eq!(request.body_text(), row.payload);
    assert_eq!(
        request.header("authorization"),
        Some("Bearer wh-header-secret")
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.header("idempotency-key"),
        Some(format!("selfheal-{}", row.id).as_str())
    );
    let body = request.json().expect("json");
    assert_eq!(body["kind"], "trigger");
    assert_eq!(body["alert"]["labels"]["platform"], "tackle.io");
}

#[tokio::test]
async fn a_failing_receiver_is_retried_with_backoff_and_delivered_exactly_once() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start().expect("recorder");
    recorder.answer(500, "internal error");
    let config = slack_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    // Resolved at once: the resolve waits behind its trigger.
    manager.signal(cleared("target.exited", &[])).await;

    let round = notifier.round(Channel::Slack).await;
    assert!(round.stopped);
    assert_eq!(recorder.count(), 1);
    let rows = stored(&db).await;
    assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("pending", 1));
    assert_eq!(
        rows[0].last_error.as_deref(),
        Some("HTTP 500 Internal Server Error: internal error")
    );
    let wait = rows[0].next_attempt_ms - T0;
    assert!((1_800..=2_000).contains(&wait), "{wait}");
    assert_eq!((rows[1].kind.as_str(), rows[1].attempts), ("resolve", 0));

    // Not due yet: nothing is sent, and the resolve does not overtake its trigger.
    assert_eq!(notifier.round(Channel::Slack).await, Round::default());
    assert_eq!(recorder.count(), 1);

    f.advance_to(rows[0].next_attempt_ms);
    assert!(notifier.round(Channel::Slack).await.stopped);
    let rows = stored(&db).await;
    assert_eq!(rows[0].attempts, 2);
    let wait = rows[0].next_attempt_ms - f.now();
    assert!((3_600..=4_000).contains(&wait), "{wait}");

    recorder.answer(200, "ok");
    f.advance_to(rows[0].next_attempt_ms);
    assert_eq!(notifier.round(Channel::Slack).await.delivered, 2);
    let requests = recorder.requests();
    assert_eq!(requests.len(), 4);
    let texts: Vec<String> = requests
        .iter()
        .map(|r| {
            r.json().expect("json")["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(texts[..3].iter().all(|t| t.contains("firing")), "{texts:?}");
    assert!(texts[3].contains("resolved"), "{texts:?}");
    let rows = stored(&db).await;
    assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("delivered", 3));
    assert_eq!(rows[0].delivered_at_ms, Some(f.now()));
    assert_eq!((rows[1].state.as_str(), rows[1].attempts), ("delivered", 1));

    // Delivered is final: later rounds send nothing.
    f.advance_to(T0 + 2 * HOUR);
    assert_eq!(notifier.round(Channel::Slack).await, Round::default());
    assert_eq!(recorder.count(), 4);
    assert_eq!(f.deliveries("slack", "retry"), 2);
    assert_eq!(f.deliveries("slack", "delivered"), 2);
}

#[tokio::test]
async fn a_notification_still_failing_after_the_limit_is_given_up() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start().expect("recorder");
    recorder.answer(503, "");
    let config = slack_config(&recorder);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    assert!(notifier.round(Channel::Slack).await.stopped);
    f.advance_to(T0 + 24 * HOUR);
    assert!(notifier.round(Channel::Slack).await.stopped);
    let row = stored(&db).await.remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 2));
    assert_eq!(
        row.last_error.as_deref(),
        Some("gave up after 2 attempts over 86400 s: HTTP 503 Service Unavailable")
    );
    assert_eq!(f.deliveries("slack", "failed"), 1);
}

#[tokio::test]
async fn a_failing_slack_does_not_hold_back_the_webhook_and_enqueueing_wakes_the_worker() {
    let f = Fixture::new();
    let slack = HttpRecorder::start().expect("slack");
    let hook = HttpRecorder::start().expect("webhook");
    let config = NotificationsConfig {
        slack_webhook_url: slack_config(&slack).slack_webhook_url,
        ..webhook_config(&hook)
    };
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    // No poll within the test: only the manager's signal can start a delivery.
    let notifier = f.notifier(&db, &config, Duration::from_hours(1));
    let (cancel, worker) = spawn_worker(&notifier, &manager);
    // Slack takes the request and does not answer.
    slack.hold(true);
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    slack
        .wait_for_requests(1, WAIT)
        .await
        .expect("slack got it");
    hook.wait_for_requests(1, WAIT)
        .await
        .expect("webhook got it");
    let rows = outbox_until(&db, "the webhook delivered", |rows| {
        rows.iter()
            .any(|r| r.channel == "webhook" && r.state == "delivered")
    })
    .await;
    let slack_row = rows
        .iter()
        .find(|r| r.channel == "slack")
        .expect("slack row");
    assert_eq!(
        (slack_row.state.as_str(), slack_row.attempts),
        ("pending", 0)
    );

    // Slack answers 500 at last; the webhook has long been done.
    slack.answer(500, "down");
    slack.hold(false);
    outbox_until(&db, "the slack failure recorded", |rows| {
        rows.iter().any(|r| r.channel == "slack" && r.attempts == 1)
    })
    .await;
    cancel.cancel();
    worker.await.expect("worker");
    assert_eq!(hook.count(), 1);
}

#[tokio::test]
async fn a_delivered_notification_is_not_sent_again_after_a_restart() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start().expect("recorder");
    let config = slack_config(&recorder);
    {
        let (db, thread) = f.open();
        let manager = f.manager(&db, &config).await;
        let notifier = f.notifier(&db, &config, Duration::from_millis(20));
        let (cancel, worker) = spawn_worker(&notifier, &manager);
        manager
            .signal(fire("target.exited", &[], Severity::Critical, "exited"))
            .await;
        outbox_until(&db, "delivered", |rows| {
            rows.iter().all(|r| r.state == "delivered")
        })
        .await;
        cancel.cancel();
        worker.await.expect("worker");
        drop((notifier, manager, db));
        thread.finished().await;
    }
    // A new process on the same file, hours later.
    f.advance_to(T0 + 5 * HOUR);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_millis(20));
    let (cancel, worker) = spawn_worker(&notifier, &manager);
    // A new alert goes out; the old one did not go out again before it (same channel, in
    // order).
    manager
        .signal(fire("target.cpu_high", &[], Severity::Warning, "busy"))
        .await;
    recorder
        .wait_for_requests(2, WAIT)
        .await
        .expect("the new one");
    outbox_until(&db, "delivered", |rows| {
        rows.iter().all(|r| r.state == "delivered")
    })
    .await;
    cancel.cancel();
    worker.await.expect("worker");
    let texts: Vec<String> = recorder
        .requests()
        .iter()
        .map(selfheal_receivers::Request::body_text)
        .collect();
    assert_eq!(texts.len(), 2, "{texts:#?}");
    assert!(texts[1].contains("target.cpu_high"), "{texts:#?}");
}

#[tokio::test]
async fn a_delivery_cut_short_before_its_record_is_sent_again_by_a_fresh_worker() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start_answering(202, "{}").expect("recorder");
    let config = pagerduty_config(&recorder);
    {
        let (db, thread) = f.open();
        let manager = f.manager(&db, &config).await;
        let notifier = f.notifier(&db, &config, Duration::from_millis(20));
        let (cancel, worker) = spawn_worker(&notifier, &manager);
        recorder.hold(true);
        manager
            .signal(fire("target.exited", &[], Severity::Critical, "exited"))
            .await;
        recorder.wait_for_requests(1, WAIT).await.expect("sent");
        // The worker dies between the send and the record (as under SIGKILL).
        cancel.cancel();
        worker.await.expect("worker");
        let row = stored(&db).await.remove(0);
        assert_eq!((row.state.as_str(), row.attempts), ("pending", 0));
        drop((notifier, manager, db));
        thread.finished().await;
    }
    recorder.hold(false);
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_millis(20));
    let (cancel, worker) = spawn_worker(&notifier, &manager);
    let rows = outbox_until(&db, "delivered", |rows| rows[0].state == "delivered").await;
    cancel.cancel();
    worker.await.expect("worker");
    assert_eq!(rows[0].attempts, 1);
    // At least once: the receiver saw it twice, with the same dedup_key, so PagerDuty keeps
    // one incident.
    let requests = recorder.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].json().expect("json"),
        requests[1].json().expect("json")
    );
}

#[tokio::test]
async fn rows_of_a_channel_no_longer_configured_are_failed_not_kept() {
    let f = Fixture::new();
    let recorder = HttpRecorder::start().expect("recorder");
    let (db, _thread) = f.open();
    let with_slack = slack_config(&recorder);
    let manager = f.manager(&db, &with_slack).await;
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    // Slack was removed from the config before the worker ran.
    let webhook_only = webhook_config(&recorder);
    let notifier = f.notifier(&db, &webhook_only, Duration::from_millis(20));
    let (cancel, worker) = spawn_worker(&notifier, &manager);
    let rows = outbox_until(&db, "failed", |rows| rows[0].state == "failed").await;
    cancel.cancel();
    worker.await.expect("worker");
    assert_eq!(
        rows[0].last_error.as_deref(),
        Some("the slack channel is not configured any more")
    );
    assert_eq!(recorder.count(), 0);
    assert_eq!(f.deliveries("slack", "failed"), 1);
}

/// Log lines written while it is the thread's default subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

#[tokio::test]
async fn no_secret_reaches_last_error_or_the_logs() {
    let logs = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    // The test's runtime is current-thread: everything below logs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = Fixture::new();
    // Slack's URL leads nowhere (connection refused): reqwest's error would name it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    // PagerDuty answers 500 echoing the routing key; the webhook 503 echoing its header.
    let pd = HttpRecorder::start().expect("pd");
    pd.answer(
        500,
        &format!("internal error for routing key {ROUTING_KEY}"),
    );
    let hook = HttpRecorder::start().expect("hook");
    hook.answer(503, "not now, Bearer wh-header-secret");
    let smtp = SmtpRecorder::start().expect("smtp");
    smtp.require_credentials(Some(("selfheal", "another password")));
    let mut config = email_config(&smtp);
    config.slack_webhook_url = Some(Secret::new(format!("http://127.0.0.1:{port}{SLACK_PATH}")));
    config.pagerduty_routing_key = Some(Secret::new(ROUTING_KEY));
    config.pagerduty_url = pd.url("/v2/enqueue");
    let webhook = webhook_config(&hook);
    config.webhook_url = webhook.webhook_url;
    config.webhook_headers = webhook.webhook_headers;
    let (db, _thread) = f.open();
    let manager = f.manager(&db, &config).await;
    let notifier = f.notifier(&db, &config, Duration::from_secs(1));
    manager
        .signal(fire("target.exited", &[], Severity::Critical, "exited"))
        .await;
    for channel in Channel::ALL {
        assert!(notifier.round(channel).await.stopped, "{channel:?}");
    }
    let rows = stored(&db).await;
    assert_eq!(rows.len(), 4);
    let secrets = [
        SLACK_PATH,
        "xoxsecretslackkey",
        ROUTING_KEY,
        SMTP_PASSWORD,
        "whsecrettoken42",
        "wh-header-secret",
    ];
    for row in &rows {
        let error = row.last_error.as_deref().expect("error");
        for secret in secrets {
            assert!(
                !error.contains(secret),
                "{secret} in {}: {error}",
                row.channel
            );
        }
    }
    let by_channel = |c: &str| {
        rows.iter()
            .find(|r| r.channel == c)
            .and_then(|r| r.last_error.clone())
            .unwrap_or_default()
    };
    assert!(
        by_channel("pagerduty").contains("routing key ***"),
        "{rows:#?}"
    );
    assert!(by_channel("slack").contains("onnect"), "{rows:#?}");
    assert!(by_channel("email").contains("535"), "{rows:#?}");
    let text = logs.text();
    assert!(text.contains("notification failed for good"), "{text}");
    assert!(text.contains("will retry"), "{text}");
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} in the logs:\n{text}");
    }
}
