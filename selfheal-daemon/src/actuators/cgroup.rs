//! Memory and CPU limits of a cgroup, v1 or v2, written directly and read back.
//!
//! The kernel keeps memory limits in whole pages, so a limit reads back rounded down to the
//! page size; anything else read back is a limit that did not take. A memory limit under what
//! the cgroup already uses is refused before writing: v2 would reclaim and then OOM-kill the
//! target to meet it, which is the outage the repair is meant to prevent.

use std::path::Path;

use super::{ActionError, Effect};
use crate::probes::cgroup::{parse_limit, read_memory, Version};

/// v1's "no limit" for `memory.limit_in_bytes` (`PAGE_COUNTER_MAX` in bytes) reads back as a
/// huge number; `parse_limit` maps it and v2's `max` to `None`.
const V1_UNLIMITED: &str = "-1";

/// Headroom a new memory limit must leave over the cgroup's current usage.
const MIN_HEADROOM: f64 = 1.1;

/// CPU bandwidth: `quota_us` of CPU time per `period_us` (100 000 µs by default), or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

fn io(subject: &Path) -> impl FnOnce(std::io::Error) -> ActionError + '_ {
    move |source| ActionError::Io {
        subject: subject.display().to_string(),
        source,
    }
}

fn read(path: &Path) -> Result<String, ActionError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(io(path))
}

fn write(path: &Path, value: &str) -> Result<(), ActionError> {
    std::fs::write(path, value).map_err(|source| ActionError::Refused {
        subject: path.display().to_string(),
        wanted: value.to_owned(),
        source,
    })
}

fn describe_memory(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_owned(), |bytes| format!("{bytes} bytes"))
}

/// Sets the memory limit of the cgroup at `dir` (`None`: no limit) and reads it back.
pub fn set_memory_limit(
    version: Version,
    dir: &Path,
    limit: Option<u64>,
) -> Result<Effect, ActionError> {
    let file = dir.join(match version {
        Version::V1 => "memory.limit_in_bytes",
        Version::V2 => "memory.max",
    });
    let (usage, before) = read_memory(version, dir).ok_or_else(|| {
        ActionError::Unsafe(format!(
            "{} cannot be read: not a memory cgroup",
            dir.display()
        ))
    })?;
    if let Some(bytes) = limit {
        if (bytes as f64) < usage as f64 * MIN_HEADROOM {
            return Err(ActionError::Unsafe(format!(
                "a memory limit of {bytes} bytes is under the cgroup's usage of {usage} bytes \
                 plus 10 %: the kernel would reclaim and OOM-kill to meet it"
            )));
        }
    }
    let wanted = match (limit, version) {
        (Some(bytes), _) => bytes.to_string(),
        (None, Version::V1) => V1_UNLIMITED.to_owned(),
        (None, Version::V2) => "max".to_owned(),
    };
    write(&file, &wanted)?;
    let found = read(&file)?;
    let after = parse_limit(&found);
    let page = procfs::page_size();
    let expected = limit.map(|bytes| bytes / page * page);
    if after != expected {
        return Err(ActionError::NotApplied {
            subject: file.display().to_string(),
            wanted,
            found,
        });
    }
    Ok(Effect {
        action: "cgroup.memory_limit",
        subject: dir.display().to_string(),
        before: describe_memory(before),
        after: describe_memory(after),
    })
}

fn describe_cpu(quota: Option<CpuQuota>) -> String {
    quota.map_or_else(
        || "unlimited".to_owned(),
        |q| format!("{} µs per {} µs", q.quota_us, q.period_us),
    )
}

/// Parses v2's `cpu.max` (`max 100000` or `50000 100000`).
pub fn parse_cpu_max(text: &str) -> Option<Option<CpuQuota>> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period_us = fields.next()?.parse().ok()?;
    if quota == "max" {
        return Some(None);
    }
    Some(Some(CpuQuota {
        quota_us: quota.parse().ok()?,
        period_us,
    }))
}

/// Reads the CPU quota of the cgroup at `dir`.
pub fn read_cpu_quota(version: Version, dir: &Path) -> Result<Option<CpuQuota>, ActionError> {
    match version {
        Version::V2 => {
            let path = dir.join("cpu.max");
            let text = read(&path)?;
            parse_cpu_max(&text).ok_or_else(|| ActionError::NotApplied {
                subject: path.display().to_string(),
                wanted: "a quota and a period".to_owned(),
                found: text,
            })
        }
        Version::V1 => {
            let quota_path = dir.join("cpu.cfs_quota_us");
            let quota = read(&quota_path)?;
            let period = read(&dir.join("cpu.cfs_period_us"))?;
            let unreadable = || ActionError::NotApplied {
                subject: quota_path.display().to_string(),
                wanted: "a quota and a period".to_owned(),
                found: format!("{quota} / {period}"),
            };
            let period_us: u64 = period.parse().map_err(|_| unreadable())?;
            let quota: i64 = quota.parse().map_err(|_| unreadable())?;
            Ok(u64::try_from(quota).ok().map(|quota_us| CpuQuota {
                quota_us,
                period_us,
            }))
        }
    }
}

