//! The store's configuration: memory budget, series cap and the tiers of each kind, with
//! the memory each series costs under them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{sketch::WINDOW, SeriesKind};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The most buckets one tier may hold (about 194 days of 1 s buckets).
pub const MAX_TIER_SLOTS: u64 = 1 << 24;

/// Bytes of one bucket of a counter: the sum of its increments (`f64`).
pub const COUNTER_SLOT_BYTES: u64 = 8;
/// Bytes of one bucket of a gauge: min, max and last (`f32` each), sample count (`u32`)
/// and sum (`f64`, for the mean).
pub const GAUGE_SLOT_BYTES: u64 = 4 + 4 + 4 + 4 + 8;
/// Bytes of one bucket of a distribution: [`WINDOW`] bin counts (`u32`), the window's top
/// bin (`i16`) and the sum of the values (`f64`, for the mean).
pub const DISTRIBUTION_SLOT_BYTES: u64 = WINDOW as u64 * 4 + 2 + 8;
/// Bytes a series costs beyond its buckets, rounded up: its table entry and record (about
/// 100), its tier headers (up to 90 each) and its index entry (about 60). Key strings are
/// counted on top, at their length plus 32 bytes per label.
pub const SERIES_OVERHEAD_BYTES: u64 = 512;

/// The metrics store's section of the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Memory for all series together. A series that would pass it is refused and counted.
    pub max_bytes: u64,
    /// Series at most, whatever their size.
    pub max_series: u32,
    /// Tiers of counters and gauges, finest first.
    pub tiers: Vec<TierConfig>,
    /// Tiers of distributions, finest first. Coarser than `tiers` by default: a
    /// distribution bucket costs 33 times a counter's (see the `store` module docs).
    pub distribution_tiers: Vec<TierConfig>,
    /// How often the daemon snapshots the store to disk: a restart loses at most this much.
    pub snapshot_interval_secs: u64,
}

impl Default for StoreConfig {
    /// 64 MiB and 1024 series. Counters and gauges: 10 s for a day, 5 min for 30 days,
    /// 1 h for a year. Distributions: 10 s for an hour, 5 min for a day, 1 h for 30 days,
    /// 1 day for a year.
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_series: 1024,
            tiers: vec![
                TierConfig::new(10 * SECOND_MS, DAY_MS),
                TierConfig::new(5 * MINUTE_MS, 30 * DAY_MS),
                TierConfig::new(HOUR_MS, 365 * DAY_MS),
            ],
            distribution_tiers: vec![
                TierConfig::new(10 * SECOND_MS, HOUR_MS),
                TierConfig::new(5 * MINUTE_MS, DAY_MS),
                TierConfig::new(HOUR_MS, 30 * DAY_MS),
                TierConfig::new(DAY_MS, 365 * DAY_MS),
            ],
            snapshot_interval_secs: 60,
        }
    }
}

/// One tier: buckets of `resolution_ms`, kept for `retention_ms`. Buckets are aligned to the
/// unix epoch (hour buckets start on the hour, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub resolution_ms: u64,
    pub retention_ms: u64,
}

impl TierConfig {
    pub const fn new(resolution_ms: u64, retention_ms: u64) -> Self {
        Self {
            resolution_ms,
            retention_ms,
        }
    }

    /// Buckets in the ring.
    pub const fn slots(&self) -> u64 {
        match self.retention_ms.checked_div(self.resolution_ms) {
            Some(slots) => slots,
            None => 0,
        }
    }
}

/// Which tier list a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierList {
    Tiers,
    DistributionTiers,
}

impl fmt::Display for TierList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tiers => "tiers",
            Self::DistributionTiers => "distribution_tiers",
        })
    }
}

/// A [`StoreConfig`] that cannot be used, with every problem it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{count} problem(s) in the metrics store config", count = problems.len())]
pub struct StoreConfigError {
    pub problems: Vec<StoreConfigProblem>,
}

/// A problem with a [`StoreConfig`], with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreConfigProblem {
    #[error("snapshot_interval_secs: must be between 1 and 86400")]
    SnapshotInterval,
    #[error("{list}: at least one tier is needed")]
    NoTiers { list: TierList },
    #[error("{list}[{index}].resolution_ms: must be positive")]
    ZeroResolution { list: TierList, index: usize },
    #[error("{list}[{index}].retention_ms: {retention_ms} is not a positive multiple of resolution_ms {resolution_ms}")]
    RetentionNotMultiple {
        list: TierList,
        index: usize,
        resolution_ms: u64,
        retention_ms: u64,
    },
    #[error("{list}[{index}].retention_ms: {slots} buckets is more than {MAX_TIER_SLOTS}")]
    TooManySlots {
        list: TierList,
        index: usize,
        slots: u64,
    },
    #[error("{list}[{index}].resolution_ms: {resolution_ms} is not a multiple of the finer tier's {finer_ms}, so its buckets would not be unions of the finer ones")]
    ResolutionNotMultiple {
        list: TierList,
        index: usize,
        resolution_ms: u64,
        finer_ms: u64,
    },
    #[error("{list}[{index}].retention_ms: must be at least the finer tier's ({finer_ms}) plus this tier's resolution_ms, so that a coarser tier holds every sample the finer one does")]
    RetentionTooShort {
        list: TierList,
        index: usize,
        finer_ms: u64,
    },
}

impl StoreConfig {
    /// Every problem of the config; empty when it is valid.
    pub fn problems(&self) -> Vec<StoreConfigProblem> {
        let mut problems = Vec::new();
        if !(1..=86_400).contains(&self.snapshot_interval_secs) {
            problems.push(StoreConfigProblem::SnapshotInterval);
        }
        for (list, tiers) in [
            (TierList::Tiers, &self.tiers),
            (TierList::DistributionTiers, &self.distribution_tiers),
        ] {
            tier_problems(list, tiers, &mut problems);
        }
        problems
    }

