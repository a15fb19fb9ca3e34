//! The metrics store: a ring-buffer time-series store of fixed memory for the target's
//! metrics history, snapshotted to disk.
//!
//! Owns: series (a metric name and at most [`MAX_LABELS`] label pairs) of three kinds —
//! counters (read back as totals and rates), gauges (last, min, max, mean per bucket) and
//! distributions (a mergeable sketch per bucket, read back as percentiles over any window) —
//! each kept in tiers of ring buffers, coarser tiers holding longer; the memory budget and
//! series cap; the snapshot file format. Must not: read the clock (every write and query
//! takes its time as unix ms, so tests are deterministic), grow memory after a series is
//! registered, allocate or block on the write path, or do I/O except in the snapshot
//! functions (call those from a blocking task).
//!
//! # Memory
//!
//! A series' rings are allocated whole when it is registered and charged against
//! [`StoreConfig::max_bytes`]; a series past the budget or [`StoreConfig::max_series`] is
//! refused and counted ([`StoreStats`]). Bytes per bucket: counter 8 (sum), gauge 24 (min,
//! max, last as `f32`, count, `f64` sum), distribution 266 (64 `u32` bins, top bin, sum).
//! Under the default tiers (see [`StoreConfig::default`]):
//!
//! | kind | tiers | buckets | bytes per series |
//! |---|---|---|---|
//! | counter | 10 s × 1 d, 5 min × 30 d, 1 h × 365 d | 26,040 | 208,344 (203 KiB) |
//! | gauge | same | 26,040 | 624,984 (610 KiB) |
//! | distribution | 10 s × 1 h, 5 min × 1 d, 1 h × 30 d, 1 d × 365 d | 1,733 | 461,010 (450 KiB) |
//!
//! plus 512 bytes and the key's strings per series. The default 64 MiB hold, for example,
//! 30 gauges, 100 counters and 50 distributions. Distributions get coarser tiers because a
//! bucket costs 33 counter buckets: at the scalar tiers one would cost 6.6 MiB. A 1-minute
//! middle tier (43,200 buckets) would cost 474 KiB per counter and 1.4 MiB per gauge.
//!
//! # Sketch
//!
//! Log-linear bins, 8 per power of two, relative error ≤ [`RELATIVE_ERROR`] (1/17 ≈ 5.9 %)
//! for any value within [`WINDOW_SPREAD`] (256×) of its bucket's largest value; lower values
//! are reported as that floor. See [`sketch`].
//!
//! # Tiers
//!
//! Every sample is written to every tier of its series; buckets are aligned to the epoch and
//! each tier's resolution is a multiple of the finer one's, so a coarser bucket is exactly
//! the aggregate of the finer buckets it spans (counts add, gauges combine, sketches merge).
//! A sample older than its series' finest ring is dropped and counted; a sample newer than
//! the head moves it forward, overwriting the oldest buckets.

mod config;
mod key;
pub mod persist;
mod query;
mod ring;
mod series;
pub mod sketch;
mod snapshot;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub use config::{
    StoreConfig, StoreConfigError, StoreConfigProblem, TierConfig, TierList, COUNTER_SLOT_BYTES,
    DISTRIBUTION_SLOT_BYTES, GAUGE_SLOT_BYTES, MAX_TIER_SLOTS, SERIES_OVERHEAD_BYTES,
};
pub use key::{
    KeyError, LabelMatcher, Selector, SeriesKey, MAX_LABELS, MAX_LABEL_VALUE_BYTES, MAX_NAME_BYTES,
};
pub use query::{
    Aggregate, CounterSummary, DistributionSummary, GaugeSummary, Group, Percentiles, Point,
    PointValue, QueryError, Range, Summary, MAX_POINTS,
};
pub use series::{MemoryReport, RegisterError, SeriesInfo, Store, StoreStats, WriteError};
pub use sketch::{MergedSketch, WindowSketch, RELATIVE_ERROR, WINDOW_SPREAD};
pub use snapshot::{
    IoOp, LoadOutcome, LoadReport, SnapshotError, SnapshotProblem, SnapshotReport, FORMAT_VERSION,
    SNAPSHOT_FILE,
};

