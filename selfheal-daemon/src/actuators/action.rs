//! The actions a playbook can name, and how each is carried out on the target as the config
//! selects it: a restart goes through systemd for a unit, the Docker Engine for a container,
//! and for a plain process through a stop (SIGTERM, then SIGKILL, through a pidfd) and the
//! configured `repair.start_command`.

use std::{path::PathBuf, process::Stdio, time::Duration};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::{
    cgroup, docker,
    gate::ActionKind,
    hook,
    postgres::{self, Selector, SessionAction, SessionFilter},
    signal, systemd, ActionError, Effect,
};
use crate::{
    bus::{Diagnosis, TargetState},
    config::{HookConfig, TargetSelector},
    target::SharedStatus,
};

/// An action a playbook can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Stop the target and start it again (systemd unit, container, or plain process with
    /// `repair.start_command`).
    Restart,
    /// Raise the memory limit of the target's cgroup (unit, container) by
    /// `repair.memory_step_percent`.
    RaiseMemoryLimit,
    /// End what holds a lock others wait for, in the target's sessions: the running statement
    /// is cancelled; a session idle in its transaction has none, and is terminated.
    CancelBlockers,
    /// Terminate the target's sessions idle in a transaction for longer than
    /// `monitor.idle_in_transaction_secs`.
    TerminateIdleInTransaction,
    /// Cancel the target's statements running longer than `repair.sessions.running_secs`.
    CancelSlowQueries,
    /// `ANALYZE` the tables the slow query the diagnosis names reads, so the planner works
    /// from fresh statistics.
    Analyze,
}

impl Action {
    pub const ALL: [Self; 6] = [
        Self::Restart,
        Self::RaiseMemoryLimit,
        Self::CancelBlockers,
        Self::TerminateIdleInTransaction,
        Self::CancelSlowQueries,
        Self::Analyze,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::RaiseMemoryLimit => "raise_memory_limit",
            Self::CancelBlockers => "cancel_blockers",
            Self::TerminateIdleInTransaction => "terminate_idle_in_transaction",
            Self::CancelSlowQueries => "cancel_slow_queries",
            Self::Analyze => "analyze",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// What the gate counts it as.
    pub fn kind(self) -> ActionKind {
        match self {
            Self::Restart => ActionKind::Restart,
            Self::RaiseMemoryLimit => ActionKind::Resize,
            Self::CancelBlockers | Self::CancelSlowQueries => ActionKind::CancelQuery,
            Self::TerminateIdleInTransaction => ActionKind::TerminateSession,
            Self::Analyze => ActionKind::Analyze,
        }
    }
}

/// How a playbook names a configured hook: `hook:<name>`.
pub const HOOK_PREFIX: &str = "hook:";

/// One candidate of a playbook: a built-in action or a configured hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Action(Action),
    /// `[[repair.hooks]]` by name.
    Hook(String),
}

impl Step {
    pub fn parse(name: &str) -> Option<Self> {
        match name.strip_prefix(HOOK_PREFIX) {
            Some("") => None,
            Some(hook) => Some(Self::Hook(hook.to_owned())),
            None => Action::parse(name).map(Self::Action),
        }
    }

    /// What the gate counts it as.
    pub fn kind(&self) -> ActionKind {
        match self {
            Self::Action(action) => action.kind(),
            Self::Hook(_) => ActionKind::Hook,
        }
    }
}

/// Everything an action needs to know about the target and its database.
#[derive(Clone)]
pub struct Host {
    pub selector: TargetSelector,
    pub status: SharedStatus,
    /// Starts a plain-process target again (`repair.start_command`); empty: not configured.
    pub start_command: Vec<String>,
    /// Where the started process's output goes.
    pub start_log: PathBuf,
    /// How long a stopping target gets after SIGTERM (and a container's engine waits).
    pub stop_timeout: Duration,
    /// How long a restart may take to show a new running process.
    pub restart_timeout: Duration,
    pub memory_step_percent: u64,
    pub database_url: Option<String>,
    pub database_ca_file: Option<PathBuf>,
    pub sessions: SessionFilter,
    pub idle_in_transaction: Duration,
    pub running_longer_than: Duration,
    pub hooks: Vec<HookConfig>,
}

impl Host {
    /// The running target's pid, when there is one.
    fn running_pid(&self) -> Option<u32> {
        let status = self.status.read().ok()?;
        (status.state == TargetState::Running)
            .then_some(status.pid)
            .flatten()
    }
}

/// Carries out `step` about `diagnosis` and reports what changed (one effect per session or
/// table for the database actions). Nothing matched (no session to cancel) is an error: it
/// changed nothing, so it cannot be what fixes the problem.
pub async fn execute(
    step: &Step,
    host: &Host,
    diagnosis: &Diagnosis,
) -> Result<Vec<Effect>, ActionError> {
    let action = match step {
        Step::Action(action) => *action,
        Step::Hook(name) => return run_hook(host, name, diagnosis).await.map(|e| vec![e]),
    };
    match action {
        Action::Restart => restart(host).await.map(|e| vec![e]),
        Action::RaiseMemoryLimit => raise_memory_limit(host).await.map(|e| vec![e]),
        Action::CancelBlockers => sessions(host, Selector::BlockingOthers, None).await,
        Action::TerminateIdleInTransaction => {
            sessions(
                host,
                Selector::IdleInTransactionLongerThan(host.idle_in_transaction),
                Some(SessionAction::Terminate),
            )
            .await
        }
        Action::CancelSlowQueries => {
            sessions(
                host,
                Selector::RunningLongerThan(host.running_longer_than),
                Some(SessionAction::Cancel),
            )
            .await
        }
        Action::Analyze => analyze(host, &diagnosis.tables).await,
    }
}

