//! The agent runtime: the seven agents as supervised tasks on the bus.
//!
//! Owns: starting each enabled agent with its own bus subscription, restarting one that
//! crashes (panics or returns an error) with exponential backoff and publishing the crash as
//! `Event::AgentCrashed`, restarts on request, and each agent's [`AgentStatus`]. Must not:
//! let agents talk other than through the bus. Besides read-only views (the target status,
//! traffic, checks), the healing loop keeps records in the state DB: the repair agent writes
//! the repairs log and reads the patterns the learning agent writes (learned from the repair
//! agent's events on the bus), and the repair agent owns the decisions of the shared gate.

mod diagnostic;
mod explain;
mod learning;
mod monitor;
mod performance;
mod predictive;
mod repair;
mod security;

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    actuators::gate::SharedGate,
    bus::{Bus, Event, Subscriber},
    checks::Checks,
    config::Config,
    repairs::RepairLog,
    target::SharedStatus,
    telemetry::{AgentLabel, Metrics},
    traffic::TrafficView,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the bus closed")]
    BusClosed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Running,
    /// Crashed; waiting out the backoff before the next start.
    Restarting,
    Disabled,
    Stopped,
}

/// An agent's state, as the API shows it (through its own response type).
#[derive(Debug, Clone)]
pub struct AgentStatus {
    pub name: &'static str,
    pub enabled: bool,
    pub state: AgentState,
    pub started_at: Option<SystemTime>,
    pub last_activity: Option<SystemTime>,
    pub events_handled: u64,
    pub events_published: u64,
    pub restarts: u64,
    pub last_error: Option<String>,
}

/// A shared view of one agent, and the way to ask for its restart.
#[derive(Clone)]
pub struct AgentHandle {
    status: Arc<Mutex<AgentStatus>>,
    restart: Arc<Notify>,
}

