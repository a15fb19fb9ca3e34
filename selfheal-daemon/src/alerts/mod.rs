//! The alert manager: turns the rules' "firing" and "cleared" signals into alerts with a
//! lifecycle, and decides which changes are notified.
//!
//! Owns: alerts keyed by rule + labels (dedupe: while an alert of a key is active, the key
//! firing again bumps its `count` and `last_seen`), severities critical / warning / info,
//! the states firing → acknowledged → resolved (resolved by an operator or automatically when
//! the rule says the condition cleared), grouping, the per-key notification throttle,
//! silences, and the enqueueing of notifications into the outbox. Every change is one
//! transaction in the state DB together with its history row, its audit row and its
//! notifications, so a restart, even a SIGKILL, loses or duplicates nothing; the active alerts
//! are loaded from it at start. Must not: deliver notifications (the notifiers read the
//! outbox), touch the database from an async worker (all of it goes through
//! [`StateDb`](crate::state::StateDb)), or panic on a database error (logged, counted, and
//! the manager carries on).
//!
//! **Grouping.** An alert's group key is its `platform` label (`platform=<name>`), else the
//! first dot-separated part of its rule (`target` for `target.exited`). An alert that fires
//! while an active alert of the same group key fired less than `alerts.group_window_secs` ago
//! joins that alert's group (`group_id`, the id of the group's first alert); otherwise it
//! opens a group of its own. Notification payloads list the group's active alerts.
//!
//! **Notifications.** A new alert enqueues one `trigger` per configured channel unless a
//! silence matches it or the key had a trigger less than `alerts.notify_interval_secs` ago
//! (also across alerts of the same key: a flapping rule notifies once per interval). An alert
//! that stays active notifies again, when it fires again after the interval, unless it is
//! acknowledged. `acknowledge` and `resolve` notifications follow only for an alert whose
//! trigger was enqueued, and are not throttled (a page must be closed). A notification
//! suppressed by a silence is not sent later.

pub mod store;
pub mod views;

#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock,
    },
};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{Bus, Event, Severity},
    config::{AlertsConfig, NotificationsConfig},
    state::{StateDb, StateError},
    telemetry::{ChannelLabel, Metrics, ReasonLabel, SeverityLabel},
};

/// Labels of an alert: bounded, chosen by the rule (`platform`, `check`).
pub type Labels = BTreeMap<String, String>;

/// Milliseconds since the Unix epoch, from an injectable source (tests drive it by hand).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::state::now_ms)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Acknowledged,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "firing" => Self::Firing,
            "acknowledged" => Self::Acknowledged,
            "resolved" => Self::Resolved,
            _ => return None,
        })
    }

    pub fn is_active(self) -> bool {
        self != Self::Resolved
    }
}

/// What an operator (or the rule, for `Resolve`) asks of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Acknowledge,
    Resolve,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acknowledge => "acknowledge",
            Self::Resolve => "resolve",
        }
    }
}

/// The state machine: firing → acknowledged → resolved, and firing → resolved. Everything
/// else (acknowledging twice, anything on a resolved alert) is refused.
pub fn transition(from: AlertState, action: Action) -> Option<AlertState> {
    match (from, action) {
        (AlertState::Firing, Action::Acknowledge) => Some(AlertState::Acknowledged),
        (AlertState::Firing | AlertState::Acknowledged, Action::Resolve) => {
            Some(AlertState::Resolved)
        }
        (AlertState::Acknowledged, Action::Acknowledge) | (AlertState::Resolved, _) => None,
    }
}

pub fn severity_str(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "critical",
        Severity::Warning => "warning",
        Severity::Info => "info",
    }
}

pub fn parse_severity(text: &str) -> Option<Severity> {
    Some(match text {
        "critical" => Severity::Critical,
        "warning" => Severity::Warning,
        "info" => Severity::Info,
        _ => return None,
    })
}

/// A rule's input: the condition holds (`firing`) or has cleared.
#[derive(Debug, Clone)]
pub struct Signal {
    pub rule: String,
    pub labels: Labels,
    pub severity: Severity,
    pub message: String,
    pub firing: bool,
}

