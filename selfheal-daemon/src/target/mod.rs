//! The target: which process the daemon guards, found by one of six selectors, and followed
//! across restarts.
//!
//! Owns: resolution (`pid`, `pidfile`, `command`, `cgroup`, `systemd_unit` over D-Bus,
//! `container` over the Docker Engine API), the tracker task that publishes exactly one
//! `TargetStarted` per process found and one `TargetExited` per process lost, and the shared
//! [`TargetStatus`]. Must not: act on the target (that is the actuators' job).

pub(crate) mod docker;
pub(crate) mod systemd;

use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{Bus, Event, ExitStatus, Source, TargetState},
    config::TargetSelector,
    telemetry::{Metrics, ReasonLabel},
};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("process {pid} does not exist")]
    NoSuchProcess { pid: u32 },
    #[error("cannot read pidfile {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pidfile {path} does not hold a process id: {content:?}")]
    PidFileContent { path: PathBuf, content: String },
    #[error("no process's command line contains {pattern:?}")]
    NoCommandMatch { pattern: String },
    #[error("cannot list processes")]
    ProcList(#[source] procfs::ProcError),
    #[error("cannot read {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} has no processes")]
    EmptyCgroup { path: PathBuf },
    #[error("systemd unit {unit} is not running (no main process)")]
    UnitNotRunning { unit: String },
    #[error("cannot ask systemd about {unit}")]
    Systemd {
        unit: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("container {name} is not running")]
    ContainerNotRunning { name: String },
    #[error("no such container {name}")]
    NoSuchContainer { name: String },
    #[error("cannot ask the Docker Engine at {socket} about {name}: {reason}")]
    Docker {
        name: String,
        socket: PathBuf,
        reason: String,
    },
}

/// A resolved target: its main process and the other processes that belong to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub pid: u32,
    /// Every thread-group id of the target, main process included.
    pub members: Vec<u32>,
}

impl Resolved {
    fn single(pid: u32) -> Self {
        Self {
            pid,
            members: vec![pid],
        }
    }
}

/// Finds the target's processes now.
pub async fn resolve(selector: &TargetSelector) -> Result<Resolved, TargetError> {
    match selector {
        TargetSelector::Pid(pid) => alive(*pid).map(|()| Resolved::single(*pid)),
        TargetSelector::PidFile(path) => {
            let content =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| TargetError::PidFile {
                        path: path.clone(),
                        source,
                    })?;
            let pid = content
                .trim()
                .parse()
                .map_err(|_| TargetError::PidFileContent {
                    path: path.clone(),
                    content: content.chars().take(40).collect(),
                })?;
            alive(pid).map(|()| Resolved::single(pid))
        }
        TargetSelector::Command(pattern) => by_command(pattern),
        TargetSelector::Cgroup(path) => by_cgroup(path),
        TargetSelector::SystemdUnit { unit, bus } => {
            let pid = systemd::main_pid(unit, bus).await?;
            let members = cgroup_of(pid).map_or_else(|| vec![pid], |dir| cgroup_members(&dir, pid));
            Ok(Resolved { pid, members })
        }
        TargetSelector::Container { name, socket } => {
            let pid = docker::main_pid(name, socket).await?;
            let members = cgroup_of(pid).map_or_else(|| vec![pid], |dir| cgroup_members(&dir, pid));
            Ok(Resolved { pid, members })
        }
    }
}

/// A process's start time (clock ticks after boot): with the pid, what tells a process from a
/// later one that reused its pid.
fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(i32::try_from(pid).ok()?)
        .and_then(|process| process.stat())
        .ok()
        .map(|stat| stat.starttime)
}

fn alive(pid: u32) -> Result<(), TargetError> {
    // A zombie still has a /proc entry but is gone for our purposes.
    let process = procfs::process::Process::new(pid as i32)
        .map_err(|_| TargetError::NoSuchProcess { pid })?;
    match process.stat() {
        Ok(stat) if stat.state != 'Z' && stat.state != 'X' => Ok(()),
        _ => Err(TargetError::NoSuchProcess { pid }),
    }
}

