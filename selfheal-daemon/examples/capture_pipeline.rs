//! The daemon's whole path for captured segments on one core, in a tight loop: ring-buffer
//! records decoded where they lie, the connection table, stream reassembly and protocol
//! parsers (`Traffic::handle_record`), then the metrics, store and views (`Recorder::record`)
//! every 1024 records, as the decoders' thread does. The workload is the overhead bench's: an HTTP `GET` served on 4
//! keep-alive connections, each running one prepared PostgreSQL statement on a pool
//! connection; 4 segments with payload per request, 256 bytes of each captured.
//!
//! ```sh
//! cargo run --release -p selfheal-daemon --example capture_pipeline [-- SECONDS]
//! ```
//!
//! Set against the daemon's CPU per request under `cargo xtask bench overhead --profile`, it
//! tells the work itself from what running beside the backend adds (cold caches, a second
//! core reading what the first wrote). Not a test: it prints numbers and asserts nothing.

#[path = "common/wire.rs"]
mod wire;

use std::time::{Duration, Instant};

use selfheal_daemon::{
    config::{PlatformConfig, TrafficConfig},
    probes::capture::{Capture, Decoded, Endpoints, Role, Traffic},
    store::{StoreConfig, StoreHandle},
    telemetry::Metrics,
    traffic::{Platforms, Recorder, TrafficView},
};
use selfheal_ebpf::{kind, SegmentEvent, DIRECTION_RECV, DIRECTION_SEND, MAX_CAPTURE};
use wire::pg_message as msg;

/// Bytes of each segment's payload the records carry (`probes.payload_bytes` in the bench).
const CAPTURED: usize = 256;
const CONNECTIONS: u64 = 4;

/// One direction of one connection: its record, whose sequence number and timestamp move on.
struct Flow {
    event: Box<SegmentEvent>,
    seq: u32,
}

impl Flow {
    fn new(sock: u64, direction: u32, local: u16, remote: u16, payload: &[u8]) -> Self {
        let mut event = Box::new(SegmentEvent {
            kind: kind::SEGMENT,
            direction,
            sock,
            ts_ns: 0,
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            captured: 0,
            headers: [0; selfheal_ebpf::SEGMENT_HEADERS],
            pad: 0,
            data: [0; MAX_CAPTURE],
        });
        let captured = payload.len().min(CAPTURED);
        event.captured = u32::try_from(captured).unwrap_or(0);
        event.data[..captured].copy_from_slice(&payload[..captured]);
        // IPv4 on loopback; the packet's source is the target's end when it is sent.
        let (sport, dport) = if direction == DIRECTION_SEND {
            (local, remote)
        } else {
            (remote, local)
        };
        event.headers[0] = 0x45;
        event.headers[9] = 6;
        event.headers[12..16].copy_from_slice(&[127, 0, 0, 1]);
        event.headers[16..20].copy_from_slice(&[127, 0, 0, 1]);
        event.headers[20..22].copy_from_slice(&sport.to_be_bytes());
        event.headers[22..24].copy_from_slice(&dport.to_be_bytes());
        Self { event, seq: 1 }
    }

    /// The next segment's record bytes.
    fn next(&mut self, ts_ns: u64) -> &[u8] {
        self.event.ts_ns = ts_ns;
        self.event.headers[24..28].copy_from_slice(&self.seq.to_be_bytes());
        self.seq = self.seq.wrapping_add(self.event.len);
        // SAFETY: `SegmentEvent` is plain old data; viewing it as bytes is what the kernel
        // writes to the ring buffer.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&*self.event).cast::<u8>(),
                size_of::<SegmentEvent>(),
            )
        }
    }
}

fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);

    let request = b"GET /api/v1/tackle/deals HTTP/1.1\r\nHost: api.tackle.io\r\nUser-Agent: selfheal-bench\r\nAccept: */*\r\n\r\n";
    let mut response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1800\r\ndate: Mon, 30 Nov 2026 19:00:00 GMT\r\n\r\n[".to_vec();
    response.resize(response.len() + 1799, b'x');
    let mut bind = b"\0s7\0".to_vec();
    bind.extend([0, 1, 0, 1, 0, 1, 0, 0, 0, 4, 0, 0, 0, 42, 0, 1, 0, 1]);
    let query = [
        msg(b'B', &bind),
        msg(b'E', &[0, 0, 0, 0, 0]),
        msg(b'S', &[]),
    ]
    .concat();
    let mut row = vec![0, 2, 0, 0, 0, 4, 0, 0, 0, 42, 0, 0, 0, 4];
    row.extend(b"Acme");
    let mut answer = vec![msg(b'2', &[])];
    answer.extend(std::iter::repeat_n(msg(b'D', &row), 20));
    answer.push(msg(b'C', b"SELECT 20\0"));
    answer.push(msg(b'Z', b"I"));
    let answer = answer.concat();
    let mut parse =
        b"s7\0SELECT id, name FROM deals WHERE owner = $1 ORDER BY id LIMIT 20\0".to_vec();
    parse.extend([0, 1, 0, 0, 0, 23]);
    let prepare = [msg(b'P', &parse), msg(b'S', &[])].concat();
    let prepared = [msg(b'1', &[]), msg(b'Z', b"I")].concat();

    let store = StoreHandle::new(StoreConfig::default()).expect("store");
    let platforms = Platforms::new(&[PlatformConfig::new(
        "tackle.io",
        &["api.tackle.io"],
        &["/api/v1/tackle"],
    )]);
    let config = TrafficConfig::default();
    let view = TrafficView::new(store, platforms, config.slowest_requests);
    let metrics = Metrics::new();
    let mut recorder = Recorder::new(view, &config, metrics.clone());
    let mut traffic = Traffic::new(metrics);
    traffic.set_members(&[100]);
    let mut decoded = Decoded::default();

    // The connections open (as the TCP events would say), and the statement is prepared.
    let mut flows = Vec::new();
    let start = monotonic_ns();
    for i in 0..CONNECTIONS {
        let (http, pg) = (0xa000 + i * 64, 0xb000 + i * 64);
        let (client_port, pool_port) = (50_000 + i as u16, 40_000 + i as u16);
        for (sock, role, local, remote) in [
            (http, Role::Server, 8080, client_port),
            (pg, Role::Client, pool_port, 5432),
        ] {
            let opened = Capture::Opened {
                tgid: 100,
                sock,
                role,
                endpoints: Some(Endpoints::Tcp {
                    local: format!("127.0.0.1:{local}").parse().expect("address"),
                    remote: format!("127.0.0.1:{remote}").parse().expect("address"),
                }),
                ts_ns: start,
            };
            traffic.handle(&opened, &[], &mut decoded);
        }
        let mut setup = [
            Flow::new(pg, DIRECTION_SEND, pool_port, 5432, &prepare),
            Flow::new(pg, DIRECTION_RECV, pool_port, 5432, &prepared),
        ];
        for flow in &mut setup {
            traffic.handle_record(flow.next(start), &mut decoded);
        }
        flows.push([
            Flow::new(http, DIRECTION_RECV, 8080, client_port, request),
            Flow::new(pg, DIRECTION_SEND, pool_port, 5432, &query),
            Flow::new(pg, DIRECTION_RECV, pool_port, 5432, &answer),
            Flow::new(http, DIRECTION_SEND, 8080, client_port, &response),
        ]);
        // The pool's flows continue the sequence after the setup.
        let [_, q, a, _] = &mut flows[i as usize];
        q.seq = setup[0].seq;
        a.seq = setup[1].seq;
    }
    recorder.record(&decoded);
    decoded.clear();

    // Rounds of one request per connection; 1024 records between two recordings, as the
    // decoders' thread reads them.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let (mut requests, mut exchanges, mut queries) = (0u64, 0usize, 0usize);
    let mut ts = monotonic_ns();
    while Instant::now() < deadline {
        for _ in 0..64 {
            for connection in &mut flows {
                for flow in connection.iter_mut() {
                    ts += 50_000;
                    traffic.handle_record(flow.next(ts), &mut decoded);
                }
                requests += 1;
            }
        }
        exchanges += decoded.http.len();
        queries += decoded.postgres.len();
        recorder.record(&decoded);
        decoded.clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{requests} requests in {elapsed:.1} s: {:.2} µs per request ({:.2} µs per segment record), {exchanges} HTTP exchanges and {queries} PostgreSQL events decoded",
        elapsed * 1e6 / requests as f64,
        elapsed * 1e6 / (requests * 4) as f64,
    );
}
