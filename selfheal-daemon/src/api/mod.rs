//! The admin HTTP server: every endpoint of the contract under `/api/v1/system/`,
//! `GET /metrics`, the `OpenAPI` document and the dashboard. [`routes`] lists them all with who may
//! call them: `health`, `/metrics`, `/api/v1/openapi.json` and the dashboard's page are open;
//! the rest needs the bearer token; the endpoints that change something answer 403 when
//! `admin.read_only` is set.
//!
//! Owns: the routes, the bearer-token check (constant time), the admin token's resolution
//! (`SELFHEAL_ADMIN_TOKEN`, `admin.token_file`, or one generated in the state directory),
//! the JSON envelope (`{"success": true, "data": …}` or `{"success": false, "error": …}`),
//! and the response types, which are built for the API rather than borrowed from internal
//! structs. Must not: log or return the token, or change anything but through the alert
//! manager, the agents' supervisor, the checks' runner and the gate's circuit reset.

mod dashboard;
mod events;
mod openapi;
mod system;

use std::{
    sync::{atomic::AtomicUsize, Arc},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::{rejection::QueryRejection, Path, Query, Request, State},
    http::{header, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, MethodRouter},
    Json, Router,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    activity::Activity,
    actuators::gate::SharedGate,
    agents::AgentHandle,
    alerts::{
        views::{
            optional_json, AlertDetailView, AlertListView, AlertView, AlertsQuery, ChangeBody,
            SilenceBody, SilenceView,
        },
        Action, AlertError, AlertManager,
    },
    bus::Bus,
    checks::{
        views::{IntegrationView, IntegrationsView, RunBody, RunView},
        CheckError, Checks,
    },
    config::{AdminConfig, Secret},
    repairs::RepairLog,
    target::SharedStatus,
    telemetry::Metrics,
    traffic::{MetricsQuery, TrafficView},
};

/// What the handlers read.
pub struct ApiState {
    pub started: Instant,
    pub target: SharedStatus,
    pub agents: Vec<AgentHandle>,
    pub metrics: Metrics,
    pub alerts: AlertManager,
    /// `attached`, or why the eBPF probes are not in use.
    pub ebpf: String,
    /// The bearer token of the protected endpoints.
    pub token: Secret,
    pub traffic: TrafficView,
    pub checks: Checks,
    pub repairs: RepairLog,
    pub gate: SharedGate,
    pub repair_config: crate::config::RepairConfig,
    /// The agents' recent findings and the last samples.
    pub activity: Activity,
    /// What the event streams subscribe to.
    pub bus: Bus,
    /// `admin.read_only`: the endpoints that change something answer 403.
    pub read_only: bool,
    /// Event streams open now.
    pub streams: AtomicUsize,
    /// Fires when the daemon stops: the event streams end, so the server's graceful shutdown
    /// does not wait on them.
    pub shutdown: CancellationToken,
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

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorEnvelope {
        success: false,
        error: message.into(),
    };
    (status, Json(body)).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed(method: Method) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here (see /api/v1/openapi.json)"),
    )
}

