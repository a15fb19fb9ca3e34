//! The daemon's HTTP numbers are the backend's real traffic: a load generator drives a known
//! mix (five platforms and `other`, several routes, 2xx/4xx, 500s injected by the `errors`
//! fault, 20 ms routes from `slow_query`) and the daemon's request counts per (platform,
//! method, route, status) must equal what the generator got back, exactly; its latency
//! percentiles per route must agree with the generator's within what the two vantage points
//! allow; the admin API's time series of each route must add up to what was sent; and the
//! traces must show the generator's own socket address as each request's peer and the
//! database's address on the queries a request ran. Once on connections opened after the
//! daemon, once on connections older than it (whose addresses come from procfs).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

use selfheal_e2e::{
    free_port, http_request_counts, json_f64,
    load::{self, Amount, Call, Key, Mix, Report, RouteKey},
    require_root, sample, wait_for, wait_stable, Daemon, DemoBackend, KeepAlive, PgCluster,
    DEMO_PLATFORMS,
};

/// The series view's query: every platform over a window that holds the whole test, in
/// the finest steps the store keeps for it.
const SERIES: &str = "/api/v1/system/metrics?window=15m&step=10s";
/// How long the request whose trace is checked sleeps in PostgreSQL: far slower than any
/// other, so it tops the slowest list.
const TRACED_MS: u64 = 300;

/// Keep-alive connections of the generator.
const CONNECTIONS: usize = 4;
/// Requests of the measured run (75 cycles of the mix).
const REQUESTS: u64 = 1200;
/// `slow_query`: these routes sleep this long in Postgres, so their latencies stand well
/// above the noise and their percentiles can be compared in relative terms.
const SLOW_QUERY: &str = "slow_query?ms=20&path=/api/v1/tackle/deals,/api/v1/campaigns";
/// The first this many `/api/` requests of the measured run answer 500.
const INJECTED_ERRORS: u64 = 30;
/// The sketches behind the admin API's percentiles promise at most this relative error.
const SKETCH_ERROR: f64 = 0.06;
/// How much longer the client may see a request than the server's sockets do, in ms.
///
/// The daemon times a request from its first byte read by the backend to the first byte of
/// the answer written; the generator from just before its write to the first byte it can
/// read. The daemon's span lies inside ours, so its percentiles cannot exceed ours (beyond
/// the sketch's error); ours are longer by the loopback transit and the wake-ups of the two
/// threads, which on this 2-core machine (four client threads, the backend's runtime,
/// Postgres and the daemon all busy) stays within a few milliseconds for almost all
/// requests. [`rank_slack`] covers the few that waited longer.
const TRANSIT_MS: f64 = 3.0;

/// How many ranks a percentile may move: one for the difference between percentile
/// definitions (nearest rank here, the sketch's own rank there), plus 2 % of the requests
/// for those whose transit exceeded [`TRANSIT_MS`] (a request that is late on our side only
/// moves down in the daemon's order, by at most one rank per such request).
fn rank_slack(n: usize) -> usize {
    2 + n / 50
}