/// Sets the CPU quota of the cgroup at `dir` (`None`: no limit) and reads it back.
pub fn set_cpu_quota(
    version: Version,
    dir: &Path,
    quota: Option<CpuQuota>,
) -> Result<Effect, ActionError> {
    let before = read_cpu_quota(version, dir)?;
    match version {
        Version::V2 => {
            let period = quota.map_or(100_000, |q| q.period_us);
            let value = quota.map_or_else(
                || format!("max {period}"),
                |q| format!("{} {}", q.quota_us, q.period_us),
            );
            write(&dir.join("cpu.max"), &value)?;
        }
        Version::V1 => {
            // The period first, so that the quota is checked against the period it goes with.
            if let Some(q) = quota {
                write(&dir.join("cpu.cfs_period_us"), &q.period_us.to_string())?;
            }
            let value = quota.map_or_else(|| "-1".to_owned(), |q| q.quota_us.to_string());
            write(&dir.join("cpu.cfs_quota_us"), &value)?;
        }
    }
    let after = read_cpu_quota(version, dir)?;
    let applied = match (quota, after) {
        (None, None) => true,
        (Some(wanted), Some(found)) => wanted == found,
        _ => false,
    };
    if !applied {
        return Err(ActionError::NotApplied {
            subject: dir.display().to_string(),
            wanted: describe_cpu(quota),
            found: describe_cpu(after),
        });
    }
    Ok(Effect {
        action: "cgroup.cpu_quota",
        subject: dir.display().to_string(),
        before: describe_cpu(before),
        after: describe_cpu(after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_parses() {
        assert_eq!(parse_cpu_max("max 100000"), Some(None));
        assert_eq!(
            parse_cpu_max("50000 100000\n"),
            Some(Some(CpuQuota {
                quota_us: 50_000,
                period_us: 100_000
            }))
        );
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cpu_max("12 x"), None);
    }

    /// A directory shaped like a v2 cgroup (plain files: the kernel's refusals are exercised by
    /// the end-to-end test on a real cgroup).
    fn fake_v2(usage: u64, max: &str, cpu_max: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("memory.current"), usage.to_string()).expect("write");
        std::fs::write(dir.path().join("memory.max"), max).expect("write");
        std::fs::write(dir.path().join("cpu.max"), cpu_max).expect("write");
        dir
    }

    #[test]
    fn a_limit_under_usage_is_refused_before_anything_is_written() {
        let dir = fake_v2(100 << 20, "max", "max 100000");
        let err = set_memory_limit(Version::V2, dir.path(), Some(105 << 20))
            .expect_err("under usage + 10 %");
        assert!(matches!(err, ActionError::Unsafe(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).expect("read"),
            "max"
        );
    }

    #[test]
    fn limits_are_written_and_read_back() {
        let dir = fake_v2(10 << 20, "max", "max 100000");
        let effect = set_memory_limit(Version::V2, dir.path(), Some(64 << 20)).expect("raise");
        assert_eq!(effect.before, "unlimited");
        assert_eq!(effect.after, format!("{} bytes", 64 << 20));
        let effect = set_cpu_quota(
            Version::V2,
            dir.path(),
            Some(CpuQuota {
                quota_us: 50_000,
                period_us: 100_000,
            }),
        )
        .expect("quota");
        assert_eq!(effect.before, "unlimited");
        assert_eq!(effect.after, "50000 µs per 100000 µs");
        let effect = set_cpu_quota(Version::V2, dir.path(), None).expect("unlimited");
        assert_eq!(effect.after, "unlimited");
    }

    #[test]
    fn a_value_that_reads_back_different_is_not_applied() {
        // A plain file keeps an unaligned value; the kernel would have rounded it to a page,
        // so what reads back is not what a kernel would show: the action must say so.
        let dir = fake_v2(0, "max", "max 100000");
        let err = set_memory_limit(Version::V2, dir.path(), Some((64 << 20) + 1))
            .expect_err("unaligned read-back");
        assert!(matches!(err, ActionError::NotApplied { .. }), "{err}");
    }
}
