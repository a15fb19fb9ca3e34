//! Tests of the store as a whole: each kind, tier roll-up, limits, rings, snapshots.

#![expect(
    clippy::float_cmp,
    reason = "the data are small integers or copies of stored values: comparisons are exact"
)]

use std::{path::Path, time::Duration};

use proptest::prelude::*;

use super::{
    ring::{Slots, Tier},
    series::SeriesData,
    sketch::MergedSketch,
    *,
};

const T0: i64 = 1_700_000_000_000;

/// Small tiers so tests cross them quickly: 1 s × 10, 5 s × 12, 30 s × 10.
fn small_config() -> StoreConfig {
    let tiers = vec![
        TierConfig::new(1_000, 10_000),
        TierConfig::new(5_000, 60_000),
        TierConfig::new(30_000, 300_000),
    ];
    StoreConfig {
        max_bytes: 16 << 20,
        max_series: 64,
        tiers: tiers.clone(),
        distribution_tiers: tiers,
        ..StoreConfig::default()
    }
}

fn store() -> Store {
    Store::new(small_config()).expect("valid config")
}

fn register(store: &mut Store, name: &str, labels: &[(&str, &str)], kind: SeriesKind) -> SeriesId {
    store
        .get_or_register(name, labels, kind)
        .expect("registered")
}

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn within_error(estimate: f64, exact: f64) -> bool {
    (estimate - exact).abs() <= RELATIVE_ERROR * exact * (1.0 + 1e-9)
}

#[test]
fn counters_read_back_as_totals_and_rates() {
    let mut s = store();
    let id = register(
        &mut s,
        "requests",
        &[("platform", "a")],
        SeriesKind::Counter,
    );
    for i in 0..60 {
        s.add(id, T0 + i * 1_000, 2.0).expect("accepted");
    }
    let now = T0 + 60_000;
    // The last 10 s: tier 0 (1 s buckets).
    let summary = s.summarize(&[id], now - 10_000, now).expect("query");
    assert_eq!(summary.tier_resolution_ms, 1_000);
    assert!(summary.complete);
    assert_eq!(
        summary.aggregate,
        Some(Aggregate::Counter(CounterSummary {
            total: 20.0,
            rate_per_sec: 2.0
        }))
    );
    assert_eq!(s.rate(id, now - 10_000, now), Ok(Some(2.0)));
    // The last 50 s: tier 1 (5 s buckets).
    let summary = s.summarize(&[id], now - 50_000, now).expect("query");
    assert_eq!(summary.tier_resolution_ms, 5_000);
    assert_eq!(s.rate(id, now - 50_000, now), Ok(Some(2.0)));
    // A window with no increments after the last write reads as zero.
    assert_eq!(s.rate(id, now + 5_000, now + 8_000), Ok(Some(0.0)));
    // A range query: four steps of 2 s at 1 s resolution.
    let range = s.range(id, now - 8_000, now, 2_000).expect("range");
    assert_eq!(range.step_ms, 2_000);
    assert_eq!(range.points.len(), 4);
    for (k, point) in range.points.iter().enumerate() {
        assert_eq!(point.at_ms, now - 8_000 + k as i64 * 2_000);
        assert_eq!(
            point.value,
            Some(PointValue::Counter(CounterSummary {
                total: 4.0,
                rate_per_sec: 2.0
            }))
        );
    }
    // A step finer than the tier is rounded up to it.
    let range = s.range(id, now - 40_000, now, 1).expect("range");
    assert_eq!((range.tier_resolution_ms, range.step_ms), (5_000, 5_000));
    assert_eq!(range.points.len(), 8);
}

