//! The repairs log and the learned patterns, in the state DB.
//!
//! Owns: the `repairs` table (the audit of every repair decision: written when the safety
//! gate decides, before anything runs, and updated when the action has run and its recovery
//! has been verified or not), the `patterns` table (per signature and action: attempts,
//! successes, time to recover; written by the learning agent), and [`rank`], which orders a
//! playbook's candidates by what has worked. Must not: act on anything (that is
//! `actuators`).

pub mod playbook;

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, Connection};
use serde::Serialize;

use crate::{
    actuators::{gate::Decision, Effect},
    state::{StateDb, StateError},
};

/// A diagnosis as the API shows it: what the diagnostic agent published, and the LLM summary
/// when one was asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiagnosisRow {
    pub id: i64,
    pub at_ms: i64,
    pub rule: String,
    pub labels: BTreeMap<String, String>,
    pub signature: String,
    pub summary: String,
    pub confidence: f64,
    pub evidence: Vec<String>,
    pub actions: Vec<String>,
    pub dependency_down: Option<String>,
    pub llm_summary: Option<String>,
    pub llm_error: Option<String>,
}

/// A decision to write.
#[derive(Debug, Clone)]
pub struct NewRepair {
    pub diagnosis_id: Option<i64>,
    pub at_ms: i64,
    pub target: String,
    pub signature: String,
    pub rule: String,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub action: String,
    pub decision: Decision,
    /// Why it did not run when the gate let it (the action is not available here).
    pub error: Option<String>,
}

/// A row of the repairs log, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Repair {
    pub id: i64,
    pub diagnosis_id: Option<i64>,
    pub at_ms: i64,
    pub target: String,
    pub signature: String,
    pub rule: String,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub action: String,
    pub decision: serde_json::Value,
    /// `running`, `verifying`, `recovered`, `failed`, `skipped` or `dry_run`.
    pub state: String,
    pub effects: Option<serde_json::Value>,
    pub error: Option<String>,
    pub finished_at_ms: Option<i64>,
    pub recover_ms: Option<i64>,
}

/// What was learned about one (signature, action).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub attempts: u64,
    pub successes: u64,
    /// Summed over the successes.
    pub total_recover_ms: u64,
}

impl Stats {
    pub fn mean_recover_ms(&self) -> Option<u64> {
        (self.successes > 0).then(|| self.total_recover_ms / self.successes)
    }
}

/// A row of the patterns table, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pattern {
    pub signature: String,
    pub action: String,
    pub attempts: u64,
    pub successes: u64,
    pub failures: u64,
    pub success_rate: f64,
    pub mean_recover_ms: Option<u64>,
    pub last_outcome: String,
    pub last_at_ms: i64,
}

/// A candidate with its place in the learned order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub action: String,
    /// The expected success rate (playbook prior plus what was seen) and the exploration
    /// bonus of an action tried less often; the order is by their sum.
    pub expected: f64,
    pub bonus: f64,
    pub stats: Stats,
}

/// The prior success rate of a playbook's `position`-th candidate, worth `PRIOR_WEIGHT`
/// attempts: the playbook's order holds until experience says otherwise.
fn prior(position: usize) -> f64 {
    (0.75 - 0.1 * position as f64).max(0.3)
}

const PRIOR_WEIGHT: f64 = 2.0;

/// Orders `candidates` (the playbook's order) by expected success plus an exploration bonus
/// (UCB1, scaled by `exploration`); ties go to the faster recovery, then to the playbook.
pub fn rank<S: std::hash::BuildHasher>(
    candidates: &[String],
    learned: &HashMap<String, Stats, S>,
    exploration: f64,
) -> Vec<Ranked> {
    let total: u64 = candidates
        .iter()
        .filter_map(|c| learned.get(c))
        .map(|s| s.attempts)
        .sum();
    let mut ranked: Vec<(usize, Ranked)> = candidates
        .iter()
        .enumerate()
        .map(|(position, action)| {
            let stats = learned.get(action).copied().unwrap_or_default();
            let expected = (stats.successes as f64 + prior(position) * PRIOR_WEIGHT)
                / (stats.attempts as f64 + PRIOR_WEIGHT);
            let bonus = if total == 0 {
                0.0
            } else {
                exploration * ((total as f64 + 1.0).ln() / (stats.attempts as f64 + 1.0)).sqrt()
            };
            (
                position,
                Ranked {
                    action: action.clone(),
                    expected,
                    bonus,
                    stats,
                },
            )
        })
        .collect();
    ranked.sort_by(|(pa, a), (pb, b)| {
        (b.expected + b.bonus)
            .total_cmp(&(a.expected + a.bonus))
            .then_with(|| {
                let speed = |r: &Ranked| r.stats.mean_recover_ms().unwrap_or(u64::MAX);
                speed(a).cmp(&speed(b))
            })
            .then(pa.cmp(pb))
    });
    ranked.into_iter().map(|(_, r)| r).collect()
}

