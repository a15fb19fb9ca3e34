//! The state DB: what must survive a restart, in an embedded SQLite database (`rusqlite`,
//! compiled in), by default `state.dir/state.db`.
//!
//! Owns: opening the database (WAL, `synchronous = FULL`, foreign keys, a busy timeout), the
//! versioned schema ([`schema`]: an ordered list of migrations, the version in
//! `PRAGMA user_version`), the one thread that touches the connection ([`StateDb`] sends it
//! closures over a bounded channel, so no async worker ever waits on the disk), and the daily
//! retention cleanup ([`retention`]). Must not: panic on a database error (each is returned
//! to the caller, counted in `selfheal_state_errors_total{op}` and logged by the caller), or
//! know what the tables mean: the `alerts` module (and, later, the health log, repairs and
//! learned patterns) own their queries.

pub mod retention;
pub mod schema;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::telemetry::{Metrics, OpLabel};

/// The database file in `state.dir` unless `state.db_path` says otherwise.
pub const DB_FILE: &str = "state.db";

/// Operations waiting for the database thread; a full queue makes callers wait (they are
/// API requests and the alert manager, never the capture path).
const QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the state database {path} has schema version {found}, newer than this selfheal \
         supports ({supported}); it was written by a newer release: upgrade selfheal, or move \
         the file away to start afresh"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("cannot migrate the state database {path} to schema version {version}")]
    Migrate {
        path: PathBuf,
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot start the state database thread")]
    Thread(#[source] std::io::Error),
    #[error("state database operation {op} failed")]
    Query {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the state database thread is gone")]
    Closed,
}

/// Settings of [`open`], from `[state]`.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub path: PathBuf,
    pub busy_timeout: Duration,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the database thread. Cheap to clone; the thread ends when the last handle is
/// dropped.
#[derive(Clone)]
pub struct StateDb {
    jobs: mpsc::Sender<Job>,
    metrics: Metrics,
}

/// The database thread, to wait for at shutdown (after every [`StateDb`] is dropped).
pub struct DbThread(oneshot::Receiver<()>);

impl DbThread {
    /// Waits until the thread has finished its last operation and closed the database.
    pub async fn finished(self) {
        let _ = self.0.await;
    }
}

/// What [`open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The schema version the file had (0: new).
    pub from_version: u32,
    pub version: u32,
}

/// Opens (creating if needed) and migrates the database, then starts its thread.
pub fn open(
    options: &DbOptions,
    metrics: Metrics,
) -> Result<(StateDb, DbThread, Opened), StateError> {
    let (connection, opened) = open_connection(options)?;
    let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
    let (done, finished) = oneshot::channel();
    // Not joined: the thread ends when the last handle is dropped, and says so on `done`.
    std::thread::Builder::new()
        .name("selfheal-state".to_owned())
        .spawn(move || {
            let mut connection = connection;
            while let Some(job) = queue.blocking_recv() {
                job(&mut connection);
            }
            // Folds the WAL back into the main file so the directory holds one file at rest.
            let _ = connection.pragma_update(None, "wal_checkpoint", "TRUNCATE");
            drop(connection);
            let _ = done.send(());
        })
        .map_err(StateError::Thread)?;
    Ok((StateDb { jobs, metrics }, DbThread(finished), opened))
}

/// Opens the connection with the daemon's settings and brings the schema up to date.
pub fn open_connection(options: &DbOptions) -> Result<(Connection, Opened), StateError> {
    let path = &options.path;
    let open_error = |source| StateError::Open {
        path: path.clone(),
        source,
    };
    // Alert history and the audit are root's business wherever `db_path` points: the file is
    // created here, 0600, rather than by SQLite under the umask; SQLite gives its -wal and
    // -shm files the database's mode. A failure here shows in the open just after.
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path);
    }
    let mut connection = Connection::open(path).map_err(open_error)?;
    configure(&connection, options.busy_timeout).map_err(open_error)?;
    let opened = schema::migrate(&mut connection, path)?;
    Ok((connection, opened))
}

fn configure(connection: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    connection.busy_timeout(busy_timeout)?;
    // WAL: readers (the CLI, a backup) never block the daemon's writes. `FULL` makes every
    // commit durable before the call returns, so a SIGKILL or a power cut loses nothing that
    // was acknowledged; the daemon writes a few rows per alert, far below what that costs.
    let mode: String =
        connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "the state database cannot use WAL; continuing in this mode");
    }
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

