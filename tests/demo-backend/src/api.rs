//! HTTP routes: the platform API, `/health`, and the `/__fault` switches.

use std::hash::{BuildHasher as _, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::{Object, Pool, PoolError, Timeouts};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::Row;

use crate::db::error_chain;
use crate::faults::{parse_fault, ApplyError, FaultRequest, Faults, ParseError, BAD_QUERY};
use crate::platform::Platform;

/// `/health` gives up on the database after this long and answers 503.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

tokio::task_local! {
    /// The path of the request being handled, for the faults that apply to some paths only
    /// (set by [`fault_gate`], read by [`data_client`]).
    static REQUEST_PATH: String;
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: Pool,
    pub(crate) faults: Arc<Faults>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/me", get(me))
        .route("/api/v1/campaigns", get(list_campaigns))
        .route("/api/v1/campaigns/{id}", get(get_campaign))
        .route("/api/v1/leads", get(list_leads).post(create_lead))
        .route("/api/v1/leads/{id}", get(get_lead))
        .route("/api/v1/websites", get(list_websites))
        .route("/api/v1/videos", get(list_videos))
        .route("/api/v1/conversations", get(list_conversations))
        .route("/api/v1/tackle/deals", get(list_deals))
        .route("/__fault", get(fault_status))
        .route("/__fault/{name}", post(fault_switch))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), fault_gate))
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn(run_to_completion))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
enum ApiError {
    NotFound { resource: &'static str, id: String },
    BadRequest(String),
    Unauthorized(&'static str),
    Database(tokio_postgres::Error),
    Pool(PoolError),
    Injected,
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::Database(e)
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        ApiError::Pool(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::NotFound { resource, id } => (
                StatusCode::NOT_FOUND,
                json!({ "error": "not found", "resource": resource, "id": id }),
            ),
            ApiError::BadRequest(msg) => (StatusCode::BAD_REQUEST, json!({ "error": msg })),
            ApiError::Unauthorized(msg) => (StatusCode::UNAUTHORIZED, json!({ "error": msg })),
            ApiError::Database(e) => {
                let detail = error_chain(&e);
                tracing::warn!(error = %detail, "database error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "error": "database error", "detail": detail }),
                )
            }
            ApiError::Pool(e) => {
                let detail = error_chain(&e);
                tracing::warn!(error = %detail, "no database connection");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "database unavailable", "detail": detail }),
                )
            }
            ApiError::Injected => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": "internal error", "detail": "injected by fault `errors`" }),
            ),
        };
        (status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

// ---------------------------------------------------------------------------------------------
// Middleware

async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis(), "request");
    response
}

/// Runs each request in its own task, so a client that hangs up does not cancel it midway.
///
/// Without this, a handler dropped while its query waits (on a `lock`, say) would hand its
/// pooled connection back with that query still queued on it, and the next request to get
/// that connection would wait behind a query nobody wants. Like most servers, finish instead.
async fn run_to_completion(request: Request, next: Next) -> Response {
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "request handler panicked");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": "internal error", "detail": "handler panicked" })),
            )
                .into_response()
        }
    }
}

/// Applies `hang` (everything but `/__fault*`) and `errors` (only `/api/…`), and tells the
/// handler's [`data_client`] the request's path.
async fn fault_gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let is_fault_route = path == "/__fault" || path.starts_with("/__fault/");
    let is_data_route = path.starts_with("/api/");
    if !is_fault_route {
        state.faults.wait_while_hanging().await;
        if is_data_route && state.faults.take_injected_error() {
            return ApiError::Injected.into_response();
        }
    }
    REQUEST_PATH.scope(path, next.run(request)).await
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A pooled connection for a data request. Runs the `bad_query` query first when it is on
/// (its error is logged and otherwise ignored: the connection stays usable), then the
/// `slow_query` sleep when it applies to the request's path.
async fn data_client(state: &AppState) -> Result<Object, ApiError> {
    let client = state.pool.get().await?;
    if state.faults.take_bad_query() {
        // The simple-query protocol, so the failing statement is one Query message.
        if let Err(e) = client.batch_execute(BAD_QUERY).await {
            let sqlstate = e.code().map(tokio_postgres::error::SqlState::code);
            tracing::debug!(sqlstate, error = %error_chain(&e), "fault bad_query: query failed as intended");
        }
    }
    let path = REQUEST_PATH.try_with(Clone::clone).unwrap_or_default();
    if let Some(delay) = state.faults.slow_query(&path) {
        client
            .execute("SELECT pg_sleep($1)", &[&delay.as_secs_f64()])
            .await?;
    }
    Ok(client)
}

