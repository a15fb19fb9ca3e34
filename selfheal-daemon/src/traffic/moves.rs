//! What moved in the traffic: per route (from the store) and per query fingerprint (from the
//! recent queries: the store keeps one series for all of them), the last window against the
//! window before it. The diagnostic agent names in its evidence the query or route that
//! explains an alert, and how far it moved.

use std::{collections::BTreeMap, time::SystemTime};

use super::{
    record::{monotonic_ns, HTTP_DURATION, HTTP_REQUESTS},
    views::{round_ms, summarize},
    TrafficView,
};
use crate::store::{self, Aggregate, MergedSketch, Selector, Store, WindowSketch};

/// One window's figures of a query or route.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    /// Runs of the query, requests to the route.
    pub count: u64,
    /// 5xx answers (routes only).
    pub errors: u64,
    pub p95_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

/// A query fingerprint in the last window and the one before.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryMove {
    pub fingerprint: String,
    pub query_id: String,
    pub now: Window,
    /// The window before; when the recent queries kept do not reach back that far, every
    /// earlier run since the daemon started (`before_since_start`: a count and mean only).
    pub before: Window,
    pub before_since_start: bool,
}

/// A route in the last window and the one before.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMove {
    pub platform: String,
    pub method: String,
    pub route: String,
    pub now: Window,
    pub before: Window,
}

/// The traffic of the last `window_secs` against the `window_secs` before.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrafficMoves {
    pub window_secs: u64,
    /// Slowest (p95 of the last window) first; only those run in it.
    pub queries: Vec<QueryMove>,
    /// Every route with requests in the last window, in no particular order.
    pub routes: Vec<RouteMove>,
}

/// The sketches and 5xx counts of one query or route, in the two windows.
#[derive(Default)]
struct Acc {
    sketches: [MergedSketch; 2],
    requests: [u64; 2],
    errors: [u64; 2],
}

impl Acc {
    fn window(&self, at: usize) -> Window {
        let sketch = &self.sketches[at];
        Window {
            count: sketch.count().max(self.requests[at]),
            errors: self.errors[at],
            p95_ms: sketch.quantile(0.95).map(round_ms),
            mean_ms: sketch.mean().map(round_ms),
        }
    }
}

impl TrafficView {
    /// The traffic of the last `window_secs` against the `window_secs` before, from the store.
    pub fn moves(&self, window_secs: u64) -> TrafficMoves {
        let to_ms = store::unix_ms(SystemTime::now()) + 1;
        let window_ms = i64::try_from(window_secs.max(1) * 1000).unwrap_or(i64::MAX / 4);
        // [from, middle): before; [middle, to): now.
        let bounds = [
            (to_ms - window_ms, to_ms),
            (to_ms - 2 * window_ms, to_ms - window_ms),
        ];
        let mut routes: BTreeMap<(String, String, String), Acc> = BTreeMap::new();
        self.store().read(|store: &Store| {
            for info in store.select(&Selector::name(HTTP_DURATION)) {
                let acc = routes.entry(route_of(&info.key)).or_default();
                for (at, (from, to)) in bounds.iter().enumerate() {
                    if let Some(Aggregate::Distribution(d)) = summarize(store, info.id, *from, *to)
                    {
                        acc.sketches[at].merge(&d.sketch);
                    }
                }
            }
            for info in store.select(&Selector::name(HTTP_REQUESTS)) {
                let errors = info.key.label("status_class") == Some("5xx");
                let acc = routes.entry(route_of(&info.key)).or_default();
                for (at, (from, to)) in bounds.iter().enumerate() {
                    if let Some(Aggregate::Counter(c)) = summarize(store, info.id, *from, *to) {
                        let n = c.total.round() as u64;
                        acc.requests[at] += n;
                        if errors {
                            acc.errors[at] += n;
                        }
                    }
                }
            }
        });
        let mut queries = self.query_moves(window_secs);
        queries.sort_by(|a, b| {
            b.now
                .p95_ms
                .unwrap_or(0.0)
                .total_cmp(&a.now.p95_ms.unwrap_or(0.0))
                .then(b.now.count.cmp(&a.now.count))
        });
        let routes = routes
            .into_iter()
            .map(|((platform, method, route), acc)| RouteMove {
                platform,
                method,
                route,
                now: acc.window(0),
                before: acc.window(1),
            })
            .filter(|r| r.now.count > 0)
            .collect();
        TrafficMoves {
            window_secs,
            queries,
            routes,
        }
    }
}

