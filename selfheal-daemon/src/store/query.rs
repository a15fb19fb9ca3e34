//! Reads: summaries of a window (rate, gauge statistics, percentiles) for one series or a
//! group of series, range queries of one series or of several merged per step, and
//! selection by name and labels.
//!
//! A window `[from_ms, to_ms)` is answered from one tier: the finest whose ring still holds
//! the window's first bucket for every series involved (else the coarsest, and the answer
//! says it is incomplete). A merged range query ([`Store::range_of`]) picks among the tiers
//! whose resolution divides its step only, so its points are exactly the steps asked for and
//! line up with those of series of another kind (whose tiers differ). A bucket counts when
//! its start lies in the window, so windows are rounded to the tier's buckets; rates divide
//! by the time those buckets span up to `to_ms`.

use std::collections::BTreeMap;

use super::{
    key::Selector,
    ring::{GaugeCell, Tier},
    series::{SeriesData, SeriesInfo, Store},
    sketch::MergedSketch,
    SeriesId, SeriesKind, MAX_TIME_MS,
};

/// The most points a range query returns (a day of 10 s buckets is 8,640).
pub const MAX_POINTS: u64 = 11_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("no series {id}")]
    UnknownSeries { id: SeriesId },
    #[error("series {id} is a {found}, and this query needs a {expected}")]
    WrongKind {
        id: SeriesId,
        expected: SeriesKind,
        found: SeriesKind,
    },
    #[error("series of different kinds ({first} and {other}) cannot be summarized together")]
    MixedKinds {
        first: SeriesKind,
        other: SeriesKind,
    },
    #[error("window [{from_ms}, {to_ms}) is empty")]
    EmptyWindow { from_ms: i64, to_ms: i64 },
    #[error("step_ms must be positive")]
    ZeroStep,
    #[error("{points} points asked for, more than {MAX_POINTS}")]
    TooManyPoints { points: u64 },
    #[error("no series given")]
    NoSeries,
    #[error("step_ms {step_ms} is not a multiple of any tier's resolution")]
    StepNotAligned { step_ms: u64 },
}

/// A counter (or a distribution's sample count) over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CounterSummary {
    pub total: f64,
    pub rate_per_sec: f64,
}

/// A gauge over a window: `last` is the last value of the newest bucket with samples (across
/// several series, the largest such value); `mean` weighs every sample equally.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaugeSummary {
    pub last: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub samples: u64,
}

/// A distribution over a window: its buckets' sketches merged.
#[derive(Debug, Clone, PartialEq)]
pub struct DistributionSummary {
    /// Samples per second.
    pub rate_per_sec: f64,
    pub sketch: MergedSketch,
}

/// The usual percentiles of a distribution, each within [`super::RELATIVE_ERROR`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl DistributionSummary {
    pub fn count(&self) -> u64 {
        self.sketch.count()
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.quantile(q)
    }

    /// Count, mean, p50, p95 and p99; `None` when there are no samples.
    pub fn percentiles(&self) -> Option<Percentiles> {
        Some(Percentiles {
            count: self.sketch.count(),
            mean: self.sketch.mean()?,
            p50: self.sketch.quantile(0.5)?,
            p95: self.sketch.quantile(0.95)?,
            p99: self.sketch.quantile(0.99)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    Counter(CounterSummary),
    Gauge(GaugeSummary),
    Distribution(DistributionSummary),
}

/// One or more series over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Bucket width of the tier that answered.
    pub tier_resolution_ms: u64,
    /// Whether that tier held the whole window for every series.
    pub complete: bool,
    /// `None` when there is no data in the window (a counter with no increments has data:
    /// zero).
    pub aggregate: Option<Aggregate>,
}

/// The series sharing one value of the grouping label, summarized together.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The label's value; `None` for series without the label.
    pub label_value: Option<String>,
    pub series: Vec<SeriesId>,
    pub summary: Summary,
}