#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<String>,
    campaign_id: Option<String>,
}

fn parse_limit(params: &ListParams) -> Result<i64, ApiError> {
    match params.limit.as_deref() {
        None => Ok(DEFAULT_LIMIT),
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "limit must be an integer in 1..={MAX_LIMIT}"
            ))),
        },
    }
}

/// Ids are BIGSERIAL; anything that is not one cannot exist.
fn parse_id(resource: &'static str, raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().map_err(|_| ApiError::NotFound {
        resource,
        id: raw.to_owned(),
    })
}

fn list_response(platform: Platform, items: &[Value]) -> Response {
    Json(json!({ "platform": platform, "count": items.len(), "items": items })).into_response()
}

fn parse_json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// A throwaway bearer token; only needs to be unique, not secret.
fn new_token(platform: Platform, user_id: i64) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let a = RandomState::new().hash_one(nanos);
    let b = RandomState::new().hash_one((nanos, user_id));
    format!("demo.{}.{user_id}.{a:016x}{b:016x}", platform.domain())
}

// ---------------------------------------------------------------------------------------------
// Health

async fn health(State(state): State<AppState>) -> Response {
    let check = async {
        let client = state
            .pool
            .timeout_get(&Timeouts {
                wait: Some(HEALTH_TIMEOUT),
                ..state.pool.timeouts()
            })
            .await
            .map_err(|e| error_chain(&e))?;
        client
            .query_one("SELECT 1", &[])
            .await
            .map_err(|e| error_chain(&e))?;
        Ok::<(), String>(())
    };
    let result = match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}s", HEALTH_TIMEOUT.as_secs())),
    };
    match result {
        Ok(()) => Json(json!({ "status": "ok", "db": "ok" })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "degraded", "db": e })),
        )
            .into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// Auth

#[derive(Debug, Deserialize)]
struct LoginRequest {
    email: String,
    password: String,
}

fn user_json(row: &Row) -> Result<Value, tokio_postgres::Error> {
    Ok(json!({
        "id": row.try_get::<_, i64>("id")?,
        "email": row.try_get::<_, String>("email")?,
        "name": row.try_get::<_, String>("name")?,
        "role": row.try_get::<_, String>("role")?,
    }))
}

async fn login(State(state): State<AppState>, platform: Platform, body: Bytes) -> ApiResult {
    let request: LoginRequest = parse_json_body(&body)?;
    let client = data_client(&state).await?;
    let row = client
        .query_opt(
            "SELECT id, email, name, role FROM users \
             WHERE platform = $1 AND email = lower($2) AND password_md5 = md5($3)",
            &[&platform.domain(), &request.email.trim(), &request.password],
        )
        .await?;
    let Some(row) = row else {
        return Err(ApiError::Unauthorized("invalid email or password"));
    };
    let user_id: i64 = row.try_get("id")?;
    let token = new_token(platform, user_id);
    client
        .execute(
            "INSERT INTO auth_tokens (token, user_id, platform) VALUES ($1, $2, $3)",
            &[&token, &user_id, &platform.domain()],
        )
        .await?;
    Ok(Json(json!({
        "token": token,
        "token_type": "Bearer",
        "platform": platform,
        "user": user_json(&row)?,
    }))
    .into_response())
}

async fn me(State(state): State<AppState>, platform: Platform, headers: HeaderMap) -> ApiResult {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(ApiError::Unauthorized("missing bearer token"))?;
    let client = data_client(&state).await?;
    let row = client
        .query_opt(
            "SELECT u.id, u.email, u.name, u.role FROM auth_tokens t \
             JOIN users u ON u.id = t.user_id \
             WHERE t.token = $1 AND t.platform = $2",
            &[&token, &platform.domain()],
        )
        .await?
        .ok_or(ApiError::Unauthorized("invalid or expired token"))?;
    Ok(Json(json!({ "platform": platform, "user": user_json(&row)? })).into_response())
}