impl TrafficView {
    /// Per fingerprint run in the last window: its recent runs then and in the window
    /// before, else every run since the daemon started.
    fn query_moves(&self, window_secs: u64) -> Vec<QueryMove> {
        let tables = self.lock();
        let now_ns = tables.now_ns.max(monotonic_ns());
        let window_ns = window_secs.max(1).saturating_mul(1_000_000_000);
        let middle = now_ns.saturating_sub(window_ns);
        let start = middle.saturating_sub(window_ns);
        let mut windows: BTreeMap<&str, [WindowSketch; 2]> = BTreeMap::new();
        // The window before is known whole when the recent queries kept reach past it, or
        // none was ever dropped.
        let reaches_back = tables.recent_queries.len() < super::RECENT
            || tables
                .recent_queries
                .front()
                .is_some_and(|q| q.end_ns < start);
        for query in &tables.recent_queries {
            let at = if query.end_ns >= middle {
                0
            } else if query.end_ns >= start {
                1
            } else {
                continue;
            };
            let ms = query.end_ns.saturating_sub(query.start_ns) as f64 * 1e-6;
            windows.entry(&query.query_id).or_default()[at].insert(ms);
        }
        let window = |sketch: &MergedSketch| Window {
            count: sketch.count(),
            errors: 0,
            p95_ms: sketch.quantile(0.95).map(round_ms),
            mean_ms: sketch.mean().map(round_ms),
        };
        tables
            .queries
            .values()
            .filter_map(|stats| {
                let [now, before] = windows.get(&*stats.query_id)?;
                let now_sketch = now.merged();
                let now = window(&now_sketch);
                if now.count == 0 {
                    return None;
                }
                let before = if reaches_back {
                    window(&before.merged())
                } else {
                    // Every run before these: the table's totals less the window's.
                    let count = stats.count.saturating_sub(now.count);
                    let total_ms = stats.total_ns as f64 * 1e-6 - now_sketch.sum();
                    Window {
                        count,
                        errors: 0,
                        p95_ms: None,
                        mean_ms: (count > 0).then(|| round_ms(total_ms.max(0.0) / count as f64)),
                    }
                };
                Some(QueryMove {
                    fingerprint: stats.fingerprint.to_string(),
                    query_id: stats.query_id.to_string(),
                    now,
                    before,
                    before_since_start: !reaches_back,
                })
            })
            .collect()
    }
}

fn route_of(key: &store::SeriesKey) -> (String, String, String) {
    let label = |name| key.label(name).unwrap_or_default().to_owned();
    (label("platform"), label("method"), label("route"))
}

/// "p95 812 ms over 40 runs in the last 60 s, against 2.1 ms in the 60 s before (×387)".
fn latency_moved(
    now: Window,
    before: Window,
    window_secs: u64,
    unit: &str,
    since_start: bool,
) -> String {
    let now_text = format!(
        "p95 {} over {} {unit} in the last {window_secs} s",
        ms(now.p95_ms),
        now.count
    );
    if since_start {
        return match before.mean_ms {
            Some(mean) if before.count > 0 => format!(
                "{now_text} (mean {}), against a mean of {} over {} earlier {unit}",
                ms(now.mean_ms),
                ms(Some(mean)),
                before.count
            ),
            _ => format!("{now_text}, its first {unit}"),
        };
    }
    match (now.p95_ms, before.p95_ms) {
        (Some(now_ms), Some(before_ms)) if before.count > 0 => {
            let ratio = if before_ms > 0.0 {
                format!(" (×{:.1})", now_ms / before_ms)
            } else {
                String::new()
            };
            format!(
                "{now_text}, against {} in the {window_secs} s before{ratio}",
                ms(Some(before_ms))
            )
        }
        _ => format!("{now_text}, none in the {window_secs} s before"),
    }
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
        None => "?".to_owned(),
    }
}

