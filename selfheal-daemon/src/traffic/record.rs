//! The recorder: turns decoded exchanges and queries into Prometheus samples, store samples
//! and table rows, one parsing section's output at a time.

use std::{collections::HashMap, sync::Arc};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use rustc_hash::FxHashMap;

use super::{
    cut, query_id, sqlstate_label, InFlight, QueryStats, RecentQuery, Tables, Trace, TrafficView,
    MAX_SQLSTATES,
};
use crate::{
    config::TrafficConfig,
    probes::capture::{Decoded, Endpoints, Origin},
    protocols::{
        http::{HttpExchange, HttpRequest, Method},
        postgres::{PgEvent, PgQuery},
        route::route_template,
    },
    store::{RegisterError, SeriesId, SeriesKind, Store, StoreHandle},
    telemetry::{
        AuthFailureLabel, HttpDurationLabel, HttpRequestLabel, Metrics, QueryLabel, ReasonLabel,
        SqlstateLabel,
    },
};

/// Store series the recorder writes (names without the Prometheus prefix and unit suffix).
pub const HTTP_REQUESTS: &str = "http_requests";
pub const HTTP_DURATION: &str = "http_request_duration_ms";
pub const QUERY_DURATION: &str = "postgres_query_duration_ms";
pub const QUERY_ERRORS: &str = "postgres_query_errors";

/// Longest route label; longer templates are cut.
const MAX_ROUTE_LABEL: usize = 200;
/// Longest fingerprint label on `/metrics`.
const MAX_FINGERPRINT_LABEL: usize = 160;
/// The label of a fingerprint that could not be read (a statement prepared before the
/// daemon saw the connection, or sent in bytes that were not captured).
const UNKNOWN_STATEMENT: &str = "(unknown statement)";

const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

fn status_class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 5,
    }
}

/// A store series: not tried yet, registered, or refused (counted by the store).
#[derive(Debug, Clone, Copy, Default)]
enum Slot {
    #[default]
    Untried,
    Registered(SeriesId),
    Refused,
}

/// What one (platform, method, route) has looked up once.
struct RouteEntry {
    platform: Arc<str>,
    method: &'static str,
    route: Arc<str>,
    requests: HashMap<u16, Counter>,
    durations: [Option<Histogram>; 6],
    store_requests: [Slot; 6],
    store_duration: Slot,
}

/// What one fingerprint has looked up once.
struct QueryEntry {
    label: QueryLabel,
    duration: Histogram,
    rows: Counter,
}

/// A sample for the store, applied under one write lock per parsing section.
#[derive(Debug, Clone, Copy)]
enum Write {
    Add(SeriesId, i64),
    Observe(SeriesId, i64, f64),
}

/// Records what the capture task decodes. Owned by that task.
pub struct Recorder {
    view: TrafficView,
    metrics: Metrics,
    max_routes: usize,
    max_queries: usize,
    /// Both bounded (`traffic.max_routes`, `traffic.max_queries`), with a fast hasher.
    routes: FxHashMap<(usize, Method, Box<str>), RouteEntry>,
    queries: FxHashMap<Arc<str>, QueryEntry>,
    /// Store series of all queries together.
    store_query_duration: Slot,
    store_query_errors: Slot,
    writes: Vec<Write>,
}

impl Recorder {
    pub fn new(view: TrafficView, config: &TrafficConfig, metrics: Metrics) -> Self {
        Self {
            view,
            metrics,
            max_routes: config.max_routes,
            max_queries: config.max_queries,
            routes: FxHashMap::default(),
            queries: FxHashMap::default(),
            store_query_duration: Slot::Untried,
            store_query_errors: Slot::Untried,
            writes: Vec::new(),
        }
    }

    /// Records what one parsing section decoded: Prometheus samples, table rows (one lock) and store samples (one
    /// lock).
    pub fn record(&mut self, decoded: &Decoded) {
        if decoded.http.is_empty() && decoded.postgres.is_empty() {
            return;
        }
        let view = self.view.clone();
        let mut tables = view.lock();
        tables.realtime_offset_ns = realtime_offset_ns();
        for (origin, exchange) in &decoded.http {
            self.http(*origin, exchange, &mut tables);
        }
        for (origin, event) in &decoded.postgres {
            self.postgres(*origin, event, &mut tables);
        }
        drop(tables);
        self.flush_writes();
    }

