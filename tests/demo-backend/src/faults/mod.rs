//! Fault switches: the shared state the `/__fault` routes flip and the request path reads.

mod params;
mod workers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

pub(crate) use params::{parse_fault, CrashMode, ErrorsSpec, FaultRequest, ParseError, Table};
use workers::{FaultSession, FdLeak, Leak, Released, Spin};

/// How long the `lock` fault waits to get its lock before giving up.
const LOCK_ACQUIRE_TIMEOUT: &str = "5s";
/// How long `POST /__fault/clear` waits for the held sessions to close before answering.
const CLEAR_WAIT: Duration = Duration::from_secs(3);
/// Delay between answering the `crash` request and dying, so the 202 reaches the client.
const CRASH_DELAY: Duration = Duration::from_millis(200);
/// What `bad_query` runs: the table does not exist, so it fails with 42P01 (`undefined_table`).
pub(crate) const BAD_QUERY: &str = "SELECT * FROM no_such_table";
/// The password `bad_password` logs in with; nobody's.
const WRONG_PASSWORD: &str = "not-the-password";

/// The active faults. One per process, shared by all requests.
pub(crate) struct Faults {
    /// Where the extra sessions of `lock` and `idle_tx` connect.
    pg_config: tokio_postgres::Config,
    hang: watch::Sender<bool>,
    n_plus_one: AtomicBool,
    slow_query: Mutex<Option<SlowQuery>>,
    errors: Mutex<Option<ErrorBudget>>,
    /// Data requests left that run [`BAD_QUERY`] first; 0 = off.
    bad_queries: AtomicU64,
    leak: Mutex<Option<Leak>>,
    fd_leak: Mutex<Option<FdLeak>>,
    spin: Mutex<Option<Spin>>,
    held: Arc<Mutex<HeldSessions>>,
    /// Bumped by `clear`; the tasks holding sessions wait on it.
    clear_generation: watch::Sender<u64>,
}

/// The `slow_query` sleep and the paths it applies to (all data requests when empty).
#[derive(Debug, Clone)]
struct SlowQuery {
    delay: Duration,
    paths: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum ErrorBudget {
    Remaining(u64),
    Until(Instant),
}

#[derive(Default)]
struct HeldSessions {
    next_id: u64,
    sessions: Vec<HeldSession>,
}

struct HeldSession {
    id: u64,
    backend_pid: i32,
    kind: HeldKind,
}

enum HeldKind {
    Lock { table: Table, until: Instant },
    IdleTx,
}

/// Why turning a fault on failed.
#[derive(Debug)]
pub(crate) enum ApplyError {
    /// The database refused (e.g. the lock could not be taken in time).
    Database(String),
    /// The OS refused a thread.
    Os(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Database(e) => write!(f, "database: {e}"),
            ApplyError::Os(e) => write!(f, "os: {e}"),
        }
    }
}

