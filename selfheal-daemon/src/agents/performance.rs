//! Performance: points out slow outbound connections, a sign of a missing connection pool or
//! a struggling dependency.

use std::time::Duration;

use super::{AgentContext, AgentError};
use crate::bus::Event;

/// A connect slower than this is worth a suggestion.
const SLOW_CONNECT_MS: f64 = 100.0;
const COOLDOWN: Duration = Duration::from_mins(10);

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let mut cooldown = super::Cooldown::new(COOLDOWN);
    loop {
        if let Event::TcpSummary(summary) = ctx.next().await? {
            if summary.max_connect_ms > SLOW_CONNECT_MS && cooldown.pass() {
                ctx.publish(Event::Optimization {
                    area: "connections".to_owned(),
                    suggestion: format!(
                        "outbound connects took up to {:.0} ms ({} in the last interval); reuse connections with a pool",
                        summary.max_connect_ms, summary.connects
                    ),
                });
            }
        }
    }
}
