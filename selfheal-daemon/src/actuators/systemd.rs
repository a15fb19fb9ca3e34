//! systemd over D-Bus: restart a unit, signal its processes, change its memory and CPU limits
//! at runtime — each read back from the unit's properties.

use std::time::{Duration, Instant};

use zbus::{proxy::CacheProperties, zvariant::Value, Connection};

use super::{ActionError, Effect};
use crate::target::systemd::{connect, ManagerProxy, ServiceProxy};

/// systemd's "no limit" for both properties.
const INFINITY: u64 = u64::MAX;

fn dbus(unit: &str) -> impl Fn(zbus::Error) -> ActionError + '_ {
    move |err| ActionError::Io {
        subject: format!("unit {unit}"),
        source: std::io::Error::other(err.to_string()),
    }
}

async fn service<'c>(
    connection: &'c Connection,
    unit: &str,
) -> Result<(ManagerProxy<'c>, ServiceProxy<'c>), ActionError> {
    let manager = ManagerProxy::new(connection).await.map_err(dbus(unit))?;
    let path = manager.load_unit(unit).await.map_err(dbus(unit))?;
    let service = ServiceProxy::builder(connection)
        .path(path)
        .map_err(dbus(unit))?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(dbus(unit))?;
    Ok((manager, service))
}

