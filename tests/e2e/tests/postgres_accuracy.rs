//! The daemon's PostgreSQL numbers are the backend's real queries: under a known HTTP load,
//! its per-fingerprint query counts equal what `pg_stat_statements` counted for the same
//! statements, exactly, on pool connections that were open before the daemon started; every
//! failing query shows with its SQLSTATE, and a refused password with its own.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use selfheal_daemon::protocols::fingerprint::fingerprint;
use selfheal_e2e::{
    free_port,
    load::{self, Amount, Call, Mix},
    openmetrics, require_root, wait_for, wait_stable, Daemon, DemoBackend, PgCluster, PgOptions,
    DEMO_PLATFORMS, PG_ROLE,
};
use serde_json::Value;

/// The backend's pool, all of it opened before the daemon starts.
const POOL: usize = 4;
/// Requests of the measured run.
const REQUESTS: u64 = 600;
/// Data requests that first run the `bad_query` fault's failing statement.
const BAD_QUERIES: u64 = 25;
/// Logins with a wrong password.
const BAD_PASSWORDS: u64 = 2;

/// A mix of the backend's routes whose SQL is entirely parameterised (`$1`, no literals), so
/// the text `pg_stat_statements` keeps (it replaces literals with `$n`) is the text the
/// backend sent, and fingerprinting either gives the same label. (`/health`'s `SELECT 1`
/// would not: the daemon sees `SELECT 1`, `pg_stat_statements` keeps `SELECT $1`.)
fn mix() -> Mix {
    let get = |host: &str, path: &str, route: &str| Call::get(host, path, "any", route);
    Mix::new(vec![
        (
            2,
            get(
                "api.tackle.io",
                "/api/v1/tackle/deals",
                "/api/v1/tackle/deals",
            ),
        ),
        (
            2,
            get("leadsite.io", "/api/v1/campaigns", "/api/v1/campaigns"),
        ),
        // Two statements: the campaign, then its lead count.
        (
            1,
            get(
                "api.leadsite.ai",
                "/api/v1/campaigns/1",
                "/api/v1/campaigns/:id",
            ),
        ),
        (
            2,
            get("leadsite.ai", "/api/v1/leads/3", "/api/v1/leads/:id"),
        ),
        // The same statement, no row: a 404.
        (
            1,
            get("leadsite.ai", "/api/v1/leads/999999", "/api/v1/leads/:id"),
        ),
        (1, get("leadsite.ai", "/api/v1/leads", "/api/v1/leads")),
        (1, get("videosite.io", "/api/v1/videos", "/api/v1/videos")),
        (
            1,
            get(
                "clientcontact.io",
                "/api/v1/conversations",
                "/api/v1/conversations",
            ),
        ),
        (
            1,
            get("leadsite.ai", "/api/v1/websites", "/api/v1/websites"),
        ),
        (
            1,
            Call::post(
                "api.tackle.io",
                "/api/v1/leads",
                r#"{"email":"load@example.com","name":"Load Test"}"#,
                "any",
                "/api/v1/leads",
            ),
        ),
        // Two statements: the user, then the new token.
        (
            1,
            Call::post(
                "api.tackle.io",
                "/api/v1/auth/login",
                r#"{"email":"alice@tackle.io","password":"demo1234"}"#,
                "any",
                "/api/v1/auth/login",
            ),
        ),
    ])
}

/// One statement as `pg_stat_statements` counted it.
#[derive(Debug, Clone)]
struct Counted {
    query: String,
    calls: u64,
    exec_ms: f64,
}

/// `pg_stat_statements` for the backend's role, by `queryid`.
fn pg_stat_statements(pg: &PgCluster) -> BTreeMap<String, Counted> {
    pg.psql_rows(&format!(
        "SELECT s.queryid, s.calls, s.total_exec_time, s.query FROM pg_stat_statements s \
         JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{PG_ROLE}'"
    ))
    .expect("pg_stat_statements")
    .into_iter()
    .map(|row| {
        let [id, calls, exec_ms, query] = <[String; 4]>::try_from(row).expect("four columns");
        let counted = Counted {
            query,
            calls: calls.parse().expect("calls"),
            exec_ms: exec_ms.parse().expect("total_exec_time"),
        };
        (id, counted)
    })
    .collect()
}

