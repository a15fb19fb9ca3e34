//! Diagnostic: explains each firing alert with a stable signature, a root-cause sentence, a
//! confidence, the evidence and the playbook's candidate actions.
//!
//! Correlation: it keeps the latest run of every integration check and the alerts firing now.
//! A check is the target's own health when it is an HTTP check of a platform; every other
//! check (PostgreSQL, Redis, TCP, an HTTP provider) is a dependency. A dependency that is down
//! explains the target's own failures (errors, a failing health check, not answering): "the
//! app errors because the database is down" is `db.unreachable` (or `dependency.down`), never
//! a reason to restart the app, and the diagnosis says which dependency is down so the gate
//! holds back actions on the target's process. Slow requests while the target's queries are
//! slow are `db.slow_query`; failures with every dependency up are the app's own
//! (`http.error_spike`, `target.unhealthy`, `target.hung`).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{AgentContext, AgentError};
use crate::{
    alerts::{alert_key, Labels},
    bus::{CheckReport, Diagnosis, Event, ExitStatus, ProcessSample},
    repairs::playbook,
    state::now_ms,
    traffic::TrafficMoves,
};

/// Samples kept as evidence.
const HISTORY: usize = 60;

/// What the agent has seen, that a diagnosis is made from.
#[derive(Default)]
pub(super) struct Evidence {
    pub(super) samples: VecDeque<ProcessSample>,
    pub(super) last_exit: Option<ExitStatus>,
    /// The latest run of each check.
    pub(super) checks: HashMap<String, CheckReport>,
    /// Alerts firing now: key → (rule, labels).
    pub(super) firing: BTreeMap<String, (String, Labels)>,
    /// The traffic's last window against the one before, read for the alert being diagnosed
    /// when it is about the traffic.
    pub(super) traffic: Option<TrafficMoves>,
    /// `monitor.db_query_threshold_ms`: a query with a p95 over it in the traffic's last
    /// window is slow, even before `db.query_slow` (over all queries) fires.
    pub(super) query_threshold_ms: Option<f64>,
}

/// The alerts about the traffic, whose diagnoses name the query or route that moved.
const TRAFFIC_RULES: &[&str] = &["http.latency_high", "http.error_rate", "db.query_slow"];

/// A check is the target's own health when it is an HTTP check of a platform.
fn is_own_health(report: &CheckReport) -> bool {
    report.kind == "http" && report.platform.is_some()
}

impl Evidence {
    fn observe(&mut self, event: &Event) {
        match event {
            Event::ProcessSample(sample) => {
                if self.samples.len() == HISTORY {
                    self.samples.pop_front();
                }
                self.samples.push_back(sample.clone());
            }
            Event::TargetExited { status, .. } => self.last_exit = Some(*status),
            Event::Check(report) => {
                self.checks.insert(report.check.clone(), report.clone());
            }
            Event::Alert {
                rule,
                labels,
                firing,
                ..
            } => {
                let key = alert_key(rule, labels);
                if *firing {
                    self.firing.insert(key, (rule.clone(), labels.clone()));
                } else {
                    self.firing.remove(&key);
                }
            }
            _ => {}
        }
    }

    /// A dependency that is down now (a PostgreSQL check first).
    fn dependency_down(&self) -> Option<&CheckReport> {
        let mut down: Vec<&CheckReport> = self
            .checks
            .values()
            .filter(|r| !is_own_health(r) && r.status == crate::bus::CheckStatus::Down)
            .collect();
        down.sort_by_key(|r| (r.kind != "postgres", r.check.clone()));
        down.first().copied()
    }

    fn is_firing(&self, rule: &str) -> bool {
        self.firing.values().any(|(r, _)| r == rule)
    }

    /// The target's queries are slow: `db.query_slow` fires, or one query's p95 in the last
    /// window is over the threshold.
    fn queries_slow(&self, seen: &mut Vec<String>) -> bool {
        if self.is_firing("db.query_slow") {
            seen.push("alert db.query_slow fires: the target's queries are slow".to_owned());
            return true;
        }
        let slowest = self.traffic.as_ref().and_then(TrafficMoves::slowest_query);
        match (slowest.and_then(|q| q.now.p95_ms), self.query_threshold_ms) {
            (Some(p95), Some(threshold)) if p95 > threshold => {
                seen.push(format!(
                    "a query's p95 ({p95:.0} ms) is over db_query_threshold_ms ({threshold:.0} ms)"
                ));
                true
            }
            _ => false,
        }
    }
}