/// Seconds with millisecond precision, for status output.
fn secs_3dp(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent under any panic, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Faults {
    pub(crate) fn new(pg_config: tokio_postgres::Config) -> Arc<Faults> {
        Arc::new(Faults {
            pg_config,
            hang: watch::Sender::new(false),
            n_plus_one: AtomicBool::new(false),
            slow_query: Mutex::new(None),
            errors: Mutex::new(None),
            bad_queries: AtomicU64::new(0),
            leak: Mutex::new(None),
            fd_leak: Mutex::new(None),
            spin: Mutex::new(None),
            held: Arc::new(Mutex::new(HeldSessions::default())),
            clear_generation: watch::Sender::new(0),
        })
    }

    /// Returns at once unless `hang` is on; then waits until it is cleared.
    pub(crate) async fn wait_while_hanging(&self) {
        let mut rx = self.hang.subscribe();
        // An error means the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|hanging| !*hanging).await;
    }

    /// Whether this data request must fail with 500 (consumes one from a count budget).
    pub(crate) fn take_injected_error(&self) -> bool {
        let mut budget = locked(&self.errors);
        match *budget {
            None => false,
            Some(ErrorBudget::Remaining(n)) => {
                *budget = (n > 1).then(|| ErrorBudget::Remaining(n - 1));
                true
            }
            Some(ErrorBudget::Until(deadline)) => {
                if Instant::now() < deadline {
                    true
                } else {
                    *budget = None;
                    false
                }
            }
        }
    }

    pub(crate) fn n_plus_one(&self) -> bool {
        self.n_plus_one.load(Ordering::Relaxed)
    }

    /// The `pg_sleep` to add before the queries of a data request for `path`, if `slow_query`
    /// is on and applies to it.
    pub(crate) fn slow_query(&self, path: &str) -> Option<Duration> {
        locked(&self.slow_query)
            .as_ref()
            .filter(|slow| slow.paths.is_empty() || slow.paths.iter().any(|p| path.starts_with(p)))
            .map(|slow| slow.delay)
    }

    /// Whether this data request must first run [`BAD_QUERY`] (consumes one from the count).
    pub(crate) fn take_bad_query(&self) -> bool {
        self.bad_queries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Turns a fault on (or, for [`FaultRequest::Clear`], all off). Returns a JSON description.
    pub(crate) async fn apply(&self, request: FaultRequest) -> Result<Value, ApplyError> {
        let described = match request {
            FaultRequest::Clear => {
                self.clear();
                // So that "cleared" means the extra sessions are gone, not just told to go.
                let released = self.wait_sessions_released(CLEAR_WAIT).await;
                json!({ "cleared": true, "sessions_released": released })
            }
            FaultRequest::Crash(mode) => {
                tracing::warn!(?mode, "fault crash: the process dies in {CRASH_DELAY:?}");
                tokio::spawn(async move {
                    tokio::time::sleep(CRASH_DELAY).await;
                    match mode {
                        CrashMode::Abort => std::process::abort(),
                        CrashMode::Exit(code) => std::process::exit(code),
                    }
                });
                match mode {
                    CrashMode::Abort => json!({ "fault": "crash", "mode": "abort" }),
                    CrashMode::Exit(code) => {
                        json!({ "fault": "crash", "mode": "exit", "code": code })
                    }
                }
            }
            FaultRequest::Hang => {
                self.hang.send_replace(true);
                json!({ "fault": "hang" })
            }
            FaultRequest::NPlusOne => {
                self.n_plus_one.store(true, Ordering::Relaxed);
                json!({ "fault": "n_plus_one" })
            }
            FaultRequest::SlowQuery { ms, paths } => {
                let described = json!({ "fault": "slow_query", "ms": ms, "paths": paths });
                *locked(&self.slow_query) = Some(SlowQuery {
                    delay: Duration::from_millis(ms),
                    paths,
                });
                described
            }
            FaultRequest::BadQuery { count } => {
                self.bad_queries.store(count, Ordering::Relaxed);
                json!({ "fault": "bad_query", "count": count, "sql": BAD_QUERY })
            }
            FaultRequest::BadPassword { n } => {
                let mut sqlstates = Vec::with_capacity(n);
                for _ in 0..n {
                    sqlstates.push(self.try_wrong_password().await?);
                }
                json!({ "fault": "bad_password", "n": n, "sqlstates": sqlstates })
            }
            FaultRequest::Errors(spec) => {
                let budget = match spec {
                    ErrorsSpec::Count(n) => ErrorBudget::Remaining(n),
                    ErrorsSpec::Secs(s) => {
                        ErrorBudget::Until(Instant::now() + Duration::from_secs(s))
                    }
                };
                *locked(&self.errors) = Some(budget);
                match spec {
                    ErrorsSpec::Count(n) => json!({ "fault": "errors", "count": n }),
                    ErrorsSpec::Secs(s) => json!({ "fault": "errors", "secs": s }),
                }
            }
            FaultRequest::Leak { mb_per_sec, max_mb } => {
                let mut leak = locked(&self.leak);
                match leak.as_ref() {
                    Some(running) => running.adjust(mb_per_sec, max_mb),
                    None => {
                        *leak = Some(
                            Leak::start(mb_per_sec, max_mb)
                                .map_err(|e| ApplyError::Os(e.to_string()))?,
                        );
                    }
                }
                json!({ "fault": "leak", "mb_per_sec": mb_per_sec, "max_mb": max_mb })
            }
            FaultRequest::FdLeak { per_sec, nofile } => {
                let soft = match nofile {
                    Some(n) => {
                        Some(workers::lower_nofile(n).map_err(|e| ApplyError::Os(e.to_string()))?)
                    }
                    None => None,
                };
                let mut leak = locked(&self.fd_leak);
                match leak.as_ref() {
                    Some(running) => running.adjust(per_sec),
                    None => {
                        *leak = Some(
                            FdLeak::start(per_sec).map_err(|e| ApplyError::Os(e.to_string()))?,
                        );
                    }
                }
                json!({ "fault": "fd_leak", "per_sec": per_sec, "nofile": soft })
            }
            FaultRequest::Spin { threads } => {
                let mut spin = locked(&self.spin);
                // Replace: stop the old threads (drop) before starting the new set.
                *spin = None;
                *spin = Some(Spin::start(threads).map_err(|e| ApplyError::Os(e.to_string()))?);
                json!({ "fault": "spin", "threads": threads })
            }
            FaultRequest::Lock { table, secs } => {
                let pid = self.start_lock(table, Duration::from_secs(secs)).await?;
                json!({ "fault": "lock", "table": table.as_str(), "secs": secs, "backend_pid": pid })
            }
            FaultRequest::IdleTx { n } => {
                let mut pids = Vec::with_capacity(n);
                for _ in 0..n {
                    pids.push(self.start_idle_tx().await?);
                }
                json!({ "fault": "idle_tx", "n": n, "backend_pids": pids })
            }
        };
        tracing::info!(fault = %described, "fault switched");
        Ok(described)
    }

    /// Turns every fault off: wakes hung requests, stops leak and spin threads (the leaked
    /// memory is freed), and rolls back and closes the sessions of `lock` and `idle_tx`.
    pub(crate) fn clear(&self) {
        self.hang.send_replace(false);
        self.n_plus_one.store(false, Ordering::Relaxed);
        *locked(&self.slow_query) = None;
        *locked(&self.errors) = None;
        self.bad_queries.store(0, Ordering::Relaxed);
        *locked(&self.leak) = None;
        *locked(&self.fd_leak) = None;
        *locked(&self.spin) = None;
        self.clear_generation.send_modify(|g| *g += 1);
        tracing::info!("all faults cleared");
    }

    /// Waits until no `lock`/`idle_tx` session is held, for at most `limit`; false if some are.
    async fn wait_sessions_released(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if locked(&self.held).sessions.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The active faults as JSON; `active` lists the names of those that are on.
    pub(crate) fn status(&self) -> Value {
        let mut active: Vec<&str> = Vec::new();
        let hang = *self.hang.borrow();
        if hang {
            active.push("hang");
        }
        let n_plus_one = self.n_plus_one();
        if n_plus_one {
            active.push("n_plus_one");
        }
        let slow_query = locked(&self.slow_query).as_ref().map(|slow| {
            active.push("slow_query");
            json!({ "ms": slow.delay.as_millis(), "paths": slow.paths })
        });
        let now = Instant::now();
        let errors = match *locked(&self.errors) {
            Some(ErrorBudget::Remaining(n)) => Some(json!({ "remaining": n })),
            Some(ErrorBudget::Until(t)) if t > now => {
                Some(json!({ "secs_left": secs_3dp(t - now) }))
            }
            _ => None,
        };
        if errors.is_some() {
            active.push("errors");
        }
        let bad_query = match self.bad_queries.load(Ordering::Relaxed) {
            0 => None,
            n => {
                active.push("bad_query");
                Some(json!({ "remaining": n }))
            }
        };
        let leak = locked(&self.leak).as_ref().map(Leak::status);
        if leak.is_some() {
            active.push("leak");
        }
        let fd_leak = locked(&self.fd_leak).as_ref().map(FdLeak::status);
        if fd_leak.is_some() {
            active.push("fd_leak");
        }
        let spin = locked(&self.spin)
            .as_ref()
            .map(|s| json!({ "threads": s.threads() }));
        if spin.is_some() {
            active.push("spin");
        }
        let mut locks = Vec::new();
        let mut idle_tx = Vec::new();
        for s in &locked(&self.held).sessions {
            match &s.kind {
                HeldKind::Lock { table, until } => locks.push(json!({
                    "table": table.as_str(),
                    "backend_pid": s.backend_pid,
                    "secs_left": secs_3dp(until.saturating_duration_since(now)),
                })),
                HeldKind::IdleTx => idle_tx.push(json!({ "backend_pid": s.backend_pid })),
            }
        }
        if !locks.is_empty() {
            active.push("lock");
        }
        if !idle_tx.is_empty() {
            active.push("idle_tx");
        }
        json!({
            "active": active,
            "hang": hang,
            "n_plus_one": n_plus_one,
            "slow_query": slow_query,
            "errors": errors,
            "bad_query": bad_query,
            "leak": leak,
            "fd_leak": fd_leak,
            "spin": spin,
            "lock": locks,
            "idle_tx": idle_tx,
        })
    }

    /// Opens a session that takes `LOCK TABLE … IN ACCESS EXCLUSIVE MODE` in an open
    /// transaction and keeps it for `hold_for` or until clear. Returns once the lock is held.
    async fn start_lock(&self, table: Table, hold_for: Duration) -> Result<i32, ApplyError> {
        let db = |e: tokio_postgres::Error| ApplyError::Database(crate::db::error_chain(&e));
        let clear = self.clear_generation.subscribe();
        let session = workers::open_session(&self.pg_config, "demo-backend/fault:lock")
            .await
            .map_err(db)?;
        // `table` comes from a fixed list (params::Table), so splicing its name is safe.
        let sql = format!(
            "SET lock_timeout = '{LOCK_ACQUIRE_TIMEOUT}'; BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            table.as_str()
        );
        session.client.batch_execute(&sql).await.map_err(db)?;
        let pid = session.backend_pid;
        let kind = HeldKind::Lock {
            table,
            until: Instant::now() + hold_for,
        };
        self.spawn_holder(session, kind, clear, Some(hold_for));
        Ok(pid)
    }

    /// Opens a session that runs `BEGIN; SELECT …` and then sits idle in that transaction
    /// until clear.
    async fn start_idle_tx(&self) -> Result<i32, ApplyError> {
        let db = |e: tokio_postgres::Error| ApplyError::Database(crate::db::error_chain(&e));
        let clear = self.clear_generation.subscribe();
        let session = workers::open_session(&self.pg_config, "demo-backend/fault:idle_tx")
            .await
            .map_err(db)?;
        session
            .client
            .batch_execute("BEGIN; SELECT count(*) FROM leads")
            .await
            .map_err(db)?;
        let pid = session.backend_pid;
        self.spawn_holder(session, HeldKind::IdleTx, clear, None);
        Ok(pid)
    }

    /// Logs in once with the pool's settings but a wrong password. The SQLSTATE the server
    /// refused it with (`28P01` where it checks passwords), or `None` if it let it in (a server
    /// that trusts the client); that session is closed at once.
    async fn try_wrong_password(&self) -> Result<Option<String>, ApplyError> {
        let mut config = self.pg_config.clone();
        config
            .password(WRONG_PASSWORD)
            .application_name("demo-backend/fault:bad_password");
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                drop(client);
                // With the client gone the connection sends Terminate and ends.
                let _ = connection.await;
                tracing::warn!("fault bad_password: the server accepted a wrong password");
                Ok(None)
            }
            Err(err) => match err.as_db_error() {
                Some(db) => {
                    tracing::info!(
                        sqlstate = db.code().code(),
                        "fault bad_password: login refused"
                    );
                    Ok(Some(db.code().code().to_owned()))
                }
                None => Err(ApplyError::Database(crate::db::error_chain(&err))),
            },
        }
    }

    fn spawn_holder(
        &self,
        session: FaultSession,
        kind: HeldKind,
        clear: watch::Receiver<u64>,
        limit: Option<Duration>,
    ) {
        let held = Arc::clone(&self.held);
        let backend_pid = session.backend_pid;
        let id = {
            let mut h = locked(&held);
            h.next_id += 1;
            let id = h.next_id;
            h.sessions.push(HeldSession {
                id,
                backend_pid,
                kind,
            });
            id
        };
        // Registered before `apply` returns, so `status` shows it at once.
        tokio::spawn(async move {
            let released = workers::hold(session, clear, limit).await;
            locked(&held).sessions.retain(|s| s.id != id);
            match released {
                Released::ConnectionLost => {
                    tracing::warn!(
                        backend_pid,
                        "fault session lost its connection (terminated?)"
                    );
                }
                reason => tracing::info!(backend_pid, ?reason, "fault session released"),
            }
        });
    }
}
