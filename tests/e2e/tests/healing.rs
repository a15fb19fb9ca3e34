//! The healing loop against the demo backend as a plain process and a real PostgreSQL: each
//! scenario asserts the diagnosis signature, the action taken (or held back) and the verified
//! recovery, through the repairs log the API shows.
//!
//! A plain process is restarted with `repair.start_command` (see `selfheal_e2e::healing`).

use std::time::{Duration, Instant};

use selfheal_e2e::{
    healing::{checks, Scene, Setup, HEALING},
    http, require_root, wait_for, V1Cgroup,
};
use selfheal_receivers::HttpRecorder;
use serde_json::Value;

/// The scene of `setup`, or the test fails.
fn scene(setup: &Setup, extra: impl Fn(&str, &str) -> String) -> Scene {
    require_root();
    Scene::start(setup, extra).expect("scene")
}

fn repairs(scene: &Scene) -> Vec<Value> {
    scene.repairs().expect("repairs")
}

fn wait_repair(scene: &Scene, signature: &str, states: &[&str], within: Duration) -> Value {
    scene
        .wait_repair(signature, states, within)
        .unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn a_crash_is_diagnosed_restarted_and_verified_healthy_and_learned() {
    let scene = scene(&HEALING, checks);
    let (backend, daemon) = (&scene.backend, &scene.daemon);
    let old = backend.proc.pid();
    let crashed_at = Instant::now();
    backend.fault("crash").expect("crash");
    let repair = wait_repair(
        &scene,
        "target.crashed",
        &["recovered"],
        Duration::from_secs(30),
    );
    println!(
        "crash: recovered {} ms after the fault switch; the repair: {repair:#}",
        crashed_at.elapsed().as_millis()
    );
    assert_eq!(repair["action"], "restart");
    assert_eq!(repair["rule"], "target.exited");
    assert_eq!(repair["decision"]["decision"], "run");
    assert!(
        repair["summary"]
            .as_str()
            .is_some_and(|s| s.contains("SIGABRT")),
        "{repair}"
    );
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "process.restart", "{repair}");
    assert!(
        effect["after"]
            .as_str()
            .is_some_and(|a| a.ends_with("running")),
        "{repair}"
    );
    assert!(repair["recover_ms"].as_u64().is_some(), "{repair}");
    let new = scene.target_pid().expect("the target runs again");
    assert_ne!(new, u64::from(old));
    assert!(
        scene.backend_healthy(),
        "the restarted backend answers /health"
    );
    // Verified means its own health check passed after the restart.
    let checks = daemon
        .api("/api/v1/system/integrations")
        .expect("integrations");
    let own = checks["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "backend").cloned())
        .expect("the backend check");
    assert_eq!(own["status"], "healthy", "{own}");

    // Learning recorded it.
    let patterns = wait_for("the pattern to be learned", Duration::from_secs(5), || {
        let data = daemon.api("/api/v1/system/patterns").ok()?;
        let found = data["patterns"].as_array()?.iter().find(|p| {
            p["signature"] == "target.crashed" && p["action"] == "restart" && p["successes"] == 1
        })?;
        Some((
            found.clone(),
            data["order"]["target.crashed"][0]["action"].clone(),
        ))
    })
    .expect("learned");
    assert_eq!(patterns.0["attempts"], 1, "{}", patterns.0);
    assert_eq!(patterns.1, "restart");
    let alerts = daemon
        .api("/api/v1/system/alerts?state=firing")
        .expect("alerts");
    assert!(
        !alerts.to_string().contains("target.exited"),
        "the crash alert cleared: {alerts}"
    );
}

#[test]
fn a_hung_backend_is_restarted() {
    let scene = scene(&HEALING, |_, _| {
        "[probes]\npayload_bytes = 512\n".to_owned()
    });
    let backend = &scene.backend;
    let old = backend.proc.pid();
    backend.fault("hang").expect("hang");
    // A request that waits: what makes the backend "not answering".
    let url = backend.url("/api/v1/campaigns");
    let waiting = std::thread::spawn(move || {
        let _ = selfheal_e2e::http().get(&url).call();
    });
    let hung_at = Instant::now();
    let repair = wait_repair(
        &scene,
        "target.hung",
        &["recovered"],
        Duration::from_mins(1),
    );
    println!(
        "hang: recovered {} ms after the hung request; the repair: {repair:#}",
        hung_at.elapsed().as_millis()
    );
    assert_eq!(repair["action"], "restart");
    assert_eq!(repair["rule"], "target.not_answering");
    assert!(
        repair["effects"][0]["before"]
            .as_str()
            .is_some_and(|b| b.contains("stopped")),
        "the hung process was stopped first: {repair}"
    );
    assert_ne!(scene.target_pid(), Some(u64::from(old)));
    assert!(scene.backend_healthy());
    let _ = waiting.join();
}

#[test]
fn a_crash_loop_spends_the_budget_opens_the_circuit_and_escalates() {
    let scene = scene(
        &Setup {
            repair: "self_healing = true\nbudget = 2",
            ..HEALING
        },
        |_, _| String::new(),
    );
    let (backend, daemon) = (&scene.backend, &scene.daemon);
    let mut pid = u64::from(backend.proc.pid());
    for round in 1..=2 {
        backend.fault("crash").expect("crash");
        pid = wait_for(&format!("restart {round}"), Duration::from_secs(30), || {
            scene.target_pid().filter(|p| *p != pid)
        })
        .expect("restarted");
        wait_for("the backend to listen", Duration::from_secs(10), || {
            scene.backend_healthy().then_some(())
        })
        .expect("listening");
    }
    backend.fault("crash").expect("third crash");
    let skipped = wait_repair(
        &scene,
        "target.crashed",
        &["skipped"],
        Duration::from_secs(30),
    );
    assert_eq!(
        skipped["decision"]["reason"], "budget_exhausted",
        "{skipped}"
    );
    assert_eq!(skipped["decision"]["escalate"], true, "{skipped}");
    let escalated = wait_for("the escalation alert", Duration::from_secs(10), || {
        let alerts = daemon.api("/api/v1/system/alerts?state=firing").ok()?;
        alerts["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["rule"] == "repair.escalated")
            .cloned()
    })
    .expect("escalated");
    assert_eq!(escalated["severity"], "critical");
    assert_eq!(
        escalated["labels"]["signature"], "target.crashed",
        "{escalated}"
    );
    let view = daemon.api("/api/v1/system/repairs").expect("repairs");
    assert_eq!(view["open_circuits"], serde_json::json!(["target.crashed"]));
    // No further restart: the backend stays down.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(scene.target_pid(), None, "nothing restarted it");
    let ran = repairs(&scene)
        .iter()
        .filter(|r| r["decision"]["decision"] == "run")
        .count();
    assert_eq!(ran, 2, "{:#?}", repairs(&scene));

    // A human closes the circuit; the next crash is repaired again.
    let (status, answer) = daemon
        .api_post(
            "/api/v1/system/repairs/circuits/target.crashed/reset",
            &serde_json::json!({"by": "ana", "note": "fixed the config"}),
        )
        .expect("reset");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["open_circuits"], serde_json::json!([]));
    let (status, _) = daemon
        .api_post(
            "/api/v1/system/repairs/circuits/target.crashed/reset",
            &serde_json::json!({}),
        )
        .expect("reset again");
    assert_eq!(status, 409, "not open any more");
    // It is still down from the third crash: start it by hand; then a fourth crash.
    let backend2 = selfheal_e2e::DemoBackend::start(&scene.pg.url(), backend.address.port())
        .expect("restarted by hand");
    let manual = u64::from(backend2.proc.pid());
    wait_for("the daemon to see it", Duration::from_secs(10), || {
        (scene.target_pid() == Some(manual)).then_some(())
    })
    .expect("seen");
    backend2.fault("crash").expect("fourth crash");
    wait_for("a restart after the reset", Duration::from_secs(30), || {
        scene.target_pid().filter(|p| *p != manual)
    })
    .expect("restarted again");
    let ran = repairs(&scene)
        .iter()
        .filter(|r| r["decision"]["decision"] == "run")
        .count();
    assert_eq!(ran, 3, "{:#?}", repairs(&scene));
}

#[test]
fn with_the_database_down_the_backend_is_not_restarted() {
    // A local server speaking Anthropic's Messages API: each diagnosis gets its summary.
    let llm = HttpRecorder::start_answering(
        200,
        r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"PostgreSQL is down; the backend is fine."}],"stop_reason":"end_turn"}"#,
    )
    .expect("Messages API");
    let llm_url = llm.url("");
    let scene = scene(&HEALING, move |health, pg| {
        format!(
            "{}\n[diagnostic]\nanthropic_api_key = \"sk-e2e\"\nanthropic_base_url = \"{llm_url}\"\n",
            checks(health, pg)
        )
    });
    let (backend, daemon) = (&scene.backend, &scene.daemon);
    let pid = backend.proc.pid();
    scene.pg.stop_server().expect("stop postgres");
    // The database check and the backend's own health check both fail; both are the
    // database's outage, and neither may restart the backend.
    let outage = wait_repair(
        &scene,
        "db.unreachable",
        &["skipped"],
        Duration::from_secs(30),
    );
    assert_eq!(outage["action"], "none", "{outage}");
    assert_eq!(outage["decision"]["reason"], "no_action", "{outage}");
    wait_for("both alerts diagnosed", Duration::from_secs(20), || {
        let log = repairs(&scene);
        let rules: Vec<&str> = log
            .iter()
            .filter(|r| r["signature"] == "db.unreachable")
            .filter_map(|r| r["labels"]["check"].as_str())
            .collect();
        (rules.contains(&"pg") && rules.contains(&"backend")).then_some(())
    })
    .unwrap_or_else(|err| panic!("{err}: {:#?}", repairs(&scene)));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        repairs(&scene).iter().all(|r| r["action"] == "none"),
        "no action on the backend: {:#?}",
        repairs(&scene)
    );
    assert_eq!(
        scene.target_pid(),
        Some(u64::from(pid)),
        "the same process runs"
    );
    // The diagnoses, with their evidence and the LLM's summary.
    let diagnoses = wait_for("the LLM summaries", Duration::from_secs(10), || {
        let data = daemon.api("/api/v1/system/diagnoses").ok()?;
        let rows = data["diagnoses"].as_array()?.clone();
        rows.iter()
            .all(|d| d["llm_summary"].is_string())
            .then_some(rows)
    })
    .expect("summaries");
    let own = diagnoses
        .iter()
        .find(|d| d["labels"]["check"] == "backend")
        .expect("the backend check's diagnosis");
    assert_eq!(own["signature"], "db.unreachable", "{own}");
    assert_eq!(own["dependency_down"], "pg", "{own}");
    assert_eq!(
        own["llm_summary"],
        "PostgreSQL is down; the backend is fine."
    );
    assert!(
        own["evidence"]
            .to_string()
            .contains("check pg (postgres) is down"),
        "{own}"
    );
    let asked = llm.requests();
    assert!(!asked.is_empty());
    assert_eq!(asked[0].header("x-api-key"), Some("sk-e2e"));
    scene.pg.start_server().expect("start postgres");
}

