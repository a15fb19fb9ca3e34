//! The bus: the one way probes and agents talk to each other.
//!
//! Owns: the closed [`Event`] enum (a new message kind is a new variant, so `match` shows
//! every consumer) and a bounded broadcast channel. Must not: block a publisher. A subscriber
//! that falls behind loses the oldest events, and the loss is counted
//! (`selfheal_bus_lagged_events_total`).

use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::telemetry::Metrics;

/// How a process ended, decoded from a wait(2) status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitStatus {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
        core_dumped: bool,
    },
    /// The exit was seen but its status could not be read (procfs fallback).
    Unknown,
}

impl ExitStatus {
    /// Decodes a raw wait status as the kernel stores it in `task_struct.exit_code`.
    pub fn from_wait_status(status: u32) -> Self {
        if status == u32::MAX {
            return Self::Unknown;
        }
        let signal = status & 0x7f;
        if signal == 0 {
            Self::Exited {
                code: ((status >> 8) & 0xff) as i32,
            }
        } else {
            Self::Signaled {
                signal: signal as i32,
                core_dumped: status & 0x80 != 0,
            }
        }
    }

    /// A bounded label for metrics: `exited`, `unknown` or the signal name.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Exited { .. } => "exited",
            Self::Unknown => "unknown",
            Self::Signaled { signal, .. } => signal_name(*signal),
        }
    }
}

/// The conventional name of a signal number (`SIGKILL`), or `SIGOTHER` for the rest.
pub fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal).map_or("SIGOTHER", nix::sys::signal::Signal::as_str)
}

/// Which probe saw something first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Ebpf,
    Procfs,
}

/// What the daemon knows about the target right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Not resolved yet.
    Unknown,
    Running,
    /// The process is gone and no new one has been found yet.
    Down,
}

/// One sample of the target's process and cgroup, taken from procfs and cgroupfs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessSample {
    pub pid: u32,
    /// 100 means one full core.
    pub cpu_percent: f64,
    pub rss_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    /// The soft `RLIMIT_NOFILE` (`Max open files`), when it has one.
    pub fd_limit: Option<u64>,
    /// One letter as in `ps` (`R`, `S`, `D`, `Z`, ...).
    pub state: String,
    pub cgroup_memory_bytes: Option<u64>,
    pub cgroup_memory_limit_bytes: Option<u64>,
    pub cgroup_cpu_throttled_periods: Option<u64>,
}

/// One sample of the host.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostSample {
    pub cpu_percent: f64,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
}

/// TCP activity of the target over one sampling interval (seen by eBPF).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TcpSummary {
    pub connects: u64,
    pub connect_failures: u64,
    pub accepts: u64,
    pub closes: u64,
    pub resets: u64,
    /// Slowest connect of the interval, in milliseconds.
    pub max_connect_ms: f64,
}

/// An integration check's status, as the seeds define them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// It answered as expected, in time.
    Healthy,
    /// It answered as expected but slowly (over its `slow_ms`), or a database near its
    /// connection limit.
    Degraded,
    /// It did not answer, or answered wrong.
    Down,
    /// Never run, disabled, or misconfigured (missing credentials).
    Unknown,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Down => "down",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "healthy" => Self::Healthy,
            "degraded" => Self::Degraded,
            "down" => Self::Down,
            "unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// Healthy or degraded: the dependency works.
    pub fn is_up(self) -> bool {
        matches!(self, Self::Healthy | Self::Degraded)
    }
}

/// Why a check that worked is degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Degraded {
    /// Slower than its `slow_ms`.
    Slow,
    /// A PostgreSQL server with connections in use over `max_connections_percent`.
    Connections,
}

/// One run of an integration check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub check: String,
    pub kind: &'static str,
    pub platform: Option<String>,
    pub status: CheckStatus,
    pub degraded: Option<Degraded>,
    /// Down runs in a row, this one included (0 after a run that worked).
    pub consecutive_failures: u32,
    /// The check's alert threshold (`alert_after_failures`).
    pub alert_after_failures: u32,
    pub response_ms: Option<f64>,
    /// Why it is down or degraded.
    pub message: Option<String>,
    /// A PostgreSQL check's session figures, when it got them.
    pub postgres: Option<crate::checks::probe::PostgresFigures>,
}