// ---------------------------------------------------------------------------------------------
// Campaigns

const CAMPAIGN_COLUMNS: &str =
    "id, name, status, channel, budget_cents, created_at::text AS created_at";

fn campaign_json(row: &Row) -> Result<Value, tokio_postgres::Error> {
    Ok(json!({
        "id": row.try_get::<_, i64>("id")?,
        "name": row.try_get::<_, String>("name")?,
        "status": row.try_get::<_, String>("status")?,
        "channel": row.try_get::<_, String>("channel")?,
        "budget_cents": row.try_get::<_, i64>("budget_cents")?,
        "created_at": row.try_get::<_, String>("created_at")?,
    }))
}

async fn list_campaigns(
    State(state): State<AppState>,
    platform: Platform,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let client = data_client(&state).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {CAMPAIGN_COLUMNS}, \
                 (SELECT count(*) FROM leads l WHERE l.campaign_id = c.id) AS lead_count \
                 FROM campaigns c WHERE platform = $1 ORDER BY id LIMIT $2"
            ),
            &[&platform.domain(), &limit],
        )
        .await?;
    let items = rows
        .iter()
        .map(|row| {
            let mut v = campaign_json(row)?;
            v["lead_count"] = json!(row.try_get::<_, i64>("lead_count")?);
            Ok(v)
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(list_response(platform, &items))
}

async fn get_campaign(
    State(state): State<AppState>,
    platform: Platform,
    Path(raw_id): Path<String>,
) -> ApiResult {
    let id = parse_id("campaign", &raw_id)?;
    let client = data_client(&state).await?;
    let row = client
        .query_opt(
            &format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1 AND platform = $2"),
            &[&id, &platform.domain()],
        )
        .await?
        .ok_or(ApiError::NotFound {
            resource: "campaign",
            id: raw_id,
        })?;
    let lead_count: i64 = client
        .query_one("SELECT count(*) FROM leads WHERE campaign_id = $1", &[&id])
        .await?
        .try_get(0)?;
    let mut body = campaign_json(&row)?;
    body["lead_count"] = json!(lead_count);
    body["platform"] = json!(platform);
    Ok(Json(body).into_response())
}

// ---------------------------------------------------------------------------------------------
// Leads

const LEAD_COLUMNS: &str = "l.id, l.campaign_id, l.email, l.name, l.company, l.status, l.score, \
                            l.created_at::text AS created_at";

/// A lead; `campaign` is `{id, name}` (or null) and comes from `campaign_name` when joined.
fn lead_json(row: &Row, campaign: Option<Value>) -> Result<Value, tokio_postgres::Error> {
    let mut lead = json!({
        "id": row.try_get::<_, i64>("id")?,
        "campaign_id": row.try_get::<_, Option<i64>>("campaign_id")?,
        "campaign": null,
        "email": row.try_get::<_, String>("email")?,
        "name": row.try_get::<_, String>("name")?,
        "company": row.try_get::<_, Option<String>>("company")?,
        "status": row.try_get::<_, String>("status")?,
        "score": row.try_get::<_, i32>("score")?,
        "created_at": row.try_get::<_, String>("created_at")?,
    });
    lead["campaign"] = campaign.unwrap_or(Value::Null);
    Ok(lead)
}

fn joined_campaign(row: &Row) -> Result<Option<Value>, tokio_postgres::Error> {
    let id: Option<i64> = row.try_get("campaign_id")?;
    let name: Option<String> = row.try_get("campaign_name")?;
    Ok(id
        .zip(name)
        .map(|(id, name)| json!({ "id": id, "name": name })))
}

async fn list_leads(
    State(state): State<AppState>,
    platform: Platform,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let campaign_id = match params.campaign_id.as_deref() {
        None => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| ApiError::BadRequest("campaign_id must be an integer".into()))?,
        ),
    };
    let client = data_client(&state).await?;
    let items = if state.faults.n_plus_one() {
        // The fault: one query for the leads, then one more per lead for its campaign.
        let rows = client
            .query(
                &format!(
                    "SELECT {LEAD_COLUMNS} FROM leads l \
                     WHERE l.platform = $1 AND ($3::bigint IS NULL OR l.campaign_id = $3) \
                     ORDER BY l.id LIMIT $2"
                ),
                &[&platform.domain(), &limit, &campaign_id],
            )
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let campaign = match row.try_get::<_, Option<i64>>("campaign_id")? {
                None => None,
                Some(cid) => client
                    .query_opt(
                        "SELECT id, name FROM campaigns WHERE id = $1 AND platform = $2",
                        &[&cid, &platform.domain()],
                    )
                    .await?
                    .map(|c| -> Result<Value, tokio_postgres::Error> {
                        Ok(json!({ "id": c.try_get::<_, i64>("id")?, "name": c.try_get::<_, String>("name")? }))
                    })
                    .transpose()?,
            };
            items.push(lead_json(row, campaign)?);
        }
        items
    } else {
        let rows = client
            .query(
                &format!(
                    "SELECT {LEAD_COLUMNS}, c.name AS campaign_name FROM leads l \
                     LEFT JOIN campaigns c ON c.id = l.campaign_id \
                     WHERE l.platform = $1 AND ($3::bigint IS NULL OR l.campaign_id = $3) \
                     ORDER BY l.id LIMIT $2"
                ),
                &[&platform.domain(), &limit, &campaign_id],
            )
            .await?;
        rows.iter()
            .map(|row| lead_json(row, joined_campaign(row)?))
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(list_response(platform, &items))
}

