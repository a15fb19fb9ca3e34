//! The API's views of the traffic: per platform and route over a window (from the store),
//! as one summary or as points in time steps, per fingerprint since the daemon started, and
//! requests in flight and the slowest recent ones with their queries.

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    record::{HTTP_DURATION, HTTP_REQUESTS, QUERY_DURATION},
    RecentQuery, Tables, Trace, TrafficView, SLOWEST_GENERATION_NS,
};
use crate::store::{
    self, Aggregate, MergedSketch, PointValue, QueryError, Range, Selector, SeriesId, SeriesKind,
    Store, StoreConfig,
};

/// The most points one series of the series view has: more than a dashboard's chart is
/// wide, few enough to draw at once.
pub const MAX_SERIES_POINTS: u64 = 1_000;
/// The most points one answer of the series view has, every series together (about 15 MB
/// of JSON): with hundreds of routes, filter by platform or take a coarser step.
pub const MAX_ANSWER_POINTS: u64 = 100_000;

/// A request the API cannot answer as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("window {0:?} is not a duration such as 30s, 5m, 1h or 7d (at most 365d)")]
    BadWindow(String),
    #[error("step {0:?} is not a duration such as 10s, 1m, 1h or 1d (at most 365d)")]
    BadStep(String),
    #[error("step {step_ms} ms is finer than the {min_step_ms} ms buckets the metrics store keeps over a {window_seconds} s window: use a step of at least {min_step_ms} ms")]
    StepTooFine {
        step_ms: u64,
        min_step_ms: u64,
        window_seconds: u64,
    },
    #[error("step {step_ms} ms is longer than the {window_seconds} s window")]
    StepLongerThanWindow { step_ms: u64, window_seconds: u64 },
    #[error("a {window_seconds} s window in steps of {step_ms} ms is {points} points, more than {MAX_SERIES_POINTS}: use a step of at least {min_step_ms} ms")]
    TooManyPoints {
        window_seconds: u64,
        step_ms: u64,
        points: u64,
        min_step_ms: u64,
    },
    #[error("{series} series of {points} points is more than {MAX_ANSWER_POINTS} points: choose one platform with ?platform= or a coarser step")]
    AnswerTooLarge { series: u64, points: u64 },
    #[error("no platform named {0:?} (see [[platforms]]; requests of none are under \"other\")")]
    UnknownPlatform(String),
    /// Not the caller's fault: the view asked the store for something it should not have.
    #[error("the metrics store cannot answer this range")]
    Store(#[source] QueryError),
}

impl ViewError {
    /// Whether the request was at fault (a 400) rather than the daemon (a 500).
    pub fn is_bad_request(&self) -> bool {
        !matches!(self, Self::Store(_))
    }
}

/// `?platform=…&window=…&step=…` of `GET /api/v1/system/metrics`: without `step`, one
/// summary per route over the window; with it, points in steps of `step`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    pub platform: Option<String>,
    pub window: Option<String>,
    pub step: Option<String>,
}

/// Parses `30s`, `5m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_window(text: &str) -> Result<u64, ViewError> {
    parse_seconds(text).ok_or_else(|| ViewError::BadWindow(text.to_owned()))
}

/// Parses a step as [`parse_window`] does a window.
fn parse_step(text: &str) -> Result<u64, ViewError> {
    parse_seconds(text).ok_or_else(|| ViewError::BadStep(text.to_owned()))
}

/// Seconds in `30s`, `5m`, `1h`, `7d` or a bare number, from 1 s to 365 days.
fn parse_seconds(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    let secs = number.checked_mul(unit_secs)?;
    (1..=365 * 86_400).contains(&secs).then_some(secs)
}

#[derive(Debug, Serialize)]
pub struct MetricsView {
    pub window_seconds: u64,
    pub from_unix_ms: i64,
    pub to_unix_ms: i64,
    pub platforms: Vec<PlatformMetrics>,
}