/// The diagnostic agent's explanation of a firing alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnosis {
    /// Its row in the state DB, once written.
    pub id: Option<i64>,
    /// The alert it explains: its rule and labels.
    pub rule: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// A stable name for the cause (`target.crashed`, `db.unreachable`, …).
    pub signature: String,
    /// The root cause, in one sentence.
    pub summary: String,
    /// 0 to 1.
    pub confidence: f64,
    /// What was seen: which figure moved, which check failed, which alert fires alongside.
    pub evidence: Vec<String>,
    /// The playbook's candidate actions for the signature, in the playbook's order (the
    /// repair agent reorders them by what has worked).
    pub actions: Vec<String>,
    /// A dependency of the target that is down now (a check's name): the target's own
    /// process must not be restarted, signalled or resized for this.
    pub dependency_down: Option<String>,
    /// The tables of the query the diagnosis blames (what `analyze` refreshes).
    pub tables: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// Everything that travels on the bus.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A target process was found: at startup, or after a restart (`restarts` counts those).
    TargetStarted {
        pid: u32,
        restarts: u64,
        at: SystemTime,
    },
    /// The target's main process ended.
    TargetExited {
        pid: u32,
        status: ExitStatus,
        source: Source,
        /// When the kernel recorded the exit (`CLOCK_MONOTONIC`, ns), when known.
        exited_monotonic_ns: Option<u64>,
        /// When the daemon learned of it (`CLOCK_MONOTONIC`, ns).
        observed_monotonic_ns: u64,
        at: SystemTime,
    },
    ProcessSample(ProcessSample),
    HostSample(HostSample),
    TcpSummary(TcpSummary),
    /// An integration check ran.
    Check(CheckReport),
    /// The monitor's view of overall health changed.
    Health {
        status: HealthStatus,
        reason: String,
    },
    /// A rule's condition holds (`firing`) or has cleared. The alert manager keys alerts by
    /// rule and labels; a rule may say "cleared" for a key that is not firing (after a restart
    /// it cannot know), which changes nothing.
    Alert {
        rule: String,
        /// Bounded labels that tell alerts of one rule apart (`platform`, `check`).
        labels: std::collections::BTreeMap<String, String>,
        severity: Severity,
        firing: bool,
        message: String,
    },
    /// The alert manager created, acknowledged or resolved an alert, or its rule changed its
    /// severity (for live views: the rules' `Alert` signals repeat while a condition holds;
    /// this is one per change).
    AlertChanged {
        id: i64,
        key: String,
        rule: String,
        /// `firing`, `acknowledged` or `resolved`.
        state: &'static str,
        severity: Severity,
        message: String,
        /// Who changed it: `rule` for the rule's own changes, else the operator.
        by: String,
    },
    /// The diagnostic agent's explanation of an alert.
    Diagnosis(Diagnosis),
    /// What the repair agent did or would do about a diagnosis: one event per decision, and
    /// one more when an action that ran has been verified (or not).
    Repair {
        signature: String,
        action: String,
        outcome: RepairOutcome,
        detail: String,
        /// The row in the repairs log, when it was written.
        repair_id: Option<i64>,
        /// From the action's start to the verified recovery (`Succeeded` only).
        recover_ms: Option<u64>,
    },
    /// A forecast that a resource will cross its threshold.
    Prediction {
        resource: String,
        threshold: f64,
        eta_seconds: f64,
        detail: String,
    },
    /// Something suspicious about the target's behaviour.
    Security {
        kind: String,
        detail: String,
    },
    /// A tuning suggestion.
    Optimization {
        area: String,
        suggestion: String,
    },
    /// An agent task failed and will be restarted.
    AgentCrashed {
        agent: String,
        error: String,
        restart_in_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairOutcome {
    /// Dry-run (self-healing off, or the mode says so): what would have run.
    Proposed,
    /// The action ran; its verification has started.
    Started,
    /// The action ran and the recovery was verified.
    Succeeded,
    /// The action failed, or ran and the recovery was not seen in time.
    Failed,
    /// The action cannot be carried out on this target as configured (a restart without
    /// `repair.start_command`, a session action without the database's URL): logged as
    /// failed, but not learned as the action not working.
    Unavailable,
    /// The safety gate held it back.
    Skipped,
}

impl RepairOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proposed => "proposed",
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Unavailable => "unavailable",
            Self::Skipped => "skipped",
        }
    }
}

