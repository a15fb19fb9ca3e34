//! `cargo xtask bench healing`: per fault scenario, how long the healing loop takes — to
//! detect (the fault's onset to the alert), to diagnose (the alert to the diagnosis) and to
//! recover (the action's start to the verified recovery), and the whole (the onset to the
//! recovery recorded) — on release binaries, a real PostgreSQL and the demo backend as a plain
//! process (restarted with `start_command`) or a unit of a real systemd.
//!
//! Times come from the daemon's own records (the alert's `first_seen`, the diagnosis's and
//! the repair's times, all Unix ms) and, for the onset, the bench's clock just before it
//! injects the fault. Detection includes each rule's configured wait (`not_answering_secs`,
//! consecutive samples, checks' intervals), which the table names.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use selfheal_e2e::{
    healing::{checks, Scene, Setup, HEALING},
    http, V1Cgroup,
};
use serde_json::Value;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One scenario's times, in ms.
struct Times {
    detect: i64,
    diagnose: i64,
    recover: i64,
    total: i64,
}

struct Scenario {
    name: &'static str,
    /// What bounds detection from below (the rule's configured wait).
    waits_for: &'static str,
    signature: &'static str,
    setup: Setup,
    with_checks: bool,
    /// Injects the fault; returns the onset (Unix ms).
    inject: fn(&Scene) -> Result<i64>,
}

fn crash(scene: &Scene) -> Result<i64> {
    let pid = scene
        .target_pid()
        .ok_or_else(|| anyhow!("the target is not running"))?;
    let onset = now_ms();
    kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        Signal::SIGKILL,
    )?;
    Ok(onset)
}

fn hang(scene: &Scene) -> Result<i64> {
    scene.backend.fault("hang")?;
    let url = scene.backend.url("/api/v1/campaigns");
    let onset = now_ms();
    std::thread::spawn(move || {
        let _ = http().get(&url).call();
    });
    Ok(onset)
}

fn lock(scene: &Scene) -> Result<i64> {
    let onset = now_ms();
    scene.backend.fault("lock?table=leads&secs=600")?;
    for _ in 0..3 {
        let url = scene.backend.url("/api/v1/leads");
        std::thread::spawn(move || {
            let _ = http().get(&url).call();
        });
    }
    Ok(onset)
}

fn idle_tx(scene: &Scene) -> Result<i64> {
    let onset = now_ms();
    scene.backend.fault("idle_tx?n=3")?;
    Ok(onset)
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "crash (SIGKILL), plain process",
        waits_for: "none",
        signature: "target.crashed",
        setup: HEALING,
        with_checks: true,
        inject: crash,
    },
    Scenario {
        name: "hang with a request waiting",
        waits_for: "not_answering_secs = 2, 3 samples of 500 ms",
        signature: "target.hung",
        setup: HEALING,
        with_checks: false,
        inject: hang,
    },
    Scenario {
        name: "table lock blocking requests",
        waits_for: "2 check runs of 1 s with lock waits",
        signature: "db.lock_contention",
        setup: Setup {
            role: true,
            ..HEALING
        },
        with_checks: true,
        inject: lock,
    },
    Scenario {
        name: "3 transactions left idle",
        waits_for: "idle_in_transaction_secs = 2, then 2 check runs of 1 s",
        signature: "db.idle_in_transaction",
        setup: Setup {
            monitor: "idle_in_transaction_secs = 2",
            role: true,
            ..HEALING
        },
        with_checks: true,
        inject: idle_tx,
    },
];

/// The first alert of `rule` (its `first_seen_unix_ms`).
fn alert_fired(scene: &Scene, rule: &str) -> Option<i64> {
    let data = scene
        .daemon
        .api("/api/v1/system/alerts?state=all&limit=500")
        .ok()?;
    data["alerts"]
        .as_array()?
        .iter()
        .filter(|a| a["rule"] == rule)
        .filter_map(|a| a["first_seen_unix_ms"].as_i64())
        .min()
}

fn diagnosis_at(scene: &Scene, id: i64) -> Option<i64> {
    let data = scene
        .daemon
        .api("/api/v1/system/diagnoses?limit=1000")
        .ok()?;
    data["diagnoses"]
        .as_array()?
        .iter()
        .find(|d| d["id"] == id)
        .and_then(|d| d["at_ms"].as_i64())
}