/// Runs the configured hook `name` with the diagnosis: in the command's environment, or as
/// the JSON body of a POST to its URL.
async fn run_hook(host: &Host, name: &str, diagnosis: &Diagnosis) -> Result<Effect, ActionError> {
    let Some(hook) = host.hooks.iter().find(|h| h.name == name) else {
        return Err(ActionError::Unavailable(format!(
            "no hook named {name:?} in [[repair.hooks]]"
        )));
    };
    let timeout = Duration::from_millis(hook.timeout_ms);
    let target = host.selector.to_string();
    if let Some(url) = &hook.url {
        let body = serde_json::json!({
            "hook": name,
            "target": target,
            "signature": diagnosis.signature,
            "rule": diagnosis.rule,
            "labels": diagnosis.labels,
            "summary": diagnosis.summary,
            "dependency_down": diagnosis.dependency_down,
            "diagnosis_id": diagnosis.id,
        });
        return hook::post(url, &body.to_string(), timeout).await;
    }
    let env = [
        ("SELFHEAL_HOOK", name.to_owned()),
        ("SELFHEAL_TARGET", target),
        ("SELFHEAL_SIGNATURE", diagnosis.signature.clone()),
        ("SELFHEAL_RULE", diagnosis.rule.clone()),
        ("SELFHEAL_SUMMARY", diagnosis.summary.clone()),
        (
            "SELFHEAL_DEPENDENCY",
            diagnosis.dependency_down.clone().unwrap_or_default(),
        ),
        (
            "SELFHEAL_DIAGNOSIS_ID",
            diagnosis.id.map(|id| id.to_string()).unwrap_or_default(),
        ),
    ];
    hook::run_command(&hook.command, &env, timeout).await
}

/// The most tables one `analyze` refreshes.
const MAX_ANALYZED_TABLES: usize = 8;

/// `ANALYZE` of each table the diagnosis names (those of the slow query).
async fn analyze(host: &Host, tables: &[String]) -> Result<Vec<Effect>, ActionError> {
    if tables.is_empty() {
        return Err(ActionError::Unavailable(
            "the diagnosis names no table to analyze (no slow query seen, or it reads none)"
                .to_owned(),
        ));
    }
    let client = database(host).await?;
    let mut effects = Vec::new();
    for table in tables.iter().take(MAX_ANALYZED_TABLES) {
        effects.push(postgres::analyze(&client, table).await?);
    }
    Ok(effects)
}

/// A connection to the target's database for the database actions.
async fn database(host: &Host) -> Result<tokio_postgres::Client, ActionError> {
    let Some(url) = &host.database_url else {
        return Err(ActionError::Unavailable(
            "database actions need the database's URL (database.url / DATABASE_URL, or a \
             postgres check)"
                .to_owned(),
        ));
    };
    let ca = host
        .database_ca_file
        .as_ref()
        .map(|path| crate::tls::CaFile {
            key: "database.ca_file".to_owned(),
            path: path.clone(),
        });
    postgres::connect(url, ca.as_ref()).await
}

async fn restart(host: &Host) -> Result<Effect, ActionError> {
    match &host.selector {
        TargetSelector::SystemdUnit { unit, bus } => {
            systemd::restart(unit, bus, host.restart_timeout).await
        }
        TargetSelector::Container { name, socket } => {
            docker::restart(socket, name, host.stop_timeout).await
        }
        TargetSelector::Pid(_) => Err(ActionError::Unavailable(
            "a target chosen by pid cannot be followed across a restart; choose it by \
             command, pidfile, systemd_unit or container"
                .to_owned(),
        )),
        TargetSelector::Cgroup(_) => Err(ActionError::Unavailable(
            "a target chosen by cgroup is restarted by whatever manages that cgroup; choose it \
             by systemd_unit or container"
                .to_owned(),
        )),
        TargetSelector::Command(_) | TargetSelector::PidFile(_) => restart_process(host).await,
    }
}

