//! Learning: records what was done about each signature and how it turned out.
//!
//! This version keeps the tallies in memory; they move to the state database with the
//! healing loop.

use std::collections::BTreeMap;

use super::{AgentContext, AgentError};
use crate::bus::{Event, RepairOutcome};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tally {
    pub(super) proposed: u64,
    pub(super) succeeded: u64,
    pub(super) failed: u64,
}

pub(super) fn record(
    tallies: &mut BTreeMap<(String, String), Tally>,
    signature: String,
    action: String,
    outcome: RepairOutcome,
) {
    let tally = tallies.entry((signature, action)).or_default();
    match outcome {
        RepairOutcome::Proposed | RepairOutcome::Skipped => tally.proposed += 1,
        RepairOutcome::Succeeded => tally.succeeded += 1,
        RepairOutcome::Failed => tally.failed += 1,
    }
}

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let mut tallies = BTreeMap::new();
    loop {
        if let Event::Repair {
            signature,
            action,
            outcome,
            ..
        } = ctx.next().await?
        {
            record(&mut tallies, signature, action, outcome);
        }
    }
}
