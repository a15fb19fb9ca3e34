//! The alert manager's queries: synchronous functions over a `rusqlite::Connection`, run on
//! the state DB's thread. Each change is one transaction: the alert row, its history row, the
//! audit row and the notifications it causes commit together or not at all. Time comes in as
//! `now` (Unix milliseconds), so tests drive the clock.

use rusqlite::{params, types::Value, Connection, OptionalExtension as _, Row, Transaction};

use super::{
    alert_key, group_key, parse_severity, severity_str, transition, Action, Alert, AlertError,
    AlertEvent, AlertState, AuditEntry, Detail, Filter, Labels, Notification, Notified, Outcome,
    Page, Settings, Signal, Silence, StateFilter,
};
use crate::bus::Severity;

const ALERT_COLUMNS: &str = "id, key, rule, labels, platform, group_key, group_id, severity, \
     state, message, count, first_seen_ms, last_seen_ms, acknowledged_at_ms, acknowledged_by, \
     resolved_at_ms, resolved_by, last_notified_ms";

fn conversion(index: usize, what: &str, text: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        rusqlite::types::Type::Text,
        format!("not a valid {what}: {text:?}").into(),
    )
}

fn labels_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Labels> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text).map_err(|_| conversion(index, "label object", &text))
}

fn severity_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Severity> {
    let text: String = row.get(index)?;
    parse_severity(&text).ok_or_else(|| conversion(index, "severity", &text))
}

fn state_at(row: &Row<'_>, index: usize) -> rusqlite::Result<AlertState> {
    let text: String = row.get(index)?;
    AlertState::parse(&text).ok_or_else(|| conversion(index, "alert state", &text))
}

fn alert_from_row(row: &Row<'_>) -> rusqlite::Result<Alert> {
    Ok(Alert {
        id: row.get(0)?,
        key: row.get(1)?,
        rule: row.get(2)?,
        labels: labels_at(row, 3)?,
        platform: row.get(4)?,
        group_key: row.get(5)?,
        group_id: row.get(6)?,
        severity: severity_at(row, 7)?,
        state: state_at(row, 8)?,
        message: row.get(9)?,
        count: row.get(10)?,
        first_seen_ms: row.get(11)?,
        last_seen_ms: row.get(12)?,
        acknowledged_at_ms: row.get(13)?,
        acknowledged_by: row.get(14)?,
        resolved_at_ms: row.get(15)?,
        resolved_by: row.get(16)?,
        last_notified_ms: row.get(17)?,
    })
}

fn silence_from_row(row: &Row<'_>) -> rusqlite::Result<Silence> {
    Ok(Silence {
        id: row.get(0)?,
        matchers: labels_at(row, 1)?,
        starts_ms: row.get(2)?,
        ends_ms: row.get(3)?,
        created_by: row.get(4)?,
        comment: row.get(5)?,
    })
}

const SILENCE_COLUMNS: &str = "id, matchers, starts_ms, ends_ms, created_by, comment";

fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

/// The alert `id`, in any state.
pub fn alert(c: &Connection, id: i64) -> rusqlite::Result<Option<Alert>> {
    c.query_row(
        &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"),
        params![id],
        alert_from_row,
    )
    .optional()
}

fn active_by_key(c: &Connection, key: &str) -> rusqlite::Result<Option<Alert>> {
    c.query_row(
        &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE key = ?1 AND state != 'resolved'"),
        params![key],
        alert_from_row,
    )
    .optional()
}

/// Firing and acknowledged alerts, newest first.
pub fn active(c: &Connection) -> rusqlite::Result<Vec<Alert>> {
    let mut statement = c.prepare_cached(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE state != 'resolved' ORDER BY id DESC"
    ))?;
    let rows = statement.query_map([], alert_from_row)?;
    rows.collect()
}

/// How many alerts the database keeps: every one, and the resolved ones by how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub total: i64,
    pub resolved: i64,
    /// Resolved by their rule, when the condition cleared.
    pub auto_resolved: i64,
}

pub fn counts(c: &Connection) -> rusqlite::Result<Counts> {
    c.query_row(
        "SELECT count(*), count(*) FILTER (WHERE state = 'resolved'), \
         count(*) FILTER (WHERE state = 'resolved' AND resolved_by = 'rule') FROM alerts",
        [],
        |row| {
            Ok(Counts {
                total: row.get(0)?,
                resolved: row.get(1)?,
                auto_resolved: row.get(2)?,
            })
        },
    )
}

