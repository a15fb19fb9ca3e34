//! Signals to the target through a pidfd, so a signal decided for one process can never reach
//! another that took its pid: the pidfd is opened, the process behind it is checked against
//! the start time the decision was made on, and only then is the signal sent through it.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;

use super::{ActionError, Effect};

/// The process's state letter from procfs (`R`, `S`, `T`, `Z`, …), or `gone`.
fn state(pid: u32) -> String {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map_or_else(|_| "gone".to_owned(), |stat| stat.state.to_string())
}

/// The process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with
/// the pid, it names one process for the life of the host.
pub fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|stat| stat.starttime)
}

/// Whether a signal ends the process unless it handles it (then the read-back waits for the
/// exit).
fn terminates(signal: Signal) -> bool {
    matches!(
        signal,
        Signal::SIGTERM | Signal::SIGKILL | Signal::SIGINT | Signal::SIGQUIT | Signal::SIGABRT
    )
}

/// Sends `signal` to process `pid`, which must have started at `started` (see
/// [`start_time`]). For a signal that ends processes, waits up to `wait` for the exit and
/// reports whether it came; for others, reports the process state after.
pub async fn send(
    pid: u32,
    started: u64,
    signal: Signal,
    wait: Duration,
) -> Result<Effect, ActionError> {
    let subject = format!("process {pid}");
    let pidfd = crate::target::pidfd_open(pid).map_err(|source| ActionError::Io {
        subject: subject.clone(),
        source,
    })?;
    // The pidfd pins the process now; check it is the one the decision was about.
    match start_time(pid) {
        Some(now) if now == started => {}
        _ => {
            return Err(ActionError::Unsafe(format!(
                "{subject} is not the process the action was decided for (it exited and the \
                 pid was reused)"
            )))
        }
    }
    let before = state(pid);
    send_through(&pidfd, signal).map_err(|source| ActionError::Refused {
        subject: subject.clone(),
        wanted: signal.as_str().to_owned(),
        source,
    })?;
    let after = if terminates(signal) {
        match tokio::time::timeout(wait, pidfd.readable()).await {
            Ok(_) => "exited".to_owned(),
            Err(_) => format!(
                "still running after {} ms ({})",
                wait.as_millis(),
                state(pid)
            ),
        }
    } else {
        // Stop and continue take effect as the signal is delivered; give it a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
        state(pid)
    };
    Ok(Effect {
        action: "signal",
        subject: format!("{subject} ({})", signal.as_str()),
        before,
        after,
    })
}

fn send_through(pidfd: &AsyncFd<OwnedFd>, signal: Signal) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd we own, a signal number and a null siginfo (the
    // kernel then fills it as for kill(2)); no memory is shared.
    let result = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.get_ref().as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    #[tokio::test]
    async fn a_signal_reaches_the_process_and_its_effect_is_read_back() {
        let mut child = sleeper();
        let pid = child.id();
        let started = start_time(pid).expect("start time");
        let stopped = send(pid, started, Signal::SIGSTOP, Duration::from_secs(1))
            .await
            .expect("stop");
        assert_eq!(stopped.after, "T", "{stopped:?}");
        let resumed = send(pid, started, Signal::SIGCONT, Duration::from_secs(1))
            .await
            .expect("continue");
        assert_ne!(resumed.after, "T", "{resumed:?}");
        let killed = send(pid, started, Signal::SIGTERM, Duration::from_secs(5))
            .await
            .expect("terminate");
        assert_eq!(killed.after, "exited", "{killed:?}");
        assert!(!child.wait().expect("reap").success());
    }

    #[tokio::test]
    async fn a_process_that_is_not_the_decided_one_is_not_signalled() {
        let mut child = sleeper();
        let pid = child.id();
        let started = start_time(pid).expect("start time");
        let err = send(pid, started + 1, Signal::SIGKILL, Duration::from_secs(1))
            .await
            .expect_err("another start time");
        assert!(matches!(err, ActionError::Unsafe(_)), "{err}");
        assert_ne!(state(pid), "gone", "the process must be untouched");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }
}
