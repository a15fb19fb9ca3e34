//! Actuators: the only code that changes the host or the target. Each action reads its effect
//! back and reports what actually changed ([`Effect`]); an action whose effect cannot be seen
//! is an error, never a success. Whether an action may run at all (mode, cooldown, budget) is
//! the safety gate's decision, not the actuator's; an actuator only refuses what would be
//! unsafe whatever the gate said (a memory limit under the target's usage, a superuser's
//! session, a signal to a process that is not the one decided on).

pub mod action;
pub mod cgroup;
pub mod docker;
pub mod gate;
pub mod hook;
pub mod postgres;
pub mod signal;
pub mod systemd;

use serde::Serialize;

/// What an action changed, read back after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effect {
    /// The action, e.g. `cgroup.memory_limit`, `signal`, `postgres.cancel`.
    pub action: &'static str,
    /// What it acted on: a cgroup directory, a pid, a session.
    pub subject: String,
    /// The state before and after, as the kernel or the database reports it.
    pub before: String,
    pub after: String,
}

/// Why an action did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("refused before acting: {0}")]
    Unsafe(String),
    #[error("{subject}: {source}")]
    Io {
        subject: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{subject}: the kernel refused {wanted:?}: {source}")]
    Refused {
        subject: String,
        wanted: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{subject}: asked for {wanted:?}, reads back {found:?}")]
    NotApplied {
        subject: String,
        wanted: String,
        found: String,
    },
    /// The action cannot be carried out on this target as configured.
    #[error("not available: {0}")]
    Unavailable(String),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
}
