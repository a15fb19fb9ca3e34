//! The admin HTTP server: `GET /api/v1/system/health` and `GET /metrics` in this version.
//!
//! Owns: the routes, the JSON envelope (`{"success": true, "data": …}` or
//! `{"success": false, "error": …}`), and the response types, which are built for the API
//! rather than borrowed from internal structs. Also a bus subscriber that keeps the view of
//! firing alerts the health endpoint reports. Must not: change anything (mutating endpoints
//! come with authentication).

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentHandle, AgentState},
    bus::{Bus, Event, ExitStatus, Severity, Source, TargetState},
    target::SharedStatus,
    telemetry::Metrics,
};

/// Alerts that are firing now, by rule, as the monitor published them.
pub type FiringAlerts = Arc<RwLock<BTreeMap<String, FiringAlert>>>;

#[derive(Debug, Clone, Serialize)]
pub struct FiringAlert {
    pub rule: String,
    pub severity: Severity,
    pub message: String,
    pub since_unix_ms: u64,
}

/// What the handlers read.
pub struct ApiState {
    pub started: Instant,
    pub target: SharedStatus,
    pub agents: Vec<AgentHandle>,
    pub metrics: Metrics,
    pub alerts: FiringAlerts,
    /// `attached`, or why the eBPF probes are not in use.
    pub ebpf: String,
}

#[derive(Serialize)]
struct Envelope<T: Serialize> {
    success: bool,
    data: T,
}

#[derive(Serialize)]
struct ErrorEnvelope {
    success: bool,
    error: String,
}

fn ok<T: Serialize>(data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        success: true,
        data,
    })
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Overall {
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
    alerts: Vec<FiringAlert>,
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

async fn health(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    let target = state
        .target
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let alerts: Vec<FiringAlert> = state
        .alerts
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    let agents: Vec<AgentView> = state
        .agents
        .iter()
        .map(|handle| {
            let s = handle.status();
            AgentView {
                name: s.name,
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
        .collect();
    let status = if target.state != TargetState::Running
        || alerts.iter().any(|a| a.severity == Severity::Critical)
    {
        Overall::Critical
    } else if !alerts.is_empty() || agents.iter().any(|a| a.state == AgentState::Restarting) {
        Overall::Degraded
    } else {
        Overall::Healthy
    };
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
    ok(HealthView {
        status,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        target: TargetView {
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
        },
        alerts,
        agents,
        probes: ProbesView {
            ebpf: state.ebpf.clone(),
        },
    })
}

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn not_found() -> Response {
    let body = ErrorEnvelope {
        success: false,
        error: "no such endpoint".to_owned(),
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/system/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the admin API on an already bound listener until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

/// Keeps [`FiringAlerts`] in step with the monitor's alert events.
pub async fn track_alerts(bus: Bus, alerts: FiringAlerts, cancel: CancellationToken) {
    let mut events = bus.subscribe();
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Some(Event::Alert {
                rule,
                severity,
                firing,
                message,
            }) => {
                let mut map = alerts.write().unwrap_or_else(PoisonError::into_inner);
                if firing {
                    map.insert(
                        rule.clone(),
                        FiringAlert {
                            rule,
                            severity,
                            message,
                            since_unix_ms: unix_ms(SystemTime::now()),
                        },
                    );
                } else {
                    map.remove(&rule);
                }
            }
            Some(_) => {}
            None => return,
        }
    }
}