#[test]
fn a_provider_down_runs_the_failover_hooks_and_never_restarts_the_backend() {
    // The provider the backend depends on, down; a check watches it.
    let provider = HttpRecorder::start_answering(503, "provider down").expect("provider");
    // The backend's failover endpoint (played by the test): switching to the other provider
    // brings the dependency back.
    let failover = HttpRecorder::start().expect("failover endpoint");
    let written = tempfile::tempdir().expect("temp dir");
    let env_file = written.path().join("hook.env");
    let (provider_url, failover_url) = (provider.url("/status"), failover.url("/admin/failover"));
    let command = serde_json::to_string(&[
        "sh".to_owned(),
        "-c".to_owned(),
        format!(
            "env | grep ^SELFHEAL_ > {}; echo cache is read-only >&2; exit 4",
            env_file.display()
        ),
    ])
    .expect("json");
    let scene = scene(&HEALING, move |health, pg| {
        format!(
            "{}\n[[checks]]\nname = \"crm\"\nkind = \"http\"\nurl = \"{provider_url}\"\n\
             interval_ms = 1000\ntimeout_ms = 900\nalert_after_failures = 2\n\n\
             [repair.playbooks]\n\"dependency.down\" = [\"analyze\"]\n\n\
             [[repair.hooks]]\nname = \"flush\"\ncommand = {command}\non = [\"dependency.down\"]\n\n\
             [[repair.hooks]]\nname = \"failover\"\nurl = \"{failover_url}\"\ntimeout_ms = 3000\n\
             on = [\"dependency.down\"]\n",
            checks(health, pg)
        )
    });
    let pid = scene.backend.proc.pid();
    let switched = std::thread::scope(|threads| {
        let switch = threads.spawn(|| {
            let called = failover
                .wait_for_requests_blocking(1, Duration::from_secs(40))
                .expect("the failover hook is called");
            provider.answer(200, "ok");
            called
        });
        let repair = wait_repair(
            &scene,
            "dependency.down",
            &["recovered"],
            Duration::from_secs(50),
        );
        (repair, switch.join().expect("switch"))
    });
    let (repair, called) = switched;
    println!("failover: {repair:#}");
    assert_eq!(repair["action"], "hook:failover", "{repair}");
    assert_eq!(repair["labels"]["check"], "crm", "{repair}");
    assert_eq!(repair["effects"][0]["action"], "hook.post", "{repair}");
    // What the endpoint got: the diagnosis.
    let body = called[0].json().expect("a JSON body");
    assert_eq!(called[0].method, "POST");
    assert_eq!(called[0].path, "/admin/failover");
    assert_eq!(body["hook"], "failover");
    assert_eq!(body["signature"], "dependency.down");
    assert_eq!(body["dependency_down"], "crm");
    // The command hook ran first (the playbook's order, nothing learned yet) and failed.
    let log = repairs(&scene);
    let flush = log
        .iter()
        .find(|r| r["action"] == "hook:flush")
        .unwrap_or_else(|| panic!("the flush hook ran: {log:#?}"));
    assert_eq!(flush["state"], "failed", "{flush}");
    assert!(
        flush["error"]
            .as_str()
            .is_some_and(|e| e.contains("exit status: 4") && e.contains("cache is read-only")),
        "{flush}"
    );
    let env = std::fs::read_to_string(&env_file).expect("the hook's environment");
    for line in [
        "SELFHEAL_HOOK=flush",
        "SELFHEAL_SIGNATURE=dependency.down",
        "SELFHEAL_RULE=check.down",
        "SELFHEAL_DEPENDENCY=crm",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in {env}");
    }
    // `analyze` came first (the configured playbook) and has no table to work on here: it
    // was unavailable, which learning does not count against it; the hooks' outcomes count.
    let analyze = log
        .iter()
        .find(|r| r["action"] == "analyze")
        .unwrap_or_else(|| panic!("analyze was tried: {log:#?}"));
    assert!(
        analyze["error"]
            .as_str()
            .is_some_and(|e| e.contains("names no table")),
        "{analyze}"
    );
    let patterns = wait_for(
        "the hooks' outcomes learned",
        Duration::from_secs(10),
        || {
            let patterns = scene.daemon.api("/api/v1/system/patterns").ok()?["patterns"].clone();
            let rows = patterns.as_array()?.clone();
            (rows.len() >= 2).then_some(rows)
        },
    )
    .expect("patterns");
    let learned = |action: &str| {
        patterns
            .iter()
            .find(|p| p["signature"] == "dependency.down" && p["action"] == action)
            .map(|p| (p["attempts"].as_u64(), p["successes"].as_u64()))
    };
    assert_eq!(
        learned("hook:failover"),
        Some((Some(1), Some(1))),
        "{patterns:#?}"
    );
    assert_eq!(
        learned("hook:flush"),
        Some((Some(1), Some(0))),
        "{patterns:#?}"
    );
    assert_eq!(learned("analyze"), None, "{patterns:#?}");
    // No action on the backend's process.
    assert!(
        log.iter().all(|r| r["action"] != "restart"),
        "no restart: {log:#?}"
    );
    assert_eq!(
        scene.target_pid(),
        Some(u64::from(pid)),
        "the same process runs"
    );
}