/// One step of a range query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PointValue {
    /// Total and rate over the step.
    Counter(CounterSummary),
    Gauge(GaugeSummary),
    Distribution(Percentiles),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Start of the step's first bucket.
    pub at_ms: i64,
    /// `None` when the step holds no data (or is older than the tier).
    pub value: Option<PointValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    pub kind: SeriesKind,
    pub tier_resolution_ms: u64,
    /// The step asked for, rounded up to a multiple of the tier's resolution.
    pub step_ms: u64,
    pub complete: bool,
    pub points: Vec<Point>,
}

#[derive(Debug, Default)]
struct GaugeAcc {
    min: f64,
    max: f64,
    sum: f64,
    count: u64,
    last: f64,
    last_bucket: Option<i64>,
}

impl GaugeAcc {
    fn add(&mut self, bucket: i64, cell: GaugeCell) {
        if self.count == 0 {
            self.min = cell.min;
            self.max = cell.max;
        } else {
            self.min = self.min.min(cell.min);
            self.max = self.max.max(cell.max);
        }
        self.count += cell.count;
        self.sum += cell.sum;
        let newer = match self.last_bucket {
            None => true,
            Some(last) => bucket > last || (bucket == last && cell.last > self.last),
        };
        if newer {
            self.last = cell.last;
            self.last_bucket = Some(bucket);
        }
    }

    fn finish(&self) -> Option<GaugeSummary> {
        (self.count > 0).then(|| GaugeSummary {
            last: self.last,
            min: self.min,
            max: self.max,
            mean: self.sum / self.count as f64,
            samples: self.count,
        })
    }
}

#[derive(Debug)]
enum Acc {
    /// Total, and whether any bucket of the window is within the ring.
    Counter(f64, bool),
    Gauge(GaugeAcc),
    Distribution(MergedSketch),
}

impl Acc {
    fn new(kind: SeriesKind) -> Self {
        match kind {
            SeriesKind::Counter => Self::Counter(0.0, false),
            SeriesKind::Gauge => Self::Gauge(GaugeAcc::default()),
            SeriesKind::Distribution => Self::Distribution(MergedSketch::new()),
        }
    }

    fn finish(self, seconds: f64) -> Option<Aggregate> {
        let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        match self {
            Self::Counter(total, known) => known.then(|| {
                Aggregate::Counter(CounterSummary {
                    total,
                    rate_per_sec: per_second(total),
                })
            }),
            Self::Gauge(acc) => acc.finish().map(Aggregate::Gauge),
            Self::Distribution(sketch) => (sketch.count() > 0).then(|| {
                Aggregate::Distribution(DistributionSummary {
                    rate_per_sec: per_second(sketch.count() as f64),
                    sketch,
                })
            }),
        }
    }
}

/// Buckets `[first, end)` that a tier holds.
fn held<S: super::ring::Slots>(tier: &Tier<S>, first: i64, end: i64) -> std::ops::Range<i64> {
    match tier.oldest() {
        None => 0..0,
        Some(oldest) => first.max(oldest)..end.min(tier.head + 1),
    }
}

fn slot<S: super::ring::Slots>(tier: &Tier<S>, bucket: i64) -> usize {
    bucket.rem_euclid(tier.slots.len() as i64) as usize
}

/// Adds buckets `[first, end)` of one tier of a series to an accumulator of its kind.
fn accumulate(data: &SeriesData, tier: usize, first: i64, end: i64, acc: &mut Acc) {
    match (data, acc) {
        (SeriesData::Counter(tiers), Acc::Counter(total, known)) => {
            let tier = &tiers[tier];
            if tier.oldest().is_some_and(|oldest| end > oldest) {
                *known = true;
            }
            for bucket in held(tier, first, end) {
                *total += tier.slots.sums[slot(tier, bucket)];
            }
        }
        (SeriesData::Gauge(tiers), Acc::Gauge(acc)) => {
            let tier = &tiers[tier];
            for bucket in held(tier, first, end) {
                if let Some(cell) = tier.slots.cell(slot(tier, bucket)) {
                    acc.add(bucket, cell);
                }
            }
        }
        (SeriesData::Distribution(tiers), Acc::Distribution(sketch)) => {
            let tier = &tiers[tier];
            for bucket in held(tier, first, end) {
                if let Some((top, bins, sum)) = tier.slots.window(slot(tier, bucket)) {
                    sketch.add_window(bins, top, sum);
                }
            }
        }
        // Callers check kinds first.
        _ => {}
    }
}

