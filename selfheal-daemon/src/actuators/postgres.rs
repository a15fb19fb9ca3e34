//! PostgreSQL sessions: cancel a session's running statement or terminate the session, chosen
//! by rule, and `ANALYZE` of a named table.
//!
//! Only the target's own sessions are ever touched: a [`SessionFilter`] naming them (by
//! application name, user or client address) is required, and superuser, replication and
//! non-client backends, and the daemon's own session, are excluded in the query itself. The
//! effect is read back from `pg_stat_activity`: a cancelled statement is no longer running, a
//! terminated session is gone, within a deadline; otherwise the action failed.
//!
//! The connection uses TLS as the URL's `sslmode` says, through the connector of
//! [`crate::tls`] (the web PKI roots plus `database.ca_file`), as the `database` check does.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{ActionError, Effect};
use crate::{
    app::error_chain,
    tls::{connect_postgres, CaFile},
};

/// Which of the target's sessions an action may touch; at least one field must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub application_name: Option<String>,
    pub user: Option<String>,
    /// The client's address as PostgreSQL prints it (`host(client_addr)`, e.g. `127.0.0.1`).
    pub client_addr: Option<String>,
}

impl SessionFilter {
    fn is_empty(&self) -> bool {
        self.application_name.is_none() && self.user.is_none() && self.client_addr.is_none()
    }
}

/// Which sessions a rule selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    /// A statement running for longer than this.
    RunningLongerThan(Duration),
    /// A transaction left idle for longer than this.
    IdleInTransactionLongerThan(Duration),
    /// Holding a lock another session waits for.
    BlockingOthers,
}

/// What to do to a selected session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAction {
    /// `pg_cancel_backend`: stop the running statement, keep the session.
    Cancel,
    /// `pg_terminate_backend`: end the session.
    Terminate,
}

/// One session as `pg_stat_activity` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub pid: i32,
    pub user: String,
    pub application_name: String,
    pub state: String,
    /// The statement (cut to 200 characters).
    pub query: String,
    /// Seconds since the statement (or, when idle in a transaction, the state) began.
    pub running_secs: f64,
    pub state_secs: f64,
    /// Sessions waiting for a lock this one holds.
    pub blocking: i64,
}

impl Session {
    fn describe(&self) -> String {
        format!(
            "{} for {:.1} s{}: {}",
            self.state,
            self.state_secs,
            if self.blocking > 0 {
                format!(", blocking {}", self.blocking)
            } else {
                String::new()
            },
            self.query
        )
    }
}

/// Connects to PostgreSQL at `url` (a libpq-style URL or key=value string), trusting the
/// certificates of `ca_file` (read now: `database.ca_file`) besides the web PKI roots when TLS
/// is used; the connection runs on a task of its own until the client is dropped.
pub async fn connect(url: &str, ca_file: Option<&CaFile>) -> Result<Client, ActionError> {
    // The chain: a TLS failure's reason (an unknown issuer, a wrong name) is in the sources.
    let (client, connection) = connect_postgres(url, ca_file)
        .await
        .map_err(|err| ActionError::Postgres(error_chain(&err)))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "actuator's PostgreSQL connection ended");
        }
    });
    Ok(client)
}

const SESSIONS: &str = "\
SELECT a.pid, a.usename::text, a.application_name, coalesce(a.state, ''), left(a.query, 200),
       coalesce(extract(epoch FROM now() - a.query_start)::float8, 0),
       coalesce(extract(epoch FROM now() - a.state_change)::float8, 0),
       (SELECT count(*) FROM pg_stat_activity w WHERE a.pid = ANY(pg_blocking_pids(w.pid)))
FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
  AND NOT r.rolsuper AND NOT r.rolreplication
  AND a.pid <> pg_backend_pid()
  AND ($1::text IS NULL OR a.application_name = $1)
  AND ($2::text IS NULL OR a.usename = $2)
  AND ($3::text IS NULL OR host(a.client_addr) = $3)
ORDER BY a.pid";

/// The target's sessions the filter allows (never superuser, replication or the daemon's own).
pub async fn sessions(
    client: &Client,
    filter: &SessionFilter,
) -> Result<Vec<Session>, ActionError> {
    if filter.is_empty() {
        return Err(ActionError::Unsafe(
            "no session filter: name the target's sessions by application name, user or client \
             address"
                .to_owned(),
        ));
    }
    let rows = client
        .query(
            SESSIONS,
            &[&filter.application_name, &filter.user, &filter.client_addr],
        )
        .await
        .map_err(|err| ActionError::Postgres(err.to_string()))?;
    Ok(rows
        .iter()
        .map(|row| Session {
            pid: row.get(0),
            user: row.get(1),
            application_name: row.get(2),
            state: row.get(3),
            query: row.get(4),
            running_secs: row.get(5),
            state_secs: row.get(6),
            blocking: row.get(7),
        })
        .collect())
}

/// Whether `selector` picks `session`.
pub fn selects(selector: Selector, session: &Session) -> bool {
    match selector {
        Selector::RunningLongerThan(limit) => {
            session.state == "active" && session.running_secs > limit.as_secs_f64()
        }
        Selector::IdleInTransactionLongerThan(limit) => {
            session.state.starts_with("idle in transaction")
                && session.state_secs > limit.as_secs_f64()
        }
        Selector::BlockingOthers => session.blocking > 0,
    }
}

/// How long an action's effect may take to show in `pg_stat_activity`.
const VERIFY_WITHIN: Duration = Duration::from_secs(3);