fn measure(scenario: &Scenario) -> Result<Times> {
    let extra: fn(&str, &str) -> String = if scenario.with_checks {
        checks
    } else {
        |_, _| "[probes]\npayload_bytes = 512\n".to_owned()
    };
    let scene = Scene::start(&scenario.setup, extra)?;
    // Let the checks run once and the capture settle before the fault.
    std::thread::sleep(Duration::from_secs(2));
    let onset = (scenario.inject)(&scene)?;
    let repair: Value = scene
        .wait_repair(scenario.signature, &["recovered"], Duration::from_mins(1))
        .map_err(|err| {
            let log = scene
                .daemon
                .proc
                .log()
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            anyhow!("{err}\nthe daemon's log:\n{log}")
        })?;
    let rule = repair["rule"].as_str().unwrap_or_default();
    let fired = alert_fired(&scene, rule).ok_or_else(|| anyhow!("no {rule} alert"))?;
    let diagnosed = repair["diagnosis_id"]
        .as_i64()
        .and_then(|id| diagnosis_at(&scene, id))
        .ok_or_else(|| anyhow!("no diagnosis for {repair}"))?;
    let finished = repair["finished_at_ms"]
        .as_i64()
        .context("finished_at_ms")?;
    let recover = repair["recover_ms"].as_i64().context("recover_ms")?;
    if scenario.signature != "target.crashed" {
        scene.backend.fault("clear").ok();
    }
    Ok(Times {
        detect: fired - onset,
        // Both stamp the same bus event; the alert manager may write its row a moment
        // after the diagnosis.
        diagnose: (diagnosed - fired).max(0),
        recover,
        total: finished - onset,
    })
}

fn median(mut values: Vec<i64>) -> i64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

pub(crate) fn run(runs: usize, only: Option<&str>) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let chosen = |name: &str| only.is_none_or(|o| name.contains(o));
    println!("healing: {runs} run(s) per scenario, medians in ms (release build)");
    println!();
    println!("| scenario | signature | detect | diagnose | recover (act + verify) | onset → recovered | detection waits for |");
    println!("|---|---|---|---|---|---|---|");
    for scenario in SCENARIOS.iter().filter(|s| chosen(s.name)) {
        let mut all = Vec::with_capacity(runs);
        for run in 1..=runs {
            eprintln!("healing: {} (run {run}/{runs})", scenario.name);
            all.push(measure(scenario).with_context(|| scenario.name)?);
        }
        let column = |f: fn(&Times) -> i64| median(all.iter().map(f).collect());
        println!(
            "| {} | `{}` | {} | {} | {} | {} | {} |",
            scenario.name,
            scenario.signature,
            column(|t| t.detect),
            column(|t| t.diagnose),
            column(|t| t.recover),
            column(|t| t.total),
            scenario.waits_for
        );
    }
    if chosen("leak") {
        leak(runs)?;
    }
    if chosen("learned") {
        learned(runs)?;
    }
    Ok(())
}

/// One occurrence of the learned scenario: an idle transaction and a hang; the onset → the
/// recovery recorded, in ms, and the repair that recovered.
fn hang_with_idle_transaction(scene: &Scene, seen: usize) -> Result<(i64, String)> {
    scene.backend.fault("idle_tx?n=1")?;
    // The session must be idle longer than `idle_in_transaction_secs` (1 s) to be picked.
    std::thread::sleep(Duration::from_millis(1500));
    let onset = now_ms();
    hang(scene)?;
    let repair = selfheal_e2e::wait_for("the hang's recovery", Duration::from_mins(1), || {
        let log = scene.repairs().ok()?;
        let recovered: Vec<&Value> = log
            .iter()
            .filter(|r| r["signature"] == "target.hung" && r["state"] == "recovered")
            .collect();
        (recovered.len() > seen).then(|| recovered[0].clone())
    })?;
    let total = repair["finished_at_ms"].as_i64().context("finished")? - onset;
    let action = repair["action"].as_str().unwrap_or("?").to_owned();
    scene.backend.fault("clear").ok();
    // The restarted backend must answer before the next occurrence.
    selfheal_e2e::wait_for("the backend to answer", Duration::from_secs(20), || {
        scene.backend_healthy().then_some(())
    })?;
    Ok((total, action))
}