#[derive(Debug, Serialize)]
pub struct PlatformMetrics {
    pub platform: String,
    #[serde(flatten)]
    pub figures: Figures,
    pub routes: Vec<RouteMetrics>,
}

#[derive(Debug, Serialize)]
pub struct RouteMetrics {
    pub method: String,
    pub route: String,
    #[serde(flatten)]
    pub figures: Figures,
    /// Requests per status class (`2xx`, `4xx`, …).
    pub status_classes: BTreeMap<String, u64>,
}

/// Requests, rate, errors (5xx) and latency percentiles over the window.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub requests: u64,
    pub rate_per_second: f64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Figures {
    fn new(classes: &BTreeMap<String, u64>, sketch: &MergedSketch, window_secs: u64) -> Self {
        let requests: u64 = classes.values().sum();
        let errors = classes.get("5xx").copied().unwrap_or(0);
        Self {
            requests,
            rate_per_second: requests as f64 / window_secs as f64,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: sketch.quantile(0.5).map(round_ms),
            p95_ms: sketch.quantile(0.95).map(round_ms),
            p99_ms: sketch.quantile(0.99).map(round_ms),
        }
    }
}

/// (platform, method, route) → status class → requests, and the merged latency sketch.
#[derive(Default)]
struct RouteAcc {
    classes: BTreeMap<String, u64>,
    sketch: MergedSketch,
}

/// What the monitor's traffic rules read: each platform's figures over a window, and the
/// target's queries all together.
#[derive(Debug, Default)]
pub struct TrafficHealth {
    pub platforms: Vec<(String, Figures)>,
    pub queries: u64,
    pub query_p95_ms: Option<f64>,
    /// Requests in flight that arrived after the target's last response.
    pub unanswered: usize,
    /// How long the oldest of them has waited: the target has answered nothing since.
    pub unanswered_for_secs: Option<f64>,
}