/// Restarts `unit` on `bus` (`system`, `user` or an address) and waits up to `within` for a
/// new main process.
pub async fn restart(unit: &str, bus: &str, within: Duration) -> Result<Effect, ActionError> {
    let connection = connect(bus).await.map_err(dbus(unit))?;
    let (manager, service) = service(&connection, unit).await?;
    let before = service.main_pid().await.map_err(dbus(unit))?;
    manager
        .restart_unit(unit, "replace")
        .await
        .map_err(|err| ActionError::Refused {
            subject: format!("unit {unit}"),
            wanted: "RestartUnit".to_owned(),
            source: std::io::Error::other(err.to_string()),
        })?;
    let deadline = Instant::now() + within;
    loop {
        let pid = service.main_pid().await.map_err(dbus(unit))?;
        if pid != 0 && pid != before {
            return Ok(Effect {
                action: "systemd.restart",
                subject: format!("unit {unit}"),
                before: format!("main pid {before}"),
                after: format!("main pid {pid}"),
            });
        }
        if Instant::now() >= deadline {
            return Err(ActionError::NotApplied {
                subject: format!("unit {unit}"),
                wanted: "a new main process".to_owned(),
                found: format!("main pid {pid} after {} ms", within.as_millis()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `signal` to `unit`'s main process (`KillUnit` with `whom = main`).
pub async fn kill_main(unit: &str, bus: &str, signal: i32) -> Result<Effect, ActionError> {
    let connection = connect(bus).await.map_err(dbus(unit))?;
    let (manager, service) = service(&connection, unit).await?;
    let before = service.main_pid().await.map_err(dbus(unit))?;
    manager
        .kill_unit(unit, "main", signal)
        .await
        .map_err(|err| ActionError::Refused {
            subject: format!("unit {unit}"),
            wanted: format!("KillUnit signal {signal}"),
            source: std::io::Error::other(err.to_string()),
        })?;
    let after = service.main_pid().await.map_err(dbus(unit))?;
    Ok(Effect {
        action: "systemd.kill",
        subject: format!("unit {unit} (signal {signal})"),
        before: format!("main pid {before}"),
        after: format!("main pid {after}"),
    })
}

fn describe(memory_max: u64, cpu_quota: u64) -> String {
    let memory = if memory_max == INFINITY {
        "MemoryMax=infinity".to_owned()
    } else {
        format!("MemoryMax={memory_max}")
    };
    let cpu = if cpu_quota == INFINITY {
        "CPUQuota=infinity".to_owned()
    } else {
        format!("CPUQuota={}%", cpu_quota / 10_000)
    };
    format!("{memory} {cpu}")
}

/// The kernel's page: a memory limit is kept in whole pages.
const PAGE: u64 = 4096;

/// The memory cgroup of process `pid` and its limit (`None`: unlimited), when it has one.
fn kernel_memory_limit(pid: u32) -> Option<(std::path::PathBuf, Option<u64>)> {
    if pid == 0 {
        return None;
    }
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let locations = crate::probes::cgroup::locate(&proc_cgroup);
    let (version, dir) = crate::probes::cgroup::controller_dir(&locations, "memory")?;
    let (_, limit) = crate::probes::cgroup::read_memory(version, &dir)?;
    Some((dir, limit))
}

/// `unit`'s `MemoryMax` in bytes, `None` when it has none.
pub async fn memory_max(unit: &str, bus: &str) -> Result<Option<u64>, ActionError> {
    let connection = connect(bus).await.map_err(dbus(unit))?;
    let (_, service) = service(&connection, unit).await?;
    let max = service.memory_max().await.map_err(dbus(unit))?;
    Ok((max != INFINITY).then_some(max))
}

/// Sets `unit`'s `MemoryMax` (bytes) and CPU quota (µs of CPU per second: 500 000 is half a
/// CPU) at runtime, each when given (`Some(None)`: no limit); read back from the unit, and a
/// memory limit also from the kernel's file of the unit's cgroup.
pub async fn set_limits(
    unit: &str,
    bus: &str,
    memory_max: Option<Option<u64>>,
    cpu_quota_per_sec_usec: Option<Option<u64>>,
) -> Result<Effect, ActionError> {
    let connection = connect(bus).await.map_err(dbus(unit))?;
    let (manager, service) = service(&connection, unit).await?;
    let read = || async {
        Ok::<_, ActionError>((
            service.memory_max().await.map_err(dbus(unit))?,
            service.cpu_quota_per_sec_usec().await.map_err(dbus(unit))?,
        ))
    };
    let before = read().await?;
    let mut properties = Vec::new();
    if let Some(memory) = memory_max {
        properties.push(("MemoryMax", Value::U64(memory.unwrap_or(INFINITY))));
    }
    if let Some(quota) = cpu_quota_per_sec_usec {
        properties.push(("CPUQuotaPerSecUSec", Value::U64(quota.unwrap_or(INFINITY))));
    }
    let wanted = (
        memory_max.map_or(before.0, |m| m.unwrap_or(INFINITY)),
        cpu_quota_per_sec_usec.map_or(before.1, |q| q.unwrap_or(INFINITY)),
    );
    manager
        .set_unit_properties(unit, true, &properties)
        .await
        .map_err(|err| ActionError::Refused {
            subject: format!("unit {unit}"),
            wanted: describe(wanted.0, wanted.1),
            source: std::io::Error::other(err.to_string()),
        })?;
    let after = read().await?;
    if after != wanted {
        return Err(ActionError::NotApplied {
            subject: format!("unit {unit}"),
            wanted: describe(wanted.0, wanted.1),
            found: describe(after.0, after.1),
        });
    }
    // systemd reports a MemoryMax the kernel refused (under the usage on v1) as set: the
    // kernel's own file is what counts.
    if memory_max.is_some() {
        let pid = service.main_pid().await.map_err(dbus(unit))?;
        if let Some((dir, found)) = kernel_memory_limit(pid) {
            let limit = (wanted.0 != INFINITY).then_some(wanted.0);
            let applied = match (limit, found) {
                (None, None) => true,
                // The kernel keeps whole pages.
                (Some(limit), Some(found)) => limit.abs_diff(found) < PAGE,
                _ => false,
            };
            if !applied {
                return Err(ActionError::NotApplied {
                    subject: format!("unit {unit} (cgroup {})", dir.display()),
                    wanted: describe(wanted.0, wanted.1),
                    found: format!(
                        "the kernel's limit is {}",
                        found.map_or_else(|| "none".to_owned(), |f| f.to_string())
                    ),
                });
            }
        }
    }
    Ok(Effect {
        action: "systemd.set_limits",
        subject: format!("unit {unit}"),
        before: describe(before.0, before.1),
        after: describe(after.0, after.1),
    })
}
