//! A small load generator for accuracy tests: N HTTP/1.1 keep-alive connections (one thread
//! each, raw [`KeepAlive`] clients) drive a fixed, weighted mix of requests for a number of
//! requests or a duration, and record, per (platform, method, route template, status), how
//! many answers came back and how long each took.
//!
//! Deterministic: request number `k` (a shared counter) is always the same call of the mix,
//! laid out by smooth weighted round-robin, so a run of `n` requests sends exactly the same
//! requests every time; only which connection sends which one varies.
//!
//! Latency is measured on the client: from just before the request is written to the moment
//! the first byte of the answer can be read (the same span the daemon measures on the
//! server's sockets, plus the loopback transit and wake-ups on both sides).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::KeepAlive;

/// One request of a mix, with the labels the daemon is expected to give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub host: String,
    pub path: String,
    /// Sent as `application/json` when present.
    pub body: Option<String>,
    /// The platform the daemon should attribute it to (`other` when no `[[platforms]]` entry
    /// matches).
    pub platform: String,
    /// The route template the daemon should report (`/api/v1/leads/:id`).
    pub route: String,
}

impl Call {
    pub fn get(host: &str, path: &str, platform: &str, route: &str) -> Self {
        Self {
            method: "GET",
            host: host.to_owned(),
            path: path.to_owned(),
            body: None,
            platform: platform.to_owned(),
            route: route.to_owned(),
        }
    }

    pub fn post(host: &str, path: &str, body: &str, platform: &str, route: &str) -> Self {
        Self {
            method: "POST",
            body: Some(body.to_owned()),
            ..Self::get(host, path, platform, route)
        }
    }

    /// The (platform, method, route) this call is counted under.
    pub fn route_key(&self) -> RouteKey {
        RouteKey {
            platform: self.platform.clone(),
            method: self.method.to_owned(),
            route: self.route.clone(),
        }
    }
}

/// A weighted set of calls, laid out once into a fixed order.
#[derive(Debug, Clone)]
pub struct Mix {
    calls: Vec<Call>,
    /// Indexes into `calls`, one cycle of the round-robin (its length is the sum of weights).
    order: Vec<usize>,
}

impl Mix {
    /// `weighted`: `(weight, call)`; a call with weight 3 is sent three times per cycle. The
    /// cycle is interleaved (smooth weighted round-robin, as nginx balances upstreams), so a
    /// run cut anywhere holds every call in nearly its share.
    pub fn new(weighted: Vec<(u32, Call)>) -> Self {
        assert!(
            weighted.iter().any(|(w, _)| *w > 0),
            "a mix needs a positive weight"
        );
        let weights: Vec<i64> = weighted.iter().map(|(w, _)| i64::from(*w)).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0_i64; weights.len()];
        let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let pick = (0..current.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .expect("a mix has at least one call");
            current[pick] -= total;
            order.push(pick);
        }
        Self {
            calls: weighted.into_iter().map(|(_, call)| call).collect(),
            order,
        }
    }

    /// Every call once, in the order given.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// Request number `k` of any run.
    pub fn nth(&self, k: u64) -> &Call {
        let len = self.order.len() as u64;
        &self.calls[self.order[(k % len) as usize]]
    }

    /// The length of one cycle (the sum of the weights).
    pub fn cycle(&self) -> u64 {
        self.order.len() as u64
    }
}

/// How much load to drive.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// Exactly this many requests in all (request numbers `0..n`).
    Requests(u64),
    /// Requests until this much time has passed (the ones in flight then still finish).
    For(Duration),
}

/// What the daemon's HTTP request counter is labelled with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub platform: String,
    pub method: String,
    pub route: String,
    pub status: u16,
}

impl Key {
    /// `1xx` … `5xx`.
    pub fn status_class(&self) -> String {
        format!("{}xx", self.status / 100)
    }