/// `GET /api/v1/system/metrics?platform=…&window=…`: per platform and route over a window;
/// with `&step=…`, as points in steps of it (the dashboard's charts).
async fn traffic_metrics(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let answer = match query.step.as_deref() {
        Some(step) => state
            .traffic
            .metrics_series_view(&query, step)
            .map(|view| ok(view).into_response()),
        None => state
            .traffic
            .metrics_view(&query)
            .map(|view| ok(view).into_response()),
    };
    answer.unwrap_or_else(|err| {
        if err.is_bad_request() {
            error(StatusCode::BAD_REQUEST, err.to_string())
        } else {
            let source = std::error::Error::source(&err).map(ToString::to_string);
            tracing::error!(error = %err, ?source, "the metrics view failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
        }
    })
}

/// `GET /api/v1/system/queries`: per query fingerprint since the daemon started.
async fn queries(State(state): State<Arc<ApiState>>) -> Response {
    ok(state.traffic.queries_view()).into_response()
}

/// `GET /api/v1/system/traces`: requests in flight, the slowest recent ones and their queries.
async fn traces(State(state): State<Arc<ApiState>>) -> Response {
    ok(state.traffic.traces_view()).into_response()
}

/// The API's answer to an alert manager error: 404, 409, or 503 when the database failed.
fn alert_error(err: &AlertError) -> Response {
    match err {
        AlertError::NotFound { .. } | AlertError::SilenceNotFound { .. } => {
            error(StatusCode::NOT_FOUND, err.to_string())
        }
        AlertError::NotAllowed { .. } | AlertError::SilenceEnded { .. } => {
            error(StatusCode::CONFLICT, err.to_string())
        }
        AlertError::Db(_) | AlertError::State(_) => {
            tracing::error!(error = %crate::app::error_chain(err), "an alert request failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                crate::app::error_chain(err),
            )
        }
    }
}

/// A path id: a positive integer, else `None` (a 404: no such alert can exist).
fn path_id(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().filter(|id| *id > 0)
}

/// `GET /api/v1/system/alerts?state=&severity=&platform=&history=&limit=&offset=`.
async fn list_alerts(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<AlertsQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.alerts.list(filter.clone()).await {
        Ok(page) => ok(AlertListView::new(&page, &filter)).into_response(),
        Err(err) => alert_error(&err),
    }
}

/// `GET /api/v1/system/alerts/{id}`: the alert, its history, audit and notifications.
async fn alert_detail(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let Some(id) = path_id(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no alert {id:?}"));
    };
    match state.alerts.detail(id).await {
        Ok((detail, silences)) => ok(AlertDetailView::new(&detail, &silences)).into_response(),
        Err(err) => alert_error(&err),
    }
}

async fn change_alert(state: &ApiState, id: &str, action: Action, body: &Bytes) -> Response {
    let Some(id) = path_id(id) else {
        return error(StatusCode::NOT_FOUND, format!("no alert {id:?}"));
    };
    let (by, note) = match ChangeBody::parse(body) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.alerts.change(id, action, by, note).await {
        Ok(alert) => ok(AlertView::new(&alert, &[])).into_response(),
        Err(err) => alert_error(&err),
    }
}

/// `POST /api/v1/system/alerts/{id}/acknowledge` with an optional `{"by", "note"}`.
async fn acknowledge_alert(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    change_alert(&state, &id, Action::Acknowledge, &body).await
}

/// `POST /api/v1/system/alerts/{id}/resolve` with an optional `{"by", "note"}`.
async fn resolve_alert(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    change_alert(&state, &id, Action::Resolve, &body).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SilencesQuery {
    all: Option<bool>,
}

/// `GET /api/v1/system/silences` (active ones; `?all=true` for every one kept).
async fn list_silences(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<SilencesQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let now = state.alerts.now_ms();
    match state.alerts.silences(query.all.unwrap_or(false)).await {
        Ok(silences) => ok(silences
            .iter()
            .map(|s| SilenceView::new(s, now))
            .collect::<Vec<_>>())
        .into_response(),
        Err(err) => alert_error(&err),
    }
}

/// `POST /api/v1/system/silences` with `{"matchers": {...}, "duration": "2h", "by", "comment"}`.
async fn create_silence(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let now = state.alerts.now_ms();
    let (matchers, ends_ms, by, comment) = match SilenceBody::parse(&body, now) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.alerts.silence(matchers, ends_ms, by, comment).await {
        Ok(silence) => (
            StatusCode::CREATED,
            ok(SilenceView::new(&silence, state.alerts.now_ms())),
        )
            .into_response(),
        Err(err) => alert_error(&err),
    }
}

/// `DELETE /api/v1/system/silences/{id}`: ends the silence now.
async fn expire_silence(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = path_id(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no silence {id:?}"));
    };
    let (by, _) = match ChangeBody::parse(&body) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.alerts.expire_silence(id, by).await {
        Ok(silence) => ok(SilenceView::new(&silence, state.alerts.now_ms())).into_response(),
        Err(err) => alert_error(&err),
    }
}

/// `GET /api/v1/system/integrations`: every check with its status and figures.
async fn integrations(State(state): State<Arc<ApiState>>) -> Response {
    match state.checks.integrations().await {
        Ok(checks) => ok(IntegrationsView::new(
            checks.into_iter().map(IntegrationView::from).collect(),
        ))
        .into_response(),
        Err(err) => {
            tracing::error!(error = %crate::app::error_chain(&err), "the integrations view failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                crate::app::error_chain(&err),
            )
        }
    }
}

/// A list endpoint's query and its `limit` (50 by default, 1 to 1000), or why it is a 400.
fn list_query<T>(
    query: Result<Query<T>, QueryRejection>,
    limit: impl Fn(&T) -> Option<usize>,
) -> Result<(T, usize), String> {
    let Query(query) = query.map_err(|rejection| rejection.body_text())?;
    let limit = limit(&query).unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err("limit must be between 1 and 1000".to_owned());
    }
    Ok((query, limit))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairsQuery {
    limit: Option<usize>,
    signature: Option<String>,
}

#[derive(Serialize)]
struct RepairsView {
    /// `auto`, `dry-run` or `off`: what the gate does with a decision.
    mode: crate::actuators::gate::Mode,
    self_healing: bool,
    /// Signatures whose automatic repair is stopped (their budget was spent).
    open_circuits: Vec<String>,
    repairs: Vec<crate::repairs::Repair>,
}

fn state_error(what: &str, err: &crate::state::StateError) -> Response {
    tracing::error!(error = %crate::app::error_chain(err), "the {what} view failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        crate::app::error_chain(err),
    )
}

/// `GET /api/v1/system/repairs?limit=&signature=`: the repair decisions, newest first (50 by
/// default, at most 1000), with the gate's mode and open circuits.
async fn repairs(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<RepairsQuery>, QueryRejection>,
) -> Response {
    let (query, limit) = match list_query(query, |q| q.limit) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let open_circuits = state
        .gate
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .open_circuits(Instant::now());
    match state.repairs.list(limit, query.signature).await {
        Ok(repairs) => ok(RepairsView {
            mode: state.repair_config.effective_mode(),
            self_healing: state.repair_config.self_healing,
            open_circuits,
            repairs,
        })
        .into_response(),
        Err(err) => state_error("repairs", &err),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

/// `GET /api/v1/system/diagnoses?limit=`: the diagnoses, newest first (50 by default, at
/// most 1000), each with its evidence, candidate actions and LLM summary (when asked for).
async fn diagnoses(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<LimitQuery>, QueryRejection>,
) -> Response {
    let limit = match list_query(query, |q| q.limit) {
        Ok((_, limit)) => limit,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.repairs.diagnoses(limit).await {
        Ok(rows) => ok(serde_json::json!({ "diagnoses": rows })).into_response(),
        Err(err) => state_error("diagnoses", &err),
    }
}

/// `POST /api/v1/system/repairs/circuits/{signature}/reset` with an optional
/// `{"by": …, "note": …}`: a human closes an open circuit, and automatic repair of the
/// signature resumes with a fresh budget. 409 when it is not open; audited.
async fn reset_circuit(
    State(state): State<Arc<ApiState>>,
    Path(signature): Path<String>,
    body: Bytes,
) -> Response {
    let (actor, note) = match ChangeBody::parse(&body) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let was_open = state
        .gate
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .reset(&signature);
    if !was_open {
        return error(
            StatusCode::CONFLICT,
            format!("the circuit of {signature:?} is not open"),
        );
    }
    let note = if note.is_empty() {
        signature.clone()
    } else {
        format!("{signature}: {note}")
    };
    tracing::info!(%signature, %actor, "circuit closed by an operator");
    if let Err(err) = state
        .repairs
        .audit(crate::state::now_ms(), actor, "circuit_reset", note)
        .await
    {
        return state_error("circuit reset audit", &err);
    }
    let open_circuits = state
        .gate
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .open_circuits(Instant::now());
    ok(serde_json::json!({ "signature": signature, "open_circuits": open_circuits }))
        .into_response()
}

#[derive(Serialize)]
struct PatternsView {
    patterns: Vec<crate::repairs::Pattern>,
    /// Per signature with a record, the order its candidates are tried in now.
    order: std::collections::BTreeMap<String, Vec<crate::repairs::Ranked>>,
}

/// `GET /api/v1/system/patterns`: what was learned per signature and action, and the order
/// the repair agent would try each signature's candidates in now.
async fn patterns(State(state): State<Arc<ApiState>>) -> Response {
    let patterns = match state.repairs.patterns().await {
        Ok(patterns) => patterns,
        Err(err) => return state_error("patterns", &err),
    };
    let mut order = std::collections::BTreeMap::new();
    for pattern in &patterns {
        if order.contains_key(&pattern.signature) {
            continue;
        }
        let learned = match state.repairs.learned(pattern.signature.clone()).await {
            Ok(learned) => learned,
            Err(err) => return state_error("patterns", &err),
        };
        let candidates =
            crate::repairs::playbook::candidates(&state.repair_config, &pattern.signature);
        order.insert(
            pattern.signature.clone(),
            crate::repairs::rank(&candidates, &learned, state.repair_config.exploration),
        );
    }
    ok(PatternsView { patterns, order }).into_response()
}

/// `POST /api/v1/system/checks/run` with an optional `{"name": …}`: runs the check (every
/// check without a name) now and answers with the results.
async fn run_checks(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let body: RunBody = match optional_json(&body) {
        Ok(body) => body,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid body: expected {{}} or {{\"name\": \"<check>\"}} ({})",
                    err.to_string().replace("struct RunBody", "an object")
                ),
            )
        }
    };
    match state.checks.run_now(body.name.as_deref()).await {
        Ok(results) => ok(results
            .into_iter()
            .map(|(spec, latest)| RunView::new(&spec, latest))
            .collect::<Vec<_>>())
        .into_response(),
        Err(err @ CheckError::NotFound { .. }) => error(StatusCode::NOT_FOUND, err.to_string()),
        Err(err @ CheckError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

/// Refuses a request without `Authorization: Bearer <token>`.
async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if token_matches(token, state.token.expose()) => next.run(request).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "wrong bearer token"),
        None => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs Authorization: Bearer <token> (see admin.token_file)",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// Compares in time independent of where the tokens differ.
fn token_matches(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Open,
    /// The bearer token.
    Read,
    /// The bearer token, and refused with 403 under `admin.read_only`.
    Change,
}

/// One endpoint: its path (axum's syntax, which is `OpenAPI`'s), method, access and handler.
pub struct Route {
    pub path: &'static str,
    pub method: Method,
    pub access: Access,
    handler: MethodRouter<Arc<ApiState>>,
}

fn route(
    path: &'static str,
    method: Method,
    access: Access,
    handler: MethodRouter<Arc<ApiState>>,
) -> Route {
    Route {
        path,
        method,
        access,
        handler,
    }
}

/// Every endpoint the admin server has. The `OpenAPI` document lists exactly these (a test
/// holds them in step).
pub fn routes() -> Vec<Route> {
    use Access::{Change, Open, Read};
    vec![
        route("/", Method::GET, Open, get(dashboard::page)),
        route("/metrics", Method::GET, Open, get(metrics)),
        route(
            "/api/v1/openapi.json",
            Method::GET,
            Open,
            get(openapi::document),
        ),
        route(
            "/api/v1/system/health",
            Method::GET,
            Open,
            get(system::health),
        ),
        route(
            "/api/v1/system/health/detailed",
            Method::GET,
            Read,
            get(system::health_detailed),
        ),
        route(
            "/api/v1/system/dashboard",
            Method::GET,
            Read,
            get(system::dashboard),
        ),
        route(
            "/api/v1/system/agents",
            Method::GET,
            Read,
            get(system::agents),
        ),
        route(
            "/api/v1/system/agents/{name}/restart",
            Method::POST,
            Change,
            post(system::restart_agent),
        ),
        route(
            "/api/v1/system/events",
            Method::GET,
            Read,
            get(events::events),
        ),
        route(
            "/api/v1/system/metrics",
            Method::GET,
            Read,
            get(traffic_metrics),
        ),
        route("/api/v1/system/queries", Method::GET, Read, get(queries)),
        route("/api/v1/system/traces", Method::GET, Read, get(traces)),
        route(
            "/api/v1/system/performance",
            Method::GET,
            Read,
            get(system::performance),
        ),
        route(
            "/api/v1/system/predictions",
            Method::GET,
            Read,
            get(system::predictions),
        ),
        route(
            "/api/v1/system/security",
            Method::GET,
            Read,
            get(system::security),
        ),
        route("/api/v1/system/alerts", Method::GET, Read, get(list_alerts)),
        route(
            "/api/v1/system/alerts/{id}",
            Method::GET,
            Read,
            get(alert_detail),
        ),
        route(
            "/api/v1/system/alerts/{id}/acknowledge",
            Method::POST,
            Change,
            post(acknowledge_alert),
        ),
        route(
            "/api/v1/system/alerts/{id}/resolve",
            Method::POST,
            Change,
            post(resolve_alert),
        ),
        route(
            "/api/v1/system/silences",
            Method::GET,
            Read,
            get(list_silences),
        ),
        route(
            "/api/v1/system/silences",
            Method::POST,
            Change,
            post(create_silence),
        ),
        route(
            "/api/v1/system/silences/{id}",
            Method::DELETE,
            Change,
            delete(expire_silence),
        ),
        route(
            "/api/v1/system/integrations",
            Method::GET,
            Read,
            get(integrations),
        ),
        route(
            "/api/v1/system/checks/run",
            Method::POST,
            Change,
            post(run_checks),
        ),
        route("/api/v1/system/repairs", Method::GET, Read, get(repairs)),
        route(
            "/api/v1/system/repairs/circuits/{signature}/reset",
            Method::POST,
            Change,
            post(reset_circuit),
        ),
        route("/api/v1/system/patterns", Method::GET, Read, get(patterns)),
        route(
            "/api/v1/system/diagnoses",
            Method::GET,
            Read,
            get(diagnoses),
        ),
    ]
}

/// Refuses a change under `admin.read_only`.
async fn refuse_changes(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.read_only {
        return error(
            StatusCode::FORBIDDEN,
            "this daemon's admin API is read-only (admin.read_only = true)",
        );
    }
    next.run(request).await
}

pub fn router(state: Arc<ApiState>) -> Router {
    let mut router = Router::new();
    for route in routes() {
        // The last layer added runs first: the token is checked before the read-only rule.
        let handler = match route.access {
            Access::Open => route.handler,
            Access::Read => route
                .handler
                .route_layer(middleware::from_fn_with_state(state.clone(), require_token)),
            Access::Change => route
                .handler
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    refuse_changes,
                ))
                .route_layer(middleware::from_fn_with_state(state.clone(), require_token)),
        };
        router = router.route(route.path, handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Where the admin token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Environment,
    File(std::path::PathBuf),
    Generated(std::path::PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the admin token file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token file {path} is empty or shorter than 16 characters")]
    TooShort { path: std::path::PathBuf },
    #[error("the admin token file {path} is readable by other users (chmod 600 it)")]
    Exposed { path: std::path::PathBuf },
    #[error("cannot create the admin token file {path}")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The token of the protected endpoints: `SELFHEAL_ADMIN_TOKEN`, else `admin.token_file`,
/// else `admin.token` in `state_dir`, created with a random token (mode 0600) if missing.
pub fn resolve_token(
    admin: &AdminConfig,
    state_dir: &std::path::Path,
) -> Result<(Secret, TokenSource), TokenError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};

    if let Some(token) = &admin.token {
        return Ok((Secret::new(token.expose().trim()), TokenSource::Environment));
    }
    let read = |path: &std::path::Path| -> Result<Secret, TokenError> {
        let metadata = std::fs::metadata(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        if metadata.mode() & 0o077 != 0 {
            return Err(TokenError::Exposed {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(TokenError::TooShort {
                path: path.to_owned(),
            });
        }
        Ok(Secret::new(token))
    };
    if let Some(path) = &admin.token_file {
        return Ok((read(path)?, TokenSource::File(path.clone())));
    }
    let path = state_dir.join("admin.token");
    if path.exists() {
        return Ok((read(&path)?, TokenSource::Generated(path)));
    }
    let create = |source| TokenError::Create {
        path: path.clone(),
        source,
    };
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .map_err(create)?;
    let token = random.iter().fold(String::with_capacity(64), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    });
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(create)?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()).map_err(create)?;
    Ok((Secret::new(&token), TokenSource::Generated(path)))
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

/// Binds `path` as a unix socket readable and writable by the daemon's user only (a stale
/// socket file from an earlier run is replaced; anything else there is an error).
pub fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is serving on it (a second daemon?)",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there",
            ))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Created with the umask's mode, then narrowed before anyone is served.
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the admin API on a unix socket until cancelled, then removes the socket file.
pub async fn serve_socket(
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
    state: Arc<ApiState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    // Only the file this daemon created: another may have replaced it since.
    if ours.is_some() && std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok() == ours {
        let _ = std::fs::remove_file(&path);
    }
    served
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn the_token_comes_from_the_environment_a_file_or_is_generated_once() {
        let dir = tempfile::tempdir().expect("dir");
        let mut admin = AdminConfig::default();

        let (generated, source) = resolve_token(&admin, dir.path()).expect("generated");
        let path = dir.path().join("admin.token");
        assert_eq!(source, TokenSource::Generated(path.clone()));
        assert_eq!(generated.expose().len(), 64);
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The next start reads the same token.
        let (again, _) = resolve_token(&admin, dir.path()).expect("again");
        assert_eq!(again.expose(), generated.expose());

        let file = dir.path().join("given.token");
        std::fs::write(&file, "  0123456789abcdef-given\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        admin.token_file = Some(file.clone());
        assert!(matches!(
            resolve_token(&admin, dir.path()),
            Err(TokenError::Exposed { .. })
        ));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (given, source) = resolve_token(&admin, dir.path()).expect("file");
        assert_eq!(given.expose(), "0123456789abcdef-given");
        assert_eq!(source, TokenSource::File(file.clone()));
        std::fs::write(&file, "short").expect("write");
        assert!(matches!(
            resolve_token(&admin, dir.path()),
            Err(TokenError::TooShort { .. })
        ));

        admin.token = Some(Secret::new("from-the-environment-0123"));
        let (env, source) = resolve_token(&admin, dir.path()).expect("env");
        assert_eq!(env.expose(), "from-the-environment-0123");
        assert_eq!(source, TokenSource::Environment);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("ab", "abc"));
        assert!(!token_matches("", "abc"));
    }
}