fn describe_check(report: &CheckReport) -> String {
    format!(
        "check {} ({}) is {}, {} failed runs in a row: {}",
        report.check,
        report.kind,
        report.status.as_str(),
        report.consecutive_failures,
        report.message.as_deref().unwrap_or("no detail")
    )
}

/// The diagnosis of a dependency's outage as the cause of `what`.
fn outage(dependency: &CheckReport, what: &str) -> (&'static str, String, f64) {
    let signature = if dependency.kind == "postgres" {
        "db.unreachable"
    } else {
        "dependency.down"
    };
    (
        signature,
        format!("{what} because {} is down", describe_dependency(dependency)),
        0.85,
    )
}

/// The diagnosis of a lock wait as the cause of `what`.
fn locked(seen: &mut Vec<String>, what: &str) -> (&'static str, String, f64) {
    seen.push("alert db.lock_contention fires: sessions wait on a lock".to_owned());
    (
        "db.lock_contention",
        format!("{what} because its queries wait on a lock another session holds"),
        0.8,
    )
}

fn describe_dependency(report: &CheckReport) -> String {
    match report.kind {
        "postgres" => format!("the database (check {})", report.check),
        kind => format!("the dependency {} ({kind})", report.check),
    }
}

/// LLM summaries asked at once; a diagnosis past them gets none (and says why).
const SUMMARIES_IN_FLIGHT: usize = 2;

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let mut evidence = Evidence {
        query_threshold_ms: Some(ctx.config.monitor.db_query_threshold_ms as f64),
        ..Evidence::default()
    };
    let explainer = super::explain::Explainer::new(&ctx.config.diagnostic);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(SUMMARIES_IN_FLIGHT));
    loop {
        let event = ctx.next().await?;
        evidence.observe(&event);
        let Event::Alert {
            rule,
            labels,
            firing: true,
            ..
        } = event
        else {
            continue;
        };
        evidence.traffic = TRAFFIC_RULES
            .contains(&rule.as_str())
            .then(|| ctx.traffic.moves(ctx.config.monitor.traffic_window_secs));
        let Some(mut diagnosis) = diagnose(&rule, &labels, &evidence) else {
            continue;
        };
        diagnosis.actions = playbook::candidates(&ctx.config.repair, &diagnosis.signature);
        match ctx.repairs.diagnosed(now_ms(), diagnosis.clone()).await {
            Ok(id) => diagnosis.id = Some(id),
            Err(err) => tracing::warn!(error = %err, "cannot record the diagnosis"),
        }
        tracing::info!(
            rule = %diagnosis.rule,
            signature = %diagnosis.signature,
            summary = %diagnosis.summary,
            "diagnosis"
        );
        if let (Some(explainer), Some(id)) = (&explainer, diagnosis.id) {
            let log = ctx.repairs.clone();
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                let (explainer, diagnosis) = (explainer.clone(), diagnosis.clone());
                tokio::spawn(async move {
                    let outcome = explainer.explain(&diagnosis).await;
                    if let Err(why) = &outcome {
                        tracing::warn!(diagnosis = id, %why, "no LLM summary");
                    }
                    let _ = log.explained(id, outcome).await;
                    drop(permit);
                });
            } else {
                let busy = format!("skipped: {SUMMARIES_IN_FLIGHT} summaries already in flight");
                let _ = log.explained(id, Err(busy)).await;
            }
        }
        ctx.publish(Event::Diagnosis(diagnosis));
    }
}

