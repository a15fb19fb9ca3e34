use std::time::Duration;

use super::*;
use crate::{
    actuators::gate::Skip,
    state::{self, DbOptions},
    telemetry::Metrics,
};

fn open(dir: &std::path::Path) -> (RepairLog, state::DbThread) {
    let (db, thread, _) = state::open(
        &DbOptions {
            path: dir.join(state::DB_FILE),
            busy_timeout: Duration::from_secs(1),
        },
        Metrics::new(),
    )
    .expect("open");
    (RepairLog::new(db), thread)
}

fn repair(action: &str, decision: Decision) -> NewRepair {
    NewRepair {
        diagnosis_id: None,
        at_ms: 1_000,
        target: "command \"demo-backend\"".to_owned(),
        signature: "target.crashed".to_owned(),
        rule: "target.exited".to_owned(),
        labels: BTreeMap::new(),
        summary: "the target died from SIGABRT".to_owned(),
        action: action.to_owned(),
        decision,
        error: None,
    }
}

#[tokio::test]
async fn a_repair_is_written_before_it_runs_and_completed_after_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let (log, thread) = open(dir.path());
    let id = log
        .decided(repair("restart", Decision::Run))
        .await
        .expect("decided");
    let listed = log.list(10, None).await.expect("list");
    assert_eq!(listed[0].state, "running");
    assert_eq!(listed[0].decision["decision"], "run");
    log.verifying(
        id,
        vec![Effect {
            action: "process.restart",
            subject: "command".to_owned(),
            before: "not running".to_owned(),
            after: "process 42 running".to_owned(),
        }],
    )
    .await
    .expect("verifying");
    // A second decision that the gate held back, and one left verifying when the daemon stops.
    log.decided(repair(
        "restart",
        Decision::Skip {
            why: Skip::Cooldown { remaining_secs: 9 },
            escalate: false,
        },
    ))
    .await
    .expect("skip");
    log.finished(id, 2_500, Some(1_200), None)
        .await
        .expect("finished");
    let pending = log
        .decided(repair("restart", Decision::Run))
        .await
        .expect("pending");
    drop(log);
    thread.finished().await;

    let (log, _thread) = open(dir.path());
    assert_eq!(log.interrupted(9_000).await.expect("interrupted"), 1);
    let listed = log.list(10, None).await.expect("list");
    let states: Vec<(i64, &str)> = listed.iter().map(|r| (r.id, r.state.as_str())).collect();
    assert_eq!(
        states,
        [(pending, "failed"), (id + 1, "skipped"), (id, "recovered")]
    );
    let done = &listed[2];
    assert_eq!(done.recover_ms, Some(1_200));
    assert_eq!(done.finished_at_ms, Some(2_500));
    assert_eq!(
        done.effects.as_ref().expect("effects")[0]["after"],
        "process 42 running"
    );
    assert_eq!(listed[1].decision["reason"], "cooldown");
    assert!(listed[0]
        .error
        .as_deref()
        .is_some_and(|e| e.contains("stopped before")));
    assert_eq!(
        log.list(1, Some("db.unreachable".to_owned()))
            .await
            .expect("filtered")
            .len(),
        0
    );
}

#[tokio::test]
async fn patterns_keep_success_rates_and_mean_recovery_per_signature_and_action() {
    let dir = tempfile::tempdir().expect("dir");
    let (log, _thread) = open(dir.path());
    let leak = || "target.memory_leak".to_owned();
    log.learn(leak(), "raise_memory_limit".to_owned(), None, 1)
        .await
        .expect("learn");
    log.learn(leak(), "restart".to_owned(), Some(800), 2)
        .await
        .expect("learn");
    log.learn(leak(), "restart".to_owned(), Some(1_200), 3)
        .await
        .expect("learn");
    let learned = log.learned(leak()).await.expect("learned");
    assert_eq!(
        learned["restart"],
        Stats {
            attempts: 2,
            successes: 2,
            total_recover_ms: 2_000
        }
    );
    let patterns = log.patterns().await.expect("patterns");
    assert_eq!(patterns.len(), 2);
    assert_eq!(patterns[0].action, "restart");
    assert_eq!(patterns[0].mean_recover_ms, Some(1_000));
    assert!((patterns[0].success_rate - 1.0).abs() < f64::EPSILON);
    assert_eq!(patterns[1].failures, 1);
    assert_eq!(patterns[1].last_outcome, "failed");
}

fn names(ranked: &[Ranked]) -> Vec<&str> {
    ranked.iter().map(|r| r.action.as_str()).collect()
}

#[test]
fn the_playbook_order_holds_until_experience_says_otherwise() {
    let candidates = vec!["raise_memory_limit".to_owned(), "restart".to_owned()];
    let mut learned = HashMap::new();
    assert_eq!(
        names(&rank(&candidates, &learned, 0.5)),
        ["raise_memory_limit", "restart"]
    );
    // Raising the limit did not help once; the restart did.
    learned.insert(
        "raise_memory_limit".to_owned(),
        Stats {
            attempts: 1,
            successes: 0,
            total_recover_ms: 0,
        },
    );
    learned.insert(
        "restart".to_owned(),
        Stats {
            attempts: 1,
            successes: 1,
            total_recover_ms: 900,
        },
    );
    assert_eq!(
        names(&rank(&candidates, &learned, 0.5)),
        ["restart", "raise_memory_limit"]
    );
    assert_eq!(
        names(&rank(&candidates, &learned, 0.0)),
        ["restart", "raise_memory_limit"]
    );
}

#[test]
fn exploration_gives_a_rarely_tried_action_another_chance() {
    let candidates = vec!["a".to_owned(), "b".to_owned()];
    // `a` works 7 times in 10; `b` failed its only try.
    let learned: HashMap<String, Stats> = [
        (
            "a".to_owned(),
            Stats {
                attempts: 10,
                successes: 7,
                total_recover_ms: 7_000,
            },
        ),
        (
            "b".to_owned(),
            Stats {
                attempts: 1,
                successes: 0,
                total_recover_ms: 0,
            },
        ),
    ]
    .into();
    assert_eq!(names(&rank(&candidates, &learned, 0.0)), ["a", "b"]);
    assert_eq!(names(&rank(&candidates, &learned, 2.0)), ["b", "a"]);
}

#[test]
fn equal_chances_go_to_the_faster_recovery() {
    // Far down a long playbook the priors are equal (the floor), so two actions with the same
    // record are tied, and the faster one leads whatever its place.
    let candidates: Vec<String> = ["a", "b", "c", "d", "e", "slow", "fast"]
        .map(str::to_owned)
        .to_vec();
    let stats = |ms| Stats {
        attempts: 4,
        successes: 4,
        total_recover_ms: ms,
    };
    let learned: HashMap<String, Stats> = [
        ("slow".to_owned(), stats(40_000)),
        ("fast".to_owned(), stats(400)),
    ]
    .into();
    let ranked = rank(&candidates, &learned, 0.0);
    assert_eq!(&names(&ranked)[..2], ["fast", "slow"]);
}
