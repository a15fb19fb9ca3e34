//! Traffic: what the target's decoded HTTP exchanges and PostgreSQL queries mean — per
//! platform and route, per query fingerprint — as Prometheus metrics, store series and the
//! tables behind `GET /api/v1/system/{metrics,queries,traces}` (`metrics` as summaries over
//! a window or as points in steps).
//!
//! Owns: the platform matcher, the label bounds (`traffic.max_routes` routes and
//! `traffic.max_queries` fingerprints, later ones counted as `other`), the query table, the
//! slowest recent requests and the recent history that ties queries to them. Must not: grow
//! without bound (every table has a cap), block the capture task (the shared tables are
//! locked once per parsing section, the store once per section), or label anything with a value that
//! identifies one request (paths go through route templates, SQL through fingerprints).

mod moves;
mod platform;
mod record;
#[cfg(test)]
mod tests;
mod views;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

pub use moves::{QueryMove, RouteMove, TrafficMoves, Window};
pub use platform::{Platforms, OTHER};
pub use record::{Recorder, HTTP_DURATION, HTTP_REQUESTS, QUERY_DURATION, QUERY_ERRORS};
pub use views::{
    parse_window, Figures, MetricsQuery, MetricsSeriesView, MetricsView, QueriesView, QueryView,
    TracesView, TrafficHealth, ViewError, MAX_ANSWER_POINTS, MAX_SERIES_POINTS,
};

use crate::{
    probes::capture::Peer,
    store::{StoreHandle, WindowSketch},
};

/// Recent exchanges and queries kept to tie queries to slow requests.
const RECENT: usize = 4096;
/// Distinct SQLSTATEs kept per fingerprint; more count as `other`.
const MAX_SQLSTATES: usize = 8;
/// How long a slow request stays in the slowest list (two generations of this).
const SLOWEST_GENERATION_NS: u64 = 5 * 60 * 1_000_000_000;

/// What the recorder writes and the API reads: cheap to clone.
#[derive(Clone)]
pub struct TrafficView {
    tables: Arc<Mutex<Tables>>,
    store: StoreHandle,
    platforms: Arc<Platforms>,
}