/// The dedupe key: `rule` alone, or `rule{a="x",b="y"}` with the labels sorted.
pub fn alert_key(rule: &str, labels: &Labels) -> String {
    if labels.is_empty() {
        return rule.to_owned();
    }
    let pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
        .collect();
    format!("{rule}{{{}}}", pairs.join(","))
}

/// The group key: `platform=<name>` for an alert with a platform, else the rule's first part.
pub fn group_key(rule: &str, labels: &Labels) -> String {
    match labels.get("platform") {
        Some(platform) => format!("platform={platform}"),
        None => rule.split('.').next().unwrap_or(rule).to_owned(),
    }
}

/// The manager's settings, from `[alerts]` and `[notifications]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// At most one trigger notification per key in this many milliseconds (0: no throttle).
    pub notify_interval_ms: i64,
    /// An alert joins the group of an active alert of its group key that fired this recently.
    pub group_window_ms: i64,
    /// The configured notification channels (`slack`, `pagerduty`, `email`, `webhook`).
    pub channels: Vec<&'static str>,
}

impl Settings {
    pub fn from_config(alerts: &AlertsConfig, notifications: &NotificationsConfig) -> Self {
        let mut channels = Vec::new();
        if notifications.slack_webhook_url.is_some() {
            channels.push("slack");
        }
        if notifications.pagerduty_routing_key.is_some() {
            channels.push("pagerduty");
        }
        if !notifications.email_to.is_empty() {
            channels.push("email");
        }
        if notifications.webhook_url.is_some() {
            channels.push("webhook");
        }
        Self {
            notify_interval_ms: i64::try_from(alerts.notify_interval_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            group_window_ms: i64::try_from(alerts.group_window_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            channels,
        }
    }
}

/// An alert as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub id: i64,
    pub key: String,
    pub rule: String,
    pub labels: Labels,
    pub platform: Option<String>,
    pub group_key: String,
    pub group_id: i64,
    pub severity: Severity,
    pub state: AlertState,
    pub message: String,
    pub count: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub acknowledged_at_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at_ms: Option<i64>,
    pub resolved_by: Option<String>,
    pub last_notified_ms: Option<i64>,
}

/// One change in an alert's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertEvent {
    pub at_ms: i64,
    /// `fired`, `severity_changed`, `acknowledged`, `resolved`.
    pub kind: String,
    pub state: AlertState,
    pub severity: Severity,
    /// `rule` for the rule's own changes, else who did it.
    pub actor: String,
    pub message: String,
}

/// One operator action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    /// `acknowledge`, `resolve`, `silence`, `expire_silence`.
    pub action: String,
    pub alert_id: Option<i64>,
    pub silence_id: Option<i64>,
    pub note: String,
}

/// One notification in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: i64,
    pub alert_id: Option<i64>,
    pub channel: String,
    /// `trigger`, `acknowledge` or `resolve`.
    pub kind: String,
    pub payload: serde_json::Value,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub created_ms: i64,
    pub delivered_at_ms: Option<i64>,
    pub last_error: Option<String>,
}

/// A silence: alerts matching every matcher (`rule` or a label name → exact value) are not
/// notified between `starts_ms` and `ends_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Silence {
    pub id: i64,
    pub matchers: Labels,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub created_by: String,
    pub comment: String,
}

impl Silence {
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.starts_ms <= now_ms && now_ms < self.ends_ms
    }

    /// True when every matcher equals the alert's rule (`rule`) or label of that name.
    pub fn matches(&self, rule: &str, labels: &Labels) -> bool {
        !self.matchers.is_empty()
            && self.matchers.iter().all(|(name, value)| {
                if name == "rule" {
                    rule == value
                } else {
                    labels.get(name) == Some(value)
                }
            })
    }
}

/// An alert with everything that happened to it.
#[derive(Debug, Clone)]
pub struct Detail {
    pub alert: Alert,
    pub events: Vec<AlertEvent>,
    pub audit: Vec<AuditEntry>,
    pub notifications: Vec<Notification>,
}

/// Which alerts a listing wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Firing or acknowledged.
    Active,
    All,
    Only(AlertState),
}