impl TrafficView {
    /// The figures of the last `window_secs` for the monitor.
    pub fn health(&self, window_secs: u64) -> TrafficHealth {
        let query = MetricsQuery {
            platform: None,
            window: Some(format!("{window_secs}s")),
            step: None,
        };
        let platforms = match self.metrics_view(&query) {
            Ok(view) => view
                .platforms
                .into_iter()
                .map(|p| (p.platform, p.figures))
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the traffic figures for the monitor");
                Vec::new()
            }
        };
        let to_ms = store::unix_ms(SystemTime::now()) + 1;
        let from_ms = to_ms - i64::try_from(window_secs * 1000).unwrap_or(i64::MAX);
        let mut sketch = MergedSketch::default();
        self.store().read(|store: &Store| {
            for info in store.select(&Selector::name(QUERY_DURATION)) {
                if let Some(Aggregate::Distribution(distribution)) =
                    summarize(store, info.id, from_ms, to_ms)
                {
                    sketch.merge(&distribution.sketch);
                }
            }
        });
        let (unanswered, unanswered_for_secs) = {
            let tables = self.lock();
            let now_ns = tables.now_ns.max(super::record::monotonic_ns());
            let waiting: Vec<u64> = tables
                .in_flight
                .iter()
                .map(|request| request.start_ns)
                .filter(|&start| start > tables.last_response_ns)
                .collect();
            let oldest = waiting.iter().min().copied();
            (
                waiting.len(),
                oldest.map(|start| now_ns.saturating_sub(start) as f64 * 1e-9),
            )
        };
        TrafficHealth {
            platforms,
            queries: sketch.count(),
            query_p95_ms: sketch.quantile(0.95).map(round_ms),
            unanswered,
            unanswered_for_secs,
        }
    }

    /// `GET /api/v1/system/metrics`.
    pub fn metrics_view(&self, query: &MetricsQuery) -> Result<MetricsView, ViewError> {
        let window_secs = parse_window(query.window.as_deref().unwrap_or("5m"))?;
        if let Some(platform) = &query.platform {
            if !self.platforms().knows(platform) {
                return Err(ViewError::UnknownPlatform(platform.clone()));
            }
        }
        let to_ms = store::unix_ms(SystemTime::now()) + 1;
        let from_ms = to_ms - i64::try_from(window_secs * 1000).unwrap_or(i64::MAX);
        let selector = |name: &str| {
            let selector = Selector::name(name);
            match &query.platform {
                Some(platform) => selector.with("platform", platform.as_str()),
                None => selector,
            }
        };
        let mut routes: BTreeMap<(String, String, String), RouteAcc> = BTreeMap::new();
        self.store().read(|store: &Store| {
            for info in store.select(&selector(HTTP_REQUESTS)) {
                let key = route_key(&info.key);
                let class = info.key.label("status_class").unwrap_or("other").to_owned();
                if let Some(Aggregate::Counter(counter)) = summarize(store, info.id, from_ms, to_ms)
                {
                    let total = counter.total.round() as u64;
                    if total > 0 {
                        *routes
                            .entry(key)
                            .or_default()
                            .classes
                            .entry(class)
                            .or_default() += total;
                    }
                }
            }
            for info in store.select(&selector(HTTP_DURATION)) {
                if let Some(Aggregate::Distribution(distribution)) =
                    summarize(store, info.id, from_ms, to_ms)
                {
                    routes
                        .entry(route_key(&info.key))
                        .or_default()
                        .sketch
                        .merge(&distribution.sketch);
                }
            }
        });

        let mut platforms: BTreeMap<String, (RouteAcc, Vec<RouteMetrics>)> = BTreeMap::new();
        for ((platform, method, route), acc) in routes {
            if acc.classes.is_empty() && acc.sketch.count() == 0 {
                continue;
            }
            let (total, list) = platforms.entry(platform).or_default();
            for (class, n) in &acc.classes {
                *total.classes.entry(class.clone()).or_default() += n;
            }
            total.sketch.merge(&acc.sketch);
            list.push(RouteMetrics {
                method,
                route,
                figures: Figures::new(&acc.classes, &acc.sketch, window_secs),
                status_classes: acc.classes,
            });
        }
        let platforms = platforms
            .into_iter()
            .map(|(platform, (total, mut routes))| {
                routes.sort_by_key(|r| std::cmp::Reverse(r.figures.requests));
                PlatformMetrics {
                    platform,
                    figures: Figures::new(&total.classes, &total.sketch, window_secs),
                    routes,
                }
            })
            .collect();
        Ok(MetricsView {
            window_seconds: window_secs,
            from_unix_ms: from_ms,
            to_unix_ms: to_ms,
            platforms,
        })
    }

    /// `GET /api/v1/system/metrics` with `step`: per platform and route, requests, errors and
    /// latency percentiles in steps over the window.
    ///
    /// The points are `[from_unix_ms + k·step, …)`, the window's start rounded up to a
    /// multiple of the step and the last point ending now. The step must be at least the
    /// buckets of the finest tiers that hold the whole window (of the request counters and of
    /// the latency sketches, which are coarser) and is rounded up to a multiple of them, so
    /// every point is made of whole buckets and every series' points line up.
    pub fn metrics_series_view(
        &self,
        query: &MetricsQuery,
        step: &str,
    ) -> Result<MetricsSeriesView, ViewError> {
        self.metrics_series_view_at(query, step, store::unix_ms(SystemTime::now()))
    }

    /// [`Self::metrics_series_view`] as of `now_ms` (unix ms), for tests that need fixed
    /// bucket boundaries.
    pub(super) fn metrics_series_view_at(
        &self,
        query: &MetricsQuery,
        step: &str,
        now_ms: i64,
    ) -> Result<MetricsSeriesView, ViewError> {
        let window_secs = parse_window(query.window.as_deref().unwrap_or("5m"))?;
        let step_secs = parse_step(step)?;
        if let Some(platform) = &query.platform {
            if !self.platforms().knows(platform) {
                return Err(ViewError::UnknownPlatform(platform.clone()));
            }
        }
        let window_ms = window_secs * 1000;
        let min_step_ms = self
            .store()
            .read(|store| finest_step_ms(store.config(), window_ms));
        let step = checked_step_ms(window_secs, step_secs * 1000, min_step_ms)?;
        // Both at most 365 days in ms: far inside i64.
        let (window, step_ms) = (window_ms as i64, step as i64);
        let to_ms = now_ms + 1;
        let start = to_ms - window;
        let from_ms = start.div_euclid(step_ms) * step_ms
            + if start.rem_euclid(step_ms) == 0 {
                0
            } else {
                step_ms
            };
        // At least one: `from_ms` is less than a step after the window's start.
        let points = (to_ms - from_ms).unsigned_abs().div_ceil(step);

        let selector = |name: &str| {
            let selector = Selector::name(name);
            match &query.platform {
                Some(platform) => selector.with("platform", platform.as_str()),
                None => selector,
            }
        };
        let (platforms, complete, target) = self.store().read(|store| {
            let mut routes: BTreeMap<(String, String, String), RouteIds> = BTreeMap::new();
            for info in store.select(&selector(HTTP_REQUESTS)) {
                let ids = routes.entry(route_key(&info.key)).or_default();
                ids.requests.push(info.id);
                if info.key.label("status_class") == Some("5xx") {
                    ids.errors.push(info.id);
                }
            }
            for info in store.select(&selector(HTTP_DURATION)) {
                routes
                    .entry(route_key(&info.key))
                    .or_default()
                    .durations
                    .push(info.id);
            }
            let mut platforms: BTreeMap<String, PlatformIds> = BTreeMap::new();
            for ((platform, method, route), ids) in routes {
                let (total, list) = platforms.entry(platform).or_default();
                total.extend(&ids);
                list.push(((method, route), ids));
            }
            let series = platforms
                .values()
                .map(|(_, routes)| routes.len() as u64 + 1)
                .sum::<u64>();
            if series * points > MAX_ANSWER_POINTS {
                return Err(ViewError::AnswerTooLarge { series, points });
            }
            let mut complete = true;
            let mut series_of = |ids: &RouteIds| -> Result<Vec<SeriesPoint>, ViewError> {
                let ranges = ids.ranges(store, from_ms, to_ms, step)?;
                complete &= ranges.complete();
                Ok(ranges.points(from_ms, step_ms, points))
            };
            let mut views = Vec::with_capacity(platforms.len());
            for (platform, (total, routes)) in platforms {
                let mut route_views = Vec::with_capacity(routes.len());
                for ((method, route), ids) in routes {
                    let points = series_of(&ids)?;
                    route_views.push(RouteSeries {
                        method,
                        route,
                        points,
                    });
                }
                route_views.sort_by_key(|r| std::cmp::Reverse(r.requests()));
                views.push(PlatformSeries {
                    platform,
                    points: series_of(&total)?,
                    routes: route_views,
                });
            }
            let mut target = Vec::new();
            let cpu = store.lookup(crate::activity::TARGET_CPU, &[]);
            let memory = store.lookup(crate::activity::TARGET_MEMORY, &[]);
            if cpu.is_some() || memory.is_some() {
                let gauge = |id: Option<SeriesId>| -> Result<Option<Range>, ViewError> {
                    id.map(|id| store.range_of(&[id], from_ms, to_ms, step))
                        .transpose()
                        .map_err(ViewError::Store)
                };
                let (cpu, memory) = (gauge(cpu)?, gauge(memory)?);
                let value = |range: &Option<Range>, k: usize| match range
                    .as_ref()
                    .and_then(|r| r.points.get(k))
                    .and_then(|p| p.value)
                {
                    Some(PointValue::Gauge(g)) => Some(g),
                    _ => None,
                };
                for k in 0..usize::try_from(points).unwrap_or(0) {
                    target.push(ResourcePoint {
                        at_unix_ms: from_ms + k as i64 * step_ms,
                        cpu_percent: value(&cpu, k).map(|g| (g.mean * 10.0).round() / 10.0),
                        memory_bytes: value(&memory, k).map(|g| g.max.round() as u64),
                    });
                }
            }
            Ok((views, complete, target))
        })?;
        Ok(MetricsSeriesView {
            window_seconds: window_secs,
            step_ms: step,
            min_step_ms,
            from_unix_ms: from_ms,
            to_unix_ms: to_ms,
            complete,
            platforms,
            target,
        })
    }

    /// `GET /api/v1/system/queries`.
    pub fn queries_view(&self) -> QueriesView {
        let tables = self.lock();
        let mut queries: Vec<QueryView> = tables
            .queries
            .values()
            .map(|stats| {
                let sketch = stats.durations_ms.merged();
                QueryView {
                    query_id: stats.query_id.to_string(),
                    fingerprint: stats.fingerprint.to_string(),
                    count: stats.count,
                    errors: stats.errors,
                    rows: stats.rows,
                    mean_ms: (stats.count > 0)
                        .then(|| ns_to_ms(stats.total_ns) / stats.count as f64)
                        .map(round_ms),
                    p95_ms: sketch.quantile(0.95).map(round_ms),
                    total_ms: round_ms(ns_to_ms(stats.total_ns)),
                    last_seen_unix_ms: tables.unix_ms(stats.last_seen_ns),
                    sqlstates: stats
                        .sqlstates
                        .iter()
                        .map(|(code, n)| (code.to_string(), *n))
                        .collect(),
                }
            })
            .collect();
        queries.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        QueriesView {
            queries,
            auth_failures: tables
                .auth_failures
                .iter()
                .map(|(code, n)| (code.to_string(), *n))
                .collect(),
            logins: tables.logins,
        }
    }

    /// `GET /api/v1/system/traces`.
    pub fn traces_view(&self) -> TracesView {
        let tables = self.lock();
        let now_ns = tables.now_ns.max(super::record::monotonic_ns());
        let in_flight = tables
            .in_flight
            .iter()
            .map(|request| InFlightView {
                peer: request.peer.as_ref().map(ToString::to_string),
                platform: request.platform.to_string(),
                method: request.method,
                route: request.route.to_string(),
                started_unix_ms: tables.unix_ms(request.start_ns),
                elapsed_ms: round_ms(ns_to_ms(now_ns.saturating_sub(request.start_ns))),
            })
            .collect();
        let oldest = now_ns.saturating_sub(2 * SLOWEST_GENERATION_NS);
        let mut slowest: Vec<&Trace> = tables
            .slowest
            .iter()
            .flatten()
            .filter(|t| t.end_ns >= oldest)
            .collect();
        slowest.sort_by_key(|t| std::cmp::Reverse(t.duration_ns()));
        slowest.truncate(tables.slowest_cap);
        let slowest = slowest
            .into_iter()
            .map(|trace| {
                let (queries, complete) = tied_queries(&tables, trace);
                TraceView {
                    peer: trace.peer.as_ref().map(ToString::to_string),
                    platform: trace.platform.to_string(),
                    method: trace.method,
                    route: trace.route.to_string(),
                    status: trace.status,
                    duration_ms: round_ms(ns_to_ms(trace.duration_ns())),
                    at_unix_ms: tables.unix_ms(trace.start_ns),
                    queries_complete: complete,
                    queries: queries
                        .into_iter()
                        .map(|q| TraceQueryView {
                            server: q.server.as_ref().map(ToString::to_string),
                            query_id: q.query_id.to_string(),
                            fingerprint: q.fingerprint.to_string(),
                            duration_ms: round_ms(ns_to_ms(q.end_ns.saturating_sub(q.start_ns))),
                            offset_ms: round_ms(ns_to_ms(
                                q.start_ns.saturating_sub(trace.start_ns),
                            )),
                            sqlstate: q.sqlstate.as_ref().map(ToString::to_string),
                        })
                        .collect(),
                }
            })
            .collect();
        TracesView {
            in_flight,
            queries_in_flight: tables.queries_in_flight,
            slowest,
        }
    }
}