#[test]
fn merged_ranges_add_counters_merge_sketches_and_line_up_across_kinds() {
    // Distributions keep coarser tiers than counters, as in the default config.
    let config = StoreConfig {
        distribution_tiers: vec![
            TierConfig::new(5_000, 60_000),
            TierConfig::new(30_000, 300_000),
        ],
        ..small_config()
    };
    let mut s = Store::new(config).expect("valid config");
    let a = register(&mut s, "requests", &[("route", "/a")], SeriesKind::Counter);
    let b = register(&mut s, "requests", &[("route", "/b")], SeriesKind::Counter);
    let da = register(&mut s, "ms", &[("route", "/a")], SeriesKind::Distribution);
    let db = register(&mut s, "ms", &[("route", "/b")], SeriesKind::Distribution);
    // Each second for a minute: 2 requests of /a at 10 ms, 1 of /b at 40 ms.
    for i in 0..60 {
        let at = T0 + i * 1_000;
        s.add(a, at, 2.0).expect("accepted");
        s.add(b, at + 500, 1.0).expect("accepted");
        s.observe(da, at, 10.0).expect("accepted");
        s.observe(da, at, 10.0).expect("accepted");
        s.observe(db, at + 500, 40.0).expect("accepted");
    }
    let now = T0 + 60_000;

    // The last 10 s in 2 s steps: counters from the 1 s tier, exact.
    let range = s
        .range_of(&[a, b], now - 10_000, now, 2_000)
        .expect("range");
    assert_eq!((range.tier_resolution_ms, range.step_ms), (1_000, 2_000));
    assert!(range.complete);
    assert_eq!(range.points.len(), 5);
    for (k, point) in range.points.iter().enumerate() {
        assert_eq!(point.at_ms, now - 10_000 + k as i64 * 2_000);
        assert_eq!(
            point.value,
            Some(PointValue::Counter(CounterSummary {
                total: 6.0,
                rate_per_sec: 3.0
            }))
        );
    }

    // The last 50 s in 10 s steps: counters could use the 1 s tier's buckets but it does not
    // hold 50 s, so the 5 s tier answers, as for the distributions: the points line up.
    let from = now - 50_000;
    let requests = s.range_of(&[a, b], from, now, 10_000).expect("range");
    let latency = s.range_of(&[da, db], from, now, 10_000).expect("range");
    assert_eq!(requests.tier_resolution_ms, 5_000);
    assert_eq!(latency.tier_resolution_ms, 5_000);
    let starts = |r: &Range| r.points.iter().map(|p| p.at_ms).collect::<Vec<_>>();
    assert_eq!(starts(&requests), starts(&latency));
    assert_eq!(requests.points.len(), 5);
    for (requests, latency) in requests.points.iter().zip(&latency.points) {
        assert_eq!(
            requests.value,
            Some(PointValue::Counter(CounterSummary {
                total: 30.0,
                rate_per_sec: 3.0
            }))
        );
        // 20 values of 10 ms and 10 of 40 ms: the sketches were merged, not averaged.
        let Some(PointValue::Distribution(p)) = latency.value else {
            panic!("latency point {latency:?}")
        };
        assert_eq!(p.count, 30);
        assert!((p.mean - 20.0).abs() < 1e-9, "{p:?}");
        assert!(within_error(p.p50, 10.0), "{p:?}");
        assert!(within_error(p.p95, 40.0), "{p:?}");
        assert!(within_error(p.p99, 40.0), "{p:?}");
    }
    // A step the distributions' tiers do not divide is refused rather than rounded, so a
    // caller never gets points of another width than asked for.
    assert_eq!(
        s.range_of(&[da], from, now, 2_000),
        Err(QueryError::StepNotAligned { step_ms: 2_000 })
    );
    // Only the 1 s tier divides 2 s and it does not hold 40 s: it answers, incomplete.
    let partial = s.range_of(&[a], now - 40_000, now, 2_000).expect("range");
    assert_eq!(
        (partial.tier_resolution_ms, partial.complete),
        (1_000, false)
    );
    assert_eq!(partial.points.len(), 20);
    assert_eq!(
        partial.points[0].value, None,
        "older than the 1 s tier holds"
    );
    assert!(partial.points[19].value.is_some());

    assert_eq!(
        s.range_of(&[], from, now, 10_000),
        Err(QueryError::NoSeries)
    );
    assert!(matches!(
        s.range_of(&[a, da], from, now, 10_000),
        Err(QueryError::MixedKinds { .. })
    ));
    assert_eq!(s.range_of(&[a], from, now, 0), Err(QueryError::ZeroStep));
}

#[test]
fn rate_of_the_bucket_being_filled_divides_by_the_time_elapsed() {
    let mut s = store();
    let id = register(&mut s, "requests", &[], SeriesKind::Counter);
    for i in 0..10 {
        s.add(id, T0 + i * 100, 1.0).expect("accepted");
    }
    // 10 increments in the first second; the window [T0, T0 + 1000) is that whole bucket.
    assert_eq!(s.rate(id, T0, T0 + 1_000), Ok(Some(10.0)));
    // Window ending mid-bucket: only the elapsed half second counts.
    assert_eq!(s.rate(id, T0, T0 + 500), Ok(Some(20.0)));
}

#[test]
fn gauges_keep_last_min_max_mean_per_bucket() {
    let mut s = store();
    let id = register(&mut s, "rss_bytes", &[], SeriesKind::Gauge);
    for (offset, value) in [(0, 5.0), (100, 1.0), (200, 9.0), (300, 3.0)] {
        s.set(id, T0 + offset, value).expect("accepted");
    }
    let expected = GaugeSummary {
        last: 3.0,
        min: 1.0,
        max: 9.0,
        mean: 4.5,
        samples: 4,
    };
    assert_eq!(s.gauge(id, T0, T0 + 1_000), Ok(Some(expected)));
    // A late sample inside the bucket counts but does not become the last value.
    s.set(id, T0 + 50, 7.0).expect("accepted");
    let summary = s.gauge(id, T0, T0 + 1_000).expect("query").expect("data");
    assert_eq!((summary.last, summary.samples, summary.mean), (3.0, 5, 5.0));
    // Across buckets, last is the newest bucket's.
    s.set(id, T0 + 2_000, 4.0).expect("accepted");
    let summary = s.gauge(id, T0, T0 + 3_000).expect("query").expect("data");
    assert_eq!((summary.last, summary.min, summary.max), (4.0, 1.0, 9.0));
    // A late sample into an empty older bucket is that bucket's last.
    s.set(id, T0 + 1_000, 6.0).expect("accepted");
    let summary = s
        .gauge(id, T0 + 1_000, T0 + 2_000)
        .expect("query")
        .expect("data");
    assert_eq!(summary.last, 6.0);
    // No samples: no data.
    assert_eq!(s.gauge(id, T0 + 5_000, T0 + 6_000), Ok(None));
    // Range points carry the statistics per step.
    let range = s.range(id, T0, T0 + 3_000, 1_000).expect("range");
    assert!(matches!(range.points[0].value, Some(PointValue::Gauge(g)) if g.max == 9.0));
    assert!(matches!(range.points[2].value, Some(PointValue::Gauge(g)) if g.last == 4.0));
}