    /// The tiers of a kind.
    pub fn tiers_of(&self, kind: SeriesKind) -> &[TierConfig] {
        match kind {
            SeriesKind::Counter | SeriesKind::Gauge => &self.tiers,
            SeriesKind::Distribution => &self.distribution_tiers,
        }
    }

    /// Bytes of ring buffers one series of `kind` holds: Σ over its tiers of buckets × bytes
    /// per bucket (plus an 8-byte head per tier).
    pub fn ring_bytes(&self, kind: SeriesKind) -> u64 {
        let per_slot = match kind {
            SeriesKind::Counter => COUNTER_SLOT_BYTES,
            SeriesKind::Gauge => GAUGE_SLOT_BYTES,
            SeriesKind::Distribution => DISTRIBUTION_SLOT_BYTES,
        };
        self.tiers_of(kind)
            .iter()
            .map(|tier| tier.slots() * per_slot + 8)
            .sum()
    }

    /// Bytes a series of `kind` is charged against `max_bytes`, for a key of `key_bytes`.
    pub fn series_bytes(&self, kind: SeriesKind, key_bytes: u64) -> u64 {
        self.ring_bytes(kind) + SERIES_OVERHEAD_BYTES + key_bytes
    }
}

fn tier_problems(list: TierList, tiers: &[TierConfig], problems: &mut Vec<StoreConfigProblem>) {
    if tiers.is_empty() {
        problems.push(StoreConfigProblem::NoTiers { list });
        return;
    }
    for (index, tier) in tiers.iter().enumerate() {
        if tier.resolution_ms == 0 {
            problems.push(StoreConfigProblem::ZeroResolution { list, index });
            continue;
        }
        if tier.retention_ms == 0 || tier.retention_ms % tier.resolution_ms != 0 {
            problems.push(StoreConfigProblem::RetentionNotMultiple {
                list,
                index,
                resolution_ms: tier.resolution_ms,
                retention_ms: tier.retention_ms,
            });
        }
        if tier.slots() > MAX_TIER_SLOTS {
            problems.push(StoreConfigProblem::TooManySlots {
                list,
                index,
                slots: tier.slots(),
            });
        }
        let Some(finer) = index.checked_sub(1).map(|i| tiers[i]) else {
            continue;
        };
        if finer.resolution_ms == 0 {
            continue;
        }
        if tier.resolution_ms % finer.resolution_ms != 0 {
            problems.push(StoreConfigProblem::ResolutionNotMultiple {
                list,
                index,
                resolution_ms: tier.resolution_ms,
                finer_ms: finer.resolution_ms,
            });
        }
        if tier.retention_ms < finer.retention_ms.saturating_add(tier.resolution_ms) {
            problems.push(StoreConfigProblem::RetentionTooShort {
                list,
                index,
                finer_ms: finer.retention_ms,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(StoreConfig::default().problems(), vec![]);
    }

    /// The numbers ARCHITECTURE.md and the module docs give.
    #[test]
    fn default_costs_are_the_documented_ones() {
        let config = StoreConfig::default();
        let slots: Vec<u64> = config.tiers.iter().map(TierConfig::slots).collect();
        assert_eq!(slots, [8_640, 8_640, 8_760]);
        let slots: Vec<u64> = config
            .distribution_tiers
            .iter()
            .map(TierConfig::slots)
            .collect();
        assert_eq!(slots, [360, 288, 720, 365]);
        assert_eq!(config.ring_bytes(SeriesKind::Counter), 208_344);
        assert_eq!(config.ring_bytes(SeriesKind::Gauge), 624_984);
        assert_eq!(config.ring_bytes(SeriesKind::Distribution), 461_010);
    }

    #[test]
    fn every_problem_is_reported() {
        let config = StoreConfig {
            tiers: vec![
                TierConfig::new(0, 10),
                TierConfig::new(10, 25),
                TierConfig::new(15, 30),
            ],
            distribution_tiers: vec![],
            ..StoreConfig::default()
        };
        let problems = config.problems();
        assert_eq!(
            problems,
            vec![
                StoreConfigProblem::ZeroResolution {
                    list: TierList::Tiers,
                    index: 0
                },
                StoreConfigProblem::RetentionNotMultiple {
                    list: TierList::Tiers,
                    index: 1,
                    resolution_ms: 10,
                    retention_ms: 25
                },
                StoreConfigProblem::ResolutionNotMultiple {
                    list: TierList::Tiers,
                    index: 2,
                    resolution_ms: 15,
                    finer_ms: 10
                },
                StoreConfigProblem::RetentionTooShort {
                    list: TierList::Tiers,
                    index: 2,
                    finer_ms: 25
                },
                StoreConfigProblem::NoTiers {
                    list: TierList::DistributionTiers
                },
            ]
        );
        assert_eq!(
            problems[1].to_string(),
            "tiers[1].retention_ms: 25 is not a positive multiple of resolution_ms 10"
        );
    }

    #[test]
    fn parses_from_toml_with_defaults() {
        let config: StoreConfig = toml::from_str(
            "max_bytes = 1048576\n[[tiers]]\nresolution_ms = 1000\nretention_ms = 60000\n",
        )
        .expect("valid toml");
        assert_eq!(config.max_bytes, 1 << 20);
        assert_eq!(config.tiers, vec![TierConfig::new(1_000, 60_000)]);
        assert_eq!(
            config.distribution_tiers,
            StoreConfig::default().distribution_tiers
        );
        assert!(toml::from_str::<StoreConfig>("max_byte = 1").is_err());
    }
}