    pub fn route_key(&self) -> RouteKey {
        RouteKey {
            platform: self.platform.clone(),
            method: self.method.clone(),
            route: self.route.clone(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.platform, self.method, self.route, self.status
        )
    }
}

/// A route of a platform, all statuses together (how the admin API's percentiles group).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub platform: String,
    pub method: String,
    pub route: String,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.platform, self.method, self.route)
    }
}

/// What a run got back.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Client-side latency of every answer, in milliseconds, by label set.
    answers: BTreeMap<Key, Vec<f64>>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// Answers per label set.
    pub fn counts(&self) -> BTreeMap<Key, u64> {
        self.answers
            .iter()
            .map(|(key, latencies)| (key.clone(), latencies.len() as u64))
            .collect()
    }

    /// Every answer.
    pub fn total(&self) -> u64 {
        self.answers.values().map(|l| l.len() as u64).sum()
    }

    /// The routes that got answers.
    pub fn routes(&self) -> BTreeSet<RouteKey> {
        self.answers.keys().map(Key::route_key).collect()
    }

    /// Answers of `route`, all statuses, by status class (`2xx` → n).
    pub fn status_classes(&self, route: &RouteKey) -> BTreeMap<String, u64> {
        let mut classes = BTreeMap::new();
        for (key, latencies) in &self.answers {
            if key.route_key() == *route {
                *classes.entry(key.status_class()).or_default() += latencies.len() as u64;
            }
        }
        classes
    }

    /// The latencies of `route`, all statuses together.
    pub fn latencies(&self, route: &RouteKey) -> Latencies {
        Latencies::new(
            self.answers
                .iter()
                .filter(|(key, _)| key.route_key() == *route)
                .flat_map(|(_, l)| l.iter().copied())
                .collect(),
        )
    }

    /// The latencies of the answers with exactly these labels.
    pub fn latencies_of(&self, key: &Key) -> Latencies {
        Latencies::new(self.answers.get(key).cloned().unwrap_or_default())
    }

    /// Adds `other`'s answers to these (the elapsed times add up).
    pub fn merge(&mut self, other: &Report) {
        for (key, latencies) in &other.answers {
            self.answers
                .entry(key.clone())
                .or_default()
                .extend(latencies);
        }
        self.elapsed += other.elapsed;
    }

    fn record(&mut self, key: Key, latency_ms: f64) {
        self.answers.entry(key).or_default().push(latency_ms);
    }

    /// A table of counts and client-side percentiles, for test output.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<70} {:>6} {:>9} {:>9} {:>9}\n",
            "platform method route status", "count", "p50 ms", "p95 ms", "max ms"
        );
        for key in self.answers.keys() {
            let l = self.latencies_of(key);
            let _ = writeln!(
                out,
                "{:<70} {:>6} {:>9.3} {:>9.3} {:>9.3}",
                key.to_string(),
                l.len(),
                l.percentile(0.50),
                l.percentile(0.95),
                l.max()
            );
        }
        out
    }
}

/// Latencies in milliseconds, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<f64>,
}

impl Latencies {
    pub fn new(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self { sorted: ms }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The nearest-rank percentile: the smallest value with at least `q` of all at or below
    /// it (0 when empty).
    pub fn percentile(&self, q: f64) -> f64 {
        self.at_rank(self.rank(q))
    }

    /// The values `slack` ranks either side of the `q` percentile: any reasonable percentile
    /// definition (nearest rank, interpolated, a sketch's rank) lands between them.
    pub fn envelope(&self, q: f64, slack: usize) -> (f64, f64) {
        let rank = self.rank(q);
        (
            self.at_rank(rank.saturating_sub(slack)),
            self.at_rank(rank + slack),
        )
    }

    pub fn mean(&self) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        self.sorted.iter().sum::<f64>() / self.sorted.len() as f64
    }