#[test]
fn a_descriptor_leak_toward_the_limit_is_restarted_before_the_backend_runs_out() {
    // Half the limit: the 1.5 s the rule needs (3 samples) is far from running out.
    let scene = scene(
        &Setup {
            monitor: "fd_threshold_percent = 50",
            ..HEALING
        },
        checks,
    );
    let (backend, daemon) = (&scene.backend, &scene.daemon);
    let old = backend.proc.pid();
    // A unit's `LimitNOFILE=1024`, and 100 descriptors a second that are never closed: out
    // of descriptors in about 10 s.
    backend
        .fault("fd_leak?per_sec=100&nofile=1024")
        .expect("fd_leak");
    let repair = wait_repair(
        &scene,
        "target.fd_exhaustion",
        &["recovered"],
        Duration::from_secs(40),
    );
    println!("fd leak: {repair:#}");
    assert_eq!(repair["action"], "restart", "{repair}");
    assert_eq!(repair["rule"], "target.fds_high", "{repair}");
    let answer = daemon.api("/api/v1/system/diagnoses").expect("diagnoses");
    let diagnosis = answer["diagnoses"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|d| d["signature"] == "target.fd_exhaustion")
        })
        .cloned()
        .expect("the diagnosis");
    assert!(
        diagnosis["evidence"].to_string().contains("(limit 1024)"),
        "{diagnosis}"
    );
    let open_then: u64 = diagnosis["summary"]
        .as_str()
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {diagnosis}"));
    assert!(
        (512..1000).contains(&open_then),
        "diagnosed at {open_then} open descriptors, before running out: {diagnosis}"
    );
    let new = scene.target_pid().expect("a backend runs");
    assert_ne!(new, u64::from(old), "a new process");
    // The new process starts with its descriptors back to normal, and answers.
    let open = std::fs::read_dir(format!("/proc/{new}/fd"))
        .expect("its descriptors")
        .count();
    assert!(open < 200, "{open} descriptors open in the new process");
    assert!(scene.backend_healthy());
}

