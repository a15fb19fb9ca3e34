//! The recent activity the API shows: what the predictive, security and performance agents
//! concluded, the monitor's health changes, the last samples of the target and the host, and
//! the target's CPU and memory as gauges in the metrics store (the dashboard's charts).
//!
//! Owns: a bounded, in-memory record of the bus's findings (the newest [`KEEP`] of each kind;
//! a restart starts it empty, unlike alerts and repairs, which live in the state DB) and the
//! `target_cpu_percent` / `target_memory_bytes` series. Must not: block the bus (it is one
//! more subscriber; a lag is counted by the bus) or grow without bound.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{Bus, Event, HealthStatus, HostSample, ProcessSample, TcpSummary},
    store::{self, SeriesKind, StoreHandle},
};

/// How many findings of each kind are kept.
pub const KEEP: usize = 200;

/// The store series of the target's CPU (100 = one core) and memory (cgroup when it has one,
/// else RSS), one sample per monitor interval.
pub const TARGET_CPU: &str = "target_cpu_percent";
pub const TARGET_MEMORY: &str = "target_memory_bytes";

/// A finding with when it was seen, newest first in the lists.
#[derive(Debug, Clone, Serialize)]
pub struct Stamped<T> {
    pub at_unix_ms: i64,
    #[serde(flatten)]
    pub item: T,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub resource: String,
    pub threshold: f64,
    pub eta_seconds: f64,
    /// When the resource is expected to cross its threshold.
    pub expected_at_unix_ms: i64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SecurityFinding {
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Optimization {
    pub area: String,
    pub suggestion: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthChange {
    pub status: HealthStatus,
    pub reason: String,
}

/// What the API reads.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    pub predictions: VecDeque<Stamped<Prediction>>,
    pub security: VecDeque<Stamped<SecurityFinding>>,
    pub optimizations: VecDeque<Stamped<Optimization>>,
    pub health: VecDeque<Stamped<HealthChange>>,
    /// Findings seen since the daemon started, kept or not.
    pub predictions_total: u64,
    pub security_total: u64,
    pub optimizations_total: u64,
    pub process: Option<Stamped<ProcessSample>>,
    pub host: Option<Stamped<HostSample>>,
    pub tcp: Option<Stamped<TcpSummary>>,
}

fn push<T>(list: &mut VecDeque<Stamped<T>>, at_unix_ms: i64, item: T) {
    if list.len() == KEEP {
        list.pop_back();
    }
    list.push_front(Stamped { at_unix_ms, item });
}

impl Recent {
    /// Takes in one bus event; false when it is not one this keeps.
    pub fn record(&mut self, at_unix_ms: i64, event: &Event) -> bool {
        match event {
            Event::Prediction {
                resource,
                threshold,
                eta_seconds,
                detail,
            } => {
                self.predictions_total += 1;
                push(
                    &mut self.predictions,
                    at_unix_ms,
                    Prediction {
                        resource: resource.clone(),
                        threshold: *threshold,
                        eta_seconds: *eta_seconds,
                        expected_at_unix_ms: at_unix_ms
                            .saturating_add((eta_seconds * 1000.0).clamp(0.0, 1e15) as i64),
                        detail: detail.clone(),
                    },
                );
            }
            Event::Security { kind, detail } => {
                self.security_total += 1;
                push(
                    &mut self.security,
                    at_unix_ms,
                    SecurityFinding {
                        kind: kind.clone(),
                        detail: detail.clone(),
                    },
                );
            }
            Event::Optimization { area, suggestion } => {
                self.optimizations_total += 1;
                push(
                    &mut self.optimizations,
                    at_unix_ms,
                    Optimization {
                        area: area.clone(),
                        suggestion: suggestion.clone(),
                    },
                );
            }
            Event::Health { status, reason } => push(
                &mut self.health,
                at_unix_ms,
                HealthChange {
                    status: *status,
                    reason: reason.clone(),
                },
            ),
            Event::ProcessSample(sample) => {
                self.process = Some(Stamped {
                    at_unix_ms,
                    item: sample.clone(),
                });
            }
            Event::HostSample(sample) => {
                self.host = Some(Stamped {
                    at_unix_ms,
                    item: sample.clone(),
                });
            }
            Event::TcpSummary(summary) => {
                self.tcp = Some(Stamped {
                    at_unix_ms,
                    item: summary.clone(),
                });
            }
            _ => return false,
        }
        true
    }
}

/// The shared record. Cheap to clone.
#[derive(Clone, Default)]
pub struct Activity {
    inner: Arc<Mutex<Recent>>,
}

impl Activity {
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the newest `n` findings of each kind, the counts and the last samples (the
    /// views show a few; copying all that is kept would be most of the work of a call).
    pub fn newest(&self, n: usize) -> Recent {
        fn head<T: Clone>(list: &VecDeque<Stamped<T>>, n: usize) -> VecDeque<Stamped<T>> {
            list.iter().take(n).cloned().collect()
        }
        self.read(|r| Recent {
            predictions: head(&r.predictions, n),
            security: head(&r.security, n),
            optimizations: head(&r.optimizations, n),
            health: head(&r.health, n),
            predictions_total: r.predictions_total,
            security_total: r.security_total,
            optimizations_total: r.optimizations_total,
            process: r.process.clone(),
            host: r.host.clone(),
            tcp: r.tcp.clone(),
        })
    }

    /// Reads under the lock without copying everything.
    pub fn read<R>(&self, f: impl FnOnce(&Recent) -> R) -> R {
        f(&self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn record(&self, at_unix_ms: i64, event: &Event) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(at_unix_ms, event);
    }
}

/// Writes one process sample into the store's gauges.
fn record_sample(store: &StoreHandle, at_ms: i64, sample: &ProcessSample) {
    let memory = sample.cgroup_memory_bytes.unwrap_or(sample.rss_bytes) as f64;
    for (name, value) in [(TARGET_CPU, sample.cpu_percent), (TARGET_MEMORY, memory)] {
        let written = store
            .get_or_register(name, &[], SeriesKind::Gauge)
            .map_err(|err| err.to_string())
            .and_then(|id| store.set(id, at_ms, value).map_err(|err| err.to_string()));
        if let Err(error) = written {
            tracing::debug!(series = name, %error, "cannot record a target sample");
        }
    }
}

/// Keeps the record from the bus until `cancel`.
pub async fn run(activity: Activity, store: StoreHandle, bus: Bus, cancel: CancellationToken) {
    let mut events = bus.subscribe();
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = events.recv() => event,
        };
        let Some(event) = event else { return };
        let now = store::unix_ms(SystemTime::now());
        if let Event::ProcessSample(sample) = &event {
            record_sample(&store, now, sample);
        }
        activity.record(now, &event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_are_kept_newest_first_and_bounded() {
        let mut recent = Recent::default();
        for i in 0..(KEEP + 5) {
            assert!(recent.record(
                i as i64,
                &Event::Security {
                    kind: "connection_burst".into(),
                    detail: i.to_string(),
                }
            ));
        }
        assert_eq!(recent.security.len(), KEEP);
        assert_eq!(recent.security_total, (KEEP + 5) as u64);
        assert_eq!(recent.security[0].item.detail, (KEEP + 4).to_string());
        assert_eq!(recent.security[KEEP - 1].item.detail, "5");

        recent.record(
            10_000,
            &Event::Prediction {
                resource: "memory".into(),
                threshold: 1e9,
                eta_seconds: 60.5,
                detail: "grows".into(),
            },
        );
        assert_eq!(recent.predictions[0].item.expected_at_unix_ms, 70_500);
        assert!(!recent.record(
            1,
            &Event::AgentCrashed {
                agent: "monitor".into(),
                error: "x".into(),
                restart_in_ms: 1
            }
        ));
    }

    #[test]
    fn the_views_copy_only_the_newest() {
        let activity = Activity::new();
        for i in 0..50 {
            activity.record(
                i,
                &Event::Optimization {
                    area: "connections".into(),
                    suggestion: i.to_string(),
                },
            );
        }
        let newest = activity.newest(3);
        assert_eq!(newest.optimizations_total, 50);
        let kept: Vec<_> = newest
            .optimizations
            .iter()
            .map(|o| o.item.suggestion.as_str())
            .collect();
        assert_eq!(kept, ["49", "48", "47"]);
    }

    #[test]
    fn process_samples_become_gauges() {
        let store = StoreHandle::new(crate::store::StoreConfig::default()).expect("store");
        let sample = ProcessSample {
            cpu_percent: 42.0,
            rss_bytes: 1000,
            cgroup_memory_bytes: Some(5000),
            ..ProcessSample::default()
        };
        record_sample(&store, 1_000_000, &sample);
        store.read(|s| {
            let cpu = s.lookup(TARGET_CPU, &[]).expect("cpu series");
            let memory = s.lookup(TARGET_MEMORY, &[]).expect("memory series");
            let cpu = s.gauge(cpu, 0, 2_000_000).expect("query").expect("data");
            let memory = s.gauge(memory, 0, 2_000_000).expect("query").expect("data");
            assert!((cpu.last - 42.0).abs() < 1e-9);
            assert!((memory.last - 5000.0).abs() < 1e-9, "the cgroup's figure");
        });
    }
}
