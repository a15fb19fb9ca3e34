//! Learning: records the outcome of every action that ran — (signature, action, succeeded or
//! not, time to recover) — in the state DB's patterns, which survive restarts. The repair agent
//! orders a playbook's candidates by them (`repairs::rank`); `GET /api/v1/system/patterns`
//! shows them.

use super::{AgentContext, AgentError};
use crate::{
    bus::{Event, RepairOutcome},
    state::now_ms,
};

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    loop {
        if let Event::Repair {
            signature,
            action,
            outcome: outcome @ (RepairOutcome::Succeeded | RepairOutcome::Failed),
            recover_ms,
            ..
        } = ctx.next().await?
        {
            let recover_ms = recover_ms.filter(|_| outcome == RepairOutcome::Succeeded);
            if let Err(err) = ctx
                .repairs
                .learn(signature.clone(), action.clone(), recover_ms, now_ms())
                .await
            {
                tracing::warn!(%signature, %action, error = %err, "cannot record what was learned");
            }
        }
    }
}