    /// Requests and queries waiting for an answer, as the capture task last saw them. A
    /// request that started before the capture last shed connections is left out: its
    /// connection may have been shed, and its answer with it (a target answering nothing
    /// would otherwise look hung to the monitor).
    pub fn set_in_flight(&mut self, requests: Vec<(Origin, HttpRequest)>, queries: usize) {
        let shed_until = self.metrics.capture_shed_until_ns();
        let in_flight: Vec<InFlight> = requests
            .into_iter()
            .filter(|(_, request)| request.start_ns >= shed_until)
            .map(|(origin, request)| {
                let platform = self
                    .view
                    .platforms()
                    .classify(request.host.as_deref(), &request.path)
                    .clone();
                InFlight {
                    tgid: origin.tgid,
                    peer: origin.endpoints.map(Endpoints::remote),
                    platform,
                    method: request.method.as_str(),
                    route: Arc::from(cut(&route_template(&request.path), MAX_ROUTE_LABEL)),
                    start_ns: request.start_ns,
                }
            })
            .collect();
        let mut tables = self.view.lock();
        tables.in_flight = in_flight;
        tables.queries_in_flight = queries;
        tables.realtime_offset_ns = realtime_offset_ns();
        tables.now_ns = tables.now_ns.max(monotonic_ns());
    }

    fn http(&mut self, origin: Origin, exchange: &HttpExchange, tables: &mut Tables) {
        let request = &exchange.request;
        let platform_index = self.platform_index(request);
        let template = route_template(&request.path);
        let template = cut(&template, MAX_ROUTE_LABEL);
        let key = (platform_index, request.method, Box::<str>::from(template));
        let key = if self.routes.contains_key(&key) || self.routes.len() < self.max_routes {
            key
        } else {
            (
                platform_index,
                request.method,
                Box::<str>::from(super::OTHER),
            )
        };
        let view = &self.view;
        let entry = self.routes.entry(key).or_insert_with_key(|key| {
            let platform = match key.0 {
                usize::MAX => Arc::from(super::OTHER),
                index => view.platforms().names()[index].clone(),
            };
            RouteEntry {
                platform,
                method: key.1.as_str(),
                route: Arc::from(&*key.2),
                requests: HashMap::new(),
                durations: Default::default(),
                store_requests: [Slot::Untried; 6],
                store_duration: Slot::Untried,
            }
        });

        let seconds = exchange.latency_ns() as f64 * 1e-9;
        let class = status_class(exchange.status);
        entry
            .requests
            .entry(exchange.status)
            .or_insert_with(|| {
                self.metrics
                    .http_requests
                    .get_or_create(&HttpRequestLabel {
                        platform: entry.platform.clone(),
                        method: entry.method,
                        route: entry.route.clone(),
                        status: exchange.status,
                    })
                    .clone()
            })
            .inc();
        entry.durations[class]
            .get_or_insert_with(|| {
                self.metrics
                    .http_request_duration_seconds
                    .get_or_create(&HttpDurationLabel {
                        platform: entry.platform.clone(),
                        method: entry.method,
                        route: entry.route.clone(),
                        status_class: STATUS_CLASSES[class],
                    })
                    .clone()
            })
            .observe(seconds);

        tables.last_response_ns = tables.last_response_ns.max(exchange.response_start_ns);
        let at_ms = tables.unix_ms(exchange.response_start_ns);
        let store = view.store();
        let labels = [
            ("platform", &*entry.platform),
            ("method", entry.method),
            ("route", &*entry.route),
        ];
        if let Some(id) = slot(&mut entry.store_requests[class], || {
            let mut with_class = labels.to_vec();
            with_class.push(("status_class", STATUS_CLASSES[class]));
            register(
                store,
                &self.metrics,
                HTTP_REQUESTS,
                &with_class,
                SeriesKind::Counter,
            )
        }) {
            self.writes.push(Write::Add(id, at_ms));
        }
        if let Some(id) = slot(&mut entry.store_duration, || {
            register(
                store,
                &self.metrics,
                HTTP_DURATION,
                &labels,
                SeriesKind::Distribution,
            )
        }) {
            self.writes.push(Write::Observe(id, at_ms, seconds * 1e3));
        }

        tables.now_ns = tables.now_ns.max(exchange.response_start_ns);
        tables.add_trace(Trace {
            tgid: origin.tgid,
            peer: origin.endpoints.map(Endpoints::remote),
            platform: entry.platform.clone(),
            method: entry.method,
            route: entry.route.clone(),
            status: exchange.status,
            start_ns: request.start_ns,
            end_ns: exchange.response_start_ns,
        });
    }

