//! The recorder and the views together, on exchanges and queries as the decoders emit them.
// The views round milliseconds to the microsecond, so the values compared here are exact.
#![allow(clippy::float_cmp)]

use std::sync::Arc;

use super::*;
use crate::{
    config::{PlatformConfig, TrafficConfig},
    probes::capture::{Decoded, Endpoints, Origin},
    protocols::{
        http::{HttpExchange, HttpRequest, Method, Version},
        postgres::{Completion, PgError, PgEvent, PgQuery, QueryProtocol, StartupInfo, Statement},
    },
    store::{StoreConfig, StoreHandle},
    telemetry::Metrics,
};

const MS: u64 = 1_000_000;

fn view(config: &TrafficConfig) -> (TrafficView, Recorder, Metrics) {
    let store = StoreHandle::new(StoreConfig::default()).expect("store");
    let platforms = Platforms::new(&[PlatformConfig::new(
        "tackle.io",
        &["api.tackle.io"],
        &["/api/v1/tackle"],
    )]);
    let view = TrafficView::new(store, platforms, config.slowest_requests);
    let metrics = Metrics::new();
    let recorder = Recorder::new(view.clone(), config, metrics.clone());
    (view, recorder, metrics)
}

/// A request now-ish on the monotonic clock, so the store's window holds it.
fn exchange(path: &str, host: Option<&str>, status: u16, start_ns: u64, ms: u64) -> HttpExchange {
    HttpExchange {
        request: HttpRequest {
            method: Method::Get,
            path: path.to_owned(),
            version: Version::Http11,
            host: host.map(str::to_owned),
            start_ns,
            bytes: 100,
            truncated: false,
        },
        status,
        response_start_ns: start_ns + ms * MS,
        response_bytes: 10,
        truncated: false,
    }
}

fn query(sql: &str, start_ns: u64, ms: u64, sqlstate: Option<&str>) -> PgEvent {
    PgEvent::Query(PgQuery {
        statement: Some(Arc::new(Statement {
            sql: sql.into(),
            fingerprint: crate::protocols::fingerprint::fingerprint(sql).into(),
            truncated: false,
        })),
        protocol: QueryProtocol::Extended,
        start_ns,
        end_ns: start_ns + ms * MS,
        rows: 2,
        command: None,
        completion: if sqlstate.is_some() {
            Completion::Error
        } else {
            Completion::Command
        },
        error: sqlstate.map(|code| PgError {
            severity: "ERROR".to_owned(),
            sqlstate: code.to_owned(),
            message: "boom".to_owned(),
        }),
        tx_status: None,
    })
}

/// A message of process `tgid` on a connection whose addresses are unknown.
fn at(tgid: u32) -> Origin {
    Origin {
        tgid,
        endpoints: None,
    }
}

/// A message of process `tgid` on a TCP connection from `local` to `remote`.
fn on(tgid: u32, local: &str, remote: &str) -> Origin {
    Origin {
        tgid,
        endpoints: Some(Endpoints::Tcp {
            local: local.parse().expect("address"),
            remote: remote.parse().expect("address"),
        }),
    }
}

fn now_ns() -> u64 {
    record::monotonic_ns()
}

