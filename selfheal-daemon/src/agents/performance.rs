//! Performance: points out slow outbound connections, a sign of a missing connection pool or
//! a struggling dependency.

use std::time::{Duration, Instant};

use super::{AgentContext, AgentError};
use crate::bus::Event;

/// A connect slower than this is worth a suggestion.
const SLOW_CONNECT_MS: f64 = 100.0;
const COOLDOWN: Duration = Duration::from_mins(10);

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let mut last: Option<Instant> = None;
    loop {
        if let Event::TcpSummary(summary) = ctx.next().await? {
            if summary.max_connect_ms > SLOW_CONNECT_MS
                && last.is_none_or(|at| at.elapsed() > COOLDOWN)
            {
                last = Some(Instant::now());
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
