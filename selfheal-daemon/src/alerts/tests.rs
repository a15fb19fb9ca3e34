//! The alert manager against a real SQLite file, with the clock driven by hand: no test waits
//! for a throttle window to pass.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use rusqlite::Connection;

use super::{store, *};
use crate::state::{self, DbOptions};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
/// Some instant, in Unix ms.
const T0: i64 = 1_800_000_000_000;

fn settings(channels: &[&'static str]) -> Settings {
    Settings {
        notify_interval_ms: HOUR,
        group_window_ms: 5 * MIN,
        channels: channels.to_vec(),
    }
}

fn open(dir: &std::path::Path) -> Connection {
    state::open_connection(&DbOptions {
        path: dir.join(state::DB_FILE),
        busy_timeout: Duration::from_secs(1),
    })
    .expect("open")
    .0
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn fire(rule: &str, pairs: &[(&str, &str)], severity: Severity) -> Signal {
    Signal {
        rule: rule.to_owned(),
        labels: labels(pairs),
        severity,
        message: format!("{rule} is bad"),
        firing: true,
    }
}

fn cleared(rule: &str, pairs: &[(&str, &str)]) -> Signal {
    Signal {
        firing: false,
        message: format!("{rule} is fine"),
        ..fire(rule, pairs, Severity::Warning)
    }
}

fn outbox(c: &Connection) -> Vec<(i64, String, String)> {
    c.prepare("SELECT alert_id, channel, kind FROM outbox ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

fn created(outcome: Outcome) -> (Alert, Notified) {
    match outcome {
        Outcome::Created { alert, notified } => (alert, notified),
        other => panic!("expected a new alert, got {other:?}"),
    }
}

#[test]
fn the_state_machine_allows_exactly_the_documented_transitions() {
    use AlertState::{Acknowledged, Firing, Resolved};
    let expected = [
        (Firing, Action::Acknowledge, Some(Acknowledged)),
        (Firing, Action::Resolve, Some(Resolved)),
        (Acknowledged, Action::Acknowledge, None),
        (Acknowledged, Action::Resolve, Some(Resolved)),
        (Resolved, Action::Acknowledge, None),
        (Resolved, Action::Resolve, None),
    ];
    for (from, action, to) in expected {
        assert_eq!(transition(from, action), to, "{from:?} + {action:?}");
    }
}

#[test]
fn keys_sort_labels_and_groups_follow_the_platform_else_the_rule() {
    let l = labels(&[("platform", "tackle.io"), ("check", "crm")]);
    assert_eq!(
        alert_key("check.down", &l),
        r#"check.down{check="crm",platform="tackle.io"}"#
    );
    assert_eq!(alert_key("target.exited", &Labels::new()), "target.exited");
    assert_eq!(group_key("check.down", &l), "platform=tackle.io");
    assert_eq!(group_key("target.exited", &Labels::new()), "target");
}

#[test]
fn the_same_key_while_active_updates_one_alert() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let s = settings(&["slack"]);
    let (first, notified) = created(
        store::apply(
            &mut c,
            T0,
            &s,
            &fire("target.cpu_high", &[], Severity::Warning),
        )
        .expect("fire"),
    );
    assert_eq!(notified, Notified::Enqueued(1));
    assert_eq!((first.count, first.state), (1, AlertState::Firing));

    let again = store::apply(
        &mut c,
        T0 + MIN,
        &s,
        &fire("target.cpu_high", &[], Severity::Critical),
    )
    .expect("again");
    let Outcome::Repeated {
        alert, notified, ..
    } = again
    else {
        panic!("expected a repeat, got {again:?}")
    };
    assert_eq!(alert.id, first.id);
    assert_eq!(alert.count, 2);
    assert_eq!(alert.last_seen_ms, T0 + MIN);
    assert_eq!(alert.first_seen_ms, T0);
    assert_eq!(alert.severity, Severity::Critical);
    assert_eq!(notified, Notified::Throttled);

    // Other labels are another key, so another alert.
    let (other, _) = created(
        store::apply(
            &mut c,
            T0 + MIN,
            &s,
            &fire("target.cpu_high", &[("platform", "a")], Severity::Warning),
        )
        .expect("other"),
    );
    assert_ne!(other.id, first.id);
    let active = store::active(&c).expect("active");
    assert_eq!(active.len(), 2);
    let detail = store::detail(&c, first.id)
        .expect("detail")
        .expect("exists");
    let kinds: Vec<&str> = detail.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["fired", "severity_changed"]);
}

#[test]
fn a_key_is_notified_at_most_once_per_interval_even_across_alerts() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let s = settings(&["slack", "pagerduty"]);
    let rule = "target.memory_high";
    let (a1, n1) =
        created(store::apply(&mut c, T0, &s, &fire(rule, &[], Severity::Warning)).expect("fire"));
    assert_eq!(n1, Notified::Enqueued(2));
    // It clears and fires again ten minutes later: a new alert, but no new trigger.
    let resolved = store::apply(&mut c, T0 + 5 * MIN, &s, &cleared(rule, &[])).expect("clear");
    assert!(
        matches!(&resolved, Outcome::Resolved { alert, notified: Notified::Enqueued(2) } if alert.id == a1.id && alert.resolved_by.as_deref() == Some("rule")),
        "{resolved:?}"
    );
    let (a2, n2) = created(
        store::apply(
            &mut c,
            T0 + 10 * MIN,
            &s,
            &fire(rule, &[], Severity::Warning),
        )
        .expect("again"),
    );
    assert_ne!(a2.id, a1.id);
    assert_eq!(n2, Notified::Throttled);
    // Still firing 59 minutes after the first trigger: still quiet.
    let repeat = store::apply(
        &mut c,
        T0 + 59 * MIN,
        &s,
        &fire(rule, &[], Severity::Warning),
    )
    .expect("repeat");
    assert!(
        matches!(
            repeat,
            Outcome::Repeated {
                notified: Notified::Throttled,
                ..
            }
        ),
        "{repeat:?}"
    );
    // An hour after it: a reminder.
    let reminder =
        store::apply(&mut c, T0 + HOUR, &s, &fire(rule, &[], Severity::Warning)).expect("reminder");
    assert!(
        matches!(
            reminder,
            Outcome::Repeated {
                notified: Notified::Enqueued(2),
                ..
            }
        ),
        "{reminder:?}"
    );
    // The resolve of a2 is notified because its reminder went out.
    store::apply(&mut c, T0 + HOUR + MIN, &s, &cleared(rule, &[])).expect("clear");
    let expected: Vec<(i64, String, String)> = [
        (a1.id, "slack", "trigger"),
        (a1.id, "pagerduty", "trigger"),
        (a1.id, "slack", "resolve"),
        (a1.id, "pagerduty", "resolve"),
        (a2.id, "slack", "trigger"),
        (a2.id, "pagerduty", "trigger"),
        (a2.id, "slack", "resolve"),
        (a2.id, "pagerduty", "resolve"),
    ]
    .iter()
    .map(|(id, ch, k)| (*id, (*ch).to_owned(), (*k).to_owned()))
    .collect();
    assert_eq!(outbox(&c), expected);
}

#[test]
fn an_unnotified_alert_resolves_quietly_and_an_acknowledged_one_does_not_remind() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let quiet = Settings {
        notify_interval_ms: 0,
        ..settings(&["slack"])
    };
    let (alert, _) =
        created(store::apply(&mut c, T0, &quiet, &fire("x.y", &[], Severity::Info)).expect("fire"));
    let (acked, notified) = store::change(
        &mut c,
        T0 + 1,
        &quiet,
        alert.id,
        Action::Acknowledge,
        "ana",
        "looking",
    )
    .expect("ack");
    assert_eq!(acked.state, AlertState::Acknowledged);
    assert_eq!(notified, Notified::Enqueued(1));
    // Acknowledged: a repeat, even with no throttle at all, sends nothing.
    let repeat =
        store::apply(&mut c, T0 + 2, &quiet, &fire("x.y", &[], Severity::Info)).expect("repeat");
    assert!(
        matches!(
            repeat,
            Outcome::Repeated {
                notified: Notified::NotNeeded,
                ..
            }
        ),
        "{repeat:?}"
    );
    assert_eq!(
        outbox(&c)
            .iter()
            .map(|(_, _, k)| k.as_str())
            .collect::<Vec<_>>(),
        ["trigger", "acknowledge"]
    );

    // With no channel, nothing is enqueued and nothing is marked notified.
    let none = settings(&[]);
    let (b, notified) =
        created(store::apply(&mut c, T0, &none, &fire("a.b", &[], Severity::Info)).expect("fire"));
    assert_eq!(notified, Notified::NoChannel);
    let resolved = store::apply(&mut c, T0 + 1, &none, &cleared("a.b", &[])).expect("clear");
    assert!(
        matches!(&resolved, Outcome::Resolved { alert, notified: Notified::NotNeeded } if alert.id == b.id),
        "{resolved:?}"
    );
    // A "cleared" with nothing active changes nothing.
    assert_eq!(
        store::apply(&mut c, T0 + 2, &none, &cleared("a.b", &[])).expect("noop"),
        Outcome::NothingActive
    );
}