fn mix() -> Mix {
    let deals = "/api/v1/tackle/deals";
    Mix::new(vec![
        (3, Call::get("api.tackle.io", deals, "tackle.io", deals)),
        // Host decides the platform; `leadsite.io` has no path prefix.
        (
            2,
            Call::get(
                "leadsite.io",
                "/api/v1/campaigns",
                "leadsite.io",
                "/api/v1/campaigns",
            ),
        ),
        // Two ids, one route template. Campaigns 1 and 2 are leadsite.ai's (seeded first).
        (
            1,
            Call::get(
                "api.leadsite.ai",
                "/api/v1/campaigns/1",
                "leadsite.ai",
                "/api/v1/campaigns/:id",
            ),
        ),
        (
            1,
            Call::get(
                "api.leadsite.ai",
                "/api/v1/campaigns/2",
                "leadsite.ai",
                "/api/v1/campaigns/:id",
            ),
        ),
        // One route, two statuses: lead 3 exists, 999999 does not (404 after a query).
        (
            2,
            Call::get(
                "leadsite.ai",
                "/api/v1/leads/3",
                "leadsite.ai",
                "/api/v1/leads/:id",
            ),
        ),
        (
            1,
            Call::get(
                "leadsite.ai",
                "/api/v1/leads/999999",
                "leadsite.ai",
                "/api/v1/leads/:id",
            ),
        ),
        // No known host: the path prefix decides; and neither host nor path: `other`.
        (
            2,
            Call::get(
                "localhost",
                "/api/v1/videos",
                "videosite.io",
                "/api/v1/videos",
            ),
        ),
        (
            1,
            Call::get(
                "clientcontact.io",
                "/api/v1/conversations",
                "clientcontact.io",
                "/api/v1/conversations",
            ),
        ),
        (
            1,
            Call::get("localhost", "/api/v1/websites", "other", "/api/v1/websites"),
        ),
        (
            1,
            Call::post(
                "api.tackle.io",
                "/api/v1/leads",
                r#"{"email":"load@example.com","name":"Load Test"}"#,
                "tackle.io",
                "/api/v1/leads",
            ),
        ),
        // A route the backend does not have: 404 from its fallback, templated all the same.
        (
            1,
            Call::get(
                "api.tackle.io",
                "/api/v1/reports/2024",
                "tackle.io",
                "/api/v1/reports/:id",
            ),
        ),
    ])
}

/// The generator's connections run back to back and leave no CPU idle: with the default
/// `shed_below_idle_percent` the capture could shed some of them, so exact counts are asked
/// of a daemon that never sheds for the host's load (`payload_capture.rs` tests shedding).
fn start_daemon(backend: &DemoBackend) -> Daemon {
    Daemon::capturing(
        backend,
        512,
        &format!("shed_below_idle_percent = 0\n{DEMO_PLATFORMS}"),
    )
    .expect("daemon capturing the backend")
}

fn counts(daemon: &Daemon) -> BTreeMap<Key, u64> {
    http_request_counts(&daemon.metrics().expect("metrics"))
}

