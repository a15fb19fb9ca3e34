//! The series table and the write path.

use std::collections::HashMap;

use super::{
    config::{StoreConfig, StoreConfigError},
    key::{key_hash, KeyError, SeriesKey},
    ring::{CounterSlots, DistributionSlots, GaugeSlots, Tier},
    sketch, SeriesId, SeriesKind, MAX_TIME_MS,
};

/// Why a series was not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid series key")]
    InvalidKey(#[source] KeyError),
    #[error("series {key} refused: the store holds its maximum of {max_series} series")]
    SeriesLimit { key: String, max_series: u32 },
    #[error("series {key} refused: it needs {needed} bytes and {available} of the {max_bytes}-byte budget are left")]
    MemoryBudget {
        key: String,
        needed: u64,
        available: u64,
        max_bytes: u64,
    },
    #[error("series {key} exists as a {existing}, not a {requested}")]
    KindConflict {
        key: String,
        existing: SeriesKind,
        requested: SeriesKind,
    },
}

impl From<KeyError> for RegisterError {
    fn from(source: KeyError) -> Self {
        Self::InvalidKey(source)
    }
}

/// Why a sample was not stored. Every one is counted in [`StoreStats`].
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum WriteError {
    #[error("no series {id} (removed, or from another store)")]
    UnknownSeries { id: SeriesId },
    #[error("series {id} is a {found}, not a {expected}")]
    WrongKind {
        id: SeriesId,
        expected: SeriesKind,
        found: SeriesKind,
    },
    #[error("sample at {at_ms} ms is older than the finest tier of series {id} holds")]
    TooOld { id: SeriesId, at_ms: i64 },
    #[error("timestamp {at_ms} ms is beyond ±2^53 ms")]
    InvalidTime { at_ms: i64 },
    #[error("value {value} is not valid for a {kind}")]
    InvalidValue { value: f64, kind: SeriesKind },
}

/// What the store refused or dropped since it was created (not persisted across restarts:
/// these are counters for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Samples stored.
    pub samples_accepted: u64,
    /// Samples older than their series' finest tier.
    pub samples_too_old: u64,
    /// NaN or infinite values, negative counter increments or distribution values, gauge
    /// values beyond `f32`, timestamps beyond [`super::MAX_TIME_MS`].
    pub samples_invalid: u64,
    /// Samples for a removed series or of the wrong kind.
    pub samples_misaddressed: u64,
    /// New series refused because `max_series` was reached.
    pub series_refused_limit: u64,
    /// New series refused because `max_bytes` would have been passed.
    pub series_refused_memory: u64,
}

/// The tiers of a series, by kind.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SeriesData {
    Counter(Vec<Tier<CounterSlots>>),
    Gauge(Vec<Tier<GaugeSlots>>),
    Distribution(Vec<Tier<DistributionSlots>>),
}

impl SeriesData {
    pub(crate) fn new(kind: SeriesKind, config: &StoreConfig) -> Self {
        let lens = config
            .tiers_of(kind)
            .iter()
            .map(|tier| usize::try_from(tier.slots()).unwrap_or(usize::MAX));
        match kind {
            SeriesKind::Counter => {
                Self::Counter(lens.map(|n| Tier::new(CounterSlots::new(n))).collect())
            }
            SeriesKind::Gauge => Self::Gauge(lens.map(|n| Tier::new(GaugeSlots::new(n))).collect()),
            SeriesKind::Distribution => {
                Self::Distribution(lens.map(|n| Tier::new(DistributionSlots::new(n))).collect())
            }
        }
    }

    pub(crate) fn kind(&self) -> SeriesKind {
        match self {
            Self::Counter(_) => SeriesKind::Counter,
            Self::Gauge(_) => SeriesKind::Gauge,
            Self::Distribution(_) => SeriesKind::Distribution,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub(crate) key: SeriesKey,
    pub(crate) hash: u64,
    pub(crate) data: SeriesData,
    /// Timestamp of the newest sample, `i64::MIN` before the first.
    pub(crate) newest_ms: i64,
    /// What it is charged against the budget.
    pub(crate) bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) generation: u32,
    pub(crate) series: Option<Series>,
}

/// What a series is, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesInfo {
    pub id: SeriesId,
    pub key: SeriesKey,
    pub kind: SeriesKind,
    /// Timestamp of its newest sample.
    pub newest_ms: Option<i64>,
    /// What it is charged against the budget.
    pub bytes: u64,
}