#[test]
fn operators_changes_are_checked_and_audited() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let s = settings(&["slack"]);
    let (alert, _) = created(
        store::apply(
            &mut c,
            T0,
            &s,
            &fire("target.exited", &[], Severity::Critical),
        )
        .expect("fire"),
    );
    let err =
        store::change(&mut c, T0, &s, 999, Action::Acknowledge, "ana", "").expect_err("unknown id");
    assert!(matches!(err, AlertError::NotFound { id: 999 }), "{err:?}");

    store::change(
        &mut c,
        T0 + 1000,
        &s,
        alert.id,
        Action::Acknowledge,
        "ana",
        "on it",
    )
    .expect("ack");
    let err = store::change(
        &mut c,
        T0 + 2000,
        &s,
        alert.id,
        Action::Acknowledge,
        "bob",
        "",
    )
    .expect_err("twice");
    assert!(
        matches!(
            err,
            AlertError::NotAllowed {
                state: AlertState::Acknowledged,
                action: Action::Acknowledge,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "alert {} is acknowledged; it cannot be acknowledged",
            alert.id
        )
    );
    let (resolved, _) = store::change(
        &mut c,
        T0 + 3000,
        &s,
        alert.id,
        Action::Resolve,
        "bob",
        "restarted it",
    )
    .expect("resolve");
    assert_eq!(resolved.state, AlertState::Resolved);
    assert_eq!(resolved.resolved_by.as_deref(), Some("bob"));
    let err = store::change(&mut c, T0 + 4000, &s, alert.id, Action::Resolve, "bob", "")
        .expect_err("resolved twice");
    assert!(
        matches!(
            err,
            AlertError::NotAllowed {
                state: AlertState::Resolved,
                ..
            }
        ),
        "{err:?}"
    );
    // A refused change leaves no trace.
    let detail = store::detail(&c, alert.id)
        .expect("detail")
        .expect("exists");
    let audit: Vec<(i64, &str, &str, &str)> = detail
        .audit
        .iter()
        .map(|a| {
            (
                a.at_ms,
                a.actor.as_str(),
                a.action.as_str(),
                a.note.as_str(),
            )
        })
        .collect();
    assert_eq!(
        audit,
        [
            (T0 + 1000, "ana", "acknowledge", "on it"),
            (T0 + 3000, "bob", "resolve", "restarted it"),
        ]
    );
    let events: Vec<(&str, AlertState, &str)> = detail
        .events
        .iter()
        .map(|e| (e.kind.as_str(), e.state, e.actor.as_str()))
        .collect();
    assert_eq!(
        events,
        [
            ("fired", AlertState::Firing, "rule"),
            ("acknowledged", AlertState::Acknowledged, "ana"),
            ("resolved", AlertState::Resolved, "bob"),
        ]
    );
    let kinds: Vec<&str> = detail
        .notifications
        .iter()
        .map(|n| n.kind.as_str())
        .collect();
    assert_eq!(kinds, ["trigger", "acknowledge", "resolve"]);
    assert_eq!(detail.notifications[2].payload["actor"], "bob");
    assert_eq!(detail.notifications[2].payload["note"], "restarted it");
    assert!(detail.notifications.iter().all(|n| n.state == "pending"));
    // Once resolved, the rule firing again opens a new alert.
    let (next, _) = created(
        store::apply(
            &mut c,
            T0 + 5000,
            &s,
            &fire("target.exited", &[], Severity::Critical),
        )
        .expect("fire again"),
    );
    assert_ne!(next.id, alert.id);
}

