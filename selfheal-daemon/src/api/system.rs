//! The daemon's own views: `health` (open), `health/detailed`, `dashboard`, `agents` and
//! `POST agents/{name}/restart`, and the agents' findings: `performance`, `predictions`,
//! `security`.

use std::sync::{Arc, PoisonError};

use axum::{
    extract::{rejection::QueryRejection, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use super::{error, ok, state_error, unix_ms, ApiState};
use crate::{
    activity::{self, Optimization, Prediction, SecurityFinding, Stamped},
    agents::{AgentHandle, AgentState},
    alerts::{views::ActiveAlertView, Alert},
    bus::{CheckStatus, ExitStatus, HostSample, ProcessSample, Severity, Source, TargetState},
    checks::views::IntegrationView,
    target::TargetStatus,
    traffic::{Figures, MetricsQuery},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Overall {
    Healthy,
    Degraded,
    Critical,
}

#[derive(Serialize)]
struct HealthView {
    status: Overall,
    version: &'static str,
    uptime_seconds: u64,
    target: TargetView,
    /// Active alerts (firing or acknowledged), newest first.
    alerts: Vec<ActiveAlertView>,
    agents: Vec<AgentView>,
    probes: ProbesView,
}

#[derive(Serialize)]
struct TargetView {
    selector: String,
    state: TargetState,
    pid: Option<u32>,
    processes: usize,
    restarts: u64,
    running_since_unix_ms: Option<u64>,
    last_exit: Option<ExitView>,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct ExitView {
    pid: u32,
    /// `exited`, `unknown` or the signal name, as in the metric label.
    reason: &'static str,
    status: ExitStatus,
    signal: Option<i32>,
    code: Option<i32>,
    source: Source,
    at_unix_ms: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the kernel recorded the exit (eBPF only).
    exited_monotonic_ns: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the daemon received it.
    observed_monotonic_ns: u64,
}

#[derive(Serialize)]
struct AgentView {
    name: &'static str,
    /// What the agent does, in one line.
    role: &'static str,
    enabled: bool,
    state: AgentState,
    started_at_unix_ms: Option<u64>,
    last_activity_unix_ms: Option<u64>,
    events_handled: u64,
    events_published: u64,
    restarts: u64,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct ProbesView {
    ebpf: String,
}

fn role(agent: &str) -> &'static str {
    match agent {
        "monitor" => "watches the target, its traffic, the host and the checks; raises alerts",
        "security" => "flags bursts of reset and refused connections",
        "diagnostic" => "explains each alert: a cause, its evidence and the actions that fit",
        "repair" => "runs the playbook's actions through the safety gate and verifies recovery",
        "learning" => "records which action recovered which cause, and how fast",
        "predictive" => "warns before the target's memory reaches its limit",
        "performance" => "suggests tuning: slow outbound connects, missing pools",
        _ => "",
    }
}

fn target_view(target: TargetStatus) -> TargetView {
    let last_exit = target.last_exit.map(|exit| ExitView {
        pid: exit.pid,
        reason: exit.reason,
        status: exit.status,
        signal: match exit.status {
            ExitStatus::Signaled { signal, .. } => Some(signal),
            _ => None,
        },
        code: match exit.status {
            ExitStatus::Exited { code } => Some(code),
            _ => None,
        },
        source: exit.source,
        at_unix_ms: unix_ms(exit.at),
        exited_monotonic_ns: exit.exited_monotonic_ns,
        observed_monotonic_ns: exit.observed_monotonic_ns,
    });
    TargetView {
        selector: target.selector,
        state: target.state,
        pid: target.pid,
        processes: target.members.len(),
        restarts: target.restarts,
        running_since_unix_ms: target
            .since
            .filter(|_| target.state == TargetState::Running)
            .map(unix_ms),
        last_exit,
        last_error: target.last_error,
    }
}

fn agent_views(agents: &[AgentHandle]) -> Vec<AgentView> {
    agents
        .iter()
        .map(|handle| {
            let s = handle.status();
            AgentView {
                name: s.name,
                role: role(s.name),
                enabled: s.enabled,
                state: s.state,
                started_at_unix_ms: s.started_at.map(unix_ms),
                last_activity_unix_ms: s.last_activity.map(unix_ms),
                events_handled: s.events_handled,
                events_published: s.events_published,
                restarts: s.restarts,
                last_error: s.last_error,
            }
        })
        .collect()
}

/// Critical when the target is not running or a critical alert is active; degraded with
/// any other active alert or an agent waiting to restart.
fn overall(target: &TargetStatus, active: &[Alert], agents: &[AgentView]) -> Overall {
    if target.state != TargetState::Running
        || active.iter().any(|a| a.severity == Severity::Critical)
    {
        Overall::Critical
    } else if !active.is_empty() || agents.iter().any(|a| a.state == AgentState::Restarting) {
        Overall::Degraded
    } else {
        Overall::Healthy
    }
}

fn target_status(state: &ApiState) -> TargetStatus {
    state
        .target
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

fn health_view(state: &ApiState) -> HealthView {
    let target = target_status(state);
    let active = state.alerts.active();
    let agents = agent_views(&state.agents);
    HealthView {
        status: overall(&target, &active, &agents),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        target: target_view(target),
        alerts: active.iter().map(ActiveAlertView::from).collect(),
        agents,
        probes: ProbesView {
            ebpf: state.ebpf.clone(),
        },
    }
}

/// `GET /api/v1/system/health` (open): overall status, target, active alerts, agents.
pub(super) async fn health(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    ok(health_view(&state))
}

#[derive(Serialize)]
struct DetailedView {
    #[serde(flatten)]
    health: HealthView,
    /// The target's last sample (procfs and its cgroup).
    process: Option<Stamped<ProcessSample>>,
    host: Option<Stamped<HostSample>>,
    tcp: Option<Stamped<crate::bus::TcpSummary>>,
    /// The monitor's last health changes, newest first.
    health_changes: Vec<Stamped<activity::HealthChange>>,
    integrations: Vec<IntegrationView>,
    store: crate::store::MemoryReport,
    self_healing: SelfHealingView,
}

#[derive(Serialize)]
struct SelfHealingView {
    enabled: bool,
    /// `auto`, `dry-run` or `off`.
    mode: crate::actuators::gate::Mode,
    open_circuits: Vec<String>,
    read_only_api: bool,
}

fn self_healing(state: &ApiState) -> SelfHealingView {
    SelfHealingView {
        enabled: state.repair_config.self_healing,
        mode: state.repair_config.effective_mode(),
        open_circuits: state
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open_circuits(std::time::Instant::now()),
        read_only_api: state.read_only,
    }
}

/// `GET /api/v1/system/health/detailed`: health with the last samples, the checks, the
/// metrics store's memory and the self-healing mode.
pub(super) async fn health_detailed(State(state): State<Arc<ApiState>>) -> Response {
    let integrations = match state.checks.integrations().await {
        Ok(checks) => checks.into_iter().map(IntegrationView::from).collect(),
        Err(err) => return state_error("health", &err),
    };
    let recent = state.activity.newest(20);
    ok(DetailedView {
        health: health_view(&state),
        process: recent.process,
        host: recent.host,
        tcp: recent.tcp,
        health_changes: recent.health.into(),
        integrations,
        store: state.traffic.store().memory(),
        self_healing: self_healing(&state),
    })
    .into_response()
}

#[derive(Serialize)]
struct DashboardView {
    system: SystemView,
    agents: Vec<AgentView>,
    platforms: Vec<PlatformHealth>,
    alerts: AlertCounts,
    repairs: RepairSummary,
    predictions: Vec<Stamped<Prediction>>,
    security: Vec<Stamped<SecurityFinding>>,
    optimizations: Vec<Stamped<Optimization>>,
}

#[derive(Serialize)]
struct SystemView {
    status: Overall,
    version: &'static str,
    uptime_seconds: u64,
    target: TargetView,
    process: Option<ProcessSample>,
    host: Option<HostSample>,
    self_healing: SelfHealingView,
}

/// A platform at a glance: the worst of its checks and alerts, and its traffic over the last
/// five minutes.
#[derive(Serialize)]
struct PlatformHealth {
    name: String,
    /// `healthy`, `degraded`, `down` or `unknown` (no check, no traffic, no alert).
    status: CheckStatus,
    /// Why it is not healthy.
    reasons: Vec<String>,
    traffic: Option<Figures>,
    checks: Vec<PlatformCheck>,
    active_alerts: usize,
}

#[derive(Serialize)]
struct PlatformCheck {
    name: String,
    status: CheckStatus,
    response_ms: Option<f64>,
}

#[derive(Serialize)]
struct AlertCounts {
    active: usize,
    firing: usize,
    acknowledged: usize,
    critical: usize,
    warning: usize,
    info: usize,
    /// Every alert the state DB keeps (retention applies).
    total: i64,
    resolved: i64,
    auto_resolved: i64,
}

#[derive(Serialize)]
struct RepairSummary {
    #[serde(flatten)]
    counts: crate::repairs::Counts,
    /// The newest decisions, newest first.
    last: Vec<crate::repairs::Repair>,
}

const TRAFFIC_WINDOW: &str = "5m";

/// The platforms' health: every configured platform (and `other` when it has traffic).
fn platform_health(
    state: &ApiState,
    integrations: &[IntegrationView],
    active: &[Alert],
) -> Vec<PlatformHealth> {
    let traffic = state
        .traffic
        .metrics_view(&MetricsQuery {
            platform: None,
            window: Some(TRAFFIC_WINDOW.to_owned()),
            step: None,
        })
        .map(|view| view.platforms)
        .unwrap_or_default();
    let mut names: Vec<String> = state
        .traffic
        .platforms()
        .names()
        .iter()
        .map(ToString::to_string)
        .collect();
    for platform in &traffic {
        if !names.contains(&platform.platform) {
            names.push(platform.platform.clone());
        }
    }
    let mut traffic: Vec<_> = traffic.into_iter().map(Some).collect();
    names
        .into_iter()
        .map(|name| {
            let figures = traffic
                .iter_mut()
                .find(|p| p.as_ref().is_some_and(|p| p.platform == name))
                .and_then(Option::take)
                .map(|p| p.figures);
            let checks: Vec<PlatformCheck> = integrations
                .iter()
                .filter(|check| check.enabled && check.platform.as_deref() == Some(&name))
                .map(|check| PlatformCheck {
                    name: check.name.clone(),
                    status: check.status,
                    response_ms: check.response_ms,
                })
                .collect();
            let alerts: Vec<&Alert> = active
                .iter()
                .filter(|a| a.platform.as_deref() == Some(&name))
                .collect();
            let mut reasons = Vec::new();
            let mut status = CheckStatus::Unknown;
            let mut worse = |to: CheckStatus, why: String| {
                let rank = |s: CheckStatus| match s {
                    CheckStatus::Unknown => 0,
                    CheckStatus::Healthy => 1,
                    CheckStatus::Degraded => 2,
                    CheckStatus::Down => 3,
                };
                if rank(to) > rank(status) {
                    status = to;
                }
                if matches!(to, CheckStatus::Degraded | CheckStatus::Down) && !why.is_empty() {
                    reasons.push(why);
                }
            };
            for check in &checks {
                worse(
                    check.status,
                    format!("check {} is {}", check.name, check.status.as_str()),
                );
            }
            for alert in &alerts {
                let to = if alert.severity == Severity::Critical {
                    CheckStatus::Down
                } else {
                    CheckStatus::Degraded
                };
                worse(to, alert.message.clone());
            }
            if let Some(figures) = &figures {
                if figures.requests > 0 {
                    worse(CheckStatus::Healthy, String::new());
                }
            }
            PlatformHealth {
                name,
                status,
                reasons,
                traffic: figures,
                checks,
                active_alerts: alerts.len(),
            }
        })
        .collect()
}

/// `GET /api/v1/system/dashboard`: everything the dashboard's first paint needs.
pub(super) async fn dashboard(State(state): State<Arc<ApiState>>) -> Response {
    let integrations: Vec<IntegrationView> = match state.checks.integrations().await {
        Ok(checks) => checks.into_iter().map(IntegrationView::from).collect(),
        Err(err) => return state_error("dashboard", &err),
    };
    let counts = match state.alerts.counts().await {
        Ok(counts) => counts,
        Err(err) => return super::alert_error(&err),
    };
    let (repair_counts, last) =
        match tokio::try_join!(state.repairs.counts(), state.repairs.list(5, None)) {
            Ok(both) => both,
            Err(err) => return state_error("dashboard", &err),
        };
    let target = target_status(&state);
    let active = state.alerts.active();
    let agents = agent_views(&state.agents);
    let mut recent = state.activity.newest(10);
    if target.state != TargetState::Running {
        // The last sample is of a process that is gone.
        recent.process = None;
    }
    let count = |f: &dyn Fn(&Alert) -> bool| active.iter().filter(|a| f(a)).count();
    let alerts = AlertCounts {
        active: active.len(),
        firing: count(&|a| a.state == crate::alerts::AlertState::Firing),
        acknowledged: count(&|a| a.state == crate::alerts::AlertState::Acknowledged),
        critical: count(&|a| a.severity == Severity::Critical),
        warning: count(&|a| a.severity == Severity::Warning),
        info: count(&|a| a.severity == Severity::Info),
        total: counts.total,
        resolved: counts.resolved,
        auto_resolved: counts.auto_resolved,
    };
    ok(DashboardView {
        platforms: platform_health(&state, &integrations, &active),
        system: SystemView {
            status: overall(&target, &active, &agents),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: state.started.elapsed().as_secs(),
            target: target_view(target),
            process: recent.process.map(|s| s.item),
            host: recent.host.map(|s| s.item),
            self_healing: self_healing(&state),
        },
        agents,
        alerts,
        repairs: RepairSummary {
            counts: repair_counts,
            last,
        },
        predictions: recent.predictions.into(),
        security: recent.security.into(),
        optimizations: recent.optimizations.into(),
    })
    .into_response()
}

/// `GET /api/v1/system/agents`: the seven agents and their state.
pub(super) async fn agents(State(state): State<Arc<ApiState>>) -> Response {
    ok(serde_json::json!({ "agents": agent_views(&state.agents) })).into_response()
}

/// `POST /api/v1/system/agents/{name}/restart`: 404 for no such agent, 409 for a disabled
/// one; the restart happens at once (its task is stopped and started again) and is audited.
pub(super) async fn restart_agent(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(handle) = state.agents.iter().find(|h| h.status().name == name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no agent {name:?}; the agents are {}",
                crate::agents::AGENTS.join(", ")
            ),
        );
    };
    let (by, note) = match crate::alerts::views::ChangeBody::parse(&body) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let before = handle.status();
    if !before.enabled {
        return error(
            StatusCode::CONFLICT,
            format!(
                "the {name} agent is disabled (agents.{name} = false or AGENT_{}_ENABLED)",
                name.to_uppercase()
            ),
        );
    }
    handle.request_restart();
    tracing::info!(agent = %name, %by, "agent restart requested by an operator");
    let note = if note.is_empty() {
        name.clone()
    } else {
        format!("{name}: {note}")
    };
    if let Err(err) = state
        .repairs
        .audit(crate::state::now_ms(), by, "agent_restart", note)
        .await
    {
        return state_error("agent restart audit", &err);
    }
    (
        StatusCode::ACCEPTED,
        ok(serde_json::json!({
            "agent": name,
            "restart_requested": true,
            "restarts_before": before.restarts,
        })),
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FindingsQuery {
    limit: Option<usize>,
}

fn findings_limit(query: Result<Query<FindingsQuery>, QueryRejection>) -> Result<usize, String> {
    super::list_query(query, |q| q.limit).map(|(_, limit)| limit.min(activity::KEEP))
}

#[derive(Serialize)]
struct PerformanceView {
    /// The performance agent's suggestions, newest first.
    optimizations: Vec<Stamped<Optimization>>,
    optimizations_total: u64,
    /// The slowest routes over the last five minutes (by p95).
    slowest_routes: Vec<SlowRoute>,
    /// The queries that took the most time in total since the daemon started.
    heaviest_queries: Vec<crate::traffic::QueryView>,
    /// TCP activity of the target over the last sampling interval.
    connections: Option<Stamped<crate::bus::TcpSummary>>,
}

#[derive(Serialize)]
struct SlowRoute {
    platform: String,
    method: String,
    route: String,
    #[serde(flatten)]
    figures: Figures,
}

/// `GET /api/v1/system/performance?limit=`: the performance agent's suggestions with the
/// figures they are about.
pub(super) async fn performance(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<FindingsQuery>, QueryRejection>,
) -> Response {
    let limit = match findings_limit(query) {
        Ok(limit) => limit,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let mut slowest_routes: Vec<SlowRoute> = state
        .traffic
        .metrics_view(&MetricsQuery {
            platform: None,
            window: Some(TRAFFIC_WINDOW.to_owned()),
            step: None,
        })
        .map(|view| view.platforms)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|platform| {
            let name = platform.platform;
            platform.routes.into_iter().map(move |route| SlowRoute {
                platform: name.clone(),
                method: route.method,
                route: route.route,
                figures: route.figures,
            })
        })
        .collect();
    slowest_routes.sort_by(|a, b| {
        b.figures
            .p95_ms
            .partial_cmp(&a.figures.p95_ms)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    slowest_routes.truncate(10);
    let mut heaviest_queries = state.traffic.queries_view().queries;
    heaviest_queries.truncate(10);
    let (optimizations, optimizations_total, connections) = state.activity.read(|recent| {
        (
            recent.optimizations.iter().take(limit).cloned().collect(),
            recent.optimizations_total,
            recent.tcp.clone(),
        )
    });
    ok(PerformanceView {
        optimizations,
        optimizations_total,
        slowest_routes,
        heaviest_queries,
        connections,
    })
    .into_response()
}

/// The findings of `agent` as `f` shapes them from the record (the newest `limit`), with
/// whether the agent is enabled; 400 for a bad `limit`.
fn findings(
    state: &ApiState,
    query: Result<Query<FindingsQuery>, QueryRejection>,
    agent: &str,
    f: impl FnOnce(&activity::Recent, usize) -> serde_json::Value,
) -> Response {
    let limit = match findings_limit(query) {
        Ok(limit) => limit,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let enabled = state.agents.iter().any(|h| {
        let s = h.status();
        s.name == agent && s.enabled
    });
    let mut data = state.activity.read(|recent| f(recent, limit));
    if let Some(object) = data.as_object_mut() {
        object.insert("agent_enabled".to_owned(), enabled.into());
    }
    ok(data).into_response()
}

/// `GET /api/v1/system/predictions?limit=`: the predictive agent's forecasts, newest first.
pub(super) async fn predictions(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<FindingsQuery>, QueryRejection>,
) -> Response {
    findings(&state, query, "predictive", |recent, limit| {
        serde_json::json!({
            "total": recent.predictions_total,
            "predictions": recent.predictions.iter().take(limit).collect::<Vec<_>>(),
        })
    })
}

/// `GET /api/v1/system/security?limit=`: the security agent's findings, newest first, and
/// the last interval's connection figures they are drawn from.
pub(super) async fn security(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<FindingsQuery>, QueryRejection>,
) -> Response {
    findings(&state, query, "security", |recent, limit| {
        serde_json::json!({
            "total": recent.security_total,
            "findings": recent.security.iter().take(limit).collect::<Vec<_>>(),
            "connections": recent.tcp,
        })
    })
}