/// The repairs log and the patterns, over the state DB. Cheap to clone.
#[derive(Clone)]
pub struct RepairLog {
    db: StateDb,
}

fn state_of(decision: &Decision) -> &'static str {
    match decision {
        Decision::Run => "running",
        Decision::DryRun => "dry_run",
        Decision::Skip { .. } => "skipped",
    }
}

impl RepairLog {
    pub fn new(db: StateDb) -> Self {
        Self { db }
    }

    /// Marks the repairs a previous run of the daemon left running or verifying as failed:
    /// their outcome was never seen. Returns how many.
    pub async fn interrupted(&self, now_ms: i64) -> Result<usize, StateError> {
        self.db
            .call("repairs_interrupted", move |c| {
                c.execute(
                    "UPDATE repairs SET state = 'failed', finished_at_ms = ?1, \
                     error = 'the daemon stopped before the repair was verified' \
                     WHERE state IN ('running', 'verifying')",
                    params![now_ms],
                )
            })
            .await
    }

    /// Records an operator's change to the repair machinery (a circuit closed) in the audit.
    pub async fn audit(
        &self,
        at_ms: i64,
        actor: String,
        action: &'static str,
        note: String,
    ) -> Result<(), StateError> {
        self.db
            .call("repair_audit", move |c| {
                c.execute(
                    "INSERT INTO audit (at_ms, actor, action, note) VALUES (?1, ?2, ?3, ?4)",
                    params![at_ms, actor, action, note],
                )
                .map(|_| ())
            })
            .await
    }

    /// Writes a diagnosis; returns its id.
    pub async fn diagnosed(
        &self,
        at_ms: i64,
        diagnosis: crate::bus::Diagnosis,
    ) -> Result<i64, StateError> {
        self.db
            .call("diagnosis_written", move |c| {
                let list = |v: &[String]| serde_json::to_string(v).unwrap_or_default();
                c.execute(
                    "INSERT INTO diagnoses (at_ms, rule, labels, signature, summary, confidence, \
                     evidence, actions, dependency_down) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        at_ms,
                        diagnosis.rule,
                        serde_json::to_string(&diagnosis.labels).unwrap_or_default(),
                        diagnosis.signature,
                        diagnosis.summary,
                        diagnosis.confidence,
                        list(&diagnosis.evidence),
                        list(&diagnosis.actions),
                        diagnosis.dependency_down,
                    ],
                )?;
                Ok(c.last_insert_rowid())
            })
            .await
    }

    /// Adds the LLM summary of diagnosis `id`, or why there is none.
    pub async fn explained(
        &self,
        id: i64,
        outcome: Result<String, String>,
    ) -> Result<(), StateError> {
        let (summary, error) = match outcome {
            Ok(summary) => (Some(summary), None),
            Err(error) => (None, Some(error)),
        };
        self.db
            .call("diagnosis_explained", move |c| {
                c.execute(
                    "UPDATE diagnoses SET llm_summary = ?2, llm_error = ?3 WHERE id = ?1",
                    params![id, summary, error],
                )
                .map(|_| ())
            })
            .await
    }

    /// The newest diagnoses first, at most `limit`.
    pub async fn diagnoses(&self, limit: usize) -> Result<Vec<DiagnosisRow>, StateError> {
        self.db
            .call("diagnoses_list", move |c| diagnoses(c, limit))
            .await
    }

    /// Writes a decision (before anything runs); returns its id.
    pub async fn decided(&self, repair: NewRepair) -> Result<i64, StateError> {
        self.db
            .call("repair_decided", move |c| insert(c, &repair))
            .await
    }

    /// The action ran; its effects are known and its recovery is being verified.
    pub async fn verifying(&self, id: i64, effects: Vec<Effect>) -> Result<(), StateError> {
        let effects = serde_json::to_string(&effects).unwrap_or_default();
        self.db
            .call("repair_verifying", move |c| {
                c.execute(
                    "UPDATE repairs SET state = 'verifying', effects = ?2 WHERE id = ?1",
                    params![id, effects],
                )
                .map(|_| ())
            })
            .await
    }

    /// The repair ended: recovered (with the time it took) or failed (with why).
    pub async fn finished(
        &self,
        id: i64,
        at_ms: i64,
        recover_ms: Option<u64>,
        error: Option<String>,
    ) -> Result<(), StateError> {
        let state = if recover_ms.is_some() {
            "recovered"
        } else {
            "failed"
        };
        let recover_ms = recover_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
        self.db
            .call("repair_finished", move |c| {
                c.execute(
                    "UPDATE repairs SET state = ?2, finished_at_ms = ?3, recover_ms = ?4, \
                     error = coalesce(?5, error) WHERE id = ?1",
                    params![id, state, at_ms, recover_ms, error],
                )
                .map(|_| ())
            })
            .await
    }

    /// The newest repairs first, at most `limit`, of one signature when given.
    pub async fn list(
        &self,
        limit: usize,
        signature: Option<String>,
    ) -> Result<Vec<Repair>, StateError> {
        self.db
            .call("repairs_list", move |c| {
                list(c, limit, signature.as_deref())
            })
            .await
    }

    /// The repairs log in figures: decisions by state.
    pub async fn counts(&self) -> Result<Counts, StateError> {
        self.db.call("repairs_counts", |c| counts(c)).await
    }

    /// Records the outcome of one action that ran (the learning agent).
    pub async fn learn(
        &self,
        signature: String,
        action: String,
        recover_ms: Option<u64>,
        at_ms: i64,
    ) -> Result<(), StateError> {
        self.db
            .call("pattern_learned", move |c| {
                learn(c, &signature, &action, recover_ms, at_ms)
            })
            .await
    }

    /// What was learned about the actions of `signature`.
    pub async fn learned(&self, signature: String) -> Result<HashMap<String, Stats>, StateError> {
        self.db
            .call("patterns_of", move |c| learned(c, &signature))
            .await
    }

    /// Every learned pattern, by signature and then success rate.
    pub async fn patterns(&self) -> Result<Vec<Pattern>, StateError> {
        self.db.call("patterns_list", patterns).await
    }
}

