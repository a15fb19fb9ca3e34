//! The health log: one row per run of a check, and the figures the integrations view reads
//! from it (success rate and response times over 24 hours, uptime over 30 days, last error).
//!
//! Runs that never reached the dependency (`unknown`: disabled, missing credentials) are not
//! written; every figure is over runs that did.

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::bus::CheckStatus;

const HOUR_MS: i64 = 3_600_000;
/// The window of the success rate and the response times.
pub const RECENT_MS: i64 = 24 * HOUR_MS;
/// The window of the uptime.
pub const UPTIME_MS: i64 = 30 * 24 * HOUR_MS;

/// Appends one run.
pub fn record(
    c: &Connection,
    check: &str,
    at_ms: i64,
    status: CheckStatus,
    response_ms: Option<f64>,
    error: Option<&str>,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO health_log (check_name, at_ms, status, response_ms, error) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![check, at_ms, status.as_str(), response_ms, error])?;
    Ok(())
}

/// A check's figures at some time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub runs_24h: u64,
    /// Share of the last 24 hours' runs that worked (healthy or degraded), in percent.
    pub success_rate_24h: Option<f64>,
    /// Share of the last 30 days' runs that worked, in percent.
    pub uptime_30d: Option<f64>,
    pub avg_response_ms_24h: Option<f64>,
    pub min_response_ms_24h: Option<f64>,
    pub max_response_ms_24h: Option<f64>,
    /// The newest failed run's error, and when.
    pub last_error: Option<(i64, String)>,
}

fn percent(up: i64, runs: i64) -> Option<f64> {
    (runs > 0).then(|| up as f64 * 100.0 / runs as f64)
}

/// The figures of `check` at `now_ms`.
pub fn figures(c: &Connection, check: &str, now_ms: i64) -> rusqlite::Result<Figures> {
    let window = |from_ms: i64| {
        c.prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(status IN ('healthy', 'degraded')), 0), \
             AVG(response_ms), MIN(response_ms), MAX(response_ms) \
             FROM health_log WHERE check_name = ?1 AND at_ms > ?2",
        )?
        .query_row(params![check, from_ms], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<f64>>(2)?,
                row.get::<_, Option<f64>>(3)?,
                row.get::<_, Option<f64>>(4)?,
            ))
        })
    };
    let (runs, up, avg, min, max) = window(now_ms - RECENT_MS)?;
    let (runs_30d, up_30d, ..) = window(now_ms - UPTIME_MS)?;
    let last_error = c
        .prepare_cached(
            "SELECT at_ms, error FROM health_log \
             WHERE check_name = ?1 AND error IS NOT NULL ORDER BY at_ms DESC, id DESC LIMIT 1",
        )?
        .query_row(params![check], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(Figures {
        runs_24h: u64::try_from(runs).unwrap_or(0),
        success_rate_24h: percent(up, runs),
        uptime_30d: percent(up_30d, runs_30d),
        avg_response_ms_24h: avg,
        min_response_ms_24h: min,
        max_response_ms_24h: max,
        last_error,
    })
}

/// A check's newest run, to carry on from after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Last {
    pub at_ms: i64,
    pub status: CheckStatus,
    pub response_ms: Option<f64>,
    pub error: Option<String>,
    /// Failed runs in a row ending with the newest (at most 100 are counted).
    pub consecutive_failures: u32,
}