/// The queries that ran for `trace`: those of the same process that started and ended
/// within the request while no other request of that process was open. With concurrent
/// requests nothing on the wire says which request a query served, so such queries are
/// left out rather than guessed. `complete` is false when the recent history no longer
/// reaches back to the request's start.
fn tied_queries<'a>(tables: &'a Tables, trace: &Trace) -> (Vec<&'a RecentQuery>, bool) {
    let complete = tables
        .recent_queries
        .front()
        .is_none_or(|q| q.start_ns <= trace.start_ns)
        && tables
            .recent_exchanges
            .front()
            .is_none_or(|&(_, start, _)| start <= trace.start_ns);
    let others: Vec<(u64, u64)> = tables
        .recent_exchanges
        .iter()
        .filter(|&&(tgid, start, end)| {
            tgid == trace.tgid && !(start == trace.start_ns && end == trace.end_ns)
        })
        .map(|&(_, start, end)| (start, end))
        .chain(
            tables
                .in_flight
                .iter()
                // The in-flight list is a snapshot taken every second: it can still hold
                // this very request, which is no other request.
                .filter(|r| r.tgid == trace.tgid && r.start_ns != trace.start_ns)
                .map(|r| (r.start_ns, u64::MAX)),
        )
        .collect();
    let queries = tables
        .recent_queries
        .iter()
        .filter(|q| {
            q.tgid == trace.tgid
                && q.start_ns >= trace.start_ns
                && q.end_ns <= trace.end_ns
                && !others
                    .iter()
                    .any(|&(start, end)| start <= q.end_ns && end >= q.start_ns)
        })
        .collect();
    (queries, complete)
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 * 1e-6
}