#[test]
fn slow_requests_from_a_slow_query_name_the_query_and_the_route_that_moved() {
    let scene = scene(
        &Setup {
            monitor: "api_response_threshold_ms = 150\ndb_query_threshold_ms = 100\n\
                      traffic_window_secs = 10\nmin_requests = 5",
            ..HEALING
        },
        |health, pg| format!("{}\n[probes]\npayload_bytes = 512\n", checks(health, pg)),
    );
    let backend = &scene.backend;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|threads| {
        for _ in 0..4 {
            threads.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = http()
                        .get(backend.url("/api/v1/campaigns"))
                        .header("Host", "leadsite.ai")
                        .call();
                    // About 15 requests a second each: slow ones soon make the p95.
                    std::thread::sleep(Duration::from_millis(60));
                }
            });
        }
        // A window of fast requests first, then every campaigns query sleeps 300 ms.
        std::thread::sleep(Duration::from_secs(11));
        backend
            .fault("slow_query?ms=300&path=/api/v1/campaigns")
            .expect("slow_query");
        let diagnosis = wait_for(
            "the slow requests diagnosed",
            Duration::from_secs(30),
            || {
                let answer = scene.daemon.api("/api/v1/system/diagnoses").ok()?;
                answer["diagnoses"]
                    .as_array()?
                    .iter()
                    .find(|d| d["rule"] == "http.latency_high")
                    .cloned()
            },
        );
        backend.fault("clear").expect("clear");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let diagnosis = diagnosis.expect("a diagnosis");
        println!("slow query: {diagnosis:#}");
        assert_eq!(diagnosis["signature"], "db.slow_query", "{diagnosis}");
        let evidence = diagnosis["evidence"].to_string();
        assert!(
            evidence.contains("route GET /api/v1/campaigns on leadsite.ai: p95 "),
            "{evidence}"
        );
        assert!(
            evidence.contains("query SELECT pg_sleep($1) ("),
            "{evidence}"
        );
        assert!(
            evidence.contains("none in the 10 s before") || evidence.contains("its first runs"),
            "the sleep is new: {evidence}"
        );
        assert!(
            evidence.contains("in the 10 s before (×"),
            "how far it moved: {evidence}"
        );
        assert_eq!(
            diagnosis["actions"],
            serde_json::json!(["analyze", "cancel_slow_queries"])
        );
    });
}