/// What `pg_stat_statements` counted between two snapshots, by fingerprint of its text:
/// (calls, execution time in ms).
fn server_delta(
    before: &BTreeMap<String, Counted>,
    after: &BTreeMap<String, Counted>,
) -> BTreeMap<String, (u64, f64)> {
    let mut by_fingerprint: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for (id, now) in after {
        let (calls, exec_ms) = before
            .get(id)
            .map_or((0, 0.0), |then| (then.calls, then.exec_ms));
        if now.calls > calls {
            let entry = by_fingerprint.entry(fingerprint(&now.query)).or_default();
            entry.0 += now.calls - calls;
            entry.1 += now.exec_ms - exec_ms;
        }
    }
    by_fingerprint
}

/// One entry of the daemon's `/api/v1/system/queries`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Tracked {
    fingerprint: String,
    count: u64,
    errors: u64,
    total_ms: f64,
    sqlstates: BTreeMap<String, u64>,
}

/// The daemon's query view: entries by `query_id`, and refused logins by SQLSTATE.
#[derive(Debug, Clone, Default, PartialEq)]
struct QueryView {
    queries: BTreeMap<String, Tracked>,
    auth_failures: BTreeMap<String, u64>,
}

fn counts_by_sqlstate(value: &Value) -> BTreeMap<String, u64> {
    value
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn query_view(daemon: &Daemon) -> anyhow::Result<QueryView> {
    let data = daemon.api("/api/v1/system/queries")?;
    let entries = data["queries"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no `queries` list in {data}"))?;
    let mut queries = BTreeMap::new();
    for q in entries {
        let id = q["query_id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("an entry without query_id: {q}"))?;
        queries.insert(
            id.to_owned(),
            Tracked {
                fingerprint: q["fingerprint"].as_str().unwrap_or_default().to_owned(),
                count: q["count"].as_u64().unwrap_or(0),
                errors: q["errors"].as_u64().unwrap_or(0),
                total_ms: q["total_ms"].as_f64().unwrap_or(0.0),
                sqlstates: counts_by_sqlstate(&q["sqlstates"]),
            },
        );
    }
    Ok(QueryView {
        queries,
        auth_failures: counts_by_sqlstate(&data["auth_failures"]),
    })
}

/// `after - before` per query id, only the entries that moved.
fn daemon_delta(before: &QueryView, after: &QueryView) -> BTreeMap<String, Tracked> {
    after
        .queries
        .iter()
        .filter_map(|(id, now)| {
            let then = before.queries.get(id).cloned().unwrap_or_default();
            (now.count > then.count).then(|| {
                let sqlstates = now
                    .sqlstates
                    .iter()
                    .map(|(s, n)| (s.clone(), n - then.sqlstates.get(s).copied().unwrap_or(0)))
                    .filter(|(_, n)| *n > 0)
                    .collect();
                let tracked = Tracked {
                    fingerprint: now.fingerprint.clone(),
                    count: now.count - then.count,
                    errors: now.errors - then.errors,
                    total_ms: now.total_ms - then.total_ms,
                    sqlstates,
                };
                (id.clone(), tracked)
            })
        })
        .collect()
}

/// Whether the daemon's `label` names the statement whose fingerprint is `full`: the same
/// text, or the same text cut short (the label may be bounded, with or without a `...`).
fn names(label: &str, full: &str) -> bool {
    let cut = label
        .trim_end_matches("...")
        .trim_end_matches('\u{2026}')
        .trim_end();
    label == full || (cut.len() >= 100 && full.starts_with(cut))
}

/// Expected statements and daemon entries that name each other, with both counts.
#[derive(Debug)]
struct Group {
    fingerprints: Vec<String>,
    query_ids: Vec<String>,
    expected: u64,
    counted: u64,
}

/// The representative of `i`'s set in a union-find forest.
fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Groups the expected fingerprints with the daemon entries that name them. Almost every
/// group is one statement and one entry; labels cut to the same prefix join more, and then
/// their counts are compared together.
fn group(expected: &BTreeMap<String, u64>, counted: &BTreeMap<String, Tracked>) -> Vec<Group> {
    let fps: Vec<(&String, u64)> = expected.iter().map(|(f, n)| (f, *n)).collect();
    let ids: Vec<(&String, &Tracked)> = counted.iter().collect();
    // Union-find over fingerprints (0..fps.len()) and entries (after them).
    let mut parent: Vec<usize> = (0..fps.len() + ids.len()).collect();
    for (f, (fp, _)) in fps.iter().enumerate() {
        for (d, (_, tracked)) in ids.iter().enumerate() {
            if names(&tracked.fingerprint, fp) {
                let (a, b) = (root(&mut parent, f), root(&mut parent, fps.len() + d));
                parent[a] = b;
            }
        }
    }
    let mut groups: BTreeMap<usize, Group> = BTreeMap::new();
    for i in 0..parent.len() {
        let r = root(&mut parent, i);
        let g = groups.entry(r).or_insert_with(|| Group {
            fingerprints: Vec::new(),
            query_ids: Vec::new(),
            expected: 0,
            counted: 0,
        });
        if let Some((fp, n)) = fps.get(i) {
            g.fingerprints.push((*fp).clone());
            g.expected += n;
        } else {
            let (id, tracked) = ids[i - fps.len()];
            g.query_ids.push(id.clone());
            g.counted += tracked.count;
        }
    }
    groups.into_values().collect()
}

fn table(groups: &[Group], counted: &BTreeMap<String, Tracked>) -> String {
    let mut out = format!("{:>9} {:>9}  statement\n", "expected", "daemon");
    for g in groups {
        let name = g.fingerprints.first().map_or_else(
            || {
                g.query_ids
                    .first()
                    .map(|id| format!("(only in the daemon) {id} {}", counted[id].fingerprint))
                    .unwrap_or_default()
            },
            |fp| format!("{fp} [{}]", g.query_ids.join(", ")),
        );
        let _ = writeln!(
            out,
            "{:>9} {:>9}  {name}{}",
            g.expected,
            g.counted,
            if g.expected == g.counted {
                ""
            } else {
                "   <- differs"
            }
        );
    }
    out
}

fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    openmetrics::samples(text, name)
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map_or(0.0, |s| s.value)
}

fn pool_backends(pg: &PgCluster) -> Vec<String> {
    pg.psql(&format!(
        "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity \
         WHERE usename = '{PG_ROLE}' AND application_name = 'demo-backend'"
    ))
    .expect("pg_stat_activity")
    .split(',')
    .filter(|p| !p.is_empty())
    .map(str::to_owned)
    .collect()
}

#[test]
fn query_counts_match_pg_stat_statements_and_errors_show_their_sqlstate() {
    require_root();
    let pg = PgCluster::start_with(PgOptions {
        pg_stat_statements: true,
        password_role: true,
        ..PgOptions::default()
    })
    .expect("postgres");
    let backend = DemoBackend::start_with(
        &pg.role_url().expect("role url"),
        free_port().expect("port"),
        &["--pool-size", &POOL.to_string()],
    )
    .expect("demo backend");

    // Open the whole pool before the daemon exists: POOL requests at once, each holding its
    // connection for 300 ms, so none can reuse another's.
    backend.fault("slow_query?ms=300").expect("slow_query");
    let deals = Call::get(
        "tackle.io",
        "/api/v1/tackle/deals",
        "any",
        "/api/v1/tackle/deals",
    );
    load::run(
        backend.address,
        POOL,
        &Mix::new(vec![(1, deals)]),
        Amount::Requests(POOL as u64),
    )
    .expect("pool warm-up");
    backend.fault("clear").expect("clear");
    let pool = pool_backends(&pg);
    assert_eq!(pool.len(), POOL, "the pool's connections: {pool:?}");

    // Exact counts on a host the load may saturate: no shedding (see http_accuracy.rs).
    let daemon = Daemon::capturing(
        &backend,
        512,
        &format!("shed_below_idle_percent = 0\n{DEMO_PLATFORMS}"),
    )
    .expect("daemon capturing the backend");

    // Warm-up: every call of the mix once; the daemon must show at least as many queries as
    // the server ran for it before the baseline is taken.
    let mix = mix();
    let server_0 = pg_stat_statements(&pg);
    load::run(backend.address, POOL, &mix, Amount::Requests(mix.cycle())).expect("warm-up");
    let warmup_queries: u64 = server_delta(&server_0, &pg_stat_statements(&pg))
        .values()
        .map(|(calls, _)| calls)
        .sum();
    let applied = backend
        .fault_answer(&format!("bad_query?count={BAD_QUERIES}"))
        .expect("bad_query");
    let bad_sql = applied["applied"]["sql"]
        .as_str()
        .expect("the fault names its SQL")
        .to_owned();
    let daemon_0 = wait_stable(
        "the warm-up's queries in the daemon's query view",
        Duration::from_secs(20),
        Duration::from_millis(500),
        || query_view(&daemon),
        |view| view.queries.values().map(|q| q.count).sum::<u64>() >= warmup_queries,
    )
    .unwrap_or_else(|e| {
        panic!("{e}\n(the server ran {warmup_queries} queries for the warm-up, all on pool connections older than the daemon)")
    });
    let metrics_0 = daemon.metrics().expect("metrics");
    let server_1 = pg_stat_statements(&pg);

    // Two refused logins, then the measured run (its first BAD_QUERIES data requests run the
    // failing statement first).
    let refused = backend
        .fault_answer(&format!("bad_password?n={BAD_PASSWORDS}"))
        .expect("bad_password");
    assert_eq!(
        refused["applied"]["sqlstates"],
        serde_json::json!(vec!["28P01"; BAD_PASSWORDS as usize]),
        "the server refused the wrong password as a bad password: {refused}"
    );
    let run = load::run(backend.address, POOL, &mix, Amount::Requests(REQUESTS)).expect("load");
    println!(
        "load: {} requests in {:.2} s\n{}",
        run.total(),
        run.elapsed.as_secs_f64(),
        run.table()
    );
    assert!(
        run.counts().keys().all(|k| k.status < 500),
        "no request failed:\n{}",
        run.table()
    );
    assert_eq!(
        backend.faults().expect("faults")["bad_query"],
        Value::Null,
        "every bad_query was used"
    );
    let server = server_delta(&server_1, &pg_stat_statements(&pg));
    let mut expected: BTreeMap<String, u64> = server
        .iter()
        .map(|(fp, (calls, _))| (fp.clone(), *calls))
        .collect();
    // Failed statements are not in pg_stat_statements; the fault says how many ran.
    let bad_fingerprint = fingerprint(&bad_sql);
    assert!(
        !expected.contains_key(&bad_fingerprint),
        "pg_stat_statements does not count failed statements"
    );
    expected.insert(bad_fingerprint.clone(), BAD_QUERIES);

    // Per statement, equal, not close.
    let mut last = BTreeMap::new();
    let matched = wait_for(
        "the daemon's query counts to reach pg_stat_statements'",
        Duration::from_secs(30),
        || {
            last = daemon_delta(&daemon_0, &query_view(&daemon).ok()?);
            group(&expected, &last)
                .iter()
                .all(|g| g.expected == g.counted)
                .then_some(())
        },
    );
    let groups = group(&expected, &last);
    let shown = table(&groups, &last);
    println!("queries per statement, measured run:\n{shown}");
    matched.unwrap_or_else(|e| {
        panic!(
            "{e}: the daemon's counts differ from pg_stat_statements':\n{shown}\nlosses:\n{}",
            daemon.losses()
        )
    });
    assert!(
        groups.iter().all(|g| g.fingerprints.len() <= 1),
        "each statement has its own entry (labels cut to the same text join statements):\n{shown}"
    );

    // Errors: exactly the injected ones, each with its SQLSTATE. The decoder loses the
    // framing of the answers now and then (a result larger than the 512 bytes captured of a
    // read hides where its last messages start; those queries complete by inference), but it
    // finds it again at the next answer and attributes that answer to the right query, even
    // when the client sent more (an unawaited Close) in between: no error is lost, no answer
    // is left unmatched and no query is dropped.
    let problems = |text: &str, problem: &str| {
        metric_value(
            text,
            "selfheal_protocol_problems_total",
            &[("protocol", "postgres"), ("problem", problem)],
        )
    };
    // The decoders' counters are exported once a second: wait until they have settled.
    wait_stable(
        "the decoders' problem counters",
        Duration::from_secs(10),
        Duration::from_millis(1500),
        || {
            let text = daemon.metrics()?;
            Ok(["desync", "unmatched", "dropped"].map(|p| problems(&text, p)))
        },
        |_| true,
    )
    .expect("problem counters");
    let metrics = daemon.metrics().expect("metrics");
    let moved = |problem: &str| {
        (problems(&metrics, problem) - problems(&metrics_0, problem)).round() as u64
    };
    println!(
        "decoder problems in the measured run: {} desyncs, {} unmatched, {} dropped",
        moved("desync"),
        moved("unmatched"),
        moved("dropped")
    );
    assert_eq!(
        (moved("unmatched"), moved("dropped")),
        (0, 0),
        "every answer matched to its query, no query dropped\nlosses:\n{}",
        daemon.losses()
    );
    let view = query_view(&daemon).expect("queries");
    let delta = daemon_delta(&daemon_0, &view);
    let mut reported = 0;
    for (id, tracked) in &delta {
        if names(&tracked.fingerprint, &bad_fingerprint) {
            reported += tracked.errors;
            println!(
                "injected errors: {BAD_QUERIES}, reported with 42P01: {}",
                tracked.errors
            );
            assert_eq!(
                (tracked.count, tracked.errors),
                (BAD_QUERIES, BAD_QUERIES),
                "every injected query of {id} failed and was reported as failed: {tracked:?}\nlosses:\n{}",
                daemon.losses()
            );
            assert_eq!(
                tracked.sqlstates,
                BTreeMap::from([("42P01".to_owned(), BAD_QUERIES)]),
                "SQLSTATEs of {id} {tracked:?}"
            );
        } else {
            assert_eq!(tracked.errors, 0, "no errors in {id} {tracked:?}");
        }
    }
    assert_eq!(
        reported, BAD_QUERIES,
        "the injected errors are all reported"
    );
    let errors_42p01 = |text: &str| {
        metric_value(
            text,
            "selfheal_postgres_query_errors_total",
            &[("sqlstate_class", "42"), ("sqlstate", "42P01")],
        )
    };
    assert_eq!(
        (errors_42p01(&metrics) - errors_42p01(&metrics_0)).round() as u64,
        BAD_QUERIES,
        "selfheal_postgres_query_errors_total{{sqlstate_class=\"42\",sqlstate=\"42P01\"}}"
    );
    let auth_28p01 = |text: &str| {
        metric_value(
            text,
            "selfheal_postgres_auth_failures_total",
            &[("sqlstate", "28P01")],
        )
    };
    assert_eq!(
        (auth_28p01(&metrics) - auth_28p01(&metrics_0)).round() as u64,
        BAD_PASSWORDS,
        "selfheal_postgres_auth_failures_total{{sqlstate=\"28P01\"}}"
    );
    let refused_in_api = view.auth_failures.get("28P01").copied().unwrap_or(0)
        - daemon_0.auth_failures.get("28P01").copied().unwrap_or(0);
    assert_eq!(
        refused_in_api, BAD_PASSWORDS,
        "auth_failures.28P01 in /api/v1/system/queries: {:?}",
        view.auth_failures
    );

    // /metrics agrees with the API, per query id, with bounded labels.
    let histogram = |text: &str| -> BTreeMap<String, (String, f64)> {
        openmetrics::samples(text, "selfheal_postgres_query_duration_seconds_count")
            .into_iter()
            .filter_map(|s| {
                Some((
                    s.label("query_id")?.to_owned(),
                    (s.label("fingerprint")?.to_owned(), s.value),
                ))
            })
            .collect()
    };
    let (hist_0, hist_1) = (histogram(&metrics_0), histogram(&metrics));
    for (id, (label, _)) in &hist_1 {
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "query_id {id:?} is 16 hex digits"
        );
        assert!(
            label.len() <= 160,
            "fingerprint label of {id} is at most 160 bytes: {} bytes",
            label.len()
        );
    }
    for (id, tracked) in &delta {
        let counted =
            hist_1.get(id).map_or(0.0, |(_, n)| *n) - hist_0.get(id).map_or(0.0, |(_, n)| *n);
        assert_eq!(
            counted.round() as u64,
            tracked.count,
            "selfheal_postgres_query_duration_seconds_count{{query_id=\"{id}\"}} vs the API"
        );
    }

    // The daemon times a query from the target's send to the answer's arrival, which holds
    // the server's execution: its mean cannot be below pg_stat_statements' mean execution
    // time (5 % for the two clocks' rounding).
    for g in groups
        .iter()
        .filter(|g| g.fingerprints.len() == 1 && g.query_ids.len() == 1)
    {
        let Some((calls, exec_ms)) = server.get(&g.fingerprints[0]) else {
            continue;
        };
        let tracked = &delta[&g.query_ids[0]];
        let (daemon_mean, server_mean) = (
            tracked.total_ms / tracked.count as f64,
            exec_ms / *calls as f64,
        );
        println!(
            "{:>8.3} ms round trip (daemon) vs {server_mean:>8.3} ms execution (server): {}",
            daemon_mean, g.fingerprints[0]
        );
        assert!(
            daemon_mean >= server_mean * 0.95,
            "the daemon's mean for {} ({daemon_mean:.3} ms) is below the server's own execution time ({server_mean:.3} ms)",
            g.fingerprints[0]
        );
    }

    // All of it went over the pool's connections, which are older than the daemon.
    assert_eq!(
        pool_backends(&pg),
        pool,
        "the load used only the pool connections opened before the daemon"
    );
}
