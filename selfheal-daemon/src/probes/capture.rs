//! Capture: the target's socket payloads from the kernel, per connection, through the
//! protocol decoders.
//!
//! Owns: the connection table (the kernel's `struct sock *` → what is known about it: the
//! process, the target's role, the local and remote addresses), the choice of decoder for
//! each connection (HTTP/1.x when the target serves it, PostgreSQL when the target is its
//! client, from the kernel's role and the first bytes), and the accounting of captured
//! traffic. Completed exchanges and queries go to the [`Recorder`]. The decoders read the
//! capture's ring buffer themselves, in place, on a thread of their own ([`run`]). Must not:
//! slow the kernel side (a ring the decoders have not emptied drops records in the kernel,
//! counted, and makes the sampling shed connections) or grow without bound (the table is
//! capped; every parser has a constant bound).

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    sync::atomic::Ordering,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxHashMap;

use super::ebpf::{CaptureFeed, Record};
use crate::{
    protocols::{
        http::{HttpExchange, HttpParser, HttpStats},
        postgres::{PgEvent, PgParser, PgStats},
        tcp::{Reassembler, Segment},
    },
    telemetry::{CaptureLabel, Metrics, ProtocolLabel, ReasonLabel},
    traffic::Recorder,
};

pub use crate::protocols::Direction;

/// Which side of the connection the target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The target connected (to Postgres, to a provider).
    Client,
    /// The target accepted (an HTTP request to it).
    Server,
}

impl Role {
    /// The role the kernel reported; `None` for a connection it did not see open (one that
    /// existed before the daemon started, or not TCP): the decoders tell it from the content.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            r if r == u32::from(selfheal_ebpf::ROLE_SERVER) => Some(Self::Server),
            r if r == u32::from(selfheal_ebpf::ROLE_CLIENT) => Some(Self::Client),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// `AF_INET` and `AF_INET6`, as the kernel's TCP events carry them.
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Where a connection's two ends are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// A TCP connection: the target's own address and its peer's.
    Tcp {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// A unix-domain socket. Neither end has a socket address, and the peer's path cannot be
    /// read cheaply: `/proc/net/unix` shows each socket's own bound path (none for the side
    /// that connected) but not which socket is its peer, which only the `sock_diag` netlink
    /// interface tells.
    Unix,
}

impl Endpoints {
    /// The ends of a TCP event: `family` and addresses as the kernel's
    /// `sock:inet_sock_set_state` gives them (addresses in network byte order, IPv4 in the
    /// first 4 bytes; ports in host order). `None` for a family other than IPv4 and IPv6.
    /// An IPv4-mapped IPv6 address (an IPv6 socket talking IPv4) is shown as the IPv4
    /// address, which is what the other end sees.
    pub fn from_raw(
        family: u16,
        saddr: [u8; 16],
        sport: u16,
        daddr: [u8; 16],
        dport: u16,
    ) -> Option<Self> {
        let ip = |bytes: [u8; 16]| -> Option<IpAddr> {
            match family {
                AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                    bytes[0], bytes[1], bytes[2], bytes[3],
                ))),
                AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()),
                _ => None,
            }
        };
        Some(Self::Tcp {
            local: SocketAddr::new(ip(saddr)?, sport),
            remote: SocketAddr::new(ip(daddr)?, dport),
        })
    }

    /// The same canonical form for addresses read from procfs.
    fn tcp(local: SocketAddr, remote: SocketAddr) -> Self {
        let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
        Self::Tcp {
            local: canonical(local),
            remote: canonical(remote),
        }
    }

    /// The other end: the client of a request the target serves, the server of a query it
    /// sends.
    pub fn remote(self) -> Peer {
        match self {
            Self::Tcp { remote, .. } => Peer::Tcp(remote),
            Self::Unix => Peer::Unix,
        }
    }
}

/// The other end of one of the target's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A unix-domain socket, whose peer has no socket address (see [`Endpoints::Unix`]).
    Unix,
}

impl fmt::Display for Peer {
    /// `127.0.0.1:5432`, `[::1]:5432`, or `unix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix => f.write_str("unix"),
        }
    }
}

/// What procfs tells about a connection older than the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed {
    /// The target's role on a TCP connection (`Server` when the local port is one it
    /// listens on); `None` on a unix socket, where nothing in procfs tells (the decoders
    /// tell from the content).
    pub role: Option<Role>,
    pub endpoints: Endpoints,
}

/// Which process a decoded message came from, and over which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub tgid: u32,
    /// `None` when the connection's addresses are unknown: it was seen neither open (TCP
    /// events) nor in procfs (one that existed before the daemon), e.g. a unix socket opened
    /// later.
    pub endpoints: Option<Endpoints>,
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Received => 0,
        Direction::Sent => 1,
    }
}

fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Received => "recv",
        Direction::Sent => "send",
    }
}

/// A record of the capture's ring buffer, as the decoders take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    Data {
        tgid: u32,
        fd: u32,
        /// The kernel `struct sock *`: the connection's identity while it lives.
        sock: u64,
        role: Option<Role>,
        direction: Direction,
        /// Bytes the operation moved.
        total_len: u64,
        /// Where their first bytes (up to `probes.payload_bytes`) are in the record.
        captured: Range<usize>,
        /// `CLOCK_MONOTONIC` nanoseconds.
        ts_ns: u64,
    },
    /// A TCP connection of the target was established (connect or accept).
    Opened {
        tgid: u32,
        sock: u64,
        role: Role,
        /// `None` when the kernel reported an address family other than IPv4 and IPv6.
        endpoints: Option<Endpoints>,
        ts_ns: u64,
    },
    /// A TCP segment with payload on a socket of the target's cgroup (the segment capture):
    /// one packet, not one syscall, so its bytes go through the connection's reassembler for
    /// that direction before the decoders.
    Segment {
        /// The kernel `struct sock *`, as for `Data`.
        sock: u64,
        direction: Direction,
        /// The sequence number of the first payload byte.
        seq: u32,
        /// Payload bytes in the segment.
        total_len: u32,
        /// Where their first bytes are in the record.
        captured: Range<usize>,
        /// The connection's ends from the packet's headers (`None` for an address family
        /// other than IPv4 and IPv6).
        endpoints: Option<Endpoints>,
        ts_ns: u64,
    },
    /// A TCP connection of the target closed.
    Closed { sock: u64, ts_ns: u64 },
    /// A process of the target exited (its last thread did): everything it read or wrote was
    /// captured before, so its connections end here, in order with their data.
    Exited { tgid: u32 },
}

/// The most connections tracked at once; beyond it new ones are refused and counted.
const MAX_CONNECTIONS: usize = 65_536;

/// Ticks of the capture task (1 s) a process that left the target keeps its connections,
/// when no exit comes through the captures to end them in order (the exit probe is not
/// attached, or the process left the target without exiting): long enough for its last
/// captures, at most `probes.flush_interval_ms` (1 s) in the kernel's ring while the decoders
/// keep up, to be decoded first (decoders starved on busy CPUs may close them before: the
/// capture sheds then anyway).
const LEAVING_TICKS: u8 = 3;

/// How long a connection no close event ends (a unix socket, whose close the kernel side does
/// not report) stays in the table without traffic. Past it, it is closed like any other, so
/// connections a pool opens and closes over unix sockets cannot fill the table.
const IDLE_UNCLOSED_NS: u64 = 3_600 * 1_000_000_000;

/// Bytes all connections' reassemblers may hold for out-of-order segments together; a
/// segment held past it makes its stream give up its holes (decoded as gaps, counted as
/// `reassembly_budget`), so out-of-order traffic cannot grow the daemon's memory.
const MAX_HELD_BYTES: usize = 16 << 20;

/// Data events on a connection whose protocol is still unknown before it is given up on.
const MAX_UNDECIDED_EVENTS: u8 = 8;

/// How a connection's bytes are read.
#[derive(Debug, Default)]
enum Decoder {
    /// Not enough seen to tell; counts the data events looked at.
    #[default]
    Undecided,
    Http(Box<HttpParser>),
    Postgres(Box<PgParser>),
    /// Neither protocol (TLS, HTTP/2, a client HTTP call, anything else): only counted.
    Opaque,
}

#[derive(Debug, Default)]
struct Connection {
    /// The process it is attributed to. The segment capture does not know which process
    /// moved a packet (ingress runs in softirq): its connections belong to the process that
    /// opened them (TCP events) or, for one found mid-stream, to the target's first process.
    tgid: u32,
    /// The fd of its first capture, to apply a procfs seed that arrives after it.
    fd: Option<u32>,
    role: Option<Role>,
    endpoints: Option<Endpoints>,
    recv_bytes: u64,
    send_bytes: u64,
    decoder: Decoder,
    undecided_events: u8,
    /// The byte streams received and sent, rebuilt from segments (segment capture only).
    streams: Option<Box<[Reassembler; 2]>>,
    /// When its last segment was seen: the time of what a flush at close completes.
    last_ts_ns: u64,
    /// [`Traffic::readmissions`] as of its last segment.
    readmissions: u64,
}

