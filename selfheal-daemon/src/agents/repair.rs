//! Repair: answers each diagnosis by walking its candidate actions, in the order learning gives
//! them, through the safety gate; runs the first one the gate lets through, verifies the
//! recovery (the alert clears and the target's own health checks pass) within
//! `repair.verify_timeout_secs`, and goes on to the next candidate if it did not work. When
//! none works, or the gate's budget for the signature is spent, it raises the critical
//! `repair.escalated` alert (label `signature`), which clears with the alert it was about.
//!
//! Every decision is written to the repairs log before anything runs, and completed after.
//! Self-healing off (the default) makes every decision a dry run: recorded as what would have
//! run, and nothing runs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

use super::{AgentContext, AgentError};
use crate::{
    actuators::{
        action::{self, Host, Step},
        gate::{Decision, Gate, Request, Skip},
        postgres::SessionFilter,
        ActionError,
    },
    alerts::{alert_key, Labels},
    bus::{Diagnosis, Event, RepairOutcome, Severity},
    checks::Checks,
    config::{CheckKind, Config},
    repairs::{rank, NewRepair, RepairLog},
    state::now_ms,
    target::SharedStatus,
};

/// The alert raised when repair gives up on a signature.
pub(super) const ESCALATED: &str = "repair.escalated";

/// The action recorded when the playbook has none for a signature.
const NO_ACTION: &str = "none";

/// What the actions act on, from the config.
fn host(config: &Config, status: SharedStatus) -> Option<Host> {
    let repair = &config.repair;
    let sessions = &repair.sessions;
    // The session actions use the database's URL, else the first enabled PostgreSQL check's.
    let (database_url, database_ca_file) = match &config.database.url {
        Some(url) => (
            Some(url.expose().to_owned()),
            config.database.ca_file.clone(),
        ),
        None => config
            .checks
            .iter()
            .find(|c| c.enabled && c.kind == CheckKind::Postgres && c.url.is_some())
            .map_or((None, None), |c| {
                (
                    c.url.as_ref().map(|u| u.expose().to_owned()),
                    c.ca_file.clone(),
                )
            }),
    };
    Some(Host {
        selector: config.target.selector()?,
        status,
        start_command: repair.start_command.clone(),
        start_log: config.state.dir.join("target-restart.log"),
        stop_timeout: Duration::from_secs(repair.stop_timeout_secs),
        restart_timeout: Duration::from_secs(repair.restart_timeout_secs),
        memory_step_percent: repair.memory_step_percent,
        database_url,
        database_ca_file,
        sessions: SessionFilter {
            application_name: sessions.application_name.clone(),
            user: sessions.user.clone(),
            client_addr: sessions.client_addr.clone(),
        },
        idle_in_transaction: Duration::from_secs(config.monitor.idle_in_transaction_secs),
        running_longer_than: Duration::from_secs(sessions.running_secs),
        hooks: repair.hooks.clone(),
    })
}

/// What a walk needs, shared by every walk.
struct Walker {
    host: Host,
    gate: Arc<Mutex<Gate>>,
    log: RepairLog,
    checks: Checks,
    firing: watch::Receiver<BTreeSet<String>>,
    events: mpsc::Sender<Event>,
    verify_timeout: Duration,
    exploration: f64,
}

/// How a walk ended, for the agent's loop.
enum Walked {
    Done,
    /// Nothing worked: the escalation alert was raised for this alert key.
    Escalated {
        key: String,
        labels: Labels,
    },
}

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let Some(host) = host(&ctx.config, ctx.target.clone()) else {
        // A config without a target does not validate; nothing to repair.
        loop {
            ctx.next().await?;
        }
    };
    let log = ctx.repairs.clone();
    match log.interrupted(now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            repairs = n,
            "repairs left unverified by a previous run marked failed"
        ),
        Err(err) => tracing::warn!(error = %err, "cannot read the repairs log"),
    }
    // A walk aborted with the previous run of this agent verifies nothing any more.
    ctx.gate
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear_verifying();
    let (firing_tx, firing) = watch::channel(BTreeSet::new());
    let (events, mut outbox) = mpsc::channel(64);
    let walker = Arc::new(Walker {
        host,
        gate: ctx.gate.clone(),
        log,
        checks: ctx.checks.clone(),
        firing,
        events,
        verify_timeout: Duration::from_secs(ctx.config.repair.verify_timeout_secs),
        exploration: ctx.config.repair.exploration,
    });
    let mut walks: JoinSet<Walked> = JoinSet::new();
    // Escalations by the alert key they were about.
    let mut escalated: HashMap<String, Labels> = HashMap::new();
    loop {
        tokio::select! {
            event = ctx.next() => match event? {
                Event::Alert { rule, labels, firing, .. } if rule != ESCALATED => {
                    let key = alert_key(&rule, &labels);
                    firing_tx.send_modify(|set| {
                        if firing {
                            set.insert(key.clone());
                        } else {
                            set.remove(&key);
                        }
                    });
                    if !firing {
                        if let Some(labels) = escalated.remove(&key) {
                            ctx.publish(Event::Alert {
                                rule: ESCALATED.to_owned(),
                                labels,
                                severity: Severity::Critical,
                                firing: false,
                                message: format!("{key} cleared"),
                            });
                        }
                    }
                }
                Event::Diagnosis(diagnosis) => {
                    let walker = walker.clone();
                    walks.spawn(async move { walker.walk(diagnosis).await });
                }
                _ => {}
            },
            Some(event) = outbox.recv() => ctx.publish(event),
            Some(ended) = walks.join_next() => {
                if let Ok(Walked::Escalated { key, labels }) = ended {
                    escalated.insert(key, labels);
                }
            }
        }
    }
}

