//! Traffic: the captured socket payloads of the target, per connection.
//!
//! Owns: the connection table (the kernel's `struct sock *` → what is known about it) and the
//! accounting of captured traffic. The protocol decoders (`protocols`) are fed from here, one
//! parser per connection. Must not: block the eBPF reader (it hands captures over through a
//! bounded queue and counts what does not fit) or grow without bound (the table is capped).

use std::collections::HashMap;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;

use crate::telemetry::{CaptureLabel, Metrics, ReasonLabel};

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

/// Which way the bytes went, seen from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Recv,
    Send,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Self::Recv => "recv",
            Self::Send => "send",
        }
    }
}

/// What the eBPF reader hands over.
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
        /// Their first bytes (up to `probes.payload_bytes`).
        captured: Vec<u8>,
        ts_ns: u64,
    },
    /// A TCP connection of the target was established (connect or accept).
    Opened {
        tgid: u32,
        sock: u64,
        role: Role,
        ts_ns: u64,
    },
    /// A TCP connection of the target closed.
    Closed { sock: u64, ts_ns: u64 },
}

/// The most connections tracked at once; beyond it new ones are refused and counted.
const MAX_CONNECTIONS: usize = 65_536;

#[derive(Debug, Default)]
struct Connection {
    tgid: u32,
    role: Option<Role>,
    recv_bytes: u64,
    send_bytes: u64,
}

/// The capture counters of one (direction, role) pair, looked up once.
struct Counters {
    events: Counter,
    bytes: Counter,
}

/// The connection table and its accounting.
pub struct Traffic {
    metrics: Metrics,
    connections: HashMap<u64, Connection>,
    /// Indexed by `direction * 3 + role` (client, server, unknown).
    counters: Vec<Counters>,
}

impl Traffic {
    pub fn new(metrics: Metrics) -> Self {
        let mut counters = Vec::with_capacity(6);
        for direction in [Direction::Recv, Direction::Send] {
            for role in ["client", "server", "unknown"] {
                let label = CaptureLabel {
                    direction: direction.label(),
                    role,
                };
                counters.push(Counters {
                    events: metrics.capture_events.get_or_create(&label).clone(),
                    bytes: metrics.capture_bytes.get_or_create(&label).clone(),
                });
            }
        }
        Self {
            metrics,
            connections: HashMap::new(),
            counters,
        }
    }

    fn counters(&self, direction: Direction, role: Option<Role>) -> &Counters {
        let row = match direction {
            Direction::Recv => 0,
            Direction::Send => 3,
        };
        let column = match role {
            Some(Role::Client) => 0,
            Some(Role::Server) => 1,
            None => 2,
        };
        &self.counters[row + column]
    }

    pub fn handle(&mut self, capture: &Capture) {
        match *capture {
            Capture::Data {
                tgid,
                sock,
                role,
                direction,
                total_len,
                ..
            } => {
                let known = self.connections.get(&sock).and_then(|c| c.role).or(role);
                let counters = self.counters(direction, known);
                counters.events.inc();
                counters.bytes.inc_by(total_len);
                let room = self.connections.len() < MAX_CONNECTIONS;
                let connection = if room {
                    Some(self.connections.entry(sock).or_insert_with(|| Connection {
                        tgid,
                        role,
                        ..Connection::default()
                    }))
                } else {
                    self.connections.get_mut(&sock)
                };
                if let Some(connection) = connection {
                    match direction {
                        Direction::Recv => connection.recv_bytes += total_len,
                        Direction::Send => connection.send_bytes += total_len,
                    }
                } else {
                    let reason = ReasonLabel {
                        reason: "connection_table_full",
                    };
                    self.metrics.ebpf_ringbuf_drops.get_or_create(&reason).inc();
                }
            }
            Capture::Opened {
                tgid, sock, role, ..
            } => {
                // A reused `struct sock` is a new connection.
                if self.connections.len() < MAX_CONNECTIONS {
                    let connection = Connection {
                        tgid,
                        role: Some(role),
                        ..Connection::default()
                    };
                    self.connections.insert(sock, connection);
                }
            }
            Capture::Closed { sock, .. } => {
                self.connections.remove(&sock);
            }
        }
    }

    /// Handles a batch and updates the connection gauge once.
    pub fn handle_batch(&mut self, batch: &[Capture]) {
        for capture in batch {
            self.handle(capture);
        }
        let tracked = i64::try_from(self.connections.len()).unwrap_or(i64::MAX);
        self.metrics.capture_connections.set(tracked);
    }

    /// Forgets the connections of processes that are no longer the target's.
    pub fn retain_processes(&mut self, members: &[u32]) {
        self.connections
            .retain(|_, connection| members.contains(&connection.tgid));
    }
}

/// Consumes captures until cancelled or the reader is gone; forgets the connections of
/// processes that stop being the target's.
pub async fn run(
    mut captures: mpsc::Receiver<Vec<Capture>>,
    mut members: watch::Receiver<Vec<u32>>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut traffic = Traffic::new(metrics);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = members.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = members.borrow_and_update().clone();
                traffic.retain_processes(&current);
            }
            batch = captures.recv() => match batch {
                Some(batch) => traffic.handle_batch(&batch),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(sock: u64, role: Option<Role>, direction: Direction, total_len: u64) -> Capture {
        Capture::Data {
            tgid: 1,
            fd: 7,
            sock,
            role,
            direction,
            total_len,
            captured: b"GET / HTTP/1.1\r\n".to_vec(),
            ts_ns: 1,
        }
    }

    #[test]
    fn connections_are_tracked_and_traffic_counted() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        traffic.handle(&Capture::Opened {
            tgid: 1,
            sock: 0xa0,
            role: Role::Server,
            ts_ns: 0,
        });
        for _ in 0..3 {
            traffic.handle(&data(0xa0, None, Direction::Recv, 100));
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
        traffic.handle(&Capture::Closed {
            sock: 0xa0,
            ts_ns: 3,
        });
        assert!(traffic.connections.is_empty());

        // A connection older than the daemon: no open seen, role unknown, still tracked.
        traffic.handle(&data(0xb0, None, Direction::Send, 8));
        assert!(metrics
            .encode()
            .contains("selfheal_capture_events_total{direction=\"send\",role=\"unknown\"} 1"));
        traffic.retain_processes(&[2]);
        assert!(traffic.connections.is_empty());
    }
}
