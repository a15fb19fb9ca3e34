//! Monitor: turns observations into alerts and an overall health status.
//!
//! Rules in this version: the target exited (critical, clears when a new process runs), and
//! the target's memory (share of its cgroup limit, or of host memory without one), its open
//! file descriptors (`target.fds_high`, share of its `RLIMIT_NOFILE`) and CPU over their
//! thresholds for `consecutive_samples` samples in a row. A firing threshold rule clears
//! only after as many samples below the threshold less a 10 % hysteresis band, so a value
//! hovering at the line does not flap.
//!
//! Integration checks (labels `check` and, when it has one, `platform`): `check.down`
//! (critical) after `alert_after_failures` failed runs in a row, cleared by the first run that
//! works; `check.slow` (warning) after as many slow runs in a row, cleared by a run in time;
//! `db.connections_high` (warning) after as many runs of a PostgreSQL check with connections
//! over its `max_connections_percent`, cleared by a run under it; `db.lock_contention`
//! (warning) after as many runs of a PostgreSQL check that saw sessions waiting on a lock, and
//! `db.idle_in_transaction` (warning) after as many that saw a transaction idle for over
//! `idle_in_transaction_secs`, each cleared by a run without.
//!
//! Traffic (every `interval_ms`, over the trailing `traffic_window_secs`, per platform with the
//! platform's own thresholds where set): `http.latency_high` (warning) when p95 is over
//! `api_response_threshold_ms`; `http.error_rate` when the share of 5xx answers is over
//! `error_rate_warning_percent` (warning) or `error_rate_critical_percent` (critical; the one
//! alert changes severity); `db.query_slow` (warning) when the p95 of all the target's queries
//! is over `db_query_threshold_ms`. A window with fewer than `min_requests` requests (or
//! queries) counts as healthy. Each needs `consecutive_samples` in a row, with hysteresis.
//! `target.not_answering` (critical) when a request has waited over `not_answering_secs` and
//! the target has started no response to anyone since it arrived (a hung target, not one slow
//! request; a service whose only traffic is one long stream looks the same).
//!
//! A rule's first decision after the agent starts is always published, "cleared" included:
//! the alert manager keeps alerts across restarts, and an alert restored from the state DB
//! must be resolved when its condition turns out to be gone. A "cleared" for a key that is not
//! firing changes nothing there.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use super::{AgentContext, AgentError};
use crate::{
    alerts::{alert_key, Labels},
    bus::{CheckReport, Degraded, Event, HealthStatus, Severity, TargetState},
    config::{Config, MonitorConfig},
    traffic::{TrafficHealth, OTHER},
};

/// A threshold rule with `for`-style counting and hysteresis.
#[derive(Debug, Default)]
pub(super) struct Threshold {
    over: u32,
    under: u32,
    /// `None` until the first decision since the agent started.
    firing: Option<bool>,
}

/// What a sample did to a rule.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Fired,
    Cleared,
    None,
}

impl Threshold {
    pub(super) fn observe(&mut self, value: f64, threshold: f64, needed: u32) -> Change {
        if value > threshold {
            self.over += 1;
            self.under = 0;
        } else if value < threshold * 0.9 {
            self.under += 1;
            self.over = 0;
        } else {
            // Inside the hysteresis band: neither counts.
            self.over = 0;
            self.under = 0;
        }
        if self.firing != Some(true) && self.over >= needed {
            self.firing = Some(true);
            Change::Fired
        } else if self.firing != Some(false) && self.under >= needed {
            self.firing = Some(false);
            Change::Cleared
        } else {
            Change::None
        }
    }
}

/// A rule over runs of one check: fires after `needed` matching runs in a row.
#[derive(Debug, Default)]
struct CheckRule {
    count: u32,
    /// `None` until the first decision since the agent started.
    firing: Option<bool>,
}

impl CheckRule {
    /// `matched`: this run shows the condition; `cleared`: this run shows it gone (a run that
    /// does neither, such as a failed run for a slowness rule, keeps the count).
    fn observe(&mut self, matched: bool, cleared: bool, needed: u32) -> Change {
        if matched {
            self.count = self.count.saturating_add(1);
        } else if cleared {
            self.count = 0;
        }
        if self.firing != Some(true) && matched && self.count >= needed {
            self.firing = Some(true);
            Change::Fired
        } else if self.firing != Some(false) && cleared {
            self.firing = Some(false);
            Change::Cleared
        } else {
            Change::None
        }
    }
}

