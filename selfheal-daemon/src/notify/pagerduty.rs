//! PagerDuty: Events API v2 (`POST {notifications.pagerduty_url}`). Every event of an alert
//! key carries the same `dedup_key` (`selfheal:<alert key>`), so the trigger, acknowledge and
//! resolve of one alert act on one incident, and an event sent twice (after a restart cut a
//! delivery short) changes nothing. PagerDuty answers 202; a 4xx other than 429 (a bad
//! routing key, an invalid event) will not succeed later and fails the row at once.

use serde_json::{json, Value};

use super::{
    judge,
    payload::{rfc3339, Kind, Payload},
    request_failure, Failure,
};
use crate::config::Secret;

/// PagerDuty's limit on `dedup_key`.
const MAX_DEDUP_KEY: usize = 255;
/// PagerDuty's limit on `summary`.
const MAX_SUMMARY: usize = 1024;

pub(crate) struct PagerDuty {
    pub(crate) url: String,
    pub(crate) routing_key: Secret,
    /// This machine's name: the event's `source`.
    pub(crate) source: String,
}

/// `selfheal:<alert key>`; a key too long for PagerDuty is cut and made unique again with
/// its CRC-32.
pub(crate) fn dedup_key(alert_key: &str) -> String {
    let key = format!("selfheal:{alert_key}");
    if key.len() <= MAX_DEDUP_KEY {
        return key;
    }
    let crc = format!(":{:08x}", crc32fast::hash(alert_key.as_bytes()));
    let mut end = MAX_DEDUP_KEY - crc.len();
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{crc}", &key[..end])
}

/// PagerDuty's severities are critical, error, warning and info; ours map one to one.
fn severity(ours: &str) -> &'static str {
    match ours {
        "critical" => "critical",
        "warning" => "warning",
        _ => "info",
    }
}

impl PagerDuty {
    /// The event's JSON body.
    pub(crate) fn event(&self, payload: &Payload, kind: Kind) -> Value {
        let alert = &payload.alert;
        let action = match kind {
            Kind::Trigger => "trigger",
            Kind::Acknowledge => "acknowledge",
            Kind::Resolve => "resolve",
        };
        let mut event = json!({
            "routing_key": self.routing_key.expose(),
            "event_action": action,
            "dedup_key": dedup_key(&alert.key),
        });
        if kind == Kind::Trigger {
            let summary = if alert.message.is_empty() {
                payload.headline(kind)
            } else {
                format!("{}: {}", payload.headline(kind), alert.message)
            };
            let component = alert.labels.get("platform").cloned().unwrap_or_else(|| {
                alert
                    .rule
                    .split('.')
                    .next()
                    .unwrap_or(&alert.rule)
                    .to_owned()
            });
            event["payload"] = json!({
                "summary": super::cut(&summary, MAX_SUMMARY - 1),
                "source": self.source,
                "severity": severity(&alert.severity),
                "timestamp": rfc3339(alert.last_seen_unix_ms),
                "component": component,
                "group": alert.group_key,
                "class": alert.rule,
                "custom_details": {
                    "alert_id": alert.id,
                    "key": alert.key,
                    "message": alert.message,
                    "labels": alert.labels,
                    "count": alert.count,
                    "first_seen": rfc3339(alert.first_seen_unix_ms),
                    "last_seen": rfc3339(alert.last_seen_unix_ms),
                    "group": payload.group_lines(),
                },
            });
            event["client"] = json!("selfheal");
        }
        event
    }

    pub(crate) async fn send(
        &self,
        http: &reqwest::Client,
        payload: &Payload,
        kind: Kind,
    ) -> Result<(), Failure> {
        let response = http
            .post(&self.url)
            .json(&self.event(payload, kind))
            .send()
            .await
            .map_err(request_failure)?;
        judge(response).await
    }
}
