//! Diagnostic: explains a firing alert with a stable signature, from the evidence on the bus.
//!
//! This version knows the target-level signatures (`target.crashed`, `target.oom_killed`,
//! `target.memory_leak`, `target.cpu_saturated`); the database and HTTP ones come with the
//! traffic probes.

use std::collections::VecDeque;

use super::{AgentContext, AgentError};
use crate::bus::{Event, ExitStatus, ProcessSample};

/// Samples kept as evidence.
const HISTORY: usize = 60;

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let mut samples: VecDeque<ProcessSample> = VecDeque::with_capacity(HISTORY);
    let mut last_exit: Option<ExitStatus> = None;
    loop {
        match ctx.next().await? {
            Event::ProcessSample(sample) => {
                if samples.len() == HISTORY {
                    samples.pop_front();
                }
                samples.push_back(sample);
            }
            Event::TargetExited { status, .. } => last_exit = Some(status),
            Event::Alert {
                rule, firing: true, ..
            } => {
                if let Some((signature, summary, confidence)) = diagnose(&rule, last_exit, &samples)
                {
                    ctx.publish(Event::Diagnosis {
                        rule,
                        signature: signature.to_owned(),
                        summary,
                        confidence,
                    });
                }
            }
            _ => {}
        }
    }
}

/// The signature, a root-cause sentence and a confidence for an alert.
pub(super) fn diagnose(
    rule: &str,
    exit: Option<ExitStatus>,
    samples: &VecDeque<ProcessSample>,
) -> Option<(&'static str, String, f64)> {
    let last = samples.back();
    let near_limit =
        last.is_some_and(
            |s| match (s.cgroup_memory_bytes, s.cgroup_memory_limit_bytes) {
                (Some(used), Some(limit)) if limit > 0 => used as f64 / limit as f64 > 0.9,
                _ => false,
            },
        );
    match rule {
        "target.exited" => Some(match exit {
            Some(ExitStatus::Signaled { signal: 9, .. }) if near_limit => (
                "target.oom_killed",
                "the target was killed (SIGKILL) with its cgroup memory near the limit: the OOM killer".to_owned(),
                0.8,
            ),
            Some(ExitStatus::Signaled { signal, core_dumped, .. }) => (
                "target.crashed",
                format!(
                    "the target died from {}{}",
                    crate::bus::signal_name(signal),
                    if core_dumped { " and dumped core" } else { "" }
                ),
                0.9,
            ),
            Some(ExitStatus::Exited { code }) => {
                ("target.crashed", format!("the target exited with status {code}"), if code == 0 { 0.5 } else { 0.8 })
            }
            Some(ExitStatus::Unknown) | None => ("target.crashed", "the target's process ended".to_owned(), 0.5),
        }),
        "target.memory_high" => {
            let growing = samples.len() >= 3
                && samples.iter().zip(samples.iter().skip(1)).all(|(a, b)| b.rss_bytes >= a.rss_bytes);
            Some(if growing {
                ("target.memory_leak", format!("memory rose in each of the last {} samples", samples.len()), 0.7)
            } else {
                ("target.memory_high", "memory is high but not steadily rising".to_owned(), 0.5)
            })
        }
        "target.cpu_high" => {
            let throttled = samples.iter().filter_map(|s| s.cgroup_cpu_throttled_periods).max().unwrap_or(0) > 0;
            Some(if throttled {
                ("target.cpu_throttled", "the target uses its whole CPU quota and is throttled".to_owned(), 0.7)
            } else {
                ("target.cpu_saturated", "the target keeps the CPU busy".to_owned(), 0.6)
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss: u64, used: u64, limit: u64) -> ProcessSample {
        ProcessSample {
            rss_bytes: rss,
            cgroup_memory_bytes: Some(used),
            cgroup_memory_limit_bytes: Some(limit),
            ..ProcessSample::default()
        }
    }

    #[test]
    fn tells_an_oom_kill_from_a_crash() {
        let full: VecDeque<_> = [sample(1, 95, 100)].into();
        let roomy: VecDeque<_> = [sample(1, 10, 100)].into();
        let kill = Some(ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        });
        assert_eq!(
            diagnose("target.exited", kill, &full).map(|d| d.0),
            Some("target.oom_killed")
        );
        assert_eq!(
            diagnose("target.exited", kill, &roomy).map(|d| d.0),
            Some("target.crashed")
        );
        let abort = Some(ExitStatus::Signaled {
            signal: 6,
            core_dumped: true,
        });
        let (_, summary, _) = diagnose("target.exited", abort, &roomy).expect("diagnosis");
        assert!(
            summary.contains("SIGABRT") && summary.contains("core"),
            "{summary}"
        );
    }

    #[test]
    fn rising_memory_is_a_leak() {
        let rising: VecDeque<_> = (1..=5).map(|i| sample(i * 100, 0, 0)).collect();
        assert_eq!(
            diagnose("target.memory_high", None, &rising).map(|d| d.0),
            Some("target.memory_leak")
        );
        let flat: VecDeque<_> = [sample(500, 0, 0), sample(400, 0, 0), sample(500, 0, 0)].into();
        assert_eq!(
            diagnose("target.memory_high", None, &flat).map(|d| d.0),
            Some("target.memory_high")
        );
    }
}