#[test]
fn dry_run_decides_the_same_and_runs_nothing() {
    let scene = scene(
        &Setup {
            repair: "self_healing = false",
            ..HEALING
        },
        |_, _| String::new(),
    );
    let (backend, daemon) = (&scene.backend, &scene.daemon);
    let view = daemon.api("/api/v1/system/repairs").expect("repairs");
    assert_eq!(view["mode"], "dry-run");
    for bad in [
        "/api/v1/system/repairs?limit=0",
        "/api/v1/system/diagnoses?limit=5000",
        "/api/v1/system/repairs?bogus=1",
    ] {
        let (status, body) = daemon.api_answer(bad).expect("answer");
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["success"], false, "{body}");
    }
    backend.fault("crash").expect("crash");
    let proposed = wait_repair(
        &scene,
        "target.crashed",
        &["dry_run"],
        Duration::from_secs(30),
    );
    assert_eq!(proposed["action"], "restart");
    assert_eq!(proposed["decision"]["decision"], "dry_run");
    assert_eq!(proposed["effects"], Value::Null, "nothing ran");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(scene.target_pid(), None, "nothing restarted the backend");
    assert!(!scene.backend_healthy());
}

#[test]
fn a_lock_that_blocks_the_backends_queries_is_ended() {
    let scene = scene(
        &Setup {
            role: true,
            ..HEALING
        },
        checks,
    );
    let backend = &scene.backend;
    backend.fault("lock?table=leads&secs=600").expect("lock");
    // Requests that need the table wait behind the lock.
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let url = backend.url("/api/v1/leads");
            std::thread::spawn(move || http().get(&url).call().map_or(0, |r| r.status().as_u16()))
        })
        .collect();
    let locked_at = Instant::now();
    let repair = wait_repair(
        &scene,
        "db.lock_contention",
        &["recovered"],
        Duration::from_secs(40),
    );
    println!(
        "lock: recovered {} ms after the lock; the repair: {repair:#}",
        locked_at.elapsed().as_millis()
    );
    assert_eq!(repair["action"], "cancel_blockers");
    // The holder sat idle in its transaction: nothing to cancel, so it was terminated.
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "postgres.terminate", "{repair}");
    assert!(
        effect["before"]
            .as_str()
            .is_some_and(|b| b.contains("LOCK TABLE")),
        "{repair}"
    );
    for request in waiting {
        assert_eq!(
            request.join().expect("request"),
            200,
            "the blocked request went through"
        );
    }
    let faults = backend.faults().expect("faults");
    assert_eq!(faults["lock"], serde_json::json!([]), "{faults}");
}