fn oldest(data: &SeriesData, tier: usize) -> Option<i64> {
    match data {
        SeriesData::Counter(tiers) => tiers[tier].oldest(),
        SeriesData::Gauge(tiers) => tiers[tier].oldest(),
        SeriesData::Distribution(tiers) => tiers[tier].oldest(),
    }
}

/// Window bounds are clamped to what writes accept, so bucket arithmetic cannot overflow.
fn clamp_time(ms: i64) -> i64 {
    ms.clamp(-MAX_TIME_MS, MAX_TIME_MS)
}

fn ceil_div(value: i64, divisor: i64) -> i64 {
    value.div_euclid(divisor) + i64::from(value.rem_euclid(divisor) != 0)
}

/// Whether a tier holds the first bucket of a window starting at `from_ms`.
fn covers(data: &SeriesData, tier: usize, resolution: i64, from_ms: i64) -> bool {
    oldest(data, tier).is_none_or(|oldest| ceil_div(from_ms, resolution) >= oldest)
}

/// The finest tier covering `from_ms` for every series, and whether it does.
fn choose_tier(series: &[&SeriesData], resolutions: &[i64], from_ms: i64) -> (usize, bool) {
    for (tier, &resolution) in resolutions.iter().enumerate() {
        if series
            .iter()
            .all(|data| covers(data, tier, resolution, from_ms))
        {
            return (tier, true);
        }
    }
    (resolutions.len() - 1, false)
}

impl Store {
    /// Every series the selector matches.
    pub fn select(&self, selector: &Selector) -> Vec<SeriesInfo> {
        self.iter()
            .filter(|(_, series)| selector.matches(&series.key))
            .filter_map(|(id, _)| self.info(id))
            .collect()
    }

