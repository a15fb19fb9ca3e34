//! Playbooks: the candidate actions for each diagnosis signature, built in and overridable per
//! signature (`[repair.playbooks]`).

use crate::{
    actuators::action::{Action, HOOK_PREFIX},
    config::RepairConfig,
};

/// Every signature the diagnostic agent gives, with its built-in candidates in order. A
/// signature without candidates is alerted on and never acted on: a restart cannot bring a
/// database back, and a slow target without a known cause is a human's call.
pub const SIGNATURES: &[(&str, &[Action])] = &[
    ("target.crashed", &[Action::Restart]),
    ("target.oom_killed", &[Action::Restart]),
    ("target.hung", &[Action::Restart]),
    ("target.unhealthy", &[Action::Restart]),
    ("target.fd_exhaustion", &[Action::Restart]),
    (
        "target.memory_leak",
        &[Action::RaiseMemoryLimit, Action::Restart],
    ),
    ("target.memory_high", &[]),
    ("target.cpu_throttled", &[]),
    ("target.cpu_saturated", &[]),
    ("target.slow", &[]),
    ("http.error_spike", &[Action::Restart]),
    ("db.unreachable", &[]),
    ("dependency.down", &[]),
    (
        "db.slow_query",
        &[Action::Analyze, Action::CancelSlowQueries],
    ),
    ("db.lock_contention", &[Action::CancelBlockers]),
    (
        "db.idle_in_transaction",
        &[Action::TerminateIdleInTransaction],
    ),
    ("db.pool_exhausted", &[Action::TerminateIdleInTransaction]),
];

pub fn is_signature(name: &str) -> bool {
    SIGNATURES.iter().any(|(s, _)| *s == name)
}

/// The candidate actions for `signature`: the configured playbook, else the built-in one,
/// followed by the hooks configured `on` it that the playbook does not name already.
pub fn candidates(config: &RepairConfig, signature: &str) -> Vec<String> {
    let mut actions = config.playbooks.get(signature).cloned().unwrap_or_else(|| {
        SIGNATURES
            .iter()
            .find(|(s, _)| *s == signature)
            .map(|(_, actions)| actions.iter().map(|a| a.as_str().to_owned()).collect())
            .unwrap_or_default()
    });
    for hook in config
        .hooks
        .iter()
        .filter(|h| h.on.iter().any(|s| s == signature))
    {
        let name = format!("{HOOK_PREFIX}{}", hook.name);
        if !actions.contains(&name) {
            actions.push(name);
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_playbook_replaces_the_built_in_one_for_its_signature_only() {
        let mut config = RepairConfig::default();
        assert_eq!(
            candidates(&config, "target.memory_leak"),
            ["raise_memory_limit", "restart"]
        );
        config
            .playbooks
            .insert("target.memory_leak".to_owned(), vec!["restart".to_owned()]);
        assert_eq!(candidates(&config, "target.memory_leak"), ["restart"]);
        assert_eq!(candidates(&config, "target.crashed"), ["restart"]);
        assert!(candidates(&config, "db.unreachable").is_empty());
        assert!(candidates(&config, "no.such").is_empty());
    }

    #[test]
    fn hooks_on_a_signature_come_after_its_playbook_once() {
        let hook = |name: &str, on: &[&str]| crate::config::HookConfig {
            name: name.to_owned(),
            command: vec!["true".to_owned()],
            url: None,
            timeout_ms: 1000,
            on: on.iter().map(|s| (*s).to_owned()).collect(),
        };
        let mut config = RepairConfig {
            hooks: vec![
                hook("failover", &["dependency.down", "db.unreachable"]),
                hook("flush", &["http.error_spike"]),
            ],
            ..RepairConfig::default()
        };
        assert_eq!(candidates(&config, "dependency.down"), ["hook:failover"]);
        assert_eq!(
            candidates(&config, "http.error_spike"),
            ["restart", "hook:flush"]
        );
        config.playbooks.insert(
            "http.error_spike".to_owned(),
            vec!["hook:flush".to_owned(), "restart".to_owned()],
        );
        assert_eq!(
            candidates(&config, "http.error_spike"),
            ["hook:flush", "restart"]
        );
        assert_eq!(candidates(&config, "target.crashed"), ["restart"]);
    }
}
