//! The safety gate every action passes before an actuator runs it.
//!
//! Pure: it decides from what it has seen and the time it is given, and remembers what it
//! allowed. The rules, in the order they are checked:
//! 1. the mode, global and per action kind (`auto`, `dry-run`, `off`; the stricter wins);
//! 2. never restart, signal or resize the target because a dependency is down (a restart
//!    cannot bring PostgreSQL or a provider back, and a restart loop makes things worse);
//! 3. one action at a time per target: none while the previous one is being verified;
//! 4. an open circuit for the signature: repair stopped, a human has been called;
//! 5. a cooldown per (target, action kind);
//! 6. a budget per (target, action kind) per window (e.g. 3 restarts in 15 minutes): the
//!    action that would exceed it opens the circuit for its signature instead of running, and
//!    that decision asks for an escalation, once.
//!
//! Dry-run decisions run nothing and so spend no budget and start no cooldown; every decision,
//! taken or skipped, is for the caller to write to the audit log.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How far automatic repair may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Act.
    Auto,
    /// Decide and record what would run; run nothing.
    DryRun,
    /// Neither act nor record a would-be action.
    Off,
}

/// What kind of change an action makes; cooldowns and budgets are per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Restart,
    Signal,
    Resize,
    CancelQuery,
    TerminateSession,
    Analyze,
    Hook,
}

impl ActionKind {
    /// Actions on the target's process itself, which a dependency outage must never trigger.
    pub fn touches_target_process(self) -> bool {
        matches!(self, Self::Restart | Self::Signal | Self::Resize)
    }
}

/// The gate's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    pub mode: Mode,
    /// Modes per kind; the stricter of this and `mode` applies.
    pub modes: HashMap<ActionKind, Mode>,
    /// Time after an action before the same kind may run again on the same target.
    pub cooldown: Duration,
    /// At most this many actions of one kind on one target per `window`.
    pub budget: u32,
    pub window: Duration,
    /// An open circuit closes by itself after this long (or when a human resets it).
    pub circuit_reset_after: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            modes: HashMap::new(),
            cooldown: Duration::from_mins(1),
            budget: 3,
            window: Duration::from_mins(15),
            circuit_reset_after: Duration::from_hours(1),
        }
    }
}

impl GateConfig {
    /// The gate of `[repair]`.
    pub fn from_config(repair: &crate::config::RepairConfig) -> Self {
        Self {
            mode: repair.effective_mode(),
            modes: repair.modes.clone(),
            cooldown: Duration::from_secs(repair.cooldown_secs),
            budget: repair.budget,
            window: Duration::from_secs(repair.window_secs),
            circuit_reset_after: Duration::from_secs(repair.circuit_reset_secs),
        }
    }
}

/// An action a repair wants to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub target: String,
    pub kind: ActionKind,
    /// The diagnosis signature it answers (`target.crashed`, `db.lock_contention`, …).
    pub signature: String,
    /// A dependency of the target (PostgreSQL, a provider) is down now.
    pub dependency_down: bool,
}

/// Why an action did not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Skip {
    /// The playbook names no action for the signature: alert only (the repair agent records
    /// this; the gate never answers it).
    NoAction,
    ModeOff,
    DependencyDown,
    /// The target's previous action (of this kind) is still being verified.
    Verifying {
        kind: ActionKind,
    },
    CircuitOpen {
        signature: String,
        /// Seconds until it closes by itself.
        closes_in_secs: u64,
    },
    Cooldown {
        remaining_secs: u64,
    },
    /// The budget is spent: the circuit opened now for the signature.
    BudgetExhausted {
        budget: u32,
        window_secs: u64,
    },
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Run it; call [`Gate::verified`] when its verification ends.
    Run,
    /// Record it as what would have run.
    DryRun,
    Skip {
        #[serde(flatten)]
        why: Skip,
        /// Call a human: set once, on the decision that opened the circuit.
        escalate: bool,
    },
}

/// The gate, shared by the repair agent (which decides) and the API (which shows the open
/// circuits and lets a human close one).
pub type SharedGate = std::sync::Arc<std::sync::Mutex<Gate>>;

pub fn shared(config: GateConfig) -> SharedGate {
    std::sync::Arc::new(std::sync::Mutex::new(Gate::new(config)))
}

/// The gate's memory.
#[derive(Debug)]
pub struct Gate {
    config: GateConfig,
    /// When each (target, kind) ran, oldest first, within the budget window.
    runs: HashMap<(String, ActionKind), VecDeque<Instant>>,
    /// Actions being verified, per target.
    verifying: HashMap<String, ActionKind>,
    /// Open circuits: signature → when opened.
    circuits: HashMap<String, Instant>,
}