async fn get_lead(
    State(state): State<AppState>,
    platform: Platform,
    Path(raw_id): Path<String>,
) -> ApiResult {
    let id = parse_id("lead", &raw_id)?;
    let client = data_client(&state).await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {LEAD_COLUMNS}, c.name AS campaign_name FROM leads l \
                 LEFT JOIN campaigns c ON c.id = l.campaign_id \
                 WHERE l.id = $1 AND l.platform = $2"
            ),
            &[&id, &platform.domain()],
        )
        .await?
        .ok_or(ApiError::NotFound {
            resource: "lead",
            id: raw_id,
        })?;
    let mut body = lead_json(&row, joined_campaign(&row)?)?;
    body["platform"] = json!(platform);
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize)]
struct NewLead {
    email: String,
    name: Option<String>,
    company: Option<String>,
    campaign_id: Option<i64>,
    status: Option<String>,
    score: Option<i32>,
}

async fn create_lead(State(state): State<AppState>, platform: Platform, body: Bytes) -> ApiResult {
    let lead: NewLead = parse_json_body(&body)?;
    let email = lead.email.trim().to_lowercase();
    if email.is_empty() || !email.contains('@') {
        return Err(ApiError::BadRequest(
            "email must be an e-mail address".into(),
        ));
    }
    let name = lead.name.unwrap_or_else(|| email.clone());
    let status = lead.status.unwrap_or_else(|| "new".to_owned());
    let score = lead.score.unwrap_or(0);
    let client = data_client(&state).await?;
    if let Some(cid) = lead.campaign_id {
        let exists = client
            .query_opt(
                "SELECT 1 FROM campaigns WHERE id = $1 AND platform = $2",
                &[&cid, &platform.domain()],
            )
            .await?
            .is_some();
        if !exists {
            return Err(ApiError::BadRequest(format!(
                "campaign {cid} does not exist on {}",
                platform.domain()
            )));
        }
    }
    let row = client
        .query_one(
            &format!(
                "WITH l AS ( \
                   INSERT INTO leads (platform, campaign_id, email, name, company, status, score) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING * ) \
                 SELECT {LEAD_COLUMNS}, c.name AS campaign_name FROM l \
                 LEFT JOIN campaigns c ON c.id = l.campaign_id"
            ),
            &[
                &platform.domain(),
                &lead.campaign_id,
                &email,
                &name,
                &lead.company,
                &status,
                &score,
            ],
        )
        .await?;
    let mut body = lead_json(&row, joined_campaign(&row)?)?;
    body["platform"] = json!(platform);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Websites, videos, conversations, deals

async fn list_websites(
    State(state): State<AppState>,
    platform: Platform,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let client = data_client(&state).await?;
    let rows = client
        .query(
            "SELECT id, domain, title, published, monthly_visits, created_at::text AS created_at \
             FROM websites WHERE platform = $1 ORDER BY id LIMIT $2",
            &[&platform.domain(), &limit],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<_, i64>("id")?,
                "domain": r.try_get::<_, String>("domain")?,
                "title": r.try_get::<_, String>("title")?,
                "published": r.try_get::<_, bool>("published")?,
                "monthly_visits": r.try_get::<_, i64>("monthly_visits")?,
                "created_at": r.try_get::<_, String>("created_at")?,
            }))
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(list_response(platform, &items))
}

