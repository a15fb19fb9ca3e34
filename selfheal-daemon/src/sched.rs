//! The decoder thread's scheduling: under `SCHED_IDLE` (the default, `probes.decode_idle`) or
//! at a nice value, and back at normal priority while it holds locks the main runtime shares.
//!
//! Owns: the policy of the thread that calls [`DecodePriority::apply`], and [`Normal`], the
//! guard that lifts it for a short section. Must not: let a thread under `SCHED_IDLE` hold a
//! lock another thread waits for — on CPUs other processes keep busy such a thread may not run
//! again for seconds, and a worker of the main runtime blocked on the store or the traffic
//! tables would stall the API and the handling of exits with it.

use std::cell::Cell;

thread_local! {
    /// Whether [`DecodePriority::apply`] put the calling thread under `SCHED_IDLE`.
    static IDLE: Cell<bool> = const { Cell::new(false) };
}

/// `probes.decode_nice` and `probes.decode_idle` (see [`crate::config::ProbesConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct DecodePriority {
    pub nice: i32,
    pub idle: bool,
}

impl DecodePriority {
    /// Applies it to the calling thread (Linux keeps the policy and the nice value per
    /// thread; threads it starts inherit them); a failure is logged and the thread goes on
    /// at normal priority.
    pub fn apply(self) {
        if self.idle {
            if set_policy(libc::SCHED_IDLE) {
                IDLE.set(true);
            } else {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot run the decoder thread under SCHED_IDLE");
            }
        } else if self.nice != 0 {
            // SAFETY: `setpriority` reads no memory; `who = 0` is the calling thread on Linux.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.nice) } != 0 {
                tracing::warn!(nice = self.nice, error = %std::io::Error::last_os_error(), "cannot lower the decoder thread's priority");
            }
        }
    }
}

/// While it lives, a thread [`DecodePriority::apply`] put under `SCHED_IDLE` runs at normal
/// priority (`SCHED_OTHER`, nice 0); elsewhere it does nothing. Taken before a lock the main
/// runtime shares, dropped after it is released: two system calls per section.
#[must_use = "the thread is back under SCHED_IDLE when the guard is dropped"]
pub struct Normal {
    lifted: bool,
}

impl Normal {
    pub fn enter() -> Self {
        Self {
            lifted: IDLE.get() && set_policy(libc::SCHED_OTHER),
        }
    }
}

impl Drop for Normal {
    fn drop(&mut self) {
        if self.lifted {
            set_policy(libc::SCHED_IDLE);
        }
    }
}

/// Sets the calling thread's policy (static priority 0); whether it took.
fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` outlives the call; `pid = 0` is the calling thread on Linux.
    unsafe { libc::sched_setscheduler(0, policy, &raw const param) == 0 }
}

#[cfg(test)]
mod tests {
    use super::{DecodePriority, Normal};

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

    #[test]
    fn the_decoder_thread_gets_the_priority_configured() {
        let applied = |priority: DecodePriority| {
            on_a_thread(move || {
                priority.apply();
                scheduling()
            })
        };
        assert_eq!(
            applied(DecodePriority {
                nice: 0,
                idle: false
            }),
            (libc::SCHED_OTHER, 0)
        );
        assert_eq!(
            applied(DecodePriority {
                nice: 19,
                idle: false
            }),
            (libc::SCHED_OTHER, 19)
        );
        assert_eq!(
            applied(DecodePriority {
                nice: 0,
                idle: true
            }),
            (libc::SCHED_IDLE, 0)
        );
        // Only the thread changed, not the test's own.
        assert_eq!(scheduling(), (libc::SCHED_OTHER, 0));
    }

    #[test]
    fn an_idle_thread_runs_at_normal_priority_while_it_holds_shared_locks() {
        let seen = on_a_thread(|| {
            DecodePriority {
                nice: 0,
                idle: true,
            }
            .apply();
            let inside = {
                let _normal = Normal::enter();
                scheduling()
            };
            (inside, scheduling())
        });
        assert_eq!(
            seen,
            ((libc::SCHED_OTHER, 0), (libc::SCHED_IDLE, 0)),
            "lifted inside the section, back under SCHED_IDLE after it"
        );
        // A thread at normal priority or niced is left as it is.
        let niced = on_a_thread(|| {
            DecodePriority {
                nice: 19,
                idle: false,
            }
            .apply();
            let _normal = Normal::enter();
            scheduling()
        });
        assert_eq!(niced, (libc::SCHED_OTHER, 19));
    }
}
