//! Retention: once a day (and once at start), rows older than `state.retention_days` are
//! deleted, in one transaction, and what went is logged with a count per table and added to
//! `selfheal_state_retention_deleted_rows_total{table}`.
//!
//! What "older" means, per table: a resolved alert whose resolution is older (with its events
//! and notifications; an active alert is kept whatever its age, with its history); an audit
//! row by its time; a notification that is no longer pending by its creation; a silence by its
//! end; a health log row by its time; a repair or a diagnosis by its time (learned patterns are
//! kept). A later slice that adds a table adds its rule here.

use std::time::Duration;

use rusqlite::{params, Connection};
use tokio_util::sync::CancellationToken;

use super::StateDb;
use crate::telemetry::TableLabel;

/// How often the cleanup runs.
pub const EVERY: Duration = Duration::from_hours(24);

const DAY_MS: i64 = 86_400_000;

/// Rows deleted by one cleanup, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub alerts: u64,
    pub alert_events: u64,
    pub audit: u64,
    pub outbox: u64,
    pub silences: u64,
    pub health_log: u64,
    pub repairs: u64,
    pub diagnoses: u64,
}

impl Deleted {
    /// Each table with its count, for the log and the counter.
    pub fn by_table(&self) -> [(&'static str, u64); 8] {
        [
            ("alerts", self.alerts),
            ("alert_events", self.alert_events),
            ("audit", self.audit),
            ("outbox", self.outbox),
            ("silences", self.silences),
            ("health_log", self.health_log),
            ("repairs", self.repairs),
            ("diagnoses", self.diagnoses),
        ]
    }

    pub fn total(&self) -> u64 {
        self.by_table().iter().map(|(_, n)| n).sum()
    }
}

/// Deletes what is older than `retention_days` before `now_ms`.
pub fn cleanup(
    connection: &mut Connection,
    now_ms: i64,
    retention_days: u32,
) -> rusqlite::Result<Deleted> {
    let cutoff = now_ms.saturating_sub(i64::from(retention_days) * DAY_MS);
    let tx = connection.transaction()?;
    let doomed = "SELECT id FROM alerts WHERE state = 'resolved' AND resolved_at_ms < ?1";
    let count = |n: usize| n as u64;
    let outbox = tx.execute(
        &format!(
            "DELETE FROM outbox WHERE alert_id IN ({doomed}) \
             OR (created_ms < ?1 AND state != 'pending')"
        ),
        params![cutoff],
    )?;
    let alert_events = tx.execute(
        &format!("DELETE FROM alert_events WHERE alert_id IN ({doomed})"),
        params![cutoff],
    )?;
    let alerts = tx.execute(
        "DELETE FROM alerts WHERE state = 'resolved' AND resolved_at_ms < ?1",
        params![cutoff],
    )?;
    let audit = tx.execute("DELETE FROM audit WHERE at_ms < ?1", params![cutoff])?;
    let silences = tx.execute("DELETE FROM silences WHERE ends_ms < ?1", params![cutoff])?;
    let health_log = tx.execute("DELETE FROM health_log WHERE at_ms < ?1", params![cutoff])?;
    let repairs = tx.execute("DELETE FROM repairs WHERE at_ms < ?1", params![cutoff])?;
    let diagnoses = tx.execute("DELETE FROM diagnoses WHERE at_ms < ?1", params![cutoff])?;
    tx.commit()?;
    Ok(Deleted {
        alerts: count(alerts),
        alert_events: count(alert_events),
        audit: count(audit),
        outbox: count(outbox),
        silences: count(silences),
        health_log: count(health_log),
        repairs: count(repairs),
        diagnoses: count(diagnoses),
    })
}

/// Runs the cleanup at start and then every [`EVERY`] until `cancel`.
pub async fn run(db: StateDb, retention_days: u32, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = super::now_ms();
        let result = db
            .call("retention", move |c| cleanup(c, now, retention_days))
            .await;
        match result {
            Ok(deleted) => {
                let metrics = db.metrics();
                metrics.state_retention_runs.inc();
                for (table, rows) in deleted.by_table() {
                    metrics
                        .state_retention_deleted
                        .get_or_create(&TableLabel { table })
                        .inc_by(rows);
                }
                tracing::info!(
                    retention_days,
                    alerts = deleted.alerts,
                    alert_events = deleted.alert_events,
                    audit = deleted.audit,
                    outbox = deleted.outbox,
                    silences = deleted.silences,
                    health_log = deleted.health_log,
                    repairs = deleted.repairs,
                    diagnoses = deleted.diagnoses,
                    "state retention cleanup done"
                );
            }
            Err(error) => tracing::warn!(
                error = %crate::app::error_chain(&error),
                "state retention cleanup failed; it is tried again tomorrow"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        alerts::{store, Action, Settings, Signal},
        bus::Severity,
        state::{open_connection, DbOptions, DB_FILE},
    };

    const T0: i64 = 1_800_000_000_000;

    fn signal(rule: &str, firing: bool) -> Signal {
        Signal {
            rule: rule.to_owned(),
            labels: std::collections::BTreeMap::new(),
            severity: Severity::Warning,
            message: String::new(),
            firing,
        }
    }

    fn count(c: &Connection, table: &str) -> i64 {
        c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn cleanup_deletes_what_is_older_than_the_retention_and_keeps_the_active() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut c, _) = open_connection(&DbOptions {
            path: dir.path().join(DB_FILE),
            busy_timeout: Duration::from_secs(1),
        })
        .expect("open");
        let s = Settings {
            notify_interval_ms: 0,
            group_window_ms: 0,
            channels: vec!["slack"],
        };
        // 100 days ago: one alert fired, acknowledged and resolved (3 events, 3
        // notifications, 2 audit rows).
        let old = T0 - 100 * DAY_MS;
        store::apply(&mut c, old, &s, &signal("old.one", true)).expect("fire");
        store::change(&mut c, old + 1, &s, 1, Action::Acknowledge, "ana", "").expect("ack");
        store::change(&mut c, old + 2, &s, 1, Action::Resolve, "ana", "").expect("resolve");
        // 100 days ago too, but still firing: kept with its history.
        store::apply(&mut c, old, &s, &signal("old.active", true)).expect("fire");
        // Resolved 10 days ago: kept.
        store::apply(&mut c, T0 - 10 * DAY_MS, &s, &signal("recent", true)).expect("fire");
        store::apply(&mut c, T0 - 10 * DAY_MS, &s, &signal("recent", false)).expect("clear");
        store::create_silence(
            &mut c,
            old,
            &[("rule".to_owned(), "x".to_owned())].into(),
            old + 1,
            "ana",
            "",
        )
        .expect("old silence");
        for at in [old, T0 - 10 * DAY_MS] {
            crate::checks::log::record(
                &c,
                "crm",
                at,
                crate::bus::CheckStatus::Healthy,
                Some(3.0),
                None,
            )
            .expect("health log");
        }
        for at in [old, T0 - 10 * DAY_MS] {
            c.execute(
                "INSERT INTO repairs (at_ms, target, signature, rule, labels, summary, action, \
                 decision, state) VALUES (?1, 't', 'target.crashed', 'target.exited', '{}', '', \
                 'restart', '{}', 'skipped')",
                params![at],
            )
            .expect("repair");
        }
        let before = [
            count(&c, "alerts"),
            count(&c, "alert_events"),
            count(&c, "audit"),
            count(&c, "outbox"),
            count(&c, "silences"),
            count(&c, "health_log"),
            count(&c, "repairs"),
        ];
        assert_eq!(before, [3, 6, 3, 6, 1, 2, 2]);

        let deleted = cleanup(&mut c, T0, 90).expect("cleanup");
        assert_eq!(
            deleted,
            Deleted {
                alerts: 1,
                alert_events: 3,
                audit: 3,
                outbox: 3,
                silences: 1,
                health_log: 1,
                repairs: 1,
                diagnoses: 0,
            }
        );
        assert_eq!(deleted.total(), 13);
        let rules: Vec<String> = c
            .prepare("SELECT rule FROM alerts ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rules, ["old.active", "recent"]);
        assert_eq!(count(&c, "alert_events"), 3);
        assert_eq!(count(&c, "outbox"), 3);
        assert_eq!(count(&c, "health_log"), 1);
        // Nothing more to do the next day; a longer retention would have kept everything.
        assert_eq!(cleanup(&mut c, T0 + DAY_MS, 90).expect("again").total(), 0);
    }
}