async fn list_videos(
    State(state): State<AppState>,
    platform: Platform,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let client = data_client(&state).await?;
    let rows = client
        .query(
            "SELECT id, title, url, duration_secs, views, created_at::text AS created_at \
             FROM videos WHERE platform = $1 ORDER BY id LIMIT $2",
            &[&platform.domain(), &limit],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<_, i64>("id")?,
                "title": r.try_get::<_, String>("title")?,
                "url": r.try_get::<_, String>("url")?,
                "duration_secs": r.try_get::<_, i32>("duration_secs")?,
                "views": r.try_get::<_, i64>("views")?,
                "created_at": r.try_get::<_, String>("created_at")?,
            }))
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(list_response(platform, &items))
}

async fn list_conversations(
    State(state): State<AppState>,
    platform: Platform,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let client = data_client(&state).await?;
    let rows = client
        .query(
            "SELECT id, contact_email, subject, channel, status, message_count, \
             last_message_at::text AS last_message_at \
             FROM conversations WHERE platform = $1 ORDER BY last_message_at DESC, id LIMIT $2",
            &[&platform.domain(), &limit],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<_, i64>("id")?,
                "contact_email": r.try_get::<_, String>("contact_email")?,
                "subject": r.try_get::<_, String>("subject")?,
                "channel": r.try_get::<_, String>("channel")?,
                "status": r.try_get::<_, String>("status")?,
                "message_count": r.try_get::<_, i32>("message_count")?,
                "last_message_at": r.try_get::<_, String>("last_message_at")?,
            }))
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(list_response(platform, &items))
}

async fn list_deals(
    State(state): State<AppState>,
    platform: Platform,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let client = data_client(&state).await?;
    let rows = client
        .query(
            "SELECT id, name, stage, amount_cents, owner_email, \
             expected_close::text AS expected_close, created_at::text AS created_at \
             FROM tackle_deals WHERE platform = $1 ORDER BY id LIMIT $2",
            &[&platform.domain(), &limit],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<_, i64>("id")?,
                "name": r.try_get::<_, String>("name")?,
                "stage": r.try_get::<_, String>("stage")?,
                "amount_cents": r.try_get::<_, i64>("amount_cents")?,
                "owner_email": r.try_get::<_, String>("owner_email")?,
                "expected_close": r.try_get::<_, Option<String>>("expected_close")?,
                "created_at": r.try_get::<_, String>("created_at")?,
            }))
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(list_response(platform, &items))
}

async fn not_found(request: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such route", "path": request.uri().path() })),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Faults

async fn fault_status(State(state): State<AppState>) -> Json<Value> {
    Json(state.faults.status())
}

async fn fault_switch(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let request = match parse_fault(&name, &params) {
        Ok(r) => r,
        Err(e) => {
            let status = match e {
                ParseError::UnknownFault(_) => StatusCode::NOT_FOUND,
                ParseError::BadParam(_) => StatusCode::BAD_REQUEST,
            };
            return (status, Json(json!({ "error": e.to_string() }))).into_response();
        }
    };
    let status = if matches!(request, FaultRequest::Crash(_)) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    match state.faults.apply(request).await {
        Ok(applied) => (
            status,
            Json(json!({ "applied": applied, "faults": state.faults.status() })),
        )
            .into_response(),
        Err(e) => {
            let status = match e {
                ApplyError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
                ApplyError::Os(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(json!({ "error": format!("{name}: {e}") }))).into_response()
        }
    }
}
