//! Security: flags bursts of reset or refused connections to or from the target, the first
//! sign of a scan or a flood; the firewall actuator comes later.

use std::time::Duration;

use super::{AgentContext, AgentError};
use crate::bus::Event;

/// Resets plus failed connects in one interval that count as a burst.
const BURST: u64 = 50;
const COOLDOWN: Duration = Duration::from_mins(5);

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let mut cooldown = super::Cooldown::new(COOLDOWN);
    loop {
        if let Event::TcpSummary(summary) = ctx.next().await? {
            let bad = summary.resets + summary.connect_failures;
            if bad >= BURST && cooldown.pass() {
                ctx.publish(Event::Security {
                    kind: "connection_burst".to_owned(),
                    detail: format!(
                        "{} resets and {} failed connects in one interval",
                        summary.resets, summary.connect_failures
                    ),
                });
            }
        }
    }
}