fn insert(c: &Connection, repair: &NewRepair) -> rusqlite::Result<i64> {
    let finished = (!matches!(repair.decision, Decision::Run)).then_some(repair.at_ms);
    let state = if repair.error.is_some() {
        "failed"
    } else {
        state_of(&repair.decision)
    };
    c.execute(
        "INSERT INTO repairs (at_ms, target, signature, rule, labels, summary, action, \
         decision, state, error, finished_at_ms, diagnosis_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            repair.at_ms,
            repair.target,
            repair.signature,
            repair.rule,
            serde_json::to_string(&repair.labels).unwrap_or_default(),
            repair.summary,
            repair.action,
            serde_json::to_string(&repair.decision).unwrap_or_default(),
            state,
            repair.error,
            finished.or(repair.error.as_ref().map(|_| repair.at_ms)),
            repair.diagnosis_id,
        ],
    )?;
    Ok(c.last_insert_rowid())
}

/// A JSON column as `T`; `None` when empty or not that shape.
fn json<T: serde::de::DeserializeOwned>(text: Option<String>) -> Option<T> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// The repairs log's decisions by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Every decision kept, skipped and dry-run ones included.
    pub total: i64,
    /// Actions that ran and were verified.
    pub recovered: i64,
    pub failed: i64,
    /// Running or being verified now.
    pub active: i64,
    pub skipped: i64,
    pub dry_run: i64,
    /// Recovered among the actions that ran and ended (recovered + failed); `None` before any.
    pub success_rate: Option<f64>,
}

fn counts(c: &Connection) -> rusqlite::Result<Counts> {
    c.query_row(
        "SELECT count(*), count(*) FILTER (WHERE state = 'recovered'), \
         count(*) FILTER (WHERE state = 'failed'), \
         count(*) FILTER (WHERE state IN ('running', 'verifying')), \
         count(*) FILTER (WHERE state = 'skipped'), count(*) FILTER (WHERE state = 'dry_run') \
         FROM repairs",
        [],
        |row| {
            let (recovered, failed): (i64, i64) = (row.get(1)?, row.get(2)?);
            Ok(Counts {
                total: row.get(0)?,
                recovered,
                failed,
                active: row.get(3)?,
                skipped: row.get(4)?,
                dry_run: row.get(5)?,
                success_rate: (recovered + failed > 0)
                    .then(|| recovered as f64 / (recovered + failed) as f64),
            })
        },
    )
}