/// Timestamps are accepted within ±2^53 ms of the epoch (±285,000 years), so bucket
/// arithmetic cannot overflow.
pub const MAX_TIME_MS: i64 = 1 << 53;

/// What a series holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeriesKind {
    /// Increments; read back as totals and rates per second.
    Counter = 0,
    /// Samples of a level; read back as last, min, max and mean.
    Gauge = 1,
    /// Observations (latencies); read back as count, mean and percentiles.
    Distribution = 2,
}

impl fmt::Display for SeriesKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Distribution => "distribution",
        })
    }
}

/// A registered series. Cheap to copy and to write with; an id of a removed series stays
/// invalid even when its slot is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl fmt::Display for SeriesId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.index, self.generation)
    }
}

/// Unix milliseconds of a `SystemTime` (negative before 1970), for callers holding one.
pub fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The store shared between the writer task and the API: cheap to clone. Writes take the
/// write lock for O(tiers) work; queries take the read lock; snapshots take it once per
/// series, so a writer waits at most for one series to be encoded.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    inner: Arc<RwLock<Store>>,
}

impl StoreHandle {
    /// An empty store.
    pub fn new(config: StoreConfig) -> Result<Self, StoreConfigError> {
        Store::new(config).map(Self::from_store)
    }

    pub fn from_store(store: Store) -> Self {
        Self {
            inner: Arc::new(RwLock::new(store)),
        }
    }

    /// The store saved at `path`, or an empty one when the file is missing or cannot be
    /// used (the outcome says which, with the error to log). Fails only on an invalid
    /// config.
    pub fn open(config: StoreConfig, path: &Path) -> Result<(Self, LoadOutcome), StoreConfigError> {
        let empty = Store::new(config.clone())?;
        let (store, outcome) = match Store::load_snapshot(config, path) {
            Ok((store, report)) => (store, LoadOutcome::Loaded(report)),
            Err(SnapshotError::Missing { .. }) => (empty, LoadOutcome::Missing),
            Err(error) => (empty, LoadOutcome::Failed(error)),
        };
        Ok((Self::from_store(store), outcome))
    }

    /// Runs `f` under the read lock (keep it short: the writer waits).
    pub fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        // A panic under the lock cannot leave a series inconsistent in a way that matters
        // (at worst one sample is half-recorded), so a poisoned lock is used as is.
        f(&self.inner.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `f` under the write lock, e.g. a batch of writes.
    pub fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.inner.write().unwrap_or_else(PoisonError::into_inner))
    }

    /// See [`Store::get_or_register`].
    pub fn get_or_register(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        kind: SeriesKind,
    ) -> Result<SeriesId, RegisterError> {
        // The common case, an existing series, needs only the read lock.
        let existing = self.read(|store| {
            store
                .lookup(name, labels)
                .map(|id| store.check_kind(id, kind))
        });
        match existing {
            Some(result) => result,
            None => self.write(|store| store.get_or_register(name, labels, kind)),
        }
    }

    /// See [`Store::add`].
    pub fn add(&self, id: SeriesId, at_ms: i64, delta: f64) -> Result<(), WriteError> {
        self.write(|store| store.add(id, at_ms, delta))
    }

    /// See [`Store::set`].
    pub fn set(&self, id: SeriesId, at_ms: i64, value: f64) -> Result<(), WriteError> {
        self.write(|store| store.set(id, at_ms, value))
    }

    /// See [`Store::observe`].
    pub fn observe(&self, id: SeriesId, at_ms: i64, value: f64) -> Result<(), WriteError> {
        self.write(|store| store.observe(id, at_ms, value))
    }

    pub fn memory(&self) -> MemoryReport {
        self.read(Store::memory)
    }
}