fn secs_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

impl Gate {
    pub fn new(config: GateConfig) -> Self {
        Self {
            config,
            runs: HashMap::new(),
            verifying: HashMap::new(),
            circuits: HashMap::new(),
        }
    }

    /// The mode that applies to `kind`.
    pub fn mode(&self, kind: ActionKind) -> Mode {
        self.config
            .modes
            .get(&kind)
            .map_or(self.config.mode, |m| (*m).max(self.config.mode))
    }

    /// Decides on `request` at `now`; a `Run` is remembered (cooldown, budget, verification).
    pub fn decide(&mut self, request: &Request, now: Instant) -> Decision {
        let skip = |why| Decision::Skip {
            why,
            escalate: false,
        };
        let mode = self.mode(request.kind);
        if mode == Mode::Off {
            return skip(Skip::ModeOff);
        }
        if request.dependency_down && request.kind.touches_target_process() {
            return skip(Skip::DependencyDown);
        }
        if let Some(kind) = self.verifying.get(&request.target) {
            return skip(Skip::Verifying { kind: *kind });
        }
        if let Some(opened) = self.circuits.get(&request.signature).copied() {
            let open_for = now.saturating_duration_since(opened);
            if open_for < self.config.circuit_reset_after {
                return skip(Skip::CircuitOpen {
                    signature: request.signature.clone(),
                    closes_in_secs: secs_up(
                        self.config.circuit_reset_after.saturating_sub(open_for),
                    ),
                });
            }
            self.circuits.remove(&request.signature);
        }
        let key = (request.target.clone(), request.kind);
        let window = self.config.window;
        let runs = self.runs.entry(key).or_default();
        while runs
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            runs.pop_front();
        }
        if let Some(last) = runs.back() {
            let since = now.saturating_duration_since(*last);
            if since < self.config.cooldown {
                return skip(Skip::Cooldown {
                    remaining_secs: secs_up(self.config.cooldown.saturating_sub(since)),
                });
            }
        }
        if runs.len() >= self.config.budget as usize {
            self.circuits.insert(request.signature.clone(), now);
            return Decision::Skip {
                why: Skip::BudgetExhausted {
                    budget: self.config.budget,
                    window_secs: window.as_secs(),
                },
                escalate: true,
            };
        }
        if mode == Mode::DryRun {
            return Decision::DryRun;
        }
        runs.push_back(now);
        self.verifying.insert(request.target.clone(), request.kind);
        Decision::Run
    }

    /// The verification of `target`'s action has ended (recovered or not).
    pub fn verified(&mut self, target: &str) {
        self.verifying.remove(target);
    }

    /// Forgets every verification in progress (their walks are gone: the repair agent
    /// restarted).
    pub fn clear_verifying(&mut self) {
        self.verifying.clear();
    }

    /// A human closes the circuit of `signature`, and with it gives the budgets a fresh
    /// window (the runs that spent them are forgotten, or the next action would open the
    /// circuit again at once); whether it was open.
    pub fn reset(&mut self, signature: &str) -> bool {
        let was_open = self.circuits.remove(signature).is_some();
        if was_open {
            self.runs.clear();
        }
        was_open
    }

    /// Signatures whose circuit is open at `now`.
    pub fn open_circuits(&self, now: Instant) -> Vec<String> {
        let mut open: Vec<String> = self
            .circuits
            .iter()
            .filter(|(_, opened)| {
                now.saturating_duration_since(**opened) < self.config.circuit_reset_after
            })
            .map(|(signature, _)| signature.clone())
            .collect();
        open.sort();
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart(target: &str) -> Request {
        Request {
            target: target.to_owned(),
            kind: ActionKind::Restart,
            signature: "target.crashed".to_owned(),
            dependency_down: false,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn why(decision: Decision) -> Skip {
        match decision {
            Decision::Skip { why, .. } => why,
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    #[test]
    fn a_crash_loop_spends_the_budget_then_opens_the_circuit_and_escalates_once() {
        let mut gate = Gate::new(GateConfig::default());
        let t0 = Instant::now();
        for i in 0..3 {
            let at = t0 + secs(61 * i);
            assert_eq!(
                gate.decide(&restart("backend"), at),
                Decision::Run,
                "restart {i}"
            );
            gate.verified("backend");
        }
        let fourth = gate.decide(&restart("backend"), t0 + secs(200));
        assert_eq!(
            fourth,
            Decision::Skip {
                why: Skip::BudgetExhausted {
                    budget: 3,
                    window_secs: 900
                },
                escalate: true
            }
        );
        let fifth = gate.decide(&restart("backend"), t0 + secs(300));
        assert!(
            matches!(
                fifth,
                Decision::Skip {
                    why: Skip::CircuitOpen { .. },
                    escalate: false
                }
            ),
            "{fifth:?}"
        );
        assert_eq!(gate.open_circuits(t0 + secs(300)), vec!["target.crashed"]);
        // A human resets it: the budget starts afresh, so automatic repair resumes.
        assert!(gate.reset("target.crashed"));
        assert!(!gate.reset("target.crashed"), "closed already");
        assert!(gate.open_circuits(t0 + secs(400)).is_empty());
        assert_eq!(
            gate.decide(&restart("backend"), t0 + secs(400)),
            Decision::Run
        );
        gate.verified("backend");
        // Without a human, the circuit closes by itself after an hour; the restarts that
        // opened it have left the window by then.
        let mut gate = Gate::new(GateConfig::default());
        for i in 0..3 {
            assert_eq!(
                gate.decide(&restart("backend"), t0 + secs(61 * i)),
                Decision::Run
            );
            gate.verified("backend");
        }
        assert!(matches!(
            why(gate.decide(&restart("backend"), t0 + secs(200))),
            Skip::BudgetExhausted { .. }
        ));
        assert!(matches!(
            why(gate.decide(&restart("backend"), t0 + secs(3000))),
            Skip::CircuitOpen { .. }
        ));
        assert_eq!(
            gate.decide(&restart("backend"), t0 + secs(3801)),
            Decision::Run
        );
    }

    #[test]
    fn cooldown_verification_and_dependencies_hold_actions_back() {
        let mut gate = Gate::new(GateConfig::default());
        let t0 = Instant::now();
        assert_eq!(gate.decide(&restart("backend"), t0), Decision::Run);
        assert_eq!(
            why(gate.decide(&restart("backend"), t0 + secs(1))),
            Skip::Verifying {
                kind: ActionKind::Restart
            }
        );
        // Another target is independent.
        assert_eq!(gate.decide(&restart("worker"), t0 + secs(1)), Decision::Run);
        gate.verified("backend");
        assert_eq!(
            why(gate.decide(&restart("backend"), t0 + secs(20))),
            Skip::Cooldown { remaining_secs: 40 }
        );
        let mut during_outage = restart("backend");
        during_outage.dependency_down = true;
        assert_eq!(
            why(gate.decide(&during_outage, t0 + secs(120))),
            Skip::DependencyDown
        );
        // Ending the outage's own sessions is still allowed while PostgreSQL is slow.
        let cancel = Request {
            kind: ActionKind::CancelQuery,
            signature: "db.slow_query".to_owned(),
            ..during_outage
        };
        assert_eq!(gate.decide(&cancel, t0 + secs(120)), Decision::Run);
    }

    #[test]
    fn modes_apply_per_kind_and_the_stricter_wins() {
        let mut config = GateConfig {
            mode: Mode::DryRun,
            ..GateConfig::default()
        };
        config.modes.insert(ActionKind::Restart, Mode::Auto);
        config.modes.insert(ActionKind::Hook, Mode::Off);
        let mut gate = Gate::new(config);
        let t0 = Instant::now();
        assert_eq!(
            gate.mode(ActionKind::Restart),
            Mode::DryRun,
            "global dry-run wins"
        );
        assert_eq!(gate.decide(&restart("backend"), t0), Decision::DryRun);
        // Dry runs spend no budget, start no cooldown and lock nothing.
        for i in 1..10 {
            assert_eq!(
                gate.decide(&restart("backend"), t0 + secs(i)),
                Decision::DryRun
            );
        }
        let hook = Request {
            kind: ActionKind::Hook,
            ..restart("backend")
        };
        assert_eq!(why(gate.decide(&hook, t0)), Skip::ModeOff);
    }

    #[test]
    fn decisions_serialize_for_the_audit_log() {
        let decision = Decision::Skip {
            why: Skip::Cooldown { remaining_secs: 5 },
            escalate: false,
        };
        assert_eq!(
            serde_json::to_string(&decision).expect("json"),
            r#"{"decision":"skip","reason":"cooldown","remaining_secs":5,"escalate":false}"#
        );
        assert_eq!(
            serde_json::to_string(&Decision::Run).expect("json"),
            r#"{"decision":"run"}"#
        );
    }
}