/// Stops the plain process (if it still runs) and starts `start_command`; read back: the
/// tracker finds a new running process.
async fn restart_process(host: &Host) -> Result<Effect, ActionError> {
    let Some((program, args)) = host.start_command.split_first() else {
        return Err(ActionError::Unavailable(
            "a plain process is restarted with repair.start_command, which is not set".to_owned(),
        ));
    };
    let old = host.running_pid();
    let before = match old {
        Some(pid) => {
            stop(pid, host.stop_timeout).await?;
            format!("process {pid} stopped")
        }
        None => "not running".to_owned(),
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&host.start_log)
        .map_err(|source| ActionError::Io {
            subject: host.start_log.display().to_string(),
            source,
        })?;
    let err_log = log.try_clone().map_err(|source| ActionError::Io {
        subject: host.start_log.display().to_string(),
        source,
    })?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        // Its own process group: a signal to the daemon's group (Ctrl-C) does not reach it.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| ActionError::Io {
            subject: format!("repair.start_command {program}"),
            source,
        })?;
    let started = child.id();
    // Reaped here when it ends; the tracker sees the exit through its own probes.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let deadline = tokio::time::Instant::now() + host.restart_timeout;
    loop {
        if let Some(pid) = host.running_pid().filter(|pid| Some(*pid) != old) {
            return Ok(Effect {
                action: "process.restart",
                subject: host.selector.to_string(),
                before,
                after: format!("process {pid} running"),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ActionError::NotApplied {
                subject: host.selector.to_string(),
                wanted: "a new running target process".to_owned(),
                found: format!(
                    "none after {} ms (started process {})",
                    host.restart_timeout.as_millis(),
                    started.map_or_else(|| "?".to_owned(), |p| p.to_string())
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, and SIGKILL if the process has not ended within `grace`.
async fn stop(pid: u32, grace: Duration) -> Result<(), ActionError> {
    let Some(started) = signal::start_time(pid) else {
        return Ok(());
    };
    // `signal::send` reads a terminating signal's effect back as `exited` once the pidfd says so.
    let gone = |effect: &Effect| effect.after == "exited";
    match signal::send(pid, started, Signal::SIGTERM, grace).await {
        Ok(effect) if gone(&effect) => return Ok(()),
        Ok(_) | Err(ActionError::NotApplied { .. }) => {}
        Err(err) => return Err(err),
    }
    let effect = signal::send(pid, started, Signal::SIGKILL, Duration::from_secs(5)).await?;
    if gone(&effect) {
        Ok(())
    } else {
        Err(ActionError::NotApplied {
            subject: format!("process {pid}"),
            wanted: "exited after SIGKILL".to_owned(),
            found: effect.after,
        })
    }
}

async fn raise_memory_limit(host: &Host) -> Result<Effect, ActionError> {
    let step = |limit: u64| {
        let raised = u128::from(limit) * u128::from(100 + host.memory_step_percent) / 100;
        u64::try_from(raised).unwrap_or(u64::MAX)
    };
    match &host.selector {
        TargetSelector::SystemdUnit { unit, bus } => {
            let current = systemd::memory_max(unit, bus).await?;
            let Some(limit) = current else {
                return Err(ActionError::Unavailable(format!(
                    "unit {unit} has no memory limit to raise"
                )));
            };
            systemd::set_limits(unit, bus, Some(Some(step(limit))), None).await
        }
        TargetSelector::Container { name, socket } => {
            let limit = docker::inspect(socket, name).await?.host_config.memory;
            if limit <= 0 {
                return Err(ActionError::Unavailable(format!(
                    "container {name} has no memory limit to raise"
                )));
            }
            let wanted = i64::try_from(step(limit.unsigned_abs())).unwrap_or(i64::MAX);
            docker::update(socket, name, Some(wanted), None).await
        }
        _ => {
            let pid = host
                .running_pid()
                .ok_or_else(|| ActionError::Unavailable("the target is not running".to_owned()))?;
            let proc_cgroup =
                std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|source| {
                    ActionError::Io {
                        subject: format!("process {pid}"),
                        source,
                    }
                })?;
            let locations = crate::probes::cgroup::locate(&proc_cgroup);
            let Some((version, dir)) = crate::probes::cgroup::controller_dir(&locations, "memory")
            else {
                return Err(ActionError::Unavailable(format!(
                    "process {pid} is in no cgroup with a memory controller"
                )));
            };
            let Some((_, Some(limit))) = crate::probes::cgroup::read_memory(version, &dir) else {
                return Err(ActionError::Unavailable(format!(
                    "cgroup {} has no memory limit to raise",
                    dir.display()
                )));
            };
            cgroup::set_memory_limit(version, &dir, Some(step(limit)))
        }
    }
}

/// Applies `action` to the target's sessions `selector` picks; `None`: cancel an active one's
/// statement, terminate one idle in its transaction.
async fn sessions(
    host: &Host,
    selector: Selector,
    action: Option<SessionAction>,
) -> Result<Vec<Effect>, ActionError> {
    let client = database(host).await?;
    let outcomes = postgres::act(&client, &host.sessions, selector, |session| {
        action.unwrap_or(if session.state == "active" {
            SessionAction::Cancel
        } else {
            SessionAction::Terminate
        })
    })
    .await?;
    if outcomes.is_empty() {
        return Err(ActionError::NotApplied {
            subject: "the target's sessions".to_owned(),
            wanted: format!("{selector:?}"),
            found: "no session matched".to_owned(),
        });
    }
    let mut effects = Vec::with_capacity(outcomes.len());
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(effect) => effects.push(effect),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) if effects.is_empty() => Err(err),
        _ => Ok(effects),
    }
}