impl AgentHandle {
    fn new(name: &'static str, enabled: bool) -> Self {
        Self {
            status: Arc::new(Mutex::new(AgentStatus {
                name,
                enabled,
                state: if enabled {
                    AgentState::Stopped
                } else {
                    AgentState::Disabled
                },
                started_at: None,
                last_activity: None,
                events_handled: 0,
                events_published: 0,
                restarts: 0,
                last_error: None,
            })),
            restart: Arc::new(Notify::new()),
        }
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the supervisor to restart the agent's task.
    pub fn request_restart(&self) {
        self.restart.notify_one();
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// What an agent gets: its bus subscription, a way to publish, read-only views, and the
/// handles the healing loop keeps its records and its gate in.
pub struct AgentContext {
    pub config: Arc<Config>,
    pub target: SharedStatus,
    /// The decoded traffic: what the monitor's request and query rules read.
    pub traffic: TrafficView,
    /// The integration checks: the repair agent runs the target's health checks to verify a
    /// recovery.
    pub checks: Checks,
    /// The repairs log (written by the repair agent) and the learned patterns (written by the
    /// learning agent, read by the repair agent).
    pub repairs: RepairLog,
    /// The safety gate, shared with the API (open circuits).
    pub gate: SharedGate,
    bus: Bus,
    events: Subscriber,
    handle: AgentHandle,
}

impl AgentContext {
    /// The next bus event, counted as handled. `Err` once the bus is gone.
    pub async fn next(&mut self) -> Result<Event, AgentError> {
        let event = self.events.recv().await.ok_or(AgentError::BusClosed)?;
        self.handle.update(|s| {
            s.events_handled += 1;
            s.last_activity = Some(SystemTime::now());
        });
        Ok(event)
    }

    pub fn publish(&self, event: Event) {
        self.handle.update(|s| s.events_published += 1);
        self.bus.publish(event);
    }
}

/// Lets a repeated finding through at most once per period, so an agent does not flood the
/// bus with the same warning.
pub(crate) struct Cooldown {
    period: Duration,
    last: Option<Instant>,
}

impl Cooldown {
    pub(crate) const fn new(period: Duration) -> Self {
        Self { period, last: None }
    }

    /// True (and the period restarts) when the last pass is longer ago than the period.
    pub(crate) fn pass(&mut self) -> bool {
        if self.last.is_some_and(|at| at.elapsed() <= self.period) {
            return false;
        }
        self.last = Some(Instant::now());
        true
    }
}

/// The seven agents, in listing order.
pub const AGENTS: [&str; 7] = crate::config::AGENT_NAMES;

async fn run_agent(name: &'static str, ctx: AgentContext) -> Result<(), AgentError> {
    match name {
        "monitor" => monitor::run(ctx).await,
        "security" => security::run(ctx).await,
        "diagnostic" => diagnostic::run(ctx).await,
        "repair" => repair::run(ctx).await,
        "learning" => learning::run(ctx).await,
        "predictive" => predictive::run(ctx).await,
        "performance" => performance::run(ctx).await,
        other => unreachable!("AGENTS lists every agent; {other} is not one"),
    }
}

/// Everything a supervisor needs to (re)build an agent's context.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub target: SharedStatus,
    pub traffic: TrafficView,
    pub checks: Checks,
    pub repairs: RepairLog,
    pub gate: SharedGate,
    pub bus: Bus,
    pub metrics: Metrics,
}

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_mins(1);
/// An agent that ran this long before crashing starts again from the shortest backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_mins(1);

/// The handles of all agents, created before they start so the API can show them.
pub fn handles(config: &Config) -> Vec<AgentHandle> {
    AGENTS
        .iter()
        .map(|name| AgentHandle::new(name, config.agents.enabled(name)))
        .collect()
}

/// Runs every agent under supervision until cancelled.
pub async fn run_all(handles: Vec<AgentHandle>, shared: Shared, cancel: CancellationToken) {
    let supervisors = handles.into_iter().map(|handle| {
        let shared = shared.clone();
        let cancel = cancel.clone();
        let name = handle.status().name;
        async move { supervise(name, &handle, &shared, &cancel, |ctx| run_agent(name, ctx)).await }
    });
    futures_join_all(supervisors).await;
}

/// Awaits a set of futures concurrently (a tiny `join_all`, to avoid a dependency for it).
async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for future in futures {
        set.spawn(future);
    }
    while set.join_next().await.is_some() {}
}

/// Runs one agent, restarting it when it crashes or a restart is requested.
async fn supervise<F, Fut>(
    name: &'static str,
    handle: &AgentHandle,
    shared: &Shared,
    cancel: &CancellationToken,
    body: F,
) where
    F: Fn(AgentContext) -> Fut,
    Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
{
    let label = AgentLabel { agent: name };
    if !handle.status().enabled {
        shared.metrics.agent_up.get_or_create(&label).set(0);
        return;
    }
    let mut backoff = BACKOFF_START;
    loop {
        let ctx = AgentContext {
            config: shared.config.clone(),
            target: shared.target.clone(),
            traffic: shared.traffic.clone(),
            checks: shared.checks.clone(),
            repairs: shared.repairs.clone(),
            gate: shared.gate.clone(),
            bus: shared.bus.clone(),
            events: shared.bus.subscribe(),
            handle: handle.clone(),
        };
        // Spawned (and awaited right here) so that a panic is caught as a `JoinError`.
        let mut task = tokio::spawn(body(ctx));
        let started = Instant::now();
        handle.update(|s| {
            s.state = AgentState::Running;
            s.started_at = Some(SystemTime::now());
        });
        shared.metrics.agent_up.get_or_create(&label).set(1);
        let error = tokio::select! {
            () = cancel.cancelled() => {
                task.abort();
                handle.update(|s| s.state = AgentState::Stopped);
                shared.metrics.agent_up.get_or_create(&label).set(0);
                return;
            }
            () = handle.restart.notified() => {
                task.abort();
                let _ = task.await;
                tracing::info!(agent = name, "agent restarted on request");
                handle.update(|s| s.restarts += 1);
                shared.metrics.agent_restarts.get_or_create(&label).inc();
                backoff = BACKOFF_START;
                continue;
            }
            outcome = &mut task => match outcome {
                Ok(Ok(())) => "the agent stopped on its own".to_owned(),
                Ok(Err(err)) => err.to_string(),
                Err(join) if join.is_panic() => panic_message(&*join.into_panic()),
                Err(join) => join.to_string(),
            },
        };
        if started.elapsed() >= BACKOFF_RESET_AFTER {
            backoff = BACKOFF_START;
        }
        tracing::error!(agent = name, %error, restart_in_ms = backoff.as_millis(), "agent crashed");
        handle.update(|s| {
            s.state = AgentState::Restarting;
            s.restarts += 1;
            s.last_error = Some(error.clone());
        });
        shared.metrics.agent_up.get_or_create(&label).set(0);
        shared.metrics.agent_restarts.get_or_create(&label).inc();
        shared.bus.publish(Event::AgentCrashed {
            agent: name.to_owned(),
            error,
            restart_in_ms: u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
        });
        tokio::select! {
            () = cancel.cancelled() => {
                handle.update(|s| s.state = AgentState::Stopped);
                return;
            }
            () = tokio::time::sleep(backoff) => {}
            // An operator's restart cuts the backoff short (and is not kept for later, which
            // would restart the new task at once).
            () = handle.restart.notified() => {
                tracing::info!(agent = name, "agent restarted on request, before its backoff ended");
                backoff = BACKOFF_START;
                continue;
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::config::{parse, Env};

    fn shared() -> Shared {
        let config = parse("[target]\npid = 1\n", &Env::default()).expect("config");
        let metrics = Metrics::new();
        let target = crate::target::new_status(&crate::config::TargetSelector::Pid(1));
        let store =
            crate::store::StoreHandle::new(crate::store::StoreConfig::default()).expect("store");
        let dir = tempfile::tempdir().expect("dir");
        let (db, _thread, _) = crate::state::open(
            &crate::state::DbOptions {
                path: dir.path().join(crate::state::DB_FILE),
                busy_timeout: Duration::from_secs(1),
            },
            metrics.clone(),
        )
        .expect("state db");
        let (checks, _runner) = Checks::new(Vec::new(), db.clone(), crate::alerts::system_clock());
        Shared {
            config: Arc::new(config),
            target,
            checks,
            repairs: RepairLog::new(db),
            gate: crate::actuators::gate::shared(crate::actuators::gate::GateConfig::default()),
            traffic: TrafficView::new(store, crate::traffic::Platforms::new(&[]), 20),
            bus: Bus::new(metrics.clone()),
            metrics,
        }
    }

    /// Supervises a "monitor" whose first `crashes` starts panic (`starts` counts them all)
    /// and whose later ones handle events until the bus closes.
    fn supervised(
        handle: &AgentHandle,
        shared: &Shared,
        cancel: &CancellationToken,
        starts: &Arc<AtomicU32>,
        crashes: u32,
    ) -> tokio::task::JoinHandle<()> {
        let (handle, shared, cancel, starts) = (
            handle.clone(),
            shared.clone(),
            cancel.clone(),
            starts.clone(),
        );
        tokio::spawn(async move {
            supervise("monitor", &handle, &shared, &cancel, move |mut ctx| {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert!(n >= crashes, "crash number {n}");
                    loop {
                        ctx.next().await?;
                    }
                }
            })
            .await;
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashing_agent_is_restarted_with_backoff_and_the_crash_is_published() {
        let shared = shared();
        let mut events = shared.bus.subscribe();
        let handle = AgentHandle::new("monitor", true);
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        // The third start behaves: it handles events until the bus closes.
        let supervisor = supervised(&handle, &shared, &cancel, &starts, 2);
        let mut delays = Vec::new();
        while delays.len() < 2 {
            if let Some(Event::AgentCrashed {
                agent,
                error,
                restart_in_ms,
            }) = events.recv().await
            {
                assert_eq!(agent, "monitor");
                assert!(error.contains("crash number"), "{error}");
                delays.push(restart_in_ms);
            }
        }
        assert_eq!(delays, [1000, 2000], "exponential backoff");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let status = handle.status();
        assert_eq!(status.state, AgentState::Running);
        assert_eq!(status.restarts, 2);
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert_eq!(
            shared
                .metrics
                .agent_restarts
                .get_or_create(&AgentLabel { agent: "monitor" })
                .get(),
            2
        );

        handle.request_restart();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 4);
        assert_eq!(handle.status().restarts, 3);

        cancel.cancel();
        supervisor.await.expect("supervisor ends");
        assert_eq!(handle.status().state, AgentState::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_asked_for_during_the_backoff_happens_at_once_and_once() {
        let shared = shared();
        let handle = AgentHandle::new("monitor", true);
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        // The first start crashes.
        let supervisor = supervised(&handle, &shared, &cancel, &starts, 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(handle.status().state, AgentState::Restarting);
        handle.request_restart();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "started again before the 1 s backoff"
        );
        assert_eq!(handle.status().state, AgentState::Running);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "no second restart from a kept permit"
        );
        assert_eq!(handle.status().restarts, 1);
        cancel.cancel();
        supervisor.await.expect("supervisor ends");
    }

    #[test]
    fn cooldown_lets_one_finding_through_per_period() {
        let mut hourly = Cooldown::new(Duration::from_hours(1));
        assert!(hourly.pass());
        assert!(!hourly.pass());
        let mut short = Cooldown::new(Duration::from_millis(1));
        assert!(short.pass());
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.pass());
    }

    #[tokio::test]
    async fn a_disabled_agent_does_not_run() {
        let shared = shared();
        let handle = AgentHandle::new("security", false);
        let ran = Arc::new(AtomicU32::new(0));
        let counter = ran.clone();
        supervise(
            "security",
            &handle,
            &shared,
            &CancellationToken::new(),
            move |_ctx| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            },
        )
        .await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(handle.status().state, AgentState::Disabled);
    }
}
