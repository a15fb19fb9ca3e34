//! Notification delivery: reads the outbox the alert manager writes and delivers each row to
//! its channel — Slack (`slack.rs`), PagerDuty Events API v2 (`pagerduty.rs`), email over
//! SMTP (`email.rs`), a generic JSON webhook (`webhook.rs`) — recording every attempt in the
//! state DB as soon as it ends.
//!
//! Owns: the delivery worker ([`run`]: one loop per configured channel, so a failing channel
//! never delays another), the retry policy (exponential backoff from 2 s doubling to 5 min,
//! with jitter; a row still failing `notifications.give_up_after_secs` after it was enqueued
//! is `failed`; a refusal that cannot change, such as a PagerDuty 400, fails it at once), the
//! channels' message formats, and `selfheal_notify_*`. Delivery is at least once: a row is
//! marked `delivered` only after its receiver accepted it, so a delivery cut short (a
//! SIGKILL between the send and the record) is sent again after a restart — PagerDuty's
//! `dedup_key` makes that harmless there — and a recorded delivery is never sent again.
//! Within a channel, rows go out in the order they were enqueued: one waiting for its retry
//! holds back the later ones of its channel.
//!
//! Must not: decide what is notified (the alert manager does, when it enqueues), touch the
//! database from an async worker (everything goes through [`StateDb::call`]), or let a secret
//! (a webhook URL, the routing key, the SMTP password, header values) into a log line, a
//! `last_error` or a metric: every error text passes through [`Redactor`].

mod email;
pub mod outbox;
mod pagerduty;
mod payload;
mod slack;
mod webhook;

#[cfg(test)]
mod tests;

use base64::Engine as _;
use std::{
    hash::{BuildHasher as _, Hasher as _},
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    alerts::Clock,
    config::{NotificationsConfig, Secret},
    state::StateDb,
    telemetry::{ChannelLabel, DeliveryLabel, Metrics},
};

use self::{
    outbox::{Outcome, Row},
    payload::{Kind, Payload},
};

/// The first retry comes this long after a failure; each further one twice as long after
/// the previous, up to [`MAX_BACKOFF_MS`].
pub const FIRST_BACKOFF_MS: i64 = 2_000;
pub const MAX_BACKOFF_MS: i64 = 300_000;

/// A notification channel: the outbox's `channel` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Slack,
    PagerDuty,
    Email,
    Webhook,
}

impl Channel {
    pub const ALL: [Self; 4] = [Self::Slack, Self::PagerDuty, Self::Email, Self::Webhook];

    pub fn name(self) -> &'static str {
        match self {
            Self::Slack => "slack",
            Self::PagerDuty => "pagerduty",
            Self::Email => "email",
            Self::Webhook => "webhook",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot build the HTTP client of the notifiers")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot set up TLS for the SMTP relay {host}")]
    SmtpTls {
        host: String,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("notifications.{key} is not a valid email address")]
    Address {
        key: &'static str,
        #[source]
        source: lettre::address::AddressError,
    },
    #[error("notifications.webhook_headers.{name} cannot be sent as an HTTP header")]
    Header { name: String },
    #[error("cannot use notifications.smtp_ca_file {}", path.display())]
    SmtpCaFile {
        path: std::path::PathBuf,
        #[source]
        source: crate::tls::CaFileError,
    },
}

/// Why an attempt failed, in words free of secrets once through the [`Redactor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Worth trying again: the receiver was unreachable, slow, busy or broken.
    Retry(String),
    /// The receiver refused this notification for good.
    Permanent(String),
}

/// Timing of the worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Each attempt ends by this.
    pub timeout: Duration,
    /// A failure this long after the row was enqueued is final.
    pub give_up_after_ms: i64,
    /// How often each channel looks for due rows when not woken.
    pub poll_interval: Duration,
    /// Rows of a channel read per round.
    pub batch: usize,
}