impl Event {
    /// A short stable name, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TargetStarted { .. } => "target_started",
            Self::TargetExited { .. } => "target_exited",
            Self::ProcessSample(_) => "process_sample",
            Self::HostSample(_) => "host_sample",
            Self::TcpSummary(_) => "tcp_summary",
            Self::Check(_) => "check",
            Self::Health { .. } => "health",
            Self::Alert { .. } => "alert",
            Self::AlertChanged { .. } => "alert_changed",
            Self::Diagnosis(_) => "diagnosis",
            Self::Repair { .. } => "repair",
            Self::Prediction { .. } => "prediction",
            Self::Security { .. } => "security",
            Self::Optimization { .. } => "optimization",
            Self::AgentCrashed { .. } => "agent_crashed",
        }
    }
}

/// Capacity of the broadcast ring. Slow subscribers lose the oldest events beyond it.
const CAPACITY: usize = 4096;

#[derive(Clone)]
pub struct Bus {
    /// Each event with when it was published (unix ms).
    sender: broadcast::Sender<(i64, Event)>,
    metrics: Metrics,
}

impl Bus {
    pub fn new(metrics: Metrics) -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self { sender, metrics }
    }

    /// Publishes without ever blocking; with no subscriber the event is simply dropped.
    pub fn publish(&self, event: Event) {
        self.metrics
            .bus_events
            .get_or_create(&crate::telemetry::KindLabel { kind: event.kind() })
            .inc();
        let at = crate::store::unix_ms(SystemTime::now());
        let _ = self.sender.send((at, event));
    }

    pub fn subscribe(&self) -> Subscriber {
        Subscriber {
            receiver: self.sender.subscribe(),
            metrics: self.metrics.clone(),
        }
    }
}

impl Bus {
    /// A receiver of the events with when they were published (unix ms) that reports its
    /// own lag (the API's event streams tell their clients); the caller counts what it loses
    /// in `selfheal_bus_lagged_events_total`.
    pub fn subscribe_raw(&self) -> broadcast::Receiver<(i64, Event)> {
        self.sender.subscribe()
    }
}

pub struct Subscriber {
    receiver: broadcast::Receiver<(i64, Event)>,
    metrics: Metrics,
}

impl Subscriber {
    /// The next event; `None` once the bus is gone. Lost events are counted, not fatal.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            match self.receiver.recv().await {
                Ok((_, event)) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    self.metrics.bus_lagged.inc_by(lost);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(
            ExitStatus::from_wait_status(9),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(6 | 0x80),
            ExitStatus::Signaled {
                signal: 6,
                core_dumped: true
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(3 << 8),
            ExitStatus::Exited { code: 3 }
        );
        assert_eq!(
            ExitStatus::from_wait_status(0),
            ExitStatus::Exited { code: 0 }
        );
        assert_eq!(ExitStatus::from_wait_status(u32::MAX), ExitStatus::Unknown);
        assert_eq!(ExitStatus::from_wait_status(9).reason(), "SIGKILL");
        assert_eq!(ExitStatus::from_wait_status(200).reason(), "SIGOTHER");
    }

    #[tokio::test]
    async fn a_slow_subscriber_loses_old_events_and_counts_them() {
        let metrics = Metrics::new();
        let bus = Bus::new(metrics.clone());
        let mut slow = bus.subscribe();
        for i in 0..(CAPACITY as u64 + 10) {
            bus.publish(Event::Security {
                kind: "test".into(),
                detail: i.to_string(),
            });
        }
        let Some(Event::Security { detail, .. }) = slow.recv().await else {
            panic!("an event")
        };
        assert_eq!(detail, "10");
        assert_eq!(metrics.bus_lagged.get(), 10);
    }
}