#[derive(Debug, Clone)]
pub struct Filter {
    pub state: StateFilter,
    pub severity: Option<Severity>,
    pub platform: Option<String>,
    pub limit: u32,
    pub offset: u32,
}

/// A page of a listing, newest first.
#[derive(Debug, Clone)]
pub struct Page {
    pub alerts: Vec<Alert>,
    pub total: u64,
    /// Active silences, to show which alerts they cover.
    pub silences: Vec<Silence>,
}

/// Why a notification was or was not enqueued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notified {
    /// One per channel.
    Enqueued(usize),
    /// The key was notified less than the interval ago.
    Throttled,
    Silenced(i64),
    /// No channel is configured.
    NoChannel,
    /// Nothing to say: a repeat within the interval, or an acknowledged alert firing again.
    NotNeeded,
}

/// What a rule's signal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created {
        alert: Alert,
        notified: Notified,
    },
    Repeated {
        alert: Alert,
        notified: Notified,
        /// Its severity changed with this signal.
        escalated: bool,
    },
    Resolved {
        alert: Alert,
        notified: Notified,
    },
    /// A "cleared" for a key with no active alert.
    NothingActive,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("no alert {id}")]
    NotFound { id: i64 },
    #[error("alert {id} is {state}; it cannot be {action}d", state = state.as_str(), action = action.as_str())]
    NotAllowed {
        id: i64,
        state: AlertState,
        action: Action,
    },
    #[error("no silence {id}")]
    SilenceNotFound { id: i64 },
    #[error("silence {id} has already ended")]
    SilenceEnded { id: i64 },
    #[error("the alert database query failed")]
    Db(#[from] rusqlite::Error),
    #[error("the state database is unavailable")]
    State(#[from] StateError),
}

/// The manager: shared by the bus task and the API. Cheap to clone.
#[derive(Clone)]
pub struct AlertManager {
    inner: Arc<Inner>,
}

struct Inner {
    db: StateDb,
    settings: Settings,
    clock: Clock,
    metrics: Metrics,
    /// Active alerts, refreshed after every change: what the health endpoint reads without
    /// a database round trip.
    active: RwLock<Snapshot>,
    /// Numbers the snapshots in the order the database thread took them, so one that arrives
    /// late (its task was scheduled after a later change's) does not replace a newer one.
    sequence: Arc<AtomicU64>,
    /// Signalled (`notify_waiters`) after a change that enqueued notifications, so the
    /// delivery worker does not wait for its next poll.
    enqueued: Arc<Notify>,
    /// Where changes are announced (`Event::AlertChanged`), once set.
    bus: std::sync::OnceLock<Bus>,
}

/// The active alerts as one database operation left them.
struct Snapshot {
    sequence: u64,
    alerts: Vec<Alert>,
}

/// Reads the active alerts on the database thread, numbered.
fn snapshot(sequence: &AtomicU64, c: &rusqlite::Connection) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        sequence: sequence.fetch_add(1, Ordering::SeqCst) + 1,
        alerts: store::active(c)?,
    })
}

impl AlertManager {
    /// Starts the manager on the state DB, loading the active alerts.
    pub async fn start(
        db: StateDb,
        settings: Settings,
        clock: Clock,
        metrics: Metrics,
    ) -> Result<Self, StateError> {
        let sequence = Arc::new(AtomicU64::new(0));
        let counter = sequence.clone();
        let active = db
            .call("alerts_load", move |c| snapshot(&counter, c))
            .await?;
        let manager = Self {
            inner: Arc::new(Inner {
                db,
                settings,
                clock,
                metrics,
                active: RwLock::new(Snapshot {
                    sequence: 0,
                    alerts: Vec::new(),
                }),
                sequence,
                enqueued: Arc::new(Notify::new()),
                bus: std::sync::OnceLock::new(),
            }),
        };
        if !active.alerts.is_empty() {
            tracing::info!(
                active = active.alerts.len(),
                "active alerts loaded from the state database"
            );
        }
        manager.set_active(active);
        Ok(manager)
    }

    /// The active alerts (firing or acknowledged), newest first, without touching the DB.
    pub fn active(&self) -> Vec<Alert> {
        self.inner
            .active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .alerts
            .clone()
    }

