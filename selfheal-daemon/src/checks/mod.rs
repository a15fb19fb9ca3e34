//! Integration health checks: the configured `[[checks]]`, each platform's `health_url`, the
//! target's database (`database.url`) and Redis (`redis.url`), run on their intervals and on
//! demand.
//!
//! Owns: turning the config into checks ([`specs`]), running each one on its own loop (a slow
//! or hung check never delays another: each has its timeout and its own task), the status of
//! each (healthy / degraded / down / unknown, consecutive failures, last run), the health log
//! in the state DB (one row per run, [`log`]) and the figures computed from it, staleness (an
//! enabled check that has not run in twice its interval), and publishing every run on the bus
//! as [`Event::Check`]. Must not: raise alerts itself (the monitor agent turns runs into
//! alerts), put a URL in an error or a log line (URLs carry passwords and API keys), or block
//! on the database in a check's loop beyond recording its own run.

pub mod log;
pub mod probe;
pub mod views;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    alerts::Clock,
    app::error_chain,
    bus::{Bus, CheckReport, CheckStatus, Degraded, Event},
    config::{CheckConfig, CheckKind, Config, Secret},
    state::StateDb,
    telemetry::{CheckLabel, CheckRunLabel, Metrics},
    tls::CaFile,
};

pub use probe::PostgresFigures;

/// What a check talks to.
#[derive(Debug, Clone)]
pub enum Target {
    Http(HttpTarget),
    /// `host:port`.
    Tcp(String),
    Postgres(PostgresTarget),
    Redis(Secret),
}

/// What a PostgreSQL check connects to, and how it trusts the server's certificate.
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    /// Its `sslmode` decides whether TLS is used (see [`crate::tls`]).
    pub url: Secret,
    /// Trusted besides the web PKI roots; read at each run.
    pub ca_file: Option<CaFile>,
}

#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub url: Secret,
    pub expect_status: Option<u16>,
    pub body_contains: Option<String>,
    pub json_field: Option<String>,
    pub json_value: Option<String>,
    pub headers: Vec<(String, Secret)>,
}

/// Where a check came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `[[checks]]`.
    Configured,
    /// A platform's `health_url`.
    PlatformHealth,
    /// `database.url` (`DATABASE_URL`).
    Database,
    /// `redis.url` (`REDIS_URL`).
    Redis,
}

/// One check, resolved from the config.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub kind: CheckKind,
    pub origin: Origin,
    pub target: Target,
    pub interval: Duration,
    pub timeout: Duration,
    /// Answers slower than this are `degraded`.
    pub slow: Duration,
    pub platform: Option<String>,
    pub enabled: bool,
    pub alert_after_failures: u32,
    pub max_connections_percent: f64,
    /// Why the check cannot run (an `env:` header whose variable is unset): it stays
    /// `unknown` with this as its message.
    pub misconfigured: Option<String>,
}