/// The rules of one check.
#[derive(Debug, Default)]
struct CheckRules {
    down: CheckRule,
    slow: CheckRule,
    connections: CheckRule,
    locks: CheckRule,
    idle_in_transaction: CheckRule,
}

/// The alert changes a check's run makes: `(rule, severity, firing, message)`.
fn check_changes(
    rules: &mut CheckRules,
    report: &CheckReport,
    idle_limit_secs: f64,
) -> Vec<(&'static str, Severity, bool, String)> {
    let mut changes = Vec::new();
    let name = &report.check;
    let up = report.status.is_up();
    let needed = report.alert_after_failures.max(1);
    let why = report.message.as_deref().unwrap_or("no detail");
    // Failures are counted by the runner (they survive a restart through the health log).
    let down = report.consecutive_failures >= needed;
    match rules.down.observe(down, up, 1) {
        Change::Fired => changes.push((
            "check.down",
            Severity::Critical,
            true,
            format!(
                "check {name} failed {} times in a row: {why}",
                report.consecutive_failures
            ),
        )),
        Change::Cleared => changes.push((
            "check.down",
            Severity::Critical,
            false,
            format!("check {name} works again"),
        )),
        Change::None => {}
    }
    let slow = report.degraded == Some(Degraded::Slow);
    match rules.slow.observe(slow, up && !slow, needed) {
        Change::Fired => changes.push((
            "check.slow",
            Severity::Warning,
            true,
            format!("check {name} slow {needed} times in a row: {why}"),
        )),
        Change::Cleared => changes.push((
            "check.slow",
            Severity::Warning,
            false,
            format!("check {name} answers in time again"),
        )),
        Change::None => {}
    }
    if report.kind == "postgres" {
        let crowded = report.degraded == Some(Degraded::Connections);
        match rules.connections.observe(crowded, up && !crowded, needed) {
            Change::Fired => changes.push((
                "db.connections_high",
                Severity::Warning,
                true,
                format!("database of check {name}: {why}"),
            )),
            Change::Cleared => changes.push((
                "db.connections_high",
                Severity::Warning,
                false,
                format!("database of check {name}: connections back under the limit"),
            )),
            Change::None => {}
        }
    }
    if let Some(figures) = report.postgres.filter(|_| up) {
        let waiting = figures.waiting_on_locks;
        match rules.locks.observe(waiting > 0, waiting == 0, needed) {
            Change::Fired => changes.push((
                "db.lock_contention",
                Severity::Warning,
                true,
                format!(
                    "database of check {name}: {waiting} sessions wait on a lock, {needed} runs in a row"
                ),
            )),
            Change::Cleared => changes.push((
                "db.lock_contention",
                Severity::Warning,
                false,
                format!("database of check {name}: no session waits on a lock"),
            )),
            Change::None => {}
        }
        let oldest = figures.oldest_idle_in_transaction_seconds;
        let idle = oldest > idle_limit_secs;
        match rules.idle_in_transaction.observe(idle, !idle, needed) {
            Change::Fired => changes.push((
                "db.idle_in_transaction",
                Severity::Warning,
                true,
                format!(
                    "database of check {name}: {} sessions idle in a transaction, the oldest for {oldest:.0} s (over {idle_limit_secs:.0} s)",
                    figures.idle_in_transaction
                ),
            )),
            Change::Cleared => changes.push((
                "db.idle_in_transaction",
                Severity::Warning,
                false,
                format!("database of check {name}: no transaction left idle too long"),
            )),
            Change::None => {}
        }
    }
    changes
}