/// `after - before`, without the label sets that did not move.
fn delta(before: &BTreeMap<Key, u64>, after: &BTreeMap<Key, u64>) -> BTreeMap<Key, u64> {
    after
        .iter()
        .map(|(key, n)| {
            (
                key.clone(),
                n - before.get(key).copied().unwrap_or(0).min(*n),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// A table of expected and counted requests per label set, marking the differences.
fn comparison(expected: &BTreeMap<Key, u64>, got: &BTreeMap<Key, u64>) -> String {
    let keys: BTreeSet<&Key> = expected.keys().chain(got.keys()).collect();
    let mut out = format!(
        "{:<60} {:>9} {:>9}\n",
        "platform method route status", "expected", "daemon"
    );
    for key in keys {
        let (e, g) = (
            expected.get(key).copied().unwrap_or(0),
            got.get(key).copied().unwrap_or(0),
        );
        let _ = writeln!(
            out,
            "{:<60} {e:>9} {g:>9}{}",
            key.to_string(),
            if e == g { "" } else { "   <- differs" }
        );
    }
    out
}

/// The whole scenario, on `conns` (fresh or older than the daemon).
fn check_http_accuracy(
    daemon: &Daemon,
    backend: &DemoBackend,
    pg: &PgCluster,
    conns: &mut [KeepAlive],
) {
    let mix = mix();
    // Every series the daemon had before this scenario (none for a fresh daemon, but the
    // requests before it started are not the daemon's to count).
    let start = counts(daemon);

    backend.fault(SLOW_QUERY).expect("slow_query");
    // Warm-up: every call of the mix once, on the same connections the run will use.
    let warmup = load::run_on(conns, &mix, Amount::Requests(mix.cycle())).expect("warm-up");
    backend
        .fault(&format!("errors?count={INJECTED_ERRORS}"))
        .expect("errors fault");
    // The warm-up and the two fault switches (plain requests to the backend too, under
    // `other`) must all show up before the baseline is taken.
    let shown = warmup.total() + 2;
    let baseline = wait_stable(
        "the warm-up requests in the daemon's counters",
        Duration::from_secs(20),
        Duration::from_millis(500),
        || Ok(counts(daemon)),
        |now| delta(&start, now).values().sum::<u64>() >= shown,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nwarm-up sent:\n{}\nthe daemon counted since the start:\n{}",
            warmup.table(),
            comparison(&warmup.counts(), &delta(&start, &counts(daemon)))
        )
    });
    let histogram_baseline = daemon.metrics().expect("metrics");

    let run = load::run_on(conns, &mix, Amount::Requests(REQUESTS)).expect("load");
    println!(
        "load: {} requests on {} connections in {:.2} s\n{}",
        run.total(),
        conns.len(),
        run.elapsed.as_secs_f64(),
        run.table()
    );
    assert_eq!(
        run.counts()
            .iter()
            .filter(|(k, _)| k.status == 500)
            .map(|(_, n)| n)
            .sum::<u64>(),
        INJECTED_ERRORS,
        "the errors fault failed exactly the first {INJECTED_ERRORS} requests"
    );

    // The counters, every label set: equal, not close.
    let expected = run.counts();
    let mut last = BTreeMap::new();
    let matched = wait_for(
        "the daemon's request counters to reach the generator's",
        Duration::from_secs(30),
        || {
            last = delta(&baseline, &counts(daemon));
            (last == expected).then_some(())
        },
    );
    let table = comparison(&expected, &last);
    println!("requests per label set, measured run:\n{table}");
    matched.unwrap_or_else(|e| {
        panic!(
            "{e}: selfheal_http_requests_total deltas differ:\n{table}\nlosses:\n{}",
            daemon.losses()
        )
    });
    // Nothing counted twice or late: still equal a moment later.
    std::thread::sleep(Duration::from_secs(1));
    let later = delta(&baseline, &counts(daemon));
    assert_eq!(
        later,
        expected,
        "the counters moved after matching:\n{}",
        comparison(&expected, &later)
    );

    // The exposition's label order is part of the contract (dashboards match on it).
    let deals = Key {
        platform: "tackle.io".into(),
        method: "GET".into(),
        route: "/api/v1/tackle/deals".into(),
        status: 200,
    };
    let line = "selfheal_http_requests_total{platform=\"tackle.io\",method=\"GET\",route=\"/api/v1/tackle/deals\",status=\"200\"}";
    let text = daemon.metrics().expect("metrics");
    assert_eq!(
        sample(&text, line).map(|v| v.round() as u64),
        Some(baseline.get(&deals).copied().unwrap_or(0) + expected[&deals]),
        "{line} with its labels in this order"
    );

    check_histograms(&histogram_baseline, &text, &run);

    // The admin API: the window holds the warm-up and the run (the daemon started moments
    // ago), so its numbers are compared with both.
    let mut both = warmup.clone();
    both.merge(&run);
    check_api(daemon, &both);
    check_series(daemon, &both);
    check_peers(daemon, backend, pg, conns, &mix);
}

/// The series view: each route's points add up to exactly what the generator sent, and
/// each platform's own points to its routes'. A step finer than the store keeps over a
/// window is refused with the reason.
fn check_series(daemon: &Daemon, sent: &Report) {
    let routes = sent.routes();
    let mut last = serde_json::Value::Null;
    let found = wait_for(
        &format!("{SERIES} to count every request sent"),
        Duration::from_secs(20),
        || {
            last = daemon.api(SERIES).ok()?;
            routes
                .iter()
                .all(|route| {
                    series_requests(&last, route) == Some(sent.latencies(route).len() as u64)
                })
                .then_some(())
        },
    );
    let mut table = format!(
        "{:<60} {:>9} {:>9}\n",
        "platform method route", "sent", "series"
    );
    for route in &routes {
        let _ = writeln!(
            table,
            "{:<60} {:>9} {:>9}",
            route.to_string(),
            sent.latencies(route).len(),
            series_requests(&last, route).map_or_else(|| "-".to_owned(), |n| n.to_string())
        );
    }
    println!("requests per route, summed over the series' points:\n{table}");
    found.unwrap_or_else(|e| panic!("{e}:\n{table}"));
    assert_eq!(last["step_ms"].as_u64(), Some(10_000), "{SERIES}: step_ms");
    assert_eq!(
        last["min_step_ms"].as_u64(),
        Some(10_000),
        "{SERIES}: min_step_ms"
    );
    assert_eq!(last["complete"], true, "{SERIES}: complete");
    let sum = |points: &serde_json::Value| -> u64 {
        points
            .as_array()
            .map_or(0, |p| p.iter().filter_map(|p| p["requests"].as_u64()).sum())
    };
    for platform in last["platforms"].as_array().expect("platforms") {
        let points = platform["points"].as_array().expect("points");
        assert_eq!(
            points.len(),
            90,
            "15 minutes of 10 s points, the first rounded up"
        );
        let by_route: u64 = platform["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .map(|r| sum(&r["points"]))
            .sum();
        assert_eq!(
            sum(&platform["points"]),
            by_route,
            "{}: the platform's points add up its routes'",
            platform["platform"]
        );
    }

    let (status, body) = daemon
        .api_answer("/api/v1/system/metrics?window=30d&step=1m")
        .expect("answer");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["success"], false, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("use a step of at least 3600000 ms"),
        "a 30-day window is kept in 1 h buckets: {message}"
    );
}

/// Requests of `route` summed over its points in the series view.
fn series_requests(data: &serde_json::Value, route: &RouteKey) -> Option<u64> {
    let entry = data["platforms"]
        .as_array()?
        .iter()
        .find(|p| p["platform"] == route.platform.as_str())?["routes"]
        .as_array()?
        .iter()
        .find(|r| r["method"] == route.method.as_str() && r["route"] == route.route.as_str())?;
    Some(
        entry["points"]
            .as_array()?
            .iter()
            .filter_map(|p| p["requests"].as_u64())
            .sum(),
    )
}

/// The traces: a slow request sent on a known connection shows that connection's local
/// address (the generator's side) as its peer, and the queries it ran show the database's
/// address; every traced request of the mix came from one of the generator's connections.
fn check_peers(
    daemon: &Daemon,
    backend: &DemoBackend,
    pg: &PgCluster,
    conns: &mut [KeepAlive],
    mix: &Mix,
) {
    let locals: BTreeSet<String> = conns
        .iter()
        .map(|c| c.local_addr().expect("local address").to_string())
        .collect();
    let deals = "/api/v1/tackle/deals";
    backend
        .fault(&format!("slow_query?ms={TRACED_MS}&path={deals}"))
        .expect("slow_query");
    let conn = conns.last_mut().expect("a connection");
    let me = conn.local_addr().expect("local address").to_string();
    assert_eq!(conn.get(deals, "api.tackle.io").expect("request"), 200);
    backend.fault("clear").expect("clear the faults");

    let mut last = serde_json::Value::Null;
    let trace = wait_for(
        "the slow request in the traces",
        Duration::from_secs(10),
        || {
            last = daemon.api("/api/v1/system/traces").ok()?;
            last["slowest"].as_array()?.iter().find_map(|t| {
                (t["route"] == deals && t["duration_ms"].as_f64()? >= TRACED_MS as f64)
                    .then(|| t.clone())
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}; last answer: {last:#}"));
    println!("traced: {trace:#}");
    assert_eq!(
        trace["peer"].as_str(),
        Some(me.as_str()),
        "the request's peer is the generator's end of its connection: {trace}"
    );
    let database = format!("127.0.0.1:{}", pg.port);
    let queries = trace["queries"].as_array().expect("queries");
    assert!(
        !queries.is_empty(),
        "a request alone on the backend has its queries tied to it: {trace}"
    );
    for query in queries {
        assert_eq!(
            query["server"].as_str(),
            Some(database.as_str()),
            "a query's server is the database the backend's pool connected to: {query}"
        );
    }

    let mix_routes: BTreeSet<(String, &str)> = mix
        .calls()
        .iter()
        .map(|c| (c.platform.clone(), c.route.as_str()))
        .collect();
    let slowest = last["slowest"].as_array().expect("slowest");
    for trace in slowest {
        let key = (
            trace["platform"].as_str().unwrap_or_default().to_owned(),
            trace["route"].as_str().unwrap_or_default(),
        );
        if mix_routes.contains(&key) {
            let peer = trace["peer"].as_str().unwrap_or("null");
            assert!(
                locals.contains(peer),
                "{key:?} traced from {peer}, not one of the generator's connections {locals:?}"
            );
        }
    }
}

/// `selfheal_http_request_duration_seconds`: per status class, the histogram counted every
/// request, and its sum of server-side durations cannot exceed our client-side sum.
fn check_histograms(before: &str, after: &str, run: &Report) {
    let series = |text: &str, suffix: &str| -> BTreeMap<(RouteKey, String), f64> {
        selfheal_e2e::openmetrics::samples(
            text,
            &format!("selfheal_http_request_duration_seconds_{suffix}"),
        )
        .into_iter()
        .filter_map(|s| {
            let route = RouteKey {
                platform: s.label("platform")?.to_owned(),
                method: s.label("method")?.to_owned(),
                route: s.label("route")?.to_owned(),
            };
            Some(((route, s.label("status_class")?.to_owned()), s.value))
        })
        .collect()
    };
    let (count_0, count_1) = (series(before, "count"), series(after, "count"));
    let (sum_0, sum_1) = (series(before, "sum"), series(after, "sum"));
    for route in run.routes() {
        for (class, n) in run.status_classes(&route) {
            let key = (route.clone(), class.clone());
            let counted = count_1.get(&key).copied().unwrap_or(0.0)
                - count_0.get(&key).copied().unwrap_or(0.0);
            assert_eq!(
                counted.round() as u64,
                n,
                "selfheal_http_request_duration_seconds_count for {route} {class}"
            );
            let server_s =
                sum_1.get(&key).copied().unwrap_or(0.0) - sum_0.get(&key).copied().unwrap_or(0.0);
            let client_s: f64 = run
                .counts()
                .keys()
                .filter(|k| k.route_key() == route && k.status_class() == class)
                .map(|k| run.latencies_of(k).sum() / 1000.0)
                .sum();
            println!(
                "{route} {class}: {n} requests, server-side sum {server_s:.4} s, client-side sum {client_s:.4} s"
            );
            assert!(
                server_s <= client_s * 1.01 + 0.001,
                "{route} {class}: the daemon's summed durations ({server_s:.4} s) exceed what \
                 the client measured around the same requests ({client_s:.4} s)"
            );
        }
    }
}

/// `/api/v1/system/metrics` per platform: counts equal, percentiles within tolerance.
fn check_api(daemon: &Daemon, sent: &Report) {
    let routes = sent.routes();
    let platforms: BTreeSet<&str> = routes.iter().map(|r| r.platform.as_str()).collect();
    for platform in platforms {
        let path = format!("/api/v1/system/metrics?platform={platform}&window=5m");
        let mine: Vec<&RouteKey> = routes.iter().filter(|r| r.platform == platform).collect();
        // The API may trail the counters by a flush: wait for its counts to get there.
        let mut last = serde_json::Value::Null;
        let found = wait_for(
            &format!("{path} to count every request of {platform}"),
            Duration::from_secs(20),
            || {
                last = daemon.api(&path).ok()?;
                mine.iter()
                    .all(|route| {
                        api_route(&last, route).is_some_and(|r| {
                            r["requests"].as_u64() == Some(sent.latencies(route).len() as u64)
                        })
                    })
                    .then_some(())
            },
        );
        found.unwrap_or_else(|e| panic!("{e}; last answer: {last:#}"));
        assert_eq!(
            last["window_seconds"].as_u64(),
            Some(300),
            "{path}: window_seconds"
        );
        for route in mine {
            let entry = api_route(&last, route).expect("found above");
            check_api_route(route, entry, sent);
        }
    }
}

fn api_route<'a>(data: &'a serde_json::Value, route: &RouteKey) -> Option<&'a serde_json::Value> {
    data["platforms"]
        .as_array()?
        .iter()
        .find(|p| p["platform"] == route.platform.as_str())?["routes"]
        .as_array()?
        .iter()
        .find(|r| r["method"] == route.method.as_str() && r["route"] == route.route.as_str())
}

fn check_api_route(route: &RouteKey, entry: &serde_json::Value, sent: &Report) {
    let latencies = sent.latencies(route);
    let classes = sent.status_classes(route);
    let errors = classes.get("5xx").copied().unwrap_or(0);
    assert_eq!(
        entry["errors"].as_u64(),
        Some(errors),
        "{route}: errors (5xx) in {entry}"
    );
    for (class, n) in &classes {
        assert_eq!(
            entry["status_classes"][class].as_u64(),
            Some(*n),
            "{route}: status_classes.{class} in {entry}"
        );
    }
    let slack = rank_slack(latencies.len());
    for (q, field) in [(0.50, "p50_ms"), (0.95, "p95_ms")] {
        let daemon_ms = json_f64(&entry[field], field);
        let (lo, hi) = latencies.envelope(q, slack);
        let low = ((lo - TRANSIT_MS) * (1.0 - SKETCH_ERROR)).max(0.0);
        let high = hi * (1.0 + SKETCH_ERROR);
        println!(
            "{route}: {field} daemon {daemon_ms:.3}, generator {:.3} (ranks ±{slack}: {lo:.3}..{hi:.3}), allowed {low:.3}..{high:.3}, n = {}, rate {}/s",
            latencies.percentile(q),
            latencies.len(),
            entry["rate_per_second"]
        );
        assert!(
            (low..=high).contains(&daemon_ms),
            "{route}: the daemon's {field} {daemon_ms:.3} ms is outside {low:.3}..{high:.3} ms \
             (generator: {:.3} ms at the percentile, {lo:.3}..{hi:.3} within ±{slack} ranks)",
            latencies.percentile(q)
        );
    }
}

#[test]
fn http_counts_and_latencies_match_the_load_generator() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    let daemon = start_daemon(&backend);
    let mut conns: Vec<KeepAlive> = (0..CONNECTIONS)
        .map(|_| KeepAlive::connect(backend.address).expect("connect"))
        .collect();
    check_http_accuracy(&daemon, &backend, &pg, &mut conns);
}

#[test]
fn http_counts_and_latencies_match_on_connections_older_than_the_daemon() {
    require_root();
    let pg = PgCluster::start().expect("postgres");
    let backend = DemoBackend::start(&pg.url(), free_port().expect("port")).expect("demo backend");
    // Opened and used before the daemon exists: the kernel never showed it these accepts.
    let mut conns: Vec<KeepAlive> = (0..CONNECTIONS)
        .map(|_| {
            let mut conn = KeepAlive::connect(backend.address).expect("connect");
            assert_eq!(
                conn.get("/api/v1/tackle/deals", "api.tackle.io")
                    .expect("request"),
                200
            );
            conn
        })
        .collect();
    let daemon = start_daemon(&backend);
    check_http_accuracy(&daemon, &backend, &pg, &mut conns);
}