fn active_silence_for(
    tx: &Connection,
    now: i64,
    rule: &str,
    labels: &Labels,
) -> rusqlite::Result<Option<i64>> {
    Ok(silences(tx, now, false)?
        .into_iter()
        .find(|s| s.matches(rule, labels))
        .map(|s| s.id))
}

/// When the key last had a trigger notification, over all its alerts.
fn last_notified_for_key(tx: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    tx.query_row(
        "SELECT MAX(last_notified_ms) FROM alerts WHERE key = ?1",
        params![key],
        |row| row.get(0),
    )
}

fn throttled(settings: &Settings, last: Option<i64>, now: i64) -> bool {
    last.is_some_and(|at| now.saturating_sub(at) < settings.notify_interval_ms)
}

fn add_event(
    tx: &Transaction<'_>,
    alert: &Alert,
    now: i64,
    kind: &str,
    actor: &str,
    message: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO alert_events (alert_id, at_ms, kind, state, severity, actor, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            alert.id,
            now,
            kind,
            alert.state.as_str(),
            severity_str(alert.severity),
            actor,
            message
        ],
    )?;
    Ok(())
}

fn add_audit(
    tx: &Transaction<'_>,
    now: i64,
    actor: &str,
    action: &str,
    alert_id: Option<i64>,
    silence_id: Option<i64>,
    note: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, alert_id, silence_id, note) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now, actor, action, alert_id, silence_id, note],
    )?;
    Ok(())
}