/// The diagnosis of the alert `rule{labels}` from the evidence (its `actions` left empty).
pub(super) fn diagnose(rule: &str, labels: &Labels, evidence: &Evidence) -> Option<Diagnosis> {
    let mut seen = Vec::new();
    let mut tables = Vec::new();
    let dependency = evidence.dependency_down();
    if let Some(dependency) = dependency {
        seen.push(describe_check(dependency));
    }
    let (signature, summary, confidence) = match rule {
        "target.exited" => exited(evidence, &mut seen),
        "target.memory_high" => memory(evidence, &mut seen),
        "target.cpu_high" => cpu(evidence, &mut seen),
        "target.fds_high" => {
            let last = evidence.samples.back();
            let (open, limit) = last.map_or((0, None), |s| (s.open_fds, s.fd_limit));
            let first = evidence.samples.front().map_or(open, |s| s.open_fds);
            seen.push(format!(
                "{open} file descriptors open (limit {}), {first} {} samples ago",
                limit.map_or_else(|| "none".to_owned(), |l| l.to_string()),
                evidence.samples.len()
            ));
            (
                "target.fd_exhaustion",
                format!(
                    "the target is running out of file descriptors ({open} open): a descriptor leak, or more connections than its limit allows"
                ),
                0.7,
            )
        }
        "target.not_answering" => match dependency {
            Some(dependency) => outage(dependency, "the target answers nothing"),
            None if evidence.is_firing("db.lock_contention") => {
                locked(&mut seen, "the target answers nothing")
            }
            None => (
                "target.hung",
                "the target is alive but has answered no request for a while: it hangs".to_owned(),
                0.8,
            ),
        },
        "check.down" => {
            let name = labels.get("check")?;
            let report = evidence.checks.get(name)?;
            if !seen.iter().any(|s| s.starts_with(&format!("check {name} "))) {
                seen.push(describe_check(report));
            }
            if !is_own_health(report) {
                outage(report, &format!("check {name} fails"))
            } else if let Some(dependency) = dependency {
                outage(dependency, &format!("the target's health check {name} fails"))
            } else if evidence.is_firing("db.lock_contention") {
                locked(&mut seen, &format!("the target's health check {name} fails"))
            } else {
                (
                    "target.unhealthy",
                    format!(
                        "the target's health check {name} fails while its dependencies are up: the target itself is broken"
                    ),
                    0.7,
                )
            }
        }
        "http.error_rate" => {
            if let Some(dependency) = dependency {
                outage(dependency, "the target answers with errors")
            } else {
                blame_route(evidence, labels, &mut seen, true);
                (
                    "http.error_spike",
                    format!(
                        "the target answers with server errors{} while its dependencies are up: the target itself is broken",
                        labels.get("platform").map(|p| format!(" on {p}")).unwrap_or_default()
                    ),
                    0.7,
                )
            }
        }
        "http.latency_high" => {
            if evidence.queries_slow(&mut seen) {
                blame_route(evidence, labels, &mut seen, false);
                blame_query(evidence, &mut seen, &mut tables);
                (
                    "db.slow_query",
                    "the target is slow because its database queries are slow".to_owned(),
                    0.75,
                )
            } else if let Some(dependency) = dependency {
                outage(dependency, "the target is slow")
            } else {
                blame_route(evidence, labels, &mut seen, false);
                (
                    "target.slow",
                    "the target is slow while its queries are fast: the time goes in the target itself".to_owned(),
                    0.6,
                )
            }
        }
        "db.lock_contention" => (
            "db.lock_contention",
            format!(
                "sessions of the database {} wait on a lock another session holds",
                labels.get("check").map_or("", String::as_str)
            ),
            0.8,
        ),
        "db.idle_in_transaction" => (
            "db.idle_in_transaction",
            format!(
                "sessions of the database {} sit idle in open transactions, holding their locks and connections",
                labels.get("check").map_or("", String::as_str)
            ),
            0.8,
        ),
        "db.query_slow" => {
            blame_query(evidence, &mut seen, &mut tables);
            (
                "db.slow_query",
                "the target's database queries are slow".to_owned(),
                0.7,
            )
        }
        "db.connections_high" => (
            "db.pool_exhausted",
            format!(
                "the database {} is near its connection limit",
                labels.get("check").map_or("", String::as_str)
            ),
            0.6,
        ),
        _ => return None,
    };
    Some(Diagnosis {
        id: None,
        rule: rule.to_owned(),
        labels: labels.clone(),
        signature: signature.to_owned(),
        summary,
        confidence,
        evidence: seen,
        actions: Vec::new(),
        dependency_down: dependency.map(|d| d.check.clone()),
        tables,
    })
}