impl Connection {
    fn origin(&self) -> Origin {
        Origin {
            tgid: self.tgid,
            endpoints: self.endpoints,
        }
    }
}

/// The capture counters of one (direction, role) pair, looked up once.
struct Counters {
    events: Counter,
    bytes: Counter,
}

/// What the decoders produced from one parsing section, tagged with the process that
/// produced it.
#[derive(Debug, Default)]
pub struct Decoded {
    pub http: Vec<(Origin, HttpExchange)>,
    pub postgres: Vec<(Origin, PgEvent)>,
    /// Scratch buffers handed to the parsers.
    http_out: Vec<HttpExchange>,
    pg_out: Vec<PgEvent>,
}

impl Decoded {
    fn collect(&mut self, origin: Origin) {
        self.http
            .extend(self.http_out.drain(..).map(|e| (origin, e)));
        self.postgres
            .extend(self.pg_out.drain(..).map(|e| (origin, e)));
    }

    pub fn clear(&mut self) {
        self.http.clear();
        self.postgres.clear();
    }
}

/// The decoders' problem counters, summed over live connections plus those already closed.
#[derive(Debug, Default, Clone, Copy)]
struct ProblemTotals {
    http: HttpStats,
    postgres: PgStats,
}

/// The connection table and its accounting.
pub struct Traffic {
    metrics: Metrics,
    /// By kernel socket pointer: the hottest lookup of the capture path, with a fast hasher.
    connections: FxHashMap<u64, Connection>,
    /// Indexed by `direction * 3 + role` (client, server, unknown).
    counters: Vec<Counters>,
    /// `selfheal_ebpf_ringbuf_drops_total` of captures the connection table or the
    /// reassembly budget had no room for.
    table_full: Counter,
    over_budget: Counter,
    /// Records of the capture's ring that could not be read.
    undecodable: Counter,
    /// Problems of parsers already dropped, and what was last exported.
    closed: ProblemTotals,
    exported: ProblemTotals,
    /// Bytes the live connections' reassemblers hold (see [`MAX_HELD_BYTES`]).
    held_bytes: usize,
    /// Roles and addresses of the target's connections that existed before the daemon saw
    /// them open, by (tgid, fd), from procfs; each is used once, by the first capture on
    /// that fd (or by the connection already seen on it when the seed arrives late).
    seeded: HashMap<(u32, u32), Seed>,
    /// The target's processes, as the tracker last said.
    members: Vec<u32>,
    /// Processes that are no longer members but still have connections, with the ticks left
    /// before these are closed (see [`LEAVING_TICKS`]).
    leaving: HashMap<u32, u8>,
    /// How many times the capture took back shed connections (see
    /// [`Traffic::set_readmissions`]).
    readmissions: u64,
}

impl Traffic {
    pub fn new(metrics: Metrics) -> Self {
        let mut counters = Vec::with_capacity(6);
        for direction in [Direction::Received, Direction::Sent] {
            for role in ["client", "server", "unknown"] {
                let label = CaptureLabel {
                    direction: direction_label(direction),
                    role,
                };
                counters.push(Counters {
                    events: metrics.capture_events.get_or_create(&label).clone(),
                    bytes: metrics.capture_bytes.get_or_create(&label).clone(),
                });
            }
        }
        // Made here, not where they are first needed: the parsing holds no lock the main
        // runtime may wait on (it can run under SCHED_IDLE, see `sched`).
        let drops = |reason| {
            metrics
                .ebpf_ringbuf_drops
                .get_or_create(&ReasonLabel { reason })
                .clone()
        };
        let (table_full, over_budget, undecodable) = (
            drops("connection_table_full"),
            drops("reassembly_budget"),
            drops("undecodable"),
        );
        Self {
            metrics,
            connections: FxHashMap::default(),
            counters,
            table_full,
            over_budget,
            undecodable,
            closed: ProblemTotals::default(),
            exported: ProblemTotals::default(),
            held_bytes: 0,
            seeded: HashMap::new(),
            members: Vec::new(),
            leaving: HashMap::new(),
            readmissions: 0,
        }
    }

    /// Remembers the roles and addresses of a process's connections found in procfs. A
    /// connection whose data was captured before the seed arrived (procfs is read on another
    /// thread) takes what it lacks from its seed at once.
    pub fn seed(&mut self, tgid: u32, connected: &[(u32, Seed)]) {
        let mut seeds: HashMap<u32, Seed> = connected.iter().copied().collect();
        for connection in self.connections.values_mut() {
            if connection.tgid != tgid {
                continue;
            }
            if connection.endpoints.is_none() {
                if let Some(seed) = connection.fd.and_then(|fd| seeds.remove(&fd)) {
                    connection.endpoints = Some(seed.endpoints);
                    connection.role = connection.role.or(seed.role);
                }
            } else if connection.role.is_none() && connection.fd.is_none() {
                // A connection the segment capture found (it knows the addresses, not the
                // fd): the seed with the same addresses tells the role.
                if let Some(seed) = seeds
                    .values()
                    .find(|s| Some(s.endpoints) == connection.endpoints)
                {
                    connection.role = seed.role;
                }
            }
        }
        for (fd, seed) in seeds {
            if self.seeded.len() < MAX_CONNECTIONS {
                self.seeded.insert((tgid, fd), seed);
            }
        }
    }

    fn counters(&self, direction: Direction, role: Option<Role>) -> &Counters {
        let row = match direction {
            Direction::Received => 0,
            Direction::Sent => 3,
        };
        let column = match role {
            Some(Role::Client) => 0,
            Some(Role::Server) => 1,
            None => 2,
        };
        &self.counters[row + column]
    }

    /// Handles one capture, its payload beside it; what the decoders complete is appended to
    /// `out`.
    pub fn handle(&mut self, capture: &Capture, payload: &[u8], out: &mut Decoded) {
        match *capture {
            Capture::Data {
                tgid,
                fd,
                sock,
                role,
                direction,
                total_len,
                captured: _,
                ts_ns,
            } => {
                let is_new = !self.connections.contains_key(&sock);
                let seed = match role {
                    None if is_new && !self.seeded.is_empty() => self.seeded.remove(&(tgid, fd)),
                    _ => None,
                };
                let role = role.or(seed.and_then(|s| s.role));
                let known = self.connections.get(&sock).and_then(|c| c.role).or(role);
                let counters = self.counters(direction, known);
                counters.events.inc();
                counters.bytes.inc_by(total_len);
                let Some(connection) = self.connection(sock, || Connection {
                    tgid,
                    fd: Some(fd),
                    role,
                    endpoints: seed.map(|s| s.endpoints),
                    ..Connection::default()
                }) else {
                    return;
                };
                match direction {
                    Direction::Received => connection.recv_bytes += total_len,
                    Direction::Sent => connection.send_bytes += total_len,
                }
                connection.fd.get_or_insert(fd);
                connection.last_ts_ns = connection.last_ts_ns.max(ts_ns);
                let total_len = usize::try_from(total_len).unwrap_or(usize::MAX);
                feed(connection, direction, payload, total_len, ts_ns, out);
                out.collect(connection.origin());
            }
            Capture::Segment {
                sock,
                direction,
                seq,
                total_len,
                captured: _,
                endpoints,
                ts_ns,
            } => self.segment(
                sock, direction, seq, total_len, payload, endpoints, ts_ns, out,
            ),
            Capture::Opened {
                tgid,
                sock,
                role,
                endpoints,
                ..
            } => {
                // A reused `struct sock` is a new connection: the old one's parser is closed.
                if let Some(old) = self.connections.remove(&sock) {
                    self.retire(old, out);
                }
                if self.connections.len() < MAX_CONNECTIONS {
                    let connection = Connection {
                        tgid,
                        role: Some(role),
                        endpoints,
                        ..Connection::default()
                    };
                    self.connections.insert(sock, connection);
                }
            }
            Capture::Closed { sock, .. } => {
                if let Some(old) = self.connections.remove(&sock) {
                    self.retire(old, out);
                }
            }
            Capture::Exited { tgid } => {
                self.leaving.remove(&tgid);
                self.retire_process(tgid, out);
            }
        }
    }

