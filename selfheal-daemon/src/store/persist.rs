//! The snapshot task: saves the store to disk every `store.snapshot_interval_secs` and at
//! shutdown (on a blocking thread), and exports the store's figures as `selfheal_store_*`.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;

use super::{unix_ms, StoreHandle, StoreStats};
use crate::telemetry::{gauge_value, Metrics, ReasonLabel};

/// How often the store's figures are exported.
const EXPORT_EVERY: Duration = Duration::from_secs(5);

/// Runs until `cancel` fires, then saves a last snapshot.
pub async fn run(
    store: StoreHandle,
    path: PathBuf,
    every: Duration,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut exported = StoreStats::default();
    let mut tick = tokio::time::interval(EXPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {
                exported = export(&store, &metrics, exported);
                if last_save.elapsed() >= every {
                    last_save = Instant::now();
                    save(&store, &path, &metrics).await;
                }
            }
        }
    }
    export(&store, &metrics, exported);
    save(&store, &path, &metrics).await;
}

async fn save(store: &StoreHandle, path: &std::path::Path, metrics: &Metrics) {
    let (store, path_owned) = (store.clone(), path.to_owned());
    let result = tokio::task::spawn_blocking(move || {
        store.save_snapshot(&path_owned, unix_ms(SystemTime::now()))
    })
    .await;
    match result {
        Ok(Ok(report)) => {
            metrics.store_snapshots.inc();
            metrics.store_snapshot_bytes.set(gauge_value(report.bytes));
            metrics
                .store_snapshot_duration_seconds
                .set(report.duration.as_secs_f64());
            tracing::debug!(path = %path.display(), bytes = report.bytes, series = report.series, "metrics snapshot saved");
        }
        Ok(Err(error)) => {
            metrics.store_snapshot_failures.inc();
            tracing::warn!(path = %path.display(), error = %crate::app::error_chain(&error), "cannot save the metrics snapshot");
        }
        Err(error) => {
            metrics.store_snapshot_failures.inc();
            tracing::warn!(%error, "the metrics snapshot task failed");
        }
    }
}

/// Exports the store's size and what it refused since `before`; the statistics now.
fn export(store: &StoreHandle, metrics: &Metrics, before: StoreStats) -> StoreStats {
    let memory = store.memory();
    metrics.store_series.set(i64::from(memory.series));
    metrics
        .store_memory_bytes
        .set(gauge_value(memory.bytes_in_use));
    metrics
        .store_memory_budget_bytes
        .set(gauge_value(memory.max_bytes));
    let now = memory.stats;
    metrics
        .store_samples
        .inc_by(now.samples_accepted.saturating_sub(before.samples_accepted));
    for (reason, now, before) in [
        ("too_old", now.samples_too_old, before.samples_too_old),
        ("invalid", now.samples_invalid, before.samples_invalid),
        (
            "misaddressed",
            now.samples_misaddressed,
            before.samples_misaddressed,
        ),
    ] {
        if now > before {
            metrics
                .store_samples_dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(now - before);
        }
    }
    for (reason, now, before) in [
        (
            "series_limit",
            now.series_refused_limit,
            before.series_refused_limit,
        ),
        (
            "memory_budget",
            now.series_refused_memory,
            before.series_refused_memory,
        ),
    ] {
        if now > before {
            metrics
                .store_series_refused
                .get_or_create(&ReasonLabel { reason })
                .inc_by(now - before);
        }
    }
    now
}
