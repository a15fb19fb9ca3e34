//! The API's views of the traffic: per platform and route over a window (from the store),
//! per fingerprint since the daemon started, and requests in flight and the slowest recent
//! ones with their queries.

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    record::{HTTP_DURATION, HTTP_REQUESTS},
    RecentQuery, Tables, Trace, TrafficView, SLOWEST_GENERATION_NS,
};
use crate::store::{self, Aggregate, MergedSketch, Selector, SeriesId, Store};

/// A request the API cannot answer as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("window {0:?} is not a duration such as 30s, 5m, 1h or 7d (at most 365d)")]
    BadWindow(String),
    #[error("no platform named {0:?} (see [[platforms]]; requests of none are under \"other\")")]
    UnknownPlatform(String),
}

/// `?platform=…&window=…` of `GET /api/v1/system/metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    pub platform: Option<String>,
    pub window: Option<String>,
}

/// Parses `30s`, `5m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_window(text: &str) -> Result<u64, ViewError> {
    let bad = || ViewError::BadWindow(text.to_owned());
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = number.checked_mul(unit_secs).ok_or_else(bad)?;
    if secs == 0 || secs > 365 * 86_400 {
        return Err(bad());
    }
    Ok(secs)
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

impl TrafficView {
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
                .filter(|r| r.tgid == trace.tgid)
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
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn route_key(key: &store::SeriesKey) -> (String, String, String) {
    let label = |name| key.label(name).unwrap_or_default().to_owned();
    (label("platform"), label("method"), label("route"))
}

fn summarize(store: &Store, id: SeriesId, from_ms: i64, to_ms: i64) -> Option<Aggregate> {
    store
        .summarize(&[id], from_ms, to_ms)
        .ok()
        .and_then(|summary| summary.aggregate)
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
    pub platform: String,
    pub method: &'static str,
    pub route: String,
    pub started_unix_ms: i64,
    pub elapsed_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct TraceView {
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