/// Milliseconds to the microsecond: finer digits would be noise (and sketches are within
/// 6 % anyway).
pub(super) fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn route_key(key: &store::SeriesKey) -> (String, String, String) {
    let label = |name| key.label(name).unwrap_or_default().to_owned();
    (label("platform"), label("method"), label("route"))
}

/// The finest step a window can be read at: the least common multiple of the buckets of the
/// finest counter tier and the finest distribution tier that keep the whole window (the
/// coarsest of each when none does), so a step of it is whole buckets of both.
fn finest_step_ms(config: &StoreConfig, window_ms: u64) -> u64 {
    let finest = |kind| {
        let tiers = config.tiers_of(kind);
        tiers
            .iter()
            .find(|tier| tier.retention_ms >= window_ms)
            .or(tiers.last())
            .map_or(1, |tier| tier.resolution_ms.max(1))
    };
    lcm(
        finest(SeriesKind::Counter),
        finest(SeriesKind::Distribution),
    )
}

/// The least common multiple of two bucket widths (positive; saturating, though tier widths
/// are far below where it would).
fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    (a / x.max(1)).saturating_mul(b)
}

/// The step asked for rounded up to a multiple of `min_step_ms`, if it is at least that, at
/// most the window, and cuts the window into at most [`MAX_SERIES_POINTS`].
fn checked_step_ms(window_seconds: u64, asked_ms: u64, min_step_ms: u64) -> Result<u64, ViewError> {
    if asked_ms < min_step_ms {
        return Err(ViewError::StepTooFine {
            step_ms: asked_ms,
            min_step_ms,
            window_seconds,
        });
    }
    let step_ms = asked_ms.div_ceil(min_step_ms) * min_step_ms;
    let window_ms = window_seconds * 1000;
    if step_ms > window_ms {
        return Err(ViewError::StepLongerThanWindow {
            step_ms,
            window_seconds,
        });
    }
    let points = window_ms.div_ceil(step_ms);
    if points > MAX_SERIES_POINTS {
        let fewest = window_ms.div_ceil(MAX_SERIES_POINTS);
        return Err(ViewError::TooManyPoints {
            window_seconds,
            step_ms,
            points,
            min_step_ms: fewest.div_ceil(min_step_ms) * min_step_ms,
        });
    }
    Ok(step_ms)
}