    /// Summarizes series of one kind together over `[from_ms, to_ms)`: counters add, gauges
    /// combine, distributions merge.
    pub fn summarize(
        &self,
        ids: &[SeriesId],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Summary, QueryError> {
        let (from_ms, to_ms) = (clamp_time(from_ms), clamp_time(to_ms));
        if from_ms >= to_ms {
            return Err(QueryError::EmptyWindow { from_ms, to_ms });
        }
        let mut data = Vec::with_capacity(ids.len());
        for &id in ids {
            data.push(&self.get(id).ok_or(QueryError::UnknownSeries { id })?.data);
        }
        let Some(kind) = data.first().map(|d| d.kind()) else {
            return Ok(Summary {
                tier_resolution_ms: 0,
                complete: true,
                aggregate: None,
            });
        };
        if let Some(other) = data.iter().map(|d| d.kind()).find(|&k| k != kind) {
            return Err(QueryError::MixedKinds { first: kind, other });
        }
        let resolutions = self.resolutions(kind);
        let (tier, complete) = choose_tier(&data, resolutions, from_ms);
        let resolution = resolutions[tier];
        let first = ceil_div(from_ms, resolution);
        let end = ceil_div(to_ms, resolution);
        let mut acc = Acc::new(kind);
        for series in &data {
            accumulate(series, tier, first, end, &mut acc);
        }
        Ok(Summary {
            tier_resolution_ms: resolution as u64,
            complete,
            aggregate: acc.finish(seconds(first, end, resolution, to_ms)),
        })
    }

    /// The series the selector matches, grouped by the value of `group_by` and summarized
    /// per group (e.g. p95 per route of one platform), ordered by that value.
    pub fn summarize_by(
        &self,
        selector: &Selector,
        group_by: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Group>, QueryError> {
        let mut groups: BTreeMap<Option<&str>, Vec<SeriesId>> = BTreeMap::new();
        for (id, series) in self.iter() {
            if selector.matches(&series.key) {
                groups
                    .entry(series.key.label(group_by))
                    .or_default()
                    .push(id);
            }
        }
        groups
            .into_iter()
            .map(|(value, series)| {
                Ok(Group {
                    label_value: value.map(str::to_owned),
                    summary: self.summarize(&series, from_ms, to_ms)?,
                    series,
                })
            })
            .collect()
    }

    /// Counter increments per second, or a distribution's samples per second, over the
    /// window. `None` when the window is older than the store holds.
    pub fn rate(&self, id: SeriesId, from_ms: i64, to_ms: i64) -> Result<Option<f64>, QueryError> {
        self.expect_kind(id, &[SeriesKind::Counter, SeriesKind::Distribution])?;
        let summary = self.summarize(&[id], from_ms, to_ms)?;
        Ok(match summary.aggregate {
            Some(Aggregate::Counter(c)) => Some(c.rate_per_sec),
            Some(Aggregate::Distribution(d)) => Some(d.rate_per_sec),
            // A distribution without samples in a window the store holds has a rate of zero.
            None if summary.complete
                && self
                    .get(id)
                    .is_some_and(|s| s.data.kind() == SeriesKind::Distribution) =>
            {
                Some(0.0)
            }
            _ => None,
        })
    }

    /// Count, mean, p50, p95 and p99 of a distribution over the window.
    pub fn percentiles(
        &self,
        id: SeriesId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<Percentiles>, QueryError> {
        self.expect_kind(id, &[SeriesKind::Distribution])?;
        Ok(match self.summarize(&[id], from_ms, to_ms)?.aggregate {
            Some(Aggregate::Distribution(d)) => d.percentiles(),
            _ => None,
        })
    }

    /// Last, min, max and mean of a gauge over the window.
    pub fn gauge(
        &self,
        id: SeriesId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<GaugeSummary>, QueryError> {
        self.expect_kind(id, &[SeriesKind::Gauge])?;
        Ok(match self.summarize(&[id], from_ms, to_ms)?.aggregate {
            Some(Aggregate::Gauge(g)) => Some(g),
            _ => None,
        })
    }

    fn expect_kind(&self, id: SeriesId, kinds: &[SeriesKind]) -> Result<(), QueryError> {
        let found = self
            .get(id)
            .ok_or(QueryError::UnknownSeries { id })?
            .data
            .kind();
        if kinds.contains(&found) {
            Ok(())
        } else {
            Err(QueryError::WrongKind {
                id,
                expected: kinds[0],
                found,
            })
        }
    }

    /// One series over `[from_ms, to_ms)` in steps of `step_ms` (rounded up to the answering
    /// tier's resolution): a counter's total and rate, a gauge's statistics, or a
    /// distribution's percentiles per step.
    pub fn range(
        &self,
        id: SeriesId,
        from_ms: i64,
        to_ms: i64,
        step_ms: u64,
    ) -> Result<Range, QueryError> {
        let (from_ms, to_ms) = check_range(from_ms, to_ms, step_ms)?;
        let series = self.get(id).ok_or(QueryError::UnknownSeries { id })?;
        let kind = series.data.kind();
        let resolutions = self.resolutions(kind);
        let (tier, complete) = choose_tier(&[&series.data], resolutions, from_ms);
        points(
            &[&series.data],
            kind,
            resolutions[tier],
            tier,
            complete,
            from_ms,
            to_ms,
            step_ms,
        )
    }

    /// Several series of one kind over `[from_ms, to_ms)`, merged per step (counters add,
    /// gauges combine, distributions merge before their percentiles are taken), in steps of
    /// exactly `step_ms`. The answer comes from the finest tier whose resolution divides
    /// `step_ms` and that holds the window for every series, else from the coarsest tier
    /// whose resolution divides it (and says it is incomplete); no tier's resolution dividing
    /// it is [`QueryError::StepNotAligned`]. When `from_ms` is a multiple of `step_ms`, point
    /// `k` is exactly `[from_ms + k·step_ms, from_ms + (k+1)·step_ms)` whatever the tier,
    /// so ranges of series of different kinds line up point for point.
    pub fn range_of(
        &self,
        ids: &[SeriesId],
        from_ms: i64,
        to_ms: i64,
        step_ms: u64,
    ) -> Result<Range, QueryError> {
        let (from_ms, to_ms) = check_range(from_ms, to_ms, step_ms)?;
        let mut data = Vec::with_capacity(ids.len());
        for &id in ids {
            data.push(&self.get(id).ok_or(QueryError::UnknownSeries { id })?.data);
        }
        let kind = data.first().ok_or(QueryError::NoSeries)?.kind();
        if let Some(other) = data.iter().map(|d| d.kind()).find(|&k| k != kind) {
            return Err(QueryError::MixedKinds { first: kind, other });
        }
        let resolutions = self.resolutions(kind);
        let aligned: Vec<usize> = (0..resolutions.len())
            .filter(|&tier| step_ms.is_multiple_of(resolutions[tier].unsigned_abs()))
            .collect();
        let coarsest = *aligned
            .last()
            .ok_or(QueryError::StepNotAligned { step_ms })?;
        let (tier, complete) = aligned
            .iter()
            .copied()
            .find(|&tier| {
                data.iter()
                    .all(|d| covers(d, tier, resolutions[tier], from_ms))
            })
            .map_or((coarsest, false), |tier| (tier, true));
        points(
            &data,
            kind,
            resolutions[tier],
            tier,
            complete,
            from_ms,
            to_ms,
            step_ms,
        )
    }
}

/// The window clamped to what writes accept, refused when empty or without a step.
fn check_range(from_ms: i64, to_ms: i64, step_ms: u64) -> Result<(i64, i64), QueryError> {
    let (from_ms, to_ms) = (clamp_time(from_ms), clamp_time(to_ms));
    if from_ms >= to_ms {
        return Err(QueryError::EmptyWindow { from_ms, to_ms });
    }
    if step_ms == 0 {
        return Err(QueryError::ZeroStep);
    }
    Ok((from_ms, to_ms))
}

/// The points of a range query answered from `tier` (of `resolution` ms) of `data`, all of
/// `kind`, merged per step of `step_ms` rounded up to the resolution.
#[expect(
    clippy::too_many_arguments,
    reason = "the two range queries share this loop; a struct would only name the same eight values"
)]
fn points(
    data: &[&SeriesData],
    kind: SeriesKind,
    resolution: i64,
    tier: usize,
    complete: bool,
    from_ms: i64,
    to_ms: i64,
    step_ms: u64,
) -> Result<Range, QueryError> {
    // Far more than any window, and small enough that step arithmetic cannot overflow.
    let step_ms = step_ms.min(1 << 55) as i64;
    let step_buckets = ceil_div(step_ms, resolution);
    let first = ceil_div(from_ms, resolution);
    let end = ceil_div(to_ms, resolution);
    let points = ceil_div(end - first, step_buckets).max(0) as u64;
    if points > MAX_POINTS {
        return Err(QueryError::TooManyPoints { points });
    }
    let points = (0..points as i64)
        .map(|k| {
            let start = first + k * step_buckets;
            let stop = (start + step_buckets).min(end);
            let mut acc = Acc::new(kind);
            for series in data {
                accumulate(series, tier, start, stop, &mut acc);
            }
            let value = acc
                .finish(seconds(start, stop, resolution, to_ms))
                .and_then(|aggregate| match aggregate {
                    Aggregate::Counter(c) => Some(PointValue::Counter(c)),
                    Aggregate::Gauge(g) => Some(PointValue::Gauge(g)),
                    Aggregate::Distribution(d) => d.percentiles().map(PointValue::Distribution),
                });
            Point {
                at_ms: start * resolution,
                value,
            }
        })
        .collect();
    Ok(Range {
        kind,
        tier_resolution_ms: resolution as u64,
        step_ms: (step_buckets * resolution) as u64,
        complete,
        points,
    })
}

/// Seconds spanned by buckets `[first, end)`, cut at `to_ms` (the bucket being filled
/// holds data only up to then).
fn seconds(first: i64, end: i64, resolution: i64, to_ms: i64) -> f64 {
    let span_ms = (end * resolution).min(to_ms) - first * resolution;
    span_ms.max(0) as f64 / 1000.0
}