/// The oldest matching process whose parent does not match too (so `sh -c` wrappers and
/// worker children fold into their top-most matching ancestor), with its matching children.
fn by_command(pattern: &str) -> Result<Resolved, TargetError> {
    let me = std::process::id() as i32;
    let mut matches = Vec::new();
    for process in procfs::process::all_processes()
        .map_err(TargetError::ProcList)?
        .flatten()
    {
        if process.pid == me {
            continue;
        }
        matches.extend(command_match(&process, pattern));
    }
    let pids: Vec<i32> = matches.iter().map(|m| m.0).collect();
    let main = matches
        .iter()
        .filter(|(_, ppid, _)| !pids.contains(ppid))
        .min_by_key(|(pid, _, start)| (*start, *pid))
        .ok_or_else(|| TargetError::NoCommandMatch {
            pattern: pattern.to_owned(),
        })?
        .0;
    let mut members = vec![main as u32];
    members.extend(matches.iter().filter(|m| m.1 == main).map(|m| m.0 as u32));
    Ok(Resolved {
        pid: main as u32,
        members,
    })
}

/// A live process whose command line contains `pattern`: its pid, parent and start time.
fn command_match(process: &procfs::process::Process, pattern: &str) -> Option<(i32, i32, u64)> {
    let cmdline = process.cmdline().ok()?;
    if cmdline.is_empty() || !cmdline.join(" ").contains(pattern) {
        return None;
    }
    let stat = process.stat().ok()?;
    if stat.state == 'Z' || stat.state == 'X' {
        return None;
    }
    Some((stat.pid, stat.ppid, stat.starttime))
}

/// The target's processes again while its main process lives, for the tracker's periodic
/// refresh. A `command` target is refreshed from its main process, its parent and its
/// children (the kernel's list, `/proc/<pid>/task/<tid>/children`) instead of every process
/// on the host: reading every command line twice a second costs the host CPU in proportion
/// to its process count, and each read takes that process's memory-map lock. It gives what
/// [`by_command`] would, and falls back to it when the list cannot be read (a kernel without
/// `CONFIG_PROC_CHILDREN`) or the main process is no longer the top-most match. Unlike the
/// scan, it does not move the target to an older matching process that appears later (a
/// process renaming itself): the main process stays the target while it lives and matches.
///
/// A systemd unit or a container is not asked of systemd or the container engine at every
/// poll either (a D-Bus connection or an Engine API inspect each time, paid by the manager or
/// the engine): while its main process's cgroup lists the same processes, nothing changed.
/// It is asked when they change, and when `confirm` (every [`CONFIRM_EVERY`]), for a main
/// process that the manager replaced while the old one still runs; a restart ends the main
/// process, which the pidfd reports at once.
async fn refresh(
    selector: &TargetSelector,
    current: &Resolved,
    confirm: bool,
) -> Result<Resolved, TargetError> {
    match selector {
        TargetSelector::Command(pattern) => {
            if let Some(fresh) = command_members(pattern, current.pid, &current.members) {
                return Ok(fresh);
            }
        }
        TargetSelector::SystemdUnit { .. } | TargetSelector::Container { .. } if !confirm => {
            let members = cgroup_of(current.pid).map(|dir| cgroup_members(&dir, current.pid));
            if members.as_ref() == Some(&current.members) {
                return Ok(current.clone());
            }
        }
        _ => {}
    }
    resolve(selector).await
}

/// How often a running unit's or container's main process is asked of systemd or the
/// container engine when its processes have not changed (see [`refresh`]).
const CONFIRM_EVERY: Duration = Duration::from_secs(10);