/// A platform's series: all of them together, and per (method, route).
type PlatformIds = (RouteIds, Vec<((String, String), RouteIds)>);

/// The series behind one route, or behind every route of a platform.
#[derive(Default)]
struct RouteIds {
    /// Request counters, one per status class.
    requests: Vec<SeriesId>,
    /// Those of the `5xx` class.
    errors: Vec<SeriesId>,
    /// Latency sketches.
    durations: Vec<SeriesId>,
}

impl RouteIds {
    fn extend(&mut self, other: &Self) {
        self.requests.extend(&other.requests);
        self.errors.extend(&other.errors);
        self.durations.extend(&other.durations);
    }

    /// The merged range of each kind that has series.
    fn ranges(
        &self,
        store: &Store,
        from_ms: i64,
        to_ms: i64,
        step_ms: u64,
    ) -> Result<Ranges, ViewError> {
        let range = |ids: &[SeriesId]| -> Result<Option<Range>, ViewError> {
            if ids.is_empty() {
                return Ok(None);
            }
            store
                .range_of(ids, from_ms, to_ms, step_ms)
                .map(Some)
                .map_err(ViewError::Store)
        };
        Ok(Ranges {
            requests: range(&self.requests)?,
            errors: range(&self.errors)?,
            durations: range(&self.durations)?,
        })
    }
}

