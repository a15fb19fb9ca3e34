//! Traffic: the captured socket payloads of the target, per connection.
//!
//! Owns: the connection table (`(tgid, fd)` → what is known about it) and the accounting of
//! captured traffic. The protocol decoders (`protocols`) are fed from here, one parser per
//! connection. Must not: block the eBPF reader (it hands captures over through a bounded
//! queue and counts what does not fit) or grow without bound (the table is capped).

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
    pub fn from_raw(raw: u32) -> Self {
        if raw == u32::from(selfheal_ebpf::ROLE_SERVER) {
            Self::Server
        } else {
            Self::Client
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
        role: Role,
        direction: Direction,
        /// Bytes the syscall moved.
        total_len: u64,
        /// Their first bytes (up to `probes.payload_bytes`).
        captured: Vec<u8>,
        enter_ns: u64,
        exit_ns: u64,
    },
    Opened {
        tgid: u32,
        fd: u32,
        role: Role,
        ts_ns: u64,
    },
    Closed {
        tgid: u32,
        fd: u32,
        ts_ns: u64,
    },
}

/// The most connections tracked at once; beyond it new ones are refused and counted.
const MAX_CONNECTIONS: usize = 65_536;

#[derive(Debug, Default)]
struct Connection {
    recv_bytes: u64,
    send_bytes: u64,
}

/// The connection table and its accounting.
pub struct Traffic {
    metrics: Metrics,
    connections: HashMap<(u32, u32), Connection>,
}

impl Traffic {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            connections: HashMap::new(),
        }
    }

    pub fn handle(&mut self, capture: &Capture) {
        match *capture {
            Capture::Data {
                tgid,
                fd,
                role,
                direction,
                total_len,
                ..
            } => {
                let label = CaptureLabel {
                    direction: direction.label(),
                    role: role.label(),
                };
                self.metrics.capture_events.get_or_create(&label).inc();
                self.metrics
                    .capture_bytes
                    .get_or_create(&label)
                    .inc_by(total_len);
                let connection = if self.connections.len() < MAX_CONNECTIONS {
                    Some(self.connections.entry((tgid, fd)).or_default())
                } else {
                    self.connections.get_mut(&(tgid, fd))
                };
                match connection {
                    Some(connection) => match direction {
                        Direction::Recv => connection.recv_bytes += total_len,
                        Direction::Send => connection.send_bytes += total_len,
                    },
                    None => {
                        self.metrics
                            .ebpf_ringbuf_drops
                            .get_or_create(&ReasonLabel {
                                reason: "connection_table_full",
                            })
                            .inc();
                    }
                }
            }
            Capture::Opened { tgid, fd, .. } => {
                // A reused fd is a new connection.
                if self.connections.len() < MAX_CONNECTIONS {
                    self.connections.insert((tgid, fd), Connection::default());
                }
            }
            Capture::Closed { tgid, fd, .. } => {
                self.connections.remove(&(tgid, fd));
            }
        }
        self.metrics
            .capture_connections
            .set(i64::try_from(self.connections.len()).unwrap_or(i64::MAX));
    }

    /// Forgets the connections of processes that are no longer the target's.
    pub fn retain_processes(&mut self, members: &[u32]) {
        self.connections
            .retain(|(tgid, _), _| members.contains(tgid));
    }
}

/// Consumes captures until cancelled or the reader is gone.
pub async fn run(
    mut captures: mpsc::Receiver<Capture>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut traffic = Traffic::new(metrics);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            capture = captures.recv() => match capture {
                Some(capture) => traffic.handle(&capture),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_tracked_and_traffic_counted() {
        let metrics = Metrics::new();
        let mut traffic = Traffic::new(metrics.clone());
        traffic.handle(&Capture::Opened {
            tgid: 1,
            fd: 7,
            role: Role::Server,
            ts_ns: 0,
        });
        for _ in 0..3 {
            traffic.handle(&Capture::Data {
                tgid: 1,
                fd: 7,
                role: Role::Server,
                direction: Direction::Recv,
                total_len: 100,
                captured: b"GET / HTTP/1.1\r\n".to_vec(),
                enter_ns: 1,
                exit_ns: 2,
            });
        }
        assert_eq!(traffic.connections[&(1, 7)].recv_bytes, 300);
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
            tgid: 1,
            fd: 7,
            ts_ns: 3,
        });
        assert!(traffic.connections.is_empty());
        traffic.handle(&Capture::Opened {
            tgid: 2,
            fd: 3,
            role: Role::Client,
            ts_ns: 0,
        });
        traffic.retain_processes(&[1]);
        assert!(traffic.connections.is_empty());
    }
}