    /// Closes the connections of a process.
    fn retire_process(&mut self, tgid: u32, out: &mut Decoded) {
        let gone: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| c.tgid == tgid)
            .map(|(&sock, _)| sock)
            .collect();
        for sock in gone {
            if let Some(old) = self.connections.remove(&sock) {
                self.retire(old, out);
            }
        }
    }

    /// The connection of `sock`, made with `new` if it is not tracked yet; `None` (counted)
    /// when the table is full.
    fn connection(
        &mut self,
        sock: u64,
        new: impl FnOnce() -> Connection,
    ) -> Option<&mut Connection> {
        let room = self.connections.len() < MAX_CONNECTIONS;
        let connection = if room {
            Some(self.connections.entry(sock).or_insert_with(new))
        } else {
            self.connections.get_mut(&sock)
        };
        if connection.is_none() {
            self.table_full.inc();
        }
        connection
    }

    /// One segment of the segment capture: counted, then passed through the connection's
    /// reassembler for its direction to the decoders.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &mut self,
        sock: u64,
        direction: Direction,
        seq: u32,
        total_len: u32,
        payload: &[u8],
        endpoints: Option<Endpoints>,
        ts_ns: u64,
        out: &mut Decoded,
    ) {
        let existing = self.connections.get(&sock);
        // A connection not seen open (one older than the daemon): procfs's seed with the
        // same addresses tells its role and process, once.
        let seed = match (existing, endpoints) {
            (None, Some(ends)) if !self.seeded.is_empty() => self
                .seeded
                .iter()
                .find(|(_, seed)| seed.endpoints == ends)
                .map(|(&key, _)| key)
                .and_then(|key| self.seeded.remove_entry(&key)),
            _ => None,
        };
        let known = existing
            .and_then(|c| c.role)
            .or(seed.and_then(|(_, s)| s.role));
        let counters = self.counters(direction, known);
        counters.events.inc();
        counters.bytes.inc_by(u64::from(total_len));
        let owner = seed.map_or_else(
            || self.members.first().copied().unwrap_or(0),
            |((tgid, _), _)| tgid,
        );
        let held_elsewhere = self.held_bytes;
        let readmissions = self.readmissions;
        let Some(connection) = self.connection(sock, || Connection {
            tgid: owner,
            role: known,
            endpoints,
            ..Connection::default()
        }) else {
            return;
        };
        connection.endpoints = connection.endpoints.or(endpoints);
        // Its first segment since the capture took back shed connections: it may have been
        // one of them, and what lies between its streams' positions and their next segments
        // was never captured. (A connection that was kept gets the same chance; it starts
        // over only if this very segment lies past a hole, which a kept connection has only
        // from a lost record or a reordering — the segment capture does not know which
        // connections the kernel's mask took back.)
        let maybe_shed = connection.streams.is_some() && connection.readmissions < readmissions;
        connection.readmissions = readmissions;
        connection.last_ts_ns = ts_ns;
        match direction {
            Direction::Received => connection.recv_bytes += u64::from(total_len),
            Direction::Sent => connection.send_bytes += u64::from(total_len),
        }
        let mut streams = connection.streams.take().unwrap_or_default();
        if maybe_shed {
            streams.iter_mut().for_each(Reassembler::resync);
        }
        let stream = &mut streams[direction_index(direction)];
        // The connection's first segment since it was taken back starts its stream over after
        // bytes never captured: what the parser was waiting for (answers, the rest of a
        // message) went with them. It starts afresh, as on a connection found mid-way (once:
        // the other direction's own start-over is then only a gap).
        let restarted = (maybe_shed && total_len > 0 && stream.starts_over_at(seq))
            .then(|| restart(&mut connection.decoder));
        let segment = Segment {
            seq,
            len: total_len,
            captured: payload,
        };
        let before = stream.heap_bytes();
        let mut feed_out = |bytes: &[u8], len| {
            feed(connection, direction, bytes, len, ts_ns, out);
        };
        stream.push(segment, &mut feed_out);
        let over_budget = stream.heap_bytes() > before
            && held_elsewhere.saturating_sub(before) + stream.heap_bytes() > MAX_HELD_BYTES;
        if over_budget {
            stream.flush(&mut feed_out);
        }
        let after = stream.heap_bytes();
        connection.streams = Some(streams);
        out.collect(connection.origin());
        if let Some(old) = restarted {
            self.closed.http += old.http;
            self.closed.postgres += old.postgres;
        }
        self.held_bytes = held_elsewhere.saturating_sub(before) + after;
        if over_budget {
            self.over_budget.inc();
        }
    }

    /// Closes a connection's parser (flushing what it completes) and keeps its counters.
    fn retire(&mut self, mut connection: Connection, out: &mut Decoded) {
        // Segments still held past a hole are given up on: what follows the hole is decoded.
        if let Some(mut streams) = connection.streams.take() {
            let held: usize = streams.iter().map(Reassembler::heap_bytes).sum();
            self.held_bytes = self.held_bytes.saturating_sub(held);
            let ts_ns = connection.last_ts_ns;
            for direction in [Direction::Received, Direction::Sent] {
                streams[direction_index(direction)].flush(&mut |bytes, len| {
                    feed(&mut connection, direction, bytes, len, ts_ns, out);
                });
            }
        }
        match &mut connection.decoder {
            Decoder::Http(parser) => {
                parser.close(&mut out.http_out);
                self.closed.http += parser.stats();
            }
            Decoder::Postgres(parser) => {
                parser.close(&mut out.pg_out);
                self.closed.postgres += parser.stats();
            }
            Decoder::Undecided | Decoder::Opaque => {}
        }
        out.collect(connection.origin());
    }

    /// Handles one record of the capture's ring buffer where it lies (a capture's payload is
    /// read from the record, never copied); one that cannot be read is counted.
    pub fn handle_record(&mut self, record: &[u8], out: &mut Decoded) {
        match super::ebpf::decode(record) {
            Some(Record::Capture(capture)) => {
                let payload: &[u8] = match &capture {
                    Capture::Data { captured, .. } | Capture::Segment { captured, .. } => {
                        record.get(captured.clone()).unwrap_or_default()
                    }
                    _ => &[],
                };
                self.handle(&capture, payload, out);
            }
            Some(Record::Tcp(event)) => {
                if let Some(change) = super::ebpf::connection_change(&event) {
                    self.handle(&change, &[], out);
                }
            }
            Some(Record::Exit(exit)) => {
                self.handle(&Capture::Exited { tgid: exit.tgid }, &[], out);
            }
            None => {
                self.undecodable.inc();
            }
        }
    }

    /// The capture took back shed connections `count` times in all (the sampling level went
    /// down): each connection's first segment after a raise may belong to a connection that
    /// was shed, and may resynchronise.
    pub fn set_readmissions(&mut self, count: u64) {
        self.readmissions = count;
    }

    /// Exports the size of the connection table.
    pub fn export_connections(&self) {
        let tracked = i64::try_from(self.connections.len()).unwrap_or(i64::MAX);
        self.metrics.capture_connections.set(tracked);
    }

    /// The target's processes changed. The connections of a process that left are not closed
    /// here: the tracker learns of an exit on another path than the captures, which may still
    /// hold the process's last exchanges. They close with its exit in the captures, or
    /// `LEAVING_TICKS` ticks later.
    pub fn set_members(&mut self, members: &[u32]) {
        self.seeded.retain(|(tgid, _), _| members.contains(tgid));
        self.members = members.to_vec();
        self.leaving.retain(|tgid, _| !members.contains(tgid));
        self.mark_leaving();
    }

    /// Starts the countdown of the processes that have connections and are not members.
    fn mark_leaving(&mut self) {
        for connection in self.connections.values() {
            if !self.members.contains(&connection.tgid) {
                self.leaving.entry(connection.tgid).or_insert(LEAVING_TICKS);
            }
        }
    }

    /// One tick of the capture task at `now_ns` (kernel monotonic time): closes the
    /// connections of processes that left the target `LEAVING_TICKS` ticks ago, and those no
    /// close event will end that have been idle too long.
    pub fn tick(&mut self, now_ns: u64, out: &mut Decoded) {
        self.mark_leaving();
        let mut expired = Vec::new();
        for (&tgid, ticks) in &mut self.leaving {
            *ticks = ticks.saturating_sub(1);
            if *ticks == 0 {
                expired.push(tgid);
            }
        }
        for tgid in expired {
            self.leaving.remove(&tgid);
            self.retire_process(tgid, out);
        }
        self.retire_idle(now_ns, out);
    }

    /// Closes the connections no close event will end (see [`IDLE_UNCLOSED_NS`]) that have
    /// had no traffic since `now_ns - IDLE_UNCLOSED_NS` (kernel monotonic time).
    fn retire_idle(&mut self, now_ns: u64, out: &mut Decoded) {
        let idle: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| {
                c.streams.is_none()
                    && !matches!(c.endpoints, Some(Endpoints::Tcp { .. }))
                    && c.last_ts_ns > 0
                    && now_ns.saturating_sub(c.last_ts_ns) > IDLE_UNCLOSED_NS
            })
            .map(|(&sock, _)| sock)
            .collect();
        for sock in idle {
            if let Some(old) = self.connections.remove(&sock) {
                self.retire(old, out);
            }
        }
    }

    /// Requests and queries waiting for an answer now, for the traces view.
    pub fn in_flight(&self) -> (Vec<(Origin, crate::protocols::http::HttpRequest)>, usize) {
        let mut requests = Vec::new();
        let mut queries = 0;
        for connection in self.connections.values() {
            match &connection.decoder {
                Decoder::Http(parser) => requests.extend(
                    parser
                        .in_flight()
                        .map(|request| (connection.origin(), request.clone())),
                ),
                Decoder::Postgres(parser) => queries += parser.in_flight().count(),
                Decoder::Undecided | Decoder::Opaque => {}
            }
        }
        (requests, queries)
    }

    /// Exports the decoders' problem counters (sums over every parser, live and closed).
    pub fn export_problems(&mut self) {
        let mut now = self.closed;
        for connection in self.connections.values() {
            match &connection.decoder {
                Decoder::Http(parser) => now.http += parser.stats(),
                Decoder::Postgres(parser) => now.postgres += parser.stats(),
                Decoder::Undecided | Decoder::Opaque => {}
            }
        }
        let before = self.exported;
        let rows = [
            ("http", "unparsed", now.http.unparsed, before.http.unparsed),
            (
                "http",
                "unmatched",
                now.http.unmatched_responses,
                before.http.unmatched_responses,
            ),
            (
                "http",
                "unanswered",
                now.http.unanswered,
                before.http.unanswered,
            ),
            ("http", "desync", now.http.desyncs, before.http.desyncs),
            (
                "postgres",
                "desync",
                now.postgres.desyncs,
                before.postgres.desyncs,
            ),
            (
                "postgres",
                "unmatched",
                now.postgres.unmatched,
                before.postgres.unmatched,
            ),
            (
                "postgres",
                "dropped",
                now.postgres.dropped,
                before.postgres.dropped,
            ),
        ];
        for (protocol, problem, now, before) in rows {
            // A parser's counters only grow, but one forgotten with its process takes its
            // counts with it only if it was never retired; retire always adds, so this holds.
            if now > before {
                self.metrics
                    .protocol_problems
                    .get_or_create(&ProtocolLabel { protocol, problem })
                    .inc_by(now - before);
            }
        }
        self.exported = now;
    }
}