impl Settings {
    pub fn from_config(config: &NotificationsConfig) -> Self {
        Self {
            timeout: Duration::from_millis(config.timeout_ms),
            give_up_after_ms: i64::try_from(config.give_up_after_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            poll_interval: Duration::from_secs(1),
            batch: 50,
        }
    }
}

/// Replaces every configured secret, wherever it appears in a text, by `***`.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secrets themselves stay out of any debug output.
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Redactor {
    pub fn from_config(config: &NotificationsConfig) -> Self {
        let mut redactor = Self::default();
        for url in [&config.slack_webhook_url, &config.webhook_url]
            .into_iter()
            .flatten()
        {
            redactor.add_url(url.expose());
        }
        for secret in [&config.pagerduty_routing_key, &config.smtp_password]
            .into_iter()
            .flatten()
        {
            redactor.add(secret.expose());
        }
        for value in config.webhook_headers.values() {
            redactor.add(value.expose());
        }
        // Longest first, so a secret containing another is replaced whole.
        redactor.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        redactor
    }

    fn add(&mut self, secret: &str) {
        let secret = secret.trim();
        // Shorter strings would blank out ordinary words; such a secret is not one anyway.
        if secret.len() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_owned());
        }
    }

    /// The URL, and its path and query alone: a webhook's key is in its path.
    fn add_url(&mut self, url: &str) {
        self.add(url);
        if let Ok(uri) = url.parse::<http::Uri>() {
            if let Some(path) = uri.path_and_query().map(http::uri::PathAndQuery::as_str) {
                if path != "/" {
                    self.add(path);
                }
            }
            if let Some(query) = uri.query() {
                self.add(query);
            }
            if let Some(authority) = uri.authority() {
                // user:password@host
                if let Some((userinfo, _)) = authority.as_str().rsplit_once('@') {
                    self.add(userinfo);
                    // The client sends it as `Authorization: Basic base64(user:password)`,
                    // which a receiver may echo in an error body.
                    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                    let decoded = format!(
                        "{}:{}",
                        crate::checks::probe::percent_decode(user),
                        crate::checks::probe::percent_decode(password)
                    );
                    self.add(&base64::engine::general_purpose::STANDARD.encode(decoded));
                }
            }
        }
    }

    /// `text` with every secret replaced, cut to 500 characters.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        cut(&text, 500)
    }
}

/// At most `max` characters of `text`, with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The configured channels and what they send with.
struct Senders {
    http: reqwest::Client,
    slack: Option<Secret>,
    pagerduty: Option<pagerduty::PagerDuty>,
    email: Option<email::Mailer>,
    webhook: Option<webhook::Webhook>,
}

/// The delivery worker's state: cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    db: StateDb,
    senders: Senders,
    settings: Settings,
    clock: Clock,
    metrics: Metrics,
    redactor: Redactor,
    /// Keys for the retry jitter, random per process.
    jitter: std::collections::hash_map::RandomState,
}

/// What one round of a channel did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Round {
    pub(crate) delivered: usize,
    /// An attempt failed (or the database did): the channel waits for its next poll.
    pub(crate) stopped: bool,
    /// The batch was full: more rows may be due at once.
    pub(crate) full: bool,
}