/// The ranges of one route or platform, on one grid of points.
struct Ranges {
    requests: Option<Range>,
    errors: Option<Range>,
    durations: Option<Range>,
}

impl Ranges {
    fn complete(&self) -> bool {
        [&self.requests, &self.errors, &self.durations]
            .into_iter()
            .flatten()
            .all(|range| range.complete)
    }

    /// The points `[from_ms + k·step_ms, …)`. Every range was asked for on this grid, so
    /// point `k` of each is the same step.
    fn points(&self, from_ms: i64, step_ms: i64, count: u64) -> Vec<SeriesPoint> {
        let value = |range: &Option<Range>, k: usize| {
            range
                .as_ref()
                .and_then(|r| r.points.get(k))
                .and_then(|p| p.value)
        };
        (0..usize::try_from(count).unwrap_or(0))
            .map(|k| {
                let counter = |range| match value(range, k) {
                    Some(PointValue::Counter(c)) => Some((c.total.round() as u64, c.rate_per_sec)),
                    _ => None,
                };
                let requests = counter(&self.requests);
                // A route that never answered 5xx has no such series: none is zero errors.
                let errors = counter(&self.errors)
                    .map(|(n, _)| n)
                    .or(requests.map(|_| 0));
                let percentiles = match value(&self.durations, k) {
                    Some(PointValue::Distribution(p)) => Some(p),
                    _ => None,
                };
                SeriesPoint {
                    at_unix_ms: from_ms + k as i64 * step_ms,
                    requests: requests.map(|(n, _)| n),
                    rate_per_second: requests.map(|(_, rate)| rate),
                    errors,
                    error_rate: requests.zip(errors).map(|((n, _), e)| {
                        if n == 0 {
                            0.0
                        } else {
                            e as f64 / n as f64
                        }
                    }),
                    p50_ms: percentiles.map(|p| round_ms(p.p50)),
                    p95_ms: percentiles.map(|p| round_ms(p.p95)),
                    p99_ms: percentiles.map(|p| round_ms(p.p99)),
                }
            })
            .collect()
    }
}

pub(super) fn summarize(
    store: &Store,
    id: SeriesId,
    from_ms: i64,
    to_ms: i64,
) -> Option<Aggregate> {
    store
        .summarize(&[id], from_ms, to_ms)
        .ok()
        .and_then(|summary| summary.aggregate)
}