#[test]
fn transactions_left_idle_are_terminated() {
    let scene = scene(
        &Setup {
            monitor: "idle_in_transaction_secs = 2",
            role: true,
            ..HEALING
        },
        checks,
    );
    let backend = &scene.backend;
    backend.fault("idle_tx?n=3").expect("idle_tx");
    let repair = wait_repair(
        &scene,
        "db.idle_in_transaction",
        &["recovered"],
        Duration::from_secs(40),
    );
    assert_eq!(repair["action"], "terminate_idle_in_transaction");
    let effects = repair["effects"].as_array().expect("effects");
    assert_eq!(effects.len(), 3, "{repair}");
    assert!(
        effects.iter().all(|e| e["action"] == "postgres.terminate"),
        "{repair}"
    );
    let faults = wait_for("the sessions to be gone", Duration::from_secs(5), || {
        let faults = backend.faults().ok()?;
        (faults["idle_tx"] == serde_json::json!([])).then_some(faults)
    });
    assert!(faults.is_ok(), "{:?}", backend.faults());
    // The backend's own pooled sessions were left alone: it still answers.
    assert!(scene.backend_healthy());
}

#[test]
fn a_leak_toward_the_memory_limit_gets_a_higher_limit_before_the_oom_killer_acts() {
    const LIMIT: u64 = 256 << 20;
    let scene = scene(&HEALING, |_, _| String::new());
    let backend = &scene.backend;
    let pid = backend.proc.pid();
    let cgroup = V1Cgroup::create("leak", pid).expect("a v1 memory cgroup");
    let limit_file = cgroup.dir("memory").join("memory.limit_in_bytes");
    std::fs::write(&limit_file, LIMIT.to_string()).expect("limit");
    // About 230 MiB charged in all with the backend's own: over 85 % of the limit (the
    // monitor's threshold), under the limit.
    backend
        .fault("leak?mb_per_sec=40&max_mb=220")
        .expect("leak");
    let repair = wait_repair(
        &scene,
        "target.memory_leak",
        &["recovered"],
        Duration::from_mins(1),
    );
    println!("leak: the repair: {repair:#}");
    assert_eq!(repair["rule"], "target.memory_high");
    assert_eq!(repair["action"], "raise_memory_limit");
    let effect = &repair["effects"][0];
    assert_eq!(effect["action"], "cgroup.memory_limit", "{repair}");
    let raised: u64 = std::fs::read_to_string(&limit_file)
        .expect("read limit")
        .trim()
        .parse()
        .expect("a number");
    assert_eq!(
        raised,
        LIMIT + LIMIT / 2,
        "raised by memory_step_percent (50 %)"
    );
    // The OOM killer never acted: the same process still runs and answers.
    assert_eq!(scene.target_pid(), Some(u64::from(pid)));
    assert!(scene.backend_healthy());
    backend.fault("clear").expect("clear");
}