impl Notifier {
    /// Sets up the channels that `config` turns on. Only what validation lets through
    /// reaches here, so an error is a bug or a broken TLS library, not a bad config — except
    /// for `smtp_ca_file`, which is first read here: a file that cannot be read or holds no
    /// usable certificate is [`NotifyError::SmtpCaFile`], and the daemon then delivers
    /// nothing (notifications wait in the outbox) rather than send email to a relay it
    /// cannot verify.
    pub fn new(
        config: &NotificationsConfig,
        settings: Settings,
        db: StateDb,
        clock: Clock,
        metrics: Metrics,
    ) -> Result<Self, NotifyError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("selfheal/", env!("CARGO_PKG_VERSION")))
            // A webhook that redirects is misconfigured; following could carry a routing key
            // to another host.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.timeout)
            .build()
            .map_err(NotifyError::HttpClient)?;
        let source = host_name();
        let senders = Senders {
            http,
            slack: config.slack_webhook_url.clone(),
            pagerduty: config.pagerduty_routing_key.clone().map(|routing_key| {
                pagerduty::PagerDuty {
                    url: config.pagerduty_url.clone(),
                    routing_key,
                    source: source.clone(),
                }
            }),
            email: if config.email_to.is_empty() {
                None
            } else {
                Some(email::Mailer::new(config, settings.timeout, &source)?)
            },
            webhook: config
                .webhook_url
                .clone()
                .map(|url| webhook::Webhook::new(url, &config.webhook_headers))
                .transpose()?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                senders,
                settings,
                clock,
                metrics,
                redactor: Redactor::from_config(config),
                jitter: std::collections::hash_map::RandomState::new(),
            }),
        })
    }

    /// The channels configured, in a fixed order.
    pub fn channels(&self) -> Vec<Channel> {
        let s = &self.inner.senders;
        Channel::ALL
            .into_iter()
            .filter(|c| match c {
                Channel::Slack => s.slack.is_some(),
                Channel::PagerDuty => s.pagerduty.is_some(),
                Channel::Email => s.email.is_some(),
                Channel::Webhook => s.webhook.is_some(),
            })
            .collect()
    }

    fn now(&self) -> i64 {
        (self.inner.clock)()
    }

    /// Fails the pending rows of channels that are not configured now: they cannot be sent.
    async fn fail_unconfigured(&self) {
        let configured: Vec<&'static str> = self.channels().iter().map(|c| c.name()).collect();
        let result = self
            .inner
            .db
            .call("notify_unconfigured", move |c| {
                outbox::fail_unconfigured(c, &configured)
            })
            .await;
        match result {
            Ok(failed) => {
                for (channel, rows) in failed {
                    let label = Channel::ALL
                        .into_iter()
                        .find(|c| c.name() == channel)
                        .map_or("other", Channel::name);
                    self.inner
                        .metrics
                        .notify_deliveries
                        .get_or_create(&DeliveryLabel {
                            channel: label,
                            result: "failed",
                        })
                        .inc_by(rows);
                    tracing::error!(%channel, rows, "notifications of a channel that is not configured any more are failed, not sent");
                }
            }
            Err(error) => {
                tracing::error!(error = %crate::app::error_chain(&error), "cannot check the outbox for channels that are not configured");
            }
        }
    }

    /// One round of `channel`: its due rows in order, each recorded as soon as it is tried,
    /// until one fails.
    pub(crate) async fn round(&self, channel: Channel) -> Round {
        let inner = &self.inner;
        let name = channel.name();
        let limit = inner.settings.batch;
        let now = self.now();
        let read = inner
            .db
            .call("notify_due", move |c| outbox::due(c, name, now, limit))
            .await;
        let (rows, pending) = match read {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(channel = name, error = %crate::app::error_chain(&error), "cannot read the outbox");
                return Round {
                    stopped: true,
                    ..Round::default()
                };
            }
        };
        let mut round = Round {
            full: rows.len() >= limit,
            ..Round::default()
        };
        let mut left = pending;
        for row in rows {
            let started = Instant::now();
            let result =
                match tokio::time::timeout(inner.settings.timeout, self.deliver(channel, &row))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(Failure::Retry(format!(
                        "no answer within {} ms",
                        inner.settings.timeout.as_millis()
                    ))),
                };
            inner
                .metrics
                .notify_delivery_duration_seconds
                .get_or_create(&ChannelLabel { channel: name })
                .observe(started.elapsed().as_secs_f64());
            let now = self.now();
            let outcome = self.outcome(&row, result, now);
            let id = row.id;
            let recorded = {
                let outcome = outcome.clone();
                inner
                    .db
                    .call("notify_record", move |c| {
                        outbox::record(c, id, now, &outcome)
                    })
                    .await
            };
            if let Err(error) = recorded {
                // Delivered or not, the row is still pending: it is tried again (at least
                // once), after the database recovers.
                tracing::error!(id, channel = name, error = %crate::app::error_chain(&error), "cannot record a notification attempt");
                round.stopped = true;
                break;
            }
            let result = match &outcome {
                Outcome::Delivered => "delivered",
                Outcome::Retry { .. } => "retry",
                Outcome::Failed { .. } => "failed",
            };
            inner
                .metrics
                .notify_deliveries
                .get_or_create(&DeliveryLabel {
                    channel: name,
                    result,
                })
                .inc();
            let attempts = row.attempts + 1;
            match outcome {
                Outcome::Delivered => {
                    left -= 1;
                    round.delivered += 1;
                    tracing::info!(id, channel = name, kind = %row.kind, alert_id = row.alert_id, attempts, "notification delivered");
                }
                Outcome::Retry {
                    error,
                    next_attempt_ms,
                } => {
                    tracing::warn!(id, channel = name, kind = %row.kind, alert_id = row.alert_id, attempts, retry_in_ms = next_attempt_ms - now, %error, "notification not delivered; will retry");
                    round.stopped = true;
                    break;
                }
                Outcome::Failed { error } => {
                    left -= 1;
                    tracing::error!(id, channel = name, kind = %row.kind, alert_id = row.alert_id, attempts, %error, "notification failed for good; it will not be sent");
                    // A row failed for good does not hold back the rest; but a refusal may
                    // mean the channel is broken, so the rest waits for the next round.
                    round.stopped = true;
                    break;
                }
            }
        }
        inner
            .metrics
            .notify_pending
            .get_or_create(&ChannelLabel { channel: name })
            .set(left.max(0));
        round
    }

    /// What an attempt's result means for its row.
    fn outcome(&self, row: &Row, result: Result<(), Failure>, now: i64) -> Outcome {
        let redactor = &self.inner.redactor;
        match result {
            Ok(()) => Outcome::Delivered,
            Err(Failure::Permanent(error)) => Outcome::Failed {
                error: redactor.redact(&error),
            },
            Err(Failure::Retry(error)) => {
                let error = redactor.redact(&error);
                let attempts = row.attempts + 1;
                let age = now.saturating_sub(row.created_ms);
                if age >= self.inner.settings.give_up_after_ms {
                    Outcome::Failed {
                        error: redactor.redact(&format!(
                            "gave up after {attempts} attempts over {} s: {error}",
                            age / 1000
                        )),
                    }
                } else {
                    let mut hasher = self.inner.jitter.build_hasher();
                    hasher.write_i64(row.id);
                    hasher.write_i64(attempts);
                    Outcome::Retry {
                        error,
                        next_attempt_ms: now.saturating_add(backoff_ms(attempts, hasher.finish())),
                    }
                }
            }
        }
    }

    /// One attempt at `row` on `channel`.
    async fn deliver(&self, channel: Channel, row: &Row) -> Result<(), Failure> {
        let senders = &self.inner.senders;
        let kind = Kind::parse(&row.kind).ok_or_else(|| {
            Failure::Permanent(format!("unknown notification kind {:?}", row.kind))
        })?;
        if channel == Channel::Webhook {
            // The generic webhook gets the payload as stored, whatever it holds.
            let webhook = senders
                .webhook
                .as_ref()
                .ok_or_else(|| not_configured(channel))?;
            return webhook.send(&senders.http, row).await;
        }
        let payload: Payload = serde_json::from_str(&row.payload)
            .map_err(|e| Failure::Permanent(format!("the stored payload cannot be read: {e}")))?;
        match channel {
            Channel::Slack => {
                let url = senders
                    .slack
                    .as_ref()
                    .ok_or_else(|| not_configured(channel))?;
                slack::send(&senders.http, url, &payload, kind).await
            }
            Channel::PagerDuty => {
                let pd = senders
                    .pagerduty
                    .as_ref()
                    .ok_or_else(|| not_configured(channel))?;
                pd.send(&senders.http, &payload, kind).await
            }
            Channel::Email => {
                let mailer = senders
                    .email
                    .as_ref()
                    .ok_or_else(|| not_configured(channel))?;
                mailer.send(&payload, kind).await
            }
            Channel::Webhook => Err(not_configured(channel)),
        }
    }
}