impl Spec {
    pub fn kind_str(&self) -> &'static str {
        match self.kind {
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::Postgres => "postgres",
            CheckKind::Redis => "redis",
        }
    }

    /// What it checks, for people: the URL without credentials, query or fragment.
    pub fn endpoint(&self) -> String {
        match &self.target {
            Target::Tcp(address) => address.clone(),
            Target::Http(HttpTarget { url, .. })
            | Target::Postgres(PostgresTarget { url, .. })
            | Target::Redis(url) => redact_url(url.expose()),
        }
    }

    /// `index` is the check's place in `[[checks]]`, for the key path in errors.
    fn from_check(index: usize, check: &CheckConfig) -> Self {
        let timeout = Duration::from_millis(check.timeout_ms);
        let url = || check.url.clone().unwrap_or_else(|| Secret::new(""));
        let mut misconfigured = None;
        let target = match check.kind {
            CheckKind::Http => {
                let mut headers = Vec::new();
                for (name, value) in &check.resolved_headers {
                    if let Some(value) = value {
                        headers.push((name.clone(), value.clone()));
                    } else {
                        let variable = check
                            .headers
                            .get(name)
                            .and_then(|v| v.strip_prefix("env:"))
                            .unwrap_or_default()
                            .trim();
                        misconfigured = Some(format!(
                            "missing credentials: header {name} reads the environment \
                             variable {variable}, which is not set"
                        ));
                    }
                }
                Target::Http(HttpTarget {
                    url: url(),
                    expect_status: check.expect_status,
                    body_contains: check.body_contains.clone(),
                    json_field: check.json_field.clone(),
                    json_value: check.json_value.clone(),
                    headers,
                })
            }
            CheckKind::Tcp => Target::Tcp(check.address.clone().unwrap_or_default()),
            CheckKind::Postgres => Target::Postgres(PostgresTarget {
                url: url(),
                ca_file: check.ca_file.clone().map(|path| CaFile {
                    key: format!("checks[{index}].ca_file"),
                    path,
                }),
            }),
            CheckKind::Redis => Target::Redis(url()),
        };
        Self {
            name: check.name.clone(),
            kind: check.kind,
            origin: Origin::Configured,
            target,
            interval: Duration::from_millis(check.interval_ms),
            timeout,
            slow: check.slow_ms.map_or(timeout / 2, Duration::from_millis),
            platform: check.platform.clone(),
            enabled: check.enabled,
            alert_after_failures: check.alert_after_failures,
            max_connections_percent: check.max_connections_percent,
            misconfigured,
        }
    }

    /// A check the daemon adds by itself (a platform's health URL, the database, Redis).
    fn implicit(name: String, kind: CheckKind, origin: Origin, target: Target) -> Self {
        let timeout = Duration::from_secs(5);
        Self {
            name,
            kind,
            origin,
            target,
            interval: Duration::from_secs(30),
            timeout,
            slow: timeout / 2,
            platform: None,
            enabled: true,
            alert_after_failures: 3,
            max_connections_percent: 80.0,
            misconfigured: None,
        }
    }
}

/// `scheme://host:port/path`, without user, password, query or fragment.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Every check of the config: `[[checks]]` in order, then one per platform `health_url`
/// (named `<platform> health`), then `database` (with `database.ca_file`) and `redis` from
/// their URLs. An implicit check is left out when a configured check of its kind already has
/// its URL, or its name is taken.
pub fn specs(config: &Config) -> Vec<Spec> {
    let mut specs: Vec<Spec> = config
        .checks
        .iter()
        .enumerate()
        .map(|(index, check)| Spec::from_check(index, check))
        .collect();
    let configured_url = |specs: &[Spec], kind: CheckKind, url: &str| {
        specs.iter().any(|s| {
            s.origin == Origin::Configured
                && s.kind == kind
                && match &s.target {
                    Target::Http(h) => h.url.expose() == url,
                    Target::Postgres(PostgresTarget { url: u, .. }) | Target::Redis(u) => {
                        u.expose() == url
                    }
                    Target::Tcp(_) => false,
                }
        })
    };
    let add = |specs: &mut Vec<Spec>, spec: Spec, url: &str| {
        if !configured_url(specs, spec.kind, url) && !specs.iter().any(|s| s.name == spec.name) {
            specs.push(spec);
        }
    };
    for platform in &config.platforms {
        if let Some(url) = &platform.health_url {
            let mut spec = Spec::implicit(
                format!("{} health", platform.name),
                CheckKind::Http,
                Origin::PlatformHealth,
                Target::Http(HttpTarget {
                    url: Secret::new(url.clone()),
                    expect_status: None,
                    body_contains: None,
                    json_field: None,
                    json_value: None,
                    headers: Vec::new(),
                }),
            );
            spec.interval = Duration::from_millis(platform.health_interval_ms);
            spec.timeout = Duration::from_millis(platform.health_timeout_ms);
            spec.slow = spec.timeout / 2;
            spec.platform = Some(platform.name.clone());
            add(&mut specs, spec, url);
        }
    }
    if let Some(url) = &config.database.url {
        let spec = Spec::implicit(
            "database".to_owned(),
            CheckKind::Postgres,
            Origin::Database,
            Target::Postgres(PostgresTarget {
                url: url.clone(),
                ca_file: config.database.ca_file.clone().map(|path| CaFile {
                    key: "database.ca_file".to_owned(),
                    path,
                }),
            }),
        );
        add(&mut specs, spec, url.expose());
    }
    if let Some(url) = &config.redis.url {
        let spec = Spec::implicit(
            "redis".to_owned(),
            CheckKind::Redis,
            Origin::Redis,
            Target::Redis(url.clone()),
        );
        add(&mut specs, spec, url.expose());
    }
    specs
}