/// Replaces a parser with a fresh one of the same protocol; the old one's problem counters.
fn restart(decoder: &mut Decoder) -> ProblemTotals {
    let mut old = ProblemTotals::default();
    match decoder {
        Decoder::Http(parser) => old.http = std::mem::take(parser.as_mut()).stats(),
        Decoder::Postgres(parser) => old.postgres = std::mem::take(parser.as_mut()).stats(),
        Decoder::Undecided | Decoder::Opaque => {}
    }
    old
}

/// Feeds one syscall's bytes to the connection's decoder, choosing it first if needed.
fn feed(
    connection: &mut Connection,
    direction: Direction,
    captured: &[u8],
    total_len: usize,
    ts_ns: u64,
    out: &mut Decoded,
) {
    if matches!(connection.decoder, Decoder::Undecided) {
        connection.decoder = match classify(connection.role, direction, captured) {
            Some(Protocol::Http) => Decoder::Http(Box::default()),
            Some(Protocol::Postgres) => Decoder::Postgres(Box::default()),
            Some(Protocol::Other) => Decoder::Opaque,
            None => {
                connection.undecided_events += 1;
                if connection.undecided_events >= MAX_UNDECIDED_EVENTS {
                    connection.decoder = Decoder::Opaque;
                }
                return;
            }
        };
    }
    match &mut connection.decoder {
        Decoder::Http(parser) => {
            parser.feed(direction, captured, total_len, ts_ns, &mut out.http_out);
        }
        Decoder::Postgres(parser) => {
            parser.feed(direction, captured, total_len, ts_ns, &mut out.pg_out);
        }
        Decoder::Undecided | Decoder::Opaque => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http,
    Postgres,
    Other,
}

const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

/// The protocol a connection speaks, from the kernel's role and the first bytes of one
/// syscall; `None` when these bytes cannot tell.
///
/// The target is an HTTP server and a PostgreSQL client, so: bytes received that start a
/// request, or sent that start a response, are HTTP; bytes sent that are a startup packet
/// or a frontend message, or received that are a backend message, are PostgreSQL. HTTP is
/// tried first because `DELETE ` and `CONNECT ` begin with bytes that are also backend
/// message types. A connection the kernel saw the target accept is never PostgreSQL, and one
/// it saw the target open is never served HTTP (the target calling a provider's API).
fn classify(role: Option<Role>, direction: Direction, bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let http = match direction {
        Direction::Received => HTTP_METHODS.iter().any(|m| bytes.starts_with(m)),
        Direction::Sent => bytes.starts_with(b"HTTP/1."),
    };
    if http {
        return Some(if role == Some(Role::Client) {
            Protocol::Other
        } else {
            Protocol::Http
        });
    }
    let postgres = match direction {
        Direction::Sent => is_startup_packet(bytes) || is_message(bytes, b"QPBEDSCHFXdcf"),
        Direction::Received => is_message(bytes, b"RSKZTDCEINnst12GHWAcdv3"),
    };
    if postgres {
        return Some(if role == Some(Role::Server) {
            Protocol::Other
        } else {
            Protocol::Postgres
        });
    }
    // Fewer than 5 bytes could still become either; more that are neither are something else.
    (bytes.len() >= 8).then_some(Protocol::Other)
}

/// A startup, SSL, GSS-encryption or cancel request: a length then a known code.
fn is_startup_packet(bytes: &[u8]) -> bool {
    let (Some(length), Some(code)) = (be_u32(bytes, 0), be_u32(bytes, 4)) else {
        return false;
    };
    let known = matches!(code, 196_608 | 80_877_102..=80_877_104);
    known && (8..=10_000).contains(&length)
}

/// A typed message of one of `types` with a plausible length.
fn is_message(bytes: &[u8], types: &[u8]) -> bool {
    let Some(length) = be_u32(bytes, 1) else {
        return false;
    };
    types.contains(&bytes[0]) && (4..=(1 << 30)).contains(&length)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(word))
}

/// A process's sockets as procfs shows them (in its own network namespace).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessSockets {
    /// TCP ports it listens on.
    pub listening: Vec<u16>,
    /// Its connected sockets by fd: established TCP connections with their addresses and
    /// the target's role (`Server` when the local port is one it listens on), and connected
    /// unix stream sockets.
    pub connected: Vec<(u32, Seed)>,
}

/// The sockets of `pid`, from `/proc/<pid>/fd`, `/proc/<pid>/net/tcp{,6}` and
/// `/proc/<pid>/net/unix`; empty when the process is gone. Blocking I/O.
pub fn process_sockets(pid: u32) -> ProcessSockets {
    let Ok(process) = procfs::process::Process::new(pid as i32) else {
        return ProcessSockets::default();
    };
    let Ok(fds) = process.fd() else {
        return ProcessSockets::default();
    };
    let fd_of: HashMap<u64, u32> = fds
        .flatten()
        .filter_map(|fd| match fd.target {
            procfs::process::FDTarget::Socket(inode) => Some((inode, u32::try_from(fd.fd).ok()?)),
            _ => None,
        })
        .collect();
    let tcp: Vec<procfs::net::TcpNetEntry> = [process.tcp(), process.tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| fd_of.contains_key(&e.inode))
        .collect();
    // Only the process's own sockets are kept from the namespace-wide unix table (which
    // can be long on a busy host: it is read once per process joining the target).
    let unix = process
        .unix()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.state == procfs::net::UnixState::CONNECTED
                && e.socket_type == libc::SOCK_STREAM as u16
        })
        .filter_map(|e| fd_of.get(&e.inode).copied());
    sockets_of(&fd_of, &tcp, unix)
}

/// The seeds of a process's sockets: its TCP entries (their inodes mapped to its fds) and
/// the fds of its connected unix stream sockets.
fn sockets_of(
    fd_of: &HashMap<u64, u32>,
    tcp: &[procfs::net::TcpNetEntry],
    unix_fds: impl Iterator<Item = u32>,
) -> ProcessSockets {
    let listening: Vec<u16> = tcp
        .iter()
        .filter(|e| e.state == procfs::net::TcpState::Listen)
        .map(|e| e.local_address.port())
        .collect();
    let mut connected: Vec<(u32, Seed)> = tcp
        .iter()
        .filter(|e| e.state == procfs::net::TcpState::Established)
        .filter_map(|e| {
            let role = if listening.contains(&e.local_address.port()) {
                Role::Server
            } else {
                Role::Client
            };
            let seed = Seed {
                role: Some(role),
                endpoints: Endpoints::tcp(e.local_address, e.remote_address),
            };
            Some((*fd_of.get(&e.inode)?, seed))
        })
        .collect();
    connected.extend(unix_fds.map(|fd| {
        let seed = Seed {
            role: None,
            endpoints: Endpoints::Unix,
        };
        (fd, seed)
    }));
    ProcessSockets {
        listening,
        connected,
    }
}