fn not_configured(channel: Channel) -> Failure {
    Failure::Permanent(format!("the {} channel is not configured", channel.name()))
}

/// The wait before retry number `attempts` (1 for the first failure): 2 s doubling to 5 min,
/// less up to a tenth from `entropy`, so rows that failed together do not retry together.
pub fn backoff_ms(attempts: i64, entropy: u64) -> i64 {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    let base = FIRST_BACKOFF_MS
        .saturating_mul(1_i64 << doublings)
        .min(MAX_BACKOFF_MS);
    let spread = u64::try_from(base / 10).unwrap_or(0);
    let jitter = if spread == 0 {
        0
    } else {
        entropy % (spread + 1)
    };
    base - i64::try_from(jitter).unwrap_or(0)
}

/// This machine's name, for PagerDuty's `source` and the email's sign-off.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "selfheal".to_owned())
}

/// An HTTP answer's verdict: 2xx delivered; 408, 429 and 5xx worth a retry; any other status
/// (a 4xx, a redirect) a refusal that retrying will not change.
pub(crate) async fn judge(response: reqwest::Response) -> Result<(), Failure> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = excerpt(response).await;
    let text = if body.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {body}")
    };
    let code = status.as_u16();
    if code == 408 || code == 429 || status.is_server_error() {
        Err(Failure::Retry(text))
    } else {
        Err(Failure::Permanent(text))
    }
}