#[test]
fn distributions_give_percentiles_within_the_stated_error() {
    let mut s = store();
    let id = register(&mut s, "latency_seconds", &[], SeriesKind::Distribution);
    let mut rng = Rng(7);
    let mut values = Vec::new();
    for i in 0..5_000 {
        // Log-uniform over 2 ms .. 400 ms: a 200× spread, inside the window.
        let value = 0.002 * 200f64.powf(rng.unit());
        values.push(value);
        s.observe(id, T0 + i * 2, value).expect("accepted");
    }
    values.sort_by(f64::total_cmp);
    let p = s
        .percentiles(id, T0, T0 + 10_000)
        .expect("query")
        .expect("data");
    assert_eq!(p.count, 5_000);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert!((p.mean - mean).abs() < 1e-9 * mean);
    for (q, estimate) in [(0.5, p.p50), (0.95, p.p95), (0.99, p.p99)] {
        let exact = exact_quantile(&values, q);
        assert!(within_error(estimate, exact), "q{q}: {estimate} vs {exact}");
    }
    assert_eq!(s.rate(id, T0, T0 + 10_000), Ok(Some(500.0)));
}

#[test]
fn an_outlier_keeps_high_percentiles_exact_to_the_error() {
    let mut s = store();
    let id = register(&mut s, "latency_seconds", &[], SeriesKind::Distribution);
    let mut values: Vec<f64> = (0..1_000).map(|i| 0.001 + f64::from(i) * 1e-5).collect();
    values.push(30.0);
    // All in one 1 s bucket.
    for (i, &v) in values.iter().enumerate() {
        s.observe(id, T0 + i as i64 * 9 / 10, v).expect("accepted");
    }
    values.sort_by(f64::total_cmp);
    let p = s
        .percentiles(id, T0, T0 + 2_000)
        .expect("query")
        .expect("data");
    // 30 s is 3,000× the bulk: the bulk collapses into the window's lowest bin (about
    // 30 s / 256) and p50 is reported as that floor, while the maximum stays exact.
    let floor =
        super::sketch::bin_value(super::sketch::bin_index(30.0) - super::sketch::WINDOW as i16 + 1);
    assert_eq!(p.p50, floor);
    assert!(floor < 30.0 / WINDOW_SPREAD * 1.25);
    let max = s
        .summarize(&[id], T0, T0 + 2_000)
        .expect("query")
        .aggregate
        .and_then(|a| match a {
            Aggregate::Distribution(d) => d.quantile(1.0),
            _ => None,
        })
        .expect("data");
    assert!(within_error(max, 30.0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Percentiles over windows that merge many buckets, against exact percentiles.
    #[test]
    fn merged_percentiles_match_exact_ones(
        samples in prop::collection::vec((0i64..60_000, 1.0f64..250.0), 1..600),
        from in 0i64..30_000,
        len in 1i64..30_000,
        q in 0.0f64..=1.0,
    ) {
        let mut s = store();
        let id = register(&mut s, "latency", &[], SeriesKind::Distribution);
        let mut samples = samples;
        samples.sort_by_key(|&(t, _)| t);
        for &(t, v) in &samples {
            s.observe(id, T0 + t, v).expect("accepted");
        }
        let summary = s.summarize(&[id], T0 + from, T0 + from + len).expect("query");
        let resolution = summary.tier_resolution_ms as i64;
        prop_assert!(summary.complete);
        // The buckets whose start lies in the window.
        let first = (T0 + from + resolution - 1).div_euclid(resolution);
        let end = (T0 + from + len + resolution - 1).div_euclid(resolution);
        let mut exact: Vec<f64> = samples
            .iter()
            .filter(|&&(t, _)| (first..end).contains(&(T0 + t).div_euclid(resolution)))
            .map(|&(_, v)| v)
            .collect();
        exact.sort_by(f64::total_cmp);
        match summary.aggregate {
            None => prop_assert!(exact.is_empty()),
            Some(Aggregate::Distribution(d)) => {
                prop_assert_eq!(d.count(), exact.len() as u64);
                let estimate = d.quantile(q).expect("non-empty");
                let truth = exact_quantile(&exact, q);
                prop_assert!(within_error(estimate, truth), "{} vs {}", estimate, truth);
            }
            Some(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    /// Every coarser bucket is the exact aggregate of the finer buckets it spans.
    #[test]
    fn coarser_tiers_are_exact_aggregates(
        samples in prop::collection::vec((0i64..40_000, 0u32..1_000), 1..400),
    ) {
        let mut s = store();
        let counter = register(&mut s, "c", &[], SeriesKind::Counter);
        let gauge = register(&mut s, "g", &[], SeriesKind::Gauge);
        let dist = register(&mut s, "d", &[], SeriesKind::Distribution);
        let mut samples = samples;
        // In time order, so "last" is comparable too; ties keep their order.
        samples.sort_by_key(|&(t, _)| t);
        for &(t, v) in &samples {
            let value = f64::from(v);
            s.add(counter, T0 + t, value).expect("accepted");
            s.set(gauge, T0 + t, value).expect("accepted");
            s.observe(dist, T0 + t, value / 100.0 + 0.001).expect("accepted");
        }
        let resolutions = s.scalar_resolutions.clone();
        for tier in 1..resolutions.len() {
            let ratio = resolutions[tier] / resolutions[tier - 1];
            let compared = check_rollup(&s, counter, tier, ratio)
                + check_rollup(&s, gauge, tier, ratio)
                + check_rollup(&s, dist, tier, ratio);
            prop_assert!(compared >= 3, "tier {} compared {} buckets", tier, compared);
        }
    }

    /// Any damage to a snapshot is a typed error, never a panic or a wrong store.
    #[test]
    fn damaged_snapshots_are_refused(cut in 0usize..4_000, flip in 0usize..4_000, bit in 0u8..8) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SNAPSHOT_FILE);
        let s = filled_store();
        s.save_snapshot(&path, T0).expect("saved");
        let good = std::fs::read(&path).expect("read");
        let mut flipped = good.clone();
        let at = flip % flipped.len();
        flipped[at] ^= 1 << bit;
        std::fs::write(&path, &flipped).expect("write");
        prop_assert!(Store::load_snapshot(small_config(), &path).is_err());
        let cut = cut % good.len();
        std::fs::write(&path, &good[..cut]).expect("write");
        prop_assert!(Store::load_snapshot(small_config(), &path).is_err());
    }
}

/// For each bucket of `coarse` that `fine` holds in full: its slot and the fine slots.
fn span<S: Slots>(fine: &Tier<S>, coarse: &Tier<S>, ratio: i64) -> Vec<(i64, usize, Vec<usize>)> {
    let (Some(fine_oldest), Some(coarse_oldest)) = (fine.oldest(), coarse.oldest()) else {
        return Vec::new();
    };
    let slot = |tier: &Tier<S>, b: i64| b.rem_euclid(tier.slots.len() as i64) as usize;
    (coarse_oldest..=coarse.head)
        .filter(|&b| b * ratio >= fine_oldest && b * ratio + ratio - 1 <= fine.head)
        .map(|b| {
            let fine_slots = (b * ratio..b * ratio + ratio)
                .map(|f| slot(fine, f))
                .collect();
            (b, slot(coarse, b), fine_slots)
        })
        .collect()
}

/// Compares each bucket of `tier` that `tier - 1` holds in full with the merge of those finer
/// buckets; returns how many were compared.
fn check_rollup(s: &Store, id: SeriesId, tier: usize, ratio: i64) -> usize {
    let series = s.get(id).expect("live");
    let mut compared = 0;
    match &series.data {
        SeriesData::Counter(tiers) => {
            for (_, coarse, fine) in span(&tiers[tier - 1], &tiers[tier], ratio) {
                compared += 1;
                let sum: f64 = fine.iter().map(|&f| tiers[tier - 1].slots.sums[f]).sum();
                assert_eq!(tiers[tier].slots.sums[coarse], sum);
            }
        }
        SeriesData::Gauge(tiers) => {
            for (_, coarse, fine) in span(&tiers[tier - 1], &tiers[tier], ratio) {
                compared += 1;
                let cells: Vec<_> = fine
                    .iter()
                    .filter_map(|&f| tiers[tier - 1].slots.cell(f))
                    .collect();
                let got = tiers[tier].slots.cell(coarse);
                let Some(got) = got else {
                    assert!(cells.is_empty());
                    continue;
                };
                let min = cells.iter().map(|c| c.min).fold(f64::INFINITY, f64::min);
                let max = cells
                    .iter()
                    .map(|c| c.max)
                    .fold(f64::NEG_INFINITY, f64::max);
                let count: u64 = cells.iter().map(|c| c.count).sum();
                let sum: f64 = cells.iter().map(|c| c.sum).sum();
                let last = cells.last().expect("non-empty").last;
                assert_eq!(
                    (got.min, got.max, got.count, got.sum, got.last),
                    (min, max, count, sum, last)
                );
            }
        }
        SeriesData::Distribution(tiers) => {
            for (_, coarse, fine) in span(&tiers[tier - 1], &tiers[tier], ratio) {
                compared += 1;
                let mut merged = MergedSketch::new();
                for &f in &fine {
                    if let Some((top, bins, sum)) = tiers[tier - 1].slots.window(f) {
                        merged.add_window(bins, top, sum);
                    }
                }
                let got = tiers[tier].slots.window(coarse);
                match (merged.collapsed(), got) {
                    (None, None) => {}
                    (Some((top, bins)), Some((got_top, got_bins, got_sum))) => {
                        assert_eq!((top, &bins[..]), (got_top, got_bins));
                        assert!((merged.sum() - got_sum).abs() <= 1e-9 * got_sum.abs().max(1.0));
                    }
                    (expected, got) => panic!("rollup differs: {expected:?} vs {got:?}"),
                }
            }
        }
    }
    compared
}

#[test]
fn series_past_the_cap_are_refused_and_counted() {
    let mut s = Store::new(StoreConfig {
        max_series: 3,
        ..small_config()
    })
    .expect("valid");
    let ids: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| register(&mut s, n, &[], SeriesKind::Counter))
        .collect();
    let before = s.memory();
    assert!(matches!(
        s.get_or_register("d", &[], SeriesKind::Counter),
        Err(RegisterError::SeriesLimit { max_series: 3, .. })
    ));
    assert!(matches!(
        s.get_or_register("e", &[], SeriesKind::Gauge),
        Err(RegisterError::SeriesLimit { .. })
    ));
    assert_eq!(s.stats().series_refused_limit, 2);
    assert_eq!(s.memory().bytes_in_use, before.bytes_in_use);
    // Existing series are still found.
    assert_eq!(s.get_or_register("a", &[], SeriesKind::Counter), Ok(ids[0]));
    // Removing one makes room.
    assert!(s.remove(ids[1]));
    assert!(s.memory().bytes_in_use < before.bytes_in_use);
    assert!(s.get_or_register("d", &[], SeriesKind::Counter).is_ok());
}

#[test]
fn memory_accounting_stays_within_the_budget() {
    let config = small_config();
    let per_counter = config.series_bytes(SeriesKind::Counter, 0);
    let max_bytes = per_counter * 5 + per_counter / 2;
    let mut s = Store::new(StoreConfig {
        max_bytes,
        ..config
    })
    .expect("valid");
    let mut registered = 0;
    for i in 0..20 {
        let name = format!("m{i}");
        let kind = [
            SeriesKind::Counter,
            SeriesKind::Gauge,
            SeriesKind::Distribution,
        ][i % 3];
        match s.get_or_register(&name, &[("route", "/x")], kind) {
            Ok(_) => registered += 1,
            Err(RegisterError::MemoryBudget { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
        let report = s.memory();
        assert!(report.bytes_in_use <= report.max_bytes, "{report:?}");
        // What the rings really hold is within what is charged.
        let held: u64 = s.iter().map(|(_, series)| allocated(&series.data)).sum();
        assert!(held <= report.bytes_in_use);
        assert_eq!(report.series, registered);
    }
    let report = s.memory();
    assert!(registered >= 2);
    assert_eq!(
        report.stats.series_refused_memory,
        u64::from(20 - registered)
    );
    assert_eq!(
        report.counters + report.gauges + report.distributions,
        registered
    );
}

/// Bytes of the ring arrays of a series.
fn allocated(data: &SeriesData) -> u64 {
    use std::mem::size_of_val;
    let bytes: usize = match data {
        SeriesData::Counter(tiers) => tiers.iter().map(|t| size_of_val(&*t.slots.sums) + 8).sum(),
        SeriesData::Gauge(tiers) => tiers
            .iter()
            .map(|t| {
                let g = &t.slots;
                size_of_val(&*g.min)
                    + size_of_val(&*g.max)
                    + size_of_val(&*g.last)
                    + size_of_val(&*g.count)
                    + size_of_val(&*g.sum)
                    + 8
            })
            .sum(),
        SeriesData::Distribution(tiers) => tiers
            .iter()
            .map(|t| {
                size_of_val(&*t.slots.top)
                    + size_of_val(&*t.slots.sum)
                    + size_of_val(&*t.slots.bins)
                    + 8
            })
            .sum(),
    };
    bytes as u64
}

#[test]
fn rings_overwrite_the_oldest_buckets() {
    let mut s = store();
    let id = register(&mut s, "c", &[], SeriesKind::Counter);
    s.add(id, T0, 100.0).expect("accepted");
    // 12 s later tier 0 (10 s) no longer holds T0; tier 1 does.
    s.add(id, T0 + 12_000, 1.0).expect("accepted");
    let summary = s.summarize(&[id], T0, T0 + 1_000).expect("query");
    assert_eq!(summary.tier_resolution_ms, 5_000);
    assert!(matches!(summary.aggregate, Some(Aggregate::Counter(c)) if c.total == 100.0));
    // 10 minutes later, past every tier: the sample is gone and the window is unknown.
    s.add(id, T0 + 600_000, 1.0).expect("accepted");
    let summary = s.summarize(&[id], T0, T0 + 1_000).expect("query");
    assert!(!summary.complete);
    assert_eq!(summary.aggregate, None);
    assert_eq!(s.rate(id, T0, T0 + 1_000), Ok(None));
    // The newest data is intact.
    assert_eq!(s.rate(id, T0 + 600_000, T0 + 601_000), Ok(Some(1.0)));
}

#[test]
fn samples_older_than_the_ring_and_invalid_values_are_dropped_and_counted() {
    let mut s = store();
    let c = register(&mut s, "c", &[], SeriesKind::Counter);
    let g = register(&mut s, "g", &[], SeriesKind::Gauge);
    let d = register(&mut s, "d", &[], SeriesKind::Distribution);
    s.add(c, T0 + 20_000, 1.0).expect("accepted");
    // Inside tier 0 but out of order: fine.
    s.add(c, T0 + 12_000, 1.0).expect("accepted");
    // Older than tier 0's ten 1 s buckets.
    assert_eq!(
        s.add(c, T0 + 10_000, 1.0),
        Err(WriteError::TooOld {
            id: c,
            at_ms: T0 + 10_000
        })
    );
    assert!(matches!(
        s.add(c, T0, f64::NAN),
        Err(WriteError::InvalidValue { .. })
    ));
    assert!(matches!(
        s.add(c, T0 + 20_000, -1.0),
        Err(WriteError::InvalidValue { .. })
    ));
    assert!(matches!(
        s.set(g, T0, 1e300),
        Err(WriteError::InvalidValue { .. })
    ));
    assert!(matches!(
        s.observe(d, T0, f64::INFINITY),
        Err(WriteError::InvalidValue { .. })
    ));
    assert!(matches!(
        s.observe(d, i64::MAX, 1.0),
        Err(WriteError::InvalidTime { .. })
    ));
    let stats = s.stats();
    assert_eq!(stats.samples_accepted, 2);
    assert_eq!(stats.samples_too_old, 1);
    assert_eq!(stats.samples_invalid, 5);
    assert_eq!(s.rate(c, T0 + 11_000, T0 + 21_000), Ok(Some(0.2)));
    // A far jump forward is accepted and ages everything out.
    s.add(c, T0 + 10_000_000, 1.0).expect("accepted");
    assert_eq!(s.rate(c, T0 + 11_000, T0 + 21_000), Ok(None));
}

#[test]
fn misaddressed_writes_and_queries_are_typed_errors() {
    let mut s = store();
    let g = register(&mut s, "g", &[], SeriesKind::Gauge);
    assert!(matches!(
        s.add(g, T0, 1.0),
        Err(WriteError::WrongKind {
            expected: SeriesKind::Counter,
            found: SeriesKind::Gauge,
            ..
        })
    ));
    assert!(matches!(
        s.get_or_register("g", &[], SeriesKind::Counter),
        Err(RegisterError::KindConflict { .. })
    ));
    assert!(matches!(
        s.percentiles(g, T0, T0 + 1),
        Err(QueryError::WrongKind { .. })
    ));
    assert!(matches!(
        s.gauge(g, T0, T0),
        Err(QueryError::EmptyWindow { .. })
    ));
    assert!(matches!(
        s.range(g, T0, T0 + 1, 0),
        Err(QueryError::ZeroStep)
    ));
    // A gauge never written: every point is empty.
    let range = s.range(g, T0 - 300_000, T0, 1).expect("range");
    assert_eq!(range.points.len(), 300);
    assert!(range.points.iter().all(|p| p.value.is_none()));
    let c = register(&mut s, "c", &[], SeriesKind::Counter);
    assert!(matches!(
        s.summarize(&[g, c], T0, T0 + 1),
        Err(QueryError::MixedKinds { .. })
    ));
    assert!(s.remove(g));
    assert!(!s.remove(g));
    assert_eq!(s.set(g, T0, 1.0), Err(WriteError::UnknownSeries { id: g }));
    // The slot is reused under a new generation; the old id stays dead.
    let g2 = register(&mut s, "g2", &[], SeriesKind::Gauge);
    assert_eq!(g2.index, g.index);
    assert_ne!(g2, g);
    assert_eq!(s.set(g, T0, 1.0), Err(WriteError::UnknownSeries { id: g }));
    assert!(matches!(
        s.gauge(g, T0, T0 + 1),
        Err(QueryError::UnknownSeries { .. })
    ));
    assert_eq!(s.stats().samples_misaddressed, 3);
}

#[test]
fn series_are_selected_and_grouped_by_labels() {
    let mut s = store();
    let routes = [("/orders", 0.010), ("/users", 0.100)];
    for platform in ["tackle.io", "other.io"] {
        for (route, base) in routes {
            for method in ["GET", "POST"] {
                let labels = [("platform", platform), ("route", route), ("method", method)];
                let id = register(
                    &mut s,
                    "http_request_duration",
                    &labels,
                    SeriesKind::Distribution,
                );
                // Labels in another order name the same series.
                let reordered = [("method", method), ("route", route), ("platform", platform)];
                assert_eq!(s.lookup("http_request_duration", &reordered), Some(id));
                for i in 0..100 {
                    s.observe(id, T0 + i * 10, base * (1.0 + f64::from(i as u32) / 100.0))
                        .expect("accepted");
                }
            }
        }
    }
    register(
        &mut s,
        "http_requests",
        &[("platform", "tackle.io")],
        SeriesKind::Counter,
    );
    let selector = Selector::name("http_request_duration").with("platform", "tackle.io");
    assert_eq!(s.select(&selector).len(), 4);
    assert_eq!(
        s.select(&Selector::any().with("platform", "tackle.io"))
            .len(),
        5
    );
    let groups = s
        .summarize_by(&selector, "route", T0, T0 + 5_000)
        .expect("query");
    assert_eq!(groups.len(), 2);
    for (group, (route, base)) in groups.iter().zip(routes) {
        assert_eq!(group.label_value.as_deref(), Some(route));
        assert_eq!(group.series.len(), 2);
        let Some(Aggregate::Distribution(d)) = &group.summary.aggregate else {
            panic!("no distribution for {route}");
        };
        let p = d.percentiles().expect("data");
        assert_eq!(p.count, 200);
        // Each method saw base × (1.00 .. 1.99); p95 of both is base × 1.94.
        assert!(within_error(p.p95, base * 1.94), "{route}: {}", p.p95);
    }
    // A label the series lack groups them under None.
    let groups = s
        .summarize_by(&selector, "status", T0, T0 + 5_000)
        .expect("query");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].label_value, None);
}

/// A store with every kind, several tiers filled, a removed series and an empty one.
fn filled_store() -> Store {
    let mut s = store();
    let mut rng = Rng(42);
    let counter = register(&mut s, "c", &[("platform", "a")], SeriesKind::Counter);
    let gauge = register(&mut s, "g", &[("platform", "a")], SeriesKind::Gauge);
    let dist = register(
        &mut s,
        "d",
        &[("platform", "a"), ("route", "/x")],
        SeriesKind::Distribution,
    );
    let gone = register(&mut s, "gone", &[], SeriesKind::Counter);
    register(&mut s, "empty", &[], SeriesKind::Gauge);
    for i in 0..2_000 {
        let t = T0 + i * 97;
        s.add(counter, t, (rng.next() % 10) as f64)
            .expect("accepted");
        s.set(gauge, t, rng.unit() * 100.0).expect("accepted");
        s.observe(dist, t, 0.001 + rng.unit()).expect("accepted");
    }
    s.remove(gone);
    s
}

/// Every query answer of a store, for comparison.
fn answers(s: &Store) -> Vec<String> {
    let mut out = Vec::new();
    for info in s.all_series() {
        // Not the id: a reloaded store numbers its series afresh.
        out.push(format!(
            "{} {} {:?} {}",
            info.key, info.kind, info.newest_ms, info.bytes
        ));
        for (from, to) in [
            (T0, T0 + 1_000),
            (T0 + 190_000, T0 + 194_000),
            (T0 + 100_000, T0 + 200_000),
        ] {
            out.push(format!("{:?}", s.summarize(&[info.id], from, to)));
            out.push(format!("{:?}", s.range(info.id, from, to, 1_000)));
        }
    }
    out.push(format!("{:?}", s.memory().bytes_in_use));
    out
}

#[test]
fn snapshots_round_trip_with_identical_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SNAPSHOT_FILE);
    let s = filled_store();
    let handle = StoreHandle::from_store(s.clone());
    let report = handle.save_snapshot(&path, T0 + 200_000).expect("saved");
    assert_eq!(report.series, 4);
    assert_eq!(report.bytes, std::fs::metadata(&path).expect("stat").len());
    assert!(!dir.path().join(format!("{SNAPSHOT_FILE}.tmp")).exists());
    // The single-threaded save writes the same bytes.
    let other = dir.path().join("other");
    s.save_snapshot(&other, T0 + 200_000).expect("saved");
    assert_eq!(std::fs::read(&path).ok(), std::fs::read(&other).ok());

    let (loaded, outcome) = StoreHandle::open(small_config(), &path).expect("valid config");
    let LoadOutcome::Loaded(load) = outcome else {
        panic!("not loaded: {outcome:?}");
    };
    assert_eq!((load.series_loaded, load.series_skipped), (4, 0));
    assert_eq!(load.saved_at_ms, T0 + 200_000);
    assert_eq!(load.bytes, report.bytes);
    assert_eq!(loaded.read(answers), answers(&s));
    // Writing after a reload continues the same rings.
    let mut reloaded = loaded.read(Clone::clone);
    let mut original = s;
    for store in [&mut reloaded, &mut original] {
        let id = store.lookup("c", &[("platform", "a")]).expect("present");
        store.add(id, T0 + 200_500, 5.0).expect("accepted");
    }
    assert_eq!(answers(&reloaded), answers(&original));
}

#[test]
fn snapshots_that_cannot_be_used_are_typed_errors_and_the_store_starts_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SNAPSHOT_FILE);
    let (handle, outcome) = StoreHandle::open(small_config(), &path).expect("valid config");
    assert!(matches!(outcome, LoadOutcome::Missing));
    assert_eq!(handle.memory().series, 0);

    filled_store().save_snapshot(&path, T0).expect("saved");
    let good = std::fs::read(&path).expect("read");
    let load = |bytes: &[u8]| {
        std::fs::write(&path, bytes).expect("write");
        Store::load_snapshot(small_config(), &path).map(|_| ())
    };
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    assert!(matches!(
        load(&flipped),
        Err(SnapshotError::ChecksumMismatch { .. })
    ));
    assert!(matches!(
        load(&good[..good.len() - 1]),
        Err(SnapshotError::ChecksumMismatch { .. })
    ));
    assert!(matches!(
        load(&good[..10]),
        Err(SnapshotError::Truncated { .. })
    ));
    assert!(matches!(load(b""), Err(SnapshotError::NotASnapshot { .. })));
    assert!(matches!(
        load(b"{\"json\": true}"),
        Err(SnapshotError::NotASnapshot { .. })
    ));
    let mut future = good.clone();
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    let body = future.len() - 4;
    let crc = crc32fast::hash(&future[..body]);
    future[body..].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        load(&future),
        Err(SnapshotError::UnsupportedVersion { found: 2, .. })
    ));
    std::fs::write(&path, &good).expect("write");
    let other_tiers = StoreConfig {
        tiers: vec![TierConfig::new(2_000, 20_000)],
        ..small_config()
    };
    assert!(matches!(
        Store::load_snapshot(other_tiers.clone(), &path),
        Err(SnapshotError::Incompatible { .. })
    ));
    let (handle, outcome) = StoreHandle::open(other_tiers, &path).expect("valid config");
    let LoadOutcome::Failed(error) = outcome else {
        panic!("loaded with other tiers");
    };
    assert!(error.to_string().contains("other tiers"), "{error}");
    assert_eq!(handle.memory().series, 0);
    let unreadable = dir.path();
    assert!(matches!(
        Store::load_snapshot(small_config(), unreadable),
        Err(SnapshotError::Io { op: IoOp::Read, .. })
    ));
    assert!(matches!(
        filled_store().save_snapshot(Path::new("/nonexistent-dir/x"), T0),
        Err(SnapshotError::Io {
            op: IoOp::Create,
            ..
        })
    ));
}