/// A check's state after its latest run.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    pub status: CheckStatus,
    pub degraded: Option<Degraded>,
    pub last_run_ms: Option<i64>,
    pub response_ms: Option<f64>,
    /// Why it is down, degraded or unknown.
    pub message: Option<String>,
    pub consecutive_failures: u32,
    pub postgres: Option<PostgresFigures>,
}

impl Latest {
    fn never_run(spec: &Spec) -> Self {
        Self {
            status: CheckStatus::Unknown,
            degraded: None,
            last_run_ms: None,
            response_ms: None,
            message: Some(if let Some(why) = &spec.misconfigured {
                why.clone()
            } else if spec.enabled {
                "not run yet".to_owned()
            } else {
                "disabled".to_owned()
            }),
            consecutive_failures: 0,
            postgres: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no check named {name:?}")]
    NotFound { name: String },
    #[error("the checks are not running")]
    Stopped,
}

/// A request to run a check now; the reply is its state after the run.
type Trigger = oneshot::Sender<Latest>;

struct Slot {
    spec: Spec,
    latest: Mutex<Latest>,
    trigger: mpsc::Sender<Trigger>,
}

impl Slot {
    fn latest(&self) -> Latest {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The checks, shared by their runner and the API. Cheap to clone.
#[derive(Clone)]
pub struct Checks {
    inner: Arc<Inner>,
}

struct Inner {
    slots: Vec<Slot>,
    db: StateDb,
    clock: Clock,
    /// When the runner started: a check that never ran is stale after two intervals of it.
    started_ms: Mutex<Option<i64>>,
}

/// The loops of the checks, to be run once.
pub struct Runner {
    checks: Checks,
    triggers: Vec<mpsc::Receiver<Trigger>>,
    client: reqwest::Client,
}

/// A check as the integrations view shows it.
#[derive(Debug, Clone)]
pub struct Integration {
    pub spec: Spec,
    pub latest: Latest,
    pub stale: bool,
    pub figures: log::Figures,
}

impl Checks {
    /// The checks of `specs`, not running yet.
    pub fn new(specs: Vec<Spec>, db: StateDb, clock: Clock) -> (Self, Runner) {
        let mut slots = Vec::with_capacity(specs.len());
        let mut triggers = Vec::with_capacity(specs.len());
        for spec in specs {
            let (trigger, requests) = mpsc::channel(8);
            slots.push(Slot {
                latest: Mutex::new(Latest::never_run(&spec)),
                spec,
                trigger,
            });
            triggers.push(requests);
        }
        let checks = Self {
            inner: Arc::new(Inner {
                slots,
                db,
                clock,
                started_ms: Mutex::new(None),
            }),
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("selfheal/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        (
            checks.clone(),
            Runner {
                checks,
                triggers,
                client,
            },
        )
    }

    fn now(&self) -> i64 {
        (self.inner.clock)()
    }

    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// "Cleared" signals for the active check alerts (`check` label) of checks that are no
    /// longer configured, disabled, or cannot run: nothing would ever clear them otherwise.
    pub fn orphaned(&self, active: &[crate::alerts::Alert]) -> Vec<crate::alerts::Signal> {
        active
            .iter()
            .filter_map(|alert| {
                let check = alert.labels.get("check")?;
                let runs = self.inner.slots.iter().any(|slot| {
                    &slot.spec.name == check
                        && slot.spec.enabled
                        && slot.spec.misconfigured.is_none()
                });
                (!runs).then(|| crate::alerts::Signal {
                    rule: alert.rule.clone(),
                    labels: alert.labels.clone(),
                    severity: alert.severity,
                    message: format!(
                        "check {check} is no longer configured, is disabled or cannot run"
                    ),
                    firing: false,
                })
            })
            .collect()
    }

    /// True when `spec` is enabled and runnable but has not run in twice its interval.
    fn is_stale(&self, spec: &Spec, latest: &Latest, now_ms: i64) -> bool {
        if !spec.enabled || spec.misconfigured.is_some() {
            return false;
        }
        let Some(since) = latest.last_run_ms.or(*self
            .inner
            .started_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
        else {
            return false;
        };
        let twice = i64::try_from(spec.interval.as_millis().saturating_mul(2)).unwrap_or(i64::MAX);
        now_ms.saturating_sub(since) > twice
    }

    /// Enabled checks that have not run in twice their interval.
    pub fn stale_count(&self) -> usize {
        let now = self.now();
        self.inner
            .slots
            .iter()
            .filter(|slot| self.is_stale(&slot.spec, &slot.latest(), now))
            .count()
    }

    /// Every check with its state and its figures from the health log.
    pub async fn integrations(&self) -> Result<Vec<Integration>, crate::state::StateError> {
        let now = self.now();
        let names: Vec<String> = self
            .inner
            .slots
            .iter()
            .map(|s| s.spec.name.clone())
            .collect();
        let figures = self
            .inner
            .db
            .call("checks_figures", move |c| {
                names
                    .iter()
                    .map(|name| log::figures(c, name, now))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(self
            .inner
            .slots
            .iter()
            .zip(figures)
            .map(|(slot, figures)| {
                let latest = slot.latest();
                Integration {
                    stale: self.is_stale(&slot.spec, &latest, now),
                    spec: slot.spec.clone(),
                    latest,
                    figures,
                }
            })
            .collect())
    }

    /// The checks as configured.
    pub fn specs(&self) -> Vec<Spec> {
        self.inner.slots.iter().map(|s| s.spec.clone()).collect()
    }

    /// Runs the named check (every enabled check without a name) now, and waits for the
    /// results. Disabled and misconfigured checks are reported as they are, without a run.
    pub async fn run_now(&self, name: Option<&str>) -> Result<Vec<(Spec, Latest)>, CheckError> {
        let selected: Vec<&Slot> = match name {
            Some(name) => {
                let slot = self
                    .inner
                    .slots
                    .iter()
                    .find(|s| s.spec.name == name)
                    .ok_or_else(|| CheckError::NotFound {
                        name: name.to_owned(),
                    })?;
                vec![slot]
            }
            None => self.inner.slots.iter().collect(),
        };
        let mut waiting = Vec::with_capacity(selected.len());
        for slot in &selected {
            if slot.spec.enabled && slot.spec.misconfigured.is_none() {
                let (reply, answer) = oneshot::channel();
                slot.trigger
                    .send(reply)
                    .await
                    .map_err(|_| CheckError::Stopped)?;
                waiting.push(Some(answer));
            } else {
                waiting.push(None);
            }
        }
        let mut results = Vec::with_capacity(selected.len());
        for (slot, answer) in selected.iter().zip(waiting) {
            let latest = match answer {
                Some(answer) => answer.await.map_err(|_| CheckError::Stopped)?,
                None => slot.latest(),
            };
            results.push((slot.spec.clone(), latest));
        }
        Ok(results)
    }
}

impl Runner {
    /// Runs every enabled check on its interval, and on demand, until `cancel`.
    pub async fn run(self, bus: Bus, metrics: Metrics, cancel: CancellationToken) {
        let Self {
            checks,
            triggers,
            client,
        } = self;
        let inner = &checks.inner;
        *inner
            .started_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(checks.now());
        // Carry on from the health log: the last run and the failures in a row.
        let names: Vec<String> = inner.slots.iter().map(|s| s.spec.name.clone()).collect();
        let restored = inner
            .db
            .call("checks_load", move |c| {
                names
                    .iter()
                    .map(|name| log::last(c, name))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await;
        match restored {
            Ok(lasts) => {
                for (slot, last) in inner.slots.iter().zip(lasts) {
                    // A check that cannot run now shows why, not what it found before.
                    let runs = slot.spec.enabled && slot.spec.misconfigured.is_none();
                    if let (Some(last), true) = (last, runs) {
                        let mut latest = slot.latest.lock().unwrap_or_else(PoisonError::into_inner);
                        latest.status = last.status;
                        latest.last_run_ms = Some(last.at_ms);
                        latest.response_ms = last.response_ms;
                        latest.message = last.error;
                        latest.consecutive_failures = last.consecutive_failures;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot read the health log; checks start afresh");
            }
        }
        for slot in &inner.slots {
            if let Some(why) = &slot.spec.misconfigured {
                tracing::warn!(check = %slot.spec.name, reason = %why, "check cannot run");
                // Down as far as an alert on `selfheal_check_up == 0` is concerned.
                metrics
                    .check_up
                    .get_or_create(&CheckLabel {
                        check: slot.spec.name.clone(),
                    })
                    .set(0);
            }
        }
        let loops = inner
            .slots
            .iter()
            .enumerate()
            .zip(triggers)
            .filter(|((_, slot), _)| slot.spec.enabled && slot.spec.misconfigured.is_none())
            .map(|((index, _), requests)| {
                run_one(
                    &checks,
                    index,
                    requests,
                    &client,
                    &bus,
                    &metrics,
                    cancel.clone(),
                )
            });
        let stale = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                metrics
                    .checks_stale
                    .set(i64::try_from(checks.stale_count()).unwrap_or(i64::MAX));
            }
        };
        tokio::join!(futures_util::future::join_all(loops), stale);
    }
}

/// One check's loop: a run at start, then one per interval or per trigger.
async fn run_one(
    checks: &Checks,
    index: usize,
    mut requests: mpsc::Receiver<Trigger>,
    client: &reqwest::Client,
    bus: &Bus,
    metrics: &Metrics,
    cancel: CancellationToken,
) {
    let slot = &checks.inner.slots[index];
    let spec = &slot.spec;
    let label = CheckLabel {
        check: spec.name.clone(),
    };
    let mut next = tokio::time::Instant::now();
    loop {
        let reply = tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next) => None,
            request = requests.recv() => request,
        };
        // A run in progress does not hold up shutdown.
        let probed = tokio::select! {
            () = cancel.cancelled() => return,
            probed = probe::run(spec, client) => probed,
        };
        let now = checks.now();
        // The health log first: whoever sees the new state finds its row there too.
        let name = spec.name.clone();
        let error = (probed.status == CheckStatus::Down)
            .then(|| probed.message.clone())
            .flatten();
        let recorded = checks
            .inner
            .db
            .call("checks_record", move |c| {
                log::record(
                    c,
                    &name,
                    now,
                    probed.status,
                    probed.response_ms,
                    error.as_deref(),
                )
            })
            .await;
        if let Err(error) = recorded {
            tracing::warn!(check = %spec.name, error = %error_chain(&error), "cannot write the health log");
        }
        let latest = {
            let mut latest = slot.latest.lock().unwrap_or_else(PoisonError::into_inner);
            latest.consecutive_failures = if probed.status == CheckStatus::Down {
                latest.consecutive_failures.saturating_add(1)
            } else {
                0
            };
            latest.status = probed.status;
            latest.degraded = probed.degraded;
            latest.last_run_ms = Some(now);
            latest.response_ms = probed.response_ms;
            latest.message.clone_from(&probed.message);
            latest.postgres = probed.postgres;
            latest.clone()
        };
        metrics
            .check_runs
            .get_or_create(&CheckRunLabel {
                check: spec.name.clone(),
                status: probed.status.as_str(),
            })
            .inc();
        if let Some(ms) = probed.response_ms {
            metrics
                .check_duration_seconds
                .get_or_create(&label)
                .observe(ms / 1000.0);
        }
        metrics
            .check_up
            .get_or_create(&label)
            .set(i64::from(probed.status.is_up()));
        if probed.status == CheckStatus::Down {
            tracing::debug!(check = %spec.name, failures = latest.consecutive_failures, error = ?probed.message, "check failed");
        }
        bus.publish(Event::Check(CheckReport {
            check: spec.name.clone(),
            kind: spec.kind_str(),
            platform: spec.platform.clone(),
            status: probed.status,
            degraded: probed.degraded,
            consecutive_failures: latest.consecutive_failures,
            alert_after_failures: spec.alert_after_failures,
            response_ms: probed.response_ms,
            message: probed.message.clone(),
            postgres: probed.postgres,
        }));
        if let Some(reply) = reply {
            let _ = reply.send(latest);
        }
        next = tokio::time::Instant::now() + spec.interval;
    }
}

#[cfg(test)]
mod tests;
