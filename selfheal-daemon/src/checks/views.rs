//! What `GET /api/v1/system/integrations` and `POST /api/v1/system/checks/run` return.

use serde::{Deserialize, Serialize};

use super::{Integration, Latest, Origin, PostgresFigures, Spec};
use crate::bus::{CheckStatus, Degraded};

/// One check with its figures.
#[derive(Debug, Serialize)]
pub struct IntegrationView {
    pub name: String,
    pub kind: &'static str,
    pub origin: Origin,
    /// The URL without credentials or query, or `host:port`.
    pub endpoint: String,
    pub platform: Option<String>,
    pub enabled: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub slow_ms: u64,
    pub status: CheckStatus,
    pub degraded: Option<Degraded>,
    /// Enabled, yet not run in twice its interval.
    pub stale: bool,
    pub last_check_unix_ms: Option<i64>,
    pub response_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub alert_after_failures: u32,
    /// Why it is down, degraded or unknown now.
    pub message: Option<String>,
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<i64>,
    pub runs_24h: u64,
    pub success_rate_24h_percent: Option<f64>,
    pub uptime_30d_percent: Option<f64>,
    pub avg_response_ms_24h: Option<f64>,
    pub min_response_ms_24h: Option<f64>,
    pub max_response_ms_24h: Option<f64>,
    /// PostgreSQL checks: sessions by state, the oldest idle transaction, the longest query,
    /// sessions waiting on locks.
    pub postgres: Option<PostgresFigures>,
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<Integration> for IntegrationView {
    fn from(i: Integration) -> Self {
        let Integration {
            spec,
            latest,
            stale,
            figures,
        } = i;
        let (last_error_unix_ms, last_error) = figures.last_error.unzip();
        Self {
            kind: spec.kind_str(),
            endpoint: spec.endpoint(),
            origin: spec.origin,
            platform: spec.platform,
            enabled: spec.enabled,
            interval_ms: millis(spec.interval),
            timeout_ms: millis(spec.timeout),
            slow_ms: millis(spec.slow),
            name: spec.name,
            status: latest.status,
            degraded: latest.degraded,
            stale,
            last_check_unix_ms: latest.last_run_ms,
            response_ms: latest.response_ms,
            consecutive_failures: latest.consecutive_failures,
            alert_after_failures: spec.alert_after_failures,
            message: latest.message,
            last_error,
            last_error_unix_ms,
            runs_24h: figures.runs_24h,
            success_rate_24h_percent: figures.success_rate_24h,
            uptime_30d_percent: figures.uptime_30d,
            avg_response_ms_24h: figures.avg_response_ms_24h,
            min_response_ms_24h: figures.min_response_ms_24h,
            max_response_ms_24h: figures.max_response_ms_24h,
            postgres: latest.postgres,
        }
    }
}

/// The integrations and how many are in each status.
#[derive(Debug, Serialize)]
pub struct IntegrationsView {
    pub total: usize,
    pub healthy: usize,
    pub degraded: usize,
    pub down: usize,
    pub unknown: usize,
    pub stale: usize,
    pub checks: Vec<IntegrationView>,
}

impl IntegrationsView {
    pub fn new(checks: Vec<IntegrationView>) -> Self {
        let count = |status| checks.iter().filter(|c| c.status == status).count();
        Self {
            total: checks.len(),
            healthy: count(CheckStatus::Healthy),
            degraded: count(CheckStatus::Degraded),
            down: count(CheckStatus::Down),
            unknown: count(CheckStatus::Unknown),
            stale: checks.iter().filter(|c| c.stale).count(),
            checks,
        }
    }
}

/// `POST checks/run` body (optional): `{"name": "crm"}` runs one check, else all.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    pub name: Option<String>,
}

/// One check's state after an on-demand run.
#[derive(Debug, Serialize)]
pub struct RunView {
    pub name: String,
    /// False for a disabled or misconfigured check, reported as it is.
    pub ran: bool,
    pub status: CheckStatus,
    pub degraded: Option<Degraded>,
    pub response_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub message: Option<String>,
    pub checked_at_unix_ms: Option<i64>,
}

impl RunView {
    pub fn new(spec: &Spec, latest: Latest) -> Self {
        Self {
            name: spec.name.clone(),
            ran: spec.enabled && spec.misconfigured.is_none(),
            status: latest.status,
            degraded: latest.degraded,
            response_ms: latest.response_ms,
            consecutive_failures: latest.consecutive_failures,
            message: latest.message,
            checked_at_unix_ms: latest.last_run_ms,
        }
    }
}
