//! The moving parts of the faults: memory leaker and spinner threads, and the extra
//! Postgres sessions that hold a table lock or sit idle in a transaction.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

const MIB: u64 = 1024 * 1024;
/// How often the leaker allocates: `mb_per_sec / TICKS_PER_SEC` MiB each tick.
const TICKS_PER_SEC: u64 = 10;

/// A thread that allocates and touches memory at a steady rate and keeps it alive until stopped.
pub(crate) struct Leak {
    stop: Arc<AtomicBool>,
    rate_mb_per_sec: Arc<AtomicU64>,
    allocated: Arc<AtomicU64>,
    max_mb: Arc<AtomicU64>,
}

impl Leak {
    pub(crate) fn start(mb_per_sec: u64, max_mb: u64) -> std::io::Result<Leak> {
        let leak = Leak {
            stop: Arc::new(AtomicBool::new(false)),
            rate_mb_per_sec: Arc::new(AtomicU64::new(mb_per_sec)),
            allocated: Arc::new(AtomicU64::new(0)),
            max_mb: Arc::new(AtomicU64::new(max_mb)),
        };
        let (stop, rate, allocated, max_mb) = (
            Arc::clone(&leak.stop),
            Arc::clone(&leak.rate_mb_per_sec),
            Arc::clone(&leak.allocated),
            Arc::clone(&leak.max_mb),
        );
        thread::Builder::new()
            .name("fault-leak".into())
            .spawn(move || {
                let mut kept: Vec<Vec<u8>> = Vec::new();
                let mut total: u64 = 0;
                let mut carry: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Bytes per tick, carrying the remainder so odd rates stay exact over time.
                    let owed = rate.load(Ordering::Relaxed) * MIB + carry;
                    carry = owed % TICKS_PER_SEC;
                    let chunk = (owed / TICKS_PER_SEC)
                        .min((max_mb.load(Ordering::Relaxed) * MIB).saturating_sub(total));
                    if chunk > 0 {
                        // A non-zero fill writes every page, so the memory is resident.
                        let len = usize::try_from(chunk).unwrap_or(usize::MAX);
                        kept.push(black_box(vec![0xA5_u8; len]));
                        total += chunk;
                        allocated.store(total, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(1000 / TICKS_PER_SEC));
                }
                drop(kept);
                allocated.store(0, Ordering::Relaxed);
            })?;
        Ok(leak)
    }

    /// Changes the rate and cap of a running leak (memory already taken stays).
    pub(crate) fn adjust(&self, mb_per_sec: u64, max_mb: u64) {
        self.rate_mb_per_sec.store(mb_per_sec, Ordering::Relaxed);
        self.max_mb.store(max_mb, Ordering::Relaxed);
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "mb_per_sec": self.rate_mb_per_sec.load(Ordering::Relaxed),
            "max_mb": self.max_mb.load(Ordering::Relaxed),
            "allocated_mb": self.allocated.load(Ordering::Relaxed) / MIB,
        })
    }
}

impl Drop for Leak {
    /// The thread sees the flag within one tick and frees everything it kept.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A thread that opens `/dev/null` at a steady rate and keeps every descriptor until stopped
/// (or until the process may open no more).
pub(crate) struct FdLeak {
    stop: Arc<AtomicBool>,
    per_sec: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    /// The error that stopped the opening (`EMFILE` once the limit is reached).
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl FdLeak {
    pub(crate) fn start(per_sec: u64) -> std::io::Result<FdLeak> {
        let leak = FdLeak {
            stop: Arc::new(AtomicBool::new(false)),
            per_sec: Arc::new(AtomicU64::new(per_sec)),
            open: Arc::new(AtomicU64::new(0)),
            refused: Arc::default(),
        };
        let (stop, rate, open, refused) = (
            Arc::clone(&leak.stop),
            Arc::clone(&leak.per_sec),
            Arc::clone(&leak.open),
            Arc::clone(&leak.refused),
        );
        thread::Builder::new()
            .name("fault-fd-leak".into())
            .spawn(move || {
                let mut kept: Vec<std::fs::File> = Vec::new();
                let mut carry: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let owed = rate.load(Ordering::Relaxed) + carry;
                    carry = owed % TICKS_PER_SEC;
                    for _ in 0..owed / TICKS_PER_SEC {
                        match std::fs::File::open("/dev/null") {
                            Ok(file) => kept.push(file),
                            Err(e) => {
                                *refused.lock().unwrap_or_else(PoisonError::into_inner) =
                                    Some(e.to_string());
                                break;
                            }
                        }
                    }
                    open.store(kept.len() as u64, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(1000 / TICKS_PER_SEC));
                }
                drop(kept);
                open.store(0, Ordering::Relaxed);
            })?;
        Ok(leak)
    }