/// Applies `action(session)` to every session of the target that `selector` picks and reads
/// back each one's effect. An empty result means no session matched.
pub async fn act(
    client: &Client,
    filter: &SessionFilter,
    selector: Selector,
    action: impl Fn(&Session) -> SessionAction,
) -> Result<Vec<Result<Effect, ActionError>>, ActionError> {
    let chosen: Vec<Session> = sessions(client, filter)
        .await?
        .into_iter()
        .filter(|s| selects(selector, s))
        .collect();
    let mut outcomes = Vec::with_capacity(chosen.len());
    for session in chosen {
        outcomes.push(act_on(client, filter, &session, action(&session)).await);
    }
    Ok(outcomes)
}

async fn act_on(
    client: &Client,
    filter: &SessionFilter,
    session: &Session,
    action: SessionAction,
) -> Result<Effect, ActionError> {
    let (name, function) = match action {
        SessionAction::Cancel => ("postgres.cancel", "pg_cancel_backend"),
        SessionAction::Terminate => ("postgres.terminate", "pg_terminate_backend"),
    };
    let subject = format!(
        "session {} ({}, {})",
        session.pid, session.user, session.application_name
    );
    let signalled: bool = client
        .query_one(&format!("SELECT {function}($1)"), &[&session.pid])
        .await
        .map_err(|err| ActionError::Postgres(err.to_string()))?
        .get(0);
    if !signalled {
        return Err(ActionError::NotApplied {
            subject,
            wanted: function.to_owned(),
            found: "the server refused to signal the session".to_owned(),
        });
    }
    let deadline = Instant::now() + VERIFY_WITHIN;
    loop {
        let now = sessions(client, filter)
            .await?
            .into_iter()
            .find(|s| s.pid == session.pid);
        let done = match (&now, action) {
            (None, _) => true,
            (Some(_), SessionAction::Terminate) => false,
            // The statement it was running has stopped (the session may run a new one).
            (Some(s), SessionAction::Cancel) => {
                s.state != "active" || s.running_secs < session.running_secs
            }
        };
        if done {
            return Ok(Effect {
                action: name,
                subject,
                before: session.describe(),
                after: now.map_or_else(|| "session ended".to_owned(), |s| s.describe()),
            });
        }
        if Instant::now() >= deadline {
            return Err(ActionError::NotApplied {
                subject,
                wanted: function.to_owned(),
                found: now.map_or_else(String::new, |s| s.describe()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `ANALYZE` of `table` (optionally schema-qualified, `schema.table`), refreshing the planner's
/// statistics; reads back `pg_stat_user_tables.last_analyze`/`last_autoanalyze`.
pub async fn analyze(client: &Client, table: &str) -> Result<Effect, ActionError> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(ActionError::Unsafe(format!(
            "{table:?} is not a table name (`table` or `schema.table`)"
        )));
    }
    let quoted: Vec<String> = parts
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect();
    let quoted = quoted.join(".");
    let before = last_analyzed(client, &quoted).await?;
    client
        .batch_execute(&format!("ANALYZE {quoted}"))
        .await
        .map_err(|err| ActionError::Postgres(err.to_string()))?;
    // The statistics collector publishes the new time at the end of the transaction.
    let deadline = Instant::now() + VERIFY_WITHIN;
    loop {
        let after = last_analyzed(client, &quoted).await?;
        if after != before {
            return Ok(Effect {
                action: "postgres.analyze",
                subject: table.to_owned(),
                before,
                after,
            });
        }
        if Instant::now() >= deadline {
            return Err(ActionError::NotApplied {
                subject: table.to_owned(),
                wanted: "ANALYZE".to_owned(),
                found: format!("last analyzed {after}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When `quoted` (a quoted table name) was last analyzed, by hand or by autovacuum.
async fn last_analyzed(client: &Client, quoted: &str) -> Result<String, ActionError> {
    client
        .query_one(
            "SELECT coalesce(greatest(last_analyze, last_autoanalyze)::text, 'never') \
             FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
            &[&quoted],
        )
        .await
        .map(|row| row.get::<_, String>(0))
        .map_err(|err| ActionError::Postgres(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(state: &str, running: f64, state_secs: f64, blocking: i64) -> Session {
        Session {
            pid: 1,
            user: "app".into(),
            application_name: "backend".into(),
            state: state.into(),
            query: "SELECT 1".into(),
            running_secs: running,
            state_secs,
            blocking,
        }
    }

    #[test]
    fn selectors_pick_what_they_name() {
        let five = Duration::from_secs(5);
        let long_query = session("active", 9.0, 9.0, 0);
        let short_query = session("active", 1.0, 1.0, 0);
        let idle_tx = session("idle in transaction", 60.0, 60.0, 0);
        let aborted_tx = session("idle in transaction (aborted)", 60.0, 60.0, 0);
        let idle = session("idle", 60.0, 60.0, 0);
        let blocker = session("idle in transaction", 1.0, 1.0, 2);
        assert!(selects(Selector::RunningLongerThan(five), &long_query));
        assert!(!selects(Selector::RunningLongerThan(five), &short_query));
        assert!(!selects(Selector::RunningLongerThan(five), &idle_tx));
        assert!(selects(
            Selector::IdleInTransactionLongerThan(five),
            &idle_tx
        ));
        assert!(selects(
            Selector::IdleInTransactionLongerThan(five),
            &aborted_tx
        ));
        assert!(!selects(Selector::IdleInTransactionLongerThan(five), &idle));
        assert!(!selects(
            Selector::IdleInTransactionLongerThan(five),
            &blocker
        ));
        assert!(selects(Selector::BlockingOthers, &blocker));
        assert!(!selects(Selector::BlockingOthers, &idle_tx));
    }
}