impl StateDb {
    /// Runs `f` on the database thread and returns its result. A failure is counted under
    /// `op` (a fixed name) and returned; the caller logs it and carries on.
    pub async fn call<R, F>(&self, op: &'static str, f: F) -> Result<R, StateError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let result = self.call_with(op, f).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => {
                self.count_error(op);
                Err(StateError::Query { op, source })
            }
            Err(err) => {
                self.count_error(op);
                Err(err)
            }
        }
    }

    /// Like [`StateDb::call`] for operations with an error type of their own (one that can
    /// say "not found" as well as carry a database error); only [`StateError`]s of the
    /// transport are counted here, the caller counts its own.
    pub async fn call_with<R, F>(&self, op: &'static str, f: F) -> Result<R, StateError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> R + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let _ = reply.send(f(connection));
        });
        if self.jobs.send(job).await.is_err() {
            self.count_error(op);
            return Err(StateError::Closed);
        }
        answer.await.map_err(|_| {
            // The job was dropped without an answer: the thread ended (it panicked).
            self.count_error(op);
            StateError::Closed
        })
    }

    /// Counts a failed operation in `selfheal_state_errors_total{op}`.
    pub fn count_error(&self, op: &'static str) {
        self.metrics
            .state_errors
            .get_or_create(&OpLabel { op })
            .inc();
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Milliseconds since the Unix epoch: how every time is stored.
pub fn now_ms() -> i64 {
    crate::store::unix_ms(std::time::SystemTime::now())
}

/// The path of the database for `[state]`: `db_path` when set, else `dir/state.db`.
pub fn db_path(dir: &Path, db_path: Option<&Path>) -> PathBuf {
    db_path.map_or_else(|| dir.join(DB_FILE), Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> DbOptions {
        DbOptions {
            path: dir.join(DB_FILE),
            busy_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn calls_run_on_the_database_thread_and_errors_are_counted_not_fatal() {
        let dir = tempfile::tempdir().expect("dir");
        let metrics = Metrics::new();
        let (db, thread, opened) = open(&options(dir.path()), metrics.clone()).expect("open");
        assert_eq!(opened.from_version, 0);
        assert_eq!(opened.version, schema::VERSION);
        let caller = std::thread::current().id();
        let on = db
            .call("test_thread", move |_| Ok(std::thread::current().id()))
            .await
            .expect("call");
        assert_ne!(on, caller);

        let failed = db
            .call("test_bad_sql", |c| {
                c.execute("INSERT INTO nowhere VALUES (1)", [])
            })
            .await;
        assert!(matches!(
            failed,
            Err(StateError::Query {
                op: "test_bad_sql",
                ..
            })
        ));
        assert_eq!(
            metrics
                .state_errors
                .get_or_create(&OpLabel { op: "test_bad_sql" })
                .get(),
            1
        );
        // The thread is still there after the failure.
        let one: i64 = db
            .call("test_after", |c| c.query_row("SELECT 1", [], |r| r.get(0)))
            .await
            .expect("still running");
        assert_eq!(one, 1);
        drop(db);
        thread.finished().await;
    }

    #[test]
    fn the_database_is_private_in_wal_mode_with_foreign_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let (connection, _) = open_connection(&options(dir.path())).expect("open");
        let mode: String = connection
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        let fk: i64 = connection
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("fk");
        assert_eq!(fk, 1);
        let synchronous: i64 = connection
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("synchronous");
        assert_eq!(synchronous, 2, "FULL");
        connection
            .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1)")
            .expect("write");
        for file in ["state.db", "state.db-wal", "state.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .expect(file)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file} is private");
        }
    }

    #[test]
    fn the_path_defaults_to_the_state_dir() {
        assert_eq!(
            db_path(Path::new("/var/lib/selfheal"), None),
            PathBuf::from("/var/lib/selfheal/state.db")
        );
        assert_eq!(
            db_path(
                Path::new("/var/lib/selfheal"),
                Some(Path::new("/data/s.db"))
            ),
            PathBuf::from("/data/s.db")
        );
    }
}