    fn set_active(&self, active: Snapshot) {
        let mut current = self
            .inner
            .active
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if active.sequence < current.sequence {
            return;
        }
        for severity in [Severity::Critical, Severity::Warning, Severity::Info] {
            let n = active
                .alerts
                .iter()
                .filter(|a| a.severity == severity)
                .count();
            self.inner
                .metrics
                .alerts_active
                .get_or_create(&SeverityLabel {
                    severity: severity_str(severity),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        *current = active;
    }

    fn now(&self) -> i64 {
        (self.inner.clock)()
    }

    /// Announces every later change on `bus` as an `Event::AlertChanged` (the live views).
    pub fn announce_on(&self, bus: Bus) {
        let _ = self.inner.bus.set(bus);
    }

    fn announce(&self, alert: &Alert, by: &str) {
        if let Some(bus) = self.inner.bus.get() {
            bus.publish(Event::AlertChanged {
                id: alert.id,
                key: alert.key.clone(),
                rule: alert.rule.clone(),
                state: alert.state.as_str(),
                severity: alert.severity,
                message: alert.message.clone(),
                by: by.to_owned(),
            });
        }
    }

    /// Applies a rule's signal. A database failure is logged and counted; the signal is lost
    /// (the rule fires again while the condition holds).
    pub async fn signal(&self, signal: Signal) {
        let now = self.now();
        let settings = self.inner.settings.clone();
        let rule = signal.rule.clone();
        let sequence = self.inner.sequence.clone();
        let result = self
            .inner
            .db
            .call("alerts_signal", move |c| {
                let outcome = store::apply(c, now, &settings, &signal)?;
                Ok((outcome, snapshot(&sequence, c)?))
            })
            .await;
        match result {
            Ok((outcome, active)) => {
                self.set_active(active);
                self.record(&outcome);
            }
            Err(error) => {
                tracing::error!(%rule, error = %crate::app::error_chain(&error), "cannot record an alert signal");
            }
        }
    }

    fn record(&self, outcome: &Outcome) {
        let metrics = &self.inner.metrics;
        let notified = match outcome {
            Outcome::Created { alert, notified } => {
                metrics
                    .alerts_fired
                    .get_or_create(&SeverityLabel {
                        severity: severity_str(alert.severity),
                    })
                    .inc();
                tracing::warn!(id = alert.id, key = %alert.key, severity = severity_str(alert.severity), message = %alert.message, ?notified, "alert firing");
                self.announce(alert, "rule");
                notified
            }
            Outcome::Repeated {
                alert,
                notified,
                escalated,
            } => {
                if *escalated {
                    self.announce(alert, "rule");
                }
                tracing::debug!(id = alert.id, key = %alert.key, count = alert.count, ?notified, "alert fired again");
                notified
            }
            Outcome::Resolved { alert, notified } => {
                tracing::info!(id = alert.id, key = %alert.key, ?notified, "alert resolved: the condition cleared");
                self.announce(alert, "rule");
                notified
            }
            Outcome::NothingActive => return,
        };
        self.count_notified(notified);
    }

    /// What the delivery worker waits on besides its poll: signalled after every change that
    /// enqueued notifications (once committed).
    pub fn enqueued(&self) -> Arc<Notify> {
        self.inner.enqueued.clone()
    }

    fn count_notified(&self, notified: &Notified) {
        let metrics = &self.inner.metrics;
        match notified {
            Notified::Enqueued(n) => {
                if *n > 0 {
                    self.inner.enqueued.notify_waiters();
                }
                for channel in &self.inner.settings.channels {
                    metrics
                        .alerts_notifications_enqueued
                        .get_or_create(&ChannelLabel { channel })
                        .inc();
                }
            }
            Notified::Throttled => {
                metrics
                    .alerts_notifications_suppressed
                    .get_or_create(&ReasonLabel {
                        reason: "throttled",
                    })
                    .inc();
            }
            Notified::Silenced(_) => {
                metrics
                    .alerts_notifications_suppressed
                    .get_or_create(&ReasonLabel { reason: "silenced" })
                    .inc();
            }
            Notified::NoChannel | Notified::NotNeeded => {}
        }
    }

    /// An operator's acknowledgement or resolution, recorded in the audit.
    pub async fn change(
        &self,
        id: i64,
        action: Action,
        actor: String,
        note: String,
    ) -> Result<Alert, AlertError> {
        let now = self.now();
        let settings = self.inner.settings.clone();
        let op = match action {
            Action::Acknowledge => "alerts_acknowledge",
            Action::Resolve => "alerts_resolve",
        };
        let by = actor.clone();
        let sequence = self.inner.sequence.clone();
        let result = self
            .inner
            .db
            .call_with(op, move |c| {
                let (alert, notified) =
                    store::change(c, now, &settings, id, action, &actor, &note)?;
                let active = snapshot(&sequence, c)?;
                Ok::<_, AlertError>((alert, notified, active))
            })
            .await?;
        match result {
            Ok((alert, notified, active)) => {
                self.set_active(active);
                self.count_notified(&notified);
                tracing::info!(
                    id,
                    action = action.as_str(),
                    %by,
                    "alert changed by an operator"
                );
                self.announce(&alert, &by);
                Ok(alert)
            }
            Err(error) => {
                if matches!(error, AlertError::Db(_)) {
                    self.inner.db.count_error(op);
                }
                Err(error)
            }
        }
    }

    /// A page of alerts.
    pub async fn list(&self, filter: Filter) -> Result<Page, AlertError> {
        let now = self.now();
        Ok(self
            .inner
            .db
            .call("alerts_list", move |c| store::list(c, now, &filter))
            .await?)
    }

    /// How many alerts are kept, resolved, and resolved by their rule.
    pub async fn counts(&self) -> Result<store::Counts, AlertError> {
        Ok(self
            .inner
            .db
            .call("alerts_counts", |c| store::counts(c))
            .await?)
    }

    /// One alert with its history, audit and notifications, and the active silences.
    pub async fn detail(&self, id: i64) -> Result<(Detail, Vec<Silence>), AlertError> {
        let now = self.now();
        let (detail, silences) = self
            .inner
            .db
            .call("alerts_detail", move |c| {
                Ok((store::detail(c, id)?, store::silences(c, now, false)?))
            })
            .await?;
        detail
            .map(|detail| (detail, silences))
            .ok_or(AlertError::NotFound { id })
    }

    /// Creates a silence, recorded in the audit.
    pub async fn silence(
        &self,
        matchers: Labels,
        ends_ms: i64,
        actor: String,
        comment: String,
    ) -> Result<Silence, AlertError> {
        let now = self.now();
        Ok(self
            .inner
            .db
            .call("alerts_silence", move |c| {
                store::create_silence(c, now, &matchers, ends_ms, &actor, &comment)
            })
            .await?)
    }

    /// Ends a silence now, recorded in the audit.
    pub async fn expire_silence(&self, id: i64, actor: String) -> Result<Silence, AlertError> {
        let now = self.now();
        let result = self
            .inner
            .db
            .call_with("alerts_expire_silence", move |c| {
                store::expire_silence(c, now, id, &actor)
            })
            .await?;
        if matches!(result, Err(AlertError::Db(_))) {
            self.inner.db.count_error("alerts_expire_silence");
        }
        result
    }

    /// Silences, active ones only unless `all`.
    pub async fn silences(&self, all: bool) -> Result<Vec<Silence>, AlertError> {
        let now = self.now();
        Ok(self
            .inner
            .db
            .call("alerts_silences", move |c| store::silences(c, now, all))
            .await?)
    }

    /// The current time of the manager's clock.
    pub fn now_ms(&self) -> i64 {
        self.now()
    }
}

/// Feeds the rules' alert events from the bus into the manager until `cancel`.
pub async fn run(manager: AlertManager, bus: Bus, cancel: CancellationToken) {
    let mut events = bus.subscribe();
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Some(Event::Alert {
                rule,
                labels,
                severity,
                firing,
                message,
            }) => {
                manager
                    .signal(Signal {
                        rule,
                        labels,
                        severity,
                        message,
                        firing,
                    })
                    .await;
            }
            Some(_) => {}
            None => return,
        }
    }
}