fn list(c: &Connection, limit: usize, signature: Option<&str>) -> rusqlite::Result<Vec<Repair>> {
    let mut statement = c.prepare(
        "SELECT id, at_ms, target, signature, rule, labels, summary, action, decision, state, \
         effects, error, finished_at_ms, recover_ms, diagnosis_id FROM repairs \
         WHERE ?1 IS NULL OR signature = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = statement.query_map(
        params![signature, i64::try_from(limit).unwrap_or(i64::MAX)],
        |row| {
            Ok(Repair {
                id: row.get(0)?,
                at_ms: row.get(1)?,
                target: row.get(2)?,
                signature: row.get(3)?,
                rule: row.get(4)?,
                labels: json(row.get(5)?).unwrap_or_default(),
                summary: row.get(6)?,
                action: row.get(7)?,
                decision: json(row.get(8)?).unwrap_or(serde_json::Value::Null),
                state: row.get(9)?,
                effects: json(row.get(10)?),
                error: row.get(11)?,
                finished_at_ms: row.get(12)?,
                recover_ms: row.get(13)?,
                diagnosis_id: row.get(14)?,
            })
        },
    )?;
    rows.collect()
}

fn diagnoses(c: &Connection, limit: usize) -> rusqlite::Result<Vec<DiagnosisRow>> {
    let mut statement = c.prepare(
        "SELECT id, at_ms, rule, labels, signature, summary, confidence, evidence, actions, \
         dependency_down, llm_summary, llm_error FROM diagnoses ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = statement.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
        Ok(DiagnosisRow {
            id: row.get(0)?,
            at_ms: row.get(1)?,
            rule: row.get(2)?,
            labels: json(row.get(3)?).unwrap_or_default(),
            signature: row.get(4)?,
            summary: row.get(5)?,
            confidence: row.get(6)?,
            evidence: json(row.get(7)?).unwrap_or_default(),
            actions: json(row.get(8)?).unwrap_or_default(),
            dependency_down: row.get(9)?,
            llm_summary: row.get(10)?,
            llm_error: row.get(11)?,
        })
    })?;
    rows.collect()
}

fn learn(
    c: &Connection,
    signature: &str,
    action: &str,
    recover_ms: Option<u64>,
    at_ms: i64,
) -> rusqlite::Result<()> {
    let succeeded = i64::from(recover_ms.is_some());
    let recover = recover_ms.map_or(0, |ms| i64::try_from(ms).unwrap_or(i64::MAX));
    let outcome = if recover_ms.is_some() {
        "succeeded"
    } else {
        "failed"
    };
    c.execute(
        "INSERT INTO patterns (signature, action, attempts, successes, total_recover_ms, \
         last_outcome, last_at_ms) VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6) \
         ON CONFLICT (signature, action) DO UPDATE SET attempts = attempts + 1, \
         successes = successes + ?3, total_recover_ms = total_recover_ms + ?4, \
         last_outcome = ?5, last_at_ms = ?6",
        params![signature, action, succeeded, recover, outcome, at_ms],
    )?;
    Ok(())
}

fn learned(c: &Connection, signature: &str) -> rusqlite::Result<HashMap<String, Stats>> {
    let mut statement = c.prepare(
        "SELECT action, attempts, successes, total_recover_ms FROM patterns WHERE signature = ?1",
    )?;
    let rows = statement.query_map(params![signature], |row| {
        Ok((
            row.get::<_, String>(0)?,
            Stats {
                attempts: row.get(1)?,
                successes: row.get(2)?,
                total_recover_ms: row.get(3)?,
            },
        ))
    })?;
    rows.collect()
}

fn patterns(c: &mut Connection) -> rusqlite::Result<Vec<Pattern>> {
    let mut statement = c.prepare(
        "SELECT signature, action, attempts, successes, total_recover_ms, last_outcome, \
         last_at_ms FROM patterns ORDER BY signature, \
         CAST(successes AS REAL) / attempts DESC, action",
    )?;
    let rows = statement.query_map([], |row| {
        let stats = Stats {
            attempts: row.get(2)?,
            successes: row.get(3)?,
            total_recover_ms: row.get(4)?,
        };
        Ok(Pattern {
            signature: row.get(0)?,
            action: row.get(1)?,
            attempts: stats.attempts,
            successes: stats.successes,
            failures: stats.attempts.saturating_sub(stats.successes),
            success_rate: if stats.attempts == 0 {
                0.0
            } else {
                stats.successes as f64 / stats.attempts as f64
            },
            mean_recover_ms: stats.mean_recover_ms(),
            last_outcome: row.get(5)?,
            last_at_ms: row.get(6)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests;
