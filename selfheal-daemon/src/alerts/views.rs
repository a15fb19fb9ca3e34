//! What the admin API shows of alerts and silences, and how it reads its parameters: the
//! `*View` types are built for the API (times as `*_unix_ms`), never the stored structs.

use serde::{Deserialize, Serialize};

use super::{
    severity_str, Alert, AlertEvent, AlertState, AuditEntry, Detail, Filter, Labels, Notification,
    Page, Silence, StateFilter,
};

/// Alerts per page unless `limit` says otherwise, and the most a page holds.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;
/// Longest `by` and `note` accepted.
pub const MAX_ACTOR_CHARS: usize = 100;
pub const MAX_NOTE_CHARS: usize = 2000;

/// `?state=&severity=&platform=&history=&limit=&offset=` of `GET /api/v1/system/alerts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    pub state: Option<String>,
    pub severity: Option<String>,
    pub platform: Option<String>,
    pub history: Option<String>,
    pub limit: Option<String>,
    pub offset: Option<String>,
}

impl AlertsQuery {
    /// The filter, or what is wrong with the parameters (a 400).
    pub fn filter(&self) -> Result<Filter, String> {
        let history = match self.history.as_deref() {
            None | Some("false" | "0") => false,
            Some("true" | "1") => true,
            Some(other) => return Err(format!("history must be true or false, not {other:?}")),
        };
        let state = match self.state.as_deref() {
            None if history => StateFilter::All,
            None | Some("active") => StateFilter::Active,
            Some("all") => StateFilter::All,
            Some(text) => StateFilter::Only(AlertState::parse(text).ok_or_else(|| {
                format!("state must be firing, acknowledged, resolved, active or all, not {text:?}")
            })?),
        };
        let severity = self
            .severity
            .as_deref()
            .map(|text| {
                super::parse_severity(text).ok_or_else(|| {
                    format!("severity must be critical, warning or info, not {text:?}")
                })
            })
            .transpose()?;
        let number = |name: &str, text: Option<&str>, default: u32, max: u32| {
            text.map_or(Ok(default), |text| {
                text.parse::<u32>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| {
                        format!("{name} must be a whole number from 0 to {max}, not {text:?}")
                    })
            })
        };
        let limit = number("limit", self.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
        if limit == 0 {
            return Err(format!("limit must be from 1 to {MAX_LIMIT}"));
        }
        let offset = number("offset", self.offset.as_deref(), 0, 1_000_000_000)?;
        Ok(Filter {
            state,
            severity,
            platform: self.platform.clone(),
            limit,
            offset,
        })
    }
}

/// The optional body of `POST .../acknowledge` and `.../resolve`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    pub by: Option<String>,
    pub note: Option<String>,
}

/// A JSON body that may be left out: empty (or blank) is the type's default.
pub fn optional_json<T: Default + serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, serde_json::Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        serde_json::from_slice(bytes)
    }
}

impl ChangeBody {
    /// Parses a body that may be empty; `(by, note)` with `by` defaulting to `api`.
    pub fn parse(bytes: &[u8]) -> Result<(String, String), String> {
        let body: Self = optional_json(bytes).map_err(|e| format!("the body is not valid: {e}"))?;
        let by = actor(body.by.as_deref())?;
        let note = body.note.unwrap_or_default();
        if note.chars().count() > MAX_NOTE_CHARS {
            return Err(format!("note is longer than {MAX_NOTE_CHARS} characters"));
        }
        Ok((by, note))
    }
}

fn actor(by: Option<&str>) -> Result<String, String> {
    let by = by.map(str::trim).filter(|b| !b.is_empty()).unwrap_or("api");
    if by.chars().count() > MAX_ACTOR_CHARS || by.chars().any(char::is_control) {
        return Err(format!(
            "by must be at most {MAX_ACTOR_CHARS} printable characters"
        ));
    }
    if by == "rule" {
        // What the alert manager records for a rule's own changes (auto-resolution).
        return Err("by cannot be \"rule\": that names the alert rules themselves".to_owned());
    }
    Ok(by.to_owned())
}