#[test]
fn series_that_no_longer_fit_are_skipped_on_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SNAPSHOT_FILE);
    filled_store().save_snapshot(&path, T0).expect("saved");
    let (store, report) = Store::load_snapshot(
        StoreConfig {
            max_series: 2,
            ..small_config()
        },
        &path,
    )
    .expect("loaded");
    assert_eq!((report.series_loaded, report.series_skipped), (2, 2));
    assert_eq!(store.memory().series, 2);
}

#[test]
fn the_handle_shares_one_store_between_threads() {
    let handle = StoreHandle::new(small_config()).expect("valid");
    let id = handle
        .get_or_register("c", &[], SeriesKind::Counter)
        .expect("registered");
    let writer = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            for i in 0..5_000 {
                handle.add(id, T0 + i, 1.0).expect("accepted");
            }
        })
    };
    let reader = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let mut last = 0.0;
            for _ in 0..200 {
                let total = handle
                    .read(|s| s.summarize(&[id], T0, T0 + 10_000))
                    .ok()
                    .and_then(|s| s.aggregate)
                    .map_or(0.0, |a| match a {
                        Aggregate::Counter(c) => c.total,
                        _ => f64::NAN,
                    });
                assert!(total >= last, "totals only grow");
                last = total;
            }
        })
    };
    writer.join().expect("writer");
    reader.join().expect("reader");
    assert_eq!(
        handle.read(|s| s.rate(id, T0, T0 + 5_000)),
        Ok(Some(1_000.0))
    );
    assert_eq!(
        handle.get_or_register("c", &[], SeriesKind::Counter),
        Ok(id)
    );
}

#[test]
fn unix_ms_converts_system_times() {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(1_234);
    assert_eq!(unix_ms(t), 1_234);
    assert_eq!(
        unix_ms(std::time::UNIX_EPOCH - Duration::from_millis(5)),
        -5
    );
}

#[test]
fn default_config_fits_a_mixed_set_of_series() {
    // The example in the module docs: 30 gauges, 100 counters and 50 distributions.
    let config = StoreConfig::default();
    let key = 256;
    let total = 30 * config.series_bytes(SeriesKind::Gauge, key)
        + 100 * config.series_bytes(SeriesKind::Counter, key)
        + 50 * config.series_bytes(SeriesKind::Distribution, key);
    assert!(total <= config.max_bytes, "{total}");
}