/// Memory in use and limits, for `/metrics` and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReport {
    /// Bytes charged against `max_bytes`: every series' rings, key and overhead.
    pub bytes_in_use: u64,
    pub max_bytes: u64,
    pub series: u32,
    pub max_series: u32,
    pub counters: u32,
    pub gauges: u32,
    pub distributions: u32,
    /// What one series of each kind costs (without its key) under this config.
    pub counter_series_bytes: u64,
    pub gauge_series_bytes: u64,
    pub distribution_series_bytes: u64,
    pub stats: StoreStats,
}

/// The store itself, single-threaded; [`super::StoreHandle`] shares it between tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub(crate) config: StoreConfig,
    /// Bucket width of each tier, counters and gauges.
    pub(crate) scalar_resolutions: Vec<i64>,
    /// Bucket width of each tier, distributions.
    pub(crate) distribution_resolutions: Vec<i64>,
    pub(crate) entries: Vec<Entry>,
    free: Vec<u32>,
    /// Key hash → entry indexes (almost always one).
    index: HashMap<u64, Vec<u32>>,
    live: u32,
    bytes_in_use: u64,
    pub(crate) stats: StoreStats,
}

impl Store {
    pub fn new(config: StoreConfig) -> Result<Self, StoreConfigError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StoreConfigError { problems });
        }
        let resolutions = |kind| {
            config
                .tiers_of(kind)
                .iter()
                .map(|tier| i64::try_from(tier.resolution_ms).unwrap_or(i64::MAX))
                .collect()
        };
        Ok(Self {
            scalar_resolutions: resolutions(SeriesKind::Counter),
            distribution_resolutions: resolutions(SeriesKind::Distribution),
            config,
            entries: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            live: 0,
            bytes_in_use: 0,
            stats: StoreStats::default(),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Bucket widths of the tiers of a kind.
    pub(crate) fn resolutions(&self, kind: SeriesKind) -> &[i64] {
        match kind {
            SeriesKind::Counter | SeriesKind::Gauge => &self.scalar_resolutions,
            SeriesKind::Distribution => &self.distribution_resolutions,
        }
    }

    /// The series of a key given as borrowed strings (labels in any order), without
    /// allocating.
    pub fn lookup(&self, name: &str, labels: &[(&str, &str)]) -> Option<SeriesId> {
        let hash = key_hash(name, labels.iter().copied());
        self.find(hash, |key| key.is(name, labels))
    }

    fn find(&self, hash: u64, is: impl Fn(&SeriesKey) -> bool) -> Option<SeriesId> {
        self.index.get(&hash)?.iter().find_map(|&index| {
            let entry = &self.entries[index as usize];
            entry
                .series
                .as_ref()
                .filter(|series| is(&series.key))
                .map(|_| SeriesId {
                    index,
                    generation: entry.generation,
                })
        })
    }

    /// Registers a series, or returns the existing one of the same key and kind. A new series
    /// past `max_series` or `max_bytes` is refused and counted; its memory is allocated here,
    /// whole, so writes never allocate.
    pub fn register(
        &mut self,
        key: SeriesKey,
        kind: SeriesKind,
    ) -> Result<SeriesId, RegisterError> {
        let hash = key_hash(key.name(), key.labels());
        if let Some(id) = self.find(hash, |existing| *existing == key) {
            return self.check_kind(id, kind);
        }
        if self.live >= self.config.max_series {
            self.stats.series_refused_limit += 1;
            return Err(RegisterError::SeriesLimit {
                key: key.to_string(),
                max_series: self.config.max_series,
            });
        }
        let bytes = self.config.series_bytes(kind, key.heap_bytes());
        let available = self.config.max_bytes.saturating_sub(self.bytes_in_use);
        if bytes > available {
            self.stats.series_refused_memory += 1;
            return Err(RegisterError::MemoryBudget {
                key: key.to_string(),
                needed: bytes,
                available,
                max_bytes: self.config.max_bytes,
            });
        }
        let series = Series {
            key,
            hash,
            data: SeriesData::new(kind, &self.config),
            newest_ms: i64::MIN,
            bytes,
        };
        Ok(self.insert(series))
    }

    /// [`Store::lookup`], then [`Store::register`] when the series is new: allocates only
    /// then.
    pub fn get_or_register(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        kind: SeriesKind,
    ) -> Result<SeriesId, RegisterError> {
        match self.lookup(name, labels) {
            Some(id) => self.check_kind(id, kind),
            None => self.register(SeriesKey::new(name, labels.iter().copied())?, kind),
        }
    }

    pub(crate) fn check_kind(
        &self,
        id: SeriesId,
        kind: SeriesKind,
    ) -> Result<SeriesId, RegisterError> {
        match self.get(id) {
            Some(series) if series.data.kind() != kind => Err(RegisterError::KindConflict {
                key: series.key.to_string(),
                existing: series.data.kind(),
                requested: kind,
            }),
            _ => Ok(id),
        }
    }

    /// Adds a series whose size was checked against the limits.
    pub(crate) fn insert(&mut self, series: Series) -> SeriesId {
        self.live += 1;
        self.bytes_in_use += series.bytes;
        let hash = series.hash;
        let id = if let Some(index) = self.free.pop() {
            let entry = &mut self.entries[index as usize];
            entry.series = Some(series);
            SeriesId {
                index,
                generation: entry.generation,
            }
        } else {
            let index =
                u32::try_from(self.entries.len()).expect("entries are at most max_series, a u32");
            self.entries.push(Entry {
                generation: 0,
                series: Some(series),
            });
            SeriesId {
                index,
                generation: 0,
            }
        };
        self.index.entry(hash).or_default().push(id.index);
        id
    }

    /// Whether a series of this size fits the limits now.
    pub(crate) fn fits(&self, bytes: u64) -> bool {
        self.live < self.config.max_series
            && bytes <= self.config.max_bytes.saturating_sub(self.bytes_in_use)
    }

    /// Removes a series and frees its memory. Its id is not reused: a later write with it
    /// fails with [`WriteError::UnknownSeries`]. Returns whether it existed.
    pub fn remove(&mut self, id: SeriesId) -> bool {
        let Some(entry) = self.entries.get_mut(id.index as usize) else {
            return false;
        };
        if entry.generation != id.generation {
            return false;
        }
        let Some(series) = entry.series.take() else {
            return false;
        };
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        self.bytes_in_use -= series.bytes;
        if let Some(list) = self.index.get_mut(&series.hash) {
            list.retain(|&index| index != id.index);
            if list.is_empty() {
                self.index.remove(&series.hash);
            }
        }
        true
    }

    pub(crate) fn get(&self, id: SeriesId) -> Option<&Series> {
        self.entries
            .get(id.index as usize)
            .filter(|entry| entry.generation == id.generation)?
            .series
            .as_ref()
    }

    /// Live series, in table order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SeriesId, &Series)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| {
                entry.series.as_ref().map(|series| {
                    (
                        SeriesId {
                            index: index as u32,
                            generation: entry.generation,
                        },
                        series,
                    )
                })
            })
    }

    /// What is known of one series.
    pub fn info(&self, id: SeriesId) -> Option<SeriesInfo> {
        self.get(id).map(|series| info(id, series))
    }

    /// Every live series, in registration-slot order.
    pub fn all_series(&self) -> Vec<SeriesInfo> {
        self.iter().map(|(id, series)| info(id, series)).collect()
    }

    pub fn memory(&self) -> MemoryReport {
        let mut counts = [0u32; 3];
        for (_, series) in self.iter() {
            counts[series.data.kind() as usize] += 1;
        }
        MemoryReport {
            bytes_in_use: self.bytes_in_use,
            max_bytes: self.config.max_bytes,
            series: self.live,
            max_series: self.config.max_series,
            counters: counts[SeriesKind::Counter as usize],
            gauges: counts[SeriesKind::Gauge as usize],
            distributions: counts[SeriesKind::Distribution as usize],
            counter_series_bytes: self.config.series_bytes(SeriesKind::Counter, 0),
            gauge_series_bytes: self.config.series_bytes(SeriesKind::Gauge, 0),
            distribution_series_bytes: self.config.series_bytes(SeriesKind::Distribution, 0),
            stats: self.stats,
        }
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Adds `delta` (finite, ≥ 0) to a counter at `at_ms` (unix ms).
    pub fn add(&mut self, id: SeriesId, at_ms: i64, delta: f64) -> Result<(), WriteError> {
        let result = self.write(id, at_ms, SeriesKind::Counter, delta);
        self.count(result)
    }

    /// Sets a gauge at `at_ms`. Values are kept as `f32`.
    pub fn set(&mut self, id: SeriesId, at_ms: i64, value: f64) -> Result<(), WriteError> {
        let result = self.write(id, at_ms, SeriesKind::Gauge, value);
        self.count(result)
    }

    /// Records one value (finite, ≥ 0; e.g. a latency in seconds) of a distribution at
    /// `at_ms`.
    pub fn observe(&mut self, id: SeriesId, at_ms: i64, value: f64) -> Result<(), WriteError> {
        let result = self.write(id, at_ms, SeriesKind::Distribution, value);
        self.count(result)
    }

    fn count(&mut self, result: Result<(), WriteError>) -> Result<(), WriteError> {
        let stats = &mut self.stats;
        match result {
            Ok(()) => stats.samples_accepted += 1,
            Err(WriteError::TooOld { .. }) => stats.samples_too_old += 1,
            Err(WriteError::InvalidValue { .. } | WriteError::InvalidTime { .. }) => {
                stats.samples_invalid += 1;
            }
            Err(WriteError::UnknownSeries { .. } | WriteError::WrongKind { .. }) => {
                stats.samples_misaddressed += 1;
            }
        }
        result
    }

    /// The write path: O(tiers), no allocation.
    fn write(
        &mut self,
        id: SeriesId,
        at_ms: i64,
        expected: SeriesKind,
        value: f64,
    ) -> Result<(), WriteError> {
        let Some(series) = self
            .entries
            .get_mut(id.index as usize)
            .filter(|entry| entry.generation == id.generation)
            .and_then(|entry| entry.series.as_mut())
        else {
            return Err(WriteError::UnknownSeries { id });
        };
        if !(-MAX_TIME_MS..=MAX_TIME_MS).contains(&at_ms) {
            return Err(WriteError::InvalidTime { at_ms });
        }
        let found = series.data.kind();
        if found != expected {
            return Err(WriteError::WrongKind {
                id,
                expected,
                found,
            });
        }
        let valid = match expected {
            SeriesKind::Counter | SeriesKind::Distribution => value.is_finite() && value >= 0.0,
            SeriesKind::Gauge => (value as f32).is_finite(),
        };
        if !valid {
            return Err(WriteError::InvalidValue {
                value,
                kind: expected,
            });
        }
        let resolutions = match expected {
            SeriesKind::Counter | SeriesKind::Gauge => &self.scalar_resolutions,
            SeriesKind::Distribution => &self.distribution_resolutions,
        };
        let bucket = |tier: usize| at_ms.div_euclid(resolutions[tier]);
        // Validation makes every coarser tier hold at least what the finest holds, so a
        // sample the finest tier accepts fits every tier.
        let accepted = match &series.data {
            SeriesData::Counter(tiers) => tiers[0].accepts(bucket(0)),
            SeriesData::Gauge(tiers) => tiers[0].accepts(bucket(0)),
            SeriesData::Distribution(tiers) => tiers[0].accepts(bucket(0)),
        };
        if !accepted {
            return Err(WriteError::TooOld { id, at_ms });
        }
        let newest = at_ms >= series.newest_ms;
        match &mut series.data {
            SeriesData::Counter(tiers) => {
                for (i, tier) in tiers.iter_mut().enumerate() {
                    if let Some(slot) = tier.slot_for_write(bucket(i)) {
                        tier.slots.sums[slot] += value;
                    }
                }
            }
            SeriesData::Gauge(tiers) => {
                for (i, tier) in tiers.iter_mut().enumerate() {
                    if let Some(slot) = tier.slot_for_write(bucket(i)) {
                        tier.slots.record(slot, value, newest);
                    }
                }
            }
            SeriesData::Distribution(tiers) => {
                let index = sketch::bin_index(value);
                for (i, tier) in tiers.iter_mut().enumerate() {
                    if let Some(slot) = tier.slot_for_write(bucket(i)) {
                        tier.slots.record(slot, index, value);
                    }
                }
            }
        }
        if newest {
            series.newest_ms = at_ms;
        }
        Ok(())
    }
}

fn info(id: SeriesId, series: &Series) -> SeriesInfo {
    SeriesInfo {
        id,
        key: series.key.clone(),
        kind: series.data.kind(),
        newest_ms: (series.newest_ms != i64::MIN).then_some(series.newest_ms),
        bytes: series.bytes,
    }
}