/// The body of `POST /api/v1/system/silences`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceBody {
    /// `rule` and label names to the exact values they must have.
    pub matchers: Labels,
    /// How long from now (`30m`, `2h`, `7d`); or `ends_at_unix_ms`.
    pub duration: Option<String>,
    pub ends_at_unix_ms: Option<i64>,
    pub by: Option<String>,
    #[serde(default)]
    pub comment: String,
}

impl SilenceBody {
    /// `(matchers, ends_ms, by, comment)`, or what is wrong.
    pub fn parse(bytes: &[u8], now_ms: i64) -> Result<(Labels, i64, String, String), String> {
        let body: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("the body is not valid: {e}"))?;
        if body.matchers.is_empty() {
            return Err("matchers must name at least one label (or rule): an empty silence would silence everything".to_owned());
        }
        let ends_ms = match (body.duration.as_deref(), body.ends_at_unix_ms) {
            (Some(text), None) => {
                let secs = crate::traffic::parse_window(text).map_err(|_| {
                    format!("duration {text:?} is not a duration such as 30m, 2h or 7d")
                })?;
                now_ms.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX / 1000) * 1000)
            }
            (None, Some(at)) if at > now_ms => at,
            (None, Some(_)) => return Err("ends_at_unix_ms is in the past".to_owned()),
            _ => return Err("give exactly one of duration and ends_at_unix_ms".to_owned()),
        };
        if body.comment.chars().count() > MAX_NOTE_CHARS {
            return Err(format!(
                "comment is longer than {MAX_NOTE_CHARS} characters"
            ));
        }
        Ok((
            body.matchers,
            ends_ms,
            actor(body.by.as_deref())?,
            body.comment,
        ))
    }
}

#[derive(Debug, Serialize)]
pub struct GroupView {
    pub key: String,
    pub id: i64,
}

#[derive(Debug, Serialize)]
pub struct AlertView {
    pub id: i64,
    pub key: String,
    pub rule: String,
    pub labels: Labels,
    pub platform: Option<String>,
    pub group: GroupView,
    pub severity: &'static str,
    pub state: &'static str,
    pub message: String,
    pub count: i64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub acknowledged_at_unix_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at_unix_ms: Option<i64>,
    pub resolved_by: Option<String>,
    /// When its last trigger notification was enqueued.
    pub last_notified_unix_ms: Option<i64>,
    /// The silence that keeps it from being notified now, if any.
    pub silenced_by: Option<i64>,
}