impl TrafficView {
    pub fn new(store: StoreHandle, platforms: Platforms, slowest: usize) -> Self {
        Self {
            tables: Arc::new(Mutex::new(Tables::new(slowest))),
            store,
            platforms: Arc::new(platforms),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // The tables are counters and lists: a panic mid-update leaves them usable.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    pub fn platforms(&self) -> &Platforms {
        &self.platforms
    }
}

/// Per fingerprint, since the daemon started.
#[derive(Debug, Clone)]
struct QueryStats {
    query_id: Arc<str>,
    fingerprint: Arc<str>,
    count: u64,
    errors: u64,
    rows: u64,
    total_ns: u64,
    last_seen_ns: u64,
    durations_ms: WindowSketch,
    sqlstates: BTreeMap<Arc<str>, u64>,
}

/// A finished request, for the slowest list.
#[derive(Debug, Clone)]
struct Trace {
    tgid: u32,
    /// The client, when its connection's addresses are known.
    peer: Option<Peer>,
    platform: Arc<str>,
    method: &'static str,
    route: Arc<str>,
    status: u16,
    start_ns: u64,
    end_ns: u64,
}

impl Trace {
    fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

#[derive(Debug, Clone)]
struct RecentQuery {
    tgid: u32,
    /// The database server, when its connection's addresses are known.
    server: Option<Peer>,
    start_ns: u64,
    end_ns: u64,
    query_id: Arc<str>,
    fingerprint: Arc<str>,
    sqlstate: Option<Arc<str>>,
}

/// A request waiting for its response at the last look.
#[derive(Debug, Clone)]
struct InFlight {
    tgid: u32,
    peer: Option<Peer>,
    platform: Arc<str>,
    method: &'static str,
    route: Arc<str>,
    start_ns: u64,
}

#[derive(Debug)]
struct Tables {
    queries: HashMap<Arc<str>, QueryStats>,
    auth_failures: BTreeMap<Arc<str>, u64>,
    logins: u64,
    /// The slowest requests of the current and the previous generation, slowest first.
    slowest: [Vec<Trace>; 2],
    slowest_cap: usize,
    generation_start_ns: u64,
    recent_exchanges: VecDeque<(u32, u64, u64)>,
    recent_queries: VecDeque<RecentQuery>,
    in_flight: Vec<InFlight>,
    queries_in_flight: usize,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC` in ns at the last recording.
    realtime_offset_ns: i64,
    /// The newest monotonic timestamp seen.
    now_ns: u64,
    /// When the target last started an HTTP response (monotonic ns; 0: never seen).
    last_response_ns: u64,
}

impl Tables {
    fn new(slowest_cap: usize) -> Self {
        Self {
            queries: HashMap::new(),
            auth_failures: BTreeMap::new(),
            logins: 0,
            slowest: [Vec::new(), Vec::new()],
            slowest_cap,
            generation_start_ns: 0,
            recent_exchanges: VecDeque::with_capacity(RECENT),
            recent_queries: VecDeque::with_capacity(RECENT),
            in_flight: Vec::new(),
            queries_in_flight: 0,
            last_response_ns: 0,
            realtime_offset_ns: 0,
            now_ns: 0,
        }
    }

    /// Unix milliseconds of a monotonic timestamp.
    fn unix_ms(&self, monotonic_ns: u64) -> i64 {
        let ns = i64::try_from(monotonic_ns)
            .unwrap_or(i64::MAX)
            .saturating_add(self.realtime_offset_ns);
        ns / 1_000_000
    }

    fn add_trace(&mut self, trace: Trace) {
        if trace.end_ns.saturating_sub(self.generation_start_ns) > SLOWEST_GENERATION_NS {
            let [current, previous] = &mut self.slowest;
            *previous = std::mem::take(current);
            self.generation_start_ns = trace.end_ns;
        }
        self.recent_exchanges
            .push_back((trace.tgid, trace.start_ns, trace.end_ns));
        if self.recent_exchanges.len() > RECENT {
            self.recent_exchanges.pop_front();
        }
        let list = &mut self.slowest[0];
        if list.len() == self.slowest_cap
            && list
                .last()
                .is_some_and(|last| last.duration_ns() >= trace.duration_ns())
        {
            return;
        }
        let at = list.partition_point(|t| t.duration_ns() >= trace.duration_ns());
        list.insert(at, trace);
        list.truncate(self.slowest_cap);
    }

    fn add_recent_query(&mut self, query: RecentQuery) {
        self.recent_queries.push_back(query);
        if self.recent_queries.len() > RECENT {
            self.recent_queries.pop_front();
        }
    }
}

/// 16 hex digits of the FNV-1a hash of a fingerprint: stable across restarts and versions.
pub fn query_id(fingerprint: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in fingerprint.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max)]
}

/// A SQLSTATE as a label: five digits or upper-case letters, else `other`.
fn sqlstate_label(code: &str) -> &str {
    if code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    {
        code
    } else {
        "other"
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn query_ids_are_stable_hex() {
        assert_eq!(query_id(""), "cbf29ce484222325");
        assert_eq!(query_id("SELECT ?").len(), 16);
        assert_ne!(query_id("SELECT ?"), query_id("SELECT $1"));
    }

    #[test]
    fn sqlstates_are_bounded() {
        assert_eq!(sqlstate_label("28P01"), "28P01");
        assert_eq!(sqlstate_label("42p01"), "other");
        assert_eq!(sqlstate_label("123456"), "other");
    }

    #[test]
    fn the_slowest_list_keeps_the_slowest_and_ages_out() {
        let mut tables = Tables::new(2);
        let trace = |start_ns: u64, end_ns: u64| Trace {
            tgid: 1,
            peer: None,
            platform: Arc::from("p"),
            method: "GET",
            route: Arc::from("/"),
            status: 200,
            start_ns,
            end_ns,
        };
        tables.add_trace(trace(0, 10));
        tables.add_trace(trace(0, 30));
        tables.add_trace(trace(0, 20));
        tables.add_trace(trace(0, 5));
        let durations: Vec<u64> = tables.slowest[0].iter().map(Trace::duration_ns).collect();
        assert_eq!(durations, [30, 20]);
        // A new generation moves the current list to the previous one.
        tables.add_trace(trace(SLOWEST_GENERATION_NS, SLOWEST_GENERATION_NS + 31));
        assert_eq!(tables.slowest[1].len(), 2);
        assert_eq!(tables.slowest[0].len(), 1);
    }
}