/// Records read from the ring per parsing section: between two, what the section decoded goes
/// to the recorder at normal priority (see `sched`).
const RECORDS_PER_SECTION: usize = 1024;

/// Records read in one drain before the loop's other work (the tick, a change of members, the
/// end) gets a turn: under a steady overload the ring never empties. The end is also looked
/// for between two parsing sections.
const RECORDS_PER_DRAIN: usize = 64 * RECORDS_PER_SECTION;

/// Reads the capture's ring buffer (`feed`) every `flush` or when the kernel wakes it, until
/// cancelled; closes the connections of processes that stop being the target's (see
/// [`Traffic::set_members`]); hands what the decoders complete to `recorder`.
pub async fn run(
    feed: CaptureFeed,
    flush: std::time::Duration,
    mut members: watch::Receiver<Vec<u32>>,
    mut recorder: Recorder,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let CaptureFeed { ring, readmissions } = feed;
    // SAFETY: the ring buffer owns its map fd for as long as it lives, and it lives inside
    // this `AsyncFd` until the end of this function.
    let mut ring = match unsafe {
        AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    } {
        Ok(ring) => ring,
        Err(err) => {
            let err = std::io::Error::from(err);
            tracing::error!(error = %err, "cannot poll the capture's ring buffer; captured traffic is not decoded");
            return;
        }
    };
    let mut traffic = Traffic::new(metrics.clone());
    // The current members, without marking them seen: their first change below also starts
    // the procfs scans.
    traffic.set_members(&members.borrow().clone());
    let mut decoded = Decoded::default();
    // Connections older than the daemon (or than a process joining the target): their roles
    // from procfs, read on a blocking thread.
    let (seeds_tx, mut seeds) = mpsc::channel::<(u32, ProcessSockets)>(64);
    let mut scanned: Vec<u32> = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Captures do not wake this thread (see the eBPF programs) until a quarter of the ring
    // is full: it drains on a timer.
    let mut flush = tokio::time::interval(flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A drain stopped at `RECORDS_PER_DRAIN` with records left.
    let mut backlog = false;
    let drain = |ring: &mut RingBuf<MapData>,
                 cancel: &CancellationToken,
                 traffic: &mut Traffic,
                 decoded: &mut Decoded,
                 recorder: &mut Recorder| {
        let started = thread_cpu_seconds();
        let mut read = 0;
        let left = loop {
            let section = {
                // The parsing alone, on this thread's own data (see `sched`): the ring, the
                // table and the parsers are this thread's; the counters are atomics.
                let _idle = crate::sched::Idle::enter();
                let mut section = 0;
                while section < RECORDS_PER_SECTION {
                    let Some(record) = ring.next() else { break };
                    traffic.set_readmissions(readmissions.load(Ordering::Acquire));
                    traffic.handle_record(&record, decoded);
                    section += 1;
                }
                section
            };
            recorder.record(decoded);
            decoded.clear();
            read += section;
            if section < RECORDS_PER_SECTION {
                break false;
            }
            if read >= RECORDS_PER_DRAIN || cancel.is_cancelled() {
                break true;
            }
        };
        traffic.export_connections();
        let spent = thread_cpu_seconds() - started;
        if spent > 0.0 {
            metrics.capture_decode_cpu_seconds.inc_by(spent);
        }
        left
    };
    loop {
        // Not `biased`: with a backlog always ready, the one-second tick (leaving processes,
        // requests in flight) would never run.
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = members.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = members.borrow_and_update().clone();
                traffic.set_members(&current);
                scanned.retain(|tgid| current.contains(tgid));
                for &tgid in &current {
                    if !scanned.contains(&tgid) {
                        scanned.push(tgid);
                        let seeds_tx = seeds_tx.clone();
                        tokio::task::spawn_blocking(move || {
                            let _ = seeds_tx.blocking_send((tgid, process_sockets(tgid)));
                        });
                    }
                }
            }
            Some((tgid, sockets)) = seeds.recv() => traffic.seed(tgid, &sockets.connected),
            guard = ring.readable_mut() => match guard {
                Ok(mut guard) => {
                    backlog = drain(guard.get_inner_mut(), &cancel, &mut traffic, &mut decoded, &mut recorder);
                    guard.clear_ready();
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot poll the capture's ring buffer; captured traffic is not decoded");
                    return;
                }
            },
            _ = flush.tick() => {
                backlog = drain(ring.get_mut(), &cancel, &mut traffic, &mut decoded, &mut recorder);
            }
            () = std::future::ready(()), if backlog => {
                backlog = drain(ring.get_mut(), &cancel, &mut traffic, &mut decoded, &mut recorder);
            }
            _ = tick.tick() => {
                traffic.tick(crate::target::monotonic_ns(), &mut decoded);
                traffic.export_problems();
                let (requests, queries) = traffic.in_flight();
                recorder.set_in_flight(requests, queries);
            }
        }
        if !decoded.http.is_empty() || !decoded.postgres.is_empty() {
            recorder.record(&decoded);
            decoded.clear();
        }
    }
}

