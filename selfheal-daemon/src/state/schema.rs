//! The schema of the state DB, as an ordered list of migrations.
//!
//! The version is `PRAGMA user_version`: the number of migrations applied. Each migration runs
//! in one transaction with the version bump, so a crash leaves the file at a version, never
//! between two. A file whose version is above [`VERSION`] was written by a newer release and
//! is refused rather than guessed at.
//!
//! **Adding a table or column** (the health log, repairs, learned patterns, blocked IPs): append
//! a migration; never edit one that has shipped, since files in the field already ran it.
//! Times are integers, milliseconds since the Unix epoch (`*_ms`); labels and payloads are
//! JSON text.

use std::path::Path;

use rusqlite::Connection;

use super::{Opened, StateError};

/// Migration `i` takes the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: alerts, their history, the audit of operators' actions, the notification outbox and
    //    silences.
    r"
    CREATE TABLE alerts (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        -- rule{label=value,...}, labels sorted: what deduplicates.
        key                 TEXT    NOT NULL,
        rule                TEXT    NOT NULL,
        labels              TEXT    NOT NULL,
        platform            TEXT,
        group_key           TEXT    NOT NULL,
        group_id            INTEGER NOT NULL,
        severity            TEXT    NOT NULL CHECK (severity IN ('critical', 'warning', 'info')),
        state               TEXT    NOT NULL CHECK (state IN ('firing', 'acknowledged', 'resolved')),
        message             TEXT    NOT NULL,
        count               INTEGER NOT NULL,
        first_seen_ms       INTEGER NOT NULL,
        last_seen_ms        INTEGER NOT NULL,
        acknowledged_at_ms  INTEGER,
        acknowledged_by     TEXT,
        resolved_at_ms      INTEGER,
        resolved_by         TEXT,
        -- The last trigger notification enqueued for it: what the per-key throttle reads.
        last_notified_ms    INTEGER
    );
    -- At most one alert per key is active (firing or acknowledged).
    CREATE UNIQUE INDEX alerts_active_key ON alerts (key) WHERE state != 'resolved';
    CREATE INDEX alerts_by_state ON alerts (state, severity);
    CREATE INDEX alerts_by_key ON alerts (key, last_notified_ms);
    CREATE INDEX alerts_by_resolved ON alerts (resolved_at_ms);

    -- Every change of an alert: fired, severity_changed, acknowledged, resolved.
    CREATE TABLE alert_events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id  INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
        at_ms     INTEGER NOT NULL,
        kind      TEXT    NOT NULL,
        state     TEXT    NOT NULL,
        severity  TEXT    NOT NULL,
        actor     TEXT    NOT NULL,
        message   TEXT    NOT NULL
    );
    CREATE INDEX alert_events_by_alert ON alert_events (alert_id, id);

    -- What operators did, through the API or the CLI. Rows outlive nothing they refer to:
    -- retention removes them by age, as it removes the alerts.
    CREATE TABLE audit (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms       INTEGER NOT NULL,
        actor       TEXT    NOT NULL,
        action      TEXT    NOT NULL,
        alert_id    INTEGER,
        silence_id  INTEGER,
        note        TEXT    NOT NULL
    );
    CREATE INDEX audit_by_alert ON audit (alert_id, id);
    CREATE INDEX audit_by_time ON audit (at_ms);

    -- Notifications to deliver, written in the same transaction as the change they announce.
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id         INTEGER REFERENCES alerts (id) ON DELETE CASCADE,
        channel          TEXT    NOT NULL,
        kind             TEXT    NOT NULL CHECK (kind IN ('trigger', 'acknowledge', 'resolve')),
        payload          TEXT    NOT NULL,
        state            TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms  INTEGER NOT NULL,
        created_ms       INTEGER NOT NULL,
        delivered_at_ms  INTEGER,
        last_error       TEXT
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_ms);
    CREATE INDEX outbox_by_alert ON outbox (alert_id);

    -- Silences: alerts whose labels match every matcher are not notified until ends_ms.
    CREATE TABLE silences (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        matchers    TEXT    NOT NULL,
        starts_ms   INTEGER NOT NULL,
        ends_ms     INTEGER NOT NULL,
        created_by  TEXT    NOT NULL,
        comment     TEXT    NOT NULL
    );
    CREATE INDEX silences_by_end ON silences (ends_ms);
    ",
    // 2: the health log: one row per run of an integration check, what its figures (success
    //    rate, uptime, response times, last error) are computed from.
    r"
    CREATE TABLE health_log (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        check_name   TEXT    NOT NULL,
        at_ms        INTEGER NOT NULL,
        status       TEXT    NOT NULL CHECK (status IN ('healthy', 'degraded', 'down', 'unknown')),
        response_ms  REAL,
        error        TEXT
    );
    CREATE INDEX health_log_by_check ON health_log (check_name, at_ms);
    CREATE INDEX health_log_by_time ON health_log (at_ms);
    ",
    // 3: the diagnoses, the repairs log (every decision of the repair agent, taken or skipped,
    //    with what the action changed and whether the recovery was verified) and the learned
    //    patterns (per signature and action: attempts, successes, time to recover).
    r"
    CREATE TABLE diagnoses (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms            INTEGER NOT NULL,
        rule             TEXT    NOT NULL,
        labels           TEXT    NOT NULL,
        signature        TEXT    NOT NULL,
        summary          TEXT    NOT NULL,
        confidence       REAL    NOT NULL,
        -- JSON arrays of text.
        evidence         TEXT    NOT NULL,
        actions          TEXT    NOT NULL,
        dependency_down  TEXT,
        -- The optional LLM summary, or why there is none.
        llm_summary      TEXT,
        llm_error        TEXT
    );
    CREATE INDEX diagnoses_by_time ON diagnoses (at_ms);

    CREATE TABLE repairs (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms           INTEGER NOT NULL,
        diagnosis_id    INTEGER,
        target          TEXT    NOT NULL,
        signature       TEXT    NOT NULL,
        rule            TEXT    NOT NULL,
        labels          TEXT    NOT NULL,
        summary         TEXT    NOT NULL,
        action          TEXT    NOT NULL,
        -- The safety gate's decision, as JSON: run, dry_run, or skip with its reason.
        decision        TEXT    NOT NULL,
        state           TEXT    NOT NULL CHECK (state IN
                            ('running', 'verifying', 'recovered', 'failed', 'skipped', 'dry_run')),
        -- What the action changed, read back: a JSON array of effects.
        effects         TEXT,
        error           TEXT,
        finished_at_ms  INTEGER,
        recover_ms      INTEGER
    );
    CREATE INDEX repairs_by_time ON repairs (at_ms);
    CREATE INDEX repairs_by_signature ON repairs (signature, id);

    CREATE TABLE patterns (
        signature         TEXT    NOT NULL,
        action            TEXT    NOT NULL,
        attempts          INTEGER NOT NULL,
        successes         INTEGER NOT NULL,
        -- Summed over the successes.
        total_recover_ms  INTEGER NOT NULL,
        last_outcome      TEXT    NOT NULL,
        last_at_ms        INTEGER NOT NULL,
        PRIMARY KEY (signature, action)
    );
    ",
];