impl Walker {
    fn publish(&self, event: Event) {
        // The agent's loop publishes it; a full queue (64 events behind) drops it, logged.
        if self.events.try_send(event).is_err() {
            tracing::warn!("repair event dropped: the agent's queue is full");
        }
    }

    fn repair_event(
        &self,
        diagnosis: &Diagnosis,
        action: &str,
        outcome: RepairOutcome,
        detail: String,
        repair_id: Option<i64>,
        recover_ms: Option<u64>,
    ) {
        tracing::info!(
            signature = %diagnosis.signature,
            action,
            outcome = outcome.as_str(),
            %detail,
            "repair"
        );
        self.publish(Event::Repair {
            signature: diagnosis.signature.clone(),
            action: action.to_owned(),
            outcome,
            detail,
            repair_id,
            recover_ms,
        });
    }

    fn still_firing(&self, key: &str) -> bool {
        self.firing.borrow().contains(key)
    }

    async fn walk(&self, diagnosis: Diagnosis) -> Walked {
        let key = alert_key(&diagnosis.rule, &diagnosis.labels);
        let learned = self
            .log
            .learned(diagnosis.signature.clone())
            .await
            .unwrap_or_default();
        let ranked = rank(&diagnosis.actions, &learned, self.exploration);
        let target = self.host.selector.to_string();
        if ranked.is_empty() {
            self.no_action(&diagnosis, &target).await;
            return Walked::Done;
        }
        let mut tried = Vec::new();
        let mut escalate = None;
        for candidate in ranked {
            if !self.still_firing(&key) {
                tracing::info!(alert = %key, "the alert cleared before the next repair: nothing more to do");
                return Walked::Done;
            }
            let Some(step) = Step::parse(&candidate.action) else {
                continue;
            };
            let request = Request {
                target: target.clone(),
                kind: step.kind(),
                signature: diagnosis.signature.clone(),
                dependency_down: diagnosis.dependency_down.is_some(),
            };
            let decision = self
                .gate
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .decide(&request, Instant::now());
            let id = self
                .log
                .decided(NewRepair {
                    diagnosis_id: diagnosis.id,
                    at_ms: now_ms(),
                    target: target.clone(),
                    signature: diagnosis.signature.clone(),
                    rule: diagnosis.rule.clone(),
                    labels: diagnosis.labels.clone(),
                    summary: diagnosis.summary.clone(),
                    action: candidate.action.clone(),
                    decision: decision.clone(),
                    error: None,
                })
                .await;
            let id = match id {
                Ok(id) => Some(id),
                Err(err) => {
                    // The audit comes first: an action that cannot be written down does not run.
                    tracing::error!(error = %err, "cannot write the repair decision; nothing runs");
                    if decision == Decision::Run {
                        self.gate
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .verified(&target);
                    }
                    return Walked::Done;
                }
            };
            match decision {
                Decision::DryRun => {
                    self.repair_event(
                        &diagnosis,
                        &candidate.action,
                        RepairOutcome::Proposed,
                        format!(
                            "dry run: would {} ({})",
                            candidate.action,
                            if diagnosis.dependency_down.is_some() {
                                "a dependency is down"
                            } else {
                                "self-healing is off or the mode is dry-run"
                            }
                        ),
                        id,
                        None,
                    );
                    return Walked::Done;
                }
                Decision::Skip {
                    why,
                    escalate: call,
                } => {
                    let why = serde_json::to_string(&why).unwrap_or_default();
                    self.repair_event(
                        &diagnosis,
                        &candidate.action,
                        RepairOutcome::Skipped,
                        format!("held back by the safety gate: {why}"),
                        id,
                        None,
                    );
                    if call {
                        escalate = Some(format!(
                            "the repair budget for {} is spent ({why}); automatic repair stopped",
                            diagnosis.signature
                        ));
                    }
                }
                Decision::Run => {
                    let result = self
                        .run_one(&diagnosis, &key, &step, &candidate.action, id)
                        .await;
                    self.gate
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .verified(&target);
                    match result {
                        Ok(()) => return Walked::Done,
                        Err(why) => tried.push(format!("{}: {why}", candidate.action)),
                    }
                }
            }
        }
        let reason = escalate.or_else(|| {
            (!tried.is_empty()).then(|| format!("no repair worked ({})", tried.join("; ")))
        });
        let Some(reason) = reason else {
            return Walked::Done;
        };
        if !self.still_firing(&key) {
            return Walked::Done;
        }
        let labels: Labels =
            BTreeMap::from([("signature".to_owned(), diagnosis.signature.clone())]);
        self.publish(Event::Alert {
            rule: ESCALATED.to_owned(),
            labels: labels.clone(),
            severity: Severity::Critical,
            firing: true,
            message: format!("{}: {reason}", diagnosis.summary),
        });
        Walked::Escalated { key, labels }
    }