/// CPU time of the calling thread (a drain runs without awaiting, on one thread).
fn thread_cpu_seconds() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captures as a test hands them over, with their payloads in one buffer.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    struct Batch {
        captures: Vec<Capture>,
        /// The payloads of the `Capture::Data` in `captures`, one after another.
        bytes: Vec<u8>,
    }

    impl Batch {
        /// The payload at `range` of `bytes` (empty if out of it).
        fn payload(&self, range: &Range<usize>) -> &[u8] {
            self.bytes.get(range.clone()).unwrap_or_default()
        }
    }

    impl From<Capture> for Batch {
        fn from(capture: Capture) -> Self {
            Self {
                captures: vec![capture],
                bytes: Vec::new(),
            }
        }
    }

    fn data(sock: u64, role: Option<Role>, direction: Direction, bytes: &[u8]) -> Batch {
        Batch {
            captures: vec![Capture::Data {
                tgid: 1,
                fd: 7,
                sock,
                role,
                direction,
                total_len: bytes.len() as u64,
                captured: 0..bytes.len(),
                ts_ns: 1,
            }],
            bytes: bytes.to_vec(),
        }
    }

    fn handle(traffic: &mut Traffic, batch: impl Into<Batch>, out: &mut Decoded) {
        let batch = batch.into();
        for capture in &batch.captures {
            let payload = match capture {
                Capture::Data { captured, .. } | Capture::Segment { captured, .. } => {
                    batch.payload(captured)
                }
                _ => &[],
            };
            traffic.handle(capture, payload, out);
        }
    }

    /// The sampling took back shed connections once more.
    fn readmit(traffic: &mut Traffic) {
        traffic.set_readmissions(traffic.readmissions + 1);
    }

    #[test]
    fn unix_connections_without_traffic_for_an_hour_are_closed() {
        let mut traffic = Traffic::new(Metrics::new());
        let mut out = Decoded::default();
        // A unix-socket connection (data at 1 ns, no TCP event) and a TCP one opened by the
        // kernel's events: only the first has no close event to end it.
        handle(
            &mut traffic,
            data(
                0xb0,
                Some(Role::Client),
                Direction::Sent,
                b"Q\0\0\0\x0dselect 1\0",
            ),
            &mut out,
        );
        handle(
            &mut traffic,
            Capture::Opened {
                tgid: 1,
                sock: 0xc0,
                role: Role::Client,
                endpoints: Some(tcp("127.0.0.1:40000", "127.0.0.1:5432")),
                ts_ns: 0,
            },
            &mut out,
        );
        traffic.retire_idle(1 + IDLE_UNCLOSED_NS, &mut out);
        assert_eq!(traffic.connections.len(), 2, "an hour is not over yet");
        traffic.retire_idle(2 + IDLE_UNCLOSED_NS, &mut out);
        assert!(!traffic.connections.contains_key(&0xb0), "closed when idle");
        assert!(
            traffic.connections.contains_key(&0xc0),
            "TCP waits for its close"
        );
    }

    /// A record as the kernel writes it to the ring.
    fn record_bytes<T>(record: &T) -> Vec<u8> {
        // SAFETY: the records are plain old data; viewing one as bytes is what the kernel does.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(record).cast::<u8>(), size_of::<T>())
        }
        .to_vec()
    }

    fn tcp_record(kind: u32, tgid: u32, sock: u64) -> Vec<u8> {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        record_bytes(&selfheal_ebpf::TcpEvent {
            kind,
            tgid,
            ts_ns: 1,
            duration_ns: 0,
            family: 2,
            sport: 8080,
            dport: 50_000,
            role: selfheal_ebpf::ROLE_SERVER,
            old_state: 0,
            new_state: 0,
            saddr,
            daddr: saddr,
            sock,
        })
    }

    fn data_record(sock: u64, direction: u32, bytes: &[u8]) -> Vec<u8> {
        let mut event = selfheal_ebpf::DataEvent {
            kind: selfheal_ebpf::kind::DATA,
            tgid: 7,
            pid: 7,
            fd: 5,
            nr: selfheal_ebpf::syscall::READ,
            direction,
            total_len: bytes.len() as u64,
            captured: bytes.len() as u32,
            role: u32::from(selfheal_ebpf::ROLE_SERVER),
            sock,
            ts_ns: 2,
            data: [0; selfheal_ebpf::MAX_CAPTURE],
        };
        event.data[..bytes.len()].copy_from_slice(bytes);
        record_bytes(&event)
    }

    /// The decoders' ring as the kernel fills it: an accept's copy opens the connection with
    /// its addresses, the data decodes where it lies, a close's copy ends it, an exit's copy
    /// ends what its process still has; a reset changes nothing and garbage is counted.
    #[test]
    fn records_of_the_captures_ring_open_feed_and_close_connections() {
        use selfheal_ebpf::{kind, DIRECTION_RECV, DIRECTION_SEND};
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        let mut out = Decoded::default();
        traffic.handle_record(&tcp_record(kind::TCP_ACCEPT, 7, 0xb0), &mut out);
        let opened = &traffic.connections[&0xb0];
        assert_eq!(opened.role, Some(Role::Server));
        assert_eq!(
            opened.endpoints,
            Some(tcp("127.0.0.1:8080", "127.0.0.1:50000"))
        );
        traffic.handle_record(
            &data_record(
                0xb0,
                DIRECTION_RECV,
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
            &mut out,
        );
        traffic.handle_record(
            &data_record(
                0xb0,
                DIRECTION_SEND,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ),
            &mut out,
        );
        assert_eq!(out.http.len(), 1, "one exchange decoded from the records");
        assert_eq!(out.http[0].1.status, 200);
        traffic.handle_record(&tcp_record(kind::TCP_RESET, 7, 0xb0), &mut out);
        assert!(
            traffic.connections.contains_key(&0xb0),
            "a reset is no close"
        );
        traffic.handle_record(&tcp_record(kind::TCP_CLOSE, 7, 0xb0), &mut out);
        assert!(traffic.connections.is_empty(), "closed by the close's copy");

        traffic.handle_record(&tcp_record(kind::TCP_ACCEPT, 7, 0xc0), &mut out);
        let exit = selfheal_ebpf::ProcessExit {
            kind: kind::PROCESS_EXIT,
            tgid: 7,
            pid: 7,
            exit_code: 0,
            ts_ns: 3,
            comm: [0; 16],
        };
        traffic.handle_record(&record_bytes(&exit), &mut out);
        assert!(
            traffic.connections.is_empty(),
            "ended by its process's exit"
        );

        traffic.handle_record(&[0xff; 40], &mut out);
        traffic.handle_record(&[], &mut out);
        assert!(
            metrics
                .encode()
                .contains("selfheal_ebpf_ringbuf_drops_total{reason=\"undecodable\"} 2"),
            "unreadable records are counted"
        );
    }

    #[test]
    fn connections_are_tracked_and_traffic_counted() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        let mut out = Decoded::default();
        handle(
            &mut traffic,
            Capture::Opened {
                tgid: 1,
                sock: 0xa0,
                role: Role::Server,
                endpoints: None,
                ts_ns: 0,
            },
            &mut out,
        );
        for _ in 0..3 {
            handle(
                &mut traffic,
                data(0xa0, None, Direction::Received, &[b'x'; 100]),
                &mut out,
            );
        }
        assert_eq!(traffic.connections[&0xa0].recv_bytes, 300);
        let text = metrics.encode();
        assert!(
            text.contains("selfheal_capture_events_total{direction=\"recv\",role=\"server\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("selfheal_capture_bytes_total{direction=\"recv\",role=\"server\"} 300"),
            "{text}"
        );
        handle(
            &mut traffic,
            Capture::Closed {
                sock: 0xa0,
                ts_ns: 3,
            },
            &mut out,
        );
        assert!(traffic.connections.is_empty());

        // A connection older than the daemon: no open seen, role unknown, still tracked.
        handle(
            &mut traffic,
            data(0xb0, None, Direction::Sent, b"12345678"),
            &mut out,
        );
        assert!(metrics
            .encode()
            .contains("selfheal_capture_events_total{direction=\"send\",role=\"unknown\"} 1"));
        traffic.set_members(&[2]);
        assert_eq!(
            traffic.connections.len(),
            1,
            "closed with the exit, not before"
        );
        handle(&mut traffic, Capture::Exited { tgid: 1 }, &mut out);
        assert!(traffic.connections.is_empty());
    }

    /// pgbench's last exchange: the tracker learns of the exit (and changes the members)
    /// before the capture task has decoded the answers the process read just before it.
    #[test]
    fn a_process_that_left_keeps_its_connections_until_its_exit_is_decoded() {
        let queries = |out: &Decoded| {
            out.postgres
                .iter()
                .filter(|(_, e)| matches!(e, PgEvent::Query(_)))
                .count()
        };
        let mut traffic = Traffic::new(Metrics::new());
        let mut out = Decoded::default();
        traffic.set_members(&[1]);
        let query = b"Q\0\0\0\x0dSELECT 1\0";
        let answer = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";
        handle(
            &mut traffic,
            data(2, None, Direction::Sent, query),
            &mut out,
        );
        traffic.set_members(&[]);
        handle(
            &mut traffic,
            data(2, None, Direction::Received, answer),
            &mut out,
        );
        assert_eq!(queries(&out), 1);
        handle(&mut traffic, Capture::Exited { tgid: 1 }, &mut out);
        assert!(traffic.connections.is_empty());
        traffic.export_problems();
        assert_eq!(traffic.closed.postgres.dropped, 0);
        assert_eq!(traffic.closed.postgres.unmatched, 0);

        // A process that left the target without its exit in the captures: its connections
        // close LEAVING_TICKS ticks later, an unanswered query dropped and counted.
        handle(
            &mut traffic,
            data(3, None, Direction::Sent, query),
            &mut out,
        );
        for _ in 1..LEAVING_TICKS {
            traffic.tick(1, &mut out);
            assert_eq!(traffic.connections.len(), 1);
        }
        traffic.tick(1, &mut out);
        assert!(traffic.connections.is_empty());
        assert_eq!(traffic.closed.postgres.dropped, 1);
        // A member again before that: kept.
        handle(
            &mut traffic,
            data(4, None, Direction::Sent, query),
            &mut out,
        );
        traffic.tick(1, &mut out);
        traffic.set_members(&[1]);
        for _ in 0..LEAVING_TICKS {
            traffic.tick(1, &mut out);
        }
        assert_eq!(traffic.connections.len(), 1);
    }

    type Case<'a> = (Option<Role>, Direction, &'a [u8], Option<Protocol>);

    #[test]
    fn the_protocol_is_told_from_the_role_and_the_first_bytes() {
        use Direction::{Received, Sent};
        let startup = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]; // SSLRequest
        let query = b"Q\0\0\0\x0dSELECT 1\0";
        let ready = b"Z\0\0\0\x05I";
        let cases: [Case; 13] = [
            (
                Some(Role::Server),
                Received,
                b"GET / HTTP/1.1\r\n",
                Some(Protocol::Http),
            ),
            (
                None,
                Received,
                b"DELETE /x HTTP/1.1\r\n",
                Some(Protocol::Http),
            ),
            (None, Sent, b"HTTP/1.1 200 OK\r\n", Some(Protocol::Http)),
            (
                Some(Role::Client),
                Sent,
                b"GET / HTTP/1.1\r\n",
                Some(Protocol::Other),
            ),
            (Some(Role::Client), Sent, &startup, Some(Protocol::Postgres)),
            (None, Sent, &startup, Some(Protocol::Postgres)),
            (None, Sent, query, Some(Protocol::Postgres)),
            (None, Received, ready, Some(Protocol::Postgres)),
            (Some(Role::Server), Received, query, Some(Protocol::Other)),
            (
                None,
                Received,
                &[0x16, 3, 1, 0, 0xa5, 1, 0, 0, 0xa1],
                Some(Protocol::Other),
            ),
            (None, Received, b"GE", None),
            (
                None,
                Sent,
                b"SSH-2.0-OpenSSH_9.6\r\n",
                Some(Protocol::Other),
            ),
            (None, Sent, b"", None),
        ];
        for (role, direction, bytes, expected) in cases {
            let got = classify(role, direction, bytes);
            assert_eq!(got, expected, "{role:?} {direction:?} {bytes:?}");
        }
    }

    fn tcp(local: &str, remote: &str) -> Endpoints {
        Endpoints::Tcp {
            local: local.parse().expect("address"),
            remote: remote.parse().expect("address"),
        }
    }

    #[test]
    fn a_connection_older_than_the_daemon_gets_its_role_and_addresses_from_procfs() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        let mut out = Decoded::default();
        let ends = tcp("127.0.0.1:8080", "127.0.0.1:51000");
        let seed = Seed {
            role: Some(Role::Server),
            endpoints: ends,
        };
        traffic.seed(1, &[(7, seed)]);
        handle(
            &mut traffic,
            data(0xc0, None, Direction::Received, b"GET / HTTP/1.1\r\n"),
            &mut out,
        );
        assert_eq!(traffic.connections[&0xc0].role, Some(Role::Server));
        assert_eq!(traffic.connections[&0xc0].endpoints, Some(ends));
        assert!(metrics
            .encode()
            .contains("selfheal_capture_events_total{direction=\"recv\",role=\"server\"} 1"));
        // The seed is used once: a later connection on a reused fd 7 is not given it.
        assert!(traffic.seeded.is_empty());
        handle(
            &mut traffic,
            data(0xc8, None, Direction::Received, b"GET / HTTP/1.1\r\n"),
            &mut out,
        );
        assert_eq!(traffic.connections[&0xc8].endpoints, None);
    }

    #[test]
    fn a_seed_that_arrives_after_the_first_capture_still_applies() {
        let mut traffic = Traffic::new(Metrics::new());
        let mut out = Decoded::default();
        // Procfs is read on another thread: the connection's bytes can come first.
        let query = b"Q\0\0\0\x0dSELECT 1\0";
        handle(
            &mut traffic,
            data(0xd0, None, Direction::Sent, query),
            &mut out,
        );
        assert_eq!(traffic.connections[&0xd0].endpoints, None);
        let unix = Seed {
            role: None,
            endpoints: Endpoints::Unix,
        };
        // Another process's fd 7 and this process's fd 8 are not this connection.
        traffic.seed(2, &[(7, unix)]);
        traffic.seed(1, &[(8, unix)]);
        assert_eq!(traffic.connections[&0xd0].endpoints, None);
        traffic.seed(1, &[(7, unix)]);
        assert_eq!(traffic.connections[&0xd0].endpoints, Some(Endpoints::Unix));
        assert_eq!(traffic.connections[&0xd0].role, None);
        // Applied, so not kept for a later connection on the same fd.
        assert!(!traffic.seeded.contains_key(&(1, 7)));
        assert!(traffic.seeded.contains_key(&(1, 8)));
    }

    #[test]
    fn addresses_come_from_the_kernels_tcp_events() {
        let v4 = |a: [u8; 4]| {
            let mut raw = [0; 16];
            raw[..4].copy_from_slice(&a);
            raw
        };
        assert_eq!(
            Endpoints::from_raw(2, v4([127, 0, 0, 1]), 8080, v4([10, 1, 2, 3]), 51_000),
            Some(tcp("127.0.0.1:8080", "10.1.2.3:51000"))
        );
        let v6 = |text: &str| text.parse::<Ipv6Addr>().expect("ip").octets();
        assert_eq!(
            Endpoints::from_raw(10, v6("::1"), 5432, v6("fe80::2"), 40_000),
            Some(tcp("[::1]:5432", "[fe80::2]:40000"))
        );
        // An IPv6 socket talking IPv4: shown as the IPv4 address the other end sees.
        assert_eq!(
            Endpoints::from_raw(10, v6("::ffff:127.0.0.1"), 8080, v6("::ffff:127.0.0.2"), 9),
            Some(tcp("127.0.0.1:8080", "127.0.0.2:9"))
        );
        assert_eq!(Endpoints::from_raw(1, [0; 16], 1, [0; 16], 2), None);
        assert_eq!(
            tcp("[::1]:1", "[::1]:5432").remote().to_string(),
            "[::1]:5432"
        );
        assert_eq!(Endpoints::Unix.remote().to_string(), "unix");
    }

    #[test]
    fn process_sockets_reads_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let (unix, _other_end) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let sockets = process_sockets(std::process::id());
        assert!(sockets.listening.contains(&port), "{sockets:?}");
        let fd = |s: &dyn std::os::fd::AsRawFd| u32::try_from(s.as_raw_fd()).expect("fd");
        let seed = |fd: u32| {
            sockets
                .connected
                .iter()
                .find(|(f, _)| *f == fd)
                .map(|(_, seed)| *seed)
        };
        let tcp_seed = |s: &std::net::TcpStream, role| Seed {
            role: Some(role),
            endpoints: Endpoints::Tcp {
                local: s.local_addr().expect("local"),
                remote: s.peer_addr().expect("peer"),
            },
        };
        assert_eq!(
            seed(fd(&server)),
            Some(tcp_seed(&server, Role::Server)),
            "{sockets:?}"
        );
        assert_eq!(
            seed(fd(&client)),
            Some(tcp_seed(&client, Role::Client)),
            "{sockets:?}"
        );
        let unix_seed = Seed {
            role: None,
            endpoints: Endpoints::Unix,
        };
        assert_eq!(seed(fd(&unix)), Some(unix_seed), "{sockets:?}");
        assert_eq!(seed(fd(&listener)), None, "a listener is not a connection");
    }

    #[test]
    fn decoded_exchanges_and_queries_carry_their_connections_addresses() {
        let mut traffic = Traffic::new(Metrics::new());
        let mut out = Decoded::default();
        let served = tcp("127.0.0.1:8080", "127.0.0.1:51000");
        handle(
            &mut traffic,
            Capture::Opened {
                tgid: 1,
                sock: 0xe0,
                role: Role::Server,
                endpoints: Some(served),
                ts_ns: 0,
            },
            &mut out,
        );
        let request = b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n";
        handle(
            &mut traffic,
            data(0xe0, None, Direction::Received, request),
            &mut out,
        );
        let (in_flight, _) = traffic.in_flight();
        let origin = Origin {
            tgid: 1,
            endpoints: Some(served),
        };
        assert_eq!(in_flight.len(), 1);
        assert_eq!(in_flight[0].0, origin);
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        handle(
            &mut traffic,
            data(0xe0, None, Direction::Sent, response),
            &mut out,
        );
        assert_eq!(out.http.len(), 1);
        assert_eq!(out.http[0].0, origin);
        let peer = out.http[0].0.endpoints.map(|e| e.remote().to_string());
        assert_eq!(peer.as_deref(), Some("127.0.0.1:51000"));

        // A pool connection older than the daemon, over a unix socket.
        let unix = Seed {
            role: None,
            endpoints: Endpoints::Unix,
        };
        traffic.seed(1, &[(7, unix)]);
        let query = b"Q\0\0\0\x0dSELECT 1\0";
        let answer = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";
        handle(
            &mut traffic,
            data(0xf0, None, Direction::Sent, query),
            &mut out,
        );
        handle(
            &mut traffic,
            data(0xf0, None, Direction::Received, answer),
            &mut out,
        );
        assert!(!out.postgres.is_empty());
        assert!(
            out.postgres
                .iter()
                .all(|(o, _)| o.endpoints == Some(Endpoints::Unix)),
            "{:?}",
            out.postgres
        );

        // What a close flushes (a body read until the close) keeps its addresses too.
        out.clear();
        let request = b"GET /a HTTP/1.1\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody";
        handle(
            &mut traffic,
            data(0xe0, None, Direction::Received, request),
            &mut out,
        );
        handle(
            &mut traffic,
            data(0xe0, None, Direction::Sent, response),
            &mut out,
        );
        handle(
            &mut traffic,
            Capture::Closed {
                sock: 0xe0,
                ts_ns: 9,
            },
            &mut out,
        );
        assert_eq!(out.http.len(), 1, "{:?}", out.http);
        assert_eq!(out.http[0].0, origin);
    }

    #[test]
    fn an_http_exchange_and_a_query_come_out_of_their_connections() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics);
        let mut out = Decoded::default();
        let request = b"GET /api/v1/leads/7 HTTP/1.1\r\nHost: a\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        handle(
            &mut traffic,
            data(1, Some(Role::Server), Direction::Received, request),
            &mut out,
        );
        handle(
            &mut traffic,
            data(1, Some(Role::Server), Direction::Sent, response),
            &mut out,
        );
        assert_eq!(out.http.len(), 1);
        assert_eq!(out.http[0].1.request.path, "/api/v1/leads/7");
        assert_eq!(out.http[0].1.status, 200);

        // A pool connection older than the daemon: joined mid-way from a frontend message.
        let query = b"Q\0\0\0\x0dSELECT 1\0";
        let answer = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";
        handle(
            &mut traffic,
            data(2, None, Direction::Sent, query),
            &mut out,
        );
        handle(
            &mut traffic,
            data(2, None, Direction::Received, answer),
            &mut out,
        );
        assert!(
            out.postgres
                .iter()
                .any(|(_, e)| matches!(e, PgEvent::Query(q) if q.rows == 1)),
            "{:?}",
            out.postgres
        );
    }

    fn segment(sock: u64, direction: Direction, seq: u32, bytes: &[u8], ts_ns: u64) -> Batch {
        Batch {
            captures: vec![Capture::Segment {
                sock,
                direction,
                seq,
                total_len: bytes.len() as u32,
                captured: 0..bytes.len(),
                endpoints: Some(tcp("127.0.0.1:8080", "127.0.0.1:51000")),
                ts_ns,
            }],
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn segments_out_of_order_are_decoded_in_stream_order() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        traffic.set_members(&[40]);
        let mut out = Decoded::default();
        // A connection older than the daemon: procfs's seed with the same addresses gives
        // its role and process.
        let seed = Seed {
            role: Some(Role::Server),
            endpoints: tcp("127.0.0.1:8080", "127.0.0.1:51000"),
        };
        traffic.seed(41, &[(9, seed)]);
        let request = b"GET /api/v1/leads/7 HTTP/1.1\r\nHost: a\r\n\r\n";
        let (first, rest) = request.split_at(12);
        let (second, third) = rest.split_at(10);
        // The stream starts at its first segment seen and wraps inside the request.
        let isn = u32::MAX - 4;
        // The third segment arrives before the second, then the first again (retransmitted).
        for (seq, bytes, ts) in [
            (isn, first, 100),
            (isn.wrapping_add(22), third, 101),
            (isn.wrapping_add(12), second, 102),
            (isn, first, 103),
        ] {
            handle(
                &mut traffic,
                segment(5, Direction::Received, seq, bytes, ts),
                &mut out,
            );
        }
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        handle(
            &mut traffic,
            segment(5, Direction::Sent, 7, response, 900),
            &mut out,
        );
        assert_eq!(out.http.len(), 1, "{:?}", out.http);
        let (origin, exchange) = &out.http[0];
        assert_eq!(origin.tgid, 41);
        assert_eq!(exchange.request.path, "/api/v1/leads/7");
        assert_eq!(exchange.status, 200);
        assert_eq!(
            exchange.latency_ns(),
            800,
            "from the request's first segment"
        );
        assert!(metrics
            .encode()
            .contains("selfheal_capture_events_total{direction=\"recv\",role=\"server\"} 4"));
        // A hole that never fills is given up at close: what was held past it is decoded.
        let query = b"Q\0\0\0\x0dSELECT 1\0";
        let answer = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";
        out.clear();
        for (direction, seq, bytes) in [
            (Direction::Sent, 1000, &query[..]),
            (Direction::Sent, 1000 + 50, &query[..]),
            (Direction::Received, 5000, &answer[..]),
        ] {
            handle(
                &mut traffic,
                segment(6, direction, seq, bytes, 10),
                &mut out,
            );
        }
        assert_eq!(
            traffic.connections[&6].tgid, 40,
            "no seed: the target's first process"
        );
        handle(
            &mut traffic,
            Capture::Closed { sock: 6, ts_ns: 13 },
            &mut out,
        );
        assert!(!traffic.connections.contains_key(&6));
        assert!(
            !out.postgres.is_empty(),
            "the query before the hole completed"
        );
    }

    /// A connection the capture shed for a while and took back jumps ahead in both
    /// directions: its next request and answer are decoded at once, not held for holes that
    /// no retransmission will fill.
    #[test]
    fn a_connection_taken_back_after_shedding_is_decoded_from_its_next_segment() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        traffic.set_members(&[40]);
        let mut out = Decoded::default();
        let request = |id: u32| format!("GET /api/v1/leads/{id} HTTP/1.1\r\nHost: a\r\n\r\n");
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let exchange = |traffic: &mut Traffic, out: &mut Decoded, at: (u32, u32), id, ts| {
            handle(
                traffic,
                segment(7, Direction::Received, at.0, request(id).as_bytes(), ts),
                out,
            );
            handle(
                traffic,
                segment(7, Direction::Sent, at.1, response, ts + 50),
                out,
            );
        };
        exchange(&mut traffic, &mut out, (1000, 9000), 1, 100);
        assert_eq!(out.http.len(), 1);
        // A request whose answer the shedding takes.
        let pending = 1000 + request(1).len() as u32;
        handle(
            &mut traffic,
            segment(7, Direction::Received, pending, request(9).as_bytes(), 200),
            &mut out,
        );
        // Shed, then taken back: the requests and answers in between were never captured.
        readmit(&mut traffic);
        let now = 10_000;
        exchange(
            &mut traffic,
            &mut out,
            (1000 + 40 * 500, 9000 + 38 * 500),
            2,
            now,
        );
        assert_eq!(out.http.len(), 2, "decoded at once: {:?}", out.http);
        assert_eq!(
            out.http[1].1.request.path, "/api/v1/leads/2",
            "the new answer is not taken for the pending request's"
        );
        assert_eq!(out.http[1].1.latency_ns(), 50);
        // Every connection kept since: a hole waits for its retransmission again.
        let next = 1000 + 40 * 500 + request(2).len() as u32;
        handle(
            &mut traffic,
            segment(
                7,
                Direction::Received,
                next + 100,
                request(3).as_bytes(),
                now + 100,
            ),
            &mut out,
        );
        assert_eq!(out.http.len(), 2);
        assert!(traffic.held_bytes > 0, "held past the hole");
    }

    /// A connection kept through the shedding, waiting for a retransmission when the capture
    /// takes back others: the retransmission still fills its hole.
    #[test]
    fn a_kept_connection_waiting_for_a_hole_is_not_started_over_by_a_readmission() {
        let mut traffic = Traffic::new(Metrics::new());
        traffic.set_members(&[40]);
        let mut out = Decoded::default();
        let request = b"GET /api/v1/leads/7 HTTP/1.1\r\nHost: a\r\n\r\n";
        let (first, rest) = request.split_at(10);
        let (second, third) = rest.split_at(10);
        for (seq, bytes, ts) in [(100, first, 1), (120, third, 2)] {
            handle(
                &mut traffic,
                segment(8, Direction::Received, seq, bytes, ts),
                &mut out,
            );
        }
        readmit(&mut traffic);
        handle(
            &mut traffic,
            segment(8, Direction::Received, 110, second, 3),
            &mut out,
        );
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        handle(
            &mut traffic,
            segment(8, Direction::Sent, 7000, response, 4),
            &mut out,
        );
        assert_eq!(out.http.len(), 1, "{:?}", out.http);
        assert_eq!(out.http[0].1.request.path, "/api/v1/leads/7");
        let streams = traffic.connections[&8].streams.as_ref().expect("streams");
        assert_eq!(
            streams[0].stats().gaps,
            0,
            "the hole was filled, not given up"
        );
    }

    #[test]
    fn out_of_order_segments_held_across_connections_stay_under_the_budget() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        traffic.set_members(&[1]);
        let mut out = Decoded::default();
        let payload = [b'x'; 512];
        // Each connection starts its stream, then gets segments past a hole that never fills:
        // far more held bytes in total than the budget allows.
        let connections = 2 * MAX_HELD_BYTES / (crate::protocols::tcp::MAX_HELD * 512) + 1;
        for sock in 1..=connections as u64 {
            handle(
                &mut traffic,
                segment(sock, Direction::Received, 0, &payload, 1),
                &mut out,
            );
            for i in 0..crate::protocols::tcp::MAX_HELD as u32 {
                let seq = 10_000 + i * 512;
                handle(
                    &mut traffic,
                    segment(sock, Direction::Received, seq, &payload, 2),
                    &mut out,
                );
            }
            assert!(
                traffic.held_bytes <= MAX_HELD_BYTES,
                "{}",
                traffic.held_bytes
            );
        }
        let held: usize = traffic
            .connections
            .values()
            .filter_map(|c| c.streams.as_ref())
            .flat_map(|s| s.iter().map(Reassembler::heap_bytes))
            .sum();
        assert_eq!(held, traffic.held_bytes, "the running total is exact");
        assert!(metrics
            .encode()
            .contains("selfheal_ebpf_ringbuf_drops_total{reason=\"reassembly_budget\"}"));
        // Closing them all gives the budget back.
        for sock in 1..=connections as u64 {
            handle(&mut traffic, Capture::Closed { sock, ts_ns: 3 }, &mut out);
        }
        assert_eq!(traffic.held_bytes, 0);
    }
}