/// The schema version this build writes.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the schema up to [`VERSION`]; refuses a newer file.
pub fn migrate(connection: &mut Connection, path: &Path) -> Result<Opened, StateError> {
    migrate_with(connection, path, MIGRATIONS)
}

/// [`migrate`] over a given list (tests add migrations of their own).
pub(crate) fn migrate_with(
    connection: &mut Connection,
    path: &Path,
    migrations: &[&str],
) -> Result<Opened, StateError> {
    let supported = migrations.len() as u32;
    let found: u32 = connection
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|source| StateError::Open {
            path: path.to_owned(),
            source,
        })?;
    if found > supported {
        return Err(StateError::TooNew {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    for (index, sql) in migrations.iter().enumerate().skip(found as usize) {
        let version = index as u32 + 1;
        let failed = |source| StateError::Migrate {
            path: path.to_owned(),
            version,
            source,
        };
        let tx = connection.transaction().map_err(failed)?;
        tx.execute_batch(sql).map_err(failed)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
        tracing::info!(path = %path.display(), version, "state database migrated");
    }
    Ok(Opened {
        from_version: found,
        version: supported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(connection: &Connection) -> Vec<String> {
        let mut statement = connection
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .expect("prepare");
        statement
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    fn version(connection: &Connection) -> u32 {
        connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version")
    }

    #[test]
    fn a_fresh_database_gets_every_table_and_the_current_version() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.db");
        let mut connection = Connection::open(&path).expect("open");
        let opened = migrate(&mut connection, &path).expect("migrate");
        assert_eq!(
            opened,
            Opened {
                from_version: 0,
                version: VERSION
            }
        );
        assert_eq!(version(&connection), VERSION);
        assert_eq!(
            tables(&connection),
            [
                "alert_events",
                "alerts",
                "audit",
                "diagnoses",
                "health_log",
                "outbox",
                "patterns",
                "repairs",
                "silences"
            ]
        );
    }

    #[test]
    fn a_file_of_the_first_release_gains_the_health_log_and_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.db");
        let mut connection = Connection::open(&path).expect("open");
        migrate_with(&mut connection, &path, &MIGRATIONS[..1]).expect("version 1");
        connection
            .execute(
                "INSERT INTO silences (matchers, starts_ms, ends_ms, created_by, comment) VALUES ('{}', 1, 2, 'me', 'kept')",
                [],
            )
            .expect("insert");
        let opened = migrate(&mut connection, &path).expect("upgrade");
        assert_eq!((opened.from_version, opened.version), (1, VERSION));
        assert!(tables(&connection).contains(&"health_log".to_owned()));
        let comment: String = connection
            .query_row("SELECT comment FROM silences", [], |r| r.get(0))
            .expect("row");
        assert_eq!(comment, "kept");
    }

    #[test]
    fn reopening_keeps_the_data_and_runs_nothing_twice() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.db");
        {
            let mut connection = Connection::open(&path).expect("open");
            migrate(&mut connection, &path).expect("migrate");
            connection
                .execute(
                    "INSERT INTO silences (matchers, starts_ms, ends_ms, created_by, comment) VALUES ('{}', 1, 2, 'me', 'kept')",
                    [],
                )
                .expect("insert");
        }
        let mut connection = Connection::open(&path).expect("reopen");
        // A migration that ran again would fail on CREATE TABLE of an existing table.
        let opened = migrate(&mut connection, &path).expect("migrate again");
        assert_eq!(opened.from_version, VERSION);
        let comment: String = connection
            .query_row("SELECT comment FROM silences", [], |r| r.get(0))
            .expect("row");
        assert_eq!(comment, "kept");
    }

    #[test]
    fn a_later_migration_applies_on_top_of_an_older_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.db");
        let mut connection = Connection::open(&path).expect("open");
        migrate(&mut connection, &path).expect("current");
        let mut next: Vec<&str> = MIGRATIONS.to_vec();
        next.push("CREATE TABLE later (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);");
        let opened = migrate_with(&mut connection, &path, &next).expect("next");
        assert_eq!(opened.from_version, VERSION);
        assert_eq!(version(&connection), VERSION + 1);
        assert!(tables(&connection).contains(&"later".to_owned()));
    }

    #[test]
    fn a_failing_migration_leaves_the_previous_version_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.db");
        let mut connection = Connection::open(&path).expect("open");
        let mut broken: Vec<&str> = MIGRATIONS.to_vec();
        broken.push("CREATE TABLE half (id INTEGER); THIS IS NOT SQL;");
        let err = migrate_with(&mut connection, &path, &broken).expect_err("broken");
        assert!(
            matches!(err, StateError::Migrate { version, .. } if version == VERSION + 1),
            "{err:?}"
        );
        assert_eq!(version(&connection), VERSION);
        assert!(!tables(&connection).contains(&"half".to_owned()));
    }

    #[test]
    fn a_database_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.db");
        let mut connection = Connection::open(&path).expect("open");
        connection
            .pragma_update(None, "user_version", VERSION + 3)
            .expect("set version");
        let err = migrate(&mut connection, &path).expect_err("newer");
        match &err {
            StateError::TooNew {
                found, supported, ..
            } => {
                assert_eq!((*found, *supported), (VERSION + 3, VERSION));
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("newer than this selfheal supports"), "{text}");
        // Nothing was touched.
        assert!(tables(&connection).is_empty());
        assert_eq!(version(&connection), VERSION + 3);
    }
}