impl AlertView {
    pub fn new(alert: &Alert, silences: &[Silence]) -> Self {
        let silenced_by = if alert.state.is_active() {
            silences
                .iter()
                .find(|s| s.matches(&alert.rule, &alert.labels))
                .map(|s| s.id)
        } else {
            None
        };
        Self {
            id: alert.id,
            key: alert.key.clone(),
            rule: alert.rule.clone(),
            labels: alert.labels.clone(),
            platform: alert.platform.clone(),
            group: GroupView {
                key: alert.group_key.clone(),
                id: alert.group_id,
            },
            severity: severity_str(alert.severity),
            state: alert.state.as_str(),
            message: alert.message.clone(),
            count: alert.count,
            first_seen_unix_ms: alert.first_seen_ms,
            last_seen_unix_ms: alert.last_seen_ms,
            acknowledged_at_unix_ms: alert.acknowledged_at_ms,
            acknowledged_by: alert.acknowledged_by.clone(),
            resolved_at_unix_ms: alert.resolved_at_ms,
            resolved_by: alert.resolved_by.clone(),
            last_notified_unix_ms: alert.last_notified_ms,
            silenced_by,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AlertListView {
    pub alerts: Vec<AlertView>,
    /// Alerts matching the filter over all pages.
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

impl AlertListView {
    pub fn new(page: &Page, filter: &Filter) -> Self {
        Self {
            alerts: page
                .alerts
                .iter()
                .map(|a| AlertView::new(a, &page.silences))
                .collect(),
            total: page.total,
            limit: filter.limit,
            offset: filter.offset,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventView {
    pub at_unix_ms: i64,
    pub kind: String,
    pub state: &'static str,
    pub severity: &'static str,
    pub actor: String,
    pub message: String,
}

impl From<&AlertEvent> for EventView {
    fn from(e: &AlertEvent) -> Self {
        Self {
            at_unix_ms: e.at_ms,
            kind: e.kind.clone(),
            state: e.state.as_str(),
            severity: severity_str(e.severity),
            actor: e.actor.clone(),
            message: e.message.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AuditView {
    pub id: i64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub alert_id: Option<i64>,
    pub silence_id: Option<i64>,
    pub note: String,
}

impl From<&AuditEntry> for AuditView {
    fn from(a: &AuditEntry) -> Self {
        Self {
            id: a.id,
            at_unix_ms: a.at_ms,
            actor: a.actor.clone(),
            action: a.action.clone(),
            alert_id: a.alert_id,
            silence_id: a.silence_id,
            note: a.note.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NotificationView {
    pub id: i64,
    pub channel: String,
    pub kind: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_unix_ms: i64,
    pub created_unix_ms: i64,
    pub delivered_at_unix_ms: Option<i64>,
    pub last_error: Option<String>,
    pub payload: serde_json::Value,
}

impl From<&Notification> for NotificationView {
    fn from(n: &Notification) -> Self {
        Self {
            id: n.id,
            channel: n.channel.clone(),
            kind: n.kind.clone(),
            state: n.state.clone(),
            attempts: n.attempts,
            next_attempt_unix_ms: n.next_attempt_ms,
            created_unix_ms: n.created_ms,
            delivered_at_unix_ms: n.delivered_at_ms,
            last_error: n.last_error.clone(),
            payload: n.payload.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AlertDetailView {
    pub alert: AlertView,
    pub events: Vec<EventView>,
    pub audit: Vec<AuditView>,
    pub notifications: Vec<NotificationView>,
}

impl AlertDetailView {
    pub fn new(detail: &Detail, silences: &[Silence]) -> Self {
        Self {
            alert: AlertView::new(&detail.alert, silences),
            events: detail.events.iter().map(EventView::from).collect(),
            audit: detail.audit.iter().map(AuditView::from).collect(),
            notifications: detail
                .notifications
                .iter()
                .map(NotificationView::from)
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SilenceView {
    pub id: i64,
    pub matchers: Labels,
    pub starts_at_unix_ms: i64,
    pub ends_at_unix_ms: i64,
    pub active: bool,
    pub created_by: String,
    pub comment: String,
}

impl SilenceView {
    pub fn new(silence: &Silence, now_ms: i64) -> Self {
        Self {
            id: silence.id,
            matchers: silence.matchers.clone(),
            starts_at_unix_ms: silence.starts_ms,
            ends_at_unix_ms: silence.ends_ms,
            active: silence.is_active(now_ms),
            created_by: silence.created_by.clone(),
            comment: silence.comment.clone(),
        }
    }
}

/// What the health endpoint lists per active alert.
#[derive(Debug, Serialize)]
pub struct ActiveAlertView {
    pub id: i64,
    pub rule: String,
    pub labels: Labels,
    pub severity: &'static str,
    pub state: &'static str,
    pub message: String,
    pub count: i64,
    pub since_unix_ms: i64,
}

impl From<&Alert> for ActiveAlertView {
    fn from(a: &Alert) -> Self {
        Self {
            id: a.id,
            rule: a.rule.clone(),
            labels: a.labels.clone(),
            severity: severity_str(a.severity),
            state: a.state.as_str(),
            message: a.message.clone(),
            count: a.count,
            since_unix_ms: a.first_seen_ms,
        }
    }
}