/// `main` and its matching children, if `main` still matches and its parent does not.
/// `known` are the members found last time: the kernel's children lists are not exact while
/// children come and go (a child reaped during the read can hide a live one), so a known
/// member still a matching child of `main` stays one.
fn command_members(pattern: &str, main: u32, known: &[u32]) -> Option<Resolved> {
    let process = procfs::process::Process::new(i32::try_from(main).ok()?).ok()?;
    let (_, ppid, _) = command_match(&process, pattern)?;
    if procfs::process::Process::new(ppid)
        .ok()
        .and_then(|parent| command_match(&parent, pattern))
        .is_some()
    {
        return None;
    }
    let leader = std::fs::read_to_string(format!("/proc/{main}/task/{main}/children")).ok()?;
    let mut children: Vec<i32> = leader
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    // The other threads' children; a thread that ended meanwhile has none.
    for task in std::fs::read_dir(format!("/proc/{main}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|pid| pid.parse::<i32>().ok()),
            );
        }
    }
    children.extend(known.iter().filter_map(|&pid| i32::try_from(pid).ok()));
    // In /proc's order, as a full scan lists them.
    children.sort_unstable();
    children.dedup();
    let me = std::process::id() as i32;
    let main_pid = main as i32;
    let mut members = vec![main];
    members.extend(
        children
            .into_iter()
            .filter(|&pid| pid != main_pid && pid != me)
            .filter_map(|pid| procfs::process::Process::new(pid).ok())
            .filter_map(|child| command_match(&child, pattern))
            .filter(|&(_, ppid, _)| ppid == main_pid)
            .map(|(pid, _, _)| pid as u32),
    );
    Some(Resolved { pid: main, members })
}

fn by_cgroup(dir: &Path) -> Result<Resolved, TargetError> {
    let procs = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(|source| TargetError::Cgroup {
        path: procs,
        source,
    })?;
    let mut pids: Vec<(u64, u32)> = text
        .lines()
        .filter_map(|line| line.trim().parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = procfs::process::Process::new(pid as i32)
                .ok()?
                .stat()
                .ok()?;
            (stat.state != 'Z').then_some((stat.starttime, pid))
        })
        .collect();
    pids.sort_unstable();
    let main = pids
        .first()
        .ok_or_else(|| TargetError::EmptyCgroup {
            path: dir.to_owned(),
        })?
        .1;
    Ok(Resolved {
        pid: main,
        members: pids.into_iter().map(|(_, pid)| pid).collect(),
    })
}

/// The cgroup directory of a process in a hierarchy that lists processes: the v1 `pids` or
/// `memory` controller, else the v2 tree.
fn cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    crate::probes::cgroup::locate(&text)
        .into_iter()
        .map(|location| location.dir)
        .find(|dir| dir.join("cgroup.procs").exists())
}

/// `main`, then the other processes of `dir` in pid order (`cgroup.procs` is unordered and
/// may repeat a pid), so two reads of an unchanged cgroup compare equal.
fn cgroup_members(dir: &Path, main: u32) -> Vec<u32> {
    let mut others: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .filter(|p| *p != main)
                .collect()
        })
        .unwrap_or_default();
    others.sort_unstable();
    others.dedup();
    let mut members = vec![main];
    members.extend(others);
    members
}

/// An exit the kernel reported (from the eBPF probe).
#[derive(Debug, Clone, Copy)]
pub struct KernelExit {
    pub tgid: u32,
    pub status: ExitStatus,
    pub exited_monotonic_ns: u64,
    pub observed_monotonic_ns: u64,
}

/// The last exit of the target.
#[derive(Debug, Clone)]
pub struct ExitRecord {
    pub pid: u32,
    pub status: ExitStatus,
    /// `exited`, `unknown` or the signal name.
    pub reason: &'static str,
    pub source: Source,
    pub exited_monotonic_ns: Option<u64>,
    pub observed_monotonic_ns: u64,
    pub at: SystemTime,
}

/// What the API and the agents read about the target.
#[derive(Debug, Clone)]
pub struct TargetStatus {
    pub selector: String,
    pub state: TargetState,
    pub pid: Option<u32>,
    pub members: Vec<u32>,
    pub restarts: u64,
    pub since: Option<SystemTime>,
    pub last_exit: Option<ExitRecord>,
    /// Why the last resolution failed, while the target is not running.
    pub last_error: Option<String>,
}

pub type SharedStatus = Arc<RwLock<TargetStatus>>;

