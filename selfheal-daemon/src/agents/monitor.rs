//! Monitor: turns observations into alerts and an overall health status.
//!
//! Rules in this version: the target exited (critical, clears when a new process runs), and
//! the target's memory (share of its cgroup limit, or of host memory without one) and CPU over
//! their thresholds for `consecutive_samples` samples in a row. A firing threshold rule clears
//! only after as many samples below the threshold less a 10 % hysteresis band, so a value
//! hovering at the line does not flap.
//!
//! A rule's first decision after the agent starts is always published, "cleared" included:
//! the alert manager keeps alerts across restarts, and an alert restored from the state DB
//! must be resolved when its condition turns out to be gone. A "cleared" for a key that is not
//! firing changes nothing there.

use std::collections::BTreeMap;

use super::{AgentContext, AgentError};
use crate::bus::{Event, HealthStatus, Severity, TargetState};

/// A threshold rule with `for`-style counting and hysteresis.
#[derive(Debug, Default)]
pub(super) struct Threshold {
    over: u32,
    under: u32,
    /// `None` until the first decision since the agent started.
    firing: Option<bool>,
}

/// What a sample did to a rule.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Fired,
    Cleared,
    None,
}

impl Threshold {
    pub(super) fn observe(&mut self, value: f64, threshold: f64, needed: u32) -> Change {
        if value > threshold {
            self.over += 1;
            self.under = 0;
        } else if value < threshold * 0.9 {
            self.under += 1;
            self.over = 0;
        } else {
            // Inside the hysteresis band: neither counts.
            self.over = 0;
            self.under = 0;
        }
        if self.firing != Some(true) && self.over >= needed {
            self.firing = Some(true);
            Change::Fired
        } else if self.firing != Some(false) && self.under >= needed {
            self.firing = Some(false);
            Change::Cleared
        } else {
            Change::None
        }
    }
}

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let monitor = ctx.config.monitor.clone();
    let mut memory = Threshold::default();
    let mut cpu = Threshold::default();
    let mut host_memory_bytes = 0u64;
    let mut firing: BTreeMap<&'static str, Severity> = BTreeMap::new();
    let mut health = HealthStatus::Healthy;
    // A target that runs now has not exited: this clears a `target.exited` alert restored
    // from before a restart of the daemon (or of this agent).
    let running = ctx
        .target
        .read()
        .is_ok_and(|status| status.state == TargetState::Running);
    if running {
        ctx.publish(Event::Alert {
            rule: "target.exited".to_owned(),
            labels: BTreeMap::new(),
            severity: Severity::Critical,
            firing: false,
            message: "target running".to_owned(),
        });
    }
    loop {
        let event = ctx.next().await?;
        let mut alert =
            |ctx: &AgentContext, rule: &'static str, severity, on: bool, message: String| {
                if on {
                    firing.insert(rule, severity);
                } else {
                    firing.remove(rule);
                }
                ctx.publish(Event::Alert {
                    rule: rule.to_owned(),
                    labels: BTreeMap::new(),
                    severity,
                    firing: on,
                    message,
                });
            };
        match event {
            Event::TargetExited { pid, status, .. } => {
                alert(
                    &ctx,
                    "target.exited",
                    Severity::Critical,
                    true,
                    format!("target process {pid} exited ({})", status.reason()),
                );
            }
            // Also the first start: it clears an alert restored from before a restart.
            Event::TargetStarted { pid, .. } => {
                alert(
                    &ctx,
                    "target.exited",
                    Severity::Critical,
                    false,
                    format!("target running again as process {pid}"),
                );
            }
            Event::HostSample(sample) => host_memory_bytes = sample.memory_total_bytes,
            Event::ProcessSample(sample) => {
                let limit = sample
                    .cgroup_memory_limit_bytes
                    .unwrap_or(host_memory_bytes);
                let used = sample.cgroup_memory_bytes.unwrap_or(sample.rss_bytes);
                if limit > 0 {
                    let percent = used as f64 / limit as f64 * 100.0;
                    match memory.observe(
                        percent,
                        monitor.memory_threshold_percent,
                        monitor.consecutive_samples,
                    ) {
                        Change::Fired => alert(
                            &ctx,
                            "target.memory_high",
                            Severity::Warning,
                            true,
                            format!(
                                "memory at {percent:.1}% of {limit} bytes (threshold {}%)",
                                monitor.memory_threshold_percent
                            ),
                        ),
                        Change::Cleared => alert(
                            &ctx,
                            "target.memory_high",
                            Severity::Warning,
                            false,
                            format!("memory back to {percent:.1}%"),
                        ),
                        Change::None => {}
                    }
                }
                match cpu.observe(
                    sample.cpu_percent,
                    monitor.cpu_threshold_percent,
                    monitor.consecutive_samples,
                ) {
                    Change::Fired => alert(
                        &ctx,
                        "target.cpu_high",
                        Severity::Warning,
                        true,
                        format!(
                            "CPU at {:.1}% (threshold {}%)",
                            sample.cpu_percent, monitor.cpu_threshold_percent
                        ),
                    ),
                    Change::Cleared => alert(
                        &ctx,
                        "target.cpu_high",
                        Severity::Warning,
                        false,
                        format!("CPU back to {:.1}%", sample.cpu_percent),
                    ),
                    Change::None => {}
                }
            }
            _ => continue,
        }
        let now = match firing.values().max() {
            Some(Severity::Critical) => HealthStatus::Critical,
            Some(_) => HealthStatus::Degraded,
            None => HealthStatus::Healthy,
        };
        if now != health {
            health = now;
            let reason = if firing.is_empty() {
                "no rule is firing".to_owned()
            } else {
                format!(
                    "firing: {}",
                    firing.keys().copied().collect::<Vec<_>>().join(", ")
                )
            };
            ctx.publish(Event::Health {
                status: health,
                reason,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_after_consecutive_samples_and_clears_with_hysteresis() {
        let mut rule = Threshold::default();
        assert_eq!(rule.observe(90.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(90.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(90.0, 85.0, 3), Change::Fired);
        // Hovering just under the line (inside the band) does not clear it.
        for _ in 0..10 {
            assert_eq!(rule.observe(80.0, 85.0, 3), Change::None);
        }
        assert_eq!(rule.observe(50.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(50.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(50.0, 85.0, 3), Change::Cleared);
    }

    #[test]
    fn the_first_decision_is_published_even_when_it_is_cleared() {
        let mut rule = Threshold::default();
        assert_eq!(rule.observe(10.0, 85.0, 2), Change::None);
        assert_eq!(rule.observe(10.0, 85.0, 2), Change::Cleared);
        // Once decided, staying under says nothing more.
        for _ in 0..5 {
            assert_eq!(rule.observe(10.0, 85.0, 2), Change::None);
        }
        assert_eq!(rule.observe(90.0, 85.0, 2), Change::None);
        assert_eq!(rule.observe(90.0, 85.0, 2), Change::Fired);
    }

    #[test]
    fn a_single_spike_does_not_fire() {
        let mut rule = Threshold::default();
        for value in [99.0, 10.0, 99.0, 10.0, 99.0, 99.0] {
            assert_eq!(rule.observe(value, 85.0, 3), Change::None);
        }
    }
}
