//! The decoder thread's scheduling: `SCHED_IDLE` while it parses (the default,
//! `probes.decode_idle`), or a nice value.
//!
//! Owns: the policy of the thread that calls [`DecodePriority::apply`], and [`Idle`], the guard
//! that puts it under `SCHED_IDLE` for a section. Must not: leave a thread under `SCHED_IDLE`
//! where it can take a lock, a channel's waiter list or another thread's allocator arena that
//! a thread of the main runtime waits for — on CPUs other processes keep busy such a thread
//! may not run again for seconds, and a worker of the main runtime blocked behind it would
//! stall the API and the handling of exits with it. So the thread runs at normal priority and
//! is under `SCHED_IDLE` only inside [`Idle`] sections, which hold pure computation on its own
//! data (the connection table and the parsers).
//!
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` (or an `RLIMIT_NICE` that allows the thread's nice
//! value); without it the thread could not come back, so it stays at normal priority and the
//! log says why.

use std::cell::Cell;

thread_local! {
    /// Whether [`Idle`] sections put the calling thread under `SCHED_IDLE`.
    static IDLE_SECTIONS: Cell<bool> = const { Cell::new(false) };
}

/// `probes.decode_nice` and `probes.decode_idle` (see [`crate::config::ProbesConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct DecodePriority {
    pub nice: i32,
    pub idle: bool,
}

impl DecodePriority {
    /// Applies it to the calling thread (Linux keeps the policy and the nice value per thread;
    /// threads it starts inherit them); a failure is logged and the thread goes on at normal
    /// priority. Returns whether [`Idle`] sections take effect on this thread.
    pub fn apply(self) -> bool {
        if self.idle {
            match can_leave_idle() {
                Ok(()) => IDLE_SECTIONS.set(true),
                Err(err) => tracing::warn!(
                    error = %err,
                    "the decoder cannot run under SCHED_IDLE: a thread cannot come back from it \
                     without CAP_SYS_NICE (or an RLIMIT_NICE allowing its nice value); it runs at \
                     normal priority"
                ),
            }
            return IDLE_SECTIONS.get();
        }
        if self.nice != 0 {
            // SAFETY: `setpriority` reads no memory; `who = 0` is the calling thread on Linux.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.nice) } != 0 {
                tracing::warn!(nice = self.nice, error = %std::io::Error::last_os_error(), "cannot lower the decoder thread's priority");
            }
        }
        false
    }
}

/// While it lives, the calling thread runs under `SCHED_IDLE` if [`DecodePriority::apply`]
/// enabled it there (elsewhere it does nothing): any thread that wakes up takes its CPU at
/// once, and the scheduler counts a CPU running only it as idle when it places a wake-up.
/// Two system calls per section; hold no shared lock inside (see the module's rule).
#[must_use = "the thread leaves SCHED_IDLE when the guard is dropped"]
pub struct Idle {
    entered: bool,
}

impl Idle {
    pub fn enter() -> Self {
        Self {
            entered: IDLE_SECTIONS.get() && set_policy(libc::SCHED_IDLE).is_ok(),
        }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        if self.entered && set_policy(libc::SCHED_OTHER).is_err() {
            // Checked possible in `apply`; should it fail after all, stop entering.
            IDLE_SECTIONS.set(false);
            tracing::warn!(error = %std::io::Error::last_os_error(), "the decoder thread cannot leave SCHED_IDLE; it stays there");
        }
    }
}

/// Whether a thread of this process can leave `SCHED_IDLE` again: tried on a thread of its
/// own, which ends either way.
fn can_leave_idle() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("selfheal-schedck".to_owned())
        .spawn(|| {
            set_policy(libc::SCHED_IDLE)?;
            set_policy(libc::SCHED_OTHER)
        })?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the check's thread panicked")))
}

/// Sets the calling thread's policy (static priority 0; the nice value is kept).
fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` outlives the call; `pid = 0` is the calling thread on Linux.
    if unsafe { libc::sched_setscheduler(0, policy, &raw const param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::{DecodePriority, Idle};

    /// The calling thread's scheduling policy and nice value.
    fn scheduling() -> (i32, i32) {
        // SAFETY: neither call reads memory; 0 is the calling thread.
        unsafe {
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, 0),
            )
        }
    }

    fn on_a_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        std::thread::spawn(f).join().expect("the thread ran")
    }

    /// Whether this process may leave `SCHED_IDLE` (root, or `CAP_SYS_NICE`): the tests below
    /// expect the daemon's conditions.
    fn privileged() -> bool {
        super::can_leave_idle().is_ok()
    }

    #[test]
    #[ignore = "needs CAP_SYS_NICE (root, as the daemon runs): `sudo cargo xtask test` runs it"]
    fn an_idle_decoder_is_under_sched_idle_only_inside_its_sections() {
        assert!(
            privileged(),
            "these checks need CAP_SYS_NICE (run as root, as the daemon does)"
        );
        let base = scheduling();
        let seen = on_a_thread(|| {
            let enabled = DecodePriority {
                nice: 0,
                idle: true,
            }
            .apply();
            let before = scheduling();
            let inside = {
                let _idle = Idle::enter();
                scheduling()
            };
            (enabled, before, inside, scheduling())
        });
        assert_eq!(
            seen,
            (
                true,
                (libc::SCHED_OTHER, base.1),
                (libc::SCHED_IDLE, base.1),
                (libc::SCHED_OTHER, base.1)
            ),
            "normal priority outside the section, SCHED_IDLE inside"
        );
        // Only that thread changed, not the test's own.
        assert_eq!(scheduling(), base);
    }

    #[test]
    fn a_decoder_at_normal_priority_or_niced_has_no_idle_sections() {
        let base = scheduling();
        for nice in [0, 19] {
            let seen = on_a_thread(move || {
                let enabled = DecodePriority { nice, idle: false }.apply();
                let _idle = Idle::enter();
                (enabled, scheduling())
            });
            let expected_nice = if nice == 0 { base.1 } else { nice };
            assert_eq!(
                seen,
                (false, (libc::SCHED_OTHER, expected_nice)),
                "nice {nice}"
            );
        }
    }
}