    /// The index of the request's platform in the config, `usize::MAX` for [`super::OTHER`].
    fn platform_index(&self, request: &HttpRequest) -> usize {
        let platforms = self.view.platforms();
        let name = platforms.classify(request.host.as_deref(), &request.path);
        platforms
            .names()
            .iter()
            .position(|n| Arc::ptr_eq(n, name))
            .unwrap_or(usize::MAX)
    }

    fn postgres(&mut self, origin: Origin, event: &PgEvent, tables: &mut Tables) {
        match event {
            PgEvent::Query(query) => self.query(origin, query, tables),
            PgEvent::Authenticated { .. } => {
                self.metrics.postgres_logins.inc();
                tables.logins += 1;
            }
            PgEvent::AuthFailed { error, .. } => {
                let sqlstate: Arc<str> = Arc::from(sqlstate_label(&error.sqlstate));
                self.metrics
                    .postgres_auth_failures
                    .get_or_create(&AuthFailureLabel {
                        sqlstate: sqlstate.clone(),
                    })
                    .inc();
                *tables.auth_failures.entry(sqlstate).or_default() += 1;
            }
            PgEvent::Encrypted { .. } | PgEvent::Cancel { .. } => {}
        }
    }

    fn query(&mut self, origin: Origin, query: &PgQuery, tables: &mut Tables) {
        let fingerprint = query
            .statement
            .as_ref()
            .map_or(UNKNOWN_STATEMENT, |s| &*s.fingerprint);
        let fingerprint: Arc<str> = match tables.queries.get_key_value(fingerprint) {
            Some((known, _)) => known.clone(),
            None if tables.queries.len() < self.max_queries => Arc::from(fingerprint),
            None => Arc::from(super::OTHER),
        };
        let entry = self.queries.entry(fingerprint.clone()).or_insert_with(|| {
            let label = if &*fingerprint == super::OTHER {
                QueryLabel {
                    query_id: fingerprint.clone(),
                    fingerprint: fingerprint.clone(),
                }
            } else {
                QueryLabel {
                    query_id: Arc::from(query_id(&fingerprint)),
                    fingerprint: Arc::from(cut(&fingerprint, MAX_FINGERPRINT_LABEL)),
                }
            };
            QueryEntry {
                duration: self
                    .metrics
                    .postgres_query_duration_seconds
                    .get_or_create(&label)
                    .clone(),
                rows: self
                    .metrics
                    .postgres_query_rows
                    .get_or_create(&label)
                    .clone(),
                label,
            }
        });
        let duration_ns = query.duration_ns();
        entry.duration.observe(duration_ns as f64 * 1e-9);
        entry.rows.inc_by(query.rows);
        let sqlstate = query.error.as_ref().map(|e| -> Arc<str> {
            let code = sqlstate_label(&e.sqlstate);
            self.metrics
                .postgres_query_errors
                .get_or_create(&SqlstateLabel {
                    sqlstate_class: Arc::from(cut(code, 2)),
                    sqlstate: Arc::from(code),
                })
                .inc();
            Arc::from(code)
        });

        let stats = tables
            .queries
            .entry(fingerprint.clone())
            .or_insert_with(|| QueryStats {
                query_id: entry.label.query_id.clone(),
                fingerprint: fingerprint.clone(),
                count: 0,
                errors: 0,
                rows: 0,
                total_ns: 0,
                last_seen_ns: 0,
                durations_ms: crate::store::WindowSketch::default(),
                sqlstates: std::collections::BTreeMap::new(),
            });
        stats.count += 1;
        stats.rows += query.rows;
        stats.total_ns += duration_ns;
        stats.last_seen_ns = stats.last_seen_ns.max(query.end_ns);
        stats.durations_ms.insert(duration_ns as f64 * 1e-6);
        if let Some(code) = &sqlstate {
            stats.errors += 1;
            let known = stats.sqlstates.contains_key(code);
            let code = if known || stats.sqlstates.len() < MAX_SQLSTATES {
                code.clone()
            } else {
                Arc::from(super::OTHER)
            };
            *stats.sqlstates.entry(code).or_default() += 1;
        }
        let query_id = stats.query_id.clone();
        tables.now_ns = tables.now_ns.max(query.end_ns);
        tables.add_recent_query(RecentQuery {
            tgid: origin.tgid,
            server: origin.endpoints.map(Endpoints::remote),
            start_ns: query.start_ns,
            end_ns: query.end_ns,
            query_id,
            fingerprint,
            sqlstate: sqlstate.clone(),
        });

        let at_ms = tables.unix_ms(query.end_ns);
        let store = self.view.store();
        if let Some(id) = slot(&mut self.store_query_duration, || {
            register(
                store,
                &self.metrics,
                QUERY_DURATION,
                &[],
                SeriesKind::Distribution,
            )
        }) {
            self.writes
                .push(Write::Observe(id, at_ms, duration_ns as f64 * 1e-6));
        }
        if sqlstate.is_some() {
            if let Some(id) = slot(&mut self.store_query_errors, || {
                register(store, &self.metrics, QUERY_ERRORS, &[], SeriesKind::Counter)
            }) {
                self.writes.push(Write::Add(id, at_ms));
            }
        }
    }