/// One alert change: `(rule, labels, severity, firing, message)`.
type AlertChange = (&'static str, Labels, Severity, bool, String);

/// The request and query rules' state.
#[derive(Debug, Default)]
struct TrafficRules {
    platforms: HashMap<String, PlatformRules>,
    queries: Threshold,
    not_answering: Threshold,
}

#[derive(Debug, Default)]
struct PlatformRules {
    latency: Threshold,
    errors_warning: Threshold,
    errors_critical: Threshold,
}

/// The alert changes one evaluation of the traffic makes.
fn traffic_changes(
    rules: &mut TrafficRules,
    config: &Config,
    health: &TrafficHealth,
) -> Vec<AlertChange> {
    let monitor: &MonitorConfig = &config.monitor;
    let needed = monitor.consecutive_samples;
    let mut changes = Vec::new();
    // Every configured platform is evaluated, with or without traffic, so an alert restored
    // from before a restart clears when its platform is quiet.
    let mut names: Vec<&str> = config.platforms.iter().map(|p| p.name.as_str()).collect();
    names.push(OTHER);
    for (name, _) in &health.platforms {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    for name in names {
        let figures = health
            .platforms
            .iter()
            .find(|(platform, _)| platform == name)
            .map(|(_, figures)| figures);
        let platform = config.platforms.iter().find(|p| p.name == name);
        let requests = figures.map_or(0, |f| f.requests);
        let enough = requests >= monitor.min_requests;
        let labels = Labels::from([("platform".to_owned(), name.to_owned())]);
        let state = rules.platforms.entry(name.to_owned()).or_default();

        let threshold_ms = platform
            .and_then(|p| p.api_response_threshold_ms)
            .unwrap_or(monitor.api_response_threshold_ms) as f64;
        let p95 = figures
            .and_then(|f| f.p95_ms)
            .filter(|_| enough)
            .unwrap_or(0.0);
        match state.latency.observe(p95, threshold_ms, needed) {
            Change::Fired => changes.push((
                "http.latency_high",
                labels.clone(),
                Severity::Warning,
                true,
                format!(
                    "{name}: p95 {p95:.0} ms over the last {} s ({requests} requests), over {threshold_ms:.0} ms",
                    monitor.traffic_window_secs
                ),
            )),
            Change::Cleared => changes.push((
                "http.latency_high",
                labels.clone(),
                Severity::Warning,
                false,
                format!("{name}: p95 back to {p95:.0} ms"),
            )),
            Change::None => {}
        }

        let warning = platform
            .and_then(|p| p.error_rate_warning_percent)
            .unwrap_or(monitor.error_rate_warning_percent);
        let critical = platform
            .and_then(|p| p.error_rate_critical_percent)
            .unwrap_or(monitor.error_rate_critical_percent);
        let rate = figures
            .filter(|_| enough)
            .map_or(0.0, |f| f.error_rate * 100.0);
        let warned = state.errors_warning.observe(rate, warning, needed);
        let escalated = state.errors_critical.observe(rate, critical, needed);
        if warned != Change::None || escalated != Change::None {
            let severity = if state.errors_critical.firing == Some(true) {
                Some(Severity::Critical)
            } else if state.errors_warning.firing == Some(true) {
                Some(Severity::Warning)
            } else {
                None
            };
            let errors = figures.map_or(0, |f| f.errors);
            match severity {
                Some(severity) => changes.push((
                    "http.error_rate",
                    labels.clone(),
                    severity,
                    true,
                    format!(
                        "{name}: {rate:.1}% of {requests} requests answered 5xx ({errors}) over the last {} s, over {}%",
                        monitor.traffic_window_secs,
                        if severity == Severity::Critical { critical } else { warning }
                    ),
                )),
                None if warned == Change::Cleared => changes.push((
                    "http.error_rate",
                    labels.clone(),
                    Severity::Warning,
                    false,
                    format!("{name}: error rate back to {rate:.1}%"),
                )),
                None => {}
            }
        }
    }

    let waited = health.unanswered_for_secs.unwrap_or(0.0);
    let limit = monitor.not_answering_secs as f64;
    match rules.not_answering.observe(waited, limit, needed) {
        Change::Fired => changes.push((
            "target.not_answering",
            Labels::new(),
            Severity::Critical,
            true,
            format!(
                "the target has answered nothing for {waited:.0} s: {} requests waiting (over {limit:.0} s)",
                health.unanswered
            ),
        )),
        Change::Cleared => changes.push((
            "target.not_answering",
            Labels::new(),
            Severity::Critical,
            false,
            "the target answers again".to_owned(),
        )),
        Change::None => {}
    }

    let enough = health.queries >= monitor.min_requests;
    let p95 = health.query_p95_ms.filter(|_| enough).unwrap_or(0.0);
    let threshold = monitor.db_query_threshold_ms as f64;
    match rules.queries.observe(p95, threshold, needed) {
        Change::Fired => changes.push((
            "db.query_slow",
            Labels::new(),
            Severity::Warning,
            true,
            format!(
                "the target's queries: p95 {p95:.1} ms over the last {} s ({} queries), over {threshold:.0} ms",
                monitor.traffic_window_secs, health.queries
            ),
        )),
        Change::Cleared => changes.push((
            "db.query_slow",
            Labels::new(),
            Severity::Warning,
            false,
            format!("the target's queries: p95 back to {p95:.1} ms"),
        )),
        Change::None => {}
    }
    changes
}

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let monitor = ctx.config.monitor.clone();
    let mut memory = Threshold::default();
    let mut cpu = Threshold::default();
    let mut fds = Threshold::default();
    let mut host_memory_bytes = 0u64;
    // Firing alerts by key (rule and labels): what the overall health is computed from.
    let mut firing: BTreeMap<String, Severity> = BTreeMap::new();
    let mut check_rules: HashMap<String, CheckRules> = HashMap::new();
    let mut traffic_rules = TrafficRules::default();
    let mut tick = tokio::time::interval(Duration::from_millis(monitor.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: skip it, the store has nothing of this run yet.
    tick.tick().await;
    let mut health_status = HealthStatus::Healthy;
    // A target that runs now has not exited: this clears a `target.exited` alert restored
    // from before a restart of the daemon (or of this agent).
    let running = ctx
        .target
        .read()
        .is_ok_and(|status| status.state == TargetState::Running);
    if running {
        ctx.publish(Event::Alert {
            rule: "target.exited".to_owned(),
            labels: BTreeMap::new(),
            severity: Severity::Critical,
            firing: false,
            message: "target running".to_owned(),
        });
    }
    loop {
        let event = tokio::select! {
            _ = tick.tick() => None,
            event = ctx.next() => Some(event?),
        };
        let mut labelled = |ctx: &AgentContext,
                            rule: &'static str,
                            labels: Labels,
                            severity,
                            on: bool,
                            message: String| {
            let key = alert_key(rule, &labels);
            if on {
                firing.insert(key, severity);
            } else {
                firing.remove(&key);
            }
            ctx.publish(Event::Alert {
                rule: rule.to_owned(),
                labels,
                severity,
                firing: on,
                message,
            });
        };
        let mut alert = |ctx: &AgentContext, rule, severity, on, message| {
            labelled(ctx, rule, Labels::new(), severity, on, message);
        };
        let Some(event) = event else {
            let traffic = ctx.traffic.clone();
            let window = monitor.traffic_window_secs;
            // Reading the store takes its lock and sums sketches: off the runtime's workers.
            let health = tokio::task::spawn_blocking(move || traffic.health(window))
                .await
                .unwrap_or_default();
            let config = ctx.config.clone();
            for (rule, labels, severity, on, message) in
                traffic_changes(&mut traffic_rules, &config, &health)
            {
                labelled(&ctx, rule, labels, severity, on, message);
            }
            publish_health(&ctx, &firing, &mut health_status);
            continue;
        };
        match event {
            Event::TargetExited { pid, status, .. } => {
                alert(
                    &ctx,
                    "target.exited",
                    Severity::Critical,
                    true,
                    format!("target process {pid} exited ({})", status.reason()),
                );
            }
            // Also the first start: it clears an alert restored from before a restart.
            Event::TargetStarted { pid, .. } => {
                alert(
                    &ctx,
                    "target.exited",
                    Severity::Critical,
                    false,
                    format!("target running again as process {pid}"),
                );
            }
            Event::HostSample(sample) => host_memory_bytes = sample.memory_total_bytes,
            Event::ProcessSample(sample) => {
                let limit = sample
                    .cgroup_memory_limit_bytes
                    .unwrap_or(host_memory_bytes);
                let used = sample.cgroup_memory_bytes.unwrap_or(sample.rss_bytes);
                if limit > 0 {
                    let percent = used as f64 / limit as f64 * 100.0;
                    match memory.observe(
                        percent,
                        monitor.memory_threshold_percent,
                        monitor.consecutive_samples,
                    ) {
                        Change::Fired => alert(
                            &ctx,
                            "target.memory_high",
                            Severity::Warning,
                            true,
                            format!(
                                "memory at {percent:.1}% of {limit} bytes (threshold {}%)",
                                monitor.memory_threshold_percent
                            ),
                        ),
                        Change::Cleared => alert(
                            &ctx,
                            "target.memory_high",
                            Severity::Warning,
                            false,
                            format!("memory back to {percent:.1}%"),
                        ),
                        Change::None => {}
                    }
                }
                if let Some(limit) = sample.fd_limit.filter(|l| *l > 0) {
                    let percent = sample.open_fds as f64 / limit as f64 * 100.0;
                    match fds.observe(
                        percent,
                        monitor.fd_threshold_percent,
                        monitor.consecutive_samples,
                    ) {
                        Change::Fired => alert(
                            &ctx,
                            "target.fds_high",
                            Severity::Warning,
                            true,
                            format!(
                                "{} of {limit} file descriptors open ({percent:.1}%, threshold {}%)",
                                sample.open_fds, monitor.fd_threshold_percent
                            ),
                        ),
                        Change::Cleared => alert(
                            &ctx,
                            "target.fds_high",
                            Severity::Warning,
                            false,
                            format!("{} of {limit} file descriptors open", sample.open_fds),
                        ),
                        Change::None => {}
                    }
                }
                match cpu.observe(
                    sample.cpu_percent,
                    monitor.cpu_threshold_percent,
                    monitor.consecutive_samples,
                ) {
                    Change::Fired => alert(
                        &ctx,
                        "target.cpu_high",
                        Severity::Warning,
                        true,
                        format!(
                            "CPU at {:.1}% (threshold {}%)",
                            sample.cpu_percent, monitor.cpu_threshold_percent
                        ),
                    ),
                    Change::Cleared => alert(
                        &ctx,
                        "target.cpu_high",
                        Severity::Warning,
                        false,
                        format!("CPU back to {:.1}%", sample.cpu_percent),
                    ),
                    Change::None => {}
                }
            }
            Event::Check(report) => {
                let rules = check_rules.entry(report.check.clone()).or_default();
                let mut labels = Labels::from([("check".to_owned(), report.check.clone())]);
                if let Some(platform) = &report.platform {
                    labels.insert("platform".to_owned(), platform.clone());
                }
                let idle_limit = monitor.idle_in_transaction_secs as f64;
                for (rule, severity, on, message) in check_changes(rules, &report, idle_limit) {
                    labelled(&ctx, rule, labels.clone(), severity, on, message);
                }
            }
            _ => continue,
        }
        publish_health(&ctx, &firing, &mut health_status);
    }
}

/// Publishes the overall health when the firing alerts change it.
fn publish_health(
    ctx: &AgentContext,
    firing: &BTreeMap<String, Severity>,
    health: &mut HealthStatus,
) {
    let now = match firing.values().max() {
        Some(Severity::Critical) => HealthStatus::Critical,
        Some(_) => HealthStatus::Degraded,
        None => HealthStatus::Healthy,
    };
    if now != *health {
        *health = now;
        let reason = if firing.is_empty() {
            "no rule is firing".to_owned()
        } else {
            format!(
                "firing: {}",
                firing.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        ctx.publish(Event::Health {
            status: now,
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::CheckStatus;

    #[test]
    fn fires_after_consecutive_samples_and_clears_with_hysteresis() {
        let mut rule = Threshold::default();
        assert_eq!(rule.observe(90.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(90.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(90.0, 85.0, 3), Change::Fired);
        // Hovering just under the line (inside the band) does not clear it.
        for _ in 0..10 {
            assert_eq!(rule.observe(80.0, 85.0, 3), Change::None);
        }
        assert_eq!(rule.observe(50.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(50.0, 85.0, 3), Change::None);
        assert_eq!(rule.observe(50.0, 85.0, 3), Change::Cleared);
    }

    #[test]
    fn the_first_decision_is_published_even_when_it_is_cleared() {
        let mut rule = Threshold::default();
        assert_eq!(rule.observe(10.0, 85.0, 2), Change::None);
        assert_eq!(rule.observe(10.0, 85.0, 2), Change::Cleared);
        // Once decided, staying under says nothing more.
        for _ in 0..5 {
            assert_eq!(rule.observe(10.0, 85.0, 2), Change::None);
        }
        assert_eq!(rule.observe(90.0, 85.0, 2), Change::None);
        assert_eq!(rule.observe(90.0, 85.0, 2), Change::Fired);
    }

    fn report(kind: &'static str, status: CheckStatus, failures: u32) -> CheckReport {
        CheckReport {
            check: "crm".to_owned(),
            kind,
            platform: Some("crm.io".to_owned()),
            status,
            degraded: match status {
                CheckStatus::Degraded if kind == "postgres" => Some(Degraded::Connections),
                CheckStatus::Degraded => Some(Degraded::Slow),
                _ => None,
            },
            consecutive_failures: failures,
            alert_after_failures: 3,
            response_ms: None,
            message: Some("answered 503".to_owned()),
            postgres: None,
        }
    }

    fn rules_of(changes: &[(&'static str, Severity, bool, String)]) -> Vec<(&'static str, bool)> {
        changes.iter().map(|c| (c.0, c.2)).collect()
    }

    #[test]
    fn a_check_alerts_after_its_failures_in_a_row_and_clears_on_the_first_success() {
        let mut rules = CheckRules::default();
        // The first decision after start: the check works, so anything restored clears.
        let first = check_changes(&mut rules, &report("http", CheckStatus::Healthy, 0), 60.0);
        assert_eq!(
            rules_of(&first),
            [("check.down", false), ("check.slow", false)]
        );
        assert!(check_changes(&mut rules, &report("http", CheckStatus::Down, 1), 60.0).is_empty());
        assert!(check_changes(&mut rules, &report("http", CheckStatus::Down, 2), 60.0).is_empty());
        let fired = check_changes(&mut rules, &report("http", CheckStatus::Down, 3), 60.0);
        assert_eq!(rules_of(&fired), [("check.down", true)]);
        assert_eq!(fired[0].1, Severity::Critical);
        assert_eq!(
            fired[0].3,
            "check crm failed 3 times in a row: answered 503"
        );
        // Still failing: nothing new.
        assert!(check_changes(&mut rules, &report("http", CheckStatus::Down, 4), 60.0).is_empty());
        let cleared = check_changes(&mut rules, &report("http", CheckStatus::Healthy, 0), 60.0);
        assert_eq!(rules_of(&cleared), [("check.down", false)]);
    }

    #[test]
    fn slowness_and_crowded_databases_alert_after_as_many_runs() {
        let mut rules = CheckRules::default();
        // Degraded twice, a failure in between (keeps the count), degraded a third time. The
        // first run worked and was not slow: the first decisions of those rules.
        let first = check_changes(
            &mut rules,
            &report("postgres", CheckStatus::Degraded, 0),
            60.0,
        );
        assert_eq!(
            rules_of(&first),
            [("check.down", false), ("check.slow", false)]
        );
        assert!(check_changes(
            &mut rules,
            &report("postgres", CheckStatus::Degraded, 0),
            60.0
        )
        .is_empty());
        assert!(
            check_changes(&mut rules, &report("postgres", CheckStatus::Down, 1), 60.0).is_empty()
        );
        let fired = check_changes(
            &mut rules,
            &report("postgres", CheckStatus::Degraded, 0),
            60.0,
        );
        assert_eq!(rules_of(&fired), [("db.connections_high", true)]);
        let cleared = check_changes(
            &mut rules,
            &report("postgres", CheckStatus::Healthy, 0),
            60.0,
        );
        assert_eq!(rules_of(&cleared), [("db.connections_high", false)]);

        let mut rules = CheckRules::default();
        for _ in 0..2 {
            check_changes(&mut rules, &report("http", CheckStatus::Degraded, 0), 60.0);
        }
        let fired = check_changes(&mut rules, &report("http", CheckStatus::Degraded, 0), 60.0);
        assert_eq!(rules_of(&fired), [("check.slow", true)]);
    }

    #[test]
    fn sessions_waiting_on_locks_or_idle_in_a_transaction_alert_after_as_many_runs() {
        let mut rules = CheckRules::default();
        let with = |waiting: i64, oldest_idle: f64| CheckReport {
            postgres: Some(crate::checks::probe::PostgresFigures {
                max_connections: 100,
                connections: 10,
                active: 1,
                idle: 5,
                idle_in_transaction: i64::from(oldest_idle > 0.0),
                oldest_idle_in_transaction_seconds: oldest_idle,
                longest_query_seconds: 0.0,
                waiting_on_locks: waiting,
            }),
            ..report("postgres", CheckStatus::Healthy, 0)
        };
        let rules_fired = |changes: Vec<(&'static str, Severity, bool, String)>| {
            changes
                .into_iter()
                .filter(|c| matches!(c.0, "db.lock_contention" | "db.idle_in_transaction"))
                .map(|c| (c.0, c.2))
                .collect::<Vec<_>>()
        };
        // The first run: nothing wrong, both rules decide "cleared".
        assert_eq!(
            rules_fired(check_changes(&mut rules, &with(0, 0.0), 60.0)),
            [
                ("db.lock_contention", false),
                ("db.idle_in_transaction", false)
            ]
        );
        for _ in 0..2 {
            assert!(rules_fired(check_changes(&mut rules, &with(2, 61.0), 60.0)).is_empty());
        }
        let fired = check_changes(&mut rules, &with(2, 61.0), 60.0);
        assert!(
            fired[0].3.contains("2 sessions wait on a lock"),
            "{fired:?}"
        );
        assert_eq!(
            rules_fired(fired),
            [
                ("db.lock_contention", true),
                ("db.idle_in_transaction", true)
            ]
        );
        // Idle, but under the limit: that clears; the lock wait goes on.
        assert_eq!(
            rules_fired(check_changes(&mut rules, &with(1, 30.0), 60.0)),
            [("db.idle_in_transaction", false)]
        );
        assert_eq!(
            rules_fired(check_changes(&mut rules, &with(0, 0.0), 60.0)),
            [("db.lock_contention", false)]
        );
        // A run that failed says nothing about sessions.
        assert!(rules_fired(check_changes(
            &mut rules,
            &report("postgres", CheckStatus::Down, 1),
            60.0
        ))
        .is_empty());
    }

    fn traffic_config() -> Config {
        crate::config::parse(
            r#"
[target]
pid = 1
[monitor]
consecutive_samples = 2
min_requests = 10
[[platforms]]
name = "shop"
hosts = ["shop.example"]
[[platforms]]
name = "crm"
hosts = ["crm.example"]
api_response_threshold_ms = 2000
error_rate_critical_percent = 50.0
"#,
            &crate::config::Env::default(),
        )
        .expect("config")
    }

    fn figures(requests: u64, errors: u64, p95_ms: f64) -> crate::traffic::Figures {
        crate::traffic::Figures {
            requests,
            errors,
            error_rate: errors as f64 / requests.max(1) as f64,
            p95_ms: Some(p95_ms),
            ..crate::traffic::Figures::default()
        }
    }

    fn traffic(platforms: &[(&str, u64, u64, f64)], queries: u64, query_p95: f64) -> TrafficHealth {
        TrafficHealth {
            platforms: platforms
                .iter()
                .map(|(name, requests, errors, p95)| {
                    ((*name).to_owned(), figures(*requests, *errors, *p95))
                })
                .collect(),
            queries,
            query_p95_ms: Some(query_p95),
            unanswered: 0,
            unanswered_for_secs: None,
        }
    }

    /// `(rule, platform label, severity, firing)` of each change.
    fn summary(changes: &[AlertChange]) -> Vec<(&'static str, String, Severity, bool)> {
        changes
            .iter()
            .map(|(rule, labels, severity, on, _)| {
                (
                    *rule,
                    labels.get("platform").cloned().unwrap_or_default(),
                    *severity,
                    *on,
                )
            })
            .collect()
    }

    #[test]
    fn steady_healthy_traffic_only_ever_says_cleared_once() {
        let config = traffic_config();
        let mut rules = TrafficRules::default();
        let healthy = traffic(
            &[("shop", 1000, 2, 40.0), ("crm", 500, 0, 900.0)],
            3000,
            5.0,
        );
        assert!(traffic_changes(&mut rules, &config, &healthy).is_empty());
        let first = summary(&traffic_changes(&mut rules, &config, &healthy));
        // Two rules for each platform (and `other`), one for a hung target, one for the
        // queries: all cleared.
        assert_eq!(first.len(), 8, "{first:?}");
        assert!(first.iter().all(|c| !c.3), "{first:?}");
        for _ in 0..20 {
            assert!(traffic_changes(&mut rules, &config, &healthy).is_empty());
        }
    }

    #[test]
    fn latency_errors_and_slow_queries_fire_per_platform_with_their_thresholds() {
        let config = traffic_config();
        let mut rules = TrafficRules::default();
        let quiet = traffic(&[], 0, 0.0);
        for _ in 0..2 {
            traffic_changes(&mut rules, &config, &quiet);
        }
        // shop: p95 600 ms (over 500), 3% errors (warning); crm: 900 ms (under its 2000),
        // 10% errors (over 1%, under its critical 50%); queries p95 150 ms (over 100).
        let bad = traffic(
            &[("shop", 100, 3, 600.0), ("crm", 100, 10, 900.0)],
            50,
            150.0,
        );
        assert!(traffic_changes(&mut rules, &config, &bad).is_empty());
        let fired = summary(&traffic_changes(&mut rules, &config, &bad));
        assert_eq!(
            fired,
            [
                (
                    "http.latency_high",
                    "shop".to_owned(),
                    Severity::Warning,
                    true
                ),
                (
                    "http.error_rate",
                    "shop".to_owned(),
                    Severity::Warning,
                    true
                ),
                ("http.error_rate", "crm".to_owned(), Severity::Warning, true),
                ("db.query_slow", String::new(), Severity::Warning, true),
            ]
        );
        // shop's errors pass 5%: the same alert turns critical.
        let worse = traffic(
            &[("shop", 100, 8, 600.0), ("crm", 100, 10, 900.0)],
            50,
            150.0,
        );
        assert!(traffic_changes(&mut rules, &config, &worse).is_empty());
        let escalated = summary(&traffic_changes(&mut rules, &config, &worse));
        assert_eq!(
            escalated,
            [(
                "http.error_rate",
                "shop".to_owned(),
                Severity::Critical,
                true
            )]
        );
        // Too few requests say nothing: counted as healthy, so everything clears.
        let few = traffic(&[("shop", 5, 5, 9000.0), ("crm", 9, 9, 9000.0)], 9, 900.0);
        traffic_changes(&mut rules, &config, &few);
        let cleared = summary(&traffic_changes(&mut rules, &config, &few));
        assert_eq!(
            cleared,
            [
                (
                    "http.latency_high",
                    "shop".to_owned(),
                    Severity::Warning,
                    false
                ),
                (
                    "http.error_rate",
                    "shop".to_owned(),
                    Severity::Warning,
                    false
                ),
                (
                    "http.error_rate",
                    "crm".to_owned(),
                    Severity::Warning,
                    false
                ),
                ("db.query_slow", String::new(), Severity::Warning, false),
            ]
        );
    }

    #[test]
    fn a_hung_target_is_not_answering() {
        let config = traffic_config();
        let mut rules = TrafficRules::default();
        let mut hung = traffic(&[], 0, 0.0);
        hung.unanswered = 4;
        hung.unanswered_for_secs = Some(45.0);
        assert!(traffic_changes(&mut rules, &config, &hung)
            .iter()
            .all(|c| c.0 != "target.not_answering"));
        let fired = traffic_changes(&mut rules, &config, &hung);
        let alert = fired
            .iter()
            .find(|c| c.0 == "target.not_answering")
            .expect("fired");
        assert_eq!((alert.2, alert.3), (Severity::Critical, true));
        assert_eq!(
            alert.4,
            "the target has answered nothing for 45 s: 4 requests waiting (over 30 s)"
        );
        // Waiting, but not that long (a slow request among answered ones reads as 0).
        let answering = traffic(&[], 0, 0.0);
        traffic_changes(&mut rules, &config, &answering);
        let cleared = traffic_changes(&mut rules, &config, &answering);
        assert!(cleared
            .iter()
            .any(|c| c.0 == "target.not_answering" && !c.3));
    }

    #[test]
    fn a_single_spike_does_not_fire() {
        let mut rule = Threshold::default();
        for value in [99.0, 10.0, 99.0, 10.0, 99.0, 99.0] {
            assert_eq!(rule.observe(value, 85.0, 3), Change::None);
        }
    }
}
