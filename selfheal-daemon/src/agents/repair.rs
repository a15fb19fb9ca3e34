//! Repair: answers each diagnosis with the action its playbook names.
//!
//! This version has no actuators yet (they come with the healing loop), so every action is
//! published as `Proposed`, with the reason, and nothing on the host is touched.

use super::{AgentContext, AgentError};
use crate::bus::{Event, RepairOutcome};

/// The first action the default playbook names for a signature.
pub(super) fn playbook(signature: &str) -> Option<&'static str> {
    Some(match signature {
        "target.crashed" | "target.oom_killed" => "restart",
        "target.memory_leak" | "target.memory_high" => "raise_memory_limit_or_restart",
        "target.cpu_throttled" => "raise_cpu_quota",
        "target.cpu_saturated" => "none",
        _ => return None,
    })
}

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    loop {
        if let Event::Diagnosis { signature, .. } = ctx.next().await? {
            let Some(action) = playbook(&signature) else {
                continue;
            };
            let detail = if ctx.config.repair.self_healing {
                "no actuator is available in this version; the action is proposed only"
            } else {
                "self-healing is off (repair.self_healing / ENABLE_SELF_HEALING); the action is proposed only"
            };
            ctx.publish(Event::Repair {
                signature,
                action: action.to_owned(),
                outcome: RepairOutcome::Proposed,
                detail: detail.to_owned(),
            });
        }
    }
}
