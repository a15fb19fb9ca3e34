//! The notification as the alert manager stored it (see `alerts::store::enqueue`), read back
//! for the channels that format their own message, and the wording they share.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Deserialize;

/// The stored payload. Fields the formatters can do without default, so a payload from an
/// older release still formats.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Payload {
    pub(crate) alert: AlertPayload,
    #[serde(default)]
    pub(crate) group: Vec<Member>,
    /// Who acknowledged or resolved (`rule` when the condition cleared).
    #[serde(default)]
    pub(crate) actor: String,
    #[serde(default)]
    pub(crate) note: String,
    #[serde(default)]
    pub(crate) at_unix_ms: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AlertPayload {
    pub(crate) id: i64,
    pub(crate) key: String,
    pub(crate) rule: String,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) severity: String,
    #[serde(default)]
    pub(crate) message: String,
    #[serde(default)]
    pub(crate) count: i64,
    #[serde(default)]
    pub(crate) first_seen_unix_ms: i64,
    #[serde(default)]
    pub(crate) last_seen_unix_ms: i64,
    #[serde(default)]
    pub(crate) group_key: String,
}

/// An active alert of the notified alert's group.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Member {
    pub(crate) id: i64,
    pub(crate) rule: String,
    pub(crate) severity: String,
    pub(crate) state: String,
}

/// What a notification announces (the outbox row's `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Trigger,
    Acknowledge,
    Resolve,
}

impl Kind {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "trigger" => Self::Trigger,
            "acknowledge" => Self::Acknowledge,
            "resolve" => Self::Resolve,
            _ => return None,
        })
    }

    /// How a headline says it: `firing`, `acknowledged`, `resolved`.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Self::Trigger => "firing",
            Self::Acknowledge => "acknowledged",
            Self::Resolve => "resolved",
        }
    }
}

impl Payload {
    /// `CRITICAL target.exited firing` (the alert key, so labels tell alerts of one rule
    /// apart).
    pub(crate) fn headline(&self, kind: Kind) -> String {
        format!(
            "{} {} {}",
            self.alert.severity.to_ascii_uppercase(),
            self.alert.key,
            kind.word()
        )
    }

    /// `platform=tackle.io, check=crm`, or `none`.
    pub(crate) fn labels_text(&self) -> String {
        if self.alert.labels.is_empty() {
            return "none".to_owned();
        }
        self.alert
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Who did it and why, for an acknowledgement or resolution: `by ana: on it`,
    /// `by the rule: memory is back under 85 %`.
    pub(crate) fn action_text(&self, kind: Kind) -> Option<String> {
        if kind == Kind::Trigger {
            return None;
        }
        let by = if self.actor == "rule" || self.actor.is_empty() {
            "the rule (the condition cleared)".to_owned()
        } else {
            self.actor.clone()
        };
        let mut text = format!("{} by {by}", kind.word());
        if !self.note.is_empty() {
            let _ = write!(text, ": {}", self.note);
        }
        Some(text)
    }

    /// One line per active alert of the group: `#12 target.exited (critical, firing)`.
    pub(crate) fn group_lines(&self) -> Vec<String> {
        self.group
            .iter()
            .map(|m| format!("#{} {} ({}, {})", m.id, m.rule, m.severity, m.state))
            .collect()
    }
}

/// `2027-01-15T08:00:00.000Z` for Unix milliseconds (UTC, proleptic Gregorian).
pub(crate) fn rfc3339(unix_ms: i64) -> String {
    let seconds = unix_ms.div_euclid(1000);
    let millis = unix_ms.rem_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}