/// Names the slowest query of the last window and how far it moved, and the tables it reads.
fn blame_query(evidence: &Evidence, seen: &mut Vec<String>, tables: &mut Vec<String>) {
    let Some(traffic) = &evidence.traffic else {
        return;
    };
    if let Some(query) = traffic.slowest_query() {
        seen.push(query.describe(traffic.window_secs));
        *tables = crate::protocols::fingerprint::tables(&query.fingerprint);
        if !tables.is_empty() {
            seen.push(format!("the query reads {}", tables.join(", ")));
        }
    }
}

/// Names the route of the alert's platform with the highest p95 (or the most 5xx answers)
/// in the last window, and how far it moved.
fn blame_route(evidence: &Evidence, labels: &Labels, seen: &mut Vec<String>, errors: bool) {
    let Some(traffic) = &evidence.traffic else {
        return;
    };
    let platform = labels.get("platform").map(String::as_str);
    let line = if errors {
        traffic
            .most_errors(platform)
            .map(|r| r.describe_errors(traffic.window_secs))
    } else {
        traffic
            .slowest_route(platform)
            .map(|r| r.describe_latency(traffic.window_secs))
    };
    seen.extend(line);
}

fn near_limit(evidence: &Evidence) -> Option<f64> {
    let last = evidence.samples.back()?;
    match (last.cgroup_memory_bytes, last.cgroup_memory_limit_bytes) {
        (Some(used), Some(limit)) if limit > 0 => Some(used as f64 / limit as f64),
        _ => None,
    }
}

fn exited(evidence: &Evidence, seen: &mut Vec<String>) -> (&'static str, String, f64) {
    let share = near_limit(evidence);
    if let Some(share) = share {
        seen.push(format!(
            "cgroup memory at {:.0} % of its limit",
            share * 100.0
        ));
    }
    if let Some(exit) = evidence.last_exit {
        seen.push(format!(
            "exit: {}",
            serde_json::to_string(&exit).unwrap_or_default()
        ));
    }
    match evidence.last_exit {
        Some(ExitStatus::Signaled { signal: 9, .. }) if share.is_some_and(|s| s > 0.9) => (
            "target.oom_killed",
            "the target was killed (SIGKILL) with its cgroup memory near the limit: the OOM killer"
                .to_owned(),
            0.8,
        ),
        Some(ExitStatus::Signaled {
            signal,
            core_dumped,
        }) => (
            "target.crashed",
            format!(
                "the target died from {}{}",
                crate::bus::signal_name(signal),
                if core_dumped { " and dumped core" } else { "" }
            ),
            0.9,
        ),
        Some(ExitStatus::Exited { code }) => (
            "target.crashed",
            format!("the target exited with status {code}"),
            if code == 0 { 0.5 } else { 0.8 },
        ),
        Some(ExitStatus::Unknown) | None => (
            "target.crashed",
            "the target's process ended".to_owned(),
            0.5,
        ),
    }
}

/// The samples a leak is judged on: the most recent ones.
const LEAK_WINDOW: usize = 10;

/// Memory used: the cgroup's charge when known (what the limit applies to), else RSS.
fn used(sample: &ProcessSample) -> u64 {
    sample.cgroup_memory_bytes.unwrap_or(sample.rss_bytes)
}

fn memory(evidence: &Evidence, seen: &mut Vec<String>) -> (&'static str, String, f64) {
    let samples = &evidence.samples;
    let recent: Vec<u64> = samples
        .iter()
        .skip(samples.len().saturating_sub(LEAK_WINDOW))
        .map(used)
        .collect();
    // A leak: up by over 5 % across the window, and up (or flat) in at least 80 % of the
    // steps; an allocator giving a little back now and then does not hide it.
    let steps = recent.len().saturating_sub(1);
    let rising_steps = recent.windows(2).filter(|w| w[1] >= w[0]).count();
    let (first, last) = (
        recent.first().copied().unwrap_or(0),
        recent.last().copied().unwrap_or(0),
    );
    let growing = steps >= 2 && rising_steps * 5 >= steps * 4 && last as f64 > first as f64 * 1.05;
    if !recent.is_empty() {
        seen.push(format!(
            "memory {first} → {last} bytes over the last {} samples, up in {rising_steps} of {steps} steps",
            recent.len()
        ));
    }
    if growing {
        (
            "target.memory_leak",
            format!(
                "memory keeps rising: {first} → {last} bytes over the last {} samples",
                recent.len()
            ),
            0.7,
        )
    } else {
        (
            "target.memory_high",
            "memory is high but not steadily rising".to_owned(),
            0.5,
        )
    }
}

