//! Slack: a message posted to an incoming webhook (`notifications.slack_webhook_url`). The
//! `text` is the notification's one line (what Slack shows in a push notification); blocks
//! give severity, rule, labels, the message and the group's active alerts; the attachment's
//! colour follows the severity, green once resolved.

use serde_json::{json, Value};

use super::{
    judge,
    payload::{rfc3339, Kind, Payload},
    request_failure, Failure,
};
use crate::config::Secret;

/// Slack's limit on a header block's text.
const MAX_HEADER: usize = 150;
/// Under Slack's limit on a section's text (3000).
const MAX_TEXT: usize = 2800;
/// Group members listed by name; the rest are counted.
const MAX_MEMBERS: usize = 20;

/// Slack's mrkdwn escapes exactly these three.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn color(payload: &Payload, kind: Kind) -> &'static str {
    match (kind, payload.alert.severity.as_str()) {
        (Kind::Resolve, _) => "#2eb67d",
        (Kind::Acknowledge, _) => "#9e9e9e",
        (_, "critical") => "#e01e5a",
        (_, "warning") => "#ecb22e",
        _ => "#36c5f0",
    }
}

/// The webhook's JSON body.
pub(crate) fn message(payload: &Payload, kind: Kind) -> Value {
    let alert = &payload.alert;
    let headline = payload.headline(kind);
    let mut text = format!("[selfheal] {headline}");
    if let Some(action) = payload.action_text(kind) {
        text = format!("{text}: {action}");
    } else if !alert.message.is_empty() {
        text = format!("{text}: {}", alert.message);
    }
    let mut blocks = vec![
        json!({
            "type": "header",
            "text": {"type": "plain_text", "text": super::cut(&headline, MAX_HEADER - 1)},
        }),
        json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": escape(&super::cut(if alert.message.is_empty() { "(no message)" } else { &alert.message }, MAX_TEXT))},
        }),
    ];
    if let Some(action) = payload.action_text(kind) {
        blocks.push(json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": format!("*{}*", escape(&action))},
        }));
    }
    // The details go in an attachment, whose bar shows the severity's colour.
    let mut details = vec![json!({
        "type": "section",
        "fields": [
            {"type": "mrkdwn", "text": format!("*Severity*\n{}", escape(&alert.severity))},
            {"type": "mrkdwn", "text": format!("*Rule*\n{}", escape(&alert.rule))},
            {"type": "mrkdwn", "text": format!("*Labels*\n{}", escape(&payload.labels_text()))},
            {"type": "mrkdwn", "text": format!("*Count*\n{}", alert.count)},
        ],
    })];
    let members = payload.group_lines();
    if !members.is_empty() {
        let mut lines: Vec<String> = members
            .iter()
            .take(MAX_MEMBERS)
            .map(|m| format!("• {}", escape(m)))
            .collect();
        if members.len() > MAX_MEMBERS {
            lines.push(format!("… and {} more", members.len() - MAX_MEMBERS));
        }
        details.push(json!({
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": format!("*Group {}* ({} active)\n{}", escape(&alert.group_key), members.len(), lines.join("\n")),
            },
        }));
    }
    details.push(json!({
        "type": "context",
        "elements": [{
            "type": "mrkdwn",
            "text": format!(
                "alert #{} · first seen {} · last seen {} · selfheal",
                alert.id,
                rfc3339(alert.first_seen_unix_ms),
                rfc3339(alert.last_seen_unix_ms)
            ),
        }],
    }));
    json!({
        "text": text,
        "blocks": blocks,
        "attachments": [{
            "color": color(payload, kind),
            "fallback": text,
            "blocks": details,
        }],
    })
}

pub(crate) async fn send(
    http: &reqwest::Client,
    url: &Secret,
    payload: &Payload,
    kind: Kind,
) -> Result<(), Failure> {
    let response = http
        .post(url.expose())
        .json(&message(payload, kind))
        .send()
        .await
        .map_err(request_failure)?;
    judge(response).await
}
