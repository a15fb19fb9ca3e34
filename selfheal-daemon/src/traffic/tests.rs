//! The recorder and the views together, on exchanges and queries as the decoders emit them.
// The views round milliseconds to the microsecond, so the values compared here are exact.
#![allow(clippy::float_cmp)]

use std::sync::Arc;

use super::*;
use crate::{
    config::{PlatformConfig, TrafficConfig},
    probes::capture::Decoded,
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
    let platforms = Platforms::new(&[PlatformConfig {
        name: "tackle.io".to_owned(),
        hosts: vec!["api.tackle.io".to_owned()],
        path_prefixes: vec!["/api/v1/tackle".to_owned()],
        health_url: None,
    }]);
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
        decoded.http.push((1, exchange(&path, None, 200, t, ms)));
    }
    decoded
        .http
        .push((1, exchange("/x", Some("api.tackle.io:8080"), 503, t, 5)));
    decoded.http.push((1, exchange("/health", None, 200, t, 1)));
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
        }),
        Err(ViewError::UnknownPlatform(_))
    ));
    assert!(matches!(
        view.metrics_view(&MetricsQuery {
            platform: None,
            window: Some("5 minutes".to_owned()),
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
    decoded.http.push((1, exchange("/a", None, 200, t, 1)));
    decoded.http.push((1, exchange("/b", None, 200, t, 1)));
    decoded.http.push((1, exchange("/c", None, 200, t, 1)));
    decoded.postgres.push((1, query("SELECT 1", t, 1, None)));
    decoded
        .postgres
        .push((1, query("SELECT 2 FROM t", t, 1, None)));
    decoded
        .postgres
        .push((1, query("SELECT 3 FROM u", t, 1, None)));
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
        .push((1, query("SELECT * FROM leads WHERE id = 1", t, 4, None)));
    decoded
        .postgres
        .push((1, query("select * from leads where id=2", t, 2, None)));
    decoded
        .postgres
        .push((1, query("SELECT * FROM missing", t, 1, Some("42P01"))));
    decoded.postgres.push((
        1,
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
    // Process 1: one request alone, two queries inside it.
    decoded.http.push((1, exchange("/slow", None, 200, t, 100)));
    decoded
        .postgres
        .push((1, query("SELECT 1", t + 10 * MS, 20, None)));
    decoded
        .postgres
        .push((1, query("SELECT 2 FROM t", t + 50 * MS, 30, Some("57014"))));
    // Process 2: two overlapping requests and one query: it cannot be attributed.
    decoded.http.push((2, exchange("/p2a", None, 200, t, 90)));
    decoded
        .http
        .push((2, exchange("/p2b", None, 200, t + 5 * MS, 10)));
    decoded
        .postgres
        .push((2, query("SELECT 3 FROM u", t + 6 * MS, 2, None)));
    recorder.record(&decoded);

    let traces = view.traces_view();
    let routes: Vec<&str> = traces.slowest.iter().map(|t| t.route.as_str()).collect();
    assert_eq!(routes, ["/slow", "/p2a", "/p2b"]);
    let slow = &traces.slowest[0];
    assert_eq!(slow.duration_ms, 100.0);
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
    assert!(traces.slowest[1].queries.is_empty());
    assert!(traces.slowest[2].queries.is_empty());
}