pub fn new_status(selector: &TargetSelector) -> SharedStatus {
    Arc::new(RwLock::new(TargetStatus {
        selector: selector.to_string(),
        state: TargetState::Unknown,
        pid: None,
        members: Vec::new(),
        restarts: 0,
        since: None,
        last_exit: None,
        last_error: None,
    }))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` uses.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec()).unwrap_or(0)
    })
}

/// Opens a pidfd: readable once the process has exited, immune to pid reuse.
pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the `OwnedFd` keeps the descriptor open for as long as the `AsyncFd` holds it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(Into::into)
}

/// The tracker's inputs and outputs.
pub struct Tracker {
    pub selector: TargetSelector,
    pub poll_interval: Duration,
    pub bus: Bus,
    pub metrics: Metrics,
    pub status: SharedStatus,
    /// Exits reported by the eBPF probe (any process of the target).
    pub kernel_exits: mpsc::Receiver<KernelExit>,
    /// The target's thread-group ids, for the eBPF filter maps. Empty while it is down.
    pub members: watch::Sender<Vec<u32>>,
}

/// How long to wait, after the pidfd says the process is gone, for the kernel's record of
/// the exit (it is written before the pidfd wakes, so it is normally already queued).
const KERNEL_RECORD_GRACE: Duration = Duration::from_millis(50);

impl Tracker {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut seen_exit = false;
        // The process that just exited, with its start time: an engine or manager may still
        // name it for a while (Docker's inspect reports the old `State.Pid` while the old
        // PID 1 of the container waits in the kernel for its namespace to empty), and a
        // process the kernel has seen exit must not be taken for the restarted target.
        let mut exited: Option<(u32, Option<u64>)> = None;
        loop {
            let resolved = tokio::select! {
                () = cancel.cancelled() => return,
                resolved = resolve(&self.selector) => resolved,
            };
            let resolved = match resolved {
                Ok(resolved) => resolved,
                Err(err) => {
                    self.not_running(&err);
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(self.poll_interval) => continue,
                    }
                }
            };
            if exited
                .is_some_and(|(pid, started)| pid == resolved.pid && start_time(pid) == started)
            {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(self.poll_interval) => continue,
                }
            }
            // It may have exited between resolution and here: then resolve again.
            let Ok(pidfd) = pidfd_open(resolved.pid) else {
                continue;
            };
            self.started(&resolved, seen_exit);
            seen_exit = true;
            let pid = resolved.pid;
            let started = start_time(pid);
            if !self.watch(resolved, &pidfd, &cancel).await {
                return;
            }
            exited = Some((pid, started));
        }
    }

    fn not_running(&self, err: &TargetError) {
        let mut status = self
            .status
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let message = err.to_string();
        if status.last_error.as_deref() != Some(message.as_str()) {
            tracing::warn!(target_selector = %self.selector, error = %message, "target not running");
        }
        if status.state != TargetState::Down {
            status.state = if status.last_exit.is_some() {
                TargetState::Down
            } else {
                TargetState::Unknown
            };
        }
        status.last_error = Some(message);
        self.metrics.target_up.set(0);
    }

    fn started(&self, resolved: &Resolved, is_restart: bool) {
        let restarts = {
            let mut status = self
                .status
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if is_restart {
                status.restarts += 1;
                self.metrics.target_restarts.inc();
            }
            status.state = TargetState::Running;
            status.pid = Some(resolved.pid);
            status.members.clone_from(&resolved.members);
            status.since = Some(SystemTime::now());
            status.last_error = None;
            status.restarts
        };
        self.metrics.target_up.set(1);
        self.members.send_replace(resolved.members.clone());
        tracing::info!(
            pid = resolved.pid,
            members = resolved.members.len(),
            restarts,
            "target running"
        );
        self.bus.publish(Event::TargetStarted {
            pid: resolved.pid,
            restarts,
            at: SystemTime::now(),
        });
    }

    /// Watches a running target until it exits (true) or the daemon stops (false).
    async fn watch(
        &mut self,
        mut current: Resolved,
        pidfd: &AsyncFd<OwnedFd>,
        cancel: &CancellationToken,
    ) -> bool {
        let mut confirmed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return false,
                Some(exit) = self.kernel_exits.recv() => {
                    if exit.tgid == current.pid {
                        self.exited(current.pid, Some(exit));
                        return true;
                    }
                }
                _ = pidfd.readable() => {
                    let record = tokio::time::timeout(KERNEL_RECORD_GRACE, async {
                        while let Some(exit) = self.kernel_exits.recv().await {
                            if exit.tgid == current.pid {
                                return Some(exit);
                            }
                        }
                        None
                    })
                    .await
                    .ok()
                    .flatten();
                    self.exited(current.pid, record);
                    return true;
                }
                () = tokio::time::sleep(self.poll_interval) => {
                    // Refresh the member list (workers come and go) and notice a selector that
                    // now points elsewhere (a rewritten pidfile, a unit restarted between polls).
                    let confirm = confirmed.elapsed() >= CONFIRM_EVERY;
                    if confirm {
                        confirmed = tokio::time::Instant::now();
                    }
                    if let Ok(fresh) = refresh(&self.selector, &current, confirm).await {
                        if fresh.pid != current.pid {
                            self.exited(current.pid, None);
                            return true;
                        }
                        if fresh.members != current.members {
                            self.members.send_replace(fresh.members.clone());
                            self.status.write().unwrap_or_else(std::sync::PoisonError::into_inner).members.clone_from(&fresh.members);
                            current = fresh;
                        }
                    }
                }
            }
        }
    }

    fn exited(&self, pid: u32, kernel: Option<KernelExit>) {
        let observed = monotonic_ns();
        let (status, source, exited_ns, observed_ns) = match kernel {
            Some(exit) => (
                exit.status,
                Source::Ebpf,
                Some(exit.exited_monotonic_ns),
                exit.observed_monotonic_ns,
            ),
            None => (ExitStatus::Unknown, Source::Procfs, None, observed),
        };
        let record = ExitRecord {
            pid,
            status,
            reason: status.reason(),
            source,
            exited_monotonic_ns: exited_ns,
            observed_monotonic_ns: observed_ns,
            at: SystemTime::now(),
        };
        {
            let mut shared = self
                .status
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            shared.state = TargetState::Down;
            shared.pid = None;
            shared.members.clear();
            shared.last_exit = Some(record.clone());
        }
        self.metrics.target_up.set(0);
        self.metrics
            .target_process_exits
            .get_or_create(&ReasonLabel {
                reason: record.reason,
            })
            .inc();
        self.members.send_replace(Vec::new());
        tracing::warn!(pid, reason = record.reason, source = ?source, "target exited");
        self.bus.publish(Event::TargetExited {
            pid,
            status,
            source,
            exited_monotonic_ns: exited_ns,
            observed_monotonic_ns: observed_ns,
            at: record.at,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_a_child_by_pid_pidfile_and_command() {
        let marker = format!("selfheal-target-test-{}", std::process::id());
        let mut child = std::process::Command::new("sh")
            .args(["-c", &format!("exec sleep 30 # {marker}")])
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        // `exec` replaces sh, so the command line becomes sleep's; match on sleep's args.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while procfs::process::Process::new(pid as i32)
            .and_then(|p| p.cmdline())
            .map(|c| c.join(" "))
            .unwrap_or_default()
            != "sleep 30"
        {
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            resolve(&TargetSelector::Pid(pid))
                .await
                .expect("by pid")
                .pid,
            pid
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("t.pid");
        std::fs::write(&pidfile, format!("{pid}\n")).expect("write pidfile");
        assert_eq!(
            resolve(&TargetSelector::PidFile(pidfile.clone()))
                .await
                .expect("by pidfile")
                .pid,
            pid
        );
        std::fs::write(&pidfile, "garbage").expect("write pidfile");
        assert!(matches!(
            resolve(&TargetSelector::PidFile(pidfile)).await,
            Err(TargetError::PidFileContent { .. })
        ));

        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(matches!(
            resolve(&TargetSelector::Pid(pid)).await,
            Err(TargetError::NoSuchProcess { .. })
        ));
        assert!(matches!(
            resolve(&TargetSelector::Command(marker)).await,
            Err(TargetError::NoCommandMatch { .. })
        ));
    }

    #[tokio::test]
    async fn command_match_picks_the_top_most_process() {
        let marker = format!("selfheal-cmd-test-{}", std::process::id());
        // A shell (matching, because its -c script names the marker) with a matching child.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("sh -c 'sleep 30; : {marker}' & wait # {marker}"),
            ])
            .spawn()
            .expect("spawn sh");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let resolved = loop {
            if let Ok(r) = resolve(&TargetSelector::Command(marker.clone())).await {
                if r.members.len() == 2 {
                    break r;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "both processes should match"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(resolved.pid, child.id());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The refresh from the main process's children gives what a scan of every process
    /// gives, as the children come and go.
    #[tokio::test]
    async fn a_command_targets_refresh_finds_what_a_full_scan_finds() {
        let marker = format!("selfheal-refresh-test-{}", std::process::id());
        // A matching shell with two matching children, one that does not match, and a
        // matching grandchild (not a member: only the main process's children are).
        let script = format!(
            "sh -c 'sleep 30; : {marker}' & a=$!; sh -c 'sleep 30; : {marker}' & b=$!; \
             sleep 30 & c=$!; sh -c 'sh -c \"sleep 30; : {marker}\"; : {marker}' & d=$!; \
             read line; kill $a $b $c $d 2>/dev/null; wait # {marker}"
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let selector = TargetSelector::Command(marker.clone());
        let cmdline = |pid: u32| {
            procfs::process::Process::new(pid as i32)
                .and_then(|p| p.cmdline())
                .unwrap_or_default()
        };
        // Two views of a live process tree taken one after the other: compared until they
        // agree, or the deadline says they do not.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let full = loop {
            if let Ok(r) = resolve(&selector).await {
                // A child forked but not yet exec'd still has the shell's command line.
                let settled = r.members[1..]
                    .iter()
                    .all(|&pid| cmdline(pid) != cmdline(r.pid));
                let fresh = command_members(&marker, r.pid, &[]);
                if r.members.len() == 4 && settled && fresh.as_ref() == Some(&r) {
                    break r;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the shell and its three matching children, found alike: {r:?} {fresh:?}"
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the shell should match"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(full.pid, child.id());
        assert_eq!(
            refresh(&selector, &full, false).await.expect("refresh"),
            full
        );

        // One member gone: the refresh no longer names it.
        let gone = full.members[1];
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(gone as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill a member");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let fresh =
                command_members(&marker, full.pid, &full.members).expect("children list readable");
            let scan = resolve(&selector).await.expect("full scan");
            if !fresh.members.contains(&gone) && fresh.members.len() == 3 && fresh == scan {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{gone} gone, the others alike: {fresh:?} {scan:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A main process that no longer matches is not refreshed from its children.
        assert_eq!(
            command_members("selfheal-no-such-command-line", full.pid, &full.members),
            None
        );
        // End of input: the shell stops its jobs and exits.
        drop(child.stdin.take());
        let _ = child.wait();
    }

    /// A running unit or container whose cgroup lists the same processes is refreshed
    /// without asking systemd or the engine (here unreachable: asking fails); they are asked
    /// when its processes change and when a confirmation is due.
    #[tokio::test]
    async fn a_unit_or_container_is_asked_again_only_when_its_processes_change() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let dir = cgroup_of(pid).expect("the child's cgroup");
        let current = Resolved {
            pid,
            members: cgroup_members(&dir, pid),
        };
        let selectors = [
            TargetSelector::SystemdUnit {
                unit: "selfheal-test.service".into(),
                bus: "unix:path=/nonexistent/selfheal-test-bus".into(),
            },
            TargetSelector::Container {
                name: "selfheal-test".into(),
                socket: "/nonexistent/selfheal-test-docker.sock".into(),
            },
        ];
        for selector in &selectors {
            // The cgroup's list can change under the test (other processes of the test run
            // share it): equal to a list read just before, or asked.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let current = Resolved {
                    pid,
                    members: cgroup_members(&dir, pid),
                };
                if let Ok(fresh) = refresh(selector, &current, false).await {
                    assert_eq!(fresh, current, "{selector}: unchanged, not asked");
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{selector}: refreshed from its cgroup without asking");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let confirmed = refresh(selector, &current, true).await;
            assert!(
                confirmed.is_err(),
                "{selector}: a confirmation asks: {confirmed:?}"
            );
            let changed = Resolved {
                pid,
                members: vec![pid, u32::MAX],
            };
            let asked = refresh(selector, &changed, false).await;
            assert!(
                asked.is_err(),
                "{selector}: changed processes ask: {asked:?}"
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
