//! OS probes: the target's process (procfs) and cgroup, and the host (sysinfo, statvfs).
//!
//! One sampler task, on the monitor's interval. It publishes `ProcessSample` and
//! `HostSample` and sets the matching gauges; reading a few small files per interval is the
//! whole cost.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::cgroup;
use crate::{
    bus::{Bus, Event, HostSample, ProcessSample},
    target::SharedStatus,
    telemetry::{gauge_value, Metrics},
};

/// CPU accounting between two samples of the same process.
#[derive(Debug, Default)]
struct CpuClock {
    last: Option<(u32, u64, Instant)>,
}

impl CpuClock {
    /// Percent of one core used since the previous sample of the same pid (0 on the first).
    fn percent(&mut self, pid: u32, ticks: u64, now: Instant) -> f64 {
        let percent = match self.last {
            Some((last_pid, last_ticks, at)) if last_pid == pid && ticks >= last_ticks => {
                let elapsed = now.duration_since(at).as_secs_f64();
                if elapsed > 0.0 {
                    (ticks - last_ticks) as f64 / procfs::ticks_per_second() as f64 / elapsed
                        * 100.0
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        self.last = Some((pid, ticks, now));
        percent
    }
}

fn sample_process(pid: u32, clock: &mut CpuClock) -> Option<ProcessSample> {
    let process = procfs::process::Process::new(pid as i32).ok()?;
    let stat = process.stat().ok()?;
    let cpu_percent = clock.percent(pid, stat.utime + stat.stime, Instant::now());
    let mut sample = ProcessSample {
        pid,
        cpu_percent,
        rss_bytes: stat.rss * procfs::page_size(),
        threads: u64::try_from(stat.num_threads).unwrap_or(0),
        open_fds: process.fd_count().map_or(0, |n| n as u64),
        fd_limit: process
            .limits()
            .ok()
            .and_then(|l| match l.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(n) => Some(n),
                procfs::process::LimitValue::Unlimited => None,
            }),
        state: stat.state.to_string(),
        ..ProcessSample::default()
    };
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        let locations = cgroup::locate(&text);
        if let Some((version, dir)) = cgroup::controller_dir(&locations, "memory") {
            if let Some((usage, limit)) = cgroup::read_memory(version, &dir) {
                sample.cgroup_memory_bytes = Some(usage);
                sample.cgroup_memory_limit_bytes = limit;
            }
        }
        if let Some((_, dir)) = cgroup::controller_dir(&locations, "cpu") {
            sample.cgroup_cpu_throttled_periods = cgroup::read_nr_throttled(&dir);
        }
    }
    Some(sample)
}

/// The nearest existing ancestor of `dir` (the state dir may not exist yet).
fn existing_ancestor(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

struct HostProbe {
    system: sysinfo::System,
    disk_path: PathBuf,
}

impl HostProbe {
    fn new(state_dir: &Path) -> Self {
        let mut system = sysinfo::System::new();
        system.refresh_cpu_usage();
        Self {
            system,
            disk_path: existing_ancestor(state_dir),
        }
    }

    fn sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let (disk_total_bytes, disk_available_bytes) = nix::sys::statvfs::statvfs(&self.disk_path)
            .map_or((0, 0), |vfs| {
                let fragment = vfs.fragment_size();
                (vfs.blocks() * fragment, vfs.blocks_available() * fragment)
            });
        HostSample {
            cpu_percent: f64::from(self.system.global_cpu_usage()),
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            disk_total_bytes,
            disk_available_bytes,
        }
    }
}

/// Samples the target and the host every `interval` until cancelled.
pub async fn run(
    interval: Duration,
    state_dir: PathBuf,
    target: SharedStatus,
    bus: Bus,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut clock = CpuClock::default();
    let mut host = HostProbe::new(&state_dir);
    let mut throttled_seen: Option<(u32, u64)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let pid = target
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pid;
        if let Some(sample) = pid.and_then(|pid| sample_process(pid, &mut clock)) {
            metrics.target_cpu_percent.set(sample.cpu_percent);
            metrics
                .target_memory_rss_bytes
                .set(gauge_value(sample.rss_bytes));
            metrics.target_threads.set(gauge_value(sample.threads));
            metrics.target_open_fds.set(gauge_value(sample.open_fds));
            metrics
                .target_cgroup_memory_usage_bytes
                .set(gauge_value(sample.cgroup_memory_bytes.unwrap_or(0)));
            metrics
                .target_cgroup_memory_limit_bytes
                .set(gauge_value(sample.cgroup_memory_limit_bytes.unwrap_or(0)));
            if let Some(now) = sample.cgroup_cpu_throttled_periods {
                // The kernel's counter restarts with a new cgroup; count only increases.
                if let Some((seen_pid, seen)) = throttled_seen {
                    if seen_pid == sample.pid && now > seen {
                        metrics
                            .target_cgroup_cpu_throttled_periods
                            .inc_by(now - seen);
                    }
                }
                throttled_seen = Some((sample.pid, now));
            }
            bus.publish(Event::ProcessSample(sample));
        }
        let sample = host.sample();
        metrics.host_cpu_percent.set(sample.cpu_percent);
        metrics
            .host_memory_total_bytes
            .set(gauge_value(sample.memory_total_bytes));
        metrics
            .host_memory_used_bytes
            .set(gauge_value(sample.memory_used_bytes));
        metrics
            .host_disk_total_bytes
            .set(gauge_value(sample.disk_total_bytes));
        metrics
            .host_disk_available_bytes
            .set(gauge_value(sample.disk_available_bytes));
        bus.publish(Event::HostSample(sample));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft `RLIMIT_NOFILE` from getrlimit(2), `None` when unlimited.
    fn rlimit_nofile() -> Option<u64> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we own.
        let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
        assert_eq!(result, 0, "getrlimit");
        (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
    }

    #[test]
    fn samples_this_process() {
        let mut clock = CpuClock::default();
        let sample = sample_process(std::process::id(), &mut clock).expect("own process");
        assert!(sample.rss_bytes > 0);
        assert!(sample.threads >= 1);
        assert!(sample.open_fds >= 3);
        let limit = rlimit_nofile();
        assert_eq!(
            sample.fd_limit, limit,
            "the soft RLIMIT_NOFILE, as getrlimit says"
        );
        let burn = Instant::now();
        let mut x = 0u64;
        while burn.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let again = sample_process(std::process::id(), &mut clock).expect("own process");
        assert!(
            again.cpu_percent > 20.0,
            "a busy loop shows as CPU: {}",
            again.cpu_percent
        );
    }

    #[test]
    fn host_sample_is_plausible() {
        let mut probe = HostProbe::new(Path::new("/nonexistent/state"));
        let sample = probe.sample();
        assert!(sample.memory_total_bytes > sample.memory_used_bytes);
        assert!(
            sample.disk_total_bytes >= sample.disk_available_bytes && sample.disk_total_bytes > 0
        );
    }
}