#[test]
fn requests_are_counted_per_platform_route_and_status_and_summarized_over_a_window() {
    let (view, mut recorder, metrics) = view(&TrafficConfig::default());
    let t = now_ns() - 1_000 * MS;
    let mut decoded = Decoded::default();
    for (i, ms) in [10u64, 20, 30, 40].into_iter().enumerate() {
        let path = format!("/api/v1/tackle/deals/{i}");
        decoded
            .http
            .push((at(1), exchange(&path, None, 200, t, ms)));
    }
    decoded
        .http
        .push((at(1), exchange("/x", Some("api.tackle.io:8080"), 503, t, 5)));
    decoded
        .http
        .push((at(1), exchange("/health", None, 200, t, 1)));
    recorder.record(&decoded);

    let text = metrics.encode();
    for line in [
        "selfheal_http_requests_total{platform=\"tackle.io\",method=\"GET\",route=\"/api/v1/tackle/deals/:id\",status=\"200\"} 4",
        "selfheal_http_requests_total{platform=\"tackle.io\",method=\"GET\",route=\"/x\",status=\"503\"} 1",
        "selfheal_http_requests_total{platform=\"other\",method=\"GET\",route=\"/health\",status=\"200\"} 1",
        "selfheal_http_request_duration_seconds_count{platform=\"tackle.io\",method=\"GET\",route=\"/api/v1/tackle/deals/:id\",status_class=\"2xx\"} 4",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }

    let metrics_view = view
        .metrics_view(&MetricsQuery {
            platform: Some("tackle.io".to_owned()),
            window: Some("5m".to_owned()),
            step: None,
        })
        .expect("view");
    assert_eq!(metrics_view.window_seconds, 300);
    assert_eq!(metrics_view.platforms.len(), 1);
    let platform = &metrics_view.platforms[0];
    assert_eq!(platform.platform, "tackle.io");
    assert_eq!(platform.figures.requests, 5);
    assert_eq!(platform.figures.errors, 1);
    assert!((platform.figures.error_rate - 0.2).abs() < 1e-9);
    let deals = &platform.routes[0];
    assert_eq!(deals.route, "/api/v1/tackle/deals/:id");
    assert_eq!(deals.status_classes.get("2xx"), Some(&4));
    // Nearest rank: p50 of 10, 20, 30, 40 is 20 (within the sketch's 6 %).
    let p50 = deals.figures.p50_ms.expect("p50");
    assert!((p50 - 20.0).abs() <= 20.0 * RELATIVE_ERROR_BOUND, "{p50}");
    let p99 = deals.figures.p99_ms.expect("p99");
    assert!((p99 - 40.0).abs() <= 40.0 * RELATIVE_ERROR_BOUND, "{p99}");

    assert!(matches!(
        view.metrics_view(&MetricsQuery {
            platform: Some("nope".to_owned()),
            window: None,
            step: None,
        }),
        Err(ViewError::UnknownPlatform(_))
    ));
    assert!(matches!(
        view.metrics_view(&MetricsQuery {
            platform: None,
            window: Some("5 minutes".to_owned()),
            step: None,
        }),
        Err(ViewError::BadWindow(_))
    ));
}

const RELATIVE_ERROR_BOUND: f64 = crate::store::RELATIVE_ERROR + 1e-9;

#[test]
fn routes_and_fingerprints_past_their_caps_are_counted_as_other() {
    let config = TrafficConfig {
        max_routes: 1,
        max_queries: 1,
        ..TrafficConfig::default()
    };
    let (view, mut recorder, metrics) = view(&config);
    let t = now_ns();
    let mut decoded = Decoded::default();
    decoded.http.push((at(1), exchange("/a", None, 200, t, 1)));
    decoded.http.push((at(1), exchange("/b", None, 200, t, 1)));
    decoded.http.push((at(1), exchange("/c", None, 200, t, 1)));
    decoded
        .postgres
        .push((at(1), query("SELECT 1", t, 1, None)));
    decoded
        .postgres
        .push((at(1), query("SELECT 2 FROM t", t, 1, None)));
    decoded
        .postgres
        .push((at(1), query("SELECT 3 FROM u", t, 1, None)));
    recorder.record(&decoded);
    let text = metrics.encode();
    assert!(text.contains("route=\"/a\",status=\"200\"} 1"), "{text}");
    assert!(text.contains("route=\"other\",status=\"200\"} 2"), "{text}");
    let queries = view.queries_view().queries;
    let counts: Vec<(&str, u64)> = queries
        .iter()
        .map(|q| (q.fingerprint.as_str(), q.count))
        .collect();
    assert!(counts.contains(&("SELECT ?", 1)), "{counts:?}");
    assert!(counts.contains(&("other", 2)), "{counts:?}");
    assert!(text.contains(
        "selfheal_postgres_query_duration_seconds_count{query_id=\"other\",fingerprint=\"other\"} 2"
    ));
}