/// Writes one notification of `kind` per channel; how many.
fn enqueue(
    tx: &Transaction<'_>,
    now: i64,
    settings: &Settings,
    alert: &Alert,
    kind: &str,
    actor: &str,
    note: &str,
) -> rusqlite::Result<usize> {
    let group: Vec<serde_json::Value> = {
        let mut statement = tx.prepare_cached(
            "SELECT id, rule, severity, state FROM alerts \
             WHERE group_id = ?1 AND state != 'resolved' ORDER BY id",
        )?;
        let rows = statement.query_map(params![alert.group_id], |row| {
            Ok(serde_json::json!({
                "id": row.get::<_, i64>(0)?,
                "rule": row.get::<_, String>(1)?,
                "severity": row.get::<_, String>(2)?,
                "state": row.get::<_, String>(3)?,
            }))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let payload = serde_json::json!({
        "kind": kind,
        "alert": {
            "id": alert.id,
            "key": alert.key,
            "rule": alert.rule,
            "labels": alert.labels,
            "severity": severity_str(alert.severity),
            "state": alert.state.as_str(),
            "message": alert.message,
            "count": alert.count,
            "first_seen_unix_ms": alert.first_seen_ms,
            "last_seen_unix_ms": alert.last_seen_ms,
            "group_key": alert.group_key,
            "group_id": alert.group_id,
        },
        "group": group,
        "actor": actor,
        "note": note,
        "at_unix_ms": now,
    })
    .to_string();
    for channel in &settings.channels {
        tx.execute(
            "INSERT INTO outbox (alert_id, channel, kind, payload, state, attempts, \
             next_attempt_ms, created_ms) VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5)",
            params![alert.id, channel, kind, payload, now],
        )?;
    }
    Ok(settings.channels.len())
}

/// Enqueues a trigger for `alert` if nothing holds it back; marks the key notified.
fn trigger(
    tx: &Transaction<'_>,
    now: i64,
    settings: &Settings,
    alert: &mut Alert,
) -> rusqlite::Result<Notified> {
    if let Some(silence) = active_silence_for(tx, now, &alert.rule, &alert.labels)? {
        return Ok(Notified::Silenced(silence));
    }
    if throttled(settings, last_notified_for_key(tx, &alert.key)?, now) {
        return Ok(Notified::Throttled);
    }
    if settings.channels.is_empty() {
        return Ok(Notified::NoChannel);
    }
    let n = enqueue(tx, now, settings, alert, "trigger", "rule", "")?;
    tx.execute(
        "UPDATE alerts SET last_notified_ms = ?2 WHERE id = ?1",
        params![alert.id, now],
    )?;
    alert.last_notified_ms = Some(now);
    Ok(Notified::Enqueued(n))
}

/// Applies a rule's signal: creates, bumps or auto-resolves the key's alert.
pub fn apply(
    c: &mut Connection,
    now: i64,
    settings: &Settings,
    signal: &Signal,
) -> rusqlite::Result<Outcome> {
    let key = alert_key(&signal.rule, &signal.labels);
    let tx = c.transaction()?;
    let existing = active_by_key(&tx, &key)?;
    let outcome = match (signal.firing, existing) {
        (true, None) => create(&tx, now, settings, signal, key)?,
        (true, Some(alert)) => repeat(&tx, now, settings, signal, alert)?,
        (false, Some(alert)) => {
            let (alert, notified) = close(&tx, now, settings, alert, "rule", &signal.message)?;
            Outcome::Resolved { alert, notified }
        }
        (false, None) => Outcome::NothingActive,
    };
    tx.commit()?;
    Ok(outcome)
}

fn create(
    tx: &Transaction<'_>,
    now: i64,
    settings: &Settings,
    signal: &Signal,
    key: String,
) -> rusqlite::Result<Outcome> {
    let group_key = group_key(&signal.rule, &signal.labels);
    let joined: Option<i64> = tx
        .query_row(
            "SELECT group_id FROM alerts WHERE group_key = ?1 AND state != 'resolved' \
             AND first_seen_ms >= ?2 ORDER BY id LIMIT 1",
            params![group_key, now.saturating_sub(settings.group_window_ms)],
            |row| row.get(0),
        )
        .optional()?;
    let platform = signal.labels.get("platform").cloned();
    tx.execute(
        "INSERT INTO alerts (key, rule, labels, platform, group_key, group_id, severity, state, \
         message, count, first_seen_ms, last_seen_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, 'firing', ?7, 1, ?8, ?8)",
        params![
            key,
            signal.rule,
            labels_json(&signal.labels),
            platform,
            group_key,
            severity_str(signal.severity),
            signal.message,
            now
        ],
    )?;
    let id = tx.last_insert_rowid();
    let group_id = joined.unwrap_or(id);
    tx.execute(
        "UPDATE alerts SET group_id = ?2 WHERE id = ?1",
        params![id, group_id],
    )?;
    let mut alert = Alert {
        id,
        key,
        rule: signal.rule.clone(),
        labels: signal.labels.clone(),
        platform,
        group_key,
        group_id,
        severity: signal.severity,
        state: AlertState::Firing,
        message: signal.message.clone(),
        count: 1,
        first_seen_ms: now,
        last_seen_ms: now,
        acknowledged_at_ms: None,
        acknowledged_by: None,
        resolved_at_ms: None,
        resolved_by: None,
        last_notified_ms: None,
    };
    add_event(tx, &alert, now, "fired", "rule", &signal.message)?;
    let notified = trigger(tx, now, settings, &mut alert)?;
    Ok(Outcome::Created { alert, notified })
}

fn repeat(
    tx: &Transaction<'_>,
    now: i64,
    settings: &Settings,
    signal: &Signal,
    mut alert: Alert,
) -> rusqlite::Result<Outcome> {
    alert.count += 1;
    alert.last_seen_ms = now;
    alert.message.clone_from(&signal.message);
    let escalated = alert.severity != signal.severity;
    alert.severity = signal.severity;
    tx.execute(
        "UPDATE alerts SET count = ?2, last_seen_ms = ?3, message = ?4, severity = ?5 WHERE id = ?1",
        params![
            alert.id,
            alert.count,
            now,
            alert.message,
            severity_str(alert.severity)
        ],
    )?;
    if escalated {
        add_event(tx, &alert, now, "severity_changed", "rule", &signal.message)?;
    }
    let notified = if alert.state == AlertState::Acknowledged {
        Notified::NotNeeded
    } else {
        trigger(tx, now, settings, &mut alert)?
    };
    Ok(Outcome::Repeated {
        alert,
        notified,
        escalated,
    })
}

/// Resolves an active alert; a `resolve` notification follows one that was notified.
fn close(
    tx: &Transaction<'_>,
    now: i64,
    settings: &Settings,
    mut alert: Alert,
    actor: &str,
    message: &str,
) -> rusqlite::Result<(Alert, Notified)> {
    alert.state = AlertState::Resolved;
    alert.resolved_at_ms = Some(now);
    alert.resolved_by = Some(actor.to_owned());
    tx.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at_ms = ?2, resolved_by = ?3 WHERE id = ?1",
        params![alert.id, now, actor],
    )?;
    add_event(tx, &alert, now, "resolved", actor, message)?;
    let notified = follow_up(tx, now, settings, &alert, "resolve", actor, message)?;
    Ok((alert, notified))
}

/// An `acknowledge` or `resolve` notification, for an alert whose trigger went out.
fn follow_up(
    tx: &Transaction<'_>,
    now: i64,
    settings: &Settings,
    alert: &Alert,
    kind: &str,
    actor: &str,
    note: &str,
) -> rusqlite::Result<Notified> {
    if alert.last_notified_ms.is_none() {
        return Ok(Notified::NotNeeded);
    }
    if settings.channels.is_empty() {
        return Ok(Notified::NoChannel);
    }
    Ok(Notified::Enqueued(enqueue(
        tx, now, settings, alert, kind, actor, note,
    )?))
}

/// An operator's acknowledgement or resolution of alert `id`, with an audit row.
pub fn change(
    c: &mut Connection,
    now: i64,
    settings: &Settings,
    id: i64,
    action: Action,
    actor: &str,
    note: &str,
) -> Result<(Alert, Notified), AlertError> {
    let tx = c.transaction()?;
    let mut alert = alert(&tx, id)?.ok_or(AlertError::NotFound { id })?;
    let Some(next) = transition(alert.state, action) else {
        return Err(AlertError::NotAllowed {
            id,
            state: alert.state,
            action,
        });
    };
    let message = if note.is_empty() {
        action.as_str()
    } else {
        note
    };
    let (alert, notified) = match next {
        AlertState::Acknowledged => {
            alert.state = next;
            alert.acknowledged_at_ms = Some(now);
            alert.acknowledged_by = Some(actor.to_owned());
            tx.execute(
                "UPDATE alerts SET state = 'acknowledged', acknowledged_at_ms = ?2, \
                 acknowledged_by = ?3 WHERE id = ?1",
                params![id, now, actor],
            )?;
            add_event(&tx, &alert, now, "acknowledged", actor, message)?;
            let notified = follow_up(&tx, now, settings, &alert, "acknowledge", actor, note)?;
            (alert, notified)
        }
        AlertState::Resolved => close(&tx, now, settings, alert, actor, message)?,
        AlertState::Firing => unreachable!("no action leads back to firing"),
    };
    add_audit(&tx, now, actor, action.as_str(), Some(id), None, note)?;
    tx.commit()?;
    Ok((alert, notified))
}

/// A page of alerts, newest first, and the active silences.
pub fn list(c: &Connection, now: i64, filter: &Filter) -> rusqlite::Result<Page> {
    let mut conditions: Vec<&str> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    match filter.state {
        StateFilter::All => {}
        StateFilter::Active => conditions.push("state != 'resolved'"),
        StateFilter::Only(state) => {
            values.push(Value::Text(state.as_str().to_owned()));
            conditions.push("state = ?");
        }
    }
    if let Some(severity) = filter.severity {
        values.push(Value::Text(severity_str(severity).to_owned()));
        conditions.push("severity = ?");
    }
    if let Some(platform) = &filter.platform {
        values.push(Value::Text(platform.clone()));
        conditions.push("platform = ?");
    }
    let clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let total: i64 = c.query_row(
        &format!("SELECT COUNT(*) FROM alerts {clause}"),
        rusqlite::params_from_iter(values.iter()),
        |row| row.get(0),
    )?;
    let mut paged = values.clone();
    paged.push(Value::Integer(i64::from(filter.limit)));
    paged.push(Value::Integer(i64::from(filter.offset)));
    let mut statement = c.prepare(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts {clause} ORDER BY id DESC LIMIT ? OFFSET ?"
    ))?;
    let alerts = statement
        .query_map(rusqlite::params_from_iter(paged.iter()), alert_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Page {
        alerts,
        total: u64::try_from(total).unwrap_or(0),
        silences: silences(c, now, false)?,
    })
}

/// Alert `id` with its events, audit rows and notifications, each oldest first.
pub fn detail(c: &Connection, id: i64) -> rusqlite::Result<Option<Detail>> {
    let Some(alert) = alert(c, id)? else {
        return Ok(None);
    };
    let events = c
        .prepare_cached(
            "SELECT at_ms, kind, state, severity, actor, message FROM alert_events \
             WHERE alert_id = ?1 ORDER BY id",
        )?
        .query_map(params![id], |row| {
            Ok(AlertEvent {
                at_ms: row.get(0)?,
                kind: row.get(1)?,
                state: state_at(row, 2)?,
                severity: severity_at(row, 3)?,
                actor: row.get(4)?,
                message: row.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let audit = c
        .prepare_cached(
            "SELECT id, at_ms, actor, action, alert_id, silence_id, note FROM audit \
             WHERE alert_id = ?1 ORDER BY id",
        )?
        .query_map(params![id], audit_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let notifications = c
        .prepare_cached(
            "SELECT id, alert_id, channel, kind, payload, state, attempts, next_attempt_ms, \
             created_ms, delivered_at_ms, last_error FROM outbox WHERE alert_id = ?1 ORDER BY id",
        )?
        .query_map(params![id], |row| {
            let payload: String = row.get(4)?;
            Ok(Notification {
                id: row.get(0)?,
                alert_id: row.get(1)?,
                channel: row.get(2)?,
                kind: row.get(3)?,
                payload: serde_json::from_str(&payload)
                    .map_err(|_| conversion(4, "JSON payload", &payload))?,
                state: row.get(5)?,
                attempts: row.get(6)?,
                next_attempt_ms: row.get(7)?,
                created_ms: row.get(8)?,
                delivered_at_ms: row.get(9)?,
                last_error: row.get(10)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(Detail {
        alert,
        events,
        audit,
        notifications,
    }))
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        id: row.get(0)?,
        at_ms: row.get(1)?,
        actor: row.get(2)?,
        action: row.get(3)?,
        alert_id: row.get(4)?,
        silence_id: row.get(5)?,
        note: row.get(6)?,
    })
}

/// Every audit row, oldest first (for tests and, later, an audit view).
pub fn audit(c: &Connection) -> rusqlite::Result<Vec<AuditEntry>> {
    c.prepare_cached(
        "SELECT id, at_ms, actor, action, alert_id, silence_id, note FROM audit ORDER BY id",
    )?
    .query_map([], audit_from_row)?
    .collect()
}

/// Creates a silence from now until `ends_ms`, with an audit row.
pub fn create_silence(
    c: &mut Connection,
    now: i64,
    matchers: &Labels,
    ends_ms: i64,
    actor: &str,
    comment: &str,
) -> rusqlite::Result<Silence> {
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO silences (matchers, starts_ms, ends_ms, created_by, comment) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![labels_json(matchers), now, ends_ms, actor, comment],
    )?;
    let id = tx.last_insert_rowid();
    add_audit(&tx, now, actor, "silence", None, Some(id), comment)?;
    tx.commit()?;
    Ok(Silence {
        id,
        matchers: matchers.clone(),
        starts_ms: now,
        ends_ms,
        created_by: actor.to_owned(),
        comment: comment.to_owned(),
    })
}

/// Ends silence `id` now, with an audit row.
pub fn expire_silence(
    c: &mut Connection,
    now: i64,
    id: i64,
    actor: &str,
) -> Result<Silence, AlertError> {
    let tx = c.transaction()?;
    let mut silence = tx
        .query_row(
            &format!("SELECT {SILENCE_COLUMNS} FROM silences WHERE id = ?1"),
            params![id],
            silence_from_row,
        )
        .optional()?
        .ok_or(AlertError::SilenceNotFound { id })?;
    if silence.ends_ms <= now {
        return Err(AlertError::SilenceEnded { id });
    }
    silence.ends_ms = now;
    tx.execute(
        "UPDATE silences SET ends_ms = ?2 WHERE id = ?1",
        params![id, now],
    )?;
    add_audit(&tx, now, actor, "expire_silence", None, Some(id), "")?;
    tx.commit()?;
    Ok(silence)
}

/// Silences in force at `now`, or all of them with `all`; newest first.
pub fn silences(c: &Connection, now: i64, all: bool) -> rusqlite::Result<Vec<Silence>> {
    let sql = if all {
        format!("SELECT {SILENCE_COLUMNS} FROM silences ORDER BY id DESC")
    } else {
        format!(
            "SELECT {SILENCE_COLUMNS} FROM silences WHERE starts_ms <= ?1 AND ends_ms > ?1 \
             ORDER BY id DESC"
        )
    };
    let mut statement = c.prepare_cached(&sql)?;
    let rows = if all {
        statement.query_map([], silence_from_row)?
    } else {
        statement.query_map(params![now], silence_from_row)?
    };
    rows.collect()
}