/// `GET /api/v1/system/metrics?…&step=…`.
#[derive(Debug, Serialize)]
pub struct MetricsSeriesView {
    pub window_seconds: u64,
    /// The step of the points: the one asked for, rounded up to a multiple of
    /// `min_step_ms`.
    pub step_ms: u64,
    /// The finest step this window can be read at: the store's buckets over it.
    pub min_step_ms: u64,
    /// Start of the first point: the window's start rounded up to a multiple of the step.
    pub from_unix_ms: i64,
    /// End of the last point (now), which is shorter than a step when now is mid-step.
    pub to_unix_ms: i64,
    /// False when the store no longer holds part of the window (older than its tiers keep).
    pub complete: bool,
    pub platforms: Vec<PlatformSeries>,
    /// The target's CPU (mean over the step, 100 = one core) and memory (the step's peak),
    /// on the same grid; empty before the first sample.
    pub target: Vec<ResourcePoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourcePoint {
    pub at_unix_ms: i64,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct PlatformSeries {
    pub platform: String,
    /// Every route of the platform together.
    pub points: Vec<SeriesPoint>,
    /// Busiest over the window first.
    pub routes: Vec<RouteSeries>,
}

#[derive(Debug, Serialize)]
pub struct RouteSeries {
    pub method: String,
    pub route: String,
    pub points: Vec<SeriesPoint>,
}

impl RouteSeries {
    fn requests(&self) -> u64 {
        self.points.iter().filter_map(|p| p.requests).sum()
    }
}

/// One step: requests, rate, errors (5xx) and latency percentiles. Counts are null for a
/// step older than the store holds; percentiles are null for a step without requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    pub at_unix_ms: i64,
    pub requests: Option<u64>,
    /// Requests per second over the step (the last one: over its elapsed part).
    pub rate_per_second: Option<f64>,
    pub errors: Option<u64>,
    pub error_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct QueriesView {
    /// Slowest in total first.
    pub queries: Vec<QueryView>,
    /// Refused logins by SQLSTATE (`28P01`: bad password).
    pub auth_failures: BTreeMap<String, u64>,
    pub logins: u64,
}

#[derive(Debug, Serialize)]
pub struct QueryView {
    pub query_id: String,
    pub fingerprint: String,
    pub count: u64,
    pub errors: u64,
    pub rows: u64,
    pub mean_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub total_ms: f64,
    pub last_seen_unix_ms: i64,
    pub sqlstates: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct TracesView {
    pub in_flight: Vec<InFlightView>,
    pub queries_in_flight: usize,
    /// Slowest first, from the last 5 to 10 minutes.
    pub slowest: Vec<TraceView>,
}

#[derive(Debug, Serialize)]
pub struct InFlightView {
    /// The client's address as the target sees it (`ip:port`), `unix` on a unix socket,
    /// null when the connection's addresses are unknown.
    pub peer: Option<String>,
    pub platform: String,
    pub method: &'static str,
    pub route: String,
    pub started_unix_ms: i64,
    pub elapsed_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct TraceView {
    /// The client's address, as for [`InFlightView::peer`].
    pub peer: Option<String>,
    pub platform: String,
    pub method: &'static str,
    pub route: String,
    pub status: u16,
    pub duration_ms: f64,
    pub at_unix_ms: i64,
    /// False when the request is older than the recent query history.
    pub queries_complete: bool,
    pub queries: Vec<TraceQueryView>,
}

#[derive(Debug, Serialize)]
pub struct TraceQueryView {
    /// The database server's address as the target connected to it (`ip:port`), `unix` on
    /// a unix socket, null when unknown.
    pub server: Option<String>,
    pub query_id: String,
    pub fingerprint: String,
    pub duration_ms: f64,
    /// From the request's first byte to the query's.
    pub offset_ms: f64,
    pub sqlstate: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_units_and_bounds() {
        assert_eq!(parse_window("30s"), Ok(30));
        assert_eq!(parse_window("5m"), Ok(300));
        assert_eq!(parse_window("1h"), Ok(3600));
        assert_eq!(parse_window("7d"), Ok(604_800));
        assert_eq!(parse_window("90"), Ok(90));
        for bad in ["", "0s", "5x", "m", "-1m", "366d", "99999999999999999999d"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }
}