/// The newest run of `check`, if any.
pub fn last(c: &Connection, check: &str) -> rusqlite::Result<Option<Last>> {
    let mut statement = c.prepare_cached(
        "SELECT at_ms, status, response_ms, error FROM health_log \
         WHERE check_name = ?1 ORDER BY at_ms DESC, id DESC LIMIT 100",
    )?;
    let mut rows = statement.query(params![check])?;
    let mut newest: Option<Last> = None;
    let mut counting = true;
    while let Some(row) = rows.next()? {
        let status_text: String = row.get(1)?;
        let status = CheckStatus::parse(&status_text).unwrap_or(CheckStatus::Unknown);
        let down = status == CheckStatus::Down;
        match &mut newest {
            None => {
                newest = Some(Last {
                    at_ms: row.get(0)?,
                    status,
                    response_ms: row.get(2)?,
                    error: row.get(3)?,
                    consecutive_failures: u32::from(down),
                });
                counting = down;
            }
            Some(last) if counting && down => last.consecutive_failures += 1,
            Some(_) => break,
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::{open_connection, DbOptions, DB_FILE};

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("dir");
        let (c, _) = open_connection(&DbOptions {
            path: dir.path().join(DB_FILE),
            busy_timeout: Duration::from_secs(1),
        })
        .expect("open");
        (dir, c)
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn figures_cover_their_windows() {
        let (_dir, c) = db();
        // 40 days ago: down (outside both windows). 10 days ago: two up, two down (only in
        // the uptime). The last day: 3 healthy at 10/20/30 ms, 1 degraded at 90 ms, 1 down.
        record(
            &c,
            "crm",
            NOW - 40 * 24 * HOUR_MS,
            CheckStatus::Down,
            None,
            Some("old"),
        )
        .expect("r");
        for (i, status) in [
            CheckStatus::Healthy,
            CheckStatus::Down,
            CheckStatus::Healthy,
            CheckStatus::Down,
        ]
        .into_iter()
        .enumerate()
        {
            let at = NOW - 10 * 24 * HOUR_MS + i as i64;
            record(&c, "crm", at, status, Some(500.0), None).expect("r");
        }
        for (i, ms) in [10.0, 20.0, 30.0].into_iter().enumerate() {
            record(
                &c,
                "crm",
                NOW - HOUR_MS + i as i64,
                CheckStatus::Healthy,
                Some(ms),
                None,
            )
            .expect("r");
        }
        record(
            &c,
            "crm",
            NOW - 100,
            CheckStatus::Degraded,
            Some(90.0),
            None,
        )
        .expect("r");
        record(
            &c,
            "crm",
            NOW - 50,
            CheckStatus::Down,
            None,
            Some("connection refused"),
        )
        .expect("r");
        // Another check's rows count for it only.
        record(&c, "other", NOW - 10, CheckStatus::Down, None, Some("x")).expect("r");

        let f = figures(&c, "crm", NOW).expect("figures");
        assert_eq!(f.runs_24h, 5);
        assert_eq!(f.success_rate_24h, Some(80.0));
        // 30 days: 4 + 5 runs, 2 + 4 up.
        assert_eq!(f.uptime_30d, Some(600.0 / 9.0));
        assert_eq!(f.avg_response_ms_24h, Some(37.5));
        assert_eq!(f.min_response_ms_24h, Some(10.0));
        assert_eq!(f.max_response_ms_24h, Some(90.0));
        assert_eq!(
            f.last_error,
            Some((NOW - 50, "connection refused".to_owned()))
        );

        let none = figures(&c, "never", NOW).expect("figures");
        assert_eq!(none, Figures::default());
    }

    #[test]
    fn last_counts_the_failures_that_end_the_log() {
        let (_dir, c) = db();
        assert_eq!(last(&c, "crm").expect("last"), None);
        record(&c, "crm", NOW - 4, CheckStatus::Down, None, Some("a")).expect("r");
        record(&c, "crm", NOW - 3, CheckStatus::Healthy, Some(1.0), None).expect("r");
        record(&c, "crm", NOW - 2, CheckStatus::Down, None, Some("b")).expect("r");
        record(&c, "crm", NOW - 1, CheckStatus::Down, None, Some("c")).expect("r");
        let l = last(&c, "crm").expect("last").expect("some");
        assert_eq!(l.at_ms, NOW - 1);
        assert_eq!(l.status, CheckStatus::Down);
        assert_eq!(l.error.as_deref(), Some("c"));
        assert_eq!(l.consecutive_failures, 2);
        record(&c, "crm", NOW, CheckStatus::Degraded, Some(7.0), None).expect("r");
        let l = last(&c, "crm").expect("last").expect("some");
        assert_eq!(
            (l.status, l.consecutive_failures),
            (CheckStatus::Degraded, 0)
        );
    }
}
