//! The container engine: restart a container, change its memory and CPU limits, read why it
//! last stopped — through the Docker Engine API on its unix socket, each read back by inspect.

use std::{path::Path, time::Duration};

use serde::Deserialize;

use super::{ActionError, Effect};
use crate::target::docker::request;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    pub running: bool,
    pub pid: u32,
    #[serde(rename = "OOMKilled")]
    pub oom_killed: bool,
    pub exit_code: i64,
    pub started_at: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HostLimits {
    /// Bytes; 0 is no limit.
    pub memory: i64,
    /// CPUs in units of 10⁻⁹; 0 is no limit.
    pub nano_cpus: i64,
}

/// What inspect says about a container, as far as the actuators care.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Inspect {
    pub state: ContainerState,
    pub host_config: HostLimits,
}

fn fail(name: &str, reason: String) -> ActionError {
    ActionError::Io {
        subject: format!("container {name}"),
        source: std::io::Error::other(reason),
    }
}

/// Inspects container `name`.
pub async fn inspect(socket: &Path, name: &str) -> Result<Inspect, ActionError> {
    let (status, body) = request(
        socket,
        http::Method::GET,
        &format!("/containers/{name}/json"),
        None,
    )
    .await
    .map_err(|e| fail(name, e))?;
    if !status.is_success() {
        return Err(fail(
            name,
            format!(
                "inspect answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| fail(name, format!("inspect response: {e}")))
}

fn describe(state: &ContainerState) -> String {
    if state.running {
        format!("running as pid {} since {}", state.pid, state.started_at)
    } else {
        format!(
            "stopped (exit code {}{})",
            state.exit_code,
            if state.oom_killed { ", OOM-killed" } else { "" }
        )
    }
}

/// Restarts container `name`, giving its process `stop_timeout` to stop before the engine
/// kills it; read back: running again with a new start time.
pub async fn restart(
    socket: &Path,
    name: &str,
    stop_timeout: Duration,
) -> Result<Effect, ActionError> {
    let before = inspect(socket, name).await?;
    let (status, body) = request(
        socket,
        http::Method::POST,
        &format!("/containers/{name}/restart?t={}", stop_timeout.as_secs()),
        None,
    )
    .await
    .map_err(|e| fail(name, e))?;
    if !status.is_success() {
        return Err(ActionError::Refused {
            subject: format!("container {name}"),
            wanted: "restart".to_owned(),
            source: std::io::Error::other(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body).trim()
            )),
        });
    }
    let after = inspect(socket, name).await?;
    if !after.state.running || after.state.started_at == before.state.started_at {
        return Err(ActionError::NotApplied {
            subject: format!("container {name}"),
            wanted: "running with a new start time".to_owned(),
            found: describe(&after.state),
        });
    }
    Ok(Effect {
        action: "docker.restart",
        subject: format!("container {name}"),
        before: describe(&before.state),
        after: describe(&after.state),
    })
}

fn describe_limits(limits: &HostLimits) -> String {
    let memory = if limits.memory == 0 {
        "memory unlimited".to_owned()
    } else {
        format!("memory {} bytes", limits.memory)
    };
    let cpus = if limits.nano_cpus == 0 {
        "CPU unlimited".to_owned()
    } else {
        format!("{:.2} CPUs", limits.nano_cpus as f64 / 1e9)
    };
    format!("{memory}, {cpus}")
}

/// Changes container `name`'s memory limit (bytes) and CPU limit (in 10⁻⁹ CPUs), each when
/// given; read back from inspect.
pub async fn update(
    socket: &Path,
    name: &str,
    memory: Option<i64>,
    nano_cpus: Option<i64>,
) -> Result<Effect, ActionError> {
    let before = inspect(socket, name).await?;
    let mut body = serde_json::Map::new();
    if let Some(bytes) = memory {
        body.insert("Memory".into(), bytes.into());
        // Swap follows memory (the engine refuses a memory limit above an older swap limit).
        body.insert("MemorySwap".into(), (-1).into());
    }
    if let Some(nanos) = nano_cpus {
        body.insert("NanoCpus".into(), nanos.into());
    }
    let json = serde_json::to_vec(&body).map_err(|e| fail(name, e.to_string()))?;
    let (status, answer) = request(
        socket,
        http::Method::POST,
        &format!("/containers/{name}/update"),
        Some(json),
    )
    .await
    .map_err(|e| fail(name, e))?;
    let wanted = describe_limits(&HostLimits {
        memory: memory.unwrap_or(before.host_config.memory),
        nano_cpus: nano_cpus.unwrap_or(before.host_config.nano_cpus),
    });
    if !status.is_success() {
        return Err(ActionError::Refused {
            subject: format!("container {name}"),
            wanted,
            source: std::io::Error::other(format!(
                "{status}: {}",
                String::from_utf8_lossy(&answer).trim()
            )),
        });
    }
    let after = inspect(socket, name).await?;
    let found = describe_limits(&after.host_config);
    if found != wanted {
        return Err(ActionError::NotApplied {
            subject: format!("container {name}"),
            wanted,
            found,
        });
    }
    Ok(Effect {
        action: "docker.update",
        subject: format!("container {name}"),
        before: describe_limits(&before.host_config),
        after: found,
    })
}