    /// Records that the playbook has nothing to do about the diagnosis (the alert is the
    /// answer: a human's call, or a dependency to bring back).
    async fn no_action(&self, diagnosis: &Diagnosis, target: &str) {
        let decision = Decision::Skip {
            why: Skip::NoAction,
            escalate: false,
        };
        let id = self
            .log
            .decided(NewRepair {
                diagnosis_id: diagnosis.id,
                at_ms: now_ms(),
                target: target.to_owned(),
                signature: diagnosis.signature.clone(),
                rule: diagnosis.rule.clone(),
                labels: diagnosis.labels.clone(),
                summary: diagnosis.summary.clone(),
                action: NO_ACTION.to_owned(),
                decision,
                error: None,
            })
            .await
            .map_err(|err| tracing::warn!(error = %err, "cannot write the repair decision"))
            .ok();
        self.repair_event(
            diagnosis,
            NO_ACTION,
            RepairOutcome::Skipped,
            "the playbook names no action for this signature: alert only".to_owned(),
            id,
            None,
        );
    }

    /// Runs one action and verifies the recovery; `Err` says why it did not work.
    async fn run_one(
        &self,
        diagnosis: &Diagnosis,
        key: &str,
        step: &Step,
        name: &str,
        id: Option<i64>,
    ) -> Result<(), String> {
        self.repair_event(
            diagnosis,
            name,
            RepairOutcome::Started,
            format!("running {name}"),
            id,
            None,
        );
        let started = Instant::now();
        let effects = match action::execute(step, &self.host, diagnosis).await {
            Ok(effects) => effects,
            Err(err) => {
                let outcome = if matches!(err, ActionError::Unavailable(_)) {
                    RepairOutcome::Unavailable
                } else {
                    RepairOutcome::Failed
                };
                let why = crate::app::error_chain(&err);
                return Err(self.failed(diagnosis, name, id, why, outcome).await);
            }
        };
        let changed = effects
            .iter()
            .map(|e| format!("{}: {} → {}", e.subject, e.before, e.after))
            .collect::<Vec<_>>()
            .join("; ");
        if let Some(id) = id {
            let _ = self.log.verifying(id, effects).await;
        }
        if let Err(why) = self.verify(key, started + self.verify_timeout).await {
            let why = format!("{changed}; {why}");
            return Err(self
                .failed(diagnosis, name, id, why, RepairOutcome::Failed)
                .await);
        }
        let recover_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(id) = id {
            let _ = self
                .log
                .finished(id, now_ms(), Some(recover_ms), None)
                .await;
        }
        self.repair_event(
            diagnosis,
            name,
            RepairOutcome::Succeeded,
            format!("{changed}; recovered in {recover_ms} ms"),
            id,
            Some(recover_ms),
        );
        Ok(())
    }

    /// Records that the action did not work (`outcome`: failed, or unavailable here), and
    /// why; the reason back.
    async fn failed(
        &self,
        diagnosis: &Diagnosis,
        action: &str,
        id: Option<i64>,
        why: String,
        outcome: RepairOutcome,
    ) -> String {
        if let Some(id) = id {
            let _ = self
                .log
                .finished(id, now_ms(), None, Some(why.clone()))
                .await;
        }
        self.repair_event(diagnosis, action, outcome, why.clone(), id, None);
        why
    }

    /// Waits until the alert `key` has cleared and every enabled health check of the target
    /// itself (an HTTP check with a platform) passes a run started now.
    async fn verify(&self, key: &str, deadline: Instant) -> Result<(), String> {
        let mut firing = self.firing.clone();
        let until = tokio::time::Instant::from_std(deadline);
        let cleared = tokio::time::timeout_at(until, firing.wait_for(|set| !set.contains(key)));
        if !matches!(cleared.await, Ok(Ok(_))) {
            return Err(format!(
                "the alert {key} did not clear within {} s",
                self.verify_timeout.as_secs()
            ));
        }
        let own: Vec<String> = self
            .checks
            .specs()
            .into_iter()
            .filter(|s| {
                s.enabled
                    && s.misconfigured.is_none()
                    && s.kind == CheckKind::Http
                    && s.platform.is_some()
            })
            .map(|s| s.name)
            .collect();
        for name in own {
            loop {
                let run = tokio::time::timeout_at(until, self.checks.run_now(Some(&name))).await;
                let why = match run {
                    Ok(Ok(results)) => match results.first() {
                        Some((_, latest)) if latest.status.is_up() => break,
                        Some((_, latest)) => latest
                            .message
                            .clone()
                            .unwrap_or_else(|| latest.status.as_str().to_owned()),
                        None => break,
                    },
                    Ok(Err(err)) => err.to_string(),
                    Err(_) => "no answer".to_owned(),
                };
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the alert cleared but health check {name} still fails after {} s: {why}",
                        self.verify_timeout.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }
}
