//! Decode throughput of the protocol parsers on one core: events per second for typical
//! traffic, as the eBPF side delivers it (one feed per syscall, payloads capped at 512 bytes).
//!
//! ```sh
//! cargo run --release -p selfheal-daemon --example protocol_decode [-- SECONDS]
//! ```
//!
//! Not a test: it prints numbers and asserts nothing.

#[path = "common/wire.rs"]
mod wire;

use std::{hint::black_box, time::Instant};

use selfheal_daemon::protocols::{
    http::{HttpExchange, HttpParser},
    postgres::{PgEvent, PgParser},
    Direction,
};
use wire::pg_message as msg;

/// The capture bound of the eBPF side.
const CAPTURE: usize = 512;

/// One connection's worth of syscalls, repeated: (direction, data, timestamp step).
struct Workload {
    name: &'static str,
    syscalls: Vec<(Direction, Vec<u8>)>,
    events_per_round: u64,
}

fn http_keep_alive() -> Workload {
    let request = b"GET /api/v1/leads/42?expand=owner HTTP/1.1\r\nHost: api.tackle.io\r\nUser-Agent: okhttp/4.12\r\nAccept: application/json\r\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n\r\n".to_vec();
    let mut response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2048\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\n\r\n".to_vec();
    response.resize(response.len() + 2048, b'x');
    Workload {
        name: "http keep-alive GET, 2 KiB JSON",
        syscalls: vec![(Direction::Received, request), (Direction::Sent, response)],
        events_per_round: 1,
    }
}

fn postgres_prepared() -> Workload {
    // tokio-postgres running a prepared statement: Bind/Execute/Sync, one row back.
    let mut bind = b"\0s7\0".to_vec();
    bind.extend([0, 1, 0, 1, 0, 1, 0, 0, 0, 4, 0, 0, 0, 42, 0, 1, 0, 1]);
    let mut execute = b"\0".to_vec();
    execute.extend([0, 0, 0, 0]);
    let sent = [msg(b'B', &bind), msg(b'E', &execute), msg(b'S', &[])].concat();
    let mut row = vec![0, 2, 0, 0, 0, 4, 0, 0, 0, 42, 0, 0, 0, 4];
    row.extend(b"Acme");
    let received = [
        msg(b'2', &[]),
        msg(b'D', &row),
        msg(b'C', b"SELECT 1\0"),
        msg(b'Z', b"I"),
    ]
    .concat();
    let mut parse = b"s7\0SELECT id, name FROM leads WHERE id = $1\0".to_vec();
    parse.extend([0, 1, 0, 0, 0, 23]);
    let prepare = [msg(b'P', &parse), msg(b'S', &[])].concat();
    let prepared = [msg(b'1', &[]), msg(b'Z', b"I")].concat();
    let mut syscalls = vec![(Direction::Sent, prepare), (Direction::Received, prepared)];
    for _ in 0..100 {
        syscalls.push((Direction::Sent, sent.clone()));
        syscalls.push((Direction::Received, received.clone()));
    }
    Workload {
        name: "postgres prepared statement (Bind/Execute/Sync)",
        syscalls,
        events_per_round: 100,
    }
}

/// Simple queries with inline literals: every text differs, so every one is fingerprinted.
/// With `repeat`, one text over and over (the parser's recent-statement cache).
fn postgres_simple(repeat: bool) -> Workload {
    let mut row = vec![0, 2, 0, 0, 0, 2];
    row.extend(b"17");
    row.extend([0, 0, 0, 6]);
    row.extend(b"a@b.io");
    let received = [
        msg(b'T', &[0, 0]),
        msg(b'D', &row),
        msg(b'C', b"SELECT 1\0"),
        msg(b'Z', b"I"),
    ]
    .concat();
    let texts = if repeat { 1 } else { 64 };
    let mut syscalls = Vec::new();
    for i in 0..texts {
        let sql = format!(
            "SELECT id, email FROM users WHERE tenant_id = {i} AND email = 'user{i}@b.io' AND state IN (1, 2, 3) LIMIT 10\0"
        );
        syscalls.push((Direction::Sent, msg(b'Q', sql.as_bytes())));
        syscalls.push((Direction::Received, received.clone()));
    }
    Workload {
        name: if repeat {
            "postgres simple query, same text each time"
        } else {
            "postgres simple query, new literals each time"
        },
        syscalls,
        events_per_round: texts,
    }
}

trait Feed {
    fn feed_syscall(&mut self, direction: Direction, data: &[u8], ts: u64) -> usize;
}

impl Feed for (HttpParser, Vec<HttpExchange>) {
    fn feed_syscall(&mut self, direction: Direction, data: &[u8], ts: u64) -> usize {
        let captured = &data[..data.len().min(CAPTURE)];
        self.0
            .feed(direction, captured, data.len(), ts, &mut self.1);
        let n = self.1.len();
        self.1.clear();
        n
    }
}

impl Feed for (PgParser, Vec<PgEvent>) {
    fn feed_syscall(&mut self, direction: Direction, data: &[u8], ts: u64) -> usize {
        let captured = &data[..data.len().min(CAPTURE)];
        self.0
            .feed(direction, captured, data.len(), ts, &mut self.1);
        let n = self.1.len();
        self.1.clear();
        n
    }
}

fn measure(workload: &Workload, parser: &mut impl Feed, seconds: f64) {
    let started = Instant::now();
    let mut events = 0u64;
    let mut bytes = 0u64;
    let mut ts = 0u64;
    let mut rounds = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..1000 {
            for (direction, data) in &workload.syscalls {
                ts += 1_000;
                events += parser.feed_syscall(*direction, black_box(data), ts) as u64;
                bytes += data.len().min(CAPTURE) as u64;
            }
            rounds += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = rounds * workload.events_per_round;
    println!(
        "{:<50} {:>6.2} M events/s  {:>7.1} MB/s captured  ({} events, expected about {})",
        workload.name,
        events as f64 / elapsed / 1e6,
        bytes as f64 / elapsed / 1e6,
        events,
        expected
    );
}

fn main() {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    measure(
        &http_keep_alive(),
        &mut (HttpParser::new(), Vec::new()),
        seconds,
    );
    measure(
        &postgres_prepared(),
        &mut (PgParser::new(), Vec::new()),
        seconds,
    );
    for repeat in [false, true] {
        measure(
            &postgres_simple(repeat),
            &mut (PgParser::new(), Vec::new()),
            seconds,
        );
    }
}