#[test]
fn queries_errors_and_logins_are_reported() {
    let (view, mut recorder, metrics) = view(&TrafficConfig::default());
    let t = now_ns();
    let mut decoded = Decoded::default();
    decoded
        .postgres
        .push((at(1), query("SELECT * FROM leads WHERE id = 1", t, 4, None)));
    decoded
        .postgres
        .push((at(1), query("select * from leads where id=2", t, 2, None)));
    decoded
        .postgres
        .push((at(1), query("SELECT * FROM missing", t, 1, Some("42P01"))));
    decoded.postgres.push((
        at(1),
        PgEvent::AuthFailed {
            ts_ns: t,
            startup: StartupInfo::default(),
            error: PgError {
                severity: "FATAL".to_owned(),
                sqlstate: "28P01".to_owned(),
                message: "password authentication failed".to_owned(),
            },
        },
    ));
    recorder.record(&decoded);

    let queries = view.queries_view();
    let leads = queries
        .queries
        .iter()
        .find(|q| q.fingerprint == "SELECT * FROM leads WHERE id = ?")
        .expect("leads");
    assert_eq!((leads.count, leads.errors, leads.rows), (2, 0, 4));
    assert_eq!(leads.total_ms, 6.0);
    assert_eq!(leads.mean_ms, Some(3.0));
    assert_eq!(leads.query_id, query_id(&leads.fingerprint));
    // Slowest in total first.
    assert_eq!(queries.queries[0].fingerprint, leads.fingerprint);
    let missing = &queries.queries[1];
    assert_eq!(missing.errors, 1);
    assert_eq!(missing.sqlstates.get("42P01"), Some(&1));
    assert_eq!(queries.auth_failures.get("28P01"), Some(&1));

    let text = metrics.encode();
    assert!(text.contains(
        "selfheal_postgres_query_errors_total{sqlstate_class=\"42\",sqlstate=\"42P01\"} 1"
    ));
    assert!(text.contains("selfheal_postgres_auth_failures_total{sqlstate=\"28P01\"} 1"));
}