fn cpu(evidence: &Evidence, seen: &mut Vec<String>) -> (&'static str, String, f64) {
    let throttled = evidence
        .samples
        .iter()
        .filter_map(|s| s.cgroup_cpu_throttled_periods)
        .max()
        .unwrap_or(0);
    if throttled > 0 {
        seen.push(format!("{throttled} throttled CPU periods"));
        (
            "target.cpu_throttled",
            "the target uses its whole CPU quota and is throttled".to_owned(),
            0.7,
        )
    } else {
        (
            "target.cpu_saturated",
            "the target keeps the CPU busy".to_owned(),
            0.6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{CheckStatus, Severity};

    fn sample(rss: u64, used: u64, limit: u64) -> ProcessSample {
        ProcessSample {
            rss_bytes: rss,
            cgroup_memory_bytes: Some(used),
            cgroup_memory_limit_bytes: Some(limit),
            ..ProcessSample::default()
        }
    }

    fn with_samples(samples: impl IntoIterator<Item = ProcessSample>) -> Evidence {
        Evidence {
            samples: samples.into_iter().collect(),
            ..Evidence::default()
        }
    }

    fn signature(rule: &str, labels: &Labels, evidence: &Evidence) -> Option<String> {
        diagnose(rule, labels, evidence).map(|d| d.signature)
    }

    fn report(
        name: &str,
        kind: &'static str,
        platform: Option<&str>,
        status: CheckStatus,
    ) -> Event {
        Event::Check(CheckReport {
            check: name.to_owned(),
            kind,
            platform: platform.map(str::to_owned),
            status,
            degraded: None,
            consecutive_failures: u32::from(status == CheckStatus::Down) * 3,
            alert_after_failures: 3,
            response_ms: None,
            message: (status == CheckStatus::Down).then(|| "connection refused".to_owned()),
            postgres: None,
        })
    }

    fn firing(rule: &str, labels: &[(&str, &str)]) -> Event {
        Event::Alert {
            rule: rule.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            severity: Severity::Critical,
            firing: true,
            message: String::new(),
        }
    }

    fn check_label(name: &str) -> Labels {
        [("check".to_owned(), name.to_owned())].into()
    }

    #[test]
    fn tells_an_oom_kill_from_a_crash() {
        let none = Labels::new();
        let kill = Some(ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        });
        let mut full = with_samples([sample(1, 95, 100)]);
        full.last_exit = kill;
        let mut roomy = with_samples([sample(1, 10, 100)]);
        roomy.last_exit = kill;
        assert_eq!(
            signature("target.exited", &none, &full).as_deref(),
            Some("target.oom_killed")
        );
        assert_eq!(
            signature("target.exited", &none, &roomy).as_deref(),
            Some("target.crashed")
        );
        roomy.last_exit = Some(ExitStatus::Signaled {
            signal: 6,
            core_dumped: true,
        });
        let diagnosis = diagnose("target.exited", &none, &roomy).expect("diagnosis");
        assert!(
            diagnosis.summary.contains("SIGABRT") && diagnosis.summary.contains("core"),
            "{}",
            diagnosis.summary
        );
        assert!(
            diagnosis.evidence.iter().any(|e| e.contains("signaled")),
            "{:?}",
            diagnosis.evidence
        );
        assert_eq!(diagnosis.dependency_down, None);
    }

    #[test]
    fn rising_memory_is_a_leak() {
        let none = Labels::new();
        let charged = |used: u64| sample(1, used, 1_000_000);
        let rising = with_samples((1..=5).map(|i| charged(i * 100)));
        assert_eq!(
            signature("target.memory_high", &none, &rising).as_deref(),
            Some("target.memory_leak")
        );
        // One step down in ten (the allocator gave a little back) does not hide a leak.
        let mostly = with_samples([100, 200, 300, 280, 400, 500, 600, 700, 800, 900].map(charged));
        assert_eq!(
            signature("target.memory_high", &none, &mostly).as_deref(),
            Some("target.memory_leak")
        );
        let flat = with_samples([500, 400, 500, 450, 500].map(charged));
        assert_eq!(
            signature("target.memory_high", &none, &flat).as_deref(),
            Some("target.memory_high")
        );
        // Without a cgroup, RSS is what counts.
        let rss = with_samples((1..=5).map(|i| ProcessSample {
            rss_bytes: i * 100,
            ..ProcessSample::default()
        }));
        assert_eq!(
            signature("target.memory_high", &none, &rss).as_deref(),
            Some("target.memory_leak")
        );
    }

    #[test]
    fn descriptors_near_the_limit_are_fd_exhaustion() {
        let evidence = with_samples([100, 900, 1000].map(|fds| ProcessSample {
            open_fds: fds,
            fd_limit: Some(1024),
            ..ProcessSample::default()
        }));
        let diagnosis = diagnose("target.fds_high", &Labels::new(), &evidence).expect("diagnosis");
        assert_eq!(diagnosis.signature, "target.fd_exhaustion");
        assert!(
            diagnosis.evidence[0]
                .contains("1000 file descriptors open (limit 1024), 100 3 samples ago"),
            "{:?}",
            diagnosis.evidence
        );
    }

    #[test]
    fn a_failing_app_with_its_database_down_is_the_database_not_the_app() {
        let mut evidence = Evidence::default();
        for event in [
            report("database", "postgres", None, CheckStatus::Down),
            report(
                "leadsite.ai health",
                "http",
                Some("leadsite.ai"),
                CheckStatus::Down,
            ),
            firing("check.down", &[("check", "database")]),
        ] {
            evidence.observe(&event);
        }
        let own = diagnose("check.down", &check_label("leadsite.ai health"), &evidence)
            .expect("diagnosis");
        assert_eq!(own.signature, "db.unreachable");
        assert_eq!(own.dependency_down.as_deref(), Some("database"));
        assert!(
            own.summary
                .contains("the database (check database) is down"),
            "{}",
            own.summary
        );
        let errors = diagnose("http.error_rate", &Labels::new(), &evidence).expect("diagnosis");
        assert_eq!(errors.signature, "db.unreachable");
        let hung = diagnose("target.not_answering", &Labels::new(), &evidence).expect("diagnosis");
        assert_eq!(hung.signature, "db.unreachable");
        assert_eq!(
            signature("check.down", &check_label("database"), &evidence).as_deref(),
            Some("db.unreachable")
        );

        // A provider that is not PostgreSQL.
        let mut evidence = Evidence::default();
        evidence.observe(&report("crm", "http", None, CheckStatus::Down));
        assert_eq!(
            signature("check.down", &check_label("crm"), &evidence).as_deref(),
            Some("dependency.down")
        );
    }

    #[test]
    fn failures_with_every_dependency_up_are_the_app_itself() {
        let mut evidence = Evidence::default();
        for event in [
            report("database", "postgres", None, CheckStatus::Healthy),
            report(
                "leadsite.ai health",
                "http",
                Some("leadsite.ai"),
                CheckStatus::Down,
            ),
        ] {
            evidence.observe(&event);
        }
        let own = diagnose("check.down", &check_label("leadsite.ai health"), &evidence)
            .expect("diagnosis");
        assert_eq!(own.signature, "target.unhealthy");
        assert_eq!(own.dependency_down, None);
        assert_eq!(
            signature("http.error_rate", &Labels::new(), &evidence).as_deref(),
            Some("http.error_spike")
        );
        assert_eq!(
            signature("target.not_answering", &Labels::new(), &evidence).as_deref(),
            Some("target.hung")
        );
        // Unless its queries wait on a lock: then the lock is the cause.
        evidence.observe(&firing("db.lock_contention", &[("check", "pg")]));
        let hung = diagnose("target.not_answering", &Labels::new(), &evidence).expect("diagnosis");
        assert_eq!(hung.signature, "db.lock_contention");
        assert!(hung.summary.contains("wait on a lock"), "{}", hung.summary);
    }

    #[test]
    fn a_slow_app_with_slow_queries_is_the_queries() {
        let mut evidence = Evidence::default();
        assert_eq!(
            signature("http.latency_high", &Labels::new(), &evidence).as_deref(),
            Some("target.slow")
        );
        evidence.observe(&firing("db.query_slow", &[]));
        let slow = diagnose("http.latency_high", &Labels::new(), &evidence).expect("diagnosis");
        assert_eq!(slow.signature, "db.slow_query");
        assert!(slow.evidence.iter().any(|e| e.contains("db.query_slow")));
        // Once the queries are fast again, slowness is the app's own.
        evidence.observe(&Event::Alert {
            rule: "db.query_slow".to_owned(),
            labels: Labels::new(),
            severity: Severity::Warning,
            firing: false,
            message: String::new(),
        });
        assert_eq!(
            signature("http.latency_high", &Labels::new(), &evidence).as_deref(),
            Some("target.slow")
        );
        assert_eq!(signature("check.slow", &Labels::new(), &evidence), None);
    }

    #[test]
    fn a_slow_query_is_named_with_how_far_it_moved_and_its_tables() {
        use crate::traffic::{QueryMove, RouteMove, TrafficMoves, Window};
        let window = |count, errors, p95| Window {
            count,
            errors,
            p95_ms: Some(p95),
            mean_ms: None,
        };
        let mut evidence = Evidence {
            traffic: Some(TrafficMoves {
                window_secs: 60,
                queries: vec![QueryMove {
                    fingerprint: "SELECT * FROM leads l JOIN campaigns c ON c.id = l.campaign_id"
                        .to_owned(),
                    query_id: "q7".to_owned(),
                    now: window(50, 0, 900.0),
                    before: window(500, 0, 3.0),
                    before_since_start: false,
                }],
                routes: vec![
                    RouteMove {
                        platform: "leadsite.ai".to_owned(),
                        method: "GET".to_owned(),
                        route: "/api/v1/leads".to_owned(),
                        now: window(50, 0, 950.0),
                        before: window(500, 0, 5.0),
                    },
                    RouteMove {
                        platform: "leadsite.ai".to_owned(),
                        method: "GET".to_owned(),
                        route: "/health".to_owned(),
                        now: window(10, 4, 1.0),
                        before: window(10, 0, 1.0),
                    },
                ],
            }),
            ..Evidence::default()
        };
        evidence.observe(&firing("db.query_slow", &[]));
        let platform = Labels::from([("platform".to_owned(), "leadsite.ai".to_owned())]);
        let slow = diagnose("http.latency_high", &platform, &evidence).expect("diagnosis");
        assert_eq!(slow.signature, "db.slow_query");
        assert_eq!(slow.tables, ["leads", "campaigns"]);
        // Before db.query_slow fires (over all the queries), the slow one alone says it.
        let mut early = Evidence {
            traffic: evidence.traffic.clone(),
            query_threshold_ms: Some(100.0),
            ..Evidence::default()
        };
        assert_eq!(
            signature("http.latency_high", &platform, &early).as_deref(),
            Some("db.slow_query")
        );
        early.query_threshold_ms = Some(1000.0);
        assert_eq!(
            signature("http.latency_high", &platform, &early).as_deref(),
            Some("target.slow")
        );
        let text = slow.evidence.join("\n");
        assert!(
            text.contains("route GET /api/v1/leads on leadsite.ai: p95 950 ms over 50 requests in the last 60 s, against 5.0 ms in the 60 s before (×190.0)"),
            "{text}"
        );
        assert!(text.contains("(q7): p95 900 ms"), "{text}");
        assert!(text.contains("the query reads leads, campaigns"), "{text}");
        let errors = diagnose("http.error_rate", &platform, &evidence).expect("diagnosis");
        assert!(
            errors.evidence.iter().any(|e| e
                == "route GET /health on leadsite.ai: 4 of 10 requests answered 5xx in the last 60 s, against 0 of 10 in the 60 s before"),
            "{:?}",
            errors.evidence
        );
        assert!(errors.tables.is_empty());
    }
}