    pub(crate) fn adjust(&self, per_sec: u64) {
        self.per_sec.store(per_sec, Ordering::Relaxed);
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "per_sec": self.per_sec.load(Ordering::Relaxed),
            "open": self.open.load(Ordering::Relaxed),
            "refused": *self.refused.lock().unwrap_or_else(PoisonError::into_inner),
        })
    }
}

impl Drop for FdLeak {
    /// The thread sees the flag within one tick and closes everything it kept.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Lowers the soft `RLIMIT_NOFILE` to `nofile` (never above the hard limit); the new soft
/// limit.
pub(crate) fn lower_nofile(nofile: u64) -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let soft = nofile.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok(soft)
}

/// Busy-looping OS threads, until dropped.
pub(crate) struct Spin {
    stop: Arc<AtomicBool>,
    threads: usize,
}

impl Spin {
    pub(crate) fn start(threads: usize) -> std::io::Result<Spin> {
        let stop = Arc::new(AtomicBool::new(false));
        let spin = Spin {
            stop: Arc::clone(&stop),
            threads,
        };
        for i in 0..threads {
            let stop = Arc::clone(&stop);
            // If a spawn fails, `spin` is dropped on return and the started threads stop.
            thread::Builder::new()
                .name(format!("fault-spin-{i}"))
                .spawn(move || {
                    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = black_box(x.rotate_left(5) ^ x.wrapping_mul(31));
                        }
                    }
                    black_box(x);
                })?;
        }
        Ok(spin)
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }
}

impl Drop for Spin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An extra Postgres session owned by a fault (outside the request pool).
pub(crate) struct FaultSession {
    pub(crate) client: Client,
    pub(crate) backend_pid: i32,
    /// Ends when the connection does (closed by us, by the server, or by `pg_terminate_backend`).
    pub(crate) connection: JoinHandle<()>,
}

/// Opens a session named `application_name`, so it is easy to spot in `pg_stat_activity`.
pub(crate) async fn open_session(
    config: &tokio_postgres::Config,
    application_name: &str,
) -> Result<FaultSession, tokio_postgres::Error> {
    let mut config = config.clone();
    config.application_name(application_name);
    let (client, connection) = config.connect(NoTls).await?;
    let name = application_name.to_owned();
    let connection = tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(session = %name, error = %crate::db::error_chain(&err), "fault session connection ended");
        }
    });
    let backend_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    Ok(FaultSession {
        client,
        backend_pid,
        connection,
    })
}

/// Why a held session let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    Cleared,
    TimedOut,
    ConnectionLost,
}

/// Waits until `clear` changes, `limit` (if any) elapses, or the session's connection ends;
/// then rolls the open transaction back (if still connected) and closes the session.
pub(crate) async fn hold(
    mut session: FaultSession,
    mut clear: watch::Receiver<u64>,
    limit: Option<Duration>,
) -> Released {
    let timer = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let released = tokio::select! {
        _ = clear.changed() => Released::Cleared,
        () = timer => Released::TimedOut,
        _ = &mut session.connection => Released::ConnectionLost,
    };
    if released != Released::ConnectionLost {
        if let Err(err) = session.client.batch_execute("ROLLBACK").await {
            tracing::debug!(error = %crate::db::error_chain(&err), "rollback of fault session failed");
        }
    }
    // Dropping the client closes the connection; the connection task then ends by itself.
    released
}