    pub fn sum(&self) -> f64 {
        self.sorted.iter().sum()
    }

    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(0.0)
    }

    /// Zero-based nearest rank of `q`.
    fn rank(&self, q: f64) -> usize {
        let n = self.sorted.len();
        ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1
    }

    fn at_rank(&self, rank: usize) -> f64 {
        match self.sorted.len() {
            0 => 0.0,
            n => self.sorted[rank.min(n - 1)],
        }
    }
}

/// Opens `connections` keep-alive connections to `address` and drives `mix` over them.
pub fn run(address: SocketAddr, connections: usize, mix: &Mix, amount: Amount) -> Result<Report> {
    let mut conns = (0..connections)
        .map(|_| KeepAlive::connect(address))
        .collect::<Result<Vec<_>>>()?;
    run_on(&mut conns, mix, amount)
}

/// Drives `mix` over connections the caller opened (and keeps: they stay open and usable).
pub fn run_on(conns: &mut [KeepAlive], mix: &Mix, amount: Amount) -> Result<Report> {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = match amount {
        Amount::For(duration) => Some(started + duration),
        Amount::Requests(_) => None,
    };
    let report = Mutex::new(Report::default());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for (index, conn) in conns.iter_mut().enumerate() {
            let (next, stop, report, failure) = (&next, &stop, &report, &failure);
            scope.spawn(move || {
                let mut mine = Report::default();
                while !stop.load(Ordering::Relaxed) {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if matches!(amount, Amount::Requests(n) if k >= n) {
                        break;
                    }
                    let call = mix.nth(k);
                    match conn
                        .send(
                            call.method,
                            &call.path,
                            &call.host,
                            call.body.as_deref().map(str::as_bytes),
                        )
                        .with_context(|| {
                            format!(
                                "request {k} ({} {} Host: {}) on connection {index}",
                                call.method, call.path, call.host
                            )
                        }) {
                        Ok(answer) => mine.record(
                            Key {
                                platform: call.platform.clone(),
                                method: call.method.to_owned(),
                                route: call.route.clone(),
                                status: answer.status,
                            },
                            answer.first_byte.as_secs_f64() * 1000.0,
                        ),
                        Err(err) => {
                            stop.store(true, Ordering::Relaxed);
                            failure
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_or_insert(err);
                            break;
                        }
                    }
                }
                report
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .merge(&mine);
            });
        }
    });
    if let Some(err) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(err);
    }
    let mut report = report.into_inner().unwrap_or_else(PoisonError::into_inner);
    report.elapsed = started.elapsed();
    if let Amount::Requests(n) = amount {
        if report.total() != n {
            return Err(anyhow!(
                "sent {n} requests but got {} answers",
                report.total()
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_interleaves_calls_in_proportion_to_their_weights() {
        let a = Call::get("a", "/a", "pa", "/a");
        let b = Call::get("b", "/b", "pb", "/b");
        let mix = Mix::new(vec![(3, a.clone()), (1, b.clone())]);
        assert_eq!(mix.cycle(), 4);
        let first: Vec<&str> = (0..8).map(|k| mix.nth(k).path.as_str()).collect();
        assert_eq!(first, ["/a", "/a", "/b", "/a", "/a", "/a", "/b", "/a"]);
        assert_eq!(mix.calls(), [a, b]);
    }

    #[test]
    fn percentiles_use_the_nearest_rank_and_the_envelope_brackets_it() {
        let l = Latencies::new((1..=100).rev().map(f64::from).collect());
        assert!((l.percentile(0.5) - 50.0).abs() < f64::EPSILON);
        assert!((l.percentile(0.95) - 95.0).abs() < f64::EPSILON);
        assert!((l.percentile(1.0) - 100.0).abs() < f64::EPSILON);
        assert!((l.percentile(0.0) - 1.0).abs() < f64::EPSILON);
        assert_eq!(l.envelope(0.95, 2), (93.0, 97.0));
        assert_eq!(l.envelope(0.99, 5), (94.0, 100.0));
        assert!((l.mean() - 50.5).abs() < 1e-9);
        assert!(Latencies::default().percentile(0.5).abs() < f64::EPSILON);
    }
}