#[test]
fn silences_suppress_notification_but_keep_the_alert_visible() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let s = settings(&["slack"]);
    let silence = store::create_silence(
        &mut c,
        T0,
        &labels(&[("platform", "tackle.io")]),
        T0 + HOUR,
        "ana",
        "maintenance",
    )
    .expect("silence");
    let (silenced, notified) = created(
        store::apply(
            &mut c,
            T0 + MIN,
            &s,
            &fire(
                "check.down",
                &[("platform", "tackle.io")],
                Severity::Critical,
            ),
        )
        .expect("fire"),
    );
    assert_eq!(notified, Notified::Silenced(silence.id));
    assert_eq!(silenced.last_notified_ms, None);
    // Another platform is not covered.
    let (_, notified) = created(
        store::apply(
            &mut c,
            T0 + MIN,
            &s,
            &fire(
                "check.down",
                &[("platform", "leadsite.ai")],
                Severity::Critical,
            ),
        )
        .expect("fire"),
    );
    assert_eq!(notified, Notified::Enqueued(1));
    let page = store::list(
        &c,
        T0 + MIN,
        &Filter {
            state: StateFilter::Active,
            severity: None,
            platform: Some("tackle.io".to_owned()),
            limit: 10,
            offset: 0,
        },
    )
    .expect("list");
    assert_eq!(page.alerts.len(), 1, "the silenced alert is listed");
    let view = views::AlertView::new(&page.alerts[0], &page.silences);
    assert_eq!(view.silenced_by, Some(silence.id));

    // After the silence ends, the alert firing on is notified (the key never was).
    let repeat = store::apply(
        &mut c,
        T0 + HOUR,
        &s,
        &fire(
            "check.down",
            &[("platform", "tackle.io")],
            Severity::Critical,
        ),
    )
    .expect("repeat");
    assert!(
        matches!(
            repeat,
            Outcome::Repeated {
                notified: Notified::Enqueued(1),
                ..
            }
        ),
        "{repeat:?}"
    );
    // A rule matcher, and expiry by hand.
    let by_rule = store::create_silence(
        &mut c,
        T0 + HOUR,
        &labels(&[("rule", "target.exited")]),
        T0 + 2 * HOUR,
        "bob",
        "",
    )
    .expect("silence");
    let (_, notified) = created(
        store::apply(
            &mut c,
            T0 + HOUR,
            &s,
            &fire("target.exited", &[], Severity::Critical),
        )
        .expect("fire"),
    );
    assert_eq!(notified, Notified::Silenced(by_rule.id));
    let ended = store::expire_silence(&mut c, T0 + HOUR + 1, by_rule.id, "bob").expect("expire");
    assert_eq!(ended.ends_ms, T0 + HOUR + 1);
    assert!(matches!(
        store::expire_silence(&mut c, T0 + HOUR + 2, by_rule.id, "bob"),
        Err(AlertError::SilenceEnded { .. })
    ));
    assert!(matches!(
        store::expire_silence(&mut c, T0, 4242, "bob"),
        Err(AlertError::SilenceNotFound { id: 4242 })
    ));
    assert!(store::silences(&c, T0 + HOUR + 2, false)
        .expect("active")
        .is_empty());
    assert_eq!(store::silences(&c, T0, true).expect("all").len(), 2);
    let actions: Vec<String> = store::audit(&c)
        .expect("audit")
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["silence", "silence", "expire_silence"]);
}