#[test]
fn a_slow_request_shows_the_queries_it_ran_but_not_those_of_concurrent_requests() {
    let (view, mut recorder, _) = view(&TrafficConfig::default());
    let t = now_ns();
    let mut decoded = Decoded::default();
    // Process 1: one request alone from a client at 10.0.0.5:40001, two queries inside it
    // on a pool connection to 10.0.0.9:5432.
    let client = on(1, "10.0.0.2:8080", "10.0.0.5:40001");
    let pool = on(1, "10.0.0.2:38000", "10.0.0.9:5432");
    decoded
        .http
        .push((client, exchange("/slow", None, 200, t, 100)));
    decoded
        .postgres
        .push((pool, query("SELECT 1", t + 10 * MS, 20, None)));
    decoded.postgres.push((
        pool,
        query("SELECT 2 FROM t", t + 50 * MS, 30, Some("57014")),
    ));
    // Process 2: two overlapping requests and one query: it cannot be attributed.
    decoded
        .http
        .push((at(2), exchange("/p2a", None, 200, t, 90)));
    decoded
        .http
        .push((at(2), exchange("/p2b", None, 200, t + 5 * MS, 10)));
    decoded
        .postgres
        .push((at(2), query("SELECT 3 FROM u", t + 6 * MS, 2, None)));
    recorder.record(&decoded);

    let traces = view.traces_view();
    let routes: Vec<&str> = traces.slowest.iter().map(|t| t.route.as_str()).collect();
    assert_eq!(routes, ["/slow", "/p2a", "/p2b"]);
    let slow = &traces.slowest[0];
    assert_eq!(slow.duration_ms, 100.0);
    assert_eq!(slow.peer.as_deref(), Some("10.0.0.5:40001"));
    let queries: Vec<(&str, f64, f64, Option<&str>)> = slow
        .queries
        .iter()
        .map(|q| {
            (
                q.fingerprint.as_str(),
                q.offset_ms,
                q.duration_ms,
                q.sqlstate.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        queries,
        [
            ("SELECT ?", 10.0, 20.0, None),
            ("SELECT ? FROM t", 50.0, 30.0, Some("57014"))
        ]
    );
    let servers: Vec<Option<&str>> = slow.queries.iter().map(|q| q.server.as_deref()).collect();
    assert_eq!(servers, [Some("10.0.0.9:5432"); 2]);
    // Connections whose addresses are unknown show none.
    assert_eq!(traces.slowest[1].peer, None);
    assert!(traces.slowest[1].queries.is_empty());
    assert!(traces.slowest[2].queries.is_empty());
}

#[test]
fn a_slow_request_still_in_the_in_flight_snapshot_keeps_its_queries() {
    let (view, mut recorder, _) = view(&TrafficConfig::default());
    let t = now_ns();
    let slow = exchange("/slow", None, 200, t, 300);
    // The capture task saw it waiting at its last tick, then it completed.
    recorder.set_in_flight(vec![(at(1), slow.request.clone())], 1);
    let mut decoded = Decoded::default();
    decoded
        .postgres
        .push((at(1), query("SELECT 1", t + 10 * MS, 280, None)));
    decoded.http.push((at(1), slow));
    recorder.record(&decoded);
    let traces = view.traces_view();
    assert_eq!(traces.slowest[0].queries.len(), 1, "{traces:?}");
    // Another request of the process still waiting then is another matter.
    let other = exchange("/other", None, 200, t + MS, 0).request;
    recorder.set_in_flight(vec![(at(1), other)], 1);
    assert!(view.traces_view().slowest[0].queries.is_empty());
}

#[test]
fn requests_in_flight_show_their_clients() {
    let (view, mut recorder, _) = view(&TrafficConfig::default());
    let request = exchange("/api/v1/leads/7", None, 200, now_ns(), 0).request;
    let unix = Origin {
        tgid: 1,
        endpoints: Some(Endpoints::Unix),
    };
    recorder.set_in_flight(
        vec![
            (on(1, "[::1]:8080", "[::1]:51000"), request.clone()),
            (unix, request.clone()),
            (at(1), request),
        ],
        0,
    );
    let peers: Vec<Option<String>> = view
        .traces_view()
        .in_flight
        .into_iter()
        .map(|r| r.peer)
        .collect();
    assert_eq!(
        peers,
        [
            Some("[::1]:51000".to_owned()),
            Some("unix".to_owned()),
            None
        ]
    );
}

/// A fixed "now" for the series view, mid-minute so the window's start is mid-step.
const NOW_MS: i64 = 1_700_000_012_345;
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Writes what the recorder would for `n` requests of a route answered with `status` at
/// `at_ms`, each taking `ms`.
fn write_requests(
    store: &StoreHandle,
    (platform, method, route): (&str, &str, &str),
    status_class: &str,
    at_ms: i64,
    n: u32,
    ms: f64,
) {
    let labels = [("platform", platform), ("method", method), ("route", route)];
    let mut with_class = labels.to_vec();
    with_class.push(("status_class", status_class));
    let requests = store
        .get_or_register(
            HTTP_REQUESTS,
            &with_class,
            crate::store::SeriesKind::Counter,
        )
        .expect("counter");
    let durations = store
        .get_or_register(
            HTTP_DURATION,
            &labels,
            crate::store::SeriesKind::Distribution,
        )
        .expect("distribution");
    for _ in 0..n {
        store.add(requests, at_ms, 1.0).expect("accepted");
        store.observe(durations, at_ms, ms).expect("accepted");
    }
}

fn series_query(platform: Option<&str>, window: &str) -> MetricsQuery {
    MetricsQuery {
        platform: platform.map(str::to_owned),
        window: Some(window.to_owned()),
        step: None,
    }
}

#[test]
fn the_series_view_buckets_requests_errors_and_latency_per_route_and_platform() {
    let (view, _, _) = view(&TrafficConfig::default());
    let store = view.store();
    let deals = ("tackle.io", "GET", "/api/v1/tackle/deals");
    let leads = ("tackle.io", "POST", "/api/v1/leads");
    let health = ("other", "GET", "/health");
    // Minute boundaries in the 5-minute window: the first point starts at the first one
    // after its start, the last ends now.
    let first = (NOW_MS + 1 - 5 * MINUTE_MS).div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
    let minute = |k: i64| first + k * MINUTE_MS;
    // Before the first point: inside the window, but not in a whole step of it.
    write_requests(store, deals, "2xx", first - 1_000, 7, 1.0);
    // Minute 0: 4 deals at 10 ms, 1 failed at 30 ms; 2 leads at 50 ms.
    write_requests(store, deals, "2xx", minute(0) + 5_000, 4, 10.0);
    write_requests(store, deals, "5xx", minute(0) + 59_000, 1, 30.0);
    write_requests(store, leads, "2xx", minute(0), 2, 50.0);
    // Minute 2: 6 deals at 20 ms.
    write_requests(store, deals, "2xx", minute(2) + 30_000, 6, 20.0);
    // The minute being filled: 3 health checks of `other` at 1 ms.
    write_requests(store, health, "2xx", NOW_MS, 3, 1.0);

    let answer = view
        .metrics_series_view_at(&series_query(None, "5m"), "1m", NOW_MS)
        .expect("series");
    assert_eq!(answer.window_seconds, 300);
    assert_eq!((answer.step_ms, answer.min_step_ms), (60_000, 10_000));
    assert_eq!(answer.from_unix_ms, first);
    assert_eq!(answer.to_unix_ms, NOW_MS + 1);
    assert!(answer.complete);
    let platforms: Vec<&str> = answer
        .platforms
        .iter()
        .map(|p| p.platform.as_str())
        .collect();
    assert_eq!(platforms, ["other", "tackle.io"]);
    let tackle = &answer.platforms[1];
    // Busiest route first.
    let routes: Vec<&str> = tackle.routes.iter().map(|r| r.route.as_str()).collect();
    assert_eq!(routes, ["/api/v1/tackle/deals", "/api/v1/leads"]);
    let starts: Vec<i64> = tackle.points.iter().map(|p| p.at_unix_ms).collect();
    assert_eq!(starts, (0..5).map(minute).collect::<Vec<_>>());
    for series in std::iter::once(&tackle.points)
        .chain(tackle.routes.iter().map(|r| &r.points))
        .chain(answer.platforms[0].routes.iter().map(|r| &r.points))
    {
        assert_eq!(series.len(), 5, "every series has the same points");
    }

    // Counts are exact; rates are per second of the step.
    let counts = |points: &[views::SeriesPoint]| -> Vec<(Option<u64>, Option<u64>)> {
        points.iter().map(|p| (p.requests, p.errors)).collect()
    };
    let deals_points = &tackle.routes[0].points;
    let zero = (Some(0), Some(0));
    assert_eq!(
        counts(deals_points),
        [(Some(5), Some(1)), zero, (Some(6), Some(0)), zero, zero]
    );
    assert_eq!(
        counts(&tackle.routes[1].points),
        [(Some(2), Some(0)), zero, zero, zero, zero],
        "no 5xx series: zero errors"
    );
    assert_eq!(
        counts(&tackle.points),
        [(Some(7), Some(1)), zero, (Some(6), Some(0)), zero, zero]
    );
    assert_eq!(deals_points[0].rate_per_second, Some(5.0 / 60.0));
    assert_eq!(deals_points[0].error_rate, Some(0.2));
    assert_eq!(deals_points[1].error_rate, Some(0.0));
    // The last point is the minute being filled: its rate is over the part elapsed.
    let other = &answer.platforms[0].points[4];
    assert_eq!(other.requests, Some(3));
    let elapsed_s = (NOW_MS + 1 - minute(4)) as f64 / 1000.0;
    let rate = other.rate_per_second.expect("rate");
    assert!((rate - 3.0 / elapsed_s).abs() < 1e-9, "{rate}");

    // Percentiles: within the sketch's relative error of the exact nearest-rank ones.
    let close = |got: Option<f64>, exact: f64| {
        got.is_some_and(|ms| (ms - exact).abs() <= exact * RELATIVE_ERROR_BOUND + 1e-3)
    };
    // Deals, minute 0: 10, 10, 10, 10, 30.
    assert!(close(deals_points[0].p50_ms, 10.0), "{:?}", deals_points[0]);
    assert!(close(deals_points[0].p95_ms, 30.0), "{:?}", deals_points[0]);
    assert!(close(deals_points[0].p99_ms, 30.0), "{:?}", deals_points[0]);
    assert!(close(deals_points[2].p50_ms, 20.0), "{:?}", deals_points[2]);
    assert_eq!(deals_points[1].p50_ms, None, "no requests, no percentiles");
    // The platform, minute 0: deals' and leads' sketches merged: 10 ×4, 30, 50 ×2.
    let total = &tackle.points[0];
    assert!(close(total.p50_ms, 10.0), "{total:?}");
    assert!(close(total.p95_ms, 50.0), "{total:?}");

    // One platform only.
    let answer = view
        .metrics_series_view_at(&series_query(Some("other"), "5m"), "1m", NOW_MS)
        .expect("series");
    assert_eq!(answer.platforms.len(), 1);
    assert_eq!(answer.platforms[0].routes[0].route, "/health");
    // A step that is not a multiple of the buckets is rounded up to one; the points still
    // count every request from their first start on, exactly.
    let answer = view
        .metrics_series_view_at(&series_query(None, "5m"), "45", NOW_MS)
        .expect("series");
    assert_eq!(answer.step_ms, 50_000);
    assert_eq!(answer.platforms[1].points.len(), 6);
    let summed: u64 = answer.platforms[1]
        .points
        .iter()
        .filter_map(|p| p.requests)
        .sum();
    let written = [
        (first - 1_000, 7),
        (minute(0) + 5_000, 4),
        (minute(0) + 59_000, 1),
        (minute(0), 2),
        (minute(2) + 30_000, 6),
    ];
    let expected: u64 = written
        .iter()
        .filter(|(at, _)| *at >= answer.from_unix_ms)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(summed, expected);
}

#[test]
fn a_long_window_is_read_from_a_coarse_tier() {
    let (view, _, _) = view(&TrafficConfig::default());
    let deals = ("tackle.io", "GET", "/api/v1/tackle/deals");
    // Ten days ago (written first: the finest tiers only take what is newer than they keep
    // once they have moved on), then now.
    let old = NOW_MS - 10 * DAY_MS;
    write_requests(view.store(), deals, "5xx", old, 4, 100.0);
    write_requests(view.store(), deals, "2xx", NOW_MS - 1_000, 1, 5.0);

    // 30 days: counters are kept at 5 min and sketches at 1 h that long, so 1 h is the
    // finest step.
    let query = series_query(Some("tackle.io"), "30d");
    assert_eq!(
        view.metrics_series_view_at(&query, "5m", NOW_MS)
            .expect_err("too fine"),
        ViewError::StepTooFine {
            step_ms: 300_000,
            min_step_ms: HOUR_MS as u64,
            window_seconds: 30 * 86_400,
        }
    );
    let answer = view
        .metrics_series_view_at(&query, "1h", NOW_MS)
        .expect("series");
    assert_eq!((answer.step_ms, answer.min_step_ms), (3_600_000, 3_600_000));
    assert!(answer.complete);
    let points = &answer.platforms[0].points;
    assert_eq!(points.len(), 720);
    let hour_of_old = old.div_euclid(HOUR_MS) * HOUR_MS;
    let at_old = points
        .iter()
        .find(|p| p.at_unix_ms == hour_of_old)
        .expect("the hour ten days ago");
    assert_eq!((at_old.requests, at_old.errors), (Some(4), Some(4)));
    assert_eq!(at_old.error_rate, Some(1.0));
    assert!(
        at_old
            .p50_ms
            .is_some_and(|ms| (ms - 100.0).abs() <= 100.0 * RELATIVE_ERROR_BOUND),
        "{at_old:?}"
    );
    let total: u64 = points.iter().filter_map(|p| p.requests).sum();
    assert_eq!(total, 5);

    // One day: counters at 10 s, sketches at 5 min: steps of 5 min, 7 min rounds up to 10.
    let day = series_query(None, "1d");
    let answer = view
        .metrics_series_view_at(&day, "7m", NOW_MS)
        .expect("series");
    assert_eq!((answer.step_ms, answer.min_step_ms), (600_000, 300_000));
    assert_eq!(answer.platforms[0].points.len(), 144);
}

#[test]
fn bad_steps_and_windows_are_refused_with_a_reason() {
    let (view, _, _) = view(&TrafficConfig::default());
    let refused = |window: &str, step: &str| {
        view.metrics_series_view_at(&series_query(None, window), step, NOW_MS)
            .expect_err("refused")
    };
    assert_eq!(refused("5m", "5 s"), ViewError::BadStep("5 s".to_owned()));
    assert_eq!(refused("5m", "0s"), ViewError::BadStep("0s".to_owned()));
    assert_eq!(
        refused("5 m", "10s"),
        ViewError::BadWindow("5 m".to_owned())
    );
    assert_eq!(
        refused("1h", "1s"),
        ViewError::StepTooFine {
            step_ms: 1_000,
            min_step_ms: 10_000,
            window_seconds: 3_600
        }
    );
    assert_eq!(
        refused("1h", "2h"),
        ViewError::StepLongerThanWindow {
            step_ms: 7_200_000,
            window_seconds: 3_600
        }
    );
    let message = refused("1d", "1m").to_string();
    assert_eq!(
        message,
        "step 60000 ms is finer than the 300000 ms buckets the metrics store keeps over a \
         86400 s window: use a step of at least 300000 ms"
    );
    assert!(matches!(
        view.metrics_series_view_at(&series_query(Some("nope"), "5m"), "1m", NOW_MS),
        Err(ViewError::UnknownPlatform(_))
    ));
    assert!(refused("5m", "1x").is_bad_request());
}

#[test]
fn the_series_view_caps_its_points() {
    // 1 s buckets kept 1,000 s (and used for longer windows too, incomplete), so a fine
    // step over a long window is possible.
    let tiers = vec![crate::store::TierConfig::new(1_000, 1_000_000)];
    let store = StoreHandle::new(StoreConfig {
        tiers: tiers.clone(),
        distribution_tiers: tiers,
        ..StoreConfig::default()
    })
    .expect("store");
    let view = TrafficView::new(store, Platforms::new(&[]), 20);
    assert_eq!(
        view.metrics_series_view_at(&series_query(None, "1h"), "1s", NOW_MS)
            .expect_err("too many"),
        ViewError::TooManyPoints {
            window_seconds: 3_600,
            step_ms: 1_000,
            points: 3_600,
            min_step_ms: 4_000,
        }
    );
    let at_most = view
        .metrics_series_view_at(&series_query(None, "1000s"), "1s", NOW_MS)
        .expect("1000 points");
    assert!(at_most.platforms.is_empty());
    // 100 routes and their platform at 1,000 points each pass the answer's cap.
    for i in 0..100 {
        let route = format!("/r{i}");
        write_requests(
            view.store(),
            ("other", "GET", &route),
            "2xx",
            NOW_MS,
            1,
            1.0,
        );
    }
    assert_eq!(
        view.metrics_series_view_at(&series_query(None, "1000s"), "1s", NOW_MS)
            .expect_err("too large"),
        ViewError::AnswerTooLarge {
            series: 101,
            points: 1_000
        }
    );
    let answer = view
        .metrics_series_view_at(&series_query(None, "1000s"), "2s", NOW_MS)
        .expect("500 points");
    assert_eq!(answer.platforms[0].routes.len(), 100);
    assert_eq!(answer.platforms[0].points.len(), 500);
}

#[test]
fn requests_that_started_before_shedding_ended_are_not_waiting() {
    let (view, mut recorder, metrics) = view(&TrafficConfig::default());
    let waiting = |view: &TrafficView| view.health(60).unanswered;
    let before = exchange("/api/v1/leads/1", None, 200, now_ns(), 0).request;
    recorder.set_in_flight(vec![(at(1), before.clone())], 0);
    assert_eq!(
        waiting(&view),
        1,
        "seen waiting while every connection is kept"
    );
    // While the capture sheds, its connection may be shed with its answer: not waiting.
    metrics.set_capture_shedding(true);
    recorder.set_in_flight(vec![(at(1), before.clone())], 0);
    assert_eq!(waiting(&view), 0);
    let during = exchange("/api/v1/leads/2", None, 200, now_ns(), 0).request;
    recorder.set_in_flight(vec![(at(1), during.clone())], 0);
    assert_eq!(waiting(&view), 0);
    // Every connection kept again: what started before stays out, what starts after counts.
    metrics.set_capture_shedding(false);
    let after = exchange("/api/v1/leads/3", None, 200, now_ns() + 1, 0).request;
    recorder.set_in_flight(vec![(at(1), before), (at(1), during), (at(1), after)], 0);
    assert_eq!(waiting(&view), 1);
    assert_eq!(view.traces_view().in_flight.len(), 1);
}