impl QueryMove {
    /// One line of evidence.
    pub fn describe(&self, window_secs: u64) -> String {
        format!(
            "query {} ({}): {}",
            self.fingerprint,
            self.query_id,
            latency_moved(
                self.now,
                self.before,
                window_secs,
                "runs",
                self.before_since_start
            )
        )
    }
}

impl RouteMove {
    /// One line of evidence about its latency.
    pub fn describe_latency(&self, window_secs: u64) -> String {
        format!(
            "route {} {} on {}: {}",
            self.method,
            self.route,
            self.platform,
            latency_moved(self.now, self.before, window_secs, "requests", false)
        )
    }

    /// One line of evidence about its server errors.
    pub fn describe_errors(&self, window_secs: u64) -> String {
        format!(
            "route {} {} on {}: {} of {} requests answered 5xx in the last {window_secs} s, against {} of {} in the {window_secs} s before",
            self.method,
            self.route,
            self.platform,
            self.now.errors,
            self.now.count,
            self.before.errors,
            self.before.count
        )
    }
}

impl TrafficMoves {
    /// The slowest query of the last window.
    pub fn slowest_query(&self) -> Option<&QueryMove> {
        self.queries.first()
    }

    /// The route of `platform` (any when `None`) with the highest p95 in the last window.
    pub fn slowest_route(&self, platform: Option<&str>) -> Option<&RouteMove> {
        self.routes
            .iter()
            .filter(|r| platform.is_none_or(|p| r.platform == p))
            .max_by(|a, b| {
                a.now
                    .p95_ms
                    .unwrap_or(0.0)
                    .total_cmp(&b.now.p95_ms.unwrap_or(0.0))
            })
    }

    /// The route of `platform` (any when `None`) with the most 5xx answers in the last window.
    pub fn most_errors(&self, platform: Option<&str>) -> Option<&RouteMove> {
        self.routes
            .iter()
            .filter(|r| r.now.errors > 0 && platform.is_none_or(|p| r.platform == p))
            .max_by_key(|r| r.now.errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_says_how_far_and_from_where() {
        let query = QueryMove {
            fingerprint: "SELECT * FROM leads WHERE id = $1".to_owned(),
            query_id: "q1".to_owned(),
            now: Window {
                count: 40,
                errors: 0,
                p95_ms: Some(812.4),
                mean_ms: Some(700.0),
            },
            before: Window {
                count: 300,
                errors: 0,
                p95_ms: Some(2.0),
                mean_ms: Some(1.5),
            },
            before_since_start: false,
        };
        assert_eq!(
            query.describe(60),
            "query SELECT * FROM leads WHERE id = $1 (q1): p95 812 ms over 40 runs in the last 60 s, against 2.0 ms in the 60 s before (×406.2)"
        );
        let since_start = QueryMove {
            before_since_start: true,
            ..query.clone()
        };
        assert!(
            since_start.describe(60).ends_with(
                "in the last 60 s (mean 700 ms), against a mean of 1.5 ms over 300 earlier runs"
            ),
            "{}",
            since_start.describe(60)
        );
        let new = QueryMove {
            before: Window::default(),
            ..query
        };
        assert!(
            new.describe(60).ends_with("none in the 60 s before"),
            "{}",
            new.describe(60)
        );
    }
}