/// A playbook whose first candidate acts but does not fix the fault: an operator's
/// `target.hung = ["terminate_idle_in_transaction", "restart"]` meets a hang that has an idle
/// transaction beside it but is not caused by it. The first time, the termination runs, the
/// hang stays, the verification times out (5 s) and the restart fixes it; learning records
/// both, and the second time the restart goes first.
fn learned(runs: usize) -> Result<()> {
    const SETUP: Setup = Setup {
        repair:
            "self_healing = true\nverify_timeout_secs = 5\n\
                 playbooks = { \"target.hung\" = [\"terminate_idle_in_transaction\", \"restart\"] }",
        monitor: "idle_in_transaction_secs = 1",
        role: true,
    };
    let mut first = Vec::with_capacity(runs);
    let mut second = Vec::with_capacity(runs);
    for run in 1..=runs {
        eprintln!("healing: a hang, twice, with a playbook learning corrects (run {run}/{runs})");
        // The session actions need the database's URL.
        let scene = Scene::start(&SETUP, |_, pg| {
            format!("[probes]\npayload_bytes = 512\n\n[database]\nurl = \"{pg}\"\n")
        })?;
        std::thread::sleep(Duration::from_secs(1));
        let (once, action) = hang_with_idle_transaction(&scene, 0)?;
        if action != "restart" {
            bail!("the first hang was recovered by {action}, not by the restart");
        }
        let (twice, action) = hang_with_idle_transaction(&scene, 1)?;
        if action != "restart" {
            bail!("the second hang was recovered by {action}");
        }
        let tried_first = scene
            .repairs()?
            .iter()
            .filter(|r| r["signature"] == "target.hung" && r["decision"]["decision"] == "run")
            .map(|r| r["action"].as_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>();
        eprintln!("healing: actions run, newest first: {tried_first:?}");
        first.push(once);
        second.push(twice);
    }
    println!(
        "| hang, first time (playbook: terminate_idle_in_transaction, then restart) | `target.hung` | | | | {} | not_answering_secs = 2, 3 samples; then a 5 s verification that fails |",
        median(first)
    );
    println!(
        "| the same hang again (learned: restart first) | `target.hung` | | | | {} | not_answering_secs = 2, 3 samples |",
        median(second)
    );
    Ok(())
}

/// The leak needs a memory cgroup around the backend: its own scene.
fn leak(runs: usize) -> Result<()> {
    let mut all = Vec::with_capacity(runs);
    for run in 1..=runs {
        eprintln!("healing: leak toward a v1 cgroup limit (run {run}/{runs})");
        let scene = Scene::start(&HEALING, |_, _| String::new())?;
        let cgroup = V1Cgroup::create("bench-leak", scene.backend.proc.pid())?;
        std::fs::write(
            cgroup.dir("memory").join("memory.limit_in_bytes"),
            (256_u64 << 20).to_string(),
        )?;
        let onset = now_ms();
        scene.backend.fault("leak?mb_per_sec=40&max_mb=220")?;
        let repair =
            scene.wait_repair("target.memory_leak", &["recovered"], Duration::from_mins(1))?;
        let fired = alert_fired(&scene, "target.memory_high").context("no alert")?;
        let diagnosed = repair["diagnosis_id"]
            .as_i64()
            .and_then(|id| diagnosis_at(&scene, id))
            .context("no diagnosis")?;
        all.push(Times {
            detect: fired - onset,
            // Both stamp the same bus event; the alert manager may write its row a moment
            // after the diagnosis.
            diagnose: (diagnosed - fired).max(0),
            recover: repair["recover_ms"].as_i64().context("recover_ms")?,
            total: repair["finished_at_ms"].as_i64().context("finished")? - onset,
        });
        scene.backend.fault("clear").ok();
    }
    let column = |f: fn(&Times) -> i64| median(all.iter().map(f).collect());
    println!(
        "| leak at 40 MiB/s toward a 256 MiB limit | `target.memory_leak` | {} | {} | {} | {} | the leak reaching 85 %, 3 samples of 500 ms |",
        column(|t| t.detect),
        column(|t| t.diagnose),
        column(|t| t.recover),
        column(|t| t.total),
    );
    Ok(())
}