    fn flush_writes(&mut self) {
        if self.writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.writes);
        self.view.store().write(|store: &mut Store| {
            for write in &writes {
                // A refused sample is counted in the store's statistics.
                let _ = match *write {
                    Write::Add(id, at_ms) => store.add(id, at_ms, 1.0),
                    Write::Observe(id, at_ms, value) => store.observe(id, at_ms, value),
                };
            }
        });
        self.writes = writes;
        self.writes.clear();
    }
}

/// The series of a slot, registering it on first use.
fn slot(slot: &mut Slot, register: impl FnOnce() -> Option<SeriesId>) -> Option<SeriesId> {
    match *slot {
        Slot::Registered(id) => Some(id),
        Slot::Refused => None,
        Slot::Untried => {
            let id = register();
            *slot = id.map_or(Slot::Refused, Slot::Registered);
            id
        }
    }
}

fn register(
    store: &StoreHandle,
    metrics: &Metrics,
    name: &str,
    labels: &[(&str, &str)],
    kind: SeriesKind,
) -> Option<SeriesId> {
    match store.get_or_register(name, labels, kind) {
        Ok(id) => Some(id),
        Err(error) => {
            tracing::debug!(%error, name, "the metrics store refused a series");
            // The store counts refusals for the cap and the budget itself (exported with
            // its other statistics); a key it cannot take is counted here.
            if matches!(
                error,
                RegisterError::InvalidKey(_) | RegisterError::KindConflict { .. }
            ) {
                metrics
                    .store_series_refused
                    .get_or_create(&ReasonLabel { reason: "invalid" })
                    .inc();
            }
            None
        }
    }
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC`, to turn kernel timestamps into wall-clock time.
fn realtime_offset_ns() -> i64 {
    let ns = |clock| {
        nix::time::clock_gettime(clock).map_or(0, |t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
    };
    let realtime = ns(nix::time::ClockId::CLOCK_REALTIME);
    realtime - ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC` nanoseconds (the kernel's `bpf_ktime_get_ns`).
pub(super) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}
