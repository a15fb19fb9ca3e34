//! The delivery worker's queries over the `outbox` table: synchronous functions over a
//! `rusqlite::Connection`, run on the state DB's thread, taking `now` (Unix milliseconds) so
//! tests drive the clock. Each write is one statement, committed (and synced) on its own.

use rusqlite::{params, Connection};

/// A pending notification, as the worker reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub alert_id: Option<i64>,
    /// `trigger`, `acknowledge` or `resolve`.
    pub kind: String,
    /// The JSON the alert manager stored.
    pub payload: String,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub created_ms: i64,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Failed; tried again at `next_attempt_ms`.
    Retry {
        error: String,
        next_attempt_ms: i64,
    },
    /// Failed for good (refused, or past the give-up limit).
    Failed {
        error: String,
    },
}

/// The rows of `channel` the worker may send now, oldest first, at most `limit`, and how many
/// of the channel's rows are pending in all.
///
/// Order within a channel is kept: the rows are the pending ones in id order up to the first
/// that is not due yet, so a notification waiting for its retry holds back the later ones of
/// its channel (a `resolve` never overtakes its `trigger`).
pub fn due(
    c: &Connection,
    channel: &str,
    now: i64,
    limit: usize,
) -> rusqlite::Result<(Vec<Row>, i64)> {
    let mut statement = c.prepare_cached(
        "SELECT id, alert_id, kind, payload, attempts, next_attempt_ms, created_ms FROM outbox \
         WHERE state = 'pending' AND channel = ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = statement
        .query_map(
            params![channel, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| {
                Ok(Row {
                    id: row.get(0)?,
                    alert_id: row.get(1)?,
                    kind: row.get(2)?,
                    payload: row.get(3)?,
                    attempts: row.get(4)?,
                    next_attempt_ms: row.get(5)?,
                    created_ms: row.get(6)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let due = rows
        .into_iter()
        .take_while(|row| row.next_attempt_ms <= now)
        .collect();
    let pending = c.query_row(
        "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND channel = ?1",
        params![channel],
        |row| row.get(0),
    )?;
    Ok((due, pending))
}

/// Records an attempt on row `id`; false when the row was no longer pending (nothing
/// changed).
pub fn record(c: &Connection, id: i64, now: i64, outcome: &Outcome) -> rusqlite::Result<bool> {
    let changed = match outcome {
        Outcome::Delivered => c.execute(
            "UPDATE outbox SET state = 'delivered', delivered_at_ms = ?2, attempts = attempts + 1 \
             WHERE id = ?1 AND state = 'pending'",
            params![id, now],
        )?,
        Outcome::Retry {
            error,
            next_attempt_ms,
        } => c.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_ms = ?3 \
             WHERE id = ?1 AND state = 'pending'",
            params![id, error, next_attempt_ms],
        )?,
        Outcome::Failed { error } => c.execute(
            "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ?2 \
             WHERE id = ?1 AND state = 'pending'",
            params![id, error],
        )?,
    };
    Ok(changed == 1)
}

/// Fails every pending row of a channel not in `configured` (the config changed since they
/// were enqueued); how many, per channel.
pub fn fail_unconfigured(
    c: &mut Connection,
    configured: &[&str],
) -> rusqlite::Result<Vec<(String, u64)>> {
    let tx = c.transaction()?;
    let channels: Vec<(String, i64)> = tx
        .prepare(
            "SELECT channel, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY channel \
             ORDER BY channel",
        )?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut failed = Vec::new();
    for (channel, _) in channels {
        if configured.contains(&channel.as_str()) {
            continue;
        }
        let n = tx.execute(
            "UPDATE outbox SET state = 'failed', last_error = ?2 \
             WHERE state = 'pending' AND channel = ?1",
            params![
                channel,
                format!("the {channel} channel is not configured any more")
            ],
        )?;
        failed.push((channel, n as u64));
    }
    tx.commit()?;
    Ok(failed)
}