#[test]
fn alerts_firing_together_share_a_group() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let s = settings(&["webhook"]);
    let (a, _) = created(
        store::apply(
            &mut c,
            T0,
            &s,
            &fire(
                "http.errors",
                &[("platform", "tackle.io")],
                Severity::Warning,
            ),
        )
        .expect("a"),
    );
    assert_eq!(a.group_id, a.id);
    let (b, _) = created(
        store::apply(
            &mut c,
            T0 + MIN,
            &s,
            &fire(
                "http.latency",
                &[("platform", "tackle.io")],
                Severity::Warning,
            ),
        )
        .expect("b"),
    );
    assert_eq!(b.group_id, a.id, "fired together: one group");
    let (other, _) = created(
        store::apply(
            &mut c,
            T0 + MIN,
            &s,
            &fire(
                "http.latency",
                &[("platform", "leadsite.ai")],
                Severity::Warning,
            ),
        )
        .expect("other"),
    );
    assert_eq!(other.group_id, other.id, "another platform: another group");
    let (late, _) = created(
        store::apply(
            &mut c,
            T0 + 10 * MIN,
            &s,
            &fire("db.slow", &[("platform", "tackle.io")], Severity::Warning),
        )
        .expect("late"),
    );
    assert_eq!(
        late.group_id, late.id,
        "outside the window: a group of its own"
    );
    // The notification of b lists its group's active alerts.
    let detail = store::detail(&c, b.id).expect("detail").expect("exists");
    let members: Vec<i64> = detail.notifications[0].payload["group"]
        .as_array()
        .expect("group")
        .iter()
        .map(|m| m["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(members, [a.id, b.id]);
}

#[test]
fn listings_filter_and_page_newest_first() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = open(dir.path());
    let s = settings(&[]);
    let mut ids = Vec::new();
    for i in 0..7 {
        let rule = format!("r.{i}");
        let severity = if i % 2 == 0 {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let (a, _) =
            created(store::apply(&mut c, T0 + i, &s, &fire(&rule, &[], severity)).expect("fire"));
        ids.push(a.id);
    }
    store::apply(&mut c, T0 + 10, &s, &cleared("r.0", &[])).expect("clear");
    store::change(&mut c, T0 + 11, &s, ids[1], Action::Acknowledge, "a", "").expect("ack");
    let filter = |state, severity, limit, offset| Filter {
        state,
        severity,
        platform: None,
        limit,
        offset,
    };
    let list = |f: Filter| -> (Vec<i64>, u64) {
        let page = store::list(&c, T0, &f).expect("list");
        (page.alerts.iter().map(|a| a.id).collect(), page.total)
    };
    let (active, total) = list(filter(StateFilter::Active, None, 50, 0));
    assert_eq!(total, 6);
    assert_eq!(active, [ids[6], ids[5], ids[4], ids[3], ids[2], ids[1]]);
    let (all, total) = list(filter(StateFilter::All, None, 3, 0));
    assert_eq!((all, total), (vec![ids[6], ids[5], ids[4]], 7));
    let (page2, _) = list(filter(StateFilter::All, None, 3, 6));
    assert_eq!(page2, [ids[0]]);
    let (resolved, _) = list(filter(StateFilter::Only(AlertState::Resolved), None, 50, 0));
    assert_eq!(resolved, [ids[0]]);
    let (acked, _) = list(filter(
        StateFilter::Only(AlertState::Acknowledged),
        None,
        50,
        0,
    ));
    assert_eq!(acked, [ids[1]]);
    let (critical, total) = list(filter(StateFilter::All, Some(Severity::Critical), 50, 0));
    assert_eq!((critical, total), (vec![ids[6], ids[4], ids[2], ids[0]], 4));
}

#[test]
fn query_parameters_are_validated() {
    let q = |pairs: &[(&str, &str)]| {
        let mut query = views::AlertsQuery::default();
        for (k, v) in pairs {
            let v = Some((*v).to_owned());
            match *k {
                "state" => query.state = v,
                "severity" => query.severity = v,
                "history" => query.history = v,
                "limit" => query.limit = v,
                "offset" => query.offset = v,
                _ => query.platform = v,
            }
        }
        query.filter()
    };
    let default = q(&[]).expect("default");
    assert_eq!(default.state, StateFilter::Active);
    assert_eq!(default.limit, views::DEFAULT_LIMIT);
    assert_eq!(
        q(&[("history", "true")]).expect("history").state,
        StateFilter::All
    );
    assert_eq!(
        q(&[("history", "true"), ("state", "resolved")])
            .expect("both")
            .state,
        StateFilter::Only(AlertState::Resolved)
    );
    for bad in [
        &[("state", "open")][..],
        &[("severity", "high")],
        &[("history", "yes")],
        &[("limit", "0")],
        &[("limit", "501")],
        &[("offset", "-1")],
    ] {
        assert!(q(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(
        views::ChangeBody::parse(b"").expect("empty"),
        ("api".to_owned(), String::new())
    );
    assert_eq!(
        views::ChangeBody::parse(br#"{"by": " ana ", "note": "n"}"#).expect("body"),
        ("ana".to_owned(), "n".to_owned())
    );
    assert!(views::ChangeBody::parse(br#"{"who": "x"}"#).is_err());
    assert!(views::ChangeBody::parse(b"not json").is_err());
    let (m, ends, by, _) =
        views::SilenceBody::parse(br#"{"matchers": {"rule": "x"}, "duration": "2h"}"#, T0)
            .expect("silence");
    assert_eq!((m.len(), ends, by.as_str()), (1, T0 + 2 * HOUR, "api"));
    assert!(views::SilenceBody::parse(br#"{"matchers": {}, "duration": "2h"}"#, T0).is_err());
    assert!(views::SilenceBody::parse(br#"{"matchers": {"a": "b"}}"#, T0).is_err());
    assert!(
        views::SilenceBody::parse(br#"{"matchers": {"a": "b"}, "ends_at_unix_ms": 5}"#, T0)
            .is_err()
    );
}

/// A clock the test moves.
fn manual_clock(start: i64) -> (Clock, Arc<AtomicI64>) {
    let now = Arc::new(AtomicI64::new(start));
    let read = now.clone();
    (Arc::new(move || read.load(Ordering::SeqCst)), now)
}

#[tokio::test]
async fn the_manager_keeps_everything_across_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let options = DbOptions {
        path: dir.path().join(state::DB_FILE),
        busy_timeout: Duration::from_secs(1),
    };
    let metrics = Metrics::new();
    let (clock, now) = manual_clock(T0);
    let (db, thread, _) = state::open(&options, metrics.clone()).expect("open");
    let manager = AlertManager::start(db, settings(&["slack"]), clock.clone(), metrics.clone())
        .await
        .expect("start");
    manager
        .signal(fire("target.exited", &[], Severity::Critical))
        .await;
    manager
        .signal(fire("target.memory_high", &[], Severity::Warning))
        .await;
    let active = manager.active();
    assert_eq!(active.len(), 2);
    let exited = active
        .iter()
        .find(|a| a.rule == "target.exited")
        .expect("exited")
        .id;
    now.store(T0 + MIN, Ordering::SeqCst);
    manager
        .change(exited, Action::Acknowledge, "ana".into(), "on it".into())
        .await
        .expect("ack");
    let err = manager
        .change(exited, Action::Acknowledge, "ana".into(), String::new())
        .await
        .expect_err("twice");
    assert!(matches!(err, AlertError::NotAllowed { .. }));
    let before = manager.detail(exited).await.expect("detail").0;
    assert_eq!(
        metrics
            .alerts_active
            .get_or_create(&SeverityLabel {
                severity: "critical"
            })
            .get(),
        1
    );
    drop(manager);
    thread.finished().await;

    // A new process on the same file: the same alerts, history, audit and outbox.
    let (db, thread, opened) = state::open(&options, Metrics::new()).expect("reopen");
    assert_eq!(opened.from_version, state::schema::VERSION);
    let manager = AlertManager::start(db, settings(&["slack"]), clock, Metrics::new())
        .await
        .expect("restart");
    let restored = manager.active();
    assert_eq!(
        restored,
        active
            .iter()
            .map(|a| {
                let mut a = a.clone();
                if a.id == exited {
                    a.state = AlertState::Acknowledged;
                    a.acknowledged_at_ms = Some(T0 + MIN);
                    a.acknowledged_by = Some("ana".into());
                }
                a
            })
            .collect::<Vec<_>>()
    );
    let after = manager.detail(exited).await.expect("detail").0;
    assert_eq!(after.alert, before.alert);
    assert_eq!(after.events, before.events);
    assert_eq!(after.audit, before.audit);
    assert_eq!(after.notifications, before.notifications);
    // The rule's "cleared" resolves the restored alert.
    manager.signal(cleared("target.memory_high", &[])).await;
    assert_eq!(manager.active().len(), 1);
    drop(manager);
    thread.finished().await;
}

#[tokio::test]
async fn a_database_failure_is_counted_and_the_manager_carries_on() {
    let dir = tempfile::tempdir().expect("dir");
    let options = DbOptions {
        path: dir.path().join(state::DB_FILE),
        busy_timeout: Duration::from_secs(1),
    };
    let metrics = Metrics::new();
    let (db, thread, _) = state::open(&options, metrics.clone()).expect("open");
    let manager = AlertManager::start(db.clone(), settings(&[]), system_clock(), metrics.clone())
        .await
        .expect("start");
    // Break the table under the manager.
    db.call("test_break", |c| {
        c.execute_batch("ALTER TABLE alerts RENAME TO gone")
    })
    .await
    .expect("rename");
    manager.signal(fire("x.y", &[], Severity::Info)).await;
    assert_eq!(
        metrics
            .state_errors
            .get_or_create(&crate::telemetry::OpLabel {
                op: "alerts_signal"
            })
            .get(),
        1
    );
    assert!(matches!(
        manager
            .change(1, Action::Resolve, "a".into(), String::new())
            .await,
        Err(AlertError::Db(_))
    ));
    db.call("test_fix", |c| {
        c.execute_batch("ALTER TABLE gone RENAME TO alerts")
    })
    .await
    .expect("rename back");
    manager.signal(fire("x.y", &[], Severity::Info)).await;
    assert_eq!(manager.active().len(), 1);
    drop((manager, db));
    thread.finished().await;
}

#[tokio::test]
async fn every_change_of_an_alert_is_announced_once_on_the_bus() {
    let dir = tempfile::tempdir().expect("dir");
    let options = DbOptions {
        path: dir.path().join(state::DB_FILE),
        busy_timeout: Duration::from_secs(1),
    };
    let metrics = Metrics::new();
    let (db, thread, _) = state::open(&options, metrics.clone()).expect("open");
    let manager = AlertManager::start(db, settings(&[]), system_clock(), metrics.clone())
        .await
        .expect("start");
    let bus = crate::bus::Bus::new(metrics);
    let mut events = bus.subscribe();
    manager.announce_on(bus.clone());

    let warn = fire("target.memory_high", &[], Severity::Warning);
    manager.signal(warn.clone()).await;
    manager.signal(warn).await; // a repeat: no change
    manager
        .signal(fire("target.memory_high", &[], Severity::Critical))
        .await;
    let id = manager.active()[0].id;
    manager
        .change(id, Action::Acknowledge, "ana".into(), String::new())
        .await
        .expect("ack");
    manager.signal(cleared("target.memory_high", &[])).await;
    bus.publish(Event::Security {
        kind: "end".into(),
        detail: String::new(),
    });

    let mut seen = Vec::new();
    while let Some(event) = events.recv().await {
        if matches!(&event, Event::Security { kind, .. } if kind == "end") {
            break;
        }
        if let Event::AlertChanged {
            id: changed,
            state,
            severity,
            by,
            ..
        } = event
        {
            assert_eq!(changed, id);
            seen.push((state, severity, by));
        }
    }
    assert_eq!(
        seen,
        [
            ("firing", Severity::Warning, "rule".to_owned()),
            ("firing", Severity::Critical, "rule".to_owned()),
            ("acknowledged", Severity::Critical, "ana".to_owned()),
            ("resolved", Severity::Critical, "rule".to_owned()),
        ]
    );
    drop(manager);
    thread.finished().await;
}