/// The start of an error answer's body, on one line.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < 512 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    cut(
        &text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>(),
        200,
    )
    .trim()
    .to_owned()
}

/// An error and its sources on one line, leaving out a source whose text the error's own
/// already holds (reqwest's and lettre's messages often repeat their source's).
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A request that got no answer: reqwest's error without its URL (it may hold a key).
pub(crate) fn request_failure(error: reqwest::Error) -> Failure {
    let error = error.without_url();
    let text = describe(&error);
    Failure::Retry(if error.is_timeout() {
        format!("timed out: {text}")
    } else {
        text
    })
}

/// Runs the delivery worker until `cancel`: one loop per configured channel, each woken by
/// `enqueued` (the alert manager's signal) or its poll. Pending rows of channels no longer
/// configured are failed first.
pub async fn run(notifier: Notifier, enqueued: Arc<Notify>, cancel: CancellationToken) {
    let channels = notifier.channels();
    if channels.is_empty() {
        tracing::info!("no notification channel configured; the outbox is not delivered");
    } else {
        tracing::info!(
            channels = ?channels.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "notification delivery started"
        );
    }
    notifier.fail_unconfigured().await;
    let looping = |channel: Channel| {
        let notifier = notifier.clone();
        let enqueued = enqueued.clone();
        let cancel = cancel.clone();
        let on = channels.contains(&channel);
        async move {
            if on {
                channel_loop(&notifier, channel, &enqueued, &cancel).await;
            }
        }
    };
    tokio::join!(
        looping(Channel::Slack),
        looping(Channel::PagerDuty),
        looping(Channel::Email),
        looping(Channel::Webhook),
    );
}

async fn channel_loop(
    notifier: &Notifier,
    channel: Channel,
    enqueued: &Notify,
    cancel: &CancellationToken,
) {
    let poll = notifier.inner.settings.poll_interval;
    loop {
        // Registered before the round reads the outbox, so a row enqueued meanwhile wakes the
        // wait below instead of waiting for the poll.
        let mut woken = pin!(enqueued.notified());
        woken.as_mut().enable();
        let round = tokio::select! {
            () = cancel.cancelled() => return,
            round = notifier.round(channel) => round,
        };
        if round.full && !round.stopped {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = woken => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
}
