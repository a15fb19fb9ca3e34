//! A short benchmark of a store filled to its default budget. It asserts nothing about
//! timings (a test run in debug mode is a smoke run); the numbers in BENCHMARKS.md come from
//!
//! ```sh
//! cargo test --release -p selfheal-daemon --lib store::bench -- --nocapture
//! ```

use std::time::Instant;

use super::{Selector, SeriesId, SeriesKind, Store, StoreConfig, StoreHandle};

const T0: i64 = 1_700_000_000_000;

struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Writes `n` samples round-robin over `ids`, spread evenly over `span_ms` from `start`;
/// returns nanoseconds per write.
fn write_all(
    store: &mut Store,
    ids: &[SeriesId],
    kind: SeriesKind,
    n: usize,
    start: i64,
    span_ms: i64,
    rng: &mut Rng,
) -> f64 {
    let values: Vec<f64> = (0..4096).map(|_| 0.002 * 100f64.powf(rng.unit())).collect();
    let began = Instant::now();
    for i in 0..n {
        let id = ids[i % ids.len()];
        let at = start + (i as i64 * span_ms) / n as i64;
        let value = values[i % values.len()];
        let result = match kind {
            SeriesKind::Counter => store.add(id, at, 1.0),
            SeriesKind::Gauge => store.set(id, at, value),
            SeriesKind::Distribution => store.observe(id, at, value),
        };
        assert!(result.is_ok(), "{result:?}");
    }
    began.elapsed().as_nanos() as f64 / n as f64
}

#[test]
fn store_filled_to_its_defaults() {
    let writes = if cfg!(debug_assertions) {
        20_000
    } else {
        3_000_000
    };
    let queries = if cfg!(debug_assertions) { 3 } else { 1_000 };
    let mut store = Store::new(StoreConfig::default()).expect("default config is valid");
    let mut rng = Rng(1);

    // 5 platforms × 10 routes of distributions, 30 gauges, then counters to the budget.
    let mut distributions = Vec::new();
    for platform in 0..5 {
        for route in 0..10 {
            let labels = [
                ("platform", format!("platform{platform}.io")),
                ("route", format!("/api/v1/resource{route}/{{id}}")),
            ];
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            distributions.push(
                store
                    .get_or_register(
                        "http_request_duration_seconds",
                        &labels,
                        SeriesKind::Distribution,
                    )
                    .expect("fits"),
            );
        }
    }
    let gauges: Vec<SeriesId> = (0..30)
        .map(|i| {
            store
                .get_or_register(&format!("gauge_{i}"), &[], SeriesKind::Gauge)
                .expect("fits")
        })
        .collect();
    let mut counters = Vec::new();
    while let Ok(id) = store.get_or_register(
        &format!("counter_{}", counters.len()),
        &[("status", "2xx")],
        SeriesKind::Counter,
    ) {
        counters.push(id);
    }
    let memory = store.memory();
    println!(
        "store: {} series ({} counters, {} gauges, {} distributions), {:.1} MiB of {:.1} MiB",
        memory.series,
        memory.counters,
        memory.gauges,
        memory.distributions,
        memory.bytes_in_use as f64 / f64::from(1 << 20),
        memory.max_bytes as f64 / f64::from(1 << 20),
    );

    // Two hours of data; the last part of each run lands in the last hour.
    let span = 2 * 3_600_000;
    for (name, ids, kind) in [
        ("counter", &counters, SeriesKind::Counter),
        ("gauge", &gauges, SeriesKind::Gauge),
        ("distribution", &distributions, SeriesKind::Distribution),
    ] {
        let ns = write_all(&mut store, ids, kind, writes, T0, span, &mut rng);
        println!("write {name}: {ns:.0} ns/write, {:.2} M writes/s", 1e3 / ns);
    }

    // Through the shared handle, one lock per write.
    let handle = StoreHandle::from_store(store);
    let began = Instant::now();
    let n = writes / 10;
    for i in 0..n {
        let id = distributions[i % distributions.len()];
        let at = T0 + span - 60_000 + (i as i64 * 60_000) / n as i64;
        handle.observe(id, at, 0.01).expect("accepted");
    }
    let ns = began.elapsed().as_nanos() as f64 / n as f64;
    println!("write distribution via StoreHandle (lock per write): {ns:.0} ns/write");

    let now = T0 + span;
    let hour_ago = now - 3_600_000;
    let id = distributions[0];
    let began = Instant::now();
    let mut p95 = 0.0;
    for _ in 0..queries {
        let p = handle
            .read(|s| s.percentiles(id, hour_ago, now))
            .expect("query")
            .expect("data");
        p95 = p.p95;
    }
    let us = began.elapsed().as_secs_f64() * 1e6 / f64::from(queries);
    let tier = handle.read(|s| {
        s.summarize(&[id], hour_ago, now)
            .map(|s| s.tier_resolution_ms)
    });
    println!("p95 over 1 h of one series ({tier:?} ms buckets): {us:.1} µs/query (p95 = {p95:.4})");

    let selector = Selector::name("http_request_duration_seconds").with("platform", "platform0.io");
    let began = Instant::now();
    let mut groups = 0;
    for _ in 0..queries {
        groups = handle
            .read(|s| s.summarize_by(&selector, "route", hour_ago, now))
            .expect("query")
            .len();
    }
    let us = began.elapsed().as_secs_f64() * 1e6 / f64::from(queries);
    let selected = handle.read(|s| s.select(&selector).len());
    println!("p95 per route of one platform over 1 h ({groups} groups, {selected} series): {us:.1} µs/query");

    let began = Instant::now();
    let points = handle
        .read(|s| s.range(counters[0], now - 86_400_000, now, 60_000))
        .expect("query")
        .points
        .len();
    println!(
        "range of one counter over 24 h at 1 min: {points} points in {:.1} µs",
        began.elapsed().as_secs_f64() * 1e6
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(super::SNAPSHOT_FILE);
    let saved = handle.save_snapshot(&path, now).expect("saved");
    println!(
        "snapshot: {:.1} MiB, {} series, saved in {:.0} ms",
        saved.bytes as f64 / f64::from(1 << 20),
        saved.series,
        saved.duration.as_secs_f64() * 1e3
    );
    let (loaded, report) = Store::load_snapshot(StoreConfig::default(), &path).expect("loaded");
    println!(
        "snapshot: loaded {} series in {:.0} ms",
        report.series_loaded,
        report.duration.as_secs_f64() * 1e3
    );
    assert_eq!(loaded.memory().series, memory.series);
}
